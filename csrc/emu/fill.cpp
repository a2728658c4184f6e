// csrc/fill.cu for the CPU SIMT emulator (simt.h).
#include "simt.h"

#include "../fill.cu"
