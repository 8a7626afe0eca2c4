"""Document records in Redis, joined with their latest task.

The Task Manager writes a document's hash (`redis_keys.document`) when its
upload is acknowledged, in the same atomic step as its task; the fields are
listed in services/task_manager/adapters/redis_store.py. Here they are read,
with the few task fields a document shows (state, stage, progress, error,
result), so a document is listed from the moment its upload is acknowledged.
"""

from __future__ import annotations

import json
from typing import Any

from redis.asyncio import Redis

from services.common import redis_keys
from services.common.redis_pages import newest_first, page_size
from services.knowledge.domain.documents import Document, DocumentError, DocumentPage

_TASK_FIELDS = ("state", "stage", "progress", "error", "result", "update_time_ms")


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
        chunk_count=int(parsed_result.get("chunk_count", 0)),
        page_count=int(parsed_result.get("page_count", 0)),
        metadata=json.loads(f.get("metadata") or "{}"),
        create_time_ms=int(f.get("create_time_ms") or 0),
        update_time_ms=max(int(f.get("update_time_ms") or 0), int(task_updated or 0)),
    )


class RedisDocuments:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def _load(self, ids: list[str]) -> list[Document]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for document_id in ids:
                pipe.hgetall(redis_keys.document(document_id))
            records = await pipe.execute()
        async with self._redis.pipeline(transaction=False) as pipe:
            for record in records:
                task_id = _text(record.get(b"task_id") or record.get("task_id"))
                pipe.hmget(redis_keys.task(task_id), list(_TASK_FIELDS))
            tasks = await pipe.execute()
        return [
            decode_document(document_id, record, task)
            for document_id, record, task in zip(ids, records, tasks, strict=True)
            if record
        ]

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
