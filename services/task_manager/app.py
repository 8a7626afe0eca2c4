"""Composition root of the Task Manager: opens Redis and S3, builds the servicers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from redis.asyncio import Redis

from kbmesh.knowledge.v1 import knowledge_pb2
from kbmesh.taskmanager.v1 import document_tasks_pb2_grpc, task_manager_pb2_grpc, worker_pb2_grpc
from services.common.auth import build_authenticator
from services.common.connections import open_redis, open_s3
from services.common.host import ServiceHost
from services.task_manager.adapters.redis_callbacks import RedisCallbackOutbox
from services.task_manager.adapters.redis_dispatch import RedisDispatchQueue
from services.task_manager.adapters.redis_quotas import QuotaLimits, RedisQuotas
from services.task_manager.adapters.redis_store import RedisTaskStore
from services.task_manager.adapters.s3_put import open_signed_put
from services.task_manager.adapters.s3_storage import S3ObjectStore
from services.task_manager.api import (
    TASK_MANAGER_SERVICE,
    WORKER_SERVICE,
    TaskManagerApi,
    WorkerApi,
)
from services.task_manager.callbacks import CallbackSender
from services.task_manager.dispatch import Dispatcher
from services.task_manager.document_tasks_api import DOCUMENT_TASK_SERVICE, DocumentTaskApi
from services.task_manager.domain.dispatch import DispatchPolicy
from services.task_manager.domain.upload import UploadLimits, Uploads
from services.task_manager.domain.worker_auth import WorkerTokens
from services.task_manager.settings import DispatchSettings, TaskManagerSettings
from services.task_manager.sweeper import MultipartSweeper

ERROR_DOMAIN = "taskmanager.kbmesh"
KNOWLEDGE_SERVICE = knowledge_pb2.DESCRIPTOR.services_by_name["KnowledgeService"].full_name
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskManagerApp:
    settings: TaskManagerSettings
    redis: Redis
    s3: Any
    host: ServiceHost


def worker_tokens(settings: DispatchSettings) -> WorkerTokens:
    tokens = WorkerTokens(
        (t.get_secret_value() for t in settings.worker_tokens), settings.worker_token_sha256
    )
    if not tokens:
        log.warning("no worker tokens configured: no worker can connect (dispatch.worker_tokens)")
    return tokens


def build_dispatcher(
    settings: TaskManagerSettings, redis: Redis, tasks: RedisTaskStore
) -> Dispatcher:
    d = settings.dispatch
    policy = DispatchPolicy(
        lease_ms=int(d.lease_seconds * 1000),
        heartbeat_ms=int(d.heartbeat_seconds * 1000),
        backoff_base_ms=int(d.backoff_base_seconds * 1000),
        backoff_cap_ms=int(d.backoff_cap_seconds * 1000),
    )
    queue = RedisDispatchQueue(redis, tasks)
    return Dispatcher(
        queue,
        policy,
        notices=queue.notices,
        claim_batch=d.claim_batch,
        poll_interval=d.poll_interval_seconds,
        maintenance_interval=d.maintenance_interval_seconds,
    )


@asynccontextmanager
async def build_app(settings: TaskManagerSettings) -> AsyncIterator[TaskManagerApp]:
    """Everything the Task Manager runs on, opened in order and closed in reverse."""
    async with AsyncExitStack() as stack:
        redis = await stack.enter_async_context(open_redis(settings.redis))
        s3 = await stack.enter_async_context(open_s3(settings.s3))
        signed_put = await stack.enter_async_context(open_signed_put(settings.s3))
        # Each streamed PUT holds a connection for its upload's duration: its
        # own pool, so whole objects and parts keep theirs.
        streamed_put = await stack.enter_async_context(
            open_signed_put(settings.s3, connections=max(1, settings.uploads.streamed_puts))
        )
        authenticator = build_authenticator(settings.auth, settings.grpc, redis)
        host = ServiceHost(
            "task-manager",
            settings.grpc,
            [TASK_MANAGER_SERVICE, WORKER_SERVICE, DOCUMENT_TASK_SERVICE],
            error_domain=ERROR_DOMAIN,
            # Through Envoy the gateway serves the Knowledge Service too.
            mesh_services=[TASK_MANAGER_SERVICE, WORKER_SERVICE, KNOWLEDGE_SERVICE],
            authenticator=authenticator,
        )
        limits = settings.uploads
        tasks = RedisTaskStore(redis, request_id_ttl_seconds=limits.request_id_ttl_seconds)
        objects = S3ObjectStore(
            s3,
            settings.s3.bucket,
            part_size=limits.part_bytes,
            parts_in_flight=limits.parts_in_flight,
            put=signed_put.put,
            upload_part=signed_put.upload_part,
            delete=signed_put.delete,
            stream=streamed_put.stream if limits.streamed_puts else None,
            max_streams=limits.streamed_puts,
        )
        uploads = Uploads(
            tasks,
            objects,
            UploadLimits(
                max_upload_bytes=limits.max_bytes,
                max_uploads_in_flight=limits.max_in_flight,
                max_queue_depth=limits.max_queue_depth,
                max_attempts=limits.max_attempts,
                callback_allow_list=limits.callback_allow_list,
                retry_after_seconds=limits.retry_after_seconds,
            ),
            RedisQuotas(
                redis,
                QuotaLimits(
                    uploads_per_minute=limits.tenant_uploads_per_minute,
                    storage_bytes=limits.tenant_storage_bytes,
                    documents=limits.tenant_documents,
                ),
            ),
        )
        callbacks = CallbackSender(
            tasks, RedisCallbackOutbox(redis), settings.callbacks, limits.callback_allow_list
        )
        callbacks.start()
        stack.push_async_callback(callbacks.stop)
        sweeper = MultipartSweeper(
            objects,
            stale_after=timedelta(hours=limits.stale_multipart_hours),
            every=timedelta(minutes=10),
        )
        sweeper.start()
        stack.push_async_callback(sweeper.stop)
        server = host.server
        task_manager_pb2_grpc.add_TaskManagerServiceServicer_to_server(
            TaskManagerApi(uploads, tasks), server
        )
        dispatcher = build_dispatcher(settings, redis, tasks)
        dispatcher.start()
        stack.push_async_callback(dispatcher.close)
        # SIGTERM: stop assigning and tell workers to drain before streams are cut.
        grace = settings.grpc.shutdown_grace_seconds
        host.add_drain_hook(lambda: dispatcher.drain(grace))
        document_tasks_pb2_grpc.add_DocumentTaskServiceServicer_to_server(
            DocumentTaskApi(tasks, max_attempts=limits.max_attempts), server
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(
            WorkerApi(
                dispatcher,
                worker_tokens(settings.dispatch),
                settings.s3.bucket,
                require_certificate=settings.dispatch.require_worker_certificate,
            ),
            server,
        )
        yield TaskManagerApp(settings=settings, redis=redis, s3=s3, host=host)
