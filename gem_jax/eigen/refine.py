"""The ``refine`` stage: photometric refinement of the eigenbases (docs/architecture.md §6; GEM §3.2).

    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage refine

PCA is optimal for the *Gaussian parameters*, not for the *images* they render. GEM refines
the bases ``U_m`` with the photometric loss on the training images, the means, σ and each
timestep's PCA coefficients ``k_t`` fixed:

    min_U  Σ_images  λ₁·L1(Î, I) + λ₂·D-SSIM(Î, I) + λ₃·LPIPS-VGG(Î, I)  [+ λ_a·Σ_m ‖U_m − U_m^PCA‖²],
    Î = render(P_t ∘ [mean + (k_t·σ) @ U], camera),     (λ₁, λ₂, λ₃) = (0.3, 1.0, 0.03),

with Adam (cosine-decayed learning rate), random backgrounds, and every ``qr_every`` steps
(1,000 by default) ``U ← Qᵀ`` of the QR decomposition ``Uᵀ = QR`` with the signs fixed by
``diag(R) > 0`` (:func:`gem_jax.eigen.qr.orthonormalize_rows`), so the rows stay orthonormal
and each coefficient keeps its meaning. The bracketed penalty toward the PCA basis
(``refine.loss.anchor``, off by default) is this project's addition, measured in the
benchmark's refinement study (README). Training runs in the shared loop (:mod:`gem_jax.loop`:
data-parallel guarded steps, resume from ``refine/ckpt``, bad-step policy, capacity growth,
metrics, progress). One training camera is withheld (``refine.val_cameras``) and the basis with
the best PSNR on it — the PCA basis counts as step 0 — is the one saved. Outputs in
``<workdir>/refine/``: ``gem.npz``, ``best.npz``, ``metrics.json``, ``eval.json`` (as the
``pca`` stage's, for comparison), ``renders/``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gem_jax import loop, parallel
from gem_jax.artefacts import read_npz
from gem_jax.atomic import write_npz
from gem_jax.batching import sample_rows
from gem_jax.data.images import ImageSet, load_images
from gem_jax.eigen.evaluate import evaluate_gem, render_images
from gem_jax.eigen.model import GEM, size_mb
from gem_jax.eigen.qr import orthonormalize_rows
from gem_jax.eigen.render import frame_capacity, render_batch
from gem_jax.eigen.workdir import (MODEL_FILE, Coefficients, load_model, load_pca_coefficients, load_roots,
                                   stored_dtype)
from gem_jax.losses import dssim_loss, l1_loss
from gem_jax.metrics import psnr

__all__ = ["compiled_refine_step", "init_state", "make_optimizer", "make_refine_step",
           "refine_basis", "refine_batch", "run"]

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
    pick = sample_rows(images.num, batch_size, (seed, 3, step))
    t = images.timesteps[pick]
    return {"fg": images.fg[pick], "mask": images.masks[pick], "k": coeffs.of(t), "root": roots[t],
            "viewmat": images.viewmats[pick].astype(np.float32), "K": images.Ks[pick].astype(np.float32),
            "index": np.arange(batch_size, dtype=np.int32)}


def make_refine_step(rconfig, optimizer, mesh, width: int, height: int, capacity: int, seed: int,
                     backend: str = "auto", background=(1.0, 1.0, 1.0)):
    """The jitted ``step(state, batch, model, lpips_params) -> (state, metrics)`` (module docstring)."""
    weights = rconfig.loss
    w_l1, w_dssim, w_vgg = float(weights.l1), float(weights.dssim), float(weights.vgg)
    w_anchor = float(weights.get("anchor", 0.0))
    random_bg = bool(rconfig.random_background)
    qr_every = max(int(rconfig.qr_every), 1)

    def grad_fn(U, batch, model, lpips_params, step):
        keys = loop.example_keys(seed, step, batch["index"])
        target, bg = loop.photometric_target(batch, keys, random_bg, background)

        def loss_fn(U):
            out = render_batch(model.replace(U=U), batch["k"], batch["root"], batch["viewmat"], batch["K"], bg,
                               width=width, height=height, capacity=capacity, backend=backend)
            terms = {"l1": l1_loss(out.image, target), "dssim": dssim_loss(out.image, target)}
            loss = w_l1 * terms["l1"] + w_dssim * terms["dssim"]
            if lpips_params is not None:
                from gem_jax.perceptual import lpips_distance

                terms["vgg"] = jnp.mean(lpips_distance(lpips_params, out.image, target))
                loss = loss + w_vgg * terms["vgg"]
            if w_anchor > 0:  # a penalty toward the PCA basis (model.U is the unrefined one)
                terms["anchor"] = sum(jnp.sum(jnp.square(U[m] - model.U[m])) for m in U)
                loss = loss + w_anchor * terms["anchor"]
            return loss, {**terms, "psnr": jnp.mean(psnr(out.image, target)),
                          "overflow": jnp.max(out.stats["overflow"]).astype(jnp.float32)}

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(U)
        return grads, {"loss": loss, **aux}

    def orthonormalize(U, step):
        return jax.lax.cond(step % qr_every == 0, lambda u: jax.tree.map(orthonormalize_rows, u), lambda u: u, U)

    return loop.make_step(grad_fn, optimizer, mesh, trainable="U", after_update=orthonormalize)


@functools.lru_cache(maxsize=8)
def compiled_refine_step(key: loop.SectionKey, mesh, width: int, height: int, capacity: int, seed: int,
                         backend: str, background: tuple):
    """:func:`make_refine_step` cached on its arguments (``key``: the refine section)."""
    rc = key.section
    return make_refine_step(rc, make_optimizer(rc), mesh, width, height, capacity, seed, backend, background)


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
        self.path, self.model, self.images, self.backend = path, model, images, backend
        self.U, self.psnr, self.step, self.history = None, -np.inf, None, []
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
        pred = render_images(model, self.k, self.roots, self.images, (1.0, 1.0, 1.0), backend=self.backend)
        value = float(np.mean(np.asarray(psnr(jnp.asarray(np.clip(pred, 0, 1)), jnp.asarray(self.target)))))
        self.history.append((step, value))
        loop.log(STAGE, f"step {step}: validation PSNR {value:.3f} dB" + (" (PCA basis)" if step == 0 else ""))
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


def refine_basis(ctx, rconfig, model: GEM, coeffs: Coefficients, out: Path, *, images: ImageSet | None = None,
                 keep_best: bool = True) -> tuple[GEM, dict]:
    """Refine ``model.U`` photometrically (module docstring) with the training timesteps'
    coefficients ``coeffs`` fixed; resumes from ``out/ckpt``. Returns the refined GEM (the
    basis with the best validation PSNR, or the last one if not ``keep_best``; rows
    orthonormal) and the validation summary. ``images``: the targets (default: the subject's
    training split; the refinement study passes the teacher's own renders).

    The ``refine`` stage calls it on the PCA-only GEM of ``<workdir>/pca``; the component
    ablation (``benchmarks/bench_ablation.py``) calls it once per component count.
    """
    rc, seed, mesh = rconfig, int(ctx.seed), ctx.mesh
    out.mkdir(parents=True, exist_ok=True)
    roots = load_roots(ctx.workdir)
    images = load_images(ctx.subject, "train") if images is None else images
    images, val_images = split_validation(images, int(rc.val_cameras), int(rc.val_images))
    if val_images is not None:
        loop.log(STAGE, f"validation: training cameras {sorted(set(val_images.camera_indices.tolist()))} withheld "
                        f"({val_images.num} images); the basis with the best validation PSNR is kept")
    batch_size = parallel.global_batch_size(int(rc.batch_size), mesh)
    optimizer = make_optimizer(rc)
    lpips_params = None
    if float(rc.loss.vgg) > 0:
        from gem_jax.perceptual import load_lpips_params

        lpips_params = parallel.replicate(load_lpips_params("vgg16"), mesh)
    probe = np.linspace(0, images.num - 1, min(images.num, 16)).round().astype(int)
    t_probe = images.timesteps[probe]
    step = functools.partial(compiled_refine_step, loop.SectionKey(rc), mesh, images.width, images.height, seed=seed,
                             backend=ctx.backend, background=tuple(ctx.background))
    loop.log(STAGE, f"{model.num_gaussians} Gaussians, {model.total_components} coefficients, {images.num} training "
                    f"images {images.width}x{images.height}, {int(rc.steps)} steps, {len(jax.devices())} device(s)")
    best = _Best(out / BEST_FILE, model, coeffs, roots, val_images, ctx.backend)
    best.offer(0, model.U)  # the PCA basis (a resumed run has it in its history already)
    state = loop.train(
        STAGE, out, loop.LoopSettings.from_config(rc), mesh,
        init=functools.partial(init_state, model, optimizer),
        build_step=lambda capacity: step(capacity=capacity),
        capacity=lambda _: frame_capacity(model, coeffs.of(t_probe), roots[t_probe], images.viewmats[probe],
                                          images.Ks[probe], images.width, images.height,
                                          headroom=float(rc.capacity_headroom)),
        batch=lambda i: refine_batch(images, coeffs, roots, i, batch_size, seed),
        replicated=(parallel.replicate(model, mesh), lpips_params),
        on_checkpoint=lambda i, state: best.offer(i, jax.device_get(state["U"])), section=rc)
    U = jax.device_get(state["U"]) if best.U is None or not keep_best else best.U
    if best.U is not None and keep_best:
        loop.log(STAGE, best.describe())
    refined = model.replace(U={m: jnp.asarray(orthonormalize_rows(jnp.asarray(u))) for m, u in U.items()})
    return refined, best.summary()


def run(ctx, rconfig) -> dict:
    """Refine the PCA-only GEM of ``<workdir>/pca`` (or resume), save and evaluate it."""
    out = ctx.stage_dir(STAGE)
    model = load_model(ctx.workdir, "pca")
    refined, validation = refine_basis(ctx, rconfig, model, load_pca_coefficients(ctx.workdir), out)
    if jax.process_index() == 0:  # only process 0 writes, so only it may read the file back
        refined.save(out / MODEL_FILE, dtype=stored_dtype(ctx.workdir / "pca" / MODEL_FILE))
        loop.log(STAGE, f"wrote {out / MODEL_FILE}: {size_mb(out / MODEL_FILE):.2f} MB")
    return evaluate_gem(ctx, refined, out, tag=STAGE, extra={"validation": validation})
