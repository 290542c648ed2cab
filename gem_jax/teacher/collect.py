"""The ``collect`` stage: the trained teacher on every training timestep, written to disk (docs/architecture.md §1, §6).

    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage collect

GEM (Zielonka et al., CVPR 2025, §3.1) distils the teacher by PCA of the Gaussians it
produces for the training frames. This stage runs the teacher (test-time style ``z = 0``) on
the tracked mesh of every training timestep — root pose removed, so the data matrices hold
expression and jaw/neck/eye motion only — and writes the *activated* canonical Gaussians per
modality as memory-mapped float32 matrices in the layout of :mod:`gem_jax.eigen.pca`
(``position.npy (N, T·3)``, ``rotation.npy (N, T·4)``, ``scale.npy (N, T·3)``,
``opacity.npy (N, T)``, ``colors.npy (T, 3)``, ``valid.npy (R, R)``, ``timesteps.npy (N,)``).

Beside them, ``roots.npy`` ``(max timestep + 1, 4, 4)`` holds the head's root transform
(world ← head frame) of every timestep of every split, identity where a timestep does not
exist: the ``eigen`` stages place the evaluated Gaussians with it and never import the teacher.

Quaternions are made sign-consistent over time (``q_t ↦ −q_t`` where ``q_t · q_ref < 0``,
``q_ref`` the first timestep's), since ``q`` and ``−q`` are one rotation but not one point for
a linear model. Every file is written under a temporary name and renamed when complete, so an
interrupted stage leaves no half-written matrix behind (rerunning starts it again).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gem_jax.atomic import write_npy
from gem_jax.batching import padded_chunks
from gem_jax.eigen.pca import CHANNELS, MODALITIES, write_collect
from gem_jax.eigen.workdir import ROOTS_FILE
from gem_jax.loop import log
from gem_jax.teacher.data import tracked_meshes
from gem_jax.teacher.maps import root_free_mesh
from gem_jax.teacher.model import ForwardSpec, TeacherConstants, build_constants, canonical_gaussians_fn, make_net
from gem_jax.teacher.train import restore_params
from gem_jax.types import Gaussians

__all__ = ["ROOTS_FILE", "TrainedTeacher", "collect_gaussians", "load_trained_teacher", "run"]

STAGE = "collect"


class TrainedTeacher:
    """A restored teacher and its subject (see :func:`load_trained_teacher`)."""

    def __init__(self, params: dict, constants: TeacherConstants, tconfig, ctx):
        self.params, self.constants, self.tconfig = params, constants, tconfig
        self.subject, self.head_model = ctx.subject, ctx.head_model
        self._mesh = jax.jit(lambda p: root_free_mesh(self.head_model, p))
        self.canonical = canonical_gaussians_fn(make_net(tconfig), ForwardSpec.from_config(tconfig))

    def root_free_mesh(self, timestep: int) -> tuple[Float[Array, "V 3"], Float[Array, "4 4"]]:
        """The tracked mesh of ``timestep`` in the head's frame, and the world ← head transform."""
        return self._mesh(jax.tree.map(jnp.asarray, self.subject.flame_params(int(timestep))))

    def gaussians(self, timestep: int) -> Gaussians:
        """The activated Gaussians ``(N,)`` of one timestep in the head's frame (root pose removed)."""
        g = self.canonical(self.params, self.constants, self.root_free_mesh(timestep)[0][None])
        return jax.tree.map(lambda x: x[0], g)


def load_trained_teacher(ctx, tconfig) -> TrainedTeacher:
    """The teacher trained by the ``teacher`` stage of the run ``ctx`` (latest checkpoint)."""
    consts = build_constants(ctx.head_model, ctx.subject.canonical_params(), tconfig)
    params = restore_params(tconfig, ctx.stage_dir("teacher"), int(ctx.seed))
    return TrainedTeacher(params, consts, tconfig, ctx)


def collect_gaussians(teacher: TrainedTeacher, timesteps, out: Path, batch_size: int = 8) -> dict[str, np.ndarray]:
    """Run the teacher on ``timesteps`` and write the modality matrices into ``out``.

    Returns the (memory-mapped) matrices. Files are ``.<name>.npy.tmp`` until complete.
    """
    from tqdm import tqdm

    consts = teacher.constants
    num = int(consts.canonical.num)
    timesteps = np.asarray([int(t) for t in timesteps])
    meshes = tracked_meshes(teacher.subject, teacher.head_model, timesteps)
    out.mkdir(parents=True, exist_ok=True)
    tmp = {m: out / f".{m}.npy.tmp" for m in MODALITIES}
    mats = {m: np.lib.format.open_memmap(tmp[m], mode="w+", dtype=np.float32,
                                         shape=(len(timesteps), num * CHANNELS[m])) for m in MODALITIES}
    q_ref = None
    colors = None
    chunks = list(padded_chunks(len(timesteps), batch_size))
    for rows, padded in tqdm(chunks, desc="collect", unit="batch", file=sys.stderr,
                             disable=jax.process_index() != 0, mininterval=5.0):
        ts = timesteps[rows].tolist()
        g = jax.device_get(teacher.canonical(teacher.params, consts, jnp.asarray(meshes.vertices[timesteps[padded]])))
        quats = np.asarray(g.quats[: len(ts)])
        if q_ref is None:
            q_ref = quats[0].copy()
            colors = np.asarray(g.colors[0], np.float32)
        flip = np.sum(quats * q_ref, axis=-1, keepdims=True) < 0
        quats = np.where(flip, -quats, quats)
        values = {"position": g.means[: len(ts)], "rotation": quats, "scale": g.scales[: len(ts)],
                  "opacity": g.opacities[: len(ts), :, None]}
        for m in MODALITIES:
            arr = np.asarray(values[m], np.float32)
            if not np.all(np.isfinite(arr)):
                raise FloatingPointError(f"collect: the teacher produced NaN/Inf {m} values at timesteps {ts}")
            mats[m][rows] = arr.reshape(len(ts), -1)
    for m in MODALITIES:
        mats[m].flush()
    return {"colors": colors, **{m: mats[m] for m in MODALITIES}}


def run(ctx, cconfig, tconfig) -> Path:
    """Collect the teacher's Gaussians of every training timestep into ``<workdir>/collect``.

    ``cconfig`` is ``config.collect``; ``tconfig`` the teacher's section, which describes the
    network the checkpoint holds."""
    out = ctx.stage_dir(STAGE)
    start = time.time()
    teacher = load_trained_teacher(ctx, tconfig)
    subject = teacher.subject
    timesteps = sorted(set(subject.timesteps("train")))
    if len(timesteps) < 2:
        raise ValueError(f"{subject.root}: the train split has {len(timesteps)} timestep(s); PCA needs at least 2")
    valid = np.asarray(teacher.constants.uv.valid, bool)
    texels = np.asarray(teacher.constants.canonical.texels)
    if not np.array_equal(texels, np.flatnonzero(valid.reshape(-1))):
        raise AssertionError("collect: the teacher's Gaussians are not the valid texels in row-major order")
    log(STAGE, f"{len(timesteps)} training timesteps × {texels.size} Gaussians ({valid.shape[0]}² UV)")
    if jax.process_index() != 0:  # every process computes; only the first writes
        return out
    mats = collect_gaussians(teacher, timesteps, out, int(cconfig.batch_size))
    # Validate and rename: write_collect checks shapes; the big matrices are renamed, not copied.
    for m in MODALITIES:
        del mats[m]
    for m in MODALITIES:
        os.replace(out / f".{m}.npy.tmp", out / f"{m}.npy")
    small = {m: np.load(out / f"{m}.npy", mmap_mode="r") for m in MODALITIES}
    write_collect(out, small, mats["colors"], valid, np.asarray(timesteps), matrices_written=True)
    all_t = sorted({t for split in ("train", "val", "test") for t in subject.timesteps(split)})
    roots = tracked_meshes(subject, teacher.head_model, all_t).roots.astype(np.float32)
    write_npy(out / ROOTS_FILE, roots)
    size = sum((out / f"{m}.npy").stat().st_size for m in MODALITIES) / 1e6
    log(STAGE, f"wrote {out} ({size:.1f} MB of data matrices) in {time.time() - start:.1f}s")
    return out
