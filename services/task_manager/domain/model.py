"""Tasks, their states and the records an upload creates."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from services.common.settings import DEFAULT_TENANT


class TaskState(StrEnum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def terminal(self) -> bool:
        return self in (TaskState.SUCCEEDED, TaskState.FAILED, TaskState.CANCELLED)


class Stage(StrEnum):
    """Pipeline stage of a running task; NONE when not running."""

    NONE = ""
    DOWNLOADING = "DOWNLOADING"
    PARSING = "PARSING"
    CHUNKING = "CHUNKING"
    EMBEDDING = "EMBEDDING"
    INDEXING = "INDEXING"


class EventType(StrEnum):
    SNAPSHOT = "SNAPSHOT"
    STATE_CHANGED = "STATE_CHANGED"
    PROGRESS = "PROGRESS"
    CALLBACK = "CALLBACK"
    ERROR = "ERROR"


@dataclass(frozen=True)
class TaskError:
    code: str
    reason: str
    message: str
    retryable: bool = False


@dataclass(frozen=True)
class TaskResult:
    chunk_count: int = 0
    page_count: int = 0
    token_count: int = 0
    duration_ms: int = 0


@dataclass(frozen=True)
class CallbackAttempt:
    time_ms: int
    http_status: int
    error: str
    delivered: bool


@dataclass(frozen=True)
class Chunking:
    """Per-upload chunking override; zero/empty fields mean the knowledge base's."""

    strategy: str = ""
    chunk_size: int = 0
    chunk_overlap: int = 0


@dataclass(frozen=True)
class Task:
    id: str
    knowledge_base_id: str
    document_id: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    object_key: str
    state: TaskState
    create_time_ms: int
    update_time_ms: int
    stage: Stage = Stage.NONE
    progress: float = 0.0
    message: str = ""
    attempt: int = 1
    max_attempts: int = 5
    priority: int = 0
    error: TaskError | None = None
    worker_id: str = ""
    cancel_requested: bool = False
    result: TaskResult | None = None
    callback_url: str = ""
    callback_attempts: tuple[CallbackAttempt, ...] = ()
    chunking: Chunking = field(default_factory=Chunking)
    metadata: dict[str, str] = field(default_factory=dict)
    start_time_ms: int = 0
    end_time_ms: int = 0
    next_attempt_time_ms: int = 0
    # The lease of the worker holding the task while RUNNING (fencing token), and
    # when it lapses unless renewed (ms since the epoch); "" / 0 otherwise.
    lease_id: str = ""
    lease_deadline_ms: int = 0
    # The tenant owning the task (the owner of its knowledge base).
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class TaskEvent:
    """One entry of a task's event log; `id` increases within the task."""

    id: str
    type: EventType
    task: Task
    time_ms: int


@dataclass(frozen=True)
class TaskPage:
    tasks: list[Task]
    next_page_token: str
