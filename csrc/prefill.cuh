// The prefill and training kernels of the CUDA backend, on tensor cores (tc.cuh).
//
// Every kernel works on a tile of kTileM tokens in the batch plan's sorted order (plan
// rows: 0 uid, 1 order, 2 run, 3 run_user; see proper_kernels/plan.py), so a tile holds the
// runs of a few users and the user LoRA is one tensor-core product per run against that
// user's rows (the other rows of the A fragment masked to zero).
//
//   prefill_shrink   columns [h = x_l A_all^T | logits = x W_x^T | h_u = x_l A^u^T per run],
//                    K = in; the routing (R[u], W_h h_u, softmax, top-k) in the epilogue;
//                    stores h (fp32), g*h (storage type), h_u, logits, gates, indices.
//   prefill_expand   per (tile, 128 outputs): y = base + s_g (g*h) B_all + s_u h_u B^u,
//                    K = E*r (+ r_u per run), in the storage type, in place when y == base.
//   prefill_bwd_dh   columns [d(g*h) = s_g dy B_all | dh_u = s_u dy B^u per run], K = out;
//                    the router backward in the epilogue: dh = g d(g*h), d logits, dh_u.
//   prefill_bwd_dx   per (tile, 128 inputs): dx_l = dh A_all + dh_u A^u, dx_r = dlogits W_x.
// The column space of shrink and bwd_dh holds at most kMaxCols columns (each section padded
// to a multiple of 8); proper_kernels/cuda_backend.py takes other shapes elsewhere.
#pragma once

#include "tc.cuh"

namespace proper {
namespace pf {

using tc::kLd;
using tc::kThreads;
using tc::kTileK;
using tc::kTileM;
using tc::kWarps;
using dev::kWarp;

constexpr int kMaxCols = 256;      // shrink / bwd_dh column space
constexpr int kColTiles = kMaxCols / 8 / 2;  // n-tiles per warp column
constexpr int kOutTile = 128;      // expand / bwd_dx outputs per CTA
constexpr int kOutTiles = kOutTile / 8 / 2;
constexpr int kMaxE = 256;         // experts (the per-warp epilogue scratch holds 3 E floats)

enum PlanRow { kUid = 0, kOrder = 1, kRun = 2, kRunUser = 3 };

__host__ __device__ constexpr int round8(int v) { return (v + 7) / 8 * 8; }

// The tile's sorted positions: token of each row (-1 past T) and its run; first/last run.
struct TileRows {
  int64_t tok[kTileM];
  int run[kTileM];
  int r_first, r_last;
};

__device__ __forceinline__ void load_tile_rows(TileRows& s, const int64_t* __restrict__ plan, int64_t T) {
  const int64_t p0 = static_cast<int64_t>(blockIdx.x) * kTileM;
  for (int m = threadIdx.x; m < kTileM; m += kThreads) {
    const int64_t p = p0 + m;
    s.tok[m] = p < T ? plan[kOrder * T + p] : -1;
    s.run[m] = p < T ? static_cast<int>(plan[kRun * T + p]) : -1;
  }
  if (threadIdx.x == 0) {
    s.r_first = static_cast<int>(plan[kRun * T + p0]);
    s.r_last = static_cast<int>(plan[kRun * T + min(p0 + kTileM, T) - 1]);
  }
  __syncthreads();
}

// The user of run rr, or -1 when it has no bank row.
__device__ __forceinline__ int64_t run_user(const int64_t* __restrict__ plan, int64_t T, int rr, int num_users) {
  const int64_t u = plan[kRunUser * T + rr];
  return (u >= 0 && u < num_users) ? u : -1;
}

// A tile of rows where each row comes from its own source row (or is zero).
template <typename T, typename S, typename RowPtr>
__device__ __forceinline__ void stage(T* dst, int nrows, int k0, int K, bool vec, RowPtr row_ptr) {
  constexpr int kVec = 16 / sizeof(T);
  if constexpr (sizeof(S) == sizeof(T)) {
    if (vec) {
      constexpr int chunks = kTileK / kVec;
      for (int q = threadIdx.x; q < nrows * chunks; q += kThreads) {
        const int m = q / chunks, kk = (q % chunks) * kVec;
        const S* src = row_ptr(m);
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (src != nullptr && k0 + kk < K) v = *reinterpret_cast<const uint4*>(src + k0 + kk);
        *reinterpret_cast<uint4*>(dst + m * kLd + kk) = v;
      }
      return;
    }
  }
  for (int q = threadIdx.x; q < nrows * kTileK; q += kThreads) {
    const int m = q / kTileK, kk = q % kTileK;
    const S* src = row_ptr(m);
    float v = 0.f;
    if (src != nullptr && k0 + kk < K) v = dev::to_float(src[k0 + kk]);
    dst[m * kLd + kk] = dev::from_float<T>(v);
  }
}

// ---------------------------------------------------------------------------------------
// Per-token epilogue helpers: one warp works on one token's row of E values in shared memory.

__device__ __forceinline__ float warp_max_all(float v) {
  for (int o = kWarp / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(dev::kFull, v, o));
  return v;
}

// p[0..E) <- softmax(p); the warp's lanes own e = lane + 32 i.
__device__ __forceinline__ void softmax_smem(float* p, int E, int lane) {
  float m = -INFINITY;
  for (int e = lane; e < E; e += kWarp) m = fmaxf(m, p[e]);
  m = warp_max_all(m);
  float s = 0.f;
  for (int e = lane; e < E; e += kWarp) {
    const float v = expf(p[e] - m);
    p[e] = v;
    s += v;
  }
  s = dev::warp_sum(s);
  for (int e = lane; e < E; e += kWarp) p[e] /= s;
  __syncwarp();
}

// Top-k of p[0..E) (probabilities; a NaN ranks below any of them, ties go to the lower
// index): sel/val[0..k) get the experts and their probabilities; returns their sum. `taken`
// (E floats of scratch) is overwritten.
__device__ __forceinline__ float topk_smem(const float* p, float* taken, int E, int k, int lane, int* sel,
                                           float* val) {
  for (int e = lane; e < E; e += kWarp) taken[e] = isnan(p[e]) ? -2.f : p[e];
  __syncwarp();
  float total = 0.f;
  for (int j = 0; j < k; ++j) {
    float bv = -3.f;
    int bi = dev::kIndexNone;
    for (int e = lane; e < E; e += kWarp)
      if (taken[e] > bv) {
        bv = taken[e];
        bi = e;
      }
    for (int o = kWarp / 2; o > 0; o /= 2) {
      const float ov = __shfl_xor_sync(dev::kFull, bv, o);
      const int oi = __shfl_xor_sync(dev::kFull, bi, o);
      if (ov > bv || (ov == bv && oi < bi)) {
        bv = ov;
        bi = oi;
      }
    }
    const float pv = p[bi];
    __syncwarp();
    if (lane == 0) {
      sel[j] = bi;
      val[j] = pv;
      taken[bi] = -4.f;
    }
    __syncwarp();
    total += pv;
  }
  return total;
}

// ---------------------------------------------------------------------------------------
// prefill_shrink

// The column-space kernels' (shrink, bwd_dh) product of one K tile: acc[q] += A B^T for
// this warp's n-tiles whose columns lie in [c_lo, c_hi); rows lo/hi of the A fragment can be
// masked (a user run).
template <typename T>
__device__ __forceinline__ void mma_col_tiles(float (&acc)[kColTiles][4], const T* As, const T* Bs, int wm,
                                              int wn, int c_lo, int c_hi, bool lo, bool hi, int lane) {
#pragma unroll
  for (int kk = 0; kk < kTileK; kk += 16) {
    tc::AFrag<T> f;
    f.load(As + wm * 16 * kLd, kk, lo, hi, lane);
#pragma unroll
    for (int q = 0; q < kColTiles; ++q) {
      const int c0 = (wn + 2 * q) * 8;
      if (c0 >= c_lo && c0 < c_hi) f.mma(acc[q], Bs + c0 * kLd, kk, lane);
    }
  }
}

// The accumulators into the epilogue's fp32 rows S[row][col] (cols < n_cols).
__device__ __forceinline__ void store_col_tiles(float* S, int s_ld, const float (&acc)[kColTiles][4], int wm, int wn,
                                                int n_cols, int lane) {
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int q = 0; q < kColTiles; ++q) {
    const int c0 = (wn + 2 * q) * 8 + 2 * t;
    if (c0 < n_cols) {
      float* s0 = S + (wm * 16 + g) * s_ld + c0;
      s0[0] = acc[q][0];
      s0[1] = acc[q][1];
      s0[8 * s_ld] = acc[q][2];
      s0[8 * s_ld + 1] = acc[q][3];
    }
  }
}

using ShrinkArgs = ::proper::ShrinkLaunch;

// Shared memory of shrink and bwd_dh: the operand tiles (`a_tiles` A tiles of kTileM rows,
// then the n_cols rows of the column tile) share their space with the epilogue's fp32
// [kTileM][s_ld] accumulators; then the tile's rows, then each warp's scratch (p, q, g: E
// floats; val: k floats; sel: k ints).
struct EpiLayout {
  int s_ld, E, k;
  size_t rows_off, scratch_off, scratch_warp, total;
};

template <typename T>
__host__ __device__ inline EpiLayout epi_layout(int a_tiles, int n_cols, int E, int k) {
  EpiLayout l;
  l.s_ld = n_cols + 4;
  l.E = E;
  l.k = k;
  const size_t tiles = sizeof(T) * static_cast<size_t>(kLd) * (a_tiles * kTileM + n_cols);
  const size_t epi = sizeof(float) * static_cast<size_t>(kTileM) * l.s_ld;
  l.rows_off = ((tiles > epi ? tiles : epi) + 15) / 16 * 16;
  l.scratch_off = (l.rows_off + sizeof(TileRows) + 15) / 16 * 16;
  l.scratch_warp = sizeof(float) * (3 * static_cast<size_t>(E) + 2 * k);
  l.total = l.scratch_off + l.scratch_warp * kWarps;
  return l;
}

struct WarpScratch {
  float *p, *q, *g, *val;
  int* sel;
  __device__ WarpScratch(unsigned char* smem, const EpiLayout& l, int warp) {
    p = reinterpret_cast<float*>(smem + l.scratch_off + l.scratch_warp * warp);
    q = p + l.E;
    g = q + l.E;
    val = g + l.E;
    sel = reinterpret_cast<int*>(val + l.k);
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) prefill_shrink_kernel(ShrinkArgs a) {
  PROPER_DYNAMIC_SMEM(smem);
  T* As = reinterpret_cast<T*>(smem);
  T* Ax = As + kTileM * kLd;
  T* Bs = Ax + kTileM * kLd;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wm = warp & 3, wn = warp >> 2;
  const int ER = a.E * a.r, c_router = round8(ER);
  const int c_user = c_router + (a.Wx ? round8(a.E) : 0);
  const int n_cols = c_user + (a.UA ? round8(a.r_u) : 0);
  const EpiLayout lay = epi_layout<T>(2, n_cols, a.E, a.k);
  float* S = reinterpret_cast<float*>(smem);
  TileRows& rows = *reinterpret_cast<TileRows*>(smem + lay.rows_off);
  const bool same_x = a.x == a.xl;
  const T* x = static_cast<const T*>(a.x);
  const T* xl = static_cast<const T*>(a.xl);
  const T* A = static_cast<const T*>(a.A);
  const T* Wx = static_cast<const T*>(a.Wx);
  const T* UA = static_cast<const T*>(a.UA);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.in % kVec == 0 && tc::aligned16(x) && tc::aligned16(xl) && tc::aligned16(A) &&
                   (!Wx || tc::aligned16(Wx)) && (!UA || tc::aligned16(UA));

  load_tile_rows(rows, a.plan, a.T);
  const int row_lo = wm * 16 + (lane >> 2), row_hi = row_lo + 8;

  float acc[kColTiles][4];
#pragma unroll
  for (int q = 0; q < kColTiles; ++q) acc[q][0] = acc[q][1] = acc[q][2] = acc[q][3] = 0.f;

  for (int k0 = 0; k0 < a.in; k0 += kTileK) {
    __syncthreads();
    stage<T, T>(As, kTileM, k0, a.in, vec,
                [&](int m) { return rows.tok[m] >= 0 ? xl + rows.tok[m] * a.in : nullptr; });
    if (!same_x && Wx)
      stage<T, T>(Ax, kTileM, k0, a.in, vec,
                  [&](int m) { return rows.tok[m] >= 0 ? x + rows.tok[m] * a.in : nullptr; });
    stage<T, T>(Bs, c_user, k0, a.in, vec, [&](int n) -> const T* {
      if (n < ER) return A + static_cast<int64_t>(n) * a.in;
      if (Wx && n >= c_router && n < c_router + a.E) return Wx + static_cast<int64_t>(n - c_router) * a.in;
      return nullptr;
    });
    __syncthreads();
    mma_col_tiles<T>(acc, As, Bs, wm, wn, 0, c_router, true, true, lane);
    // the token router reads x, not the adapters' (dropped-out) input
    mma_col_tiles<T>(acc, same_x || !Wx ? As : Ax, Bs, wm, wn, c_router, c_user, true, true, lane);
    if (UA) {
      for (int rr = rows.r_first; rr <= rows.r_last; ++rr) {
        const int64_t u = run_user(a.plan, a.T, rr, a.num_users);
        if (u < 0) continue;
        __syncthreads();
        stage<T, T>(Bs + c_user * kLd, n_cols - c_user, k0, a.in, vec, [&](int j) {
          return j < a.r_u ? UA + (u * a.r_u + j) * a.in : nullptr;
        });
        __syncthreads();
        const bool lo = rows.run[row_lo] == rr, hi = rows.run[row_hi] == rr;
        if (!__any_sync(dev::kFull, lo || hi)) continue;  // no row of this warp's slab is in the run
        mma_col_tiles<T>(acc, As, Bs, wm, wn, c_user, n_cols, lo, hi, lane);
      }
    }
  }
  __syncthreads();
  store_col_tiles(S, lay.s_ld, acc, wm, wn, n_cols, lane);
  __syncthreads();

  // The routing, one warp per token.
  WarpScratch w(smem, lay, warp);
  const T* R = static_cast<const T*>(a.R);
  const T* Wh = static_cast<const T*>(a.Wh);
  T* hg = static_cast<T*>(a.hg);
  for (int m = warp; m < kTileM; m += kWarps) {
    const int64_t tok = rows.tok[m];
    if (tok < 0) continue;
    const float* srow = S + m * lay.s_ld;
    const int64_t uid = a.plan[kUid * a.T + tok];
    const bool known = uid >= 0 && uid < a.num_users;
    const bool has_row = known && UA != nullptr;
    for (int e = lane; e < a.E; e += kWarp) {
      float v = Wx ? srow[c_router + e] : 0.f;
      if (R) v += dev::to_float(R[(known ? uid : a.r_rows - 1) * a.E + e]);
      // every token, as the reference: a user with no bank row has h_u = 0 (its columns
      // were never accumulated), and 0 * W_h still carries a NaN or an inf of W_h
      if (Wh && UA != nullptr)
        for (int j = 0; j < a.r_u; ++j) v += dev::to_float(Wh[e * a.r_u + j]) * srow[c_user + j];
      a.logits[tok * a.E + e] = v;
      w.p[e] = v * a.inv_temperature;
    }
    __syncwarp();
    softmax_smem(w.p, a.E, lane);
    const float total = topk_smem(w.p, w.q, a.E, a.k, lane, w.sel, w.val);
    for (int e = lane; e < a.E; e += kWarp) w.g[e] = 0.f;
    __syncwarp();
    for (int j = lane; j < a.k; j += kWarp) {
      const float gate = w.val[j] / total;
      w.g[w.sel[j]] = gate;
      a.gates[tok * a.k + j] = gate;
      a.indices[tok * a.k + j] = w.sel[j];
    }
    __syncwarp();
    for (int c = lane; c < ER; c += kWarp) {
      const float v = srow[c];
      a.h[tok * ER + c] = v;
      hg[tok * ER + c] = dev::from_float<T>(v * w.g[c / a.r]);
    }
    for (int j = lane; j < a.r_u; j += kWarp) a.hu[tok * a.r_u + j] = has_row ? srow[c_user + j] : 0.f;
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------
// prefill_expand

using ExpandArgs = ::proper::ExpandLaunch;

template <typename T>
__host__ __device__ constexpr size_t out_tile_smem() {
  return sizeof(T) * static_cast<size_t>(kLd) * (kTileM + kOutTile) + sizeof(TileRows);
}

template <typename T>
__device__ __forceinline__ void mma_out_tiles(float (&acc)[kOutTiles][4], const T* As, const T* Bs, int wm, int wn,
                                              bool lo, bool hi, int lane) {
#pragma unroll
  for (int kk = 0; kk < kTileK; kk += 16) {
    tc::AFrag<T> f;
    f.load(As + wm * 16 * kLd, kk, lo, hi, lane);
#pragma unroll
    for (int q = 0; q < kOutTiles; ++q) f.mma(acc[q], Bs + (wn + 2 * q) * 8 * kLd, kk, lane);
  }
}

// What the out-tile kernels (expand, bwd_dx: a tile of tokens x kOutTile columns) share:
// the shared-memory tiles, the tile's rows, this thread's place, and its accumulators' coordinates.
template <typename T>
struct OutTile {
  T* As;
  T* Bs;
  TileRows& rows;
  int lane, wm, wn, n0, row_lo, row_hi;

  __device__ OutTile(unsigned char* smem, const int64_t* plan, int64_t n_tokens)
      : As(reinterpret_cast<T*>(smem)),
        Bs(As + kTileM * kLd),
        rows(*reinterpret_cast<TileRows*>(Bs + kOutTile * kLd)),
        lane(threadIdx.x % kWarp),
        wm((threadIdx.x / kWarp) & 3),
        wn((threadIdx.x / kWarp) >> 2),
        n0(blockIdx.y * kOutTile),
        row_lo(wm * 16 + (lane >> 2)),
        row_hi(row_lo + 8) {
    load_tile_rows(rows, plan, n_tokens);
  }

  // f(token, column, q, i) for each accumulator acc[q][i] of this thread inside [0, N).
  template <typename F>
  __device__ __forceinline__ void for_each(int N, F&& f) const {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int q = 0; q < kOutTiles; ++q) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = wm * 16 + g + (i >= 2 ? 8 : 0);
        const int n = n0 + (wn + 2 * q) * 8 + 2 * t + (i & 1);
        if (rows.tok[m] >= 0 && n < N) f(rows.tok[m], n, q, i);
      }
    }
  }
};

__device__ __forceinline__ void zero(float (&acc)[kOutTiles][4]) {
#pragma unroll
  for (int q = 0; q < kOutTiles; ++q)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[q][i] = 0.f;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) prefill_expand_kernel(ExpandArgs a) {
  PROPER_DYNAMIC_SMEM(smem);
  const OutTile<T> o(smem, a.plan, a.T);
  T* As = o.As;
  T* Bs = o.Bs;
  const TileRows& rows = o.rows;
  const int lane = o.lane, wm = o.wm, wn = o.wn, n0 = o.n0, row_lo = o.row_lo, row_hi = o.row_hi;
  const int ER = a.E * a.r;
  const T* hg = static_cast<const T*>(a.hg);
  const T* B = static_cast<const T*>(a.B);
  const T* UB = static_cast<const T*>(a.UB);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = ER % kVec == 0 && tc::aligned16(hg);
  float acc[kOutTiles][4], accu[kOutTiles][4];
  zero(acc);
  zero(accu);

  for (int k0 = 0; k0 < ER; k0 += kTileK) {
    __syncthreads();
    stage<T, T>(As, kTileM, k0, ER, vec, [&](int m) { return rows.tok[m] >= 0 ? hg + rows.tok[m] * ER : nullptr; });
    // Bs[n][kk] = B[e, n0 + n, i] with k0 + kk = e r + i: along kk the addresses run through
    // an expert's r values of one output.
    for (int q = threadIdx.x; q < kOutTile * kTileK; q += kThreads) {
      const int n = q / kTileK, kk = q % kTileK, c = k0 + kk;
      T v = tc::Zero<T>::value();
      if (c < ER && n0 + n < a.out) v = B[(static_cast<int64_t>(c / a.r) * a.out + n0 + n) * a.r + c % a.r];
      Bs[n * kLd + kk] = v;
    }
    __syncthreads();
    mma_out_tiles<T>(acc, As, Bs, wm, wn, true, true, lane);
  }
  if (UB) {
    for (int rr = rows.r_first; rr <= rows.r_last; ++rr) {
      const int64_t u = run_user(a.plan, a.T, rr, a.num_users);
      if (u < 0) continue;
      for (int k0 = 0; k0 < a.r_u; k0 += kTileK) {
        __syncthreads();
        stage<T, float>(As, kTileM, k0, a.r_u, false, [&](int m) {
          return rows.tok[m] >= 0 && rows.run[m] == rr ? a.hu + rows.tok[m] * a.r_u : nullptr;
        });
        stage<T, T>(Bs, kOutTile, k0, a.r_u, false, [&](int n) {
          return n0 + n < a.out ? UB + (u * a.out + n0 + n) * a.r_u : nullptr;
        });
        __syncthreads();
        mma_out_tiles<T>(accu, As, Bs, wm, wn, rows.run[row_lo] == rr, rows.run[row_hi] == rr, lane);
      }
    }
  }
  const T* base = static_cast<const T*>(a.base);
  T* y = static_cast<T*>(a.y);
  o.for_each(a.out, [&](int64_t tok, int n, int q, int i) {
    const int64_t at = tok * a.out + n;  // read, then written by this thread only: in place is safe
    y[at] = dev::from_float<T>(dev::to_float(base[at]) + a.scaling * acc[q][i] + a.user_scaling * accu[q][i]);
  });
}

// ---------------------------------------------------------------------------------------
// prefill_bwd_dh

using BwdDhArgs = ::proper::BwdDhLaunch;

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) prefill_bwd_dh_kernel(BwdDhArgs a) {
  PROPER_DYNAMIC_SMEM(smem);
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + kTileM * kLd;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int wm = warp & 3, wn = warp >> 2;
  const int ER = a.E * a.r, c_user = round8(ER);
  const int n_cols = c_user + (a.UB ? round8(a.r_u) : 0);
  const EpiLayout lay = epi_layout<T>(1, n_cols, a.E, a.k);
  float* S = reinterpret_cast<float*>(smem);
  TileRows& rows = *reinterpret_cast<TileRows*>(smem + lay.rows_off);
  const T* dy = static_cast<const T*>(a.dy);
  const T* B = static_cast<const T*>(a.B);
  const T* UB = static_cast<const T*>(a.UB);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.out % kVec == 0 && tc::aligned16(dy);
  load_tile_rows(rows, a.plan, a.T);
  const int row_lo = wm * 16 + (lane >> 2), row_hi = row_lo + 8;

  float acc[kColTiles][4];
#pragma unroll
  for (int q = 0; q < kColTiles; ++q) acc[q][0] = acc[q][1] = acc[q][2] = acc[q][3] = 0.f;

  for (int k0 = 0; k0 < a.out; k0 += kTileK) {
    __syncthreads();
    stage<T, T>(As, kTileM, k0, a.out, vec, [&](int m) { return rows.tok[m] >= 0 ? dy + rows.tok[m] * a.out : nullptr; });
    // Bs[c][kk] = B[e, k0 + kk, i] for c = e r + i: consecutive threads take consecutive c.
    for (int q = threadIdx.x; q < c_user * kTileK; q += kThreads) {
      const int c = q % c_user, kk = q / c_user;
      T v = tc::Zero<T>::value();
      if (c < ER && k0 + kk < a.out) v = B[(static_cast<int64_t>(c / a.r) * a.out + k0 + kk) * a.r + c % a.r];
      Bs[c * kLd + kk] = v;
    }
    __syncthreads();
    mma_col_tiles<T>(acc, As, Bs, wm, wn, 0, c_user, true, true, lane);
    if (UB) {
      const int nu = n_cols - c_user;
      for (int rr = rows.r_first; rr <= rows.r_last; ++rr) {
        const int64_t u = run_user(a.plan, a.T, rr, a.num_users);
        if (u < 0) continue;
        __syncthreads();
        for (int q = threadIdx.x; q < nu * kTileK; q += kThreads) {
          const int j = q % nu, kk = q / nu;
          T v = tc::Zero<T>::value();
          if (j < a.r_u && k0 + kk < a.out) v = UB[(u * a.out + k0 + kk) * a.r_u + j];
          Bs[(c_user + j) * kLd + kk] = v;
        }
        __syncthreads();
        const bool lo = rows.run[row_lo] == rr, hi = rows.run[row_hi] == rr;
        if (!__any_sync(dev::kFull, lo || hi)) continue;
        mma_col_tiles<T>(acc, As, Bs, wm, wn, c_user, n_cols, lo, hi, lane);
      }
    }
  }
  __syncthreads();
  store_col_tiles(S, lay.s_ld, acc, wm, wn, n_cols, lane);
  __syncthreads();

  // The router backward, one warp per token: g_j = p_j / S over the kept experts, so
  // dp_j = (dg_j - sum_i dg_i g_i) / S and dlogit_e = p_e (dp_e - sum_f p_f dp_f) / temperature.
  WarpScratch w(smem, lay, warp);
  const T* Wh = static_cast<const T*>(a.Wh);
  T* dh = static_cast<T*>(a.dh);
  for (int m = warp; m < kTileM; m += kWarps) {
    const int64_t tok = rows.tok[m];
    if (tok < 0) continue;
    const float* srow = S + m * lay.s_ld;
    const int64_t uid = a.plan[kUid * a.T + tok];
    const bool has_row = UB != nullptr && uid >= 0 && uid < a.num_users;
    for (int e = lane; e < a.E; e += kWarp) {
      w.p[e] = a.logits[tok * a.E + e] * a.inv_temperature;
      w.g[e] = 0.f;
      w.q[e] = 0.f;
    }
    __syncwarp();
    softmax_smem(w.p, a.E, lane);
    for (int j = lane; j < a.k; j += kWarp) {
      const int64_t e = a.indices[tok * a.k + j];
      w.sel[j] = (e >= 0 && e < a.E) ? static_cast<int>(e) : -1;
    }
    __syncwarp();
    float s = 0.f, dgp = 0.f;
    for (int j = 0; j < a.k; ++j) {
      const int e = w.sel[j];
      if (e < 0) continue;
      float dg = 0.f;
      for (int i = lane; i < a.r; i += kWarp) {
        const int c = e * a.r + i;
        dg += a.scaling * srow[c] * a.h[tok * ER + c];
      }
      dg = dev::warp_sum(dg);
      if (a.dgates_ext) dg += a.dgates_ext[tok * a.k + j];
      if (lane == 0) {
        w.val[j] = dg;
        w.g[e] = a.gates[tok * a.k + j];
      }
      s += w.p[e];
      dgp += dg * w.p[e];
    }
    __syncwarp();
    const float dot = dgp / s;
    if (lane == 0)
      for (int j = 0; j < a.k; ++j)
        if (w.sel[j] >= 0) w.q[w.sel[j]] = (w.val[j] - dot) / s;
    __syncwarp();
    for (int c = lane; c < ER; c += kWarp) dh[tok * ER + c] = dev::from_float<T>(w.g[c / a.r] * a.scaling * srow[c]);
    float pdp = 0.f;
    for (int e = lane; e < a.E; e += kWarp) pdp += w.p[e] * w.q[e];
    pdp = dev::warp_sum(pdp);
    for (int e = lane; e < a.E; e += kWarp) {
      float v = w.p[e] * (w.q[e] - pdp) * a.inv_temperature;
      if (a.dlogits_ext) v += a.dlogits_ext[tok * a.E + e];
      a.dlogits[tok * a.E + e] = v;
      w.q[e] = v;  // d logits, for dh_u below
    }
    __syncwarp();
    for (int j = lane; j < a.r_u; j += kWarp) {
      float v = 0.f;
      if (has_row) {
        v = a.user_scaling * srow[c_user + j];
        if (Wh)
          for (int e = 0; e < a.E; ++e) v += w.q[e] * dev::to_float(Wh[e * a.r_u + j]);
      }
      a.dhu[tok * a.r_u + j] = v;
    }
    __syncwarp();
  }
}

// ---------------------------------------------------------------------------------------
// prefill_bwd_dx

using BwdDxArgs = ::proper::BwdDxLaunch;

template <typename T>
__global__ void __launch_bounds__(kThreads) prefill_bwd_dx_kernel(BwdDxArgs a) {
  PROPER_DYNAMIC_SMEM(smem);
  const OutTile<T> o(smem, a.plan, a.T);
  T* As = o.As;
  T* Bs = o.Bs;
  const TileRows& rows = o.rows;
  const int lane = o.lane, wm = o.wm, wn = o.wn, n0 = o.n0, row_lo = o.row_lo, row_hi = o.row_hi;
  const int ER = a.E * a.r;
  const T* dh = static_cast<const T*>(a.dh);
  const T* A = static_cast<const T*>(a.A);
  const T* Wx = static_cast<const T*>(a.Wx);
  const T* UA = static_cast<const T*>(a.UA);
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = ER % kVec == 0 && tc::aligned16(dh);
  float acc[kOutTiles][4], accr[kOutTiles][4];
  zero(acc);
  zero(accr);

  for (int k0 = 0; k0 < ER; k0 += kTileK) {
    __syncthreads();
    stage<T, T>(As, kTileM, k0, ER, vec, [&](int m) { return rows.tok[m] >= 0 ? dh + rows.tok[m] * ER : nullptr; });
    tc::stage_cols<T>(Bs, A, kOutTile, a.in, k0, ER, n0, a.in);
    __syncthreads();
    mma_out_tiles<T>(acc, As, Bs, wm, wn, true, true, lane);
  }
  if (Wx) {
    // d logits stay fp32 in the reference: the 16-bit operand is its high part, then the
    // remainder (two products; one for fp32 inputs).
    constexpr int parts = sizeof(T) == sizeof(float) ? 1 : 2;
    for (int k0 = 0; k0 < a.E; k0 += kTileK) {
      for (int part = 0; part < parts; ++part) {
        __syncthreads();
        for (int q = threadIdx.x; q < kTileM * kTileK; q += kThreads) {
          const int m = q / kTileK, kk = q % kTileK;
          float v = 0.f;
          if (rows.tok[m] >= 0 && k0 + kk < a.E) v = a.dlogits[rows.tok[m] * a.E + k0 + kk];
          const float hi = dev::to_float(dev::from_float<T>(v));
          As[m * kLd + kk] = dev::from_float<T>(part == 0 ? v : v - hi);
        }
        // The remainder's product takes W_x's finite entries only: an inf or a NaN of W_x
        // is in the high part's product already, and 0 * inf would make a NaN where the
        // reference has the inf.
        if (part == 0)
          tc::stage_cols<T>(Bs, Wx, kOutTile, a.in, k0, a.E, n0, a.in);
        else
          tc::stage_cols<T, true>(Bs, Wx, kOutTile, a.in, k0, a.E, n0, a.in);
        __syncthreads();
        if (a.dx_router)
          mma_out_tiles<T>(accr, As, Bs, wm, wn, true, true, lane);
        else
          mma_out_tiles<T>(acc, As, Bs, wm, wn, true, true, lane);
      }
    }
  }
  if (UA) {
    for (int rr = rows.r_first; rr <= rows.r_last; ++rr) {
      const int64_t u = run_user(a.plan, a.T, rr, a.num_users);
      if (u < 0) continue;
      for (int k0 = 0; k0 < a.r_u; k0 += kTileK) {
        __syncthreads();
        stage<T, float>(As, kTileM, k0, a.r_u, false, [&](int m) {
          return rows.tok[m] >= 0 && rows.run[m] == rr ? a.dhu + rows.tok[m] * a.r_u : nullptr;
        });
        tc::stage_cols<T>(Bs, UA + u * a.r_u * a.in, kOutTile, a.in, k0, a.r_u, n0, a.in);
        __syncthreads();
        mma_out_tiles<T>(acc, As, Bs, wm, wn, rows.run[row_lo] == rr, rows.run[row_hi] == rr, lane);
      }
    }
  }
  T* dxl = static_cast<T*>(a.dx_lora);
  T* dxr = static_cast<T*>(a.dx_router);
  o.for_each(a.in, [&](int64_t tok, int n, int q, int i) {
    dxl[tok * a.in + n] = dev::from_float<T>(acc[q][i]);
    if (dxr) dxr[tok * a.in + n] = dev::from_float<T>(accr[q][i]);
  });
}

}  // namespace pf
}  // namespace proper
