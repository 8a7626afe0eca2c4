"""Keeps the server's status when a streaming call ends while the client writes.

When a server ends a client- or bidi-streaming RPC before the client has
finished sending (an upload refused with NOT_FOUND, RESOURCE_EXHAUSTED as soon
as a size limit is crossed, a worker stream refused with UNAUTHENTICATED), it
sends its status and closes the stream, and a write the client has in flight
fails. grpc.aio (1.85) then replaces the status it has already received with
its own INTERNAL "Internal error from Core" (`Failed "execute_batch"`), so a
Python caller saw INTERNAL for about two of three uploads refused mid-stream
(grpc/grpc#36066; a fix, grpc/grpc#43486, is not released). Other gRPC
clients, and grpc's blocking API, report the server's status.

`install()` replaces grpc.aio's write step with one that gives the server's
status priority: after a failed write it waits up to `STATUS_WAIT_SECONDS` for
the status (the stream is closed, so it is on its way) and only reports
INTERNAL when none arrives, which is what grpc.aio did to avoid hanging when
a write is refused for another reason. The SDK installs it on import, the
services at start-up (their workers and the Knowledge Service are clients of
the Task Manager). It is checked against the pinned grpcio in
tests/integration/test_task_manager.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpc
from grpc import _common
from grpc._cython import cygrpc
from grpc.aio import _call

STATUS_WAIT_SECONDS = 1.0
# The grpcio whose internals `_write` copies (pinned in pyproject.toml).
GRPCIO_VERSION = "1.85.1"


async def _write(self: Any, request: Any) -> None:
    """grpc.aio's `_StreamRequestMixin._write`, except for a failed send."""
    if self.done():
        raise asyncio.InvalidStateError(_call._RPC_ALREADY_FINISHED_DETAILS)
    if self._done_writing_flag:
        raise asyncio.InvalidStateError(_call._RPC_HALF_CLOSED_DETAILS)
    if not self._metadata_sent.is_set():
        await self._metadata_sent.wait()
        if self.done():
            await self._raise_for_status()

    serialized = _common.serialize(request, self._request_serializer)
    try:
        await self._cython_call.send_serialized_message(serialized)
    except cygrpc.InternalError as err:
        if not self._cython_call.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    asyncio.shield(self._cython_call.status()), STATUS_WAIT_SECONDS
                )
        if not self._cython_call.done():
            self._cython_call.set_internal_error(str(err))
        await self._raise_for_status()
    except asyncio.CancelledError:
        if not self.cancelled():
            self.cancel()
        raise


def install() -> bool:
    """Puts the replacement in place (idempotent); False on another grpcio,
    whose internals it was not written for."""
    if grpc.__version__ != GRPCIO_VERSION:
        return False
    _call._StreamRequestMixin._write = _write  # type: ignore[method-assign]
    return True
