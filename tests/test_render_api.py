"""The public ``rasterize`` (gem_jax/render/rasterize.py): gradients, capacity, backends, batching.

Specification (docs/architecture.md §9): gradients through the whole rasterizer pass ``check_grads`` in
float64 for means, quats, scales, opacities, colors, background and the camera pose, and the
tile path's float32 gradients equal the dense oracle's; the intersection capacity is exact
when left to ``rasterize`` on concrete inputs, an explicit capacity that overflows is an error
eagerly and a reported count plus a warning under ``jit``, never a silent drop (for the
reference and the C++ CPU backend alike); unknown or
unbuilt backends fail with a message saying how to build them, ``auto`` falls back to the
reference path; a batched Camera, ``jax.vmap`` and ``jax.jit`` give the per-camera results.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_render_grads import assert_grads_close, check_all_inputs, lists_for, threshold_margin
from test_render_oracle import random_camera, random_gaussians

from gem_jax.render import (
    BackendUnavailableError,
    CapacityOverflowError,
    available_backends,
    count_intersections,
    rasterize,
    round_capacity,
)
from gem_jax.render.project import project_gaussians
from gem_jax.types import Camera, Gaussians, stack_cameras

# the package re-exports the function `rasterize`, which shadows the module attribute
rasterize_module = importlib.import_module("gem_jax.render.rasterize")


def scene3d(dtype, n=12, width=32, height=32, seed=31):
    """Large, faint Gaussians in front of the camera: every pair far from the thresholds."""
    rng = np.random.default_rng(seed)
    viewmat, K = random_camera(rng, width, height, principal=(0.45, 0.55))
    cam_pts = np.stack([rng.uniform(-0.3, 0.3, n), rng.uniform(-0.3, 0.3, n), rng.uniform(2.5, 4.0, n)], -1)
    means = (cam_pts - viewmat[:3, 3]) @ viewmat[:3, :3]  # world = Rᵀ(x_cam − t)
    quats = rng.normal(size=(n, 4))
    quats /= np.linalg.norm(quats, axis=-1, keepdims=True)
    g = Gaussians(
        means=means, quats=quats, scales=rng.uniform(2.5, 4.0, (n, 3)),
        opacities=rng.uniform(0.05, 0.15, n), colors=rng.uniform(0, 1, (n, 3)),
    )  # fmt: skip
    g = jax.tree.map(lambda x: jnp.asarray(x, dtype), g)
    cam = Camera(viewmat=jnp.asarray(viewmat, dtype), K=jnp.asarray(K, dtype), width=width, height=height)
    return g, cam, jnp.asarray(rng.uniform(0, 1, 3), dtype)


def generic_scene(seed=7, n=60, width=40, height=30):
    rng = np.random.default_rng(seed)
    viewmat, K = random_camera(rng, width, height)
    g = Gaussians(*(jnp.asarray(np.asarray(x, np.float32)) for x in random_gaussians(rng, n, viewmat)))
    cam = Camera(viewmat=jnp.asarray(viewmat, jnp.float32), K=jnp.asarray(K, jnp.float32), width=width, height=height)
    return g, cam, jnp.asarray(rng.uniform(0, 1, 3), jnp.float32)


# --- gradients --------------------------------------------------------------------------------


def test_check_grads_float64_rasterize_every_input():
    with jax.enable_x64(True):
        g, cam, bg = scene3d(jnp.float64)
        p = jax.jit(project_gaussians)(g, cam)
        args2d = [p.means2d, p.conics, p.colors, p.opacities, p.depths, bg]
        ids, ranges = lists_for(args2d, p.radii, 32, 32)
        assert int(ranges[-1, 1]) == 12 * 4  # every Gaussian in every tile: no tile-set changes
        assert threshold_margin(args2d, ids, ranges, 32, 32) > 1e-3

        def render(means, quats, scales, opacities, colors, background, viewmat):
            g2 = Gaussians(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors)
            o = rasterize(g2, cam.replace(viewmat=viewmat), background, backend="reference", capacity=64)
            return o.image, o.alpha, o.depth

        args = [g.means, g.quats, g.scales, g.opacities, g.colors, bg, cam.viewmat]
        check_all_inputs(render, args, ("means", "quats", "scales", "opacities", "colors", "background", "viewmat"))


def test_float32_rasterize_gradients_reference_equal_dense():
    g, cam, bg = generic_scene()

    def loss(backend):
        def f(g, bg):
            o = rasterize(g, cam, bg, backend=backend, capacity=1024)
            return jnp.sum(o.image * jnp.array([1.0, -0.5, 0.25])) + jnp.sum(o.alpha**2) + 0.1 * jnp.sum(o.depth)

        return jax.jit(jax.grad(f, argnums=(0, 1)))

    ref, dense = loss("reference")(g, bg), loss("dense")(g, bg)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ref))
    assert np.abs(np.asarray(ref[0].means)).max() > 1e-2
    names = ("means", "quats", "scales", "opacities", "colors", "background")
    assert_grads_close(jax.tree.leaves(ref), jax.tree.leaves(dense), names)


# --- capacity ---------------------------------------------------------------------------------


# the capacity contract holds for every backend with tile lists
LIST_BACKENDS = [
    "reference",
    pytest.param("cpu", marks=pytest.mark.skipif("cpu" not in available_backends(), reason="C++ CPU kernel not built")),
]


@pytest.mark.parametrize("backend", LIST_BACKENDS)
def test_capacity_none_is_exact_on_concrete_inputs(backend):
    g, cam, bg = generic_scene()
    total = count_intersections(g, cam, backend=backend)
    assert total > 100
    out = rasterize(g, cam, bg, backend=backend)
    assert int(out.stats["num_intersections"]) == total and int(out.stats["overflow"]) == 0
    # and under eager jax.grad too (the count is taken from the primal values)
    v = jax.grad(lambda o: rasterize(g.replace(opacities=o), cam, bg, backend=backend).alpha.sum())(g.opacities)
    assert np.isfinite(np.asarray(v)).all() and np.abs(np.asarray(v)).max() > 0


def test_round_capacity():
    for n in (0, 1, 255, 256, 257, 1000, 4097, 123457):
        c = round_capacity(n)
        assert c >= max(n, 256) and c <= max(256, 1.125 * n + 1)
    assert len({round_capacity(n) for n in range(1000, 2000)}) <= 9  # few static shapes


@pytest.mark.parametrize("backend", LIST_BACKENDS)
def test_explicit_capacity_overflow_is_an_error_eagerly(backend):
    g, cam, bg = generic_scene()
    total = count_intersections(g, cam, backend=backend)
    with pytest.raises(CapacityOverflowError, match=f"{total} tile intersections exceed capacity=100"):
        rasterize(g, cam, bg, backend=backend, capacity=100)


@pytest.mark.parametrize("backend", LIST_BACKENDS)
def test_overflow_under_jit_is_reported_and_warned(backend):
    g, cam, bg = generic_scene()
    total = count_intersections(g, cam, backend=backend)
    render = jax.jit(lambda g: rasterize(g, cam, bg, backend=backend, capacity=100).stats)
    with pytest.warns(RuntimeWarning, match="dropped"):
        stats = jax.block_until_ready(render(g))
        jax.effects_barrier()
    assert int(stats["overflow"]) == total - 100 and int(stats["num_intersections"]) == total


def test_capacity_none_under_jit_asks_for_a_capacity():
    g, cam, bg = generic_scene()
    with pytest.raises(ValueError, match="capacity"):
        jax.jit(lambda g: rasterize(g, cam, bg).image)(g)


# --- backends -------------------------------------------------------------------------------


def test_backend_registry_and_errors(monkeypatch):
    assert {"reference", "dense"} <= set(available_backends())
    g, cam, bg = generic_scene(n=5)
    with pytest.raises(ValueError, match="backend must be"):
        rasterize(g, cam, bg, backend="opengl")
    monkeypatch.setattr(rasterize_module, "_ffi_module", lambda: (None, "no kernels in this test"))
    assert available_backends() == ["reference", "dense"]
    for kind in ("cpu", "cuda"):
        with pytest.raises(BackendUnavailableError, match="pip install"):
            rasterize(g, cam, bg, backend=kind)
    assert rasterize_module._resolve_backend("auto", jnp.float32) == "reference"


def test_auto_uses_reference_for_float64():
    assert rasterize_module._resolve_backend("auto", jnp.float64) == "reference"


@pytest.mark.skipif("cpu" not in available_backends(), reason="C++ CPU kernel not built")
def test_cpu_kernel_plugs_in():
    g, cam, bg = generic_scene()
    ref = rasterize(g, cam, bg, backend="reference")
    cpu = rasterize(g, cam, bg, backend="cpu")
    for a, b in zip((cpu.image, cpu.alpha, cpu.depth), (ref.image, ref.alpha, ref.depth)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


# --- batching and jit -------------------------------------------------------------------------


def test_batched_camera_vmap_and_jit_give_per_camera_results():
    rng = np.random.default_rng(9)
    g, cam0, bg = generic_scene()
    cams = [cam0]
    for _ in range(2):
        viewmat, K = random_camera(rng, cam0.width, cam0.height, principal=(0.4, 0.6))
        cams.append(Camera(jnp.asarray(viewmat, jnp.float32), jnp.asarray(K, jnp.float32), cam0.width, cam0.height))
    batch = stack_cameras(cams)
    bgs = jnp.asarray(rng.uniform(0, 1, (3, 3)), jnp.float32)
    singles = [rasterize(g, c, b, backend="reference") for c, b in zip(cams, bgs)]
    batched = rasterize(g, batch, bgs, backend="reference")  # capacity from the busiest camera
    capacity = max(count_intersections(g, c, backend="reference") for c in cams)
    vmapped = jax.jit(jax.vmap(lambda c, b: rasterize(g, c, b, backend="reference", capacity=capacity)))(batch, bgs)
    assert batched.image.shape == (3, cam0.height, cam0.width, 3)
    for i, s in enumerate(singles):
        assert np.asarray(s.alpha).max() > 0.2
        for out in (batched, vmapped):
            np.testing.assert_allclose(np.asarray(out.image[i]), np.asarray(s.image), atol=1e-6)
            np.testing.assert_allclose(np.asarray(out.depth[i]), np.asarray(s.depth), atol=1e-5)
            assert int(out.stats["num_intersections"][i]) == int(s.stats["num_intersections"])
    # gradients through the batch: the sum of the per-camera gradients
    def loss(g, cam, bg):
        return jnp.sum(rasterize(g, cam, bg, backend="reference", capacity=capacity).image)

    grad = jax.jit(jax.grad(loss))
    v_batch = grad(g, batch, bgs[0])
    v_sum = sum(np.asarray(grad(g, c, bgs[0]).means) for c in cams)
    np.testing.assert_allclose(np.asarray(v_batch.means), v_sum, rtol=1e-4, atol=1e-4)


def test_bad_shapes_name_the_field():
    g, cam, bg = generic_scene(n=5)
    with pytest.raises(ValueError, match="quats"):
        rasterize(g.replace(quats=g.quats[:, :3]), cam, bg)
    with pytest.raises(ValueError, match="background"):
        rasterize(g, cam, bg[:2])
