"""Composition root of the Knowledge Service: opens Redis, S3 and the chunk index,
builds the servicer, runs index maintenance, and runs a knowledge worker beside
it (`worker.enabled`): a child process by default, or in this process
(`worker.isolation`)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from kbmesh.knowledge.v1 import knowledge_pb2_grpc
from services.common.auth import build_authenticator
from services.common.connections import open_redis, open_s3
from services.common.host import ServiceHost
from services.common.tls import open_channel
from services.knowledge.adapters.document_tasks import DocumentTasks
from services.knowledge.adapters.redis_documents import RedisDocuments
from services.knowledge.adapters.redis_kb_store import RedisKnowledgeBases
from services.knowledge.adapters.s3_objects import S3Objects
from services.knowledge.adapters.task_cancel import TaskCanceller
from services.knowledge.api import KNOWLEDGE_SERVICE, KnowledgeApi
from services.knowledge.domain.chunks import Embedder
from services.knowledge.index.hash_embedder import HashEmbedder
from services.knowledge.index.lance_index import LanceChunkIndex
from services.knowledge.index.location import connect
from services.knowledge.index.maintenance import run_maintenance
from services.knowledge.settings import KnowledgeSettings
from services.knowledge.worker.app import build_runtime
from services.knowledge.worker.process import WorkerProcess, autogroup_enabled

ERROR_DOMAIN = "knowledge.kbmesh"
# The ingestion pipeline's ONNX MiniLM: one model per process, shared by the
# in-process worker and the searches (loaded on first use).
LOCAL_EMBEDDER = "services.knowledge.ingest.embedding:shared_minilm"

log = logging.getLogger(__name__)


def build_query_embedder(settings: KnowledgeSettings) -> Embedder | None:
    """The embedder for search queries, or None when it is not installed: then
    vector and hybrid search answer FAILED_PRECONDITION and keyword search works."""
    if settings.search.query_embedder == "hash":
        log.warning("search.query_embedder=hash: a TEST-ONLY embedder answers vector searches")
        return HashEmbedder()
    module_name, _, attribute = LOCAL_EMBEDDER.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError):
        log.warning("no local embedding model installed: vector and hybrid search are off")
        return None
    embedder: Embedder = factory(settings.embedding.local_batch_size)
    return embedder


async def open_index(settings: KnowledgeSettings) -> LanceChunkIndex:
    db = await asyncio.to_thread(connect, settings.index, settings.s3)
    return LanceChunkIndex(db, vector_index_min_rows=settings.index.vector_index_min_rows)


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
            "knowledge",
            settings.grpc,
            [KNOWLEDGE_SERVICE],
            error_domain=ERROR_DOMAIN,
            authenticator=build_authenticator(settings.auth, settings.grpc, redis),
        )
        knowledge_bases = RedisKnowledgeBases(redis)
        index = await open_index(settings)
        channel = open_channel(settings.task_manager.address, settings.task_manager.tls)
        stack.push_async_callback(channel.close, None)
        embedder = await asyncio.to_thread(build_query_embedder, settings)
        api = KnowledgeApi(
            knowledge_bases,
            RedisDocuments(redis),
            index=index,
            embedder=embedder,
            objects=S3Objects(s3, settings.s3.bucket),
            tasks=TaskCanceller(channel),
            queue=DocumentTasks(channel),
            embedding=settings.embedding,
        )
        knowledge_pb2_grpc.add_KnowledgeServiceServicer_to_server(api, host.server)
        child_worker = settings.worker.enabled and settings.worker.isolation == "process"
        maintain = settings.index.optimize_interval_seconds > 0
        if maintain and not child_worker:
            maintenance = asyncio.create_task(
                run_maintenance(
                    index, settings.index.optimize_interval_seconds, knowledge_bases.exists
                )
            )

            async def stop_maintenance() -> None:
                maintenance.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await maintenance

            stack.push_async_callback(stop_maintenance)
        grace = settings.worker.shutdown_grace_seconds
        if child_worker:
            # Pipeline CPU work in a child process at a lower priority: it cannot
            # starve the searches here (services/knowledge/worker/process.py). Index
            # maintenance (compaction, index updates) is CPU work too: it runs there.
            # Where the kernel shares CPUs between sessions first, the child
            # gets a session of its own to lower (docs/ingestion.md, "Sessions").
            child = WorkerProcess(
                shutdown_grace_seconds=grace,
                extra_args=["--maintain"] if maintain else [],
                own_session=settings.worker.nice > 0 and autogroup_enabled(),
            )
            child.start()
            stack.push_async_callback(child.close)
            host.add_drain_hook(lambda: child.drain(grace))
        elif settings.worker.enabled:
            # The same index object: chunks the in-process worker writes are
            # searchable here at once, not after the read-consistency interval.
            worker = build_runtime(settings, redis, s3, index=index)
            worker.start()
            stack.push_async_callback(worker.close)
            # SIGTERM: the worker takes no new tasks, finishes or hands back the rest.
            host.add_drain_hook(lambda: worker.drain(grace))
        yield KnowledgeApp(settings=settings, redis=redis, s3=s3, host=host)
