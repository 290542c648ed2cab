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


@pytest.fixture(scope="session")
def distilled_workdir(tmp_path_factory):
    """``(config, workdir)`` after the tiny data, teacher, collect and pca stages."""
    from gem_jax import train

    workdir = tmp_path_factory.mktemp("distilled")
    config = tiny_config()
    for stage in ("data", "teacher", "collect", "pca"):
        train.run(config, workdir, stage)
    return config, workdir


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (pyproject) are skipped unless jax has a GPU backend. conftest
    makes JAX_PLATFORMS default to cpu: on a GPU machine run them with JAX_PLATFORMS=cuda,cpu
    (benchmarks/gpu_check.sh does)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import jax

    try:
        reason = None if jax.devices("gpu") else "jax has no GPU devices"
    except RuntimeError as err:
        reason = f"no GPU backend in jax ({str(err).splitlines()[0]})"
    if reason is not None:
        skip = pytest.mark.skip(reason=f"needs a CUDA GPU: {reason}; on a GPU machine set JAX_PLATFORMS=cuda,cpu")
        for item in gpu_items:
            item.add_marker(skip)

