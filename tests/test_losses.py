"""Specification of gem_jax.losses: every teacher loss term against a NumPy reference."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.ndimage import gaussian_filter

from gem_jax import losses


def batch(seed, b=2, h=20, w=18):
    rng = np.random.default_rng(seed)
    pred = gaussian_filter(rng.uniform(size=(b, h, w, 3)), sigma=(0, 1, 1, 0)).astype(np.float32)
    target = np.clip(pred + 0.15 * rng.standard_normal(pred.shape), 0, 1).astype(np.float32)
    mouth = (rng.uniform(size=(b, h, w)) < 0.1).astype(np.float32)
    return pred, target, mouth


def ssim_numpy(x, y):
    f = lambda a: gaussian_filter(a, sigma=1.5, truncate=3.5)  # noqa: E731
    vals = []
    for c in range(3):
        a, b = x[..., c].astype(np.float64), y[..., c].astype(np.float64)
        mx, my = f(a), f(b)
        vx, vy, cxy = f(a * a) - mx**2, f(b * b) - my**2, f(a * b) - mx * my
        s = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4))
        vals.append(s[5:-5, 5:-5])
    return np.mean(vals)


WEIGHTS = ml_collections.ConfigDict(dict(l1=0.4, mouth=150.0, dssim=0.8, vgg=0.0, offset=750.0, scale=20.0))


def test_mouth_weights_are_150_inside_and_1_outside():
    mask = jnp.array([[0.0, 1.0, 0.5]])
    np.testing.assert_allclose(losses.mouth_weights(mask, 150.0), [[1.0, 150.0, 75.5]])


def test_l1_with_mouth_weights_matches_numpy():
    pred, target, mouth = batch(0)
    w = 1 + 149 * mouth
    ref = np.mean(w[..., None] * np.abs(pred - target))
    got = losses.l1_loss(jnp.asarray(pred), jnp.asarray(target), losses.mouth_weights(jnp.asarray(mouth), 150.0))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(losses.l1_loss(jnp.asarray(pred), jnp.asarray(target)),
                               np.mean(np.abs(pred - target)), rtol=1e-5)


def test_dssim_is_one_minus_ssim():
    pred, target, _ = batch(1)
    ref = 1 - np.mean([ssim_numpy(pred[i], target[i]) for i in range(len(pred))])
    np.testing.assert_allclose(losses.dssim_loss(jnp.asarray(pred), jnp.asarray(target)), ref, atol=1e-5)
    np.testing.assert_allclose(losses.dssim_loss(jnp.asarray(pred), jnp.asarray(pred)), 0.0, atol=1e-6)


def test_regularisers_are_mean_squared_norms():
    rng = np.random.default_rng(2)
    delta = rng.standard_normal((2, 50, 3)).astype(np.float32) * 0.01
    scales = rng.uniform(1e-3, 1e-2, (2, 50, 3)).astype(np.float32)
    np.testing.assert_allclose(losses.offset_regulariser(jnp.asarray(delta)), np.mean((delta**2).sum(-1)), rtol=1e-5)
    np.testing.assert_allclose(losses.scale_regulariser(jnp.asarray(scales)), np.mean((scales**2).sum(-1)), rtol=1e-5)


def test_teacher_loss_is_the_weighted_sum_of_its_terms():
    pred, target, mouth = batch(3)
    rng = np.random.default_rng(3)
    delta = 0.01 * rng.standard_normal((2, 40, 3)).astype(np.float32)
    scales = rng.uniform(1e-3, 1e-2, (2, 40, 3)).astype(np.float32)
    total, terms = losses.teacher_loss(jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mouth),
                                       jnp.asarray(delta), jnp.asarray(scales), WEIGHTS)
    ref_terms = {
        "l1": np.mean((1 + 149 * mouth)[..., None] * np.abs(pred - target)),
        "dssim": 1 - np.mean([ssim_numpy(pred[i], target[i]) for i in range(2)]),
        "offset": np.mean((delta**2).sum(-1)),
        "scale": np.mean((scales**2).sum(-1)),
    }
    for k, v in ref_terms.items():
        np.testing.assert_allclose(terms[k], v, rtol=1e-4, atol=1e-6)
    ref = 0.4 * ref_terms["l1"] + 0.8 * ref_terms["dssim"] + 750 * ref_terms["offset"] + 20 * ref_terms["scale"]
    np.testing.assert_allclose(total, ref, rtol=1e-4)
    # Without a mouth mask there is no mouth weighting.
    _, plain = losses.teacher_loss(jnp.asarray(pred), jnp.asarray(target), None, jnp.asarray(delta),
                                   jnp.asarray(scales), WEIGHTS)
    np.testing.assert_allclose(plain["l1"], np.mean(np.abs(pred - target)), rtol=1e-5)


def test_perceptual_term_is_added_when_its_weight_is_positive():
    pred, target, mouth = batch(4)
    w = WEIGHTS.copy_and_resolve_references()
    w.vgg = 0.5
    args = (jnp.asarray(pred), jnp.asarray(target), jnp.asarray(mouth), jnp.zeros((2, 4, 3)), jnp.zeros((2, 4, 3)))
    with pytest.raises(ValueError, match="perceptual"):
        losses.teacher_loss(*args, w)
    fake = lambda p, t: jnp.mean(jnp.abs(p - t), axis=(1, 2, 3)) * 10  # noqa: E731 — any (B,) distance
    total, terms = losses.teacher_loss(*args, w, perceptual=fake)
    base, _ = losses.teacher_loss(*args, WEIGHTS)
    np.testing.assert_allclose(terms["vgg"], 10 * np.mean(np.abs(pred - target)), rtol=1e-5)
    np.testing.assert_allclose(total, base + 0.5 * terms["vgg"], rtol=1e-5)


def test_photometric_terms_have_correct_gradients():
    pred, target, mouth = batch(5, b=1, h=14, w=13)
    weights = losses.mouth_weights(jnp.asarray(mouth), 150.0)
    # Away from |x| = 0 kinks, finite differences agree with autodiff.
    check_grads(lambda p: losses.l1_loss(p, jnp.asarray(target), weights), (jnp.asarray(pred),), order=1,
                modes=["rev"], atol=1e-2, rtol=1e-2, eps=1e-3)
    check_grads(lambda p: losses.dssim_loss(p, jnp.asarray(target)), (jnp.asarray(pred),), order=1,
                modes=["rev"], atol=1e-2, rtol=2e-2, eps=1e-3)
    g = jax.grad(losses.l1_loss)(jnp.asarray(pred), jnp.asarray(target), weights)
    ref = np.sign(pred - target) * (1 + 149 * mouth)[..., None] / pred.size
    np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-9)
