"""services.common.protos: conversions every servicer shares."""

from __future__ import annotations

import asyncio

from services.common.protos import converted


async def test_converted_keeps_order_and_lets_other_calls_run_between_batches() -> None:
    done = 0

    def convert(n: int) -> str:
        nonlocal done
        done += 1
        return str(n)

    seen: list[int] = []
    running = asyncio.ensure_future(converted(range(250), convert, batch=100))
    while not running.done():
        seen.append(done)
        await asyncio.sleep(0)
    assert await running == [str(n) for n in range(250)]
    # Other code ran after the first and after the second batch.
    assert {100, 200} <= set(seen)
    assert await converted([], convert) == []
