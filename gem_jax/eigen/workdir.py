"""What the GEM stages read from and write to a work directory (docs/architecture.md §1).

    <workdir>/collect/   the teacher's Gaussians per training timestep (gem_jax.eigen.pca layout)
                         and roots.npy (T_all, 4, 4): the root pose of every timestep
    <workdir>/pca/       gem.npz (the PCA-only model), coeffs.npy (N, ΣK) and timesteps.npy (N,):
                         the σ-unit coefficients of every training timestep; report.txt, eval.json
    <workdir>/refine/    gem.npz (the refined model), ckpt/ (orbax), metrics.json, eval.json

The eigen stages never import the teacher: ``collect`` hands them these plain arrays. Every
reader names the missing or corrupt file and the stage that writes it (:mod:`gem_jax.artefacts`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gem_jax.artefacts import artefact_error, need, read_npy, read_npz
from gem_jax.eigen.model import GEM, GEMFormatError, load

__all__ = ["MODEL_FILE", "Coefficients", "load_model", "load_pca_coefficients", "load_roots", "stored_dtype"]

MODEL_FILE = "gem.npz"
ROOTS_FILE = "roots.npy"


def load_roots(workdir: str | os.PathLike) -> np.ndarray:
    """``(T_all, 4, 4)`` root poses (world ← head frame) indexed by timestep, from ``collect``."""
    path = Path(workdir) / "collect" / ROOTS_FILE
    roots = read_npy(path, "collect", ndim=3, kind="f")
    if roots.shape[1:] != (4, 4) or not np.all(np.isfinite(roots)):
        raise artefact_error(path, "collect", f"expected finite float (T, 4, 4) root transforms, found "
                                              f"{roots.dtype} {roots.shape}")
    return roots.astype(np.float32)


class Coefficients:
    """The PCA coefficients ``k (N, ΣK)`` (σ units) of the training timesteps ``timesteps (N,)``."""

    def __init__(self, timesteps: np.ndarray, k: np.ndarray):
        if k.ndim != 2 or timesteps.shape != (k.shape[0],):
            raise ValueError(f"coefficients: expected k (N, K) and timesteps (N,), got {k.shape} and {timesteps.shape}")
        self.timesteps, self.k = timesteps.astype(np.int64), k.astype(np.float32)
        self._row = {int(t): i for i, t in enumerate(self.timesteps)}

    def rows(self, timesteps) -> np.ndarray:
        missing = sorted({int(t) for t in timesteps} - self._row.keys())
        if missing:
            raise KeyError(f"coefficients: no PCA coefficients for timesteps {missing[:10]} (not training timesteps)")
        return np.array([self._row[int(t)] for t in timesteps], np.int64)

    def of(self, timesteps) -> np.ndarray:
        """``(len(timesteps), ΣK)``: the coefficients of each given timestep."""
        return self.k[self.rows(timesteps)]


def load_pca_coefficients(workdir: str | os.PathLike) -> Coefficients:
    root = Path(workdir) / "pca"
    k = read_npy(root / "coeffs.npy", "pca", ndim=2, kind="f")
    t = read_npy(root / "timesteps.npy", "pca", ndim=1, kind="i")
    if t.shape != (k.shape[0],):
        raise artefact_error(root / "timesteps.npy", "pca", f"expected shape ({k.shape[0]},) (one timestep per row "
                                                           f"of coeffs.npy), found {t.shape}")
    if not np.all(np.isfinite(k)):
        raise artefact_error(root / "coeffs.npy", "pca", "expected finite coefficients, found NaN/Inf")
    return Coefficients(t, k)


def load_model(workdir: str | os.PathLike, stage: str | None = None) -> GEM:
    """The GEM of ``stage`` (``"refine"`` or ``"pca"``); default: refined if present, else PCA-only."""
    workdir = Path(workdir)
    if stage is None:
        stage = "refine" if (workdir / "refine" / MODEL_FILE).is_file() else "pca"
    try:
        return load(need(workdir / stage / MODEL_FILE, stage))
    except GEMFormatError as err:
        raise GEMFormatError(f"{err}; it is written by the {stage} stage: redo it with --force {stage}") from err


def stored_dtype(path: str | os.PathLike) -> str:
    """``"float16"`` or ``"float32"``: how the bases of the model file at ``path`` are stored."""
    return "float16" if read_npz(path, "pca")["position_U"].dtype == np.float16 else "float32"
