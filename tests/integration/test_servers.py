"""The servers the stack runs, started by devstack.servers as `make up` does."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import aioboto3
import botocore.exceptions
import pytest
import redis
import yaml

from devstack import servers
from devstack.servers import RedisServer, SeaweedServer
from tests.conftest import EnvoyFactory, RedisFactory

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


def _set_and_get(server: RedisServer, key: str, value: str | None = None) -> bytes | None:
    client = redis.Redis.from_url(server.url)
    try:
        if value is not None:
            client.set(key, value)
        result = client.get(key)
        assert result is None or isinstance(result, bytes)
        return result
    finally:
        client.close()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_redis_aof_keeps_a_key_across_restart(start_redis: RedisFactory, how: str) -> None:
    first = start_redis()
    assert _set_and_get(first, "kbmesh:it:key", "kept") == b"kept"
    if how == "sigkill":
        # An acknowledged write is already in the AOF file (fsync every second
        # only matters when the machine, not the process, dies).
        os.kill(first.pid, signal.SIGKILL)
    first.stop()
    assert not first.is_alive()
    assert (first.data_dir / "appendonly.aof").stat().st_size > 0
    assert not list(first.data_dir.glob("*.rdb")), "RDB snapshots should be off"

    second = start_redis(data_dir=first.data_dir)
    assert _set_and_get(second, "kbmesh:it:key") == b"kept"


async def test_seaweedfs_takes_a_multipart_upload_and_lists_it(s3_server: SeaweedServer) -> None:
    s3 = s3_server.s3
    key = f"it/{uuid.uuid4().hex}/document.bin"
    parts = [os.urandom(5 * MIB), os.urandom(MIB + 123)]  # S3 parts but the last are >= 5 MiB
    session = aioboto3.Session()
    async with session.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        aws_access_key_id=s3.access_key_id,
        aws_secret_access_key=s3.secret_access_key,
        region_name=s3.region,
    ) as client:
        upload = await client.create_multipart_upload(Bucket=s3.bucket, Key=key)
        upload_id = upload["UploadId"]
        etags = []
        for number, data in enumerate(parts, start=1):
            part = await client.upload_part(
                Bucket=s3.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
            etags.append({"ETag": part["ETag"], "PartNumber": number})
        await client.complete_multipart_upload(
            Bucket=s3.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": etags}
        )

        listing = await client.list_objects_v2(Bucket=s3.bucket, Prefix="it/")
        sizes = {obj["Key"]: obj["Size"] for obj in listing.get("Contents", [])}
        assert sizes.get(key) == sum(len(p) for p in parts)

        obj = await client.get_object(Bucket=s3.bucket, Key=key)
        async with obj["Body"] as body:
            data = await body.read()
        assert hashlib.sha256(data).digest() == hashlib.sha256(b"".join(parts)).digest()


def test_two_seaweedfs_instances_run_side_by_side(s3_server: SeaweedServer, tmp_path: Path) -> None:
    other = servers.start_seaweedfs(
        ports=servers.WeedPorts.allocate(),
        data_dir=tmp_path / "data",
        config_dir=tmp_path / "config",
        log_path=tmp_path / "seaweedfs.log",
        bucket="kbmesh-other",
    )
    try:
        assert set(other.ports.as_dict().values()).isdisjoint(s3_server.ports.as_dict().values())
        key = f"it/{uuid.uuid4().hex}"
        other_client = other.s3.boto3_client()
        first_client = s3_server.s3.boto3_client()
        try:
            other_client.put_object(Bucket="kbmesh-other", Key=key, Body=b"x")
            assert other_client.get_object(Bucket="kbmesh-other", Key=key)["Body"].read() == b"x"
            # Separate stores: the session instance has no such bucket.
            with pytest.raises(botocore.exceptions.ClientError) as missing:
                first_client.head_bucket(Bucket="kbmesh-other")
            assert missing.value.response["Error"]["Code"] in ("404", "NoSuchBucket")
        finally:
            other_client.close()
            first_client.close()
    finally:
        # A throwaway instance: no need to wait out weed's 15 s graceful stop.
        other.stop(timeout=2)
    assert not other.is_alive()
    assert not any(p.exists() for p in servers.weed_socket_paths(other.ports))


def test_envoy_config_renders_replicas_and_absolute_descriptor(tmp_path: Path) -> None:
    config = servers.render_envoy_config(
        listen_port=18080,
        admin_port=19901,
        upstreams={
            "task_manager": ["127.0.0.1:50061", "127.0.0.1:50062"],
            "knowledge": ["127.0.0.1:50063"],
        },
    )
    text = yaml.safe_dump(config)
    assert "build/gateway/kbmesh.pb" in text
    descriptors = {
        node["proto_descriptor"] for node in servers._walk(config) if "proto_descriptor" in node
    }
    assert descriptors == {str(servers.DEFAULT_DESCRIPTOR.resolve())}
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 19901,
    }
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    endpoints = [
        lb["endpoint"]["address"]["socket_address"]["port_value"]
        for group in clusters["task_manager"]["load_assignment"]["endpoints"]
        for lb in group["lb_endpoints"]
    ]
    assert endpoints == [50061, 50062]
    path = servers.write_envoy_config(tmp_path / "envoy.yaml", config)
    servers.validate_envoy_config(path)


def test_envoy_answers_404_for_unknown_paths(start_envoy: EnvoyFactory) -> None:
    # Upstreams that are not there: Envoy must still start and route.
    nowhere = [f"127.0.0.1:{servers.find_free_port()}"]
    envoy = start_envoy(task_manager=nowhere, knowledge=nowhere)

    assert servers.envoy_ready(envoy.admin_port)
    for path in ("/no/such/path", "/api/v2/tasks", "/api/v1/tasksx", "/web/nothing.js"):
        status, _ = servers.http_get(envoy.http_url + path)
        assert status == 404, path
    # `/` is the web page, served by Envoy itself.
    status, page = servers.http_get(envoy.http_url + "/")
    assert status == 200
    assert b"<title>kbmesh</title>" in page
    # A REST path the transcoder does not know: 404 too.
    status, _ = servers.http_get(envoy.http_url + "/api/v1/tasks/a/b/c")
    assert status == 404
    # Known REST paths are routed (the upstream is down: 503).
    status, _ = servers.http_get(envoy.http_url + "/api/v1/tasks/some-task")
    assert status == 503
    status, _ = servers.http_get(envoy.http_url + "/api/v1/tasks/some-task?bogus=1")
    assert status == 400


# A server whose child leads a session of its own (as the Knowledge Service's
# worker does) and is slow to stop: SIGTERM ignored.
_PARENT_WITH_OWN_SESSION_CHILD = """
import signal, subprocess, sys, time
stuck = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
child = subprocess.Popen([sys.executable, "-c", stuck], start_new_session=True)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def test_stop_also_stops_a_child_in_a_session_of_its_own(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    server = servers.ServerProcess.spawn(
        "parent",
        [sys.executable, "-c", _PARENT_WITH_OWN_SESSION_CHILD, str(pid_file)],
        log_path=tmp_path / "parent.log",
    )
    child = 0
    try:
        for _ in range(100):
            if pid_file.exists() and pid_file.read_text():
                break
            time.sleep(0.1)
        child = int(pid_file.read_text())
        assert os.getsid(child) == child != os.getsid(server.pid)
        server.stop(timeout=5)
        for _ in range(100):
            if not servers.process_alive(child):
                break
            time.sleep(0.1)
        assert not servers.process_alive(child)
    finally:
        server.stop(timeout=1)
        if child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
