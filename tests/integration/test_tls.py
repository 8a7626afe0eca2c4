"""TLS and mTLS: a Task Manager (in this process, on the real Redis and S3)
with certificates the test makes itself; plaintext is refused, workers can be
held to client certificates, and a real worker process connects over mTLS."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from devstack.servers import (
    DEV_WORKER_TOKEN,
    EnvoyTls,
    EnvoyUpstreamTls,
    RedisServer,
    SeaweedServer,
    find_free_port,
)
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from kbmesh.taskmanager.v1 import worker_pb2 as wk
from kbmesh.taskmanager.v1 import worker_pb2_grpc as wk_grpc
from services.common.settings import (
    AuthSettings,
    GrpcSettings,
    RedisSettings,
    TlsClientSettings,
)
from services.common.tls import open_channel
from services.task_manager.app import build_app
from services.task_manager.settings import DispatchSettings, TaskManagerSettings
from tests.conftest import EnvoyFactory, Stack, WorkerFactory
from tests.support import error_info

pytestmark = pytest.mark.integration


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA, a server certificate for 127.0.0.1, a client certificate from the
    CA and one from another CA."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, rogue_ca_key = _key(), _key()
    ca = _cert("kbmesh test CA", ca_key, None, ca=True)
    files: dict[str, bytes] = {"ca.pem": ca.public_bytes(serialization.Encoding.PEM)}
    for name, issuer, server in (
        ("server", ("kbmesh test CA", ca_key), True),
        ("client", ("kbmesh test CA", ca_key), False),
        ("rogue", ("rogue CA", rogue_ca_key), False),
    ):
        key = _key()
        cert = _cert(f"{name}.kbmesh.test", key, issuer, server=server)
        files[f"{name}.pem"] = cert.public_bytes(serialization.Encoding.PEM)
        files[f"{name}.key"] = _pem_key(key)
    for name, data in files.items():
        (d / name).write_bytes(data)
    return Pki(
        d / "ca.pem",
        d / "server.pem",
        d / "server.key",
        d / "client.pem",
        d / "client.key",
        d / "rogue.pem",
        d / "rogue.key",
    )


@asynccontextmanager
async def task_manager(
    redis_server: RedisServer,
    s3_server: SeaweedServer,
    pki: Pki,
    *,
    client_ca: bool = False,
) -> AsyncIterator[str]:
    s3 = s3_server.s3
    settings = TaskManagerSettings(
        grpc=GrpcSettings(
            port=0,
            tls_cert_file=str(pki.server_cert),
            tls_key_file=str(pki.server_key),
            tls_client_ca_file=str(pki.ca) if client_ca else "",
            shutdown_grace_seconds=0.5,
        ),
        redis=RedisSettings(url=SecretStr(redis_server.url)),
        s3=s3.for_service(),
        auth=AuthSettings(mode="off"),
        dispatch=DispatchSettings(worker_tokens=(DEV_WORKER_TOKEN,)),  # type: ignore[arg-type]
    )
    async with build_app(settings) as app:
        port = await app.host.start()
        await app.host.set_serving(True)
        try:
            yield f"127.0.0.1:{port}"
        finally:
            await app.host.stop()


def tls(pki: Pki, *, client: bool = False, rogue: bool = False) -> TlsClientSettings:
    if rogue:
        return TlsClientSettings(
            ca_file=str(pki.ca), cert_file=str(pki.rogue_cert), key_file=str(pki.rogue_key)
        )
    if client:
        return TlsClientSettings(
            ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key)
        )
    return TlsClientSettings(ca_file=str(pki.ca))


async def health(channel: grpc.aio.Channel) -> int:
    answer = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=10
    )
    return int(answer.status)


async def welcome(channel: grpc.aio.Channel) -> wk.ConnectResponse:
    async def hello() -> AsyncIterator[wk.ConnectRequest]:
        yield wk.ConnectRequest(hello=wk.ConnectRequest.Hello(worker_id="tls-w", max_concurrency=1))

    stream = wk_grpc.WorkerServiceStub(channel).Connect(
        hello(), metadata=(("authorization", f"Bearer {DEV_WORKER_TOKEN}"),), timeout=10
    )
    async for message in stream:
        stream.cancel()
        assert isinstance(message, wk.ConnectResponse)
        return message
    raise AssertionError("no welcome")


async def test_tls_serves_and_plaintext_is_refused(
    redis_server: RedisServer, s3_server: SeaweedServer, pki: Pki
) -> None:
    async with task_manager(redis_server, s3_server, pki) as address:
        async with open_channel(address, tls(pki)) as channel:
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
            await tm_grpc.TaskManagerServiceStub(channel).ListTasks(tm.ListTasksRequest())
            assert (await welcome(channel)).HasField("welcome")
        async with grpc.aio.insecure_channel(address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health(plain)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # A client that does not trust the server's CA does not connect either.
        untrusting = TlsClientSettings(ca_file=str(pki.rogue_cert))
        async with open_channel(address, untrusting) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as distrusted:
                await health(channel)
        assert distrusted.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mtls_refuses_clients_without_a_certificate_from_the_ca(
    redis_server: RedisServer, s3_server: SeaweedServer, pki: Pki
) -> None:
    async with task_manager(redis_server, s3_server, pki, client_ca=True) as address:
        for settings in (tls(pki), tls(pki, rogue=True)):  # none, or another CA's
            async with open_channel(address, settings) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await welcome(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        async with open_channel(address, tls(pki, client=True)) as channel:
            assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
            assert (await welcome(channel)).HasField("welcome")
            await tm_grpc.TaskManagerServiceStub(channel).ListTasks(tm.ListTasksRequest())


async def test_a_worker_process_connects_over_mtls(
    redis_server: RedisServer, s3_server: SeaweedServer, pki: Pki, start_worker: WorkerFactory
) -> None:
    async with task_manager(redis_server, s3_server, pki, client_ca=True) as address:
        prefix = "KBMESH_KNOWLEDGE_TASK_MANAGER__TLS__"
        # Returns once the worker's log shows its session (welcomed); in a thread,
        # since the Task Manager answering it runs on this event loop.
        worker = await asyncio.to_thread(
            start_worker,
            task_manager_address=address,
            worker_id="mtls-worker",
            env={
                f"{prefix}CA_FILE": str(pki.ca),
                f"{prefix}CERT_FILE": str(pki.client_cert),
                f"{prefix}KEY_FILE": str(pki.client_key),
            },
        )
        assert "mtls-worker" in worker.log_path.read_text()
        await asyncio.to_thread(worker.stop)


async def test_envoy_terminates_tls_for_browsers(
    auth_stack: Stack, start_envoy: EnvoyFactory, pki: Pki
) -> None:
    envoy = start_envoy(
        task_manager=[auth_stack.tm_address],
        knowledge=[auth_stack.ks_address],
        tls=EnvoyTls(find_free_port(), pki.server_cert, pki.server_key),
    )
    key = auth_stack.new_key("browser")
    trust = ssl.create_default_context(cafile=str(pki.ca))
    async with aiohttp.ClientSession(base_url=envoy.https_url) as session:
        path = "/api/v1/knowledge-bases"
        async with session.get(path, ssl=trust) as response:
            assert response.status == 401
        headers = {"Authorization": f"Bearer {key}"}
        async with session.get(path, ssl=trust, headers=headers) as response:
            assert response.status == 200, await response.text()
    # gRPC over the same TLS listener (ALPN h2).
    address = envoy.https_url.removeprefix("https://")
    async with open_channel(address, tls(pki)) as channel:
        await kn_grpc.KnowledgeServiceStub(channel).ListKnowledgeBases(
            kn.ListKnowledgeBasesRequest(), metadata=(("authorization", f"Bearer {key}"),)
        )
    # The TLS port does not speak plaintext.
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            async with session.get(f"http://{address}{path}"):
                pass


async def test_envoy_reaches_services_that_require_mtls(
    redis_server: RedisServer, s3_server: SeaweedServer, start_envoy: EnvoyFactory, pki: Pki
) -> None:
    """Services on TLS with client certificates required: Envoy presents one
    (EnvoyUpstreamTls) and REST works; without it the upstream is refused."""
    async with task_manager(redis_server, s3_server, pki, client_ca=True) as address:
        trusted = start_envoy(
            task_manager=[address],
            knowledge=[address],
            upstream_tls=EnvoyUpstreamTls(pki.ca, pki.client_cert, pki.client_key),
        )
        plain = start_envoy(task_manager=[address], knowledge=[address])
        path = "/api/v1/tasks/01jnotarealtask00000000000"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{trusted.http_url}{path}") as response:
                body = await response.json()
                assert response.status == 404, body  # the Task Manager answered
                assert body["details"][0]["reason"] == "TASK_NOT_FOUND"
            async with session.get(f"{plain.http_url}{path}") as response:
                assert response.status == 503


async def test_mtls_for_workers_only_on_a_port_of_their_own(
    redis_server: RedisServer, s3_server: SeaweedServer, pki: Pki
) -> None:
    """`grpc.mtls_port` requires client certificates; with
    `dispatch.require_worker_certificate` the worker stream is refused on the
    main TLS port (which asks no certificate of the gateway or the Knowledge
    Service), even with a valid worker token."""
    s3 = s3_server.s3
    settings = TaskManagerSettings(
        grpc=GrpcSettings(
            port=0,
            tls_cert_file=str(pki.server_cert),
            tls_key_file=str(pki.server_key),
            mtls_port=0,
            mtls_client_ca_file=str(pki.ca),
            shutdown_grace_seconds=0.5,
        ),
        redis=RedisSettings(url=SecretStr(redis_server.url)),
        s3=s3.for_service(),
        auth=AuthSettings(mode="off"),
        dispatch=DispatchSettings(
            worker_tokens=(DEV_WORKER_TOKEN,),  # type: ignore[arg-type]
            require_worker_certificate=True,
        ),
    )
    async with build_app(settings) as app:
        port = await app.host.start()
        await app.host.set_serving(True)
        try:
            main, workers = f"127.0.0.1:{port}", f"127.0.0.1:{app.host.mtls_port}"
            async with open_channel(main, tls(pki)) as channel:  # no client certificate
                assert await health(channel) == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await welcome(channel)
                assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert error_info(refused.value).reason == "WORKER_CERTIFICATE_REQUIRED"
            async with open_channel(workers, tls(pki, client=True)) as channel:
                assert (await welcome(channel)).HasField("welcome")
            async with open_channel(workers, tls(pki)) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as handshake:
                    await health(channel)
                assert handshake.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await app.host.stop()
