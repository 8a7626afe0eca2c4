"""The gRPC server host both services run in.

It owns what every kbmesh server has: the error translation interceptor,
`grpc.health.v1` health, server reflection, and the shutdown sequence on
SIGTERM/SIGINT: health NOT_SERVING (so Envoy and clients move away), the
service's own drain hook (stop taking new work), `server.stop(grace)` so
in-flight RPCs finish within a bound, then the rest is cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer

from services.common.auth import OPEN_SERVICES, ApiKeyAuth, Authenticator
from services.common.settings import GrpcSettings
from services.common.status import ErrorTranslation
from services.common.tls import mtls_server_credentials, server_credentials
from services.common.validation import StringBounds

log = logging.getLogger(__name__)

# Envoy adds this header to reflection requests it forwards: through the
# gateway, reflection describes every public service of the mesh, not only
# the ones of the replica that happens to answer.
REFLECTION_SCOPE_HEADER = "x-kbmesh-reflection-scope"
_HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class ScopedReflection(reflection_pb2_grpc.ServerReflectionServicer):  # type: ignore[misc]
    """Reflection that answers for this server, or for the mesh via the gateway."""

    def __init__(self, own: Sequence[str], mesh: Sequence[str]) -> None:
        self._own = ReflectionServicer(list(own))
        self._mesh = ReflectionServicer(list(mesh))

    def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        scope = dict(context.invocation_metadata() or ()).get(REFLECTION_SCOPE_HEADER)
        servicer = self._mesh if scope == "gateway" else self._own
        result: AsyncIterator[reflection_pb2.ServerReflectionResponse] = (
            servicer.ServerReflectionInfo(request_iterator, context)
        )
        return result


class ServiceHost:
    """A grpc.aio server with health, reflection and graceful shutdown.

    `services` are the full names this server serves (for reflection and
    per-service health); `mesh_services` the names reflection lists when asked
    through the gateway; `authenticator` checks callers of every public RPC
    (services/common/auth.py).
    """

    def __init__(
        self,
        name: str,
        settings: GrpcSettings,
        services: Sequence[str],
        *,
        error_domain: str,
        mesh_services: Sequence[str] = (),
        authenticator: Authenticator | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.services = tuple(services)
        options = [
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # A fixed per-stream receive window instead of gRPC's BDP probing,
            # which grows it to tens of MiB on a fast link and holds that much
            # of every upload in memory before the service reads it.
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", settings.stream_window_bytes),
        ]
        # Authentication runs inside the error translation, so a refused caller
        # gets UNAUTHENTICATED with its ErrorInfo like any other error.
        interceptors: list[Any] = [ErrorTranslation(error_domain)]
        if authenticator is not None:
            interceptors.append(ApiKeyAuth(authenticator))
        # Then a length bound on every string of every public request.
        interceptors.append(StringBounds(OPEN_SERVICES))
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        self.mtls_port: int | None = None  # bound by start() when configured
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        own = [*self.services, _HEALTH_SERVICE, reflection.SERVICE_NAME]
        mesh = [
            *dict.fromkeys([*mesh_services, *self.services]),
            _HEALTH_SERVICE,
            reflection.SERVICE_NAME,
        ]
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
            ScopedReflection(own, mesh), self.server
        )
        self.port = 0
        self._stopping = asyncio.Event()
        self._drain_hooks: list[Callable[[], Awaitable[None]]] = []

    def add_drain_hook(self, hook: Callable[[], Awaitable[None]]) -> None:
        """Runs at shutdown after NOT_SERVING, before in-flight RPCs are drained:
        the place to stop taking new work (dispatching, pulling tasks)."""
        self._drain_hooks.append(hook)

    async def start(self) -> int:
        """Binds and starts serving; health stays NOT_SERVING until `set_serving`."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        credentials = server_credentials(self.settings)
        if credentials is None:
            self.port = self.server.add_insecure_port(self.settings.address)
        else:  # TLS only: a plaintext client fails the handshake
            self.port = self.server.add_secure_port(self.settings.address, credentials)
        if self.port == 0:
            raise RuntimeError(f"{self.name}: could not bind {self.settings.address}")
        if self.settings.mtls_port is not None:
            address = f"{self.settings.host}:{self.settings.mtls_port}"
            self.mtls_port = self.server.add_secure_port(
                address, mtls_server_credentials(self.settings)
            )
            if self.mtls_port == 0:
                raise RuntimeError(f"{self.name}: could not bind {address}")
        await self.server.start()
        log.info(
            "listening",
            extra={
                "address": f"{self.settings.host}:{self.port}",
                "tls": credentials is not None,
                "client_certs": bool(self.settings.tls_client_ca_file),
                "mtls_port": self.mtls_port,
            },
        )
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._set_health(status)

    async def _set_health(
        self, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType
    ) -> None:
        for service in ("", *self.services):
            await self.health.set(service, status)

    def request_stop(self) -> None:
        """Begins shutdown (idempotent); `wait_for_stop` returns."""
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("signal received, shutting down", extra={"signal": sig.name})
        self.request_stop()

    async def wait_for_stop(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        """NOT_SERVING, drain hooks, then stop with the configured grace."""
        grace = self.settings.shutdown_grace_seconds
        await self.health.enter_graceful_shutdown()
        for hook in self._drain_hooks:
            await hook()
        log.info("draining in-flight RPCs", extra={"grace_seconds": grace})
        await self.server.stop(grace)
        log.info("stopped")

    async def serve_until_stopped(self) -> None:
        """Serve (SERVING) until SIGTERM/SIGINT or `request_stop`, then shut down."""
        self.install_signal_handlers()
        await self.set_serving(True)
        await self.wait_for_stop()
        await self.stop()
