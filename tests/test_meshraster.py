"""Triangle rasterizer (gem_jax/head/meshraster.py) against brute-force NumPy references.

Specification: pixel centres at (j + 0.5, i + 0.5); a pixel is covered when its centre is
inside a triangle (edges inclusive), the nearest triangle wins (exact ties: lowest face index);
barycentrics sum to 1 and reproduce the pixel centre; shared edges leave no holes; the result
does not depend on the chunk size; perspective-correct mode is exact for planar triangles;
project_vertices is the OpenCV pinhole projection.
"""

from __future__ import annotations

import numpy as np
import pytest

from gem_jax.head.meshraster import interpolate, project_vertices, rasterize_triangles


def brute_bary(tri2d: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Barycentrics of point p in a 2D triangle by a float64 3x3 solve."""
    m = np.vstack([tri2d.T, np.ones(3)])
    return np.linalg.solve(m, np.array([p[0], p[1], 1.0]))


def random_soup(rng, n, h, w):
    v = np.stack([rng.uniform(-3, w + 3, 3 * n), rng.uniform(-3, h + 3, 3 * n), rng.uniform(1.0, 5.0, 3 * n)], 1)
    return v, np.arange(3 * n).reshape(n, 3)


@pytest.mark.parametrize("perspective", [False, True])
def test_random_soup_matches_per_pixel_brute_force(perspective):
    rng = np.random.default_rng(3)
    h, w = 19, 26
    v, f = random_soup(rng, 30, h, w)
    r = rasterize_triangles(v, f, h, w, perspective_correct=perspective)
    checked = 0
    for i in range(h):
        for j in range(w):
            p = np.array([j + 0.5, i + 0.5])
            best, best_depth, best_bary, ambiguous = -1, np.inf, None, False
            for k, face in enumerate(f):
                b = brute_bary(v[face, :2], p)
                if abs(b.min()) < 1e-9:
                    ambiguous = True  # centre on an edge: either answer is right
                if b.min() < 0:
                    continue
                z = v[face, 2]
                depth = 1.0 / np.sum(b / z) if perspective else b @ z
                if perspective:
                    b = (b / z) * depth
                if depth < best_depth:
                    best, best_depth, best_bary = k, depth, b
            if ambiguous:
                continue
            checked += 1
            assert r.face_index[i, j] == best, (i, j)
            if best < 0:
                assert np.isinf(r.depth[i, j]) and not r.bary[i, j].any()
            else:
                np.testing.assert_allclose(r.depth[i, j], best_depth, rtol=1e-6)
                np.testing.assert_allclose(r.bary[i, j], best_bary, atol=1e-6)
    assert checked > 0.9 * h * w
    assert 0.2 < r.mask.mean() < 1.0  # the scene really overlaps and leaves gaps


def test_barycentrics_sum_to_one_and_reproduce_pixel_centres():
    rng = np.random.default_rng(5)
    h, w = 40, 33
    v, f = random_soup(rng, 60, h, w)
    r = rasterize_triangles(v, f, h, w)
    m = r.mask
    np.testing.assert_allclose(r.bary[m].sum(-1), 1.0, atol=1e-6)
    assert (r.bary[m] >= 0).all()
    xy = interpolate(v[:, :2], r)
    ii, jj = np.nonzero(m)
    np.testing.assert_allclose(xy[m], np.stack([jj + 0.5, ii + 0.5], 1), atol=1e-3)
    assert not xy[~m].any()


def test_zbuffer_picks_the_nearer_of_two_overlapping_triangles():
    big = np.array([[1.0, 1.0], [30.0, 2.0], [3.0, 25.0]])
    small = np.array([[2.0, 2.0], [20.0, 3.0], [4.0, 18.0]])
    for near_first in (True, False):
        depths = (2.0, 7.0) if near_first else (7.0, 2.0)
        v = np.concatenate([np.c_[big, np.full(3, depths[0])], np.c_[small, np.full(3, depths[1])]])
        f = np.array([[0, 1, 2], [3, 4, 5]])
        r = rasterize_triangles(v, f, 32, 32)
        inside_small = np.zeros((32, 32), bool)
        for i in range(32):
            for j in range(32):
                inside_small[i, j] = brute_bary(small, np.array([j + 0.5, i + 0.5])).min() > 1e-9
        nearer = 0 if near_first else 1
        assert inside_small.sum() > 50
        assert (r.face_index[inside_small] == nearer).all()
        np.testing.assert_allclose(r.depth[inside_small], 2.0)


def test_depth_ties_go_to_the_lowest_face_index_for_any_chunk_size():
    tri = np.array([[0.0, 0.0, 1.0], [16.0, 0.0, 1.0], [0.0, 16.0, 1.0]])
    v = np.concatenate([tri, tri, tri])
    f = np.array([[3, 4, 5], [0, 1, 2], [6, 7, 8]])
    for chunk in (1, 5, 1 << 20):
        r = rasterize_triangles(v, f, 16, 16, chunk_size=chunk)
        assert set(np.unique(r.face_index)) == {-1, 0}


def test_result_does_not_depend_on_chunk_size():
    rng = np.random.default_rng(8)
    v, f = random_soup(rng, 80, 37, 41)
    ref = rasterize_triangles(v, f, 37, 41)
    for chunk in (1, 13, 500):
        r = rasterize_triangles(v, f, 37, 41, chunk_size=chunk)
        np.testing.assert_array_equal(r.face_index, ref.face_index)
        np.testing.assert_array_equal(r.bary, ref.bary)
        np.testing.assert_array_equal(r.depth, ref.depth)


def tessellated_square(n, lo, hi, rng, jitter):
    g = np.linspace(lo, hi, n + 1)
    x, y = np.meshgrid(g, g)
    step = (hi - lo) / n
    inner = np.zeros_like(x, bool)
    inner[1:-1, 1:-1] = True
    x = x + inner * rng.uniform(-jitter, jitter, x.shape) * step
    y = y + inner * rng.uniform(-jitter, jitter, y.shape) * step
    v = np.stack([x.ravel(), y.ravel(), rng.uniform(1, 2, x.size)], 1)
    idx = np.arange((n + 1) ** 2).reshape(n + 1, n + 1)
    a, b, c, d = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel(), idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    flip = rng.random(a.size) < 0.5  # both diagonals, mixed windings
    f1 = np.where(flip[:, None], np.stack([a, b, d], 1), np.stack([a, b, c], 1))
    f2 = np.where(flip[:, None], np.stack([a, d, c], 1), np.stack([b, d, c], 1))
    return v, np.concatenate([f1, f2[:, ::-1]])


@pytest.mark.parametrize("jitter", [0.0, 0.3])
def test_shared_edges_of_a_tessellated_square_leave_no_holes(jitter):
    rng = np.random.default_rng(11)
    # Grid lines through pixel centres (x = 4.5, 5.5, ...): every edge hits centres exactly.
    v, f = tessellated_square(12, 4.5, 40.5, rng, jitter)
    r = rasterize_triangles(v, f, 48, 45)
    expect = np.zeros((48, 45), bool)
    expect[4:41, 4:41] = True  # centres 4.5 .. 40.5 inclusive
    np.testing.assert_array_equal(r.mask, expect)


def test_fan_around_a_vertex_on_a_pixel_centre_covers_it():
    centre = np.array([10.5, 10.5])
    ang = np.linspace(0, 2 * np.pi, 8, endpoint=False) + 0.1
    ring = centre + 6.3 * np.stack([np.cos(ang), np.sin(ang)], 1)
    v = np.c_[np.vstack([centre, ring]), np.ones(9)]
    f = np.array([[0, 1 + k, 1 + (k + 1) % 8] for k in range(8)])
    r = rasterize_triangles(v, f, 21, 21)
    assert r.face_index[10, 10] >= 0
    for i in range(21):
        for j in range(21):
            if np.hypot(j + 0.5 - 10.5, i + 0.5 - 10.5) < 5.5:  # well inside the octagon
                assert r.face_index[i, j] >= 0, (i, j)


def test_a_tiny_triangle_covers_exactly_the_pixel_whose_centre_it_contains():
    v = np.array([[6.3, 2.2, 1.0], [6.8, 2.3, 1.0], [6.4, 2.9, 1.0]])  # around (6.5, 2.5)
    r = rasterize_triangles(v, np.array([[0, 1, 2]]), 5, 9)
    assert list(zip(*np.nonzero(r.mask))) == [(2, 6)]


def test_backface_culling_keeps_triangles_facing_an_opencv_camera():
    # Camera at the origin looking down +z; the triangle's outward normal points at it (-z).
    world = np.array([[0.0, 0.0, 5.0], [0.0, 1.0, 5.0], [1.0, 0.0, 5.0]])
    assert np.cross(world[1] - world[0], world[2] - world[0])[2] < 0
    K = np.array([[20.0, 0, 8], [0, 20.0, 8], [0, 0, 1]])
    uvz = project_vertices(world, np.eye(4), K)
    front, back = np.array([[0, 1, 2]]), np.array([[0, 2, 1]])
    assert rasterize_triangles(uvz, front, 16, 16, cull_backfaces=True).mask.any()
    assert not rasterize_triangles(uvz, back, 16, 16, cull_backfaces=True).mask.any()
    assert rasterize_triangles(uvz, back, 16, 16).mask.any()


def random_camera(rng):
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    viewmat = np.eye(4)
    viewmat[:3, :3], viewmat[:3, 3] = q, rng.normal(size=3) * 0.2 + [0, 0, 4]
    fx, fy, cx, cy = rng.uniform(40, 60), rng.uniform(40, 60), rng.uniform(20, 30), rng.uniform(15, 25)
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    return viewmat, K


def test_project_vertices_matches_a_float64_pinhole_projection():
    rng = np.random.default_rng(2)
    viewmat, K = random_camera(rng)
    pts = rng.normal(size=(50, 3))
    got = project_vertices(pts.astype(np.float32), viewmat, K)
    for p, g in zip(pts, got):
        x, y, z = viewmat[:3, :3] @ p + viewmat[:3, 3]
        np.testing.assert_allclose(g, [K[0, 0] * x / z + K[0, 2], K[1, 1] * y / z + K[1, 2], z], rtol=1e-6)


def test_perspective_correct_depth_and_barycentrics_are_exact_for_a_planar_triangle():
    rng = np.random.default_rng(4)
    viewmat, K = random_camera(rng)
    world = rng.normal(size=(3, 3)) * 0.8
    uvz = project_vertices(world, viewmat, K)
    r = rasterize_triangles(uvz, np.array([[0, 1, 2]]), 40, 50, perspective_correct=True)
    assert r.mask.sum() > 30
    cam = world @ viewmat[:3, :3].T + viewmat[:3, 3]
    normal = np.cross(cam[1] - cam[0], cam[2] - cam[0])
    ii, jj = np.nonzero(r.mask)
    rays = np.linalg.solve(K, np.stack([jj + 0.5, ii + 0.5, np.ones_like(ii)]).astype(float)).T
    exact = (normal @ cam[0]) / (rays @ normal)  # ray-plane intersection depth
    np.testing.assert_allclose(r.depth[r.mask], exact, rtol=1e-5)
    # The perspective-correct barycentrics give the 3D point seen through the pixel centre.
    seen = interpolate(cam, r)[r.mask]
    np.testing.assert_allclose(seen, rays * exact[:, None], rtol=1e-4, atol=1e-5)


def test_interpolate_per_vertex_and_per_corner_agree():
    rng = np.random.default_rng(6)
    v, f = random_soup(rng, 20, 16, 16)
    attr = rng.normal(size=(v.shape[0], 4)).astype(np.float32)
    r = rasterize_triangles(v, f, 16, 16)
    a = interpolate(attr, r)
    b = interpolate(attr[f], r)
    assert a.shape == (16, 16, 4) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-6)
    m = r.mask
    ref = np.einsum("pk,pkc->pc", r.bary[m].astype(float), attr[f[r.face_index[m]]])
    np.testing.assert_allclose(a[m], ref, rtol=1e-5, atol=1e-6)
    assert not a[~m].any()


def test_unusable_faces_are_skipped():
    v = np.array([[1, 1, 1.0], [9, 1, 1.0], [1, 9, 1.0], [np.nan, 2, 1.0], [5, 5, -1.0], [3, 3, 1.0]])
    f = np.array([[0, 1, 3], [0, 0, 1], [0, 1, 4], [0, 1, 5], [0, 5, 5]])  # NaN, degenerate, behind, ok
    r = rasterize_triangles(v, f, 10, 10, near=0.01)
    assert set(np.unique(r.face_index)) <= {-1, 3}
    assert (r.face_index == 3).any()


def test_bad_shapes_raise_naming_the_argument():
    v, f = np.zeros((4, 3)), np.array([[0, 1, 2]])
    with pytest.raises(ValueError, match="vertices"):
        rasterize_triangles(np.zeros((4, 2)), f, 8, 8)
    with pytest.raises(ValueError, match="faces"):
        rasterize_triangles(v, np.array([[0, 1]]), 8, 8)
    with pytest.raises(ValueError, match="faces"):
        rasterize_triangles(v, np.array([[0, 1, 9]]), 8, 8)
    with pytest.raises(ValueError, match="height"):
        rasterize_triangles(v, f, 0, 8)
    with pytest.raises(ValueError, match="viewmat"):
        project_vertices(v, np.eye(3), np.eye(3))
    with pytest.raises(ValueError, match="attr"):
        interpolate(np.zeros((2, 3, 1)), rasterize_triangles(v, f, 8, 8))


def test_rows_the_triangle_misses_by_a_hair_are_empty_not_huge():
    # A horizontal edge 5e-7 px beyond a row of centres: inside the bounding box margin, but
    # outside the triangle; such rows must yield no pixels (and no integer overflow).
    for eps in (5e-7, 1e-9, -1e-9):
        v = np.array([[4.0, 5.5 + eps, 1.0], [12.0, 5.5 + eps, 1.0], [8.0, 9.0, 1.0]])
        r = rasterize_triangles(v, np.array([[0, 1, 2], [0, 2, 1]]), 12, 14)
        covered_rows = set(np.nonzero(r.mask)[0])
        assert max(covered_rows) == 8 and min(covered_rows) in (5, 6)
        if eps > 1e-8:
            assert min(covered_rows) == 6
