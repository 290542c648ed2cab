// CPU tile loops of the blending kernel (docs/architecture.md §9): what blend_cpu.cc
// implements and ffi_cpu.cc (the XLA FFI handlers) calls. Pointers refer to one camera.
#pragma once

#include <cstdint>

#if defined(__GNUC__)
#define GEM_INTERNAL __attribute__((visibility("hidden")))
#else
#define GEM_INTERNAL
#endif

namespace gem {

// Per-Gaussian record of the tile loops: the projected Gaussian and its culling box
// [xlo, xhi] x [ylo, yhi], outside which its alpha is below 1/255 (make_record). Written once
// per Gaussian by the projection, read by every tile the Gaussian is listed in.
enum RecordSlot : int {
  kRecMeanX = 0, kRecMeanY = 1,
  kRecConicA = 2, kRecConicB = 3, kRecConicC = 4,
  kRecOpacity = 5, kRecColorR = 6, kRecColorG = 7, kRecColorB = 8, kRecDepth = 9,
  kRecXlo = 10, kRecXhi = 11, kRecYlo = 12, kRecYhi = 13,
  kRecBound = 14,  // visible_sigma_bound(opacity)
  kRecDet = 15,    // a c - b^2
};
constexpr int kRecordWidth = 16;

// Fills one record (kRecordWidth floats). A Gaussian with opacity 0 (culled) gets a box
// that misses every pixel.
GEM_INTERNAL void make_record(const float* mean2d, const float* conic, const float* color,
                              float opacity, float depth, float* record);

// One camera's inputs of the tile loops (pointers into the FFI buffers).
struct Scene {
  const float* records;     // (N, kRecordWidth)
  const float* background;  // (3,)
  const int32_t* ids;       // (M,) tile lists, per tile front to back
  const int32_t* ranges;    // (T, 2) [start, end) per tile
  int64_t n, m;
  int width, height, tiles_x;
};

struct ForwardOut {
  float *image, *alpha, *depth;  // (H, W, 3), (H, W), (H, W)
  // What the backward needs, or both nullptr (not written): final transmittance (H, W) and
  // last contributor (H, W), 1 + index in the tile's list.
  float* transmittance;
  int32_t* last;
};

struct BackwardIn {
  const float* transmittance;  // (H, W) final T of the forward pass
  const int32_t* last;         // (H, W)
  const float *v_image, *v_alpha, *v_depth;  // (H, W, 3), (H, W), (H, W)
};

struct GaussianGrads {
  float *v_means2d, *v_conics, *v_colors, *v_opacities, *v_depths;  // (N,2),(N,3),(N,3),(N,),(N,)
};

// Blends one 16x16 tile front to back and writes its pixels of `out`.
GEM_INTERNAL void forward_tile(const Scene& s, int64_t tile, const ForwardOut& out);

// Writes the gradient record (kGradWidth floats) of every intersection of this tile into
// `records` (M, kGradWidth), walking each pixel back to front from its last contributor.
GEM_INTERNAL void backward_tile(const Scene& s, const BackwardIn& in, int64_t tile, float* records);

// Sums the records of Gaussians [g0, g1) in intersection order (deterministic) into `out`.
GEM_INTERNAL void reduce_records(const Scene& s, int64_t num_tiles, const float* records,
                                 int64_t g0, int64_t g1, const GaussianGrads& out);

}  // namespace gem
