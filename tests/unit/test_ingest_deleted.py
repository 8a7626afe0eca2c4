"""A document deleted while its ingestion runs leaves no chunks behind, whichever
side of the handler's checks the delete lands on (the real-services version is
tests/integration/test_reindex.py)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from services.knowledge.domain.chunks import ChunkRecord
from services.knowledge.ingest.embedding import shared_minilm
from services.knowledge.ingest.pipeline import IngestHandler
from services.knowledge.settings import IngestSettings
from services.knowledge.worker.handlers import JobFailed
from tests import documents
from tests.memory_index import MemoryChunkIndex
from tests.unit.test_ingest_pipeline import FakeContext, FakeKnowledgeBases, FakeS3, _job, _kb

DATA = documents.MARKDOWN


class FakeDocuments:
    """Document records: id -> latest task id (absent = deleted)."""

    def __init__(self) -> None:
        self.latest: dict[str, str] = {}

    async def current_task(self, knowledge_base_id: str, document_id: str) -> str | None:
        return self.latest.get(document_id)


class DeletingIndex(MemoryChunkIndex):
    """Runs a DeleteDocument (flag the record, remove the chunks) right before
    the handler's write lands: the race the check after the write closes."""

    def __init__(self, documents: FakeDocuments) -> None:
        super().__init__()
        self.records = documents
        self.delete_before_write = False

    async def replace_document(
        self, knowledge_base_id: str, document_id: str, chunks: Sequence[ChunkRecord]
    ) -> None:
        if self.delete_before_write:
            self.records.latest.pop(document_id, None)
            await self.delete_document(knowledge_base_id, document_id)
        await super().replace_document(knowledge_base_id, document_id, chunks)


def _handler(tmp_path: Path) -> tuple[IngestHandler, DeletingIndex, FakeDocuments, FakeS3]:
    docs = FakeDocuments()
    index = DeletingIndex(docs)
    s3 = FakeS3()
    s3.objects["objects/guide.md"] = DATA
    handler = IngestHandler(
        index=index,
        s3=s3,
        knowledge_bases=FakeKnowledgeBases(_kb()),
        ingest=IngestSettings(temp_dir=str(tmp_path)),
        local_embedder=shared_minilm(),
        documents=docs,
    )
    return handler, index, docs, s3


async def test_a_live_document_is_indexed(tmp_path: Path) -> None:
    handler, index, docs, _ = _handler(tmp_path)
    job = _job("guide.md", DATA)
    docs.latest[job.document_id] = job.task_id
    result = await handler.run(job, FakeContext())
    assert result.chunk_count >= 1
    assert await index.count_chunks("kb1", job.document_id) == result.chunk_count


async def test_deleted_before_the_run_writes_nothing(tmp_path: Path) -> None:
    handler, index, _, _ = _handler(tmp_path)
    job = _job("guide.md", DATA)  # no record: deleted before the worker got it
    with pytest.raises(JobFailed) as caught:
        await handler.run(job, FakeContext())
    assert (caught.value.reason, caught.value.retryable) == ("DOCUMENT_DELETED", False)
    assert caught.value.code == "NOT_FOUND"
    assert await index.count_chunks("kb1") == 0


async def test_deleted_between_the_check_and_the_write_removes_its_chunks(
    tmp_path: Path,
) -> None:
    handler, index, docs, _ = _handler(tmp_path)
    job = _job("guide.md", DATA)
    docs.latest[job.document_id] = job.task_id
    index.delete_before_write = True
    with pytest.raises(JobFailed) as caught:
        await handler.run(job, FakeContext())
    assert caught.value.reason == "DOCUMENT_DELETED"
    assert await index.count_chunks("kb1", job.document_id) == 0


async def test_a_superseded_run_writes_nothing(tmp_path: Path) -> None:
    handler, index, docs, _ = _handler(tmp_path)
    job = _job("guide.md", DATA)
    docs.latest[job.document_id] = "a-newer-task"
    with pytest.raises(JobFailed) as caught:
        await handler.run(job, FakeContext())
    assert (caught.value.reason, caught.value.retryable) == ("TASK_SUPERSEDED", False)
    assert await index.count_chunks("kb1") == 0
