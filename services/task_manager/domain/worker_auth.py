"""Worker authentication: bearer tokens checked against SHA-256 hashes.

The Task Manager keeps only hashes of the tokens it accepts (operators may
configure hashes directly, so the tokens themselves never sit in its
environment), and compares in constant time against every one of them, so
neither the answer time nor an early exit tells how close a guess was.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable

from services.common.errors import Unauthenticated

REASON = "WORKER_UNAUTHENTICATED"
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_BEARER = re.compile(r"^\s*bearer\s+(\S+)\s*$", re.IGNORECASE)


def token_hash(token: str) -> str:
    """Lower-case hex SHA-256 of a token (what `worker_token_sha256` holds)."""
    return hashlib.sha256(token.encode()).hexdigest()


class WorkerTokens:
    """The tokens workers may present, as SHA-256 hashes."""

    def __init__(self, tokens: Iterable[str] = (), hashes: Iterable[str] = ()) -> None:
        digests = [bytes.fromhex(token_hash(t)) for t in tokens if t]
        for h in hashes:
            if not _SHA256_HEX.match(h.lower()):
                raise ValueError("a worker token hash must be 64 hex digits (SHA-256)")
            digests.append(bytes.fromhex(h.lower()))
        self._digests = tuple(digests)

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, token: str) -> bool:
        digest = hashlib.sha256(token.encode()).digest()
        found = False
        for known in self._digests:  # no early exit: same time whichever matches
            found |= hmac.compare_digest(digest, known)
        return found

    def check(self, authorization: str | None) -> None:
        """Raises Unauthenticated(WORKER_UNAUTHENTICATED) unless `authorization`
        is `Bearer <token>` with a token we accept."""
        match = _BEARER.match(authorization or "")
        if match is None:
            raise Unauthenticated(
                REASON,
                "worker streams need `authorization: Bearer <worker token>` metadata",
            )
        if not self.accepts(match.group(1)):
            raise Unauthenticated(REASON, "the worker token is not accepted by this Task Manager")
