"""The dispatcher: hands queued tasks to connected workers, keeps leases honest.

One `Dispatcher` per Task Manager replica. It knows the worker sessions whose
streams this replica serves (`WorkerSession`: credits, held tasks, an outbox
the gRPC stream drains), and runs three loops:

- assign: woken by a QUEUE_WAKE message (sent by the script that queued the
  task), by a credit grant or a new session, or at the latest every
  `poll_interval` while some worker has room (never while none has). It reads
  the head of QUEUE_READY, picks the least loaded worker with room for each
  task, spends a credit, and claims the task with a guarded transition; a
  conflict means another replica took it, and the credit comes back.
- maintenance (every `maintenance_interval`, on every replica at once —
  guards make that safe): promotes QUEUE_DELAYED tasks whose backoff ended,
  and reclaims lapsed leases (PENDING with attempt + 1 after a backoff,
  FAILED past max_attempts, CANCELLED if a cancel was pending). This is how a
  task leased by a worker — or through a replica — that died comes back.
- notices: the pub/sub channels; a DISPATCH_CANCEL message for a task held
  by one of this replica's workers becomes a Cancel on its stream.

Leases belong to the worker, not to the stream: a worker that reconnects
(e.g. after this replica restarted) keeps renewing and reporting on its
leases through whichever replica it reaches. Every worker report is fenced:
it changes the task only if the task is still RUNNING under that lease id
and worker id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.common.errors import Aborted, KbmeshError, Unavailable
from services.common.ids import new_id
from services.task_manager.domain import dispatch
from services.task_manager.domain.dispatch import (
    DispatchPolicy,
    Notice,
    Outcome,
    Renewal,
    WorkerLoad,
)
from services.task_manager.domain.model import Stage, Task, TaskError, TaskResult, TaskState

log = logging.getLogger(__name__)

# Optimistic transitions re-read and retry this often before giving up on a report.
_MAX_CONFLICTS = 5
# Lapsed leases and due retries handled per maintenance round and replica.
_RECLAIM_BATCH = 200
_PROMOTE_BATCH = 1000


def now_ms() -> int:
    return int(time.time() * 1000)


class Written(Protocol):
    """What a guarded write did: "ok", or "conflict" with the current record."""

    @property
    def status(self) -> str: ...

    @property
    def task(self) -> Task: ...


class DispatchQueue(Protocol):
    """What the dispatcher needs from the store (adapters/redis_dispatch.py)."""

    async def get(self, task_id: str) -> Task | None: ...

    async def ready(self, limit: int) -> list[Task]: ...

    async def claim(
        self, task: Task, worker_id: str, lease_id: str, now_ms: int, policy: DispatchPolicy
    ) -> Task | None: ...

    async def apply(
        self, task: Task, outcome: Outcome, guard: Sequence[str], now_ms: int
    ) -> Written: ...

    async def progress(self, task: Task, changes: dict[str, object], now_ms: int) -> Written: ...

    async def renew(
        self, worker_id: str, leases: Sequence[tuple[str, str]], deadline_ms: int
    ) -> list[Renewal]: ...

    async def promote_due(self, now_ms: int, limit: int) -> int: ...

    async def lapsed(self, now_ms: int, limit: int) -> list[Task]: ...


# --- what a session's stream sends -------------------------------------------------------------


@dataclass(frozen=True)
class Assign:
    """Send the worker this task; `task` is the record as leased (lease id, deadline)."""

    task: Task


@dataclass(frozen=True)
class CancelOrder:
    task_id: str
    lease_id: str
    reason: str


@dataclass(frozen=True)
class DrainOrder:
    reason: str
    deadline_ms: int


@dataclass(frozen=True)
class Close:
    """The session is over; `error` (if any) ends the stream with its status."""

    error: KbmeshError | None = None


Outbound = Assign | CancelOrder | DrainOrder | Close


@dataclass(eq=False)
class WorkerSession:
    """One worker stream on this replica."""

    session_id: str
    worker_id: str
    version: str
    content_types: frozenset[str]
    load: WorkerLoad
    outbox: asyncio.Queue[Outbound] = field(default_factory=asyncio.Queue)
    # Task id -> the record as this session last wrote it: the "as read" of the next
    # guarded write, saving a read (a stale one just conflicts and is re-read).
    records: dict[str, Task] = field(default_factory=dict)
    # Task id -> lease id of every task the worker holds, including those it held
    # before it reconnected (learned from its heartbeats).
    leases: dict[str, str] = field(default_factory=dict)
    # Leases a Cancel was sent for (sent once each).
    cancels_sent: set[str] = field(default_factory=set)
    closed: bool = False
    last_seen_ms: int = 0

    def accepts(self, content_type: str) -> bool:
        if not self.content_types:
            return True
        kind = content_type.split(";", 1)[0].strip().lower()
        return kind in self.content_types or f"{kind.split('/', 1)[0]}/*" in self.content_types

    def send(self, message: Outbound) -> None:
        if not self.closed:
            self.outbox.put_nowait(message)

    def forget(self, task_id: str) -> None:
        self.load.release(task_id)
        self.records.pop(task_id, None)
        self.leases.pop(task_id, None)

    def log_extra(self, **more: object) -> dict[str, object]:
        return {"session_id": self.session_id, "worker_id": self.worker_id, **more}


class Dispatcher:
    """See the module docstring. `start()` runs the loops, `close()` stops them."""

    def __init__(
        self,
        queue: DispatchQueue,
        policy: DispatchPolicy,
        *,
        notices: Callable[[], AsyncIterator[Notice]] | None = None,
        claim_batch: int = 64,
        poll_interval: float = 1.0,
        maintenance_interval: float = 1.0,
        random_source: Callable[[], float] = random.random,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self._queue = queue
        self.policy = policy
        self._notices = notices
        self._claim_batch = claim_batch
        self._poll_interval = poll_interval
        self._maintenance_interval = maintenance_interval
        self._random = random_source
        self._clock = clock
        self._sessions: dict[str, WorkerSession] = {}
        self._wake = asyncio.Event()
        self._draining = False
        self._drain_deadline_ms = 0
        self._loops: list[asyncio.Task[None]] = []

    # --- lifecycle ---

    def start(self) -> None:
        loops = [self._assign_loop(), self._maintenance_loop()]
        if self._notices is not None:
            loops.append(self._notice_loop())
        self._loops = [asyncio.create_task(loop) for loop in loops]

    async def close(self) -> None:
        """Stops the loops and closes every session (leases stay in Redis)."""
        self._draining = True
        for loop in self._loops:
            loop.cancel()
        for loop in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await loop
        self._loops = []
        for session in list(self._sessions.values()):
            session.send(Close())
            self.close_session(session)

    async def drain(self, grace_seconds: float) -> None:
        """Stops assigning and tells every worker to drain (Task Manager shutdown).

        Workers keep their leases: they finish, and report through another replica
        (or this one after a restart); any replica reclaims what nobody renews.
        """
        self._draining = True
        self._drain_deadline_ms = self._clock() + int(grace_seconds * 1000)
        log.info("dispatch draining", extra={"sessions": len(self._sessions)})
        for session in self._sessions.values():
            session.send(DrainOrder("task manager shutting down", self._drain_deadline_ms))

    @property
    def draining(self) -> bool:
        return self._draining

    # --- sessions ---

    def open_session(
        self,
        worker_id: str,
        max_concurrency: int,
        *,
        version: str = "",
        content_types: Sequence[str] = (),
    ) -> WorkerSession:
        for old in [s for s in self._sessions.values() if s.worker_id == worker_id]:
            # The worker reconnected: its earlier stream is dead, or soon will be. Nothing
            # more may be assigned to it (it would be lost until its lease lapsed).
            self._end(old, Aborted("WORKER_SESSION_REPLACED", "a newer stream of this worker"))
        session = WorkerSession(
            session_id=new_id(),
            worker_id=worker_id,
            version=version,
            content_types=frozenset(c.strip().lower() for c in content_types if c.strip()),
            load=WorkerLoad(worker_id=worker_id, max_concurrency=max_concurrency),
            last_seen_ms=self._clock(),
        )
        self._sessions[session.session_id] = session
        log.info(
            "worker session started",
            extra=session.log_extra(max_concurrency=max_concurrency, version=version),
        )
        if self._draining:
            session.send(DrainOrder("task manager shutting down", self._drain_deadline_ms))
        return session

    def _end(self, session: WorkerSession, error: KbmeshError) -> None:
        """Ends a session's stream with `error` (it is then closed by its handler)."""
        log.warning("ending worker session", extra=session.log_extra(reason=error.reason))
        session.send(Close(error))
        self.close_session(session)

    def seen(self, session: WorkerSession) -> None:
        """The worker sent something: its stream is alive."""
        session.last_seen_ms = self._clock()

    def close_session(self, session: WorkerSession) -> None:
        if session.closed:
            return
        session.closed = True
        self._sessions.pop(session.session_id, None)
        # Its leases stay: the worker may still be working and reconnect elsewhere;
        # if not, they lapse and any replica reclaims them.
        log.info("worker session ended", extra=session.log_extra(held=sorted(session.load.held)))

    def grant(self, session: WorkerSession, credits: int) -> None:
        session.load.grant(credits)
        self._wake.set()

    def worker_draining(self, session: WorkerSession, reason: str) -> None:
        """The worker takes no more work: void its credits, and answer with a Drain
        (which reaches it after any assignment already sent)."""
        session.load.stop()
        log.info("worker draining", extra=session.log_extra(reason=reason))
        session.send(DrainOrder("worker draining", 0))

    # --- assigning ---

    async def _assign_loop(self) -> None:
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_interval)
            self._wake.clear()
            if self._draining:
                continue
            try:
                while await self._assign_round():
                    pass
                failures = 0
            except KbmeshError as exc:
                failures += 1
                log.warning("dispatch round failed", extra={"reason": exc.reason})
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))
            except Exception:
                failures += 1
                log.exception("dispatch round failed unexpectedly")
                await asyncio.sleep(min(2.0, 0.05 * 2**failures))

    def _with_room(self) -> list[WorkerSession]:
        return [s for s in self._sessions.values() if not s.closed and s.load.room > 0]

    async def _assign_round(self) -> bool:
        """Claims what the queue head and the workers' room allow; True if another
        round may find more."""
        if self._draining:
            return False
        sessions = self._with_room()
        room = sum(s.load.room for s in sessions)
        if room == 0:
            return False
        want = min(room, self._claim_batch)
        candidates = await self._queue.ready(want)
        if not candidates:
            return False
        now = self._clock()
        picks: list[tuple[WorkerSession, Task, str]] = []
        for task in candidates:
            session = self._pick(task)
            if session is None:
                continue
            lease_id = dispatch.new_lease_id(task.id)
            session.load.reserve(task.id)
            picks.append((session, task, lease_id))
        if not picks:
            return False
        results = await asyncio.gather(
            *(self._claim(s, t, lease, now) for s, t, lease in picks), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return len(candidates) == want

    def _pick(self, task: Task) -> WorkerSession | None:
        by_load = {
            id(s.load): s
            for s in self._sessions.values()
            if not s.closed and s.accepts(task.content_type)
        }
        chosen = dispatch.pick_worker(s.load for s in by_load.values())
        return None if chosen is None else by_load[id(chosen)]

    async def _claim(self, session: WorkerSession, task: Task, lease_id: str, now: int) -> None:
        try:
            claimed = await self._queue.claim(task, session.worker_id, lease_id, now, self.policy)
        except BaseException:
            session.load.unreserve(task.id)
            raise
        if claimed is None:
            session.load.unreserve(task.id)  # another replica took it
            return
        if session.closed:
            # The stream went away while we claimed: give the task straight back.
            log.info("session gone before assignment; handing back", extra={"task_id": task.id})
            await self._queue.apply(
                claimed, dispatch.handed_back(claimed, now), dispatch.LEASE_GUARD, now
            )
            return
        session.records[task.id] = claimed
        session.leases[task.id] = lease_id
        session.send(Assign(claimed))
        log.debug(
            "task assigned",
            extra=session.log_extra(task_id=task.id, lease_id=lease_id, attempt=claimed.attempt),
        )

    # --- worker reports ---

    async def _held(self, session: WorkerSession, task_id: str, fresh: bool) -> Task | None:
        cached = None if fresh else session.records.get(task_id)
        return cached if cached is not None else await self._queue.get(task_id)

    async def _conclude(
        self,
        session: WorkerSession,
        task_id: str,
        lease_id: str,
        decide: Callable[[Task, int], Outcome],
        *,
        what: str,
        fresh: bool,
    ) -> bool:
        """Applies the outcome `decide` gives if `session` still holds the lease."""
        task = await self._held(session, task_id, fresh)
        session.forget(task_id)
        session.cancels_sent.discard(lease_id)
        for _ in range(_MAX_CONFLICTS):
            if task is None or not dispatch.holds(task, session.worker_id, lease_id):
                log.info(
                    f"stale {what} ignored",
                    extra=session.log_extra(task_id=task_id, lease_id=lease_id),
                )
                return False
            now = self._clock()
            outcome = decide(task, now)
            done = await self._queue.apply(task, outcome, dispatch.LEASE_GUARD, now)
            if done.status == "ok":
                log.log(
                    logging.DEBUG if outcome.state is TaskState.SUCCEEDED else logging.INFO,
                    f"task {what}",
                    extra=session.log_extra(
                        task_id=task_id,
                        lease_id=lease_id,
                        attempt=task.attempt,
                        state=outcome.state.value,
                    ),
                )
                return True
            task = done.task
        log.warning(f"{what} kept conflicting", extra=session.log_extra(task_id=task_id))
        return False

    async def completed(
        self, session: WorkerSession, task_id: str, lease_id: str, result: TaskResult
    ) -> bool:
        return await self._conclude(
            session,
            task_id,
            lease_id,
            lambda task, now: dispatch.succeeded(result, now),
            what="completed",
            fresh=False,
        )

    async def failed(
        self, session: WorkerSession, task_id: str, lease_id: str, error: TaskError
    ) -> bool:
        return await self._conclude(
            session,
            task_id,
            lease_id,
            lambda task, now: dispatch.failed(task, error, now, self.policy, self._random),
            what="failed",
            fresh=True,  # the decision depends on cancel_requested
        )

    async def cancel_acknowledged(
        self, session: WorkerSession, task_id: str, lease_id: str
    ) -> bool:
        return await self._conclude(
            session,
            task_id,
            lease_id,
            dispatch.cancel_acknowledged,
            what="cancel acknowledged",
            fresh=True,
        )

    async def progress(
        self,
        session: WorkerSession,
        task_id: str,
        lease_id: str,
        stage: Stage,
        fraction: float,
        message: str,
    ) -> bool:
        task = await self._held(session, task_id, fresh=False)
        for _ in range(_MAX_CONFLICTS):
            if task is None or not dispatch.holds(task, session.worker_id, lease_id):
                self._lost(session, task_id, lease_id)
                return False
            now = self._clock()
            changes = dispatch.progress(stage, fraction, message, now, self.policy)
            done = await self._queue.progress(task, dict(changes), now)
            if done.status == "ok":
                session.records[task_id] = done.task
                session.leases[task_id] = lease_id
                if done.task.cancel_requested:
                    self._order_cancel(session, task_id, lease_id, "cancel requested")
                return True
            task = done.task
        return False

    async def heartbeat(self, session: WorkerSession, lease_ids: Sequence[str]) -> None:
        leases = []
        for lease_id in dict.fromkeys(lease_ids):
            task_id = dispatch.lease_task_id(lease_id)
            if task_id:
                leases.append((task_id, lease_id))
        if not leases:
            return
        renewals = await self._queue.renew(
            session.worker_id, leases, self._clock() + self.policy.lease_ms
        )
        for (task_id, lease_id), renewal in zip(leases, renewals, strict=True):
            if renewal is Renewal.LOST:
                self._lost(session, task_id, lease_id)
                continue
            if task_id not in session.load.held:
                session.load.adopt(task_id)  # held since before a reconnect
            session.leases[task_id] = lease_id
            if renewal is Renewal.CANCEL_REQUESTED:
                self._order_cancel(session, task_id, lease_id, "cancel requested")

    def _lost(self, session: WorkerSession, task_id: str, lease_id: str) -> None:
        """The worker reports on a lease it no longer holds: tell it to stop."""
        session.forget(task_id)
        self._order_cancel(session, task_id, lease_id, "lease lost")

    def _order_cancel(
        self, session: WorkerSession, task_id: str, lease_id: str, reason: str
    ) -> None:
        if lease_id in session.cancels_sent:
            return
        session.cancels_sent.add(lease_id)
        session.send(CancelOrder(task_id, lease_id, reason))
        log.info(
            "cancel sent to worker",
            extra=session.log_extra(task_id=task_id, lease_id=lease_id, reason=reason),
        )

    # --- notices ---

    async def _notice_loop(self) -> None:
        assert self._notices is not None
        while True:
            try:
                async for notice in self._notices():
                    if notice.kind in ("wake", "resubscribed"):
                        self._wake.set()
                    elif notice.kind == "cancel":
                        self._deliver_cancel(notice.task_id)
            except Exception:
                # Without notices dispatch still works (polling): keep trying.
                log.exception("dispatch notices failed; resubscribing")
                await asyncio.sleep(1.0)

    def _deliver_cancel(self, task_id: str) -> None:
        for session in list(self._sessions.values()):
            lease_id = session.leases.get(task_id)
            if lease_id and task_id in session.load.held:
                self._order_cancel(session, task_id, lease_id, "cancel requested")

    # --- maintenance ---

    async def _maintenance_loop(self) -> None:
        jitter = itertools.cycle((0.8, 1.1, 0.9, 1.2, 1.0))
        while True:
            await asyncio.sleep(self._maintenance_interval * next(jitter))
            try:
                await self.maintain()
            except KbmeshError as exc:
                log.warning("dispatch maintenance failed", extra={"reason": exc.reason})
            except Exception:
                log.exception("dispatch maintenance failed unexpectedly")

    async def maintain(self) -> None:
        """One round: end silent sessions, promote due retries, reclaim lapsed leases."""
        now = self._clock()
        for session in list(self._sessions.values()):
            # Heartbeats come every heartbeat_ms, even from an idle worker: a stream
            # silent for a whole lease is dead (assignments sent to it would be lost).
            if now - session.last_seen_ms > self.policy.lease_ms:
                self._end(session, Unavailable("WORKER_SILENT", "no heartbeat for a whole lease"))
        if await self._queue.promote_due(now, _PROMOTE_BATCH):
            self._wake.set()
        for task in await self._queue.lapsed(now, _RECLAIM_BATCH):
            await self._expire(task)

    async def _expire(self, task: Task) -> None:
        current: Task | None = task
        for _ in range(_MAX_CONFLICTS):
            now = self._clock()
            if current is None or not dispatch.lease_lapsed(current, now):
                return  # renewed, or finished, since it was read
            outcome = dispatch.lease_expired(current, now, self.policy, self._random)
            done = await self._queue.apply(current, outcome, dispatch.EXPIRY_GUARD, now)
            if done.status == "ok":
                log.warning(
                    "lease expired",
                    extra={
                        "task_id": current.id,
                        "worker_id": current.worker_id,
                        "lease_id": current.lease_id,
                        "attempt": current.attempt,
                        "state": outcome.state.value,
                    },
                )
                for session in list(self._sessions.values()):
                    if session.leases.get(current.id) == current.lease_id:
                        self._lost(session, current.id, current.lease_id)
                if outcome.queue == "ready":
                    self._wake.set()
                return
            current = done.task
