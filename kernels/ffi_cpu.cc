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
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

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

// Shape checks shared by both handlers; fills the batch size B and per-element sizes.
struct Sizes {
  int64_t batch, n, m, tiles;
};

ffi::Error check_inputs(ffi::Buffer<ffi::F32>& means2d, ffi::Buffer<ffi::F32>& conics,
                        ffi::Buffer<ffi::F32>& colors, ffi::Buffer<ffi::F32>& opacities,
                        ffi::Buffer<ffi::F32>& depths, ffi::Buffer<ffi::F32>& background,
                        ffi::Buffer<ffi::S32>& ids, ffi::Buffer<ffi::S32>& ranges, int width,
                        int height, Sizes* sz) {
  if (width <= 0 || height <= 0)
    return ffi::Error::InvalidArgument("gem blend: width and height must be positive");
  const auto md = means2d.dimensions();
  if (md.size() < 2 || md.back() != 2)
    return ffi::Error::InvalidArgument("gem blend: means2d must have shape (..., N, 2)");
  const auto id = ids.dimensions();
  if (id.size() < 1) return ffi::Error::InvalidArgument("gem blend: gaussian_ids must be (..., M)");
  sz->n = md[md.size() - 2];
  sz->m = id.back();
  const int64_t tiles_x = (width + kTileSize - 1) / kTileSize;
  const int64_t tiles_y = (height + kTileSize - 1) / kTileSize;
  sz->tiles = tiles_x * tiles_y;
  sz->batch = 1;
  for (size_t i = 0; i + 2 < md.size(); ++i) sz->batch *= md[i];
  const int64_t b = sz->batch, n = sz->n;
  struct Expect {
    const char* what;
    size_t got, want;
  } expect[] = {
      {"conics (..., N, 3)", conics.element_count(), static_cast<size_t>(b * n * 3)},
      {"colors (..., N, 3)", colors.element_count(), static_cast<size_t>(b * n * 3)},
      {"opacities (..., N)", opacities.element_count(), static_cast<size_t>(b * n)},
      {"depths (..., N)", depths.element_count(), static_cast<size_t>(b * n)},
      {"background (..., 3)", background.element_count(), static_cast<size_t>(b * 3)},
      {"gaussian_ids (..., M)", ids.element_count(), static_cast<size_t>(b * sz->m)},
      {"tile_ranges (..., ceil(H/16)*ceil(W/16), 2)", ranges.element_count(),
       static_cast<size_t>(b * sz->tiles * 2)},
  };
  for (const Expect& e : expect) {
    if (e.got != e.want)
      return ffi::Error::InvalidArgument(std::string("gem blend: ") + e.what + " has " +
                                         std::to_string(e.got) + " elements, expected " +
                                         std::to_string(e.want));
  }
  return ffi::Error::Success();
}

Scene make_scene(const Sizes& sz, int64_t b, ffi::Buffer<ffi::F32>& means2d,
                 ffi::Buffer<ffi::F32>& conics, ffi::Buffer<ffi::F32>& colors,
                 ffi::Buffer<ffi::F32>& opacities, ffi::Buffer<ffi::F32>& depths,
                 ffi::Buffer<ffi::F32>& background, ffi::Buffer<ffi::S32>& ids,
                 ffi::Buffer<ffi::S32>& ranges, int width, int height) {
  const int64_t n = sz.n;
  return {means2d.typed_data() + b * n * 2, conics.typed_data() + b * n * 3,
          colors.typed_data() + b * n * 3,  opacities.typed_data() + b * n,
          depths.typed_data() + b * n,      background.typed_data() + b * 3,
          ids.typed_data() + b * sz.m,      ranges.typed_data() + b * sz.tiles * 2,
          n, sz.m, width, height, (width + kTileSize - 1) / kTileSize};
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
  if (image->element_count() != static_cast<size_t>(sz.batch * hw * 3) ||
      last->element_count() != static_cast<size_t>(sz.batch * hw))
    return ffi::Error::InvalidArgument("gem blend: output shapes do not match (H, W)");
  parallel_for(pool, sz.batch * sz.tiles, [&](int64_t item) {
    const int64_t b = item / sz.tiles, tile = item % sz.tiles;
    const Scene s = make_scene(sz, b, means2d, conics, colors, opacities, depths, background,
                               ids, ranges, width, height);
    const ForwardOut out{image->typed_data() + b * hw * 3, alpha->typed_data() + b * hw,
                         depth->typed_data() + b * hw, transmittance->typed_data() + b * hw,
                         last->typed_data() + b * hw};
    forward_tile(s, tile, out);
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
  if (transmittance.element_count() != static_cast<size_t>(sz.batch * hw) ||
      last.element_count() != static_cast<size_t>(sz.batch * hw) ||
      v_image.element_count() != static_cast<size_t>(sz.batch * hw * 3) ||
      v_alpha.element_count() != static_cast<size_t>(sz.batch * hw) ||
      v_depth.element_count() != static_cast<size_t>(sz.batch * hw))
    return ffi::Error::InvalidArgument("gem blend: backward image-shaped inputs do not match");
  if (records->element_count() != static_cast<size_t>(sz.batch * sz.m * kGradWidth))
    return ffi::Error::InvalidArgument("gem blend: scratch records must be (..., M, 10)");
  auto scene = [&](int64_t b) {
    return make_scene(sz, b, means2d, conics, colors, opacities, depths, background, ids,
                      ranges, width, height);
  };
  parallel_for(pool, sz.batch * sz.tiles, [&](int64_t item) {
    const int64_t b = item / sz.tiles, tile = item % sz.tiles;
    const BackwardIn in{transmittance.typed_data() + b * hw, last.typed_data() + b * hw,
                        v_image.typed_data() + b * hw * 3, v_alpha.typed_data() + b * hw,
                        v_depth.typed_data() + b * hw};
    backward_tile(scene(b), in, tile, records->typed_data() + b * sz.m * kGradWidth);
  });
  // Gaussian-id chunks: each scans every intersection and keeps its own ids.
  const int64_t chunks = std::clamp<int64_t>(pool.num_threads(), 1, 16);
  parallel_for(pool, sz.batch * chunks, [&](int64_t item) {
    const int64_t b = item / chunks, chunk = item % chunks, n = sz.n;
    const GaussianGrads out{v_means2d->typed_data() + b * n * 2, v_conics->typed_data() + b * n * 3,
                            v_colors->typed_data() + b * n * 3, v_opacities->typed_data() + b * n,
                            v_depths->typed_data() + b * n};
    reduce_records(scene(b), sz.tiles, records->typed_data() + b * sz.m * kGradWidth,
                   n * chunk / chunks, n * (chunk + 1) / chunks, out);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemBlendForwardCpu, gem::blend_forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // means2d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conics
                                  .Arg<ffi::Buffer<ffi::F32>>()  // colors
                                  .Arg<ffi::Buffer<ffi::F32>>()  // opacities
                                  .Arg<ffi::Buffer<ffi::F32>>()  // depths
                                  .Arg<ffi::Buffer<ffi::F32>>()  // background
                                  .Arg<ffi::Buffer<ffi::S32>>()  // gaussian_ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_ranges
                                  .Ret<ffi::Buffer<ffi::F32>>()  // image
                                  .Ret<ffi::Buffer<ffi::F32>>()  // alpha
                                  .Ret<ffi::Buffer<ffi::F32>>()  // depth
                                  .Ret<ffi::Buffer<ffi::F32>>()  // final transmittance
                                  .Ret<ffi::Buffer<ffi::S32>>()  // last contributor
                                  .Attr<int32_t>("width")
                                  .Attr<int32_t>("height"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemBlendBackwardCpu, gem::blend_backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // means2d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conics
                                  .Arg<ffi::Buffer<ffi::F32>>()  // colors
                                  .Arg<ffi::Buffer<ffi::F32>>()  // opacities
                                  .Arg<ffi::Buffer<ffi::F32>>()  // depths
                                  .Arg<ffi::Buffer<ffi::F32>>()  // background
                                  .Arg<ffi::Buffer<ffi::S32>>()  // gaussian_ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_ranges
                                  .Arg<ffi::Buffer<ffi::F32>>()  // final transmittance
                                  .Arg<ffi::Buffer<ffi::S32>>()  // last contributor
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_image
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_alpha
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_depth
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_means2d
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_conics
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_colors
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_opacities
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_depths
                                  .Ret<ffi::Buffer<ffi::F32>>()  // scratch records (M, 10)
                                  .Attr<int32_t>("width")
                                  .Attr<int32_t>("height"));

