"""A length bound on every string field of every public request.

Each RPC checks its own fields with tighter, documented limits (names,
filenames, queries…); this is the ceiling under all of them, applied to every
message of every public RPC before its handler runs, so a field added to a
proto later is bounded too. Bytes fields (file contents) are not strings and
are bounded by the upload limits instead.
"""

from __future__ import annotations

from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
)
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.common.auth import service_of
from services.common.errors import InvalidArgument
from services.common.status import rewrap_handler

# The default ceiling, in characters, for any string field.
MAX_STRING_CHARS = 16_384
REASON = "FIELD_TOO_LONG"


def _too_long(path: str, limit: int) -> InvalidArgument:
    return InvalidArgument(
        REASON,
        f"{path} is longer than {limit} characters",
        metadata={"field": path, "max_chars": str(limit)},
    )


def _string_and_message_fields(message: Message) -> Iterator[tuple[Any, Any]]:
    """The set string and message fields of `message` with their values.

    Unlike `ListFields()`, never touches bytes fields: reading one copies it,
    and an upload's file data (1 MiB per message) would be copied once more
    per message just to be skipped."""
    for field in message.DESCRIPTOR.fields:
        if field.type not in _CHECKED_TYPES:
            continue
        if field.is_repeated:
            value = getattr(message, field.name)
            if len(value):
                yield field, value
        elif message.HasField(field.name) if field.type == _MESSAGE else True:
            value = getattr(message, field.name)
            if field.type == _MESSAGE or value:
                yield field, value


_MESSAGE = FieldDescriptor.TYPE_MESSAGE
_CHECKED_TYPES = frozenset({FieldDescriptor.TYPE_STRING, _MESSAGE})


def check_string_lengths(message: Message, limit: int = MAX_STRING_CHARS, prefix: str = "") -> None:
    """Raises InvalidArgument(FIELD_TOO_LONG) naming the first string (or map
    key/value, or repeated element) of `message` longer than `limit`."""
    for field, value in _string_and_message_fields(message):
        path = f"{prefix}{field.name}"
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if field.is_repeated else [value]
            for item in values:
                if len(item) > limit:
                    raise _too_long(path, limit)
        elif field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(key, str) and len(key) > limit:
                    raise _too_long(f"{path} key", limit)
                if isinstance(item, str):
                    if len(item) > limit:
                        raise _too_long(f"{path}[{key[:32]!r}]", limit)
                elif isinstance(item, Message):
                    check_string_lengths(item, limit, f"{path}.")
        elif field.is_repeated:
            for item in value:
                check_string_lengths(item, limit, f"{path}.")
        else:
            check_string_lengths(value, limit, f"{path}.")


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


class StringBounds(_Interceptor):
    """Checks every request message of every RPC, except of `exempt` services."""

    def __init__(self, exempt: Iterable[str], limit: int = MAX_STRING_CHARS) -> None:
        self._exempt = frozenset(exempt)
        self._limit = limit

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None or service_of(handler_call_details.method) in self._exempt:
            return handler
        limit = self._limit

        async def checked(requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                check_string_lengths(request, limit)
                yield request

        def single(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(request: Any, context: Any) -> Any:
                check_string_lengths(request, limit)
                return fn(request, context)

            return wrapped

        def stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(requests: AsyncIterable[Any], context: Any) -> Any:
                return fn(checked(requests), context)

            return wrapped

        return rewrap_handler(
            handler, lambda fn, streams_requests, _: stream(fn) if streams_requests else single(fn)
        )
