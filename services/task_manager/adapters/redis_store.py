"""`TaskStore` on Redis: task and document records, the queue, indexes and events.

Key names are in `services.common.redis_keys`; this module owns what is stored
under them.

Task record (hash `task(id)`): one field per `Task` attribute, named like the
attribute, every value a string (`encode_task` / `decode_task`):

- text as is: id, knowledge_base_id, document_id, filename, content_type,
  sha256, object_key, message, worker_id, callback_url, lease_id;
- enums by value: state (`PENDING`…), stage (`""` when none);
- integers in decimal: size_bytes, create_time_ms, update_time_ms, attempt,
  max_attempts, priority, start_time_ms, end_time_ms, next_attempt_time_ms,
  lease_deadline_ms (times are ms since the epoch, 0 = not set);
- progress: `repr(float)`; cancel_requested: `"1"`/`"0"`;
- JSON: error and result (`""` when None), chunking, metadata,
  callback_attempts (a list).

A missing field decodes to the attribute's default, so fields added later do
not break records written earlier.

Document record (hash `document(id)`): knowledge_base_id, filename,
content_type, size_bytes, sha256, object_key, metadata (JSON), create_time_ms,
update_time_ms, task_id (the document's latest task); a re-index adds
chunk_count and page_count (the previous run's result, shown until the new run
has one), and DeleteDocument sets deleting = "1" before it removes chunks. Its
id is also in the
knowledge base's `kb_documents` zset, and `kb_content(kb, sha256)` points at
the newest document holding those bytes.

Queue: `QUEUE_READY` holds PENDING tasks that may be dispatched now, scored by
`queue_score` = (MAX_PRIORITY - priority) * 10**13 + enqueue time in ms: the
lowest score goes first, so higher priority first, then first in first out
(10**13 ms is three centuries, so times never spill into the priority digit,
and scores stay below 2**53: exact as doubles). The enqueue time is the upload
time, and the time of the retry for a retried task (it joins the back of its
priority class). `QUEUE_DELAYED` holds PENDING tasks backing off, scored by
the time they become ready.

Indexes: `tenant_tasks(tenant)`, `kb_tasks(kb)`, `tasks_in_state(tenant,
state)` and `kb_tasks_in_state(kb, state)`, all scored by create_time_ms. A task is in
exactly the two state zsets of its current state; only the Lua scripts
below change a task's state, and they move it between the zsets in the same
step.

Events (stream `task_events(id)`, capped at about `event_history` entries with
`MAXLEN ~`): every change of a task appends one entry whose fields are
`event_type` (an `EventType` value), `event_time_ms`, and every field of the
task record after the change, so a watcher rebuilds the task from the entry
alone, from any replica. The entry id (e.g. "1732874400000-0") is the event id
clients resume from.

Atomicity: three Lua scripts, run with EVALSHA (`register_script`).

- `_CREATE` writes an upload's document, task, indexes, queue entry,
  idempotency key, content-hash entry and first event, after checking in the
  same step that the knowledge base still exists and that no earlier upload
  took the request id (or, without force, the bytes).
- `_REQUEUE` queues a new task for a stored document (re-index,
  domain/document_tasks.py): after checking in the same step that the knowledge
  base exists, that the request id is new, that the document is still there
  (not being deleted) with the task the caller read as its latest, and that
  this task is not PENDING or RUNNING, it writes the task, its indexes, queue
  entry, idempotency key and first event, and points the document at it.
- `_TRANSITION` is the one way a task changes after that: it compares guard
  fields (always the state the caller read, optionally more), sets fields,
  moves the task between state zsets, adds or removes it from other zsets
  (queues), sets an optional idempotency key, and appends the event, or does
  nothing and answers "conflict" with the current record. Callers read the
  task, decide in Python, and run the script with what they read as guard:
  optimistic concurrency, bounded retries on conflict. `cancel` and `retry`
  are built on it through `RedisTaskStore.transition`.

Wake-ups: the scripts PUBLISH on `QUEUE_WAKE` when they add a task to
QUEUE_READY, and `cancel` publishes the task id on `DISPATCH_CANCEL` when it
flags a RUNNING task, in the same atomic step (pub/sub is fire-and-forget:
the dispatcher also polls, see services/task_manager/dispatch.py).

The dispatcher's transitions (adapters/redis_dispatch.py; the rules are in
domain/dispatch.py) are a call of `transition` each, no new script: claim =
guard state PENDING, attempt and update_time_ms as read, set RUNNING,
worker_id, lease_id, lease_deadline_ms, start_time_ms, zrem QUEUE_READY, zadd
LEASES scored by the lease deadline (a conflict means another replica took
the task); progress = guard RUNNING, lease_id and worker_id (a worker that lost
its lease cannot write), event PROGRESS, set stage/progress/message and a new
deadline; complete/fail/cancel ack = the same guards, set the outcome, zrem
LEASES (zadd QUEUE_DELAYED or QUEUE_READY for a retry); lease expiry = guard
RUNNING, lease_id and lease_deadline_ms, set PENDING with attempt + 1 and
next_attempt_time_ms, zadd QUEUE_DELAYED, zrem LEASES. Renewing a lease is not
a change of the task: a small script there moves lease_deadline_ms and the
LEASES score only, and writes no event.

Errors: Redis connection errors and timeouts become
`Unavailable("REDIS_UNAVAILABLE", retry_after=1.0)` at every public method
(and inside `watch`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from typing import Any, Literal

from redis.asyncio import Redis

from services.common import redis_keys, redis_pages
from services.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from services.common.redis_boundary import as_text, redis_boundary, redis_errors
from services.common.redis_pages import newest_first
from services.common.settings import DEFAULT_TENANT
from services.task_manager.domain.document_tasks import Requeued, StoredDocument
from services.task_manager.domain.model import (
    CallbackAttempt,
    Chunking,
    EventType,
    Stage,
    Task,
    TaskError,
    TaskEvent,
    TaskPage,
    TaskResult,
    TaskState,
)
from services.task_manager.domain.ports import CreateOutcome
from services.task_manager.domain.upload import MAX_PRIORITY

# Fields of a stream entry besides the task's own (no Task attribute has these names).
EVENT_TYPE_FIELD = "event_type"
EVENT_TIME_FIELD = "event_time_ms"

# Optimistic transitions re-read and retry this often before giving up (ABORTED).
_MAX_CONFLICTS = 10
_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")
_TASK_FIELDS = frozenset(f.name for f in dataclasses.fields(Task))
# Attributes a transition may not change: the indexes are keyed or scored by them.
_IMMUTABLE_FIELDS = frozenset({"id", "knowledge_base_id", "document_id", "create_time_ms"})


def queue_score(priority: int, enqueue_time_ms: int) -> int:
    """Score in QUEUE_READY: higher priority first, then first in first out."""
    return (MAX_PRIORITY - priority) * 10**13 + enqueue_time_ms


def now_ms() -> int:
    return int(time.time() * 1000)


# --- record encoding -------------------------------------------------------------------------


def _json(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


# How each Task attribute is stored: one function per hash field.
_ENCODERS: dict[str, Callable[[Task], str]] = {
    "id": lambda t: t.id,
    "knowledge_base_id": lambda t: t.knowledge_base_id,
    "document_id": lambda t: t.document_id,
    "filename": lambda t: t.filename,
    "content_type": lambda t: t.content_type,
    "size_bytes": lambda t: str(t.size_bytes),
    "sha256": lambda t: t.sha256,
    "object_key": lambda t: t.object_key,
    "state": lambda t: t.state.value,
    "create_time_ms": lambda t: str(t.create_time_ms),
    "update_time_ms": lambda t: str(t.update_time_ms),
    "stage": lambda t: t.stage.value,
    "progress": lambda t: repr(float(t.progress)),
    "message": lambda t: t.message,
    "attempt": lambda t: str(t.attempt),
    "max_attempts": lambda t: str(t.max_attempts),
    "priority": lambda t: str(t.priority),
    "error": lambda t: "" if t.error is None else _json(dataclasses.asdict(t.error)),
    "worker_id": lambda t: t.worker_id,
    "cancel_requested": lambda t: "1" if t.cancel_requested else "0",
    "result": lambda t: "" if t.result is None else _json(dataclasses.asdict(t.result)),
    "callback_url": lambda t: t.callback_url,
    "callback_attempts": lambda t: _json([dataclasses.asdict(a) for a in t.callback_attempts]),
    "chunking": lambda t: _json(dataclasses.asdict(t.chunking)),
    "metadata": lambda t: _json(t.metadata),
    "start_time_ms": lambda t: str(t.start_time_ms),
    "end_time_ms": lambda t: str(t.end_time_ms),
    "next_attempt_time_ms": lambda t: str(t.next_attempt_time_ms),
    "lease_id": lambda t: t.lease_id,
    "lease_deadline_ms": lambda t: str(t.lease_deadline_ms),
    "tenant": lambda t: t.tenant,
}


def encode_task(task: Task) -> dict[str, str]:
    """The task as the string fields of its hash (and of its events)."""
    return {name: encode(task) for name, encode in _ENCODERS.items()}


def encode_fields(task: Task, names: Iterable[str]) -> dict[str, str]:
    """`encode_task(task)` restricted to `names` (without encoding the others)."""
    return {name: _ENCODERS[name](task) for name in names}


# A hash or stream entry as redis-py returns it (bytes) or as `encode_task` makes it (str).
Fields = Mapping[bytes, bytes] | Mapping[str, str] | Mapping[bytes | str, bytes | str]


def _texts(fields: Fields) -> dict[str, str]:
    try:  # as read from Redis: all bytes
        return {k.decode(): v.decode() for k, v in fields.items()}  # type: ignore[union-attr]
    except AttributeError:
        return {as_text(k): as_text(v) for k, v in fields.items()}


def decode_task(fields: Fields) -> Task:
    """The task stored as `fields` (bytes or str, as read from a hash or an event).

    Unknown fields are ignored and missing optional ones take their defaults.
    """
    f = _texts(fields)

    def num(name: str) -> int:
        raw = f.get(name, "")
        return int(raw) if raw else 0

    def parsed(name: str) -> Any:
        raw = f.get(name, "")
        return json.loads(raw) if raw else None

    error = parsed("error")
    result = parsed("result")
    chunking = parsed("chunking")
    return Task(
        id=f["id"],
        knowledge_base_id=f["knowledge_base_id"],
        document_id=f["document_id"],
        filename=f.get("filename", ""),
        content_type=f.get("content_type", ""),
        size_bytes=num("size_bytes"),
        sha256=f.get("sha256", ""),
        object_key=f.get("object_key", ""),
        state=TaskState(f["state"]),
        create_time_ms=num("create_time_ms"),
        update_time_ms=num("update_time_ms"),
        stage=Stage(f.get("stage", "")),
        progress=float(f.get("progress") or 0.0),
        message=f.get("message", ""),
        attempt=int(f.get("attempt") or 1),
        max_attempts=int(f.get("max_attempts") or 5),
        priority=num("priority"),
        error=None if error is None else TaskError(**error),
        worker_id=f.get("worker_id", ""),
        cancel_requested=f.get("cancel_requested") == "1",
        result=None if result is None else TaskResult(**result),
        callback_url=f.get("callback_url", ""),
        callback_attempts=tuple(CallbackAttempt(**a) for a in parsed("callback_attempts") or ()),
        chunking=Chunking() if chunking is None else Chunking(**chunking),
        metadata=dict(parsed("metadata") or {}),
        start_time_ms=num("start_time_ms"),
        end_time_ms=num("end_time_ms"),
        next_attempt_time_ms=num("next_attempt_time_ms"),
        lease_id=f.get("lease_id", ""),
        lease_deadline_ms=num("lease_deadline_ms"),
        tenant=f.get("tenant") or DEFAULT_TENANT,
    )


def encode_document(task: Task) -> dict[str, str]:
    """The document record an upload creates, from its first task."""
    return {
        "knowledge_base_id": task.knowledge_base_id,
        "filename": task.filename,
        "content_type": task.content_type,
        "size_bytes": str(task.size_bytes),
        "sha256": task.sha256,
        "object_key": task.object_key,
        "metadata": _json(task.metadata),
        "create_time_ms": str(task.create_time_ms),
        "update_time_ms": str(task.update_time_ms),
        "task_id": task.id,
        "tenant": task.tenant,
    }


def decode_event(event_id: bytes | str, fields: Fields) -> TaskEvent:
    """A TaskEvent from one entry of a task's event stream."""
    f = _texts(fields)
    event_type = EventType(f.pop(EVENT_TYPE_FIELD))
    time_ms = int(f.pop(EVENT_TIME_FIELD))
    return TaskEvent(id=as_text(event_id), type=event_type, task=decode_task(f), time_ms=time_ms)


# --- Lua -------------------------------------------------------------------------------------

# Shared Lua helper: a {k = v} table as the flat list HSET and XADD take.
_FLAT = """
local function flat(t)
  local out = {}
  for k, v in pairs(t) do
    out[#out + 1] = k
    out[#out + 1] = v
  end
  return out
end
"""

# What both task-creating scripts end with, on the same KEYS layout: 2 request
# key, 5 new task hash, 6 its events, 7-10 the four indexes, 11 QUEUE_READY.
# Writes the task, remembers the request id, indexes and queues it, wakes the
# dispatchers and records the first event: answers {"created", event id}.
_QUEUE_NEW_TASK = """
local function queue_new_task(spec)
  local task = flat(spec.task)
  redis.call('HSET', KEYS[5], unpack(task))
  if spec.request then
    redis.call('SET', KEYS[2], spec.task_id, 'EX', spec.request_ttl)
  end
  for i = 7, 10 do redis.call('ZADD', KEYS[i], spec.task.create_time_ms, spec.task_id) end
  redis.call('ZADD', KEYS[11], spec.score, spec.task_id)
  if spec.wake then redis.call('PUBLISH', spec.wake, spec.task_id) end
  local event_id = redis.call('XADD', KEYS[6], 'MAXLEN', '~', spec.maxlen, '*',
    'event_type', 'STATE_CHANGED', 'event_time_ms', spec.time_ms, unpack(task))
  return {'created', event_id}
end
"""

# KEYS: 1 knowledge base hash, 2 request key, 3 content key, 4 document hash, 5 task hash,
#       6 task events, 7 tenant tasks, 8 kb tasks, 9 tenant tasks in PENDING, 10 kb tasks
#       in PENDING, 11 QUEUE_READY, 12 kb documents, 13 the tenant's usage (quotas).
# ARGV[1]: JSON {request, force (booleans), request_ttl, maxlen (numbers), score, time_ms,
#       task_id, document_id, wake (the QUEUE_WAKE channel) (strings), task, document
#       (objects of string fields)}.
# Answers {"created", event id} | {"exists"} (this very task was written already: a resent
# command) | {"replayed", task id} | {"duplicate", document id} | {"kb_missing"}.
_CREATE = (
    _FLAT
    + _QUEUE_NEW_TASK
    + """
local spec = cjson.decode(ARGV[1])
if redis.call('EXISTS', KEYS[5]) == 1 then return {'exists'} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'kb_missing'} end
if spec.request then
  local earlier = redis.call('GET', KEYS[2])
  if earlier then return {'replayed', earlier} end
end
if not spec.force then
  local same = redis.call('GET', KEYS[3])
  if same then return {'duplicate', same} end
end
redis.call('HSET', KEYS[4], unpack(flat(spec.document)))
redis.call('SET', KEYS[3], spec.document_id)
redis.call('ZADD', KEYS[12], spec.task.create_time_ms, spec.document_id)
redis.call('HINCRBY', KEYS[13], 'bytes', spec.task.size_bytes)
redis.call('HINCRBY', KEYS[13], 'documents', 1)
return queue_new_task(spec)
"""
)

# KEYS: 1 knowledge base hash, 2 request key, 3 document hash, 4 the document's previous
#       task hash, 5 new task hash, 6 its events, 7 tenant tasks, 8 kb tasks, 9 tenant
#       tasks in PENDING, 10 kb tasks in PENDING, 11 QUEUE_READY.
# ARGV[1]: JSON {request (boolean), request_ttl, maxlen (numbers), knowledge_base_id,
#       previous_task_id, score, time_ms, task_id, wake (strings), task, document (objects
#       of string fields: the document fields to set)}.
# Answers {"created", event id} | {"exists"} (a resent command) | {"replayed", task id} |
# {"kb_missing"} | {"document_missing"} | {"moved"} (the document's latest task is not
# previous_task_id any more) | {"active", state} (that task is PENDING or RUNNING).
_REQUEUE = (
    _FLAT
    + _QUEUE_NEW_TASK
    + """
local spec = cjson.decode(ARGV[1])
if redis.call('EXISTS', KEYS[5]) == 1 then return {'exists'} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'kb_missing'} end
if spec.request then
  local earlier = redis.call('GET', KEYS[2])
  if earlier then return {'replayed', earlier} end
end
local doc = redis.call('HMGET', KEYS[3], 'knowledge_base_id', 'task_id', 'deleting')
if doc[1] ~= spec.knowledge_base_id or doc[3] == '1' then return {'document_missing'} end
if (doc[2] or '') ~= spec.previous_task_id then return {'moved'} end
local state = redis.call('HGET', KEYS[4], 'state')
if state == 'PENDING' or state == 'RUNNING' then return {'active', state} end
redis.call('HSET', KEYS[3], unpack(flat(spec.document)))
return queue_new_task(spec)
"""
)

# KEYS: 1 task hash, 2 task events, 3-4 the state zsets (all, knowledge base) of the state
#       the task is in, 5-6 those of the state it goes to (the same when it stays), 7.. zsets
#       named by spec.zadd / spec.zrem and the idempotency key spec.once, by index.
# ARGV[1]: JSON {id, guard {field: value}, set {field: value}, zadd [[key index, score]],
#       zrem [key index], once (key index, 0 = none), once_ttl, event, time_ms, maxlen,
#       publish [[channel, message]] (sent after the write)}.
# Answers {"ok", event id, fields} | {"conflict", fields} (a guard field differs: nothing
# written) | {"replayed", fields} (the idempotency key exists: nothing written) |
# {"missing"}.
_TRANSITION = (
    _FLAT
    + """
local spec = cjson.decode(ARGV[1])
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
if spec.once > 0 and redis.call('EXISTS', KEYS[spec.once]) == 1 then
  return {'replayed', redis.call('HGETALL', KEYS[1])}
end
for field, want in pairs(spec.guard) do
  if redis.call('HGET', KEYS[1], field) ~= want then
    return {'conflict', redis.call('HGETALL', KEYS[1])}
  end
end
redis.call('HSET', KEYS[1], unpack(flat(spec.set)))
if KEYS[3] ~= KEYS[5] then
  local created = redis.call('HGET', KEYS[1], 'create_time_ms')
  redis.call('ZREM', KEYS[3], spec.id)
  redis.call('ZREM', KEYS[4], spec.id)
  redis.call('ZADD', KEYS[5], created, spec.id)
  redis.call('ZADD', KEYS[6], created, spec.id)
end
for _, k in ipairs(spec.zrem) do redis.call('ZREM', KEYS[k], spec.id) end
for _, op in ipairs(spec.zadd) do redis.call('ZADD', KEYS[op[1]], op[2], spec.id) end
if spec.once > 0 then redis.call('SET', KEYS[spec.once], spec.id, 'EX', spec.once_ttl) end
for _, m in ipairs(spec.publish) do redis.call('PUBLISH', m[1], m[2]) end
local fields = redis.call('HGETALL', KEYS[1])
local event_id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', spec.maxlen, '*',
  'event_type', spec.event, 'event_time_ms', spec.time_ms, unpack(fields))
return {'ok', event_id, fields}
"""
)


def _pairs(flat: Sequence[bytes]) -> dict[bytes, bytes]:
    """HGETALL's flat [k1, v1, k2, v2…] reply (as returned from Lua) as a dict."""
    return dict(zip(flat[0::2], flat[1::2], strict=True))


def _task_not_found(task_id: str) -> NotFound:
    return NotFound(
        "TASK_NOT_FOUND", f"task {task_id!r} does not exist", metadata={"task_id": task_id}
    )


def _conflicted(task_id: str) -> Aborted:
    return Aborted(
        "CONCURRENT_MODIFICATION",
        f"task {task_id!r} kept changing while this request ran; retry",
        metadata={"task_id": task_id},
    )


# --- page tokens -----------------------------------------------------------------------------


# --- the store -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transitioned:
    """What `RedisTaskStore.transition` did.

    `status` "ok": written, `task` is the record after it and `event_id` its event;
    "conflict": a guard field changed since the task was read, nothing written, `task` is
    the current record; "replayed": the idempotency key was set by an earlier call, nothing
    written, `task` is the current record.
    """

    status: Literal["ok", "conflict", "replayed"]
    task: Task
    event_id: str = ""


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """Entries of an XREAD reply on one stream, in the RESP2 or the RESP3 shape."""
    if not reply:
        return []
    streams = list(reply.values()) if isinstance(reply, dict) else [r[1] for r in reply]
    entries: list[tuple[bytes, dict[bytes, bytes]]] = []
    for stream in streams:
        # RESP3 parsing may wrap the entry list in one more list.
        items = stream[0] if stream and isinstance(stream[0], list) else stream
        entries.extend((entry_id, fields) for entry_id, fields in items)
    return entries


def _stream_id(text: str | bytes) -> tuple[int, int]:
    ms, _, seq = as_text(text).partition("-")
    return int(ms), int(seq or 0)


class RedisTaskStore:
    """TaskStore on Redis (layout and scripts: module docstring).

    `redis` must be a bytes client (decode_responses=False) whose socket timeout, if
    any, is longer than `watch_block_ms`: `watch` holds a pooled connection in XREAD
    BLOCK that long.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        request_id_ttl_seconds: int = 86400,
        event_history: int = 10000,
        watch_block_ms: int = 5000,
    ) -> None:
        self._redis = redis
        self._request_ttl = request_id_ttl_seconds
        self._event_history = event_history
        self._watch_block_ms = watch_block_ms
        self._create = redis.register_script(_CREATE)
        self._transition = redis.register_script(_TRANSITION)
        self._requeue = redis.register_script(_REQUEUE)

    # --- reads ---

    @redis_boundary
    async def knowledge_base_tenant(self, knowledge_base_id: str) -> str | None:
        """The owner of the knowledge base, None when it does not exist."""
        # One command (every record has its id): no more connections held per
        # upload than before tenants.
        kb_id, tenant = await self._redis.hmget(
            redis_keys.knowledge_base(knowledge_base_id), ["id", "tenant"]
        )
        if kb_id is None:
            return None
        return as_text(tenant) if tenant else DEFAULT_TENANT

    @redis_boundary
    async def get_task(self, task_id: str) -> Task | None:
        fields = await self._redis.hgetall(redis_keys.task(task_id))
        return decode_task(fields) if fields else None

    @redis_boundary
    async def task_for_request(self, knowledge_base_id: str, request_id: str) -> Task | None:
        task_id = await self._redis.get(redis_keys.kb_request(knowledge_base_id, request_id))
        return None if task_id is None else await self.get_task(as_text(task_id))

    @redis_boundary
    async def task_for_content(self, knowledge_base_id: str, sha256: str) -> Task | None:
        document_id = await self._redis.get(redis_keys.kb_content(knowledge_base_id, sha256))
        return None if document_id is None else await self._document_task(as_text(document_id))

    async def _document_task(self, document_id: str) -> Task | None:
        task_id = await self._redis.hget(redis_keys.document(document_id), "task_id")
        return None if task_id is None else await self.get_task(as_text(task_id))

    @redis_boundary
    async def queue_depth(self) -> int:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(redis_keys.QUEUE_READY)
            pipe.zcard(redis_keys.QUEUE_DELAYED)
            ready, delayed = await pipe.execute()
        return int(ready) + int(delayed)

    # --- uploads ---

    @redis_boundary
    async def create_ingestion(self, task: Task, request_id: str, force: bool) -> CreateOutcome:
        if task.state is not TaskState.PENDING:
            raise ValueError(f"a new task must be PENDING, not {task.state}")
        kb = task.knowledge_base_id
        keys = [
            redis_keys.knowledge_base(kb),
            redis_keys.kb_request(kb, request_id),
            redis_keys.kb_content(kb, task.sha256),
            redis_keys.document(task.document_id),
            redis_keys.task(task.id),
            redis_keys.task_events(task.id),
            redis_keys.tenant_tasks(task.tenant),
            redis_keys.kb_tasks(kb),
            redis_keys.tasks_in_state(task.tenant, TaskState.PENDING),
            redis_keys.kb_tasks_in_state(kb, TaskState.PENDING),
            redis_keys.QUEUE_READY,
            redis_keys.kb_documents(kb),
            redis_keys.tenant_usage(task.tenant),
        ]
        spec = _json(
            {
                "request": bool(request_id),
                "force": force,
                "request_ttl": self._request_ttl,
                "maxlen": self._event_history,
                "score": str(queue_score(task.priority, task.create_time_ms)),
                "time_ms": str(task.create_time_ms),
                "task_id": task.id,
                "document_id": task.document_id,
                "wake": redis_keys.QUEUE_WAKE,
                "task": encode_task(task),
                "document": encode_document(task),
            }
        )
        # An earlier task can vanish between the script and the read only if its
        # knowledge base is being deleted; the next run of the script then says so.
        for _ in range(_MAX_CONFLICTS):
            reply = await self._create(keys=keys, args=[spec])
            status = as_text(reply[0])
            if status in ("created", "exists"):
                return CreateOutcome(task=task, created=True)
            if status == "kb_missing":
                raise NotFound(
                    "KNOWLEDGE_BASE_NOT_FOUND",
                    f"knowledge base {kb!r} does not exist",
                    metadata={"knowledge_base_id": kb},
                )
            if status == "replayed":
                earlier = await self.get_task(as_text(reply[1]))
                if earlier is not None:
                    return CreateOutcome(task=earlier, created=False, replayed=True)
            elif status == "duplicate":
                same = await self._document_task(as_text(reply[1]))
                if same is not None:
                    return CreateOutcome(task=same, created=False, duplicate=True)
            else:
                raise RuntimeError(f"unexpected answer from the create script: {reply!r}")
        raise _conflicted(task.id)

    # --- re-index (domain/document_tasks.py) ---

    @redis_boundary
    async def stored_document(self, document_id: str) -> StoredDocument | None:
        raw = await self._redis.hgetall(redis_keys.document(document_id))
        if not raw:
            return None
        f = _texts(raw)
        if f.get("deleting") == "1":
            return None  # DeleteDocument has begun: it is gone for everything new
        return StoredDocument(
            id=document_id,
            knowledge_base_id=f.get("knowledge_base_id", ""),
            filename=f.get("filename", ""),
            content_type=f.get("content_type", ""),
            size_bytes=int(f.get("size_bytes") or 0),
            sha256=f.get("sha256", ""),
            object_key=f.get("object_key", ""),
            task_id=f.get("task_id", ""),
            metadata=dict(json.loads(f.get("metadata") or "{}")),
        )

    @redis_boundary
    async def requeue(self, task: Task, previous_task_id: str, request_id: str) -> Requeued:
        if task.state is not TaskState.PENDING:
            raise ValueError(f"a new task must be PENDING, not {task.state}")
        kb = task.knowledge_base_id
        previous_result = None
        if previous_task_id:
            earlier = await self.get_task(previous_task_id)
            previous_result = earlier.result if earlier is not None else None
        document_fields = {"task_id": task.id, "update_time_ms": str(task.create_time_ms)}
        if previous_result is not None:
            # What is searchable until the new run replaces it (the Knowledge
            # Service shows it while the new task has no result).
            document_fields["chunk_count"] = str(previous_result.chunk_count)
            document_fields["page_count"] = str(previous_result.page_count)
        keys = [
            redis_keys.knowledge_base(kb),
            redis_keys.document_reindex_request(task.document_id, request_id),
            redis_keys.document(task.document_id),
            redis_keys.task(previous_task_id),
            redis_keys.task(task.id),
            redis_keys.task_events(task.id),
            redis_keys.tenant_tasks(task.tenant),
            redis_keys.kb_tasks(kb),
            redis_keys.tasks_in_state(task.tenant, TaskState.PENDING),
            redis_keys.kb_tasks_in_state(kb, TaskState.PENDING),
            redis_keys.QUEUE_READY,
        ]
        spec = _json(
            {
                "request": bool(request_id),
                "request_ttl": self._request_ttl,
                "maxlen": self._event_history,
                "knowledge_base_id": kb,
                "previous_task_id": previous_task_id,
                "score": str(queue_score(task.priority, task.create_time_ms)),
                "time_ms": str(task.create_time_ms),
                "task_id": task.id,
                "wake": redis_keys.QUEUE_WAKE,
                "task": encode_task(task),
                "document": document_fields,
            }
        )
        reply = await self._requeue(keys=keys, args=[spec])
        status = as_text(reply[0])
        if status in ("created", "exists"):
            return Requeued("created", task)
        if status == "replayed":
            earlier_task = await self.get_task(as_text(reply[1]))
            return Requeued("replayed", earlier_task) if earlier_task else Requeued("moved")
        if status == "active":
            return Requeued("active", state=as_text(reply[1]))
        if status == "moved":
            return Requeued("moved")
        if status == "document_missing":
            return Requeued("document_missing")
        if status == "kb_missing":
            return Requeued("knowledge_base_missing")
        raise RuntimeError(f"unexpected answer from the requeue script: {reply!r}")

    # --- listing ---

    @redis_boundary
    async def list_tasks(
        self,
        knowledge_base_id: str,
        state: TaskState | None,
        page_size: int,
        page_token: str,
        *,
        tenant: str = DEFAULT_TENANT,
    ) -> TaskPage:
        state_filter = "" if state is None else state.value
        if knowledge_base_id and state is not None:
            key = redis_keys.kb_tasks_in_state(knowledge_base_id, state)
        elif knowledge_base_id:
            key = redis_keys.kb_tasks(knowledge_base_id)
        elif state is not None:
            key = redis_keys.tasks_in_state(tenant, state)
        else:
            key = redis_keys.tenant_tasks(tenant)
        ids, next_token = await newest_first(
            self._redis,
            key,
            redis_pages.page_size(page_size),
            f"tasks:{tenant}:{knowledge_base_id}:{state_filter}",
            page_token,
        )
        # Only the tenant's tasks, whatever index was read.
        tasks = [t for t in await self.tasks(ids) if t is not None and t.tenant == tenant]
        if state is not None:
            # A task that changed state since the index was read no longer belongs here.
            tasks = [t for t in tasks if t.state is state]
        return TaskPage(tasks=tasks, next_page_token=next_token)

    async def tasks(self, ids: Sequence[str]) -> list[Task | None]:
        """The records of `ids`, in order (None: gone), read and decoded a
        slice per round trip (`redis_pages.in_batches`): hundreds of them do
        not hold the event loop in one piece."""
        found: list[Task | None] = []
        for batch in redis_pages.in_batches(ids):
            async with self._redis.pipeline(transaction=False) as pipe:
                for task_id in batch:
                    pipe.hgetall(redis_keys.task(task_id))
                records = await pipe.execute()
            found += [decode_task(fields) if fields else None for fields in records]
        return found

    # --- transitions ---

    @redis_boundary
    async def transition(
        self,
        task: Task,
        event: EventType,
        changes: Mapping[str, Any],
        *,
        guard: Sequence[str] = (),
        zadd: Mapping[str, float] | None = None,
        zrem: Sequence[str] = (),
        once_key: str = "",
        now: int | None = None,
        publish: Sequence[tuple[str, str]] = (),
    ) -> Transitioned:
        """Atomically applies `changes` to `task` as it was read, with one event.

        Nothing is written ("conflict") unless the stored state, and every attribute named
        in `guard`, still equal `task`'s. On success the task moves between the state
        zsets if `changes` has a new state, is added to each zset of `zadd` (key → score)
        and removed from each of `zrem`, `once_key` (if any) is set for the request-id
        TTL, update_time_ms becomes `now`, and an `event` entry with the whole record is
        appended; then each (channel, message) of `publish` is published, and the task
        id on QUEUE_WAKE if it entered QUEUE_READY. If `once_key` exists already nothing
        is written ("replayed").
        Raises NotFound(TASK_NOT_FOUND) if the task is gone.
        """
        if event in (EventType.SNAPSHOT, EventType.ERROR):
            raise ValueError(f"{event} is not a stored event")
        bad = set(changes) - (_TASK_FIELDS - _IMMUTABLE_FIELDS)
        if bad:
            raise ValueError(f"a transition cannot set {sorted(bad)}")
        time_ms = now_ms() if now is None else now
        values: dict[str, Any] = {"update_time_ms": time_ms, **changes}
        after = dataclasses.replace(task, **values)
        zadd = dict(zadd or {})
        if after.state.terminal and not task.state.terminal and after.callback_url:
            # The callback outbox: delivered by the callback sender, with retries.
            zadd[redis_keys.CALLBACKS_DUE] = float(time_ms)
        messages = [list(m) for m in publish]
        if redis_keys.QUEUE_READY in zadd:
            messages.append([redis_keys.QUEUE_WAKE, task.id])
        kb = task.knowledge_base_id
        keys = [
            redis_keys.task(task.id),
            redis_keys.task_events(task.id),
            redis_keys.tasks_in_state(task.tenant, task.state),
            redis_keys.kb_tasks_in_state(kb, task.state),
            redis_keys.tasks_in_state(task.tenant, after.state),
            redis_keys.kb_tasks_in_state(kb, after.state),
        ]

        def index(key: str) -> int:
            keys.append(key)
            return len(keys)  # Lua's KEYS is 1-based

        spec = {
            "id": task.id,
            "guard": encode_fields(task, ("state", *guard)),
            "set": encode_fields(after, values),
            "zadd": [[index(key), repr(float(score))] for key, score in zadd.items()],
            "zrem": [index(key) for key in zrem],
            "once": index(once_key) if once_key else 0,
            "once_ttl": self._request_ttl,
            "event": event.value,
            "time_ms": str(time_ms),
            "maxlen": self._event_history,
            "publish": messages,
        }
        reply = await self._transition(keys=keys, args=[_json(spec)])
        status = as_text(reply[0])
        if status == "missing":
            raise _task_not_found(task.id)
        if status == "ok":
            return Transitioned("ok", decode_task(_pairs(reply[2])), as_text(reply[1]))
        if status == "conflict":
            return Transitioned("conflict", decode_task(_pairs(reply[1])))
        if status == "replayed":
            return Transitioned("replayed", decode_task(_pairs(reply[1])))
        raise RuntimeError(f"unexpected answer from the transition script: {reply!r}")

    async def _require(self, task_id: str) -> Task:
        fields = await self._redis.hgetall(redis_keys.task(task_id))
        if not fields:
            raise _task_not_found(task_id)
        return decode_task(fields)

    @redis_boundary
    async def cancel(self, task_id: str, reason: str) -> Task:
        message = f"cancelled: {reason}" if reason else "cancelled"
        task = await self._require(task_id)
        for _ in range(_MAX_CONFLICTS):
            if task.state.terminal:
                raise FailedPrecondition(
                    "TASK_ALREADY_FINISHED",
                    f"task {task_id!r} is already {task.state.value}",
                    metadata={"task_id": task_id, "state": task.state.value},
                )
            if task.state is TaskState.RUNNING:
                if task.cancel_requested:
                    return task
                # The worker holding it is told (through the replica holding its
                # stream); it ends the task as CANCELLED.
                done = await self.transition(
                    task,
                    EventType.STATE_CHANGED,
                    {"cancel_requested": True, "message": message},
                    publish=((redis_keys.DISPATCH_CANCEL, task_id),),
                )
            else:
                now = now_ms()
                done = await self.transition(
                    task,
                    EventType.STATE_CHANGED,
                    {
                        "state": TaskState.CANCELLED,
                        "stage": Stage.NONE,
                        "message": message,
                        "end_time_ms": now,
                        "next_attempt_time_ms": 0,
                    },
                    zrem=(redis_keys.QUEUE_READY, redis_keys.QUEUE_DELAYED),
                    now=now,
                )
            if done.status == "ok":
                return done.task
            task = done.task
        raise _conflicted(task_id)

    @redis_boundary
    async def retry(self, task_id: str, request_id: str) -> Task:
        once_key = redis_keys.task_retry_request(task_id, request_id) if request_id else ""
        task = await self._require(task_id)
        for _ in range(_MAX_CONFLICTS):
            if task.state not in (TaskState.FAILED, TaskState.CANCELLED):
                if once_key and await self._redis.exists(once_key):
                    return task  # this very retry ran before
                raise FailedPrecondition(
                    "TASK_NOT_RETRYABLE",
                    f"task {task_id!r} is {task.state.value}; only FAILED or CANCELLED "
                    "tasks can be retried",
                    metadata={"task_id": task_id, "state": task.state.value},
                )
            now = now_ms()
            # A fresh run: the last error stays in the event history only.
            done = await self.transition(
                task,
                EventType.STATE_CHANGED,
                {
                    "state": TaskState.PENDING,
                    "attempt": 1,
                    "error": None,
                    "result": None,
                    "cancel_requested": False,
                    "stage": Stage.NONE,
                    "progress": 0.0,
                    "message": "",
                    "worker_id": "",
                    "start_time_ms": 0,
                    "end_time_ms": 0,
                    "next_attempt_time_ms": 0,
                },
                zadd={redis_keys.QUEUE_READY: queue_score(task.priority, now)},
                zrem=(redis_keys.QUEUE_DELAYED,),
                once_key=once_key,
                now=now,
            )
            if done.status in ("ok", "replayed"):
                return done.task
            task = done.task
        raise _conflicted(task_id)

    # --- events ---

    async def watch(self, task_id: str, after_event_id: str) -> AsyncIterator[TaskEvent]:
        """A snapshot (unless resuming) then every later event, until a terminal state.

        The snapshot's id is the id of the last event it includes, so resuming after it
        yields exactly the events that followed. Resuming after an id older than the
        retained history starts with a snapshot, since events in between are lost.
        """
        if after_event_id and not _STREAM_ID.match(after_event_id):
            raise InvalidArgument(
                "INVALID_EVENT_ID",
                "after_event_id must be an event id from an earlier WatchTask event",
                metadata={"after_event_id": after_event_id[:64]},
            )
        task_key = redis_keys.task(task_id)
        events_key = redis_keys.task_events(task_id)
        with redis_errors():
            # The record and the stream position in one transaction: the snapshot is
            # exactly the state after the last event it reports.
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(task_key)
                pipe.xrevrange(events_key, count=1)
                pipe.xrange(events_key, count=1)
                fields, last, first = await pipe.execute()
            if not fields:
                raise _task_not_found(task_id)
            task = decode_task(fields)
            last_id = as_text(last[0][0]) if last else "0-0"
            cursor = after_event_id
            if cursor and _stream_id(cursor) > _stream_id(last_id):
                raise InvalidArgument(
                    "INVALID_EVENT_ID",
                    "after_event_id is newer than the task's latest event",
                    metadata={"after_event_id": cursor, "last_event_id": last_id},
                )
            # Events between the cursor and the oldest one kept may have been trimmed.
            trimmed = bool(cursor) and (not first or _stream_id(cursor) < _stream_id(first[0][0]))
            if not cursor or trimmed:
                yield TaskEvent(id=last_id, type=EventType.SNAPSHOT, task=task, time_ms=now_ms())
                if task.state.terminal:
                    return
                cursor = last_id
            elif task.state.terminal and cursor == last_id:
                return  # resumed after the end: nothing more will come
            while True:
                reply = await self._redis.xread(
                    {events_key: cursor}, count=100, block=self._watch_block_ms
                )
                entries = _stream_entries(reply)
                if not entries and not await self._redis.exists(task_key):
                    raise _task_not_found(task_id)
                for entry_id, entry in entries:
                    event = decode_event(entry_id, entry)
                    yield event
                    if event.task.state.terminal:
                        return
                    cursor = event.id
