"""Dispatch rules: credits, leases, backoff, and what each worker report does to a task.

Pure: no gRPC, no Redis, no clock or randomness of its own (callers pass `now`
and a `random` function), so every rule is unit-tested in tests/unit.

- A worker's *credits* are the assignments it asked for and has not received
  yet; the dispatcher never sends more, and never more than its declared
  concurrency minus what it holds (`WorkerLoad`). Among workers with room the
  least loaded gets the next task (`pick_worker`).
- A *lease* is one assignment of one attempt to one worker: `lease_id` is the
  fencing token every later message must quote, `lease_deadline_ms` when it
  lapses unless renewed. Lease ids start with the task id, so any replica can
  tell which task a heartbeat is about.
- An *outcome* is the change a report (or a lapsed lease) makes to a task:
  the fields to set and which queue, if any, the task goes back to.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

from services.task_manager.domain.model import Stage, Task, TaskError, TaskResult, TaskState

MAX_CREDITS = 1024
MAX_WORKER_ID_CHARS = 128
MAX_PROGRESS_MESSAGE_CHARS = 500
LEASE_SEPARATOR = "."

# Reasons a dispatcher writes into TaskError (docs/errors.md, "Task errors").
LEASE_EXPIRED = "LEASE_EXPIRED"
WORKER_SHUTDOWN = "WORKER_SHUTDOWN"


@dataclass(frozen=True)
class DispatchPolicy:
    """Timing the dispatcher works with (TaskManagerSettings.dispatch), in ms."""

    lease_ms: int = 30_000
    heartbeat_ms: int = 10_000
    backoff_base_ms: int = 1_000
    backoff_cap_ms: int = 300_000

    def __post_init__(self) -> None:
        if self.lease_ms <= 0 or self.heartbeat_ms <= 0:
            raise ValueError("lease and heartbeat must be positive")
        if self.heartbeat_ms * 2 > self.lease_ms:
            raise ValueError("the heartbeat must be at most half the lease")
        if self.backoff_base_ms < 0 or self.backoff_cap_ms < self.backoff_base_ms:
            raise ValueError("backoff needs 0 <= base <= cap")


# --- backoff ---------------------------------------------------------------------------------


def backoff_ms(attempt: int, policy: DispatchPolicy, random: Callable[[], float]) -> int:
    """How long a task waits after its attempt `attempt` (from 1) failed.

    Exponential with "equal jitter": the ceiling base * 2^(attempt-1), capped, and a
    delay drawn uniformly from its upper half. Workers that failed together spread
    out, and the delay still grows with every attempt (never below half the ceiling).
    """
    exponent = min(max(attempt, 1) - 1, 62)
    ceiling = min(policy.backoff_cap_ms, policy.backoff_base_ms * (1 << exponent))
    half = ceiling // 2
    return half + int(random() * (ceiling - half))


# --- leases ----------------------------------------------------------------------------------


def new_lease_id(task_id: str, token: str | None = None) -> str:
    """A fresh fencing token for one assignment of `task_id`."""
    return f"{task_id}{LEASE_SEPARATOR}{token or secrets.token_hex(8)}"


def lease_task_id(lease_id: str) -> str:
    """The task a lease id belongs to ("" if it is not one of ours)."""
    task_id, sep, token = lease_id.partition(LEASE_SEPARATOR)
    return task_id if sep and task_id and token else ""


def holds(task: Task, worker_id: str, lease_id: str) -> bool:
    """Whether `worker_id` quoting `lease_id` still holds `task` (fencing)."""
    return (
        task.state is TaskState.RUNNING
        and bool(lease_id)
        and task.lease_id == lease_id
        and task.worker_id == worker_id
    )


def lease_lapsed(task: Task, now_ms: int) -> bool:
    """Whether a RUNNING task's lease has passed its deadline."""
    return task.state is TaskState.RUNNING and task.lease_deadline_ms <= now_ms


# Guards for the store's optimistic transitions: the fields that must not have changed
# since the task was read. A claim must find the task exactly as it read it; a worker
# report needs its lease to still be current; an expiry needs the lease not renewed.
CLAIM_GUARD = ("attempt", "update_time_ms")
LEASE_GUARD = ("lease_id", "worker_id")
EXPIRY_GUARD = ("lease_id", "lease_deadline_ms")


class Renewal(Enum):
    """What a heartbeat did to one lease."""

    LOST = 0  # the worker no longer holds it: nothing renewed
    RENEWED = 1
    CANCEL_REQUESTED = 2  # renewed, and a cancel of the task is pending


@dataclass(frozen=True)
class Notice:
    """A message for the dispatcher: a task became ready ("wake"), a cancel of a
    running task was requested ("cancel"), or its subscription was (re)established
    and messages sent meanwhile may be lost ("resubscribed")."""

    kind: Literal["wake", "cancel", "resubscribed"]
    task_id: str = ""


# --- credits and load ------------------------------------------------------------------------


@dataclass
class WorkerLoad:
    """What one worker session may still receive and what it holds."""

    worker_id: str
    max_concurrency: int
    credits: int = 0
    held: set[str] = field(default_factory=set)
    # The worker said it takes no more work (Draining): its credits are void.
    draining: bool = False

    def grant(self, credits: int) -> None:
        if not self.draining:
            self.credits = min(self.credits + credits, MAX_CREDITS)

    def stop(self) -> None:
        self.draining = True
        self.credits = 0

    @property
    def room(self) -> int:
        """Assignments it may receive now: its credits, and never past its concurrency."""
        if self.draining:
            return 0
        return max(0, min(self.credits, self.max_concurrency - len(self.held)))

    @property
    def load(self) -> float:
        return len(self.held) / self.max_concurrency

    def reserve(self, task_id: str) -> None:
        """One credit spent on `task_id` (before the claim, so none is spent twice)."""
        if self.room <= 0:
            raise ValueError(f"worker {self.worker_id} has no room")
        self.credits -= 1
        self.held.add(task_id)

    def unreserve(self, task_id: str) -> None:
        """The claim failed: the credit comes back (unless the worker is draining)."""
        if task_id in self.held:
            self.held.discard(task_id)
            if not self.draining:
                self.credits += 1

    def release(self, task_id: str) -> None:
        """The worker no longer holds `task_id` (it reported the end, or lost the lease)."""
        self.held.discard(task_id)

    def adopt(self, task_id: str) -> None:
        """A task it held before reconnecting (learned from a heartbeat): no credit spent."""
        self.held.add(task_id)


def pick_worker(loads: Iterable[WorkerLoad]) -> WorkerLoad | None:
    """The worker with room and the lowest load (fraction of its concurrency in use).

    Ties go to the one holding fewer tasks, then to the one with more credits left.
    """
    best: WorkerLoad | None = None
    best_key: tuple[float, int, int] = (0.0, 0, 0)
    for load in loads:
        if load.room <= 0:
            continue
        key = (load.load, len(load.held), -load.credits)
        if best is None or key < best_key:
            best, best_key = load, key
    return best


# --- outcomes --------------------------------------------------------------------------------

Queue = Literal["ready", "delayed"]


@dataclass(frozen=True)
class Outcome:
    """A task change: attributes to set, and the queue it re-enters (None: none).

    `ready_at_ms` is the QUEUE_DELAYED score; a "ready" task is scored by priority
    and `ready_at_ms` as enqueue time (joins the back of its priority class).
    """

    changes: dict[str, Any]
    queue: Queue | None = None
    ready_at_ms: int = 0

    @property
    def state(self) -> TaskState:
        state = self.changes["state"]
        assert isinstance(state, TaskState)
        return state


_LEASE_CLEARED: dict[str, Any] = {"lease_id": "", "lease_deadline_ms": 0}


def start(worker_id: str, lease_id: str, now_ms: int, policy: DispatchPolicy) -> dict[str, Any]:
    """PENDING → RUNNING under a new lease."""
    return {
        "state": TaskState.RUNNING,
        "worker_id": worker_id,
        "lease_id": lease_id,
        "lease_deadline_ms": now_ms + policy.lease_ms,
        "start_time_ms": now_ms,
        "next_attempt_time_ms": 0,
        "stage": Stage.NONE,
        "progress": 0.0,
        "message": "",
    }


def progress(
    stage: Stage, fraction: float, message: str, now_ms: int, policy: DispatchPolicy
) -> dict[str, Any]:
    """A progress report; renews the lease as well."""
    fraction = 0.0 if fraction != fraction else min(1.0, max(0.0, fraction))  # NaN → 0
    return {
        "stage": stage,
        "progress": fraction,
        "message": message[:MAX_PROGRESS_MESSAGE_CHARS],
        "lease_deadline_ms": now_ms + policy.lease_ms,
    }


def succeeded(result: TaskResult, now_ms: int) -> Outcome:
    """The worker completed the task (even if a cancel was on its way: the work is done)."""
    return Outcome(
        {
            "state": TaskState.SUCCEEDED,
            "result": result,
            "error": None,
            "stage": Stage.NONE,
            "progress": 1.0,
            "message": "",
            "end_time_ms": now_ms,
            **_LEASE_CLEARED,
        }
    )


def cancelled(now_ms: int, message: str) -> Outcome:
    return Outcome(
        {
            "state": TaskState.CANCELLED,
            "stage": Stage.NONE,
            "message": message,
            "end_time_ms": now_ms,
            "next_attempt_time_ms": 0,
            **_LEASE_CLEARED,
        }
    )


def _requeue(
    queue: Queue, attempt: int, ready_at_ms: int, error: TaskError | None, message: str
) -> Outcome:
    return Outcome(
        {
            "state": TaskState.PENDING,
            "attempt": attempt,
            "error": error,
            "worker_id": "",
            "stage": Stage.NONE,
            "progress": 0.0,
            "message": message,
            "start_time_ms": 0,
            "next_attempt_time_ms": ready_at_ms,
            **_LEASE_CLEARED,
        },
        queue=queue,
        ready_at_ms=ready_at_ms,
    )


def failed(
    task: Task,
    error: TaskError,
    now_ms: int,
    policy: DispatchPolicy,
    random: Callable[[], float],
) -> Outcome:
    """The attempt failed (or its lease lapsed, `error` saying so).

    - a cancel was requested: CANCELLED (a cancelled task is never retried);
    - a hand-back at worker shutdown (WORKER_SHUTDOWN, retryable): back to the ready
      queue at once with the same attempt — a deploy does not use up attempts;
    - retryable with attempts left: PENDING, attempt + 1, after `backoff_ms`;
    - otherwise FAILED with this error (dead-letter: listable, RetryTask-able).
    """
    if task.cancel_requested:
        return cancelled(now_ms, task.message or "cancelled")
    if error.retryable and error.reason == WORKER_SHUTDOWN:
        return _requeue("ready", task.attempt, now_ms, error, "handed back by a stopping worker")
    if error.retryable and task.attempt < task.max_attempts:
        delay = backoff_ms(task.attempt, policy, random)
        return _requeue(
            "delayed",
            task.attempt + 1,
            now_ms + delay,
            error,
            f"attempt {task.attempt} failed ({error.reason}); retrying in {delay / 1000:.1f}s",
        )
    return Outcome(
        {
            "state": TaskState.FAILED,
            "error": error,
            "stage": Stage.NONE,
            "message": error.message,
            "end_time_ms": now_ms,
            "next_attempt_time_ms": 0,
            **_LEASE_CLEARED,
        }
    )


def lease_expired(
    task: Task, now_ms: int, policy: DispatchPolicy, random: Callable[[], float]
) -> Outcome:
    """The holder stopped renewing: the task goes back (or fails) as after a retryable error."""
    error = TaskError(
        code="UNAVAILABLE",
        reason=LEASE_EXPIRED,
        message=f"worker {task.worker_id or '?'} stopped renewing its lease "
        f"(attempt {task.attempt})",
        retryable=True,
    )
    return failed(task, error, now_ms, policy, random)


def handed_back(task: Task, now_ms: int) -> Outcome:
    """The worker gave the task back without a cancel being requested: ready again."""
    return _requeue("ready", task.attempt, now_ms, task.error, "handed back by its worker")


def cancel_acknowledged(task: Task, now_ms: int) -> Outcome:
    """The worker stopped the task after a Cancel."""
    if task.cancel_requested:
        return cancelled(now_ms, task.message or "cancelled")
    return handed_back(task, now_ms)
