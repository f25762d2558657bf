"""An independent plain-numpy extended mind transformer, written from docs/extended-mind.md and the
Hugging Face Llama / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE / Mixtral definitions (not from the MLX
code under test). Quantized checkpoints run on their dequantized weights (``dequantized_weights``).

Everything is float64 on one unbatched sequence, recomputed from scratch (no KV cache), with
both formulations of memory attention: the reference's block-diagonal mask over the concatenated
retrieved memories, and the per-query gather.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from extmind.tiny_models import read_weights


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> np.ndarray:
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if not scaling:
        return inv
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "default":
        return inv
    if kind != "llama3":
        raise NotImplementedError(kind)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    low_wavelen, high_wavelen = old / low, old / high
    out = np.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, out)


def rope(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """HF rotate_half RoPE; x [..., T, d], positions [T]."""
    ang = positions[:, None].astype(np.float64) * inv_freq[None, :]
    cos, sin = np.cos(ang), np.sin(ang)
    cos, sin = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
    half = x.shape[-1] // 2
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _softmax(z):
    z = z - np.max(z, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _normalize(a):
    return a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)


def attend_over_picks(q, k, v, allowed, rows, dots, bank_values, scale):
    """float64 reference of one attention layer's core given each query's retrieved memories: one
    softmax per query head and token over its memories (rows [B, H, L, k], -1 = masked; raw q . k
    ``dots``) and the local positions ``allowed`` [B, L, S] bool. q [B, H, L, d], k / v
    [B, KVH, S, d], bank_values [KVH, N, d]. -> (out [B, L, H * d], each head's weight on its
    memories [B, H, L]), as ``fused_attention.attend`` / ``prefill_attention.attend`` return them."""
    q, k, v, bank_values = (np.asarray(a, dtype=np.float64) for a in (q, k, v, bank_values))
    B, H, L, d = q.shape
    rep = H // k.shape[1]
    out = np.zeros((B, L, H * d))
    mass = np.zeros((B, H, L))
    for b, h, t in np.ndindex(B, H, L):
        g = h // rep
        mem = np.where(rows[b, h, t] >= 0, dots[b, h, t] * scale, -np.inf)
        local = np.where(allowed[b, t], k[b, g] @ q[b, h, t] * scale, -np.inf)
        w = _softmax(np.concatenate([mem, local]))
        vals = np.concatenate([bank_values[g, np.maximum(rows[b, h, t], 0)], v[b, g]])
        out[b, t, h * d : (h + 1) * d] = w @ vals
        mass[b, h, t] = w[: len(mem)].sum()
    return out, mass


class Retrievals:
    """Per-row retrieval counts of the reference, with the slack a float32 implementation may take.

    Top-k is a discrete choice: rows whose cosine is within ``eps`` of the k-th / (k+1)-th cosine or
    of the threshold (ties such as repeated tokens, whose layer-0 keys are identical, or rounding
    between BLAS builds) may be swapped legitimately; no other row may. Per row: ``lower`` counts the
    retrievals that are certain, ``upper`` those that are possible, ``exact`` the reference's own
    (stable-sorted) choice. ``off_by_one`` counts what a top-k with an off-by-one bug (rank k+1
    taken instead of rank k) would retrieve: tests show that the comparison rejects it.
    """

    def __init__(self, eps: float = 1e-4):
        self.eps = eps
        self.lower: dict[int, int] = {}
        self.upper: dict[int, int] = {}
        self.exact: dict[int, int] = {}
        self.off_by_one: dict[int, int] = {}
        self.events = 0  # (query token, head) retrievals recorded
        self.ambiguous = 0  # of those, how many had a row inside the slack

    @staticmethod
    def _add(counts: dict, rows) -> None:
        for r in rows:
            counts[int(r)] = counts.get(int(r), 0) + 1

    def add(self, sim: np.ndarray, k: int, threshold: float | None) -> None:
        """sim [N] float64: one query head's cosines against every memory row; k = min(top_k, N)."""
        eps, n = self.eps, sim.shape[0]
        order = np.argsort(-sim, kind="stable")
        kth = sim[order[k - 1]]
        after = sim[order[k]] if k < n else -np.inf  # the best row left out
        kept_for_sure = np.ones(n, bool) if threshold is None else sim > threshold + eps
        kept_maybe = np.ones(n, bool) if threshold is None else sim > threshold - eps
        sure = (sim > after + eps) & kept_for_sure
        maybe = (sim >= kth - eps) & kept_maybe
        self.events += 1
        self.ambiguous += int(sure.sum() != maybe.sum())
        self._add(self.lower, np.flatnonzero(sure))
        self._add(self.upper, np.flatnonzero(maybe))
        exact = order[:k][np.ones(k, bool) if threshold is None else sim[order[:k]] > threshold]
        self._add(self.exact, exact)
        if k < n:  # the planted bug: rank k+1 instead of rank k
            wrong = np.concatenate([order[: k - 1], order[k : k + 1]])
            self._add(self.off_by_one, wrong[np.ones(k, bool) if threshold is None else sim[wrong] > threshold])

    def mismatches(self, got: dict[int, int]) -> list[str]:
        """Rows whose count in ``got`` lies outside [lower, upper]: empty when ``got`` is possible."""
        bad = []
        for r in sorted(set(got) | set(self.upper)):
            g, lo, hi = got.get(r, 0), self.lower.get(r, 0), self.upper.get(r, 0)
            if not lo <= g <= hi:
                bad.append(f"row {r}: {g} retrievals, the reference allows {lo}..{hi}")
        return bad


class Layer:
    """One attention layer's weights (HF layout [out, in]) and shape."""

    def __init__(self, w: dict, *, n_heads: int, n_kv_heads: int, head_dim: int, inv_freq, eps=1e-6):
        self.w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
        self.h, self.kvh, self.d = n_heads, n_kv_heads, head_dim
        self.inv_freq = inv_freq
        self.eps = eps

    def qkv(self, x: np.ndarray):
        """x [T, hidden] -> pre-RoPE q [H, T, d], k [KVH, T, d], v [KVH, T, d] (k after k_norm)."""
        T = x.shape[0]
        w = self.w

        def proj(name, heads):
            y = x @ w[f"{name}.weight"].T
            if f"{name}.bias" in w:
                y = y + w[f"{name}.bias"]
            return y.reshape(T, heads, self.d)

        q, k, v = proj("q_proj", self.h), proj("k_proj", self.kvh), proj("v_proj", self.kvh)
        if "q_norm.weight" in w:
            q = rms_norm(q, w["q_norm.weight"], self.eps)
            k = rms_norm(k, w["k_norm.weight"], self.eps)
        return q.transpose(1, 0, 2), k.transpose(1, 0, 2), v.transpose(1, 0, 2)

    def forward(
        self,
        x,
        mem_k=None,
        mem_v=None,
        top_k=10,
        threshold=None,
        form="gather",
        hits=None,
        hits_from=0,
        shares=None,
        picks=None,
    ):
        """x [T, hidden] at positions 0..T-1 -> attention output [T, hidden]. mem_k/mem_v are raw
        [KVH, N, d]. ``hits`` (a :class:`Retrievals`) records the retrievals of the queries at
        positions >= ``hits_from`` (citations); ``shares`` (a list) receives, for the same queries
        and every head, the softmax weight on the memories (the attention-mass metric); ``picks``
        (a list) receives, for the same queries and every head, (rows, their softmax weights) of
        the retrieved memories that the threshold kept."""
        T = x.shape[0]
        q, k, v = self.qkv(x)
        pos = np.arange(T)
        q, k = rope(q, pos, self.inv_freq), rope(k, pos, self.inv_freq)
        scale = 1.0 / math.sqrt(self.d)
        causal = np.tril(np.ones((T, T), dtype=bool))
        rep = self.h // self.kvh
        out = np.zeros((self.h, T, self.d))
        for h in range(self.h):
            g = h // rep
            local = q[h] @ k[g].T * scale
            if mem_k is None or top_k == 0 or mem_k.shape[1] == 0:
                out[h] = _softmax(np.where(causal, local, -np.inf)) @ v[g]
                continue
            Km, Vm = mem_k[g].astype(np.float64), mem_v[g].astype(np.float64)
            kk = min(top_k, Km.shape[0])
            sim = _normalize(q[h]) @ _normalize(Km).T  # [T, N] exact cosine
            idx = np.argsort(-sim, axis=-1, kind="stable")[:, :kk]  # each query's own top-k
            keep = np.take_along_axis(sim, idx, -1) > threshold if threshold is not None else np.ones_like(idx, bool)
            if hits is not None:
                for t in range(hits_from, T):
                    hits.add(sim[t], kk, threshold)
            if form == "gather":
                mem = np.einsum("td,tkd->tk", q[h], Km[idx]) * scale  # raw dot, not the cosine
                mem = np.where(keep, mem, -np.inf)
                w = _softmax(np.concatenate([mem, np.where(causal, local, -np.inf)], -1))
                if shares is not None:
                    shares.extend(float(w[t, :kk].sum()) for t in range(hits_from, T))
                if picks is not None:
                    picks.extend((idx[t][keep[t]], w[t, :kk][keep[t]]) for t in range(hits_from, T))
                out[h] = np.einsum("tk,tkd->td", w[:, :kk], Vm[idx]) + w[:, kk:] @ v[g]
            elif form == "block":
                # The reference: all retrieved memories concatenated in front of the local keys,
                # a block-diagonal mask lets query i see only its own k memories.
                K = np.concatenate([Km[idx.reshape(-1)], k[g]], 0)
                V = np.concatenate([Vm[idx.reshape(-1)], v[g]], 0)
                mask = np.zeros((T, T * kk + T), dtype=bool)
                for i in range(T):
                    mask[i, i * kk : (i + 1) * kk] = keep[i]
                mask[:, T * kk :] = causal
                w = _softmax(np.where(mask, q[h] @ K.T * scale, -np.inf))
                out[h] = w @ V
            else:
                raise ValueError(form)
        o = out.transpose(1, 0, 2).reshape(T, self.h * self.d) @ self.w["o_proj.weight"].T
        return o


def _silu_mlp(x, gate, up, down):
    g = x @ gate.T
    return ((g / (1 + np.exp(-g))) * (x @ up.T)) @ down.T


class MoE:
    """A mixture-of-experts MLP as the Hugging Face definitions route it: Qwen3-MoE / Qwen2-MoE
    take the top-k of the softmaxed router logits (renormalized when ``norm_topk_prob``; Qwen2-MoE
    adds a shared expert behind a sigmoid gate), Mixtral softmaxes its top-k logits among
    themselves. ``gaps`` receives, per token, the distance between the k-th and the (k+1)-th
    router logit: a route is only comparable across implementations when it is well above their
    rounding."""

    def __init__(self, w: dict, p: str, cfg: dict):
        self.kind = cfg["model_type"]
        if self.kind == "mixtral":
            moe, names, self.k = p + "block_sparse_moe.", ("w1", "w3", "w2"), cfg["num_experts_per_tok"]
        else:
            moe, names, self.k = p + "mlp.", ("gate_proj", "up_proj", "down_proj"), cfg["num_experts_per_tok"]
        self.router = w[moe + "gate.weight"]
        n = self.router.shape[0]
        if moe + "switch_mlp.gate_proj.weight" in w:  # mlx-lm's layout: experts stacked [E, out, in]
            stacked = [w[moe + f"switch_mlp.{m}.weight"] for m in ("gate_proj", "up_proj", "down_proj")]
            self.experts = [tuple(a[e] for a in stacked) for e in range(n)]
        else:  # Hugging Face layout: one module per expert
            self.experts = [tuple(w[f"{moe}experts.{e}.{m}.weight"] for m in names) for e in range(n)]
        self.norm_topk = bool(cfg.get("norm_topk_prob", False))
        self.shared = None
        if moe + "shared_expert_gate.weight" in w:
            self.shared = (
                w[moe + "shared_expert_gate.weight"],
                tuple(w[f"{moe}shared_expert.{m}.weight"] for m in ("gate_proj", "up_proj", "down_proj")),
            )
        self.gaps: list[float] = []

    def __call__(self, x):
        logits = x @ self.router.T  # [T, E]
        score = logits if self.kind == "mixtral" else _softmax(logits)
        order = np.argsort(-logits, axis=-1, kind="stable")  # softmax keeps the order of the logits
        top = order[:, : self.k]
        ranked = np.take_along_axis(logits, order, -1)
        if ranked.shape[1] > self.k:
            self.gaps.extend((ranked[:, self.k - 1] - ranked[:, self.k]).tolist())
        picked = np.take_along_axis(score, top, -1)
        if self.kind == "mixtral":
            gates = _softmax(picked)
        else:
            gates = picked / picked.sum(-1, keepdims=True) if self.norm_topk else picked
        out = np.zeros_like(x)
        for t in range(x.shape[0]):
            for j, e in enumerate(top[t]):
                out[t] += gates[t, j] * _silu_mlp(x[t : t + 1], *self.experts[e])[0]
        if self.shared is not None:
            sg, mlp = self.shared
            out += (1 / (1 + np.exp(-(x @ sg.T)))) * _silu_mlp(x, *mlp)
        return out


def dequantized_weights(path) -> tuple[dict, dict]:
    """(weights by mlx-lm name as float64 numpy, config) of a checkpoint loaded by mlx-lm, every
    quantized weight expanded with ``mx.dequantize`` (what the quantized model multiplies by)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    model, _, cfg = load(str(path), return_config=True)
    w = {}
    for name, m in model.named_modules():
        if "scales" in m:
            full = mx.dequantize(
                m["weight"], m["scales"], m.get("biases"), group_size=m.group_size, bits=m.bits, mode=m.mode
            )
            w[f"{name}.weight"] = np.array(full.astype(mx.float32)).astype(np.float64)
    for name, a in tree_flatten(model.parameters()):
        owner, leaf = name.rsplit(".", 1)
        if f"{owner}.weight" in w and leaf in ("weight", "scales", "biases"):
            continue  # a quantized module's parts: its dequantized weight is in already
        w[name] = np.array(a.astype(mx.float32)).astype(np.float64)
    return w, cfg


class Model:
    """A whole Llama / Qwen2 / Qwen3 / Qwen2-MoE / Qwen3-MoE / Mixtral checkpoint in numpy: a
    directory of Hugging Face safetensors, or ``weights`` + ``config`` (``dequantized_weights``)."""

    def __init__(self, path=None, *, weights: dict | None = None, config: dict | None = None):
        if weights is None:
            path = Path(path)
            cfg = json.loads((path / "config.json").read_text())
            w = {k: v.astype(np.float64) for k, v in read_weights(path / "model.safetensors").items()}
        else:
            cfg, w = config, weights
        self.cfg = cfg
        self.eps = cfg["rms_norm_eps"]
        h, kvh = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        split = cfg["model_type"] in ("qwen2", "qwen2_moe", "mixtral")  # they ignore a config head_dim
        d = cfg["hidden_size"] // h if split else cfg.get("head_dim") or cfg["hidden_size"] // h
        inv = rope_inv_freq(d, cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling"))
        self.embed = w["model.embed_tokens.weight"]
        self.norm = w["model.norm.weight"]
        self.lm_head = w.get("lm_head.weight", self.embed) if not cfg.get("tie_word_embeddings") else self.embed
        self.layers = []
        self.moes: list[MoE] = []
        for i in range(cfg["num_hidden_layers"]):
            p = f"model.layers.{i}."
            attn = {k[len(p + "self_attn.") :]: v for k, v in w.items() if k.startswith(p + "self_attn.")}
            if p + "mlp.gate.weight" in w or p + "block_sparse_moe.gate.weight" in w:
                self.moes.append(MoE(w, p, cfg))
                mlp = self.moes[-1]
            else:
                dense = (w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
                mlp = lambda x, dense=dense: _silu_mlp(x, *dense)  # noqa: E731
            self.layers.append(
                {
                    "attn": Layer(attn, n_heads=h, n_kv_heads=kvh, head_dim=d, inv_freq=inv, eps=self.eps),
                    "in_norm": w[p + "input_layernorm.weight"],
                    "post_norm": w[p + "post_attention_layernorm.weight"],
                    "mlp": mlp,
                }
            )

    def route_gaps(self) -> list[float]:
        """Every router decision's gap so far (see MoE); empty for a dense model."""
        return [g for m in self.moes for g in m.gaps]

    def forward(
        self,
        tokens,
        memory=None,
        top_k=10,
        threshold=None,
        layers=None,
        capture=None,
        hits=None,
        hits_from=0,
        shares=None,
        picks=None,
    ):
        """tokens [T] -> logits [T, vocab]. memory: per layer (keys, values) raw [KVH, N, d].
        capture: a list that receives per layer (raw keys, values) [KVH, T, d]. shares: a dict
        layer -> list of memory shares (``Layer.forward``) of the layers that attend to memories."""
        x = self.embed[np.asarray(tokens)]
        for i, L in enumerate(self.layers):
            a = rms_norm(x, L["in_norm"], self.eps)
            if capture is not None:
                _, k, v = L["attn"].qkv(a)
                capture.append((k, v))
            use = memory is not None and (layers is None or i in layers)
            mk, mv = memory[i] if use else (None, None)
            s = shares.setdefault(i, []) if shares is not None and use else None
            p = picks if use else None
            x = x + L["attn"].forward(a, mk, mv, top_k, threshold, hits=hits, hits_from=hits_from, shares=s, picks=p)
            x = x + L["mlp"](rms_norm(x, L["post_norm"], self.eps))
        return rms_norm(x, self.norm, self.eps) @ self.lm_head.T

    def greedy(self, prompt, max_tokens, hits=None, margins=None, **kw):
        """Greedy tokens and their log-probabilities, recomputing the whole sequence each step.
        ``hits`` (a :class:`Retrievals`) records the rows each step's newest query retrieved (the
        step that makes a token); ``margins`` (a list) receives each step's gap between the best
        and the second-best logit: a greedy token is only comparable across implementations when
        that gap is well above their rounding."""
        seq, out, lps = list(prompt), [], []
        for _ in range(max_tokens):
            logits = self.forward(seq, hits=hits, hits_from=len(seq) - 1, **kw)[-1]
            lp = logits - (np.log(np.sum(np.exp(logits - logits.max()))) + logits.max())
            t = int(np.argmax(lp))
            if margins is not None:
                top2 = np.partition(logits, -2)[-2:]
                margins.append(float(top2[1] - top2[0]))
            out.append(t)
            lps.append(float(lp[t]))
            seq.append(t)
        return out, lps
