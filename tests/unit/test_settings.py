"""Settings: read once from the environment, nested groups, secrets hidden."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.settings import GrpcSettings
from services.knowledge.settings import KnowledgeSettings
from services.task_manager.settings import TaskManagerSettings


def test_defaults_give_distinct_ports() -> None:
    assert TaskManagerSettings().grpc.port == 50051
    assert KnowledgeSettings().grpc.port == 50052


def test_nested_groups_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KBMESH_TASK_MANAGER_GRPC__PORT", "6000")
    monkeypatch.setenv("KBMESH_TASK_MANAGER_REDIS__URL", "redis://:pw@10.0.0.1:7000/2")
    monkeypatch.setenv("KBMESH_TASK_MANAGER_S3__BUCKET", "docs")
    # Another service's variables do not leak in.
    monkeypatch.setenv("KBMESH_KNOWLEDGE_GRPC__PORT", "7000")
    settings = TaskManagerSettings()
    assert settings.grpc.port == 6000
    assert settings.grpc.address == "127.0.0.1:6000"
    assert settings.redis.url.get_secret_value() == "redis://:pw@10.0.0.1:7000/2"
    assert settings.s3.bucket == "docs"


def test_secrets_do_not_appear_in_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KBMESH_KNOWLEDGE_S3__SECRET_ACCESS_KEY", "hunter2")
    monkeypatch.setenv("KBMESH_KNOWLEDGE_REDIS__URL", "redis://:hunter2@h:1/0")
    assert "hunter2" not in repr(KnowledgeSettings())


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KBMESH_TASK_MANAGER_GRPC__PORT", "70000")
    with pytest.raises(ValidationError):
        TaskManagerSettings()


def test_settings_are_frozen() -> None:
    settings = TaskManagerSettings()
    with pytest.raises(ValidationError):
        settings.grpc.port = 1


def test_ipv6_address() -> None:
    assert GrpcSettings(host="::1", port=5).address == "[::1]:5"


def test_dispatch_and_worker_settings_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KBMESH_TASK_MANAGER_DISPATCH__WORKER_TOKENS", '["t-1", "t-2"]')
    monkeypatch.setenv("KBMESH_TASK_MANAGER_DISPATCH__LEASE_SECONDS", "3")
    monkeypatch.setenv("KBMESH_TASK_MANAGER_DISPATCH__HEARTBEAT_SECONDS", "1")
    monkeypatch.setenv("KBMESH_KNOWLEDGE_WORKER__TOKEN", "t-1")
    monkeypatch.setenv("KBMESH_KNOWLEDGE_WORKER__HANDLER_OPTIONS", '{"record_key": "k"}')
    dispatch = TaskManagerSettings().dispatch
    assert [t.get_secret_value() for t in dispatch.worker_tokens] == ["t-1", "t-2"]
    assert (dispatch.lease_seconds, dispatch.heartbeat_seconds) == (3.0, 1.0)
    assert "t-1" not in repr(dispatch)
    worker = KnowledgeSettings().worker
    assert worker.token.get_secret_value() == "t-1"
    assert worker.handler_options == {"record_key": "k"}
    assert "t-1" not in repr(worker)


def test_heartbeats_must_fit_twice_in_a_lease(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KBMESH_TASK_MANAGER_DISPATCH__LEASE_SECONDS", "3")
    monkeypatch.setenv("KBMESH_TASK_MANAGER_DISPATCH__HEARTBEAT_SECONDS", "2")
    with pytest.raises(ValidationError, match="at most half"):
        TaskManagerSettings()


def test_worker_certificates_need_a_port_that_verifies_them() -> None:
    from pydantic import ValidationError

    from services.task_manager.settings import DispatchSettings, TaskManagerSettings

    with pytest.raises(ValidationError, match="require_worker_certificate"):
        TaskManagerSettings(dispatch=DispatchSettings(require_worker_certificate=True))
    with pytest.raises(ValidationError, match="mtls_port"):
        GrpcSettings(mtls_port=0)
