"""Connections to Redis and S3, opened once by each service's composition root.

Both wait (bounded) for their server at start-up, so the stack can start in
any order, and fail with a clear message instead of a stack trace when the
server never answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aioboto3
from botocore.config import Config as BotoConfig
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.settings import RedisSettings, S3Settings

log = logging.getLogger(__name__)


class DependencyUnavailable(RuntimeError):
    """A server the service needs did not answer within its start-up timeout."""


async def wait_until(
    what: str, probe: Callable[[], Awaitable[object]], within: float, interval: float = 0.25
) -> None:
    """Calls `probe` until it succeeds; DependencyUnavailable after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        try:
            await probe()
            return
        except Exception as exc:
            if time.monotonic() >= deadline:
                raise DependencyUnavailable(
                    f"{what} did not answer within {within:g}s: {exc}"
                ) from exc
            await asyncio.sleep(interval)


@asynccontextmanager
async def open_redis(settings: RedisSettings) -> AsyncIterator[Redis]:
    client = Redis.from_url(
        settings.url.get_secret_value(),
        decode_responses=False,
        health_check_interval=10,
        max_connections=settings.max_connections,
        socket_keepalive=True,
        # A pooled connection to a Redis that restarted fails once with
        # "connection closed": reconnect and retry instead of failing the RPC.
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries=5),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
    )
    try:
        await wait_until("Redis", client.ping, settings.connect_timeout_seconds)
        log.info("connected to Redis")
        yield client
    finally:
        await client.aclose()


@asynccontextmanager
async def open_s3(settings: S3Settings) -> AsyncIterator[Any]:
    """An aiobotocore S3 client whose bucket is known to exist."""
    session = aioboto3.Session()
    config = BotoConfig(
        retries={"max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path"},
        max_pool_connections=64,
    )
    async with session.client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id.get_secret_value(),
        aws_secret_access_key=settings.secret_access_key.get_secret_value(),
        config=config,
    ) as client:

        async def head_bucket() -> object:
            return await client.head_bucket(Bucket=settings.bucket)

        await wait_until(
            f"S3 bucket {settings.bucket!r} at {settings.endpoint_url}",
            head_bucket,
            settings.connect_timeout_seconds,
        )
        log.info("connected to S3", extra={"bucket": settings.bucket})
        yield client
