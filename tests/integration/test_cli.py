"""The `kbmesh` command, run as a subprocess against the real services.

The environment points it at a Task Manager and an ingesting Knowledge
Service (KBMESH_TASK_MANAGER_ADDRESS, KBMESH_KNOWLEDGE_ADDRESS), as a user's
shell would after `make up`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from devstack import servers
from devstack.servers import SeaweedServer
from kbmesh.cli.exit_codes import Exit
from tests import documents
from tests.conftest import BucketFactory, Launcher, ServiceFactory, WorkerFactory
from tests.integration.test_sdk import FAST_SHUTDOWN, Mesh, start_mesh, unique

pytestmark = pytest.mark.integration

KBMESH = Path(sys.executable).with_name("kbmesh")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, s3_server: SeaweedServer) -> Iterator[Mesh]:
    launcher = Launcher(tmp_path_factory.mktemp("cli-mesh"))
    try:
        yield start_mesh(launcher, s3_server)
    finally:
        launcher.close()


def kbmesh(
    env: Mapping[str, str], *args: str, timeout: float = 600, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(KBMESH), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=stdin,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def create_kb(env: Mapping[str, str], prefix: str) -> str:
    created = kbmesh(env, "kb", "create", unique(prefix), "--json")
    assert created.returncode == Exit.OK, created.stderr
    kb_id: str = json.loads(created.stdout)["id"]
    return kb_id


def mixed_documents(directory: Path) -> list[str]:
    """A directory of documents in several formats (one in a subdirectory, and a
    hidden file that is not uploaded); returns the file names uploaded."""
    (directory / "more").mkdir(parents=True)
    documents.write(directory, "handbook.docx", documents.docx())
    documents.write(
        directory,
        "report.pdf",
        documents.pdf([("Intro", "Kbmesh indexes documents."), ("Billing", "Invoices are due.")]),
    )
    documents.write(directory, "faq.html", documents.HTML)
    documents.write(directory / "more", "guide.md", documents.MARKDOWN)
    documents.write(directory, "notes.txt", documents.TEXT)
    documents.write(directory, "catalog.csv", documents.csv_bytes())
    documents.write(directory, ".DS_Store", b"\0\0\0hidden")
    return ["catalog.csv", "faq.html", "guide.md", "handbook.docx", "notes.txt", "report.pdf"]


def test_upload_a_directory_wait_and_search(mesh: Mesh, tmp_path: Path) -> None:
    env = mesh.env
    kb_id = create_kb(env, "cli")
    names = mixed_documents(tmp_path / "docs")

    uploaded = kbmesh(env, "upload", str(tmp_path / "docs"), "--kb", kb_id, "--wait", "--json")
    assert uploaded.returncode == Exit.OK, uploaded.stdout + uploaded.stderr
    records = json_lines(uploaded.stdout)
    finished = [r for r in records if r["event"] == "finished"]
    assert sorted(Path(r["path"]).name for r in finished) == names
    assert {r["task"]["state"] for r in finished} == {"STATE_SUCCEEDED"}
    assert len([r for r in records if r["event"] == "uploaded"]) == len(names)

    # People get a line per file and a summary (stdout is a pipe here: no live bars).
    text = documents.write(tmp_path, "dog.txt", b"Our office dog is called Biscuit.\n")
    human = kbmesh(env, "upload", str(text), "--kb", kb_id, "--wait")
    assert human.returncode == Exit.OK, human.stderr
    assert f"SUCCEEDED {text}" in human.stdout
    assert "1 of 1 uploaded, 1 succeeded, 0 failed" in human.stdout

    found = kbmesh(env, "search", "--kb", kb_id, "how many days of paid vacation do I get")
    assert found.returncode == Exit.OK, found.stderr
    first = found.stdout.splitlines()[0]
    # Source file and position (the DOCX heading of the section) come first.
    assert first.startswith("1. handbook.docx · Vacation policy  (score ")
    assert "25 days" in found.stdout

    pdf_hit = kbmesh(env, "search", "--kb", kb_id, "when do invoices have to be paid", "--json")
    best = json.loads(pdf_hit.stdout)["results"][0]
    assert best["filename"] == "report.pdf"
    assert best["position"]["page_number"] == 2

    listed = kbmesh(env, "docs", "list", "--kb", kb_id, "--json")
    docs = json.loads(listed.stdout)
    assert sorted(d["filename"] for d in docs) == sorted([*names, "dog.txt"])
    assert {d["state"] for d in docs} == {"STATE_SUCCEEDED"}
    table = kbmesh(env, "docs", "list", "--kb", kb_id)
    assert table.stdout.splitlines()[0].split() == ["ID", "STATE", "CHUNKS", "SIZE", "TASK", "FILE"]

    tasks = kbmesh(env, "tasks", "list", "--kb", kb_id, "--state", "succeeded", "--json")
    assert len(json.loads(tasks.stdout)) == len(names) + 1

    base = kbmesh(env, "kb", "get", kb_id)
    assert f"id:          {kb_id}" in base.stdout
    assert f"documents:   {len(names) + 1}" in base.stdout

    dog = next(d for d in docs if d["filename"] == "dog.txt")
    chunks = kbmesh(env, "docs", "chunks", dog["id"], "--kb", kb_id)
    assert "Biscuit" in chunks.stdout
    # Re-index the stored file with another chunking and follow it to the end.
    again = kbmesh(
        env, "docs", "reindex", dog["id"], "--kb", kb_id, "--strategy", "token", "--wait"
    )
    assert again.returncode == Exit.OK, again.stdout + again.stderr
    reindexed = json.loads(kbmesh(env, "docs", "get", dog["id"], "--kb", kb_id, "--json").stdout)
    assert reindexed["state"] == "STATE_SUCCEEDED"
    assert reindexed["task_id"] != dog["task_id"]
    assert int(reindexed["chunk_count"]) >= 1
    deleted = kbmesh(env, "docs", "delete", dog["id"], "--kb", kb_id)
    assert deleted.returncode == Exit.OK, deleted.stderr
    gone = kbmesh(env, "docs", "get", dog["id"], "--kb", kb_id)
    assert gone.returncode == Exit.NOT_FOUND

    # A finished task cannot be cancelled: a conflict, with its reason.
    task_id = finished[0]["task"]["id"]
    cancel = kbmesh(env, "tasks", "cancel", task_id)
    assert cancel.returncode == Exit.CONFLICT
    assert "TASK_ALREADY_FINISHED" in cancel.stderr


def test_a_failed_document_makes_the_upload_fail(mesh: Mesh, tmp_path: Path) -> None:
    env = mesh.env
    kb_id = create_kb(env, "cli-fail")
    good = documents.write(tmp_path, "fine.txt", b"Nothing wrong with this one.\n")
    bad = documents.write(tmp_path, "locked.pdf", documents.encrypted_pdf())
    result = kbmesh(env, "upload", str(tmp_path / "*.*"), "--kb", kb_id, "--wait")
    assert result.returncode == Exit.FAILED, result.stdout + result.stderr
    assert f"SUCCEEDED {good}" in result.stdout
    assert f"FAILED {bad}: DOCUMENT_ENCRYPTED: " in result.stdout
    assert "2 of 2 uploaded, 1 succeeded, 1 failed" in result.stdout

    failed = json.loads(
        kbmesh(env, "tasks", "list", "--kb", kb_id, "--state", "failed", "--json").stdout
    )
    assert [t["filename"] for t in failed] == ["locked.pdf"]
    watch = kbmesh(env, "tasks", "watch", failed[0]["id"])
    assert watch.returncode == Exit.FAILED
    assert "FAILED locked.pdf: DOCUMENT_ENCRYPTED" in watch.stdout

    # Standard input (a pipe: streamed as it comes) needs a file name.
    piped = kbmesh(
        env,
        "upload",
        "-",
        "--kb",
        kb_id,
        "--filename",
        "piped.md",
        "--wait",
        stdin="# Piped\n\nhi\n",
    )
    assert piped.returncode == Exit.OK, piped.stderr
    assert "SUCCEEDED piped.md" in piped.stdout
    assert kbmesh(env, "upload", "-", "--kb", kb_id).returncode == Exit.USAGE
    assert kbmesh(env, "upload", "-", str(good), "--kb", kb_id, "--filename", "x").returncode == (
        Exit.USAGE
    )


def test_errors_have_documented_exit_codes(mesh: Mesh, tmp_path: Path) -> None:
    env = mesh.env
    text = documents.write(tmp_path, "a.txt", b"hello\n")

    unknown = kbmesh(env, "upload", str(text), "--kb", "no-such-kb")
    assert unknown.returncode == Exit.NOT_FOUND
    assert unknown.stderr.count("\n") == 1, unknown.stderr
    assert "KNOWLEDGE_BASE_NOT_FOUND" in unknown.stderr
    assert "Traceback" not in unknown.stderr

    get = kbmesh(env, "kb", "get", "no-such-kb", "--json")
    assert get.returncode == Exit.NOT_FOUND
    assert json.loads(get.stderr)["error"]["reason"] == "KNOWLEDGE_BASE_NOT_FOUND"
    assert get.stdout == ""

    task = kbmesh(env, "tasks", "get", "no-such-task")
    assert task.returncode == Exit.NOT_FOUND
    assert "TASK_NOT_FOUND" in task.stderr

    down = f"127.0.0.1:{servers.find_free_port()}"
    offline = kbmesh(
        {"KBMESH_TASK_MANAGER_ADDRESS": down, "KBMESH_KNOWLEDGE_ADDRESS": down}, "kb", "list"
    )
    assert offline.returncode == Exit.UNAVAILABLE
    assert offline.stderr.startswith("kbmesh: UNAVAILABLE")
    assert "Traceback" not in offline.stderr

    assert kbmesh(env, "upload", str(text)).returncode == Exit.USAGE  # no --kb
    missing = kbmesh(env, "upload", str(tmp_path / "nothing-here"), "--kb", "x")
    assert missing.returncode == Exit.USAGE
    assert "no such file or directory" in missing.stderr
    assert kbmesh(env, "search", "--kb", "x", "").returncode in (Exit.USAGE, Exit.NOT_FOUND)

    kb_id = kbmesh(env, "kb", "create", unique("cli-dup"), "-q").stdout.strip()
    taken = json.loads(kbmesh(env, "kb", "get", kb_id, "--json").stdout)["name"]
    again = kbmesh(env, "kb", "create", taken)
    assert again.returncode == Exit.CONFLICT
    assert "KNOWLEDGE_BASE_EXISTS" in again.stderr
    assert kbmesh(env, "kb", "delete", kb_id).returncode == Exit.OK
    assert kbmesh(env, "kb", "get", kb_id).returncode == Exit.NOT_FOUND


def test_watch_resumes_across_a_task_manager_restart(
    start_service: ServiceFactory,
    start_worker: WorkerFactory,
    new_bucket: BucketFactory,
    tmp_path: Path,
) -> None:
    """`kbmesh tasks watch` keeps going while the Task Manager restarts on its
    port, and prints every event once (JSON lines). The task waits for a worker
    that only connects to the restarted Task Manager."""
    bucket = new_bucket()
    first = start_service("task_manager", s3=bucket, env=FAST_SHUTDOWN, name="tm-first")
    knowledge = start_service("knowledge", s3=bucket, task_manager_address=first.address)
    env = {
        "KBMESH_TASK_MANAGER_ADDRESS": first.address,
        "KBMESH_KNOWLEDGE_ADDRESS": knowledge.address,
    }
    kb_id = create_kb(env, "cli-restart")
    path = documents.write(tmp_path, "later.txt", b"processed after the restart\n")
    uploaded = kbmesh(env, "upload", str(path), "--kb", kb_id, "--json")
    assert uploaded.returncode == Exit.OK, uploaded.stderr
    task_id = json_lines(uploaded.stdout)[0]["upload"]["task_id"]

    with subprocess.Popen(
        [str(KBMESH), "tasks", "watch", task_id, "--json"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as watch:
        assert watch.stdout is not None
        snapshot = json.loads(watch.stdout.readline())
        assert snapshot["type"] == "TYPE_SNAPSHOT"
        assert snapshot["task"]["state"] == "STATE_PENDING"

        first.stop()
        again = start_service(
            "task_manager", s3=bucket, env=FAST_SHUTDOWN, port=first.port, name="tm-again"
        )
        start_worker(task_manager_address=again.address, s3=bucket)
        rest, errors = watch.communicate(timeout=300)

    assert watch.returncode == Exit.OK, errors
    events = [snapshot, *json_lines(rest)]
    assert events[-1]["task"]["state"] == "STATE_SUCCEEDED"
    assert events[-1]["last"] is True
    assert [e["type"] for e in events].count("TYPE_SNAPSHOT") == 1
    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids))
