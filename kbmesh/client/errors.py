"""Typed errors of the kbmesh SDK.

Every failed call raises a `KbmeshError` subclass chosen by its gRPC status
code, carrying the `google.rpc.ErrorInfo` the services attach (AIP-193):
`reason` (a stable UPPER_SNAKE_CASE constant, see docs/errors.md), `domain`,
`metadata`, and the `google.rpc.RetryInfo` delay as `retry_after` seconds.
Branch on `reason`; show `message` to people.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


class KbmeshError(Exception):
    """Root of every error the SDK raises for a failed call."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        reason: str = "",
        domain: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after

    @property
    def code_name(self) -> str:
        """The status code's name, e.g. ``"NOT_FOUND"``."""
        return self.code.name

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r})"


class Cancelled(KbmeshError):
    code = grpc.StatusCode.CANCELLED


class InvalidArgument(KbmeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(KbmeshError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(KbmeshError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(KbmeshError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(KbmeshError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(KbmeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(KbmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(KbmeshError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(KbmeshError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(KbmeshError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(KbmeshError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(KbmeshError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(KbmeshError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(KbmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE: dict[grpc.StatusCode, type[KbmeshError]] = {
    cls.code: cls
    for cls in (
        Cancelled,
        InvalidArgument,
        DeadlineExceeded,
        NotFound,
        AlreadyExists,
        PermissionDenied,
        ResourceExhausted,
        FailedPrecondition,
        Aborted,
        OutOfRange,
        Unimplemented,
        Internal,
        Unavailable,
        DataLoss,
        Unauthenticated,
    )
}


def error_class(code: grpc.StatusCode) -> type[KbmeshError]:
    """The exception class for a gRPC status code (KbmeshError for UNKNOWN)."""
    return _BY_CODE.get(code, KbmeshError)


def rpc_status(trailing_metadata: Iterable[Any]) -> status_pb2.Status | None:
    """The google.rpc.Status a server packed into `grpc-status-details-bin`."""
    for key, value in trailing_metadata:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            try:
                return status_pb2.Status.FromString(value)
            except Exception:  # a garbled trailer must not hide the real error
                return None
    return None


def from_rpc_error(error: grpc.RpcError) -> KbmeshError:
    """The typed error for a failed call, with its ErrorInfo and RetryInfo."""
    # Every error a call raises is also a grpc.Call (code, details, trailers).
    call: Any = error
    code: grpc.StatusCode = call.code()
    message: str = call.details() or code.name
    trailers = call.trailing_metadata() or ()
    status = rpc_status(trailers)
    reason = domain = ""
    metadata: dict[str, str] = {}
    retry_after: float | None = None
    if status is not None:
        message = status.message or message
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
                continue
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(retry):
                retry_after = retry.retry_delay.ToNanoseconds() / 1e9
    return error_class(code)(
        message, reason=reason, domain=domain, metadata=metadata, retry_after=retry_after
    )
