// EWA projection of one 3D Gaussian and its backward (docs/architecture.md §9, layer 1).
//
// The equations, constants, culling and operation order of gem_jax/render/project.py, in
// scalar C++ (GEM_HD: the same code can serve a CUDA kernel), so that the C++ frame pass
// produces the same means2d, conics, depths, radii and culled set as project_gaussians:
//   q^ = q / |q|, R = R(q^), M = R diag(s), Sigma = M M^T                  (3DGS eq. 6)
//   t = W mu + w, r_z = 1 / t_z, u = f_x t_x r_z + c_x, v = f_y t_y r_z + c_y
//   J = [[f_x r_z, 0, -f_x t~_x r_z^2], [0, f_y r_z, -f_y t~_y r_z^2]] with the frustum clamp
//       t~_x = t_z clip(t_x r_z, -(c_x/f_x + 0.3 tan_x), (W - c_x)/f_x + 0.3 tan_x),
//       tan_x = (W/2)/f_x (likewise y)
//   Sigma' = J W Sigma W^T J^T + 0.3 I = [[a, b], [b, c]],  conic = (c, -b, a) / (ac - b^2)
//   radius = ceil(3 sqrt(lambda_max)), lambda_max = (a+c)/2 + sqrt(((a-c)/2)^2 + b^2)
// Culled (radius 0, all outputs 0): a non-finite parameter or camera entry, a zero
// quaternion, f_x or f_y <= 0, t_z < 0.01, det <= 0, a non-finite radius, or a bounding
// square [u +- r] x [v +- r] entirely off the image.
// XLA contracts a*b+c into fused multiply-adds where it sees fit; this code is compiled with
// -ffp-contract=off, so values can differ from project.py in the last bits (never the
// culling rule itself).
//
// project_backward is the reverse-mode derivative of the same expressions (the chain rule
// written out, recomputing the forward's intermediates): gradients w.r.t. the mean,
// quaternion and scale of a visible Gaussian, and its contribution to the camera's
// gradients (rotation, translation, f_x, f_y, c_x, c_y and the clamp limits).
#pragma once

#include <math.h>
#include <stdint.h>

#include "blend_math.h"  // GEM_HD

namespace gem {

constexpr float kNearPlane = 0.01f;        // camera z below this is culled
constexpr float kEps2d = 0.3f;             // low-pass dilation of the 2D covariance
constexpr float kClampMargin = 0.3f;       // frustum clamp margin (fraction of tan fov)
constexpr float kMaxRadius = 16777216.0f;  // 2^24: radii are clipped here

// One camera after project.py's sanitisation. `ok` false culls every Gaussian.
struct CameraParams {
  float R[9], t[3];  // world -> camera rotation (row-major) and translation
  float fx, fy, cx, cy;
  float tan_x, tan_y;  // (W/2)/f_x, (H/2)/f_y
  float lim_x_pos, lim_x_neg, lim_y_pos, lim_y_neg;
  float width, height;
  bool ok;
};

// Gradients of one camera, accumulated over Gaussians (the clamp limits are turned into
// f and c gradients once, by finish_camera_grads).
struct CameraGrads {
  double R[9], t[3], fx, fy, cx, cy, lim_x_pos, lim_x_neg, lim_y_pos, lim_y_neg;
};

// Screen-space result of one Gaussian (zeros when culled).
struct Splat {
  float u, v, a, b, c, depth;  // means2d, conic (a, b, c), camera z
  int32_t radius;              // 0 = culled
};

GEM_HD bool finite_all(const float* x, int n) {
  bool ok = true;
  for (int i = 0; i < n; ++i) ok = ok & isfinite(x[i]);
  return ok;
}

GEM_HD CameraParams camera_params(const float* viewmat, const float* K, int width, int height) {
  CameraParams cam;
  const bool cam_ok = finite_all(viewmat, 16) & finite_all(K, 9);
  const float fx = cam_ok ? K[0] : 1.0f, fy = cam_ok ? K[4] : 1.0f;
  const bool intr_ok = (fx > 0.0f) & (fy > 0.0f);
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) cam.R[3 * i + j] = cam_ok ? viewmat[4 * i + j] : (i == j ? 1.0f : 0.0f);
    cam.t[i] = cam_ok ? viewmat[4 * i + 3] : 0.0f;
  }
  cam.fx = intr_ok ? fx : 1.0f;
  cam.fy = intr_ok ? fy : 1.0f;
  cam.cx = cam_ok ? K[2] : 0.0f;
  cam.cy = cam_ok ? K[5] : 0.0f;
  cam.width = static_cast<float>(width);
  cam.height = static_cast<float>(height);
  cam.tan_x = static_cast<float>(0.5 * width) / cam.fx;
  cam.tan_y = static_cast<float>(0.5 * height) / cam.fy;
  cam.lim_x_pos = (cam.width - cam.cx) / cam.fx + kClampMargin * cam.tan_x;
  cam.lim_x_neg = cam.cx / cam.fx + kClampMargin * cam.tan_x;
  cam.lim_y_pos = (cam.height - cam.cy) / cam.fy + kClampMargin * cam.tan_y;
  cam.lim_y_neg = cam.cy / cam.fy + kClampMargin * cam.tan_y;
  cam.ok = cam_ok & intr_ok;
  return cam;
}

// R(q^) of a wxyz quaternion, normalised here (row-major).
GEM_HD void quat_to_rotmat(const float* q, float* R, float* qn, float* norm) {
  const float sum = q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3];
  *norm = sqrtf(sum);
  for (int i = 0; i < 4; ++i) qn[i] = q[i] / *norm;
  const float w = qn[0], x = qn[1], y = qn[2], z = qn[3];
  R[0] = 1.0f - 2.0f * (y * y + z * z);
  R[1] = 2.0f * (x * y - w * z);
  R[2] = 2.0f * (x * z + w * y);
  R[3] = 2.0f * (x * y + w * z);
  R[4] = 1.0f - 2.0f * (x * x + z * z);
  R[5] = 2.0f * (y * z - w * x);
  R[6] = 2.0f * (x * z - w * y);
  R[7] = 2.0f * (y * z + w * x);
  R[8] = 1.0f - 2.0f * (x * x + y * y);
}

// C = A B (3x3, row-major), sums in index order.
GEM_HD void matmul3(const float* A, const float* B, float* C) {
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k)
      C[3 * i + k] = A[3 * i] * B[k] + A[3 * i + 1] * B[3 + k] + A[3 * i + 2] * B[6 + k];
}

// C = A B^T (3x3, row-major).
GEM_HD void matmul3_bt(const float* A, const float* B, float* C) {
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k)
      C[3 * i + k] = A[3 * i] * B[3 * k] + A[3 * i + 1] * B[3 * k + 1] + A[3 * i + 2] * B[3 * k + 2];
}

// Every intermediate of one Gaussian's projection (what the backward recomputes).
struct EwaState {
  float qn[4], qnorm, Rq[9], M[9], Sigma[9];  // rotation, R diag(s), 3D covariance
  float x, y, z, rz;                          // camera-space mean, 1 / z
  float xr, yr, xc, yc, tx, ty;               // x r_z, its clamped value, t~_x = z xc (and y)
  float J00, J02, J11, J12;                   // the non-zero entries of J
  float A[9], C[9];                           // W Sigma, C = W Sigma W^T
  float B0[3], B1[3];                         // rows of J C
  float a, b, c, det;
};

// Forward of one Gaussian; returns the splat (radius 0 when culled) and fills `st`.
GEM_HD Splat project_one(const CameraParams& cam, const float* mean, const float* quat,
                         const float* scale, float opacity, const float* color, EwaState* st) {
  Splat out = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0};
  bool ok = cam.ok & finite_all(mean, 3) & finite_all(quat, 4) & finite_all(scale, 3) &
            isfinite(opacity) & finite_all(color, 3) &
            (quat[0] * quat[0] + quat[1] * quat[1] + quat[2] * quat[2] + quat[3] * quat[3] > 0.0f);
  if (!ok) return out;
  const float* W = cam.R;
  st->x = mean[0] * W[0] + mean[1] * W[1] + mean[2] * W[2] + cam.t[0];
  st->y = mean[0] * W[3] + mean[1] * W[4] + mean[2] * W[5] + cam.t[1];
  st->z = mean[0] * W[6] + mean[1] * W[7] + mean[2] * W[8] + cam.t[2];
  if (!(st->z >= kNearPlane)) return out;
  st->rz = 1.0f / st->z;
  st->xr = st->x * st->rz;
  st->yr = st->y * st->rz;
  st->xc = fminf(fmaxf(st->xr, -cam.lim_x_neg), cam.lim_x_pos);
  st->yc = fminf(fmaxf(st->yr, -cam.lim_y_neg), cam.lim_y_pos);
  st->tx = st->z * st->xc;
  st->ty = st->z * st->yc;
  st->J00 = cam.fx * st->rz;
  st->J02 = -cam.fx * st->tx * st->rz * st->rz;
  st->J11 = cam.fy * st->rz;
  st->J12 = -cam.fy * st->ty * st->rz * st->rz;

  quat_to_rotmat(quat, st->Rq, st->qn, &st->qnorm);
  for (int i = 0; i < 3; ++i)
    for (int j = 0; j < 3; ++j) st->M[3 * i + j] = st->Rq[3 * i + j] * scale[j];
  matmul3_bt(st->M, st->M, st->Sigma);
  matmul3(W, st->Sigma, st->A);
  matmul3_bt(st->A, W, st->C);
  const float* C = st->C;
  for (int k = 0; k < 3; ++k) {
    st->B0[k] = st->J00 * C[k] + st->J02 * C[6 + k];
    st->B1[k] = st->J11 * C[3 + k] + st->J12 * C[6 + k];
  }
  const float cov00 = st->B0[0] * st->J00 + st->B0[2] * st->J02;
  const float cov01 = st->B0[1] * st->J11 + st->B0[2] * st->J12;
  const float cov10 = st->B1[0] * st->J00 + st->B1[2] * st->J02;
  const float cov11 = st->B1[1] * st->J11 + st->B1[2] * st->J12;
  st->a = cov00 + kEps2d;
  st->b = 0.5f * (cov01 + cov10);
  st->c = cov11 + kEps2d;
  st->det = st->a * st->c - st->b * st->b;
  if (!(st->det > 0.0f)) return out;

  const float half_diff = 0.5f * (st->a - st->c);
  const float lam = 0.5f * (st->a + st->c) + sqrtf(half_diff * half_diff + st->b * st->b);
  float radius = ceilf(3.0f * sqrtf(fmaxf(lam, 0.0f)));
  if (!isfinite(radius)) return out;
  radius = fminf(radius, kMaxRadius);
  const float u = cam.fx * st->x * st->rz + cam.cx;
  const float v = cam.fy * st->y * st->rz + cam.cy;
  const bool on_screen = (u + radius > 0.0f) & (u - radius < cam.width) & (v + radius > 0.0f) &
                         (v - radius < cam.height);
  if (!on_screen || !(radius > 0.0f)) return out;
  out.u = u;
  out.v = v;
  out.a = st->c / st->det;
  out.b = -st->b / st->det;
  out.c = st->a / st->det;
  out.depth = st->z;
  out.radius = static_cast<int32_t>(radius);
  return out;
}

// Gradients of one visible Gaussian (recomputed `st` from project_one). In: the cotangents of
// u, v, the conic (a, b, c) and the depth. Out: v_mean (3), v_quat (4), v_scale (3); the
// camera's gradients are added to `cg`.
GEM_HD void project_backward(const CameraParams& cam, const EwaState& st, const float* mean,
                             const float* scale,
                             float v_u, float v_v, const float* v_conic, float v_depth,
                             float* v_mean, float* v_quat, float* v_scale, CameraGrads* cg) {
  const float* W = cam.R;
  const float a = st.a, b = st.b, c = st.c, det = st.det, rz = st.rz;
  // conic = (c, -b, a) / det, det = a c - b^2
  const float inv_det = 1.0f / det;
  const float v_det = -(v_conic[0] * c - v_conic[1] * b + v_conic[2] * a) * inv_det * inv_det;
  const float v_a = v_conic[2] * inv_det + v_det * c;
  const float v_b = -v_conic[1] * inv_det - 2.0f * b * v_det;
  const float v_c = v_conic[0] * inv_det + v_det * a;
  // cov2d = J C J^T; G = d/d cov2d (symmetric): v_J = G J (C + C^T), v_C = J^T G J
  const float G00 = v_a, G01 = 0.5f * v_b, G11 = v_c;
  float S[9];  // C + C^T
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) S[3 * i + k] = st.C[3 * i + k] + st.C[3 * k + i];
  // GJ: rows (G00 J0 + G01 J1, G01 J0 + G11 J1) with J0 = (J00, 0, J02), J1 = (0, J11, J12)
  const float GJ0[3] = {G00 * st.J00, G01 * st.J11, G00 * st.J02 + G01 * st.J12};
  const float GJ1[3] = {G01 * st.J00, G11 * st.J11, G01 * st.J02 + G11 * st.J12};
  float vJ0[3], vJ1[3];
  for (int k = 0; k < 3; ++k) {
    vJ0[k] = GJ0[0] * S[k] + GJ0[1] * S[3 + k] + GJ0[2] * S[6 + k];
    vJ1[k] = GJ1[0] * S[k] + GJ1[1] * S[3 + k] + GJ1[2] * S[6 + k];
  }
  float vC[9];  // J^T G J = J0^T GJ0 + J1^T GJ1
  const float J0[3] = {st.J00, 0.0f, st.J02}, J1[3] = {0.0f, st.J11, st.J12};
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) vC[3 * i + k] = J0[i] * GJ0[k] + J1[i] * GJ1[k];

  // J entries -> f, r_z and t~
  const float vJ00 = vJ0[0], vJ02 = vJ0[2], vJ11 = vJ1[1], vJ12 = vJ1[2];
  float v_fx = vJ00 * rz - vJ02 * st.tx * rz * rz;
  float v_fy = vJ11 * rz - vJ12 * st.ty * rz * rz;
  float v_rz = vJ00 * cam.fx + vJ11 * cam.fy - 2.0f * rz * (vJ02 * cam.fx * st.tx + vJ12 * cam.fy * st.ty);
  const float v_tx = -vJ02 * cam.fx * rz * rz, v_ty = -vJ12 * cam.fy * rz * rz;
  // t~ = z clip(x r_z, lo, hi)
  float v_x = 0.0f, v_y = 0.0f, v_z = v_tx * st.xc + v_ty * st.yc + v_depth;
  const float v_xc = v_tx * st.z, v_yc = v_ty * st.z;
  float v_xr = 0.0f, v_yr = 0.0f;
  if (st.xr < -cam.lim_x_neg) cg->lim_x_neg -= v_xc;
  else if (st.xr > cam.lim_x_pos) cg->lim_x_pos += v_xc;
  else v_xr = v_xc;
  if (st.yr < -cam.lim_y_neg) cg->lim_y_neg -= v_yc;
  else if (st.yr > cam.lim_y_pos) cg->lim_y_pos += v_yc;
  else v_yr = v_yc;
  v_x += v_xr * rz;
  v_y += v_yr * rz;
  v_rz += v_xr * st.x + v_yr * st.y;
  // u = f_x x r_z + c_x, v = f_y y r_z + c_y
  v_fx += v_u * st.x * rz;
  v_fy += v_v * st.y * rz;
  v_x += v_u * cam.fx * rz;
  v_y += v_v * cam.fy * rz;
  v_rz += v_u * cam.fx * st.x + v_v * cam.fy * st.y;
  cg->fx += v_fx;
  cg->fy += v_fy;
  cg->cx += v_u;
  cg->cy += v_v;
  // r_z = 1 / z
  v_z -= v_rz * rz * rz;
  // t = W mu + w
  const float v_p[3] = {v_x, v_y, v_z};
  for (int j = 0; j < 3; ++j) v_mean[j] = W[j] * v_p[0] + W[3 + j] * v_p[1] + W[6 + j] * v_p[2];
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) cg->R[3 * i + j] += v_p[i] * mean[j];
    cg->t[i] += v_p[i];
  }
  // C = W Sigma W^T: v_Sigma = W^T vC W, v_W += vC W Sigma^T + vC^T W Sigma = (vC + vC^T) A
  // (A = W Sigma, Sigma symmetric up to rounding; vC is symmetric by construction)
  float WtvC[9], vSigma[9];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k)
      WtvC[3 * i + k] = W[i] * vC[k] + W[3 + i] * vC[3 + k] + W[6 + i] * vC[6 + k];
  matmul3(WtvC, W, vSigma);
  // v_M = (v_Sigma + v_Sigma^T) M
  float vS[9], vM[9];
  for (int i = 0; i < 3; ++i)
    for (int k = 0; k < 3; ++k) vS[3 * i + k] = vSigma[3 * i + k] + vSigma[3 * k + i];
  matmul3(vS, st.M, vM);
  float vR[9];
  for (int j = 0; j < 3; ++j) {
    v_scale[j] = vM[j] * st.Rq[j] + vM[3 + j] * st.Rq[3 + j] + vM[6 + j] * st.Rq[6 + j];
    for (int i = 0; i < 3; ++i) vR[3 * i + j] = vM[3 * i + j] * scale[j];
  }
  // R(q^) -> q^
  const float w = st.qn[0], x = st.qn[1], y = st.qn[2], z = st.qn[3];
  const float* g = vR;
  float vq[4];
  vq[0] = 2.0f * (-z * g[1] + y * g[2] + z * g[3] - x * g[5] - y * g[6] + x * g[7]);
  vq[1] = 2.0f * (y * g[1] + z * g[2] + y * g[3] - 2.0f * x * g[4] - w * g[5] + z * g[6] + w * g[7] -
                  2.0f * x * g[8]);
  vq[2] = 2.0f * (-2.0f * y * g[0] + x * g[1] + w * g[2] + x * g[3] + z * g[5] - w * g[6] + z * g[7] -
                  2.0f * y * g[8]);
  vq[3] = 2.0f * (-2.0f * z * g[0] - w * g[1] + x * g[2] + w * g[3] - 2.0f * z * g[4] + y * g[5] +
                  x * g[6] + y * g[7]);
  // q^ = q / |q|
  const float dot = w * vq[0] + x * vq[1] + y * vq[2] + z * vq[3];
  for (int i = 0; i < 4; ++i) v_quat[i] = (vq[i] - st.qn[i] * dot) / st.qnorm;
  // camera rotation: from t = W mu + w and from C = W Sigma W^T
  const float vCs[9] = {2.0f * vC[0], vC[1] + vC[3], vC[2] + vC[6], vC[3] + vC[1], 2.0f * vC[4],
                        vC[5] + vC[7], vC[6] + vC[2], vC[7] + vC[5], 2.0f * vC[8]};
  float vW[9];
  matmul3(vCs, st.A, vW);
  for (int i = 0; i < 9; ++i) cg->R[i] += vW[i];
}

// The camera's gradients as (4, 4) viewmat and (3, 3) K cotangents. The clamp limits
// l = (W - c_x)/f_x + 0.3 (W/2)/f_x and (c_x/f_x + ...) have d l / d f_x = -l / f_x.
GEM_HD void finish_camera_grads(const CameraParams& cam, const CameraGrads& cg, float* v_viewmat,
                                float* v_K) {
  for (int i = 0; i < 16; ++i) v_viewmat[i] = 0.0f;
  for (int i = 0; i < 9; ++i) v_K[i] = 0.0f;
  if (!cam.ok) return;
  for (int i = 0; i < 3; ++i) {
    for (int j = 0; j < 3; ++j) v_viewmat[4 * i + j] = static_cast<float>(cg.R[3 * i + j]);
    v_viewmat[4 * i + 3] = static_cast<float>(cg.t[i]);
  }
  const double fx = cam.fx, fy = cam.fy;
  v_K[0] = static_cast<float>(cg.fx - (cg.lim_x_pos * cam.lim_x_pos + cg.lim_x_neg * cam.lim_x_neg) / fx);
  v_K[4] = static_cast<float>(cg.fy - (cg.lim_y_pos * cam.lim_y_pos + cg.lim_y_neg * cam.lim_y_neg) / fy);
  v_K[2] = static_cast<float>(cg.cx + (cg.lim_x_neg - cg.lim_x_pos) / fx);
  v_K[5] = static_cast<float>(cg.cy + (cg.lim_y_neg - cg.lim_y_pos) / fy);
}

}  // namespace gem
