"""The chunk table: its Arrow schema and the mapping to and from `ChunkRecord`.

One table per knowledge base (`table_name`), so there is no knowledge base
column: a query can only ever see the rows of the table it was sent to.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from services.common.errors import InvalidArgument
from services.knowledge.domain.chunks import ChunkRecord

# Ids are 26-character Crockford base32 (services/common/ids.py); anything else
# is refused before it becomes part of a table (directory) name.
_KB_ID = re.compile(r"^[0-9a-z]{26}$")

# Columns read back for results: everything but the vector (1.5 KB per row).
RESULT_COLUMNS = (
    "chunk_id",
    "document_id",
    "text",
    "chunk_index",
    "token_count",
    "filename",
    "content_type",
    "page_number",
    "heading",
    "sheet",
    "start_char",
    "end_char",
    "metadata",
)


def table_name(knowledge_base_id: str) -> str:
    if not _KB_ID.match(knowledge_base_id):
        raise InvalidArgument(
            "INVALID_KNOWLEDGE_BASE_ID", "knowledge_base_id is not a knowledge base id"
        )
    return f"kb_{knowledge_base_id}"


def chunk_schema(dimensions: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("chunk_id", pa.string(), nullable=False),
            pa.field("document_id", pa.string(), nullable=False),
            pa.field("text", pa.string(), nullable=False),
            pa.field("vector", pa.list_(pa.float32(), dimensions), nullable=False),
            pa.field("chunk_index", pa.int32(), nullable=False),
            pa.field("token_count", pa.int32()),
            pa.field("filename", pa.string()),
            pa.field("content_type", pa.string()),
            pa.field("page_number", pa.int32()),
            pa.field("heading", pa.string()),
            pa.field("sheet", pa.string()),
            pa.field("start_char", pa.int64()),
            pa.field("end_char", pa.int64()),
            # Lance stores it as JSONB, so filters can use json_get_string().
            pa.field("metadata", pa.json_(pa.string())),
        ]
    )


def vector_dimensions(schema: pa.Schema) -> int:
    return int(schema.field("vector").type.list_size)


def to_table(chunks: Sequence[ChunkRecord], dimensions: int) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in chunk_schema(dimensions).names}
    for c in chunks:
        columns["chunk_id"].append(c.id)
        columns["document_id"].append(c.document_id)
        columns["text"].append(c.text)
        columns["vector"].append(list(c.vector))
        columns["chunk_index"].append(c.chunk_index)
        columns["token_count"].append(c.token_count)
        columns["filename"].append(c.filename)
        columns["content_type"].append(c.content_type)
        columns["page_number"].append(c.page_number)
        columns["heading"].append(c.heading)
        columns["sheet"].append(c.sheet)
        columns["start_char"].append(c.start_char)
        columns["end_char"].append(c.end_char)
        columns["metadata"].append(json.dumps(c.metadata, sort_keys=True))
    return pa.Table.from_pydict(columns, schema=chunk_schema(dimensions))


def from_row(knowledge_base_id: str, row: Mapping[str, Any]) -> ChunkRecord:
    """A result row (without its vector) as a ChunkRecord."""
    raw = row.get("metadata") or "{}"
    metadata = json.loads(raw) if isinstance(raw, str) else {}
    return ChunkRecord(
        id=row["chunk_id"],
        knowledge_base_id=knowledge_base_id,
        document_id=row["document_id"],
        text=row["text"],
        vector=(),
        chunk_index=int(row["chunk_index"]),
        token_count=int(row.get("token_count") or 0),
        filename=row.get("filename") or "",
        content_type=row.get("content_type") or "",
        page_number=int(row.get("page_number") or 0),
        heading=row.get("heading") or "",
        sheet=row.get("sheet") or "",
        start_char=int(row.get("start_char") or 0),
        end_char=int(row.get("end_char") or 0),
        metadata={str(k): str(v) for k, v in metadata.items()},
    )
