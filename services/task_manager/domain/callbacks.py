"""Callbacks: the signed POST a task's callback URL receives on a terminal state.

The body is the task as JSON (proto field names, as `GetTask` answers through
REST). The `X-Kbmesh-Signature` header is `sha256=` followed by the hex
HMAC-SHA256 of the exact body bytes under the configured secret; receivers
recompute it and compare in constant time (`verify`). Failed deliveries are
retried with exponential backoff up to a limit; every attempt is recorded on
the task (`Task.callback_attempts`) and as a CALLBACK event.
"""

from __future__ import annotations

import hashlib
import hmac
import random

SIGNATURE_HEADER = "X-Kbmesh-Signature"
TASK_ID_HEADER = "X-Kbmesh-Task-Id"
EVENT_HEADER = "X-Kbmesh-Event"


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, signature: str) -> bool:
    return hmac.compare_digest(sign(secret, body), signature)


def retry_delay(attempts_so_far: int, base: float, cap: float) -> float:
    """Seconds before the next attempt: exponential with full jitter, at most `cap`."""
    ceiling = min(cap, base * 2 ** max(0, attempts_so_far - 1))
    return random.uniform(ceiling / 2, ceiling)


def delivered_status(http_status: int) -> bool:
    return 200 <= http_status < 300
