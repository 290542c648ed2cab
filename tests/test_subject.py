"""The subject reader (docs/data_format.md): round trip, the camera conversion, bad input.

Every test writes its own tiny subject (2 timesteps × 2 cameras, 8×10 images, random cameras,
images and FLAME parameters) so that the reader is tested without the synthetic generator.
"""

import json
import types

import cv2
import numpy as np
import pytest

from gem_jax.data.subject import SubjectFormatError, load_subject

H, W = 8, 10  # not square: a swapped h/w shows
N_SHAPE, N_EXPR, N_VERTS = 5, 4, 6
LAYOUT = {"train": [(0, 0)], "val": [(0, 1)], "test": [(1, 0), (1, 1)]}  # (timestep, camera)
SEQUENCE = {0: "EMO-1", 1: "FREE"}
FLIP = np.diag([1.0, -1.0, -1.0, 1.0])


def look_at_c2w(rng):
    """OpenGL camera-to-world: camera at a random spot ~3 units out, looking at the origin."""
    eye = rng.normal(size=3)
    eye = 3.0 * eye / np.linalg.norm(eye)
    z = eye / np.linalg.norm(eye)  # OpenGL z points backward, away from what is seen
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    c2w[:3, 3] = eye
    return c2w


def random_params(rng, t):
    p = {k: rng.normal(size=(1, n)).astype(np.float32) for k, n in
         (("translation", 3), ("rotation", 3), ("neck_pose", 3), ("jaw_pose", 3), ("eyes_pose", 6))}
    p["shape"] = rng.normal(size=(N_SHAPE,) if t == 0 else (1, N_SHAPE)).astype(np.float32)  # both layouts
    p["expr"] = rng.normal(size=(1, N_EXPR) if t == 0 else (N_EXPR,)).astype(np.float32)
    if t == 0:  # timestep 1 has no static offset (optional)
        p["static_offset"] = rng.normal(size=(1, N_VERTS, 3)).astype(np.float32)
    return p


def head_model_arrays(rng):
    weights = rng.random((N_VERTS, 5)) + 0.1
    jreg = rng.random((5, N_VERTS))
    return dict(v_template=rng.normal(size=(N_VERTS, 3)), shapedirs=rng.normal(size=(N_VERTS, 3, N_SHAPE + N_EXPR)),
                posedirs=rng.normal(size=(N_VERTS, 3, 36)), J_regressor=jreg / jreg.sum(1, keepdims=True),
                weights=weights / weights.sum(1, keepdims=True), f=rng.integers(0, N_VERTS, size=(4, 3)),
                kintree_table=np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]]), n_shape=np.array(N_SHAPE),
                vt=rng.random((N_VERTS, 2)), ft=rng.integers(0, N_VERTS, size=(4, 3)))


@pytest.fixture
def fake(tmp_path):
    return write_fake_subject(tmp_path)


def write_fake_subject(tmp_path):
    """The tiny subject of the module docstring in ``tmp_path/subject``; returns what was written."""
    rng = np.random.default_rng(7)
    root = tmp_path / "subject"
    for sub in ("images", "fg_masks", "flame_param"):
        (root / sub).mkdir(parents=True)
    fake = types.SimpleNamespace(root=root, rgb={}, mask={}, params={}, cams={})
    for t in (0, 1):
        fake.params[t] = random_params(rng, t)
        np.savez(root / "flame_param" / f"{t:05d}.npz", **fake.params[t])
    canonical = {k: v for k, v in random_params(rng, 0).items() if k not in ("shape", "static_offset")}
    np.savez(root / "canonical_flame_param.npz", **canonical)
    fake.canonical = canonical
    np.savez(root / "head_model.npz", **head_model_arrays(rng))
    for split, pairs in LAYOUT.items():
        frames = []
        for t, c in pairs:
            name = f"{t:05d}_{c:02d}.png"
            fake.rgb[t, c] = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
            fake.mask[t, c] = rng.integers(0, 256, size=(H, W), dtype=np.uint8)
            cv2.imwrite(str(root / "images" / name), fake.rgb[t, c][..., ::-1])
            cv2.imwrite(str(root / "fg_masks" / name), fake.mask[t, c])
            cam = dict(c2w=look_at_c2w(rng), fl_x=rng.uniform(8, 12), fl_y=rng.uniform(8, 12),
                       cx=rng.uniform(3, 7), cy=rng.uniform(2, 6))  # cy bottom-up (OpenGL)
            fake.cams[t, c] = cam
            frames.append(dict(file_path=f"images/{name}", fg_mask_path=f"fg_masks/{name}",
                               flame_param_path=f"flame_param/{t:05d}.npz", timestep_index=t, camera_index=c,
                               cx=cam["cx"], cy=cam["cy"], fl_x=cam["fl_x"], fl_y=cam["fl_y"], h=H, w=W,
                               transform_matrix=cam["c2w"].tolist(), sequence=SEQUENCE[t], camera_id=f"cam{c}"))
        (root / f"transforms_{split}.json").write_text(json.dumps({"frames": frames[::-1]}))  # unsorted on disk
    return fake


def edit_json(root, split, fn):
    path = root / f"transforms_{split}.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def edit_npz(path, **changes):
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    for key, value in changes.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)


def record(subject, t, c):
    every = [r for split in ("train", "val", "test") for r in subject.frames(split)]
    (rec,) = [r for r in every if (r.timestep, r.camera_index) == (t, c)]
    return rec


# ----------------------------------------------------------------------------- round trip


def test_frames_are_sorted_and_carry_the_json_fields(fake):
    subject = load_subject(fake.root)
    for split, pairs in LAYOUT.items():
        records = subject.frames(split)
        assert [(r.timestep, r.camera_index) for r in records] == sorted(pairs)
        for r in records:
            assert r.sequence == SEQUENCE[r.timestep]
            assert r.image_path == fake.root / "images" / f"{r.timestep:05d}_{r.camera_index:02d}.png"
            assert r.mask_path == fake.root / "fg_masks" / r.image_path.name
            assert r.flame_param_path == fake.root / "flame_param" / f"{r.timestep:05d}.npz"
            assert (r.camera.width, r.camera.height) == (W, H)
            assert f"transforms_{split}.json" in r.source
    assert subject.timesteps("test") == [1] and subject.camera_indices("test") == [0, 1]
    assert subject.sequences("train") == ["EMO-1"]
    assert list(subject.cameras("test")) == [0, 1]
    assert "train 1, val 1, test 2" in subject.summary()
    with pytest.raises(KeyError, match="unknown split"):
        subject.frames("training")


def test_cameras_follow_the_documented_conversion(fake):
    subject = load_subject(fake.root)
    for (t, c), cam in fake.cams.items():
        got = record(subject, t, c).camera
        assert got.viewmat.dtype == np.float32 and got.K.dtype == np.float32
        np.testing.assert_allclose(got.viewmat, np.linalg.inv(cam["c2w"] @ FLIP), atol=1e-6)
        np.testing.assert_allclose(got.K, [[cam["fl_x"], 0, cam["cx"]], [0, cam["fl_y"], H - cam["cy"]], [0, 0, 1]],
                                   rtol=1e-6)


def opengl_project(cam, points):
    """Independent projection in the export's own conventions: OpenGL axes, ``cy`` from the bottom."""
    p = (np.linalg.inv(cam["c2w"]) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
    depth = -p[:, 2]  # OpenGL looks down −z
    u = cam["cx"] + cam["fl_x"] * p[:, 0] / depth
    v_up = cam["cy"] + cam["fl_y"] * p[:, 1] / depth  # y up, measured from the bottom edge
    return np.stack([u, H - v_up], axis=1), depth


def opencv_project(camera, points):
    """The convention of docs/architecture.md §3: u = fx·x/z + cx on OpenCV camera coordinates."""
    p = (np.asarray(camera.viewmat, np.float64) @ np.c_[points, np.ones(len(points))].T).T[:, :3]
    uv = (np.asarray(camera.K, np.float64) @ (p / p[:, 2:]).T).T[:, :2]
    return uv, p[:, 2]


def test_projection_matches_an_independent_opengl_projection(fake):
    subject = load_subject(fake.root)
    rng = np.random.default_rng(1)
    for (t, c), cam in fake.cams.items():
        points = rng.normal(scale=0.5, size=(20, 3))  # around the origin, in front of every camera
        want, depth = opengl_project(cam, points)
        got, z = opencv_project(record(subject, t, c).camera, points)
        assert np.all(depth > 0) and np.all(z > 0)
        np.testing.assert_allclose(z, depth, rtol=1e-5)
        np.testing.assert_allclose(got, want, atol=1e-4)


def test_a_point_through_a_pixel_centre_lands_on_that_pixel_of_the_loaded_image(fake):
    """OpenGL pixel (column j, row r counted from the bottom) is image row h−1−r; its centre
    projects with the reader's camera to (j + 0.5, h − 1 − r + 0.5)."""
    t, c, j, r = 1, 1, 7, 2
    cam = fake.cams[t, c]
    u_gl, v_up = j + 0.5, r + 0.5
    ray = np.array([(u_gl - cam["cx"]) / cam["fl_x"], (v_up - cam["cy"]) / cam["fl_y"], -1.0, 0.0])
    point = (cam["c2w"] @ (np.array([0, 0, 0, 1.0]) + 2.5 * ray))[:3]
    subject = load_subject(fake.root)
    rec = record(subject, t, c)
    (uv,), _ = opencv_project(rec.camera, point[None])
    np.testing.assert_allclose(uv, [j + 0.5, H - 1 - r + 0.5], atol=1e-4)
    marked = np.zeros((H, W, 3), np.uint8)
    marked[H - 1 - r, j] = (255, 128, 0)  # written top row first, as PNG stores it
    cv2.imwrite(str(rec.image_path), marked[..., ::-1])
    rec.mask_path.unlink()
    cv2.imwrite(str(rec.mask_path), np.full((H, W), 255, np.uint8))
    image = subject.load_image(rec)
    np.testing.assert_allclose(image[int(uv[1]), int(uv[0])], [1.0, 128 / 255, 0.0], atol=1e-6)


def test_load_image_composites_on_the_background_with_the_mask(fake):
    subject = load_subject(fake.root)
    bg = np.array([0.2, 0.7, 0.4], np.float32)
    for (t, c), rgb in fake.rgb.items():
        rec = record(subject, t, c)
        alpha = fake.mask[t, c].astype(np.float32)[..., None] / 255
        image = subject.load_image(rec, background=tuple(bg))
        assert image.shape == (H, W, 3) and image.dtype == np.float32
        np.testing.assert_allclose(image, rgb / 255 * alpha + bg * (1 - alpha), atol=1e-6)
        np.testing.assert_allclose(subject.load_mask(rec), alpha[..., 0], atol=1e-7)


def test_without_a_mask_the_image_is_returned_as_is_or_composited_by_its_alpha(fake):
    edit_json(fake.root, "test", lambda d: [f.pop("fg_mask_path") for f in d["frames"]])
    subject = load_subject(fake.root)
    rec = record(subject, 1, 0)
    assert rec.mask_path is None
    np.testing.assert_allclose(subject.load_image(rec, (0.0, 0.0, 0.0)), fake.rgb[1, 0] / 255, atol=1e-6)
    np.testing.assert_array_equal(subject.load_mask(rec), np.ones((H, W)))
    alpha = fake.mask[1, 0]
    cv2.imwrite(str(rec.image_path), np.dstack([fake.rgb[1, 0][..., ::-1], alpha]))
    a = alpha[..., None] / 255
    np.testing.assert_allclose(subject.load_image(rec, (0.0, 1.0, 0.0)), fake.rgb[1, 0] / 255 * a + [0, 1, 0] * (1 - a),
                               atol=1e-6)


def test_flame_params_drop_the_batch_dim_and_are_cached(fake):
    subject = load_subject(fake.root)
    for t, want in fake.params.items():
        got = subject.flame_params(t)
        for key, value in want.items():
            assert getattr(got, key).dtype == np.float32
            np.testing.assert_array_equal(getattr(got, key), value.reshape(-1, 3) if key == "static_offset"
                                          else value.reshape(-1))
        assert got.shape.shape == (N_SHAPE,) and got.expr.shape == (N_EXPR,) and got.eyes_pose.shape == (6,)
        assert subject.flame_params(t) is got
    assert subject.flame_params(0).static_offset.shape == (N_VERTS, 3)
    assert subject.flame_params(1).static_offset is None
    with pytest.raises(KeyError, match="timestep 5"):
        subject.flame_params(5)


def test_canonical_params_take_identity_from_the_first_timestep_when_absent(fake):
    canonical = load_subject(fake.root).canonical_params()
    np.testing.assert_array_equal(canonical.jaw_pose, fake.canonical["jaw_pose"].reshape(-1))
    np.testing.assert_array_equal(canonical.expr, fake.canonical["expr"].reshape(-1))
    np.testing.assert_array_equal(canonical.shape, fake.params[0]["shape"])
    np.testing.assert_array_equal(canonical.static_offset, fake.params[0]["static_offset"][0])
    own_shape = np.random.default_rng(3).normal(size=(1, N_SHAPE)).astype(np.float32)
    edit_npz(fake.root / "canonical_flame_param.npz", shape=own_shape)
    np.testing.assert_array_equal(load_subject(fake.root).canonical_params().shape, own_shape[0])


def test_head_model_comes_from_the_subject_or_a_given_path(fake, tmp_path):
    subject = load_subject(fake.root)
    model = subject.head_model()
    assert (model.num_vertices, model.n_shape, model.n_expr) == (N_VERTS, N_SHAPE, N_EXPR)
    assert subject.head_model(n_shape=2, n_expr=3).exprdirs.shape == (N_VERTS, 3, 3)
    moved = tmp_path / "flame.npz"
    (fake.root / "head_model.npz").rename(moved)
    assert subject.head_model(str(moved)).num_vertices == N_VERTS


def test_load_split_holds_the_composited_split_in_memory(fake):
    subject = load_subject(fake.root)
    bg = (0.0, 0.5, 1.0)
    arrays = subject.load_split("test", background=bg)
    records = subject.frames("test")
    assert arrays.images.shape == (2, H, W, 3) and arrays.images.dtype == np.uint8
    assert arrays.masks.shape == (2, H, W) and arrays.masks.dtype == np.uint8
    assert (arrays.width, arrays.height, arrays.num_frames) == (W, H, 2)
    np.testing.assert_array_equal(arrays.timesteps, [1, 1])
    np.testing.assert_array_equal(arrays.camera_indices, [0, 1])
    assert arrays.timesteps.dtype == np.int32 and arrays.viewmats.dtype == np.float32
    for i, rec in enumerate(records):
        expected = np.round(subject.load_image(rec, bg) * 255)
        np.testing.assert_allclose(arrays.images[i], expected, atol=1)
        np.testing.assert_array_equal(arrays.masks[i], fake.mask[rec.timestep, rec.camera_index])
        np.testing.assert_array_equal(arrays.viewmats[i], rec.camera.viewmat)
        np.testing.assert_array_equal(arrays.camera(i).K, rec.camera.K)
    one = subject.load_split("test", max_frames=1)
    assert one.images.shape == (1, H, W, 3) and list(one.timesteps) == [1]


def test_missing_val_and_test_files_are_empty_splits_with_a_note(fake):
    (fake.root / "transforms_val.json").unlink()
    (fake.root / "transforms_test.json").unlink()
    with pytest.warns(UserWarning) as caught:
        subject = load_subject(fake.root)
    assert [str(w.message).split(": ")[0] for w in caught] == \
        [str(fake.root / "transforms_val.json"), str(fake.root / "transforms_test.json")]
    assert subject.frames("val") == [] and subject.frames("test") == []
    assert "transforms_test.json is missing" in subject.summary()
    assert subject.load_split("val").images.shape[0] == 0


def test_intrinsics_may_be_shared_at_the_top_level(fake):
    def hoist(data):
        for key in ("h", "w"):
            data[key] = data["frames"][0].pop(key)
    edit_json(fake.root, "train", hoist)
    assert load_subject(fake.root).frames("train")[0].camera.height == H


# ----------------------------------------------------------------------------- bad input


def _json(split, fn):
    return lambda fake: edit_json(fake.root, split, fn)


def _set(index, **fields):
    return lambda d: d["frames"][index].update(fields)


def _scaled_matrix(d):
    scaled = np.asarray(d["frames"][0]["transform_matrix"]) @ np.diag([2, 2, 2, 1])
    d["frames"][0]["transform_matrix"] = scaled.tolist()


def _nan_matrix(d):
    d["frames"][0]["transform_matrix"][1][2] = float("nan")  # json writes NaN, which json.loads accepts


def _rewrite(relative, content):
    def mutate(fake):
        path = fake.root / relative
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            cv2.imwrite(str(path), content)
    return mutate


def _npz(name, **changes):
    return lambda fake: edit_npz(fake.root / "flame_param" / name, **changes)


LOAD = None  # the failure happens in load_subject itself
RNG = np.random.default_rng(11)
BAD_INPUTS = {
    # name: (mutation, what triggers the error, substrings the message must contain)
    "train json missing": (lambda f: (f.root / "transforms_train.json").unlink(), LOAD,
                           ["transforms_train.json", "not found"]),
    "truncated json": (lambda f: (f.root / "transforms_train.json").write_text('{"frames": [{"file_p'), LOAD,
                       ["transforms_train.json", "not valid JSON"]),
    "no frames list": (lambda f: (f.root / "transforms_val.json").write_text('{"frame": []}'), LOAD,
                       ["transforms_val.json", "frames"]),
    "frame not an object": (_json("test", lambda d: d["frames"].insert(0, 5)), LOAD,
                            ["transforms_test.json", "frames[0]", "object"]),
    "missing camera_index": (_json("train", lambda d: d["frames"][0].pop("camera_index")), LOAD,
                             ["transforms_train.json", "frames[0].camera_index", "missing"]),
    "3x4 matrix": (_json("test", lambda d: d["frames"][1]["transform_matrix"].pop()), LOAD,
                   ["transforms_test.json", "frames[1].transform_matrix", "4x4"]),
    "NaN in matrix": (_json("val", _nan_matrix), LOAD, ["transforms_val.json", "frames[0].transform_matrix", "finite"]),
    "non-rigid matrix": (_json("train", _scaled_matrix), LOAD, ["transforms_train.json", "frames[0].transform_matrix",
                                                               "rigid"]),
    "zero height": (_json("val", _set(0, h=0)), LOAD, ["transforms_val.json", "frames[0].h", "integer >= 1"]),
    "string focal length": (_json("test", _set(1, fl_x="10")), LOAD, ["transforms_test.json", "frames[1].fl_x"]),
    "fractional timestep": (_json("train", _set(0, timestep_index=0.5)), LOAD, ["frames[0].timestep_index"]),
    "sequence not a string": (_json("train", _set(0, sequence=3)), LOAD,
                              ["transforms_train.json", "frames[0].sequence"]),
    "missing image": (lambda f: (f.root / "images" / "00000_00.png").unlink(), LOAD,
                      ["transforms_train.json", "frames[0].file_path", "00000_00.png"]),
    "missing mask": (lambda f: (f.root / "fg_masks" / "00000_01.png").unlink(), LOAD,
                     ["transforms_val.json", "frames[0].fg_mask_path", "00000_01.png"]),
    "missing flame params": (lambda f: (f.root / "flame_param" / "00001.npz").unlink(), LOAD,
                             ["transforms_test.json", "flame_param_path", "00001.npz"]),
    "one timestep, two flame files": (_json("test", _set(0, flame_param_path="flame_param/00000.npz")), LOAD,
                                      ["transforms_test.json", "flame_param_path", "timestep 1"]),
    "duplicate frame": (_json("test", lambda d: d["frames"].append(dict(d["frames"][0]))), LOAD,
                        ["transforms_test.json", "frames[2]", "(1, 1)"]),
    "image size differs from h/w": (_rewrite("images/00000_00.png", np.zeros((H + 1, W, 3), np.uint8)),
                                    lambda s: s.load_image(record(s, 0, 0)),
                                    ["00000_00.png", "10x9", "transforms_train.json: frames[0]", "h=8"]),
    "mask size differs from h/w": (_rewrite("fg_masks/00001_01.png", np.zeros((H, W - 1), np.uint8)),
                                   lambda s: s.load_mask(record(s, 1, 1)), ["fg_masks/00001_01.png", "w=10"]),
    "corrupt image": (_rewrite("images/00001_00.png", b"not a png"), lambda s: s.load_image(record(s, 1, 0)),
                      ["00001_00.png", "not a readable image", "frames[1].file_path"]),
    "npz missing a key": (_npz("00000.npz", jaw_pose=None), lambda s: s.flame_params(0),
                          ["flame_param/00000.npz", "'jaw_pose'", "missing"]),
    "npz wrong pose shape": (_npz("00001.npz", eyes_pose=RNG.normal(size=(1, 3))), lambda s: s.flame_params(1),
                             ["flame_param/00001.npz", "'eyes_pose'", "(1, 6)", "(1, 3)"]),
    "npz NaN": (_npz("00000.npz", expr=np.array([[0.3, np.nan, 1.0, 2.0]])), lambda s: s.flame_params(0),
                ["flame_param/00000.npz", "'expr'", "NaN"]),
    "npz not a zip": (_rewrite("flame_param/00001.npz", b"\x00garbage"), lambda s: s.flame_params(1),
                      ["flame_param/00001.npz", "npz"]),
    "npz object array": (_npz("00000.npz", shape=np.array([1, "a"], dtype=object)), lambda s: s.flame_params(0),
                         ["flame_param/00000.npz", "'shape'"]),
    "expr size differs between timesteps": (_npz("00001.npz", expr=RNG.normal(size=(N_EXPR + 1,))),
                                            lambda s: (s.flame_params(0), s.flame_params(1)),
                                            ["flame_param/00001.npz", "'expr'", "(1, E)", "00000.npz"]),
    "static offset shape": (_npz("00000.npz", static_offset=RNG.normal(size=(1, N_VERTS, 2))),
                            lambda s: s.flame_params(0), ["flame_param/00000.npz", "'static_offset'", "(1, V, 3)"]),
    "canonical missing": (lambda f: (f.root / "canonical_flame_param.npz").unlink(), lambda s: s.canonical_params(),
                          ["canonical_flame_param.npz", "not found"]),
    "head model missing": (lambda f: (f.root / "head_model.npz").unlink(), lambda s: s.head_model(),
                           ["head_model.npz", "not found", "head_model"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_names_the_file_and_the_field(fake, case):
    mutate, trigger, culprits = BAD_INPUTS[case]
    mutate(fake)
    with pytest.raises(SubjectFormatError) as info:
        subject = load_subject(fake.root)
        if trigger is not LOAD:
            trigger(subject)
    assert isinstance(info.value, ValueError)
    for culprit in culprits:
        assert culprit in str(info.value), (culprit, str(info.value))
