"""Authentication of callers: every public RPC needs a tenant API key.

Run against `auth_stack` (Task Manager + Knowledge Service with auth.mode
api_keys, Envoy in front). The methods are enumerated from the service
descriptors, so an RPC added later is covered without touching this file.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import grpc
import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc

import kbmesh.knowledge.v1
import kbmesh.taskmanager.v1
from devstack.servers import DEV_WORKER_TOKEN, ServiceKind, StartError
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from kbmesh.taskmanager.v1 import worker_pb2 as wk
from kbmesh.taskmanager.v1 import worker_pb2_grpc as wk_grpc
from services.common.auth import OPEN_SERVICES, parse_key
from tests.conftest import ServiceFactory, Stack
from tests.support import error_info, upload_messages

TM_SERVICE = tm.DESCRIPTOR.services_by_name["TaskManagerService"]
KS_SERVICE = kn.DESCRIPTOR.services_by_name["KnowledgeService"]


def _all_services() -> Iterator[tuple[descriptor.ServiceDescriptor, str]]:
    """Every service in every generated proto module of both API packages, so a
    new service or RPC is covered without touching this test; the worker
    stream has its own credential (tested below) and stays out."""
    for package, where in ((kbmesh.taskmanager.v1, "tm"), (kbmesh.knowledge.v1, "ks")):
        for module in pkgutil.iter_modules(package.__path__):
            if not module.name.endswith("_pb2"):
                continue
            generated = importlib.import_module(f"{package.__name__}.{module.name}")
            for service in generated.DESCRIPTOR.services_by_name.values():
                if service.full_name not in OPEN_SERVICES:
                    yield service, where


PUBLIC = list(_all_services())
assert {TM_SERVICE.full_name, KS_SERVICE.full_name} <= {s.full_name for s, _ in PUBLIC}


def public_methods() -> Iterator[tuple[str, descriptor.MethodDescriptor]]:
    for service, where in PUBLIC:
        for method in service.methods:
            yield where, method


METHODS = list(public_methods())
IDS = [f"{m.containing_service.name}.{m.name}" for _, m in METHODS]


async def call(
    channel: grpc.aio.Channel,
    method: descriptor.MethodDescriptor,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """Calls `method` with an empty request (or stream of one); raises AioRpcError."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    request_class = GetMessageClass(method.input_type)
    response_class = GetMessageClass(method.output_type)
    kwargs: dict[str, Any] = {
        "request_serializer": request_class.SerializeToString,
        "response_deserializer": response_class.FromString,
    }

    async def requests() -> AsyncIterator[Any]:
        yield request_class()

    if method.client_streaming and method.server_streaming:
        stream = channel.stream_stream(path, **kwargs)(requests(), metadata=metadata, timeout=30)
        async for _ in stream:
            pass
    elif method.client_streaming:
        await channel.stream_unary(path, **kwargs)(requests(), metadata=metadata, timeout=30)
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, **kwargs)(
            request_class(), metadata=metadata, timeout=30
        ):
            pass
    else:
        await channel.unary_unary(path, **kwargs)(request_class(), metadata=metadata, timeout=30)


def address(stack: Stack, where: str, via_envoy: bool) -> str:
    if via_envoy:
        return stack.envoy_grpc_address
    return stack.tm_address if where == "tm" else stack.ks_address


@pytest.mark.parametrize("via_envoy", [False, True], ids=["direct", "envoy"])
@pytest.mark.parametrize(("where", "method"), METHODS, ids=IDS)
async def test_every_public_rpc_without_credentials_is_unauthenticated(
    auth_stack: Stack, where: str, method: descriptor.MethodDescriptor, via_envoy: bool
) -> None:
    async with grpc.aio.insecure_channel(address(auth_stack, where, via_envoy)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await call(channel, method)
        assert missing.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(missing.value).reason == "MISSING_CREDENTIALS"
        bad = (("authorization", "Bearer kbm_01jabcdefghjkmnpqrstvwxyz0_nope"),)
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await call(channel, method, bad)
        assert invalid.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(invalid.value).reason == "INVALID_API_KEY"


def http_bindings() -> Iterator[tuple[str, str, str, bytes | None]]:
    """(rpc, verb, path, body) of every REST binding of the public services."""
    for _, method in METHODS:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        for binding in [rule, *rule.additional_bindings]:
            verb = binding.WhichOneof("pattern")
            if verb is None or verb == "custom":
                continue
            path = re.sub(r"\{[^}]*\}", "some-id", getattr(binding, verb))
            # A raw body for HttpBody fields (uploads), else a JSON message.
            body = None if not binding.body else b"hello" if binding.body == "file" else b"{}"
            yield f"{method.name}:{verb.upper()} {path}", verb.upper(), path, body


BINDINGS = list(http_bindings())


def test_the_public_services_have_rest_bindings() -> None:
    assert len(BINDINGS) >= len(METHODS)  # the enumeration found them


@pytest.mark.parametrize(
    ("verb", "path", "body"), [b[1:] for b in BINDINGS], ids=[b[0] for b in BINDINGS]
)
async def test_every_rest_route_without_credentials_is_401(
    auth_stack: Stack, verb: str, path: str, body: bytes | None
) -> None:
    async with aiohttp.ClientSession(base_url=auth_stack.envoy_http_url) as session:
        for headers in ({}, {"Authorization": "Bearer kbm_01jabcdefghjkmnpqrstvwxyz0_nope"}):
            async with session.request(verb, path, data=body, headers=headers) as response:
                text = await response.text()
                assert response.status == 401, (response.status, text)
                assert "UNAUTHENTICATED" in text or "API key" in text or "credentials" in text


async def test_a_key_opens_both_services_directly_and_through_envoy(auth_stack: Stack) -> None:
    key = auth_stack.new_key("acme", "ci")
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(auth_stack.ks_address) as channel:
        kb = await kn_grpc.KnowledgeServiceStub(channel).CreateKnowledgeBase(
            kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name="auth-direct")),
            metadata=metadata,
        )
    async with grpc.aio.insecure_channel(auth_stack.envoy_grpc_address) as channel:
        page = await tm_grpc.TaskManagerServiceStub(channel).ListTasks(
            tm.ListTasksRequest(knowledge_base_id=kb.id), metadata=metadata
        )
        assert list(page.tasks) == []
    # REST: Envoy's transcoder passes the Authorization header on as metadata.
    async with aiohttp.ClientSession(base_url=auth_stack.envoy_http_url) as session:
        headers = {"Authorization": f"Bearer {key}"}
        async with session.get(f"/api/v1/knowledge-bases/{kb.id}", headers=headers) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["name"] == "auth-direct"
        async with session.post(
            f"/api/v1/knowledge-bases/{kb.id}/documents:upload?filename=a.txt",
            data=b"hello tenants",
            headers={**headers, "Content-Type": "text/plain"},
        ) as response:
            assert response.status == 200, await response.text()
            answer = await response.json()
            task_id = answer.get("task_id") or answer["taskId"]
        async with session.get(f"/api/v1/tasks/{task_id}", headers=headers) as response:
            assert response.status == 200, await response.text()


async def test_a_revoked_key_stops_working_at_once(auth_stack: Stack) -> None:
    from redis.asyncio import Redis

    from services.common.auth import ApiKeys

    key = auth_stack.new_key("revoking")
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(auth_stack.ks_address) as channel:
        stub = kn_grpc.KnowledgeServiceStub(channel)
        await stub.ListKnowledgeBases(kn.ListKnowledgeBasesRequest(), metadata=metadata)
        parsed = parse_key(key)
        assert parsed is not None
        client = Redis.from_url(auth_stack.redis_url)
        try:
            assert await ApiKeys(client).revoke(parsed[0])
        finally:
            await client.aclose()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListKnowledgeBases(kn.ListKnowledgeBasesRequest(), metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error_info(refused.value).reason == "INVALID_API_KEY"


async def test_a_key_with_a_wrong_secret_is_refused(auth_stack: Stack) -> None:
    key = auth_stack.new_key("secrets")
    forged = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    async with grpc.aio.insecure_channel(auth_stack.ks_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await kn_grpc.KnowledgeServiceStub(channel).ListKnowledgeBases(
                kn.ListKnowledgeBasesRequest(), metadata=(("authorization", f"Bearer {forged}"),)
            )
    assert error_info(refused.value).reason == "INVALID_API_KEY"


async def test_health_and_reflection_stay_open(auth_stack: Stack) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for target in (auth_stack.tm_address, auth_stack.ks_address):
        async with grpc.aio.insecure_channel(target) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest()
            )
            assert answer.status == health_pb2.HealthCheckResponse.SERVING

            async def ask() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
                yield reflection_pb2.ServerReflectionRequest(list_services="")

            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            async for reply in stub.ServerReflectionInfo(ask()):
                assert reply.list_services_response.service
                break


async def test_a_worker_token_cannot_call_tenant_rpcs(auth_stack: Stack) -> None:
    metadata = (("authorization", f"Bearer {DEV_WORKER_TOKEN}"),)
    async with grpc.aio.insecure_channel(auth_stack.tm_address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await tm_grpc.TaskManagerServiceStub(channel).ListTasks(
                tm.ListTasksRequest(), metadata=metadata
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(refused.value).reason == "INVALID_API_KEY"


async def test_a_tenant_key_cannot_open_a_worker_stream(auth_stack: Stack) -> None:
    key = auth_stack.new_key("not-a-worker")

    async def hello() -> AsyncIterator[wk.ConnectRequest]:
        yield wk.ConnectRequest(
            hello=wk.ConnectRequest.Hello(worker_id="intruder", max_concurrency=1)
        )

    async with grpc.aio.insecure_channel(auth_stack.tm_address) as channel:
        stream = wk_grpc.WorkerServiceStub(channel).Connect(
            hello(), metadata=(("authorization", f"Bearer {key}"),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stream:
                pass
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(refused.value).reason == "WORKER_UNAUTHENTICATED"


def test_the_admin_command_creates_lists_and_revokes_keys(auth_stack: Stack) -> None:
    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.admin", "--redis-url", auth_stack.redis_url, *args],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )

    created = admin("keys", "create", "--tenant", "cli-tenant", "--name", "laptop")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    parsed = parse_key(key)
    assert parsed is not None
    listed = admin("keys", "list", "--tenant", "cli-tenant")
    assert parsed[0] in listed.stdout
    assert "laptop" in listed.stdout
    assert parsed[1] not in listed.stdout  # never the secret
    assert admin("keys", "create", "--tenant", "Bad:Tenant").returncode == 2
    revoked = admin("keys", "revoke", parsed[0])
    assert revoked.returncode == 0, revoked.stderr
    assert parsed[0] not in admin("keys", "list").stdout
    assert admin("keys", "revoke", parsed[0]).returncode == 1


async def test_the_knowledge_service_cancels_tasks_with_the_callers_key(auth_stack: Stack) -> None:
    """DeleteDocument cancels the pending task through the Task Manager, on the
    caller's behalf (its credentials are forwarded)."""
    key = auth_stack.new_key("forwarding")
    metadata = (("authorization", f"Bearer {key}"),)
    async with (
        grpc.aio.insecure_channel(auth_stack.ks_address) as ks_channel,
        grpc.aio.insecure_channel(auth_stack.tm_address) as tm_channel,
    ):
        knowledge = kn_grpc.KnowledgeServiceStub(ks_channel)
        tasks = tm_grpc.TaskManagerServiceStub(tm_channel)
        kb = await knowledge.CreateKnowledgeBase(
            kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name="forwarded")),
            metadata=metadata,
        )
        uploaded = await tasks.Upload(
            upload_messages(b"to be deleted", knowledge_base_id=kb.id, filename="d.txt"),
            metadata=metadata,
        )
        await knowledge.DeleteDocument(
            kn.DeleteDocumentRequest(knowledge_base_id=kb.id, document_id=uploaded.document_id),
            metadata=metadata,
        )
        task = await tasks.GetTask(tm.GetTaskRequest(task_id=uploaded.task_id), metadata=metadata)
        assert task.state == tm.Task.STATE_CANCELLED


@pytest.mark.parametrize("kind", ["task_manager", "knowledge"])
def test_auth_off_refuses_a_non_loopback_address(
    start_service: ServiceFactory, kind: ServiceKind
) -> None:
    prefix = "KBMESH_TASK_MANAGER_" if kind == "task_manager" else "KBMESH_KNOWLEDGE_"
    with pytest.raises(StartError) as refused:
        start_service(
            kind,
            task_manager_address="127.0.0.1:1",
            env={f"{prefix}GRPC__HOST": "0.0.0.0"},
            timeout=30,
        )
    assert "auth.mode=off is only allowed on a loopback address" in str(refused.value)


def test_auth_off_on_loopback_says_so_loudly(start_service: ServiceFactory) -> None:
    service = start_service("task_manager")
    assert "AUTHENTICATION IS OFF" in service.log_path.read_text()
