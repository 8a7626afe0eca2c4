"""What a knowledge worker runs for one task: the handler interface, and handlers.

A handler is chosen by `KnowledgeSettings.worker.handler` ("module:attribute"):
the attribute is a factory called once with `WorkerResources` that returns a
`TaskHandler`. For each leased attempt the runtime calls
`await handler.run(job, context)`:

- return a `JobResult`: the task SUCCEEDS;
- raise `JobFailed(reason, message, retryable=...)`: the attempt fails; a
  retryable failure is retried with backoff until the task's attempts run out;
- any other exception: a retryable failure with reason WORKER_ERROR (details
  in the worker's log);
- cancellation (a CancelTask, a lost lease, or the worker's shutdown) arrives
  as `asyncio.CancelledError` at the handler's current `await`; clean up
  partial output in `finally` / `except CancelledError` and re-raise.

CPU-heavy work (parsing, embedding) goes through `context.run_blocking(fn,
...)`: it runs in the worker's thread pool, off the event loop, so heartbeats
and other tasks go on. Threads cannot be interrupted: blocking code should
check `context.cancelled` (a threading.Event) between steps; `run_blocking`
waits for the thread to return before the cancellation goes on, so cleanup
never races the work. Blocking code reports progress with
`context.progress_threadsafe(...)`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis

T = TypeVar("T")


class Stage(StrEnum):
    """Pipeline stages a handler reports (kbmesh.knowledge.v1.Stage)."""

    DOWNLOADING = "DOWNLOADING"
    PARSING = "PARSING"
    CHUNKING = "CHUNKING"
    EMBEDDING = "EMBEDDING"
    INDEXING = "INDEXING"


@dataclass(frozen=True)
class ObjectRef:
    """Where the document's bytes are in S3."""

    bucket: str
    key: str
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Job:
    """One leased attempt of an ingestion task."""

    task_id: str
    lease_id: str
    attempt: int
    knowledge_base_id: str
    document_id: str
    object: ObjectRef
    filename: str
    content_type: str
    # Upload overrides; "" / 0 mean the knowledge base's own settings.
    chunking_strategy: str = ""
    chunk_size: int = 0
    chunk_overlap: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobResult:
    chunk_count: int = 0
    page_count: int = 0
    token_count: int = 0


class JobFailed(Exception):
    """The attempt failed for a reason the handler knows (docs/errors.md, task errors).

    `code` is a google.rpc.Code name; `retryable` says whether another attempt may
    succeed (a timeout: yes; an encrypted PDF: no)."""

    def __init__(
        self, reason: str, message: str, *, retryable: bool = False, code: str = ""
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable
        self.code = code or ("UNAVAILABLE" if retryable else "FAILED_PRECONDITION")


class JobContext(Protocol):
    """What the runtime gives a handler for one job."""

    @property
    def worker_id(self) -> str: ...

    @property
    def cancelled(self) -> threading.Event:
        """Set when the job is being cancelled (for code running in threads)."""

    async def progress(self, stage: Stage, fraction: float, message: str = "") -> None:
        """Reports stage and fraction (0 to 1) of the whole job; renews the lease."""

    def progress_threadsafe(self, stage: Stage, fraction: float, message: str = "") -> None:
        """`progress` from a thread of `run_blocking`."""

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs `fn(*args)` in the worker's thread pool (see the module docstring)."""


class TaskHandler(Protocol):
    async def run(self, job: Job, context: JobContext) -> JobResult: ...


@dataclass(frozen=True)
class WorkerResources:
    """What a handler factory may use: the worker's id, its options, the
    connections the service opened (Redis; S3 as an aiobotocore client; the chunk
    index, a domain.chunks.ChunkIndex) and the service's settings
    (a KnowledgeSettings)."""

    worker_id: str
    options: Mapping[str, str]
    redis: Redis | None = None
    s3: Any = None
    index: Any = None
    settings: Any = None


HandlerFactory = Callable[[WorkerResources], TaskHandler]


# --- handlers ----------------------------------------------------------------------------------


class PipelineNotReady:
    """The default until the ingestion pipeline lands: fails each task at once,
    not retryable, so nothing churns; RetryTask re-runs them later."""

    def __init__(self, resources: WorkerResources) -> None:
        del resources

    async def run(self, job: Job, context: JobContext) -> JobResult:
        raise JobFailed(
            "INGESTION_NOT_AVAILABLE",
            "this worker has no ingestion pipeline yet; retry the task once one is deployed",
            code="UNIMPLEMENTED",
        )


class SleepHandler:
    """A stand-in job for tests and benchmarks: sleeps, reports progress, and
    records what it did.

    Options (`worker.handler_options`): `record_key` — a Redis list that gets one
    JSON entry per event (`{"event", "task_id", "attempt", "worker_id", "lease_id",
    "time"}`; events start, done, failed, cancelled); `record_events` — which
    events to record (comma-separated, default all); `sleep_seconds` — default
    duration (0).

    Per task, from the upload's metadata: `sleep` (seconds), `steps` (progress
    reports spread over the sleep, default 0), `fail` ("retryable" or "fatal":
    every attempt fails), `fail_attempts` (attempts up to this number fail,
    retryably), `blocking` ("1": sleep in a pool thread, checking for
    cancellation, like CPU-bound work would).
    """

    def __init__(self, resources: WorkerResources) -> None:
        options = resources.options
        self._redis = resources.redis
        self._record_key = options.get("record_key", "")
        events = options.get("record_events", "start,done,failed,cancelled")
        self._events = {e.strip() for e in events.split(",") if e.strip()}
        self._sleep = float(options.get("sleep_seconds", "0") or 0)
        self._worker_id = resources.worker_id
        if self._record_key and self._redis is None:
            raise ValueError("SleepHandler needs Redis to record into record_key")

    async def _record(self, event: str, job: Job) -> None:
        if not self._record_key or event not in self._events or self._redis is None:
            return
        entry = {
            "event": event,
            "task_id": job.task_id,
            "attempt": job.attempt,
            "worker_id": self._worker_id,
            "lease_id": job.lease_id,
            "time": time.time(),
        }
        await self._redis.rpush(self._record_key, json.dumps(entry))

    async def run(self, job: Job, context: JobContext) -> JobResult:
        meta = job.metadata
        await self._record("start", job)
        seconds = float(meta.get("sleep", self._sleep) or 0)
        steps = int(meta.get("steps", "0") or 0)
        stages = list(Stage)
        try:
            if meta.get("blocking") == "1":
                await context.run_blocking(_blocking_sleep, seconds, context)
            elif steps > 0:
                for i in range(steps):
                    await context.progress(
                        stages[i * len(stages) // steps], (i + 1) / (steps + 1), f"step {i + 1}"
                    )
                    await asyncio.sleep(seconds / steps)
            elif seconds > 0:
                await asyncio.sleep(seconds)
            failing = meta.get("fail", "")
            if failing or job.attempt <= int(meta.get("fail_attempts", "0") or 0):
                raise JobFailed(
                    "TEST_FAILURE",
                    f"failing attempt {job.attempt} on purpose",
                    retryable=failing != "fatal",
                )
        except asyncio.CancelledError:
            await asyncio.shield(self._record("cancelled", job))
            raise
        except JobFailed:
            await self._record("failed", job)
            raise
        await self._record("done", job)
        return JobResult(chunk_count=1)


def _blocking_sleep(seconds: float, context: JobContext) -> None:
    deadline = time.monotonic() + seconds
    while not context.cancelled.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        context.cancelled.wait(min(left, 0.05))
