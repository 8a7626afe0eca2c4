"""Shared fixtures: real servers, started exactly as `make up` starts them.

Everything goes through devstack.servers, on free ports, in pytest's temporary
directories; every fixture stops what it started. A server that does not come
up raises devstack.servers.StartError, whose message ends with its log tail.

Fixtures (scope) — for type annotations import the classes from
``tests.conftest`` (e.g. ``from tests.conftest import Stack, ServiceFactory``):

``redis_server`` (session) -> RedisServer
    Redis with AOF. ``.url`` is ``redis://127.0.0.1:PORT/0``, ``.url_for(db)``
    another database. Shared by the session: use unique keys, or your own
    server (``start_redis``).
``s3_server`` (session) -> SeaweedServer
    SeaweedFS with the S3 gateway and bucket ``kbmesh-test``. ``.s3`` is an
    S3Settings (``endpoint_url``, ``bucket``, ``access_key_id``,
    ``secret_access_key``, ``region``, ``boto3_client()``).
``start_redis`` (function) -> RedisFactory
    ``start_redis()`` starts a private Redis; ``start_redis(data_dir=d)``
    reopens the data of a stopped one (restart tests).
``new_bucket`` (function) -> BucketFactory
    ``new_bucket()`` creates an empty, uniquely named bucket on ``s3_server``
    and returns its S3Settings.
``start_service`` (function) -> ServiceFactory
    ``start_service("task_manager")``, ``start_service("knowledge",
    task_manager_address=tm.address)``: a service process against
    ``redis_server`` and ``s3_server`` (override with ``redis_url=``,
    ``s3=``; more settings with ``env={"KBMESH_TASK_MANAGER_...": ...}``).
    Returns a ServiceServer (``.address``, ``.pid``, ``.log_path``,
    ``.stop(timeout)``). Each gets its own working directory and KBMESH_HOME.
    Services run with authentication OFF (every caller is tenant
    ``default``) unless ``auth=True``: then every public RPC needs an API
    key (``api_keys`` fixture).
``start_worker`` (function) -> WorkerFactory
    ``start_worker(task_manager_address=tm.address, worker_id="w1",
    concurrency=4, handler_options={...})``: a standalone knowledge worker
    (``python -m services.knowledge.worker``) with the test handler
    (``SleepHandler``) unless ``handler=`` says otherwise; returns once it is
    connected. Returns a WorkerServer (``.pid``, ``.log_path``, ``.stop()``).
    Services and workers started by these fixtures share the dev worker token
    (devstack.servers.DEV_WORKER_TOKEN); Knowledge Services run without their
    in-process worker unless ``env`` enables it
    (``KBMESH_KNOWLEDGE_WORKER__ENABLED=true``).
``start_envoy`` (function) -> EnvoyFactory
    ``start_envoy(task_manager=[addr, ...], knowledge=[addr, ...])`` renders
    gateway/envoy.yaml for those upstreams (several = replicas) and returns
    an EnvoyServer (``.http_url``, ``.admin_url``, ``.grpc_address``);
    ``tls=EnvoyTls(port, cert_file, key_file)`` adds a TLS listener with the
    same routes (``.https_url``); ``upstream_tls=EnvoyUpstreamTls(ca, cert,
    key)`` makes Envoy reach TLS (mTLS) services.
``stack`` (module) -> Stack
    The whole mesh for one test module: a private Redis, a fresh bucket on
    ``s3_server``, a Task Manager, a Knowledge Service and Envoy in front of
    both. Tests of one module share it (and its data). Authentication off.
``auth_stack`` (module) -> Stack
    The same with authentication ON (``auth.mode=api_keys``);
    ``auth_stack.new_key("tenant")`` issues an API key in its Redis.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from redis.asyncio import Redis

from devstack import servers
from devstack.servers import (
    DEFAULT_DESCRIPTOR,
    EnvoyServer,
    EnvoyTls,
    EnvoyUpstreamTls,
    RedisServer,
    S3Settings,
    SeaweedServer,
    ServerHandle,
    ServiceKind,
    ServiceServer,
    WorkerServer,
)
from kbmesh.client import grpc_fix
from services.common.auth import ApiKeys

# The tests check the statuses servers send. grpc.aio's client can replace one
# with its own INTERNAL when a stream ends while it writes (grpc/grpc#36066);
# the tests, like the SDK and the services, run with kbmesh's fix for that.
grpc_fix.install()

SESSION_BUCKET = "kbmesh-test"
H = TypeVar("H", bound=ServerHandle)
_bucket_numbers = itertools.count(1)


class Launcher:
    """Starts servers under one temporary directory; close() stops them all."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self._handles: list[ServerHandle] = []
        self._counter = itertools.count(1)

    def workdir(self, label: str) -> Path:
        path = self.base / f"{label}-{next(self._counter)}"
        path.mkdir(parents=True)
        return path

    def track(self, handle: H) -> H:
        self._handles.append(handle)
        return handle

    def close(self) -> None:
        """Stop everything started here, newest first."""
        while self._handles:
            self._handles.pop().stop()


class RedisFactory:
    """``start_redis(data_dir=None, port=None)`` -> a private RedisServer."""

    def __init__(self, launcher: Launcher) -> None:
        self._launcher = launcher

    def __call__(self, *, data_dir: Path | None = None, port: int | None = None) -> RedisServer:
        here = self._launcher.workdir("redis")
        return self._launcher.track(
            servers.start_redis(
                port=port or servers.find_free_port(),
                data_dir=data_dir or here / "data",
                log_path=here / "redis.log",
            )
        )


class BucketFactory:
    """``new_bucket()`` -> S3Settings of a new, empty bucket on the session S3."""

    def __init__(self, s3_server: SeaweedServer) -> None:
        self._s3 = s3_server.s3

    def __call__(self, prefix: str = "kbmesh-t") -> S3Settings:
        settings = S3Settings(
            endpoint_url=self._s3.endpoint_url,
            bucket=f"{prefix}-{next(_bucket_numbers)}",
            access_key_id=self._s3.access_key_id,
            secret_access_key=self._s3.secret_access_key,
            region=self._s3.region,
        )
        servers.ensure_bucket(settings, probe_write=False)
        return settings


class ServiceFactory:
    """``start_service(kind, ...)`` -> a running ServiceServer (see module doc)."""

    def __init__(self, launcher: Launcher, *, redis_url: str, s3: S3Settings) -> None:
        self._launcher = launcher
        self.redis_url = redis_url
        self.s3 = s3

    def __call__(
        self,
        kind: ServiceKind,
        *,
        redis_url: str | None = None,
        s3: S3Settings | None = None,
        task_manager_address: str | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        name: str | None = None,
        log_level: str = "DEBUG",
        timeout: float = 60.0,
        auth: bool = False,
    ) -> ServiceServer:
        here = self._launcher.workdir(name or kind)
        mode = "api_keys" if auth else "off"
        return self._launcher.track(
            servers.start_service(
                kind,
                port=port or servers.find_free_port(),
                redis_url=redis_url or self.redis_url,
                s3=s3 or self.s3,
                task_manager_address=task_manager_address,
                log_path=here / f"{name or kind}.log",
                log_level=log_level,
                extra_env={
                    "KBMESH_HOME": str(here / "home"),
                    # Tasks stay queued unless a test starts workers on purpose.
                    "KBMESH_KNOWLEDGE_WORKER__ENABLED": "false",
                    # Tests call without credentials unless they test auth.
                    "KBMESH_TASK_MANAGER_AUTH__MODE": mode,
                    "KBMESH_KNOWLEDGE_AUTH__MODE": mode,
                    **(env or {}),
                },
                cwd=here,
                name=name,
                timeout=timeout,
            )
        )


TEST_HANDLER = "services.knowledge.worker.handlers:SleepHandler"


class WorkerFactory:
    """``start_worker(task_manager_address=..., ...)`` -> a connected WorkerServer."""

    def __init__(self, launcher: Launcher, *, redis_url: str, s3: S3Settings) -> None:
        self._launcher = launcher
        self.redis_url = redis_url
        self.s3 = s3

    def __call__(
        self,
        *,
        task_manager_address: str,
        worker_id: str = "",
        concurrency: int = 4,
        handler: str = TEST_HANDLER,
        handler_options: Mapping[str, str] | None = None,
        redis_url: str | None = None,
        s3: S3Settings | None = None,
        env: Mapping[str, str] | None = None,
        log_level: str = "DEBUG",
        wait_connected: bool = True,
        timeout: float = 60.0,
    ) -> WorkerServer:
        label = worker_id or "worker"
        here = self._launcher.workdir(label)
        return self._launcher.track(
            servers.start_worker(
                redis_url=redis_url or self.redis_url,
                s3=s3 or self.s3,
                task_manager_address=task_manager_address,
                log_path=here / f"{label}.log",
                worker_id=worker_id,
                concurrency=concurrency,
                handler=handler,
                handler_options=handler_options or {},
                log_level=log_level,
                extra_env={"KBMESH_HOME": str(here / "home"), **(env or {})},
                cwd=here,
                name=label,
                wait_connected=wait_connected,
                timeout=timeout,
            )
        )


class EnvoyFactory:
    """``start_envoy(task_manager=[...], knowledge=[...])`` -> a running EnvoyServer."""

    def __init__(self, launcher: Launcher) -> None:
        self._launcher = launcher

    def __call__(
        self,
        *,
        task_manager: Sequence[str],
        knowledge: Sequence[str],
        descriptor: Path = DEFAULT_DESCRIPTOR,
        tls: EnvoyTls | None = None,
        upstream_tls: EnvoyUpstreamTls | None = None,
    ) -> EnvoyServer:
        here = self._launcher.workdir("envoy")
        return self._launcher.track(
            servers.start_envoy(
                listen_port=servers.find_free_port(),
                admin_port=servers.find_free_port(),
                upstreams={"task_manager": list(task_manager), "knowledge": list(knowledge)},
                run_dir=here,
                log_path=here / "envoy.log",
                descriptor=descriptor,
                concurrency=1,
                tls=tls,
                upstream_tls=upstream_tls,
            )
        )


@dataclass(frozen=True)
class Stack:
    """The running mesh of the ``stack`` fixture."""

    redis: RedisServer
    s3: S3Settings
    task_manager: ServiceServer
    knowledge: ServiceServer
    envoy: EnvoyServer

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def new_key(self, tenant: str, name: str = "") -> str:
        """Issues an API key for `tenant` in this stack's Redis (auth_stack)."""
        return issue_key(self.redis.url, tenant, name)

    @property
    def s3_endpoint_url(self) -> str:
        return self.s3.endpoint_url

    @property
    def s3_bucket(self) -> str:
        return self.s3.bucket

    @property
    def s3_access_key_id(self) -> str:
        return self.s3.access_key_id

    @property
    def s3_secret_access_key(self) -> str:
        return self.s3.secret_access_key

    @property
    def s3_region(self) -> str:
        return self.s3.region

    @property
    def tm_address(self) -> str:
        """Task Manager gRPC ``host:port`` (direct, not through Envoy)."""
        return self.task_manager.address

    @property
    def ks_address(self) -> str:
        """Knowledge Service gRPC ``host:port`` (direct)."""
        return self.knowledge.address

    @property
    def envoy_http_url(self) -> str:
        """``http://127.0.0.1:PORT``: REST and gRPC-web."""
        return self.envoy.http_url

    @property
    def envoy_grpc_address(self) -> str:
        """``127.0.0.1:PORT``: native gRPC through Envoy."""
        return self.envoy.grpc_address

    @property
    def envoy_admin_url(self) -> str:
        return self.envoy.admin_url


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A Redis (AOF on) shared by the whole session."""
    launcher = Launcher(tmp_path_factory.mktemp("redis-session"))
    try:
        yield RedisFactory(launcher)()
    finally:
        launcher.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """SeaweedFS + S3 gateway with bucket ``kbmesh-test``, shared by the session."""
    base = tmp_path_factory.mktemp("s3-session")
    server = servers.start_seaweedfs(
        ports=servers.WeedPorts.allocate(),
        data_dir=base / "data",
        config_dir=base / "config",
        log_path=base / "seaweedfs.log",
        bucket=SESSION_BUCKET,
        volume_max=200,  # each bucket takes 2 volumes: room for ~100 buckets
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisFactory]:
    """Factory for private Redis servers, stopped after the test."""
    launcher = Launcher(tmp_path_factory.mktemp("redis"))
    try:
        yield RedisFactory(launcher)
    finally:
        launcher.close()


@pytest.fixture
def new_bucket(s3_server: SeaweedServer) -> BucketFactory:
    """Factory for fresh buckets on the session S3 (left in place afterwards)."""
    return BucketFactory(s3_server)


@pytest.fixture
def start_service(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    s3_server: SeaweedServer,
) -> Iterator[ServiceFactory]:
    """Factory for Task Manager / Knowledge processes, stopped after the test."""
    launcher = Launcher(tmp_path_factory.mktemp("services"))
    try:
        yield ServiceFactory(launcher, redis_url=redis_server.url, s3=s3_server.s3)
    finally:
        launcher.close()


@pytest.fixture
def start_worker(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisServer,
    s3_server: SeaweedServer,
) -> Iterator[WorkerFactory]:
    """Factory for standalone knowledge workers, stopped (SIGTERM) after the test."""
    launcher = Launcher(tmp_path_factory.mktemp("workers"))
    try:
        yield WorkerFactory(launcher, redis_url=redis_server.url, s3=s3_server.s3)
    finally:
        launcher.close()


@pytest.fixture
def start_envoy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyFactory]:
    """Factory for Envoys rendered for given upstreams, stopped after the test."""
    launcher = Launcher(tmp_path_factory.mktemp("envoy"))
    try:
        yield EnvoyFactory(launcher)
    finally:
        launcher.close()


def issue_key(redis_url: str, tenant: str, name: str = "") -> str:
    """A new API key for `tenant`, written straight to the Redis at `redis_url`."""

    async def create() -> str:
        client = Redis.from_url(redis_url)
        try:
            _, key = await ApiKeys(client).create(tenant, name)
            return key
        finally:
            await client.aclose()

    # In a thread of its own: callable from async tests (their loop is running).
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, create()).result()


def _start_stack(
    tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedServer, *, auth: bool
) -> Iterator[Stack]:
    launcher = Launcher(tmp_path_factory.mktemp("stack"))
    try:
        redis = RedisFactory(launcher)()
        s3 = BucketFactory(s3_server)("kbmesh-stack")
        services = ServiceFactory(launcher, redis_url=redis.url, s3=s3)
        tm = services("task_manager", auth=auth)
        ks = services("knowledge", task_manager_address=tm.address, auth=auth)
        envoy = EnvoyFactory(launcher)(task_manager=[tm.address], knowledge=[ks.address])
        yield Stack(redis=redis, s3=s3, task_manager=tm, knowledge=ks, envoy=envoy)
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedServer) -> Iterator[Stack]:
    """Redis + bucket + Task Manager + Knowledge Service + Envoy, per test module."""
    yield from _start_stack(tmp_path_factory, s3_server, auth=False)


@pytest.fixture(scope="module")
def auth_stack(
    tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedServer
) -> Iterator[Stack]:
    """The ``stack`` with authentication on: calls need ``new_key(tenant)`` keys."""
    yield from _start_stack(tmp_path_factory, s3_server, auth=True)
