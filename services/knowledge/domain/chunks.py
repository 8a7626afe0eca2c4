"""Chunks and the ports ingestion and search share.

The pipeline (services/knowledge/ingest/) turns a document into `ChunkRecord`s
and writes them through `ChunkIndex`; search reads them back through the same
port. `Embedder` turns texts into unit-length vectors (cosine = dot product).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol


def chunk_id(document_id: str, chunk_index: int, text: str) -> str:
    """Stable id from the document, the position and the content: re-indexing the
    same content gives the same ids, so a redelivered task replaces, never adds."""
    digest = hashlib.sha256(f"{document_id}\x00{chunk_index}\x00{text}".encode()).hexdigest()
    return f"{document_id}-{chunk_index:06d}-{digest[:16]}"


@dataclass(frozen=True)
class ChunkRecord:
    id: str
    knowledge_base_id: str
    document_id: str
    text: str
    vector: Sequence[float]
    chunk_index: int
    token_count: int
    filename: str = ""
    content_type: str = ""
    page_number: int = 0
    heading: str = ""
    sheet: str = ""
    start_char: int = 0
    end_char: int = 0
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchFilters:
    """AND across fields, OR within one field; empty means no restriction."""

    document_ids: tuple[str, ...] = ()
    filenames: tuple[str, ...] = ()
    content_types: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchHit:
    chunk: ChunkRecord
    score: float


class Embedder(Protocol):
    @property
    def model(self) -> str: ...

    @property
    def dimensions(self) -> int: ...

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Unit-length vectors, one per text. CPU-heavy: call off the event loop."""
        ...

    def count_tokens(self, text: str) -> int: ...


class ChunkIndex(Protocol):
    """The vector + keyword index (LanceDB). Every call is scoped to one
    knowledge base; filters are built from values, never by pasting user input
    into query text."""

    async def replace_document(
        self, knowledge_base_id: str, document_id: str, chunks: Sequence[ChunkRecord]
    ) -> None:
        """Atomically makes `chunks` the document's chunks (idempotent)."""

    async def delete_document(self, knowledge_base_id: str, document_id: str) -> int:
        """Removes the document's chunks; returns how many there were."""

    async def delete_knowledge_base(self, knowledge_base_id: str) -> int: ...

    async def list_chunks(
        self, knowledge_base_id: str, document_id: str, offset: int, limit: int
    ) -> list[ChunkRecord]:
        """In document order (chunk_index)."""

    async def count_chunks(self, knowledge_base_id: str, document_id: str = "") -> int: ...

    async def search(
        self,
        knowledge_base_id: str,
        mode: str,
        query_text: str,
        query_vector: Sequence[float] | None,
        top_k: int,
        filters: SearchFilters,
    ) -> list[SearchHit]:
        """mode: "vector", "keyword" or "hybrid" (reciprocal-rank fusion).
        Best first; an empty knowledge base gives []."""
