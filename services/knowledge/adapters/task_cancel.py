"""Cancelling ingestion tasks through the Task Manager's `CancelTask` RPC.

The Task Manager owns task state (and pushes the cancel to the worker holding
a running task), so the Knowledge Service asks it rather than writing task
records itself.
"""

from __future__ import annotations

import grpc

from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.common.auth import forwarded_credentials
from services.common.errors import Unavailable

# Already finished, or gone: nothing left to cancel.
_NOTHING_TO_CANCEL = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND)


class TaskCanceller:
    def __init__(self, channel: grpc.aio.Channel, *, timeout_seconds: float = 10.0) -> None:
        self._stub = tm_grpc.TaskManagerServiceStub(channel)
        self._timeout = timeout_seconds

    async def cancel(self, task_id: str, reason: str) -> bool:
        """True when the task was pending or running and is now cancelled (or
        being cancelled); False when it had already finished or does not exist."""
        if not task_id:
            return False
        try:
            await self._stub.CancelTask(
                tm.CancelTaskRequest(task_id=task_id, reason=reason[:500]),
                timeout=self._timeout,
                # On the caller's behalf: the Task Manager checks the task is theirs.
                metadata=forwarded_credentials(),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _NOTHING_TO_CANCEL:
                return False
            raise Unavailable(
                "TASK_MANAGER_UNAVAILABLE",
                "the Task Manager did not cancel the document's task; retry the call",
                metadata={"task_id": task_id},
            ) from exc
        return True
