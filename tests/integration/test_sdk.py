"""The Python SDK (kbmesh.client) against the real services.

A Task Manager and a Knowledge Service whose own worker ingests (the real
pipeline and model), on a private Redis and a fresh bucket: uploads from a
path, a file object and an async byte stream, watched to SUCCEEDED, listed,
split into chunks and found by search; typed errors with their reasons; a
watch that survives a Task Manager restart; an upload retried while the Task
Manager is down."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from devstack import servers
from devstack.servers import SeaweedServer, ServiceServer
from kbmesh.client import (
    AsyncClient,
    Client,
    DataLoss,
    NotFound,
    RetryPolicy,
    Unavailable,
)
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from tests import documents
from tests.conftest import (
    BucketFactory,
    Launcher,
    RedisFactory,
    ServiceFactory,
    Stack,
    WorkerFactory,
)

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Mesh:
    """A Task Manager and an ingesting Knowledge Service."""

    task_manager: ServiceServer
    knowledge: ServiceServer

    @property
    def env(self) -> dict[str, str]:
        """Environment that points the SDK and the CLI at these services."""
        return {
            "KBMESH_TASK_MANAGER_ADDRESS": self.task_manager.address,
            "KBMESH_KNOWLEDGE_ADDRESS": self.knowledge.address,
        }


def start_mesh(launcher: Launcher, s3_server: SeaweedServer) -> Mesh:
    redis = RedisFactory(launcher)()
    bucket = BucketFactory(s3_server)("kbmesh-sdk")
    services = ServiceFactory(launcher, redis_url=redis.url, s3=bucket)
    task_manager = services("task_manager")
    knowledge = services(
        "knowledge",
        task_manager_address=task_manager.address,
        env={"KBMESH_KNOWLEDGE_WORKER__ENABLED": "true"},
    )
    return Mesh(task_manager, knowledge)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedServer) -> Iterator[Mesh]:
    launcher = Launcher(tmp_path_factory.mktemp("sdk-mesh"))
    try:
        yield start_mesh(launcher, s3_server)
    finally:
        launcher.close()


@pytest.fixture
async def client(mesh: Mesh) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(
        task_manager_address=mesh.task_manager.address,
        knowledge_address=mesh.knowledge.address,
    ) as sdk:
        yield sdk


def unique(prefix: str) -> str:
    return f"{prefix}-{os.urandom(4).hex()}"


async def test_upload_watch_list_and_search(client: AsyncClient, tmp_path: Path) -> None:
    base = await client.create_knowledge_base(unique("sdk"), description="SDK test")
    assert (await client.get_knowledge_base(base.id)).name == base.name
    assert base.id in {b.id async for b in client.list_knowledge_bases()}

    # Generated once: a DOCX carries its creation time, so two are not equal.
    docx = documents.docx()
    handbook = documents.write(tmp_path, "handbook.docx", docx)
    guide = io.BytesIO(documents.MARKDOWN)

    async def notes() -> AsyncIterator[bytes]:
        for line in documents.TEXT.splitlines(keepends=True):
            yield line

    sent: list[tuple[int, int]] = []
    from_path = await client.upload(base.id, handbook, progress=lambda n, t: sent.append((n, t)))
    from_file = await client.upload(base.id, guide, filename="guide.md")
    from_stream = await client.upload(base.id, notes(), filename="notes.txt")

    # Paths and seekable files are hashed first: the header carried size and sha256.
    assert from_path.task.sha256 == hashlib.sha256(docx).hexdigest()
    assert sent[-1] == (len(docx), len(docx))
    assert from_file.task.sha256 == hashlib.sha256(documents.MARKDOWN).hexdigest()
    assert from_stream.task.size_bytes == len(documents.TEXT)

    for answer in (from_path, from_file, from_stream):
        events = [e async for e in client.watch_task(answer.task_id)]
        assert events[0].type == tm.WatchTaskResponse.TYPE_SNAPSHOT
        assert events[-1].last
        assert events[-1].task.state == tm.Task.STATE_SUCCEEDED, events[-1].task.error
        # Each event once, in order.
        ids = [e.event_id for e in events[1:]]
        assert len(ids) == len(set(ids))
        assert (await client.get_task(answer.task_id)).state == tm.Task.STATE_SUCCEEDED

    listed = [t async for t in client.list_tasks(knowledge_base_id=base.id)]
    assert {t.id for t in listed} == {from_path.task_id, from_file.task_id, from_stream.task_id}
    succeeded = [t async for t in client.list_tasks(knowledge_base_id=base.id, state="succeeded")]
    assert len(succeeded) == 3
    docs = [d async for d in client.list_documents(base.id)]
    assert sorted(d.filename for d in docs) == ["guide.md", "handbook.docx", "notes.txt"]
    assert {d.state for d in docs} == {kn.Document.STATE_SUCCEEDED}
    assert len([d async for d in client.list_documents(base.id, limit=2)]) == 2
    document = await client.get_document(base.id, from_path.document_id)
    assert document.filename == "handbook.docx"
    chunks = [c async for c in client.list_chunks(base.id, from_path.document_id)]
    assert chunks
    assert [c.position.chunk_index for c in chunks] == list(range(len(chunks)))

    found = await client.search(base.id, "how many days of paid vacation do I get", top_k=3)
    assert found.results[0].filename == "handbook.docx"
    assert "25 days" in found.results[0].text
    only_notes = await client.search(base.id, "vacation", filenames=["notes.txt"], mode="keyword")
    assert {r.filename for r in only_notes.results} <= {"notes.txt"}

    deleted = await client.delete_document(base.id, from_path.document_id)
    assert deleted.deleted_chunk_count == len(chunks)
    with pytest.raises(NotFound) as missing:
        await client.get_document(base.id, from_path.document_id)
    assert missing.value.reason == "DOCUMENT_NOT_FOUND"


async def test_errors_carry_code_and_reason(client: AsyncClient) -> None:
    with pytest.raises(NotFound) as unknown_kb:
        await client.get_knowledge_base("no-such-knowledge-base")
    assert unknown_kb.value.reason == "KNOWLEDGE_BASE_NOT_FOUND"
    assert unknown_kb.value.domain == "knowledge.kbmesh"

    with pytest.raises(NotFound) as upload_to_nothing:
        await client.upload("no-such-knowledge-base", b"hello", filename="a.txt")
    assert upload_to_nothing.value.reason == "KNOWLEDGE_BASE_NOT_FOUND"

    base = await client.create_knowledge_base(unique("errors"))
    with pytest.raises(DataLoss) as corrupted:
        await client.upload(base.id, b"some bytes", filename="a.txt", sha256="0" * 64)
    assert corrupted.value.reason == "CHECKSUM_MISMATCH"
    assert [t async for t in client.list_tasks(knowledge_base_id=base.id)] == []

    with pytest.raises(NotFound) as unknown_task:
        await client.get_task("no-such-task")
    assert unknown_task.value.reason == "TASK_NOT_FOUND"

    deleted = await client.delete_knowledge_base(base.id)
    assert deleted.deleted_document_count == 0
    with pytest.raises(NotFound):
        await client.get_knowledge_base(base.id)


async def test_unreachable_service_is_unavailable_after_retries() -> None:
    port = servers.find_free_port()
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02)
    async with AsyncClient(
        task_manager_address=f"127.0.0.1:{port}",
        knowledge_address=f"127.0.0.1:{port}",
        retry=policy,
    ) as sdk:
        with pytest.raises(Unavailable):
            await sdk.get_knowledge_base("anything")


def test_sync_client(mesh: Mesh, tmp_path: Path) -> None:
    with Client(
        task_manager_address=mesh.task_manager.address,
        knowledge_address=mesh.knowledge.address,
    ) as sdk:
        base = sdk.create_knowledge_base(unique("sync"))
        answer = sdk.upload(
            base.id, iter([b"Our office dog is called ", b"Biscuit.\n"]), filename="dog.txt"
        )
        task = sdk.wait_task(answer.task_id)
        assert task.state == tm.Task.STATE_SUCCEEDED, task.error
        assert [d.filename for d in sdk.list_documents(base.id)] == ["dog.txt"]
        found = sdk.search(base.id, "what is the office dog called")
        assert found.results[0].filename == "dog.txt"
        updated = sdk.update_knowledge_base(base.id, description="pets")
        assert updated.description == "pets"
        assert updated.name == base.name
        with pytest.raises(NotFound):
            sdk.get_task("no-such-task")


# --------------------------------------------------------- Task Manager restarts

FAST_SHUTDOWN = {"KBMESH_TASK_MANAGER_GRPC__SHUTDOWN_GRACE_SECONDS": "1"}


async def test_watch_resumes_across_a_task_manager_restart(
    start_service: ServiceFactory, start_worker: WorkerFactory, new_bucket: BucketFactory
) -> None:
    """The task stays PENDING (no worker) while the watch starts; the Task
    Manager is restarted on the same port; only then does a worker take the
    task. The watch sees the end without a second snapshot or a repeated event."""
    bucket = new_bucket()
    tm_server = start_service("task_manager", s3=bucket, env=FAST_SHUTDOWN, name="tm-first")
    port = tm_server.port
    async with AsyncClient(
        task_manager_address=tm_server.address, knowledge_address=tm_server.address
    ) as sdk:
        # The Task Manager alone does not know knowledge bases: make one in Redis
        # through a Knowledge Service, as uploads need it.
        knowledge = start_service("knowledge", s3=bucket, task_manager_address=tm_server.address)
        async with AsyncClient(
            task_manager_address=tm_server.address, knowledge_address=knowledge.address
        ) as both:
            base = await both.create_knowledge_base(unique("restart"))
        answer = await sdk.upload(base.id, b"wait for me", filename="w.txt")

        events: asyncio.Queue[tm.WatchTaskResponse] = asyncio.Queue()

        async def watch() -> None:
            async for event in sdk.watch_task(answer.task_id):
                await events.put(event)

        watching = asyncio.create_task(watch())
        first = await events.get()
        assert first.type == tm.WatchTaskResponse.TYPE_SNAPSHOT
        assert first.task.state == tm.Task.STATE_PENDING

        await asyncio.to_thread(tm_server.stop)
        restarted = await asyncio.to_thread(
            start_service, "task_manager", s3=bucket, env=FAST_SHUTDOWN, port=port, name="tm-again"
        )
        assert restarted.port == port
        await asyncio.to_thread(start_worker, task_manager_address=restarted.address, s3=bucket)
        await watching

    seen = [first]
    while not events.empty():
        seen.append(events.get_nowait())
    assert seen[-1].task.state == tm.Task.STATE_SUCCEEDED
    assert seen[-1].last
    assert [e.type for e in seen].count(tm.WatchTaskResponse.TYPE_SNAPSHOT) == 1
    ids = [e.event_id for e in seen]
    assert len(ids) == len(set(ids))
    assert ids == sorted(ids, key=lambda i: tuple(int(p) for p in i.split("-")))


async def test_upload_is_retried_while_the_task_manager_is_down(
    start_service: ServiceFactory, new_bucket: BucketFactory
) -> None:
    """An upload with a request_id from a path goes again, from the start,
    until a Task Manager answers; the knowledge base gets one task."""
    bucket = new_bucket()
    tm_server = start_service("task_manager", s3=bucket, env=FAST_SHUTDOWN, name="tm-first")
    knowledge = start_service("knowledge", s3=bucket, task_manager_address=tm_server.address)
    port = tm_server.port
    policy = RetryPolicy(max_attempts=1000, initial_backoff=0.05, max_backoff=0.2)
    async with AsyncClient(
        task_manager_address=tm_server.address, knowledge_address=knowledge.address, retry=policy
    ) as sdk:
        base = await sdk.create_knowledge_base(unique("retry"))
        tm_server.stop()
        failures: list[BaseException] = []
        started = threading.Event()

        def restart() -> None:
            started.wait()
            try:
                start_service(
                    "task_manager", s3=bucket, env=FAST_SHUTDOWN, port=port, name="tm-again"
                )
            except BaseException as exc:  # reported by the assertion below
                failures.append(exc)

        thread = threading.Thread(target=restart)
        thread.start()
        try:
            uploading = asyncio.create_task(
                sdk.upload(base.id, documents.TEXT, filename="retried.txt")
            )
            # Let the first attempts fail against the closed port before the restart.
            await asyncio.sleep(0)
            started.set()
            answer = await uploading
        finally:
            started.set()
            await asyncio.to_thread(thread.join)
        assert not failures
        assert answer.task.filename == "retried.txt"
        tasks = [t async for t in sdk.list_tasks(knowledge_base_id=base.id)]
        assert [t.id for t in tasks] == [answer.task_id]


async def test_both_services_through_the_envoy_gateway(stack: Stack) -> None:
    """One address for both services: Envoy routes gRPC by service name."""
    async with AsyncClient(
        task_manager_address=stack.envoy_grpc_address,
        knowledge_address=stack.envoy_grpc_address,
    ) as sdk:
        base = await sdk.create_knowledge_base(unique("envoy"))
        answer = await sdk.upload(base.id, documents.TEXT, filename="notes.txt")
        task = await sdk.get_task(answer.task_id)
        assert task.sha256 == hashlib.sha256(documents.TEXT).hexdigest()
        watch = sdk.watch_task(answer.task_id)
        snapshot = await anext(watch)
        await watch.aclose()
        assert snapshot.type == tm.WatchTaskResponse.TYPE_SNAPSHOT
        assert snapshot.task.id == answer.task_id
        assert [d.filename async for d in sdk.list_documents(base.id)] == ["notes.txt"]
        with pytest.raises(NotFound) as missing:
            await sdk.get_task("no-such-task")
        assert missing.value.reason == "TASK_NOT_FOUND"
