"""The error vocabulary of kbmesh (AIP-193), free of gRPC.

Domain code raises a subclass of `KbmeshError`; the one translation point
(`services.common.status`) turns it into a gRPC status with a
`google.rpc.ErrorInfo` (and `RetryInfo` when `retry_after` is set). Reasons are
stable UPPER_SNAKE_CASE constants listed in docs/errors.md: clients branch on
the reason, people read the message.
"""

from __future__ import annotations

from enum import IntEnum
from typing import ClassVar


class Code(IntEnum):
    """google.rpc.Code values (same numbers as gRPC status codes)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class KbmeshError(Exception):
    """Root of every error kbmesh reports to a caller.

    `reason` is the ErrorInfo reason, `metadata` its metadata (ids, limits:
    strings only, never secrets), `retry_after` seconds become a RetryInfo.
    """

    code: ClassVar[Code] = Code.UNKNOWN

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        metadata: dict[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.message!r})"


class Cancelled(KbmeshError):
    code = Code.CANCELLED


class InvalidArgument(KbmeshError):
    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(KbmeshError):
    code = Code.DEADLINE_EXCEEDED


class NotFound(KbmeshError):
    code = Code.NOT_FOUND


class AlreadyExists(KbmeshError):
    code = Code.ALREADY_EXISTS


class PermissionDenied(KbmeshError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(KbmeshError):
    code = Code.RESOURCE_EXHAUSTED


class FailedPrecondition(KbmeshError):
    code = Code.FAILED_PRECONDITION


class Aborted(KbmeshError):
    code = Code.ABORTED


class Unimplemented(KbmeshError):
    code = Code.UNIMPLEMENTED

    def __init__(self, method: str) -> None:
        super().__init__(
            "NOT_IMPLEMENTED",
            f"{method} is not available in this version of kbmesh yet",
            metadata={"method": method},
        )


class Internal(KbmeshError):
    code = Code.INTERNAL


class Unavailable(KbmeshError):
    code = Code.UNAVAILABLE


class DataLoss(KbmeshError):
    code = Code.DATA_LOSS


class Unauthenticated(KbmeshError):
    code = Code.UNAUTHENTICATED
