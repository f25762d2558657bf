"""Trains the small fact-recall Llama with extended-mind memories in the loop.

    python -m training.train --out models/extmind-facts-6m            # tokenizer + model, seed 0
    python -m training.train --out DIR --tokenizer-only               # only the tokenizer files
    python -m training.train --out DIR --tokenizer T --init CKPT      # continue from a checkpoint

The committed checkpoint came from five runs on one NVIDIA H200 (MLX CUDA), 1 815 s in all
(``--time-budget``; the lr schedule follows elapsed time, so slower machines make fewer steps):
the exact commands are in models/extmind-facts-6m/README.md. Every run ends by printing the
memory accuracy with 1 to 256 documents in one memory (``memory_curve``).

Everything is generated here from the seed (training/facts.py): a byte-level BPE tokenizer
(HF ``tokenizers``, 4096 tokens, Llama 3 style BOS/EOS) and, for every step, a fresh batch of
fictional people. One step:

1. runs the model over the step's fact documents (each from position 0, BOS first) and keeps
   every layer's raw pre-RoPE keys and values, BOS and padding rows excluded - what Memorize
   stores;
2. runs the questions ("Question: ...?\\nAnswer:" + " value\\n") with extended attention over
   those rows (training/extended_forward.py mirrors the generator's math); cross-entropy on the
   answer tokens. Curriculum (``curriculum``): first each question attends to the whole of its
   own small memory (its document + 3 others), then to memories shared by the whole batch with
   top-k retrieval, ending at the inference setting (top_k 10);
3. adds a language-model loss on the documents and a loss on questions asked with their
   document in the prompt (plain attention), so the model also reads facts in context;
4. optionally: a supervised retrieval loss (``--w-ret``; ``--w-ret-doc`` within the asked
   person's document) that asks query heads for the rows of the answer's sentence, and a subject
   loss (``--w-subj``) that asks every layer's attention input for the person its paragraph or
   question is about - without it the memorized rows do not say whose fact they hold, and a
   shared memory of many people's documents defeats retrieval (model card).

The checkpoint is an ordinary mlx-lm / Hugging Face Llama directory (config.json,
model.safetensors in float16, tokenizer files): ``mlx_lm.load`` and the generator load it as is.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.llama import Model, ModelArgs

if __package__ in (None, ""):  # run as a script (python training/train.py)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from extmind.tiny_tokenizers import added_tokens_decoder, train_byte_level_bpe  # noqa: E402
from training import facts  # noqa: E402
from training.batches import EVAL_SEED, eval_batch, make_batch, to_mx  # noqa: E402
from training.objectives import evaluate, losses, memory_curve  # noqa: E402

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|pad|>"]
BOS, EOS, PAD = "<|begin_of_text|>", "<|eot_id|>", "<|pad|>"


# ------------------------------------------------------------------ tokenizer


def build_tokenizer(path: Path, seed: int, vocab_size: int = 4096, n_people: int = 40_000):
    from tokenizers import processors

    path.mkdir(parents=True, exist_ok=True)
    tok = train_byte_level_bpe(facts.tokenizer_corpus(seed + 1, n_people), vocab_size, SPECIALS)
    ids = {t: tok.token_to_id(t) for t in SPECIALS}
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, ids[BOS])]
    )
    tok.save(str(path / "tokenizer.json"))
    cfg = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": 2048,
                "add_bos_token": True,
                "added_tokens_decoder": added_tokens_decoder(ids, SPECIALS),
                **cfg,
            },
            indent=2,
        )
        + "\n"
    )
    (path / "special_tokens_map.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return tok


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))


# ------------------------------------------------------------------ model


def model_config(tok, a) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim or a.hidden // a.heads,
        "vocab_size": tok.get_vocab_size(),
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": a.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "torch_dtype": "float16",
        "bos_token_id": tok.token_to_id(BOS),
        # The newline that ends every answer is an end token too, so generation stops after it.
        "eos_token_id": [
            tok.token_to_id(EOS),
            tok.token_to_id("<|end_of_text|>"),
            tok.encode("\n", add_special_tokens=False).ids[0],
        ],
        "pad_token_id": tok.token_to_id(PAD),
    }


def save_checkpoint(model, config: dict, tok_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(mx.float16) for k, v in tree_flatten(model.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}, indent=2) + "\n"
    )
    if tok_dir.resolve() != out.resolve():
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (out / name).write_bytes((tok_dir / name).read_bytes())


def curriculum(progress: float, mem_docs: int, own_fraction: float = 0.5) -> tuple[int, tuple[int, ...]]:
    """-> (documents in the step's shared memory, top_k choices); 0 documents = each question
    gets its own small memory (its document and 3 distractors) attended whole, so every row gets
    gradient while retrieval is learned. Then shared memories with ever narrower top-k, ending
    at the inference setting (top_k 10 over thousands of rows)."""
    if progress < own_fraction:
        return 0, (0,)  # each question: its own document + 3 others, attended whole
    if (progress - own_fraction) / (1.0 - own_fraction) < 0.5:
        return mem_docs // 3, (16, 32, 64)
    return mem_docs, (10, 10, 16)


# ------------------------------------------------------------------ main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="checkpoint directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=Path, help="reuse the tokenizer files in this directory")
    p.add_argument("--tokenizer-only", action="store_true")
    p.add_argument("--init", type=Path, help="start from this checkpoint's weights (same shape)")
    p.add_argument("--steps", type=int, default=100_000, help="at most; --time-budget usually ends it first")
    p.add_argument(
        "--time-budget", type=float, default=480, help="seconds of training; the lr schedule ends then (0 = by --steps)"
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--head-dim", type=int, default=0, help="attention head size; 0 = hidden / heads")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument(
        "--naming",
        choices=facts.NAMINGS,
        default="varied",
        help="how documents refer to their person: varied (full name first, then name or pronoun), named "
        "(full name in every sentence), after (each sentence gives the value, then the full name); "
        "training/facts.py NAMING",
    )
    p.add_argument("--own-docs", type=int, default=4, help="documents in each question's own memory (first phase)")
    p.add_argument("--multi", type=float, default=0.3, help="share of memory documents about several people")
    p.add_argument("--max-people", type=int, default=3, help="people in a several-people document, at most")
    p.add_argument("--mem-docs", type=int, default=96, help="documents in each step's shared memory")
    p.add_argument("--questions", type=int, default=128, help="memory questions per step")
    p.add_argument("--ctx-questions", type=int, default=32, help="in-context questions per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--w-lm", type=float, default=0.3)
    p.add_argument("--w-ctx", type=float, default=0.5)
    p.add_argument("--w-ret", type=float, default=0.5, help="weight of the supervised retrieval loss (shared memories)")
    p.add_argument(
        "--w-subj",
        type=float,
        default=0.0,
        help="weight of the subject loss: each layer's attention input names the person its paragraph is about",
    )
    p.add_argument(
        "--w-ret-doc",
        type=float,
        default=0.0,
        help="weight of the retrieval loss within the question's own document (the answer's sentence "
        "among its person's other facts; shared memories, needs --w-ret > 0)",
    )
    p.add_argument("--tau", type=float, default=0.1, help="temperature of the retrieval loss's cosine softmax")
    p.add_argument("--own-fraction", type=float, default=0.5, help="share of training on per-question memories, first")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--eval-n", type=int, default=256)
    p.add_argument(
        "--device-memory-gb",
        type=float,
        default=0,
        help="cap MLX's memory (and its buffer cache) at this; 0 = MLX default",
    )
    a = p.parse_args(argv)
    for ok, complaint in (
        # A loss weight of inf (or NaN) makes the total loss, and every update after it, NaN.
        (
            all(0 <= w < math.inf for w in (a.w_lm, a.w_ctx, a.w_ret, a.w_subj, a.w_ret_doc)),
            "--w-lm, --w-ctx, --w-ret, --w-subj and --w-ret-doc must be >= 0 (finite)",
        ),
        (a.w_ret_doc == 0 or a.w_ret > 0, "--w-ret-doc needs --w-ret > 0"),
        (0 < a.tau < math.inf, "--tau must be > 0 (finite)"),
        (0 <= a.own_fraction < 1, "--own-fraction must be in [0, 1)"),
        (a.device_memory_gb >= 0, "--device-memory-gb must be >= 0 (0 = MLX's default)"),
        (a.head_dim >= 0 and 0 < a.rope_theta < math.inf, "--head-dim must be >= 0 and --rope-theta > 0 (finite)"),
        (a.own_docs >= 1, "--own-docs must be >= 1"),
        # The shared-memory phase starts at --mem-docs / 3 documents; 0 would silently train the
        # per-question phase again instead.
        (a.mem_docs >= 3 and a.questions >= 1, "--mem-docs must be >= 3 and --questions >= 1"),
        # A question's own memory is its document and the next ones of the step's --questions:
        # more than there are would hold documents twice.
        (a.own_fraction == 0 or a.own_docs <= a.questions, "--own-docs must be <= --questions"),
        (a.heads >= 1 and a.kv_heads >= 1 and a.heads % a.kv_heads == 0, "--heads must be a multiple of --kv-heads"),
        (
            (a.head_dim or a.hidden // max(a.heads, 1)) % 2 == 0 and (a.head_dim or a.hidden // max(a.heads, 1)) > 0,
            "the head size (--head-dim, or --hidden / --heads) must be even and > 0 (RoPE rotates pairs)",
        ),
        (0 <= a.multi <= 1 and a.max_people >= 2, "--multi must be in [0, 1] and --max-people >= 2"),
        # ~70 tokens a person: a document of 16 stays well inside the model's 2048 positions
        (a.max_people <= 16, "--max-people must be <= 16 (a document must fit in the model's context)"),
    ):
        if not ok:
            p.error(complaint)
    facts.NAMING = a.naming  # the data of every step and of the progress numbers
    if a.device_memory_gb:  # several runs sharing one GPU: each would otherwise cache up to the whole device
        mx.set_memory_limit(int(a.device_memory_gb * 1e9))
        mx.set_cache_limit(int(a.device_memory_gb * 0.25e9))

    tok_dir = a.tokenizer or a.out
    if a.tokenizer is None:
        t0 = time.time()
        build_tokenizer(a.out, a.seed)
        print(f"tokenizer: {a.out / 'tokenizer.json'} ({time.time() - t0:.1f}s)", flush=True)
    if a.tokenizer_only:
        return 0
    tok = load_tokenizer(tok_dir)
    pad, bos = tok.token_to_id(PAD), tok.token_to_id(BOS)
    config = model_config(tok, a)
    mx.random.seed(a.seed)
    model = Model(ModelArgs.from_dict(config))
    if a.init is not None:
        model.load_weights(str(a.init / "model.safetensors"))
        model.update(tree_map(lambda x: x.astype(mx.float32), model.parameters()))
        print(f"initialised from {a.init}", flush=True)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"model: {n_params / 1e6:.2f}M parameters, device {mx.default_device()}", flush=True)

    opt = optim.AdamW(learning_rate=a.lr, weight_decay=0.01, betas=(0.9, 0.98))
    grad_fn = nn.value_and_grad(model, losses)
    ev = to_mx(eval_batch(tok, EVAL_SEED, a.eval_n, pad, bos))
    pool = ThreadPoolExecutor(1)  # builds the next step's batch while the device runs this one

    def submit(step: int, progress: float):
        n_mem, k_choices = curriculum(progress, a.mem_docs, a.own_fraction)
        k = random.Random(a.seed * 7919 + step).choice(k_choices)
        if n_mem == 0:
            fut = pool.submit(
                make_batch,
                tok,
                a.seed * 1_000_003 + step,
                a.questions,
                a.questions,
                a.ctx_questions,
                pad,
                bos,
                a.own_docs,
                a.multi,
                a.max_people,
            )
        else:
            fut = pool.submit(
                make_batch,
                tok,
                a.seed * 1_000_003 + step,
                n_mem,
                a.questions,
                a.ctx_questions,
                pad,
                bos,
                0,
                a.multi,
                a.max_people,
            )
        return fut, k, n_mem

    t_start = time.time()
    avg = None
    step = 0
    nxt = submit(1, 0.0)
    for step in range(1, a.steps + 1):
        elapsed = time.time() - t_start
        progress = max(step / a.steps, elapsed / a.time_budget if a.time_budget else 0.0)
        if progress >= 1.0:
            break
        lr = a.lr * min(1.0, step / a.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        opt.learning_rate = lr
        fut, top_k, n_mem = nxt
        b = to_mx(fut.result())
        nxt = submit(step + 1, progress)
        (loss, parts), grads = grad_fn(
            model, b, top_k, a.w_lm, a.w_ctx, n_mem == 0, a.w_ret, a.tau, a.w_subj, a.w_ret_doc
        )
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss, parts)
        vals = [float(loss)] + [float(x) for x in parts]
        avg = vals if avg is None else [0.95 * x + 0.05 * y for x, y in zip(avg, vals)]
        if step % 50 == 0 or step == 1:
            print(
                f"step {step} {time.time() - t_start:.0f}s lr {lr:.2e} docs {n_mem} k {top_k} loss {avg[0]:.3f} "
                f"qa {avg[1]:.3f} lm {avg[2]:.3f} ctx {avg[3]:.3f} qa_acc {avg[4]:.2f} ctx_acc {avg[5]:.2f} "
                f"ret {avg[6]:.3f} subj {avg[7]:.3f}",
                flush=True,
            )
        if a.eval_every and step % a.eval_every == 0:
            print(f"eval step {step}: {evaluate(model, ev, 10)}", flush=True)
    train_s = time.time() - t_start
    final = evaluate(model, ev, 10)
    curve = memory_curve(model, tok, pad, bos)
    print(
        f"final step {step} {train_s:.0f}s loss {avg[0]:.3f} qa {avg[1]:.3f} lm {avg[2]:.3f} ctx {avg[3]:.3f} "
        f"eval {final}",
        flush=True,
    )
    print(f"memory accuracy by documents in one shared memory (top_k 10): {curve}", flush=True)
    save_checkpoint(model, config, tok_dir, a.out)
    (a.out / "training_log.json").write_text(
        json.dumps(
            {
                "seed": a.seed,
                "steps": step,
                "seconds": round(train_s),
                "device": str(mx.default_device()),
                "parameters": n_params,
                "final_loss": {
                    "total": avg[0],
                    "qa": avg[1],
                    "lm": avg[2],
                    "ctx": avg[3],
                    "retrieval": avg[6],
                    "subject": avg[7],
                },
                "eval_teacher_forced": final,
                "memory_accuracy_by_documents": curve,
                "args": {k: str(v) for k, v in vars(a).items()},
            },
            indent=2,
        )
        + "\n"
    )
    print(f"saved {a.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
