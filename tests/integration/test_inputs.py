"""Hostile inputs: over-long strings on every public RPC, and property-based
streams of random and malformed messages at Upload and Search.

Every answer must be a documented status (a reason listed in docs/errors.md),
and a refused upload must leave nothing behind: no task, no document, no
object, no unfinished multipart upload.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.api import httpbody_pb2
from google.protobuf import descriptor
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from kbmesh.knowledge.v1 import knowledge_pb2 as kn
from kbmesh.knowledge.v1 import knowledge_pb2_grpc as kn_grpc
from kbmesh.taskmanager.v1 import task_manager_pb2 as tm
from kbmesh.taskmanager.v1 import task_manager_pb2_grpc as tm_grpc
from services.common import redis_keys
from services.common.validation import MAX_STRING_CHARS
from tests.conftest import Stack
from tests.integration.test_auth import METHODS, address
from tests.support import error_info

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", (ROOT / "docs/errors.md").read_text()))
# Codes a caller may get for a bad request; INTERNAL and UNKNOWN never.
EXPECTED_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.DATA_LOSS,
    grpc.StatusCode.FAILED_PRECONDITION,
}


def fill_strings(message: Message, text: str, depth: int = 0) -> None:
    """Sets every string field (and one level of nested messages) to `text`."""
    for field in message.DESCRIPTOR.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                getattr(message, field.name).append(text)
            else:
                setattr(message, field.name, text)
        elif field.type == FieldDescriptor.TYPE_MESSAGE and depth < 2:
            entry = field.message_type
            assert entry is not None
            if entry.GetOptions().map_entry:
                value = entry.fields_by_name["value"]
                if value.type == FieldDescriptor.TYPE_STRING:
                    getattr(message, field.name)["k"] = text
            elif field.is_repeated:
                fill_strings(getattr(message, field.name).add(), text, depth + 1)
            elif entry.full_name.startswith("kbmesh."):
                fill_strings(getattr(message, field.name), text, depth + 1)


def has_strings(method: descriptor.MethodDescriptor) -> bool:
    request = GetMessageClass(method.input_type)()
    fill_strings(request, "x")
    return request.ByteSize() > 0 and "x" in str(request)


async def send(
    channel: grpc.aio.Channel,
    method: descriptor.MethodDescriptor,
    path: str,
    kwargs: dict[str, Any],
    request: Message,
) -> None:
    if method.client_streaming:

        async def one() -> Any:
            yield request

        await channel.stream_unary(path, **kwargs)(one(), timeout=30)
    elif method.server_streaming:
        async for _ in channel.unary_stream(path, **kwargs)(request, timeout=30):
            pass
    else:
        await channel.unary_unary(path, **kwargs)(request, timeout=30)


async def attempt(call: Any) -> tuple[Any, grpc.aio.AioRpcError | None]:
    """(answer, None) or (None, the error)."""
    try:
        return await call, None
    except grpc.aio.AioRpcError as exc:
        return None, exc


BOUNDED = [(w, m) for w, m in METHODS if has_strings(m)]


@pytest.mark.parametrize(
    ("where", "method"), BOUNDED, ids=[f"{m.containing_service.name}.{m.name}" for _, m in BOUNDED]
)
async def test_every_string_field_of_every_rpc_has_a_length_bound(
    stack: Stack, where: str, method: descriptor.MethodDescriptor
) -> None:
    request_class = GetMessageClass(method.input_type)
    request = request_class()
    fill_strings(request, "x" * (MAX_STRING_CHARS + 1))
    path = f"/{method.containing_service.full_name}/{method.name}"
    kwargs: dict[str, Any] = {
        "request_serializer": request_class.SerializeToString,
        "response_deserializer": GetMessageClass(method.output_type).FromString,
    }
    async with grpc.aio.insecure_channel(address(stack, where, False)) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await send(channel, method, path, kwargs, request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(refused.value).reason == "FIELD_TOO_LONG"


# --- property-based: Upload -------------------------------------------------------------

texts = st.text(max_size=300)


def mostly(valid: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> Any:
    """Valid values three times in four, so uploads also get through."""
    return st.one_of(valid, valid, valid, hostile)


header_fields = st.fixed_dictionaries(
    {"filename": mostly(st.sampled_from(["a.txt", "r.pdf", "notes 1.md"]), texts)},
    optional={
        "content_type": mostly(st.just("text/plain"), texts),
        "declared_size_bytes": mostly(st.just(0), st.integers(-(2**40), 2**40)),
        "sha256": mostly(
            st.just(""), st.one_of(texts, st.text("0123456789abcdef", min_size=64, max_size=64))
        ),
        "request_id": mostly(st.just(""), texts),
        "priority": mostly(st.integers(0, 9), st.integers(-5, 20)),
        "callback_url": mostly(st.just(""), st.one_of(texts, st.just("http://127.0.0.1:1/x"))),
        "force": st.booleans(),
        "metadata": mostly(
            st.dictionaries(st.sampled_from(["team", "lang"]), st.text(max_size=20), max_size=2),
            st.dictionaries(texts, texts, max_size=5),
        ),
        "chunking": mostly(
            st.builds(kn.ChunkingConfig),
            st.builds(
                kn.ChunkingConfig,
                chunk_size=st.integers(-10, 10_000),
                chunk_overlap=st.integers(-10, 10_000),
            ),
        ),
    },
)
parts = st.lists(st.binary(max_size=4096), max_size=6)


@st.composite
def upload_streams(draw: st.DrawFn) -> tuple[list[tm.UploadRequest], str]:
    """(messages, knowledge base choice): header fields in any message or none,
    bytes before or after, several headers."""
    kb_choice = draw(mostly(st.just("valid"), st.sampled_from(["unknown", "empty", "garbage"])))
    fields: dict[str, Any] = draw(header_fields)
    data = draw(parts)
    header_at = draw(mostly(st.just("first"), st.sampled_from(["none", "later", "twice"])))
    messages = [tm.UploadRequest(file=httpbody_pb2.HttpBody(data=p)) for p in data]
    if header_at != "none":
        header = tm.UploadRequest(**fields)
        header.knowledge_base_id = "KB"  # replaced by the test
        if header_at == "first":
            messages.insert(0, header)
        elif header_at == "later":
            messages.insert(min(1, len(messages)), header)
        else:
            messages.insert(0, header)
            messages.append(tm.UploadRequest(filename="again.txt"))
    return messages, kb_choice


def kb_id_for(choice: str, valid: str, garbage: str) -> str:
    return {
        "valid": valid,
        "unknown": "01jzzzzzzzzzzzzzzzzzzzzzzz",
        "empty": "",
        "garbage": garbage,
    }[choice]


@pytest.fixture(scope="module")
def upload_kb(stack: Stack) -> str:
    async def create() -> str:
        async with grpc.aio.insecure_channel(stack.ks_address) as channel:
            kb = await kn_grpc.KnowledgeServiceStub(channel).CreateKnowledgeBase(
                kn.CreateKnowledgeBaseRequest(knowledge_base=kn.KnowledgeBase(name="fuzzed"))
            )
            return kb.id

    return asyncio.run(create())


async def _state(stack: Stack, kb: str) -> tuple[int, int, set[str], int]:
    """(tasks, documents, object keys, unfinished multipart uploads) of `kb`."""
    redis = Redis.from_url(stack.redis_url)
    try:
        task_count = int(await redis.zcard(redis_keys.kb_tasks(kb)))
        document_count = int(await redis.zcard(redis_keys.kb_documents(kb)))
    finally:
        await redis.aclose()
    client = stack.s3.boto3_client()
    listed = client.list_objects_v2(Bucket=stack.s3.bucket, Prefix="kb/")
    keys = {o["Key"] for o in listed.get("Contents", [])}
    pending = client.list_multipart_uploads(Bucket=stack.s3.bucket).get("Uploads", [])
    return task_count, document_count, keys, len(pending)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(stream=upload_streams(), garbage=st.text(max_size=80))
def test_random_upload_streams_get_documented_answers_and_leave_nothing(
    stack: Stack, upload_kb: str, stream: tuple[list[tm.UploadRequest], str], garbage: str
) -> None:
    messages, choice = stream
    kb = kb_id_for(choice, upload_kb, garbage)
    for message in messages:
        if message.knowledge_base_id == "KB":
            message.knowledge_base_id = kb

    async def run() -> None:
        before = await _state(stack, upload_kb)
        async with grpc.aio.insecure_channel(stack.tm_address) as channel:
            stub = tm_grpc.TaskManagerServiceStub(channel)
            answer, error = await attempt(stub.Upload(iter(messages), timeout=60))
        if error is not None:
            assert error.code() in EXPECTED_CODES, error
            assert error_info(error).reason in DOCUMENTED, error
            event(f"refused: {error_info(error).reason}")
            after = await _state(stack, upload_kb)
            assert after == before, (error.details(), before, after)
            return
        # Accepted: one task and document more, or an earlier one answered again.
        event("accepted")
        after = await _state(stack, upload_kb)
        assert kb == upload_kb
        if answer.duplicate or answer.replayed:
            assert after == before
        else:
            assert after[0] == before[0] + 1
            assert after[1] == before[1] + 1
            assert len(after[2] - before[2]) == 1
            assert after[3] == before[3] == 0

    asyncio.run(run())


# --- property-based: Search -------------------------------------------------------------

search_requests = st.builds(
    kn.SearchRequest,
    query=st.text(max_size=5000),
    mode=st.integers(0, 6),
    top_k=st.integers(-10, 5000),
    score_threshold=st.floats(allow_nan=True, allow_infinity=True),
    filter=st.builds(
        kn.SearchFilter,
        document_ids=st.lists(st.text(max_size=40), max_size=5),
        filenames=st.lists(st.text(max_size=40), max_size=5),
        content_types=st.lists(st.text(max_size=40), max_size=5),
        metadata=st.dictionaries(st.text(max_size=40), st.text(max_size=1100), max_size=4),
    ),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=search_requests, choice=st.sampled_from(["valid", "unknown", "empty", "garbage"]))
def test_random_searches_get_documented_answers(
    stack: Stack, upload_kb: str, request: kn.SearchRequest, choice: str
) -> None:
    request.knowledge_base_id = kb_id_for(choice, upload_kb, request.query[:40])

    async def run() -> None:
        async with grpc.aio.insecure_channel(stack.ks_address) as channel:
            stub = kn_grpc.KnowledgeServiceStub(channel)
            answer, error = await attempt(stub.Search(request, timeout=60))
            if error is not None:
                assert error.code() in EXPECTED_CODES, error
                assert error_info(error).reason in DOCUMENTED, error
                return
            # Nothing is indexed in the fuzzed knowledge base (no worker runs).
            assert list(answer.results) == []

    asyncio.run(run())


def _fields(message_type: descriptor.Descriptor) -> Iterator[str]:
    yield from (f.name for f in message_type.fields)


def test_the_search_strategy_covers_every_search_field() -> None:
    covered = {"knowledge_base_id", "query", "mode", "top_k", "score_threshold", "filter"}
    assert set(_fields(kn.SearchRequest.DESCRIPTOR)) <= covered
