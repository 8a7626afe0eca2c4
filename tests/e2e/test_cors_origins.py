"""CORS limited to configured origins (KBMESH_ENVOY_CORS_ORIGINS in `make up`)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from devstack import servers
from tests.conftest import Launcher, Stack

pytestmark = pytest.mark.integration
ALLOWED = "https://kb.example.com"


@pytest.fixture
async def http(
    stack: Stack, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[aiohttp.ClientSession]:
    launcher = Launcher(tmp_path_factory.mktemp("cors-envoy"))
    here = launcher.workdir("envoy")
    try:
        envoy = launcher.track(
            servers.start_envoy(
                listen_port=servers.find_free_port(),
                admin_port=servers.find_free_port(),
                upstreams={"task_manager": [stack.tm_address], "knowledge": [stack.ks_address]},
                run_dir=here,
                log_path=here / "envoy.log",
                concurrency=1,
                cors_origins=[ALLOWED],
            )
        )
        async with aiohttp.ClientSession(envoy.http_url) as session:
            yield session
    finally:
        launcher.close()


async def preflight(http: aiohttp.ClientSession, origin: str) -> str | None:
    async with http.options(
        "/api/v1/knowledge-bases",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
    ) as response:
        return response.headers.get("access-control-allow-origin")


async def test_only_configured_origins_pass_cors(http: aiohttp.ClientSession) -> None:
    assert await preflight(http, ALLOWED) == ALLOWED
    assert await preflight(http, "https://evil.example") is None
    async with http.get("/api/v1/knowledge-bases", headers={"Origin": "https://evil.example"}) as r:
        assert "access-control-allow-origin" not in r.headers
