"""Fixtures of the gateway tests (beyond tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from devstack import servers
from devstack.servers import EnvoyServer, ServiceServer, UploadRateLimit
from tests.conftest import EnvoyFactory, Launcher, ServiceFactory, Stack

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@pytest.fixture
async def http(stack: Stack) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client on the stack's Envoy."""
    async with aiohttp.ClientSession(base_url=stack.envoy_http_url) as session:
        yield session


@pytest.fixture
def artifacts() -> Path:
    """test-artifacts/ (git-ignored): screenshots and measurements."""
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def limited_envoy(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyServer]:
    """An Envoy on the stack whose upload route allows 2 uploads, then 1 an hour."""
    launcher = Launcher(tmp_path_factory.mktemp("limited-envoy"))
    here = launcher.workdir("envoy")
    try:
        yield launcher.track(
            servers.start_envoy(
                listen_port=servers.find_free_port(),
                admin_port=servers.find_free_port(),
                upstreams={"task_manager": [stack.tm_address], "knowledge": [stack.ks_address]},
                run_dir=here,
                log_path=here / "envoy.log",
                concurrency=1,
                upload_rate_limit=UploadRateLimit(burst=2, per_second=1, fill_interval_s=3600),
            )
        )
    finally:
        launcher.close()


@dataclass(frozen=True)
class IngestingMesh:
    """The stack plus a Knowledge Service that runs its worker, behind its own Envoy."""

    stack: Stack
    knowledge: ServiceServer
    envoy: EnvoyServer


@pytest.fixture
def ingesting_mesh(
    stack: Stack, start_service: ServiceFactory, start_envoy: EnvoyFactory
) -> IngestingMesh:
    knowledge = start_service(
        "knowledge",
        redis_url=stack.redis_url,
        s3=stack.s3,
        name="knowledge-ingesting",
        task_manager_address=stack.tm_address,
        env={"KBMESH_KNOWLEDGE_WORKER__ENABLED": "true"},
    )
    envoy = start_envoy(task_manager=[stack.tm_address], knowledge=[knowledge.address])
    return IngestingMesh(stack=stack, knowledge=knowledge, envoy=envoy)
