"""Where the GEM loses to its teacher on novel expressions: the linear span or the coefficients.

    python benchmarks/study_novel_expression.py --workdir runs/b --components 5,10,20,50

On the held-out sequence (the ``test`` split) three renders are compared with the ground truth,
on the run's evaluation images (``config.eval.max_images``, evenly spaced, white background):

* **teacher**: the teacher network driven by each frame's tracked mesh (its ``eval.json``);
* **projected**: the teacher's own Gaussians of each held-out frame projected onto the
  K-component basis, ``k = ((X − mean) Uᵀ) / σ`` per modality (``U`` has orthonormal rows) —
  the best the *linear span* can do, given the teacher's Gaussians;
* **fitted k**: coefficients fitted from the images by analysis-by-synthesis, from the
  ablation's evaluation (``--ablation-dir``, written by ``bench_ablation.py``) when present.

teacher → projected is what the span loses; projected → fitted what recovering ``k`` from
images loses. Prints a Markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from gem_jax.artefacts import read_json  # noqa: E402
from gem_jax.atomic import write_json  # noqa: E402
from gem_jax.config_check import load_config_file  # noqa: E402
from gem_jax.context import StageContext  # noqa: E402
from gem_jax.eigen.evaluate import render_images  # noqa: E402
from gem_jax.eigen.model import GEM, flatten_coeffs  # noqa: E402
from gem_jax.eigen.pca import MODALITIES, read_collect  # noqa: E402
from gem_jax.eigen.pca_stage import pca_gem  # noqa: E402
from gem_jax.eigen.workdir import load_roots  # noqa: E402
from gem_jax.evaluation import Protocol  # noqa: E402
from gem_jax.metrics import psnr  # noqa: E402
from gem_jax.teacher.collect import collect_gaussians, load_trained_teacher  # noqa: E402


def project(model: GEM, rows: dict[str, np.ndarray]) -> np.ndarray:
    """Coefficients ``(T, ΣK)`` in σ units of the Gaussians ``rows[m] (T, D)`` (float64 projection).
    Quaternions are first given the sign of the model's mean quaternion, as in the collected data."""
    rows = dict(rows)
    q = np.asarray(rows["rotation"], np.float64).reshape(len(rows["rotation"]), -1, 4)
    ref = np.asarray(model.mean["rotation"], np.float64).reshape(-1, 4)
    rows["rotation"] = np.where(np.sum(q * ref, -1, keepdims=True) < 0, -q, q).reshape(len(q), -1)
    k = {}
    for m in MODALITIES:
        centred = np.asarray(rows[m], np.float64) - np.asarray(model.mean[m], np.float64)
        k[m] = (centred @ np.asarray(model.U[m], np.float64).T) / np.asarray(model.sigma[m], np.float64)
    return np.asarray(flatten_coeffs(model, {m: jnp.asarray(v, jnp.float32) for m, v in k.items()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="configs/benchmark.py", help="the run's config (its teacher section)")
    p.add_argument("--components", default="5,10,20,50")
    p.add_argument("--ablation-dir", default="benchmarks/out/ablation")
    p.add_argument("--out", default="benchmarks/out/novel_expression.json")
    args = p.parse_args(argv)
    workdir = Path(args.workdir)
    config = load_config_file(args.config)
    ctx = StageContext.from_workdir(workdir)
    images = Protocol.from_context(ctx).images(ctx.subject, "test")
    target = jnp.asarray(images.composite(slice(None), (1.0, 1.0, 1.0)))
    roots = load_roots(workdir)
    frames = np.unique(images.timesteps)
    with tempfile.TemporaryDirectory() as tmp:  # the teacher's Gaussians of the held-out frames
        teacher_rows = {m: np.array(v) for m, v in collect_gaussians(
            load_trained_teacher(ctx, config.teacher), frames, Path(tmp)).items() if m in MODALITIES}
    lookup = {int(t): i for i, t in enumerate(frames)}
    image_rows = np.array([lookup[int(t)] for t in images.timesteps])
    data = read_collect(workdir / "collect")
    teacher_eval = read_json(workdir / "teacher" / "eval.json", "teacher")["held_out_sequence"]
    rows = []
    for count in [int(x) for x in args.components.split(",")]:
        model = pca_gem(data, {m: min(count, data.num_timesteps - 1) for m in MODALITIES})[0]
        k = project(model, teacher_rows)
        pred = render_images(model, k[image_rows], roots[images.timesteps], images, (1.0, 1.0, 1.0))
        value = float(np.mean(np.asarray(psnr(jnp.asarray(np.clip(pred, 0, 1)), target))))
        fitted_file = Path(args.ablation_dir) / f"K{count}" / "pca" / "eval.json"
        fitted = read_json(fitted_file, "ablation")["held_out_sequence"]["psnr"] if fitted_file.is_file() else None
        row = {"components": count, "components_used": dict(model.num_components), "projected_psnr": value,
               "fitted_psnr": fitted, "projected_k_beyond_3_sigma": float(np.mean(np.abs(k) > 3.0))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [f"Novel expression ({workdir}, {images.num} held-out-sequence images): teacher "
             f"{teacher_eval['psnr']:.2f} dB", "",
             "| K (pos/rot/scale/opac) | teacher | projected teacher Gaussians | fitted k | share of projected |k| > 3σ |",
             "|---|---|---|---|---|"]
    for r in rows:
        used = "/".join(str(r["components_used"][m]) for m in MODALITIES)
        fitted = f"{r['fitted_psnr']:.2f}" if r["fitted_psnr"] is not None else "—"
        lines.append(f"| {used} | {teacher_eval['psnr']:.2f} | {r['projected_psnr']:.2f} | {fitted} | "
                     f"{100 * r['projected_k_beyond_3_sigma']:.1f} % |")
    table = "\n".join(lines)
    print(table)
    write_json(Path(args.out), {"workdir": str(workdir), "teacher_psnr": teacher_eval["psnr"], "rows": rows,
                                "table": table})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
