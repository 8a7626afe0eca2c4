"""Identifiers: time-ordered, URL-safe, 26 characters (ULID layout).

48 bits of milliseconds then 80 random bits, in Crockford base32: ids sort by
creation time as strings, which makes "newest first" listings and storage
keys cheap, and they carry nothing a caller chose (no file names in keys).
"""

from __future__ import annotations

import secrets
import time

_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def new_id(now_ms: int | None = None) -> str:
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    value = (ms << 80) | secrets.randbits(80)
    chars = []
    for _ in range(26):
        chars.append(_ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars)).lower()


def is_id(text: str) -> bool:
    return len(text) == 26 and all(c in _ALPHABET for c in text.upper())
