"""OpenAI's chat and text completion requests, read from JSON into the engine's request types.

:func:`parse_chat` and :func:`parse_completion` check every field they know (wrong types and
ranges raise :class:`BadField`, an InvalidArgument naming the field: HTTP 400) and ignore the
rest, as OpenAI does. What they return owns the defaults of the HTTP API (OpenAI's, which differ
from the gRPC ones: temperature 1, and 16 tokens for a text completion) and turns itself into a
``GenerationRequest`` with :meth:`OpenAIRequest.to_generation`. Memories come in the ``extmind``
field (docs/contract.md, "HTTP faces").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from services.common.http_common import BadField
from services.generator.request_types import (
    DEFAULT_CITATION_MIN_WEIGHT,
    DEFAULT_MEMORY_TOP_K,
    LOCAL,
    MAX_MEMORY_TOP_K,
    MAX_STOP_STRINGS,
    MAX_TOP_LOGPROBS,
    REMOTE,
    GenerationRequest,
    MemoryOptions,
    Sampling,
)

CHAT, COMPLETION = "chat.completion", "text_completion"
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for /v1/completions' integer logprobs
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _kind(value, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        try:
            return math.isfinite(value)
        except OverflowError:  # a JSON integer past float's range (1e309 written out): not a number we take
            return False
    return isinstance(value, {"boolean": bool, "string": str, "array": list, "object": dict}[kind])


def _get(body: dict, key: str, kind: str, default=None, *, where: str = ""):
    """``body[key]`` checked to be of JSON type ``kind``; missing or null = ``default``."""
    value = body.get(key)
    if value is None:
        return default
    if not _kind(value, kind):
        raise BadField(where + key, f"'{where}{key}' must be {'an' if kind[0] in 'aeio' else 'a'} {kind}")
    return value


def _in_range(param: str, value, low, high, text: str):
    if value is not None and not low <= value <= high:
        raise BadField(param, f"'{param}' is {value}; it must be {text}")
    return value


def _at_least(param: str, value, low: int):
    """An integer count with no upper bound of its own (the engine caps it, as the gRPC fields):
    ``low`` or more, taken at most 2**31 - 1."""
    return None if value is None else min(_in_range(param, value, low, math.inf, f">= {low}"), 2**31 - 1)


@dataclass
class OpenAIRequest:
    """One completion request as the HTTP face serves it (n is always 1)."""

    object: str  # CHAT or COMPLETION
    model: str = ""  # "" = the served model
    prompt: str = ""
    prompt_token_ids: list[int] = field(default_factory=list)
    messages: list[tuple[str, str]] = field(default_factory=list)
    chat_options: dict | None = None  # chat_template_kwargs (vLLM's name), e.g. {"enable_thinking": false}
    sampling: Sampling = field(default_factory=Sampling)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    memory: MemoryOptions | None = None

    def to_generation(self, engine) -> GenerationRequest:
        """The engine's request (prompt tokenized by ``engine.encode_prompt``; raises InvalidArgument)."""
        layers = self.memory.layers if self.memory is not None else ()
        bad = [x for x in layers if not 0 <= x < engine.num_layers]
        if bad:  # only the engine knows its layers; the answer still names the field
            raise BadField("extmind.layers", f"'extmind.layers' {bad} are outside [0, {engine.num_layers})")
        tokens = engine.encode_prompt(
            prompt=self.prompt, messages=self.messages, token_ids=self.prompt_token_ids, chat_options=self.chat_options
        )
        return GenerationRequest(tokens, self.sampling, self.memory, self.logprobs, self.top_logprobs)


def _common(body: dict, obj: str) -> OpenAIRequest:
    n = _get(body, "n", "integer", 1)
    if n != 1:
        raise BadField("n", f"'n' is {n}; this server returns one choice per request (n = 1): send n requests")
    temperature = _in_range("temperature", _get(body, "temperature", "number", 1.0), 0, 2, "in [0, 2]")
    top_p = _get(body, "top_p", "number", 1.0)
    if not 0 < top_p <= 1:
        raise BadField("top_p", f"'top_p' is {top_p}; it must be in (0, 1]")
    seed = _in_range("seed", _get(body, "seed", "integer"), 0, 2**64 - 1, "in [0, 2^64)")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise BadField("stop", "'stop' must be a string or a list of strings")
    if any(not s for s in stop):
        raise BadField("stop", "'stop' strings must not be empty")
    if len(stop) > MAX_STOP_STRINGS:
        raise BadField("stop", f"'stop' has {len(stop)} strings; send at most {MAX_STOP_STRINGS}")
    stream = _get(body, "stream", "boolean", False)
    options = _get(body, "stream_options", "object", {})
    include_usage = _get(options, "include_usage", "boolean", False, where="stream_options.")
    sampling = Sampling(
        temperature=float(temperature),
        top_p=0.0 if top_p == 1 else float(top_p),  # 1 keeps every token: the engine's "off"
        seed=seed,
        stop=tuple(stop),
    )
    model = _get(body, "model", "string", "")
    return OpenAIRequest(
        obj, model, sampling=sampling, stream=stream, include_usage=include_usage, memory=_memory(body)
    )


def _max_tokens(body: dict, *keys: str) -> int:
    for key in keys:  # the first one given wins (max_completion_tokens replaces max_tokens in chat)
        value = _at_least(key, _get(body, key, "integer"), 1)
        if value is not None:
            return value
    return 0


def _memory(body: dict) -> MemoryOptions | None:
    em = _get(body, "extmind", "object")
    if em is None:
        return None
    w = "extmind."
    ids = _get(em, "memory_ids", "array", [], where=w)
    if not all(isinstance(i, str) and i for i in ids):
        raise BadField(w + "memory_ids", "'extmind.memory_ids' must be a list of non-empty memory ids (strings)")
    if len(set(ids)) != len(ids):
        raise BadField(w + "memory_ids", "'extmind.memory_ids' lists a memory more than once; list each once")
    layers = _get(em, "layers", "array", [], where=w)
    if not all(_kind(x, "integer") for x in layers):
        raise BadField(w + "layers", "'extmind.layers' must be a list of layer numbers (integers)")
    mode = _get(em, "mode", "string", LOCAL, where=w)
    if mode not in (LOCAL, REMOTE):
        raise BadField(w + "mode", f"'extmind.mode' is {mode!r}; it must be 'local' or 'remote'")
    threshold = _in_range(w + "threshold", _get(em, "threshold", "number", where=w), -1, 1, "a cosine in [-1, 1]")
    top_k = _in_range(
        w + "top_k",
        _get(em, "top_k", "integer", DEFAULT_MEMORY_TOP_K, where=w),
        0,
        MAX_MEMORY_TOP_K,
        f"in [0, {MAX_MEMORY_TOP_K}]",
    )
    max_citations = _at_least(w + "max_citations", _get(em, "max_citations", "integer", 0, where=w), 0)
    min_weight = _in_range(
        w + "citation_min_weight",
        _get(em, "citation_min_weight", "number", DEFAULT_CITATION_MIN_WEIGHT, where=w),
        0,
        1,
        "an attention share in [0, 1]",
    )
    if not ids:
        return None
    return MemoryOptions(
        memory_ids=tuple(ids),
        top_k=top_k,
        threshold=None if threshold is None else float(threshold),
        mode=mode,
        layers=tuple(layers),
        return_citations=_get(em, "return_citations", "boolean", True, where=w),
        max_citations=max_citations,
        citation_min_weight=float(min_weight),
    )


def _content(i: int, content) -> str:
    """A message's content: a string, or a list of text parts (OpenAI's content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                where = f"messages[{i}].content[{j}]"
                raise BadField(where, f"'{where}' must be a text part: {{'type': 'text', 'text': '...'}}")
            texts.append(part["text"])
        return "".join(texts)
    raise BadField(f"messages[{i}].content", f"'messages[{i}].content' must be a string or a list of text parts")


def parse_chat(body: dict) -> OpenAIRequest:
    """POST /v1/chat/completions' body -> OpenAIRequest. Raises BadField."""
    r = _common(body, CHAT)
    messages = _get(body, "messages", "array")
    if not messages:
        raise BadField("messages", "'messages' must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadField(f"messages[{i}]", f"'messages[{i}]' must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in _ROLES:
            raise BadField(
                f"messages[{i}].role",
                f"'messages[{i}].role' is {role!r}; this server takes system, developer, user and assistant messages",
            )
        content = m.get("content")
        r.messages.append((_ROLES[role], "" if content is None and role == "assistant" else _content(i, content)))
    r.sampling.max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    r.chat_options = _get(body, "chat_template_kwargs", "object") or None  # checked by the engine
    r.logprobs = _get(body, "logprobs", "boolean", False)
    top = _in_range(
        "top_logprobs", _get(body, "top_logprobs", "integer", 0), 0, MAX_TOP_LOGPROBS, f"in [0, {MAX_TOP_LOGPROBS}]"
    )
    if top and not r.logprobs:
        raise BadField("top_logprobs", "'top_logprobs' needs 'logprobs': true")
    r.top_logprobs = top
    return r


def parse_completion(body: dict) -> OpenAIRequest:
    """POST /v1/completions' body -> OpenAIRequest. Raises BadField."""
    r = _common(body, COMPLETION)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, str):
        r.prompt = prompt
    elif isinstance(prompt, list) and prompt and all(_kind(t, "integer") for t in prompt):
        r.prompt_token_ids = list(prompt)
    else:
        raise BadField("prompt", "'prompt' must be a non-empty string or a list of token ids (one prompt per request)")
    r.sampling.max_tokens = _max_tokens(body, "max_tokens") or COMPLETION_DEFAULT_MAX_TOKENS
    top = _in_range(
        "logprobs",
        _get(body, "logprobs", "integer"),
        0,
        MAX_COMPLETION_LOGPROBS,
        f"in [0, {MAX_COMPLETION_LOGPROBS}]",
    )
    r.logprobs, r.top_logprobs = top is not None, top or 0
    if _get(body, "echo", "boolean", False):
        raise BadField("echo", "'echo' is not supported: the answer holds the completion only")
    best_of = _get(body, "best_of", "integer", 1)
    if best_of != 1:
        raise BadField("best_of", "'best_of' must be 1 on this server")
    return r
