"""The regressor: bounded outputs, neutral-relative features, feature PCA whitening, extractors,
face crops, the regress stage end to end, and reenactment from videos, folders and photos."""

import dataclasses
import json

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax.data.images import ImageSet
from gem_jax.regress import crop as crops
from gem_jax.regress.features import (FeatureUnavailableError, LandmarkFeatures, PrecomputedFeatures, VGGFeatures,
                                      procrustes_normalise)
from gem_jax.regress.model import BOUND, Regressor, fit_feature_pca, load_regressor, save_regressor
from gem_jax.regress.train import relative_features
from gem_jax.video import read_frames

from conftest import tiny_config


def test_output_is_bounded_for_any_input():
    net = Regressor(num_outputs=7, width=32, depth=4)
    params = net.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
    # Non-zero output layer, and inputs far outside the whitened range.
    params = jax.tree.map(lambda p: p + 3.0 * jax.random.normal(jax.random.key(p.size), p.shape), params)
    x = jnp.asarray(np.random.default_rng(0).normal(scale=1e4, size=(64, 5)), jnp.float32)
    k = np.asarray(net.apply({"params": params}, x))
    assert np.all(np.abs(k) <= BOUND) and np.abs(k).max() > 2.5
    k_train = net.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert np.all(np.abs(np.asarray(k_train)) <= BOUND)
    assert np.any(np.asarray(k_train) != k), "dropout is active in training"


def test_relative_features_of_the_neutral_frame_are_zero():
    rng = np.random.default_rng(1)
    t = np.array([0, 0, 1, 1, 2, 2])
    c = np.array([3, 5, 3, 5, 3, 5])
    images = ImageSet(fg=np.zeros((6, 2, 2, 3), np.uint8), masks=np.zeros((6, 2, 2), np.uint8), timesteps=t,
                      camera_indices=c, viewmats=np.zeros((6, 4, 4)), Ks=np.zeros((6, 3, 3)), width=2, height=2)
    f = rng.normal(size=(6, 9)).astype(np.float32)
    rel = relative_features(f, images, neutral_t=1)
    np.testing.assert_allclose(rel[[2, 3]], 0.0)
    np.testing.assert_allclose(rel[4], f[4] - f[2], rtol=1e-6)  # same camera's neutral frame
    np.testing.assert_allclose(rel[5], f[5] - f[3], rtol=1e-6)
    with pytest.raises(ValueError, match="neutral timestep 7"):
        relative_features(f, images, neutral_t=7)


def test_feature_pca_whitens_and_round_trips():
    rng = np.random.default_rng(2)
    basis = rng.normal(size=(6, 40))
    x = rng.normal(size=(300, 6)) * np.array([5, 3, 2, 1, 0.5, 0.2]) @ basis + rng.normal(size=40)
    pca = fit_feature_pca(x, dim=50)
    assert pca.dim == 6  # capped at the rank
    z = pca.transform(x)
    inside = np.all(np.abs(z) < BOUND, axis=1)
    np.testing.assert_allclose(np.std(z, axis=0, ddof=1), 1.0, rtol=0.1)  # σ-normalised (a few clamped)
    np.testing.assert_allclose(pca.inverse(z[inside]), x[inside], atol=1e-3)
    np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(6), atol=1e-5)
    assert np.all(np.abs(pca.transform(x * 100)) <= BOUND)


def test_vgg_and_precomputed_extractors(tmp_path):
    rng = np.random.default_rng(3)
    crops_ = rng.uniform(0, 1, (3, 40, 40, 3)).astype(np.float32)
    vgg = VGGFeatures(crop_size=48, batch_size=2)
    f = vgg(crops_)
    assert f.shape == (3, VGGFeatures.dim) == (3, 4352) and np.all(np.isfinite(f))
    assert np.abs(f[0] - f[1]).max() > 1e-3, "different crops give different features"
    np.testing.assert_allclose(vgg(crops_[:1]), f[:1], rtol=1e-4, atol=1e-5)  # batch padding changes nothing
    for i in range(4):
        np.save(tmp_path / f"{i:05d}.npy", rng.normal(size=12).astype(np.float32))
    pre = PrecomputedFeatures(tmp_path)
    out = pre([2, 0])
    assert pre.dim == 12 and out.shape == (2, 12)
    np.testing.assert_array_equal(out[0], np.load(tmp_path / "00002.npy"))
    with pytest.raises(FileNotFoundError, match="00009.npy"):
        pre([9])
    with pytest.raises(FileNotFoundError, match="no per-frame"):
        PrecomputedFeatures(tmp_path / "nothing")


def test_landmark_extractor_needs_mediapipe():
    try:
        import mediapipe  # noqa: F401
    except ImportError:
        with pytest.raises(FeatureUnavailableError, match="gem-jax\\[mediapipe\\]"):
            LandmarkFeatures()
        pytest.skip("mediapipe is not installed (optional extra gem-jax[mediapipe]): the extractor's error was checked")
    lm = LandmarkFeatures()
    assert lm.dim == 1434


def test_procrustes_normalisation_removes_similarity_transforms():
    rng = np.random.default_rng(4)
    p = rng.normal(size=(50, 3))
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    moved = 3.0 * p @ q.T + np.array([1.0, -2.0, 0.5])
    ref = procrustes_normalise(p)
    np.testing.assert_allclose(procrustes_normalise(moved, ref), ref, atol=1e-5)


def test_crop_geometry_and_smoothing():
    image = np.zeros((60, 80, 3), np.float32)
    image[20:30, 40:50] = 1.0  # a bright square centred at (45, 25)
    pix = np.array([[40, 20], [50, 30]], np.float32)
    box = crops.box_from_vertices(pix, margin=2.0)
    np.testing.assert_allclose(box, [45, 25, 20])
    out = crops.crop(image, box, 40)
    assert out.shape == (40, 40, 3)
    assert out[20, 20].min() > 0.9 and out[2, 2].max() < 0.1  # the square fills the middle half
    assert 0.2 < out[..., 0].mean() < 0.3
    white = np.ones((64, 64, 3), np.float32)
    white[10:40, 20:44] = 0.3
    found = crops._foreground_box(white, 1.0)
    np.testing.assert_allclose(found, [31.5, 24.5, 29], atol=1.0)
    noisy = np.array([[10, 10, 5], [12, 9, 5], [9, 11, 5], [30, 30, 5], [11, 10, 5]], np.float32)
    smooth = crops.smooth_boxes(noisy)
    assert np.abs(np.diff(smooth[:, 0])).max() < np.abs(np.diff(noisy[:, 0])).max()


def test_bad_driver_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such video"):
        list(read_frames(tmp_path / "missing.mp4"))
    (tmp_path / "garbage.mp4").write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="garbage.mp4"):
        list(read_frames(tmp_path / "garbage.mp4"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        list(read_frames(tmp_path / "empty"))


def test_regress_stage_and_reenactment_end_to_end(distilled_workdir, tmp_path):
    import shutil

    from gem_jax import reenact, train
    from gem_jax.data import synthetic
    from gem_jax.regress.inference import predict

    _, workdir = distilled_workdir
    for name in ("data", "data_cross", "collect", "pca"):
        shutil.copytree(workdir / name, tmp_path / "w" / name)
    work = tmp_path / "w"
    config = tiny_config()
    train.run(config, work, "regress")
    ev = json.loads((work / "regress" / "eval.json").read_text())
    for key in ("self_reenactment", "cross_identity", "fitted_upper_bound"):
        assert np.isfinite(ev[key]["psnr"]) and ev[key]["psnr"] > 5, key
    assert ev["self_reenactment"]["num_images"] == ev["cross_identity"]["num_images"] > 0
    pca, net, params, extra = load_regressor(work / "regress" / "regressor.npz")
    assert extra["features"] == "vgg" and extra["crop_size"] == config.regress.crop_size
    rel = np.random.default_rng(5).normal(size=(3, pca.mean.size)).astype(np.float32)
    save_regressor(tmp_path / "again.npz", pca, net, params, extra)
    pca2, net2, params2, _ = load_regressor(tmp_path / "again.npz")
    np.testing.assert_allclose(predict(net2, params2, pca2, rel), predict(net, params, pca, rel), atol=1e-6)

    # A driver video of the other identity → a playable side-by-side MP4 and the coefficients.
    driver = synthetic.write_driver_video(tmp_path / "driver.mp4", config.synthetic, config.seed, 1, 0)
    result = reenact.reenact(work, driver, tmp_path / "out.mp4")
    video = cv2.VideoCapture(str(tmp_path / "out.mp4"))
    ok, frame = video.read()
    assert ok and frame.shape[1] == 2 * frame.shape[0]
    avatar = frame[:, frame.shape[1] // 2:]
    assert np.mean(avatar < 230) > 0.05, "the avatar is rendered"
    k = np.load(tmp_path / "out.npy")
    assert k.shape == (result["frames"], net.num_outputs) and np.all(np.abs(k) <= BOUND)
    assert set(result["timings"]) == {"read", "crop", "features", "regress", "render"}
    # A real photo (a folder holding one image) runs end to end and writes a frame.
    skimage_data = pytest.importorskip("skimage.data")
    (tmp_path / "photo").mkdir()
    cv2.imwrite(str(tmp_path / "photo" / "astronaut.png"), skimage_data.astronaut()[..., ::-1])
    with pytest.warns(RuntimeWarning, match="face crop") if crops.detector_name() == "foreground" else _nothing():
        reenact.reenact(work, tmp_path / "photo", tmp_path / "photo.mp4", orbit=True)
    assert cv2.VideoCapture(str(tmp_path / "photo.mp4")).read()[0]
    assert reenact.main(["--model", str(work), "--driver", str(tmp_path / "nope.mp4"), "--out",
                         str(tmp_path / "x.mp4")]) == 2


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_orbit_keeps_the_head_centre_fixed():
    from gem_jax.reenact import orbit_viewmats

    viewmat = np.eye(4, dtype=np.float32)
    viewmat[2, 3] = 0.6
    centre = np.array([0.01, 0.02, -0.03])
    mats = orbit_viewmats(viewmat, centre, 8)
    for m in mats:
        np.testing.assert_allclose(m[:3, :3] @ m[:3, :3].T, np.eye(3), atol=1e-5)
        np.testing.assert_allclose(m[:3, :3] @ centre + m[:3, 3], viewmat[:3, :3] @ centre + viewmat[:3, 3], atol=1e-5)
    assert not np.allclose(mats[1], mats[0])
    assert dataclasses.is_dataclass(ImageSet)
