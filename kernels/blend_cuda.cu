// CUDA blending kernel of the tile rasterizer, forward and backward (docs/architecture.md §9),
// with its XLA FFI handlers. One source, two compilers:
//  * nvcc builds libgem_jax_blend_cuda (FFI platform "CUDA", handlers GemBlend*Cuda);
//  * a C++20 compiler builds it against kernels/simt_emulator.h when GEM_SIMT_EMULATOR is
//    defined (kernels/blend_cuda_emulated.cc): libgem_jax_blend_cuda_emulated, an FFI CPU
//    target (handlers GemBlend*CudaEmulated) that runs these kernels thread by thread, so
//    that CI, without a GPU, tests this file's own logic (rasterize(..., "cuda-emulated")).
// Only the launch, the zero fill and the stream differ between the two (preprocessor below).
//
// Per-pixel math: blend_math.h, shared with the CPU kernel (same constants, skip/stop rules;
// built with -fmad=false / -ffp-contract=off so that the forward and the backward take the
// same decisions, and the GPU and the emulator give the same forward bits).
//
// Forward: one block per 16x16 tile (and batch element), one thread per pixel. The tile's
// list (gaussian_ids[start:end), sorted by depth) is staged through shared memory in batches
// of 256, each thread loading one entry; the block stops early once every pixel has stopped
// (__syncthreads_count). Outputs image, alpha, depth, the final transmittance and the rank
// (1 + index in the tile's list) of each pixel's last contributor, which the backward needs.
//
// Backward (3DGS / gsplat): each pixel walks back to front from its last contributor,
// un-blending T and accumulating the colour/depth behind; each Gaussian's 10 gradient terms
// are summed over the 32 pixels of a warp (a reduce-scatter of __shfl_xor_sync) and added to
// the outputs with one atomicAdd per term per warp, from 10 different lanes (warps where no
// pixel hits the Gaussian skip all of it: __any_sync).
// The order of those atomic additions varies from run to run: gradients are equal to
// float32 rounding, not bit-identical (docs/decisions.md, "CUDA blending kernel").
//
// The handlers allocate nothing, never synchronise and only enqueue a memset and a kernel on
// XLA's stream, so they are safe in CUDA graphs (declared kCmdBufferCompatible); errors come
// back as ffi::Error.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

#include "blend_math.h"
#include "ffi_blend_args.h"
#include "xla/ffi/api/ffi.h"

#if defined(GEM_SIMT_EMULATOR)
#include "simt_emulator.h"
#else
#include <cuda_runtime.h>
#endif

namespace gem {
namespace cuda {

constexpr int kThreads = kTileSize * kTileSize;  // one block = one tile, one thread per pixel
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// One batch of a tile's list in shared memory, structure of arrays.
struct Staged {
  int32_t id[kThreads];
  float mx[kThreads], my[kThreads], a[kThreads], b[kThreads], c[kThreads], o[kThreads];
  float cr[kThreads], cg[kThreads], cb[kThreads], z[kThreads];
};

// Entry k of the list into slot `slot`. An id outside [0, N) gets opacity 0 (never passes).
__device__ __forceinline__ void stage(const Scene& s, int64_t k, int slot, Staged& st) {
  const int32_t id = __ldg(s.ids + k);
  const bool ok = id >= 0 && id < s.n;
  const int64_t g = ok ? id : 0;
  st.id[slot] = ok ? id : -1;
  st.mx[slot] = ok ? __ldg(s.means2d + 2 * g) : 0.0f;
  st.my[slot] = ok ? __ldg(s.means2d + 2 * g + 1) : 0.0f;
  st.a[slot] = ok ? __ldg(s.conics + 3 * g) : 0.0f;
  st.b[slot] = ok ? __ldg(s.conics + 3 * g + 1) : 0.0f;
  st.c[slot] = ok ? __ldg(s.conics + 3 * g + 2) : 0.0f;
  st.o[slot] = ok ? __ldg(s.opacities + g) : 0.0f;
  st.cr[slot] = ok ? __ldg(s.colors + 3 * g) : 0.0f;
  st.cg[slot] = ok ? __ldg(s.colors + 3 * g + 1) : 0.0f;
  st.cb[slot] = ok ? __ldg(s.colors + 3 * g + 2) : 0.0f;
  st.z[slot] = ok ? __ldg(s.depths + g) : 0.0f;
}

// [start, end) of a tile's intersections, clamped into [0, M].
__device__ __forceinline__ void tile_span(const Scene& s, int64_t tile, int64_t* start, int64_t* end) {
  int64_t lo = s.ranges[2 * tile], hi = s.ranges[2 * tile + 1];
  lo = lo < 0 ? 0 : (lo > s.m ? s.m : lo);
  hi = hi < lo ? lo : (hi > s.m ? s.m : hi);
  *start = lo;
  *end = hi;
}

// This thread's pixel in the block's tile.
struct Pixel {
  int x, y;
  bool inside;
  int64_t q;  // y * W + x
  float fx, fy;  // pixel centre
};

__device__ __forceinline__ Pixel pixel_of(const Scene& s, int64_t tile) {
  Pixel p;
  p.x = static_cast<int>(tile % s.tiles_x) * kTileSize + static_cast<int>(threadIdx.x);
  p.y = static_cast<int>(tile / s.tiles_x) * kTileSize + static_cast<int>(threadIdx.y);
  p.inside = p.x < s.width && p.y < s.height;
  p.q = static_cast<int64_t>(p.y) * s.width + p.x;
  p.fx = static_cast<float>(p.x) + 0.5f;
  p.fy = static_cast<float>(p.y) + 0.5f;
  return p;
}

__global__ void __launch_bounds__(kThreads)
    forward_kernel(Scene scene0, ForwardOut out0, int64_t tiles, int64_t hw) {
  __shared__ Staged st;
  const int64_t tile = blockIdx.x, batch = blockIdx.y;
  const Scene s = batch_element(scene0, batch, tiles);
  const int tid = static_cast<int>(threadIdx.y) * kTileSize + static_cast<int>(threadIdx.x);
  const Pixel p = pixel_of(s, tile);
  int64_t start, end;
  tile_span(s, tile, &start, &end);
  float T = 1.0f, c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, d = 0.0f;
  int32_t last = 0;
  bool live = p.inside;  // out-of-image threads stay to stage entries and meet the barriers
  for (int64_t k0 = start; k0 < end; k0 += kThreads) {
    // Every thread is done with the previous batch; stop when no pixel is live.
    if (__syncthreads_count(live) == 0) break;
    const int count = end - k0 < kThreads ? static_cast<int>(end - k0) : kThreads;
    if (tid < count) stage(s, k0 + tid, tid, st);
    __syncthreads();
    for (int i = 0; live && i < count; ++i) {
      const float dx = st.mx[i] - p.fx, dy = st.my[i] - p.fy;
      const float sigma = gaussian_sigma(st.a[i], st.b[i], st.c[i], dx, dy);
      float vis;
      const float raw = raw_alpha(st.o[i], sigma, &vis);
      const float alpha = clamp_alpha(raw);
      float w;
      if (blend_forward_step(alpha, alpha_passes(sigma, raw), &live, T, &w)) {
        T *= 1.0f - alpha;
        c0 += w * st.cr[i];
        c1 += w * st.cg[i];
        c2 += w * st.cb[i];
        d += w * st.z[i];
        last = static_cast<int32_t>(k0 + i - start + 1);
      }
    }
  }
  if (p.inside) {
    const ForwardOut out = batch_element(out0, batch, hw);
    out.image[3 * p.q] = c0 + T * s.background[0];
    out.image[3 * p.q + 1] = c1 + T * s.background[1];
    out.image[3 * p.q + 2] = c2 + T * s.background[2];
    out.alpha[p.q] = 1.0f - T;
    out.depth[p.q] = d;
    out.transmittance[p.q] = T;
    out.last[p.q] = last;
  }
}

// The largest `v` of the block (every thread gets it). Uses `scratch` (kWarps ints of
// shared memory) and one barrier.
__device__ __forceinline__ int block_max(int v, int* scratch) {
  for (int lanes = 16; lanes > 0; lanes /= 2) {
    const int other = __shfl_xor_sync(kFullMask, v, lanes);
    v = other > v ? other : v;
  }
  const int tid = static_cast<int>(threadIdx.y) * kTileSize + static_cast<int>(threadIdx.x);
  if (tid % 32 == 0) scratch[tid / 32] = v;
  __syncthreads();
  int best = scratch[0];
  for (int w = 1; w < kWarps; ++w) best = scratch[w] > best ? scratch[w] : best;
  return best;
}

// One step of warp_reduce_scatter: keep values [0, kHalf) or [kHalf, 2 kHalf) (by lane bit
// 2 kHalf), plus the partner lane's copy of them, in v[0, kHalf).
template <int kHalf>
__device__ __forceinline__ void reduce_scatter_step(float (&v)[16], int lane, int* term) {
  const bool upper = (lane & (2 * kHalf)) != 0;
  for (int i = 0; i < kHalf; ++i) {  // a constant trip count: unrolled, v stays in registers
    const float keep = upper ? v[kHalf + i] : v[i];
    const float send = upper ? v[i] : v[kHalf + i];
    v[i] = keep + __shfl_xor_sync(kFullMask, send, 2 * kHalf);
  }
  *term += upper ? kHalf : 0;
}

// Sums each of 16 values (the kGradWidth gradient terms, zero-padded) over the 32 lanes of a
// warp by a butterfly reduce-scatter: at each step a lane keeps half of its values, adds the
// partner's copy of that half (__shfl_xor_sync) and drops the other half, so 8+4+2+1+1 = 16
// shuffles instead of 16 x 5 for one tree per value. Afterwards lanes 2t and 2t + 1 hold the
// warp's sum of value t in v[0]; returns t.
__device__ __forceinline__ int warp_reduce_scatter(float (&v)[16], int lane) {
  int term = 0;
  reduce_scatter_step<8>(v, lane, &term);
  reduce_scatter_step<4>(v, lane, &term);
  reduce_scatter_step<2>(v, lane, &term);
  reduce_scatter_step<1>(v, lane, &term);
  v[0] += __shfl_xor_sync(kFullMask, v[0], 1);
  return term;
}

// Where gradient term t (GradSlot) of Gaussian `id` is accumulated.
__device__ __forceinline__ float* grad_address(const GaussianGrads& out, int64_t id, int t) {
  switch (t) {
    case kGradMeanX: case kGradMeanY: return out.v_means2d + 2 * id + (t - kGradMeanX);
    case kGradConicA: case kGradConicB: case kGradConicC: return out.v_conics + 3 * id + (t - kGradConicA);
    case kGradColorR: case kGradColorG: case kGradColorB: return out.v_colors + 3 * id + (t - kGradColorR);
    case kGradOpacity: return out.v_opacities + id;
    default: return out.v_depths + id;  // kGradDepth
  }
}

__global__ void __launch_bounds__(kThreads)
    backward_kernel(Scene scene0, BackwardIn in0, GaussianGrads grads0, int64_t tiles, int64_t hw) {
  __shared__ Staged st;
  __shared__ int warp_last[kWarps];
  const int64_t tile = blockIdx.x, batch = blockIdx.y;
  const Scene s = batch_element(scene0, batch, tiles);
  const BackwardIn in = batch_element(in0, batch, hw);
  const GaussianGrads out = batch_element(grads0, batch, s.n);
  const int tid = static_cast<int>(threadIdx.y) * kTileSize + static_cast<int>(threadIdx.x);
  const Pixel p = pixel_of(s, tile);
  const float T_final = p.inside ? in.transmittance[p.q] : 1.0f;
  const int32_t last = p.inside ? in.last[p.q] : 0;
  const float v_C[3] = {p.inside ? in.v_image[3 * p.q] : 0.0f,
                        p.inside ? in.v_image[3 * p.q + 1] : 0.0f,
                        p.inside ? in.v_image[3 * p.q + 2] : 0.0f};
  const float v_A = p.inside ? in.v_alpha[p.q] : 0.0f;
  const float v_D = p.inside ? in.v_depth[p.q] : 0.0f;
  const float bg[3] = {s.background[0], s.background[1], s.background[2]};
  float T = T_final;                    // transmittance after the Gaussian being un-blended
  float S[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // colour and depth of the Gaussians behind it
  int64_t start, end;
  tile_span(s, tile, &start, &end);
  const int tile_last = block_max(last, warp_last);
  const int64_t stop = start + (tile_last < end - start ? tile_last : end - start);
  for (int64_t k1 = stop; k1 > start; k1 -= kThreads) {  // batches, back to front
    const int count = k1 - start < kThreads ? static_cast<int>(k1 - start) : kThreads;
    __syncthreads();  // every thread is done with the previous batch
    if (tid < count) stage(s, k1 - 1 - tid, tid, st);  // slot j holds entry k1 - 1 - j
    __syncthreads();
    for (int j = 0; j < count; ++j) {
      const int32_t rank = static_cast<int32_t>(k1 - 1 - j - start + 1);
      const float dx = st.mx[j] - p.fx, dy = st.my[j] - p.fy;
      const float sigma = gaussian_sigma(st.a[j], st.b[j], st.c[j], dx, dy);
      float vis;
      const float raw = raw_alpha(st.o[j], sigma, &vis);
      const bool hit = (rank <= last) & alpha_passes(sigma, raw);
      if (!__any_sync(kFullMask, hit)) continue;  // uniform over the warp
      float g[kGradWidth], w, T_scale;
      blend_backward_step(dx, dy, st.a[j], st.b[j], st.c[j], st.cr[j], st.cg[j], st.cb[j],
                          st.z[j], raw, vis, T, S, v_C, v_A, v_D, T_final, bg, g, &w, &T_scale);
      if (hit) {
        T *= T_scale;
        S[0] += w * st.cr[j];
        S[1] += w * st.cg[j];
        S[2] += w * st.cb[j];
        S[3] += w * st.z[j];
      }
      float sum[16];
      for (int t = 0; t < kGradWidth; ++t) sum[t] = hit ? g[t] : 0.0f;
      for (int t = kGradWidth; t < 16; ++t) sum[t] = 0.0f;
      const int lane = tid % 32, term = warp_reduce_scatter(sum, lane);
      if (lane % 2 == 0 && term < kGradWidth) atomicAdd(grad_address(out, st.id[j], term), sum[0]);
    }
  }
}

// --- the two compilers' launch, zero fill and stream -----------------------------------------

// Makes launch()'s arguments convert to the kernel's parameter types (no deduction from them).
template <typename T>
struct Exactly {
  using type = T;
};

#if defined(GEM_SIMT_EMULATOR)
using Stream = ffi::ThreadPool;  // the CPU target's context (unused: blocks run one by one)

// Emulator seed: GEM_JAX_SIMT_SEED (decimal or 0x-hex), read at every call.
constexpr char kSeedVariable[] = "GEM_JAX_SIMT_SEED";

ffi::Error zero_fill(float* data, size_t count, Stream&) {
  std::memset(data, 0, count * sizeof(float));
  return ffi::Error::Success();
}

template <typename... Params>
ffi::Error launch(void (*kernel)(Params...), dim3 grid, dim3 block, Stream&,
                  typename Exactly<Params>::type... args) {
  uint64_t seed;
  if (!simt::seed_from_env(kSeedVariable, 1, &seed))
    return ffi::Error::InvalidArgument(std::string("gem blend (cuda-emulated): ") + kSeedVariable +
                                       " must be an unsigned integer (decimal or 0x-hex), got '" +
                                       std::getenv(kSeedVariable) + "'");
  const std::string error = simt::launch(grid, block, seed, kernel, args...);
  if (!error.empty()) return ffi::Error::Internal("gem blend (cuda-emulated): " + error);
  return ffi::Error::Success();
}
#else
using Stream = cudaStream_t;

ffi::Error zero_fill(float* data, size_t count, Stream& stream) {
  const cudaError_t e = cudaMemsetAsync(data, 0, count * sizeof(float), stream);
  if (e != cudaSuccess)
    return ffi::Error::Internal(std::string("gem blend (cuda): cudaMemsetAsync: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}

template <typename... Params>
ffi::Error launch(void (*kernel)(Params...), dim3 grid, dim3 block, Stream& stream,
                  typename Exactly<Params>::type... args) {
  void* argv[] = {static_cast<void*>(&args)...};
  const cudaError_t e = cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, argv, 0, stream);
  if (e != cudaSuccess)
    return ffi::Error::Internal(std::string("gem blend (cuda): kernel launch: ") + cudaGetErrorString(e));
  return ffi::Error::Success();
}
#endif

// Grid: x = tile, y = batch element.
ffi::Error grid_of(const Sizes& sz, dim3* grid) {
  if (sz.tiles > 0x7fffffff || sz.batch > 65535)
    return ffi::Error::InvalidArgument("gem blend (cuda): more than 2^31 - 1 tiles or 65535 batch elements");
  *grid = dim3(static_cast<unsigned>(sz.tiles), static_cast<unsigned>(sz.batch), 1);
  return ffi::Error::Success();
}

ffi::Error blend_forward(Stream stream, ffi::Buffer<ffi::F32> means2d, ffi::Buffer<ffi::F32> conics,
                         ffi::Buffer<ffi::F32> colors, ffi::Buffer<ffi::F32> opacities,
                         ffi::Buffer<ffi::F32> depths, ffi::Buffer<ffi::F32> background,
                         ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> ranges,
                         ffi::ResultBuffer<ffi::F32> image, ffi::ResultBuffer<ffi::F32> alpha,
                         ffi::ResultBuffer<ffi::F32> depth, ffi::ResultBuffer<ffi::F32> transmittance,
                         ffi::ResultBuffer<ffi::S32> last, int32_t width, int32_t height) {
  Sizes sz;
  ffi::Error err = check_inputs(means2d, conics, colors, opacities, depths, background, ids,
                                ranges, width, height, &sz);
  if (err.failure()) return err;
  const int64_t hw = static_cast<int64_t>(width) * height;
  err = check_forward_outputs(sz, hw, image, last);
  if (err.failure() || sz.batch == 0) return err;
  dim3 grid;
  err = grid_of(sz, &grid);
  if (err.failure()) return err;
  const Scene s0 = make_scene(sz, means2d, conics, colors, opacities, depths, background, ids,
                              ranges, width, height);
  const ForwardOut out0{image->typed_data(), alpha->typed_data(), depth->typed_data(),
                        transmittance->typed_data(), last->typed_data()};
  return launch(forward_kernel, grid, dim3(kTileSize, kTileSize), stream, s0, out0, sz.tiles, hw);
}

ffi::Error blend_backward(
    Stream stream, ffi::Buffer<ffi::F32> means2d, ffi::Buffer<ffi::F32> conics,
    ffi::Buffer<ffi::F32> colors, ffi::Buffer<ffi::F32> opacities, ffi::Buffer<ffi::F32> depths,
    ffi::Buffer<ffi::F32> background, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> ranges,
    ffi::Buffer<ffi::F32> transmittance, ffi::Buffer<ffi::S32> last,
    ffi::Buffer<ffi::F32> v_image, ffi::Buffer<ffi::F32> v_alpha, ffi::Buffer<ffi::F32> v_depth,
    ffi::ResultBuffer<ffi::F32> v_means2d, ffi::ResultBuffer<ffi::F32> v_conics,
    ffi::ResultBuffer<ffi::F32> v_colors, ffi::ResultBuffer<ffi::F32> v_opacities,
    ffi::ResultBuffer<ffi::F32> v_depths, int32_t width, int32_t height) {
  Sizes sz;
  ffi::Error err = check_inputs(means2d, conics, colors, opacities, depths, background, ids,
                                ranges, width, height, &sz);
  if (err.failure()) return err;
  const int64_t hw = static_cast<int64_t>(width) * height;
  err = check_backward_inputs(sz, hw, transmittance, last, v_image, v_alpha, v_depth);
  if (err.failure()) return err;
  const int64_t bn = sz.batch * sz.n;
  if (v_means2d->element_count() != static_cast<size_t>(bn * 2) ||
      v_conics->element_count() != static_cast<size_t>(bn * 3) ||
      v_colors->element_count() != static_cast<size_t>(bn * 3) ||
      v_opacities->element_count() != static_cast<size_t>(bn) ||
      v_depths->element_count() != static_cast<size_t>(bn))
    return ffi::Error::InvalidArgument("gem blend: gradient outputs do not match the Gaussians");
  const GaussianGrads grads0{v_means2d->typed_data(), v_conics->typed_data(), v_colors->typed_data(),
                             v_opacities->typed_data(), v_depths->typed_data()};
  const struct {
    float* data;
    int64_t count;
  } fills[] = {{grads0.v_means2d, bn * 2}, {grads0.v_conics, bn * 3}, {grads0.v_colors, bn * 3},
               {grads0.v_opacities, bn}, {grads0.v_depths, bn}};
  for (const auto& f : fills) {
    if (f.count == 0) continue;
    err = zero_fill(f.data, static_cast<size_t>(f.count), stream);
    if (err.failure()) return err;
  }
  if (sz.batch == 0) return err;
  dim3 grid;
  err = grid_of(sz, &grid);
  if (err.failure()) return err;
  const Scene s0 = make_scene(sz, means2d, conics, colors, opacities, depths, background, ids,
                              ranges, width, height);
  const BackwardIn in0{transmittance.typed_data(), last.typed_data(), v_image.typed_data(),
                       v_alpha.typed_data(), v_depth.typed_data()};
  return launch(backward_kernel, grid, dim3(kTileSize, kTileSize), stream, s0, in0, grads0,
                sz.tiles, hw);
}

}  // namespace cuda
}  // namespace gem

// --- exported handlers -------------------------------------------------------------------------

#define GEM_EXPORT extern "C" __attribute__((visibility("default")))

#if defined(GEM_SIMT_EMULATOR)
#define GEM_HANDLER(name) name##CudaEmulated
#define GEM_BIND() ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()
#else
#define GEM_HANDLER(name) name##Cuda
#define GEM_BIND() ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>()
#endif

// Bumped whenever a handler's operands or attributes change; gem_jax/render/_ffi.py checks it.
GEM_EXPORT int32_t gem_blend_abi_version() { return 1; }

GEM_EXPORT XLA_FFI_Error* GEM_HANDLER(GemBlendForward)(XLA_FFI_CallFrame* call_frame);
GEM_EXPORT XLA_FFI_Error* GEM_HANDLER(GemBlendBackward)(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GEM_HANDLER(GemBlendForward), gem::cuda::blend_forward,
                              gem::bind_sizes(gem::bind_forward_results(gem::bind_inputs(GEM_BIND()))),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(GEM_HANDLER(GemBlendBackward), gem::cuda::blend_backward,
                              gem::bind_sizes(gem::bind_gradient_results(
                                  gem::bind_backward_inputs(gem::bind_inputs(GEM_BIND())))),
                              {ffi::Traits::kCmdBufferCompatible});
