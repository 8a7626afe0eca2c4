"""The ingestion handler end to end: S3 object (faked here; real in
tests/integration/test_ingest_s3.py) → parse → chunk → real ONNX embeddings →
in-memory index, with the task's progress, failures and cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from services.knowledge.domain.chunks import chunk_id
from services.knowledge.domain.knowledge_bases import ChunkingDefaults, KnowledgeBase
from services.knowledge.ingest.embedding import OnnxMiniLM, shared_minilm
from services.knowledge.ingest.pipeline import IngestHandler
from services.knowledge.settings import IngestSettings
from services.knowledge.worker.handlers import Job, JobFailed, JobResult, ObjectRef, Stage
from tests import documents
from tests.memory_index import MemoryChunkIndex

T = TypeVar("T")
BUCKET = "docs"


class FakeBody:
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aenter__(self) -> FakeBody:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def read(self, amount: int) -> bytes:
        block, self._data = self._data[:amount], self._data[amount:]
        return block


@dataclass
class FakeS3:
    objects: dict[str, bytes] = field(default_factory=dict)
    down: bool = False

    async def get_object(self, *, Bucket: str, Key: str) -> dict[str, Any]:
        if self.down:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        if Bucket != BUCKET or Key not in self.objects:
            raise ClientError({"Error": {"Code": "NoSuchKey"}}, "GetObject")
        data = self.objects[Key]
        return {"ContentLength": len(data), "Body": FakeBody(data)}


class FakeKnowledgeBases:
    def __init__(self, *kbs: KnowledgeBase) -> None:
        self.kbs = {kb.id: kb for kb in kbs}

    async def get(self, kb_id: str) -> KnowledgeBase | None:
        return self.kbs.get(kb_id)


class FakeContext:
    """handlers.JobContext as the runtime behaves: threads, progress, cancel flag."""

    def __init__(self) -> None:
        self.cancelled = threading.Event()
        self.reports: list[tuple[Stage, float, str]] = []
        self._lock = threading.Lock()

    @property
    def worker_id(self) -> str:
        return "w-test"

    async def progress(self, stage: Stage, fraction: float, message: str = "") -> None:
        self.progress_threadsafe(stage, fraction, message)

    def progress_threadsafe(self, stage: Stage, fraction: float, message: str = "") -> None:
        with self._lock:
            self.reports.append((stage, fraction, message))

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.cancelled.set()
            with contextlib.suppress(Exception):
                await future
            raise


def _kb(kb_id: str = "kb1", **overrides: Any) -> KnowledgeBase:
    values: dict[str, Any] = {
        "id": kb_id,
        "name": kb_id,
        "description": "",
        "chunking": ChunkingDefaults(),
        "embedding_provider": "local",
        "embedding_model": "all-MiniLM-L6-v2",
        "embedding_dimensions": 384,
    }
    values.update(overrides)
    return KnowledgeBase(**values)


def _job(name: str, data: bytes, **overrides: Any) -> Job:
    values: dict[str, Any] = {
        "task_id": f"task-{name}",
        "lease_id": "lease-1",
        "attempt": 1,
        "knowledge_base_id": "kb1",
        "document_id": f"doc-{name}",
        "object": ObjectRef(BUCKET, f"objects/{name}", len(data), ""),
        "filename": name,
        "content_type": "",
        "metadata": {"team": "docs"},
    }
    values.update(overrides)
    return Job(**values)


@dataclass
class Rig:
    handler: IngestHandler
    index: MemoryChunkIndex
    s3: FakeS3
    kbs: FakeKnowledgeBases
    temp: Path

    async def run(self, name: str, data: bytes, **overrides: Any) -> tuple[JobResult, FakeContext]:
        self.s3.objects[f"objects/{name}"] = data
        context = FakeContext()
        result = await self.handler.run(_job(name, data, **overrides), context)
        return result, context

    async def fail(self, name: str, data: bytes, **overrides: Any) -> JobFailed:
        with pytest.raises(JobFailed) as caught:
            await self.run(name, data, **overrides)
        return caught.value


def _rig(tmp_path: Path, embedder: OnnxMiniLM | None = None) -> Rig:
    index, s3, kbs = MemoryChunkIndex(), FakeS3(), FakeKnowledgeBases(_kb())
    temp = tmp_path / "staging"
    temp.mkdir()
    handler = IngestHandler(
        index=index,
        s3=s3,
        knowledge_bases=kbs,
        ingest=IngestSettings(temp_dir=str(temp)),
        local_embedder=embedder or shared_minilm(),
    )
    return Rig(handler, index, s3, kbs, temp)


GOOD: list[tuple[str, Callable[[], bytes]]] = [
    (
        "a.pdf",
        lambda: documents.pdf(
            [
                ("Intro", "Kbmesh indexes documents."),
                ("Billing", "Invoices are due within thirty days."),
            ]
        ),
    ),
    ("a.docx", documents.docx),
    ("a.pptx", documents.pptx),
    ("a.xlsx", documents.xlsx),
    ("a.csv", documents.csv_bytes),
    ("a.html", lambda: documents.HTML),
    ("a.md", lambda: documents.MARKDOWN),
    ("a.txt", lambda: documents.TEXT),
    ("a.json", lambda: documents.JSON),
]


async def test_every_format_is_indexed_with_its_positions(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    for name, make in GOOD:
        result, context = await rig.run(name, make())
        chunks = rig.index.documents[("kb1", f"doc-{name}")]
        assert result.chunk_count == len(chunks) > 0, name
        assert result.token_count == sum(c.token_count for c in chunks) > 0
        for c in chunks:
            assert c.id == chunk_id(f"doc-{name}", c.chunk_index, c.text)
            assert len(c.vector) == 384
            assert c.filename == name
            assert c.metadata == {"team": "docs"}
        stages = [stage for stage, _, _ in context.reports]
        assert stages[0] is Stage.DOWNLOADING
        assert stages[-1] is Stage.INDEXING
        assert {Stage.PARSING, Stage.CHUNKING, Stage.EMBEDDING} <= set(stages)
        fractions = [f for _, f, _ in context.reports]
        assert fractions == sorted(fractions)
        assert fractions[0] >= 0
        assert fractions[-1] <= 1
    pdf = rig.index.documents[("kb1", "doc-a.pdf")]
    assert [c.page_number for c in pdf] == [1, 2]
    assert pdf[0].content_type == "application/pdf"
    assert (await rig.handler.run(_job("a.pdf", b"x"), FakeContext())).page_count == 2
    assert any(c.heading == "Vacation policy" for c in rig.index.documents[("kb1", "doc-a.docx")])
    assert [c.page_number for c in rig.index.documents[("kb1", "doc-a.pptx")]] == [1, 2]
    assert rig.index.documents[("kb1", "doc-a.xlsx")][0].sheet == "Customers"
    assert rig.index.documents[("kb1", "doc-a.html")][0].heading == "FAQ"
    assert rig.index.documents[("kb1", "doc-a.md")][0].heading == "Guide"
    # The right chunk answers a question.
    query = shared_minilm().embed(["how many days of vacation do employees get"])[0]
    [best] = await rig.index.search("kb1", "vector", "", query, 1, _no_filters())
    assert best.chunk.document_id == "doc-a.docx"
    assert "25 days" in best.chunk.text


def _no_filters() -> Any:
    from services.knowledge.domain.chunks import SearchFilters

    return SearchFilters()


async def test_reports_pages_parsed_and_chunks_embedded(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    pages = [(f"Page {i}", f"Text of page {i}. " * 30) for i in range(1, 4)]
    _, context = await rig.run("p.pdf", documents.pdf(pages))
    messages = [m for _, _, m in context.reports]
    assert "3 of 3 pages parsed" in messages
    embedded = [m for stage, _, m in context.reports if stage is Stage.EMBEDDING]
    assert embedded[-1].endswith("chunks embedded")
    done, _, total = embedded[-1].split()[:3]
    assert done == total


async def test_a_rerun_replaces_and_the_upload_can_override_chunking(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    text = (" ".join(f"Fact number {i} is about item {i}." for i in range(80))).encode()
    await rig.run("t.txt", text)
    first = [c.id for c in rig.index.documents[("kb1", "doc-t.txt")]]
    await rig.run("t.txt", text)
    assert [c.id for c in rig.index.documents[("kb1", "doc-t.txt")]] == first
    await rig.run("t.txt", text, chunking_strategy="TOKEN", chunk_size=32, chunk_overlap=4)
    smaller = rig.index.documents[("kb1", "doc-t.txt")]
    assert len(smaller) > len(first)
    assert max(c.token_count for c in smaller) <= 32


async def test_markdown_strategy_keeps_html_sections_apart(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    await rig.run("faq.html", documents.HTML, chunking_strategy="MARKDOWN")
    chunks = rig.index.documents[("kb1", "doc-faq.html")]
    assert [c.heading for c in chunks] == ["FAQ", "Passwords"]
    assert "Reset it" in chunks[1].text


BAD: list[tuple[str, Callable[[], bytes], str, str]] = [
    ("enc.pdf", documents.encrypted_pdf, "DOCUMENT_ENCRYPTED", "FAILED_PRECONDITION"),
    (
        "corrupt.pdf",
        lambda: documents.pdf([("A", "text")])[:300],
        "DOCUMENT_CORRUPT",
        "INVALID_ARGUMENT",
    ),
    ("blank.pdf", lambda: documents.pdf([("", "")]), "NO_EXTRACTABLE_TEXT", "FAILED_PRECONDITION"),
    ("empty.txt", lambda: b"", "DOCUMENT_EMPTY", "INVALID_ARGUMENT"),
    ("bomb.docx", documents.zip_bomb_docx, "DOCUMENT_TOO_LARGE", "RESOURCE_EXHAUSTED"),
    (
        "image.png",
        lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        "UNSUPPORTED_TYPE",
        "INVALID_ARGUMENT",
    ),
]


@pytest.mark.parametrize(("name", "make", "reason", "code"), BAD)
async def test_bad_documents_fail_without_retry(
    tmp_path: Path, name: str, make: Callable[[], bytes], reason: str, code: str
) -> None:
    rig = _rig(tmp_path)
    failure = await rig.fail(name, make())
    assert (failure.reason, failure.code, failure.retryable) == (reason, code, False)
    assert rig.index.writes == 0
    assert list(rig.temp.iterdir()) == []


async def test_storage_and_knowledge_base_failures(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    failure = await rig.fail("gone.txt", b"x", object=ObjectRef(BUCKET, "missing", 1, ""))
    assert (failure.reason, failure.retryable) == ("OBJECT_NOT_FOUND", False)
    rig.s3.down = True
    failure = await rig.fail("a.txt", documents.TEXT)
    assert (failure.reason, failure.retryable) == ("STORAGE_UNAVAILABLE", True)
    rig.s3.down = False
    failure = await rig.fail("a.txt", documents.TEXT, knowledge_base_id="nope")
    assert (failure.reason, failure.retryable) == ("KNOWLEDGE_BASE_NOT_FOUND", False)
    rig.kbs.kbs["kb2"] = _kb(
        "kb2", embedding_provider="openai", embedding_model="m", embedding_dimensions=0
    )
    failure = await rig.fail("a.txt", documents.TEXT, knowledge_base_id="kb2")
    assert failure.reason == "EMBEDDING_NOT_CONFIGURED"
    too_big = await rig.fail(
        "a.txt", documents.TEXT, object=ObjectRef(BUCKET, "objects/a.txt", 10**12, "")
    )
    assert too_big.reason == "DOCUMENT_TOO_LARGE"
    assert list(rig.temp.iterdir()) == []


class SlowEmbedder(OnnxMiniLM):
    """Blocks each batch until released, so a test can cancel mid-embedding."""

    def __init__(self) -> None:
        super().__init__(batch_size=2)
        self.started = threading.Event()

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.started.set()
        threading.Event().wait(0.2)
        return [[0.0] * 384 for _ in texts]


async def test_cancellation_leaves_no_temp_file_and_no_chunks(tmp_path: Path) -> None:
    embedder = SlowEmbedder()
    rig = _rig(tmp_path, embedder)
    text = (" ".join(f"Sentence {i} of a long text." for i in range(400))).encode()
    rig.s3.objects["objects/long.txt"] = text
    task = asyncio.create_task(rig.handler.run(_job("long.txt", text), FakeContext()))
    await asyncio.to_thread(embedder.started.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rig.index.writes == 0
    assert list(rig.temp.iterdir()) == []


async def test_the_worker_factory_builds_the_handler_from_its_resources(tmp_path: Path) -> None:
    from redis.asyncio import Redis

    from services.knowledge.ingest.pipeline import ingest_handler
    from services.knowledge.settings import KnowledgeSettings
    from services.knowledge.worker.handlers import WorkerResources

    index, s3 = MemoryChunkIndex(), FakeS3()
    resources = WorkerResources(
        worker_id="w1",
        options={},
        redis=Redis.from_url("redis://127.0.0.1:1/0"),  # never called here
        s3=s3,
        index=index,
        settings=KnowledgeSettings(),
    )
    handler = ingest_handler(resources)
    assert isinstance(handler, IngestHandler)
    with pytest.raises(ValueError, match="Redis and S3"):
        ingest_handler(WorkerResources(worker_id="w1", options={}, redis=None, s3=s3))
    without_settings = WorkerResources(worker_id="w1", options={}, redis=resources.redis, s3=s3)
    with pytest.raises(ValueError, match="KnowledgeSettings"):
        ingest_handler(without_settings)


class RefusingIndex(MemoryChunkIndex):
    async def replace_document(
        self, knowledge_base_id: str, document_id: str, chunks: Sequence[Any]
    ) -> None:
        from services.common.errors import FailedPrecondition

        raise FailedPrecondition("EMBEDDING_DIMENSIONS_MISMATCH", "384 vs 768")


async def test_index_refusals_become_task_errors(tmp_path: Path) -> None:
    rig = _rig(tmp_path)
    rig.handler._index = RefusingIndex()
    failure = await rig.fail("a.txt", documents.TEXT)
    assert (failure.reason, failure.code, failure.retryable) == (
        "EMBEDDING_DIMENSIONS_MISMATCH",
        "FAILED_PRECONDITION",
        False,
    )
