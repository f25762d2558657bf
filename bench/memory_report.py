"""The memory benchmark's report: the markdown written to bench/RESULTS.md from a results dict
(``python -m bench.memory``), with the notes that explain its numbers."""

from __future__ import annotations

from bench.common import describe, ratio, table, verdict

# The benchmark's shapes (bench/memory.py measures with them; the report names them).
KV_HEADS, Q_HEADS, DIM, TOP_K = 8, 32, 128, 10
MiB = 1024 * 1024

# ---------------------------------------------------------------- report

NOTES_SEARCH = """\
Where the q = 1 overhead goes (measured while building this): the transport alone — an echo server on
the same shared runtime returning a prebuilt answer of the same size (167 KB with keys and values) —
is 0.6–0.7 ms p50; the service's own handling (decode and validate, encode the answer) adds ~0.2 ms;
the rest is the same FAISS search running slower inside the server process than in the benchmark
process while client, server and gRPC threads share 2 cores (server-side search time logged at
debug level: 2.2 ms vs 1.7 ms in-process for 4 096 rows; 26 ms vs 20 ms for 65 536). In four full
runs of this benchmark the 4 096-row overhead was 1.9–2.6 ms (load average 1.0–2.9 from other jobs);
smaller isolated experiments gave 1.1–1.9 ms. So the +1.5 ms target is **not met** on this shared
2-core machine. At q = 64 the answer carries 10 MiB of keys and values ([32, 64, 10, 128] fp16),
which gRPC Python moves at ~250 MB/s."""


NOTES_INGEST = """\
Both paths are bound by Redis writing and fsyncing the AOF (appendfsync always) on a shared disk, so
the absolute numbers swing by ±30% between runs; the ratio ranged 0.5–0.7 in the runs of this code.
Message size matters for the gRPC side: a discard-everything server took 16 MiB AppendMemory
messages at 440–530 MiB/s but 4 MiB ones at 1.3–1.7 GiB/s, so clients should stream ≤ 4 MiB
messages (FetchMemory sends ≤ 4 MiB chunks too)."""


def markdown(res) -> str:
    """The report body (markdown, without its ``## memory`` heading) of a results dict."""
    m = res["machine"]
    after = res.get("load_after")
    lines = [
        f"`python -m bench.memory`: {describe(m)}; appendfsync always; FAISS: 1 OpenMP thread for small "
        f"searches on the event loop, all cores for large ones on worker threads. Run time {res['seconds']:.0f} s"
        + (f"; load average {after:.1f} after (the machine is shared)." if after is not None else "."),
        "",
        f"**SearchMemory** — {Q_HEADS} query heads over {KV_HEADS} KV heads, head_dim {DIM}, fp16 memory, "
        f"top_k {TOP_K}, keys+values returned; gRPC = full client call (encode, loopback, decode).",
        "",
        table(
            [
                "rows:",
                "q:",
                "in-process p50 (ms):",
                "gRPC p50 (ms):",
                "on a stream p50 (ms):",
                "overhead p50:",
                "ratio:",
                "target",
                "met",
            ],
            [
                [
                    f"{r['rows']:,}",
                    r["q"],
                    f"{r['inproc_p50_ms']:.2f}",
                    f"{r['grpc_p50_ms']:.2f}",
                    f"{r['stream_p50_ms']:.2f}" if "stream_p50_ms" in r else "-",
                    f"{r['overhead_p50_ms']:+.2f} ms",
                    ratio(r["grpc_p50_ms"], r["inproc_p50_ms"]),
                    r["target"],
                    verdict(r["ok"]),
                ]
                for r in res.get("search", [])
            ],
        ),
    ]
    if "rtt_ms" in res:
        lines += [
            "",
            f"A bare unary round trip (grpc.health.v1 Check) on the same channel: p50 {res['rtt_ms']:.2f} ms.",
        ]
    if res.get("search"):
        lines += ["", NOTES_SEARCH]
    i = res.get("ingest")
    lines += (
        []
        if not i
        else [
            "",
            f"**Ingest** — {i['bytes'] / MiB:.0f} MiB of keys+values ({i['layers']} layers × {KV_HEADS} heads × "
            f"{i['rows']} rows × {DIM}, fp16) in messages of {i['message_rows']} rows ({i['message_mib']:.0f} MiB), "
            f"median of {i['reps']}; the raw pipeline writes the same chunks.",
            "",
            table(
                ["path", "MiB/s:"],
                [
                    ["AppendMemory (acknowledged = durable)", f"{i['append_mb_s']:.1f}"],
                    ["raw redis-py pipeline, same bytes and layout", f"{i['raw_pipeline_mb_s']:.1f}"],
                    ["**ratio** (target ≥ 0.5×)", f"**{i['ratio']:.2f}×** {verdict(i['ok'])}"],
                ],
            ),
            "",
            NOTES_INGEST,
        ]
    )
    if res.get("restart"):
        r = res["restart"]
        lines += [
            "",
            f"**Restart** — {r['rows']:,} rows of head_dim {DIM} ({r['layers']} layers × {KV_HEADS} KV heads "
            f"× {r['memory_rows_per_bank']:,} tokens, fp16, {r['bytes'] / MiB:.0f} MiB keys+values in Redis).",
            "",
            table(
                ["measure", "seconds:"],
                [
                    ["index rebuild from Redis (target ≤ 5 s)", f"**{r['rebuild_s']:.2f}** {verdict(r['ok'])}"],
                    ["same, as logged by the restarted service", r["service_logged_rebuild_s"]],
                    [
                        "service restart to health SERVING (process start + imports + rebuild)",
                        f"{r['restart_to_serving_s']:.2f}",
                    ],
                ],
            ),
        ]
    return "\n".join(lines) + "\n"
