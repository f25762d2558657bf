"""Memory building (docs/extended-mind.md): windowed plain forwards that capture every layer's
raw pre-RoPE keys and values, streamed to the memory service.

Window i covers tokens [i*stride, min(i*stride + window, N)) with positions restarting at 0; the
first window contributes all its rows, every later window only its newest ones (those no earlier
window covered), so each row after the first window saw at least window - stride tokens of left
context. Rows of special tokens (pad, BOS, EOS, ...) are dropped; ``positions`` maps each kept row
back to its token's position in the text. ``MemoryBuilder.build`` streams the rows of each
prefill chunk of a window to the memory service while the next chunk's forward runs, so at most
two chunks' rows are held at once.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from extmind import errors, tensor
from extmind.errors import InvalidArgument
from extmind.row_wire import append_request
from extmind.v1 import memory_pb2
from services.generator import prefill_attention
from services.generator.extended_attention import ExtendedMindState
from services.generator.kv_dtypes import to_storage
from services.generator.memory_client import MemoryClient
from services.generator.memory_resolution import ModelShape
from services.generator.request_types import DEFAULT_STRIDE, DEFAULT_WINDOW

log = logging.getLogger("extmind.generator")

# How long a failed Memorize's clean-up waits for a memory service that is down to come back (a
# restart takes seconds); past it the service's reaper deletes the memory (MEMORY_BUILDING_TTL).
CLEANUP_WAIT_S = 120.0


@dataclass(frozen=True)
class Window:
    start: int  # first token of the forward pass
    end: int  # one past its last token
    first_new: int  # first token whose rows this window contributes


def plan_windows(n: int, window: int = DEFAULT_WINDOW, stride: int = DEFAULT_STRIDE) -> list[Window]:
    if window <= 0 or stride <= 0:
        raise InvalidArgument(f"window ({window}) and stride ({stride}) must be positive")
    if stride > window:
        raise InvalidArgument(f"stride ({stride}) must not exceed window ({window}): tokens would be skipped")
    out, covered, i = [], 0, 0
    while True:
        start = i * stride
        end = min(start + window, n)
        out.append(Window(start, end, covered))
        covered = end
        if end >= n:
            return out
        i += 1


def kept_rows(token_ids, special_ids) -> tuple[list[int], list[int]]:
    """-> (row token ids, row positions) with special tokens dropped."""
    special = set(special_ids)
    positions = [p for p, t in enumerate(token_ids) if t not in special]
    return [token_ids[p] for p in positions], positions


@dataclass(frozen=True)
class MemorizeProgress:
    """Where a memorize stands: tokens of the text whose keys and values are computed (the
    furthest token any window reached), windows finished, seconds since ``build`` started and
    the estimated seconds left (0.0 = unknown yet; estimated from the forward work done, which
    counts the windows' overlap)."""

    tokens_done: int
    tokens_total: int
    windows_done: int
    windows_total: int
    elapsed_seconds: float
    eta_seconds: float


def _kept_span(keep: list[int]) -> slice | None:
    """``keep`` (increasing offsets) as a slice when it is one run of offsets (no special token
    inside), else None."""
    if keep and keep[-1] - keep[0] == len(keep) - 1:
        return slice(keep[0], keep[-1] + 1)
    return None


def window_chunks(
    model: nn.Module,
    state: ExtendedMindState,
    token_ids,
    w: Window,
    special_ids,
    chunk: int | None = None,
    run=None,
    dtype: int = tensor.FLOAT32,
) -> Iterator[tuple[int, list[tuple[np.ndarray, np.ndarray]]]]:
    """Runs the plain model over one window, a prefill chunk of ``chunk`` tokens at a time
    through a fresh mlx-lm KV cache (positions start at 0 in every window), and yields per chunk
    (one past its last token, per layer the chunk's new non-special rows' raw keys and values as
    numpy [KVH, n, d] storage arrays of ``dtype``; no layers for a chunk without new rows).
    ``dtype`` is the model's compute dtype: the rows as the model computed them (bfloat16 as
    uint16 bits, see ``kv_dtypes``). The arrays are views of evaluated MLX arrays (no copy on
    the host): read them, never write them.

    ``run(fn, *args)`` executes each chunk on the MLX thread, so a caller off that thread lets
    decode steps of other requests run between chunks instead of stalling them for a whole window.
    """
    special = set(special_ids)
    run = run or (lambda fn, *a: fn(*a))
    cache = run(make_prompt_cache, model)
    chunk = chunk or (w.end - w.start)

    def step(lo: int, hi: int):
        keep = [p - lo for p in range(max(lo, w.first_new), hi) if token_ids[p] not in special]
        # The attention modules read the shared state (mlx-lm's forward has no argument to pass it
        # through): no memories, capture every layer's raw keys and values into a list.
        saved_memory, state.memory, state.capture = state.memory, None, []
        try:
            # Only the cache and the captured rows are evaluated: MLX's laziness skips the LM head.
            model(mx.array(token_ids[lo:hi], dtype=mx.int32)[None], cache=cache)
            captured = sorted(state.capture, key=lambda c: c[0])
        finally:
            state.capture, state.memory = None, saved_memory
            # Its masks (a sliding window's array masks) are not held past the chunk, as after a step.
            prefill_attention.forget_masks()
        # One run of rows (the usual case) is a slice; only special tokens inside need a gather.
        # A chunk of context only (an earlier window covered its tokens) contributes no rows.
        rows = _kept_span(keep) or mx.array(keep, dtype=mx.int32)
        out = [
            (mx.contiguous(to_storage(k[0][:, rows], dtype)), mx.contiguous(to_storage(v[0][:, rows], dtype)))
            for _, k, v in (captured if keep else ())
        ]
        # The cache is only read by the window's next chunk.
        mx.eval(out, [c.state for c in cache] if hi < w.end else [])
        # Views, not copies: the message's encoding is the one host copy (np.asarray keeps the
        # MLX array alive).
        return [(np.asarray(k), np.asarray(v)) for k, v in out]

    for lo in range(w.start, w.end, chunk):
        hi = min(lo + chunk, w.end)
        yield hi, run(step, lo, hi)


_END = object()


def read_ahead(items: Iterator) -> Iterator:
    """Yields the items of ``items``, computing the next one on a worker thread while the caller
    handles the current one (the next window chunk's forward runs while this chunk's rows are
    sent). Exceptions of ``items`` are raised here; closing this iterator waits for the item in
    progress and closes ``items``."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="memorize-ahead") as pool:
        pending = pool.submit(next, items, _END)
        try:
            while (item := pending.result()) is not _END:
                pending = pool.submit(next, items, _END)
                yield item
        finally:
            concurrent.futures.wait([pending])
            items.close()


class MemoryBuilder:
    """Memorizes token ids with one model into the memory service.

    ``run(fn, *args)`` executes ``fn`` on the process's MLX thread and waits (MLXThread.call);
    ``build`` itself blocks and must run off that thread.
    """

    def __init__(
        self,
        model: nn.Module,
        state: ExtendedMindState,
        client: MemoryClient,
        shape: ModelShape,
        dtype: int,
        special_ids,
        *,
        chunk: int,
        run: Callable,
    ):
        self.model, self.state, self.client, self.shape = model, state, client, shape
        self.dtype = dtype  # extmind.tensor dtype the rows are stored in: the model's compute dtype
        self.special_ids = set(special_ids)
        self.chunk = chunk
        self.run = run

    def build(
        self,
        token_ids: list[int],
        *,
        memory_id: str = "",
        labels=None,
        window: int = DEFAULT_WINDOW,
        stride: int = DEFAULT_STRIDE,
        progress: Callable[[MemorizeProgress], None] | None = None,
    ) -> dict:
        """Creates the memory, appends every layer's rows window by window and returns
        dict(memory_id, num_tokens, num_rows, model_fingerprint). On any failure the half-built
        memory is deleted and the error re-raised (InvalidArgument for bad windows or a text of
        only special tokens; the memory service's errors otherwise).

        ``progress`` (if given) is called with a MemorizeProgress once before the first window
        and after every prefill chunk of every window, from the thread gRPC pulls the append
        stream on; an exception it raises aborts the build like any other failure."""
        windows = plan_windows(len(token_ids), window, stride)
        row_tokens, positions = kept_rows(token_ids, self.special_ids)
        if not row_tokens:
            raise errors.InvalidArgument("the text has only special tokens: nothing to memorize")
        s = self.shape
        layout = memory_pb2.MemoryLayout(
            num_layers=s.num_layers, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, dtype=self.dtype
        )
        created = self.client.create_memory(
            memory_id=memory_id,
            layout=layout,
            fingerprint=s.fingerprint,
            token_ids=row_tokens,
            positions=positions,
            labels=labels or {},
        )
        mid = created.memory_id
        try:
            resp = self.client.append(self._messages(mid, token_ids, windows, progress))
            if resp.state != memory_pb2.MEMORY_STATE_READY:
                raise errors.Internal(f"memory {mid!r} is not READY after all rows were appended")
        except BaseException:
            self._delete_half_built(mid, created.create_time)
            raise
        return dict(memory_id=mid, num_tokens=len(token_ids), num_rows=len(row_tokens), model_fingerprint=s.fingerprint)

    def _delete_half_built(self, mid: str, create_time) -> None:
        """Nothing half-built stays behind (a memory created again under the id meanwhile stays:
        the delete names ``create_time``). A memory service that is down (the likely reason the
        build failed) is waited for on a thread of its own, up to CLEANUP_WAIT_S, so that the
        caller's retry finds the id free once the service is back, not BUILDING until the
        service's reaper (MEMORY_BUILDING_TTL); the caller gets its error at once."""
        try:
            self.client.delete_memory(mid, create_time)
            return
        except (errors.Unavailable, errors.DeadlineExceeded):
            pass
        except errors.ExtmindError as e:
            log.warning("could not delete the half-built memory", extra={"memory_id": mid, "error": str(e)})
            return

        def when_back() -> None:
            deadline = time.monotonic() + CLEANUP_WAIT_S
            while True:
                try:  # wait-for-ready covers a closed port; a service still loading answers UNAVAILABLE
                    self.client.delete_memory(mid, create_time, wait=max(0.1, deadline - time.monotonic()))
                    log.info("deleted the half-built memory once the memory service answered", extra={"memory_id": mid})
                    return
                except (errors.Unavailable, errors.DeadlineExceeded) as e:
                    if time.monotonic() + 1.0 < deadline:
                        time.sleep(1.0)
                        continue
                    error = e
                except errors.ExtmindError as e:
                    error = e
                log.warning(
                    "could not delete the half-built memory; the memory service deletes it after MEMORY_BUILDING_TTL",
                    extra={"memory_id": mid, "error": str(error)},
                )
                return

        threading.Thread(target=when_back, name="memorize-cleanup", daemon=True).start()

    def _messages(
        self, mid: str, token_ids, windows, progress=None
    ) -> Iterator[memory_pb2.AppendMemoryRequest | bytes]:
        """The append stream (rows serialized by ``row_wire``), computed lazily: a chunk's
        forward runs one chunk ahead of the messages gRPC has asked for (``read_ahead``)."""
        t0 = time.monotonic()
        work_total = sum(w.end - w.start for w in windows)  # tokens run through the model, overlap included
        done = dict(tokens=0, windows=0, work=0)

        def report(w: Window | None = None, hi: int = 0) -> None:
            if progress is None:
                return
            if w is not None:
                done["tokens"] = max(done["tokens"], hi)
                done["work"] = sum(x.end - x.start for x in windows[: done["windows"]]) + hi - w.start
                done["windows"] += hi == w.end
            elapsed = time.monotonic() - t0
            work = done["work"]
            eta = elapsed * (work_total - work) / work if work else 0.0
            progress(MemorizeProgress(done["tokens"], len(token_ids), done["windows"], len(windows), elapsed, eta))

        # Named at once, before the first window's forward: from its first message the stream
        # holds the memory, and the memory service's reaper of abandoned BUILDING memories
        # (docs/contract.md, "KV memories") leaves it alone however slow the forwards are.
        yield memory_pb2.AppendMemoryRequest(memory_id=mid)
        report()

        def chunks():
            for w in windows:
                for hi, layers in window_chunks(
                    self.model, self.state, token_ids, w, self.special_ids, self.chunk, self.run, self.dtype
                ):
                    yield w, hi, layers

        for w, hi, layers in read_ahead(chunks()):
            report(w, hi)
            for layer, (k, v) in enumerate(layers):
                if k.shape[1] == 0:
                    continue
                yield append_request(mid, layer, k, v, self.dtype)
