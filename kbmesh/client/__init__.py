"""Python SDK of kbmesh: `AsyncClient` (grpc.aio) and its blocking twin `Client`.

See docs/sdk.md. Connection settings come from arguments or the ``KBMESH_*``
environment (`ConnectionSettings`); failures raise `KbmeshError` subclasses
carrying the gRPC code and the ErrorInfo reason.
"""

from kbmesh.client.aio import (
    TERMINAL_STATES,
    AsyncClient,
    UploadProgress,
    document_state,
    new_request_id,
    search_mode,
    task_state,
)
from kbmesh.client.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    KbmeshError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from kbmesh.client.retry import NO_RETRY, RetryPolicy
from kbmesh.client.settings import ConnectionSettings, SettingsError
from kbmesh.client.sources import UploadSource
from kbmesh.client.sync import Client

__all__ = [
    "NO_RETRY",
    "TERMINAL_STATES",
    "Aborted",
    "AlreadyExists",
    "AsyncClient",
    "Cancelled",
    "Client",
    "ConnectionSettings",
    "DataLoss",
    "DeadlineExceeded",
    "FailedPrecondition",
    "Internal",
    "InvalidArgument",
    "KbmeshError",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "ResourceExhausted",
    "RetryPolicy",
    "SettingsError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "UploadProgress",
    "UploadSource",
    "document_state",
    "new_request_id",
    "search_mode",
    "task_state",
]
