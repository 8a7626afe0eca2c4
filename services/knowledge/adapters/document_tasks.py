"""Queueing a re-index through the Task Manager's internal `DocumentTaskService`.

The Task Manager owns task state: it writes the new task, queues it and makes it
the document's latest task in one atomic step. Its answer (a status with an
ErrorInfo reason) is passed on to the caller as is: NOT_FOUND for an unknown
document, FAILED_PRECONDITION (DOCUMENT_TASK_ACTIVE) while a run is going on.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.rpc import error_details_pb2, status_pb2

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.taskmanager.v1 import document_tasks_pb2 as dt
from kbmesh.taskmanager.v1 import document_tasks_pb2_grpc as dt_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from services.common.errors import Code, KbmeshError, Unavailable

# Answers of the Task Manager that are the caller's business, passed on with their reason.
_PASSED_ON = frozenset(
    {
        Code.INVALID_ARGUMENT,
        Code.NOT_FOUND,
        Code.FAILED_PRECONDITION,
        Code.ABORTED,
        Code.UNAUTHENTICATED,
        Code.PERMISSION_DENIED,
        Code.RESOURCE_EXHAUSTED,
    }
)


class PassedOn(KbmeshError):
    """An error the Task Manager answered, with its code and reason."""

    def __init__(self, code: Code, reason: str, message: str, metadata: dict[str, str]) -> None:
        super().__init__(reason, message, metadata=metadata)
        self.code = code  # type: ignore[misc]  # per instance, not per class


def _error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    metadata: Iterable[tuple[str, str | bytes]] = error.trailing_metadata() or ()  # type: ignore[assignment]
    for key, value in metadata:
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    return None


class DocumentTasks:
    def __init__(self, channel: grpc.aio.Channel, *, timeout_seconds: float = 10.0) -> None:
        self._stub = dt_grpc.DocumentTaskServiceStub(channel)
        self._timeout = timeout_seconds

    async def enqueue(
        self,
        knowledge_base_id: str,
        document_id: str,
        chunking: kn.ChunkingConfig | None,
        request_id: str,
        *,
        authorization: str = "",
    ) -> tm.Task:
        """The queued task. `authorization` (the caller's own header) is forwarded
        so the Task Manager sees the same tenant as this service."""
        request = dt.EnqueueDocumentTaskRequest(
            knowledge_base_id=knowledge_base_id,
            document_id=document_id,
            request_id=request_id,
        )
        if chunking is not None:
            request.chunking.CopyFrom(chunking)
        metadata = (("authorization", authorization),) if authorization else None
        try:
            answer = await self._stub.EnqueueDocumentTask(
                request, timeout=self._timeout, metadata=metadata
            )
        except grpc.aio.AioRpcError as exc:
            code = Code(exc.code().value[0])
            info = _error_info(exc)
            if code in _PASSED_ON and info is not None:
                raise PassedOn(code, info.reason, exc.details() or "", dict(info.metadata)) from exc
            raise Unavailable(
                "TASK_MANAGER_UNAVAILABLE",
                "the Task Manager did not queue the document's task; retry the call",
                metadata={"document_id": document_id},
                retry_after=1.0,
            ) from exc
        return answer.task
