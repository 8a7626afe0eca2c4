"""Search requests: the documented limits, checked before any index work."""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.knowledge.domain.chunks import SearchFilters

MAX_QUERY_CHARS = 4000
DEFAULT_TOP_K = 10
MAX_TOP_K = 100
MAX_FILTER_VALUES = 1000
MAX_FILTER_METADATA = 64
MAX_FILTER_VALUE_CHARS = 1024
MODES = ("hybrid", "vector", "keyword")


@dataclass(frozen=True)
class SearchQuery:
    text: str
    mode: str
    top_k: int
    score_threshold: float
    filters: SearchFilters


def _values(field: str, values: list[str]) -> tuple[str, ...]:
    if len(values) > MAX_FILTER_VALUES:
        raise InvalidArgument(
            "INVALID_FILTER", f"filter.{field} has more than {MAX_FILTER_VALUES} values"
        )
    if any(len(v) > MAX_FILTER_VALUE_CHARS for v in values):
        raise InvalidArgument(
            "INVALID_FILTER", f"a filter.{field} value is over {MAX_FILTER_VALUE_CHARS} characters"
        )
    return tuple(dict.fromkeys(values))


def validate_search(
    text: str,
    mode: str,
    top_k: int,
    score_threshold: float,
    document_ids: list[str],
    filenames: list[str],
    content_types: list[str],
    metadata: dict[str, str],
) -> SearchQuery:
    """`mode` is "" (the default, hybrid) or one of MODES."""
    if not text.strip():
        raise InvalidArgument("MISSING_QUERY", "query is required")
    if len(text) > MAX_QUERY_CHARS:
        raise InvalidArgument(
            "INVALID_QUERY",
            f"query is longer than {MAX_QUERY_CHARS} characters",
            metadata={"max_chars": str(MAX_QUERY_CHARS)},
        )
    mode = mode or "hybrid"
    if mode not in MODES:
        raise InvalidArgument("INVALID_MODE", f"unknown search mode {mode!r}")
    if not 0 <= top_k <= MAX_TOP_K:
        raise InvalidArgument(
            "INVALID_TOP_K",
            f"top_k must be 1-{MAX_TOP_K} (0 means {DEFAULT_TOP_K})",
            metadata={"max": str(MAX_TOP_K)},
        )
    if not math.isfinite(score_threshold) or score_threshold < 0:
        raise InvalidArgument(
            "INVALID_SCORE_THRESHOLD", "score_threshold must be a finite number >= 0"
        )
    if len(metadata) > MAX_FILTER_METADATA:
        raise InvalidArgument(
            "INVALID_FILTER", f"filter.metadata has more than {MAX_FILTER_METADATA} entries"
        )
    _values("metadata", [*metadata.keys(), *metadata.values()])
    return SearchQuery(
        text=text,
        mode=mode,
        top_k=top_k or DEFAULT_TOP_K,
        score_threshold=score_threshold,
        filters=SearchFilters(
            document_ids=_values("document_ids", document_ids),
            filenames=_values("filenames", filenames),
            content_types=_values("content_types", content_types),
            metadata=dict(metadata),
        ),
    )
