"""The ``refine`` stage: photometric refinement of the eigenbases (DESIGN §6; GEM §3.2).

    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage refine

PCA is optimal for the *Gaussian parameters*, not for the *images* they render. GEM refines
the bases ``U_m`` with the photometric loss on the training images, the means, σ and each
timestep's PCA coefficients ``k_t`` fixed:

    min_U  Σ_images  λ₁·L1(Î, I) + λ₂·D-SSIM(Î, I) + λ₃·LPIPS-VGG(Î, I),
    Î = render(P_t ∘ [mean + (k_t·σ) @ U], camera),     (λ₁, λ₂, λ₃) = (0.3, 1.0, 0.03),

with Adam (cosine-decayed learning rate), random backgrounds, and every ``qr_every`` steps
(1,000 by default) ``U ← Qᵀ`` of the QR decomposition ``Uᵀ = QR`` with the signs fixed by
``diag(R) > 0`` (:func:`gem_jax.eigen.qr.orthonormalize_rows`), so the rows stay orthonormal
and each coefficient keeps its meaning. The step is one jitted, state-donating function,
data-parallel over the ``('data',)`` mesh (:mod:`gem_jax.parallel`); randomness is
``fold_in(key(seed), step)``; orbax checkpoints in ``refine/ckpt`` (rerun to resume); an update
whose loss is not finite or whose render overflowed the intersection capacity is rejected
inside the step (the capacity is then raised). Outputs in ``<workdir>/refine/``: ``gem.npz``,
``metrics.json``, ``eval.json`` (as the ``pca`` stage's, for comparison), ``renders/``.
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
from gem_jax.artefacts import read_json, read_npz
from gem_jax.atomic import write_json, write_npz
from gem_jax.checkpoint import StageCheckpoints
from gem_jax.data.images import ImageSet, load_images
from gem_jax.eigen.evaluate import evaluate_protocol
from gem_jax.eigen.model import GEM, size_mb
from gem_jax.eigen.qr import orthonormalize_rows
from gem_jax.eigen.render import frame_capacity, render_batch
from gem_jax.eigen.workdir import MODEL_FILE, Coefficients, load_model, load_pca_coefficients, load_roots
from gem_jax.losses import dssim_loss, l1_loss
from gem_jax.metrics import psnr
from gem_jax.render import round_capacity

__all__ = ["comparison_table", "init_state", "make_optimizer", "make_refine_step", "refine_batch", "run"]

STAGE = "refine"


def make_optimizer(rconfig) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(float(rconfig.lr), max(int(rconfig.steps), 1), float(rconfig.end_lr_factor))
    return optax.adam(schedule)


def init_state(model: GEM, optimizer) -> dict:
    U = jax.tree.map(jnp.copy, model.U)  # a copy: the train step donates (deletes) its state
    return {"U": U, "opt_state": optimizer.init(U), "step": jnp.zeros((), jnp.int32)}


def refine_batch(images: ImageSet, coeffs: Coefficients, roots: np.ndarray, step: int, batch_size: int,
                 seed: int) -> dict:
    """The global batch of ``step`` (NumPy): images drawn from ``default_rng([seed, step])``."""
    rng = np.random.default_rng([int(seed), 3, int(step)])
    pick = rng.choice(images.num, size=batch_size, replace=images.num < batch_size)
    t = images.timesteps[pick]
    return {"fg": images.fg[pick], "mask": images.masks[pick], "k": coeffs.of(t), "root": roots[t],
            "viewmat": images.viewmats[pick].astype(np.float32), "K": images.Ks[pick].astype(np.float32),
            "index": np.arange(batch_size, dtype=np.int32)}


def make_refine_step(rconfig, optimizer, mesh, width: int, height: int, capacity: int, seed: int,
                     backend: str = "auto", background=(1.0, 1.0, 1.0)):
    """The jitted ``step(state, batch, model, lpips_params) -> (state, metrics)`` (module docstring)."""
    weights = rconfig.loss
    w_l1, w_dssim, w_vgg = float(weights.l1), float(weights.dssim), float(weights.vgg)
    random_bg, fixed_bg = bool(rconfig.random_background), jnp.asarray(background, jnp.float32)
    qr_every = max(int(rconfig.qr_every), 1)

    def grad_fn(U, batch, model, lpips_params, step):
        key = jax.random.fold_in(jax.random.key(seed), step)
        keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(batch["index"])
        if random_bg:
            bg = jax.vmap(lambda k: jax.random.uniform(k, (3,)))(keys)
        else:
            bg = jnp.broadcast_to(fixed_bg, (keys.shape[0], 3))
        mask = batch["mask"].astype(jnp.float32)[..., None] / 255.0
        target = batch["fg"].astype(jnp.float32) / 255.0 + bg[:, None, None, :] * (1.0 - mask)

        def loss_fn(U):
            out = render_batch(model.replace(U=U), batch["k"], batch["root"], batch["viewmat"], batch["K"], bg,
                               width=width, height=height, capacity=capacity, backend=backend)
            terms = {"l1": l1_loss(out.image, target), "dssim": dssim_loss(out.image, target)}
            loss = w_l1 * terms["l1"] + w_dssim * terms["dssim"]
            if lpips_params is not None:
                from gem_jax.perceptual import lpips_distance

                terms["vgg"] = jnp.mean(lpips_distance(lpips_params, out.image, target))
                loss = loss + w_vgg * terms["vgg"]
            aux = {**terms, "psnr": jnp.mean(psnr(out.image, target)),
                   "overflow": jnp.max(out.stats["overflow"]).astype(jnp.float32)}
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(U)
        return grads, {"loss": loss, **aux}

    data_parallel = parallel.data_parallel(grad_fn, mesh)

    def step_fn(state, batch, model, lpips_params):
        grads, metrics = data_parallel(state["U"], batch, model, lpips_params, state["step"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["U"])
        U = optax.apply_updates(state["U"], updates)
        step = state["step"] + 1
        U = jax.lax.cond(step % qr_every == 0, lambda u: jax.tree.map(orthonormalize_rows, u), lambda u: u, U)
        grad_norm = optax.tree.norm(grads)
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & (metrics["overflow"] == 0)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        new_state = {"U": keep(U, state["U"]), "opt_state": keep(opt_state, state["opt_state"]), "step": step}
        return new_state, {**metrics, "grad_norm": grad_norm, "rejected": 1.0 - ok.astype(jnp.float32)}

    return jax.jit(step_fn, donate_argnums=0)


BEST_FILE = "best.npz"


def split_validation(images: ImageSet, cameras: int, max_images: int) -> tuple[ImageSet, ImageSet | None]:
    """Withhold ``cameras`` training cameras (evenly spread over the rig) for validation."""
    if cameras <= 0:
        return images, None
    cams = np.unique(images.camera_indices)
    if cameras >= len(cams):
        raise ValueError(f"refine.val_cameras={cameras}: only {len(cams)} training cameras")
    picks = cams[np.round(np.linspace(0, len(cams) - 1, cameras + 2)[1:-1]).astype(int)]
    held = np.isin(images.camera_indices, picks)
    val = images.subset(np.flatnonzero(held))
    if max_images and val.num > max_images:
        val = val.subset(np.unique(np.round(np.linspace(0, val.num - 1, max_images)).astype(int)))
    return images.subset(np.flatnonzero(~held)), val


class _Best:
    """The basis with the best PSNR on the withheld validation views, kept on disk (``best.npz``)
    so a resumed run remembers it. Step 0 is the PCA basis: refinement that does not help on
    views it was not trained on is not kept."""

    def __init__(self, path: Path, model: GEM, coeffs: Coefficients, roots, images: ImageSet | None, backend: str):
        from gem_jax.eigen.evaluate import render_images

        self.path, self.model, self.images, self.backend = path, model, images, backend
        self.U, self.psnr, self.step, self.history = None, -np.inf, None, []
        self._render = render_images
        if images is not None:
            self.k, self.roots = coeffs.of(images.timesteps), roots[images.timesteps]
            self.target = images.composite(slice(None), (1.0, 1.0, 1.0))
            if path.is_file():
                z = read_npz(path, STAGE)
                self.U = {m: z[f"U_{m}"] for m in model.U}
                self.psnr, self.step = float(z["psnr"]), int(z["step"])
                self.history = [tuple(h) for h in z["history"].tolist()]

    def offer(self, step: int, U) -> None:
        if self.images is None or any(h[0] == step for h in self.history):
            return
        model = self.model.replace(U={m: orthonormalize_rows(jnp.asarray(u)) for m, u in U.items()})
        pred = self._render(model, self.k, self.roots, self.images, (1.0, 1.0, 1.0), backend=self.backend)
        value = float(np.mean(np.asarray(psnr(jnp.asarray(np.clip(pred, 0, 1)), jnp.asarray(self.target)))))
        self.history.append((step, value))
        _log(f"step {step}: validation PSNR {value:.3f} dB" + (" (PCA basis)" if step == 0 else ""))
        if value > self.psnr:
            self.U, self.psnr, self.step = {m: np.asarray(u) for m, u in U.items()}, value, step
        if jax.process_index() == 0:
            write_npz(self.path, psnr=self.psnr, step=self.step, history=np.array(self.history, np.float64),
                      **{f"U_{m}": u for m, u in self.U.items()})

    def describe(self) -> str:
        if self.step == 0:
            return (f"refinement did not raise the validation PSNR above the PCA basis' {self.psnr:.3f} dB: "
                    "the PCA basis is kept")
        return f"kept the basis of step {self.step} (validation PSNR {self.psnr:.3f} dB)"

    def summary(self) -> dict:
        if self.images is None:
            return {"enabled": False}
        return {"enabled": True, "cameras": sorted(set(int(c) for c in self.images.camera_indices)),
                "images": int(self.images.num), "best_step": self.step, "best_psnr": self.psnr,
                "history": [{"step": int(a), "psnr": float(b)} for a, b in self.history]}


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(f"[refine] {message}", flush=True)


def comparison_table(workdir: str | os.PathLike) -> str:
    """Components × {PSNR held-out camera, held-out sequence (fitted k), MB}: PCA-only vs refined."""
    workdir = Path(workdir)
    lines = [f"{'model':<10}{'components (pos/rot/scale/opac)':>33}{'PSNR novel view':>17}"
             f"{'PSNR novel expr (fitted k)':>28}{'MB':>8}"]
    for stage in ("pca", "refine"):
        path = workdir / stage / "eval.json"
        if not path.is_file() or not (workdir / stage / MODEL_FILE).is_file():
            continue
        ev = read_json(path, stage)
        model = load_model(workdir, stage)
        comps = "/".join(str(v) for v in model.num_components.values())
        cam = ev.get("held_out_camera", {}).get("psnr", float("nan"))
        seq = ev.get("held_out_sequence", {}).get("psnr", float("nan"))
        lines.append(f"{stage:<10}{comps:>33}{cam:>17.2f}{seq:>28.2f}{size_mb(workdir / stage / MODEL_FILE):>8.2f}")
    return "\n".join(lines)


def run(config, workdir: str | os.PathLike, force: bool = False, mesh=None) -> dict:
    """Refine the PCA-only GEM of ``<workdir>/pca`` (or resume), save and evaluate it."""
    from tqdm import tqdm

    from gem_jax.data.prepare import subject_dir
    from gem_jax.data.subject import load_subject

    workdir = Path(workdir)
    rc, seed = config.refine, int(config.seed)
    out = workdir / STAGE
    if force and out.exists() and jax.process_index() == 0:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(workdir, "pca")
    coeffs = load_pca_coefficients(workdir)
    roots = load_roots(workdir)
    subject = load_subject(subject_dir(config, workdir))
    images, val_images = split_validation(load_images(subject, "train"), int(rc.val_cameras), int(rc.val_images))
    if val_images is not None:
        _log(f"validation: training cameras {sorted(set(val_images.camera_indices.tolist()))} withheld "
             f"({val_images.num} images); the basis with the best validation PSNR is kept")
    mesh = parallel.data_mesh() if mesh is None else mesh
    batch_size = parallel.global_batch_size(int(rc.batch_size), mesh)
    optimizer = make_optimizer(rc)
    lpips_params = None
    if float(rc.loss.vgg) > 0:
        from gem_jax.perceptual import load_lpips_params

        lpips_params = parallel.replicate(load_lpips_params("vgg16"), mesh)
    ckpt = StageCheckpoints(out / "ckpt", save_every=int(rc.checkpoint_every), max_to_keep=int(rc.keep_checkpoints))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                          jax.eval_shape(lambda: init_state(model, optimizer)))
    if ckpt.latest_step() is not None:
        state = ckpt.restore(target)
        _log(f"resumed from {ckpt.directory} at step {int(state['step'])}")
    else:
        state = parallel.replicate(init_state(model, optimizer), mesh)
    probe = np.linspace(0, images.num - 1, min(images.num, 16)).round().astype(int)
    t_probe = images.timesteps[probe]
    capacity = frame_capacity(model, coeffs.of(t_probe), roots[t_probe], images.viewmats[probe], images.Ks[probe],
                              images.width, images.height, headroom=float(rc.capacity_headroom))
    build = functools.partial(make_refine_step, rc, optimizer, mesh, images.width, images.height, seed=seed,
                              backend=str(config.render.backend),
                              background=tuple(float(x) for x in config.data.background))
    step_fn = build(capacity=capacity)
    model_rep = parallel.replicate(model, mesh)
    steps, start = int(rc.steps), int(state["step"])
    _log(f"{model.num_gaussians} Gaussians, {model.total_components} coefficients, {images.num} training images "
         f"{images.width}x{images.height}, steps {start} → {steps}, {len(jax.devices())} device(s)")
    records, bad, t0 = [], 0, time.time()
    metrics_path = out / "metrics.json"
    if metrics_path.is_file() and start > 0:
        records = [r for r in json.loads(metrics_path.read_text()).get("records", []) if r["step"] <= start]
    bar = tqdm(total=steps, initial=start, desc="refine", unit="step", file=sys.stderr, dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15.0, disable=jax.process_index() != 0)
    best = _Best(out / BEST_FILE, model, coeffs, roots, val_images, str(config.render.backend))
    step = start
    try:
        if start == 0:
            best.offer(0, model.U)
        while step < steps:
            batch = parallel.shard_batch(refine_batch(images, coeffs, roots, step, batch_size, seed), mesh)
            state, metrics = step_fn(state, batch, model_rep, lpips_params)
            m = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if m["overflow"] > 0:
                capacity = round_capacity(int(capacity * 1.5) + 1)
                _log(f"step {step}: tile intersections overflowed; update rejected, capacity raised to {capacity}")
                step_fn = build(capacity=capacity)
            elif not np.isfinite(m["loss"]):
                bad += 1
                if bad >= int(rc.max_bad_steps):
                    raise FloatingPointError(f"refine: {bad} consecutive non-finite steps at step {step}")
            else:
                bad = 0
            step = int(state["step"])
            bar.update(1)
            if step % max(int(rc.log_every), 1) == 0 or step == steps:
                records.append({"step": step, "time": time.time(), **m})
                bar.set_postfix(loss=f"{m['loss']:.4f}", psnr=f"{m['psnr']:.2f}", refresh=False)
                if jax.process_index() == 0:
                    write_json(metrics_path, {"stage": STAGE, "records": records})
            if step % ckpt.save_every == 0 or step == steps:
                best.offer(step, jax.device_get(state["U"]))
                ckpt.save(step, state, force=True)
        ckpt.wait()
    finally:
        bar.close()
        ckpt.close()
    _log(f"refined to step {int(state['step'])} in {time.time() - t0:.1f}s")
    U = jax.device_get(state["U"]) if best.U is None else best.U
    if best.U is not None:
        _log(best.describe())
    refined = model.replace(U={m: jnp.asarray(orthonormalize_rows(jnp.asarray(u))) for m, u in U.items()})
    if jax.process_index() == 0:  # only process 0 writes, so only it may read the file back
        refined.save(out / MODEL_FILE, dtype=str(config.pca.dtype))
        _log(f"wrote {out / MODEL_FILE}: {size_mb(out / MODEL_FILE):.2f} MB")
    result = evaluate_protocol(config, workdir, refined, out, tag="refine", extra={"validation": best.summary()})
    if jax.process_index() == 0:
        print(comparison_table(workdir), flush=True)
    return result
