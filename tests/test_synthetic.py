"""The synthetic subject generator: head model, format, reader round trip, determinism, appearance."""

import json
from pathlib import Path

import cv2
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gem_jax.context import StageContext
from gem_jax.data import prepare
from gem_jax.data import procedural_head as ph
from gem_jax.data import synthetic as sy
from gem_jax.head import flame
from gem_jax.head.meshraster import project_vertices, rasterize_triangles

SEED = 3


def synthetic_config(**overrides) -> ml_collections.ConfigDict:
    """The generator's settings alone (smaller than configs/quickstart.py:tiny: 40×48 images)."""
    c = ml_collections.ConfigDict()
    c.seed = SEED
    c.data = ml_collections.ConfigDict(dict(subject_dir="", head_model="", background=(1.0, 1.0, 1.0),
                                            n_shape=0, n_expr=0))
    c.synthetic = ml_collections.ConfigDict(dict(
        identity=0, cross_identity=1, num_cameras=4, held_out_camera=2, num_sequences=2, frames_per_sequence=3,
        image_height=48, image_width=40, supersample=1, mesh_resolution=24, texture_size=64))
    c.synthetic.update(overrides)
    return c


def prepare_data(config, root):
    """The data stage of ``config`` in work directory ``root``."""
    subject = config.data.subject_dir
    ctx = StageContext(workdir=Path(root), subject_dir=Path(subject) if subject else Path(root) / "data",
                       seed=int(config.seed), synthetic=not subject)
    prepare.run(ctx, config.synthetic)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    prepare_data(synthetic_config(), root)
    return root


@pytest.fixture(scope="module")
def model24():
    return ph.build_head_model(24)


# ----------------------------------------------------------------------------- head model


def test_head_model_is_flame_format(model24):
    model = flame.head_model_from_arrays(model24)
    assert model.n_shape == len(ph.SHAPE_NAMES) >= 10
    assert model.n_expr == len(ph.EXPR_NAMES) >= 8
    assert model.parents == (-1, 0, 1, 1, 1)
    assert model24["posedirs"].shape == (model.num_vertices, 3, 36)
    np.testing.assert_allclose(model24["weights"].sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(model24["J_regressor"].sum(1), 1.0, atol=1e-5)
    assert 0 < model.mouth_faces.sum() < 0.2 * len(model.faces)
    # Closed, outward-wound parts: positive enclosed volume, no degenerate 3D triangles outside the mouth.
    tri = model24["v_template"][model24["f"]].astype(np.float64)
    assert np.einsum("fc,fc->", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) > 0


def test_every_expression_and_shape_component_moves_the_mesh(model24):
    dirs = np.abs(model24["shapedirs"]).max(axis=(0, 1))
    assert np.all(dirs > 1e-3), dirs  # every component moves some vertex by > 1 mm at coefficient 1


def test_uv_layout_is_non_degenerate_and_non_overlapping(model24):
    uv = model24["vt"][model24["ft"]].astype(np.float64)
    area = 0.5 * np.abs((uv[:, 1, 0] - uv[:, 0, 0]) * (uv[:, 2, 1] - uv[:, 0, 1])
                        - (uv[:, 2, 0] - uv[:, 0, 0]) * (uv[:, 1, 1] - uv[:, 0, 1]))
    assert area.min() > 1e-7
    assert uv.min() >= 0 and uv.max() <= 1
    # Overlap-free: the rasterized coverage equals the summed triangle area.
    res = 1024
    verts = np.concatenate([model24["vt"] * res, np.zeros((len(model24["vt"]), 1))], 1)
    covered = (rasterize_triangles(verts, model24["ft"], res, res).face_index >= 0).mean()
    assert covered == pytest.approx(area.sum(), rel=0.02)


def test_jaw_opens_the_mouth_fold(model24):
    model = flame.head_model_from_arrays(model24)
    closed, _ = flame.lbs(model, model.zero_params())
    opened, _ = flame.lbs(model, model.zero_params().replace(jaw_pose=jnp.array([0.3, 0.0, 0.0])))
    mouth = np.unique(model24["f"][model24["mouth_faces"]])
    moved = np.linalg.norm(np.asarray(opened) - np.asarray(closed), axis=1)
    assert moved[mouth].max() > 0.015  # the lower lip drops by centimetres
    assert moved[model24["v_template"][:, 1] > 0.03].max() < 1e-6  # the skull does not move


# ----------------------------------------------------------------------------- dataset on disk


def _read(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_files_follow_the_export_format(workdir):
    root = workdir / "data"
    cfg = synthetic_config().synthetic
    frames = {s: json.loads((root / f"transforms_{s}.json").read_text())["frames"] for s in ("train", "val", "test")}
    n_train_t = (cfg.num_sequences - 1) * cfg.frames_per_sequence
    assert len(frames["train"]) == n_train_t * (cfg.num_cameras - 1)
    assert len(frames["val"]) == n_train_t
    assert len(frames["test"]) == cfg.frames_per_sequence * cfg.num_cameras
    keys = {"file_path", "fg_mask_path", "flame_param_path", "timestep_index", "camera_index", "cx", "cy", "fl_x",
            "fl_y", "h", "w", "transform_matrix"}
    for item in frames["train"] + frames["val"] + frames["test"]:
        assert keys <= set(item)
        image, mask = _read(root / item["file_path"]), _read(root / item["fg_mask_path"])
        assert image.shape == (cfg.image_height, cfg.image_width, 3) and image.dtype == np.uint8
        assert mask.shape == (cfg.image_height, cfg.image_width) and mask.dtype == np.uint8
        assert item["file_path"] == f"images/{item['timestep_index']:05d}_{item['camera_index']:02d}.png"
    with np.load(root / "flame_param" / "00000.npz") as p:
        assert p["translation"].shape == p["rotation"].shape == p["neck_pose"].shape == p["jaw_pose"].shape == (1, 3)
        assert p["eyes_pose"].shape == (1, 6) and p["expr"].shape == (1, len(ph.EXPR_NAMES))
        assert p["shape"].shape == (len(ph.SHAPE_NAMES),)
    with np.load(root / "canonical_flame_param.npz") as p:
        assert p["jaw_pose"][0, 0] > 0 and np.all(p["expr"] == 0)  # neutral, jaw slightly open
    flame.load_head_model(root / "head_model.npz")


def test_held_out_camera_and_sequence_only_in_val_and_test(workdir):
    root, cfg = workdir / "data", synthetic_config().synthetic
    frames = {s: json.loads((root / f"transforms_{s}.json").read_text())["frames"] for s in ("train", "val", "test")}
    held_t = set(range((cfg.num_sequences - 1) * cfg.frames_per_sequence,
                       cfg.num_sequences * cfg.frames_per_sequence))
    assert all(f["camera_index"] != cfg.held_out_camera for f in frames["train"])
    assert all(f["timestep_index"] not in held_t for f in frames["train"] + frames["val"])
    assert {f["camera_index"] for f in frames["val"]} == {cfg.held_out_camera}
    assert {f["timestep_index"] for f in frames["test"]} == held_t
    assert {f["camera_index"] for f in frames["test"]} == set(range(cfg.num_cameras))
    assert len({f["sequence"] for f in frames["test"]}) == 1


def test_every_camera_sees_a_whole_head(workdir):
    root = workdir / "data"
    for path in sorted((root / "fg_masks").glob("*.png")):
        mask = _read(path) > 127
        assert 0.15 < mask.mean() < 0.8, path.name
        # not cut by the image border at the top or the sides
        assert not mask[0].any() and not mask[:, 0].any() and not mask[:, -1].any(), path.name


def test_reader_loads_the_dataset(workdir):
    from gem_jax.data.subject import load_subject

    cfg = synthetic_config().synthetic
    subject = load_subject(workdir / "data")
    frames = cfg.num_sequences * cfg.frames_per_sequence
    train_frames = (cfg.num_sequences - 1) * cfg.frames_per_sequence
    assert len(subject.frames("train")) == train_frames * (cfg.num_cameras - 1)
    assert len(subject.frames("val")) == train_frames
    assert len(subject.frames("test")) == (frames - train_frames) * cfg.num_cameras
    image = subject.load_image(subject.frames("train")[0])
    assert image.shape == (cfg.image_height, cfg.image_width, 3) and 0.05 < image.std()


def test_vertices_project_onto_the_silhouette(workdir):
    """Posed mesh vertices, projected with the reader's cameras, land on the fg mask.

    Every vertex of the closed mesh projects inside its silhouette; a vertex on the outline may
    fall in a pixel whose sample points miss the mesh, hence the one-pixel tolerance. The
    silhouette IoU is the sharp check: a flipped ``cy`` or a half-pixel shift costs > 10 %.
    """
    root = workdir / "data"
    model = flame.load_head_model(root / "head_model.npz")
    inside = near = total = 0
    for (t, c), (viewmat, K, h, w) in _reader_cameras(root).items():
        with np.load(root / "flame_param" / f"{t:05d}.npz") as p:
            params = flame.FlameParams(**{k: jnp.asarray(p[k]).reshape(-1) for k in
                                          ("shape", "expr", "rotation", "neck_pose", "jaw_pose", "eyes_pose",
                                           "translation")})
        verts = np.asarray(flame.lbs(model, params)[0])
        uvz = project_vertices(verts, viewmat, K)
        mask = _read(root / "fg_masks" / f"{t:05d}_{c:02d}.png")
        grown = cv2.dilate(mask, np.ones((3, 3), np.uint8))
        j, i = np.floor(uvz[:, 0]).astype(int), np.floor(uvz[:, 1]).astype(int)
        ok = (i >= 0) & (i < h) & (j >= 0) & (j < w)
        inside += (mask[i[ok], j[ok]] > 0).sum()
        near += (grown[i[ok], j[ok]] > 0).sum()
        total += ok.sum()
        silhouette = rasterize_triangles(uvz, model.faces, h, w).face_index >= 0
        iou = (silhouette & (mask > 127)).sum() / (silhouette | (mask > 127)).sum()
        assert iou > 0.97, (t, c, iou)
    assert total > 0 and near / total >= 0.99 and inside / total >= 0.9


def _reader_cameras(root):
    """{(timestep, camera): (viewmat OpenCV w2c, K, h, w)} as the reader gives them."""
    from gem_jax.data.subject import load_subject

    subject = load_subject(root)
    out = {}
    for split in ("train", "val", "test"):
        for frame in subject.frames(split):
            cam = frame.camera
            out[(int(frame.timestep), int(frame.camera_index))] = (
                np.asarray(cam.viewmat), np.asarray(cam.K), int(cam.height), int(cam.width))
    return out


def test_generation_is_deterministic(tmp_path):
    cfg = synthetic_config(num_cameras=3, held_out_camera=1, frames_per_sequence=2)
    outs = []
    for k in range(2):
        scene = sy.make_scene(cfg.synthetic, cfg.seed)
        sy.write_subject(tmp_path / f"run{k}", scene, cfg.synthetic.held_out_camera, workers=1 + k)
        outs.append(tmp_path / f"run{k}")
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*") if p.is_file())
    assert len(files) > 10
    for rel in files:
        assert (outs[0] / rel).read_bytes() == (outs[1] / rel).read_bytes(), rel
    other = sy.make_scene(cfg.synthetic, cfg.seed + 1)
    assert not np.allclose(other.identity.shape, scene.identity.shape)


# ----------------------------------------------------------------------------- appearance


def _render(scene, expr=None, jaw=0.0, camera=0):
    n_expr = len(ph.EXPR_NAMES)
    params = sy.canonical_params(n_expr)
    params["jaw_pose"][0, 0] = jaw
    for name, value in (expr or {}).items():
        params["expr"][0, ph.EXPR_NAMES.index(name)] = value
    scene.sequences = [sy.Sequence("probe", params)]
    (rgb, alpha), = sy.render_frames(scene, sy.frame_table(scene), [camera]).values()
    return rgb.astype(np.float32) / 255.0, alpha


@pytest.fixture(scope="module")
def scene():
    cfg = synthetic_config(image_height=96, image_width=96, mesh_resolution=40, texture_size=128, num_cameras=5)
    return sy.make_scene(cfg.synthetic, SEED)


def test_jaw_open_shows_a_dark_mouth(scene):
    closed, _ = _render(scene, camera=2)
    opened, _ = _render(scene, jaw=0.3, camera=2)
    diff = np.abs(opened - closed).mean(-1)
    assert diff.max() > 0.3 and (diff > 0.1).mean() > 0.005
    newly_dark = (opened.mean(-1) < 0.12) & (closed.mean(-1) >= 0.12)
    assert newly_dark.sum() > 8
    changed = diff > 0.1
    assert opened[changed].mean() < closed[changed].mean() - 0.1  # the opening is darker than the lips


@pytest.mark.parametrize("name", ph.EXPR_NAMES)
def test_every_expression_changes_the_image(scene, name):
    neutral, _ = _render(scene, camera=2)
    posed, _ = _render(scene, {name: 1.0}, camera=2)
    assert np.abs(posed - neutral).max() > 0.1, name


def test_appearance_is_not_linear_in_the_expression(scene):
    """Wrinkles appear only when the brows go up; folds grow faster than linearly with a smile."""
    zero = np.zeros(len(ph.EXPR_NAMES))
    k_brow, k_smile = ph.EXPR_NAMES.index("brow_raise"), ph.EXPR_NAMES.index("smile")
    wrinkles = scene.details[..., sy.DETAIL_NAMES.index("wrinkles")] > 0.5
    tex = {}
    for k, value in ((k_brow, 1.0), (k_brow, -1.0), (k_smile, 0.5), (k_smile, 1.0)):
        e = zero.copy()
        e[k] = value
        tex[(k, value)] = sy.frame_texture(scene.albedo, scene.details, e, 0.0)
    neutral = sy.frame_texture(scene.albedo, scene.details, zero, 0.0)
    assert wrinkles.any()
    assert np.abs(tex[(k_brow, 1.0)] - neutral)[wrinkles].mean() > 0.05
    np.testing.assert_array_equal(tex[(k_brow, -1.0)], neutral)  # lowering the brows: no wrinkles
    folds = scene.details[..., sy.DETAIL_NAMES.index("nasolabial")] > 0.5
    half = np.abs(tex[(k_smile, 0.5)] - neutral)[folds].mean()
    full = np.abs(tex[(k_smile, 1.0)] - neutral)[folds].mean()
    assert full > 3 * half > 0


# ----------------------------------------------------------------------------- the data stage


def test_prepare_writes_cross_identity_and_skips_when_complete(workdir, capsys):
    main, cross = workdir / "data", workdir / "data_cross"
    test_main = json.loads((main / "transforms_test.json").read_text())["frames"]
    test_cross = json.loads((cross / "transforms_test.json").read_text())["frames"]
    assert [(f["timestep_index"], f["camera_index"]) for f in test_main] == \
        [(f["timestep_index"], f["camera_index"]) for f in test_cross]
    assert json.loads((cross / "transforms_train.json").read_text())["frames"] == []
    for a, b in zip(test_main, test_cross):  # same expression parameters, another identity
        with np.load(main / a["flame_param_path"]) as pa, np.load(cross / b["flame_param_path"]) as pb:
            np.testing.assert_array_equal(pa["expr"], pb["expr"])
            assert not np.array_equal(pa["shape"], pb["shape"])
        assert not np.array_equal(_read(main / a["file_path"]), _read(cross / b["file_path"]))
    stamp = (main / "images" / "00000_00.png").stat().st_mtime_ns
    prepare_data(synthetic_config(), workdir)
    assert "up to date" in capsys.readouterr().out
    assert (main / "images" / "00000_00.png").stat().st_mtime_ns == stamp


def test_prepare_refuses_to_overwrite_foreign_folders(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="synthetic_manifest"):
        prepare_data(synthetic_config(), tmp_path)
    assert (tmp_path / "data" / "mine.txt").exists()


def test_prepare_validates_a_given_subject_dir(workdir, capsys):
    cfg = synthetic_config()
    cfg.data.subject_dir = str(workdir / "data")
    prepare_data(cfg, workdir / "unused")
    assert str(workdir / "data") in capsys.readouterr().out
    assert not (workdir / "unused" / "data").exists()


def test_driver_video(tmp_path):
    cfg = synthetic_config()
    path = sy.write_driver_video(tmp_path / "driver.mp4", cfg.synthetic, SEED, identity=2, camera=1)
    cap = cv2.VideoCapture(str(path))
    count = 0
    while cap.read()[0]:
        count += 1
    cap.release()
    assert count == cfg.synthetic.num_sequences * cfg.synthetic.frames_per_sequence


def test_lbs_vertices_match_the_renderer(model24):
    """The renderer poses the mesh with gem_jax.head.flame (the reader's code path), batched."""
    renderer = sy.Renderer(model24)
    seqs = sy.make_sequences(SEED, 2, 3)
    shape = sy.make_identity(SEED, 0).shape
    batch = renderer.vertices(shape, seqs[1].params)
    model = flame.head_model_from_arrays(model24)
    p = {k: jnp.asarray(v[2]) for k, v in seqs[1].params.items()}
    single, _ = flame.lbs(model, flame.FlameParams(shape=jnp.asarray(shape, jnp.float32), **p))
    np.testing.assert_allclose(batch[2], np.asarray(single), atol=1e-6)
    assert jax.tree.leaves(model)  # a pytree
