// The decode pass (few tokens): three launches that each cover the GPU, all memory-bound
// streams read with 16-byte vector loads along contiguous rows.
//
//   decode_router  grid (T, S): CTA (t, s) takes the s-th slice of the features and stores
//                  partial dots of the token router's E rows and of the user's r_u rows
//                  (A^u[u] x) into part1 [S, T, E + r_u]; a warp per row.
//   decode_shrink  grid (T, S): sums part1 for its token, routes (R[u], W_h h_u, softmax,
//                  top-k; CTA s = 0 stores logits, gates, indices, h_u), then the partial
//                  dots of the k chosen experts' r rows over its slice into part2 [S, T, k r].
//   decode_expand  grid (T, out / 256): sums part2 (CTA 0 stores h), then one output per
//                  thread: y = base + s_g sum_j g_j B[e_j, n, :] h_j + s_u B^u[u, n, :] h_u.
//                  A warp reads 32 consecutive outputs' rows of B: one contiguous span.
// Fixed grids from T and the shapes, no host sync: capturable in a CUDA graph.
#pragma once

#include "prefill.cuh"

namespace proper {
namespace dec {

using dev::kWarp;
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarp;

template <typename T>
union Vec {
  uint4 raw;
  T v[16 / sizeof(T)];
};

// sum_i w[i] x[i] over i in [lo, hi), by one warp (lanes stride by 16-byte chunks when vec).
template <typename T>
__device__ __forceinline__ float warp_dot(const T* __restrict__ w, const T* __restrict__ x, int lo, int hi, bool vec,
                                          int lane) {
  constexpr int kVec = 16 / sizeof(T);
  float acc = 0.f;
  if (vec) {
#pragma unroll 4  // four 16-byte loads of each operand in flight per lane
    for (int i = lo + lane * kVec; i < hi; i += kWarp * kVec) {
      Vec<T> a, b;
      a.raw = *reinterpret_cast<const uint4*>(w + i);
      b.raw = *reinterpret_cast<const uint4*>(x + i);
#pragma unroll
      for (int q = 0; q < kVec; ++q) acc += dev::to_float(a.v[q]) * dev::to_float(b.v[q]);
    }
  } else {
    for (int i = lo + lane; i < hi; i += kWarp) acc += dev::to_float(w[i]) * dev::to_float(x[i]);
  }
  return dev::warp_sum(acc);
}

// sum_i w[i] h[i] over i < n (h in shared memory), by one thread.
template <typename T>
__device__ __forceinline__ float row_times(const T* __restrict__ w, const float* h, int n, bool vec) {
  constexpr int kVec = 16 / sizeof(T);
  float acc = 0.f;
  if (vec) {
    for (int i = 0; i < n; i += kVec) {
      Vec<T> a;
      a.raw = *reinterpret_cast<const uint4*>(w + i);
#pragma unroll
      for (int q = 0; q < kVec; ++q) acc += dev::to_float(a.v[q]) * h[i + q];
    }
  } else {
    for (int i = 0; i < n; ++i) acc += dev::to_float(w[i]) * h[i];
  }
  return acc;
}

struct Slice {
  int lo, hi;
};

// The features of split s: chunks of a multiple of 8 elements, so vector loads stay aligned.
__device__ __forceinline__ Slice slice_of(int in, int splits, int s) {
  const int chunk = ((in + splits - 1) / splits + 7) / 8 * 8;
  const int lo = min(in, s * chunk);
  return {lo, min(in, lo + chunk)};
}

__device__ __forceinline__ int64_t known_user(const DecodeLaunch& a, int64_t t) {
  const int64_t u = a.uid[t];
  return (u >= 0 && u < a.num_users) ? u : -1;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) decode_router_kernel(DecodeLaunch a) {
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x;
  const int s = blockIdx.y;
  const Slice sl = slice_of(a.in, a.splits, s);
  const T* x = static_cast<const T*>(a.x) + t * a.in;
  const int64_t u = known_user(a, t);
  const bool has_row = u >= 0 && a.user_A != nullptr && a.r_u > 0;
  const int width = a.E + a.r_u;
  float* part = a.part1 + (static_cast<int64_t>(s) * a.n_tokens + t) * width;
  for (int q = warp; q < width; q += kWarps) {
    float v = 0.f;
    if (q < a.E) {
      if (a.router_x) v = warp_dot(static_cast<const T*>(a.router_x) + static_cast<int64_t>(q) * a.in, x, sl.lo, sl.hi,
                                   a.vec, lane);
    } else if (has_row) {
      const T* row = static_cast<const T*>(a.user_A) + (u * a.r_u + (q - a.E)) * static_cast<int64_t>(a.in);
      v = warp_dot(row, x, sl.lo, sl.hi, a.vec, lane);
    }
    if (lane == 0) part[q] = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) decode_shrink_kernel(DecodeLaunch a) {
  PROPER_DYNAMIC_SMEM(smem);
  float* sum = reinterpret_cast<float*>(smem);  // [E + r_u]: logits, then h_u
  float* p = sum + a.E + a.r_u;                 // [E]
  float* q = p + a.E;                           // [E]
  float* val = q + a.E;                         // [k]
  int* sel = reinterpret_cast<int*>(val + a.k);  // [k]
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t t = blockIdx.x;
  const int s = blockIdx.y;
  const int width = a.E + a.r_u;
  const int64_t u = known_user(a, t);
  const bool has_row = u >= 0 && a.user_A != nullptr && a.r_u > 0;
  for (int c = threadIdx.x; c < width; c += kThreads) {
    float v = 0.f;
    for (int z = 0; z < a.splits; ++z) v += a.part1[(static_cast<int64_t>(z) * a.n_tokens + t) * width + c];
    if (c >= a.E && !has_row) v = 0.f;
    sum[c] = v;
  }
  __syncthreads();
  if (warp == 0) {
    const T* R = static_cast<const T*>(a.router_user);
    const T* Wh = static_cast<const T*>(a.router_h);
    for (int e = lane; e < a.E; e += kWarp) {
      float v = sum[e];
      if (R) v += dev::to_float(R[(u >= 0 ? u : a.num_users) * a.E + e]);
      // every token, as the reference: h_u (sum[E..]) is 0 for a user with no bank row,
      // and 0 * W_h still carries a NaN or an inf of W_h
      if (Wh && a.user_A != nullptr)
        for (int j = 0; j < a.r_u; ++j) v += dev::to_float(Wh[e * a.r_u + j]) * sum[a.E + j];
      if (s == 0) a.logits[t * a.E + e] = v;
      p[e] = v * a.inv_temperature;
    }
    __syncwarp();
    pf::softmax_smem(p, a.E, lane);
    const float total = pf::topk_smem(p, q, a.E, a.k, lane, sel, val);
    for (int j = lane; j < a.k; j += kWarp) {
      const float g = val[j] / total;
      val[j] = g;
      if (s == 0) {
        a.gates[t * a.k + j] = g;
        a.indices[t * a.k + j] = sel[j];
      }
    }
    if (s == 0)
      for (int j = lane; j < a.r_u; j += kWarp) a.hu[t * a.r_u + j] = sum[a.E + j];
  }
  __syncthreads();
  const Slice sl = slice_of(a.in, a.splits, s);
  const T* x = static_cast<const T*>(a.x) + t * a.in;
  const int rows = a.k * a.r;
  float* part = a.part2 + (static_cast<int64_t>(s) * a.n_tokens + t) * rows;
  for (int c = warp; c < rows; c += kWarps) {
    const int64_t e = sel[c / a.r];
    const T* w = static_cast<const T*>(a.lora_A) + (e * a.r + c % a.r) * static_cast<int64_t>(a.in);
    const float v = warp_dot(w, x, sl.lo, sl.hi, a.vec, lane);
    if (lane == 0) part[c] = v;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) decode_expand_kernel(DecodeLaunch a) {
  PROPER_DYNAMIC_SMEM(smem);
  float* h = reinterpret_cast<float*>(smem);  // [k r]
  float* hu = h + a.k * a.r;                   // [r_u]
  float* g = hu + a.r_u;                       // [k]
  int* sel = reinterpret_cast<int*>(g + a.k);  // [k]
  const int64_t t = blockIdx.x;
  const int rows = a.k * a.r;
  const int64_t u = known_user(a, t);
  const bool has_row = u >= 0 && a.user_A != nullptr && a.r_u > 0;
  for (int c = threadIdx.x; c < rows; c += kThreads) {
    float v = 0.f;
    for (int z = 0; z < a.splits; ++z) v += a.part2[(static_cast<int64_t>(z) * a.n_tokens + t) * rows + c];
    h[c] = v;
    if (blockIdx.y == 0) a.h[t * rows + c] = v;
  }
  for (int j = threadIdx.x; j < a.r_u; j += kThreads) hu[j] = has_row ? a.hu[t * a.r_u + j] : 0.f;
  for (int j = threadIdx.x; j < a.k; j += kThreads) {
    g[j] = a.gates[t * a.k + j];
    sel[j] = static_cast<int>(a.indices[t * a.k + j]);
  }
  __syncthreads();
  const int64_t n = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;
  if (n >= a.out) return;
  const T* B = static_cast<const T*>(a.lora_B);
  float acc = 0.f;
  for (int j = 0; j < a.k; ++j)
    acc += g[j] * row_times(B + (static_cast<int64_t>(sel[j]) * a.out + n) * a.r, h + j * a.r, a.r, a.vec_r);
  acc *= a.scaling;
  if (has_row)
    acc += a.user_scaling *
           row_times(static_cast<const T*>(a.user_B) + (u * a.out + n) * a.r_u, hu, a.r_u, a.vec_ru);
  const int64_t o = t * a.out + n;
  static_cast<T*>(a.y)[o] = dev::from_float<T>(dev::to_float(static_cast<const T*>(a.base)[o]) + acc);
}

}  // namespace dec
}  // namespace proper
