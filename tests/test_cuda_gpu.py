"""The CUDA blending kernel on a GPU (marked ``gpu``: skipped without one; run on a GPU machine
with ``JAX_PLATFORMS=cuda,cpu``, as benchmarks/gpu_check.sh does).

Specification (docs/architecture.md §9): on the device, ``backend="cuda"`` gives the forward of
the emulated kernel bit for bit (one source, no FMA contraction, IEEE division) and the oracle's
within float32 tolerances; its gradients equal the emulated kernel's, the CPU kernel's and the
oracle's (atomics reorder sums: float32 tolerances); it works under jit, vmap and grad, through
``rasterize``, which ``"auto"`` routes to it; a 500k-Gaussian 1080p frame renders and
differentiates without NaN and without overflowing its tile lists.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blend_scenes import (
    SCENES,
    assert_grads_close,
    assert_rasterize_matches_reference,
    blend_grads,
    check_jit_vmap_and_grad,
    clear_scene,
    kernel_args,
    oracle64,
    oracle64_grads,
    random_cotangents,
)

from gem_jax.render import _ffi, reference

pytestmark = pytest.mark.gpu

NAMES = ("odd-size", "long-lists", "dense-opaque", "needles")


@pytest.fixture(autouse=True)
def _kernel_loaded():
    if not _ffi.HAS_CUDA_KERNEL:
        pytest.fail(f"a GPU is there, so the CUDA kernel must load: {_ffi.build_instructions('cuda')}")


def on(device, args):
    return tuple(jax.device_put(np.asarray(a), device) for a in args)


def scene(name, seed_offset=0):
    width, height, n, options = SCENES[name]
    rng = np.random.default_rng([seed_offset, abs(hash(name)) % 2**32])
    return [np.asarray(a) for a in kernel_args(*clear_scene(rng, width, height, n, **options))], width, height, rng


@pytest.mark.parametrize("name", NAMES)
def test_forward_equals_the_emulated_kernel_bit_for_bit(name):
    args, width, height, _ = scene(name)
    gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]
    got = [np.asarray(x) for x in _ffi._forward_call("cuda", width, height, *on(gpu, args))]
    emulated = [np.asarray(x) for x in _ffi._forward_call("cuda_emulated", width, height, *on(cpu, args))]
    assert got[1].max() > 0.1, "the scene must not be empty"
    for label, g, w in zip(("image", "alpha", "depth"), got, oracle64(args, width, height)):
        np.testing.assert_allclose(g, w, atol=1e-5 * (10.0 if label == "depth" else 1.0), err_msg=label)
    for label, g, e in zip(("image", "alpha", "depth", "transmittance", "last"), got, emulated):
        np.testing.assert_array_equal(g, e, err_msg=label)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_match_emulated_reference_and_oracle(name):
    args, width, height, rng = scene(name, seed_offset=7)
    cots = random_cotangents(rng, width, height)
    gpu, cpu = jax.devices("gpu")[0], jax.devices("cpu")[0]
    got = blend_grads(_ffi.blend_tiles_cuda, on(gpu, args), on(gpu, cots), width, height)
    assert all(np.abs(g).max() > 0 for g in got)
    assert_grads_close(got, blend_grads(_ffi.blend_tiles_cuda_emulated, on(cpu, args), on(cpu, cots), width, height))
    assert_grads_close(got, blend_grads(reference.blend_tiles, on(cpu, args), on(cpu, cots), width, height))
    assert_grads_close(got, oracle64_grads(args, cots, width, height))


def test_jit_vmap_and_grad_on_the_device():
    check_jit_vmap_and_grad(_ffi.blend_tiles_cuda, rtol=1e-4, atol=1e-5)


def test_rasterize_auto_uses_cuda_and_matches_reference():
    rasterize_module = importlib.import_module("gem_jax.render.rasterize")
    assert rasterize_module._resolve_backend("auto", jnp.float32) == "cuda"
    assert_rasterize_matches_reference("cuda")


def test_500k_gaussians_at_1080p_without_nan_or_overflow():
    """A head-sized cloud of 500k Gaussians filling most of a 1920x1080 frame: rendered with an
    exact capacity (eager), then jit(grad) of an image loss; all finite, nothing dropped."""
    from gem_jax.render import count_intersections, rasterize
    from gem_jax.types import Camera, Gaussians

    rng = np.random.default_rng()
    n, width, height = 500_000, 1920, 1080
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    quats = rng.normal(size=(n, 4))
    f32 = jnp.float32
    g = Gaussians(
        means=jnp.asarray(d * [0.09, 0.12, 0.10] * rng.uniform(0.9, 1.0, (n, 1)), f32),
        quats=jnp.asarray(quats / np.linalg.norm(quats, axis=-1, keepdims=True), f32),
        scales=jnp.asarray(np.exp(rng.normal(np.log(1e-3), 0.4, (n, 3))), f32),
        opacities=jnp.asarray(rng.uniform(0.05, 1.0, n), f32),
        colors=jnp.asarray(rng.uniform(0, 1, (n, 3)), f32),
    )
    viewmat = np.eye(4)
    viewmat[2, 3] = 0.45
    K = np.array([[2500.0, 0, width / 2], [0, 2500.0, height / 2], [0, 0, 1]])  # the head ~1000 px wide
    cam = Camera(jnp.asarray(viewmat, f32), jnp.asarray(K, f32), width, height)
    bg = jnp.ones(3, f32)
    out = rasterize(g, cam, bg, backend="cuda")
    assert int(out.stats["overflow"]) == 0
    assert 0 < int(out.stats["num_intersections"]) < 2**31 - 1
    for name in ("image", "alpha", "depth"):
        assert bool(jnp.isfinite(getattr(out, name)).all()), name
    assert float(jnp.mean(out.alpha > 0.5)) > 0.2, "the head must cover a good part of the frame"
    capacity = int(1.1 * count_intersections(g, cam))
    weights = jnp.asarray(rng.normal(size=(height, width, 3)), f32)

    @jax.jit
    def loss(g):
        o = rasterize(g, cam, bg, backend="cuda", capacity=capacity)
        return jnp.sum(o.image * weights) + jnp.sum(o.alpha)

    grads = jax.grad(loss)(g)
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(grads))
    assert float(jnp.abs(grads.means).max()) > 0
