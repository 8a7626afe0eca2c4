"""gRPC servicer of the Knowledge Service.

RPCs that later work fills in answer UNIMPLEMENTED with reason NOT_IMPLEMENTED.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from services.common.ids import new_id
from services.knowledge.adapters.redis_documents import RedisDocuments
from services.knowledge.adapters.redis_kb_store import RedisKnowledgeBases
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

Context = grpc.aio.ServicerContext[Any, Any]

KNOWLEDGE_SERVICE = kn.DESCRIPTOR.services_by_name["KnowledgeService"].full_name


def _timestamp(ms: int) -> Timestamp:
    ts = Timestamp()
    ts.FromMilliseconds(ms)
    return ts


def _strategy(config: kn.ChunkingConfig) -> str:
    name = kn.ChunkingConfig.Strategy.Name(config.strategy).removeprefix("STRATEGY_")
    return "" if name == "UNSPECIFIED" else name


def kb_to_proto(kb: KnowledgeBase, document_count: int = 0) -> kn.KnowledgeBase:
    return kn.KnowledgeBase(
        id=kb.id,
        name=kb.name,
        description=kb.description,
        chunking=kn.ChunkingConfig(
            strategy=kn.ChunkingConfig.Strategy.Value(f"STRATEGY_{kb.chunking.strategy}"),
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
        create_time=_timestamp(kb.create_time_ms),
        update_time=_timestamp(kb.update_time_ms),
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
        state=kn.Document.State.Value(f"STATE_{document.state}"),
        stage=kn.Stage.Value(f"STAGE_{document.stage or 'UNSPECIFIED'}"),
        progress=document.progress,
        task_id=document.task_id,
        chunk_count=document.chunk_count,
        page_count=document.page_count,
        metadata=document.metadata,
        create_time=_timestamp(document.create_time_ms),
        update_time=_timestamp(document.update_time_ms),
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


class KnowledgeApi(kn_grpc.KnowledgeServiceServicer):
    def __init__(self, knowledge_bases: RedisKnowledgeBases, documents: RedisDocuments) -> None:
        self._kbs = knowledge_bases
        self._documents = documents

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
        raise Unimplemented("DeleteKnowledgeBase")

    async def ListDocuments(
        self, request: kn.ListDocumentsRequest, context: Context
    ) -> kn.ListDocumentsResponse:
        kb = await self._kbs.require(_require_kb_id(request.knowledge_base_id))
        if request.page_size < 0:
            raise InvalidArgument("INVALID_PAGE_SIZE", "page_size must not be negative")
        state = kn.Document.State.Name(request.state).removeprefix("STATE_")
        page = await self._documents.list(
            kb.id, "" if state == "UNSPECIFIED" else state, request.page_size, request.page_token
        )
        return kn.ListDocumentsResponse(
            documents=[document_to_proto(d) for d in page.documents],
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
        raise Unimplemented("DeleteDocument")

    async def ReindexDocument(
        self, request: kn.ReindexDocumentRequest, context: Context
    ) -> kn.ReindexDocumentResponse:
        raise Unimplemented("ReindexDocument")

    async def ListChunks(
        self, request: kn.ListChunksRequest, context: Context
    ) -> kn.ListChunksResponse:
        raise Unimplemented("ListChunks")

    async def Search(self, request: kn.SearchRequest, context: Context) -> kn.SearchResponse:
        raise Unimplemented("Search")
