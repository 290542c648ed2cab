"""``gem_jax.load(workdir)`` — a trained avatar as a Python object (docs/architecture.md §1).

    import gem_jax
    avatar = gem_jax.load("runs/q")                 # the refined GEM (else the PCA-only one)
    k = avatar.coefficients(avatar.timesteps[0])     # a training frame's coefficients (σ units)
    image = avatar.render(k, avatar.cameras[8])      # (H, W, 3) in [0, 1], white background
    avatar.export_ply(k, "frame.ply")                # a standard 3DGS file

No neural network runs: :meth:`Avatar.evaluate` is ``mean + (k·σ) @ U`` per modality
(:mod:`gem_jax.eigen.model`), :meth:`Avatar.render` poses the Gaussians rigidly and rasterizes
them. ``pose`` is a ``(4, 4)`` world ← head transform (default: the subject's neutral training
frame); ``camera`` a :class:`gem_jax.types.Camera` (the subject's cameras are in
:attr:`Avatar.cameras`). :meth:`Avatar.predict` maps face crops' features to ``k`` when the
regressor was trained.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from gem_jax.eigen.model import GEM, check_coefficients
from gem_jax.types import Camera, Gaussians

__all__ = ["Avatar", "load"]


class Avatar:
    """A distilled avatar: the GEM, the subject's cameras and training coefficients (module docstring)."""

    def __init__(self, workdir: Path, model: GEM, stage: str):
        from gem_jax.context import StageContext
        from gem_jax.eigen.workdir import load_pca_coefficients, load_roots
        from gem_jax.regress.inference import neutral_timestep

        self.workdir, self.model, self.stage = workdir, model, stage
        self._coeffs = load_pca_coefficients(workdir)
        self.roots = load_roots(workdir)
        self.context = StageContext.from_workdir(workdir)  # the run's subject, also a real capture's
        self.cameras: dict[int, Camera] = {}
        self.neutral_pose = self.roots[int(self._coeffs.timesteps[0])]
        if self.context.subject_dir.is_dir():
            subject = self.context.subject
            for split in ("train", "val", "test"):
                self.cameras.update(subject.cameras(split))
            self.cameras = dict(sorted(self.cameras.items()))
            self.neutral_pose = self.roots[neutral_timestep(subject, self._coeffs.timesteps)]

    @property
    def timesteps(self) -> list[int]:
        """The training timesteps (those with PCA coefficients)."""
        return [int(t) for t in self._coeffs.timesteps]

    @property
    def num_coefficients(self) -> int:
        return self.model.total_components

    def coefficients(self, timestep: int) -> np.ndarray:
        """``(ΣK,)`` PCA coefficients of a training timestep."""
        return self._coeffs.of([timestep])[0]

    def evaluate(self, k) -> Gaussians:
        """``G(k)`` in the head frame (NaN/Inf refused, beyond ±3σ clamped with a warning)."""
        k = check_coefficients(self.model, k, where="Avatar.evaluate: coefficients")
        return self.model.evaluate(jnp.asarray(k), clamp=None)

    def render(self, k, camera: Camera, pose=None, background=(1.0, 1.0, 1.0), backend: str = "auto") -> np.ndarray:
        """``(H, W, 3)`` image of coefficients ``k`` (``(ΣK,)``, NaN/Inf refused, beyond ±3σ clamped
        with a warning) posed by ``pose`` seen by ``camera``."""
        from gem_jax.eigen.render import render_exact

        k = check_coefficients(self.model, np.asarray(k, np.float32).reshape(-1),
                               where="Avatar.render: coefficients").reshape(1, -1)
        pose = self.neutral_pose if pose is None else np.asarray(pose, np.float32)
        return render_exact(self.model, k, pose[None], np.asarray(camera.viewmat)[None], np.asarray(camera.K)[None],
                            background, camera.width, camera.height, backend)[0]

    def export_ply(self, k, path: str | os.PathLike, pose=None) -> Path:
        """Write ``G(k)`` (posed by ``pose`` if given, else in the head frame) as a standard 3DGS ``.ply``."""
        from gem_jax.eigen.render import export_ply

        return export_ply(self.model, k, path, pose)

    def predict(self, crops: np.ndarray, neutral: int = 0) -> np.ndarray:
        """``(F, ΣK)`` coefficients of face crops ``(F, S, S, 3)`` relative to crop ``neutral``."""
        from gem_jax.regress.inference import REGRESSOR_FILE, TrainedRegressor

        regressor = TrainedRegressor.load(self.workdir / "regress" / REGRESSOR_FILE)
        feats = regressor.extractor()(crops)
        return regressor.predict(feats - feats[neutral])

    def __repr__(self) -> str:
        return f"Avatar({self.workdir}, {self.stage}: {self.model.summary().splitlines()[0]})"


def load(workdir: str | os.PathLike, stage: str | None = None) -> Avatar:
    """The avatar of a work directory: the ``refine`` model if present, else ``pca`` (or ``stage``)."""
    from gem_jax.eigen.workdir import MODEL_FILE, load_model

    workdir = Path(workdir)
    if stage is None:
        stage = "refine" if (workdir / "refine" / MODEL_FILE).is_file() else "pca"
    return Avatar(workdir, load_model(workdir, stage), stage)
