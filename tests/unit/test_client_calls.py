"""What the SDK puts on the wire and how it reacts to failures, against an
in-process gRPC server whose answers the test scripts: the API key on every
kind of call, retries only where they are safe, uploads re-sent from the start."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

import grpc
import pytest

from kbmesh.client import (
    AsyncClient,
    FailedPrecondition,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    Unavailable,
)
from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.common.errors import FailedPrecondition as ServerFailedPrecondition
from services.common.errors import KbmeshError as ServerError
from services.common.errors import ResourceExhausted as ServerResourceExhausted
from services.common.errors import Unavailable as ServerUnavailable
from services.common.status import abort_with, status_of

Context = grpc.aio.ServicerContext[Any, Any]
FAST = RetryPolicy(max_attempts=4, initial_backoff=0.001, max_backoff=0.002)


class Scripted(tm_grpc.TaskManagerServiceServicer, kn_grpc.KnowledgeServiceServicer):
    """Fails each method with the errors queued for it, then answers."""

    def __init__(self) -> None:
        self.failures: dict[str, list[ServerError]] = {}
        self.calls: dict[str, int] = {}
        self.metadata: dict[str, list[dict[str, str]]] = {}
        self.uploads: list[tuple[tm.UploadRequest, bytes]] = []
        # Per WatchTask call: the events to send; None ends the call with UNAVAILABLE.
        self.watch_script: list[list[tm.WatchTaskResponse | None]] = []
        self.watch_requests: list[str] = []

    async def _enter(self, method: str, context: Context) -> None:
        self.calls[method] = self.calls.get(method, 0) + 1
        pairs = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.metadata.setdefault(method, []).append(pairs)
        queued = self.failures.get(method)
        if queued:
            await abort_with(context, status_of(queued.pop(0), "test.kbmesh"))

    async def GetTask(self, request: tm.GetTaskRequest, context: Context) -> tm.Task:
        await self._enter("GetTask", context)
        return tm.Task(id=request.task_id, state=tm.Task.STATE_RUNNING)

    async def CancelTask(
        self, request: tm.CancelTaskRequest, context: Context
    ) -> tm.CancelTaskResponse:
        await self._enter("CancelTask", context)
        return tm.CancelTaskResponse(task=tm.Task(id=request.task_id))

    async def Upload(
        self, request_iterator: AsyncIterable[tm.UploadRequest], context: Context
    ) -> tm.UploadResponse:
        header: tm.UploadRequest | None = None
        data = b""
        async for message in request_iterator:
            if header is None:
                header = message
            data += message.file.data
        assert header is not None
        self.uploads.append((header, data))
        await self._enter("Upload", context)
        return tm.UploadResponse(task_id="t1", task=tm.Task(id="t1", sha256=header.sha256))

    async def WatchTask(
        self, request: tm.WatchTaskRequest, context: Context
    ) -> AsyncIterator[tm.WatchTaskResponse]:
        await self._enter("WatchTask", context)
        self.watch_requests.append(request.after_event_id)
        if self.watch_script:
            for event in self.watch_script.pop(0):
                if event is None:
                    await abort_with(context, status_of(ServerUnavailable("GONE", "gone"), "t"))
                    return
                yield event
            return
        yield tm.WatchTaskResponse(
            event_id="1-0",
            type=tm.WatchTaskResponse.TYPE_SNAPSHOT,
            task=tm.Task(state=tm.Task.STATE_SUCCEEDED),
            last=True,
        )

    async def Search(self, request: kn.SearchRequest, context: Context) -> kn.SearchResponse:
        await self._enter("Search", context)
        return kn.SearchResponse()


@pytest.fixture
async def server() -> AsyncIterator[tuple[Scripted, str]]:
    scripted = Scripted()  # type: ignore[abstract]  # only the methods these tests call
    grpc_server = grpc.aio.server()
    tm_grpc.add_TaskManagerServiceServicer_to_server(scripted, grpc_server)
    kn_grpc.add_KnowledgeServiceServicer_to_server(scripted, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        yield scripted, f"127.0.0.1:{port}"
    finally:
        await grpc_server.stop(None)


def client_for(address: str, **kwargs: Any) -> AsyncClient:
    return AsyncClient(task_manager_address=address, knowledge_address=address, **kwargs)


async def test_the_api_key_goes_with_every_kind_of_call(server: tuple[Scripted, str]) -> None:
    scripted, address = server
    async with client_for(address, api_key="k-123") as sdk:
        await sdk.get_task("t")
        await sdk.upload("kb", b"bytes", filename="a.txt")
        [event async for event in sdk.watch_task("t")]
        await sdk.search("kb", "q")
    for method in ("GetTask", "Upload", "WatchTask", "Search"):
        assert scripted.metadata[method][0]["authorization"] == "Bearer k-123", method

    async with client_for(address) as anonymous:
        await anonymous.get_task("t")
    assert "authorization" not in scripted.metadata["GetTask"][1]


async def test_reads_are_retried_while_unavailable(server: tuple[Scripted, str]) -> None:
    scripted, address = server
    scripted.failures["GetTask"] = [ServerUnavailable("DOWN", "down")] * 2
    async with client_for(address, retry=FAST) as sdk:
        assert (await sdk.get_task("t")).id == "t"
    assert scripted.calls["GetTask"] == 3


async def test_retries_stop_at_the_attempt_limit(server: tuple[Scripted, str]) -> None:
    scripted, address = server
    scripted.failures["GetTask"] = [ServerUnavailable("DOWN", "down")] * 10
    async with client_for(address, retry=FAST) as sdk:
        with pytest.raises(Unavailable) as failed:
            await sdk.get_task("t")
    assert failed.value.reason == "DOWN"
    assert scripted.calls["GetTask"] == FAST.max_attempts


async def test_resource_exhausted_is_retried_only_with_a_retry_hint(
    server: tuple[Scripted, str],
) -> None:
    scripted, address = server
    scripted.failures["Search"] = [
        ServerResourceExhausted("BUSY", "busy", retry_after=0.01),
        ServerResourceExhausted("TOO_LARGE", "too large"),
    ]
    async with client_for(address, retry=FAST) as sdk:
        with pytest.raises(ResourceExhausted) as failed:
            await sdk.search("kb", "q")
    assert failed.value.reason == "TOO_LARGE"
    assert scripted.calls["Search"] == 2


async def test_calls_that_are_not_idempotent_are_not_retried(
    server: tuple[Scripted, str],
) -> None:
    scripted, address = server
    scripted.failures["CancelTask"] = [ServerUnavailable("DOWN", "down")]
    scripted.failures["GetTask"] = [ServerFailedPrecondition("NOPE", "no")]
    async with client_for(address, retry=FAST) as sdk:
        with pytest.raises(Unavailable):
            await sdk.cancel_task("t")
        with pytest.raises(FailedPrecondition):
            await sdk.get_task("t")
    assert scripted.calls == {"CancelTask": 1, "GetTask": 1}


async def test_an_upload_is_resent_whole_with_the_same_request_id(
    server: tuple[Scripted, str],
) -> None:
    scripted, address = server
    scripted.failures["Upload"] = [ServerUnavailable("DOWN", "down")]
    data = b"x" * 1000
    async with client_for(address, retry=FAST) as sdk:
        answer = await sdk.upload("kb", data, filename="a.txt", chunk_bytes=300)
    assert answer.task_id == "t1"
    (first, first_data), (second, second_data) = scripted.uploads
    assert first_data == second_data == data
    assert first.request_id == second.request_id != ""
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert first.declared_size_bytes == len(data)


async def test_an_upload_from_a_one_shot_stream_is_not_retried(
    server: tuple[Scripted, str],
) -> None:
    scripted, address = server
    scripted.failures["Upload"] = [ServerUnavailable("DOWN", "down")]

    async def stream() -> AsyncIterator[bytes]:
        yield b"once"

    async with client_for(address, retry=FAST) as sdk:
        with pytest.raises(Unavailable):
            await sdk.upload("kb", stream(), filename="a.txt")
    assert len(scripted.uploads) == 1
    assert scripted.uploads[0][0].sha256 == ""  # unknown before sending


async def test_an_upload_without_request_id_is_not_retried(server: tuple[Scripted, str]) -> None:
    scripted, address = server
    scripted.failures["Upload"] = [ServerUnavailable("DOWN", "down")]
    async with client_for(address, retry=FAST) as sdk:
        with pytest.raises(Unavailable):
            await sdk.upload("kb", b"data", filename="a.txt", request_id="")
    assert len(scripted.uploads) == 1


def event(event_id: str, kind: str, state: str, *, last: bool = False) -> tm.WatchTaskResponse:
    return tm.WatchTaskResponse(
        event_id=event_id,
        type=tm.WatchTaskResponse.Type.Value(f"TYPE_{kind}"),
        task=tm.Task(state=tm.Task.State.Value(f"STATE_{state}")),
        last=last,
    )


async def test_a_broken_watch_resumes_after_the_last_event_without_repeats(
    server: tuple[Scripted, str],
) -> None:
    scripted, address = server
    retryable_error = tm.WatchTaskResponse(
        type=tm.WatchTaskResponse.TYPE_ERROR,
        error=tm.TaskError(code="UNAVAILABLE", reason="REDIS_UNAVAILABLE", retryable=True),
        last=True,
    )
    scripted.watch_script = [
        [event("5-0", "SNAPSHOT", "PENDING"), event("6-0", "STATE_CHANGED", "RUNNING"), None],
        [event("7-0", "PROGRESS", "RUNNING"), retryable_error],
        # A replica that replays an event already delivered: dropped.
        [
            event("7-0", "PROGRESS", "RUNNING"),
            event("8-0", "STATE_CHANGED", "SUCCEEDED", last=True),
        ],
    ]
    async with client_for(address, retry=FAST) as sdk:
        seen = [e async for e in sdk.watch_task("t")]
    assert [e.event_id for e in seen] == ["5-0", "6-0", "7-0", "8-0"]
    assert scripted.watch_requests == ["", "6-0", "7-0"]


async def test_a_watch_error_that_retrying_cannot_fix_is_raised(
    server: tuple[Scripted, str],
) -> None:
    scripted, address = server
    scripted.watch_script = [
        [
            event("5-0", "SNAPSHOT", "PENDING"),
            tm.WatchTaskResponse(
                type=tm.WatchTaskResponse.TYPE_ERROR,
                error=tm.TaskError(code="NOT_FOUND", reason="TASK_NOT_FOUND", message="gone"),
                last=True,
            ),
        ]
    ]
    async with client_for(address, retry=FAST) as sdk:
        with pytest.raises(NotFound) as failed:
            [e async for e in sdk.watch_task("t")]
    assert failed.value.reason == "TASK_NOT_FOUND"
    assert scripted.watch_requests == [""]


async def test_a_watch_gives_up_after_its_resume_timeout(server: tuple[Scripted, str]) -> None:
    scripted, address = server
    scripted.watch_script = [[None]] * 3
    async with client_for(address, retry=FAST) as sdk:
        with pytest.raises(Unavailable):
            [e async for e in sdk.watch_task("t", resume_timeout=0.0)]
    assert len(scripted.watch_requests) == 1
