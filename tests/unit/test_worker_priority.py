"""worker.process.lower_session: the paths the real kernel rarely takes
(tests/integration/test_worker_process.py covers the real ones)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from services.knowledge.worker import process


class Autogroup:
    """Stands in for /proc/self/autogroup: refuses `busy` writes with EAGAIN,
    then keeps what is written."""

    def __init__(self, busy: int = 0, error: OSError | None = None) -> None:
        self.busy = busy
        self.error = error
        self.value = "/autogroup-1 nice 0"
        self.writes = 0

    def write_text(self, text: str) -> int:
        self.writes += 1
        if self.error is not None:
            raise self.error
        if self.writes <= self.busy:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        self.value = f"/autogroup-1 nice {int(text)}"
        return len(text)

    def read_text(self) -> str:
        return self.value


@pytest.fixture
def leader(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """This process leads its session, autogroup on, no real sleeping."""
    monkeypatch.setattr(os, "getsid", lambda pid: os.getpid())
    enabled = tmp_path / "sched_autogroup_enabled"
    enabled.write_text("1\n")
    monkeypatch.setattr(process, "_AUTOGROUP_ENABLED", enabled)
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    return enabled


def test_sets_the_session_it_leads(leader: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    group = Autogroup()
    monkeypatch.setattr(process, "_AUTOGROUP", group)
    assert process.lower_session(19) == (19, "")
    assert group.value.endswith("nice 19")


def test_waits_out_the_kernels_rate_limit(leader: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    group = Autogroup(busy=3)
    monkeypatch.setattr(process, "_AUTOGROUP", group)
    assert process.lower_session(10) == (10, "")
    assert group.writes == 4


def test_gives_up_on_a_busy_kernel_with_a_problem(
    leader: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = Autogroup(busy=10_000)
    monkeypatch.setattr(process, "_AUTOGROUP", group)
    nice, problem = process.lower_session(10)
    assert nice is None
    assert "busy" in problem
    assert group.writes == process._AUTOGROUP_TRIES


class Rootgroup(Autogroup):
    """Takes the write but reads back empty, as the session the host booted with."""

    def read_text(self) -> str:
        return ""


@pytest.mark.parametrize(
    ("group", "reported"),
    [
        (Autogroup(error=PermissionError(1, "denied")), "denied"),  # a refused write
        (Rootgroup(), "no CPU priority of its own"),  # no autogroup after the write
    ],
)
def test_reports_a_session_it_could_not_lower(
    leader: Path, monkeypatch: pytest.MonkeyPatch, group: Autogroup, reported: str
) -> None:
    monkeypatch.setattr(process, "_AUTOGROUP", group)
    nice, problem = process.lower_session(10)
    assert nice is None
    assert reported in problem


def test_leaves_the_session_alone_without_autogroup(
    leader: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = Autogroup()
    monkeypatch.setattr(process, "_AUTOGROUP", group)
    leader.write_text("0\n")
    assert process.lower_session(19) == (None, "")
    monkeypatch.setattr(process, "_AUTOGROUP_ENABLED", leader.parent / "missing")
    assert process.lower_session(19) == (None, "")
    assert group.writes == 0


def test_leaves_a_session_it_does_not_lead_alone(
    leader: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    group = Autogroup()
    monkeypatch.setattr(process, "_AUTOGROUP", group)
    monkeypatch.setattr(os, "getsid", lambda pid: os.getpid() + 1)
    assert process.lower_session(19) == (None, "")
    assert group.writes == 0


def test_reads_a_session_niceness() -> None:
    assert process.autogroup_niceness("/autogroup-123 nice 19\n") == 19
    assert process.autogroup_niceness("/autogroup-7 nice 0\n") == 0
    # The session the host booted with has no autogroup: the file is empty.
    assert process.autogroup_niceness("") is None
    assert process.autogroup_niceness("\n") is None
