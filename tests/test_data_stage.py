"""The data stage reads a real export completely before it writes ``data/DONE``: every image and
mask decodes at its declared size, masks are all there or all absent, every tracking file has its
keys and shapes, and the head model loads and agrees with the tracking. Anything else is a
``SubjectFormatError`` naming the file and the field, and no DONE marker is written.

The subject is the tiny hand-written export of ``test_subject.py`` (2 timesteps × 2 cameras)."""

import numpy as np
import pytest
from conftest import tiny_config
from test_subject import H, N_EXPR, N_SHAPE, N_VERTS, W, _json, _npz, _rewrite, edit_json, edit_npz, write_fake_subject

from gem_jax import train
from gem_jax.errors import SubjectFormatError


@pytest.fixture
def fake(tmp_path):
    return write_fake_subject(tmp_path)


def run_data_stage(fake, tmp_path, **overrides):
    config = tiny_config(**{"data.subject_dir": str(fake.root), **overrides})
    workdir = tmp_path / "work"
    train.run(config, workdir, "data")
    return workdir


def test_a_sound_export_passes_and_the_stage_says_what_it_checked(fake, tmp_path, capsys):
    workdir = run_data_stage(fake, tmp_path)
    assert (workdir / "data" / "DONE").is_file()
    out = capsys.readouterr().out
    for said in ("4 images decoded at their declared size", f"train {W}x{H}", "4 foreground masks",
                 "2 tracking files", f"shape {N_SHAPE}, expr {N_EXPR}", f"{N_VERTS} vertices", "agrees with the tracking"):
        assert said in out, said


def test_an_export_without_any_mask_is_fine(fake, tmp_path, capsys):
    for split in ("train", "val", "test"):
        edit_json(fake.root, split, lambda d: [f.pop("fg_mask_path") for f in d["frames"]])
    run_data_stage(fake, tmp_path)
    assert "no foreground masks" in capsys.readouterr().out


def _truncate(relative, keep=0.5):
    def mutate(fake):
        path = fake.root / relative
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return mutate


def _head(**changes):
    return lambda fake: edit_npz(fake.root / "head_model.npz", **changes)


RNG = np.random.default_rng(3)
BROKEN = {
    # name: (mutation, substrings the message must contain)
    "empty image": (_rewrite("images/00001_01.png", b""), ["00001_01.png", "not a readable image", "file_path"]),
    "truncated image": (_truncate("images/00000_01.png"), ["00000_01.png", "not a readable image"]),
    "garbage mask": (_rewrite("fg_masks/00001_00.png", b"\x89PNG garbage"), ["fg_masks/00001_00.png", "fg_mask_path"]),
    "image of another size": (_rewrite("images/00001_00.png", np.zeros((H, W + 3, 3), np.uint8)),
                              ["00001_00.png", f"{W + 3}x{H}", f"w={W}"]),
    "mask of another size": (_rewrite("fg_masks/00000_00.png", np.zeros((H - 1, W), np.uint8)),
                             ["fg_masks/00000_00.png", f"h={H}"]),
    "masks on some frames only": (_json("val", lambda d: d["frames"][0].pop("fg_mask_path")),
                                  ["transforms_val.json: frames[0].fg_mask_path", "every frame or for none"]),
    "two image sizes in a split": (_json("test", lambda d: d["frames"][0].update(w=W + 2)),
                                   ["transforms_test.json", "w/h", "one image size per split"]),
    "tracking file not an npz": (_rewrite("flame_param/00001.npz", b"PK\x03\x04 not really"),
                                 ["flame_param/00001.npz", "not a readable .npz"]),
    "tracking file truncated": (_truncate("flame_param/00000.npz"), ["flame_param/00000.npz", "npz"]),
    "tracking key missing": (_npz("00001.npz", neck_pose=None), ["flame_param/00001.npz", "'neck_pose'", "missing"]),
    "tracking NaN": (_npz("00000.npz", jaw_pose=np.array([[0.1, np.nan, 0.0]])),
                     ["flame_param/00000.npz", "'jaw_pose'", "NaN"]),
    "expr longer than the model": (
        lambda f: [edit_npz(f.root / "flame_param" / n, expr=RNG.normal(size=(1, N_EXPR + 3)))
                   for n in ("00000.npz", "00001.npz")] and edit_npz(
            f.root / "canonical_flame_param.npz", expr=RNG.normal(size=(1, N_EXPR + 3))),
        ["flame_param/00000.npz", "'expr'", f"{N_EXPR + 3} expression coefficients", f"has {N_EXPR}"]),
    "shape longer than the model": (
        lambda f: [edit_npz(f.root / "flame_param" / n, shape=RNG.normal(size=(N_SHAPE + 1,)))
                   for n in ("00000.npz", "00001.npz")],
        ["flame_param/00000.npz", "'shape'", f"{N_SHAPE + 1} identity coefficients", f"has {N_SHAPE}"]),
    "static offset of another mesh": (_npz("00000.npz", static_offset=RNG.normal(size=(1, N_VERTS + 2, 3))),
                                      ["flame_param/00000.npz", "'static_offset'", f"(1, {N_VERTS}, 3)"]),
    "canonical tracking missing": (lambda f: (f.root / "canonical_flame_param.npz").unlink(),
                                   ["canonical_flame_param.npz", "not found"]),
    "head model missing": (lambda f: (f.root / "head_model.npz").unlink(), ["head_model.npz", "not found"]),
    "head model truncated": (_truncate("head_model.npz", 0.6), ["head_model.npz", "not a readable .npz head model"]),
    "head model without UV": (_head(vt=None, ft=None), ["head_model.npz", "'vt'/'ft'", "UV layout"]),
    "head model field of text": (_head(weights=np.array(["a", "b"])), ["head_model.npz", "weights"]),
    "head model with 3 joints": (_head(kintree_table=np.array([[-1, 0, 1], [0, 1, 2]]),
                                       posedirs=RNG.normal(size=(N_VERTS, 3, 18)), weights=np.full((N_VERTS, 3), 1 / 3),
                                       J_regressor=np.full((3, N_VERTS), 1 / N_VERTS)),
                                 ["head_model.npz", "'kintree_table'", "5 joints", "found 3"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_export_fails_in_the_data_stage_naming_file_and_field(fake, tmp_path, case):
    mutate, culprits = BROKEN[case]
    mutate(fake)
    with pytest.raises(SubjectFormatError) as info:
        run_data_stage(fake, tmp_path)
    for culprit in culprits:
        assert culprit in str(info.value), (culprit, str(info.value))
    assert not (tmp_path / "work" / "data" / "DONE").exists()


def test_a_head_model_pickle_that_is_garbage_names_the_file(fake, tmp_path):
    bad = tmp_path / "flame.pkl"
    bad.write_bytes(b"\x80\x02}q\x00(X\x01")  # a pickle cut short
    with pytest.raises(SubjectFormatError, match="flame.pkl.*not a readable FLAME pickle"):
        run_data_stage(fake, tmp_path, **{"data.head_model": str(bad)})


def test_asking_for_more_components_than_the_model_has_names_the_file(fake, tmp_path):
    with pytest.raises(SubjectFormatError, match=f"head_model.npz.*asked for .* {N_EXPR + 1} expression"):
        run_data_stage(fake, tmp_path, **{"data.n_expr": N_EXPR + 1})
