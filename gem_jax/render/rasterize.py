"""``rasterize``: the public Gaussian rasterizer (docs/architecture.md §9).

One call runs the three layers — EWA projection (``project.py``), tile intersections with a
static capacity (``tiles.py``) and front-to-back blending by a *backend*:

* ``"reference"`` — :func:`gem_jax.render.reference.blend_tiles`, pure JAX (always there; the
  CPU fallback; any float dtype);
* ``"dense"`` — :func:`gem_jax.render.reference.blend_dense` restricted to the same tiles, the
  autodiff oracle (memory O(N·H·W): tiny scenes only; ignores ``capacity``);
* ``"cpu"`` — the whole frame (projection, tile lists, blending and their backward) in one C++
  pass per direction (:mod:`gem_jax.render.cpu_frame`, float32);
* ``"cuda"`` — the compiled kernel of ``gem_jax.render._ffi`` (float32; it also needs a GPU
  backend in jax);
* ``"cuda-emulated"`` — the CUDA kernel's source run on the CPU by a SIMT emulator: a slow
  **test backend** for correctness without a GPU, never picked by ``"auto"``;
* the compiled backends are looked up lazily; asking for one that is not built raises
  :class:`BackendUnavailableError` saying how to build it;
* ``"auto"`` — ``"cuda"`` on a GPU or ``"cpu"`` on a CPU when that kernel is built and the inputs
  are float32, else ``"reference"``.

**Capacity** (the static length of the intersection buffer). With ``capacity=None`` and
concrete inputs (eager calls, including eager ``jax.grad``), the exact number of intersections
is computed first and rounded up (:func:`round_capacity`, ≤ 12.5 % headroom, few distinct
sizes so few recompilations), so nothing can overflow. Under ``jit``/``vmap`` the count is
unknown at trace time, so ``capacity`` is required (size it eagerly with
:func:`count_intersections`, plus headroom). With an explicit capacity an overflow raises
:class:`CapacityOverflowError` on concrete inputs; under tracing it is reported in
``stats["overflow"]`` and a warning is emitted from the running computation — never silent.

A batched :class:`~gem_jax.types.Camera` (``viewmat (B,4,4)``, ``K (B,3,3)``) renders every
camera with ``jax.vmap`` in one call (outputs gain a leading ``B``); ``background`` is ``(3,)``
or ``(B, 3)``. ``jax.vmap(rasterize…)`` over cameras works as well, with ``capacity`` given.
"""

from __future__ import annotations

import functools
import importlib
import math
import warnings
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gem_jax.render import reference
from gem_jax.render.project import project_gaussians
from gem_jax.render.tiles import tile_counts, tile_intersections
from gem_jax.types import Camera, Gaussians

__all__ = [
    "BLEND_BACKENDS",
    "BackendUnavailableError",
    "CapacityOverflowError",
    "RenderOutput",
    "available_backends",
    "count_intersections",
    "rasterize",
    "round_capacity",
]


class BackendUnavailableError(RuntimeError):
    """A blending backend was asked for that is not built (or cannot be loaded)."""


class CapacityOverflowError(ValueError):
    """More (tile, Gaussian) intersections than the static ``capacity``."""


@flax.struct.dataclass
class RenderOutput:
    """``image (…,H,W,3)``, ``alpha (…,H,W)``, ``depth (…,H,W)`` (α-weighted, not normalised) and
    ``stats``: ``num_intersections``, ``overflow``, ``num_visible`` (int32, one per camera)."""

    image: Float[Array, "*batch H W 3"]
    alpha: Float[Array, "*batch H W"]
    depth: Float[Array, "*batch H W"]
    stats: dict


# --- backends -------------------------------------------------------------------------------


def _ffi_module():
    """``gem_jax.render._ffi`` or the reason it cannot be imported."""
    try:
        return importlib.import_module("gem_jax.render._ffi"), None
    except Exception as err:  # noqa: BLE001 — any failure to load means "not built"
        return None, f"gem_jax.render._ffi could not be imported ({type(err).__name__}: {err})"


def _kernel_loader(kind: str) -> Callable[[], Callable]:
    def load():
        ffi, problem = _ffi_module()
        name = kind.replace("-", "_")
        fn = getattr(ffi, f"blend_tiles_{name}", None) if ffi is not None else None
        if kind == "cpu" and ffi is not None:  # the whole frame in C++ (cpu_frame.py)
            fn = importlib.import_module("gem_jax.render.cpu_frame").render_cpu
        if ffi is not None and getattr(ffi, f"HAS_{name.upper()}_KERNEL", False) and fn is not None:
            return fn
        if ffi is not None and hasattr(ffi, "build_instructions"):
            message = ffi.build_instructions(kind)
        else:
            needs = "nvcc (the CUDA toolkit) and a C++ compiler" if kind == "cuda" else "a C++ compiler"
            message = (
                f"The {kind!r} blending kernel is not available ({problem or 'not built'}). It is "
                f"compiled by `pip install .` in the gem_jax checkout, which needs {needs}. "
                "Or use backend='reference' (pure JAX)."
            )
        raise BackendUnavailableError(message)

    return load


#: name -> loader returning the blend function (``reference.blend_tiles``'s signature) or raising
#: :class:`BackendUnavailableError`. ``"dense"`` is special-cased (it takes radii, not lists), and
#: ``"cpu"`` renders the whole frame (``cpu_frame.render_cpu``: projection, lists and blending).
BLEND_BACKENDS: dict[str, Callable[[], Callable]] = {
    "reference": lambda: reference.blend_tiles,
    "dense": lambda: reference.blend_dense,
    "cpu": _kernel_loader("cpu"),
    "cuda": _kernel_loader("cuda"),
    "cuda-emulated": _kernel_loader("cuda-emulated"),
}


def available_backends() -> list[str]:
    """Backends that can run now, fastest first (e.g. ``["cpu", "reference", "dense"]``; the
    ``"cuda-emulated"`` test backend, when built, last)."""
    names = []
    for name in ("cuda", "cpu", "reference", "dense", "cuda-emulated"):
        try:
            BLEND_BACKENDS[name]()
        except BackendUnavailableError:
            continue
        names.append(name)
    return names


def _resolve_backend(backend: str, dtype) -> str:
    if backend != "auto":
        if backend not in BLEND_BACKENDS:
            raise ValueError(f"rasterize: backend must be 'auto' or one of {sorted(BLEND_BACKENDS)}, got {backend!r}")
        BLEND_BACKENDS[backend]()  # raises with build instructions when missing
        return backend
    if jnp.dtype(dtype) != jnp.float32:
        return "reference"  # the kernels are float32 only
    kernel = "cuda" if jax.default_backend() == "gpu" else "cpu"
    try:
        BLEND_BACKENDS[kernel]()
        return kernel
    except BackendUnavailableError:
        return "reference"


# --- capacity -------------------------------------------------------------------------------


def round_capacity(count: int) -> int:
    """``count`` rounded up to 8 sizes per octave (≥ 256): few distinct static shapes."""
    count = max(int(count), 256)
    step = 1 << max(count.bit_length() - 4, 0)
    return -(-count // step) * step


def _count(gaussians: Gaussians, camera: Camera, backend: str) -> Array:
    def one(cam):
        if backend == "cpu":  # the C++ pass's own projection: its count is exact for it
            return importlib.import_module("gem_jax.render.cpu_frame").count_cpu(gaussians, cam)
        p = project_gaussians(gaussians, cam)
        return jnp.sum(tile_counts(p.means2d, p.radii, cam.width, cam.height))

    if np.ndim(camera.viewmat) == 3:
        return jnp.max(jax.vmap(one)(camera))
    return one(camera)


_count_jit = jax.jit(_count, static_argnames="backend")


def count_intersections(gaussians: Gaussians, camera: Camera, *, backend: str = "auto") -> int:
    """Exact number of (tile, Gaussian) intersections (the most over a batch of cameras) of
    ``backend`` (resolved as in :func:`rasterize`; the C++ pass projects on its own).

    Eager only; use it to size ``capacity`` for a jitted ``rasterize``.
    """
    gaussians, camera = jax.lax.stop_gradient(gaussians), jax.lax.stop_gradient(camera)
    backend = _resolve_backend(backend, jnp.result_type(gaussians.means, gaussians.colors, camera.viewmat))
    return int(_count_jit(gaussians, camera, backend="cpu" if backend == "cpu" else "reference"))


def _concrete_int(x) -> int | None:
    try:
        return int(x)
    except jax.errors.JAXTypeError:
        return None


def _warn_overflow(overflow, capacity):
    overflow = int(np.max(overflow))
    if overflow > 0:
        warnings.warn(
            f"rasterize: {overflow} tile intersections beyond capacity={capacity} were dropped; "
            "the rendered image is incomplete. Raise `capacity`.",
            RuntimeWarning,
            stacklevel=2,
        )


# --- rendering ------------------------------------------------------------------------------


def _render_one(gaussians, camera, background, backend, capacity):
    if backend == "cpu":
        frame = BLEND_BACKENDS["cpu"]()(gaussians, camera, background, capacity)
        stats = {"num_intersections": frame.lists.num_intersections, "overflow": frame.lists.overflow,
                 "num_visible": frame.num_visible}  # fmt: skip
        return RenderOutput(image=frame.image, alpha=frame.alpha, depth=frame.depth, stats=stats)
    width, height = int(camera.width), int(camera.height)
    p = project_gaussians(gaussians, camera)
    num_visible = jnp.sum(p.radii > 0).astype(jnp.int32)
    floats = (p.means2d, p.conics, p.colors, p.opacities, p.depths, background)
    if backend == "dense":
        image, alpha, depth = reference.blend_dense(*floats, width, height, radii=p.radii)
        total = jnp.sum(tile_counts(p.means2d, p.radii, width, height)).astype(jnp.int32)
        stats = {"num_intersections": total, "overflow": jnp.int32(0), "num_visible": num_visible}
    else:
        lists = tile_intersections(p.means2d, p.radii, p.depths, width, height, capacity)
        blend = BLEND_BACKENDS[backend]()
        image, alpha, depth = blend(*floats, lists.gaussian_ids, lists.tile_ranges, width, height)
        stats = {
            "num_intersections": lists.num_intersections,
            "overflow": lists.overflow,
            "num_visible": num_visible,
        }
    return RenderOutput(image=image, alpha=alpha, depth=depth, stats=stats)


@functools.partial(jax.jit, static_argnames=("backend", "capacity", "warn"))
def _render(gaussians, camera, background, *, backend, capacity, warn):
    render = functools.partial(_render_one, backend=backend, capacity=capacity)
    if np.ndim(camera.viewmat) == 3:
        bg_axis = 0 if np.ndim(background) == 2 else None
        out = jax.vmap(render, in_axes=(None, 0, bg_axis))(gaussians, camera, background)
    else:
        out = render(gaussians, camera, background)
    if warn and backend != "dense":
        jax.debug.callback(functools.partial(_warn_overflow, capacity=capacity), out.stats["overflow"])
    return out


def _check(gaussians: Gaussians, camera: Camera, background) -> None:
    gaussians.validate("rasterize: gaussians")
    if np.ndim(gaussians.means) != 2:
        raise ValueError(
            f"rasterize: gaussians.means must have shape (N, 3), got {np.shape(gaussians.means)} "
            "(use jax.vmap for batches of Gaussians)"
        )
    camera.validate("rasterize: camera")
    batch = np.shape(camera.viewmat)[:-2]
    if len(batch) > 1 or np.shape(camera.K)[:-2] != batch:
        raise ValueError(
            f"rasterize: camera.viewmat/K must be (4,4)/(3,3) or (B,4,4)/(B,3,3), "
            f"got {np.shape(camera.viewmat)} and {np.shape(camera.K)}"
        )
    if np.shape(background) not in ((3,), (*batch, 3)):
        raise ValueError(f"rasterize: background must have shape (3,) or {(*batch, 3)}, got {np.shape(background)}")


def rasterize(
    gaussians: Gaussians,
    camera: Camera,
    background: Float[Array, "*batch 3"],
    *,
    backend: str = "auto",
    capacity: int | None = None,
) -> RenderOutput:
    """Render ``gaussians`` seen by ``camera`` over ``background`` (see the module docstring).

    Differentiable w.r.t. every float input (means, quats, scales, opacities, colors, the camera
    and the background). ``backend`` is ``"auto"``, ``"reference"``, ``"dense"``, ``"cpu"`` or
    ``"cuda"`` (or the ``"cuda-emulated"`` test backend); ``capacity`` is the static
    intersection-buffer length (``None``: exact, eager only).
    """
    _check(gaussians, camera, background)
    dtype = jnp.result_type(gaussians.means, gaussians.colors, camera.viewmat)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    background = jnp.asarray(background, dtype)
    backend = _resolve_backend(backend, dtype)
    traced = any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((gaussians, camera, background)))

    if capacity is None:
        if backend == "dense":
            capacity = 0
        else:
            count_backend = "cpu" if backend == "cpu" else "reference"
            total = _concrete_int(
                _count_jit(jax.lax.stop_gradient(gaussians), jax.lax.stop_gradient(camera), backend=count_backend)
            )
            if total is None:
                raise ValueError(
                    "rasterize: capacity=None needs concrete inputs, but it was called under "
                    "jit/vmap. Pass a static `capacity` (e.g. 1.25 * "
                    "gem_jax.render.count_intersections(gaussians, camera) computed eagerly), or pass "
                    "a batched Camera instead of vmapping."
                )
            capacity = round_capacity(total)
    elif int(capacity) < 0 or int(capacity) != capacity:
        raise ValueError(f"rasterize: capacity must be a non-negative int, got {capacity!r}")

    out = _render(gaussians, camera, background, backend=backend, capacity=int(capacity), warn=traced)
    overflow = _concrete_int(jnp.max(out.stats["overflow"]))
    if overflow:
        total = int(jnp.max(out.stats["num_intersections"]))
        raise CapacityOverflowError(
            f"rasterize: {total} tile intersections exceed capacity={capacity} by {overflow}; "
            f"pass capacity >= {total} (e.g. {round_capacity(math.ceil(1.25 * total))}) or capacity=None."
        )
    return out
