"""Data parallelism over a 1-D device mesh ``('data',)`` (docs/architecture.md §3).

The recipe every training stage uses (teacher, refinement, regressor):

* :func:`data_mesh` — all devices (of every host) on one axis ``'data'``;
* :func:`replicate` / :func:`shard_batch` — parameters replicated, batches split along their
  leading axis; :func:`shard_batch` builds the global array from each process's local rows, so
  it is the same call on one host and on many (``jax.distributed.initialize()`` first);
* :func:`data_parallel` — wraps a per-shard ``grad_fn(params, batch) -> (grads, metrics)`` in
  ``jax.shard_map``: each device sees its slice of the batch, gradients and metrics are
  averaged with ``lax.pmean`` over ``'data'``, and the result is replicated.

Gradients of replicated inputs inside ``shard_map`` are *summed* over devices by JAX's
transpose rules (an invariant input is implicitly broadcast to every device); to average
instead, :func:`data_parallel` first marks the parameters device-varying
(``lax.pcast(…, to='varying')``), so each device differentiates only its own loss, then takes
the ``pmean``. With equal shards, the mean over devices of per-shard mean losses is the mean
over the global batch, so a sharded step equals the single-device step on the same batch
(tested in ``tests/test_parallel.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["AXIS", "data_mesh", "data_parallel", "global_batch_size", "local_rows", "replicate", "shard_batch"]

AXIS = "data"


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named ``'data'`` over ``devices`` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh: no devices")
    return Mesh(np.array(devices), (AXIS,))


def global_batch_size(batch_size: int, mesh: Mesh) -> int:
    """Check that ``batch_size`` splits evenly over the mesh; return it."""
    n = mesh.shape[AXIS]
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the 'data' mesh; "
                         f"use a multiple of {n}")
    return batch_size


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place every leaf of ``tree`` on every device of ``mesh`` (fully replicated)."""
    sharding = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)


def local_rows(global_size: int) -> slice:
    """The rows of a global batch of ``global_size`` that this process feeds (contiguous, by
    process index; all of them on a single host)."""
    n, i = jax.process_count(), jax.process_index()
    if global_size % n:
        raise ValueError(f"global batch {global_size} is not divisible by the {n} processes")
    per = global_size // n
    return slice(i * per, (i + 1) * per)


def shard_batch(batch: Any, mesh: Mesh, local: bool = False) -> Any:
    """Split the leading axis of every leaf over ``'data'``.

    ``batch`` holds the *global* batch (every process computes the same one, e.g. from
    ``(seed, step)``) unless ``local=True``, in which case it holds this process's rows only.
    """
    sharding = NamedSharding(mesh, P(AXIS))

    def put(x):
        x = np.asarray(x)
        if not local and jax.process_count() > 1:
            x = x[local_rows(x.shape[0])]
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, batch)


def data_parallel(grad_fn: Callable[..., tuple[Any, Any]], mesh: Mesh, check_vma: bool = False
                  ) -> Callable[..., tuple[Any, Any]]:
    """``(params, batch, *replicated) -> (mean grads, mean metrics)`` over ``'data'`` of ``mesh``.

    ``grad_fn(params, local_batch, *replicated) -> (grads, metrics)`` runs per device on its
    shard; ``replicated`` are further inputs every device sees whole (constants, the step).
    The returned function is traceable (call it inside the jitted train step). Outputs are
    replicated; metrics must be floating point (they are averaged).

    ``check_vma=False`` (the default) turns off shard_map's tracking of device-varying types:
    ``jax.custom_vjp`` rules that do not propagate it — the FFI rasterizer kernels' backward
    among them — are rejected under ``check_vma=True``. The averaging is the same either way
    (the ``pcast`` below makes it explicit where the tracking is on).
    """

    def local(params, batch, *replicated):
        params = jax.tree.map(lambda x: jax.lax.pcast(x, AXIS, to="varying"), params)
        grads, metrics = grad_fn(params, batch, *replicated)
        return jax.lax.pmean((grads, metrics), AXIS)

    def run(params, batch, *replicated):
        specs = (P(), P(AXIS)) + (P(),) * len(replicated)
        return jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P()),
                             check_vma=check_vma)(params, batch, *replicated)

    return run
