// CPU emulation of the CUDA constructs the kernels in this folder use, so that their source runs,
// and is tested, on a machine without a GPU (included by compat.h under FGD_CUDA_EMULATION;
// tests/test_cuda_emulation.py builds it).  Not part of the package build.
//
// Execution model, as the hardware's where it matters:
// * every CUDA thread of a block is a fiber (ucontext) with its own stack; blocks run one after
//   another.  A fiber runs until it reaches __syncthreads() or returns; when every thread that
//   has not returned waits at the barrier, the barrier opens.  Threads run in ascending order
//   (FASTGMMDIFF_EMU_ORDER=reverse: descending), deterministically, so a missing barrier shows
//   as a read of another thread's not-yet-written (poisoned) value, every time;
// * dynamic shared memory is filled with 0xFF bytes (NaN for float and double) before each
//   block, so a read of an unwritten element shows;
// * the H100/H200 launch limits: at most 1024 threads per block (x, y ≤ 1024, z ≤ 64), grid x ≤
//   2^31 − 1, y and z ≤ 65535, none of them 0; dynamic shared memory ≤ 48 KB unless raised with
//   cudaFuncSetAttribute, which refuses more than 232,448 B (the opt-in limit).  A launch beyond
//   them runs nothing and leaves an error that the next launch check raises, as CUDA's
//   cudaGetLastError does;
// * atomics are plain read-modify-writes (one fiber runs at a time).
// Under AddressSanitizer (-fsanitize=address) the fiber switches are annotated, so global
// memory read out of bounds by a kernel is reported.
#pragma once

#include <ucontext.h>

#include <ATen/ATen.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FGD_EMU_ASAN 1
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};

namespace fastgmmdiff {
namespace emu {

// H100 / H200 limits.
constexpr unsigned kMaxThreads = 1024, kMaxBlockXY = 1024, kMaxBlockZ = 64;
constexpr unsigned long long kMaxGridX = 2147483647ull;
constexpr unsigned kMaxGridYZ = 65535;
constexpr size_t kSmemDefault = 48 * 1024, kSmemOptin = 232448;

enum Error : int { kSuccess = 0, kInvalidValue = 1, kInvalidConfiguration = 9 };

inline const char* error_name(int e) {
  return e == kInvalidValue ? "cudaErrorInvalidValue (invalid argument)"
         : e == kInvalidConfiguration ? "cudaErrorInvalidConfiguration (invalid configuration argument)"
                                      : "unknown error";
}

struct Stats {
  long launches = 0, failed_launches = 0, blocks = 0;
  size_t max_smem = 0;
};

inline Stats& stats() {
  static Stats s;
  return s;
}
inline int& last_error() {  // per host thread, as CUDA's
  static thread_local int e = kSuccess;
  return e;
}
// cudaGetLastError: the last error, reset.
inline int get_last_error() {
  const int e = last_error();
  last_error() = kSuccess;
  return e;
}
inline std::map<const void*, size_t>& smem_limits() {
  static std::map<const void*, size_t> m;
  return m;
}
// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
inline int func_set_max_dynamic_smem(const void* kernel, size_t bytes) {
  if (bytes > kSmemOptin) return last_error() = kInvalidValue;
  smem_limits()[kernel] = bytes;
  return kSuccess;
}
inline void launch_check(const char* file, int line) {
  const int e = get_last_error();
  TORCH_CHECK(e == kSuccess, "CUDA error (emulated): ", error_name(e), " at ", file, ":", line);
}
inline bool set_max_dynamic_smem(const void* kernel, size_t bytes) {
  if (func_set_max_dynamic_smem(kernel, bytes) == kSuccess) return true;
  (void)get_last_error();
  return false;
}

struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

// The running block: fibers for its threads and the scheduler's context.
class Block {
 public:
  enum State { kRunnable, kAtBarrier, kDone };

  explicit Block(unsigned threads)
      : n_(threads), ctx_(threads), state_(threads), stacks_(threads), fiber_fake_(threads, nullptr) {
    for (auto& s : stacks_) s.reset(new char[kStack]);  // untouched until used
  }

  // Runs `body` once per thread of block `block_idx`.
  void run(const std::function<void()>& body, dim3 block_idx, dim3 block_dim, dim3 grid_dim,
           unsigned char* smem) {
    body_ = &body;
    block_idx_ = block_idx, block_dim_ = block_dim, grid_dim_ = grid_dim, smem_ = smem;
    for (unsigned i = 0; i < n_; ++i) {
      getcontext(&ctx_[i]);
      ctx_[i].uc_stack.ss_sp = stacks_[i].get();
      ctx_[i].uc_stack.ss_size = kStack;
      ctx_[i].uc_link = &sched_;
      makecontext(&ctx_[i], &Block::entry, 0);
      state_[i] = kRunnable;
      fiber_fake_[i] = nullptr;
    }
    Block* outer = current();
    current() = this;
    const char* order = std::getenv("FASTGMMDIFF_EMU_ORDER");
    const bool reverse = order != nullptr && std::string(order) == "reverse";
    for (;;) {
      for (unsigned j = 0; j < n_; ++j) {
        const unsigned i = reverse ? n_ - 1 - j : j;
        if (state_[i] == kRunnable) resume(i);
      }
      bool alive = false;
      for (unsigned i = 0; i < n_; ++i) {
        if (state_[i] == kAtBarrier) state_[i] = kRunnable, alive = true;  // everyone alive is here: open
      }
      if (!alive) break;
    }
    current() = outer;
  }

  void barrier() {
    state_[cur_] = kAtBarrier;
    to_scheduler(false);
  }

  dim3 thread_idx() const { return thread_idx_; }
  dim3 block_idx() const { return block_idx_; }
  dim3 block_dim() const { return block_dim_; }
  dim3 grid_dim() const { return grid_dim_; }
  unsigned char* smem() const { return smem_; }

  static Block*& current() {
    static thread_local Block* b = nullptr;
    return b;
  }

 private:
  static constexpr size_t kStack = 256 * 1024;

  static void entry() {
    Block* b = current();
    b->arrived();
    (*b->body_)();
    b->state_[b->cur_] = kDone;
    b->to_scheduler(true);  // returns through uc_link
  }

  void resume(unsigned i) {
    cur_ = i;
    thread_idx_ = dim3(i % block_dim_.x, (i / block_dim_.x) % block_dim_.y, i / (block_dim_.x * block_dim_.y));
#ifdef FGD_EMU_ASAN
    __sanitizer_start_switch_fiber(&sched_fake_, stacks_[i].get(), kStack);
#endif
    swapcontext(&sched_, &ctx_[i]);
#ifdef FGD_EMU_ASAN
    __sanitizer_finish_switch_fiber(sched_fake_, nullptr, nullptr);
#endif
  }

  // In a fiber, just switched to (first entry or back from the scheduler).
  void arrived() {
#ifdef FGD_EMU_ASAN
    __sanitizer_finish_switch_fiber(fiber_fake_[cur_], &sched_bottom_, &sched_size_);
#endif
  }

  void to_scheduler(bool exiting) {
#ifdef FGD_EMU_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &fiber_fake_[cur_], sched_bottom_, sched_size_);
#endif
    if (exiting) return;  // the fiber's function returns: uc_link resumes the scheduler
    swapcontext(&ctx_[cur_], &sched_);
    arrived();
  }

  unsigned n_;
  std::vector<ucontext_t> ctx_;
  std::vector<State> state_;
  std::vector<std::unique_ptr<char[]>> stacks_;
  ucontext_t sched_;
  unsigned cur_ = 0;
  const std::function<void()>* body_ = nullptr;
  dim3 thread_idx_, block_idx_, block_dim_, grid_dim_;
  unsigned char* smem_ = nullptr;
  void* sched_fake_ = nullptr;
  std::vector<void*> fiber_fake_;  // AddressSanitizer's fake stack of each fiber
  const void* sched_bottom_ = nullptr;
  size_t sched_size_ = 0;
};

inline Block& block() {
  Block* b = Block::current();
  TORCH_CHECK(b != nullptr, "fastgmmdiff CUDA emulation: a device function ran outside a kernel launch");
  return *b;
}
inline unsigned char* dynamic_smem() { return block().smem(); }

// One launch: checks the configuration like the hardware, then runs every block.
inline void run_grid(dim3 grid, dim3 blk, size_t smem, const void* kernel, const std::function<void()>& body) {
  ++stats().launches;
  const unsigned long long threads = 1ull * blk.x * blk.y * blk.z;
  size_t limit = kSmemDefault;
  const auto it = smem_limits().find(kernel);
  if (it != smem_limits().end()) limit = std::max(limit, it->second);
  const bool bad_config = threads == 0 || threads > kMaxThreads || blk.x > kMaxBlockXY || blk.y > kMaxBlockXY ||
                          blk.z > kMaxBlockZ || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
                          grid.x > kMaxGridX || grid.y > kMaxGridYZ || grid.z > kMaxGridYZ;
  if (bad_config || smem > limit) {
    ++stats().failed_launches;
    last_error() = bad_config ? kInvalidConfiguration : kInvalidValue;
    return;
  }
  stats().max_smem = std::max(stats().max_smem, smem);
  std::vector<unsigned char> buf(smem + 16);
  unsigned char* aligned = buf.data() + ((16 - reinterpret_cast<uintptr_t>(buf.data()) % 16) % 16);
  Block b(static_cast<unsigned>(threads));
  for (unsigned long long i = 0; i < 1ull * grid.x * grid.y * grid.z; ++i) {
    ++stats().blocks;
    std::memset(aligned, 0xFF, smem);
    const dim3 idx(static_cast<unsigned>(i % grid.x), static_cast<unsigned>((i / grid.x) % grid.y),
                   static_cast<unsigned>(i / (1ull * grid.x * grid.y)));
    b.run(body, idx, blk, grid, aligned);
  }
}

// kernel<<<grid, block, smem, stream>>>(args...): FGD_LAUNCH(...) builds one, the call runs it.
template <typename... P>
class Launch {
 public:
  Launch(dim3 grid, dim3 block, size_t smem, void (*kernel)(P...)) : grid_(grid), block_(block), smem_(smem), k_(kernel) {}

  template <typename... A>
  void operator()(A&&... args) const {
    std::tuple<P...> params(std::forward<A>(args)...);  // converted to the parameter types, as a launch does
    const std::function<void()> body = [&] { std::apply(k_, params); };
    run_grid(grid_, block_, smem_, reinterpret_cast<const void*>(k_), body);
  }

 private:
  dim3 grid_, block_;
  size_t smem_;
  void (*k_)(P...);
};

}  // namespace emu
}  // namespace fastgmmdiff

#define threadIdx (::fastgmmdiff::emu::block().thread_idx())
#define blockIdx (::fastgmmdiff::emu::block().block_idx())
#define blockDim (::fastgmmdiff::emu::block().block_dim())
#define gridDim (::fastgmmdiff::emu::block().grid_dim())

inline void __syncthreads() { ::fastgmmdiff::emu::block().barrier(); }

template <typename T>
inline T atomicAdd(T* address, T value) {  // one fiber runs at a time: a plain read-modify-write
  const T old = *address;
  *address = old + value;
  return old;
}
