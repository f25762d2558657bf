"""Tiny random-weight checkpoints in Hugging Face layout, built with numpy only.

No model hub is reachable from CI or an offline machine, so tests, benchmarks and the offline
cluster build small models here and load them through the same code path as real checkpoints
(``config.json`` + ``model.safetensors`` + a ``tokenizers``-made ``tokenizer.json``). PyTorch and
transformers load the same directories as the independent reference.

    build_llama(path, rope_scaling="llama3")   # LlamaForCausalLM (Llama 3 style tokenizer)
    build_qwen3(path, embedding_layout=True)   # Qwen3-Embedding layout: no "model." prefix, no head
    build_bert(path)                           # BertModel + sentence-transformers mean pooling
    build_chain_llama(path, {a: b, b: eos})    # LlamaForCausalLM whose greedy next token is chosen
    build_qwen2(path)                          # Qwen2ForCausalLM
    (the mixtures of experts and the table of every decoder by model type: extmind/tiny_moe_models.py)

Their tokenizers come from extmind/tiny_tokenizers.py. ``dtype="float16"`` or ``"bfloat16"`` writes
the weights in that dtype (bfloat16: drawn in float32, rounded to nearest even); ``read_weights``
reads any of them back into numpy.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from extmind.tensor import bf16_bits_to_float32, float32_to_bf16_bits
from extmind.tiny_tokenizers import _write_json, build_tokenizer


def _decoder_weights(
    rng,
    *,
    prefix: str,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    qk_norm: bool,
    std: float,
    dtype,
    qkv_bias: bool = False,
    moe: dict | None = None,
    embed_std: float = 0.5,
) -> dict:
    """Weights of a decoder in HF layout. ``moe`` (None = a dense SwiGLU MLP in every layer):
    dict(kind="qwen" | "qwen2" | "mixtral", experts, intermediate, shared_intermediate) for the
    Qwen3-MoE / Qwen2-MoE (plus a gated shared expert) / Mixtral expert layouts."""

    def lin(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim)) * std).astype(dtype)

    def norm(n):  # near 1 but not exactly, so a missed norm shows up in tests
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(dtype)

    w = {
        f"{prefix}embed_tokens.weight": (rng.standard_normal((vocab, hidden)) * embed_std).astype(dtype),
        f"{prefix}norm.weight": norm(hidden),
    }
    for i in range(layers):
        p = f"{prefix}layers.{i}."
        w[p + "self_attn.q_proj.weight"] = lin(heads * head_dim, hidden)
        w[p + "self_attn.k_proj.weight"] = lin(kv_heads * head_dim, hidden)
        w[p + "self_attn.v_proj.weight"] = lin(kv_heads * head_dim, hidden)
        w[p + "self_attn.o_proj.weight"] = lin(hidden, heads * head_dim)
        if qkv_bias:
            for name, n in (("q_proj", heads), ("k_proj", kv_heads), ("v_proj", kv_heads)):
                w[p + f"self_attn.{name}.bias"] = (rng.standard_normal(n * head_dim) * 0.1).astype(dtype)
        if qk_norm:
            w[p + "self_attn.q_norm.weight"] = norm(head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(head_dim)
        if moe is None:
            w[p + "mlp.gate_proj.weight"] = lin(intermediate, hidden)
            w[p + "mlp.up_proj.weight"] = lin(intermediate, hidden)
            w[p + "mlp.down_proj.weight"] = lin(hidden, intermediate)
        else:
            w.update(_moe_weights(lin, p, hidden, **moe))
        w[p + "input_layernorm.weight"] = norm(hidden)
        w[p + "post_attention_layernorm.weight"] = norm(hidden)
    return w


def _moe_weights(lin, p: str, hidden: int, *, kind: str, experts: int, intermediate: int, shared_intermediate=0):
    # The router is scaled up so that its logits spread over a few units: its top-k choices then
    # have clear margins (a near tie between two experts could route a float32 run and a float64
    # reference differently) without saturating the softmax.
    if kind == "mixtral":
        w = {p + "block_sparse_moe.gate.weight": lin(experts, hidden) * 3}
        for e in range(experts):
            q = f"{p}block_sparse_moe.experts.{e}."
            w[q + "w1.weight"] = lin(intermediate, hidden)  # gate
            w[q + "w2.weight"] = lin(hidden, intermediate)  # down
            w[q + "w3.weight"] = lin(intermediate, hidden)  # up
        return w
    w = {p + "mlp.gate.weight": lin(experts, hidden) * 3}
    for e in range(experts):
        q = f"{p}mlp.experts.{e}."
        w[q + "gate_proj.weight"] = lin(intermediate, hidden)
        w[q + "up_proj.weight"] = lin(intermediate, hidden)
        w[q + "down_proj.weight"] = lin(hidden, intermediate)
    if kind == "qwen2":
        w[p + "mlp.shared_expert.gate_proj.weight"] = lin(shared_intermediate, hidden)
        w[p + "mlp.shared_expert.up_proj.weight"] = lin(shared_intermediate, hidden)
        w[p + "mlp.shared_expert.down_proj.weight"] = lin(hidden, shared_intermediate)
        w[p + "mlp.shared_expert_gate.weight"] = lin(1, hidden) * 5
    elif kind != "qwen":
        raise ValueError(f"unknown MoE kind {kind!r}: qwen, qwen2 or mixtral")
    return w


def _np_dtype(dtype: str):
    """The numpy dtype weights are drawn in: bfloat16 ones are drawn in float32 and rounded to
    bfloat16 when saved (numpy has no bfloat16)."""
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError("tiny checkpoints are float32, float16 or bfloat16")
    return np.dtype("float32" if dtype == "bfloat16" else dtype)


_SAFETENSORS_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def _save_weights(w: dict, path: Path, dtype: str) -> None:
    """``model.safetensors``; a bfloat16 checkpoint is written by hand (safetensors' numpy API has
    no bfloat16): the format is an 8-byte little-endian header size, a JSON header, raw bytes."""
    if dtype != "bfloat16":
        save_file(w, str(path), metadata={"format": "pt"})
        return
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name in sorted(w):
        data = float32_to_bf16_bits(np.asarray(w[name], np.float32)).tobytes()
        header[name] = {"dtype": "BF16", "shape": list(w[name].shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for data in blobs:
            f.write(data)


def read_weights(path) -> dict[str, np.ndarray]:
    """A float32 / float16 / bfloat16 ``*.safetensors`` file -> {name: numpy array}; bfloat16
    tensors come back as float32 (exactly: bfloat16 is the upper half of a float32)."""
    raw = Path(path).read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + size])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        dt = _SAFETENSORS_DTYPES[info["dtype"]]
        a = np.frombuffer(raw, dt, (hi - lo) // dt.itemsize, 8 + size + lo).reshape(info["shape"])
        out[name] = bf16_bits_to_float32(a) if info["dtype"] == "BF16" else a
    return out


def build_llama(
    path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate: int | None = None,
    vocab_size: int = 512,
    rope_scaling: str | None = "llama3",
    rope_theta: float = 10000.0,
    max_position: int = 4096,
    tie_word_embeddings: bool = False,
    std: float = 0.08,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """A random LlamaForCausalLM. ``rope_scaling="llama3"`` uses Llama 3.1 scaling with a small
    original context so that it changes the frequencies of a tiny head_dim."""
    path = Path(path)
    tok = build_tokenizer(path, "llama", vocab_size)
    vocab = tok["vocab_size"]
    head_dim = head_dim or hidden // heads
    intermediate = intermediate or 2 * hidden
    rng = np.random.default_rng(seed)
    dt = _np_dtype(dtype)
    w = _decoder_weights(
        rng,
        prefix="model.",
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        qk_norm=False,
        std=std,
        dtype=dt,
    )
    if not tie_word_embeddings:
        w["lm_head.weight"] = (rng.standard_normal((vocab, hidden)) * std).astype(dt)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": max_position,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": tok["bos"],
        "eos_token_id": tok["eos_ids"],
        "pad_token_id": tok["pad"],
    }
    if rope_scaling == "llama3":
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    elif rope_scaling is not None:
        raise ValueError("rope_scaling is 'llama3' or None")
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", {"bos_token_id": tok["bos"], "eos_token_id": tok["eos_ids"]})
    _save_weights(w, path / "model.safetensors", dtype)
    return path


def build_qwen3(
    path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    intermediate: int | None = None,
    vocab_size: int = 512,
    embedding_layout: bool = False,
    tie_word_embeddings: bool = True,
    rope_theta: float = 1000000.0,
    max_position: int = 32768,
    std: float = 0.08,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """A random Qwen3 checkpoint. ``embedding_layout=True`` writes it like the official
    Qwen3-Embedding releases: body weights without the ``model.`` prefix and no LM head."""
    path = Path(path)
    tok = build_tokenizer(path, "qwen3", vocab_size)
    vocab = tok["vocab_size"]
    intermediate = intermediate or 2 * hidden
    rng = np.random.default_rng(seed)
    dt = _np_dtype(dtype)
    w = _decoder_weights(
        rng,
        prefix="" if embedding_layout else "model.",
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        qk_norm=True,
        std=std,
        dtype=dt,
    )
    if not tie_word_embeddings and not embedding_layout:
        w["lm_head.weight"] = (rng.standard_normal((vocab, hidden)) * std).astype(dt)
    config = {
        "architectures": ["Qwen3Model" if embedding_layout else "Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": max_position,
        "rms_norm_eps": 1e-6,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": tok["pad"],
        "eos_token_id": tok["eos"],
        "pad_token_id": tok["pad"],
    }
    _write_json(path / "config.json", config)
    _save_weights(w, path / "model.safetensors", dtype)
    return path


def build_bert(
    path,
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    vocab_size: int = 400,
    max_position: int = 128,
    std: float = 0.08,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """A random BertModel with sentence-transformers files for mean pooling (like all-MiniLM-L6-v2)."""
    path = Path(path)
    tok = build_tokenizer(path, "bert", vocab_size)
    vocab = tok["vocab_size"]
    intermediate = intermediate or 4 * hidden
    rng = np.random.default_rng(seed)
    dt = _np_dtype(dtype)

    def lin(prefix, out_dim, in_dim):
        return {
            f"{prefix}.weight": (rng.standard_normal((out_dim, in_dim)) * std).astype(dt),
            f"{prefix}.bias": (rng.standard_normal(out_dim) * 0.02).astype(dt),
        }

    def ln(prefix):
        return {
            f"{prefix}.weight": (1.0 + 0.1 * rng.standard_normal(hidden)).astype(dt),
            f"{prefix}.bias": (0.02 * rng.standard_normal(hidden)).astype(dt),
        }

    w = {
        "embeddings.word_embeddings.weight": (rng.standard_normal((vocab, hidden)) * 0.5).astype(dt),
        "embeddings.position_embeddings.weight": (rng.standard_normal((max_position, hidden)) * 0.1).astype(dt),
        "embeddings.token_type_embeddings.weight": (rng.standard_normal((2, hidden)) * 0.1).astype(dt),
        **ln("embeddings.LayerNorm"),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("query", "key", "value"):
            w.update(lin(p + f"attention.self.{name}", hidden, hidden))
        w.update(lin(p + "attention.output.dense", hidden, hidden))
        w.update(ln(p + "attention.output.LayerNorm"))
        w.update(lin(p + "intermediate.dense", intermediate, hidden))
        w.update(lin(p + "output.dense", hidden, intermediate))
        w.update(ln(p + "output.LayerNorm"))
    w.update(lin("pooler.dense", hidden, hidden))
    _write_json(
        path / "config.json",
        {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": intermediate,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0,
            "max_position_embeddings": max_position,
            "type_vocab_size": 2,
            "layer_norm_eps": 1e-12,
            "vocab_size": vocab,
            "pad_token_id": tok["pad"],
            "torch_dtype": dtype,
        },
    )
    _write_json(
        path / "modules.json",
        [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ],
    )
    _write_json(path / "sentence_bert_config.json", {"max_seq_length": max_position, "do_lower_case": False})
    (path / "1_Pooling").mkdir(exist_ok=True)
    _write_json(
        path / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": hidden,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_cls_token": False,
            "pooling_mode_max_tokens": False,
        },
    )
    (path / "2_Normalize").mkdir(exist_ok=True)
    _save_weights(w, path / "model.safetensors", dtype)
    return path


def build_chain_llama(
    path,
    chain: dict[int, int],
    *,
    tokenizer: str = "llama",
    default: int | None = None,
    margin: float = 30.0,
    vocab_size: int = 512,
) -> Path:
    """A LlamaForCausalLM whose next token is fixed by construction: after token ``t`` the
    logit of ``chain[t]`` is ``margin`` and every other logit 0 (``default``, the EOS token
    when None, follows tokens not in ``chain``). Greedy decoding from a prompt ending in ``t``
    then emits ``chain[t], chain[chain[t]], ...`` exactly, whatever came before.

    How: one-hot token embeddings (hidden size = vocabulary size); attention ``o_proj`` and MLP
    ``down_proj`` are zero, so each block adds nothing to the residual stream; the final RMS
    norm (weights 1) scales the one-hot row by sqrt(hidden); ``lm_head`` maps row ``t`` to
    ``chain[t]``. ``tokenizer``: "llama" (Llama 3 style) or "qwen3" (ChatML) from
    ``build_tokenizer``, which is deterministic: build it first to look token ids up.
    """
    path = Path(path)
    tok = build_tokenizer(path, tokenizer, vocab_size)
    vocab = tok["vocab_size"]
    default = tok["eos"] if default is None else default
    bad = [t for pair in chain.items() for t in pair if not 0 <= t < vocab]
    bad += [] if 0 <= default < vocab else [default]
    if bad:
        raise ValueError(f"token ids {bad} are outside the vocabulary [0, {vocab})")
    hidden, head_dim, intermediate = vocab, 8, 8
    rng = np.random.default_rng(0)
    w = {
        "model.embed_tokens.weight": np.eye(vocab, hidden, dtype=np.float32),
        "model.norm.weight": np.ones(hidden, np.float32),
        "model.layers.0.input_layernorm.weight": np.ones(hidden, np.float32),
        "model.layers.0.post_attention_layernorm.weight": np.ones(hidden, np.float32),
        "model.layers.0.self_attn.o_proj.weight": np.zeros((hidden, head_dim), np.float32),
        "model.layers.0.mlp.down_proj.weight": np.zeros((hidden, intermediate), np.float32),
    }
    for name, shape in (
        ("self_attn.q_proj", (head_dim, hidden)),
        ("self_attn.k_proj", (head_dim, hidden)),
        ("self_attn.v_proj", (head_dim, hidden)),
        ("mlp.gate_proj", (intermediate, hidden)),
        ("mlp.up_proj", (intermediate, hidden)),
    ):
        w[f"model.layers.0.{name}.weight"] = (rng.standard_normal(shape) * 0.1).astype(np.float32)
    follow = np.full(vocab, default)
    for t, nxt in chain.items():
        follow[t] = nxt
    head = np.zeros((vocab, hidden), np.float32)
    # After the final norm the residual row is one-hot times sqrt(hidden).
    head[follow, np.arange(vocab)] = margin / np.sqrt(hidden)
    w["lm_head.weight"] = head
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": 1,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "bos_token_id": tok["bos"],
        "eos_token_id": tok["eos_ids"],
        "pad_token_id": tok["pad"],
    }
    _write_json(path / "config.json", config)
    _save_weights(w, path / "model.safetensors", "float32")
    return path


def _build_decoder(
    path,
    *,
    model_type: str,
    architecture: str,
    tokenizer: str,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    intermediate: int,
    vocab_size: int,
    qk_norm: bool,
    qkv_bias: bool,
    tie_word_embeddings: bool,
    moe: dict | None,
    config: dict,
    std: float,
    seed: int,
    dtype: str,
    embed_std: float = 0.5,
) -> Path:
    """A random decoder of ``model_type`` whose config.json has the keys of the official release
    (``config`` adds the architecture's own keys to the common ones)."""
    path = Path(path)
    tok = build_tokenizer(path, tokenizer, vocab_size)
    vocab = tok["vocab_size"]
    rng = np.random.default_rng(seed)
    dt = _np_dtype(dtype)
    w = _decoder_weights(
        rng,
        prefix="model.",
        vocab=vocab,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=intermediate,
        qk_norm=qk_norm,
        std=std,
        dtype=dt,
        qkv_bias=qkv_bias,
        moe=moe,
        embed_std=embed_std,
    )
    if not tie_word_embeddings:
        w["lm_head.weight"] = (rng.standard_normal((vocab, hidden)) * std).astype(dt)
    bos = tok["bos"] if tok["bos"] is not None else tok["pad"]
    full = {
        "architectures": [architecture],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "hidden_act": "silu",
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": bos,
        "eos_token_id": tok["eos"],
        **config,
    }
    _write_json(path / "config.json", full)
    _write_json(path / "generation_config.json", {"bos_token_id": bos, "eos_token_id": tok["eos_ids"]})
    _save_weights(w, path / "model.safetensors", dtype)
    return path


def build_qwen2(
    path,
    *,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    intermediate=128,
    vocab_size=512,
    std=0.08,
    seed=0,
    dtype="float32",
) -> Path:
    """A random Qwen2ForCausalLM (the Qwen2.5 config keys): q/k/v biases, head_dim = hidden /
    heads, tied embeddings (small, so the tied head's logits do not saturate), ChatML tokenizer."""
    return _build_decoder(
        path,
        embed_std=0.15,
        model_type="qwen2",
        architecture="Qwen2ForCausalLM",
        tokenizer="qwen3",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate=intermediate,
        vocab_size=vocab_size,
        qk_norm=False,
        qkv_bias=True,
        tie_word_embeddings=True,
        moe=None,
        config={
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "max_position_embeddings": 32768,
            "max_window_layers": layers,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "use_cache": True,
            "use_sliding_window": False,
        },
        std=std,
        seed=seed,
        dtype=dtype,
    )
