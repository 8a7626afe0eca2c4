"""Wiring of the knowledge worker: settings → handler → runtime.

Shared by the Knowledge Service (which runs the worker beside its gRPC server)
and `python -m services.knowledge.worker` (the worker alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, cast

from redis.asyncio import Redis

from services.common.connections import open_redis, open_s3
from services.knowledge.settings import KnowledgeSettings
from services.knowledge.worker.handlers import HandlerFactory, WorkerResources
from services.knowledge.worker.process import watch_parent
from services.knowledge.worker.runtime import WorkerConfig, WorkerRuntime, default_worker_id

log = logging.getLogger(__name__)


def load_handler_factory(spec: str) -> HandlerFactory:
    """The factory named by "module:attribute" (worker.handler)."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"worker.handler must be 'module:attribute', got {spec!r}")
    module = importlib.import_module(module_name)
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"worker.handler {spec!r} is not a callable")
    return cast(HandlerFactory, factory)


def build_runtime(
    settings: KnowledgeSettings, redis: Redis | None, s3: Any, index: Any = None
) -> WorkerRuntime:
    """`index`: the service's ChunkIndex, shared with its searches; without one, the
    ingestion handler opens its own (services.knowledge.ingest.pipeline)."""
    worker = settings.worker
    worker_id = worker.id or default_worker_id()
    factory = load_handler_factory(worker.handler)
    handler = factory(
        WorkerResources(
            worker_id=worker_id,
            options=dict(worker.handler_options),
            redis=redis,
            s3=s3,
            index=index,
            settings=settings,
        )
    )
    token = worker.token.get_secret_value()
    if not token:
        log.warning("worker.token is empty: the Task Manager will refuse this worker")
    return WorkerRuntime(
        WorkerConfig(
            address=settings.task_manager.address,
            token=token,
            worker_id=worker_id,
            concurrency=worker.concurrency,
            content_types=worker.content_types,
            reconnect_base_seconds=worker.reconnect_base_seconds,
            reconnect_cap_seconds=worker.reconnect_cap_seconds,
            tls=settings.task_manager.tls,
        ),
        handler,
    )


@asynccontextmanager
async def build_worker(
    settings: KnowledgeSettings, *, maintain: bool = False
) -> AsyncIterator[WorkerRuntime]:
    """The worker alone, with the connections a handler may need. `maintain`: this
    process also runs the index maintenance passes (the Knowledge Service hands
    them to its worker child, so that CPU work runs at the worker's priority)."""
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(open_redis(settings.redis))
        s3 = await stack.enter_async_context(open_s3(settings.s3))
        index: Any = None
        interval = settings.index.optimize_interval_seconds
        if maintain and interval > 0:
            from services.knowledge.adapters.redis_kb_store import RedisKnowledgeBases
            from services.knowledge.index.lance_index import LanceChunkIndex
            from services.knowledge.index.location import connect
            from services.knowledge.index.maintenance import run_maintenance

            index = LanceChunkIndex(
                await asyncio.to_thread(connect, settings.index, settings.s3),
                vector_index_min_rows=settings.index.vector_index_min_rows,
            )
            maintenance = asyncio.create_task(
                run_maintenance(index, interval, RedisKnowledgeBases(redis).exists)
            )

            async def stop_maintenance() -> None:
                maintenance.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await maintenance

            stack.push_async_callback(stop_maintenance)
        runtime = build_runtime(settings, redis, s3, index=index)
        stack.push_async_callback(runtime.close)
        yield runtime


async def serve_worker(
    settings: KnowledgeSettings, *, parent_pid: int = 0, maintain: bool = False
) -> None:
    """Run the worker until SIGTERM/SIGINT (or, with `parent_pid`, until that
    process is gone), then drain within the grace period."""
    async with build_worker(settings, maintain=maintain) as runtime:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        watcher = asyncio.create_task(watch_parent(parent_pid, stop)) if parent_pid else None
        runner = runtime.start()
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({runner, stopped}, return_when=asyncio.FIRST_COMPLETED)
        if stop.is_set():
            log.info("signal received, draining the worker")
            await runtime.drain(settings.worker.shutdown_grace_seconds)
        stopped.cancel()
        if watcher is not None:
            watcher.cancel()
