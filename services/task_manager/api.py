"""gRPC servicers of the Task Manager.

They translate between protos and the domain; errors are raised as
`KbmeshError`s and turned into statuses by `services.common.status`.
RPCs that later work fills in answer UNIMPLEMENTED with reason NOT_IMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc

from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from kbmesh.taskmanager.v1 import worker_pb2 as wk
from kbmesh.taskmanager.v1 import worker_pb2_grpc as wk_grpc
from services.common.errors import Unimplemented

Context = grpc.aio.ServicerContext[Any, Any]

TASK_MANAGER_SERVICE = tm.DESCRIPTOR.services_by_name["TaskManagerService"].full_name
WORKER_SERVICE = wk.DESCRIPTOR.services_by_name["WorkerService"].full_name


class TaskManagerApi(tm_grpc.TaskManagerServiceServicer):
    async def Upload(
        self, request_iterator: AsyncIterable[tm.UploadRequest], context: Context
    ) -> tm.UploadResponse:
        raise Unimplemented("Upload")

    async def GetTask(self, request: tm.GetTaskRequest, context: Context) -> tm.GetTaskResponse:
        raise Unimplemented("GetTask")

    async def ListTasks(
        self, request: tm.ListTasksRequest, context: Context
    ) -> tm.ListTasksResponse:
        raise Unimplemented("ListTasks")

    async def WatchTask(
        self, request: tm.WatchTaskRequest, context: Context
    ) -> AsyncIterator[tm.WatchTaskResponse]:
        raise Unimplemented("WatchTask")
        yield  # pragma: no cover - makes this an async generator

    async def CancelTask(
        self, request: tm.CancelTaskRequest, context: Context
    ) -> tm.CancelTaskResponse:
        raise Unimplemented("CancelTask")

    async def RetryTask(
        self, request: tm.RetryTaskRequest, context: Context
    ) -> tm.RetryTaskResponse:
        raise Unimplemented("RetryTask")


class WorkerApi(wk_grpc.WorkerServiceServicer):
    async def Connect(
        self, request_iterator: AsyncIterable[wk.ConnectRequest], context: Context
    ) -> AsyncIterator[wk.ConnectResponse]:
        raise Unimplemented("Connect")
        yield  # pragma: no cover - makes this an async generator
