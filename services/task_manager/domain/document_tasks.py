"""Queueing a new ingestion task for a document that is already stored (re-index).

The new task runs the pipeline over the document's stored object again: no new
upload. It becomes the document's latest task in the same atomic step that
queues it, and only when the document's current task has finished (a second run
beside a PENDING or RUNNING one would race it for the document's chunks).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Protocol

from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from services.common.ids import new_id
from services.task_manager.domain.model import Chunking, Task, TaskState
from services.task_manager.domain.upload import MAX_REQUEST_ID_CHARS, validate_chunking

# The document's task changed between the read and the write this often: give up.
_MAX_CONFLICTS = 10


@dataclass(frozen=True)
class StoredDocument:
    """A document record as the upload wrote it."""

    id: str
    knowledge_base_id: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    object_key: str
    task_id: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Requeued:
    """What `DocumentTaskStore.requeue` did.

    "created": `task` is queued and is the document's latest task; "replayed": the
    request id was used before, `task` is the task that call queued; "active": the
    document's latest task is `state` (PENDING/RUNNING), nothing written; "moved":
    the document's latest task is no longer the one read, nothing written;
    "document_missing" / "knowledge_base_missing": nothing written.
    """

    status: Literal[
        "created", "replayed", "active", "moved", "document_missing", "knowledge_base_missing"
    ]
    task: Task | None = None
    state: str = ""


class DocumentTaskStore(Protocol):
    async def knowledge_base_tenant(self, knowledge_base_id: str) -> str | None:
        """The owner of the knowledge base, None when it does not exist."""

    async def stored_document(self, document_id: str) -> StoredDocument | None: ...

    async def get_task(self, task_id: str) -> Task | None: ...

    async def requeue(self, task: Task, previous_task_id: str, request_id: str) -> Requeued:
        """Atomically, if the knowledge base exists, the request id is new, the
        document is still in it with `previous_task_id` as its latest task and that
        task is not PENDING/RUNNING: writes `task`, queues it, makes it the
        document's latest task, stores the request id and the first event."""


def new_document_task(
    document: StoredDocument,
    previous: Task | None,
    chunking: Chunking,
    *,
    tenant: str,
    now_ms: int,
    max_attempts: int,
) -> Task:
    """A PENDING task over the stored object; priority from the previous run."""
    return Task(
        tenant=tenant,
        id=new_id(now_ms),
        knowledge_base_id=document.knowledge_base_id,
        document_id=document.id,
        filename=document.filename,
        content_type=document.content_type,
        size_bytes=document.size_bytes,
        sha256=document.sha256,
        object_key=document.object_key,
        state=TaskState.PENDING,
        create_time_ms=now_ms,
        update_time_ms=now_ms,
        max_attempts=max_attempts,
        priority=previous.priority if previous is not None else 0,
        chunking=chunking,
        metadata=dict(document.metadata),
    )


def _document_not_found(knowledge_base_id: str, document_id: str) -> NotFound:
    return NotFound(
        "DOCUMENT_NOT_FOUND",
        f"document {document_id!r} is not in knowledge base {knowledge_base_id!r}",
        metadata={"document_id": document_id, "knowledge_base_id": knowledge_base_id},
    )


def _knowledge_base_not_found(knowledge_base_id: str) -> NotFound:
    return NotFound(
        "KNOWLEDGE_BASE_NOT_FOUND",
        f"knowledge base {knowledge_base_id!r} does not exist",
        metadata={"knowledge_base_id": knowledge_base_id},
    )


async def enqueue_document_task(
    store: DocumentTaskStore,
    knowledge_base_id: str,
    document_id: str,
    chunking: Chunking,
    request_id: str,
    *,
    tenant: str,
    max_attempts: int,
) -> tuple[Task, bool]:
    """The queued task and whether it replays an earlier call (see the module
    docstring; errors in protos/kbmesh/taskmanager/v1/document_tasks.proto).
    Another tenant's knowledge base does not exist for `tenant`."""
    if not knowledge_base_id:
        raise InvalidArgument("MISSING_KNOWLEDGE_BASE_ID", "knowledge_base_id is required")
    if not document_id:
        raise InvalidArgument("MISSING_DOCUMENT_ID", "document_id is required")
    if len(knowledge_base_id) > 64 or len(document_id) > 64:
        raise InvalidArgument("INVALID_DOCUMENT_ID", "ids are at most 64 characters")
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidArgument(
            "INVALID_REQUEST_ID", f"request_id is at most {MAX_REQUEST_ID_CHARS} characters"
        )
    validate_chunking(chunking)
    if await store.knowledge_base_tenant(knowledge_base_id) != tenant:
        raise _knowledge_base_not_found(knowledge_base_id)
    for _ in range(_MAX_CONFLICTS):
        document = await store.stored_document(document_id)
        if document is None or document.knowledge_base_id != knowledge_base_id:
            raise _document_not_found(knowledge_base_id, document_id)
        previous = await store.get_task(document.task_id) if document.task_id else None
        task = new_document_task(
            document,
            previous,
            chunking,
            tenant=tenant,
            now_ms=int(time.time() * 1000),
            max_attempts=max_attempts,
        )
        done = await store.requeue(task, document.task_id, request_id)
        if done.status in ("created", "replayed") and done.task is not None:
            return done.task, done.status == "replayed"
        if done.status == "active":
            raise FailedPrecondition(
                "DOCUMENT_TASK_ACTIVE",
                f"document {document_id!r} is being ingested (task {document.task_id!r} is "
                f"{done.state}); re-index it once that task has finished, or cancel it",
                metadata={"document_id": document_id, "task_id": document.task_id},
            )
        if done.status == "document_missing":
            raise _document_not_found(knowledge_base_id, document_id)
        if done.status == "knowledge_base_missing":
            raise _knowledge_base_not_found(knowledge_base_id)
        # "moved" (another call queued a task meanwhile), or a replay whose task
        # expired: read again.
    raise Aborted(
        "CONCURRENT_MODIFICATION",
        f"document {document_id!r} kept changing while this request ran; retry",
        metadata={"document_id": document_id},
    )
