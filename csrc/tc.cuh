// The tensor-core tile engine of the prefill kernels: 16-bit operands staged in shared
// memory, fed to mma.sync.m16n8k16 (HMMA on sm_80 and sm_90) with fp32 accumulators.
//
// A CTA owns a tile of kTileM = 64 sorted tokens; its 8 warps split it as 4 row slabs of 16
// tokens times 2 column interleaves (n-tile j belongs to warp column j % 2). Shared-memory
// tiles are K-contiguous rows of kLd elements (kTileK = 32 plus 8 of padding, so the
// fragment loads of a warp fall in 32 distinct banks).
//
// Fragment layout of mma.m16n8k16 (g = lane / 4, t = lane % 4), per the PTX ISA:
//   A 16x16 (row):  reg 0 = (row g, k 2t..2t+1), 1 = (g+8, 2t..), 2 = (g, 2t+8..), 3 = (g+8, 2t+8..)
//   B 16x8  (col):  reg 0 = (k 2t..2t+1, n g), 1 = (k 2t+8.., n g)
//   C 16x8  (f32):  c0 = (g, 2t), c1 = (g, 2t+1), c2 = (g+8, 2t), c3 = (g+8, 2t+1)
// float32 inputs take the same layout with FMAs in place of the mma (fp32 is not a
// tensor-core type without TF32, and the fp32 path is the exact one).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.cuh"
#include "ops.h"

namespace proper {
namespace tc {

constexpr int kTileM = 64;
constexpr int kTileK = 32;
constexpr int kLd = kTileK + 8;
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * dev::kWarp;

template <typename T>
struct Zero {
  static __device__ __forceinline__ T value() { return dev::from_float<T>(0.f); }
};

__device__ __forceinline__ uint32_t ld32(const void* p) { return *static_cast<const uint32_t*>(p); }

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

#ifdef PROPER_EMU
// The CPU emulator's mma.sync (csrc/emu/simt.h), from the PTX ISA's fragment layout.
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  simt::mma_m16n8k16(c, a, b, false);
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[2]) {
  simt::mma_m16n8k16(c, a, b, true);
}
#else
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[2]) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// The A fragment of one warp's 16 rows at k offset kk of a shared tile; rows g (lo) and
// g + 8 (hi) can be masked to zero (the user LoRA's per-run products).
template <typename T>
struct AFrag {
  uint32_t a[4];
  __device__ __forceinline__ void load(const T* As, int kk, bool lo, bool hi, int lane) {
    const int g = lane >> 2, t = lane & 3;
    const T* r0 = As + g * kLd + kk + 2 * t;
    const T* r1 = r0 + 8 * kLd;
    a[0] = lo ? ld32(r0) : 0u;
    a[1] = hi ? ld32(r1) : 0u;
    a[2] = lo ? ld32(r0 + 8) : 0u;
    a[3] = hi ? ld32(r1 + 8) : 0u;
  }
  // c += A (16 x 16) B^T, B the 8 rows of Bs (n) at k offset kk.
  __device__ __forceinline__ void mma(float (&c)[4], const T* Bs, int kk, int lane) const {
    const int g = lane >> 2, t = lane & 3;
    const T* b = Bs + g * kLd + kk + 2 * t;
    const uint32_t bf[2] = {ld32(b), ld32(b + 8)};
    mma16816<T>(c, a, bf);
  }
};

template <>
struct AFrag<float> {
  const float* rows;
  bool lo, hi;
  __device__ __forceinline__ void load(const float* As, int kk, bool lo_, bool hi_, int lane) {
    rows = As + (lane >> 2) * kLd + kk;
    lo = lo_;
    hi = hi_;
  }
  __device__ __forceinline__ void mma(float (&c)[4], const float* Bs, int kk, int lane) const {
    const int t = lane & 3;
    const float* b0 = Bs + (2 * t) * kLd + kk;
    const float* b1 = b0 + kLd;
    const float* r1 = rows + 8 * kLd;
#pragma unroll
    for (int q = 0; q < 16; ++q) {
      const float x0 = lo ? rows[q] : 0.f, x1 = hi ? r1[q] : 0.f;
      c[0] += x0 * b0[q];
      c[1] += x0 * b1[q];
      c[2] += x1 * b0[q];
      c[3] += x1 * b1[q];
    }
  }
};

// dst[n][kk] (n < nrows, kk < kTileK) = src[(k0 + kk) * ld + n0 + n]: a tile of a matrix whose
// rows run along K, read along n (consecutive threads, consecutive addresses) and stored
// transposed. Zero where k0 + kk >= K or n0 + n >= N, and, with kFiniteOnly, where the
// value is an inf or a NaN.
template <typename T, bool kFiniteOnly = false>
__device__ __forceinline__ void stage_cols(T* dst, const T* __restrict__ src, int nrows, int64_t ld, int k0, int K,
                                           int n0, int N) {
  for (int q = threadIdx.x; q < nrows * kTileK; q += kThreads) {
    const int n = q % nrows, kk = q / nrows;
    T v = Zero<T>::value();
    if (k0 + kk < K && n0 + n < N) v = src[static_cast<int64_t>(k0 + kk) * ld + n0 + n];
    if constexpr (kFiniteOnly) {
      if (!isfinite(dev::to_float(v))) v = Zero<T>::value();
    }
    dst[n * kLd + kk] = v;
  }
}

__device__ __forceinline__ bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

}  // namespace tc
}  // namespace proper
