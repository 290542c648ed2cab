// Projection, tile lists and the projection's backward of the CPU frame pass
// (docs/architecture.md §9, layers 1 and 2 in C++).
//
// Tile lists: the Gaussians that touch a tile are put in (depth, id) order by one stable
// LSD radix sort of their depth bits (positive floats order as their bit patterns; the sort
// is stable, so equal depths stay in id order), then a counting sort by tile: a histogram
// of the pairs per tile, its prefix sum (the tile ranges) and one scatter in depth order, so
// each tile's run comes out front to back. This is the order of tiles.py's packed key
// tile * N + depth rank. With too small a capacity, the pairs are numbered as tiles.py
// numbers them (Gaussians in depth order, each one's tiles row-major) and those numbered
// capacity or more are dropped; the true count is returned.
#include "frame_cpu.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

namespace gem {
namespace {

// Tile rectangle [x0, x1) x [y0, y1) of a bounding square, as tiles.py's tile_rects computes
// it (empty for radius 0).
struct Rect {
  int32_t x0, y0, x1, y1;
};

inline int32_t tile_start(float lo, int32_t n) {
  return static_cast<int32_t>(std::clamp(std::floor(lo / kTileSize), 0.0f, static_cast<float>(n)));
}

inline int32_t tile_end(float hi, int32_t n) {
  return static_cast<int32_t>(std::clamp(std::ceil(hi / kTileSize), 0.0f, static_cast<float>(n)));
}

inline Rect tile_rect(float u, float v, int32_t radius, int32_t tiles_x, int32_t tiles_y) {
  constexpr float kBig = 1073741824.0f;  // 2^30, keeps the int casts defined
  const float r = static_cast<float>(radius);
  Rect rect;
  rect.x0 = tile_start(std::clamp(u - r, -kBig, kBig), tiles_x);
  rect.x1 = tile_end(std::clamp(u + r, -kBig, kBig), tiles_x);
  rect.y0 = tile_start(std::clamp(v - r, -kBig, kBig), tiles_y);
  rect.y1 = tile_end(std::clamp(v + r, -kBig, kBig), tiles_y);
  const bool live = (radius > 0) & std::isfinite(u) & std::isfinite(v);
  if (!live) {
    rect.x1 = rect.x0;
    rect.y1 = rect.y0;
  }
  return rect;
}

// A tile span [start, end) packed into one int32 (tile indices < 2^15).
inline int32_t pack_span(int32_t start, int32_t end) { return start | (end << 16); }
inline int32_t span_start(int32_t span) { return span & 0xffff; }
inline int32_t span_end(int32_t span) { return span >> 16; }

inline int32_t tiles_x_of(int width) { return (width + kTileSize - 1) / kTileSize; }
inline int32_t tiles_y_of(int height) { return (height + kTileSize - 1) / kTileSize; }

}  // namespace

const int32_t* depth_order(const Projection& p, int64_t n, const SortScratch& s, int64_t* m) {
  uint32_t *keys = s.keys0, *keys_next = s.keys1;
  int32_t *ids = s.ids0, *ids_next = s.ids1;
  int64_t count = 0;
  for (int64_t g = 0; g < n; ++g) {
    if (p.tile_counts[g] > 0) {
      // depth >= 0.01: the bit patterns order as the values
      keys[count] = std::bit_cast<uint32_t>(p.records[kRecordWidth * g + kRecDepth]);
      ids[count] = static_cast<int32_t>(g);
      ++count;
    }
  }
  for (int shift = 0; shift < 32; shift += 8) {
    int64_t offsets[256] = {0};
    for (int64_t i = 0; i < count; ++i) ++offsets[(keys[i] >> shift) & 0xffu];
    if (count == 0 || offsets[(keys[0] >> shift) & 0xffu] == count) continue;  // one bucket
    int64_t running = 0;
    for (int64_t& o : offsets) {
      const int64_t c = o;
      o = running;
      running += c;
    }
    for (int64_t i = 0; i < count; ++i) {
      const int64_t slot = offsets[(keys[i] >> shift) & 0xffu]++;
      keys_next[slot] = keys[i];
      ids_next[slot] = ids[i];
    }
    std::swap(keys, keys_next);
    std::swap(ids, ids_next);
  }
  *m = count;
  return ids;
}

void project_range(const FrameIn& in, const CameraParams& cam, int64_t g0, int64_t g1,
                   const Projection& out) {
  const int32_t tiles_x = tiles_x_of(in.width), tiles_y = tiles_y_of(in.height);
  for (int64_t g = g0; g < g1; ++g) {
    EwaState st;
    const Splat s = project_one(cam, in.means + 3 * g, in.quats + 4 * g, in.scales + 3 * g,
                                in.opacities[g], in.colors + 3 * g, &st);
    const Rect r = tile_rect(s.u, s.v, s.radius, tiles_x, tiles_y);
    out.tile_counts[g] = std::max(r.x1 - r.x0, 0) * std::max(r.y1 - r.y0, 0);
    if (out.records == nullptr) continue;
    out.rects[2 * g] = pack_span(r.x0, r.x1);
    out.rects[2 * g + 1] = pack_span(r.y0, r.y1);
    out.radii[g] = s.radius;
    const bool visible = s.radius > 0;
    const float mean2d[2] = {s.u, s.v}, conic[3] = {s.a, s.b, s.c};
    const float black[3] = {0.0f, 0.0f, 0.0f};
    make_record(mean2d, conic, visible ? in.colors + 3 * g : black,
                visible ? in.opacities[g] : 0.0f, s.depth, out.records + kRecordWidth * g);
  }
}

int64_t bin_tiles(const FrameIn& in, const Projection& p, const int32_t* order, int64_t m,
                  int32_t* ids, int64_t capacity, int32_t* ranges) {
  const int32_t tiles_x = tiles_x_of(in.width);
  const int64_t num_tiles = static_cast<int64_t>(tiles_x) * tiles_y_of(in.height);

  // Visits the kept pairs of the depth-ordered Gaussians: visit(tile, gaussian). Pair number
  // `offset + local` of a Gaussian is its local-th tile, row-major in its rectangle.
  auto for_each_kept_pair = [&](auto&& visit) {
    int64_t offset = 0;
    for (int64_t j = 0; j < m && offset < capacity; ++j) {
      const int32_t g = order[j];
      const int64_t count = p.tile_counts[g];
      const int64_t kept = std::min(count, capacity - offset);
      offset += count;
      const int32_t x0 = span_start(p.rects[2 * g]), x1 = span_end(p.rects[2 * g]);
      const int32_t y0 = span_start(p.rects[2 * g + 1]), y1 = span_end(p.rects[2 * g + 1]);
      int64_t local = 0;
      for (int32_t ty = y0; ty < y1 && local < kept; ++ty)
        for (int32_t tx = x0; tx < x1 && local < kept; ++tx, ++local)
          visit(static_cast<int64_t>(ty) * tiles_x + tx, g);
    }
  };

  for (int64_t t = 0; t < 2 * num_tiles; ++t) ranges[t] = 0;
  for_each_kept_pair([&](int64_t tile, int32_t) { ++ranges[2 * tile + 1]; });
  int32_t running = 0;
  for (int64_t t = 0; t < num_tiles; ++t) {  // ranges[2t + 1] becomes the write cursor
    const int32_t c = ranges[2 * t + 1];
    ranges[2 * t] = ranges[2 * t + 1] = running;
    running += c;
  }
  for_each_kept_pair([&](int64_t tile, int32_t g) { ids[ranges[2 * tile + 1]++] = g; });
  std::fill(ids + running, ids + capacity, 0);

  int64_t total = 0;
  for (int64_t j = 0; j < m; ++j) total += p.tile_counts[order[j]];
  return total;
}

void project_backward_range(const FrameIn& in, const CameraParams& cam, const int32_t* radii,
                            int64_t g0, int64_t g1, const ProjectionGrads& g, CameraGrads* cg) {
  for (int64_t i = g0; i < g1; ++i) {
    float* v_mean = g.v_means + 3 * i;
    float* v_quat = g.v_quats + 4 * i;
    float* v_scale = g.v_scales + 3 * i;
    if (radii[i] <= 0) {
      std::fill(v_mean, v_mean + 3, 0.0f);
      std::fill(v_quat, v_quat + 4, 0.0f);
      std::fill(v_scale, v_scale + 3, 0.0f);
      continue;
    }
    EwaState st;
    project_one(cam, in.means + 3 * i, in.quats + 4 * i, in.scales + 3 * i, in.opacities[i],
                in.colors + 3 * i, &st);
    project_backward(cam, st, in.means + 3 * i, in.scales + 3 * i, g.v_means2d[2 * i],
                     g.v_means2d[2 * i + 1], g.v_conics + 3 * i, g.v_depths[i], v_mean, v_quat,
                     v_scale, cg);
  }
}

}  // namespace gem
