"""When and how long to wait before calling again.

Only errors that say "try later" are retried: UNAVAILABLE (the service is
down, restarting or overloaded at the transport level), and RESOURCE_EXHAUSTED
when the service attached a RetryInfo (a limit that clears with time, never a
size limit). The SDK applies the policy only to calls that are safe to repeat:
reads, mutations carrying a `request_id`, and uploads with a `request_id` from
a source it can read again.

Delays grow exponentially with "full jitter" (a random delay between 0 and
the exponential bound), so many clients cut off together do not come back
together; a server's RetryInfo delay is a floor.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import grpc

from kbmesh.client.errors import KbmeshError


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of one call. `max_attempts` counts the first one (1 = no retry)."""

    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 5.0
    multiplier: float = 2.0

    def should_retry(self, error: KbmeshError, attempt: int) -> bool:
        """Whether a call that failed with `error` on `attempt` (from 1) goes again."""
        return attempt < self.max_attempts and retryable(error)

    def backoff(
        self, attempt: int, error: KbmeshError | None = None, *, rng: random.Random | None = None
    ) -> float:
        """Seconds to wait after failed `attempt` (from 1) before the next one."""
        bound = min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1))
        delay = (rng or random).uniform(0.0, bound)
        if error is not None and error.retry_after is not None:
            # The server knows better: wait at least that long, plus a little
            # jitter so the callers it turned away do not return at once.
            delay = error.retry_after + (rng or random).uniform(0.0, 0.1 * error.retry_after + 0.05)
        return delay


NO_RETRY = RetryPolicy(max_attempts=1)


def retryable(error: KbmeshError) -> bool:
    """UNAVAILABLE always; RESOURCE_EXHAUSTED only with a RetryInfo hint."""
    if error.code == grpc.StatusCode.UNAVAILABLE:
        return True
    return error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after is not None
