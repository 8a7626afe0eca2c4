"""Both services as users run them: health, reflection, shutdown, bad config."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devstack.servers import ServiceKind, find_free_port
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from tests.conftest import ServiceFactory, Stack
from tests.support import next_event, upload_messages

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


async def listed_services(address: str, metadata: tuple[tuple[str, str], ...] = ()) -> set[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        call = stub.ServerReflectionInfo(iter([request]), metadata=metadata)
        names: set[str] = set()
        async for response in call:
            names.update(s.name for s in response.list_services_response.service)
        return names


async def health(address: str, service: str = "") -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
        return int(answer.status)


async def test_each_service_reports_serving_and_lists_its_own_services(stack: Stack) -> None:
    serving = health_pb2.HealthCheckResponse.SERVING
    assert await health(stack.tm_address) == serving
    assert await health(stack.tm_address, "kbmesh.taskmanager.v1.TaskManagerService") == serving
    assert await health(stack.ks_address, "kbmesh.knowledge.v1.KnowledgeService") == serving
    common = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert await listed_services(stack.tm_address) == common | {
        "kbmesh.taskmanager.v1.TaskManagerService",
        "kbmesh.taskmanager.v1.WorkerService",
        "kbmesh.taskmanager.v1.DocumentTaskService",
    }
    assert await listed_services(stack.ks_address) == common | {
        "kbmesh.knowledge.v1.KnowledgeService"
    }
    # Asked through the gateway (Envoy adds this header), the mesh is listed.
    gateway = (("x-kbmesh-reflection-scope", "gateway"),)
    assert "kbmesh.knowledge.v1.KnowledgeService" in await listed_services(
        stack.tm_address, gateway
    )


async def test_sigterm_drains_streams_and_exits_cleanly(
    stack: Stack, start_service: ServiceFactory
) -> None:
    from kbmesh.knowledge.v1 import knowledge_pb2 as kn
    from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc

    proc = start_service(
        "task_manager",
        redis_url=stack.redis_url,
        s3=stack.s3,
        name="tm-sigterm",
        env={"KBMESH_TASK_MANAGER_GRPC__SHUTDOWN_GRACE_SECONDS": "1"},
    )
    async with (
        grpc.aio.insecure_channel(stack.ks_address) as ks,
        grpc.aio.insecure_channel(proc.address) as channel,
    ):
        kb = await kn_grpc.KnowledgeServiceStub(ks).CreateKnowledgeBase(
            kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name=os.urandom(4).hex()))
        )
        stub = tm_grpc.TaskManagerServiceStub(channel)
        answer = await stub.Upload(upload_messages(b"x", knowledge_base_id=kb.id, filename="a"))
        watch = stub.WatchTask(tm.WatchTaskRequest(task_id=answer.task_id))
        assert await next_event(watch) is not None  # a long-lived stream is open
        started = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(next_event(watch), timeout=10)
    for _ in range(100):
        if proc.process.returncode is not None:
            break
        await asyncio.sleep(0.1)
    assert proc.process.returncode == 0
    assert time.monotonic() - started < 8
    log = proc.log_path.read_text()
    assert "signal received, shutting down" in log
    assert "stopped" in log


@pytest.mark.parametrize("kind", ["task_manager", "knowledge"])
def test_unreachable_redis_fails_fast_with_a_clear_message(kind: ServiceKind) -> None:
    prefix = "KBMESH_TASK_MANAGER_" if kind == "task_manager" else "KBMESH_KNOWLEDGE_"
    env = {
        **os.environ,
        f"{prefix}GRPC__PORT": str(find_free_port()),
        f"{prefix}REDIS__URL": f"redis://127.0.0.1:{find_free_port()}/0",
        f"{prefix}REDIS__CONNECT_TIMEOUT_SECONDS": "1",
        f"{prefix}LOG__FORMAT": "text",
    }
    done = subprocess.run(
        [sys.executable, "-m", f"services.{kind}"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot start: Redis did not answer within 1s" in done.stderr
    assert "Traceback" not in done.stderr
