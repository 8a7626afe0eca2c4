"""Task Manager on real Redis + SeaweedFS: uploads, tasks, events.

Each test talks gRPC to the Task Manager process started by the `stack`
fixture (or to its own processes when it needs other settings)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.common.settings import DEFAULT_TENANT
from services.task_manager.domain.upload import object_prefix
from tests.conftest import RedisFactory, ServiceFactory, Stack
from tests.support import (
    error_info,
    next_event,
    remaining_events,
    retry_delay_seconds,
    upload_messages,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def tasks(stack: Stack) -> AsyncIterator[tm_grpc.TaskManagerServiceAsyncStub]:
    async with grpc.aio.insecure_channel(stack.tm_address) as channel:
        yield tm_grpc.TaskManagerServiceStub(channel)


@pytest.fixture
async def knowledge(stack: Stack) -> AsyncIterator[kn_grpc.KnowledgeServiceAsyncStub]:
    async with grpc.aio.insecure_channel(stack.ks_address) as channel:
        yield kn_grpc.KnowledgeServiceStub(channel)


@pytest.fixture
async def kb(knowledge: kn_grpc.KnowledgeServiceAsyncStub) -> str:
    created = await knowledge.CreateKnowledgeBase(
        kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name=os.urandom(6).hex()))
    )
    return created.id


def bucket_keys(stack: Stack) -> set[str]:
    client = stack.s3.boto3_client()
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=stack.s3_bucket)
    return {obj["Key"] for page in pages for obj in page.get("Contents", [])}


def kb_keys(stack: Stack, kb: str) -> list[str]:
    """The stored objects of knowledge base `kb` (the default tenant's)."""
    return [k for k in bucket_keys(stack) if k.startswith(object_prefix(DEFAULT_TENANT, kb))]


def incomplete_uploads(stack: Stack) -> list[Any]:
    answer = stack.s3.boto3_client().list_multipart_uploads(Bucket=stack.s3_bucket)
    return list(answer.get("Uploads", []))


async def upload(
    stub: tm_grpc.TaskManagerServiceAsyncStub, data: bytes, **header: Any
) -> tm.UploadResponse:
    response: tm.UploadResponse = await stub.Upload(upload_messages(data, **header))
    return response


async def rejected(
    stub: tm_grpc.TaskManagerServiceAsyncStub, messages: Iterator[tm.UploadRequest]
) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Upload(messages)
    return caught.value


async def test_upload_is_stored_and_queued(
    stack: Stack, tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    data = os.urandom(300_000)
    answer = await upload(tasks, data, knowledge_base_id=kb, filename="report.pdf")
    assert answer.task_id
    assert answer.document_id
    task = await tasks.GetTask(tm.GetTaskRequest(task_id=answer.task_id))
    assert task.state == tm.Task.STATE_PENDING
    assert (task.size_bytes, task.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert task.filename == "report.pdf"
    assert task.content_type == "application/pdf"
    assert task.attempt == 1
    keys = kb_keys(stack, kb)
    assert len(keys) == 1
    assert "report" not in keys[0]
    stored = stack.s3.boto3_client().get_object(Bucket=stack.s3_bucket, Key=keys[0])
    assert stored["Body"].read() == data
    listed = await tasks.ListTasks(tm.ListTasksRequest(knowledge_base_id=kb))
    assert [t.id for t in listed.tasks] == [answer.task_id]


async def test_large_upload_goes_through_multipart(
    stack: Stack, tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    data = os.urandom(21 * 1024 * 1024)
    answer = await upload(
        tasks,
        data,
        chunk_size=1024 * 1024,
        knowledge_base_id=kb,
        filename="big.bin",
        declared_size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    assert answer.task.size_bytes == len(data)
    keys = kb_keys(stack, kb)
    stored = stack.s3.boto3_client().get_object(Bucket=stack.s3_bucket, Key=keys[0])
    assert hashlib.sha256(stored["Body"].read()).hexdigest() == answer.task.sha256


def minor_page_faults(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[7])


async def test_upload_bytes_stream_through_reused_buffers(
    stack: Stack, tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    """Parts are not joined and gRPC's ~1 MiB messages come from reused heap
    memory (entrypoint.bound_native_memory): streaming costs no page fault per
    byte. Mapping and unmapping each buffer cost about 470 faults per MiB;
    now about 50 (the heap regrowing after glibc trimmed it; none in the
    bench's steady stream)."""
    mib = 1024 * 1024
    size = 96 * mib

    async def upload_random(size: int) -> None:
        answer = await upload(
            tasks, os.urandom(size), chunk_size=mib, knowledge_base_id=kb, filename="big.bin"
        )
        assert answer.task.size_bytes == size

    await upload_random(16 * mib)  # the heap grows to its working size once
    before = minor_page_faults(stack.task_manager.pid)
    await upload_random(size)
    faults = minor_page_faults(stack.task_manager.pid) - before
    assert faults < 150 * size // mib, f"{faults} page faults for {size // mib} MiB"


async def test_header_may_arrive_with_the_first_bytes(
    tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    messages = upload_messages(
        b"x" * 200_000, header_with_first_bytes=True, knowledge_base_id=kb, filename="a.txt"
    )
    answer = await tasks.Upload(messages)
    assert answer.task.size_bytes == 200_000


async def test_unknown_knowledge_base_stores_nothing(
    stack: Stack, tasks: tm_grpc.TaskManagerServiceAsyncStub
) -> None:
    before = bucket_keys(stack)
    err = await rejected(
        tasks, upload_messages(b"data", knowledge_base_id="no-such-kb", filename="a.txt")
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err).reason == "KNOWLEDGE_BASE_NOT_FOUND"
    assert bucket_keys(stack) == before


def bytes_first(kb: str) -> Iterator[tm.UploadRequest]:
    yield tm.UploadRequest(file={"data": b"early"})
    yield tm.UploadRequest(knowledge_base_id=kb, filename="a.txt")


def header_twice(kb: str) -> Iterator[tm.UploadRequest]:
    yield tm.UploadRequest(knowledge_base_id=kb, filename="a.txt")
    yield tm.UploadRequest(file={"data": b"abc"})
    yield tm.UploadRequest(filename="b.txt")


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        (lambda kb: iter(()), "MISSING_HEADER"),
        (bytes_first, "BYTES_BEFORE_HEADER"),
        (header_twice, "HEADER_NOT_FIRST"),
        (lambda kb: upload_messages(b"", knowledge_base_id=kb, filename="e.txt"), "EMPTY_FILE"),
        (
            lambda kb: upload_messages(b"x", knowledge_base_id=kb, filename="../x"),
            "INVALID_FILENAME",
        ),
        (
            lambda kb: upload_messages(b"x", knowledge_base_id=kb, filename="a\x07"),
            "INVALID_FILENAME",
        ),
        (
            lambda kb: upload_messages(
                b"abc", knowledge_base_id=kb, filename="a.txt", declared_size_bytes=4
            ),
            "SIZE_MISMATCH",
        ),
    ],
)
async def test_malformed_uploads_are_invalid_and_leave_nothing(
    stack: Stack, tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str, messages: Any, reason: str
) -> None:
    err = await rejected(tasks, messages(kb))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(err).reason == reason
    assert not kb_keys(stack, kb)
    listed = await tasks.ListTasks(tm.ListTasksRequest(knowledge_base_id=kb))
    assert list(listed.tasks) == []


async def test_checksum_mismatch_is_data_loss_and_leaves_nothing(
    stack: Stack, tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    data = os.urandom(12 * 1024 * 1024)  # past one part: a multipart upload is aborted
    err = await rejected(
        tasks,
        upload_messages(
            data, chunk_size=1024 * 1024, knowledge_base_id=kb, filename="a.bin", sha256="0" * 64
        ),
    )
    assert err.code() == grpc.StatusCode.DATA_LOSS
    assert error_info(err).reason == "CHECKSUM_MISMATCH"
    assert not kb_keys(stack, kb)
    assert not [
        u
        for u in incomplete_uploads(stack)
        if u["Key"].startswith(object_prefix(DEFAULT_TENANT, kb))
    ]


async def cut_off(
    tasks: tm_grpc.TaskManagerServiceAsyncStub,
    messages: AsyncIterator[tm.UploadRequest],
    sent: asyncio.Event,
) -> None:
    """Starts an Upload of `messages` and, once `sent` is set and the bytes
    had a moment to arrive, goes away as a killed client would."""
    call = tasks.Upload(messages)
    await sent.wait()
    await asyncio.sleep(0.5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call


async def test_client_gone_mid_upload_leaves_no_task_and_no_object(
    stack: Stack, tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    sent = asyncio.Event()

    async def endless() -> AsyncIterator[tm.UploadRequest]:
        yield tm.UploadRequest(knowledge_base_id=kb, filename="cut.bin")
        for i in range(1000):
            yield tm.UploadRequest(file={"data": os.urandom(1024 * 1024)})
            if i == 20:
                sent.set()
        await asyncio.Event().wait()

    await cut_off(tasks, endless(), sent)
    for _ in range(50):  # the server notices and aborts asynchronously
        if not [
            u
            for u in incomplete_uploads(stack)
            if u["Key"].startswith(object_prefix(DEFAULT_TENANT, kb))
        ]:
            break
        await asyncio.sleep(0.1)
    assert not [
        u
        for u in incomplete_uploads(stack)
        if u["Key"].startswith(object_prefix(DEFAULT_TENANT, kb))
    ]
    assert not kb_keys(stack, kb)
    listed = await tasks.ListTasks(tm.ListTasksRequest(knowledge_base_id=kb))
    assert list(listed.tasks) == []


async def test_declared_size_upload_is_streamed_and_stored_intact(
    stack: Stack, tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    """A declared size of at most one part: the object's PUT starts with the
    first bytes (s3_put.StreamedPut) and the stored object is the bytes sent."""
    data = os.urandom(700 * 1024)
    answer = await upload(
        tasks,
        data,
        chunk_size=64 * 1024,
        knowledge_base_id=kb,
        filename="streamed.pdf",
        declared_size_bytes=len(data),
    )
    assert answer.task.size_bytes == len(data)
    assert answer.task.sha256 == hashlib.sha256(data).hexdigest()
    keys = kb_keys(stack, kb)
    stored = stack.s3.boto3_client().get_object(Bucket=stack.s3_bucket, Key=keys[0])
    assert stored["Body"].read() == data
    assert stored["ContentType"] == "application/pdf"


@pytest.mark.parametrize("sent", ["all, wrong sha256", "half, then gone"])
async def test_streamed_upload_that_fails_leaves_nothing(
    stack: Stack, tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str, sent: str
) -> None:
    """The streamed PUT is dropped before its trailer: S3 keeps nothing."""
    data = os.urandom(512 * 1024)
    if sent == "all, wrong sha256":
        err = await rejected(
            tasks,
            upload_messages(
                data,
                chunk_size=64 * 1024,
                knowledge_base_id=kb,
                filename="a.bin",
                declared_size_bytes=len(data),
                sha256="0" * 64,
            ),
        )
        assert err.code() == grpc.StatusCode.DATA_LOSS
    else:
        half_sent = asyncio.Event()

        async def half() -> AsyncIterator[tm.UploadRequest]:
            yield tm.UploadRequest(
                knowledge_base_id=kb, filename="cut.bin", declared_size_bytes=len(data)
            )
            yield tm.UploadRequest(file={"data": data[: len(data) // 2]})
            half_sent.set()
            await asyncio.Event().wait()

        await cut_off(tasks, half(), half_sent)
        await asyncio.sleep(0.5)  # the server notices and aborts asynchronously
    assert not kb_keys(stack, kb)
    listed = await tasks.ListTasks(tm.ListTasksRequest(knowledge_base_id=kb))
    assert list(listed.tasks) == []


async def test_same_request_id_answers_the_same_task(
    stack: Stack, tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    first = await upload(tasks, b"one", knowledge_base_id=kb, filename="a.txt", request_id="r-1")
    again = await upload(tasks, b"two", knowledge_base_id=kb, filename="a.txt", request_id="r-1")
    assert again.task_id == first.task_id
    assert again.replayed
    assert len(kb_keys(stack, kb)) == 1


async def test_same_bytes_are_recognised_unless_forced(
    stack: Stack, tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    first = await upload(tasks, b"same bytes", knowledge_base_id=kb, filename="a.txt")
    again = await upload(tasks, b"same bytes", knowledge_base_id=kb, filename="b.txt")
    assert again.duplicate
    assert again.document_id == first.document_id
    forced = await upload(tasks, b"same bytes", knowledge_base_id=kb, filename="c.txt", force=True)
    assert not forced.duplicate
    assert forced.document_id != first.document_id
    assert len(kb_keys(stack, kb)) == 2


async def test_many_concurrent_uploads_are_all_acknowledged(
    tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    count = 1000
    semaphore = asyncio.Semaphore(200)  # concurrent streams from this one client

    async def one(i: int) -> tm.UploadResponse:
        async with semaphore:
            return await upload(
                tasks, f"document {i}".encode(), knowledge_base_id=kb, filename=f"{i}.txt"
            )

    answers = await asyncio.gather(*(one(i) for i in range(count)))
    assert len({a.task_id for a in answers}) == count
    seen: set[str] = set()
    token = ""
    while True:
        page = await tasks.ListTasks(
            tm.ListTasksRequest(knowledge_base_id=kb, page_size=300, page_token=token)
        )
        seen.update(t.id for t in page.tasks)
        token = page.next_page_token
        if not token:
            break
    assert seen == {a.task_id for a in answers}


async def test_watch_streams_events_and_resumes_after_an_event_id(
    tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    answer = await upload(tasks, b"watch me", knowledge_base_id=kb, filename="w.txt")
    stream = tasks.WatchTask(tm.WatchTaskRequest(task_id=answer.task_id))
    snapshot = await next_event(stream)
    assert snapshot is not None
    assert snapshot.type == tm.WatchTaskResponse.TYPE_SNAPSHOT
    assert snapshot.task.state == tm.Task.STATE_PENDING
    await tasks.CancelTask(tm.CancelTaskRequest(task_id=answer.task_id, reason="test"))
    rest = await remaining_events(stream)
    assert [e.task.state for e in rest] == [tm.Task.STATE_CANCELLED]
    assert rest[-1].last
    resumed = [
        event
        async for event in tasks.WatchTask(
            tm.WatchTaskRequest(task_id=answer.task_id, after_event_id=snapshot.event_id)
        )
    ]
    assert [e.event_id for e in resumed] == [e.event_id for e in rest]


async def test_watcher_on_another_replica_sees_the_events(
    stack: Stack, start_service: ServiceFactory, tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    other = start_service("task_manager", redis_url=stack.redis_url, s3=stack.s3, name="tm-2")
    answer = await upload(tasks, b"replicas", knowledge_base_id=kb, filename="r.txt")
    async with grpc.aio.insecure_channel(other.address) as channel:
        stream = tm_grpc.TaskManagerServiceStub(channel).WatchTask(
            tm.WatchTaskRequest(task_id=answer.task_id)
        )
        snapshot = await next_event(stream)
        assert snapshot is not None
        assert snapshot.type == tm.WatchTaskResponse.TYPE_SNAPSHOT
        await tasks.CancelTask(tm.CancelTaskRequest(task_id=answer.task_id))
        event = await asyncio.wait_for(next_event(stream), timeout=10)
        assert event is not None
        assert event.task.state == tm.Task.STATE_CANCELLED


async def test_cancel_and_retry_rules(tasks: tm_grpc.TaskManagerServiceAsyncStub, kb: str) -> None:
    answer = await upload(tasks, b"cancel me", knowledge_base_id=kb, filename="c.txt")
    cancelled = await tasks.CancelTask(tm.CancelTaskRequest(task_id=answer.task_id))
    assert cancelled.task.state == tm.Task.STATE_CANCELLED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tasks.CancelTask(tm.CancelTaskRequest(task_id=answer.task_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(caught.value).reason == "TASK_ALREADY_FINISHED"
    retried = await tasks.RetryTask(tm.RetryTaskRequest(task_id=answer.task_id))
    assert retried.task.state == tm.Task.STATE_PENDING
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tasks.RetryTask(tm.RetryTaskRequest(task_id=answer.task_id))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await tasks.GetTask(tm.GetTaskRequest(task_id="nope"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    pending = await tasks.ListTasks(
        tm.ListTasksRequest(knowledge_base_id=kb, state=tm.Task.STATE_PENDING)
    )
    assert answer.task_id in [t.id for t in pending.tasks]


async def test_limits_answer_resource_exhausted_with_retry_hint(
    stack: Stack, start_service: ServiceFactory, kb: str
) -> None:
    limited = start_service(
        "task_manager",
        redis_url=stack.redis_url,
        s3=stack.s3,
        name="tm-limited",
        env={
            "KBMESH_TASK_MANAGER_UPLOADS__MAX_BYTES": "1000",
            "KBMESH_TASK_MANAGER_UPLOADS__MAX_IN_FLIGHT": "1",
        },
    )
    async with grpc.aio.insecure_channel(limited.address) as channel:
        stub = tm_grpc.TaskManagerServiceStub(channel)
        err = await rejected(
            stub, upload_messages(b"x" * 1001, knowledge_base_id=kb, filename="big.txt")
        )
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(err).reason == "UPLOAD_TOO_LARGE"

        hold = asyncio.Event()

        async def slow() -> AsyncIterator[tm.UploadRequest]:
            yield tm.UploadRequest(knowledge_base_id=kb, filename="slow.txt", file={"data": b"a"})
            await hold.wait()

        first = stub.Upload(slow())
        await asyncio.sleep(0.5)
        err = await rejected(stub, upload_messages(b"b", knowledge_base_id=kb, filename="b.txt"))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(err).reason == "TOO_MANY_UPLOADS"
        assert retry_delay_seconds(err) == pytest.approx(1.0)
        hold.set()
        assert (await first).task_id


async def test_a_refusal_mid_stream_reaches_the_client_as_sent(
    stack: Stack, start_service: ServiceFactory, kb: str
) -> None:
    """A client still sending when the Task Manager refuses its upload gets
    the refusal, not grpc.aio's INTERNAL "Internal error from Core" (without
    kbmesh.client.grpc_fix, about two of three of these got INTERNAL)."""
    limited = start_service(
        "task_manager",
        redis_url=stack.redis_url,
        s3=stack.s3,
        name="tm-refusing",
        env={"KBMESH_TASK_MANAGER_UPLOADS__MAX_BYTES": str(1 << 20)},
    )

    async def messages(**header: Any) -> AsyncIterator[tm.UploadRequest]:
        yield tm.UploadRequest(filename="big.bin", **header)
        for _ in range(128):  # 8 MiB, far past the limit
            yield tm.UploadRequest(file={"data": b"x" * 65536})

    cases = [
        ({"knowledge_base_id": kb}, grpc.StatusCode.RESOURCE_EXHAUSTED),  # crossed mid-stream
        ({"knowledge_base_id": "0" * 26}, grpc.StatusCode.NOT_FOUND),  # refused at the header
    ]
    async with grpc.aio.insecure_channel(limited.address) as channel:
        stub = tm_grpc.TaskManagerServiceStub(channel)
        for header, code in cases:
            codes = []
            for _ in range(12):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Upload(messages(**header))
                codes.append(refused.value.code())
            assert codes == [code] * 12


async def test_acknowledged_task_survives_a_redis_restart(
    stack: Stack, start_redis: RedisFactory, start_service: ServiceFactory
) -> None:
    redis = start_redis()
    data_dir = redis.data_dir
    tm_proc = start_service("task_manager", redis_url=redis.url, s3=stack.s3, name="tm-aof")
    ks_proc = start_service(
        "knowledge",
        redis_url=redis.url,
        s3=stack.s3,
        name="ks-aof",
        task_manager_address=tm_proc.address,
    )
    async with (
        grpc.aio.insecure_channel(tm_proc.address) as tm_channel,
        grpc.aio.insecure_channel(ks_proc.address) as ks_channel,
    ):
        created = await kn_grpc.KnowledgeServiceStub(ks_channel).CreateKnowledgeBase(
            kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name="durable"))
        )
        stub = tm_grpc.TaskManagerServiceStub(tm_channel)
        answer = await upload(stub, b"keep me", knowledge_base_id=created.id, filename="k.txt")
        redis.stop()
        restarted = start_redis(data_dir=data_dir, port=redis.port)
        assert restarted.port == redis.port
        task = await stub.GetTask(tm.GetTaskRequest(task_id=answer.task_id))
        assert task.state == tm.Task.STATE_PENDING
        queued = await tasks_in_queue(restarted.url)
        assert answer.task_id in queued


async def tasks_in_queue(redis_url: str) -> list[str]:
    from redis.asyncio import Redis

    from services.common import redis_keys

    client = Redis.from_url(redis_url)
    try:
        members: Any = await client.zrange(redis_keys.QUEUE_READY, 0, -1)
        return [m.decode() for m in members]
    finally:
        await client.aclose()
