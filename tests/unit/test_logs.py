"""Structured logs: one JSON object per line, extras as fields."""

from __future__ import annotations

import json
import logging

from services.common.logs import JsonFormatter, TextFormatter


def record(message: str, **extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "kb.test", "levelname": "INFO", "msg": message})
    rec.__dict__.update(extra)
    return rec


def test_json_line_has_service_message_and_extras() -> None:
    line = JsonFormatter("task-manager").format(record("task queued", task_id="t-1", attempt=2))
    entry = json.loads(line)
    assert entry["service"] == "task-manager"
    assert entry["message"] == "task queued"
    assert entry["task_id"] == "t-1"
    assert entry["attempt"] == 2
    assert entry["level"] == "info"
    assert "\n" not in line


def test_text_line_appends_extras() -> None:
    line = TextFormatter("knowledge").format(record("listening", address="127.0.0.1:1"))
    assert "knowledge kb.test: listening address=127.0.0.1:1" in line
