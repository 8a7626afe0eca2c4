"""Every Redis key kbmesh uses, in one place, with what it holds.

All keys start with `kbmesh:`. Ids are the 26-character ids of
`services.common.ids`. Records are hashes; indexes are sorted sets scored by
milliseconds since the epoch unless said otherwise.
"""

from __future__ import annotations

PREFIX = "kbmesh:"

# zset task id -> ready score; lowest first. The score puts higher priority
# first, then older tasks first (see adapters/redis_store.py for the formula).
QUEUE_READY = PREFIX + "queue:ready"
# zset task id -> time (ms) at which a backing-off task becomes ready again.
QUEUE_DELAYED = PREFIX + "queue:delayed"
# zset task id -> lease deadline (ms) of a RUNNING task: every RUNNING task is in
# it, nothing else. Heartbeats and progress push the score (and the task's
# lease_deadline_ms) forward; any replica reclaims the members whose score has
# passed (services/task_manager/dispatch.py).
LEASES = PREFIX + "leases"
# pub/sub channel: a message (the task id, or "" for a batch) whenever a task
# enters QUEUE_READY, published in the same script that adds it, so idle
# dispatchers wake at once instead of polling.
QUEUE_WAKE = PREFIX + "queue:wake"
# pub/sub channel: the id of a RUNNING task whose cancellation was just
# requested; the replica holding the worker's stream pushes a Cancel to it.
DISPATCH_CANCEL = PREFIX + "dispatch:cancel"
# zset task id -> time (ms) its callback POST is due: the callback outbox. A
# task enters it when it reaches a terminal state with a callback URL, in the
# same atomic step; the sender claims it by pushing the time past a lease.
CALLBACKS_DUE = PREFIX + "callbacks:due"
# zset of every API key id, all at score 0 (`python -m services.admin keys list`).
API_KEYS = PREFIX + "api-keys"


def api_key(key_id: str) -> str:
    """hash: an API key (tenant, name, SHA-256 of its secret, create_time_ms);
    deleted when the key is revoked (services/common/auth.py)."""
    return f"{PREFIX}api-key:{key_id}"


def tenant_tasks(tenant: str) -> str:
    """zset: task ids of a tenant by creation time (ListTasks without filters)."""
    return f"{PREFIX}tenant:{tenant}:tasks"


def tenant_knowledge_bases(tenant: str) -> str:
    """zset: knowledge base ids of a tenant, all at score 0: ordered by
    (time-ordered) id."""
    return f"{PREFIX}tenant:{tenant}:kbs"


def tenant_uploads(tenant: str, minute: int) -> str:
    """string: uploads a tenant started in this minute since the epoch (expires)."""
    return f"{PREFIX}tenant:{tenant}:uploads:{minute}"


def tenant_usage(tenant: str) -> str:
    """hash: a tenant's stored bytes and documents (fields `bytes`, `documents`)."""
    return f"{PREFIX}tenant:{tenant}:usage"


def knowledge_base(kb_id: str) -> str:
    """hash: a knowledge base record (owned by the Knowledge Service)."""
    return f"{PREFIX}kb:{kb_id}"


def knowledge_base_name(tenant: str, name: str) -> str:
    """string: id of the tenant's knowledge base with this name (names are
    unique per tenant)."""
    return f"{PREFIX}tenant:{tenant}:kb-name:{name}"


def kb_documents(kb_id: str) -> str:
    """zset: document ids of a knowledge base by creation time."""
    return f"{PREFIX}kb:{kb_id}:docs"


def kb_content(kb_id: str, sha256: str) -> str:
    """string: id of the document of this knowledge base holding these bytes."""
    return f"{PREFIX}kb:{kb_id}:sha256:{sha256}"


def kb_request(kb_id: str, request_id: str) -> str:
    """string: task id created by the upload with this idempotency key (expires)."""
    return f"{PREFIX}kb:{kb_id}:request:{request_id}"


def kb_tasks(kb_id: str) -> str:
    """zset: task ids of a knowledge base by creation time."""
    return f"{PREFIX}kb:{kb_id}:tasks"


def tasks_in_state(tenant: str, state: str) -> str:
    """zset: a tenant's task ids currently in `state` (PENDING, RUNNING…) by
    creation time."""
    return f"{PREFIX}tenant:{tenant}:tasks:state:{state}"


def kb_tasks_in_state(kb_id: str, state: str) -> str:
    """zset: task ids of a knowledge base currently in `state`, by creation time."""
    return f"{PREFIX}kb:{kb_id}:tasks:state:{state}"


def document(document_id: str) -> str:
    """hash: a document record, created with its first task at upload."""
    return f"{PREFIX}doc:{document_id}"


def task(task_id: str) -> str:
    """hash: a task record (fields in adapters/redis_store.py)."""
    return f"{PREFIX}task:{task_id}"


def task_retry_request(task_id: str, request_id: str) -> str:
    """string: marks that RetryTask with this idempotency key re-queued the task (expires)."""
    return f"{PREFIX}task:{task_id}:retry-request:{request_id}"


def task_events(task_id: str) -> str:
    """stream: the task's events (WatchTask); ids are Redis stream ids."""
    return f"{PREFIX}task:{task_id}:events"


def kb_create_request(tenant: str, request_id: str) -> str:
    """string: id of the knowledge base the tenant created by CreateKnowledgeBase
    with this idempotency key (expires)."""
    return f"{PREFIX}tenant:{tenant}:kb-create-request:{request_id}"


def document_delete_request(document_id: str, request_id: str) -> str:
    """string: chunks removed by DeleteDocument with this idempotency key, so a
    retry after success answers OK again (expires)."""
    return f"{PREFIX}doc:{document_id}:delete-request:{request_id}"


def kb_delete_request(kb_id: str, request_id: str) -> str:
    """string: JSON outcome of DeleteKnowledgeBase with this idempotency key, so a
    retry after success answers OK again (expires)."""
    return f"{PREFIX}kb:{kb_id}:delete-request:{request_id}"


def document_reindex_request(document_id: str, request_id: str) -> str:
    """string: id of the task a re-index (EnqueueDocumentTask) with this idempotency
    key queued for the document (expires)."""
    return f"{PREFIX}doc:{document_id}:reindex-request:{request_id}"
