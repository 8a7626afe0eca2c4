"""Knowledge base records in Redis.

A knowledge base is the hash `redis_keys.knowledge_base(id)` with fields id,
name, description, chunking (JSON), embedding_provider, embedding_model,
embedding_dimensions, labels (JSON), create_time_ms, update_time_ms, tenant.
Names are unique per tenant through `redis_keys.knowledge_base_name(tenant,
name)`; creation and renames claim the name and write the record in one Lua
script, so two concurrent creates of one name cannot both succeed.

Tenancy: during a public RPC (`services.common.auth.current_tenant()` set) the
store sees only the caller's knowledge bases: another tenant's is None /
NOT_FOUND, exactly like one that does not exist. Outside an RPC (workers,
maintenance) it is not scoped.
"""

from __future__ import annotations

import base64
import builtins
import json
from dataclasses import asdict, replace
from typing import Any

from redis.asyncio import Redis

from services.common import redis_keys as keys
from services.common.auth import caller_tenant, current_tenant
from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.common.ids import is_id
from services.common.settings import DEFAULT_TENANT
from services.knowledge.domain.knowledge_bases import ChunkingDefaults, KnowledgeBase

# KEYS: record, name key, index, request key. ARGV: id, name, score, ttl, then
# field/value pairs. Answers {"created", id} or {"exists", id} or {"replay", id}.
_CREATE = """
if KEYS[4] ~= '' then
  local earlier = redis.call('GET', KEYS[4])
  if earlier then return {'replay', earlier} end
end
local holder = redis.call('GET', KEYS[2])
if holder then return {'exists', holder} end
redis.call('SET', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[3], 0, ARGV[1])
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[4]) end
return {'created', ARGV[1]}
"""

# KEYS: record, old name key, new name key. ARGV: id, then field/value pairs.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if KEYS[2] ~= KEYS[3] then
  local holder = redis.call('GET', KEYS[3])
  if holder and holder ~= ARGV[1] then return 'exists' end
  redis.call('DEL', KEYS[2])
  redis.call('SET', KEYS[3], ARGV[1])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 'ok'
"""


# KEYS: record, name key, index. ARGV: id. The name key goes only while it
# still names this knowledge base.
_DELETE = """
redis.call('DEL', KEYS[1])
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
redis.call('ZREM', KEYS[3], ARGV[1])
return 1
"""


def encode(kb: KnowledgeBase) -> dict[str, str]:
    return {
        "id": kb.id,
        "name": kb.name,
        "description": kb.description,
        "chunking": json.dumps(asdict(kb.chunking)),
        "embedding_provider": kb.embedding_provider,
        "embedding_model": kb.embedding_model,
        "embedding_dimensions": str(kb.embedding_dimensions),
        "labels": json.dumps(kb.labels),
        "create_time_ms": str(kb.create_time_ms),
        "update_time_ms": str(kb.update_time_ms),
        "tenant": kb.tenant,
    }


def decode(fields: dict[bytes, bytes]) -> KnowledgeBase:
    f = {k.decode(): v.decode() for k, v in fields.items()}
    return KnowledgeBase(
        id=f["id"],
        name=f["name"],
        description=f.get("description", ""),
        chunking=ChunkingDefaults(**json.loads(f.get("chunking", "{}"))),
        embedding_provider=f.get("embedding_provider", "local"),
        embedding_model=f.get("embedding_model", ""),
        embedding_dimensions=int(f.get("embedding_dimensions", "0")),
        labels=json.loads(f.get("labels", "{}")),
        create_time_ms=int(f.get("create_time_ms", "0")),
        update_time_ms=int(f.get("update_time_ms", "0")),
        tenant=f.get("tenant") or DEFAULT_TENANT,
    )


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _page_token(last_id: str) -> str:
    return base64.urlsafe_b64encode(f"kbs:{last_id}".encode()).decode()


def _parse_token(token: str) -> str:
    try:
        kind, last_id = base64.urlsafe_b64decode(token.encode()).decode().split(":")
    except ValueError as exc:
        raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid here") from exc
    if kind != "kbs" or not is_id(last_id):
        raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid here")
    return last_id


class RedisKnowledgeBases:
    def __init__(self, redis: Redis, *, request_id_ttl_seconds: int = 86_400) -> None:
        self._redis = redis
        self._ttl = request_id_ttl_seconds
        self._create = redis.register_script(_CREATE)
        self._update = redis.register_script(_UPDATE)
        self._delete = redis.register_script(_DELETE)

    async def create(self, kb: KnowledgeBase, request_id: str) -> tuple[KnowledgeBase, bool]:
        """Stores a new knowledge base; (kb, created). A replayed request_id
        answers the first call's knowledge base with created False."""
        kb = replace(kb, tenant=caller_tenant())
        request_key = keys.kb_create_request(kb.tenant, request_id) if request_id else ""
        answer: Any = await self._create(
            keys=[
                keys.knowledge_base(kb.id),
                keys.knowledge_base_name(kb.tenant, kb.name),
                keys.tenant_knowledge_bases(kb.tenant),
                request_key,
            ],
            args=[kb.id, kb.name, 0, self._ttl, *_flatten(encode(kb))],
        )
        outcome, kb_id = answer
        if outcome == b"exists":
            raise AlreadyExists(
                "KNOWLEDGE_BASE_EXISTS",
                f"a knowledge base named {kb.name!r} already exists",
                metadata={"knowledge_base_id": kb_id.decode(), "name": kb.name},
            )
        if outcome == b"replay":
            return await self.require(kb_id.decode()), False
        return kb, True

    async def get(self, kb_id: str) -> KnowledgeBase | None:
        fields: Any = await self._redis.hgetall(keys.knowledge_base(kb_id))
        if not fields:
            return None
        kb = decode(fields)
        tenant = current_tenant()
        return kb if tenant is None or kb.tenant == tenant else None

    async def exists(self, kb_id: str) -> bool:
        """Whether the record exists, whoever owns it (not scoped to a tenant)."""
        return bool(await self._redis.exists(keys.knowledge_base(kb_id)))

    async def require(self, kb_id: str) -> KnowledgeBase:
        kb = await self.get(kb_id)
        if kb is None:
            raise NotFound(
                "KNOWLEDGE_BASE_NOT_FOUND",
                f"knowledge base {kb_id!r} does not exist",
                metadata={"knowledge_base_id": kb_id},
            )
        return kb

    async def document_count(self, kb_id: str) -> int:
        return int(await self._redis.zcard(keys.kb_documents(kb_id)))

    async def list(self, page_size: int, page_token: str) -> tuple[list[KnowledgeBase], str]:
        """Newest first. The index holds every id at score 0, so it is ordered by
        id, and ids are time-ordered: the page token is simply the last id, and
        pages stay stable while knowledge bases are added or removed."""
        size = min(max(page_size or 50, 1), 1000)
        upper = f"({_parse_token(page_token)}" if page_token else "+"
        raw: Any = await self._redis.zrevrangebylex(
            keys.tenant_knowledge_bases(caller_tenant()), upper, "-", start=0, num=size + 1
        )
        ids = [r.decode() for r in raw]
        page, more = ids[:size], len(ids) > size
        records = [await self.get(kb_id) for kb_id in page]
        token = _page_token(page[-1]) if more else ""
        return [kb for kb in records if kb is not None], token

    async def update(self, old: KnowledgeBase, new: KnowledgeBase) -> KnowledgeBase:
        outcome: Any = await self._update(
            keys=[
                keys.knowledge_base(old.id),
                keys.knowledge_base_name(old.tenant, old.name),
                keys.knowledge_base_name(old.tenant, new.name),
            ],
            args=[old.id, *_flatten(encode(replace(new, tenant=old.tenant)))],
        )
        if outcome == b"missing":
            await self.require(old.id)
        if outcome == b"exists":
            raise AlreadyExists(
                "KNOWLEDGE_BASE_EXISTS", f"a knowledge base named {new.name!r} already exists"
            )
        return replace(new, tenant=old.tenant)

    async def delete(self, kb: KnowledgeBase) -> None:
        """Removes the record, its name and its listing entry in one step. The
        Task Manager's upload script checks the record, so uploads to the
        knowledge base get NOT_FOUND from here on."""
        await self._delete(
            keys=[
                keys.knowledge_base(kb.id),
                keys.knowledge_base_name(kb.tenant, kb.name),
                keys.tenant_knowledge_bases(kb.tenant),
            ],
            args=[kb.id],
        )

    async def active_task_ids(self, kb_id: str) -> builtins.list[str]:
        """Ids of the knowledge base's PENDING and RUNNING tasks."""
        found: builtins.list[str] = []
        for state in ("PENDING", "RUNNING"):
            raw: Any = await self._redis.zrange(keys.kb_tasks_in_state(kb_id, state), 0, -1)
            found += [r.decode() if isinstance(r, bytes) else str(r) for r in raw]
        return found

    async def remember_deletion(self, kb_id: str, request_id: str, outcome: str) -> None:
        if request_id:
            await self._redis.set(keys.kb_delete_request(kb_id, request_id), outcome, ex=self._ttl)

    async def deleted_by_request(self, kb_id: str, request_id: str) -> str | None:
        if not request_id:
            return None
        value: Any = await self._redis.get(keys.kb_delete_request(kb_id, request_id))
        return None if value is None else value.decode()

    async def forget_documents(self, kb_id: str) -> None:
        await self._redis.delete(keys.kb_documents(kb_id))
