"""The CUDA blending kernel (kernels/blend_cuda.cu) run on the CPU by the SIMT emulator.

Specification (docs/architecture.md §9): ``backend="cuda-emulated"`` is the CUDA kernel's own
source, compiled against kernels/simt_emulator.h, so these tests check the GPU kernel's logic
(tiles of 16×16 threads, shared-memory batches of 256, the early exit, the warp reductions and
atomics of the backward) on every CI run. Its forward and gradients equal the float64 oracle
and the reference blending on fresh random scenes, and through ``rasterize`` the reference
backend and the CPU pass (float32 tolerances); the forward is bit-identical under two emulator seeds (thread and block orders),
the gradients agree to float32 rounding (the atomics' order changes); it works under jit,
vmap and grad, through ``rasterize``; ``"auto"`` never picks it.
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
    one_tile_args,
    oracle64,
    oracle64_grads,
    random_cotangents,
    random_scene,
    require_kernel,
    stopped_pixels,
    tile_lists,
)

from gem_jax.render import _ffi, reference

SEED_VARIABLE = "GEM_JAX_SIMT_SEED"

# Small scenes (the emulator runs every GPU thread as a context). Beyond blend_scenes.SCENES:
EMULATED_SCENES = {
    **{name: SCENES[name] for name in ("odd-size", "long-lists", "dense-opaque", "needles")},
    # Gaussians only over the left 40 columns of a 97-pixel-wide image: the tiles from x = 64
    # on have empty lists (their blocks still run, stage nothing, write the background).
    "empty-tiles": (97, 33, 40, {"scale": (0.5, 3.0), "within": (40, 33)}),
    # 600 nearly opaque, large Gaussians over 2x2 tiles: every pixel saturates (alpha 0.99,
    # then T < 1e-4) within the first shared-memory batch of 256, so the block exits early.
    "saturated": (32, 32, 600, {"opacity": (0.9, 1.0), "scale": (6.0, 14.0)}),
}


@pytest.fixture(autouse=True)
def _kernel_built():
    require_kernel("cuda_emulated")


def scene_args(name, seed_offset=0):
    """Kernel inputs of a fresh random EMULATED_SCENES scene, clear of the rule's thresholds
    (at which float32 kernels and the float64 oracle may legitimately decide differently)."""
    width, height, n, options = EMULATED_SCENES[name]
    rng = np.random.default_rng([seed_offset, abs(hash(name)) % 2**32])
    return kernel_args(*clear_scene(rng, width, height, n, **options)), width, height, rng


def forward_with_residuals(args, width, height):
    """image, alpha, depth, final transmittance and last contributor of the emulated kernel."""
    return [np.asarray(x) for x in _ffi._forward_call("cuda_emulated", width, height, *args)]


def assert_forward_close(got, want, label=""):
    for name, g, w in zip(("image", "alpha", "depth"), got, want):
        scale = 1.0 if name != "depth" else 10.0  # depths are up to 10
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * scale, err_msg=label + name)


# --- forward ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", EMULATED_SCENES)
def test_forward_matches_oracle_and_reference(name):
    args, width, height, _ = scene_args(name)
    got = _ffi.blend_tiles_cuda_emulated(*args, width, height)
    assert float(jnp.max(got[1])) > 0.1, "the scene must not be empty"
    assert_forward_close(got, oracle64(args, width, height), "oracle: ")
    assert_forward_close(got, reference.blend_tiles(*args, width, height), "reference: ")


def test_scene_set_covers_the_kernel_paths():
    """The scenes above reach what they are meant to: empty tiles, lists longer than one
    shared-memory batch, non-multiple-of-16 sizes, and a block that exits early."""
    ranges = {name: np.asarray(scene_args(name)[0][7]) for name in EMULATED_SCENES}
    lengths = {name: r[:, 1] - r[:, 0] for name, r in ranges.items()}
    assert (lengths["empty-tiles"] == 0).sum() >= 4
    assert lengths["long-lists"].max() > 256 and lengths["saturated"].min() > 256
    width, height = EMULATED_SCENES["odd-size"][:2]
    assert width % 16 and height % 16
    args, width, height, _ = scene_args("saturated")
    last = forward_with_residuals(args, width, height)[4]
    assert stopped_pixels(args, width, height).all() and last.max() <= 256  # within the first batch


def test_forward_is_bit_identical_under_two_seeds(monkeypatch):
    for name in ("odd-size", "long-lists"):
        args, width, height, _ = scene_args(name)
        monkeypatch.setenv(SEED_VARIABLE, "1")
        first = forward_with_residuals(args, width, height)
        monkeypatch.setenv(SEED_VARIABLE, "0x9e3779b97f4a7c15")
        second = forward_with_residuals(args, width, height)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)


def test_a_bad_seed_is_an_error_naming_the_variable(monkeypatch):
    args, width, height, _ = scene_args("odd-size")
    monkeypatch.setenv(SEED_VARIABLE, "twelve")
    with pytest.raises(Exception, match=f"{SEED_VARIABLE} must be an unsigned integer"):
        jax.block_until_ready(_ffi.blend_tiles_cuda_emulated(*args, width, height))


@pytest.mark.parametrize(
    "field,index,bad", [("means2d", (3, 0), np.nan), ("conics", (5, 1), np.inf), ("opacities", (7,), np.nan)]
)
def test_non_finite_gaussians_are_skipped(field, index, bad):
    """A NaN/Inf Gaussian left in the tile lists contributes nothing (the same result as with
    it transparent) and gets no NaN gradient."""
    width, height = 32, 32
    rng = np.random.default_rng()
    scene = random_scene(rng, width, height, 30)
    ids, ranges = tile_lists(scene, width, height)
    scene[field][index] = bad
    without = {k: v.copy() for k, v in scene.items()}
    without["opacities"][index[0]] = 0.0
    args = kernel_args(scene, ids, ranges)
    got = _ffi.blend_tiles_cuda_emulated(*args, width, height)
    want = _ffi.blend_tiles_cuda_emulated(*kernel_args(without, ids, ranges), width, height)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    grads = blend_grads(_ffi.blend_tiles_cuda_emulated, args, random_cotangents(rng, width, height), width, height)
    assert all(np.isfinite(g).all() for g in grads)


def test_empty_scene_is_background():
    bg = np.array([0.2, 0.5, 0.7], np.float32)
    args = one_tile_args(np.zeros((0, 2)), np.zeros((0, 3)), np.zeros((0, 3)), [], [], bg, 40, 20)
    image, alpha, depth = _ffi.blend_tiles_cuda_emulated(*args, 40, 20)
    np.testing.assert_array_equal(np.asarray(image), np.broadcast_to(bg, (20, 40, 3)))
    assert not np.asarray(alpha).any() and not np.asarray(depth).any()


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["odd-size", "long-lists", "dense-opaque", "needles", "saturated"])
def test_gradients_match_the_reference(name):
    args, width, height, rng = scene_args(name, seed_offset=7)
    cots = random_cotangents(rng, width, height)
    got = blend_grads(_ffi.blend_tiles_cuda_emulated, args, cots, width, height)
    assert all(np.abs(g).max() > 0 for g in got), "every gradient must be non-trivial"
    assert_grads_close(got, blend_grads(reference.blend_tiles, args, cots, width, height))


def test_gradients_match_the_oracle():
    """Against the float64 oracle on a scene where most pixels stop early."""
    args, width, height, rng = scene_args("dense-opaque", seed_offset=9)
    cots = random_cotangents(rng, width, height)
    got = blend_grads(_ffi.blend_tiles_cuda_emulated, args, cots, width, height)
    assert_grads_close(got, oracle64_grads(args, cots, width, height))


def test_gradients_under_two_seeds_agree_to_rounding(monkeypatch):
    """The atomics add each Gaussian's per-warp sums in a seed-dependent order."""
    args, width, height, rng = scene_args("dense-opaque", seed_offset=11)
    cots = random_cotangents(rng, width, height)
    monkeypatch.setenv(SEED_VARIABLE, "1")
    first = blend_grads(_ffi.blend_tiles_cuda_emulated, args, cots, width, height)
    monkeypatch.setenv(SEED_VARIABLE, "2")
    second = blend_grads(_ffi.blend_tiles_cuda_emulated, args, cots, width, height)
    for a, b in zip(first, second):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * float(np.abs(a).max()))


# --- jit, vmap, grad, rasterize -------------------------------------------------------------


def test_jit_vmap_and_grad_through_the_kernel():
    check_jit_vmap_and_grad(_ffi.blend_tiles_cuda_emulated, rtol=1e-4, atol=1e-5)


def test_rasterize_backend_matches_reference_and_the_cpu_pass():
    assert_rasterize_matches_reference("cuda-emulated")
    if _ffi.HAS_CPU_KERNEL:
        assert_rasterize_matches_reference("cuda-emulated", against="cpu")


def test_auto_never_picks_the_emulator():
    from gem_jax.render import available_backends

    rasterize_module = importlib.import_module("gem_jax.render.rasterize")
    assert available_backends()[-1] == "cuda-emulated"
    assert rasterize_module._resolve_backend("auto", jnp.float32) != "cuda-emulated"


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="on a GPU the CUDA kernel is available")
def test_cuda_backend_without_a_gpu_says_why():
    """Built (where nvcc was found) or not, backend="cuda" on a CPU-only jax raises the
    rasterizer's BackendUnavailableError with the reason; nothing is registered for CUDA."""
    from gem_jax.render import BackendUnavailableError, rasterize
    from gem_jax.types import Camera, Gaussians

    assert not _ffi.HAS_CUDA_KERNEL
    g = Gaussians(means=jnp.asarray([[0.0, 0.0, 3.0]]), quats=jnp.asarray([[1.0, 0, 0, 0]]),
                  scales=jnp.full((1, 3), 0.1), opacities=jnp.asarray([0.5]), colors=jnp.ones((1, 3)))
    cam = Camera(viewmat=jnp.eye(4), K=jnp.asarray([[20.0, 0, 8], [0, 20.0, 8], [0, 0, 1]]), width=16, height=16)
    with pytest.raises(BackendUnavailableError) as info:
        rasterize(g, cam, jnp.ones(3), backend="cuda")
    message = str(info.value)
    assert "is built, but no GPU backend in jax" in message or "no cuda blending library" in message
