"""Multi-host on one machine: two processes on 127.0.0.1 joined by ``--multihost`` (explicit
coordinator, process count and id; CPU collectives through gloo), each with two virtual CPU
devices, are the four devices of the single-process run of ``conftest.py`` (same global batch).
They train the tiny teacher and refinement to the same parameters (float tolerance: the
cross-process mean sums in another order), orbax writes one checkpoint jointly, and after one
process is killed with SIGKILL, restarting both resumes from the last checkpoint.

This is the path a cluster takes (SLURM, Open MPI, Kubernetes: README "Several devices and hosts"),
here with every process on one machine."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from conftest import CONFIGS, tiny_context

SMALL_EVAL = ["--config.eval.max_images=1", "--config.eval.num_renders=0",
              "--config.eval.train_images=1"]  # evaluation only: the parameters do not depend on it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workdir, stage, port):
    """Both processes of the job, each with two CPU devices; stdout+stderr in <workdir>/rank<i>.log."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = []
    for rank in range(2):
        log = open(workdir / f"rank{rank}.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "gem_jax.train", "--config", f"{CONFIGS}/quickstart.py:tiny", "--workdir",
             str(workdir), "--stage", stage, "--multihost", "--coordinator", f"127.0.0.1:{port}",
             "--num_processes", "2", "--process_id", str(rank), "--heartbeat_timeout", "10", *SMALL_EVAL],
            stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs


def finish(procs, workdir, timeout=900):
    for rank, p in enumerate(procs):
        assert p.wait(timeout=timeout) == 0, (workdir / f"rank{rank}.log").read_text()[-3000:]


def copy_stages(source, target, names):
    for name in names:
        shutil.copytree(source / name, target / name, ignore=shutil.ignore_patterns("*.lock"))


def assert_close_trees(a, b, atol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol)


def test_two_processes_train_the_teacher_as_one(completed_workdir, tmp_path):
    from gem_jax.teacher.collect import load_trained_teacher

    config, baseline = completed_workdir
    copy_stages(baseline, tmp_path, ("data", "data_cross"))
    finish(launch(tmp_path, "teacher", free_port()), tmp_path)
    # One checkpoint folder written jointly (no per-process copies, no leftover temporary folders),
    # and each process held the lock of its own rank.
    assert sorted(p.name for p in (tmp_path / "teacher" / "ckpt").iterdir()) == ["1", "2"]
    assert (tmp_path / "teacher.lock").is_file() and (tmp_path / "teacher.process1.lock").is_file()
    assert (tmp_path / "teacher" / "DONE").is_file()
    ours = load_trained_teacher(tiny_context(tmp_path, config), config.teacher)
    theirs = load_trained_teacher(tiny_context(baseline, config), config.teacher)
    assert_close_trees(ours.params, theirs.params, atol=1e-6)  # |params| ~ 1; seen: 5e-10


def test_a_killed_process_and_a_restart_of_both_resume_the_refinement(completed_workdir, tmp_path):
    from gem_jax.checkpoint import StageCheckpoints
    from gem_jax.eigen import refine
    from gem_jax.eigen.workdir import load_model

    config, baseline = completed_workdir
    copy_stages(baseline, tmp_path, ("data", "data_cross", "collect", "pca"))
    ckpt = tmp_path / "refine" / "ckpt"
    procs = launch(tmp_path, "refine", free_port())
    deadline = time.time() + 600
    while not (ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())):  # a committed checkpoint
        assert time.time() < deadline and procs[1].poll() is None, (tmp_path / "rank1.log").read_text()[-3000:]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    assert procs[1].wait(timeout=60) == -signal.SIGKILL
    try:  # the survivor stops on its own (lost peer or heartbeat), as a cluster job would
        assert procs[0].wait(timeout=120) != 0
    finally:
        procs[0].kill()
    assert not (tmp_path / "refine" / "DONE").exists()
    finish(launch(tmp_path, "refine", free_port()), tmp_path)
    assert "resumed from" in (tmp_path / "rank0.log").read_text()
    # The resumed two-process refinement ends where the uninterrupted single-process one did.
    model = load_model(baseline, "pca")
    optimizer = refine.make_optimizer(config.refine)
    target = jax.eval_shape(lambda: refine.init_state(model, optimizer))
    states = []
    for workdir in (tmp_path, baseline):
        manager = StageCheckpoints(workdir / "refine" / "ckpt")
        states.append(manager.restore(target))
        manager.close()
    assert int(states[0]["step"]) == int(states[1]["step"]) == int(config.refine.steps)
    assert_close_trees(states[0]["U"], states[1]["U"], atol=1e-6)  # unit rows, entries ~ 0.05
    assert_close_trees(load_model(tmp_path, "refine").U, load_model(baseline, "refine").U, atol=1e-6)
