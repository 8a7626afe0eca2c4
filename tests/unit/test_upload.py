"""Upload rules (domain), with in-memory stores: nothing is kept on failure."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from services.common.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted
from services.common.settings import DEFAULT_TENANT
from services.task_manager.domain.model import Chunking, Task, TaskEvent, TaskPage, TaskState
from services.task_manager.domain.ports import CreateOutcome
from services.task_manager.domain.upload import UploadHeader, UploadLimits, Uploads

KB = "kb-1"


class MemoryWriter:
    def __init__(self, store: MemoryObjects, key: str) -> None:
        self.store, self.key, self.data, self.aborted = store, key, bytearray(), False
        self.declared_size = 0

    async def write(self, data: bytes) -> None:
        self.data += data

    async def complete(self, sha256: str) -> None:
        self.store.objects[self.key] = bytes(self.data)

    async def abort(self) -> None:
        self.aborted = True


class MemoryObjects:
    bucket = "test"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.writers: list[MemoryWriter] = []

    async def open_writer(self, key: str, content_type: str, size: int = 0) -> MemoryWriter:
        writer = MemoryWriter(self, key)
        writer.declared_size = size
        self.writers.append(writer)
        return writer

    async def delete(self, key: str) -> None:
        self.objects.pop(key, None)


class MemoryTasks:
    def __init__(self) -> None:
        self.kbs = {KB}
        self.tasks: dict[str, Task] = {}
        self.requests: dict[tuple[str, str], str] = {}
        self.content: dict[tuple[str, str], str] = {}
        self.depth = 0
        self.fail_create: BaseException | None = None

    async def knowledge_base_tenant(self, knowledge_base_id: str) -> str | None:
        return DEFAULT_TENANT if knowledge_base_id in self.kbs else None

    async def task_for_request(self, knowledge_base_id: str, request_id: str) -> Task | None:
        task_id = self.requests.get((knowledge_base_id, request_id))
        return self.tasks[task_id] if task_id else None

    async def task_for_content(self, knowledge_base_id: str, sha256: str) -> Task | None:
        task_id = self.content.get((knowledge_base_id, sha256))
        return self.tasks[task_id] if task_id else None

    async def queue_depth(self) -> int:
        return self.depth

    async def create_ingestion(self, task: Task, request_id: str, force: bool) -> CreateOutcome:
        if self.fail_create is not None:
            raise self.fail_create
        kb = task.knowledge_base_id
        if request_id and (kb, request_id) in self.requests:
            return CreateOutcome(self.tasks[self.requests[kb, request_id]], False, replayed=True)
        if not force and (kb, task.sha256) in self.content:
            return CreateOutcome(self.tasks[self.content[kb, task.sha256]], False, duplicate=True)
        self.tasks[task.id] = task
        self.content[kb, task.sha256] = task.id
        if request_id:
            self.requests[kb, request_id] = task.id
        self.depth += 1
        return CreateOutcome(task, True)

    async def get_task(self, task_id: str) -> Task | None:
        return self.tasks.get(task_id)

    async def list_tasks(
        self,
        knowledge_base_id: str,
        state: TaskState | None,
        page_size: int,
        page_token: str,
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> TaskPage:
        raise NotImplementedError

    async def cancel(self, task_id: str, reason: str) -> Task:
        raise NotImplementedError

    async def retry(self, task_id: str, request_id: str) -> Task:
        raise NotImplementedError

    def watch(self, task_id: str, after_event_id: str) -> AsyncIterator[TaskEvent]:
        raise NotImplementedError


@pytest.fixture
def objects() -> MemoryObjects:
    return MemoryObjects()


@pytest.fixture
def tasks() -> MemoryTasks:
    return MemoryTasks()


def uploads(
    tasks: MemoryTasks, objects: MemoryObjects, **limits: int | float | tuple[str, ...]
) -> Uploads:
    return Uploads(tasks, objects, UploadLimits(**limits))  # type: ignore[arg-type]


async def stream(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def header(**fields: object) -> UploadHeader:
    base = UploadHeader(knowledge_base_id=KB, filename="notes.txt")
    return replace(base, **fields)  # type: ignore[arg-type]


def assert_nothing_kept(objects: MemoryObjects, tasks: MemoryTasks) -> None:
    assert objects.objects == {}
    assert tasks.tasks == {}
    assert all(w.aborted for w in objects.writers)


async def test_upload_stores_bytes_then_queues_a_pending_task(
    tasks: MemoryTasks, objects: MemoryObjects
) -> None:
    result = await uploads(tasks, objects).upload(header(), stream(b"hello ", b"world"))
    task = result.task
    assert task.state is TaskState.PENDING
    assert task.size_bytes == 11
    assert task.sha256 == hashlib.sha256(b"hello world").hexdigest()
    assert task.content_type == "text/plain"
    assert objects.objects == {task.object_key: b"hello world"}
    assert "notes" not in task.object_key, "keys are generated, never the filename"
    assert task.object_key.startswith(f"kb/{DEFAULT_TENANT}/{KB}/objects/")
    assert tasks.tasks == {task.id: task}
    assert (result.duplicate, result.replayed) == (False, False)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"knowledge_base_id": ""}, "MISSING_KNOWLEDGE_BASE"),
        ({"filename": ""}, "MISSING_FILENAME"),
        ({"filename": "../etc/passwd"}, "INVALID_FILENAME"),
        ({"filename": "a/b.txt"}, "INVALID_FILENAME"),
        ({"filename": "a\\b.txt"}, "INVALID_FILENAME"),
        ({"filename": "bad\x00name"}, "INVALID_FILENAME"),
        ({"filename": "line\nbreak.txt"}, "INVALID_FILENAME"),
        ({"filename": ".."}, "INVALID_FILENAME"),
        ({"filename": "x" * 256}, "INVALID_FILENAME"),
        ({"sha256": "abc"}, "INVALID_SHA256"),
        ({"declared_size_bytes": -1}, "INVALID_SIZE"),
        ({"priority": 10}, "INVALID_PRIORITY"),
        ({"request_id": "r" * 129}, "INVALID_REQUEST_ID"),
        ({"chunking": Chunking(strategy="BOGUS")}, "INVALID_CHUNKING"),
        ({"chunking": Chunking(chunk_size=16)}, "INVALID_CHUNKING"),
        ({"chunking": Chunking(chunk_size=100, chunk_overlap=100)}, "INVALID_CHUNKING"),
        ({"metadata": {"bad key": "v"}}, "INVALID_METADATA"),
        ({"metadata": {f"k{i}": "v" for i in range(33)}}, "INVALID_METADATA"),
        ({"callback_url": "ftp://x/"}, "INVALID_CALLBACK_URL"),
        ({"callback_url": "http://169.254.169.254/latest"}, "CALLBACK_URL_NOT_ALLOWED"),
    ],
)
async def test_bad_header_is_refused_before_anything_is_stored(
    tasks: MemoryTasks, objects: MemoryObjects, fields: dict[str, object], reason: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await uploads(tasks, objects).upload(header(**fields), stream(b"x"))
    assert caught.value.reason == reason
    assert objects.writers == []


async def test_allowed_callback_url(tasks: MemoryTasks, objects: MemoryObjects) -> None:
    up = uploads(tasks, objects, callback_allow_list=("http://127.0.0.1:9999/hooks/",))
    result = await up.upload(header(callback_url="http://127.0.0.1:9999/hooks/a"), stream(b"x"))
    assert result.task.callback_url == "http://127.0.0.1:9999/hooks/a"


async def test_unknown_knowledge_base_is_not_found_before_any_byte(
    tasks: MemoryTasks, objects: MemoryObjects
) -> None:
    with pytest.raises(NotFound) as caught:
        await uploads(tasks, objects).upload(header(knowledge_base_id="nope"), stream(b"x"))
    assert caught.value.reason == "KNOWLEDGE_BASE_NOT_FOUND"
    assert objects.writers == []


async def test_empty_file(tasks: MemoryTasks, objects: MemoryObjects) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await uploads(tasks, objects).upload(header(), stream())
    assert caught.value.reason == "EMPTY_FILE"
    assert_nothing_kept(objects, tasks)


@pytest.mark.parametrize("declared", [5, 20])
async def test_size_mismatch_keeps_nothing(
    tasks: MemoryTasks, objects: MemoryObjects, declared: int
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await uploads(tasks, objects).upload(
            header(declared_size_bytes=declared), stream(b"0123456789")
        )
    assert caught.value.reason == "SIZE_MISMATCH"
    assert_nothing_kept(objects, tasks)
    # The store was told the declared size (it may stream on that basis) and
    # never given more bytes than that.
    assert objects.writers[0].declared_size == declared
    assert len(objects.writers[0].data) <= declared
    assert objects.writers[0].aborted


async def test_checksum_mismatch_is_data_loss(tasks: MemoryTasks, objects: MemoryObjects) -> None:
    with pytest.raises(DataLoss) as caught:
        await uploads(tasks, objects).upload(header(sha256="0" * 64), stream(b"data"))
    assert caught.value.reason == "CHECKSUM_MISMATCH"
    assert_nothing_kept(objects, tasks)


async def test_size_limit_stops_reading_as_soon_as_crossed(
    tasks: MemoryTasks, objects: MemoryObjects
) -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 1
            yield b"x" * 100

    with pytest.raises(ResourceExhausted) as caught:
        await uploads(tasks, objects, max_upload_bytes=1000).upload(header(), endless())
    assert caught.value.reason == "UPLOAD_TOO_LARGE"
    assert sent == 11
    assert_nothing_kept(objects, tasks)


async def test_declared_size_over_limit_is_refused_up_front(
    tasks: MemoryTasks, objects: MemoryObjects
) -> None:
    with pytest.raises(ResourceExhausted):
        await uploads(tasks, objects, max_upload_bytes=10).upload(
            header(declared_size_bytes=11), stream(b"x")
        )
    assert objects.writers == []


async def test_same_request_id_replays_the_first_task(
    tasks: MemoryTasks, objects: MemoryObjects
) -> None:
    up = uploads(tasks, objects)
    first = await up.upload(header(request_id="r1"), stream(b"a"))
    again = await up.upload(header(request_id="r1"), stream(b"other bytes"))
    assert again.replayed
    assert again.task.id == first.task.id
    assert len(objects.objects) == 1
    assert len(objects.writers) == 1


async def test_same_bytes_are_recognised_unless_forced(
    tasks: MemoryTasks, objects: MemoryObjects
) -> None:
    up = uploads(tasks, objects)
    first = await up.upload(header(), stream(b"same"))
    dup = await up.upload(header(filename="copy.txt"), stream(b"same"))
    assert dup.duplicate
    assert dup.task.document_id == first.task.document_id
    assert len(objects.objects) == 1, "the second copy was removed"
    declared = await up.upload(header(sha256=hashlib.sha256(b"same").hexdigest()), stream(b"same"))
    assert declared.duplicate
    assert len(objects.writers) == 2, "a declared duplicate stores nothing"
    forced = await up.upload(header(force=True), stream(b"same"))
    assert not forced.duplicate
    assert forced.task.document_id != first.task.document_id
    assert len(objects.objects) == 2


async def test_too_many_uploads_in_flight(tasks: MemoryTasks, objects: MemoryObjects) -> None:
    up = uploads(tasks, objects, max_uploads_in_flight=1, retry_after_seconds=2.0)
    release = asyncio.Event()

    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        started.set()
        yield b"a"
        await release.wait()

    first = asyncio.create_task(up.upload(header(), slow()))
    await started.wait()
    with pytest.raises(ResourceExhausted) as caught:
        await up.upload(header(), stream(b"b"))
    assert caught.value.reason == "TOO_MANY_UPLOADS"
    assert caught.value.retry_after == 2.0
    release.set()
    await first
    assert up.in_flight == 0
    await up.upload(header(), stream(b"c"))


async def test_queue_full(tasks: MemoryTasks, objects: MemoryObjects) -> None:
    tasks.depth = 10
    with pytest.raises(ResourceExhausted) as caught:
        await uploads(tasks, objects, max_queue_depth=10).upload(header(), stream(b"x"))
    assert caught.value.reason == "QUEUE_FULL"
    assert caught.value.retry_after is not None


async def test_client_gone_mid_stream_aborts_the_object(
    tasks: MemoryTasks, objects: MemoryObjects
) -> None:
    async def cut() -> AsyncIterator[bytes]:
        yield b"partial"
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await uploads(tasks, objects).upload(header(), cut())
    assert_nothing_kept(objects, tasks)


async def test_task_store_failure_removes_the_stored_object(
    tasks: MemoryTasks, objects: MemoryObjects
) -> None:
    tasks.fail_create = ConnectionError("redis gone")
    with pytest.raises(ConnectionError):
        await uploads(tasks, objects).upload(header(), stream(b"x"))
    assert objects.objects == {}
    assert tasks.tasks == {}


@pytest.mark.parametrize(
    ("declared", "filename", "expected"),
    [
        ("", "a.pdf", "application/pdf"),
        ("application/octet-stream", "a.md", "text/markdown"),
        ("application/x-www-form-urlencoded", "notes.txt", "text/plain"),
        ("Text/HTML; charset=utf-8", "x.bin", "text/html"),
        ("", "no-extension", "application/octet-stream"),
    ],
)
async def test_content_type_from_declaration_or_name(
    tasks: MemoryTasks, objects: MemoryObjects, declared: str, filename: str, expected: str
) -> None:
    result = await uploads(tasks, objects).upload(
        header(content_type=declared, filename=filename), stream(b"x")
    )
    assert result.task.content_type == expected
