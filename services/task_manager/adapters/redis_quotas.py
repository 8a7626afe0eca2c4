"""Per-tenant quotas in Redis: uploads per minute, stored bytes, documents.

Usage is the hash `redis_keys.tenant_usage(tenant)` (fields `bytes`,
`documents`): the script that creates an upload's task adds its size
(adapters/redis_store.py), deleting a document gives it back (the Knowledge
Service's delete script). Uploads per
minute count in `redis_keys.tenant_uploads(tenant, minute)`, which expires.
Checks happen before the bytes are stored, and the stored size is capped at
what is left while streaming; uploads running at the same moment may together
overshoot the byte quota by at most what they had in flight (a soft limit).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from services.common import redis_keys
from services.common.errors import ResourceExhausted
from services.common.redis_boundary import redis_boundary

UPLOAD_RATE_REASON = "TENANT_UPLOAD_RATE_EXCEEDED"
STORAGE_REASON = "TENANT_STORAGE_QUOTA_EXCEEDED"
DOCUMENTS_REASON = "TENANT_DOCUMENT_QUOTA_EXCEEDED"


@dataclass(frozen=True)
class QuotaLimits:
    """Per tenant; 0 means unlimited."""

    uploads_per_minute: int = 0
    storage_bytes: int = 0
    documents: int = 0


class RedisQuotas:
    def __init__(self, redis: Redis, limits: QuotaLimits) -> None:
        self._redis = redis
        self._limits = limits

    @redis_boundary
    async def admit(self, tenant: str, declared_bytes: int) -> int | None:
        """Counts an upload against the tenant's rate and checks its usage; the
        bytes it may still store (None: no byte quota). Raises ResourceExhausted."""
        limits = self._limits
        if limits.uploads_per_minute:
            now = time.time()
            key = redis_keys.tenant_uploads(tenant, int(now // 60))
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.incr(key)
                pipe.expire(key, 120)
                count, _ = await pipe.execute()
            if int(count) > limits.uploads_per_minute:
                raise ResourceExhausted(
                    UPLOAD_RATE_REASON,
                    f"at most {limits.uploads_per_minute} uploads per minute for this tenant",
                    metadata={"limit": str(limits.uploads_per_minute)},
                    retry_after=max(60 - now % 60, 0.1),
                )
        if not (limits.storage_bytes or limits.documents):
            return None
        used: Any = await self._redis.hmget(redis_keys.tenant_usage(tenant), ["bytes", "documents"])
        used_bytes, used_documents = (max(int(v or 0), 0) for v in used)
        if limits.documents and used_documents >= limits.documents:
            raise ResourceExhausted(
                DOCUMENTS_REASON,
                f"this tenant already stores its quota of {limits.documents} documents",
                metadata={"limit": str(limits.documents)},
            )
        if not limits.storage_bytes:
            return None
        left = limits.storage_bytes - used_bytes
        if left <= 0 or declared_bytes > left:
            raise ResourceExhausted(
                STORAGE_REASON,
                f"this upload would exceed the tenant's storage quota of {limits.storage_bytes}"
                " bytes",
                metadata={"limit_bytes": str(limits.storage_bytes)},
            )
        return left
