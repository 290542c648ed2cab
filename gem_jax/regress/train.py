"""The ``regress`` stage: train the image → coefficient regressor and evaluate reenactment (docs/architecture.md §7, §8).

    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage regress

Training data are the subject's training images: a face crop of each (from the projected
tracked mesh, :mod:`gem_jax.regress.crop`), its features (:mod:`gem_jax.regress.features`)
*relative to the features of the neutral frame of the same camera* — the training timestep
whose tracked expression and jaw are closest to zero — whitened by a feature PCA, and the
GEM coefficients of its timestep from the ``pca`` stage. The basis (the refined GEM, else the
PCA-only one) is frozen; the regressor is trained with

    L = photometric(render(G(k̂)), I) + 0.005 · mean|k̂ − k_gt| + 1e-3 · mean k̂²,

the photometric term being the refinement's (0.3·L1 + 1.0·D-SSIM [+ 0.03·LPIPS-VGG]) on a
random background, AdamW with linear warm-up and cosine decay, data-parallel over the
``('data',)`` mesh, orbax checkpoints (rerun to resume), dropout keys ``fold_in(step, index)``.

Evaluation (``regress/eval.json``, ``renders/``), white background, against ground truth:

* ``self_reenactment`` — the held-out sequence of the subject drives its own avatar;
* ``cross_identity`` — the second synthetic identity (``<workdir>/data_cross``) performs the
  same held-out sequence; its images drive the subject's avatar, which is compared with the
  subject's own images of those timesteps and cameras (the synthetic benchmark has this ground
  truth; the paper could only report FID).

Both use the driver's own neutral frame (the most neutral timestep of the driven sequence, per
camera). Beside them the fitted-coefficient upper bound of the ``refine`` (or ``pca``) stage.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gem_jax import loop, parallel
from gem_jax.artefacts import read_json
from gem_jax.atomic import write_json
from gem_jax.batching import sample_rows
from gem_jax.data.images import ImageSet, load_images
from gem_jax.data.subject import load_subject
from gem_jax.eigen.evaluate import gem_renderer
from gem_jax.eigen.render import frame_capacity, render_batch
from gem_jax.eigen.workdir import load_model, load_pca_coefficients, load_roots
from gem_jax.evaluation import Protocol
from gem_jax.head.flame import lbs
from gem_jax.head.meshraster import project_vertices
from gem_jax.losses import dssim_loss, l1_loss
from gem_jax.metrics import psnr
from gem_jax.multihost import barrier
from gem_jax.regress.crop import box_from_vertices, crop
from gem_jax.regress.features import make_extractor
from gem_jax.regress.inference import REGRESSOR_FILE, TrainedRegressor, neutral_timestep
from gem_jax.regress.model import Regressor, fit_feature_pca, save_regressor
from gem_jax.schedules import warmup_cosine

__all__ = ["compiled_train_step", "make_train_step", "relative_features", "run", "tracked_crops"]

STAGE = "regress"


def tracked_crops(subject, head_model, images: ImageSet, size: int, margin: float, background) -> np.ndarray:
    """``(F, size, size, 3)`` face crops of ``images`` from the projected tracked meshes."""
    verts = {}
    fn = jax.jit(lambda p: lbs(head_model, p)[0])
    out = np.zeros((images.num, size, size, 3), np.float32)
    for i in range(images.num):
        t = int(images.timesteps[i])
        if t not in verts:
            verts[t] = np.asarray(fn(jax.tree.map(jnp.asarray, subject.flame_params(t))))
        box = box_from_vertices(project_vertices(verts[t], images.viewmats[i], images.Ks[i]), margin)
        out[i] = crop(images.composite(i, background), box, size)
    return out


def relative_features(features: np.ndarray, images: ImageSet, neutral_t: int) -> np.ndarray:
    """``f − f(neutral timestep, same camera)`` per image (module docstring)."""
    out = np.zeros_like(features)
    for c in np.unique(images.camera_indices):
        rows = np.flatnonzero(images.camera_indices == c)
        ref = rows[images.timesteps[rows] == neutral_t]
        if ref.size == 0:
            raise ValueError(f"regress: camera {int(c)} has no image of the neutral timestep {neutral_t}")
        out[rows] = features[rows] - features[ref[0]]
    return out


def make_optimizer(rc) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(float(rc.clip_norm)),
                       optax.adamw(warmup_cosine(rc.lr, rc.steps, rc.warmup_steps, rc.end_lr_factor),
                                   weight_decay=float(rc.weight_decay)))


def make_train_step(net: Regressor, rc, optimizer, mesh, width: int, height: int, capacity: int, seed: int,
                    backend: str = "auto"):
    """Jitted ``step(state, batch, model) -> (state, metrics)`` (module docstring)."""
    w = rc.loss
    w_l1, w_dssim, w_k, w_prior = float(w.l1), float(w.dssim), float(w.coeff), float(w.prior)

    def grad_fn(params, batch, model, step):
        keys = loop.example_keys(seed, step, batch["index"])
        target, bg = loop.photometric_target(batch, keys, True, None)

        def loss_fn(p):
            def one(x, k):
                return net.apply({"params": p}, x[None], train=True, rngs={"dropout": jax.random.fold_in(k, 0)})[0]

            k = jax.vmap(one)(batch["x"], keys)
            out = render_batch(model, k, batch["root"], batch["viewmat"], batch["K"], bg, width=width,
                               height=height, capacity=capacity, backend=backend)
            terms = {"l1": l1_loss(out.image, target), "dssim": dssim_loss(out.image, target),
                     "coeff": jnp.mean(jnp.abs(k - batch["k"])), "prior": jnp.mean(k * k)}
            loss = w_l1 * terms["l1"] + w_dssim * terms["dssim"] + w_k * terms["coeff"] + w_prior * terms["prior"]
            return loss, {**terms, "psnr": jnp.mean(psnr(out.image, target)),
                          "overflow": jnp.max(out.stats["overflow"]).astype(jnp.float32)}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, {"loss": loss, **aux}

    return loop.make_step(grad_fn, optimizer, mesh)


@functools.lru_cache(maxsize=8)
def compiled_train_step(key: loop.SectionKey, net: Regressor, mesh, width: int, height: int, capacity: int,
                        seed: int, backend: str):
    """:func:`make_train_step` cached on its arguments (``key``: the regress section)."""
    rc = key.section
    return make_train_step(net, rc, make_optimizer(rc), mesh, width, height, capacity, seed, backend)


class _Data:
    """Crops, features and relative features of (part of) one split (module docstring).

    ``max_images`` keeps that many images evenly spaced; ``like`` keeps the images with the
    (timestep, camera) pairs of another set. The neutral frame of every camera is always kept.
    """

    def __init__(self, subject, head_model, split, extractor, rc, background, max_images=None, neutral_t=None,
                 like: ImageSet | None = None):
        full = load_images(subject, split)
        self.neutral_t = neutral_timestep(subject, full.timesteps) if neutral_t is None else int(neutral_t)
        rows = np.arange(full.num)
        if like is not None:
            index = {(int(t), int(c)): i for i, (t, c) in enumerate(zip(full.timesteps, full.camera_indices))}
            missing = [(int(t), int(c)) for t, c in zip(like.timesteps, like.camera_indices) if (t, c) not in index]
            if missing:
                raise ValueError(f"{subject.root}: split {split!r} lacks the driven frames {missing[:5]}")
            rows = np.array([index[(int(t), int(c))] for t, c in zip(like.timesteps, like.camera_indices)])
        elif max_images and full.num > max_images:
            rows = np.unique(np.round(np.linspace(0, full.num - 1, max_images)).astype(int))
        neutral_rows = np.flatnonzero(full.timesteps == self.neutral_t)
        self.rows = rows  # the evaluated images, in order; the set below also holds the neutral ones
        keep = np.unique(np.concatenate([rows, neutral_rows]))
        self.images = full.subset(keep)
        position = {int(r): i for i, r in enumerate(keep)}
        self.eval_rows = np.array([position[int(r)] for r in rows])
        crops = tracked_crops(subject, head_model, self.images, int(rc.crop_size), float(rc.crop_margin), background)
        self.features = extractor(crops)
        self.relative = relative_features(self.features, self.images, self.neutral_t)

    @property
    def evaluated(self) -> ImageSet:
        return self.images.subset(self.eval_rows)


def run(ctx, rconfig) -> dict:
    """Train (or resume) the regressor, save it, and evaluate reenactment (module docstring)."""
    rc, seed, mesh = rconfig, int(ctx.seed), ctx.mesh
    out = ctx.stage_dir(STAGE)
    out.mkdir(parents=True, exist_ok=True)
    start_time = time.time()
    model = load_model(ctx.workdir)
    coeffs, roots = load_pca_coefficients(ctx.workdir), load_roots(ctx.workdir)
    extractor = make_extractor(str(rc.features), crop_size=int(rc.crop_size))
    train = _Data(ctx.subject, ctx.head_model, "train", extractor, rc, ctx.background)  # every training image
    pca = fit_feature_pca(train.relative, int(rc.feature_dim))
    x = pca.transform(train.relative)
    images = train.images
    k_gt = coeffs.of(images.timesteps)
    loop.log(STAGE, f"{images.num} training crops, {extractor.name} features {train.features.shape[1]} → PCA "
                    f"{pca.dim}; neutral timestep {train.neutral_t}; {time.time() - start_time:.1f}s")
    net = Regressor(model.total_components, int(rc.width), int(rc.depth), float(rc.dropout))
    optimizer = make_optimizer(rc)
    batch_size = parallel.global_batch_size(int(rc.batch_size), mesh)

    def init():
        params = net.init(jax.random.key(seed), jnp.zeros((1, pca.dim)))["params"]
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    def batch(step):
        pick = sample_rows(images.num, batch_size, (seed, 5, step))
        t = images.timesteps[pick]
        return {"fg": images.fg[pick], "mask": images.masks[pick], "x": x[pick], "k": k_gt[pick], "root": roots[t],
                "viewmat": images.viewmats[pick].astype(np.float32), "K": images.Ks[pick].astype(np.float32),
                "index": np.arange(batch_size, dtype=np.int32)}

    probe = np.linspace(0, images.num - 1, min(images.num, 16)).round().astype(int)
    step = functools.partial(compiled_train_step, loop.SectionKey(rc), net, mesh, images.width, images.height,
                             seed=seed, backend=ctx.backend)
    state = loop.train(
        STAGE, out, loop.LoopSettings.from_config(rc), mesh, init=init,
        build_step=lambda capacity: step(capacity=capacity),
        capacity=lambda _: frame_capacity(model, k_gt[probe], roots[images.timesteps[probe]], images.viewmats[probe],
                                          images.Ks[probe], images.width, images.height, headroom=2.0),
        batch=batch, replicated=(parallel.replicate(model, mesh),), section=rc)
    if jax.process_index() == 0:
        save_regressor(out / REGRESSOR_FILE, pca, net, jax.device_get(state["params"]),
                       {"features": extractor.name, "crop_size": int(rc.crop_size), "crop_margin": float(rc.crop_margin)})
    barrier("regress: regressor written")  # every process reads it back below
    loop.log(STAGE, f"wrote {out / REGRESSOR_FILE} ({time.time() - start_time:.1f}s)")
    return evaluate_reenactment(ctx, rc, extractor, out)


def evaluate_reenactment(ctx, rc, extractor, out) -> dict:
    """Self and cross-identity reenactment against ground truth (module docstring)."""
    regressor = TrainedRegressor.load(out / REGRESSOR_FILE)
    model, roots = load_model(ctx.workdir), load_roots(ctx.workdir)
    protocol = Protocol.from_context(ctx)
    result: dict = {"background": list(ctx.background), "features": extractor.name}
    if not ctx.subject.frames("test"):
        loop.log(STAGE, "no held-out sequence (test split): nothing to evaluate")
        return result
    own = _Data(ctx.subject, ctx.head_model, "test", extractor, rc, ctx.background, protocol.max_images)
    gt = own.evaluated

    def evaluate(k, name):
        render = gem_renderer(model, k, roots[gt.timesteps], gt, ctx.background, ctx.backend)
        return protocol.evaluate(render, gt, name=name, tag=STAGE, renders=out / "renders")

    result["self_reenactment"] = evaluate(regressor.predict(own.relative[own.eval_rows]), "self_reenactment")
    if ctx.cross_subject_dir is not None:
        cross = _Data(load_subject(ctx.cross_subject_dir), ctx.head_model, "test", extractor, rc, ctx.background,
                      neutral_t=own.neutral_t, like=gt)
        # Identity B's images drive A's avatar; the ground truth is A performing the same frames.
        result["cross_identity"] = evaluate(regressor.predict(cross.relative[cross.eval_rows]), "cross_identity")
    for stage in ("refine", "pca"):
        path = ctx.stage_dir(stage) / "eval.json"
        if path.is_file():
            bound = read_json(path, stage).get("held_out_sequence")
            if bound:
                result["fitted_upper_bound"] = {"stage": stage, **bound}
                break
    if jax.process_index() == 0:
        write_json(out / "eval.json", result)
    print(reenactment_table(result), flush=True)
    return result


def reenactment_table(result: dict) -> str:
    lines = [f"{'driven by':<28}{'PSNR':>8}{'SSIM':>8}{'LPIPS':>8}{'L1':>8}"]
    names = {"self_reenactment": "regressor, self", "cross_identity": "regressor, cross-identity",
             "fitted_upper_bound": "fitted k (upper bound)"}
    for key, label in names.items():
        if key in result:
            r = result[key]
            lp = f"{r['lpips']:>8.4f}" if "lpips" in r else f"{'-':>8}"
            lines.append(f"{label:<28}{r['psnr']:>8.2f}{r['ssim']:>8.4f}{lp}{r['l1']:>8.4f}")
    return "\n".join(lines)
