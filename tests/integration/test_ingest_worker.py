"""A standalone knowledge worker running the ingestion pipeline (the default
handler) behind a real Task Manager: uploads succeed with their counts, a bad
document fails its own task with its reason, and the worker keeps serving."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest

from devstack import servers
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from tests import documents
from tests.conftest import BucketFactory, Launcher, RedisFactory, ServiceFactory, WorkerFactory
from tests.integration.test_dispatch import reaches
from tests.support import upload_messages

pytestmark = pytest.mark.integration
INGEST_HANDLER = "services.knowledge.ingest.pipeline:ingest_handler"


@dataclass(frozen=True)
class Mesh:
    redis_url: str
    s3: servers.S3Settings
    task_manager: servers.ServiceServer
    knowledge: servers.ServiceServer
    worker: servers.WorkerServer
    services: ServiceFactory
    index_env: dict[str, str]


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, s3_server: servers.SeaweedServer
) -> Iterator[Mesh]:
    base = tmp_path_factory.mktemp("ingest")
    launcher = Launcher(base)
    try:
        redis = RedisFactory(launcher)()
        s3 = BucketFactory(s3_server)("kbmesh-ingest")
        services = ServiceFactory(launcher, redis_url=redis.url, s3=s3)
        index_env = {"KBMESH_KNOWLEDGE_INDEX__URI": str(base / "index")}
        task_manager = services("task_manager")
        knowledge = services("knowledge", task_manager_address=task_manager.address, env=index_env)
        worker = WorkerFactory(launcher, redis_url=redis.url, s3=s3)(
            task_manager_address=task_manager.address,
            worker_id="ingest-1",
            concurrency=2,
            handler=INGEST_HANDLER,
            env=index_env,
        )
        yield Mesh(redis.url, s3, task_manager, knowledge, worker, services, index_env)
    finally:
        launcher.close()


@pytest.fixture
async def kb(mesh: Mesh) -> str:
    async with grpc.aio.insecure_channel(mesh.knowledge.address) as channel:
        created = await kn_grpc.KnowledgeServiceStub(channel).CreateKnowledgeBase(
            kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name=os.urandom(6).hex()))
        )
    return created.id


@pytest.fixture
async def stub(mesh: Mesh) -> AsyncIterator[tm_grpc.TaskManagerServiceAsyncStub]:
    async with grpc.aio.insecure_channel(mesh.task_manager.address) as channel:
        yield tm_grpc.TaskManagerServiceStub(channel)


async def _upload(
    stub: tm_grpc.TaskManagerServiceAsyncStub, kb: str, name: str, data: bytes
) -> str:
    answer: tm.UploadResponse = await stub.Upload(
        upload_messages(data, knowledge_base_id=kb, filename=name)
    )
    return answer.task_id


async def test_documents_are_ingested_and_bad_ones_fail_with_their_reason(
    stub: tm_grpc.TaskManagerServiceAsyncStub, kb: str
) -> None:
    pdf = documents.pdf([("Intro", "Kbmesh indexes documents."), ("Billing", "Invoices are due.")])
    good = await _upload(stub, kb, "report.pdf", pdf)
    done = await reaches(stub, good, tm.Task.State.STATE_SUCCEEDED, within=90)
    assert (done.result.chunk_count, done.result.page_count) == (2, 2)
    assert done.result.token_count > 0

    bad = await _upload(stub, kb, "secret.pdf", documents.encrypted_pdf())
    failed = await reaches(stub, bad, tm.Task.State.STATE_FAILED, within=30)
    assert (failed.error.reason, failed.error.retryable) == ("DOCUMENT_ENCRYPTED", False)
    assert failed.attempt == 1

    # The worker lives on.
    again = await _upload(stub, kb, "notes.md", documents.MARKDOWN)
    done = await reaches(stub, again, tm.Task.State.STATE_SUCCEEDED, within=30)
    assert done.result.chunk_count >= 1


async def test_the_knowledge_service_s_own_worker_ingests_by_default(mesh: Mesh) -> None:
    """What `make up` runs: the worker inside the Knowledge Service, default handler."""
    async with grpc.aio.insecure_channel(mesh.task_manager.address) as channel:
        stub = tm_grpc.TaskManagerServiceStub(channel)
        # Stop the standalone worker so the service's own worker takes the task.
        mesh.worker.stop()
        knowledge = mesh.services(
            "knowledge",
            name="knowledge-with-worker",
            task_manager_address=mesh.task_manager.address,
            env={**mesh.index_env, "KBMESH_KNOWLEDGE_WORKER__ENABLED": "true"},
        )
        async with grpc.aio.insecure_channel(knowledge.address) as kchannel:
            created = await kn_grpc.KnowledgeServiceStub(kchannel).CreateKnowledgeBase(
                kn.CreateKnowledgeBaseRequest(
                    knowledge_base=kn.KnowledgeBase(name=os.urandom(6).hex())
                )
            )
        task_id = await _upload(stub, created.id, "notes.txt", documents.TEXT)
        done = await reaches(stub, task_id, tm.Task.State.STATE_SUCCEEDED, within=90)
        assert done.result.chunk_count == 1
        assert done.worker_id != "ingest-1"
