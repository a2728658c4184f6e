// Launchers of the kernels in kernels.cuh, templated over a storage tag; each
// <dtype>_*.cu file instantiates them for one tag.
#pragma once

#include <c10/cuda/CUDAException.h>

#include "kernels.cuh"
#include "ops.h"

namespace proper {

template <typename Tag>
struct Storage;
template <>
struct Storage<F32> {
  using type = float;
};
template <>
struct Storage<F16> {
  using type = __half;
};
template <>
struct Storage<BF16> {
  using type = __nv_bfloat16;
};

// Values per lane for a warp that holds E experts (a power of two, up to 32).
inline int values_per_lane(int E) {
  int v = 1;
  while (v * dev::kWarp < E) v *= 2;
  return v;
}

#define PROPER_DISPATCH_VPT(E, VPT, ...)                                   \
  switch (values_per_lane(E)) {                                            \
    case 1: { constexpr int VPT = 1; __VA_ARGS__; break; }                 \
    case 2: { constexpr int VPT = 2; __VA_ARGS__; break; }                 \
    case 4: { constexpr int VPT = 4; __VA_ARGS__; break; }                 \
    case 8: { constexpr int VPT = 8; __VA_ARGS__; break; }                 \
    case 16: { constexpr int VPT = 16; __VA_ARGS__; break; }               \
    default: { constexpr int VPT = 32; __VA_ARGS__; break; }               \
  }

template <typename Tag>
void launch_router_topk_fwd(const void* logits, void* gates, int64_t* indices, int64_t n_tokens, int E, int k,
                            float inv_temperature, cudaStream_t stream) {
  using T = typename Storage<Tag>::type;
  if (n_tokens == 0) return;
  const dim3 grid(static_cast<unsigned>((n_tokens + dev::kTopkWarps - 1) / dev::kTopkWarps));
  const size_t smem = static_cast<size_t>(dev::kTopkWarps) * k * (sizeof(int) + sizeof(float));
  PROPER_DISPATCH_VPT(E, VPT,
      dev::router_topk_fwd_kernel<T, VPT><<<grid, dev::kTopkWarps * dev::kWarp, smem, stream>>>(
          static_cast<const T*>(logits), static_cast<T*>(gates), indices, n_tokens, E, k, inv_temperature));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Tag>
void launch_router_topk_bwd(const void* logits, const int64_t* indices, const void* dgates, void* dlogits,
                            int64_t n_tokens, int E, int k, float inv_temperature, cudaStream_t stream) {
  using T = typename Storage<Tag>::type;
  if (n_tokens == 0) return;
  const dim3 grid(static_cast<unsigned>((n_tokens + dev::kTopkWarps - 1) / dev::kTopkWarps));
  const size_t smem = static_cast<size_t>(dev::kTopkWarps) * 2 * E * sizeof(float);
  PROPER_DISPATCH_VPT(E, VPT,
      dev::router_topk_bwd_kernel<T, VPT><<<grid, dev::kTopkWarps * dev::kWarp, smem, stream>>>(
          static_cast<const T*>(logits), indices, static_cast<const T*>(dgates), static_cast<T*>(dlogits), n_tokens,
          E, k, inv_temperature));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Tag>
void launch_bgmv_shrink(const void* x, const void* W, const int64_t* idx, float* out, int64_t n_tokens, int S, int K,
                        int M, int64_t rows, bool transpose, cudaStream_t stream) {
  using T = typename Storage<Tag>::type;
  const int64_t blocks = n_tokens * S;
  if (blocks == 0 || M == 0) return;
  int m_pad = 1;
  while (m_pad < M) m_pad *= 2;
  const dim3 grid(static_cast<unsigned>(blocks));
  if (transpose) {
    dev::bgmv_shrink_kernel<T, true><<<grid, dev::kShrinkThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(W), idx, out, S, K, M, m_pad, rows);
  } else {
    dev::bgmv_shrink_kernel<T, false><<<grid, dev::kShrinkThreads, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(W), idx, out, S, K, M, m_pad, rows);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Tag>
void launch_bgmv_expand(const float* h, const void* W, const int64_t* idx, const float* scale, const void* base,
                        void* out, bool out_float, int64_t n_tokens, int S, int M, int N, int64_t rows,
                        bool transpose, cudaStream_t stream) {
  using T = typename Storage<Tag>::type;
  if (n_tokens == 0 || N == 0) return;
  const dim3 grid(static_cast<unsigned>(n_tokens), static_cast<unsigned>((N + dev::kExpandThreads - 1) / dev::kExpandThreads));
  const size_t smem = sizeof(float) * ((static_cast<size_t>(S) * M + S + 1) & ~static_cast<size_t>(1)) + sizeof(int64_t) * S;
  const auto* Wt = static_cast<const T*>(W);
#define PROPER_EXPAND(O, TR)                                                                                  \
  dev::bgmv_expand_kernel<T, O, TR><<<grid, dev::kExpandThreads, smem, stream>>>(                             \
      h, Wt, idx, scale, static_cast<const O*>(base), static_cast<O*>(out), S, M, N, rows)
  if (out_float) {
    if (transpose) PROPER_EXPAND(float, true); else PROPER_EXPAND(float, false);
  } else {
    if (transpose) PROPER_EXPAND(T, true); else PROPER_EXPAND(T, false);
  }
#undef PROPER_EXPAND
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Tag>
void launch_proper_decode(const DecodeLaunch& a, cudaStream_t stream) {
  using T = typename Storage<Tag>::type;
  if (a.n_tokens == 0) return;
  dev::DecodeArgs d{a.x, a.base, a.lora_A, a.lora_B, a.router_x, a.router_user, a.router_h, a.user_A, a.user_B,
                    a.uid, a.y, a.logits, a.gates, a.indices, a.h, a.hu, a.n_tokens, a.in, a.out, a.E, a.r,
                    a.k, a.r_u, a.num_users, a.scaling, a.user_scaling, a.inv_temperature};
  const size_t smem = sizeof(float) * (a.E + a.r_u + static_cast<size_t>(a.k) * a.r + a.k) + sizeof(int) * a.k;
  const dim3 grid(static_cast<unsigned>(a.n_tokens));
  PROPER_DISPATCH_VPT(a.E, VPT, dev::proper_decode_kernel<T, VPT><<<grid, dev::kDecodeThreads, smem, stream>>>(d));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define PROPER_INSTANTIATE(Tag)                                                                                   \
  template void launch_router_topk_fwd<Tag>(const void*, void*, int64_t*, int64_t, int, int, float, cudaStream_t); \
  template void launch_router_topk_bwd<Tag>(const void*, const int64_t*, const void*, void*, int64_t, int, int,    \
                                            float, cudaStream_t);                                                  \
  template void launch_bgmv_shrink<Tag>(const void*, const void*, const int64_t*, float*, int64_t, int, int, int,  \
                                        int64_t, bool, cudaStream_t);                                              \
  template void launch_bgmv_expand<Tag>(const float*, const void*, const int64_t*, const float*, const void*,     \
                                        void*, bool, int64_t, int, int, int, int64_t, bool, cudaStream_t);         \
  template void launch_proper_decode<Tag>(const DecodeLaunch&, cudaStream_t);

}  // namespace proper
