"""The ``teacher`` stage: train the UV-space Gaussian avatar photometrically (DESIGN §5).

    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage teacher

Reads the subject (``config.data.subject_dir`` or ``<workdir>/data``), trains
:class:`~gem_jax.teacher.unet.TeacherNet` with the loss of :mod:`gem_jax.losses`, then
evaluates (:mod:`gem_jax.teacher.eval`). Outputs, all under ``<workdir>/teacher/``:

    ckpt/          orbax checkpoints (auto-resume: rerunning the command continues)
    metrics.json   training log (one record per log step) + the config
    tb/            TensorBoard event files
    eval.json      PSNR / SSIM / LPIPS-VGG / L1 on the held-out camera and sequence
    renders/*.png  prediction | ground truth of both evaluation splits
    mouth_masks.npz  cached mouth-interior masks of the training images

Training step (CONVENTIONS 4, 5, 11): the state ``{"params", "opt_state", "step"}`` is one
plain pytree; ``state, metrics = step(state, batch, constants, lpips_params)`` is one
``jax.jit`` with the state donated. Inside, the batch is split over the ``('data',)`` mesh with
``shard_map`` and gradients are averaged (:mod:`gem_jax.parallel`); randomness (background
colour, style vector) is ``fold_in(fold_in(key(seed), step), index in the global batch)``, so a
sharded step equals the single-device step. An update whose loss or gradients are not finite,
or whose render overflowed the tile-intersection capacity, is rejected inside the step (the
state stays the last good one) and reported in the metrics; the host then raises the capacity
(and recompiles), or after ``max_bad_steps`` consecutive non-finite steps restores the last
checkpoint. Optimiser: ``clip_by_global_norm`` then Adam with a linear warm-up and cosine decay
(``config.teacher``; see ``configs/common.py``).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gem_jax import parallel
from gem_jax.checkpoint import StageCheckpoints
from gem_jax.data.prepare import subject_dir
from gem_jax.losses import teacher_loss
from gem_jax.metrics import psnr
from gem_jax.render import count_intersections, rasterize, round_capacity
from gem_jax.schedules import warmup_cosine
from gem_jax.teacher import data as tdata
from gem_jax.teacher.maps import rigid_transform
from gem_jax.teacher.model import (ForwardSpec, TeacherConstants, build_constants, forward, init_params, make_net,
                                   world_gaussians_fn)
from gem_jax.types import Camera

__all__ = ["cached_train_step", "make_optimizer", "make_train_step", "restore_params", "run", "subject_dir"]

STAGE = "teacher"


def make_schedule(tconfig) -> optax.Schedule:
    """Linear warm-up to ``lr``, then cosine decay to ``lr · end_lr_factor`` at ``steps``."""
    return warmup_cosine(tconfig.lr, tconfig.steps, tconfig.warmup_steps, tconfig.end_lr_factor)


def make_optimizer(tconfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(float(tconfig.clip_norm)), optax.adam(make_schedule(tconfig)))


def init_state(net, tconfig, optimizer, seed: int) -> dict:
    params = init_params(net, tconfig, jax.random.key(seed))
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}


def make_train_step(net, tconfig, optimizer, mesh, width: int, height: int, capacity: int, seed: int,
                    backend: str = "auto", background=(1.0, 1.0, 1.0)):
    """The jitted, state-donating ``step(state, batch, constants, lpips_params)`` (module docstring).

    ``batch`` is :func:`gem_jax.teacher.data.sample_batch`'s dict, sharded over ``mesh``;
    ``lpips_params`` is None when the perceptual weight is 0.
    """
    spec = ForwardSpec.from_config(tconfig)
    weights, style_std = tconfig.loss, float(tconfig.style_std)
    random_bg = bool(tconfig.random_background)
    fixed_bg = jnp.asarray(background, jnp.float32)

    def render(g, viewmat, K, bg):
        return rasterize(g, Camera(viewmat, K, width, height), bg, backend=backend, capacity=capacity)

    def grad_fn(params, batch, consts, lpips_params, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(batch["index"])
        style = style_std * jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (spec.style_dim,)))(keys)
        if random_bg:
            bg = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (3,)))(keys)
        else:
            bg = jnp.broadcast_to(fixed_bg, (keys.shape[0], 3))
        mask = batch["mask"].astype(jnp.float32)[..., None] / 255.0
        target = batch["fg"].astype(jnp.float32) / 255.0 + bg[:, None, None, :] * (1.0 - mask)
        mouth = batch["mouth"].astype(jnp.float32) / 255.0
        perceptual = None
        if lpips_params is not None:
            from gem_jax.perceptual import lpips_distance

            perceptual = functools.partial(lpips_distance, lpips_params)

        def loss_fn(p):
            g, delta = forward(net, p, consts, batch["vertices"].astype(jnp.float32), style, spec)
            world = jax.vmap(rigid_transform)(g, batch["root"])
            out = jax.vmap(render)(world, batch["viewmat"], batch["K"], bg)
            loss, terms = teacher_loss(out.image, target, mouth, delta, g.scales, weights, perceptual)
            aux = {**terms, "psnr": jnp.mean(psnr(out.image, target)),
                   "overflow": jnp.max(out.stats["overflow"]).astype(jnp.float32)}
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, {"loss": loss, **aux}

    data_parallel = parallel.data_parallel(grad_fn, mesh)
    schedule = make_schedule(tconfig)

    def step_fn(state, batch, consts, lpips_params):
        grads, metrics = data_parallel(state["params"], batch, consts, lpips_params, state["step"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & (metrics["overflow"] == 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = {"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"]),
                     "step": state["step"] + 1}
        metrics = {**metrics, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                   "rejected": 1.0 - ok.astype(jnp.float32)}
        return new_state, metrics

    return jax.jit(step_fn, donate_argnums=0)


#: ``config.teacher`` keys the compiled train step does not depend on (host-side loop settings).
HOST_ONLY_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "max_bad_steps", "capacity_headroom", "eval")


class ConfigKey:
    """The step-relevant part of ``config.teacher`` as a hashable key (by its JSON), so compiled
    functions can be cached across runs in one process."""

    def __init__(self, config):
        self.config = config
        relevant = {k: v for k, v in config.to_dict().items() if k not in HOST_ONLY_KEYS}
        self._json = json.dumps(relevant, sort_keys=True, default=str)

    def __hash__(self):
        return hash(self._json)

    def __eq__(self, other):
        return isinstance(other, ConfigKey) and other._json == self._json


@functools.lru_cache(maxsize=8)
def cached_train_step(key: ConfigKey, net, mesh, width: int, height: int, capacity: int, seed: int,
                      backend: str, background: tuple):
    """:func:`make_train_step` memoised on its arguments: reruns in one process (tests, a resumed
    run after a restore) reuse the compiled step instead of compiling it again."""
    tc = key.config
    return make_train_step(net, tc, make_optimizer(tc), mesh, width, height, capacity, seed, backend, background)


# ----------------------------------------------------------------------------- setup


class _Setup:
    """Everything the stage builds before the loop (subject, constants, data, network)."""

    def __init__(self, config, workdir: Path, mesh=None):
        from gem_jax.data.subject import load_subject

        tc = config.teacher
        self.config, self.tconfig, self.workdir = config, tc, workdir
        self.out = workdir / STAGE
        start = time.time()
        self.subject = load_subject(subject_dir(config, workdir))
        self.model = self.subject.head_model(config.data.head_model or None, int(config.data.n_shape),
                                             int(config.data.n_expr))
        self.consts: TeacherConstants = build_constants(self.model, self.subject.canonical_params(), tc)
        self.net = make_net(tc)
        self.optimizer = make_optimizer(tc)
        all_t = [t for split in ("train", "val", "test") for t in self.subject.timesteps(split)]
        self.meshes = tdata.tracked_meshes(self.subject, self.model, all_t)
        images = tdata.load_images(self.subject, "train")
        mouth = None
        if float(tc.loss.mouth) != 1.0:
            mouth = tdata.mouth_masks(images, self.meshes, self.model, self.out / "mouth_masks.npz")
        self.images = tdata.ImageSet(**{**images.__dict__, "mouth": mouth})
        self.lpips_params = None
        if float(tc.loss.vgg) > 0:
            from gem_jax.perceptual import load_lpips_params

            self.lpips_params = load_lpips_params("vgg16")
        self.mesh = parallel.data_mesh() if mesh is None else mesh
        parallel.global_batch_size(int(tc.batch_size), self.mesh)
        _log(f"{self.consts.canonical.num} Gaussians ({tc.uv_resolution}² UV), {self.images.num} training images "
             f"{self.images.width}x{self.images.height}, {len(jax.devices())} device(s); setup {time.time() - start:.1f}s")

    def capacity(self, params, samples: int = 16) -> int:
        """Intersection capacity: headroom × the most intersections over sample training images."""
        spec = ForwardSpec.from_config(self.tconfig)
        rng = np.random.default_rng([int(self.config.seed), 7])
        pick = rng.choice(self.images.num, size=min(samples, self.images.num), replace=False)
        t = self.images.timesteps[pick]
        world = world_gaussians_fn(self.net, spec)(params, self.consts, jnp.asarray(self.meshes.vertices[t]),
                                                    jnp.asarray(self.meshes.roots[t]))
        most = max(count_intersections(jax.tree.map(lambda x: x[i], world),
                                       Camera(self.images.viewmats[j], self.images.Ks[j], self.images.width,
                                              self.images.height)) for i, j in enumerate(pick))
        return round_capacity(int(float(self.tconfig.capacity_headroom) * most))


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[teacher] {message}", flush=True)


def _state_target(setup: _Setup):
    """Shape-only state with replicated shardings (the restore target)."""
    abstract = jax.eval_shape(lambda: init_state(setup.net, setup.tconfig, setup.optimizer, int(setup.config.seed)))
    sharding = jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec())
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


def restore_params(config, workdir: Path, consts: TeacherConstants | None = None) -> dict:
    """The parameters of the latest teacher checkpoint in ``workdir`` (for ``collect``)."""
    tc = config.teacher
    net, optimizer = make_net(tc), make_optimizer(tc)
    ckpt = StageCheckpoints(Path(workdir) / STAGE / "ckpt")
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"{ckpt.directory}: no teacher checkpoint; run --stage teacher first")
        state = ckpt.restore(jax.eval_shape(lambda: init_state(net, tc, optimizer, int(config.seed))))
    finally:
        ckpt.close()
    return state["params"]


# ----------------------------------------------------------------------------- logging


class _Logger:
    """metrics.json (atomic rewrite) and TensorBoard scalars; process 0 only."""

    def __init__(self, out: Path, config, start_step: int):
        self.active = jax.process_index() == 0
        self.path = out / "metrics.json"
        self.records: list[dict] = []
        self.writer = None
        if not self.active:
            return
        if self.path.is_file():
            try:
                old = json.loads(self.path.read_text()).get("records", [])
                self.records = [r for r in old if r.get("step", 0) <= start_step]
            except (OSError, ValueError):
                self.records = []
        self.config = json.loads(config.to_json_best_effort())
        self.tb_dir = out / "tb"
        self._open_writer(start_step)

    def _open_writer(self, start_step: int) -> None:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            print("[teacher] tensorboardX is not installed: no TensorBoard events (pip install tensorboardX)")
            return
        # purge_step: events after the step we resume from are dropped from the view.
        self.writer = SummaryWriter(str(self.tb_dir), purge_step=start_step or None)

    def rewind(self, step: int) -> None:
        """Forget records after ``step`` (the state was restored from the checkpoint of ``step``)."""
        if not self.active:
            return
        self.records = [r for r in self.records if r["step"] <= step]
        if self.writer is not None:
            self.writer.close()
            self._open_writer(step)

    def log(self, step: int, values: dict) -> None:
        if not self.active:
            return
        finite = {k: (v if np.isfinite(v) else None) for k, v in values.items()}  # strict JSON: NaN → null
        self.records.append({"step": step, "time": time.time(), **finite})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)
            self.writer.flush()
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"stage": STAGE, "config": self.config, "records": self.records}, indent=1))
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------- the stage


def run(config, workdir: str | os.PathLike, force: bool = False) -> dict:
    """Train (or resume) the teacher, then evaluate it; returns the evaluation dict."""
    from tqdm import tqdm

    from gem_jax.teacher.eval import evaluate

    workdir = Path(workdir)
    tc = config.teacher
    out = workdir / STAGE
    if force and out.exists() and jax.process_index() == 0:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    setup = _Setup(config, workdir)
    seed, steps = int(config.seed), int(tc.steps)
    ckpt = StageCheckpoints(out / "ckpt", save_every=int(tc.checkpoint_every), max_to_keep=int(tc.keep_checkpoints))
    if ckpt.latest_step() is not None:
        state = ckpt.restore(_state_target(setup))
        _log(f"resumed from {ckpt.directory} at step {int(state['step'])}")
    else:  # one compiled initialiser, its output placed replicated on the mesh (CONVENTIONS 4)
        init = functools.partial(init_state, setup.net, tc, setup.optimizer, seed)
        state = jax.jit(init, out_shardings=jax.sharding.NamedSharding(setup.mesh, jax.sharding.PartitionSpec()))()
    start = int(state["step"])
    capacity = setup.capacity(jax.device_get(state["params"]))
    backend = str(config.render.backend)
    build = functools.partial(cached_train_step, ConfigKey(tc), setup.net, setup.mesh, setup.images.width,
                              setup.images.height, seed=seed, backend=backend,
                              background=tuple(float(x) for x in config.data.background))
    step_fn = build(capacity=capacity)
    consts = parallel.replicate(setup.consts, setup.mesh)
    lpips_params = None if setup.lpips_params is None else parallel.replicate(setup.lpips_params, setup.mesh)
    logger = _Logger(out, config, start)
    bar = tqdm(total=steps, initial=start, desc="teacher", unit="step", dynamic_ncols=True, file=sys.stderr,
               mininterval=0.5 if sys.stderr.isatty() else 15.0, disable=jax.process_index() != 0)
    bad, restores, pending, t0 = 0, 0, None, time.time()
    log_every = max(int(tc.log_every), 1)

    def handle(step: int, metrics: dict) -> bool:
        """Log, and react to rejected updates; True when the state was restored from a checkpoint."""
        nonlocal bad, restores, state, step_fn, capacity
        restored = False
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if m["overflow"] > 0:
            capacity = round_capacity(int(capacity * 1.5) + 1)
            _log(f"step {step}: tile intersections overflowed; update rejected, capacity raised to {capacity}")
            step_fn = build(capacity=capacity)
        if not np.isfinite(m["loss"]) or not np.isfinite(m["grad_norm"]):
            bad += 1
            _log(f"step {step}: non-finite loss/gradients ({m['loss']}, {m['grad_norm']}); update rejected "
                 f"({bad}/{tc.max_bad_steps})")
            if bad >= int(tc.max_bad_steps):
                if ckpt.latest_step() is None or restores >= 3:
                    raise FloatingPointError(f"teacher: {bad} consecutive non-finite steps at step {step} "
                                             f"(after {restores} checkpoint restores)")
                ckpt.wait()
                state = ckpt.restore(_state_target(setup))
                restores, bad, restored = restores + 1, 0, True
                logger.rewind(int(state["step"]))
                _log(f"restored the last good checkpoint (step {int(state['step'])})")
        else:
            bad = 0
        if not restored and ((step + 1) % log_every == 0 or step + 1 == steps):
            m["steps_per_s"] = (step + 1 - start) / max(time.time() - t0, 1e-9)
            logger.log(step + 1, m)
            bar.set_postfix(loss=f"{m['loss']:.4f}", psnr=f"{m['psnr']:.2f}", refresh=False)
        return restored

    step = start
    try:
        while step < steps:
            batch = parallel.shard_batch(
                tdata.sample_batch(setup.images, setup.meshes, step, int(tc.batch_size), seed), setup.mesh)
            state, metrics = step_fn(state, batch, consts, lpips_params)
            restored = pending is not None and handle(*pending)
            pending = (step, metrics)
            if not restored:
                step += 1
                bar.update(1)
                if step % ckpt.save_every == 0 or step == steps:
                    # Metrics up to the checkpoint are logged before it is written, so a resumed
                    # run's metrics.json continues without a gap.
                    restored, pending = handle(*pending), None
                    if not restored:
                        ckpt.save(step, state, force=True)
            if restored:  # the last update ran on a discarded state: continue from the checkpoint
                pending, step = None, int(state["step"])
                bar.reset(total=steps)
                bar.update(step)
        ckpt.wait()
    finally:
        bar.close()
        logger.close()
    final = int(state["step"])
    _log(f"trained to step {final} in {time.time() - t0:.1f}s")
    # Evaluate on each process's local copy of the (replicated) parameters; process 0 writes.
    result = evaluate(setup, jax.device_get(state["params"]), out, step=final)
    ckpt.close()
    return result
