"""REMOTE retrieval's per-layer round trip, taken apart, one run, side by side with unary calls.

    python -m bench.remote_round_trip [--rounds 300] [--record]

The 1 B model's KV shape: 8 KV heads, head_dim 64, a float16 memory of 4 096 rows, 32 query
heads (4 per KV head), top_k 10, keys and values returned; decode steps of 1 and of 8 sequences
(q = 1 and q = 8 query tokens per head). A real memory service runs as a subprocess on a
redis-server started here; the generator's own client (``RemoteRetriever``'s search, the same
code a decode step runs, less the MLX conversions) searches it over loopback:

- stream: one message of an open SearchMemoryStream (what REMOTE retrieval does per layer);
- unary: one SearchMemory call.

The parts are the same code timed alone in this process on the same bytes: the client's request
build (numpy -> serialized message, as gRPC sends it), the server's parse, the search (the memory
service's engine over indexes built from the same Redis, on this thread as the service's event
loop runs small searches), the server's answer build (-> serialized) and the client's parse
(serialized -> the numpy arrays retrieval uses). "transit" is the round trip less those parts:
gRPC on both sides, loopback, thread hand-offs and the server's per-message handling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

from bench.common import add_record_flag, describe, machine, record, table, timed_rounds  # noqa: E402
from extmind import row_wire, search_wire, tensor  # noqa: E402
from extmind.procs import ROOT  # noqa: E402
from extmind.service_procs import memory_stack  # noqa: E402
from extmind.v1 import memory_pb2  # noqa: E402
from services.generator.memory_client import MemoryClient  # noqa: E402
from services.generator.memory_resolution import ResolvedMemory  # noqa: E402
from services.generator.remote_retrieval import RemoteRetriever  # noqa: E402
from services.memory.kv_index import KVIndex  # noqa: E402
from services.memory.kv_memories import KVMemories  # noqa: E402
from services.memory.kv_store import KVStore  # noqa: E402

KV_HEADS, HEAD_DIM, Q_HEADS, ROWS, TOP_K = 8, 64, 32, 4096, 10
MEMORY = "round-trip"
PARTS = ("client build", "server parse", "search", "server answer", "client parse")


def p50_ms(xs) -> float:
    return statistics.median(xs) * 1e3


def shuffled_rounds(fns, rounds: int, warmup: int) -> list[list[float]]:
    """``timed_rounds`` with the functions in a new random order each round: on 2 cores a call
    still pays for the one before it (the other service writing its access line, say), so a
    fixed order favours some over others."""
    order = np.random.default_rng(1)
    times = [[] for _ in fns]
    for i in range(warmup + rounds):
        for j in order.permutation(len(fns)):
            t0 = time.perf_counter()
            fns[j]()
            if i >= warmup:
                times[j].append(time.perf_counter() - t0)
    return times


def _store(client: MemoryClient, rng) -> ResolvedMemory:
    layout = memory_pb2.MemoryLayout(num_layers=1, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=tensor.FLOAT16)
    created = client.create_memory(
        memory_id=MEMORY, layout=layout, fingerprint="bench", token_ids=[0] * ROWS, positions=range(ROWS), labels={}
    )
    keys, values = (rng.standard_normal((KV_HEADS, ROWS, HEAD_DIM), dtype=np.float32).astype(np.float16) for _ in "kv")
    client.append([row_wire.append_request(MEMORY, 0, keys, values, tensor.FLOAT16)])
    return ResolvedMemory(
        MEMORY,
        Timestamp(seconds=created.create_time.seconds, nanos=created.create_time.nanos),
        ROWS,
        [],
        [],
        tensor.FLOAT16,
    )


class InProcess:
    """The memory service's handling of one stream message, in this process, part by part."""

    def __init__(self, redis_url: str):
        self.loop = asyncio.new_event_loop()
        self.index = KVIndex(KVStore(redis_url))
        self.kv = KVMemories(self.index.store, self.index, max_answer_bytes=4 << 20)

    def close(self) -> None:
        self.index.close()
        self.loop.close()

    def parts(self, request: bytes, rounds: int):
        """-> (p50 seconds of parse, search, answer; the serialized answer)."""

        async def run():
            times = ([], [], [])
            for i in range(rounds + 5):
                t0 = time.perf_counter()
                search = search_wire.read_stream_request(request).search
                queries = search_wire.queries(search)
                t1 = time.perf_counter()
                hits = await self.kv.search(
                    list(search.memory_ids),
                    search.layer,
                    queries,
                    search.top_k,
                    return_vectors=search.return_vectors,
                    create_us=search_wire.create_us(search),
                )
                t2 = time.perf_counter()
                answer = search_wire.stream_response(hits, search.return_vectors)
                t3 = time.perf_counter()
                if i >= 5:
                    for out, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                        out.append(dt)
            return [statistics.median(t) for t in times], answer

        return self.loop.run_until_complete(run())


def measure(targets: dict, server: InProcess, batch: int, rounds: int, rng) -> dict:
    """``targets``: name -> (client, resolved memory) of a memory service ("this" first). Their
    stream and unary searches run in turn within each round, so that load from elsewhere on the
    machine hits them alike; the parts are this checkout's."""
    queries = rng.standard_normal((Q_HEADS, batch, HEAD_DIM), dtype=np.float32)
    answers, fns, names = {}, [], []
    retrievers = []
    for name, (client, resolved) in targets.items():
        streamed = RemoteRetriever(client, [resolved])
        unary = RemoteRetriever(MemoryClient(client.url), [resolved])
        unary.client.streams_search = False
        retrievers += [streamed, unary]
        for how, retriever in (("stream", streamed), ("unary", unary)):

            def search(retriever=retriever, key=(name, how)):
                answers[key] = retriever._search(0, queries, TOP_K, None)

            fns.append(search)
            names.append((name, how))
    times = dict(zip(names, shuffled_rounds(fns, rounds, warmup=10)))
    # Every service and way finds the same rows (keys and values bit for bit). Scores may differ
    # in the last bits between services: FAISS's BLAS kernel rounds by how many OpenMP threads
    # share it (today: a search of 8 sequences ran on the CPU count, now on one per KV head).
    first = answers[names[0]]
    score_diff = 0.0
    for key, a in answers.items():
        for f in ("indices", "keys", "values"):
            assert np.array_equal(getattr(a, f), getattr(first, f)), (key, f)
        score_diff = max(score_diff, float(np.abs(a.scores - first.scores).max()))
    assert score_diff <= 1e-6, score_diff

    # The parts, on the bytes this search sends and gets.
    this = retrievers[0]
    ids, created = this.memory_ids, this._created(this.memory_ids)
    build = timed_rounds(
        [lambda: search_wire.client_stream_requests(ids, 0, queries, TOP_K, None, created)], rounds, warmup=5
    )[0]
    (request,) = search_wire.client_stream_requests(ids, 0, queries, TOP_K, None, created)
    (parse_s, search_s, answer_s), answer = server.parts(request, rounds)
    parse = timed_rounds([lambda: search_wire.client_result(answer)], rounds, warmup=5)[0]
    got = search_wire.client_result(answer)
    assert np.array_equal(got.indices, first.indices) and np.array_equal(got.keys, first.keys)
    for r in retrievers:
        r.close()
        if not r.client.streams_search:
            r.client.close()
    parts = dict(zip(PARTS, (statistics.median(build), parse_s, search_s, answer_s, statistics.median(parse))))
    return {
        "batch": batch,
        "ms": {f"{name} {how}": p50_ms(xs) for (name, how), xs in times.items()},
        "parts_ms": {k: v * 1e3 for k, v in parts.items()},
        "score_diff": score_diff,
        "request_bytes": len(request),
        "answer_bytes": len(answer),
    }


def report(results: list[dict], m: dict, rounds: int, baseline: str | None) -> str:
    lines = [
        describe(m),
        "",
        f"One float16 memory of {ROWS} rows, {KV_HEADS} KV heads, head_dim {HEAD_DIM}; {Q_HEADS} query heads, "
        f"top_k {TOP_K}, keys and values returned; p50 of {rounds} rounds. Parts timed alone in-process on "
        "the same bytes; transit = stream round trip - parts.",
        "",
    ]
    rows = []
    for r in results:
        parts, stream = r["parts_ms"], r["ms"]["this stream"]
        transit = stream - sum(parts.values())
        rows.append(
            [
                r["batch"],
                f"{r['request_bytes']:,} / {r['answer_bytes']:,}",
                *(f"{v:.3f} ({v / stream:.0%})" for v in parts.values()),
                f"{transit:.3f} ({transit / stream:.0%})",
                f"{stream:.3f}",
                f"{r['ms']['this unary']:.3f}",
                f"{r['ms']['this unary'] / stream:.2f}x",
            ]
        )
    header = [
        "sequences:",
        "request / answer bytes:",
        *(f"{p} ms:" for p in PARTS),
        "transit ms:",
        "stream ms:",
        "unary ms:",
        "unary / stream:",
    ]
    lines.append(table(header, rows))
    if baseline:
        lines += [
            "",
            f"Side by side, rounds interleaved: this checkout vs the memory service of `{baseline}` "
            "(same client code, same data).",
            "",
        ]
        rows = [
            [
                r["batch"],
                f"{r['ms']['baseline stream']:.3f}",
                f"{r['ms']['this stream']:.3f}",
                f"{r['ms']['this stream'] / r['ms']['baseline stream']:.2f}x",
                f"{r['ms']['baseline unary']:.3f}",
                f"{r['ms']['this unary']:.3f}",
                f"{r['ms']['this unary'] / r['ms']['baseline unary']:.2f}x",
            ]
            for r in results
        ]
        header = [
            "sequences:",
            "stream, baseline ms:",
            "stream, this ms:",
            "ratio:",
            "unary, baseline ms:",
            "unary, this ms:",
            "ratio:",
        ]
        lines.append(table(header, rows))
        diffs = ", ".join(f"{r['score_diff']:.2g}" for r in results)
        lines += ["", f"Same rows, keys and values from both; largest score difference per batch: {diffs}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=300)
    parser.add_argument("--batches", default="1,8", help="sequences per decode step, comma-separated")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="another checkout (e.g. `git worktree add /tmp/base main`): its memory service runs too, "
        "on its own Redis, and is searched in turn with this one's",
    )
    add_record_flag(parser)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    m = machine()
    with contextlib.ExitStack() as stack:
        targets = {}
        for name, root in (("this", ROOT), ("baseline", args.baseline)):
            if root is None:
                continue
            svc = stack.enter_context(memory_stack(stack.enter_context(tempfile.TemporaryDirectory()), root=root))
            client = MemoryClient(svc.address)
            stack.callback(client.close)
            targets[name] = (client, _store(client, np.random.default_rng(0)))
            if name == "this":
                server = InProcess(svc.redis.url)
                stack.callback(server.close)
        results = [measure(targets, server, int(b), args.rounds, rng) for b in args.batches.split(",")]
    m["load_after"] = round(os.getloadavg()[0], 2)
    record("remote_round_trip", report(results, m, args.rounds, args.baseline), write=args.record)


if __name__ == "__main__":
    main()
