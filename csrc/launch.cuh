// Launchers of the kernels in kernels.cuh, templated over a storage tag; each
// <dtype>_*.cu file instantiates them for one tag.
#pragma once

#ifndef PROPER_EMU
#include <c10/cuda/CUDAException.h>
#endif
#include <c10/util/Exception.h>

#include <atomic>
#include <utility>

#include "decode.cuh"
#include "kernels.cuh"
#include "prefill.cuh"
#include "ops.h"

namespace proper {

// kernel<<<grid, block, smem, stream>>>(args...); under PROPER_EMU, the same launch on the
// CPU SIMT emulator (csrc/emu/simt.h), which checks it and runs every block.
template <typename... P, typename... A>
inline void launch_kernel(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          A&&... args) {
#ifdef PROPER_EMU
  (void)stream;
  simt::launch(kernel, grid, block, smem, std::forward<A>(args)...);
#else
  kernel<<<grid, block, smem, stream>>>(std::forward<A>(args)...);
#endif
}

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
      launch_kernel(dev::router_topk_fwd_kernel<T, VPT>, grid, dev::kTopkWarps * dev::kWarp, smem, stream,
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
      launch_kernel(dev::router_topk_bwd_kernel<T, VPT>, grid, dev::kTopkWarps * dev::kWarp, smem, stream,
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
    launch_kernel(dev::bgmv_shrink_kernel<T, true>, grid, dev::kShrinkThreads, 0, stream,
        static_cast<const T*>(x), static_cast<const T*>(W), idx, out, S, K, M, m_pad, rows);
  } else {
    launch_kernel(dev::bgmv_shrink_kernel<T, false>, grid, dev::kShrinkThreads, 0, stream,
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
  launch_kernel(dev::bgmv_expand_kernel<T, O, TR>, grid, dev::kExpandThreads, smem, stream,                \
      h, Wt, idx, scale, static_cast<const O*>(base), static_cast<O*>(out), S, M, N, rows)
  if (out_float) {
    if (transpose) PROPER_EXPAND(float, true); else PROPER_EXPAND(float, false);
  } else {
    if (transpose) PROPER_EXPAND(T, true); else PROPER_EXPAND(T, false);
  }
#undef PROPER_EXPAND
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Dynamic shared memory past the default 48 KiB needs the kernel's opt-in. It is raised once
// per kernel and device to the device's maximum (never lowered, so concurrent launches of
// other shapes stay valid); a shape that needs more fails with the sizes.
template <auto Kernel>
void allow_smem(size_t bytes, const char* what) {
  if (bytes <= 48 * 1024) return;
#ifdef PROPER_EMU
  const int device = 0;
  const int max_optin = static_cast<int>(simt::kMaxDynamicSmem);  // the emulated GPU: an sm_80's
#else
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int max_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
#endif
  TORCH_CHECK(bytes <= static_cast<size_t>(max_optin), "proper::", what, ": this shape needs ", bytes,
              " bytes of shared memory per block, more than the ", max_optin, " this GPU allows");
#ifndef PROPER_EMU
  static std::atomic<bool> done[64];
  if (device < 64 && done[device].load()) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_optin));
  if (device < 64) done[device].store(true);
#else
  (void)device;
#endif
}

template <typename Tag>
void launch_proper_decode(const DecodeLaunch& a, cudaStream_t stream) {
  using T = typename Storage<Tag>::type;
  if (a.n_tokens == 0) return;
  const dim3 split_grid(static_cast<unsigned>(a.n_tokens), static_cast<unsigned>(a.splits));
  launch_kernel(dec::decode_router_kernel<T>, split_grid, dec::kThreads, 0, stream, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const size_t smem_shrink = sizeof(float) * (3 * static_cast<size_t>(a.E) + a.r_u + 2 * a.k);
  allow_smem<dec::decode_shrink_kernel<T>>(smem_shrink, "proper_decode");
  launch_kernel(dec::decode_shrink_kernel<T>, split_grid, dec::kThreads, smem_shrink, stream, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.out == 0) return;
  const size_t smem_expand = sizeof(float) * (static_cast<size_t>(a.k) * a.r + a.r_u + 2 * a.k);
  allow_smem<dec::decode_expand_kernel<T>>(smem_expand, "proper_decode");
  const dim3 out_grid(static_cast<unsigned>(a.n_tokens), static_cast<unsigned>((a.out + dec::kThreads - 1) / dec::kThreads));
  launch_kernel(dec::decode_expand_kernel<T>, out_grid, dec::kThreads, smem_expand, stream, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

inline unsigned tiles_of(int64_t n, int tile) { return static_cast<unsigned>((n + tile - 1) / tile); }

template <typename Tag>
void launch_prefill_shrink(const ShrinkLaunch& a, cudaStream_t stream) {
  using T = typename Storage<Tag>::type;
  if (a.T == 0) return;
  const int c_user = pf::round8(a.E * a.r) + (a.Wx ? pf::round8(a.E) : 0);
  const int n_cols = c_user + (a.UA ? pf::round8(a.r_u) : 0);
  const size_t smem = pf::epi_layout<T>(2, n_cols, a.E, a.k).total;
  allow_smem<pf::prefill_shrink_kernel<T>>(smem, "prefill_shrink");
  launch_kernel(pf::prefill_shrink_kernel<T>, tiles_of(a.T, tc::kTileM), tc::kThreads, smem, stream, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Tag>
void launch_prefill_expand(const ExpandLaunch& a, cudaStream_t stream) {
  using T = typename Storage<Tag>::type;
  if (a.T == 0 || a.out == 0) return;
  const size_t smem = pf::out_tile_smem<T>();
  allow_smem<pf::prefill_expand_kernel<T>>(smem, "prefill_expand");
  const dim3 grid(tiles_of(a.T, tc::kTileM), tiles_of(a.out, pf::kOutTile));
  launch_kernel(pf::prefill_expand_kernel<T>, grid, tc::kThreads, smem, stream, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Tag>
void launch_prefill_bwd_dh(const BwdDhLaunch& a, cudaStream_t stream) {
  using T = typename Storage<Tag>::type;
  if (a.T == 0) return;
  const int n_cols = pf::round8(a.E * a.r) + (a.UB ? pf::round8(a.r_u) : 0);
  const size_t smem = pf::epi_layout<T>(1, n_cols, a.E, a.k).total;
  allow_smem<pf::prefill_bwd_dh_kernel<T>>(smem, "prefill_bwd_dh");
  launch_kernel(pf::prefill_bwd_dh_kernel<T>, tiles_of(a.T, tc::kTileM), tc::kThreads, smem, stream, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Tag>
void launch_prefill_bwd_dx(const BwdDxLaunch& a, cudaStream_t stream) {
  using T = typename Storage<Tag>::type;
  if (a.T == 0 || a.in == 0) return;
  const size_t smem = pf::out_tile_smem<T>();
  allow_smem<pf::prefill_bwd_dx_kernel<T>>(smem, "prefill_bwd_dx");
  const dim3 grid(tiles_of(a.T, tc::kTileM), tiles_of(a.in, pf::kOutTile));
  launch_kernel(pf::prefill_bwd_dx_kernel<T>, grid, tc::kThreads, smem, stream, a);
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

#define PROPER_INSTANTIATE_PREFILL_FWD(Tag)                                     \
  template void launch_prefill_shrink<Tag>(const ShrinkLaunch&, cudaStream_t); \
  template void launch_prefill_expand<Tag>(const ExpandLaunch&, cudaStream_t);

#define PROPER_INSTANTIATE_PREFILL_BWD(Tag)                                    \
  template void launch_prefill_bwd_dh<Tag>(const BwdDhLaunch&, cudaStream_t); \
  template void launch_prefill_bwd_dx<Tag>(const BwdDxLaunch&, cudaStream_t);

}  // namespace proper
