"""Objects in S3: uploads stream into multipart uploads with bounded memory.

A writer buffers one part (`part_size`, 8 MiB by default) and keeps at most
`parts_in_flight` parts uploading while the next one fills, so memory per
upload is bounded by `part_size * (parts_in_flight + 1)` whatever the file size,
and the client stream is paused (gRPC flow control) while S3 is slower than
the client. Files smaller than one part are stored with a single PUT.

A part is the list of the chunks it was received in, never joined into one
buffer: joining copied every byte once more and allocated (and page-faulted)
a fresh 8 MiB per part. Only a chunk that straddles two parts is split.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

from botocore.exceptions import BotoCoreError, ClientError

from services.common.errors import Unavailable

log = logging.getLogger(__name__)

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
T = TypeVar("T")
# A request body in pieces, sent in order (their concatenation is the body).
Body = Sequence[bytes]
# Stores a whole object in one request: (key, body, content type, body's sha256 hex).
PutObject = Callable[[str, Body, str, str], Awaitable[None]]
# Uploads one part: (key, upload id, part number, body) -> the part's ETag.
UploadPart = Callable[[str, str, int, Body], Awaitable[str]]
# Deletes one object: (key).
DeleteObject = Callable[[str], Awaitable[None]]


class ObjectStream(Protocol):
    """An object PUT fed while the bytes arrive (s3_put.StreamedPut)."""

    def send(self, data: bytes) -> None: ...

    async def finish(self) -> None: ...

    async def abort(self) -> None: ...


# (key, size, content type) -> a started ObjectStream.
StreamObject = Callable[[str, int, str], ObjectStream]


def storage_unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(
        "STORAGE_UNAVAILABLE",
        f"object storage failed: {type(exc).__name__}",
        retry_after=1.0,
    )


async def _s3_call(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except (BotoCoreError, ClientError, OSError) as exc:
        raise storage_unavailable(exc) from exc


class S3ObjectWriter:
    def __init__(
        self,
        client: Any,
        bucket: str,
        key: str,
        content_type: str,
        part_size: int,
        in_flight: int,
        put: PutObject | None,
        upload_part: UploadPart | None = None,
        stream: ObjectStream | None = None,
        on_stream_end: Callable[[], None] | None = None,
        delete: DeleteObject | None = None,
    ) -> None:
        self._client = client
        self._delete = delete
        self._completing = False
        self._stream = stream
        self._on_stream_end = on_stream_end
        self._put = put
        self._put_part = upload_part
        self._bucket = bucket
        self._key = key
        self._content_type = content_type
        self._part_size = part_size
        self._in_flight = in_flight
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._upload_id: str | None = None
        self._pending: list[asyncio.Task[dict[str, Any]]] = []
        self._parts: list[dict[str, Any]] = []
        self._next_part = 1
        self._finished = False

    async def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._stream is not None:
            # Kept too: if the streamed PUT fails, complete() PUTs them again.
            self._stream.send(data)
            return
        while self._buffered >= self._part_size:
            await self._send_part(self._take(self._part_size))

    def _take(self, size: int) -> list[bytes]:
        """Removes and returns the first `size` buffered bytes (all if fewer),
        as the chunks they arrived in."""
        size = min(size, self._buffered)
        taken: list[bytes] = []
        needed = size
        while needed:
            chunk = self._chunks.popleft()
            if len(chunk) > needed:  # straddles the boundary: the only copy
                self._chunks.appendleft(chunk[needed:])
                chunk = chunk[:needed]
            taken.append(chunk)
            needed -= len(chunk)
        self._buffered -= size
        return taken

    async def _send_part(self, body: Body) -> None:
        if self._upload_id is None:
            created = await _s3_call(
                lambda: self._client.create_multipart_upload(
                    Bucket=self._bucket, Key=self._key, ContentType=self._content_type
                )
            )
            self._upload_id = str(created["UploadId"])
        number = self._next_part
        self._next_part += 1
        self._pending.append(asyncio.create_task(self._upload_part(number, body)))
        # Backpressure: wait for the oldest part once the window is full.
        while len(self._pending) >= self._in_flight:
            oldest = self._pending.pop(0)
            self._parts.append(await oldest)

    async def _upload_part(self, number: int, body: Body) -> dict[str, Any]:
        if self._put_part is not None:
            assert self._upload_id is not None
            etag = await self._put_part(self._key, self._upload_id, number, body)
            return {"PartNumber": number, "ETag": etag}
        answer = await _s3_call(
            lambda: self._client.upload_part(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=b"".join(body),
            )
        )
        return {"PartNumber": number, "ETag": answer["ETag"]}

    async def complete(self, sha256: str) -> None:
        """Makes the object visible. `sha256` is the hex digest of all the
        bytes written; a single-request PUT sends it for S3 to verify."""
        self._completing = True
        if self._stream is not None:
            await self._finish_stream(sha256)
        elif self._upload_id is None and self._put is not None:
            await self._put(self._key, self._take(self._buffered), self._content_type, sha256)
        elif self._upload_id is None:
            body = b"".join(self._take(self._buffered))
            await _s3_call(
                lambda: self._client.put_object(
                    Bucket=self._bucket, Key=self._key, Body=body, ContentType=self._content_type
                )
            )
        else:
            if self._buffered:
                await self._send_part(self._take(self._buffered))
            for task in self._pending:
                self._parts.append(await task)
            self._pending.clear()
            parts = sorted(self._parts, key=lambda p: int(p["PartNumber"]))
            await _s3_call(
                lambda: self._client.complete_multipart_upload(
                    Bucket=self._bucket,
                    Key=self._key,
                    UploadId=self._upload_id,
                    MultipartUpload={"Parts": parts},
                )
            )
        self._finished = True

    def _end_stream(self) -> None:
        """Frees the store's slot for another streamed PUT (once)."""
        if self._on_stream_end is not None:
            self._on_stream_end()
            self._on_stream_end = None

    async def _finish_stream(self, sha256: str) -> None:
        assert self._stream is not None
        try:
            await self._stream.finish()
            return
        except Unavailable:
            if self._put is None:
                raise
            log.warning(
                "a streamed PUT failed; storing the object again in one request",
                extra={"key": self._key},
                exc_info=True,
            )
        finally:
            self._end_stream()
        await self._put(self._key, self._take(self._buffered), self._content_type, sha256)

    async def abort(self) -> None:
        """Cancels part uploads and the multipart upload, and deletes the
        object if `complete` had started (its request may have reached S3 as
        the caller went away); never raises."""
        if self._finished:
            return
        self._finished = True
        self._chunks, self._buffered = deque(), 0
        if self._stream is not None:
            await self._stream.abort()
            self._end_stream()
        for task in self._pending:
            task.cancel()
        for task in self._pending:
            with contextlib.suppress(BaseException):
                await task
        self._pending.clear()
        if self._upload_id is not None:
            try:
                await self._client.abort_multipart_upload(
                    Bucket=self._bucket, Key=self._key, UploadId=self._upload_id
                )
            except Exception:
                log.warning(
                    "could not abort a multipart upload; its parts stay until aborted",
                    extra={"key": self._key, "upload_id": self._upload_id},
                    exc_info=True,
                )
        if self._completing and self._delete is not None:
            try:
                await self._delete(self._key)
            except Exception:
                log.warning(
                    "could not delete an object whose upload failed as it completed",
                    extra={"key": self._key},
                    exc_info=True,
                )


class S3ObjectStore:
    """The ObjectStore port on an aiobotocore S3 client."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        part_size: int = 8 * 1024 * 1024,
        parts_in_flight: int = 2,
        put: PutObject | None = None,
        upload_part: UploadPart | None = None,
        delete: DeleteObject | None = None,
        stream: StreamObject | None = None,
        max_streams: int = 256,
    ) -> None:
        """`put` stores objects smaller than one part in one request (see
        s3_put.SignedPut); `upload_part` uploads multipart parts; `delete`
        deletes an object. Without them, they go through the botocore client.
        `stream` sends an object of a declared size of at most one part while
        its bytes arrive (s3_put.StreamedPut), for at most `max_streams`
        objects at once: each holds an S3 connection until its last byte, and
        one waiting for a connection would wait for other uploads to end."""
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes")
        self._client = client
        self._bucket = bucket
        self._part_size = part_size
        self._parts_in_flight = max(1, parts_in_flight)
        self._put = put
        self._upload_part = upload_part
        self._delete = delete
        self._stream = stream
        self._max_streams = max_streams
        self._streams = 0

    @property
    def bucket(self) -> str:
        return self._bucket

    async def open_writer(self, key: str, content_type: str, size: int = 0) -> S3ObjectWriter:
        streamed = None
        if (
            self._stream is not None
            and 0 < size <= self._part_size
            and self._streams < self._max_streams
        ):
            streamed = self._stream(key, size, content_type)
            self._streams += 1
        return S3ObjectWriter(
            self._client,
            self._bucket,
            key,
            content_type,
            self._part_size,
            self._parts_in_flight,
            self._put,
            self._upload_part,
            streamed,
            self._stream_ended if streamed is not None else None,
            self.delete,
        )

    def _stream_ended(self) -> None:
        self._streams -= 1

    @property
    def streams(self) -> int:
        """Streamed PUTs open now."""
        return self._streams

    async def delete(self, key: str) -> None:
        if self._delete is not None:
            await self._delete(key)
            return
        await _s3_call(lambda: self._client.delete_object(Bucket=self._bucket, Key=key))

    async def abort_stale_uploads(self, prefix: str, older_than: datetime) -> int:
        """Aborts multipart uploads under `prefix` started before `older_than`.

        Uploads abort their own multipart upload on every failure a process
        survives; this sweeps what a killed Task Manager left behind."""
        aborted = 0
        paginator = self._client.get_paginator("list_multipart_uploads")
        async for page in paginator.paginate(Bucket=self._bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if upload["Initiated"] >= older_than:
                    continue
                await self._abort_upload(str(upload["Key"]), str(upload["UploadId"]))
                aborted += 1
        if aborted:
            log.info("aborted stale multipart uploads", extra={"count": aborted})
        return aborted

    async def _abort_upload(self, key: str, upload_id: str) -> None:
        await _s3_call(
            lambda: self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=key, UploadId=upload_id
            )
        )
