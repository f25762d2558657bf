"""The generator's answers in OpenAI's shapes: chat completions and text completions, whole or as
stream chunks, with logprobs, usage and the ``extmind`` citations (docs/contract.md, "HTTP faces").

:class:`Answer` collects one generation's Chunks and Final and renders them; nothing here runs
the engine or knows about HTTP.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable

from services.generator.openai_protocol import CHAT, OpenAIRequest
from services.generator.request_types import LENGTH, STOP_SEQUENCE, Chunk, Final

# OpenAI's stand-in for a probability of zero (JSON has no -Infinity).
_NO_CHANCE = -9999.0


def _lp(x: float) -> float:
    return x if math.isfinite(x) else _NO_CHANCE


def finish_reason(final: Final) -> str:
    """OpenAI has two: ``length`` (max_tokens or the context) and ``stop`` (EOS or a stop string)."""
    return "length" if final.finish_reason == LENGTH else "stop"


def citations(final: Final) -> list[dict]:
    return [
        {
            "memory_id": c.memory_id,
            "start_token": c.token_start,
            "end_token": c.token_end,
            "text": c.text,
            "hits": c.hits,
        }
        for c in final.citations
    ]


class Answer:
    """One request's answer being built: ``add(chunk)`` as events come, ``end(final)`` once.

    ``token_text(id) -> str`` names tokens in logprobs; ``model`` and ``fingerprint`` go into
    every object (OpenAI's ``model`` and ``system_fingerprint``)."""

    def __init__(self, req: OpenAIRequest, model: str, fingerprint: str, token_text: Callable[[int], str]):
        self.req = req
        self.chat = req.object == CHAT
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint
        self.token_text = token_text
        self.text: list[str] = []
        self.chars = 0  # characters in ``text`` (completions' logprobs text_offset)
        # The tokens shown in logprobs, with their logprobs and alternatives.
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        # Tokens whose text is held back (it may be the start of a stop string): their logprobs
        # are shown with the text, or dropped with it when a stop string cuts it off.
        self._held: tuple[list, list, list] = ([], [], [])
        self.final: Final | None = None

    def add(self, chunk: Chunk) -> tuple[list[int], list[float], list]:
        """Takes one Chunk. -> the (token ids, logprobs, alternatives) to show now: none while
        the chunk's text is held back, else the tokens held so far and the chunk's."""
        self.text.append(chunk.text)
        self.chars += len(chunk.text)
        for held, new in zip(self._held, (chunk.token_ids, chunk.logprobs, chunk.top_logprobs)):
            held += new
        return self._show() if chunk.text else ([], [], [])

    def _show(self) -> tuple[list[int], list[float], list]:
        shown, self._held = self._held, ([], [], [])
        self.token_ids += shown[0]
        self.logprobs += shown[1]
        self.top += shown[2]
        return shown

    def end(self, final: Final) -> tuple[list[int], list[float], list]:
        """Takes the Final. -> the held tokens shown now: with the text released at the end; none
        when a stop string cut that text off (the token that completed the stop string, and
        those whose text began it, are not part of the answer; the usage still counts them)."""
        self.text.append(final.remaining_text)
        self.final = final
        if final.finish_reason == STOP_SEQUENCE and not final.remaining_text:
            self._held = ([], [], [])
        return self._show()

    # --- pieces -----------------------------------------------------------------------------------
    def _head(self, obj: str) -> dict:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def _usage(self) -> dict:
        f = self.final
        return {
            "prompt_tokens": f.prompt_tokens,
            "completion_tokens": f.completion_tokens,
            "total_tokens": f.prompt_tokens + f.completion_tokens,
        }

    def _logprobs(self, ids: list[int], lps: list[float], top: list, offset: int = 0) -> dict | None:
        if not self.req.logprobs:
            return None
        if self.chat:

            def entry(token_id: int, lp: float) -> dict:
                text = self.token_text(token_id)
                return {"token": text, "logprob": _lp(lp), "bytes": list(text.encode("utf-8"))}

            return {
                "content": [
                    {**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in (top[i] if i < len(top) else [])]}
                    for i, (t, lp) in enumerate(zip(ids, lps, strict=True))
                ],
                "refusal": None,
            }
        tokens = [self.token_text(t) for t in ids]
        offsets, at = [], offset
        for t in tokens:
            offsets.append(at)
            at += len(t)
        return {
            "tokens": tokens,
            "token_logprobs": [_lp(x) for x in lps],
            "top_logprobs": [{self.token_text(a): _lp(b) for a, b in alts} for alts in top] if top else None,
            "text_offset": offsets,
        }

    def _extmind(self, obj: dict) -> dict:
        if self.req.memory is not None:
            obj["extmind"] = {"citations": citations(self.final)}
        return obj

    # --- whole answers ----------------------------------------------------------------------------
    def body(self) -> dict:
        """The non-streamed answer (after ``end``)."""
        text, reason = "".join(self.text), finish_reason(self.final)
        lps = self._logprobs(self.token_ids, self.logprobs, self.top)
        if self.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": lps,
                "finish_reason": reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": lps, "finish_reason": reason}
        obj = {**self._head(CHAT if self.chat else "text_completion"), "choices": [choice], "usage": self._usage()}
        return self._extmind(obj)

    # --- stream chunks ----------------------------------------------------------------------------
    def _chunk(self, text: str, *, lps: dict | None = None, reason: str | None = None, first=False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": lps, "finish_reason": reason}
            obj = {**self._head("chat.completion.chunk"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": lps, "finish_reason": reason}
            obj = {**self._head("text_completion"), "choices": [choice]}
        if self.req.include_usage:
            obj["usage"] = None
        return obj

    def first_chunk(self) -> dict | None:
        """Chat streams open with the assistant's role and no text (as OpenAI's do)."""
        return self._chunk("", first=True) if self.chat else None

    def stream_chunk(self, chunk: Chunk) -> dict | None:
        """The stream object of one Chunk (None when it carries nothing to send)."""
        at = self.chars
        shown = self.add(chunk)
        if not chunk.text:
            return None  # text held back for a possible stop string (its tokens with it)
        return self._chunk(chunk.text, lps=self._logprobs(*shown, at))

    def last_chunks(self, final: Final) -> list[dict]:
        """The stream's closing objects: the finish reason (with the text held back until the end),
        then usage when asked for (``stream_options.include_usage``); the last one carries the
        ``extmind`` citations."""
        at = self.chars
        shown = self.end(final)
        lps = self._logprobs(*shown, at) if shown[0] else None
        out = [self._chunk(final.remaining_text, lps=lps, reason=finish_reason(final))]
        if self.req.include_usage:
            out.append({**self._chunk(""), "choices": [], "usage": self._usage()})
        self._extmind(out[-1])
        return out
