"""What every benchmark shares: the machine it ran on, one timer, and one way to report.

Each benchmark builds a markdown body (a line on the machine from ``describe(machine())`` and
tables made by ``table`` with ratios from ``ratio``) and hands it to ``record``, which prints it,
keeps a copy in ``bench/out/<name>.md`` and, with ``--record``, appends it as a dated run under
the ``## <name>`` section of ``bench/RESULTS.md`` (hand-written notes there are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
OUT = ROOT / "bench" / "out"


# ------------------------------------------------------------------ the machine


def machine(**extra) -> dict:
    """Where and when a run happened: date (UTC), system, arch, cpu model, cores, Python, load
    average (1 min) at the call, plus ``extra`` facts (e.g. ``blas=blas_in_use()``,
    ``redis="7.0.15"``)."""
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "system": platform.system(),
        "arch": platform.machine(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load": round(os.getloadavg()[0], 2),
        **_tf32(),
        **extra,
    }


def _tf32() -> dict:
    """On MLX's CUDA backend, whether float32 matmuls run in TF32 (MLX_ENABLE_TF32, default on):
    it moves float32 timings and results, so a report says which it measured."""
    try:
        import mlx.core as mx

        if not mx.cuda.is_available():
            return {}
    except (ImportError, AttributeError):
        return {}
    return {"tf32": "off" if os.environ.get("MLX_ENABLE_TF32", "1") == "0" else "on"}


def describe(m: dict) -> str:
    """One line for a report: ``2026-11-21 04:26 UTC, Linux x86_64, AMD EPYC, 2 cores, Python
    3.11.7, load average 0.4, blas ...``."""
    known = ("date", "system", "arch", "cpu", "cpus", "python", "load")
    line = f"{m['date']}, {m['system']} {m['arch']}, {m['cpu']}, {m['cpus']} cores, Python {m['python']}"
    if isinstance(m.get("load"), (int, float)):
        line += f", load average {m['load']:.1f}"
    return line + "".join(f", {k} {v}" for k, v in m.items() if k not in known)


# ------------------------------------------------------------------ timing


def timed_rounds(fns, rounds: int, warmup: int = 1) -> list[list[float]]:
    """Calls every function of ``fns`` ``warmup`` times (untimed), then ``rounds`` times, one after
    the other within each round so that a change of load hits all of them alike.
    -> seconds per call: one list of ``rounds`` for each function."""
    times = [[] for _ in fns]
    for i in range(warmup + rounds):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                out.append(time.perf_counter() - t0)
    return times


async def timed_rounds_async(fns, rounds: int, warmup: int = 1) -> list[list[float]]:
    """``timed_rounds`` for coroutine functions (awaited in turn on the running loop)."""
    times = [[] for _ in fns]
    for i in range(warmup + rounds):
        for fn, out in zip(fns, times):
            t0 = time.perf_counter()
            await fn()
            if i >= warmup:
                out.append(time.perf_counter() - t0)
    return times


def median_seconds(fn, rounds: int, warmup: int = 1) -> float:
    """Median wall time in seconds of ``rounds`` calls of ``fn`` after ``warmup`` untimed calls."""
    return statistics.median(timed_rounds([fn], rounds, warmup)[0])


# ------------------------------------------------------------------ reporting


def memory_searches(http_port: int) -> tuple[float, int]:
    """(seconds, searches) of KV searches a memory service has answered so far, from its own
    ``extmind_memory_search_seconds`` metric (its HTTP face on ``http_port``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()

    def value(name: str) -> float:
        m = re.search(rf'^extmind_memory_search_seconds_{name}{{kind="kv"}} (\S+)$', text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("sum"), int(value("count"))


def ratio(value: float, baseline: float) -> str:
    """``value / baseline`` as ``"1.23x"``."""
    return f"{value / baseline:.2f}x"


def median_ratio(values, baselines) -> str:
    """The median of the pairs' ratios ``values[i] / baselines[i]`` as ``"1.23x"``: runs measured
    in pairs (side by side) cancel a host's speed drifting over the rounds."""
    return f"{statistics.median(v / b for v, b in zip(values, baselines, strict=True)):.2f}x"


def verdict(ok: bool | None) -> str:
    """A target's outcome for a table cell: met / missed / - (no target)."""
    return "-" if ok is None else ("met" if ok else "missed")


def table(header, rows) -> str:
    """A markdown table. ``header``: column names (a name ending in ':' is right-aligned, the
    colon dropped); ``rows``: sequences of cells (str() of each)."""
    names = [h.rstrip(":") for h in header]
    align = ["---:" if h.endswith(":") else "---" for h in header]
    lines = ["| " + " | ".join(names) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def add_record_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--record", action="store_true", help="also append the report to its section of bench/RESULTS.md"
    )


def record(name: str, body: str, *, write: bool = False) -> None:
    """Prints the report ``body`` (markdown) of benchmark ``name``, keeps it in
    ``bench/out/<name>.md`` and, when ``write``, appends it as ``### Run of <date>`` at the end of
    the ``## <name>`` section of bench/RESULTS.md (the section is added when missing)."""
    body = body.strip("\n") + "\n"
    print(f"\n## {name}\n\n{body}", flush=True)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.md").write_text(body)
    if not write:
        return
    entry = f"### Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} (`python -m bench.{name}`)\n\n{body}"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    head = next((i for i, x in enumerate(lines) if x.rstrip("\n") == f"## {name}"), None)
    if head is None:
        text = text.rstrip("\n") + f"\n\n## {name}\n\n{entry}"
    else:
        end = next((i for i in range(head + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        before = "".join(lines[:end]).rstrip("\n")
        after = "".join(lines[end:])
        text = before + "\n\n" + entry + ("\n" + after if after else "")
    RESULTS.write_text(text)
    print(f"appended to the '## {name}' section of {RESULTS}")
