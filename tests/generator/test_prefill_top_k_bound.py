"""The arithmetic of prefill_top_k's float16 path, emulated in numpy (its CUDA kernel runs on a GPU
only; the bound it relies on is checked here on any machine): the approximate cosine a_n of a
float16 matmul of the unit query and the unit key (float16 rounding of both and of the result,
float32 accumulation rounded to nearest or truncated as tensor cores do) is within APPROX_E of
the kernel's exact float32 cosine c_n, and the kernel's candidate rule (lanes' best lower bounds
-> a cut; rows whose upper bound reaches it) keeps a row of every exact top-k place.
Draws: rows clustered within 1e-3 of the query's direction, norms over many decades (tiny keys
with subnormal float16 components, keys at float16's largest values, zero keys), queries with
subnormal float16 components, keys along the query's own rounding error, head sizes 64 to 256,
k 1 to 32."""

from __future__ import annotations

import numpy as np
import pytest

from services.generator.prefill_top_k import APPROX_E

f16, f32, f64 = np.float16, np.float32, np.float64
V = 8  # float16 scores per 16-byte load


def _accumulate(products: np.ndarray, truncate: bool) -> np.ndarray:
    """Sequential float32 sums of products [N, d] (each exact in float32), rounded to nearest or
    toward zero."""
    s = np.zeros(products.shape[0], f32)
    for i in range(products.shape[1]):
        t = s + products[:, i]
        if truncate:
            exact = s.astype(f64) + products[:, i].astype(f64)
            t = np.where(np.abs(t.astype(f64)) > np.abs(exact), np.nextafter(t, f32(0)), t)
        s = t
    return s


def _scores(q: np.ndarray, keys: np.ndarray, truncate: bool):
    """(a, c, inv_norm) [N] float32 as the kernel sees them: q [d] float32, keys [N, d] float16."""
    ss = np.sum(q * q, dtype=f32)
    q_inv = f32(1 / np.sqrt(max(f64(ss), 1e-24)))
    unit = (q * q_inv).astype(f16).astype(f32)
    k = keys.astype(f32)
    w = (1 / np.sqrt(np.maximum(np.sum(k.astype(f64) ** 2, axis=-1), 1e-24))).astype(f32)
    unit_keys = (k * w[:, None]).astype(f16).astype(f32)  # the product in float32, then rounded
    a = _accumulate(unit[None] * unit_keys, truncate).astype(f16).astype(f32)
    dot = _accumulate((q[None].astype(f64) * k).astype(f32), truncate=False)  # fused multiply-adds
    return a, dot * q_inv * w, w


def _kernel_picks(a: np.ndarray, c: np.ndarray, k: int, e: float = APPROX_E) -> np.ndarray:
    """The rows the kernel ranks exactly (its candidates), by its rule with bound ``e``, in its lane
    layout."""
    n = np.arange(len(a))
    lane = (n // V) % 32 if len(a) % V == 0 else n % 32
    e = f32(e)
    with np.errstate(invalid="ignore"):
        low = np.where(np.isnan(a), -np.inf, a - e)
    lo = np.full(32, -np.inf, f32)
    np.maximum.at(lo, lane, low.astype(f32))
    lo[~np.isfinite(lo)] = -np.inf  # a lane whose best is +inf bounds nothing
    cut = np.sort(lo)[::-1][k - 1]
    with np.errstate(invalid="ignore"):
        skipped = (a + e < cut) & (a > -np.inf)
    return n[~skipped]


def _draw(rng, kind: int, d: int, N: int):
    u = rng.standard_normal(d)
    un = u / np.linalg.norm(u)
    if kind == 0:  # rows within 1e-3 of the query's direction, norms over four decades
        side = rng.standard_normal((N, d))
        side -= np.outer(side @ un, un)
        side /= np.linalg.norm(side, axis=1, keepdims=True)
        cos = 0.99 + rng.uniform(0, 1e-3, N)
        keys = (cos[:, None] * un + np.sqrt(1 - cos**2)[:, None] * side) * rng.lognormal(0, 2, (N, 1))
    elif kind == 1:  # tiny keys (subnormal float16 scores) and zero keys (inverse norm 1e12)
        keys = rng.standard_normal((N, d)) * 10.0 ** rng.uniform(-7, -3, (N, 1))
        keys[rng.integers(0, N, 5)] = 0
    elif kind == 2:  # a query with subnormal float16 components
        u = rng.standard_normal(d) * 10.0 ** rng.uniform(-9, 0, d)
        un = u / np.linalg.norm(u)
        keys = rng.standard_normal((N, d)) + np.outer(rng.uniform(0, 3, N), un)
    elif kind == 3:  # keys along the unit query's float16 rounding error (the bound's worst case)
        err = un.astype(f16).astype(f64) - un
        err /= np.linalg.norm(err)
        keys = rng.uniform(-1, 1, (N, 1)) * un + rng.uniform(0, 1, (N, 1)) * err
        keys = (keys + 1e-3 * rng.standard_normal((N, d))) * rng.uniform(0.5, 50, (N, 1))
    else:  # scores that overflow float16 (inf), next to ordinary rows
        keys = rng.standard_normal((N, d))
        keys[:3] = np.outer([1.0, -1.0, 0.5], un) * 8e4
    q = (u + 1e-3 * np.linalg.norm(u) / np.sqrt(d) * rng.standard_normal(d)).astype(f32)
    return q, np.clip(keys, -65504, 65504).astype(f16)


def _case(rng, kind: int, full_keys: bool = False):
    """One draw of the bound tests: (k, q float32 [d], keys [N, d]) for a head size d in 64-256, N
    rows (300: not a multiple of V, the row-at-a-time lanes) and k in 1-32; the keys float16, or
    with ``full_keys`` float32 with every significand bit in use (a float32 bank)."""
    d = int(rng.choice([64, 80, 128, 256]))
    N = int(rng.choice([96, 300, 512]))
    k = int(rng.integers(1, 33))
    q, keys = _draw(rng, kind, d, N)
    if full_keys:
        keys = keys.astype(f32) * (1 + rng.uniform(0, 2.0**-11, keys.shape)).astype(f32)
    return k, q, keys


@pytest.mark.parametrize("truncate", [False, True], ids=["round", "truncate"])
def test_the_float16_bound_holds_and_no_top_k_row_is_skipped(truncate):
    rng = np.random.default_rng(5 + truncate)
    worst = 0.0
    for trial in range(40):
        k, q, keys = _case(rng, trial % 5)
        a, c, w = _scores(q, keys, truncate)
        finite = np.isfinite(a)
        err = np.abs(a[finite].astype(f64) - c[finite]) / APPROX_E
        worst = max(worst, float(err.max(initial=0.0)))
        assert (err <= 1).all(), f"draw {trial}: |a - c| past the bound"
        cand = _kernel_picks(a, c, k)
        kth = np.sort(c)[::-1][k - 1]
        assert (c >= kth).sum() >= k
        assert np.isin(np.flatnonzero(c >= kth), cand).all(), f"draw {trial}: a row of the exact top-k was skipped"
    assert worst > 0.25  # the draws come within a rounding of the bound (3.25 roundings)


@pytest.mark.parametrize("d", [64, 256])
def test_the_bound_is_reached_within_its_margin(d):
    """A worst case: every component of the unit query just above a float16 midpoint (rounded up
    by nearly 2^-11 of itself), keys along the query on the float16 grid (their unit keys round
    up as well): a - c exceeds two roundings (2^-10), within the bound (three roundings plus a
    margin): the bound is not loose by more than the third rounding, and a bound of two roundings
    without a margin would fail."""
    rng = np.random.default_rng(d)
    u = np.full(d, 2.0 ** -(3 if d == 64 else 4) * (1 + 2.0**-11 + 2.0**-17))
    u[d - (1 if d == 64 else 16) :] = 0  # room for one free component that makes |u| = 1
    u[0] = np.sqrt(1 - np.sum(u[1:] ** 2))
    keys = rng.uniform(0.5, 1, (8192, 1)) * u * (1 + rng.integers(-3, 4, (8192, d)) * 2.0**-11)
    a, c, _ = _scores(u.astype(f32), keys.astype(f16), truncate=False)
    err = a.astype(f64) - c
    assert (np.abs(err) <= APPROX_E).all()
    assert err.max() > 2.0**-10


def _tf32(x: np.ndarray, truncate: bool) -> np.ndarray:
    """float32 -> TF32 (10 explicit significand bits), rounded to nearest (ties away) or truncated
    as tensor cores fed unrounded float32 do."""
    bits = x.astype(f32).view(np.uint32)
    if not truncate:
        bits = bits + np.uint32(0x1000)
    return (bits & np.uint32(0xFFFFE000)).view(f32)


@pytest.mark.parametrize("truncate", [False, True], ids=["round", "truncate"])
def test_a_tf32_matmul_of_a_float32_bank_skips_no_top_k_row(truncate):
    """A float32 (or bfloat16) bank takes a float32 matmul, which MLX may run in TF32 on CUDA: the
    unit query and unit keys in TF32, float32 accumulation and result. Rounded to nearest, that is
    two roundings of 2^-11: within the bound. Truncated, a row's error may pass E (its bound is 2^-9),
    but truncation only shrinks each product, so a row's score is lowered by its positive products
    and raised by its negative ones; a top-k row lowered and a lesser row raised still differ by
    less than 2E, and the candidate rule skips no top-k row (checked here, full significands)."""
    rng = np.random.default_rng(11 + truncate)
    worst = 0.0
    for trial in range(60):
        k, q, keys = _case(rng, trial % 4, full_keys=True)
        ss = np.sum(q * q, dtype=f32)
        q_inv = f32(1 / np.sqrt(max(f64(ss), 1e-24)))
        w = (1 / np.sqrt(np.maximum(np.sum(keys.astype(f64) ** 2, axis=-1), 1e-24))).astype(f32)
        unit, unit_keys = _tf32(q * q_inv, truncate), _tf32(keys * w[:, None], truncate)
        a = _accumulate((unit[None].astype(f64) * unit_keys).astype(f32), truncate=False)
        c = _accumulate((q[None].astype(f64) * keys).astype(f32), truncate=False) * q_inv * w
        err = np.abs(a.astype(f64) - c) / APPROX_E
        worst = max(worst, float(err.max()))
        if not truncate:
            assert (err <= 1).all(), f"draw {trial}: |a - c| past the bound"
        cand = _kernel_picks(a, c, k)
        kth = np.sort(c)[::-1][k - 1]
        assert np.isin(np.flatnonzero(c >= kth), cand).all(), f"draw {trial}: a row of the exact top-k was skipped"
    assert worst > 0.1


def _raw_scores(q16: np.ndarray, keys: np.ndarray, truncate: bool):
    """(a, |q| c, the kernel's bound for the row) [N] for a float16 query taken as it is: the
    float16 matmul of q and the unit keys (float32 accumulation, float16 result)."""
    q = q16.astype(f32)
    q_inv = f32(1 / np.sqrt(max(f64(np.sum(q * q, dtype=f32)), 1e-24)))
    k = keys.astype(f32)
    w = (1 / np.sqrt(np.maximum(np.sum(k.astype(f64) ** 2, axis=-1), 1e-24))).astype(f32)
    unit_keys = (k * w[:, None]).astype(f16).astype(f32)
    with np.errstate(over="ignore"):
        a = _accumulate(q[None] * unit_keys, truncate).astype(f16).astype(f32)
    dot = _accumulate((q[None].astype(f64) * k).astype(f32), truncate=False)
    return a, dot * w, f32(APPROX_E) / q_inv + f32(5.9604645e-8)


@pytest.mark.parametrize("truncate", [False, True], ids=["round", "truncate"])
def test_float16_queries_taken_as_they_are_keep_within_the_scaled_bound(truncate):
    """prefill_top_k's RAW path: a float16 query goes into the matmul unnormalized; the score is
    within APPROX_E * |q| + 2^-24 of |q| times the exact cosine (the kernel's per-row bound), for
    queries of any norm (subnormal float16 components, norms from 1e-4 to 1e3), and the candidate
    rule with that bound skips no top-k row."""
    rng = np.random.default_rng(21 + truncate)
    worst = 0.0
    for trial in range(40):
        k, q, keys = _case(rng, trial % 5)
        q16 = (q * 10.0 ** rng.uniform(-4, 3)).astype(f16)
        if not np.any(q16):
            continue
        a, qc, e = _raw_scores(q16, keys, truncate)
        finite = np.isfinite(a)
        err = np.abs(a[finite].astype(f64) - qc[finite]) / e
        worst = max(worst, float(err.max(initial=0.0)))
        assert (err <= 1).all(), f"draw {trial}: |a - |q| c| past the bound"
        cand = _kernel_picks(a, qc, k, e)
        kth = np.sort(qc)[::-1][k - 1]
        assert np.isin(np.flatnonzero(qc >= kth), cand).all(), f"draw {trial}: a row of the exact top-k was skipped"
    assert (
        worst > 0.3
    )  # the draws come within a rounding of the two roundings (~0.6 of the bound) that raw queries take


@pytest.mark.parametrize("truncate", [False, True], ids=["round", "truncate"])
def test_raw_float32_queries_in_a_tf32_matmul_keep_within_the_scaled_bound(truncate):
    """prefill_top_k's RAW path for a float32 or bfloat16 bank: the query goes into the float32
    matmul as it is, which MLX may run in TF32, so a float32 query is rounded (or truncated) to
    TF32 there after all (a bfloat16 one is exact): with the unit key's rounding, two roundings of
    2^-11 of |q| rounded to nearest, within the kernel's per-row bound; truncated, products only
    shrink and the candidate rule with that bound still skips no top-k row."""
    rng = np.random.default_rng(31 + truncate)
    worst = 0.0
    for trial in range(60):
        k, q, keys = _case(rng, trial % 4, full_keys=True)
        q = (q * 10.0 ** rng.uniform(-6, 6)).astype(f32) * (1 + rng.uniform(0, 2.0**-11, q.shape)).astype(f32)
        q_inv = f32(1 / np.sqrt(max(f64(np.sum(q * q, dtype=f32)), 1e-24)))
        w = (1 / np.sqrt(np.maximum(np.sum(keys.astype(f64) ** 2, axis=-1), 1e-24))).astype(f32)
        a = _accumulate((_tf32(q, truncate)[None].astype(f64) * _tf32(keys * w[:, None], truncate)).astype(f32), False)
        qc = _accumulate((q[None].astype(f64) * keys).astype(f32), truncate=False) * w  # |q| c
        e = f32(APPROX_E) / q_inv + f32(5.9604645e-8)
        err = np.abs(a.astype(f64) - qc) / e
        worst = max(worst, float(err.max()))
        if not truncate:
            assert (err <= 1).all(), f"draw {trial}: |a - |q| c| past the bound"
        cand = _kernel_picks(a, qc, k, e)
        kth = np.sort(qc)[::-1][k - 1]
        assert np.isin(np.flatnonzero(qc >= kth), cand).all(), f"draw {trial}: a row of the exact top-k was skipped"
    assert worst > 0.1
