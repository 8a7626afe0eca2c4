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
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# A child that ran this long before dying is restarted after the shortest backoff.
_STABLE_SECONDS = 30.0


@dataclass(frozen=True)
class Priority:
    """What `lower_priority` did, for the log once logging is configured."""

    nice: int  # this process's niceness now
    session_nice: int | None  # its session's autogroup niceness, if it set one
    problems: tuple[str, ...] = ()


_AUTOGROUP = Path("/proc/self/autogroup")
_AUTOGROUP_ENABLED = Path("/proc/sys/kernel/sched_autogroup_enabled")


def lower_priority(nice: int) -> Priority:
    """Adds `nice` to this process's niceness, and gives its session the same
    niceness where the kernel shares CPUs between sessions first.

    Linux niceness is per thread and inherited by the threads a thread
    creates: call it first thing, before any thread pool (ONNX, LanceDB, the
    worker's executor) exists.

    With autogroup on (`/proc/sys/kernel/sched_autogroup_enabled`, the
    default of many kernels), the scheduler first shares the CPUs equally
    between sessions and only then between the processes of a session by
    their niceness: a nice-19 worker that leads a session of its own still
    gets as much CPU as the Task Manager's or SeaweedFS's session, and
    latency-sensitive services on the same host wait behind its embedding
    (bench/upload.py measured it). So a worker that leads its session (the
    Knowledge Service starts its child that way, as devstack and service
    managers do) sets its session's autogroup niceness too. A worker that
    does not (started from a terminal, in the shell's session) leaves the
    session alone: lowering it would lower the shell and everything else in
    it.
    """
    if nice <= 0:
        return Priority(os.getpriority(os.PRIO_PROCESS, 0), None)
    problems = []
    try:
        os.nice(nice)
    except OSError as exc:
        problems.append(f"could not lower the worker's CPU priority: {exc}")
    session_nice, problem = lower_session(nice)
    if problem:
        problems.append(problem)
    return Priority(os.getpriority(os.PRIO_PROCESS, 0), session_nice, tuple(problems))


def autogroup_enabled() -> bool:
    """Whether the kernel shares CPUs between sessions first (autogroup)."""
    try:
        return _AUTOGROUP_ENABLED.read_text().strip() == "1"
    except OSError:  # a kernel without autogroup
        return False


# The kernel takes one autogroup change per 100 ms host-wide from an
# unprivileged process (EAGAIN otherwise): retry for up to 5 s.
_AUTOGROUP_TRIES = 50
_AUTOGROUP_RETRY_SECONDS = 0.1


def lower_session(nice: int) -> tuple[int | None, str]:
    """Sets the autogroup niceness of the session this process leads (absolute,
    0-19). Returns the niceness read back (None: not set, because autogroup
    is off or this process does not lead its session) and a problem to log."""
    if os.getsid(0) != os.getpid() or not autogroup_enabled():
        return None, ""
    for attempt in range(_AUTOGROUP_TRIES):
        try:
            _AUTOGROUP.write_text(f"{nice}\n")
            break
        except BlockingIOError:
            if attempt == _AUTOGROUP_TRIES - 1:
                return None, "could not lower the worker session's CPU priority: busy"
            time.sleep(_AUTOGROUP_RETRY_SECONDS)
        except OSError as exc:
            return None, f"could not lower the worker session's CPU priority: {exc}"
    try:
        now = autogroup_niceness(_AUTOGROUP.read_text())
    except (OSError, ValueError) as exc:
        return None, f"could not read the worker session's CPU priority back: {exc!r}"
    if now is None:
        return None, "the worker's session has no CPU priority of its own after all"
    return now, ""


def autogroup_niceness(text: str) -> int | None:
    """The niceness in a /proc/<pid>/autogroup: "/autogroup-123 nice 19" -> 19.
    The file is empty for a process in the session the host booted with (the
    root group, which has no autogroup niceness): None."""
    if not text.strip():
        return None
    return int(text.split()[-1])


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
        own_session: bool = False,
    ) -> None:
        self._argv = [*(argv or (sys.executable, "-m", "services.knowledge.worker")), *extra_args]
        self._own_session = own_session
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
            # `own_session`: the child lowers its session's CPU priority
            # (`lower_priority`) without lowering this process's.
            self._process = await asyncio.create_subprocess_exec(
                *self._argv, "--parent-pid", str(os.getpid()), start_new_session=self._own_session
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
