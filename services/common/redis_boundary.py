"""Where Redis meets the domain: failures become statuses, replies become text.

Every adapter method that talks to Redis runs inside `redis_errors()` (or is
decorated with `redis_boundary`), so a lost or timed-out connection reaches
callers as UNAVAILABLE (REDIS_UNAVAILABLE) with a retry hint instead of a
raw exception that would turn into INTERNAL.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar

import redis.exceptions

from services.common.errors import Unavailable

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Turns a lost or timed-out Redis connection into UNAVAILABLE with a retry hint."""
    try:
        yield
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        raise Unavailable(
            "REDIS_UNAVAILABLE",
            "the task store (Redis) is unreachable; retry shortly",
            retry_after=1.0,
        ) from exc


def redis_boundary(
    fn: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """`redis_errors()` around a whole coroutine method."""

    @functools.wraps(fn)
    async def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with redis_errors():
            return await fn(*args, **kwargs)

    return wrapper


def as_text(value: bytes | str) -> str:
    """A Redis reply value as text (clients may decode replies or not)."""
    return value.decode() if isinstance(value, bytes) else value
