// The SIMT emulator's scheduler (simt_emulator.h; docs/architecture.md §9): the threads of a
// block as execution contexts (simt_context.h), barriers and warp rendezvous, the seeded
// choice of the next thread, the launch over a grid. Kernels use the CUDA names of
// simt_emulator.h, which call into this.
#pragma once

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "simt_context.h"

namespace simt {

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 1024;
constexpr size_t kStackBytes = 64 * 1024;

namespace detail {

// --- per-OS-thread emulator state ---------------------------------------------------------

enum class State : uint8_t { kRunnable, kBarrier, kWarp, kExited };
enum class Barrier : uint8_t { kPlain, kCount, kAnd, kOr };
enum class WarpOp : uint8_t { kIdx, kUp, kDown, kXor, kBallot, kAny, kAll, kSync };

inline const char* warp_op_name(WarpOp op) {
  switch (op) {
    case WarpOp::kIdx: return "__shfl_sync";
    case WarpOp::kUp: return "__shfl_up_sync";
    case WarpOp::kDown: return "__shfl_down_sync";
    case WarpOp::kXor: return "__shfl_xor_sync";
    case WarpOp::kBallot: return "__ballot_sync";
    case WarpOp::kAny: return "__any_sync";
    case WarpOp::kAll: return "__all_sync";
    case WarpOp::kSync: return "__syncwarp";
  }
  return "?";
}

struct Thread {
  Context ctx;
  uint3 idx;
  int linear, warp, lane;
  State state;
  Barrier barrier;
  int predicate, barrier_result;
  WarpOp op;
  uint32_t mask;
  int param, width;
  uint64_t value, result;
};

struct Body {
  void (*call)(void*);
  void* arg;
};

class Emulator {
 public:
  Emulator() = default;
  Emulator(const Emulator&) = delete;
  Emulator& operator=(const Emulator&) = delete;
  ~Emulator() {
    if (stacks_ != nullptr) munmap(stacks_, slot_bytes_ * slots_);
  }

  // Runs every block of the grid; returns "" or the first error.
  std::string run(dim3 grid, dim3 block, uint64_t seed, Body body);

  // The running thread (valid inside a kernel only).
  Thread& self() { return threads_[current_]; }
  const uint3& block_idx() const { return block_idx_; }
  const dim3& block_dim() const { return block_dim_; }
  const dim3& grid_dim() const { return grid_dim_; }

  void sync_block(Barrier kind, int predicate);
  uint64_t warp_op(WarpOp op, uint32_t mask, uint64_t value, int param, int width);
  [[noreturn]] void fail(const std::string& message);

 private:
  static void entry();
  bool reserve(int threads);
  std::string run_block(uint64_t rng_seed);
  std::string where(const Thread& t) const;
  // Suspends the running thread: switches to the next one, or to the scheduler (block done,
  // deadlock or error).
  void yield() { dispatch(self().ctx); }
  void dispatch(Context& from);
  void release_barrier();
  void complete_warp_op(int warp, uint32_t lanes);
  // A waiting warp operation of t's warp that names t (which t must reach first), or null.
  const Thread* awaited_by(const Thread& t) const {
    for (uint32_t m = warp_waiting_[t.warp]; m != 0; m &= m - 1) {
      const Thread& other = threads_[t.warp * kWarpSize + std::countr_zero(m)];
      if ((other.mask >> t.lane) & 1u) return &other;
    }
    return nullptr;
  }
  uint64_t next_random() {  // xorshift64*
    rng_ ^= rng_ >> 12;
    rng_ ^= rng_ << 25;
    rng_ ^= rng_ >> 27;
    return rng_ * 0x2545F4914F6CDD1Dull;
  }

  char* stacks_ = nullptr;
  size_t slot_bytes_ = 0;
  int slots_ = 0;
#if defined(GEM_SIMT_UCONTEXT)
  ucontext_t blank_{};
#endif
  std::vector<Thread> threads_;
  std::vector<int> runnable_;
  uint32_t warp_waiting_[kMaxThreads / kWarpSize] = {};  // lanes waiting at a warp operation
  uint32_t warp_lanes_[kMaxThreads / kWarpSize] = {};    // lanes that exist in the block
  uint32_t warp_exited_[kMaxThreads / kWarpSize] = {};   // lanes that have returned
  Context scheduler_;
  int current_ = 0, num_threads_ = 0, at_barrier_ = 0, exited_ = 0;
  uint64_t rng_ = 1;
  uint3 block_idx_{0, 0, 0};
  dim3 block_dim_, grid_dim_;
  Body body_{};
  std::string error_;
};

inline Emulator*& current_emulator() {
  static thread_local Emulator* emulator = nullptr;
  return emulator;
}

inline Emulator& active() {
  Emulator* e = current_emulator();
  if (e == nullptr) std::abort();  // a device intrinsic called outside simt::launch
  return *e;
}

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline bool Emulator::reserve(int threads) {
  if (threads <= slots_) return true;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  const size_t slot = kStackBytes + page;  // the lowest page of each slot is a guard page
  void* memory = mmap(nullptr, slot * threads, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (memory == MAP_FAILED) return false;
  for (int i = 0; i < threads; ++i) mprotect(static_cast<char*>(memory) + i * slot, page, PROT_NONE);
  if (stacks_ != nullptr) munmap(stacks_, slot_bytes_ * slots_);
  stacks_ = static_cast<char*>(memory);
  slot_bytes_ = slot;
  slots_ = threads;
#if defined(GEM_SIMT_UCONTEXT)
  getcontext(&blank_);
#endif
  return true;
}

inline void Emulator::entry() {
  Emulator& e = active();
  e.body_.call(e.body_.arg);
  Thread& t = e.self();
  if (const Thread* waiting = e.awaited_by(t)) {  // a warp operation it will never reach
    e.error_ = e.where(t) + ": returned while lanes of its warp wait for it at " +
               warp_op_name(waiting->op);
  }
  t.state = State::kExited;
  ++e.exited_;
  e.warp_exited_[t.warp] |= 1u << t.lane;
  e.dispatch(t.ctx);
  std::abort();  // an exited context is never resumed
}

inline std::string Emulator::where(const Thread& t) const {
  return "block (" + std::to_string(block_idx_.x) + "," + std::to_string(block_idx_.y) + "," +
         std::to_string(block_idx_.z) + ") thread (" + std::to_string(t.idx.x) + "," +
         std::to_string(t.idx.y) + "," + std::to_string(t.idx.z) + ")";
}

inline void Emulator::fail(const std::string& message) {
  if (error_.empty()) error_ = where(self()) + ": " + message;
  for (;;) yield();  // the scheduler abandons the block and never resumes this context
}

inline void Emulator::sync_block(Barrier kind, int predicate) {
  Thread& t = self();
  if (const Thread* waiting = awaited_by(t))
    fail(std::string("reached __syncthreads while lanes of its warp wait for it at ") +
         warp_op_name(waiting->op));
  t.state = State::kBarrier;
  t.barrier = kind;
  t.predicate = predicate != 0;
  ++at_barrier_;
  yield();
}

inline uint64_t Emulator::warp_op(WarpOp op, uint32_t mask, uint64_t value, int param, int width) {
  Thread& t = self();
  const uint32_t bit = 1u << t.lane;
  if (!(mask & bit)) fail(std::string(warp_op_name(op)) + " called by a lane outside its mask");
  if (width < 1 || width > kWarpSize || (width & (width - 1)) != 0)
    fail(std::string(warp_op_name(op)) + " with width " + std::to_string(width) +
         " (must be a power of two <= 32)");
  const uint32_t lanes = mask;  // every lane named in the mask must take part
  if (lanes & ~warp_lanes_[t.warp])
    fail(std::string(warp_op_name(op)) + " names lanes that do not exist in this block");
  if (lanes & warp_exited_[t.warp])
    fail(std::string(warp_op_name(op)) + " names lanes that have already returned");
  for (uint32_t m = lanes; m != 0; m &= m - 1) {
    if (threads_[t.warp * kWarpSize + std::countr_zero(m)].state == State::kBarrier)
      fail(std::string(warp_op_name(op)) + " names lanes that wait at __syncthreads");
  }
  t.state = State::kWarp;
  t.op = op;
  t.mask = mask;
  t.value = value;
  t.param = param;
  t.width = width;
  warp_waiting_[t.warp] |= bit;
  if ((warp_waiting_[t.warp] & lanes) == lanes) complete_warp_op(t.warp, lanes);
  yield();
  return t.result;
}

inline void Emulator::complete_warp_op(int warp, uint32_t lanes) {
  Thread* lane0 = &threads_[warp * kWarpSize];
  const Thread& me = self();
  for (uint32_t m = lanes; m != 0; m &= m - 1) {
    const Thread& other = lane0[std::countr_zero(m)];
    if (other.op != me.op || other.mask != me.mask || other.width != me.width)
      fail(std::string("lanes of warp ") + std::to_string(warp) + " disagree: " +
           warp_op_name(me.op) + " with mask " + std::to_string(me.mask) + " vs " +
           warp_op_name(other.op) + " with mask " + std::to_string(other.mask));
  }
  uint32_t ballot = 0;
  for (uint32_t m = lanes; m != 0; m &= m - 1) {
    const int l = std::countr_zero(m);
    ballot |= static_cast<uint32_t>(lane0[l].value != 0) << l;
  }
  for (uint32_t m = lanes; m != 0; m &= m - 1) {
    const int l = std::countr_zero(m);
    Thread& t = lane0[l];
    const int w = t.width, seg = l & ~(w - 1);  // first lane of this lane's width-segment
    int src = l;
    switch (t.op) {
      case WarpOp::kIdx: src = seg + (t.param & (w - 1)); break;
      case WarpOp::kUp: src = (l - seg) >= t.param ? l - t.param : l; break;
      case WarpOp::kDown: src = (l - seg) + t.param < w ? l + t.param : l; break;
      case WarpOp::kXor: {
        const int x = l ^ t.param;
        src = (x >= 0 && x < seg + w && x < kWarpSize) ? x : l;
        break;
      }
      default: break;
    }
    switch (t.op) {
      case WarpOp::kBallot: t.result = ballot; break;
      case WarpOp::kAny: t.result = ballot != 0; break;
      case WarpOp::kAll: t.result = ballot == lanes; break;
      case WarpOp::kSync: t.result = 0; break;
      default:
        if (!((lanes >> src) & 1u))
          fail(std::string(warp_op_name(t.op)) + ": lane " + std::to_string(l) +
               " reads lane " + std::to_string(src) + ", which is not in the mask");
        t.result = lane0[src].value;
    }
    t.state = State::kRunnable;
    runnable_.push_back(t.linear);
  }
  warp_waiting_[warp] &= ~lanes;
}

inline std::string Emulator::run_block(uint64_t rng_seed) {
  rng_ = splitmix64(rng_seed) | 1u;
  runnable_.clear();
  at_barrier_ = exited_ = 0;
  for (int w = 0; w < kMaxThreads / kWarpSize; ++w) {
    warp_waiting_[w] = warp_exited_[w] = 0;
    const int exists = std::max(0, std::min(kWarpSize, num_threads_ - w * kWarpSize));
    warp_lanes_[w] = exists == kWarpSize ? ~0u : ((1u << exists) - 1u);
  }
  for (int i = 0; i < num_threads_; ++i) {
    Thread& t = threads_[i];
    t.state = State::kRunnable;
    char* stack = stacks_ + i * slot_bytes_ + (slot_bytes_ - kStackBytes);
#if defined(GEM_SIMT_UCONTEXT)
    init_context(t.ctx, blank_, stack, kStackBytes, &Emulator::entry);
#else
    init_context(t.ctx, stack, kStackBytes, &Emulator::entry);
#endif
    runnable_.push_back(i);
  }
  dispatch(scheduler_);  // runs the block; back here when it is done, stuck or failed
  if (!error_.empty()) return error_;
  if (exited_ == num_threads_) return "";
  std::string lanes;
  for (int w = 0; w * kWarpSize < num_threads_; ++w) {
    if (warp_waiting_[w] == 0) continue;
    char mask[16];
    std::snprintf(mask, sizeof mask, "%08x", warp_waiting_[w]);
    lanes += std::string(" warp ") + std::to_string(w) + " lanes 0x" + mask + " wait at " +
             warp_op_name(threads_[w * kWarpSize + std::countr_zero(warp_waiting_[w])].op) + ";";
  }
  return "block (" + std::to_string(block_idx_.x) + "," + std::to_string(block_idx_.y) + "," +
         std::to_string(block_idx_.z) + "): deadlock: " + std::to_string(at_barrier_) +
         " threads wait at __syncthreads, " + std::to_string(exited_) + " returned;" + lanes;
}

inline void Emulator::dispatch(Context& from) {
  if (runnable_.empty() && error_.empty()) release_barrier();
  if (!runnable_.empty() && error_.empty()) {
    const size_t n = runnable_.size();
    const size_t pick = static_cast<size_t>((static_cast<unsigned __int128>(next_random()) * n) >> 64);
    const int next = runnable_[pick];
    runnable_[pick] = runnable_.back();
    runnable_.pop_back();
    Context& to = threads_[next].ctx;
    current_ = next;
    if (&to != &from) switch_context(from, to);
    return;
  }
  if (&from != &scheduler_) switch_context(from, scheduler_);
}

// When every thread that has not returned waits at __syncthreads: releases them, or reports
// returned threads (a barrier in divergent code) or a mix of barrier kinds.
inline void Emulator::release_barrier() {
  if (at_barrier_ == 0 || at_barrier_ + exited_ != num_threads_) return;
  if (exited_ > 0) {
    error_ = "block (" + std::to_string(block_idx_.x) + "," + std::to_string(block_idx_.y) + "," +
             std::to_string(block_idx_.z) + "): " + std::to_string(exited_) +
             " threads returned while " + std::to_string(at_barrier_) +
             " wait at __syncthreads (a barrier in divergent code)";
    return;
  }
  int count = 0;
  const Barrier kind = threads_[0].barrier;
  for (int i = 0; i < num_threads_; ++i) {
    count += threads_[i].predicate;
    if (threads_[i].barrier != kind) {
      error_ = where(threads_[i]) + ": threads of one block wait at different kinds of "
                                    "__syncthreads (_count/_and/_or)";
      return;
    }
  }
  const int result = kind == Barrier::kCount ? count
                     : kind == Barrier::kAnd ? (count == num_threads_)
                     : kind == Barrier::kOr  ? (count > 0)
                                             : 0;
  for (int i = 0; i < num_threads_; ++i) {
    threads_[i].barrier_result = result;
    threads_[i].state = State::kRunnable;
    runnable_.push_back(i);
  }
  at_barrier_ = 0;
}

inline std::string Emulator::run(dim3 grid, dim3 block, uint64_t seed, Body body) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (block.x == 0 || block.y == 0 || block.z == 0 || threads > kMaxThreads)
    return "simt::launch: invalid block size (" + std::to_string(block.x) + "," +
           std::to_string(block.y) + "," + std::to_string(block.z) + ")";
  if (grid.x == 0 || grid.y == 0 || grid.z == 0)
    return "simt::launch: invalid grid size (a dimension is 0)";
  if (current_emulator() != nullptr) return "simt::launch: a launch from inside a kernel";
  if (!reserve(static_cast<int>(threads))) return "simt::launch: could not map thread stacks";
  num_threads_ = static_cast<int>(threads);
  threads_.resize(num_threads_);
  for (int i = 0; i < num_threads_; ++i) {
    Thread& t = threads_[i];
    t.linear = i;
    t.warp = i / kWarpSize;
    t.lane = i % kWarpSize;
    t.idx = {static_cast<unsigned>(i) % block.x, (static_cast<unsigned>(i) / block.x) % block.y,
             static_cast<unsigned>(i) / (block.x * block.y)};
  }
  block_dim_ = block;
  grid_dim_ = grid;
  body_ = body;
  error_.clear();
  // The blocks in an order shuffled by the seed (Fisher-Yates).
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  std::vector<uint64_t> order(blocks);
  for (uint64_t i = 0; i < blocks; ++i) order[i] = i;
  rng_ = splitmix64(seed ^ 0x5151u) | 1u;
  for (uint64_t i = blocks; i > 1; --i) std::swap(order[i - 1], order[next_random() % i]);
  current_emulator() = this;
  std::string result;
  for (uint64_t b : order) {
    block_idx_ = {static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                  static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    result = run_block(splitmix64(seed) ^ splitmix64(b + 1));
    if (!result.empty()) break;
  }
  current_emulator() = nullptr;
  return result;
}

inline Emulator& thread_emulator() {
  static thread_local Emulator emulator;
  return emulator;
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type over 64 bits");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

}  // namespace detail

// Runs kernel(args...) over `grid` x `block` threads; returns "" or an error message.
template <typename... Params, typename... Args>
std::string launch(dim3 grid, dim3 block, uint64_t seed, void (*kernel)(Params...),
                   Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "simt::launch: wrong number of arguments");
  struct Closure {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...> params;
    static void call(void* self) {
      auto* c = static_cast<Closure*>(self);
      std::apply(c->kernel, c->params);  // each thread gets its own copies of the parameters
    }
  } closure{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
  return detail::thread_emulator().run(grid, block, seed, {&Closure::call, &closure});
}

// The seed in the environment variable `name` (decimal or 0x-hex) into *seed, `fallback` when
// it is unset or empty; false (with *seed untouched) when it is not such a number.
inline bool seed_from_env(const char* name, uint64_t fallback, uint64_t* seed) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') {
    *seed = fallback;
    return true;
  }
  char* end = nullptr;
  errno = 0;
  const unsigned long long v = std::strtoull(text, &end, 0);
  if (errno != 0 || end == text || *end != '\0' || *text == '-') return false;
  *seed = static_cast<uint64_t>(v);
  return true;
}

}  // namespace simt
