"""A 1 GB raw-body upload through Envoy streams: Envoy's memory stays flat.

The RSS growth is printed and written to test-artifacts/gateway-upload-rss.json;
the bound asserted (256 MiB) is generous on purpose: a buffering gateway would
grow by the whole gigabyte."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Stack

# A timeout, not a speed check: 1 GiB on a loaded machine may take minutes.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
GIB = 1 << 30
MIB = 1 << 20


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


async def test_one_gigabyte_upload_through_envoy(stack: Stack, artifacts: Path) -> None:
    envoy_pid = stack.envoy.process.pid
    block = os.urandom(MIB)
    digest = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for i in range(GIB // MIB):
            piece = block[i % 997 :] + block[: i % 997]
            digest.update(piece)
            yield piece

    async with aiohttp.ClientSession(base_url=stack.envoy_http_url) as http:
        async with http.post(
            "/api/v1/knowledge-bases", json={"name": "big-" + os.urandom(4).hex()}
        ) as response:
            kb = await response.json()
        before = rss_bytes(envoy_pid)
        peak = before
        done = asyncio.Event()

        async def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, rss_bytes(envoy_pid))
                await asyncio.sleep(0.1)

        sampler = asyncio.create_task(sample())
        try:
            async with http.post(
                f"/api/v1/knowledge-bases/{kb['id']}/documents:upload?filename=big.bin",
                data=body(),
                headers={"Content-Type": "application/octet-stream"},
                timeout=aiohttp.ClientTimeout(total=None, sock_read=600),
            ) as response:
                answer = await response.json()
                status = response.status
        finally:
            done.set()
            await sampler
        peak = max(peak, rss_bytes(envoy_pid))

    assert status == 200, answer
    assert int(answer["task"]["size_bytes"]) == GIB
    assert answer["task"]["sha256"] == digest.hexdigest()
    growth = peak - before
    record = {
        "upload_bytes": GIB,
        "envoy_rss_before_bytes": before,
        "envoy_rss_peak_bytes": peak,
        "envoy_rss_growth_bytes": growth,
        "envoy_rss_growth_mib": round(growth / MIB, 1),
    }
    (artifacts / "gateway-upload-rss.json").write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"\n1 GiB upload through Envoy: Envoy RSS grew {growth / MIB:.1f} MiB "
        f"({before / MIB:.1f} -> {peak / MIB:.1f} MiB)"
    )
    assert growth < 256 * MIB, record
