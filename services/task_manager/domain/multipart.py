"""Streaming ``multipart/form-data`` parsing for uploads from HTML forms.

Through Envoy a form POST reaches Upload as the raw multipart body, split into
messages at arbitrary places. :func:`open_file_part` reads up to the first
part that has a ``filename`` (form fields before it are skipped), answers its
file name and media type from the part headers, and streams its bytes: it
never holds more than one incoming message plus a delimiter's length, so a
multi-GB file needs no more memory than a raw upload. The rest of the body
(later parts) is read and discarded after the file, up to the closing
delimiter; a body that ends before it is truncated and fails.

Malformed input raises InvalidArgument with one of these reasons
(docs/errors.md): MULTIPART_NO_BOUNDARY, MULTIPART_MALFORMED,
MULTIPART_HEADERS_TOO_LARGE, MULTIPART_NO_FILE, MULTIPART_TRUNCATED.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import unquote

from services.common.errors import InvalidArgument

# RFC 2046: 1-70 characters.
MAX_BOUNDARY_CHARS = 70
# All headers of one part.
MAX_PART_HEADER_BYTES = 16 * 1024
# A form field (a part without a filename) before the file.
MAX_FIELD_BYTES = 64 * 1024
# Bytes before the first delimiter (RFC 2046 preamble); browsers send none.
MAX_PREAMBLE_BYTES = 64 * 1024

_PARAM = re.compile(r';\s*([A-Za-z0-9_*.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _invalid(reason: str, message: str) -> InvalidArgument:
    return InvalidArgument(reason, message)


def _params(value: str) -> tuple[str, dict[str, str]]:
    """``form-data; name="f"; filename="a.txt"`` -> ("form-data", {...})."""
    main, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for match in _PARAM.finditer(";" + rest):
        key, raw = match.group(1).lower(), match.group(2).strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            # Browsers percent-encode quotes (HTML spec) and keep backslashes
            # (Windows paths); only an escaped quote is undone here.
            raw = raw[1:-1].replace('\\"', '"')
        params[key] = raw
    return main.strip().lower(), params


def multipart_boundary(content_type: str) -> str | None:
    """The boundary of a ``multipart/form-data`` content type, None for others.

    A multipart/form-data type without a valid boundary is INVALID_ARGUMENT
    (MULTIPART_NO_BOUNDARY).
    """
    kind, params = _params(content_type)
    if kind != "multipart/form-data":
        return None
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= MAX_BOUNDARY_CHARS or not boundary.isascii():
        raise _invalid(
            "MULTIPART_NO_BOUNDARY",
            "a multipart/form-data upload needs a boundary of 1-70 ASCII characters "
            "in its Content-Type",
        )
    return boundary


def _filename(disposition: dict[str, str]) -> str | None:
    """filename* (RFC 5987/6266) first, else filename; only the last path part."""
    name: str | None = None
    extended = disposition.get("filename*")
    if extended and "''" in extended:
        charset, _, encoded = extended.partition("''")
        try:
            name = unquote(encoded, encoding=charset or "utf-8", errors="strict")
        except (LookupError, UnicodeDecodeError):
            name = None
    if name is None and "filename" in disposition:
        # Browsers percent-encode `"`, CR and LF (HTML spec); other clients
        # (aiohttp, some SDKs) percent-encode more. Decoded when the result is
        # UTF-8; a literal "%41" in a name is therefore read as "A".
        try:
            name = unquote(disposition["filename"], errors="strict")
        except UnicodeDecodeError:
            name = disposition["filename"]
    if name is None:
        return None
    # Old browsers send C:\\path\\file.txt; keep the file's own name.
    return re.split(r"[\\/]", name)[-1]


@dataclass(frozen=True)
class FilePart:
    """The document of a multipart upload."""

    filename: str
    content_type: str
    chunks: AsyncIterator[bytes]


class _Stream:
    """Bytes of the body with a small look-ahead buffer."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = aiter(chunks)
        # The first delimiter may open the body without a CRLF before it.
        self.buf = b"\r\n"
        self.eof = False

    async def more(self) -> bool:
        """Appends the next message's bytes; False at the end of the body."""
        while not self.eof:
            chunk = await anext(self._chunks, None)
            if chunk is None:
                self.eof = True
                break
            if chunk:
                self.buf += chunk
                return True
        return False

    async def until(
        self, delimiter: bytes, *, limit: int | None, what: str
    ) -> AsyncIterator[bytes]:
        """Yields bytes up to `delimiter` and consumes it.

        `limit`: at most this many bytes before it (else MULTIPART_MALFORMED).
        """
        keep = len(delimiter) - 1
        seen = 0
        while True:
            index = self.buf.find(delimiter)
            if index >= 0:
                piece, self.buf = self.buf[:index], self.buf[index + len(delimiter) :]
                seen += len(piece)
                if limit is not None and seen > limit:
                    raise _invalid("MULTIPART_MALFORMED", f"the multipart {what} is too long")
                if piece:
                    yield piece
                return
            if len(self.buf) > keep:
                piece, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
                seen += len(piece)
                if limit is not None and seen > limit:
                    raise _invalid("MULTIPART_MALFORMED", f"the multipart {what} is too long")
                yield piece
            if not await self.more():
                raise _invalid(
                    "MULTIPART_TRUNCATED",
                    f"the multipart body ended inside the {what}, before its closing boundary",
                )

    async def skip_until(self, delimiter: bytes, *, limit: int | None, what: str) -> None:
        async for _ in self.until(delimiter, limit=limit, what=what):
            pass

    async def take(self, n: int) -> bytes:
        while len(self.buf) < n and await self.more():
            pass
        if len(self.buf) < n:
            raise _invalid(
                "MULTIPART_TRUNCATED", "the multipart body ended before its closing boundary"
            )
        head, self.buf = self.buf[:n], self.buf[n:]
        return head


async def _part_headers(stream: _Stream) -> dict[str, str]:
    """Reads one part's header block (after the delimiter line's CRLF)."""
    first = await stream.take(2)
    if first == b"\r\n":
        return {}
    pieces = [first]
    try:
        async for piece in stream.until(
            b"\r\n\r\n", limit=MAX_PART_HEADER_BYTES, what="part headers"
        ):
            pieces.append(piece)
    except InvalidArgument as exc:
        if exc.reason == "MULTIPART_MALFORMED":
            raise _invalid(
                "MULTIPART_HEADERS_TOO_LARGE",
                f"a multipart part's headers exceed {MAX_PART_HEADER_BYTES} bytes",
            ) from None
        raise
    try:
        text = b"".join(pieces).decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid("MULTIPART_MALFORMED", "multipart part headers are not UTF-8") from None
    headers: dict[str, str] = {}
    for line in text.split("\r\n"):
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise _invalid("MULTIPART_MALFORMED", f"bad multipart part header line {line[:80]!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


async def _after_delimiter(stream: _Stream) -> bool:
    """After ``--boundary``: True if a part follows, False at the closing one."""
    tail = await stream.take(2)
    if tail == b"--":
        return False
    # RFC 2046 allows transport padding (spaces, tabs) before the CRLF.
    while tail[:1] in (b" ", b"\t"):
        tail = tail[1:] + await stream.take(1)
    if tail != b"\r\n":
        raise _invalid("MULTIPART_MALFORMED", "a multipart boundary line is not followed by CRLF")
    return True


async def open_file_part(chunks: AsyncIterator[bytes], boundary: str) -> FilePart:
    """Reads up to the first file part and answers it, its bytes streamed.

    The bytes iterator must be consumed to the end: after the file it checks
    the rest of the body up to the closing delimiter.
    """
    stream = _Stream(chunks)
    delimiter = b"\r\n--" + boundary.encode("ascii")
    try:
        await stream.skip_until(delimiter, limit=MAX_PREAMBLE_BYTES, what="preamble")
    except InvalidArgument as exc:
        raise _invalid(
            "MULTIPART_MALFORMED",
            "the body does not start with the multipart boundary of its Content-Type",
        ) from exc
    while await _after_delimiter(stream):
        headers = await _part_headers(stream)
        kind, disposition = _params(headers.get("content-disposition", ""))
        if kind != "form-data":
            raise _invalid(
                "MULTIPART_MALFORMED", "every multipart part needs Content-Disposition: form-data"
            )
        filename = _filename(disposition)
        if filename is None:
            # A plain form field before the file: skipped.
            await stream.skip_until(delimiter, limit=MAX_FIELD_BYTES, what="form field")
            continue
        return FilePart(
            filename=filename,
            content_type=headers.get("content-type", ""),
            chunks=_file_bytes(stream, delimiter),
        )
    raise _invalid("MULTIPART_NO_FILE", "the multipart body has no file part (no filename)")


async def _file_bytes(stream: _Stream, delimiter: bytes) -> AsyncIterator[bytes]:
    async for piece in stream.until(delimiter, limit=None, what="file part"):
        yield piece
    # Later parts are read and dropped; the body must still end properly.
    while await _after_delimiter(stream):
        await _part_headers(stream)
        await stream.skip_until(delimiter, limit=None, what="part after the file")
