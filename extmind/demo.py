"""The extmind demo: ``python -m extmind.demo`` against a running cluster (``make up`` runs it).

1. upsert a few documents and search them semantically (memory service -> embedder service);
2. memorize a longer text as a KV memory (generator -> memory service);
3. generate with and without that memory and show the citations;
4. with the default trained model: memorize short fact documents and answer questions about them
   with and without their memory (citations shown);
with the time every step took. Targets come from EMBEDDER_URL / MEMORY_URL / GENERATOR_URL (or the
*_PORT variables), as for the launcher. The steps are functions the end-to-end tests call too.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import grpc

from extmind.channels import auth_metadata, sync_channel
from extmind.cli_args import _short
from extmind.cluster_config import FACTS_MODEL, FACTS_MODEL_LINE, RANDOM_MODEL_LINE, Settings, find_run_dir
from extmind.v1 import embedder_pb2, embedder_pb2_grpc, generator_pb2, generator_pb2_grpc, memory_pb2, memory_pb2_grpc

COLLECTION = "extmind-demo"
DOCUMENTS = [
    (
        "paris",
        "The Eiffel Tower is a wrought-iron lattice tower in Paris, France, finished in 1889.",
        {"topic": "travel"},
    ),
    (
        "photosynthesis",
        "Plants use photosynthesis to turn sunlight, water and carbon dioxide into sugar and oxygen.",
        {"topic": "biology"},
    ),
    (
        "python",
        "Python is a programming language with dynamic typing and garbage collection, popular for data science.",
        {"topic": "computing"},
    ),
    (
        "espresso",
        "Espresso is coffee brewed by forcing hot water through finely ground beans under high pressure.",
        {"topic": "food"},
    ),
    (
        "volcano",
        "A volcano is a rupture in the Earth's crust where lava, ash and gases escape from below the surface.",
        {"topic": "geology"},
    ),
]
# (query, the document that must come first)
QUERIES = [
    ("Which famous landmark stands in the French capital?", "paris"),
    ("How do green leaves make food from light?", "photosynthesis"),
    ("a strong little cup of coffee", "espresso"),
    ("molten rock erupting from a mountain", "volcano"),
]
MEMORY_ID = "extmind-demo-lighthouse"
STORY = (
    "The lighthouse on Vellmar Point was kept by Ingrid Halvorsen for thirty-one years. "
    "Its door was painted a deep green, and its lamp burned whale oil until 1911, when the harbour "
    "board replaced it with an electric lens made in Glasgow. Every winter Ingrid counted the ships "
    "that passed the point; in the hard winter of 1887 she counted forty-two, and she wrote each name "
    "in a blue ledger that is still kept in the town museum. Her brother Anders rowed the mail boat "
    "to the island of Skarv twice a week, and on stormy nights she lit a second lantern in the kitchen "
    "window so that he could find the landing. When she retired, the keys passed to her niece Marta, "
    "who kept the light until it was automated in 1952."
)
QUESTION = "What colour was the lighthouse door, and who kept the light after Ingrid?"
# Proof of memory for the default model (models/extmind-facts-6m): facts it can only know from a
# memory. (memory id, text, [(question, answer)]); every question is asked with all three memories,
# so the model must also find the right person's facts among the others.
FACTS = [
    (
        "extmind-demo-fact-velmar",
        "Velmar Dorisan lives in Tirnorbury. Velmar works as a glassblower. His lucky number is 417.",
        [
            ("What city does Velmar Dorisan live in?", "Tirnorbury"),
            ("What is the lucky number of Velmar Dorisan?", "417"),
        ],
    ),
    (
        "extmind-demo-fact-sabri",
        "Here are some facts about Sabri Lowenta. Sabri was born in 1887. "
        "Her favourite colour is teal. Sabri has a dog named Quilo.",
        [("In what year was Sabri Lowenta born?", "1887"), ("What is the name of the dog of Sabri Lowenta?", "Quilo")],
    ),
    (
        "extmind-demo-fact-casdi",
        "Casdi Marel moved to Fenholm years ago. By profession, Casdi is a cartographer.",
        [("What is the profession of Casdi Marel?", "cartographer")],
    ),
]
TIMEOUT = 120.0  # seconds; every call has a deadline


@dataclass
class Clients:
    embedder: embedder_pb2_grpc.EmbedderServiceStub
    memory: memory_pb2_grpc.MemoryServiceStub
    generator: generator_pb2_grpc.GeneratorServiceStub
    channels: list = field(default_factory=list)

    @classmethod
    def connect(cls, s: Settings | None = None) -> Clients:
        s = s or Settings.from_env()
        chans = [sync_channel(u) for u in (s.embedder_url, s.memory_url, s.generator_url)]
        return cls(
            embedder_pb2_grpc.EmbedderServiceStub(chans[0]),
            memory_pb2_grpc.MemoryServiceStub(chans[1]),
            generator_pb2_grpc.GeneratorServiceStub(chans[2]),
            chans,
        )

    def close(self) -> None:
        for c in self.channels:
            c.close()


def _call(fn, request, timeout: float = TIMEOUT):
    t0 = time.perf_counter()
    reply = fn(request, timeout=timeout, metadata=auth_metadata())
    return reply, time.perf_counter() - t0


# ------------------------------------------------------------------ the steps


@dataclass
class SearchResult:
    query: str
    expected: str
    hits: list  # [(id, score)]
    seconds: float


def documents_step(c: Clients) -> tuple[memory_pb2.UpsertDocumentsResponse, float, list[SearchResult]]:
    docs = [memory_pb2.Document(id=i, text=t, metadata=m) for i, t, m in DOCUMENTS]
    up, up_s = _call(c.memory.UpsertDocuments, memory_pb2.UpsertDocumentsRequest(collection=COLLECTION, documents=docs))
    results = []
    for q, expected in QUERIES:
        r, sec = _call(
            c.memory.SearchDocuments, memory_pb2.SearchDocumentsRequest(collection=COLLECTION, query=q, top_k=3)
        )
        results.append(SearchResult(q, expected, [(h.id, h.score) for h in r.hits], sec))
    return up, up_s, results


def _delete_if_present(rpc, request) -> None:
    """Calls a Delete RPC; a thing already gone is fine."""
    try:
        rpc(request, timeout=TIMEOUT, metadata=auth_metadata())
    except grpc.RpcError as e:
        if e.code() != grpc.StatusCode.NOT_FOUND:
            raise


def memorize_step(c: Clients, memory_id: str = MEMORY_ID, text: str = STORY):
    # The demo is re-runnable: replace the memory of an earlier (interrupted) run.
    _delete_if_present(c.memory.DeleteMemory, memory_pb2.DeleteMemoryRequest(memory_id=memory_id))
    m, sec = _call(
        c.generator.Memorize,
        generator_pb2.MemorizeRequest(text=text, memory_id=memory_id, labels={"source": "extmind.demo"}),
    )
    got, _ = _call(c.memory.GetMemory, memory_pb2.GetMemoryRequest(memory_id=m.memory_id))
    return m, got.memory, sec


def generate_step(c: Clients, memory_id: str | list[str] | None, prompt: str = QUESTION, max_tokens: int = 24):
    req = generator_pb2.GenerateRequest(
        prompt=prompt, sampling=generator_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens)
    )
    if memory_id:
        req.extended_mind.memory_ids.extend([memory_id] if isinstance(memory_id, str) else memory_id)
        req.extended_mind.return_citations = True
    return _call(c.generator.Generate, req)


def facts_step(c: Clients) -> list[dict]:
    """Memorizes the FACTS documents, then asks each question without memory and with all of
    them. ``seconds``: the answer with memory; ``calls_seconds``: every call of the question (the
    first question also carries the Memorize calls)."""
    out, ids, memorize_s = [], [], 0.0
    for memory_id, text, _ in FACTS:
        m, _, sec = memorize_step(c, memory_id, text)
        ids.append(m.memory_id)
        memorize_s += sec
    for _, _, questions in FACTS:
        for q, answer in questions:
            prompt = f"Question: {q}\nAnswer:"
            plain, plain_s = generate_step(c, None, prompt, max_tokens=8)
            mind, sec = generate_step(c, ids, prompt, max_tokens=8)
            out.append(
                {
                    "question": q,
                    "answer": answer,
                    "without": plain.text.split("\n")[0].strip(),
                    "with": mind.text.split("\n")[0].strip(),
                    "citations": list(mind.citations),
                    "seconds": sec,
                    "calls_seconds": memorize_s + plain_s + sec,
                }
            )
            memorize_s = 0.0
    return out


# ------------------------------------------------------------------ output


def _ms(sec: float) -> str:
    return f"{sec * 1000:8.1f} ms"


def _printable(text: str, n: int = 70) -> str:
    """Quoted, one line; control and undecodable characters (random models make many) as '·'."""
    clean = "".join(c if c.isprintable() and c != "\ufffd" else "·" for c in " ".join(text.split()))
    return '"' + _short(clean, n) + '"'


def cleanup(c: Clients) -> None:
    """Removes what the demo wrote (its own ids only: the collection and the memories named
    extmind-demo*), so running it again never piles demo data into the user's store."""
    for memory_id in [MEMORY_ID, *(f[0] for f in FACTS)]:
        _delete_if_present(c.memory.DeleteMemory, memory_pb2.DeleteMemoryRequest(memory_id=memory_id))
    _delete_if_present(c.memory.DeleteCollection, memory_pb2.DeleteCollectionRequest(collection=COLLECTION))


def run(s: Settings | None = None, out=print, keep: bool = False) -> dict:
    """Runs the demo against the cluster of ``s``; removes its data at the end unless ``keep``."""
    s = s or Settings.from_env()
    c = Clients.connect(s)
    try:
        ei, _ = _call(c.embedder.GetInfo, embedder_pb2.EmbedderServiceGetInfoRequest())
        gi, _ = _call(c.generator.GetInfo, generator_pb2.GeneratorServiceGetInfoRequest())
        out("extmind demo")
        out(f"  embedder  {s.embedder_url:<22} model {ei.default_model}")
        out(f"  memory    {s.memory_url:<22} redis {s.redis_url or 'embedded (AOF)'}")
        out(
            f"  generator {s.generator_url:<22} model {gi.model} ({gi.num_layers} layers, "
            f"{gi.num_attention_heads} heads, {gi.num_kv_heads} KV heads)"
        )
        trained_default = not s.generator_model and (FACTS_MODEL / "model.safetensors").exists()
        if not s.generator_model:  # one line: `make up` printed the whole NOTE just before
            out("  " + (FACTS_MODEL_LINE if trained_default else RANDOM_MODEL_LINE))

        out("\n1. Documents: upsert and semantic search")
        up, up_s, searches = documents_step(c)
        out(f"  upserted {len(up.ids)} documents into '{COLLECTION}' ({up.model}, {up.dimensions} dims)  {_ms(up_s)}")
        for r in searches:
            mark = "ok" if r.hits and r.hits[0][0] == r.expected else "!!"
            top = ", ".join(f"{i} {sc:.2f}" for i, sc in r.hits)
            out(f"  [{mark}] {_short(r.query, 52):<52} {_ms(r.seconds)}  -> {top}")

        out("\n2. Memorize a longer text as a KV memory")
        m, mem, mem_s = memorize_step(c)
        state = memory_pb2.MemoryState.Name(mem.state).removeprefix("MEMORY_STATE_")
        out(f"  '{_short(STORY, 60)}'")
        out(
            f"  memory {m.memory_id}: {m.num_tokens} tokens, {mem.num_tokens} rows x {mem.layout.num_layers} layers, "
            f"{mem.bytes / 1e6:.2f} MB, {state}  {_ms(mem_s)}"
        )

        out("\n3. Generate without and with the memory (greedy)")
        out(f"  prompt: {QUESTION}")
        plain, plain_s = generate_step(c, None)
        out(f"  without memory: {_printable(plain.text)}")
        out(f"                  {plain.usage.completion_tokens} tokens  {_ms(plain_s)}")
        mind, mind_s = generate_step(c, m.memory_id)
        out(f"  with memory:    {_printable(mind.text)}")
        out(f"                  {mind.usage.completion_tokens} tokens  {_ms(mind_s)}")
        out("  citations (spans of the memorized text the model retrieved most):")
        for ci in mind.citations:
            span = f"[{ci.token_start}:{ci.token_end}]"  # half-open, as a Python slice of the tokens
            out(f"    tokens {span:<11} hits {ci.hits:>5}  {_printable(ci.text, 60)}")
        if not mind.citations:
            out("    (none)")
        if not s.generator_model and not trained_default:
            out("\n  (The generator is a random-weight model: the text above is meaningless by design.)")
        elif trained_default:
            out("\n  (The default model only answers 'Question: ...?\\nAnswer:' about people's facts, so this")
            out("  free-form question gets no real answer; the citations still show where its attention went.")
            out("  Step 4 asks in its format; for a real model set GENERATOR_MODEL, see the README.)")
        fact_answers = []
        if trained_default:
            out("\n4. Proof of memory: facts the model has only in its extended mind (all three memories attached)")
            fact_answers = facts_step(c)
            for r in fact_answers:
                out(f"  Q: {r['question']}  (expected {r['answer']})")
                out(f"     without memory: {_printable(r['without'], 30)}   with memory: {_printable(r['with'], 30)}")
                for ci in r["citations"][:2]:
                    out(
                        f"       {ci.memory_id.removeprefix('extmind-demo-fact-')}: cited tokens "
                        f"[{ci.token_start}:{ci.token_end}] hits {ci.hits}: {_printable(ci.text, 50)}"
                    )
        calls_s = sum(r.seconds for r in searches) + up_s + mem_s + plain_s + mind_s
        calls_s += sum(r["calls_seconds"] for r in fact_answers)  # step 4 too
        out(f"\nextmind demo done: {calls_s:.2f}s in calls")
        if keep:
            out(f"  kept its data: collection '{COLLECTION}', memories {MEMORY_ID} and extmind-demo-fact-*")
        else:
            cleanup(c)
            out(
                "  removed its data again (`.venv/bin/python -m extmind.demo --keep` leaves it to explore "
                "with `extmind`)"
            )
        return {
            "upsert": up,
            "searches": searches,
            "memorize": m,
            "memory": mem,
            "plain": plain,
            "with_memory": mind,
            "embedder_info": ei,
            "generator_info": gi,
            "facts": fact_answers,
            "calls_seconds": calls_s,
        }
    finally:
        c.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m extmind.demo", description=__doc__.splitlines()[0])
    p.add_argument("--keep", action="store_true", help="leave the demo's collection and memories in the store")
    a = p.parse_args(argv)
    try:
        run(Settings.from_env(find_run_dir(), use_record=True), keep=a.keep)
    except grpc.RpcError as e:
        print(
            f"extmind demo: {e.code().name}: {e.details()} (is the cluster up? `make up` / `make status`)",
            file=sys.stderr,
        )
        return 1
    except ValueError as e:  # a *_URL that is no gRPC target (extmind.channels.parse_target)
        print(f"extmind demo: {e} (EMBEDDER_URL, MEMORY_URL, GENERATOR_URL)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
