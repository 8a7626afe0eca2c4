"""Secrets never reach logs, error answers or stored records.

A Task Manager, a Knowledge Service and a worker run with known secrets (S3
key, callback HMAC key, worker token) at DEBUG; callers use a real API key, a
forged one and a revoked one; a task runs to the end and its callback is
attempted. Then every log line, every answer and every value in Redis is
searched for each secret.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from devstack.servers import RedisServer, find_free_port
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.common.auth import ApiKeys, parse_key
from tests.conftest import RedisFactory, ServiceFactory, WorkerFactory
from tests.support import upload_messages

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

CALLBACK_SECRET = "cb-SECRET-7f3a9e"
WORKER_TOKEN = "wk-SECRET-41c2d8"
FORGED_SECRET = "forged-SECRET-9b1e"


async def redis_values(url: str) -> str:
    """Every key and value in the Redis, as one text."""
    client = Redis.from_url(url)
    out: list[str] = []
    try:
        async for key in client.scan_iter(count=1000):
            raw_kind: Any = await client.type(key)
            kind = raw_kind.decode()
            out.append(key.decode(errors="replace"))
            if kind == "string":
                out.append(repr(await client.get(key)))
            elif kind == "hash":
                out.append(repr(await client.hgetall(key)))
            elif kind == "stream":
                out.append(repr(await client.xrange(key)))
            elif kind == "zset":
                out.append(repr(await client.zrange(key, 0, -1)))
    finally:
        await client.aclose()
    return "\n".join(out)


async def test_no_secret_in_logs_answers_or_records(
    start_redis: RedisFactory, start_service: ServiceFactory, start_worker: WorkerFactory
) -> None:
    redis = start_redis()
    s3_secret = start_service.s3.secret_access_key
    tm_env = {
        "KBMESH_TASK_MANAGER_CALLBACKS__SECRET": CALLBACK_SECRET,
        "KBMESH_TASK_MANAGER_DISPATCH__WORKER_TOKENS": json.dumps([WORKER_TOKEN]),
        "KBMESH_TASK_MANAGER_UPLOADS__CALLBACK_ALLOW_LIST": json.dumps(["http://127.0.0.1:"]),
        "KBMESH_TASK_MANAGER_CALLBACKS__MAX_ATTEMPTS": "1",
    }
    task_manager = start_service("task_manager", redis_url=redis.url, env=tm_env, auth=True)
    knowledge = start_service(
        "knowledge", redis_url=redis.url, task_manager_address=task_manager.address, auth=True
    )
    worker = start_worker(
        task_manager_address=task_manager.address,
        redis_url=redis.url,
        env={"KBMESH_KNOWLEDGE_WORKER__TOKEN": WORKER_TOKEN},
        handler_options={"sleep_seconds": "0"},
    )
    client = Redis.from_url(redis.url)
    try:
        keys = ApiKeys(client)
        record, key = await keys.create("secretive")
        parsed = parse_key(key)
        assert parsed is not None
        key_secret = parsed[1]
        forged = f"kbm_{record.id}_{FORGED_SECRET}"
        answers: list[str] = []
        good = (("authorization", f"Bearer {key}"),)
        async with (
            grpc.aio.insecure_channel(knowledge.address) as ks,
            grpc.aio.insecure_channel(task_manager.address) as tms,
        ):
            knowledge_stub = kn_grpc.KnowledgeServiceStub(ks)
            tasks = tm_grpc.TaskManagerServiceStub(tms)
            for bad in (f"Bearer {forged}", f"Bearer {WORKER_TOKEN}", forged):
                try:
                    await tasks.ListTasks(tm.ListTasksRequest(), metadata=(("authorization", bad),))
                except grpc.aio.AioRpcError as exc:
                    answers.append(f"{exc.details()} {exc.trailing_metadata()!r}")
            kb = await knowledge_stub.CreateKnowledgeBase(
                kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name="s")),
                metadata=good,
            )
            uploaded = await tasks.Upload(
                upload_messages(
                    b"confidential",
                    knowledge_base_id=kb.id,
                    filename="c.txt",
                    callback_url="http://127.0.0.1:9/hook",
                ),
                metadata=good,
            )
            task: Any = None
            for _ in range(600):
                task = await tasks.GetTask(
                    tm.GetTaskRequest(task_id=uploaded.task_id), metadata=good
                )
                if task.state == tm.Task.STATE_SUCCEEDED and task.callback_attempts:
                    break
                await asyncio.sleep(0.1)
            assert task is not None
            assert task.state == tm.Task.STATE_SUCCEEDED
            assert task.callback_attempts  # the signed POST was attempted
            answers.append(str(task))
            await keys.revoke(record.id)
            try:
                await tasks.ListTasks(tm.ListTasksRequest(), metadata=good)
            except grpc.aio.AioRpcError as exc:
                answers.append(f"{exc.details()} {exc.trailing_metadata()!r}")
        stored = await redis_values(redis.url)
    finally:
        await client.aclose()
    worker.stop()
    task_manager.stop()
    knowledge.stop()
    logs = "\n".join(
        p.read_text(errors="replace")
        for p in (task_manager.log_path, knowledge.log_path, worker.log_path)
    )
    assert "refused" in logs or "UNAUTHENTICATED" in logs or "listening" in logs  # logs exist
    secrets = {
        "S3 secret key": s3_secret,
        "callback secret": CALLBACK_SECRET,
        "worker token": WORKER_TOKEN,
        "API key secret": key_secret,
        "forged key secret": FORGED_SECRET,
    }
    for what, secret in secrets.items():
        assert secret not in logs, f"{what} in the logs"
        assert secret not in "\n".join(answers), f"{what} in an answer"
        assert secret not in stored, f"{what} stored in Redis"


@pytest.mark.parametrize("reachable", [False, True], ids=["unreachable", "wrong-password"])
def test_a_redis_password_never_reaches_the_start_up_error(
    redis_server: RedisServer, reachable: bool
) -> None:
    password = "pw-SECRET-5d0c1a"
    where = redis_server.url.split("//", 1)[1] if reachable else f"127.0.0.1:{find_free_port()}/0"
    env = {
        **os.environ,
        "KBMESH_TASK_MANAGER_GRPC__PORT": str(find_free_port()),
        "KBMESH_TASK_MANAGER_REDIS__URL": f"redis://:{password}@{where}",
        "KBMESH_TASK_MANAGER_REDIS__CONNECT_TIMEOUT_SECONDS": "1",
        # Past Redis (a Redis without a password takes any), S3 is not there.
        "KBMESH_TASK_MANAGER_S3__ENDPOINT_URL": f"http://127.0.0.1:{find_free_port()}",
        "KBMESH_TASK_MANAGER_S3__CONNECT_TIMEOUT_SECONDS": "1",
        "KBMESH_TASK_MANAGER_LOG__LEVEL": "DEBUG",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.task_manager"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "cannot start:" in done.stderr
    assert password not in done.stdout + done.stderr
