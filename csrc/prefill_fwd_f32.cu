// Instantiates the tensor-core prefill forward (shrink, expand) kernels for one
// storage type (F32); one file per (pass, type) so that the build compiles them in parallel.
#include "launch.cuh"

namespace proper {
PROPER_INSTANTIATE_PREFILL_FWD(F32)
}  // namespace proper
