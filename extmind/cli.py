"""``extmind`` — the command line for people.

    extmind status
    extmind embed "some text" "more text" [--query] [--dimensions 128] [--json]
    extmind rerank "query" "doc one" "doc two" [--top-n 1]
    extmind docs upsert COLLECTION "id=text" @notes.txt @docs.jsonl [--meta k=v]
    extmind docs search COLLECTION "query" [--top-k 5] [--filter k=v]
    extmind docs delete COLLECTION ID...
    extmind memorize FILE... [--id ID] [--label k=v] [--split-chars N]
    extmind memories list | show ID [--tokens] | delete ID
    extmind generate "prompt" [--memory ID]... [--max-tokens 128] [--temperature 0.7] [--citations]

Targets come from EMBEDDER_URL / MEMORY_URL / GENERATOR_URL (default 127.0.0.1 with the *_PORT
variables); EXTMIND_AUTH_TOKEN is sent when set. Errors are one line on stderr, exit code 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from extmind.channels import auth_metadata, sync_channel
from extmind.cluster import Cluster, LaunchError, Settings, format_table
from extmind.v1 import (common_pb2, embedder_pb2, embedder_pb2_grpc, generator_pb2, generator_pb2_grpc, memory_pb2,
                        memory_pb2_grpc)

TIMEOUT = float(os.environ.get("EXTMIND_CLI_TIMEOUT", "600"))


class CliError(Exception):
    """A one-line, user-facing error."""


def _kv(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise CliError(f"{what} {it!r} must look like key=value")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def _md() -> tuple:
    return auth_metadata()


class Targets:
    def __init__(self):
        self.s = Settings.from_env()
        self._chans = {}

    def _chan(self, url):
        if url not in self._chans:
            self._chans[url] = sync_channel(url)
        return self._chans[url]

    @property
    def embedder(self):
        return embedder_pb2_grpc.EmbedderServiceStub(self._chan(self.s.embedder_url))

    @property
    def memory(self):
        return memory_pb2_grpc.MemoryServiceStub(self._chan(self.s.memory_url))

    @property
    def generator(self):
        return generator_pb2_grpc.GeneratorServiceStub(self._chan(self.s.generator_url))


# ------------------------------------------------------------------ commands

def cmd_status(a, t: Targets) -> int:
    rows = Cluster(Settings.from_env(a.run_dir)).status()
    print(format_table(rows))
    return 0 if all(r["health"] in ("SERVING", "PONG") for r in rows) else 1


def cmd_embed(a, t: Targets) -> int:
    texts = [sys.stdin.read() if x == "-" else x for x in a.texts]
    req = embedder_pb2.EmbedRequest(inputs=texts, model=a.model or "", dimensions=a.dimensions,
                                    input_type=embedder_pb2.INPUT_TYPE_QUERY if a.query else embedder_pb2.INPUT_TYPE_DOCUMENT,
                                    instruction=a.instruction or "")
    r = t.embedder.Embed(req, timeout=TIMEOUT, metadata=_md())
    vecs = np.frombuffer(r.embeddings.data, "<f4").reshape(tuple(r.embeddings.shape))
    if a.json:
        print(json.dumps({"model": r.model, "dimensions": r.dimensions, "token_counts": list(r.token_counts),
                          "embeddings": vecs.tolist()}))
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
    r = t.embedder.Rerank(embedder_pb2.RerankRequest(query=a.query, documents=a.documents, top_n=a.top_n,
                                                     model=a.model or "", instruction=a.instruction or ""),
                          timeout=TIMEOUT, metadata=_md())
    print(f"model {r.model}")
    for res in r.results:
        print(f"  {res.score:.4f}  [{res.index}] {_short(a.documents[res.index], 70)}")
    return 0


def _documents(items: list[str], meta: dict) -> list[memory_pb2.Document]:
    docs = []
    for it in items:
        if it.startswith("@"):
            path = Path(it[1:])
            try:
                body = path.read_text()
            except OSError as e:
                raise CliError(f"cannot read {path}: {e.strerror}") from None
            if path.suffix == ".jsonl":
                for n, line in enumerate(body.splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        d = json.loads(line)
                        docs.append(memory_pb2.Document(id=str(d["id"]), text=d["text"],
                                                        metadata={**meta, **d.get("metadata", {})}))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise CliError(f"{path}:{n}: each line must be a JSON object with 'id' and 'text'") from None
            else:
                docs.append(memory_pb2.Document(id=path.name, text=body, metadata=meta))
        elif "=" in it:
            i, text = it.split("=", 1)
            docs.append(memory_pb2.Document(id=i, text=text, metadata=meta))
        else:
            raise CliError(f"document {_short(it, 30)!r} must be id=text, @file or @file.jsonl")
    return docs


def cmd_docs(a, t: Targets) -> int:
    if a.docs_cmd == "upsert":
        docs = _documents(a.items, _kv(a.meta, "--meta"))
        r = t.memory.UpsertDocuments(memory_pb2.UpsertDocumentsRequest(collection=a.collection, documents=docs),
                                     timeout=TIMEOUT, metadata=_md())
        print(f"upserted {len(r.ids)} documents into {a.collection} ({r.model}, {r.dimensions} dims): "
              + ", ".join(r.ids))
    elif a.docs_cmd == "search":
        r = t.memory.SearchDocuments(memory_pb2.SearchDocumentsRequest(
            collection=a.collection, query=a.query, top_k=a.top_k, filter=_kv(a.filter, "--filter")),
            timeout=TIMEOUT, metadata=_md())
        for h in r.hits:
            meta = " ".join(f"{k}={v}" for k, v in sorted(h.metadata.items()))
            print(f"  {h.score:.4f}  {h.id:<20} {_short(h.text, 60)}  {meta}")
        if not r.hits:
            print("  (no hits)")
    else:
        r = t.memory.DeleteDocuments(memory_pb2.DeleteDocumentsRequest(collection=a.collection, ids=a.ids),
                                     timeout=TIMEOUT, metadata=_md())
        print(f"deleted {r.deleted} documents from {a.collection}")
    return 0


class Progress:
    """Memorize progress on stderr: characters memorized out of the total (the current text
    counted by its share of tokens done), the current text's tokens done / total and its ETA.

    On a terminal one line is redrawn every 0.2 s (with a spinner); otherwise (a log, a pipe) a
    line is printed each time another 10% is done, and once at the end."""

    def __init__(self, total: int, enabled: bool, tty: bool | None = None):
        self.total, self.done, self.enabled = max(total, 1), 0, enabled
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.label = ""
        self.current = 0        # characters of the text being memorized now
        self.tokens = (0, 0)    # its tokens done, total
        self.eta = 0.0          # seconds left for it (0 = unknown)
        self._printed = -1      # the last 10% step printed (not a TTY)
        self._stop = threading.Event()
        self._t0 = time.monotonic()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        if self.enabled and self.tty:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self.enabled and self.tty:
            self._thread.join()
            self._draw(final=True)
            sys.stderr.write("\n")
        elif self.enabled and exc[0] is None and self._printed < 10:  # e.g. no progress came
            self._line()

    def update(self, p) -> None:
        """Takes a MemorizeProgress of the current text."""
        self.tokens, self.eta = (p.tokens_done, p.tokens_total), p.eta_seconds
        self._step_line()

    def finish_text(self) -> None:
        self.done += self.current
        self.current, self.tokens, self.eta = 0, (0, 0), 0.0
        self._step_line()

    def _step_line(self) -> None:
        if self.enabled and not self.tty and int(self._frac() * 10) > self._printed:
            self._line()

    def _frac(self) -> float:
        done, total = self.tokens
        return min(1.0, (self.done + (self.current * done / total if total else 0)) / self.total)

    def _status(self) -> str:
        frac = self._frac()
        done, total = self.tokens
        tokens = f" {done}/{total} tokens" if total else ""
        eta = f" ETA {self.eta:.0f}s" if self.eta > 0 and done < total else ""
        return (f"{frac * 100:5.1f}% {int(frac * self.total)}/{self.total} chars{tokens} "
                f"{time.monotonic() - self._t0:6.1f}s{eta}")

    def _line(self) -> None:
        self._printed = int(self._frac() * 10)
        sys.stderr.write(f"memorize {self._status()} {self.label}\n")
        sys.stderr.flush()

    def _draw(self, spin: str = "", final: bool = False):
        bar = "#" * int(self._frac() * 30)
        sys.stderr.write(f"\r[{bar:<30}] {self._status()} {spin} {_short(self.label, 30):<30}")
        sys.stderr.flush()

    def _loop(self):
        frames = "|/-\\"
        i = 0
        while not self._stop.wait(0.2):
            self._draw(frames[i % 4])
            i += 1


def _chunks(text: str, limit: int) -> list[str]:
    """Split at paragraph (then sentence) boundaries into pieces of at most ~limit characters."""
    if limit <= 0 or len(text) <= limit:
        return [text]
    parts, cur = [], ""
    for para in re.split(r"(?<=\n\n)", text):
        pieces = [para] if len(para) <= limit else re.split(r"(?<=[.!?])\s+", para)
        for p in pieces:
            if cur and len(cur) + len(p) > limit:
                parts.append(cur)
                cur = ""
            cur += p if not cur or cur.endswith(("\n", " ")) else " " + p
    if cur.strip():
        parts.append(cur)
    return parts


def _memory_id(stem: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.:-]", "-", stem)[:100] or "memory"


def cmd_memorize(a, t: Targets) -> int:
    jobs = []  # (memory_id, text)
    if a.id and len(a.files) > 1:
        raise CliError("--id names one memory; give one file (or use --split-chars for numbered parts)")
    for f in a.files:
        try:
            text = sys.stdin.read() if f == "-" else Path(f).read_text()
        except OSError as e:
            raise CliError(f"cannot read {f}: {e.strerror}") from None
        if not text.strip():
            raise CliError(f"{f} is empty: nothing to memorize")
        base = a.id or _memory_id(Path(f).stem if f != "-" else "stdin")
        parts = _chunks(text, a.split_chars)
        jobs += [(base if len(parts) == 1 else f"{base}.{i:03d}", p) for i, p in enumerate(parts)]
    labels = _kv(a.label, "--label")
    made = []
    with Progress(sum(len(p) for _, p in jobs), enabled=not a.quiet) as bar:
        for mid, text in jobs:
            bar.label, bar.current = mid, len(text)
            req = generator_pb2.MemorizeRequest(text=text, memory_id=mid, labels=labels)
            for ev in t.generator.MemorizeStream(generator_pb2.MemorizeStreamRequest(request=req),
                                                 timeout=TIMEOUT, metadata=_md()):
                if ev.HasField("progress"):
                    bar.update(ev.progress)
                else:
                    made.append(ev.done)
            bar.finish_text()
    for r in made:
        print(f"{r.memory_id}: {r.num_tokens} tokens, {r.num_rows} rows")
    return 0


def _fmt_memory(m) -> str:
    state = memory_pb2.MemoryState.Name(m.state).removeprefix("MEMORY_STATE_")
    created = m.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if m.create_time.seconds else "-"
    return f"{m.memory_id:<32} {state:<8} {m.num_tokens:>7} {m.bytes / 1e6:>9.2f}  {created}  {m.model_fingerprint[:16]}"


def cmd_memories(a, t: Targets) -> int:
    if a.mem_cmd == "list":
        token = ""
        print(f"{'MEMORY':<32} {'STATE':<8} {'TOKENS':>7} {'MB':>9}  {'CREATED':<19}  FINGERPRINT")
        while True:
            r = t.memory.ListMemories(memory_pb2.ListMemoriesRequest(model_fingerprint=a.fingerprint or "",
                                                                     page_token=token),
                                      timeout=TIMEOUT, metadata=_md())
            for m in r.memories:
                print(_fmt_memory(m))
            token = r.next_page_token
            if not token:
                break
    elif a.mem_cmd == "show":
        m = t.memory.GetMemory(memory_pb2.GetMemoryRequest(memory_id=a.memory_id, include_tokens=a.tokens),
                               timeout=TIMEOUT, metadata=_md()).memory
        lay = m.layout
        print(f"memory       {m.memory_id}")
        print(f"state        {memory_pb2.MemoryState.Name(m.state).removeprefix('MEMORY_STATE_')}")
        print(f"tokens       {m.num_tokens}")
        dtype = common_pb2.DType.Name(lay.dtype).removeprefix("DTYPE_").lower()
        print(f"layout       {lay.num_layers} layers x {lay.num_kv_heads} KV heads x {lay.head_dim} dims, {dtype}")
        print(f"bytes        {m.bytes}")
        print(f"fingerprint  {m.model_fingerprint}")
        print(f"labels       {', '.join(f'{k}={v}' for k, v in sorted(m.labels.items())) or '-'}")
        if a.tokens:
            print(f"token_ids    {list(m.token_ids)}")
    else:
        t.memory.DeleteMemory(memory_pb2.DeleteMemoryRequest(memory_id=a.memory_id), timeout=TIMEOUT, metadata=_md())
        print(f"deleted {a.memory_id}")
    return 0


def cmd_generate(a, t: Targets) -> int:
    prompt = sys.stdin.read() if a.prompt == "-" else a.prompt
    sp = generator_pb2.SamplingParams(temperature=a.temperature, top_p=a.top_p, top_k=a.top_k,
                                      max_tokens=a.max_tokens, stop=a.stop or [])
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
        if a.remote:
            em.mode = generator_pb2.RETRIEVAL_MODE_REMOTE
    last = None
    t0 = time.monotonic()
    for msg in t.generator.GenerateStream(req, timeout=TIMEOUT, metadata=_md()):
        sys.stdout.write(msg.text)
        sys.stdout.flush()
        last = msg
    sys.stdout.write("\n")
    if last is not None:
        reason = generator_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
        dt = time.monotonic() - t0
        n = last.usage.completion_tokens
        print(f"[{n} tokens, {reason}, {dt:.2f}s, {n / dt if dt else 0:.1f} tok/s]", file=sys.stderr)
        for c in last.citations:
            print(f"  cited {c.memory_id}[{c.token_start}:{c.token_end}] x{c.hits}: {_short(c.text, 60)!r}",
                  file=sys.stderr)
    return 0


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


# ------------------------------------------------------------------ parser

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="extmind", description="Talk to a running extmind cluster.",
                                epilog="Targets: EMBEDDER_URL, MEMORY_URL, GENERATOR_URL (or the *_PORT variables).")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("status", help="services, ports, pids and health")
    s.add_argument("--run-dir", default=None)
    s.set_defaults(fn=cmd_status)

    s = sub.add_parser("embed", help="embed texts ('-' reads stdin)")
    s.add_argument("texts", nargs="+")
    s.add_argument("--model", help="alias or served model name (default: the server's)")
    s.add_argument("--query", action="store_true", help="embed as search queries (adds the instruction)")
    s.add_argument("--instruction", help="query task description")
    s.add_argument("--dimensions", type=int, default=0, help="Matryoshka size (0 = full)")
    s.add_argument("--json", action="store_true", help="print the vectors as JSON")
    s.set_defaults(fn=cmd_embed)

    s = sub.add_parser("rerank", help="score documents against a query")
    s.add_argument("query")
    s.add_argument("documents", nargs="+")
    s.add_argument("--top-n", type=int, default=0)
    s.add_argument("--model")
    s.add_argument("--instruction")
    s.set_defaults(fn=cmd_rerank)

    d = sub.add_parser("docs", help="document collections: upsert, search, delete")
    dsub = d.add_subparsers(dest="docs_cmd", required=True, metavar="ACTION")
    s = dsub.add_parser("upsert", help="add or replace documents: id=text, @file (id = file name), @file.jsonl")
    s.add_argument("collection")
    s.add_argument("items", nargs="+")
    s.add_argument("--meta", action="append", help="key=value metadata for every document")
    s = dsub.add_parser("search", help="semantic search")
    s.add_argument("collection")
    s.add_argument("query")
    s.add_argument("--top-k", type=int, default=5)
    s.add_argument("--filter", action="append", help="key=value exact metadata match")
    s = dsub.add_parser("delete", help="delete documents by id")
    s.add_argument("collection")
    s.add_argument("ids", nargs="+")
    d.set_defaults(fn=cmd_docs)

    s = sub.add_parser("memorize", help="turn text files into KV memories ('-' reads stdin)")
    s.add_argument("files", nargs="+")
    s.add_argument("--id", help="memory id (default: the file name)")
    s.add_argument("--label", action="append", help="key=value label")
    s.add_argument("--split-chars", type=int, default=0,
                   help="split long files at paragraph boundaries into memories ID.000, ID.001, … of about N chars")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_memorize)

    m = sub.add_parser("memories", help="KV memories: list, show, delete")
    msub = m.add_subparsers(dest="mem_cmd", required=True, metavar="ACTION")
    s = msub.add_parser("list")
    s.add_argument("--fingerprint", help="only memories of this model")
    s = msub.add_parser("show")
    s.add_argument("memory_id")
    s.add_argument("--tokens", action="store_true", help="also print the token ids")
    s = msub.add_parser("delete")
    s.add_argument("memory_id")
    m.set_defaults(fn=cmd_memories)

    s = sub.add_parser("generate", help="generate text, streamed ('-' reads the prompt from stdin)")
    s.add_argument("prompt")
    s.add_argument("--memory", action="append", help="memory id to attend to (repeatable)")
    s.add_argument("--citations", action="store_true", help="print the memory spans retrieved most")
    s.add_argument("--memory-top-k", type=int, default=None, help="memories retrieved per head and token")
    s.add_argument("--remote", action="store_true", help="search memories on the memory service every step")
    s.add_argument("--chat", action="store_true", help="apply the model's chat template")
    s.add_argument("--max-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=0.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--stop", action="append")
    s.set_defaults(fn=cmd_generate)
    return p


def _target_of(a, t: Targets) -> str:
    if a.cmd in ("embed", "rerank"):
        return t.s.embedder_url
    if a.cmd in ("docs", "memories"):
        return t.s.memory_url
    return t.s.generator_url


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        t = Targets()
        return a.fn(a, t)
    except grpc.RpcError as e:
        hint = " (is the cluster up? `make up`, `extmind status`)" if e.code() == grpc.StatusCode.UNAVAILABLE else ""
        print(f"extmind: {e.code().name} from {_target_of(a, t)}: {e.details()}{hint}", file=sys.stderr)
    except (CliError, LaunchError) as e:
        print(f"extmind: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        print("extmind: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
