"""gateway/envoy.yaml as devstack renders it: web page files, upload route,
rate limit, replicas from the environment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from devstack import servers
from devstack.servers import _walk, render_envoy_config
from devstack.stack import StackConfig


def render(**kwargs: Any) -> dict[str, Any]:
    return servers.render_envoy_config(
        listen_port=18080,
        admin_port=19901,
        upstreams={"task_manager": ["127.0.0.1:1"], "knowledge": ["127.0.0.1:2"]},
        **kwargs,
    )


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    return list(hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"])


def test_web_files_are_absolute_and_exist() -> None:
    served = {
        r["match"]["path"]: Path(r["direct_response"]["body"]["filename"])
        for r in routes(render())
        if "filename" in r.get("direct_response", {}).get("body", {})
    }
    assert set(served) == {"/", "/web/app.js", "/web/style.css"}
    for path in served.values():
        assert path.is_absolute()
        assert path.is_file()
        assert path.stat().st_size < 1024 * 1024  # max_direct_response_body_size_bytes


def test_upload_route_streams_and_is_rate_limited() -> None:
    config = render(upload_rate_limit=servers.UploadRateLimit(burst=3, per_second=2))
    upload = next(r for r in routes(config) if "documents:upload" in str(r["match"]))
    assert upload["route"]["timeout"] == "0s"
    limit = upload["typed_per_filter_config"]["envoy.filters.http.local_ratelimit"]
    assert limit["token_bucket"] == {
        "max_tokens": 3,
        "tokens_per_fill": 2,
        "fill_interval": "1s",
    }
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    names = [f["name"] for f in hcm["typed_config"]["http_filters"]]
    assert "envoy.filters.http.buffer" not in names
    assert names[-1] == "envoy.filters.http.router"


def test_replicas_and_rate_from_environment() -> None:
    config = StackConfig.from_env(
        {
            "KBMESH_ENVOY_TASK_MANAGERS": "10.0.0.5:50051, 10.0.0.6:50051",
            "KBMESH_ENVOY_UPLOAD_BURST": "7",
        }
    )
    assert config.extra_task_managers == ("10.0.0.5:50051", "10.0.0.6:50051")
    assert config.extra_knowledge == ()
    assert (config.upload_burst, config.upload_rate) == (7, 20)
    with pytest.raises(SystemExit):
        StackConfig.from_env({"KBMESH_ENVOY_KNOWLEDGE": "nohost"})


def test_cors_origins_from_environment_replace_any_origin() -> None:
    config = StackConfig.from_env(
        {"KBMESH_ENVOY_CORS_ORIGINS": "https://kb.example.com, http://localhost:3000"}
    )
    assert config.cors_origins == ("https://kb.example.com", "http://localhost:3000")
    assert StackConfig.from_json(config.to_json()) == config
    rendered = render_envoy_config(
        listen_port=8080,
        admin_port=9901,
        upstreams={"task_manager": ["127.0.0.1:1"], "knowledge": ["127.0.0.1:2"]},
        cors_origins=config.cors_origins,
    )
    policies = [n for n in _walk(rendered) if "allow_origin_string_match" in n]
    assert policies
    for policy in policies:
        assert policy["allow_origin_string_match"] == [
            {"exact": "https://kb.example.com"},
            {"exact": "http://localhost:3000"},
        ]
