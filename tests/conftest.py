"""Shared pytest setup: CPU only, several fake host devices for sharding tests, one tiny
distilled work directory (data → teacher → collect → pca on ``configs/quickstart.py:tiny``)
that the GEM tests share, and the same run carried through refine, regress and eval."""

import atexit
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache per session, shared with the processes the tests start
# (CLI, kill/resume, multi-host): a program is compiled once, not once per process.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _XLA_CACHE = tempfile.mkdtemp(prefix="gem_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
    atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
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
        start = time.time()
        train.run(config, workdir, stage)
        STAGE_SECONDS[stage] = time.time() - start
    return config, workdir


#: Wall time of each stage in the shared runs above (the kill tests draw their kill times from it).
STAGE_SECONDS: dict[str, float] = {}


@pytest.fixture(scope="session")
def completed_workdir(distilled_workdir, tmp_path_factory):
    """``(config, workdir)``: a copy of the distilled run carried through refine, regress and eval,
    i.e. one uninterrupted ``--stage all`` of the tiny config. Tests copy what they change."""
    from gem_jax import train

    config, distilled = distilled_workdir
    workdir = tmp_path_factory.mktemp("completed")
    for item in distilled.iterdir():
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, workdir / item.name)
    for stage in ("refine", "regress", "eval"):
        start = time.time()
        train.run(config, workdir, stage)
        STAGE_SECONDS[stage] = time.time() - start
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

