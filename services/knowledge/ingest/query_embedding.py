"""Search queries embedded with the knowledge base's own model.

A knowledge base records its provider and model, and its chunks were embedded
with it: a query embedded with anything else lands in another vector space
(or does not even have the table's dimension). "local" knowledge bases use the
service's ONNX MiniLM (run in a thread: it is CPU work); "openai" ones call the
configured OpenAI-compatible endpoint with the knowledge base's model. A query
is interactive, so the remote call retries less than ingestion does
(`QUERY_MAX_ATTEMPTS`, `QUERY_TIMEOUT_SECONDS`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from services.common.errors import FailedPrecondition, KbmeshError, Unavailable
from services.knowledge.domain.chunks import Embedder
from services.knowledge.domain.knowledge_bases import KnowledgeBase
from services.knowledge.ingest.errors import DocumentRejected, IngestUnavailable
from services.knowledge.ingest.openai_embedding import OpenAIEmbedder
from services.knowledge.settings import EmbeddingSettings

QUERY_MAX_ATTEMPTS = 2
QUERY_TIMEOUT_SECONDS = 10.0


def remote_embedder(
    settings: EmbeddingSettings,
    model: str,
    dimensions: int,
    *,
    max_attempts: int | None = None,
    timeout_seconds: float | None = None,
    count_tokens: Callable[[str], int] | None = None,
) -> OpenAIEmbedder:
    """The OpenAI-compatible client for `model`, configured from `settings`."""
    return OpenAIEmbedder(
        base_url=settings.openai_base_url,
        model=model,
        api_key=settings.openai_api_key.get_secret_value(),
        batch_size=settings.openai_batch_size,
        max_attempts=max_attempts or settings.openai_max_attempts,
        backoff_base_seconds=settings.openai_backoff_base_seconds,
        backoff_cap_seconds=settings.openai_backoff_cap_seconds,
        timeout_seconds=timeout_seconds or settings.openai_timeout_seconds,
        dimensions=dimensions,
        count_tokens=count_tokens,
    )


class QueryEmbedders:
    """`local`: the service's local model, or None when it is not installed."""

    def __init__(self, local: Embedder | None, settings: EmbeddingSettings | None = None) -> None:
        self._local = local
        self._settings = settings or EmbeddingSettings()
        self._remote: dict[str, OpenAIEmbedder] = {}

    async def embed(self, kb: KnowledgeBase, text: str) -> list[float]:
        if kb.embedding_provider in ("", "local"):
            return await self._embed_local(kb, text)
        if kb.embedding_provider == "openai":
            return await self._embed_remote(kb, text)
        raise FailedPrecondition(
            "EMBEDDING_NOT_CONFIGURED",
            f"unknown embedding provider {kb.embedding_provider!r}",
            metadata={"knowledge_base_id": kb.id},
        )

    async def _embed_local(self, kb: KnowledgeBase, text: str) -> list[float]:
        embedder = self._local
        if embedder is None:
            raise FailedPrecondition(
                "INGESTION_NOT_AVAILABLE",
                "this service has no embedding model: vector and hybrid search are "
                "not available; keyword search is",
            )
        _check_dimensions(kb, embedder.model, embedder.dimensions)
        # CPU-bound (the ONNX model): off the event loop.
        vectors = await asyncio.to_thread(embedder.embed, [text])
        return vectors[0]

    async def _embed_remote(self, kb: KnowledgeBase, text: str) -> list[float]:
        settings = self._settings
        if not settings.openai_base_url:
            raise FailedPrecondition(
                "EMBEDDING_NOT_CONFIGURED",
                f"knowledge base {kb.id!r} uses the OpenAI-compatible model "
                f"{kb.embedding_model!r} but embedding.openai_base_url is not set on this "
                "service: vector and hybrid search are not available; keyword search is",
                metadata={"knowledge_base_id": kb.id},
            )
        remote = self._remote.get(kb.embedding_model)
        if remote is None:
            remote = remote_embedder(
                settings,
                kb.embedding_model,
                kb.embedding_dimensions,
                max_attempts=min(QUERY_MAX_ATTEMPTS, settings.openai_max_attempts),
                timeout_seconds=min(QUERY_TIMEOUT_SECONDS, settings.openai_timeout_seconds),
            )
            self._remote[kb.embedding_model] = remote
        try:
            vectors = await remote.embed_async([text])
        except IngestUnavailable as exc:
            raise Unavailable(exc.reason, exc.message, retry_after=1.0) from exc
        except DocumentRejected as exc:
            # Search's own name for a vector of the wrong size (docs/errors.md).
            reason = (
                "EMBEDDING_DIMENSION_MISMATCH"
                if exc.reason == "EMBEDDING_DIMENSIONS_MISMATCH"
                else exc.reason
            )
            raise FailedPrecondition(reason, exc.message) from exc
        _check_dimensions(kb, remote.model, len(vectors[0]))
        return vectors[0]


def _check_dimensions(kb: KnowledgeBase, model: str, got: int) -> None:
    expected = kb.embedding_dimensions
    if expected and got != expected:
        raise _mismatch(expected, got, model)


def _mismatch(expected: int, got: int, model: str) -> KbmeshError:
    return FailedPrecondition(
        "EMBEDDING_DIMENSION_MISMATCH",
        f"the knowledge base holds {expected}-dimensional vectors; this service embeds "
        f"queries with {model} ({got})",
        metadata={"expected": str(expected), "got": str(got)},
    )
