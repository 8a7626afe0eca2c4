"""Uploads: validate the header, stream bytes into storage, then queue the task.

The answer (task id) is given only once the object is complete and the task
record and queue entry are written; any failure before that aborts the object
so nothing is left behind (no task, no orphan object).
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import re
import time
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from services.common.errors import (
    DataLoss,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from services.common.ids import new_id
from services.common.settings import DEFAULT_TENANT
from services.task_manager.domain.model import Chunking, Task, TaskState
from services.task_manager.domain.ports import CreateOutcome, ObjectStore, Quotas, TaskStore

MAX_FILENAME_CHARS = 255
MAX_REQUEST_ID_CHARS = 128
MAX_METADATA_ENTRIES = 32
MAX_METADATA_KEY_CHARS = 63
MAX_METADATA_VALUE_CHARS = 1024
MAX_PRIORITY = 9
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_METADATA_KEY = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CHUNKING_STRATEGIES = {"", "SENTENCE", "MARKDOWN", "TOKEN"}


@dataclass(frozen=True)
class UploadLimits:
    """Limits an operator configures (TaskManagerSettings.uploads)."""

    max_upload_bytes: int = 2 * 1024**3
    max_uploads_in_flight: int = 512
    max_queue_depth: int = 100_000
    max_attempts: int = 5
    # Prefixes a callback URL must start with; empty allows none.
    callback_allow_list: tuple[str, ...] = ()
    # Hint given with RESOURCE_EXHAUSTED.
    retry_after_seconds: float = 1.0


@dataclass(frozen=True)
class UploadHeader:
    knowledge_base_id: str
    filename: str
    content_type: str = ""
    declared_size_bytes: int = 0
    sha256: str = ""
    request_id: str = ""
    chunking: Chunking = field(default_factory=Chunking)
    callback_url: str = ""
    priority: int = 0
    force: bool = False
    metadata: dict[str, str] = field(default_factory=dict)
    # The caller's tenant (from its credentials, not from the message).
    tenant: str = DEFAULT_TENANT


@dataclass(frozen=True)
class UploadResult:
    task: Task
    duplicate: bool
    replayed: bool
    # Milliseconds from the last byte received to the task being durable (the
    # part of the answer's latency the service owns); 0 when nothing was stored.
    ack_ms: float = 0.0
    # The first part of ack_ms: until the object was complete in S3 (the rest
    # is recording the task in Redis).
    stored_ms: float = 0.0


def _invalid(reason: str, message: str, **metadata: str) -> InvalidArgument:
    return InvalidArgument(reason, message, metadata=metadata)


def validate_filename(name: str) -> None:
    if not name:
        raise _invalid("MISSING_FILENAME", "the upload header needs a filename")
    if len(name) > MAX_FILENAME_CHARS:
        raise _invalid(
            "INVALID_FILENAME", f"filename is longer than {MAX_FILENAME_CHARS} characters"
        )
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise _invalid("INVALID_FILENAME", "filename contains control characters")
    if "/" in name or "\\" in name or name in (".", ".."):
        raise _invalid("INVALID_FILENAME", "filename must be a bare name without path components")
    if name != name.strip():
        raise _invalid("INVALID_FILENAME", "filename has leading or trailing spaces")


def validate_callback_url(url: str, allow_list: tuple[str, ...]) -> None:
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise _invalid("INVALID_CALLBACK_URL", "callback_url must be an http(s) URL")
    if parts.username or parts.password:
        raise _invalid("INVALID_CALLBACK_URL", "callback_url must not carry credentials")
    if not any(url.startswith(prefix) for prefix in allow_list):
        raise _invalid(
            "CALLBACK_URL_NOT_ALLOWED",
            "callback_url is not on the service's allow-list",
            callback_url=url,
        )


def validate_chunking(chunking: Chunking) -> None:
    """An upload's (or a re-index's) chunking override; raises INVALID_CHUNKING."""
    if chunking.strategy not in _CHUNKING_STRATEGIES:
        raise _invalid("INVALID_CHUNKING", f"unknown chunking strategy {chunking.strategy!r}")
    if chunking.chunk_size and not 32 <= chunking.chunk_size <= 8192:
        raise _invalid("INVALID_CHUNKING", "chunk_size must be 32-8192 tokens")
    if chunking.chunk_overlap < 0 or (
        chunking.chunk_size and chunking.chunk_overlap >= chunking.chunk_size
    ):
        raise _invalid("INVALID_CHUNKING", "chunk_overlap must be >= 0 and below chunk_size")


def validate_header(header: UploadHeader, limits: UploadLimits) -> None:
    """Checks every header field; raises InvalidArgument with a precise reason."""
    if not header.knowledge_base_id:
        raise _invalid("MISSING_KNOWLEDGE_BASE", "the upload header needs a knowledge_base_id")
    validate_filename(header.filename)
    if header.declared_size_bytes < 0:
        raise _invalid("INVALID_SIZE", "declared_size_bytes must not be negative")
    if header.sha256 and not _SHA256.match(header.sha256):
        raise _invalid("INVALID_SHA256", "sha256 must be 64 lower-case hex characters")
    if len(header.request_id) > MAX_REQUEST_ID_CHARS:
        raise _invalid(
            "INVALID_REQUEST_ID", f"request_id is longer than {MAX_REQUEST_ID_CHARS} characters"
        )
    if not 0 <= header.priority <= MAX_PRIORITY:
        raise _invalid("INVALID_PRIORITY", f"priority must be 0-{MAX_PRIORITY}")
    if len(header.content_type) > 255:
        raise _invalid("INVALID_CONTENT_TYPE", "content_type is longer than 255 characters")
    validate_chunking(header.chunking)
    if len(header.metadata) > MAX_METADATA_ENTRIES:
        raise _invalid("INVALID_METADATA", f"at most {MAX_METADATA_ENTRIES} metadata entries")
    for key, value in header.metadata.items():
        if not _METADATA_KEY.match(key) or len(key) > MAX_METADATA_KEY_CHARS:
            raise _invalid(
                "INVALID_METADATA",
                f"metadata keys are 1-{MAX_METADATA_KEY_CHARS} of A-Z a-z 0-9 _ . -",
                key=key[:64],
            )
        if len(value) > MAX_METADATA_VALUE_CHARS:
            raise _invalid(
                "INVALID_METADATA",
                f"metadata values are at most {MAX_METADATA_VALUE_CHARS} characters",
                key=key,
            )
    validate_callback_url(header.callback_url, limits.callback_allow_list)


def too_large(limit: int) -> ResourceExhausted:
    return ResourceExhausted(
        "UPLOAD_TOO_LARGE",
        f"the upload exceeds the limit of {limit} bytes",
        metadata={"limit_bytes": str(limit)},
    )


# Types that say nothing about a file: generic binary, and what curl and HTML
# forms send by default for a raw body. The file name decides instead.
_UNINFORMATIVE_TYPES = {"", "application/octet-stream", "application/x-www-form-urlencoded"}


def guess_content_type(header: UploadHeader) -> str:
    declared = header.content_type.split(";")[0].strip().lower()
    if declared not in _UNINFORMATIVE_TYPES:
        return declared
    guessed, _ = mimetypes.guess_type(header.filename, strict=False)
    return guessed or "application/octet-stream"


def object_prefix(tenant: str, knowledge_base_id: str) -> str:
    """Where a knowledge base's uploaded objects live: under the tenant's own
    prefix, so a key or listing built for one tenant never reaches another's."""
    return f"kb/{tenant}/{knowledge_base_id}/"


async def _at_most(chunks: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    """`chunks`, failing once more than `limit` bytes came (the tenant's quota)."""
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ResourceExhausted(
                "TENANT_STORAGE_QUOTA_EXCEEDED",
                "this upload would exceed the tenant's storage quota",
            )
        yield chunk


def now_ms() -> int:
    return int(time.time() * 1000)


class Uploads:
    """Runs uploads against a TaskStore and an ObjectStore, under admission control."""

    def __init__(
        self,
        tasks: TaskStore,
        objects: ObjectStore,
        limits: UploadLimits,
        quotas: Quotas | None = None,
    ) -> None:
        self._tasks = tasks
        self._objects = objects
        self._limits = limits
        self._quotas = quotas
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _busy(self, reason: str, message: str) -> ResourceExhausted:
        return ResourceExhausted(reason, message, retry_after=self._limits.retry_after_seconds)

    async def upload(self, header: UploadHeader, chunks: AsyncIterator[bytes]) -> UploadResult:
        validate_header(header, self._limits)
        if self._in_flight >= self._limits.max_uploads_in_flight:
            raise self._busy(
                "TOO_MANY_UPLOADS",
                f"{self._in_flight} uploads are in flight on this replica; retry shortly",
            )
        self._in_flight += 1
        try:
            return await self._upload(header, chunks)
        finally:
            self._in_flight -= 1

    async def _upload(self, header: UploadHeader, chunks: AsyncIterator[bytes]) -> UploadResult:
        kb = header.knowledge_base_id
        # Another tenant's knowledge base is one that does not exist.
        if await self._tasks.knowledge_base_tenant(kb) != header.tenant:
            raise NotFound(
                "KNOWLEDGE_BASE_NOT_FOUND",
                f"knowledge base {kb!r} does not exist",
                metadata={"knowledge_base_id": kb},
            )
        if header.request_id:
            earlier = await self._tasks.task_for_request(kb, header.request_id)
            if earlier is not None:
                return UploadResult(earlier, duplicate=False, replayed=True)
        if header.sha256 and not header.force:
            same = await self._tasks.task_for_content(kb, header.sha256)
            if same is not None:
                return UploadResult(same, duplicate=True, replayed=False)
        limit = self._limits.max_upload_bytes
        if header.declared_size_bytes > limit:
            raise too_large(limit)
        if await self._tasks.queue_depth() >= self._limits.max_queue_depth:
            raise self._busy("QUEUE_FULL", "the task queue is full; retry later")
        if self._quotas is not None:
            left = await self._quotas.admit(header.tenant, header.declared_size_bytes)
            if left is not None:
                chunks = _at_most(chunks, left)

        content_type = guess_content_type(header)
        # Under the tenant's prefix: a key built for one tenant never names
        # another's object.
        object_key = f"{object_prefix(header.tenant, kb)}objects/{new_id()}"
        size, sha256, last_byte = await self._store(header, object_key, content_type, chunks)
        stored = time.perf_counter()
        created = now_ms()
        task = Task(
            id=new_id(created),
            knowledge_base_id=kb,
            document_id=new_id(created),
            filename=header.filename,
            content_type=content_type,
            size_bytes=size,
            sha256=sha256,
            object_key=object_key,
            state=TaskState.PENDING,
            create_time_ms=created,
            update_time_ms=created,
            max_attempts=self._limits.max_attempts,
            priority=header.priority,
            callback_url=header.callback_url,
            chunking=header.chunking,
            metadata=dict(header.metadata),
            tenant=header.tenant,
        )
        try:
            outcome: CreateOutcome = await self._tasks.create_ingestion(
                task, header.request_id, header.force
            )
        except BaseException:
            await asyncio.shield(self._objects.delete(object_key))
            raise
        if not outcome.created:
            await self._objects.delete(object_key)
        return UploadResult(
            outcome.task,
            duplicate=outcome.duplicate,
            replayed=outcome.replayed,
            ack_ms=(time.perf_counter() - last_byte) * 1000,
            stored_ms=(stored - last_byte) * 1000,
        )

    async def _store(
        self, header: UploadHeader, key: str, content_type: str, chunks: AsyncIterator[bytes]
    ) -> tuple[int, str, float]:
        """Streams the bytes into a new object; returns (size, sha256, the
        perf_counter time the last byte arrived)."""
        limit = self._limits.max_upload_bytes
        declared = header.declared_size_bytes
        writer = await self._objects.open_writer(key, content_type, declared)
        try:
            digest = hashlib.sha256()
            size = 0
            async for chunk in chunks:
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                if declared and size > declared:
                    raise _invalid(
                        "SIZE_MISMATCH",
                        f"received more than the declared {declared} bytes",
                        declared_size_bytes=str(declared),
                    )
                digest.update(chunk)
                await writer.write(chunk)
            last_byte = time.perf_counter()
            if size == 0:
                raise _invalid("EMPTY_FILE", "the uploaded file is empty")
            if declared and size != declared:
                raise _invalid(
                    "SIZE_MISMATCH",
                    f"received {size} bytes but {declared} were declared",
                    declared_size_bytes=str(declared),
                    received_bytes=str(size),
                )
            sha256 = digest.hexdigest()
            if header.sha256 and sha256 != header.sha256:
                raise DataLoss(
                    "CHECKSUM_MISMATCH",
                    "the received bytes do not match the declared sha256",
                    metadata={"declared_sha256": header.sha256, "received_sha256": sha256},
                )
            await writer.complete(sha256)
        except BaseException:
            # Client gone, limit crossed, storage failed: nothing may remain.
            await asyncio.shield(writer.abort())
            raise
        return size, sha256, last_byte
