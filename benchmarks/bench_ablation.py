"""Component ablation of a distilled avatar: PCA-only vs refined, quality, size and speed vs K.

    python benchmarks/bench_ablation.py --workdir runs/b                       # after --stage all
    python benchmarks/bench_ablation.py --workdir runs/q --components 10,30,50 --refine-steps 0

The shape of the paper's ablation (GEM, Tab. 4 and the refinement ablation): for each
component count ``K`` (the same for every modality, capped at the number of training
timesteps − 1 and, for a modality of lower numerical rank, at that rank), the PCA-only GEM is
fitted from the ``collect`` stage's data matrices and then refined photometrically with the
run's ``config.refine`` (:func:`gem_jax.eigen.refine.refine_basis`; ``--refine-steps``
overrides its step count, 0 skips refinement; ``--keep best`` measures the basis the
``refine`` stage would keep, the one with the best PSNR on its withheld training camera, which
may be the PCA basis itself; the default ``--keep last`` measures what refinement produced).
Both models are evaluated with the run's own
protocol (:func:`gem_jax.eigen.evaluate.evaluate_gem`, ``config.eval`` / ``config.fit``):

* **held-out camera** (novel view): PSNR / SSIM / LPIPS with the PCA coefficients of each
  training timestep;
* **held-out sequence** (novel expression): the same metrics with coefficients fitted by
  analysis-by-synthesis (fitted k, the regressor's upper bound);
* **MB**: the stored file as float32 and float16;
* **fps**: coefficient vector → image (``G(k)``, root pose, rasterize) as one jitted function,
  median of ``--repeats`` runs after warm-up, each ended by ``block_until_ready``.

The teacher (``<workdir>/teacher/eval.json``) is a row. Each K's results are kept in
``--out-dir/K<K>/`` (a rerun skips finished K; refinement resumes from its checkpoint), and
the script writes ``ablation.json``, ``ablation.md`` and a figure (PSNR vs K, PCA vs refined,
both splits, the teacher as a line; ``--figure``).
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

from gem_jax.artefacts import read_json  # noqa: E402
from gem_jax.atomic import write_json, write_text  # noqa: E402
from gem_jax.config_check import load_config_file  # noqa: E402
from gem_jax.context import StageContext  # noqa: E402
from gem_jax.data.images import load_images  # noqa: E402
from gem_jax.eigen.evaluate import evaluate_gem  # noqa: E402
from gem_jax.eigen.model import GEM, size_mb  # noqa: E402
from gem_jax.eigen.pca import MODALITIES, read_collect  # noqa: E402
from gem_jax.eigen.pca_stage import pca_gem  # noqa: E402
from gem_jax.eigen.refine import refine_basis  # noqa: E402
from gem_jax.eigen.render import frame_capacity, world_gaussians  # noqa: E402
from gem_jax.eigen.workdir import load_roots  # noqa: E402
from gem_jax.render import rasterize  # noqa: E402
from gem_jax.types import Camera  # noqa: E402

SPLITS = {"held_out_camera": "novel view", "held_out_sequence": "novel expression (fitted k)"}
METRICS = ("psnr", "ssim", "lpips")


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


def split_metrics(evaluation: dict) -> dict:
    """``{split: {metric: value}}`` of an ``eval.json``-shaped dict."""
    return {s: {m: evaluation[s][m] for m in METRICS if m in evaluation[s]} for s in SPLITS if s in evaluation}


def ablate_one(ctx, rconfig, data, count: int, out: Path, backend: str, repeats: int, keep: str) -> dict:
    """PCA-only and refined GEM at ``count`` components per modality, evaluated (module docstring)."""
    model, coeffs, results = pca_gem(data, {m: min(count, data.num_timesteps - 1) for m in MODALITIES})
    row = {"components": count, "components_used": dict(model.num_components),
           "explained_variance": {m: float(np.sum(np.asarray(results[m].explained))) for m in MODALITIES},
           "mb_float32": size_mb(model), "mb_float16": size_mb(model, "float16")}
    start = time.time()
    cached = out / "pca" / "eval.json"  # the PCA-only model is a pure function of the collect data and K
    evaluation = read_json(cached, "ablation") if cached.is_file() else None
    if evaluation is None:
        evaluation = evaluate_gem(ctx, model, out / "pca", tag=f"pca_K{count}", coeffs=coeffs)
    row["pca"] = split_metrics(evaluation)
    row["pca_eval_seconds"] = time.time() - start
    if int(rconfig.steps) > 0:
        start = time.time()
        refined, validation = refine_basis(ctx, rconfig, model, coeffs, out / "refine", keep_best=keep == "best")
        row["refine_seconds"] = time.time() - start
        row["refine_validation"] = validation
        row["refined_basis"] = keep
        row["refined"] = split_metrics(evaluate_gem(ctx, refined, out / "refine", tag=f"refined_K{count}",
                                                    coeffs=coeffs))
    images = load_images(ctx.subject, "val", 1)  # one held-out-camera image: its camera and timestep
    t = images.timesteps[:1]
    kvec, root = coeffs.of(t)[0], load_roots(ctx.workdir)[t[0]]
    cam = Camera(jnp.asarray(images.viewmats[0]), jnp.asarray(images.Ks[0]), images.width, images.height)
    capacity = frame_capacity(model, kvec[None], root[None], images.viewmats[:1], images.Ks[:1], images.width,
                              images.height, headroom=1.25)
    row["image"] = f"{images.width}x{images.height}"
    row["fps"] = {backend: render_fps(model, kvec, root, cam, capacity, backend, repeats)}
    return row


def teacher_row(workdir: Path) -> dict | None:
    path = workdir / "teacher" / "eval.json"
    return split_metrics(read_json(path, "teacher")) if path.is_file() else None


def markdown(rows: list[dict], teacher: dict | None, header: str) -> str:
    def cell(metrics: dict | None, split: str) -> str:
        if not metrics or split not in metrics:
            return "— | — | —"
        m = metrics[split]
        return f"{m['psnr']:.2f} | {m.get('ssim', float('nan')):.4f} | {m.get('lpips', float('nan')):.4f}"

    cols = " | ".join(f"{name} PSNR | SSIM | LPIPS" for name in SPLITS.values())
    lines = [header, "", f"| model | K (pos/rot/scale/opac) | {cols} | MB fp32 | MB fp16 | fps |",
             "|---|---|" + "---|" * (3 * len(SPLITS) + 3)]
    if teacher:
        lines.append("| teacher | — | " + " | ".join(cell(teacher, s) for s in SPLITS) + " | — | — | — |")
    for r in rows:
        used = "/".join(str(r["components_used"][m]) for m in MODALITIES)
        fps = ", ".join(f"{v:.0f}" for v in r["fps"].values())
        for kind in ("pca", "refined"):
            if kind in r:
                label = "PCA only" if kind == "pca" else f"refined ({r.get('refined_basis', 'best')} basis)"
                lines.append(f"| GEM {label} | {used} | "
                             + " | ".join(cell(r[kind], s) for s in SPLITS)
                             + f" | {r['mb_float32']:.2f} | {r['mb_float16']:.2f} | {fps} |")
    return "\n".join(lines)


def figure(rows: list[dict], teacher: dict | None, path: Path, title: str, keep: str) -> Path:
    """PSNR vs K, PCA-only vs refined, one panel per held-out split; the teacher as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SPLITS), figsize=(5.2 * len(SPLITS), 3.6), squeeze=False)
    ks = [r["components"] for r in rows]
    for ax, (split, name) in zip(axes[0], SPLITS.items()):
        for kind, style in (("pca", "o-"), ("refined", "s-")):
            values = [r[kind][split]["psnr"] if kind in r and split in r[kind] else np.nan for r in rows]
            if not all(np.isnan(values)):
                ax.plot(ks, values, style, label="GEM, PCA only" if kind == "pca" else f"GEM, refined ({keep} basis)")
        if teacher and split in teacher:
            ax.axhline(teacher[split]["psnr"], color="k", ls="--", lw=1, label="teacher")
        ax.set_xscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xticks([], minor=True)
        ax.set_xlabel("components per modality K")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--config", default="configs/benchmark.py", help="the run's config (its refine section is used)")
    p.add_argument("--components", default="5,10,20,50")
    p.add_argument("--refine-steps", type=int, default=None, help="override config.refine.steps (0: PCA only)")
    p.add_argument("--keep", choices=("last", "best"), default="last",
                   help="refined basis measured: the last one, or the one the refine stage keeps (best validation PSNR)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--backend", default="cpu", help="rasterizer backend of the fps column")
    p.add_argument("--out-dir", default="benchmarks/out/ablation")
    p.add_argument("--figure", default=None, help="also write the figure here (e.g. docs/ablation.png)")
    args = p.parse_args(argv)
    workdir, out_dir = Path(args.workdir), Path(args.out_dir)
    config = load_config_file(args.config)
    rconfig = config.refine
    if args.refine_steps is not None:
        rconfig = rconfig.copy_and_resolve_references()
        rconfig.steps = int(args.refine_steps)
    ctx = StageContext.from_workdir(workdir)
    data = read_collect(workdir / "collect")
    rows = []
    for count in [int(x) for x in args.components.split(",")]:
        done = out_dir / f"K{count}" / f"row_{args.keep}.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            print(f"K={count}: kept {done}", flush=True)
            continue
        row = ablate_one(ctx, rconfig, data, count, out_dir / f"K{count}", args.backend, args.repeats, args.keep)
        write_json(done, row)
        rows.append(row)
        print(json.dumps(row), flush=True)
    teacher = teacher_row(workdir)
    header = (f"GEM component ablation ({args.workdir}): {data.num_gaussians} Gaussians, {data.num_timesteps} "
              f"training timesteps, {rows[0]['image'] if rows else '?'} images, refinement "
              f"{int(rconfig.steps)} steps ({args.keep} basis), {jax.devices()[0].platform} ({platform.processor() or platform.machine()})")
    table = markdown(rows, teacher, header)
    print(table)
    write_json(out_dir / "ablation.json", {"workdir": str(workdir), "teacher": teacher, "rows": rows})
    write_text(out_dir / "ablation.md", table + "\n")
    for path in filter(None, [out_dir / "ablation.png", Path(args.figure) if args.figure else None]):
        print(f"wrote {figure(rows, teacher, path, header, args.keep)}")
    print(f"wrote {out_dir / 'ablation.json'}, {out_dir / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
