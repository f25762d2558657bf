"""Embedder benchmark, side by side in one run, with ratios against targets.

    python -m bench.embedder [--quick] [--record]   (--record: append the report to bench/RESULTS.md)

1. Dynamic batching through gRPC: 16 concurrent clients sending one text each to
   ``python -m services.embedder`` vs one in-process batched forward over the same 16 texts
   (target >= 0.8x), and vs the same 16 requests sent one after another (target >= 4x).
2. Tokens/s of the MLX encoder vs sentence-transformers (PyTorch, on CUDA when torch has it,
   else the CPU; ``--torch-device``) on the same all-MiniLM-L6-v2 weights and texts, batch 32.
   MLX's CPU build runs in subprocesses with and without the OpenBLAS preload (aim >= 1.0 with
   OpenBLAS); its CUDA build in one subprocess (no preload). Without sentence-transformers the
   PyTorch row says it was skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import (
    ROOT,
    add_record_flag,
    describe,
    machine,
    median_seconds,
    ratio,
    record,
    table,
    timed_rounds_async,
    verdict,
)

WORDS = (
    "memory model vector search query answer river mountain capital city music train station noon "
    "weather book paper network layer token attention value key store retrieve embed document"
).split()


def make_texts(n: int, seed: int = 0, words: tuple[int, int] = (6, 40)) -> list[str]:
    """Sentences of words[0]..words[1] words (deterministic), like short documents and queries."""
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*words))).capitalize() + "." for _ in range(n)]


# --- 1. dynamic batching --------------------------------------------------------------------------
async def grpc_rounds(port: int, texts: list[str], rounds: int) -> tuple[float, float]:
    """-> (median seconds for 16 concurrent one-text calls, median for the same calls in sequence)."""
    from extmind.channels import aio_channel
    from extmind.v1 import embedder_pb2 as pb
    from extmind.v1 import embedder_pb2_grpc

    async with aio_channel(f"127.0.0.1:{port}") as ch:
        stub = embedder_pb2_grpc.EmbedderServiceStub(ch)
        reqs = [pb.EmbedRequest(inputs=[t]) for t in texts]

        async def concurrent():
            await asyncio.gather(*(stub.Embed(r, timeout=60) for r in reqs))

        async def sequential():
            for r in reqs:
                await stub.Embed(r, timeout=60)

        conc, seq = await timed_rounds_async([concurrent, sequential], rounds)
    return statistics.median(conc), statistics.median(seq)


def in_process_forward(model_spec: str, texts: list[str], rounds: int) -> float:
    """Median seconds of one batched forward over ``texts`` (tokenized like the service does)."""
    from services.common.mlx_thread import MLXThread
    from services.embedder import recipe, registry
    from services.embedder.engine import prepare

    mlx = MLXThread("bench")
    m = mlx.call(registry.load, registry.resolve(model_spec))

    def once():
        ids = prepare(m, texts, "document", "", True)
        recipe.finish(m.forward(ids), m.dimensions, True)

    seconds = median_seconds(lambda: mlx.call(once), rounds)
    mlx.shutdown()
    return seconds


# --- 2. tokens/s vs sentence-transformers ---------------------------------------------------------
def mlx_throughput(
    texts: list[str], batch: int, rounds: int, model: str = "all-minilm-l6-v2", dtype: str = "float32"
) -> dict:
    """Runs in a subprocess so the BLAS can differ: tokens/s of the MLX embedder ``model`` (MiniLM,
    or a checkpoint directory) computing in ``dtype`` (the embedder's ``--dtype``), length-sorted
    batches."""
    from services.common.blas import blas_in_use
    from services.common.mlx_thread import MLXThread
    from services.embedder import recipe, registry

    mlx = MLXThread("bench")
    m = mlx.call(lambda: registry.load(registry.resolve(model), dtype=dtype))
    ids = [
        recipe.truncate_keeping_end_token(s, m.max_input_tokens, truncate=True, index=i)
        for i, s in enumerate(m.token_ids(texts))
    ]
    ids.sort(key=len)
    tokens = sum(len(s) for s in ids)

    def run():
        for i in range(0, len(ids), batch):
            recipe.finish(m.forward(ids[i : i + batch]), m.dimensions, True)

    seconds = median_seconds(lambda: mlx.call(run), rounds)
    mlx.shutdown()
    return {"tokens": tokens, "seconds": seconds, "blas": blas_in_use()}


def torch_throughput(texts: list[str], batch: int, rounds: int, device: str = "auto", path=None) -> dict:
    """sentence-transformers tokens/s on ``device`` ('auto': cuda when torch has it, else cpu) of
    the MiniLM or the checkpoint directory ``path`` (loaded in its config's dtype);
    {'error': why} when PyTorch or sentence-transformers is missing."""
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        return {"error": f"skipped: {e.name} is not installed (pip install sentence-transformers)"}

    from services.embedder.registry import minilm_dir

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"model_kwargs": {"dtype": "auto"}} if path is not None else {}
    model = SentenceTransformer(str(path or minilm_dir()), device=device, **kwargs)
    tokens = sum(len(x) for x in model.tokenizer(texts, truncation=True, max_length=model.max_seq_length)["input_ids"])
    # encode returns numpy arrays, so each timed call includes the wait for the GPU
    seconds = median_seconds(lambda: model.encode(texts, batch_size=batch, normalize_embeddings=True), rounds)
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    return {"tokens": tokens, "seconds": seconds, "where": where}


def qwen3_shaped(root) -> str:
    """A random checkpoint of Qwen3-Embedding-0.6B's shape (hidden 1024, 28 layers, 16 heads over 8
    KV heads of 128, MLP 3072; a small vocabulary), float16, in the official layout plus the
    sentence-transformers files of the release (last-token pooling, normalisation). -> its path."""
    from pathlib import Path

    from extmind.tiny_models import build_qwen3

    path = build_qwen3(
        Path(root) / "Qwen3-Embedding-0.6B-shaped",
        hidden=1024,
        layers=28,
        heads=16,
        kv_heads=8,
        head_dim=128,
        intermediate=3072,
        embedding_layout=True,
        dtype="float16",
        std=0.02,
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 8192, "do_lower_case": False}))
    (path / "1_Pooling").mkdir(exist_ok=True)
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 1024, "pooling_mode_lasttoken": True, "include_prompt": True})
    )
    (path / "2_Normalize").mkdir(exist_ok=True)
    return str(path)


def mlx_subprocess(
    openblas: bool | None, n: int, batch: int, rounds: int, model: str = "all-minilm-l6-v2", dtype: str = "float32"
) -> dict:
    """openblas: True = preloaded, False = the bundled BLAS, None = whatever the build does."""
    from services.common.blas import find_openblas

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("LD_PRELOAD", None)
    env.pop("_EXTMIND_BLAS_REEXEC", None)
    if openblas:
        lib = find_openblas()
        if lib is None:
            return {"error": "OpenBLAS not installed (libopenblas0-pthread)"}
        env["LD_PRELOAD"] = lib
    elif openblas is False:
        env["EXTMIND_OPENBLAS"] = "0"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.embedder",
            "--mlx-throughput",
            "--texts",
            str(n),
            "--batch",
            str(batch),
            "--rounds",
            str(rounds),
            "--throughput-model",
            model,
            "--throughput-dtype",
            dtype,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode != 0:
        return {"error": out.stderr[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="all-minilm-l6-v2", help="model for the batching part")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--texts", type=int, default=128, help="texts for the tokens/s part")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 32 texts for the tokens/s part")
    p.add_argument("--torch-device", default="auto", help="sentence-transformers device: auto (cuda if any), cpu, cuda")
    add_record_flag(p)
    p.add_argument(
        "--throughput-shape",
        choices=("minilm", "qwen3-0.6b"),
        default="minilm",
        help="model of the tokens/s part: the offline MiniLM, or a random float16 checkpoint of "
        "Qwen3-Embedding-0.6B's shape (for GPUs: the CPU build has no fast float16)",
    )
    p.add_argument("--no-batching", action="store_true", help="skip part 1 (the gRPC batching rows)")
    p.add_argument("--mlx-throughput", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--throughput-model", default="all-minilm-l6-v2", help=argparse.SUPPRESS)
    p.add_argument("--throughput-dtype", default="float32", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.rounds, a.texts = 2, 32

    if a.mlx_throughput:  # child mode: BLAS chosen by the parent's environment
        texts = make_texts(a.texts, seed=1)
        print(json.dumps(mlx_throughput(texts, a.batch, a.rounds, a.throughput_model, a.throughput_dtype)))
        return

    from services.common.blas import blas_in_use, ensure_openblas

    ensure_openblas()
    sys.path.insert(0, str(ROOT))
    tmp = tempfile.mkdtemp(prefix="bench-embed-")
    if a.throughput_shape == "minilm":
        tput_model, tput_path, tput_name = "all-minilm-l6-v2", None, "all-MiniLM-L6-v2"
    else:
        tput_path = qwen3_shaped(tmp)
        tput_model, tput_name = tput_path, "a random float16 Qwen3-Embedding-0.6B-shaped checkpoint"
    flags = f" --throughput-shape {a.throughput_shape}" + (" --no-batching" if a.no_batching else "")
    head = (
        f"{describe(machine(blas=blas_in_use()))}. `python -m bench.embedder --rounds {a.rounds}{flags}`; "
        + ("" if a.no_batching else f"model {a.model} for batching (median of {a.rounds} rounds), ")
        + f"{tput_name} for tokens/s."
    )
    rows = []
    try:
        if not a.no_batching:
            rows += batching_rows(a)
        rows += throughput_rows(a, tput_model, tput_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record(
        "embedder", head + "\n\n" + table(["measurement", "result:", "ratio", "target", "met"], rows), write=a.record
    )


def batching_rows(a) -> list:
    """Part 1: 16 concurrent clients of a real embedder service vs in-process and sequential."""
    from extmind.service_procs import ServiceProcess

    rows = []
    # Sentences (compute-bound on a CPU) and short queries (per-call overhead matters more).
    workloads = {
        "sentences of 6-40 words": make_texts(a.clients),
        "queries of 2-5 words": make_texts(a.clients, 2, (2, 5)),
    }
    svc = ServiceProcess(
        "services.embedder",
        ["--model", a.model, "--http-port", "-1"],
        env={"EXTMIND_LOG_LEVEL": "warning"},
        start_timeout=120,
    ).start()
    try:
        measured = {k: asyncio.run(grpc_rounds(svc.port, t, a.rounds)) for k, t in workloads.items()}
    finally:
        svc.stop()
    for label, texts in workloads.items():
        conc, seq = measured[label]
        single = in_process_forward(a.model, texts, a.rounds)
        what = f"batching, {a.clients} {label}:"
        rows += [
            [f"{what} one in-process batched forward", f"{single * 1e3:.1f} ms", "1.00x", "-", "-"],
            [
                f"{what} {a.clients} concurrent gRPC clients",
                f"{conc * 1e3:.1f} ms",
                f"{ratio(single, conc)} of in-process speed",
                ">= 0.8x",
                verdict(single / conc >= 0.8),
            ],
            [
                f"{what} {a.clients} sequential gRPC calls",
                f"{seq * 1e3:.1f} ms",
                f"concurrent {ratio(seq, conc)} faster",
                ">= 4x",
                verdict(seq / conc >= 4),
            ],
        ]

    return rows


def checkpoint_dtype(path) -> str:
    """The dtype sentence-transformers computes in for ``path`` (None: the MiniLM, float32): a
    checkpoint's config dtype, as ``model_kwargs={"dtype": "auto"}`` loads it."""
    if path is None:
        return "float32"
    config = json.loads((Path(path) / "config.json").read_text())
    return str(config.get("torch_dtype") or config.get("dtype") or "float32")


def throughput_rows(a, model: str, path) -> list:
    """Part 2: tokens/s of the MLX embedder vs sentence-transformers on the same weights, both
    computing in the checkpoint's dtype (the MLX embedder's ``--dtype`` set to it)."""
    from services.common.blas import mlx_build

    dtype = checkpoint_dtype(path)
    rows = []
    n = a.texts
    tput_rounds = 1 if a.quick else 3
    torch_r = torch_throughput(make_texts(n, seed=1), a.batch, tput_rounds, a.torch_device, path)
    what = f"tokens/s, {n} texts, batch {a.batch}, median of {tput_rounds}:"
    if "error" in torch_r:
        st = None
        print(f"sentence-transformers baseline {torch_r['error']}")
        rows.append([f"{what} sentence-transformers (PyTorch)", torch_r["error"], "-", "-", "-"])
    else:
        st = torch_r["tokens"] / torch_r["seconds"]
        what = f"tokens/s, {n} texts ({torch_r['tokens']} tokens), batch {a.batch}, median of {tput_rounds}:"
        label = f"{what} sentence-transformers (PyTorch, {torch_r['where']}, {dtype})"
        rows.append([label, f"{st:.0f} tok/s", "1.00x", "-", "-"])
    build = mlx_build()
    # The OpenBLAS preload matters only to MLX's CPU build; the CUDA build runs once, as it is.
    variants = (None,) if build.startswith("cuda") else (True, False)
    for openblas in variants:
        r = mlx_subprocess(openblas, n, a.batch, tput_rounds if openblas is not False else 1, model, dtype)
        label = {None: f"MLX ({build} build)", True: "MLX + OpenBLAS", False: "MLX, bundled BLAS"}[openblas]
        label += f", {dtype}"
        label = f"{what} {label}"
        if "error" in r:
            rows.append([label, f"not measured ({r['error'].strip()[:200]})", "-", "-", "-"])
            continue
        tps = r["tokens"] / r["seconds"]
        aim = openblas is not False and st is not None
        rows.append(
            [
                label,
                f"{tps:.0f} tok/s",
                f"{ratio(tps, st)} of sentence-transformers" if st else "-",
                ">= 1.0x (aim)" if aim else "-",
                verdict(tps / st >= 1.0) if aim else "-",
            ]
        )
    return rows


if __name__ == "__main__":
    main()
