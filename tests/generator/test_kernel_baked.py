"""kernel_parts.baked: a kernel's template arguments declared in its source, as MLX's
``mx.fast.cuda_kernel`` declares them at the top of the body (docs/architecture.md, "Host cost of a
launch"). On CUDA, MLX's own generated source for a templated call and the baked kernel's are
compared line for line; everywhere, the declarations' exact text and the decode kernels' launches."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

from services.generator import decode_kernels, kernel_parts
from services.generator import fused_attention as fa

on_cuda = mx.default_device() == mx.gpu and mx.cuda.is_available()
TEMPLATE = (("Tk", mx.float16), ("To", mx.bfloat16), ("Ti", mx.int32), ("D", 64), ("VEC", True), ("MASK", 0))
SOURCE = """
  const size_t i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < x_shape[0]) out[i] = static_cast<To>(static_cast<float>(x[i]) * D + (VEC ? 1.f : 0.f) + MASK);
"""


def test_baked_declares_each_argument_as_mlx_does():
    assert kernel_parts.baked(TEMPLATE, "BODY") == (
        "  using Tk = __half;\n"
        "  using To = __nv_bfloat16;\n"
        "  using Ti = int32_t;\n"
        "  constexpr int D = 64;\n"
        "  constexpr bool VEC = true;\n"
        "  constexpr int MASK = 0;\n"
        "\nBODY"
    )
    assert kernel_parts.baked((("B", False),), "") == "  constexpr bool B = false;\n\n"
    assert kernel_parts.baked((), "BODY") == "BODY"  # MLX adds nothing without template arguments


def test_a_bool_is_declared_as_bool_not_int():
    # bool is an int in Python: checked first, as MLX's variant holds it apart.
    assert "constexpr bool" in kernel_parts.baked((("X", True),), "")
    assert "constexpr int X = 1" in kernel_parts.baked((("X", 1),), "")


def test_every_dtype_is_named_as_mlx_names_it():
    got = {str(t).removeprefix("mlx.core."): kernel_parts.baked((("T", t),), "") for t in kernel_parts.CUDA_TYPES}
    assert got["complex64"] == "  using T = mlx::core::cu::complex64_t;\n\n"
    assert got["uint8"] == "  using T = uint8_t;\n\n" and got["float64"] == "  using T = double;\n\n"
    assert len(got) == 14  # every dtype MLX's dtype_to_cuda_type names


def test_a_value_neither_int_bool_nor_dtype_is_refused():
    with pytest.raises(KeyError):
        kernel_parts.baked((("X", 0.5),), "")


def test_each_variant_keeps_a_name_of_its_own():
    assert kernel_parts.kernel_name("k", (("T", mx.bfloat16), ("D", 64), ("VEC", False))) == "k_bfloat16_64_f"
    assert kernel_parts.kernel_name("k", ()) == "k"


def test_the_decode_kernels_are_made_once_per_template(monkeypatch):
    made = []

    def fake(**kw):
        made.append(kw)
        return object()

    monkeypatch.setattr(mx.fast, "cuda_kernel", fake)
    decode_kernels.topk_merge_kernel.cache_clear()
    try:
        a = decode_kernels.topk_merge_kernel((("K", 16), ("T", 128)))
        assert decode_kernels.topk_merge_kernel((("K", 16), ("T", 128))) is a
        decode_kernels.topk_merge_kernel((("K", 8), ("T", 128)))
    finally:
        decode_kernels.topk_merge_kernel.cache_clear()
    assert len(made) == 2
    assert made[0]["source"].startswith("  constexpr int K = 16;\n  constexpr int T = 128;\n\n")
    assert made[0]["source"].endswith(decode_kernels.TOPK_MERGE_SOURCE)
    assert (made[0]["name"], made[1]["name"]) == ("extmind_topk_merge_16_128", "extmind_topk_merge_8_128")


def test_the_one_launch_layer_passes_no_template_and_reuses_its_launch(monkeypatch):
    """attend_top_k's decode path takes its kernel, launch and constants in one lookup; the
    kernel's source declares what the launch used to pass as template arguments."""
    made, calls = [], []

    class Kernel:
        def __init__(self, **kw):
            made.append(kw)

        def __call__(self, **kw):
            calls.append(kw)
            return ["out", "mass", "rows", "dots"]

    monkeypatch.setattr(mx.fast, "cuda_kernel", Kernel)
    # Constants made here and read back below: not the process's (on CUDA reading one back moves
    # it to managed memory, test_kernel_constants.py).
    for cached in (decode_kernels.attend_kernel, fa._attend_call, fa._scan_attend_call, kernel_parts.constant):
        cached.cache_clear()
    try:
        q = mx.zeros((1, 8, 1, 64), mx.float16)
        bank = (mx.zeros((2, 64, 400), mx.float16), mx.zeros((2, 400)), mx.zeros((2, 400, 64), mx.float16))
        for S in (30, 31, 40):  # one shared-memory bucket: one kernel, one launch
            kv = mx.zeros((1, 2, S, 64), mx.float16)
            mask = fa.mask_mode(None, 1, 1, S)
            out = fa.attend_top_k(q, kv, kv, mask, *bank[:2], bank[2], 10, 0.5, 0.125, mx.float16, 0.01)
            assert out == ["out", "mass", "rows", "dots"]
    finally:
        for cached in (decode_kernels.attend_kernel, fa._attend_call, fa._scan_attend_call):
            cached.cache_clear()
    # Tkv Tv To D T MASK LG KL Tk R VEC
    assert [m["name"] for m in made] == ["extmind_attend_scan_float16_float16_float16_64_256_0_1024_16_float16_8_t"]
    source = made[0]["source"]
    for line in (
        "using Tkv = __half;",
        "constexpr int D = 64;",
        "constexpr int KL = 16;",
        "constexpr int R = 8;",  # 16-byte runs of a float16 bank (fa.scan_attend_run)
        "constexpr bool VEC = true;",
    ):
        assert f"  {line}\n" in source
    assert all("template" not in c for c in calls)
    assert len({tuple(id(x) for x in c["inputs"][6:]) for c in calls}) == 1  # the same constant inputs
    try:
        topk, scale, thr, floor = (np.array(calls[0]["inputs"][i])[0] for i in (6, 8, 9, 10))
        assert (topk, scale, thr, floor) == (10, np.float32(0.125), np.float32(0.5), np.float32(0.01))
    finally:
        kernel_parts.constant.cache_clear()


@pytest.mark.skipif(not on_cuda, reason="MLX's own generated source: CUDA only")
def test_mlx_generates_the_same_kernel_source_from_template_arguments_and_from_baked(capfd):
    """The body MLX generates for a call with template arguments, and the one for the same source
    baked and called without them, are the same text (only the kernel's name differs), and compute
    the same."""
    x = mx.arange(64, dtype=mx.float16)
    call = dict(inputs=[x], output_shapes=[(64,)], output_dtypes=[mx.bfloat16], grid=(64, 1, 1), threadgroup=(64, 1, 1))
    templated = mx.fast.cuda_kernel(name="em_tpl", input_names=["x"], output_names=["out"], source=SOURCE)
    baked = mx.fast.cuda_kernel(
        name="em_baked", input_names=["x"], output_names=["out"], source=kernel_parts.baked(TEMPLATE, SOURCE)
    )
    capfd.readouterr()
    (a,) = templated(**call, template=list(TEMPLATE), verbose=True)
    generated_a = capfd.readouterr().out
    (b,) = baked(**call, verbose=True)
    generated_b = capfd.readouterr().out

    def body(text: str) -> str:
        text = text.split("```", 2)[1]
        return re.sub(r"custom_kernel_\w+", "NAME", text)

    assert "constexpr int D = 64;" in generated_a
    assert body(generated_a) == body(generated_b)
    assert mx.array_equal(a, b).item()


def test_the_one_launch_layer_reads_16_byte_runs_where_the_rows_allow():
    """Runs of 8 rows (16 bytes) for a 2-byte bank whose rows are a multiple of 8; else runs of 4
    (a float32 bank's 16 bytes; a 2-byte bank of other row counts, which runs of 8 would read
    element by element), as the scan kernel takes them."""
    assert fa.scan_attend_run(mx.float16, 4096) == fa.scan_attend_run(mx.bfloat16, 8) == 8
    assert fa.scan_attend_run(mx.float16, 4100) == fa.scan_attend_run(mx.float32, 4096) == fa._RUN == 4
    assert fa.scan_attend_run(mx.float16, 4101) == 4  # not even a run of 4: VEC false, as before
