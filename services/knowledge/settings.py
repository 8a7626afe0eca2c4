"""Knowledge Service settings: env prefix `KBMESH_KNOWLEDGE_`, groups split by `__`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import (
    AuthSettings,
    GrpcSettings,
    LogSettings,
    RedisSettings,
    S3Settings,
    TlsClientSettings,
)


class TaskManagerLink(BaseModel):
    """How the Knowledge Service's workers reach the Task Manager."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str = "127.0.0.1:50051"
    # TLS to the Task Manager (and the worker's client certificate for mTLS).
    tls: TlsClientSettings = TlsClientSettings()


class WorkerSettings(BaseModel):
    """The knowledge worker (services/knowledge/worker): runs inside the Knowledge
    Service when `enabled`, and as `python -m services.knowledge.worker` (always)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    # How the Knowledge Service runs its worker (`enabled`). "process": a child
    # process (`python -m services.knowledge.worker`, same environment) that the
    # service starts, restarts and stops: parsing and embedding hold the GIL and
    # the cores, and in their own process at a lower CPU priority (`nice`) they
    # cannot starve the service's searches (docs/search.md, "Search while
    # ingesting"). Its writes become searchable within
    # index.read_consistency_seconds. "thread": inside the service's process,
    # sharing its index object (writes searchable at once; searches slow down
    # while it works).
    isolation: Literal["process", "thread"] = "process"
    # CPU niceness a worker process adds to itself at start (0 = none), and
    # gives its session where the kernel shares CPUs between sessions first
    # (autogroup; `worker.process.lower_priority`): under load the kernel then
    # gives a nice-0 process ~68x the CPU share of a nice-19 worker, and the
    # worker still uses every idle cycle (docs/ingestion.md).
    nice: int = Field(default=19, ge=0, le=19)
    # Stable id of this worker in tasks and logs; empty: "<host>:<pid>".
    id: str = Field(default="", max_length=128)
    # Tasks run at once (credits granted to the Task Manager).
    concurrency: int = Field(default=4, ge=1, le=1024)
    # Bearer token presented to the Task Manager (one of its dispatch.worker_tokens).
    token: SecretStr = SecretStr("")
    # The task handler, as "module:attribute": a factory called with WorkerResources.
    # The ingestion pipeline by default (docs/ingestion.md).
    handler: str = "services.knowledge.ingest.pipeline:ingest_handler"
    # Options for the handler (JSON object of strings in the environment).
    handler_options: dict[str, str] = Field(default_factory=dict)
    # Media types the worker accepts; empty: all.
    content_types: tuple[str, ...] = ()
    # Reconnect backoff when the Task Manager is unreachable: exponential from base,
    # at most cap, jittered. Seconds.
    reconnect_base_seconds: float = Field(default=0.1, gt=0)
    reconnect_cap_seconds: float = Field(default=5.0, gt=0)
    # On SIGTERM: how long running tasks may take to finish before they are
    # cancelled and handed back (retryable, WORKER_SHUTDOWN). Seconds.
    shutdown_grace_seconds: float = Field(default=5.0, ge=0)


class IngestSettings(BaseModel):
    """Limits of the ingestion pipeline (docs/ingestion.md). Each bounds memory or
    time for a pathological document; a document over a limit fails its task with
    DOCUMENT_TOO_LARGE (not retried)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Largest object the worker downloads, bytes (checked before the download).
    max_document_bytes: int = Field(default=512 * 1024 * 1024, ge=1)
    # PDF pages; checked before any text is extracted (pypdf counts 10,000 pages in ~2 s).
    max_pages: int = Field(default=2000, ge=1)
    # Spreadsheet cells (XLSX, CSV) over all sheets.
    max_cells: int = Field(default=2_000_000, ge=1)
    # Characters of extracted text over the whole document (~2,500 chunks of 250 tokens
    # per million: embedding them takes minutes on one core).
    max_characters: int = Field(default=10_000_000, ge=1)
    # Lines longer than this are cut at whitespace (or hard) before splitting, so a
    # single 50 MB line costs linear time instead of the splitter's recursive splits.
    max_line_characters: int = Field(default=10_000, ge=100)
    # Chunks per document.
    max_chunks: int = Field(default=50_000, ge=1)
    # OOXML (DOCX, PPTX, XLSX) zip guard, checked before a parser inflates anything.
    max_uncompressed_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    max_compression_ratio: float = Field(default=200.0, ge=1)
    max_zip_members: int = Field(default=10_000, ge=1)
    # JSON nesting depth.
    max_json_depth: int = Field(default=64, ge=1)
    # Where downloads are staged; empty: the system temporary directory.
    temp_dir: str = ""


class EmbeddingSettings(BaseModel):
    """How chunks become vectors. A knowledge base records its provider and model:
    "local" is all-MiniLM-L6-v2 (ONNX int8, in-process); "openai" is any
    OpenAI-compatible `/embeddings` endpoint configured here."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Texts per model call (ONNX int8 on one thread: 8-16 is fastest, measured).
    local_batch_size: int = Field(default=16, ge=1, le=256)
    # OpenAI-compatible endpoint, e.g. https://api.example.com/v1 (".../embeddings" is appended).
    openai_base_url: str = ""
    openai_api_key: SecretStr = SecretStr("")
    # Texts per request.
    openai_batch_size: int = Field(default=64, ge=1, le=2048)
    # Attempts per request on 429 / 5xx / connection errors, with exponential backoff
    # (base, capped) or the server's Retry-After.
    openai_max_attempts: int = Field(default=5, ge=1, le=20)
    openai_backoff_base_seconds: float = Field(default=0.5, gt=0)
    openai_backoff_cap_seconds: float = Field(default=30.0, gt=0)
    openai_timeout_seconds: float = Field(default=60.0, gt=0)
    # Largest chunk, tokens, for remote models (counted with the local tokenizer:
    # an approximation; remote models accept thousands).
    openai_max_chunk_tokens: int = Field(default=1024, ge=32)


def _default_index_uri() -> str:
    # KBMESH_HOME is the stack's state directory (devstack sets it per process).
    return str(Path(os.environ.get("KBMESH_HOME") or ".kbmesh") / "data" / "index")


class IndexSettings(BaseModel):
    """The vector + keyword index (LanceDB, services/knowledge/index)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # A local directory, or "s3://bucket/prefix" on the S3 of the `s3` group
    # (same endpoint and keys). Default: $KBMESH_HOME/data/index.
    uri: str = Field(default_factory=_default_index_uri, min_length=1)
    # How stale a reader may be: other processes' writes (workers) become
    # searchable within this many seconds. 0 checks on every query (costs a
    # manifest read per query, an S3 request on S3).
    read_consistency_seconds: float = Field(default=0.5, ge=0, le=60)
    # Background maintenance (compaction, folding new rows into the indexes,
    # building the vector index): seconds between runs; 0 disables it.
    optimize_interval_seconds: float = Field(default=10.0, ge=0)
    # A knowledge base gets an ANN vector index once it holds this many chunks;
    # below it, exact search is fast enough and exact.
    vector_index_min_rows: int = Field(default=20_000, ge=256)


class SearchSettings(BaseModel):
    """Search (the Search RPC)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # What embeds search queries. "local": all-MiniLM-L6-v2 (ONNX) from the
    # ingestion package. "hash": TEST ONLY — a deterministic bag-of-words hash
    # embedder (services/knowledge/index/hash_embedder.py) with no model and no
    # meaning beyond shared words; never use it for real knowledge bases.
    query_embedder: Literal["local", "hash"] = "local"


class KnowledgeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KBMESH_KNOWLEDGE_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    grpc: GrpcSettings = Field(default_factory=lambda: GrpcSettings(port=50052))
    log: LogSettings = LogSettings()
    redis: RedisSettings = RedisSettings()
    s3: S3Settings = S3Settings()
    task_manager: TaskManagerLink = TaskManagerLink()
    worker: WorkerSettings = WorkerSettings()
    index: IndexSettings = Field(default_factory=IndexSettings)
    search: SearchSettings = SearchSettings()
    ingest: IngestSettings = IngestSettings()
    embedding: EmbeddingSettings = EmbeddingSettings()
    auth: AuthSettings = AuthSettings()
