"""Progress of `kbmesh upload`: one line per file, bytes first, then processing.

Three reporters share one interface: `Board` redraws a line per active file in
place on a terminal (finished files scroll up as permanent lines), `Lines`
prints one line per milestone (uploaded, finished) for logs and pipes, and
`JsonLines` prints one JSON object per milestone for scripts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from kbmesh.cli.output import dumps, human_size, task_state_name
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm

BAR_WIDTH = 20
# Redraws per second at most: enough to look live, cheap over a slow terminal.
REDRAW_INTERVAL = 0.1


@dataclass
class FileProgress:
    """What the user sees about one file."""

    label: str
    size: int = 0
    sent: int = 0
    # waiting, hashing, uploading, queued (PENDING), running, or final:
    # uploaded (no --wait), succeeded, failed, cancelled, error (upload failed).
    phase: str = "waiting"
    stage: str = ""
    fraction: float = 0.0
    detail: str = ""
    task_id: str = ""
    document_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.phase in ("uploaded", "succeeded", "failed", "cancelled", "error")


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    fraction = min(1.0, max(0.0, fraction))
    filled = round(fraction * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def render(file: FileProgress, width: int = 100) -> str:
    """The line of one file, cut to `width` characters."""
    if file.phase == "uploading":
        fraction = file.sent / file.size if file.size else 0.0
        total = human_size(file.size) if file.size else "?"
        status = f"{bar(fraction)} {fraction:4.0%} upload {human_size(file.sent)}/{total}"
    elif file.phase == "running":
        status = f"{bar(file.fraction)} {file.fraction:4.0%} {file.stage or 'running'}"
    elif file.phase in ("waiting", "hashing", "queued"):
        status = f"{bar(0.0)}      {file.phase}"
    else:
        status = file.phase.upper()
    if file.detail:
        status += f" {file.detail}"
    line = f"{status}  {file.label}"
    return line if len(line) <= width else line[: max(0, width - 1)] + "…"


class Reporter:
    """Receives every change; subclasses decide what to show."""

    def update(self, file: FileProgress) -> None: ...

    def close(self) -> None: ...


class Board(Reporter):
    """Live lines on a terminal, redrawn in place with ANSI cursor movement."""

    def __init__(self, stream: TextIO, files: list[FileProgress], width: int) -> None:
        self._stream = stream
        self._files = files
        self._width = width
        self._drawn = 0  # lines of the live area currently on screen
        self._printed: set[int] = set()
        self._last = 0.0

    def update(self, file: FileProgress) -> None:
        now = time.monotonic()
        if not file.finished and now - self._last < REDRAW_INTERVAL:
            return
        self._last = now
        self._draw()

    def _draw(self) -> None:
        out = []
        if self._drawn:
            out.append(f"\x1b[{self._drawn}F")  # to the start of the live area
        out.append("\x1b[J")  # clear it
        for index, file in enumerate(self._files):
            if file.finished and index not in self._printed:
                self._printed.add(index)
                out.append(render(file, self._width) + "\n")
        live = [f for i, f in enumerate(self._files) if i not in self._printed]
        active = [f for f in live if f.phase != "waiting"]
        shown = active[:20]
        lines = [render(f, self._width) for f in shown]
        waiting = len(live) - len(shown)
        if waiting:
            lines.append(f"… {waiting} more waiting")
        out.extend(line + "\n" for line in lines)
        self._drawn = len(lines)
        self._stream.write("".join(out))
        self._stream.flush()

    def close(self) -> None:
        self._draw()


class Lines(Reporter):
    """A line when a file is uploaded (with its task id), and one when it ends;
    a file that could not be uploaded gets an error line on `errors`."""

    def __init__(self, stream: TextIO, errors: TextIO) -> None:
        self._stream = stream
        self._errors = errors
        self._seen: dict[int, set[str]] = {}

    def update(self, file: FileProgress) -> None:
        seen = self._seen.setdefault(id(file), set())
        if file.task_id and "uploaded" not in seen:
            seen.add("uploaded")
            note = " (already uploaded before)" if file.extra.get("duplicate") else ""
            self._write(
                f"uploaded {file.label} ({human_size(file.size)}): task {file.task_id}{note}"
            )
        if file.finished and file.phase != "uploaded" and "finished" not in seen:
            seen.add("finished")
            if file.phase == "error":
                self._write(f"kbmesh: {file.label}: {file.detail}", self._errors)
            else:
                detail = file.detail
                if detail:
                    detail = f" {detail}" if detail.startswith("(") else f": {detail}"
                self._write(f"{file.phase.upper()} {file.label}{detail}")

    def _write(self, text: str, stream: TextIO | None = None) -> None:
        out = stream or self._stream
        out.write(text + "\n")
        out.flush()


class JsonLines(Reporter):
    """One JSON object per milestone, each with "event" and "path":
    "uploaded" (+ "upload": the UploadResponse), then "finished" (+ "task": the
    final Task) or "error" (+ "error": code, reason, message)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._seen: dict[int, set[str]] = {}

    def update(self, file: FileProgress) -> None:
        seen = self._seen.setdefault(id(file), set())
        if "upload" in file.extra and "uploaded" not in seen:
            seen.add("uploaded")
            self._write({"event": "uploaded", "path": file.label, "upload": file.extra["upload"]})
        if file.finished and file.phase != "uploaded" and "finished" not in seen:
            seen.add("finished")
            if file.phase == "error":
                record = {"event": "error", "path": file.label, **file.extra.get("error", {})}
            else:
                record = {"event": "finished", "path": file.label, "task": file.extra.get("task")}
            self._write(record)

    def _write(self, record: dict[str, Any]) -> None:
        self._stream.write(dumps(record) + "\n")
        self._stream.flush()


def task_summary(task: tm.Task) -> tuple[str, str]:
    """(phase, detail) of a file whose task reached `task`."""
    state = task_state_name(task.state).lower()
    if state == "pending":
        return "queued", f"(attempt {task.attempt})" if task.attempt > 1 else ""
    if state == "running":
        return "running", task.message
    if state == "succeeded":
        count = task.result.chunk_count
        return state, f"({count} chunk{'' if count == 1 else 's'})"
    if task.error.reason:
        return state, f"{task.error.reason}: {task.error.message}"
    return state, ""
