"""The `python -m services.<name>` entry point both services share."""

from __future__ import annotations

import asyncio
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


def run_service(
    name: str,
    settings_factory: Callable[[], S],
    build_app: Callable[[S], AbstractAsyncContextManager[HostedApp]],
) -> int:
    """Read settings once, configure logs, serve until SIGTERM. Returns the exit code."""
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
