// Instantiates every proper CUDA op for one storage type (BF16); one file per type so that
// the dtypes compile in parallel.
#include "launch.cuh"

namespace proper {
PROPER_INSTANTIATE(BF16)
}  // namespace proper
