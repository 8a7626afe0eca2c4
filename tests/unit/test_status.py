"""The error translation point, on a real in-process grpc.aio server."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from services.common.errors import NotFound, ResourceExhausted, Unimplemented
from services.common.status import ErrorTranslation
from tests.support import error_info, retry_delay_seconds

Context = grpc.aio.ServicerContext[Any, Any]


async def not_found(request: bytes, context: Context) -> bytes:
    raise NotFound("TASK_NOT_FOUND", "task t-1 does not exist", metadata={"task_id": "t-1"})


async def busy(request: bytes, context: Context) -> bytes:
    raise ResourceExhausted("TOO_MANY_UPLOADS", "too many uploads in flight", retry_after=1.5)


async def crash(request: bytes, context: Context) -> bytes:
    raise ValueError("secret internal detail")


async def todo(request: bytes, context: Context) -> bytes:
    raise Unimplemented("Todo")


async def echo(request: bytes, context: Context) -> bytes:
    return request


async def stream_then_fail(request: bytes, context: Context) -> AsyncIterator[bytes]:
    yield b"first"
    raise NotFound("TASK_NOT_FOUND", "gone mid-stream")


HANDLERS = {
    "NotFound": grpc.unary_unary_rpc_method_handler(not_found),
    "Busy": grpc.unary_unary_rpc_method_handler(busy),
    "Crash": grpc.unary_unary_rpc_method_handler(crash),
    "Todo": grpc.unary_unary_rpc_method_handler(todo),
    "Echo": grpc.unary_unary_rpc_method_handler(echo),
    "Stream": grpc.unary_stream_rpc_method_handler(stream_then_fail),
}


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[ErrorTranslation("test.kbmesh")])
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", HANDLERS)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    await server.stop(None)


def unary(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(
        f"/t.T/{method}", request_serializer=None, response_deserializer=None
    )


async def call(channel: grpc.aio.Channel, method: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await unary(channel, method)(b"x")
    return caught.value


async def test_domain_error_becomes_its_status_with_error_info(channel: grpc.aio.Channel) -> None:
    err = await call(channel, "NotFound")
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == "task t-1 does not exist"
    info = error_info(err)
    assert (info.reason, info.domain, dict(info.metadata)) == (
        "TASK_NOT_FOUND",
        "test.kbmesh",
        {"task_id": "t-1"},
    )
    assert retry_delay_seconds(err) is None


async def test_retry_after_becomes_retry_info(channel: grpc.aio.Channel) -> None:
    err = await call(channel, "Busy")
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert retry_delay_seconds(err) == pytest.approx(1.5)


async def test_unexpected_error_is_internal_without_leaking_details(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        err = await call(channel, "Crash")
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (err.details() or "")
    assert error_info(err).reason == "INTERNAL"
    assert "secret internal detail" in caplog.text


async def test_unimplemented(channel: grpc.aio.Channel) -> None:
    err = await call(channel, "Todo")
    assert err.code() == grpc.StatusCode.UNIMPLEMENTED
    assert error_info(err).reason == "NOT_IMPLEMENTED"


async def test_success_passes_through(channel: grpc.aio.Channel) -> None:
    assert await unary(channel, "Echo")(b"hello") == b"hello"


async def test_error_after_stream_started_keeps_sent_messages(channel: grpc.aio.Channel) -> None:
    received: list[bytes] = []
    stream = channel.unary_stream(
        "/t.T/Stream", request_serializer=None, response_deserializer=None
    )

    async def read_all() -> None:
        async for message in stream(b"x"):
            received.append(message)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_all()
    assert received == [b"first"]
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).reason == "TASK_NOT_FOUND"
