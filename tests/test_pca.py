"""Per-modality PCA, the collect layout, and QR re-orthonormalisation (gem_jax.eigen.pca / .qr).

References are independent float64 numpy computations on fresh random (never zero) data.
"""

import warnings

import jax
import numpy as np
import pytest

from gem_jax.eigen import pca as P
from gem_jax.eigen import qr as Q


def low_rank(rng, n, d, rank, noise=1e-3):
    """Random data with a well-separated spectrum: offset + rank-`rank` signal + small noise."""
    spectrum = np.geomspace(10.0, 0.5, rank)
    basis = np.linalg.qr(rng.standard_normal((d, rank)))[0].T
    x = (rng.standard_normal((n, rank)) * spectrum) @ basis
    return x + noise * rng.standard_normal((n, d)) + rng.uniform(0.5, 2.0, d)


def np_sign_fix(u):
    """The documented convention, in numpy: the largest-|.| entry of each row positive."""
    idx = np.argmax(np.abs(u), axis=1)
    return u * np.where(u[np.arange(len(u)), idx] < 0, -1.0, 1.0)[:, None]


def sin_max_angle(a, b):
    """sin of the largest principal angle between row spaces (float64, orthonormalised)."""
    qa, qb = np.linalg.qr(a.T)[0], np.linalg.qr(b.T)[0]
    cos = np.linalg.svd(qa.T @ qb, compute_uv=False)
    return float(np.sqrt(max(0.0, 1.0 - cos.min() ** 2)))


@pytest.fixture(scope="module")
def data():
    return low_rank(np.random.default_rng(1), 40, 1200, 10)


@pytest.fixture(scope="module")
def reference(data):
    xc = data - data.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    return s, np_sign_fix(vt)


@pytest.mark.parametrize("method", ["svd", "gram"])
def test_pca_matches_numpy_svd(data, reference, method):
    s, vt = reference
    n, k = data.shape[0], 6
    res = P.pca(data, k, method=method, name="position")
    assert res.method == method and res.modality == "position"
    U, sigma, coeffs = (np.asarray(a, np.float64) for a in (res.U, res.sigma, res.coeffs))
    assert U.shape == (k, data.shape[1]) and coeffs.shape == (n, k)
    np.testing.assert_allclose(np.asarray(res.mean), data.mean(0), rtol=1e-5)
    np.testing.assert_allclose(U @ U.T, np.eye(k), atol=1e-5)
    # subspace: principal angles and projector difference against float64 numpy
    assert sin_max_angle(U, vt[:k]) < 1e-4
    assert np.linalg.norm(U.T @ U - vt[:k].T @ vt[:k], 2) < 1e-4
    # components one by one, with the documented sign convention
    np.testing.assert_allclose(U, vt[:k], atol=1e-4)
    np.testing.assert_allclose(sigma, s[:k] / np.sqrt(n - 1), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(res.explained), s[:k] ** 2 / np.sum(s**2), rtol=1e-3)
    # coefficients are in sigma units: zero mean, unit sample std
    np.testing.assert_allclose(coeffs.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(coeffs.std(0, ddof=1), 1.0, rtol=1e-4)
    # reconstruction error equals the discarded variance
    recon = np.asarray(res.mean, np.float64) + (coeffs * sigma) @ U
    err = np.sum((data - recon) ** 2) / (n - 1)
    np.testing.assert_allclose(err, np.sum(s[k:] ** 2) / (n - 1), rtol=1e-3)
    np.testing.assert_allclose(float(np.sum(res.spectrum)), 1.0, rtol=1e-4)


def test_svd_and_gram_paths_agree(data):
    a = P.pca(data, 8, method="svd")
    b = P.pca(data, 8, method="gram")
    np.testing.assert_allclose(np.asarray(a.U), np.asarray(b.U), atol=1e-4)
    np.testing.assert_allclose(np.asarray(a.sigma), np.asarray(b.sigma), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(a.coeffs), np.asarray(b.coeffs), atol=1e-3)
    np.testing.assert_allclose(np.asarray(a.spectrum[:8]), np.asarray(b.spectrum[:8]), rtol=1e-3)


def test_auto_picks_method_by_shape(data):
    assert P.pca(data, 3).method == "gram"  # D = 1200 >= 4 N
    assert P.pca(data[:, :100], 3).method == "svd"  # D = 100 < 4 N


def test_sign_convention_is_deterministic(data):
    a = P.pca(data, 5)
    b = P.pca(data, 5)
    np.testing.assert_array_equal(np.asarray(a.U), np.asarray(b.U))
    U = np.asarray(a.U)
    assert np.all(U[np.arange(5), np.argmax(np.abs(U), axis=1)] > 0)
    neg = P.pca(-data, 5)  # the same subspace: same U, negated coefficients
    np.testing.assert_allclose(np.asarray(neg.U), U, atol=1e-5)
    np.testing.assert_allclose(np.asarray(neg.coeffs), -np.asarray(a.coeffs), atol=1e-3)


@pytest.mark.parametrize("method", ["svd", "gram"])
def test_components_capped_at_rank_and_n_minus_1(method):
    rng = np.random.default_rng(2)
    exact = rng.standard_normal((30, 3)) @ rng.standard_normal((3, 400)) + 1.0  # rank 3 after centring
    with pytest.warns(P.ComponentCapWarning, match="using 3"):
        res = P.pca(exact, 10, method=method)
    assert res.num_components == 3 and res.requested == 10
    np.testing.assert_allclose(np.asarray(res.U @ res.U.T), np.eye(3), atol=1e-5)
    short = rng.standard_normal((5, 400))
    with pytest.warns(P.ComponentCapWarning, match="N-1 = 4"):
        assert P.pca(short, 10, method=method).num_components == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.pca(short, 4, method=method)  # no cap, no warning


def test_wide_matrix_without_dxd():
    """D = 65,536 texels x 4 channels, the full-size rotation modality (a D×D would be 275 GB)."""
    rng = np.random.default_rng(3)
    n, d, k = 12, 65536 * 4, 5
    x = (rng.standard_normal((n, 6)) * [5, 4, 3, 2, 1, 0.5]) @ rng.standard_normal((6, d)).astype(np.float32)
    res = P.pca(x, k)
    assert res.method == "gram" and res.U.shape == (k, d)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    assert sin_max_angle(np.asarray(res.U, np.float64), vt[:k]) < 1e-3
    np.testing.assert_allclose(np.asarray(res.sigma), s[:k] / np.sqrt(n - 1), rtol=1e-3)


def test_bad_input_is_an_error():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 50))
    x[3, 7] = np.nan
    with pytest.raises(ValueError, match=r"NaN/Inf values in rows \[3\]"):
        P.pca(x, 2, name="scale")
    with pytest.raises(ValueError, match="zero variance"):
        P.pca(np.ones((4, 9)) * 0.3, 2)
    with pytest.raises(ValueError, match=r"shape \(N >= 2"):
        P.pca(rng.standard_normal(9), 2)
    with pytest.raises(ValueError, match="method"):
        P.pca(rng.standard_normal((4, 9)), 2, method="eig")


def random_collect(rng, n=9, h=7, w=6):
    valid = rng.random((h, w)) < 0.6
    valid[0, 0] = True
    t = int(valid.sum())
    mats = {m: rng.uniform(0.1, 1.0, (n, t * P.CHANNELS[m])).astype(np.float32) for m in P.MODALITIES}
    return mats, rng.uniform(0, 1, (t, 3)), valid, np.arange(100, 100 + n)


def test_collect_layout_round_trip(tmp_path):
    mats, colors, valid, steps = random_collect(np.random.default_rng(5))
    P.write_collect(tmp_path / "collect", mats, colors, valid, steps)
    got = P.read_collect(tmp_path / "collect")
    for m in P.MODALITIES:
        assert isinstance(got.matrices[m], np.memmap)
        np.testing.assert_array_equal(got.matrices[m], mats[m])
    np.testing.assert_array_equal(got.texels, np.argwhere(valid))
    np.testing.assert_allclose(got.colors, colors, rtol=1e-7)
    np.testing.assert_array_equal(got.timesteps, steps)
    assert got.num_timesteps == 9 and got.num_gaussians == valid.sum()
    with pytest.warns(P.ComponentCapWarning):  # defaults 50/40/40/50 capped at N - 1 = 8
        res = P.fit_modalities(got.matrices, method="svd")
    assert {m: r.num_components for m, r in res.items()} == dict.fromkeys(P.MODALITIES, 8)
    report = P.variance_report(res)
    for m in P.MODALITIES:
        assert m in report
    assert "k95" in report and "8:100.00%" in report


def test_collect_layout_errors_name_the_file(tmp_path):
    mats, colors, valid, steps = random_collect(np.random.default_rng(6))
    root = P.write_collect(tmp_path / "c", mats, colors, valid, steps)
    (root / "scale.npy").unlink()
    with pytest.raises(FileNotFoundError, match="scale.npy"):
        P.read_collect(root)
    np.save(root / "scale.npy", mats["scale"][:, :-3])  # one Gaussian short
    with pytest.raises(ValueError, match=r"'scale' expected shape \(9, \d+\) = \(N, T\*3\)"):
        P.read_collect(root)
    with pytest.raises(ValueError, match="'colors' expected float shape"):
        P.write_collect(tmp_path / "d", mats, colors[:-1], valid, steps)
    with pytest.raises(ValueError, match="unknown modality"):
        P.fit_modalities(mats, {"positions": 3})


# ------------------------------------------------------------------------------------ QR


def np_qr_rows(u):
    """float64 reference: Q^T of U^T = QR with diag(R) > 0."""
    q, r = np.linalg.qr(u.T)
    return (q * np.sign(np.diag(r))).T


def test_orthonormalize_rows_keeps_span_and_signs():
    rng = np.random.default_rng(7)
    u = rng.standard_normal((8, 300)) * rng.uniform(0.5, 3.0, (8, 1)) + 0.3
    out = np.asarray(Q.orthonormalize_rows(u.astype(np.float32)), np.float64)
    assert np.abs(out @ out.T - np.eye(8)).max() < 1e-5
    proj_in = u.T @ np.linalg.solve(u @ u.T, u)
    assert np.linalg.norm(out.T @ out - proj_in, 2) < 1e-5
    np.testing.assert_allclose(out, np_qr_rows(u), atol=1e-5)
    assert np.all(np.sum(out * u, axis=1) > 0)  # diag(R) > 0: each row keeps its input's sign
    again = np.asarray(Q.orthonormalize_rows(u.astype(np.float32)), np.float64)
    np.testing.assert_array_equal(again, out)
    # flipping input rows flips exactly those output rows (coefficients keep their meaning)
    flip = np.where(rng.random(8) < 0.5, -1.0, 1.0)
    flip[0] = -1.0
    flipped = np.asarray(Q.orthonormalize_rows((u * flip[:, None]).astype(np.float32)), np.float64)
    np.testing.assert_allclose(flipped, out * flip[:, None], atol=1e-6)
    # canonical signs: identical output for sign-flipped input rows
    c1 = Q.orthonormalize_rows(u.astype(np.float32), canonical_signs=True)
    c2 = Q.orthonormalize_rows((u * flip[:, None]).astype(np.float32), canonical_signs=True)
    np.testing.assert_allclose(np.asarray(c1), np.asarray(c2), atol=1e-6)
    np.testing.assert_allclose(np.asarray(c1), np_sign_fix(np_qr_rows(u)), atol=1e-5)


def test_orthonormalize_rows_is_identity_on_orthonormal_and_jits():
    rng = np.random.default_rng(8)
    u = np.linalg.qr(rng.standard_normal((300, 6)))[0].T.astype(np.float32)
    out = jax.jit(Q.orthonormalize_rows, static_argnames="canonical_signs")(u)
    np.testing.assert_allclose(np.asarray(out), u, atol=1e-6)
    drifted = u + 1e-3 * rng.standard_normal(u.shape).astype(np.float32)
    assert float(Q.orthonormality_error(drifted)) > 1e-4
    assert float(Q.orthonormality_error(Q.orthonormalize_rows(drifted))) < 1e-5
    with pytest.raises(ValueError, match="K <= D"):
        Q.orthonormalize_rows(rng.standard_normal((5, 3)))


def test_subspace_distance_matches_principal_angles():
    rng = np.random.default_rng(9)
    a = np.linalg.qr(rng.standard_normal((200, 5)))[0].T
    rot = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    assert float(Q.subspace_distance((rot @ a).astype(np.float32), a.astype(np.float32))) < 1e-5
    b = np.linalg.qr(a.T + 0.05 * rng.standard_normal((200, 5)))[0].T
    got = float(Q.subspace_distance(a.astype(np.float32), b.astype(np.float32)))
    np.testing.assert_allclose(got, sin_max_angle(a, b), rtol=1e-3)
