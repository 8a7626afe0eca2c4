"""The one translation point from exceptions to gRPC statuses (AIP-193).

`ErrorTranslation` is a server interceptor wrapping every handler: a
`KbmeshError` becomes its status with `google.rpc.ErrorInfo` (+ `RetryInfo`);
anything unexpected becomes INTERNAL with a generic message while the details
go to the log. Handlers never build statuses themselves.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.common.errors import Code, KbmeshError

log = logging.getLogger(__name__)
# google.rpc.Code number -> grpc.StatusCode.
_CODES = {code.value[0]: code for code in grpc.StatusCode}
# google.rpc.Code number -> grpc.StatusCode.
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def status_of(error: KbmeshError, domain: str) -> status_pb2.Status:
    """The google.rpc.Status a caller receives for `error`."""
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=domain, metadata=error.metadata)
    status = status_pb2.Status(code=int(error.code), message=error.message)
    status.details.add().Pack(info)
    if error.retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return status


def _internal_status(domain: str) -> status_pb2.Status:
    status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see server logs")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=domain))
    return status


async def abort_with(
    context: grpc.aio.ServicerContext[Any, Any], status: status_pb2.Status
) -> None:
    """Ends the RPC with `status`, its details in `grpc-status-details-bin`."""
    await context.abort(
        _CODES[status.code],
        status.message,
        trailing_metadata=(("grpc-status-details-bin", status.SerializeToString()),),
    )


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


# Wraps one behaviour: (handler function, streams requests, streams responses)
# -> the function to run instead.
Rewrap = Callable[[Callable[..., Any], bool, bool], Callable[..., Any]]


def rewrap_handler(handler: _Handler, wrap: Rewrap) -> _Handler:
    """`handler` with its behaviour replaced by `wrap(behaviour, ...)`, same
    (de)serializers and streaming kind: the one way every interceptor here
    wraps a method."""
    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary, False, False), **kwargs
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, True, False), **kwargs
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(handler.unary_stream, False, True), **kwargs
        )
    assert handler.stream_stream is not None
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True, True), **kwargs)


class ErrorTranslation(_Interceptor):
    """Wraps every RPC handler of a server with the error translation."""

    def __init__(self, domain: str) -> None:
        self._domain = domain

    def _status_for(self, exc: BaseException, method: str) -> status_pb2.Status:
        if isinstance(exc, KbmeshError):
            if exc.code == Code.INTERNAL:
                log.error("internal error", extra={"method": method, "reason": exc.reason})
            return status_of(exc, self._domain)
        log.exception("unhandled error", extra={"method": method}, exc_info=exc)
        return _internal_status(self._domain)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method
        translate = self._status_for

        def unary_response(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                try:
                    result = fn(request, context)
                    return await result if inspect.isawaitable(result) else result
                except (asyncio.CancelledError, grpc.aio.AbortError):
                    raise
                except BaseException as exc:
                    await abort_with(context, translate(exc, method))

            return wrapped

        def stream_response(fn: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
            async def wrapped(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                try:
                    responses = fn(request, context)
                    if inspect.isawaitable(responses):
                        await responses
                        return
                    async for response in responses:
                        yield response
                except (asyncio.CancelledError, grpc.aio.AbortError, GeneratorExit):
                    raise
                except BaseException as exc:
                    await abort_with(context, translate(exc, method))

            return wrapped

        return rewrap_handler(
            handler,
            lambda fn, _, streams_responses: (
                stream_response(fn) if streams_responses else unary_response(fn)
            ),
        )
