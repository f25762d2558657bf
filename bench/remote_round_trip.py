"""REMOTE retrieval's per-layer round trip, taken apart, stream vs unary, optionally side by side
with another checkout's memory service.

    python -m bench.remote_round_trip [--rounds 300] [--batches 1,8] [--baseline DIR | --alone DIR] [--record]

The 1 B model's KV shape: 16 layers, 8 KV heads, head_dim 64, a float16 memory of 4 096 rows,
32 query heads (4 per KV head), top_k 10, keys and values returned; decode steps of 1 and of 8
sequences (q = 1 and q = 8 query tokens per head). Each search is of the next layer, as decode
steps go through them: a layer's indexes (8 MiB of float32 keys) are not all in the CPU's cache
when searched again, as in a real generation. A real memory service runs as a subprocess on a
redis-server started here; the generator's own client (``RemoteRetriever``'s search: the code a
decode step runs for each layer, less the MLX conversions) searches it over loopback:

- stream: one message of an open SearchMemoryStream (what REMOTE retrieval does per layer);
- unary: one SearchMemory call.

Each round runs every (service, way) once, in a new random order, so that load from elsewhere on
the machine hits them alike. "search in service" is the engine's search (validation, FAISS, the
keys and values gathered) as the service's own metric (``extmind_memory_search_seconds``) timed
it over the same rounds: a mean, not a median. The parts are the same code timed alone in this
process on the same bytes: the client's request build (numpy -> serialized, as gRPC sends it),
the server's parse, the search, the server's answer (-> serialized) and the client's parse
(serialized -> the numpy arrays retrieval uses); "rest" is the round trip less them: gRPC on
both sides, loopback, thread hand-offs, and the search running slower in the service than here.
"echo" is the transport's floor beside it: the same request bytes sent the same way (one open
stream, requests queued to gRPC's sending thread, ``next`` on the call) to a grpc.aio server that
answers each with the same answer bytes and does nothing else (``bench.echo_server``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import queue
import select
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from google.protobuf.timestamp_pb2 import Timestamp  # noqa: E402

from bench import echo_server  # noqa: E402
from bench.common import add_record_flag, describe, machine, memory_searches, record, table, timed_rounds  # noqa: E402
from extmind import row_wire, tensor  # noqa: E402
from extmind.channels import OPTIONS  # noqa: E402
from extmind.procs import ROOT, free_port  # noqa: E402
from extmind.service_procs import memory_stack  # noqa: E402
from extmind.tensor import decode  # noqa: E402
from extmind.v1 import memory_pb2  # noqa: E402
from services.generator.memory_client import MemoryClient, search_requests, search_result  # noqa: E402
from services.generator.memory_resolution import ResolvedMemory  # noqa: E402
from services.generator.remote_retrieval import RemoteRetriever  # noqa: E402
from services.memory.kv_index import KVIndex  # noqa: E402
from services.memory.kv_memories import KV_DTYPES, KVMemories  # noqa: E402
from services.memory.kv_store import KVStore  # noqa: E402
from services.memory.servicer import search_response  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM, Q_HEADS, ROWS, TOP_K = 16, 8, 64, 32, 4096, 10
MEMORY = "round-trip"
PARTS = ("client build", "server parse", "search", "server answer", "client parse")


def p50_ms(xs) -> float:
    return statistics.median(xs) * 1e3


def shuffled_rounds(fns, rounds: int, warmup: int, warmed=None) -> list[list[float]]:
    """``timed_rounds`` with the functions in a new random order each round: on 2 cores a call
    still pays for the one before it (the other service writing its access line, say), so a
    fixed order favours some over others. ``warmed``: called once the warm-up rounds are done."""
    order = np.random.default_rng(1)
    times = [[] for _ in fns]
    for i in range(warmup + rounds):
        if i == warmup and warmed is not None:
            warmed()
        for j in order.permutation(len(fns)):
            t0 = time.perf_counter()
            fns[j]()
            if i >= warmup:
                times[j].append(time.perf_counter() - t0)
    return times


class Service:
    """A memory service holding the benchmark's memory, its client and its search metric."""

    def __init__(self, stack: contextlib.ExitStack, root):
        self.http_port = free_port()
        work = stack.enter_context(tempfile.TemporaryDirectory())
        self.svc = stack.enter_context(memory_stack(work, root=root, args=["--http-port", str(self.http_port)]))
        self.client = MemoryClient(self.svc.address)
        stack.callback(self.client.close)
        self.memory = self._store(np.random.default_rng(0))

    def _store(self, rng) -> ResolvedMemory:
        layout = memory_pb2.MemoryLayout(
            num_layers=LAYERS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=tensor.FLOAT16
        )
        created = self.client.create_memory(
            memory_id=MEMORY, layout=layout, fingerprint="bench", token_ids=[0] * ROWS, positions=range(ROWS), labels={}
        )
        shape = (LAYERS, KV_HEADS, ROWS, HEAD_DIM)
        keys, values = (rng.standard_normal(shape, dtype=np.float32).astype(np.float16) for _ in "kv")
        self.client.append(
            [row_wire.append_request(MEMORY, x, keys[x], values[x], tensor.FLOAT16) for x in range(LAYERS)]
        )
        when = Timestamp(seconds=created.create_time.seconds, nanos=created.create_time.nanos)
        return ResolvedMemory(MEMORY, when, ROWS, [], [], tensor.FLOAT16)

    def searched(self) -> tuple[float, int]:
        """(seconds, searches) the service's search metric has counted so far."""
        return memory_searches(self.http_port)


def _client_requests(*args) -> list[bytes]:
    """REMOTE retrieval's requests for one search, serialized as gRPC sends them."""
    return [memory_pb2.SearchMemoryStreamRequest(search=r).SerializeToString() for r in search_requests(*args)]


def _client_result(answer: bytes):
    """A serialized stream answer -> the arrays REMOTE retrieval uses."""
    return search_result(memory_pb2.SearchMemoryStreamResponse.FromString(answer).result)


class InProcess:
    """The memory service's handling of one stream message, in this process, part by part."""

    def __init__(self, redis_url: str):
        self.loop = asyncio.new_event_loop()
        self.index = KVIndex(KVStore(redis_url))
        self.kv = KVMemories(self.index.store, self.index, max_answer_bytes=4 << 20)

    def close(self) -> None:
        self.index.close()
        self.loop.close()

    def parts(self, requests: list[bytes], rounds: int):
        """``requests``: one per layer. -> (p50 seconds of parse, search, answer; the serialized
        answers)."""

        async def run():
            times, answers = ([], [], []), []
            for i in range(rounds + 5):
                t0 = time.perf_counter()
                search = memory_pb2.SearchMemoryStreamRequest.FromString(requests[i % LAYERS]).search
                queries = decode(search.queries, name="queries", dtypes=KV_DTYPES, ndim=3)
                t1 = time.perf_counter()
                hits = await self.kv.search(
                    list(search.memory_ids),
                    search.layer,
                    queries,
                    search.top_k,
                    return_vectors=search.return_vectors,
                    create_us=[t.seconds * 1_000_000 + t.nanos // 1000 for t in search.create_times],
                )
                t2 = time.perf_counter()
                answer = memory_pb2.SearchMemoryStreamResponse(result=search_response(hits)).SerializeToString()
                t3 = time.perf_counter()
                if i >= 5:
                    for out, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
                        out.append(dt)
                if len(answers) < LAYERS:
                    answers.append(answer)
            return [statistics.median(t) for t in times], answers

        return self.loop.run_until_complete(run())


class Echo:
    """``bench.echo_server`` in a process of its own, answering ``answer``, and a stream to it sent
    to as ``SearchStream`` sends (requests queued to gRPC's sending thread, answers taken with
    ``next``)."""

    def __init__(self, answer: bytes):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.echo_server"],
            cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            self.proc.stdin.write(answer)
            self.proc.stdin.close()
            ready, _, _ = select.select([self.proc.stdout], [], [], 60)
            line = self.proc.stdout.readline() if ready else b""
            if not line.strip().isdigit():
                code = self.proc.poll()
                raise RuntimeError(
                    f"the echo server did not start (exit code {code})"
                    if code is not None
                    else "the echo server did not print its port within 60 s"
                )
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self.channel = grpc.insecure_channel(f"127.0.0.1:{int(line)}", options=OPTIONS)
        self.requests = queue.SimpleQueue()
        self.call = self.channel.stream_stream(echo_server.METHOD)(iter(self.requests.get, None))

    def round_trip(self, request: bytes) -> None:
        self.requests.put(request)
        next(self.call)

    def close(self) -> None:
        self.requests.put(None)
        self.channel.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(services: dict, server: InProcess, batch: int, rounds: int, rng) -> dict:
    """``services``: name -> Service ("this" first). -> the batch's round trips, each service's
    mean search time in the service, and this checkout's parts."""
    queries = rng.standard_normal((Q_HEADS, batch, HEAD_DIM), dtype=np.float32)
    answers, fns, names, retrievers = {}, [], [], []
    for name, s in services.items():
        streamed = RemoteRetriever(s.client, [s.memory])
        unary = RemoteRetriever(MemoryClient(s.client.url), [s.memory])
        unary.client.streams_search = False
        retrievers += [streamed, unary]
        for how, retriever in (("stream", streamed), ("unary", unary)):
            searched = itertools.count()  # this (service, way)'s searches so far

            def search(retriever=retriever, key=(name, how), searched=searched):
                layer = next(searched) % LAYERS
                answers[(*key, layer)] = retriever._search(layer, queries, TOP_K, None)

            fns.append(search)
            names.append((name, how))
    before = {}
    warmup = LAYERS

    def warmed():  # the services' search metric from here on: the measured rounds' searches only
        before.update((name, s.searched()) for name, s in services.items())

    times = dict(zip(names, shuffled_rounds(fns, rounds, warmup, warmed)))
    in_service = {}
    for name, s in services.items():
        seconds, count = (b - a for a, b in zip(before[name], s.searched()))
        assert count == 2 * rounds, count
        in_service[name] = seconds / count * 1e3
    # Every service and way finds the same rows (keys and values bit for bit). Scores may differ
    # in the last bits between services: FAISS's BLAS kernel rounds by how many OpenMP threads
    # share it (docs/platform.md, "FAISS").
    score_diff = 0.0
    for (*_, layer), a in answers.items():
        first = answers[(*names[0], layer)]
        for f in ("indices", "keys", "values"):
            assert np.array_equal(getattr(a, f), getattr(first, f)), (layer, f)
        score_diff = max(score_diff, float(np.abs(a.scores - first.scores).max()))
    assert score_diff <= 1e-6, score_diff

    # The parts, on the bytes this search sends and gets.
    this = retrievers[0]
    ids, created = this.memory_ids, this._created(this.memory_ids)
    build = timed_rounds([lambda: _client_requests(ids, 0, queries, TOP_K, None, created)], rounds, warmup=5)[0]
    requests = [_client_requests(ids, x, queries, TOP_K, None, created)[0] for x in range(LAYERS)]
    (parse_s, search_s, answer_s), answers_here = server.parts(requests, rounds)
    parse = timed_rounds([lambda: _client_result(answers_here[0])], rounds, warmup=5)[0]
    for layer, answer in enumerate(answers_here):
        got, want = _client_result(answer), answers[(*names[0], layer)]
        assert np.array_equal(got.indices, want.indices) and np.array_equal(got.keys, want.keys)
    request, answer = requests[0], answers_here[0]
    echo = Echo(answer)
    try:
        echo_ms = p50_ms(timed_rounds([lambda: echo.round_trip(request)], rounds, warmup=warmup)[0])
    finally:
        echo.close()
    for r in retrievers:
        r.close()
        if not r.client.streams_search:
            r.client.close()
    parts = (statistics.median(build), parse_s, search_s, answer_s, statistics.median(parse))
    return {
        "batch": batch,
        "ms": {f"{name} {how}": p50_ms(xs) for (name, how), xs in times.items()},
        "in_service_ms": in_service,
        "parts_ms": {k: v * 1e3 for k, v in zip(PARTS, parts)},
        "echo_ms": echo_ms,
        "score_diff": score_diff,
        "request_bytes": len(request),
        "answer_bytes": len(answer),
    }


def report(results: list[dict], m: dict, rounds: int, baseline: str | None, alone: str | None) -> str:
    lines = [
        describe(m),
        "",
        f"One float16 memory of {LAYERS} layers x {ROWS} rows, {KV_HEADS} KV heads, head_dim {HEAD_DIM}; "
        f"{Q_HEADS} query heads, top_k {TOP_K}, keys and values returned; each search of the next layer; p50 of "
        f"{rounds} rounds (search in service: mean).",
        "",
    ]
    rows = []
    for r in results:
        for name in ("this", "baseline") if baseline else ("this",):
            stream, unary, searched = r["ms"][f"{name} stream"], r["ms"][f"{name} unary"], r["in_service_ms"][name]
            rows.append(
                [
                    r["batch"],
                    (f"`{alone}` alone" if alone else name) if name == "this" else f"baseline (`{baseline}`)",
                    f"{stream:.3f}",
                    f"{unary:.3f}",
                    f"{unary / stream:.2f}x",
                    f"{searched:.3f} ({searched / stream:.0%})",
                    f"{stream - searched:.3f} ({(stream - searched) / stream:.0%})",
                    f"{stream / r['ms']['baseline stream']:.2f}x" if baseline else "",
                ]
            )
    header = [
        "sequences:",
        "memory service",
        "stream ms:",
        "unary ms:",
        "unary / stream:",
        "search in service ms:",
        "rest of the stream ms:",
        "stream vs baseline:",
    ]
    lines.append(table(header, rows))
    if baseline:
        diffs = ", ".join(f"{r['score_diff']:.2g}" for r in results)
        lines += ["", f"Same rows, keys and values from both; largest score difference per batch: {diffs}."]
    if alone:  # the parts would be this checkout's code, not that of the service measured
        return "\n".join(lines)
    lines += ["", "This checkout's stream round trip, part by part (parts timed alone in-process):", ""]
    rows = []
    for r in results:
        parts, stream = r["parts_ms"], r["ms"]["this stream"]
        rest = stream - sum(parts.values())
        rows.append(
            [
                r["batch"],
                f"{r['request_bytes']:,} / {r['answer_bytes']:,}",
                *(f"{v:.3f} ({v / stream:.0%})" for v in parts.values()),
                f"{rest:.3f} ({rest / stream:.0%})",
                f"{stream:.3f}",
                f"{r['echo_ms']:.3f}",
            ]
        )
    header = [
        "sequences:",
        "request / answer bytes:",
        *(f"{p} ms:" for p in PARTS),
        "rest ms:",
        "stream ms:",
        "echo of the same bytes ms:",
    ]
    lines.append(table(header, rows))
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
    parser.add_argument(
        "--alone",
        metavar="DIR",
        help="measure another checkout's memory service instead of this one's, alone (no parts): on 2 cores "
        "a second service's background work (access lines, call clean-up) takes the core that a search split "
        "over threads needs, so --baseline understates what the split gains",
    )
    add_record_flag(parser)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    def one_request(b: int) -> bool:  # the parts and the echo time one request and its answer
        return len(search_requests([MEMORY], 0, np.zeros((Q_HEADS, b, HEAD_DIM), np.float32), TOP_K, None)) == 1

    most = next(b for b in itertools.count(1) if not one_request(b + 1))
    for b in batches:
        if not 1 <= b <= most:
            parser.error(f"--batches {b}: give 1 to {most} sequences (more split a search into several requests)")
    rng = np.random.default_rng(0)
    m = machine()
    with contextlib.ExitStack() as stack:
        services = {"this": Service(stack, args.alone or ROOT)}
        if args.baseline:
            services["baseline"] = Service(stack, args.baseline)
        server = InProcess(services["this"].svc.redis.url)
        stack.callback(server.close)
        results = [measure(services, server, b, args.rounds, rng) for b in batches]
    m["load_after"] = round(os.getloadavg()[0], 2)
    record("remote_round_trip", report(results, m, args.rounds, args.baseline, args.alone), write=args.record)


if __name__ == "__main__":
    main()
