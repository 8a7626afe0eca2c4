"""Caller authentication: per-tenant API keys, checked on every public RPC.

A key reads `kbm_<id>_<secret>`: `<id>` (26 characters, `services.common.ids`)
names the record `redis_keys.api_key(id)`, which holds the tenant and the
SHA-256 of `<secret>` (256 random bits, so a fast hash is enough), never the
secret itself. Checking a key is one HGETALL and a constant-time comparison;
revoking deletes the record, so the next call with the key fails (no cache).

`ApiKeyAuth` is a server interceptor (installed by ServiceHost inside the error
translation): every method of every service needs a key, except the open ones
(health, reflection, and the worker stream, which checks its own worker
tokens). The authenticated tenant is in `current_tenant()` while the handler
runs, and the caller's credentials in `forwarded_credentials()` for calls the
service makes on the caller's behalf (Knowledge Service -> Task Manager).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import inspect
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
from redis.asyncio import Redis

from services.common import redis_keys
from services.common.errors import Unauthenticated
from services.common.ids import is_id, new_id
from services.common.settings import DEFAULT_TENANT, TENANT_PATTERN, AuthSettings, GrpcSettings
from services.common.status import rewrap_handler

log = logging.getLogger(__name__)

KEY_PREFIX = "kbm"
REASON_MISSING = "MISSING_CREDENTIALS"
REASON_INVALID = "INVALID_API_KEY"
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)
_TENANT = re.compile(TENANT_PATTERN)
MAX_KEY_NAME_CHARS = 100

# Always open: health checks (load balancers, Envoy) and reflection (grpcurl,
# the gateway's descriptor); the worker stream authenticates workers itself.
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
WORKER_SERVICE = "kbmesh.taskmanager.v1.WorkerService"
OPEN_SERVICES = frozenset({HEALTH_SERVICE, *REFLECTION_SERVICES, WORKER_SERVICE})

_tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("kbmesh_tenant", default=None)
_credentials: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kbmesh_credentials", default=None
)


def current_tenant() -> str | None:
    """The tenant of the RPC being handled; None outside a public RPC (background
    work: dispatch, workers, maintenance), which is not scoped to a tenant."""
    return _tenant.get()


def caller_tenant() -> str:
    """The tenant of the RPC being handled (DEFAULT_TENANT on a server without
    authentication: one tenant)."""
    return _tenant.get() or DEFAULT_TENANT


def forwarded_credentials() -> tuple[tuple[str, str], ...]:
    """Metadata to pass on a call made for the current caller (empty when the
    caller presented none, e.g. with auth off)."""
    value = _credentials.get()
    return (("authorization", value),) if value else ()


class TenantScope:
    """`with TenantScope("t"):` runs code as tenant `t` (tests, admin tools)."""

    def __init__(self, tenant: str | None, credentials: str | None = None) -> None:
        self._tenant = tenant
        self._credentials = credentials
        self._tokens: tuple[contextvars.Token[Any], ...] = ()

    def __enter__(self) -> TenantScope:
        self._tokens = (_tenant.set(self._tenant), _credentials.set(self._credentials))
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            _tenant.reset(self._tokens[0])
            _credentials.reset(self._tokens[1])
        except ValueError:  # a stream closed from another context: it ends with it
            pass


def validate_tenant(tenant: str) -> str:
    if not _TENANT.match(tenant):
        raise ValueError("a tenant is 1-63 of a-z 0-9 _ - (starting with a letter or digit)")
    return tenant


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


@dataclass(frozen=True)
class ApiKey:
    id: str
    tenant: str
    name: str
    create_time_ms: int


def parse_key(key: str) -> tuple[str, str] | None:
    """(id, secret) of a well-formed key, else None."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or not is_id(parts[1]) or not parts[2]:
        return None
    return parts[1], parts[2]


class ApiKeys:
    """API key records in Redis."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def create(self, tenant: str, name: str = "") -> tuple[ApiKey, str]:
        """A new key for `tenant`; (record, the key to hand out: shown once)."""
        validate_tenant(tenant)
        if len(name) > MAX_KEY_NAME_CHARS or not name.isprintable():
            raise ValueError(f"a key name is at most {MAX_KEY_NAME_CHARS} printable characters")
        created = int(time.time() * 1000)
        key_id = new_id(created)
        secret = secrets.token_urlsafe(32)
        record = ApiKey(key_id, tenant, name, created)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                redis_keys.api_key(key_id),
                mapping={
                    "tenant": tenant,
                    "name": name,
                    "secret_sha256": _digest(secret).hex(),
                    "create_time_ms": str(created),
                },
            )
            pipe.zadd(redis_keys.API_KEYS, {key_id: 0})
            await pipe.execute()
        return record, f"{KEY_PREFIX}_{key_id}_{secret}"

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        ids: Any = await self._redis.zrange(redis_keys.API_KEYS, 0, -1)
        found = []
        for raw in ids:
            key_id = raw.decode()
            fields: Any = await self._redis.hgetall(redis_keys.api_key(key_id))
            if not fields:
                continue
            f = {k.decode(): v.decode() for k, v in fields.items()}
            if tenant is None or f["tenant"] == tenant:
                found.append(ApiKey(key_id, f["tenant"], f["name"], int(f["create_time_ms"])))
        return found

    async def revoke(self, key_id: str) -> bool:
        """Deletes the key; True if it existed. Calls with it fail from now on."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(redis_keys.api_key(key_id))
            pipe.zrem(redis_keys.API_KEYS, key_id)
            deleted, _ = await pipe.execute()
        return bool(deleted)

    async def tenant_of(self, key: str) -> str | None:
        """The tenant of a valid, unrevoked key; None otherwise."""
        parsed = parse_key(key)
        if parsed is None:
            return None
        key_id, secret = parsed
        fields: Any = await self._redis.hmget(
            redis_keys.api_key(key_id), ["tenant", "secret_sha256"]
        )
        tenant, stored = fields
        digest = _digest(secret)
        if tenant is None or stored is None:
            hmac.compare_digest(digest, digest)  # same work whether the id exists or not
            return None
        if not hmac.compare_digest(digest, bytes.fromhex(stored.decode())):
            return None
        return str(tenant.decode())


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Authenticator:
    """Who a caller is, from its `authorization` metadata."""

    def __init__(self, settings: AuthSettings, keys: ApiKeys | None) -> None:
        if settings.mode == "api_keys" and keys is None:
            raise ValueError("auth mode api_keys needs the API key store")
        self.settings = settings
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return self.settings.mode != "off"

    async def tenant_for(self, authorization: str | None) -> str:
        """The caller's tenant; raises Unauthenticated."""
        if not self.enabled:
            return self.settings.default_tenant
        assert self._keys is not None
        if not authorization:
            raise Unauthenticated(
                REASON_MISSING,
                "this call needs `authorization: Bearer <API key>` metadata "
                "(an `Authorization` header through the gateway)",
            )
        match = _BEARER.match(authorization)
        tenant = None if match is None else await self._keys.tenant_of(match.group(1))
        if tenant is None:
            raise Unauthenticated(REASON_INVALID, "the API key is not valid or was revoked")
        return tenant


def build_authenticator(
    settings: AuthSettings, grpc_settings: GrpcSettings, redis: Redis
) -> Authenticator:
    """The authenticator a service runs with; refuses auth off on a non-loopback
    address (anyone on the network would read every knowledge base)."""
    if settings.mode == "off":
        if not is_loopback(grpc_settings.host):
            raise RuntimeError(
                f"auth.mode=off is only allowed on a loopback address, not {grpc_settings.host!r}:"
                " configure API keys (auth.mode=api_keys) to listen on the network"
            )
        log.warning(
            "AUTHENTICATION IS OFF: every caller acts as tenant %r without credentials "
            "(auth.mode=off; loopback only)",
            settings.default_tenant,
        )
        return Authenticator(settings, None)
    return Authenticator(settings, ApiKeys(redis))


if TYPE_CHECKING:
    _Interceptor = grpc.aio.ServerInterceptor[Any, Any]
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _Interceptor = grpc.aio.ServerInterceptor
    _Handler = grpc.RpcMethodHandler


def service_of(method: str) -> str:
    """`/pkg.Service/Method` -> `pkg.Service`."""
    return method.lstrip("/").split("/", 1)[0]


class ApiKeyAuth(_Interceptor):
    """Authenticates every RPC except those of `open_services` before its handler
    runs, and runs the handler as the caller's tenant."""

    def __init__(
        self, authenticator: Authenticator, open_services: Iterable[str] = OPEN_SERVICES
    ) -> None:
        self._auth = authenticator
        self._open = frozenset(open_services)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[_Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> _Handler:
        handler = await continuation(handler_call_details)
        if handler is None or service_of(handler_call_details.method) in self._open:
            return handler
        authenticator = self._auth

        async def enter(context: grpc.aio.ServicerContext[Any, Any]) -> TenantScope:
            metadata = dict(context.invocation_metadata() or ())
            raw = metadata.get("authorization")
            authorization = raw if isinstance(raw, str) else None
            tenant = await authenticator.tenant_for(authorization)
            return TenantScope(tenant, authorization if authenticator.enabled else None)

        def unary_response(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
            async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                with await enter(context):
                    result = fn(request, context)
                    return await result if inspect.isawaitable(result) else result

            return wrapped

        def stream_response(fn: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
            async def wrapped(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                scope = await enter(context)
                with scope:
                    responses = fn(request, context)
                    if inspect.isawaitable(responses):
                        await responses
                        return
                    async for response in responses:
                        yield response

            return wrapped

        return rewrap_handler(
            handler,
            lambda fn, _, streams_responses: (
                stream_response(fn) if streams_responses else unary_response(fn)
            ),
        )
