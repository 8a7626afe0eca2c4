"""Composition root of the Knowledge Service: opens Redis and S3, builds the servicer,
and runs a knowledge worker beside it (`worker.enabled`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from kbmesh.knowledge.v1 import knowledge_pb2_grpc
from services.common.connections import open_redis, open_s3
from services.common.host import ServiceHost
from services.knowledge.adapters.redis_documents import RedisDocuments
from services.knowledge.adapters.redis_kb_store import RedisKnowledgeBases
from services.knowledge.api import KNOWLEDGE_SERVICE, KnowledgeApi
from services.knowledge.settings import KnowledgeSettings
from services.knowledge.worker.app import build_runtime

ERROR_DOMAIN = "knowledge.kbmesh"


@dataclass(frozen=True)
class KnowledgeApp:
    settings: KnowledgeSettings
    redis: Redis
    s3: Any
    host: ServiceHost


@asynccontextmanager
async def build_app(settings: KnowledgeSettings) -> AsyncIterator[KnowledgeApp]:
    """Everything the Knowledge Service runs on, opened in order and closed in reverse."""
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(open_redis(settings.redis))
        s3 = await stack.enter_async_context(open_s3(settings.s3))
        host = ServiceHost(
            "knowledge", settings.grpc, [KNOWLEDGE_SERVICE], error_domain=ERROR_DOMAIN
        )
        knowledge_bases = RedisKnowledgeBases(redis)
        knowledge_pb2_grpc.add_KnowledgeServiceServicer_to_server(
            KnowledgeApi(knowledge_bases, RedisDocuments(redis)), host.server
        )
        if settings.worker.enabled:
            worker = build_runtime(settings, redis, s3)
            worker.start()
            stack.push_async_callback(worker.close)
            # SIGTERM: the worker takes no new tasks, finishes or hands back the rest.
            grace = settings.worker.shutdown_grace_seconds
            host.add_drain_hook(lambda: worker.drain(grace))
        yield KnowledgeApp(settings=settings, redis=redis, s3=s3, host=host)
