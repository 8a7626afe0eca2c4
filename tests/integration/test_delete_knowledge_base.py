"""DeleteKnowledgeBase in bulk, on the real services: more documents than one
bulk step holds (1,000), all with pending tasks; everything goes and uploads
afterwards are refused."""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest
from redis.asyncio import Redis

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.common import redis_keys
from services.common.settings import DEFAULT_TENANT
from services.task_manager.domain.upload import object_prefix
from tests.conftest import Stack
from tests.support import error_info, upload_messages

pytestmark = pytest.mark.integration

DOCUMENTS = 1030


async def test_delete_knowledge_base_in_bulk(stack: Stack) -> None:
    async with (
        grpc.aio.insecure_channel(stack.tm_address) as tm_channel,
        grpc.aio.insecure_channel(stack.ks_address) as ks_channel,
    ):
        tasks = tm_grpc.TaskManagerServiceStub(tm_channel)
        knowledge = kn_grpc.KnowledgeServiceStub(ks_channel)
        kb = await knowledge.CreateKnowledgeBase(
            kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name=os.urandom(5).hex()))
        )
        limit = asyncio.Semaphore(16)

        async def upload(i: int) -> tm.UploadResponse:
            async with limit:
                return await tasks.Upload(
                    upload_messages(
                        f"document number {i}".encode(),
                        knowledge_base_id=kb.id,
                        filename=f"{i}.txt",
                    )
                )

        answers = await asyncio.gather(*(upload(i) for i in range(DOCUMENTS)))
        s3 = stack.s3.boto3_client()
        prefix = object_prefix(DEFAULT_TENANT, kb.id)

        def stored() -> int:
            count, token = 0, None
            while True:
                extra: dict[str, str] = {"ContinuationToken": token} if token else {}
                page = s3.list_objects_v2(Bucket=stack.s3.bucket, Prefix=prefix, **extra)
                count += int(page.get("KeyCount", 0))
                token = page.get("NextContinuationToken")
                if not token:
                    return count

        assert await asyncio.to_thread(stored) == DOCUMENTS

        deleted = await knowledge.DeleteKnowledgeBase(
            kn.DeleteKnowledgeBaseRequest(knowledge_base_id=kb.id)
        )
        assert (deleted.deleted_document_count, deleted.cancelled_task_count) == (
            DOCUMENTS,
            DOCUMENTS,
        )
        assert await asyncio.to_thread(stored) == 0
        for answer in (answers[0], answers[999], answers[-1]):
            task = await tasks.GetTask(tm.GetTaskRequest(task_id=answer.task_id))
            assert task.state == tm.Task.STATE_CANCELLED
        pending = await tasks.ListTasks(
            tm.ListTasksRequest(knowledge_base_id=kb.id, state=tm.Task.STATE_PENDING)
        )
        assert list(pending.tasks) == []
        redis = Redis.from_url(stack.redis_url)
        try:
            assert not await redis.exists(redis_keys.kb_documents(kb.id))
            assert not any(
                [await redis.exists(redis_keys.document(a.document_id)) for a in answers]
            )
        finally:
            await redis.aclose()
        for call in (
            tasks.Upload(upload_messages(b"late", knowledge_base_id=kb.id, filename="late.txt")),
            knowledge.ListDocuments(kn.ListDocumentsRequest(knowledge_base_id=kb.id)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert error_info(caught.value).reason == "KNOWLEDGE_BASE_NOT_FOUND"
