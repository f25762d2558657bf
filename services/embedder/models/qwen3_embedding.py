"""Qwen3-Embedding on MLX: mlx-lm's Qwen3 body, last-token pooling.

Official checkpoints name the body weights without the ``model.`` prefix and the 8B config
declares an untied LM head it does not ship; ``sanitize`` maps both onto the body alone so
mlx-lm's loader (quantized MLX checkpoints included) can be reused as is.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import qwen3
from mlx_lm.utils import load_model

from extmind.errors import FailedPrecondition
from services.embedder import recipe
from services.embedder.models.base import (
    ServedModel,
    cast,
    load_tokenizer,
    parameter_bytes,
    right_padded,
    vocabulary_size,
)

END_OF_TEXT = "<|endoftext|>"


class Qwen3EmbeddingModel(nn.Module):
    def __init__(self, args: qwen3.ModelArgs):
        super().__init__()
        self.args = args
        self.model = qwen3.Qwen3Model(args)

    def __call__(self, ids: mx.array, lengths: mx.array) -> mx.array:
        # Right padding + the body's causal mask: real tokens never see the padding.
        return recipe.last_token_pool(self.model(ids), lengths)

    def sanitize(self, weights: dict) -> dict:
        return {
            (k if k.startswith("model.") else f"model.{k}"): v
            for k, v in weights.items()
            if not k.startswith("lm_head.")
        }


class Qwen3Embedder(ServedModel):
    def __init__(self, path: Path, *, name: str, dtype: str = "float32", max_input_tokens: int = 0):
        module, config = load_model(path, get_model_classes=lambda config: (Qwen3EmbeddingModel, qwen3.ModelArgs))
        cast(module, dtype)
        self.module = module
        self.tokenizer = load_tokenizer(path)
        self.end_id = self.tokenizer.token_to_id(END_OF_TEXT)
        if self.end_id is None:
            raise FailedPrecondition(
                f"{path}: the tokenizer has no {END_OF_TEXT} token, which Qwen3-Embedding "
                "pools on; is this a Qwen3-Embedding checkpoint?"
            )
        limit = int(config.get("max_position_embeddings", 32768))
        super().__init__(
            name=name,
            path=path,
            kind="embedding",
            dimensions=int(config["hidden_size"]),
            max_input_tokens=min(limit, max_input_tokens) if max_input_tokens else limit,
            dtype=dtype,
            min_dimensions=min(32, int(config["hidden_size"])),
            uses_instruction=True,
            default_instruction=recipe.DEFAULT_TASK,
            vocab_size=vocabulary_size(self.tokenizer, int(config["vocab_size"])),
            nbytes=parameter_bytes(module.parameters()),
        )

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [recipe.with_end_token(e.ids, self.end_id) for e in self.tokenizer.encode_batch(texts)]

    def with_special_tokens(self, ids: list[int]) -> list[int]:
        return recipe.with_end_token(list(ids), self.end_id)

    def forward(self, batch: list[list[int]]) -> np.ndarray:
        ids, lengths = right_padded(batch, self.end_id)
        out = self.module(ids, lengths).astype(mx.float32)
        mx.eval(out)
        return np.array(out)
