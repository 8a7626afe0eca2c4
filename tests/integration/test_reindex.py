"""Re-index, delete during ingestion and chunk counts, on the real services:
Task Manager, Knowledge Service with its own worker (the real pipeline and
model), Redis, SeaweedFS S3 and LanceDB."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import document_tasks_pb2 as dt
from kbmesh.taskmanager.v1 import document_tasks_pb2_grpc as dt_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from tests.conftest import ServiceFactory, Stack
from tests.support import error_info, upload_messages

pytestmark = pytest.mark.integration

TERMINAL = (tm.Task.STATE_SUCCEEDED, tm.Task.STATE_FAILED, tm.Task.STATE_CANCELLED)


def article(paragraphs: int, seed: str = "") -> bytes:
    """A text whose paragraphs are distinct, so every chunk is findable."""
    topics = ["billing", "shipping", "vacation", "security", "onboarding", "backups"]
    lines = [
        f"Paragraph {i} {seed}: the {topics[i % len(topics)]} policy says item {i} "
        f"must be reviewed by team {i % 7} every {i % 11 + 1} weeks before it ships."
        for i in range(paragraphs)
    ]
    return "\n\n".join(lines).encode()


@dataclass
class Mesh:
    tasks: tm_grpc.TaskManagerServiceAsyncStub
    knowledge: kn_grpc.KnowledgeServiceAsyncStub


@pytest.fixture
async def mesh(stack: Stack, start_service: ServiceFactory) -> AsyncIterator[Mesh]:
    knowledge = start_service(
        "knowledge",
        redis_url=stack.redis_url,
        s3=stack.s3,
        name="knowledge-reindex",
        task_manager_address=stack.tm_address,
        env={"KBMESH_KNOWLEDGE_WORKER__ENABLED": "true"},
    )
    async with (
        grpc.aio.insecure_channel(stack.tm_address) as tm_channel,
        grpc.aio.insecure_channel(knowledge.address) as ks_channel,
    ):
        yield Mesh(
            tm_grpc.TaskManagerServiceStub(tm_channel), kn_grpc.KnowledgeServiceStub(ks_channel)
        )


@pytest.fixture
async def idle(stack: Stack) -> AsyncIterator[Mesh]:
    """The stack's own services: no worker runs, so tasks stay PENDING."""
    async with (
        grpc.aio.insecure_channel(stack.tm_address) as tm_channel,
        grpc.aio.insecure_channel(stack.ks_address) as ks_channel,
    ):
        yield Mesh(
            tm_grpc.TaskManagerServiceStub(tm_channel), kn_grpc.KnowledgeServiceStub(ks_channel)
        )


async def finished(tasks: tm_grpc.TaskManagerServiceAsyncStub, task_id: str) -> tm.Task:
    for _ in range(1500):
        task = await tasks.GetTask(tm.GetTaskRequest(task_id=task_id))
        if task.state in TERMINAL:
            return task
        await asyncio.sleep(0.2)
    raise AssertionError(f"task {task_id} did not finish: {task}")


async def succeeded(tasks: tm_grpc.TaskManagerServiceAsyncStub, task_id: str) -> tm.Task:
    task = await finished(tasks, task_id)
    assert task.state == tm.Task.STATE_SUCCEEDED, task.error
    return task


async def new_kb(knowledge: kn_grpc.KnowledgeServiceAsyncStub) -> kn.KnowledgeBase:
    return await knowledge.CreateKnowledgeBase(
        kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name=os.urandom(5).hex()))
    )


async def all_chunks(mesh: Mesh, kb_id: str, document_id: str) -> list[kn.Chunk]:
    chunks: list[kn.Chunk] = []
    token = ""
    while True:
        page = await mesh.knowledge.ListChunks(
            kn.ListChunksRequest(
                knowledge_base_id=kb_id, document_id=document_id, page_size=1000, page_token=token
            )
        )
        chunks.extend(page.chunks)
        token = page.next_page_token
        if not token:
            return chunks


async def search(mesh: Mesh, kb_id: str, query: str, top_k: int = 10) -> list[tuple[str, str]]:
    found = await mesh.knowledge.Search(
        kn.SearchRequest(knowledge_base_id=kb_id, query=query, top_k=top_k)
    )
    return [(r.chunk_id, r.text) for r in found.results]


async def expect_error(call: object, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code, caught.value.details()
    assert error_info(caught.value).reason == reason


QUESTIONS = ["which team reviews the billing policy", "how often is shipping reviewed"]


async def test_reindex_replaces_chunks_and_a_new_chunking_leaves_no_old_ones(mesh: Mesh) -> None:
    kb = await new_kb(mesh.knowledge)
    answer = await mesh.tasks.Upload(
        upload_messages(article(60), knowledge_base_id=kb.id, filename="policies.txt")
    )
    first = await succeeded(mesh.tasks, answer.task_id)
    before = await all_chunks(mesh, kb.id, answer.document_id)
    assert len(before) == first.result.chunk_count > 1
    document = await mesh.knowledge.GetDocument(
        kn.GetDocumentRequest(knowledge_base_id=kb.id, document_id=answer.document_id)
    )
    assert document.chunk_count == len(before)
    results = [await search(mesh, kb.id, q) for q in QUESTIONS]

    # Same chunking: the same chunks, once each, and the same search results.
    request = kn.ReindexDocumentRequest(
        knowledge_base_id=kb.id, document_id=answer.document_id, request_id=os.urandom(6).hex()
    )
    queued = await mesh.knowledge.ReindexDocument(request)
    assert queued.task_id != answer.task_id
    assert queued.document.task_id == queued.task_id
    assert queued.document.state in (kn.Document.STATE_PENDING, kn.Document.STATE_RUNNING)
    # Until the new run has a result, the previous run's chunks are the searchable ones.
    assert queued.document.chunk_count == len(before)
    again = await mesh.knowledge.ReindexDocument(request)  # a retry: the same task
    assert again.task_id == queued.task_id
    second = await succeeded(mesh.tasks, queued.task_id)
    assert second.result.chunk_count == len(before)
    after = await all_chunks(mesh, kb.id, answer.document_id)
    assert [(c.id, c.text) for c in after] == [(c.id, c.text) for c in before]
    assert [await search(mesh, kb.id, q) for q in QUESTIONS] == results
    listed = await mesh.knowledge.ListDocuments(kn.ListDocumentsRequest(knowledge_base_id=kb.id))
    assert [(d.id, d.chunk_count, d.state) for d in listed.documents] == [
        (answer.document_id, len(before), kn.Document.STATE_SUCCEEDED)
    ]

    # Another chunking: new chunks replace every old one.
    small = kn.ChunkingConfig(
        strategy=kn.ChunkingConfig.STRATEGY_TOKEN, chunk_size=48, chunk_overlap=0
    )
    queued = await mesh.knowledge.ReindexDocument(
        kn.ReindexDocumentRequest(
            knowledge_base_id=kb.id, document_id=answer.document_id, chunking=small
        )
    )
    third = await succeeded(mesh.tasks, queued.task_id)
    rechunked = await all_chunks(mesh, kb.id, answer.document_id)
    assert len(rechunked) == third.result.chunk_count > len(before)
    assert [c.position.chunk_index for c in rechunked] == list(range(len(rechunked)))
    assert not {c.id for c in before} & {c.id for c in rechunked}
    assert all(c.token_count <= 48 for c in rechunked)
    everything = await mesh.knowledge.Search(
        kn.SearchRequest(
            knowledge_base_id=kb.id,
            query="policy",
            top_k=100,
            mode=kn.SearchRequest.MODE_KEYWORD,
        )
    )
    assert {r.chunk_id for r in everything.results} <= {c.id for c in rechunked}
    document = await mesh.knowledge.GetDocument(
        kn.GetDocumentRequest(knowledge_base_id=kb.id, document_id=answer.document_id)
    )
    assert (document.state, document.chunk_count) == (
        kn.Document.STATE_SUCCEEDED,
        len(rechunked),
    )


async def test_reindex_is_refused_while_a_run_is_pending_and_for_unknown_documents(
    idle: Mesh, stack: Stack
) -> None:
    kb = await new_kb(idle.knowledge)
    answer = await idle.tasks.Upload(
        upload_messages(article(3), knowledge_base_id=kb.id, filename="a.txt")
    )
    reindex = idle.knowledge.ReindexDocument
    await expect_error(
        reindex(kn.ReindexDocumentRequest(knowledge_base_id=kb.id, document_id=answer.document_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "DOCUMENT_TASK_ACTIVE",
    )
    await expect_error(
        reindex(kn.ReindexDocumentRequest(knowledge_base_id=kb.id, document_id="nope")),
        grpc.StatusCode.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
    )
    await expect_error(
        reindex(kn.ReindexDocumentRequest(knowledge_base_id="nope", document_id="nope")),
        grpc.StatusCode.NOT_FOUND,
        "KNOWLEDGE_BASE_NOT_FOUND",
    )
    other = await new_kb(idle.knowledge)
    await expect_error(
        reindex(
            kn.ReindexDocumentRequest(knowledge_base_id=other.id, document_id=answer.document_id)
        ),
        grpc.StatusCode.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
    )
    await idle.tasks.CancelTask(tm.CancelTaskRequest(task_id=answer.task_id))
    await expect_error(
        reindex(
            kn.ReindexDocumentRequest(
                knowledge_base_id=kb.id,
                document_id=answer.document_id,
                chunking=kn.ChunkingConfig(chunk_size=5),
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CHUNKING",
    )
    # Finished (cancelled): a new run is queued, and only one for concurrent calls.
    answers = await asyncio.gather(
        *(
            reindex(
                kn.ReindexDocumentRequest(knowledge_base_id=kb.id, document_id=answer.document_id)
            )
            for _ in range(4)
        ),
        return_exceptions=True,
    )
    queued = [a for a in answers if isinstance(a, kn.ReindexDocumentResponse)]
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(queued) == 1, answers
    assert {error_info(e).reason for e in refused} <= {"DOCUMENT_TASK_ACTIVE"}
    assert len(refused) == 3
    assert queued[0].document.state == kn.Document.STATE_PENDING
    task = await idle.tasks.GetTask(tm.GetTaskRequest(task_id=queued[0].task_id))
    assert (task.state, task.document_id, task.knowledge_base_id) == (
        tm.Task.STATE_PENDING,
        answer.document_id,
        kb.id,
    )
    listed = await idle.tasks.ListTasks(
        tm.ListTasksRequest(knowledge_base_id=kb.id, state=tm.Task.STATE_PENDING)
    )
    assert [t.id for t in listed.tasks] == [task.id]

    # A deleted document cannot be re-indexed, straight at the Task Manager either.
    await idle.knowledge.DeleteDocument(
        kn.DeleteDocumentRequest(knowledge_base_id=kb.id, document_id=answer.document_id)
    )
    async with grpc.aio.insecure_channel(stack.tm_address) as channel:
        await expect_error(
            dt_grpc.DocumentTaskServiceStub(channel).EnqueueDocumentTask(
                dt.EnqueueDocumentTaskRequest(
                    knowledge_base_id=kb.id, document_id=answer.document_id
                )
            ),
            grpc.StatusCode.NOT_FOUND,
            "DOCUMENT_NOT_FOUND",
        )


async def test_delete_while_running_leaves_no_chunks(mesh: Mesh) -> None:
    kb = await new_kb(mesh.knowledge)
    answer = await mesh.tasks.Upload(
        upload_messages(article(1500, "big"), knowledge_base_id=kb.id, filename="big.txt")
    )
    for _ in range(1500):
        task = await mesh.tasks.GetTask(tm.GetTaskRequest(task_id=answer.task_id))
        if task.state != tm.Task.STATE_PENDING:
            break
        await asyncio.sleep(0.05)
    assert task.state == tm.Task.STATE_RUNNING, task
    await mesh.knowledge.DeleteDocument(
        kn.DeleteDocumentRequest(knowledge_base_id=kb.id, document_id=answer.document_id)
    )
    ended = await finished(mesh.tasks, answer.task_id)
    assert ended.state in (tm.Task.STATE_CANCELLED, tm.Task.STATE_FAILED)
    await expect_error(
        mesh.knowledge.ListChunks(
            kn.ListChunksRequest(knowledge_base_id=kb.id, document_id=answer.document_id)
        ),
        grpc.StatusCode.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
    )
    found = await mesh.knowledge.Search(
        kn.SearchRequest(
            knowledge_base_id=kb.id,
            query="policy",
            top_k=50,
            mode=kn.SearchRequest.MODE_KEYWORD,
        )
    )
    assert list(found.results) == []
