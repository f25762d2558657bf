"""Extended mind attention of one layer in one or two kernels, on MLX's CUDA backend (the host
side: which kernels a call takes and how they are launched; their sources: ``decode_kernels``).

The portable path (``ExtendedMindAttention._with_memories`` over ``local_top_k``) runs about twenty
small kernels per layer: the cosine matmul, norms, a two-stage partition, gathers, the local
logits, the mask, a concatenation, the softmax and two weighted sums. On a fast GPU each costs
more in launch and latency than in arithmetic, so LOCAL decode spent most of its step waiting on
them (docs/architecture.md, "Fused extended attention"). Here the same computation is two steps:

- the top-k: per query head and token, the exact cosine top-k over the bank's rows (each lane of a
  warp scans a stripe of rows, for the query heads of one KV head at once, and keeps each head's
  sorted top-k; the warp merges them by shuffles; a decode row's scan is split in chunks, whose
  candidates one warp merges; a prefill's scores come from one matmul instead, ranked in
  ``prefill_top_k``), the raw dot products of the winners and the threshold (``top_k_rows``);
- ``attend``: per query head and token, one softmax over [memory logits | local logits] (causal,
  array-masked or unmasked) and the weighted sum of the memory values (read from the bank by row)
  and the local values (read from the KV cache in place, strides and all), written straight in the
  [B, L, H * d] layout ``o_proj`` takes, plus the attention mass on the memories.

``attend_top_k`` runs both for a layer: for a decode step over a bank of up to SCAN_IN_ATTEND rows
the attend kernel scans the bank itself (one launch), over a larger one it merges the scan's
candidates (two launches): a launch costs the host more than the GPU here.
Both compute in float32 from inputs in their own dtypes, as the portable path does, and are
checked against it and against the numpy reference (tests/generator/test_fused_attention.py and
every extended-attention test when run on CUDA). Metal has no port yet: there the portable path
runs.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from services.generator import decode_kernels, kernel_parts, prefill_top_k
from services.generator.citations import memory_weights

MODES = ("auto", "off")
MAX_TOP_K = 32
MAX_HEAD_DIM = 256
_TOPK_THREADS = 128  # four independent warps per block
_ROWS_PER_LANE = 4  # bank rows each scan lane takes at least, when a tile's scan is split
_RUN = 4  # adjacent bank rows a scan lane takes at a time (R)
# The one-launch layer's run (R) by the bank keys' bytes: 16 bytes a load (8 rows of a float16 /
# bfloat16 bank), with its scan's column loop unrolled (kernel_parts.em_dots_rows_t: 64 columns'
# loads in flight, not 8). The scan waited on load latency: H200, 1 B shape, 4 096 rows, launches
# in series 57 -> 38 us a layer, the same rows and outputs (bench/RESULTS.md, 2026-12-03 17:45).
# A float32 bank keeps runs of 4 (16 bytes already) and the rolled loop: not measured unrolled.
# So does a bank whose rows are not a multiple of 8, which runs of 8 would read element by element.
_SCAN_ATTEND_RUN = {2: 8}


def scan_attend_run(keys_dtype, n: int) -> int:
    """R of the one-launch decode layer for a bank of ``n`` rows whose keys are ``keys_dtype``."""
    run = _SCAN_ATTEND_RUN.get(keys_dtype.size, _RUN)
    return run if n % run == 0 else _RUN


_FILL_WARPS = 4096  # scan warps that keep an H100/H200 (132 SMs) busy
_MERGE_CANDIDATES = 1024  # most candidates per query row the merge warp takes (32 per lane)
MATMUL_ROWS = 2048  # query rows (B * H * L) from which the cosines come from one matmul
# Bank rows up to which a decode layer is one launch: the attend kernel's block scans the whole bank
# for its query row. Its GPU time grows with the rows one block scans (H200, 1 B shape: 30 us per
# layer at 4 096 rows, 46 at 8 192, 77 at 16 384, against 28-42 us for the scan kernel, whose warps
# share key columns among a KV head's query heads and split a row's scan over many blocks), while a
# launch less saves the host 10-20 us per layer (bench/RESULTS.md, 2026-12-01 20:35).
SCAN_IN_ATTEND = 8192
_ATTEND_THREADS = 256
_NO_MASK, _CAUSAL, _ARRAY_MASK = 0, 1, 2


def enabled(mode: str = "auto") -> bool:
    """``--fused-attention``: "auto" = on when MLX computes on its CUDA backend, "off" = never.
    Raises ValueError for another mode (an engine configured in code, past the flag's check,
    would otherwise run as "auto")."""
    if mode not in MODES:
        raise ValueError(f"fused attention mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "off":
        return False
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def mask_mode(mask, B: int, L: int, S: int):
    """The kernel's mask mode and array for an mlx-lm attention mask, or None when the kernel
    cannot take it (an additive float mask): (mode, bool array [B, L, S] or a placeholder).
    mlx-lm builds one mask per forward and hands every layer the same array, so the last one
    converted is remembered: a padded batch's decode step makes one contiguous copy, not one per
    layer."""
    global _last_mask
    if mask is None:
        return _NO_MASK, kernel_parts.scalar(False, mx.bool_)
    if isinstance(mask, str):
        return (_CAUSAL, kernel_parts.scalar(False, mx.bool_)) if mask == "causal" else None
    if mask.dtype != mx.bool_:
        return None
    if _last_mask[0] is mask and _last_mask[1] == (B, L, S):
        return _last_mask[2]
    arr = mask
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            return None
        arr = arr[:, 0]
    out = _ARRAY_MASK, mx.contiguous(mx.broadcast_to(arr, (B, L, S)))
    _last_mask = (mask, (B, L, S), out)  # holds the mask: its id is not reused while remembered
    return out


_last_mask: tuple = (None, None, None)


def forget_mask() -> None:
    """Drops the remembered mask and its conversion (``prefill_attention.forget_masks`` calls it
    after each scheduler step and Memorize chunk): a forward's mask is not held past it (a long
    context's prefill chunk, which takes the portable path after ``mask_mode``, has a
    [B, 1, L, S] mask of hundreds of MiB; an unpadded decode batch passes no mask that would
    replace it, nor does an idle generator)."""
    global _last_mask
    _last_mask = (None, None, None)


def _shared_bucket(floats: int) -> int:
    """Dynamic shared memory is fixed per kernel object: round up to a power of two (>= 1 024)."""
    return max(1024, 1 << (floats - 1).bit_length())


def compute_capability() -> tuple[int, int]:
    """This GPU's CUDA compute capability (major, minor) from ``mx.device_info()``; (7, 5), the
    oldest the kernels support, where MLX does not say (the limits and instructions it picks are
    then the safe ones)."""
    info = mx.device_info()
    return int(info.get("compute_capability_major", 7)), int(info.get("compute_capability_minor", 5))


@functools.cache
def max_local_positions() -> int:
    """Most memory + local positions (K + S logits) one attend block holds in shared memory on
    this GPU: a power of two within its per-block limit (opt-in: 227 KiB on compute capability
    9.x / 10.x, 163 KiB on 8.0 / 8.7, 99 KiB on other 8.x / 12.x, 64 KiB on 7.5) less room for
    the kernel's static shared memory. Longer contexts take the portable path."""
    cc = compute_capability()
    kib = 227 if cc[0] in (9, 10) else 163 if cc in ((8, 0), (8, 7)) else 99 if cc[0] >= 8 else 64
    floats = (kib - 16) * 1024 // 4
    return 1 << (floats.bit_length() - 1)


def chunks_for(tiles: int, n: int, k: int) -> int:
    """How many warps share one tile's scan of an ``n``-row bank (a tile: ``head_tile`` query
    heads of one token): enough warps to fill the GPU (a decode step has only B * H query rows),
    at least ``_ROWS_PER_LANE`` rows per lane, and at most ``_MERGE_CANDIDATES`` candidates
    (chunks * k) for the merge's one warp per query row to read (the H200 profile: 5 120
    candidates per row took the merge longer than the scan)."""
    if tiles >= _FILL_WARPS:
        return 1
    most = max(1, min(n // (32 * _ROWS_PER_LANE), _MERGE_CANDIDATES // max(k, 1)))
    return max(1, min(most, -(-_FILL_WARPS // tiles)))


def head_tile(n_heads: int, n_kv_heads: int, list_size: int) -> int:
    """How many query heads of one KV head a scan warp ranks together (GQA: they read each key
    column once): the largest divisor of ``n_heads // n_kv_heads`` whose per-lane lists
    (tile * list_size scores and rows in registers) stay within 64 entries."""
    group = n_heads // n_kv_heads
    return max(t for t in range(1, group + 1) if group % t == 0 and t * list_size <= 64)


def _threshold(threshold: float | None) -> mx.array:
    return kernel_parts.scalar(float(threshold) if threshold is not None else -math.inf, mx.float32)


def _check(k: int, d: int) -> None:
    if k > MAX_TOP_K or d > MAX_HEAD_DIM:
        raise ValueError(f"the fused kernels take k <= {MAX_TOP_K} and head size <= {MAX_HEAD_DIM}")


@functools.lru_cache(maxsize=256)
def _scan_call(B: int, H: int, L: int, kvh: int, d: int, n: int, top_k: int, dtype) -> tuple:
    """The decode scan's launch for these shapes, made once (a decode step repeats it for every
    layer, and the host's time per layer is what a fast GPU waits on): (its call's keyword
    arguments, its constant inputs, k, list size, its template arguments)."""
    k = min(top_k, n)
    _check(k, d)
    size = list_size(k)
    rows = B * H * L
    gt = head_tile(H, kvh, size)
    c = chunks_for(rows // gt, n, k)
    units = rows // gt * c  # one warp each
    template = (("Tk", dtype), ("D", d), ("K", size), ("T", _TOPK_THREADS), ("GT", gt))
    template += (("R", _RUN), ("VEC", n % _RUN == 0))
    call = dict(
        grid=(-(-units // (_TOPK_THREADS // 32)) * _TOPK_THREADS, 1, 1),
        threadgroup=(_TOPK_THREADS, 1, 1),
        output_shapes=[(rows, c, k)] * 3,
        output_dtypes=[mx.float32, mx.int32, mx.float32],
    )
    consts = (kernel_parts.scalar(k, mx.int32), kernel_parts.scalar(c, mx.int32))
    return call, consts, k, size, template


def _scan(q: mx.array, keys_t: mx.array, inv_norms: mx.array, top_k: int):
    """(the scan's candidates cand_s, cand_i, cand_d [B * H * L, C, k], k, list size); q contiguous."""
    B, H, L, d = q.shape
    call, consts, k, size, template = _scan_call(B, H, L, keys_t.shape[0], d, keys_t.shape[2], top_k, keys_t.dtype)
    return decode_kernels.topk_scan_kernel(template)(inputs=[q, keys_t, inv_norms, *consts], **call), k, size


def top_k_rows(
    q: mx.array, keys_t: mx.array, inv_norms: mx.array, top_k: int, threshold: float | None, prefill_keys=None
):
    """Exact cosine top-k of every query head and token over one layer's bank.

    q [B, H, L, d] (rotated queries, any float dtype); keys_t [KVH, d, N] and inv_norms [KVH, N]
    float32 as ``bank_cache.Bank`` holds them; ``prefill_keys``: None, or a function returning
    the bank's ``prefill_top_k.prefill_keys`` (a cached bank keeps them), called only by a batch of
    MATMUL_ROWS query rows or more, the one path that reads them (made per call when None).
    Returns (rows [B, H, L, k] int32, -1 where the cosine is not above ``threshold``; dots
    [B, H, L, k] float32, the raw q . k), k = min(top_k, N), rows in descending cosine. Ties at
    the k-th place may pick either row. Raises ValueError for k > MAX_TOP_K or d > MAX_HEAD_DIM."""
    B, H, L, d = q.shape
    k = min(top_k, keys_t.shape[2])
    _check(k, d)
    q = mx.contiguous(q)
    thr = _threshold(threshold)
    if B * H * L >= MATMUL_ROWS:
        # Many query rows (prefill): each scan warp would read the whole bank once per row;
        # one matmul reads it once, and prefill_top_k ranks its scores.
        prepared = prefill_keys() if prefill_keys is not None else None
        return prefill_top_k.top_k_rows(q, keys_t, inv_norms, k, list_size(k), thr, prepared)
    cand, k, size = _scan(q, keys_t, inv_norms, top_k)
    rows = B * H * L
    rows_out, dots = decode_kernels.topk_merge_kernel((("K", size), ("T", _TOPK_THREADS)))(
        inputs=[thr, *cand],
        grid=(-(-rows // (_TOPK_THREADS // 32)) * _TOPK_THREADS, 1, 1),
        threadgroup=(_TOPK_THREADS, 1, 1),
        output_shapes=[(B, H, L, k), (B, H, L, k)],
        output_dtypes=[mx.int32, mx.float32],
    )
    return rows_out, dots


def list_size(k: int) -> int:
    """The compiled list size serving a top-k of ``k`` (<= MAX_TOP_K): 8, 16 or 32."""
    return 8 if k <= 8 else 16 if k <= 16 else 32


@functools.lru_cache(maxsize=256)
def _attend_call(
    B, H, L, d, floats, mode, kv_dtype, values_dtype, out_dtype, size: int = 0, k: int = 0, scan: tuple = ()
) -> tuple:
    """The attend kernel's launch for these shapes (``size``: the list size of the top-k it takes
    and ``k`` the memories per query, 0 when the memories come as rows and dots; ``scan``: (the
    bank keys' dtype, its run R, whether N % R == 0) when it scans the bank itself), made once: (the
    kernel, its call's keyword arguments)."""
    merge = size > 0
    template = [("Tkv", kv_dtype), ("Tv", values_dtype), ("To", out_dtype), ("D", d), ("T", _ATTEND_THREADS)]
    # One compiled kernel per shared-memory size: MLX opts a kernel in to more than 48 KiB of
    # shared memory only at its first launch, so sizes must not share one.
    template += [("MASK", mode), ("LG", floats), *([("KL", size)] if merge else [])]
    if scan:
        template += [("Tk", scan[0]), ("R", scan[1]), ("VEC", scan[2])]
    memories = "scan" if scan else "merge" if merge else "rows"
    call = dict(
        grid=(B * H * L * _ATTEND_THREADS, 1, 1),
        threadgroup=(_ATTEND_THREADS, 1, 1),
        output_shapes=[(B, L, H * d), (B, H, L), *([(B, H, L, k)] * 2 if merge else [])],
        output_dtypes=[out_dtype, mx.float32, *([mx.int32, mx.float32] if merge else [])],
    )
    return decode_kernels.attend_kernel(floats, memories, tuple(template)), call


@functools.lru_cache(maxsize=256)
def _scan_attend_call(
    B, H, L, d, floats, mode, kv_dtype, values_dtype, out_dtype, keys_dtype, run, vec, k, consts
) -> tuple:
    """``_attend_call`` of the one-launch decode layer (the attend kernel scanning a bank of N <=
    SCAN_IN_ATTEND rows in runs of ``run`` rows (``scan_attend_run``), N % run == 0 when ``vec``;
    ``k`` = min(top_k, N)) and its constant
    inputs made from ``consts`` = (scale, threshold or None, min_weight): (kernel, call, top_k,
    scale, threshold, min_weight as kernel inputs). One lookup per layer and step: a decode step on
    a fast GPU waits on the host, which spent ~3.5 us a layer on these lookups one by one
    (docs/architecture.md, "Host cost of a launch"). Raises ValueError as ``_check``."""
    _check(k, d)
    kernel, call = _attend_call(
        B, H, L, d, floats, mode, kv_dtype, values_dtype, out_dtype, list_size(k), k, (keys_dtype, run, vec)
    )
    scale, threshold, min_weight = consts
    inputs = (
        kernel_parts.scalar(k, mx.int32),
        kernel_parts.scalar(float(scale), mx.float32),
        _threshold(threshold),
        kernel_parts.scalar(float(min_weight), mx.float32),
    )
    return kernel, call, *inputs


def attend(q, k, v, mask, mem_rows, mem_dots, bank_values, scale: float, out_dtype):
    """One softmax over [memories | local context] for every query head and token.

    q [B, H, L, d] rotated queries; k, v [B, KVH, S, d] the local keys (rotated) and values, any
    strides; ``mask`` as ``mask_mode`` returns it; mem_rows / mem_dots [B, H, L, k] from
    ``top_k_rows``; bank_values [KVH, N, d] the bank's values, contiguous (as bank_cache holds
    them: the kernel indexes them so). Returns (out [B, L, H * d] in ``out_dtype``, mass
    [B, H, L] float32: each head's attention weight on its memories).
    Raises ValueError for k > MAX_TOP_K or d > MAX_HEAD_DIM."""
    B, H, L, d = q.shape
    _check(mem_rows.shape[-1], d)
    mode, mask_arr = mask
    floats = _shared_bucket(mem_rows.shape[-1] + k.shape[2])
    kernel, call = _attend_call(B, H, L, d, floats, mode, k.dtype, bank_values.dtype, out_dtype)
    scale_c = kernel_parts.scalar(float(scale), mx.float32)
    inputs = [mx.contiguous(q), k, v, mask_arr, mem_rows, mem_dots, bank_values, scale_c]
    out, mass = kernel(inputs=inputs, **call)
    return out, mass


def attend_top_k(
    q,
    k,
    v,
    mask,
    keys_t,
    inv_norms,
    bank_values,
    top_k: int,
    threshold,
    scale: float,
    out_dtype,
    min_weight=0.0,
    prefill_keys=None,
):
    """Retrieval and attention of one layer: for a decode step one kernel (the attend kernel's
    block scans the bank for its query row: N <= SCAN_IN_ATTEND) or two (the scan, then
    the attend kernel takes the top-k of the scan's candidates itself); ``top_k_rows`` +
    ``attend`` for a batch of query rows past MATMUL_ROWS. The top-k is exact on every path (ties
    at the k-th place may pick either row).

    Arguments as ``top_k_rows`` and ``attend`` take them, except that keys_t and inv_norms must
    be row-contiguous here, as bank_cache holds them (bank_values too, as for ``attend``): the
    one-launch kernel reads them in place (it takes every input as MLX holds it, for the KV
    cache's strides), where the scan kernel of ``top_k_rows`` gets contiguous copies;
    ``prefill_keys`` as ``top_k_rows`` takes it. Returns (out [B, L, H * d] in
    ``out_dtype``, mass [B, H, L] float32, rows [B, H, L, k] int32, dots [B, H, L, k] float32),
    each as those two return it, except that ``rows`` is also -1 where the memory's softmax weight
    is below ``min_weight`` (the citations' floor, docs/extended-mind.md "Citations"; 0: none is).
    Raises ValueError for k > MAX_TOP_K or d > MAX_HEAD_DIM."""
    B, H, L, d = q.shape
    if B * H * L >= MATMUL_ROWS:
        rows, dots = top_k_rows(q, keys_t, inv_norms, top_k, threshold, prefill_keys)
        out, mass = attend(q, k, v, mask, rows, dots, bank_values, scale, out_dtype)
        if min_weight > 0:
            rows = mx.where(memory_weights(rows, dots, mass, scale) >= min_weight, rows, -1)
        return out, mass, rows, dots
    q = mx.contiguous(q)
    mode, mask_arr = mask
    n = keys_t.shape[2]
    if n <= SCAN_IN_ATTEND:
        kk = min(top_k, n)
        run = scan_attend_run(keys_t.dtype, n)
        kernel, call, topk, scale_c, thr, floor = _scan_attend_call(
            B,
            H,
            L,
            d,
            _shared_bucket(kk + k.shape[2]),
            mode,
            k.dtype,
            bank_values.dtype,
            out_dtype,
            keys_t.dtype,
            run,
            n % run == 0,
            kk,
            (scale, threshold, min_weight),
        )
        return kernel(inputs=[q, k, v, mask_arr, keys_t, inv_norms, topk, bank_values, scale_c, thr, floor], **call)
    scale_c = kernel_parts.scalar(float(scale), mx.float32)
    floor = kernel_parts.scalar(float(min_weight), mx.float32)
    cand, kk, size = _scan(q, keys_t, inv_norms, top_k)
    floats = _shared_bucket(kk + k.shape[2])
    kernel, call = _attend_call(B, H, L, d, floats, mode, k.dtype, bank_values.dtype, out_dtype, size, kk)
    inputs = [q, k, v, mask_arr, *cand, bank_values, scale_c, _threshold(threshold), floor]
    return kernel(inputs=inputs, **call)
