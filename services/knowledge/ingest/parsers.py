"""One parser per format: a file on disk → `Section`s of text with their position.

Every parser works under `IngestSettings` limits (pages, cells, characters,
JSON depth, the zip guard for OOXML) so a pathological file is refused early
instead of filling memory. Blocking: run in a worker thread. Parsers call
`progress(done, total)` (pages, slides, sheets) and stop with `Stopped` when
`cancelled` is set.

Anything a parser library raises on a malformed file becomes DOCUMENT_CORRUPT
with the library's message: those libraries raise a zoo of types (pypdf's
PdfReadError/PdfStreamError, KeyError for a missing OOXML part, lxml's
XMLSyntaxError…) and the listed ones are not exhaustive.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.knowledge.ingest.errors import DocumentRejected, Stopped
from services.knowledge.ingest.sniff import OOXML, Kind
from services.knowledge.ingest.zipguard import check_ooxml
from services.knowledge.settings import IngestSettings

log = logging.getLogger(__name__)
# pypdf logs "EOF marker not found" and the like for every odd file: our error says it.
logging.getLogger("pypdf").setLevel(logging.ERROR)

Progress = Callable[[int, int], None]
# Rows of a sheet or CSV file per section: a section is the unit a heading ("rows
# 2-51") names, small enough that a chunk rarely spans two.
ROWS_PER_SECTION = 50


@dataclass(frozen=True)
class Section:
    text: str
    page_number: int = 0
    heading: str = ""
    sheet: str = ""
    # Markdown source (Markdown, HTML converted): headings are found in the text.
    markdown: bool = False


@dataclass(frozen=True)
class Parsed:
    sections: list[Section]
    # Pages (PDF), slides (PPTX), sheets (XLSX); 1 for formats without pages.
    page_count: int


def _no_progress(done: int, total: int) -> None:
    del done, total


class _Budget:
    """Counts extracted characters against `max_characters`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, text: str) -> str:
        self.used += len(text)
        if self.used > self.limit:
            raise DocumentRejected(
                "DOCUMENT_TOO_LARGE", f"more than {self.limit} characters of text"
            )
        return text


def parse(
    kind: Kind,
    path: Path,
    limits: IngestSettings,
    *,
    progress: Progress = _no_progress,
    cancelled: threading.Event | None = None,
) -> Parsed:
    """Sections of the document; DocumentRejected when it cannot be read or has no text."""
    stop = cancelled or threading.Event()
    try:
        if kind in OOXML:
            check_ooxml(
                path,
                max_uncompressed_bytes=limits.max_uncompressed_bytes,
                max_ratio=limits.max_compression_ratio,
                max_members=limits.max_zip_members,
            )
        parsed = _PARSERS[kind](path, limits, progress, stop)
    except (DocumentRejected, Stopped):
        raise
    except RecursionError as exc:
        raise DocumentRejected("DOCUMENT_TOO_LARGE", "the document is nested too deeply") from exc
    except Exception as exc:
        log.info("parser failed", extra={"kind": kind.value, "error": repr(exc)[:500]})
        raise DocumentRejected(
            "DOCUMENT_CORRUPT", f"the {kind.value} document cannot be read: {_describe(exc)}"
        ) from exc
    sections = [
        Section(
            text=break_long_lines(s.text, limits.max_line_characters),
            page_number=s.page_number,
            heading=s.heading,
            sheet=s.sheet,
            markdown=s.markdown,
        )
        for s in parsed.sections
        if s.text.strip()
    ]
    if not sections:
        raise DocumentRejected("NO_EXTRACTABLE_TEXT", "the document contains no extractable text")
    return Parsed(sections, parsed.page_count)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def break_long_lines(text: str, max_chars: int) -> str:
    """Cuts lines longer than `max_chars`, at the last whitespace when there is one.
    Linear in the text; the sentence splitter is not, on one huge line."""
    if len(text) <= max_chars or all(len(line) <= max_chars for line in text.split("\n")):
        return text
    out: list[str] = []
    for line in text.split("\n"):
        while len(line) > max_chars:
            cut = line.rfind(" ", max_chars // 2, max_chars)
            cut = max_chars if cut < 0 else cut + 1
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return "\n".join(out)


def _check(stop: threading.Event) -> None:
    if stop.is_set():
        raise Stopped


# --- PDF (pypdf) -------------------------------------------------------------------------------


def _pdf(path: Path, limits: IngestSettings, progress: Progress, stop: threading.Event) -> Parsed:
    from pypdf import PdfReader
    from pypdf.errors import FileNotDecryptedError

    reader = PdfReader(path)
    if reader.is_encrypted:
        # An owner-password-only PDF opens with the empty user password.
        try:
            opened = reader.decrypt("")
        except Exception as exc:
            raise DocumentRejected("DOCUMENT_ENCRYPTED", f"the PDF is encrypted: {exc}") from exc
        if not opened:
            raise DocumentRejected(
                "DOCUMENT_ENCRYPTED", "the PDF is encrypted and needs a password"
            )
    # Counting pages is cheap (10,000 pages: ~2 s); extracting them is not.
    total = len(reader.pages)
    if total > limits.max_pages:
        raise DocumentRejected(
            "DOCUMENT_TOO_LARGE", f"the PDF has {total} pages (limit {limits.max_pages})"
        )
    budget = _Budget(limits.max_characters)
    sections: list[Section] = []
    for number, page in enumerate(reader.pages, 1):
        _check(stop)
        try:
            text = page.extract_text() or ""
        except FileNotDecryptedError as exc:
            raise DocumentRejected("DOCUMENT_ENCRYPTED", "the PDF is encrypted") from exc
        sections.append(Section(budget.take(text), page_number=number))
        progress(number, total)
    return Parsed(sections, total)


# --- DOCX (python-docx) ------------------------------------------------------------------------


def _docx(path: Path, limits: IngestSettings, progress: Progress, stop: threading.Event) -> Parsed:
    import docx
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    document = docx.Document(str(path))
    budget = _Budget(limits.max_characters)
    sections: list[Section] = []
    heading = ""
    lines: list[str] = []

    def flush() -> None:
        if lines:
            sections.append(Section("\n".join(lines), heading=heading))
            lines.clear()

    for block in document.iter_inner_content():
        _check(stop)
        if isinstance(block, Paragraph):
            style = block.style.name if block.style is not None else ""
            text = budget.take(block.text)
            if style and (style.startswith("Heading") or style == "Title") and text.strip():
                flush()
                heading = text.strip()
            if text.strip():
                lines.append(text)
        elif isinstance(block, Table):
            for row in block.rows:
                lines.append(budget.take(" | ".join(cell.text for cell in row.cells)))
    flush()
    progress(1, 1)
    return Parsed(sections, 1)


# --- PPTX (python-pptx) ------------------------------------------------------------------------


def _pptx(path: Path, limits: IngestSettings, progress: Progress, stop: threading.Event) -> Parsed:
    from pptx import Presentation

    presentation = Presentation(str(path))
    slides = list(presentation.slides)
    if len(slides) > limits.max_pages:
        raise DocumentRejected(
            "DOCUMENT_TOO_LARGE", f"{len(slides)} slides (limit {limits.max_pages})"
        )
    budget = _Budget(limits.max_characters)
    sections: list[Section] = []
    for number, slide in enumerate(slides, 1):
        _check(stop)
        title_shape = slide.shapes.title
        title = title_shape.text_frame.text.strip() if title_shape is not None else ""
        parts: list[str] = []
        for shape in slide.shapes:
            if shape.has_text_frame and shape.text_frame.text.strip():
                parts.append(shape.text_frame.text)
            elif getattr(shape, "has_table", False):
                table: Any = getattr(shape, "table")  # noqa: B009  # graphic frames only
                parts.extend(" | ".join(c.text for c in row.cells) for row in table.rows)
        if slide.has_notes_slide:
            notes = slide.notes_slide.notes_text_frame
            if notes is not None and notes.text.strip():
                parts.append("Notes: " + notes.text)
        sections.append(Section(budget.take("\n".join(parts)), page_number=number, heading=title))
        progress(number, len(slides))
    return Parsed(sections, len(slides))


# --- XLSX (openpyxl, read-only: rows stream from the file) -------------------------------------


def _xlsx(path: Path, limits: IngestSettings, progress: Progress, stop: threading.Event) -> Parsed:
    from openpyxl import load_workbook

    # We own the file handle: read-only sheets stream from open zip members, and a
    # limit hit mid-sheet would otherwise leave the file open until garbage collection.
    with path.open("rb") as handle:
        # data_only: cached formula results (None for files never saved by a spreadsheet app).
        workbook = load_workbook(handle, read_only=True, data_only=True)
        try:
            return _sheets(workbook, limits, progress, stop)
        finally:
            workbook.close()


def _sheets(
    workbook: Any, limits: IngestSettings, progress: Progress, stop: threading.Event
) -> Parsed:
    sheets = list(workbook.worksheets)
    budget = _Budget(limits.max_characters)
    cells = _CellCount(limits.max_cells)
    sections: list[Section] = []
    for number, sheet in enumerate(sheets, 1):
        _check(stop)
        rows = (
            ["" if v is None else str(v) for v in row] for row in sheet.iter_rows(values_only=True)
        )
        for start, end, text in _row_sections(cells.counted(rows), stop):
            sections.append(
                Section(budget.take(text), heading=f"rows {start}-{end}", sheet=sheet.title)
            )
        progress(number, len(sheets))
    return Parsed(sections, len(sheets))


class _CellCount:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen = 0

    def counted(self, rows: Iterator[list[str]]) -> Iterator[list[str]]:
        for row in rows:
            self.seen += len(row)
            if self.seen > self.limit:
                raise DocumentRejected(
                    "DOCUMENT_TOO_LARGE", f"more than {self.limit} spreadsheet cells"
                )
            yield row


def _row_sections(
    rows: Iterator[list[str]], stop: threading.Event
) -> Iterator[tuple[int, int, str]]:
    """(first row, last row, text) per ROWS_PER_SECTION rows. The first non-empty row
    is the header; each row reads "header: value; …" so a chunk stands on its own."""
    header: list[str] | None = None
    lines: list[str] = []
    start = 0
    for number, row in enumerate(rows, 1):
        if not any(v.strip() for v in row):
            continue
        if header is None:
            header = [v.strip() for v in row]
            continue
        if not lines:
            start = number
            _check(stop)
        lines.append(
            "; ".join(
                f"{h}: {v}" if h else v
                for h, v in zip(header + [""] * (len(row) - len(header)), row, strict=False)
                if v.strip()
            )
        )
        if len(lines) == ROWS_PER_SECTION:
            yield start, number, "\n".join(lines)
            lines = []
    if lines:
        yield start, start + len(lines) - 1, "\n".join(lines)
    elif header is not None and start == 0:
        # A sheet with one row: that row is the content.
        yield 1, 1, " | ".join(header)


# --- text formats ------------------------------------------------------------------------------


def decode_text(data: bytes) -> str:
    """UTF-8 (with or without BOM), UTF-16 with a BOM, else Windows-1252, which maps
    every byte (the last resort for Latin-1-ish files)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    if b"\x00" in data[:8192]:
        raise DocumentRejected("UNSUPPORTED_TYPE", "binary content, not text")
    return data.decode("cp1252", errors="replace")


def _read_text(path: Path, limits: IngestSettings) -> str:
    # Up to 4 bytes a character in UTF-8: a bigger file is over the limit whatever it holds.
    size = path.stat().st_size
    if size > 4 * limits.max_characters:
        raise DocumentRejected(
            "DOCUMENT_TOO_LARGE",
            f"{size} bytes of text (limit {limits.max_characters} characters)",
        )
    return _Budget(limits.max_characters).take(decode_text(path.read_bytes()))


def _text(path: Path, limits: IngestSettings, progress: Progress, stop: threading.Event) -> Parsed:
    text = _read_text(path, limits)
    progress(1, 1)
    return Parsed([Section(text)], 1)


def _markdown(
    path: Path, limits: IngestSettings, progress: Progress, stop: threading.Event
) -> Parsed:
    text = _read_text(path, limits)
    progress(1, 1)
    return Parsed([Section(text, markdown=True)], 1)


def _html(path: Path, limits: IngestSettings, progress: Progress, stop: threading.Event) -> Parsed:
    from bs4 import BeautifulSoup
    from markdownify import MarkdownConverter

    size = path.stat().st_size
    if size > 4 * limits.max_characters:
        raise DocumentRejected("DOCUMENT_TOO_LARGE", f"{size} bytes of HTML")
    # lxml never raises on bad HTML and decodes by the meta charset.
    soup = BeautifulSoup(path.read_bytes(), "lxml")
    for tag in soup(["script", "style", "noscript", "template", "svg", "head"]):
        tag.decompose()
    text = MarkdownConverter(heading_style="ATX", strip=["a", "img"]).convert_soup(soup)
    progress(1, 1)
    return Parsed([Section(_Budget(limits.max_characters).take(text), markdown=True)], 1)


def _csv(path: Path, limits: IngestSettings, progress: Progress, stop: threading.Event) -> Parsed:
    text = _read_text(path, limits)
    try:
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t|")
    except csv.Error:
        dialect = csv.excel
    rows = csv.reader(io.StringIO(text), dialect)
    cells = _CellCount(limits.max_cells)
    sections = [
        Section(body, heading=f"rows {start}-{end}")
        for start, end, body in _row_sections(cells.counted(rows), stop)
    ]
    progress(1, 1)
    return Parsed(sections, 1)


def _json(path: Path, limits: IngestSettings, progress: Progress, stop: threading.Event) -> Parsed:
    data = json.loads(_read_text(path, limits))
    lines: list[str] = []
    budget = _Budget(limits.max_characters)

    def walk(value: object, where: str, depth: int) -> None:
        if depth > limits.max_json_depth:
            raise DocumentRejected(
                "DOCUMENT_TOO_LARGE", f"JSON nested deeper than {limits.max_json_depth} levels"
            )
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}" if where else str(key), depth + 1)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{where}[{i}]", depth + 1)
        else:
            lines.append(budget.take(f"{where}: {value}" if where else str(value)))

    walk(data, "", 0)
    progress(1, 1)
    return Parsed([Section("\n".join(lines))], 1)


_PARSERS: dict[Kind, Callable[[Path, IngestSettings, Progress, threading.Event], Parsed]] = {
    Kind.PDF: _pdf,
    Kind.DOCX: _docx,
    Kind.PPTX: _pptx,
    Kind.XLSX: _xlsx,
    Kind.CSV: _csv,
    Kind.HTML: _html,
    Kind.MARKDOWN: _markdown,
    Kind.JSON: _json,
    Kind.TEXT: _text,
}
