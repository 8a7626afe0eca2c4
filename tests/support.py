"""Helpers tests share: reading AIP-193 error details off a gRPC error, upload
messages, watch events."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from google.api import httpbody_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc.aio import EOF  # type: ignore[attr-defined]  # missing from grpc-stubs

from kbmesh.taskmanager.v1 import task_manager_pb2


def rpc_status(error: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The google.rpc.Status carried in `grpc-status-details-bin`."""
    metadata: Iterable[tuple[str, str | bytes]] = error.trailing_metadata() or ()  # type: ignore[assignment]
    for key, value in metadata:
        if key == "grpc-status-details-bin":
            assert isinstance(value, bytes)
            return status_pb2.Status.FromString(value)
    raise AssertionError(f"no status details on {error.code()}: {error.details()}")


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    """The ErrorInfo detail of a gRPC error (fails the test if absent)."""
    for detail in rpc_status(error).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError(f"no ErrorInfo on {error.code()}: {error.details()}")


def retry_delay_seconds(error: grpc.aio.AioRpcError) -> float | None:
    """The RetryInfo delay of a gRPC error, if it has one."""
    for detail in rpc_status(error).details:
        info = error_details_pb2.RetryInfo()
        if detail.Unpack(info):
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


def upload_messages(
    data: bytes,
    *,
    chunk_size: int = 64 * 1024,
    header_with_first_bytes: bool = False,
    **header: Any,
) -> Iterator[task_manager_pb2.UploadRequest]:
    """An Upload stream: the header, then `data` in chunks.

    `header_with_first_bytes` puts the first chunk in the header message, the
    shape Envoy's REST transcoding produces."""
    chunks = [data[i : i + chunk_size] for i in range(0, len(data), chunk_size)]
    first = task_manager_pb2.UploadRequest(**header)
    if header_with_first_bytes and chunks:
        first.file.data = chunks.pop(0)
    yield first
    for chunk in chunks:
        yield task_manager_pb2.UploadRequest(file=httpbody_pb2.HttpBody(data=chunk))


async def next_event(call: Any) -> task_manager_pb2.WatchTaskResponse | None:
    """The next message of a WatchTask call read with read(), None at the end."""
    message = await call.read()
    if message is EOF:
        return None
    assert isinstance(message, task_manager_pb2.WatchTaskResponse)
    return message


async def remaining_events(call: Any) -> list[task_manager_pb2.WatchTaskResponse]:
    events = []
    while (event := await next_event(call)) is not None:
        events.append(event)
    return events
