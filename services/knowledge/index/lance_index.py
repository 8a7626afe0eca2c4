"""`ChunkIndex` on LanceDB: one table per knowledge base.

Why a table per knowledge base rather than one table with a kb column: a
query is sent to exactly one table, so a filter bug cannot leak another
knowledge base's chunks; deleting a knowledge base is one `drop_table`; and
each knowledge base keeps its own vector dimension (its embedding model).
The cost is one maintenance pass per table, which `maintain_all` does.

LanceDB calls block (Rust under the GIL-free hood, but synchronous): every
public coroutine runs them with `asyncio.to_thread`, so searches never block
the event loop. Tables are opened once and cached; a cached handle refreshes
itself per `index.read_consistency_seconds`, and this process's own writes
(e.g. DeleteDocument) are visible to its next search at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from lancedb.db import DBConnection
from lancedb.index import FTS, BTree, HnswSq
from lancedb.table import Table

from services.common.errors import FailedPrecondition
from services.knowledge.domain.chunks import ChunkRecord, SearchFilters, SearchHit
from services.knowledge.index.filters import document_filter, search_predicate
from services.knowledge.index.schema import (
    RESULT_COLUMNS,
    chunk_schema,
    from_row,
    table_name,
    to_table,
    vector_dimensions,
)

log = logging.getLogger(__name__)

MODES = ("vector", "keyword", "hybrid")
# Reciprocal-rank fusion: score = sum over retrievers of 1/(K + rank), rank
# from 1, K = 60 (the usual constant, also LanceDB's). A chunk ranked first by
# both scores 2/(K+1); hybrid scores are divided by that, so they lie in
# (0, 1] and 1 means "first in both lists".
RRF_K = 60
_RRF_BEST = 2.0 / (RRF_K + 1)


def _dimension_mismatch(knowledge_base_id: str, expected: int, got: int) -> FailedPrecondition:
    return FailedPrecondition(
        "EMBEDDING_DIMENSION_MISMATCH",
        f"knowledge base {knowledge_base_id!r} holds {expected}-dimensional vectors, "
        f"got {got}: its embedding model cannot change",
        metadata={
            "knowledge_base_id": knowledge_base_id,
            "expected": str(expected),
            "got": str(got),
        },
    )


class LanceChunkIndex:
    def __init__(self, db: DBConnection, *, vector_index_min_rows: int = 20_000) -> None:
        self._db = db
        self._vector_index_min_rows = vector_index_min_rows
        self._tables: dict[str, Table] = {}
        self._lock = threading.Lock()
        # Runs the keyword half of hybrid searches beside the vector half.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hybrid")

    # --- tables --------------------------------------------------------------------------

    def _open(self, knowledge_base_id: str) -> Table | None:
        """The knowledge base's table, or None while it has never had a chunk."""
        name = table_name(knowledge_base_id)
        table = self._tables.get(name)
        if table is not None:
            return table
        try:
            table = self._db.open_table(name)
        except ValueError:  # "Table ... was not found"
            return None
        with self._lock:
            return self._tables.setdefault(name, table)

    def _open_or_create(self, knowledge_base_id: str, dimensions: int) -> Table:
        table = self._open(knowledge_base_id)
        if table is None:
            name = table_name(knowledge_base_id)
            with self._lock:
                # exist_ok: another worker process may create it at the same moment.
                table = self._db.create_table(name, schema=chunk_schema(dimensions), exist_ok=True)
                self._tables[name] = table
            self._ensure_scalar_indexes(table)
        have = vector_dimensions(table.schema)
        if have != dimensions:
            raise _dimension_mismatch(knowledge_base_id, have, dimensions)
        return table

    def _ensure_scalar_indexes(self, table: Table) -> None:
        """BM25 on text, BTree on document_id. Created on the empty table: rows
        added later are searched unindexed until `optimize` folds them in."""
        have = {tuple(i.columns) for i in table.list_indices()}
        wanted: list[tuple[str, Any]] = [
            ("text", FTS(with_position=False)),
            ("document_id", BTree()),
        ]
        for column, config in wanted:
            if (column,) in have:
                continue
            try:
                table.create_index(column, config=config, replace=False)
            except Exception:  # a concurrent creator won; its index serves us too
                log.debug("index on %s already being created", column, exc_info=True)

    def _forget(self, knowledge_base_id: str) -> None:
        with self._lock:
            self._tables.pop(table_name(knowledge_base_id), None)

    # --- writes --------------------------------------------------------------------------

    async def replace_document(
        self, knowledge_base_id: str, document_id: str, chunks: Sequence[ChunkRecord]
    ) -> None:
        """One atomic commit: upsert by chunk id and delete the document's chunks
        that are no longer produced. A re-run (redelivered task) leaves the same
        rows. The vector dimension of the first chunks fixes the table's."""
        if not chunks:
            await self.delete_document(knowledge_base_id, document_id)
            return
        dimensions = len(chunks[0].vector)
        for chunk in chunks:
            if chunk.document_id != document_id or chunk.knowledge_base_id != knowledge_base_id:
                raise ValueError(f"chunk {chunk.id} belongs to another document")
            if len(chunk.vector) != dimensions:
                raise _dimension_mismatch(knowledge_base_id, dimensions, len(chunk.vector))

        def write() -> None:
            table = self._open_or_create(knowledge_base_id, dimensions)
            (
                table.merge_insert("chunk_id")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .when_not_matched_by_source_delete(document_filter(document_id))
                .execute(to_table(chunks, dimensions))
            )

        await asyncio.to_thread(write)

    async def delete_document(self, knowledge_base_id: str, document_id: str) -> int:
        def delete() -> int:
            table = self._open(knowledge_base_id)
            if table is None:
                return 0
            result = table.delete(document_filter(document_id))
            # num_deleted_rows exists at run time but is missing from the stubs.
            return int(getattr(result, "num_deleted_rows", 0))

        return await asyncio.to_thread(delete)

    async def delete_knowledge_base(self, knowledge_base_id: str) -> int:
        def drop() -> int:
            table = self._open(knowledge_base_id)
            if table is None:
                return 0
            count = table.count_rows()
            self._forget(knowledge_base_id)
            try:
                self._db.drop_table(table_name(knowledge_base_id))
            except ValueError:  # dropped by another replica meanwhile
                log.debug("table of %s already dropped", knowledge_base_id)
            return count

        return await asyncio.to_thread(drop)

    # --- reads ---------------------------------------------------------------------------

    async def list_chunks(
        self, knowledge_base_id: str, document_id: str, offset: int, limit: int
    ) -> list[ChunkRecord]:
        """Chunks whose chunk_index is in [offset, offset + limit), in document
        order. The pipeline numbers chunks 0, 1, 2…, so this is a page; a range
        on the column keeps a page of a 10,000-chunk document cheap."""

        def read() -> list[ChunkRecord]:
            table = self._open(knowledge_base_id)
            if table is None:
                return []
            where = (
                f"({document_filter(document_id).to_sql()}) "
                f"AND chunk_index >= {int(offset)} AND chunk_index < {int(offset) + int(limit)}"
            )
            rows = (
                table.search().where(where).select(list(RESULT_COLUMNS)).limit(int(limit)).to_list()
            )
            records = [from_row(knowledge_base_id, row) for row in rows]
            return sorted(records, key=lambda r: r.chunk_index)

        return await asyncio.to_thread(read)

    async def count_chunks(self, knowledge_base_id: str, document_id: str = "") -> int:
        def count() -> int:
            table = self._open(knowledge_base_id)
            if table is None:
                return 0
            if document_id:
                return table.count_rows(document_filter(document_id).to_sql())
            return table.count_rows()

        return await asyncio.to_thread(count)

    async def search(
        self,
        knowledge_base_id: str,
        mode: str,
        query_text: str,
        query_vector: Sequence[float] | None,
        top_k: int,
        filters: SearchFilters,
    ) -> list[SearchHit]:
        if mode not in MODES:
            raise ValueError(f"unknown search mode {mode!r}")
        if mode != "keyword" and query_vector is None:
            raise ValueError(f"{mode} search needs a query vector")
        return await asyncio.to_thread(
            self._search, knowledge_base_id, mode, query_text, query_vector, top_k, filters
        )

    def _search(
        self,
        knowledge_base_id: str,
        mode: str,
        query_text: str,
        query_vector: Sequence[float] | None,
        top_k: int,
        filters: SearchFilters,
    ) -> list[SearchHit]:
        table = self._open(knowledge_base_id)
        if table is None:
            return []
        try:
            return self._query(
                table, knowledge_base_id, mode, query_text, query_vector, top_k, filters
            )
        except FailedPrecondition:
            raise
        except Exception:
            # A cached handle of a table another replica dropped: reopen once.
            self._forget(knowledge_base_id)
            table = self._open(knowledge_base_id)
            if table is None:
                return []
            return self._query(
                table, knowledge_base_id, mode, query_text, query_vector, top_k, filters
            )

    def _query(
        self,
        table: Table,
        knowledge_base_id: str,
        mode: str,
        query_text: str,
        query_vector: Sequence[float] | None,
        top_k: int,
        filters: SearchFilters,
    ) -> list[SearchHit]:
        where = search_predicate(filters)
        vector: list[float] = []
        if query_vector is not None:
            vector = [float(x) for x in query_vector]
            have = vector_dimensions(table.schema)
            if len(vector) != have:
                raise _dimension_mismatch(knowledge_base_id, have, len(vector))
        if mode == "hybrid":
            fused = self._hybrid(table, vector, query_text, where, top_k)
            return [SearchHit(from_row(knowledge_base_id, row), score) for row, score in fused]
        rows = self._ranked(table, mode, vector, query_text, where, top_k)
        return [SearchHit(from_row(knowledge_base_id, row), _score(mode, row)) for row in rows]

    def _ranked(
        self,
        table: Table,
        mode: str,
        vector: list[float],
        query_text: str,
        where: str | None,
        limit: int,
    ) -> list[dict[str, Any]]:
        """One retriever's rows, best first, without their vectors. Naming the
        score column keeps Lance from logging a warning about auto-projecting it."""
        # The builders are typed as the base class; the methods used exist on
        # the vector / FTS builders `search` returns at run time.
        search: Any = table.search
        if mode == "vector":
            # Always the index's distance type: another one silently skips the ANN index.
            query = search(vector, query_type="vector").distance_type("cosine")
            query = query.select([*RESULT_COLUMNS, "_distance"])
        else:
            query = search(query_text, query_type="fts").select([*RESULT_COLUMNS, "_score"])
        if where is not None:
            query = query.where(where)
        rows: list[dict[str, Any]] = query.limit(limit).to_list()
        return rows

    def _hybrid(
        self,
        table: Table,
        vector: list[float],
        query_text: str,
        where: str | None,
        top_k: int,
    ) -> list[tuple[dict[str, Any], float]]:
        """Vector and BM25 retrieval side by side, fused by reciprocal rank.

        Done here rather than with LanceDB's hybrid query + RRFReranker (same
        formula): that one starts a thread pool per query and carries every
        row's vector through the fusion, which cost ~30% of a hybrid search
        at 100k chunks (bench/search.py)."""
        keyword = self._pool.submit(
            self._ranked, table, "keyword", vector, query_text, where, top_k
        )
        by_vector = self._ranked(table, "vector", vector, query_text, where, top_k)
        by_keyword = keyword.result()
        scores: dict[str, float] = {}
        rows: dict[str, dict[str, Any]] = {}
        for ranked in (by_vector, by_keyword):
            for rank, row in enumerate(ranked, start=1):
                chunk = row["chunk_id"]
                scores[chunk] = scores.get(chunk, 0.0) + 1.0 / (RRF_K + rank)
                rows.setdefault(chunk, row)
        best = sorted(scores, key=lambda c: (-scores[c], c))[:top_k]
        return [(rows[c], min(1.0, scores[c] / _RRF_BEST)) for c in best]

    # --- maintenance ---------------------------------------------------------------------

    def maintain(self, knowledge_base_id: str) -> None:
        """Compacts fragments, folds new rows into the indexes, and builds the
        ANN vector index once the table is big enough. Blocking; safe next to
        writers and readers in other processes (measured in STORAGE-NOTES.md)."""
        table = self._open(knowledge_base_id)
        if table is None:
            return
        has_vector_index = any(tuple(i.columns) == ("vector",) for i in table.list_indices())
        if not has_vector_index and table.count_rows() >= self._vector_index_min_rows:
            # IVF + HNSW with scalar quantisation, cosine like every query.
            # ef_construction 100 instead of 300: the build of 100k chunks took
            # 32 s instead of ~110 s on 2 busy cores (bench/search.py), for a
            # graph that is still well connected at m = 20.
            table.create_index("vector", config=HnswSq(distance_type="cosine", ef_construction=100))
        for attempt in range(1, _OPTIMIZE_TRIES + 1):
            try:
                table.optimize()
                return
            except RuntimeError as exc:
                # A write committed while this pass compacted: Lance drops the
                # pass's commit and says so; the rewritten fragments are GC'd.
                if _COMMIT_CONFLICT not in str(exc) or attempt == _OPTIMIZE_TRIES:
                    raise
                log.info(
                    "index maintenance lost a commit race with a write; running it again",
                    extra={"knowledge_base_id": knowledge_base_id, "attempt": attempt},
                )

    def knowledge_base_ids(self) -> list[str]:
        names: list[str] = list(self._db.list_tables().tables)
        return [n.removeprefix("kb_") for n in names if n.startswith("kb_")]

    def maintain_all(self) -> int:
        """Maintains every knowledge base's table; returns how many."""
        done = 0
        for knowledge_base_id in self.knowledge_base_ids():
            try:
                self.maintain(knowledge_base_id)
                done += 1
            except Exception:
                log.exception(
                    "index maintenance failed", extra={"knowledge_base_id": knowledge_base_id}
                )
        return done


# How many times a maintenance pass is run at once when a concurrent write
# wins the commit (Lance's "Retryable commit conflict").
_OPTIMIZE_TRIES = 3
_COMMIT_CONFLICT = "Retryable commit conflict"


def _score(mode: str, row: dict[str, Any]) -> float:
    if mode == "vector":
        # Cosine distance is in [0, 2]; similarity below 0 (opposite) shows as 0.
        return min(1.0, max(0.0, 1.0 - float(row["_distance"])))
    return float(row["_score"])  # BM25: relative, unbounded
