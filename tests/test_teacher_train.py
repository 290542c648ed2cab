"""End-to-end specification of the teacher stage (tiny config): outputs and the collect API.

Resume after a crash: tests/test_teacher_resume.py.
"""

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "configs"))


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """The tiny synthetic subject, written once for the module."""
    import quickstart

    from gem_jax.data import prepare

    workdir = tmp_path_factory.mktemp("teacher_data")
    prepare.run(quickstart.get_config("tiny"), workdir)
    return workdir / "data"


def tiny_config(subject_dir, **teacher):
    import quickstart

    config = quickstart.get_config("tiny")
    with config.unlocked():
        config.data.subject_dir = str(subject_dir)
        for key, value in teacher.items():
            config.teacher[key] = value
    return config


def test_two_step_training_writes_every_output(subject, tmp_path):
    from gem_jax import train as entry

    config = tiny_config(subject)
    entry.run(config, tmp_path, stage="teacher")
    out = tmp_path / "teacher"
    assert (out / "DONE").exists()
    log = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in log["records"]] == [1, 2]
    for record in log["records"]:
        for key in ("loss", "l1", "dssim", "offset", "scale", "psnr", "grad_norm", "lr"):
            assert np.isfinite(record[key]), key
        assert record["rejected"] == 0
    assert log["config"]["teacher"]["steps"] == 2
    assert list((out / "tb").glob("events.out.tfevents.*"))
    result = json.loads((out / "eval.json").read_text())
    for split in ("held_out_camera", "held_out_sequence"):
        assert {"psnr", "ssim", "l1", "num_images"} <= set(result[split])
        assert 5 < result[split]["psnr"] < 60 and 0 < result[split]["ssim"] <= 1
    renders = sorted(p.name for p in (out / "renders").glob("*.png"))
    assert len(renders) == 4 and renders[0].startswith("held_out_camera_00_t")

    # The collect API: activated Gaussians of a timestep in the head's frame, root pose removed.
    from gem_jax.teacher.maps import rigid_transform
    from gem_jax.teacher.model import (ForwardSpec, load_trained_teacher, make_net, teacher_gaussians_canonical,
                                       world_gaussians_fn)
    from gem_jax.types import Gaussians

    teacher = load_trained_teacher(config, tmp_path)
    t = teacher.subject.timesteps("train")[1]
    out_t = jax.device_get(teacher_gaussians_canonical(teacher.params, config, teacher.inputs_for_timestep(t)))
    n = teacher.constants.canonical.num
    assert {k: v.shape for k, v in out_t.items()} == {
        "position": (n, 3), "rotation": (n, 4), "scale": (n, 3), "opacity": (n,), "colors": (n, 3)}
    np.testing.assert_allclose(np.linalg.norm(out_t["rotation"], axis=1), 1.0, atol=1e-5)
    assert np.all(out_t["scale"] > 0) and np.all((out_t["opacity"] > 0) & (out_t["opacity"] < 1))
    # Applying the root transform gives what the stage renders.
    g = Gaussians(means=out_t["position"], quats=out_t["rotation"], scales=out_t["scale"],
                  opacities=out_t["opacity"], colors=out_t["colors"])
    world = rigid_transform(g, teacher.root_transform(t))
    ref = world_gaussians_fn(make_net(config.teacher), ForwardSpec.from_config(config.teacher))(
        teacher.params, teacher.constants, teacher.inputs_for_timestep(t).vertices[None],
        teacher.root_transform(t)[None])
    np.testing.assert_allclose(world.means, ref.means[0], atol=1e-5)
