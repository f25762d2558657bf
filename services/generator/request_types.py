"""What callers hand the generator engine and what it streams back, with the one definition of
every default and limit the generator applies (app flags, engine and servicer all read them here).

Plain data: nothing here touches MLX or gRPC. A field left at its zero value means "the default",
as in the protos (docs/contract.md), and the request objects resolve that themselves.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field

import numpy as np

from extmind import errors
from services.generator.citations import Citation

# Retrieval modes and finish reasons.
LOCAL, REMOTE = "local", "remote"
STOP, LENGTH, STOP_SEQUENCE = "stop", "length", "stop_sequence"

DEFAULT_MAX_TOKENS = 256
DEFAULT_MEMORY_TOP_K = 10  # memories each query token retrieves per layer and head
DEFAULT_MAX_CITATIONS = 5
MAX_TOP_LOGPROBS = 20  # most alternatives reported per generated token (OpenAI's limit too)
# Every stop string is looked for after every token, on the MLX thread that all requests share:
# thousands of them would slow every request of the process (10 000: ~20 ms per token).
MAX_STOP_STRINGS = 32
MAX_MEMORY_TOP_K = 1024
DEFAULT_CITATION_MIN_WEIGHT = 0.02  # share of a query head's attention (softmax weight)
DEFAULT_WINDOW = 3072  # memory building: tokens per forward window ...
DEFAULT_STRIDE = 512  # ... and tokens between window starts (docs/extended-mind.md)


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.0  # 0 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 0.0  # 0 or 1 = off
    seed: int | None = None
    max_tokens: int = 0  # 0 = DEFAULT_MAX_TOKENS (always capped by the model's context)
    stop: tuple[str, ...] = ()

    def validate(self, vocab_size: int) -> None:
        """Raises InvalidArgument naming the first field out of range."""
        checks = [
            (
                math.isfinite(self.temperature) and self.temperature >= 0,
                f"temperature {self.temperature} must be >= 0 (0 = greedy)",
            ),
            (math.isfinite(self.top_p) and 0 <= self.top_p <= 1, f"top_p {self.top_p} must be in [0, 1]"),
            (math.isfinite(self.min_p) and 0 <= self.min_p <= 1, f"min_p {self.min_p} must be in [0, 1]"),
            (0 <= self.top_k <= vocab_size, f"top_k {self.top_k} must be in [0, {vocab_size}]"),
            (
                math.isfinite(self.repetition_penalty) and self.repetition_penalty >= 0,
                f"repetition_penalty {self.repetition_penalty} must be >= 0 (0 or 1 = off)",
            ),
            (all(self.stop), "stop strings must not be empty"),
            (
                len(self.stop) <= MAX_STOP_STRINGS,
                f"{len(self.stop)} stop strings; send at most {MAX_STOP_STRINGS}",
            ),
        ]
        for ok, msg in checks:
            if not ok:
                raise errors.InvalidArgument(msg)


@dataclass
class MemoryOptions:
    memory_ids: tuple[str, ...] = ()
    top_k: int = DEFAULT_MEMORY_TOP_K  # 0 = generate without memories
    threshold: float | None = None  # cosine; None = no threshold
    mode: str = LOCAL
    layers: tuple[int, ...] = ()  # () = every layer
    return_citations: bool = False
    max_citations: int = DEFAULT_MAX_CITATIONS  # 0 = DEFAULT_MAX_CITATIONS
    # A retrieval counts towards citations only when the memory got at least this share of its
    # query head's attention (docs/extended-mind.md "Citations"); 0 = every top-k pick counts.
    citation_min_weight: float = DEFAULT_CITATION_MIN_WEIGHT

    def __post_init__(self) -> None:
        if not self.max_citations:
            self.max_citations = DEFAULT_MAX_CITATIONS

    def validate(self, num_layers: int) -> None:
        """Raises InvalidArgument naming the first field out of range."""
        if any(not i for i in self.memory_ids):
            raise errors.InvalidArgument("memory_ids must not contain empty ids")
        twice = _listed_twice(self.memory_ids)
        if twice:  # the same rows twice would count double in LOCAL retrieval and once in REMOTE
            raise errors.InvalidArgument(f"memory_ids lists {twice} more than once; list each memory once")
        if not 0 <= self.top_k <= MAX_MEMORY_TOP_K:
            raise errors.InvalidArgument(f"extended_mind.top_k {self.top_k} must be in [0, {MAX_MEMORY_TOP_K}]")
        if self.threshold is not None and not (math.isfinite(self.threshold) and -1 <= self.threshold <= 1):
            raise errors.InvalidArgument(f"sim_threshold {self.threshold} must be a cosine in [-1, 1]")
        bad = [layer for layer in self.layers if not 0 <= layer < num_layers]
        if bad:
            raise errors.InvalidArgument(f"extended_mind.layers {bad} outside [0, {num_layers})")
        twice = _listed_twice(self.layers)
        if twice:
            raise errors.InvalidArgument(f"extended_mind.layers lists {twice} more than once; list each layer once")
        if not (math.isfinite(self.citation_min_weight) and 0 <= self.citation_min_weight <= 1):
            raise errors.InvalidArgument(
                f"citation_min_weight {self.citation_min_weight} must be an attention share in [0, 1]"
            )
        if self.mode not in (LOCAL, REMOTE):
            raise errors.InvalidArgument(f"unknown retrieval mode {self.mode!r}")

    @property
    def cite_floor(self) -> float:
        """The ``citation_min_weight`` the request's batch group records citations with (part of
        the group key). Rounded to float32, the precision the attention compares weights in, so
        a gRPC float 0.02 and a JSON 0.02 are one floor and one group; a request that returns no
        citations takes the default (its floor changes nothing it gets back, so it batches with
        the requests that set none)."""
        if not self.return_citations:
            return float(np.float32(DEFAULT_CITATION_MIN_WEIGHT))
        return float(np.float32(self.citation_min_weight))

    @property
    def retrieves(self) -> bool:
        """Whether generation attends to memories at all."""
        return bool(self.memory_ids) and self.top_k > 0


def _listed_twice(values) -> list:
    """The values listed more than once in ``values``, sorted."""
    return sorted(v for v, n in collections.Counter(values).items() if n > 1)


@dataclass
class GenerationRequest:
    prompt_tokens: list[int]
    sampling: Sampling = field(default_factory=Sampling)
    memory: MemoryOptions | None = None
    return_logprobs: bool = False
    top_logprobs: int = 0  # also report this many most likely tokens per step (needs return_logprobs)

    def validate(self, *, vocab_size: int, max_context: int, num_layers: int) -> int:
        """Raises InvalidArgument for a request the model cannot serve; returns the number of
        tokens to generate at most (max_tokens or its default, capped by the context left)."""
        if not self.prompt_tokens:
            raise errors.InvalidArgument("the prompt is empty: send prompt, messages or prompt_token_ids")
        self.sampling.validate(vocab_size)
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise errors.InvalidArgument(f"top_logprobs {self.top_logprobs} must be in [0, {MAX_TOP_LOGPROBS}]")
        n = len(self.prompt_tokens)
        if n >= max_context:
            raise errors.InvalidArgument(f"the prompt has {n} tokens; the model's context is {max_context}")
        if self.memory is not None:
            self.memory.validate(num_layers)
        return min(self.sampling.max_tokens or DEFAULT_MAX_TOKENS, max_context - n)


@dataclass
class Chunk:
    """Newly generated tokens and the text they complete (possibly empty: text that may still
    turn into a stop string is held back)."""

    text: str
    token_ids: list[int]
    logprobs: list[float]  # one per token when return_logprobs, else empty
    # Per token when top_logprobs > 0: the (token id, logprob) of the most likely tokens, best first.
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @staticmethod
    def joined(chunks: list[Chunk]) -> Chunk:
        """One Chunk of consecutive ``chunks`` (their text, tokens and per-token lists in order)."""
        if len(chunks) == 1:
            return chunks[0]
        return Chunk(
            "".join(c.text for c in chunks),
            [t for c in chunks for t in c.token_ids],
            [x for c in chunks for x in c.logprobs],
            [x for c in chunks for x in c.top_logprobs],
        )


@dataclass
class Final:
    """The last event of a generation."""

    finish_reason: str  # STOP, LENGTH or STOP_SEQUENCE
    prompt_tokens: int
    completion_tokens: int
    citations: list[Citation] = field(default_factory=list)
    # Text not yet sent in a Chunk: what was held back for a possible stop string plus what the
    # detokenizer flushed at the end. Callers append it to the Chunks' text.
    remaining_text: str = ""
    # With citations: how often each row of the request's concatenated memories was retrieved.
    row_counts: np.ndarray | None = None
