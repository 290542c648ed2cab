"""Evaluation of a GEM on the held-out protocol (docs/architecture.md §4, §8).

The splits, metrics and renders are the shared ones (:mod:`gem_jax.evaluation`); what is
particular to a GEM is which coefficients render each image:

* ``training_views``    — ``eval.train_images`` training images with the PCA coefficients of
  their timesteps (before/after refinement on the views it trains on);
* ``held_out_camera``   — split ``val`` with the PCA coefficients of its (training)
  timesteps: the distilled model's reconstruction of frames it was built from, from a camera
  no stage trained on (novel view);
* ``held_out_sequence`` — split ``test`` (novel expression): its coefficients are not known,
  so they are fitted by analysis-by-synthesis (:mod:`gem_jax.eigen.fit`, ``U`` frozen, the
  run's ``config.fit``) on the same images — the "fitted k" upper bound an image-driven
  regressor is compared against.

The PCA-only and the refined model are evaluated with the same settings (the run's
``config.eval``), so their numbers compare.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax.atomic import write_json, write_npz
from gem_jax.data.images import ImageSet, load_images
from gem_jax.eigen.fit import apply_pose_correction, fit_coefficients
from gem_jax.eigen.model import GEM
from gem_jax.eigen.render import render_exact
from gem_jax.eigen.workdir import Coefficients, load_pca_coefficients, load_roots
from gem_jax.evaluation import Protocol, render_all

__all__ = ["evaluate_gem", "gem_renderer", "render_images"]


def gem_renderer(model: GEM, k: np.ndarray, roots: np.ndarray, images: ImageSet, background, backend: str = "auto"):
    """``render_rows(rows)``: the GEM with ``k[rows]`` posed by ``roots[rows]`` (one per image)
    seen by the cameras of ``images[rows]``."""

    def render_rows(rows):
        return render_exact(model, k[rows], roots[rows], images.viewmats[rows], images.Ks[rows], background,
                            images.width, images.height, backend)

    return render_rows


def render_images(model: GEM, k: np.ndarray, roots: np.ndarray, images: ImageSet, background,
                  batch_size: int = 8, backend: str = "auto") -> np.ndarray:
    """Renders ``(F, H, W, 3)`` of every image of ``images``; ``k (F, ΣK)`` and ``roots (F, 4, 4)`` per image."""
    return render_all(gem_renderer(model, k, roots, images, background, backend), images.num, batch_size)


def evaluate_gem(ctx, model: GEM, out: Path, tag: str, extra: dict | None = None,
                 coeffs: Coefficients | None = None) -> dict:
    """Every split of the module docstring; writes ``out/eval.json``, ``out/renders/`` and the
    fitted coefficients of the held-out sequence ``out/fit_test.npz``. ``coeffs``: the training
    timesteps' coefficients of ``model`` (default: the ``pca`` stage's)."""
    protocol = Protocol.from_context(ctx)
    subject, background, backend = ctx.subject, ctx.background, ctx.backend
    roots = load_roots(ctx.workdir)
    coeffs = load_pca_coefficients(ctx.workdir) if coeffs is None else coeffs
    renders = out / "renders"
    result: dict = {"background": list(background), **(extra or {})}

    def with_pca_coefficients(images: ImageSet, name: str, num_renders=None) -> dict:
        t = images.timesteps
        render = gem_renderer(model, coeffs.of(t), roots[t], images, background, backend)
        summary = protocol.evaluate(render, images, name=name, tag=tag, renders=renders, num_renders=num_renders)
        return {**summary, "coefficients": "pca"}

    train = load_images(subject, "train", min(protocol.train_images, len(subject.frames("train"))))
    result["training_views"] = with_pca_coefficients(train, "training_views", num_renders=0)
    images = protocol.images(subject, "val")
    if images is not None:
        result["held_out_camera"] = with_pca_coefficients(images, "held_out_camera")
    images = protocol.images(subject, "test")
    if images is not None:
        start = time.time()
        fit = fit_coefficients(model, images, roots, ctx.fit, background=background, seed=int(ctx.seed),
                               backend=backend)
        rows = fit.rows(images.timesteps)
        posed = roots[images.timesteps]
        if bool(ctx.fit.pose):
            posed = np.asarray(apply_pose_correction(jnp.asarray(posed), jnp.asarray(fit.xi[rows])))
        render = gem_renderer(model, fit.k[rows], posed, images, background, backend)
        summary = protocol.evaluate(render, images, name="held_out_sequence", tag=tag, renders=renders)
        summary.update(coefficients="fitted", fit_steps=int(ctx.fit.steps), fit_seconds=time.time() - start,
                       fit_final_loss=float(fit.losses[-1]) if fit.losses.size else None)
        result["held_out_sequence"] = summary
        if jax.process_index() == 0:
            write_npz(out / "fit_test.npz", timesteps=fit.timesteps, k=fit.k, xi=fit.xi, losses=fit.losses)
    if jax.process_index() == 0:
        write_json(out / "eval.json", result)
    return result
