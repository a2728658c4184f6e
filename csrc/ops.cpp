// The `proper` operator library: schemas, argument checks and registration.
//
// Loading the compiled module (`import proper_kernels._C`, after `import torch`)
// runs the static registrations below, so the ops appear under torch.ops.proper.
// The module itself defines no Python functions.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>  // CUDART_VERSION
#include <torch/library.h>
#include <torch/version.h>  // TORCH_VERSION

#include <string>

#include "ops.h"

namespace proper {
namespace {

std::string cuda_build_info() {
  return "cuda " + std::to_string(CUDART_VERSION / 1000) + "." +
         std::to_string(CUDART_VERSION % 1000 / 10) + " torch " + TORCH_VERSION;
}

// Checks that do not depend on the device, shared by the CUDA and Meta kernels.
void check_fill_layout(const at::Tensor& out) {
  TORCH_CHECK(out.is_contiguous(), "proper::fill_: argument 'out' must be contiguous, got strides ",
              out.strides(), " for shape ", out.sizes());
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "proper::fill_: argument 'out' must have dtype float32, float16 or bfloat16, got ",
              dtype);
}

at::Tensor& fill_cuda(at::Tensor& out, double value) {
  TORCH_CHECK(out.is_cuda(), "proper::fill_: argument 'out' must be a CUDA tensor, got ",
              out.device());
  check_fill_layout(out);
  const c10::cuda::CUDAGuard guard(out.device());
  launch_fill_(out, value);
  return out;
}

// The op has no CPU implementation; say so in terms of the argument rather than
// leaving the dispatcher's generic "could not run ... with the 'CPU' backend".
at::Tensor& fill_cpu(at::Tensor& out, double /*value*/) {
  TORCH_CHECK(false, "proper::fill_: argument 'out' must be a CUDA tensor, got ", out.device(),
              " (the proper CUDA ops have no CPU implementation)");
  return out;
}

// Shape/dtype propagation for meta and fake tensors (torch.compile tracing).
at::Tensor& fill_meta(at::Tensor& out, double /*value*/) {
  check_fill_layout(out);
  return out;
}

}  // namespace
}  // namespace proper

TORCH_LIBRARY(proper, m) {
  m.def("cuda_build_info() -> str", &proper::cuda_build_info);
  m.def("fill_(Tensor(a!) out, float value) -> Tensor(a!)");
}

TORCH_LIBRARY_IMPL(proper, CUDA, m) { m.impl("fill_", &proper::fill_cuda); }
TORCH_LIBRARY_IMPL(proper, CPU, m) { m.impl("fill_", &proper::fill_cpu); }
TORCH_LIBRARY_IMPL(proper, Meta, m) { m.impl("fill_", &proper::fill_meta); }

// An empty Python module, so that `import proper_kernels._C` loads this library
// (and with it the registrations above). No pybind11 needed.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // must match the last component of the extension name in setup.py
      "Compiled CUDA ops of proper; they register under torch.ops.proper.",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
