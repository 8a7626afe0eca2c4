"""Content sniffing: the bytes decide; the name only breaks ties among text formats."""

from __future__ import annotations

import pytest

from services.knowledge.ingest.errors import DocumentRejected
from services.knowledge.ingest.sniff import Kind, sniff
from tests import documents


@pytest.mark.parametrize(
    ("data", "name", "kind"),
    [
        (documents.pdf([("Title", "Body")]), "a.pdf", Kind.PDF),
        (documents.docx(), "a.docx", Kind.DOCX),
        (documents.pptx(), "a.pptx", Kind.PPTX),
        (documents.xlsx(), "a.xlsx", Kind.XLSX),
        (documents.csv_bytes(), "a.csv", Kind.CSV),
        (documents.HTML, "page.html", Kind.HTML),
        (documents.MARKDOWN, "guide.md", Kind.MARKDOWN),
        (documents.TEXT, "notes.txt", Kind.TEXT),
        (documents.JSON, "data.json", Kind.JSON),
    ],
)
def test_each_format_is_recognised(data: bytes, name: str, kind: Kind) -> None:
    assert sniff(data[:8192], name) is kind


def test_content_wins_over_the_name() -> None:
    assert sniff(documents.docx(), "upload.bin") is Kind.DOCX
    assert sniff(documents.pdf([("T", "B")]), "report.txt") is Kind.PDF
    # Text bytes under an OOXML name are text, not a broken spreadsheet.
    assert sniff(documents.TEXT, "sheet.xlsx") is Kind.TEXT


def test_text_formats_without_a_telling_name() -> None:
    assert sniff(documents.HTML, "upload") is Kind.HTML
    assert sniff(documents.JSON, "upload") is Kind.JSON
    assert sniff(documents.TEXT, "upload") is Kind.TEXT
    # A truncated head of a JSON file does not parse: plain text, not an error.
    assert sniff(b'{"a": [1, 2', "upload") is Kind.TEXT


@pytest.mark.parametrize(
    ("data", "name", "reason"),
    [
        (b"", "a.pdf", "DOCUMENT_EMPTY"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "a.png", "UNSUPPORTED_TYPE"),
        (b"\x7fELF\x02\x01\x01" + b"\x00" * 64, "a.bin", "UNSUPPORTED_TYPE"),
        (b"garbage\x00\x01\x02binary", "a.dat", "UNSUPPORTED_TYPE"),
        (documents.docx()[:500], "a.docx", "DOCUMENT_CORRUPT"),
    ],
)
def test_refused_content(data: bytes, name: str, reason: str) -> None:
    with pytest.raises(DocumentRejected) as caught:
        sniff(data, name)
    assert caught.value.reason == reason
