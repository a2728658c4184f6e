// Declarations shared by the host-side op definitions (ops.cpp) and the CUDA
// kernels (*.cu). The .cu files hold kernels and their launchers only; argument
// checks, device guards and op registration live in ops.cpp.
#pragma once

#include <ATen/core/Tensor.h>

namespace proper {

// Fills `out` (CUDA, contiguous, float32/float16/bfloat16; checked by the
// caller) with `value` on the current CUDA stream.
void launch_fill_(at::Tensor& out, double value);

}  // namespace proper
