"""Upload sources: read in pieces, hashed before sending when re-readable."""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kbmesh.client import document_state, search_mode, task_state
from kbmesh.client.aio import event_order
from kbmesh.client.sources import (
    BytesSource,
    FileSource,
    PathSource,
    StreamSource,
    source_of,
)
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm

DATA = bytes(range(256)) * 100  # 25,600 bytes


async def collect(chunks: AsyncIterator[bytes]) -> list[bytes]:
    return [c async for c in chunks]


async def test_a_path_is_measured_then_streamed_in_pieces(tmp_path: Path) -> None:
    path = tmp_path / "data.bin"
    path.write_bytes(DATA)
    source = source_of(path, chunk_bytes=4096)
    assert isinstance(source, PathSource)
    assert source.rereadable
    assert source.default_filename() == "data.bin"
    assert await source.measure() == (len(DATA), hashlib.sha256(DATA).hexdigest())
    pieces = await collect(source.chunks())
    assert b"".join(pieces) == DATA
    assert max(map(len, pieces)) == 4096
    # Re-readable: a retry sends the same bytes again.
    assert b"".join(await collect(source.chunks())) == DATA


async def test_a_seekable_file_is_read_from_where_it_stood() -> None:
    handle = io.BytesIO(b"HEADER" + DATA)
    handle.seek(6)
    source = source_of(handle, chunk_bytes=1000)
    assert isinstance(source, FileSource)
    assert source.rereadable
    assert await source.measure() == (len(DATA), hashlib.sha256(DATA).hexdigest())
    assert b"".join(await collect(source.chunks())) == DATA
    assert b"".join(await collect(source.chunks())) == DATA


async def test_an_unseekable_file_is_sent_unmeasured_and_not_retried() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, DATA)  # fits in the pipe's buffer
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        source = source_of(pipe, chunk_bytes=5000)
        assert not source.rereadable
        assert await source.measure() == (0, "")
        assert b"".join(await collect(source.chunks())) == DATA


async def test_an_async_stream_is_recut_and_used_once() -> None:
    async def stream() -> AsyncIterator[bytes]:
        yield DATA[:10]
        yield DATA[10:]

    source = source_of(stream(), chunk_bytes=8192)
    assert isinstance(source, StreamSource)
    assert not source.rereadable
    pieces = await collect(source.chunks())
    assert b"".join(pieces) == DATA
    assert max(map(len, pieces)) <= 8192
    with pytest.raises(RuntimeError):
        await collect(source.chunks())


async def test_bytes_are_a_rereadable_source() -> None:
    source = source_of(DATA, chunk_bytes=10_000)
    assert isinstance(source, BytesSource)
    assert [len(p) for p in await collect(source.chunks())] == [10_000, 10_000, 5_600]


def test_other_objects_are_refused() -> None:
    with pytest.raises(TypeError):
        source_of(42)  # type: ignore[arg-type]


def test_event_ids_order_numerically() -> None:
    assert event_order("1732874400000-10") > event_order("1732874400000-9")
    assert event_order("1732874400001-0") > event_order("1732874400000-99")
    assert event_order("garbage") == (-1, -1)


def test_enum_names_are_accepted_with_or_without_prefix() -> None:
    assert task_state("succeeded") == tm.Task.STATE_SUCCEEDED
    assert task_state("STATE_FAILED") == tm.Task.STATE_FAILED
    assert document_state(kn.Document.STATE_RUNNING) == kn.Document.STATE_RUNNING
    assert search_mode("Vector") == kn.SearchRequest.MODE_VECTOR
    with pytest.raises(ValueError, match="one of: pending, running"):
        task_state("done")
