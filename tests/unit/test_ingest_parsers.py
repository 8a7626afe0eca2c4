"""Parsers on generated documents of every format, and each bad-document reason."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from services.knowledge.ingest.errors import DocumentRejected, Stopped
from services.knowledge.ingest.parsers import Parsed, break_long_lines, parse
from services.knowledge.ingest.sniff import Kind, sniff
from services.knowledge.settings import IngestSettings
from tests import documents

LIMITS = IngestSettings()


def _parse(tmp_path: Path, name: str, data: bytes, limits: IngestSettings = LIMITS) -> Parsed:
    path = documents.write(tmp_path, name, data)
    return parse(sniff(data[:8192], name), path, limits)


def _reason(tmp_path: Path, name: str, data: bytes, limits: IngestSettings = LIMITS) -> str:
    with pytest.raises(DocumentRejected) as caught:
        _parse(tmp_path, name, data, limits)
    return caught.value.reason


def test_pdf_keeps_page_numbers(tmp_path: Path) -> None:
    parsed = _parse(
        tmp_path,
        "a.pdf",
        documents.pdf(
            [
                ("Intro", "Kbmesh turns documents into knowledge."),
                ("Billing", "Invoices are due in 30 days."),
            ]
        ),
    )
    assert parsed.page_count == 2
    assert [s.page_number for s in parsed.sections] == [1, 2]
    assert "Invoices are due" in parsed.sections[1].text


def test_pdf_reports_pages_parsed_of_total(tmp_path: Path) -> None:
    path = documents.write(
        tmp_path, "a.pdf", documents.pdf([("A", "one"), ("B", "two"), ("C", "three")])
    )
    seen: list[tuple[int, int]] = []
    parse(Kind.PDF, path, LIMITS, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


def test_docx_sections_carry_their_heading(tmp_path: Path) -> None:
    parsed = _parse(tmp_path, "a.docx", documents.docx())
    by_heading = {s.heading: s.text for s in parsed.sections}
    assert "25 days of paid vacation" in by_heading["Vacation policy"]
    assert "Gold | 99" in by_heading["Vacation policy"]  # tables in document order
    assert "receipts" in by_heading["Expenses"]


def test_pptx_slides_are_pages_with_titles_and_notes(tmp_path: Path) -> None:
    parsed = _parse(tmp_path, "a.pptx", documents.pptx())
    assert parsed.page_count == 2
    assert [(s.page_number, s.heading) for s in parsed.sections] == [
        (1, "Quarterly results"),
        (2, "Roadmap"),
    ]
    assert "mobile app" in parsed.sections[1].text
    assert "Speaker notes for Roadmap" in parsed.sections[1].text


def test_xlsx_rows_read_with_their_header_per_sheet(tmp_path: Path) -> None:
    parsed = _parse(tmp_path, "a.xlsx", documents.xlsx())
    assert parsed.page_count == 2
    customers = [s for s in parsed.sections if s.sheet == "Customers"]
    assert customers[0].heading == "rows 2-3"
    assert "name: Bob; city: Berlin; plan: Silver" in customers[0].text
    assert any(s.sheet == "Totals" and "customers" in s.text for s in parsed.sections)


def test_csv_rows_read_with_their_header(tmp_path: Path) -> None:
    parsed = _parse(tmp_path, "a.csv", documents.csv_bytes())
    assert "sku: A1; description: Blue widget, large; price: 9.99" in parsed.sections[0].text


def test_html_becomes_markdown_without_scripts(tmp_path: Path) -> None:
    parsed = _parse(tmp_path, "faq.html", documents.HTML)
    [section] = parsed.sections
    assert section.markdown
    assert "## Passwords" in section.text
    assert "secret" not in section.text


def test_markdown_text_and_json(tmp_path: Path) -> None:
    assert _parse(tmp_path, "g.md", documents.MARKDOWN).sections[0].markdown
    assert "shipping" in _parse(tmp_path, "a.txt", documents.TEXT).sections[0].text
    assert _parse(tmp_path, "l.txt", documents.LATIN1).sections[0].text == "café naïve déjà vu\n"
    text = _parse(tmp_path, "d.json", documents.JSON).sections[0].text
    assert "faq[0].a: A knowledge base." in text.splitlines()


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("enc.pdf", documents.encrypted_pdf, "DOCUMENT_ENCRYPTED"),
        ("corrupt.pdf", lambda: documents.pdf([("A", "text")])[:300], "DOCUMENT_CORRUPT"),
        ("blank.pdf", lambda: documents.pdf([("", "")]), "NO_EXTRACTABLE_TEXT"),
        ("empty.txt", lambda: b"", "DOCUMENT_EMPTY"),
        ("blank.txt", lambda: b"  \n\n\t ", "NO_EXTRACTABLE_TEXT"),
        ("corrupt.docx", lambda: documents.docx()[:500], "DOCUMENT_CORRUPT"),
        ("bomb.docx", documents.zip_bomb_docx, "DOCUMENT_TOO_LARGE"),
        ("bad.json", lambda: b'{"a": 1,,}', "DOCUMENT_CORRUPT"),
        ("deep.json", lambda: b"[" * 100_000 + b"]" * 100_000, "DOCUMENT_TOO_LARGE"),
        ("image.png", lambda: b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "UNSUPPORTED_TYPE"),
    ],
)
def test_bad_documents_are_refused_with_their_reason(
    tmp_path: Path, name: str, make: object, reason: str
) -> None:
    assert callable(make)
    assert _reason(tmp_path, name, make()) == reason


def test_owner_only_encrypted_pdf_is_readable(tmp_path: Path) -> None:
    parsed = _parse(tmp_path, "owner.pdf", documents.encrypted_pdf(user_password=""))
    assert "Nobody may read this." in parsed.sections[0].text


def test_limits(tmp_path: Path) -> None:
    three_pages = documents.pdf([("A", "one"), ("B", "two"), ("C", "three")])
    assert (
        _reason(tmp_path, "a.pdf", three_pages, IngestSettings(max_pages=2)) == "DOCUMENT_TOO_LARGE"
    )
    assert (
        _reason(tmp_path, "a.xlsx", documents.xlsx(), IngestSettings(max_cells=5))
        == "DOCUMENT_TOO_LARGE"
    )
    assert (
        _reason(tmp_path, "a.csv", documents.csv_bytes(), IngestSettings(max_cells=5))
        == "DOCUMENT_TOO_LARGE"
    )
    assert (
        _reason(tmp_path, "a.txt", b"x" * 5000, IngestSettings(max_characters=1000))
        == "DOCUMENT_TOO_LARGE"
    )
    strict_zip = IngestSettings(max_uncompressed_bytes=1000)
    assert _reason(tmp_path, "a.docx", documents.docx(), strict_zip) == "DOCUMENT_TOO_LARGE"


def test_a_single_huge_line_is_cut_in_linear_time(tmp_path: Path) -> None:
    began = time.monotonic()
    parsed = _parse(tmp_path, "line.txt", b"word " * 400_000)  # one 2 MB line
    assert time.monotonic() - began < 5
    lines = parsed.sections[0].text.split("\n")
    assert max(len(line) for line in lines) <= LIMITS.max_line_characters
    assert "".join(lines) == "word " * 400_000
    assert break_long_lines("x" * 250, 100) == "\n".join(["x" * 100, "x" * 100, "x" * 50])


def test_cancellation_stops_a_parser(tmp_path: Path) -> None:
    path = documents.write(tmp_path, "a.pdf", documents.pdf([("A", "one"), ("B", "two")]))
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(Stopped):
        parse(Kind.PDF, path, LIMITS, cancelled=cancelled)
