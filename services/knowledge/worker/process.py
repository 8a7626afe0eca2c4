"""The Knowledge Service's worker in a child process (`worker.isolation=process`).

Why a process: parsing and chunking are Python (they hold the GIL) and
embedding takes whole cores; run in the service's process they slow every
search down (bench/search.py measured it). In a process of its own, at a lower
CPU priority (`worker.nice`), the worker uses every idle cycle and yields the
cores to the API when searches come in.

The child is `python -m services.knowledge.worker --parent-pid <pid>` with the
service's environment (its settings are the same `KBMESH_KNOWLEDGE_…`
variables). The service restarts it with backoff if it dies, and on SIGTERM
sends it SIGTERM (the worker drains: finishes or hands back its tasks) and
waits for it. If the service itself is killed, the child notices its parent is
gone within a second and drains too (`watch_parent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

log = logging.getLogger(__name__)

# A child that ran this long before dying is restarted after the shortest backoff.
_STABLE_SECONDS = 30.0


def lower_priority(nice: int) -> None:
    """Adds `nice` to this process's niceness. Linux niceness is per thread and
    inherited by the threads a thread creates: call it first thing, before any
    thread pool (ONNX, LanceDB, the worker's executor) exists."""
    if nice <= 0:
        return
    try:
        os.nice(nice)
    except OSError as exc:
        log.warning("could not lower the worker's CPU priority: %s", exc)


async def watch_parent(parent_pid: int, stop: asyncio.Event, every: float = 1.0) -> None:
    """Sets `stop` once the process that started this one is gone (we are
    re-parented, so getppid() changes)."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("the Knowledge Service that started this worker is gone: draining")
            stop.set()
            return
        await asyncio.sleep(every)


class WorkerProcess:
    def __init__(
        self,
        *,
        shutdown_grace_seconds: float,
        argv: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self._argv = [*(argv or (sys.executable, "-m", "services.knowledge.worker")), *extra_args]
        self._grace = shutdown_grace_seconds
        self._process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise())

    async def _supervise(self) -> None:
        backoff = 0.5
        while not self._stopping:
            started = time.monotonic()
            self._process = await asyncio.create_subprocess_exec(
                *self._argv, "--parent-pid", str(os.getpid())
            )
            log.info("worker process started", extra={"pid": self._process.pid})
            code = await self._process.wait()
            if self._stopping:
                return
            if time.monotonic() - started > _STABLE_SECONDS:
                backoff = 0.5
            log.warning(
                "worker process exited; restarting",
                extra={"exit_code": code, "restart_in_seconds": backoff},
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0)

    async def drain(self, grace: float | None = None) -> None:
        """SIGTERM to the child, then wait for its drain (the worker's own grace
        plus a margin) before killing it. Idempotent."""
        self._stopping = True
        process = self._process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), (grace or self._grace) + 5.0)
            except TimeoutError:
                log.warning("worker process did not stop in time: killed")
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        supervisor = self._supervisor
        if supervisor is not None and not supervisor.done():
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor

    async def close(self) -> None:
        await self.drain()
