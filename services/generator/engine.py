"""The generator engine: an mlx-lm model with extended mind attention, serving generation with
continuous batching and memorizing text into the memory service. Nothing here knows about gRPC.

The pieces: ``request_types`` (what callers send and receive, defaults and limits),
``memory_resolution`` (which memories a request attends to), ``scheduler`` (the BatchGenerator
groups, stepped from their own thread), ``memory_builder`` (memorize). All MLX work runs on
the process's one MLX thread, reached only through ``self.mlx`` (an ``MLXThread``); see the
scheduler's docstring for how decode steps and other MLX work take turns there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import load

from extmind import errors, tensor
from services.common import hub
from services.common.background import retrieved
from services.common.mlx_thread import MLXThread
from services.generator import fused_projections, memory_lookup, weights_dtype
from services.generator.attention_parts import compute_dtype
from services.generator.bank_cache import BankCache
from services.generator.chat_prompt import encode_messages
from services.generator.extended_attention import install
from services.generator.fingerprint import model_fingerprint
from services.generator.kv_dtypes import dtype_of
from services.generator.memory_builder import MemorizeProgress, MemoryBuilder
from services.generator.memory_client import MemoryClient
from services.generator.memory_lookup import MemoryLookup
from services.generator.memory_resolution import MemoryResolver, ModelShape, dtype_note
from services.generator.request_types import DEFAULT_STRIDE, DEFAULT_WINDOW, Chunk, Final, GenerationRequest
from services.generator.running_request import RunningRequest
from services.generator.scheduler import Scheduler
from services.generator.stop_text import IncrementalDecoder, remember_single_tokens

log = logging.getLogger("extmind.generator")


@dataclass
class EngineConfig:
    model: str
    memory_url: str | None = None
    bank_cache_bytes: int = 2 << 30
    max_batch_size: int = 32
    prefill_batch_size: int = 8
    prefill_step_size: int = 2048
    window: int = DEFAULT_WINDOW
    stride: int = DEFAULT_STRIDE
    max_queue: int = 256
    memory_timeout: float = 30.0
    dtype: str = "auto"  # weights_dtype.CHOICES: "auto" widens half precision on the CPU
    fused_attention: str = "auto"  # fused_attention.MODES: "auto" = fused LOCAL kernels on CUDA
    # q/k/v and gate/up projections as one matmul each (services/generator/fused_projections.py):
    # fused_projections.MODES, "auto" = on when MLX computes on a GPU
    merge_projections: str = "auto"
    # Milliseconds between two hand-overs of streamed tokens to the callers (the first token, the
    # last event and errors go at once): docs/architecture.md, "Handing tokens to the callers".
    stream_interval_ms: float = 5.0
    # The attention-mass metric (services/generator/attention_mass.py) is measured on one decode
    # step in this many; 1 = every step, 0 = never.
    attention_mass_every: int = 8


_NO_MEMORY_SERVICE = "this generator has no memory service configured (--memory-url)"


def special_token_ids(tokenizer) -> set[int]:
    """The ids of the tokenizer's special tokens: BOS, EOS, pad, and every added token marked
    special. Memorize drops their rows (they carry no text; docs/extended-mind.md). An end token of
    the model's config that is an ordinary vocabulary entry is not one of them: the committed
    model stops generating at a newline, and a memorized text keeps its newlines."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        t = getattr(tokenizer, name, None)
        if isinstance(t, int):
            ids.add(t)
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids |= {int(i) for i, tok in added.items() if getattr(tok, "special", False)}
    return ids


class GeneratorEngine:
    def __init__(
        self, config: EngineConfig, *, memory_client: MemoryClient | None = None, mlx_thread: MLXThread | None = None
    ):
        self.config = config
        self.memory = memory_client or (
            MemoryClient(config.memory_url, timeout=config.memory_timeout) if config.memory_url else None
        )
        self.mlx = mlx_thread or MLXThread("generator-mlx")
        self.bank_cache = BankCache(config.bank_cache_bytes)
        self.model = None
        self.tokenizer = None
        self.resolver: MemoryResolver | None = None  # set by start() when a memory service is configured
        self.lookups: MemoryLookup | None = None  # the requests' memory lookups (same)
        self.model_shape: ModelShape | None = None  # set by start(): what a usable memory was built with
        self._scheduler: Scheduler | None = None
        self._builder: MemoryBuilder | None = None

    # ---------------------------------------------------------------- life cycle

    def start(self) -> None:
        """Loads the model on the MLX thread and starts the scheduler (blocking)."""
        self.mlx.call(self._load)
        self.model_shape = shape = ModelShape(
            self.fingerprint,
            self.num_layers,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
            self.dtype,
            self.fingerprint_as,
        )
        if self.memory is not None:
            self.resolver = MemoryResolver(self.memory, shape)
            self.lookups = MemoryLookup(self.resolver, self.bank_cache, self.mlx)
            self._builder = MemoryBuilder(
                self.model,
                self.state,
                self.memory,
                shape,
                self.dtype,
                self.special_ids,
                chunk=self.config.prefill_step_size,
                run=self.mlx.call,
            )
        c = self.config
        self._scheduler = Scheduler(
            self.mlx,
            self.model,
            self.state,
            eos_ids=self.eos_ids,
            decode=self.tokenizer.decode,
            max_batch_size=c.max_batch_size,
            prefill_batch_size=c.prefill_batch_size,
            prefill_step_size=c.prefill_step_size,
            max_queue=c.max_queue,
            stream_interval=c.stream_interval_ms / 1000,
            vocab_size=self.vocab_size,
            attention_mass_every=c.attention_mass_every,
        )
        self._scheduler.start()

    def _load(self) -> None:
        path = Path(self.config.model).expanduser()
        if not path.is_dir():
            # mlx-lm's own hf_repo_to_path reads the local cache only; a hub id here is fetched
            # as the embedder fetches one (services/common/hub.py).
            from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

            if not hub.is_hub_id(self.config.model):
                raise errors.NotFound(
                    f"generator model {self.config.model!r}: no directory at {path.resolve()}; pass a model "
                    "directory with config.json, *.safetensors and tokenizer files, or a hub id (org/name)"
                )
            got, notes = hub.snapshot(
                self.config.model, DEFAULT_ALLOW_PATTERNS, lambda p: (p / "config.json").is_file()
            )
            if got is None:
                raise errors.NotFound(
                    f"generator model {self.config.model!r}: no local directory at {path.resolve()} and the "
                    f"hub could not provide it ({'; '.join(notes)}). Pass a directory with config.json, "
                    "*.safetensors and tokenizer files, or a hub id (downloaded into the Hugging Face cache "
                    "unless HF_HUB_OFFLINE=1)"
                )
            path = got
        # mlx-lm's own errors here are bare FileNotFoundErrors (a traceback at start-up).
        lacks = [pattern for pattern in ("config.json", "model*.safetensors") if not any(path.glob(pattern))]
        if lacks:
            raise errors.NotFound(
                f"generator model {self.config.model!r}: {path.resolve()} has no {' and no '.join(lacks)}; "
                "pass a model directory with config.json, model*.safetensors and tokenizer files (such as "
                "models/extmind-facts-6m), or a hub id"
            )
        self.model, self.tokenizer, cfg = load(str(path), return_config=True)
        self.model_path = path
        try:
            target = weights_dtype.choose(self.model, self.config.dtype, on_cpu=mx.default_device() == mx.cpu)
        except ValueError as exc:
            raise errors.InvalidArgument(f"generator model {self.config.model!r}: {exc}") from None
        if target is not None:
            weights_dtype.cast(self.model, target)
        merge = fused_projections.enabled(self.config.merge_projections)
        self.state = install(self.model, cfg, fused=self.config.fused_attention, merge=merge)
        # Shapes come from the config, never from weight shapes: a quantized weight is packed
        # (a 4-bit o_proj of a 128-wide model is [128, 16] uint32).
        shape = self.state.shape
        self.num_layers, self.num_heads, self.num_kv_heads = shape.num_layers, shape.num_heads, shape.num_kv_heads
        self.head_dim = shape.head_dim
        text = cfg.get("text_config") or {}  # a multimodal checkpoint nests its decoder's config
        self.vocab_size = int(cfg.get("vocab_size") or text["vocab_size"])
        self.max_context = int(cfg.get("max_position_embeddings") or text.get("max_position_embeddings") or 0) or 131072
        dtype = compute_dtype(self.model)
        self.dtype = dtype_of(dtype)  # memories are stored in it (docs/extended-mind.md, "Dtypes")
        self.fingerprint = model_fingerprint(path, str(dtype))
        self.eos_ids = sorted(int(t) for t in self.tokenizer.eos_token_ids)
        self.special_ids = special_token_ids(self.tokenizer)
        self._stream_decode = remember_single_tokens(self.tokenizer.decode)  # the requests' detokenizers
        self.model_name = str(self.config.model)
        log.info(
            "model loaded",
            extra={
                "model": self.model_name,
                "fingerprint": self.fingerprint,
                "layers": self.num_layers,
                "dtype": str(dtype),
                "cast_from_checkpoint": target is not None,
                # --fused-attention auto turns the CUDA kernels on by itself: say which path runs
                "fused_attention": self.state.fused,
                "merged_projections": self.state.merged_projections,
            },
        )

    @functools.cache  # noqa: B019 - one engine per process; a few dtypes
    def fingerprint_as(self, dtype: int) -> str:
        """This model's fingerprint when computing in ``dtype`` (an extmind.tensor dtype): tells
        a memory of this model built in another dtype from another model's (reads the weights'
        headers and samples again: asked only when a memory is refused)."""
        name = tensor.dtype_name(dtype).removeprefix("DTYPE_").lower()
        return model_fingerprint(self.model_path, str(getattr(mx, name)))

    def stop(self) -> None:
        if self._scheduler is None:
            return
        self._scheduler.stop()
        self._scheduler = None
        self.mlx.shutdown()
        if self.memory is not None:
            self.memory.close()

    def info(self) -> dict:
        return dict(
            model=self.model_name,
            model_fingerprint=self.fingerprint,
            num_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab_size,
            max_context=self.max_context,
            dtype=self.dtype,
            max_batch_size=self.config.max_batch_size,
        )

    def stats(self) -> dict:
        """Sequences the batch generators hold right now (for tests and logs)."""

        def read():
            return dict(self._scheduler.stats(), cached_banks=len(self.bank_cache), cached_bytes=self.bank_cache.nbytes)

        return self.mlx.call(read)

    # ---------------------------------------------------------------- generation

    def encode_prompt(self, *, prompt: str = "", messages=None, token_ids=None, chat_options=None) -> list[int]:
        """Token ids of a prompt, chat ``messages`` ([(role, content)], rendered by the model's
        chat template with the variables ``chat_options``) or ``token_ids`` (exactly one)."""
        given = [bool(prompt), bool(messages), bool(token_ids)]
        if sum(given) != 1:
            raise errors.InvalidArgument(
                "give exactly one of prompt, messages or prompt_token_ids "
                f"(got {sum(given)}); an empty prompt cannot be generated from"
            )
        if chat_options and not messages:
            raise errors.InvalidArgument("chat_template_options apply to messages only")
        if token_ids:
            self._check_vocab(token_ids, "prompt_token_ids")
            return list(token_ids)
        if messages:
            for m in messages:
                if m[0] not in ("system", "user", "assistant"):
                    raise errors.InvalidArgument(f"message role {m[0]!r} must be system, user or assistant")
            # Content is literal text: special tokens come only from the template.
            return encode_messages(self.tokenizer, [{"role": r, "content": c} for r, c in messages], chat_options)
        return list(self.tokenizer.encode(prompt))

    def _check_vocab(self, token_ids, name: str) -> None:
        bad = [t for t in token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise errors.InvalidArgument(f"{name} {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")

    async def generate(self, req: GenerationRequest) -> AsyncIterator[Chunk | Final]:
        """Streams Chunks and one Final. Closing the iterator early (cancellation, deadline)
        removes the sequence from its batch and frees the slot.

        Raises InvalidArgument (bad request), the memory errors of ``MemoryResolver.resolve``,
        ResourceExhausted (too many requests in flight)."""
        arrived = time.monotonic()
        max_tokens = req.validate(vocab_size=self.vocab_size, max_context=self.max_context, num_layers=self.num_layers)
        m = req.memory
        if m is not None and m.memory_ids and self.resolver is None:
            raise errors.FailedPrecondition(_NO_MEMORY_SERVICE)
        memories, fetched, lookup = [], {}, None
        if m is not None and m.retrieves:
            guess = self.lookups.guess(m)
            if guess is None:
                memories, fetched = await self.lookups.resolve_and_fetch(m)
            else:  # admitted on the last resolution while its own lookup runs (memory_lookup.py)
                memories, lookup = guess, asyncio.ensure_future(self.lookups.resolve_and_fetch(m))
                lookup.add_done_callback(retrieved)
        try:
            while True:
                try:
                    # Closed with this generator: a caller gone cancels its request at once.
                    async with contextlib.aclosing(
                        self._admitted(req, arrived, max_tokens, memories, fetched, lookup)
                    ) as events:
                        async for ev in events:
                            yield ev
                    return
                except memory_lookup.Stale as stale:  # runs again on what its lookup found
                    (memories, fetched), lookup = stale.fresh, None
        finally:
            if lookup is not None:
                lookup.cancel()  # a no-op once it returned; the lookup goes on for those sharing it

    async def _admitted(self, req, arrived: float, max_tokens: int, memories: list, fetched: dict, lookup=None):
        """``generate`` once the request's memories are known (or guessed: ``lookup`` is then the
        request's own lookup, awaited before any event leaves; memory_lookup.Stale when it names
        other memories)."""
        m = req.memory
        key = None
        if memories:
            key = (
                m.mode,
                tuple((i.memory_id, i.version) for i in memories),
                m.top_k,
                m.threshold,
                frozenset(m.layers) if m.layers else None,
                m.cite_floor,  # the group's MemoryContext records with it (MemoryLookup.context)
            )
        r = RunningRequest(
            req, asyncio.get_running_loop(), IncrementalDecoder(self._stream_decode), max_tokens, arrived
        )
        confirmed = lookup is None
        if lookup is not None:
            r.hold_observations()  # its metrics wait for the lookup, as its events do
        try:  # from the admit on: a caller gone while it ran must still cancel (cancel ignores unadmitted r)
            try:
                await self.mlx.run(
                    self._scheduler.admit, r, key, lambda: self.lookups.context(m, memories, fetched), memories
                )
            except errors.ExtmindError:
                r.done = True  # refused (a full queue): nothing to cancel, no hop to the MLX thread
                if lookup is not None:
                    # On a guess, the request's own lookup answers first, as it would have before
                    # the admission: its error (a memory deleted), or Stale (created again: a bank
                    # evicted since the guess was fetched here, the old incarnation's, and failed).
                    await memory_lookup.confirm(lookup, memories)
                raise
            fetched.clear()  # cached on the device now; a later group refetches what was evicted meanwhile
            if lookup is not None:
                await memory_lookup.confirm(lookup, memories)
                confirmed = True
                r.settle(keep=True)
            while True:
                ev = await r.events.get()
                if isinstance(ev, BaseException):
                    raise ev
                yield ev
                if isinstance(ev, Final):
                    return
        finally:
            if not confirmed:
                r.settle(keep=False)  # this run's metrics are no request's
            if not r.done:
                try:
                    self.mlx.submit(self._scheduler.cancel, r)
                except RuntimeError:  # the engine stopped meanwhile: nothing left to cancel
                    pass

    # ---------------------------------------------------------------- memorize

    def memorize_input(self, *, text: str = "", token_ids=()) -> list[int]:
        """The tokens to memorize from ``text`` or ``token_ids`` (one of them, or neither: then
        ``memorize`` says there is nothing). Raises InvalidArgument when both are given."""
        if text and token_ids:
            raise errors.InvalidArgument("give text or token_ids, not both")
        return list(token_ids) or (self.tokenizer.encode(text) if text else [])

    def _memory_service(self) -> MemoryClient:
        if self.memory is None:
            raise errors.FailedPrecondition(_NO_MEMORY_SERVICE)
        return self.memory

    async def list_memories(self, *, page_size: int = 0, page_token: str = "", every_model: bool = False):
        """One page of the memories this model built (``every_model``: of any model) -> (memory_pb2
        Memory list, next page token or ""). Raises what ``MemoryClient.list_memories`` raises."""
        fingerprint = "" if every_model else self.fingerprint
        client = self._memory_service()
        return await asyncio.to_thread(
            client.list_memories, fingerprint=fingerprint, page_size=page_size, page_token=page_token
        )

    async def get_memory(self, memory_id: str):
        """The memory_pb2 Memory ``memory_id``, one of this model's (``list_memories``' set).
        Raises NotFound (also for another model's memory), Unavailable."""
        m = await asyncio.to_thread(self._memory_service().get_memory, memory_id)
        if m.model_fingerprint != self.fingerprint:
            same = self.model_shape.same_model(m.model_fingerprint, m.layout.dtype)
            note = dtype_note(m.layout.dtype, self.dtype, same)
            raise errors.NotFound(
                f"memory {memory_id!r} was built by another model (fingerprint {m.model_fingerprint[:19]}…); "
                "this generator lists and deletes its own model's memories only" + (f" ({note})" if note else "")
            )
        return m

    async def delete_memory(self, memory_id: str) -> None:
        """Deletes ``memory_id``, one of this model's memories, from the memory service. Raises
        NotFound (also for another model's memory), Unavailable."""
        await self.get_memory(memory_id)
        await asyncio.to_thread(self._memory_service().delete_memory, memory_id)

    def memorize_blocking(
        self, token_ids: list[int], *, memory_id: str = "", labels=None, window: int = 0, stride: int = 0, progress=None
    ) -> dict:
        """Builds a memory window by window and streams it to the memory service (blocking; off
        the MLX thread). window / stride 0 = the configured ones. ``progress`` as for
        ``MemoryBuilder.build``. Returns dict(memory_id, num_tokens, num_rows, model_fingerprint)."""
        if self._builder is None:
            raise errors.FailedPrecondition(_NO_MEMORY_SERVICE)
        if not token_ids:
            raise errors.InvalidArgument("nothing to memorize: send a non-empty text or token_ids")
        self._check_vocab(token_ids, "token_ids")
        # The configured window is capped at the model's context (positions past it were never
        # trained); a window asked for explicitly must fit in it.
        if window > self.max_context:
            raise errors.InvalidArgument(
                f"window {window} exceeds the model's context of {self.max_context} positions; "
                f"ask for a window of at most {self.max_context}, or 0 for the default"
            )
        window = window or min(self.config.window, self.max_context)
        return self._builder.build(
            list(token_ids),
            memory_id=memory_id,
            labels=labels,
            window=window,
            stride=stride or min(self.config.stride, window),
            progress=progress,
        )

    async def memorize(self, token_ids, **kw) -> dict:
        """``memorize_blocking`` from the event loop. Cancelling the call (a client gone, a
        deadline) stops the build at its next chunk and deletes the half-built memory, as for
        ``memorize_stream``, instead of leaving a thread to finish a memory nobody waits for."""
        result = None
        async for ev in self.memorize_stream(token_ids, **kw):
            if isinstance(ev, dict):
                result = ev
        return result

    async def memorize_stream(self, token_ids, **kw) -> AsyncIterator[MemorizeProgress | dict]:
        """``memorize`` with progress: yields MemorizeProgress reports, then the result dict.
        Closing the iterator early (cancellation) stops the build at its next chunk and deletes
        the half-built memory. Raises what ``memorize_blocking`` raises."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        closed = False

        def progress(p: MemorizeProgress) -> None:
            if closed:
                raise errors.Cancelled("the memorize call was cancelled")
            loop.call_soon_threadsafe(events.put_nowait, p)

        job = asyncio.ensure_future(asyncio.to_thread(self.memorize_blocking, list(token_ids), progress=progress, **kw))
        job.add_done_callback(lambda _: events.put_nowait(None))
        try:
            while True:
                ev = await events.get()
                if ev is None:
                    break
                yield ev
            yield job.result()  # reports and the job's end reach the loop in order: none is left behind
        finally:
            closed = True
            job.add_done_callback(retrieved)
