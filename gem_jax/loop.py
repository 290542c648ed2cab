"""The one training loop of every stage that trains: teacher, refine, regress (docs/architecture.md §3).

A stage supplies a state initialiser, a step builder and its batches (:func:`train`); the rest
is done here, the same way for all of them:

* the state ``{<trainable>, "opt_state", "step"}`` is restored from the stage's latest orbax
  checkpoint (``<out>/ckpt``) against a shape-only replicated target, or initialised by one
  compiled call placed on the mesh;
* :func:`make_step`: per-device gradients averaged over ``('data',)``, the optimiser update,
  *guarded* — a non-finite loss or gradient norm, or a render that overflowed its
  tile-intersection capacity, keeps the old state (the counter still advances) and is reported
  as ``rejected``; one ``jax.jit`` with the state donated;
* on the host (one step late, so the device never waits): an overflow raises the capacity and
  rebuilds the step; ``max_bad_steps`` non-finite steps in a row restore the last checkpoint
  (:data:`MAX_RESTORES` times at most, then :class:`FloatingPointError`);
* metrics every ``log_every`` steps to ``<out>/metrics.json`` and TensorBoard (both rewound on
  resume), checkpoints every ``checkpoint_every`` steps and at the end, a progress bar.

Randomness is ``fold_in(fold_in(key(seed), step), index in the global batch)``
(:func:`example_keys`), so a resumed or a sharded run draws what an uninterrupted
single-device run draws.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from gem_jax import parallel
from gem_jax.atomic import write_json
from gem_jax.checkpoint import StageCheckpoints
from gem_jax.render import round_capacity

__all__ = ["HOST_ONLY_KEYS", "LoopSettings", "MAX_RESTORES", "MetricsLog", "SectionKey", "example_keys", "keep_if", "log", "make_step",
           "photometric_target", "train"]

MAX_RESTORES = 3  # checkpoint restores after runs of non-finite steps before the stage gives up


def log(stage: str, message: str) -> None:
    """Print ``[stage] message`` on the first process only."""
    if jax.process_index() == 0:
        print(f"[{stage}] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """The host-side settings of a training stage (its config section's loop keys)."""

    steps: int
    log_every: int = 100
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    max_bad_steps: int = 20

    @classmethod
    def from_config(cls, section) -> "LoopSettings":
        get = lambda key, default: int(section.get(key, default))  # noqa: E731
        return cls(steps=int(section.steps), log_every=max(get("log_every", 100), 1),
                   checkpoint_every=max(get("checkpoint_every", 1000), 1),
                   keep_checkpoints=max(get("keep_checkpoints", 2), 1), max_bad_steps=max(get("max_bad_steps", 20), 1))


# ----------------------------------------------------------------------------- inside the step


def example_keys(seed: int, step, index) -> jax.Array:
    """One PRNG key per example: ``fold_in(fold_in(key(seed), step), index)``."""
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(index)


def photometric_target(batch: dict, keys: jax.Array, random_background: bool, background) -> tuple:
    """``(target (B,H,W,3), background (B,3))``: the batch's foregrounds over a uniformly random
    colour per example (``fold_in(key, 1)``), or over the fixed ``background``."""
    if random_background:
        bg = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (3,)))(keys)
    else:
        bg = jnp.broadcast_to(jnp.asarray(background, jnp.float32), (keys.shape[0], 3))
    mask = batch["mask"].astype(jnp.float32)[..., None] / 255.0
    return batch["fg"].astype(jnp.float32) / 255.0 + bg[:, None, None, :] * (1.0 - mask), bg


def keep_if(ok, new: Any, old: Any) -> Any:
    """``new`` where ``ok`` (a scalar bool) else ``old``, leaf by leaf: a rejected update."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def make_step(grad_fn: Callable, optimizer: optax.GradientTransformation, mesh, *, trainable: str = "params",
              after_update: Callable | None = None) -> Callable:
    """The jitted, state-donating ``step(state, batch, *replicated) -> (state, metrics)``.

    ``grad_fn(params, local_batch, *replicated, step) -> (grads, metrics)`` runs per device;
    its metrics hold ``loss`` and ``overflow`` (the render's dropped intersections).
    ``after_update(params, new_step)`` post-processes the updated parameters (refine's QR).
    """
    data_parallel = parallel.data_parallel(grad_fn, mesh)

    def step_fn(state, batch, *replicated):
        grads, metrics = data_parallel(state[trainable], batch, *replicated, state["step"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state[trainable])
        params = optax.apply_updates(state[trainable], updates)
        step = state["step"] + 1
        if after_update is not None:
            params = after_update(params, step)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & (metrics["overflow"] == 0)
        new_state = {trainable: keep_if(ok, params, state[trainable]),
                     "opt_state": keep_if(ok, opt_state, state["opt_state"]), "step": step}
        return new_state, {**metrics, "grad_norm": grad_norm, "rejected": 1.0 - ok.astype(jnp.float32)}

    return jax.jit(step_fn, donate_argnums=0)


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """``<out>/metrics.json`` and TensorBoard scalars (process 0 only); records after the step a
    run resumes from are dropped from both."""

    def __init__(self, out: Path, stage: str, start_step: int, section=None):
        self.active = jax.process_index() == 0
        self.path, self.stage, self.tb_dir = out / "metrics.json", stage, out / "tb"
        self.section = section.to_dict() if hasattr(section, "to_dict") else section
        self.records: list[dict] = []
        self.writer = None
        if not self.active:
            return
        if start_step > 0 and self.path.is_file():
            try:
                old = json.loads(self.path.read_text()).get("records", [])
                self.records = [r for r in old if r.get("step", 0) <= start_step]
            except (OSError, ValueError):
                self.records = []
        self._open_writer(start_step)

    def _open_writer(self, start_step: int) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            log(self.stage, "tensorboardX is not installed: no TensorBoard events (pip install tensorboardX)")
            return
        self.writer = SummaryWriter(str(self.tb_dir), purge_step=start_step or None)

    def rewind(self, step: int) -> None:
        """Forget records after ``step`` (the state was restored from that step's checkpoint)."""
        if not self.active:
            return
        self.records = [r for r in self.records if r["step"] <= step]
        if self.writer is not None:
            self.writer.close()
            self._open_writer(step)

    def write(self, step: int, values: dict) -> None:
        if not self.active:
            return
        finite = {k: (v if np.isfinite(v) else None) for k, v in values.items()}  # strict JSON: NaN → null
        self.records.append({"step": step, "time": time.time(), **finite})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        write_json(self.path, {"stage": self.stage, "config": self.section, "records": self.records})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- the loop


def train(stage: str, out: Path, settings: LoopSettings, mesh, *, init: Callable[[], Any],
          build_step: Callable[[int], Callable], capacity: Callable[[Any], int], batch: Callable[[int], dict],
          replicated: tuple = (), on_checkpoint: Callable[[int, Any], None] | None = None,
          section=None) -> Any:
    """Train ``stage`` to ``settings.steps`` (or resume) and return the final state (module docstring).

    ``init()`` builds a fresh state; ``capacity(state)`` sizes the first tile-intersection
    capacity; ``build_step(capacity)`` returns a :func:`make_step` step; ``batch(step)`` the
    global NumPy batch of ``step``; ``replicated`` are further step inputs every device sees.
    """
    from tqdm import tqdm

    steps = settings.steps
    ckpt = StageCheckpoints(out / "ckpt", max_to_keep=settings.keep_checkpoints)
    sharding = NamedSharding(mesh, PartitionSpec())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), jax.eval_shape(init))
    if ckpt.latest_step() is not None:
        state = ckpt.restore(target)
        log(stage, f"resumed from {ckpt.directory} at step {int(state['step'])}")
    else:  # one compiled initialiser, its output placed replicated on the mesh
        state = jax.jit(init, out_shardings=sharding)()
    start = int(state["step"])
    cap = capacity(state)
    step_fn = build_step(cap)
    metrics_log = MetricsLog(out, stage, start, section)
    bar = tqdm(total=steps, initial=start, desc=stage, unit="step", dynamic_ncols=True, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 15.0, disable=jax.process_index() != 0)
    bad, restores, pending, t0 = 0, 0, None, time.time()

    def handle(step: int, metrics: dict) -> bool:
        """Log ``step``'s metrics and react to a rejected update; True when the state was restored."""
        nonlocal bad, restores, state, step_fn, cap
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if m["overflow"] > 0:
            cap = round_capacity(int(cap * 1.5) + 1)
            log(stage, f"step {step}: tile intersections overflowed; update rejected, capacity raised to {cap}")
            step_fn = build_step(cap)
        if np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]):
            bad = 0
        else:
            bad += 1
            log(stage, f"step {step}: non-finite loss/gradients ({m['loss']}, {m['grad_norm']}); update rejected "
                       f"({bad}/{settings.max_bad_steps})")
            if bad >= settings.max_bad_steps:
                if ckpt.latest_step() is None or restores >= MAX_RESTORES:
                    raise FloatingPointError(f"{stage}: {bad} consecutive non-finite steps at step {step} "
                                             f"(after {restores} checkpoint restores)")
                ckpt.wait()
                state = ckpt.restore(target)
                restores, bad = restores + 1, 0
                metrics_log.rewind(int(state["step"]))
                log(stage, f"restored the last good checkpoint (step {int(state['step'])})")
                return True
        if (step + 1) % settings.log_every == 0 or step + 1 == steps:
            m["steps_per_s"] = (step + 1 - start) / max(time.time() - t0, 1e-9)
            metrics_log.write(step + 1, m)
            bar.set_postfix(loss=f"{m['loss']:.4f}", psnr=f"{m.get('psnr', float('nan')):.2f}", refresh=False)
        return False

    step = start
    try:
        while step < steps:
            state, metrics = step_fn(state, parallel.shard_batch(batch(step), mesh), *replicated)
            restored = pending is not None and handle(*pending)
            pending = (step, metrics)
            if not restored:
                step += 1
                bar.update(1)
                if step % settings.checkpoint_every == 0 or step == steps:
                    # Metrics up to a checkpoint are logged before it is written, so a resumed
                    # run's log continues without a gap.
                    restored, pending = handle(*pending), None
                    if not restored:
                        if on_checkpoint is not None:
                            on_checkpoint(step, state)
                        ckpt.save(step, state, force=True)
            if restored:  # the step in flight ran on a discarded state: continue from the checkpoint
                pending, step = None, int(state["step"])
                bar.reset(total=steps)
                bar.update(step)
        ckpt.wait()
    finally:
        bar.close()
        metrics_log.close()
        ckpt.close()
    log(stage, f"trained to step {int(state['step'])} in {time.time() - t0:.1f}s")
    return state


# ----------------------------------------------------------------------------- compiled-step cache

#: Config keys of a training section that only the host loop reads (never the compiled step).
HOST_ONLY_KEYS = frozenset({"log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps",
                            "capacity_headroom", "val_cameras", "val_images"})


class SectionKey:
    """A config section as a hashable key (its JSON without :data:`HOST_ONLY_KEYS`), for caching
    compiled steps with ``functools.lru_cache`` across runs in one process."""

    def __init__(self, section):
        self.section = section
        relevant = {k: v for k, v in section.to_dict().items() if k not in HOST_ONLY_KEYS}
        self._json = json.dumps(relevant, sort_keys=True, default=str)

    def __hash__(self):
        return hash(self._json)

    def __eq__(self, other):
        return isinstance(other, SectionKey) and other._json == self._json
