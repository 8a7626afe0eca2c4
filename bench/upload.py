"""Upload benchmark: the Task Manager against a direct S3 upload, in one run.

Starts its own Redis, SeaweedFS, Task Manager, Knowledge Service and Envoy on
free ports (devstack), then measures on the same machine, same S3:

1. baseline: a direct aioboto3 multipart upload (`upload_fileobj`) of N bytes;
2. the same bytes streamed through the Task Manager's gRPC `Upload`
   (ratio vs 1; target >= 0.9), sampling the Task Manager's RSS (target:
   growth < 64 MB for 1 GB);
3. the same bytes as a raw-body REST POST through Envoy (ratio vs 1; target
   >= 0.8);
   1-3 run `--repeat` times (3 by default) in a rotating order, since one
   SeaweedFS serves all and its speed drifts as its volumes fill; the ratios
   are those of the medians;
4. ack latency: 100 uploads in flight at once; for each, the time from the
   client's last byte to the answer (target p99 <= 50 ms), each upload
   declaring its size as the SDK does: clients paced like
   remote ones, clients flat out, and paced again while a knowledge worker
   ingests documents (parsing and embedding on the same two cores). The
   answer waits for the object to be in S3, so each phase also measures S3
   alone at the same moment (the baseline): one direct signed PUT of the
   same sizes at a time, the request the Task Manager makes after a last byte,
   50 ms apart (back to back, the probe itself added half as many PUTs again
   to SeaweedFS's load). Per phase it also prints, per upload, the CPU the
   Task Manager, SeaweedFS and the clients (this process) used and how long
   their threads waited for a CPU (run queue, /proc schedstat), and how
   busy the host's CPUs were (/proc/stat): on two shared cores that wait is
   a large part of the tail. A fixed CPU-bound loop is timed at the start
   and before the ack phases, since the host's own speed varies between
   runs. The service's own figure (from its log) is split into S3 finishing
   the object and the rest (the task record in Redis).

    .venv/bin/python bench/upload.py [--size-mb 1024] [--concurrent 100]
    .venv/bin/python bench/upload.py --ack-only   # phase 4 only, about a minute
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aioboto3
import aiohttp
import grpc
from boto3.s3.transfer import TransferConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._stats import percentile
from devstack import servers
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.task_manager.adapters.s3_put import open_signed_put

MIB = 1024 * 1024
CHUNK = MIB  # client message size (Envoy also splits REST bodies into ≤ 1 MiB)
PACED_CHUNK = 64 * 1024  # what a client on a slow link sends at a time
BLOCK = os.urandom(64 * MIB)  # repeated: S3 does not deduplicate


def chunks(size: int, chunk: int = CHUNK) -> Iterator[bytes]:
    sent = 0
    while sent < size:
        offset = sent % len(BLOCK)
        piece = BLOCK[offset : offset + min(chunk, size - sent, len(BLOCK) - offset)]
        sent += len(piece)
        yield piece


class Stream(io.RawIOBase):
    """A file-like view of `chunks(size)`, for boto's upload_fileobj."""

    def __init__(self, size: int) -> None:
        self._chunks = chunks(size)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if not self._pending:
            self._pending = next(self._chunks, b"")
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


@dataclass
class Stack:
    s3: servers.S3Settings
    tm_address: str
    tm_pid: int
    tm_log: Path
    ks_address: str
    envoy_url: str
    redis_url: str
    workdir: Path
    s3_pid: int


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def scheduler_seconds(pid: int) -> tuple[float, float]:
    """(on a CPU, runnable but waiting for one) seconds so far, summed over the
    process's threads (/proc schedstat). The wait is what contention costs:
    time a thread was ready to run while other work held both cores."""
    running = waiting = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            on_cpu, queued, _ = (int(v) for v in (task / "schedstat").read_text().split())
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        running += on_cpu
        waiting += queued
    return running / 1e9, waiting / 1e9


class PerUpload:
    """CPU and run-queue wait over a phase: the Task Manager's per upload,
    SeaweedFS's per PUT (the uploads' and the S3-alone probe's), and this
    process's per upload: the 100 clients, which share the same two cores."""

    def __init__(self, stack: Stack) -> None:
        self._pids = {
            "Task Manager": stack.tm_pid,
            "S3 (SeaweedFS)": stack.s3_pid,
            "clients (this process)": os.getpid(),
        }
        self._before = {name: scheduler_seconds(pid) for name, pid in self._pids.items()}
        self._host_before = host_cpu_ticks()
        self.lines: list[str] = []

    def finish(self, uploads: int, probe_puts: int) -> None:
        counts = {
            "Task Manager": (uploads, "upload"),
            "S3 (SeaweedFS)": (uploads + probe_puts, "PUT"),
            "clients (this process)": (uploads, "upload"),
        }
        for name, pid in self._pids.items():
            (run0, wait0), (run1, wait1) = self._before[name], scheduler_seconds(pid)
            n, unit = counts[name]
            self.lines.append(
                f"  {name} per {unit}: {(run1 - run0) * 1000 / n:.2f} ms on a CPU, "
                f"{(wait1 - wait0) * 1000 / n:.2f} ms waiting for one"
            )
        before, after = self._host_before, host_cpu_ticks()
        ticks = after[2] - before[2]
        busy, stolen = ((after[i] - before[i]) * 100 / ticks for i in (0, 1))
        self.lines.append(
            f"  host: its {os.cpu_count()} CPUs {busy:.0f}% busy (all processes), "
            f"{stolen:.0f}% taken by the hypervisor"
        )


def host_cpu_ticks() -> tuple[int, int, int]:
    """(busy, stolen, all) clock ticks of all CPUs so far (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return user + nice + system + irq + softirq, steal, sum(fields)


def host_speed_ms() -> float:
    """Milliseconds a fixed pure-Python loop takes (best of 5): the same work
    takes longer when the host's cores are slower or shared (other VMs), which
    moves every latency in this bench."""
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        total = 0
        for i in range(300_000):
            total += i * i
        best = min(best, time.perf_counter() - start)
    return best * 1000


def served(log: Path, kb: str) -> tuple[list[float], list[float]]:
    """The uploads into knowledge base `kb` as the Task Manager logged them
    ("upload acknowledged"): `ack_ms` (last byte received -> object and task
    durable) and `stored_ms` (last byte received -> object complete in S3)."""
    ack, stored = [], []
    for line in log.read_text().splitlines():
        if '"upload acknowledged"' in line:
            row = json.loads(line)
            if row["knowledge_base_id"] == kb:
                ack.append(float(row["ack_ms"]))
                stored.append(float(row["stored_ms"]))
    return ack, stored


def start_stack(workdir: Path, closer: ExitStack) -> Stack:
    redis, weed = servers.start_storage(workdir, closer)
    s3 = weed.s3
    task_manager = closer.enter_context(
        servers.start_service(
            "task_manager",
            port=servers.find_free_port(),
            redis_url=redis.url,
            s3=s3,
            log_path=workdir / "tm.log",
            extra_env={
                **servers.AUTH_OFF,
                "KBMESH_TASK_MANAGER_UPLOADS__MAX_BYTES": str(64 * 1024**3),
            },
        )
    )
    knowledge = closer.enter_context(
        servers.start_service(
            "knowledge",
            port=servers.find_free_port(),
            redis_url=redis.url,
            s3=s3,
            log_path=workdir / "ks.log",
            task_manager_address=task_manager.address,
            # Uploads only: no worker competing for the CPU.
            extra_env={**servers.AUTH_OFF, "KBMESH_KNOWLEDGE_WORKER__ENABLED": "false"},
        )
    )
    envoy = closer.enter_context(
        servers.start_envoy(
            listen_port=servers.find_free_port(),
            admin_port=servers.find_free_port(),
            upstreams={"task_manager": [task_manager.address], "knowledge": [knowledge.address]},
            run_dir=workdir / "envoy",
            log_path=workdir / "envoy.log",
        )
    )
    return Stack(
        s3,
        task_manager.address,
        task_manager.pid,
        workdir / "tm.log",
        knowledge.address,
        envoy.http_url,
        redis.url,
        workdir,
        weed.pid,
    )


async def direct_s3(stack: Stack, size: int) -> float:
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=stack.s3.endpoint_url,
        aws_access_key_id=stack.s3.access_key_id,
        aws_secret_access_key=stack.s3.secret_access_key,
        region_name=stack.s3.region,
    ) as client:
        start = time.perf_counter()
        await client.upload_fileobj(
            Stream(size),
            stack.s3.bucket,
            f"bench/direct-{time.time_ns()}",
            Config=TransferConfig(multipart_chunksize=8 * MIB),
        )
        return time.perf_counter() - start


async def create_kb(stack: Stack) -> str:
    async with grpc.aio.insecure_channel(stack.ks_address) as channel:
        kb = await kn_grpc.KnowledgeServiceStub(channel).CreateKnowledgeBase(
            kn.CreateKnowledgeBaseRequest(
                knowledge_base=kn.KnowledgeBase(name=f"bench-{time.time_ns()}")
            )
        )
        return str(kb.id)


async def grpc_messages(kb: str, size: int, name: str) -> AsyncIterator[tm.UploadRequest]:
    yield tm.UploadRequest(knowledge_base_id=kb, filename=name, declared_size_bytes=size)
    for piece in chunks(size):
        yield tm.UploadRequest(file={"data": piece})


async def through_task_manager(stack: Stack, kb: str, size: int) -> tuple[float, int]:
    """(seconds, RSS growth in bytes of the Task Manager during the upload)."""
    baseline = rss_bytes(stack.tm_pid)
    peak = baseline
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_bytes(stack.tm_pid))
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    async with grpc.aio.insecure_channel(stack.tm_address) as channel:
        stub = tm_grpc.TaskManagerServiceStub(channel)
        start = time.perf_counter()
        answer = await stub.Upload(grpc_messages(kb, size, "big.bin"))
        elapsed = time.perf_counter() - start
    done.set()
    await sampler
    assert answer.task.size_bytes == size
    return elapsed, peak - baseline


async def through_envoy(stack: Stack, kb: str, size: int) -> float:
    async def body() -> AsyncIterator[bytes]:
        for piece in chunks(size):
            yield piece

    url = f"{stack.envoy_url}/api/v1/knowledge-bases/{kb}/documents:upload?filename=rest.bin"
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        start = time.perf_counter()
        async with http.post(url, data=body()) as response:
            answer = await response.json()
        elapsed = time.perf_counter() - start
    assert response.status == 200, answer
    return elapsed


async def ack_latencies(
    stack: Stack, kb: str, in_flight: int, rounds: int, max_size: int, rate: int
) -> list[float]:
    """`in_flight` clients each upload `rounds` files of random size back to back
    (staggered starts), so about `in_flight` uploads are always streaming, each
    at most `rate` bytes/s (0: as fast as it can, which saturates this machine).
    Returns, per upload, seconds from the client's last byte to the answer."""
    rng = random.Random(7)
    async with grpc.aio.insecure_channel(stack.tm_address) as channel:
        stub = tm_grpc.TaskManagerServiceStub(channel)

        async def one(name: str, size: int) -> float:
            last_byte = 0.0

            async def messages() -> AsyncIterator[tm.UploadRequest]:
                nonlocal last_byte
                # The size is declared, as the SDK does for every file it
                # sends (objects up to one part then stream into S3 as they
                # arrive: s3_put.StreamedPut).
                yield tm.UploadRequest(
                    knowledge_base_id=kb, filename=name, declared_size_bytes=16 + size
                )
                # Unique bytes first: uploads of the same size would otherwise
                # be identical, and duplicates are answered differently.
                yield tm.UploadRequest(file={"data": os.urandom(16)})
                started = time.perf_counter()
                sent = 0
                for piece in chunks(size, PACED_CHUNK if rate else CHUNK):
                    if rate:  # a client on a slower link
                        await asyncio.sleep(max(0.0, started + sent / rate - time.perf_counter()))
                    sent += len(piece)
                    yield tm.UploadRequest(file={"data": piece})
                last_byte = time.perf_counter()

            await stub.Upload(messages())
            return time.perf_counter() - last_byte

        async def client(c: int) -> list[float]:
            await asyncio.sleep(rng.random())
            return [
                await one(f"{c}-{r}.bin", rng.randint(16 * 1024, max_size)) for r in range(rounds)
            ]

        per_client = await asyncio.gather(*(client(c) for c in range(in_flight)))
    return [latency for latencies in per_client for latency in latencies]


async def s3_put_latencies(
    stack: Stack, max_size: int, interval: float, stop: asyncio.Event
) -> list[float]:
    """Seconds per direct PUT of a 16 KiB-`max_size` object (signed like the
    Task Manager's), one at a time, `interval` seconds apart, until `stop`."""
    settings = stack.s3.for_service()
    rng = random.Random(11)
    latencies = []
    async with open_signed_put(settings, connections=1) as signed:
        while not stop.is_set():
            size = rng.randint(16 * 1024, max_size)
            body = [os.urandom(16), BLOCK[:size]]
            sha256 = hashlib.sha256(b"".join(body)).hexdigest()
            start = time.perf_counter()
            await signed.put(f"bench/probe-{time.time_ns()}", body, "text/plain", sha256)
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(interval)
    return latencies


@dataclass
class AckPhase:
    """What one ack phase measured."""

    title: str
    client: list[float]  # seconds, last byte handed to gRPC -> answer
    served: list[float]  # ms, as the Task Manager logged them (`served`)
    stored: list[float]  # ms, last byte received -> object complete in S3
    s3_alone: list[float]  # seconds per direct PUT (`s3_put_latencies`)
    per_upload: PerUpload

    def report(self) -> None:
        def line(label: str, values: list[float], scale: float, note: str = "") -> None:
            print(
                f"  {label:<46} p50 {statistics.median(values) * scale:6.1f} ms, "
                f"p99 {percentile(values, 99) * scale:6.1f} ms{note}"
            )

        # Per upload, served = stored + the rest; percentiles do not add up.
        own = [ack - stored for ack, stored in zip(self.served, self.stored, strict=True)]
        logged = "" if len(self.served) == len(self.client) else f", {len(self.served)} logged"
        print(f"{self.title} ({len(self.client)} uploads{logged}):")
        line("service (last byte received -> task durable)", self.served, 1, TARGET)
        line("  of it, S3 finishing the object", self.stored, 1)
        line("  of it, the task record in Redis", own, 1)
        line("client (last byte handed to gRPC -> answer)", self.client, 1000)
        line(
            "S3 alone (direct PUTs, same sizes, meanwhile)",
            self.s3_alone,
            1000,
            f" ({len(self.s3_alone)} PUTs)",
        )
        # CPU per upload bounds uploads/s per core; the wait for a CPU is the
        # contention on this machine's two cores, which the latencies include.
        print("\n".join(self.per_upload.lines))


TARGET = " (target p99 <= 50 ms)"


async def ack_phase(stack: Stack, args: argparse.Namespace, rate: int, title: str) -> AckPhase:
    """One ack phase (`ack_latencies` at `rate`, 0: flat out, into a new
    knowledge base) with S3 alone measured alongside (`s3_put_latencies`) and
    the CPU and run-queue wait per upload."""
    kb = await create_kb(stack)
    max_size = args.max_kb * 1024
    per_upload = PerUpload(stack)
    stop = asyncio.Event()
    probe = asyncio.create_task(
        s3_put_latencies(stack, max_size, args.probe_interval_ms / 1000, stop)
    )
    try:
        acks = await ack_latencies(stack, kb, args.concurrent, args.rounds, max_size, rate)
    finally:
        stop.set()
    s3_alone = await probe
    per_upload.finish(len(acks), len(s3_alone))
    ack_ms, stored_ms = served(stack.tm_log, kb)
    return AckPhase(title, acks, ack_ms, stored_ms, s3_alone, per_upload)


WORDS = [
    *("upload", "stream", "task", "worker", "lease", "credit", "chunk", "embed"),
    *("index", "search", "vector", "keyword", "tenant", "bucket", "object", "queue"),
    *("redis", "envoy", "gateway", "progress", "stage", "retry", "callback"),
]


async def keep_ingesting(stack: Stack, kb: str, stop: asyncio.Event) -> int:
    """Uploads a ~24 KB Markdown document every 0.5 s until `stop`, so the
    worker always has parsing and embedding to do. Returns how many."""
    rng = random.Random(3)
    sent = 0
    async with grpc.aio.insecure_channel(stack.tm_address) as channel:
        stub = tm_grpc.TaskManagerServiceStub(channel)
        while not stop.is_set():
            text = "\n\n".join(
                f"## Part {p}\n\n" + " ".join(rng.choice(WORDS) for _ in range(400))
                for p in range(8)
            )

            async def messages(
                body: bytes = text.encode(), name: str = f"doc{sent}.md"
            ) -> AsyncIterator[tm.UploadRequest]:
                yield tm.UploadRequest(knowledge_base_id=kb, filename=name)
                yield tm.UploadRequest(file={"data": body})

            await stub.Upload(messages())
            sent += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
    return sent


async def backlog_drained(stack: Stack, but: str, limit: float = 300.0) -> None:
    """Waits until no task is pending outside knowledge base `but`."""
    async with grpc.aio.insecure_channel(stack.tm_address) as channel:
        stub = tm_grpc.TaskManagerServiceStub(channel)
        try:
            async with asyncio.timeout(limit):
                while True:
                    pending = await stub.ListTasks(
                        tm.ListTasksRequest(state=tm.Task.State.STATE_PENDING, page_size=1000)
                    )
                    if not pending.next_page_token and all(
                        task.knowledge_base_id == but for task in pending.tasks
                    ):
                        return
                    await asyncio.sleep(0.5)
        except TimeoutError:
            raise RuntimeError(
                f"the worker did not work through the queued uploads in {limit:.0f} s"
            ) from None


async def ack_while_ingesting(
    stack: Stack, closer: ExitStack, args: argparse.Namespace
) -> AckPhase:
    """The paced ack phase with a knowledge worker (4 tasks at once, at the
    default priority: nice 19, in a session of its own) ingesting documents
    throughout: a feeder's Markdown, which it parses and embeds, and the
    phase's own uploads as they arrive. It starts once the worker has worked
    through what the earlier phases queued. Its title says the share of a
    core the worker used."""
    worker = closer.enter_context(
        servers.start_worker(
            redis_url=stack.redis_url,
            s3=stack.s3,
            task_manager_address=stack.tm_address,
            log_path=stack.workdir / "worker.log",
            extra_env={"KBMESH_KNOWLEDGE_INDEX__URI": str(stack.workdir / "index")},
        )
    )
    docs_kb = await create_kb(stack)
    stop = asyncio.Event()
    feeder = asyncio.create_task(keep_ingesting(stack, docs_kb, stop))
    # The earlier phases' uploads were queued with no worker; it works
    # through them first (random bytes: each fails at once, costing the
    # Task Manager a dispatch). The phase starts once they are gone and the
    # worker is busy embedding the feeder's documents.
    await backlog_drained(stack, docs_kb)
    await asyncio.sleep(5)
    worker_before = cpu_seconds(worker.pid)
    started = time.perf_counter()
    phase = await ack_phase(stack, args, args.client_rate_kib * 1024, "")
    worker_share = (cpu_seconds(worker.pid) - worker_before) / (time.perf_counter() - started)
    stop.set()
    await feeder
    phase.title = (
        f"ack latency, {args.concurrent} uploads in flight, each sending "
        f"{args.client_rate_kib} KiB/s, while a worker ingests "
        f"(it used {worker_share * 100:.0f}% of a core)"
    )
    return phase


async def throughput(stack: Stack, args: argparse.Namespace) -> None:
    """Phases 1-3: the big upload direct, through the Task Manager and through
    Envoy, `args.repeat` rounds in rotating order; prints the ratios."""
    size = args.size_mb * MIB
    kb = await create_kb(stack)
    await direct_s3(stack, 16 * MIB)  # warm up connections and the volume
    timings: dict[str, list[float]] = {"direct": [], "tm": [], "envoy": []}
    rss_growth = 0
    tm_cpu_per_gib: list[float] = []
    for round_ in range(args.repeat):
        order = ["direct", "tm", "envoy"]
        order = order[round_ % 3 :] + order[: round_ % 3]
        for path in order:
            if path == "direct":
                timings[path].append(await direct_s3(stack, size))
            elif path == "tm":
                cpu_before = cpu_seconds(stack.tm_pid)
                elapsed, growth = await through_task_manager(stack, kb, size)
                tm_cpu_per_gib.append((cpu_seconds(stack.tm_pid) - cpu_before) * MIB * 1024 / size)
                timings[path].append(elapsed)
                rss_growth = max(rss_growth, growth)
            else:
                timings[path].append(await through_envoy(stack, kb, size))
    direct, via_tm, via_envoy = (statistics.median(timings[p]) for p in ("direct", "tm", "envoy"))
    mb = size / MIB

    def spread(path: str) -> str:
        rates = sorted(mb / t for t in timings[path])
        return f"({rates[0]:.0f}-{rates[-1]:.0f})" if len(rates) > 1 else ""

    print(
        f"upload of {mb:.0f} MiB (same machine, same SeaweedFS), median of {args.repeat} "
        "rounds (range in MiB/s):"
    )
    print(f"  direct aioboto3 multipart  {mb / direct:8.1f} MiB/s {spread('direct')}  (baseline)")
    print(
        f"  Task Manager gRPC          {mb / via_tm:8.1f} MiB/s {spread('tm')}  "
        f"ratio {direct / via_tm:.2f} (target >= 0.90)"
    )
    print(
        f"  Envoy REST raw body        {mb / via_envoy:8.1f} MiB/s {spread('envoy')}  "
        f"ratio {direct / via_envoy:.2f} (target >= 0.80)"
    )
    print(f"  Task Manager RSS growth    {rss_growth / MIB:8.1f} MiB      (target < 64 MiB)")
    print(
        f"  Task Manager CPU per GiB   {statistics.median(tm_cpu_per_gib):8.2f} s "
        "(user + system, all threads)"
    )
    # The big uploads leave gigabytes of dirty pages that the kernel writes
    # back for the next tens of seconds; the latency phases should not
    # measure that disk traffic.
    os.sync()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024, help="size of the big upload")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the big uploads")
    parser.add_argument(
        "--ack-only", action="store_true", help="skip the big uploads: ack latency phases only"
    )
    parser.add_argument("--concurrent", type=int, default=100, help="uploads in flight")
    parser.add_argument("--rounds", type=int, default=5, help="uploads per concurrent client")
    parser.add_argument("--max-kb", type=int, default=512, help="largest of those uploads")
    parser.add_argument(
        "--probe-interval-ms", type=int, default=50, help="pause between S3-alone PUTs"
    )
    parser.add_argument(
        "--client-rate-kib", type=int, default=256, help="per-client send rate, paced phase"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kbmesh-bench-") as tmp, ExitStack() as closer:
        stack = start_stack(Path(tmp), closer)
        speed_at_start = host_speed_ms()
        if not args.ack_only:
            await throughput(stack, args)
        else:  # the ack phases start with warm connections either way
            await ack_latencies(stack, await create_kb(stack), 20, 2, args.max_kb * 1024, 0)
        speed_before_acks = host_speed_ms()
        print(
            f"host speed: a fixed CPU-bound loop took {speed_at_start:.1f} ms at the start and "
            f"{speed_before_acks:.1f} ms before the ack phases (the same work; higher is a "
            "slower or busier host, and every latency below moves with it)",
            flush=True,
        )
        sizes = f"uploads of 16-{args.max_kb} KiB"
        paced = f"each sending {args.client_rate_kib} KiB/s"
        for rate, pace in ((args.client_rate_kib * 1024, paced), (0, "each sending flat out")):
            title = f"ack latency, {args.concurrent} uploads in flight, {pace}, {sizes}"
            (await ack_phase(stack, args, rate, title)).report()
        (await ack_while_ingesting(stack, closer, args)).report()


if __name__ == "__main__":
    asyncio.run(main())
