// Kernels with the bugs the SIMT emulator (simt.h) must catch, for tests/test_simt_emulator.py:
// each is a few lines, launched by torch.ops.proper_emu.emu_selftest(name).
#include "simt.h"

#include <torch/library.h>

#include <ATen/ATen.h>

namespace {

constexpr int kThreads = 64;

// Reads a neighbour's shared-memory slot with no barrier in between: the value depends on
// the order in which threads run (a race), so the two schedules disagree.
__global__ void race_kernel(float* out) {
  PROPER_DYNAMIC_SMEM(smem);
  float* slot = reinterpret_cast<float*>(smem);
  slot[threadIdx.x] = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = slot[(threadIdx.x + 1) % kThreads];
}

// The same, with the barrier: both schedules agree.
__global__ void barrier_kernel(float* out) {
  PROPER_DYNAMIC_SMEM(smem);
  float* slot = reinterpret_cast<float*>(smem);
  slot[threadIdx.x] = static_cast<float>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = slot[(threadIdx.x + 1) % kThreads];
}

// Half of each warp exits before a full-mask shuffle.
__global__ void exited_lanes_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
}

// Odd and even lanes reach different collectives.
__global__ void divergent_kernel(float* out) {
  if (threadIdx.x % 2) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  } else {
    out[threadIdx.x] = static_cast<float>(__any_sync(0xffffffffu, 1));
  }
}

// Threads 0..47 wait at __syncthreads while 48..63, in the same warp as 32..47, wait at a
// shuffle: neither barrier can complete.
__global__ void barrier_divergence_kernel(float* out) {
  if (threadIdx.x < 48) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.f, 1);
  }
}

// Warp 1 exits; warp 0 then waits at __syncthreads.
__global__ void exited_at_barrier_kernel(float* out) {
  if (threadIdx.x >= 32) return;
  __syncthreads();
  out[threadIdx.x] = 1.f;
}

// Reads one float past the launch's dynamic shared memory (kThreads floats).
__global__ void smem_overrun_kernel(float* out) {
  PROPER_DYNAMIC_SMEM(smem);
  const float* f = reinterpret_cast<const float*>(smem);
  out[threadIdx.x] = f[threadIdx.x + (threadIdx.x == kThreads - 1 ? 4 : 0)];
}

// A 16-byte vector load from an address that is 4 bytes off 16 (a GPU faults on it).
__global__ void misaligned_kernel(float* out) {
  PROPER_DYNAMIC_SMEM(smem);
  const uint4 v = *reinterpret_cast<const uint4*>(smem + 4 * (threadIdx.x == kThreads - 1));
  out[threadIdx.x] = static_cast<float>(v.x & 1u);
}

// Indexes a thread's fixed-size array (registers on a GPU) one past its end.
__global__ void register_index_kernel(float* out) {
  float r[4] = {1.f, 2.f, 3.f, 4.f};
  out[threadIdx.x] = r[threadIdx.x % 5];
}

// The last thread reads one float past the output tensor (global memory).
__global__ void global_overrun_kernel(float* out) {
  out[threadIdx.x] = out[threadIdx.x + (threadIdx.x == kThreads - 1)] + 1.f;
}

// Reads the dynamic shared memory before any thread wrote it: 0xff bytes, a NaN.
__global__ void smem_unwritten_kernel(float* out) {
  PROPER_DYNAMIC_SMEM(smem);
  out[threadIdx.x] = reinterpret_cast<const float*>(smem)[threadIdx.x];
}

at::Tensor selftest(const std::string& name) {
  at::Tensor out = at::zeros({kThreads}, at::kFloat);
  float* o = out.data_ptr<float>();
  const dim3 grid(1), block(kThreads);
  const size_t smem = kThreads * sizeof(float);
  if (name == "race") simt::launch(race_kernel, grid, block, smem, o);
  else if (name == "barrier") simt::launch(barrier_kernel, grid, block, smem, o);
  else if (name == "exited_lanes") simt::launch(exited_lanes_kernel, grid, block, 0, o);
  else if (name == "divergent") simt::launch(divergent_kernel, grid, block, 0, o);
  else if (name == "barrier_divergence") simt::launch(barrier_divergence_kernel, grid, block, 0, o);
  else if (name == "exited_at_barrier") simt::launch(exited_at_barrier_kernel, grid, block, 0, o);
  else if (name == "smem_overrun") simt::launch(smem_overrun_kernel, grid, block, smem, o);
  else if (name == "misaligned") simt::launch(misaligned_kernel, grid, block, smem, o);
  else if (name == "register_index") simt::launch(register_index_kernel, grid, block, 0, o);
  else if (name == "global_overrun") simt::launch(global_overrun_kernel, grid, block, 0, o);
  else if (name == "smem_unwritten") simt::launch(smem_unwritten_kernel, grid, block, smem, o);
  else if (name == "too_much_smem") simt::launch(smem_unwritten_kernel, grid, block, simt::kMaxDynamicSmem + 16, o);
  else if (name == "too_many_threads") simt::launch(race_kernel, grid, dim3(1056), 0, o);
  else TORCH_CHECK(false, "emu_selftest: unknown kernel '", name, "'");
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(proper_emu, m) { m.def("emu_selftest(str name) -> Tensor", &selftest); }
