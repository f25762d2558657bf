"""The embedding recipe (docs/embedding.md), kept apart from the models so each step is visible.

Qwen3-Embedding: append ``<|endoftext|>`` when the tokenizer did not, run the causal body on
right-padded batches, pool the last real token (gather; exact under right padding + causal
mask), keep the first ``dimensions`` components (Matryoshka), L2-normalise, check finiteness.
BERT-family: mean over real tokens, then the same tail.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from extmind.embedding_models import DEFAULT_TASK, query_text  # noqa: F401 - the recipe's query format
from extmind.errors import Internal, InvalidArgument


def with_end_token(ids: list[int], end_id: int) -> list[int]:
    return ids if ids and ids[-1] == end_id else [*ids, end_id]


def truncate_keeping_end_token(ids: list[int], max_tokens: int, *, truncate: bool, index: int) -> list[int]:
    """Keeps the first ``max_tokens - 1`` tokens and the closing special token (EOT / [SEP]),
    which the pooling relies on; refuses over-long input when ``truncate`` is false."""
    if len(ids) <= max_tokens:
        return ids
    if not truncate:
        raise InvalidArgument(
            f"input {index} has {len(ids)} tokens but the model takes at most {max_tokens}: "
            "shorten it, split it, or send truncate=true"
        )
    return [*ids[: max_tokens - 1], ids[-1]]


def last_token_pool(hidden: mx.array, lengths: mx.array) -> mx.array:
    """hidden [B, L, D], right-padded -> [B, D], each row's last real token."""
    idx = (lengths - 1).astype(mx.int32)[:, None, None]
    return mx.take_along_axis(hidden, idx, axis=1)[:, 0, :]


def mean_pool(hidden: mx.array, mask: mx.array) -> mx.array:
    """hidden [B, L, D], mask [B, L] (1 = real token) -> [B, D] mean over real tokens."""
    m = mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=1) / mx.maximum(m.sum(axis=1), 1.0)


def check_dimensions(dimensions: int, full: int, minimum: int, model: str) -> int:
    """0 -> full size; else a Matryoshka size within [minimum, full]."""
    if dimensions == 0 or dimensions == full:
        return full
    if dimensions > full:
        raise InvalidArgument(
            f"dimensions={dimensions} is larger than {model}'s {full}: send 0 (full size) or a value up to {full}",
            param="dimensions",
        )
    if minimum == 0:
        raise InvalidArgument(
            f"{model} does not support Matryoshka truncation: send dimensions=0 or {full}", param="dimensions"
        )
    if dimensions < minimum:
        raise InvalidArgument(
            f"dimensions={dimensions} is below {model}'s minimum {minimum}: "
            f"send a value between {minimum} and {full}, or 0",
            param="dimensions",
        )
    return dimensions


def finish(pooled: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """Matryoshka cut, optional L2 normalisation, and the finite check every response needs."""
    v = np.ascontiguousarray(pooled[:, :dimensions], dtype=np.float32)
    bad = ~np.isfinite(v).all(axis=1)
    if normalize:
        norms = np.linalg.norm(v, axis=1, keepdims=True)
        bad |= norms[:, 0] == 0
        v = v / np.where(norms == 0, 1, norms)
    if bad.any():
        rows = np.flatnonzero(bad).tolist()
        raise Internal(
            f"the model produced non-finite or zero vectors for inputs {rows}; nothing was returned "
            "(try dtype float32 or bfloat16 instead of float16)"
        )
    return v
