"""gRPC servicers of the Task Manager.

They translate between protos and the domain; errors are raised as
`KbmeshError`s and turned into statuses by `services.common.status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc

from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from kbmesh.taskmanager.v1 import worker_pb2 as wk
from kbmesh.taskmanager.v1 import worker_pb2_grpc as wk_grpc
from services.common.auth import caller_tenant
from services.common.errors import Code, InvalidArgument, KbmeshError, NotFound, Unauthenticated
from services.common.protos import converted, timestamp
from services.common.tls import peer_certificate
from services.task_manager.convert import (
    assignment_to_proto,
    duration,
    event_to_proto,
    has_header,
    header_from_proto,
    stage_from_proto,
    state_from_proto,
    task_error_from_proto,
    task_result_from_proto,
    task_to_proto,
)
from services.task_manager.dispatch import (
    Assign,
    CancelOrder,
    Close,
    Dispatcher,
    DrainOrder,
    WorkerSession,
)
from services.task_manager.domain.dispatch import MAX_CREDITS, MAX_WORKER_ID_CHARS
from services.task_manager.domain.model import Task
from services.task_manager.domain.multipart import multipart_boundary, open_file_part
from services.task_manager.domain.ports import TaskStore
from services.task_manager.domain.upload import Uploads
from services.task_manager.domain.worker_auth import WorkerTokens

Context = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger(__name__)

TASK_MANAGER_SERVICE = tm.DESCRIPTOR.services_by_name["TaskManagerService"].full_name
WORKER_SERVICE = wk.DESCRIPTOR.services_by_name["WorkerService"].full_name
MAX_REASON_CHARS = 500


def _require_task_id(task_id: str) -> str:
    if not task_id:
        raise InvalidArgument("MISSING_TASK_ID", "task_id is required")
    if len(task_id) > 64:
        raise InvalidArgument("INVALID_TASK_ID", "task_id is at most 64 characters")
    return task_id


class TaskManagerApi(tm_grpc.TaskManagerServiceServicer):
    def __init__(self, uploads: Uploads, tasks: TaskStore) -> None:
        self._uploads = uploads
        self._tasks = tasks

    async def Upload(
        self, request_iterator: AsyncIterable[tm.UploadRequest], context: Context
    ) -> tm.UploadResponse:
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None:
            raise InvalidArgument("MISSING_HEADER", "the upload stream is empty")
        if not has_header(first):
            if first.file.data:
                raise InvalidArgument(
                    "BYTES_BEFORE_HEADER", "the first message must carry the upload header"
                )
            raise InvalidArgument("MISSING_HEADER", "the first message has no header fields")
        header = dataclasses.replace(header_from_proto(first), tenant=caller_tenant())

        async def chunks() -> AsyncIterator[bytes]:
            # Each read of a bytes field copies it out of the message: once.
            if data := first.file.data:
                yield data
            async for message in messages:
                if has_header(message):
                    raise InvalidArgument(
                        "HEADER_NOT_FIRST", "header fields are only allowed in the first message"
                    )
                if data := message.file.data:
                    yield data

        body: AsyncIterator[bytes] = chunks()
        # An HTML form's multipart/form-data body (through Envoy, its HTTP
        # Content-Type arrives in file.content_type): the first file part is
        # the document, streamed; its name and type come from the part headers.
        boundary = multipart_boundary(first.file.content_type)
        if boundary is not None:
            part = await open_file_part(body, boundary)
            header = dataclasses.replace(
                header,
                filename=header.filename or part.filename,
                content_type=part.content_type,
            )
            body = part.chunks
        result = await self._uploads.upload(header, body)
        task = result.task
        log.info(
            "upload acknowledged",
            extra={
                "task_id": task.id,
                "document_id": task.document_id,
                "knowledge_base_id": task.knowledge_base_id,
                "size_bytes": task.size_bytes,
                "duplicate": result.duplicate,
                "replayed": result.replayed,
                "ack_ms": round(result.ack_ms, 2),
                "stored_ms": round(result.stored_ms, 2),
            },
        )
        return tm.UploadResponse(
            task_id=task.id,
            document_id=task.document_id,
            task=task_to_proto(task),
            duplicate=result.duplicate,
            replayed=result.replayed,
        )

    async def GetTask(self, request: tm.GetTaskRequest, context: Context) -> tm.Task:
        return task_to_proto(await self._own_task(_require_task_id(request.task_id)))

    async def _own_task(self, task_id: str) -> Task:
        """The caller's task; another tenant's task does not exist for them."""
        task = await self._tasks.get_task(task_id)
        if task is None or task.tenant != caller_tenant():
            raise _task_not_found(task_id)
        return task

    async def ListTasks(
        self, request: tm.ListTasksRequest, context: Context
    ) -> tm.ListTasksResponse:
        if request.page_size < 0:
            raise InvalidArgument("INVALID_PAGE_SIZE", "page_size must not be negative")
        tenant = caller_tenant()
        kb = request.knowledge_base_id
        if kb and await self._tasks.knowledge_base_tenant(kb) != tenant:
            return tm.ListTasksResponse()  # as for a knowledge base that does not exist
        page = await self._tasks.list_tasks(
            kb,
            state_from_proto(request.state),
            request.page_size,
            request.page_token,
            tenant=tenant,
        )
        return tm.ListTasksResponse(
            tasks=await converted(page.tasks, task_to_proto), next_page_token=page.next_page_token
        )

    async def WatchTask(
        self, request: tm.WatchTaskRequest, context: Context
    ) -> AsyncIterator[tm.WatchTaskResponse]:
        task_id = _require_task_id(request.task_id)
        await self._own_task(task_id)
        sent = 0
        last: tm.Task | None = None
        try:
            async for event in self._tasks.watch(task_id, request.after_event_id):
                response = event_to_proto(event)
                last = response.task
                sent += 1
                yield response
        except KbmeshError as exc:
            if sent == 0:
                raise
            # Over HTTP/1.1 a status after the first byte looks like success:
            # report the failure as a last event the client can act on.
            yield tm.WatchTaskResponse(
                type=tm.WatchTaskResponse.TYPE_ERROR,
                task=last,
                time=timestamp(int(time.time() * 1000)),
                error=tm.TaskError(
                    code=Code(exc.code).name,
                    reason=exc.reason,
                    message=exc.message,
                    retryable=exc.code in (Code.UNAVAILABLE, Code.RESOURCE_EXHAUSTED),
                ),
                last=True,
            )

    async def CancelTask(
        self, request: tm.CancelTaskRequest, context: Context
    ) -> tm.CancelTaskResponse:
        task_id = _require_task_id(request.task_id)
        if len(request.reason) > MAX_REASON_CHARS:
            raise InvalidArgument("INVALID_REASON", f"reason is at most {MAX_REASON_CHARS} chars")
        await self._own_task(task_id)
        task = await self._tasks.cancel(task_id, request.reason)
        return tm.CancelTaskResponse(task=task_to_proto(task))

    async def RetryTask(
        self, request: tm.RetryTaskRequest, context: Context
    ) -> tm.RetryTaskResponse:
        task_id = _require_task_id(request.task_id)
        if len(request.request_id) > 128:
            raise InvalidArgument("INVALID_REQUEST_ID", "request_id is at most 128 characters")
        await self._own_task(task_id)
        task = await self._tasks.retry(task_id, request.request_id)
        return tm.RetryTaskResponse(task=task_to_proto(task))


def _task_not_found(task_id: str) -> KbmeshError:
    return NotFound(
        "TASK_NOT_FOUND", f"task {task_id!r} does not exist", metadata={"task_id": task_id}
    )


MAX_CONTENT_TYPES = 64
MAX_CONCURRENCY = 1024
# A worker stream must say hello within this many seconds.
HELLO_TIMEOUT_SECONDS = 30.0
# Worker messages about one task (applied in order per task).
_TASK_REPORTS = frozenset({"progress", "completed", "failed", "cancel_ack"})


def _forget(latest: dict[str, asyncio.Task[None]], task_id: str, done: asyncio.Task[None]) -> None:
    if latest.get(task_id) is done:
        del latest[task_id]


def _hello(message: wk.ConnectRequest | None) -> wk.ConnectRequest.Hello:
    if message is None or message.WhichOneof("message") != "hello":
        raise InvalidArgument("HELLO_REQUIRED", "the first message of a worker stream is hello")
    hello = message.hello
    worker_id = hello.worker_id
    if not 1 <= len(worker_id) <= MAX_WORKER_ID_CHARS or not worker_id.isprintable():
        raise InvalidArgument(
            "INVALID_WORKER_ID",
            f"worker_id must be 1-{MAX_WORKER_ID_CHARS} printable characters",
        )
    if not 1 <= hello.max_concurrency <= MAX_CONCURRENCY:
        raise InvalidArgument(
            "INVALID_MAX_CONCURRENCY", f"max_concurrency must be 1-{MAX_CONCURRENCY}"
        )
    if len(hello.content_types) > MAX_CONTENT_TYPES:
        raise InvalidArgument("INVALID_CONTENT_TYPES", f"at most {MAX_CONTENT_TYPES} content types")
    return hello


class WorkerApi(wk_grpc.WorkerServiceServicer):
    """`Connect`: one worker session (docs/worker-protocol.md).

    Authentication happens before anything is read. The stream then has two
    halves: a reader task applies the worker's messages in order through the
    dispatcher, and this generator sends what the dispatcher puts in the
    session's outbox (assignments, cancels, drain), until either side ends.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        tokens: WorkerTokens,
        bucket: str,
        *,
        require_certificate: bool = False,
    ) -> None:
        self._dispatcher = dispatcher
        self._tokens = tokens
        self._bucket = bucket
        self._require_certificate = require_certificate

    async def Connect(
        self, request_iterator: AsyncIterable[wk.ConnectRequest], context: Context
    ) -> AsyncIterator[wk.ConnectResponse]:
        if self._require_certificate and not peer_certificate(context):
            log.warning(
                "worker stream refused: no client certificate", extra={"peer": context.peer()}
            )
            raise Unauthenticated(
                "WORKER_CERTIFICATE_REQUIRED",
                "workers connect with a client certificate, to the Task Manager's mTLS port",
            )
        metadata = dict(context.invocation_metadata() or ())
        authorization = metadata.get("authorization")
        try:
            self._tokens.check(authorization if isinstance(authorization, str) else None)
        except KbmeshError:
            log.warning(
                "worker stream refused: bad or missing token", extra={"peer": context.peer()}
            )
            raise
        messages = aiter(request_iterator)
        try:
            first = await asyncio.wait_for(anext(messages, None), HELLO_TIMEOUT_SECONDS)
        except TimeoutError:
            first = None
        hello = _hello(first)
        dispatcher = self._dispatcher
        session = dispatcher.open_session(
            hello.worker_id,
            hello.max_concurrency,
            version=hello.version[:64],
            content_types=list(hello.content_types),
        )
        reader = asyncio.create_task(self._read(session, messages))
        try:
            policy = dispatcher.policy
            yield wk.ConnectResponse(
                welcome=wk.ConnectResponse.Welcome(
                    session_id=session.session_id,
                    lease_duration=duration(policy.lease_ms),
                    heartbeat_interval=duration(policy.heartbeat_ms),
                )
            )
            while True:
                item = await session.outbox.get()
                if isinstance(item, Close):
                    if item.error is not None:
                        raise item.error
                    return
                yield self._to_proto(item)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            dispatcher.close_session(session)

    def _to_proto(self, item: Assign | CancelOrder | DrainOrder) -> wk.ConnectResponse:
        if isinstance(item, Assign):
            return assignment_to_proto(item.task, self._bucket)
        if isinstance(item, CancelOrder):
            return wk.ConnectResponse(
                cancel=wk.ConnectResponse.Cancel(
                    task_id=item.task_id, lease_id=item.lease_id, reason=item.reason
                )
            )
        return wk.ConnectResponse(
            drain=wk.ConnectResponse.Drain(reason=item.reason, deadline=timestamp(item.deadline_ms))
        )

    async def _read(
        self, session: WorkerSession, messages: AsyncIterator[wk.ConnectRequest]
    ) -> None:
        error: KbmeshError | None = None
        # Reports about different tasks are applied concurrently (each is a round trip
        # to Redis), reports about one task in order.
        latest: dict[str, asyncio.Task[None]] = {}
        try:
            async for message in messages:
                self._dispatcher.seen(session)
                kind = message.WhichOneof("message")
                if kind in _TASK_REPORTS:
                    task_id = getattr(message, kind).task_id
                    report = asyncio.create_task(
                        self._report(session, message, latest.get(task_id))
                    )
                    latest[task_id] = report
                    report.add_done_callback(functools.partial(_forget, latest, task_id))
                else:
                    await self._apply(session, message)
        except KbmeshError as exc:
            error = exc  # a protocol violation: the stream ends with its status
        except grpc.RpcError:
            pass  # the worker went away
        finally:
            if latest:  # shielded: reports still change tasks if the stream is cut
                await asyncio.shield(asyncio.gather(*latest.values(), return_exceptions=True))
            session.outbox.put_nowait(Close(error))

    async def _report(
        self,
        session: WorkerSession,
        message: wk.ConnectRequest,
        after: asyncio.Task[None] | None,
    ) -> None:
        if after is not None:
            await asyncio.wait([after])
        await self._apply(session, message)

    async def _apply(self, session: WorkerSession, message: wk.ConnectRequest) -> None:
        dispatcher = self._dispatcher
        kind = message.WhichOneof("message")
        if kind == "credit":
            if not 1 <= message.credit.credits <= MAX_CREDITS:
                raise InvalidArgument("INVALID_CREDITS", f"credits must be 1-{MAX_CREDITS}")
            dispatcher.grant(session, message.credit.credits)
            return
        if kind == "hello":
            raise InvalidArgument("HELLO_NOT_FIRST", "hello is only allowed as the first message")
        if kind == "draining":
            dispatcher.worker_draining(session, message.draining.reason[:200])
            return
        try:
            if kind == "heartbeat":
                await dispatcher.heartbeat(session, list(message.heartbeat.lease_ids[:4096]))
            elif kind == "progress":
                p = message.progress
                await dispatcher.progress(
                    session, p.task_id, p.lease_id, stage_from_proto(p.stage), p.fraction, p.message
                )
            elif kind == "completed":
                c = message.completed
                await dispatcher.completed(
                    session, c.task_id, c.lease_id, task_result_from_proto(c.result)
                )
            elif kind == "failed":
                f = message.failed
                await dispatcher.failed(
                    session, f.task_id, f.lease_id, task_error_from_proto(f.error)
                )
            elif kind == "cancel_ack":
                a = message.cancel_ack
                await dispatcher.cancel_acknowledged(session, a.task_id, a.lease_id)
        except KbmeshError as exc:
            # The store is unreachable or the task is gone: the report is lost, and the
            # lease, if still held, lapses and the task runs again (at least once).
            log.warning(
                "worker report not applied",
                extra=session.log_extra(message=kind, reason=exc.reason),
            )
