"""The Knowledge Service's worker as a child process (worker.isolation=process,
the default): started at a lower CPU priority, restarted when it dies, stopped
with the service, and gone when the service is killed."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

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


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


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

    os.kill(child, signal.SIGKILL)
    await wait_for(
        lambda: [c for c in worker_children(service.pid) if c != child], "a restarted child"
    )
    (child,) = worker_children(service.pid)

    assert service.stop() == 0
    await wait_for(lambda: not alive(child), "the child to stop with the service")


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
    await wait_for(lambda: not alive(child), "the orphaned child to exit")
