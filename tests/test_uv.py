"""UV machinery (gem_jax/head/uv.py) against independent float64 NumPy references.

Specification: texel (i, j) has its centre at ((j + 0.5)/R, (i + 0.5)/R) (no v flip); a texel
is valid iff its centre lies in some UV triangle, and its barycentrics reproduce the centre;
position/normal maps interpolate the mesh over that face (zeros when invalid); TBN frames are
proper rotations with N = normal map and T along ∂p/∂u, identity when invalid, NaN-free on
degenerate input; rigid motions of the mesh move the maps and frames rigidly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax.head.uv import (
    UVRaster,
    degenerate_faces,
    drop_faces,
    normal_map,
    position_map,
    rasterize_uv,
    tbn_frames,
    texel_centers,
    vertex_normals,
)

R = 24


def bary64(tri2d, p):
    return np.linalg.solve(np.vstack([np.asarray(tri2d, float).T, np.ones(3)]), [p[0], p[1], 1.0])


def grid_mesh(rng, n=5, lo=0.08, hi=0.92):
    """A UV-parametrised wavy sheet: vt on a jittered grid, vertices a random smooth 3D embedding."""
    g = np.linspace(lo, hi, n + 1)
    u, v = np.meshgrid(g, g)
    step = (hi - lo) / n
    u[1:-1, 1:-1] += rng.uniform(-0.25, 0.25, (n - 1, n - 1)) * step
    v[1:-1, 1:-1] += rng.uniform(-0.25, 0.25, (n - 1, n - 1)) * step
    vt = np.stack([u.ravel(), v.ravel()], 1)
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([b, d, c], 1)])
    z = 0.2 * np.sin(3 * vt[:, 0] + 1) * np.cos(2 * vt[:, 1]) + rng.normal(0, 0.02, len(vt))
    verts = np.stack([1.3 * vt[:, 0], 0.9 * vt[:, 1] + 0.2 * vt[:, 0], z], 1) + rng.normal(0, 0.01, (len(vt), 3))
    return verts, faces, vt, faces.copy()


def random_rotation(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    return q * np.sign(np.linalg.det(q))


def test_uv_raster_matches_a_brute_force_point_in_triangle_loop():
    rng = np.random.default_rng(0)
    vt = rng.uniform(0, 1, (30, 2))
    ft = rng.permutation(30).reshape(10, 3)  # overlapping random layout
    uv = rasterize_uv(vt, ft, R)
    assert uv.face_index.shape == (R, R) and uv.bary.shape == (R, R, 3) and uv.valid.shape == (R, R)
    assert uv.face_index.dtype == np.int32 and uv.bary.dtype == np.float32 and uv.valid.dtype == bool
    for i in range(R):
        for j in range(R):
            centre = ((j + 0.5) / R, (i + 0.5) / R)
            mins = np.array([bary64(vt[f], centre).min() for f in ft])
            if (mins > 1e-9).any():
                assert uv.valid[i, j], (i, j)
            if not uv.valid[i, j]:
                assert (mins < 1e-6).all() and uv.face_index[i, j] == -1 and not uv.bary[i, j].any()
                continue
            k = uv.face_index[i, j]
            assert mins[k] > -1e-6 and k == np.flatnonzero(mins > -1e-6).min()  # lowest face wins
            b = uv.bary[i, j].astype(float)
            np.testing.assert_allclose(b.sum(), 1.0, atol=1e-6)
            np.testing.assert_allclose(b @ vt[ft[k]], centre, atol=1e-6)
    assert 0.2 < uv.valid.mean() < 0.95


def test_row_index_grows_with_v_no_flip():
    vt = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.2]])  # a thin sliver along v = 0
    uv = rasterize_uv(vt, np.array([[0, 1, 2]]), 10)
    rows = np.nonzero(uv.valid)[0]
    assert rows.min() == 0 and rows.max() == 1  # v in [0, 0.2] are rows 0 and 1 (top)
    c = texel_centers(10)
    np.testing.assert_allclose(c[3, 7], [0.75, 0.35])  # (u, v) of row 3, column 7


def reference_position_and_normal(verts, faces, vt, ft, uv):
    """Float64 NumPy: barycentrics re-solved from the texel centre, loop-accumulated normals."""
    vn = np.zeros_like(verts)
    for f in faces:
        vn[f] += np.cross(verts[f[1]] - verts[f[0]], verts[f[2]] - verts[f[0]])
    vn /= np.linalg.norm(vn, axis=1, keepdims=True)
    pos, nrm = np.zeros((R, R, 3)), np.zeros((R, R, 3))
    for i, j in zip(*np.nonzero(uv.valid)):
        k = uv.face_index[i, j]
        b = bary64(vt[ft[k]], ((j + 0.5) / R, (i + 0.5) / R))
        pos[i, j] = b @ verts[faces[k]]
        n = b @ vn[faces[k]]
        nrm[i, j] = n / np.linalg.norm(n)
    return pos, nrm


def test_position_and_normal_maps_match_float64_numpy():
    rng = np.random.default_rng(1)
    verts, faces, vt, ft = grid_mesh(rng)
    uv = rasterize_uv(vt, ft, R)
    pos = np.asarray(position_map(jnp.asarray(verts, jnp.float32), faces, uv))
    nrm = np.asarray(normal_map(jnp.asarray(verts, jnp.float32), faces, uv))
    ref_pos, ref_nrm = reference_position_and_normal(verts, faces, vt, ft, uv)
    m = uv.valid
    assert m.mean() > 0.6
    np.testing.assert_allclose(pos, ref_pos, atol=2e-6)
    np.testing.assert_allclose(nrm, ref_nrm, atol=2e-5)
    np.testing.assert_allclose(np.linalg.norm(nrm[m], axis=-1), 1.0, atol=1e-6)
    assert not pos[~m].any() and not nrm[~m].any()


def check_rotations(frames, valid):
    f = np.asarray(frames, float)
    eye = np.broadcast_to(np.eye(3), f.shape)
    np.testing.assert_allclose(np.einsum("...ji,...jk->...ik", f, f), eye, atol=1e-5)
    np.testing.assert_allclose(np.linalg.det(f), 1.0, atol=1e-5)
    np.testing.assert_array_equal(f[~valid], eye[~valid])


def test_tbn_frames_are_rotations_with_the_normal_map_and_the_uv_tangent():
    rng = np.random.default_rng(2)
    verts, faces, vt, ft = grid_mesh(rng)
    uv = rasterize_uv(vt, ft, R)
    frames = np.asarray(tbn_frames(jnp.asarray(verts, jnp.float32), faces, vt, ft, uv))
    check_rotations(frames, uv.valid)
    nrm = np.asarray(normal_map(jnp.asarray(verts, jnp.float32), faces, uv))
    np.testing.assert_allclose(frames[..., 2][uv.valid], nrm[uv.valid], atol=1e-6)
    # Independent tangent: solve [e1 e2] = [dp/du dp/dv] [duv1 duv2], Gram-Schmidt against N.
    for i, j in zip(*np.nonzero(uv.valid)):
        k = uv.face_index[i, j]
        p, t = verts[faces[k]], vt[ft[k]]
        dp = np.stack([p[1] - p[0], p[2] - p[0]], 1) @ np.linalg.inv(np.stack([t[1] - t[0], t[2] - t[0]], 1))
        n = nrm[i, j]
        tan = dp[:, 0] - (dp[:, 0] @ n) * n
        np.testing.assert_allclose(frames[i, j, :, 0], tan / np.linalg.norm(tan), atol=1e-4)
        assert frames[i, j, :, 1] @ dp[:, 1] > 0  # no mirrored islands here: B along +dp/dv


def test_flat_sheet_frames_are_the_axes():
    rng = np.random.default_rng(3)
    _, faces, vt, ft = grid_mesh(rng)
    verts = np.c_[vt, np.zeros(len(vt))]  # p = (u, v, 0); the faces wind around +z
    uv = rasterize_uv(vt, ft, R)
    frames = np.asarray(tbn_frames(jnp.asarray(verts), faces, vt, ft, uv))
    np.testing.assert_allclose(frames[uv.valid], np.broadcast_to(np.eye(3), frames[uv.valid].shape), atol=1e-6)


def test_rigid_motion_moves_positions_and_frames_rigidly():
    rng = np.random.default_rng(4)
    verts, faces, vt, ft = grid_mesh(rng)
    uv = rasterize_uv(vt, ft, R)
    rot, shift = random_rotation(rng), rng.normal(size=3)
    moved = verts @ rot.T + shift
    pos0 = np.asarray(position_map(verts, faces, uv))
    pos1 = np.asarray(position_map(moved, faces, uv))
    m = uv.valid
    np.testing.assert_allclose(pos1[m], pos0[m] @ rot.T + shift, atol=1e-5)
    assert not pos1[~m].any()
    f0 = np.asarray(tbn_frames(verts, faces, vt, ft, uv))
    f1 = np.asarray(tbn_frames(moved, faces, vt, ft, uv))
    np.testing.assert_allclose(f1[m], np.einsum("ab,pbc->pac", rot, f0[m]), atol=1e-5)
    np.testing.assert_array_equal(f1[~m], np.broadcast_to(np.eye(3), f1[~m].shape))


def test_degenerate_uv_and_mesh_triangles_give_rotations_and_finite_gradients():
    rng = np.random.default_rng(5)
    verts, faces, vt, ft = grid_mesh(rng, n=4)
    vt = vt.copy()
    # Collapse some UV triangles to a line (they still cover texels on that line only, if any)
    # and some mesh triangles to a point / a line.
    vt[ft[3, 1]] = vt[ft[3, 0]] + 0.5 * (vt[ft[3, 2]] - vt[ft[3, 0]])
    verts = verts.copy()
    verts[faces[7, 1]] = verts[faces[7, 0]]
    verts[faces[12, 2]] = 0.5 * (verts[faces[12, 0]] + verts[faces[12, 1]])
    # Extra faces that do own texels: a zero-area *mesh* face with a proper UV triangle, and a
    # UV sliver (2e-10 high, straddling a row of texel centres; zero area in float32) with a
    # proper mesh face.
    row = (R - 1.5) / R
    sliver = [[0.5 / R, row - 1e-10], [9.5 / R, row - 1e-10], [5.5 / R, row + 1e-10]]
    vt = np.vstack([vt, [[0.0, 0.0], [0.08, 0.0], [0.0, 0.08]], sliver])
    n = len(vt)
    ft = np.vstack([ft, [[n - 6, n - 5, n - 4], [n - 3, n - 2, n - 1]]])
    faces = np.vstack([faces, [[0, 0, 0], [1, 2, 3]]])
    uv = rasterize_uv(vt, ft, R)
    assert (uv.face_index == len(faces) - 2).any() and (uv.face_index == len(faces) - 1).any()
    fn = jax.jit(lambda v: tbn_frames(v, faces, vt, ft, uv))
    frames = np.asarray(fn(jnp.asarray(verts, jnp.float32)))
    assert np.isfinite(frames).all()
    check_rotations(frames, uv.valid)

    def loss(v):
        return jnp.sum(tbn_frames(v, faces, vt, ft, uv) ** 3) + jnp.sum(normal_map(v, faces, uv) ** 3)

    grad = jax.jit(jax.grad(loss))(jnp.asarray(verts, jnp.float32))
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0


def test_uv_raster_is_a_pytree_usable_as_a_jit_argument():
    rng = np.random.default_rng(6)
    verts, faces, vt, ft = grid_mesh(rng, n=3)
    uv = rasterize_uv(vt, ft, 16)
    assert isinstance(uv, UVRaster) and uv.resolution == 16
    traced = jax.jit(lambda v, u: position_map(v, faces, u))(jnp.asarray(verts), uv)
    np.testing.assert_allclose(traced, position_map(jnp.asarray(verts), faces, uv), atol=1e-6)
    vn = np.asarray(vertex_normals(jnp.asarray(verts), faces))
    np.testing.assert_allclose(np.linalg.norm(vn, axis=1), 1.0, atol=1e-6)


def test_bad_shapes_raise_naming_the_argument():
    rng = np.random.default_rng(7)
    verts, faces, vt, ft = grid_mesh(rng, n=2)
    uv = rasterize_uv(vt, ft, 8)
    with pytest.raises(ValueError, match="vt"):
        rasterize_uv(vt[:, :1], ft, 8)
    with pytest.raises(ValueError, match="ft"):
        rasterize_uv(vt, ft[:, :2], 8)
    with pytest.raises(ValueError, match="resolution"):
        rasterize_uv(vt, ft, 0)
    with pytest.raises(ValueError, match="vertices"):
        position_map(verts[:, :2], faces, uv)
    with pytest.raises(ValueError, match="faces"):
        normal_map(verts, faces[:, :2], uv)
    with pytest.raises(ValueError, match="ft"):
        tbn_frames(verts, faces, vt, ft[:-1], uv)


# ----------------------------------------------------------------------------- conditioning


def test_texels_on_faces_without_area_are_dropped():
    rng = np.random.default_rng(8)
    verts, faces, vt, ft = grid_mesh(rng)
    verts = verts.copy()
    verts[faces[9, 1]] = verts[faces[9, 0]]  # face 9 collapses to a line
    drop = degenerate_faces(verts, faces)
    area = np.linalg.norm(np.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]]), axis=1)
    np.testing.assert_array_equal(drop, area <= 1e-4 * np.median(area))
    assert drop[9] and drop.sum() >= 1
    uv = rasterize_uv(vt, ft, R)
    kept = drop_faces(uv, drop)
    on_dropped = uv.valid & drop[np.maximum(uv.face_index, 0)]
    assert on_dropped.any()
    np.testing.assert_array_equal(kept.valid, uv.valid & ~on_dropped)
    np.testing.assert_array_equal(kept.face_index[kept.valid], uv.face_index[kept.valid])
    assert (kept.face_index[~kept.valid] == -1).all() and not kept.bary[~kept.valid].any()


def _synthetic_head_meshes(mesh_resolution=60, frames=3):
    """The quickstart's procedural head (float64): its canonical mesh and a few tracked frames."""
    from gem_jax.data import procedural_head, synthetic
    from gem_jax.head import flame
    from gem_jax.teacher import maps

    model = flame.head_model_from_arrays(procedural_head.build_head_model(mesh_resolution))
    params = [synthetic.canonical_params(model.n_expr)]
    params += [{k: v[i:i + 1] for k, v in s.params.items()} for s in synthetic.make_sequences(0, 2, frames)
               for i in range(frames)]
    as64 = lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.asarray(a).dtype, jnp.floating) else a  # noqa: E731
    with jax.enable_x64(True):
        model64 = jax.tree.map(as64, model)
        meshes = [np.asarray(maps.root_free_mesh(model64, model64.zero_params().replace(
            **{k: jnp.asarray(v[0], jnp.float64) for k, v in p.items()}))[0]) for p in params]
    return model, meshes


def _local_height(verts, faces, drop, face_of_texel):
    """Per texel, the smallest altitude of its face and of the faces around its corners (the
    geometry its frame depends on), dropped faces aside."""
    p = verts[faces]
    longest = np.max([np.linalg.norm(p[:, a] - p[:, b], axis=1) for a, b in ((0, 1), (1, 2), (2, 0))], axis=0)
    height = np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1) / longest
    height = np.where(drop, np.inf, height)
    at_vertex = np.full(len(verts), np.inf)
    np.minimum.at(at_vertex, faces.reshape(-1), np.repeat(height, 3))
    return np.minimum(height[face_of_texel], at_vertex[faces[face_of_texel]].min(1))


def test_frames_are_well_conditioned_on_the_synthetic_head():
    """Every texel's frame is orthonormal and a Lipschitz function of the vertices, with a constant
    set by the local geometry: a nudge δ of the mesh turns it by at most 10·δ/h (h: the smallest
    altitude of the faces it depends on). So float32 rounding, which differs between x86-64 CPUs
    (AVX2 / AVX-512, FMA contraction, summation order) by ~1e-7 relative, moves frames by
    ~1e-7·|x|/h ≲ 1e-4 and no more. Before the degenerate faces were dropped, the same nudge
    turned some frames by 180°; that is checked too, so this test can fail."""
    model, meshes = _synthetic_head_meshes()
    faces, res = np.asarray(model.faces), 64
    drop = degenerate_faces(meshes[0], faces)
    full = rasterize_uv(model.vt, model.ft, res)
    uv = drop_faces(full, drop)
    assert 0 < (full.valid & ~uv.valid).sum() < 0.2 * full.valid.sum()
    texels = np.flatnonzero(uv.valid.reshape(-1))
    face_of_texel = uv.face_index.reshape(-1)[texels]
    rng = np.random.default_rng(9)
    delta = 1e-6
    with jax.enable_x64(True):
        uv64 = uv.replace(bary=np.asarray(uv.bary, np.float64))
        vt64 = jnp.asarray(np.asarray(model.vt, np.float64))
        frames64 = jax.jit(lambda v, u: tbn_frames(v, faces, vt64, model.ft, u).reshape(-1, 3, 3))
        f64 = [np.asarray(frames64(v, uv64))[texels] for v in meshes]
        nudged = [np.asarray(frames64(v + rng.normal(0, delta, v.shape), uv64))[texels] for v in meshes]
        full64 = full.replace(bary=np.asarray(full.bary, np.float64))
        unstable = np.abs(np.asarray(frames64(meshes[1] + rng.normal(0, delta, meshes[1].shape), full64))
                          - np.asarray(frames64(meshes[1], full64))).max()
    assert unstable > 1.0, "the faces without area are what makes frames ill-conditioned"
    frames32 = jax.jit(lambda v: tbn_frames(v, faces, model.vt, model.ft, uv).reshape(-1, 3, 3)[texels])
    for v, f, g in zip(meshes, f64, nudged):
        h = _local_height(v, faces, drop, face_of_texel)
        turn = np.abs(g - f).reshape(len(texels), -1).max(-1)
        assert np.all(turn <= 10 * delta / h), f"worst ratio {np.max(turn * h / delta):.1f}"
        f32 = np.asarray(frames32(jnp.asarray(v, jnp.float32)), np.float64)
        check_rotations(f32, np.ones(len(texels), bool))
        np.testing.assert_allclose(np.einsum("nji,njk->nik", f32, f32), np.broadcast_to(np.eye(3), f32.shape), atol=1e-6)
        rounding = np.finfo(np.float32).eps * np.abs(v).max()
        err = np.abs(f32 - f).reshape(len(texels), -1).max(-1)
        assert np.all(err <= 10 * rounding / h + 1e-6), f"worst float32 error {err.max():.1e}"
