"""Small conversions every servicer needs between protos and plain values.

Domain code names enum values without their proto prefix ("SENTENCE",
"RUNNING", "" for unspecified); protos carry them prefixed
(`STRATEGY_SENTENCE`, `STATE_RUNNING`, `STATE_UNSPECIFIED`). Times are
milliseconds since the epoch in the domain, Timestamps on the wire.
"""

from __future__ import annotations

from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp


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
