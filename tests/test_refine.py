"""Photometric refinement of the bases: sharded step = single-device step, QR keeps U
orthonormal, interrupted runs resume to the same result, and the stage writes its outputs."""

import json

import jax
import numpy as np
import pytest

from gem_jax import parallel, train
from gem_jax.checkpoint import StageCheckpoints
from gem_jax.data.images import load_images
from gem_jax.data.subject import load_subject
from gem_jax.eigen import refine
from gem_jax.eigen.model import load
from gem_jax.eigen.render import frame_capacity
from gem_jax.eigen.workdir import load_model, load_pca_coefficients, load_roots

from conftest import tiny_config


def _setup(workdir, config):
    model = load_model(workdir, "pca")
    coeffs, roots = load_pca_coefficients(workdir), load_roots(workdir)
    images = load_images(load_subject(workdir / "data"), "train")
    cap = frame_capacity(model, coeffs.of(images.timesteps), roots[images.timesteps], images.viewmats, images.Ks,
                         images.width, images.height, headroom=2.0)
    return model, coeffs, roots, images, cap


def test_sharded_refine_step_equals_single_device_step(distilled_workdir):
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=4")
    config, workdir = distilled_workdir
    rc = tiny_config(**{"refine.qr_every": 1000, "refine.random_background": True}).refine
    model, coeffs, roots, images, cap = _setup(workdir, config)
    optimizer = refine.make_optimizer(rc)
    batch_np = refine.refine_batch(images, coeffs, roots, 0, 4, seed=0)
    out = {}
    for n in (1, 4):
        mesh = parallel.data_mesh(jax.devices()[:n])
        step = refine.make_refine_step(rc, optimizer, mesh, images.width, images.height, cap, seed=0)
        state = parallel.replicate(refine.init_state(model, optimizer), mesh)
        state, metrics = step(state, parallel.shard_batch(batch_np, mesh), parallel.replicate(model, mesh), None)
        out[n] = jax.device_get((state, metrics))
    (s1, m1), (s4, m4) = out[1], out[4]
    assert m1["rejected"] == m4["rejected"] == 0 and int(s4["step"]) == 1
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for m in model.U:
        update1 = s1["U"][m] - np.asarray(model.U[m])
        update4 = s4["U"][m] - np.asarray(model.U[m])
        assert np.abs(update1).max() > 0, f"{m}: U did not move"
        np.testing.assert_allclose(update4, update1, rtol=1e-3, atol=1e-3 * np.abs(update1).max(), err_msg=m)


def test_refine_step_improves_the_loss_and_qr_keeps_rows_orthonormal(distilled_workdir):
    config, workdir = distilled_workdir
    rc = tiny_config(**{"refine.qr_every": 5, "refine.lr": 3e-3, "refine.steps": 10,
                        "refine.random_background": False}).refine
    model, coeffs, roots, images, cap = _setup(workdir, config)
    optimizer = refine.make_optimizer(rc)
    mesh = parallel.data_mesh(jax.devices()[:1])
    step = refine.make_refine_step(rc, optimizer, mesh, images.width, images.height, cap, seed=0)
    state = refine.init_state(model, optimizer)
    batch = refine.refine_batch(images, coeffs, roots, 0, 4, seed=0)  # the same batch every step
    losses = []
    for i in range(10):
        state, metrics = step(state, batch, model, None)
        losses.append(float(metrics["loss"]))
        gram = {m: np.asarray(u @ u.T) for m, u in jax.device_get(state["U"]).items()}
        err = max(np.abs(g - np.eye(len(g))).max() for g in gram.values())
        if (i + 1) % 5 == 0:
            assert err < 1e-5, f"step {i + 1}: QR should restore U Uᵀ = I (error {err:.2e})"
        elif i == 3:
            assert err > 1e-6, "between QR steps, Adam moves U off the Stiefel manifold"
    assert losses[-1] < losses[0], losses


class SimulatedCrash(RuntimeError):
    pass


def test_stage_resumes_after_interruption_to_the_same_basis(distilled_workdir, tmp_path, monkeypatch):
    import shutil

    config, workdir = distilled_workdir
    for name in ("data", "collect", "pca"):
        shutil.copytree(workdir / name, tmp_path / "a" / name)
        shutil.copytree(workdir / name, tmp_path / "b" / name)
    config3 = tiny_config(**{"refine.steps": 3})
    train.run(config3, tmp_path / "a", "refine")
    # "b" crashes right after its checkpoint of step 2 is on disk, then the same command reruns.
    save = StageCheckpoints.save

    def crash_after_step_2(self, step, state, force=False):
        saved = save(self, step, state, force)
        if step == 2:
            self.wait()
            raise SimulatedCrash("killed after the checkpoint of step 2")
        return saved

    monkeypatch.setattr(StageCheckpoints, "save", crash_after_step_2)
    with pytest.raises(SimulatedCrash):
        train.run(config3, tmp_path / "b", "refine")
    assert not (tmp_path / "b" / "refine" / "gem.npz").exists()
    monkeypatch.setattr(StageCheckpoints, "save", save)
    train.run(config3, tmp_path / "b", "refine")
    a, b = load(tmp_path / "a" / "refine" / "gem.npz"), load(tmp_path / "b" / "refine" / "gem.npz")
    for m in a.U:
        np.testing.assert_allclose(np.asarray(b.U[m]), np.asarray(a.U[m]), atol=1e-6, err_msg=m)
    records = json.loads((tmp_path / "b" / "refine" / "metrics.json").read_text())["records"]
    assert [r["step"] for r in records] == [1, 2, 3]
    ev = json.loads((tmp_path / "a" / "refine" / "eval.json").read_text())
    for split in ("training_views", "held_out_camera", "held_out_sequence"):
        assert np.isfinite(ev[split]["psnr"]) and ev[split]["num_images"] > 0
    assert ev["held_out_sequence"]["coefficients"] == "fitted"
    assert (tmp_path / "a" / "refine" / "fit_test.npz").is_file()
    pngs = list((tmp_path / "a" / "refine" / "renders").glob("*.png"))
    assert pngs, "renders are written"


def test_missing_inputs_name_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run --stage pca"):
        train.run(tiny_config(), tmp_path, "refine")


def test_anchor_penalty_measures_and_limits_the_distance_to_the_pca_basis(distilled_workdir):
    config, workdir = distilled_workdir
    model, coeffs, roots, images, cap = _setup(workdir, config)
    mesh = parallel.data_mesh(jax.devices()[:1])
    batch = refine.refine_batch(images, coeffs, roots, 0, 4, seed=0)
    distance = {}
    for anchor in (0.0, 1e4):
        rc = tiny_config(**{"refine.qr_every": 1000, "refine.lr": 3e-3, "refine.steps": 6,
                            "refine.random_background": False, "refine.loss.anchor": anchor}).refine
        optimizer = refine.make_optimizer(rc)
        step = refine.make_refine_step(rc, optimizer, mesh, images.width, images.height, cap, seed=0)
        state = refine.init_state(model, optimizer)
        for _ in range(6):
            before = {m: np.asarray(u, np.float64) for m, u in jax.device_get(state["U"]).items()}
            state, metrics = step(state, batch, model, None)
            if anchor:  # the logged term is Σ_m ‖U_m − U_m^PCA‖² of the basis the step started from
                expected = sum(np.sum((before[m] - np.asarray(model.U[m], np.float64)) ** 2) for m in before)
                np.testing.assert_allclose(float(metrics["anchor"]), expected, rtol=1e-4, atol=1e-10)
        U = jax.device_get(state["U"])
        distance[anchor] = sum(np.sum((np.asarray(U[m]) - np.asarray(model.U[m])) ** 2) for m in U)
    assert distance[0.0] > 0 and distance[1e4] < 0.5 * distance[0.0], distance
