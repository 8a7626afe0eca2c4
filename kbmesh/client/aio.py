"""The asynchronous kbmesh client (grpc.aio).

    async with AsyncClient() as kb:            # KBMESH_* environment, or arguments
        base = await kb.create_knowledge_base("handbooks")
        answer = await kb.upload(base.id, "handbook.pdf")
        task = await kb.wait_task(answer.task_id)
        found = await kb.search(base.id, "how many vacation days?")

Results are the generated protobuf messages (kbmesh.knowledge.v1,
kbmesh.taskmanager.v1); failures raise `kbmesh.client.errors.KbmeshError`
subclasses. Lists are async iterators that fetch further pages as needed.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from google.api import httpbody_pb2
from google.protobuf import field_mask_pb2

from kbmesh.client import grpc_fix
from kbmesh.client.errors import KbmeshError, Unavailable, error_class, from_rpc_error
from kbmesh.client.retry import RetryPolicy, retryable
from kbmesh.client.settings import ConnectionSettings
from kbmesh.client.sources import CHUNK_BYTES, UploadInput, UploadSource, source_of
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc

# A refused upload reports the server's status, not INTERNAL (grpc_fix).
grpc_fix.install()

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Item = TypeVar("Item")

# Called with (bytes sent so far, total bytes or 0 when unknown).
UploadProgress = Callable[[int, int], None]

TERMINAL_STATES = frozenset(
    {tm.Task.STATE_SUCCEEDED, tm.Task.STATE_FAILED, tm.Task.STATE_CANCELLED}
)
# Reconnect quickly after a service restart: grpc's defaults (1 s, growing to
# 120 s) would leave a resumed watch waiting long after the service is back.
_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)


def new_request_id() -> str:
    """A fresh idempotency key (AIP-155)."""
    return uuid.uuid4().hex


def task_state(value: str | int) -> tm.Task.State.ValueType:
    """A Task.State from a name ("succeeded", "STATE_FAILED") or a number."""
    return cast("tm.Task.State.ValueType", _enum_value(tm.Task.State, "STATE_", value))


def document_state(value: str | int) -> kn.Document.State.ValueType:
    """A Document.State from a name ("running", "STATE_FAILED") or a number."""
    return cast("kn.Document.State.ValueType", _enum_value(kn.Document.State, "STATE_", value))


def search_mode(value: str | int) -> kn.SearchRequest.Mode.ValueType:
    """A SearchRequest.Mode from a name ("hybrid", "MODE_VECTOR") or a number."""
    return cast(
        "kn.SearchRequest.Mode.ValueType", _enum_value(kn.SearchRequest.Mode, "MODE_", value)
    )


def _enum_value(enum: Any, prefix: str, value: str | int) -> Any:
    if isinstance(value, int):
        enum.Name(value)  # ValueError when unknown
        return value
    name = value.strip().upper()
    if not name.startswith(prefix):
        name = prefix + name
    try:
        return enum.Value(name)
    except ValueError:
        names = ", ".join(n.removeprefix(prefix).lower() for n in enum.keys()[1:])
        raise ValueError(f"unknown value {value!r}; one of: {names}") from None


def event_order(event_id: str) -> tuple[int, int]:
    """Sort key of a WatchTask event id ("<ms>-<seq>"); (-1, -1) if unparsable."""
    ms, _, seq = event_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return -1, -1


class _ResumeWatch(Exception):
    """The watch stream broke in a way a reconnect can repair."""

    def __init__(self, error: KbmeshError) -> None:
        super().__init__(str(error))
        self.error = error


class AsyncClient:
    """Both kbmesh services behind one object. Use as an async context manager
    (or call `close()`); channels open on first use, on the running loop."""

    def __init__(
        self,
        settings: ConnectionSettings | None = None,
        *,
        task_manager_address: str | None = None,
        knowledge_address: str | None = None,
        api_key: str | None = None,
        tls: bool | None = None,
        root_cert: str | Path | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if settings is None:
            settings = ConnectionSettings.from_env(
                task_manager_address=task_manager_address,
                knowledge_address=knowledge_address,
                api_key=api_key,
                tls=tls,
                root_cert=root_cert,
                timeout=timeout,
            )
        elif any(
            value is not None
            for value in (task_manager_address, knowledge_address, api_key, tls, root_cert, timeout)
        ):
            raise TypeError("pass either settings or individual connection arguments")
        self.settings = settings
        self.retry = retry or RetryPolicy()
        self._metadata = settings.call_metadata()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tm: tm_grpc.TaskManagerServiceAsyncStub | None = None
        self._kn: kn_grpc.KnowledgeServiceAsyncStub | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        self._tm = self._kn = None
        for channel in channels.values():
            await channel.close(None)

    # ------------------------------------------------------------------ plumbing

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            if self.settings.tls:
                roots = self.settings.root_cert.read_bytes() if self.settings.root_cert else None
                credentials = grpc.ssl_channel_credentials(root_certificates=roots)
                channel = grpc.aio.secure_channel(address, credentials, options=_CHANNEL_OPTIONS)
            else:
                channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
            self._channels[address] = channel
        return channel

    @property
    def task_manager(self) -> tm_grpc.TaskManagerServiceAsyncStub:
        """The raw Task Manager stub, for what the client does not wrap."""
        if self._tm is None:
            self._tm = tm_grpc.TaskManagerServiceStub(
                self._channel(self.settings.task_manager_address)
            )
        return self._tm

    @property
    def knowledge(self) -> kn_grpc.KnowledgeServiceAsyncStub:
        """The raw Knowledge Service stub, for what the client does not wrap."""
        if self._kn is None:
            self._kn = kn_grpc.KnowledgeServiceStub(self._channel(self.settings.knowledge_address))
        return self._kn

    async def _call(
        self,
        method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp],
        request: Req,
        *,
        retry: bool,
    ) -> Resp:
        """One unary call; retried per `self.retry` when `retry` says it is safe."""
        attempt = 1
        while True:
            try:
                return await method(request, timeout=self.settings.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                error = from_rpc_error(exc)
            if not (retry and self.retry.should_retry(error, attempt)):
                raise error
            await asyncio.sleep(self.retry.backoff(attempt, error))
            attempt += 1

    async def _pages(
        self,
        fetch: Callable[[str], Any],
        items: Callable[[Any], Iterable[Item]],
        limit: int | None,
    ) -> AsyncIterator[Item]:
        token, count = "", 0
        while True:
            page = await fetch(token)
            for item in items(page):
                if limit is not None and count >= limit:
                    return
                count += 1
                yield item
            token = page.next_page_token
            if not token or (limit is not None and count >= limit):
                return

    # ------------------------------------------------------------ knowledge bases

    async def create_knowledge_base(
        self,
        name: str,
        *,
        description: str = "",
        chunking: kn.ChunkingConfig | None = None,
        embedding: kn.EmbeddingConfig | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> kn.KnowledgeBase:
        """Creates a knowledge base. A request_id is generated unless given, so
        the call is retried safely; ALREADY_EXISTS when the name is taken."""
        base = kn.KnowledgeBase(
            name=name, description=description, chunking=chunking, embedding=embedding
        )
        base.labels.update(labels or {})
        request = kn.CreateKnowledgeBaseRequest(
            knowledge_base=base, request_id=new_request_id() if request_id is None else request_id
        )
        return await self._call(
            self.knowledge.CreateKnowledgeBase, request, retry=bool(request.request_id)
        )

    async def get_knowledge_base(self, knowledge_base_id: str) -> kn.KnowledgeBase:
        return await self._call(
            self.knowledge.GetKnowledgeBase,
            kn.GetKnowledgeBaseRequest(knowledge_base_id=knowledge_base_id),
            retry=True,
        )

    def list_knowledge_bases(
        self, *, page_size: int = 0, limit: int | None = None
    ) -> AsyncIterator[kn.KnowledgeBase]:
        """Every knowledge base, newest first (pages fetched as you iterate)."""

        def fetch(token: str) -> Any:
            request = kn.ListKnowledgeBasesRequest(page_size=page_size, page_token=token)
            return self._call(self.knowledge.ListKnowledgeBases, request, retry=True)

        return self._pages(fetch, lambda page: page.knowledge_bases, limit)

    async def update_knowledge_base(
        self,
        knowledge_base_id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        chunking: kn.ChunkingConfig | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> kn.KnowledgeBase:
        """Changes the given fields only (the update mask names them)."""
        base = kn.KnowledgeBase(id=knowledge_base_id)
        paths = []
        if name is not None:
            base.name = name
            paths.append("name")
        if description is not None:
            base.description = description
            paths.append("description")
        if chunking is not None:
            base.chunking.CopyFrom(chunking)
            paths.append("chunking")
        if labels is not None:
            base.labels.update(labels)
            paths.append("labels")
        if not paths:
            raise ValueError("nothing to update")
        request = kn.UpdateKnowledgeBaseRequest(
            knowledge_base=base,
            update_mask=field_mask_pb2.FieldMask(paths=paths),
            request_id=new_request_id() if request_id is None else request_id,
        )
        return await self._call(
            self.knowledge.UpdateKnowledgeBase, request, retry=bool(request.request_id)
        )

    async def delete_knowledge_base(
        self, knowledge_base_id: str, *, request_id: str | None = None
    ) -> kn.DeleteKnowledgeBaseResponse:
        request = kn.DeleteKnowledgeBaseRequest(
            knowledge_base_id=knowledge_base_id,
            request_id=new_request_id() if request_id is None else request_id,
        )
        return await self._call(
            self.knowledge.DeleteKnowledgeBase, request, retry=bool(request.request_id)
        )

    # ------------------------------------------------------------------ documents

    def list_documents(
        self,
        knowledge_base_id: str,
        *,
        state: str | int | None = None,
        page_size: int = 0,
        limit: int | None = None,
    ) -> AsyncIterator[kn.Document]:
        """Documents of a knowledge base, newest first, optionally of one state."""
        wanted = document_state(state) if state is not None else kn.Document.STATE_UNSPECIFIED

        def fetch(token: str) -> Any:
            request = kn.ListDocumentsRequest(
                knowledge_base_id=knowledge_base_id,
                state=wanted,
                page_size=page_size,
                page_token=token,
            )
            return self._call(self.knowledge.ListDocuments, request, retry=True)

        return self._pages(fetch, lambda page: page.documents, limit)

    async def get_document(self, knowledge_base_id: str, document_id: str) -> kn.Document:
        return await self._call(
            self.knowledge.GetDocument,
            kn.GetDocumentRequest(knowledge_base_id=knowledge_base_id, document_id=document_id),
            retry=True,
        )

    async def delete_document(
        self, knowledge_base_id: str, document_id: str, *, request_id: str | None = None
    ) -> kn.DeleteDocumentResponse:
        request = kn.DeleteDocumentRequest(
            knowledge_base_id=knowledge_base_id,
            document_id=document_id,
            request_id=new_request_id() if request_id is None else request_id,
        )
        return await self._call(
            self.knowledge.DeleteDocument, request, retry=bool(request.request_id)
        )

    async def reindex_document(
        self,
        knowledge_base_id: str,
        document_id: str,
        *,
        chunking: kn.ChunkingConfig | None = None,
        request_id: str | None = None,
    ) -> kn.ReindexDocumentResponse:
        """Queues a new ingestion of the stored document; follow `task_id`."""
        request = kn.ReindexDocumentRequest(
            knowledge_base_id=knowledge_base_id,
            document_id=document_id,
            chunking=chunking,
            request_id=new_request_id() if request_id is None else request_id,
        )
        return await self._call(
            self.knowledge.ReindexDocument, request, retry=bool(request.request_id)
        )

    def list_chunks(
        self,
        knowledge_base_id: str,
        document_id: str,
        *,
        page_size: int = 0,
        limit: int | None = None,
    ) -> AsyncIterator[kn.Chunk]:
        """A document's chunks in document order: how it was split."""

        def fetch(token: str) -> Any:
            request = kn.ListChunksRequest(
                knowledge_base_id=knowledge_base_id,
                document_id=document_id,
                page_size=page_size,
                page_token=token,
            )
            return self._call(self.knowledge.ListChunks, request, retry=True)

        return self._pages(fetch, lambda page: page.chunks, limit)

    # --------------------------------------------------------------------- search

    async def search(
        self,
        knowledge_base_id: str,
        query: str,
        *,
        top_k: int = 0,
        mode: str | int | None = None,
        score_threshold: float = 0.0,
        document_ids: Iterable[str] = (),
        filenames: Iterable[str] = (),
        content_types: Iterable[str] = (),
        metadata: Mapping[str, str] | None = None,
    ) -> kn.SearchResponse:
        """Searches a knowledge base; results best first."""
        search_filter = kn.SearchFilter(
            document_ids=list(document_ids),
            filenames=list(filenames),
            content_types=list(content_types),
        )
        search_filter.metadata.update(metadata or {})
        request = kn.SearchRequest(
            knowledge_base_id=knowledge_base_id,
            query=query,
            top_k=top_k,
            mode=search_mode(mode) if mode is not None else kn.SearchRequest.MODE_UNSPECIFIED,
            score_threshold=score_threshold,
            filter=search_filter,
        )
        return await self._call(self.knowledge.Search, request, retry=True)

    # --------------------------------------------------------------------- upload

    async def upload(
        self,
        knowledge_base_id: str,
        source: UploadInput | UploadSource,
        *,
        filename: str | None = None,
        content_type: str = "",
        size: int | None = None,
        sha256: str | None = None,
        request_id: str | None = None,
        chunking: kn.ChunkingConfig | None = None,
        callback_url: str = "",
        priority: int = 0,
        force: bool = False,
        metadata: Mapping[str, str] | None = None,
        progress: UploadProgress | None = None,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> tm.UploadResponse:
        """Streams `source` to the Task Manager; returns once it is stored and queued.

        `source` is a path, a binary file object, bytes, or an async iterator of
        bytes; it is read in pieces of `chunk_bytes`, never whole. Paths,
        seekable files and bytes are hashed first so `sha256` and the size go
        in the header. A `request_id` is generated unless given ("" for none):
        with one, an upload from a re-readable source is retried from the start
        after UNAVAILABLE, and a retry that reaches a service which already
        stored the first attempt answers that attempt's task (`replayed`).
        `progress(sent, total)` is called as bytes go out.
        """
        reader = source_of(source, chunk_bytes)
        name = filename or reader.default_filename()
        if not name:
            raise ValueError("filename is required when the source has no name")
        measured_size, measured_sha = await reader.measure()
        header = tm.UploadRequest(
            knowledge_base_id=knowledge_base_id,
            filename=name,
            content_type=content_type,
            declared_size_bytes=measured_size if size is None else size,
            sha256=measured_sha if sha256 is None else sha256,
            request_id=new_request_id() if request_id is None else request_id,
            chunking=chunking,
            callback_url=callback_url,
            priority=priority,
            force=force,
        )
        header.metadata.update(metadata or {})
        retry_safe = reader.rereadable and bool(header.request_id)
        attempt = 1
        while True:
            local_errors: list[BaseException] = []
            messages = self._upload_messages(header, reader, progress, local_errors)
            try:
                return await self.task_manager.Upload(messages, metadata=self._metadata)
            except grpc.RpcError as exc:
                if local_errors:
                    # Reading the source failed: that, not the cancelled call, is the error.
                    raise local_errors[0] from None
                error = from_rpc_error(exc)
            if not (retry_safe and self.retry.should_retry(error, attempt)):
                raise error
            await asyncio.sleep(self.retry.backoff(attempt, error))
            attempt += 1

    @staticmethod
    async def _upload_messages(
        header: tm.UploadRequest,
        reader: UploadSource,
        progress: UploadProgress | None,
        local_errors: list[BaseException],
    ) -> AsyncIterator[tm.UploadRequest]:
        total = header.declared_size_bytes
        sent = 0
        yield header
        if progress is not None:
            progress(0, total)
        try:
            async for data in reader.chunks():
                yield tm.UploadRequest(file=httpbody_pb2.HttpBody(data=data))
                sent += len(data)
                if progress is not None:
                    progress(sent, total)
        except Exception as exc:
            local_errors.append(exc)
            raise

    # ---------------------------------------------------------------------- tasks

    async def get_task(self, task_id: str) -> tm.Task:
        return await self._call(
            self.task_manager.GetTask, tm.GetTaskRequest(task_id=task_id), retry=True
        )

    def list_tasks(
        self,
        *,
        knowledge_base_id: str = "",
        state: str | int | None = None,
        page_size: int = 0,
        limit: int | None = None,
    ) -> AsyncIterator[tm.Task]:
        """Tasks, newest first, optionally of one knowledge base and state."""
        wanted = task_state(state) if state is not None else tm.Task.STATE_UNSPECIFIED

        def fetch(token: str) -> Any:
            request = tm.ListTasksRequest(
                knowledge_base_id=knowledge_base_id,
                state=wanted,
                page_size=page_size,
                page_token=token,
            )
            return self._call(self.task_manager.ListTasks, request, retry=True)

        return self._pages(fetch, lambda page: page.tasks, limit)

    async def cancel_task(self, task_id: str, *, reason: str = "") -> tm.Task:
        """Requests cancellation (not retried: a repeat could report a task it
        just cancelled as already finished)."""
        response = await self._call(
            self.task_manager.CancelTask,
            tm.CancelTaskRequest(task_id=task_id, reason=reason),
            retry=False,
        )
        return response.task

    async def retry_task(self, task_id: str, *, request_id: str | None = None) -> tm.Task:
        """Queues a FAILED or CANCELLED task again."""
        request = tm.RetryTaskRequest(
            task_id=task_id, request_id=new_request_id() if request_id is None else request_id
        )
        response = await self._call(
            self.task_manager.RetryTask, request, retry=bool(request.request_id)
        )
        return response.task

    async def watch_task(
        self,
        task_id: str,
        *,
        after_event_id: str = "",
        resume_timeout: float = 120.0,
    ) -> AsyncGenerator[tm.WatchTaskResponse, None]:
        """The task's events until it ends: a snapshot first (unless resuming
        after `after_event_id`), then every state change and progress report.

        When the stream breaks (a Task Manager restarts, the network drops) the
        watch reconnects with the last event id it delivered and carries on:
        the caller sees each event once. It gives up with the last error after
        `resume_timeout` seconds without reaching the service.
        """
        last_id = after_event_id
        attempt = 0
        broken_since: float | None = None
        while True:
            request = tm.WatchTaskRequest(task_id=task_id, after_event_id=last_id)
            call = self.task_manager.WatchTask(request, metadata=self._metadata)
            try:
                async for event in _events(call):
                    if event.type == tm.WatchTaskResponse.TYPE_ERROR:
                        raise _event_error(event)
                    if (
                        event.type != tm.WatchTaskResponse.TYPE_SNAPSHOT
                        and last_id
                        and event.event_id
                        and event_order(event.event_id) <= event_order(last_id)
                    ):
                        continue  # already delivered before a reconnect
                    if event.event_id:
                        last_id = event.event_id
                    attempt, broken_since = 0, None
                    yield event
                    if event.last:
                        return
                # The stream ended without a terminal event: only a resume after the
                # end does that on purpose; otherwise the server went away politely.
                task = await self.get_task(task_id)
                if task.state in TERMINAL_STATES:
                    return
                error: KbmeshError = _stream_closed()
            except _ResumeWatch as broken:
                error = broken.error
            finally:
                call.cancel()
            attempt += 1
            now = time.monotonic()
            broken_since = broken_since or now
            if now - broken_since >= resume_timeout:
                raise error
            await asyncio.sleep(self.retry.backoff(min(attempt, 8), error))

    async def wait_task(
        self,
        task_id: str,
        *,
        on_event: Callable[[tm.WatchTaskResponse], None] | None = None,
        resume_timeout: float = 120.0,
    ) -> tm.Task:
        """Follows the task until SUCCEEDED, FAILED or CANCELLED; returns it."""
        final: tm.Task | None = None
        async for event in self.watch_task(task_id, resume_timeout=resume_timeout):
            if on_event is not None:
                on_event(event)
            final = event.task
        if final is None or final.state not in TERMINAL_STATES:
            final = await self.get_task(task_id)
        return final


async def _events(call: Any) -> AsyncIterator[tm.WatchTaskResponse]:
    """The messages of a WatchTask call; breaks that a reconnect repairs become
    _ResumeWatch, other failures their typed error."""
    try:
        async for event in call:
            yield event
    except grpc.RpcError as exc:
        error = from_rpc_error(exc)
        if _resumable(error):
            raise _ResumeWatch(error) from None
        raise error from None


def _resumable(error: KbmeshError) -> bool:
    # A server that stops cancels the streams it still has open; since this
    # client cancels only calls it has finished with, CANCELLED means that.
    return retryable(error) or error.code == grpc.StatusCode.CANCELLED


def _event_error(event: tm.WatchTaskResponse) -> Exception:
    code = getattr(grpc.StatusCode, event.error.code, grpc.StatusCode.UNKNOWN)
    error = error_class(code)(
        event.error.message or "the watch stream failed", reason=event.error.reason
    )
    if event.error.retryable or _resumable(error):
        return _ResumeWatch(error)
    return error


def _stream_closed() -> KbmeshError:
    return Unavailable("the watch stream ended before the task finished", reason="STREAM_CLOSED")
