"""BERT-family sentence encoders on MLX (all-MiniLM-L6-v2 and kin): encoder + mean pooling.

mlx-embeddings has a BERT, but it hard-depends on mlx-vlm (a vision stack); this encoder is
small enough to keep here. Weight names follow Hugging Face's ``BertModel`` and are mapped onto
the short names below in ``sanitize``.
"""

from __future__ import annotations

import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from extmind.errors import FailedPrecondition
from services.embedder import recipe
from services.embedder.models.base import (
    ServedModel,
    cast,
    load_tokenizer,
    parameter_bytes,
    read_json,
    right_padded,
    vocabulary_size,
)


class BertInputEmbeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.position_embeddings = nn.Embedding(c["max_position_embeddings"], c["hidden_size"])
        self.token_type_embeddings = nn.Embedding(c.get("type_vocab_size", 2), c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c.get("layer_norm_eps", 1e-12))

    def __call__(self, ids: mx.array) -> mx.array:
        positions = mx.arange(ids.shape[1])[None, :]
        # Single-segment input: token type 0 everywhere.
        h = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(h)


class Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        d, eps = c["hidden_size"], c.get("layer_norm_eps", 1e-12)
        self.heads = c["num_attention_heads"]
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out, self.attn_norm = nn.Linear(d, d), nn.LayerNorm(d, eps=eps)
        self.ffn_in, self.ffn_out = nn.Linear(d, c["intermediate_size"]), nn.Linear(c["intermediate_size"], d)
        self.ffn_norm = nn.LayerNorm(d, eps=eps)
        if c.get("hidden_act", "gelu") != "gelu":
            raise FailedPrecondition(f"hidden_act {c.get('hidden_act')!r} is not supported (only gelu)")

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, L, D = x.shape

        def heads(t):
            return t.reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        a = mx.fast.scaled_dot_product_attention(q, k, v, scale=(D // self.heads) ** -0.5, mask=mask)
        x = self.attn_norm(x + self.attn_out(a.transpose(0, 2, 1, 3).reshape(B, L, D)))
        return self.ffn_norm(x + self.ffn_out(nn.gelu(self.ffn_in(x))))


class BertEncoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.embeddings = BertInputEmbeddings(config)
        self.layers = [Layer(config) for _ in range(config["num_hidden_layers"])]

    def __call__(self, ids: mx.array, lengths: mx.array) -> mx.array:
        real = mx.arange(ids.shape[1])[None, :] < lengths[:, None]  # [B, L]
        mask = real[:, None, None, :]  # keys only: boolean, no -inf
        h = self.embeddings(ids)
        for layer in self.layers:
            h = layer(h, mask)
        return recipe.mean_pool(h, real)

    _RENAMES = [
        ("attention.self.query", "query"),
        ("attention.self.key", "key"),
        ("attention.self.value", "value"),
        ("attention.output.dense", "attn_out"),
        ("attention.output.LayerNorm", "attn_norm"),
        ("intermediate.dense", "ffn_in"),
        ("output.dense", "ffn_out"),
        ("output.LayerNorm", "ffn_norm"),
    ]

    def sanitize(self, weights: dict) -> dict:
        out = {}
        for k, v in weights.items():
            k = re.sub(r"^(bert\.|model\.|0\.auto_model\.)", "", k)
            if k.startswith(("pooler.", "cls.")) or k.endswith("position_ids"):
                continue  # unused by mean pooling
            k = k.replace("encoder.layer.", "layers.")
            for old, new in self._RENAMES:
                k = k.replace(f".{old}.", f".{new}.")
            k = k.replace(".gamma", ".weight").replace(".beta", ".bias")
            out[k] = v
        return out


class BertEmbedder(ServedModel):
    def __init__(self, path: Path, *, name: str, dtype: str = "float32", max_input_tokens: int = 0):
        config = read_json(path / "config.json")
        pooling = read_json(path / "1_Pooling" / "config.json", {"pooling_mode_mean_tokens": True})
        if not pooling.get("pooling_mode_mean_tokens"):
            raise FailedPrecondition(f"{path}: only mean pooling is supported for BERT-family models")
        st = read_json(path / "sentence_bert_config.json", {})
        limit = int(st.get("max_seq_length") or config["max_position_embeddings"])
        module = BertEncoder(config)
        weights = {}
        for f in sorted(path.glob("*.safetensors")):
            weights.update(mx.load(str(f)))
        if not weights:
            raise FailedPrecondition(f"{path} holds no *.safetensors weights")
        module.load_weights(list(module.sanitize(weights).items()), strict=True)
        cast(module, dtype)
        mx.eval(module.parameters())
        self.module = module
        self.tokenizer = load_tokenizer(path)
        self.pad_id = int(config.get("pad_token_id") or 0)
        super().__init__(
            name=name,
            path=path,
            kind="embedding",
            dimensions=int(config["hidden_size"]),
            max_input_tokens=min(limit, max_input_tokens) if max_input_tokens else limit,
            dtype=dtype,
            vocab_size=vocabulary_size(self.tokenizer, int(config["vocab_size"])),
            nbytes=parameter_bytes(module.parameters()),
        )
        # What the tokenizer wraps every text in ([CLS] and [SEP]), read from the tokenizer itself.
        wrap = self.tokenizer.encode("").ids
        self._first, self._last = (wrap[0], wrap[-1]) if len(wrap) >= 2 else (None, None)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts)]  # [CLS] ... [SEP]

    def with_special_tokens(self, ids: list[int]) -> list[int]:
        ids = list(ids)
        if self._first is None:
            return ids
        if not ids or ids[0] != self._first:
            ids.insert(0, self._first)
        if len(ids) == 1 or ids[-1] != self._last:
            ids.append(self._last)
        return ids

    def forward(self, batch: list[list[int]]) -> np.ndarray:
        ids, lengths = right_padded(batch, self.pad_id)
        out = self.module(ids, lengths).astype(mx.float32)
        mx.eval(out)
        return np.array(out)
