"""Joining a multi-process JAX job: one process per host, or several on one machine (docs/architecture.md §3).

``python -m gem_jax.train ... --multihost`` calls :func:`initialize` before anything touches a
device. Every process then sees every device of the job (``jax.devices()``), the training
stages split each global batch over all of them (:mod:`gem_jax.parallel`), orbax writes each
checkpoint jointly, and process 0 alone writes logs, evaluations and stage markers.

Where the coordinator, the process count and this process's id come from, in order:

1. the flags ``--coordinator host:port --num_processes N --process_id i``;
2. the environment ``JAX_COORDINATOR_ADDRESS`` (read by JAX itself), ``JAX_NUM_PROCESSES`` and
   ``JAX_PROCESS_ID`` (read here);
3. JAX's cluster detection for whatever is still unset: SLURM (``srun``), Open MPI
   (``mpirun``), Kubernetes (needs ``pip install "jax[k8s]"`` and a service account allowed
   to read pods) and Cloud TPU.

Collectives between CPU processes go through gloo (``jax_cpu_collectives_implementation``),
which is what lets ``tests/test_multihost.py`` run a real two-process job on 127.0.0.1 with
two virtual CPU devices each. If one process dies, JAX's coordination service stops the
others after ``heartbeat_timeout`` seconds (JAX's default: 100); rerunning the same command on
every host resumes every stage from its last checkpoint.
"""

from __future__ import annotations

import os

__all__ = ["barrier", "initialize"]


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               heartbeat_timeout: int | None = None) -> None:
    """``jax.distributed.initialize`` with the arguments resolved as in the module docstring."""
    import jax

    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"coordinator_address": coordinator, "num_processes": num_processes, "process_id": process_id}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if heartbeat_timeout is not None:
        kwargs["heartbeat_timeout_seconds"] = int(heartbeat_timeout)
    jax.distributed.initialize(**kwargs)


def barrier(name: str) -> None:
    """Wait until every process of the job reaches ``name`` (a no-op in a single process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
