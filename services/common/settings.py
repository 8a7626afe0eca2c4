"""Settings groups both services use.

Each service has one frozen settings object (pydantic-settings) with its own
env prefix, read once in `__main__` and passed down. Nested groups use `__`:
`KBMESH_TASK_MANAGER_GRPC__PORT=50051`, `KBMESH_KNOWLEDGE_REDIS__URL=...`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class _Group(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GrpcSettings(_Group):
    """Where and how the gRPC server listens."""

    host: str = "127.0.0.1"
    # 0 picks a free port (tests); the bound port is logged.
    port: int = Field(default=50051, ge=0, le=65535)
    # Seconds in-flight RPCs get to finish after SIGTERM before they are cancelled.
    shutdown_grace_seconds: float = Field(default=10.0, ge=0)
    # Largest message accepted or sent, in bytes (uploads stream in many messages).
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    # HTTP/2 receive window per stream, in bytes: what a client may send ahead
    # of the service. Bounds memory per upload; throughput per stream over a
    # link is at most window / round-trip time (2 MiB at 20 ms: 100 MiB/s).
    stream_window_bytes: int = Field(default=2 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024)
    # TLS (docs/security.md): with a certificate and key (PEM files) the server
    # listens with TLS only; plaintext connections are refused.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    # mTLS: every client must present a certificate signed by this CA (PEM).
    # Clients of the Task Manager are its workers, the Knowledge Service and
    # the gateway; gRPC cannot ask for client certificates on one service only.
    tls_client_ca_file: str = ""
    # A second port, with the same server certificate, on which every client
    # must present a certificate signed by `mtls_client_ca_file`: e.g. the
    # Task Manager's port for workers (`dispatch.require_worker_certificate`)
    # while other clients use the main port without one. 0 picks a free port.
    mtls_port: int | None = Field(default=None, ge=0, le=65535)
    mtls_client_ca_file: str = ""

    @model_validator(mode="after")
    def _tls_consistent(self) -> GrpcSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("grpc.tls_cert_file and grpc.tls_key_file go together")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("grpc.tls_client_ca_file needs grpc.tls_cert_file (TLS)")
        if (self.mtls_port is None) != (not self.mtls_client_ca_file):
            raise ValueError("grpc.mtls_port and grpc.mtls_client_ca_file go together")
        if self.mtls_port is not None and not self.tls_cert_file:
            raise ValueError("grpc.mtls_port needs grpc.tls_cert_file (TLS)")
        return self

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class LogSettings(_Group):
    """Log level and line format (JSON for machines, text for people)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"


class RedisSettings(_Group):
    """The Redis that holds the queue, tasks, events and records."""

    url: SecretStr = SecretStr("redis://127.0.0.1:6390/0")
    # How long start-up waits for Redis to answer before giving up.
    connect_timeout_seconds: float = Field(default=30.0, gt=0)
    # Connections the service may open (redis-py's default is 100: fewer than
    # the uploads one replica admits at once, each of which holds one briefly).
    max_connections: int = Field(default=1024, ge=1)


class S3Settings(_Group):
    """The S3-compatible object store that holds uploaded documents."""

    endpoint_url: str = "http://127.0.0.1:8333"
    bucket: str = Field(default="kbmesh", min_length=3, max_length=63)
    region: str = "us-east-1"
    access_key_id: SecretStr = SecretStr("kbmesh")
    secret_access_key: SecretStr = SecretStr("kbmesh-secret")
    # How long start-up waits for the bucket to answer before giving up.
    connect_timeout_seconds: float = Field(default=30.0, gt=0)


# A tenant name: also part of Redis keys and S3 object keys, so no separators.
TENANT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
# The tenant of records written before tenants existed, and of every caller
# when authentication is off (unless auth.default_tenant says otherwise).
DEFAULT_TENANT = "default"


class AuthSettings(_Group):
    """How callers of the public RPCs authenticate (docs/security.md).

    `api_keys`: every public RPC needs `authorization: Bearer kbm_<id>_<secret>`,
    a key issued with `python -m services.admin keys create --tenant T`; the
    caller acts as the key's tenant. `off`: no credentials, every caller is
    `default_tenant`; allowed only on a loopback address, and logged loudly.
    """

    mode: Literal["api_keys", "off"] = "api_keys"
    # The tenant every caller is when `mode` is off.
    default_tenant: str = Field(default=DEFAULT_TENANT, pattern=TENANT_PATTERN)


class TlsClientSettings(_Group):
    """How a client (worker, Knowledge Service) reaches a TLS server: trust
    `ca_file` (PEM; set: TLS on), and present `cert_file` + `key_file` as its
    client certificate (mTLS) when given."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> TlsClientSettings:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if self.cert_file and not self.ca_file:
            raise ValueError("a client certificate needs tls.ca_file (TLS)")
        return self
