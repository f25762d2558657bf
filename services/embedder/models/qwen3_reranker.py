"""Qwen3-Reranker on MLX: mlx-lm's Qwen3 causal LM, scored by P(yes) at the last position.

Only the ``no`` and ``yes`` rows of the LM head matter, so they are taken out once at load
(dequantized when the checkpoint is quantized) and the full head is dropped.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.utils import load_model

from extmind.errors import FailedPrecondition
from services.embedder import recipe
from services.embedder.models.base import (
    ServedModel,
    cast,
    load_tokenizer,
    parameter_bytes,
    read_json,
    right_padded,
)

SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = recipe.DEFAULT_TASK


def body_text(instruction: str, query: str, document: str) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


def _head_rows(lm, ids: list[int]) -> mx.array:
    head = lm.model.embed_tokens if lm.args.tie_word_embeddings else lm.lm_head
    rows = mx.array(ids)
    if isinstance(head, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return mx.dequantize(
            head.weight[rows],
            head.scales[rows],
            head.biases[rows] if head.get("biases") is not None else None,
            group_size=head.group_size,
            bits=head.bits,
            mode=head.mode,
        )
    return head.weight[rows]


class Qwen3Reranker(ServedModel):
    def __init__(self, path: Path, *, name: str, dtype: str = "float32", max_input_tokens: int = 0):
        # mlx-lm requires the key; Hugging Face's Qwen3 reads its absence as an untied head.
        tied = bool((read_json(path / "config.json", {}) or {}).get("tie_word_embeddings", False))
        lm, config = load_model(path, model_config={"tie_word_embeddings": tied})
        self.tokenizer = load_tokenizer(path)
        yes, no = self.tokenizer.token_to_id("yes"), self.tokenizer.token_to_id("no")
        if yes is None or no is None:
            raise FailedPrecondition(
                f"{path}: the tokenizer has no single 'yes'/'no' tokens; is this a Qwen3-Reranker checkpoint?"
            )
        cast(lm, dtype)
        self.rows = _head_rows(lm, [no, yes]).astype(mx.float32)  # [2, hidden]
        if not lm.args.tie_word_embeddings:
            del lm.lm_head  # 150k x hidden we never use
        self.body = lm.model
        mx.eval(self.rows, self.body.parameters())
        self.prefix = self.tokenizer.encode(PREFIX, add_special_tokens=False).ids
        self.suffix = self.tokenizer.encode(SUFFIX, add_special_tokens=False).ids
        self.pad_id = self.tokenizer.token_to_id("<|endoftext|>") or 0
        limit = int(config.get("max_position_embeddings", 8192))
        super().__init__(
            name=name,
            path=path,
            kind="reranker",
            dimensions=0,
            max_input_tokens=min(limit, max_input_tokens) if max_input_tokens else limit,
            dtype=dtype,
            uses_instruction=True,
            default_instruction=DEFAULT_INSTRUCTION,
            nbytes=parameter_bytes(self.body.parameters(), self.rows),
        )

    def pair_ids(self, instruction: str, query: str, documents: list[str]) -> list[list[int]]:
        """prefix + body (truncated to fit, like the model card's code) + suffix."""
        room = self.max_input_tokens - len(self.prefix) - len(self.suffix)
        bodies = self.tokenizer.encode_batch(
            [body_text(instruction, query, d) for d in documents], add_special_tokens=False
        )
        return [[*self.prefix, *e.ids[:room], *self.suffix] for e in bodies]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def forward(self, batch: list[list[int]]) -> np.ndarray:
        ids, lengths = right_padded(batch, self.pad_id)
        last = recipe.last_token_pool(self.body(ids), lengths).astype(mx.float32)  # [B, hidden]
        logits = last @ self.rows.T  # [B, 2] = (no, yes)
        score = mx.sigmoid(logits[:, 1] - logits[:, 0])  # softmax -> P(yes)
        mx.eval(score)
        return np.array(score)[:, None]
