"""Specification of gem_jax.teacher.unet: modulated convolutions and the two-branch generator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gem_jax.teacher.unet import ModulatedConv, StyleUNet, TeacherNet


def conv_same_numpy(x, w):
    """'SAME' 2-D convolution (cross-correlation) of x (H,W,C) with w (k,k,C,F), by loops."""
    k = w.shape[0]
    pad = k // 2
    xp = np.pad(x, ((pad, pad), (pad, pad), (0, 0)))
    h, wd = x.shape[:2]
    out = np.zeros((h, wd, w.shape[-1]))
    for i in range(h):
        for j in range(wd):
            out[i, j] = np.einsum("abc,abcf->f", xp[i:i + k, j:j + k], w)
    return out


def test_modulated_conv_matches_stylegan2_per_sample_weights():
    """Karras et al. 2020 eqs. 1–3: w' = s·w, w'' = w' / sqrt(Σ w'² + ε), then a plain conv."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
    style = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    layer = ModulatedConv(features=5)
    params = layer.init(jax.random.key(0), x, style)
    # Non-trivial affine map and bias.
    params = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    y = np.asarray(layer.apply(params, x, style))
    p = jax.tree.map(np.asarray, params["params"])
    for b in range(2):
        s = style[b] @ p["affine"]["kernel"] + p["affine"]["bias"]  # (C,)
        w1 = p["kernel"] * np.asarray(s)[None, None, :, None]
        w2 = w1 / np.sqrt((w1**2).sum(axis=(0, 1, 2), keepdims=True) + 1e-8)
        ref = conv_same_numpy(np.asarray(x[b]), w2) + p["bias"]
        np.testing.assert_allclose(y[b], ref, rtol=1e-4, atol=1e-4)


def test_modulated_conv_gradients_match_finite_differences():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((1, 4, 4, 2)), jnp.float32)
    style = jnp.asarray(rng.standard_normal((1, 3)), jnp.float32)
    layer = ModulatedConv(features=2)
    params = layer.init(jax.random.key(1), x, style)
    check_grads(lambda x, s: jnp.sum(jnp.sin(layer.apply(params, x, s))), (x, style), order=1,
                modes=["rev"], atol=2e-2, rtol=2e-2, eps=1e-2)


def test_style_unet_shapes_zero_init_output_and_style_dependence():
    rng = np.random.default_rng(2)
    net = StyleUNet(channels=(8, 12, 16), out_channels=11, style_dim=6)
    x = jnp.asarray(rng.standard_normal((3, 16, 16, 5)), jnp.float32)
    z = jnp.asarray(rng.standard_normal((3, 6)), jnp.float32)
    init, apply = jax.jit(net.init), jax.jit(net.apply)  # one compilation each, not op by op
    params = init(jax.random.key(0), x, z)
    out = apply(params, x, z)
    assert out.shape == (3, 16, 16, 11)
    np.testing.assert_array_equal(out, 0.0)  # the output layer starts at zero
    # With a trained (non-zero) output layer, the output depends on the style and the input.
    params = jax.tree_util.tree_map_with_path(
        lambda path, p: p + 0.1 * jnp.asarray(rng.standard_normal(p.shape), p.dtype)
        if "to_out" in jax.tree_util.keystr(path) else p, params)
    a = apply(params, x, z)
    assert float(jnp.abs(a - apply(params, x, z + 1.0)).max()) > 1e-3
    assert float(jnp.abs(a - apply(params, x + 1.0, z)).max()) > 1e-3
    np.testing.assert_array_equal(a, apply(params, x, z))  # deterministic


def test_style_unet_rejects_sizes_it_cannot_halve():
    net = StyleUNet(channels=(4, 4, 4), out_channels=1, style_dim=2)
    with pytest.raises(ValueError, match="divisible by 4"):
        net.init(jax.random.key(0), jnp.zeros((1, 10, 10, 3)), jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="style must have shape"):
        net.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), jnp.zeros((1, 5)))


def test_teacher_net_colour_depends_on_the_canonical_map_only():
    rng = np.random.default_rng(3)
    net = TeacherNet(resolution=16, channels=(8, 8), color_channels=(8, 8), feature_channels=4, style_dim=4)
    pose = jnp.asarray(rng.standard_normal((2, 16, 16, 6)), jnp.float32)
    style = jnp.asarray(rng.standard_normal((2, 4)), jnp.float32)
    canon = jnp.asarray(rng.standard_normal((16, 16, 3)), jnp.float32)
    init, apply = jax.jit(net.init), jax.jit(net.apply)
    params = init(jax.random.key(0), pose, style, canon)
    params = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    geo, col = apply(params, pose, style, canon)
    assert geo.shape == (2, 16, 16, 11) and col.shape == (16, 16, 3)
    _, col2 = apply(params, pose * 3 + 1, style - 2, canon)
    np.testing.assert_array_equal(col, col2)
    _, col3 = apply(params, pose, style, canon + 0.5)
    assert float(jnp.abs(col3 - col).max()) > 1e-4
    # The geometry branch depends on the pose maps and sees the learned feature map.
    geo2, _ = apply(params, pose + 0.5, style, canon)
    assert float(jnp.abs(geo2 - geo).max()) > 1e-4
    grads = jax.jit(jax.grad(lambda p: jnp.sum(net.apply(p, pose, style, canon)[0] ** 2)))(params)
    assert float(jnp.abs(grads["params"]["geometry_features"]).max()) > 0
