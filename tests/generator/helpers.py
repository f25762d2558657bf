"""Helpers shared by the generator tests."""

from __future__ import annotations

from extmind.service_procs import ServiceProcess
from services.generator.request_types import Chunk, Final

PROMPTS = [
    "The quick brown fox",
    "Paris is the capital of",
    "Alice met Bob at the",
    "In 1969 people walked",
    "Water boils at",
    "def add(a, b):",
    "The river flows to",
    "Machine learning models turn text",
]


async def events(engine, req) -> tuple[list[Chunk], Final]:
    """-> (the Chunks, the Final) of one request run to its end."""
    chunks, final = [], None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            chunks.append(ev)
        else:
            final = ev
    return chunks, final


async def run(engine, req):
    """-> (token ids, logprobs, text, Final) of one request run to its end."""
    chunks, final = await events(engine, req)
    tokens = [t for c in chunks for t in c.token_ids]
    lps = [x for c in chunks for x in c.logprobs]
    text = "".join(c.text for c in chunks) + final.remaining_text
    return tokens, lps, text, final


def start_generator(log_dir, model, memory_address: str, *args: str) -> ServiceProcess:
    """``python -m services.generator --model MODEL ARGS`` on a real memory service, SERVING (its
    HTTP face off unless ARGS give ``--http-port``: the default port may be taken)."""
    return ServiceProcess(
        "services.generator",
        ["--model", str(model), "--log-format", "text", "--http-port", "-1", *args],
        env={"EXTMIND_AUTH_TOKEN": "", "MEMORY_URL": memory_address},
        log_dir=log_dir,
        health_service="extmind.v1.GeneratorService",
    ).start()
