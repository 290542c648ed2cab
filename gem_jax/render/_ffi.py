"""Compiled rasterizer kernels through the XLA FFI (docs/architecture.md §9).

The kernels (``kernels/``, built by ``pip install .``) are plain shared libraries in the
package ``gem_jax_kernels``; this module loads them with ctypes and registers their XLA FFI
handlers with ``jax.ffi.register_ffi_target``:

* the CPU frame pass (``gem_frame_{count,forward,backward}_cpu``: projection, tile lists and
  blending in one call per direction), wrapped in a ``jax.custom_vjp`` by
  :mod:`gem_jax.render.cpu_frame`;
* :func:`blend_tiles_cuda` — blending of ``gem_jax.render.reference.blend_tiles``'s tile lists
  with the CUDA kernel (``kernels/blend_cuda.cu``, FFI platform ``CUDA``), and
  :func:`blend_tiles_cuda_emulated` — that same CUDA source compiled against the SIMT emulator
  (``kernels/simt_emulator.h``) as a CPU target: a slow test backend that runs the CUDA kernel's
  own logic without a GPU. The emulator's thread order comes from the environment variable
  ``GEM_JAX_SIMT_SEED`` (read at every call; default 1). Both keep the residuals the backward
  needs (final transmittance, last contributor of every pixel) and walk each pixel back to
  front (3DGS / gsplat) in the backward;
* ``HAS_CPU_KERNEL`` / ``HAS_CUDA_KERNEL`` / ``HAS_CUDA_EMULATED_KERNEL`` — what was built and
  loaded (the CUDA kernel only where jax has a GPU backend); :func:`build_instructions` /
  :func:`require_kernel` — the error for a missing backend.

``vmap`` goes through ``vmap_method="broadcast_all"``: the kernels loop over any leading batch
dimensions themselves (one call for a batch of cameras). ``GEM_JAX_KERNEL_DIR`` points at a
directory with the libraries (e.g. ``build/kernels`` of a CMake build) and then wins over the
installed package.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

__all__ = [
    "HAS_CPU_KERNEL",
    "HAS_CUDA_EMULATED_KERNEL",
    "HAS_CUDA_KERNEL",
    "KernelNotBuiltError",
    "blend_tiles_cuda",
    "blend_tiles_cuda_emulated",
    "build_instructions",
    "require_kernel",
]

TILE_SIZE = 16
#: backend -> the gem_blend_abi_version() its library must return (kernels/ffi_cpu.cc for the CPU
#: pass, kernels/blend_cuda.cu for both CUDA builds); bumped when a handler's operands change.
_ABI_VERSIONS = {"cpu": 3, "cuda": 1, "cuda_emulated": 1}
_PLATFORMS = {"cpu": "cpu", "cuda": "CUDA", "cuda_emulated": "cpu"}
_HANDLERS = {  # backend -> {FFI target name: exported C symbol}
    "cpu": {
        "gem_frame_count_cpu": "GemFrameCountCpu",
        "gem_frame_forward_cpu": "GemFrameForwardCpu",
        "gem_frame_backward_cpu": "GemFrameBackwardCpu",
    },
    "cuda": {
        "gem_blend_forward_cuda": "GemBlendForwardCuda",
        "gem_blend_backward_cuda": "GemBlendBackwardCuda",
    },
    "cuda_emulated": {
        "gem_blend_forward_cuda_emulated": "GemBlendForwardCudaEmulated",
        "gem_blend_backward_cuda_emulated": "GemBlendBackwardCudaEmulated",
    },
}
_LIBRARIES: dict[str, ctypes.CDLL] = {}  # keeps the loaded libraries alive


class KernelNotBuiltError(RuntimeError):
    """A blending backend was asked for that was not built (or could not be loaded)."""


def _library_file(backend: str) -> tuple[Path | None, str]:
    """(path of the backend's library or None, where it was looked for)."""
    override = os.environ.get("GEM_JAX_KERNEL_DIR")
    try:
        import gem_jax_kernels
    except ImportError:
        gem_jax_kernels = None
    if override:
        name = (
            gem_jax_kernels.library_file_name(backend)
            if gem_jax_kernels is not None
            else f"libgem_jax_blend_{backend}.so"
        )
        path = Path(override) / name
        return (path if path.is_file() else None), f"GEM_JAX_KERNEL_DIR={override}"
    if gem_jax_kernels is None:
        return None, "the package gem_jax_kernels (not installed)"
    return gem_jax_kernels.library_path(backend), str(gem_jax_kernels.LIBRARY_DIR)


def _jax_gpu_problem() -> str | None:
    """None when jax has a GPU backend, else why not."""
    try:
        if jax.devices("gpu"):
            return None
    except (RuntimeError, ValueError) as err:  # no such backend, or it failed to initialise
        return f"{err}".splitlines()[0]
    return "no GPU devices"


def _load(backend: str) -> str | None:
    """Loads and registers one backend; returns None on success, else why it is missing."""
    path, where = _library_file(backend)
    if path is None:
        return f"no {backend} blending library in {where}"
    try:
        library = ctypes.CDLL(str(path))
        library.gem_blend_abi_version.restype = ctypes.c_int32
        version = library.gem_blend_abi_version()
        if version != _ABI_VERSIONS[backend]:
            return (f"{path} has kernel ABI {version}, this gem_jax expects {_ABI_VERSIONS[backend]} "
                    "(stale build: rerun pip install)")
        if _PLATFORMS[backend] == "CUDA" and (gpu_problem := _jax_gpu_problem()) is not None:
            return (f"{path} is built, but no GPU backend in jax ({gpu_problem}); it needs a CUDA GPU and "
                    'jax with CUDA support (`pip install "jax[cuda13]"`)')
        for target, symbol in _HANDLERS[backend].items():
            capsule = jax.ffi.pycapsule(getattr(library, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform=_PLATFORMS[backend])
    except (OSError, AttributeError) as err:
        return f"could not load {path}: {err}"
    _LIBRARIES[backend] = library
    return None


_PROBLEMS = {backend: _load(backend) for backend in ("cpu", "cuda", "cuda_emulated")}
HAS_CPU_KERNEL: bool = _PROBLEMS["cpu"] is None
HAS_CUDA_KERNEL: bool = _PROBLEMS["cuda"] is None
HAS_CUDA_EMULATED_KERNEL: bool = _PROBLEMS["cuda_emulated"] is None


def build_instructions(backend: str) -> str:
    """Why the ``backend`` ("cpu", "cuda" or "cuda-emulated") kernel is unavailable and how to
    build it."""
    backend = backend.replace("-", "_")
    needs = {
        "cpu": "a C++20 compiler and CMake >= 3.24",
        "cuda": "nvcc on PATH (CUDA toolkit) in addition to a C++ compiler",
        "cuda_emulated": "a C++20 compiler and CMake >= 3.24",
    }[backend]
    problem = _PROBLEMS.get(backend) or "not loaded"
    return (
        f"The {backend!r} blending kernel is not available ({problem}). It is compiled by the "
        f"package build, which needs {needs}: run `pip install .` (or `pip install -e .`) in "
        "the gem_jax checkout; `pip install . -C cmake.define.GEM_JAX_CUDA=OFF` skips CUDA. For "
        "a development build, `cmake -S . -B build && cmake --build build` and set "
        "GEM_JAX_KERNEL_DIR=build/kernels. Or use backend='reference' (pure JAX)."
    )


def require_kernel(backend: str) -> None:
    """Raises :class:`KernelNotBuiltError` unless the ``backend`` kernel is loaded."""
    key = backend.replace("-", "_")
    if key not in _PROBLEMS:
        raise ValueError(f"require_kernel: backend must be 'cpu', 'cuda' or 'cuda-emulated', got {backend!r}")
    if _PROBLEMS[key] is not None:
        raise KernelNotBuiltError(build_instructions(key))


def _forward_call(kind, width, height, means2d, conics, colors, opacities, depths, background, ids, ranges):
    f32, i32 = jnp.float32, jnp.int32
    shapes = (
        jax.ShapeDtypeStruct((height, width, 3), f32),  # image
        jax.ShapeDtypeStruct((height, width), f32),  # alpha
        jax.ShapeDtypeStruct((height, width), f32),  # depth
        jax.ShapeDtypeStruct((height, width), f32),  # final transmittance
        jax.ShapeDtypeStruct((height, width), i32),  # last contributor (1 + index in tile list)
    )
    call = jax.ffi.ffi_call(f"gem_blend_forward_{kind}", shapes, vmap_method="broadcast_all")
    return call(
        means2d, conics, colors, opacities, depths, background, ids, ranges,
        width=np.int32(width), height=np.int32(height),
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _blend(means2d, conics, colors, opacities, depths, background, ids, ranges, width, height, kind):
    image, alpha, depth, _, _ = _forward_call(
        kind, width, height, means2d, conics, colors, opacities, depths, background, ids, ranges
    )
    return image, alpha, depth


def _blend_fwd(means2d, conics, colors, opacities, depths, background, ids, ranges, width, height, kind):
    inputs = (means2d, conics, colors, opacities, depths, background, ids, ranges)
    image, alpha, depth, transmittance, last = _forward_call(kind, width, height, *inputs)
    return (image, alpha, depth), (*inputs, transmittance, last)


def _blend_bwd(width, height, kind, residuals, cotangents):
    *inputs, transmittance, last = residuals
    means2d, _, _, _, _, _, ids, _ = inputs
    v_image, v_alpha, v_depth = (jnp.asarray(c, jnp.float32) for c in cotangents)
    n = means2d.shape[0]
    f32 = jnp.float32
    shapes = (
        jax.ShapeDtypeStruct((n, 2), f32),  # v_means2d
        jax.ShapeDtypeStruct((n, 3), f32),  # v_conics
        jax.ShapeDtypeStruct((n, 3), f32),  # v_colors
        jax.ShapeDtypeStruct((n,), f32),  # v_opacities
        jax.ShapeDtypeStruct((n,), f32),  # v_depths
    )
    call = jax.ffi.ffi_call(f"gem_blend_backward_{kind}", shapes, vmap_method="broadcast_all")
    v_means2d, v_conics, v_colors, v_opacities, v_depths = call(
        *inputs, transmittance, last, v_image, v_alpha, v_depth,
        width=np.int32(width), height=np.int32(height),
    )  # fmt: skip
    # d image / d background = final transmittance, per pixel and channel.
    v_background = jnp.einsum("hw,hwc->c", transmittance, v_image)
    return v_means2d, v_conics, v_colors, v_opacities, v_depths, v_background, None, None


_blend.defvjp(_blend_fwd, _blend_bwd)


def _check(kind: str, name: str, x, shape: tuple[int, ...]) -> None:
    if tuple(np.shape(x)) != shape:
        raise ValueError(f"blend_tiles_{kind}: {name} must have shape {shape}, got {tuple(np.shape(x))}")


def _blend_tiles(kind, means2d, conics, colors, opacities, depths, background, gaussian_ids, tile_ranges,
                 width, height):
    """Checks and float32/int32 casts shared by the ``blend_tiles_*`` kernels, then the call."""
    require_kernel(kind)
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ValueError(f"blend_tiles_{kind}: width and height must be positive, got {width}x{height}")
    n = np.shape(means2d)[0] if np.ndim(means2d) == 2 else -1
    num_tiles = -(-width // TILE_SIZE) * -(-height // TILE_SIZE)
    _check(kind, "means2d", means2d, (n, 2))
    _check(kind, "conics", conics, (n, 3))
    _check(kind, "colors", colors, (n, 3))
    _check(kind, "opacities", opacities, (n,))
    _check(kind, "depths", depths, (n,))
    _check(kind, "background", background, (3,))
    if np.ndim(gaussian_ids) != 1:
        raise ValueError(f"blend_tiles_{kind}: gaussian_ids must have shape (M,), got {np.shape(gaussian_ids)}")
    _check(kind, "tile_ranges", tile_ranges, (num_tiles, 2))
    floats = (means2d, conics, colors, opacities, depths, background)
    floats = tuple(jnp.asarray(x, jnp.float32) for x in floats)
    ints = (jnp.asarray(gaussian_ids, jnp.int32), jnp.asarray(tile_ranges, jnp.int32))
    return _blend(*floats, *ints, width, height, kind)


def _blend_function(kind: str, doc: str):
    """The public ``blend_tiles_<kind>``: ``reference.blend_tiles``'s signature, through the
    ``kind`` kernel (checks and casts in :func:`_blend_tiles`)."""

    def blend_tiles(
        means2d: Float[Array, "N 2"],
        conics: Float[Array, "N 3"],
        colors: Float[Array, "N 3"],
        opacities: Float[Array, " N"],
        depths: Float[Array, " N"],
        background: Float[Array, " 3"],
        gaussian_ids: Int[Array, " M"],
        tile_ranges: Int[Array, "T 2"],
        width: int,
        height: int,
    ) -> tuple[Float[Array, "H W 3"], Float[Array, "H W"], Float[Array, "H W"]]:
        args = (means2d, conics, colors, opacities, depths, background, gaussian_ids, tile_ranges)
        return _blend_tiles(kind, *args, width, height)

    blend_tiles.__name__ = blend_tiles.__qualname__ = f"blend_tiles_{kind}"
    blend_tiles.__doc__ = doc
    return blend_tiles


blend_tiles_cuda = _blend_function(
    "cuda",
    """Front-to-back alpha blending of 16x16 tiles on a CUDA GPU (``kernels/blend_cuda.cu``,
    docs/architecture.md §9), with ``reference.blend_tiles``'s contract: ``means2d`` pixel
    coordinates (N, 2), ``conics`` (a, b, c) of the inverse 2D covariance (N, 3), ``colors``
    (N, 3), ``opacities`` (N,), ``depths`` (N,), ``background`` (3,), ``gaussian_ids`` (M,)
    sorted by (tile, depth), ``tile_ranges`` (T, 2) = [start, end) per tile with tile id
    ``ty * ceil(W/16) + tx``; ``width`` and ``height`` static. Returns ``image`` (H, W, 3),
    ``alpha`` (H, W) = 1 - final transmittance and ``depth`` (H, W) (alpha-weighted sum).
    Differentiable in every float input; ``jit`` and ``vmap`` work (batch in one call).
    One thread block per 16×16 tile; the backward sums each Gaussian's
    gradient over a warp and adds it with atomics, so gradients agree to float32 rounding between
    runs, not bit for bit. Needs a GPU backend in jax (``HAS_CUDA_KERNEL``).""",
)

blend_tiles_cuda_emulated = _blend_function(
    "cuda_emulated",
    """:func:`blend_tiles_cuda`'s CUDA source run on the CPU by the SIMT emulator
    (``kernels/simt_emulator.h``): a **test backend**, slow (every thread of every block is an
    execution context), for correctness. Blocks and, between barriers, threads run in an order
    drawn from ``GEM_JAX_SIMT_SEED`` (default 1): the forward is the same for every seed, the
    gradients agree to float32 rounding (the atomics' order changes).""",
)
