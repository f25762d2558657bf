"""CUDA source shared by the fused extended-attention kernels (fused_attention.py,
prefill_top_k.py), and their one-element constant inputs."""

from __future__ import annotations

import functools

import mlx.core as mx

HEADER = """
#define EM_NEG_INF __int_as_float(0xff800000)

template <int T>
__device__ float em_block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = 0.f;
  for (int i = 0; i < T / 32; ++i) r += red[i];
  return r;
}

template <int T>
__device__ float em_block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  float r = EM_NEG_INF;
  for (int i = 0; i < T / 32; ++i) r = fmaxf(r, red[i]);
  return r;
}
"""

# Pieces of the top-k kernels (fused_attention.py's decode scan and merge, prefill_top_k.py).
TOPK_HEADER = r"""
// The warp's 32 values sorted in descending order across its lanes (lane 0 the largest): a
// bitonic network of 15 shuffles. No NaN among them (fmaxf / fminf would drop it).
__device__ __forceinline__ float em_warp_sort_desc(float v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const float o = __shfl_xor_sync(0xffffffff, v, stride);
      // Blocks of `size` lanes alternate direction, the last one descending; the lower lane of a
      // pair keeps the larger value in a descending block.
      v = (((lane & size) == 0) == ((lane & stride) == 0)) ? fmaxf(v, o) : fminf(v, o);
    }
  }
  return v;
}

// The warp's 32 (s, i) pairs sorted across its lanes, best first: the larger s, between equal s
// the lower i. The same network as em_warp_sort_desc; no NaN s.
__device__ __forceinline__ void em_warp_sort_pairs_desc(float& s, int& i) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int size = 2; size <= 32; size <<= 1) {
#pragma unroll
    for (int stride = size >> 1; stride > 0; stride >>= 1) {
      const float os = __shfl_xor_sync(0xffffffff, s, stride);
      const int oi = __shfl_xor_sync(0xffffffff, i, stride);
      const bool other_better = os > s || (os == s && oi < i);
      const bool keep_better = ((lane & size) == 0) == ((lane & stride) == 0);
      if (keep_better == other_better) { s = os; i = oi; }
    }
  }
}

template <int K>
__device__ __forceinline__ void em_insert(float (&s)[K], int (&ix)[K], float v, int n) {
  // s sorted descending; ties keep the earlier entry.
  if (v > s[K - 1]) {
#pragma unroll
    for (int j = K - 1; j > 0; --j) {
      if (v > s[j - 1]) { s[j] = s[j - 1]; ix[j] = ix[j - 1]; }
      else if (v > s[j]) { s[j] = v; ix[j] = n; }
    }
    if (v > s[0]) { s[0] = v; ix[0] = n; }
  }
}

__device__ __forceinline__ float em_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// The warp's top-k (k <= K, k <= 32) of each of G sets of its lanes' sorted lists: in round r
// each set's best list head (ties: the lower lane) is popped and lane r keeps it in best_s[j] /
// best_i[j] (-inf / -1 when the lists ran out). The G sets' shuffles are interleaved, so that G
// heads' merges take about the time of one. Shuffles only; every lane of the warp must call it.
// The lists are consumed.
template <int G, int K>
__device__ __forceinline__ void em_warp_top_k(
    float (&s)[G][K], int (&ix)[G][K], int k, float (&best_s)[G], int (&best_i)[G]) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int j = 0; j < G; ++j) { best_s[j] = EM_NEG_INF; best_i[j] = -1; }
  for (int r = 0; r < k; ++r) {
    float v[G];
    int who[G];
#pragma unroll
    for (int j = 0; j < G; ++j) { v[j] = s[j][0]; who[j] = lane; }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const float ov = __shfl_xor_sync(0xffffffff, v[j], o);
        const int ow = __shfl_xor_sync(0xffffffff, who[j], o);
        if (ov > v[j] || (ov == v[j] && ow < who[j])) { v[j] = ov; who[j] = ow; }
      }
    }
#pragma unroll
    for (int j = 0; j < G; ++j) {
      const int n = __shfl_sync(0xffffffff, ix[j][0], who[j]);
      if (lane == r) { best_s[j] = v[j]; best_i[j] = n; }
      if (lane == who[j]) {  // shift, so that the list's head stays in a register
#pragma unroll
        for (int i = 0; i + 1 < K; ++i) { s[j][i] = s[j][i + 1]; ix[j][i] = ix[j][i + 1]; }
        s[j][K - 1] = EM_NEG_INF;
        ix[j][K - 1] = -1;
      }
    }
  }
}

// The top-k (k <= K) of one query row's candidates as the decode scan's chunks wrote them: cosines
// cand_s, rows cand_i (-1: none) and raw dots cand_d, CK of each. Lane r < k gets the r-th best's
// row (-1 where its cosine is not above thr, or fewer than r + 1 candidates exist) and raw dot (0
// where there is none); other lanes get -1 and 0. Each lane loads 8 candidates at a time before
// inserting them (loads in flight together). Every lane of the warp must call it.
template <int K>
__device__ __forceinline__ void em_merge_candidates(
    const float* cand_s, const int* cand_i, const float* cand_d, int CK, int k, float thr, int& row, float& dot) {
  const int lane = threadIdx.x & 31;
  float s[1][K];
  int ix[1][K];
#pragma unroll
  for (int i = 0; i < K; ++i) { s[0][i] = EM_NEG_INF; ix[0][i] = -1; }
  for (int j0 = 0; j0 < CK; j0 += 32 * 8) {
    float v[8];
    int n[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int j = j0 + 32 * u + lane;
      n[u] = j < CK ? cand_i[j] : -1;
      v[u] = j < CK ? cand_s[j] : EM_NEG_INF;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if (n[u] >= 0) em_insert<K>(s[0], ix[0], v[u], j0 + 32 * u + lane);  // the payload: where it is
    }
  }
  float best_s[1];
  int best_i[1];
  em_warp_top_k<1, K>(s, ix, k, best_s, best_i);
  row = -1;
  dot = 0.f;
  if (lane < k && best_i[0] >= 0) {
    row = best_s[0] > thr ? cand_i[best_i[0]] : -1;
    dot = cand_d[best_i[0]];
  }
}

// x = p[n .. n + R - 1] as float (0 past N). VEC: one load of R elements (n and N multiples of R,
// so the run is aligned and inside the array).
template <int R, bool VEC, typename Tp>
__device__ __forceinline__ void em_load_run(const Tp* p, int n, int N, float (&x)[R]) {
  if (VEC) {
    struct alignas(sizeof(Tp) * R) Run { Tp v[R]; };
    const Run run = *reinterpret_cast<const Run*>(p + n);
#pragma unroll
    for (int r = 0; r < R; ++r) x[r] = static_cast<float>(run.v[r]);
  } else {
#pragma unroll
    for (int r = 0; r < R; ++r) x[r] = n + r < N ? static_cast<float>(p[n + r]) : 0.f;
  }
}

// The dots of G query heads (qs [G][D]) with the R adjacent bank rows n .. n + R - 1 (0 past N):
// a column's R keys come in one load (em_load_run), 8 columns' loads in flight at a time; over
// 2-byte keys more, the loop unrolled: 64 columns' for one query head (the one-launch decode
// layer's runs of 8), 16 for the decode scan's head tiles (more would hold too many registers).
// Both scans waited on load latency (docs/architecture.md, "Host cost of a launch").
template <int G, int R, int D, bool VEC, typename Tk>
__device__ __forceinline__ void em_dots_rows_t(
    const float (*qs)[D], const Tk* kg, int N, int n, float (&dot)[G][R]) {
#pragma unroll
  for (int j = 0; j < G; ++j) {
#pragma unroll
    for (int r = 0; r < R; ++r) dot[j][r] = 0.f;
  }
#pragma unroll(sizeof(Tk) == 2 ? (G == 1 ? 8 : 2) : 1)
  for (int e0 = 0; e0 < D; e0 += 8) {
    float x[8][R];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if (e0 + u < D) {
        em_load_run<R, VEC>(kg + (size_t)(e0 + u) * N, n, N, x[u]);
      } else {
#pragma unroll
        for (int r = 0; r < R; ++r) x[u][r] = 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
#pragma unroll
      for (int j = 0; j < G; ++j) {
        const float qv = e0 + u < D ? qs[j][e0 + u] : 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r) dot[j][r] += qv * x[u][r];
      }
    }
  }
}

template <int D, typename Tk>
__device__ __forceinline__ float em_dot_t(const float* qs, const Tk* kg, int N, int n) {
  // Unrolled: a row's loads are in flight together (a rolled loop waits on each); fully up to
  // D = 128, 16 at a time beyond (a fully unrolled D = 256 spills registers).
  float dot = 0.f;
#pragma unroll(D <= 128 ? D : 16)
  for (int e = 0; e < D; ++e) dot += qs[e] * static_cast<float>(kg[(size_t)e * N + n]);
  return dot;
}

// em_dot_t over a row-major key (kr [D], contiguous, 16-byte aligned when D fills whole 16-byte
// loads): the same products summed in the same order, so the same float32 result, from D / 8
// (half precision) 16-byte loads instead of D scattered ones.
template <int D, typename Tk>
__device__ __forceinline__ float em_dot_r(const float* qs, const Tk* kr) {
  constexpr int VK = 16 / sizeof(Tk);
  float dot = 0.f;
  if constexpr (D % VK == 0) {
    // At most 8 loads (128 bytes) in flight: a whole float32 key of 256 would take 256 registers.
    constexpr int C = D / VK;
    constexpr int W = C < 8 ? C : 8;
#pragma unroll
    for (int c0 = 0; c0 < C; c0 += W) {
      uint4 raw[W];
#pragma unroll
      for (int c = 0; c < W; ++c) raw[c] = c0 + c < C ? reinterpret_cast<const uint4*>(kr)[c0 + c] : uint4{};
#pragma unroll
      for (int c = 0; c < W; ++c) {
        const Tk* kv = reinterpret_cast<const Tk*>(&raw[c]);
#pragma unroll
        for (int j = 0; j < VK; ++j) {
          if (c0 + c < C) dot += qs[(c0 + c) * VK + j] * static_cast<float>(kv[j]);
        }
      }
    }
  } else {
#pragma unroll(D <= 128 ? D : 16)
    for (int e = 0; e < D; ++e) dot += qs[e] * static_cast<float>(kr[e]);
  }
  return dot;
}
"""


# A warp's tensor-core product, for kernels that score a tile of 16 query rows against 8 keys at
# once (prefill_merge_kernels.py). Fragments as PTX lays out mma.m16n8k16 (16-bit inputs,
# float32 accumulators; gid = lane / 4, tig = lane % 4): a[0..3] hold A (16 x 16, rows x k)
# elements (gid, 2 tig + {0,1}), (gid + 8, 2 tig + {0,1}), (gid, 8 + 2 tig + {0,1}),
# (gid + 8, 8 + 2 tig + {0,1}), two 16-bit values per register, the lower index in the low half;
# b[0..1] hold B (16 x 8, k x columns) elements (2 tig + {0,1}, gid), (8 + 2 tig + {0,1}, gid);
# c[0..3] the products (gid, 2 tig + {0,1}), (gid + 8, 2 tig + {0,1}). BF: bfloat16 inputs, else
# float16. Products of 16-bit values are exact in float32; the accumulation order is the
# hardware's; mma.sync's m16n8k16 shape with 16-bit inputs needs compute capability 8.0 or later.
# With EM_PORTABLE_MMA (the CPU emulator) the same product is computed from the warp's registers
# by shuffles: every lane gathers its rows' and columns' elements.
MMA_HEADER = r"""
template <typename Tx>
__device__ __forceinline__ unsigned em_pack2(Tx lo, Tx hi) {
  const unsigned short a = *reinterpret_cast<const unsigned short*>(&lo);
  const unsigned short b = *reinterpret_cast<const unsigned short*>(&hi);
  return (unsigned)a | ((unsigned)b << 16);
}

// Whether every pair (row r, elements 2j, 2j + 1) of a [.., rows, D] array's matrix at ``base``
// (``strides`` as MLX passes them: [-2] rows, [-1] elements) is one aligned 4-byte word: the
// last axis contiguous, rows of even length, the matrix 4-byte aligned. MLX passes strides as an
// array object (mlx::core::cu::Strides), not a pointer: taken as any indexable type.
template <typename Tx, typename Ts>
__device__ __forceinline__ bool em_whole_pairs(const Tx* base, const Ts& strides, int ndim) {
  return strides[ndim - 1] == 1 && strides[ndim - 2] % 2 == 0 && reinterpret_cast<size_t>(base) % 4 == 0;
}

// The pair (p[0], p[stride]) packed as em_pack2 packs it: one 4-byte load where ``whole``
// (em_whole_pairs held for the matrix p is in, p an even element of its row), else two.
template <typename Tx>
__device__ __forceinline__ unsigned em_load_pair(const Tx* p, int64_t stride, bool whole) {
  return whole ? *reinterpret_cast<const unsigned*>(p) : em_pack2(p[0], p[stride]);
}

#ifdef EM_PORTABLE_MMA
template <int BF>
__device__ __forceinline__ float em_half_of(unsigned r, int hi) {
  const unsigned short u = (unsigned short)(hi ? r >> 16 : r & 0xffffu);
  if (BF) {
    const unsigned w = (unsigned)u << 16;
    float f;
    memcpy(&f, &w, 4);
    return f;
  }
  __half x;
  memcpy(&x, &u, 2);
  return static_cast<float>(x);
}

template <int BF>
__device__ __forceinline__ void em_mma_16816(float* c, const unsigned* a, const unsigned* b) {
  const int lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  for (int t = 0; t < 4; ++t) {  // k = 2t, 2t + 1 (a[0], a[1] with b[0]) and 8 + 2t, 9 + 2t (a[2], a[3] with b[1])
    unsigned ar[4], br[2][2];
    for (int r = 0; r < 4; ++r) ar[r] = (unsigned)__shfl_sync(0xffffffff, (int)a[r], gid * 4 + t);
    for (int j = 0; j < 2; ++j)
      for (int r = 0; r < 2; ++r) br[j][r] = (unsigned)__shfl_sync(0xffffffff, (int)b[r], (tig * 2 + j) * 4 + t);
    for (int j = 0; j < 2; ++j) {
      for (int i = 0; i < 2; ++i) {  // row gid + 8 i
        float acc = c[2 * i + j];
        for (int r = 0; r < 2; ++r) {  // k block r (0: 2t.., 1: 8 + 2t..)
          const unsigned x = ar[2 * r + i], y = br[j][r];
          acc += em_half_of<BF>(x, 0) * em_half_of<BF>(y, 0) + em_half_of<BF>(x, 1) * em_half_of<BF>(y, 1);
        }
        c[2 * i + j] = acc;
      }
    }
  }
}
#else
template <int BF>
__device__ __forceinline__ void em_mma_16816(float* c, const unsigned* a, const unsigned* b) {
  if (BF) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
#endif
"""


# What MLX's CUDA backend names each dtype in a kernel's source (its ``dtype_to_cuda_type``).
CUDA_TYPES = {
    mx.bool_: "bool",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.float32: "float",
    mx.float64: "double",
    mx.complex64: "mlx::core::cu::complex64_t",
}


def baked(template: tuple, source: str) -> str:
    """``source`` preceded by its template arguments ((name, int | bool | dtype) pairs) declared as
    the constants ``mx.fast.cuda_kernel`` declares at the top of a kernel's body
    (``constexpr int D = 64;``, ``constexpr bool VEC = true;``, ``using Tk = __half;``), so that
    a kernel made from it and called without ``template`` compiles to the same code. Why: MLX
    converts a call's template arguments and formats them into the source at every call, ~2 us
    of host time per launch of the one-launch decode layer (11 arguments; docs/architecture.md,
    "Host cost of a launch"); a decode step launches one per layer. A bool is declared ``bool``
    and an int ``int``, as MLX does; callers pass a bool for a bool constant (a cache keyed by
    the template takes True and 1 for the same key). Raises KeyError for a dtype not in
    CUDA_TYPES."""
    lines = []
    for name, v in template:
        if isinstance(v, bool):
            lines.append(f"  constexpr bool {name} = {'true' if v else 'false'};\n")
        elif isinstance(v, int):
            lines.append(f"  constexpr int {name} = {v};\n")
        else:
            lines.append(f"  using {name} = {CUDA_TYPES[v]};\n")
    return "".join(lines) + "\n" + source if lines else source


def kernel_name(name: str, template: tuple) -> str:
    """``name`` with a suffix naming its template arguments, as MLX names a templated kernel
    (``_64`` for an int, ``_t`` / ``_f`` for a bool, ``_float16`` for a dtype): each baked variant
    keeps a name of its own (in profiles; and MLX before 0.32.1 cached compiled kernels by name)."""
    parts = []
    for _, v in template:
        if isinstance(v, bool):
            parts.append("t" if v else "f")
        elif isinstance(v, int):
            parts.append(str(v))
        else:
            parts.append(str(v).removeprefix("mlx.core."))
    return "_".join([name, *parts])


# Constants kept. Bounded: a request's similarity threshold and citation floor are constants too,
# so a client sending ever new values would otherwise grow the cache for good.
CONSTANTS = 4096


@functools.lru_cache(maxsize=CONSTANTS)
def constant(values: tuple, dtype) -> mx.array:
    """A small constant kernel input (a scale, a threshold, a shape, a bound) [n >= len(values)]:
    ``values``, padded with the last one to at least 16 bytes, made once per value (a new array
    per call would be a host-to-device copy per layer and step; the CONSTANTS most recent are
    kept) and kept in device memory.

    Why the padding and the device op: MLX's CUDA allocator puts every array made on the host, and
    every array of 8 bytes or less, in managed (unified) memory, which a kernel reads across the
    bus; each launch that read such a scalar cost tens of microseconds on the H200
    (docs/architecture.md, "Kernel constants"). An element-wise op's output of more than 8 bytes
    is allocated in device memory. Kernels read only the first ``len(values)`` elements."""
    pad = max(0, -(-16 // dtype.size) - len(values))
    return on_device(mx.array(list(values) + [values[-1]] * pad, dtype))


def on_device(host: mx.array) -> mx.array:
    """A copy of ``host``, bit for bit, by a device operation, evaluated: its output MLX's CUDA
    allocator puts in device memory when larger than 8 bytes (``constant``). ``host`` stays
    referenced through the eval: an input only the operation references is donated to its
    output, which would then be the host-made (managed) buffer itself."""
    a = mx.logical_and(host, True) if host.dtype == mx.bool_ else host * mx.array(1, host.dtype)
    mx.eval(a)
    del host
    return a


def scalar(value: float | int, dtype) -> mx.array:
    """``constant`` of one element."""
    return constant((value,), dtype)
