// CPU blending kernel of the tile rasterizer: the per-tile loops (docs/architecture.md §9).
//
// Inputs are the per-Gaussian records written by the projection (make_record) and the tile
// lists of frame_cpu.cc (those of gem_jax/render/tiles.py): `gaussian_ids` (M,) sorted by
// (tile, depth) and `tile_ranges` (T, 2) = [start, end) per tile, tile id = ty * tiles_x + tx.
//
// Layout of the work, chosen so the compiler vectorises it:
//  * one work item = one 16x16 tile; items are handed out dynamically (an atomic counter) to
//    the caller and to helper tasks on XLA's own intra-op thread pool (ffi::ThreadPool, see
//    ffi_cpu.cc), so the kernel never oversubscribes the cores XLA uses nor creates threads;
//  * a tile's list is read in batches of 16 Gaussians (structure of arrays), each with a
//    conservative box outside which its alpha is below 1/255 (computed 16 at a time);
//  * per Gaussian, the loop runs over the tile rows its box covers and, per row, over the 16
//    pixels (backward: the 8 of one half when the box lies in it); the per-pixel math
//    (blend_math.h) is branch-free, so a row is one AVX-512 or two AVX2 vectors
//    (target_clones picks at load time);
//  * rows whose pixels all stopped are skipped; a tile stops when every row has stopped.
// The backward pass walks each tile back to front from the last contributor, writes one
// gradient record per intersection into a scratch output, then reduces those records per
// Gaussian in intersection order: deterministic, no atomics on floats.
#include "blend_cpu.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#include "blend_math.h"

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && !defined(GEM_JAX_NO_CLONES)
#define GEM_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#else
#define GEM_CLONES
#endif

namespace gem {
namespace {

constexpr int kPixels = kTileSize * kTileSize;
constexpr int kHalf = kTileSize / 2;
constexpr int kPrefetch = 8;     // records fetched this many intersections ahead
constexpr int kLiveCheck = 16;   // finished rows are looked for every kLiveCheck Gaussians
constexpr float kHuge = 3.0e38f;

// The record of intersection k (blend_cpu.h, RecordSlot), or nullptr for an id outside
// [0, N). The next records are prefetched: the tile lists visit Gaussians in depth order, so
// their records are scattered over memory.
inline const float* record_of(const Scene& s, int64_t k, int64_t prefetch) {
  if (prefetch >= 0 && prefetch < s.m) {
    const int32_t next = s.ids[prefetch];
    if (next >= 0 && next < s.n) __builtin_prefetch(s.records + kRecordWidth * static_cast<int64_t>(next));
  }
  const int32_t id = s.ids[k];
  return id >= 0 && id < s.n ? s.records + kRecordWidth * static_cast<int64_t>(id) : nullptr;
}

// [start, end) of a tile's intersections, clamped into [0, M].
inline void tile_range(const Scene& s, int64_t tile, int64_t* start, int64_t* end) {
  int64_t lo = s.ranges[2 * tile], hi = s.ranges[2 * tile + 1];
  lo = std::clamp<int64_t>(lo, 0, s.m);
  hi = std::clamp<int64_t>(hi, lo, s.m);
  *start = lo;
  *end = hi;
}

// Indices [*i0, *i1) of the pixel centres first + i (i < kTileSize) inside [lo, hi];
// false when there are none (NaN bounds included).
inline bool span(float lo, float hi, float first, int* i0, int* i1) {
  const float l = lo - first, h = hi - first;
  if (!(h >= 0.0f) || !(l <= kTileSize - 1.0f)) return false;
  *i0 = l <= 0.0f ? 0 : static_cast<int>(std::ceil(l));
  *i1 = h >= kTileSize - 1.0f ? kTileSize : static_cast<int>(std::floor(h)) + 1;
  return *i0 < *i1;
}

// Which halves (8 pixels: one AVX2 vector, half the work of a 16-pixel row on CPUs that
// split AVX-512) of rows [r0, r1) Gaussian i can reach: bit r of *left / *right. At offset dy
// sigma <= bound is the chord |px - (mx + b dy / a)| <= sqrt(2 a bound - det dy^2) / a
// (a > 0, det > 0); widened (0.2%, 0.01 px) against rounding. Without a bound: all halves.
inline void row_halves(const float* g, float fx0, float fy0, int r0, int r1, uint32_t* left,
                       uint32_t* right) {
  const uint32_t band = ((1u << r1) - 1u) & ~((1u << r0) - 1u);
  const float a = g[kRecConicA], b = g[kRecConicB], det = g[kRecDet];
  if (!(a > 0.0f) || !(det > 0.0f)) {
    *left = *right = band;
    return;
  }
  const float two_a_bound = 2.0f * a * g[kRecBound] * 1.002f, inv_a = 1.0f / a;
  const float b_over_a = b * inv_a, cx = g[kRecMeanX] - fx0;
  uint32_t l_bits = 0, r_bits = 0;
  for (int r = 0; r < kTileSize; ++r) {
    const float dy = g[kRecMeanY] - (fy0 + static_cast<float>(r));
    const float disc = two_a_bound - det * dy * dy;
    const float hw = std::sqrt(disc > 0.0f ? disc : 0.0f) * inv_a * 1.002f + 0.01f;
    const float centre = cx + b_over_a * dy;  // chord centre, relative to pixel 0 of the row
    const bool ok = disc >= 0.0f;
    l_bits |= static_cast<uint32_t>(ok & (centre - hw <= kHalf - 1.0f) & (centre + hw >= 0.0f)) << r;
    r_bits |= static_cast<uint32_t>(ok & (centre + hw >= kHalf) & (centre - hw <= kTileSize - 1.0f))
              << r;
  }
  *left = l_bits & band;
  *right = r_bits & band;
}

struct ForwardState {
  alignas(64) float T[kPixels], C0[kPixels], C1[kPixels], C2[kPixels], D[kPixels];
  alignas(64) int32_t last[kPixels], live[kPixels];
};

// `x`, hidden from the optimiser. With a literal 0 (or 1), GCC folds T * (1 - (hit ? a : 0))
// back into "store only where hit": a masked store behind a data-dependent branch, which
// costs ~10% in these loops. The updates below use an opaque 0 or 1 instead.
inline float opaque(float x) {
#if defined(__GNUC__) && defined(__x86_64__)
  asm("" : "+x"(x));
#elif defined(__GNUC__) && defined(__aarch64__)
  asm("" : "+w"(x));
#endif
  return x;
}

// Blends Gaussian g into the pixels [p0, p0 + 16 * rows) (whole tile rows, one
// loop so consecutive rows overlap in the pipeline). dx0, dy0: offsets at pixel p0.
inline void forward_rows(ForwardState& st, const float* g, int p0, int rows, float dx0, float dy0,
                         int32_t rank) {
  const float a = g[kRecConicA], b = g[kRecConicB], c = g[kRecConicC], o = g[kRecOpacity];
  const float cr = g[kRecColorR], cg = g[kRecColorG], cb = g[kRecColorB], z = g[kRecDepth];
  const float zero = opaque(0.0f);
  for (int r = 0; r < rows; ++r) {
    const float dy = dy0 - static_cast<float>(r);
    for (int l = 0; l < kTileSize; ++l) {
      const int p = p0 + r * kTileSize + l;
      const float dx = dx0 - static_cast<float>(l);
      const float sigma = gaussian_sigma(a, b, c, dx, dy);
      float vis;
      const float raw = raw_alpha(o, sigma, &vis);
      const float alpha = clamp_alpha(raw);
      bool is_live = st.live[p] != 0;
      float w;
      const bool hit = blend_forward_step(alpha, alpha_passes(sigma, raw), &is_live, st.T[p], &w);
      st.T[p] *= 1.0f - (hit ? alpha : zero);  // see opaque()
      st.live[p] = is_live;
      st.C0[p] += hit ? w * cr : 0.0f;  // a select, not a conditional store
      st.C1[p] += hit ? w * cg : 0.0f;
      st.C2[p] += hit ? w * cb : 0.0f;
      st.D[p] += hit ? w * z : 0.0f;
      st.last[p] = hit ? rank : st.last[p];
    }
  }
}

// The lanes of row r to run: all 16 when both halves are reachable, else the one half
// (first lane *l0, *width lanes). (No lambda here: a lambda's body would not be compiled
// for the AVX2/AVX-512 clones of the caller.)
inline void row_lanes(uint32_t left, uint32_t right, int r, int* l0, int* width) {
  const bool l = (left >> r) & 1u, h = (right >> r) & 1u;
  *l0 = (l || !h) ? 0 : kHalf;
  *width = (l && h) ? kTileSize : kHalf;
}

}  // namespace

// The box: for a positive definite conic the minimum of sigma over y at offset dx is
// 0.5 dx^2 det / c (over x at dy: 0.5 dy^2 det / a), so beyond |dx| = sqrt(2 c bound / det)
// nothing passes; widened (0.2%, 0.01 px) against rounding. A conic that is not positive
// definite gets an unbounded box; NaNs give a box that misses.
void make_record(const float* mean2d, const float* conic, const float* color, float opacity,
                 float depth, float* rec) {
  const float mx = mean2d[0], my = mean2d[1], a = conic[0], b = conic[1], c = conic[2];
  const float bound = visible_sigma_bound(opacity);
  const float det = a * c - b * b;
  const bool bounded = (a > 0.0f) & (det > 0.0f);
  const float scale = 2.0f * bound / det;
  const float ex = std::sqrt(std::fabs(scale * c)) * 1.002f + 0.01f;
  const float ey = std::sqrt(std::fabs(scale * a)) * 1.002f + 0.01f;
  const bool visible = bound >= 0.0f;
  rec[kRecMeanX] = mx;
  rec[kRecMeanY] = my;
  rec[kRecConicA] = a;
  rec[kRecConicB] = b;
  rec[kRecConicC] = c;
  rec[kRecOpacity] = opacity;
  rec[kRecColorR] = color[0];
  rec[kRecColorG] = color[1];
  rec[kRecColorB] = color[2];
  rec[kRecDepth] = depth;
  rec[kRecXlo] = visible ? (bounded ? mx - ex : -kHuge) : kHuge;
  rec[kRecXhi] = visible ? (bounded ? mx + ex : kHuge) : -kHuge;
  rec[kRecYlo] = visible ? (bounded ? my - ey : -kHuge) : kHuge;
  rec[kRecYhi] = visible ? (bounded ? my + ey : kHuge) : -kHuge;
  rec[kRecBound] = bound;
  rec[kRecDet] = det;
}

GEM_CLONES void forward_tile(const Scene& s, int64_t tile, const ForwardOut& out) {
  const int x0 = static_cast<int>(tile % s.tiles_x) * kTileSize;
  const int y0 = static_cast<int>(tile / s.tiles_x) * kTileSize;
  ForwardState st;
  uint32_t live_rows = 0;  // bit r: row r still has pixels blending
  for (int r = 0; r < kTileSize; ++r) {
    for (int l = 0; l < kTileSize; ++l) {
      const int p = r * kTileSize + l;
      st.T[p] = 1.0f;
      st.C0[p] = st.C1[p] = st.C2[p] = st.D[p] = 0.0f;
      st.last[p] = 0;
      st.live[p] = (x0 + l < s.width) & (y0 + r < s.height);
    }
    live_rows |= static_cast<uint32_t>(y0 + r < s.height) << r;
  }
  int64_t start, end;
  tile_range(s, tile, &start, &end);
  const float fx0 = static_cast<float>(x0) + 0.5f, fy0 = static_cast<float>(y0) + 0.5f;
  for (int64_t k = start; k < end && live_rows != 0; ++k) {
    const float* g = record_of(s, k, k + kPrefetch);
    int r0, r1, c0, c1;
    if (g != nullptr && span(g[kRecYlo], g[kRecYhi], fy0, &r0, &r1) &&
        span(g[kRecXlo], g[kRecXhi], fx0, &c0, &c1)) {
      uint32_t left, right;
      row_halves(g, fx0, fy0, r0, r1, &left, &right);
      // From the first to the last reachable live row, whole rows in one loop (rows in
      // between that are dead or out of reach are masked per pixel): no unpredictable
      // branches in the forward pass.
      const uint32_t rows = (left | right) & live_rows;
      if (rows != 0) {
        const int first = std::countr_zero(rows), stop = 32 - std::countl_zero(rows);
        const int32_t rank = static_cast<int32_t>(k - start + 1);
        forward_rows(st, g, first * kTileSize, stop - first, g[kRecMeanX] - fx0,
                     g[kRecMeanY] - (fy0 + static_cast<float>(first)), rank);
      }
    }
    if ((k - start) % kLiveCheck != kLiveCheck - 1) continue;
    for (uint32_t rows = live_rows; rows != 0; rows &= rows - 1) {  // drop finished rows
      const int r = std::countr_zero(rows);
      int any = 0;
      for (int l = 0; l < kTileSize; ++l) any |= st.live[r * kTileSize + l];
      if (!any) live_rows &= ~(1u << r);
    }
  }
  const float bg0 = s.background[0], bg1 = s.background[1], bg2 = s.background[2];
  const int rows = std::min(kTileSize, s.height - y0), cols = std::min(kTileSize, s.width - x0);
  for (int r = 0; r < rows; ++r) {  // interior tiles: whole rows, vectorised
    const int p = r * kTileSize;
    const int64_t q = static_cast<int64_t>(y0 + r) * s.width + x0;
    const int width = cols == kTileSize ? kTileSize : cols;
    for (int l = 0; l < width; ++l) {
      out.image[3 * (q + l)] = st.C0[p + l] + st.T[p + l] * bg0;
      out.image[3 * (q + l) + 1] = st.C1[p + l] + st.T[p + l] * bg1;
      out.image[3 * (q + l) + 2] = st.C2[p + l] + st.T[p + l] * bg2;
      out.alpha[q + l] = 1.0f - st.T[p + l];
      out.depth[q + l] = st.D[p + l];
    }
    if (out.transmittance == nullptr) continue;  // no backward will follow
    for (int l = 0; l < width; ++l) {
      out.transmittance[q + l] = st.T[p + l];
      out.last[q + l] = st.last[p + l];
    }
  }
}

namespace {

struct BackwardState {
  alignas(64) float T[kPixels], Tf[kPixels], S0[kPixels], S1[kPixels], S2[kPixels],
      S3[kPixels], vC0[kPixels], vC1[kPixels], vC2[kPixels], vA[kPixels], vD[kPixels];
  alignas(64) int32_t last[kPixels];
  alignas(64) float acc[kGradWidth][kTileSize];  // per-lane gradient sums of one Gaussian
  float bg[3];
};

// Un-blends Gaussian g from kLanes pixels of one row (starting at pixel p0,
// lane l0), adding its gradient terms into st.acc.
template <int kLanes>
inline void backward_lanes(BackwardState& st, const float* g, int p0, int l0, float dx0, float dy,
                           int32_t rank) {
  const float a = g[kRecConicA], b = g[kRecConicB], c = g[kRecConicC], o = g[kRecOpacity];
  const float cr = g[kRecColorR], cg = g[kRecColorG], cb = g[kRecColorB], z = g[kRecDepth];
  const float one = opaque(1.0f);
  for (int l = 0; l < kLanes; ++l) {
    const int p = p0 + l;
    const float dx = dx0 - static_cast<float>(l);
    const float sigma = gaussian_sigma(a, b, c, dx, dy);
    float vis;
    const float raw = raw_alpha(o, sigma, &vis);
    const bool hit = (rank <= st.last[p]) & alpha_passes(sigma, raw);
    const float S[4] = {st.S0[p], st.S1[p], st.S2[p], st.S3[p]};
    const float v_C[3] = {st.vC0[p], st.vC1[p], st.vC2[p]};
    float grad[kGradWidth], w, T_scale;
    blend_backward_step(dx, dy, a, b, c, cr, cg, cb, z, raw, vis, st.T[p], S, v_C, st.vA[p],
                        st.vD[p], st.Tf[p], st.bg, grad, &w, &T_scale);
    // Arithmetic updates (x1, +0 when not hit) keep the stores unconditional.
    st.T[p] *= hit ? T_scale : one;
    st.S0[p] += hit ? w * cr : 0.0f;
    st.S1[p] += hit ? w * cg : 0.0f;
    st.S2[p] += hit ? w * cb : 0.0f;
    st.S3[p] += hit ? w * z : 0.0f;
    for (int j = 0; j < kGradWidth; ++j) st.acc[j][l0 + l] += hit ? grad[j] : 0.0f;
  }
}

}  // namespace

GEM_CLONES void backward_tile(const Scene& s, const BackwardIn& in, int64_t tile, float* grads) {
  const int x0 = static_cast<int>(tile % s.tiles_x) * kTileSize;
  const int y0 = static_cast<int>(tile / s.tiles_x) * kTileSize;
  BackwardState st;
  int row_last[kTileSize];
  int tile_last = 0;
  for (int r = 0; r < kTileSize; ++r) {
    row_last[r] = 0;
    for (int l = 0; l < kTileSize; ++l) {
      const int p = r * kTileSize + l;
      const bool inside = (x0 + l < s.width) && (y0 + r < s.height);
      const int64_t q = static_cast<int64_t>(y0 + r) * s.width + (x0 + l);
      st.T[p] = st.Tf[p] = inside ? in.transmittance[q] : 1.0f;
      st.last[p] = inside ? in.last[q] : 0;
      st.vC0[p] = inside ? in.v_image[3 * q] : 0.0f;
      st.vC1[p] = inside ? in.v_image[3 * q + 1] : 0.0f;
      st.vC2[p] = inside ? in.v_image[3 * q + 2] : 0.0f;
      st.vA[p] = inside ? in.v_alpha[q] : 0.0f;
      st.vD[p] = inside ? in.v_depth[q] : 0.0f;
      st.S0[p] = st.S1[p] = st.S2[p] = st.S3[p] = 0.0f;
      row_last[r] = std::max(row_last[r], st.last[p]);
    }
    tile_last = std::max(tile_last, row_last[r]);
  }
  for (int ch = 0; ch < 3; ++ch) st.bg[ch] = s.background[ch];
  int64_t start, end;
  tile_range(s, tile, &start, &end);
  const int64_t stop = start + std::min<int64_t>(tile_last, end - start);
  std::fill(grads + kGradWidth * start, grads + kGradWidth * end, 0.0f);
  const float fx0 = static_cast<float>(x0) + 0.5f, fy0 = static_cast<float>(y0) + 0.5f;
  for (int64_t k = stop - 1; k >= start; --k) {  // back to front
    const float* g = record_of(s, k, k - kPrefetch);
    int r0, r1, c0, c1;
    if (g == nullptr || !span(g[kRecYlo], g[kRecYhi], fy0, &r0, &r1) ||
        !span(g[kRecXlo], g[kRecXhi], fx0, &c0, &c1))
      continue;
    const int32_t rank = static_cast<int32_t>(k - start + 1);  // 1 + index in list
    uint32_t reach = 0;  // rows with pixels whose last contributor is at or behind this one
    for (int r = r0; r < r1; ++r) reach |= static_cast<uint32_t>(row_last[r] >= rank) << r;
    if (reach == 0) continue;
    uint32_t left, right;
    row_halves(g, fx0, fy0, r0, r1, &left, &right);
    uint32_t rows = (left | right) & reach;
    if (rows == 0) continue;
    std::fill(&st.acc[0][0], &st.acc[0][0] + kGradWidth * kTileSize, 0.0f);
    const float dx0 = g[kRecMeanX] - fx0;
    for (; rows != 0; rows &= rows - 1) {
      const int r = std::countr_zero(rows);
      const float dy = g[kRecMeanY] - (fy0 + static_cast<float>(r));
      int l0, width;
      row_lanes(left, right, r, &l0, &width);
      const int p0 = r * kTileSize + l0;
      const float dx = dx0 - static_cast<float>(l0);
      if (width == kTileSize)
        backward_lanes<kTileSize>(st, g, p0, 0, dx, dy, rank);
      else
        backward_lanes<kHalf>(st, g, p0, l0, dx, dy, rank);
    }
    float* record = grads + kGradWidth * k;
    for (int j = 0; j < kGradWidth; ++j) {
      float sum = 0.0f;
      for (int l = 0; l < kTileSize; ++l) sum += st.acc[j][l];
      record[j] = sum;
    }
  }
}

void reduce_records(const Scene& s, int64_t num_tiles, const float* records, int64_t g0,
                    int64_t g1, const GaussianGrads& out) {
  std::fill(out.v_means2d + 2 * g0, out.v_means2d + 2 * g1, 0.0f);
  std::fill(out.v_conics + 3 * g0, out.v_conics + 3 * g1, 0.0f);
  std::fill(out.v_colors + 3 * g0, out.v_colors + 3 * g1, 0.0f);
  std::fill(out.v_opacities + g0, out.v_opacities + g1, 0.0f);
  std::fill(out.v_depths + g0, out.v_depths + g1, 0.0f);
  for (int64_t tile = 0; tile < num_tiles; ++tile) {
    int64_t start, end;
    tile_range(s, tile, &start, &end);
    for (int64_t k = start; k < end; ++k) {
      const int64_t id = s.ids[k];
      if (id < g0 || id >= g1) continue;
      const float* rec = records + kGradWidth * k;
      out.v_means2d[2 * id] += rec[kGradMeanX];
      out.v_means2d[2 * id + 1] += rec[kGradMeanY];
      out.v_conics[3 * id] += rec[kGradConicA];
      out.v_conics[3 * id + 1] += rec[kGradConicB];
      out.v_conics[3 * id + 2] += rec[kGradConicC];
      out.v_colors[3 * id] += rec[kGradColorR];
      out.v_colors[3 * id + 1] += rec[kGradColorG];
      out.v_colors[3 * id + 2] += rec[kGradColorB];
      out.v_opacities[id] += rec[kGradOpacity];
      out.v_depths[id] += rec[kGradDepth];
    }
  }
}

}  // namespace gem
