"""Streaming multipart/form-data parsing of uploads (domain/multipart.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import pytest

from services.common.errors import InvalidArgument
from services.task_manager.domain.multipart import (
    MAX_PART_HEADER_BYTES,
    multipart_boundary,
    open_file_part,
)

B = "----kbmeshBoundary7MA4YWxk"


def body(*parts: bytes, boundary: str = B, close: bool = True) -> bytes:
    out = b"".join(b"--" + boundary.encode() + b"\r\n" + p + b"\r\n" for p in parts)
    return out + (b"--" + boundary.encode() + b"--\r\n" if close else b"")


def file_part(data: bytes, name: str = "a.txt", ctype: str = "text/plain") -> bytes:
    head = f'Content-Disposition: form-data; name="file"; filename="{name}"\r\n'
    if ctype:
        head += f"Content-Type: {ctype}\r\n"
    return head.encode() + b"\r\n" + data


def field(name: str, value: bytes) -> bytes:
    return f'Content-Disposition: form-data; name="{name}"\r\n\r\n'.encode() + value


async def pieces(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


async def parse(data: bytes, size: int = 7, boundary: str = B) -> tuple[str, str, bytes]:
    part = await open_file_part(pieces(data, size), boundary)
    got = b"".join([chunk async for chunk in part.chunks])
    return part.filename, part.content_type, got


def test_boundary_from_content_type() -> None:
    assert multipart_boundary(f"multipart/form-data; boundary={B}") == B
    assert multipart_boundary('Multipart/Form-Data; charset=utf-8; boundary="a b"') == "a b"
    assert multipart_boundary("application/pdf") is None
    assert multipart_boundary("") is None
    with pytest.raises(InvalidArgument) as err:
        multipart_boundary("multipart/form-data")
    assert err.value.reason == "MULTIPART_NO_BOUNDARY"


@pytest.mark.parametrize("size", [1, 2, 5, 37, 1 << 20])
async def test_file_part_split_anywhere(size: int) -> None:
    # Data full of near-delimiters: CRLF, dashes, a boundary prefix.
    data = os.urandom(3000) + b"\r\n--" + B[:-1].encode() + b"\r\n\r\n--" + os.urandom(100)
    raw = body(field("note", b"hello"), file_part(data, "r\u00e9sum\u00e9.pdf", "application/pdf"))
    name, ctype, got = await parse(raw, size)
    assert (name, ctype) == ("r\u00e9sum\u00e9.pdf", "application/pdf")
    assert got == data


async def test_later_parts_are_dropped_and_preamble_skipped() -> None:
    raw = b"preamble text\r\n" + body(file_part(b"first"), file_part(b"second", "b.txt"))
    assert await parse(raw) == ("a.txt", "text/plain", b"first")


async def test_extended_filename_and_windows_path() -> None:
    head = (
        'Content-Disposition: form-data; name=f; filename="fallback.txt"; '
        "filename*=UTF-8''%E6%96%87%E6%A1%A3.txt\r\n\r\n"
    )
    assert (await parse(body(head.encode() + b"x")))[0] == "\u6587\u6863.txt"
    assert (await parse(body(file_part(b"x", "C:\\Users\\me\\notes.md", ""))))[:2] == (
        "notes.md",
        "",
    )


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (body(file_part(b"abc"), close=False), "MULTIPART_TRUNCATED"),
        (body(file_part(b"abc"))[:-12], "MULTIPART_TRUNCATED"),
        (body(field("only", b"a field")), "MULTIPART_NO_FILE"),
        (b"no boundary anywhere", "MULTIPART_MALFORMED"),
        (body(b"Content-Type: text/plain\r\n\r\nx"), "MULTIPART_MALFORMED"),
        (body(b"not a header line\r\n\r\nx"), "MULTIPART_MALFORMED"),
        (
            body(b"X-Long: " + b"a" * MAX_PART_HEADER_BYTES + b"\r\n\r\nx"),
            "MULTIPART_HEADERS_TOO_LARGE",
        ),
        (b"--" + B.encode() + b"junk\r\n", "MULTIPART_MALFORMED"),
    ],
)
async def test_malformed_bodies_have_precise_reasons(raw: bytes, why: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        await parse(raw)
    assert err.value.reason == why


async def test_memory_stays_bounded_by_one_message() -> None:
    """The parser never keeps more than a message plus a delimiter."""
    chunk = b"z" * 65536
    count = 200

    async def source() -> AsyncIterator[bytes]:
        yield f"--{B}\r\n".encode() + file_part(b"")
        for _ in range(count):
            yield chunk
        yield f"\r\n--{B}--\r\n".encode()

    part = await open_file_part(source(), B)
    total = 0
    biggest = 0
    async for piece in part.chunks:
        total += len(piece)
        biggest = max(biggest, len(piece))
    assert total == len(chunk) * count
    assert biggest <= len(chunk) + len(B) + 4
