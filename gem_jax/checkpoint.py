"""Checkpoints of a training stage: orbax ``CheckpointManager`` with auto-resume (docs/architecture.md §3, §10).

Each stage owns ``<workdir>/<stage>/ckpt``. Saves are atomic (orbax writes into a temporary
folder and renames it when complete, so a run killed mid-save leaves the previous checkpoint
as the latest) and asynchronous (training goes on while the arrays are written). Restores
go against a *shape-only* target — ``jax.eval_shape`` of the state's initialiser — so no
memory is spent on a throw-away state, and the stored tree is checked leaf by leaf first: a
checkpoint of another configuration raises :class:`CheckpointMismatchError` naming the leaf
(``params.geometry_net.stem.kernel: stored (3, 3, 14, 16) float32, expected (3, 3, 14, 32)
float32``) instead of a generic shape error, and a checkpoint whose files were damaged after
they were written raises an :class:`~gem_jax.errors.ArtefactError` naming the step folder.

    ckpt = StageCheckpoints(workdir / "teacher" / "ckpt", max_to_keep=2)
    if ckpt.latest_step() is not None:
        state = ckpt.restore(jax.eval_shape(init))      # the latest checkpoint
    ckpt.save(step, state, force=True)                   # asynchronous; the newest 2 are kept
    ckpt.close()

The training loop (:mod:`gem_jax.loop`) does exactly this for every stage.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gem_jax.errors import ArtefactError

__all__ = ["CheckpointMismatchError", "StageCheckpoints", "leaf_name"]


class _QuietOrbax(logging.Filter):
    """Drop orbax's INFO chatter (a dozen lines per save) from the absl log; keep its warnings."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def _quiet_orbax() -> None:
    logger = logging.getLogger("absl")
    if not any(isinstance(f, _QuietOrbax) for f in logger.filters):
        logger.addFilter(_QuietOrbax())


class CheckpointMismatchError(ArtefactError):
    """A stored checkpoint does not match the state it is restored into (names the leaves)."""


def leaf_name(path) -> str:
    """Dotted name of a pytree key path, as orbax names stored leaves (``opt_state.0.mu.w``)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:  # pragma: no cover - other key types are not produced by our pytrees
            parts.append(str(key))
    return ".".join(parts)


def _describe(shape, dtype) -> str:
    return f"{tuple(shape)} {np.dtype(dtype).name}"


def check_compatible(stored: dict[str, tuple[tuple, Any]], target: Any, where: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``stored`` (name → (shape, dtype)) matches
    the leaves of ``target`` (arrays or ``jax.ShapeDtypeStruct``) by name, shape and dtype."""
    expected = {leaf_name(p): (tuple(np.shape(x)), x.dtype)
                for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = []
    for name in sorted(expected.keys() - stored.keys()):
        problems.append(f"{name}: missing from the checkpoint (expected {_describe(*expected[name])})")
    for name in sorted(stored.keys() - expected.keys()):
        problems.append(f"{name}: in the checkpoint ({_describe(*stored[name])}) but not in the state")
    for name in sorted(expected.keys() & stored.keys()):
        (s_shape, s_dtype), (e_shape, e_dtype) = stored[name], expected[name]
        if tuple(s_shape) != tuple(e_shape) or np.dtype(s_dtype) != np.dtype(e_dtype):
            problems.append(f"{name}: stored {_describe(s_shape, s_dtype)}, expected {_describe(e_shape, e_dtype)}")
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise CheckpointMismatchError(
            f"{where}: the checkpoint does not match this configuration ({len(problems)} leaves differ):\n  {shown}\n"
            "Was it written with another config? Use another --workdir, or --force the stage to start over.")


class StageCheckpoints:
    """A stage's orbax ``CheckpointManager`` (module docstring); the ``max_to_keep`` newest
    checkpoints are kept."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2, asynchronous: bool = True):
        _quiet_orbax()
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=asynchronous)
        # The handler is named up front so a fresh process can read a stored step's metadata.
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=ocp.StandardCheckpointHandler())

    # -- queries ---------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def stored_leaves(self, step: int) -> dict[str, tuple[tuple, Any]]:
        """``{leaf name: (shape, dtype)}`` of a stored checkpoint (from its metadata only)."""
        try:
            meta = self._manager.item_metadata(step)
        except Exception as err:  # a truncated or garbled metadata file
            raise self._corrupt(step, err) from err
        if meta is None:
            raise self._corrupt(step, ValueError("no item metadata"))
        tree = getattr(meta, "tree", meta)
        leaves = jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]
        return {leaf_name(p): (tuple(x.shape), x.dtype) for p, x in leaves if x is not None}

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, state: Any, force: bool = False) -> bool:
        """Save ``state`` as ``step`` (asynchronously); ``force`` saves whatever orbax's own policy says.

        Returns whether a save was started. A step that is already stored is skipped.
        """
        step = int(step)
        if step in self._manager.all_steps():
            return False
        saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=force)
        return bool(saved)

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    # -- restore ---------------------------------------------------------------------------
    def restore(self, target: Any, step: int | None = None) -> Any:
        """Restore ``step`` (default: the latest) into the structure of ``target``.

        ``target`` is a pytree of ``jax.ShapeDtypeStruct`` (``jax.eval_shape(init)``, optionally
        with ``.sharding`` set; without one a leaf is restored onto this process's first device,
        so a checkpoint written on other devices or by several processes restores anywhere) or
        of arrays. Raises :class:`FileNotFoundError` if there is no
        checkpoint and :class:`CheckpointMismatchError` naming the leaves that differ.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint for step {step} "
                                    f"(stored: {self.all_steps()})")
        # A leaf without a sharding goes to this process's first device, whatever topology wrote
        # the checkpoint (a teacher trained by a 2-process job, collected by one process).
        local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=getattr(x, "sharding", None) or local),
            target)
        check_compatible(self.stored_leaves(step), abstract, f"{self.directory / str(step)}")
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
        except Exception as err:  # truncated or garbled array files
            raise self._corrupt(step, err) from err

    def _corrupt(self, step: int, err: Exception) -> ArtefactError:
        stage = self.directory.parent.name
        return ArtefactError(
            f"{self.directory / str(step)}: checkpoint unreadable ({type(err).__name__}: {str(err)[:300]}); delete "
            f"that folder to resume from the previous checkpoint {[s for s in self.all_steps() if s < step]}, or "
            f"redo the stage with --force {stage}")

    def restore_as_saved(self, step: int | None = None) -> Any:
        """The stored tree of ``step`` (default: the latest) as it was saved, without a target
        (NumPy arrays; for inspection and tests)."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to restore")
        return self._manager.restore(step, args=ocp.args.StandardRestore())
