"""What the Task Manager's domain needs from the outside world.

`RedisTaskStore` and `S3ObjectStore` (adapters/) implement these against the
real servers; unit tests use in-memory fakes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from services.common.settings import DEFAULT_TENANT
from services.task_manager.domain.model import Task, TaskEvent, TaskPage, TaskState


class ObjectWriter(Protocol):
    """One object being written as a stream of parts (S3 multipart upload)."""

    async def write(self, data: bytes) -> None:
        """Appends bytes; may wait while earlier parts upload (backpressure)."""

    async def complete(self, sha256: str) -> None:
        """Makes the object durable and visible under its key. `sha256` is the
        hex digest of everything written (the store may have it verified)."""

    async def abort(self) -> None:
        """Discards everything written; safe to call more than once."""


class ObjectStore(Protocol):
    @property
    def bucket(self) -> str: ...

    async def open_writer(self, key: str, content_type: str, size: int = 0) -> ObjectWriter:
        """Starts a new object at `key` (bounded memory whatever its size).
        `size` is the declared size, 0 if unknown: with it a store may start
        sending before the last byte (the writer still fails if fewer come)."""

    async def delete(self, key: str) -> None:
        """Removes an object; no error if it does not exist."""


@dataclass(frozen=True)
class CreateOutcome:
    """What `TaskStore.create_ingestion` did.

    `created` False means nothing new was written and `task` is an existing
    one: the same `request_id` was used before (`replayed`), or the same bytes
    are already a document of the knowledge base (`duplicate`).
    """

    task: Task
    created: bool
    replayed: bool = False
    duplicate: bool = False


class Quotas(Protocol):
    """Per-tenant quotas (adapters/redis_quotas.py)."""

    async def admit(self, tenant: str, declared_bytes: int) -> int | None:
        """Counts an upload; the bytes the tenant may still store (None: no
        limit). Raises ResourceExhausted when a quota is used up. (Usage grows
        in the same step that creates the task: TaskStore.create_ingestion.)"""


class TaskStore(Protocol):
    async def knowledge_base_tenant(self, knowledge_base_id: str) -> str | None:
        """The tenant owning the knowledge base; None when it does not exist."""

    async def task_for_request(self, knowledge_base_id: str, request_id: str) -> Task | None:
        """The task an earlier upload with this idempotency key created."""

    async def task_for_content(self, knowledge_base_id: str, sha256: str) -> Task | None:
        """The latest task of the document holding these bytes, if any."""

    async def queue_depth(self) -> int:
        """Tasks waiting to be dispatched (ready or backing off)."""

    async def create_ingestion(self, task: Task, request_id: str, force: bool) -> CreateOutcome:
        """Atomically: the document, the task, its queue entry, its first event,
        the idempotency key and the content-hash entry. If a concurrent upload
        took the same `request_id` (or, without `force`, the same bytes) first,
        writes nothing and answers that upload's task instead."""

    async def get_task(self, task_id: str) -> Task | None: ...

    async def list_tasks(
        self,
        knowledge_base_id: str,
        state: TaskState | None,
        page_size: int,
        page_token: str,
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> TaskPage:
        """The tenant's tasks, newest first. Raises InvalidArgument(INVALID_PAGE_TOKEN)
        on a foreign token."""

    async def cancel(self, task_id: str, reason: str) -> Task:
        """PENDING → CANCELLED at once; RUNNING → cancel_requested. Raises
        NotFound(TASK_NOT_FOUND) or FailedPrecondition(TASK_ALREADY_FINISHED)."""

    async def retry(self, task_id: str, request_id: str) -> Task:
        """FAILED/CANCELLED → PENDING with a fresh attempt budget. Raises
        NotFound or FailedPrecondition(TASK_NOT_RETRYABLE)."""

    def watch(self, task_id: str, after_event_id: str) -> AsyncIterator[TaskEvent]:
        """A snapshot (when `after_event_id` is empty) then every later event,
        ending after a terminal state. Raises NotFound(TASK_NOT_FOUND)."""
        ...
