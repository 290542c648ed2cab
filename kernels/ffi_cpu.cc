// XLA FFI handlers of the CPU blending kernel (DESIGN §9): shape checks, batching over
// leading (vmap) dimensions, and the work split over XLA's intra-op thread pool. The tile
// loops themselves are in blend_cpu.cc.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>

#include "blend_cpu.h"
#include "blend_math.h"
#include "frame_cpu.h"
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

// --- the frame pass: projection, tile lists and blending in one call ----------------------

constexpr int64_t kProjectChunk = 1024;  // Gaussians per work item of the projection

// Leading (batch) size of an (..., N, k) buffer and N.
void batch_and_n(const ffi::Buffer<ffi::F32>& means, int64_t* batch, int64_t* n) {
  const auto d = means.dimensions();
  *n = d.size() >= 2 ? d[d.size() - 2] : 0;
  *batch = 1;
  for (size_t i = 0; i + 2 < d.size(); ++i) *batch *= d[i];
}

struct FrameBuffers {
  ffi::Buffer<ffi::F32> &means, &quats, &scales, &opacities, &colors, &viewmat, &K;
};

ffi::Error check_frame(const FrameBuffers& f, int width, int height, int64_t* batch, int64_t* n) {
  if (width <= 0 || height <= 0)
    return ffi::Error::InvalidArgument("gem frame: width and height must be positive");
  if (f.means.dimensions().size() < 2 || f.means.dimensions().back() != 3)
    return ffi::Error::InvalidArgument("gem frame: means must have shape (..., N, 3)");
  batch_and_n(f.means, batch, n);
  const int64_t b = *batch, g = *n;
  struct Expect {
    const char* what;
    size_t got, want;
  } expect[] = {
      {"quats (..., N, 4)", f.quats.element_count(), static_cast<size_t>(b * g * 4)},
      {"scales (..., N, 3)", f.scales.element_count(), static_cast<size_t>(b * g * 3)},
      {"opacities (..., N)", f.opacities.element_count(), static_cast<size_t>(b * g)},
      {"colors (..., N, 3)", f.colors.element_count(), static_cast<size_t>(b * g * 3)},
      {"viewmat (..., 4, 4)", f.viewmat.element_count(), static_cast<size_t>(b * 16)},
      {"K (..., 3, 3)", f.K.element_count(), static_cast<size_t>(b * 9)},
  };
  for (const Expect& e : expect) {
    if (e.got != e.want)
      return ffi::Error::InvalidArgument(std::string("gem frame: ") + e.what + " has " +
                                         std::to_string(e.got) + " elements, expected " +
                                         std::to_string(e.want));
  }
  return ffi::Error::Success();
}

FrameIn frame_in(const FrameBuffers& f, const float* background, int64_t b, int64_t n, int width,
                 int height) {
  return {f.means.typed_data() + b * n * 3, f.quats.typed_data() + b * n * 4,
          f.scales.typed_data() + b * n * 3, f.opacities.typed_data() + b * n,
          f.colors.typed_data() + b * n * 3, f.viewmat.typed_data() + b * 16,
          f.K.typed_data() + b * 9,          background == nullptr ? nullptr : background + b * 3,
          n,                                 width,
          height};
}

int64_t chunks_of(int64_t n, int64_t size) { return (n + size - 1) / size; }

ffi::Error frame_count(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means,
                       ffi::Buffer<ffi::F32> quats, ffi::Buffer<ffi::F32> scales,
                       ffi::Buffer<ffi::F32> opacities, ffi::Buffer<ffi::F32> colors,
                       ffi::Buffer<ffi::F32> viewmat, ffi::Buffer<ffi::F32> K,
                       ffi::ResultBuffer<ffi::S32> tile_counts, int32_t width, int32_t height) {
  const FrameBuffers f{means, quats, scales, opacities, colors, viewmat, K};
  int64_t batch, n;
  ffi::Error err = check_frame(f, width, height, &batch, &n);
  if (err.failure()) return err;
  if (tile_counts->element_count() != static_cast<size_t>(batch * n))
    return ffi::Error::InvalidArgument("gem frame: tile_counts must be (..., N)");
  const int64_t chunks = chunks_of(n, kProjectChunk);
  parallel_for(pool, batch * chunks, [&](int64_t item) {
    const int64_t b = item / chunks, c = item % chunks;
    const FrameIn in = frame_in(f, nullptr, b, n, width, height);
    const CameraParams cam = camera_params(in.viewmat, in.K, width, height);
    count_range(in, cam, c * kProjectChunk, std::min(n, (c + 1) * kProjectChunk),
                tile_counts->typed_data() + b * n);
  });
  return ffi::Error::Success();
}

ffi::Error frame_forward(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means, ffi::Buffer<ffi::F32> quats,
    ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> opacities, ffi::Buffer<ffi::F32> colors,
    ffi::Buffer<ffi::F32> viewmat, ffi::Buffer<ffi::F32> K, ffi::Buffer<ffi::F32> background,
    ffi::ResultBuffer<ffi::F32> image, ffi::ResultBuffer<ffi::F32> alpha,
    ffi::ResultBuffer<ffi::F32> depth, ffi::ResultBuffer<ffi::F32> transmittance,
    ffi::ResultBuffer<ffi::S32> last, ffi::ResultBuffer<ffi::F32> means2d,
    ffi::ResultBuffer<ffi::F32> conics, ffi::ResultBuffer<ffi::F32> depths,
    ffi::ResultBuffer<ffi::S32> radii, ffi::ResultBuffer<ffi::S32> ids,
    ffi::ResultBuffer<ffi::S32> ranges, ffi::ResultBuffer<ffi::S32> num_intersections,
    ffi::ResultBuffer<ffi::S32> scratch, int32_t width, int32_t height) {
  const FrameBuffers f{means, quats, scales, opacities, colors, viewmat, K};
  int64_t batch, n;
  ffi::Error err = check_frame(f, width, height, &batch, &n);
  if (err.failure()) return err;
  const int64_t hw = static_cast<int64_t>(width) * height;
  const int64_t tiles_x = (width + kTileSize - 1) / kTileSize;
  const int64_t tiles = tiles_x * ((height + kTileSize - 1) / kTileSize);
  const auto id_dims = ids->dimensions();
  const int64_t m = id_dims.size() >= 1 ? id_dims.back() : 0;
  if (background.element_count() != static_cast<size_t>(batch * 3) ||
      image->element_count() != static_cast<size_t>(batch * hw * 3) ||
      last->element_count() != static_cast<size_t>(batch * hw) ||
      means2d->element_count() != static_cast<size_t>(batch * n * 2) ||
      radii->element_count() != static_cast<size_t>(batch * n) ||
      ids->element_count() != static_cast<size_t>(batch * m) ||
      ranges->element_count() != static_cast<size_t>(batch * tiles * 2) ||
      num_intersections->element_count() != static_cast<size_t>(batch) ||
      scratch->element_count() != static_cast<size_t>(batch * 5 * n))
    return ffi::Error::InvalidArgument("gem frame: output shapes do not match the inputs");

  auto projection = [&](int64_t b) {
    return Projection{means2d->typed_data() + b * n * 2, conics->typed_data() + b * n * 3,
                      depths->typed_data() + b * n, radii->typed_data() + b * n,
                      scratch->typed_data() + b * n * 5};
  };
  const int64_t chunks = chunks_of(n, kProjectChunk);
  parallel_for(pool, batch * chunks, [&](int64_t item) {
    const int64_t b = item / chunks, c = item % chunks;
    const FrameIn in = frame_in(f, background.typed_data(), b, n, width, height);
    const CameraParams cam = camera_params(in.viewmat, in.K, width, height);
    project_range(in, cam, c * kProjectChunk, std::min(n, (c + 1) * kProjectChunk), projection(b));
  });
  parallel_for(pool, batch, [&](int64_t b) {
    const FrameIn in = frame_in(f, background.typed_data(), b, n, width, height);
    int32_t* s = scratch->typed_data() + b * n * 5;
    const SortScratch sort{reinterpret_cast<uint32_t*>(s + n), reinterpret_cast<uint32_t*>(s + 2 * n),
                           s + 3 * n, s + 4 * n};
    const int64_t total = build_tile_lists(in, projection(b), sort, ids->typed_data() + b * m, m,
                                           ranges->typed_data() + b * tiles * 2);
    num_intersections->typed_data()[b] =
        static_cast<int32_t>(std::min<int64_t>(total, std::numeric_limits<int32_t>::max()));
  });
  parallel_for(pool, batch * tiles, [&](int64_t item) {
    const int64_t b = item / tiles, tile = item % tiles;
    const Scene s{means2d->typed_data() + b * n * 2, conics->typed_data() + b * n * 3,
                  colors.typed_data() + b * n * 3,   opacities.typed_data() + b * n,
                  depths->typed_data() + b * n,      background.typed_data() + b * 3,
                  ids->typed_data() + b * m,         ranges->typed_data() + b * tiles * 2,
                  n, m, width, height, static_cast<int>(tiles_x)};
    const ForwardOut out{image->typed_data() + b * hw * 3, alpha->typed_data() + b * hw,
                         depth->typed_data() + b * hw, transmittance->typed_data() + b * hw,
                         last->typed_data() + b * hw};
    forward_tile(s, tile, out);
  });
  return ffi::Error::Success();
}

ffi::Error frame_backward(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means, ffi::Buffer<ffi::F32> quats,
    ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> opacities, ffi::Buffer<ffi::F32> colors,
    ffi::Buffer<ffi::F32> viewmat, ffi::Buffer<ffi::F32> K, ffi::Buffer<ffi::F32> background,
    ffi::Buffer<ffi::F32> means2d, ffi::Buffer<ffi::F32> conics, ffi::Buffer<ffi::F32> depths,
    ffi::Buffer<ffi::S32> radii, ffi::Buffer<ffi::S32> ids, ffi::Buffer<ffi::S32> ranges,
    ffi::Buffer<ffi::F32> transmittance, ffi::Buffer<ffi::S32> last,
    ffi::Buffer<ffi::F32> v_image, ffi::Buffer<ffi::F32> v_alpha, ffi::Buffer<ffi::F32> v_depth,
    ffi::ResultBuffer<ffi::F32> v_means, ffi::ResultBuffer<ffi::F32> v_quats,
    ffi::ResultBuffer<ffi::F32> v_scales, ffi::ResultBuffer<ffi::F32> v_opacities,
    ffi::ResultBuffer<ffi::F32> v_colors, ffi::ResultBuffer<ffi::F32> v_viewmat,
    ffi::ResultBuffer<ffi::F32> v_K, ffi::ResultBuffer<ffi::F32> records,
    ffi::ResultBuffer<ffi::F32> grads2d, ffi::ResultBuffer<ffi::U8> camera_partials,
    int32_t width, int32_t height) {
  const FrameBuffers f{means, quats, scales, opacities, colors, viewmat, K};
  int64_t batch, n;
  ffi::Error err = check_frame(f, width, height, &batch, &n);
  if (err.failure()) return err;
  const int64_t hw = static_cast<int64_t>(width) * height;
  const int64_t tiles_x = (width + kTileSize - 1) / kTileSize;
  const int64_t tiles = tiles_x * ((height + kTileSize - 1) / kTileSize);
  const auto id_dims = ids.dimensions();
  const int64_t m = id_dims.size() >= 1 ? id_dims.back() : 0;
  const auto part_dims = camera_partials->dimensions();
  constexpr int64_t kCamWidth = sizeof(CameraGrads);  // bytes
  const int64_t parts = part_dims.size() >= 2 ? part_dims[part_dims.size() - 2] : 0;
  const struct {
    const char* what;
    size_t got, want;
  } expect[] = {
      {"means2d (..., N, 2)", means2d.element_count(), static_cast<size_t>(batch * n * 2)},
      {"radii (..., N)", radii.element_count(), static_cast<size_t>(batch * n)},
      {"gaussian_ids (..., M)", ids.element_count(), static_cast<size_t>(batch * m)},
      {"tile_ranges (..., T, 2)", ranges.element_count(), static_cast<size_t>(batch * tiles * 2)},
      {"transmittance (..., H, W)", transmittance.element_count(), static_cast<size_t>(batch * hw)},
      {"v_image (..., H, W, 3)", v_image.element_count(), static_cast<size_t>(batch * hw * 3)},
      {"records (..., M, 10)", records->element_count(), static_cast<size_t>(batch * m * kGradWidth)},
      {"grads2d (..., 6, N)", grads2d->element_count(), static_cast<size_t>(batch * n * 6)},
      {"camera partials (..., P, bytes)", camera_partials->element_count(),
       static_cast<size_t>(batch * parts * kCamWidth)},
  };
  for (const auto& e : expect) {
    if (e.got != e.want)
      return ffi::Error::InvalidArgument(std::string("gem frame backward: ") + e.what + " has " +
                                         std::to_string(e.got) + " elements, expected " +
                                         std::to_string(e.want));
  }
  if ((n > 0 && parts <= 0) || part_dims.back() != kCamWidth)
    return ffi::Error::InvalidArgument("gem frame backward: shapes do not match the inputs");

  auto scene = [&](int64_t b) {
    return Scene{means2d.typed_data() + b * n * 2, conics.typed_data() + b * n * 3,
                 colors.typed_data() + b * n * 3,  opacities.typed_data() + b * n,
                 depths.typed_data() + b * n,      background.typed_data() + b * 3,
                 ids.typed_data() + b * m,         ranges.typed_data() + b * tiles * 2,
                 n, m, width, height, static_cast<int>(tiles_x)};
  };
  parallel_for(pool, batch * tiles, [&](int64_t item) {
    const int64_t b = item / tiles, tile = item % tiles;
    const BackwardIn in{transmittance.typed_data() + b * hw, last.typed_data() + b * hw,
                        v_image.typed_data() + b * hw * 3, v_alpha.typed_data() + b * hw,
                        v_depth.typed_data() + b * hw};
    backward_tile(scene(b), in, tile, records->typed_data() + b * m * kGradWidth);
  });
  // 2D gradients per Gaussian (v_means2d, v_conics, v_depths into grads2d; colours and
  // opacities straight into their outputs), Gaussian-id chunks each scanning every record.
  auto grads_2d = [&](int64_t b) {
    float* g = grads2d->typed_data() + b * n * 6;
    return GaussianGrads{g, g + 2 * n, v_colors->typed_data() + b * n * 3,
                         v_opacities->typed_data() + b * n, g + 5 * n};
  };
  const int64_t reduce_chunks = std::clamp<int64_t>(pool.num_threads(), 1, 16);
  parallel_for(pool, batch * reduce_chunks, [&](int64_t item) {
    const int64_t b = item / reduce_chunks, chunk = item % reduce_chunks;
    reduce_records(scene(b), tiles, records->typed_data() + b * m * kGradWidth,
                   n * chunk / reduce_chunks, n * (chunk + 1) / reduce_chunks, grads_2d(b));
  });
  // Projection backward in fixed chunks (one camera partial each, summed in order below:
  // deterministic whatever the thread count).
  parallel_for(pool, batch * parts, [&](int64_t item) {
    const int64_t b = item / parts, c = item % parts;
    const FrameIn in = frame_in(f, background.typed_data(), b, n, width, height);
    const CameraParams cam = camera_params(in.viewmat, in.K, width, height);
    const GaussianGrads g2 = grads_2d(b);
    const ProjectionGrads pg{g2.v_means2d, g2.v_conics, g2.v_depths,
                             v_means->typed_data() + b * n * 3, v_quats->typed_data() + b * n * 4,
                             v_scales->typed_data() + b * n * 3};
    CameraGrads cg{};
    project_backward_range(in, cam, radii.typed_data() + b * n, n * c / parts, n * (c + 1) / parts,
                           pg, &cg);
    std::memcpy(camera_partials->typed_data() + (b * parts + c) * kCamWidth, &cg, kCamWidth);
  });
  for (int64_t b = 0; b < batch; ++b) {
    constexpr int kDoubles = sizeof(CameraGrads) / sizeof(double);
    double total[kDoubles] = {0.0};
    for (int64_t c = 0; c < parts; ++c) {
      double part[kDoubles];
      std::memcpy(part, camera_partials->typed_data() + (b * parts + c) * kCamWidth, kCamWidth);
      for (int k = 0; k < kDoubles; ++k) total[k] += part[k];
    }
    CameraGrads sum;
    std::memcpy(&sum, total, sizeof(sum));
    const FrameIn in = frame_in(f, nullptr, b, n, width, height);
    finish_camera_grads(camera_params(in.viewmat, in.K, width, height), sum,
                        v_viewmat->typed_data() + b * 16, v_K->typed_data() + b * 9);
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gem

#define GEM_EXPORT extern "C" __attribute__((visibility("default")))

// Bumped whenever a handler's operands or attributes change; gem_jax/render/_ffi.py checks it.
GEM_EXPORT int32_t gem_blend_abi_version() { return 2; }

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

GEM_EXPORT XLA_FFI_Error* GemFrameCountCpu(XLA_FFI_CallFrame* call_frame);
GEM_EXPORT XLA_FFI_Error* GemFrameForwardCpu(XLA_FFI_CallFrame* call_frame);
GEM_EXPORT XLA_FFI_Error* GemFrameBackwardCpu(XLA_FFI_CallFrame* call_frame);

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemFrameCountCpu, gem::frame_count,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // means
                                  .Arg<ffi::Buffer<ffi::F32>>()  // quats
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // opacities
                                  .Arg<ffi::Buffer<ffi::F32>>()  // colors
                                  .Arg<ffi::Buffer<ffi::F32>>()  // viewmat
                                  .Arg<ffi::Buffer<ffi::F32>>()  // K
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tile count per Gaussian
                                  .Attr<int32_t>("width")
                                  .Attr<int32_t>("height"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemFrameForwardCpu, gem::frame_forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // means
                                  .Arg<ffi::Buffer<ffi::F32>>()  // quats
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // opacities
                                  .Arg<ffi::Buffer<ffi::F32>>()  // colors
                                  .Arg<ffi::Buffer<ffi::F32>>()  // viewmat
                                  .Arg<ffi::Buffer<ffi::F32>>()  // K
                                  .Arg<ffi::Buffer<ffi::F32>>()  // background
                                  .Ret<ffi::Buffer<ffi::F32>>()  // image
                                  .Ret<ffi::Buffer<ffi::F32>>()  // alpha
                                  .Ret<ffi::Buffer<ffi::F32>>()  // depth
                                  .Ret<ffi::Buffer<ffi::F32>>()  // final transmittance
                                  .Ret<ffi::Buffer<ffi::S32>>()  // last contributor
                                  .Ret<ffi::Buffer<ffi::F32>>()  // means2d
                                  .Ret<ffi::Buffer<ffi::F32>>()  // conics
                                  .Ret<ffi::Buffer<ffi::F32>>()  // depths
                                  .Ret<ffi::Buffer<ffi::S32>>()  // radii
                                  .Ret<ffi::Buffer<ffi::S32>>()  // gaussian_ids (capacity)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tile_ranges
                                  .Ret<ffi::Buffer<ffi::S32>>()  // num_intersections
                                  .Ret<ffi::Buffer<ffi::S32>>()  // scratch (5, N)
                                  .Attr<int32_t>("width")
                                  .Attr<int32_t>("height"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(GemFrameBackwardCpu, gem::frame_backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // means
                                  .Arg<ffi::Buffer<ffi::F32>>()  // quats
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scales
                                  .Arg<ffi::Buffer<ffi::F32>>()  // opacities
                                  .Arg<ffi::Buffer<ffi::F32>>()  // colors
                                  .Arg<ffi::Buffer<ffi::F32>>()  // viewmat
                                  .Arg<ffi::Buffer<ffi::F32>>()  // K
                                  .Arg<ffi::Buffer<ffi::F32>>()  // background
                                  .Arg<ffi::Buffer<ffi::F32>>()  // means2d
                                  .Arg<ffi::Buffer<ffi::F32>>()  // conics
                                  .Arg<ffi::Buffer<ffi::F32>>()  // depths
                                  .Arg<ffi::Buffer<ffi::S32>>()  // radii
                                  .Arg<ffi::Buffer<ffi::S32>>()  // gaussian_ids
                                  .Arg<ffi::Buffer<ffi::S32>>()  // tile_ranges
                                  .Arg<ffi::Buffer<ffi::F32>>()  // final transmittance
                                  .Arg<ffi::Buffer<ffi::S32>>()  // last contributor
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_image
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_alpha
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_depth
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_means
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_quats
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_scales
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_opacities
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_colors
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_viewmat
                                  .Ret<ffi::Buffer<ffi::F32>>()  // v_K
                                  .Ret<ffi::Buffer<ffi::F32>>()  // scratch: records (M, 10)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // scratch: 2D grads (6, N)
                                  .Ret<ffi::Buffer<ffi::U8>>()   // scratch: camera partials
                                  .Attr<int32_t>("width")
                                  .Attr<int32_t>("height"));
