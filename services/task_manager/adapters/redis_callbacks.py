"""The callback outbox in Redis (`redis_keys.CALLBACKS_DUE`).

A task id enters the outbox in the same atomic step that makes the task
terminal (`RedisTaskStore.transition`). Senders on any replica claim due
entries by pushing their due time one claim lease into the future in a Lua
script, so two replicas never post the same attempt at once, and a sender
that dies mid-POST only delays that callback by the lease.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from services.common import redis_keys

# KEYS: outbox. ARGV: now ms, claim lease ms, limit. Answers the claimed ids.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(due) do
  redis.call('ZADD', KEYS[1], ARGV[1] + ARGV[2], id)
end
return due
"""


class RedisCallbackOutbox:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._claim = redis.register_script(_CLAIM)

    async def claim(self, now_ms: int, lease_ms: int, limit: int) -> list[str]:
        ids: Any = await self._claim(
            keys=[redis_keys.CALLBACKS_DUE], args=[now_ms, lease_ms, limit]
        )
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def reschedule(self, task_id: str, due_ms: int) -> None:
        await self._redis.zadd(redis_keys.CALLBACKS_DUE, {task_id: due_ms}, xx=True)

    async def finish(self, task_id: str) -> None:
        await self._redis.zrem(redis_keys.CALLBACKS_DUE, task_id)

    async def pending(self) -> int:
        return int(await self._redis.zcard(redis_keys.CALLBACKS_DUE))
