"""The config is checked once, before any stage runs: a value out of range, or a batch that does
not split over the devices, is a ConfigError naming the field, expected and found; edge values
that are valid work (one training step, a warm-up longer than the run) pass and train."""

import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import CONFIGS, tiny_config

from gem_jax import train
from gem_jax.config_check import RULES, SHARDED_BATCHES, check_config
from gem_jax.errors import ConfigError
from gem_jax.schedules import warmup_cosine


@pytest.mark.parametrize("name", ["quickstart", "quickstart:tiny", "synthetic"])
def test_the_shipped_configs_pass(name):
    import quickstart
    import synthetic

    module, _, arg = name.partition(":")
    config = {"quickstart": quickstart, "synthetic": synthetic}[module].get_config(arg or None)
    for devices in (1, 2, 4):
        check_config(config, devices)


BAD = {
    # field: (value, words of the expected part)
    "teacher.steps": (0, "integer >= 1"),
    "refine.steps": (-3, "integer >= 1"),
    "regress.steps": (0, "integer >= 1"),
    "teacher.batch_size": (0, "integer >= 1"),
    "refine.batch_size": (-4, "integer >= 1"),
    "teacher.lr": (0.0, "> 0"),
    "regress.lr": (math.nan, "finite number"),
    "teacher.warmup_steps": (-1, "integer >= 0"),
    "teacher.end_lr_factor": (1.5, "<= 1"),
    "teacher.clip_norm": (0.0, "> 0"),
    "teacher.loss.dssim": (-0.1, ">= 0"),
    "teacher.capacity_headroom": (0.5, ">= 1"),
    "collect.batch_size": (0, "integer >= 1"),
    "pca.components.scale": (0, "integer >= 1"),
    "pca.method": ("qr", "one of ['auto', 'svd', 'gram']"),
    "pca.dtype": ("bfloat16", "one of ['float32', 'float16']"),
    "fit.steps": (0, "integer >= 1"),
    "refine.qr_every": (0, "integer >= 1"),
    "regress.features": ("clip", "one of ['vgg', 'landmarks', 'precomputed']"),
    "regress.dropout": (1.2, "<= 1"),
    "render.backend": ("gpu", "one of"),
    "data.background": ((1.0, 1.0), "three numbers in [0, 1]"),
    "data.n_expr": (-1, "integer >= 0"),
    "synthetic.held_out_camera": (4, "below synthetic.num_cameras=4"),
    "teacher.uv_resolution": (17, "multiple of 2^1"),
    "teacher.batch_size#devices": (6, "multiple of the 4 devices"),
    "refine.batch_size#devices": (2, "multiple of the 4 devices"),
    "regress.batch_size#devices": (5, "multiple of the 4 devices"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_value_is_refused_before_any_stage_runs(case, tmp_path):
    field = case.split("#")[0]
    value, expected = BAD[case]
    config = tiny_config(**{field: value})
    workdir = tmp_path / "work"
    with pytest.raises(ConfigError) as info:
        train.run(config, workdir, "data")  # conftest: 4 CPU devices
    message = str(info.value)
    assert f"config field {field}:" in message and expected in message and repr(value) in message, message
    assert not workdir.exists(), "nothing may be written before the config is checked"


def test_a_missing_field_is_named(tmp_path):
    config = tiny_config()
    with config.unlocked():
        del config.refine["qr_every"]
    with pytest.raises(ConfigError, match="config field refine.qr_every: missing"):
        check_config(config, 1)


def test_every_sharded_batch_and_every_steps_field_is_checked():
    assert set(SHARDED_BATCHES) <= set(RULES)
    assert {f"{s}.steps" for s in ("teacher", "refine", "regress", "fit")} <= set(RULES)


def test_the_cli_prints_the_config_error_without_a_traceback(tmp_path):
    import subprocess

    out = subprocess.run([sys.executable, "-m", "gem_jax.train", "--config", f"{CONFIGS}/quickstart.py:tiny",
                          "--workdir", str(tmp_path / "w"), "--stage", "data", "--config.teacher.batch_size=0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "ConfigError: config field teacher.batch_size: expected an integer >= 1, found 0" in out.stderr
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- edge values


@pytest.mark.parametrize("steps, warmup, end", [(1, 0, 0.05), (1, 50, 0.05), (2, 1, 0.1), (7, 7, 0.0),
                                                (1200, 50, 0.05), (30, 0, 0.5)])
def test_warmup_cosine_is_optax_where_optax_works_and_defined_everywhere(steps, warmup, end):
    lr = 2e-3
    schedule = warmup_cosine(lr, steps, warmup, end)
    values = np.array([float(schedule(s)) for s in range(steps + 1)])
    assert np.all(np.isfinite(values)) and values.max() <= lr * (1 + 1e-6)
    np.testing.assert_allclose(values[-1], lr * end, rtol=1e-5, atol=1e-12)  # decayed at `steps`
    cut = min(warmup, steps - 1)
    if cut >= 1:
        reference = optax.warmup_cosine_decay_schedule(0.0, lr, cut, steps, lr * end)
        np.testing.assert_allclose(values, [float(reference(s)) for s in range(steps + 1)], rtol=1e-6, atol=1e-12)
        assert values[0] == 0.0
    else:
        assert values[0] == pytest.approx(lr)  # one step (or no warm-up) trains at lr, not at 0


@pytest.mark.parametrize("stage", ["teacher", "regress"])
def test_one_training_step_builds_and_applies_the_optimizer(stage):
    """``teacher.steps=1`` (and the regressor's) used to die in optax's schedule."""
    from gem_jax.regress.train import make_optimizer as regress_optimizer
    from gem_jax.teacher.train import make_optimizer as teacher_optimizer

    config = tiny_config(**{f"{stage}.steps": 1, f"{stage}.warmup_steps": 10})
    check_config(config, 4)
    optimizer = (teacher_optimizer if stage == "teacher" else regress_optimizer)(config[stage])
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)}
    state = optimizer.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    assert np.all(np.isfinite(np.asarray(new["w"]))) and not np.allclose(new["w"], params["w"])
