"""Pure parts of the `kbmesh` command: path expansion, formatting, progress
lines, exit codes, option parsing."""

from __future__ import annotations

import io
from pathlib import Path

import grpc
import pytest

from kbmesh.cli import output
from kbmesh.cli.exit_codes import Exit, for_error
from kbmesh.cli.main import build_parser
from kbmesh.cli.paths import PathError, expand_paths
from kbmesh.cli.progress import FileProgress, JsonLines, Lines, bar, render, task_summary
from kbmesh.client import errors
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for name in ["a.txt", "b.pdf", "sub/c.md", "sub/deep/d.txt", ".hidden", ".git/config"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(name)
    return tmp_path


def names(paths: list[Path], root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in paths]


def test_directories_expand_recursively_without_hidden_files(tree: Path) -> None:
    assert names(expand_paths([str(tree)]), tree) == [
        "a.txt",
        "b.pdf",
        "sub/c.md",
        "sub/deep/d.txt",
    ]


def test_globs_files_and_duplicates(tree: Path) -> None:
    found = expand_paths([str(tree / "*.txt"), str(tree / "a.txt"), str(tree / "**" / "*.txt")])
    assert names(found, tree) == ["a.txt", "sub/deep/d.txt"]
    # A hidden file named explicitly is uploaded.
    assert names(expand_paths([str(tree / ".hidden")]), tree) == [".hidden"]


@pytest.mark.parametrize("argument", ["missing.txt", "*.nothing", "empty"])
def test_arguments_that_match_nothing_are_errors(tree: Path, argument: str) -> None:
    (tree / "empty").mkdir()
    with pytest.raises(PathError, match=r"no such file|no file matches|has no files"):
        expand_paths([str(tree / argument)])


def test_exit_code_numbers_are_stable() -> None:
    assert {e.name: int(e) for e in Exit} == {
        "OK": 0,
        "FAILED": 1,
        "USAGE": 2,
        "NOT_FOUND": 3,
        "UNAVAILABLE": 4,
        "AUTH": 5,
        "CONFLICT": 6,
        "LIMIT": 7,
        "ERROR": 8,
        "INTERRUPTED": 130,
    }


def test_exit_codes_follow_the_status_code() -> None:
    assert for_error(errors.NotFound("x")) == Exit.NOT_FOUND
    assert for_error(errors.Unavailable("x")) == Exit.UNAVAILABLE
    assert for_error(errors.DeadlineExceeded("x")) == Exit.UNAVAILABLE
    assert for_error(errors.InvalidArgument("x")) == Exit.USAGE
    assert for_error(errors.Unauthenticated("x")) == Exit.AUTH
    assert for_error(errors.FailedPrecondition("x")) == Exit.CONFLICT
    assert for_error(errors.ResourceExhausted("x")) == Exit.LIMIT
    assert for_error(errors.Internal("x")) == Exit.ERROR
    assert for_error(errors.KbmeshError("x")) == Exit.ERROR


def test_error_line_is_one_line_with_code_and_reason() -> None:
    error = errors.NotFound("knowledge base 'x'\ndoes not exist", reason="KNOWLEDGE_BASE_NOT_FOUND")
    assert output.error_line(error) == (
        "kbmesh: NOT_FOUND (KNOWLEDGE_BASE_NOT_FOUND): knowledge base 'x' does not exist"
    )
    assert output.error_dict(error)["error"]["code"] == "NOT_FOUND"
    assert errors.Unavailable("down").code == grpc.StatusCode.UNAVAILABLE


def test_positions_read_like_a_citation() -> None:
    assert output.position(kn.ChunkPosition(page_number=3, heading="Billing")) == "page 3 · Billing"
    assert output.position(kn.ChunkPosition(sheet="Prices")) == "sheet Prices"
    assert output.position(kn.ChunkPosition(chunk_index=4)) == "chunk 5"


def test_search_results_show_source_position_score_and_text() -> None:
    response = kn.SearchResponse(
        results=[
            kn.SearchResult(
                filename="report.pdf",
                score=0.8123,
                text="Invoices are\n due   within 30 days.",
                position=kn.ChunkPosition(page_number=2),
            )
        ]
    )
    assert output.search_results(response, width=80) == (
        "1. report.pdf · page 2  (score 0.812)\n   Invoices are due within 30 days."
    )
    assert output.search_results(kn.SearchResponse()) == "no results"


def test_task_lines_and_tables() -> None:
    running = tm.Task(
        id="t1",
        filename="a.pdf",
        state=tm.Task.STATE_RUNNING,
        stage=kn.STAGE_EMBEDDING,
        progress=0.5,
        message="page 3 of 6",
    )
    assert output.task_line(running) == "RUNNING a.pdf (embedding 50%) page 3 of 6"
    failed = tm.Task(
        filename="b.pdf",
        state=tm.Task.STATE_FAILED,
        error=tm.TaskError(reason="DOCUMENT_ENCRYPTED", message="the PDF is encrypted"),
    )
    assert output.task_line(failed) == "FAILED b.pdf: DOCUMENT_ENCRYPTED: the PDF is encrypted"
    done = tm.Task(
        filename="c.txt", state=tm.Task.STATE_SUCCEEDED, result=tm.TaskResult(chunk_count=1)
    )
    assert output.task_line(done) == "SUCCEEDED c.txt (1 chunk)"
    lines = output.task_table([running]).splitlines()
    assert lines[0].split() == ["ID", "STATE", "PROGRESS", "SIZE", "CREATED", "FILE"]
    assert lines[1].split()[:4] == ["t1", "RUNNING", "embedding", "50%"]


def test_sizes_and_json() -> None:
    assert [output.human_size(n) for n in (0, 999, 1500, 2_500_000)] == [
        "0 B",
        "999 B",
        "1.5 KB",
        "2.5 MB",
    ]
    data = output.to_dict(tm.Task(id="t", state=tm.Task.STATE_PENDING))
    assert data["state"] == "STATE_PENDING"
    assert data["progress"] == 0  # every field present, for scripts


def test_progress_lines_show_bytes_then_processing() -> None:
    file = FileProgress(label="docs/a.pdf", size=2000, sent=500, phase="uploading")
    assert render(file) == "[#####...............]  25% upload 500 B/2.0 KB  docs/a.pdf"
    file.phase, file.stage, file.fraction = "running", "parsing", 0.5
    assert render(file) == "[##########..........]  50% parsing  docs/a.pdf"
    file.phase, file.detail = "succeeded", "(3 chunks)"
    assert render(file) == "SUCCEEDED (3 chunks)  docs/a.pdf"
    assert render(file, width=10) == "SUCCEEDED…"
    assert bar(2.0, width=4) == "[####]"


def test_task_summaries_for_progress_lines() -> None:
    failed = tm.Task(
        state=tm.Task.STATE_FAILED,
        filename="x.pdf",
        error=tm.TaskError(reason="DOCUMENT_ENCRYPTED", message="needs a password"),
    )
    assert task_summary(failed) == ("failed", "DOCUMENT_ENCRYPTED: needs a password")
    done = tm.Task(state=tm.Task.STATE_SUCCEEDED, result=tm.TaskResult(chunk_count=3))
    assert task_summary(done) == ("succeeded", "(3 chunks)")
    assert task_summary(tm.Task(state=tm.Task.STATE_PENDING, attempt=2)) == (
        "queued",
        "(attempt 2)",
    )
    assert task_summary(tm.Task(state=tm.Task.STATE_RUNNING, message="page 1")) == (
        "running",
        "page 1",
    )


def test_line_reporter_prints_milestones_once() -> None:
    out, err = io.StringIO(), io.StringIO()
    lines = Lines(out, err)
    file = FileProgress(label="a.txt", size=10)
    for phase in ("hashing", "uploading", "uploading"):
        file.phase = phase
        lines.update(file)
    file.phase, file.task_id = "queued", "t1"
    lines.update(file)
    file.phase = "running"
    lines.update(file)
    lines.update(file)
    file.phase, file.detail = "succeeded", "(1 chunk)"
    lines.update(file)
    lines.update(file)
    assert out.getvalue() == "uploaded a.txt (10 B): task t1\nSUCCEEDED a.txt (1 chunk)\n"
    broken = FileProgress(label="b.txt", phase="error", detail="NOT_FOUND (X): nope")
    lines.update(broken)
    assert err.getvalue() == "kbmesh: b.txt: NOT_FOUND (X): nope\n"


def test_json_reporter_prints_uploaded_then_finished() -> None:
    out = io.StringIO()
    reporter = JsonLines(out)
    file = FileProgress(label="a.txt", phase="uploading")
    reporter.update(file)
    file.phase = "queued"
    file.extra["upload"] = {"task_id": "t1"}
    reporter.update(file)
    file.phase = "succeeded"
    file.extra["task"] = {"state": "STATE_SUCCEEDED"}
    reporter.update(file)
    reporter.update(file)
    assert out.getvalue().splitlines() == [
        '{"event": "uploaded", "path": "a.txt", "upload": {"task_id": "t1"}}',
        '{"event": "finished", "path": "a.txt", "task": {"state": "STATE_SUCCEEDED"}}',
    ]


def test_common_options_go_before_or_after_the_command() -> None:
    parser = build_parser()
    after = parser.parse_args(["kb", "list", "--json", "--task-manager", "h:1"])
    before = parser.parse_args(["--json", "--task-manager", "h:1", "kb", "list"])
    for args in (after, before):
        assert args.json is True
        assert args.task_manager == "h:1"
    upload = parser.parse_args(["upload", "a", "b", "--kb", "K", "--wait", "-j", "2"])
    assert (upload.paths, upload.kb, upload.wait, upload.concurrency) == (["a", "b"], "K", True, 2)


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["upload", "a"])  # --kb is required
    assert exited.value.code == Exit.USAGE
    assert "kbmesh: usage error:" in capsys.readouterr().err
