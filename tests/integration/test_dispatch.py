"""The worker protocol end to end: real Redis, Task Manager replicas and worker processes.

One mesh per module: a private Redis, two Task Manager replicas (A and B)
with short leases (3 s, heartbeats every 0.5 s, retries after 0.2 s doubling
up to 1 s, 3 attempts), and a Knowledge Service to create knowledge bases.
Each test starts from an empty Redis database and starts its own workers
(`python -m services.knowledge.worker` with the test handler, SleepHandler),
which record every start and end of a job in a Redis list the test reads.
Tasks are uploaded through the Task Manager; their upload metadata tells the
handler what to do (sleep, progress steps, failures).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from grpc.aio import EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
from redis.asyncio import Redis

from devstack import servers
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from kbmesh.taskmanager.v1 import worker_pb2 as wk
from kbmesh.taskmanager.v1 import worker_pb2_grpc as wk_grpc
from services.common import redis_keys
from tests.conftest import (
    BucketFactory,
    Launcher,
    RedisFactory,
    ServiceFactory,
    WorkerFactory,
)
from tests.support import error_info, upload_messages

pytestmark = pytest.mark.integration

LEASE_SECONDS = 3.0
BACKOFF_BASE_MS = 200
TM_ENV = {
    "KBMESH_TASK_MANAGER_DISPATCH__LEASE_SECONDS": str(LEASE_SECONDS),
    "KBMESH_TASK_MANAGER_DISPATCH__HEARTBEAT_SECONDS": "0.5",
    "KBMESH_TASK_MANAGER_DISPATCH__BACKOFF_BASE_SECONDS": str(BACKOFF_BASE_MS / 1000),
    "KBMESH_TASK_MANAGER_DISPATCH__BACKOFF_CAP_SECONDS": "1.0",
    "KBMESH_TASK_MANAGER_DISPATCH__MAINTENANCE_INTERVAL_SECONDS": "0.2",
    "KBMESH_TASK_MANAGER_DISPATCH__POLL_INTERVAL_SECONDS": "0.5",
    "KBMESH_TASK_MANAGER_UPLOADS__MAX_ATTEMPTS": "3",
    "KBMESH_TASK_MANAGER_GRPC__SHUTDOWN_GRACE_SECONDS": "2",
}
WORKER_ENV = {
    "KBMESH_KNOWLEDGE_WORKER__RECONNECT_BASE_SECONDS": "0.05",
    "KBMESH_KNOWLEDGE_WORKER__RECONNECT_CAP_SECONDS": "0.5",
    "KBMESH_KNOWLEDGE_WORKER__SHUTDOWN_GRACE_SECONDS": "0.5",
}
RECORDS = "test:dispatch:records"
TOKEN = servers.DEV_WORKER_TOKEN


@dataclass(frozen=True)
class Mesh:
    redis_url: str
    s3: servers.S3Settings
    tm_a: servers.ServiceServer
    tm_b: servers.ServiceServer
    knowledge: servers.ServiceServer
    services: ServiceFactory


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, s3_server: servers.SeaweedServer
) -> Iterator[Mesh]:
    launcher = Launcher(tmp_path_factory.mktemp("dispatch"))
    try:
        redis = RedisFactory(launcher)()
        s3 = BucketFactory(s3_server)("kbmesh-dispatch")
        services = ServiceFactory(launcher, redis_url=redis.url, s3=s3)
        tm_a = services("task_manager", name="tm-a", env=TM_ENV)
        tm_b = services("task_manager", name="tm-b", env=TM_ENV)
        ks = services("knowledge", task_manager_address=tm_a.address)
        yield Mesh(redis.url, s3, tm_a, tm_b, ks, services)
    finally:
        launcher.close()


@pytest.fixture
async def redis(mesh: Mesh) -> AsyncIterator[Redis]:
    client = Redis.from_url(mesh.redis_url)
    await client.flushdb()  # each test starts with an empty queue
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def kb(mesh: Mesh, redis: Redis) -> str:
    async with grpc.aio.insecure_channel(mesh.knowledge.address) as channel:
        created = await kn_grpc.KnowledgeServiceStub(channel).CreateKnowledgeBase(
            kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name=os.urandom(6).hex()))
        )
    return created.id


@pytest.fixture
async def tm_a(mesh: Mesh) -> AsyncIterator[tm_grpc.TaskManagerServiceAsyncStub]:
    async with grpc.aio.insecure_channel(mesh.tm_a.address) as channel:
        yield tm_grpc.TaskManagerServiceStub(channel)


@pytest.fixture
def workers(start_worker: WorkerFactory, mesh: Mesh) -> Callable[..., servers.WorkerServer]:
    """Workers on this module's mesh (TM A unless told), recording into RECORDS."""

    def start(worker_id: str, *, tm: str = "", concurrency: int = 4) -> servers.WorkerServer:
        return start_worker(
            task_manager_address=tm or mesh.tm_a.address,
            worker_id=worker_id,
            concurrency=concurrency,
            redis_url=mesh.redis_url,
            s3=mesh.s3,
            handler_options={"record_key": RECORDS},
            env=WORKER_ENV,
        )

    return start


# --- helpers -----------------------------------------------------------------------------------


async def upload(
    stub: tm_grpc.TaskManagerServiceAsyncStub, kb: str, name: str, **metadata: str
) -> str:
    answer: tm.UploadResponse = await stub.Upload(
        upload_messages(
            f"{name} {os.urandom(8).hex()}".encode(),
            knowledge_base_id=kb,
            filename=f"{name}.txt",
            metadata=metadata,
        )
    )
    return answer.task_id


async def get(stub: tm_grpc.TaskManagerServiceAsyncStub, task_id: str) -> tm.Task:
    task: tm.Task = await stub.GetTask(tm.GetTaskRequest(task_id=task_id))
    return task


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float, what: str, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        await asyncio.sleep(interval)


async def reaches(
    stub: tm_grpc.TaskManagerServiceAsyncStub,
    task_id: str,
    state: tm.Task.State.ValueType,
    within: float,
) -> tm.Task:
    found: list[tm.Task] = []

    async def check() -> bool:
        found[:] = [await get(stub, task_id)]
        return found[0].state == state

    await eventually(check, within, f"task {task_id} {tm.Task.State.Name(state)}")
    return found[0]


async def records(redis: Redis) -> list[dict[str, Any]]:
    raw = await redis.lrange(RECORDS, 0, -1)
    return [json.loads(entry) for entry in raw]


async def event_history(redis: Redis, task_id: str) -> list[dict[str, str]]:
    entries: Any = await redis.xrange(redis_keys.task_events(task_id))
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def lease_expired_in(history: list[dict[str, str]]) -> bool:
    return any('"LEASE_EXPIRED"' in event.get("error", "") for event in history)


class RawWorker:
    """The worker protocol by hand, to watch exactly what the Task Manager sends."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None) -> None:
        metadata = () if token is None else (("authorization", f"Bearer {token}"),)
        stub: Any = wk_grpc.WorkerServiceStub(channel)
        self.call = stub.Connect(metadata=metadata)
        self._writing = asyncio.Lock()
        self.leases: list[str] = []
        # Cancelling a read cancels the whole call: one reader task feeds a queue.
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while (message := await self.call.read()) is not EOF:
                self._inbox.put_nowait(message)
        except grpc.aio.AioRpcError as exc:
            self._inbox.put_nowait(exc)

    async def send(self, **message: Any) -> None:
        async with self._writing:
            await self.call.write(wk.ConnectRequest(**message))

    async def heartbeats(self) -> None:
        """Renews `self.leases` every 0.5 s, like a live worker."""
        while True:
            await self.send(heartbeat=wk.ConnectRequest.Heartbeat(lease_ids=self.leases))
            await asyncio.sleep(0.5)

    async def hello(self, worker_id: str, max_concurrency: int) -> wk.ConnectResponse:
        await self.send(
            hello=wk.ConnectRequest.Hello(worker_id=worker_id, max_concurrency=max_concurrency)
        )
        return await self.receive(5.0)

    async def receive(self, within: float) -> wk.ConnectResponse:
        message = await asyncio.wait_for(self._inbox.get(), within)
        if isinstance(message, grpc.aio.AioRpcError):
            raise message
        assert isinstance(message, wk.ConnectResponse)
        return message

    async def assignments(self, within: float) -> list[wk.ConnectResponse.Assignment]:
        """Assignments that arrive within `within` seconds (other messages skipped)."""
        got = []
        deadline = time.monotonic() + within
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await self.receive(left)
            except TimeoutError:
                break
            if message.WhichOneof("message") == "assignment":
                got.append(message.assignment)
        return got


# --- tests -------------------------------------------------------------------------------------


async def test_watch_shows_running_with_progress_then_succeeded(
    tm_a: tm_grpc.TaskManagerServiceAsyncStub,
    kb: str,
    redis: Redis,
    workers: Callable[..., servers.WorkerServer],
) -> None:
    workers("w-watch")
    task_id = await upload(tm_a, kb, "watched", sleep="0.6", steps="3")
    events = [e async for e in tm_a.WatchTask(tm.WatchTaskRequest(task_id=task_id))]
    running = [e.task for e in events if e.task.state == tm.Task.STATE_RUNNING]
    assert running, [tm.Task.State.Name(e.task.state) for e in events]
    assert running[0].worker_id == "w-watch"
    progressed = [t for t in running if 0 < t.progress < 1]
    assert progressed
    assert {t.stage for t in progressed} >= {kn.STAGE_DOWNLOADING}
    assert all(t.stage != kn.STAGE_UNSPECIFIED for t in progressed)
    assert [e.type for e in events].count(tm.WatchTaskResponse.TYPE_PROGRESS) >= 2
    last = events[-1]
    assert last.last
    assert last.task.state == tm.Task.STATE_SUCCEEDED
    assert last.task.progress == 1.0
    assert last.task.result.chunk_count == 1
    assert last.task.attempt == 1
    mine = [(r["event"], r["attempt"]) for r in await records(redis) if r["task_id"] == task_id]
    assert mine == [("start", 1), ("done", 1)]


@pytest.mark.parametrize("token", [None, "not-the-token"])
async def test_stream_without_a_valid_token_is_refused_and_gets_nothing(
    mesh: Mesh, tm_a: tm_grpc.TaskManagerServiceAsyncStub, kb: str, token: str | None
) -> None:
    task_id = await upload(tm_a, kb, "unclaimed")
    async with grpc.aio.insecure_channel(mesh.tm_a.address) as channel:
        raw = RawWorker(channel, token)
        # Refused before the server reads anything: no hello or credit is even looked at.
        # (The test sends none: a write racing the refusal fails locally with INTERNAL.)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw.receive(5.0)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(caught.value).reason == "WORKER_UNAUTHENTICATED"
    await asyncio.sleep(0.5)
    task = await get(tm_a, task_id)
    assert task.state == tm.Task.STATE_PENDING
    assert task.worker_id == ""


async def test_a_worker_never_gets_more_than_its_credits(
    mesh: Mesh,
    tm_a: tm_grpc.TaskManagerServiceAsyncStub,
    kb: str,
    redis: Redis,
    workers: Callable[..., servers.WorkerServer],
) -> None:
    task_ids = [await upload(tm_a, kb, f"credit-{i}") for i in range(6)]
    async with grpc.aio.insecure_channel(mesh.tm_a.address) as channel:
        slow = RawWorker(channel, TOKEN)
        welcome = await slow.hello("slow", max_concurrency=4)
        assert welcome.welcome.lease_duration.ToMilliseconds() == LEASE_SECONDS * 1000
        await slow.send(credit=wk.ConnectRequest.CreditGrant(credits=2))
        beating = asyncio.create_task(slow.heartbeats())
        first = await slow.assignments(within=1.5)
        assert len(first) == 2
        slow.leases = [a.lease_id for a in first]
        assert {a.task_id for a in first} <= set(task_ids)
        assert all(a.attempt == 1 and a.lease_id for a in first)
        # One done and one more credit: exactly one more assignment.
        done = first[0]
        await slow.send(
            completed=wk.ConnectRequest.Completed(task_id=done.task_id, lease_id=done.lease_id)
        )
        await slow.send(credit=wk.ConnectRequest.CreditGrant(credits=1))
        second = await slow.assignments(within=1.0)
        assert len(second) == 1
        held = [first[1], second[0]]
        slow.leases = [a.lease_id for a in held]
        # A real worker takes the rest; the slow one still holds its two.
        workers("fast", concurrency=4)
        rest = [t for t in task_ids if t not in {done.task_id, *(a.task_id for a in held)}]
        for task_id in rest:
            task = await reaches(tm_a, task_id, tm.Task.STATE_SUCCEEDED, 15)
            assert task.worker_id == "fast"
        for assignment in held:
            task = await get(tm_a, assignment.task_id)
            assert task.state == tm.Task.STATE_RUNNING
            assert task.worker_id == "slow"
        assert (await get(tm_a, done.task_id)).state == tm.Task.STATE_SUCCEEDED
        assert not await slow.assignments(within=0.3)
        beating.cancel()
    # The slow worker's stream is gone and it renews nothing: its leases lapse and the
    # fast worker finishes its tasks, as attempt 2.
    for assignment in held:
        task = await reaches(tm_a, assignment.task_id, tm.Task.STATE_SUCCEEDED, 15)
        assert (task.worker_id, task.attempt) == ("fast", 2)
        assert lease_expired_in(await event_history(redis, assignment.task_id))


async def test_a_killed_worker_s_task_completes_on_another_worker(
    tm_a: tm_grpc.TaskManagerServiceAsyncStub,
    kb: str,
    redis: Redis,
    workers: Callable[..., servers.WorkerServer],
) -> None:
    doomed = workers("w-doomed")
    task_id = await upload(tm_a, kb, "survivor", sleep="1.5")
    running = await reaches(tm_a, task_id, tm.Task.STATE_RUNNING, 10)
    assert running.worker_id == "w-doomed"

    async def handler_started() -> bool:
        return any(r["worker_id"] == "w-doomed" for r in await records(redis))

    await eventually(handler_started, 10, "the doomed worker's handler starts")
    # Killed before the heir starts: a worker starting slowly on a busy machine
    # must not leave the doomed one time to finish the task.
    os.kill(doomed.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    workers("w-heir")
    task = await reaches(tm_a, task_id, tm.Task.STATE_SUCCEEDED, LEASE_SECONDS + 30)
    assert time.monotonic() - killed_at >= LEASE_SECONDS - 0.5  # it waited for the lease
    assert (task.worker_id, task.attempt) == ("w-heir", 2)
    history = await event_history(redis, task_id)
    assert lease_expired_in(history)
    mine = [(r["event"], r["worker_id"], r["attempt"]) for r in await records(redis)]
    assert [m for m in mine if m[1] == "w-doomed"] == [("start", "w-doomed", 1)]
    assert [m for m in mine if m[1] == "w-heir"] == [("start", "w-heir", 2), ("done", "w-heir", 2)]


async def test_retryable_failures_back_off_then_fail_and_retry_requeues(
    tm_a: tm_grpc.TaskManagerServiceAsyncStub,
    kb: str,
    redis: Redis,
    workers: Callable[..., servers.WorkerServer],
) -> None:
    workers("w-retry")
    flaky = await upload(tm_a, kb, "flaky", fail="retryable")
    fatal = await upload(tm_a, kb, "fatal", fail="fatal")
    failed = await reaches(tm_a, flaky, tm.Task.STATE_FAILED, 15)
    assert failed.attempt == failed.max_attempts == 3
    assert (failed.error.reason, failed.error.retryable) == ("TEST_FAILURE", True)
    # Between attempts: PENDING with a backoff of at least half of base * 2^(attempt-1).
    history = await event_history(redis, flaky)
    waits = [
        (int(e["attempt"]), int(e["next_attempt_time_ms"]) - int(e["update_time_ms"]))
        for e in history
        if e["state"] == "PENDING" and e["next_attempt_time_ms"] != "0"
    ]
    assert [attempt for attempt, _ in waits] == [2, 3]
    for attempt, wait_ms in waits:
        ceiling = BACKOFF_BASE_MS * 2 ** (attempt - 2)
        assert ceiling / 2 <= wait_ms <= ceiling
    starts = [
        r["time"] for r in await records(redis) if r["task_id"] == flaky and r["event"] == "start"
    ]
    assert len(starts) == 3
    assert starts[1] - starts[0] >= BACKOFF_BASE_MS / 2000
    assert starts[2] - starts[1] >= BACKOFF_BASE_MS / 1000
    # Not retryable: failed at once.
    gave_up = await reaches(tm_a, fatal, tm.Task.STATE_FAILED, 10)
    assert gave_up.attempt == 1
    assert not gave_up.error.retryable
    # Dead-lettered tasks stay listable, and RetryTask queues them again.
    listed = await tm_a.ListTasks(
        tm.ListTasksRequest(knowledge_base_id=kb, state=tm.Task.STATE_FAILED)
    )
    assert {t.id for t in listed.tasks} == {flaky, fatal}
    retried = await tm_a.RetryTask(tm.RetryTaskRequest(task_id=flaky))
    assert (retried.task.state, retried.task.attempt) == (tm.Task.STATE_PENDING, 1)
    await reaches(tm_a, flaky, tm.Task.STATE_FAILED, 15)
    starts_after = [
        r for r in await records(redis) if r["task_id"] == flaky and r["event"] == "start"
    ]
    assert [r["attempt"] for r in starts_after] == [1, 2, 3, 1, 2, 3]


async def test_cancel_reaches_a_running_task_on_a_worker_of_the_other_replica(
    mesh: Mesh,
    tm_a: tm_grpc.TaskManagerServiceAsyncStub,
    kb: str,
    redis: Redis,
    workers: Callable[..., servers.WorkerServer],
) -> None:
    workers("w-on-b", tm=mesh.tm_b.address)
    task_id = await upload(tm_a, kb, "long", sleep="30", blocking="1")
    await reaches(tm_a, task_id, tm.Task.STATE_RUNNING, 10)
    answer = await tm_a.CancelTask(tm.CancelTaskRequest(task_id=task_id, reason="changed my mind"))
    assert answer.task.cancel_requested
    task = await reaches(tm_a, task_id, tm.Task.STATE_CANCELLED, 20)
    assert "changed my mind" in task.message
    # The worker was told and stopped the work (its handler saw the cancel), rather
    # than the lease lapsing while the handler slept on.
    assert not lease_expired_in(await event_history(redis, task_id))
    mine = [(r["event"], r["worker_id"]) for r in await records(redis) if r["task_id"] == task_id]
    assert mine == [("start", "w-on-b"), ("cancelled", "w-on-b")]


async def test_a_stopping_worker_hands_its_task_back(
    tm_a: tm_grpc.TaskManagerServiceAsyncStub,
    kb: str,
    redis: Redis,
    workers: Callable[..., servers.WorkerServer],
) -> None:
    leaving = workers("w-leaving")
    task_id = await upload(tm_a, kb, "handed-back", sleep="3")
    await reaches(tm_a, task_id, tm.Task.STATE_RUNNING, 10)
    # Stopped before the other worker starts: a slow start on a busy machine
    # must not leave the task time to finish where it is.
    await asyncio.to_thread(leaving.stop)  # SIGTERM: 0.5 s grace, then hand back
    workers("w-staying")

    async def taken_over() -> bool:
        return (await get(tm_a, task_id)).worker_id == "w-staying"

    await eventually(taken_over, 20, "the other worker runs the task")
    task = await reaches(tm_a, task_id, tm.Task.STATE_SUCCEEDED, 20)
    assert task.attempt == 1  # a shutdown does not use up an attempt
    history = await event_history(redis, task_id)
    assert any('"WORKER_SHUTDOWN"' in e["error"] for e in history if e["state"] == "PENDING")
    assert not lease_expired_in(history)


async def test_task_manager_restarts_mid_stream_and_nothing_is_lost(
    mesh: Mesh,
    tm_a: tm_grpc.TaskManagerServiceAsyncStub,
    kb: str,
    redis: Redis,
    workers: Callable[..., servers.WorkerServer],
) -> None:
    tm_c = mesh.services("task_manager", name="tm-c", env=TM_ENV)
    port = tm_c.port
    workers("w-c1", tm=tm_c.address)
    workers("w-c2", tm=tm_c.address)
    task_ids = [await upload(tm_a, kb, f"restart-{i}", sleep="0.3") for i in range(40)]

    async def succeeded() -> int:
        counts = Counter([(await get(tm_a, t)).state for t in task_ids])
        return counts[tm.Task.STATE_SUCCEEDED]

    async def some_done() -> bool:
        return await succeeded() >= 5

    await eventually(some_done, 15, "first tasks done")
    await asyncio.to_thread(tm_c.stop)  # SIGTERM: Drain to the workers, then stop
    tm_c = mesh.services("task_manager", name="tm-c", env=TM_ENV, port=port)

    async def more_done() -> bool:
        return await succeeded() >= 20

    await eventually(more_done, 20, "tasks done after a graceful restart")
    os.kill(tm_c.pid, signal.SIGKILL)  # and once without warning
    await asyncio.sleep(0.5)
    mesh.services("task_manager", name="tm-c", env=TM_ENV, port=port)

    async def all_done() -> bool:
        return await succeeded() == len(task_ids)

    await eventually(all_done, 40, "every task done", interval=0.2)
    for state in (tm.Task.STATE_RUNNING, tm.Task.STATE_PENDING):
        left = await tm_a.ListTasks(tm.ListTasksRequest(knowledge_base_id=kb, state=state))
        assert not left.tasks
    done = Counter(r["task_id"] for r in await records(redis) if r["event"] == "done")
    assert set(done) == set(task_ids)
    for task_id, count in done.items():
        if count > 1:  # run twice only if its first lease lapsed while the TM was away
            assert lease_expired_in(await event_history(redis, task_id)), task_id


async def test_two_replicas_three_workers_500_tasks_each_done_once(
    mesh: Mesh,
    kb: str,
    redis: Redis,
    workers: Callable[..., servers.WorkerServer],
) -> None:
    pool = {
        "w-1": workers("w-1", tm=mesh.tm_a.address, concurrency=8),
        "w-2": workers("w-2", tm=mesh.tm_a.address, concurrency=8),
        "w-3": workers("w-3", tm=mesh.tm_b.address, concurrency=8),
    }
    async with (
        grpc.aio.insecure_channel(mesh.tm_a.address) as channel_a,
        grpc.aio.insecure_channel(mesh.tm_b.address) as channel_b,
    ):
        stubs = [
            tm_grpc.TaskManagerServiceStub(channel_a),
            tm_grpc.TaskManagerServiceStub(channel_b),
        ]
        # Provoke one lease expiry: freeze the worker running this task past its lease.
        stalled = await upload(stubs[0], kb, "stalled", sleep="2")
        running = await reaches(stubs[0], stalled, tm.Task.STATE_RUNNING, 10)
        frozen = pool[running.worker_id]
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            semaphore = asyncio.Semaphore(32)

            async def one(i: int) -> str:
                async with semaphore:
                    return await upload(stubs[i % 2], kb, f"bulk-{i}", sleep="0.01")

            bulk = await asyncio.gather(*(one(i) for i in range(500)))
            await reaches(stubs[1], stalled, tm.Task.STATE_SUCCEEDED, LEASE_SECONDS + 15)
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        task_ids = {stalled, *bulk}
        assert len(task_ids) == 501

        async def all_done() -> bool:
            done = await redis.zcard(redis_keys.kb_tasks_in_state(kb, "SUCCEEDED"))
            return int(done) == len(task_ids)

        await eventually(all_done, 60, "all 501 tasks succeeded", interval=0.2)
    await asyncio.sleep(1.0)  # the thawed worker's late reports arrive, and are ignored
    assert await redis.zcard(redis_keys.kb_tasks_in_state(kb, "SUCCEEDED")) == len(task_ids)
    entries = [r for r in await records(redis) if r["task_id"] in task_ids]
    starts = Counter(r["task_id"] for r in entries if r["event"] == "start")
    done = Counter(r["task_id"] for r in entries if r["event"] == "done")
    assert set(done) == task_ids  # every task ran to completion at least once
    twice = {t for t in task_ids if starts[t] > 1 or done[t] > 1}
    assert stalled in twice  # the provoked expiry did lead to a second run
    for task_id in twice:
        assert lease_expired_in(await event_history(redis, task_id)), task_id
    # Everything else ran exactly once; the workers shared the work.
    assert all(starts[t] == done[t] == 1 for t in task_ids - twice)
    assert len(twice) < 50
    by_worker = Counter(r["worker_id"] for r in entries if r["event"] == "done")
    assert all(by_worker[w] > 50 for w in pool if w != running.worker_id), by_worker
