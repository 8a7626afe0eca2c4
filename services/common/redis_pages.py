"""Newest-first pagination over Redis sorted sets scored by creation time (AIP-158).

Members are ordered by (score, member) descending. A page token holds the last
(score, member) of a page and the query's scope (its filters), so the next page
continues exactly there while new members arrive (no duplicates, no gaps), and
a token is refused for another query.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis

from services.common.errors import InvalidArgument
from services.common.redis_boundary import as_text

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A page's records are read and decoded this many per Redis round trip.
RECORD_BATCH = 50

T = TypeVar("T")


def in_batches(items: Sequence[T], size: int = RECORD_BATCH) -> Iterator[Sequence[T]]:
    """`items` in consecutive slices of at most `size`.

    A listing reads its page one slice per round trip and decodes each slice
    before asking for the next, so the event loop serves other calls in
    between: a page of a thousand tasks (about 100 ms of reading and decoding
    in Python) no longer holds up every upload and search on the process
    for all of that time, only for one slice's share."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def page_size(requested: int, default: int = DEFAULT_PAGE_SIZE) -> int:
    """0 (or less) means the default; larger than the maximum is clamped."""
    return default if requested <= 0 else min(requested, MAX_PAGE_SIZE)


@dataclass(frozen=True)
class PageCursor:
    scope: str
    score: int
    member: str

    def encode(self) -> str:
        raw = json.dumps({"q": self.scope, "s": self.score, "m": self.member}, sort_keys=True)
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str, scope: str) -> PageCursor:
        bad = InvalidArgument(
            "INVALID_PAGE_TOKEN", "page_token is not a next_page_token of this same query"
        )
        try:
            data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        except (binascii.Error, ValueError):
            raise bad from None
        if not isinstance(data, dict):
            raise bad
        score, member = data.get("s"), data.get("m")
        if data.get("q") != scope or type(score) is not int or not isinstance(member, str):
            raise bad
        return cls(scope, score, member)


def _scored(rows: Any) -> list[tuple[str, int]]:
    return [(as_text(member), int(score)) for member, score in rows]


async def newest_first(
    redis: Redis, key: str, size: int, scope: str, page_token: str
) -> tuple[list[str], str]:
    """One page of members of `key`, newest first, and the next page's token
    ("" on the last page)."""
    cursor = PageCursor.decode(page_token, scope) if page_token else None
    want = size + 1  # one more than the page tells whether another page follows
    if cursor is None:
        scanned = _scored(
            await redis.zrange(
                key, "+inf", "-inf", desc=True, byscore=True, offset=0, num=want, withscores=True
            )
        )
    else:
        # Members of the cursor's own score with a lower member come next, then
        # every member of a lower score.
        async with redis.pipeline(transaction=True) as pipe:
            pipe.zrange(key, cursor.score, cursor.score, desc=True, byscore=True)
            pipe.zrange(
                key,
                f"({cursor.score}",
                "-inf",
                desc=True,
                byscore=True,
                offset=0,
                num=want,
                withscores=True,
            )
            same, older = await pipe.execute()
        scanned = [(m, cursor.score) for m in map(as_text, same) if m < cursor.member][:want]
        scanned += _scored(older)[: want - len(scanned)]
    page = scanned[:size]
    token = ""
    if len(scanned) > size:
        member, score = page[-1]
        token = PageCursor(scope, score, member).encode()
    return [member for member, _ in page], token
