"""What an upload reads from: a path, a binary file object, bytes, or an async
iterator of bytes — always in pieces, never whole.

A source that can be read again (a path, a seekable file, bytes) is hashed
before the upload so its SHA-256 and size go in the header (the Task Manager
checks both and keeps nothing on a mismatch), and an upload from it can be
retried from the start. A one-shot stream (a pipe, an async iterator) is sent
as it comes, unchecked unless the caller passes `sha256=`/`size=`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import IO

# Bytes per Upload message: well under gRPC's 4 MiB message limit, large enough
# that per-message overhead does not matter (the proto recommends 64 KiB to 1 MiB).
CHUNK_BYTES = 256 * 1024

UploadInput = str | os.PathLike[str] | IO[bytes] | bytes | AsyncIterable[bytes]


class UploadSource:
    """A source of upload bytes; `chunks()` yields pieces of at most CHUNK_BYTES."""

    rereadable: bool = False

    def default_filename(self) -> str:
        return ""

    async def measure(self) -> tuple[int, str]:
        """(size, sha256) when they can be known before sending, else (0, "")."""
        return 0, ""

    def chunks(self) -> AsyncIterator[bytes]:
        raise NotImplementedError


class PathSource(UploadSource):
    rereadable = True

    def __init__(self, path: Path, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.path = path
        self.chunk_bytes = chunk_bytes

    def default_filename(self) -> str:
        return self.path.name

    async def measure(self) -> tuple[int, str]:
        return await asyncio.to_thread(_hash_path, self.path, self.chunk_bytes)

    async def chunks(self) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(self.path.open, "rb")
        try:
            while data := await asyncio.to_thread(handle.read, self.chunk_bytes):
                yield data
        finally:
            handle.close()


class FileSource(UploadSource):
    """A binary file object; seekable ones are hashed first and re-readable."""

    def __init__(self, file: IO[bytes], chunk_bytes: int = CHUNK_BYTES) -> None:
        self.file = file
        self.chunk_bytes = chunk_bytes
        self.start: int | None = None
        try:
            if file.seekable():
                self.start = file.tell()
        except (OSError, ValueError):
            self.start = None
        self.rereadable = self.start is not None

    def default_filename(self) -> str:
        name = getattr(self.file, "name", "")
        return os.path.basename(name) if isinstance(name, str) else ""

    async def measure(self) -> tuple[int, str]:
        if self.start is None:
            return 0, ""
        return await asyncio.to_thread(self._hash)

    def _hash(self) -> tuple[int, str]:
        assert self.start is not None
        self.file.seek(self.start)
        digest, size = hashlib.sha256(), 0
        while data := self.file.read(self.chunk_bytes):
            digest.update(data)
            size += len(data)
        self.file.seek(self.start)
        return size, digest.hexdigest()

    async def chunks(self) -> AsyncIterator[bytes]:
        if self.start is not None:
            await asyncio.to_thread(self.file.seek, self.start)
        while data := await asyncio.to_thread(self.file.read, self.chunk_bytes):
            yield data


class BytesSource(UploadSource):
    rereadable = True

    def __init__(self, data: bytes, chunk_bytes: int = CHUNK_BYTES) -> None:
        self.data = data
        self.chunk_bytes = chunk_bytes

    async def measure(self) -> tuple[int, str]:
        return len(self.data), hashlib.sha256(self.data).hexdigest()

    async def chunks(self) -> AsyncIterator[bytes]:
        view = memoryview(self.data)
        for offset in range(0, len(view), self.chunk_bytes):
            yield bytes(view[offset : offset + self.chunk_bytes])


class StreamSource(UploadSource):
    """An async iterator of bytes: sent once as it comes, pieces re-cut to size."""

    def __init__(self, stream: AsyncIterable[bytes], chunk_bytes: int = CHUNK_BYTES) -> None:
        self.stream = stream
        self.chunk_bytes = chunk_bytes
        self._used = False

    async def chunks(self) -> AsyncIterator[bytes]:
        if self._used:
            raise RuntimeError("an async byte stream can be uploaded only once")
        self._used = True
        async for data in self.stream:
            for offset in range(0, len(data), self.chunk_bytes):
                yield bytes(data[offset : offset + self.chunk_bytes])


def source_of(value: UploadInput | UploadSource, chunk_bytes: int = CHUNK_BYTES) -> UploadSource:
    """The UploadSource for what a caller passed to `upload`."""
    if isinstance(value, UploadSource):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return BytesSource(bytes(value), chunk_bytes)
    if isinstance(value, (str, os.PathLike)):
        return PathSource(Path(value), chunk_bytes)
    if isinstance(value, AsyncIterable):
        return StreamSource(value, chunk_bytes)
    if hasattr(value, "read"):
        return FileSource(value, chunk_bytes)
    raise TypeError(f"cannot upload from {type(value).__name__}")


def _hash_path(path: Path, chunk_bytes: int) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    with path.open("rb") as handle:
        while data := handle.read(chunk_bytes):
            digest.update(data)
            size += len(data)
    return size, digest.hexdigest()
