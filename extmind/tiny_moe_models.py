"""Tiny random-weight mixture-of-experts checkpoints (Qwen3-MoE, Qwen2-MoE, Mixtral) in Hugging Face
layout, and the table of every tiny decoder builder by mlx-lm model type. Same conventions as
extmind/tiny_models.py (numpy only, the real configs' keys, ``dtype`` of the weights).

    build_qwen3_moe / build_qwen2_moe / build_mixtral(path)
    DECODER_BUILDERS[model_type](path, seed=1)   # any decoder by mlx-lm model type
"""

from __future__ import annotations

from pathlib import Path

from extmind.tiny_models import _build_decoder, build_llama, build_qwen2, build_qwen3


def build_qwen3_moe(
    path,
    *,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    head_dim=16,
    experts=4,
    experts_per_token=2,
    moe_intermediate=64,
    vocab_size=512,
    std=0.08,
    seed=0,
    dtype="float32",
) -> Path:
    """A random Qwen3MoeForCausalLM (the Qwen3-30B-A3B / Qwen3-Coder config keys): q/k norms, a
    softmax router whose top-k gates are renormalized (``norm_topk_prob``), experts in every layer,
    untied head. The tokenizer's chat template has Qwen3's thinking switch."""
    return _build_decoder(
        path,
        model_type="qwen3_moe",
        architecture="Qwen3MoeForCausalLM",
        tokenizer="qwen3_thinking",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=2 * hidden,
        vocab_size=vocab_size,
        qk_norm=True,
        qkv_bias=False,
        tie_word_embeddings=False,
        moe=dict(kind="qwen", experts=experts, intermediate=moe_intermediate),
        config={
            "attention_bias": False,
            "attention_dropout": 0.0,
            "decoder_sparse_step": 1,
            "head_dim": head_dim,
            "initializer_range": 0.02,
            "max_position_embeddings": 262144,
            "max_window_layers": layers,
            "mlp_only_layers": [],
            "moe_intermediate_size": moe_intermediate,
            "norm_topk_prob": True,
            "num_experts": experts,
            "num_experts_per_tok": experts_per_token,
            "output_router_logits": False,
            "rms_norm_eps": 1e-6,
            "rope_scaling": None,
            "rope_theta": 10000000.0,
            "router_aux_loss_coef": 0.001,
            "sliding_window": None,
            "use_cache": True,
            "use_sliding_window": False,
        },
        std=std,
        seed=seed,
        dtype=dtype,
    )


def build_qwen2_moe(
    path,
    *,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    experts=4,
    experts_per_token=2,
    moe_intermediate=64,
    shared_intermediate=128,
    vocab_size=512,
    std=0.08,
    seed=0,
    dtype="float32",
) -> Path:
    """A random Qwen2MoeForCausalLM (the Qwen1.5-MoE / Qwen2-57B-A14B config keys): q/k/v biases,
    a softmax router without renormalization, and a shared expert behind a sigmoid gate."""
    return _build_decoder(
        path,
        model_type="qwen2_moe",
        architecture="Qwen2MoeForCausalLM",
        tokenizer="qwen3",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate=shared_intermediate,
        vocab_size=vocab_size,
        qk_norm=False,
        qkv_bias=True,
        tie_word_embeddings=False,
        moe=dict(kind="qwen2", experts=experts, intermediate=moe_intermediate, shared_intermediate=shared_intermediate),
        config={
            "attention_dropout": 0.0,
            "decoder_sparse_step": 1,
            "initializer_range": 0.02,
            "max_position_embeddings": 32768,
            "max_window_layers": layers,
            "mlp_only_layers": [],
            "moe_intermediate_size": moe_intermediate,
            "norm_topk_prob": False,
            "num_experts": experts,
            "num_experts_per_tok": experts_per_token,
            "output_router_logits": False,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.001,
            "shared_expert_intermediate_size": shared_intermediate,
            "sliding_window": 32768,
            "use_cache": True,
            "use_sliding_window": False,
        },
        std=std,
        seed=seed,
        dtype=dtype,
    )


def build_mixtral(
    path,
    *,
    hidden=64,
    layers=2,
    heads=4,
    kv_heads=2,
    experts=4,
    experts_per_token=2,
    intermediate=64,
    vocab_size=512,
    std=0.08,
    seed=0,
    dtype="float32",
) -> Path:
    """A random MixtralForCausalLM (the Mixtral-8x7B config keys): the router's top-k logits are
    softmaxed among themselves; experts as w1 (gate) / w2 (down) / w3 (up); a Mistral ``[INST]``
    tokenizer."""
    return _build_decoder(
        path,
        model_type="mixtral",
        architecture="MixtralForCausalLM",
        tokenizer="mistral",
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=hidden // heads,
        intermediate=intermediate,
        vocab_size=vocab_size,
        qk_norm=False,
        qkv_bias=False,
        tie_word_embeddings=False,
        moe=dict(kind="mixtral", experts=experts, intermediate=intermediate),
        config={
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "max_position_embeddings": 32768,
            "num_experts_per_tok": experts_per_token,
            "num_local_experts": experts,
            "output_router_logits": False,
            "rms_norm_eps": 1e-5,
            "rope_theta": 1000000.0,
            "router_aux_loss_coef": 0.02,
            "sliding_window": None,
            "use_cache": True,
        },
        std=std,
        seed=seed,
        dtype=dtype,
    )


# model type -> builder of a tiny random checkpoint of that architecture (keyword arguments: seed,
# dtype, and each builder's own sizes).
DECODER_BUILDERS = {
    "llama": build_llama,
    "qwen2": build_qwen2,
    "qwen3": build_qwen3,
    "qwen3_moe": build_qwen3_moe,
    "qwen2_moe": build_qwen2_moe,
    "mixtral": build_mixtral,
}
