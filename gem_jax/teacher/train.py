"""The ``teacher`` stage: train the UV-space Gaussian avatar photometrically (docs/architecture.md §5).

    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage teacher

Trains :class:`~gem_jax.teacher.unet.TeacherNet` with the loss of :mod:`gem_jax.losses` in the
shared training loop (:mod:`gem_jax.loop`: resume, guarded updates, bad-step policy, capacity
growth, checkpoints, metrics, progress), then evaluates it with the shared protocol
(:mod:`gem_jax.evaluation`). Outputs, all under ``<workdir>/teacher/``:

    ckpt/          orbax checkpoints (auto-resume: rerunning the command continues)
    metrics.json   training log (one record per log step) + the teacher config
    tb/            TensorBoard event files
    eval.json      PSNR / SSIM / LPIPS-VGG / L1 on the held-out camera and sequence
    renders/*.png  prediction | ground truth of both evaluation splits
    mouth_masks.npz  cached mouth-interior masks of the training images

The step: the state ``{"params", "opt_state", "step"}``; each device renders its shard of the
batch and gradients are averaged over the ``('data',)`` mesh; randomness (background colour,
style vector) is ``fold_in(fold_in(key(seed), step), index in the global batch)``, so a sharded
step equals the single-device step. Optimiser: ``clip_by_global_norm`` then Adam with a linear
warm-up and cosine decay (``config.teacher``; see ``configs/common.py``).
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gem_jax import loop, parallel
from gem_jax.atomic import write_json
from gem_jax.checkpoint import StageCheckpoints
from gem_jax.evaluation import EVAL_SPLITS, Protocol
from gem_jax.frames import frames_capacity, render_frames, render_frames_exact
from gem_jax.losses import teacher_loss
from gem_jax.metrics import psnr
from gem_jax.schedules import warmup_cosine
from gem_jax.teacher import data as tdata
from gem_jax.teacher.maps import rigid_transform
from gem_jax.teacher.model import (ForwardSpec, TeacherConstants, build_constants, forward, init_params, make_net,
                                   world_gaussians_fn)

__all__ = ["STAGE", "TeacherData", "compiled_train_step", "evaluate_teacher", "init_state", "make_optimizer",
           "make_train_step", "restore_params", "run"]

STAGE = "teacher"


def make_schedule(tconfig) -> optax.Schedule:
    """Linear warm-up to ``lr``, then cosine decay to ``lr · end_lr_factor`` at ``steps``."""
    return warmup_cosine(tconfig.lr, tconfig.steps, tconfig.warmup_steps, tconfig.end_lr_factor)


def make_optimizer(tconfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(float(tconfig.clip_norm)),
                       optax.adam(make_schedule(tconfig)))


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
    weights, style_std, random_bg = tconfig.loss, float(tconfig.style_std), bool(tconfig.random_background)
    schedule = make_schedule(tconfig)

    def grad_fn(params, batch, consts, lpips_params, step):
        keys = loop.example_keys(seed, step, batch["index"])
        style = style_std * jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), (spec.style_dim,)))(keys)
        target, bg = loop.photometric_target(batch, keys, random_bg, background)
        mouth = batch["mouth"].astype(jnp.float32) / 255.0
        perceptual = None
        if lpips_params is not None:
            from gem_jax.perceptual import lpips_distance

            perceptual = functools.partial(lpips_distance, lpips_params)

        def loss_fn(p):
            g, delta = forward(net, p, consts, batch["vertices"].astype(jnp.float32), style, spec)
            world = jax.vmap(rigid_transform)(g, batch["root"])
            out = render_frames(world, batch["viewmat"], batch["K"], bg, width=width, height=height,
                                capacity=capacity, backend=backend)
            loss, terms = teacher_loss(out.image, target, mouth, delta, g.scales, weights, perceptual)
            return loss, {**terms, "psnr": jnp.mean(psnr(out.image, target)),
                          "overflow": jnp.max(out.stats["overflow"]).astype(jnp.float32)}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, {"loss": loss, **aux, "lr": schedule(step)}

    return loop.make_step(grad_fn, optimizer, mesh)


@functools.lru_cache(maxsize=8)
def compiled_train_step(key: loop.SectionKey, net, mesh, width: int, height: int, capacity: int, seed: int,
                        backend: str, background: tuple):
    """:func:`make_train_step` cached on its arguments (``key``: the teacher section)."""
    tc = key.section
    return make_train_step(net, tc, make_optimizer(tc), mesh, width, height, capacity, seed, backend, background)


class TeacherData:
    """What the stage builds before training: constants, network, images, meshes, weights."""

    def __init__(self, ctx, tconfig):
        start = time.time()
        self.ctx, self.tconfig = ctx, tconfig
        self.consts: TeacherConstants = build_constants(ctx.head_model, ctx.subject.canonical_params(), tconfig)
        self.net = make_net(tconfig)
        self.optimizer = make_optimizer(tconfig)
        all_t = [t for split in ("train", "val", "test") for t in ctx.subject.timesteps(split)]
        self.meshes = tdata.tracked_meshes(ctx.subject, ctx.head_model, all_t)
        images = tdata.load_images(ctx.subject, "train")
        mouth = None
        if float(tconfig.loss.mouth) != 1.0:
            mouth = tdata.mouth_masks(images, self.meshes, ctx.head_model,
                                      ctx.stage_dir(STAGE) / "mouth_masks.npz")
        self.images = tdata.ImageSet(**{**images.__dict__, "mouth": mouth})
        self.lpips_params = None
        if float(tconfig.loss.vgg) > 0:
            from gem_jax.perceptual import load_lpips_params

            self.lpips_params = load_lpips_params("vgg16")
        parallel.global_batch_size(int(tconfig.batch_size), ctx.mesh)
        loop.log(STAGE, f"{self.consts.canonical.num} Gaussians ({tconfig.uv_resolution}² UV), {self.images.num} "
                        f"training images {self.images.width}x{self.images.height}, {len(jax.devices())} device(s); "
                        f"setup {time.time() - start:.1f}s")

    def world(self, params, timesteps) -> "jax.Array":
        """World-space Gaussians ``(B, N)`` of ``timesteps`` at the test-time style ``z = 0``."""
        fn = world_gaussians_fn(self.net, ForwardSpec.from_config(self.tconfig))
        return fn(params, self.consts, jnp.asarray(self.meshes.vertices[timesteps]),
                  jnp.asarray(self.meshes.roots[timesteps]))

    def capacity(self, params, samples: int = 16) -> int:
        """Intersection capacity: headroom × the most intersections over sample training images."""
        rng = np.random.default_rng([int(self.ctx.seed), 7])
        pick = rng.choice(self.images.num, size=min(samples, self.images.num), replace=False)
        return frames_capacity(self.world(params, self.images.timesteps[pick]), self.images.viewmats[pick],
                               self.images.Ks[pick], self.images.width, self.images.height,
                               float(self.tconfig.capacity_headroom))


def restore_params(tconfig, stage_dir: Path, seed: int) -> dict:
    """The parameters of the latest checkpoint of the teacher stage in ``stage_dir`` (for ``collect``)."""
    net, optimizer = make_net(tconfig), make_optimizer(tconfig)
    ckpt = StageCheckpoints(Path(stage_dir) / "ckpt")
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"{ckpt.directory}: no teacher checkpoint; run --stage teacher first")
        state = ckpt.restore(jax.eval_shape(lambda: init_state(net, tconfig, optimizer, seed)))
    finally:
        ckpt.close()
    return state["params"]


def evaluate_teacher(ctx, data: TeacherData, params, out: Path, step: int) -> dict:
    """Both held-out splits (:mod:`gem_jax.evaluation`), driven by the tracked meshes; writes eval.json."""
    protocol = Protocol.from_context(ctx)
    result = {"background": list(ctx.background), "step": int(step)}
    for name, split in EVAL_SPLITS.items():
        images = protocol.images(ctx.subject, split)
        if images is None:
            loop.log(STAGE, f"eval: split {split!r} ({name}) is empty; skipped")
            continue

        def render_rows(rows, images=images):
            world = data.world(params, images.timesteps[rows])
            return render_frames_exact(world, images.viewmats[rows], images.Ks[rows], ctx.background, images.width,
                                       images.height, ctx.backend)

        result[name] = protocol.evaluate(render_rows, images, name=name, tag=STAGE, renders=out / "renders")
    if jax.process_index() == 0:
        write_json(out / "eval.json", result)
    return result


def run(ctx, tconfig) -> dict:
    """Train (or resume) the teacher, then evaluate it; returns the evaluation dict."""
    out = ctx.stage_dir(STAGE)
    out.mkdir(parents=True, exist_ok=True)
    data = TeacherData(ctx, tconfig)
    seed, mesh = int(ctx.seed), ctx.mesh
    step = functools.partial(compiled_train_step, loop.SectionKey(tconfig), data.net, mesh, data.images.width,
                             data.images.height, seed=seed, backend=ctx.backend,
                             background=tuple(ctx.background))
    consts = parallel.replicate(data.consts, mesh)
    lpips_params = None if data.lpips_params is None else parallel.replicate(data.lpips_params, mesh)
    state = loop.train(
        STAGE, out, loop.LoopSettings.from_config(tconfig), mesh,
        init=functools.partial(init_state, data.net, tconfig, data.optimizer, seed),
        build_step=lambda capacity: step(capacity=capacity),
        capacity=lambda state: data.capacity(jax.device_get(state["params"])),
        batch=lambda i: tdata.sample_batch(data.images, data.meshes, i, int(tconfig.batch_size), seed),
        replicated=(consts, lpips_params), section=tconfig)
    # Evaluate on each process's local copy of the (replicated) parameters; process 0 writes.
    return evaluate_teacher(ctx, data, jax.device_get(state["params"]), out, int(state["step"]))
