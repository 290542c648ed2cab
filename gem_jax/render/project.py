"""EWA projection of 3D Gaussians to screen-space conics (docs/architecture.md §9, layer 1).

For one pinhole camera (OpenCV axes, world→camera ``viewmat``, intrinsics ``K``) each
Gaussian ``(μ, q, s)`` is projected as in 3D Gaussian Splatting (Kerbl et al. 2023, §4,
eqs. 5–6) following EWA splatting (Zwicker et al. 2001, eqs. 31–34), with gsplat's
numerics:

* 3D covariance ``Σ = R S Sᵀ Rᵀ`` (3DGS eq. 6), ``R`` from the normalised wxyz quaternion,
  ``S = diag(s)``.
* Camera space ``t = W μ + w`` with ``W, w`` the rotation and translation of ``viewmat``.
* Pixel position ``u = f_x t_x / t_z + c_x``, ``v = f_y t_y / t_z + c_y`` — pixel centres
  sit at ``j + 0.5`` (docs/architecture.md §3), so no half-pixel shift appears here.
* 2D covariance ``Σ' = J W Σ Wᵀ Jᵀ`` (3DGS eq. 5) with the affine Jacobian of the
  perspective map at ``t`` (EWA eq. 29)::

      J = [[f_x / t_z, 0, −f_x t̃_x / t_z²],
           [0, f_y / t_z, −f_y t̃_y / t_z²]]

  where ``t̃_x / t_z`` is clamped to ``[−(c_x / f_x + 0.3 τ_x), (W − c_x) / f_x + 0.3 τ_x]``
  with ``τ_x = W / (2 f_x)`` (and likewise in y): the 3DGS/gsplat frustum clamp (±1.3 tan fov
  for a centred principal point), written so that an off-centre principal point is honoured.
* Low-pass dilation ``Σ' + 0.3 I`` (3DGS's anti-aliasing filter, gsplat ``eps2d``); the
  returned conic is ``(a, b, c)`` with ``[[a, b], [b, c]] = (Σ' + 0.3 I)⁻¹``.
* Radius ``r = ⌈3 √λ_max⌉`` of the dilated covariance (λ_max computed exactly as
  ``(a + c)/2 + √(((a − c)/2)² + b²)``; 3DGS adds a 0.1 floor under the square root).

Culling (radius 0, every other output 0): any non-finite Gaussian parameter or camera entry,
a zero quaternion, depth ``t_z < 0.01`` (near plane), a degenerate 2D covariance
(``det ≤ 0``) and a bounding square ``[u ± r] × [v ± r]`` entirely off the image. Bad values
are replaced by safe constants *before* the arithmetic ("double where"), so culled Gaussians
get exactly zero, never NaN, gradients.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from gem_jax.types import Camera, Gaussians

__all__ = ["NEAR_PLANE", "EPS_2D", "Projected", "project_gaussians", "quat_to_rotmat", "covariance_3d"]

NEAR_PLANE = 0.01  # Gaussians closer than this (camera z) are culled
EPS_2D = 0.3  # low-pass dilation added to the 2D covariance diagonal (pixels²)
CLAMP_MARGIN = 0.3  # frustum clamp: 30 % of the half field of view beyond the image edges
_MAX_RADIUS = 2.0**24  # radii are clipped here before the int cast (a screen-filling splat)


@flax.struct.dataclass
class Projected:
    """Screen-space Gaussians of one camera (gsplat's names).

    ``means2d`` pixel coordinates, ``conics`` the upper triangle ``(a, b, c)`` of the inverse
    dilated 2D covariance, ``depths`` camera-space z, ``radii`` the 3σ bounding-square
    half-size in pixels (0 = culled), ``opacities`` and ``colors`` passed through (0 when culled).
    """

    means2d: Float[Array, "*batch N 2"]
    conics: Float[Array, "*batch N 3"]
    depths: Float[Array, "*batch N"]
    radii: Int[Array, "*batch N"]
    opacities: Float[Array, "*batch N"]
    colors: Float[Array, "*batch N 3"]


def quat_to_rotmat(quats: Float[Array, "N 4"]) -> Float[Array, "N 3 3"]:
    """Rotation matrices of wxyz quaternions (normalised here; the caller excludes zero ones)."""
    q = quats / jnp.linalg.norm(quats, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def covariance_3d(quats: Float[Array, "N 4"], scales: Float[Array, "N 3"]) -> Float[Array, "N 3 3"]:
    """``Σ = R S Sᵀ Rᵀ`` (3DGS eq. 6)."""
    m = quat_to_rotmat(quats) * scales[..., None, :]  # R S
    return m @ jnp.swapaxes(m, -1, -2)


def _all_finite(x: Array, axes) -> Array:
    return jnp.all(jnp.isfinite(x), axis=axes)


def project_gaussians(g: Gaussians, cam: Camera) -> Projected:
    """EWA-project ``g`` into ``cam`` (one camera; ``jax.vmap`` for several).

    Returns a :class:`Projected` with ``means2d (N,2)``, ``conics (N,3)``, ``depths (N,)``,
    ``radii (N,) int32``, ``opacities (N,)``, ``colors (N,3)``; see the module docstring for
    the equations and the culling rules. Differentiable w.r.t. every float input (the
    Gaussians and the camera); culled Gaussians receive zero gradients.
    """
    width, height = int(cam.width), int(cam.height)
    dtype = jnp.result_type(g.means.dtype, cam.viewmat.dtype)
    means, quats, scales = g.means.astype(dtype), g.quats.astype(dtype), g.scales.astype(dtype)
    opacities, colors = g.opacities.astype(dtype), g.colors.astype(dtype)

    # --- sanitise inputs: a bad camera culls everything, a bad Gaussian only itself ---------
    cam_ok = _all_finite(cam.viewmat, (-2, -1)) & _all_finite(cam.K, (-2, -1))
    viewmat = jnp.where(cam_ok, cam.viewmat.astype(dtype), jnp.eye(4, dtype=dtype))
    K = jnp.where(cam_ok, cam.K.astype(dtype), jnp.eye(3, dtype=dtype))
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    intr_ok = (fx > 0) & (fy > 0)
    fx, fy = jnp.where(intr_ok, fx, 1.0), jnp.where(intr_ok, fy, 1.0)

    ok = (
        _all_finite(means, -1)
        & _all_finite(quats, -1)
        & _all_finite(scales, -1)
        & jnp.isfinite(opacities)
        & _all_finite(colors, -1)
        & (jnp.sum(quats * quats, axis=-1) > 0)
        & cam_ok
        & intr_ok
    )
    means = jnp.where(ok[:, None], means, 0.0)
    quats = jnp.where(ok[:, None], quats, jnp.array([1.0, 0.0, 0.0, 0.0], dtype))
    scales = jnp.where(ok[:, None], scales, 1.0)

    # --- camera space and near-plane culling --------------------------------------------------
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    p_cam = means @ rot.T + trans
    in_front = p_cam[:, 2] >= NEAR_PLANE
    ok = ok & in_front
    p_cam = jnp.where(ok[:, None], p_cam, jnp.array([0.0, 0.0, 1.0], dtype))
    x, y, z = p_cam[:, 0], p_cam[:, 1], p_cam[:, 2]
    rz = 1.0 / z

    # --- EWA: Σ' = J W Σ Wᵀ Jᵀ with the gsplat frustum clamp of J ------------------------------
    tan_fovx, tan_fovy = 0.5 * width / fx, 0.5 * height / fy
    lim_x_pos = (width - cx) / fx + CLAMP_MARGIN * tan_fovx
    lim_x_neg = cx / fx + CLAMP_MARGIN * tan_fovx
    lim_y_pos = (height - cy) / fy + CLAMP_MARGIN * tan_fovy
    lim_y_neg = cy / fy + CLAMP_MARGIN * tan_fovy
    tx = z * jnp.clip(x * rz, -lim_x_neg, lim_x_pos)
    ty = z * jnp.clip(y * rz, -lim_y_neg, lim_y_pos)
    zeros = jnp.zeros_like(z)
    jac = jnp.stack(
        [
            jnp.stack([fx * rz, zeros, -fx * tx * rz * rz], -1),
            jnp.stack([zeros, fy * rz, -fy * ty * rz * rz], -1),
        ],
        -2,
    )  # (N, 2, 3)
    cov_cam = rot @ covariance_3d(quats, scales) @ rot.T  # W Σ Wᵀ
    cov2d = jac @ cov_cam @ jnp.swapaxes(jac, -1, -2)
    a = cov2d[:, 0, 0] + EPS_2D
    b = 0.5 * (cov2d[:, 0, 1] + cov2d[:, 1, 0])
    c = cov2d[:, 1, 1] + EPS_2D
    det = a * c - b * b
    ok = ok & (det > 0)
    det = jnp.where(ok, det, 1.0)
    conics = jnp.stack([c / det, -b / det, a / det], -1)

    # --- 3σ radius of the dilated covariance, screen culling ----------------------------------
    a_, b_, c_ = (jax.lax.stop_gradient(v) for v in (a, b, c))
    lam_max = 0.5 * (a_ + c_) + jnp.sqrt(jnp.square(0.5 * (a_ - c_)) + b_ * b_)
    radius = jnp.ceil(3.0 * jnp.sqrt(jnp.maximum(lam_max, 0.0)))
    radius = jnp.where(ok & jnp.isfinite(radius), jnp.minimum(radius, _MAX_RADIUS), 0.0)
    means2d = jnp.stack([fx * x * rz + cx, fy * y * rz + cy], -1)
    u, v = jax.lax.stop_gradient(means2d[:, 0]), jax.lax.stop_gradient(means2d[:, 1])
    on_screen = (u + radius > 0) & (u - radius < width) & (v + radius > 0) & (v - radius < height)
    ok = ok & on_screen & (radius > 0)

    return Projected(
        means2d=jnp.where(ok[:, None], means2d, 0.0),
        conics=jnp.where(ok[:, None], conics, 0.0),
        depths=jnp.where(ok, z, 0.0),
        radii=jnp.where(ok, radius, 0.0).astype(jnp.int32),
        opacities=jnp.where(ok, opacities, 0.0),
        colors=jnp.where(ok[:, None], colors, 0.0),
    )
