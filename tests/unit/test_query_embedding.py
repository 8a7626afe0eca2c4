"""Search queries are embedded with the knowledge base's own model."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from services.common.errors import FailedPrecondition, Unavailable
from services.knowledge.domain.knowledge_bases import ChunkingDefaults, KnowledgeBase
from services.knowledge.index.hash_embedder import HashEmbedder
from services.knowledge.ingest.query_embedding import QueryEmbedders
from services.knowledge.settings import EmbeddingSettings
from tests.unit.test_ingest_embedding import FakeEndpoint, endpoint  # noqa: F401  (fixture)


def kb(provider: str, model: str, dimensions: int) -> KnowledgeBase:
    return KnowledgeBase(
        id="kb1",
        name="kb1",
        description="",
        chunking=ChunkingDefaults(),
        embedding_provider=provider,
        embedding_model=model,
        embedding_dimensions=dimensions,
    )


def settings(base_url: str) -> EmbeddingSettings:
    return EmbeddingSettings(
        openai_base_url=base_url,
        openai_api_key=SecretStr("sk-query"),
        openai_backoff_base_seconds=0.01,
    )


async def test_local_knowledge_bases_use_the_local_model(
    endpoint: tuple[FakeEndpoint, str],  # noqa: F811
) -> None:
    fake, url = endpoint
    local = HashEmbedder(384)
    queries = QueryEmbedders(local, settings(url))
    vector = await queries.embed(kb("local", "all-MiniLM-L6-v2", 384), "reset my password")
    assert vector == local.embed(["reset my password"])[0]
    assert fake.requests == []


async def test_openai_knowledge_bases_use_their_own_model_on_the_endpoint(
    endpoint: tuple[FakeEndpoint, str],  # noqa: F811
) -> None:
    fake, url = endpoint
    queries = QueryEmbedders(HashEmbedder(384), settings(url))
    vector = await queries.embed(kb("openai", "remote-embed-8", 0), "reset my password")
    assert len(vector) == fake.dimensions == 8
    assert fake.requests == [
        {"model": "remote-embed-8", "input": ["reset my password"], "encoding_format": "float"}
    ]
    assert fake.auth == ["Bearer sk-query"]
    with pytest.raises(FailedPrecondition) as caught:
        await queries.embed(kb("openai", "remote-embed-8", 1024), "x")
    assert caught.value.reason == "EMBEDDING_DIMENSION_MISMATCH"


async def test_remote_trouble_is_unavailable_after_few_attempts(
    endpoint: tuple[FakeEndpoint, str],  # noqa: F811
) -> None:
    fake, url = endpoint
    fake.script = [(503, {}), (503, {}), (503, {})]
    queries = QueryEmbedders(None, settings(url))
    with pytest.raises(Unavailable) as caught:
        await queries.embed(kb("openai", "remote-embed-8", 0), "x")
    assert caught.value.reason == "EMBEDDING_UNAVAILABLE"
    assert len(fake.requests) == 2  # a query retries less than ingestion


async def test_without_an_endpoint_or_a_local_model_search_says_why() -> None:
    queries = QueryEmbedders(None, EmbeddingSettings())
    with pytest.raises(FailedPrecondition) as caught:
        await queries.embed(kb("openai", "remote-embed-8", 0), "x")
    assert caught.value.reason == "EMBEDDING_NOT_CONFIGURED"
    with pytest.raises(FailedPrecondition) as caught:
        await queries.embed(kb("local", "all-MiniLM-L6-v2", 384), "x")
    assert caught.value.reason == "INGESTION_NOT_AVAILABLE"
