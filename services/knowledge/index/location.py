"""Where the index lives: a local directory, or `s3://bucket/prefix` on the
service's S3 (same endpoint and keys as uploads)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import lancedb
from lancedb.db import DBConnection

from services.common.settings import S3Settings
from services.knowledge.settings import IndexSettings


def storage_options(s3: S3Settings) -> dict[str, str]:
    """object_store options for LanceDB on our S3 (SeaweedFS honours the
    conditional PUTs Lance commits with)."""
    return {
        "aws_access_key_id": s3.access_key_id.get_secret_value(),
        "aws_secret_access_key": s3.secret_access_key.get_secret_value(),
        "aws_endpoint": s3.endpoint_url,
        "aws_region": s3.region,
        # Path-style addressing: bucket names are not DNS names on SeaweedFS/MinIO.
        "aws_virtual_hosted_style_request": "false",
        "allow_http": "true" if s3.endpoint_url.startswith("http://") else "false",
    }


def connect(settings: IndexSettings, s3: S3Settings) -> DBConnection:
    """Blocking (on S3 it may touch the network): call it off the event loop."""
    options: dict[str, str] | None = None
    if settings.uri.startswith("s3://"):
        options = storage_options(s3)
    else:
        Path(settings.uri).mkdir(parents=True, exist_ok=True)
    return lancedb.connect(
        settings.uri,
        # Without an interval a reader never sees other processes' commits
        # (workers write, the service searches).
        read_consistency_interval=timedelta(seconds=settings.read_consistency_seconds),
        storage_options=options,
    )
