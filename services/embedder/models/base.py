"""What the engine needs from a served model, and helpers shared by the model files.

A served model tokenizes on any thread (``token_ids``) and runs ``forward`` on the one MLX
thread, taking a list of token-id lists and returning one float32 numpy row per sequence.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from extmind.errors import FailedPrecondition

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass
class ServedModel:
    name: str  # canonical name, never an alias
    path: Path
    kind: str  # "embedding" | "reranker"
    dimensions: int  # full embedding size (0 for rerankers)
    max_input_tokens: int
    dtype: str
    min_dimensions: int = 0  # smallest Matryoshka size (0 = no truncation supported)
    uses_instruction: bool = False
    default_instruction: str = ""
    aliases: list[str] = field(default_factory=list)
    vocab_size: int = 0  # token ids in [0, vocab_size) are valid input (0 = token input refused)
    nbytes: int = 0  # bytes of the parameters held in memory (what --model-memory-gb counts)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        raise NotImplementedError

    def with_special_tokens(self, ids: list[int]) -> list[int]:
        """Token ids sent by a caller -> the ids the model runs on: the special tokens the recipe
        needs (end token, [CLS]/[SEP]) added where missing, so ``Tokenize`` output round-trips."""
        return list(ids)

    def forward(self, batch: list[list[int]]) -> np.ndarray:
        raise NotImplementedError


def load_tokenizer(path: Path):
    """The fast tokenizer of a checkpoint with padding and truncation off (we do both)."""
    from tokenizers import Tokenizer

    if (path / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    else:  # e.g. a BERT shipped with vocab.txt only: let transformers convert it
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path)).backend_tokenizer
    tok.no_padding()
    tok.no_truncation()
    return tok


def vocabulary_size(tokenizer, embedding_rows: int) -> int:
    """Ids a caller may send: the tokenizer's vocabulary (added tokens included), never past the
    embedding matrix (an id beyond its rows would read outside it)."""
    return min(int(tokenizer.get_vocab_size(with_added_tokens=True)), int(embedding_rows))


def read_json(path: Path, default=None):
    if not path.exists():
        return default
    with open(path) as f:
        return json.load(f)


def right_padded(batch: list[list[int]], pad_id: int) -> tuple[mx.array, mx.array]:
    """-> (ids [B, L] int32 padded on the right, lengths [B] int32)."""
    width = max(len(s) for s in batch)
    ids = np.full((len(batch), width), pad_id, dtype=np.int32)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = s
    return mx.array(ids), mx.array(np.array([len(s) for s in batch], dtype=np.int32))


def parameter_bytes(*trees) -> int:
    """Bytes of every array in ``trees`` (module parameter trees or arrays)."""
    from mlx.utils import tree_flatten

    return sum(v.nbytes for t in trees for _, v in tree_flatten(t))


def cast(module, dtype: str) -> None:
    if dtype not in DTYPES:
        raise FailedPrecondition(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    module.set_dtype(DTYPES[dtype])
