"""Dispatch benchmark: no-op tasks through the Task Manager's worker protocol vs Celery.

Starts its own Redis, SeaweedFS (the Task Manager needs its bucket), a Task
Manager and N knowledge worker processes (`python -m services.knowledge.worker`
with the no-op SleepHandler, concurrency C each) on free ports (devstack),
then, on the same machine and the same Redis server:

1. enqueue -> assigned latency: tasks enqueued one at a time, a few ms apart;
   for each, the time from the enqueue call to the handler starting on a
   worker (wall clock, same machine). Target p50 <= 5 ms.
2. throughput: T tasks enqueued as fast as the client can, until the last
   one SUCCEEDED, in tasks/s.

Enqueueing is `RedisTaskStore.create_ingestion`: what an Upload does once the
bytes are in S3 (the S3 upload itself is bench/upload.py's subject). Then the
same two measurements with Celery (Redis broker and result backend on the same
Redis server, prefork pool with N processes, default settings, a task that
returns its start time), and the ratios.

    .venv/bin/python bench/dispatch.py [--tasks 5000] [--workers 2] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import percentile
from devstack import servers
from services.common import redis_keys
from services.common.ids import new_id
from services.task_manager.adapters.redis_store import RedisTaskStore
from services.task_manager.domain.model import Task, TaskState

RECORDS = "bench:dispatch:starts"
NOOP = "services.knowledge.worker.handlers:SleepHandler"

CELERY_APP = """
import os, time
from celery import Celery

app = Celery("noop", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BACKEND"])


@app.task(name="noop")
def noop(enqueued):
    return time.time()
"""


@dataclass(frozen=True)
class Figures:
    latencies_ms: list[float]
    throughput: float
    enqueue_rate: float


# --- kbmesh ------------------------------------------------------------------------------------


class Kbmesh:
    """Enqueues tasks the way an upload does, and reads what the workers recorded."""

    def __init__(self, redis: Redis, kb: str) -> None:
        self.redis = redis
        self.store = RedisTaskStore(redis)
        self.kb = kb
        self.enqueued: dict[str, float] = {}

    async def enqueue(self) -> str:
        now = time.time()
        task = Task(
            id=new_id(),
            knowledge_base_id=self.kb,
            document_id=new_id(),
            filename="noop.txt",
            content_type="text/plain",
            size_bytes=1,
            sha256=os.urandom(32).hex(),
            object_key="bench/noop",
            state=TaskState.PENDING,
            create_time_ms=int(now * 1000),
            update_time_ms=int(now * 1000),
        )
        self.enqueued[task.id] = time.time()
        await self.store.create_ingestion(task, "", False)
        return task.id

    async def succeeded(self) -> int:
        return int(await self.redis.zcard(redis_keys.kb_tasks_in_state(self.kb, "SUCCEEDED")))

    async def starts(self) -> dict[str, float]:
        raw = await self.redis.lrange(RECORDS, 0, -1)
        return {e["task_id"]: e["time"] for e in map(json.loads, raw)}


async def wait_until(check: Callable[[], Any], what: str, within: float = 120.0) -> float:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise SystemExit(f"benchmark stuck: {what}")
        await asyncio.sleep(0.005)
    return time.time()


async def enqueue_many(bench: Kbmesh, count: int, in_flight: int = 64) -> None:
    semaphore = asyncio.Semaphore(in_flight)

    async def one() -> None:
        async with semaphore:
            await bench.enqueue()

    await asyncio.gather(*(one() for _ in range(count)))


async def kbmesh_figures(bench: Kbmesh, tasks: int, latency_tasks: int, gap: float) -> Figures:
    # Warm up: connections, scripts, workers' first tasks.
    await enqueue_many(bench, 200)
    await wait_until(lambda: _at_least(bench, 200), "warm-up")
    # 1. latency, one task at a time.
    ids = []
    for _ in range(latency_tasks):
        ids.append(await bench.enqueue())
        await asyncio.sleep(gap)
    await wait_until(lambda: _at_least(bench, 200 + latency_tasks), "latency tasks")
    starts = await bench.starts()
    latencies = [(starts[t] - bench.enqueued[t]) * 1000 for t in ids]
    # 2. throughput, everything at once (64 enqueues in flight).
    done_before = await bench.succeeded()
    began = time.time()
    await enqueue_many(bench, tasks)
    enqueued = time.time()
    finished = await wait_until(lambda: _at_least(bench, done_before + tasks), "throughput")
    return Figures(latencies, tasks / (finished - began), tasks / (enqueued - began))


async def _at_least(bench: Kbmesh, count: int) -> bool:
    return await bench.succeeded() >= count


# --- Celery ------------------------------------------------------------------------------------


@contextmanager
def celery_worker(workdir: Path, broker: str, backend: str, processes: int) -> Iterator[Any]:
    from celery import Celery

    (workdir / "celery_noop.py").write_text(CELERY_APP)
    env = {**os.environ, "BENCH_BROKER": broker, "BENCH_BACKEND": backend, "PYTHONPATH": ""}
    log = (workdir / "celery.log").open("wb")
    worker = subprocess.Popen(
        [
            sys.executable, "-m", "celery", "-A", "celery_noop", "worker",
            "--pool", "prefork", "--concurrency", str(processes),
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel", "WARNING",
        ],
        cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    app = Celery("noop", broker=broker, backend=backend)
    try:
        yield app
    finally:
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
        app.close()


def celery_figures(app: Any, tasks: int, latency_tasks: int, gap: float) -> Figures:
    def send(n: int) -> list[tuple[Any, float]]:
        sent = []
        for _ in range(n):
            at = time.time()
            sent.append((app.send_task("noop", args=[at]), at))
        return sent

    def wait(results: list[tuple[Any, float]]) -> list[float]:
        return [float(r.get(timeout=120)) for r, _ in results]

    wait(send(200))  # warm up (and wait for the worker to be up)
    latencies = []
    for _ in range(latency_tasks):
        latencies.extend(send(1))
        time.sleep(gap)
    started = wait(latencies)
    latency_ms = [(s - at) * 1000 for s, (_, at) in zip(started, latencies, strict=True)]
    began = time.time()
    # Enqueue from a thread while the main thread collects: sends and completions overlap.
    batch: list[tuple[Any, float]] = []
    sender = threading.Thread(target=lambda: batch.extend(send(tasks)))
    sender.start()
    sender.join()
    enqueued = time.time()
    wait(batch)
    finished = time.time()
    return Figures(latency_ms, tasks / (finished - began), tasks / (enqueued - began))


# --- main --------------------------------------------------------------------------------------


async def run_kbmesh(
    args: argparse.Namespace, redis_url: str, closer: ExitStack, workdir: Path
) -> Figures:
    redis = Redis.from_url(redis_url)
    kb = new_id()
    await redis.hset(redis_keys.knowledge_base(kb), mapping={"id": kb, "name": "bench"})
    weed = closer.enter_context(
        servers.start_seaweedfs(
            ports=servers.WeedPorts.allocate(),
            data_dir=workdir / "s3",
            log_path=workdir / "s3.log",
            config_dir=workdir / "s3-config",
            bucket="kbmesh-bench",
            stop_timeout=2.0,  # throwaway data: no need for weed's slow clean stop
        )
    )
    tm = closer.enter_context(
        servers.start_service(
            "task_manager",
            port=servers.find_free_port(),
            redis_url=redis_url,
            s3=weed.s3,
            log_path=workdir / "tm.log",
            log_level="WARNING",
            extra_env=servers.AUTH_OFF,
        )
    )
    for i in range(args.workers):
        closer.enter_context(
            servers.start_worker(
                redis_url=redis_url,
                s3=weed.s3,
                task_manager_address=tm.address,
                log_path=workdir / f"worker-{i}.log",
                worker_id=f"bench-{i}",
                concurrency=args.concurrency,
                handler=NOOP,
                handler_options={"record_key": RECORDS, "record_events": "start"},
                log_level="INFO",  # per-task lines are DEBUG
            )
        )
    try:
        return await kbmesh_figures(Kbmesh(redis, kb), args.tasks, args.latency_tasks, args.gap)
    finally:
        await redis.aclose()


def report(name: str, f: Figures) -> None:
    print(
        f"  {name:<8} enqueue->assigned p50 {statistics.median(f.latencies_ms):6.2f} ms  "
        f"p99 {percentile(f.latencies_ms, 99):6.2f} ms   throughput {f.throughput:7.0f} tasks/s"
        f"   (enqueue alone {f.enqueue_rate:6.0f}/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000, help="tasks for the throughput run")
    parser.add_argument("--latency-tasks", type=int, default=300, help="tasks timed one by one")
    parser.add_argument("--gap", type=float, default=0.005, help="seconds between those")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (both systems)")
    parser.add_argument("--concurrency", type=int, default=16, help="tasks per kbmesh worker")
    parser.add_argument("--no-celery", action="store_true", help="skip the Celery baseline")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kbmesh-bench-") as tmp, ExitStack() as closer:
        workdir = Path(tmp)
        redis = closer.enter_context(
            servers.start_redis(
                port=servers.find_free_port(),
                data_dir=workdir / "redis",
                log_path=workdir / "r.log",
            )
        )
        with ExitStack() as ours:
            mesh = asyncio.run(run_kbmesh(args, redis.url_for(0), ours, workdir))
        celery = None
        if not args.no_celery:
            with celery_worker(workdir, redis.url_for(1), redis.url_for(2), args.workers) as app:
                celery = celery_figures(app, args.tasks, args.latency_tasks, args.gap)
    print(
        f"dispatch of no-op tasks, {args.workers} worker processes, same machine and Redis "
        f"({args.latency_tasks} tasks {args.gap * 1000:.0f} ms apart for latency, "
        f"{args.tasks} at once for throughput):"
    )
    report("kbmesh", mesh)
    print(f"           (kbmesh: {args.concurrency} tasks in flight per worker)")
    if celery is not None:
        report("Celery", celery)
        p50_ratio = statistics.median(mesh.latencies_ms) / statistics.median(celery.latencies_ms)
        print(
            f"  ratio kbmesh/Celery: throughput {mesh.throughput / celery.throughput:.2f}x "
            f"(target > 1), p50 latency {p50_ratio:.2f}x (lower is better)"
        )
    print(
        f"  target enqueue->assigned p50 <= 5 ms: "
        f"{'met' if statistics.median(mesh.latencies_ms) <= 5 else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
