// The kernels and launchers of csrc/, compiled for the CPU SIMT emulator (simt.h): every
// storage type of every op, in one translation unit. Built with csrc/ops.cpp and
// -DPROPER_EMU by tests/_helpers/emulator.py into the library that registers
// torch.ops.proper_emu.
#include "simt.h"

#include "../launch.cuh"

namespace proper {
PROPER_INSTANTIATE(F32)
PROPER_INSTANTIATE(F16)
PROPER_INSTANTIATE(BF16)
PROPER_INSTANTIATE_PREFILL_FWD(F32)
PROPER_INSTANTIATE_PREFILL_FWD(F16)
PROPER_INSTANTIATE_PREFILL_FWD(BF16)
PROPER_INSTANTIATE_PREFILL_BWD(F32)
PROPER_INSTANTIATE_PREFILL_BWD(F16)
PROPER_INSTANTIATE_PREFILL_BWD(BF16)
}  // namespace proper

// The emulator's own controls, for the tests: the schedule and a launch count.
#include <torch/library.h>

namespace {
void set_schedule(int64_t schedule) { simt::set_schedule(schedule); }
int64_t launches() { return static_cast<int64_t>(simt::launches()); }
}  // namespace

TORCH_LIBRARY_FRAGMENT(proper_emu, m) {
  m.def("emu_set_schedule(int schedule) -> ()", &set_schedule);
  m.def("emu_launches() -> int", &launches);
}
