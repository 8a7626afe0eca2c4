"""The local developer stack: ``python -m devstack up|down|run|status``.

``up`` starts, each detached (they outlive the command) and in this order:
Redis, SeaweedFS (S3, bucket created), the Task Manager, the Knowledge Service
and Envoy; it returns once every part is healthy and prints where each one
listens and logs. ``run`` does the same in the foreground and stops everything
on Ctrl-C / SIGTERM (or when a part dies). ``down`` stops whatever ``up`` or
``run`` recorded (SIGTERM, then SIGKILL after a timeout); ``status`` shows
each part and whether it is alive and healthy.

State lives in ``.kbmesh/`` at the repository root (git-ignored):

- ``data/redis`` (AOF), ``data/s3`` (SeaweedFS): kept across down/up;
- ``logs/<part>.log``: each server's stdout and stderr, appended;
- ``run/<part>.pid`` and ``run/stack.json`` (pids, ports, URLs), removed by
  ``down``; ``run/envoy/envoy.yaml`` is the rendered gateway config.

Environment variables (all optional):

==============================  =========================  ===============================
variable                        default                    what
==============================  =========================  ===============================
``KBMESH_HOME``                 ``<repo>/.kbmesh``         state directory
``KBMESH_ENVOY_HOST``           ``127.0.0.1``              Envoy listener address
``KBMESH_ENVOY_PORT``           ``8080``                   REST, gRPC-web and gRPC
``KBMESH_ENVOY_ADMIN_PORT``     ``9901``                   Envoy admin (127.0.0.1 only)
``KBMESH_TASK_MANAGER_PORT``    ``50051``                  Task Manager gRPC
``KBMESH_KNOWLEDGE_PORT``       ``50052``                  Knowledge Service gRPC
``KBMESH_REDIS_PORT``           ``6390``                   Redis
``KBMESH_S3_PORT``              ``8333``                   SeaweedFS S3 (gRPC: +10000)
``KBMESH_WEED_FILER_PORT``      ``8334``                   SeaweedFS filer (gRPC: +10000)
``KBMESH_WEED_VOLUME_PORT``     ``8335``                   SeaweedFS volume (gRPC: +10000)
``KBMESH_WEED_MASTER_PORT``     ``9333``                   SeaweedFS master (gRPC: +10000)
``KBMESH_S3_BUCKET``            ``kbmesh``                 bucket (>= 3 characters)
``KBMESH_S3_ACCESS_KEY_ID``     ``kbmesh``                 dummy: S3 auth is off locally
``KBMESH_S3_SECRET_ACCESS_KEY`` ``kbmesh-secret``          dummy
``KBMESH_S3_REGION``            ``us-east-1``
``KBMESH_LOG_LEVEL``            ``INFO``                   services' log level
``KBMESH_LOG_FORMAT``           ``json``                   services' log format (json|text)
``KBMESH_START_TIMEOUT``        ``90``                     seconds a part may take to start
``KBMESH_WORKER_TOKEN``         a fixed dev token          worker token (Task Manager and worker)
``KBMESH_ENVOY_TASK_MANAGERS``  (none)                     more Task Manager replicas behind
                                                           Envoy: ``host:port,host:port``
``KBMESH_ENVOY_KNOWLEDGE``      (none)                     more Knowledge Service replicas
``KBMESH_ENVOY_UPLOAD_BURST``   ``50``                     uploads admitted at once (then 429)
``KBMESH_ENVOY_UPLOAD_RATE``    ``20``                     uploads per second after the burst
``KBMESH_ENVOY_CORS_ORIGINS``   (any origin)               CORS: allowed origins, exact,
                                                           ``https://a.example,https://b…``
``KBMESH_AUTH``                 ``api_keys``               ``off``: no caller authentication
                                                           (loopback only; said loudly)
==============================  =========================  ===============================

Authentication: with ``KBMESH_AUTH`` unset the services require API keys, and
the stack issues (or reuses) a development key for tenant ``dev``, prints it
and keeps it in ``.kbmesh/dev-api-key`` (mode 600): ``export
KBMESH_API_KEY=$(cat .kbmesh/dev-api-key)``. ``KBMESH_AUTH=off`` runs without
credentials (every caller is tenant ``default``); refused when Envoy listens
on a non-loopback address.

The services also inherit the caller's environment, so any other
``KBMESH_TASK_MANAGER_*`` / ``KBMESH_KNOWLEDGE_*`` setting reaches them; the
ones above (ports, Redis URL, S3, log) are set by the stack. ``KBMESH_HOME``
is passed on too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from redis.asyncio import Redis

from devstack import servers
from devstack.servers import (
    DEFAULT_DESCRIPTOR,
    LOOPBACK,
    ROOT,
    ServerError,
    ServerProcess,
    WeedPorts,
)
from services.common.auth import ApiKeys, is_loopback

DEV_TENANT = "dev"
DEV_KEY_FILE = "dev-api-key"

# Parts in start order; stopped in reverse.
PARTS = ("redis", "seaweedfs", "task_manager", "knowledge", "envoy")
STATE_FILE = "stack.json"


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a port number") from None
    if not 0 < value < 65536:
        raise SystemExit(f"{name}={value} is not a port number")
    return value


def _env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SystemExit(f"{name}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise SystemExit(f"{name}={raw!r} must be positive")
    return value


def _env_count(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"{name}={raw!r} must be a positive whole number")
    return int(raw)


def _env_addresses(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """``host:port,host:port`` -> a tuple of addresses (empty if unset)."""
    addresses = tuple(a.strip() for a in env.get(name, "").split(",") if a.strip())
    for address in addresses:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise SystemExit(f"{name}: {address!r} is not host:port")
    return addresses


@dataclass(frozen=True)
class StackConfig:
    """Where the stack keeps its state and which ports it uses."""

    home: Path
    envoy_host: str = LOOPBACK
    envoy_port: int = 8080
    envoy_admin_port: int = 9901
    tm_port: int = 50051
    ks_port: int = 50052
    redis_port: int = 6390
    s3_port: int = 8333
    weed_filer_port: int = 8334
    weed_volume_port: int = 8335
    weed_master_port: int = 9333
    bucket: str = "kbmesh"
    access_key_id: str = "kbmesh"
    secret_access_key: str = "kbmesh-secret"
    region: str = "us-east-1"
    log_level: str = "INFO"
    log_format: str = "json"
    start_timeout: float = 90.0
    # Replicas started elsewhere, load-balanced by Envoy with the local ones.
    extra_task_managers: tuple[str, ...] = ()
    extra_knowledge: tuple[str, ...] = ()
    upload_burst: int = 50
    upload_rate: int = 20
    # Origins allowed by CORS (exact, e.g. https://kb.example.com); none: any.
    cors_origins: tuple[str, ...] = ()

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> StackConfig:
        env = os.environ if env is None else env
        d = cls(home=ROOT / ".kbmesh")
        return cls(
            home=Path(env.get("KBMESH_HOME") or d.home).resolve(),
            envoy_host=env.get("KBMESH_ENVOY_HOST") or d.envoy_host,
            envoy_port=_env_int(env, "KBMESH_ENVOY_PORT", d.envoy_port),
            envoy_admin_port=_env_int(env, "KBMESH_ENVOY_ADMIN_PORT", d.envoy_admin_port),
            tm_port=_env_int(env, "KBMESH_TASK_MANAGER_PORT", d.tm_port),
            ks_port=_env_int(env, "KBMESH_KNOWLEDGE_PORT", d.ks_port),
            redis_port=_env_int(env, "KBMESH_REDIS_PORT", d.redis_port),
            s3_port=_env_int(env, "KBMESH_S3_PORT", d.s3_port),
            weed_filer_port=_env_int(env, "KBMESH_WEED_FILER_PORT", d.weed_filer_port),
            weed_volume_port=_env_int(env, "KBMESH_WEED_VOLUME_PORT", d.weed_volume_port),
            weed_master_port=_env_int(env, "KBMESH_WEED_MASTER_PORT", d.weed_master_port),
            bucket=env.get("KBMESH_S3_BUCKET") or d.bucket,
            access_key_id=env.get("KBMESH_S3_ACCESS_KEY_ID") or d.access_key_id,
            secret_access_key=env.get("KBMESH_S3_SECRET_ACCESS_KEY") or d.secret_access_key,
            region=env.get("KBMESH_S3_REGION") or d.region,
            log_level=env.get("KBMESH_LOG_LEVEL") or d.log_level,
            log_format=env.get("KBMESH_LOG_FORMAT") or d.log_format,
            start_timeout=_env_float(env, "KBMESH_START_TIMEOUT", d.start_timeout),
            extra_task_managers=_env_addresses(env, "KBMESH_ENVOY_TASK_MANAGERS"),
            extra_knowledge=_env_addresses(env, "KBMESH_ENVOY_KNOWLEDGE"),
            upload_burst=_env_count(env, "KBMESH_ENVOY_UPLOAD_BURST", d.upload_burst),
            upload_rate=_env_count(env, "KBMESH_ENVOY_UPLOAD_RATE", d.upload_rate),
            cors_origins=tuple(
                o.strip() for o in env.get("KBMESH_ENVOY_CORS_ORIGINS", "").split(",") if o.strip()
            ),
        )

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StackConfig:
        fields = dict(data)
        fields["home"] = Path(fields["home"])
        for name in ("extra_task_managers", "extra_knowledge", "cors_origins"):
            fields[name] = tuple(fields.get(name, ()))
        return cls(**fields)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["home"] = str(self.home)
        return data

    # -- layout ---------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def state_path(self) -> Path:
        return self.run_dir / STATE_FILE

    def log_path(self, part: str) -> Path:
        return self.logs_dir / f"{part}.log"

    def pid_path(self, part: str) -> Path:
        return self.run_dir / f"{part}.pid"

    # -- addresses ------------------------------------------------------------------

    @property
    def weed_ports(self) -> WeedPorts:
        return WeedPorts.standard(
            s3=self.s3_port,
            master=self.weed_master_port,
            volume=self.weed_volume_port,
            filer=self.weed_filer_port,
        )

    @property
    def redis_url(self) -> str:
        return f"redis://{LOOPBACK}:{self.redis_port}/0"

    @property
    def s3(self) -> servers.S3Settings:
        return servers.S3Settings(
            endpoint_url=f"http://{LOOPBACK}:{self.s3_port}",
            bucket=self.bucket,
            access_key_id=self.access_key_id,
            secret_access_key=self.secret_access_key,
            region=self.region,
        )

    @property
    def tm_address(self) -> str:
        return f"{LOOPBACK}:{self.tm_port}"

    @property
    def ks_address(self) -> str:
        return f"{LOOPBACK}:{self.ks_port}"

    @property
    def envoy_client_host(self) -> str:
        return LOOPBACK if self.envoy_host in ("0.0.0.0", "") else self.envoy_host

    @property
    def envoy_url(self) -> str:
        return f"http://{self.envoy_client_host}:{self.envoy_port}"

    @property
    def envoy_admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.envoy_admin_port}"

    def ports(self) -> dict[str, tuple[str, int]]:
        """Every port the stack binds: label -> (env var to change it, port)."""
        w = self.weed_ports
        return {
            "Envoy": ("KBMESH_ENVOY_PORT", self.envoy_port),
            "Envoy admin": ("KBMESH_ENVOY_ADMIN_PORT", self.envoy_admin_port),
            "Task Manager": ("KBMESH_TASK_MANAGER_PORT", self.tm_port),
            "Knowledge Service": ("KBMESH_KNOWLEDGE_PORT", self.ks_port),
            "Redis": ("KBMESH_REDIS_PORT", self.redis_port),
            "S3": ("KBMESH_S3_PORT", w.s3),
            "S3 gRPC": ("KBMESH_S3_PORT (+10000)", w.s3_grpc),
            "weed filer": ("KBMESH_WEED_FILER_PORT", w.filer),
            "weed filer gRPC": ("KBMESH_WEED_FILER_PORT (+10000)", w.filer_grpc),
            "weed volume": ("KBMESH_WEED_VOLUME_PORT", w.volume),
            "weed volume gRPC": ("KBMESH_WEED_VOLUME_PORT (+10000)", w.volume_grpc),
            "weed master": ("KBMESH_WEED_MASTER_PORT", w.master),
            "weed master gRPC": ("KBMESH_WEED_MASTER_PORT (+10000)", w.master_grpc),
        }

    def where(self, part: str) -> str:
        """Human description of where `part` listens."""
        return {
            "redis": self.redis_url,
            "seaweedfs": f"S3 {self.s3.endpoint_url} bucket {self.bucket}",
            "task_manager": f"gRPC {self.tm_address}",
            "knowledge": f"gRPC {self.ks_address}",
            "envoy": f"{self.envoy_url} (admin {self.envoy_admin_url})",
        }[part]

    def probe(self, part: str) -> bool:
        """One quick health check of `part` (exceptions mean unhealthy)."""
        try:
            if part == "redis":
                return servers.redis_ping(LOOPBACK, self.redis_port)
            if part == "seaweedfs":
                client = self.s3.boto3_client()
                try:
                    client.head_bucket(Bucket=self.bucket)
                finally:
                    client.close()
                return True
            if part == "task_manager":
                return servers.grpc_serving(self.tm_address)
            if part == "knowledge":
                return servers.grpc_serving(self.ks_address)
            if part == "envoy":
                return servers.envoy_ready(self.envoy_admin_port)
        except Exception:
            return False
        raise ValueError(part)


# --------------------------------------------------------------------------- state


@dataclass
class StackState:
    """What `up`/`run` recorded in run/stack.json."""

    config: StackConfig
    processes: dict[str, ServerProcess]
    mode: str  # "up" (detached) or "run" (foreground)
    runner_pid: int | None = None
    runner_start_time: int | None = None
    started_at: float = 0.0

    def to_json(self) -> dict[str, Any]:
        c = self.config
        return {
            "mode": self.mode,
            "started_at": self.started_at,
            "runner_pid": self.runner_pid,
            "runner_start_time": self.runner_start_time,
            "config": c.to_json(),
            "urls": {
                "envoy": c.envoy_url,
                "envoy_admin": c.envoy_admin_url,
                "task_manager": c.tm_address,
                "knowledge": c.ks_address,
                "redis": c.redis_url,
                "s3": c.s3.endpoint_url,
            },
            "ports": {label: port for label, (_, port) in c.ports().items()},
            "processes": {name: p.to_record() for name, p in self.processes.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StackState:
        return cls(
            config=StackConfig.from_json(data["config"]),
            processes={
                name: ServerProcess.from_record(rec)
                for name, rec in dict(data.get("processes", {})).items()
            },
            mode=str(data.get("mode", "up")),
            runner_pid=data.get("runner_pid"),
            runner_start_time=data.get("runner_start_time"),
            started_at=float(data.get("started_at", 0.0)),
        )

    def runner_alive(self) -> bool:
        if self.runner_pid is None or self.runner_pid == os.getpid():
            return False
        start = servers.process_start_time(self.runner_pid)
        return start is not None and start == self.runner_start_time


def load_state(config: StackConfig) -> StackState | None:
    try:
        data = json.loads(config.state_path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        print(f"warning: ignoring unreadable {config.state_path}: {exc}", file=sys.stderr)
        return None
    try:
        return StackState.from_json(data)
    except (KeyError, TypeError, ValueError) as exc:
        print(f"warning: ignoring malformed {config.state_path}: {exc}", file=sys.stderr)
        return None


def save_state(state: StackState) -> None:
    config = state.config
    config.run_dir.mkdir(parents=True, exist_ok=True)
    tmp = config.state_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(state.to_json(), indent=2) + "\n")
    tmp.replace(config.state_path)
    for name, proc in state.processes.items():
        config.pid_path(name).write_text(f"{proc.pid}\n")


def clear_state(config: StackConfig) -> None:
    for part in PARTS:
        config.pid_path(part).unlink(missing_ok=True)
    config.state_path.unlink(missing_ok=True)
    config.state_path.with_suffix(".json.tmp").unlink(missing_ok=True)


# --------------------------------------------------------------------------- output


def _rel(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def print_table(state: StackState, *, health: bool, file: Any = None) -> dict[str, str]:
    """Print one line per part; returns part -> condition."""
    out = file or sys.stdout
    config = state.config
    rows = [("part", "pid", "state", "listens on", "log")]
    conditions: dict[str, str] = {}
    for part in PARTS:
        proc = state.processes.get(part)
        if proc is None:
            condition, pid = "not started", "-"
        elif not proc.is_alive():
            condition, pid = "dead", str(proc.pid)
        elif health:
            condition = "healthy" if config.probe(part) else "UNHEALTHY"
            pid = str(proc.pid)
        else:
            condition, pid = "running", str(proc.pid)
        conditions[part] = condition
        rows.append((part, pid, condition, config.where(part), _rel(config.log_path(part))))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:4], widths, strict=True)]
        print("  ".join([*cells, row[4]]).rstrip(), file=out)
    return conditions


def _say(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------- start/stop


def _ensure_generated() -> None:
    """Run codegen when the stubs or the Envoy descriptor are missing."""
    stubs = ROOT / "kbmesh" / "taskmanager" / "v1" / "task_manager_pb2.py"
    if DEFAULT_DESCRIPTOR.is_file() and stubs.is_file():
        return
    _say("generating stubs and the Envoy descriptor (python -m devstack.codegen) ...")
    subprocess.run([sys.executable, "-m", "devstack.codegen"], cwd=ROOT, check=True)


def taken_ports(config: StackConfig) -> list[str]:
    """One line per port of the stack that something else holds."""
    taken = []
    for label, (var, port) in config.ports().items():
        host = (config.envoy_host or "0.0.0.0") if label == "Envoy" else LOOPBACK
        if not servers.port_is_free(port, host):
            taken.append(f"  {label}: port {port} is in use (set {var} to use another)")
    return taken


def start_parts(
    config: StackConfig,
    state: StackState,
    on_started: Callable[[StackState], None],
    *,
    detached: bool,
) -> None:
    """Start every part in order; `on_started` runs after each one (to record it).

    `detached` (``up``): the servers are not our children and outlive us.
    """
    timeout = config.start_timeout
    data, logs, run = config.data_dir, config.logs_dir, config.run_dir
    for directory in (data, logs, run):
        directory.mkdir(parents=True, exist_ok=True)
    # The Knowledge Service's worker authenticates to the Task Manager with this token.
    worker_token = os.environ.get("KBMESH_WORKER_TOKEN") or servers.DEV_WORKER_TOKEN
    auth = auth_mode()
    if auth == "off" and not is_loopback(config.envoy_host):
        raise ServerError(
            f"KBMESH_AUTH=off with Envoy on {config.envoy_host}: anyone on the network could"
            " read every knowledge base; unset KBMESH_AUTH or listen on 127.0.0.1"
        )
    service_extra = {
        "KBMESH_HOME": str(config.home),
        "KBMESH_TASK_MANAGER_DISPATCH__WORKER_TOKENS": json.dumps([worker_token]),
        "KBMESH_KNOWLEDGE_WORKER__TOKEN": worker_token,
        "KBMESH_TASK_MANAGER_AUTH__MODE": auth,
        "KBMESH_KNOWLEDGE_AUTH__MODE": auth,
    }

    def started(part: str, proc: ServerProcess, what: str) -> None:
        state.processes[part] = proc
        on_started(state)
        _say(f"  {part:<13} ready  pid {proc.pid:<7} {what}")

    _say(f"starting the kbmesh stack (state in {_rel(config.home)})")
    redis = servers.start_redis(
        port=config.redis_port,
        data_dir=data / "redis",
        log_path=config.log_path("redis"),
        timeout=timeout,
        detached=detached,
    )
    started("redis", redis.process, config.where("redis"))
    if auth == "api_keys":
        ensure_dev_key(config)
    weed = servers.start_seaweedfs(
        ports=config.weed_ports,
        data_dir=data / "s3",
        config_dir=run / "seaweedfs",
        log_path=config.log_path("seaweedfs"),
        bucket=config.bucket,
        access_key_id=config.access_key_id,
        secret_access_key=config.secret_access_key,
        region=config.region,
        timeout=timeout,
        detached=detached,
    )
    started("seaweedfs", weed.process, config.where("seaweedfs"))
    tm = servers.start_service(
        "task_manager",
        port=config.tm_port,
        redis_url=config.redis_url,
        s3=config.s3,
        log_path=config.log_path("task_manager"),
        log_level=config.log_level,
        log_format=config.log_format,
        extra_env=service_extra,
        timeout=timeout,
        detached=detached,
    )
    started("task_manager", tm.process, config.where("task_manager"))
    ks = servers.start_service(
        "knowledge",
        port=config.ks_port,
        redis_url=config.redis_url,
        s3=config.s3,
        task_manager_address=config.tm_address,
        log_path=config.log_path("knowledge"),
        log_level=config.log_level,
        log_format=config.log_format,
        extra_env=service_extra,
        timeout=timeout,
        detached=detached,
    )
    started("knowledge", ks.process, config.where("knowledge"))
    envoy = servers.start_envoy(
        listen_host=config.envoy_host,
        listen_port=config.envoy_port,
        admin_port=config.envoy_admin_port,
        upstreams={
            "task_manager": [config.tm_address, *config.extra_task_managers],
            "knowledge": [config.ks_address, *config.extra_knowledge],
        },
        upload_rate_limit=servers.UploadRateLimit(
            burst=config.upload_burst, per_second=config.upload_rate
        ),
        cors_origins=config.cors_origins,
        run_dir=run / "envoy",
        log_path=config.log_path("envoy"),
        timeout=timeout,
        detached=detached,
    )
    started("envoy", envoy.process, config.where("envoy"))


def stop_parts(processes: Mapping[str, ServerProcess], *, timeout: float | None = None) -> bool:
    """Stop in reverse start order (storage last, in parallel). True if all stopped."""
    order = [p for p in reversed(PARTS) if p in processes]
    order += [p for p in processes if p not in PARTS]

    def stop_one(part: str) -> None:
        proc = processes[part]
        if not proc.is_alive():
            proc.stop(timeout, reap_timeout=0)  # still sweeps stragglers and sockets
            _say(f"  {part:<13} was not running")
            return
        began = time.monotonic()
        code = proc.stop(timeout, reap_timeout=0)
        status = "" if code is None else f", exit status {code}"
        _say(f"  {part:<13} stopped (pid {proc.pid}, {time.monotonic() - began:.1f} s{status})")

    storage = [p for p in order if p in ("redis", "seaweedfs")]
    for part in order:
        if part not in storage:
            stop_one(part)
    threads = [threading.Thread(target=stop_one, args=(p,)) for p in storage]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    deadline = time.monotonic() + 3.0
    for proc in processes.values():  # let init reap them: no zombies in `ps`
        proc.wait_reaped(max(0.0, deadline - time.monotonic()))
    return not any(p.is_alive() for p in processes.values())


# --------------------------------------------------------------------------- commands


class _Interrupted(Exception):
    """SIGTERM/SIGINT arrived."""


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _ignore_signals() -> None:
    """While stopping, a second Ctrl-C must not leave servers behind."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _existing(config: StackConfig) -> tuple[StackState | None, int | None]:
    """(state, exit code) if a recorded stack makes `up`/`run` stop early."""
    state = load_state(config)
    if state is None:
        return None, None
    alive = {p for p, proc in state.processes.items() if proc.is_alive()}
    if not alive and not state.runner_alive():
        clear_state(config)  # stale record of a stack that is gone
        return None, None
    if alive == set(PARTS):
        _say(f"the kbmesh stack is already up (started with `{state.mode}`):")
        print_table(state, health=True)
        return state, 0
    dead = ", ".join(p for p in PARTS if p not in alive)
    _say(f"the kbmesh stack is partly running (not running: {dead}):")
    print_table(state, health=True)
    _say("run `python -m devstack down` first")
    return state, 1


def auth_mode() -> str:
    """`api_keys` unless KBMESH_AUTH=off."""
    value = os.environ.get("KBMESH_AUTH", "").strip().lower()
    if value not in ("", "api_keys", "off"):
        raise ServerError(f"KBMESH_AUTH must be api_keys or off, not {value!r}")
    return "off" if value == "off" else "api_keys"


def ensure_dev_key(config: StackConfig) -> str:
    """The development key of tenant `dev`: the one in .kbmesh/dev-api-key while
    Redis still accepts it, else a new one (written there, mode 600)."""
    path = config.home / DEV_KEY_FILE

    async def check_or_create() -> str:
        redis = Redis.from_url(config.redis_url)
        try:
            keys = ApiKeys(redis)
            if path.exists():
                key = path.read_text().strip()
                if await keys.tenant_of(key) == DEV_TENANT:
                    return key
            _, key = await keys.create(DEV_TENANT, "make up development key")
            return key
        finally:
            await redis.aclose()

    key = asyncio.run(check_or_create())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(key + "\n")
    return key


def say_credentials(config: StackConfig) -> None:
    if auth_mode() == "off":
        _say(
            "\n!!! AUTHENTICATION IS OFF (KBMESH_AUTH=off): every caller on this machine acts"
            " as tenant `default` without credentials !!!"
        )
        return
    path = config.home / DEV_KEY_FILE
    key = path.read_text().strip() if path.exists() else "(missing)"
    _say(f"\ndevelopment API key (tenant {DEV_TENANT}; also in {_rel(path)}):\n  {key}")
    _say(
        f"  export KBMESH_API_KEY=$(cat {_rel(path)})"
        "   # then send `Authorization: Bearer $KBMESH_API_KEY`"
    )


def _start(config: StackConfig, mode: str) -> StackState | int:
    """Start everything; the state on success, an exit code on failure."""
    try:
        _ensure_generated()
    except subprocess.CalledProcessError as exc:
        print(f"error: code generation failed: {exc}", file=sys.stderr, flush=True)
        return 1
    taken = taken_ports(config)
    if taken:
        _say("cannot start the kbmesh stack: ports are taken by something else:")
        _say("\n".join(taken))
        return 1
    state = StackState(
        config=config,
        processes={},
        mode=mode,
        runner_pid=os.getpid() if mode == "run" else None,
        runner_start_time=servers.process_start_time(os.getpid()) if mode == "run" else None,
        started_at=time.time(),
    )
    try:
        with _signals_raise():
            start_parts(config, state, save_state, detached=mode == "up")
    except (ServerError, _Interrupted, KeyboardInterrupt) as exc:
        if isinstance(exc, ServerError):
            print(f"\nerror: {exc}\n", file=sys.stderr, flush=True)
        else:
            _say(f"\ninterrupted ({exc or 'SIGINT'})")
        if state.processes:
            _say("stopping what was started:")
            _ignore_signals()
            stop_parts(state.processes)
        clear_state(config)
        return 1 if isinstance(exc, ServerError) else 130
    return state


def up(config: StackConfig) -> int:
    """Start the stack detached; 0 when every part is healthy."""
    _, code = _existing(config)
    if code is not None:
        return code
    result = _start(config, "up")
    if isinstance(result, int):
        return result
    _say("\nthe kbmesh stack is up:")
    print_table(result, health=True)
    say_credentials(config)
    _say("\nstop it with `python -m devstack down`")
    return 0


def run(config: StackConfig) -> int:
    """Start the stack in the foreground; Ctrl-C or SIGTERM stops it."""
    _, code = _existing(config)
    if code is not None:
        if code == 0:
            _say("(already running: `python -m devstack down` first to run it in the foreground)")
        return 1
    result = _start(config, "run")
    if isinstance(result, int):
        return result
    state = result
    _say("\nthe kbmesh stack is running in the foreground (Ctrl-C stops it):")
    print_table(state, health=True)
    say_credentials(config)
    exit_code = 0
    try:
        with _signals_raise():
            while True:
                dead = [p for p, proc in state.processes.items() if not proc.is_alive()]
                if dead:
                    for part in dead:
                        proc = state.processes[part]
                        print(
                            f"\nerror: {part} exited (status {proc.returncode}); "
                            f"last lines of {proc.log_path}:\n{proc.log_tail()}",
                            file=sys.stderr,
                            flush=True,
                        )
                    exit_code = 1
                    break
                time.sleep(0.5)
    except (_Interrupted, KeyboardInterrupt) as exc:
        _say(f"\n{exc or 'SIGINT'}: stopping")
    _ignore_signals()
    ok = stop_parts(state.processes)
    clear_state(config)
    return exit_code if ok else 1


def down(config: StackConfig, *, timeout: float | None = None) -> int:
    """Stop whatever was recorded; idempotent."""
    state = load_state(config)
    if state is None:
        clear_state(config)
        _say("the kbmesh stack is not running")
        return 0
    if state.runner_alive() and state.runner_pid is not None:
        # `run` in another terminal: let it stop its own children.
        _say(f"asking the foreground `run` (pid {state.runner_pid}) to stop ...")
        os.kill(state.runner_pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while state.runner_alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not any(proc.is_alive() for proc in state.processes.values()):
            clear_state(config)
            _say("the kbmesh stack is down")
            return 0
    _say("stopping the kbmesh stack:")
    ok = stop_parts(state.processes, timeout=timeout)
    if not ok:
        alive = [f"{p} (pid {proc.pid})" for p, proc in state.processes.items() if proc.is_alive()]
        _say(f"error: still running: {', '.join(alive)}")
        return 1
    clear_state(config)
    _say("the kbmesh stack is down")
    return 0


def status(config: StackConfig) -> int:
    """Print each part's state; 0 all healthy, 3 not running, 1 otherwise."""
    state = load_state(config)
    if state is None:
        _say("the kbmesh stack is not running")
        return 3
    runner = ""
    if state.mode == "run":
        runner = f", foreground runner pid {state.runner_pid}"
        if not state.runner_alive():
            runner += " (gone)"
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(state.started_at))
    _say(f"kbmesh stack (started {started} with `{state.mode}`{runner}):")
    conditions = print_table(state, health=True)
    if all(c == "healthy" for c in conditions.values()):
        return 0
    if all(c in ("dead", "not started") for c in conditions.values()):
        return 3
    return 1
