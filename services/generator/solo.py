"""One sequence decoding alone: mlx-lm's ``generate_step`` on a plain ``KVCache``.

At one stream mlx-lm's ``BatchGenerator`` costs the host more per token than its
``generate_step`` (``BatchKVCache`` adds an op per layer and builds a batch mask every forward,
logprobs are split per row, more Python per step), and a decode step on a fast GPU is host-bound.
So while a group's decode batch holds a single sequence and nothing else of the group is queued
or prefilling, the scheduler takes it out of the BatchGenerator
(``remove(..., return_prompt_caches=True)``: a ``KVCache`` per layer and the token history) and
steps it here; when another request joins the group it goes back (``insert`` with its cache and
history). A request that arrives to find nothing else of its group running starts here from its
prompt (``Solo.from_prompt``: its prompt prefilled one chunk per scheduler pass, as the
BatchGenerator would, then ``generate_step``), so a lone stream never pays the batch steps and the
hand-over; one that is joined before its first step goes into the batch as a prompt.

Both generators run a token's forward as they emit it (the next token is computed ahead), so the
cache handed over holds the last emitted token's keys and values and a drawn next token nobody
saw. The receiving side trims that token off the cache and runs its forward again from the same
cache and history, so the same next token follows. Two things must not see that forward twice:
a seeded sampler's key (``SeededSampler.rewind``) and the per-forward tallies (citations,
attention mass: the scheduler skips the repeated forward, ``Solo.repeated``).

One exception: the first token of a solo made from its prompt comes from the last prompt token's
forward alone (``_first_token``, the same operations as ``generate_step``'s step), and
``generate_step`` starts from that token at the next step. ``generate_step`` would build the next
token's whole forward before reading the first token, which on a host-bound GPU delayed every lone
request's first token by that build (docs/architecture.md, "Solo from the prompt"). Until the next
step the cache holds the prompt only (``Solo.ahead`` is False): handed back then, nothing is
trimmed or rewound.
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models.cache import TokenBuffer, make_prompt_cache, trim_prompt_cache

# Bytes of freed device buffers a prefill leaves in MLX's cache. generate_step empties the cache
# after every prompt chunk (memory back to the system, on a Mac the unified memory); the next
# prefill then allocates its temporaries afresh, which on CUDA cost a 512-token prefill with a
# 4 096-row memory ~5 ms of its ~27 (the top-k's scores alone are 128 MiB per layer). Kept up to
# this much for the next chunk or prefill (generate_step itself still empties the cache after each
# sequence's first token: docs/architecture.md, "Solo from the prompt"); past it, emptied.
KEEP_CACHED_BYTES = 1 << 30


class Solo:
    """A request's sequence stepped by ``generate_step`` (made by ``handed_over`` or ``from_prompt``).

    cache: its per-layer KVCaches; tokens: its prompt and generated token ids; steps: the
    ``generate_step`` generator; repeated: whether the first step's first forward repeats one
    the batch ran and counted."""

    def __init__(self, request, cache: list, tokens: list[int], sampler, steps, repeated: bool):
        self.request = request
        self.cache = cache
        self.tokens = tokens
        self.sampler = sampler
        self.repeated = repeated
        self.deferred = False  # its first step was put off once for work waiting on the MLX thread
        self._ran = False
        self._steps = steps
        # from_prompt's: its model, the prompt chunks not prefilled yet, how many prompt tokens
        # were, and its logits processors and token budget (its generate_step starts at its
        # second step, after _first_token).
        self._chunks: list = []
        self._prefilled = 0
        self._model = None
        self._processors: list = []
        self._max_tokens = 0

    @classmethod
    def handed_over(cls, model, request, cache: list, tokens: list[int], sampler, processors: list, max_tokens: int):
        """A sequence out of the BatchGenerator. cache: its per-layer KVCache holding ``tokens``,
        the last one's forward already run (its output dropped); sampler / processors: the
        request's, as given to the BatchGenerator; max_tokens: the tokens it may still generate (> 0)."""
        trim_prompt_cache(cache, 1)
        _rewind(sampler)
        steps = _from_last_token(model, cache, tokens, sampler, processors, max_tokens)
        return cls(request, cache, tokens, sampler, steps, repeated=True)

    @classmethod
    def from_prompt(cls, model, request, prompt: list[int], sampler, processors: list, max_tokens: int, step_size: int):
        """A request that starts solo: its prompt but the last token is prefilled in chunks of
        ``step_size`` tokens, one per ``prefill`` call (the scheduler runs one per pass, as a
        BatchGenerator prefills one chunk per step: a long prompt does not hold the MLX thread
        for its whole prefill), then the last token's forward makes the first token
        (``_first_token``) and ``generate_step`` runs from that one. The chunks and their
        forwards are ``generate_step``'s own (the same cache, to the bit). Its logits
        processors see the prompt and the generated tokens, as ``generate_step`` hands them."""
        cache = make_prompt_cache(model)
        solo = cls(request, cache, list(prompt), sampler, None, repeated=False)
        solo._model, solo._processors, solo._max_tokens = model, processors, max_tokens
        head = prompt[:-1]  # generate_step's prefill: every token but the last, in chunks
        solo._chunks = [head[i : i + step_size] for i in range(0, len(head), step_size)]
        return solo

    @property
    def prefilling(self) -> bool:
        """Whether prompt chunks are left to ``prefill`` before the first ``step``."""
        return bool(self._chunks)

    def prefill(self) -> None:
        """Runs the next prompt chunk's forward into the cache (as ``generate_step``'s prefill loop,
        which empties MLX's buffer cache after each chunk; here only past KEEP_CACHED_BYTES). The
        last chunk is only started: the first step's forward is built while it runs."""
        chunk = self._chunks.pop(0)
        self._prefilled += len(chunk)
        with mx.stream(generation_stream):
            self._model(mx.array(chunk)[None], cache=self.cache)
            if self._chunks:
                mx.eval([c.state for c in self.cache])
            else:  # the last chunk runs while the first token's forward is built (the next step)
                mx.async_eval([c.state for c in self.cache])
        if mx.get_cache_memory() > KEEP_CACHED_BYTES:
            mx.clear_cache()

    @property
    def started(self) -> bool:
        """Whether a step ran (before it, a solo made from its prompt has at most part of its
        prompt in its cache: nothing a BatchGenerator insert could take)."""
        return self._ran

    @property
    def ahead(self) -> bool:
        """Whether the cache holds the last emitted token's forward, run ahead with a next token
        drawn: after every ``generate_step`` step, not after a from_prompt solo's first token."""
        return self._ran and self._steps is not None

    @property
    def untouched(self) -> bool:
        """Whether nothing ran yet (no prompt chunk, no step)."""
        return not self._ran and self._prefilled == 0

    def step(self) -> tuple[int, mx.array]:
        """-> the next token and its logprobs [vocab]. The step's forwards run on mlx-lm's
        generation stream, set only for the call: the suspended generator would otherwise leave it
        the MLX thread's default. Made from its prompt: the first step runs the last prompt
        token's forward alone, the second starts generate_step (two forwards: the first token's,
        and the next one's ahead). Handed over: two on the first step (see ``repeated``). Then
        one, on the token returned, ahead (``ahead``)."""
        with mx.stream(generation_stream):
            if self._steps is None:  # made from its prompt, prefilled
                assert not self._chunks, "prefill first"
                if not self._ran:
                    self._ran = True
                    token, logprobs = _first_token(self._model, self.cache, self.tokens, self.sampler, self._processors)
                    self.tokens.append(token)
                    return token, logprobs
                self._steps = _from_last_token(
                    self._model, self.cache, self.tokens, self.sampler, self._processors, self._max_tokens - 1
                )
            self._ran = True
            token, logprobs = next(self._steps)
        self.tokens.append(token)
        return token, logprobs

    def end(self) -> tuple[list, list[int]]:
        """Stops stepping. -> (cache, tokens) for ``BatchGenerator.insert``: the cache without
        the last token (``insert([tokens[-1:]], caches=[cache], all_tokens=[tokens[:-1]])``
        recomputes its forward)."""
        self.close()
        if self.ahead:
            trim_prompt_cache(self.cache, 1)
            _rewind(self.sampler)
        return self.cache, self.tokens

    def close(self) -> None:
        if self._steps is None:
            return
        with mx.stream(generation_stream):  # the generator's own stream context exits here
            self._steps.close()


def _first_token(model, cache: list, tokens: list[int], sampler, processors: list) -> tuple[int, mx.array]:
    """The token after ``tokens`` and its logprobs [vocab], by the last token's forward on
    ``cache`` (which holds ``tokens[:-1]``): ``generate_step``'s step, the same operations in the
    same order (so the same bits), read before any other forward is built."""
    y = mx.array(tokens[-1:])
    logits = model(y[None], cache=cache)[:, -1, :]
    for process in _with_history(processors, tokens[:-1]) or ():
        logits = process(y, logits)
    logprobs = logits - mx.logsumexp(logits, keepdims=True)
    sampled = sampler(logprobs)
    mx.async_eval(sampled, logprobs)
    return sampled.item(), logprobs.squeeze(0)


def _from_last_token(model, cache: list, tokens: list[int], sampler, processors: list, max_tokens: int):
    """``generate_step`` from ``tokens[-1]`` on ``cache``, which holds ``tokens[:-1]`` (the logits
    processors see them too)."""
    return generate_step(
        mx.array(tokens[-1:]),
        model,
        prompt_cache=cache,
        sampler=sampler,
        logits_processors=_with_history(processors, tokens[:-1]),
        max_tokens=max_tokens,
    )


def _rewind(sampler) -> None:
    """Undoes a seeded sampler's last draw (greedy and unseeded samplers keep no state)."""
    rewind = getattr(sampler, "rewind", None)
    if rewind is not None:
        rewind()


def _with_history(processors: list, history: list[int]) -> list | None:
    """The request's logits processors seeing its whole token history, as the BatchGenerator's
    do (``generate_step`` hands them only the tokens it ran). None without processors."""
    if not processors:
        return None
    seen = TokenBuffer(history)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        context = seen.update_and_fetch(tokens[-1:])  # generate_step runs one token per forward here
        for p in processors:
            logits = p(context, logits)
        return logits

    return [process]
