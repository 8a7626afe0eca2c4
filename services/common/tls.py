"""TLS for the gRPC servers and the clients between services (docs/security.md).

Servers: a certificate and key make the port TLS-only (plaintext is refused at
the handshake); a client CA makes it mTLS: a client without a certificate
signed by that CA is refused at the handshake. (gRPC Python either requires
client certificates on a port or does not ask for them: there is no
per-service choice. mTLS for workers only is a second port, `grpc.mtls_port`,
that requires them, with the worker stream refusing callers that did not
present one: see `peer_certificate`.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc

from kbmesh.client import grpc_fix
from services.common.settings import GrpcSettings, TlsClientSettings


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def server_credentials(settings: GrpcSettings) -> grpc.ServerCredentials | None:
    """None when TLS is not configured."""
    if not settings.tls_cert_file:
        return None
    pair = (_read(settings.tls_key_file), _read(settings.tls_cert_file))
    if settings.tls_client_ca_file:
        return grpc.ssl_server_credentials(
            [pair],
            root_certificates=_read(settings.tls_client_ca_file),
            require_client_auth=True,
        )
    return grpc.ssl_server_credentials([pair])


def mtls_server_credentials(settings: GrpcSettings) -> grpc.ServerCredentials:
    """The `grpc.mtls_port`'s credentials: the server's certificate, client
    certificates from `grpc.mtls_client_ca_file` required."""
    pair = (_read(settings.tls_key_file), _read(settings.tls_cert_file))
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=_read(settings.mtls_client_ca_file),
        require_client_auth=True,
    )


def peer_certificate(context: Any) -> bool:
    """Whether the caller presented a client certificate that the port
    verified (only ports that require one ask for it)."""
    auth = context.auth_context() or {}
    return bool(auth.get("x509_pem_cert"))


def open_channel(
    address: str, tls: TlsClientSettings, options: list[tuple[str, Any]] | None = None
) -> grpc.aio.Channel:
    """A channel to `address`: TLS when `tls.ca_file` is set, else plaintext.
    Streams on it report the server's status when it ends one early
    (kbmesh.client.grpc_fix)."""
    grpc_fix.install()
    if not tls.ca_file:
        return grpc.aio.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file),
        private_key=_read(tls.key_file) if tls.key_file else None,
        certificate_chain=_read(tls.cert_file) if tls.cert_file else None,
    )
    return grpc.aio.secure_channel(address, credentials, options=options)
