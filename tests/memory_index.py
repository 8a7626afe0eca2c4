"""An in-memory `ChunkIndex` for tests of the ingestion pipeline (no LanceDB)."""

from __future__ import annotations

from collections.abc import Sequence

from services.knowledge.domain.chunks import ChunkRecord, SearchFilters, SearchHit


class MemoryChunkIndex:
    def __init__(self) -> None:
        # (knowledge base, document) -> chunks in document order.
        self.documents: dict[tuple[str, str], list[ChunkRecord]] = {}
        self.writes = 0

    async def replace_document(
        self, knowledge_base_id: str, document_id: str, chunks: Sequence[ChunkRecord]
    ) -> None:
        self.writes += 1
        self.documents[(knowledge_base_id, document_id)] = sorted(
            chunks, key=lambda c: c.chunk_index
        )

    async def delete_document(self, knowledge_base_id: str, document_id: str) -> int:
        return len(self.documents.pop((knowledge_base_id, document_id), []))

    async def delete_knowledge_base(self, knowledge_base_id: str) -> int:
        doomed = [key for key in self.documents if key[0] == knowledge_base_id]
        return sum(len(self.documents.pop(key)) for key in doomed)

    async def list_chunks(
        self, knowledge_base_id: str, document_id: str, offset: int, limit: int
    ) -> list[ChunkRecord]:
        return self.documents.get((knowledge_base_id, document_id), [])[offset : offset + limit]

    async def count_chunks(self, knowledge_base_id: str, document_id: str = "") -> int:
        return sum(
            len(chunks)
            for (kb, doc), chunks in self.documents.items()
            if kb == knowledge_base_id and document_id in ("", doc)
        )

    async def search(
        self,
        knowledge_base_id: str,
        mode: str,
        query_text: str,
        query_vector: Sequence[float] | None,
        top_k: int,
        filters: SearchFilters,
    ) -> list[SearchHit]:
        """Vector mode only: dot product (vectors are unit length)."""
        assert query_vector is not None
        hits = [
            SearchHit(chunk, sum(a * b for a, b in zip(chunk.vector, query_vector, strict=True)))
            for (kb, _), chunks in self.documents.items()
            if kb == knowledge_base_id
            for chunk in chunks
        ]
        return sorted(hits, key=lambda h: -h.score)[:top_k]
