"""Stored document objects, as far as the Knowledge Service touches them: it
removes them when their document or knowledge base is deleted."""

from __future__ import annotations

from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from services.common.errors import Unavailable


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
