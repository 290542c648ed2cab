// Small CUDA kernels for tests/test_simt_emulator.py, run on the CPU by kernels/simt_emulator.h.
// Built by that test with the system C++ compiler into a temporary shared library; every entry
// point returns 0, or 1 with the emulator's error message in `err`.
#include <cstring>
#include <string>

#include "simt_emulator.h"

namespace {

constexpr unsigned kFull = 0xffffffffu;

int report(const std::string& error, char* err, int err_len) {
  if (error.empty()) return 0;
  std::snprintf(err, static_cast<size_t>(err_len), "%s", error.c_str());
  return 1;
}

// --- block reduction: warp shuffles, then the warps' partial sums through shared memory ---
__global__ void block_sum_kernel(const float* in, int n, float* out) {
  __shared__ float partial[32];
  const int tid = threadIdx.x, i = blockIdx.x * blockDim.x + tid;
  float v = i < n ? in[i] : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(kFull, v, offset);
  if (tid % 32 == 0) partial[tid / 32] = v;
  __syncthreads();
  if (tid < 32) {
    const int warps = static_cast<int>(blockDim.x) / 32;
    float w = tid < warps ? partial[tid] : 0.0f;
    for (int mask = 16; mask > 0; mask /= 2) w += __shfl_xor_sync(kFull, w, mask);
    if (tid == 0) out[blockIdx.x] = w;
  }
}

// --- inclusive scan of one block (Hillis-Steele, double-buffered in shared memory) ---------
__global__ void scan_kernel(const int* in, int* out) {
  __shared__ int buffer[2][1024];
  const int tid = threadIdx.x, n = static_cast<int>(blockDim.x);
  int src = 0;
  buffer[src][tid] = in[tid];
  __syncthreads();
  for (int offset = 1; offset < n; offset *= 2) {
    const int v = buffer[src][tid] + (tid >= offset ? buffer[src][tid - offset] : 0);
    buffer[1 - src][tid] = v;
    src = 1 - src;
    __syncthreads();
  }
  out[tid] = buffer[src][tid];
}

// --- reversal through shared memory: correct only with the barrier ------------------------
__global__ void reverse_kernel(const int* in, int* out, int with_barrier) {
  __shared__ int s[256];
  const int tid = threadIdx.x;
  s[tid] = -1;
  __syncthreads();
  s[tid] = in[tid];
  if (with_barrier) __syncthreads();
  out[tid] = s[255 - tid];
}

// --- every warp primitive, one record of 10 ints per thread ------------------------------
__global__ void warp_ops_kernel(int* out) {
  const int tid = threadIdx.x, lane = tid % 32;
  const int v = 1000 * (tid / 32) + 3 * lane;
  int* r = out + 10 * tid;
  r[0] = __shfl_down_sync(kFull, v, 1);
  r[1] = __shfl_up_sync(kFull, v, 2);
  r[2] = __shfl_xor_sync(kFull, v, 5);
  r[3] = __shfl_sync(kFull, v, 7);
  r[4] = __shfl_down_sync(kFull, v, 3, 8);  // within segments of 8 lanes
  r[5] = static_cast<int>(__ballot_sync(kFull, lane % 3 == 0));
  r[6] = __any_sync(kFull, tid == 37);
  r[7] = __all_sync(kFull, tid < 40);
  // A half-warp operation: only the lanes of the mask take part.
  r[8] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, v, 1) : -7;
  const double d = 0.5 * tid;
  r[9] = static_cast<int>(4.0 * __shfl_down_sync(kFull, d, 4));  // a 64-bit value
}

// --- __syncthreads_count / _and / _or ----------------------------------------------------
__global__ void barrier_predicates_kernel(int* out) {
  const int tid = threadIdx.x;
  const int a = __syncthreads_count(tid % 3 == 0);
  const int b = __syncthreads_and(tid < 1000);
  const int c = __syncthreads_and(tid < 199);
  const int d = __syncthreads_or(tid == 150);
  const int e = __syncthreads_or(0);
  if (tid == 0) {
    out[0] = a, out[1] = b, out[2] = c, out[3] = d, out[4] = e;
  }
}

// --- atomics: a histogram (exact), and the order in which blocks ran ----------------------
__global__ void histogram_kernel(const int* in, int n, int* hist, int bins) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) atomicAdd(&hist[((in[i] % bins) + bins) % bins], 1);
}

__global__ void block_order_kernel(int* counter, int* order) {
  if (threadIdx.x == 0 && threadIdx.y == 0) order[atomicAdd(counter, 1)] = blockIdx.x + 100 * blockIdx.y;
}

// --- misuse the emulator must report --------------------------------------------------------
__global__ void divergent_barrier_kernel() {
  if (threadIdx.x < 16) __syncthreads();
}

__global__ void returned_lanes_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(kFull, static_cast<int>(threadIdx.x), 1);
}

__global__ void mismatched_shuffles_kernel(int* out) {
  const int v = static_cast<int>(threadIdx.x);
  out[threadIdx.x] = threadIdx.x < 16 ? __shfl_down_sync(kFull, v, 1) : __shfl_xor_sync(kFull, v, 1);
}

__global__ void barrier_versus_warp_kernel(int* out) {
  const int v = static_cast<int>(threadIdx.x);
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(kFull, v, 1);
  } else {
    __syncthreads();
  }
}

}  // namespace

#define EXPORT extern "C" __attribute__((visibility("default")))

EXPORT int block_sum(uint64_t seed, const float* in, int n, int threads, float* out, char* err, int len) {
  const unsigned blocks = static_cast<unsigned>((n + threads - 1) / threads);
  return report(simt::launch(dim3(blocks), dim3(threads), seed, block_sum_kernel, in, n, out), err, len);
}

EXPORT int inclusive_scan(uint64_t seed, const int* in, int n, int* out, char* err, int len) {
  return report(simt::launch(dim3(1), dim3(n), seed, scan_kernel, in, out), err, len);
}

EXPORT int reverse(uint64_t seed, const int* in, int* out, int with_barrier, char* err, int len) {
  return report(simt::launch(dim3(1), dim3(256), seed, reverse_kernel, in, out, with_barrier), err, len);
}

EXPORT int warp_ops(uint64_t seed, int* out, char* err, int len) {
  return report(simt::launch(dim3(1), dim3(64), seed, warp_ops_kernel, out), err, len);
}

EXPORT int barrier_predicates(uint64_t seed, int* out, char* err, int len) {
  return report(simt::launch(dim3(1), dim3(200), seed, barrier_predicates_kernel, out), err, len);
}

EXPORT int histogram(uint64_t seed, const int* in, int n, int* hist, int bins, char* err, int len) {
  const unsigned blocks = static_cast<unsigned>((n + 127) / 128);
  return report(simt::launch(dim3(blocks), dim3(128), seed, histogram_kernel, in, n, hist, bins), err, len);
}

EXPORT int block_order(uint64_t seed, int gx, int gy, int* order, char* err, int len) {
  int counter = 0;
  return report(simt::launch(dim3(gx, gy), dim3(8, 4), seed, block_order_kernel, &counter, order), err, len);
}

// Runs one of the misuse kernels by name; returns 1 with the error (0 would be a miss).
EXPORT int misuse(uint64_t seed, const char* name, char* err, int len) {
  int scratch[64] = {};
  std::string e;
  if (!std::strcmp(name, "divergent_barrier")) e = simt::launch(dim3(1), dim3(64), seed, divergent_barrier_kernel);
  else if (!std::strcmp(name, "returned_lanes")) e = simt::launch(dim3(1), dim3(32), seed, returned_lanes_kernel, scratch);
  else if (!std::strcmp(name, "mismatched_shuffles")) e = simt::launch(dim3(1), dim3(32), seed, mismatched_shuffles_kernel, scratch);
  else if (!std::strcmp(name, "barrier_versus_warp")) e = simt::launch(dim3(1), dim3(64), seed, barrier_versus_warp_kernel, scratch);
  else e = std::string("no misuse kernel named ") + name;
  return report(e, err, len);
}
