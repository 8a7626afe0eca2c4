"""Signed S3 PUTs and how upload bodies are cut into parts, without S3."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime

import pytest

from services.task_manager.adapters.s3_put import (
    SigV4Signer,
    _pieces,
    aws_chunked_length,
    crc32c,
)
from services.task_manager.adapters.s3_storage import Body, S3ObjectWriter

MIB = 1024 * 1024


def test_signature_matches_the_aws_documentation_example() -> None:
    """'Example: GET Object' of AWS's Signature Version 4 documentation."""
    signer = SigV4Signer(
        "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1"
    )
    headers = signer.headers(
        "GET",
        "examplebucket.s3.amazonaws.com",
        "/test.txt",
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        {"range": "bytes=0-9"},
        now=datetime(2013, 5, 24, tzinfo=UTC),
    )
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_crc32c_is_the_castagnoli_checksum_over_all_pieces() -> None:
    assert crc32c([b"123456789"]).hex() == "e3069283"  # the standard check value
    assert crc32c([b"1234", b"", b"56789"]) == crc32c([b"123456789"])


async def test_bodies_are_written_in_bounded_zero_copy_slices() -> None:
    chunk = os.urandom(2 * MIB + 5)
    body: Body = [b"head", chunk]
    pieces = [piece async for piece in _pieces(body)]
    assert b"".join(pieces) == b"head" + chunk
    assert max(len(piece) for piece in pieces) <= MIB
    assert all(piece.obj is chunk for piece in pieces[1:])


async def test_parts_are_the_received_chunks_with_only_straddlers_split() -> None:
    sent: list[tuple[int, Body]] = []

    async def upload_part(key: str, upload_id: str, number: int, body: Body) -> str:
        sent.append((number, body))
        return f'"etag-{number}"'

    class Client:
        async def create_multipart_upload(self, **_: object) -> dict[str, str]:
            return {"UploadId": "u1"}

        async def complete_multipart_upload(self, **kwargs: object) -> dict[str, str]:
            self.completed = kwargs
            return {}

    client = Client()
    writer = S3ObjectWriter(
        client, "bucket", "key", "text/plain", 5 * MIB, 2, put=None, upload_part=upload_part
    )
    chunks = [os.urandom(2 * MIB) for _ in range(6)]  # 12 MiB: parts of 5, 5 and 2
    for chunk in chunks:
        await writer.write(chunk)
    await writer.complete("not checked by a multipart upload")
    assert [number for number, _ in sent] == [1, 2, 3]
    assert [sum(len(piece) for piece in body) for _, body in sent] == [5 * MIB, 5 * MIB, 2 * MIB]
    assert b"".join(piece for _, body in sent for piece in body) == b"".join(chunks)
    first = sent[0][1]
    assert first[0] is chunks[0]  # whole chunks are not copied
    assert first[1] is chunks[1]
    assert client.completed["MultipartUpload"] == {
        "Parts": [{"PartNumber": n, "ETag": f'"etag-{n}"'} for n in (1, 2, 3)]
    }


def test_aws_chunked_length_counts_the_framing_and_the_trailer() -> None:
    """The Content-Length a StreamedPut announces: one chunk with all the
    bytes, the empty last chunk, the CRC32C trailer (8 base64 characters)."""
    wire = b"5\r\nhello\r\n0\r\nx-amz-checksum-crc32c:mnG7TA==\r\n\r\n"
    assert aws_chunked_length(5) == len(wire)
    size = 3 * 1024 * 1024 + 7  # more hex digits in the chunk header
    assert aws_chunked_length(size) == len(f"{size:x}\r\n") + size + len(wire) - 3 - 5


async def test_an_upload_cancelled_while_completing_deletes_its_object() -> None:
    """The request may reach S3 after the caller went away: abort deletes the
    key rather than leave an object without a task."""
    started = asyncio.Event()
    deleted: list[str] = []

    async def slow_put(key: str, body: Body, content_type: str, sha256: str) -> None:
        started.set()
        await asyncio.Event().wait()

    async def delete(key: str) -> None:
        deleted.append(key)

    writer = S3ObjectWriter(
        None, "bucket", "key", "text/plain", 5 * MIB, 2, put=slow_put, delete=delete
    )
    await writer.write(b"bytes")
    completing = asyncio.create_task(writer.complete("sha"))
    await started.wait()
    completing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await completing
    await writer.abort()
    assert deleted == ["key"]
    # An upload aborted before completing has no object to delete.
    early = S3ObjectWriter(
        None, "bucket", "k2", "text/plain", 5 * MIB, 2, put=slow_put, delete=delete
    )
    await early.write(b"bytes")
    await early.abort()
    assert deleted == ["key"]
