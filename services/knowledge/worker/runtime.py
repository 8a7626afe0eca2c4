"""The knowledge worker: pulls tasks from the Task Manager and runs them.

`WorkerRuntime.run()` keeps one `WorkerService.Connect` stream open
(docs/worker-protocol.md):

- connect with `authorization: Bearer <token>`, say hello, grant credits for
  the free capacity (concurrency minus what is still running from an earlier
  stream), resend reports that could not be sent before, and list the leases
  it still holds in a first heartbeat;
- run each assignment as an asyncio task (`handlers.TaskHandler`), report
  progress, heartbeat every `welcome.heartbeat_interval`, and grant one
  credit whenever a task ends;
- Cancel: cancel that task's coroutine; the handler cleans up; answer
  CancelAck;
- Drain (the Task Manager is stopping): grant nothing more on this stream,
  and once nothing runs, close it and reconnect;
- the stream breaks: tasks keep running (their leases are the worker's, not
  the stream's); reconnect with jittered exponential backoff and report there.

`drain(grace)` (SIGTERM) stops taking work: it tells the Task Manager
(Draining), hands back any assignment still arriving, lets running tasks
finish for `grace` seconds, cancels and hands back the rest (Failed,
retryable, WORKER_SHUTDOWN: they go straight back to the queue), flushes the
reports and closes the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from grpc.aio import EOF  # type: ignore[attr-defined]  # missing from grpc-stubs

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import worker_pb2 as wk
from kbmesh.taskmanager.v1 import worker_pb2_grpc as wk_grpc
from services.common.settings import TlsClientSettings
from services.common.tls import open_channel
from services.knowledge.worker.handlers import (
    Job,
    JobFailed,
    JobResult,
    ObjectRef,
    Stage,
    TaskHandler,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

VERSION = "kbmesh-worker/0.1"
WORKER_SHUTDOWN = "WORKER_SHUTDOWN"
# Reports that end a task: kept and resent on the next stream if the current one breaks.
_FINAL = frozenset({"completed", "failed", "cancel_ack"})
# Heartbeat interval if the Task Manager's welcome has none, seconds.
_DEFAULT_HEARTBEAT = 10.0
# Progress reports per task are sent at most this often (stage changes always go).
_PROGRESS_INTERVAL = 0.1
# How long a stopping worker waits for the Task Manager to close the stream.
_CLOSE_TIMEOUT = 3.0
# How long the Task Manager may take to answer hello, seconds.
_WELCOME_TIMEOUT = 15.0
# How long cancelled handlers get to clean up.
_CLEANUP_TIMEOUT = 10.0


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass(frozen=True)
class WorkerConfig:
    address: str
    token: str
    worker_id: str
    concurrency: int
    content_types: tuple[str, ...] = ()
    reconnect_base_seconds: float = 0.1
    reconnect_cap_seconds: float = 5.0
    # TLS to the Task Manager (plaintext when its ca_file is empty).
    tls: TlsClientSettings = field(default_factory=TlsClientSettings)


def reconnect_delay(failures: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Full-jitter exponential backoff: many workers do not reconnect in lockstep."""
    ceiling: float = min(cap, base * float(1 << min(failures, 30)))
    return ceiling * (0.2 + 0.8 * rand())


class _Session:
    """One Connect stream."""

    _CLOSE = object()

    def __init__(self, call: Any, session_id: str) -> None:
        self.call = call
        self.session_id = session_id
        self.outbox: asyncio.Queue[Any] = asyncio.Queue()
        self.draining = False  # the Task Manager said Drain
        self.closing = False
        self.ended = asyncio.Event()
        self.unsent_credits = 0

    def send(self, message: wk.ConnectRequest) -> None:
        if not self.closing:
            self.outbox.put_nowait(message)

    def close(self) -> None:
        """Half-close after what is queued has been written."""
        if not self.closing:
            self.closing = True
            self.outbox.put_nowait(self._CLOSE)


@dataclass(eq=False)
class _Running:
    job: Job
    context: _JobContext
    task: asyncio.Task[None] | None = None
    cancel_reason: str = ""


@dataclass(eq=False)
class _JobContext:
    """`handlers.JobContext` for one job."""

    runtime: WorkerRuntime
    job: Job
    loop: asyncio.AbstractEventLoop
    cancelled: threading.Event = field(default_factory=threading.Event)
    _last_stage: Stage | None = None
    _last_time: float = 0.0

    @property
    def worker_id(self) -> str:
        return self.runtime.worker_id

    async def progress(self, stage: Stage, fraction: float, message: str = "") -> None:
        self._progress(stage, fraction, message)

    def progress_threadsafe(self, stage: Stage, fraction: float, message: str = "") -> None:
        self.loop.call_soon_threadsafe(self._progress, stage, fraction, message)

    def _progress(self, stage: Stage, fraction: float, message: str) -> None:
        now = time.monotonic()
        if stage == self._last_stage and now - self._last_time < _PROGRESS_INTERVAL:
            return
        self._last_stage, self._last_time = stage, now
        self.runtime._send(
            wk.ConnectRequest(
                progress=wk.ConnectRequest.Progress(
                    task_id=self.job.task_id,
                    lease_id=self.job.lease_id,
                    stage=kn.Stage.Value(f"STAGE_{stage.value}"),
                    fraction=fraction,
                    message=message[:500],
                )
            )
        )

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        future = self.loop.run_in_executor(self.runtime.executor, fn, *args)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            # The thread cannot be interrupted: tell it, and let it return first.
            self.cancelled.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(future), _CLEANUP_TIMEOUT)
            raise


def _job(assignment: wk.ConnectResponse.Assignment) -> Job:
    strategy = kn.ChunkingConfig.Strategy.Name(assignment.chunking.strategy)
    strategy = strategy.removeprefix("STRATEGY_")
    return Job(
        task_id=assignment.task_id,
        lease_id=assignment.lease_id,
        attempt=assignment.attempt,
        knowledge_base_id=assignment.knowledge_base_id,
        document_id=assignment.document_id,
        object=ObjectRef(
            bucket=assignment.object.bucket,
            key=assignment.object.key,
            size_bytes=assignment.object.size_bytes,
            sha256=assignment.object.sha256,
        ),
        filename=assignment.filename,
        content_type=assignment.content_type,
        chunking_strategy="" if strategy == "UNSPECIFIED" else strategy,
        chunk_size=assignment.chunking.chunk_size,
        chunk_overlap=assignment.chunking.chunk_overlap,
        metadata=dict(assignment.metadata),
    )


class WorkerRuntime:
    """See the module docstring."""

    def __init__(
        self,
        config: WorkerConfig,
        handler: TaskHandler,
        *,
        random_source: Callable[[], float] = random.random,
    ) -> None:
        self.config = config
        self.worker_id = config.worker_id
        self._handler = handler
        self._random = random_source
        self.executor = ThreadPoolExecutor(
            max_workers=config.concurrency, thread_name_prefix="kbmesh-job"
        )
        self._running: dict[str, _Running] = {}
        self._unsent: list[wk.ConnectRequest] = []
        self._session: _Session | None = None
        self._stopping = False  # drain(): take no more work
        self._closed = asyncio.Event()  # run() should return
        self._runner: asyncio.Task[None] | None = None
        self._welcomed = False

    # --- lifecycle ---

    def start(self) -> asyncio.Task[None]:
        """Runs `run()` in the background (inside the Knowledge Service)."""
        self._runner = asyncio.create_task(self.run(), name="knowledge-worker")
        return self._runner

    async def run(self) -> None:
        failures = 0
        try:
            while not self._closed.is_set():
                self._welcomed = False
                try:
                    await self._connect()
                except TimeoutError:
                    log.warning("task manager did not answer hello", extra=self._extra())
                except grpc.aio.AioRpcError as exc:
                    level = (
                        logging.ERROR
                        if exc.code() == grpc.StatusCode.UNAUTHENTICATED
                        else logging.WARNING
                    )
                    log.log(
                        level,
                        "task manager stream failed",
                        extra={
                            "worker_id": self.worker_id,
                            "code": exc.code().name,
                            "details": exc.details(),
                        },
                    )
                except Exception:  # never let the worker loop die: log, back off, retry
                    log.exception("worker stream failed unexpectedly", extra=self._extra())
                failures = 0 if self._welcomed else failures + 1
                if self._closed.is_set():
                    break
                delay = reconnect_delay(
                    failures,
                    self.config.reconnect_base_seconds,
                    self.config.reconnect_cap_seconds,
                    self._random,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closed.wait(), delay)
        finally:
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def drain(self, grace: float) -> None:
        """SIGTERM: take no new work, finish or hand back within `grace`, then stop."""
        if self._stopping:
            return
        self._stopping = True
        log.info(
            "worker draining", extra={"worker_id": self.worker_id, "running": len(self._running)}
        )
        if self._session is not None:
            self._session.send(
                wk.ConnectRequest(draining=wk.ConnectRequest.Draining(reason="worker stopping"))
            )
        tasks = [r.task for r in self._running.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        left = [r for r in self._running.values() if r.task is not None and not r.task.done()]
        for running in left:
            running.cancel_reason = "shutdown"
            assert running.task is not None
            running.task.cancel()
        if left:
            await asyncio.wait([r.task for r in left if r.task], timeout=_CLEANUP_TIMEOUT)
        session = self._session
        if session is not None:
            session.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(session.ended.wait(), _CLOSE_TIMEOUT)
        if self._unsent:
            log.warning(
                "stopping with unsent reports; their leases will lapse",
                extra={"worker_id": self.worker_id, "unsent": len(self._unsent)},
            )
        await self.close()

    async def close(self) -> None:
        """Stops at once: running handlers are cancelled (their leases lapse)."""
        self._stopping = True
        self._closed.set()
        for running in list(self._running.values()):
            if running.task is not None:
                running.cancel_reason = running.cancel_reason or "shutdown"
                running.task.cancel()
        if self._runner is not None and self._runner is not asyncio.current_task():
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner

    # --- the stream ---

    async def _connect(self) -> None:
        """One stream, until it ends (`_welcomed` says whether it got that far)."""
        config = self.config
        metadata = (("authorization", f"Bearer {config.token}"),)
        async with open_channel(
            config.address,
            config.tls,
            options=[
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
            ],
        ) as channel:
            stub: Any = wk_grpc.WorkerServiceStub(channel)  # reader/writer style: untyped
            call = stub.Connect(metadata=metadata)
            hello = wk.ConnectRequest.Hello(
                worker_id=self.worker_id,
                version=VERSION,
                content_types=list(config.content_types),
                max_concurrency=config.concurrency,
            )
            with contextlib.suppress(asyncio.InvalidStateError):  # ended: read() says why
                await call.write(wk.ConnectRequest(hello=hello))
            first = await asyncio.wait_for(call.read(), _WELCOME_TIMEOUT)
            if first is EOF or first.WhichOneof("message") != "welcome":
                log.warning("task manager did not welcome the worker", extra=self._extra())
                call.cancel()
                return
            self._welcomed = True
            welcome = first.welcome
            interval = welcome.heartbeat_interval.ToMilliseconds() / 1000 or _DEFAULT_HEARTBEAT
            session = _Session(call, welcome.session_id)
            self._session = session
            log.info(
                "worker session started",
                extra=self._extra(session_id=session.session_id, address=config.address),
            )
            if self._stopping:
                session.send(
                    wk.ConnectRequest(draining=wk.ConnectRequest.Draining(reason="worker stopping"))
                )
            else:
                self._grant(session, config.concurrency - len(self._running))
            unsent, self._unsent = self._unsent, []
            for report in unsent:
                session.send(report)
            if self._running:
                session.send(self._heartbeat())
            writer = asyncio.create_task(self._write(session))
            beats = asyncio.create_task(self._heartbeats(session, interval))
            try:
                while True:
                    response = await call.read()
                    if response is EOF:
                        break
                    self._on_response(session, response)
            finally:
                self._session = None
                session.ended.set()
                beats.cancel()
                writer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await writer
                self._keep_unsent(session)
                call.cancel()
                log.info("worker session ended", extra=self._extra(session_id=session.session_id))

    def _extra(self, **more: object) -> dict[str, object]:
        return {"worker_id": self.worker_id, **more}

    async def _write(self, session: _Session) -> None:
        while True:
            message = await session.outbox.get()
            if message is _Session._CLOSE:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await session.call.done_writing()
                return
            try:
                await session.call.write(message)
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                if message.WhichOneof("message") in _FINAL:
                    self._unsent.append(message)
                return

    def _keep_unsent(self, session: _Session) -> None:
        while not session.outbox.empty():
            message = session.outbox.get_nowait()
            if message is not _Session._CLOSE and message.WhichOneof("message") in _FINAL:
                self._unsent.append(message)

    async def _heartbeats(self, session: _Session, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            session.send(self._heartbeat())

    def _heartbeat(self) -> wk.ConnectRequest:
        leases = [r.job.lease_id for r in self._running.values()]
        return wk.ConnectRequest(heartbeat=wk.ConnectRequest.Heartbeat(lease_ids=leases))

    def _send(self, message: wk.ConnectRequest) -> None:
        session = self._session
        if session is not None and not session.closing:
            session.send(message)
        elif message.WhichOneof("message") in _FINAL:
            self._unsent.append(message)

    def _grant(self, session: _Session, credits: int) -> None:
        if credits > 0 and not session.draining and not self._stopping:
            session.send(wk.ConnectRequest(credit=wk.ConnectRequest.CreditGrant(credits=credits)))

    def _grant_one(self, session: _Session) -> None:
        """One more credit, sent with the others freed in the same loop iteration
        (one message for a burst of completions)."""
        session.unsent_credits += 1
        if session.unsent_credits == 1:
            asyncio.get_running_loop().call_soon(self._flush_credits, session)

    def _flush_credits(self, session: _Session) -> None:
        credits, session.unsent_credits = session.unsent_credits, 0
        if self._session is session:
            self._grant(session, credits)

    def _on_response(self, session: _Session, response: wk.ConnectResponse) -> None:
        kind = response.WhichOneof("message")
        if kind == "assignment":
            self._on_assignment(response.assignment)
        elif kind == "cancel":
            cancel = response.cancel
            running = self._running.get(cancel.task_id)
            if running is not None and running.job.lease_id == cancel.lease_id:
                log.info(
                    "cancelling task",
                    extra=self._extra(
                        task_id=cancel.task_id, lease_id=cancel.lease_id, reason=cancel.reason
                    ),
                )
                running.cancel_reason = cancel.reason or "cancel"
                running.context.cancelled.set()
                if running.task is not None:
                    running.task.cancel()
        elif kind == "drain":
            session.draining = True
            log.info(
                "task manager asked to drain",
                extra=self._extra(session_id=session.session_id, reason=response.drain.reason),
            )
            if not self._running:
                session.close()

    def _on_assignment(self, assignment: wk.ConnectResponse.Assignment) -> None:
        job = _job(assignment)
        extra = self._extra(task_id=job.task_id, lease_id=job.lease_id, attempt=job.attempt)
        if self._stopping or len(self._running) >= self.config.concurrency:
            log.info("handing back an assignment", extra=extra)
            self._send(self._failed(job, WORKER_SHUTDOWN, "the worker is stopping", True))
            return
        log.debug("task started", extra=extra)
        context = _JobContext(self, job, asyncio.get_running_loop())
        running = _Running(job, context)
        self._running[job.task_id] = running
        running.task = asyncio.create_task(self._run_job(running), name=f"job-{job.task_id}")

    # --- one job ---

    def _failed(
        self, job: Job, reason: str, message: str, retryable: bool, code: str = "UNAVAILABLE"
    ) -> wk.ConnectRequest:
        return wk.ConnectRequest(
            failed=wk.ConnectRequest.Failed(
                task_id=job.task_id,
                lease_id=job.lease_id,
                error=tm.TaskError(
                    code=code, reason=reason, message=message[:1000], retryable=retryable
                ),
            )
        )

    async def _run_job(self, running: _Running) -> None:
        job = running.job
        extra = self._extra(task_id=job.task_id, lease_id=job.lease_id, attempt=job.attempt)
        began = time.monotonic()
        report: wk.ConnectRequest
        try:
            result: JobResult = await self._handler.run(job, running.context)
            report = wk.ConnectRequest(
                completed=wk.ConnectRequest.Completed(
                    task_id=job.task_id,
                    lease_id=job.lease_id,
                    result=tm.TaskResult(
                        chunk_count=result.chunk_count,
                        page_count=result.page_count,
                        token_count=result.token_count,
                        duration_ms=int((time.monotonic() - began) * 1000),
                    ),
                )
            )
            log.debug("task done", extra=extra)
        except asyncio.CancelledError:
            if running.cancel_reason == "shutdown":
                report = self._failed(
                    job, WORKER_SHUTDOWN, "the worker stopped before finishing", True
                )
            else:
                report = wk.ConnectRequest(
                    cancel_ack=wk.ConnectRequest.CancelAck(
                        task_id=job.task_id, lease_id=job.lease_id
                    )
                )
            log.info("task stopped", extra={**extra, "reason": running.cancel_reason})
        except JobFailed as exc:
            report = self._failed(job, exc.reason, exc.message, exc.retryable, exc.code)
            log.info(
                "task failed", extra={**extra, "reason": exc.reason, "retryable": exc.retryable}
            )
        except Exception:
            log.exception("task handler crashed", extra=extra)
            report = self._failed(
                job, "WORKER_ERROR", "the worker failed unexpectedly; see its log", True, "UNKNOWN"
            )
        finally:
            self._running.pop(job.task_id, None)
        self._send(report)
        session = self._session
        if session is not None:
            self._grant_one(session)
            if session.draining and not self._running:
                session.close()
