"""gRPC servicers of the Task Manager.

They translate between protos and the domain; errors are raised as
`KbmeshError`s and turned into statuses by `services.common.status`.
RPCs that later work fills in answer UNIMPLEMENTED with reason NOT_IMPLEMENTED.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc

from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from kbmesh.taskmanager.v1 import worker_pb2 as wk
from kbmesh.taskmanager.v1 import worker_pb2_grpc as wk_grpc
from services.common.errors import Code, InvalidArgument, KbmeshError, NotFound, Unimplemented
from services.task_manager.convert import (
    event_to_proto,
    has_header,
    header_from_proto,
    state_from_proto,
    task_to_proto,
    timestamp,
)
from services.task_manager.domain.ports import TaskStore
from services.task_manager.domain.upload import Uploads

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
        header = header_from_proto(first)

        async def chunks() -> AsyncIterator[bytes]:
            if first.file.data:
                yield first.file.data
            async for message in messages:
                if has_header(message):
                    raise InvalidArgument(
                        "HEADER_NOT_FIRST", "header fields are only allowed in the first message"
                    )
                if message.file.data:
                    yield message.file.data

        result = await self._uploads.upload(header, chunks())
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
        task_id = _require_task_id(request.task_id)
        task = await self._tasks.get_task(task_id)
        if task is None:
            raise _task_not_found(task_id)
        return task_to_proto(task)

    async def ListTasks(
        self, request: tm.ListTasksRequest, context: Context
    ) -> tm.ListTasksResponse:
        if request.page_size < 0:
            raise InvalidArgument("INVALID_PAGE_SIZE", "page_size must not be negative")
        page = await self._tasks.list_tasks(
            request.knowledge_base_id,
            state_from_proto(request.state),
            request.page_size,
            request.page_token,
        )
        return tm.ListTasksResponse(
            tasks=[task_to_proto(t) for t in page.tasks], next_page_token=page.next_page_token
        )

    async def WatchTask(
        self, request: tm.WatchTaskRequest, context: Context
    ) -> AsyncIterator[tm.WatchTaskResponse]:
        task_id = _require_task_id(request.task_id)
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
        task = await self._tasks.cancel(task_id, request.reason)
        return tm.CancelTaskResponse(task=task_to_proto(task))

    async def RetryTask(
        self, request: tm.RetryTaskRequest, context: Context
    ) -> tm.RetryTaskResponse:
        task_id = _require_task_id(request.task_id)
        if len(request.request_id) > 128:
            raise InvalidArgument("INVALID_REQUEST_ID", "request_id is at most 128 characters")
        task = await self._tasks.retry(task_id, request.request_id)
        return tm.RetryTaskResponse(task=task_to_proto(task))


def _task_not_found(task_id: str) -> KbmeshError:
    return NotFound(
        "TASK_NOT_FOUND", f"task {task_id!r} does not exist", metadata={"task_id": task_id}
    )


class WorkerApi(wk_grpc.WorkerServiceServicer):
    async def Connect(
        self, request_iterator: AsyncIterable[wk.ConnectRequest], context: Context
    ) -> AsyncIterator[wk.ConnectResponse]:
        raise Unimplemented("Connect")
        yield  # pragma: no cover - makes this an async generator
