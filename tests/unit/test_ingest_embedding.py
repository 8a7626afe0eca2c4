"""Embedders: the real ONNX MiniLM, and the OpenAI-compatible client against a fake
endpoint (a local aiohttp server)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from services.knowledge.ingest.embedding import DIMENSIONS, OnnxMiniLM, shared_minilm
from services.knowledge.ingest.errors import DocumentRejected, IngestUnavailable
from services.knowledge.ingest.openai_embedding import OpenAIEmbedder, retry_after_seconds


@pytest.fixture(scope="module")
def minilm() -> OnnxMiniLM:
    return shared_minilm()


def test_minilm_gives_unit_vectors_of_384(minilm: OnnxMiniLM) -> None:
    vectors = np.array(minilm.embed(["hello world", "", "a" * 5000]))
    assert vectors.shape == (3, DIMENSIONS) == (3, minilm.dimensions)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert minilm.model == "all-MiniLM-L6-v2"


def test_minilm_puts_a_paraphrase_closer_than_an_unrelated_sentence(minilm: OnnxMiniLM) -> None:
    query, paraphrase, unrelated = np.array(
        minilm.embed(
            [
                "How do I reset my password?",
                "I forgot my password and need to change it.",
                "The cat slept on the warm windowsill all afternoon.",
            ]
        )
    )
    assert float(query @ paraphrase) > float(query @ unrelated) + 0.3


def test_minilm_batches_do_not_change_vectors(minilm: OnnxMiniLM) -> None:
    texts = [f"sentence {i} " * (i + 1) for i in range(20)]  # padding differs per batch
    together = np.array(minilm.embed(texts))
    alone = np.array([minilm.embed([t])[0] for t in texts[:3]])
    assert np.allclose(together[:3], alone, atol=1e-4)


def test_minilm_is_safe_from_several_threads() -> None:
    fresh = OnnxMiniLM(batch_size=4)  # loads under its lock on first use, from any thread
    texts = [f"thread-safe text number {i}" for i in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: np.array(fresh.embed(texts)), range(4)))
    for result in results[1:]:
        assert np.allclose(result, results[0], atol=1e-6)


def test_minilm_counts_tokens_without_padding_or_truncation(minilm: OnnxMiniLM) -> None:
    assert minilm.count_tokens("hello world") == 2
    # The shipped tokenizer.json truncates at 128: counting must not.
    assert minilm.count_tokens("word " * 1000) == 1000


# --- OpenAI-compatible endpoint ---------------------------------------------------------------


@dataclass
class FakeEndpoint:
    """Answers POST /v1/embeddings; `script` lists (status, headers) to answer before
    succeeding."""

    script: list[tuple[int, dict[str, str]]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    auth: list[str] = field(default_factory=list)
    dimensions: int = 8

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        self.auth.append(request.headers.get("Authorization", ""))
        if self.script:
            status, headers = self.script.pop(0)
            return web.json_response({"error": {"message": "nope"}}, status=status, headers=headers)
        data = [
            {"index": i, "embedding": [float(len(text) + 1)] * self.dimensions}
            for i, text in enumerate(body["input"])
        ]
        data.reverse()  # providers may answer out of order: the index field decides
        return web.json_response({"data": data, "model": body["model"]})


@pytest.fixture
async def endpoint() -> AsyncIterator[tuple[FakeEndpoint, str]]:
    fake = FakeEndpoint()
    app = web.Application()
    app.router.add_post("/v1/embeddings", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield fake, f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


def _client(base_url: str, sleeps: list[float], **kwargs: Any) -> OpenAIEmbedder:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    options: dict[str, Any] = {
        "model": "test-embed",
        "api_key": "sk-test",
        "batch_size": 2,
        "max_attempts": 3,
        "backoff_base_seconds": 0.5,
        "sleep": sleep,
        "rand": lambda: 1.0,
    }
    options.update(kwargs)
    return OpenAIEmbedder(base_url=base_url, **options)


async def test_openai_batches_and_normalises(endpoint: tuple[FakeEndpoint, str]) -> None:
    fake, url = endpoint
    client = _client(url, [])
    vectors = await client.embed_async(["a", "bb", "ccc"])
    assert [r["input"] for r in fake.requests] == [["a", "bb"], ["ccc"]]
    assert fake.requests[0]["model"] == "test-embed"
    assert fake.auth == ["Bearer sk-test"] * 2
    assert len(vectors) == 3
    assert all(math.isclose(sum(x * x for x in v), 1.0) for v in vectors)
    assert client.dimensions == 8


async def test_openai_retries_429_and_5xx_honouring_retry_after(
    endpoint: tuple[FakeEndpoint, str],
) -> None:
    fake, url = endpoint
    fake.script = [(429, {"Retry-After": "7"}), (503, {})]
    sleeps: list[float] = []
    vectors = await _client(url, sleeps).embed_async(["a"])
    assert len(vectors) == 1
    assert len(fake.requests) == 3
    # Retry-After wins; then exponential backoff (attempt 2: base * 2).
    assert sleeps == [7.0, 1.0]


async def test_openai_gives_up_retryably(endpoint: tuple[FakeEndpoint, str]) -> None:
    fake, url = endpoint
    fake.script = [(500, {})] * 3
    with pytest.raises(IngestUnavailable) as caught:
        await _client(url, []).embed_async(["a"])
    assert caught.value.reason == "EMBEDDING_UNAVAILABLE"
    assert len(fake.requests) == 3


async def test_openai_client_errors_are_final(endpoint: tuple[FakeEndpoint, str]) -> None:
    fake, url = endpoint
    fake.script = [(401, {})]
    with pytest.raises(DocumentRejected) as caught:
        await _client(url, []).embed_async(["a"])
    assert caught.value.reason == "EMBEDDING_REJECTED"
    assert len(fake.requests) == 1


async def test_openai_refuses_other_dimensions(endpoint: tuple[FakeEndpoint, str]) -> None:
    _, url = endpoint
    with pytest.raises(DocumentRejected) as caught:
        await _client(url, [], dimensions=384).embed_async(["a"])
    assert caught.value.reason == "EMBEDDING_DIMENSIONS_MISMATCH"


async def test_openai_unreachable_is_retryable() -> None:
    sleeps: list[float] = []
    with pytest.raises(IngestUnavailable):
        await _client("http://127.0.0.1:9/v1", sleeps).embed_async(["a"])
    assert len(sleeps) == 2


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("3", 3.0),
        ("1.5", 1.5),
        ("-2", 0.0),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("soon", None),
    ],
)
def test_retry_after(value: str | None, expected: float | None) -> None:
    now = 1445412480.0  # 10 s before the date above
    assert retry_after_seconds(value, now=now) == expected


async def test_openai_blocking_form_runs_in_a_thread(endpoint: tuple[FakeEndpoint, str]) -> None:
    _, url = endpoint
    vectors = await asyncio.to_thread(_client(url, []).embed, ["a", "b", "c"])
    assert len(vectors) == 3
