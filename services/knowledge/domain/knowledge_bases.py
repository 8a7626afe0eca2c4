"""Knowledge bases: what a caller may set, and the rules for it."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument
from services.common.settings import DEFAULT_TENANT

MAX_NAME_CHARS = 200
MAX_DESCRIPTION_CHARS = 2000
MAX_LABELS = 64
MAX_LABEL_KEY_CHARS = 63
MAX_LABEL_VALUE_CHARS = 256
_LABEL_KEY = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
CHUNKING_STRATEGIES = ("SENTENCE", "MARKDOWN", "TOKEN")
DEFAULT_CHUNK_SIZE = 512
DEFAULT_CHUNK_OVERLAP = 64
EMBEDDING_PROVIDERS = {"local": ("all-MiniLM-L6-v2", 384), "openai": ("", 0)}
UPDATABLE_FIELDS = ("name", "description", "chunking", "labels")


@dataclass(frozen=True)
class ChunkingDefaults:
    strategy: str = "SENTENCE"
    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP


@dataclass(frozen=True)
class KnowledgeBase:
    id: str
    name: str
    description: str
    chunking: ChunkingDefaults
    embedding_provider: str
    embedding_model: str
    embedding_dimensions: int
    labels: dict[str, str] = field(default_factory=dict)
    create_time_ms: int = 0
    update_time_ms: int = 0
    # The owner: set by the store from the caller's credentials.
    tenant: str = DEFAULT_TENANT


def _invalid(reason: str, message: str) -> InvalidArgument:
    return InvalidArgument(reason, message)


def validate_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise _invalid("MISSING_NAME", "a knowledge base needs a name")
    if len(name) > MAX_NAME_CHARS:
        raise _invalid("INVALID_NAME", f"name is longer than {MAX_NAME_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise _invalid("INVALID_NAME", "name contains control characters")
    return name


def validate_description(description: str) -> str:
    if len(description) > MAX_DESCRIPTION_CHARS:
        raise _invalid(
            "INVALID_DESCRIPTION", f"description is longer than {MAX_DESCRIPTION_CHARS} characters"
        )
    return description


def resolve_chunking(strategy: str, chunk_size: int, chunk_overlap: int) -> ChunkingDefaults:
    """Fills defaults and checks ranges (0 / empty mean the default)."""
    strategy = strategy or "SENTENCE"
    if strategy not in CHUNKING_STRATEGIES:
        raise _invalid("INVALID_CHUNKING", f"unknown chunking strategy {strategy!r}")
    size = chunk_size or DEFAULT_CHUNK_SIZE
    if not 32 <= size <= 8192:
        raise _invalid("INVALID_CHUNKING", "chunk_size must be 32-8192 tokens")
    overlap = chunk_overlap if chunk_overlap else min(DEFAULT_CHUNK_OVERLAP, size // 4)
    if not 0 <= overlap < size:
        raise _invalid("INVALID_CHUNKING", "chunk_overlap must be >= 0 and below chunk_size")
    return ChunkingDefaults(strategy, size, overlap)


def validate_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise _invalid("INVALID_LABELS", f"at most {MAX_LABELS} labels")
    for key, value in labels.items():
        if not _LABEL_KEY.match(key) or len(key) > MAX_LABEL_KEY_CHARS:
            raise _invalid(
                "INVALID_LABELS",
                f"label keys are 1-{MAX_LABEL_KEY_CHARS} of a-z 0-9 _ . - starting alphanumeric",
            )
        if len(value) > MAX_LABEL_VALUE_CHARS:
            raise _invalid(
                "INVALID_LABELS", f"label values are at most {MAX_LABEL_VALUE_CHARS} characters"
            )
    return dict(labels)


def resolve_embedding(provider: str, model: str) -> tuple[str, str, int]:
    """(provider, model, dimensions); dimensions 0 = known once the model answers."""
    provider = provider or "local"
    if provider not in EMBEDDING_PROVIDERS:
        raise _invalid(
            "INVALID_EMBEDDING",
            f"embedding provider must be one of {', '.join(sorted(EMBEDDING_PROVIDERS))}",
        )
    default_model, dimensions = EMBEDDING_PROVIDERS[provider]
    if provider == "local" and model and model != default_model:
        raise _invalid("INVALID_EMBEDDING", f"the local provider serves {default_model} only")
    if provider == "openai" and not model:
        raise _invalid("INVALID_EMBEDDING", "the openai provider needs a model name")
    return provider, model or default_model, dimensions
