"""The synchronous kbmesh client: the async client run on a private event loop.

    with Client() as kb:
        answer = kb.upload(kb_id, "handbook.pdf")
        task = kb.wait_task(answer.task_id)

Why a wrapper and not grpc's sync stubs: retries, watch resumption, upload
hashing and error translation then exist once, in `AsyncClient`, and behave
the same in both. The cost is one daemon thread per client, running an event
loop that only this client uses, so a Client also works inside a program
that has its own loop (it never touches that loop). Iterators fetch one item
at a time from the private loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, TypeVar

from kbmesh.client.aio import AsyncClient, UploadProgress
from kbmesh.client.retry import RetryPolicy
from kbmesh.client.settings import ConnectionSettings
from kbmesh.client.sources import CHUNK_BYTES, UploadInput, UploadSource
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm

T = TypeVar("T")

SyncUploadInput = str | Path | IO[bytes] | bytes | Iterable[bytes]


class Client:
    """Blocking twin of `AsyncClient`, same methods and arguments."""

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
        self._aio = AsyncClient(
            settings,
            task_manager_address=task_manager_address,
            knowledge_address=knowledge_address,
            api_key=api_key,
            tls=tls,
            root_cert=root_cert,
            timeout=timeout,
            retry=retry,
        )
        self.settings = self._aio.settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="kbmesh-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def aio(self) -> AsyncClient:
        """The async client underneath (its coroutines run on this client's loop)."""
        return self._aio

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._aio.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def _run(self, coroutine: Awaitable[T]) -> T:
        async def run() -> T:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

    def _iterate(self, items: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    item = self._run(anext(items))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            close = getattr(items, "aclose", None)
            if close is not None and not self._closed:
                self._run(close())

    # ------------------------------------------------------------ knowledge bases

    def create_knowledge_base(
        self,
        name: str,
        *,
        description: str = "",
        chunking: kn.ChunkingConfig | None = None,
        embedding: kn.EmbeddingConfig | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> kn.KnowledgeBase:
        return self._run(
            self._aio.create_knowledge_base(
                name,
                description=description,
                chunking=chunking,
                embedding=embedding,
                labels=labels,
                request_id=request_id,
            )
        )

    def get_knowledge_base(self, knowledge_base_id: str) -> kn.KnowledgeBase:
        return self._run(self._aio.get_knowledge_base(knowledge_base_id))

    def list_knowledge_bases(
        self, *, page_size: int = 0, limit: int | None = None
    ) -> Iterator[kn.KnowledgeBase]:
        return self._iterate(self._aio.list_knowledge_bases(page_size=page_size, limit=limit))

    def update_knowledge_base(
        self,
        knowledge_base_id: str,
        *,
        name: str | None = None,
        description: str | None = None,
        chunking: kn.ChunkingConfig | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> kn.KnowledgeBase:
        return self._run(
            self._aio.update_knowledge_base(
                knowledge_base_id,
                name=name,
                description=description,
                chunking=chunking,
                labels=labels,
                request_id=request_id,
            )
        )

    def delete_knowledge_base(
        self, knowledge_base_id: str, *, request_id: str | None = None
    ) -> kn.DeleteKnowledgeBaseResponse:
        return self._run(self._aio.delete_knowledge_base(knowledge_base_id, request_id=request_id))

    # ------------------------------------------------------------------ documents

    def list_documents(
        self,
        knowledge_base_id: str,
        *,
        state: str | int | None = None,
        page_size: int = 0,
        limit: int | None = None,
    ) -> Iterator[kn.Document]:
        return self._iterate(
            self._aio.list_documents(
                knowledge_base_id, state=state, page_size=page_size, limit=limit
            )
        )

    def get_document(self, knowledge_base_id: str, document_id: str) -> kn.Document:
        return self._run(self._aio.get_document(knowledge_base_id, document_id))

    def delete_document(
        self, knowledge_base_id: str, document_id: str, *, request_id: str | None = None
    ) -> kn.DeleteDocumentResponse:
        return self._run(
            self._aio.delete_document(knowledge_base_id, document_id, request_id=request_id)
        )

    def reindex_document(
        self,
        knowledge_base_id: str,
        document_id: str,
        *,
        chunking: kn.ChunkingConfig | None = None,
        request_id: str | None = None,
    ) -> kn.ReindexDocumentResponse:
        return self._run(
            self._aio.reindex_document(
                knowledge_base_id, document_id, chunking=chunking, request_id=request_id
            )
        )

    def list_chunks(
        self,
        knowledge_base_id: str,
        document_id: str,
        *,
        page_size: int = 0,
        limit: int | None = None,
    ) -> Iterator[kn.Chunk]:
        return self._iterate(
            self._aio.list_chunks(knowledge_base_id, document_id, page_size=page_size, limit=limit)
        )

    # --------------------------------------------------------------------- search

    def search(
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
        return self._run(
            self._aio.search(
                knowledge_base_id,
                query,
                top_k=top_k,
                mode=mode,
                score_threshold=score_threshold,
                document_ids=document_ids,
                filenames=filenames,
                content_types=content_types,
                metadata=metadata,
            )
        )

    # --------------------------------------------------------------------- upload

    def upload(
        self,
        knowledge_base_id: str,
        source: SyncUploadInput | UploadSource,
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
        """As `AsyncClient.upload`; an iterable of bytes (e.g. a generator) is
        sent once as it comes, like an async iterator."""
        if (
            isinstance(source, Iterable)
            and not isinstance(source, (str, bytes, bytearray))
            and not hasattr(source, "read")  # file objects iterate lines: read them instead
        ):
            readable: UploadInput | UploadSource = _pull(iter(source))
        else:
            readable = source  # type: ignore[assignment]  # the remaining cases are UploadInput
        return self._run(
            self._aio.upload(
                knowledge_base_id,
                readable,
                filename=filename,
                content_type=content_type,
                size=size,
                sha256=sha256,
                request_id=request_id,
                chunking=chunking,
                callback_url=callback_url,
                priority=priority,
                force=force,
                metadata=metadata,
                progress=progress,
                chunk_bytes=chunk_bytes,
            )
        )

    # ---------------------------------------------------------------------- tasks

    def get_task(self, task_id: str) -> tm.Task:
        return self._run(self._aio.get_task(task_id))

    def list_tasks(
        self,
        *,
        knowledge_base_id: str = "",
        state: str | int | None = None,
        page_size: int = 0,
        limit: int | None = None,
    ) -> Iterator[tm.Task]:
        return self._iterate(
            self._aio.list_tasks(
                knowledge_base_id=knowledge_base_id, state=state, page_size=page_size, limit=limit
            )
        )

    def cancel_task(self, task_id: str, *, reason: str = "") -> tm.Task:
        return self._run(self._aio.cancel_task(task_id, reason=reason))

    def retry_task(self, task_id: str, *, request_id: str | None = None) -> tm.Task:
        return self._run(self._aio.retry_task(task_id, request_id=request_id))

    def watch_task(
        self, task_id: str, *, after_event_id: str = "", resume_timeout: float = 120.0
    ) -> Iterator[tm.WatchTaskResponse]:
        return self._iterate(
            self._aio.watch_task(
                task_id, after_event_id=after_event_id, resume_timeout=resume_timeout
            )
        )

    def wait_task(
        self,
        task_id: str,
        *,
        on_event: Callable[[tm.WatchTaskResponse], None] | None = None,
        resume_timeout: float = 120.0,
    ) -> tm.Task:
        return self._run(
            self._aio.wait_task(task_id, on_event=on_event, resume_timeout=resume_timeout)
        )


async def _pull(items: Iterator[bytes]) -> AsyncIterator[bytes]:
    """A sync iterator of bytes as an async one (each next() off the loop)."""
    done = object()
    while True:
        item = await asyncio.to_thread(next, items, done)
        if item is done:
            return
        assert isinstance(item, (bytes, bytearray, memoryview))
        yield bytes(item)
