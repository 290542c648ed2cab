"""The ``eval`` stage: one table of every model on the held-out protocol (docs/architecture.md §1, §8).

    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage eval

Each training stage evaluates itself on the same images with the same metrics (PSNR, SSIM,
LPIPS-VGG, L1; white background). This stage gathers them into ``<workdir>/eval/metrics.json``
and prints the table:

=====================  =====================  ===============================  ==================
model                  novel view             novel expression                 cross-identity
=====================  =====================  ===============================  ==================
teacher                held-out camera        held-out sequence (tracked mesh)  —
GEM, PCA only          PCA coefficients       fitted coefficients              —
GEM, refined           PCA coefficients       fitted coefficients              —
GEM + regressor        —                      regressor on the subject's images  regressor on identity B's images
=====================  =====================  ===============================  ==================

and stacks the renders of the same held-out frames side by side in ``eval/frames/`` (ground
truth, then each model). A stage that has not run is reported as missing, never guessed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import cv2
import numpy as np

from gem_jax.artefacts import read_json
from gem_jax.atomic import write_json

__all__ = ["collect_metrics", "metrics_table", "run"]

STAGE = "eval"
ROWS = [  # (row name, stage, {column: key in that stage's eval.json})
    ("teacher", "teacher", {"novel_view": "held_out_camera", "novel_expression": "held_out_sequence"}),
    ("GEM, PCA only", "pca", {"novel_view": "held_out_camera", "novel_expression": "held_out_sequence"}),
    ("GEM, refined", "refine", {"novel_view": "held_out_camera", "novel_expression": "held_out_sequence"}),
    ("GEM + regressor", "regress", {"novel_expression": "self_reenactment", "cross_identity": "cross_identity"}),
]
COLUMNS = ("novel_view", "novel_expression", "cross_identity")
METRICS = ("psnr", "ssim", "lpips", "l1")


def collect_metrics(workdir: str | os.PathLike) -> dict:
    """``{row: {column: {metric: value}}}`` from the stages' ``eval.json`` files (missing → absent)."""
    workdir = Path(workdir)
    out: dict = {}
    for name, stage, columns in ROWS:
        path = workdir / stage / "eval.json"
        if not path.is_file():
            out[name] = {"missing": f"{path} (run --stage {stage})"}
            continue
        ev = read_json(path, stage)
        out[name] = {col: {m: ev[key][m] for m in (*METRICS, "num_images", "coefficients") if m in ev[key]}
                     for col, key in columns.items() if key in ev}
    return out


def metrics_table(metrics: dict) -> str:
    head = f"{'model':<18}" + "".join(f"{c.replace('_', ' '):>30}" for c in COLUMNS)
    sub = f"{'':<18}" + "".join(f"{'PSNR  SSIM   LPIPS   L1':>30}" for _ in COLUMNS)
    lines = [head, sub]
    for name, row in metrics.items():
        cells = []
        for col in COLUMNS:
            r = row.get(col)
            if not r:
                cells.append(f"{'—':>30}")
                continue
            lp = f"{r['lpips']:.4f}" if "lpips" in r else "  -   "
            cells.append(f"{r['psnr']:>12.2f} {r['ssim']:.4f} {lp} {r['l1']:.4f}")
        lines.append(f"{name:<18}" + "".join(cells) + ("   (missing)" if "missing" in row else ""))
    return "\n".join(lines)


_FRAME = re.compile(r"^(?P<split>[a-z_]+)_\d+_t(?P<t>\d+)_c(?P<c>\d+)\.png$")


def _renders(folder: Path) -> dict:
    """``{(split, t, c): (prediction, ground truth)}`` of a stage's ``renders/*.png`` (pred | gt halves)."""
    out = {}
    for path in sorted(folder.glob("*.png")) if folder.is_dir() else []:
        m = _FRAME.match(path.name)
        image = cv2.imread(str(path))
        if m is None or image is None:
            continue
        w = image.shape[1] // 2
        out[(m["split"], int(m["t"]), int(m["c"]))] = (image[:, :w], image[:, w:])
    return out


def side_by_side(workdir: Path, out: Path) -> list[Path]:
    """Ground truth | teacher | PCA | refined | regressor for held-out frames every stage rendered."""
    sources = {"teacher": _renders(workdir / "teacher" / "renders"), "pca": _renders(workdir / "pca" / "renders"),
               "refine": _renders(workdir / "refine" / "renders"), "regress": _renders(workdir / "regress" / "renders")}
    alias = {"self_reenactment": "held_out_sequence"}
    regress = {(alias.get(s, s), t, c): v for (s, t, c), v in sources["regress"].items()}
    written = []
    base = sources["refine"] or sources["pca"]  # the frames the GEM stages rendered
    for key, (_, gt) in base.items():
        panels = [gt] + [src[key][0] for src in (sources["teacher"], sources["pca"], sources["refine"]) if key in src]
        if key in regress:
            panels.append(regress[key][0])
        if len(panels) > 2:
            path = out / "frames" / f"{key[0]}_t{key[1]:05d}_c{key[2]:02d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.concatenate(panels, axis=1))
            written.append(path)
    return written


def run(ctx) -> dict:
    """Gather, print and write the evaluation (module docstring)."""
    workdir = ctx.workdir
    out = workdir / STAGE
    out.mkdir(parents=True, exist_ok=True)
    metrics = collect_metrics(workdir)
    frames = side_by_side(workdir, out)
    result = {"background": list(ctx.background), "models": metrics,
              "frames": [str(p.relative_to(workdir)) for p in frames]}
    write_json(out / "metrics.json", result)
    print(metrics_table(metrics))
    print(f"[eval] wrote {out / 'metrics.json'} and {len(frames)} side-by-side frames in {out / 'frames'} "
          "(ground truth | teacher | PCA | refined | regressor)")
    return result
