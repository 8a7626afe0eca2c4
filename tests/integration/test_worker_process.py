"""The Knowledge Service's worker as a child process (worker.isolation=process,
the default): started at a lower CPU priority, restarted when it dies, stopped
with the service, and gone when the service is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.servers import process_alive
from services.knowledge.worker.process import autogroup_enabled, autogroup_niceness
from tests.conftest import ServiceFactory, Stack

pytestmark = pytest.mark.integration


def worker_children(parent: int) -> list[int]:
    """Live `services.knowledge.worker` processes whose parent is `parent`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        # Fields after the command name, which is in parentheses: state, ppid, …
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z" and b"services.knowledge.worker" in cmdline:
            found.append(int(entry.name))
    return found


def autogroup_nice(pid: int) -> int | None:
    """The niceness of `pid`'s session (its autogroup); None for the session
    the host booted with (CI runs the tests in it)."""
    return autogroup_niceness(Path(f"/proc/{pid}/autogroup").read_text())


# Whether the kernel shares CPUs between sessions first (then a worker must
# lower its session's priority, not only its own).
AUTOGROUP = autogroup_enabled()


async def wait_for(condition: object, what: str) -> None:
    for _ in range(600):
        if condition():  # type: ignore[operator]
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"gave up waiting: {what}")


async def test_worker_child_is_niced_restarted_and_stopped(
    stack: Stack, start_service: ServiceFactory
) -> None:
    service = start_service(
        "knowledge",
        name="knowledge-child-worker",
        task_manager_address=stack.tm_address,
        env={"KBMESH_KNOWLEDGE_WORKER__ENABLED": "true", "KBMESH_KNOWLEDGE_WORKER__NICE": "7"},
    )
    await wait_for(lambda: worker_children(service.pid), "the worker child")
    (child,) = worker_children(service.pid)
    service_nice = os.getpriority(os.PRIO_PROCESS, service.pid)
    # The child lowers its own priority first thing after start-up.
    await wait_for(
        lambda: os.getpriority(os.PRIO_PROCESS, child) == min(19, service_nice + 7),
        "the child's niceness",
    )
    assert os.getpriority(os.PRIO_PROCESS, service.pid) == service_nice
    # Where sessions share the CPUs first: in a session of its own, whose
    # priority it lowered too; the service's session keeps its priority.
    if AUTOGROUP:
        assert os.getsid(child) == child != os.getsid(service.pid)
        await wait_for(lambda: autogroup_nice(child) == 7, "the child's session niceness")
        assert autogroup_nice(service.pid) == 0
    else:
        assert os.getsid(child) == os.getsid(service.pid)

    os.kill(child, signal.SIGKILL)
    await wait_for(
        lambda: [c for c in worker_children(service.pid) if c != child], "a restarted child"
    )
    (child,) = worker_children(service.pid)

    assert service.stop() == 0
    await wait_for(lambda: not process_alive(child), "the child to stop with the service")


async def test_worker_child_drains_when_the_service_is_killed(
    stack: Stack, start_service: ServiceFactory
) -> None:
    service = start_service(
        "knowledge",
        name="knowledge-killed",
        task_manager_address=stack.tm_address,
        env={"KBMESH_KNOWLEDGE_WORKER__ENABLED": "true"},
    )
    await wait_for(lambda: worker_children(service.pid), "the worker child")
    (child,) = worker_children(service.pid)
    os.kill(service.pid, signal.SIGKILL)
    await wait_for(lambda: not process_alive(child), "the orphaned child to exit")


LOWER = """
import json, os, sys
from services.knowledge.worker.process import lower_priority
before = os.getpriority(os.PRIO_PROCESS, 0)
p = lower_priority(int(sys.argv[1]))
group = open("/proc/self/autogroup").read() if os.path.exists("/proc/self/autogroup") else ""
print(json.dumps({"before": before, "nice": p.nice, "session_nice": p.session_nice,
                  "problems": p.problems, "autogroup": group}))
"""


def lower_in_child(nice: int, *, own_session: bool) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", LOWER, str(nice)],
        capture_output=True,
        text=True,
        check=True,
        start_new_session=own_session,
        cwd=Path(__file__).resolve().parents[2],
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_lower_priority_lowers_a_session_the_worker_leads() -> None:
    result = lower_in_child(5, own_session=True)
    assert result["problems"] == []
    assert result["nice"] == min(19, int(result["before"]) + 5)  # type: ignore[call-overload]
    if AUTOGROUP:
        assert result["session_nice"] == 5
        assert autogroup_niceness(str(result["autogroup"])) == 5
    else:
        assert result["session_nice"] is None


def test_lower_priority_leaves_a_shared_session_alone() -> None:
    mine = autogroup_nice(os.getpid()) if AUTOGROUP else None
    result = lower_in_child(5, own_session=False)
    assert result["problems"] == []
    assert result["nice"] == min(19, int(result["before"]) + 5)  # type: ignore[call-overload]
    # Started in this process's session: it must not lower this process.
    assert result["session_nice"] is None
    if AUTOGROUP:
        assert autogroup_niceness(str(result["autogroup"])) == mine
        assert autogroup_nice(os.getpid()) == mine
