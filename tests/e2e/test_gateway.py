"""Through a real Envoy: REST transcoding, JSON errors, SSE, native gRPC."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import Stack

pytestmark = pytest.mark.e2e
GRPCURL = Path(sys.executable).parent / "grpcurl"


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=stack.envoy_http_url) as session:
        yield session


async def call(
    http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, path, **kwargs) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


async def new_kb(http: aiohttp.ClientSession) -> dict[str, Any]:
    status, kb = await call(
        http, "POST", "/api/v1/knowledge-bases", json={"name": os.urandom(5).hex()}
    )
    assert status == 200, kb
    assert isinstance(kb, dict)
    return kb


def reason(body: dict[str, Any]) -> str:
    infos = [d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    return str(infos[0]["reason"])


async def test_knowledge_base_rest_round_trip(http: aiohttp.ClientSession) -> None:
    kb = await new_kb(http)
    assert kb["id"]
    assert kb["chunking"]["strategy"] == "STRATEGY_SENTENCE"
    status, got = await call(http, "GET", f"/api/v1/knowledge-bases/{kb['id']}")
    assert (status, got["name"]) == (200, kb["name"])
    status, listed = await call(http, "GET", "/api/v1/knowledge-bases?page_size=1000")
    assert status == 200
    assert kb["id"] in [k["id"] for k in listed["knowledge_bases"]]
    status, patched = await call(
        http,
        "PATCH",
        f"/api/v1/knowledge-bases/{kb['id']}?update_mask=description",
        json={"description": "updated"},
    )
    assert (status, patched["description"], patched["name"]) == (200, "updated", kb["name"])
    status, body = await call(http, "POST", "/api/v1/knowledge-bases", json={"name": kb["name"]})
    assert status == 409
    assert reason(body) == "KNOWLEDGE_BASE_EXISTS"


async def test_raw_body_upload_then_task_rest_routes(http: aiohttp.ClientSession) -> None:
    kb = await new_kb(http)
    data = os.urandom(3 * 1024 * 1024 + 17)
    status, answer = await call(
        http,
        "POST",
        f"/api/v1/knowledge-bases/{kb['id']}/documents:upload?filename=scan.pdf",
        data=io.BytesIO(data),
        headers={"Content-Type": "application/pdf"},
    )
    assert status == 200, answer
    task_id = answer["task_id"]
    assert answer["document_id"]
    status, task = await call(http, "GET", f"/api/v1/tasks/{task_id}")
    assert status == 200
    assert task["state"].endswith("PENDING")
    assert int(task["size_bytes"]) == len(data)
    assert task["content_type"] == "application/pdf"
    status, listed = await call(
        http, "GET", f"/api/v1/tasks?knowledge_base_id={kb['id']}&state=STATE_PENDING"
    )
    assert status == 200
    assert [t["id"] for t in listed["tasks"]] == [task_id]
    status, cancelled = await call(http, "POST", f"/api/v1/tasks/{task_id}:cancel", json={})
    assert status == 200
    assert cancelled["task"]["state"] == "STATE_CANCELLED"
    status, body = await call(http, "POST", f"/api/v1/tasks/{task_id}:cancel", json={})
    assert status == 400
    assert reason(body) == "TASK_ALREADY_FINISHED"
    status, retried = await call(http, "POST", f"/api/v1/tasks/{task_id}:retry", json={})
    assert (status, retried["task"]["state"]) == (200, "STATE_PENDING")


async def test_sse_streams_events_incrementally(http: aiohttp.ClientSession) -> None:
    kb = await new_kb(http)
    _, answer = await call(
        http,
        "POST",
        f"/api/v1/knowledge-bases/{kb['id']}/documents:upload?filename=a.txt",
        data=b"follow me",
    )
    task_id = answer["task_id"]
    async with http.get(f"/api/v1/tasks/{task_id}:sse") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=10)
        snapshot = json.loads(first.decode().removeprefix("data: "))
        assert snapshot["type"] == "TYPE_SNAPSHOT"
        # The stream is still open: the next event only comes after the cancel.
        await call(http, "POST", f"/api/v1/tasks/{task_id}:cancel", json={})
        second = await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=10)
        event = json.loads(second.decode().removeprefix("data: "))
        assert event["task"]["state"] == "STATE_CANCELLED"
        assert event["last"] is True


async def test_json_watch_stream(http: aiohttp.ClientSession) -> None:
    kb = await new_kb(http)
    _, answer = await call(
        http,
        "POST",
        f"/api/v1/knowledge-bases/{kb['id']}/documents:upload?filename=w.txt",
        data=b"watch",
    )
    await call(http, "POST", f"/api/v1/tasks/{answer['task_id']}:cancel", json={})
    status, events = await call(http, "GET", f"/api/v1/tasks/{answer['task_id']}:watch")
    assert status == 200
    assert events[0]["type"] == "TYPE_SNAPSHOT"
    assert events[-1]["task"]["state"] == "STATE_CANCELLED"


@pytest.mark.parametrize(
    ("method", "path", "status", "why"),
    [
        ("GET", "/api/v1/tasks/no-such-task", 404, "TASK_NOT_FOUND"),
        ("GET", "/api/v1/knowledge-bases/no-such-kb", 404, "KNOWLEDGE_BASE_NOT_FOUND"),
        (
            "POST",
            "/api/v1/knowledge-bases/no-such-kb/documents:upload?filename=a",
            404,
            "KNOWLEDGE_BASE_NOT_FOUND",
        ),
        ("POST", "/api/v1/knowledge-bases/x/documents:upload?filename=..", 400, "INVALID_FILENAME"),
        ("DELETE", "/api/v1/knowledge-bases/some-kb", 404, "KNOWLEDGE_BASE_NOT_FOUND"),
    ],
)
async def test_errors_are_json_with_http_status_and_reason(
    http: aiohttp.ClientSession, method: str, path: str, status: int, why: str
) -> None:
    got, body = await call(http, method, path, data=b"x" if method == "POST" else None)
    assert got == status, body
    assert isinstance(body["code"], int)
    assert body["message"]
    assert reason(body) == why


async def test_unknown_paths_and_query_parameters(http: aiohttp.ClientSession) -> None:
    async with http.get("/api/v1/nothing-here") as response:
        assert response.status == 404
    async with http.get("/api/v1/tasks?bogus=1") as response:
        assert response.status == 400


async def test_native_grpc_through_envoy(stack: Stack) -> None:
    grpcurl = await asyncio.create_subprocess_exec(
        str(GRPCURL), "-plaintext", stack.envoy_grpc_address, "list", stdout=subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(grpcurl.communicate(), timeout=30)
    assert grpcurl.returncode == 0
    listed = out.decode().split()
    assert {
        "kbmesh.taskmanager.v1.TaskManagerService",
        "kbmesh.taskmanager.v1.WorkerService",
        "kbmesh.knowledge.v1.KnowledgeService",
        "grpc.health.v1.Health",
    } <= set(listed)
    async with grpc.aio.insecure_channel(stack.envoy_grpc_address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
