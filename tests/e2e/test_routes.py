"""Through a real Envoy: the rest of the REST contract, error mapping, CORS,
gRPC-web, the web page's files, multipart uploads and the upload rate limit."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import struct
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from devstack import servers
from devstack.servers import EnvoyServer
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from tests.conftest import EnvoyFactory, Stack

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


async def call(
    http: aiohttp.ClientSession, method: str, path: str, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, path, **kwargs) as response:
        text = await response.text()
        return response.status, json.loads(text) if text else None


def reason(body: dict[str, Any]) -> str:
    infos = [d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    return str(infos[0]["reason"])


async def new_kb(http: aiohttp.ClientSession) -> dict[str, Any]:
    status, kb = await call(
        http, "POST", "/api/v1/knowledge-bases", json={"name": os.urandom(5).hex()}
    )
    assert status == 200, kb
    assert isinstance(kb, dict)
    return kb


async def upload(http: aiohttp.ClientSession, kb_id: str, name: str, data: bytes) -> Any:
    status, answer = await call(
        http,
        "POST",
        f"/api/v1/knowledge-bases/{kb_id}/documents:upload?filename={name}",
        data=data,
        headers={"Content-Type": "text/plain"},
    )
    assert status == 200, answer
    return answer


async def test_document_routes_search_and_delete(http: aiohttp.ClientSession) -> None:
    kb = await new_kb(http)
    answer = await upload(http, kb["id"], "notes.txt", b"the gateway routes documents")
    doc_id = answer["document_id"]
    base = f"/api/v1/knowledge-bases/{kb['id']}"

    status, listed = await call(http, "GET", f"{base}/documents?page_size=10")
    assert status == 200, listed
    assert [d["id"] for d in listed["documents"]] == [doc_id]
    status, doc = await call(http, "GET", f"{base}/documents/{doc_id}")
    assert (status, doc["filename"], doc["state"]) == (200, "notes.txt", "STATE_PENDING")
    status, chunks = await call(http, "GET", f"{base}/documents/{doc_id}/chunks")
    assert (status, chunks.get("chunks", [])) == (200, [])
    # Not ingested (this stack runs no worker): nothing to find yet, but the
    # search route answers through the transcoder.
    status, found = await call(
        http,
        "POST",
        f"{base}:search",
        json={"query": "gateway", "top_k": 3, "mode": "MODE_KEYWORD"},
    )
    assert status == 200, found
    assert found["results"] == []
    status, body = await call(http, "POST", f"{base}:search", json={"query": ""})
    assert status == 400, body

    status, deleted = await call(http, "DELETE", f"{base}/documents/{doc_id}")
    assert status == 200, deleted
    status, body = await call(http, "GET", f"{base}/documents/{doc_id}")
    assert status == 404
    assert reason(body) == "DOCUMENT_NOT_FOUND"

    status, gone = await call(http, "DELETE", base)
    assert status == 200, gone
    status, body = await call(http, "GET", base)
    assert (status, reason(body)) == (404, "KNOWLEDGE_BASE_NOT_FOUND")


async def test_reindex_route_reaches_the_knowledge_service(http: aiohttp.ClientSession) -> None:
    kb = await new_kb(http)
    status, body = await call(
        http, "POST", f"/api/v1/knowledge-bases/{kb['id']}/documents/no-such-doc:reindex", json={}
    )
    # Transcoded and answered by KnowledgeService.ReindexDocument (the catch-all
    # 404 carries no ErrorInfo): unknown document, or not served by this build.
    assert (status, reason(body)) in {(404, "DOCUMENT_NOT_FOUND"), (501, "NOT_IMPLEMENTED")}


async def test_error_statuses(http: aiohttp.ClientSession) -> None:
    kb = await new_kb(http)
    # 409: the name is taken.
    status, body = await call(http, "POST", "/api/v1/knowledge-bases", json={"name": kb["name"]})
    assert (status, reason(body)) == (409, "KNOWLEDGE_BASE_EXISTS")
    # 429 (RESOURCE_EXHAUSTED): over the Task Manager's size limit, refused
    # before any byte is stored.
    status, body = await call(
        http,
        "POST",
        f"/api/v1/knowledge-bases/{kb['id']}/documents:upload"
        f"?filename=big.bin&declared_size_bytes={1 << 50}",
        data=b"x",
    )
    assert (status, reason(body)) == (429, "UPLOAD_TOO_LARGE")
    # 400: unknown query parameter (transcoder), bad JSON body.
    status, _ = await call(http, "GET", f"/api/v1/knowledge-bases/{kb['id']}?colour=red")
    assert status == 400
    async with http.post(
        "/api/v1/knowledge-bases", data=b"{not json", headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 400
    # 404: unknown path, JSON too.
    status, body = await call(http, "GET", "/nothing/here")
    assert (status, body["code"]) == (404, 5)


async def test_unavailable_upstream_is_503_json(stack: Stack, start_envoy: EnvoyFactory) -> None:
    dead = f"127.0.0.1:{servers.find_free_port()}"
    envoy = start_envoy(task_manager=[stack.tm_address], knowledge=[dead])
    async with aiohttp.ClientSession(base_url=envoy.http_url) as http:
        status, body = await call(http, "GET", "/api/v1/knowledge-bases")
        assert status == 503, body
        assert body["code"] == 14
        assert reason(body) == "UPSTREAM_UNAVAILABLE"
        # The Task Manager behind the same Envoy still answers.
        status, _ = await call(http, "GET", "/api/v1/tasks?page_size=1")
        assert status == 200
    # Native gRPC callers get UNAVAILABLE.
    async with grpc.aio.insecure_channel(envoy.grpc_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await kn_grpc.KnowledgeServiceStub(channel).ListKnowledgeBases(
                kn.ListKnowledgeBasesRequest(), timeout=10
            )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_replicas_behind_one_envoy_dead_one_health_checked_out(
    stack: Stack, start_envoy: EnvoyFactory
) -> None:
    dead = f"127.0.0.1:{servers.find_free_port()}"
    envoy = start_envoy(task_manager=[dead, stack.tm_address], knowledge=[stack.ks_address, dead])
    # Active gRPC health checks mark the dead replicas before traffic needs them.
    clusters = ""
    for _ in range(100):
        _, raw = servers.http_get(envoy.admin_url + "/clusters")
        clusters = raw.decode()
        if clusters.count("failed_active_hc") >= 2:
            break
        await asyncio.sleep(0.1)
    assert f"task_manager::{dead}::health_flags::/failed_active_hc" in clusters, clusters
    assert f"knowledge::{dead}::health_flags::/failed_active_hc" in clusters, clusters
    assert f"task_manager::{stack.tm_address}::health_flags::healthy" in clusters, clusters
    async with aiohttp.ClientSession(base_url=envoy.http_url) as http:
        results = await asyncio.gather(
            *(
                call(http, "GET", path)
                for _ in range(10)
                for path in ("/api/v1/tasks?page_size=1", "/api/v1/knowledge-bases?page_size=1")
            )
        )
    assert [status for status, _ in results] == [200] * 20


async def test_cors_preflight(http: aiohttp.ClientSession) -> None:
    async with http.options(
        "/api/v1/knowledge-bases",
        headers={
            "Origin": "http://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    ) as response:
        assert response.status == 200
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        assert "POST" in response.headers["access-control-allow-methods"]
        allowed = response.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed
        assert "content-type" in allowed
    async with http.get(
        "/api/v1/knowledge-bases", headers={"Origin": "http://app.example"}
    ) as response:
        assert response.status == 200
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        assert "grpc-status" in response.headers["access-control-expose-headers"]


def grpc_web_frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


def grpc_web_frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """(data frames, trailers) of a grpc-web+proto response body."""
    frames: list[bytes] = []
    trailers: dict[str, str] = {}
    offset = 0
    while offset < len(body):
        flag, length = struct.unpack(">BI", body[offset : offset + 5])
        payload = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if flag & 0x80:
            for line in payload.decode().split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    trailers[key.strip().lower()] = value.strip()
        else:
            frames.append(payload)
    return frames, trailers


async def test_grpc_web_call(http: aiohttp.ClientSession) -> None:
    kb = await new_kb(http)
    headers = {
        "Content-Type": "application/grpc-web+proto",
        "X-Grpc-Web": "1",
        "Origin": "http://app.example",
    }
    request = kn.GetKnowledgeBaseRequest(knowledge_base_id=kb["id"]).SerializeToString()
    async with http.post(
        "/kbmesh.knowledge.v1.KnowledgeService/GetKnowledgeBase",
        data=grpc_web_frame(request),
        headers=headers,
    ) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith("application/grpc-web")
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        frames, trailers = grpc_web_frames(await response.read())
    assert trailers["grpc-status"] == "0"
    got = kn.KnowledgeBase.FromString(frames[0])
    assert (got.id, got.name) == (kb["id"], kb["name"])

    missing = kn.GetKnowledgeBaseRequest(knowledge_base_id="no-such-kb").SerializeToString()
    async with http.post(
        "/kbmesh.knowledge.v1.KnowledgeService/GetKnowledgeBase",
        data=grpc_web_frame(missing),
        headers=headers,
    ) as response:
        body = await response.read()
        status = response.headers.get("grpc-status") or grpc_web_frames(body)[1]["grpc-status"]
    assert status == "5"


@pytest.mark.parametrize(
    ("path", "file", "content_type"),
    [
        ("/", "web/index.html", "text/html"),
        ("/web/app.js", "web/app.js", "text/javascript"),
        ("/web/style.css", "web/style.css", "text/css"),
    ],
)
async def test_web_page_files_served_by_envoy(
    http: aiohttp.ClientSession, path: str, file: str, content_type: str
) -> None:
    async with http.get(path) as response:
        assert response.status == 200
        assert response.headers["content-type"].startswith(content_type)
        assert await response.read() == (ROOT / file).read_bytes()


async def test_multipart_form_upload(http: aiohttp.ClientSession) -> None:
    kb = await new_kb(http)
    data = b"a form upload\r\n--not-the-boundary\r\n" + os.urandom(300_000)
    form = aiohttp.FormData()
    form.add_field("note", "fields before the file are skipped")
    form.add_field(
        "file", io.BytesIO(data), filename="form notes.txt", content_type="text/markdown"
    )
    status, answer = await call(
        http, "POST", f"/api/v1/knowledge-bases/{kb['id']}/documents:upload", data=form
    )
    assert status == 200, answer
    task = answer["task"]
    assert task["filename"] == "form notes.txt"
    assert task["content_type"] == "text/markdown"
    assert int(task["size_bytes"]) == len(data)
    assert task["sha256"] == hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(600)
async def test_large_multipart_upload_streams(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    kb = await new_kb(http)
    path = tmp_path / "big.bin"
    digest = hashlib.sha256()
    block = os.urandom(1 << 20)
    with path.open("wb") as f:
        for i in range(200):
            piece = block[i:] + block[:i]
            digest.update(piece)
            f.write(piece)
    form = aiohttp.FormData()
    with path.open("rb") as f:
        form.add_field("document", f, filename="big.bin", content_type="application/octet-stream")
        status, answer = await call(
            http, "POST", f"/api/v1/knowledge-bases/{kb['id']}/documents:upload", data=form
        )
    assert status == 200, answer
    assert int(answer["task"]["size_bytes"]) == 200 << 20
    assert answer["task"]["sha256"] == digest.hexdigest()


async def test_malformed_multipart_is_400_with_reason(http: aiohttp.ClientSession) -> None:
    kb = await new_kb(http)
    url = f"/api/v1/knowledge-bases/{kb['id']}/documents:upload"
    status, body = await call(
        http,
        "POST",
        url,
        data=b"--b\r\nContent-Disposition: form-data; name=f; filename=a.txt\r\n\r\nno end",
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert (status, reason(body)) == (400, "MULTIPART_TRUNCATED")
    status, body = await call(
        http, "POST", url, data=b"x", headers={"Content-Type": "multipart/form-data"}
    )
    assert (status, reason(body)) == (400, "MULTIPART_NO_BOUNDARY")


async def test_upload_rate_limit_is_429_json(stack: Stack, limited_envoy: EnvoyServer) -> None:
    async with aiohttp.ClientSession(base_url=limited_envoy.http_url) as http:
        kb = await new_kb(http)
        url = f"/api/v1/knowledge-bases/{kb['id']}/documents:upload?filename=r.txt"
        statuses = []
        for i in range(3):
            status, body = await call(http, "POST", url, data=f"rate {i}".encode())
            statuses.append(status)
        assert statuses == [200, 200, 429], body
        assert body["code"] == 8
        assert reason(body) == "RATE_LIMITED"
        # Other routes are not limited.
        results = await asyncio.gather(
            *(call(http, "GET", f"/api/v1/knowledge-bases/{kb['id']}") for _ in range(5))
        )
        assert [s for s, _ in results] == [200] * 5
