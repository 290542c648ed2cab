"""Export: the compact file (float16 within 1e-3), a .ply of any coefficient vector that reads
back as the evaluated Gaussians, and component sweeps as non-empty PNG strips and MP4s."""

import cv2
import numpy as np
import pytest

from gem_jax import export
from gem_jax.eigen.model import load
from gem_jax.eigen.workdir import load_model, load_pca_coefficients
from gem_jax.render.ply import read_ply


def test_export_cli_writes_model_ply_and_sweeps(distilled_workdir, tmp_path):
    config, workdir = distilled_workdir
    model = load_model(workdir, "pca")
    t = int(load_pca_coefficients(workdir).timesteps[1])
    rc = export.main(["--workdir", str(workdir), "--stage", "pca", "--npz", str(tmp_path / "m16.npz"),
                      "--dtype", "float16", "--ply", str(tmp_path / "f.ply"), "--timestep", str(t),
                      "--sweep", str(tmp_path / "sweep"), "--components", "1"])
    assert rc == 0
    half = load(tmp_path / "m16.npz")
    for m in model.U:
        np.testing.assert_allclose(np.asarray(half.U[m]), np.asarray(model.U[m]), rtol=1e-3, atol=1e-3 * 2e-2)
    k = load_pca_coefficients(workdir).of([t])[0]
    want = model.evaluate(k)
    got = read_ply(tmp_path / "f.ply")
    np.testing.assert_allclose(got.means, want.means, atol=1e-6)
    np.testing.assert_allclose(got.scales, want.scales, rtol=1e-5)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(got.quats) * np.asarray(want.quats), -1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(got.opacities, want.opacities, atol=1e-5)
    for m in ("position", "rotation", "scale", "opacity"):
        strip = cv2.imread(str(tmp_path / "sweep" / f"{m}_0.png"))
        assert strip is not None and strip.shape[1] == 7 * strip.shape[0]
        assert np.mean(strip < 240) > 0.02, f"{m}: the sweep strip shows the head"
        video = cv2.VideoCapture(str(tmp_path / "sweep" / f"{m}_0.mp4"))
        frames = 0
        while video.read()[0]:
            frames += 1
        assert frames == 26
    # The position sweep changes the image between its ends; k = ±3σ are different faces.
    strip = cv2.imread(str(tmp_path / "sweep" / "position_0.png")).astype(float)
    w = strip.shape[0]
    assert np.abs(strip[:, :w] - strip[:, -w:]).mean() > 0.5


def test_sweep_rejects_unknown_components(distilled_workdir):
    _, workdir = distilled_workdir
    model = load_model(workdir, "pca")
    with pytest.raises(ValueError, match="colour|modality"):
        export.sweep_coefficients(model, "colour", 0)
    with pytest.raises(ValueError, match="out of range"):
        export.sweep_coefficients(model, "position", 99)
    k = export.sweep_coefficients(model, "scale", 1, frames=5)
    assert k.shape == (5, model.total_components) and np.count_nonzero(k.any(0)) == 1
    np.testing.assert_allclose(k[[0, -1]].sum(1), [-3.0, 3.0])
