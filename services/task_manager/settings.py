"""Task Manager settings: env prefix `KBMESH_TASK_MANAGER_`, groups split by `__`."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.settings import (
    AuthSettings,
    GrpcSettings,
    LogSettings,
    RedisSettings,
    S3Settings,
)


class UploadSettings(BaseModel):
    """Limits on uploads and the queue (documented in README: Limits)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Largest file accepted, in bytes; enforced while streaming (RESOURCE_EXHAUSTED).
    max_bytes: int = Field(default=5 * 1024**3, ge=1)
    # Uploads one replica accepts at once; past it, RESOURCE_EXHAUSTED + retry hint.
    max_in_flight: int = Field(default=512, ge=1)
    # Tasks waiting in the queue; past it, uploads get RESOURCE_EXHAUSTED.
    max_queue_depth: int = Field(default=100_000, ge=1)
    # Attempts per task before it fails for good.
    max_attempts: int = Field(default=5, ge=1, le=100)
    # Callback URLs must start with one of these prefixes; empty: callbacks refused.
    callback_allow_list: tuple[str, ...] = ()
    # Retry hint sent with RESOURCE_EXHAUSTED, in seconds.
    retry_after_seconds: float = Field(default=1.0, gt=0)
    # S3 multipart part size and parts uploading at once per upload (memory per
    # upload is about part_bytes * (parts_in_flight + 1)).
    part_bytes: int = Field(default=8 * 1024**2, ge=5 * 1024**2)
    parts_in_flight: int = Field(default=2, ge=1, le=16)
    # Uploads with a declared size of at most one part whose PUT runs while
    # their bytes arrive, at once; each holds one S3 connection for the whole
    # upload. Past it, such uploads are PUT in one request after the last
    # byte, like uploads of undeclared size. 0: never streamed.
    streamed_puts: int = Field(default=256, ge=0, le=4096)
    # How long an upload's idempotency key (request_id) is remembered, in seconds.
    request_id_ttl_seconds: int = Field(default=86_400, ge=60)
    # Per-tenant quotas (RESOURCE_EXHAUSTED with a TENANT_* reason); 0: unlimited.
    # Uploads a tenant may start per minute, bytes and documents it may store.
    tenant_uploads_per_minute: int = Field(default=0, ge=0)
    tenant_storage_bytes: int = Field(default=0, ge=0)
    tenant_documents: int = Field(default=0, ge=0)
    # Multipart uploads older than this are orphans of a killed replica and are
    # aborted by every replica's sweeper (every 10 minutes). Hours.
    stale_multipart_hours: float = Field(default=24.0, gt=0)


class CallbackSettings(BaseModel):
    """Delivery of callbacks (signed POSTs on terminal states); the allow-list of
    callback URLs is `uploads.callback_allow_list`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # HMAC-SHA256 key for the X-Kbmesh-Signature header. Set your own in production.
    secret: SecretStr = SecretStr("kbmesh-dev-callback-secret")
    # Attempts per callback before giving up (each is recorded on the task).
    max_attempts: int = Field(default=8, ge=1, le=100)
    # Backoff between attempts: exponential from base, at most cap (seconds, jittered).
    backoff_base_seconds: float = Field(default=1.0, gt=0)
    backoff_cap_seconds: float = Field(default=300.0, gt=0)
    # Per-request timeout, seconds.
    timeout_seconds: float = Field(default=10.0, gt=0)
    # How long a claimed callback is held by one sender before another may retry it.
    claim_seconds: float = Field(default=60.0, gt=0)
    # How often an idle sender looks for due callbacks, seconds.
    poll_interval_seconds: float = Field(default=0.5, gt=0)
    # Deliveries in flight per replica.
    max_concurrent: int = Field(default=32, ge=1)


class DispatchSettings(BaseModel):
    """The worker protocol: leases, retries, polling and worker tokens
    (docs/worker-protocol.md). Attempts per task are `uploads.max_attempts`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Workers must present a client certificate (mTLS): connect them to
    # `grpc.mtls_port`; a worker stream opened on a port that did not verify
    # one is refused (WORKER_CERTIFICATE_REQUIRED), token or not.
    require_worker_certificate: bool = False

    # How long an assignment stays leased without a heartbeat or progress; a worker
    # silent for longer loses the task to another worker. Seconds.
    lease_seconds: float = Field(default=30.0, ge=0.5, le=3600)
    # How often workers heartbeat (told in Welcome); at most half the lease. Seconds.
    heartbeat_seconds: float = Field(default=10.0, ge=0.1, le=1800)
    # Retry backoff after a failed attempt or a lapsed lease: exponential from base,
    # at most cap, jittered over the upper half. Seconds.
    backoff_base_seconds: float = Field(default=1.0, ge=0, le=3600)
    backoff_cap_seconds: float = Field(default=300.0, ge=0, le=86_400)
    # How often each replica promotes tasks whose backoff ended and reclaims lapsed
    # leases. Seconds.
    maintenance_interval_seconds: float = Field(default=1.0, ge=0.05, le=60)
    # How often an idle dispatcher looks at the queue if no wake-up message came
    # (wake-ups are instant; this only bounds the delay if one is lost). Seconds.
    poll_interval_seconds: float = Field(default=1.0, ge=0.05, le=60)
    # Tasks claimed per round trip to Redis when workers have room.
    claim_batch: int = Field(default=64, ge=1, le=1024)
    # Bearer tokens workers may present, as a JSON list in the environment
    # (`KBMESH_TASK_MANAGER_DISPATCH__WORKER_TOKENS='["..."]'`); and/or their
    # lower-case hex SHA-256 digests, to keep the tokens themselves out of the
    # Task Manager's environment. None configured: no worker can connect.
    worker_tokens: tuple[SecretStr, ...] = ()
    worker_token_sha256: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> DispatchSettings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError("dispatch.heartbeat_seconds must be at most half of lease_seconds")
        if self.backoff_cap_seconds < self.backoff_base_seconds:
            raise ValueError("dispatch.backoff_cap_seconds must be >= backoff_base_seconds")
        return self


class TaskManagerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="KBMESH_TASK_MANAGER_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    grpc: GrpcSettings = Field(default_factory=lambda: GrpcSettings(port=50051))
    log: LogSettings = LogSettings()
    redis: RedisSettings = RedisSettings()
    s3: S3Settings = S3Settings()
    uploads: UploadSettings = UploadSettings()
    callbacks: CallbackSettings = CallbackSettings()
    dispatch: DispatchSettings = DispatchSettings()
    auth: AuthSettings = AuthSettings()

    @model_validator(mode="after")
    def _workers_can_present_certificates(self) -> TaskManagerSettings:
        if self.dispatch.require_worker_certificate and not (
            self.grpc.mtls_port is not None or self.grpc.tls_client_ca_file
        ):
            raise ValueError(
                "dispatch.require_worker_certificate needs grpc.mtls_port (or "
                "grpc.tls_client_ca_file): no port would verify a worker's certificate"
            )
        return self
