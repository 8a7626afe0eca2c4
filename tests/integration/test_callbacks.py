"""Callbacks: a signed POST on a terminal state, retried, recorded on the task."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from aiohttp import web

from devstack.servers import SeaweedServer, find_free_port
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.task_manager.domain.callbacks import SIGNATURE_HEADER, verify
from tests.conftest import RedisFactory, ServiceFactory
from tests.support import error_info, upload_messages

pytestmark = pytest.mark.integration
SECRET = b"callback-test-secret"


@dataclass
class Receiver:
    url: str
    statuses: list[int]
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    port = find_free_port()
    state = Receiver(url=f"http://127.0.0.1:{port}/hooks/", statuses=[500, 200])

    async def hook(request: web.Request) -> web.Response:
        state.received.append((dict(request.headers), await request.read()))
        state.arrived.set()
        status = state.statuses.pop(0) if state.statuses else 200
        return web.Response(status=status)

    app = web.Application()
    app.router.add_post("/hooks/{name}", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield state
    await runner.cleanup()


async def test_terminal_task_is_posted_signed_retried_and_recorded(
    s3_server: SeaweedServer,
    start_redis: RedisFactory,
    start_service: ServiceFactory,
    receiver: Receiver,
) -> None:
    # A Redis of its own: every Task Manager on a Redis sends callbacks, and all
    # replicas of one deployment share one allow-list, unlike the other tests' ones.
    redis = start_redis()
    task_manager = start_service(
        "task_manager",
        redis_url=redis.url,
        s3=s3_server.s3,
        name="tm-callbacks",
        env={
            "KBMESH_TASK_MANAGER_UPLOADS__CALLBACK_ALLOW_LIST": json.dumps([receiver.url]),
            "KBMESH_TASK_MANAGER_CALLBACKS__SECRET": SECRET.decode(),
            "KBMESH_TASK_MANAGER_CALLBACKS__BACKOFF_BASE_SECONDS": "0.2",
            "KBMESH_TASK_MANAGER_CALLBACKS__POLL_INTERVAL_SECONDS": "0.1",
        },
    )
    knowledge = start_service(
        "knowledge",
        redis_url=redis.url,
        s3=s3_server.s3,
        name="ks-callbacks",
        task_manager_address=task_manager.address,
    )
    async with (
        grpc.aio.insecure_channel(knowledge.address) as ks_channel,
        grpc.aio.insecure_channel(task_manager.address) as tm_channel,
    ):
        kb = await kn_grpc.KnowledgeServiceStub(ks_channel).CreateKnowledgeBase(
            kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name="callbacks"))
        )
        tasks = tm_grpc.TaskManagerServiceStub(tm_channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await tasks.Upload(
                upload_messages(
                    b"x",
                    knowledge_base_id=kb.id,
                    filename="a.txt",
                    callback_url="http://127.0.0.1:1/elsewhere",
                )
            )
        assert error_info(caught.value).reason == "CALLBACK_URL_NOT_ALLOWED"

        answer = await tasks.Upload(
            upload_messages(
                b"call me back",
                knowledge_base_id=kb.id,
                filename="a.txt",
                callback_url=receiver.url + "done",
            )
        )
        await tasks.CancelTask(tm.CancelTaskRequest(task_id=answer.task_id))
        for _ in range(100):
            if len(receiver.received) >= 2:
                break
            await asyncio.sleep(0.1)
        assert len(receiver.received) == 2, "a 500 answer is retried"
        for headers, body in receiver.received:
            assert verify(SECRET, body, headers[SIGNATURE_HEADER])
            posted = json.loads(body)
            assert posted["id"] == answer.task_id
            assert posted["state"] == "STATE_CANCELLED"
        for _ in range(50):
            task = await tasks.GetTask(tm.GetTaskRequest(task_id=answer.task_id))
            if len(task.callback_attempts) == 2:
                break
            await asyncio.sleep(0.1)
        assert [a.http_status for a in task.callback_attempts] == [500, 200]
        assert [a.delivered for a in task.callback_attempts] == [False, True]
        await asyncio.sleep(0.5)
        assert len(receiver.received) == 2, "nothing more after a delivery"
