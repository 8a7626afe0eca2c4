"""Documents as the Knowledge Service shows them: the record an upload created,
with state and progress from the document's latest task."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DocumentError:
    code: str
    reason: str
    message: str


@dataclass(frozen=True)
class Document:
    id: str
    knowledge_base_id: str
    filename: str
    content_type: str
    size_bytes: int
    sha256: str
    object_key: str
    task_id: str
    # Task state names: PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED.
    state: str
    stage: str = ""
    progress: float = 0.0
    error: DocumentError | None = None
    chunk_count: int = 0
    page_count: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    create_time_ms: int = 0
    update_time_ms: int = 0


@dataclass(frozen=True)
class DocumentPage:
    documents: list[Document]
    next_page_token: str
