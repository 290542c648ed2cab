"""kill -9 at a random point of every stage, then ``--stage all``: it finishes, and what the stage
wrote — its figures (``eval.json``, the ``eval`` stage's table) and its artefacts (images, data
matrices, models, trained parameters) — equals the uninterrupted run's bit for bit.

The uninterrupted run is the session's ``completed_workdir`` (the tiny config, one process with the
four CPU devices of ``conftest.py``). Each test copies it without the stage under test and without
``eval``, starts ``python -m gem_jax.train --stage all`` (which skips the copied, finished stages),
sends SIGKILL to the whole process group at a time drawn from a seeded RNG within the stage's
observed duration (the first half of it: the baseline compiled cold, later runs hit the session's
compilation cache), then runs the same command again. If the stage happened to finish before the
kill time, the attempt is repeated with a shorter draw (the stage's duration is known by then).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import CONFIGS, STAGE_SECONDS, tiny_context

KILLED = ("data", "teacher", "collect", "pca", "refine", "regress")
COMMAND = [sys.executable, "-m", "gem_jax.train", "--config", f"{CONFIGS}/quickstart.py:tiny", "--stage", "all"]
VOLATILE = ("time", "steps_per_s", "fit_seconds")  # wall-clock values in the JSON files


def start(workdir, log):
    proc = subprocess.Popen([*COMMAND, "--workdir", str(workdir)], stdout=subprocess.PIPE, stderr=log, text=True,
                            start_new_session=True)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append((time.monotonic(), line))

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def when(lines, text, proc, timeout=900):
    """The time the line containing ``text`` was printed (waiting for it), or None if the process ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for t, line in list(lines):
            if text in line:
                return t
        if proc.poll() is not None:
            time.sleep(0.2)  # let the reader drain the pipe
            return next((t for t, line in list(lines) if text in line), None)
        time.sleep(0.02)
    raise TimeoutError(text)


def kill_during(stage, workdir, rng, log):
    """Run ``--stage all`` and SIGKILL it inside ``stage``; returns (seconds into the stage, attempts)."""
    budget = STAGE_SECONDS.get(stage, 30.0)
    for attempt in range(1, 4):
        delay = float(rng.uniform(0.0, 0.5 * budget))  # the baseline compiled cold; reruns hit the cache
        proc, lines = start(workdir, log)
        began = when(lines, f"stage {stage}: starting", proc)
        assert began is not None, f"stage {stage} did not start"
        while time.monotonic() < began + delay and proc.poll() is None:
            time.sleep(0.01)
        ended = next((t for t, line in list(lines) if f"stage {stage}: done" in line), None)
        if proc.poll() is None and ended is None:
            os.killpg(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
            return delay, attempt
        proc.wait(timeout=900)
        ended = when(lines, f"stage {stage}: done", proc)
        budget = (ended or time.monotonic()) - began  # the stage was quicker than drawn: draw within it
        for name in (stage, "eval"):  # start over from the same state
            shutil.rmtree(workdir / name, ignore_errors=True)
    raise AssertionError(f"stage {stage} always finished before the kill")


def _strip(value):
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def _content(path):
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.suffix == ".json":
        return _strip(json.loads(path.read_text()))
    return path.read_bytes()  # images and text: the encoders are deterministic


def _equal(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return a == b


def outputs(workdir, stage):
    """Relative path → file of everything the stage (and the eval stage) wrote, checkpoints aside."""
    folders = [stage, "eval"] + (["data_cross"] if stage == "data" else [])
    skip = ("ckpt", "tb")
    out = {}
    for folder in folders:
        for path in (workdir / folder).rglob("*"):
            rel = path.relative_to(workdir)
            if path.is_file() and path.name != "DONE" and not set(rel.parts) & set(skip):
                out[str(rel)] = path
    return out


def trained(workdir, stage, config):
    """The stage's final trained state, restored from its last checkpoint (None for the others)."""
    import jax

    if stage == "teacher":
        from gem_jax.teacher.collect import load_trained_teacher

        return jax.device_get(load_trained_teacher(tiny_context(workdir, config), config.teacher).params)
    if stage == "refine":
        from gem_jax.checkpoint import StageCheckpoints
        from gem_jax.eigen import refine
        from gem_jax.eigen.workdir import load_model

        model = load_model(workdir, "pca")
        target = jax.eval_shape(lambda: refine.init_state(model, refine.make_optimizer(config.refine)))
        manager = StageCheckpoints(workdir / "refine" / "ckpt")
        try:
            return jax.device_get(manager.restore(target))
        finally:
            manager.close()
    return None  # regress: its parameters are regress/regressor.npz, compared with the outputs


@pytest.mark.parametrize("stage", KILLED)
def test_kill_9_anywhere_in_a_stage_then_stage_all_gives_the_same_results(stage, completed_workdir, tmp_path):
    import jax

    config, baseline = completed_workdir
    work = tmp_path / "w"
    shutil.copytree(baseline, work, ignore=shutil.ignore_patterns(stage, "eval", "*.lock",
                                                                  *(["data_cross"] if stage == "data" else [])))
    rng = np.random.default_rng([17, KILLED.index(stage)])
    with open(tmp_path / "stderr.log", "w") as log:
        delay, attempts = kill_during(stage, work, rng, log)
        assert not (work / stage / "DONE").exists()
        again = subprocess.run([*COMMAND, "--workdir", str(work)], stdout=subprocess.PIPE, stderr=log, text=True,
                               timeout=900)
    assert again.returncode == 0, (tmp_path / "stderr.log").read_text()[-3000:]
    resumed = next((line for line in again.stdout.splitlines() if "resumed from" in line), "started afresh")
    print(f"{stage}: killed {delay:.2f}s into the stage (attempt {attempts}); the rerun {resumed.strip()}")
    ours, theirs = outputs(work, stage), outputs(baseline, stage)
    assert sorted(ours) == sorted(theirs), "the same files, no leftover temporaries"
    different = [rel for rel in theirs if not _equal(_content(ours[rel]), _content(theirs[rel]))]
    assert not different, f"differ from the uninterrupted run: {different}"
    assert not [p for p in work.glob(".*") if p.name.startswith((".data", ".data_cross"))], "stale temporaries"
    a, b = trained(work, stage, config), trained(baseline, stage, config)
    if a is not None:
        assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
