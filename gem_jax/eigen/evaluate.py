"""Evaluation of a GEM on the held-out protocol (DESIGN §4, §8).

* ``held_out_camera``   — split ``val``: training timesteps seen by the held-out camera (novel
  view). Each image is rendered with the PCA coefficients of its timestep (the ``pca`` stage's
  ``coeffs.npy``): the distilled model's reconstruction of frames it was built from, from a
  camera no stage trained on.
* ``held_out_sequence`` — split ``test``: the held-out sequence from every camera (novel
  expression). Its coefficients are not known: they are fitted by analysis-by-synthesis
  (:mod:`gem_jax.eigen.fit`, ``U`` frozen) on the same images — the "fitted k" upper bound
  that an image-driven regressor is compared against.

Metrics as the teacher's (:func:`gem_jax.metrics.image_metrics`: PSNR, SSIM, LPIPS-VGG, L1) on
the evaluation background (white). A few renders per split are written as
``<name>_<k>_t<timestep>_c<camera>.png`` (prediction | ground truth).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax.atomic import write_json
from gem_jax.data.images import ImageSet, load_images
from gem_jax.eigen.fit import apply_pose_correction, fit_coefficients
from gem_jax.eigen.model import GEM
from gem_jax.eigen.render import render_exact
from gem_jax.eigen.workdir import load_pca_coefficients, load_roots
from gem_jax.metrics import image_metrics
from gem_jax.video import write_png

__all__ = ["EVAL_SPLITS", "evaluate_images", "evaluate_protocol", "render_images"]

EVAL_SPLITS = {"held_out_camera": "val", "held_out_sequence": "test"}


def render_images(model: GEM, k: np.ndarray, roots: np.ndarray, images: ImageSet, background,
                  batch_size: int = 8, backend: str = "auto") -> np.ndarray:
    """Renders ``(F, H, W, 3)`` of every image of ``images``; ``k (F, ΣK)`` and ``roots (F, 4, 4)`` per image."""
    out = np.zeros((images.num, images.height, images.width, 3), np.float32)
    for start in range(0, images.num, batch_size):
        idx = np.arange(start, min(start + batch_size, images.num))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])  # one compiled shape
        img = render_exact(model, k[pad], roots[pad], images.viewmats[pad], images.Ks[pad], background,
                           images.width, images.height, backend)
        out[idx] = img[: len(idx)]
    return out


def evaluate_images(model: GEM, k: np.ndarray, roots: np.ndarray, images: ImageSet, background, *,
                    name: str, lpips_fn=None, renders: Path | None = None, num_renders: int = 0,
                    batch_size: int = 8, backend: str = "auto", tag: str = "gem") -> dict:
    """Mean PSNR/SSIM/LPIPS/L1 of the GEM renders of ``images`` against them (module docstring)."""
    start = time.time()
    pred = render_images(model, k, roots, images, background, batch_size, backend)
    target = images.composite(slice(None), background)
    per_image: dict[str, list] = {}
    for s in range(0, images.num, batch_size):
        for key, value in image_metrics(pred[s:s + batch_size], target[s:s + batch_size], lpips_fn).items():
            per_image.setdefault(key, []).extend(np.asarray(value).tolist())
    summary = {key: float(np.mean(v)) for key, v in per_image.items()}
    summary["num_images"] = int(images.num)
    if renders is not None and num_renders > 0:
        picks = np.unique(np.round(np.linspace(0, images.num - 1, min(num_renders, images.num)))).astype(int)
        for j, i in enumerate(picks):
            path = renders / f"{name}_{j:02d}_t{int(images.timesteps[i]):05d}_c{int(images.camera_indices[i]):02d}.png"
            write_png(path, np.concatenate([np.clip(pred[i], 0, 1), target[i]], axis=1))
    text = ", ".join(f"{key} {v:.4f}" for key, v in summary.items() if key != "num_images")
    print(f"[{tag}] eval {name} ({images.num} images, {time.time() - start:.1f}s): {text}", flush=True)
    return summary


def evaluate_protocol(config, workdir: str | os.PathLike, model: GEM, out: Path, tag: str,
                      extra: dict | None = None) -> dict:
    """Both held-out splits (module docstring); writes ``out/eval.json``, ``out/renders/`` and
    the fitted coefficients of the held-out sequence ``out/fit_test.npz``. Uses ``config.refine.eval``
    (image counts, LPIPS) for the PCA-only and the refined model alike, so they are comparable."""
    from gem_jax.data.prepare import subject_dir
    from gem_jax.data.subject import load_subject

    workdir = Path(workdir)
    ev = config.refine.eval
    background = tuple(float(x) for x in config.data.background)
    backend = str(config.render.backend)
    subject = load_subject(subject_dir(config, workdir))
    roots = load_roots(workdir)
    coeffs = load_pca_coefficients(workdir)
    lpips_fn = None
    if bool(ev.lpips):
        from gem_jax.perceptual import LPIPS

        lpips_fn = LPIPS("vgg16")
    common = dict(lpips_fn=lpips_fn, renders=out / "renders", num_renders=int(ev.num_renders),
                  batch_size=int(ev.batch_size), backend=backend, tag=tag)
    result: dict = {"background": background, **(extra or {})}
    max_images = int(ev.max_images) or None
    train = load_images(subject, "train", min(int(ev.train_images), len(subject.frames("train"))))
    result["training_views"] = evaluate_images(model, coeffs.of(train.timesteps), roots[train.timesteps], train,
                                               background, name="training_views",
                                               **{**common, "num_renders": 0})
    result["training_views"]["coefficients"] = "pca"
    if subject.frames("val"):
        images = load_images(subject, "val", max_images)
        result["held_out_camera"] = evaluate_images(model, coeffs.of(images.timesteps), roots[images.timesteps],
                                                    images, background, name="held_out_camera", **common)
        result["held_out_camera"]["coefficients"] = "pca"
    if subject.frames("test"):
        images = load_images(subject, "test", max_images)
        start = time.time()
        fit = fit_coefficients(model, images, roots, config.fit, background=background, seed=int(config.seed),
                               backend=backend)
        rows = fit.rows(images.timesteps)
        posed = roots[images.timesteps]
        if bool(config.fit.pose):
            posed = np.asarray(apply_pose_correction(jnp.asarray(posed), jnp.asarray(fit.xi[rows])))
        summary = evaluate_images(model, fit.k[rows], posed, images, background, name="held_out_sequence", **common)
        summary.update(coefficients="fitted", fit_steps=int(config.fit.steps), fit_seconds=time.time() - start,
                       fit_final_loss=float(fit.losses[-1]) if fit.losses.size else None)
        result["held_out_sequence"] = summary
        if jax.process_index() == 0:
            np.savez(out / "fit_test.npz", timesteps=fit.timesteps, k=fit.k, xi=fit.xi, losses=fit.losses)
    if jax.process_index() == 0:
        write_json(out / "eval.json", result)
    return result
