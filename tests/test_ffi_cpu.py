"""The C++ CPU blending kernel (gem_jax/render/_ffi.py, kernels/) against a float64 oracle.

Specification (DESIGN §9, layer 3): for every pixel the kernel blends the Gaussians of its
tile front to back exactly as the oracle below does; its gradients are those of that rule;
it works under jit, vmap and grad; the corner cases of the rasterizer behave as specified.
The oracle is a direct, vectorised transcription of the rule in float64 jnp (autodiff gives
its gradients); test_ffi_reference.py checks the kernel against gem_jax.render.reference.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax.render import _ffi

TILE = 16


@pytest.fixture(autouse=True)
def _kernel_built():
    if not _ffi.HAS_CPU_KERNEL:
        message = _ffi.build_instructions("cpu")
        if os.environ.get("CI"):
            pytest.fail(f"CI must build the CPU kernel: {message}")
        pytest.skip(message)


# --- scenes and tile lists -------------------------------------------------------------


def random_scene(rng, width, height, n, *, opacity=(0.05, 0.95), scale=(0.8, 6.0), margin=8.0):
    """Random 2D Gaussians over (and a little beyond) a width x height image, as float32.

    Returns dict with means2d (N,2), conics (N,3), colors (N,3), opacities (N,),
    depths (N,), background (3,) and radii (N,) (3 sigma, pixels).
    """
    means = rng.uniform([-margin, -margin], [width + margin, height + margin], size=(n, 2))
    s = rng.uniform(*scale, size=(n, 2))
    theta = rng.uniform(0, np.pi, size=n)
    rot = np.stack([np.cos(theta), -np.sin(theta), np.sin(theta), np.cos(theta)], -1).reshape(n, 2, 2)
    cov = rot @ (s[:, :, None] ** 2 * np.eye(2)) @ np.transpose(rot, (0, 2, 1))
    inv = np.linalg.inv(cov)
    f32 = np.float32
    return {
        "means2d": means.astype(f32),
        "conics": np.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], -1).astype(f32),
        "colors": rng.uniform(0, 1, size=(n, 3)).astype(f32),
        "opacities": rng.uniform(*opacity, size=n).astype(f32),
        "depths": rng.uniform(1, 10, size=n).astype(f32),
        "background": rng.uniform(0, 1, size=3).astype(f32),
        "radii": np.ceil(3 * s.max(-1)),
    }


def tile_lists(scene, width, height, *, padding=5):
    """Intersections sorted by (tile, depth): gaussian_ids (M,) int32, tile_ranges (T,2) int32.

    A Gaussian goes to every tile its 3-sigma box touches; `padding` junk entries follow the
    used ones (a static capacity larger than needed), which the kernel must never read.
    """
    tiles_x, tiles_y = -(-width // TILE), -(-height // TILE)
    pairs = []
    for g, ((x, y), r) in enumerate(zip(scene["means2d"], scene["radii"])):
        tx0, tx1 = int(np.floor((x - r) / TILE)), int(np.floor((x + r) / TILE))
        ty0, ty1 = int(np.floor((y - r) / TILE)), int(np.floor((y + r) / TILE))
        for ty in range(max(ty0, 0), min(ty1, tiles_y - 1) + 1):
            for tx in range(max(tx0, 0), min(tx1, tiles_x - 1) + 1):
                pairs.append((ty * tiles_x + tx, scene["depths"][g], g))
    pairs.sort()
    ids = np.array([g for _, _, g in pairs] + [0] * padding, np.int32)
    tiles = np.array([t for t, _, _ in pairs], np.int64)
    t = np.arange(tiles_x * tiles_y)
    ranges = np.stack([np.searchsorted(tiles, t, "left"), np.searchsorted(tiles, t, "right")], -1)
    return ids, ranges.astype(np.int32)


def kernel_args(scene, ids, ranges):
    keys = ("means2d", "conics", "colors", "opacities", "depths", "background")
    return tuple(jnp.asarray(scene[k]) for k in keys) + (jnp.asarray(ids), jnp.asarray(ranges))


# --- the oracle ----------------------------------------------------------------------------


def oracle_blend(means2d, conics, colors, opacities, depths, background, ids, ranges, width, height):
    """The blending rule of DESIGN §9 for every pixel at once, in the inputs' precision.

    alpha = min(0.99, o exp(-sigma)), skipped if sigma < 0 or alpha < 1/255; the Gaussian
    that would take the transmittance below 1e-4 and all after it are excluded.
    Returns image (H,W,3), alpha (H,W), depth (H,W).
    """
    ids, ranges = np.asarray(ids), np.asarray(ranges)
    tiles_x = -(-width // TILE)
    jj, ii = np.meshgrid(np.arange(width), np.arange(height))
    tile = (ii // TILE) * tiles_x + jj // TILE  # (H, W)
    start, end = ranges[tile, 0], ranges[tile, 1]
    k_max = max(int((ranges[:, 1] - ranges[:, 0]).max(initial=0)), 1)
    slot = start[..., None] + np.arange(k_max)  # (H, W, K)
    in_list = slot < end[..., None]
    gid = np.where(in_list, ids[np.minimum(slot, len(ids) - 1)], 0)
    dx = means2d[gid, 0] - (jj[..., None] + 0.5)
    dy = means2d[gid, 1] - (ii[..., None] + 0.5)
    a, b, c = conics[gid, 0], conics[gid, 1], conics[gid, 2]
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = jnp.minimum(0.99, opacities[gid] * jnp.exp(-sigma))
    valid = in_list & (sigma >= 0) & (alpha >= 1.0 / 255.0)
    alpha = jnp.where(valid, alpha, 0.0)
    # Before the stop the transmittance only falls, so the first Gaussian whose T_next drops
    # below 1e-4 and everything after it fail this test together.
    keep = valid & (jnp.cumprod(1.0 - alpha, axis=-1) >= 1e-4)
    alpha = jnp.where(keep, alpha, 0.0)
    t_incl = jnp.cumprod(1.0 - alpha, axis=-1)
    weight = alpha * (t_incl / (1.0 - alpha))  # alpha_k * T before k
    t_final = t_incl[..., -1]
    image = jnp.einsum("hwk,hwkc->hwc", weight, colors[gid]) + t_final[..., None] * background
    return image, 1.0 - t_final, jnp.sum(weight * depths[gid], -1)


def oracle64(args, width, height):
    with jax.enable_x64(True):
        floats = [jnp.asarray(np.asarray(x, np.float64)) for x in args[:6]]
        return [np.asarray(o) for o in oracle_blend(*floats, *args[6:], width, height)]


def oracle64_grads(args, cotangents, width, height):
    """Gradients of <cotangents, oracle outputs> w.r.t. the six float inputs, in float64."""
    with jax.enable_x64(True):
        floats = [jnp.asarray(np.asarray(x, np.float64)) for x in args[:6]]
        cots = [jnp.asarray(np.asarray(c, np.float64)) for c in cotangents]

        def loss(*f):
            outs = oracle_blend(*f, *args[6:], width, height)
            return sum(jnp.sum(o * ct) for o, ct in zip(outs, cots))

        return [np.asarray(g) for g in jax.grad(loss, argnums=tuple(range(6)))(*floats)]


def kernel_grads(args, cotangents, width, height):
    def loss(*f):
        outs = _ffi.blend_tiles_cpu(*f, *args[6:], width, height)
        return sum(jnp.sum(o * ct) for o, ct in zip(outs, cotangents))

    return [np.asarray(g) for g in jax.grad(loss, argnums=tuple(range(6)))(*args[:6])]


def random_cotangents(rng, width, height):
    return [
        jnp.asarray(rng.normal(size=s).astype(np.float32))
        for s in [(height, width, 3), (height, width), (height, width)]
    ]


def assert_grads_close(got, want, names=("means2d", "conics", "colors", "opacities", "depths", "background")):
    """gsplat-style tolerances for float32 gradients, relative to each gradient's scale."""
    for name, g, w in zip(names, got, want):
        scale = max(float(np.abs(w).max()), 1e-6)
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * scale, err_msg=f"v_{name}")


# --- forward ----------------------------------------------------------------------------

SCENES = {  # name: (width, height, N, scene options)
    "one-tile": (16, 16, 12, {}),
    "odd-size": (37, 29, 80, {}),
    "wide-sparse": (97, 33, 40, {"scale": (0.5, 3.0)}),
    # ~600 faint Gaussians in a 2x2-tile image: tile lists of several hundred entries, longer
    # than one chunk of the reference's tile loop, and no early stop.
    "long-lists": (32, 32, 600, {"opacity": (0.01, 0.05), "scale": (4.0, 12.0)}),
    "dense-opaque": (48, 40, 400, {"opacity": (0.5, 1.0)}),
    # Thin, long, rotated Gaussians: the kernel's culling boxes must never clip them.
    "needles": (64, 48, 60, {"scale": (0.3, 25.0)}),
}


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


def projected_args(seed, width, height, n, principal, capacity):
    """Kernel inputs from random 3D Gaussians, gem_jax.render.project and .tiles.

    `principal` is the principal point as a fraction of (width, height) (off-centre allowed).
    """
    from gem_jax.render.project import project_gaussians
    from gem_jax.render.tiles import tile_intersections
    from gem_jax.types import Camera, Gaussians

    rng = np.random.default_rng(seed)
    quats = rng.normal(size=(n, 4))
    gaussians = Gaussians(
        means=jnp.asarray(rng.uniform([-1.0, -0.8, 2.5], [1.0, 0.8, 4.5], (n, 3)), jnp.float32),
        quats=jnp.asarray(quats / np.linalg.norm(quats, axis=-1, keepdims=True), jnp.float32),
        scales=jnp.asarray(np.exp(rng.uniform(np.log(0.004), np.log(0.06), (n, 3))), jnp.float32),
        opacities=jnp.asarray(rng.uniform(0.05, 0.95, n), jnp.float32),
        colors=jnp.asarray(rng.uniform(0, 1, (n, 3)), jnp.float32),
    )
    f = 0.9 * max(width, height)
    K = np.array([[f, 0, principal[0] * width], [0, f, principal[1] * height], [0, 0, 1]], np.float32)
    camera = Camera(viewmat=jnp.eye(4), K=jnp.asarray(K), width=width, height=height)
    p = project_gaussians(gaussians, camera)
    lists = tile_intersections(p.means2d, p.radii, p.depths, width, height, capacity)
    assert int(lists.overflow) == 0
    background = jnp.asarray(rng.uniform(0, 1, 3), jnp.float32)
    return (p.means2d, p.conics, p.colors, p.opacities, p.depths, background,
            lists.gaussian_ids, lists.tile_ranges)  # fmt: skip


PIPELINE = {  # name: (width, height, N, principal point / size, capacity)
    "off-centre": (61, 35, 250, (0.3, 0.7), 5000),
    # Most Gaussians crowd into few tiles: lists of hundreds of entries (several chunks).
    "crowded": (32, 32, 700, (0.5, 0.5), 6000),
}


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
    """The public rasterize() with backend="cpu": two off-centre cameras (one batched call),
    NaN/Inf Gaussians culled, and gradients w.r.t. every Gaussian parameter and the background
    equal to the reference backend's; "auto" picks the kernel on CPU."""
    from gem_jax.render import available_backends, rasterize
    from gem_jax.types import Camera, Gaussians

    assert available_backends()[0] == "cpu", "'auto' should prefer the CPU kernel on CPU"
    rng = np.random.default_rng(21)
    n, width, height = 120, 40, 32
    quats = rng.normal(size=(n, 4))
    means = rng.uniform([-1.0, -0.8, 2.5], [1.0, 0.8, 4.5], (n, 3))
    means[3] = np.nan
    means[4, 0] = np.inf
    gaussians = Gaussians(
        means=jnp.asarray(means, jnp.float32),
        quats=jnp.asarray(quats / np.linalg.norm(quats, axis=-1, keepdims=True), jnp.float32),
        scales=jnp.asarray(np.exp(rng.uniform(np.log(0.01), np.log(0.08), (n, 3))), jnp.float32),
        opacities=jnp.asarray(rng.uniform(0.05, 0.95, n), jnp.float32),
        colors=jnp.asarray(rng.uniform(0, 1, (n, 3)), jnp.float32),
    )
    K = [[[36.0, 0, 12.0], [0, 36.0, 20.0], [0, 0, 1]], [[30.0, 0, 25.0], [0, 30.0, 11.0], [0, 0, 1]]]
    camera = Camera(viewmat=jnp.stack([jnp.eye(4)] * 2), K=jnp.asarray(K), width=width, height=height)
    background = jnp.asarray(rng.uniform(0, 1, (2, 3)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.float32)

    def loss(g, bg, backend):
        out = rasterize(g, camera, bg, backend=backend, capacity=4096)
        return jnp.sum(out.image * weights) + jnp.sum(out.alpha) + 0.1 * jnp.sum(out.depth), out

    (_, got), got_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(gaussians, background, "cpu")
    (_, want), want_grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
        gaussians, background, "reference"
    )
    for name in ("image", "alpha", "depth"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=1e-5 * 5, err_msg=name)
    flat_got, flat_want = jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in flat_got)
    for g, w in zip(flat_got, flat_want):
        scale = max(float(np.abs(w).max()), 1e-6)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-3, atol=1e-4 * scale)


# --- gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["long-lists", "dense-opaque", "needles"])
def test_gradients_match_oracle(name):
    width, height, n, options = SCENES[name]
    rng = np.random.default_rng(7 + abs(hash(name)) % 2**32)
    scene = random_scene(rng, width, height, n, **options)
    args = kernel_args(scene, *tile_lists(scene, width, height))
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
    """Three 'cameras' (different 2D projections of one scene) in one vmapped, jitted call."""
    width, height, n = 33, 20, 50
    rng = np.random.default_rng(5)
    scenes = [random_scene(rng, width, height, n) for _ in range(3)]
    lists = [tile_lists(s, width, height, padding=0) for s in scenes]
    m = max(len(ids) for ids, _ in lists)
    lists = [(np.pad(ids, (0, m - len(ids))), r) for ids, r in lists]  # one static capacity
    per_camera = [kernel_args(s, *l) for s, l in zip(scenes, lists)]
    batched = [jnp.stack(x) for x in zip(*per_camera)]
    batched[5] = per_camera[0][5]  # background shared (unbatched) by all cameras
    in_axes = (0, 0, 0, 0, 0, None, 0, 0)
    cots = [random_cotangents(rng, width, height) for _ in range(3)]

    def loss(floats, ints, cot):
        outs = _ffi.blend_tiles_cpu(*floats, *ints, width, height)
        return sum(jnp.sum(o * c) for o, c in zip(outs, cot))

    render = jax.jit(jax.vmap(lambda *a: _ffi.blend_tiles_cpu(*a, width, height), in_axes=in_axes))
    grad = jax.jit(jax.vmap(jax.grad(loss), in_axes=(in_axes[:6], 0, 0)))
    images = render(*batched)
    grads = grad(tuple(batched[:6]), tuple(batched[6:]), [jnp.stack(c) for c in zip(*cots)])
    for cam in range(3):
        args = (*per_camera[cam][:5], per_camera[0][5], *per_camera[cam][6:])
        want = oracle64(args, width, height)
        for got, w in zip(images, want):
            np.testing.assert_allclose(np.asarray(got[cam]), w, atol=1e-4)
        single = jax.grad(loss)(args[:6], args[6:], cots[cam])
        for g, s in zip(grads[:5], single[:5]):
            np.testing.assert_allclose(np.asarray(g[cam]), np.asarray(s), rtol=1e-5, atol=1e-6)
    # The shared background's gradient is the sum over cameras.
    shared_bg = [(*per_camera[c][:5], per_camera[0][5]) for c in range(3)]
    total = sum(jax.grad(loss)(shared_bg[c], per_camera[c][6:], cots[c])[5] for c in range(3))
    np.testing.assert_allclose(np.asarray(grads[5]).sum(0), np.asarray(total), rtol=1e-5)


# --- corner cases -----------------------------------------------------------------------


def one_tile_args(means, conics, colors, opacities, depths, background, width=16, height=16):
    """All Gaussians in every tile's list, in the given (front-to-back) order."""
    n = len(means)
    tiles = -(-width // TILE) * -(-height // TILE)
    f32 = np.float32
    ids = np.tile(np.arange(n, dtype=np.int32), tiles)
    ranges = np.stack([np.arange(tiles) * n, np.arange(1, tiles + 1) * n], -1).astype(np.int32)
    floats = [np.asarray(x, f32).reshape(s) for x, s in zip(
        (means, conics, colors, opacities, depths, background),
        ((n, 2), (n, 3), (n, 3), (n,), (n,), (3,)))]  # fmt: skip
    return tuple(jnp.asarray(x) for x in floats) + (jnp.asarray(ids), jnp.asarray(ranges))


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
