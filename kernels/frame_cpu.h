// The CPU frame pass outside the tile loops (docs/architecture.md §9): EWA projection of a
// range of Gaussians, the depth-ordered tile lists of one camera, and the projection's
// backward. ffi_cpu.cc drives these (and the tile loops of blend_cpu.cc) over XLA's
// intra-op thread pool. Pointers refer to one batch element (one camera).
#pragma once

#include <cstdint>

#include "blend_cpu.h"  // GEM_INTERNAL
#include "project_math.h"

namespace gem {

// One camera's inputs (pointers into the FFI buffers).
struct FrameIn {
  const float *means, *quats, *scales, *opacities, *colors;  // (N,3), (N,4), (N,3), (N,), (N,3)
  const float *viewmat, *K, *background;                      // (4,4), (3,3), (3,)
  int64_t n;
  int width, height;
};

// Projected Gaussians: one record per Gaussian (blend_cpu.h; project.py's means2d, conics
// and depths, zeros when culled), radii (0 = culled), tile counts and tile rectangles.
struct Projection {
  float* records;                // (N, kRecordWidth)
  int32_t *radii, *tile_counts;  // (N,), (N,)
  int32_t* rects;                // (N, 2): [x0, x1) and [y0, y1) in tiles, 16 bits each
};

// Projects Gaussians [g0, g1) of `in` into `out` (records, radii and tile counts); with
// out.records == nullptr only the tile counts are written (for sizing the capacity).
GEM_INTERNAL void project_range(const FrameIn& in, const CameraParams& cam, int64_t g0, int64_t g1,
                                const Projection& out);

// Scratch of depth_order: four int32 arrays of N (radix-sort keys and ids, ping-pong).
struct SortScratch {
  uint32_t *keys0, *keys1;
  int32_t *ids0, *ids1;
};

// The Gaussians with a non-zero tile count in (depth, id) order: returns them (a pointer
// into the scratch) and their number in *m.
GEM_INTERNAL const int32_t* depth_order(const Projection& p, int64_t n, const SortScratch& s,
                                        int64_t* m);

// The tile lists of one camera from the depth order, exactly those of
// gem_jax/render/tiles.py: every (tile, Gaussian) pair, per tile in (depth, id) order, in
// `ids` (capacity entries; padding 0) with `ranges` (T, 2) = [start, end). Pairs beyond the
// capacity are dropped as tiles.py drops them (the farthest Gaussians' first). Returns the
// true number of pairs.
GEM_INTERNAL int64_t bin_tiles(const FrameIn& in, const Projection& p, const int32_t* order,
                               int64_t m, int32_t* ids, int64_t capacity, int32_t* ranges);

// Backward of the projection for Gaussians [g0, g1): from the 2D gradients (v_means2d (N,2),
// v_conics (N,3), v_depths (N,)) to v_means (N,3), v_quats (N,4), v_scales (N,3) (zeros
// for culled Gaussians, radius 0); the camera's gradients are added to `cg`.
struct ProjectionGrads {
  const float *v_means2d, *v_conics, *v_depths;
  float *v_means, *v_quats, *v_scales;
};
GEM_INTERNAL void project_backward_range(const FrameIn& in, const CameraParams& cam,
                                         const int32_t* radii, int64_t g0, int64_t g1,
                                         const ProjectionGrads& g, CameraGrads* cg);

}  // namespace gem
