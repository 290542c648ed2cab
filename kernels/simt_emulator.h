// A small SIMT emulator: runs a CUDA __global__ function on the CPU, thread by thread
// (docs/architecture.md §9). C++20, header only, no dependency beyond libc.
//
// A .cu file written for nvcc compiles as C++ against this header (define the kernel's
// launch through simt::launch instead of <<<...>>>); kernels/blend_cuda_emulated.cc does so
// for the rasterizer's CUDA kernel, so that CI, which has no GPU, runs that kernel's own code.
//
// Model (what a GPU guarantees, and no more):
//  * A launch runs the blocks of the grid one after another, in an order shuffled by `seed`.
//  * Every thread of a block has its own execution context (its own stack, 64 KiB, with a
//    guard page; contexts and stacks are allocated once per OS thread and reused). A thread
//    runs until it reaches a synchronisation point, then a scheduler picks the next thread
//    among the runnable ones at random (from `seed`). So between two barriers the threads of
//    a block run in a shuffled order, and a missing barrier or a race between threads shows
//    up as a difference between two seeds.
//  * __syncthreads() (and _count/_and/_or) releases the block when every thread of it has
//    arrived. A barrier that some threads never reach (divergent code, a thread that returned
//    early) is reported as an error, as is a mix of barrier kinds.
//  * Warp operations (__shfl_*_sync, __ballot_sync, __any_sync, __all_sync, __syncwarp) are
//    rendezvous of the lanes named in their mask (32 lanes = one warp of consecutive linear
//    thread ids): every lane deposits its value and waits until all of them have arrived
//    before any reads (independent thread scheduling, Volta and later). Lanes of one
//    operation that disagree on the operation or its mask, a lane outside its own mask, or a
//    read from a lane that does not take part are reported as errors (undefined on a GPU).
//  * __shared__ is `static thread_local`: one instance per OS thread, shared by the block's
//    threads (which all run on that OS thread). Its contents are undefined at block start.
//  * atomicAdd & co. are std::atomic_ref operations; __ldg is a plain load.
// Errors (deadlock, divergence, misuse) abandon the launch and come back as a message from
// simt::launch, never as an abort.
//
// Build shared libraries that include this header with hidden visibility
// (-fvisibility=hidden -fvisibility-inlines-hidden): its inline functions and thread-local
// state must not be interposed between two such libraries loaded into one process.
//
// Three headers: this one (the CUDA names a kernel uses), simt_scheduler.h (blocks, barriers,
// warp rendezvous, launch) and simt_context.h (execution contexts and the switch between
// them). Context switches go directly from the thread that reaches a synchronisation point to
// the next one (the choice is made on the yielding thread's stack).
#pragma once

#include <atomic>

#include "simt_scheduler.h"

// --- the CUDA names ------------------------------------------------------------------------

using simt::dim3;
using simt::uint3;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static thread_local

#define threadIdx (::simt::detail::active().self().idx)
#define blockIdx (::simt::detail::active().block_idx())
#define blockDim (::simt::detail::active().block_dim())
#define gridDim (::simt::detail::active().grid_dim())
constexpr int warpSize = simt::kWarpSize;

inline void __syncthreads() {
  simt::detail::active().sync_block(simt::detail::Barrier::kPlain, 0);
}
inline int __syncthreads_count(int predicate) {
  auto& e = simt::detail::active();
  e.sync_block(simt::detail::Barrier::kCount, predicate);
  return e.self().barrier_result;
}
inline int __syncthreads_and(int predicate) {
  auto& e = simt::detail::active();
  e.sync_block(simt::detail::Barrier::kAnd, predicate);
  return e.self().barrier_result;
}
inline int __syncthreads_or(int predicate) {
  auto& e = simt::detail::active();
  e.sync_block(simt::detail::Barrier::kOr, predicate);
  return e.self().barrier_result;
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  simt::detail::active().warp_op(simt::detail::WarpOp::kSync, mask, 0, 0, warpSize);
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
  return static_cast<unsigned>(simt::detail::active().warp_op(simt::detail::WarpOp::kBallot, mask,
                                                              predicate != 0, 0, warpSize));
}
inline int __any_sync(unsigned mask, int predicate) {
  return static_cast<int>(
      simt::detail::active().warp_op(simt::detail::WarpOp::kAny, mask, predicate != 0, 0, warpSize));
}
inline int __all_sync(unsigned mask, int predicate) {
  return static_cast<int>(
      simt::detail::active().warp_op(simt::detail::WarpOp::kAll, mask, predicate != 0, 0, warpSize));
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  return simt::detail::from_bits<T>(simt::detail::active().warp_op(
      simt::detail::WarpOp::kIdx, mask, simt::detail::to_bits(var), src_lane, width));
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return simt::detail::from_bits<T>(simt::detail::active().warp_op(
      simt::detail::WarpOp::kUp, mask, simt::detail::to_bits(var), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  return simt::detail::from_bits<T>(simt::detail::active().warp_op(
      simt::detail::WarpOp::kDown, mask, simt::detail::to_bits(var), static_cast<int>(delta), width));
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  return simt::detail::from_bits<T>(simt::detail::active().warp_op(
      simt::detail::WarpOp::kXor, mask, simt::detail::to_bits(var), lane_mask, width));
}

template <typename T>
T atomicAdd(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_add(value, std::memory_order_relaxed);
}
template <typename T>
T atomicSub(T* address, T value) {
  return std::atomic_ref<T>(*address).fetch_sub(value, std::memory_order_relaxed);
}
template <typename T>
T atomicExch(T* address, T value) {
  return std::atomic_ref<T>(*address).exchange(value, std::memory_order_relaxed);
}
template <typename T>
T atomicCAS(T* address, T compare, T value) {
  std::atomic_ref<T>(*address).compare_exchange_strong(compare, value, std::memory_order_relaxed);
  return compare;
}
namespace simt::detail {
// Stores `value` at `address` while replace(old, value) holds; returns the old value.
template <typename T, typename Replace>
T atomic_replace_if(T* address, T value, Replace replace) {
  std::atomic_ref<T> ref(*address);
  T old = ref.load(std::memory_order_relaxed);
  while (replace(old, value) && !ref.compare_exchange_weak(old, value, std::memory_order_relaxed)) {
  }
  return old;
}
}  // namespace simt::detail
template <typename T>
T atomicMax(T* address, T value) {
  return simt::detail::atomic_replace_if(address, value, [](T old, T v) { return old < v; });
}
template <typename T>
T atomicMin(T* address, T value) {
  return simt::detail::atomic_replace_if(address, value, [](T old, T v) { return v < old; });
}

template <typename T>
T __ldg(const T* address) {
  return *address;
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
