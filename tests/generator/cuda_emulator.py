"""Runs the project's CUDA kernel sources on the CPU, so that what they compute (not only that they
compile: test_kernel_sources.py) is tested on a machine without a GPU.

``cuda_kernel`` stands in for ``mx.fast.cuda_kernel``: it wraps a kernel body as MLX's build_kernel
does (inputs, outputs, ``<name>_shape`` / ``_strides`` / ``_ndim`` where the body names them and the
input is not 0-d, the template arguments as constants at the body's top), compiles it with the
host C++ compiler against an emulation of the CUDA built-ins, and runs the grid block by block.
Each thread of a block is a ucontext coroutine; a thread runs until it reaches a warp shuffle,
``__syncwarp`` or ``__syncthreads``, and the scheduler resumes the threads once every thread that
op needs has reached it (all 32 lanes of the warp for a shuffle with the full mask, all live
threads of the block for ``__syncthreads``). So the kernels' lane arithmetic, shuffles, early
returns and shared memory run as written; a shuffle that some lanes of a warp never reach (they
returned, or wait at another op), or a deadlock, is an error, not a hang. Outputs start filled with
a poison pattern (NaN / -2**31 + 1), so an element a kernel never writes shows.

Dynamic shared memory (``extern __shared__ T name[];``) becomes a static array of the kernel's
``shared_memory`` bytes. Shared arrays start each block filled with 0xff bytes (NaN floats, -1
ints) or, every other pair of blocks, 0xfb bytes (large negative finite floats, halves and ints),
and odd blocks run their threads in reverse order, so that a read of shared memory that no
barrier orders after its write is likely to read the poison, not a value the scheduler's order
happened to leave there. A kernel made with ``ensure_row_contiguous=False`` gets its inputs as MLX
holds them (a KV cache's slice with the cache's strides), as on the GPU. Not emulated: atomics, and the timing or
interleaving of threads between barriers (the scheduler runs them one after another), so a data
race between warps that both orders get right (a write after another warp's read, say) goes
unseen. ``rsqrtf`` is exact here (approximate on the GPU).
"""

from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

CXX = shutil.which("g++") or shutil.which("clang++")

# Host stand-ins for the CUDA built-ins the kernels use that need no thread scheduling (types,
# qualifiers, bit casts, math); test_kernel_sources.py compiles against them too.
STAND_INS = r"""
#define EM_PORTABLE_MMA  // kernel_parts.MMA_HEADER: the tensor-core product by shuffles
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
using std::max;
using std::min;
struct uint4 { unsigned x, y, z, w; };
struct dim3 { unsigned x, y, z; };
static dim3 threadIdx, blockIdx, blockDim, gridDim;
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; memcpy(&i, &f, 4); return i; }
inline int __ffs(int x) { return x ? __builtin_ctz(x) + 1 : 0; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float fminf(float a, float b) { return std::fmin(a, b); }
inline float expf(float x) { return std::exp(x); }
inline float logf(float x) { return std::log(x); }
inline float sqrtf(float x) { return std::sqrt(x); }
// MLX passes each input's shape and strides as array objects (mlx::core::cu::Shape / Strides),
// indexable but not pointers: the same here, so that a kernel taking them as pointers fails to
// compile on the CPU as it does on the GPU.
template <typename T> struct EmDims {
  const T* p;
  const T& operator[](int i) const { return p[i]; }
};
using EmShape = EmDims<int>;
using EmStrides = EmDims<int64_t>;
"""

RUNTIME = (
    STAND_INS
    + r"""
#include <cstdio>
#include <cstdlib>
#include <ucontext.h>
#include <algorithm>
struct __half {
  _Float16 h;
  __half() {}
  __half(float f) : h((_Float16)f) {}
  operator float() const { return (float)h; }
};
// The packed float16 pair and the intrinsics the kernels take of it, with CUDA's NaN rules:
// __hmax2 / __hmin2 return the other input where one is NaN (NaN where both are), __hmax2_nan
// NaN where either is; the __hb comparisons are true only where both halves compare true.
struct __half2 { __half x, y; };
inline __half __float2half(float f) { return __half(f); }
inline __half __float2half_rd(float f) {  // rounded towards -inf
  if (std::isnan(f)) return __half(f);
  __half r(f);  // to nearest; one step down where that went up
  if ((float)r > f) {
    uint16_t b;
    memcpy(&b, &r.h, 2);
    b = (b & 0x7fff) == 0 ? 0x8001 : (b & 0x8000) ? b + 1 : b - 1;
    memcpy(&r.h, &b, 2);
  }
  return r;
}
inline __half2 __half2half2(__half h) { return {h, h}; }
inline float __low2float(__half2 a) { return (float)a.x; }
inline float __high2float(__half2 a) { return (float)a.y; }
inline __half em_pick(__half a, __half b, bool max, bool nan) {
  const float fa = a, fb = b;
  if (std::isnan(fa) || std::isnan(fb)) {
    if (nan || (std::isnan(fa) && std::isnan(fb))) return __half(NAN);
    return std::isnan(fa) ? b : a;
  }
  if (fa == fb) return (std::signbit(fa) == max) ? b : a;  // +0 > -0
  return (fa > fb) == max ? a : b;
}
inline __half2 em_pick2(__half2 a, __half2 b, bool max, bool nan) {
  return {em_pick(a.x, b.x, max, nan), em_pick(a.y, b.y, max, nan)};
}
inline __half2 __hmax2(__half2 a, __half2 b) { return em_pick2(a, b, true, false); }
inline __half2 __hmax2_nan(__half2 a, __half2 b) { return em_pick2(a, b, true, true); }
inline __half2 __hmin2(__half2 a, __half2 b) { return em_pick2(a, b, false, false); }
inline bool __hblt2(__half2 a, __half2 b) { return (float)a.x < (float)b.x && (float)a.y < (float)b.y; }
inline bool __hbgt2(__half2 a, __half2 b) { return (float)a.x > (float)b.x && (float)a.y > (float)b.y; }
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() {}
  __nv_bfloat16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    u += 0x7fff + ((u >> 16) & 1);  // round to nearest even (no NaN inputs here)
    bits = (uint16_t)(u >> 16);
  }
  operator float() const { uint32_t u = (uint32_t)bits << 16; float f; memcpy(&f, &u, 4); return f; }
};

namespace em {
enum Op { RUN, SHFL, SYNCWARP, SYNCTHREADS, DONE };
struct Thread { ucontext_t ctx; int op; uint32_t val, out; int src; unsigned mask; };
const size_t STACK = 1 << 17;
static ucontext_t sched;
static Thread* th = nullptr;
static char* stacks = nullptr;
static int cap = 0, cur = 0;
static void (*entry)() = nullptr;
static char msg[512];

// Shared memory: every array registers itself where it is declared (filled with 0xff bytes, a
// NaN float or -1 int), and is filled again before each block, so that a read that no barrier
// orders after its write shows, not an earlier block's value (the arrays are statics here).
static void* shared_at[64];
static size_t shared_bytes[64];
static int shared_n = 0;
struct Shared {
  Shared(void* p, size_t n) {
    if (shared_n == 64) abort();
    memset(p, 0xff, n);
    shared_at[shared_n] = p;
    shared_bytes[shared_n++] = n;
  }
};

inline void wait(int op) { th[cur].op = op; swapcontext(&th[cur].ctx, &sched); }
static void trampoline() { entry(); th[cur].op = DONE; }  // then on to uc_link: the scheduler

template <typename V>
inline V shfl(unsigned mask, V v, int src) {
  static_assert(sizeof(V) == 4, "32-bit shuffles only");
  memcpy(&th[cur].val, &v, 4);
  th[cur].src = src;
  th[cur].mask = mask;
  wait(SHFL);
  V r;
  memcpy(&r, &th[cur].out, 4);
  return r;
}

static int fail(const char* what, unsigned b, int w) {
  snprintf(msg, sizeof msg, "%s (block %u, warp %d)", what, b, w);
  return 1;
}

// One block of T threads; 0 when it ran to its end, else 1 and msg says why.
static int run_block(unsigned b, int T) {
  // Two poisons, alternating by pairs of blocks: 0xff bytes (NaN, -1) and 0xfb bytes (large
  // negative finite floats and halves, large negative ints), so that a stray read shows whether
  // the kernel would pass over a NaN or over a very low value.
  for (int i = 0; i < shared_n; ++i) memset(shared_at[i], (b >> 1) & 1 ? 0xfb : 0xff, shared_bytes[i]);
  for (int t = 0; t < T; ++t) {
    getcontext(&th[t].ctx);
    th[t].ctx.uc_stack.ss_sp = stacks + (size_t)t * STACK;
    th[t].ctx.uc_stack.ss_size = STACK;
    th[t].ctx.uc_link = &sched;
    makecontext(&th[t].ctx, trampoline, 0);
    th[t].op = RUN;
  }
  for (;;) {
    // Odd blocks run their threads last to first: a read of shared memory that only the order
    // of the threads between barriers made right (thread 0 first) fails in one of the two.
    for (int i = 0; i < T; ++i) {
      const int t = (b & 1) ? T - 1 - i : i;
      if (th[t].op != RUN) continue;
      cur = t;
      threadIdx = {(unsigned)t, 0, 0};
      blockIdx = {b, 0, 0};
      swapcontext(&sched, &th[t].ctx);
    }
    int done = 0, bar = 0;
    for (int t = 0; t < T; ++t) { done += th[t].op == DONE; bar += th[t].op == SYNCTHREADS; }
    if (done == T) return 0;
    bool moved = false;
    for (int w = 0; w < T / 32; ++w) {
      int n[5] = {0, 0, 0, 0, 0};
      for (int l = 0; l < 32; ++l) ++n[th[w * 32 + l].op];
      if (n[SHFL] + n[SYNCWARP] == 0) continue;
      if (n[SHFL] && n[SYNCWARP]) return fail("lanes of a warp wait at different warp ops", b, w);
      if (n[SHFL] + n[SYNCWARP] < 32) {
        if (n[DONE]) return fail("a warp op that lanes which returned never reach", b, w);
        continue;  // the others wait at __syncthreads: a deadlock unless that resolves
      }
      for (int l = 0; l < 32; ++l) {
        Thread& x = th[w * 32 + l];
        if (x.op == SHFL) {
          if (x.mask != 0xffffffffu) return fail("a shuffle with a partial mask (not emulated)", b, w);
          x.out = th[w * 32 + (x.src & 31)].val;
        }
      }
      for (int l = 0; l < 32; ++l) th[w * 32 + l].op = RUN;
      moved = true;
    }
    if (!moved && bar > 0 && bar + done == T) {
      for (int t = 0; t < T; ++t) if (th[t].op == SYNCTHREADS) th[t].op = RUN;
      moved = true;
    }
    if (!moved) return fail("deadlock: no warp op or barrier can complete", b, -1);
  }
}

static int launch(int blocks, int T) {
  if (T % 32 != 0 || T <= 0 || T > 1024) { snprintf(msg, sizeof msg, "block of %d threads", T); return 1; }
  if (T > cap) {
    free(th); free(stacks);
    th = (Thread*)calloc(T, sizeof(Thread));
    stacks = (char*)malloc((size_t)T * STACK);
    cap = T;
  }
  blockDim = {(unsigned)T, 1, 1};
  gridDim = {(unsigned)blocks, 1, 1};
  for (int b = 0; b < blocks; ++b) if (run_block(b, T)) return 1;
  return 0;
}
}  // namespace em

inline float __shfl_xor_sync(unsigned m, float v, int o) { return em::shfl(m, v, (int)(threadIdx.x & 31) ^ o); }
inline int __shfl_xor_sync(unsigned m, int v, int o) { return em::shfl(m, v, (int)(threadIdx.x & 31) ^ o); }
inline float __shfl_sync(unsigned m, float v, int s) { return em::shfl(m, v, s); }
inline int __shfl_sync(unsigned m, int v, int s) { return em::shfl(m, v, s); }
inline void __syncwarp(unsigned = 0xffffffffu) { em::wait(em::SYNCWARP); }
// A ballot as 32 shuffles: every lane of the warp must reach it, as on the GPU (full mask only).
inline unsigned __ballot_sync(unsigned m, int pred) {
  unsigned votes = 0;
  for (int i = 0; i < 32; ++i) votes |= (unsigned)(em::shfl(m, (int)(pred != 0), i) != 0) << i;
  return votes;
}
inline void __syncthreads() { em::wait(em::SYNCTHREADS); }

extern "C" const char* em_message() { return em::msg; }
"""
)

_CTYPES = {
    mx.float32: "float",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.int32: "int",
    mx.uint32: "uint32_t",
    mx.int64: "int64_t",
    mx.bool_: "bool",
}
_NUMPY = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,  # the bits
    mx.int32: np.int32,
    mx.uint32: np.uint32,
    mx.int64: np.int64,
    mx.bool_: np.bool_,
}
_POISON = {np.float32: np.nan, np.float16: np.nan, np.int32: -(2**31) + 1, np.uint16: 0x7FC1}
_BUILD = Path(tempfile.mkdtemp(prefix="cuda_emulator_"))
_LIBS: dict[str, ctypes.CDLL] = {}


def _to_numpy(a: mx.array, contiguous: bool = True) -> np.ndarray:
    """``a`` for the kernel: a row-contiguous copy (what MLX passes with ensure_row_contiguous), or
    else MLX's own buffer with its strides (a slice or a transposed view as it lies in memory,
    through the buffer protocol), so that a kernel's ``_strides`` arithmetic is what is tested."""
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a)) if contiguous else np.asarray(a)


def _aligned(a: np.ndarray, align: int = 256) -> np.ndarray:
    """``a`` (same shape, strides and bytes) in memory that starts ``align`` bytes aligned, as a
    device allocation does: numpy's and MLX's CPU buffers may start 8 bytes aligned, where a
    kernel's 16-byte vector loads (``em_load_run``) compile to aligned loads that fault."""
    if a.size == 0 or a.ctypes.data % align == 0:
        return a
    lo = sum(min(0, (n - 1) * st) for n, st in zip(a.shape, a.strides))  # lowest byte, from a's start
    span = sum(max(0, (n - 1) * st) for n, st in zip(a.shape, a.strides)) - lo + a.itemsize
    raw = np.empty(span + align, np.uint8)
    buf = raw[(-raw.ctypes.data) % align :][:span]
    ctypes.memmove(buf.ctypes.data, a.ctypes.data + lo, span)
    return np.ndarray(a.shape, a.dtype, buffer=buf, offset=-lo, strides=a.strides)


def _from_numpy(a: np.ndarray, dtype) -> mx.array:
    out = mx.array(a)
    return out.view(mx.bfloat16) if dtype == mx.bfloat16 else out


def _shared(source: str, nbytes: int) -> str:
    """Shared arrays -> statics registered with em::Shared (poisoned before each block);
    ``extern __shared__ float lg[];`` -> a static array of ``nbytes`` (4-byte elements)."""

    def sized(m: re.Match) -> str:
        if m.group(1) not in ("float", "int", "unsigned"):
            raise NotImplementedError(f"dynamic shared memory of {m.group(1)}")
        if nbytes <= 0:
            raise RuntimeError("the kernel declares dynamic shared memory but its launch gives it none")
        typ, name = m.group(1), m.group(2)
        return f"static {typ} {name}[{nbytes // 4}]; static em::Shared {name}_em({name}, {nbytes // 4 * 4});"

    source = re.sub(r"extern\s+__shared__\s+(\w+)\s+(\w+)\[\];", sized, source)
    fixed = r"__shared__\s+(\w+)\s+(\w+)((?:\[[^\]]+\])+);"
    return re.sub(fixed, r"static \1 \2\3; static em::Shared \2_em(\2, sizeof(\2));", source)


# An input's shape and strides parameter types (STAND_INS' EmDims) -> their element type.
_DIMS = {"const EmShape": "int", "const EmStrides": "int64_t"}


def _constant(name: str, v) -> str:
    """A template argument as MLX declares it at the top of the kernel's body."""
    if isinstance(v, bool):
        return f"constexpr bool {name} = {'true' if v else 'false'};"
    if isinstance(v, int):
        return f"constexpr int {name} = {v};"
    return f"using {name} = {_CTYPES[v]};"


class EmulatedKernel:
    """What ``mx.fast.cuda_kernel`` returns: call it with inputs, template, grid, threadgroup,
    output_shapes and output_dtypes; it returns the outputs (mx arrays)."""

    def __init__(self, name, input_names, output_names, source, header="", ensure_row_contiguous=True, **kw):
        self.name, self.inputs, self.outputs = name, list(input_names), list(output_names)
        self.source, self.header = _shared(source, kw.get("shared_memory", 0)), header
        self.raw_source = source  # where MLX looks for ``<input>_shape`` / ``_strides`` / ``_ndim``
        self.contiguous = ensure_row_contiguous

    def _library(self, in_dtypes, out_dtypes, template, in_ndims) -> ctypes.CDLL:
        # As MLX's build_kernel wraps the body: a plain function (not a template) whose template
        # arguments are constants declared at its top (``constexpr int D = 64;``, ``using T =
        # float;``), so that a branch ``if constexpr`` discards is compiled here as on the GPU;
        # an input's shape / strides / ndim are parameters only where the body names them and the
        # input is not 0-d. em_args holds them all; em_call passes those declared.
        params = [(f"const {_CTYPES[dt]}* {n}", i) for i, (n, dt) in enumerate(zip(self.inputs, in_dtypes))]
        at = len(self.inputs)
        params += [(f"{_CTYPES[dt]}* {n}", at + i) for i, (n, dt) in enumerate(zip(self.outputs, out_dtypes))]
        at += len(self.outputs)
        for n, ndim in zip(self.inputs, in_ndims):
            for j, p in enumerate((f"const EmShape {n}_shape", f"const EmStrides {n}_strides", f"int {n}_ndim")):
                if ndim > 0 and p.rsplit(" ", 1)[1] in self.raw_source:
                    params.append((p, at + j))
            at += 3
        casts = []
        for p, i in params:
            typ = p.rsplit(" ", 1)[0]
            if typ == "int":
                casts.append(f"*(const int*)em_args[{i}]")
            elif typ in _DIMS:  # the object MLX passes, over the pointer em_args holds
                casts.append(f"{typ.removeprefix('const ')}{{(const {_DIMS[typ]}*)em_args[{i}]}}")
            else:
                casts.append(f"({typ})em_args[{i}]")
        constants = [f"  {_constant(n, v)}" for n, v in template]
        code = "\n".join(
            [
                RUNTIME,
                self.header,
                f"void {self.name}({', '.join(p for p, _ in params)}) {{",
                *constants,
                self.source,
                "}",
                "static void** em_args;",
                f"static void em_call() {{ {self.name}({', '.join(casts)}); }}",
                'extern "C" int em_run(int blocks, int threads, void** args) {',
                "  em_args = args;",
                "  em::entry = em_call;",
                "  return em::launch(blocks, threads);",
                "}",
            ]
        )
        key = hashlib.sha256(code.encode()).hexdigest()[:24]
        if key not in _LIBS:
            src, lib = _BUILD / f"{key}.cpp", _BUILD / f"{key}.so"
            src.write_text(code)
            done = subprocess.run(
                [CXX, "-std=c++17", "-O1", "-shared", "-fPIC", "-w", "-o", str(lib), str(src)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"{self.name} does not compile:\n{done.stderr[:4000]}")
            _LIBS[key] = ctypes.CDLL(str(lib))
            _LIBS[key].em_message.restype = ctypes.c_char_p
        return _LIBS[key]

    def __call__(self, *, inputs, grid, threadgroup, output_shapes, output_dtypes, template=(), init_value=None, **kw):
        ins = [mx.array(x) if not isinstance(x, mx.array) else x for x in inputs]
        lib = self._library([a.dtype for a in ins], list(output_dtypes), list(template or []), [a.ndim for a in ins])
        arrays = [_aligned(_to_numpy(a, self.contiguous)) for a in ins]
        outs = []
        for shape, dt in zip(output_shapes, output_dtypes):
            np_dt = _NUMPY[dt]
            fill = init_value if init_value is not None else _POISON.get(np_dt, 0)
            outs.append(_aligned(np.full(tuple(shape), fill, np_dt)))
        keep = []  # the ctypes buffers stay alive for the call
        args = [a.ctypes.data_as(ctypes.c_void_p) for a in arrays + outs]
        for a in arrays:
            shape = np.array(a.shape or (1,), np.int32)
            assert all(s % a.itemsize == 0 for s in a.strides), a.strides  # in elements, as MLX gives them (any sign)
            strides = np.array([s // a.itemsize for s in a.strides] or [1], np.int64)
            ndim = np.array([a.ndim], np.int32)
            keep += [shape, strides, ndim]
            args += [x.ctypes.data_as(ctypes.c_void_p) for x in (shape, strides, ndim)]
        threads = threadgroup[0]
        if grid[1:] != (1, 1) or threadgroup[1:] != (1, 1) or grid[0] % threads:
            raise NotImplementedError(f"grid {grid} / threadgroup {threadgroup}: 1-D grids of whole blocks only")
        argv = (ctypes.c_void_p * len(args))(*[a.value for a in args])
        if lib.em_run(grid[0] // threads, threads, argv):
            raise RuntimeError(f"{self.name}: {lib.em_message().decode()}")
        return [_from_numpy(o, dt) for o, dt in zip(outs, output_dtypes)]


def cuda_kernel(name, input_names, output_names, source, header="", **kw) -> EmulatedKernel:
    """Drop-in for ``mx.fast.cuda_kernel`` (monkeypatch it) that runs on the CPU."""
    return EmulatedKernel(name, input_names, output_names, source, header, **kw)
