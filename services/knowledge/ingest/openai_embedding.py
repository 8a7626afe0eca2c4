"""Embeddings from an OpenAI-compatible endpoint (`POST {base_url}/embeddings`).

Batches `batch_size` texts per request; retries 429, 5xx, timeouts and
connection errors with capped exponential backoff (full jitter), waiting what a
`Retry-After` header asks when there is one; other 4xx answers (bad key,
unknown model, input too long) are final. Vectors are L2-normalised so the
index's cosine = dot holds whatever the provider returns.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

from services.knowledge.ingest.errors import DocumentRejected, IngestUnavailable

_RETRY_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504})


class OpenAIEmbedder:
    """`Embedder` over HTTP. `embed_async` is the native call; `embed` (the port's
    blocking form) runs it on a private event loop, for callers in threads."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: str = "",
        batch_size: int = 64,
        max_attempts: int = 5,
        backoff_base_seconds: float = 0.5,
        backoff_cap_seconds: float = 30.0,
        timeout_seconds: float = 60.0,
        dimensions: int = 0,
        count_tokens: Callable[[str], int] | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
        rand: Callable[[], float] = random.random,
    ) -> None:
        if not base_url:
            raise ValueError("base_url is required")
        self._url = base_url.rstrip("/") + "/embeddings"
        self._model = model
        self._key = api_key
        self._batch_size = batch_size
        self._attempts = max_attempts
        self._base = backoff_base_seconds
        self._cap = backoff_cap_seconds
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._dimensions = dimensions
        self._count = count_tokens
        self._sleep = sleep
        self._rand = rand

    @property
    def model(self) -> str:
        return self._model

    @property
    def dimensions(self) -> int:
        """Known from settings, or from the first answer (0 before it)."""
        return self._dimensions

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def count_tokens(self, text: str) -> int:
        # The remote tokenizer is unknown offline: the local WordPiece count, or
        # ~4 characters a token, sizes chunks well enough.
        if self._count is not None:
            return self._count(text)
        return max(1, math.ceil(len(text) / 4))

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return asyncio.run(self.embed_async(texts))

    async def embed_async(self, texts: Sequence[str]) -> list[list[float]]:
        out: list[list[float]] = []
        if not texts:
            return out
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        async with aiohttp.ClientSession(timeout=self._timeout, headers=headers) as session:
            for start in range(0, len(texts), self._batch_size):
                batch = list(texts[start : start + self._batch_size])
                out.extend(await self._request(session, batch))
        return out

    async def _request(self, session: aiohttp.ClientSession, batch: list[str]) -> list[list[float]]:
        body = {"model": self._model, "input": batch, "encoding_format": "float"}
        last = ""
        for attempt in range(1, self._attempts + 1):
            wait: float | None = None
            try:
                async with session.post(self._url, json=body) as response:
                    if response.status == 200:
                        return self._vectors(await response.json(content_type=None), len(batch))
                    detail = (await response.text())[:300]
                    last = f"HTTP {response.status}: {detail}"
                    if response.status not in _RETRY_STATUSES:
                        raise DocumentRejected(
                            "EMBEDDING_REJECTED", f"the embedding endpoint refused: {last}"
                        )
                    wait = retry_after_seconds(response.headers.get("Retry-After"))
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt == self._attempts:
                break
            if wait is None:
                wait = min(self._cap, self._base * 2 ** (attempt - 1)) * (0.5 + 0.5 * self._rand())
            await self._sleep(min(wait, self._cap))
        raise IngestUnavailable(
            "EMBEDDING_UNAVAILABLE",
            f"the embedding endpoint failed {self._attempts} times; last: {last}",
        )

    def _vectors(self, answer: Any, expected: int) -> list[list[float]]:
        try:
            rows = sorted(answer["data"], key=lambda item: int(item.get("index", 0)))
            vectors = [[float(x) for x in row["embedding"]] for row in rows]
        except (KeyError, TypeError, ValueError) as exc:
            raise IngestUnavailable(
                "EMBEDDING_UNAVAILABLE", f"unexpected answer from the embedding endpoint: {exc}"
            ) from exc
        if len(vectors) != expected or not vectors or len({len(v) for v in vectors}) != 1:
            raise IngestUnavailable(
                "EMBEDDING_UNAVAILABLE",
                f"the embedding endpoint answered {len(vectors)} vectors for {expected} texts",
            )
        size = len(vectors[0])
        if self._dimensions and size != self._dimensions:
            raise DocumentRejected(
                "EMBEDDING_DIMENSIONS_MISMATCH",
                f"{self._model} answered {size} dimensions, expected {self._dimensions}",
            )
        self._dimensions = size
        return [_unit(v) for v in vectors]


def _unit(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
