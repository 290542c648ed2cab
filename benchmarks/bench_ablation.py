"""Component ablation of a distilled avatar: PSNR, model size and render speed vs components.

    python benchmarks/bench_ablation.py --workdir runs/q                      # after --stage pca
    python benchmarks/bench_ablation.py --workdir runs/q --components 10,30,50 --out ablation.json

The shape of the paper's ablation table (GEM, Tab. 4): for each count ``K`` (the same for every
modality, capped at the number of training timesteps − 1), the PCA-only GEM is fitted from the
``collect`` stage's data matrices, then

* **PSNR** on the held-out camera (novel view) with each training timestep's PCA coefficients
  (white background, ``--max-images`` images evenly spaced);
* **MB**: the stored arrays as float32 (the file: bases, σ, colours, texel indices), the bases
  alone, and the arithmetic ``texels × (1 + K) × 11 × 4`` bytes (mean + K basis rows for 11
  channels: position 3, rotation 4, scale 3, opacity 1), which the bases equal exactly;
* **fps**: coefficient vector → image (``G(k)``, root pose, rasterize) as one jitted function,
  median of ``--repeats`` runs after warm-up, each ended by ``block_until_ready``, per backend.

Prints a Markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from gem_jax.data.images import load_images  # noqa: E402
from gem_jax.context import StageContext  # noqa: E402
from gem_jax.eigen.evaluate import render_images  # noqa: E402
from gem_jax.eigen.model import GEM, size_breakdown, size_mb  # noqa: E402
from gem_jax.eigen.pca import CHANNELS, MODALITIES, fit_modalities, read_collect  # noqa: E402
from gem_jax.eigen.render import frame_capacity, world_gaussians  # noqa: E402
from gem_jax.eigen.workdir import Coefficients, load_roots  # noqa: E402
from gem_jax.metrics import psnr  # noqa: E402
from gem_jax.render import available_backends, rasterize  # noqa: E402
from gem_jax.types import Camera  # noqa: E402


def render_fps(model: GEM, k: np.ndarray, root: np.ndarray, cam: Camera, capacity: int, backend: str,
               repeats: int, warmup: int = 3) -> float:
    """Frames per second of ``k → image`` (median time of ``repeats`` runs after ``warmup``)."""

    @jax.jit
    def frame(model, k):
        g = world_gaussians(model, k, jnp.asarray(root))
        return rasterize(g, cam, jnp.ones(3), backend=backend, capacity=capacity).image

    kk = jnp.asarray(k)
    for _ in range(warmup):
        frame(model, kk).block_until_ready()
    times = []
    for i in range(repeats):
        kk = jnp.asarray(k * (1.0 - 0.01 * (i % 3)))  # a new vector each frame, as in animation
        start = time.perf_counter()
        frame(model, kk).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--components", default="10,30,50")
    p.add_argument("--max-images", type=int, default=48)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--backends", default=",".join(b for b in available_backends() if b != "dense"))
    p.add_argument("--out", default="benchmarks/out/ablation.json")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    data = read_collect(workdir / "collect")
    roots = load_roots(workdir)
    subject = StageContext.from_workdir(workdir).subject
    images = load_images(subject, "val", args.max_images)
    target = images.composite(slice(None), (1.0, 1.0, 1.0))
    texels = data.num_gaussians
    rows = []
    for k_req in [int(x) for x in args.components.split(",")]:
        k_used = min(k_req, data.num_timesteps - 1)
        results = fit_modalities(data.matrices, {m: k_used for m in MODALITIES})
        model = GEM.from_pca(results, data.colors, data.valid)
        coeffs = Coefficients(data.timesteps, np.concatenate([np.asarray(results[m].coeffs) for m in MODALITIES], 1))
        pred = render_images(model, coeffs.of(images.timesteps), roots[images.timesteps], images, (1.0, 1.0, 1.0))
        value = float(np.mean(np.asarray(psnr(jnp.asarray(np.clip(pred, 0, 1)), jnp.asarray(target)))))
        kvec = coeffs.of(images.timesteps[:1])[0]
        root = roots[images.timesteps[0]]
        cam = Camera(jnp.asarray(images.viewmats[0]), jnp.asarray(images.Ks[0]), images.width, images.height)
        capacity = frame_capacity(model, kvec[None], root[None], images.viewmats[:1], images.Ks[:1],
                                  images.width, images.height, headroom=1.25)
        fps = {b: render_fps(model, kvec, root, cam, capacity, b, args.repeats) for b in args.backends.split(",")}
        # texels × Σ_m (1 + K_m)·C_m × 4 bytes; = texels × (1 + K) × 11 × 4 when every K_m = K
        arithmetic = texels * sum((1 + model.num_components[m]) * CHANNELS[m] for m in MODALITIES) * 4 / 1e6
        used = "/".join(str(v) for v in model.num_components.values())
        row = {"components": k_req, "components_used": used, "psnr_novel_view": value,
               "mb_float32": size_mb(model), "mb_basis_float32": size_breakdown(model)["basis"] / 1e6,
               "mb_arithmetic": arithmetic, "mb_float16": size_mb(model, "float16"),
               "fps": fps}
        rows.append(row)
        print(json.dumps(row), flush=True)
    backends = args.backends.split(",")
    h, w = images.height, images.width
    lines = [f"GEM component ablation: {texels} Gaussians, {data.num_timesteps} training timesteps, "
             f"{w}x{h} images, {jax.devices()[0].platform} ({platform.processor() or platform.machine()})", "",
             "| components | used (pos/rot/scale/opac) | PSNR novel view (dB) | MB fp32 (file) | MB fp32 (bases) | MB arithmetic | MB fp16 | "
             + " | ".join(f"fps {b}" for b in backends) + " |",
             "|---|---|---|---|---|---|---|" + "---|" * len(backends)]
    for r in rows:
        lines.append(f"| {r['components']} | {r['components_used']} | {r['psnr_novel_view']:.2f} | "
                     f"{r['mb_float32']:.3f} | {r['mb_basis_float32']:.3f} | {r['mb_arithmetic']:.3f} | {r['mb_float16']:.3f} | "
                     + " | ".join(f"{r['fps'][b]:.0f}" for b in backends) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"workdir": str(workdir), "rows": rows, "table": table}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
