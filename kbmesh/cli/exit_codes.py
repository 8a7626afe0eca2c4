"""Exit statuses of the `kbmesh` command (documented in docs/cli.md).

Scripts branch on these; the mapping from gRPC codes is in `for_error`.
"""

from __future__ import annotations

from enum import IntEnum

import grpc

from kbmesh.client.errors import KbmeshError


class Exit(IntEnum):
    OK = 0
    # A task ended FAILED or CANCELLED, or some of several uploads failed.
    FAILED = 1
    # Bad command line, missing files, or the service rejected an argument
    # (INVALID_ARGUMENT, OUT_OF_RANGE).
    USAGE = 2
    # Unknown knowledge base, document or task (NOT_FOUND).
    NOT_FOUND = 3
    # The service cannot be reached or did not answer in time (UNAVAILABLE,
    # DEADLINE_EXCEEDED), after the SDK's retries.
    UNAVAILABLE = 4
    # Missing or wrong API key (UNAUTHENTICATED, PERMISSION_DENIED).
    AUTH = 5
    # The request conflicts with the current state (ALREADY_EXISTS,
    # FAILED_PRECONDITION, ABORTED), e.g. cancelling a finished task.
    CONFLICT = 6
    # A limit was hit (RESOURCE_EXHAUSTED), e.g. a file too large.
    LIMIT = 7
    # Any other failure reported by the service (INTERNAL, DATA_LOSS, ...).
    ERROR = 8
    # Interrupted with Ctrl-C.
    INTERRUPTED = 130


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: Exit.USAGE,
    grpc.StatusCode.OUT_OF_RANGE: Exit.USAGE,
    grpc.StatusCode.NOT_FOUND: Exit.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: Exit.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Exit.UNAVAILABLE,
    grpc.StatusCode.UNAUTHENTICATED: Exit.AUTH,
    grpc.StatusCode.PERMISSION_DENIED: Exit.AUTH,
    grpc.StatusCode.ALREADY_EXISTS: Exit.CONFLICT,
    grpc.StatusCode.FAILED_PRECONDITION: Exit.CONFLICT,
    grpc.StatusCode.ABORTED: Exit.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Exit.LIMIT,
}


def for_error(error: KbmeshError) -> Exit:
    return _BY_CODE.get(error.code, Exit.ERROR)
