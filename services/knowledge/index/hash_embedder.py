"""TEST ONLY: a deterministic embedder without a model (`embedding.provider=hash`).

Each lower-cased word is hashed to one of `dimensions` buckets with a sign;
the vector is L2-normalised. Texts sharing words are close, nothing more: it
lets tests and benchmarks exercise vector and hybrid search with answers known
in advance, without the ONNX model. Never use it for real knowledge bases.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

_WORD = re.compile(r"\w+")


class HashEmbedder:
    def __init__(self, dimensions: int = 384) -> None:
        self._dimensions = dimensions

    @property
    def model(self) -> str:
        return f"hash-{self._dimensions}"

    @property
    def dimensions(self) -> int:
        return self._dimensions

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [self._one(text) for text in texts]

    def count_tokens(self, text: str) -> int:
        return len(_WORD.findall(text))

    def _one(self, text: str) -> list[float]:
        vector = [0.0] * self._dimensions
        for word in _WORD.findall(text.lower()):
            digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
            bucket = int.from_bytes(digest[:4], "little") % self._dimensions
            vector[bucket] += 1.0 if digest[4] & 1 else -1.0
        norm = math.sqrt(sum(x * x for x in vector))
        if norm == 0.0:
            # No words: a fixed unit vector, so the result is still valid input.
            vector[0] = 1.0
            return vector
        return [x / norm for x in vector]
