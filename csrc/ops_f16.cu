// Instantiates every proper CUDA op for one storage type (F16); one file per type so that
// the dtypes compile in parallel.
#include "launch.cuh"

namespace proper {
PROPER_INSTANTIATE(F16)
}  // namespace proper
