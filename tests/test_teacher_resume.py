"""The teacher stage resumes a killed run from its last checkpoint and ends where an
uninterrupted run ends (tiny config, 3 steps)."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from gem_jax import train
from gem_jax.checkpoint import StageCheckpoints

from conftest import tiny_config


def teacher_config(subject_dir, steps):
    return tiny_config(**{"data.subject_dir": str(subject_dir), "teacher.steps": steps})


def final_params(workdir, step):
    """The parameters stored at ``step`` (restored without a target: as saved)."""
    ckpt = StageCheckpoints(Path(workdir) / "teacher" / "ckpt")
    try:
        assert ckpt.latest_step() == step
        return ckpt.restore_as_saved(step)["params"]
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def straight(tiny_subject, tmp_path_factory):
    """An uninterrupted 3-step run: its final parameters."""
    workdir = tmp_path_factory.mktemp("straight")
    train.run(teacher_config(tiny_subject, 3), workdir, "teacher")
    return final_params(workdir, 3)


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


class Crash(Exception):
    """Stands in for a process killed right after the step-2 checkpoint."""


def test_a_killed_run_resumes_and_a_non_finite_step_restores_the_last_checkpoint(
        tiny_subject, straight, tmp_path, monkeypatch, capsys):
    """Killed right after the step-2 checkpoint, the same command resumes from step 2; a
    non-finite step on the way (poisoned batch of step 2) is rejected inside the step and, with
    ``max_bad_steps=1``, the last good checkpoint is restored and step 2 redone. The run ends
    exactly where an undisturbed run ends."""
    from gem_jax.teacher import data as tdata

    config = teacher_config(tiny_subject, 3)
    with config.unlocked():
        config.teacher.max_bad_steps = 1
    save = StageCheckpoints.save

    def crash_after_step_2(self, step, state, force=False):
        saved = save(self, step, state, force)
        if step == 2:
            self.wait()
            raise Crash
        return saved

    monkeypatch.setattr(StageCheckpoints, "save", crash_after_step_2)
    with pytest.raises(Crash):
        train.run(config, tmp_path, "teacher")
    monkeypatch.undo()
    ckpt = StageCheckpoints(tmp_path / "teacher" / "ckpt")
    assert ckpt.latest_step() == 2
    ckpt.close()
    assert not (tmp_path / "teacher" / "eval.json").exists()

    sample, poisoned = tdata.sample_batch, []

    def poison_step_2_once(images, meshes, step, batch_size, seed):
        batch = sample(images, meshes, step, batch_size, seed)
        if step == 2 and not poisoned:
            poisoned.append(step)
            batch["vertices"] = np.full_like(batch["vertices"], np.nan)
        return batch

    monkeypatch.setattr(tdata, "sample_batch", poison_step_2_once)
    capsys.readouterr()
    train.run(config, tmp_path, "teacher")  # the same call again
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 2" in out
    assert "step 2: non-finite loss" in out and "restored the last good checkpoint (step 2)" in out
    log = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert [r["step"] for r in log["records"]] == [1, 2, 3]
    assert_same_params(final_params(tmp_path, 3), straight)
    assert json.loads((tmp_path / "teacher" / "eval.json").read_text())["step"] == 3
