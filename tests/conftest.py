"""Shared pytest setup: CPU only, several fake host devices for sharding tests, and one tiny
distilled work directory (data → teacher → collect → pca on ``configs/quickstart.py:tiny``)
that the GEM tests share."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=4").strip()

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
if str(CONFIGS) not in sys.path:
    sys.path.insert(0, str(CONFIGS))


def tiny_config(**overrides):
    """``configs/quickstart.py:tiny``, unlocked copy with dotted-key ``overrides``."""
    import quickstart

    config = quickstart.get_config("tiny")
    with config.unlocked():
        for key, value in overrides.items():
            node = config
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return config


def tiny_context(workdir, config=None, mesh=None):
    """The stage context of a run of ``config`` (default: the tiny config) in ``workdir``."""
    from gem_jax.context import StageContext

    return StageContext.from_config(tiny_config() if config is None else config, workdir, mesh=mesh)


@pytest.fixture(scope="session")
def tiny_subject(tmp_path_factory):
    """The tiny synthetic subject folder, written once per session (point
    ``data.subject_dir`` at it)."""
    from gem_jax import train

    workdir = tmp_path_factory.mktemp("tiny_data")
    train.run(tiny_config(), workdir, "data")
    return workdir / "data"


@pytest.fixture(scope="session")
def distilled_workdir(tmp_path_factory):
    """``(config, workdir)`` after the tiny data, teacher, collect and pca stages."""
    from gem_jax import train

    workdir = tmp_path_factory.mktemp("distilled")
    config = tiny_config()
    for stage in ("data", "teacher", "collect", "pca"):
        train.run(config, workdir, stage)
    return config, workdir
