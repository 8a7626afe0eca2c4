"""Conversions between the Task Manager's protos and its domain objects."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import worker_pb2 as wk
from services.common.protos import enum_name, enum_value, timestamp
from services.task_manager.domain.model import (
    Chunking,
    EventType,
    Stage,
    Task,
    TaskError,
    TaskEvent,
    TaskResult,
    TaskState,
)
from services.task_manager.domain.upload import UploadHeader


def chunking_from_proto(config: kn.ChunkingConfig) -> Chunking:
    return Chunking(
        strategy=enum_name(kn.ChunkingConfig.Strategy, config.strategy, "STRATEGY_"),
        chunk_size=config.chunk_size,
        chunk_overlap=config.chunk_overlap,
    )


def chunking_to_proto(chunking: Chunking) -> kn.ChunkingConfig:
    return kn.ChunkingConfig(
        strategy=enum_value(kn.ChunkingConfig.Strategy, chunking.strategy, "STRATEGY_"),
        chunk_size=chunking.chunk_size,
        chunk_overlap=chunking.chunk_overlap,
    )


def state_to_proto(state: TaskState) -> tm.Task.State.ValueType:
    return tm.Task.State.Value(f"STATE_{state.value}")


def state_from_proto(state: tm.Task.State.ValueType) -> TaskState | None:
    name = enum_name(tm.Task.State, state, "STATE_")
    return TaskState(name) if name else None


def stage_to_proto(stage: Stage) -> kn.Stage.ValueType:
    return kn.Stage.Value(f"STAGE_{stage.value or 'UNSPECIFIED'}")


def stage_from_proto(stage: kn.Stage.ValueType) -> Stage:
    return Stage(enum_name(kn.Stage, stage, "STAGE_"))


def task_to_proto(task: Task) -> tm.Task:
    message = tm.Task(
        id=task.id,
        knowledge_base_id=task.knowledge_base_id,
        document_id=task.document_id,
        filename=task.filename,
        content_type=task.content_type,
        size_bytes=task.size_bytes,
        sha256=task.sha256,
        state=state_to_proto(task.state),
        stage=stage_to_proto(task.stage),
        progress=task.progress,
        message=task.message,
        attempt=task.attempt,
        max_attempts=task.max_attempts,
        priority=task.priority,
        worker_id=task.worker_id,
        cancel_requested=task.cancel_requested,
        callback_url=task.callback_url,
        create_time=timestamp(task.create_time_ms),
        update_time=timestamp(task.update_time_ms),
        start_time=timestamp(task.start_time_ms),
        end_time=timestamp(task.end_time_ms),
        next_attempt_time=timestamp(task.next_attempt_time_ms),
    )
    if task.error is not None:
        message.error.CopyFrom(
            tm.TaskError(
                code=task.error.code,
                reason=task.error.reason,
                message=task.error.message,
                retryable=task.error.retryable,
            )
        )
    if task.result is not None:
        message.result.CopyFrom(
            tm.TaskResult(
                chunk_count=task.result.chunk_count,
                page_count=task.result.page_count,
                token_count=task.result.token_count,
                duration_ms=task.result.duration_ms,
            )
        )
    for attempt in task.callback_attempts:
        message.callback_attempts.append(
            tm.CallbackAttempt(
                time=timestamp(attempt.time_ms),
                http_status=attempt.http_status,
                error=attempt.error,
                delivered=attempt.delivered,
            )
        )
    return message


_EVENT_TYPES = {
    EventType.SNAPSHOT: tm.WatchTaskResponse.TYPE_SNAPSHOT,
    EventType.STATE_CHANGED: tm.WatchTaskResponse.TYPE_STATE_CHANGED,
    EventType.PROGRESS: tm.WatchTaskResponse.TYPE_PROGRESS,
    EventType.CALLBACK: tm.WatchTaskResponse.TYPE_CALLBACK,
    EventType.ERROR: tm.WatchTaskResponse.TYPE_ERROR,
}


def event_to_proto(event: TaskEvent) -> tm.WatchTaskResponse:
    return tm.WatchTaskResponse(
        event_id=event.id,
        type=_EVENT_TYPES[event.type],
        task=task_to_proto(event.task),
        time=timestamp(event.time_ms),
        last=event.task.state.terminal,
    )


def has_header(message: tm.UploadRequest) -> bool:
    """Whether any header field is set (they belong in the first message only)."""
    return bool(
        message.knowledge_base_id
        or message.filename
        or message.content_type
        or message.declared_size_bytes
        or message.sha256
        or message.request_id
        or message.HasField("chunking")
        or message.callback_url
        or message.priority
        or message.force
        or message.metadata
    )


def header_from_proto(message: tm.UploadRequest) -> UploadHeader:
    return UploadHeader(
        knowledge_base_id=message.knowledge_base_id,
        filename=message.filename,
        # Through Envoy the HTTP Content-Type arrives on the body.
        content_type=message.content_type or message.file.content_type,
        declared_size_bytes=message.declared_size_bytes,
        sha256=message.sha256.lower(),
        request_id=message.request_id,
        chunking=chunking_from_proto(message.chunking),
        callback_url=message.callback_url,
        priority=message.priority,
        force=message.force,
        metadata=dict(message.metadata),
    )


# --- worker protocol (WorkerService.Connect) ---------------------------------------------------


def duration(ms: int) -> Duration:
    value = Duration()
    value.FromMilliseconds(ms)
    return value


def assignment_to_proto(task: Task, bucket: str) -> wk.ConnectResponse:
    """The Assignment for a task as leased (its lease id and deadline set)."""
    return wk.ConnectResponse(
        assignment=wk.ConnectResponse.Assignment(
            task_id=task.id,
            lease_id=task.lease_id,
            attempt=task.attempt,
            lease_deadline=timestamp(task.lease_deadline_ms),
            knowledge_base_id=task.knowledge_base_id,
            document_id=task.document_id,
            object=wk.ObjectLocation(
                bucket=bucket, key=task.object_key, size_bytes=task.size_bytes, sha256=task.sha256
            ),
            filename=task.filename,
            content_type=task.content_type,
            chunking=chunking_to_proto(task.chunking),
            metadata=task.metadata,
        )
    )


def task_result_from_proto(result: tm.TaskResult) -> TaskResult:
    return TaskResult(
        chunk_count=max(0, result.chunk_count),
        page_count=max(0, result.page_count),
        token_count=max(0, result.token_count),
        duration_ms=max(0, result.duration_ms),
    )


def task_error_from_proto(error: tm.TaskError) -> TaskError:
    """A worker's error report; blanks get neutral values, lengths are bounded."""
    return TaskError(
        code=(error.code or "UNKNOWN")[:64],
        reason=(error.reason or "WORKER_ERROR")[:128],
        message=(error.message or "the worker reported a failure")[:1000],
        retryable=error.retryable,
    )
