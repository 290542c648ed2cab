"""Why (or whether) photometric refinement helps: variants of the refine stage at one K, measured.

    python benchmarks/study_refinement.py --workdir runs/b --components 10 \\
        --variants "default;lr=1e-4;lr=1e-6;steps=3000;anchor=1" --out-dir benchmarks/out/refine_study

For ``K`` components per modality the PCA-only GEM is built from the ``collect`` stage's data
(as in ``bench_ablation.py``), then refined once per variant (``name=value`` overrides of the
run's ``config.refine``: ``lr``, ``steps``, ``anchor`` (= ``loss.anchor``), ``vgg``, ...;
several joined by ``,``; ``default`` is the config itself; ``target=teacher`` refines against
the teacher's own renders of ``--teacher-images`` training images instead of the ground truth;
``codes=fitted`` first fits every training timestep's ``k`` to its training images by
analysis-by-synthesis (``--fit-steps``, ``U`` frozen), then refines — and measures — with those
codes; ``steps=0`` measures the codes alone)
with :func:`gem_jax.eigen.refine.refine_basis`. Each variant's *last* basis is measured (the
"kept step" column says which one the ``refine`` stage, which keeps the basis with the best
validation PSNR, would have kept). For the PCA basis and every refined basis it reports

* **image space**: PSNR on the held-out camera against the ground truth (PCA coefficients of
  the training timesteps, the protocol of the ``pca``/``refine`` stages), against the
  *teacher's own render* of the same frames (the collected Gaussians, i.e. the lossless
  model), and on training views;
* **parameter space**: the relative error ``‖X̂ − X‖ / ‖X − mean‖`` of each modality over the
  training timesteps (``X`` the teacher's Gaussians, ``X̂`` the model's reconstruction);
* **curves**: the validation PSNR on the withheld training camera at each checkpoint, and
  the training loss (``metrics.json`` of each variant).

Prints a Markdown table, writes JSON and Markdown to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from gem_jax.atomic import write_json, write_text  # noqa: E402
from gem_jax.config_check import load_config_file  # noqa: E402
from gem_jax.context import StageContext  # noqa: E402
from gem_jax.data.images import ImageSet, load_images  # noqa: E402
from gem_jax.eigen.evaluate import render_images  # noqa: E402
from gem_jax.eigen.fit import fit_coefficients  # noqa: E402
from gem_jax.eigen.model import GEM  # noqa: E402
from gem_jax.eigen.pca import MODALITIES, read_collect  # noqa: E402
from gem_jax.eigen.pca_stage import pca_gem  # noqa: E402
from gem_jax.eigen.refine import refine_basis  # noqa: E402
from gem_jax.eigen.workdir import Coefficients, load_roots  # noqa: E402
from gem_jax.metrics import psnr  # noqa: E402

ALIASES = {"anchor": "loss.anchor", "vgg": "loss.vgg", "l1": "loss.l1", "dssim": "loss.dssim"}


def parse_variant(text: str) -> dict:
    """``"lr=1e-4,steps=3000"`` → ``{"lr": 1e-4, "steps": 3000}``; ``"default"`` → ``{}``."""
    out = {}
    for item in filter(None, text.strip().split(",")):
        if item == "default":
            continue
        key, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--variants: {item!r} is not name=value")
        if key == "codes":
            if value not in ("pca", "fitted"):
                raise SystemExit(f"--variants: codes={value}: expected pca or fitted")
            out[key] = value
            continue
        if key == "target":
            if value not in ("images", "teacher"):
                raise SystemExit(f"--variants: target={value}: expected images or teacher")
            out[key] = value
            continue
        out[ALIASES.get(key, key)] = float(value) if any(c in value for c in ".e") else int(value)
    return out


def teacher_targets(lossless: GEM, coeffs: Coefficients, roots: np.ndarray, images: ImageSet) -> ImageSet:
    """``images`` with the teacher's renders (the lossless model) as targets: rendered over black
    and white, ``fg`` = the render over black (premultiplied), ``mask`` = 1 − (white − black)."""
    k, r = coeffs.of(images.timesteps), roots[images.timesteps]
    black = render_images(lossless, k, r, images, (0.0, 0.0, 0.0))
    white = render_images(lossless, k, r, images, (1.0, 1.0, 1.0))
    alpha = np.clip(1.0 - np.mean(white - black, -1), 0.0, 1.0)
    return dataclasses.replace(images, fg=np.round(np.clip(black, 0, 1) * 255).astype(np.uint8),
                               masks=np.round(alpha * 255).astype(np.uint8), mouth=None)


def with_overrides(rconfig, overrides: dict):
    rc = rconfig.copy_and_resolve_references()
    for dotted, value in overrides.items():
        node = rc
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise SystemExit(f"--variants: refine.{dotted} is not a refine setting")
        node[leaf] = type(node[leaf])(value)
    return rc


def mean_psnr(pred: np.ndarray, target: np.ndarray) -> float:
    return float(np.mean(np.asarray(psnr(jnp.asarray(np.clip(pred, 0, 1)), jnp.asarray(target)))))


def parameter_error(model: GEM, k: np.ndarray, data) -> dict:
    """``‖X̂ − X‖_F / ‖X − mean_X‖_F`` per modality over the training timesteps (float64)."""
    rows = model.reconstruct(jnp.asarray(k))
    out = {}
    for m in MODALITIES:
        x = np.asarray(data.matrices[m], np.float64)
        out[m] = float(np.linalg.norm(np.asarray(rows[m], np.float64) - x) / np.linalg.norm(x - x.mean(0)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="configs/benchmark.py")
    p.add_argument("--components", type=int, default=10)
    p.add_argument("--variants", default="default")
    p.add_argument("--images", type=int, default=104, help="held-out-camera and training images evaluated")
    p.add_argument("--fit-steps", type=int, default=600, help="analysis-by-synthesis steps for codes=fitted")
    p.add_argument("--teacher-images", type=int, default=1456, help="training images rendered for target=teacher")
    p.add_argument("--out-dir", default="benchmarks/out/refine_study")
    args = p.parse_args(argv)
    workdir, out_dir = Path(args.workdir), Path(args.out_dir)
    rconfig = load_config_file(args.config).refine
    ctx = StageContext.from_workdir(workdir)
    data = read_collect(workdir / "collect")
    roots = load_roots(workdir)
    count = min(args.components, data.num_timesteps - 1)

    def build(k_per_modality: int):
        return pca_gem(data, {m: k_per_modality for m in MODALITIES})[:2]

    white = (1.0, 1.0, 1.0)
    val = load_images(ctx.subject, "val", args.images)
    train = load_images(ctx.subject, "train", args.images)
    lossless, lossless_k = build(data.num_timesteps - 1)  # the collected Gaussians themselves
    teacher_val = render_images(lossless, lossless_k.of(val.timesteps), roots[val.timesteps], val, white)
    gt_val, gt_train = val.composite(slice(None), white), train.composite(slice(None), white)
    model, coeffs = build(count)

    def measure(m: GEM, codes: Coefficients) -> dict:
        pred_val = render_images(m, codes.of(val.timesteps), roots[val.timesteps], val, white)
        pred_train = render_images(m, codes.of(train.timesteps), roots[train.timesteps], train, white)
        return {"held_out_camera_psnr": mean_psnr(pred_val, gt_val),
                "held_out_camera_psnr_vs_teacher_render": mean_psnr(pred_val, teacher_val),
                "training_views_psnr": mean_psnr(pred_train, gt_train),
                "parameter_error": parameter_error(m, codes.of(data.timesteps), data)}

    def fitted_codes(m: GEM) -> Coefficients:
        """Every training timestep's ``k`` fitted to its training images (U frozen), from the PCA codes."""
        images = load_images(ctx.subject, "train")
        steps = ctx.fit.copy_and_resolve_references()
        steps.steps = args.fit_steps
        fit = fit_coefficients(m, images, roots, steps, init=coeffs.of(np.unique(images.timesteps)),
                               seed=int(ctx.seed))
        return Coefficients(fit.timesteps, fit.k)

    rows = [{"variant": "PCA basis", **measure(model, coeffs)}]
    rows[0]["teacher_held_out_camera_psnr"] = mean_psnr(teacher_val, gt_val)
    print(json.dumps(rows[0]), flush=True)
    teacher_train = fitted = None
    for text in args.variants.split(";"):
        overrides = parse_variant(text)
        target = overrides.pop("target", "images")
        codes = overrides.pop("codes", "pca")
        rc = with_overrides(rconfig, overrides)
        name = text.strip() or "default"
        start = time.time()
        targets = None
        if target == "teacher":
            if teacher_train is None:
                teacher_train = teacher_targets(lossless, lossless_k, roots,
                                                load_images(ctx.subject, "train", args.teacher_images))
            targets = teacher_train
        codes_used = coeffs
        if codes == "fitted":
            if fitted is None:
                fitted = fitted_codes(model)
            codes_used = fitted
        refined, validation = model, {"enabled": False}
        if int(rc.steps) > 0:
            refined, validation = refine_basis(ctx, rc, model, codes_used,
                                               out_dir / name.replace("=", "_").replace(",", "+"),
                                               images=targets, keep_best=False)
        metrics_file = out_dir / name.replace("=", "_").replace(",", "+") / "metrics.json"
        losses = [(r["step"], r.get("loss")) for r in json.loads(metrics_file.read_text())["records"]] \
            if metrics_file.is_file() else []
        row = {"variant": name, "target": target, "codes": codes, "steps": int(rc.steps), "lr": float(rc.lr), "anchor": float(rc.loss.get("anchor", 0)),
               "seconds": time.time() - start, "validation": validation, "loss_curve": losses[:: max(1, len(losses) // 20)],
               **measure(refined, codes_used)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "loss_curve"}), flush=True)
    base = rows[0]
    lines = [f"Refinement study ({workdir}, K = {count} per modality, {data.num_timesteps} training timesteps; "
             f"teacher on the held-out camera: {base['teacher_held_out_camera_psnr']:.2f} dB)", "",
             "| basis | steps | lr | anchor | kept step | val PSNR (curve) | held-out cam PSNR (Δ) | vs teacher render | "
             "training views | param. error pos/rot/scale/opac |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r.get("validation", {})
        curve = " → ".join(f"{h['psnr']:.2f}" for h in v.get("history", [])) or "—"
        err = "/".join(f"{r['parameter_error'][m]:.3f}" for m in MODALITIES)
        delta = r["held_out_camera_psnr"] - base["held_out_camera_psnr"]
        lines.append(f"| {r['variant']} | {r.get('steps', '—')} | {r.get('lr', '—')} | {r.get('anchor', '—')} | "
                     f"{v.get('best_step', '—')} | {curve} | {r['held_out_camera_psnr']:.2f} ({delta:+.2f}) | "
                     f"{r['held_out_camera_psnr_vs_teacher_render']:.2f} | {r['training_views_psnr']:.2f} | {err} |")
    table = "\n".join(lines)
    print(table)
    write_json(out_dir / "study.json", {"workdir": str(workdir), "components": count, "rows": rows})
    write_text(out_dir / "study.md", table + "\n")
    print(f"wrote {out_dir / 'study.json'}, {out_dir / 'study.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
