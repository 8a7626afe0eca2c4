"""Unit tests of the security building blocks (services/common/auth.py,
validation.py, the TLS settings); the integration tests run them for real."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from services.common.auth import (
    Authenticator,
    TenantScope,
    build_authenticator,
    caller_tenant,
    current_tenant,
    forwarded_credentials,
    is_loopback,
    parse_key,
    validate_tenant,
)
from services.common.errors import InvalidArgument, Unauthenticated
from services.common.settings import AuthSettings, GrpcSettings
from services.common.validation import check_string_lengths


def test_keys_parse_into_id_and_secret() -> None:
    key_id = "01jabcdefghjkmnpqrstvwxyz0"
    assert parse_key(f"kbm_{key_id}_s3cr_et-x") == (key_id, "s3cr_et-x")
    for bad in ("", "kbm", f"kbm_{key_id}", f"kbm_{key_id}_", "xyz_01_abc", f"KBM_{key_id}_s"):
        assert parse_key(bad) is None
    assert parse_key(f"kbm_{key_id[:-1]}_secret") is None


def test_tenant_names_are_key_safe() -> None:
    assert validate_tenant("acme-1_x") == "acme-1_x"
    for bad in ("", "Acme", "a:b", "a/b", "-a", "a" * 64, "a b"):
        with pytest.raises(ValueError, match="tenant"):
            validate_tenant(bad)


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "::1", "[::1]", "localhost", "127.0.0.2"):
        assert is_loopback(host)
    for host in ("0.0.0.0", "::", "10.0.0.1", "example.org", ""):
        assert not is_loopback(host)


def test_auth_off_is_refused_off_loopback() -> None:
    off = AuthSettings(mode="off")
    with pytest.raises(RuntimeError, match="loopback"):
        build_authenticator(off, GrpcSettings(host="0.0.0.0"), redis=None)  # type: ignore[arg-type]
    assert not build_authenticator(off, GrpcSettings(), redis=None).enabled  # type: ignore[arg-type]


class FakeKeys:
    async def tenant_of(self, key: str) -> str | None:
        return "acme" if key == "kbm_good" else None


async def test_authenticator_answers_a_tenant_or_unauthenticated() -> None:
    auth = Authenticator(AuthSettings(), FakeKeys())  # type: ignore[arg-type]
    assert await auth.tenant_for("Bearer kbm_good") == "acme"
    assert await auth.tenant_for("bearer   kbm_good ") == "acme"
    reasons: dict[str | None, str] = {
        None: "MISSING_CREDENTIALS",
        "": "MISSING_CREDENTIALS",
        "kbm_good": "INVALID_API_KEY",  # no Bearer scheme
        "Basic kbm_good": "INVALID_API_KEY",
        "Bearer kbm_bad": "INVALID_API_KEY",
    }
    for header, reason in reasons.items():
        with pytest.raises(Unauthenticated) as refused:
            await auth.tenant_for(header)
        assert refused.value.reason == reason
    off = Authenticator(AuthSettings(mode="off", default_tenant="solo"), None)
    assert await off.tenant_for(None) == "solo"


def test_tenant_scope_sets_and_restores_the_caller() -> None:
    assert current_tenant() is None
    assert caller_tenant() == "default"
    with TenantScope("acme", "Bearer k"):
        assert current_tenant() == "acme"
        assert forwarded_credentials() == (("authorization", "Bearer k"),)
    assert current_tenant() is None
    assert forwarded_credentials() == ()


def test_every_string_is_bounded_including_nested_maps_and_lists() -> None:
    check_string_lengths(tm.UploadRequest(filename="a" * 10), limit=10)
    cases: list[tuple[Any, str]] = [
        (tm.UploadRequest(filename="a" * 11), "filename"),
        (tm.UploadRequest(metadata={"k": "v" * 11}), "metadata"),
        (tm.UploadRequest(metadata={"k" * 11: "v"}), "metadata key"),
        (kn.SearchRequest(filter=kn.SearchFilter(filenames=["ok", "x" * 11])), "filter.filenames"),
        (
            kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name="n" * 11)),
            "knowledge_base.name",
        ),
    ]
    for message, field in cases:
        with pytest.raises(InvalidArgument) as refused:
            check_string_lengths(message, limit=10)
        assert refused.value.reason == "FIELD_TOO_LONG"
        assert refused.value.metadata["field"].startswith(field)


def test_tls_settings_go_together() -> None:
    with pytest.raises(ValidationError):
        GrpcSettings(tls_cert_file="c.pem")
    with pytest.raises(ValidationError):
        GrpcSettings(tls_client_ca_file="ca.pem")
    GrpcSettings(tls_cert_file="c.pem", tls_key_file="k.pem", tls_client_ca_file="ca.pem")
