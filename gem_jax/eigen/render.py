"""Rendering a GEM: coefficients → Gaussians in the world → image (DESIGN §1, §8).

The distilled avatar animates with no neural network: for coefficients ``k`` (σ units) and
the head's rigid root pose ``P = [R | t]`` (world ← head frame),

    G(k) = mean + (k·σ) @ U          (per modality, :func:`gem_jax.eigen.model.evaluate`)
    G_world = P ∘ G(k)               (:func:`gem_jax.rigid.rigid_transform`)
    image = rasterize(G_world, camera, background)

:func:`render_batch` is that pipeline for a batch of frames, jitted once per image size,
backend and capacity. :func:`frame_capacity` sizes the static intersection capacity from the
exact counts of a few frames (eager), with headroom, so a batch never overflows in practice;
an overflow is still reported in ``stats`` (and raised by :func:`render_exact`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gem_jax.eigen.model import GEM
from gem_jax.render import RenderOutput, count_intersections, rasterize, round_capacity
from gem_jax.rigid import rigid_transform
from gem_jax.types import Camera, Gaussians

__all__ = ["frame_capacity", "render_batch", "render_exact", "world_gaussians"]


def world_gaussians(model: GEM, k: Float[Array, "Ktot"], root: Float[Array, "4 4"],
                    clamp: float | None = None) -> Gaussians:
    """The Gaussians of coefficients ``k`` placed by the root pose (one frame)."""
    return rigid_transform(model.evaluate(k, clamp=clamp), root)


@functools.partial(jax.jit, static_argnames=("width", "height", "capacity", "backend", "clamp"))
def render_batch(model: GEM, k: Float[Array, "B Ktot"], roots: Float[Array, "B 4 4"],
                 viewmats: Float[Array, "B 4 4"], Ks: Float[Array, "B 3 3"], background: Float[Array, "B 3"],
                 *, width: int, height: int, capacity: int, backend: str = "auto",
                 clamp: float | None = None) -> RenderOutput:
    """Render frame ``b`` of the batch: ``G(k_b)`` posed by ``roots_b`` seen by camera ``b``.

    Differentiable w.r.t. ``model.U`` (refinement), ``k`` (fitting) and ``roots``.
    """

    def one(kb, root, viewmat, K, bg):
        g = world_gaussians(model, kb, root, clamp)
        return rasterize(g, Camera(viewmat, K, width, height), bg, backend=backend, capacity=capacity)

    return jax.vmap(one)(k, roots, viewmats, Ks, background)


def frame_capacity(model: GEM, k: np.ndarray, roots: np.ndarray, viewmats: np.ndarray, Ks: np.ndarray,
                   width: int, height: int, headroom: float = 1.5) -> int:
    """``headroom ×`` the most intersections over the given frames, rounded (eager)."""
    most = 0
    for b in range(len(k)):
        g = world_gaussians(model, jnp.asarray(k[b]), jnp.asarray(roots[b]))
        cam = Camera(jnp.asarray(viewmats[b]), jnp.asarray(Ks[b]), width, height)
        most = max(most, count_intersections(g, cam))
    return round_capacity(int(headroom * most) + 1)


def render_exact(model: GEM, k: np.ndarray, roots: np.ndarray, viewmats: np.ndarray, Ks: np.ndarray,
                 background, width: int, height: int, backend: str = "auto") -> np.ndarray:
    """Images ``(B, H, W, 3)`` with a capacity sized exactly for this batch (evaluation, export)."""
    k, roots = np.asarray(k, np.float32), np.asarray(roots, np.float32)
    capacity = frame_capacity(model, k, roots, viewmats, Ks, width, height, headroom=1.0)
    bg = np.broadcast_to(np.asarray(background, np.float32), (len(k), 3))
    out = render_batch(model, jnp.asarray(k), jnp.asarray(roots), jnp.asarray(viewmats, jnp.float32),
                       jnp.asarray(Ks, jnp.float32), jnp.asarray(bg), width=width, height=height,
                       capacity=capacity, backend=backend)
    overflow = int(jnp.max(out.stats["overflow"]))
    if overflow:
        raise RuntimeError(f"render_exact: {overflow} intersections overflowed an exact capacity (a bug)")
    return np.asarray(out.image)
