"""Knowledge Service settings: env prefix `KBMESH_KNOWLEDGE_`, groups split by `__`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import GrpcSettings, LogSettings, RedisSettings, S3Settings


class TaskManagerLink(BaseModel):
    """How the Knowledge Service's workers reach the Task Manager."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str = "127.0.0.1:50051"


class KnowledgeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KBMESH_KNOWLEDGE_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    grpc: GrpcSettings = Field(default_factory=lambda: GrpcSettings(port=50052))
    log: LogSettings = LogSettings()
    redis: RedisSettings = RedisSettings()
    s3: S3Settings = S3Settings()
    task_manager: TaskManagerLink = TaskManagerLink()
