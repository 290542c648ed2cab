// XLA FFI handlers of the CPU blending kernel (DESIGN §9): shape checks, batching over
// leading (vmap) dimensions, and the work split over XLA's intra-op thread pool. The tile
// loops themselves are in blend_cpu.cc.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>

#include "blend_cpu.h"
#include "blend_math.h"
#include "ffi_blend_args.h"
#include "xla/ffi/api/ffi.h"

namespace gem {
namespace {

// Runs body(i) for i in [0, n) on the caller and on XLA's intra-op pool. The caller takes
// work too, so this finishes even if no helper task ever runs (a pool of size 1, or one busy
// with the caller). Helpers that start late find no work left and only touch `counters`,
// which they co-own; `body` is only reached through a claimed index, all of which finish
// before this returns.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const F& body) {
  if (n <= 0) return;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) body(i);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  const F* body_ptr = &body;
  auto work = [counters, body_ptr, n]() {
    for (int64_t i; (i = counters->next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      (*body_ptr)(i);
      counters->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(work)(work));
  work();
  while (counters->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

ffi::Error blend_forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means2d,
                         ffi::Buffer<ffi::F32> conics, ffi::Buffer<ffi::F32> colors,
                         ffi::Buffer<ffi::F32> opacities, ffi::Buffer<ffi::F32> depths,
                         ffi::Buffer<ffi::F32> background, ffi::Buffer<ffi::S32> ids,
                         ffi::Buffer<ffi::S32> ranges, ffi::ResultBuffer<ffi::F32> image,
                         ffi::ResultBuffer<ffi::F32> alpha, ffi::ResultBuffer<ffi::F32> depth,
                         ffi::ResultBuffer<ffi::F32> transmittance,
                         ffi::ResultBuffer<ffi::S32> last, int32_t width, int32_t height) {
  Sizes sz;
  ffi::Error err = check_inputs(means2d, conics, colors, opacities, depths, background, ids,
                                ranges, width, height, &sz);
  if (err.failure()) return err;
  const int64_t hw = static_cast<int64_t>(width) * height;
  err = check_forward_outputs(sz, hw, image, last);
  if (err.failure()) return err;
  const Scene s0 = make_scene(sz, means2d, conics, colors, opacities, depths, background, ids,
                              ranges, width, height);
  const ForwardOut out0{image->typed_data(), alpha->typed_data(), depth->typed_data(),
                        transmittance->typed_data(), last->typed_data()};
  parallel_for(pool, sz.batch * sz.tiles, [&](int64_t item) {
    const int64_t b = item / sz.tiles, tile = item % sz.tiles;
    forward_tile(batch_element(s0, b, sz.tiles), tile, batch_element(out0, b, hw));
  });
  return ffi::Error::Success();
}

ffi::Error blend_backward(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means2d, ffi::Buffer<ffi::F32> conics,
    ffi::Buffer<ffi::F32> colors, ffi::Buffer<ffi::F32> opacities, ffi::Buffer<ffi::F32> depths,
    ffi::Buffer<ffi::F32> background, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> ranges,
    ffi::Buffer<ffi::F32> transmittance, ffi::Buffer<ffi::S32> last,
    ffi::Buffer<ffi::F32> v_image, ffi::Buffer<ffi::F32> v_alpha, ffi::Buffer<ffi::F32> v_depth,
    ffi::ResultBuffer<ffi::F32> v_means2d, ffi::ResultBuffer<ffi::F32> v_conics,
    ffi::ResultBuffer<ffi::F32> v_colors, ffi::ResultBuffer<ffi::F32> v_opacities,
    ffi::ResultBuffer<ffi::F32> v_depths, ffi::ResultBuffer<ffi::F32> records, int32_t width,
    int32_t height) {
  Sizes sz;
  ffi::Error err = check_inputs(means2d, conics, colors, opacities, depths, background, ids,
                                ranges, width, height, &sz);
  if (err.failure()) return err;
  const int64_t hw = static_cast<int64_t>(width) * height;
  err = check_backward_inputs(sz, hw, transmittance, last, v_image, v_alpha, v_depth);
  if (err.failure()) return err;
  if (records->element_count() != static_cast<size_t>(sz.batch * sz.m * kGradWidth))
    return ffi::Error::InvalidArgument("gem blend: scratch records must be (..., M, 10)");
  const Scene s0 = make_scene(sz, means2d, conics, colors, opacities, depths, background, ids,
                              ranges, width, height);
  const BackwardIn in0{transmittance.typed_data(), last.typed_data(), v_image.typed_data(),
                       v_alpha.typed_data(), v_depth.typed_data()};
  parallel_for(pool, sz.batch * sz.tiles, [&](int64_t item) {
    const int64_t b = item / sz.tiles, tile = item % sz.tiles;
    backward_tile(batch_element(s0, b, sz.tiles), batch_element(in0, b, hw), tile,
                  records->typed_data() + b * sz.m * kGradWidth);
  });
  // Gaussian-id chunks: each scans every intersection and keeps its own ids.
  const int64_t chunks = std::clamp<int64_t>(pool.num_threads(), 1, 16);
  parallel_for(pool, sz.batch * chunks, [&](int64_t item) {
    const int64_t b = item / chunks, chunk = item % chunks, n = sz.n;
    const GaussianGrads out0{v_means2d->typed_data(), v_conics->typed_data(), v_colors->typed_data(),
                             v_opacities->typed_data(), v_depths->typed_data()};
    reduce_records(batch_element(s0, b, sz.tiles), sz.tiles, records->typed_data() + b * sz.m * kGradWidth,
                   n * chunk / chunks, n * (chunk + 1) / chunks, batch_element(out0, b, n));
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gem

#define GEM_EXPORT extern "C" __attribute__((visibility("default")))

// Bumped whenever a handler's operands or attributes change; gem_jax/render/_ffi.py checks it.
GEM_EXPORT int32_t gem_blend_abi_version() { return 1; }

GEM_EXPORT XLA_FFI_Error* GemBlendForwardCpu(XLA_FFI_CallFrame* call_frame);
GEM_EXPORT XLA_FFI_Error* GemBlendBackwardCpu(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GemBlendForwardCpu, gem::blend_forward,
    gem::bind_sizes(gem::bind_forward_results(gem::bind_inputs(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()))));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    GemBlendBackwardCpu, gem::blend_backward,
    gem::bind_sizes(gem::bind_gradient_results(gem::bind_backward_inputs(gem::bind_inputs(
                                                   ffi::Ffi::Bind().Ctx<ffi::ThreadPool>())))
                        .Ret<ffi::Buffer<ffi::F32>>()));  // scratch records (M, 10)
