"""End-to-end specification of the teacher stage (tiny config): outputs and the collect API.

Resume after a crash: tests/test_teacher_resume.py.
"""

import json

import jax
import numpy as np

from gem_jax import train as entry

from conftest import tiny_config, tiny_context


def test_two_step_training_writes_every_output(tiny_subject, tmp_path):
    config = tiny_config(**{"data.subject_dir": str(tiny_subject)})
    entry.run(config, tmp_path, stage="teacher")
    out = tmp_path / "teacher"
    assert (out / "DONE").exists()
    log = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in log["records"]] == [1, 2]
    for record in log["records"]:
        for key in ("loss", "l1", "dssim", "offset", "scale", "psnr", "grad_norm", "lr"):
            assert np.isfinite(record[key]), key
        assert record["rejected"] == 0
    assert log["config"]["steps"] == 2  # the stage's own config section
    assert list((out / "tb").glob("events.out.tfevents.*"))
    result = json.loads((out / "eval.json").read_text())
    for split in ("held_out_camera", "held_out_sequence"):
        assert {"psnr", "ssim", "l1", "num_images"} <= set(result[split])
        assert 5 < result[split]["psnr"] < 60 and 0 < result[split]["ssim"] <= 1
    renders = sorted(p.name for p in (out / "renders").glob("*.png"))
    assert len(renders) == 4 and renders[0].startswith("held_out_camera_00_t")

    # The collect API: activated Gaussians of a timestep in the head's frame, root pose removed.
    from gem_jax.teacher.collect import load_trained_teacher
    from gem_jax.teacher.maps import rigid_transform
    from gem_jax.teacher.model import ForwardSpec, make_net, world_gaussians_fn

    teacher = load_trained_teacher(tiny_context(tmp_path, config), config.teacher)
    t = teacher.subject.timesteps("train")[1]
    g = jax.device_get(teacher.gaussians(t))
    n = teacher.constants.canonical.num
    assert (g.means.shape, g.quats.shape, g.scales.shape, g.opacities.shape, g.colors.shape) == (
        (n, 3), (n, 4), (n, 3), (n,), (n, 3))
    np.testing.assert_allclose(np.linalg.norm(g.quats, axis=1), 1.0, atol=1e-5)
    assert np.all(g.scales > 0) and np.all((g.opacities > 0) & (g.opacities < 1))
    # Applying the root transform gives what the stage renders.
    vertices, root = teacher.root_free_mesh(t)
    world = rigid_transform(g, root)
    ref = world_gaussians_fn(make_net(config.teacher), ForwardSpec.from_config(config.teacher))(
        teacher.params, teacher.constants, vertices[None], root[None])
    np.testing.assert_allclose(world.means, ref.means[0], atol=1e-5)
