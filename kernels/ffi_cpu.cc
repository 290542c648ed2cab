// XLA FFI handlers of the CPU rasterizer (docs/architecture.md §9): one call renders a frame
// (projection, tile lists, blending), one computes its gradients, one counts intersections.
// Here: shape checks, batching over leading (vmap) dimensions, and the work split over
// XLA's intra-op thread pool. The per-Gaussian work is in frame_cpu.cc, the tile loops in
// blend_cpu.cc.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>

#include <time.h>

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

// Wall-clock and process CPU milliseconds per phase, summed over calls (gem_frame_profile
// reads them: benchmarks). The CPU time counts every thread of the process; while a phase
// runs, the rest of the XLA computation waits for this call.
enum Phase : int {
  kPhaseProject, kPhaseSort, kPhaseBin, kPhaseBlend,  // forward
  kPhaseBlendBackward, kPhaseReduce, kPhaseProjectBackward,  // backward
  kPhases
};
std::atomic<double> g_phase_ms[2][kPhases];  // [0] wall, [1] process CPU

double wall_ms() {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double cpu_ms() {
  timespec t;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return 1e3 * static_cast<double>(t.tv_sec) + 1e-6 * static_cast<double>(t.tv_nsec);
}

// Adds the time since the previous lap (or construction) to a phase.
class PhaseClock {
 public:
  void lap(Phase phase) {
    const double wall = wall_ms(), cpu = cpu_ms();
    g_phase_ms[0][phase].fetch_add(wall - wall_, std::memory_order_relaxed);
    g_phase_ms[1][phase].fetch_add(cpu - cpu_, std::memory_order_relaxed);
    wall_ = wall;
    cpu_ = cpu;
  }

 private:
  double wall_ = wall_ms(), cpu_ = cpu_ms();
};

constexpr int64_t kProjectChunk = 1024;  // Gaussians per work item of the projection
// int32 scratch per Gaussian: tile count, tile rectangle (2), radix-sort keys and ids (4)
constexpr int kSortScratch = 7;

int64_t chunks_of(int64_t n, int64_t size) { return (n + size - 1) / size; }

struct Expect {
  const char* what;
  size_t got, want;
};

template <size_t K>
ffi::Error check_sizes(const char* where, const Expect (&expect)[K]) {
  for (const Expect& e : expect) {
    if (e.got != e.want)
      return ffi::Error::InvalidArgument(std::string(where) + ": " + e.what + " has " +
                                         std::to_string(e.got) + " elements, expected " +
                                         std::to_string(e.want));
  }
  return ffi::Error::Success();
}

// The Gaussians and cameras of a call, all with the same leading (batch) dimensions.
struct FrameBuffers {
  ffi::Buffer<ffi::F32> &means, &quats, &scales, &opacities, &colors, &viewmat, &K;
  int width, height;
  int64_t batch, n, hw, tiles_x, tiles;

  ffi::Error check(const char* where) {
    if (width <= 0 || height <= 0)
      return ffi::Error::InvalidArgument(std::string(where) + ": width and height must be positive");
    const auto d = means.dimensions();
    if (d.size() < 2 || d.back() != 3)
      return ffi::Error::InvalidArgument(std::string(where) + ": means must have shape (..., N, 3)");
    n = d[d.size() - 2];
    batch = 1;
    for (size_t i = 0; i + 2 < d.size(); ++i) batch *= d[i];
    hw = static_cast<int64_t>(width) * height;
    tiles_x = (width + kTileSize - 1) / kTileSize;
    tiles = tiles_x * ((height + kTileSize - 1) / kTileSize);
    const size_t bn = static_cast<size_t>(batch * n);
    const Expect expect[] = {
        {"quats (..., N, 4)", quats.element_count(), bn * 4},
        {"scales (..., N, 3)", scales.element_count(), bn * 3},
        {"opacities (..., N)", opacities.element_count(), bn},
        {"colors (..., N, 3)", colors.element_count(), bn * 3},
        {"viewmat (..., 4, 4)", viewmat.element_count(), static_cast<size_t>(batch * 16)},
        {"K (..., 3, 3)", K.element_count(), static_cast<size_t>(batch * 9)},
    };
    return check_sizes(where, expect);
  }

  FrameIn camera(int64_t b, const float* background) const {
    return {means.typed_data() + b * n * 3,  quats.typed_data() + b * n * 4,
            scales.typed_data() + b * n * 3, opacities.typed_data() + b * n,
            colors.typed_data() + b * n * 3, viewmat.typed_data() + b * 16,
            K.typed_data() + b * 9,          background == nullptr ? nullptr : background + b * 3,
            n,                               width,
            height};
  }

  CameraParams params(int64_t b) const {
    return camera_params(viewmat.typed_data() + b * 16, K.typed_data() + b * 9, width, height);
  }
};

ffi::Error frame_count(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means,
                       ffi::Buffer<ffi::F32> quats, ffi::Buffer<ffi::F32> scales,
                       ffi::Buffer<ffi::F32> opacities, ffi::Buffer<ffi::F32> colors,
                       ffi::Buffer<ffi::F32> viewmat, ffi::Buffer<ffi::F32> K,
                       ffi::ResultBuffer<ffi::S32> tile_counts, int32_t width, int32_t height) {
  FrameBuffers f{means, quats, scales, opacities, colors, viewmat, K, width, height};
  if (ffi::Error err = f.check("gem frame count"); err.failure()) return err;
  const Expect expect[] = {
      {"tile_counts (..., N)", tile_counts->element_count(), static_cast<size_t>(f.batch * f.n)}};
  if (ffi::Error err = check_sizes("gem frame count", expect); err.failure()) return err;
  const int64_t chunks = chunks_of(f.n, kProjectChunk);
  parallel_for(pool, f.batch * chunks, [&](int64_t item) {
    const int64_t b = item / chunks, c = item % chunks;
    const Projection out{nullptr, nullptr, tile_counts->typed_data() + b * f.n, nullptr};
    project_range(f.camera(b, nullptr), f.params(b), c * kProjectChunk,
                  std::min(f.n, (c + 1) * kProjectChunk), out);
  });
  return ffi::Error::Success();
}

ffi::Error frame_forward(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means, ffi::Buffer<ffi::F32> quats,
    ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> opacities, ffi::Buffer<ffi::F32> colors,
    ffi::Buffer<ffi::F32> viewmat, ffi::Buffer<ffi::F32> K, ffi::Buffer<ffi::F32> background,
    ffi::ResultBuffer<ffi::F32> image, ffi::ResultBuffer<ffi::F32> alpha,
    ffi::ResultBuffer<ffi::F32> depth, ffi::ResultBuffer<ffi::F32> transmittance,
    ffi::ResultBuffer<ffi::S32> last, ffi::ResultBuffer<ffi::F32> records,
    ffi::ResultBuffer<ffi::S32> radii, ffi::ResultBuffer<ffi::S32> ids,
    ffi::ResultBuffer<ffi::S32> ranges, ffi::ResultBuffer<ffi::S32> num_intersections,
    ffi::ResultBuffer<ffi::S32> scratch, int32_t width, int32_t height, bool residuals) {
  FrameBuffers f{means, quats, scales, opacities, colors, viewmat, K, width, height};
  if (ffi::Error err = f.check("gem frame forward"); err.failure()) return err;
  const int64_t n = f.n, hw = f.hw, tiles = f.tiles;
  const auto id_dims = ids->dimensions();
  const int64_t m = id_dims.size() >= 1 ? id_dims.back() : 0;
  const size_t b = static_cast<size_t>(f.batch);
  const Expect expect[] = {
      {"background (..., 3)", background.element_count(), b * 3},
      {"image (..., H, W, 3)", image->element_count(), b * hw * 3},
      {"alpha (..., H, W)", alpha->element_count(), b * hw},
      {"depth (..., H, W)", depth->element_count(), b * hw},
      {"transmittance (..., H, W)", transmittance->element_count(), b * hw},
      {"last (..., H, W)", last->element_count(), b * hw},
      {"records (..., N, 16)", records->element_count(), b * n * kRecordWidth},
      {"radii (..., N)", radii->element_count(), b * n},
      {"gaussian_ids (..., M)", ids->element_count(), b * m},
      {"tile_ranges (..., T, 2)", ranges->element_count(), b * tiles * 2},
      {"num_intersections (...)", num_intersections->element_count(), b},
      {"scratch (..., 7, N)", scratch->element_count(), b * n * kSortScratch},
  };
  if (ffi::Error err = check_sizes("gem frame forward", expect); err.failure()) return err;

  auto projection = [&](int64_t b) {
    int32_t* s = scratch->typed_data() + b * n * kSortScratch;
    return Projection{records->typed_data() + b * n * kRecordWidth, radii->typed_data() + b * n, s,
                      s + n};
  };
  PhaseClock clock;
  const int64_t chunks = chunks_of(n, kProjectChunk);
  parallel_for(pool, f.batch * chunks, [&](int64_t item) {
    const int64_t b = item / chunks, c = item % chunks;
    project_range(f.camera(b, nullptr), f.params(b), c * kProjectChunk,
                  std::min(n, (c + 1) * kProjectChunk), projection(b));
  });
  clock.lap(kPhaseProject);
  parallel_for(pool, f.batch, [&](int64_t b) {  // one camera's lists per work item
    PhaseClock camera_clock;
    int32_t* s = scratch->typed_data() + b * n * kSortScratch;
    const SortScratch sort{reinterpret_cast<uint32_t*>(s + 3 * n),
                           reinterpret_cast<uint32_t*>(s + 4 * n), s + 5 * n, s + 6 * n};
    int64_t visible;
    const int32_t* order = depth_order(projection(b), n, sort, &visible);
    camera_clock.lap(kPhaseSort);
    const int64_t total = bin_tiles(f.camera(b, nullptr), projection(b), order, visible,
                                    ids->typed_data() + b * m, m, ranges->typed_data() + b * tiles * 2);
    camera_clock.lap(kPhaseBin);
    num_intersections->typed_data()[b] =
        static_cast<int32_t>(std::min<int64_t>(total, std::numeric_limits<int32_t>::max()));
  });
  clock = PhaseClock();
  parallel_for(pool, f.batch * tiles, [&](int64_t item) {
    const int64_t b = item / tiles, tile = item % tiles;
    const Scene s{records->typed_data() + b * n * kRecordWidth,
                  background.typed_data() + b * 3,
                  ids->typed_data() + b * m,
                  ranges->typed_data() + b * tiles * 2,
                  n, m, width, height, static_cast<int>(f.tiles_x)};
    const ForwardOut out{image->typed_data() + b * hw * 3, alpha->typed_data() + b * hw,
                         depth->typed_data() + b * hw,
                         residuals ? transmittance->typed_data() + b * hw : nullptr,
                         residuals ? last->typed_data() + b * hw : nullptr};
    forward_tile(s, tile, out);
  });
  clock.lap(kPhaseBlend);
  return ffi::Error::Success();
}

ffi::Error frame_backward(
    ffi::ThreadPool pool, ffi::Buffer<ffi::F32> means, ffi::Buffer<ffi::F32> quats,
    ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> opacities, ffi::Buffer<ffi::F32> colors,
    ffi::Buffer<ffi::F32> viewmat, ffi::Buffer<ffi::F32> K, ffi::Buffer<ffi::F32> background,
    ffi::Buffer<ffi::F32> records, ffi::Buffer<ffi::S32> radii, ffi::Buffer<ffi::S32> ids,
    ffi::Buffer<ffi::S32> ranges, ffi::Buffer<ffi::F32> transmittance, ffi::Buffer<ffi::S32> last,
    ffi::Buffer<ffi::F32> v_image, ffi::Buffer<ffi::F32> v_alpha, ffi::Buffer<ffi::F32> v_depth,
    ffi::ResultBuffer<ffi::F32> v_means, ffi::ResultBuffer<ffi::F32> v_quats,
    ffi::ResultBuffer<ffi::F32> v_scales, ffi::ResultBuffer<ffi::F32> v_opacities,
    ffi::ResultBuffer<ffi::F32> v_colors, ffi::ResultBuffer<ffi::F32> v_viewmat,
    ffi::ResultBuffer<ffi::F32> v_K, ffi::ResultBuffer<ffi::F32> grad_records,
    ffi::ResultBuffer<ffi::F32> grads2d, ffi::ResultBuffer<ffi::U8> camera_partials,
    int32_t width, int32_t height) {
  FrameBuffers f{means, quats, scales, opacities, colors, viewmat, K, width, height};
  if (ffi::Error err = f.check("gem frame backward"); err.failure()) return err;
  const int64_t n = f.n, hw = f.hw, tiles = f.tiles;
  const auto id_dims = ids.dimensions();
  const int64_t m = id_dims.size() >= 1 ? id_dims.back() : 0;
  constexpr int64_t kPartBytes = sizeof(CameraGrads);
  const auto part_dims = camera_partials->dimensions();
  const int64_t parts = part_dims.size() >= 2 ? part_dims[part_dims.size() - 2] : 0;
  const size_t b = static_cast<size_t>(f.batch);
  const Expect expect[] = {
      {"background (..., 3)", background.element_count(), b * 3},
      {"records (..., N, 16)", records.element_count(), b * n * kRecordWidth},
      {"radii (..., N)", radii.element_count(), b * n},
      {"gaussian_ids (..., M)", ids.element_count(), b * m},
      {"tile_ranges (..., T, 2)", ranges.element_count(), b * tiles * 2},
      {"transmittance (..., H, W)", transmittance.element_count(), b * hw},
      {"last (..., H, W)", last.element_count(), b * hw},
      {"v_image (..., H, W, 3)", v_image.element_count(), b * hw * 3},
      {"v_alpha (..., H, W)", v_alpha.element_count(), b * hw},
      {"v_depth (..., H, W)", v_depth.element_count(), b * hw},
      {"v_viewmat (..., 4, 4)", v_viewmat->element_count(), b * 16},
      {"v_K (..., 3, 3)", v_K->element_count(), b * 9},
      {"grad_records (..., M, 10)", grad_records->element_count(), b * m * kGradWidth},
      {"grads2d (..., 6, N)", grads2d->element_count(), b * n * 6},
      {"camera partials (..., P, bytes)", camera_partials->element_count(),
       b * std::max<int64_t>(parts, 1) * kPartBytes},
  };
  if (ffi::Error err = check_sizes("gem frame backward", expect); err.failure()) return err;
  if (parts < 1 || part_dims.back() != kPartBytes)
    return ffi::Error::InvalidArgument("gem frame backward: camera partials must be (..., P, " +
                                       std::to_string(kPartBytes) + ") bytes, P >= 1");

  auto scene = [&](int64_t b) {
    return Scene{records.typed_data() + b * n * kRecordWidth, background.typed_data() + b * 3,
                 ids.typed_data() + b * m, ranges.typed_data() + b * tiles * 2,
                 n, m, width, height, static_cast<int>(f.tiles_x)};
  };
  PhaseClock clock;
  // Blending backward: one gradient record per intersection.
  parallel_for(pool, f.batch * tiles, [&](int64_t item) {
    const int64_t b = item / tiles, tile = item % tiles;
    const BackwardIn in{transmittance.typed_data() + b * hw, last.typed_data() + b * hw,
                        v_image.typed_data() + b * hw * 3, v_alpha.typed_data() + b * hw,
                        v_depth.typed_data() + b * hw};
    backward_tile(scene(b), in, tile, grad_records->typed_data() + b * m * kGradWidth);
  });
  // Per-Gaussian 2D gradients (v_means2d, v_conics, v_depths into grads2d; colours and
  // opacities straight into their outputs): Gaussian-id chunks, each scanning every record
  // and summing its own in intersection order.
  auto grads_2d = [&](int64_t b) {
    float* g = grads2d->typed_data() + b * n * 6;
    return GaussianGrads{g, g + 2 * n, v_colors->typed_data() + b * n * 3,
                         v_opacities->typed_data() + b * n, g + 5 * n};
  };
  clock.lap(kPhaseBlendBackward);
  const int64_t reduce_chunks = std::clamp<int64_t>(pool.num_threads(), 1, 16);
  parallel_for(pool, f.batch * reduce_chunks, [&](int64_t item) {
    const int64_t b = item / reduce_chunks, chunk = item % reduce_chunks;
    reduce_records(scene(b), tiles, grad_records->typed_data() + b * m * kGradWidth,
                   n * chunk / reduce_chunks, n * (chunk + 1) / reduce_chunks, grads_2d(b));
  });
  clock.lap(kPhaseReduce);
  // Projection backward in `parts` fixed chunks, one camera partial each, summed in order
  // below: deterministic whatever the thread count.
  parallel_for(pool, f.batch * parts, [&](int64_t item) {
    const int64_t b = item / parts, c = item % parts;
    const GaussianGrads g2 = grads_2d(b);
    const ProjectionGrads pg{g2.v_means2d, g2.v_conics, g2.v_depths,
                             v_means->typed_data() + b * n * 3, v_quats->typed_data() + b * n * 4,
                             v_scales->typed_data() + b * n * 3};
    CameraGrads cg{};
    project_backward_range(f.camera(b, nullptr), f.params(b), radii.typed_data() + b * n,
                           n * c / parts, n * (c + 1) / parts, pg, &cg);
    std::memcpy(camera_partials->typed_data() + (b * parts + c) * kPartBytes, &cg, kPartBytes);
  });
  for (int64_t b = 0; b < f.batch; ++b) {
    constexpr int kDoubles = sizeof(CameraGrads) / sizeof(double);
    double total[kDoubles] = {0.0};
    for (int64_t c = 0; c < parts; ++c) {
      double part[kDoubles];
      std::memcpy(part, camera_partials->typed_data() + (b * parts + c) * kPartBytes, kPartBytes);
      for (int k = 0; k < kDoubles; ++k) total[k] += part[k];
    }
    CameraGrads sum;
    std::memcpy(&sum, total, sizeof(sum));
    finish_camera_grads(f.params(b), sum, v_viewmat->typed_data() + b * 16,
                        v_K->typed_data() + b * 9);
  }
  clock.lap(kPhaseProjectBackward);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace gem

#define GEM_EXPORT extern "C" __attribute__((visibility("default")))

// Bumped whenever a handler's operands or attributes change; gem_jax/render/_ffi.py checks it.
GEM_EXPORT int32_t gem_blend_abi_version() { return 3; }

// Milliseconds spent per phase since the last reset, summed over calls and cameras: out[0..6]
// wall clock and out[7..13] process CPU time of projection, depth sort, binning, blending;
// blending backward, reduction, projection backward. For benchmarks
// (benchmarks/bench_rasterize.py --profile).
GEM_EXPORT void gem_frame_profile(double* out, int32_t reset) {
  for (int k = 0; k < 2; ++k)
    for (int i = 0; i < gem::kPhases; ++i)
      out[k * gem::kPhases + i] = reset ? gem::g_phase_ms[k][i].exchange(0.0) : gem::g_phase_ms[k][i].load();
}

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
                                  .Ret<ffi::Buffer<ffi::F32>>()  // final transmittance (residual)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // last contributor (residual)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // records (N, 16)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // radii
                                  .Ret<ffi::Buffer<ffi::S32>>()  // gaussian_ids (capacity)
                                  .Ret<ffi::Buffer<ffi::S32>>()  // tile_ranges
                                  .Ret<ffi::Buffer<ffi::S32>>()  // num_intersections
                                  .Ret<ffi::Buffer<ffi::S32>>()  // scratch (7, N)
                                  .Attr<int32_t>("width")
                                  .Attr<int32_t>("height")
                                  .Attr<bool>("residuals"));  // write transmittance, last

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
                                  .Arg<ffi::Buffer<ffi::F32>>()  // records
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
                                  .Ret<ffi::Buffer<ffi::F32>>()  // scratch: gradient records (M, 10)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // scratch: 2D gradients (6, N)
                                  .Ret<ffi::Buffer<ffi::U8>>()   // scratch: camera partials
                                  .Attr<int32_t>("width")
                                  .Attr<int32_t>("height"));
