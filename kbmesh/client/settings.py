"""Where the services are and how to reach them: arguments win over environment.

=============================== ===================== ==========================================
variable                        default               meaning
=============================== ===================== ==========================================
``KBMESH_TASK_MANAGER_ADDRESS`` ``localhost:50051``   Task Manager gRPC ``host:port``
``KBMESH_KNOWLEDGE_ADDRESS``    ``localhost:50052``   Knowledge Service gRPC ``host:port``
``KBMESH_API_KEY``              (none)                sent as ``authorization: Bearer <key>``
``KBMESH_TLS``                  ``false``             TLS with the system's root certificates
``KBMESH_TLS_ROOT_CERT``        (none)                PEM file of root certificates (implies TLS)
``KBMESH_TIMEOUT``              ``30``                deadline of unary calls, seconds
=============================== ===================== ==========================================

Through Envoy both addresses are the gateway's (``localhost:8080``): it routes
gRPC by service name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

DEFAULT_TASK_MANAGER_ADDRESS = "localhost:50051"
DEFAULT_KNOWLEDGE_ADDRESS = "localhost:50052"
DEFAULT_TIMEOUT_SECONDS = 30.0
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


class SettingsError(ValueError):
    """A connection setting has a value that cannot be used."""


@dataclass(frozen=True)
class ConnectionSettings:
    """How to reach both services. Build with `from_env()` or directly."""

    task_manager_address: str = DEFAULT_TASK_MANAGER_ADDRESS
    knowledge_address: str = DEFAULT_KNOWLEDGE_ADDRESS
    api_key: str | None = None
    tls: bool = False
    # PEM root certificates; None with tls=True means the system's roots.
    root_cert: Path | None = None
    # Deadline of unary calls in seconds (uploads and watches have none).
    timeout: float = DEFAULT_TIMEOUT_SECONDS

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        **overrides: object,
    ) -> ConnectionSettings:
        """Settings from ``KBMESH_*`` variables; keyword arguments that are not
        None override them (`task_manager_address=`, `api_key=`, ...)."""
        env = os.environ if environ is None else environ
        root = env.get("KBMESH_TLS_ROOT_CERT", "").strip()
        tls_text = env.get("KBMESH_TLS", "").strip().lower()
        if tls_text not in _TRUE | _FALSE:
            raise SettingsError(f"KBMESH_TLS must be true or false, not {tls_text!r}")
        timeout_text = env.get("KBMESH_TIMEOUT", "").strip()
        try:
            timeout = float(timeout_text) if timeout_text else DEFAULT_TIMEOUT_SECONDS
        except ValueError:
            raise SettingsError(f"KBMESH_TIMEOUT must be seconds, not {timeout_text!r}") from None
        settings = cls(
            task_manager_address=env.get("KBMESH_TASK_MANAGER_ADDRESS", "").strip()
            or DEFAULT_TASK_MANAGER_ADDRESS,
            knowledge_address=env.get("KBMESH_KNOWLEDGE_ADDRESS", "").strip()
            or DEFAULT_KNOWLEDGE_ADDRESS,
            api_key=env.get("KBMESH_API_KEY", "").strip() or None,
            tls=tls_text in _TRUE or bool(root),
            root_cert=Path(root) if root else None,
            timeout=timeout,
        )
        given = {key: value for key, value in overrides.items() if value is not None}
        if "root_cert" in given:
            given["root_cert"] = Path(str(given["root_cert"]))
            given.setdefault("tls", True)
        settings = replace(settings, **given)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("task_manager_address", "knowledge_address"):
            if not getattr(self, name):
                raise SettingsError(f"{name} is empty")
        if self.timeout <= 0:
            raise SettingsError("timeout must be positive")
        if self.root_cert is not None and not self.root_cert.is_file():
            raise SettingsError(f"root certificate file {str(self.root_cert)!r} does not exist")

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata sent with every call: the API key, when there is one."""
        if not self.api_key:
            return ()
        return (("authorization", f"Bearer {self.api_key}"),)
