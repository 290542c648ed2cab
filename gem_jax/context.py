"""The stage context: what every stage of a run shares, built once (docs/architecture.md §1).

    ctx = StageContext.from_config(config, "runs/q")   # python -m gem_jax.train does this
    ctx.subject, ctx.head_model                         # loaded once, on first use
    ctx.background, ctx.backend, ctx.mesh, ctx.seed
    ctx.stage_dir("teacher")                            # runs/q/teacher

Each stage's ``run(ctx, section)`` receives this context and its own config section
(``config.teacher``, ``config.refine``, …) and nothing else, so no stage reads another stage's
settings. Two sections are shared on purpose and live here: the evaluation protocol
(``config.eval``: every model is evaluated on the same images with the same metrics) and the
analysis-by-synthesis settings (``config.fit``), which the GEM evaluation and reenactment use.

The entry point records the context in ``<workdir>/context.json`` (the subject folder, the
head model and its sizes, the background, the seed), so code that starts from a work directory
alone — :func:`gem_jax.load`, ``python -m gem_jax.reenact``, the viewer — finds the same
subject, including a real capture given by ``data.subject_dir``
(:meth:`StageContext.from_workdir`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from pathlib import Path

import ml_collections

from gem_jax.atomic import write_json

__all__ = ["CONTEXT_FILE", "StageContext"]

CONTEXT_FILE = "context.json"


def _default_eval() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"max_images": 0, "lpips": True, "num_renders": 6, "batch_size": 8,
                                      "train_images": 16})


def _default_fit() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"steps": 300, "batch_size": 8, "lr": 0.15, "pose": False, "prior": 1e-3,
                                      "l1": 0.3, "dssim": 1.0})


@dataclasses.dataclass
class StageContext:
    """A run's shared state (module docstring). Cheap to build: the subject and the head model
    are read on first use."""

    workdir: Path
    subject_dir: Path
    head_model_path: str = ""
    n_shape: int = 0
    n_expr: int = 0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)
    backend: str = "auto"
    seed: int = 0
    synthetic: bool = True  # the subject is the embedded generator's (so <workdir>/data_cross may exist)
    eval: ml_collections.ConfigDict = dataclasses.field(default_factory=_default_eval)
    fit: ml_collections.ConfigDict = dataclasses.field(default_factory=_default_fit)
    mesh_override: object = None  # a jax Mesh to use instead of every device (tests)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, workdir: str | os.PathLike, mesh=None) -> "StageContext":
        """The context of a run of ``config`` in ``workdir``."""
        workdir = Path(workdir)
        data = config.data
        real = bool(data.subject_dir)
        return cls(workdir=workdir, subject_dir=Path(data.subject_dir) if real else workdir / "data",
                   head_model_path=str(data.head_model or ""), n_shape=int(data.n_shape), n_expr=int(data.n_expr),
                   background=tuple(float(x) for x in data.background), backend=str(config.render.backend),
                   seed=int(config.seed), synthetic=not real, eval=config.eval, fit=config.fit, mesh_override=mesh)

    @classmethod
    def from_workdir(cls, workdir: str | os.PathLike) -> "StageContext":
        """The context recorded by the run in ``workdir`` (``context.json``); a work directory
        from before it was recorded reads its subject from ``<workdir>/data``."""
        workdir = Path(workdir)
        path = workdir / CONTEXT_FILE
        if not path.is_file():
            return cls(workdir=workdir, subject_dir=workdir / "data")
        try:
            rec = json.loads(path.read_text())
            rec.update(subject_dir=workdir / rec["subject_dir"], background=tuple(rec["background"]),
                       eval=ml_collections.ConfigDict(rec["eval"]), fit=ml_collections.ConfigDict(rec["fit"]))
            return cls(workdir=workdir, **rec)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a readable run context ({type(err).__name__}: {err}); "
                             "rerun any stage with python -m gem_jax.train to rewrite it") from err

    def save(self) -> Path:
        """Write ``<workdir>/context.json`` (the subject path relative to the work directory
        when it lies inside it, so a moved work directory still finds its data)."""
        rec = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("workdir", "mesh_override")}
        subject = self.subject_dir.resolve()
        if subject.is_relative_to(self.workdir.resolve()):
            subject = subject.relative_to(self.workdir.resolve())
        rec.update(subject_dir=str(subject), eval=self.eval.to_dict(), fit=self.fit.to_dict())
        return write_json(self.workdir / CONTEXT_FILE, rec)

    # -- shared resources ----------------------------------------------------------------------
    @functools.cached_property
    def subject(self):
        """The subject (:class:`gem_jax.data.subject.Subject`), read once."""
        from gem_jax.data.subject import load_subject

        return load_subject(self.subject_dir)

    @functools.cached_property
    def head_model(self):
        """The FLAME-format head model of the subject, read once."""
        return self.subject.head_model(self.head_model_path or None, self.n_shape, self.n_expr)

    @functools.cached_property
    def mesh(self):
        """The 1-D ``('data',)`` device mesh of every stage (:mod:`gem_jax.parallel`)."""
        from gem_jax import parallel

        return self.mesh_override if self.mesh_override is not None else parallel.data_mesh()

    @property
    def cross_subject_dir(self) -> Path | None:
        """The synthetic cross-identity ground truth (identity B performing the held-out
        sequence), when the generator wrote it; None for a real capture."""
        folder = self.workdir / "data_cross"
        return folder if self.synthetic and folder.is_dir() else None

    def stage_dir(self, stage: str) -> Path:
        return self.workdir / stage
