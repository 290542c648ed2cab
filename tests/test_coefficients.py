"""Coefficients on every path that renders or exports: NaN/Inf is a CoefficientError naming the
path; beyond ±3σ they are clamped with a CoefficientClampWarning, and the result is exactly that
of the clamped coefficients (gem_jax.load(...).render / .evaluate / .export_ply,
python -m gem_jax.export --coeffs, python -m gem_jax.reenact)."""

import warnings

import numpy as np
import pytest

import gem_jax
from gem_jax import export
from gem_jax.eigen.model import CoefficientClampWarning, check_coefficients
from gem_jax.errors import CoefficientError
from gem_jax.render.ply import read_ply


@pytest.fixture(scope="module")
def avatar(completed_workdir):
    return gem_jax.load(completed_workdir[1])


def far_and_near(avatar, seed=0):
    """A coefficient vector with entries at ±50σ, and the same vector clamped to ±3σ."""
    rng = np.random.default_rng(seed)
    k = rng.uniform(-2.5, 2.5, avatar.num_coefficients).astype(np.float32)
    k[[0, -1]] = [50.0, -50.0]
    return k, np.clip(k, -3, 3)


def test_the_gate_refuses_non_finite_and_clamps_with_a_warning(avatar):
    k, near = far_and_near(avatar)
    with pytest.warns(CoefficientClampWarning, match=r"outside ±3σ clamped \(position 1, opacity 1; max \|k\| = 50\)"):
        np.testing.assert_array_equal(check_coefficients(avatar.model, k), near)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(check_coefficients(avatar.model, near), near)
    for bad in (np.nan, np.inf, -np.inf):
        k2 = near.copy()
        k2[1] = bad
        with pytest.raises(CoefficientError, match=r"test: (NaN|Inf) values in \['position'\]"):
            check_coefficients(avatar.model, k2, where="test")
    with pytest.raises(ValueError, match="flat vector of shape"):
        check_coefficients(avatar.model, near[:-1])


def test_avatar_render_and_evaluate_check_the_coefficients(avatar):
    k, near = far_and_near(avatar, 1)
    camera = avatar.cameras[sorted(avatar.cameras)[0]]
    with pytest.warns(CoefficientClampWarning):
        far_image = avatar.render(k, camera)
    near_image = avatar.render(near, camera)
    assert np.mean(near_image < 0.95) > 0.02, "the head is rendered"
    np.testing.assert_array_equal(far_image, near_image)  # 50σ renders as 3σ, not extrapolated
    with pytest.warns(CoefficientClampWarning):
        g = avatar.evaluate(k)
    np.testing.assert_array_equal(np.asarray(g.means), np.asarray(avatar.evaluate(near).means))
    nan = near.copy()
    nan[0] = np.nan
    with pytest.raises(CoefficientError, match="Avatar.render: coefficients: NaN"):
        avatar.render(nan, camera)  # not an empty image
    with pytest.raises(CoefficientError, match="Avatar.evaluate: coefficients: NaN"):
        avatar.evaluate(nan)


def test_ply_export_by_api_and_cli_checks_the_coefficients(avatar, completed_workdir, tmp_path):
    k, near = far_and_near(avatar, 2)
    with pytest.warns(CoefficientClampWarning):
        avatar.export_ply(k, tmp_path / "far.ply")
    avatar.export_ply(near, tmp_path / "near.ply")
    np.testing.assert_array_equal(read_ply(tmp_path / "far.ply").means, read_ply(tmp_path / "near.ply").means)
    nan = near.copy()
    nan[-1] = np.inf
    with pytest.raises(CoefficientError, match="export x.ply: coefficients: Inf"):
        avatar.export_ply(nan, tmp_path / "x.ply")
    assert not (tmp_path / "x.ply").exists()
    workdir = str(completed_workdir[1])
    np.save(tmp_path / "far.npy", k)
    with pytest.warns(CoefficientClampWarning):
        assert export.main(["--workdir", workdir, "--ply", str(tmp_path / "cli.ply"), "--coeffs",
                            str(tmp_path / "far.npy")]) == 0
    np.testing.assert_array_equal(read_ply(tmp_path / "cli.ply").means, read_ply(tmp_path / "near.ply").means)
    np.save(tmp_path / "nan.npy", nan)
    (tmp_path / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    for name, said in (("nan.npy", "Inf values"), ("garbage.npy", "not a readable .npy coefficient vector")):
        assert export.main(["--workdir", workdir, "--ply", str(tmp_path / "y.ply"), "--coeffs",
                            str(tmp_path / name)]) == 2
    assert not (tmp_path / "y.ply").exists()


def test_reenactment_checks_the_regressed_coefficients(completed_workdir, tmp_path, monkeypatch, capsys):
    """The regressor bounds k by ±2.9σ, so the gate is exercised with a regressor that misbehaves."""
    import cv2

    from gem_jax import reenact
    from gem_jax.regress import features, inference

    workdir = completed_workdir[1]
    driver = tmp_path / "driver"
    driver.mkdir()
    for i, path in enumerate(sorted((workdir / "data" / "images").glob("*.png"))[:2]):
        cv2.imwrite(str(driver / f"{i:03d}.png"), cv2.imread(str(path)))
    monkeypatch.setattr(features, "make_extractor", lambda *a, **k: lambda crops: np.zeros((len(crops), 3), np.float32))
    for value, outcome in ((np.nan, "NaN values"), (60.0, None)):
        monkeypatch.setattr(inference, "predict", lambda net, params, pca, feats, v=value: np.full(
            (len(feats), net.num_outputs), v, np.float32))
        if outcome:
            assert reenact.main(["--model", str(workdir), "--driver", str(driver), "--out",
                                 str(tmp_path / "nan.mp4")]) == 2
            assert "reenact: regressed coefficients: NaN values" in capsys.readouterr().err
        else:
            with pytest.warns(CoefficientClampWarning):
                reenact.reenact(workdir, driver, tmp_path / "far.mp4")
            assert cv2.VideoCapture(str(tmp_path / "far.mp4")).read()[0]
