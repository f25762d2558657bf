"""The per-request tallies kept on the device (citations.Counts, attention_mass.MassSum), fed by
their group's batch_tally.BatchTally, equal a host-side count over every step: across flushes,
batches that change (sequences joining and leaving), requests that keep no tally, and requests
that leave; with each forward's layers kept as they are or stacked into one record (the
scheduler's ``stack_picks`` / ``stack_shares``: one kernel launch on CUDA)."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from services.generator import attention_mass, device_stack
from services.generator.attention_mass import MassSum
from services.generator.batch_tally import BatchTally
from services.generator.citations import Counts, Picks, memory_weights, picked_rows, stack_picks

from . import cuda_emulator


def _batches(rng, steps, uids_pool=6, most=4):
    """A decode batch per step: mostly the previous one, sometimes a sequence joins or leaves."""
    batch = [0, 1]
    out = []
    for _ in range(steps):
        r = rng.random()
        if r < 0.1 and len(batch) < most:
            batch = batch + [int(rng.choice([u for u in range(uids_pool) if u not in batch]))]
        elif r < 0.2 and len(batch) > 1:
            batch = [u for u in batch if u != batch[int(rng.integers(len(batch)))]]
        out.append(list(batch))
    return out


def _requests(n, make):
    return {uid: SimpleNamespace(counts=make(uid), mass=None) for uid in range(n)}


@pytest.mark.parametrize("compact", [None, stack_picks])
def test_counts_equal_a_bincount_over_every_step_flush_and_batch_change(compact):
    rng = np.random.default_rng(0)
    rows, layers, H, k = 50, 3, 2, 5
    steps = 2 * BatchTally.FLUSH_STEPS + 7  # flushes by steps, by batch changes, and a remainder
    # Request 3 keeps no counts (it did not ask for citations): its rows are skipped.
    requests = _requests(6, lambda uid: None if uid == 3 else Counts(rows))
    tally = BatchTally("counts", requests.get, picked_rows, compact)
    want = {uid: np.zeros(rows, np.int64) for uid in requests}
    batches = _batches(rng, steps)
    assert len({tuple(b) for b in batches}) > 2, "the draw never changed the batch"
    for uids in batches:
        fwd = rng.integers(-1, rows, (layers, len(uids), H, 1, k)).astype(np.int32)  # -1 = masked
        kept = tally.add(uids, [Picks(mx.array(a)) for a in fwd])
        assert len(kept) == (1 if compact else layers)
        for b, uid in enumerate(uids):
            picked = fwd[:, b].reshape(-1)
            want[uid] += np.bincount(picked[picked >= 0], minlength=rows)
    tally.flush()
    for uid, r in requests.items():
        if r.counts is None:
            continue
        got = r.counts.read()
        assert got.dtype == np.int32 and got.shape == (rows,)
        np.testing.assert_array_equal(got, want[uid])
    assert sum(w.sum() for u, w in want.items() if u != 3) > 0


def test_a_request_that_left_is_skipped_and_the_others_still_count():
    rows, H, k = 20, 2, 3
    requests = _requests(2, lambda uid: Counts(rows))
    tally = BatchTally("counts", requests.get, picked_rows)
    fwd = np.arange(2 * H * k, dtype=np.int32).reshape(1, 2, H, 1, k) % rows
    tally.add([0, 1], [Picks(mx.array(a)) for a in fwd])
    gone = requests.pop(0)  # cancelled before the flush
    tally.flush()
    np.testing.assert_array_equal(gone.counts.read(), np.zeros(rows, np.int32))
    want = np.bincount(fwd[:, 1].reshape(-1), minlength=rows)
    np.testing.assert_array_equal(requests[1].counts.read(), want)


@pytest.mark.parametrize("scales,compact", [((0.25, 0.5), None), ((0.25, 0.5), stack_picks), ((0.5,) * 3, stack_picks)])
def test_weighed_counts_keep_only_picks_with_enough_attention_across_flushes(scales, compact):
    """With a floor, a pick counts only when its softmax weight (rebuilt at the flush from the raw
    dots, the head's memory mass and the layer's scale; two scales in one forward, which
    ``stack_picks`` leaves unstacked) reaches it: equal to a host-side count of a direct softmax
    over [memories | local], weights near the floor left out of the draw."""
    rng = np.random.default_rng(2)
    rows, B, H, k, S, floor = 40, 3, 2, 4, 6, 0.1
    requests = _requests(B, lambda uid: Counts(rows))
    tally = BatchTally("counts", requests.get, lambda fwds: picked_rows(fwds, floor), compact)
    want = {uid: np.zeros(rows, np.int64) for uid in requests}
    for _ in range(BatchTally.FLUSH_STEPS + 5):
        fwd = []
        for scale in scales:
            while True:
                r = rng.integers(-1, rows, (B, H, 1, k)).astype(np.int32)
                dots = rng.normal(size=(B, H, 1, k)).astype(np.float32) * 6
                local = rng.normal(size=(B, H, 1, S)) * 6
                logits = np.concatenate([np.where(r >= 0, dots * scale, -np.inf), local * scale], -1)
                w = np.exp(logits - logits.max(-1, keepdims=True))
                w /= w.sum(-1, keepdims=True)
                if np.abs(w[..., :k] - floor).min() > 1e-3:  # no weight within rounding of the floor
                    break
            fwd.append(Picks(mx.array(r), mx.array(dots), mx.array(w[..., :k].sum(-1).astype(np.float32)), scale))
            for b in range(B):
                kept = r[b][(w[b, ..., :k] >= floor) & (r[b] >= 0)]
                want[b] += np.bincount(kept, minlength=rows)
        kept = tally.add(list(range(B)), fwd)
        assert len(kept) == (1 if compact and len(set(scales)) == 1 else len(scales))
    tally.flush()
    assert all(w.sum() > 0 for w in want.values())
    for uid, r in requests.items():
        np.testing.assert_array_equal(r.counts.read(), want[uid])


@pytest.mark.parametrize("compact", [None, attention_mass.stack_shares])
def test_mass_means_equal_the_host_mean_over_every_step_and_head(compact):
    rng = np.random.default_rng(1)
    layers, heads = [0, 2, 5], 4
    steps = BatchTally.FLUSH_STEPS + 9
    requests = {uid: SimpleNamespace(counts=None, mass=MassSum(layers, heads)) for uid in range(6)}
    tally = BatchTally("mass", requests.get, attention_mass.summed_shares, compact)
    assert requests[0].mass.means() == {}
    sums = {uid: np.zeros(len(layers)) for uid in requests}
    n = dict.fromkeys(requests, 0)
    for uids in _batches(rng, steps):
        fwd = rng.uniform(0, 1, (len(layers), len(uids), heads, 1)).astype(np.float32)  # per head
        tally.add(uids, [mx.array(a) for a in fwd])
        for b, uid in enumerate(uids):
            sums[uid] += fwd[:, b, :, 0].sum(-1)
            n[uid] += 1
    tally.flush()
    for uid, r in requests.items():
        got = r.mass.means()
        if not n[uid]:
            assert got == {}
            continue
        assert list(got) == layers
        np.testing.assert_allclose([got[i] for i in layers], sums[uid] / (n[uid] * heads), rtol=1e-5)


def test_the_tally_flushes_early_when_the_pending_picks_hold_much_memory(monkeypatch):
    """The pending records keep their forwards' whole-batch arrays alive until the flush: past
    FLUSH_ITEMS picks the tally flushes before FLUSH_STEPS steps (a large top-k would otherwise
    hold gigabytes), and counts the same as a host-side bincount."""
    monkeypatch.setattr(BatchTally, "FLUSH_ITEMS", 500)
    rng = np.random.default_rng(3)
    rows, layers, B, H, k = 60, 2, 4, 2, 16  # 128 picks of the batch per layer, 256 per step
    requests = _requests(B, lambda uid: Counts(rows))
    tally = BatchTally("counts", requests.get, picked_rows)
    want = {uid: np.zeros(rows, np.int64) for uid in requests}
    pending = []
    for _ in range(9):
        fwd = rng.integers(-1, rows, (layers, B, H, 1, k)).astype(np.int32)
        tally.add(list(range(B)), [Picks(mx.array(a)) for a in fwd])
        for b in range(B):
            picked = fwd[:, b].reshape(-1)
            want[b] += np.bincount(picked[picked >= 0], minlength=rows)
        pending.append(len(tally._pending))
    assert pending == [1, 0, 1, 0, 1, 0, 1, 0, 1]  # 512 picks in 2 steps: a flush every 2nd step
    tally.flush()
    for uid, r in requests.items():
        np.testing.assert_array_equal(r.counts.read(), want[uid])


def test_a_flush_that_fails_keeps_its_records_for_the_next_reader():
    """Should combining the records raise, they are not dropped: the next flush (another request
    reading its tally) raises too instead of counting without them."""
    rows, H, k = 20, 2, 3
    requests = _requests(2, lambda uid: Counts(rows))
    calls = []

    def combine(forwards):
        calls.append(len(forwards))
        if len(calls) == 1:
            raise RuntimeError("combine failed")
        return picked_rows(forwards)

    tally = BatchTally("counts", requests.get, combine)
    fwd = np.arange(2 * H * k, dtype=np.int32).reshape(1, 2, H, 1, k) % rows
    tally.add([0, 1], [Picks(mx.array(a)) for a in fwd])
    with pytest.raises(RuntimeError, match="combine failed"):
        tally.flush()
    tally.flush()  # the same record, combined this time
    assert calls == [1, 1]
    np.testing.assert_array_equal(requests[1].counts.read(), np.bincount(fwd[:, 1].reshape(-1), minlength=rows))


@pytest.fixture
def strict_stack(monkeypatch):
    """device_stack.stack refusing a caller that says ``checked`` of arrays that are not all of
    one shape and dtype (on CUDA its kernel would read them as the first one's shape, unchecked)."""
    stack = device_stack.stack

    def strict(arrays, axis, *, checked=False):
        assert not checked or device_stack.uniform(arrays), [(a.shape, a.dtype) for a in arrays]
        return stack(arrays, axis, checked=checked)

    monkeypatch.setattr(device_stack, "stack", strict)


@pytest.mark.parametrize("compact", [None, "stack"])
def test_records_of_mixed_dtypes_are_promoted_not_refused(compact, strict_stack):
    """``device_stack`` takes arrays of one dtype only; the tallies join records of mixed dtypes
    (a half-precision mass or dots next to float32 ones, which ``mx.concatenate`` promotes) as
    they did before stacking (no caller hands the stack mixed arrays as checked: ``strict_stack``),
    and count the same as the host."""
    rng = np.random.default_rng(4)
    rows, B, H, k, floor, scale = 30, 2, 2, 4, 0.05, 0.5
    counts = _requests(B, lambda uid: Counts(rows))
    masses = {uid: SimpleNamespace(counts=None, mass=MassSum([0, 1], H)) for uid in range(B)}
    picks_tally = BatchTally("counts", counts.get, lambda f: picked_rows(f, floor), compact and stack_picks)
    mass_tally = BatchTally("mass", masses.get, attention_mass.summed_shares, compact and attention_mass.stack_shares)
    want = {uid: np.zeros(rows, np.int64) for uid in range(B)}
    mass_sum = np.zeros((B, 2))
    steps = 5
    for step in range(steps):
        fwd, shares = [], []
        for layer, dtype in enumerate((mx.float32, mx.float16) if step % 2 else (mx.float16, mx.float32)):
            r = rng.integers(-1, rows, (B, H, 1, k)).astype(np.int32)
            dots = rng.uniform(-4, 4, (B, H, 1, k)).astype(np.float16).astype(np.float32)
            mass = rng.uniform(0, 1, (B, H, 1)).astype(np.float16).astype(np.float32)
            fwd.append(Picks(mx.array(r), mx.array(dots).astype(dtype), mx.array(mass).astype(dtype), scale))
            shares.append(mx.array(mass).astype(dtype))
            w = np.array(memory_weights(mx.array(r), mx.array(dots), mx.array(mass), scale))
            for b in range(B):
                kept = r[b][(w[b] >= floor) & (r[b] >= 0)]
                want[b] += np.bincount(kept, minlength=rows)
                mass_sum[b, layer] += mass[b].sum()
        picks_tally.add(list(range(B)), fwd)
        mass_tally.add(list(range(B)), shares)
    picks_tally.flush()
    mass_tally.flush()
    for b in range(B):
        np.testing.assert_array_equal(counts[b].counts.read(), want[b])
        got = masses[b].mass.means()
        np.testing.assert_allclose([got[0], got[1]], mass_sum[b] / (steps * H), rtol=1e-5)


@pytest.fixture(params=["mlx", "emulated_kernel"])
def stacking(request, monkeypatch):
    """device_stack as off CUDA (mx.stack) or through its CUDA kernel, emulated (cuda_emulator.py)."""
    if request.param == "emulated_kernel":
        if cuda_emulator.CXX is None:
            pytest.skip("the emulator needs a C++ compiler")
        monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_emulator.cuda_kernel)
        monkeypatch.setattr(device_stack, "on_device", lambda: True)
    _forget_kernels()
    yield
    _forget_kernels()


def _forget_kernels():
    device_stack._kernel.cache_clear()
    device_stack._compiled.clear()


@pytest.mark.parametrize("layers", [[4], [0, 2, 5]])
@pytest.mark.parametrize("every", [2, 7, 1000])  # 1000: later flushes hold no compacted forward
def test_forwards_compacted_or_kept_by_layer_mix_in_one_flush(stacking, strict_stack, layers, every):
    """The scheduler compacts a forward's records only when they are graphs (the portable path;
    BatchTally.add(compact=...)), so one flush may hold forwards of both kinds (a context that
    outgrows the fused kernels mid-window), also past device_stack's MAX_INPUTS per launch, and
    shares read through strides (not row-contiguous views): the sums are the host's."""
    rng = np.random.default_rng(len(layers) * every)
    heads, uids, steps = 4, [0, 2], 2 * BatchTally.FLUSH_STEPS + 5
    requests = {u: SimpleNamespace(counts=Counts(30), mass=MassSum(layers, heads)) for u in range(3)}
    mass = BatchTally("mass", requests.get, attention_mass.summed_shares, attention_mass.stack_shares)
    counts = BatchTally("counts", requests.get, picked_rows, stack_picks)
    sums = {u: np.zeros(len(layers)) for u in uids}
    hits = {u: np.zeros(30, np.int64) for u in uids}
    for step in range(steps):
        shares = rng.uniform(0, 1, (len(layers), len(uids), heads, 1)).astype(np.float32)
        picks = rng.integers(-1, 30, (len(layers), len(uids), heads, 1, 3)).astype(np.int32)
        strided = [mx.array(a.transpose(2, 1, 0)).transpose(2, 1, 0) for a in shares]  # [B, H, 1] views
        mass.add(uids, strided, step % every == 0)
        counts.add(uids, [Picks(mx.array(a)) for a in picks], step % every == 1)
        for b, u in enumerate(uids):
            sums[u] += shares[:, b, :, 0].sum(-1)
            p = picks[:, b].reshape(-1)
            hits[u] += np.bincount(p[p >= 0], minlength=30)
    mass.flush()
    counts.flush()
    for u in uids:
        got = requests[u].mass.means()
        np.testing.assert_allclose([got[i] for i in layers], sums[u] / (steps * heads), rtol=1e-5)
        np.testing.assert_array_equal(requests[u].counts.read(), hits[u])


@pytest.mark.parametrize("axis", [1, -1])
def test_stack_matches_numpy_across_its_kernel_sizes(axis, stacking):
    """``device_stack.stack`` of n inputs around each kernel size (SLOTS, the unused slots
    repeating an input) and past MAX_INPUTS (stacked in parts) equals numpy's stack; on MLX CUDA
    these are its own kernels, elsewhere ``mx.stack``."""
    assert [device_stack.slots_for(n) for n in (1, 16, 17, 64, 65, 256)] == [16, 16, 64, 64, 256, 256]
    rng = np.random.default_rng(7)
    for n in (1, 2, 15, 16, 17, 63, 64, 65, 255, 256, 257, 300):
        arrays = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(n)]
        got = device_stack.stack([mx.array(a) for a in arrays], axis=axis)
        np.testing.assert_array_equal(np.array(got), np.stack(arrays, axis=axis), err_msg=f"n={n}")


def test_compile_all_compiles_every_size_of_what_ran(stacking):
    """After ``compile_all`` every SLOTS size of the tallies' dtypes (TALLY_DTYPES, whether or not a
    request ran them) and of each other dtype stacked so far is compiled (on MLX CUDA or its
    emulation; off CUDA there is nothing to compile), one kernel a size and dtype for both axes, so
    a flush of any length on either axis launches a kernel that exists; a second call compiles
    nothing."""
    device_stack.stack([mx.ones((1, 2), dtype=mx.float16)] * 3, axis=1)
    if device_stack.on_device():
        dtypes = device_stack.TALLY_DTYPES | {mx.float16}
        assert device_stack.compile_all() == len(dtypes) * len(device_stack.SLOTS) - 1  # float16's 16 ran
        assert {(s, d) for d in dtypes for s in device_stack.SLOTS} == device_stack._compiled
        compiled = set(device_stack._compiled)
        got = device_stack.stack([mx.full((1, 2), float(i)) for i in range(20)], axis=-1)  # no kernel of its own
        assert device_stack._compiled == compiled and device_stack._kernel.cache_info().currsize == 3
        assert mx.array_equal(got, mx.broadcast_to(mx.arange(20, dtype=mx.float32), (1, 2, 20))).item()
    else:
        assert device_stack.compile_all() == 0 and not device_stack._compiled
    assert device_stack.compile_all() == 0
