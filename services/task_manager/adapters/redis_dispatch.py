"""The dispatcher's side of Redis: claiming, leases, promotion, wake-ups.

Every change of a task goes through `RedisTaskStore.transition` (one event
each, optimistic guards); this module adds no state machine. What it adds:

- `claim`: PENDING → RUNNING for one worker, as a transition guarded on the
  record as read (state, attempt, update_time_ms) that removes the task from
  QUEUE_READY and adds it to LEASES scored by the lease deadline. Two replicas
  that read the same head of the queue race on the guard: one wins, the other
  gets "conflict" and moves on — no double dispatch.
- `apply`: an `Outcome` (domain/dispatch.py) as a transition: the outcome's
  fields, out of LEASES, into QUEUE_READY or QUEUE_DELAYED if it says so.
- `_RENEW`: heartbeats move a lease's deadline (the task's lease_deadline_ms
  and its LEASES score) if the worker still holds it; no event, no state
  change. Lease expiry guards on lease_deadline_ms, so a renewal that lands
  between the reclaimer's read and its write makes the reclaim a conflict.
- `_PROMOTE`: QUEUE_DELAYED → QUEUE_READY for tasks whose backoff ended
  (a queue move, not a state change: the task stays PENDING).
- `notices`: the QUEUE_WAKE and DISPATCH_CANCEL channels (redis_keys).

Times are the replicas' wall clocks in ms: replicas must agree on the time to
well within a lease (NTP is plenty).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import redis.exceptions
from redis.asyncio import Redis

from services.common import redis_keys
from services.common.redis_boundary import as_text, redis_boundary
from services.task_manager.adapters.redis_store import (
    RedisTaskStore,
    Transitioned,
    queue_score,
)
from services.task_manager.domain import dispatch
from services.task_manager.domain.dispatch import DispatchPolicy, Notice, Outcome, Renewal
from services.task_manager.domain.model import EventType, Task, TaskState
from services.task_manager.domain.upload import MAX_PRIORITY

log = logging.getLogger(__name__)

# KEYS: 1 LEASES, 2.. task hashes. ARGV: worker id, new deadline (ms), then one lease id
# per task hash, then one task id per task hash. Answers one number per task: 0 the
# worker no longer holds it (nothing written), 1 renewed, 2 renewed and a cancel was
# requested.
_RENEW = """
local n = #KEYS - 1
local worker, deadline = ARGV[1], ARGV[2]
local out = {}
for i = 1, n do
  local f = redis.call('HMGET', KEYS[i + 1], 'state', 'lease_id', 'worker_id', 'cancel_requested')
  if f[1] == 'RUNNING' and f[2] == ARGV[2 + i] and f[3] == worker then
    redis.call('HSET', KEYS[i + 1], 'lease_deadline_ms', deadline)
    redis.call('ZADD', KEYS[1], deadline, ARGV[2 + n + i])
    if f[4] == '1' then out[i] = 2 else out[i] = 1 end
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: 1 QUEUE_DELAYED, 2 QUEUE_READY, 3.. task hashes. ARGV: now (ms), max priority,
# wake channel, then one task id per task hash. Moves each task still due in
# QUEUE_DELAYED to QUEUE_READY (scored by priority, then its due time); drops entries
# of tasks that are no longer PENDING. Answers how many it moved.
_PROMOTE = """
local now, top = tonumber(ARGV[1]), tonumber(ARGV[2])
local moved = 0
for i = 3, #KEYS do
  local id = ARGV[i + 1]
  local due = redis.call('ZSCORE', KEYS[1], id)
  if due and tonumber(due) <= now then
    redis.call('ZREM', KEYS[1], id)
    local f = redis.call('HMGET', KEYS[i], 'state', 'priority')
    if f[1] == 'PENDING' then
      local score = (top - tonumber(f[2] or '0')) * 1e13 + tonumber(due)
      redis.call('ZADD', KEYS[2], string.format('%.0f', score), id)
      moved = moved + 1
    end
  end
end
if moved > 0 then redis.call('PUBLISH', ARGV[3], '') end
return moved
"""

# KEYS: 1 the queue or lease zset, 2 task hash. ARGV: task id, the state the task must
# be in to stay. Removes a stale entry (the task is gone or in another state).
_DROP_STALE = """
local state = redis.call('HGET', KEYS[2], 'state')
if state ~= ARGV[2] then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""


def _members(reply: Any) -> list[str]:
    """The members of a ZRANGE reply (without scores)."""
    return [as_text(member) for member in reply]


class RedisDispatchQueue:
    """The queue and leases as the dispatcher sees them (see the module docstring)."""

    def __init__(self, redis: Redis, tasks: RedisTaskStore) -> None:
        self._redis = redis
        self._tasks = tasks
        self._renew = redis.register_script(_RENEW)
        self._promote = redis.register_script(_PROMOTE)
        self._drop_stale = redis.register_script(_DROP_STALE)

    @redis_boundary
    async def get(self, task_id: str) -> Task | None:
        return await self._tasks.get_task(task_id)

    async def _records(self, ids: Sequence[str]) -> list[tuple[str, Task | None]]:
        # A claim batch or a reclaim pass can be hundreds of tasks.
        return list(zip(ids, await self._tasks.tasks(ids), strict=True))

    @redis_boundary
    async def ready(self, limit: int) -> list[Task]:
        """The first `limit` tasks of QUEUE_READY (priority, then FIFO), as read now."""
        ids = _members(await self._redis.zrange(redis_keys.QUEUE_READY, 0, limit - 1))
        tasks = []
        for task_id, task in await self._records(ids):
            if task is None or task.state is not TaskState.PENDING:
                await self._drop(redis_keys.QUEUE_READY, task_id, TaskState.PENDING)
            else:
                tasks.append(task)
        return tasks

    async def _drop(self, key: str, task_id: str, state: TaskState) -> None:
        dropped = await self._drop_stale(
            keys=[key, redis_keys.task(task_id)], args=[task_id, state.value]
        )
        if dropped:
            log.warning("dropped a stale queue entry", extra={"task_id": task_id, "key": key})

    @redis_boundary
    async def claim(
        self, task: Task, worker_id: str, lease_id: str, now_ms: int, policy: DispatchPolicy
    ) -> Task | None:
        """Leases `task` (PENDING, as read) to `worker_id`; None if someone else changed
        or took it first."""
        changes = dispatch.start(worker_id, lease_id, now_ms, policy)
        done = await self._tasks.transition(
            task,
            EventType.STATE_CHANGED,
            changes,
            guard=dispatch.CLAIM_GUARD,
            zadd={redis_keys.LEASES: float(changes["lease_deadline_ms"])},
            zrem=(redis_keys.QUEUE_READY,),
            now=now_ms,
        )
        return done.task if done.status == "ok" else None

    @redis_boundary
    async def apply(
        self, task: Task, outcome: Outcome, guard: Sequence[str], now_ms: int
    ) -> Transitioned:
        """Writes `outcome` if the guarded fields of `task` still hold."""
        zadd: dict[str, float] = {}
        zrem = [redis_keys.LEASES]
        if outcome.queue == "ready":
            zadd[redis_keys.QUEUE_READY] = float(queue_score(task.priority, outcome.ready_at_ms))
            zrem.append(redis_keys.QUEUE_DELAYED)
        elif outcome.queue == "delayed":
            zadd[redis_keys.QUEUE_DELAYED] = float(outcome.ready_at_ms)
            zrem.append(redis_keys.QUEUE_READY)
        return await self._tasks.transition(
            task,
            EventType.STATE_CHANGED,
            outcome.changes,
            guard=guard,
            zadd=zadd,
            zrem=zrem,
            now=now_ms,
        )

    @redis_boundary
    async def progress(self, task: Task, changes: dict[str, Any], now_ms: int) -> Transitioned:
        """A progress report on a task the worker holds; renews its lease."""
        return await self._tasks.transition(
            task,
            EventType.PROGRESS,
            changes,
            guard=dispatch.LEASE_GUARD,
            zadd={redis_keys.LEASES: float(changes["lease_deadline_ms"])},
            now=now_ms,
        )

    @redis_boundary
    async def renew(
        self, worker_id: str, leases: Sequence[tuple[str, str]], deadline_ms: int
    ) -> list[Renewal]:
        """Moves the deadline of each (task id, lease id) `worker_id` still holds."""
        if not leases:
            return []
        keys = [redis_keys.LEASES, *(redis_keys.task(task_id) for task_id, _ in leases)]
        args = [
            worker_id,
            str(deadline_ms),
            *(lease for _, lease in leases),
            *(task_id for task_id, _ in leases),
        ]
        reply = await self._renew(keys=keys, args=args)
        return [Renewal(int(code)) for code in reply]

    @redis_boundary
    async def promote_due(self, now_ms: int, limit: int) -> int:
        """Moves up to `limit` tasks whose backoff ended to QUEUE_READY."""
        due = await self._redis.zrange(
            redis_keys.QUEUE_DELAYED, "-inf", now_ms, byscore=True, offset=0, num=limit
        )
        ids = _members(due)
        if not ids:
            return 0
        keys = [
            redis_keys.QUEUE_DELAYED,
            redis_keys.QUEUE_READY,
            *(redis_keys.task(task_id) for task_id in ids),
        ]
        args = [str(now_ms), str(MAX_PRIORITY), redis_keys.QUEUE_WAKE, *ids]
        return int(await self._promote(keys=keys, args=args))

    @redis_boundary
    async def lapsed(self, now_ms: int, limit: int) -> list[Task]:
        """Up to `limit` RUNNING tasks whose lease deadline has passed, as read now."""
        due = await self._redis.zrange(
            redis_keys.LEASES, "-inf", now_ms, byscore=True, offset=0, num=limit
        )
        tasks = []
        for task_id, task in await self._records(_members(due)):
            if task is None or task.state is not TaskState.RUNNING:
                await self._drop(redis_keys.LEASES, task_id, TaskState.RUNNING)
            else:
                tasks.append(task)
        return tasks

    async def notices(self, *, retry_cap_seconds: float = 2.0) -> AsyncIterator[Notice]:
        """Wake-ups and cancel requests, forever; resubscribes after a lost connection
        (yielding "resubscribed", since messages sent meanwhile are lost)."""
        delay = 0.05
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(redis_keys.QUEUE_WAKE, redis_keys.DISPATCH_CANCEL)
                delay = 0.05
                yield Notice("resubscribed")
                while True:
                    message = await pubsub.get_message(timeout=30.0)
                    if message is None or message.get("type") != "message":
                        continue
                    channel = as_text(message["channel"])
                    data = as_text(message["data"])
                    if channel == redis_keys.DISPATCH_CANCEL:
                        yield Notice("cancel", data)
                    else:
                        yield Notice("wake", data)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
                log.warning(
                    "lost the dispatch subscription; resubscribing", extra={"error": str(exc)}
                )
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
                delay = min(delay * 2, retry_cap_seconds)
            finally:
                with contextlib.suppress(redis.exceptions.RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
