"""Rigid transforms of Gaussians and the quaternion algebra they need.

Both the teacher (``teacher/maps.py``: per-texel TBN deformation, then the head's root pose)
and the distilled GEM (``eigen/``: the root pose applied to the evaluated canonical
Gaussians, docs/architecture.md §1) place Gaussians with a rigid ``4×4`` transform ``[R | t]``:

    x ↦ R x + t,      q ↦ q(R) ⊗ q      (wxyz quaternions, gsplat's layout).

Pure ``jax.numpy``; jittable and differentiable.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from gem_jax.types import Gaussians

__all__ = ["quat_multiply", "rigid_transform", "rotmat_to_quat"]


def rotmat_to_quat(m: Float[Array, "*b 3 3"]) -> Float[Array, "*b 4"]:
    """wxyz unit quaternions of rotation matrices (Shepperd's method: the best-conditioned of
    four candidate formulas per matrix, so no division by a small number), sign ``w ≥ 0``."""
    m = jnp.asarray(m)
    m00, m11, m22 = m[..., 0, 0], m[..., 1, 1], m[..., 2, 2]
    trace = m00 + m11 + m22
    candidates = jnp.stack([
        jnp.stack([1 + trace, m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1),
        jnp.stack([m[..., 2, 1] - m[..., 1, 2], 1 + m00 - m11 - m22, m[..., 0, 1] + m[..., 1, 0], m[..., 0, 2] + m[..., 2, 0]], -1),
        jnp.stack([m[..., 0, 2] - m[..., 2, 0], m[..., 0, 1] + m[..., 1, 0], 1 - m00 + m11 - m22, m[..., 1, 2] + m[..., 2, 1]], -1),
        jnp.stack([m[..., 1, 0] - m[..., 0, 1], m[..., 0, 2] + m[..., 2, 0], m[..., 1, 2] + m[..., 2, 1], 1 - m00 - m11 + m22], -1),
    ], axis=-2)  # (..., 4 candidates, 4); candidate k has component k equal to 4·q_k²
    best = jnp.argmax(jnp.stack([trace, m00, m11, m22], -1), axis=-1)
    q = jnp.take_along_axis(candidates, best[..., None, None], axis=-2)[..., 0, :]
    q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
    return jnp.where(q[..., :1] < 0, -q, q)


def quat_multiply(a: Float[Array, "*b 4"], b: Float[Array, "*b 4"]) -> Float[Array, "*b 4"]:
    """Hamilton product ``a ⊗ b`` of wxyz quaternions (``R(a ⊗ b) = R(a) R(b)``)."""
    aw, ax, ay, az = jnp.moveaxis(a, -1, 0)
    bw, bx, by, bz = jnp.moveaxis(b, -1, 0)
    return jnp.stack([
        aw * bw - ax * bx - ay * by - az * bz,
        aw * bx + ax * bw + ay * bz - az * by,
        aw * by - ax * bz + ay * bw + az * bx,
        aw * bz + ax * by - ay * bx + az * bw,
    ], axis=-1)


def rigid_transform(gaussians: Gaussians, transform: Float[Array, "4 4"]) -> Gaussians:
    """Apply a rigid ``transform`` (4×4, rotation + translation) to means and rotations."""
    rot, trans = transform[:3, :3], transform[:3, 3]
    means = gaussians.means @ rot.T + trans
    quats = quat_multiply(jnp.broadcast_to(rotmat_to_quat(rot), gaussians.quats.shape), gaussians.quats)
    return gaussians.replace(means=means, quats=quats)

