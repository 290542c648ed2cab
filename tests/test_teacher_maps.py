"""Specification of gem_jax.teacher.maps: maps ↔ Gaussians, activations, deformation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.spatial.transform import Rotation

from gem_jax.data import procedural_head
from gem_jax.head import flame
from gem_jax.head.uv import rasterize_uv
from gem_jax.render.project import quat_to_rotmat
from gem_jax.teacher import maps
from gem_jax.types import Gaussians

RES = 24


def bumpy_sheet(n=9):
    """A curved grid mesh with a UV layout: vertices (n², 3), faces, vt = (u, v), ft = faces."""
    u, v = np.meshgrid(np.linspace(0.05, 0.95, n), np.linspace(0.05, 0.95, n), indexing="xy")
    verts = np.stack([u - 0.5, v - 0.5, 0.1 * np.sin(3 * u) * np.cos(2 * v)], -1).reshape(-1, 3)
    idx = np.arange(n * n).reshape(n, n)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, d], -1), np.stack([a, d, c], -1)]).astype(np.int32)
    vt = np.stack([u, v], -1).reshape(-1, 2).astype(np.float32)
    return verts.astype(np.float32), faces, vt, faces.copy()


@pytest.fixture(scope="module")
def sheet():
    verts, faces, vt, ft = bumpy_sheet()
    uv = rasterize_uv(vt, ft, RES)
    canonical = maps.canonical_gaussians(verts, faces, vt, ft, uv)
    return verts, faces, vt, ft, uv, canonical


def random_raw(n, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    raw = scale * rng.standard_normal((n, 11)).astype(np.float32)
    return jnp.asarray(raw), jnp.asarray(scale * rng.standard_normal((n, 3)).astype(np.float32))


def random_rotations(n, seed=0):
    return Rotation.random(n, random_state=seed).as_matrix().astype(np.float32)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# ----------------------------------------------------------------------------- layout


def test_texel_round_trip_restores_valid_texels_and_fills_the_rest(sheet):
    *_, uv, canonical = sheet
    texels = maps.texel_layout(uv)
    assert texels.shape == (int(np.asarray(uv.valid).sum()),)
    values = jnp.asarray(np.random.default_rng(1).standard_normal((2, texels.size, 5)), jnp.float32)
    grid = maps.map_from_texels(values, texels, RES, fill=-7.0)
    assert grid.shape == (2, RES, RES, 5)
    np.testing.assert_array_equal(maps.texels_from_map(grid, texels), values)
    np.testing.assert_array_equal(np.asarray(grid)[:, ~np.asarray(uv.valid)], -7.0)


# ----------------------------------------------------------------------------- rotations


def test_rotmat_to_quat_matches_scipy_and_inverts_quat_to_rotmat():
    mats = random_rotations(200)
    # Include the hard cases: identity, and rotations by ~180° about each axis (w ≈ 0).
    extra = np.stack([np.eye(3), np.diag([1, -1, -1]), np.diag([-1, 1, -1]), np.diag([-1, -1, 1])]).astype(np.float32)
    mats = np.concatenate([mats, extra])
    q = np.asarray(maps.rotmat_to_quat(jnp.asarray(mats)))
    ref = Rotation.from_matrix(mats).as_quat()[:, [3, 0, 1, 2]]  # xyzw -> wxyz
    ref *= np.where(ref[:, :1] < 0, -1, 1)
    # q and -q are the same rotation; compare up to sign where w ≈ 0.
    err = np.minimum(np.abs(q - ref).max(1), np.abs(q + ref).max(1))
    assert err.max() < 1e-5
    np.testing.assert_allclose(np.linalg.norm(q, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(quat_to_rotmat(jnp.asarray(q)), mats, atol=1e-5)


def test_quat_multiply_composes_rotations():
    a, b = random_rotations(50, 1), random_rotations(50, 2)
    qa, qb = maps.rotmat_to_quat(jnp.asarray(a)), maps.rotmat_to_quat(jnp.asarray(b))
    np.testing.assert_allclose(quat_to_rotmat(maps.quat_multiply(qa, qb)), a @ b, atol=1e-5)


# ----------------------------------------------------------------------------- canonical


def test_canonical_gaussians_sit_on_the_surface_with_tbn_rotations(sheet):
    verts, faces, vt, ft, uv, canonical = sheet
    n = canonical.num
    assert canonical.positions.shape == (n, 3) and canonical.quats.shape == (n, 4) and canonical.scales.shape == (n, 3)
    # Positions lie on the sheet z = 0.1 sin(3u) cos(2v) with x = u − 0.5, y = v − 0.5 (linear
    # interpolation inside the triangles: close, not exact).
    p = np.asarray(canonical.positions)
    z = 0.1 * np.sin(3 * (p[:, 0] + 0.5)) * np.cos(2 * (p[:, 1] + 0.5))
    assert np.abs(p[:, 2] - z).max() < 5e-3
    # The quaternion is the TBN frame: its third column is the (unit) surface normal, and the
    # tangent points along increasing u (here +x).
    rot = np.asarray(quat_to_rotmat(canonical.quats))
    np.testing.assert_allclose(rot, np.asarray(canonical.frames), atol=1e-5)
    assert np.all(rot[:, 0, 0] > 0.9) and np.all(np.abs(rot[:, 2, 2]) > 0.7)
    # Scales: along T and B, 0.6 × the texel spacing (1/RES of the sheet's ~0.9 extent over 0.9
    # of UV space => about 1/RES in 3D); along N half the smaller one.
    s = np.asarray(canonical.scales)
    np.testing.assert_allclose(np.median(s[:, :2], axis=0), 0.6 / RES, rtol=0.15)
    np.testing.assert_allclose(s[:, 2], 0.5 * s[:, :2].min(1), rtol=1e-6)


def test_neighbour_spacing_matches_a_hand_computed_grid():
    # A flat map whose texel (i, j) sits at (2j, 3i, 0): spacing 2 along u, 3 along v.
    i, j = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    pos = np.stack([2.0 * j, 3.0 * i, 0 * i], -1)
    valid = np.ones((6, 6), bool)
    valid[0, 0] = False
    s = maps.neighbour_spacing(pos, valid)
    np.testing.assert_allclose(s[valid], np.tile([2.0, 3.0], (35, 1)))
    assert np.all(s[0, 0] == 0)
    # Texels without valid neighbours get the median spacing (here of nothing valid: 1e-2).
    lonely = np.zeros((6, 6), bool)
    lonely[2, 2] = lonely[4, 4] = True
    np.testing.assert_allclose(maps.neighbour_spacing(pos, lonely)[2, 2], 1e-2)


# ----------------------------------------------------------------------------- activations


def test_zero_raw_maps_give_exactly_the_canonical_gaussians(sheet):
    *_, canonical = sheet
    g, delta = maps.activate(jnp.zeros((canonical.num, 11)), jnp.zeros((canonical.num, 3)), canonical, 0.01)
    np.testing.assert_array_equal(g.means, canonical.positions)
    np.testing.assert_allclose(g.quats, canonical.quats, atol=1e-7)
    np.testing.assert_allclose(g.scales, canonical.scales, rtol=1e-6)
    np.testing.assert_allclose(g.opacities, 0.7, rtol=1e-6)
    np.testing.assert_allclose(g.colors, 0.5)
    np.testing.assert_array_equal(delta, 0.0)


def test_activations_match_a_numpy_reference(sheet):
    *_, canonical = sheet
    raw, raw_c = random_raw(canonical.num, seed=3, scale=1.5)
    g, delta = maps.activate(raw, raw_c, canonical, 0.02)
    r, rc = np.asarray(raw, np.float64), np.asarray(raw_c, np.float64)
    np.testing.assert_allclose(delta, 0.02 * r[:, :3], rtol=1e-6)
    np.testing.assert_allclose(g.means, np.asarray(canonical.positions) + 0.02 * r[:, :3], atol=1e-6)
    q = r[:, 3:7] + [1, 0, 0, 0]
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    local = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()
    np.testing.assert_allclose(quat_to_rotmat(g.quats), np.asarray(canonical.frames) @ local, atol=1e-5)
    np.testing.assert_allclose(g.scales, np.asarray(canonical.scales) * np.exp(3 * np.tanh(r[:, 7:10] / 3)), rtol=1e-5)
    np.testing.assert_allclose(g.opacities, sigmoid(r[:, 10] + np.log(0.7 / 0.3)), rtol=1e-5)
    np.testing.assert_allclose(g.colors, sigmoid(rc), rtol=1e-5)
    assert np.all(np.asarray(g.scales) <= np.asarray(canonical.scales) * np.exp(3.0) * (1 + 1e-6))


def test_deactivate_inverts_activate(sheet):
    *_, canonical = sheet
    raw, raw_c = random_raw(canonical.num, seed=4)
    raw = raw.at[:, 3].set(0.0)  # the inverse returns the representative with raw_w = 0
    g, _ = maps.activate(raw, raw_c, canonical, 0.01)
    back, back_c = maps.deactivate(g, canonical, 0.01)
    np.testing.assert_allclose(back, raw, atol=2e-4)
    np.testing.assert_allclose(back_c, raw_c, atol=2e-4)
    # And for any raw rotation, the round trip gives the same Gaussians.
    raw2, _ = random_raw(canonical.num, seed=5)
    g2, _ = maps.activate(raw2, raw_c, canonical, 0.01)
    g3, _ = maps.activate(maps.deactivate(g2, canonical, 0.01)[0], raw_c, canonical, 0.01)
    np.testing.assert_allclose(quat_to_rotmat(g3.quats), quat_to_rotmat(g2.quats), atol=1e-5)


def test_activate_has_finite_gradients_that_match_finite_differences(sheet):
    *_, canonical = sheet
    raw, raw_c = random_raw(canonical.num, seed=6)

    def f(raw):
        g, delta = maps.activate(raw, raw_c, canonical, 0.01)
        return jnp.sum(g.means * 3) + jnp.sum(g.quats[:, 1:] ** 2) + jnp.sum(g.scales) + jnp.sum(g.opacities)

    check_grads(f, (raw,), order=1, modes=["rev"], atol=5e-2, rtol=5e-2, eps=1e-2)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(jax.grad(f)(raw)))


# ----------------------------------------------------------------------------- deformation


def _deformed(sheet, tracked_verts, raw_seed=7):
    verts, faces, vt, ft, uv, canonical = sheet
    raw, raw_c = random_raw(canonical.num, seed=raw_seed)
    g, _ = maps.activate(raw, raw_c, canonical, 0.01)
    surf = maps.surface_frames(jnp.asarray(tracked_verts), faces, vt, ft, uv, canonical.texels)
    return g, maps.deform(g, canonical, surf)


def test_deforming_to_the_canonical_mesh_is_the_identity(sheet):
    g, d = _deformed(sheet, sheet[0])
    np.testing.assert_allclose(d.means, g.means, atol=1e-6)
    np.testing.assert_allclose(quat_to_rotmat(d.quats), quat_to_rotmat(g.quats), atol=1e-5)


def test_a_rigidly_moved_mesh_moves_the_gaussians_rigidly(sheet):
    rot = random_rotations(1, seed=11)[0]
    trans = np.array([0.3, -0.2, 1.1], np.float32)
    g, d = _deformed(sheet, sheet[0] @ rot.T + trans)
    np.testing.assert_allclose(d.means, np.asarray(g.means) @ rot.T + trans, atol=1e-5)
    np.testing.assert_allclose(quat_to_rotmat(d.quats), rot @ np.asarray(quat_to_rotmat(g.quats)), atol=1e-5)
    np.testing.assert_array_equal(d.scales, g.scales)
    np.testing.assert_array_equal(d.opacities, g.opacities)
    np.testing.assert_array_equal(d.colors, g.colors)


def test_a_gaussian_at_its_texel_follows_the_surface_of_a_bent_mesh(sheet):
    verts, faces, vt, ft, uv, canonical = sheet
    bent = verts.copy()
    bent[:, 2] += 0.3 * verts[:, 0] ** 2  # a non-rigid bend
    surf = maps.surface_frames(jnp.asarray(bent), faces, vt, ft, uv, canonical.texels)
    at_texel = Gaussians(means=canonical.positions, quats=canonical.quats, scales=canonical.scales,
                         opacities=jnp.full(canonical.num, 0.7), colors=jnp.zeros((canonical.num, 3)))
    d = maps.deform(at_texel, canonical, surf)
    np.testing.assert_allclose(d.means, surf.positions, atol=1e-6)
    np.testing.assert_allclose(quat_to_rotmat(d.quats), np.asarray(surf.frames), atol=1e-5)


def test_rigid_transform_matches_numpy(sheet):
    *_, canonical = sheet
    raw, raw_c = random_raw(canonical.num, seed=8)
    g, _ = maps.activate(raw, raw_c, canonical, 0.01)
    m = np.eye(4, dtype=np.float32)
    m[:3, :3], m[:3, 3] = random_rotations(1, 12)[0], [0.1, 0.2, -0.3]
    out = maps.rigid_transform(g, jnp.asarray(m))
    np.testing.assert_allclose(out.means, np.asarray(g.means) @ m[:3, :3].T + m[:3, 3], atol=1e-6)
    np.testing.assert_allclose(quat_to_rotmat(out.quats), m[:3, :3] @ np.asarray(quat_to_rotmat(g.quats)), atol=1e-5)


def test_root_free_mesh_removes_exactly_the_root_pose():
    model = flame.head_model_from_arrays(procedural_head.build_head_model(12))
    rng = np.random.default_rng(0)
    params = model.zero_params().replace(
        expr=jnp.asarray(rng.normal(0, 0.5, model.n_expr), jnp.float32),
        jaw_pose=jnp.array([0.2, 0.0, 0.0]), neck_pose=jnp.array([0.05, 0.1, 0.0]),
        rotation=jnp.array([0.3, -0.4, 0.2]), translation=jnp.array([0.01, -0.02, 0.5]))
    verts, root = maps.root_free_mesh(model, params)
    no_root = params.replace(rotation=jnp.zeros(3), translation=jnp.zeros(3))
    np.testing.assert_allclose(verts, flame.lbs(model, no_root)[0], atol=1e-5)
    posed = flame.lbs(model, params)[0]
    np.testing.assert_allclose(np.asarray(verts) @ np.asarray(root[:3, :3]).T + np.asarray(root[:3, 3]), posed, atol=1e-5)
