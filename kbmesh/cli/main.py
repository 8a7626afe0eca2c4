"""`kbmesh`: the command line of kbmesh (docs/cli.md).

    kbmesh kb create handbooks
    kbmesh upload ./docs --kb ID --wait
    kbmesh search --kb ID "how many vacation days?"

Every command takes --json (machine-readable output) and the connection
options; errors are one line on stderr and an exit status from
`kbmesh.cli.exit_codes`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
from collections.abc import Awaitable, Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import IO, Any, NoReturn

from kbmesh.cli import output
from kbmesh.cli.exit_codes import Exit, for_error
from kbmesh.cli.paths import PathError, expand_paths
from kbmesh.cli.progress import (
    Board,
    FileProgress,
    JsonLines,
    Lines,
    Reporter,
    task_summary,
)
from kbmesh.client.aio import TERMINAL_STATES, AsyncClient
from kbmesh.client.errors import KbmeshError
from kbmesh.client.settings import ConnectionSettings, SettingsError
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm

Command = Callable[[AsyncClient, argparse.Namespace], Awaitable[int]]


class UsageError(Exception):
    """A problem with the command line found after parsing (exit 2)."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(Exit.USAGE, f"kbmesh: usage error: {message}\n")


# ------------------------------------------------------------------------- helpers


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _json(value: Any) -> None:
    sys.stdout.write(output.dumps(value) + "\n")
    sys.stdout.flush()


def _pairs(values: Sequence[str] | None, what: str) -> dict[str, str]:
    pairs = {}
    for value in values or ():
        key, sep, val = value.partition("=")
        if not sep or not key:
            raise UsageError(f"{what} must be KEY=VALUE, not {value!r}")
        pairs[key] = val
    return pairs


def _chunking(args: argparse.Namespace) -> kn.ChunkingConfig | None:
    if not (args.strategy or args.chunk_size or args.chunk_overlap):
        return None
    return kn.ChunkingConfig(
        strategy=kn.ChunkingConfig.Strategy.Value(f"STRATEGY_{args.strategy.upper()}")
        if args.strategy
        else kn.ChunkingConfig.STRATEGY_UNSPECIFIED,
        chunk_size=args.chunk_size or 0,
        chunk_overlap=args.chunk_overlap or 0,
    )


def _task_exit(task: tm.Task) -> int:
    return Exit.OK if task.state == tm.Task.STATE_SUCCEEDED else Exit.FAILED


def _width() -> int:
    return shutil.get_terminal_size((100, 20)).columns


# ----------------------------------------------------------------- knowledge bases


async def kb_create(client: AsyncClient, args: argparse.Namespace) -> int:
    base = await client.create_knowledge_base(
        args.name,
        description=args.description,
        chunking=_chunking(args),
        labels=_pairs(args.label, "--label"),
    )
    if args.json:
        _json(output.to_dict(base))
    elif args.quiet:
        _out(base.id)
    else:
        _out(f"created knowledge base {base.id} ({base.name})")
    return Exit.OK


async def kb_list(client: AsyncClient, args: argparse.Namespace) -> int:
    bases = [b async for b in client.list_knowledge_bases(limit=args.limit)]
    if args.json:
        _json([output.to_dict(b) for b in bases])
    elif bases:
        _out(output.knowledge_base_table(bases))
    else:
        _out("no knowledge bases")
    return Exit.OK


async def kb_get(client: AsyncClient, args: argparse.Namespace) -> int:
    base = await client.get_knowledge_base(args.id)
    _json(output.to_dict(base)) if args.json else _out(output.knowledge_base_details(base))
    return Exit.OK


async def kb_update(client: AsyncClient, args: argparse.Namespace) -> int:
    base = await client.update_knowledge_base(
        args.id,
        name=args.name,
        description=args.description,
        chunking=_chunking(args),
        labels=_pairs(args.label, "--label") if args.label else None,
    )
    _json(output.to_dict(base)) if args.json else _out(f"updated knowledge base {base.id}")
    return Exit.OK


async def kb_delete(client: AsyncClient, args: argparse.Namespace) -> int:
    response = await client.delete_knowledge_base(args.id)
    if args.json:
        _json({"id": args.id, **output.to_dict(response)})
    else:
        _out(
            f"deleted knowledge base {args.id}: {response.deleted_document_count} documents,"
            f" {response.cancelled_task_count} tasks cancelled"
        )
    return Exit.OK


# -------------------------------------------------------------------------- upload


async def upload(client: AsyncClient, args: argparse.Namespace) -> int:
    if args.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    sources: list[Path | IO[bytes]]
    if "-" in args.paths:
        if len(args.paths) > 1 or not args.filename:
            raise UsageError("'-' (standard input) is uploaded alone and needs --filename")
        sources = [sys.stdin.buffer]
    else:
        if args.filename:
            raise UsageError("--filename is only for '-' (standard input)")
        try:
            sources = list(expand_paths(args.paths))
        except PathError as exc:
            raise UsageError(str(exc)) from None
    metadata = _pairs(args.metadata, "--metadata")
    chunking = _chunking(args)
    files = [
        FileProgress(label=str(source) if isinstance(source, Path) else args.filename)
        for source in sources
    ]
    reporter: Reporter
    if args.json:
        reporter = JsonLines(sys.stdout)
    elif sys.stdout.isatty():
        reporter = Board(sys.stdout, files, _width())
    else:
        reporter = Lines(sys.stdout, sys.stderr)
    sending = asyncio.Semaphore(args.concurrency)
    errors: list[KbmeshError] = []

    async def one(source: Path | IO[bytes], file: FileProgress) -> None:
        try:
            async with sending:
                file.phase = "hashing"
                reporter.update(file)

                def sent(done: int, total: int) -> None:
                    file.phase, file.sent, file.size = "uploading", done, total or file.size
                    reporter.update(file)

                answer = await client.upload(
                    args.kb,
                    source,
                    filename=args.filename,
                    content_type=args.content_type,
                    chunking=chunking,
                    priority=args.priority,
                    force=args.force,
                    metadata=metadata,
                    progress=sent,
                )
            file.task_id, file.document_id = answer.task_id, answer.document_id
            file.size = answer.task.size_bytes or file.size
            file.extra["upload"] = output.to_dict(answer)
            file.extra["duplicate"] = answer.duplicate
            if not args.wait:
                file.phase = "uploaded"
                reporter.update(file)
                return
            file.phase, file.detail = task_summary(answer.task)
            reporter.update(file)

            def follow(event: tm.WatchTaskResponse) -> None:
                if event.task.state in TERMINAL_STATES:
                    file.extra["task"] = output.to_dict(event.task)
                file.phase, file.detail = task_summary(event.task)
                file.stage = output.stage_name(event.task.stage)
                file.fraction = event.task.progress
                reporter.update(file)

            task = await client.wait_task(answer.task_id, on_event=follow)
            file.extra["task"] = output.to_dict(task)
            file.phase, file.detail = task_summary(task)
            if task.state not in TERMINAL_STATES:  # pragma: no cover - wait_task returns final
                file.phase = "error"
            reporter.update(file)
        except KbmeshError as error:
            errors.append(error)
            file.phase, file.detail = "error", output.error_line(error).removeprefix("kbmesh: ")
            file.extra["error"] = output.error_dict(error)
            reporter.update(file)

    try:
        await asyncio.gather(*(one(src, file) for src, file in zip(sources, files, strict=True)))
    finally:
        reporter.close()
    failed = [f for f in files if f.phase in ("failed", "cancelled", "error")]
    uploaded = [f for f in files if f.task_id]
    if not args.json:
        summary = f"{len(uploaded)} of {len(files)} uploaded"
        if args.wait:
            succeeded = sum(f.phase == "succeeded" for f in files)
            summary += f", {succeeded} succeeded, {len(failed)} failed"
        _out(summary)
    if errors and not uploaded:
        # Nothing got through: the (first) error says why, with its own status.
        return for_error(errors[0])
    return Exit.FAILED if failed else Exit.OK


# --------------------------------------------------------------------------- tasks


async def tasks_list(client: AsyncClient, args: argparse.Namespace) -> int:
    tasks = [
        t
        async for t in client.list_tasks(
            knowledge_base_id=args.kb or "", state=args.state, limit=args.limit
        )
    ]
    if args.json:
        _json([output.to_dict(t) for t in tasks])
    else:
        _out(output.task_table(tasks) if tasks else "no tasks")
    return Exit.OK


async def tasks_get(client: AsyncClient, args: argparse.Namespace) -> int:
    task = await client.get_task(args.id)
    if args.json:
        _json(output.to_dict(task))
    else:
        _out(f"{task.id}  {output.task_line(task)}")
    return Exit.OK


async def tasks_watch(client: AsyncClient, args: argparse.Namespace) -> int:
    return await _follow(client, args.id, args.json, after_event_id=args.after)


async def _follow(
    client: AsyncClient, task_id: str, as_json: bool, after_event_id: str = ""
) -> int:
    """Prints a task's events until it ends; exit 0 if it SUCCEEDED, else 1."""
    live = not as_json and sys.stdout.isatty()
    final: tm.Task | None = None
    async for event in client.watch_task(task_id, after_event_id=after_event_id):
        final = event.task
        if as_json:
            _json(output.to_dict(event))
        elif live:
            sys.stdout.write("\r\x1b[K" + output.task_line(event.task)[: _width() - 1])
            sys.stdout.flush()
        else:
            _out(f"{output.when(event.time)}  {output.task_line(event.task)}")
    if live:
        sys.stdout.write("\n")
    if final is None or final.state not in TERMINAL_STATES:
        final = await client.get_task(task_id)
    return _task_exit(final)


async def tasks_cancel(client: AsyncClient, args: argparse.Namespace) -> int:
    task = await client.cancel_task(args.id, reason=args.reason)
    if args.json:
        _json(output.to_dict(task))
    elif task.state == tm.Task.STATE_CANCELLED:
        _out(f"cancelled task {task.id}")
    else:
        _out(
            f"cancellation of task {task.id} requested (it is {output.task_state_name(task.state)})"
        )
    return Exit.OK


async def tasks_retry(client: AsyncClient, args: argparse.Namespace) -> int:
    task = await client.retry_task(args.id)
    if args.json and not args.wait:
        _json(output.to_dict(task))
    elif not args.json:
        _out(f"task {task.id} queued again")
    if args.wait:
        return await _follow(client, task.id, args.json)
    return Exit.OK


# ----------------------------------------------------------------------- documents


async def docs_list(client: AsyncClient, args: argparse.Namespace) -> int:
    documents = [
        d async for d in client.list_documents(args.kb, state=args.state, limit=args.limit)
    ]
    if args.json:
        _json([output.to_dict(d) for d in documents])
    else:
        _out(output.document_table(documents) if documents else "no documents")
    return Exit.OK


async def docs_get(client: AsyncClient, args: argparse.Namespace) -> int:
    document = await client.get_document(args.kb, args.id)
    _json(output.to_dict(document)) if args.json else _out(output.document_details(document))
    return Exit.OK


async def docs_delete(client: AsyncClient, args: argparse.Namespace) -> int:
    response = await client.delete_document(args.kb, args.id)
    if args.json:
        _json({"id": args.id, **output.to_dict(response)})
    else:
        _out(f"deleted document {args.id} ({response.deleted_chunk_count} chunks)")
    return Exit.OK


async def docs_reindex(client: AsyncClient, args: argparse.Namespace) -> int:
    response = await client.reindex_document(args.kb, args.id, chunking=_chunking(args))
    if args.json and not args.wait:
        _json(output.to_dict(response))
    elif not args.json:
        _out(f"re-indexing document {args.id}: task {response.task_id}")
    if args.wait:
        return await _follow(client, response.task_id, args.json)
    return Exit.OK


async def docs_chunks(client: AsyncClient, args: argparse.Namespace) -> int:
    chunks = [c async for c in client.list_chunks(args.kb, args.id, limit=args.limit)]
    if args.json:
        _json([output.to_dict(c) for c in chunks])
    else:
        _out(output.chunk_lines(chunks, _width()) if chunks else "no chunks")
    return Exit.OK


# -------------------------------------------------------------------------- search


async def search(client: AsyncClient, args: argparse.Namespace) -> int:
    response = await client.search(
        args.kb,
        args.query,
        top_k=args.top_k,
        mode=args.mode,
        score_threshold=args.threshold,
        filenames=args.filename or (),
        document_ids=args.document or (),
        metadata=_pairs(args.metadata, "--metadata"),
    )
    _json(output.to_dict(response)) if args.json else _out(output.search_results(response))
    return Exit.OK


# -------------------------------------------------------------------------- parser


def _common() -> argparse.ArgumentParser:
    """Options every command accepts, before or after the command words."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("output and connection")
    group.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    group.add_argument(
        "--task-manager",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="Task Manager address (env KBMESH_TASK_MANAGER_ADDRESS, default localhost:50051)",
    )
    group.add_argument(
        "--knowledge",
        metavar="HOST:PORT",
        default=argparse.SUPPRESS,
        help="Knowledge Service address (env KBMESH_KNOWLEDGE_ADDRESS, default localhost:50052)",
    )
    group.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env KBMESH_API_KEY)")
    group.add_argument(
        "--tls",
        action="store_true",
        default=argparse.SUPPRESS,
        help="use TLS with the system's roots (env KBMESH_TLS)",
    )
    group.add_argument(
        "--root-cert",
        metavar="PEM",
        default=argparse.SUPPRESS,
        help="root certificates for TLS (env KBMESH_TLS_ROOT_CERT)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=argparse.SUPPRESS,
        help="deadline of each call except uploads and watches (env KBMESH_TIMEOUT, default 30)",
    )
    return common


def _chunking_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strategy", choices=("sentence", "markdown", "token"))
    parser.add_argument("--chunk-size", type=int, metavar="TOKENS")
    parser.add_argument("--chunk-overlap", type=int, metavar="TOKENS")


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    parser = Parser(
        prog="kbmesh",
        description="Upload documents to kbmesh knowledge bases, follow their ingestion, search.",
        epilog="Exit status: 0 ok, 1 a task failed, 2 usage, 3 not found, 4 unavailable, "
        "5 auth, 6 conflict, 7 limit, 8 other error, 130 interrupted (docs/cli.md).",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"kbmesh {_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        group: Any, name: str, run: Command, help_text: str, **kwargs: Any
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(
            name, help=help_text, description=help_text, parents=[common], **kwargs
        )
        sub.set_defaults(run=run)
        return sub

    def group(name: str, help_text: str) -> Any:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        return sub.add_subparsers(dest="action", metavar="ACTION", required=True)

    kb = group("kb", "manage knowledge bases")
    sub = command(kb, "create", kb_create, "create a knowledge base")
    sub.add_argument("name")
    sub.add_argument("--quiet", "-q", action="store_true", help="print only the new id")
    sub.add_argument("--description", default="")
    sub.add_argument("--label", action="append", metavar="KEY=VALUE")
    _chunking_options(sub)
    sub = command(kb, "list", kb_list, "list knowledge bases, newest first")
    sub.add_argument("--limit", type=int)
    sub = command(kb, "get", kb_get, "show a knowledge base")
    sub.add_argument("id")
    sub = command(kb, "update", kb_update, "change a knowledge base's name, description, chunking")
    sub.add_argument("id")
    sub.add_argument("--name")
    sub.add_argument("--description")
    sub.add_argument("--label", action="append", metavar="KEY=VALUE")
    _chunking_options(sub)
    sub = command(kb, "delete", kb_delete, "delete a knowledge base with its documents")
    sub.add_argument("id")

    sub = command(
        commands,
        "upload",
        upload,
        "upload files, directories (recursively) or glob patterns to a knowledge base",
    )
    sub.add_argument("paths", nargs="+", metavar="PATH", help="file, directory, glob, or -")
    sub.add_argument("--filename", help="file name of what '-' reads from standard input")
    sub.add_argument("--kb", required=True, metavar="ID", help="knowledge base id")
    sub.add_argument("--wait", action="store_true", help="follow ingestion until every file ends")
    sub.add_argument(
        "--concurrency",
        "-j",
        type=int,
        default=4,
        metavar="N",
        help="files uploaded at once (default 4)",
    )
    sub.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    sub.add_argument("--content-type", default="", help="media type (default: detected)")
    sub.add_argument("--priority", type=int, default=0, help="queue priority 0-9")
    sub.add_argument("--force", action="store_true", help="ingest even if already uploaded")
    _chunking_options(sub)

    tasks = group("tasks", "follow and control ingestion tasks")
    sub = command(tasks, "list", tasks_list, "list tasks, newest first")
    sub.add_argument("--kb", metavar="ID")
    sub.add_argument("--state", help="pending, running, succeeded, failed or cancelled")
    sub.add_argument("--limit", type=int, default=50)
    sub = command(tasks, "get", tasks_get, "show a task")
    sub.add_argument("id")
    sub = command(tasks, "watch", tasks_watch, "follow a task until it ends (resumes after drops)")
    sub.add_argument("id")
    sub.add_argument("--after", default="", metavar="EVENT_ID", help="resume after this event")
    sub = command(tasks, "cancel", tasks_cancel, "cancel a task")
    sub.add_argument("id")
    sub.add_argument("--reason", default="")
    sub = command(tasks, "retry", tasks_retry, "queue a failed or cancelled task again")
    sub.add_argument("id")
    sub.add_argument("--wait", action="store_true")

    docs = group("docs", "inspect and manage documents")
    sub = command(docs, "list", docs_list, "list a knowledge base's documents")
    sub.add_argument("--kb", required=True, metavar="ID")
    sub.add_argument("--state", help="pending, running, succeeded, failed or cancelled")
    sub.add_argument("--limit", type=int)
    sub = command(docs, "get", docs_get, "show a document")
    sub.add_argument("id")
    sub.add_argument("--kb", required=True, metavar="ID")
    sub = command(docs, "delete", docs_delete, "delete a document and its chunks")
    sub.add_argument("id")
    sub.add_argument("--kb", required=True, metavar="ID")
    sub = command(docs, "reindex", docs_reindex, "ingest a stored document again")
    sub.add_argument("id")
    sub.add_argument("--kb", required=True, metavar="ID")
    sub.add_argument("--wait", action="store_true")
    _chunking_options(sub)
    sub = command(docs, "chunks", docs_chunks, "show how a document was split")
    sub.add_argument("id")
    sub.add_argument("--kb", required=True, metavar="ID")
    sub.add_argument("--limit", type=int)

    sub = command(commands, "search", search, "search a knowledge base")
    sub.add_argument("query")
    sub.add_argument("--kb", required=True, metavar="ID")
    sub.add_argument("--top-k", "-k", type=int, default=5)
    sub.add_argument("--mode", choices=("hybrid", "vector", "keyword"))
    sub.add_argument("--threshold", type=float, default=0.0, help="drop results scoring below")
    sub.add_argument("--filename", action="append", help="only these file names")
    sub.add_argument("--document", action="append", metavar="ID", help="only these documents")
    sub.add_argument("--metadata", action="append", metavar="KEY=VALUE")
    return parser


def _version() -> str:
    try:
        return metadata.version("kbmesh")
    except metadata.PackageNotFoundError:  # running from a checkout without installing
        return "unknown"


def _settings(args: argparse.Namespace) -> ConnectionSettings:
    return ConnectionSettings.from_env(
        task_manager_address=getattr(args, "task_manager", None),
        knowledge_address=getattr(args, "knowledge", None),
        api_key=getattr(args, "api_key", None),
        tls=True if getattr(args, "tls", False) else None,
        root_cert=getattr(args, "root_cert", None),
        timeout=getattr(args, "timeout", None),
    )


async def _run(args: argparse.Namespace) -> int:
    async with AsyncClient(_settings(args)) as client:
        code: int = await args.run(client, args)
        return code


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; returns the exit status (never raises for errors)."""
    args = build_parser().parse_args(argv)
    args.json = getattr(args, "json", False)
    try:
        return asyncio.run(_run(args))
    except KbmeshError as error:
        if args.json:
            sys.stderr.write(output.dumps(output.error_dict(error)) + "\n")
        else:
            sys.stderr.write(output.error_line(error) + "\n")
        return for_error(error)
    except (UsageError, SettingsError, ValueError) as exc:
        sys.stderr.write(f"kbmesh: usage error: {exc}\n")
        return Exit.USAGE
    except OSError as exc:  # a file that vanished or cannot be read
        sys.stderr.write(f"kbmesh: {exc}\n")
        return Exit.USAGE
    except KeyboardInterrupt:
        sys.stderr.write("kbmesh: interrupted\n")
        return Exit.INTERRUPTED


def run() -> NoReturn:
    """Console-script entry point."""
    sys.exit(main())
