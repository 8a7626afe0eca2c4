"""What authentication costs per call: GetTask on a Task Manager with API keys
vs the same call on a Task Manager with auth off, same Redis, same machine.

Each key check is one Redis HMGET and a SHA-256 (no cache, so revocation is
immediate). Calls alternate between the two servers in rounds, so machine
noise hits both alike; the ratio of the medians is the answer.

    .venv/bin/python bench/auth.py [--calls 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
from redis.asyncio import Redis

from devstack import servers
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.common.auth import ApiKeys


def start(workdir: Path, closer: ExitStack) -> tuple[str, str, str]:
    redis, weed = servers.start_storage(workdir, closer)
    addresses = []
    for mode in ("api_keys", "off"):
        service = closer.enter_context(
            servers.start_service(
                "task_manager",
                port=servers.find_free_port(),
                redis_url=redis.url,
                s3=weed.s3,
                log_path=workdir / f"tm-{mode}.log",
                extra_env={"KBMESH_TASK_MANAGER_AUTH__MODE": mode},
            )
        )
        addresses.append(service.address)
    return redis.url, addresses[0], addresses[1]


async def measure(redis_url: str, with_auth: str, without: str, calls: int) -> None:
    client = Redis.from_url(redis_url)
    _, key = await ApiKeys(client).create("bench")
    await client.aclose()
    metadata = (("authorization", f"Bearer {key}"),)
    request = tm.GetTaskRequest(task_id="01jzzzzzzzzzzzzzzzzzzzzzzz")  # NOT_FOUND: no record
    times: dict[str, list[float]] = {"auth": [], "off": []}
    async with (
        grpc.aio.insecure_channel(with_auth) as a,
        grpc.aio.insecure_channel(without) as b,
    ):
        stubs = {
            "auth": (tm_grpc.TaskManagerServiceStub(a), metadata),
            "off": (tm_grpc.TaskManagerServiceStub(b), ()),
        }
        for round_ in range(calls // 50 + 5):
            for name, (stub, md) in stubs.items():
                for _ in range(50):
                    start = time.perf_counter()
                    try:
                        await stub.GetTask(request, metadata=md)
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() != grpc.StatusCode.NOT_FOUND:
                            raise
                    if round_ >= 5:  # warm-up rounds are not counted
                        times[name].append((time.perf_counter() - start) * 1000)
    auth, off = statistics.median(times["auth"]), statistics.median(times["off"])
    print(f"GetTask median over {len(times['auth'])} calls each:")
    print(f"  auth off:      {off:.3f} ms")
    print(f"  API key auth:  {auth:.3f} ms")
    print(f"  ratio:         {auth / off:.2f}x  (+{auth - off:.3f} ms per call)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kbmesh-bench-") as tmp, ExitStack() as closer:
        redis_url, with_auth, without = start(Path(tmp), closer)
        asyncio.run(measure(redis_url, with_auth, without, args.calls))


if __name__ == "__main__":
    main()
