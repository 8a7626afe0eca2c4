"""Sweeps multipart uploads a killed Task Manager left in S3.

Every failure a Task Manager survives aborts its own multipart upload; one
that is killed mid-upload cannot. Each replica periodically aborts multipart
uploads older than `stale_after` (longer than any real upload takes), so no
orphan parts stay in the bucket. Running it on every replica is harmless:
aborting twice is a no-op.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from services.task_manager.adapters.s3_storage import S3ObjectStore

log = logging.getLogger(__name__)
UPLOAD_PREFIX = "kb/"


class MultipartSweeper:
    def __init__(self, objects: S3ObjectStore, stale_after: timedelta, every: timedelta) -> None:
        self._objects = objects
        self._stale_after = stale_after
        self._every = every
        self._runner: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run(), name="multipart-sweeper")

    async def stop(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    async def sweep_once(self) -> int:
        cutoff = datetime.now(UTC) - self._stale_after
        return await self._objects.abort_stale_uploads(UPLOAD_PREFIX, cutoff)

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep_once()
            except Exception:
                log.warning("sweeping stale multipart uploads failed", exc_info=True)
            await asyncio.sleep(self._every.total_seconds())
