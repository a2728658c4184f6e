// simt.h: a SIMT emulator that runs the kernels of csrc/ on the CPU, so that their index
// math, fragment layouts, masks and epilogues are tested against the float64 reference on a
// machine with no GPU (tests/test_cuda_emulated.py; docs/DESIGN.md#emulator).
//
// Every thread of a block is a fiber (ucontext) on one OS thread. A fiber runs until it
// reaches a barrier; when every live thread of the block waits at __syncthreads, or every
// lane of a warp at a warp collective, they are released. Blocks run one after another.
// What it checks, beyond the values:
//   - a warp collective (__shfl*_sync, __any_sync, mma.sync) reached by only some lanes of a
//     warp, or by lanes at different collectives (divergence), or with a partial mask;
//   - __syncthreads reached by some threads while others wait at a warp collective, or
//     after others have exited (undefined in CUDA, whatever a given GPU does);
//   - dynamic shared memory: the launch's bytes end on an inaccessible page (a read or
//     write past them ends the process with one line that says so, at 16-byte granularity),
//     every block's start as NaN bytes (0xff), and a launch may not ask for more than an
//     sm_80 GPU allows (163 KiB). Static __shared__ arrays are plain statics: not poisoned;
//   - a block of more than 1024 threads or an empty or oversized grid;
//   - schedule dependence: `set_schedule(1)` runs each round's threads in reverse order,
//     and `set_schedule(n)` for n >= 2 in an order shuffled by the seed n (each round and
//     block its own), so a test can run a kernel several ways and ask for equal bits (a
//     race on shared memory between barriers shows up as a difference).
// mma.sync.m16n8k16 is computed from the PTX ISA's fragment layout, written here on its
// own (not taken from csrc/tc.cuh), with the products summed in float32.
//
// Include this before any kernel header, with PROPER_EMU defined; never with nvcc.
#pragma once

#ifndef PROPER_EMU
#error "csrc/emu/simt.h is the CPU emulator; compile it with -DPROPER_EMU and a host compiler"
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#undef __shared__
#define __shared__ static
#define __launch_bounds__(...)

using std::isfinite;
using std::isnan;

template <typename A, typename B>
inline std::common_type_t<A, B> min(A a, B b) {
  return b < a ? b : a;
}
template <typename A, typename B>
inline std::common_type_t<A, B> max(A a, B b) {
  return a < b ? b : a;
}

namespace simt {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kLanes = 32;
constexpr size_t kStackBytes = 256 * 1024;
// The dynamic shared memory an sm_80 GPU (A100) gives a block at most; sm_90 gives 227 KiB.
constexpr size_t kMaxDynamicSmem = 163 * 1024;

enum class State { kReady, kBlockBarrier, kWarpBarrier, kDone };
// The order of the threads in each round: 0 forward, 1 reverse, n >= 2 shuffled with seed n.
constexpr int64_t kForward = 0, kReverse = 1;

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  State state = State::kReady;
  unsigned collectives = 0;  // warp collectives passed: picks the exchange buffer
  const char* at = "";       // what it waits at, for the error messages
};

// One warp's exchange: each lane's words for the current collective, double-buffered by
// the collective's parity (a lane may enter the next collective while a slower lane still
// reads this one; it cannot enter the one after that before every lane has left this one).
struct Exchange {
  uint32_t words[2][kLanes][12];
  const char* kind[2][kLanes];
};

struct Runtime {
  ucontext_t main;
  std::vector<Fiber> fibers;
  std::vector<Exchange> warps;
  std::vector<void*> stacks;
  uint3 block_idx{0, 0, 0};
  dim3 block_dim, grid_dim;
  unsigned char* smem = nullptr;  // the launch's dynamic shared memory
  void* smem_map = nullptr;
  size_t smem_map_bytes = 0;
  size_t smem_bytes = 0;
  unsigned char* guard = nullptr;  // the PROT_NONE page after the launch's shared memory
  Fiber* current = nullptr;
  const void* body = nullptr;
  void (*run_body)(const void*) = nullptr;
  std::string error;
  int64_t schedule = kForward;
  std::vector<size_t> order;
  unsigned long long launches = 0;
};

inline Runtime& rt() {
  static thread_local Runtime r;
  return r;
}

inline void set_schedule(int64_t s) { rt().schedule = s < 0 ? kForward : s; }
inline unsigned long long launches() { return rt().launches; }

[[noreturn]] inline void fail(const std::string& what) { throw std::runtime_error("SIMT emulator: " + what); }

inline std::string triple(const uint3& v) {
  return "(" + std::to_string(v.x) + "," + std::to_string(v.y) + "," + std::to_string(v.z) + ")";
}

inline std::string block_name() { return "block " + triple(rt().block_idx); }

inline std::string where(const Fiber& f) { return block_name() + " thread " + triple(f.tid); }

// Back to the scheduler, waiting in `s`.
inline void wait(State s, const char* at) {
  Runtime& r = rt();
  Fiber* f = r.current;
  f->state = s;
  f->at = at;
  swapcontext(&f->ctx, &r.main);
}

// An error inside a kernel's thread: recorded, and the block stops.
[[noreturn]] inline void abort_block(const std::string& what) {
  Runtime& r = rt();
  if (r.error.empty()) r.error = what + " (" + where(*r.current) + ")";
  for (;;) wait(State::kDone, "aborted");
}

// The current thread's linear index in its block: its fiber's (launch() numbers them so).
inline size_t linear_id() {
  const Runtime& r = rt();
  return static_cast<size_t>(r.current - r.fibers.data());
}
inline int lane_id() { return static_cast<int>(linear_id() % kLanes); }
inline int warp_id() { return static_cast<int>(linear_id() / kLanes); }

// A warp collective: this lane's words in, the warp's words (of every lane) out.
inline const uint32_t (*collective(const char* kind, unsigned mask, const uint32_t* mine, int n))[12] {
  if (mask != kFullMask) abort_block(std::string(kind) + " with a partial mask; the kernels use full warps");
  Runtime& r = rt();
  Fiber* f = r.current;
  const int lane = lane_id(), w = warp_id();
  const unsigned buf = f->collectives++ & 1u;
  Exchange& x = r.warps[w];
  std::memcpy(x.words[buf][lane], mine, sizeof(uint32_t) * n);
  x.kind[buf][lane] = kind;
  wait(State::kWarpBarrier, kind);
  for (int l = 0; l < kLanes; ++l)
    if (x.kind[buf][l] != kind)
      abort_block(std::string("lanes of warp ") + std::to_string(w) + " met at different collectives: " + kind +
                  " and " + x.kind[buf][l]);
  return x.words[buf];
}

template <typename V>
inline uint32_t bits_of(V v) {
  static_assert(sizeof(V) <= 4, "the kernels shuffle 4-byte values");
  uint32_t u = 0;
  std::memcpy(&u, &v, sizeof(V));
  return u;
}
template <typename V>
inline V value_of(uint32_t u) {
  V v;
  std::memcpy(&v, &u, sizeof(V));
  return v;
}

template <typename V>
inline V shfl_xor(unsigned mask, V v, int lane_mask) {
  const uint32_t mine = bits_of(v);
  const auto* all = collective("__shfl_xor_sync", mask, &mine, 1);
  return value_of<V>(all[(lane_id() ^ lane_mask) & (kLanes - 1)][0]);
}

template <typename V>
inline V shfl(unsigned mask, V v, int src_lane) {
  const uint32_t mine = bits_of(v);
  const auto* all = collective("__shfl_sync", mask, &mine, 1);
  return value_of<V>(all[src_lane & (kLanes - 1)][0]);
}

inline int any(unsigned mask, int pred) {
  const uint32_t mine = pred != 0;
  const auto* all = collective("__any_sync", mask, &mine, 1);
  for (int l = 0; l < kLanes; ++l)
    if (all[l][0]) return 1;
  return 0;
}

inline float half_bits(uint16_t u, bool bf16) {
  if (bf16) {
    const uint32_t w = static_cast<uint32_t>(u) << 16;
    float f;
    std::memcpy(&f, &w, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &u, 2);
  return __half2float(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32, D = A B + C, with
// groupID = lane / 4 and threadID_in_group = lane % 4 (PTX ISA, "Matrix Fragments for
// mma.m16n8k16"). Each 32-bit register packs two elements, the lower index in the low half.
//   A (16 x 16), elements a0..a7 in 4 registers: row = groupID for a0, a1, a4, a5 and
//     groupID + 8 for a2, a3, a6, a7; col = threadID_in_group * 2 + (i & 1), plus 8 for i >= 4.
//   B (16 x 8), elements b0..b3 in 2 registers: row (k) = threadID_in_group * 2 + (i & 1),
//     plus 8 for i >= 2; col (n) = groupID.
//   C, D (16 x 8, f32), c0..c3: row = groupID for c0, c1 and groupID + 8 for c2, c3;
//     col = threadID_in_group * 2 + (i & 1).
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], bool bf16) {
  uint32_t mine[10];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  for (int i = 0; i < 4; ++i) std::memcpy(&mine[6 + i], &c[i], 4);
  const auto* all = collective(bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16", kFullMask, mine, 10);
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < kLanes; ++l) {
    const int g = l / 4, t = l % 4;
    for (int i = 0; i < 8; ++i) {
      const uint32_t reg = all[l][i / 2];
      const uint16_t half = static_cast<uint16_t>(i % 2 ? reg >> 16 : reg & 0xffffu);
      const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
      const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
      A[row][col] = half_bits(half, bf16);
    }
    for (int i = 0; i < 4; ++i) {
      const uint32_t reg = all[l][4 + i / 2];
      const uint16_t half = static_cast<uint16_t>(i % 2 ? reg >> 16 : reg & 0xffffu);
      B[t * 2 + (i & 1) + (i >= 2 ? 8 : 0)][g] = half_bits(half, bf16);
    }
    for (int i = 0; i < 4; ++i) {
      float v;
      std::memcpy(&v, &all[l][6 + i], 4);
      C[i < 2 ? g : g + 8][t * 2 + (i & 1)] = v;
    }
  }
  const int g = lane_id() / 4, t = lane_id() % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
    float acc = C[row][col];
    for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
    c[i] = acc;
  }
}

inline void fiber_entry() {
  Runtime& r = rt();
  r.run_body(r.body);
  wait(State::kDone, "exit");
}

inline void* stack_of(size_t i) {
  Runtime& r = rt();
  while (r.stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    r.stacks.push_back(p);
  }
  return r.stacks[i];
}

// Dynamic shared memory of `bytes`, ending on a PROT_NONE page, filled with 0xff.
inline void map_smem(size_t bytes) {
  Runtime& r = rt();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t used = (bytes + 15) / 16 * 16;
  const size_t data_pages = (used + page - 1) / page;
  const size_t total = (data_pages + 1) * page;
  if (r.smem_map_bytes != total) {
    if (r.smem_map) munmap(r.smem_map, r.smem_map_bytes);
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("cannot map shared memory");
    if (mprotect(static_cast<unsigned char*>(p) + data_pages * page, page, PROT_NONE) != 0)
      fail("cannot protect the shared-memory guard page");
    r.smem_map = p;
    r.smem_map_bytes = total;
  }
  r.smem = static_cast<unsigned char*>(r.smem_map) + data_pages * page - used;
  r.smem_bytes = bytes;
  r.guard = static_cast<unsigned char*>(r.smem_map) + data_pages * page;
  std::memset(r.smem, 0xff, used);
}

inline struct sigaction& previous_segv() {
  static struct sigaction old;
  return old;
}

// A fault on the guard page is a kernel's access past its dynamic shared memory: say so, in
// one line, and end the process (the access cannot be resumed). Other faults go back to the
// handler that was there before (Python's faulthandler, under pytest).
inline void on_segv(int, siginfo_t* info, void*) {
  Runtime& r = rt();
  const auto* a = static_cast<const unsigned char*>(info->si_addr);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (r.guard != nullptr && r.current != nullptr && a >= r.guard && a < r.guard + page) {
    char msg[256];
    const int n = snprintf(msg, sizeof msg,
                           "SIMT emulator: shared memory accessed %zu bytes past the launch's %zu, block (%u,%u,%u) "
                           "thread (%u,%u,%u)\n",
                           static_cast<size_t>(a - r.guard) + (r.smem_bytes + 15) / 16 * 16 - r.smem_bytes,
                           r.smem_bytes, r.block_idx.x, r.block_idx.y, r.block_idx.z, r.current->tid.x,
                           r.current->tid.y, r.current->tid.z);
    if (n > 0) (void)!write(2, msg, static_cast<size_t>(n));
    _exit(86);
  }
  sigaction(SIGSEGV, &previous_segv(), nullptr);  // not ours: it runs when the access repeats
}

inline void install_segv_handler() {
  static const bool done = [] {
    struct sigaction sa;
    std::memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    return sigaction(SIGSEGV, &sa, &previous_segv()) == 0;
  }();
  (void)done;
}

inline std::string states() {
  const Runtime& r = rt();
  std::string s;
  for (size_t i = 0; i < r.fibers.size() && s.size() < 400; ++i)
    if (r.fibers[i].state != State::kDone) s += " t" + std::to_string(i) + "@" + r.fibers[i].at;
  return s;
}

// Runs one block of `threads` fibers to completion.
inline void run_block() {
  Runtime& r = rt();
  const size_t n = r.fibers.size();
  for (size_t i = 0; i < n; ++i) {
    Fiber& f = r.fibers[i];
    f.state = State::kReady;
    f.collectives = 0;
    f.at = "start";
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = stack_of(i);
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const size_t warps = (n + kLanes - 1) / kLanes;
  r.order.resize(n);
  for (size_t q = 0; q < n; ++q) r.order[q] = r.schedule == kReverse ? n - 1 - q : q;
  std::mt19937_64 rng(static_cast<uint64_t>(r.schedule) * 0x9e3779b97f4a7c15ull ^
                      (static_cast<uint64_t>(r.block_idx.x) << 32 | r.block_idx.y << 16 | r.block_idx.z));
  for (;;) {
    if (r.schedule > kReverse) std::shuffle(r.order.begin(), r.order.end(), rng);
    for (size_t q = 0; q < n; ++q) {
      const size_t i = r.order[q];
      Fiber& f = r.fibers[i];
      if (f.state != State::kReady) continue;
      r.current = &f;
      swapcontext(&r.main, &f.ctx);
      r.current = nullptr;
      if (!r.error.empty()) fail(r.error);
    }
    bool released = false, all_done = true, all_block = true;
    for (size_t w = 0; w < warps; ++w) {
      const size_t lo = w * kLanes, hi = std::min(n, lo + kLanes);
      size_t waiting = 0, done = 0;
      for (size_t i = lo; i < hi; ++i) {
        waiting += r.fibers[i].state == State::kWarpBarrier;
        done += r.fibers[i].state == State::kDone;
      }
      if (waiting == 0) continue;
      if (hi - lo != static_cast<size_t>(kLanes))
        fail("a warp collective in a partial warp (block of " + std::to_string(n) + " threads)");
      if (waiting + done == hi - lo && done > 0)
        fail(std::string("warp ") + std::to_string(w) + ": " + std::to_string(waiting) + " lanes at " +
             r.fibers[lo].at + " while " + std::to_string(done) + " lanes have exited (" + block_name() + ")");
      if (waiting == hi - lo) {
        for (size_t i = lo; i < hi; ++i) r.fibers[i].state = State::kReady;
        released = true;
      }
    }
    if (released) continue;
    for (const Fiber& f : r.fibers) {
      all_done = all_done && f.state == State::kDone;
      all_block = all_block && (f.state == State::kDone || f.state == State::kBlockBarrier);
    }
    if (all_done) return;
    if (all_block) {
      size_t exited = 0;
      for (Fiber& f : r.fibers) {
        exited += f.state == State::kDone;
        if (f.state == State::kBlockBarrier) f.state = State::kReady;
      }
      if (exited > 0)  // undefined in CUDA: __syncthreads must be reached by every thread
        fail("__syncthreads reached by " + std::to_string(n - exited) + " threads while " + std::to_string(exited) +
             " have exited (" + block_name() + ")");
      continue;
    }
    fail("deadlock: threads wait at different barriers (" + block_name() + ":" + states() + ")");
  }
}

template <typename Tuple, typename K>
struct Body {
  K kernel;
  Tuple params;
  static void run(const void* self) {
    const Body* b = static_cast<const Body*>(self);
    std::apply(b->kernel, b->params);
  }
};

// kernel<<<grid, block, smem>>>(args...), on the CPU.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, A&&... args) {
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024) fail("a block of " + std::to_string(threads) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535)
    fail("an invalid grid " + triple(uint3{grid.x, grid.y, grid.z}));
  if (smem > kMaxDynamicSmem)
    fail("a launch asks for " + std::to_string(smem) + " bytes of dynamic shared memory, more than sm_80's " +
         std::to_string(kMaxDynamicSmem));
  using Tuple = std::tuple<std::decay_t<P>...>;
  const Body<Tuple, void (*)(P...)> body{kernel, Tuple(std::forward<A>(args)...)};
  Runtime& r = rt();
  r.error.clear();
  r.body = &body;
  r.run_body = &Body<Tuple, void (*)(P...)>::run;
  r.block_dim = block;
  r.grid_dim = grid;
  r.fibers.assign(threads, Fiber{});
  r.warps.assign((threads + kLanes - 1) / kLanes, Exchange{});
  for (size_t i = 0; i < threads; ++i) {
    r.fibers[i].tid = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                            static_cast<unsigned>(i / (static_cast<size_t>(block.x) * block.y))};
  }
  ++r.launches;
  install_segv_handler();
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        r.block_idx = uint3{x, y, z};
        map_smem(smem);
        run_block();
      }
}

inline unsigned char* dynamic_smem() { return rt().smem; }
inline const uint3& thread_idx() { return rt().current->tid; }
inline const uint3& block_idx() { return rt().block_idx; }
inline const dim3& block_dim() { return rt().block_dim; }
inline const dim3& grid_dim() { return rt().grid_dim; }

}  // namespace simt

#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())

inline void __syncthreads() { ::simt::wait(::simt::State::kBlockBarrier, "__syncthreads"); }
inline void __syncwarp(unsigned mask = ::simt::kFullMask) {
  const uint32_t none = 0;
  (void)::simt::collective("__syncwarp", mask, &none, 1);
}
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  return ::simt::shfl_xor(mask, v, lane_mask);
}
template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src_lane) {
  return ::simt::shfl(mask, v, src_lane);
}
inline int __any_sync(unsigned mask, int pred) { return ::simt::any(mask, pred); }

// What csrc/launch.cuh asks of c10's CUDA checks.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

// The kernels' dynamic shared memory (csrc/kernels.cuh: PROPER_DYNAMIC_SMEM).
#define PROPER_DYNAMIC_SMEM(name) unsigned char* const name = ::simt::dynamic_smem()
