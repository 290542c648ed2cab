"""EWA projection (gem_jax/render/project.py) and tile lists (tiles.py) against NumPy oracles.

Specification: project_gaussians matches the independent float64 projection of
test_render_oracle.py (means, conics, depths, radii, culling), culled Gaussians come out as
exact zeros with zero gradients even for NaN/Inf inputs, an off-centre principal point is
honoured; tile_intersections lists every (tile, Gaussian) pair sorted by (tile, depth, id),
reports the true count and the overflow, and never lets padding into a tile's range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_render_oracle import np_project, np_tile_rect, random_camera, random_gaussians

from gem_jax.render.project import project_gaussians as _project_gaussians
from gem_jax.render.tiles import tile_intersections
from gem_jax.types import Camera, Gaussians

W, H = 70, 45
project_gaussians = jax.jit(_project_gaussians)


def make(arrays, viewmat, K, width=W, height=H, dtype=np.float32):
    means, quats, scales, opacities, colors = (jnp.asarray(np.asarray(x, dtype)) for x in arrays)
    g = Gaussians(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors)
    return g, Camera(viewmat=jnp.asarray(viewmat, dtype), K=jnp.asarray(K, dtype), width=width, height=height)


def assert_matches_oracle(p, oracle, rtol):
    radii = np.asarray(p.radii)
    for i, s in enumerate(oracle):
        if s is None:
            assert radii[i] == 0, f"Gaussian {i} should be culled"
            continue
        assert radii[i] == s["radius"], f"radius of Gaussian {i}"
        np.testing.assert_allclose(np.asarray(p.means2d[i]), s["mean2d"], rtol=rtol, atol=rtol * 100)
        np.testing.assert_allclose(np.asarray(p.depths[i]), s["depth"], rtol=rtol)
        scale = np.abs(s["conic"]).max()
        np.testing.assert_allclose(np.asarray(p.conics[i]), s["conic"], rtol=0, atol=rtol * 10 * scale)


@pytest.mark.parametrize("principal", [(0.5, 0.5), (0.2, 0.85)])
def test_projection_matches_independent_float64_oracle(principal):
    rng = np.random.default_rng(11)
    viewmat, K = random_camera(rng, W, H, principal=principal)
    arrays = random_gaussians(rng, 200, viewmat, spread=2.5)  # many off screen / behind
    arrays[0][0] = -viewmat[:3, :3].T @ viewmat[:3, 3] + [0, 0, 0]  # at the camera centre
    oracle = np_project(*arrays, viewmat, K, W, H)
    kept = sum(s is not None for s in oracle)
    assert 50 < kept < 200, kept  # the scene exercises both projection and culling
    with jax.enable_x64(True):
        p = project_gaussians(*make(arrays, viewmat, K, dtype=np.float64))
        assert_matches_oracle(p, oracle, rtol=1e-9)
    p = project_gaussians(*make(arrays, viewmat, K))
    assert p.means2d.dtype == jnp.float32 and p.radii.dtype == jnp.int32
    # float32: radii may differ by rounding at an integer boundary; compare the rest
    radii = np.asarray(p.radii)
    for i, s in enumerate(oracle):
        if s is not None and radii[i] > 0:
            np.testing.assert_allclose(np.asarray(p.means2d[i]), s["mean2d"], rtol=1e-5, atol=1e-3)
            assert abs(int(radii[i]) - s["radius"]) <= 1


def test_principal_point_and_frustum_clamp():
    """A point on the optical axis lands on (cx, cy); the Jacobian clamp honours an off-centre cx.

    With fx = 40, cx = 10, W = 70 the clamp of x/z is [-(10/40 + 0.2625), (60/40 + 0.2625)] =
    [-0.5125, 1.7625]: x/z = -0.6 is clamped, x/z = 1.6 is not (it would be with cx = W/2).
    """
    K = np.array([[40.0, 0, 10.0], [0, 40.0, 40.0], [0, 0, 1]])
    means = np.array([[0, 0, 2.0], [-0.6, 0.0, 1.0], [1.6, -0.2, 1.0]])
    arrays = (means, np.tile([1.0, 0, 0, 0], (3, 1)), np.full((3, 3), 0.2), np.full(3, 0.5), np.full((3, 3), 0.5))
    oracle = np_project(*arrays, np.eye(4), K, W, H)
    assert all(s is not None for s in oracle)
    with jax.enable_x64(True):
        p = project_gaussians(*make(arrays, np.eye(4), K, dtype=np.float64))
        np.testing.assert_allclose(np.asarray(p.means2d[0]), [10.0, 40.0])
        assert_matches_oracle(p, oracle, rtol=1e-9)

    def unclamped_conic(x, y, z):
        J = np.array([[40 / z, 0, -40 * x / z**2], [0, 40 / z, -40 * y / z**2]])
        inv = np.linalg.inv(J @ (0.04 * np.eye(3)) @ J.T + 0.3 * np.eye(2))
        return np.array([inv[0, 0], inv[0, 1], inv[1, 1]])

    assert not np.allclose(np.asarray(p.conics[1]), unclamped_conic(*means[1]), rtol=1e-3)
    np.testing.assert_allclose(np.asarray(p.conics[2]), unclamped_conic(*means[2]), rtol=1e-9)


def test_culled_gaussians_are_zero_with_zero_gradients():
    rng = np.random.default_rng(2)
    viewmat, K = random_camera(rng, W, H)
    arrays = [np.array(x) for x in random_gaussians(rng, 8, viewmat, spread=0.2)]
    arrays[0][1, 0] = np.nan  # NaN mean
    arrays[1][2, 3] = np.inf  # Inf quaternion
    arrays[1][3] = 0.0  # zero quaternion
    arrays[2][4, 1] = -np.inf  # -Inf scale
    arrays[3][5] = np.nan  # NaN opacity
    arrays[4][6, 2] = np.inf  # Inf colour
    arrays[0][7] = -viewmat[:3, :3].T @ (viewmat[:3, 3] + [0, 0, 1.0])  # 1 unit behind the camera
    g, cam = make(arrays, viewmat, K)
    p = project_gaussians(g, cam)
    radii = np.asarray(p.radii)
    assert radii[0] > 0 and not radii[1:].any()
    for leaf in (p.means2d, p.conics, p.depths, p.opacities, p.colors):
        assert np.isfinite(np.asarray(leaf)).all()
        assert not np.asarray(leaf[1:]).any()

    def total(g):
        q = project_gaussians(g, cam)
        return sum(jnp.sum(x * x) for x in (q.means2d, q.conics, q.depths, q.opacities, q.colors))

    grads = jax.grad(total)(g)
    for name in ("means", "quats", "scales", "opacities", "colors"):
        v = np.asarray(getattr(grads, name))
        assert np.isfinite(v).all(), name
        assert not v[1:].any(), name
        assert np.any(v[0]), name


def test_a_non_finite_camera_culls_everything_without_nan():
    rng = np.random.default_rng(3)
    viewmat, K = random_camera(rng, W, H)
    viewmat[0, 3] = np.nan
    g, cam = make(random_gaussians(rng, 5, viewmat, spread=0.2), viewmat, K)
    p = project_gaussians(g, cam)
    assert not np.asarray(p.radii).any()
    grads = jax.grad(lambda c: jnp.sum(project_gaussians(g, c).means2d))(cam)
    assert np.isfinite(np.asarray(grads.viewmat)).all()


# --- tiles ---------------------------------------------------------------------------------


def brute_force_pairs(means2d, radii, depths, width, height):
    tiles_x = -(-width // 16)
    pairs = []
    for g in range(len(means2d)):
        if radii[g] <= 0:
            continue
        x0, y0, x1, y1 = np_tile_rect(means2d[g], radii[g], width, height)
        pairs += [(ty * tiles_x + tx, depths[g], g) for ty in range(y0, y1) for tx in range(x0, x1)]
    return sorted(pairs)


def random_screen(rng, n, width, height):
    means2d = rng.uniform([-20, -20], [width + 20, height + 20], size=(n, 2)).astype(np.float32)
    radii = rng.integers(0, 25, size=n).astype(np.int32)
    depths = rng.uniform(0.5, 5, size=n).astype(np.float32)
    depths[:4] = depths[4]  # ties broken by id
    return means2d, radii, depths


@pytest.mark.parametrize("packed", [True, False], ids=["packed-key-sort", "pair-sort"])
def test_tile_lists_are_all_pairs_sorted_by_tile_depth_id(packed, monkeypatch):
    from gem_jax.render import tiles

    if not packed:  # the path of scenes too large for one 32-bit key
        monkeypatch.setattr(tiles, "PACKED_KEY_LIMIT", 0)
    rng = np.random.default_rng(5)
    width, height = 83, 50
    means2d, radii, depths = random_screen(rng, 120, width, height)
    pairs = brute_force_pairs(means2d, radii, depths, width, height)
    capacity = len(pairs) + 37
    lists = tile_intersections(jnp.asarray(means2d), jnp.asarray(radii), jnp.asarray(depths), width, height, capacity)
    assert int(lists.num_intersections) == len(pairs) and int(lists.overflow) == 0
    ranges = np.asarray(lists.tile_ranges)
    ids = np.asarray(lists.gaussian_ids)
    assert ids.shape == (capacity,) and ranges.shape == (6 * 4, 2)
    got = [(t, depths[g], g) for t in range(len(ranges)) for g in ids[ranges[t, 0] : ranges[t, 1]]]
    assert got == pairs
    assert ranges[:, 1].max() == len(pairs)  # padding lies beyond every range
    assert not ids[len(pairs) :].any()


def test_overflow_is_counted_never_hidden():
    rng = np.random.default_rng(6)
    means2d, radii, depths = random_screen(rng, 60, 64, 64)
    total = len(brute_force_pairs(means2d, radii, depths, 64, 64))
    lists = jax.jit(tile_intersections, static_argnums=(3, 4, 5))(
        jnp.asarray(means2d), jnp.asarray(radii), jnp.asarray(depths), 64, 64, total - 10
    )
    assert int(lists.num_intersections) == total and int(lists.overflow) == 10
    assert int(np.asarray(lists.tile_ranges)[:, 1].max()) <= total - 10


def test_empty_and_fully_culled_inputs():
    for n in (0, 5):
        lists = tile_intersections(jnp.zeros((n, 2)), jnp.zeros((n,), jnp.int32), jnp.ones((n,)), 40, 20, 16)
        assert int(lists.num_intersections) == 0
        assert not np.asarray(lists.tile_ranges).any()
