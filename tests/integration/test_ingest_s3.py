"""The ingestion handler against a real S3 (SeaweedFS): the object is streamed to a
temporary file, parsed, embedded with the real model and written to the index."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.common.connections import open_s3
from services.knowledge.ingest.embedding import shared_minilm
from services.knowledge.ingest.pipeline import IngestHandler
from services.knowledge.settings import IngestSettings
from services.knowledge.worker.handlers import JobFailed, ObjectRef
from tests import documents
from tests.conftest import BucketFactory
from tests.memory_index import MemoryChunkIndex
from tests.unit.test_ingest_pipeline import FakeContext, FakeKnowledgeBases, _job, _kb

pytestmark = pytest.mark.integration


@pytest.fixture
async def s3(new_bucket: BucketFactory) -> AsyncIterator[tuple[Any, str]]:
    bucket = new_bucket()
    settings = bucket.for_service()
    async with open_s3(settings) as client:
        yield client, bucket.bucket


async def test_a_pdf_from_s3_is_indexed(s3: tuple[Any, str], tmp_path: Path) -> None:
    client, bucket = s3
    data = documents.pdf(
        [("Intro", "Kbmesh indexes documents."), ("Billing", "Invoices are due in 30 days.")]
    )
    await client.put_object(Bucket=bucket, Key="kb1/doc/report.pdf", Body=data)
    index = MemoryChunkIndex()
    handler = IngestHandler(
        index=index,
        s3=client,
        knowledge_bases=FakeKnowledgeBases(_kb()),
        ingest=IngestSettings(temp_dir=str(tmp_path)),
        local_embedder=shared_minilm(),
    )
    job = _job("report.pdf", data, object=ObjectRef(bucket, "kb1/doc/report.pdf", len(data), ""))
    result = await handler.run(job, FakeContext())
    assert (result.chunk_count, result.page_count) == (2, 2)
    chunks = index.documents[("kb1", "doc-report.pdf")]
    assert [c.page_number for c in chunks] == [1, 2]
    assert "Invoices" in chunks[1].text
    assert not any(tmp_path.iterdir())  # noqa: ASYNC240  # the temp file is gone

    missing = _job("x.pdf", data, object=ObjectRef(bucket, "kb1/doc/missing.pdf", 10, ""))
    with pytest.raises(JobFailed) as caught:
        await handler.run(missing, FakeContext())
    assert (caught.value.reason, caught.value.retryable) == ("OBJECT_NOT_FOUND", False)
