"""The viewer's web export: a self-contained static folder whose model reads back as the model
it was written from (float16 within float16 rounding), whose coefficient data follows the ±3σ
policy, whose malformed variants are rejected naming the field, and which ``python -m
gem_jax.viewer`` serves on 127.0.0.1."""

import json
import re
import subprocess
import sys
import urllib.request
import warnings

import numpy as np
import pytest
from test_gem_model import random_model

from gem_jax import export
from gem_jax.eigen.model import CoefficientClampWarning, GEMFormatError
from gem_jax.eigen.pca import MODALITIES
from gem_jax.eigen.workdir import load_model, load_pca_coefficients
from gem_jax.types import Camera
from gem_jax.viewer import webexport
from gem_jax.viewer.webexport import WebScene, camera_entry, read_web, write_web

ASSETS = ("index.html", "main.js", "model.js", "renderer.js", "shaders.js", "sort-worker.js", "camera.js", "ui.js",
          "sequence.js", "style.css")


def random_scene(rng, model, frames=5):
    K = np.array([[300.0, 0, 64], [0, 300, 70], [0, 0, 1]])
    view = np.eye(4)
    view[:3, :3] = np.linalg.qr(rng.standard_normal((3, 3)))[0]
    view[2, 3] = 0.8
    roots = np.broadcast_to(np.eye(4), (frames, 4, 4)).copy()
    roots[:, :3, 3] = rng.normal(0, 0.01, (frames, 3))
    return WebScene(cameras=[camera_entry(3, Camera(view, K, 128, 140)), camera_entry(5, Camera(np.eye(4), K, 128, 140))],
                    neutral_pose=roots[0], timesteps=np.arange(frames) * 2,
                    coefficients=rng.uniform(-2.5, 2.5, (frames, model.total_components)), roots=roots,
                    default_camera=1)


@pytest.fixture(scope="module")
def gem():
    return random_model(np.random.default_rng(7))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_web_export_round_trips(gem, tmp_path, dtype):
    rng = np.random.default_rng(1)
    scene = random_scene(rng, gem)
    scene.sequences = {"driver.npy": rng.uniform(-1, 1, (7, gem.total_components))}
    page = write_web(tmp_path, gem, scene, dtype)
    assert page == tmp_path / "index.html" and page.is_file()
    back, got = read_web(tmp_path)
    assert back.uv_shape == gem.uv_shape
    np.testing.assert_array_equal(back.texels, gem.texels)
    for m in MODALITIES:
        np.testing.assert_array_equal(back.sigma[m], gem.sigma[m])  # σ is float32 in both
        for name in ("mean", "U"):
            want, have = np.asarray(getattr(gem, name)[m]), np.asarray(getattr(back, name)[m])
            if dtype == "float32":
                np.testing.assert_array_equal(have, want)
            else:  # round to nearest float16: relative error ≤ 2⁻¹¹ (normal range)
                np.testing.assert_allclose(have, want, rtol=2.0**-11, atol=2.0**-25)
                assert not np.array_equal(have, want)  # really stored as float16
    np.testing.assert_allclose(back.colors, gem.colors, rtol=2.0**-11 if dtype == "float16" else 0)
    np.testing.assert_array_equal(got.coefficients, scene.coefficients.astype(np.float32))
    np.testing.assert_array_equal(got.roots, scene.roots.astype(np.float32))
    np.testing.assert_array_equal(got.timesteps, scene.timesteps)
    np.testing.assert_array_equal(got.neutral_pose, scene.neutral_pose.astype(np.float32))
    np.testing.assert_array_equal(got.sequences["driver.npy"], scene.sequences["driver.npy"].astype(np.float32))
    assert got.cameras == scene.cameras and got.default_camera == 1
    manifest = json.loads((tmp_path / "model.json").read_text())
    assert manifest["dtype"] == dtype and manifest["binary_bytes"] == (tmp_path / "model.bin").stat().st_size
    assert all(entry["offset"] % webexport.ALIGN == 0 for entry in manifest["arrays"].values())
    quats = np.frombuffer((tmp_path / "model.bin").read_bytes(), "<f4", 4 * 5, manifest["arrays"]["training_root_quats"]["offset"])
    np.testing.assert_allclose(quats.reshape(5, 4), np.tile([1.0, 0, 0, 0], (5, 1)), atol=1e-7)  # identity rotations


def test_web_export_is_self_contained(gem, tmp_path):
    write_web(tmp_path, gem, random_scene(np.random.default_rng(2), gem))
    for name in ASSETS:
        text = (tmp_path / name).read_text()
        assert not re.search(r"https?://|//cdn|@import url", text), f"{name} refers to another site"
    html = (tmp_path / "index.html").read_text()
    assert '<script type="module" src="main.js">' in html


def test_coefficients_follow_the_3_sigma_policy(gem, tmp_path):
    scene = random_scene(np.random.default_rng(3), gem)
    scene.coefficients[1, 2] = 4.5
    scene.sequences = {"reenact.npy": np.full((2, gem.total_components), -3.5)}
    with pytest.warns(CoefficientClampWarning) as record:
        write_web(tmp_path, gem, scene)
    messages = [str(w.message) for w in record]
    assert any("training coefficients: 1 coefficients outside ±3σ clamped" in m for m in messages), messages
    assert any(f"'reenact.npy': {2 * gem.total_components} coefficients outside" in m for m in messages), messages
    _, got = read_web(tmp_path)
    assert got.coefficients[1, 2] == 3.0 and np.abs(got.coefficients).max() <= 3.0
    np.testing.assert_array_equal(got.sequences["reenact.npy"], -3.0)
    for bad in (np.nan, np.inf):
        scene.coefficients[0, 0] = bad
        with pytest.raises(ValueError, match="non-finite coefficients"):
            write_web(tmp_path / "bad", gem, scene)
    scene.coefficients = scene.coefficients[:, :-1]
    with pytest.raises(ValueError, match=rf"shape \(F, {gem.total_components}\)"):
        write_web(tmp_path / "bad", gem, scene)


def test_malformed_exports_name_the_field(gem, tmp_path):
    write_web(tmp_path, gem, random_scene(np.random.default_rng(4), gem))
    manifest_path = tmp_path / "model.json"
    good = manifest_path.read_text()

    def rejects(match, **changes):
        manifest = json.loads(good)
        for dotted, value in changes.items():
            node = manifest
            *parents, leaf = dotted.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(GEMFormatError, match=match):
            read_web(tmp_path)

    k = gem.num_components["position"]
    rejects(r"field 'position_U' expected float shape \(", **{"arrays.position_U.shape": [k + 1, 5]})
    rejects(r"arrays.training_coefficients expected shape \[", **{"arrays.training_coefficients.shape": [5, 1]})
    rejects("lies outside", **{"arrays.scale_mean.offset": 10**9})
    rejects("format_version 2 is not supported", format_version=2)
    rejects("field 'modalities'", modalities=[{"name": "position"}])
    manifest_path.write_text(good[:50])
    with pytest.raises(GEMFormatError, match="not valid JSON"):
        read_web(tmp_path)
    manifest_path.write_text(good)
    blob = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(blob[:-16])
    with pytest.raises(GEMFormatError, match="binary_bytes"):
        read_web(tmp_path)
    with pytest.raises(FileNotFoundError, match="no web export here"):
        read_web(tmp_path / "nowhere")


def test_export_cli_writes_the_viewer_of_a_workdir(distilled_workdir, tmp_path):
    _, workdir = distilled_workdir
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoefficientClampWarning)  # training k beyond 3σ: tested above
        assert export.main(["--workdir", str(workdir), "--stage", "pca", "--web", str(tmp_path / "web"),
                            "--dtype", "float16"]) == 0
    model, scene = read_web(tmp_path / "web")
    want = load_model(workdir, "pca")
    np.testing.assert_allclose(model.U["position"], want.U["position"], rtol=2.0**-11, atol=2.0**-25)
    coeffs = load_pca_coefficients(workdir)
    np.testing.assert_array_equal(scene.timesteps, coeffs.timesteps)
    np.testing.assert_array_equal(scene.coefficients, np.clip(coeffs.k, -3, 3))
    labels = [c["label"] for c in scene.cameras]
    assert labels[scene.default_camera].endswith("(held out)") and len(labels) >= 2


def test_viewer_cli_serves_on_localhost(distilled_workdir, tmp_path):
    _, workdir = distilled_workdir
    total = load_model(workdir).total_components
    sequence = np.zeros((3, total), np.float32)
    sequence[1, 0] = 4.0
    np.save(tmp_path / "reenact.npy", sequence)
    proc = subprocess.Popen([sys.executable, "-m", "gem_jax.viewer", "--model", str(workdir), "--port", "0",
                             "--sequence", str(tmp_path / "reenact.npy")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("GEM viewer: "):
                break
        match = re.match(r"GEM viewer: (http://127\.0\.0\.1:\d+/)", lines[-1] if lines else "")
        assert match, "".join(lines)
        url = match.group(1)
        with urllib.request.urlopen(url, timeout=10) as r:
            assert b"GEM viewer" in r.read()
        with urllib.request.urlopen(url + "main.js", timeout=10) as r:
            assert r.headers["Content-Type"].startswith("text/javascript")
        with urllib.request.urlopen(url + "model.json", timeout=10) as r:
            manifest = json.load(r)
        assert manifest["num_gaussians"] == load_model(workdir).num_gaussians
        assert manifest["sequences"] == [{"name": "reenact.npy", "array": "sequence_0"}]
        assert "'reenact.npy': 1 coefficients outside ±3σ clamped" in "".join(lines)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    failed = subprocess.run([sys.executable, "-m", "gem_jax.viewer", "--model", str(tmp_path / "nothing")],
                            capture_output=True, text=True)
    assert failed.returncode != 0 and "no such work directory or web export" in failed.stderr
