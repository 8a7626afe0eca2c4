"""gRPC servicer of `DocumentTaskService` (internal: the Knowledge Service's
re-index queues its task here; no REST mapping). The gateway's native-gRPC
route for `/kbmesh.taskmanager.v1.` reaches it as it reaches every Task
Manager RPC; it does nothing a caller could not do with
`KnowledgeService.ReindexDocument`, and callers authenticate the same way."""

from __future__ import annotations

import logging
from typing import Any

import grpc

from kbmesh.taskmanager.v1 import document_tasks_pb2 as dt
from kbmesh.taskmanager.v1 import document_tasks_pb2_grpc as dt_grpc
from services.common.auth import caller_tenant
from services.task_manager.convert import chunking_from_proto, task_to_proto
from services.task_manager.domain.document_tasks import DocumentTaskStore, enqueue_document_task

Context = grpc.aio.ServicerContext[Any, Any]
log = logging.getLogger(__name__)

DOCUMENT_TASK_SERVICE = dt.DESCRIPTOR.services_by_name["DocumentTaskService"].full_name


class DocumentTaskApi(dt_grpc.DocumentTaskServiceServicer):
    def __init__(self, store: DocumentTaskStore, *, max_attempts: int) -> None:
        self._store = store
        self._max_attempts = max_attempts

    async def EnqueueDocumentTask(
        self, request: dt.EnqueueDocumentTaskRequest, context: Context
    ) -> dt.EnqueueDocumentTaskResponse:
        task, replayed = await enqueue_document_task(
            self._store,
            request.knowledge_base_id,
            request.document_id,
            chunking_from_proto(request.chunking),
            request.request_id,
            tenant=caller_tenant(),
            max_attempts=self._max_attempts,
        )
        log.info(
            "document task queued",
            extra={
                "task_id": task.id,
                "document_id": task.document_id,
                "knowledge_base_id": task.knowledge_base_id,
                "replayed": replayed,
            },
        )
        return dt.EnqueueDocumentTaskResponse(task=task_to_proto(task), replayed=replayed)
