"""RedisTaskStore against a real Redis server: records, queue, indexes, transitions, events."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from devstack import servers
from services.common import redis_keys, redis_pages
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.ids import new_id
from services.common.settings import DEFAULT_TENANT
from services.knowledge.adapters import redis_documents
from services.knowledge.adapters.redis_documents import RedisDocuments
from services.task_manager.adapters import redis_store
from services.task_manager.adapters.redis_dispatch import RedisDispatchQueue
from services.task_manager.adapters.redis_store import (
    RedisTaskStore,
    decode_event,
    decode_task,
    encode_task,
    queue_score,
)
from services.task_manager.domain.model import (
    CallbackAttempt,
    Chunking,
    EventType,
    Stage,
    Task,
    TaskError,
    TaskEvent,
    TaskResult,
    TaskState,
)
from services.task_manager.domain.ports import TaskStore
from tests.conftest import RedisFactory

T = TypeVar("T")

pytestmark = pytest.mark.integration

KB = "kb-one"
OTHER_KB = "kb-two"
BASE_MS = 1_700_000_000_000


# --- a private Redis for this module: tests flush it, so it is not the session's ---


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = tmp_path_factory.mktemp("redis-store")
    with servers.start_redis(
        port=servers.find_free_port(), data_dir=base / "data", log_path=base / "redis.log"
    ) as server:
        yield server.url


# --- per-test clients and data ---


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    connection = Redis.from_url(redis_url, decode_responses=False)
    await connection.flushdb()
    await connection.hset(redis_keys.knowledge_base(KB), mapping={"id": KB})
    await connection.hset(redis_keys.knowledge_base(OTHER_KB), mapping={"id": OTHER_KB})
    yield connection
    await connection.aclose()


@pytest.fixture
async def other_client(redis_url: str) -> AsyncIterator[Redis]:
    """A second connection, as another Task Manager replica would have."""
    connection = Redis.from_url(redis_url, decode_responses=False)
    yield connection
    await connection.aclose()


@pytest.fixture
def store(client: Redis) -> RedisTaskStore:
    checked: TaskStore = RedisTaskStore(client, watch_block_ms=200)  # satisfies the port
    assert isinstance(checked, RedisTaskStore)
    return checked


def new_task(
    kb: str = KB, *, created: int | None = None, priority: int = 0, sha256: str = ""
) -> Task:
    created = int(time.time() * 1000) if created is None else created
    return Task(
        id=new_id(created),
        knowledge_base_id=kb,
        document_id=new_id(created),
        filename="report 📄.pdf",
        content_type="application/pdf",
        size_bytes=1234,
        sha256=sha256 or secrets.token_hex(32),
        object_key=f"kb/{kb}/objects/{new_id(created)}",
        state=TaskState.PENDING,
        create_time_ms=created,
        update_time_ms=created,
        priority=priority,
        metadata={"team": "ünïcode ✓", "quote": '"x"'},
        chunking=Chunking(strategy="SENTENCE", chunk_size=512, chunk_overlap=64),
    )


async def created(store: RedisTaskStore, task: Task, request_id: str = "") -> Task:
    outcome = await store.create_ingestion(task, request_id, force=False)
    assert outcome.created
    return outcome.task


async def start(store: RedisTaskStore, task: Task, worker: str = "worker-1") -> Task:
    """What the dispatcher will do when a worker takes the task."""
    done = await store.transition(
        task,
        EventType.STATE_CHANGED,
        {"state": TaskState.RUNNING, "worker_id": worker, "start_time_ms": task.update_time_ms},
        zrem=(redis_keys.QUEUE_READY,),
    )
    assert done.status == "ok"
    return done.task


async def finish(store: RedisTaskStore, task: Task, state: TaskState) -> Task:
    """What the dispatcher will do when the worker reports the end."""
    error = TaskError("INVALID_ARGUMENT", "DOCUMENT_ENCRYPTED", "the PDF is encrypted")
    done = await store.transition(
        task,
        EventType.STATE_CHANGED,
        {
            "state": state,
            "end_time_ms": task.update_time_ms,
            "error": error if state is TaskState.FAILED else None,
        },
        guard=("worker_id",),
    )
    assert done.status == "ok"
    return done.task


def text(value: object) -> str:
    assert isinstance(value, bytes)
    return value.decode()


async def members(client: Redis, key: str) -> list[str]:
    return [text(m) for m in await client.zrange(key, 0, -1)]


async def events(client: Redis, task_id: str) -> list[TaskEvent]:
    """The task's event log as stored, read directly."""
    log = []
    for entry_id, fields in await client.xrange(redis_keys.task_events(task_id)) or []:
        assert entry_id is not None
        assert fields is not None
        log.append(decode_event(entry_id, fields))
    return log


# --- encoding ---


def test_encode_decode_round_trip_keeps_every_attribute() -> None:
    task = dataclasses.replace(
        new_task(),
        state=TaskState.FAILED,
        stage=Stage.EMBEDDING,
        progress=0.37,
        message="page 3 of 12",
        attempt=3,
        max_attempts=7,
        priority=9,
        error=TaskError("UNAVAILABLE", "EMBEDDER_DOWN", "no answer", retryable=True),
        worker_id="w-7",
        cancel_requested=True,
        result=TaskResult(chunk_count=5, page_count=2, token_count=900, duration_ms=1500),
        callback_url="https://hooks.example/kb",
        callback_attempts=(
            CallbackAttempt(time_ms=BASE_MS, http_status=503, error="", delivered=False),
            CallbackAttempt(time_ms=BASE_MS + 1, http_status=200, error="", delivered=True),
        ),
        start_time_ms=BASE_MS + 10,
        end_time_ms=BASE_MS + 20,
        next_attempt_time_ms=BASE_MS + 30,
    )
    fields = encode_task(task)
    assert all(isinstance(v, str) for v in fields.values())
    assert decode_task(fields) == task
    as_read = {k.encode(): v.encode() for k, v in fields.items()}
    assert decode_task(as_read) == task
    plain = new_task()
    assert decode_task(encode_task(plain)) == plain


def test_queue_score_orders_priority_before_age() -> None:
    assert queue_score(9, BASE_MS + 10_000) < queue_score(8, BASE_MS)
    assert queue_score(5, BASE_MS) < queue_score(5, BASE_MS + 1)
    assert queue_score(0, 2**44) < 2**53  # exact as a double for centuries


# --- uploads ---


async def test_create_then_get_round_trip(store: RedisTaskStore, client: Redis) -> None:
    task = new_task(priority=3)
    outcome = await store.create_ingestion(task, "req-1", force=False)
    assert outcome.created
    assert not outcome.replayed
    assert not outcome.duplicate
    assert await store.get_task(task.id) == task
    assert await store.get_task(new_id()) is None

    document = await client.hgetall(redis_keys.document(task.document_id))
    assert document[b"task_id"] == task.id.encode()
    assert document[b"sha256"] == task.sha256.encode()
    assert text(document[b"filename"]) == "report 📄.pdf"
    assert await members(client, redis_keys.kb_documents(KB)) == [task.document_id]
    assert await client.get(redis_keys.kb_content(KB, task.sha256)) == task.document_id.encode()
    for key in (
        redis_keys.tenant_tasks(DEFAULT_TENANT),
        redis_keys.kb_tasks(KB),
        redis_keys.tasks_in_state(DEFAULT_TENANT, "PENDING"),
        redis_keys.kb_tasks_in_state(KB, "PENDING"),
    ):
        assert await client.zscore(key, task.id) == task.create_time_ms
    assert await client.zscore(redis_keys.QUEUE_READY, task.id) == queue_score(
        3, task.create_time_ms
    )
    assert 0 < await client.ttl(redis_keys.kb_request(KB, "req-1")) <= 86400
    assert await store.queue_depth() == 1
    [first] = await events(client, task.id)
    assert first.type is EventType.STATE_CHANGED
    assert first.task == task


async def test_same_request_id_answers_the_first_task_and_writes_nothing(
    store: RedisTaskStore, client: Redis
) -> None:
    first = await created(store, new_task(), request_id="req-1")
    keys_before = sorted(await client.keys("*"))

    again = await store.create_ingestion(new_task(), "req-1", force=True)

    assert again.replayed
    assert not again.created
    assert again.task == first
    assert sorted(await client.keys("*")) == keys_before
    assert await store.queue_depth() == 1
    assert await store.task_for_request(KB, "req-1") == first
    assert await store.task_for_request(KB, "req-2") is None
    # The key is per knowledge base.
    assert (await store.create_ingestion(new_task(OTHER_KB), "req-1", force=False)).created


async def test_same_bytes_are_a_duplicate_unless_forced(
    store: RedisTaskStore, client: Redis
) -> None:
    sha = secrets.token_hex(32)
    first = await created(store, new_task(sha256=sha))
    keys_before = sorted(await client.keys("*"))

    duplicate = await store.create_ingestion(new_task(sha256=sha), "", force=False)
    assert duplicate.duplicate
    assert not duplicate.created
    assert duplicate.task == first
    assert sorted(await client.keys("*")) == keys_before
    assert await store.task_for_content(KB, sha) == first

    forced = await store.create_ingestion(new_task(sha256=sha), "", force=True)
    assert forced.created
    assert forced.task != first
    # The content entry now points at the newest document.
    assert await store.task_for_content(KB, sha) == forced.task
    assert await store.queue_depth() == 2
    # Other knowledge bases are separate.
    assert (await store.create_ingestion(new_task(OTHER_KB, sha256=sha), "", False)).created


async def test_resent_create_of_the_same_task_counts_once(store: RedisTaskStore) -> None:
    task = new_task()
    await created(store, task, request_id="req-1")
    # A command resent after a lost reply must neither look like someone else's task
    # (the caller would delete its own object) nor write a second entry.
    again = await store.create_ingestion(task, "req-1", force=False)
    assert again.created
    assert again.task == task
    assert await store.queue_depth() == 1


async def test_missing_knowledge_base_is_checked_inside_the_script(
    store: RedisTaskStore, client: Redis
) -> None:
    assert await store.knowledge_base_tenant(KB) == DEFAULT_TENANT
    assert await store.knowledge_base_tenant("nope") is None
    # Deleted between the upload's first check and the task's creation.
    await client.delete(redis_keys.knowledge_base(KB))

    with pytest.raises(NotFound) as raised:
        await store.create_ingestion(new_task(), "req-1", force=False)

    assert raised.value.reason == "KNOWLEDGE_BASE_NOT_FOUND"
    assert sorted(await client.keys("*")) == [redis_keys.knowledge_base(OTHER_KB).encode()]


async def test_queue_orders_by_priority_then_first_in_first_out(
    store: RedisTaskStore, client: Redis
) -> None:
    low_old = await created(store, new_task(created=BASE_MS, priority=0))
    high_new = await created(store, new_task(created=BASE_MS + 50, priority=9))
    mid = await created(store, new_task(created=BASE_MS + 20, priority=5))
    low_new = await created(store, new_task(created=BASE_MS + 30, priority=0))
    high_old = await created(store, new_task(created=BASE_MS + 40, priority=9))

    assert await members(client, redis_keys.QUEUE_READY) == [
        high_old.id,
        high_new.id,
        mid.id,
        low_old.id,
        low_new.id,
    ]
    await client.zadd(redis_keys.QUEUE_DELAYED, {"backing-off": BASE_MS})
    assert await store.queue_depth() == 6


# --- listing ---


async def test_list_tasks_by_knowledge_base_and_state(store: RedisTaskStore) -> None:
    a1 = await created(store, new_task(KB, created=BASE_MS + 1))
    b1 = await created(store, new_task(OTHER_KB, created=BASE_MS + 2))
    a2 = await created(store, new_task(KB, created=BASE_MS + 3))
    b2 = await created(store, new_task(OTHER_KB, created=BASE_MS + 4))
    a2 = await store.cancel(a2.id, "not needed")
    b2 = await start(store, b2)

    async def ids(kb: str, state: TaskState | None) -> list[str]:
        page = await store.list_tasks(kb, state, 0, "")
        assert page.next_page_token == ""
        return [t.id for t in page.tasks]

    assert await ids("", None) == [b2.id, a2.id, b1.id, a1.id]
    assert await ids(KB, None) == [a2.id, a1.id]
    assert await ids("", TaskState.PENDING) == [b1.id, a1.id]
    assert await ids(KB, TaskState.CANCELLED) == [a2.id]
    assert await ids(OTHER_KB, TaskState.RUNNING) == [b2.id]
    assert await ids(OTHER_KB, TaskState.CANCELLED) == []
    assert await ids("no-such-kb", None) == []
    page = await store.list_tasks(KB, TaskState.CANCELLED, 10, "")
    assert page.tasks == [a2]


async def interleaved(listing: Awaitable[T], decoded: Callable[[], int]) -> tuple[T, list[int]]:
    """Runs `listing`; whenever the event loop lets other code run before it
    is done, notes how many records it had decoded by then."""
    seen = []
    running = asyncio.ensure_future(listing)
    while not running.done():
        seen.append(decoded())
        await asyncio.sleep(0)
    return await running, seen


async def test_a_large_page_lets_other_calls_run_while_it_is_read(
    store: RedisTaskStore, client: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Up to a thousand records are read and decoded a slice at a time
    (redis_pages.in_batches), so the event loop serves other calls (uploads,
    searches on the same process) between slices instead of waiting for the
    whole page: task and document listings, and the dispatcher's reads."""
    total = redis_pages.RECORD_BATCH * 2 + 7
    assert total <= redis_pages.MAX_PAGE_SIZE
    tasks = [await created(store, new_task(created=BASE_MS + i)) for i in range(total)]
    newest_first = tasks[::-1]
    counts = {"tasks": 0, "documents": 0}

    def counting(kind: str, decode: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any) -> Any:
            counts[kind] += 1
            return decode(*args)

        return wrapped

    monkeypatch.setattr(redis_store, "decode_task", counting("tasks", decode_task))
    monkeypatch.setattr(
        redis_documents, "decode_document", counting("documents", redis_documents.decode_document)
    )

    def sliced(kind: str, seen: list[int]) -> None:
        assert counts[kind] == total, kind
        # Other code ran with part of the records decoded, more than once.
        assert len({n for n in seen if 0 < n < total}) >= 2, kind
        counts[kind] = 0

    page, seen = await interleaved(store.list_tasks("", None, 1000, ""), lambda: counts["tasks"])
    sliced("tasks", seen)
    assert page.tasks == newest_first
    assert page.next_page_token == ""

    documents, seen = await interleaved(
        RedisDocuments(client).list(KB, "", 1000, ""), lambda: counts["documents"]
    )
    sliced("documents", seen)
    assert [d.id for d in documents.documents] == [t.document_id for t in newest_first]

    queue = RedisDispatchQueue(client, store)
    ids = [t.id for t in tasks]
    records, seen = await interleaved(queue._records(ids), lambda: counts["tasks"])
    sliced("tasks", seen)
    assert records == [(t.id, t) for t in tasks]


async def test_pages_are_stable_while_new_tasks_arrive(store: RedisTaskStore) -> None:
    # Groups of tasks created in the same millisecond straddle page boundaries.
    original = [await created(store, new_task(created=BASE_MS + i // 3)) for i in range(20)]
    expected = [
        t.id for t in sorted(original, key=lambda t: (t.create_time_ms, t.id), reverse=True)
    ]

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await store.list_tasks("", None, 4, token)
        assert len(page.tasks) <= 4
        seen += [t.id for t in page.tasks]
        pages += 1
        # Uploads arrive between pages: newer ones, and one in the same ms as the
        # page's last task (it sorts before or after the cursor by its random id bits).
        await created(store, new_task(created=BASE_MS + 100 + pages))
        await created(store, new_task(created=page.tasks[-1].create_time_ms))
        token = page.next_page_token
        if not token:
            break

    assert pages >= 5  # more when a same-ms newcomer sorts after a cursor
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i in expected] == expected


async def test_page_size_defaults_and_clamps(store: RedisTaskStore) -> None:
    for i in range(55):
        await created(store, new_task(created=BASE_MS + i))
    assert len((await store.list_tasks("", None, 0, "")).tasks) == 50
    assert len((await store.list_tasks("", None, -3, "")).tasks) == 50
    whole = await store.list_tasks("", None, 5000, "")
    assert len(whole.tasks) == 55
    assert whole.next_page_token == ""
    first = await store.list_tasks("", None, 1, "")
    assert len(first.tasks) == 1
    assert first.next_page_token


async def test_foreign_or_garbled_page_token_is_invalid(store: RedisTaskStore) -> None:
    for i in range(3):
        await created(store, new_task(created=BASE_MS + i))
    token = (await store.list_tasks(KB, None, 1, "")).next_page_token
    assert token
    assert (await store.list_tasks(KB, None, 1, token)).tasks

    for kb, state, bad in [
        ("", None, token),
        (KB, TaskState.PENDING, token),
        (OTHER_KB, None, token),
        (KB, None, "not a token!"),
        (KB, None, "e30"),  # {}
        (KB, None, token[:-3]),
    ]:
        with pytest.raises(InvalidArgument) as raised:
            await store.list_tasks(kb, state, 1, bad)
        assert raised.value.reason == "INVALID_PAGE_TOKEN"


# --- cancel ---


async def test_cancel_pending_removes_it_from_the_queue(
    store: RedisTaskStore, client: Redis
) -> None:
    task = await created(store, new_task())
    backing_off = await created(store, new_task())
    await client.zrem(redis_keys.QUEUE_READY, backing_off.id)
    await client.zadd(redis_keys.QUEUE_DELAYED, {backing_off.id: BASE_MS})

    cancelled = await store.cancel(task.id, "wrong file")
    await store.cancel(backing_off.id, "")

    assert cancelled.state is TaskState.CANCELLED
    assert cancelled.end_time_ms > 0
    assert "wrong file" in cancelled.message
    assert await store.get_task(task.id) == cancelled
    assert await store.queue_depth() == 0
    assert await members(client, redis_keys.tasks_in_state(DEFAULT_TENANT, "PENDING")) == []
    assert await members(client, redis_keys.kb_tasks_in_state(KB, "PENDING")) == []
    assert set(await members(client, redis_keys.tasks_in_state(DEFAULT_TENANT, "CANCELLED"))) == {
        task.id,
        backing_off.id,
    }
    assert len(await members(client, redis_keys.kb_tasks_in_state(KB, "CANCELLED"))) == 2
    log = await events(client, task.id)
    assert [e.task.state for e in log] == [TaskState.PENDING, TaskState.CANCELLED]
    assert log[-1].task == cancelled


async def test_cancel_running_asks_the_worker(store: RedisTaskStore, client: Redis) -> None:
    running = await start(store, await created(store, new_task()))

    asked = await store.cancel(running.id, "stop")
    again = await store.cancel(running.id, "stop")

    assert asked.state is TaskState.RUNNING
    assert asked.cancel_requested
    assert again == asked
    assert await members(client, redis_keys.tasks_in_state(DEFAULT_TENANT, "RUNNING")) == [
        running.id
    ]
    log = await events(client, running.id)
    assert len(log) == 3  # created, started, cancel requested: the repeat adds nothing
    assert log[-1].task.cancel_requested


async def test_cancel_finished_or_unknown_task_fails(store: RedisTaskStore) -> None:
    done = await finish(
        store, await start(store, await created(store, new_task())), TaskState.SUCCEEDED
    )
    with pytest.raises(FailedPrecondition) as raised:
        await store.cancel(done.id, "")
    assert raised.value.reason == "TASK_ALREADY_FINISHED"
    with pytest.raises(NotFound) as missing:
        await store.cancel(new_id(), "")
    assert missing.value.reason == "TASK_NOT_FOUND"


# --- retry ---


async def test_retry_requeues_failed_and_cancelled_tasks(
    store: RedisTaskStore, client: Redis
) -> None:
    failed = await finish(
        store, await start(store, await created(store, new_task())), TaskState.FAILED
    )
    assert failed.error is not None

    retried = await store.retry(failed.id, "")

    assert retried.state is TaskState.PENDING
    assert retried.attempt == 1
    assert retried.error is None
    assert retried.worker_id == ""
    assert retried.end_time_ms == 0
    assert await members(client, redis_keys.QUEUE_READY) == [failed.id]
    assert await members(client, redis_keys.tasks_in_state(DEFAULT_TENANT, "FAILED")) == []
    assert await members(client, redis_keys.kb_tasks_in_state(KB, "PENDING")) == [failed.id]
    log = await events(client, failed.id)
    assert log[-2].task.error == failed.error  # the error stays in the history
    assert log[-1].task == retried

    cancelled = await store.cancel((await created(store, new_task())).id, "")
    assert (await store.retry(cancelled.id, "")).state is TaskState.PENDING


async def test_retry_refuses_tasks_that_are_not_finished_or_succeeded(
    store: RedisTaskStore,
) -> None:
    pending = await created(store, new_task())
    running = await start(store, await created(store, new_task()))
    succeeded = await finish(
        store, await start(store, await created(store, new_task())), TaskState.SUCCEEDED
    )
    for task in (pending, running, succeeded):
        with pytest.raises(FailedPrecondition) as raised:
            await store.retry(task.id, "req-1")
        assert raised.value.reason == "TASK_NOT_RETRYABLE"
    with pytest.raises(NotFound):
        await store.retry(new_id(), "")


async def test_retry_with_the_same_request_id_requeues_once(
    store: RedisTaskStore, client: Redis
) -> None:
    failed = await finish(
        store, await start(store, await created(store, new_task())), TaskState.FAILED
    )
    retried = await store.retry(failed.id, "req-9")
    events_after_retry = len(await events(client, failed.id))

    assert await store.retry(failed.id, "req-9") == retried
    # Even after failing again, the same key does not queue it a second time.
    failed_again = await finish(store, await start(store, retried), TaskState.FAILED)
    assert await store.retry(failed.id, "req-9") == failed_again
    assert await store.queue_depth() == 0
    assert len(await events(client, failed.id)) == events_after_retry + 2
    # A new key does.
    assert (await store.retry(failed.id, "req-10")).state is TaskState.PENDING
    assert await store.queue_depth() == 1


async def test_transition_with_a_stale_read_writes_nothing(
    store: RedisTaskStore, client: Redis
) -> None:
    task = await created(store, new_task())
    running = await start(store, task, worker="worker-1")

    stale = await store.transition(task, EventType.STATE_CHANGED, {"state": TaskState.RUNNING})
    other_worker = await store.transition(
        dataclasses.replace(running, worker_id="worker-2"),
        EventType.PROGRESS,
        {"progress": 0.5},
        guard=("worker_id",),
    )

    assert stale.status == "conflict"
    assert stale.task == running
    assert other_worker.status == "conflict"
    assert other_worker.task == running
    assert await store.get_task(task.id) == running
    assert len(await events(client, task.id)) == 2


# --- watch ---


async def test_watch_sees_events_written_by_another_replica(
    store: RedisTaskStore, other_client: Redis
) -> None:
    task = await created(store, new_task())
    replica = RedisTaskStore(other_client)
    seen: list[TaskEvent] = []
    snapshot_seen = asyncio.Event()

    async def follow() -> None:
        async for event in store.watch(task.id, ""):
            seen.append(event)
            snapshot_seen.set()

    watcher = asyncio.create_task(follow())
    await asyncio.wait_for(snapshot_seen.wait(), 5)
    running = await start(replica, task)
    working = await replica.transition(
        running,
        EventType.PROGRESS,
        {"stage": Stage.PARSING, "progress": 0.5, "message": "page 1 of 2"},
        guard=("worker_id",),
    )
    await asyncio.sleep(0.3)  # longer than one XREAD block: the watcher loops
    asked = await replica.cancel(task.id, "enough")
    await finish(replica, asked, TaskState.CANCELLED)
    await asyncio.wait_for(watcher, 5)

    assert [(e.type, e.task.state) for e in seen] == [
        (EventType.SNAPSHOT, TaskState.PENDING),
        (EventType.STATE_CHANGED, TaskState.RUNNING),
        (EventType.PROGRESS, TaskState.RUNNING),
        (EventType.STATE_CHANGED, TaskState.RUNNING),
        (EventType.STATE_CHANGED, TaskState.CANCELLED),
    ]
    assert seen[0].task == task
    assert seen[2].task == working.task
    assert seen[2].task.stage is Stage.PARSING
    assert seen[2].task.progress == 0.5
    assert seen[3].task.cancel_requested
    ids = [tuple(map(int, e.id.split("-"))) for e in seen]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


async def test_watch_resumes_after_an_event_id(store: RedisTaskStore, client: Redis) -> None:
    task = await created(store, new_task())
    running = await start(store, task)
    await store.cancel(task.id, "")
    done = await finish(store, await store.get_task(task.id) or running, TaskState.CANCELLED)
    log = await events(client, task.id)
    assert len(log) == 4

    resumed = [e async for e in store.watch(task.id, log[1].id)]
    assert resumed == log[2:]
    assert resumed[-1].task == done
    # Resuming after the last event of a finished task ends at once.
    assert [e async for e in store.watch(task.id, log[-1].id)] == []
    # A snapshot's id is a resume point too.
    snapshot = [e async for e in store.watch(task.id, "")]
    assert [e.type for e in snapshot] == [EventType.SNAPSHOT]
    assert snapshot[0].id == log[-1].id
    assert snapshot[0].task == done


async def test_watch_starts_with_a_snapshot_when_history_was_trimmed(
    store: RedisTaskStore, client: Redis
) -> None:
    task = await created(store, new_task())
    first_event = (await events(client, task.id))[0]
    running = await start(store, task)
    await client.xtrim(redis_keys.task_events(task.id), maxlen=1, approximate=False)

    seen: list[TaskEvent] = []
    async for event in store.watch(task.id, first_event.id):
        seen.append(event)
        if len(seen) == 1:
            await store.cancel(task.id, "")
            await finish(store, await store.get_task(task.id) or running, TaskState.CANCELLED)

    assert [e.type for e in seen] == [
        EventType.SNAPSHOT,
        EventType.STATE_CHANGED,
        EventType.STATE_CHANGED,
    ]
    assert seen[0].task == running
    assert seen[-1].task.state is TaskState.CANCELLED


async def test_watch_rejects_unknown_tasks_and_bad_ids(store: RedisTaskStore) -> None:
    with pytest.raises(NotFound) as missing:
        [e async for e in store.watch(new_id(), "")]
    assert missing.value.reason == "TASK_NOT_FOUND"
    task = await created(store, new_task())
    for bad in ("yesterday", "1-2-3", "99999999999999-0"):
        with pytest.raises(InvalidArgument) as raised:
            [e async for e in store.watch(task.id, bad)]
        assert raised.value.reason == "INVALID_EVENT_ID"


async def test_watch_of_a_finished_task_is_one_snapshot(store: RedisTaskStore) -> None:
    task = await store.cancel((await created(store, new_task())).id, "")
    seen = [e async for e in store.watch(task.id, "")]
    assert [(e.type, e.task) for e in seen] == [(EventType.SNAPSHOT, task)]


# --- Redis unreachable ---


async def test_redis_down_is_unavailable(start_redis: RedisFactory) -> None:
    server = start_redis()
    connection = Redis.from_url(server.url, retry=Retry(NoBackoff(), 1))
    try:
        store = RedisTaskStore(connection, watch_block_ms=200)
        await connection.hset(redis_keys.knowledge_base(KB), mapping={"id": KB})
        task = await created(store, new_task())
        watch = store.watch(task.id, "")
        assert (await anext(watch)).type is EventType.SNAPSHOT
        server.stop()

        with pytest.raises(Unavailable) as raised:
            await anext(watch)
        assert raised.value.reason == "REDIS_UNAVAILABLE"
        assert raised.value.retry_after == 1.0
        for call in (
            store.get_task(task.id),
            store.queue_depth(),
            store.knowledge_base_tenant(KB),
            store.create_ingestion(new_task(), "", force=False),
            store.list_tasks("", None, 10, ""),
            store.cancel(task.id, ""),
            store.retry(task.id, ""),
        ):
            with pytest.raises(Unavailable):
                await call
        with pytest.raises(Unavailable):
            await anext(store.watch(task.id, ""))
    finally:
        server.stop()
        await connection.aclose()
