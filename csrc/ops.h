// Declarations shared by the host-side op definitions (ops.cpp) and the CUDA
// kernels (*.cu). The .cu files hold kernels and their launchers only; argument
// checks, device guards and op registration live in ops.cpp.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace at {
class Tensor;
}  // namespace at

namespace proper {

// Fills `out` (CUDA, contiguous, float32/float16/bfloat16; checked by the
// caller) with `value` on the current CUDA stream.
void launch_fill_(at::Tensor& out, double value);

// Storage-type tags: each .cu file instantiates the launchers for one of them.
struct F32 {};
struct F16 {};
struct BF16 {};

// All pointers are device pointers of contiguous tensors checked by ops.cpp. Row
// indices outside [0, rows) are treated as "no row" by the kernels (memory-safe even when
// the caller skips the host-side range check).
template <typename Tag>
void launch_router_topk_fwd(const void* logits, void* gates, int64_t* indices, int64_t n_tokens, int E, int k,
                            float inv_temperature, cudaStream_t stream);

template <typename Tag>
void launch_router_topk_bwd(const void* logits, const int64_t* indices, const void* dgates, void* dlogits,
                            int64_t n_tokens, int E, int k, float inv_temperature, cudaStream_t stream);

template <typename Tag>
void launch_bgmv_shrink(const void* x, const void* W, const int64_t* idx, float* out, int64_t n_tokens, int S, int K,
                        int M, int64_t rows, bool transpose, cudaStream_t stream);

// base/out: float when out_float, else the storage type; base may be null (zero).
template <typename Tag>
void launch_bgmv_expand(const float* h, const void* W, const int64_t* idx, const float* scale, const void* base,
                        void* out, bool out_float, int64_t n_tokens, int S, int M, int N, int64_t rows,
                        bool transpose, cudaStream_t stream);

struct DecodeLaunch {
  const void *x, *base, *lora_A, *lora_B, *router_x, *router_user, *router_h, *user_A, *user_B;
  const int64_t* uid;
  void* y;
  float *logits, *gates, *h, *hu;
  int64_t* indices;
  float *part1, *part2;  // workspaces [splits, T, E + r_u] and [splits, T, k * r]
  int64_t n_tokens;
  int in, out, E, r, k, r_u, num_users, splits;
  bool vec, vec_r, vec_ru;  // 16-byte loads along in, r and r_u
  float scaling, user_scaling, inv_temperature;
};

template <typename Tag>
void launch_proper_decode(const DecodeLaunch& args, cudaStream_t stream);

// The tensor-core prefill kernels (csrc/prefill.cuh). `plan` is the batch plan [6, T].
struct ShrinkLaunch {
  const void *x, *xl, *A, *Wx, *R, *Wh, *UA;
  const int64_t* plan;
  float *h, *hu, *logits, *gates;
  void* hg;
  int64_t* indices;
  int64_t T;
  int in, E, r, k, r_u, num_users, r_rows;  // r_rows: rows of R (num_users + 1)
  float inv_temperature;
};

struct ExpandLaunch {
  const void *hg, *B, *UB, *base;
  const float* hu;
  const int64_t* plan;
  void* y;
  int64_t T;
  int out, E, r, r_u, num_users;
  float scaling, user_scaling;
};

struct BwdDhLaunch {
  const void *dy, *B, *UB, *Wh;
  const int64_t* plan;
  const float *h, *logits, *gates, *dgates_ext, *dlogits_ext;
  const int64_t* indices;
  void* dh;
  float *dlogits, *dhu;
  int64_t T;
  int out, E, r, k, r_u, num_users;
  float scaling, user_scaling, inv_temperature;
};

struct BwdDxLaunch {
  const void *dh, *A, *Wx, *UA;
  const float *dlogits, *dhu;
  const int64_t* plan;
  void *dx_lora, *dx_router;  // dx_router null: the router term goes into dx_lora
  int64_t T;
  int in, E, r, r_u, num_users;
};

template <typename Tag>
void launch_prefill_shrink(const ShrinkLaunch& args, cudaStream_t stream);
template <typename Tag>
void launch_prefill_expand(const ExpandLaunch& args, cudaStream_t stream);
template <typename Tag>
void launch_prefill_bwd_dh(const BwdDhLaunch& args, cudaStream_t stream);
template <typename Tag>
void launch_prefill_bwd_dx(const BwdDxLaunch& args, cudaStream_t stream);

// Largest column space (E r + E + r_u, each padded to 8) of the prefill shrink and bwd_dh.
constexpr int kPrefillMaxColumns = 256;
// ... and experts (the routing epilogue's per-warp scratch).
constexpr int kPrefillMaxExperts = 256;

// Largest number of experts the warp-per-token router handles.
constexpr int kMaxExperts = 1024;

#ifdef PROPER_EMU
// The SMs of the GPU that the CPU emulator (csrc/emu/simt.h) stands for, an H100 SXM's: the
// launchers that size their grids by the SM count read this.
constexpr int64_t kEmulatedSms = 132;
#endif

}  // namespace proper
