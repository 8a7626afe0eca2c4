"""gRPC servicer of the Knowledge Service.

Every RPC of KnowledgeService is implemented; an RPC a newer proto adds answers
UNIMPLEMENTED with reason NOT_IMPLEMENTED (the generated base class).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from dataclasses import replace
from typing import Any

import grpc

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.ids import is_id, new_id
from services.common.protos import converted, enum_name, enum_value, timestamp
from services.knowledge.adapters.document_tasks import DocumentTasks
from services.knowledge.adapters.redis_documents import RedisDocuments
from services.knowledge.adapters.redis_kb_store import RedisKnowledgeBases
from services.knowledge.adapters.s3_objects import S3Objects
from services.knowledge.adapters.task_cancel import TaskCanceller
from services.knowledge.domain.chunks import ChunkIndex, ChunkRecord, Embedder, SearchHit
from services.knowledge.domain.documents import Document
from services.knowledge.domain.knowledge_bases import (
    UPDATABLE_FIELDS,
    KnowledgeBase,
    resolve_chunking,
    resolve_embedding,
    validate_description,
    validate_labels,
    validate_name,
)
from services.knowledge.domain.search import validate_search
from services.knowledge.ingest.query_embedding import QueryEmbedders
from services.knowledge.settings import EmbeddingSettings

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

KNOWLEDGE_SERVICE = kn.DESCRIPTOR.services_by_name["KnowledgeService"].full_name


def _strategy(config: kn.ChunkingConfig) -> str:
    return enum_name(kn.ChunkingConfig.Strategy, config.strategy, "STRATEGY_")


def kb_to_proto(kb: KnowledgeBase, document_count: int = 0) -> kn.KnowledgeBase:
    return kn.KnowledgeBase(
        id=kb.id,
        name=kb.name,
        description=kb.description,
        chunking=kn.ChunkingConfig(
            strategy=enum_value(kn.ChunkingConfig.Strategy, kb.chunking.strategy, "STRATEGY_"),
            chunk_size=kb.chunking.chunk_size,
            chunk_overlap=kb.chunking.chunk_overlap,
        ),
        embedding=kn.EmbeddingConfig(
            provider=kb.embedding_provider,
            model=kb.embedding_model,
            dimensions=kb.embedding_dimensions,
        ),
        labels=kb.labels,
        document_count=document_count,
        create_time=timestamp(kb.create_time_ms),
        update_time=timestamp(kb.update_time_ms),
    )


def _require_kb_id(kb_id: str) -> str:
    if not kb_id:
        raise InvalidArgument("MISSING_KNOWLEDGE_BASE_ID", "knowledge_base_id is required")
    if len(kb_id) > 64:
        raise InvalidArgument("INVALID_KNOWLEDGE_BASE_ID", "knowledge_base_id is too long")
    return kb_id


def document_to_proto(document: Document) -> kn.Document:
    message = kn.Document(
        id=document.id,
        knowledge_base_id=document.knowledge_base_id,
        filename=document.filename,
        content_type=document.content_type,
        size_bytes=document.size_bytes,
        sha256=document.sha256,
        state=enum_value(kn.Document.State, document.state, "STATE_"),
        stage=enum_value(kn.Stage, document.stage, "STAGE_"),
        progress=document.progress,
        task_id=document.task_id,
        chunk_count=document.chunk_count,
        page_count=document.page_count,
        metadata=document.metadata,
        create_time=timestamp(document.create_time_ms),
        update_time=timestamp(document.update_time_ms),
    )
    if document.error is not None:
        message.error.CopyFrom(
            kn.DocumentError(
                code=document.error.code,
                reason=document.error.reason,
                message=document.error.message,
            )
        )
    return message


DEFAULT_CHUNK_PAGE = 100
MAX_CHUNK_PAGE = 1000
# DeleteKnowledgeBase: documents per bulk step (S3's DeleteObjects takes 1000 keys),
# and CancelTask calls to the Task Manager at once.
_DELETE_PAGE = 1000
_CANCELS_IN_FLIGHT = 32
# Task states in which a document's ingestion can still write to the index.
_ACTIVE_STATES = ("PENDING", "RUNNING")
_SEARCH_MODES = {
    kn.SearchRequest.MODE_UNSPECIFIED: "",
    kn.SearchRequest.MODE_VECTOR: "vector",
    kn.SearchRequest.MODE_KEYWORD: "keyword",
    kn.SearchRequest.MODE_HYBRID: "hybrid",
}
_MODE_ENUM = {
    "vector": kn.SearchRequest.MODE_VECTOR,
    "keyword": kn.SearchRequest.MODE_KEYWORD,
    "hybrid": kn.SearchRequest.MODE_HYBRID,
}


def _position(chunk: ChunkRecord) -> kn.ChunkPosition:
    return kn.ChunkPosition(
        chunk_index=chunk.chunk_index,
        page_number=chunk.page_number,
        heading=chunk.heading,
        sheet=chunk.sheet,
        start_char=chunk.start_char,
        end_char=chunk.end_char,
    )


def _result(hit: SearchHit) -> kn.SearchResult:
    chunk = hit.chunk
    return kn.SearchResult(
        chunk_id=chunk.id,
        text=chunk.text,
        score=hit.score,
        document_id=chunk.document_id,
        filename=chunk.filename,
        position=_position(chunk),
        metadata=chunk.metadata,
    )


def _chunk_token(document_id: str, next_index: int) -> str:
    return base64.urlsafe_b64encode(f"chunks:{document_id}:{next_index}".encode()).decode()


def _parse_chunk_token(document_id: str, token: str) -> int:
    try:
        kind, doc, index = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        start = int(index)
    except ValueError as exc:
        raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid here") from exc
    if kind != "chunks" or doc != document_id or start < 0:
        raise InvalidArgument("INVALID_PAGE_TOKEN", "page_token is not valid here")
    return start


def _require_document_id(document_id: str) -> str:
    if not document_id:
        raise InvalidArgument("MISSING_DOCUMENT_ID", "document_id is required")
    if len(document_id) > 64:
        raise InvalidArgument("INVALID_DOCUMENT_ID", "document_id is too long")
    return document_id


def _authorization(context: Context) -> str:
    """The caller's `authorization` header, to forward to the Task Manager."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            return value
    return ""


def _document_not_found(kb_id: str, document_id: str) -> NotFound:
    return NotFound(
        "DOCUMENT_NOT_FOUND",
        f"document {document_id!r} is not in knowledge base {kb_id!r}",
        metadata={"document_id": document_id, "knowledge_base_id": kb_id},
    )


class KnowledgeApi(kn_grpc.KnowledgeServiceServicer):
    """`index`, `embedder`, `objects` and `tasks` are optional so the servicer
    can run without them (RPCs needing them then answer FAILED_PRECONDITION);
    the composition root passes all of them."""

    def __init__(
        self,
        knowledge_bases: RedisKnowledgeBases,
        documents: RedisDocuments,
        *,
        index: ChunkIndex | None = None,
        embedder: Embedder | None = None,
        objects: S3Objects | None = None,
        tasks: TaskCanceller | None = None,
        queue: DocumentTasks | None = None,
        embedding: EmbeddingSettings | None = None,
    ) -> None:
        self._kbs = knowledge_bases
        self._documents = documents
        self._index = index
        self._queries = QueryEmbedders(embedder, embedding)
        self._objects = objects
        self._tasks = tasks
        self._queue = queue

    def _require_index(self) -> ChunkIndex:
        if self._index is None:
            raise FailedPrecondition("INDEX_NOT_AVAILABLE", "this service has no chunk index")
        return self._index

    async def _to_proto(self, kb: KnowledgeBase) -> kn.KnowledgeBase:
        return kb_to_proto(kb, await self._kbs.document_count(kb.id))

    async def CreateKnowledgeBase(
        self, request: kn.CreateKnowledgeBaseRequest, context: Context
    ) -> kn.KnowledgeBase:
        given = request.knowledge_base
        if len(request.request_id) > 128:
            raise InvalidArgument("INVALID_REQUEST_ID", "request_id is at most 128 characters")
        provider, model, dimensions = resolve_embedding(
            given.embedding.provider, given.embedding.model
        )
        now = int(time.time() * 1000)
        kb = KnowledgeBase(
            id=new_id(now),
            name=validate_name(given.name),
            description=validate_description(given.description),
            chunking=resolve_chunking(
                _strategy(given.chunking), given.chunking.chunk_size, given.chunking.chunk_overlap
            ),
            embedding_provider=provider,
            embedding_model=model,
            embedding_dimensions=dimensions,
            labels=validate_labels(dict(given.labels)),
            create_time_ms=now,
            update_time_ms=now,
        )
        stored, _ = await self._kbs.create(kb, request.request_id)
        return await self._to_proto(stored)

    async def GetKnowledgeBase(
        self, request: kn.GetKnowledgeBaseRequest, context: Context
    ) -> kn.KnowledgeBase:
        kb = await self._kbs.require(_require_kb_id(request.knowledge_base_id))
        return await self._to_proto(kb)

    async def ListKnowledgeBases(
        self, request: kn.ListKnowledgeBasesRequest, context: Context
    ) -> kn.ListKnowledgeBasesResponse:
        if request.page_size < 0:
            raise InvalidArgument("INVALID_PAGE_SIZE", "page_size must not be negative")
        kbs, token = await self._kbs.list(request.page_size, request.page_token)
        return kn.ListKnowledgeBasesResponse(
            knowledge_bases=[await self._to_proto(kb) for kb in kbs], next_page_token=token
        )

    async def UpdateKnowledgeBase(
        self, request: kn.UpdateKnowledgeBaseRequest, context: Context
    ) -> kn.KnowledgeBase:
        given = request.knowledge_base
        old = await self._kbs.require(_require_kb_id(given.id))
        # An empty mask means every updatable field that is set (AIP-134);
        # output-only fields echoed back from a GET are ignored.
        set_fields = [f.name for f, _ in given.ListFields()]
        paths = list(request.update_mask.paths) or [f for f in set_fields if f in UPDATABLE_FIELDS]
        embedding_changed = "embedding" in set_fields and (
            (given.embedding.provider or "local", given.embedding.model or old.embedding_model)
            != (old.embedding_provider, old.embedding_model)
        )
        if "embedding" in paths or embedding_changed:
            raise FailedPrecondition(
                "EMBEDDING_IMMUTABLE",
                "the embedding model of a knowledge base cannot change; create a new one",
            )
        unknown = [p for p in paths if p not in UPDATABLE_FIELDS]
        if unknown:
            raise InvalidArgument(
                "INVALID_UPDATE_MASK",
                f"cannot update {', '.join(unknown)}; updatable: {', '.join(UPDATABLE_FIELDS)}",
            )
        new = old
        if "name" in paths:
            new = replace(new, name=validate_name(given.name))
        if "description" in paths:
            new = replace(new, description=validate_description(given.description))
        if "chunking" in paths:
            new = replace(
                new,
                chunking=resolve_chunking(
                    _strategy(given.chunking),
                    given.chunking.chunk_size,
                    given.chunking.chunk_overlap,
                ),
            )
        if "labels" in paths:
            new = replace(new, labels=validate_labels(dict(given.labels)))
        new = replace(new, update_time_ms=int(time.time() * 1000))
        stored = await self._kbs.update(old, new)
        return await self._to_proto(stored)

    async def DeleteKnowledgeBase(
        self, request: kn.DeleteKnowledgeBaseRequest, context: Context
    ) -> kn.DeleteKnowledgeBaseResponse:
        kb_id = _require_kb_id(request.knowledge_base_id)
        if len(request.request_id) > 128:
            raise InvalidArgument("INVALID_REQUEST_ID", "request_id is at most 128 characters")
        earlier = await self._kbs.deleted_by_request(kb_id, request.request_id)
        if earlier is not None:
            return kn.DeleteKnowledgeBaseResponse(**json.loads(earlier))
        index = self._require_index()
        kb = await self._kbs.get(kb_id)
        if kb is None and (not is_id(kb_id) or await self._kbs.exists(kb_id)):
            await self._kbs.require(kb_id)  # NOT_FOUND, like every other RPC
        if kb is not None:
            # The record goes first: from here on uploads get NOT_FOUND (the Task
            # Manager's create script checks it atomically), so the documents and
            # tasks read below are all there will ever be.
            await self._kbs.delete(kb)
        document_ids = await self._documents.ids(kb_id)
        if kb is None and document_ids and not await self._documents.owned(document_ids[0]):
            await self._kbs.require(kb_id)  # the rest of another tenant's deletion
        if kb is None and not document_ids and not await index.count_chunks(kb_id):
            # Nothing left of it: unknown, or fully deleted by an earlier call.
            await self._kbs.require(kb_id)
        cancelled = await self._cancel_all(
            await self._kbs.active_task_ids(kb_id), "knowledge base deleted"
        )
        deleted = 0
        # In bulk: a page of records, their objects in one DeleteObjects request,
        # the records in one round trip. A failure part way leaves the rest listed
        # under the knowledge base id, so a retry finishes the job.
        for start in range(0, len(document_ids), _DELETE_PAGE):
            documents = await self._documents.load(document_ids[start : start + _DELETE_PAGE])
            documents = [d for d in documents if d.knowledge_base_id == kb_id]
            if self._objects is not None:
                await self._objects.delete_many([d.object_key for d in documents])
            await self._documents.delete_many(kb_id, documents)
            deleted += len(documents)
        await index.delete_knowledge_base(kb_id)
        await self._kbs.forget_documents(kb_id)
        outcome = {"deleted_document_count": deleted, "cancelled_task_count": cancelled}
        await self._kbs.remember_deletion(kb_id, request.request_id, json.dumps(outcome))
        log.info("knowledge base deleted", extra={"knowledge_base_id": kb_id, **outcome})
        return kn.DeleteKnowledgeBaseResponse(**outcome)

    async def _cancel(self, task_id: str, reason: str) -> bool:
        if self._tasks is None:
            raise FailedPrecondition(
                "TASK_MANAGER_NOT_CONFIGURED", "this service cannot reach the Task Manager"
            )
        return await self._tasks.cancel(task_id, reason)

    async def _cancel_all(self, task_ids: list[str], reason: str) -> int:
        """Cancels tasks through the Task Manager, a bounded number at a time;
        how many were still pending or running."""
        cancelled = 0
        for start in range(0, len(task_ids), _CANCELS_IN_FLIGHT):
            batch = task_ids[start : start + _CANCELS_IN_FLIGHT]
            done = await asyncio.gather(*(self._cancel(t, reason) for t in batch))
            cancelled += sum(done)
        return cancelled

    async def ListDocuments(
        self, request: kn.ListDocumentsRequest, context: Context
    ) -> kn.ListDocumentsResponse:
        kb = await self._kbs.require(_require_kb_id(request.knowledge_base_id))
        if request.page_size < 0:
            raise InvalidArgument("INVALID_PAGE_SIZE", "page_size must not be negative")
        state = enum_name(kn.Document.State, request.state, "STATE_")
        page = await self._documents.list(kb.id, state, request.page_size, request.page_token)
        return kn.ListDocumentsResponse(
            documents=await converted(page.documents, document_to_proto),
            next_page_token=page.next_page_token,
        )

    async def GetDocument(self, request: kn.GetDocumentRequest, context: Context) -> kn.Document:
        kb = await self._kbs.require(_require_kb_id(request.knowledge_base_id))
        if not request.document_id:
            raise InvalidArgument("MISSING_DOCUMENT_ID", "document_id is required")
        document_id = request.document_id[:64]
        document = await self._documents.get(kb.id, document_id)
        if document is None:
            raise NotFound(
                "DOCUMENT_NOT_FOUND",
                f"document {document_id!r} is not in knowledge base {kb.id!r}",
                metadata={"document_id": document_id, "knowledge_base_id": kb.id},
            )
        return document_to_proto(document)

    async def DeleteDocument(
        self, request: kn.DeleteDocumentRequest, context: Context
    ) -> kn.DeleteDocumentResponse:
        kb_id = _require_kb_id(request.knowledge_base_id)
        document_id = _require_document_id(request.document_id)
        if len(request.request_id) > 128:
            raise InvalidArgument("INVALID_REQUEST_ID", "request_id is at most 128 characters")
        earlier = await self._documents.deleted_by_request(document_id, request.request_id)
        if earlier is not None:
            return kn.DeleteDocumentResponse(deleted_chunk_count=int(earlier or 0))
        index = self._require_index()
        kb = await self._kbs.require(kb_id)
        document = await self._documents.get(kb.id, document_id)
        if document is None:
            raise _document_not_found(kb.id, document_id)
        # Flag, then cancel, so a worker does not index the document again after
        # its chunks are gone: a run already past its last progress report still
        # writes, but checks the flag after writing and removes its own chunks
        # (services/knowledge/ingest/pipeline.py).
        await self._documents.mark_deleting(document)
        if document.state in _ACTIVE_STATES:
            await self._cancel(document.task_id, "document deleted")
        deleted = await index.delete_document(kb.id, document.id)
        if self._objects is not None:
            await self._objects.delete(document.object_key)
        # Records last: a failure above leaves the document listed, so the
        # caller's retry finishes the job.
        await self._documents.delete(document, request.request_id, str(deleted))
        return kn.DeleteDocumentResponse(deleted_chunk_count=deleted)

    async def ReindexDocument(
        self, request: kn.ReindexDocumentRequest, context: Context
    ) -> kn.ReindexDocumentResponse:
        kb_id = _require_kb_id(request.knowledge_base_id)
        document_id = _require_document_id(request.document_id)
        if len(request.request_id) > 128:
            raise InvalidArgument("INVALID_REQUEST_ID", "request_id is at most 128 characters")
        if self._queue is None:
            raise FailedPrecondition(
                "TASK_MANAGER_NOT_CONFIGURED", "this service cannot reach the Task Manager"
            )
        kb = await self._kbs.require(kb_id)
        if await self._documents.get(kb.id, document_id) is None:
            raise _document_not_found(kb.id, document_id)
        # The Task Manager checks again, atomically (the document may go, or another
        # run start, in between), and answers NOT_FOUND / DOCUMENT_TASK_ACTIVE itself.
        task = await self._queue.enqueue(
            kb.id,
            document_id,
            request.chunking if request.HasField("chunking") else None,
            request.request_id,
            authorization=_authorization(context),
        )
        document = await self._documents.get(kb.id, document_id)
        if document is None:  # deleted right after the task was queued
            raise _document_not_found(kb.id, document_id)
        log.info(
            "document re-index queued",
            extra={"knowledge_base_id": kb.id, "document_id": document_id, "task_id": task.id},
        )
        return kn.ReindexDocumentResponse(task_id=task.id, document=document_to_proto(document))

    async def ListChunks(
        self, request: kn.ListChunksRequest, context: Context
    ) -> kn.ListChunksResponse:
        kb = await self._kbs.require(_require_kb_id(request.knowledge_base_id))
        document_id = _require_document_id(request.document_id)
        if request.page_size < 0:
            raise InvalidArgument("INVALID_PAGE_SIZE", "page_size must not be negative")
        size = min(request.page_size or DEFAULT_CHUNK_PAGE, MAX_CHUNK_PAGE)
        start = _parse_chunk_token(document_id, request.page_token) if request.page_token else 0
        if await self._documents.get(kb.id, document_id) is None:
            raise _document_not_found(kb.id, document_id)
        # One more than the page: its presence says whether there is a next page.
        chunks = await self._require_index().list_chunks(kb.id, document_id, start, size + 1)
        page = [c for c in chunks if c.chunk_index < start + size]
        more = len(page) < len(chunks)
        return kn.ListChunksResponse(
            chunks=[
                kn.Chunk(
                    id=c.id,
                    document_id=c.document_id,
                    text=c.text,
                    position=_position(c),
                    token_count=c.token_count,
                )
                for c in page
            ],
            next_page_token=_chunk_token(document_id, start + size) if more else "",
        )

    async def Search(self, request: kn.SearchRequest, context: Context) -> kn.SearchResponse:
        kb_id = _require_kb_id(request.knowledge_base_id)
        if request.mode not in _SEARCH_MODES:
            raise InvalidArgument("INVALID_MODE", f"unknown search mode {request.mode}")
        given = request.filter
        query = validate_search(
            request.query,
            _SEARCH_MODES[request.mode],
            request.top_k,
            request.score_threshold,
            list(given.document_ids),
            list(given.filenames),
            list(given.content_types),
            dict(given.metadata),
        )
        kb = await self._kbs.require(kb_id)
        index = self._require_index()
        vector: list[float] | None = None
        if query.mode != "keyword":
            vector = await self._queries.embed(kb, query.text)
        hits = await index.search(kb.id, query.mode, query.text, vector, query.top_k, query.filters)
        return kn.SearchResponse(
            results=[_result(h) for h in hits if h.score >= query.score_threshold],
            mode=_MODE_ENUM[query.mode],
        )
