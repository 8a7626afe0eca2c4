"""Search filters as LanceDB predicates, built from values, never pasted.

Column conditions go through `lancedb.expr` (`col`/`lit`/`isin`), which quotes
literals itself. The expression builder does not know `json_get_string`, so
metadata conditions are SQL text whose two literals go through `sql_literal`
(the only place a value meets SQL text). An unescaped quote would not raise:
LanceDB silently ran a different query in our tests, which is why this is one
small module with its own tests.
"""

from __future__ import annotations

from lancedb.expr import Expr, col, lit

from services.knowledge.domain.chunks import SearchFilters


def sql_literal(value: str) -> str:
    """A SQL string literal: single quotes doubled; backslash, %, _ and " are
    plain characters in Lance SQL `=` comparisons. NUL cannot be represented."""
    return "'" + value.replace("\x00", "").replace("'", "''") + "'"


def document_filter(document_id: str) -> Expr:
    return col("document_id") == lit(document_id)


def _any_of(column: str, values: tuple[str, ...]) -> Expr:
    if len(values) == 1:
        return col(column) == lit(values[0])
    return col(column).isin(list(values))


def search_predicate(filters: SearchFilters) -> str | None:
    """AND across fields, OR within one; None when nothing is restricted."""
    parts: list[str] = []
    expr: Expr | None = None
    for column, values in (
        ("document_id", filters.document_ids),
        ("filename", filters.filenames),
        ("content_type", filters.content_types),
    ):
        if values:
            condition = _any_of(column, values)
            expr = condition if expr is None else expr & condition
    if expr is not None:
        parts.append(expr.to_sql())
    for key, value in sorted(filters.metadata.items()):
        parts.append(f"(json_get_string(metadata, {sql_literal(key)}) = {sql_literal(value)})")
    if not parts:
        return None
    return " AND ".join(f"({p})" for p in parts)
