"""Forward rendering: rasterize / blend_tiles / blend_dense against the float64 NumPy oracle.

Specification (docs/architecture.md §9): on fresh random scenes the image, alpha and depth of ``rasterize``
(tile path and dense oracle) equal those of the independent per-pixel renderer of
test_render_oracle.py to 1e-5; the two pure-jnp blenders agree with each other on random 2D
scenes, including tile lists longer than one chunk; and the corner cases of the blending rule
(empty scene, one Gaussian, the 0.99 clamp, the 1e-4 stop, a screen-filling Gaussian, NaN/Inf
inputs, an off-centre principal point) behave as specified.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_render_oracle import np_blend, np_project, np_splats_2d, random_camera, random_gaussians

from gem_jax.render import rasterize
from gem_jax.render.reference import CHUNK, blend_dense, blend_tiles
from gem_jax.render.tiles import tile_intersections
from gem_jax.types import Camera, Gaussians

W, H = 56, 40  # 4 x 3 tiles, the last column and row partial


def scene(seed, n=70, *, width=W, height=H, principal=(0.5, 0.5), dtype=np.float32, **kw):
    """(Gaussians, Camera, background, float64 arrays, viewmat, K) of a fresh random scene."""
    rng = np.random.default_rng(seed)
    viewmat, K = random_camera(rng, width, height, principal=principal)
    arrays = random_gaussians(rng, n, viewmat, **kw)
    bg = rng.uniform(0, 1, size=3)
    g = Gaussians(*(jnp.asarray(np.asarray(x, dtype)) for x in arrays))
    cam = Camera(viewmat=jnp.asarray(viewmat, dtype), K=jnp.asarray(K, dtype), width=width, height=height)
    return g, cam, jnp.asarray(bg, dtype), arrays, viewmat, K, bg


def oracle_render(arrays, viewmat, K, bg, width=W, height=H):
    return np_blend(np_project(*arrays, viewmat, K, width, height), bg, width, height)


def assert_render_close(out, want, atol):
    for name, got, w in zip(("image", "alpha", "depth"), (out.image, out.alpha, out.depth), want):
        scale = max(1.0, float(np.abs(w).max())) if name == "depth" else 1.0
        np.testing.assert_allclose(np.asarray(got), w, rtol=0, atol=atol * scale, err_msg=name)


@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_rasterize_matches_the_numpy_renderer(backend):
    g, cam, bg, arrays, viewmat, K, bg64 = scene(1)
    want = oracle_render(arrays, viewmat, K, bg64)
    assert want[1].max() > 0.9 and (want[1] > 0.1).mean() > 0.3  # a non-empty, layered render
    out = rasterize(g, cam, bg, backend=backend)
    assert out.image.shape == (H, W, 3) and out.image.dtype == jnp.float32
    assert int(out.stats["num_visible"]) > 40 and int(out.stats["overflow"]) == 0
    assert_render_close(out, want, atol=1e-5)


def test_rasterize_in_float64_matches_to_1e_10():
    with jax.enable_x64(True):
        g, cam, bg, arrays, viewmat, K, bg64 = scene(2, principal=(0.3, 0.7), dtype=np.float64)
        want = oracle_render(arrays, viewmat, K, bg64)
        out = rasterize(g, cam, bg)  # auto picks the reference path for float64
        assert out.image.dtype == jnp.float64
        assert_render_close(out, want, atol=1e-10)


def test_off_centre_principal_point():
    """Same scene, principal point near a corner: still the oracle's image (clamp and shift honoured)."""
    g, cam, bg, arrays, viewmat, K, bg64 = scene(3, principal=(0.15, 0.9))
    want = oracle_render(arrays, viewmat, K, bg64)
    assert want[1].max() > 0.5
    assert_render_close(rasterize(g, cam, bg, backend="reference"), want, atol=1e-5)


# --- the two pure-jnp blenders on 2D scenes -------------------------------------------------


def random_splats(rng, n, width, height, *, opacity=(0.05, 0.95), scale=(0.8, 6.0)):
    """Screen-space Gaussians over a width x height image, float32, with 3-sigma radii."""
    means = rng.uniform([-6, -6], [width + 6, height + 6], size=(n, 2))
    s = rng.uniform(*scale, size=(n, 2))
    theta = rng.uniform(0, np.pi, size=n)
    c, si = np.cos(theta), np.sin(theta)
    rot = np.stack([c, -si, si, c], -1).reshape(n, 2, 2)
    inv = np.linalg.inv(rot @ (s[:, :, None] ** 2 * np.eye(2)) @ rot.transpose(0, 2, 1))
    conics = np.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], -1)
    f32 = np.float32
    colors, opacities, depths = rng.uniform(0, 1, (n, 3)), rng.uniform(*opacity, n), rng.uniform(1, 9, n)
    args = [means, conics, colors, opacities, depths, rng.uniform(0, 1, 3)]
    return [jnp.asarray(np.asarray(a, f32)) for a in args], np.ceil(3 * s.max(-1)).astype(np.int32)


def lists_for(args, radii, width, height, capacity=None):
    lists = tile_intersections(args[0], jnp.asarray(radii), args[4], width, height, capacity or 20 * len(radii) + 16)
    assert int(lists.overflow) == 0
    return lists.gaussian_ids, lists.tile_ranges


SPLAT_SCENES = {  # name: (width, height, N, options)
    "odd-size": (37, 29, 80, {}),
    "long-lists": (32, 32, 300, {"opacity": (0.01, 0.06), "scale": (4.0, 12.0)}),  # > CHUNK, no stop
    "dense-opaque": (48, 40, 300, {"opacity": (0.5, 1.0)}),  # most pixels stop early
}


@pytest.mark.parametrize("name", SPLAT_SCENES)
def test_tile_path_equals_dense_oracle_and_numpy(name):
    width, height, n, options = SPLAT_SCENES[name]
    rng = np.random.default_rng(sum(map(ord, name)))
    args, radii = random_splats(rng, n, width, height, **options)
    ids, ranges = lists_for(args, radii, width, height)
    if name == "long-lists":
        assert int(np.diff(np.asarray(ranges), axis=1).max()) > 4 * CHUNK
    tiles = blend_tiles(*args, ids, ranges, width, height)
    dense = blend_dense(*args, width, height, radii=radii)
    for t, d in zip(tiles, dense):
        np.testing.assert_allclose(np.asarray(t), np.asarray(d), rtol=0, atol=2e-6)
    splats = np_splats_2d(*(np.asarray(a, np.float64) for a in args[:5]), radii)
    want = np_blend(splats, np.asarray(args[5], np.float64), width, height)
    for label, t, w in zip(("image", "alpha", "depth"), tiles, want):
        np.testing.assert_allclose(np.asarray(t), w, rtol=0, atol=1e-5 * (9 if label == "depth" else 1), err_msg=label)
    assert np.asarray(tiles[1]).max() > 0.5


def test_load_balancing_phases_do_not_change_the_result(monkeypatch):
    """Tiles sorted by list length and blended in a chain of loops over shrinking prefixes."""
    import gem_jax.render.reference as reference

    args, radii = random_splats(np.random.default_rng(3), 300, 48, 32, opacity=(0.01, 0.3), scale=(2.0, 12.0))
    ids, ranges = lists_for(args, radii, 48, 32)

    def value_and_grad():
        fn = jax.value_and_grad(lambda *a: blend_tiles(*a, ids, ranges, 48, 32)[0].sum(), argnums=(0, 1, 3))
        return jax.jit(fn)(*args)

    single = value_and_grad()
    monkeypatch.setattr(reference, "MIN_PHASE_TILES", 1)
    assert reference._phase_sizes(6) == [6, 3, 2, 1]
    phased = value_and_grad()
    for a, b in zip(jax.tree.leaves(phased), jax.tree.leaves(single)):  # equal up to rounding
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


# --- corner cases ---------------------------------------------------------------------------


def one_tile(means, conics, colors, opacities, depths, bg=(0.1, 0.2, 0.3), width=16, height=16):
    """Every Gaussian in every tile, in the given (front-to-back) order."""
    n, f32 = len(means), np.float32
    tiles = -(-width // 16) * -(-height // 16)
    ids = jnp.asarray(np.tile(np.arange(n), tiles), jnp.int32)
    ranges = jnp.asarray(np.stack([np.arange(tiles) * n, np.arange(1, tiles + 1) * n], -1), jnp.int32)
    shapes = ((n, 2), (n, 3), (n, 3), (n,), (n,), (3,))
    values = (means, conics, colors, opacities, depths, bg)
    floats = [jnp.asarray(np.asarray(x, f32).reshape(s)) for x, s in zip(values, shapes)]
    return floats, ids, ranges


def both(floats, ids, ranges, width=16, height=16):
    """Outputs of the tile path and of the dense oracle (asserted equal), as NumPy."""
    tiles = [np.asarray(x) for x in blend_tiles(*floats, ids, ranges, width, height)]
    dense = [np.asarray(x) for x in blend_dense(*floats, width, height)]
    for t, d in zip(tiles, dense):
        np.testing.assert_allclose(t, d, atol=1e-6)
    return tiles


def test_empty_scene_is_the_background():
    g, cam, bg, *_ = scene(4, n=1)
    empty = Gaussians(*(x[:0] for x in (g.means, g.quats, g.scales, g.opacities, g.colors)))
    for backend in ("reference", "dense"):
        out = rasterize(empty, cam, bg, backend=backend)
        np.testing.assert_array_equal(np.asarray(out.image), np.broadcast_to(np.asarray(bg), (H, W, 3)))
        assert not np.asarray(out.alpha).any() and not np.asarray(out.depth).any()
        assert int(out.stats["num_intersections"]) == 0


def test_one_gaussian_is_colour_times_alpha_plus_background():
    mean, conic, color, o, z, bg = [7.3, 8.9], [0.3, 0.05, 0.2], [0.9, 0.4, 0.1], 0.7, 3.0, np.array([0.1, 0.2, 0.3])
    image, alpha, depth = both(*one_tile([mean], [conic], [color], [o], [z], bg))
    jj, ii = np.meshgrid(np.arange(16) + 0.5, np.arange(16) + 0.5)
    dx, dy = mean[0] - jj, mean[1] - ii
    a = o * np.exp(-(0.5 * (conic[0] * dx**2 + conic[2] * dy**2) + conic[1] * dx * dy))
    a = np.where(a >= 1 / 255, a, 0.0)
    assert (a == 0).any() and (a > 0.5).any()  # both sides of the 1/255 cut
    np.testing.assert_allclose(image, a[..., None] * color + (1 - a[..., None]) * bg, atol=1e-6)
    np.testing.assert_allclose(alpha, a, atol=1e-6)
    np.testing.assert_allclose(depth, a * z, atol=1e-5)


def test_opacity_one_is_clamped_to_099():
    floats, ids, ranges = one_tile([[8.5, 8.5]], [[1.0, 0.0, 1.0]], [[1, 1, 1]], [1.0], [2.0], [0, 0, 0])
    _, alpha, _ = both(floats, ids, ranges)
    assert float(alpha[8, 8]) == pytest.approx(0.99, abs=1e-7)
    v_o = jax.grad(lambda o: blend_tiles(*floats[:3], o, *floats[4:], ids, ranges, 16, 16)[1][8, 8])(floats[3])
    assert float(v_o[0]) == 0.0  # min(0.99, ·) is flat there


def test_three_stacked_opaque_gaussians_stop_after_two():
    """α = 0.98 each: T goes 1 → 0.02 → 4e-4; the third would take it to 8e-6 < 1e-4 and is excluded."""
    floats, ids, ranges = one_tile([[8.5, 8.5]] * 3, [[1.0, 0.0, 1.0]] * 3, np.eye(3), [0.98] * 3, [1, 2, 3], [0, 0, 0])
    image, alpha, depth = both(floats, ids, ranges)
    np.testing.assert_allclose(image[8, 8], [0.98, 0.02 * 0.98, 0.0], rtol=1e-5)
    np.testing.assert_allclose(alpha[8, 8], 1 - 0.02 * 0.02, rtol=1e-6)
    np.testing.assert_allclose(depth[8, 8], 0.98 * 1 + 0.02 * 0.98 * 2, rtol=1e-5)
    def pixel_sum(colors):
        return blend_tiles(*floats[:2], colors, *floats[3:], ids, ranges, 16, 16)[0][8, 8].sum()

    v_colors = jax.grad(pixel_sum)(floats[2])
    assert not np.asarray(v_colors[2]).any()  # nothing of the third reaches the pixel


def test_a_gaussian_covering_all_tiles():
    """A large Gaussian in front of the camera is listed in every tile and rendered everywhere."""
    g, cam, bg, *_ = scene(5, n=1)
    viewmat = np.asarray(cam.viewmat, np.float64)
    centre = viewmat[:3, :3].T @ ([0, 0, 2.0] - viewmat[:3, 3])  # 2 units in front, on the axis
    big = Gaussians(
        means=jnp.asarray(centre[None], jnp.float32), quats=jnp.array([[1.0, 0, 0, 0]]),
        scales=jnp.full((1, 3), 1.5), opacities=jnp.array([0.8]), colors=jnp.array([[0.3, 0.6, 0.9]]),
    )  # fmt: skip
    out = rasterize(big, cam, bg, backend="reference")
    assert int(out.stats["num_intersections"]) == 4 * 3  # every tile
    arrays = [np.asarray(x, np.float64) for x in (big.means, big.quats, big.scales, big.opacities, big.colors)]
    want = oracle_render(arrays, viewmat, np.asarray(cam.K, np.float64), np.asarray(bg, np.float64))
    assert want[1].min() > 0.3
    assert_render_close(out, want, atol=1e-5)


def test_non_finite_inputs_are_culled_without_nan():
    g, cam, bg, arrays, viewmat, K, bg64 = scene(6, n=30)
    bad = [np.array(x, np.float32) for x in arrays]
    bad[0][0, 0], bad[1][1, 2], bad[2][2, 1], bad[3][3], bad[4][4, 0] = np.nan, np.inf, np.nan, np.inf, -np.inf
    g_bad = Gaussians(*(jnp.asarray(x) for x in bad))
    out = rasterize(g_bad, cam, bg, backend="reference")
    for x in (out.image, out.alpha, out.depth):
        assert np.isfinite(np.asarray(x)).all()
    clean = [x[5:] for x in arrays]  # the same scene without the five bad Gaussians
    assert_render_close(out, oracle_render(clean, viewmat, K, bg64), atol=1e-5)
    assert int(out.stats["num_visible"]) <= 25

    def loss(g):
        o = rasterize(g, cam, bg, backend="reference")
        return jnp.sum(o.image) + jnp.sum(o.alpha) + jnp.sum(o.depth)

    grads = jax.grad(loss)(g_bad)
    for name in ("means", "quats", "scales", "opacities", "colors"):
        v = np.asarray(getattr(grads, name))
        assert np.isfinite(v).all() and not v[:5].any(), name  # zero for the culled ones
        assert np.abs(v[5:]).max() > 0, name


def test_blend_level_guards_skip_non_finite_splats():
    """A NaN/Inf mean or conic (or NaN opacity) left in the lists contributes nothing."""
    rng = np.random.default_rng(8)
    args, radii = random_splats(rng, 30, 32, 32)
    ids, ranges = lists_for(args, radii, 32, 32)
    clean = [np.array(a) for a in args]
    clean[3][[3, 5, 7]] = 0.0
    bad = [np.array(a) for a in args]
    bad[0][3, 0], bad[1][5, 1], bad[3][7] = np.nan, np.inf, np.nan
    got = blend_tiles(*(jnp.asarray(a) for a in bad), ids, ranges, 32, 32)
    want = blend_tiles(*(jnp.asarray(a) for a in clean), ids, ranges, 32, 32)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
