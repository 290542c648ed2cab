"""One writer per stage: an OS file lock held while a stage runs (docs/architecture.md §1, §10).

Two ``python -m gem_jax.train`` processes running the same stage on one work directory would
race on its checkpoints and outputs (both "succeed" with a mix of files, or one dies on an
orbax temporary folder the other removed). :func:`stage_lock` takes an exclusive
``fcntl.flock`` on ``<workdir>/<stage>.lock`` for the duration of the stage; a second process
is refused at once with a :class:`StageLockedError` that names the lock file and the holder's
pid and host.

* **Stale locks cannot block.** ``flock`` belongs to the open file, and the kernel releases it
  when the process dies, however it dies (``kill -9`` included); the file itself stays and
  only records who held it last. Nothing is ever "cleaned up" by hand.
* **Beside the stage folder, not inside it.** ``--force`` deletes a stage's folder and the
  ``data`` stage replaces its folder by a rename; a lock file inside would vanish while held and
  let a second writer in. ``<workdir>/<stage>.lock`` survives both.
* **Multi-host.** Every process of a ``--multihost`` job writes: orbax writes each process's
  shards and runs its commit protocol on every process. So each process locks the file of its
  own rank: process 0 ``<stage>.lock``, process ``i > 0`` ``<stage>.process<i>.lock``. A
  second job on the same directory is refused on every rank it shares with the first (its
  rank 0 always), and a single-process run conflicts with rank 0 of a job, as it should;
  the processes of one job never contend. On several machines the work directory is a shared
  file system: Linux NFS (v3 with lockd, v4) implements ``flock`` as a byte-range lock that
  every client sees; on file systems mounted without lock support (e.g. Lustre without
  ``-o flock``) ``flock`` fails and the error says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["StageLockedError", "lock_path", "stage_lock"]


class StageLockedError(RuntimeError):
    """Another live process is running this stage on this work directory."""


def lock_path(workdir: str | os.PathLike, stage: str, process_index: int = 0) -> Path:
    """``<workdir>/<stage>.lock`` (process 0) or ``<workdir>/<stage>.process<i>.lock``."""
    name = f"{stage}.lock" if process_index == 0 else f"{stage}.process{process_index}.lock"
    return Path(workdir) / name


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode("utf-8", "replace").strip()
    return text or "a process that has not written its id yet"


@contextlib.contextmanager
def stage_lock(workdir: str | os.PathLike, stage: str, process_index: int = 0) -> Iterator[Path]:
    """Hold the stage's lock for the ``with`` block; raise :class:`StageLockedError` at once if
    another process holds it (module docstring). Yields the lock file's path."""
    path = lock_path(workdir, stage, process_index)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StageLockedError(
                    f"{path}: stage {stage!r} of {Path(workdir)} is being run by another process "
                    f"({_holder(fd)}); wait for it to finish or stop it. (A lock of a process that "
                    "died is released by the kernel: this one is alive.)") from None
            raise OSError(err.errno, f"{path}: cannot take a file lock here ({err.strerror}); the work "
                                     "directory's file system must support flock") from err
        os.ftruncate(fd, 0)
        os.pwrite(fd, (f"pid {os.getpid()} on {socket.gethostname()}, process index {process_index}, "
                       f"since {time.strftime('%Y-%m-%dT%H:%M:%S')}\n").encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the last descriptor releases the flock
