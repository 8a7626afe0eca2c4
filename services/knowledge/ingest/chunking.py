"""Sections → chunks, through llama-index node parsers.

Strategies (`ChunkingConfig.Strategy`, per knowledge base, overridable per upload):

- SENTENCE (default): `SentenceSplitter`, sentences packed up to `chunk_size`
  tokens with `chunk_overlap` tokens carried over;
- MARKDOWN: `MarkdownNodeParser` cuts Markdown (and HTML, converted to Markdown)
  at headings first, then `SentenceSplitter` bounds each part, so no chunk
  straddles two sections;
- TOKEN: `TokenTextSplitter`, fixed windows of tokens.

Tokens are counted with the embedder's own tokenizer, never tiktoken (whose BPE
files, like NLTK's punkt, ship inside llama-index-core: setting NLTK_DATA or
TIKTOKEN_CACHE_DIR would make it try to download them, and fail offline).

A chunk keeps its page (PDF page, PPTX slide), heading (DOCX heading, slide
title, Markdown/HTML heading, "rows a-b" of a sheet), sheet, and where it lies
in the document's text: `start_char`/`end_char` index the sections joined with
blank lines, in order.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from services.knowledge.domain.knowledge_bases import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_SIZE,
    ChunkingDefaults,
)
from services.knowledge.ingest.errors import DocumentRejected, Stopped
from services.knowledge.ingest.parsers import Section

STRATEGIES = ("SENTENCE", "MARKDOWN", "TOKEN")
# The local model sees at most 256 tokens including [CLS] and [SEP]; the splitter
# counts without them. A bigger chunk would be stored whole but embedded only up to
# its 254th token: the tail would be findable by keyword and invisible to vectors.
LOCAL_MAX_CHUNK_TOKENS = 254
# Sections are joined with this in the document text that start/end_char index.
SECTION_SEPARATOR = "\n\n"
# A chunk never exceeds this many characters per token of chunk_size: WordPiece
# counts a 10,000-character "word" as one [UNK], so token counting alone would let
# a run of junk (base64, a 50 MB line) through as a single enormous chunk.
MAX_CHARS_PER_TOKEN = 12
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t]*#*[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")

Tokenizer = Callable[[str], Sequence[int]]


@dataclass(frozen=True)
class ChunkPlan:
    strategy: str
    chunk_size: int
    chunk_overlap: int


@dataclass(frozen=True)
class Chunk:
    text: str
    chunk_index: int
    page_number: int
    heading: str
    sheet: str
    start_char: int
    end_char: int


def plan(
    knowledge_base: ChunkingDefaults | None,
    strategy: str = "",
    chunk_size: int = 0,
    chunk_overlap: int = 0,
    *,
    max_chunk_tokens: int = LOCAL_MAX_CHUNK_TOKENS,
) -> ChunkPlan:
    """The upload's choices ("" / 0: not given) over the knowledge base's, clamped to
    what the embedding model can see."""
    base = knowledge_base or ChunkingDefaults()
    chosen = (strategy or base.strategy or "SENTENCE").upper()
    if chosen not in STRATEGIES:
        chosen = "SENTENCE"
    size = min(chunk_size or base.chunk_size or DEFAULT_CHUNK_SIZE, max_chunk_tokens)
    overlap = chunk_overlap or base.chunk_overlap or DEFAULT_CHUNK_OVERLAP
    if overlap >= size // 2:
        # Clamping the size can leave the knowledge base's overlap too big to progress.
        overlap = size // 4
    return ChunkPlan(chosen, max(size, 16), max(overlap, 0))


def split(
    sections: Sequence[Section],
    chunk_plan: ChunkPlan,
    tokenizer: Tokenizer,
    *,
    max_chunks: int,
    cancelled: threading.Event | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Chunk]:
    """Chunks of all sections, in document order, indexed from 0."""
    splitter = _splitter(chunk_plan, tokenizer)
    max_chars = chunk_plan.chunk_size * MAX_CHARS_PER_TOKEN
    chunks: list[Chunk] = []
    base = 0
    for number, section in enumerate(sections, 1):
        if cancelled is not None and cancelled.is_set():
            raise Stopped
        marks = headings_of(section.text) if section.markdown else []
        for piece_start, heading, text in _pieces(section, chunk_plan.strategy):
            for offset, chunk_text in _locate(text, splitter(text), max_chars):
                within = piece_start + offset
                start = base + within
                chunks.append(
                    Chunk(
                        text=chunk_text,
                        chunk_index=len(chunks),
                        page_number=section.page_number,
                        heading=heading or _heading_at(marks, within, within + len(chunk_text)),
                        sheet=section.sheet,
                        start_char=start,
                        end_char=start + len(chunk_text),
                    )
                )
                if len(chunks) > max_chunks:
                    raise DocumentRejected("DOCUMENT_TOO_LARGE", f"more than {max_chunks} chunks")
        base += len(section.text) + len(SECTION_SEPARATOR)
        if progress is not None:
            progress(number, len(sections))
    return chunks


def _splitter(chunk_plan: ChunkPlan, tokenizer: Tokenizer) -> Callable[[str], list[str]]:
    # Imported here: llama_index.core.node_parser takes ~2 s to import.
    from llama_index.core.node_parser import SentenceSplitter, TokenTextSplitter

    parser: Any
    if chunk_plan.strategy == "TOKEN":
        parser = TokenTextSplitter(
            chunk_size=chunk_plan.chunk_size,
            chunk_overlap=chunk_plan.chunk_overlap,
            tokenizer=tokenizer,
        )
    else:
        parser = SentenceSplitter(
            chunk_size=chunk_plan.chunk_size,
            chunk_overlap=chunk_plan.chunk_overlap,
            tokenizer=tokenizer,
        )
    split_text: Callable[[str], list[str]] = parser.split_text
    return split_text


def _pieces(section: Section, strategy: str) -> list[tuple[int, str, str]]:
    """(offset in the section, heading, text) to split independently. Pieces with
    no heading get the Markdown heading in force where each chunk starts."""
    if section.markdown and strategy == "MARKDOWN":
        return _markdown_nodes(section.text)
    return [(0, section.heading, section.text)]


def _heading_at(marks: list[tuple[int, str]], start: int, end: int) -> str:
    """The last heading at or before `start`; else the first one inside the chunk."""
    current = ""
    for offset, heading in marks:
        if offset <= start:
            current = heading
        elif not current and offset < end:
            return heading
        else:
            break
    return current


def _markdown_nodes(text: str) -> list[tuple[int, str, str]]:
    from llama_index.core import Document
    from llama_index.core.node_parser import MarkdownNodeParser

    nodes = MarkdownNodeParser().get_nodes_from_documents([Document(text=text)])
    pieces: list[tuple[int, str, str]] = []
    cursor = 0
    for node in nodes:
        body = node.get_content()
        found = text.find(body, cursor)
        start = found if found >= 0 else cursor
        cursor = start + (len(body) if found >= 0 else 0)
        first = body.lstrip().split("\n", 1)[0]
        match = _HEADING.match(first)
        if match:
            heading = match.group(2).strip()
        else:
            # MarkdownNodeParser's header_path holds the ancestors ("/Title/Install/").
            path = str(node.metadata.get("header_path", "")).strip("/")
            heading = path.rsplit("/", 1)[-1] if path else ""
        pieces.append((start, heading, body))
    return pieces


def headings_of(text: str) -> list[tuple[int, str]]:
    """(offset, heading) of each ATX heading outside fenced code, in order."""
    found: list[tuple[int, str]] = []
    offset = 0
    fenced = False
    for line in text.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            match = _HEADING.match(line)
            if match:
                found.append((offset, match.group(2).strip()))
        offset += len(line) + 1
    return found


def _locate(text: str, pieces: list[str], max_chars: int) -> list[tuple[int, str]]:
    """Each split with its offset in `text`. Splitters return stripped substrings,
    each starting after the previous one's start; the overlap (below half a chunk,
    see `plan`) means it starts past the previous one's middle, which keeps
    repeated passages from matching an earlier occurrence."""
    located: list[tuple[int, str]] = []
    previous_start, previous_end = -1, 0
    for piece in pieces:
        for part in _hard_cut(piece, max_chars):
            likely = max(previous_start + 1, previous_end - (previous_end - previous_start) // 2)
            found = text.find(part, likely)
            if found < 0:
                found = text.find(part, previous_start + 1)
            start = found if found >= 0 else min(previous_end, len(text))
            located.append((start, part))
            previous_start, previous_end = start, start + len(part)
    return located


def _hard_cut(piece: str, max_chars: int) -> list[str]:
    if len(piece) <= max_chars:
        return [piece]
    return [piece[i : i + max_chars] for i in range(0, len(piece), max_chars)]
