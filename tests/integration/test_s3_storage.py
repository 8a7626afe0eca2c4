"""The S3 object store on a real SeaweedFS: multipart streaming, aborts, sweeping."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aioboto3
import pytest
from botocore.config import Config as BotoConfig
from pydantic import SecretStr

from devstack.servers import find_free_port
from services.common.connections import open_s3
from services.common.errors import Unavailable
from services.common.settings import S3Settings
from services.task_manager.adapters.s3_storage import S3ObjectStore
from tests.conftest import BucketFactory

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


@pytest.fixture
async def store(new_bucket: BucketFactory) -> AsyncIterator[tuple[S3ObjectStore, Any]]:
    bucket = new_bucket()
    settings = S3Settings(
        endpoint_url=bucket.endpoint_url,
        bucket=bucket.bucket,
        access_key_id=SecretStr(bucket.access_key_id),
        secret_access_key=SecretStr(bucket.secret_access_key),
        region=bucket.region,
    )
    async with open_s3(settings) as client:
        yield S3ObjectStore(client, bucket.bucket, part_size=5 * MIB, parts_in_flight=2), client


async def read(client: Any, bucket: str, key: str) -> bytes:
    answer = await client.get_object(Bucket=bucket, Key=key)
    async with answer["Body"] as body:
        data: bytes = await body.read()
    return data


async def incomplete(client: Any, bucket: str) -> list[Any]:
    answer = await client.list_multipart_uploads(Bucket=bucket)
    return list(answer.get("Uploads", []))


async def test_small_object_is_one_put(store: tuple[S3ObjectStore, Any]) -> None:
    objects, client = store
    writer = await objects.open_writer("kb/k/objects/small", "text/plain")
    await writer.write(b"hello ")
    await writer.write(b"world")
    await writer.complete()
    assert await read(client, objects.bucket, "kb/k/objects/small") == b"hello world"


async def test_large_object_streams_in_parts(store: tuple[S3ObjectStore, Any]) -> None:
    objects, client = store
    data = os.urandom(17 * MIB + 3)
    writer = await objects.open_writer("kb/k/objects/large", "application/pdf")
    for i in range(0, len(data), 700_001):  # chunks that do not align with parts
        await writer.write(data[i : i + 700_001])
    await writer.complete()
    stored = await read(client, objects.bucket, "kb/k/objects/large")
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
    assert await incomplete(client, objects.bucket) == []


async def test_abort_leaves_no_object_and_no_upload(store: tuple[S3ObjectStore, Any]) -> None:
    objects, client = store
    writer = await objects.open_writer("kb/k/objects/aborted", "application/octet-stream")
    await writer.write(os.urandom(11 * MIB))
    await writer.abort()
    await writer.abort()  # idempotent
    assert await incomplete(client, objects.bucket) == []
    listed = await client.list_objects_v2(Bucket=objects.bucket)
    assert listed.get("Contents", []) == []


async def test_stale_multipart_uploads_left_by_a_dead_process_are_swept(
    store: tuple[S3ObjectStore, Any],
) -> None:
    objects, client = store
    await client.create_multipart_upload(Bucket=objects.bucket, Key="kb/k/objects/orphan")
    later = datetime.now(UTC) + timedelta(seconds=5)
    assert await objects.abort_stale_uploads("kb/", datetime.now(UTC) - timedelta(hours=1)) == 0
    assert len(await incomplete(client, objects.bucket)) == 1
    assert await objects.abort_stale_uploads("kb/", later) == 1
    assert await incomplete(client, objects.bucket) == []


async def test_storage_failure_is_unavailable() -> None:
    async with aioboto3.Session().client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{find_free_port()}",
        aws_access_key_id="x",
        aws_secret_access_key="y",
        region_name="us-east-1",
        config=BotoConfig(retries={"max_attempts": 1}, connect_timeout=1),
    ) as client:
        objects = S3ObjectStore(client, "nowhere")
        writer = await objects.open_writer("k", "text/plain")
        await writer.write(b"x")
        with pytest.raises(Unavailable) as caught:
            await writer.complete()
        assert caught.value.reason == "STORAGE_UNAVAILABLE"
