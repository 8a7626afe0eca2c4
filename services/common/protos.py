"""Small conversions every servicer needs between protos and plain values.

Domain code names enum values without their proto prefix ("SENTENCE",
"RUNNING", "" for unspecified); protos carry them prefixed
(`STRATEGY_SENTENCE`, `STATE_RUNNING`, `STATE_UNSPECIFIED`). Times are
milliseconds since the epoch in the domain, Timestamps on the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from google.protobuf.timestamp_pb2 import Timestamp

T = TypeVar("T")
M = TypeVar("M")


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """The domain name of a proto enum value; "" for the unspecified value."""
    name = str(enum.Name(value)).removeprefix(prefix)
    return "" if name == "UNSPECIFIED" else name


def enum_value(enum: Any, name: str, prefix: str) -> Any:
    """The proto enum value of a domain name ("" means unspecified); typed as the
    enum's own ValueType by the caller's field."""
    return enum.Value(f"{prefix}{name or 'UNSPECIFIED'}")


def timestamp(ms: int) -> Timestamp | None:
    """A Timestamp for `ms`, or None (field left unset) when the time is not known."""
    if not ms:
        return None
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


async def converted(items: Sequence[T], convert: Callable[[T], M], batch: int = 100) -> list[M]:
    """`[convert(item) for item in items]`, letting the event loop run other
    calls after each `batch` (a thousand tasks take ~10 ms to convert)."""
    out: list[M] = []
    for start in range(0, len(items), batch):
        if start:
            await asyncio.sleep(0)
        out += [convert(item) for item in items[start : start + batch]]
    return out
