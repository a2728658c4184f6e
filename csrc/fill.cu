// proper::fill_ kernel: the smallest real CUDA op, here to prove that the
// toolchain (nvcc, the torch headers, linking against libtorch) works.
#include <ATen/core/Tensor.h>
#ifndef PROPER_EMU
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#endif
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

#include "ops.h"

namespace proper {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void fill_kernel(scalar_t* __restrict__ out, int64_t numel, scalar_t value) {
  // int64 indices: numel may exceed 2^31 elements.
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel;
       i += stride) {
    out[i] = value;
  }
}

template <typename scalar_t>
void launch(at::Tensor& out, double value) {
  const int64_t numel = out.numel();
  // Enough blocks to fill the GPU a few times over; the grid-stride loop does the rest.
#ifdef PROPER_EMU
  const int64_t sms = kEmulatedSms;
#else
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
#endif
  const int64_t max_blocks = 32 * sms;
  const int blocks = static_cast<int>(std::min((numel + kThreads - 1) / kThreads, max_blocks));
  const scalar_t v = static_cast<scalar_t>(static_cast<float>(value));
#ifdef PROPER_EMU
  simt::launch(fill_kernel<scalar_t>, dim3(blocks), dim3(kThreads), 0, out.data_ptr<scalar_t>(), numel, v);
#else
  fill_kernel<scalar_t><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(out.data_ptr<scalar_t>(), numel, v);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

}  // namespace

void launch_fill_(at::Tensor& out, double value) {
  if (out.numel() == 0) {
    return;
  }
  switch (out.scalar_type()) {
    case at::kFloat:
      launch<float>(out, value);
      break;
    case at::kHalf:
      launch<c10::Half>(out, value);
      break;
    case at::kBFloat16:
      launch<c10::BFloat16>(out, value);
      break;
    default:
      TORCH_CHECK(false, "proper::fill_: unsupported dtype ", out.scalar_type());
  }
}

}  // namespace proper
