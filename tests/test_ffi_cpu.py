"""The C++ CPU blending kernel (gem_jax/render/_ffi.py, kernels/) against a float64 oracle.

Specification (DESIGN §9, layer 3): for every pixel the kernel blends the Gaussians of its
tile front to back exactly as the oracle below does; its gradients are those of that rule;
it works under jit, vmap and grad; the corner cases of the rasterizer behave as specified.
The oracle (tests/blend_scenes.py) is a direct, vectorised transcription of the rule in
float64 jnp (autodiff gives its gradients); the kernel is also checked against
gem_jax.render.reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blend_scenes import (
    PIPELINE,
    SCENES,
    assert_grads_close,
    assert_rasterize_matches_reference,
    blend_grads,
    check_jit_vmap_and_grad,
    clear_scene,
    kernel_args,
    one_tile_args,
    oracle64,
    oracle64_grads,
    projected_args,
    random_cotangents,
    random_scene,
    require_kernel,
    tile_lists,
)

from gem_jax.render import _ffi


@pytest.fixture(autouse=True)
def _kernel_built():
    require_kernel("cpu")


def kernel_grads(args, cotangents, width, height):
    return blend_grads(_ffi.blend_tiles_cpu, args, cotangents, width, height)


# --- forward ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCENES)
def test_forward_matches_oracle(name):
    width, height, n, options = SCENES[name]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    scene = random_scene(rng, width, height, n, **options)
    args = kernel_args(scene, *tile_lists(scene, width, height))
    got = _ffi.blend_tiles_cpu(*args, width, height)
    want = oracle64(args, width, height)
    for label, g, w in zip(("image", "alpha", "depth"), got, want):
        assert g.shape == w.shape and g.dtype == jnp.float32, label
        scale = 1.0 if label != "depth" else 10.0  # depths are up to 10
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=1e-5 * scale, err_msg=label)


# --- through the real projection and tile lists ------------------------------------------


def _reference_blend():
    try:
        from gem_jax.render import reference
    except ImportError:
        pytest.skip("gem_jax.render.reference is not there yet")
    return reference.blend_tiles


@pytest.mark.parametrize("name", PIPELINE)
def test_forward_on_projected_scenes(name):
    """Oracle (always) and the pure-JAX reference (when present) agree with the kernel."""
    width, height, n, principal, capacity = PIPELINE[name]
    args = projected_args(11, width, height, n, principal, capacity)
    got = [np.asarray(x) for x in _ffi.blend_tiles_cpu(*args, width, height)]
    for label, g, w in zip(("image", "alpha", "depth"), got, oracle64(args, width, height)):
        np.testing.assert_allclose(g, w, atol=1e-5 * (5.0 if label == "depth" else 1.0), err_msg=label)
    reference = [np.asarray(x) for x in _reference_blend()(*args, width, height)]
    for label, g, w in zip(("image", "alpha", "depth"), got, reference):
        np.testing.assert_allclose(g, w, atol=1e-5 * (5.0 if label == "depth" else 1.0), err_msg=label)


@pytest.mark.parametrize("name", ["crowded"])
def test_gradients_match_the_reference(name):
    width, height, n, principal, capacity = PIPELINE[name]
    args = projected_args(12, width, height, n, principal, capacity)
    cots = random_cotangents(np.random.default_rng(13), width, height)
    got = kernel_grads(args, cots, width, height)
    assert_grads_close(got, oracle64_grads(args, cots, width, height))
    blend = _reference_blend()

    def loss(*floats):
        outs = blend(*floats, *args[6:], width, height)
        return sum(jnp.sum(o * c) for o, c in zip(outs, cots))

    assert_grads_close(got, [np.asarray(g) for g in jax.grad(loss, argnums=tuple(range(6)))(*args[:6])])


def test_rasterize_cpu_backend_matches_reference():
    """rasterize(backend="cpu") equals the reference backend (blend_scenes), and "auto" picks
    the kernel on CPU."""
    from gem_jax.render import available_backends

    assert available_backends()[0] == "cpu", "'auto' should prefer the CPU kernel on CPU"
    assert_rasterize_matches_reference("cpu")


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["long-lists", "dense-opaque", "needles"])
def test_gradients_match_oracle(name):
    width, height, n, options = SCENES[name]
    rng = np.random.default_rng(7 + abs(hash(name)) % 2**32)
    args = kernel_args(*clear_scene(rng, width, height, n, **options))  # no pair at a threshold
    cots = random_cotangents(rng, width, height)
    assert_grads_close(kernel_grads(args, cots, width, height), oracle64_grads(args, cots, width, height))


def test_backward_is_deterministic():
    width, height = 40, 40
    rng = np.random.default_rng(3)
    scene = random_scene(rng, width, height, 150)
    args = kernel_args(scene, *tile_lists(scene, width, height))
    cots = random_cotangents(rng, width, height)
    first = kernel_grads(args, cots, width, height)
    second = kernel_grads(args, cots, width, height)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_integer_inputs_get_no_gradient():
    width, height = 16, 16
    scene = random_scene(np.random.default_rng(4), width, height, 5)
    args = kernel_args(scene, *tile_lists(scene, width, height))
    _, vjp = jax.vjp(lambda *a: _ffi.blend_tiles_cpu(*a, width, height), *args)
    grads = vjp(tuple(jnp.ones_like(o) for o in _ffi.blend_tiles_cpu(*args, width, height)))
    assert all(g.dtype == jax.dtypes.float0 for g in grads[6:])


# --- jit, vmap, grad --------------------------------------------------------------------


def test_jit_vmap_and_grad_through_the_kernel():
    check_jit_vmap_and_grad(_ffi.blend_tiles_cpu)


# --- corner cases -----------------------------------------------------------------------


def test_empty_scene_is_background():
    bg = np.array([0.2, 0.5, 0.7], np.float32)
    args = one_tile_args(np.zeros((0, 2)), np.zeros((0, 3)), np.zeros((0, 3)), [], [], bg, 40, 20)
    image, alpha, depth = _ffi.blend_tiles_cpu(*args, 40, 20)
    np.testing.assert_array_equal(np.asarray(image), np.broadcast_to(bg, (20, 40, 3)))
    assert not np.asarray(alpha).any() and not np.asarray(depth).any()


def test_one_gaussian_is_colour_times_alpha_plus_background():
    mean, conic, color, o, z = [7.3, 8.9], [0.3, 0.05, 0.2], [0.9, 0.4, 0.1], 0.7, 3.0
    bg = np.array([0.1, 0.2, 0.3], np.float32)
    image, alpha, depth = _ffi.blend_tiles_cpu(*one_tile_args([mean], [conic], [color], [o], [z], bg), 16, 16)
    jj, ii = np.meshgrid(np.arange(16) + 0.5, np.arange(16) + 0.5)
    dx, dy = mean[0] - jj, mean[1] - ii
    a = o * np.exp(-(0.5 * (conic[0] * dx**2 + conic[2] * dy**2) + conic[1] * dx * dy))
    a = np.where(a >= 1 / 255, a, 0.0)
    np.testing.assert_allclose(np.asarray(image), a[..., None] * color + (1 - a[..., None]) * bg, atol=1e-6)
    np.testing.assert_allclose(np.asarray(alpha), a, atol=1e-6)
    np.testing.assert_allclose(np.asarray(depth), a * z, atol=1e-5)


def test_opacity_one_is_clamped_to_099():
    args = one_tile_args([[8.5, 8.5]], [[1.0, 0.0, 1.0]], [[1, 1, 1]], [1.0], [2.0], [0, 0, 0])
    _, alpha, _ = _ffi.blend_tiles_cpu(*args, 16, 16)
    assert float(alpha[8, 8]) == pytest.approx(0.99, abs=1e-7)  # the pixel at the centre
    grads = jax.grad(lambda o: _ffi.blend_tiles_cpu(*args[:3], o, *args[4:], 16, 16)[1][8, 8])(args[3])
    assert float(grads[0]) == 0.0  # min(0.99, .) is flat there


def test_three_stacked_opaque_gaussians_stop_after_two():
    """alpha 0.98 each: T goes 1 -> 0.02 -> 4e-4, the third would take it to 8e-6 < 1e-4."""
    colors = np.eye(3)
    args = one_tile_args([[8.5, 8.5]] * 3, [[1.0, 0.0, 1.0]] * 3, colors, [0.98] * 3, [1, 2, 3], [0, 0, 0])
    image, alpha, depth = _ffi.blend_tiles_cpu(*args, 16, 16)
    np.testing.assert_allclose(np.asarray(image[8, 8]), [0.98, 0.02 * 0.98, 0.0], rtol=1e-5)
    np.testing.assert_allclose(float(alpha[8, 8]), 1 - 0.02 * 0.02, rtol=1e-6)
    np.testing.assert_allclose(float(depth[8, 8]), 0.98 * 1 + 0.02 * 0.98 * 2, rtol=1e-5)
    # The third Gaussian is excluded, so nothing of its parameters reaches that pixel.
    def pixel_sum(colors):
        return _ffi.blend_tiles_cpu(*args[:2], colors, *args[3:], 16, 16)[0][8, 8].sum()

    v_colors = jax.grad(pixel_sum)(args[2])
    assert not np.asarray(v_colors[2]).any()


def test_a_gaussian_covering_all_tiles():
    width, height = 70, 50
    mean, conic, color, o = [35.0, 25.0], [2e-3, 1e-4, 3e-3], [0.3, 0.6, 0.9], 0.8
    args = one_tile_args([mean], [conic], [color], [o], [4.0], [1, 1, 1], width, height)
    _, alpha, _ = _ffi.blend_tiles_cpu(*args, width, height)
    jj, ii = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    dx, dy = mean[0] - jj, mean[1] - ii
    want = o * np.exp(-(0.5 * (conic[0] * dx**2 + conic[2] * dy**2) + conic[1] * dx * dy))
    np.testing.assert_allclose(np.asarray(alpha), np.where(want >= 1 / 255, want, 0), atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(
    "field,index", [("means2d", (3, 0)), ("conics", (5, 1)), ("conics", (5, 0)), ("opacities", (7,))]
)
def test_non_finite_gaussians_are_skipped(field, index, bad):
    """A Gaussian with a NaN/Inf mean or conic (or NaN/-Inf opacity) left in the tile lists
    contributes nothing: the result equals that of the lists without it. (Projection culls
    such Gaussians before they reach the lists; this is the kernel's own guard.)"""
    if field == "opacities" and bad == np.inf:
        pytest.skip("an infinite opacity is a valid, clamped alpha of 0.99")
    width, height = 32, 32
    scene = random_scene(np.random.default_rng(6), width, height, 30)
    ids, ranges = tile_lists(scene, width, height)
    g = index[0]
    scene[field][index] = bad
    without = {k: v.copy() for k, v in scene.items()}
    without["opacities"][g] = 0.0  # the same lists, but this Gaussian transparent
    got = _ffi.blend_tiles_cpu(*kernel_args(scene, ids, ranges), width, height)
    want = _ffi.blend_tiles_cpu(*kernel_args(without, ids, ranges), width, height)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- errors ---------------------------------------------------------------------------


def test_bad_shapes_name_the_field():
    args = list(one_tile_args([[1, 1]], [[1, 0, 1]], [[1, 1, 1]], [0.5], [1.0], [0, 0, 0]))
    args[1] = args[1][:, :2]
    with pytest.raises(ValueError, match="conics"):
        _ffi.blend_tiles_cpu(*args, 16, 16)
    args = list(one_tile_args([[1, 1]], [[1, 0, 1]], [[1, 1, 1]], [0.5], [1.0], [0, 0, 0]))
    with pytest.raises(ValueError, match="tile_ranges"):
        _ffi.blend_tiles_cpu(*args, 40, 16)


def test_missing_backend_says_how_to_build(monkeypatch):
    monkeypatch.setitem(_ffi._PROBLEMS, "cuda", "no cuda blending library in /nowhere")
    with pytest.raises(_ffi.KernelNotBuiltError, match="pip install"):
        _ffi.require_kernel("cuda")
