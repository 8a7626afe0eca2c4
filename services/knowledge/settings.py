"""Knowledge Service settings: env prefix `KBMESH_KNOWLEDGE_`, groups split by `__`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import GrpcSettings, LogSettings, RedisSettings, S3Settings


class TaskManagerLink(BaseModel):
    """How the Knowledge Service's workers reach the Task Manager."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str = "127.0.0.1:50051"


class WorkerSettings(BaseModel):
    """The knowledge worker (services/knowledge/worker): runs inside the Knowledge
    Service when `enabled`, and as `python -m services.knowledge.worker` (always)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    # Stable id of this worker in tasks and logs; empty: "<host>:<pid>".
    id: str = Field(default="", max_length=128)
    # Tasks run at once (credits granted to the Task Manager).
    concurrency: int = Field(default=4, ge=1, le=1024)
    # Bearer token presented to the Task Manager (one of its dispatch.worker_tokens).
    token: SecretStr = SecretStr("")
    # The task handler, as "module:attribute": a factory called with WorkerResources.
    handler: str = "services.knowledge.worker.handlers:PipelineNotReady"
    # Options for the handler (JSON object of strings in the environment).
    handler_options: dict[str, str] = Field(default_factory=dict)
    # Media types the worker accepts; empty: all.
    content_types: tuple[str, ...] = ()
    # Reconnect backoff when the Task Manager is unreachable: exponential from base,
    # at most cap, jittered. Seconds.
    reconnect_base_seconds: float = Field(default=0.1, gt=0)
    reconnect_cap_seconds: float = Field(default=5.0, gt=0)
    # On SIGTERM: how long running tasks may take to finish before they are
    # cancelled and handed back (retryable, WORKER_SHUTDOWN). Seconds.
    shutdown_grace_seconds: float = Field(default=5.0, ge=0)


class KnowledgeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KBMESH_KNOWLEDGE_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    grpc: GrpcSettings = Field(default_factory=lambda: GrpcSettings(port=50052))
    log: LogSettings = LogSettings()
    redis: RedisSettings = RedisSettings()
    s3: S3Settings = S3Settings()
    task_manager: TaskManagerLink = TaskManagerLink()
    worker: WorkerSettings = WorkerSettings()
