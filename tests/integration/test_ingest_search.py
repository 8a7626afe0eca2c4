"""Upload → SUCCEEDED → searchable, on the real pipeline, model and index.

Every supported format is uploaded through the Task Manager; the Knowledge
Service's own worker ingests it (as `make up` runs it); then a question whose
answer is in exactly one document finds that document first."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from tests import documents
from tests.conftest import ServiceFactory, Stack
from tests.support import upload_messages

pytestmark = pytest.mark.integration

# (file name, bytes, a question answered only by that file, words of its answer)
CORPUS = [
    ("handbook.docx", documents.docx(), "how many days of paid vacation do I get", "25 days"),
    (
        "report.pdf",
        documents.pdf([("Intro", "Kbmesh indexes documents."), ("Billing", "Invoices are due.")]),
        "when do invoices have to be paid",
        "Invoices",
    ),
    ("faq.html", documents.HTML, "how do I reset my password", "account"),
    ("guide.md", documents.MARKDOWN, "which command starts the stack", "make up"),
    ("notes.txt", documents.TEXT, "shipping and delivery", "shipping"),
    ("catalog.csv", documents.csv_bytes(), "price of the red gadget", "Red gadget"),
]


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
        name="knowledge-ingesting",
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


async def succeeded(tasks: tm_grpc.TaskManagerServiceAsyncStub, task_id: str) -> tm.Task:
    for _ in range(900):
        task = await tasks.GetTask(tm.GetTaskRequest(task_id=task_id))
        if task.state in (tm.Task.STATE_SUCCEEDED, tm.Task.STATE_FAILED):
            break
        await asyncio.sleep(0.2)
    assert task.state == tm.Task.STATE_SUCCEEDED, task.error
    return task


async def test_uploaded_documents_are_searchable_and_deletable(mesh: Mesh) -> None:
    kb = await mesh.knowledge.CreateKnowledgeBase(
        kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name=os.urandom(5).hex()))
    )
    ids: dict[str, str] = {}
    for filename, data, _, _ in CORPUS:
        answer = await mesh.tasks.Upload(
            upload_messages(data, knowledge_base_id=kb.id, filename=filename)
        )
        ids[filename] = answer.document_id
        task = await succeeded(mesh.tasks, answer.task_id)
        assert task.result.chunk_count >= 1

    listed = await mesh.knowledge.ListDocuments(kn.ListDocumentsRequest(knowledge_base_id=kb.id))
    assert {d.state for d in listed.documents} == {kn.Document.STATE_SUCCEEDED}

    for mode in (kn.SearchRequest.MODE_HYBRID, kn.SearchRequest.MODE_VECTOR):
        for filename, _, question, words in CORPUS:
            found = await mesh.knowledge.Search(
                kn.SearchRequest(knowledge_base_id=kb.id, query=question, top_k=3, mode=mode)
            )
            best = found.results[0]
            assert (best.filename, best.document_id) == (filename, ids[filename]), (
                mode,
                question,
                [(r.filename, r.score) for r in found.results],
            )
            assert words in best.text

    # Re-running a document's ingestion replaces its chunks: no duplicates.
    chunks = await mesh.knowledge.ListChunks(
        kn.ListChunksRequest(knowledge_base_id=kb.id, document_id=ids["handbook.docx"])
    )
    assert [c.position.chunk_index for c in chunks.chunks] == list(range(len(chunks.chunks)))

    await mesh.knowledge.DeleteDocument(
        kn.DeleteDocumentRequest(knowledge_base_id=kb.id, document_id=ids["handbook.docx"])
    )
    after = await mesh.knowledge.Search(
        kn.SearchRequest(knowledge_base_id=kb.id, query=CORPUS[0][2], top_k=10)
    )
    assert "handbook.docx" not in {r.filename for r in after.results}
