"""Knowledge Service on real Redis: knowledge bases and documents."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from tests.conftest import Stack
from tests.support import error_info, upload_messages

pytestmark = pytest.mark.integration


@pytest.fixture
async def knowledge(stack: Stack) -> AsyncIterator[kn_grpc.KnowledgeServiceAsyncStub]:
    async with grpc.aio.insecure_channel(stack.ks_address) as channel:
        yield kn_grpc.KnowledgeServiceStub(channel)


@pytest.fixture
async def tasks(stack: Stack) -> AsyncIterator[tm_grpc.TaskManagerServiceAsyncStub]:
    async with grpc.aio.insecure_channel(stack.tm_address) as channel:
        yield tm_grpc.TaskManagerServiceStub(channel)


def name() -> str:
    return f"kb-{os.urandom(4).hex()}"


async def create(
    knowledge: kn_grpc.KnowledgeServiceAsyncStub, **fields: object
) -> kn.KnowledgeBase:
    return await knowledge.CreateKnowledgeBase(
        kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(**fields))  # type: ignore[arg-type]
    )


async def expect_error(call: object, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code
    assert error_info(caught.value).reason == reason


async def test_create_fills_defaults_and_names_are_unique(
    knowledge: kn_grpc.KnowledgeServiceAsyncStub,
) -> None:
    kb = await create(knowledge, name=name(), description="docs")
    assert len(kb.id) == 26
    assert kb.chunking.strategy == kn.ChunkingConfig.STRATEGY_SENTENCE
    assert (kb.chunking.chunk_size, kb.chunking.chunk_overlap) == (512, 64)
    assert (kb.embedding.provider, kb.embedding.model, kb.embedding.dimensions) == (
        "local",
        "all-MiniLM-L6-v2",
        384,
    )
    assert kb.create_time.ToMilliseconds() > 0
    await expect_error(
        create(knowledge, name=kb.name), grpc.StatusCode.ALREADY_EXISTS, "KNOWLEDGE_BASE_EXISTS"
    )


async def test_create_is_idempotent_with_a_request_id(
    knowledge: kn_grpc.KnowledgeServiceAsyncStub,
) -> None:
    request = kn.CreateKnowledgeBaseRequest(
        knowledge_base=kn.KnowledgeBase(name=name()), request_id=os.urandom(8).hex()
    )
    first = await knowledge.CreateKnowledgeBase(request)
    again = await knowledge.CreateKnowledgeBase(request)
    assert again.id == first.id


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"name": ""}, "MISSING_NAME"),
        ({"name": "x" * 201}, "INVALID_NAME"),
        ({"name": "a", "description": "d" * 2001}, "INVALID_DESCRIPTION"),
        ({"name": "a", "chunking": kn.ChunkingConfig(chunk_size=10)}, "INVALID_CHUNKING"),
        ({"name": "a", "labels": {"Bad Key": "v"}}, "INVALID_LABELS"),
        ({"name": "a", "embedding": kn.EmbeddingConfig(provider="nope")}, "INVALID_EMBEDDING"),
    ],
)
async def test_invalid_knowledge_bases_are_refused(
    knowledge: kn_grpc.KnowledgeServiceAsyncStub, fields: dict[str, object], reason: str
) -> None:
    await expect_error(create(knowledge, **fields), grpc.StatusCode.INVALID_ARGUMENT, reason)


async def test_update_get_and_list(knowledge: kn_grpc.KnowledgeServiceAsyncStub) -> None:
    kb = await create(knowledge, name=name())
    updated = await knowledge.UpdateKnowledgeBase(
        kn.UpdateKnowledgeBaseRequest(
            knowledge_base=kn.KnowledgeBase(
                id=kb.id, description="new", chunking=kn.ChunkingConfig(chunk_size=256)
            ),
            update_mask=FieldMask(paths=["description", "chunking"]),
        )
    )
    assert (updated.description, updated.chunking.chunk_size, updated.name) == (
        "new",
        256,
        kb.name,
    )
    got = await knowledge.GetKnowledgeBase(kn.GetKnowledgeBaseRequest(knowledge_base_id=kb.id))
    assert got.description == "new"
    await expect_error(
        knowledge.UpdateKnowledgeBase(
            kn.UpdateKnowledgeBaseRequest(
                knowledge_base=kn.KnowledgeBase(
                    id=kb.id, embedding=kn.EmbeddingConfig(provider="openai", model="m")
                )
            )
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "EMBEDDING_IMMUTABLE",
    )
    # Pages are newest first and cover everything exactly once.
    created = [(await create(knowledge, name=name())).id for _ in range(5)]
    seen: list[str] = []
    token = ""
    while True:
        page = await knowledge.ListKnowledgeBases(
            kn.ListKnowledgeBasesRequest(page_size=2, page_token=token)
        )
        seen += [k.id for k in page.knowledge_bases]
        token = page.next_page_token
        if not token:
            break
    assert seen[:5] == list(reversed(created))
    assert len(seen) == len(set(seen))
    await expect_error(
        knowledge.GetKnowledgeBase(kn.GetKnowledgeBaseRequest(knowledge_base_id="missing")),
        grpc.StatusCode.NOT_FOUND,
        "KNOWLEDGE_BASE_NOT_FOUND",
    )


async def test_documents_are_listed_from_the_moment_the_upload_is_acknowledged(
    knowledge: kn_grpc.KnowledgeServiceAsyncStub, tasks: tm_grpc.TaskManagerServiceAsyncStub
) -> None:
    kb = await create(knowledge, name=name())
    other = await create(knowledge, name=name())
    uploaded = []
    for i in range(3):
        answer = await tasks.Upload(
            upload_messages(
                f"document number {i}".encode(),
                knowledge_base_id=kb.id,
                filename=f"doc{i}.md",
                metadata={"team": "docs"},
            )
        )
        uploaded.append(answer)
    first = await knowledge.ListDocuments(
        kn.ListDocumentsRequest(knowledge_base_id=kb.id, page_size=2)
    )
    rest = await knowledge.ListDocuments(
        kn.ListDocumentsRequest(knowledge_base_id=kb.id, page_token=first.next_page_token)
    )
    listed = [*first.documents, *rest.documents]
    assert [d.id for d in listed] == [a.document_id for a in reversed(uploaded)]
    assert rest.next_page_token == ""
    newest = listed[0]
    assert newest.filename == "doc2.md"
    assert newest.content_type == "text/markdown"
    assert newest.state == kn.Document.STATE_PENDING
    assert newest.task_id == uploaded[2].task_id
    assert dict(newest.metadata) == {"team": "docs"}
    kb_after = await knowledge.GetKnowledgeBase(kn.GetKnowledgeBaseRequest(knowledge_base_id=kb.id))
    assert kb_after.document_count == 3

    await tasks.CancelTask(tm.CancelTaskRequest(task_id=uploaded[0].task_id))
    doc = await knowledge.GetDocument(
        kn.GetDocumentRequest(knowledge_base_id=kb.id, document_id=uploaded[0].document_id)
    )
    assert doc.state == kn.Document.STATE_CANCELLED
    cancelled = await knowledge.ListDocuments(
        kn.ListDocumentsRequest(knowledge_base_id=kb.id, state=kn.Document.STATE_CANCELLED)
    )
    assert [d.id for d in cancelled.documents] == [uploaded[0].document_id]

    await expect_error(
        knowledge.GetDocument(
            kn.GetDocumentRequest(knowledge_base_id=other.id, document_id=doc.id)
        ),
        grpc.StatusCode.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
    )
    await expect_error(
        knowledge.ListDocuments(
            kn.ListDocumentsRequest(knowledge_base_id=other.id, page_token=first.next_page_token)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )
