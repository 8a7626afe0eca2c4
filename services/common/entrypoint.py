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
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# Buffers up to this size come from the heap and are reused; gRPC messages
# (uploads arrive in pieces of at most 1 MiB) stay below it.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
# Free memory at the top of the heap beyond this goes back to the OS.
TRIM_THRESHOLD_BYTES = 16 * 1024 * 1024


def bound_native_memory() -> None:
    """Keep RSS flat however many bytes stream through, without paying a page
    fault for every byte.

    By default glibc raises its mmap threshold after the first large free; an
    earlier version of the Task Manager joined each 8 MiB part into one
    buffer, those came from the heap and fragmented it, and RSS grew with the
    upload size. Parts are no longer joined (s3_storage), so the largest
    buffers are the ~1 MiB gRPC messages, all alike and short-lived: with a
    fixed 4 MiB threshold they are served from the heap and reused. A 128 KiB
    threshold (the previous setting) mmapped and unmapped each one, a fresh
    page fault every 4 KiB: 390k faults and 1.7 s of kernel time per GiB
    uploaded, against 0 and 0.7 s now (bench/upload.py; RSS growth during
    1 GiB stays about 34 MiB). Two arenas stop gRPC's threads from each
    holding their own. Same as MALLOC_MMAP_THRESHOLD_=4194304
    MALLOC_TRIM_THRESHOLD_=16777216 MALLOC_ARENA_MAX=2."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    if hasattr(libc, "mallopt"):
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
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
