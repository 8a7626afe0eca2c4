"""Dispatch rules (domain) and the dispatcher's bookkeeping, with an in-memory queue."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pytest

from services.common.errors import Unauthenticated
from services.task_manager import dispatch as dispatcher_module
from services.task_manager.dispatch import Assign, CancelOrder, Close, Dispatcher, DrainOrder
from services.task_manager.domain import dispatch
from services.task_manager.domain.dispatch import (
    DispatchPolicy,
    Outcome,
    Renewal,
    WorkerLoad,
    backoff_ms,
    lease_task_id,
    new_lease_id,
    pick_worker,
)
from services.task_manager.domain.model import Stage, Task, TaskError, TaskResult, TaskState
from services.task_manager.domain.worker_auth import WorkerTokens, token_hash

POLICY = DispatchPolicy(lease_ms=3000, heartbeat_ms=500, backoff_base_ms=200, backoff_cap_ms=1000)
NOW = 1_800_000_000_000


def task(task_id: str = "t1", **fields: Any) -> Task:
    base = Task(
        id=task_id,
        knowledge_base_id="kb",
        document_id=f"d-{task_id}",
        filename="a.txt",
        content_type="text/plain",
        size_bytes=3,
        sha256="0" * 64,
        object_key=f"kb/{task_id}",
        state=TaskState.PENDING,
        create_time_ms=NOW,
        update_time_ms=NOW,
        max_attempts=3,
    )
    return replace(base, **fields)


def running(task_id: str = "t1", **fields: Any) -> Task:
    values: dict[str, Any] = {
        "state": TaskState.RUNNING,
        "worker_id": "w1",
        "lease_id": f"{task_id}.aaaa",
        "lease_deadline_ms": NOW + 3000,
        **fields,
    }
    return task(task_id, **values)


RETRYABLE = TaskError("UNAVAILABLE", "TIMEOUT", "timed out", retryable=True)
FATAL = TaskError("FAILED_PRECONDITION", "DOCUMENT_ENCRYPTED", "encrypted", retryable=False)


# --- backoff -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "low", "high"), [(1, 100, 200), (2, 200, 400), (3, 400, 800), (4, 500, 1000)]
)
def test_backoff_doubles_with_jitter_over_the_upper_half_and_is_capped(
    attempt: int, low: int, high: int
) -> None:
    assert backoff_ms(attempt, POLICY, lambda: 0.0) == low
    assert backoff_ms(attempt, POLICY, lambda: 0.999999) == high - 1
    assert low <= backoff_ms(attempt, POLICY, lambda: 0.5) <= high


def test_backoff_survives_huge_attempt_numbers() -> None:
    assert backoff_ms(10_000, POLICY, lambda: 1.0) == POLICY.backoff_cap_ms


def test_policy_needs_heartbeats_well_within_the_lease() -> None:
    with pytest.raises(ValueError, match="half the lease"):
        DispatchPolicy(lease_ms=1000, heartbeat_ms=600)
    with pytest.raises(ValueError, match="base <= cap"):
        DispatchPolicy(backoff_base_ms=10, backoff_cap_ms=5)


# --- leases ------------------------------------------------------------------------------------


def test_lease_ids_name_their_task_and_are_unique() -> None:
    a, b = new_lease_id("t1"), new_lease_id("t1")
    assert a != b
    assert lease_task_id(a) == "t1"
    for foreign in ("", "t1", ".abc", "t1.", "no-separator"):
        assert lease_task_id(foreign) == ""


def test_only_the_current_lease_holder_holds_the_task() -> None:
    held = running()
    assert dispatch.holds(held, "w1", "t1.aaaa")
    assert not dispatch.holds(held, "w2", "t1.aaaa")  # another worker
    assert not dispatch.holds(held, "w1", "t1.bbbb")  # a lease from an earlier attempt
    assert not dispatch.holds(held, "w1", "")
    assert not dispatch.holds(replace(held, state=TaskState.SUCCEEDED), "w1", "t1.aaaa")


def test_a_lease_lapses_at_its_deadline() -> None:
    held = running()
    assert not dispatch.lease_lapsed(held, NOW + 2999)
    assert dispatch.lease_lapsed(held, NOW + 3000)
    assert not dispatch.lease_lapsed(task(), NOW + 10_000)  # not running: nothing to lapse


# --- credits -----------------------------------------------------------------------------------


def test_room_is_credits_but_never_past_the_concurrency() -> None:
    load = WorkerLoad("w", max_concurrency=2)
    assert load.room == 0
    load.grant(5)
    assert load.room == 2
    load.reserve("a")
    load.reserve("b")
    assert (load.room, load.credits) == (0, 3)
    with pytest.raises(ValueError, match="no room"):
        load.reserve("c")
    load.release("a")
    assert load.room == 1


def test_a_failed_claim_returns_the_credit() -> None:
    load = WorkerLoad("w", max_concurrency=4, credits=1)
    load.reserve("a")
    assert load.room == 0
    load.unreserve("a")
    assert (load.room, load.held) == (1, set())


def test_credits_are_capped_and_void_once_the_worker_drains() -> None:
    load = WorkerLoad("w", max_concurrency=2000)
    load.grant(dispatch.MAX_CREDITS)
    load.grant(10)
    assert load.credits == dispatch.MAX_CREDITS
    load.stop()
    load.grant(3)
    assert (load.credits, load.room) == (0, 0)


def test_the_least_loaded_worker_with_room_is_picked() -> None:
    busy = WorkerLoad("busy", max_concurrency=4, credits=4, held={"a", "b"})
    idle = WorkerLoad("idle", max_concurrency=4, credits=1)
    big = WorkerLoad("big", max_concurrency=16, credits=8, held={"c", "d"})  # 1/8 loaded
    full = WorkerLoad("full", max_concurrency=1, credits=0)
    assert pick_worker([busy, idle, big, full]) is idle
    assert pick_worker([busy, big]) is big
    assert pick_worker([full]) is None
    assert pick_worker([]) is None


# --- outcomes ----------------------------------------------------------------------------------


def test_start_leases_the_task() -> None:
    changes = dispatch.start("w1", "t1.x", NOW, POLICY)
    assert changes["state"] is TaskState.RUNNING
    assert (changes["worker_id"], changes["lease_id"]) == ("w1", "t1.x")
    assert changes["lease_deadline_ms"] == NOW + POLICY.lease_ms
    assert changes["start_time_ms"] == NOW


def test_progress_is_bounded_and_renews_the_lease() -> None:
    changes = dispatch.progress(Stage.PARSING, 1.7, "x" * 900, NOW, POLICY)
    assert (changes["stage"], changes["progress"]) == (Stage.PARSING, 1.0)
    assert len(changes["message"]) == dispatch.MAX_PROGRESS_MESSAGE_CHARS
    assert changes["lease_deadline_ms"] == NOW + POLICY.lease_ms
    assert dispatch.progress(Stage.PARSING, float("nan"), "", NOW, POLICY)["progress"] == 0.0
    assert dispatch.progress(Stage.PARSING, -1, "", NOW, POLICY)["progress"] == 0.0


def test_success_clears_the_lease_and_the_last_error() -> None:
    outcome = dispatch.succeeded(TaskResult(chunk_count=7), NOW)
    assert outcome.state is TaskState.SUCCEEDED
    assert outcome.queue is None
    assert outcome.changes["error"] is None
    assert outcome.changes["result"] == TaskResult(chunk_count=7)
    assert (outcome.changes["lease_id"], outcome.changes["lease_deadline_ms"]) == ("", 0)
    assert outcome.changes["progress"] == 1.0


def test_a_retryable_failure_goes_back_with_backoff_and_one_more_attempt() -> None:
    outcome = dispatch.failed(running(attempt=1), RETRYABLE, NOW, POLICY, lambda: 0.0)
    assert outcome.state is TaskState.PENDING
    assert outcome.queue == "delayed"
    assert outcome.changes["attempt"] == 2
    assert outcome.ready_at_ms == NOW + 100 == outcome.changes["next_attempt_time_ms"]
    assert outcome.changes["error"] == RETRYABLE
    assert (outcome.changes["worker_id"], outcome.changes["lease_id"]) == ("", "")


def test_the_last_attempt_fails_for_good_with_the_last_error() -> None:
    outcome = dispatch.failed(running(attempt=3), RETRYABLE, NOW, POLICY, lambda: 0.0)
    assert outcome.state is TaskState.FAILED
    assert outcome.queue is None
    assert outcome.changes["error"] == RETRYABLE
    assert outcome.changes["end_time_ms"] == NOW


def test_a_failure_that_is_not_retryable_fails_at_once() -> None:
    outcome = dispatch.failed(running(attempt=1), FATAL, NOW, POLICY, lambda: 0.0)
    assert outcome.state is TaskState.FAILED
    assert outcome.changes["error"] == FATAL


def test_a_cancelled_task_is_never_retried() -> None:
    outcome = dispatch.failed(running(cancel_requested=True), RETRYABLE, NOW, POLICY, lambda: 0)
    assert outcome.state is TaskState.CANCELLED
    assert outcome.queue is None


def test_a_shutdown_hand_back_is_ready_at_once_and_keeps_the_attempt() -> None:
    error = TaskError("UNAVAILABLE", dispatch.WORKER_SHUTDOWN, "stopping", retryable=True)
    outcome = dispatch.failed(running(attempt=3), error, NOW, POLICY, lambda: 0.0)
    assert outcome.state is TaskState.PENDING
    assert (outcome.queue, outcome.ready_at_ms) == ("ready", NOW)
    assert outcome.changes["attempt"] == 3


def test_a_lapsed_lease_counts_as_a_retryable_failure() -> None:
    outcome = dispatch.lease_expired(running(attempt=1), NOW, POLICY, lambda: 0.0)
    assert outcome.state is TaskState.PENDING
    assert outcome.changes["attempt"] == 2
    assert outcome.changes["error"].reason == dispatch.LEASE_EXPIRED
    last = dispatch.lease_expired(running(attempt=3), NOW, POLICY, lambda: 0.0)
    assert last.state is TaskState.FAILED
    assert last.changes["error"].reason == dispatch.LEASE_EXPIRED
    cancelled = dispatch.lease_expired(running(cancel_requested=True), NOW, POLICY, lambda: 0)
    assert cancelled.state is TaskState.CANCELLED


def test_a_cancel_ack_cancels_only_if_a_cancel_was_requested() -> None:
    assert dispatch.cancel_acknowledged(running(cancel_requested=True), NOW).state is (
        TaskState.CANCELLED
    )
    back = dispatch.cancel_acknowledged(running(), NOW)
    assert (back.state, back.queue) == (TaskState.PENDING, "ready")


# --- worker tokens -----------------------------------------------------------------------------


def test_tokens_are_checked_against_hashes() -> None:
    tokens = WorkerTokens(["alpha"], [token_hash("beta").upper()])
    assert len(tokens) == 2
    tokens.check("Bearer alpha")
    tokens.check("bearer   beta ")
    for bad in (None, "", "alpha", "Bearer", "Bearer gamma", "Basic alpha", "Bearer alpha x"):
        with pytest.raises(Unauthenticated) as caught:
            tokens.check(bad)
        assert caught.value.reason == "WORKER_UNAUTHENTICATED"
        assert "alpha" not in caught.value.message


def test_no_tokens_configured_lets_no_worker_in() -> None:
    with pytest.raises(Unauthenticated):
        WorkerTokens().check("Bearer anything")


def test_a_malformed_hash_is_a_configuration_error() -> None:
    with pytest.raises(ValueError, match="64 hex"):
        WorkerTokens(hashes=["abc"])


# --- the dispatcher, on an in-memory queue -----------------------------------------------------


@dataclass
class Written:
    status: str
    task: Task


class MemoryQueue:
    """The dispatcher's queue in memory: guards compare fields like the Redis script."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        self.tasks = {t.id: t for t in tasks}
        self.ready_order = [t.id for t in tasks]
        self.taken_elsewhere: set[str] = set()

    async def get(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    async def ready(self, limit: int) -> list[Task]:
        ids = [i for i in self.ready_order if self.tasks[i].state is TaskState.PENDING]
        return [self.tasks[i] for i in ids[:limit]]

    def _write(self, before: Task, changes: dict[str, Any], guard: Sequence[str]) -> Written:
        current = self.tasks[before.id]
        for name in ("state", *guard):
            if getattr(current, name) != getattr(before, name):
                return Written("conflict", current)
        self.tasks[before.id] = replace(current, **changes)
        return Written("ok", self.tasks[before.id])

    async def claim(
        self, task: Task, worker_id: str, lease_id: str, now_ms: int, policy: DispatchPolicy
    ) -> Task | None:
        if task.id in self.taken_elsewhere:  # another replica won the race
            self.tasks[task.id] = replace(task, state=TaskState.RUNNING, worker_id="other")
            return None
        written = self._write(
            task, dispatch.start(worker_id, lease_id, now_ms, policy), dispatch.CLAIM_GUARD
        )
        return written.task if written.status == "ok" else None

    async def apply(
        self, task: Task, outcome: Outcome, guard: Sequence[str], now_ms: int
    ) -> Written:
        return self._write(task, outcome.changes, guard)

    async def progress(self, task: Task, changes: dict[str, object], now_ms: int) -> Written:
        return self._write(task, dict(changes), dispatch.LEASE_GUARD)

    async def renew(
        self, worker_id: str, leases: Sequence[tuple[str, str]], deadline_ms: int
    ) -> list[Renewal]:
        out = []
        for task_id, lease_id in leases:
            t = self.tasks.get(task_id)
            if t is None or not dispatch.holds(t, worker_id, lease_id):
                out.append(Renewal.LOST)
                continue
            self.tasks[task_id] = replace(t, lease_deadline_ms=deadline_ms)
            out.append(Renewal.CANCEL_REQUESTED if t.cancel_requested else Renewal.RENEWED)
        return out

    async def promote_due(self, now_ms: int, limit: int) -> int:
        return 0

    async def lapsed(self, now_ms: int, limit: int) -> list[Task]:
        return [t for t in self.tasks.values() if dispatch.lease_lapsed(t, now_ms)]


def outbox(session: dispatcher_module.WorkerSession) -> list[Any]:
    items = []
    while not session.outbox.empty():
        items.append(session.outbox.get_nowait())
    return items


def assigned(items: list[Any]) -> list[str]:
    return [i.task.id for i in items if isinstance(i, Assign)]


async def assign_all(dispatcher: Dispatcher) -> None:
    while await dispatcher._assign_round():
        pass


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> int:
        return self.now


async def test_assignments_never_exceed_credits_and_go_to_the_least_loaded() -> None:
    queue = MemoryQueue([task(f"t{i}") for i in range(10)])
    d = Dispatcher(queue, POLICY, clock=Clock(), random_source=lambda: 0.0)
    a = d.open_session("wa", 4)
    b = d.open_session("wb", 4)
    d.grant(a, 3)
    d.grant(b, 1)
    await assign_all(d)
    to_a, to_b = assigned(outbox(a)), assigned(outbox(b))
    assert (len(to_a), len(to_b)) == (3, 1)
    assert set(to_a + to_b) == {"t0", "t1", "t2", "t3"}  # queue order
    await assign_all(d)
    assert assigned(outbox(a)) == assigned(outbox(b)) == []
    # b finishes one and grants one more: exactly one more task, to b.
    lease = queue.tasks[to_b[0]].lease_id
    assert await d.completed(b, to_b[0], lease, TaskResult())
    d.grant(b, 1)
    await assign_all(d)
    assert assigned(outbox(a)) == []
    assert len(assigned(outbox(b))) == 1
    assert queue.tasks[to_b[0]].state is TaskState.SUCCEEDED


async def test_a_claim_lost_to_another_replica_returns_the_credit() -> None:
    queue = MemoryQueue([task("t0"), task("t1")])
    queue.taken_elsewhere.add("t0")
    d = Dispatcher(queue, POLICY, clock=Clock())
    session = d.open_session("w", 1)
    d.grant(session, 1)
    await assign_all(d)
    assert assigned(outbox(session)) == ["t1"]
    assert session.load.held == {"t1"}


async def test_stale_reports_change_nothing() -> None:
    queue = MemoryQueue([task("t0")])
    d = Dispatcher(queue, POLICY, clock=Clock())
    session = d.open_session("w1", 1)
    d.grant(session, 1)
    await assign_all(d)
    (assignment,) = outbox(session)
    lease = assignment.task.lease_id
    other = d.open_session("w2", 1)
    assert not await d.completed(other, "t0", lease, TaskResult())  # wrong worker
    assert not await d.completed(session, "t0", "t0.old", TaskResult())  # old lease
    assert queue.tasks["t0"].state is TaskState.RUNNING
    assert await d.failed(session, "t0", lease, RETRYABLE)
    assert (queue.tasks["t0"].state, queue.tasks["t0"].attempt) == (TaskState.PENDING, 2)
    assert not await d.completed(session, "t0", lease, TaskResult())  # too late


async def test_a_lapsed_lease_is_reclaimed_and_its_holder_told_to_stop() -> None:
    queue = MemoryQueue([task("t0")])
    clock = Clock()
    d = Dispatcher(queue, POLICY, clock=clock, random_source=lambda: 0.0)
    session = d.open_session("w1", 1)
    d.grant(session, 1)
    await assign_all(d)
    (assignment,) = outbox(session)
    clock.now += 2000
    d.seen(session)
    await d.heartbeat(session, [assignment.task.lease_id])  # renewed until NOW + 5000
    clock.now += 2500
    await d.maintain()
    assert queue.tasks["t0"].state is TaskState.RUNNING
    clock.now += 600
    d.seen(session)  # the stream is alive, the worker just stopped renewing this lease
    await d.maintain()
    reclaimed = queue.tasks["t0"]
    assert (reclaimed.state, reclaimed.attempt) == (TaskState.PENDING, 2)
    assert reclaimed.error is not None
    assert reclaimed.error.reason == dispatch.LEASE_EXPIRED
    (order,) = outbox(session)
    assert order == CancelOrder("t0", assignment.task.lease_id, "lease lost")
    assert session.load.held == set()


async def test_cancel_requests_reach_the_session_holding_the_task_once() -> None:
    queue = MemoryQueue([task("t0")])
    d = Dispatcher(queue, POLICY, clock=Clock())
    session = d.open_session("w1", 1)
    d.grant(session, 1)
    await assign_all(d)
    (assignment,) = outbox(session)
    lease = assignment.task.lease_id
    queue.tasks["t0"] = replace(queue.tasks["t0"], cancel_requested=True)
    d._deliver_cancel("t0")
    await d.heartbeat(session, [lease])  # the flag again, through the heartbeat
    assert outbox(session) == [CancelOrder("t0", lease, "cancel requested")]
    assert await d.cancel_acknowledged(session, "t0", lease)
    assert queue.tasks["t0"].state is TaskState.CANCELLED


async def test_draining_stops_assignments_and_tells_every_worker() -> None:
    queue = MemoryQueue([task("t0")])
    clock = Clock()
    d = Dispatcher(queue, POLICY, clock=clock)
    session = d.open_session("w1", 1)
    await d.drain(5.0)
    d.grant(session, 1)
    await assign_all(d)
    assert outbox(session) == [DrainOrder("task manager shutting down", NOW + 5000)]
    late = d.open_session("w2", 1)
    assert outbox(late) == [DrainOrder("task manager shutting down", NOW + 5000)]


async def test_a_draining_worker_gets_nothing_more() -> None:
    queue = MemoryQueue([task("t0")])
    d = Dispatcher(queue, POLICY, clock=Clock())
    session = d.open_session("w1", 2)
    d.grant(session, 2)
    d.worker_draining(session, "stopping")
    await assign_all(d)
    assert outbox(session) == [DrainOrder("worker draining", 0)]


def test_outcomes_only_set_task_attributes() -> None:
    names = {f.name for f in dataclasses.fields(Task)}
    outcomes = [
        dispatch.succeeded(TaskResult(), NOW),
        dispatch.failed(running(), RETRYABLE, NOW, POLICY, lambda: 0.0),
        dispatch.failed(running(attempt=3), RETRYABLE, NOW, POLICY, lambda: 0.0),
        dispatch.lease_expired(running(), NOW, POLICY, lambda: 0.0),
        dispatch.cancel_acknowledged(running(cancel_requested=True), NOW),
        dispatch.handed_back(running(), NOW),
    ]
    for outcome in outcomes:
        assert set(outcome.changes) <= names
    assert set(dispatch.start("w", "l", NOW, POLICY)) <= names
    assert set(dispatch.progress(Stage.PARSING, 0.5, "", NOW, POLICY)) <= names


async def test_a_silent_or_replaced_stream_is_ended_and_gets_nothing_more() -> None:
    queue = MemoryQueue([task("t0")])
    clock = Clock()
    d = Dispatcher(queue, POLICY, clock=clock)
    first = d.open_session("w1", 1)
    d.grant(first, 1)
    again = d.open_session("w1", 1)  # the same worker reconnected
    (ended,) = outbox(first)
    assert isinstance(ended, Close)
    assert ended.error is not None
    assert ended.error.reason == "WORKER_SESSION_REPLACED"
    await assign_all(d)
    assert outbox(first) == []
    clock.now += POLICY.lease_ms - 1
    await d.maintain()
    assert outbox(again) == []
    clock.now += 2
    await d.maintain()
    (silent,) = outbox(again)
    assert isinstance(silent, Close)
    assert silent.error is not None
    assert silent.error.reason == "WORKER_SILENT"


def test_encoding_some_fields_matches_encoding_the_whole_task() -> None:
    from services.task_manager.adapters.redis_store import encode_fields, encode_task
    from services.task_manager.domain.model import CallbackAttempt, Chunking

    rich = running(
        progress=1,
        stage=Stage.EMBEDDING,
        cancel_requested=True,
        error=RETRYABLE,
        result=TaskResult(chunk_count=3),
        callback_attempts=(CallbackAttempt(NOW, 500, "boom", False),),
        chunking=Chunking("SENTENCE", 512, 64),
        metadata={"k": "v"},
    )
    whole = encode_task(rich)
    assert encode_fields(rich, list(whole)) == whole
    assert encode_fields(rich, ["state", "lease_id"]) == {
        "state": "RUNNING",
        "lease_id": "t1.aaaa",
    }
