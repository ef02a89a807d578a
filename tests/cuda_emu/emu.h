// A CPU emulator of the CUDA execution model, for running fastclip's CUDA
// kernels (csrc/cuda/multi_tensor_kernels.cu, unmodified) where there is no
// GPU. Force-included (-include) before the kernel source; the test build
// rewrites each `kernel<<<grid, block, smem, stream>>>(args)` into
// `::emu::Launch(grid, block, smem, stream).run(kernel, args)`.
//
// What is emulated, and how:
// - every CUDA thread is a fiber with its own stack; the fibers of a block
//   run on one OS thread, switched only at collectives (__syncthreads, warp
//   shuffles and ballots), in an order drawn from the seed and the block's
//   id (run_block: random round robin, or whole warps running ahead);
// - blocks run concurrently on several OS threads (so the kernels' ticket
//   protocol between blocks runs with real concurrency), in a random order;
// - __shared__ variables are per OS thread (static thread_local), which is
//   per block because a worker runs one block at a time;
// - collectives are strict: a __syncthreads must be reached by every thread
//   of the block (none may have returned: CUDA leaves that undefined) and a
//   full-mask shuffle or ballot by all 32 lanes at the same kind of
//   collective, or the launch fails (a deadlock or divergence error);
// - __shared__ variables are filled with 0xFF bytes (NaN) when a block first
//   reaches their declaration, so a read before any write is not a zero;
// - atomics are relaxed and __ldcg is a relaxed load, as on the GPU, so that
//   __threadfence is the only fence the kernels get;
// - 16-bit conversions are the CUDA toolkit's own host implementations.
// Not emulated: the GPU's weak memory model (x86 and the compiler order
// more than the GPU must), races between threads of one block (a thread runs
// alone until its next collective, so read-modify-writes never interleave),
// misaligned 16-byte accesses (the build adds UBSan's alignment check),
// timing, caches, and device arithmetic: libm's pow may differ from the
// device's by an ulp, and nvcc contracts a * b + c into FMAs where g++ may not.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_set>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

#define __launch_bounds__(...)
#undef __shared__
#define __shared__ static thread_local
#undef __forceinline__
#define __forceinline__ inline

namespace emu {

constexpr int kWarpSize = 32;
constexpr int kMaxBlockThreads = 1024;
// Fiber stacks: the kernels use a few KiB; a guard page below each one
// turns an overflow into a crash instead of silent corruption.
constexpr size_t kStackBytes = size_t{256} << 10;
constexpr size_t kGuardBytes = size_t{4} << 10;

// Settings of the next launches (set by the driver, one launch at a time).
struct Config {
  int workers = 4;         // OS threads running blocks at once
  uint64_t seed = 1;       // block order and fiber order within rounds
};
inline Config& config() {
  static Config c;
  return c;
}

// ------------------------------------------------------ context switch
// Saves the callee-saved registers on the current stack, stores the stack
// pointer to *save, loads `load` and restores from it (SysV x86-64).
extern "C" void emu_switch(void** save, void* load);
extern "C" void emu_fiber_entry();
asm(R"(
  .text
  .globl emu_switch
  .type emu_switch,@function
emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch, .-emu_switch
  .globl emu_fiber_entry
  .type emu_fiber_entry,@function
emu_fiber_entry:
  movq %r12, %rdi
  call emu_fiber_main
  ud2
  .size emu_fiber_entry, .-emu_fiber_entry
)");

struct Block;
struct Group;

struct Fiber {
  void* sp = nullptr;
  char* stack_top = nullptr;
  uint3 tid{};
  int linear = 0;
  bool done = false;
  // The collective it waits in (null when running): runnable again once
  // wait_group's generation differs from wait_generation.
  const char* waiting_at = nullptr;
  const Group* wait_group = nullptr;
  unsigned wait_generation = 0;
  Block* block = nullptr;
};

// Collective state of a group (the block, or one warp).
struct Group {
  int arrived = 0;
  unsigned generation = 0;
  const char* kind = nullptr;  // the collective the first arriver is in
  uint64_t slots[kWarpSize] = {};
};

struct Block {
  uint3 idx{};
  dim3 grid{};
  dim3 dim{};
  int threads = 0;
  void* scheduler_sp = nullptr;
  const std::function<void()>* body = nullptr;
  Group all;
  std::vector<Group> warps;
  std::unordered_set<void*> shared;  // __shared__ variables poisoned in this block
  std::string error;
};

inline thread_local Fiber* current = nullptr;

inline void yield_to_scheduler() {
  Fiber* f = current;
  emu_switch(&f->sp, f->block->scheduler_sp);
}

// Called by emu_fiber_entry (asm) on a fiber's first switch.
// An exception (from an intrinsic) must not unwind into the asm entry.
extern "C" __attribute__((used)) void emu_fiber_main(Fiber* f) {
  try {
    (*f->block->body)();
  } catch (const std::exception& e) {
    f->block->error = e.what();
  }
  f->done = true;
  for (;;) yield_to_scheduler();  // never resumed once done
}

// Waits until `expected` threads of group g reached a collective of this
// kind (the caller fills its slot first where the collective moves data).
inline void arrive(Group& g, int expected, const char* kind) {
  Fiber* f = current;
  if (g.arrived == 0) g.kind = kind;
  if (strcmp(g.kind, kind) != 0) {
    f->block->error = std::string("divergent collectives: ") + kind + " against " + g.kind;
    for (;;) yield_to_scheduler();  // parked: the scheduler stops the block
  }
  if (++g.arrived == expected) {
    g.arrived = 0;
    ++g.generation;
    return;
  }
  f->waiting_at = kind;
  f->wait_group = &g;
  f->wait_generation = g.generation;
  yield_to_scheduler();  // resumed only once the generation moved on
  f->waiting_at = nullptr;
  f->wait_group = nullptr;
}

// Called where a __shared__ variable is declared (the test build adds the
// call): the first thread of a block to get there fills it with 0xFF.
inline void poison_shared(void* p, size_t bytes) {
  if (current->block->shared.insert(p).second) memset(p, 0xFF, bytes);
}

inline Group& warp_group() {
  Fiber* f = current;
  return f->block->warps[static_cast<size_t>(f->linear / kWarpSize)];
}

inline void check_full_warp(unsigned mask, const char* what) {
  Fiber* f = current;
  const int warp_base = f->linear / kWarpSize * kWarpSize;
  const int lanes = std::min(kWarpSize, f->block->threads - warp_base);
  const unsigned full = lanes == kWarpSize ? 0xffffffffu : ((1u << lanes) - 1u);
  if (mask != full) f->block->error = std::string(what) + " with a mask other than the whole warp";
}

inline bool runnable(const Fiber& f) {
  return !f.done && (f.wait_group == nullptr || f.wait_group->generation != f.wait_generation);
}

// How a block's threads take turns. Each turn runs one thread until it
// waits in a collective or returns.
// - kRoundRobin: threads in a random order, each in turn; every thread
//   passes a released collective before any goes further.
// - kWarpPriority: warps in a random order of priority, lanes in order;
//   the first runnable thread always goes next, so high-priority warps run
//   ahead to their next __syncthreads while low-priority ones still read
//   what the previous one published (a missing __syncthreads shows).
enum class Policy { kRoundRobin, kWarpPriority };

// Runs one block: threads until all returned, or until none can run (a
// thread waits in a collective that the others never reach).
inline void run_block(Block& b, std::vector<Fiber>& fibers, std::mt19937_64& rng) {
  for (int i = 0; i < b.threads; ++i) {
    Fiber& f = fibers[static_cast<size_t>(i)];
    f.done = false;
    f.waiting_at = nullptr;
    f.wait_group = nullptr;
    f.block = &b;
    f.linear = i;
    f.tid = make_uint3(static_cast<unsigned>(i) % b.dim.x, static_cast<unsigned>(i) / b.dim.x % b.dim.y,
                       static_cast<unsigned>(i) / (b.dim.x * b.dim.y));
    // Initial frame popped by emu_switch: r15 r14 r13 r12 rbx rbp, then the
    // return address (at top - 8); after `ret` the stack pointer is the
    // 16-byte aligned top, as the ABI wants it before emu_fiber_entry's call.
    auto* sp = reinterpret_cast<uint64_t*>(f.stack_top);
    *--sp = reinterpret_cast<uint64_t>(&emu_fiber_entry);
    for (int r = 0; r < 6; ++r) *--sp = 0;
    sp[3] = reinterpret_cast<uint64_t>(&f);  // r12: the fiber, for emu_fiber_main
    f.sp = sp;
  }
  const Policy policy = rng() % 2 == 0 ? Policy::kRoundRobin : Policy::kWarpPriority;
  std::vector<int> order(static_cast<size_t>(b.threads));
  if (policy == Policy::kRoundRobin) {
    for (int i = 0; i < b.threads; ++i) order[static_cast<size_t>(i)] = i;
    std::shuffle(order.begin(), order.end(), rng);
  } else {
    std::vector<int> warps(b.warps.size());
    for (size_t w = 0; w < warps.size(); ++w) warps[w] = static_cast<int>(w);
    std::shuffle(warps.begin(), warps.end(), rng);
    size_t k = 0;
    for (int w : warps) {
      for (int i = w * kWarpSize; i < std::min(b.threads, (w + 1) * kWarpSize); ++i) order[k++] = i;
    }
  }
  size_t cursor = 0;
  for (;;) {
    // The next runnable thread: after the cursor (round robin), or the
    // first in priority order.
    const size_t from = policy == Policy::kRoundRobin ? cursor : 0;
    int chosen = -1;
    bool live = false;
    for (size_t step = 0; step < order.size(); ++step) {
      const size_t k = (from + step) % order.size();
      const Fiber& f = fibers[static_cast<size_t>(order[k])];
      live = live || !f.done;
      if (runnable(f)) {
        chosen = order[k];
        cursor = k + 1;
        break;
      }
    }
    if (chosen < 0) {
      if (!live) return;
      int done = 0;
      std::string where;
      for (int i = 0; i < b.threads; ++i) {
        const Fiber& f = fibers[static_cast<size_t>(i)];
        if (f.done) {
          ++done;
        } else if (where.empty()) {
          where = std::string(f.waiting_at ? f.waiting_at : "?") + " (thread " + std::to_string(i) + ")";
        }
      }
      b.error = "deadlock: threads wait in " + where + " that the others never reach (" + std::to_string(done) +
                " of " + std::to_string(b.threads) + " threads returned)";
      return;
    }
    Fiber& f = fibers[static_cast<size_t>(chosen)];
    current = &f;
    emu_switch(&b.scheduler_sp, f.sp);
    current = nullptr;
    if (!b.error.empty()) return;
  }
}

// Fiber stacks of one worker, reused by its blocks.
class Stacks {
 public:
  explicit Stacks(int count) : count_(count) {
    bytes_ = static_cast<size_t>(count) * (kStackBytes + kGuardBytes);
    base_ = static_cast<char*>(mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                                    -1, 0));
    if (base_ == MAP_FAILED) throw std::runtime_error("emu: cannot map fiber stacks");
    for (int i = 0; i < count; ++i) mprotect(base_ + static_cast<size_t>(i) * (kStackBytes + kGuardBytes), kGuardBytes, PROT_NONE);
  }
  ~Stacks() { munmap(base_, bytes_); }
  Stacks(const Stacks&) = delete;
  Stacks& operator=(const Stacks&) = delete;
  char* top(int i) const { return base_ + static_cast<size_t>(i + 1) * (kStackBytes + kGuardBytes); }

 private:
  int count_;
  size_t bytes_;
  char* base_;
};

// Runs body() as every thread of every block of the grid.
inline void run_grid(dim3 grid, dim3 block, const std::function<void()>& body) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads < 1 || threads > kMaxBlockThreads) throw std::runtime_error("emu: invalid block size");
  const int64_t blocks = int64_t{grid.x} * grid.y * grid.z;
  if (blocks < 1) throw std::runtime_error("emu: empty grid");
  std::vector<int64_t> order(static_cast<size_t>(blocks));
  for (int64_t i = 0; i < blocks; ++i) order[static_cast<size_t>(i)] = i;
  std::mt19937_64 rng(config().seed);
  std::shuffle(order.begin(), order.end(), rng);
  std::atomic<int64_t> next{0};
  std::mutex error_mutex;
  std::string error;
  auto worker = [&]() {
    Stacks stacks(threads);
    std::vector<Fiber> fibers(static_cast<size_t>(threads));
    for (int i = 0; i < threads; ++i) fibers[static_cast<size_t>(i)].stack_top = stacks.top(i);
    for (int64_t k = next.fetch_add(1); k < blocks; k = next.fetch_add(1)) {
      const int64_t id = order[static_cast<size_t>(k)];
      Block b;
      b.idx = make_uint3(static_cast<unsigned>(id % grid.x), static_cast<unsigned>(id / grid.x % grid.y),
                         static_cast<unsigned>(id / (int64_t{grid.x} * grid.y)));
      b.grid = grid;
      b.dim = block;
      b.threads = threads;
      b.body = &body;
      b.warps.resize(static_cast<size_t>((threads + kWarpSize - 1) / kWarpSize));
      // Each block's schedule from the seed and its id alone: reproducible
      // whichever worker runs it.
      std::mt19937_64 block_rng(config().seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(id));
      run_block(b, fibers, block_rng);
      if (!b.error.empty()) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) {
          error = "block (" + std::to_string(b.idx.x) + ", " + std::to_string(b.idx.y) + "): " + b.error;
        }
        next.store(blocks);  // stop handing out blocks
        return;
      }
    }
  };
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(config().workers, blocks)));
  std::vector<std::thread> pool;
  for (int w = 1; w < workers; ++w) pool.emplace_back(worker);
  worker();
  for (std::thread& t : pool) t.join();
  if (!error.empty()) throw std::runtime_error("emulated kernel failed: " + error);
}

// Holds the launch configuration of `kernel<<<grid, block, smem, stream>>>`.
struct Launch {
  dim3 grid;
  dim3 block;
  Launch(dim3 g, dim3 b, size_t smem = 0, cudaStream_t = nullptr) : grid(g), block(b) {
    if (smem != 0) throw std::runtime_error("emu: dynamic shared memory is not emulated");
  }
  // Arguments are converted to the kernel's parameter types once, as the
  // launch copies them; every thread then gets its own copy.
  template <typename... P, typename... A>
  void run(void (*kernel)(P...), A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const std::function<void()> body = [&] { std::apply(kernel, params); };
    run_grid(grid, block, body);
  }
};

inline const uint3& thread_idx() { return current->tid; }
inline const uint3& block_idx() { return current->block->idx; }
inline const dim3& block_dim() { return current->block->dim; }
inline const dim3& grid_dim() { return current->block->grid; }

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

// ------------------------------------------------------------ intrinsics
inline void __syncthreads() {
  ::emu::Fiber* f = ::emu::current;
  ::emu::arrive(f->block->all, f->block->threads, "__syncthreads");
}

inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = ::emu::kWarpSize) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffles move at most 64 bits");
  ::emu::check_full_warp(mask, "__shfl_down_sync");
  if (width != ::emu::kWarpSize) throw std::runtime_error("emu: shuffle widths below 32 are not emulated");
  ::emu::Fiber* f = ::emu::current;
  ::emu::Group& g = ::emu::warp_group();
  const int lane = f->linear % ::emu::kWarpSize;
  const int lanes = std::min(::emu::kWarpSize, f->block->threads - f->linear / ::emu::kWarpSize * ::emu::kWarpSize);
  memcpy(&g.slots[lane], &value, sizeof(T));
  ::emu::arrive(g, lanes, "__shfl_down_sync");  // every lane's value is in
  const int source = lane + static_cast<int>(delta & 31u);  // PTX reads 5 bits of the offset
  T out;
  memcpy(&out, &g.slots[source < lanes ? source : lane], sizeof(T));
  ::emu::arrive(g, lanes, "__shfl_down_sync (read)");  // every lane has read
  return out;
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  ::emu::check_full_warp(mask, "__ballot_sync");
  ::emu::Fiber* f = ::emu::current;
  ::emu::Group& g = ::emu::warp_group();
  const int lane = f->linear % ::emu::kWarpSize;
  const int lanes = std::min(::emu::kWarpSize, f->block->threads - f->linear / ::emu::kWarpSize * ::emu::kWarpSize);
  g.slots[lane] = predicate != 0;
  ::emu::arrive(g, lanes, "__ballot_sync");
  unsigned out = 0;
  for (int i = 0; i < lanes; ++i) out |= static_cast<unsigned>(g.slots[i]) << i;
  ::emu::arrive(g, lanes, "__ballot_sync (read)");
  return out;
}

inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }

// Loads that bypass L1 (other blocks' writes): relaxed atomic loads, with
// no ordering of their own (as on the GPU).
template <typename T>
T __ldcg(const T* p) {
  T out;
  __atomic_load(p, &out, __ATOMIC_RELAXED);
  return out;
}

// Relaxed, as CUDA's atomicAdd: ordering comes from __threadfence only.
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
}

namespace emu {
template <typename To, typename From>
To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From), "bit casts keep the size");
  To out;
  memcpy(&out, &v, sizeof(out));
  return out;
}
}  // namespace emu

inline float __uint_as_float(unsigned u) { return ::emu::bit_cast<float>(u); }
inline unsigned __float_as_uint(float f) { return ::emu::bit_cast<unsigned>(f); }
inline double __hiloint2double(int hi, int lo) {
  return ::emu::bit_cast<double>((static_cast<uint64_t>(static_cast<uint32_t>(hi)) << 32) | static_cast<uint32_t>(lo));
}
inline int __double2loint(double d) { return static_cast<int>(static_cast<uint32_t>(::emu::bit_cast<uint64_t>(d))); }
inline int __double2hiint(double d) {
  return static_cast<int>(static_cast<uint32_t>(::emu::bit_cast<uint64_t>(d) >> 32));
}
