"""Document records in Redis, joined with their latest task.

The Task Manager writes a document's hash (`redis_keys.document`) when its
upload is acknowledged, in the same atomic step as its task; the fields are
listed in services/task_manager/adapters/redis_store.py. Here they are read,
with the few task fields a document shows (state, stage, progress, error,
result), so a document is listed from the moment its upload is acknowledged.
"""

from __future__ import annotations

import builtins
import json
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis

from services.common import redis_keys
from services.common.auth import caller_tenant, current_tenant
from services.common.redis_pages import in_batches, newest_first, page_size
from services.common.settings import DEFAULT_TENANT
from services.knowledge.domain.documents import Document, DocumentError, DocumentPage

_TASK_FIELDS = ("state", "stage", "progress", "error", "result", "update_time_ms")
# How long a DeleteDocument request_id is remembered.
DELETE_REQUEST_TTL_SECONDS = 86_400

# KEYS: document record, kb_documents, kb_content(kb, sha256), request key,
# the tenant's usage. ARGV: document id, outcome, ttl, tenant. The content key
# is removed only while it still names this document (a newer upload of the
# same bytes may hold it); the tenant's usage (quotas) gives back its bytes.
_DELETE = """
local owner, size = unpack(redis.call('HMGET', KEYS[1], 'tenant', 'size_bytes'))
if size and (owner or ARGV[5]) == ARGV[4] then
  redis.call('HINCRBY', KEYS[5], 'bytes', -tonumber(size))
  redis.call('HINCRBY', KEYS[5], 'documents', -1)
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if redis.call('GET', KEYS[3]) == ARGV[1] then redis.call('DEL', KEYS[3]) end
if KEYS[4] ~= '' then redis.call('SET', KEYS[4], ARGV[2], 'EX', ARGV[3]) end
return 1
"""

# A page of a knowledge base being deleted. KEYS: kb_documents, the caller's
# usage, then per document its record and its content-hash key. ARGV: tenant,
# default tenant, then the document ids. Only records that still exist and
# are the caller's give their bytes back (a concurrent DeleteDocument of one
# of them has already).
_DELETE_MANY = """
local bytes, count = 0, 0
for i = 1, #ARGV - 2 do
  local record, content = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  local owner, size = unpack(redis.call('HMGET', record, 'tenant', 'size_bytes'))
  if size and (owner or ARGV[2]) == ARGV[1] then
    bytes = bytes + tonumber(size)
    count = count + 1
  end
  redis.call('DEL', record, content)
  redis.call('ZREM', KEYS[1], ARGV[2 + i])
end
if count > 0 then
  redis.call('HINCRBY', KEYS[2], 'bytes', -bytes)
  redis.call('HINCRBY', KEYS[2], 'documents', -count)
end
return count
"""


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def decode_document(document_id: str, record: dict[Any, Any], task: list[Any]) -> Document:
    f = {_text(k): _text(v) for k, v in record.items()}
    state, stage, progress, error, result, task_updated = (_text(v) for v in task)
    parsed_error = json.loads(error) if error else None
    parsed_result = json.loads(result) if result else {}
    return Document(
        id=document_id,
        knowledge_base_id=f["knowledge_base_id"],
        filename=f.get("filename", ""),
        content_type=f.get("content_type", ""),
        size_bytes=int(f.get("size_bytes") or 0),
        sha256=f.get("sha256", ""),
        object_key=f.get("object_key", ""),
        task_id=f.get("task_id", ""),
        state=state or "PENDING",
        stage=stage,
        progress=float(progress or 0),
        error=DocumentError(
            code=parsed_error.get("code", ""),
            reason=parsed_error.get("reason", ""),
            message=parsed_error.get("message", ""),
        )
        if parsed_error
        else None,
        # Until the latest task has a result (a re-index pending, running, failed or
        # cancelled), the previous run's chunks are the searchable ones: the Task
        # Manager copies its counts into the record when it queues the re-index.
        chunk_count=int(parsed_result.get("chunk_count", f.get("chunk_count") or 0)),
        page_count=int(parsed_result.get("page_count", f.get("page_count") or 0)),
        metadata=json.loads(f.get("metadata") or "{}"),
        create_time_ms=int(f.get("create_time_ms") or 0),
        update_time_ms=max(int(f.get("update_time_ms") or 0), int(task_updated or 0)),
    )


class RedisDocuments:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._delete = redis.register_script(_DELETE)
        self._delete_many = redis.register_script(_DELETE_MANY)

    async def _load(self, ids: Sequence[str]) -> list[Document]:
        documents: list[Document] = []
        for batch in in_batches(ids):
            async with self._redis.pipeline(transaction=False) as pipe:
                for document_id in batch:
                    pipe.hgetall(redis_keys.document(document_id))
                records = await pipe.execute()
            async with self._redis.pipeline(transaction=False) as pipe:
                for record in records:
                    task_id = _text(record.get(b"task_id") or record.get("task_id"))
                    pipe.hmget(redis_keys.task(task_id), list(_TASK_FIELDS))
                tasks = await pipe.execute()
            documents += [
                decode_document(document_id, record, task)
                for document_id, record, task in zip(batch, records, tasks, strict=True)
                if record
            ]
        return documents

    async def get(self, knowledge_base_id: str, document_id: str) -> Document | None:
        found = await self._load([document_id])
        if not found or found[0].knowledge_base_id != knowledge_base_id:
            return None
        return found[0]

    async def list(
        self, knowledge_base_id: str, state: str, size: int, page_token: str
    ) -> DocumentPage:
        """Newest first; with a state filter a page may hold fewer than `size`."""
        ids, token = await newest_first(
            self._redis,
            redis_keys.kb_documents(knowledge_base_id),
            page_size(size),
            f"docs:{knowledge_base_id}:{state}",
            page_token,
        )
        documents = await self._load(ids)
        if state:
            documents = [d for d in documents if d.state == state]
        return DocumentPage(documents, token)

    async def owned(self, document_id: str) -> bool:
        """Whether the document belongs to the calling tenant (always, outside an
        RPC); records from before tenants belong to the default tenant."""
        caller = current_tenant()
        if caller is None:
            return True
        owner: Any = await self._redis.hget(redis_keys.document(document_id), "tenant")
        return (_text(owner) or DEFAULT_TENANT) == caller

    async def current_task(self, knowledge_base_id: str, document_id: str) -> str | None:
        """The document's latest task id, or None when the document is gone, is of
        another knowledge base, or is being deleted (the ingestion handler's check
        before and after it writes chunks)."""
        kb, task_id, deleting = await self._redis.hmget(
            redis_keys.document(document_id), ["knowledge_base_id", "task_id", "deleting"]
        )
        if _text(kb) != knowledge_base_id or _text(deleting) == "1":
            return None
        return _text(task_id)

    async def mark_deleting(self, document: Document) -> None:
        """Flags the record before its chunks go: from here on an ingestion run
        that writes chunks sees the document as deleted and removes them again,
        and no re-index can be queued for it."""
        await self._redis.hset(redis_keys.document(document.id), "deleting", "1")

    async def ids(self, knowledge_base_id: str) -> builtins.list[str]:
        """Every document id of the knowledge base (for deleting it)."""
        raw: Any = await self._redis.zrange(redis_keys.kb_documents(knowledge_base_id), 0, -1)
        return [_text(r) for r in raw]

    async def delete(self, document: Document, request_id: str = "", outcome: str = "") -> None:
        """Removes the record, its kb_documents entry and its content-hash entry in
        one step; with a request_id, remembers `outcome` for a retry."""
        request_key = (
            redis_keys.document_delete_request(document.id, request_id) if request_id else ""
        )
        await self._delete(
            keys=[
                redis_keys.document(document.id),
                redis_keys.kb_documents(document.knowledge_base_id),
                redis_keys.kb_content(document.knowledge_base_id, document.sha256),
                request_key,
                redis_keys.tenant_usage(caller_tenant()),
            ],
            args=[
                document.id,
                outcome,
                DELETE_REQUEST_TTL_SECONDS,
                caller_tenant(),
                DEFAULT_TENANT,
            ],
        )

    async def load(self, ids: builtins.list[str]) -> builtins.list[Document]:
        """The records of these ids that still exist (two pipelined round trips
        per 50 ids)."""
        return await self._load(ids)

    async def delete_many(self, knowledge_base_id: str, documents: Sequence[Document]) -> None:
        """Removes the records of a knowledge base being deleted, in one round trip:
        no upload can add to it any more, so the content-hash entries go as they
        are. The tenant's usage (quotas) gets their bytes and count back."""
        if not documents:
            return
        keys = [
            redis_keys.kb_documents(knowledge_base_id),
            redis_keys.tenant_usage(caller_tenant()),
        ]
        for d in documents:
            keys += [redis_keys.document(d.id), redis_keys.kb_content(knowledge_base_id, d.sha256)]
        await self._delete_many(
            keys=keys, args=[caller_tenant(), DEFAULT_TENANT, *(d.id for d in documents)]
        )

    async def deleted_by_request(self, document_id: str, request_id: str) -> str | None:
        """The outcome a successful DeleteDocument with this request_id stored."""
        if not request_id:
            return None
        value: Any = await self._redis.get(
            redis_keys.document_delete_request(document_id, request_id)
        )
        return None if value is None else _text(value)
