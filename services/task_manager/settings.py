"""Task Manager settings: env prefix `KBMESH_TASK_MANAGER_`, groups split by `__`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import GrpcSettings, LogSettings, RedisSettings, S3Settings


class TaskManagerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KBMESH_TASK_MANAGER_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    grpc: GrpcSettings = Field(default_factory=lambda: GrpcSettings(port=50051))
    log: LogSettings = LogSettings()
    redis: RedisSettings = RedisSettings()
    s3: S3Settings = S3Settings()
