"""The viewer page in a real headless Chromium (software WebGL), on the tiny distilled avatar:
it loads with no console error, draws what ``gem_jax.render.rasterize`` draws for the same k
and camera, a position slider changes exactly the pixels its component moves, sequences play
with the ±3σ policy, and a missing or malformed model or a browser without WebGL2 gets a clear
message in the page. Skipped only where no Chromium can be found or started (the reason says so).

``GEM_JAX_WRITE_SCREENSHOT=1`` also writes the page's screenshot to docs/viewer.png (README).
"""

import json
import os
import shutil
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax.eigen.model import CoefficientClampWarning
from gem_jax.eigen.render import world_gaussians
from gem_jax.metrics import psnr
from gem_jax.render import rasterize
from gem_jax.render.project import project_gaussians
from gem_jax.types import Camera
from gem_jax.viewer.headless import BrowserUnavailable, launch, open_viewer, read_canvas
from gem_jax.viewer.serve import serve_folder
from gem_jax.viewer.webexport import export_workdir, read_web, write_web

SCALE = 4  # the 48×48 tiny cameras rendered at 192×192 (intrinsics scaled alike)
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "viewer.png"
posed_gaussians = jax.jit(world_gaussians, static_argnames="clamp")  # eager dispatch is slow on 2 cores
project = jax.jit(project_gaussians)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    pw = sync_api.sync_playwright().start()
    try:
        browser = launch(pw)
    except BrowserUnavailable as err:
        pw.stop()
        pytest.skip(f"Chromium cannot be launched here: {err}")
    yield browser
    browser.close()
    pw.stop()


def localised_model(model, scene):
    """The avatar with hand-made position components: component 0 moves only the Gaussians
    left of the image's median column (3σ ≈ a dozen pixels along the image x axis), component 1
    only the others (along image y); unit, orthogonal rows."""
    cam = scene.cameras[scene.default_camera]
    view, pose = np.asarray(cam["viewmat"]), np.asarray(scene.neutral_pose, np.float64)
    rot = view[:3, :3] @ pose[:3, :3]  # head frame → camera
    means = np.asarray(model.mean["position"]).reshape(-1, 3) @ rot.T + view[:3, :3] @ pose[:3, 3] + view[:3, 3]
    u = means[:, 0] / means[:, 2]
    left = u < np.median(u)
    U = np.zeros((2, model.num_gaussians, 3))
    U[0, left] = rot[0]  # camera x axis in the head frame
    U[1, ~left] = rot[1]
    U /= np.linalg.norm(U.reshape(2, -1), axis=1)[:, None, None]
    basis = dict(model.U, position=jnp.asarray(np.concatenate([U.reshape(2, -1), np.asarray(model.U["position"])[2:]]),
                                             jnp.float32))
    return model.replace(U=basis), left


@pytest.fixture(scope="module")
def site(distilled_workdir, tmp_path_factory):
    """``(url, model, scene, local_model, left)``: good/ (the tiny avatar, float32), local/ (with
    :func:`localised_model`, float16), bad/ (a shape lie in the manifest), truncated/ (half the
    binary), missing/ (no model files)."""
    _, workdir = distilled_workdir
    root = tmp_path_factory.mktemp("site")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoefficientClampWarning)
        export_workdir(workdir, root / "good", "float32", "pca")
    model, scene = read_web(root / "good")
    local, left = localised_model(model, scene)
    write_web(root / "local", local, scene, "float16")  # the half-float texture path
    local, _ = read_web(root / "local")  # as the page sees it: float16 values
    shutil.copytree(root / "good", root / "bad")
    manifest = json.loads((root / "bad" / "model.json").read_text())
    manifest["arrays"]["position_U"]["shape"][1] += 3
    (root / "bad" / "model.json").write_text(json.dumps(manifest))
    shutil.copytree(root / "good", root / "truncated")
    blob = (root / "good" / "model.bin").read_bytes()
    (root / "truncated" / "model.bin").write_bytes(blob[: len(blob) // 2])
    shutil.copytree(root / "good", root / "missing")
    for name in ("model.json", "model.bin"):
        (root / "missing" / name).unlink()
    with serve_folder(root) as url:
        yield url, model, scene, local, left


def reference(model, scene, k, camera_index, pose=None):
    cam = scene.cameras[camera_index]
    K = np.asarray(cam["K"], np.float32)
    K[:2] *= SCALE
    camera = Camera(jnp.asarray(cam["viewmat"], jnp.float32), jnp.asarray(K), cam["width"] * SCALE,
                    cam["height"] * SCALE)
    pose = scene.neutral_pose if pose is None else pose
    g = posed_gaussians(model, jnp.asarray(np.clip(k, -3, 3), jnp.float32), jnp.asarray(pose))
    return np.clip(np.asarray(rasterize(g, camera, jnp.ones(3)).image), 0, 1), g, camera


def db(a, b) -> float:
    return float(psnr(jnp.asarray(a), jnp.asarray(b)))


def test_page_matches_rasterize_with_no_console_error(browser, site):
    url, model, scene, _, _ = site
    page, errors = open_viewer(browser, f"{url}good/?scale={SCALE}")
    assert page.evaluate("gemViewer.ready") and page.evaluate("gemViewer.error") is None
    info = page.evaluate("gemViewer.info()")
    assert info["gaussians"] == model.num_gaussians and info["camera"] == scene.default_camera
    assert "fps" in page.locator("#status").inner_text() or "Gaussians" in page.locator("#status").inner_text()
    training_camera = next(i for i, c in enumerate(scene.cameras) if "held out" not in c["label"])
    k = scene.coefficients[1]
    page.select_option("#camera", str(training_camera))
    page.evaluate("k => gemViewer.setCoefficients(k)", k.tolist())
    image = read_canvas(page)
    want, _, _ = reference(model, scene, k, training_camera)
    assert image.shape == want.shape == (48 * SCALE, 48 * SCALE, 3)
    assert np.mean(np.any(want < 0.95, -1)) > 0.05, "the reference shows the head"
    quality = db(image, want)
    print(f"PSNR page vs rasterize (training camera {training_camera}): {quality:.2f} dB, "
          f"max |diff| {np.abs(image - want).max():.4f}")
    assert quality >= 40.0
    # the timestep's own head pose, from the held-out camera
    page.select_option("#camera", str(scene.default_camera))
    page.evaluate("gemViewer.setPose(2)")
    page.evaluate("k => gemViewer.setCoefficients(k)", scene.coefficients[2].tolist())
    want, _, _ = reference(model, scene, scene.coefficients[2], scene.default_camera, scene.roots[2])
    assert db(read_canvas(page), want) >= 40.0
    assert errors == []
    page.close()
    if os.environ.get("GEM_JAX_WRITE_SCREENSHOT") == "1":  # the README's picture, at the page's own size
        page, errors = open_viewer(browser, f"{url}good/", viewport=(1100, 720))
        page.evaluate("k => gemViewer.setCoefficients(k)", scene.coefficients[1].tolist())
        read_canvas(page)
        page.wait_for_timeout(1500)  # the fps line settles to "idle"
        page.screenshot(path=str(SCREENSHOT))
        assert errors == []
        page.close()


def test_position_slider_changes_the_pixels_the_component_moves(browser, site):
    url, _, scene, model, left = site
    page, errors = open_viewer(browser, f"{url}local/?scale={SCALE}")
    cam = scene.default_camera
    before = read_canvas(page)
    page.locator("#slider-position-0").fill("3")
    after = read_canvas(page)
    k = np.zeros(model.total_components, np.float32)
    k[0] = 3.0
    assert page.evaluate("gemViewer.coefficients()") == k.tolist()
    changed = np.abs(after - before).max(-1) > 2.5 / 255
    want_before, g0, camera = reference(model, scene, np.zeros_like(k), cam)
    want_after, g1, _ = reference(model, scene, k, cam)
    head = np.any(want_before < 0.99, -1)
    assert changed.sum() > 0.05 * head.sum(), "the slider changes the image"
    # the Gaussians component 0 moves (the left ones), and their 3σ squares before and after
    p0, p1 = project(g0, camera), project(g1, camera)
    shift = np.linalg.norm(np.asarray(p1.means2d - p0.means2d), axis=-1)
    assert np.all(shift[~left] < 1e-3) and np.all(shift[left] > 5.0)

    def support(which):
        """Pixels where a Gaussian of ``which`` has α ≥ 1/255, before or after (near its 3σ square)."""
        mask = np.zeros(changed.shape, bool)
        for p in (p0, p1):
            for (u, v), (a, b, c), o, r in zip(*(np.asarray(x)[which] for x in (p.means2d, p.conics, p.opacities, p.radii))):
                if r <= 0:
                    continue
                y0, x0 = max(0, int(v - r) - 16), max(0, int(u - r) - 16)
                ys, xs = np.mgrid[y0: int(v + r) + 17, x0: int(u + r) + 17] + 0.5
                dx, dy = u - xs, v - ys
                sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                window = mask[y0: y0 + ys.shape[0], x0: x0 + ys.shape[1]]
                window |= (o * np.exp(-sigma) >= 1 / 255)[: window.shape[0], : window.shape[1]]
        return mask

    moving, fixed = support(left), support(~left) & ~support(left)
    inside = changed[moving].sum() / changed.sum()
    print(f"changed pixels {changed.sum()} ({changed.sum() / head.sum():.0%} of the head), inside the moved "
          f"Gaussians' support {inside:.4f}; support covers {moving[head].mean():.0%} of the head, "
          f"{fixed.sum()} pixels only the fixed ones reach")
    assert inside >= 0.99 and fixed.sum() > 0.1 * head.sum()
    assert not changed[fixed].any(), "pixels only the fixed Gaussians reach stay"
    # and it is rasterize's change
    assert db(after, want_after) >= 40.0 and db(before, want_before) >= 40.0
    expected = np.abs(want_after - want_before).max(-1) > 2.5 / 255
    assert (changed & expected).sum() / (changed | expected).sum() > 0.9
    assert errors == []
    page.close()


def test_orbit_zoom_and_presets_stay_faithful(browser, site):
    url, model, scene, _, _ = site
    page, errors = open_viewer(browser, f"{url}good/?scale={SCALE}")
    preset = page.evaluate("gemViewer.info()")["viewmat"]
    box = page.locator("#canvas").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 40, y + 15, steps=4)
    page.mouse.up()
    page.mouse.wheel(0, 100)
    info = page.evaluate("gemViewer.info()")
    assert not np.allclose(info["viewmat"], preset)
    view = np.asarray(info["viewmat"], np.float32).reshape(4, 4)
    np.testing.assert_allclose(view[:3, :3] @ view[:3, :3].T, np.eye(3), atol=1e-5)  # still a rigid view
    fx, fy, cx, cy = info["intrinsics"]
    camera = Camera(jnp.asarray(view), jnp.asarray([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], jnp.float32),
                    info["width"], info["height"])
    g = posed_gaussians(model, jnp.zeros(model.total_components), jnp.asarray(scene.neutral_pose))
    want = np.clip(np.asarray(rasterize(g, camera, jnp.ones(3)).image), 0, 1)
    assert db(read_canvas(page), want) >= 40.0
    page.click("#reset")
    np.testing.assert_allclose(page.evaluate("gemViewer.info()")["viewmat"], preset)
    other = (scene.default_camera + 1) % len(scene.cameras)
    page.select_option("#camera", str(other))
    np.testing.assert_allclose(np.reshape(page.evaluate("gemViewer.info()")["viewmat"], (4, 4)),
                               scene.cameras[other]["viewmat"], atol=1e-6)
    assert errors == []
    page.close()


def test_sequences_play_and_follow_the_coefficient_policy(browser, site, tmp_path):
    url, model, scene, _, _ = site
    page, errors = open_viewer(browser, f"{url}good/?scale=1&fps=1000")
    page.click("#play-training")
    page.wait_for_function("gemViewer.coefficients().some(v => v !== 0)")
    played = np.asarray(page.evaluate("gemViewer.coefficients()"), np.float32)
    assert np.any(np.all(np.isclose(scene.coefficients, played, atol=1e-6), axis=1))
    page.click("#reset")
    assert page.evaluate("gemViewer.coefficients()") == [0.0] * model.total_components
    # a reenactment .npy with values beyond 3σ: clamped, with a warning in the page, and played
    seq = np.random.default_rng(0).uniform(-1, 1, (4, model.total_components)).astype(np.float32)
    seq[:, 0] = 5.0
    np.save(tmp_path / "reenact.npy", seq)
    page.set_input_files("#sequence-file", str(tmp_path / "reenact.npy"))
    page.wait_for_function("document.getElementById('message').textContent.includes('clamped')")
    assert "4 coefficients beyond ±3σ clamped" in page.locator("#message").inner_text()
    page.wait_for_function("gemViewer.coefficients()[0] === 3")
    played = np.asarray(page.evaluate("gemViewer.coefficients()"), np.float32)
    assert np.any(np.all(np.isclose(np.clip(seq, -3, 3), played, atol=1e-6), axis=1))
    # the JSON form; a non-finite value is an error; a wrong width names the expected shape
    (tmp_path / "seq.json").write_text(json.dumps({"coefficients": seq[:2].clip(-3, 3).tolist()}))
    page.set_input_files("#sequence-file", str(tmp_path / "seq.json"))
    page.wait_for_function("document.getElementById('sequence').options.length === 2")
    seq[1, 3] = np.nan
    np.save(tmp_path / "nan.npy", seq)
    page.set_input_files("#sequence-file", str(tmp_path / "nan.npy"))
    page.wait_for_function("document.getElementById('message').textContent.includes('non-finite')")
    assert "Could not load nan.npy: nan.npy: non-finite coefficient at frame 1, column 3" in page.locator("#message").inner_text()
    np.save(tmp_path / "narrow.npy", seq[:, :-1])
    page.set_input_files("#sequence-file", str(tmp_path / "narrow.npy"))
    page.wait_for_function("document.getElementById('message').textContent.includes('narrow.npy')")
    assert f"expected coefficients of shape (F, {model.total_components})" in page.locator("#message").inner_text()
    assert errors == []
    page.close()


@pytest.mark.parametrize("folder, expected", [
    ("bad", ["Malformed or missing model", "arrays.position_U expected shape"]),
    ("truncated", ["Malformed or missing model", "binary_bytes"]),
    ("missing", ["Model not found", "model.json (HTTP 404)"]),
])
def test_missing_or_malformed_model_shows_a_message(browser, site, folder, expected):
    url, *_ = site
    page, _ = open_viewer(browser, f"{url}{folder}/")
    assert page.evaluate("document.documentElement.dataset.state") == "error"
    message = page.locator("#message")
    assert message.is_visible()
    for text in expected:
        assert text in message.inner_text()
    page.close()


def test_browser_without_webgl2_shows_a_message(browser, site):
    url, *_ = site
    no_webgl2 = """{ const get = HTMLCanvasElement.prototype.getContext;
        HTMLCanvasElement.prototype.getContext = function (kind, ...rest) {
          return kind === 'webgl2' ? null : get.call(this, kind, ...rest); }; }"""
    page, _ = open_viewer(browser, f"{url}good/", init_script=no_webgl2)
    assert "does not support WebGL2" in page.locator("#message").inner_text()
    page.close()
