"""Every file one stage writes for another, when damaged (truncated, or overwritten with garbage),
fails where it is read with the boundary's error naming the file and the stage that writes it,
never with a bare NumPy / zipfile / orbax error. The files are the real ones of the tiny
pipeline (``completed_workdir``), copied before they are damaged."""

import shutil
import subprocess
import sys

import pytest
from conftest import CONFIGS, tiny_context

from gem_jax.errors import ArtefactError, MissingArtefactError, SubjectFormatError


def _regressor(w):
    from gem_jax.regress.model import load_regressor

    return load_regressor(w / "regress" / "regressor.npz")


def _collect(w):
    from gem_jax.eigen.pca import read_collect

    return read_collect(w / "collect")


def _teacher(w, config):
    from gem_jax.teacher.collect import load_trained_teacher

    return load_trained_teacher(tiny_context(w, config), config.teacher)


def _call(name):
    def call(w, config):
        import gem_jax
        from gem_jax.eigen import workdir as ew

        return {"model": lambda: ew.load_model(w, "pca"), "refined": lambda: ew.load_model(w, "refine"),
                "coeffs": lambda: ew.load_pca_coefficients(w), "roots": lambda: ew.load_roots(w),
                "avatar": lambda: gem_jax.load(w), "regressor": lambda: _regressor(w),
                "collect": lambda: _collect(w), "metrics": lambda: __import__("gem_jax.report").report.collect_metrics(w),
                }[name]()
    return call


# artefact: (file, who reads it, the error type)
ARTEFACTS = {
    "pca model": ("pca/gem.npz", _call("model"), ArtefactError),
    "refined model": ("refine/gem.npz", _call("refined"), ArtefactError),
    "pca coefficients": ("pca/coeffs.npy", _call("coeffs"), ArtefactError),
    "pca timesteps": ("pca/timesteps.npy", _call("coeffs"), ArtefactError),
    "root poses": ("collect/roots.npy", _call("roots"), ArtefactError),
    "coefficients via the API": ("pca/coeffs.npy", _call("avatar"), ArtefactError),
    "collect matrix": ("collect/rotation.npy", _call("collect"), ArtefactError),
    "collect mask": ("collect/valid.npy", _call("collect"), ArtefactError),
    "regressor": ("regress/regressor.npz", _call("regressor"), ArtefactError),
    "evaluation json": ("pca/eval.json", _call("metrics"), ArtefactError),
    "head model": ("data/head_model.npz", _teacher, SubjectFormatError),
}
DAMAGE = {"truncated": lambda b: b[: len(b) // 2], "garbage": lambda b: bytes(range(256)) * 3, "empty": lambda b: b""}


@pytest.fixture
def copy_of(completed_workdir, tmp_path):
    config, workdir = completed_workdir
    out = tmp_path / "w"
    shutil.copytree(workdir, out, ignore=shutil.ignore_patterns("tb", "renders", "frames"))
    return config, out


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name", list(ARTEFACTS))
def test_a_damaged_artefact_is_refused_naming_the_file(copy_of, name, damage):
    config, w = copy_of
    relative, read, error = ARTEFACTS[name]
    read(w, config)  # intact: reads
    path = w / relative
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(error) as info:
        read(w, config)
    assert str(path) in str(info.value), str(info.value)
    if error is ArtefactError:
        assert "--force" in str(info.value), str(info.value)


def test_a_missing_artefact_names_the_stage_to_run(copy_of):
    config, w = copy_of
    (w / "pca" / "coeffs.npy").unlink()
    with pytest.raises(MissingArtefactError, match="coeffs.npy: missing; run --stage pca first"):
        _call("coeffs")(w, config)
    assert issubclass(MissingArtefactError, FileNotFoundError)


def test_a_damaged_teacher_checkpoint_names_the_step_folder(copy_of):
    config, w = copy_of
    steps = sorted(int(p.name) for p in (w / "teacher" / "ckpt").iterdir() if p.name.isdigit())
    for f in (w / "teacher" / "ckpt" / str(steps[-1])).rglob("*"):
        if f.is_file():
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ArtefactError, match=rf"ckpt/{steps[-1]}: checkpoint unreadable"):
        _teacher(w, config)


def test_the_cli_reports_a_damaged_artefact_in_one_line(copy_of):
    config, w = copy_of
    (w / "eval" / "DONE").unlink()
    (w / "regress" / "eval.json").write_text('{"self_reenactment": {"psnr": 1')
    out = subprocess.run([sys.executable, "-m", "gem_jax.train", "--config", f"{CONFIGS}/quickstart.py:tiny",
                          "--workdir", str(w), "--stage", "all"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"ArtefactError: {w / 'regress' / 'eval.json'}: not readable JSON" in out.stderr
    assert "--force regress" in out.stderr and "Traceback" not in out.stderr
