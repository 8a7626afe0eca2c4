"""Callback signing and backoff (the parts receivers and operators rely on)."""

from __future__ import annotations

import hashlib
import hmac

from services.task_manager.domain.callbacks import retry_delay, sign, verify


def test_signature_is_hmac_sha256_of_the_exact_body() -> None:
    body = b'{"id":"t1","state":"STATE_SUCCEEDED"}'
    expected = hmac.new(b"s3cret", body, hashlib.sha256).hexdigest()
    assert sign(b"s3cret", body) == f"sha256={expected}"
    assert verify(b"s3cret", body, sign(b"s3cret", body))
    assert not verify(b"other", body, sign(b"s3cret", body))
    assert not verify(b"s3cret", body + b" ", sign(b"s3cret", body))


def test_retry_delay_grows_and_is_capped() -> None:
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (10, 30.0)]:
        delays = [retry_delay(attempt, 1.0, 30.0) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
