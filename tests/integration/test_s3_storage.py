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
from services.task_manager.adapters import s3_put
from services.task_manager.adapters.s3_put import SignedPut, open_signed_put
from services.task_manager.adapters.s3_storage import S3ObjectStore
from tests.conftest import BucketFactory

pytestmark = pytest.mark.integration
MIB = 1024 * 1024


@pytest.fixture
def s3_settings(new_bucket: BucketFactory) -> S3Settings:
    return new_bucket().for_service()


@pytest.fixture
async def store(s3_settings: S3Settings) -> AsyncIterator[tuple[S3ObjectStore, Any]]:
    """The store as the Task Manager builds it: small objects and multipart
    parts by signed PUTs over aiohttp."""
    async with open_s3(s3_settings) as client, open_signed_put(s3_settings) as signed:
        objects = S3ObjectStore(
            client,
            s3_settings.bucket,
            part_size=5 * MIB,
            parts_in_flight=2,
            put=signed.put,
            upload_part=signed.upload_part,
            delete=signed.delete,
            stream=signed.stream,
        )
        yield objects, client


async def read(client: Any, bucket: str, key: str) -> bytes:
    answer = await client.get_object(Bucket=bucket, Key=key)
    async with answer["Body"] as body:
        data: bytes = await body.read()
    return data


async def keys(client: Any, bucket: str) -> list[str]:
    listed = await client.list_objects_v2(Bucket=bucket)
    return [item["Key"] for item in listed.get("Contents", [])]


async def incomplete(client: Any, bucket: str) -> list[Any]:
    answer = await client.list_multipart_uploads(Bucket=bucket)
    return list(answer.get("Uploads", []))


async def test_small_object_is_one_put(store: tuple[S3ObjectStore, Any]) -> None:
    objects, client = store
    writer = await objects.open_writer("kb/k/objects/small", "text/plain")
    await writer.write(b"hello ")
    await writer.write(b"world")
    await writer.complete(hashlib.sha256(b"hello world").hexdigest())
    assert await read(client, objects.bucket, "kb/k/objects/small") == b"hello world"
    head = await client.head_object(Bucket=objects.bucket, Key="kb/k/objects/small")
    assert head["ContentType"] == "text/plain"
    assert await incomplete(client, objects.bucket) == []


async def test_signed_delete_removes_an_object_and_tolerates_a_missing_one(
    store: tuple[S3ObjectStore, Any],
) -> None:
    objects, client = store
    key = "kb/k/objects/to delete+é"
    writer = await objects.open_writer(key, "text/plain")
    await writer.write(b"bye")
    await writer.complete(hashlib.sha256(b"bye").hexdigest())
    await objects.delete(key)
    assert await keys(client, objects.bucket) == []
    await objects.delete(key)  # already gone: still fine


async def test_signed_put_keys_need_no_escaping_by_callers(
    store: tuple[S3ObjectStore, Any],
) -> None:
    objects, client = store
    key = "kb/k/objects/a name+with$odd~chars é"
    writer = await objects.open_writer(key, "text/markdown; charset=utf-8")
    await writer.write(b"# odd")
    await writer.complete(hashlib.sha256(b"# odd").hexdigest())
    assert await read(client, objects.bucket, key) == b"# odd"


async def test_s3_refuses_a_body_that_does_not_match_its_signed_sha256(
    store: tuple[S3ObjectStore, Any],
) -> None:
    objects, client = store
    writer = await objects.open_writer("kb/k/objects/corrupt", "text/plain")
    await writer.write(b"the bytes that arrived")
    with pytest.raises(Unavailable) as caught:
        await writer.complete(hashlib.sha256(b"other bytes").hexdigest())
    assert caught.value.reason == "STORAGE_UNAVAILABLE"
    assert await keys(client, objects.bucket) == []


async def test_declared_size_is_streamed_in_one_request_while_written(
    s3_settings: S3Settings,
) -> None:
    """With a declared size the PUT starts at open_writer and carries each
    write as it comes; no whole-object PUT is made."""
    whole_puts = []
    async with open_s3(s3_settings) as client, open_signed_put(s3_settings) as signed:

        async def put(*args: Any) -> None:
            whole_puts.append(args[0])
            await signed.put(*args)

        objects = S3ObjectStore(
            client, s3_settings.bucket, part_size=5 * MIB, put=put, stream=signed.stream
        )
        data = os.urandom(600_000)
        key = "kb/k/objects/streamed"
        writer = await objects.open_writer(key, "application/pdf", len(data))
        for start in range(0, len(data), 64 * 1024):
            await writer.write(data[start : start + 64 * 1024])
        await writer.complete(hashlib.sha256(data).hexdigest())
        assert await read(client, objects.bucket, key) == data
        head = await client.head_object(Bucket=objects.bucket, Key=key)
        assert head["ContentType"] == "application/pdf"
        assert head["ContentLength"] == len(data)
        assert whole_puts == []
        assert objects.streams == 0  # the slot is free again


async def test_streamed_puts_past_the_limit_are_one_put_after_the_last_byte(
    s3_settings: S3Settings,
) -> None:
    """Each streamed PUT holds a connection until its last byte; past
    max_streams an upload is buffered and PUT at the end instead of waiting."""
    async with open_s3(s3_settings) as client, open_signed_put(s3_settings) as signed:
        objects = S3ObjectStore(
            client,
            s3_settings.bucket,
            part_size=5 * MIB,
            put=signed.put,
            stream=signed.stream,
            max_streams=1,
        )
        first = await objects.open_writer("kb/k/objects/1", "text/plain", 3)
        second = await objects.open_writer("kb/k/objects/2", "text/plain", 3)
        assert objects.streams == 1
        for writer in (first, second):
            await writer.write(b"abc")
            await writer.complete(hashlib.sha256(b"abc").hexdigest())
        assert objects.streams == 0
        third = await objects.open_writer("kb/k/objects/3", "text/plain", 3)
        assert objects.streams == 1  # free again after the first finished
        await third.abort()
        assert objects.streams == 0
        assert sorted(await keys(client, objects.bucket)) == ["kb/k/objects/1", "kb/k/objects/2"]


async def test_a_streamed_put_cut_short_stores_nothing(
    store: tuple[S3ObjectStore, Any],
) -> None:
    objects, client = store
    writer = await objects.open_writer("kb/k/objects/short", "text/plain", 1000)
    await writer.write(b"x" * 600)
    await writer.abort()
    await writer.abort()  # twice is fine
    assert await keys(client, objects.bucket) == []


async def test_s3_refuses_a_streamed_put_whose_crc32c_does_not_match(
    s3_settings: S3Settings,
) -> None:
    async with open_s3(s3_settings) as client, open_signed_put(s3_settings) as signed:
        streamed = signed.stream("kb/k/objects/corrupt", 5, "text/plain")
        streamed.send(b"hello")
        streamed._crc ^= 1  # as if a byte had changed on the way
        with pytest.raises(Unavailable) as caught:
            await streamed.finish()
        assert caught.value.reason == "STORAGE_UNAVAILABLE"
        assert await keys(client, s3_settings.bucket) == []
        with pytest.raises(ValueError, match="size up front"):
            signed.stream("k", 0, "text/plain")


async def test_a_failed_streamed_put_is_stored_again_in_one_request(
    s3_settings: S3Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """If S3 does not take the streamed PUT, complete() PUTs the kept bytes."""
    async with open_s3(s3_settings) as client, open_signed_put(s3_settings) as signed:

        def corrupted(key: str, size: int, content_type: str) -> s3_put.StreamedPut:
            streamed = signed.stream(key, size, content_type)
            streamed._crc ^= 1
            return streamed

        objects = S3ObjectStore(
            client, s3_settings.bucket, part_size=5 * MIB, put=signed.put, stream=corrupted
        )
        writer = await objects.open_writer("kb/k/objects/again", "text/plain", 11)
        await writer.write(b"hello ")
        await writer.write(b"world")
        await writer.complete(hashlib.sha256(b"hello world").hexdigest())
        assert await read(client, objects.bucket, "kb/k/objects/again") == b"hello world"
    assert "a streamed PUT failed" in caplog.text


async def test_signed_put_with_wrong_credentials_is_unavailable(s3_settings: S3Settings) -> None:
    wrong = s3_settings.model_copy(update={"secret_access_key": SecretStr("not-the-secret")})
    async with open_signed_put(wrong) as signed:
        with pytest.raises(Unavailable) as caught:
            await signed.put("k", [b"x"], "text/plain", hashlib.sha256(b"x").hexdigest())
    assert caught.value.reason == "STORAGE_UNAVAILABLE"


async def test_large_object_streams_in_parts(store: tuple[S3ObjectStore, Any]) -> None:
    objects, client = store
    data = os.urandom(17 * MIB + 3)
    writer = await objects.open_writer("kb/k/objects/large", "application/pdf")
    for i in range(0, len(data), 700_001):  # chunks that do not align with parts
        await writer.write(data[i : i + 700_001])
    await writer.complete(hashlib.sha256(data).hexdigest())
    stored = await read(client, objects.bucket, "kb/k/objects/large")
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
    assert await incomplete(client, objects.bucket) == []


async def test_s3_refuses_a_part_that_does_not_match_its_crc32c(
    store: tuple[S3ObjectStore, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A part corrupted on its way is refused by S3, and the upload fails
    with it (the writer is then aborted, as Uploads does)."""
    objects, client = store
    monkeypatch.setattr(s3_put, "crc32c", lambda body: b"\x00\x00\x00\x00")
    writer = await objects.open_writer("kb/k/objects/bad-part", "application/octet-stream")
    await writer.write(os.urandom(6 * MIB))  # one part goes out
    with pytest.raises(Unavailable) as caught:
        await writer.complete("unused")
    assert caught.value.reason == "STORAGE_UNAVAILABLE"
    await writer.abort()
    assert await incomplete(client, objects.bucket) == []
    assert await keys(client, objects.bucket) == []


async def test_abort_leaves_no_object_and_no_upload(store: tuple[S3ObjectStore, Any]) -> None:
    objects, client = store
    writer = await objects.open_writer("kb/k/objects/aborted", "application/octet-stream")
    await writer.write(os.urandom(11 * MIB))
    await writer.abort()
    await writer.abort()  # idempotent
    assert await incomplete(client, objects.bucket) == []
    assert await keys(client, objects.bucket) == []


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
            await writer.complete(hashlib.sha256(b"x").hexdigest())
        assert caught.value.reason == "STORAGE_UNAVAILABLE"


async def test_signed_put_to_a_stopped_s3_is_unavailable() -> None:
    settings = S3Settings(endpoint_url=f"http://127.0.0.1:{find_free_port()}", bucket="nowhere")
    async with open_signed_put(settings) as signed:
        assert isinstance(signed, SignedPut)
        with pytest.raises(Unavailable) as caught:
            await signed.put("k", [b"x"], "text/plain", hashlib.sha256(b"x").hexdigest())
    assert caught.value.reason == "STORAGE_UNAVAILABLE"
