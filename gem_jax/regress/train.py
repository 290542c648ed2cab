"""The ``regress`` stage: train the image → coefficient regressor and evaluate reenactment (DESIGN §7, §8).

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
from gem_jax.artefacts import read_json
from gem_jax.atomic import write_json
from gem_jax.checkpoint import StageCheckpoints
from gem_jax.data.images import ImageSet, load_images
from gem_jax.eigen.evaluate import evaluate_images
from gem_jax.eigen.render import frame_capacity, render_batch
from gem_jax.eigen.workdir import load_model, load_pca_coefficients, load_roots
from gem_jax.head.flame import lbs
from gem_jax.head.meshraster import project_vertices
from gem_jax.losses import dssim_loss, l1_loss
from gem_jax.metrics import psnr
from gem_jax.multihost import barrier
from gem_jax.regress.crop import box_from_vertices, crop
from gem_jax.regress.features import make_extractor
from gem_jax.regress.model import Regressor, fit_feature_pca, load_regressor, save_regressor
from gem_jax.schedules import warmup_cosine

__all__ = ["REGRESSOR_FILE", "neutral_timestep", "predict", "relative_features", "run", "tracked_crops"]

STAGE = "regress"
REGRESSOR_FILE = "regressor.npz"


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[regress] {message}", flush=True)


def neutral_timestep(subject, timesteps) -> int:
    """The timestep whose tracked expression and jaw pose are closest to zero."""
    def energy(t):
        p = subject.flame_params(int(t))
        return float(np.sum(np.square(p.expr)) + np.sum(np.square(p.jaw_pose)))

    return int(min(sorted(set(int(t) for t in timesteps)), key=energy))


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
    schedule = warmup_cosine(rc.lr, rc.steps, rc.warmup_steps, rc.end_lr_factor)
    return optax.chain(optax.clip_by_global_norm(float(rc.clip_norm)),
                       optax.adamw(schedule, weight_decay=float(rc.weight_decay)))


def make_train_step(net: Regressor, rc, optimizer, mesh, width: int, height: int, capacity: int, seed: int,
                    backend: str = "auto"):
    """Jitted ``step(state, batch, model) -> (state, metrics)`` (module docstring)."""
    w = rc.loss
    w_l1, w_dssim, w_k, w_prior = float(w.l1), float(w.dssim), float(w.coeff), float(w.prior)

    def grad_fn(params, batch, model, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(batch["index"])
        bg = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, 1), (3,)))(keys)
        mask = batch["mask"].astype(jnp.float32)[..., None] / 255.0
        target = batch["fg"].astype(jnp.float32) / 255.0 + bg[:, None, None, :] * (1.0 - mask)

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

    data_parallel = parallel.data_parallel(grad_fn, mesh)

    def step_fn(state, batch, model):
        grads, metrics = data_parallel(state["params"], batch, model, state["step"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        ok = jnp.isfinite(metrics["loss"]) & (metrics["overflow"] == 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        return ({"params": keep(params, state["params"]), "opt_state": keep(opt_state, state["opt_state"]),
                 "step": state["step"] + 1}, {**metrics, "rejected": 1.0 - ok.astype(jnp.float32)})

    return jax.jit(step_fn, donate_argnums=0)


def predict(net: Regressor, params, pca, relative: np.ndarray) -> np.ndarray:
    """``(B, ΣK)`` coefficients of relative features (eval mode: no dropout)."""
    x = jnp.asarray(pca.transform(relative))
    return np.asarray(jax.jit(lambda p, x: net.apply({"params": p}, x))(params, x))


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


def run(config, workdir: str | os.PathLike, force: bool = False, mesh=None) -> dict:
    """Train (or resume) the regressor, save it, and evaluate reenactment (module docstring)."""
    from tqdm import tqdm

    from gem_jax.data.prepare import subject_dir
    from gem_jax.data.subject import load_subject

    workdir = Path(workdir)
    rc, seed = config.regress, int(config.seed)
    out = workdir / STAGE
    if force and out.exists() and jax.process_index() == 0:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    background = tuple(float(x) for x in config.data.background)
    backend = str(config.render.backend)
    start_time = time.time()
    model = load_model(workdir)
    coeffs, roots = load_pca_coefficients(workdir), load_roots(workdir)
    subject = load_subject(subject_dir(config, workdir))
    head_model = subject.head_model(config.data.head_model or None, int(config.data.n_shape), int(config.data.n_expr))
    extractor = make_extractor(str(rc.features), crop_size=int(rc.crop_size))
    train = _Data(subject, head_model, "train", extractor, rc, background)  # every training image
    pca = fit_feature_pca(train.relative, int(rc.feature_dim))
    x = pca.transform(train.relative)
    k_gt = coeffs.of(train.images.timesteps)
    _log(f"{train.images.num} training crops, {extractor.name} features {train.features.shape[1]} → PCA {pca.dim}; "
         f"neutral timestep {train.neutral_t}; {time.time() - start_time:.1f}s")
    net = Regressor(model.total_components, int(rc.width), int(rc.depth), float(rc.dropout))
    optimizer = make_optimizer(rc)
    mesh = parallel.data_mesh() if mesh is None else mesh
    batch_size = parallel.global_batch_size(int(rc.batch_size), mesh)

    def init():
        params = net.init(jax.random.key(seed), jnp.zeros((1, pca.dim)))["params"]
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    ckpt = StageCheckpoints(out / "ckpt", save_every=int(rc.checkpoint_every), max_to_keep=2)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    if ckpt.latest_step() is not None:
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated),
                              jax.eval_shape(init))
        state = ckpt.restore(target)
        _log(f"resumed from {ckpt.directory} at step {int(state['step'])}")
    else:
        state = parallel.replicate(init(), mesh)
    images = train.images
    probe = np.linspace(0, images.num - 1, min(images.num, 16)).round().astype(int)
    capacity = frame_capacity(model, k_gt[probe], roots[images.timesteps[probe]], images.viewmats[probe],
                              images.Ks[probe], images.width, images.height, headroom=2.0)
    step_fn = make_train_step(net, rc, optimizer, mesh, images.width, images.height, capacity, seed, backend)
    model_rep = parallel.replicate(model, mesh)
    steps, step = int(rc.steps), int(state["step"])
    log_path = out / "metrics.json"  # written with every checkpoint, so a resumed run keeps its log
    resumed = step and log_path.is_file()
    records = [r for r in read_json(log_path, STAGE)["records"] if r["step"] <= step] if resumed else []
    bar = tqdm(total=steps, initial=step, desc="regress", unit="step", file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15.0, disable=jax.process_index() != 0)
    try:
        while step < steps:
            rng = np.random.default_rng([seed, 5, step])
            pick = rng.choice(images.num, size=batch_size, replace=images.num < batch_size)
            t = images.timesteps[pick]
            batch = {"fg": images.fg[pick], "mask": images.masks[pick], "x": x[pick], "k": k_gt[pick],
                     "root": roots[t], "viewmat": images.viewmats[pick].astype(np.float32),
                     "K": images.Ks[pick].astype(np.float32), "index": np.arange(batch_size, dtype=np.int32)}
            state, metrics = step_fn(state, parallel.shard_batch(batch, mesh), model_rep)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if m["overflow"] > 0:
                capacity = int(capacity * 1.5) + 256
                _log(f"step {step}: intersections overflowed; update rejected, capacity raised to {capacity}")
                step_fn = make_train_step(net, rc, optimizer, mesh, images.width, images.height, capacity, seed,
                                          backend)
            step = int(state["step"])
            bar.update(1)
            if step % max(int(rc.log_every), 1) == 0 or step == steps:
                records.append({"step": step, **m})
                bar.set_postfix(loss=f"{m['loss']:.4f}", psnr=f"{m['psnr']:.2f}", refresh=False)
            if step % ckpt.save_every == 0 or step == steps:
                ckpt.save(step, state, force=True)
                if jax.process_index() == 0:
                    write_json(log_path, {"stage": STAGE, "records": records})
        ckpt.wait()
    finally:
        bar.close()
        ckpt.close()
    params = jax.device_get(state["params"])
    if jax.process_index() == 0:
        save_regressor(out / REGRESSOR_FILE, pca, net, params,
                       {"features": extractor.name, "crop_size": int(rc.crop_size), "crop_margin": float(rc.crop_margin)})
        write_json(out / "metrics.json", {"stage": STAGE, "records": records})
    barrier("regress: regressor written")  # every process reads it back below
    _log(f"trained to step {step} in {time.time() - start_time:.1f}s; wrote {out / REGRESSOR_FILE}")
    return evaluate_reenactment(config, workdir, extractor, out)


def evaluate_reenactment(config, workdir: Path, extractor, out: Path) -> dict:
    """Self and cross-identity reenactment against ground truth (module docstring)."""
    from gem_jax.data.prepare import subject_dir
    from gem_jax.data.subject import load_subject

    rc = config.regress
    background = tuple(float(x) for x in config.data.background)
    pca, net, params, _ = load_regressor(out / REGRESSOR_FILE)
    model, roots = load_model(workdir), load_roots(workdir)
    subject = load_subject(subject_dir(config, workdir))
    head_model = subject.head_model(config.data.head_model or None, int(config.data.n_shape), int(config.data.n_expr))
    lpips_fn = None
    if bool(rc.eval.lpips):
        from gem_jax.perceptual import LPIPS

        lpips_fn = LPIPS("vgg16")
    common = dict(lpips_fn=lpips_fn, renders=out / "renders", num_renders=int(rc.eval.num_renders),
                  backend=str(config.render.backend), tag="regress")
    result: dict = {"background": background, "features": extractor.name}
    max_images = int(rc.eval.max_images) or None
    if not subject.frames("test"):
        _log("no held-out sequence (test split): nothing to evaluate")
        return result
    own = _Data(subject, head_model, "test", extractor, rc, background, max_images)
    gt = own.evaluated
    k = predict(net, params, pca, own.relative[own.eval_rows])
    result["self_reenactment"] = evaluate_images(model, k, roots[gt.timesteps], gt, background,
                                                 name="self_reenactment", **common)
    cross_dir = Path(workdir) / "data_cross"
    if not config.data.subject_dir and cross_dir.is_dir():
        cross_subject = load_subject(cross_dir)
        cross = _Data(cross_subject, head_model, "test", extractor, rc, background, neutral_t=own.neutral_t, like=gt)
        k_cross = predict(net, params, pca, cross.relative[cross.eval_rows])
        # Identity B's images drive A's avatar; the ground truth is A performing the same frames.
        result["cross_identity"] = evaluate_images(model, k_cross, roots[gt.timesteps], gt, background,
                                                   name="cross_identity", **common)
    for stage in ("refine", "pca"):
        path = Path(workdir) / stage / "eval.json"
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
