// CPU tile loops of the blending kernel (DESIGN §9): what blend_cpu.cc implements and
// ffi_cpu.cc (the XLA FFI handlers) calls. Pointers refer to one batch element.
#pragma once

#include <cstdint>

#if defined(__GNUC__)
#define GEM_INTERNAL __attribute__((visibility("hidden")))
#else
#define GEM_INTERNAL
#endif

namespace gem {

// One batch element's inputs (pointers into the FFI buffers).
struct Scene {
  const float* means2d;     // (N, 2)
  const float* conics;      // (N, 3)
  const float* colors;      // (N, 3)
  const float* opacities;   // (N,)
  const float* depths;      // (N,)
  const float* background;  // (3,)
  const int32_t* ids;       // (M,)
  const int32_t* ranges;    // (T, 2)
  int64_t n, m;
  int width, height, tiles_x;
};

struct ForwardOut {
  float *image, *alpha, *depth, *transmittance;  // (H, W, 3), (H, W) x 3
  int32_t* last;                                 // (H, W): 1 + index in the tile's list
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
