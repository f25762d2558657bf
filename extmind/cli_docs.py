"""``extmind docs ...``: upsert, search, delete documents; create, list, drop collections."""

from __future__ import annotations

import json
from pathlib import Path

from extmind.cli_args import is_utf8
from extmind.cli_common import TIMEOUT, CliError, Targets, _md, _read_text, _short, counted
from extmind.v1 import memory_pb2


def _documents(items: list[str], meta: dict) -> list[memory_pb2.Document]:
    docs = []
    for it in items:
        if it.startswith("@"):
            path = Path(it[1:])
            body = _read_text(str(path))
            if path.suffix == ".jsonl":
                found = [_jsonl_document(path, n, line, meta) for n, line in _lines(body) if line.strip()]
                if not found:
                    raise CliError(f"{path} holds no documents: one JSON object with 'id' and 'text' a line")
                docs += found
            elif not body.strip():
                raise CliError(f"{path} is empty: nothing to upsert")
            else:
                docs.append(memory_pb2.Document(id=path.name, text=body, metadata=meta))
        else:  # id=text, both non-empty (cli_args.document)
            i, text = it.split("=", 1)
            docs.append(memory_pb2.Document(id=i, text=text, metadata=meta))
    return docs


def _lines(body: str):
    """(number, line) of a JSON Lines text: split at newlines only (``str.splitlines`` also splits
    at U+2028 and the like, which JSON strings may hold as they are)."""
    return enumerate(body.removeprefix("\ufeff").split("\n"), 1)


def _jsonl_document(path: Path, n: int, line: str, meta: dict) -> memory_pb2.Document:
    """One line of an @file.jsonl -> a Document, or a CliError naming the file, the line and what to change."""
    where = f"{path}:{n}"
    try:
        d = json.loads(line)
    except ValueError as e:  # JSONDecodeError, or a number past Python's digit limit
        raise CliError(f"{where}: not valid JSON ({_short(str(e), 80)})") from None
    try:
        doc_id, text, more = d["id"], d["text"], d.get("metadata")
    except (KeyError, TypeError, AttributeError):
        raise CliError(f"{where}: each line must be a JSON object with 'id' and 'text'") from None
    more = {} if more is None else more  # null: no metadata of its own ("", [], 0 are refused below)
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int) or not str(doc_id).strip():
        raise CliError(f"{where}: 'id' must be a non-empty string (or a whole number)")
    if not isinstance(text, str) or not text.strip():
        raise CliError(f"{where}: 'text' must be a non-empty string")
    if not isinstance(more, dict) or not all(isinstance(v, str) and k.strip() for k, v in more.items()):
        hint = (
            ' (quote numbers: "2024")'
            if isinstance(more, dict) and any(isinstance(v, int | float) for v in more.values())
            else ""
        )
        raise CliError(f"{where}: 'metadata' must map non-empty names to strings{hint}")
    if not is_utf8(str(doc_id), text, *more, *more.values()):
        raise CliError(f"{where}: text that is not valid UTF-8 (a lone surrogate such as \\ud800)")
    return memory_pb2.Document(id=str(doc_id), text=text, metadata={**meta, **more})


def cmd_docs(a, t: Targets) -> int:
    if a.docs_cmd == "upsert":
        docs = _documents(a.items, dict(a.meta or []))
        r = t.memory.UpsertDocuments(
            memory_pb2.UpsertDocumentsRequest(collection=a.collection, documents=docs), timeout=TIMEOUT, metadata=_md()
        )
        print(
            f"upserted {counted(len(r.ids), 'document')} into {a.collection} ({r.model}, {r.dimensions} dims): "
            + ", ".join(r.ids)
        )
    elif a.docs_cmd == "search":
        r = t.memory.SearchDocuments(
            memory_pb2.SearchDocumentsRequest(
                collection=a.collection, query=a.query, top_k=a.top_k, filter=dict(a.filter or [])
            ),
            timeout=TIMEOUT,
            metadata=_md(),
        )
        for h in r.hits:
            meta = " ".join(f"{k}={v}" for k, v in sorted(h.metadata.items()))
            print(f"  {h.score:7.4f}  {h.id:<20} {_short(h.text, 60)}  {meta}".rstrip())
        if not r.hits:
            print("  (no hits)")
    elif a.docs_cmd == "delete":
        r = t.memory.DeleteDocuments(
            memory_pb2.DeleteDocumentsRequest(collection=a.collection, ids=a.ids), timeout=TIMEOUT, metadata=_md()
        )
        asked = len(dict.fromkeys(a.ids))
        missing = f" ({asked - r.deleted} of the {asked} ids were not there)" if r.deleted < asked else ""
        print(f"deleted {counted(r.deleted, 'document')} from {a.collection}{missing}")
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
