"""A progress stream that fails after it started ends with a terminal event.

Over HTTP/1.1 a gRPC status sent after the first byte would look like a clean
end of a successful stream (GATEWAY-NOTES.md), so `WatchTask` reports a
failure after its first event as a last TYPE_ERROR event. Here the Task
Manager's Redis dies while a browser-style SSE client follows a task through
a real Envoy: the client gets that event, with a reason, and then the end.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest

from tests.conftest import BucketFactory, EnvoyFactory, RedisFactory, ServiceFactory

pytestmark = pytest.mark.integration


def sse_data(event: bytes) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(event.decode().removeprefix("data: "))
    return data


async def test_a_failure_mid_stream_is_a_terminal_sse_event(
    start_redis: RedisFactory,
    new_bucket: BucketFactory,
    start_service: ServiceFactory,
    start_envoy: EnvoyFactory,
) -> None:
    redis = start_redis()  # this test's own: it is killed below
    bucket = new_bucket()
    task_manager = start_service("task_manager", redis_url=redis.url, s3=bucket)
    knowledge = start_service(
        "knowledge",
        redis_url=redis.url,
        s3=bucket,
        task_manager_address=task_manager.address,
        env={"KBMESH_KNOWLEDGE_WORKER__ENABLED": "false"},  # the task stays PENDING
    )
    envoy = start_envoy(task_manager=[task_manager.address], knowledge=[knowledge.address])
    async with aiohttp.ClientSession(envoy.http_url) as http:
        async with http.post("/api/v1/knowledge-bases", json={"name": "sse-failure"}) as answer:
            assert answer.status == 200
            kb = await answer.json()
        async with http.post(
            f"/api/v1/knowledge-bases/{kb['id']}/documents:upload?filename=f.txt",
            data=b"followed until the store fails",
        ) as answer:
            assert answer.status == 200
            task_id = (await answer.json())["task_id"]
        async with http.get(f"/api/v1/tasks/{task_id}:sse") as stream:
            assert stream.status == 200
            first = await asyncio.wait_for(stream.content.readuntil(b"\n\n"), timeout=10)
            assert sse_data(first)["type"] == "TYPE_SNAPSHOT"
            await asyncio.to_thread(redis.stop)
            rest = await asyncio.wait_for(stream.content.read(), timeout=60)
    events = [sse_data(e) for e in rest.split(b"\n\n") if e.strip()]
    assert events, "the stream closed without saying why"
    last = events[-1]
    assert last["type"] == "TYPE_ERROR"
    assert last["last"] is True
    assert last["error"]["reason"] == "REDIS_UNAVAILABLE"
    assert last["error"]["retryable"] is True
    assert last["task"]["id"] == task_id  # the state the client had last
