"""Connection settings of the SDK and CLI: arguments over environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from kbmesh.client import ConnectionSettings, SettingsError


def test_defaults_are_the_ports_make_up_uses() -> None:
    settings = ConnectionSettings.from_env({})
    assert settings.task_manager_address == "localhost:50051"
    assert settings.knowledge_address == "localhost:50052"
    assert settings.api_key is None
    assert not settings.tls
    assert settings.call_metadata() == ()


def test_environment_then_arguments(tmp_path: Path) -> None:
    cert = tmp_path / "ca.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {
        "KBMESH_TASK_MANAGER_ADDRESS": "tm:1",
        "KBMESH_KNOWLEDGE_ADDRESS": "ks:2",
        "KBMESH_API_KEY": "secret",
        "KBMESH_TLS_ROOT_CERT": str(cert),
        "KBMESH_TIMEOUT": "5",
    }
    settings = ConnectionSettings.from_env(env)
    assert (settings.task_manager_address, settings.knowledge_address) == ("tm:1", "ks:2")
    assert settings.tls
    assert settings.root_cert == cert
    assert settings.timeout == 5.0
    assert settings.call_metadata() == (("authorization", "Bearer secret"),)

    overridden = ConnectionSettings.from_env(env, api_key="other", task_manager_address=None)
    assert overridden.api_key == "other"
    assert overridden.task_manager_address == "tm:1"  # None means "not given"


@pytest.mark.parametrize(
    "env",
    [
        {"KBMESH_TLS": "maybe"},
        {"KBMESH_TIMEOUT": "soon"},
        {"KBMESH_TIMEOUT": "0"},
        {"KBMESH_TLS_ROOT_CERT": "/no/such/file.pem"},
    ],
)
def test_bad_values_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        ConnectionSettings.from_env(env)


def test_tls_flag_without_certificate_uses_system_roots() -> None:
    settings = ConnectionSettings.from_env({"KBMESH_TLS": "true"})
    assert settings.tls
    assert settings.root_cert is None
