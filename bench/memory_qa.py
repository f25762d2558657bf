"""Proof of memory: does the trained model answer from facts it has only in its extended mind?

    python -m bench.memory_qa --n 100 --seed 1 [--top-k 10] [--model models/extmind-facts-6m] [--no-rag]

Generates ``n`` new fact documents and one question each (training/facts.py, seed ``--seed``;
training used seed 0), starts real services (Redis, memory service, generator; and the embedder
for the rag row) and asks every question through the generator's gRPC API, greedy, stop at a
newline. A question is right when the generated text, stripped, equals the answer.

    memory_local    the document only in memory (Memorize), question alone in the prompt, LOCAL retrieval
    memory_remote   same, REMOTE retrieval (FAISS on the memory service)
    context         document + question in the prompt, no memory
    none            question alone, no memory (chance: should stay low)
    distractors     memory = the right document + 100 documents of 5 other people each
    citations       (memory_local) the top citation span overlaps the sentence that states the answer
    rag             the question searches the documents (embedder + memory service); the top hit
                    goes in the prompt as context

The last line is machine-readable: ``memory_qa: memory_local=0.93 ...``.
"""

# No MLX runs in this process (the services pick their own BLAS), so no OpenBLAS re-exec here:
# pytest imports this module too.
import argparse
import tempfile
import time
from pathlib import Path

from extmind.channels import sync_channel
from extmind.procs import RedisProcess
from extmind.service_procs import ServiceProcess
from extmind.v1 import generator_pb2, generator_pb2_grpc, memory_pb2, memory_pb2_grpc
from training import facts

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "extmind-facts-6m"
TIMEOUT = 300.0


class Cluster:
    """Redis + memory service + generator (+ embedder) as real processes."""

    def __init__(self, model: Path, work: Path, embedder: bool = False):
        self.redis = RedisProcess(work / "redis").start()
        self.procs = []
        mem_args = ["--redis-url", self.redis.url, "--log-format", "text"]
        env = {"EXTMIND_AUTH_TOKEN": ""}
        if embedder:
            emb = ServiceProcess(
                "services.embedder", ["--http-port", "-1"], env=env, log_dir=work / "logs", start_timeout=300
            )
            self.procs.append(emb.start())
            mem_args += ["--embedder-url", emb.address]
        mem = ServiceProcess(
            "services.memory", mem_args, env=env, log_dir=work / "logs", health_service="extmind.v1.MemoryService"
        )
        self.procs.append(mem.start())
        gen = ServiceProcess(
            "services.generator",
            ["--model", str(model), "--memory-url", mem.address, "--log-format", "text", "--http-port", "-1"],
            env=env,
            log_dir=work / "logs",
            start_timeout=300,
        )
        self.procs.append(gen.start())
        self.channels = [sync_channel(mem.address), sync_channel(gen.address)]
        self.memory = memory_pb2_grpc.MemoryServiceStub(self.channels[0])
        self.generator = generator_pb2_grpc.GeneratorServiceStub(self.channels[1])

    def close(self) -> None:
        for c in self.channels:
            c.close()
        for p in reversed(self.procs):
            p.stop()
        self.redis.close()

    def memorize(self, text: str) -> str:
        return self.generator.Memorize(generator_pb2.MemorizeRequest(text=text), timeout=TIMEOUT).memory_id

    def ask(self, prompt: str, memory_ids=(), top_k: int = 10, remote: bool = False, citations: bool = False):
        req = generator_pb2.GenerateRequest(
            prompt=prompt, sampling=generator_pb2.SamplingParams(temperature=0.0, max_tokens=12, stop=["\n"])
        )
        if memory_ids:
            req.extended_mind.memory_ids.extend(memory_ids)
            req.extended_mind.top_k = top_k
            req.extended_mind.return_citations = citations
            if remote:
                req.extended_mind.mode = generator_pb2.RETRIEVAL_MODE_REMOTE
        return self.generator.Generate(req, timeout=TIMEOUT)


def answer_of(text: str) -> str:
    return text.split("\n")[0].strip()


def answer_sentence(doc: str, qa: facts.QA) -> tuple[int, int]:
    """Character range of the sentence of ``doc`` that states the answer."""
    value = qa.answer.strip()
    start = 0
    for sent in doc.replace("\n", " ").split(". "):
        end = start + len(sent)
        if value in sent:
            return start, end
        start = end + 2
    return 0, len(doc)


def cites_answer(doc: str, qa: facts.QA, reply) -> bool:
    if not reply.citations:
        return False
    top = max(reply.citations, key=lambda c: c.hits)
    text = top.text.strip()
    at = doc.find(text) if text else -1
    if at < 0:
        return False
    lo, hi = answer_sentence(doc, qa)
    return at < hi and at + len(text) > lo


def run(
    model: Path,
    n: int,
    seed: int,
    top_k: int,
    rag: bool = True,
    distractors: int = 100,
    n_distractor_questions: int | None = None,
    out=print,
) -> dict:
    pairs = facts.eval_set(seed, n)
    work = Path(tempfile.mkdtemp(prefix="bench-memqa-"))
    t0 = time.time()
    cluster = Cluster(model, work, embedder=rag)
    rows: dict[str, list[bool]] = {
        k: [] for k in ("memory_local", "memory_remote", "context", "none", "distractors", "citations", "rag")
    }
    examples = []
    try:
        ids = [cluster.memorize(doc) for doc, _ in pairs]
        for (doc, qa), mid in zip(pairs, ids):
            want = qa.answer.strip()
            local = cluster.ask(qa.question, [mid], top_k, citations=True)
            rows["memory_local"].append(answer_of(local.text) == want)
            rows["citations"].append(cites_answer(doc, qa, local))
            remote = cluster.ask(qa.question, [mid], top_k, remote=True)
            rows["memory_remote"].append(answer_of(remote.text) == want)
            rows["context"].append(answer_of(cluster.ask(facts.context_prompt(doc, qa)).text) == want)
            none = cluster.ask(qa.question)
            rows["none"].append(answer_of(none.text) == want)
            if len(examples) < 5:
                examples.append((qa.question.split("\n")[0], want, answer_of(local.text), answer_of(none.text)))
        if distractors:
            dist_ids = [cluster.memorize(d) for d in facts.distractor_docs(seed + 10_000, distractors)]
            for (_, qa), mid in list(zip(pairs, ids))[: n_distractor_questions or n]:
                r = cluster.ask(qa.question, [mid] + dist_ids, top_k)
                rows["distractors"].append(answer_of(r.text) == qa.answer.strip())
        if rag:
            coll = f"memqa-{seed}"
            cluster.memory.UpsertDocuments(
                memory_pb2.UpsertDocumentsRequest(
                    collection=coll,
                    documents=[memory_pb2.Document(id=str(i), text=doc) for i, (doc, _) in enumerate(pairs)],
                ),
                timeout=TIMEOUT,
            )
            for _, qa in pairs:
                hits = cluster.memory.SearchDocuments(
                    memory_pb2.SearchDocumentsRequest(
                        collection=coll, query=qa.question.split("\n")[0].removeprefix("Question: "), top_k=1
                    ),
                    timeout=TIMEOUT,
                ).hits
                ctx = hits[0].text if hits else ""
                rows["rag"].append(answer_of(cluster.ask(facts.context_prompt(ctx, qa)).text) == qa.answer.strip())
    finally:
        cluster.close()
    scores = {k: (sum(v) / len(v) if v else float("nan")) for k, v in rows.items()}
    out(f"memory_qa: model {model}, n={n}, seed={seed}, top_k={top_k}, {time.time() - t0:.0f}s")
    out("| question                                        | answer     | with memory | no memory |")
    out("|-------------------------------------------------|------------|-------------|-----------|")
    for q, want, got, none in examples:
        out(f"| {q[:47]:<47} | {want[:10]:<10} | {got[:11]:<11} | {none[:9]:<9} |")
    out("")
    out("| measure | score | questions |")
    out("|---|---|---|")
    for k, v in rows.items():
        out(f"| {k} | {scores[k]:.2f} | {len(v)} |")
    out("memory_qa: " + " ".join(f"{k}={scores[k]:.2f}" for k in rows))
    return scores


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--distractors", type=int, default=100, help="distractor documents (5 people each); 0 = skip")
    p.add_argument("--distractor-questions", type=int, default=0, help="questions asked with distractors (0 = all)")
    p.add_argument("--no-rag", action="store_true", help="skip the rag row (no embedder service)")
    a = p.parse_args(argv)
    run(
        a.model,
        a.n,
        a.seed,
        a.top_k,
        rag=not a.no_rag,
        distractors=a.distractors,
        n_distractor_questions=a.distractor_questions or None,
    )


if __name__ == "__main__":
    main()
