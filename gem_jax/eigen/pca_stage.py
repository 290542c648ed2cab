"""The ``pca`` stage: per-modality PCA of the collected Gaussians → the PCA-only GEM (DESIGN §1, §6).

    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage pca

Reads ``<workdir>/collect`` (:func:`gem_jax.eigen.pca.read_collect`), runs
:func:`~gem_jax.eigen.pca.fit_modalities` with ``config.pca.components`` per modality (colour
excluded: it is static in the teacher and stays fixed per Gaussian), and writes into
``<workdir>/pca/``:

    gem.npz        the compact model (``config.pca.dtype``), its size printed in MB
    coeffs.npy     (N, ΣK) float32: every training timestep's coefficients in σ units
    timesteps.npy  (N,) the training timestep of each row
    report.txt     the explained-variance table
    eval.json      PSNR/SSIM/LPIPS/L1 of the PCA-only model on both held-out splits
    renders/       prediction | ground truth PNGs
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import jax
import numpy as np

from gem_jax.atomic import write_npy
from gem_jax.eigen.evaluate import evaluate_protocol
from gem_jax.eigen.model import GEM, size_mb
from gem_jax.eigen.pca import MODALITIES, fit_modalities, read_collect, variance_report
from gem_jax.eigen.workdir import MODEL_FILE

__all__ = ["run"]

STAGE = "pca"


def run(config, workdir: str | os.PathLike, force: bool = False) -> dict:
    """Fit the PCA-only GEM and evaluate it (module docstring); returns the evaluation dict."""
    workdir = Path(workdir)
    out = workdir / STAGE
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = read_collect(workdir / "collect")
    components = {m: int(config.pca.components[m]) for m in MODALITIES}
    results = fit_modalities(data.matrices, components, method=str(config.pca.method))
    model = GEM.from_pca(results, data.colors, data.valid)
    report = variance_report(results)
    coeffs = np.concatenate([np.asarray(results[m].coeffs) for m in MODALITIES], axis=1).astype(np.float32)
    if jax.process_index() == 0:
        model.save(out / MODEL_FILE, dtype=str(config.pca.dtype))
        write_npy(out / "coeffs.npy", coeffs)
        write_npy(out / "timesteps.npy", data.timesteps.astype(np.int64))
        (out / "report.txt").write_text(report + "\n")
        print(f"[pca] {data.num_timesteps} timesteps × {data.num_gaussians} Gaussians in {time.time() - start:.1f}s")
        print(report)
        print(f"[pca] {model.summary()}")
        # Only process 0 wrote the file, so only it may read it back (a multi-host job races here).
        print(f"[pca] wrote {out / MODEL_FILE}: {size_mb(out / MODEL_FILE):.2f} MB on disk")
    return evaluate_protocol(config, workdir, model, out, tag="pca")
