"""The `python -m services.<name>` entry point both services share."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

from services.common.connections import DependencyUnavailable
from services.common.host import ServiceHost
from services.common.logs import configure_logging
from services.common.settings import LogSettings

log = logging.getLogger(__name__)


class ServiceSettings(Protocol):
    @property
    def log(self) -> LogSettings: ...


class HostedApp(Protocol):
    @property
    def host(self) -> ServiceHost: ...


S = TypeVar("S", bound=ServiceSettings)

# glibc mallopt parameters.
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def bound_native_memory() -> None:
    """Keep RSS flat however many bytes stream through.

    glibc raises its mmap threshold after the first large free, after which
    multi-MiB upload parts come from the heap and fragment it: RSS grows with
    the upload size. A fixed threshold returns every large buffer to the OS
    when freed; two arenas stop gRPC's threads from each holding their own.
    Same effect as MALLOC_MMAP_THRESHOLD_=131072 MALLOC_ARENA_MAX=2. Measured
    by bench/upload.py (RSS growth during a 1 GB upload)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        libc.mallopt(_M_ARENA_MAX, 2)


def run_service(
    name: str,
    settings_factory: Callable[[], S],
    build_app: Callable[[S], AbstractAsyncContextManager[HostedApp]],
) -> int:
    """Read settings once, configure logs, serve until SIGTERM. Returns the exit code."""
    bound_native_memory()
    settings = settings_factory()
    configure_logging(settings.log, name)

    async def serve() -> None:
        async with build_app(settings) as app:
            await app.host.start()
            await app.host.serve_until_stopped()

    try:
        asyncio.run(serve())
    except DependencyUnavailable as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0
