"""The ``pca`` stage: per-modality PCA of the collected Gaussians → the PCA-only GEM (docs/architecture.md §1, §6).

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

import time
from collections.abc import Mapping

import jax
import numpy as np

from gem_jax.atomic import write_npy, write_text
from gem_jax.eigen.evaluate import evaluate_gem
from gem_jax.eigen.model import GEM, size_mb
from gem_jax.eigen.pca import MODALITIES, CollectData, fit_modalities, read_collect, variance_report
from gem_jax.eigen.workdir import MODEL_FILE, Coefficients
from gem_jax.loop import log

__all__ = ["pca_gem", "run"]

STAGE = "pca"


def pca_gem(data: CollectData, components: Mapping[str, int], method: str = "auto") -> tuple[GEM, Coefficients, dict]:
    """The PCA-only GEM of the collected Gaussians with ``components`` per modality, every
    training timestep's coefficients (σ units) and the per-modality :class:`PCAResult` s."""
    results = fit_modalities(data.matrices, dict(components), method=method)
    model = GEM.from_pca(results, data.colors, data.valid)
    coeffs = Coefficients(data.timesteps, np.concatenate([np.asarray(results[m].coeffs) for m in MODALITIES], 1))
    return model, coeffs, results


def run(ctx, pconfig) -> dict:
    """Fit the PCA-only GEM and evaluate it (module docstring); returns the evaluation dict."""
    out = ctx.stage_dir(STAGE)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    data = read_collect(ctx.stage_dir("collect"))
    components = {m: int(pconfig.components[m]) for m in MODALITIES}
    model, coeffs, results = pca_gem(data, components, method=str(pconfig.method))
    report = variance_report(results)
    if jax.process_index() == 0:
        model.save(out / MODEL_FILE, dtype=str(pconfig.dtype))
        write_npy(out / "coeffs.npy", coeffs.k)
        write_npy(out / "timesteps.npy", data.timesteps.astype(np.int64))
        write_text(out / "report.txt", report + "\n")
        # Only process 0 wrote the file, so only it may read it back (a multi-host job races here).
        log(STAGE, f"wrote {out / MODEL_FILE}: {size_mb(out / MODEL_FILE):.2f} MB on disk")
    log(STAGE, f"{data.num_timesteps} timesteps × {data.num_gaussians} Gaussians in {time.time() - start:.1f}s")
    log(STAGE, "explained variance:\n" + report)
    log(STAGE, f"{model.summary()}")
    return evaluate_gem(ctx, model, out, tag=STAGE)
