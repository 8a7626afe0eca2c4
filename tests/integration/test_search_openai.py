"""A knowledge base on an OpenAI-compatible model, on the real services: its
chunks and its search queries are embedded by that endpoint with its model,
never by the local MiniLM. The endpoint is a small aiohttp server in the test
(a bag-of-words hash of 64 dimensions), reached by the Knowledge Service over
real HTTP."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from aiohttp import web

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.knowledge.index.hash_embedder import HashEmbedder
from tests.conftest import ServiceFactory, Stack
from tests.support import error_info, upload_messages

pytestmark = pytest.mark.integration

MODEL = "bag-of-words-64"
DOCS = {
    "billing.txt": b"Invoices are due within thirty days. Late invoices accrue interest.",
    "travel.txt": b"Book flights through the travel desk. Economy class for short trips.",
    "security.txt": b"Rotate passwords every ninety days. Use hardware keys for logins.",
}


@dataclass
class Endpoint:
    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    embedder: HashEmbedder = field(default_factory=lambda: HashEmbedder(64))

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if body.get("model") != MODEL:
            return web.json_response({"error": {"message": "unknown model"}}, status=404)
        vectors = self.embedder.embed(body["input"])
        return web.json_response(
            {"data": [{"index": i, "embedding": v} for i, v in enumerate(vectors)]}
        )


@pytest.fixture
async def endpoint() -> AsyncIterator[Endpoint]:
    fake = Endpoint()
    app = web.Application()
    app.router.add_post("/v1/embeddings", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield fake
    finally:
        await runner.cleanup()


async def test_openai_knowledge_base_is_searched_with_its_own_model(
    stack: Stack, start_service: ServiceFactory, endpoint: Endpoint
) -> None:
    knowledge = start_service(
        "knowledge",
        redis_url=stack.redis_url,
        s3=stack.s3,
        name="knowledge-openai",
        task_manager_address=stack.tm_address,
        env={
            "KBMESH_KNOWLEDGE_WORKER__ENABLED": "true",
            "KBMESH_KNOWLEDGE_EMBEDDING__OPENAI_BASE_URL": endpoint.url,
            "KBMESH_KNOWLEDGE_EMBEDDING__OPENAI_API_KEY": "sk-test",
        },
    )
    async with (
        grpc.aio.insecure_channel(stack.tm_address) as tm_channel,
        grpc.aio.insecure_channel(knowledge.address) as ks_channel,
        grpc.aio.insecure_channel(stack.ks_address) as plain_channel,
    ):
        tasks = tm_grpc.TaskManagerServiceStub(tm_channel)
        service = kn_grpc.KnowledgeServiceStub(ks_channel)
        kb = await service.CreateKnowledgeBase(
            kn.CreateKnowledgeBaseRequest(
                knowledge_base=kn.KnowledgeBase(
                    name=os.urandom(5).hex(),
                    embedding=kn.EmbeddingConfig(provider="openai", model=MODEL),
                )
            )
        )
        ids = {}
        for filename, data in DOCS.items():
            answer = await tasks.Upload(
                upload_messages(data, knowledge_base_id=kb.id, filename=filename)
            )
            ids[filename] = answer.document_id
            for _ in range(600):
                task = await tasks.GetTask(tm.GetTaskRequest(task_id=answer.task_id))
                if task.state in (tm.Task.STATE_SUCCEEDED, tm.Task.STATE_FAILED):
                    break
                await asyncio.sleep(0.1)
            assert task.state == tm.Task.STATE_SUCCEEDED, task.error
        embedded = sum(len(r["input"]) for r in endpoint.requests)
        assert embedded >= len(DOCS)

        for mode in (kn.SearchRequest.MODE_VECTOR, kn.SearchRequest.MODE_HYBRID):
            before = len(endpoint.requests)
            found = await service.Search(
                kn.SearchRequest(
                    knowledge_base_id=kb.id, query="when are invoices due", top_k=3, mode=mode
                )
            )
            assert found.results[0].document_id == ids["billing.txt"], found
            # The query went to the endpoint, with the knowledge base's model.
            assert endpoint.requests[before:] == [
                {"model": MODEL, "input": ["when are invoices due"], "encoding_format": "float"}
            ]

        # A Knowledge Service without the endpoint configured says so for vector
        # search instead of embedding the query with another model.
        plain = kn_grpc.KnowledgeServiceStub(plain_channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await plain.Search(
                kn.SearchRequest(
                    knowledge_base_id=kb.id,
                    query="invoices",
                    mode=kn.SearchRequest.MODE_VECTOR,
                )
            )
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(caught.value).reason == "EMBEDDING_NOT_CONFIGURED"
