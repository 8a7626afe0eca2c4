"""Stored document objects, as far as the Knowledge Service touches them: it
removes them when their document or knowledge base is deleted."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from services.common.errors import Unavailable

# S3's limit of keys per DeleteObjects request.
DELETE_BATCH = 1000


class S3Objects:
    def __init__(self, client: Any, bucket: str) -> None:
        self._client = client
        self._bucket = bucket

    async def delete(self, key: str) -> None:
        """Idempotent: S3 answers success for a key that is already gone."""
        if not key:
            return
        try:
            await self._client.delete_object(Bucket=self._bucket, Key=key)
        except (BotoCoreError, ClientError) as exc:
            raise Unavailable(
                "STORAGE_UNAVAILABLE", "object storage is not answering; retry the call"
            ) from exc

    async def delete_many(self, keys: Sequence[str]) -> None:
        """Idempotent, up to DELETE_BATCH keys per DeleteObjects request (quiet mode:
        S3 answers only the keys it failed to delete)."""
        keys = [k for k in keys if k]
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            try:
                answer = await self._client.delete_objects(
                    Bucket=self._bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
                )
            except (BotoCoreError, ClientError) as exc:
                raise Unavailable(
                    "STORAGE_UNAVAILABLE", "object storage is not answering; retry the call"
                ) from exc
            failed = [e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if failed:
                raise Unavailable(
                    "STORAGE_UNAVAILABLE",
                    f"object storage did not delete {len(failed)} objects; retry the call",
                    metadata={"first_error": str(failed[0].get("Code", ""))[:64]},
                )
