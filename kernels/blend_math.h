// Per-pixel alpha-blending math of the tile rasterizer (docs/architecture.md §9, layer 3).
//
// One header shared by every blending backend: it compiles as plain C++ (the CPU kernel,
// blend_cpu.cc) and as CUDA device code (the CUDA kernel of a later issue) through GEM_HD.
// Everything here works on one pixel and one Gaussian, with scalars only, and is written
// without data-dependent branches (selects instead of ifs) so that the CPU kernel's loop
// over the 16 pixels of a tile row vectorises.
//
// The rule, identical to gem_jax/render/reference.py (pixel centre p = (j + 0.5, i + 0.5)):
//   d = mean2d - p,   sigma = 0.5 (a dx^2 + c dy^2) + b dx dy     (conic = (a, b, c))
//   skip if sigma < 0;   alpha = min(0.99, o exp(-sigma));   skip if alpha < 1/255
//   T_next = T (1 - alpha);   if T_next < 1e-4: stop (this Gaussian excluded)
//   C += alpha T colour;   D += alpha T depth;   T = T_next
//   image = C + T background,   alpha_out = 1 - T,   depth_out = D
// NaN parameters never contribute (every comparison above is written so NaN fails it).
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define GEM_HD __host__ __device__ __forceinline__
#else
#define GEM_HD inline __attribute__((always_inline))
#endif

namespace gem {

constexpr int kTileSize = 16;                    // tiles are kTileSize x kTileSize pixels
constexpr float kAlphaMax = 0.99f;               // alpha clamp
constexpr float kAlphaMin = 1.0f / 255.0f;       // smaller alphas are skipped
constexpr float kTransmittanceMin = 1e-4f;       // blending stops below this
constexpr int kGradWidth = 10;                   // per-intersection gradient record, below

// Offsets into a per-intersection gradient record of kGradWidth floats.
enum GradSlot : int {
  kGradMeanX = 0, kGradMeanY = 1,
  kGradConicA = 2, kGradConicB = 3, kGradConicC = 4,
  kGradColorR = 5, kGradColorG = 6, kGradColorB = 7,
  kGradOpacity = 8, kGradDepth = 9,
};

GEM_HD float bits_to_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  return __builtin_bit_cast(float, i);
#endif
}

// exp(x), Cephes' single-precision polynomial (about 1 ulp), branch-free so it vectorises
// and gives the same bits on every backend. Inputs below -87 return exp(-87) (no denormals).
GEM_HD float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);
}

// Mahalanobis-type exponent of a Gaussian at offset d = mean2d - pixel centre.
GEM_HD float gaussian_sigma(float a, float b, float c, float dx, float dy) {
  return 0.5f * (a * dx * dx + c * dy * dy) + b * dx * dy;
}

// Opacity-weighted falloff before the clamp: o exp(-sigma). `vis` receives exp(-sigma).
GEM_HD float raw_alpha(float opacity, float sigma, float* vis) {
  *vis = exp_approx(-sigma);
  return opacity * *vis;
}

// alpha = min(kAlphaMax, raw); NaN stays NaN (and is then skipped).
GEM_HD float clamp_alpha(float raw) { return raw > kAlphaMax ? kAlphaMax : raw; }

// Whether a Gaussian takes part at all (before the stop test): sigma >= 0 and alpha >= 1/255.
// Tested on the unclamped o exp(-sigma), which is equivalent (0.99 > 1/255) and keeps the
// compiler from turning the clamp into a branch.
GEM_HD bool alpha_passes(float sigma, float raw) {
  return (sigma >= 0.0f) & (raw >= kAlphaMin);
}

// Forward test of one Gaussian at one pixel with transmittance T. `live` says the pixel has
// not stopped yet. Returns whether the Gaussian contributes, with weight alpha T (else 0);
// clears `live` when it is the stopping one. The caller then updates
// T *= 1 - (contributes ? alpha : 0) (the same product as the stop test used).
GEM_HD bool blend_forward_step(float alpha, bool passes, bool* live, float T, float* weight) {
  const float T_next = T * (1.0f - alpha);
  const bool active = passes & *live;
  const bool stop = active & (T_next < kTransmittanceMin);
  const bool contributes = active & !stop;
  *weight = contributes ? alpha * T : 0.0f;
  *live = *live & !stop;
  return contributes;
}

// Gradients of one contributing Gaussian at one pixel, walking back to front (3DGS/gsplat).
// In: T = transmittance just after this Gaussian, S = (colour r,g,b, depth) accumulated from
// the Gaussians behind it (weights times values), the pixel's output cotangents v_C, v_A, v_D,
// its final transmittance T_final and the background. Out: this Gaussian's gradient terms in
// `g` (kGradWidth floats, see GradSlot), its weight `w` = alpha T_before, and `T_scale` with
// T_before = T * T_scale. The caller moves its state before this Gaussian with
// T *= T_scale and S += w * (colour, depth).
GEM_HD void blend_backward_step(float dx, float dy, float a, float b, float c, float cr,
                                float cg, float cb, float depth, float raw, float vis, float T,
                                const float* S, const float* v_C, float v_A, float v_D,
                                float T_final, const float* bg, float* g, float* w,
                                float* T_scale) {
  const float alpha = clamp_alpha(raw);
  const float one_minus = 1.0f - alpha;
  const float inv_one_minus = 1.0f / one_minus;
  const float T_k = T * inv_one_minus;
  *T_scale = inv_one_minus;
  *w = alpha * T_k;
  g[kGradColorR] = *w * v_C[0];
  g[kGradColorG] = *w * v_C[1];
  g[kGradColorB] = *w * v_C[2];
  g[kGradDepth] = *w * v_D;
  float v_alpha = v_C[0] * (T_k * cr - (S[0] + T_final * bg[0]) * inv_one_minus);
  v_alpha += v_C[1] * (T_k * cg - (S[1] + T_final * bg[1]) * inv_one_minus);
  v_alpha += v_C[2] * (T_k * cb - (S[2] + T_final * bg[2]) * inv_one_minus);
  v_alpha += v_D * (T_k * depth - S[3] * inv_one_minus);
  v_alpha += v_A * T_final * inv_one_minus;
  const bool clamped = raw > kAlphaMax;  // min(0.99, .) has zero slope there
  const float v_sigma = clamped ? 0.0f : -raw * v_alpha;
  g[kGradOpacity] = clamped ? 0.0f : vis * v_alpha;
  g[kGradMeanX] = (a * dx + b * dy) * v_sigma;
  g[kGradMeanY] = (b * dx + c * dy) * v_sigma;
  g[kGradConicA] = 0.5f * dx * dx * v_sigma;
  g[kGradConicB] = dx * dy * v_sigma;
  g[kGradConicC] = 0.5f * dy * dy * v_sigma;
}

// An upper bound of ln(x) for finite x > 0, at most 0.31 above it and cheap (no libm call):
// x = 2^e (1 + m) with m in [0, 1), and ln(1 + m) <= m.
GEM_HD float log_upper_bound(float x) {
#if defined(__CUDA_ARCH__)
  const int32_t bits = __float_as_int(x);
#else
  const int32_t bits = __builtin_bit_cast(int32_t, x);
#endif
  const int32_t e = ((bits >> 23) & 0xff) - 127;
  const float m = bits_to_float((bits & 0x007fffff) | 0x3f800000) - 1.0f;
  return static_cast<float>(e) * 0.693147182f + m;
}

// Culling bound: a Gaussian can pass the alpha test only where sigma <= ln(255 o). Returns a
// slightly loose upper bound of that threshold (never too tight), or a negative number when
// the Gaussian passes nowhere (o < 1/255, or NaN).
GEM_HD float visible_sigma_bound(float opacity) {
  const float ratio = opacity * 255.0f;
  if (!(ratio >= 0.999f)) return -1.0f;
  const float log_ratio = log_upper_bound(ratio);
  return (log_ratio > 0.0f ? log_ratio : 0.0f) + 1e-3f;
}

}  // namespace gem
