"""``python -m gem_jax.train``: config overrides, typos, stage order, skipping finished stages,
``--force``, and an interrupted stage being redone (never marked done)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gem_jax import train

from conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=ROOT):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "gem_jax.train", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_data_stage_with_an_override_and_a_typo(tmp_path):
    ok = _cli("--config", "configs/quickstart.py:tiny", "--workdir", str(tmp_path / "w"), "--stage", "data",
              "--config.synthetic.frames_per_sequence=2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / "w" / "data" / "DONE").exists()
    assert "identity 0, 4 timesteps" in ok.stdout  # the override took: 2 sequences × 2 frames
    typo = _cli("--config", "configs/quickstart.py:tiny", "--workdir", str(tmp_path / "w"), "--stage", "data",
                "--config.synthetic.frames_per_sequense=2")
    assert typo.returncode != 0 and "frames_per_sequense" in typo.stderr
    bad = _cli("--config", "configs/quickstart.py:tiny", "--workdir", str(tmp_path / "w"), "--stage", "bogus")
    assert bad.returncode != 0 and "bogus" in bad.stderr


def test_all_skips_finished_stages_redoes_interrupted_ones_and_force(tmp_path, monkeypatch):
    calls = []

    def stage(name, fail=None):
        def run(ctx, *sections):
            # A forced stage starts from nothing: the entry point removed its folder.
            calls.append((name, not (tmp_path / name / "DONE").exists()))
            if fail is not None and fail():
                raise KeyboardInterrupt(f"{name} interrupted")
        return run

    config = tiny_config()  # checked before any stage; the stages here are stand-ins
    crash = {"on": True}
    fns = {n: stage(n) for n in train.STAGE_NAMES}
    fns["refine"] = stage("refine", fail=lambda: crash["on"])
    monkeypatch.setattr(train, "stage_function", lambda name: fns[name])
    config = tiny_config()
    with pytest.raises(KeyboardInterrupt):
        train.run(config, tmp_path, "all")
    assert [c[0] for c in calls] == ["data", "teacher", "collect", "pca", "refine"]
    assert not (tmp_path / "refine" / "DONE").exists(), "an interrupted stage is not marked done"
    calls.clear()
    crash["on"] = False
    train.run(config, tmp_path, "all")
    assert [c[0] for c in calls] == ["refine", "regress", "eval"], "finished stages are skipped"
    calls.clear()
    train.run(config, tmp_path, "all", force="regress")
    assert calls == [("regress", True), ("eval", True)]
    with pytest.raises(ValueError, match="unknown stage"):
        train.run(config, tmp_path, "nope")
    # The run's context is recorded for code that starts from the work directory alone.
    from gem_jax.context import StageContext

    ctx = StageContext.from_workdir(tmp_path)
    assert ctx.subject_dir == tmp_path / "data" and ctx.synthetic and ctx.seed == config.seed
