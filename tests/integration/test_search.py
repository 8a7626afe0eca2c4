"""Chunk index (LanceDB) and search: the index on its own, then the RPCs.

Index tests use `LanceChunkIndex` on a temporary directory (and once on S3),
with the deterministic hash embedder: texts sharing words are close, so the
right answer of each query is known in advance. RPC tests run a Task Manager
and a Knowledge Service (query embedder `hash`, TEST ONLY) and write chunks
into the service's index from this process, as a worker would.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from devstack.servers import S3Settings as DevS3Settings
from devstack.servers import SeaweedServer, ServiceServer
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.common import redis_keys
from services.common.errors import FailedPrecondition
from services.common.ids import new_id
from services.common.settings import S3Settings
from services.knowledge.domain.chunks import ChunkRecord, SearchFilters, chunk_id
from services.knowledge.index.hash_embedder import HashEmbedder
from services.knowledge.index.lance_index import LanceChunkIndex
from services.knowledge.index.location import connect
from services.knowledge.settings import IndexSettings
from tests.conftest import BucketFactory, Launcher, RedisFactory, ServiceFactory
from tests.support import error_info, upload_messages

pytestmark = pytest.mark.integration

EMBEDDER = HashEmbedder()
ROOT = Path(__file__).resolve().parents[2]


def record(kb: str, document_id: str, index: int, text: str, **fields: object) -> ChunkRecord:
    return ChunkRecord(
        id=chunk_id(document_id, index, text),
        knowledge_base_id=kb,
        document_id=document_id,
        text=text,
        vector=EMBEDDER.embed([text])[0],
        chunk_index=index,
        token_count=EMBEDDER.count_tokens(text),
        **fields,  # type: ignore[arg-type]
    )


def open_index(
    uri: str, *, consistency: float = 0.0, s3: S3Settings | None = None
) -> LanceChunkIndex:
    settings = IndexSettings(uri=uri, read_consistency_seconds=consistency)
    return LanceChunkIndex(connect(settings, s3 or S3Settings()), vector_index_min_rows=256)


@pytest.fixture
def index(tmp_path: Path) -> LanceChunkIndex:
    return open_index(str(tmp_path / "index"))


# A small labelled set: each query's answer is in exactly one document.
CORPUS = {
    "install": "To install kbmesh on Linux run make up in the repository root directory",
    "billing": "Invoices are sent monthly and the billing address is changed in account settings",
    "errors": "Error code E4711 means the upload checksum did not match the declared sha256",
    "cats": "Cats sleep most of the day and hunt small animals at night",
}
QUESTIONS = {
    "how do I install kbmesh on linux": "install",
    "change my billing address": "billing",
    "what does E4711 mean": "errors",
    "when do cats hunt": "cats",
}


async def load_corpus(index: LanceChunkIndex, kb: str) -> None:
    for name, text in CORPUS.items():
        await index.replace_document(kb, name, [record(kb, name, 0, text, filename=f"{name}.txt")])


def reciprocal_rank(hits: list[str], answer: str) -> float:
    return 1.0 / (hits.index(answer) + 1) if answer in hits else 0.0


# --- the index on its own -----------------------------------------------------------------


async def test_each_mode_ranks_the_known_answer_first(index: LanceChunkIndex) -> None:
    kb = new_id()
    await load_corpus(index, kb)
    mrr = {"vector": 0.0, "hybrid": 0.0}
    for question, answer in QUESTIONS.items():
        vector = EMBEDDER.embed([question])[0]
        for mode in ("vector", "keyword", "hybrid"):
            hits = await index.search(kb, mode, question, vector, 3, SearchFilters())
            assert hits[0].chunk.document_id == answer, (mode, question)
            assert hits == sorted(hits, key=lambda h: -h.score)
            if mode in mrr:
                mrr[mode] += reciprocal_rank([h.chunk.document_id for h in hits], answer)
            if mode != "keyword":  # cosine similarity and normalised RRF lie in [0, 1]
                assert all(0.0 <= h.score <= 1.0 for h in hits)
    assert mrr["hybrid"] >= mrr["vector"]
    # The row read back is the row written.
    top = (await index.search(kb, "keyword", "E4711", None, 1, SearchFilters()))[0]
    assert (top.chunk.text, top.chunk.filename, top.chunk.knowledge_base_id) == (
        CORPUS["errors"],
        "errors.txt",
        kb,
    )


async def test_an_empty_or_unknown_knowledge_base_answers_nothing(index: LanceChunkIndex) -> None:
    vector = EMBEDDER.embed(["anything"])[0]
    for mode in ("vector", "keyword", "hybrid"):
        assert await index.search(new_id(), mode, "anything", vector, 5, SearchFilters()) == []
    assert await index.count_chunks(new_id()) == 0
    assert await index.delete_document(new_id(), "d") == 0


async def test_filters_and_across_fields_or_within_and_resist_injection(
    index: LanceChunkIndex,
) -> None:
    kb = new_id()
    odd_name = "O'Brien's \"notes\" \\ 50%_.txt"
    docs = {
        "d1": ("a.pdf", "application/pdf", {"team": "docs", "lang": "en"}),
        "d2": ("b.md", "text/markdown", {"team": "ops", "lang": "en"}),
        "d3": (odd_name, "text/plain", {"team": "ops", "lang": "de"}),
    }
    for doc, (filename, content_type, metadata) in docs.items():
        await index.replace_document(
            kb,
            doc,
            [
                record(
                    kb,
                    doc,
                    0,
                    f"common words shared by every chunk of {doc}",
                    filename=filename,
                    content_type=content_type,
                    metadata=metadata,
                )
            ],
        )
    # Another knowledge base with the same filenames must never show up.
    other = new_id()
    await index.replace_document(
        other, "x1", [record(other, "x1", 0, "common words", filename="a.pdf")]
    )

    async def found(**filters: object) -> set[str]:
        hits = await index.search(
            kb,
            "keyword",
            "common words",
            None,
            50,
            SearchFilters(**filters),  # type: ignore[arg-type]
        )
        return {h.chunk.document_id for h in hits}

    assert await found() == {"d1", "d2", "d3"}
    assert await found(document_ids=("d1", "d3")) == {"d1", "d3"}
    assert await found(content_types=("application/pdf", "text/markdown")) == {"d1", "d2"}
    assert await found(filenames=("a.pdf",), content_types=("text/markdown",)) == set()
    assert await found(metadata={"team": "ops"}) == {"d2", "d3"}
    assert await found(metadata={"team": "ops", "lang": "en"}) == {"d2"}
    assert await found(filenames=(odd_name,)) == {"d3"}
    for attack in (
        {"filenames": ("x' OR '1'='1",)},
        {"filenames": ("a.pdf' OR 'a'='a",)},
        {"document_ids": ("d1') OR (1=1",)},
        {"content_types": ("' OR true OR '",)},
        {"metadata": {"team' OR '1'='1": "x"}},
        {"metadata": {"team": "docs' OR '1'='1"}},
        {"metadata": {"team": "x') OR (1=1) OR ('"}},
    ):
        assert await found(**attack) == set(), attack
    # Vector and hybrid queries take the same filters.
    vector = EMBEDDER.embed(["common words"])[0]
    for mode in ("vector", "hybrid"):
        hits = await index.search(
            kb, mode, "common", vector, 50, SearchFilters(filenames=("x' OR '1'='1",))
        )
        assert hits == []


async def test_replacing_a_document_never_duplicates_and_drops_stale_chunks(
    index: LanceChunkIndex,
) -> None:
    kb = new_id()
    chunks = [record(kb, "doc", i, f"chunk number {i} of the document") for i in range(5)]
    await index.replace_document(kb, "doc", chunks)
    await index.replace_document(kb, "doc", chunks)  # a redelivered task
    assert await index.count_chunks(kb, "doc") == 5
    await index.replace_document(kb, "doc", chunks[:3])  # re-chunked shorter
    assert await index.count_chunks(kb, "doc") == 3
    page = await index.list_chunks(kb, "doc", 1, 5)
    assert [c.chunk_index for c in page] == [1, 2]
    hits = await index.search(kb, "keyword", "chunk number", None, 10, SearchFilters())
    assert sorted(h.chunk.chunk_index for h in hits) == [0, 1, 2]
    assert await index.delete_document(kb, "doc") == 3
    assert await index.search(kb, "keyword", "chunk number", None, 10, SearchFilters()) == []


async def test_vector_dimensions_are_fixed_per_knowledge_base(index: LanceChunkIndex) -> None:
    kb = new_id()
    await index.replace_document(kb, "a", [record(kb, "a", 0, "first")])
    wrong = ChunkRecord(
        id="b-0",
        knowledge_base_id=kb,
        document_id="b",
        text="x",
        vector=[0.5] * 16,
        chunk_index=0,
        token_count=1,
    )
    with pytest.raises(FailedPrecondition) as caught:
        await index.replace_document(kb, "b", [wrong])
    assert caught.value.reason == "EMBEDDING_DIMENSION_MISMATCH"
    with pytest.raises(FailedPrecondition):
        await index.search(kb, "vector", "x", [0.5] * 16, 3, SearchFilters())


async def test_maintenance_compacts_and_builds_the_vector_index(index: LanceChunkIndex) -> None:
    kb = new_id()
    for d in range(6):
        await index.replace_document(
            kb, f"d{d}", [record(kb, f"d{d}", i, f"document {d} part {i} text") for i in range(50)]
        )
    assert await asyncio.to_thread(index.maintain_all) >= 1
    hits = await index.search(
        kb, "vector", "", EMBEDDER.embed(["document 3 part 7 text"])[0], 1, SearchFilters()
    )
    assert hits[0].chunk.text == "document 3 part 7 text"
    assert await index.delete_knowledge_base(kb) == 300
    assert kb not in index.knowledge_base_ids()


WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from services.common.settings import S3Settings
    from services.knowledge.domain.chunks import ChunkRecord
    from services.knowledge.index.hash_embedder import HashEmbedder
    from services.knowledge.index.lance_index import LanceChunkIndex
    from services.knowledge.index.location import connect
    from services.knowledge.settings import IndexSettings

    uri, kb = sys.argv[1], sys.argv[2]
    index = LanceChunkIndex(connect(IndexSettings(uri=uri), S3Settings()))
    text = "written by another process: zanzibar"
    chunk = ChunkRecord(id="late-0", knowledge_base_id=kb, document_id="late", text=text,
                        vector=HashEmbedder().embed([text])[0], chunk_index=0, token_count=5)
    asyncio.run(index.replace_document(kb, "late", [chunk]))
    """
)


def fragments(table: Any) -> int:
    return int(table.stats()["fragment_stats"]["num_fragments"])


async def test_maintenance_runs_again_when_a_write_wins_the_commit(
    index: LanceChunkIndex, monkeypatch: pytest.MonkeyPatch
) -> None:
    kb = new_id()
    for n in range(3):  # fragments to compact
        await index.replace_document(kb, f"d{n}", [record(kb, f"d{n}", 0, f"text {n}")])
    table = index._open(kb)
    assert table is not None
    real = table.optimize
    calls = []

    def racing(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 1:  # what Lance raises when a write committed first
            raise RuntimeError(
                "lance error: Retryable commit conflict for version 7: This Rewrite "
                "transaction was preempted by concurrent transaction Update at version 7."
            )
        return real(*args, **kwargs)  # type: ignore[arg-type]

    assert fragments(table) > 1
    monkeypatch.setattr(table, "optimize", racing)
    index.maintain(kb)
    assert len(calls) == 2
    assert fragments(table) == 1  # the second pass compacted

    def broken(*args: object, **kwargs: object) -> object:
        calls.append(1)
        raise RuntimeError("lance error: IO error: disk gone")

    monkeypatch.setattr(table, "optimize", broken)
    with pytest.raises(RuntimeError, match="disk gone"):
        index.maintain(kb)
    assert len(calls) == 3  # other errors are not retried


async def test_another_process_writes_are_searchable_within_a_second(tmp_path: Path) -> None:
    uri = str(tmp_path / "index")
    # The searcher uses the service default (0.5 s) and has the table open already.
    searcher = open_index(uri, consistency=IndexSettings().read_consistency_seconds)
    kb = new_id()
    await searcher.replace_document(kb, "early", [record(kb, "early", 0, "first chunk")])
    assert await searcher.search(kb, "keyword", "zanzibar", None, 5, SearchFilters()) == []
    await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", WRITER, uri, kb], check=True, cwd=ROOT, timeout=60
    )
    written = time.monotonic()
    while not await searcher.search(kb, "keyword", "zanzibar", None, 5, SearchFilters()):
        assert time.monotonic() - written < 1.0, "not visible within a second"
        await asyncio.sleep(0.05)


async def test_the_index_works_on_s3(new_bucket: BucketFactory) -> None:
    bucket = new_bucket("kbmesh-index")
    s3 = S3Settings(
        endpoint_url=bucket.endpoint_url,
        bucket=bucket.bucket,
        region=bucket.region,
        access_key_id=bucket.access_key_id,  # type: ignore[arg-type]
        secret_access_key=bucket.secret_access_key,  # type: ignore[arg-type]
    )
    index = await asyncio.to_thread(open_index, f"s3://{bucket.bucket}/index", s3=s3)
    kb = new_id()
    await load_corpus(index, kb)
    question = "what does E4711 mean"
    for mode in ("vector", "keyword", "hybrid"):
        hits = await index.search(
            kb, mode, question, EMBEDDER.embed([question])[0], 2, SearchFilters()
        )
        assert hits[0].chunk.document_id == "errors"
    assert await index.delete_document(kb, "errors") == 1
    hits = await index.search(kb, "keyword", "E4711", None, 2, SearchFilters())
    assert hits == []
    keys = bucket.boto3_client().list_objects_v2(Bucket=bucket.bucket, Prefix="index/")
    assert keys.get("KeyCount", 0) > 0  # the tables really live in the bucket
    assert await index.delete_knowledge_base(kb) == 3


# --- the RPCs -----------------------------------------------------------------------------


class Mesh:
    def __init__(
        self,
        task_manager: ServiceServer,
        knowledge: ServiceServer,
        index_uri: str,
        s3: DevS3Settings,
        redis_url: str,
    ) -> None:
        self.redis_url = redis_url
        self.task_manager = task_manager
        self.knowledge = knowledge
        self.index_uri = index_uri
        self.s3 = s3


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedServer) -> Iterator[Mesh]:
    """Redis, a bucket, a Task Manager and a Knowledge Service whose queries are
    embedded by the TEST-ONLY hash embedder; the index in a known directory."""
    base = tmp_path_factory.mktemp("search-mesh")
    launcher = Launcher(base)
    try:
        redis = RedisFactory(launcher)()
        s3 = BucketFactory(s3_server)("kbmesh-search")
        services = ServiceFactory(launcher, redis_url=redis.url, s3=s3)
        task_manager = services("task_manager")
        index_uri = str(base / "index")
        knowledge = services(
            "knowledge",
            task_manager_address=task_manager.address,
            env={
                "KBMESH_KNOWLEDGE_SEARCH__QUERY_EMBEDDER": "hash",
                "KBMESH_KNOWLEDGE_INDEX__URI": index_uri,
                "KBMESH_KNOWLEDGE_INDEX__OPTIMIZE_INTERVAL_SECONDS": "2",
            },
        )
        yield Mesh(task_manager, knowledge, index_uri, s3, redis.url)
    finally:
        launcher.close()


@pytest.fixture
async def knowledge(mesh: Mesh) -> AsyncIterator[kn_grpc.KnowledgeServiceAsyncStub]:
    async with grpc.aio.insecure_channel(mesh.knowledge.address) as channel:
        yield kn_grpc.KnowledgeServiceStub(channel)


@pytest.fixture
async def tasks(mesh: Mesh) -> AsyncIterator[tm_grpc.TaskManagerServiceAsyncStub]:
    async with grpc.aio.insecure_channel(mesh.task_manager.address) as channel:
        yield tm_grpc.TaskManagerServiceStub(channel)


async def new_kb(knowledge: kn_grpc.KnowledgeServiceAsyncStub) -> str:
    kb = await knowledge.CreateKnowledgeBase(
        kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name=f"kb-{new_id()}"))
    )
    return kb.id


async def upload(
    tasks: tm_grpc.TaskManagerServiceAsyncStub,
    kb: str,
    filename: str,
    body: str,
    metadata: dict[str, str] | None = None,
) -> tm.UploadResponse:
    answer: tm.UploadResponse = await tasks.Upload(
        upload_messages(
            body.encode(), knowledge_base_id=kb, filename=filename, metadata=metadata or {}
        )
    )
    return answer


async def expect_error(call: object, code: grpc.StatusCode, reason: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == code
    assert error_info(caught.value).reason == reason


def search(kb: str, query: str, **fields: object) -> kn.SearchRequest:
    return kn.SearchRequest(knowledge_base_id=kb, query=query, **fields)  # type: ignore[arg-type]


async def indexed_corpus(
    mesh: Mesh,
    knowledge: kn_grpc.KnowledgeServiceAsyncStub,
    tasks: tm_grpc.TaskManagerServiceAsyncStub,
) -> tuple[str, dict[str, str]]:
    """A knowledge base with the labelled corpus, one uploaded document each, and
    their chunks written to the service's index (as the worker would)."""
    kb = await new_kb(knowledge)
    index = open_index(mesh.index_uri)
    ids: dict[str, str] = {}
    for name, text in CORPUS.items():
        answer = await upload(tasks, kb, f"{name}.txt", text, {"topic": name})
        ids[name] = answer.document_id
        chunks = [
            record(
                kb,
                answer.document_id,
                0,
                text,
                filename=f"{name}.txt",
                content_type="text/plain",
                metadata={"topic": name},
                page_number=1,
                heading="Intro",
            )
        ]
        await index.replace_document(kb, answer.document_id, chunks)
    return kb, ids


async def test_search_rpc_modes_results_threshold_and_filters(
    mesh: Mesh,
    knowledge: kn_grpc.KnowledgeServiceAsyncStub,
    tasks: tm_grpc.TaskManagerServiceAsyncStub,
) -> None:
    kb, ids = await indexed_corpus(mesh, knowledge, tasks)
    for question, answer in QUESTIONS.items():
        for mode in (
            kn.SearchRequest.MODE_VECTOR,
            kn.SearchRequest.MODE_KEYWORD,
            kn.SearchRequest.MODE_HYBRID,
        ):
            found = await knowledge.Search(search(kb, question, mode=mode, top_k=3))
            assert found.mode == mode
            assert found.results[0].document_id == ids[answer], (question, mode)
    default = await knowledge.Search(search(kb, "E4711"))
    assert default.mode == kn.SearchRequest.MODE_HYBRID
    top = default.results[0]
    assert (top.text, top.filename, dict(top.metadata)) == (
        CORPUS["errors"],
        "errors.txt",
        {"topic": "errors"},
    )
    assert (top.position.page_number, top.position.heading, top.position.chunk_index) == (
        1,
        "Intro",
        0,
    )
    # top_k and the threshold: an exact text has cosine similarity 1.
    two = await knowledge.Search(search(kb, "the", mode=kn.SearchRequest.MODE_VECTOR, top_k=2))
    assert len(two.results) == 2
    exact = await knowledge.Search(
        search(kb, CORPUS["cats"], mode=kn.SearchRequest.MODE_VECTOR, score_threshold=0.99)
    )
    assert [r.document_id for r in exact.results] == [ids["cats"]]
    assert exact.results[0].score == pytest.approx(1.0, abs=1e-4)
    # Filters over the RPC, including an injection attempt.
    only = await knowledge.Search(
        search(
            kb,
            "install billing cats",
            mode=kn.SearchRequest.MODE_KEYWORD,
            filter=kn.SearchFilter(metadata={"topic": "billing"}),
        )
    )
    assert [r.document_id for r in only.results] == [ids["billing"]]
    none = await knowledge.Search(
        search(kb, "install billing cats", filter=kn.SearchFilter(filenames=["x' OR '1'='1"]))
    )
    assert list(none.results) == []


async def test_search_rpc_limits_and_empty_or_unknown_knowledge_bases(
    knowledge: kn_grpc.KnowledgeServiceAsyncStub,
) -> None:
    kb = await new_kb(knowledge)
    for mode in (0, 1, 2, 3):
        empty = await knowledge.Search(search(kb, "anything", mode=mode))
        assert list(empty.results) == []
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    await expect_error(knowledge.Search(search(kb, "")), invalid, "MISSING_QUERY")
    await expect_error(knowledge.Search(search(kb, "x" * 4001)), invalid, "INVALID_QUERY")
    await expect_error(knowledge.Search(search(kb, "x", top_k=101)), invalid, "INVALID_TOP_K")
    await expect_error(knowledge.Search(search(kb, "x", top_k=-1)), invalid, "INVALID_TOP_K")
    await expect_error(knowledge.Search(search(kb, "x", mode=9)), invalid, "INVALID_MODE")
    await expect_error(
        knowledge.Search(search(kb, "x", score_threshold=-1)), invalid, "INVALID_SCORE_THRESHOLD"
    )
    await expect_error(
        knowledge.Search(search(new_id(), "x")),
        grpc.StatusCode.NOT_FOUND,
        "KNOWLEDGE_BASE_NOT_FOUND",
    )


async def test_list_chunks_pages_in_document_order(
    mesh: Mesh,
    knowledge: kn_grpc.KnowledgeServiceAsyncStub,
    tasks: tm_grpc.TaskManagerServiceAsyncStub,
) -> None:
    kb = await new_kb(knowledge)
    answer = await upload(tasks, kb, "long.md", "five chunks")
    doc = answer.document_id
    await open_index(mesh.index_uri).replace_document(
        kb, doc, [record(kb, doc, i, f"part {i}") for i in reversed(range(5))]
    )
    seen: list[str] = []
    token = ""
    while True:
        page = await knowledge.ListChunks(
            kn.ListChunksRequest(
                knowledge_base_id=kb, document_id=doc, page_size=2, page_token=token
            )
        )
        assert len(page.chunks) <= 2
        seen += [c.text for c in page.chunks]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"part {i}" for i in range(5)]
    await expect_error(
        knowledge.ListChunks(kn.ListChunksRequest(knowledge_base_id=kb, document_id=new_id())),
        grpc.StatusCode.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
    )
    await expect_error(
        knowledge.ListChunks(
            kn.ListChunksRequest(knowledge_base_id=kb, document_id=doc, page_token="bogus")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_PAGE_TOKEN",
    )


async def object_key(mesh: Mesh, document_id: str) -> str:
    """The S3 key the Task Manager stored the document under (its record)."""
    client = Redis.from_url(mesh.redis_url)
    try:
        value = await client.hget(redis_keys.document(document_id), "object_key")
    finally:
        await client.aclose()
    assert isinstance(value, bytes), document_id
    return value.decode()


def object_exists(s3: DevS3Settings, key: str) -> bool:
    listed = s3.boto3_client().list_objects_v2(Bucket=s3.bucket, Prefix=key)
    return int(listed.get("KeyCount", 0)) > 0


async def test_delete_document_removes_chunks_object_and_records_at_once(
    mesh: Mesh,
    knowledge: kn_grpc.KnowledgeServiceAsyncStub,
    tasks: tm_grpc.TaskManagerServiceAsyncStub,
) -> None:
    kb, ids = await indexed_corpus(mesh, knowledge, tasks)
    doc = ids["errors"]
    document = await knowledge.GetDocument(
        kn.GetDocumentRequest(knowledge_base_id=kb, document_id=doc)
    )
    key = await object_key(mesh, doc)
    assert object_exists(mesh.s3, key)
    request = kn.DeleteDocumentRequest(knowledge_base_id=kb, document_id=doc, request_id="r1")
    deleted = await knowledge.DeleteDocument(request)
    assert deleted.deleted_chunk_count == 1
    # Gone from search at once, in every mode.
    for mode in (1, 2, 3):
        found = await knowledge.Search(search(kb, "E4711 checksum", mode=mode, top_k=10))
        assert doc not in {r.document_id for r in found.results}
    assert not object_exists(mesh.s3, key)
    await expect_error(
        knowledge.GetDocument(kn.GetDocumentRequest(knowledge_base_id=kb, document_id=doc)),
        grpc.StatusCode.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
    )
    # Its pending task was cancelled through the Task Manager.
    after = await tasks.GetTask(tm.GetTaskRequest(task_id=document.task_id))
    assert after.state == tm.Task.STATE_CANCELLED
    # A retry with the same request_id answers the same; without one, NOT_FOUND.
    assert (await knowledge.DeleteDocument(request)).deleted_chunk_count == 1
    await expect_error(
        knowledge.DeleteDocument(kn.DeleteDocumentRequest(knowledge_base_id=kb, document_id=doc)),
        grpc.StatusCode.NOT_FOUND,
        "DOCUMENT_NOT_FOUND",
    )
    # The same bytes can be uploaded again as a new document.
    again = await upload(tasks, kb, "errors.txt", CORPUS["errors"])
    assert not again.duplicate


async def test_delete_knowledge_base_removes_everything_and_refuses_uploads(
    mesh: Mesh,
    knowledge: kn_grpc.KnowledgeServiceAsyncStub,
    tasks: tm_grpc.TaskManagerServiceAsyncStub,
) -> None:
    kb, ids = await indexed_corpus(mesh, knowledge, tasks)
    keys = [await object_key(mesh, doc) for doc in ids.values()]
    assert all(object_exists(mesh.s3, key) for key in keys)
    request = kn.DeleteKnowledgeBaseRequest(knowledge_base_id=kb, request_id="del-1")
    answer = await knowledge.DeleteKnowledgeBase(request)
    assert (answer.deleted_document_count, answer.cancelled_task_count) == (4, 4)
    not_found = grpc.StatusCode.NOT_FOUND
    await expect_error(
        knowledge.GetKnowledgeBase(kn.GetKnowledgeBaseRequest(knowledge_base_id=kb)),
        not_found,
        "KNOWLEDGE_BASE_NOT_FOUND",
    )
    await expect_error(knowledge.Search(search(kb, "E4711")), not_found, "KNOWLEDGE_BASE_NOT_FOUND")
    await expect_error(
        upload(tasks, kb, "late.txt", "too late"), not_found, "KNOWLEDGE_BASE_NOT_FOUND"
    )
    assert not any(object_exists(mesh.s3, key) for key in keys)
    assert await open_index(mesh.index_uri).count_chunks(kb) == 0
    assert (await knowledge.DeleteKnowledgeBase(request)).deleted_document_count == 4
    # A worker still writing after the delete re-creates the table: the
    # service's maintenance pass (every 2 s here) drops it again.
    late = open_index(mesh.index_uri)
    await late.replace_document(kb, "late", [record(kb, "late", 0, "written too late")])
    deadline = time.monotonic() + 10
    while kb in late.knowledge_base_ids():
        assert time.monotonic() < deadline, "orphan table not dropped"
        await asyncio.sleep(0.2)
    await expect_error(
        knowledge.DeleteKnowledgeBase(kn.DeleteKnowledgeBaseRequest(knowledge_base_id=kb)),
        not_found,
        "KNOWLEDGE_BASE_NOT_FOUND",
    )


async def test_search_with_the_real_embedding_model(
    start_service: ServiceFactory, tmp_path: Path
) -> None:
    """The default query embedder (ONNX MiniLM): a question phrased unlike the
    text still finds it, where sharing words would not decide it."""
    from services.knowledge.ingest.embedding import shared_minilm

    uri = str(tmp_path / "index")
    service = start_service(
        "knowledge", task_manager_address="127.0.0.1:1", env={"KBMESH_KNOWLEDGE_INDEX__URI": uri}
    )
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = kn_grpc.KnowledgeServiceStub(channel)
        kb = await new_kb(stub)
        texts = {
            "price": "The Pro plan is priced at twenty dollars per month.",
            "weather": "Heavy rain and strong winds are expected on the coast tomorrow.",
            "python": "A Python list comprehension builds a new list from an iterable.",
        }
        model = shared_minilm()
        vectors = await asyncio.to_thread(model.embed, list(texts.values()))
        index = open_index(uri)
        for (name, text), vector in zip(texts.items(), vectors, strict=True):
            await index.replace_document(
                kb,
                name,
                [
                    ChunkRecord(
                        id=chunk_id(name, 0, text),
                        knowledge_base_id=kb,
                        document_id=name,
                        text=text,
                        vector=vector,
                        chunk_index=0,
                        token_count=12,
                    )
                ],
            )
        await asyncio.sleep(IndexSettings().read_consistency_seconds + 0.1)
        for mode in (kn.SearchRequest.MODE_VECTOR, kn.SearchRequest.MODE_HYBRID):
            found = await stub.Search(search(kb, "How much does a subscription cost?", mode=mode))
            assert found.results[0].document_id == "price", mode
        found = await stub.Search(search(kb, "will it storm", mode=kn.SearchRequest.MODE_VECTOR))
        assert found.results[0].document_id == "weather"
