"""Rendering batches of frames, each with its own Gaussians and camera (docs/architecture.md §8, §9).

Every stage renders *frames*: the Gaussians of one timestep (the teacher's output or ``G(k)``
of the GEM, already posed in the world) seen by one camera. This module is that step for a
batch, for training and for evaluation alike:

* :func:`render_frames` — ``jax.vmap`` of :func:`gem_jax.render.rasterize` over frames with a
  static intersection capacity (jittable, differentiable);
* :func:`frames_capacity` — a capacity for such batches: ``headroom ×`` the most
  intersections of the given frames, rounded to few distinct sizes (eager);
* :func:`render_frames_exact` — eager images with the capacity sized exactly for the batch,
  so nothing can overflow (evaluation, export, reenactment).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gem_jax.render import RenderOutput, count_intersections, rasterize, round_capacity
from gem_jax.types import Camera, Gaussians

__all__ = ["frames_capacity", "render_frames", "render_frames_exact"]


def render_frames(world: Gaussians, viewmats: Float[Array, "B 4 4"], Ks: Float[Array, "B 3 3"],
                  background: Float[Array, "B 3"], *, width: int, height: int, capacity: int,
                  backend: str = "auto") -> RenderOutput:
    """Frame ``b``: ``world[b]`` (Gaussians with a leading batch axis) seen by camera ``b``."""

    def one(g, viewmat, K, bg):
        return rasterize(g, Camera(viewmat, K, width, height), bg, backend=backend, capacity=capacity)

    return jax.vmap(one)(world, viewmats, Ks, background)


def frames_capacity(world: Gaussians, viewmats, Ks, width: int, height: int, headroom: float = 1.0) -> int:
    """``headroom ×`` the most (tile, Gaussian) intersections over the frames, rounded up."""
    most = 0
    for b in range(np.shape(viewmats)[0]):
        g = jax.tree.map(lambda x: x[b], world)
        most = max(most, count_intersections(g, Camera(jnp.asarray(viewmats[b]), jnp.asarray(Ks[b]), width, height)))
    return round_capacity(math.ceil(headroom * most))


@functools.partial(jax.jit, static_argnames=("width", "height", "capacity", "backend"))
def _render_images(world, viewmats, Ks, background, *, width, height, capacity, backend):
    out = render_frames(world, viewmats, Ks, background, width=width, height=height, capacity=capacity,
                        backend=backend)
    return out.image, jnp.max(out.stats["overflow"])


def render_frames_exact(world: Gaussians, viewmats, Ks, background, width: int, height: int,
                        backend: str = "auto") -> np.ndarray:
    """Images ``(B, H, W, 3)`` of the frames, the capacity sized exactly for this batch.

    ``background`` is ``(3,)`` or ``(B, 3)``.
    """
    viewmats, Ks = jnp.asarray(viewmats, jnp.float32), jnp.asarray(Ks, jnp.float32)
    bg = jnp.broadcast_to(jnp.asarray(background, jnp.float32), (viewmats.shape[0], 3))
    capacity = frames_capacity(world, viewmats, Ks, width, height)
    image, overflow = _render_images(world, viewmats, Ks, bg, width=width, height=height, capacity=capacity,
                                     backend=backend)
    if int(overflow):
        raise RuntimeError(f"render_frames_exact: {int(overflow)} intersections overflowed an exact capacity (a bug)")
    return np.asarray(image)
