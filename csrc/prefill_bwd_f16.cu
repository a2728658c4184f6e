// Instantiates the tensor-core prefill backward (bwd_dh, bwd_dx) kernels for one
// storage type (F16); one file per (pass, type) so that the build compiles them in parallel.
#include "launch.cuh"

namespace proper {
PROPER_INSTANTIATE_PREFILL_BWD(F16)
}  // namespace proper
