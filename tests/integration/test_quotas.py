"""Per-tenant quotas: uploads per minute and stored bytes (RESOURCE_EXHAUSTED).

A Task Manager and a Knowledge Service with auth on and small quotas, on a
Redis of their own; each tenant's quota is its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from redis.asyncio import Redis

from devstack.servers import RedisServer
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.common import redis_keys
from services.common.errors import ResourceExhausted
from services.common.ids import new_id
from services.task_manager.adapters.redis_quotas import QuotaLimits, RedisQuotas
from tests.conftest import RedisFactory, ServiceFactory, issue_key
from tests.support import error_info, retry_delay_seconds, upload_messages

pytestmark = pytest.mark.integration
RATE = 5
STORAGE = 1000


@dataclass
class Mesh:
    redis_url: str
    knowledge: kn_grpc.KnowledgeServiceAsyncStub
    tasks: tm_grpc.TaskManagerServiceAsyncStub


@pytest.fixture
async def mesh(start_redis: RedisFactory, start_service: ServiceFactory) -> AsyncIterator[Mesh]:
    redis = start_redis()
    quotas = {
        "KBMESH_TASK_MANAGER_UPLOADS__TENANT_UPLOADS_PER_MINUTE": str(RATE),
        "KBMESH_TASK_MANAGER_UPLOADS__TENANT_STORAGE_BYTES": str(STORAGE),
    }
    task_manager = start_service("task_manager", redis_url=redis.url, env=quotas, auth=True)
    knowledge = start_service(
        "knowledge", redis_url=redis.url, task_manager_address=task_manager.address, auth=True
    )
    async with (
        grpc.aio.insecure_channel(knowledge.address) as ks,
        grpc.aio.insecure_channel(task_manager.address) as tms,
    ):
        yield Mesh(redis.url, kn_grpc.KnowledgeServiceStub(ks), tm_grpc.TaskManagerServiceStub(tms))


async def tenant_kb(mesh: Mesh, tenant: str) -> tuple[tuple[tuple[str, str], ...], str]:
    key = issue_key(mesh.redis_url, tenant)
    metadata = (("authorization", f"Bearer {key}"),)
    kb = await mesh.knowledge.CreateKnowledgeBase(
        kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name=f"{tenant}-kb")),
        metadata=metadata,
    )
    return metadata, kb.id


async def test_uploads_per_minute_are_limited_per_tenant(mesh: Mesh) -> None:
    # All uploads of one tenant within one minute of the clock.
    if time.time() % 60 > 45:
        await asyncio.sleep(60 - time.time() % 60)
    busy, busy_kb = await tenant_kb(mesh, "busy")
    calm, calm_kb = await tenant_kb(mesh, "calm")
    for n in range(RATE):
        await mesh.tasks.Upload(
            upload_messages(f"doc {n}".encode(), knowledge_base_id=busy_kb, filename=f"{n}.txt"),
            metadata=busy,
        )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await mesh.tasks.Upload(
            upload_messages(b"one too many", knowledge_base_id=busy_kb, filename="x.txt"),
            metadata=busy,
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(refused.value).reason == "TENANT_UPLOAD_RATE_EXCEEDED"
    delay = retry_delay_seconds(refused.value)
    assert delay is not None
    assert 0 < delay <= 60
    listed = await mesh.tasks.ListTasks(
        tm.ListTasksRequest(knowledge_base_id=busy_kb), metadata=busy
    )
    assert len(listed.tasks) == RATE  # the refused one left nothing
    # Another tenant is not affected.
    await mesh.tasks.Upload(
        upload_messages(b"calm", knowledge_base_id=calm_kb, filename="c.txt"), metadata=calm
    )


async def test_stored_bytes_are_limited_per_tenant_and_given_back_on_delete(mesh: Mesh) -> None:
    metadata, kb = await tenant_kb(mesh, "hoarder")
    first = await mesh.tasks.Upload(
        upload_messages(b"a" * 600, knowledge_base_id=kb, filename="a.txt"), metadata=metadata
    )
    for declared in (0, 600):  # found while streaming, or refused from the header
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await mesh.tasks.Upload(
                upload_messages(
                    b"b" * 600,
                    knowledge_base_id=kb,
                    filename="b.txt",
                    declared_size_bytes=declared,
                ),
                metadata=metadata,
            )
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(refused.value).reason == "TENANT_STORAGE_QUOTA_EXCEEDED"
    documents = await mesh.knowledge.ListDocuments(
        kn.ListDocumentsRequest(knowledge_base_id=kb), metadata=metadata
    )
    assert [d.id for d in documents.documents] == [first.document_id]
    # Deleting the document gives its bytes back.
    await mesh.knowledge.DeleteDocument(
        kn.DeleteDocumentRequest(knowledge_base_id=kb, document_id=first.document_id),
        metadata=metadata,
    )
    again = await mesh.tasks.Upload(
        upload_messages(b"c" * 600, knowledge_base_id=kb, filename="c.txt"), metadata=metadata
    )
    assert again.task_id
    # So does deleting the whole knowledge base (its documents go in bulk).
    await mesh.knowledge.DeleteKnowledgeBase(
        kn.DeleteKnowledgeBaseRequest(knowledge_base_id=kb), metadata=metadata
    )
    other = await mesh.knowledge.CreateKnowledgeBase(
        kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name="hoarder-2")),
        metadata=metadata,
    )
    after = await mesh.tasks.Upload(
        upload_messages(b"d" * 600, knowledge_base_id=other.id, filename="d.txt"),
        metadata=metadata,
    )
    assert after.task_id


async def test_the_document_quota_counts_stored_documents(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    try:
        tenant = f"docs-{new_id()}"  # a fresh tenant on the shared Redis
        quotas = RedisQuotas(client, QuotaLimits(documents=2, storage_bytes=100))
        for size in (10, 20):  # what the task-creating script adds per document
            assert await quotas.admit(tenant, 0) is not None
            await client.hincrby(redis_keys.tenant_usage(tenant), "bytes", size)
            await client.hincrby(redis_keys.tenant_usage(tenant), "documents", 1)
        with pytest.raises(ResourceExhausted) as refused:
            await quotas.admit(tenant, 0)
        assert refused.value.reason == "TENANT_DOCUMENT_QUOTA_EXCEEDED"
        # Another tenant has its own count; bytes left are what the quota leaves.
        assert await quotas.admit(f"other-{tenant}", 0) == 100
    finally:
        await client.aclose()
