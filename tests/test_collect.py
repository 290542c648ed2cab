"""The collect stage writes the teacher's canonical Gaussians of every training timestep in the
PCA layout, root pose removed, quaternions sign-consistent, and the root poses beside them."""

import jax
import numpy as np

from gem_jax.eigen.pca import read_collect
from gem_jax.eigen.workdir import load_roots
from gem_jax.teacher.collect import load_trained_teacher

from conftest import tiny_context


def test_collect_layout_matches_the_teacher(distilled_workdir):
    config, workdir = distilled_workdir
    data = read_collect(workdir / "collect")
    teacher = load_trained_teacher(tiny_context(workdir, config), config.teacher)
    train_t = sorted(set(teacher.subject.timesteps("train")))
    assert data.timesteps.tolist() == train_t
    n, t = data.num_timesteps, data.num_gaussians
    assert data.valid.sum() == t == int(teacher.constants.canonical.num)
    assert data.matrices["position"].shape == (n, 3 * t) and data.matrices["opacity"].shape == (n, t)
    # Every row equals an independent teacher call of that timestep (sign-aligned quaternions).
    q_ref = None
    for row, step in enumerate(train_t):
        g = jax.device_get(teacher.gaussians(step))
        q = np.asarray(g.quats)
        q_ref = q if q_ref is None else q_ref
        q = np.where(np.sum(q * q_ref, -1, keepdims=True) < 0, -q, q)
        np.testing.assert_allclose(data.matrices["position"][row].reshape(t, 3), g.means, atol=1e-5)
        np.testing.assert_allclose(data.matrices["rotation"][row].reshape(t, 4), q, atol=1e-5)
        np.testing.assert_allclose(data.matrices["scale"][row].reshape(t, 3), g.scales, rtol=1e-5)
        np.testing.assert_allclose(data.matrices["opacity"][row], g.opacities, atol=1e-6)
    np.testing.assert_allclose(data.colors, g.colors, atol=1e-6)
    rot = np.asarray(data.matrices["rotation"]).reshape(n, t, 4)
    np.testing.assert_allclose(np.linalg.norm(rot, axis=-1), 1.0, atol=1e-5)
    assert np.all(np.sum(rot * rot[:1], -1) >= 0), "quaternion signs must be consistent over time"
    # The positions are root-free: the data varies far less than the posed heads move.
    assert np.ptp(np.asarray(data.matrices["position"]), axis=0).max() < 0.1


def test_roots_cover_every_split_and_place_the_head(distilled_workdir):
    from gem_jax.head.flame import lbs

    config, workdir = distilled_workdir
    roots = load_roots(workdir)
    teacher = load_trained_teacher(tiny_context(workdir, config), config.teacher)
    every = sorted({t for split in ("train", "val", "test") for t in teacher.subject.timesteps(split)})
    assert roots.shape == (max(every) + 1, 4, 4)
    for step in every:
        rot = roots[step][:3, :3]
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-5)
        # root ∘ (root-free tracked mesh) = the tracked mesh in the world (LBS, independently).
        verts = np.asarray(teacher.root_free_mesh(step)[0])
        world = np.asarray(lbs(teacher.head_model, teacher.subject.flame_params(step))[0])
        np.testing.assert_allclose(verts @ rot.T + roots[step][:3, 3], world, atol=1e-5)
