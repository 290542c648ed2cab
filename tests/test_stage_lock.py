"""One writer per stage: while a process runs a stage, a second one is refused at once, naming
the lock file and the holder's pid; the lock of a process killed with SIGKILL never blocks (the
kernel releases a flock with its process); the ranks of one multi-host job do not contend."""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import CONFIGS

from gem_jax.stage_lock import StageLockedError, lock_path, stage_lock

HOLD = """
import sys, time
from gem_jax.stage_lock import stage_lock
with stage_lock(sys.argv[1], sys.argv[2], int(sys.argv[3])):
    print("held", flush=True)
    time.sleep(120)
"""


def hold_in_child(workdir, stage, rank=0):
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(workdir), stage, str(rank)], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_second_writer_is_refused_naming_the_lock_and_the_holder(tmp_path):
    with stage_lock(tmp_path, "teacher") as path:
        assert path == tmp_path / "teacher.lock"
        start = time.time()
        with pytest.raises(StageLockedError) as info:
            with stage_lock(tmp_path, "teacher"):
                pass
        assert time.time() - start < 1.0, "refused at once, not after waiting"
        message = str(info.value)
        assert str(path) in message and f"pid {os.getpid()}" in message
        with stage_lock(tmp_path, "refine"):  # another stage is another lock
            pass
    with stage_lock(tmp_path, "teacher"):  # released at the end of the block
        pass


def test_ranks_of_one_job_do_not_contend_and_two_jobs_do(tmp_path):
    with stage_lock(tmp_path, "teacher", 0), stage_lock(tmp_path, "teacher", 1):
        assert lock_path(tmp_path, "teacher", 1) == tmp_path / "teacher.process1.lock"
        for rank in (0, 1):  # a second job, rank by rank
            with pytest.raises(StageLockedError, match=f"process index {rank}"):
                with stage_lock(tmp_path, "teacher", rank):
                    pass


def test_the_lock_of_a_killed_process_never_blocks(tmp_path):
    child = hold_in_child(tmp_path, "collect")
    with pytest.raises(StageLockedError, match=f"pid {child.pid} "):
        with stage_lock(tmp_path, "collect"):
            pass
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert lock_path(tmp_path, "collect").exists()  # the file stays; the lock went with the process
    with stage_lock(tmp_path, "collect"):
        pass


def test_two_trainers_on_one_workdir_the_second_refuses_at_once(distilled_workdir, tmp_path):
    _, source = distilled_workdir
    for name in ("data", "data_cross"):
        shutil.copytree(source / name, tmp_path / name)
    command = [sys.executable, "-m", "gem_jax.train", "--config", f"{CONFIGS}/quickstart.py:tiny",
               "--workdir", str(tmp_path), "--stage", "teacher"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in first.stdout:
            if "stage teacher: starting" in line:
                break
        second = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"StageLockedError: {tmp_path / 'teacher.lock'}" in second.stderr
        assert f"pid {first.pid} " in second.stderr and "Traceback" not in second.stderr
        assert first.poll() is None, "the first trainer is undisturbed"
    finally:
        first.kill()
        first.wait(timeout=30)
    with stage_lock(tmp_path, "teacher"):  # killed: its lock is gone
        pass
