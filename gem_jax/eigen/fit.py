"""Analysis-by-synthesis: coefficients (and optionally a pose correction) for given images (docs/architecture.md §6).

With the basis ``U`` frozen, the coefficients of each timestep of an image set are found by
minimising the refinement's photometric loss between GEM renders and the images,

    min_{k_t, ξ_t}  Σ_images  λ₁·L1(Î, I) + λ₂·D-SSIM(Î, I) + λ_k·|k_t|²,
    Î = render(P_t ∘ exp(ξ_t) ∘ G(k_t), camera),

where ``t`` is the image's timestep, ``P_t`` its tracked root pose and ``exp(ξ_t)`` an
optional rigid correction (axis-angle + translation in the head frame, ``fit.pose``). All
timesteps are optimised jointly with Adam on random batches of images, lazily: a step moves
(and updates the moments of) only the timesteps its images show; ``k`` is projected back to
``±3σ`` after each update. This gives the *fitted-coefficient* GEM of the evaluation
(the novel-expression protocol) — an upper bound for the image-driven regressor.
"""

from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from gem_jax.batching import sample_rows
from gem_jax.data.images import ImageSet
from gem_jax.eigen.model import COEFF_LIMIT, GEM
from gem_jax.eigen.render import frame_capacity, render_batch
from gem_jax.head.flame import rodrigues
from gem_jax.loop import keep_if
from gem_jax.losses import dssim_loss, l1_loss
from gem_jax.render import round_capacity

__all__ = ["FitResult", "apply_pose_correction", "fit_coefficients"]


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Per-timestep coefficients ``k (T, ΣK)`` and pose corrections ``xi (T, 6)`` of ``timesteps``."""

    timesteps: np.ndarray
    k: np.ndarray
    xi: np.ndarray
    losses: np.ndarray  # loss per step

    def rows(self, timesteps) -> np.ndarray:
        """Row index into ``k``/``xi`` of each of ``timesteps``."""
        lookup = {int(t): i for i, t in enumerate(self.timesteps)}
        return np.array([lookup[int(t)] for t in timesteps], np.int64)


def apply_pose_correction(roots: Float[Array, "B 4 4"], xi: Float[Array, "B 6"]) -> Float[Array, "B 4 4"]:
    """``P ∘ exp(ξ)``: a rigid correction (axis-angle ``ξ[:3]``, translation ``ξ[3:]``) in the head frame."""
    rot = rodrigues(xi[:, :3])
    delta = jnp.zeros(roots.shape, roots.dtype).at[:, :3, :3].set(rot).at[:, :3, 3].set(xi[:, 3:]).at[:, 3, 3].set(1.0)
    return roots @ delta


@functools.lru_cache(maxsize=8)
def _fit_step(width: int, height: int, capacity: int, backend: str, weights: tuple, pose: bool, lr: float):
    w_l1, w_dssim, w_prior = weights
    optimizer = optax.adam(lr)

    def loss_fn(params, model, rows, roots, viewmats, Ks, target, bg):
        k = params["k"][rows]
        if pose:
            roots = apply_pose_correction(roots, params["xi"][rows])
        out = render_batch(model, k, roots, viewmats, Ks, bg, width=width, height=height, capacity=capacity,
                           backend=backend)
        loss = (w_l1 * l1_loss(out.image, target) + w_dssim * dssim_loss(out.image, target)
                + w_prior * jnp.mean(jnp.sum(k * k, -1)))
        return loss, jnp.max(out.stats["overflow"])

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, model, rows, roots, viewmats, Ks, target, bg):
        (loss, overflow), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, model, rows, roots, viewmats,
                                                                             Ks, target, bg)
        if not pose:
            grads = {**grads, "xi": jnp.zeros_like(grads["xi"])}
        updates, new_opt = optimizer.update(grads, opt_state, params)
        new = optax.apply_updates(params, updates)
        new = {**new, "k": jnp.clip(new["k"], -COEFF_LIMIT, COEFF_LIMIT)}
        # Lazy Adam: only the timesteps in this batch move, and only their moments update; with
        # plain Adam the rows absent from the batch kept moving on stale momentum
        # (docs/decisions.md, "Lazy Adam in fitting").
        touched = jnp.zeros(params["k"].shape[0], bool).at[rows].set(True)

        def rowwise(new_leaf, old_leaf):
            if new_leaf.ndim == 0 or new_leaf.shape[0] != touched.shape[0]:
                return new_leaf
            return jnp.where(touched.reshape((-1,) + (1,) * (new_leaf.ndim - 1)), new_leaf, old_leaf)

        new = jax.tree.map(rowwise, new, params)
        new_opt = jax.tree.map(rowwise, new_opt, opt_state)
        ok = (overflow == 0) & jnp.isfinite(loss)  # a batch that overflowed is not an update
        return keep_if(ok, new, params), keep_if(ok, new_opt, opt_state), loss, overflow

    return optimizer, step


def fit_coefficients(model: GEM, images: ImageSet, roots: np.ndarray, fconfig, *, background=(1.0, 1.0, 1.0),
                     init: np.ndarray | None = None, seed: int = 0, backend: str = "auto",
                     progress: bool = True) -> FitResult:
    """Fit ``k`` (and ``ξ`` if ``fconfig.pose``) of every timestep of ``images`` (module docstring).

    Args:
      model: the GEM (its ``U`` is not changed).
      images: the image set to explain; each image's timestep selects its coefficients.
      roots: ``(max timestep + 1, 4, 4)`` root poses indexed by timestep.
      fconfig: ``config.fit`` (``steps, batch_size, lr, pose, prior, l1, dssim``).
      init: ``(T, ΣK)`` starting coefficients per unique timestep (zeros: the mean face).
    """
    from tqdm import tqdm

    timesteps = np.unique(images.timesteps)
    lookup = {int(t): i for i, t in enumerate(timesteps)}
    image_rows = np.array([lookup[int(t)] for t in images.timesteps], np.int32)
    ktot = model.total_components
    k0 = np.zeros((len(timesteps), ktot), np.float32) if init is None else np.asarray(init, np.float32)
    if k0.shape != (len(timesteps), ktot):
        raise ValueError(f"fit: init expected shape ({len(timesteps)}, {ktot}), got {k0.shape}")
    params = {"k": jnp.asarray(k0), "xi": jnp.zeros((len(timesteps), 6), jnp.float32)}
    batch = max(1, min(int(fconfig.batch_size), images.num))
    probe = np.linspace(0, images.num - 1, min(images.num, 8)).round().astype(int)
    capacity = frame_capacity(model, k0[image_rows[probe]], roots[images.timesteps[probe]],
                              images.viewmats[probe], images.Ks[probe], images.width, images.height, headroom=2.0)
    weights = (float(fconfig.l1), float(fconfig.dssim), float(fconfig.prior))
    pose, lr = bool(fconfig.pose), float(fconfig.lr)
    optimizer, step = _fit_step(images.width, images.height, capacity, backend, weights, pose, lr)
    opt_state = optimizer.init(params)
    bg = jnp.broadcast_to(jnp.asarray(background, jnp.float32), (batch, 3))
    losses = []
    steps = int(fconfig.steps)
    it = range(steps)
    if progress and jax.process_index() == 0:
        it = tqdm(it, desc="fit", unit="step", file=sys.stderr, mininterval=5.0)
    for i in it:
        pick = sample_rows(images.num, batch, (seed, 11, i))
        target = jnp.asarray(images.composite(pick, background))
        t = images.timesteps[pick]
        args = (model, jnp.asarray(image_rows[pick]), jnp.asarray(roots[t]), jnp.asarray(images.viewmats[pick]),
                jnp.asarray(images.Ks[pick]), target, bg)
        params, opt_state, loss, overflow = step(params, opt_state, *args)
        if int(overflow):  # the batch did not fit (and was not applied): larger capacity from now on
            capacity = round_capacity(int(capacity * 1.5) + 1)
            optimizer, step = _fit_step(images.width, images.height, capacity, backend, weights, pose, lr)
        losses.append(float(loss))
    return FitResult(timesteps=timesteps, k=np.asarray(params["k"]), xi=np.asarray(params["xi"]),
                     losses=np.asarray(losses, np.float32))
