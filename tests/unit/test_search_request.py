"""Search requests and filters: limits, and filters built from values only."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.knowledge.domain.chunks import SearchFilters
from services.knowledge.domain.search import validate_search
from services.knowledge.index.filters import search_predicate, sql_literal


def valid(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "text": "q",
        "mode": "",
        "top_k": 0,
        "score_threshold": 0.0,
        "document_ids": [],
        "filenames": [],
        "content_types": [],
        "metadata": {},
    }
    return {**base, **overrides}


def test_defaults_are_hybrid_and_ten() -> None:
    query = validate_search(**valid())  # type: ignore[arg-type]
    assert (query.mode, query.top_k, query.filters) == ("hybrid", 10, SearchFilters())


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"text": ""}, "MISSING_QUERY"),
        ({"text": "   "}, "MISSING_QUERY"),
        ({"text": "x" * 4001}, "INVALID_QUERY"),
        ({"top_k": 101}, "INVALID_TOP_K"),
        ({"top_k": -1}, "INVALID_TOP_K"),
        ({"mode": "fuzzy"}, "INVALID_MODE"),
        ({"score_threshold": -0.1}, "INVALID_SCORE_THRESHOLD"),
        ({"score_threshold": float("nan")}, "INVALID_SCORE_THRESHOLD"),
        ({"document_ids": ["d"] * 1001}, "INVALID_FILTER"),
        ({"metadata": {f"k{i}": "v" for i in range(65)}}, "INVALID_FILTER"),
        ({"filenames": ["x" * 1025]}, "INVALID_FILTER"),
    ],
)
def test_out_of_range_requests_are_refused(overrides: dict[str, object], reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_search(**valid(**overrides))  # type: ignore[arg-type]
    assert caught.value.reason == reason


def test_limits_themselves_are_accepted() -> None:
    query = validate_search(**valid(text="x" * 4000, top_k=100))  # type: ignore[arg-type]
    assert query.top_k == 100


def test_sql_literals_double_quotes_and_drop_nul() -> None:
    assert sql_literal("O'Brien") == "'O''Brien'"
    assert sql_literal("x' OR '1'='1") == "'x'' OR ''1''=''1'"
    assert sql_literal("a\x00b") == "'ab'"


def test_predicate_ands_fields_and_ors_values() -> None:
    predicate = search_predicate(
        SearchFilters(
            document_ids=("d1", "d2"),
            content_types=("text/plain",),
            metadata={"team": "o'ps"},
        )
    )
    assert predicate is not None
    assert "document_id IN ('d1', 'd2')" in predicate
    assert "content_type = 'text/plain'" in predicate
    assert "json_get_string(metadata, 'team') = 'o''ps'" in predicate
    assert predicate.count(" AND ") == 2
    assert search_predicate(SearchFilters()) is None
