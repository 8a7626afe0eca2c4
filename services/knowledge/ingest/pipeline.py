"""`IngestHandler`: the knowledge worker's task handler (handlers.TaskHandler).

For one attempt: look up the knowledge base (its chunking defaults and
embedding model), stream the object from S3 to a temporary file, sniff its
type, parse, chunk, embed and write the chunks with one
`ChunkIndex.replace_document` — reporting stage and fraction on the way
(bytes downloaded, pages parsed of total, chunks embedded of total).

Failures: a bad document (DocumentRejected) fails the task without a retry,
with its reason; trouble with S3 or the embedding endpoint (IngestUnavailable)
is retried. Cancellation arrives at an `await`; the temporary file goes in
`finally`, and as the index write is one atomic replace at the very end,
nothing partial is left in the index.

CPU work (parsing, splitting, the local model) runs through
`context.run_blocking`, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from services.common.errors import Code, KbmeshError
from services.knowledge.domain.chunks import ChunkIndex, ChunkRecord, Embedder, chunk_id
from services.knowledge.domain.knowledge_bases import KnowledgeBase
from services.knowledge.ingest import chunking
from services.knowledge.ingest.chunking import Chunk, ChunkPlan
from services.knowledge.ingest.embedding import OnnxMiniLM, shared_minilm
from services.knowledge.ingest.errors import DocumentRejected, IngestUnavailable, Stopped
from services.knowledge.ingest.openai_embedding import OpenAIEmbedder
from services.knowledge.ingest.parsers import Parsed, parse
from services.knowledge.ingest.query_embedding import remote_embedder
from services.knowledge.ingest.sniff import MEDIA_TYPES, SNIFF_BYTES, Kind, sniff
from services.knowledge.settings import EmbeddingSettings, IngestSettings, KnowledgeSettings
from services.knowledge.worker.handlers import (
    Job,
    JobContext,
    JobFailed,
    JobResult,
    Stage,
    WorkerResources,
)

log = logging.getLogger(__name__)

# Bytes per S3 read: bounded memory whatever the object's size.
_READ_BYTES = 1 << 20
# Share of the job's progress each stage ends at (embedding dominates).
_DOWNLOADED, _PARSED, _CHUNKED, _EMBEDDED = 0.05, 0.25, 0.30, 0.95


class KnowledgeBaseLookup(Protocol):
    async def get(self, kb_id: str) -> KnowledgeBase | None: ...


class DocumentLookup(Protocol):
    async def current_task(self, knowledge_base_id: str, document_id: str) -> str | None:
        """The document's latest task id; None once it is deleted (or being deleted)."""


@dataclass(frozen=True)
class _Work:
    """What the blocking part produced."""

    kind: Kind
    parsed: Parsed
    chunks: list[Chunk]


class IngestHandler:
    """See the module docstring."""

    def __init__(
        self,
        *,
        index: ChunkIndex,
        s3: Any,
        knowledge_bases: KnowledgeBaseLookup,
        ingest: IngestSettings | None = None,
        embedding: EmbeddingSettings | None = None,
        local_embedder: OnnxMiniLM | None = None,
        documents: DocumentLookup | None = None,
    ) -> None:
        self._index = index
        self._documents = documents
        self._s3 = s3
        self._kbs = knowledge_bases
        self._limits = ingest or IngestSettings()
        self._embedding = embedding or EmbeddingSettings()
        self._local = local_embedder or shared_minilm(self._embedding.local_batch_size)
        self._remote: dict[str, OpenAIEmbedder] = {}

    async def run(self, job: Job, context: JobContext) -> JobResult:
        path: Path | None = None
        try:
            kb = await self._kbs.get(job.knowledge_base_id)
            if kb is None:
                raise DocumentRejected(
                    "KNOWLEDGE_BASE_NOT_FOUND",
                    f"knowledge base {job.knowledge_base_id!r} does not exist",
                )
            await self._require_current(job)
            embedder, max_tokens = self._embedder_for(kb)
            chunk_plan = chunking.plan(
                kb.chunking,
                job.chunking_strategy,
                job.chunk_size,
                job.chunk_overlap,
                max_chunk_tokens=max_tokens,
            )
            path = await self._temp_file(context)
            await self._download(job, path, context)
            work = await context.run_blocking(self._parse_and_split, job, path, chunk_plan, context)
            path = self._remove(path)
            vectors, tokens = await self._embed(embedder, work.chunks, context)
            records = self._records(job, work, vectors, tokens)
            await context.progress(Stage.INDEXING, _EMBEDDED, f"{len(records)} chunks")
            await self._require_current(job)
            await self._index.replace_document(job.knowledge_base_id, job.document_id, records)
            await self._undo_if_deleted(job)
            return JobResult(
                chunk_count=len(records),
                page_count=work.parsed.page_count,
                token_count=sum(tokens),
            )
        except DocumentRejected as exc:
            raise JobFailed(exc.reason, exc.message, retryable=False, code=exc.code) from exc
        except IngestUnavailable as exc:
            raise JobFailed(exc.reason, exc.message, retryable=True) from exc
        except Stopped:
            # The thread saw the cancel flag before the coroutine saw the cancellation.
            raise asyncio.CancelledError from None
        except KbmeshError as exc:
            # From the index, e.g. FAILED_PRECONDITION when vector sizes do not match.
            retryable = exc.code in (Code.UNAVAILABLE, Code.ABORTED, Code.DEADLINE_EXCEEDED)
            raise JobFailed(
                exc.reason, exc.message, retryable=retryable, code=exc.code.name
            ) from exc
        finally:
            if path is not None:
                self._remove(path)

    # --- the document is still there ---

    async def _gone(self, job: Job) -> str:
        """Why this run must not leave chunks ("" when it may): the document was
        deleted (or is being deleted), or a newer task is now its latest."""
        if self._documents is None:
            return ""
        task_id = await self._documents.current_task(job.knowledge_base_id, job.document_id)
        if task_id is None or await self._kbs.get(job.knowledge_base_id) is None:
            return "DOCUMENT_DELETED"
        if task_id != job.task_id:
            return "TASK_SUPERSEDED"
        return ""

    async def _require_current(self, job: Job) -> None:
        reason = await self._gone(job)
        if reason:
            raise _stale(reason, job)

    async def _undo_if_deleted(self, job: Job) -> None:
        """After the write: a DeleteDocument (or DeleteKnowledgeBase) that removed
        the chunks between the check above and the write would leave these behind;
        they go again. (A superseding run replaces them itself.)"""
        if await self._gone(job) == "DOCUMENT_DELETED":
            deleted = await self._index.delete_document(job.knowledge_base_id, job.document_id)
            log.info(
                "document deleted during ingestion: its chunks removed again",
                extra={"task_id": job.task_id, "document_id": job.document_id, "chunks": deleted},
            )
            raise _stale("DOCUMENT_DELETED", job)

    # --- embedding model ---

    def _embedder_for(self, kb: KnowledgeBase) -> tuple[Embedder, int]:
        """The knowledge base's model, and the largest chunk it embeds whole."""
        if kb.embedding_provider in ("", "local"):
            embedder: Embedder = self._local
            max_tokens = chunking.LOCAL_MAX_CHUNK_TOKENS
        elif kb.embedding_provider == "openai":
            settings = self._embedding
            if not settings.openai_base_url:
                raise DocumentRejected(
                    "EMBEDDING_NOT_CONFIGURED",
                    "the knowledge base uses an OpenAI-compatible model but "
                    "embedding.openai_base_url is not set on this worker",
                )
            remote = self._remote.get(kb.embedding_model)
            if remote is None:
                remote = remote_embedder(
                    settings,
                    kb.embedding_model,
                    kb.embedding_dimensions,
                    count_tokens=self._local.count_tokens,
                )
                self._remote[kb.embedding_model] = remote
            embedder, max_tokens = remote, settings.openai_max_chunk_tokens
        else:
            raise DocumentRejected(
                "EMBEDDING_NOT_CONFIGURED", f"unknown embedding provider {kb.embedding_provider!r}"
            )
        # Vectors of another size would not fit the knowledge base's index.
        if kb.embedding_dimensions and embedder.dimensions not in (0, kb.embedding_dimensions):
            raise DocumentRejected(
                "EMBEDDING_DIMENSIONS_MISMATCH",
                f"{embedder.model} gives {embedder.dimensions} dimensions; the knowledge base "
                f"holds {kb.embedding_dimensions}",
            )
        return embedder, max_tokens

    # --- download ---

    async def _temp_file(self, context: JobContext) -> Path:
        directory = self._limits.temp_dir or None
        fd, name = await context.run_blocking(
            tempfile.mkstemp, ".part", "kbmesh-ingest-", directory
        )
        os.close(fd)
        return Path(name)

    @staticmethod
    def _remove(path: Path) -> None:
        path.unlink(missing_ok=True)

    async def _download(self, job: Job, path: Path, context: JobContext) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        limit = self._limits.max_document_bytes
        if job.object.size_bytes > limit:
            raise _too_large(job.object.size_bytes, limit)
        await context.progress(Stage.DOWNLOADING, 0.0)
        try:
            answer = await self._s3.get_object(Bucket=job.object.bucket, Key=job.object.key)
            size = int(answer.get("ContentLength", 0))
            if size > limit:
                raise _too_large(size, limit)
            if size == 0:
                raise DocumentRejected("DOCUMENT_EMPTY", "the document has no bytes")
            received = 0
            body = answer["Body"]
            # Read through the StreamingBody itself: what its __aenter__ returns is
            # the raw aiohttp response, whose read() takes no size.
            async with body:
                with path.open("wb") as out:
                    while block := await body.read(_READ_BYTES):
                        received += len(block)
                        if received > limit:
                            raise _too_large(received, limit)
                        await context.run_blocking(out.write, block)
                        await context.progress(
                            Stage.DOWNLOADING,
                            _between(0.0, _DOWNLOADED, received, size),
                            f"{received} of {size} bytes",
                        )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NoSuchBucket", "NotFound"):
                raise DocumentRejected(
                    "OBJECT_NOT_FOUND",
                    f"the document's object {job.object.key!r} is gone (deleted?)",
                ) from exc
            raise IngestUnavailable("STORAGE_UNAVAILABLE", f"S3 failed: {code or exc}") from exc
        except (BotoCoreError, OSError, TimeoutError) as exc:
            # aiohttp's connection errors are OSErrors too.
            raise IngestUnavailable("STORAGE_UNAVAILABLE", f"S3 failed: {exc}") from exc

    # --- blocking: sniff, parse, split ---

    def _parse_and_split(
        self, job: Job, path: Path, chunk_plan: ChunkPlan, context: JobContext
    ) -> _Work:
        with path.open("rb") as f:
            head = f.read(SNIFF_BYTES)
        kind = sniff(head, job.filename)
        context.progress_threadsafe(Stage.PARSING, _DOWNLOADED, kind.value)

        def parsed_pages(done: int, total: int) -> None:
            context.progress_threadsafe(
                Stage.PARSING,
                _between(_DOWNLOADED, _PARSED, done, total),
                f"{done} of {total} pages parsed",
            )

        parsed = parse(kind, path, self._limits, progress=parsed_pages, cancelled=context.cancelled)

        def split_sections(done: int, total: int) -> None:
            context.progress_threadsafe(
                Stage.CHUNKING,
                _between(_PARSED, _CHUNKED, done, total),
                f"{done} of {total} sections split",
            )

        chunks = chunking.split(
            parsed.sections,
            chunk_plan,
            self._local.token_ids,
            max_chunks=self._limits.max_chunks,
            cancelled=context.cancelled,
            progress=split_sections,
        )
        if not chunks:
            raise DocumentRejected("NO_EXTRACTABLE_TEXT", "the document has no text to index")
        return _Work(kind, parsed, chunks)

    # --- embedding ---

    async def _embed(
        self, embedder: Embedder, chunks: Sequence[Chunk], context: JobContext
    ) -> tuple[list[list[float]], list[int]]:
        """Batch by batch, so progress is reported and a cancel lands between batches."""
        texts = [c.text for c in chunks]
        batch = max(1, int(getattr(embedder, "batch_size", 16)))
        vectors: list[list[float]] = []
        tokens = await context.run_blocking(_count_tokens, embedder, texts)
        await context.progress(Stage.EMBEDDING, _CHUNKED, f"0 of {len(texts)} chunks embedded")
        for start in range(0, len(texts), batch):
            part = texts[start : start + batch]
            if isinstance(embedder, OpenAIEmbedder):
                vectors.extend(await embedder.embed_async(part))
            else:
                vectors.extend(await context.run_blocking(embedder.embed, part))
            done = start + len(part)
            await context.progress(
                Stage.EMBEDDING,
                _between(_CHUNKED, _EMBEDDED, done, len(texts)),
                f"{done} of {len(texts)} chunks embedded",
            )
        return vectors, tokens

    @staticmethod
    def _records(
        job: Job,
        work: _Work,
        vectors: list[list[float]],
        tokens: list[int],
    ) -> list[ChunkRecord]:
        metadata = dict(job.metadata)
        return [
            ChunkRecord(
                id=chunk_id(job.document_id, chunk.chunk_index, chunk.text),
                knowledge_base_id=job.knowledge_base_id,
                document_id=job.document_id,
                text=chunk.text,
                vector=vector,
                chunk_index=chunk.chunk_index,
                token_count=count,
                filename=job.filename,
                content_type=MEDIA_TYPES[work.kind],
                page_number=chunk.page_number,
                heading=chunk.heading,
                sheet=chunk.sheet,
                start_char=chunk.start_char,
                end_char=chunk.end_char,
                metadata=metadata,
            )
            for chunk, vector, count in zip(work.chunks, vectors, tokens, strict=True)
        ]


def _between(low: float, high: float, done: int, total: int) -> float:
    """The job's fraction `done` of `total` through a stage spanning low..high."""
    return min(high, low + (high - low) * done / max(total, 1))


def _count_tokens(embedder: Embedder, texts: Sequence[str]) -> list[int]:
    return [embedder.count_tokens(t) for t in texts]


def _stale(reason: str, job: Job) -> DocumentRejected:
    if reason == "TASK_SUPERSEDED":
        return DocumentRejected(
            reason,
            f"task {job.task_id!r} is no longer the latest of document {job.document_id!r}",
        )
    return DocumentRejected(reason, f"document {job.document_id!r} was deleted during ingestion")


def _too_large(size: int, limit: int) -> DocumentRejected:
    return DocumentRejected(
        "DOCUMENT_TOO_LARGE",
        f"the document has {size} bytes (limit {limit}, ingest.max_document_bytes)",
    )


def ingest_handler(resources: WorkerResources) -> IngestHandler:
    """The worker's default handler factory (`worker.handler`): S3, Redis (knowledge
    bases), the chunk index and the settings from the resources. Without an index
    in the resources (a standalone worker), it opens the configured LanceDB location
    itself: blocking, once, at start-up."""
    from services.knowledge.adapters.redis_documents import RedisDocuments
    from services.knowledge.adapters.redis_kb_store import RedisKnowledgeBases

    if resources.redis is None or resources.s3 is None:
        raise ValueError("the ingestion handler needs the worker's Redis and S3")
    settings = resources.settings
    if not isinstance(settings, KnowledgeSettings):
        raise ValueError("the ingestion handler needs the service's KnowledgeSettings")
    index: ChunkIndex | None = resources.index
    if index is None:
        from services.knowledge.index.lance_index import LanceChunkIndex
        from services.knowledge.index.location import connect

        index = LanceChunkIndex(
            connect(settings.index, settings.s3),
            vector_index_min_rows=settings.index.vector_index_min_rows,
        )
    return IngestHandler(
        index=index,
        s3=resources.s3,
        knowledge_bases=RedisKnowledgeBases(resources.redis),
        ingest=settings.ingest,
        embedding=settings.embedding,
        local_embedder=shared_minilm(settings.embedding.local_batch_size),
        documents=RedisDocuments(resources.redis),
    )
