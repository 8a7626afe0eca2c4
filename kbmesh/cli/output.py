"""How results look: tables and sentences for people, JSON for scripts.

Pure functions from protobuf messages to text, unit-tested on their own.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from kbmesh.client.errors import KbmeshError
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm


def to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data: proto field names, enum names, every field."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=False)


def enum_suffix(name: str) -> str:
    """ "STATE_SUCCEEDED" -> "SUCCEEDED", "STAGE_PARSING" -> "parsing"-style input."""
    return name.split("_", 1)[1] if "_" in name else name


def task_state_name(state: int) -> str:
    return enum_suffix(tm.Task.State.Name(state))  # type: ignore[arg-type]


def document_state_name(state: int) -> str:
    return enum_suffix(kn.Document.State.Name(state))  # type: ignore[arg-type]


def stage_name(stage: int) -> str:
    if stage == kn.STAGE_UNSPECIFIED:
        return ""
    return enum_suffix(kn.Stage.Name(stage)).lower()  # type: ignore[arg-type]


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def when(stamp: Timestamp) -> str:
    if not stamp.seconds and not stamp.nanos:
        return ""
    moment = datetime.fromtimestamp(stamp.seconds, tz=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%SZ")


def position(pos: kn.ChunkPosition) -> str:
    """Where a chunk sits, for people: "page 3 · Install > Linux"."""
    parts = []
    if pos.page_number:
        parts.append(f"page {pos.page_number}")
    if pos.sheet:
        parts.append(f"sheet {pos.sheet}")
    if pos.heading:
        parts.append(pos.heading)
    if not parts:
        parts.append(f"chunk {pos.chunk_index + 1}")
    return " · ".join(parts)


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    rows = [list(headers), *[list(row) for row in rows]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def knowledge_base_table(bases: Iterable[kn.KnowledgeBase]) -> str:
    return table(
        ("ID", "DOCS", "CHUNKS", "SIZE", "CREATED", "NAME"),
        (
            (
                b.id,
                str(b.document_count),
                str(b.chunk_count),
                human_size(b.size_bytes),
                when(b.create_time),
                b.name,
            )
            for b in bases
        ),
    )


def knowledge_base_details(base: kn.KnowledgeBase) -> str:
    chunking = base.chunking
    strategy = kn.ChunkingConfig.Strategy.Name(chunking.strategy)
    lines = [
        ("id", base.id),
        ("name", base.name),
        ("description", base.description),
        ("documents", str(base.document_count)),
        ("chunks", str(base.chunk_count)),
        ("size", human_size(base.size_bytes)),
        (
            "chunking",
            f"{enum_suffix(strategy).lower()} size={chunking.chunk_size or 'default'}"
            f" overlap={chunking.chunk_overlap or 'default'}",
        ),
        ("embedding", f"{base.embedding.provider or 'local'} {base.embedding.model}".strip()),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(base.labels.items()))),
        ("created", when(base.create_time)),
        ("updated", when(base.update_time)),
    ]
    return "\n".join(f"{key + ':':13}{value}" for key, value in lines if value)


def _progress_text(state: str, stage: str, fraction: float) -> str:
    if state == "RUNNING":
        return f"{stage or 'running'} {fraction:.0%}"
    return ""


def task_table(tasks: Iterable[tm.Task]) -> str:
    return table(
        ("ID", "STATE", "PROGRESS", "SIZE", "CREATED", "FILE"),
        (
            (
                t.id,
                task_state_name(t.state),
                _progress_text(task_state_name(t.state), stage_name(t.stage), t.progress),
                human_size(t.size_bytes),
                when(t.create_time),
                t.filename,
            )
            for t in tasks
        ),
    )


def task_line(task: tm.Task) -> str:
    """One line about a task: "SUCCEEDED report.pdf (12 chunks)" and the like."""
    state = task_state_name(task.state)
    text = f"{state} {task.filename}"
    if state == "RUNNING":
        text += f" ({_progress_text(state, stage_name(task.stage), task.progress)})"
        if task.message:
            text += f" {task.message}"
    elif state == "SUCCEEDED":
        count = task.result.chunk_count
        text += f" ({count} chunk{'' if count == 1 else 's'})"
    elif state in ("FAILED", "CANCELLED") and task.error.reason:
        text += f": {task.error.reason}: {task.error.message}"
    elif task.error.reason:  # pending again after a failed attempt
        text += f" (attempt {task.attempt}, last error {task.error.reason})"
    return text


def document_table(documents: Iterable[kn.Document]) -> str:
    return table(
        ("ID", "STATE", "CHUNKS", "SIZE", "TASK", "FILE"),
        (
            (
                d.id,
                document_state_name(d.state),
                str(d.chunk_count),
                human_size(d.size_bytes),
                d.task_id,
                d.filename,
            )
            for d in documents
        ),
    )


def document_details(document: kn.Document) -> str:
    lines = [
        ("id", document.id),
        ("file", document.filename),
        ("type", document.content_type),
        ("size", human_size(document.size_bytes)),
        ("sha256", document.sha256),
        ("state", document_state_name(document.state)),
        ("stage", stage_name(document.stage)),
        ("chunks", str(document.chunk_count)),
        ("pages", str(document.page_count) if document.page_count else ""),
        ("task", document.task_id),
        (
            "error",
            f"{document.error.reason}: {document.error.message}" if document.error.reason else "",
        ),
        ("metadata", ", ".join(f"{k}={v}" for k, v in sorted(document.metadata.items()))),
        ("created", when(document.create_time)),
    ]
    return "\n".join(f"{key + ':':10}{value}" for key, value in lines if value)


def chunk_lines(chunks: Iterable[kn.Chunk], width: int | None = None) -> str:
    width = width or shutil.get_terminal_size((100, 20)).columns
    blocks = []
    for chunk in chunks:
        where = position(chunk.position)
        head = f"#{chunk.position.chunk_index}  {where}  ({chunk.token_count} tokens)"
        body = textwrap.shorten(" ".join(chunk.text.split()), max(40, width - 4) * 3)
        blocks.append(
            head + "\n" + textwrap.indent(textwrap.fill(body, max(40, width - 4)), "    ")
        )
    return "\n".join(blocks)


def search_results(response: kn.SearchResponse, width: int | None = None) -> str:
    """Hits best first: source file and position, score, then the text, wrapped."""
    if not response.results:
        return "no results"
    width = width or shutil.get_terminal_size((100, 20)).columns
    inner = max(40, width - 5)
    blocks = []
    for rank, hit in enumerate(response.results, 1):
        head = f"{rank}. {hit.filename} · {position(hit.position)}  (score {hit.score:.3f})"
        text = textwrap.shorten(" ".join(hit.text.split()), inner * 4, placeholder=" …")
        blocks.append(head + "\n" + textwrap.indent(textwrap.fill(text, inner), "   "))
    return "\n\n".join(blocks)


def error_line(error: KbmeshError) -> str:
    """ "kbmesh: NOT_FOUND (KNOWLEDGE_BASE_NOT_FOUND): knowledge base 'x' does not exist"."""
    reason = f" ({error.reason})" if error.reason else ""
    message = " ".join(error.message.split())
    return f"kbmesh: {error.code.name}{reason}: {message}"


def error_dict(error: KbmeshError) -> dict[str, Any]:
    return {
        "error": {
            "code": error.code.name,
            "reason": error.reason,
            "message": error.message,
            "metadata": error.metadata,
        }
    }
