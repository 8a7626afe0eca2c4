"""Documents of every supported format, generated in Python for the ingestion tests
(good ones with known content, and bad ones: encrypted, corrupt, empty, text-less,
zip bomb)."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path


def pdf(pages: list[tuple[str, str]]) -> bytes:
    """One page per (title, body)."""
    from fpdf import FPDF

    doc = FPDF()
    for title, body in pages:
        doc.add_page()
        doc.set_font("Helvetica", "B", 16)
        doc.cell(0, 10, title, new_x="LMARGIN", new_y="NEXT")
        doc.set_font("Helvetica", size=12)
        doc.multi_cell(0, 8, body)
    return bytes(doc.output())


def encrypted_pdf(user_password: str = "secret") -> bytes:
    from pypdf import PdfReader, PdfWriter

    source = PdfReader(io.BytesIO(pdf([("Secret", "Nobody may read this.")])))
    writer = PdfWriter(clone_from=source)
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="AES-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def docx() -> bytes:
    import docx as python_docx

    document = python_docx.Document()
    document.add_heading("Employee Handbook", level=1)
    document.add_paragraph("Welcome to the company.")
    document.add_heading("Vacation policy", level=2)
    document.add_paragraph("Employees get 25 days of paid vacation per year.")
    table = document.add_table(rows=2, cols=2)
    table.cell(0, 0).text = "Plan"
    table.cell(0, 1).text = "Price"
    table.cell(1, 0).text = "Gold"
    table.cell(1, 1).text = "99"
    document.add_heading("Expenses", level=2)
    document.add_paragraph("Submit receipts within 30 days.")
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def pptx() -> bytes:
    from pptx import Presentation

    presentation = Presentation()
    for title, body in [
        ("Quarterly results", "Revenue grew 12 percent."),
        ("Roadmap", "Launch the mobile app in May."),
    ]:
        slide = presentation.slides.add_slide(presentation.slide_layouts[1])
        assert slide.shapes.title is not None
        slide.shapes.title.text = title
        slide.placeholders[1].text = body
        slide.notes_slide.notes_text_frame.text = f"Speaker notes for {title}"
    out = io.BytesIO()
    presentation.save(out)
    return out.getvalue()


def xlsx() -> bytes:
    from openpyxl import Workbook

    workbook = Workbook()
    sheet = workbook.active
    sheet.title = "Customers"
    sheet.append(["name", "city", "plan"])
    sheet.append(["Alice", "Paris", "Gold"])
    sheet.append(["Bob", "Berlin", "Silver"])
    totals = workbook.create_sheet("Totals")
    totals.append(["metric", "value"])
    totals.append(["customers", 2])
    out = io.BytesIO()
    workbook.save(out)
    return out.getvalue()


def csv_bytes() -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerows(
        [
            ["sku", "description", "price"],
            ["A1", "Blue widget, large", "9.99"],
            ["B2", "Red gadget", "19.50"],
        ]
    )
    return out.getvalue().encode()


HTML = (
    b"<html><head><title>FAQ</title><script>var secret = 1;</script><style>p{}</style></head>"
    b"<body><h1>FAQ</h1><p>General questions.</p><h2>Passwords</h2>"
    b"<p>Reset it from the <b>account</b> page.</p><ul><li>one</li><li>two</li></ul></body></html>"
)

MARKDOWN = (
    b"# Guide\n\nIntro.\n\n## Setup\n\nRun `make up` to start the stack.\n\n"
    b"```sh\n# not a heading\n```\n\n## Usage\n\nSearch away.\n"
)

TEXT = b"Plain text line one.\n\nSecond paragraph about shipping and delivery.\n"
LATIN1 = "café naïve déjà vu\n".encode("latin-1")
JSON = json.dumps(
    {"product": "kbmesh", "faq": [{"q": "What is it?", "a": "A knowledge base."}], "version": 2}
).encode()


def zip_bomb_docx(megabytes: int = 50) -> bytes:
    """A DOCX-shaped zip whose document.xml inflates to `megabytes` MB (ratio ~1000)."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(
            "[Content_Types].xml",
            '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/'
            'package/2006/content-types"><Override PartName="/word/document.xml" '
            'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.'
            'document.main+xml"/></Types>',
        )
        chunk = b"A" * (1 << 20)
        with archive.open("word/document.xml", "w") as member:
            member.write(b"<w:document>")
            for _ in range(megabytes):
                member.write(chunk)
            member.write(b"</w:document>")
    return out.getvalue()


def write(directory: Path, name: str, data: bytes) -> Path:
    path = directory / name
    path.write_bytes(data)
    return path
