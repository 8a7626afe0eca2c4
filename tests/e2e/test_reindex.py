"""Re-index through a real Envoy: `POST …/documents/{id}:reindex` over REST, with a
knowledge worker (the real pipeline) attached to the stack's Task Manager."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.conftest import EnvoyFactory, ServiceFactory, Stack

pytestmark = pytest.mark.e2e

TEXT = "\n\n".join(
    f"Section {i}: the archive policy keeps record {i} for {i + 3} years." for i in range(40)
).encode()


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


def reason(body: dict[str, Any]) -> str:
    infos = [d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    return str(infos[0]["reason"])


async def finished(http: aiohttp.ClientSession, task_id: str) -> dict[str, Any]:
    for _ in range(1500):
        status, task = await call(http, "GET", f"/api/v1/tasks/{task_id}")
        assert status == 200, task
        if task["state"].endswith(("SUCCEEDED", "FAILED", "CANCELLED")):
            return dict(task)
        await asyncio.sleep(0.2)
    raise AssertionError(f"task {task_id} did not finish")


async def chunk_ids(http: aiohttp.ClientSession, kb_id: str, document_id: str) -> list[str]:
    status, page = await call(
        http,
        "GET",
        f"/api/v1/knowledge-bases/{kb_id}/documents/{document_id}/chunks?page_size=1000",
    )
    assert status == 200, page
    return [c["id"] for c in page.get("chunks", [])]


async def test_reindex_over_rest(
    http: aiohttp.ClientSession,
    stack: Stack,
    start_service: ServiceFactory,
    start_envoy: EnvoyFactory,
) -> None:
    status, kb = await call(
        http, "POST", "/api/v1/knowledge-bases", json={"name": os.urandom(5).hex()}
    )
    assert status == 200, kb
    base = f"/api/v1/knowledge-bases/{kb['id']}"
    status, answer = await call(
        http,
        "POST",
        f"{base}/documents:upload?filename=archive.txt",
        data=io.BytesIO(TEXT),
        headers={"Content-Type": "text/plain"},
    )
    assert status == 200, answer
    document_id, task_id = answer["document_id"], answer["task_id"]
    reindex = f"{base}/documents/{document_id}:reindex"

    # No worker yet: the upload's task is still PENDING, so a re-index is refused.
    status, body = await call(http, "POST", reindex, json={})
    assert (status, reason(body)) == (400, "DOCUMENT_TASK_ACTIVE"), body
    status, body = await call(http, "POST", f"{base}/documents/nope:reindex", json={})
    assert (status, reason(body)) == (404, "DOCUMENT_NOT_FOUND"), body

    # A Knowledge Service with its worker joins, behind an Envoy of its own (its
    # index is a local directory: searches go where the chunks are written).
    knowledge = start_service(
        "knowledge",
        redis_url=stack.redis_url,
        s3=stack.s3,
        name="knowledge-worker-e2e",
        task_manager_address=stack.tm_address,
        env={"KBMESH_KNOWLEDGE_WORKER__ENABLED": "true"},
    )
    envoy = start_envoy(task_manager=[stack.tm_address], knowledge=[knowledge.address])
    async with aiohttp.ClientSession(base_url=envoy.http_url) as gateway:
        await ingested_and_reindexed(gateway, kb["id"], document_id, task_id)


async def ingested_and_reindexed(
    http: aiohttp.ClientSession, kb_id: str, document_id: str, task_id: str
) -> None:
    base = f"/api/v1/knowledge-bases/{kb_id}"
    reindex = f"{base}/documents/{document_id}:reindex"
    first = await finished(http, task_id)
    assert first["state"] == "STATE_SUCCEEDED", first
    before = await chunk_ids(http, kb_id, document_id)
    assert len(before) == int(first["result"]["chunk_count"]) > 1

    request_id = os.urandom(6).hex()
    status, queued = await call(http, "POST", reindex, json={"request_id": request_id})
    assert status == 200, queued
    assert queued["task_id"] != task_id
    assert queued["document"]["task_id"] == queued["task_id"]
    assert queued["document"]["chunk_count"] == len(before)
    status, again = await call(http, "POST", reindex, json={"request_id": request_id})
    assert (status, again["task_id"]) == (200, queued["task_id"])
    second = await finished(http, queued["task_id"])
    assert second["state"] == "STATE_SUCCEEDED", second
    assert await chunk_ids(http, kb_id, document_id) == before

    # A different chunking from the request body replaces every chunk.
    status, queued = await call(
        http,
        "POST",
        reindex,
        json={"chunking": {"strategy": "STRATEGY_TOKEN", "chunk_size": 40, "chunk_overlap": 0}},
    )
    assert status == 200, queued
    third = await finished(http, queued["task_id"])
    assert third["state"] == "STATE_SUCCEEDED", third
    after = await chunk_ids(http, kb_id, document_id)
    assert len(after) == int(third["result"]["chunk_count"]) > len(before)
    assert not set(after) & set(before)
    status, document = await call(http, "GET", f"{base}/documents/{document_id}")
    assert status == 200
    assert (document["state"], document["chunk_count"]) == ("STATE_SUCCEEDED", len(after))
