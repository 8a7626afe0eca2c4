"""Why a document cannot be ingested (docs/errors.md, "Ingestion").

A `DocumentRejected` is about the document itself: another attempt would fail
the same way, so the task fails without a retry. Transient trouble (S3, a
remote embedding endpoint) is raised as `IngestUnavailable` and retried.
"""

from __future__ import annotations

# reason -> google.rpc.Code name recorded on the task error.
REASON_CODES: dict[str, str] = {
    "UNSUPPORTED_TYPE": "INVALID_ARGUMENT",
    "DOCUMENT_EMPTY": "INVALID_ARGUMENT",
    "DOCUMENT_CORRUPT": "INVALID_ARGUMENT",
    "DOCUMENT_ENCRYPTED": "FAILED_PRECONDITION",
    "NO_EXTRACTABLE_TEXT": "FAILED_PRECONDITION",
    "DOCUMENT_TOO_LARGE": "RESOURCE_EXHAUSTED",
    "OBJECT_NOT_FOUND": "NOT_FOUND",
    "KNOWLEDGE_BASE_NOT_FOUND": "NOT_FOUND",
    "EMBEDDING_NOT_CONFIGURED": "FAILED_PRECONDITION",
    "EMBEDDING_REJECTED": "FAILED_PRECONDITION",
    "EMBEDDING_DIMENSIONS_MISMATCH": "FAILED_PRECONDITION",
    "DOCUMENT_DELETED": "NOT_FOUND",
    "TASK_SUPERSEDED": "FAILED_PRECONDITION",
}


class DocumentRejected(Exception):
    """Not retryable: the document (or its knowledge base) cannot be ingested."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def code(self) -> str:
        return REASON_CODES.get(self.reason, "FAILED_PRECONDITION")


class IngestUnavailable(Exception):
    """Retryable: a dependency (S3, the embedding endpoint) failed for now."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class Stopped(Exception):
    """Raised inside a worker thread when the job was cancelled (ends the work early)."""
