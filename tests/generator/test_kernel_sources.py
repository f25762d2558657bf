"""The CUDA kernels' sources compile as C++ on any machine: each kernel body (as MLX's
``mx.fast.cuda_kernel`` wraps it: inputs, outputs, ``<name>_shape`` / ``_strides`` / ``_ndim``,
the template arguments as constants at the top of a plain function) is compiled by the host C++
compiler against stand-ins for the CUDA built-ins (``threadIdx``, warp shuffles, ``__half``, ...),
once per set of template arguments the Python side passes. A typo, an undeclared name or a type
error in a kernel then fails
here, on a CPU-only CI run, and not first on a GPU. What the kernels compute is tested on CUDA
(test_fused_attention.py, test_prefill_attention.py, test_device_stack.py) and, on Linux, on the
CPU emulator (test_kernels_emulated.py, test_prefill_merge_emulated.py); this check needs only a C++
compiler. The stand-ins define EM_PORTABLE_MMA, so kernel_parts.MMA_HEADER's inline PTX (mma.sync)
is compiled only on CUDA."""

import re
import subprocess

import pytest

from services.generator import decode_kernels as dk
from services.generator import device_stack, kernel_parts, prefill_merge_kernels, prefill_top_k

from . import cuda_emulator

CXX = cuda_emulator.CXX

# Host stand-ins for what NVRTC provides: the emulator's type and math stand-ins, a half type that
# needs no compiler support for _Float16, and shuffles / barriers that only have to type-check.
STUBS = (
    cuda_emulator.STAND_INS
    + r"""
struct __half {
  unsigned short bits;
  __half() {}
  __half(float) {}
  operator float() const { return 0.f; }
};
struct __half2 { __half x, y; };
inline __half __float2half(float) { return __half(); }
inline __half __float2half_rd(float) { return __half(); }
inline __half2 __half2half2(__half h) { return {h, h}; }
inline float __low2float(__half2) { return 0.f; }
inline float __high2float(__half2) { return 0.f; }
inline __half2 __hmax2(__half2 a, __half2) { return a; }
inline __half2 __hmax2_nan(__half2 a, __half2) { return a; }
inline __half2 __hmin2(__half2 a, __half2) { return a; }
inline bool __hblt2(__half2, __half2) { return false; }
inline bool __hbgt2(__half2, __half2) { return false; }
inline float __shfl_xor_sync(unsigned, float v, int) { return v; }
inline int __shfl_xor_sync(unsigned, int v, int) { return v; }
inline float __shfl_sync(unsigned, float v, int) { return v; }
inline int __shfl_sync(unsigned, int v, int) { return v; }
inline void __syncthreads() {}
inline void __syncwarp() {}
inline unsigned __ballot_sync(unsigned, int p) { return p ? 1u : 0u; }
"""
)


def _arrays(*names: str) -> list[str]:
    """The shape, strides and ndim parameters MLX passes for each named input."""
    return [p for n in names for p in (f"const EmShape {n}_shape", f"const EmStrides {n}_strides", f"int {n}_ndim")]


TOPK = kernel_parts.HEADER + kernel_parts.TOPK_HEADER
ATTEND_PARAMS = [
    "const __half* q",
    "const Tkv* k",
    "const Tkv* v",
    "const bool* mask",
    "const Tv* bank_values",
    "const float* scale",
    "To* out",
    "float* mass",
    *_arrays("q", "k", "v", "bank_values"),
]
# name: (header, body, parameters, template parameters, instantiations as the Python side makes them)
KERNELS = {
    "prefill_top_k": (
        TOPK,
        prefill_top_k._SOURCE,
        [
            "const __half* q",
            "const Ta* approx",
            "const Tk* keys",
            "const float* inv_norms",
            "const float* threshold",
            "const int* topk",
            "const float* bound",
            "int* rows",
            "float* dots",
            *_arrays("q", "approx"),
        ],
        ["typename Ta", "typename Tk", "int D", "int K", "int T", "int RAW", "int HOLD", "int HELD_RUNS", "int PACK"],
        [
            "<__half, __half, 64, 16, 128, 1, 1, 16, 1>",
            "<float, float, 128, 32, 128, 1, 0, 16, 0>",
            "<float, __half, 80, 8, 128, 0, 1, 16, 0>",
            "<__half, __half, 80, 8, 128, 0, 0, 16, 0>",
            "<__half, __half, 64, 16, 128, 1, 0, 16, 1>",
        ],
    ),
    "prefill_merge": (
        prefill_merge_kernels.LSE_HEADER,
        prefill_merge_kernels.MERGE_LOGITS + prefill_merge_kernels.MERGE_ROW,
        [
            "const float* logits",
            "const bool* mask",
            "const __half* local",
            "const int* mem_rows",
            "const float* mem_dots",
            "const Tv* bank_values",
            "const float* scale",
            "To* out",
            "float* mass",
            *_arrays("logits", "local", "mem_rows", "mem_dots", "bank_values"),
        ],
        ["typename Tv", "typename To", "int D", "int T", "int MASK", "int G"],
        ["<__half, __half, 64, 128, 1, 4>", "<float, float, 80, 128, 2, 1>", "<__half, float, 256, 128, 0, 3>"],
    ),
    "prefill_merge_mma": (
        kernel_parts.MMA_HEADER + prefill_merge_kernels.LSE_HEADER,
        prefill_merge_kernels.MERGE_MMA + prefill_merge_kernels.MERGE_ROW,
        [
            "const Tq* q",
            "const Tq* k",
            "const bool* mask",
            "const Tq* local",
            "const int* mem_rows",
            "const float* mem_dots",
            "const Tv* bank_values",
            "const float* scale",
            "To* out",
            "float* mass",
            *_arrays("q", "k", "local", "mem_rows", "mem_dots", "bank_values"),
        ],
        ["typename Tv", "typename To", "int D", "int T", "int MASK", "int G", "typename Tq", "int BF"],
        [
            "<__half, __half, 64, 128, 1, 4, __half, 0>",
            "<__half, float, 128, 128, 2, 1, __half, 0>",
            "<__half, __half, 256, 128, 0, 4, __half, 1>",
        ],
    ),
    "topk_chunks": (
        TOPK,
        dk.TOPK_SCAN_SOURCE,
        [
            "const float* q",
            "const Tk* keys_t",
            "const float* inv_norms",
            "const int* topk",
            "const int* chunks",
            "float* cand_s",
            "int* cand_i",
            "float* cand_d",
            *_arrays("q", "keys_t"),
        ],
        ["typename Tk", "int D", "int K", "int T", "int GT", "int R", "bool VEC"],
        [
            "<__half, 64, 16, 128, 4, 4, true>",
            "<float, 256, 32, 128, 2, 4, false>",
            "<float, 80, 8, 128, 1, 4, true>",
            "<__half, 64, 8, 128, 8, 1, false>",
        ],
    ),
    "topk_merge": (
        TOPK,
        dk.TOPK_MERGE_SOURCE,
        [
            "const float* threshold",
            "const float* cand_s",
            "const int* cand_i",
            "const float* cand_d",
            "int* rows",
            "float* dots",
            *_arrays("cand_s"),
        ],
        ["int K", "int T"],
        ["<16, 128>", "<32, 128>", "<8, 128>"],
    ),
    # The dynamic shared-memory array becomes a static one: the host has no ``extern __shared__``.
    "attend": (
        kernel_parts.HEADER + "static float lg[1];\n",
        (dk.ATTEND_HEAD + dk.ATTEND_ROWS + dk.ATTEND_LOGITS_WARP + dk.ATTEND_TAIL).replace(
            "extern __shared__ float lg[];", ""
        ),
        [*ATTEND_PARAMS, "const int* mem_rows", "const float* mem_dots", *_arrays("mem_rows")],
        ["typename Tkv", "typename Tv", "typename To", "int D", "int T", "int MASK", "int LG"],
        ["<__half, __half, __half, 64, 256, 1, 1024>", "<float, float, float, 80, 256, 2, 2048>"],
    ),
    "attend_top_k": (
        TOPK + "static float lg[1];\n",
        (dk.ATTEND_HEAD + dk.ATTEND_MERGE + dk.ATTEND_LOGITS_WARP + dk.ATTEND_TAIL).replace(
            "extern __shared__ float lg[];", ""
        ),
        [
            *ATTEND_PARAMS,
            "const float* cand_s",
            "const int* cand_i",
            "const float* cand_d",
            "const float* threshold",
            "int* rows",
            "float* dots",
            *_arrays("cand_s"),
        ],
        ["typename Tkv", "typename Tv", "typename To", "int D", "int T", "int MASK", "int LG", "int KL"],
        ["<__half, __half, __half, 64, 256, 0, 1024, 16>", "<float, float, float, 80, 256, 2, 2048, 32>"],
    ),
    "attend_scan": (
        TOPK + "static float lg[1];\n",
        (dk.ATTEND_HEAD + dk.ATTEND_SCAN + dk.ATTEND_LOGITS_WARP + dk.ATTEND_TAIL).replace(
            "extern __shared__ float lg[];", ""
        ),
        [
            *ATTEND_PARAMS,
            "const Tk* keys_t",
            "const float* inv_norms",
            "const int* topk",
            "const float* threshold",
            "int* rows",
            "float* dots",
            *_arrays("keys_t"),
        ],
        [
            *("typename Tkv", "typename Tv", "typename To", "int D", "int T", "int MASK", "int LG", "int KL"),
            *("typename Tk", "int R", "bool VEC"),
        ],
        [
            "<__half, __half, __half, 64, 256, 0, 1024, 16, __half, 4, true>",
            "<float, float, float, 80, 256, 2, 2048, 32, float, 4, false>",
            "<__half, float, float, 256, 256, 1, 1024, 8, float, 4, true>",
        ],
    ),
    **{
        f"stack{slots}": (
            "",
            device_stack._source(slots),
            [f"const T* a{i}" for i in range(slots)] + ["const int* dims", "T* out"],
            ["typename T"],
            ["<int>", "<float>", "<__half>", "<bool>"],
        )
        for slots in (1, 8)
    },
}


@pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++ or clang++) on this machine")
@pytest.mark.parametrize("name", sorted(KERNELS))
def test_kernel_source_compiles(name, tmp_path):
    header, body, params, templates, instances = KERNELS[name]
    # As MLX's build_kernel wraps a body: one plain function per instance, its template arguments
    # constants at the body's top (so a branch ``if constexpr`` discards is compiled too), the
    # parameters in concrete types, an input's shape / strides / ndim where the body names them.
    params = [p for p in params if not p.startswith(("const Em", "int ")) or p.rsplit(" ", 1)[1] in body]
    args = ", ".join("0" if p.startswith("int ") else "{}" if p.startswith("const Em") else "nullptr" for p in params)
    functions = []
    for i, inst in enumerate(instances):
        values = [v.strip() for v in inst.strip("<>").split(",")]
        concrete, constants = list(params), []
        for t, v in zip(templates, values, strict=True):
            kind, tname = t.split()
            if kind == "typename":
                constants.append(f"  using {tname} = {v};")
                concrete = [re.sub(rf"\b{tname}\b", v, p) for p in concrete]
            else:
                constants.append(f"  constexpr {kind} {tname} = {v};")
        functions += [f"void {name}_{i}({', '.join(concrete)}) {{", *constants, body, "}"]
    code = "\n".join(
        [
            STUBS,
            header,
            *functions,
            "void instantiate() {",
            *(f"  {name}_{i}({args});" for i in range(len(instances))),
            "}",
        ]
    )
    src = tmp_path / f"{name}.cpp"
    src.write_text(code)
    done = subprocess.run([CXX, "-std=c++17", "-fsyntax-only", str(src)], capture_output=True, text=True)
    assert done.returncode == 0, f"{name} does not compile:\n{done.stderr[:4000]}"


def test_a_broken_kernel_fails_the_check(tmp_path):
    """The check is not vacuous: a kernel calling an undeclared function fails it."""
    if CXX is None:
        pytest.skip("no C++ compiler (g++ or clang++) on this machine")
    body = re.sub(r"em_warp_sort_desc\(", "em_warp_sort_dsc(", prefill_top_k._SOURCE)
    assert body != prefill_top_k._SOURCE
    KERNELS["broken"] = (TOPK, body, *KERNELS["prefill_top_k"][2:])
    try:
        with pytest.raises(AssertionError, match="does not compile"):
            test_kernel_source_compiles("broken", tmp_path)
    finally:
        del KERNELS["broken"]


def test_a_branch_if_constexpr_discards_is_compiled(tmp_path):
    """As MLX compiles a body (no template): code that a template argument's ``if constexpr``
    discards must still compile, here as on the GPU."""
    if CXX is None:
        pytest.skip("no C++ compiler (g++ or clang++) on this machine")
    header, body, *rest = KERNELS["stack1"]
    KERNELS["discarded"] = (header, body + "  if constexpr (sizeof(T) == 3) { out[0].no_such_member(); }\n", *rest)
    try:
        with pytest.raises(AssertionError, match="does not compile"):
            test_kernel_source_compiles("discarded", tmp_path)
    finally:
        del KERNELS["discarded"]
