// Device code of the proper CUDA ops: templates over the storage type, no torch headers
// (so the .cu files that instantiate them compile fast). Every value is converted to
// float before arithmetic and accumulated in float.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

// A kernel's dynamic shared memory, 16-byte aligned (csrc/emu/simt.h defines it for the
// CPU emulator).
#ifndef PROPER_EMU
#define PROPER_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace proper {
namespace dev {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarp = 32;
constexpr int kIndexNone = 0x7fffffff;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// fmaxf ignores a NaN operand; the NaN still reaches every probability through exp().
__device__ __forceinline__ float warp_max(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Row softmax of one token's E logits held by a warp, VPT values per lane (expert
// e = lane + i * 32). Columns e >= E come out as 0.
template <int VPT>
__device__ __forceinline__ void warp_softmax(float (&p)[VPT], int E, int lane) {
  float m = -INFINITY;
#pragma unroll
  for (int i = 0; i < VPT; ++i)
    if (lane + i * kWarp < E) m = fmaxf(m, p[i]);
  m = warp_max(m);
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    p[i] = (lane + i * kWarp < E) ? expf(p[i] - m) : 0.f;
    s += p[i];
  }
  s = warp_sum(s);
#pragma unroll
  for (int i = 0; i < VPT; ++i) p[i] /= s;
}

// Top-k over a warp's probabilities: writes the k expert indices and raw (not yet
// renormalised) probabilities to sel/val (any memory the warp's lane 0 can write), and
// returns their sum. Ties go to the lower index; a NaN compares as lower than any
// probability, so a NaN row still yields k distinct indices in [0, E).
template <int VPT>
__device__ __forceinline__ float warp_topk(const float (&p)[VPT], int E, int k, int lane, int* sel, float* val) {
  bool taken[VPT];
#pragma unroll
  for (int i = 0; i < VPT; ++i) taken[i] = lane + i * kWarp >= E;
  float total = 0.f;
  for (int j = 0; j < k; ++j) {
    float bv = -3.f;
    int bi = kIndexNone;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const float v = isnan(p[i]) ? -2.f : p[i];
      if (!taken[i] && v > bv) {  // ascending e within a lane: strict > keeps the lower index
        bv = v;
        bi = lane + i * kWarp;
      }
    }
    for (int o = kWarp / 2; o > 0; o /= 2) {
      const float ov = __shfl_xor_sync(kFull, bv, o);
      const int oi = __shfl_xor_sync(kFull, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    float mine = 0.f;
#pragma unroll
    for (int i = 0; i < VPT; ++i)
      if (lane + i * kWarp == bi) {
        taken[i] = true;
        mine = p[i];
      }
    const float pv = __shfl_sync(kFull, mine, bi % kWarp);
    if (lane == 0) {
      sel[j] = bi;
      val[j] = pv;
    }
    total += pv;
  }
  return total;
}

// ---------------------------------------------------------------------------------------
// router_topk: one warp per token.

constexpr int kTopkWarps = 4;

// softmax(row / temperature) of one token's E logits, VPT values per lane.
template <typename T, int VPT>
__device__ __forceinline__ void warp_probabilities(const T* row, int E, int lane, float inv_temperature,
                                                   float (&p)[VPT]) {
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + i * kWarp;
    p[i] = e < E ? to_float(row[e]) * inv_temperature : 0.f;
  }
  warp_softmax<VPT>(p, E, lane);
}

template <typename T, int VPT>
__global__ void router_topk_fwd_kernel(const T* __restrict__ logits, T* __restrict__ gates,
                                       int64_t* __restrict__ indices, int64_t n_tokens, int E, int k,
                                       float inv_temperature) {
  PROPER_DYNAMIC_SMEM(smem_raw);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  int* sel = reinterpret_cast<int*>(smem_raw) + warp * k;
  float* val = reinterpret_cast<float*>(smem_raw + sizeof(int) * kTopkWarps * k) + warp * k;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTopkWarps + warp;
  if (t >= n_tokens) return;
  float p[VPT];
  warp_probabilities<T, VPT>(logits + t * E, E, lane, inv_temperature, p);
  const float total = warp_topk<VPT>(p, E, k, lane, sel, val);
  __syncwarp();
  for (int j = lane; j < k; j += kWarp) {
    gates[t * k + j] = from_float<T>(val[j] / total);
    indices[t * k + j] = sel[j];
  }
}

template <typename T, int VPT>
__global__ void router_topk_bwd_kernel(const T* __restrict__ logits, const int64_t* __restrict__ indices,
                                       const T* __restrict__ dgates, T* __restrict__ dlogits, int64_t n_tokens,
                                       int E, int k, float inv_temperature) {
  PROPER_DYNAMIC_SMEM(smem_raw);
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  float* sp = reinterpret_cast<float*>(smem_raw) + warp * 2 * E;  // probabilities
  float* sdp = sp + E;                                             // d probabilities
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kTopkWarps + warp;
  if (t >= n_tokens) return;
  float p[VPT];
  warp_probabilities<T, VPT>(logits + t * E, E, lane, inv_temperature, p);
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    const int e = lane + i * kWarp;
    if (e < E) {
      sp[e] = p[i];
      sdp[e] = 0.f;
    }
  }
  __syncwarp();
  // g_j = p_j / S over the kept experts; dp_j = (dg_j - sum_i dg_i g_i) / S.
  float s = 0.f, dgp = 0.f;
  for (int j = lane; j < k; j += kWarp) {
    const int64_t e = indices[t * k + j];
    if (e < 0 || e >= E) continue;  // unchecked bad index: ignored, never read out of bounds
    const float pj = sp[e];
    s += pj;
    dgp += to_float(dgates[t * k + j]) * pj;
  }
  s = warp_sum(s);
  const float dot = warp_sum(dgp) / s;
  for (int j = lane; j < k; j += kWarp) {
    const int64_t e = indices[t * k + j];
    if (e >= 0 && e < E) sdp[e] = (to_float(dgates[t * k + j]) - dot) / s;
  }
  __syncwarp();
  float pdp = 0.f;
  for (int e = lane; e < E; e += kWarp) pdp += sp[e] * sdp[e];
  pdp = warp_sum(pdp);
  for (int e = lane; e < E; e += kWarp)
    dlogits[t * E + e] = from_float<T>(sp[e] * (sdp[e] - pdp) * inv_temperature);
}

// ---------------------------------------------------------------------------------------
// BGMV shrink: out[t, s, m] = sum_k W[row, m, k] x[t, k]       (TRANS: W[row, k, m])
// with row = idx[t, s]; a row of -1 gives zeros. One block per (t, s); out is float.

constexpr int kShrinkThreads = 256;

template <typename T, bool TRANS>
__global__ void bgmv_shrink_kernel(const T* __restrict__ x, const T* __restrict__ W, const int64_t* __restrict__ idx,
                                   float* __restrict__ out, int S, int K, int M, int m_pad, int64_t rows) {
  const int64_t ts = blockIdx.x;
  const int64_t t = ts / S;
  const int64_t row = idx[ts];
  float* o = out + ts * M;
  if (row < 0 || row >= rows) {
    for (int m = threadIdx.x; m < M; m += blockDim.x) o[m] = 0.f;
    return;
  }
  const T* w = W + row * static_cast<int64_t>(M) * K;
  const T* xt = x + t * K;
  if (!TRANS) {
    // A warp per output m: lanes stride over k (coalesced reads of W[row, m, :]).
    const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, n_warps = blockDim.x / kWarp;
    for (int m = warp; m < M; m += n_warps) {
      float acc = 0.f;
      for (int kk = lane; kk < K; kk += kWarp) acc += to_float(w[static_cast<int64_t>(m) * K + kk]) * to_float(xt[kk]);
      acc = warp_sum(acc);
      if (lane == 0) o[m] = acc;
    }
  } else {
    // W[row] is [K, M]: thread (m, part) strides over k; consecutive threads read
    // consecutive m of one k (coalesced), then the parts are summed in shared memory.
    __shared__ float partial[kShrinkThreads];
    // m_pad: a power of two >= M that divides the block.
    const int m = threadIdx.x % m_pad, part = threadIdx.x / m_pad, parts = blockDim.x / m_pad;
    float acc = 0.f;
    if (m < M)
      for (int kk = part; kk < K; kk += parts) acc += to_float(w[static_cast<int64_t>(kk) * M + m]) * to_float(xt[kk]);
    partial[threadIdx.x] = acc;
    __syncthreads();
    if (part == 0 && m < M) {
      float total = 0.f;
      for (int q = 0; q < parts; ++q) total += partial[q * m_pad + m];
      o[m] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------
// BGMV expand: out[t, n] = base[t, n] + sum_s scale[t, s] sum_m W[row, n, m] h[t, s, m]
// (TRANS: W[row, m, n]); row = idx[t, s], -1 skipped; scale null means 1. h is float.
// Grid (T, ceil(N / threads)); h, rows and scales of the token are staged in shared memory.

constexpr int kExpandThreads = 256;

template <typename T, typename O, bool TRANS>
__global__ void bgmv_expand_kernel(const float* __restrict__ h, const T* __restrict__ W,
                                   const int64_t* __restrict__ idx, const float* __restrict__ scale,
                                   const O* __restrict__ base, O* __restrict__ out, int S, int M, int N,
                                   int64_t rows) {
  PROPER_DYNAMIC_SMEM(smem_raw);
  float* sh = reinterpret_cast<float*>(smem_raw);  // [S * M]
  float* sscale = sh + S * M;                       // [S]
  int64_t* srow = reinterpret_cast<int64_t*>(sh + ((S * M + S + 1) & ~1));  // [S], 8-byte aligned
  const int64_t t = blockIdx.x;
  for (int q = threadIdx.x; q < S * M; q += blockDim.x) sh[q] = h[t * S * M + q];
  for (int s = threadIdx.x; s < S; s += blockDim.x) {
    srow[s] = idx[t * S + s];
    sscale[s] = scale ? scale[t * S + s] : 1.f;
  }
  __syncthreads();
  const int64_t n = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  float acc = 0.f;
  for (int s = 0; s < S; ++s) {
    const int64_t row = srow[s];
    if (row < 0 || row >= rows) continue;
    const T* w = W + row * static_cast<int64_t>(N) * M;
    float part = 0.f;
    if (!TRANS) {
      for (int m = 0; m < M; ++m) part += to_float(w[n * M + m]) * sh[s * M + m];
    } else {
      for (int m = 0; m < M; ++m) part += to_float(w[static_cast<int64_t>(m) * N + n]) * sh[s * M + m];
    }
    acc += sscale[s] * part;
  }
  const float b = base ? to_float(base[t * N + n]) : 0.f;
  out[t * N + n] = from_float<O>(b + acc);
}

}  // namespace dev
}  // namespace proper
