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

Targets: EMBEDDER_URL / MEMORY_URL / GENERATOR_URL when set, else the URLs ``make up`` recorded in
the run dir's cluster.json (--run-dir, $EXTMIND_RUN_DIR or .run), else 127.0.0.1 with the *_PORT
variables. EXTMIND_AUTH_TOKEN is sent when set. Errors are one line on stderr; exit code 2 for a
wrong command line, 1 for a failure.
"""

from __future__ import annotations

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
from extmind.cli_args import build_parser, check_combinations
from extmind.cluster import Cluster
from extmind.cluster_config import LaunchError, Settings, find_run_dir, read_record
from extmind.cluster_status import format_table, status_ok
from extmind.errors import from_rpc_error
from extmind.v1 import (
    common_pb2,
    embedder_pb2,
    embedder_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    memory_pb2,
    memory_pb2_grpc,
)


def _timeout_from_env() -> tuple[float, str]:
    """(seconds per call, "" or the one-line complaint about EXTMIND_CLI_TIMEOUT that main prints)."""
    raw = os.environ.get("EXTMIND_CLI_TIMEOUT", "").strip() or "600"
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        return 600.0, f"EXTMIND_CLI_TIMEOUT={raw!r} must be a positive number of seconds"
    return value, ""


TIMEOUT, _TIMEOUT_PROBLEM = _timeout_from_env()


class CliError(Exception):
    """A one-line, user-facing failure (exit code 1)."""

    exit_code = 1


class UsageError(CliError):
    """Options that cannot work together (exit code 2, like argparse's own errors). A value whose
    content is wrong (a document, a key=value) is a CliError: exit code 1."""

    exit_code = 2


def _kv(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for it in items or []:
        if "=" not in it:
            raise CliError(f"{what} {it!r} must look like key=value")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def _read_text(name: str) -> str:
    """The text of file ``name`` ('-' = stdin) as UTF-8; CliError naming the file otherwise."""
    try:
        if name == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(name).read_bytes().decode("utf-8")
    except OSError as e:
        raise CliError(f"cannot read {name}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise CliError(
            f"{'stdin' if name == '-' else name} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
            f"offset {e.start}); convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _md() -> tuple:
    return auth_metadata()


class Targets:
    def __init__(self, run_dir: str | None = None):
        self.run_dir = find_run_dir(run_dir)
        self.s = Settings.from_env(self.run_dir, use_record=True)
        self._chans = {}
        self.last = ""  # the service of the stub taken last: the one an RpcError came from

    def origin(self, service: str) -> str:
        """Where the service's URL came from, for error messages."""
        env = f"{service.upper()}_URL"  # EMBEDDER_URL, MEMORY_URL, GENERATOR_URL
        if os.environ.get(env, "").strip():
            return env
        record = self.run_dir / "cluster.json"
        return str(record) if f"{service}_url" in read_record(self.run_dir) else f"default; no {record}"

    def _chan(self, service: str):
        self.last = service
        url = getattr(self.s, f"{service}_url")
        if url not in self._chans:
            self._chans[url] = sync_channel(url)
        return self._chans[url]

    @property
    def embedder(self):
        return embedder_pb2_grpc.EmbedderServiceStub(self._chan("embedder"))

    @property
    def memory(self):
        return memory_pb2_grpc.MemoryServiceStub(self._chan("memory"))

    @property
    def generator(self):
        return generator_pb2_grpc.GeneratorServiceStub(self._chan("generator"))


# ------------------------------------------------------------------ commands


def cmd_status(a, t: Targets) -> int:
    rows = Cluster(t.s).status()
    print(format_table(rows))
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


def _documents(items: list[str], meta: dict) -> list[memory_pb2.Document]:
    docs = []
    for it in items:
        if it.startswith("@"):
            path = Path(it[1:])
            body = _read_text(str(path))
            if path.suffix == ".jsonl":
                for n, line in enumerate(body.splitlines(), 1):
                    if not line.strip():
                        continue
                    try:
                        d = json.loads(line)
                        docs.append(
                            memory_pb2.Document(
                                id=str(d["id"]), text=d["text"], metadata={**meta, **d.get("metadata", {})}
                            )
                        )
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
        r = t.memory.UpsertDocuments(
            memory_pb2.UpsertDocumentsRequest(collection=a.collection, documents=docs), timeout=TIMEOUT, metadata=_md()
        )
        print(
            f"upserted {len(r.ids)} documents into {a.collection} ({r.model}, {r.dimensions} dims): " + ", ".join(r.ids)
        )
    elif a.docs_cmd == "search":
        r = t.memory.SearchDocuments(
            memory_pb2.SearchDocumentsRequest(
                collection=a.collection, query=a.query, top_k=a.top_k, filter=_kv(a.filter, "--filter")
            ),
            timeout=TIMEOUT,
            metadata=_md(),
        )
        for h in r.hits:
            meta = " ".join(f"{k}={v}" for k, v in sorted(h.metadata.items()))
            print(f"  {h.score:.4f}  {h.id:<20} {_short(h.text, 60)}  {meta}")
        if not r.hits:
            print("  (no hits)")
    elif a.docs_cmd == "delete":
        r = t.memory.DeleteDocuments(
            memory_pb2.DeleteDocumentsRequest(collection=a.collection, ids=a.ids), timeout=TIMEOUT, metadata=_md()
        )
        print(f"deleted {r.deleted} documents from {a.collection}")
    elif a.docs_cmd == "create":
        c = t.memory.CreateCollection(
            memory_pb2.CreateCollectionRequest(collection=a.collection, model=a.model or "", dimensions=a.dimensions),
            timeout=TIMEOUT,
            metadata=_md(),
        ).collection
        print(f"created collection {c.name} ({c.model}, {c.dimensions} dims)")
    elif a.docs_cmd == "collections":
        cols = t.memory.ListCollections(
            memory_pb2.ListCollectionsRequest(), timeout=TIMEOUT, metadata=_md()
        ).collections
        print(f"{'COLLECTION':<24} {'DOCS':>7} {'DIMS':>5}  {'CREATED':<19}  MODEL")
        for c in cols:
            created = c.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if c.create_time.seconds else "-"
            print(f"{c.name:<24} {c.num_documents:>7} {c.dimensions:>5}  {created:<19}  {c.model}")
        if not cols:
            print("(no collections: `extmind docs upsert` or `extmind docs create` makes one)")
    else:  # drop
        t.memory.DeleteCollection(
            memory_pb2.DeleteCollectionRequest(collection=a.collection), timeout=TIMEOUT, metadata=_md()
        )
        print(f"dropped collection {a.collection}")
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


ROWS_NOTE = "special tokens such as BOS are not stored"
EXCERPT_CHARS = 200


def _exists(t: Targets, memory_id: str) -> bool:
    try:
        t.memory.GetMemory(memory_pb2.GetMemoryRequest(memory_id=memory_id), timeout=TIMEOUT, metadata=_md())
        return True
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return False
        raise


def cmd_memorize(a, t: Targets) -> int:
    jobs = []  # (memory_id, text, source)
    if a.id and len(a.files) > 1:
        raise UsageError("--id names one memory; give one file (or use --split-chars for numbered parts)")
    labels = _kv(a.label, "--label")
    for f in a.files:  # every file is read (and checked) before the first one is memorized
        text = _read_text(f)
        if not text.strip():
            raise CliError(f"{f} is empty: nothing to memorize")
        source = "stdin" if f == "-" else Path(f).name
        base = a.id or _memory_id(Path(f).stem if f != "-" else "stdin")
        parts = _chunks(text, a.split_chars)
        jobs += [(base if len(parts) == 1 else f"{base}.{i:03d}", p, source) for i, p in enumerate(parts)]
    results = []  # lines, printed after the progress bar (also those done before a failure)
    try:
        with Progress(sum(len(p) for _, p, _ in jobs), enabled=not a.quiet) as bar:
            for mid, text, source in jobs:
                bar.label, bar.current = mid, len(text)
                results.append(_memorize_one(t, mid, text, {"source": source, **labels}, a.replace, bar))
                bar.finish_text()
    finally:
        for line in results:
            print(line)
    return 0


def _memorize_one(t: Targets, mid: str, text: str, labels: dict, replace: bool, bar: Progress) -> str:
    """Memorizes ``text`` as ``mid`` (skipped when it exists, unless ``replace``), streaming its
    progress into ``bar`` -> the line to print."""
    skipped = f"{mid}: exists already, skipped (--replace memorizes it again)"
    if _exists(t, mid):
        if not replace:
            return skipped
        t.memory.DeleteMemory(memory_pb2.DeleteMemoryRequest(memory_id=mid), timeout=TIMEOUT, metadata=_md())
    # The text itself is not stored (only token ids, and no service detokenizes): keep how it
    # starts, for `extmind memories show`.
    labels = {"excerpt": _short(text, EXCERPT_CHARS), **labels}
    req = generator_pb2.MemorizeRequest(text=text, memory_id=mid, labels=labels)
    r = None
    try:
        for ev in t.generator.MemorizeStream(
            generator_pb2.MemorizeStreamRequest(request=req), timeout=TIMEOUT, metadata=_md()
        ):
            if ev.HasField("progress"):
                bar.update(ev.progress)
            else:
                r = ev.done
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.ALREADY_EXISTS:  # made meanwhile by someone else
            raise
        return skipped
    if r is None:
        raise CliError(f"the generator ended memorizing {mid} without a result; see its log")
    return f"{r.memory_id}: {r.num_tokens} tokens, {r.num_rows} memory rows ({ROWS_NOTE})"


def _fmt_memory(m) -> str:
    state = memory_pb2.MemoryState.Name(m.state).removeprefix("MEMORY_STATE_")
    created = m.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if m.create_time.seconds else "-"
    return (
        f"{m.memory_id:<32} {state:<8} {m.num_tokens:>7} {m.bytes / 1e6:>9.2f}  {created}  {m.model_fingerprint[:16]}"
    )


def cmd_memories(a, t: Targets) -> int:
    if a.mem_cmd == "list":
        token = ""
        while True:
            r = t.memory.ListMemories(
                memory_pb2.ListMemoriesRequest(model_fingerprint=a.fingerprint or "", page_token=token),
                timeout=TIMEOUT,
                metadata=_md(),
            )
            if not token:  # the header once the service answered (an error stays one line)
                print(f"{'MEMORY':<32} {'STATE':<8} {'ROWS':>7} {'MB':>9}  {'CREATED':<19}  FINGERPRINT")
            for m in r.memories:
                print(_fmt_memory(m))
            token = r.next_page_token
            if not token:
                break
    elif a.mem_cmd == "show":
        m = t.memory.GetMemory(
            memory_pb2.GetMemoryRequest(memory_id=a.memory_id, include_tokens=a.tokens), timeout=TIMEOUT, metadata=_md()
        ).memory
        lay = m.layout
        labels = dict(m.labels)
        excerpt = labels.pop("excerpt", "")
        print(f"memory       {m.memory_id}")
        print(f"state        {memory_pb2.MemoryState.Name(m.state).removeprefix('MEMORY_STATE_')}")
        print(
            f"rows         {m.num_tokens} (one per stored token; {ROWS_NOTE}, so `extmind memorize` counted one more)"
        )
        dtype = common_pb2.DType.Name(lay.dtype).removeprefix("DTYPE_").lower()
        print(f"layout       {lay.num_layers} layers x {lay.num_kv_heads} KV heads x {lay.head_dim} dims, {dtype}")
        print(f"bytes        {m.bytes}")
        print(f"fingerprint  {m.model_fingerprint}")
        print(f"labels       {', '.join(f'{k}={v}' for k, v in sorted(labels.items())) or '-'}")
        if excerpt:
            print(f"excerpt      {excerpt}")
        else:
            print(
                "excerpt      - (not memorized by this CLI; the memory keeps token ids only and no service "
                "turns them back into text: --tokens prints them)"
            )
        if a.tokens:
            print(f"token_ids    {list(m.token_ids)}")
    else:
        t.memory.DeleteMemory(memory_pb2.DeleteMemoryRequest(memory_id=a.memory_id), timeout=TIMEOUT, metadata=_md())
        print(f"deleted {a.memory_id}")
    return 0


def cmd_generate(a, t: Targets) -> int:
    prompt = _read_text("-") if a.prompt == "-" else a.prompt
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
        if a.citations and not last.citations:
            print("  no citations came back for this answer", file=sys.stderr)
        for c in last.citations:
            print(
                f"  cited {c.memory_id}[{c.token_start}:{c.token_end}] x{c.hits}: {_short(c.text, 60)!r}",
                file=sys.stderr,
            )
    return 0


def _short(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


COMMANDS = {
    "status": cmd_status,
    "embed": cmd_embed,
    "rerank": cmd_rerank,
    "docs": cmd_docs,
    "memorize": cmd_memorize,
    "memories": cmd_memories,
    "generate": cmd_generate,
}


# ------------------------------------------------------------------ errors

# The services' messages name RPCs; a person at the CLI types commands.
_RPC_COMMANDS = {
    "ListMemories": "`extmind memories list`",
    "GetMemory": "`extmind memories show`",
    "DeleteMemory": "`extmind memories delete`",
    "CreateMemory": "`extmind memorize`",
    "CreateCollection": "`extmind docs create`",
    "UpsertDocuments": "`extmind docs upsert`",
    "ListCollections": "`extmind docs collections`",
    "DeleteCollection": "`extmind docs drop`",
    "SearchDocuments": "`extmind docs search`",
    "DeleteDocuments": "`extmind docs delete`",
    "GenerateStream": "`extmind generate`",
}
_RPC_NAME = re.compile(r"\b(" + "|".join(_RPC_COMMANDS) + r")\b")


def _undouble(message: str) -> str:
    """ "memory 'x': memory 'x' does not exist" -> "memory 'x' does not exist" (a caller's prefix
    that the callee's message already says)."""
    while True:
        head, sep, rest = message.partition(": ")
        if not (sep and head and head in rest):
            return message
        message = rest


def rpc_error_line(exc: grpc.RpcError, service: str, url: str, origin: str = "") -> str:
    """The one line (without "extmind: ") that a failed call to ``service`` at ``url`` prints:
    "CODE: what happened; what to do", the code as :func:`extmind.errors.from_rpc_error` names it.
    ``origin`` says where ``url`` came from (shown when the service cannot be reached)."""
    peer = f"{service} service at {url}"
    err = from_rpc_error(exc, peer=peer, as_dependency=False)
    detail = _RPC_NAME.sub(lambda m: _RPC_COMMANDS[m.group(1)], _undouble(" ".join(err.message.split())))
    if err.code == "UNAVAILABLE":
        where = f" [{origin}]" if origin else ""
        detail = f"cannot reach the {peer}{where} ({detail}); is the cluster up? `make up`, `extmind status`"
    elif err.code == "DEADLINE_EXCEEDED":
        detail = f"the {peer} did not answer within {TIMEOUT:g}s (EXTMIND_CLI_TIMEOUT)"
    elif err.code == "UNAUTHENTICATED":
        detail = f"the {peer} refused the credentials ({detail}); set EXTMIND_AUTH_TOKEN to its token"
    return f"{err.code}: {detail}"


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
