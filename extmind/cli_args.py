"""The ``extmind`` command line's grammar: subcommands, option types and the checks argparse cannot
express. Every mistake here is one line on stderr and exit code 2; the commands live in
``extmind.cli`` (dispatched on ``args.cmd``)."""

from __future__ import annotations

import argparse
import math
import sys


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) that point at --help instead of the usage block."""

    def error(self, message: str, prog: str | None = None):
        prog = prog or self.prog
        sys.stderr.write(f"{prog}: {message} (see `{prog} --help`)\n")
        sys.exit(2)

    # Words no parser takes are reported by the top-level parser, after every subcommand has
    # parsed: record the deepest subcommand that ran (it returns first), so the error names its
    # usage (`extmind memories show --help`: one id) rather than the top level's.
    def parse_known_args(self, args=None, namespace=None):
        ns, extras = super().parse_known_args(args, namespace)
        if not hasattr(ns, "_prog"):
            ns._prog = self.prog
        return ns, extras

    def parse_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        for raw in argv:
            if not is_utf8(raw):
                self.error(f"argument {_shown(raw)} is not valid UTF-8 text (a file name? rename it)")
        ns, extras = self.parse_known_args(argv, namespace)
        prog = vars(ns).pop("_prog", self.prog)
        cmd = getattr(ns, "cmd", None)
        if extras and cmd in argv and extras[0] in argv and argv.index(extras[0]) < argv.index(cmd):
            prog = self.prog  # given before the subcommand: the top level's option, not the subcommand's
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}", prog)
        return ns


def _int_at_least(low: int, high: int = 2**32 - 1):
    """Whole numbers from ``low`` up to ``high`` (the contract's uint32 fields by default)."""

    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
        if value < low:
            want = "a positive whole number" if low == 1 else f"a whole number >= {low}"
            raise argparse.ArgumentTypeError(f"must be {want}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse


def _float_in(low: float, high: float | None = None):
    def parse(raw: str) -> float:
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
        if not (low <= value and (value <= high if high is not None else math.isfinite(value))):
            span = f"[{low:g}, {high:g}]" if high is not None else f"[{low:g}, ∞)"
            raise argparse.ArgumentTypeError(f"must be in {span}, got {raw}")
        return value

    return parse


def is_utf8(*texts: str) -> bool:
    """Whether every one of ``texts`` encodes as UTF-8: bytes of a command line that are not UTF-8
    come as lone surrogates, as do JSON's \\ud800 escapes, and no request can carry them."""
    try:
        for t in texts:
            t.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def text(raw: str) -> str:
    """A non-empty text argument (a memory id, a stop string)."""
    if not raw:
        raise argparse.ArgumentTypeError("must not be empty")
    return raw


def key_value(raw: str) -> tuple[str, str]:
    """A ``key=value`` argument (a label, a metadata entry, a filter) with a non-blank key -> (key, value)."""
    key, eq, value = raw.partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"{_shown(raw)} must look like key=value (a non-blank key)")
    return key, value


def document(raw: str) -> str:
    """A document argument of ``docs upsert``: ``id=text`` (both non-empty), ``@FILE`` or ``@FILE.jsonl``."""
    if raw.startswith("@"):
        if raw == "@":
            raise argparse.ArgumentTypeError("'@' names no file: give @FILE or @FILE.jsonl")
        return raw
    doc_id, eq, body = raw.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"document {_shown(raw)} must be id=text, @file or @file.jsonl")
    if not doc_id.strip() or not body.strip():
        raise argparse.ArgumentTypeError(
            f"document {_shown(raw)}: blank {'id' if not doc_id.strip() else 'text'} (give id=text)"
        )
    return raw


def _short(text: str, n: int) -> str:
    """``text`` on one line, cut to ``n`` characters with an ellipsis (every ``extmind`` command's)."""
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _shown(raw: str) -> str:
    # repr keeps it on one line and shows what matters here: blanks, escapes, undecodable bytes
    return repr(raw if len(raw) <= 30 else raw[:29] + "…")


POSITIVE, NON_NEGATIVE = _int_at_least(1), _int_at_least(0)
SEED = _int_at_least(0, 2**64 - 1)  # uint64 in the contract
MEMORY_TOP_K = _int_at_least(1, 1024)  # the generator's largest ExtendedMind.top_k (0 there: no retrieval)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="extmind",
        description="Talk to a running extmind cluster.",
        epilog="Targets: EMBEDDER_URL, MEMORY_URL, GENERATOR_URL when set, else the URLs `make up` "
        "recorded in <run dir>/cluster.json, else 127.0.0.1 with the *_PORT variables.",
    )
    p.add_argument("--run-dir", default=None, help="run dir of the cluster to talk to [$EXTMIND_RUN_DIR or .run]")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("status", help="services, ports, pids and health")
    s.add_argument("--run-dir", dest="status_run_dir", default=None, help="same as extmind --run-dir")

    s = sub.add_parser("embed", help="embed texts ('-' reads stdin)")
    s.add_argument("texts", nargs="+", help="texts to embed ('-' = one text from stdin)")
    s.add_argument("--model", help="alias or served model name (default: the server's)")
    s.add_argument("--query", action="store_true", help="embed as search queries (adds the instruction)")
    s.add_argument("--instruction", help="query task description")
    s.add_argument("--dimensions", type=NON_NEGATIVE, default=0, help="Matryoshka size (0 = full)")
    s.add_argument("--json", action="store_true", help="print the vectors as JSON")

    s = sub.add_parser("rerank", help="score documents against a query")
    s.add_argument("query", help="the text the documents are scored against")
    s.add_argument("documents", nargs="+", help="the texts to score")
    s.add_argument("--top-n", type=NON_NEGATIVE, default=0, help="results to return (0 = all)")
    s.add_argument("--model", help="reranker alias or served model name (default: the server's)")
    s.add_argument("--instruction", help="task description given to the reranker")

    d = sub.add_parser("docs", help="document collections: upsert, search, delete, create, collections, drop")
    dsub = d.add_subparsers(dest="docs_cmd", required=True, metavar="ACTION")
    s = dsub.add_parser("upsert", help="add or replace documents: id=text, @file (id = file name), @file.jsonl")
    s.add_argument("collection", help="collection name")
    s.add_argument(
        "items",
        nargs="+",
        type=document,
        help='id=text, @file (id = the file name) or @file.jsonl (one {"id", "text", "metadata"} a line)',
    )
    s.add_argument("--meta", action="append", type=key_value, help="key=value metadata for every document")
    s = dsub.add_parser("search", help="semantic search")
    s.add_argument("collection", help="collection name")
    s.add_argument("query", help="the text to search for")
    s.add_argument("--top-k", type=POSITIVE, default=5, help="results to return (default: 5)")
    s.add_argument("--filter", action="append", type=key_value, help="key=value exact metadata match")
    s = dsub.add_parser("delete", help="delete documents by id")
    s.add_argument("collection", help="collection name")
    s.add_argument("ids", nargs="+", help="document ids")
    s = dsub.add_parser("create", help="create an empty collection (upsert also creates one on first use)")
    s.add_argument("collection", help="collection name")
    s.add_argument("--model", help="embedding model (default: ask the embedder)")
    s.add_argument("--dimensions", type=NON_NEGATIVE, default=0, help="vector size (0 = the model's)")
    dsub.add_parser("collections", help="list the collections")
    s = dsub.add_parser("drop", help="delete a collection and all its documents")
    s.add_argument("collection", help="collection name")

    s = sub.add_parser("memorize", help="turn text files into KV memories ('-' reads stdin)")
    s.add_argument("files", nargs="+", help="UTF-8 text files, one memory each ('-' = stdin)")
    s.add_argument("--id", help="memory id (default: the file name)")
    s.add_argument("--label", action="append", type=key_value, help="key=value label")
    s.add_argument(
        "--split-chars",
        type=NON_NEGATIVE,
        default=0,
        help="split long files at paragraph boundaries into memories ID.000, ID.001, … of about N chars (0 = no split)",
    )
    s.add_argument(
        "--replace", action="store_true", help="delete and memorize again a memory id that exists (default: skip it)"
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")

    m = sub.add_parser("memories", help="KV memories: list, show, delete")
    msub = m.add_subparsers(dest="mem_cmd", required=True, metavar="ACTION")
    s = msub.add_parser("list", help="every memory: state, rows, size, model fingerprint")
    s.add_argument("--fingerprint", help="only memories of this model")
    s = msub.add_parser("show", help="one memory's layout, labels and the start of its text")
    s.add_argument("memory_id", help="memory id (`extmind memories list`)")
    s.add_argument("--tokens", action="store_true", help="also print the token ids")
    s = msub.add_parser("delete", help="delete memories")
    s.add_argument("memory_ids", nargs="+", metavar="memory_id", help="memory ids (`extmind memories list`), in order")

    s = sub.add_parser("generate", help="generate text, streamed ('-' reads the prompt from stdin)")
    s.add_argument(
        "prompt",
        help="the prompt text, or '-' to read it from stdin, verbatim: a trailing newline stays in "
        "the prompt (`printf`, not `echo`, for a prompt ending in 'Answer:')",
    )
    s.add_argument("--memory", action="append", type=text, help="memory id to attend to (repeatable)")
    s.add_argument("--citations", action="store_true", help="print the memory spans retrieved most (needs --memory)")
    s.add_argument(
        "--memory-top-k",
        type=MEMORY_TOP_K,
        default=None,
        help="memory rows retrieved per head and token (1-1024; default: 10)",
    )
    s.add_argument("--max-citations", type=POSITIVE, default=None, help="most spans --citations prints (default: 5)")
    s.add_argument(
        "--citation-min-weight",
        type=_float_in(0.0, 1.0),
        default=None,
        help="a retrieval counts for --citations only when its memory got at least this share of the "
        "head's attention (default: 0.02; 0 = every top-k pick)",
    )
    s.add_argument("--remote", action="store_true", help="search memories on the memory service every step")
    s.add_argument("--chat", action="store_true", help="apply the model's chat template")
    s.add_argument("--max-tokens", type=POSITIVE, default=128, help="most tokens to generate (default: 128)")
    s.add_argument("--temperature", type=_float_in(0.0), default=0.0, help="0 = greedy (the default)")
    s.add_argument("--top-p", type=_float_in(0.0, 1.0), default=0.0, help="nucleus mass (0 = off)")
    s.add_argument("--top-k", type=NON_NEGATIVE, default=0, help="sample among the k likeliest tokens (0 = off)")
    s.add_argument("--seed", type=SEED, default=None, help="sampling seed, for repeatable output")
    s.add_argument("--stop", action="append", type=text, help="stop before this text (repeatable)")
    return p


def check_combinations(a) -> None:
    """Combinations argparse cannot express; errors exit 2 like argparse's own."""
    if a.cmd == "generate" and not a.memory:
        needs = [
            f
            for f, on in (
                ("--citations", a.citations),
                ("--memory-top-k", a.memory_top_k is not None),
                ("--max-citations", a.max_citations is not None),
                ("--citation-min-weight", a.citation_min_weight is not None),
                ("--remote", a.remote),
            )
            if on
        ]
        if needs:
            sys.stderr.write(
                f"extmind generate: {', '.join(needs)} needs --memory ID (the memories to attend to) "
                "(see `extmind generate --help`)\n"
            )
            sys.exit(2)
    if a.cmd == "generate" and a.memory:
        # The generator refuses a repeated memory id in its own terms (memory_ids); say it in the CLI's.
        twice = sorted({m for m in a.memory if a.memory.count(m) > 1})
        if twice:
            sys.stderr.write(
                f"extmind generate: --memory {', '.join(twice)} given more than once: name each memory once "
                "(see `extmind generate --help`)\n"
            )
            sys.exit(2)
    if a.cmd == "generate" and not a.citations:
        given = (("--max-citations", a.max_citations), ("--citation-min-weight", a.citation_min_weight))
        shaping = [f for f, v in given if v is not None]
        if shaping:
            sys.stderr.write(
                f"extmind generate: {', '.join(shaping)} only shapes what --citations prints: add --citations "
                "(see `extmind generate --help`)\n"
            )
            sys.exit(2)
