"""One evaluation for every model: the held-out splits, the metrics, the renders (docs/architecture.md §8).

The teacher, the PCA-only GEM, the refined GEM and the regressor-driven GEM are measured the
same way; they differ only in the function that renders a set of rows of an image set:

    protocol = Protocol.from_context(ctx)                    # config.eval + the background
    images = protocol.images(ctx.subject, "val")              # the held-out camera (or None)
    summary = protocol.evaluate(render_rows, images, name="held_out_camera", tag="pca",
                                renders=out / "renders")

* Splits (NeRSemble protocol, docs/architecture.md §4): ``held_out_camera`` is split ``val``
  (training timesteps seen by the held-out camera: novel view), ``held_out_sequence`` is split
  ``test`` (the held-out sequence from every camera: novel expression). ``eval.max_images``
  keeps that many images of a split, evenly spaced (0: all).
* Metrics (:func:`gem_jax.metrics.image_metrics`): PSNR, SSIM, LPIPS-VGG (``eval.lpips``) and
  L1 per image over the evaluation background, averaged over the split.
* Renders: ``eval.num_renders`` images per split, evenly spaced, written as
  ``<name>_<j>_t<timestep>_c<camera>.png`` (prediction | ground truth), by the first process.
* Rendering goes in fixed-size chunks (``eval.batch_size``, the last padded) so each model's
  render function compiles once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from gem_jax.batching import padded_chunks
from gem_jax.data.images import ImageSet, load_images
from gem_jax.metrics import image_metrics
from gem_jax.video import write_png

__all__ = ["EVAL_SPLITS", "Protocol", "render_all"]

EVAL_SPLITS = {"held_out_camera": "val", "held_out_sequence": "test"}


def render_all(render_rows: Callable[[np.ndarray], np.ndarray], num: int, batch_size: int) -> np.ndarray:
    """``render_rows(rows)`` over ``range(num)`` in padded chunks: ``(num, H, W, 3)`` float32."""
    out = None
    for rows, padded in padded_chunks(num, batch_size):
        image = np.asarray(render_rows(padded))[: len(rows)]
        if out is None:
            out = np.zeros((num, *image.shape[1:]), np.float32)
        out[rows] = image
    return out


@dataclasses.dataclass
class Protocol:
    """The evaluation settings every model shares (module docstring)."""

    background: tuple[float, float, float]
    max_images: int | None = None
    num_renders: int = 6
    batch_size: int = 8
    train_images: int = 16
    lpips: Callable | None = None  # (pred, target) -> (B,) distances, or None

    @classmethod
    def from_context(cls, ctx) -> "Protocol":
        ev = ctx.eval
        lpips = None
        if bool(ev.lpips):
            from gem_jax.perceptual import LPIPS

            lpips = LPIPS("vgg16")
        return cls(background=tuple(ctx.background), max_images=int(ev.max_images) or None,
                   num_renders=int(ev.num_renders), batch_size=max(int(ev.batch_size), 1),
                   train_images=int(ev.train_images), lpips=lpips)

    def images(self, subject, split: str, max_images: int | None = -1) -> ImageSet | None:
        """The evaluated images of ``split`` (``max_images`` of them; default the protocol's),
        or None when the split is empty."""
        if not subject.frames(split):
            return None
        return load_images(subject, split, self.max_images if max_images == -1 else max_images)

    def evaluate(self, render_rows: Callable[[np.ndarray], np.ndarray], images: ImageSet, *, name: str,
                 tag: str, renders: Path | None = None, num_renders: int | None = None) -> dict:
        """Mean metrics of ``render_rows`` over ``images`` against them; writes the renders."""
        start = time.time()
        pred = render_all(render_rows, images.num, self.batch_size)
        target = images.composite(slice(None), self.background)
        per_image: dict[str, list] = {}
        for rows, _ in padded_chunks(images.num, self.batch_size):
            for key, value in image_metrics(pred[rows], target[rows], self.lpips).items():
                per_image.setdefault(key, []).extend(np.asarray(value).tolist())
        summary = {key: float(np.mean(v)) for key, v in per_image.items()}
        summary["num_images"] = int(images.num)
        count = self.num_renders if num_renders is None else num_renders
        if renders is not None and count > 0 and jax.process_index() == 0:
            picks = np.unique(np.round(np.linspace(0, images.num - 1, min(count, images.num))).astype(int))
            for j, i in enumerate(picks):
                path = renders / (f"{name}_{j:02d}_t{int(images.timesteps[i]):05d}"
                                  f"_c{int(images.camera_indices[i]):02d}.png")
                write_png(path, np.concatenate([np.clip(pred[i], 0, 1), target[i]], axis=1))
        text = ", ".join(f"{key} {v:.4f}" for key, v in summary.items() if key != "num_images")
        if jax.process_index() == 0:
            print(f"[{tag}] eval {name} ({images.num} images, {time.time() - start:.1f}s): {text}", flush=True)
        return summary
