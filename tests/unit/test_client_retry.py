"""Retry policy of the SDK: what is retried, and how long it waits."""

from __future__ import annotations

import random

import pytest

from kbmesh.client import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    RetryPolicy,
    Unavailable,
)
from kbmesh.client.retry import retryable


def test_only_errors_that_say_try_later_are_retryable() -> None:
    assert retryable(Unavailable("down"))
    assert retryable(ResourceExhausted("busy", reason="TOO_MANY_UPLOADS", retry_after=0.5))
    # A size limit carries no RetryInfo: retrying cannot help.
    assert not retryable(ResourceExhausted("too big", reason="UPLOAD_TOO_LARGE"))
    assert not retryable(NotFound("gone"))
    assert not retryable(InvalidArgument("bad"))


def test_attempts_are_bounded() -> None:
    policy = RetryPolicy(max_attempts=3)
    error = Unavailable("down")
    assert policy.should_retry(error, 1)
    assert policy.should_retry(error, 2)
    assert not policy.should_retry(error, 3)
    assert not RetryPolicy(max_attempts=1).should_retry(error, 1)


def test_backoff_grows_exponentially_with_full_jitter_up_to_the_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0)
    rng = random.Random(7)
    for attempt, bound in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = [policy.backoff(attempt, rng=rng) for _ in range(200)]
        assert all(0.0 <= d <= bound for d in delays)
        # Jittered: spread over the range, not a fixed value.
        assert max(delays) - min(delays) > bound / 2


def test_server_retry_delay_is_a_floor() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0)
    error = ResourceExhausted("busy", retry_after=2.0)
    rng = random.Random(1)
    delays = [policy.backoff(1, error, rng=rng) for _ in range(100)]
    assert all(2.0 <= d <= 2.0 + 0.25 for d in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize("attempt", [1, 2, 10])
def test_backoff_is_never_negative(attempt: int) -> None:
    assert RetryPolicy().backoff(attempt) >= 0.0
