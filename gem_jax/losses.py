"""Photometric losses and regularisers of the teacher (docs/architecture.md §5; GEM §3.1).

The teacher's objective per image (weights from ``config.teacher.loss``; the defaults are the
ones the issue specifies) is

    L = λ₁ · L1_mouth + λ₂ · D-SSIM + λ_vgg · LPIPS-VGG + λ_Δ · |Δpos|² + λ_s · |scale|²
      = 0.4 · L1_mouth + 0.8 · D-SSIM + λ_vgg · LPIPS + 750 · |Δpos|² + 20 · |scale|²

* ``L1_mouth = mean_{pixels, channels}(w · |Î − I|)`` with ``w = 150`` on pixels of the mouth
  interior and ``1`` elsewhere (not renormalised, so the mouth adds weight; see
  :func:`mouth_weights`);
* ``D-SSIM = 1 − SSIM`` (3DGS's convention, Kerbl et al. 2023, eq. 7), SSIM as in
  :mod:`gem_jax.metrics` (11×11 Gaussian window, σ = 1.5);
* ``LPIPS-VGG`` — the perceptual term (:mod:`gem_jax.perceptual`), pretrained weights;
* ``|Δpos|²`` — the mean over Gaussians of the squared length of the position offset Δ (scene
  units, metres for FLAME), keeping Gaussians near the tracked surface;
* ``|scale|²`` — the mean over Gaussians of the squared norm of the *activated* scales (scene
  units), discouraging large blurry splats.

Each term is a plain function of arrays (tested against NumPy references in
``tests/test_losses.py``); :func:`teacher_loss` combines them and returns the terms for logging.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from gem_jax.metrics import ssim

__all__ = ["dssim_loss", "l1_loss", "mouth_weights", "offset_regulariser", "scale_regulariser", "teacher_loss"]


def mouth_weights(mouth_mask: Float[Array, "*b H W"], mouth_weight: float) -> Float[Array, "*b H W"]:
    """Per-pixel L1 weights: ``mouth_weight`` inside the mouth interior, 1 elsewhere.

    ``mouth_mask`` is in ``[0, 1]`` (fractional at anti-aliased edges: weights interpolate).
    """
    return 1.0 + (mouth_weight - 1.0) * mouth_mask


def l1_loss(pred: Float[Array, "*b H W 3"], target: Float[Array, "*b H W 3"],
            weights: Float[Array, "*b H W"] | None = None) -> Float[Array, ""]:
    """``mean(w · |pred − target|)`` over every pixel, channel and image (``w = 1`` if None)."""
    diff = jnp.abs(pred - target)
    if weights is not None:
        diff = diff * weights[..., None]
    return jnp.mean(diff)


def dssim_loss(pred: Float[Array, "*b H W 3"], target: Float[Array, "*b H W 3"]) -> Float[Array, ""]:
    """``1 − SSIM``, averaged over images."""
    return 1.0 - jnp.mean(ssim(pred, target))


def offset_regulariser(delta: Float[Array, "*b N 3"]) -> Float[Array, ""]:
    """Mean over Gaussians (and frames) of ``|Δ|²``."""
    return jnp.mean(jnp.sum(delta * delta, axis=-1))


def scale_regulariser(scales: Float[Array, "*b N 3"]) -> Float[Array, ""]:
    """Mean over Gaussians (and frames) of ``|s|²`` (activated scales)."""
    return jnp.mean(jnp.sum(scales * scales, axis=-1))


def teacher_loss(pred: Float[Array, "B H W 3"], target: Float[Array, "B H W 3"],
                 mouth_mask: Float[Array, "B H W"] | None, delta: Float[Array, "B N 3"],
                 scales: Float[Array, "B N 3"], weights, perceptual=None) -> tuple[Array, dict[str, Array]]:
    """The weighted teacher objective (module docstring) and its terms.

    ``weights`` has fields ``l1, mouth, dssim, vgg, offset, scale`` (``config.teacher.loss``);
    ``perceptual(pred, target) -> (B,)`` is called only when ``weights.vgg > 0``; a missing
    ``mouth_mask`` means no mouth weighting.
    """
    w_pix = None if mouth_mask is None else mouth_weights(mouth_mask, float(weights.mouth))
    terms = {
        "l1": l1_loss(pred, target, w_pix),
        "dssim": dssim_loss(pred, target),
        "offset": offset_regulariser(delta),
        "scale": scale_regulariser(scales),
    }
    total = (float(weights.l1) * terms["l1"] + float(weights.dssim) * terms["dssim"]
             + float(weights.offset) * terms["offset"] + float(weights.scale) * terms["scale"])
    if float(weights.vgg) > 0:
        if perceptual is None:
            raise ValueError("teacher_loss: loss.vgg > 0 needs a perceptual function (gem_jax.perceptual)")
        terms["vgg"] = jnp.mean(perceptual(pred, target))
        total = total + float(weights.vgg) * terms["vgg"]
    return total, terms
