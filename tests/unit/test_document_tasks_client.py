"""The Knowledge Service's client of DocumentTaskService: forwards the caller's
`authorization` header, and passes the Task Manager's errors on with their
reason. A small gRPC server in the test stands in for the Task Manager (the
real one: tests/integration/test_reindex.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from kbmesh.taskmanager.v1 import document_tasks_pb2 as dt
from kbmesh.taskmanager.v1 import document_tasks_pb2_grpc as dt_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from services.common.errors import Code, FailedPrecondition, KbmeshError, Unavailable
from services.common.status import ErrorTranslation
from services.knowledge.adapters.document_tasks import DocumentTasks


class FakeTaskManager(dt_grpc.DocumentTaskServiceServicer):
    def __init__(self) -> None:
        self.metadata: list[dict[str, Any]] = []
        self.refuse = False

    async def EnqueueDocumentTask(
        self, request: dt.EnqueueDocumentTaskRequest, context: Any
    ) -> dt.EnqueueDocumentTaskResponse:
        self.metadata.append(dict(context.invocation_metadata() or ()))
        if self.refuse:
            raise FailedPrecondition(
                "DOCUMENT_TASK_ACTIVE", "busy", metadata={"task_id": "t-running"}
            )
        return dt.EnqueueDocumentTaskResponse(
            task=tm.Task(id="t-new", document_id=request.document_id)
        )


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeTaskManager, str]]:
    servicer = FakeTaskManager()
    server = grpc.aio.server(interceptors=[ErrorTranslation("taskmanager.kbmesh")])
    dt_grpc.add_DocumentTaskServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_forwards_the_callers_authorization(fake: tuple[FakeTaskManager, str]) -> None:
    servicer, address = fake
    async with grpc.aio.insecure_channel(address) as channel:
        client = DocumentTasks(channel)
        task = await client.enqueue("kb", "doc", None, "", authorization="Bearer key-1")
        assert (task.id, task.document_id) == ("t-new", "doc")
        await client.enqueue("kb", "doc", None, "")
    assert servicer.metadata[0]["authorization"] == "Bearer key-1"
    assert "authorization" not in servicer.metadata[1]


async def test_passes_refusals_on_with_their_reason(fake: tuple[FakeTaskManager, str]) -> None:
    servicer, address = fake
    servicer.refuse = True
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(KbmeshError) as caught:
            await DocumentTasks(channel).enqueue("kb", "doc", None, "")
    assert caught.value.code == Code.FAILED_PRECONDITION
    assert caught.value.reason == "DOCUMENT_TASK_ACTIVE"
    assert caught.value.metadata == {"task_id": "t-running"}


async def test_an_unreachable_task_manager_is_unavailable() -> None:
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(Unavailable) as caught:
            await DocumentTasks(channel, timeout_seconds=2).enqueue("kb", "doc", None, "")
    assert caught.value.reason == "TASK_MANAGER_UNAVAILABLE"
