"""Memory service benchmark, one run, side by side, printing ratios.

    python -m bench.memory [--quick] [--parts search,ingest,restart] [--record]

1. SearchMemory over gRPC vs the same search in-process on the same FAISS indexes: 32 query
   heads over 8 KV heads, head_dim 128, 4 096 and 65 536 rows, q = 1 and q = 64 (top_k 10,
   keys and values returned). Target at q = 1: gRPC p50 <= in-process p50 + 1.5 ms. Also the
   same search as one message of an open SearchMemoryStream (REMOTE retrieval's way).
2. Ingest: MB/s of keys + values through AppendMemory (acknowledged = durable) vs a raw redis-py
   pipeline writing the same bytes in the same layout to the same Redis (appendfsync always).
   Target >= 0.5x.
3. Restart: seconds to rebuild the indexes of 1 M rows (head_dim 128) from Redis. Target <= 5 s.

The service runs as a subprocess (``python -m services.memory --redis-url ...``) on a
redis-server started here with the service's durability settings.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from bench.common import OUT, add_record_flag, machine, ratio, record, timed_rounds  # noqa: E402
from bench.memory_report import DIM, KV_HEADS, Q_HEADS, TOP_K, MiB, markdown  # noqa: E402
from extmind.service_procs import memory_stack  # noqa: E402
from extmind.tensor import FLOAT16, decode_raw, encode  # noqa: E402
from extmind.v1 import memory_pb2 as pb  # noqa: E402
from extmind.v1 import memory_pb2_grpc  # noqa: E402
from services.memory import kv_layout, kv_store  # noqa: E402
from services.memory.kv_index import KVIndex  # noqa: E402
from services.memory.kv_store import KVStore  # noqa: E402

RAW_BATCH_BYTES = 32 * MiB


def p50(xs):
    return statistics.median(xs)


def pct(xs, q):
    return float(np.percentile(xs, q))


def make_kv(rng, layers, rows):
    k = rng.standard_normal((layers, KV_HEADS, rows, DIM), dtype=np.float32).astype(np.float16)
    v = rng.standard_normal((layers, KV_HEADS, rows, DIM), dtype=np.float32).astype(np.float16)
    return k, v


def append_requests(memory_id, K, V, rows_per_msg=None):
    layers, _, rows, _ = K.shape
    step = rows_per_msg or rows
    return [
        pb.AppendMemoryRequest(
            memory_id=memory_id,
            layer=layer,
            keys=encode(K[layer][:, s : s + step]),
            values=encode(V[layer][:, s : s + step]),
        )
        for layer in range(layers)
        for s in range(0, rows, step)
    ]


def create(stub, memory_id, layers, rows):
    stub.CreateMemory(
        pb.CreateMemoryRequest(
            memory_id=memory_id,
            model_fingerprint="bench",
            layout=pb.MemoryLayout(num_layers=layers, num_kv_heads=KV_HEADS, head_dim=DIM, dtype=FLOAT16),
            token_ids=[0] * rows,
        ),
        timeout=60,
    )


# ---------------------------------------------------------------- 1. search


def bench_search(stub, redis_url, rows_list, qs, iters_q1, iters_q64, rng):
    for rows in rows_list:
        K, V = make_kv(rng, 1, rows)
        create(stub, f"search-{rows}", 1, rows)
        stub.AppendMemory(iter(append_requests(f"search-{rows}", K, V, rows_per_msg=8192)), timeout=600)
        stub.SearchMemory(
            pb.SearchMemoryRequest(
                memory_ids=[f"search-{rows}"],
                layer=0,
                top_k=1,  # indexed
                queries=encode(np.ones((KV_HEADS, 1, DIM), np.float32)),
            ),
            timeout=600,
        )
    index = KVIndex(KVStore(redis_url))
    index.rebuild()  # the same indexes, built in this process from the same Redis
    out = []
    for rows in rows_list:
        loaded = [index.loaded[f"search-{rows}"]]
        for q in qs:
            iters = iters_q1 if q == 1 else iters_q64
            Q = rng.standard_normal((Q_HEADS, q, DIM), dtype=np.float32)
            last = {}

            def in_process(loaded=loaded, Q=Q, last=last):
                last["local"] = index.search_blocking(loaded, 0, Q, TOP_K, None, True)

            def over_grpc(rows=rows, Q=Q, last=last):  # the full client call: encode, loopback, decode
                resp = stub.SearchMemory(
                    pb.SearchMemoryRequest(
                        memory_ids=[f"search-{rows}"], layer=0, queries=encode(Q), top_k=TOP_K, return_vectors=True
                    ),
                    timeout=120,
                )
                last["resp"] = resp
                last["remote"] = (
                    decode_raw(resp.scores),
                    decode_raw(resp.indices),
                    decode_raw(resp.keys),
                    decode_raw(resp.values),
                )

            requests: queue.SimpleQueue = queue.SimpleQueue()
            stream = stub.SearchMemoryStream(iter(requests.get, None), timeout=600)

            def over_stream(rows=rows, Q=Q, last=last, requests=requests, stream=stream):  # one message of a stream
                requests.put(
                    pb.SearchMemoryStreamRequest(
                        search=pb.SearchMemoryRequest(
                            memory_ids=[f"search-{rows}"], layer=0, queries=encode(Q), top_k=TOP_K, return_vectors=True
                        )
                    )
                )
                r = last["streamed"] = next(stream).result
                last["stream_views"] = [decode_raw(t) for t in (r.scores, r.indices, r.keys, r.values)]

            local, remote, streamed = (
                [x * 1e3 for x in xs] for xs in timed_rounds([in_process, over_grpc, over_stream], iters, warmup=3)
            )
            requests.put(None)
            s_local, s_remote, resp = last["local"], last["remote"], last["resp"]
            assert np.array_equal(s_local[1], s_remote[1]) and np.array_equal(s_local[2], s_remote[2])
            assert last["streamed"] == resp
            row = {
                "rows": rows,
                "q": q,
                "iters": iters,
                "inproc_p50_ms": p50(local),
                "inproc_p90_ms": pct(local, 90),
                "grpc_p50_ms": p50(remote),
                "grpc_p90_ms": pct(remote, 90),
                "stream_p50_ms": p50(streamed),
                "overhead_p50_ms": p50(remote) - p50(local),
                "response_bytes": resp.ByteSize(),
            }
            row["target"] = "<= +1.5 ms" if q == 1 else "-"
            row["ok"] = (row["overhead_p50_ms"] <= 1.5) if q == 1 else None
            out.append(row)
            print(
                f"  search rows={rows:>6} q={q:>2}: in-process p50 {row['inproc_p50_ms']:8.2f} ms | gRPC p50 "
                f"{row['grpc_p50_ms']:8.2f} ms | on a stream p50 {row['stream_p50_ms']:8.2f} ms | overhead "
                f"{row['overhead_p50_ms']:+6.2f} ms "
                f"({ratio(row['grpc_p50_ms'], row['inproc_p50_ms'])})"
                + ("" if q != 1 else f"  target <= +1.5 ms: {'OK' if row['ok'] else 'MISSED'}"),
                flush=True,
            )
    index.close()
    return out


def bench_floor(channel, iters):
    """p50 of a grpc.health.v1 Check on the same channel: the round trip any call pays."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    xs = [
        x * 1e3
        for x in timed_rounds([lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=10)], iters, warmup=3)[0]
    ]
    print(f"  unary round trip (health check) p50 {p50(xs):.2f} ms", flush=True)
    return p50(xs)


# ---------------------------------------------------------------- 2. ingest


def raw_pipeline_ingest(redis_url, memory_id, K, V, step):
    """The same bytes in the same layout (one key per chunk of ``step`` rows per layer for keys
    and for values, per-layer counters in the meta hash), pipelined with redis-py
    (transaction=False) in batches of RAW_BATCH_BYTES."""
    r = kv_store.sync_client(redis_url)
    layers, H, rows, D = K.shape
    chunks = []
    for layer in range(layers):
        for c, s in enumerate(range(0, rows, step)):
            chunks.append(
                (
                    layer,
                    f"raw.{c}",
                    min(step, rows - s),
                    K[layer][:, s : s + step].tobytes(),
                    V[layer][:, s : s + step].tobytes(),
                )
            )
    meta = kv_layout.meta_key(memory_id)
    t = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    pending = 0
    for layer, c, n, kb, vb in chunks:
        pipe.set(kv_layout.chunk_key(memory_id, "k", layer, c), kb)
        pipe.set(kv_layout.chunk_key(memory_id, "v", layer, c), vb)
        pipe.rpush(kv_layout.chunk_list_key(memory_id, layer), c)
        pipe.hincrby(meta, f"r:{layer}", n)
        pipe.hincrby(meta, f"c:{layer}", 1)
        pending += len(kb) + len(vb)
        if pending >= RAW_BATCH_BYTES:
            pipe.execute()
            pending = 0
    pipe.execute()
    dt = time.perf_counter() - t
    keys = (
        [meta]
        + [kv_layout.chunk_key(memory_id, kind, layer, c) for layer, c, *_ in chunks for kind in "kv"]
        + [kv_layout.chunk_list_key(memory_id, layer) for layer in range(layers)]
    )
    r.delete(*keys)
    r.close()
    return dt


def bench_ingest(stub, redis_url, layers, rows, reps, rng, msg_rows=1024):
    """Messages of ``msg_rows`` rows (1024 x 8 heads x 128 x fp16 = 2 MiB keys + 2 MiB values:
    gRPC Python moves ~4 MiB messages ~3x faster than 16 MiB ones)."""
    K, V = make_kv(rng, layers, rows)
    nbytes = K.nbytes + V.nbytes
    grpc_s, raw_s = [], []
    for i in range(reps):
        mid = f"ingest-{i}"
        create(stub, mid, layers, rows)
        msgs = append_requests(mid, K, V, rows_per_msg=msg_rows)
        t = time.perf_counter()
        resp = stub.AppendMemory(iter(msgs), timeout=600)
        grpc_s.append(time.perf_counter() - t)
        assert resp.state == pb.MEMORY_STATE_READY
        # The service indexes a READY memory in the background: let it finish before the raw run.
        stub.SearchMemory(
            pb.SearchMemoryRequest(
                memory_ids=[mid], layer=0, top_k=1, queries=encode(np.ones((KV_HEADS, 1, DIM), np.float32))
            ),
            timeout=600,
        )
        stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id=mid), timeout=60)
        raw_s.append(raw_pipeline_ingest(redis_url, f"raw-{i}", K, V, msg_rows))
    g, r = nbytes / MiB / p50(grpc_s), nbytes / MiB / p50(raw_s)
    row = {
        "bytes": nbytes,
        "layers": layers,
        "rows": rows,
        "reps": reps,
        "message_rows": msg_rows,
        "message_mib": 2 * msg_rows * KV_HEADS * DIM * 2 / MiB,
        "append_mb_s": g,
        "raw_pipeline_mb_s": r,
        "ratio": g / r,
        "target": ">= 0.5x",
        "ok": g / r >= 0.5,
    }
    print(
        f"  ingest {nbytes / MiB:.0f} MiB: AppendMemory {g:7.1f} MiB/s | raw redis-py pipeline {r:7.1f} MiB/s | "
        f"ratio {g / r:.2f}x  target >= 0.5x: {'OK' if row['ok'] else 'MISSED'}",
        flush=True,
    )
    return row


# ---------------------------------------------------------------- 3. restart


def bench_restart(stub, svc, redis_url, layers, rows, rng):
    mid = "restart"
    create(stub, mid, layers, rows)
    step = 2048

    def gen():
        for layer in range(layers):
            for s in range(0, rows, step):
                k, v = make_kv(rng, 1, min(step, rows - s))
                yield pb.AppendMemoryRequest(memory_id=mid, layer=layer, keys=encode(k[0]), values=encode(v[0]))

    t = time.perf_counter()
    stub.AppendMemory(gen(), timeout=1200)
    ingest_s = time.perf_counter() - t
    # Let the service finish indexing the new memory (it loads it in the background) so that it
    # does not compete for the cores with the measurement below.
    stub.SearchMemory(
        pb.SearchMemoryRequest(
            memory_ids=[mid], layer=0, top_k=1, queries=encode(np.ones((KV_HEADS, 1, DIM), np.float32))
        ),
        timeout=600,
    )
    total_rows = layers * KV_HEADS * rows
    # (a) the rebuild itself, in this process, from the same Redis
    index = KVIndex(KVStore(redis_url))
    t = time.perf_counter()
    stats = index.rebuild()
    rebuild_s = time.perf_counter() - t
    index.close()
    del index
    # (b) the service: restart to health SERVING (process start + imports + rebuild)
    svc.stop()
    t = time.perf_counter()
    svc.start()
    serving_s = time.perf_counter() - t
    logged = None
    for line in svc.log_path.read_text().splitlines()[::-1]:
        if "indexes rebuilt" in line and "seconds=" in line:
            logged = float(line.split("seconds=")[1].split()[0])
            break
    row = {
        "rows": total_rows,
        "memory_rows_per_bank": rows,
        "layers": layers,
        "kv_heads": KV_HEADS,
        "head_dim": DIM,
        "dtype": "float16",
        "bytes": 2 * total_rows * DIM * 2,
        "ingest_s": ingest_s,
        "rebuild_s": rebuild_s,
        "rebuilt_rows": stats["rows"],
        "service_logged_rebuild_s": logged,
        "restart_to_serving_s": serving_s,
        "target": "<= 5 s",
        "ok": rebuild_s <= 5.0,
        "stats": stats,
    }
    print(
        f"  restart {total_rows:,} rows ({row['bytes'] / MiB:.0f} MiB keys+values): rebuild {rebuild_s:.2f} s "
        f"(service logged {logged} s; restart to SERVING {serving_s:.2f} s)  target <= 5 s: "
        f"{'OK' if row['ok'] else 'MISSED'}   [ingested in {ingest_s:.1f} s]",
        flush=True,
    )
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer iterations, smaller restart set (smoke run)")
    ap.add_argument("--parts", default="search,ingest,restart", help="comma-separated subset to run")
    add_record_flag(ap)
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="no measuring: report (and with --record, record) bench/out/memory.json again",
    )
    args = ap.parse_args(argv)
    if args.report_only:
        res = json.loads((OUT / "memory.json").read_text())
        record("memory", markdown(res), write=args.record)
        return
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    # q = 64 answers carry ~10 MiB of keys and values: over the default 4 MiB response budget
    with memory_stack(work, args=["--max-response-mb", "64"], start_timeout=300) as svc:
        redis = svc.redis
        with redis.client() as rc:
            res = {"machine": machine(redis=rc.info("server").get("redis_version"))}
        from extmind.channels import sync_channel

        ch = sync_channel(svc.address)
        stub = memory_pb2_grpc.MemoryServiceStub(ch)
        try:
            parts = set(args.parts.split(","))
            if "search" in parts:
                print("SearchMemory: gRPC vs in-process (same FAISS indexes)", flush=True)
                res["search"] = bench_search(
                    stub,
                    redis.url,
                    [4096, 65536],
                    [1, 64],
                    iters_q1=50 if args.quick else 300,
                    iters_q64=3 if args.quick else 15,
                    rng=rng,
                )
                res["rtt_ms"] = bench_floor(ch, 50 if args.quick else 300)
            if "ingest" in parts:
                print("Ingest: AppendMemory vs raw redis-py pipeline", flush=True)
                res["ingest"] = bench_ingest(stub, redis.url, layers=8, rows=4096, reps=2 if args.quick else 5, rng=rng)
            if "restart" in parts:
                for m in stub.ListMemories(pb.ListMemoriesRequest(page_size=1000), timeout=60).memories:
                    stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id=m.memory_id), timeout=60)  # only the 1 M rows
                print("Restart: rebuild indexes from Redis", flush=True)
                layers, rows = (4, 8192) if args.quick else (16, 8192)  # 16 x 8 x 8192 = 1 048 576 rows
                res["restart"] = bench_restart(stub, svc, redis.url, layers, rows, rng)
        finally:
            ch.close()
    res["seconds"] = time.perf_counter() - t0
    res["load_after"] = os.getloadavg()[0]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "memory.json").write_text(json.dumps(res, indent=2, default=str))
    record("memory", markdown(res), write=args.record)
    # A benchmark reports; it does not fail the build.


if __name__ == "__main__":
    main()
