"""The document's format, from its bytes.

`filetype` recognises every binary format we parse (PDF and the three OOXML
kinds told apart by their parts) and answers None for text. Text formats have
no magic, so a small heuristic looks at the first bytes, and the file name only
breaks ties among text formats: `report.docx` whose bytes are text is text,
and a DOCX renamed `upload.bin` is still a DOCX.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import PurePath

import filetype

from services.knowledge.ingest.errors import DocumentRejected

# Enough for every format seen (the research measured 8 KiB on all fixtures).
SNIFF_BYTES = 8192


class Kind(StrEnum):
    PDF = "pdf"
    DOCX = "docx"
    PPTX = "pptx"
    XLSX = "xlsx"
    CSV = "csv"
    HTML = "html"
    MARKDOWN = "markdown"
    JSON = "json"
    TEXT = "text"


MEDIA_TYPES: dict[Kind, str] = {
    Kind.PDF: "application/pdf",
    Kind.DOCX: "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
    Kind.PPTX: "application/vnd.openxmlformats-officedocument.presentationml.presentation",
    Kind.XLSX: "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    Kind.CSV: "text/csv",
    Kind.HTML: "text/html",
    Kind.MARKDOWN: "text/markdown",
    Kind.JSON: "application/json",
    Kind.TEXT: "text/plain",
}
OOXML = frozenset({Kind.DOCX, Kind.PPTX, Kind.XLSX})
_BINARY = {MEDIA_TYPES[k]: k for k in (Kind.PDF, *OOXML)}
_BY_SUFFIX = {
    ".md": Kind.MARKDOWN,
    ".markdown": Kind.MARKDOWN,
    ".csv": Kind.CSV,
    ".tsv": Kind.CSV,
    ".json": Kind.JSON,
    ".html": Kind.HTML,
    ".htm": Kind.HTML,
    ".txt": Kind.TEXT,
}
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def sniff(head: bytes, filename: str = "") -> Kind:
    """The kind of a document from its first `SNIFF_BYTES` bytes (and its name for
    text); DocumentRejected DOCUMENT_EMPTY / UNSUPPORTED_TYPE / DOCUMENT_CORRUPT."""
    if not head:
        raise DocumentRejected("DOCUMENT_EMPTY", "the document has no bytes")
    guess = filetype.guess(head[:SNIFF_BYTES])
    if guess is not None:
        mime = str(guess.mime)
        if mime in _BINARY:
            return _BINARY[mime]
        if mime == "application/zip" and filename.lower().endswith((".docx", ".pptx", ".xlsx")):
            # A zip that claims to be OOXML but lacks the parts filetype looks for.
            raise DocumentRejected(
                "DOCUMENT_CORRUPT", f"{filename!r} is a zip archive but not a valid OOXML file"
            )
        raise DocumentRejected("UNSUPPORTED_TYPE", f"documents of type {mime} are not supported")
    if head.startswith(b"%PDF"):
        # filetype wants more than the header; a truncated PDF still is one (and corrupt).
        return Kind.PDF
    sample = head[:SNIFF_BYTES]
    if b"\x00" in sample and not sample.startswith(_UTF16_BOMS):
        raise DocumentRejected("UNSUPPORTED_TYPE", "binary content of an unknown type")
    suffix = PurePath(filename).suffix.lower()
    named = _BY_SUFFIX.get(suffix, Kind.TEXT)
    text = _decode_head(sample).lstrip("\ufeff \t\r\n").lower()
    if text.startswith(("<!doctype html", "<html")) or ("<body" in text and "</" in text):
        return Kind.HTML
    if named is Kind.JSON:
        return Kind.JSON
    if text[:1] in ("{", "[") and named is Kind.TEXT and _whole_json(sample):
        return Kind.JSON
    return named


def _decode_head(sample: bytes) -> str:
    if sample.startswith(_UTF16_BOMS):
        return sample.decode("utf-16", "ignore")
    return sample.decode("utf-8", "ignore")


def _whole_json(sample: bytes) -> bool:
    """Only a head that parses completely counts: a truncated head stays text."""
    try:
        json.loads(sample)
    except ValueError:
        return False
    return True
