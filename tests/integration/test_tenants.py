"""Tenant isolation: another tenant's resources behave as if they did not exist.

Tenant A creates a knowledge base and uploads into it (the task stays PENDING:
no worker runs); tenant B, with its own valid key, cannot get, list, watch,
search, cancel, retry, delete or upload into any of it, over gRPC and through
Envoy's REST routes, and every refusal is the NOT_FOUND a missing resource gets.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import boto3
import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from redis.asyncio import Redis

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import document_tasks_pb2 as dt
from kbmesh.taskmanager.v1 import document_tasks_pb2_grpc as dt_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.common import redis_keys
from tests.conftest import Stack
from tests.support import error_info, upload_messages

pytestmark = pytest.mark.integration
_worlds = itertools.count(1)


@dataclass
class Tenant:
    name: str
    metadata: tuple[tuple[str, str], ...]
    kb: kn_grpc.KnowledgeServiceAsyncStub
    tasks: tm_grpc.TaskManagerServiceAsyncStub

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": self.metadata[0][1]}


@dataclass
class World:
    a: Tenant
    b: Tenant
    kb_id: str
    document_id: str
    task_id: str


@pytest.fixture
async def world(auth_stack: Stack) -> AsyncIterator[World]:
    channels = [
        grpc.aio.insecure_channel(auth_stack.ks_address),
        grpc.aio.insecure_channel(auth_stack.tm_address),
    ]
    try:
        tenants = []
        n = next(_worlds)
        for name in (f"tenant-a{n}", f"tenant-b{n}"):
            key = auth_stack.new_key(name)
            tenants.append(
                Tenant(
                    name,
                    (("authorization", f"Bearer {key}"),),
                    kn_grpc.KnowledgeServiceStub(channels[0]),
                    tm_grpc.TaskManagerServiceStub(channels[1]),
                )
            )
        a, b = tenants
        kb = await a.kb.CreateKnowledgeBase(
            kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name="secret plans")),
            metadata=a.metadata,
        )
        uploaded = await a.tasks.Upload(
            upload_messages(b"the merger closes in May", knowledge_base_id=kb.id, filename="m.txt"),
            metadata=a.metadata,
        )
        yield World(a, b, kb.id, uploaded.document_id, uploaded.task_id)
    finally:
        for channel in channels:
            await channel.close(None)


async def finish(call: Any) -> None:
    """Awaits a unary call or reads a stream to its end."""
    if hasattr(call, "__aiter__"):
        async for _ in call:
            pass
    else:
        await call


async def not_found(call: Any, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await finish(call)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value
    assert error_info(refused.value).reason == reason


async def test_another_tenants_knowledge_base_does_not_exist(world: World) -> None:
    a, b, kb = world.a, world.b, world.kb_id
    md = b.metadata
    reason = "KNOWLEDGE_BASE_NOT_FOUND"
    await not_found(
        b.kb.GetKnowledgeBase(kn.GetKnowledgeBaseRequest(knowledge_base_id=kb), metadata=md), reason
    )
    listed = await b.kb.ListKnowledgeBases(kn.ListKnowledgeBasesRequest(), metadata=md)
    assert kb not in {k.id for k in listed.knowledge_bases}
    await not_found(
        b.kb.ListDocuments(kn.ListDocumentsRequest(knowledge_base_id=kb), metadata=md), reason
    )
    await not_found(
        b.kb.GetDocument(
            kn.GetDocumentRequest(knowledge_base_id=kb, document_id=world.document_id), metadata=md
        ),
        reason,
    )
    await not_found(
        b.kb.ListChunks(
            kn.ListChunksRequest(knowledge_base_id=kb, document_id=world.document_id), metadata=md
        ),
        reason,
    )
    await not_found(
        b.kb.Search(kn.SearchRequest(knowledge_base_id=kb, query="merger"), metadata=md), reason
    )
    await not_found(
        b.kb.UpdateKnowledgeBase(
            kn.UpdateKnowledgeBaseRequest(
                knowledge_base=kn.KnowledgeBase(id=kb, description="mine now"),
                update_mask=FieldMask(paths=["description"]),
            ),
            metadata=md,
        ),
        reason,
    )
    await not_found(
        b.kb.DeleteDocument(
            kn.DeleteDocumentRequest(knowledge_base_id=kb, document_id=world.document_id),
            metadata=md,
        ),
        reason,
    )
    await not_found(
        b.kb.ReindexDocument(
            kn.ReindexDocumentRequest(knowledge_base_id=kb, document_id=world.document_id),
            metadata=md,
        ),
        reason,
    )
    await not_found(
        b.kb.DeleteKnowledgeBase(kn.DeleteKnowledgeBaseRequest(knowledge_base_id=kb), metadata=md),
        reason,
    )
    # Everything is still there for its owner.
    owned = await a.kb.GetKnowledgeBase(
        kn.GetKnowledgeBaseRequest(knowledge_base_id=kb), metadata=a.metadata
    )
    assert owned.description == ""
    documents = await a.kb.ListDocuments(
        kn.ListDocumentsRequest(knowledge_base_id=kb), metadata=a.metadata
    )
    assert [d.id for d in documents.documents] == [world.document_id]
    # Names are per tenant: B may use the same one, and gets its own.
    mine = await b.kb.CreateKnowledgeBase(
        kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name="secret plans")),
        metadata=md,
    )
    assert mine.id != kb


async def test_another_tenants_tasks_do_not_exist(world: World) -> None:
    a, b, task = world.a, world.b, world.task_id
    md = b.metadata
    reason = "TASK_NOT_FOUND"
    await not_found(b.tasks.GetTask(tm.GetTaskRequest(task_id=task), metadata=md), reason)
    await not_found(b.tasks.WatchTask(tm.WatchTaskRequest(task_id=task), metadata=md), reason)
    await not_found(b.tasks.CancelTask(tm.CancelTaskRequest(task_id=task), metadata=md), reason)
    await not_found(b.tasks.RetryTask(tm.RetryTaskRequest(task_id=task), metadata=md), reason)
    for request in (
        tm.ListTasksRequest(),
        tm.ListTasksRequest(knowledge_base_id=world.kb_id),
        tm.ListTasksRequest(state=tm.Task.STATE_PENDING),
    ):
        page = await b.tasks.ListTasks(request, metadata=md)
        assert task not in {t.id for t in page.tasks}
        assert page.next_page_token == ""
    # The owner sees it, still pending (B's cancel did nothing).
    own = await a.tasks.GetTask(tm.GetTaskRequest(task_id=task), metadata=a.metadata)
    assert own.state == tm.Task.STATE_PENDING
    listed = await a.tasks.ListTasks(tm.ListTasksRequest(), metadata=a.metadata)
    assert task in {t.id for t in listed.tasks}


async def test_another_tenant_cannot_queue_a_task_for_a_document(
    world: World, auth_stack: Stack
) -> None:
    """The Task Manager's internal DocumentTaskService (reachable as native
    gRPC through the gateway) checks the owner too."""
    async with grpc.aio.insecure_channel(auth_stack.tm_address) as channel:
        stub = dt_grpc.DocumentTaskServiceStub(channel)
        request = dt.EnqueueDocumentTaskRequest(
            knowledge_base_id=world.kb_id, document_id=world.document_id
        )
        await not_found(
            stub.EnqueueDocumentTask(request, metadata=world.b.metadata),
            "KNOWLEDGE_BASE_NOT_FOUND",
        )
        # Its owner is told the truth: the document's first task is still pending.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.EnqueueDocumentTask(request, metadata=world.a.metadata)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(refused.value).reason == "DOCUMENT_TASK_ACTIVE"


async def test_uploading_into_another_tenants_knowledge_base_stores_nothing(
    world: World, auth_stack: Stack
) -> None:
    client = Redis.from_url(auth_stack.redis_url)
    try:
        before = await client.zcard(redis_keys.kb_tasks(world.kb_id))
        await not_found(
            world.b.tasks.Upload(
                upload_messages(b"planted", knowledge_base_id=world.kb_id, filename="x.txt"),
                metadata=world.b.metadata,
            ),
            "KNOWLEDGE_BASE_NOT_FOUND",
        )
        assert await client.zcard(redis_keys.kb_tasks(world.kb_id)) == before
    finally:
        await client.aclose()


async def test_objects_are_stored_under_the_tenants_prefix(world: World, auth_stack: Stack) -> None:
    task = await world.a.tasks.GetTask(
        tm.GetTaskRequest(task_id=world.task_id), metadata=world.a.metadata
    )
    s3 = auth_stack.s3
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        region_name=s3.region,
    )
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=f"kb/{world.a.name}/{world.kb_id}/")
    assert [o["Key"] for o in listed.get("Contents", [])], task


async def test_through_envoy_another_tenants_resources_are_404(
    world: World, auth_stack: Stack
) -> None:
    kb, doc, task = world.kb_id, world.document_id, world.task_id
    async with aiohttp.ClientSession(base_url=auth_stack.envoy_http_url) as session:
        headers = world.b.headers
        for verb, path, body in (
            ("GET", f"/api/v1/knowledge-bases/{kb}", None),
            ("GET", f"/api/v1/knowledge-bases/{kb}/documents", None),
            ("GET", f"/api/v1/knowledge-bases/{kb}/documents/{doc}", None),
            ("POST", f"/api/v1/knowledge-bases/{kb}:search", b'{"query": "merger"}'),
            ("DELETE", f"/api/v1/knowledge-bases/{kb}/documents/{doc}", None),
            ("DELETE", f"/api/v1/knowledge-bases/{kb}", None),
            ("GET", f"/api/v1/tasks/{task}", None),
            ("GET", f"/api/v1/tasks/{task}:watch", None),
            ("POST", f"/api/v1/tasks/{task}:cancel", b"{}"),
            ("POST", f"/api/v1/knowledge-bases/{kb}/documents:upload?filename=x.txt", b"hi"),
        ):
            async with session.request(verb, path, data=body, headers=headers) as response:
                text = await response.text()
                assert response.status == 404, (verb, path, response.status, text)
        async with session.get("/api/v1/tasks", headers=headers) as response:
            assert response.status == 200
            assert task not in await response.text()
        async with session.get("/api/v1/knowledge-bases", headers=headers) as response:
            assert response.status == 200
            assert kb not in await response.text()
        # The owner still has everything.
        async with session.get(f"/api/v1/tasks/{task}", headers=world.a.headers) as response:
            assert response.status == 200


async def test_a_half_deleted_knowledge_base_stays_its_owners(
    world: World, auth_stack: Stack
) -> None:
    """A deletion that stopped after removing the record (its retry finishes the
    job) cannot be finished, or observed, by another tenant."""
    client = Redis.from_url(auth_stack.redis_url)
    try:  # what DeleteKnowledgeBase does first: the record goes
        await client.delete(redis_keys.knowledge_base(world.kb_id))
    finally:
        await client.aclose()
    request = kn.DeleteKnowledgeBaseRequest(knowledge_base_id=world.kb_id)
    await not_found(
        world.b.kb.DeleteKnowledgeBase(request, metadata=world.b.metadata),
        "KNOWLEDGE_BASE_NOT_FOUND",
    )
    done = await world.a.kb.DeleteKnowledgeBase(request, metadata=world.a.metadata)
    assert done.deleted_document_count == 1
