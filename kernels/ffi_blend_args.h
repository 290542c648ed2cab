// Operands of the blending-only kernels' XLA FFI handlers (docs/architecture.md §9): the CUDA
// ones (blend_cuda.cu, also compiled against the SIMT emulator), which blend the tile lists of
// gem_jax/render/tiles.py. Shape checks with messages naming the field, the views of one
// batch element of the buffers (leading dimensions from `vmap`, vmap_method="broadcast_all"),
// and the operand lists of the handlers. (The CPU pass, ffi_cpu.cc, renders whole frames and
// has its own operands.)
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "blend_math.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace gem {

// One batch element's inputs (pointers into the FFI buffers).
struct Scene {
  const float* means2d;     // (N, 2)
  const float* conics;      // (N, 3)
  const float* colors;      // (N, 3)
  const float* opacities;   // (N,)
  const float* depths;      // (N,)
  const float* background;  // (3,)
  const int32_t* ids;       // (M,) tile lists, per tile front to back
  const int32_t* ranges;    // (T, 2) [start, end) per tile
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

// Batch size (product of the leading dimensions) and per-element sizes.
struct Sizes {
  int64_t batch, n, m, tiles;
};

inline ffi::Error check_inputs(ffi::Buffer<ffi::F32>& means2d, ffi::Buffer<ffi::F32>& conics,
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

// The forward's outputs: image (..., H, W, 3) and last (..., H, W) (alpha, depth and
// transmittance are declared with the same shapes by the Python side).
inline ffi::Error check_forward_outputs(const Sizes& sz, int64_t hw, ffi::ResultBuffer<ffi::F32>& image,
                                        ffi::ResultBuffer<ffi::S32>& last) {
  if (image->element_count() != static_cast<size_t>(sz.batch * hw * 3) ||
      last->element_count() != static_cast<size_t>(sz.batch * hw))
    return ffi::Error::InvalidArgument("gem blend: output shapes do not match (H, W)");
  return ffi::Error::Success();
}

// The backward's image-shaped inputs.
inline ffi::Error check_backward_inputs(const Sizes& sz, int64_t hw, ffi::Buffer<ffi::F32>& transmittance,
                                        ffi::Buffer<ffi::S32>& last, ffi::Buffer<ffi::F32>& v_image,
                                        ffi::Buffer<ffi::F32>& v_alpha, ffi::Buffer<ffi::F32>& v_depth) {
  if (transmittance.element_count() != static_cast<size_t>(sz.batch * hw) ||
      last.element_count() != static_cast<size_t>(sz.batch * hw) ||
      v_image.element_count() != static_cast<size_t>(sz.batch * hw * 3) ||
      v_alpha.element_count() != static_cast<size_t>(sz.batch * hw) ||
      v_depth.element_count() != static_cast<size_t>(sz.batch * hw))
    return ffi::Error::InvalidArgument("gem blend: backward image-shaped inputs do not match");
  return ffi::Error::Success();
}

// Batch element b of views whose element 0 is given (b counts over the leading dimensions).
GEM_HD Scene batch_element(Scene s, int64_t b, int64_t tiles) {
  s.means2d += b * s.n * 2;
  s.conics += b * s.n * 3;
  s.colors += b * s.n * 3;
  s.opacities += b * s.n;
  s.depths += b * s.n;
  s.background += b * 3;
  s.ids += b * s.m;
  s.ranges += b * tiles * 2;
  return s;
}

GEM_HD ForwardOut batch_element(ForwardOut o, int64_t b, int64_t hw) {
  return {o.image + b * hw * 3, o.alpha + b * hw, o.depth + b * hw, o.transmittance + b * hw,
          o.last + b * hw};
}

GEM_HD BackwardIn batch_element(BackwardIn in, int64_t b, int64_t hw) {
  return {in.transmittance + b * hw, in.last + b * hw, in.v_image + b * hw * 3,
          in.v_alpha + b * hw, in.v_depth + b * hw};
}

GEM_HD GaussianGrads batch_element(GaussianGrads g, int64_t b, int64_t n) {
  return {g.v_means2d + b * n * 2, g.v_conics + b * n * 3, g.v_colors + b * n * 3,
          g.v_opacities + b * n, g.v_depths + b * n};
}

// Views of batch element 0 of the FFI buffers.
inline Scene make_scene(const Sizes& sz, ffi::Buffer<ffi::F32>& means2d, ffi::Buffer<ffi::F32>& conics,
                        ffi::Buffer<ffi::F32>& colors, ffi::Buffer<ffi::F32>& opacities,
                        ffi::Buffer<ffi::F32>& depths, ffi::Buffer<ffi::F32>& background,
                        ffi::Buffer<ffi::S32>& ids, ffi::Buffer<ffi::S32>& ranges, int width, int height) {
  return {means2d.typed_data(), conics.typed_data(),     colors.typed_data(),
          opacities.typed_data(), depths.typed_data(), background.typed_data(),
          ids.typed_data(),     ranges.typed_data(),     sz.n,
          sz.m,                 width,                   height,
          (width + kTileSize - 1) / kTileSize};
}

// --- operand lists of the handlers' ffi::Ffi::Bind() chains, in order ----------------------
// forward:  bind_sizes(bind_forward_results(bind_inputs(Bind().Ctx<...>())))
// backward: bind_sizes(bind_gradient_results(bind_backward_inputs(bind_inputs(...))) [+ Ret])

template <typename B>
auto bind_inputs(B b) {
  return std::move(b).template Arg<ffi::Buffer<ffi::F32>>()  // means2d
      .template Arg<ffi::Buffer<ffi::F32>>()                 // conics
      .template Arg<ffi::Buffer<ffi::F32>>()                 // colors
      .template Arg<ffi::Buffer<ffi::F32>>()                 // opacities
      .template Arg<ffi::Buffer<ffi::F32>>()                 // depths
      .template Arg<ffi::Buffer<ffi::F32>>()                 // background
      .template Arg<ffi::Buffer<ffi::S32>>()                 // gaussian_ids
      .template Arg<ffi::Buffer<ffi::S32>>();                // tile_ranges
}

template <typename B>
auto bind_forward_results(B b) {
  return std::move(b).template Ret<ffi::Buffer<ffi::F32>>()  // image
      .template Ret<ffi::Buffer<ffi::F32>>()                 // alpha
      .template Ret<ffi::Buffer<ffi::F32>>()                 // depth
      .template Ret<ffi::Buffer<ffi::F32>>()                 // final transmittance
      .template Ret<ffi::Buffer<ffi::S32>>();                // last contributor
}

template <typename B>
auto bind_backward_inputs(B b) {
  return std::move(b).template Arg<ffi::Buffer<ffi::F32>>()  // final transmittance
      .template Arg<ffi::Buffer<ffi::S32>>()                 // last contributor
      .template Arg<ffi::Buffer<ffi::F32>>()                 // v_image
      .template Arg<ffi::Buffer<ffi::F32>>()                 // v_alpha
      .template Arg<ffi::Buffer<ffi::F32>>();                // v_depth
}

template <typename B>
auto bind_gradient_results(B b) {
  return std::move(b).template Ret<ffi::Buffer<ffi::F32>>()  // v_means2d
      .template Ret<ffi::Buffer<ffi::F32>>()                 // v_conics
      .template Ret<ffi::Buffer<ffi::F32>>()                 // v_colors
      .template Ret<ffi::Buffer<ffi::F32>>()                 // v_opacities
      .template Ret<ffi::Buffer<ffi::F32>>();                // v_depths
}

template <typename B>
auto bind_sizes(B b) {
  return std::move(b).template Attr<int32_t>("width").template Attr<int32_t>("height");
}

}  // namespace gem
