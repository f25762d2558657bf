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

# The top-k: a scan kernel, one block per (query row, chunk of the bank's rows): each thread keeps
# the sorted top-k of its stripe in registers, the block merges its threads' lists. With one chunk
# it writes the result; with several (a short batch over a long bank: more blocks than query
# rows keep the GPU busy) each chunk writes its candidates and a merge kernel, one block per
# query row, takes the top-k of them.
TOPK_HEADER = r"""
// The warp's largest v and who holds it (ties: the lower who), in every lane.
__device__ __forceinline__ void em_warp_argmax(float& v, int& who) {
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffff, v, o);
    const int ow = __shfl_xor_sync(0xffffffff, who, o);
    if (ov > v || (ov == v && ow < who)) { v = ov; who = ow; }
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

// The block's top-k (k <= K) of its threads' sorted lists, into win_s / win_i (shared), in k
// rounds of a block-wide argmax (ties: the lower thread). Every thread must call it.
template <int T, int K>
__device__ __forceinline__ void em_block_top_k(
    const float (&s)[K], const int (&ix)[K], int k, float* sh_s, int* sh_i, float* win_s, int* win_i,
    float* wv, int* wt) {
  const int tid = threadIdx.x;
#pragma unroll
  for (int j = 0; j < K; ++j) { sh_s[tid * K + j] = s[j]; sh_i[tid * K + j] = ix[j]; }
  __syncthreads();
  int ptr = 0;
  for (int r = 0; r < k; ++r) {
    float v = ptr < K ? sh_s[tid * K + ptr] : EM_NEG_INF;
    int who = tid;
    em_warp_argmax(v, who);
    if ((tid & 31) == 0) { wv[tid >> 5] = v; wt[tid >> 5] = who; }
    __syncthreads();
    float bv = wv[0];
    int bw = wt[0];
    for (int i = 1; i < T / 32; ++i) {
      if (wv[i] > bv || (wv[i] == bv && wt[i] < bw)) { bv = wv[i]; bw = wt[i]; }
    }
    if (tid == bw) {
      win_s[r] = ptr < K ? sh_s[tid * K + ptr] : EM_NEG_INF;
      win_i[r] = ptr < K ? sh_i[tid * K + ptr] : -1;
      ++ptr;
    }
    __syncthreads();
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
"""


@functools.cache
def constant(values: tuple, dtype) -> mx.array:
    """A small constant kernel input (a scale, a threshold, a shape, a bound) [len(values)], made
    once per value: a new array per call would be a host-to-device copy per layer and step."""
    a = mx.array(list(values), dtype)
    mx.eval(a)
    return a


def scalar(value: float | int, dtype) -> mx.array:
    """``constant`` of one element."""
    return constant((value,), dtype)
