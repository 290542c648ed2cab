"""``python -m gem_jax.train`` — the pipeline's entry point (docs/architecture.md §1).

    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage data
    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage all \\
        --config.synthetic.frames_per_sequence=8

Flags only: :func:`run` builds the stage context once (:class:`gem_jax.context.StageContext`:
the subject, the head model, the background, the render backend, the device mesh), records it
in ``<workdir>/context.json``, and calls each stage as ``run(ctx, *sections)`` with its own
config section(s) (:data:`STAGES`); tests and notebooks call :func:`run` directly.
``--config.a.b=value`` overrides a config field; a mistyped key is an error.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import sys
import time
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from gem_jax.atomic import write_text
from gem_jax.config_check import check_config
from gem_jax.context import StageContext
from gem_jax.errors import ArtefactError, CoefficientError, ConfigError, SubjectFormatError
from gem_jax.multihost import barrier, initialize
from gem_jax.stage_lock import StageLockedError, stage_lock

__all__ = ["STAGES", "STAGE_NAMES", "Stage", "main", "run", "stage_done", "stage_function"]


@dataclasses.dataclass(frozen=True)
class Stage:
    """A pipeline stage: ``module:function``, called as ``function(ctx, *config sections)``."""

    name: str
    target: str
    sections: tuple[str, ...]



# In pipeline order. A stage's module is imported only when the stage runs.
STAGES: list[Stage] = [
    Stage("data", "gem_jax.data.prepare:run", ("synthetic",)),
    Stage("teacher", "gem_jax.teacher.train:run", ("teacher",)),
    Stage("collect", "gem_jax.teacher.collect:run", ("collect", "teacher")),  # the teacher's network
    Stage("pca", "gem_jax.eigen.pca_stage:run", ("pca",)),
    Stage("refine", "gem_jax.eigen.refine:run", ("refine",)),
    Stage("regress", "gem_jax.regress.train:run", ("regress",)),
    Stage("eval", "gem_jax.report:run", ()),
]
STAGE_NAMES = [stage.name for stage in STAGES]
#: Stages that only read and write files: in a multi-process job process 0 runs them while the
#: others wait at the stage's barrier (two processes generating one folder would race).
PROCESS_ZERO_STAGES = {"data", "eval"}


def stage_function(name: str):
    """The ``run(ctx, *sections)`` function of stage ``name`` (its module imported now)."""
    target = {stage.name: stage.target for stage in STAGES}[name]
    module_name, function_name = target.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def stage_done(workdir: Path, name: str) -> bool:
    return (workdir / name / "DONE").exists()


def mark_done(workdir: Path, name: str) -> None:
    """Atomically record that a stage finished (its outputs are complete)."""
    write_text(workdir / name / "DONE", time.strftime("%Y-%m-%dT%H:%M:%S") + "\n")


def _start_over(ctx: StageContext, name: str, rank: int) -> None:
    """``--force``: remove the stage's folder (process 0), so it starts from nothing."""
    if rank == 0:
        shutil.rmtree(ctx.stage_dir(name), ignore_errors=True)
    barrier(f"gem_jax --force {name}")


def run(config, workdir: str | os.PathLike, stage: str = "all", force: str | None = None, mesh=None) -> None:
    """Run one stage, or with ``stage="all"`` every stage in order, skipping finished ones.

    ``force`` names a stage to redo together with every stage after it; ``mesh`` replaces the
    default mesh over every device (tests).

    Every process of a multi-process job runs this with the same arguments: each stage runs
    under its lock (one writer per stage, gem_jax/stage_lock.py) between two barriers, and only
    process 0 writes ``DONE``.
    """
    import jax

    check_config(config)  # every field, once, before any stage (gem_jax/config_check.py)
    workdir = Path(workdir)
    names = STAGE_NAMES if stage == "all" else [stage]
    for name in names + ([force] if force else []):
        if name not in STAGE_NAMES:
            raise ValueError(f"unknown stage {name!r}; expected one of {STAGE_NAMES + ['all']}")
    forced = set(STAGE_NAMES[STAGE_NAMES.index(force):]) if force else set()
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = StageContext.from_config(config, workdir, mesh=mesh)
    rank = jax.process_index()
    if rank == 0:
        ctx.save()
    for spec in STAGES:
        if spec.name not in names:
            continue
        if stage == "all" and stage_done(workdir, spec.name) and spec.name not in forced:
            print(f"[gem_jax] stage {spec.name}: already done, skipping ({workdir / spec.name / 'DONE'})")
            continue
        with stage_lock(workdir, spec.name, rank):
            if spec.name in forced:
                _start_over(ctx, spec.name, rank)
            print(f"[gem_jax] stage {spec.name}: starting", flush=True)
            start = time.time()
            if rank == 0 or spec.name not in PROCESS_ZERO_STAGES:
                stage_function(spec.name)(ctx, *(config[section] for section in spec.sections))
            barrier(f"gem_jax stage {spec.name} written")  # every process's share is on disk
            if rank == 0:
                mark_done(workdir, spec.name)
        barrier(f"gem_jax stage {spec.name} done")  # no process reads a stage before its DONE exists
        print(f"[gem_jax] stage {spec.name}: done in {time.time() - start:.1f}s", flush=True)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: data, checkpoints, outputs.")
_STAGE = flags.DEFINE_enum("stage", "all", STAGE_NAMES + ["all"], "Stage to run (docs/architecture.md §1).")
_FORCE = flags.DEFINE_enum("force", None, STAGE_NAMES, "Redo this stage and every stage after it.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Join a multi-process job first (jax.distributed.initialize; "
                                "gem_jax/multihost.py): one process per host, or several on one machine.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "With --multihost: host:port of process 0's coordinator "
                                   "(else JAX_COORDINATOR_ADDRESS, else detected: SLURM, Open MPI, Kubernetes, TPU).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --multihost: processes in the job "
                                      "(else JAX_NUM_PROCESSES, else detected).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --multihost: this process's id, 0 … N−1 "
                                   "(else JAX_PROCESS_ID, else detected).")
_HEARTBEAT = flags.DEFINE_integer("heartbeat_timeout", None, "With --multihost: seconds after which the "
                                  "others stop when a process dies (JAX's default: 100).")


def _main(argv) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    if _MULTIHOST.value:
        initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _HEARTBEAT.value)
    elif any(f.present for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID, _HEARTBEAT)):
        raise app.UsageError("--coordinator, --num_processes, --process_id and --heartbeat_timeout need --multihost")
    try:
        run(_CONFIG.value, _WORKDIR.value, _STAGE.value, _FORCE.value)
    except (StageLockedError, ConfigError, SubjectFormatError, ArtefactError, CoefficientError) as err:
        # Bad input at a boundary: the message names the file or field; a traceback adds nothing.
        print(f"[gem_jax] error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return 0


def main() -> None:
    app.run(lambda argv: sys.exit(_main(argv)))


if __name__ == "__main__":
    main()
