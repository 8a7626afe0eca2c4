"""Chunking strategies: sizes, positions, headings, stable ids."""

from __future__ import annotations

from services.knowledge.domain.chunks import chunk_id
from services.knowledge.domain.knowledge_bases import ChunkingDefaults
from services.knowledge.ingest.chunking import (
    LOCAL_MAX_CHUNK_TOKENS,
    SECTION_SEPARATOR,
    plan,
    split,
)
from services.knowledge.ingest.embedding import shared_minilm
from services.knowledge.ingest.parsers import Section

TOKENS = shared_minilm().token_ids
SENTENCES = " ".join(
    f"Sentence number {i} talks about topic {i * 7 % 13} and nothing else." for i in range(60)
)
MARKDOWN = (
    "# Guide\n\nIntro paragraph for the guide.\n\n## Setup\n\n"
    + " ".join(f"Setup step {i} installs component {i}." for i in range(40))
    + "\n\n```sh\n# not a heading\nmake up\n```\n\n## Usage\n\nSearch away with queries.\n"
)


def _document_text(sections: list[Section]) -> str:
    return SECTION_SEPARATOR.join(s.text for s in sections)


def test_plan_takes_the_upload_over_the_knowledge_base_and_clamps_for_the_model() -> None:
    kb = ChunkingDefaults("MARKDOWN", 512, 64)
    assert plan(kb) == plan(kb, "", 0, 0)
    assert plan(kb).strategy == "MARKDOWN"
    # 512 tokens would be cut by the model (256 with [CLS]/[SEP]).
    assert plan(kb).chunk_size == LOCAL_MAX_CHUNK_TOKENS
    chosen = plan(kb, "TOKEN", 100, 10)
    assert (chosen.strategy, chosen.chunk_size, chosen.chunk_overlap) == ("TOKEN", 100, 10)
    # A knowledge-base overlap that no longer fits the smaller size is reduced.
    assert plan(kb, "", 64, 0).chunk_overlap < 32
    assert plan(None, max_chunk_tokens=1024).chunk_size == 512


def test_sentence_chunks_respect_the_size_and_know_their_position() -> None:
    sections = [Section(SENTENCES, page_number=1), Section("Short second page.", page_number=2)]
    # Overlap is in whole sentences: 24 tokens hold one of these (~15 tokens).
    chunks = split(sections, plan(None, "SENTENCE", 64, 24), TOKENS, max_chunks=1000)
    assert len(chunks) > 3
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))
    assert max(len(TOKENS(c.text)) for c in chunks) <= 64
    text = _document_text(sections)
    for c in chunks:
        assert text[c.start_char : c.end_char] == c.text
    assert chunks[0].start_char == 0
    assert chunks[-1].page_number == 2
    assert chunks[-1].text == "Short second page."
    # Overlap: consecutive chunks of one section share text.
    assert chunks[1].start_char < chunks[0].end_char


def test_token_strategy_makes_fixed_windows() -> None:
    chunks = split([Section(SENTENCES)], plan(None, "TOKEN", 40, 0), TOKENS, max_chunks=1000)
    assert len(chunks) > 5
    assert max(len(TOKENS(c.text)) for c in chunks) <= 40


def test_markdown_strategy_cuts_at_headings() -> None:
    sections = [Section(MARKDOWN, markdown=True)]
    chunks = split(sections, plan(None, "MARKDOWN", 64, 8), TOKENS, max_chunks=1000)
    headings = [c.heading for c in chunks]
    assert headings[0] == "Guide"
    assert "Setup" in headings
    assert headings[-1] == "Usage"
    # The fenced "# not a heading" is code, not a heading.
    assert "not a heading" not in headings
    setup = [c for c in chunks if c.heading == "Setup"]
    assert all("Search away" not in c.text for c in setup)
    text = _document_text(sections)
    for c in chunks:
        assert text[c.start_char : c.end_char] == c.text


def test_sentence_strategy_still_labels_markdown_headings() -> None:
    chunks = split(
        [Section(MARKDOWN, markdown=True)], plan(None, "SENTENCE", 64, 8), TOKENS, max_chunks=1000
    )
    assert chunks[0].heading == "Guide"
    assert chunks[-1].heading in ("Setup", "Usage")
    assert {c.heading for c in chunks} >= {"Guide", "Setup"}


def test_chunk_ids_are_stable_across_runs() -> None:
    sections = [Section(SENTENCES, page_number=1)]
    first = split(sections, plan(None), TOKENS, max_chunks=1000)
    again = split(sections, plan(None), TOKENS, max_chunks=1000)
    ids = [chunk_id("doc-1", c.chunk_index, c.text) for c in first]
    assert ids == [chunk_id("doc-1", c.chunk_index, c.text) for c in again]
    assert len(set(ids)) == len(ids)


def test_junk_without_word_boundaries_is_still_bounded() -> None:
    # WordPiece counts one 10,000-character "word" as a single [UNK].
    chunks = split([Section("x" * 10_000)], plan(None, "SENTENCE", 64, 0), TOKENS, max_chunks=1000)
    assert max(len(c.text) for c in chunks) <= 64 * 12
    assert "".join(c.text for c in chunks) == "x" * 10_000
