"""Streamed PUT benchmark: S3's time after an upload's last byte, two ways.

The Task Manager answers an upload once its object is in S3, so what S3 still
has to do after the last byte is part of the answer's latency. This measures
that part directly against SeaweedFS (no Task Manager), for clients that send
their bytes over time:

- baseline, "one PUT after the last byte": the bytes are kept until the last
  one arrives, then PUT in one signed request (what the Task Manager does for
  an upload of undeclared size up to one part);
- "streamed": the PUT starts with the first byte and carries each piece as it
  arrives, with a trailing CRC32C (s3_put.StreamedPut: what the Task Manager
  does when the size is declared, as the SDK declares it).

Two workloads: 100 clients each sending 16-512 KiB files at 256 KiB/s (the
ack phase of bench/upload.py), and 20 clients each sending 3-6 MiB documents
at 2 MiB/s. The modes alternate, three rounds each; the figures pool them.

    .venv/bin/python bench/streamed_put.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import percentile
from devstack import servers
from services.task_manager.adapters.s3_put import SignedPut, open_signed_put

KIB = 1024
MIB = 1024 * KIB
PIECE = 64 * KIB  # what a client sends at a time
BLOCK = os.urandom(8 * MIB)


@dataclass(frozen=True)
class Workload:
    name: str
    clients: int
    files_per_client: int
    smallest: int
    largest: int
    rate: int  # bytes/s per client


WORKLOADS = (
    Workload("100 clients, 16-512 KiB files at 256 KiB/s", 100, 5, 16 * KIB, 512 * KIB, 256 * KIB),
    Workload("20 clients, 3-6 MiB documents at 2 MiB/s", 20, 3, 3 * MIB, 6 * MIB, 2 * MIB),
)


async def arriving(data: bytes, rate: int) -> AsyncIterator[bytes]:
    """`data` in pieces, each when a client at `rate` would have sent it."""
    for start in range(0, len(data), PIECE):
        piece = data[start : start + PIECE]
        await asyncio.sleep(len(piece) / rate)
        yield piece


async def one_put_after(signed: SignedPut, key: str, data: bytes, rate: int) -> float:
    pieces = [piece async for piece in arriving(data, rate)]
    last_byte = time.perf_counter()
    sha256 = hashlib.sha256(data).hexdigest()
    await signed.put(key, pieces, "application/octet-stream", sha256)
    return time.perf_counter() - last_byte


async def streamed(signed: SignedPut, key: str, data: bytes, rate: int) -> float:
    put = signed.stream(key, len(data), "application/octet-stream")
    try:
        async for piece in arriving(data, rate):
            put.send(piece)
        last_byte = time.perf_counter()
        await put.finish()
    except BaseException:
        await put.abort()
        raise
    return time.perf_counter() - last_byte


BASELINE = "one PUT after the last byte"
MODES = {BASELINE: one_put_after, "streamed": streamed}


async def run(signed: SignedPut, workload: Workload, mode: str, seed: int) -> list[float]:
    """Seconds from each file's last byte to S3's answer."""
    rng = random.Random(seed)
    send = MODES[mode]

    async def client(c: int) -> list[float]:
        await asyncio.sleep(rng.random())
        latencies = []
        for f in range(workload.files_per_client):
            size = rng.randint(workload.smallest, workload.largest)
            start = rng.randrange(len(BLOCK) - size)
            data = os.urandom(16) + BLOCK[start : start + size]
            key = f"bench/{mode.split()[0]}/{c}-{f}-{time.time_ns()}"
            latencies.append(await send(signed, key, data, workload.rate))
        return latencies

    per_client = await asyncio.gather(*(client(c) for c in range(workload.clients)))
    return [latency for latencies in per_client for latency in latencies]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per mode and workload")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kbmesh-bench-") as tmp, ExitStack() as closer:
        _, weed = servers.start_storage(Path(tmp), closer)
        settings = weed.s3.for_service()
        async with open_signed_put(settings, connections=256) as signed:
            results: dict[tuple[str, str], list[float]] = {}
            for workload in WORKLOADS:
                warm_up = Workload("warm-up", 10, 1, 16 * KIB, 64 * KIB, 1024 * KIB)
                for mode in MODES:
                    await run(signed, warm_up, mode, 0)
                for round_ in range(args.rounds):
                    # Alternate which mode goes first: the machine drifts.
                    order = list(MODES) if round_ % 2 == 0 else list(reversed(MODES))
                    for mode in order:
                        latencies = await run(signed, workload, mode, seed=round_)
                        results.setdefault((workload.name, mode), []).extend(latencies)
    print("S3 (SeaweedFS) time from a file's last byte to its object stored, same machine:")
    for workload in WORKLOADS:
        print(f"  {workload.name}:")
        baseline = statistics.median(results[(workload.name, BASELINE)])
        for mode in MODES:
            latencies = results[(workload.name, mode)]
            p50 = statistics.median(latencies)
            print(
                f"    {mode:28s} p50 {p50 * 1000:6.1f} ms  p99 "
                f"{percentile(latencies, 99) * 1000:6.1f} ms  ({len(latencies)} files)"
                + ("  (baseline)" if mode == BASELINE else f"  p50 {baseline / p50:.1f}x shorter")
            )


if __name__ == "__main__":
    asyncio.run(main())
