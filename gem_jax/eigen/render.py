"""Rendering a GEM: coefficients → Gaussians in the world → image (docs/architecture.md §1, §8).

The distilled avatar animates with no neural network: for coefficients ``k`` (σ units) and
the head's rigid root pose ``P = [R | t]`` (world ← head frame),

    G(k) = mean + (k·σ) @ U          (per modality, :func:`gem_jax.eigen.model.evaluate`)
    G_world = P ∘ G(k)               (:func:`gem_jax.rigid.rigid_transform`)
    image = rasterize(G_world, camera, background)

:func:`render_batch` is that pipeline for a batch of frames (jitted, differentiable;
:func:`gem_jax.frames.render_frames` after ``G``); :func:`frame_capacity` sizes its static
intersection capacity from the exact counts of a few frames, with headroom;
:func:`render_exact` renders eagerly with the capacity sized exactly for the batch;
:func:`export_ply` writes the Gaussians of one frame as a standard 3DGS ``.ply``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gem_jax.eigen.model import GEM, check_coefficients
from gem_jax.frames import frames_capacity, render_frames, render_frames_exact
from gem_jax.render import RenderOutput
from gem_jax.render.ply import write_ply
from gem_jax.rigid import rigid_transform
from gem_jax.types import Gaussians

__all__ = ["export_ply", "frame_capacity", "render_batch", "render_exact", "world_gaussians"]


def world_gaussians(model: GEM, k: Float[Array, "Ktot"], root: Float[Array, "4 4"],
                    clamp: float | None = None) -> Gaussians:
    """The Gaussians of coefficients ``k`` placed by the root pose (one frame)."""
    return rigid_transform(model.evaluate(k, clamp=clamp), root)


@jax.jit
def _world_batch(model: GEM, k, roots) -> Gaussians:
    return jax.vmap(lambda kb, root: world_gaussians(model, kb, root))(k, roots)


@functools.partial(jax.jit, static_argnames=("width", "height", "capacity", "backend", "clamp"))
def render_batch(model: GEM, k: Float[Array, "B Ktot"], roots: Float[Array, "B 4 4"],
                 viewmats: Float[Array, "B 4 4"], Ks: Float[Array, "B 3 3"], background: Float[Array, "B 3"],
                 *, width: int, height: int, capacity: int, backend: str = "auto",
                 clamp: float | None = None) -> RenderOutput:
    """Render frame ``b`` of the batch: ``G(k_b)`` posed by ``roots_b`` seen by camera ``b``.

    Differentiable w.r.t. ``model.U`` (refinement), ``k`` (fitting) and ``roots``.
    """
    world = jax.vmap(lambda kb, root: world_gaussians(model, kb, root, clamp))(k, roots)
    return render_frames(world, viewmats, Ks, background, width=width, height=height, capacity=capacity,
                         backend=backend)


def frame_capacity(model: GEM, k: np.ndarray, roots: np.ndarray, viewmats: np.ndarray, Ks: np.ndarray,
                   width: int, height: int, headroom: float = 1.5) -> int:
    """``headroom ×`` the most intersections over the given frames, rounded (eager)."""
    world = _world_batch(model, jnp.asarray(k, jnp.float32), jnp.asarray(roots, jnp.float32))
    return frames_capacity(world, viewmats, Ks, width, height, headroom)


def render_exact(model: GEM, k: np.ndarray, roots: np.ndarray, viewmats: np.ndarray, Ks: np.ndarray,
                 background, width: int, height: int, backend: str = "auto") -> np.ndarray:
    """Images ``(B, H, W, 3)`` with a capacity sized exactly for this batch (evaluation, export)."""
    world = _world_batch(model, jnp.asarray(k, jnp.float32), jnp.asarray(roots, jnp.float32))
    return render_frames_exact(world, viewmats, Ks, background, width, height, backend)


def export_ply(model: GEM, k, path: str | os.PathLike, root: np.ndarray | None = None) -> Path:
    """Write ``G(k)`` (posed by ``root`` if given) as a standard 3DGS ``.ply`` (``k``: NaN/Inf refused,
    beyond ±3σ clamped with a warning)."""
    k = check_coefficients(model, k, where=f"export {Path(path).name}: coefficients")
    g = model.evaluate(jnp.asarray(k), clamp=None)
    if root is not None:
        g = rigid_transform(g, jnp.asarray(root, jnp.float32))
    return write_ply(path, g)
