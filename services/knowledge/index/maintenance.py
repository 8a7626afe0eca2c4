"""Background index maintenance: the Knowledge Service runs a pass every
`index.optimize_interval_seconds`, never in a request path.

Why it is needed: each write adds a fragment, and rows written after an index
build are searched unindexed (correct, but slower) until `optimize()` folds
them in; big tables also need their ANN index built once.

Each pass also drops the tables of knowledge bases whose record is gone: a
worker that was already writing when its knowledge base was deleted can
re-create the table after DeleteKnowledgeBase dropped it; this removes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from services.knowledge.index.lance_index import LanceChunkIndex

log = logging.getLogger(__name__)

KnowledgeBaseExists = Callable[[str], Awaitable[bool]]


async def drop_orphans(index: LanceChunkIndex, exists: KnowledgeBaseExists) -> int:
    """Drops tables whose knowledge base no longer exists; returns how many.
    A knowledge base's record is written before any of its chunks, so a
    table without one belongs to a deleted knowledge base."""
    dropped = 0
    for knowledge_base_id in await asyncio.to_thread(index.knowledge_base_ids):
        if not await exists(knowledge_base_id):
            chunks = await index.delete_knowledge_base(knowledge_base_id)
            log.info(
                "dropped the index of a deleted knowledge base",
                extra={"knowledge_base_id": knowledge_base_id, "chunks": chunks},
            )
            dropped += 1
    return dropped


async def run_maintenance(
    index: LanceChunkIndex, interval_seconds: float, exists: KnowledgeBaseExists
) -> None:
    """Runs until cancelled; a failing pass is logged and retried next time."""
    while True:
        await asyncio.sleep(interval_seconds)
        started = time.monotonic()
        try:
            dropped = await drop_orphans(index, exists)
            count = await asyncio.to_thread(index.maintain_all)
        except Exception:
            log.exception("index maintenance pass failed")
            continue
        log.debug(
            "index maintenance pass",
            extra={
                "tables": count,
                "dropped": dropped,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
