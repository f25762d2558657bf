"""``extmind`` — the command line for people.

    extmind status
    extmind embed "some text" "more text" [--query] [--dimensions 128] [--json]
    extmind rerank "query" "doc one" "doc two" [--top-n 1]
    extmind docs upsert COLLECTION "id=text" @notes.txt @docs.jsonl [--meta k=v]
    extmind docs search COLLECTION "query" [--top-k 5] [--filter k=v]
    extmind docs delete COLLECTION ID...
    extmind docs create COLLECTION [--model M --dimensions N] | collections | drop COLLECTION
    extmind memorize FILE... [--id ID] [--label k=v] [--split-chars N] [--replace]
    extmind memories list | show ID [--tokens] | delete ID
    extmind generate "prompt" [--memory ID]... [--max-tokens 128] [--temperature 0.7] [--citations]
                     [--max-citations N] [--citation-min-weight W]

Targets: EMBEDDER_URL / MEMORY_URL / GENERATOR_URL when set, else the URLs ``make up`` recorded in
the run dir's cluster.json (--run-dir, $EXTMIND_RUN_DIR or .run), else 127.0.0.1 with the *_PORT
variables. EXTMIND_AUTH_TOKEN is sent when set. Errors are one line on stderr; exit code 2 for a
wrong command line, 1 for a failure.
"""

from __future__ import annotations

import json
import os
import sys
import time

import grpc
import numpy as np

from extmind.cli_args import build_parser, check_combinations
from extmind.cli_common import (
    _TIMEOUT_PROBLEM,
    TIMEOUT,
    CliError,
    Targets,
    _md,
    _read_text,
    _short,
    counted,
    rpc_error_line,
)
from extmind.cli_docs import cmd_docs
from extmind.cli_memories import cmd_memories, cmd_memorize
from extmind.cluster import Cluster
from extmind.cluster_config import LaunchError
from extmind.cluster_status import format_table, status_ok
from extmind.v1 import embedder_pb2, generator_pb2

# ------------------------------------------------------------------ commands


def cmd_status(a, t: Targets) -> int:
    rows = Cluster(t.s).status()
    print(format_table(rows))
    if not t.run_dir.is_dir():  # a mistyped --run-dir / EXTMIND_RUN_DIR would otherwise pass unnoticed
        print(f"extmind: no run dir {t.run_dir}: the URLs above are the environment's or the defaults", file=sys.stderr)
    return 0 if status_ok(rows) else 1


def cmd_embed(a, t: Targets) -> int:
    texts = [_read_text("-") if x == "-" else x for x in a.texts]
    req = embedder_pb2.EmbedRequest(
        inputs=texts,
        model=a.model or "",
        dimensions=a.dimensions,
        input_type=embedder_pb2.INPUT_TYPE_QUERY if a.query else embedder_pb2.INPUT_TYPE_DOCUMENT,
        instruction=a.instruction or "",
    )
    r = t.embedder.Embed(req, timeout=TIMEOUT, metadata=_md())
    vecs = np.frombuffer(r.embeddings.data, "<f4").reshape(tuple(r.embeddings.shape))
    if a.json:
        print(
            json.dumps(
                {
                    "model": r.model,
                    "dimensions": r.dimensions,
                    "token_counts": list(r.token_counts),
                    "embeddings": vecs.tolist(),
                }
            )
        )
        return 0
    print(f"model {r.model}, {r.dimensions} dimensions")
    for text, v, n in zip(texts, vecs, r.token_counts):
        head = " ".join(f"{x:+.4f}" for x in v[:6])
        print(f"  {_short(text, 40):<40} {n:>4} tokens  |v| {np.linalg.norm(v):.3f}  [{head} …]")
    if len(texts) > 1:
        sims = vecs @ vecs.T
        print("cosine similarity:")
        for i, row in enumerate(sims):
            print(f"  [{i}] " + " ".join(f"{x:6.3f}" for x in row))
    return 0


def cmd_rerank(a, t: Targets) -> int:
    r = t.embedder.Rerank(
        embedder_pb2.RerankRequest(
            query=a.query, documents=a.documents, top_n=a.top_n, model=a.model or "", instruction=a.instruction or ""
        ),
        timeout=TIMEOUT,
        metadata=_md(),
    )
    print(f"model {r.model}")
    for res in r.results:
        print(f"  {res.score:.4f}  [{res.index}] {_short(a.documents[res.index], 70)}")
    return 0


def cmd_generate(a, t: Targets) -> int:
    prompt = _read_text("-") if a.prompt == "-" else a.prompt
    if not prompt:
        empty = "the prompt from stdin is empty" if a.prompt == "-" else "the prompt is empty"
        raise CliError(f"{empty}: give its text, or '-' and the text on stdin")
    sp = generator_pb2.SamplingParams(
        temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, max_tokens=a.max_tokens, stop=a.stop or []
    )
    if a.seed is not None:
        sp.seed = a.seed
    req = generator_pb2.GenerateStreamRequest(sampling=sp)
    if a.chat:
        req.messages.append(generator_pb2.ChatMessage(role="user", content=prompt))
    else:
        req.prompt = prompt
    if a.memory:
        em = req.extended_mind
        em.memory_ids.extend(a.memory)
        em.return_citations = a.citations
        if a.memory_top_k is not None:
            em.top_k = a.memory_top_k
        if a.max_citations is not None:
            em.max_citations = a.max_citations
        if a.citation_min_weight is not None:  # unset keeps the service's default (0.02)
            em.citation_min_weight = a.citation_min_weight
        if a.remote:
            em.mode = generator_pb2.RETRIEVAL_MODE_REMOTE
    last = None
    t0 = time.monotonic()
    answered = False  # any text but whitespace, for the hint below
    for msg in t.generator.GenerateStream(req, timeout=TIMEOUT, metadata=_md()):
        answered = answered or bool(msg.text.strip())
        sys.stdout.write(msg.text)
        sys.stdout.flush()
        last = msg
    sys.stdout.write("\n")
    if last is not None:
        reason = generator_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        dt = time.monotonic() - t0
        n = last.usage.completion_tokens
        print(f"[{counted(n, 'token')}, {reason}, {dt:.2f}s, {n / dt if dt else 0:.1f} tok/s]", file=sys.stderr)
        if a.prompt == "-" and not a.chat and prompt.endswith("\n") and not answered:
            # `echo` adds a newline that the prompt keeps (verbatim): a prompt ending in "Answer:\n"
            # often makes the model stop at once.
            print("  note: the prompt from stdin ends in a newline, kept as is (printf, not echo)", file=sys.stderr)
        if a.citations and not last.citations:
            print("  no citations came back for this answer", file=sys.stderr)
        for c in last.citations:
            print(
                f"  cited {c.memory_id}[{c.token_start}:{c.token_end}] x{c.hits}: {_short(c.text, 60)!r}",
                file=sys.stderr,
            )
    return 0


COMMANDS = {
    "status": cmd_status,
    "embed": cmd_embed,
    "rerank": cmd_rerank,
    "docs": cmd_docs,
    "memorize": cmd_memorize,
    "memories": cmd_memories,
    "generate": cmd_generate,
}


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    check_combinations(a)
    if _TIMEOUT_PROBLEM:
        print(f"extmind: {_TIMEOUT_PROBLEM}", file=sys.stderr)
        return 1
    t = None
    try:
        t = Targets(getattr(a, "status_run_dir", None) or a.run_dir)
        return COMMANDS[a.cmd](a, t)
    except grpc.RpcError as e:
        service = t.last if t and t.last else "memory"
        line = rpc_error_line(e, service, getattr(t.s, f"{service}_url"), t.origin(service))
        print(f"extmind: {line}", file=sys.stderr)
        return 1
    except (CliError, LaunchError) as e:
        print(f"extmind: {' '.join(str(e).split())}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt:
        print("extmind: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # a bug of ours: still one line, the traceback on request
        if os.environ.get("EXTMIND_DEBUG"):
            raise
        print(
            f"extmind: unexpected {type(e).__name__}: {' '.join(str(e).split())} (EXTMIND_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
