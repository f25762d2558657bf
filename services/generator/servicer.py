"""GeneratorService over gRPC: validation and protobuf <-> plain data; the engine does the work."""

from __future__ import annotations

from google.protobuf import json_format

from extmind.errors import InvalidArgument
from extmind.v1 import generator_pb2, generator_pb2_grpc
from services.common.config import DEFAULT_MAX_RESPONSE_MB
from services.common.interceptor import note_access
from services.generator.engine import GeneratorEngine
from services.generator.memory_builder import MemorizeProgress
from services.generator.request_types import (
    DEFAULT_MAX_TOKENS,
    LENGTH,
    LOCAL,
    REMOTE,
    STOP,
    STOP_SEQUENCE,
    Chunk,
    Final,
    GenerationRequest,
    MemoryOptions,
    Sampling,
)

# What one generated token adds to a GenerateResponse, for the up-front size check: its id (a
# varint, at most 5 bytes), its logprob (4, when asked) and its text (8 on average; the finished
# answer's real size is checked too).
_ID_BYTES, _LOGPROB_BYTES, _TEXT_BYTES = 5, 4, 8

_FINISH = {
    STOP: generator_pb2.FINISH_REASON_STOP,
    LENGTH: generator_pb2.FINISH_REASON_LENGTH,
    STOP_SEQUENCE: generator_pb2.FINISH_REASON_STOP_SEQUENCE,
}
_MODES = {
    generator_pb2.RETRIEVAL_MODE_UNSPECIFIED: LOCAL,
    generator_pb2.RETRIEVAL_MODE_LOCAL: LOCAL,
    generator_pb2.RETRIEVAL_MODE_REMOTE: REMOTE,
}


def _citations(final: Final):
    return [
        generator_pb2.Citation(
            memory_id=c.memory_id, token_start=c.token_start, token_end=c.token_end, text=c.text, hits=c.hits
        )
        for c in final.citations
    ]


class GeneratorServicer(generator_pb2_grpc.GeneratorServiceServicer):
    def __init__(self, engine: GeneratorEngine, *, max_response_bytes: int = int(DEFAULT_MAX_RESPONSE_MB * (1 << 20))):
        self.engine = engine
        self.max_response_bytes = max_response_bytes  # --max-response-mb: what clients receive

    def _over_budget(self, what: str, size: int, fits: int | None = None) -> InvalidArgument:
        limit = f"{self.max_response_bytes / (1 << 20):.3g}"
        return InvalidArgument(
            f"{what} about {size / (1 << 20):.3g} MiB, over this server's response limit of {limit} MiB "
            "(--max-response-mb; stock gRPC clients receive at most 4 MiB): use GenerateStream"
            + (f", or ask for at most {fits} tokens (max_tokens)" if fits is not None else "")
        )

    def _check_response_size(self, req: GenerationRequest) -> None:
        """Refuses up front a Generate whose answer could pass the budget (tokens, logprobs, text)."""
        per_token = _ID_BYTES + _TEXT_BYTES + (_LOGPROB_BYTES if req.return_logprobs else 0)
        most = min(
            req.sampling.max_tokens or DEFAULT_MAX_TOKENS, max(0, self.engine.max_context - len(req.prompt_tokens))
        )
        if most * per_token > self.max_response_bytes:
            raise self._over_budget(
                f"max_tokens={most}{' with logprobs' if req.return_logprobs else ''} can make an answer of",
                most * per_token,
                self.max_response_bytes // per_token,
            )

    def _request(self, r) -> GenerationRequest:
        tokens = self.engine.encode_prompt(
            prompt=r.prompt,
            messages=[(m.role, m.content) for m in r.messages],
            token_ids=list(r.prompt_token_ids),
            chat_options=json_format.MessageToDict(r.chat_template_options)
            if r.HasField("chat_template_options")
            else None,
        )
        s = r.sampling
        sampling = Sampling(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            seed=s.seed if s.HasField("seed") else None,
            max_tokens=s.max_tokens,
            stop=tuple(s.stop),
        )
        memory = None
        em = r.extended_mind
        if r.HasField("extended_mind"):
            if em.mode not in _MODES:
                raise InvalidArgument(f"extended_mind.mode {em.mode} is not a RetrievalMode")
            # Fields left unset keep MemoryOptions' defaults (max_citations 0 = its default too).
            optional = {f: getattr(em, f) for f in ("top_k", "citation_min_weight") if em.HasField(f)}
            memory = MemoryOptions(
                memory_ids=tuple(em.memory_ids),
                **optional,
                threshold=em.sim_threshold if em.HasField("sim_threshold") else None,
                mode=_MODES[em.mode],
                layers=tuple(em.layers),
                return_citations=em.return_citations,
                max_citations=em.max_citations,
            )
            if not memory.memory_ids:  # checked like the HTTP face does, then nothing to attend to
                memory.validate(self.engine.num_layers)
                memory = None
        return GenerationRequest(tokens, sampling, memory, r.return_logprobs)

    async def Generate(self, request, context):
        req = self._request(request)
        self._check_response_size(req)
        text, ids, lps = [], [], []
        async for ev in self.engine.generate(req):
            if isinstance(ev, Chunk):
                text.append(ev.text)
                ids += ev.token_ids
                lps += ev.logprobs
            else:
                text.append(ev.remaining_text)
                note_access(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens)
                response = generator_pb2.GenerateResponse(
                    text="".join(text),
                    token_ids=ids,
                    logprobs=lps,
                    finish_reason=_FINISH[ev.finish_reason],
                    usage=generator_pb2.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens),
                    citations=_citations(ev),
                )
                if response.ByteSize() > self.max_response_bytes:  # longer text than the estimate allowed
                    raise self._over_budget("the answer is", response.ByteSize())
                return response

    async def GenerateStream(self, request, context):
        req = self._request(request)
        async for ev in self.engine.generate(req):
            if isinstance(ev, Chunk):
                yield generator_pb2.GenerateStreamResponse(text=ev.text, token_ids=ev.token_ids, logprobs=ev.logprobs)
            else:
                note_access(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens)
                yield generator_pb2.GenerateStreamResponse(
                    text=ev.remaining_text,
                    finish_reason=_FINISH[ev.finish_reason],
                    usage=generator_pb2.Usage(prompt_tokens=ev.prompt_tokens, completion_tokens=ev.completion_tokens),
                    citations=_citations(ev),
                )

    def _memorize_args(self, request) -> tuple[list[int], dict]:
        tokens = self.engine.memorize_input(text=request.text, token_ids=request.token_ids)
        return tokens, dict(
            memory_id=request.memory_id, labels=dict(request.labels), window=request.window, stride=request.stride
        )

    async def Memorize(self, request, context):
        tokens, kw = self._memorize_args(request)
        out = await self.engine.memorize(tokens, **kw)
        note_access(tokens=out["num_tokens"])
        return generator_pb2.MemorizeResponse(**out)

    async def MemorizeStream(self, request, context):
        tokens, kw = self._memorize_args(request.request)
        async for ev in self.engine.memorize_stream(tokens, **kw):
            if isinstance(ev, MemorizeProgress):
                yield generator_pb2.MemorizeStreamResponse(
                    progress=generator_pb2.MemorizeProgress(
                        tokens_done=ev.tokens_done,
                        tokens_total=ev.tokens_total,
                        windows_done=ev.windows_done,
                        windows_total=ev.windows_total,
                        elapsed_seconds=ev.elapsed_seconds,
                        eta_seconds=ev.eta_seconds,
                    )
                )
            else:
                note_access(tokens=ev["num_tokens"])
                yield generator_pb2.MemorizeStreamResponse(done=generator_pb2.MemorizeResponse(**ev))

    async def GetInfo(self, request, context):
        return generator_pb2.GeneratorServiceGetInfoResponse(**self.engine.info())
