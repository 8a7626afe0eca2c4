"""Ingestion benchmark: upload → searchable through kbmesh, against the same
llama-index pipeline run in-process on the same files with the same model.

Baseline: one process parses each file (the same parsers), splits it with
llama-index's SentenceSplitter (254-token chunks, 64 overlap, the model's
tokenizer), embeds with the same ONNX all-MiniLM-L6-v2 and adds the rows to a
LanceDB table. kbmesh: Redis, SeaweedFS, the Task Manager and a Knowledge
Service with its worker start on free ports; every file is uploaded at once
and the clock stops when the last task is SUCCEEDED (its chunks searchable).
Target: kbmesh throughput >= 0.9 x the baseline.

    .venv/bin/python bench/ingest.py [--documents 16] [--paragraphs 12]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import random
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import lancedb
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack import servers
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.knowledge.ingest.embedding import shared_minilm
from services.knowledge.ingest.parsers import parse
from services.knowledge.ingest.sniff import sniff
from services.knowledge.settings import IngestSettings

WORDS = [
    "invoice",
    "shipping",
    "delivery",
    "refund",
    "policy",
    "customer",
    "account",
    "password",
    "vacation",
    "employee",
    "expense",
    "receipt",
    "warehouse",
    "order",
    "product",
    "catalog",
    "price",
    "discount",
    "contract",
    "renewal",
    "support",
    "ticket",
    "escalation",
    "holiday",
    "schedule",
    "security",
    "access",
    "backup",
    "restore",
    "server",
    "network",
    "storage",
    "report",
    "quarter",
    "revenue",
    "forecast",
]


def paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(6):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 16))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def corpus(count: int, paragraphs: int) -> list[tuple[str, bytes]]:
    """Markdown, text, DOCX and PDF files of synthetic prose, in rotation."""
    import docx
    from fpdf import FPDF

    rng = random.Random(11)
    files: list[tuple[str, bytes]] = []
    for i in range(count):
        body = [paragraph(rng) for _ in range(paragraphs)]
        kind = i % 4
        if kind == 0:
            text = "\n\n".join(f"## Part {n}\n\n{p}" for n, p in enumerate(body))
            files.append((f"doc{i}.md", f"# Document {i}\n\n{text}\n".encode()))
        elif kind == 1:
            files.append((f"doc{i}.txt", "\n\n".join(body).encode()))
        elif kind == 2:
            document = docx.Document()
            for n, p in enumerate(body):
                document.add_heading(f"Part {n}", level=2)
                document.add_paragraph(p)
            out = io.BytesIO()
            document.save(out)
            files.append((f"doc{i}.docx", out.getvalue()))
        else:
            pdf = FPDF()
            pdf.set_font("helvetica", size=11)
            for p in body:
                pdf.add_page()
                pdf.multi_cell(0, 6, p)
            files.append((f"doc{i}.pdf", bytes(pdf.output())))
    return files


def in_process(files: list[tuple[str, bytes]], workdir: Path) -> tuple[float, int]:
    """(seconds, chunks) for the plain llama-index pipeline in this process."""
    from llama_index.core.node_parser import SentenceSplitter

    embedder = shared_minilm()
    embedder.embed(["warm up"])
    splitter = SentenceSplitter(chunk_size=254, chunk_overlap=64, tokenizer=embedder.token_ids)
    table = None
    db = lancedb.connect(str(workdir / "baseline-index"))
    chunks = 0
    start = time.perf_counter()
    for name, data in files:
        path = workdir / name
        path.write_bytes(data)
        parsed = parse(sniff(data[:8192], name), path, IngestSettings())
        text = "\n\n".join(section.text for section in parsed.sections)
        pieces = splitter.split_text(text)
        vectors = embedder.embed(pieces)
        rows = pa.table(
            {
                "id": [f"{name}-{n}" for n in range(len(pieces))],
                "text": pieces,
                "vector": pa.array(vectors, type=pa.list_(pa.float32(), 384)),
            }
        )
        table = db.create_table("chunks", rows) if table is None else table
        if chunks:
            table.add(rows)
        chunks += len(pieces)
    return time.perf_counter() - start, chunks


async def through_kbmesh(files: list[tuple[str, bytes]], workdir: Path) -> tuple[float, int]:
    """(seconds, chunks) from the first upload to the last task SUCCEEDED."""
    with ExitStack() as closer:
        redis, weed = servers.start_storage(workdir, closer, bucket="kbmesh-ingest-bench")
        task_manager = closer.enter_context(
            servers.start_service(
                "task_manager",
                port=servers.find_free_port(),
                redis_url=redis.url,
                s3=weed.s3,
                log_path=workdir / "tm.log",
                extra_env=servers.AUTH_OFF,
            )
        )
        knowledge = closer.enter_context(
            servers.start_service(
                "knowledge",
                port=servers.find_free_port(),
                redis_url=redis.url,
                s3=weed.s3,
                log_path=workdir / "ks.log",
                task_manager_address=task_manager.address,
                extra_env={
                    **servers.AUTH_OFF,
                    "KBMESH_KNOWLEDGE_WORKER__ENABLED": "true",
                    "KBMESH_KNOWLEDGE_INDEX__URI": str(workdir / "index"),
                },
            )
        )
        async with (
            grpc.aio.insecure_channel(task_manager.address) as tm_channel,
            grpc.aio.insecure_channel(knowledge.address) as ks_channel,
        ):
            tasks = tm_grpc.TaskManagerServiceStub(tm_channel)
            kb = await kn_grpc.KnowledgeServiceStub(ks_channel).CreateKnowledgeBase(
                kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name="bench"))
            )
            # Warm the worker's model with one small document first, as the
            # baseline warms its own.
            await wait_done(tasks, [await upload(tasks, kb.id, "warm.txt", b"warm up")])
            start = time.perf_counter()
            ids = await asyncio.gather(*(upload(tasks, kb.id, n, d) for n, d in files))
            done = await wait_done(tasks, ids)
            elapsed = time.perf_counter() - start
        return elapsed, sum(t.result.chunk_count for t in done)


async def upload(stub: tm_grpc.TaskManagerServiceAsyncStub, kb: str, name: str, data: bytes) -> str:
    async def messages() -> object:
        yield tm.UploadRequest(knowledge_base_id=kb, filename=name, file={"data": data})

    answer = await stub.Upload(messages())  # type: ignore[arg-type]
    return str(answer.task_id)


async def wait_done(stub: tm_grpc.TaskManagerServiceAsyncStub, ids: list[str]) -> list[tm.Task]:
    finished: dict[str, tm.Task] = {}
    while len(finished) < len(ids):
        for task_id in ids:
            if task_id in finished:
                continue
            task = await stub.GetTask(tm.GetTaskRequest(task_id=task_id))
            if task.state == tm.Task.STATE_SUCCEEDED:
                finished[task_id] = task
            elif task.state in (tm.Task.STATE_FAILED, tm.Task.STATE_CANCELLED):
                raise RuntimeError(f"task {task_id} ended {task.state}: {task.error}")
        await asyncio.sleep(0.05)
    return [finished[i] for i in ids]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=16)
    parser.add_argument("--paragraphs", type=int, default=12)
    args = parser.parse_args()
    files = corpus(args.documents, args.paragraphs)
    with tempfile.TemporaryDirectory(prefix="kbmesh-ingest-") as tmp:
        base_seconds, base_chunks = in_process(files, Path(tmp))
        mesh_seconds, mesh_chunks = await through_kbmesh(files, Path(tmp))
    n = len(files)
    print(f"ingestion of {n} documents (md, txt, docx, pdf), same model and machine:")
    print(
        f"  in-process llama-index pipeline  {n / base_seconds:5.2f} documents/s  "
        f"({base_chunks} chunks in {base_seconds:.1f} s, baseline)"
    )
    print(
        f"  kbmesh upload -> searchable      {n / mesh_seconds:5.2f} documents/s  "
        f"({mesh_chunks} chunks in {mesh_seconds:.1f} s)"
    )
    print(f"  ratio {base_seconds / mesh_seconds:.2f} (target >= 0.90)")
    print(
        "  (kbmesh also splits at page and heading boundaries, hence more chunks, and its"
        " worker runs 4 documents at once on the machine's 2 cores)"
    )


if __name__ == "__main__":
    asyncio.run(main())
