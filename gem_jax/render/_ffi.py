"""Compiled blending kernels through the XLA FFI (DESIGN §9, layer 3; CONVENTIONS 6 and 7).

The kernels (``kernels/``, built by ``pip install .``) are plain shared libraries in the
package ``gem_jax_kernels``; this module loads them with ctypes, registers their XLA FFI
handlers with ``jax.ffi.register_ffi_target`` and wraps them in a ``jax.custom_vjp``:

* :func:`blend_tiles_cpu` — the same signature and results as
  ``gem_jax.render.reference.blend_tiles``; its forward keeps the residuals the backward needs
  (final transmittance and the last contributor of every pixel), its backward walks each
  pixel back to front (3DGS / gsplat) and returns gradients for every float input (``None``
  for the integer tile lists).
* ``HAS_CPU_KERNEL`` / ``HAS_CUDA_KERNEL`` — what was built and loaded;
  :func:`build_instructions` / :func:`require_kernel` — the error for a missing backend.

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
    "HAS_CUDA_KERNEL",
    "KernelNotBuiltError",
    "blend_tiles_cpu",
    "build_instructions",
    "require_kernel",
]

TILE_SIZE = 16
_ABI_VERSION = 2  # must equal gem_blend_abi_version() in kernels/blend_cpu.cc
_PLATFORMS = {"cpu": "cpu", "cuda": "CUDA"}
_HANDLERS = {  # backend -> {FFI target name: exported C symbol}
    "cpu": {
        "gem_blend_forward_cpu": "GemBlendForwardCpu",
        "gem_blend_backward_cpu": "GemBlendBackwardCpu",
        "gem_frame_count_cpu": "GemFrameCountCpu",
        "gem_frame_forward_cpu": "GemFrameForwardCpu",
        "gem_frame_backward_cpu": "GemFrameBackwardCpu",
    },
    "cuda": {
        "gem_blend_forward_cuda": "GemBlendForwardCuda",
        "gem_blend_backward_cuda": "GemBlendBackwardCuda",
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


def _load(backend: str) -> str | None:
    """Loads and registers one backend; returns None on success, else why it is missing."""
    path, where = _library_file(backend)
    if path is None:
        return f"no {backend} blending library in {where}"
    try:
        library = ctypes.CDLL(str(path))
        library.gem_blend_abi_version.restype = ctypes.c_int32
        version = library.gem_blend_abi_version()
        if version != _ABI_VERSION:
            return f"{path} has kernel ABI {version}, this gem_jax expects {_ABI_VERSION} (stale build)"
        for target, symbol in _HANDLERS[backend].items():
            capsule = jax.ffi.pycapsule(getattr(library, symbol))
            jax.ffi.register_ffi_target(target, capsule, platform=_PLATFORMS[backend])
    except (OSError, AttributeError) as err:
        return f"could not load {path}: {err}"
    _LIBRARIES[backend] = library
    return None


_PROBLEMS = {backend: _load(backend) for backend in ("cpu", "cuda")}
HAS_CPU_KERNEL: bool = _PROBLEMS["cpu"] is None
HAS_CUDA_KERNEL: bool = _PROBLEMS["cuda"] is None


def build_instructions(backend: str) -> str:
    """Why the ``backend`` ("cpu" or "cuda") kernel is unavailable and how to build it."""
    needs = {
        "cpu": "a C++20 compiler and CMake >= 3.24",
        "cuda": "nvcc on PATH (CUDA toolkit) in addition to a C++ compiler",
    }[backend]
    problem = _PROBLEMS.get(backend) or "not loaded"
    if backend == "cuda":
        problem += ("; note that this version of gem_jax has no CUDA kernel yet (kernels/blend_cuda.cu is "
                    "not written: no GPU was available to verify one), so on a GPU use backend='reference'")
    return (
        f"The {backend!r} blending kernel is not available ({problem}). It is compiled by the "
        f"package build, which needs {needs}: run `pip install .` (or `pip install -e .`) in "
        "the gem_jax checkout; `pip install . -C cmake.define.GEM_JAX_CUDA=OFF` skips CUDA. For "
        "a development build, `cmake -S . -B build && cmake --build build` and set "
        "GEM_JAX_KERNEL_DIR=build/kernels. Or use backend='reference' (pure JAX)."
    )


def require_kernel(backend: str) -> None:
    """Raises :class:`KernelNotBuiltError` unless the ``backend`` kernel is loaded."""
    if backend not in _PROBLEMS:
        raise ValueError(f"require_kernel: backend must be 'cpu' or 'cuda', got {backend!r}")
    if _PROBLEMS[backend] is not None:
        raise KernelNotBuiltError(build_instructions(backend))


def _forward_call(width, height, means2d, conics, colors, opacities, depths, background, ids, ranges):
    f32, i32 = jnp.float32, jnp.int32
    shapes = (
        jax.ShapeDtypeStruct((height, width, 3), f32),  # image
        jax.ShapeDtypeStruct((height, width), f32),  # alpha
        jax.ShapeDtypeStruct((height, width), f32),  # depth
        jax.ShapeDtypeStruct((height, width), f32),  # final transmittance
        jax.ShapeDtypeStruct((height, width), i32),  # last contributor (1 + index in tile list)
    )
    call = jax.ffi.ffi_call("gem_blend_forward_cpu", shapes, vmap_method="broadcast_all")
    return call(
        means2d, conics, colors, opacities, depths, background, ids, ranges,
        width=np.int32(width), height=np.int32(height),
    )  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _blend(means2d, conics, colors, opacities, depths, background, ids, ranges, width, height):
    image, alpha, depth, _, _ = _forward_call(
        width, height, means2d, conics, colors, opacities, depths, background, ids, ranges
    )
    return image, alpha, depth


def _blend_fwd(means2d, conics, colors, opacities, depths, background, ids, ranges, width, height):
    inputs = (means2d, conics, colors, opacities, depths, background, ids, ranges)
    image, alpha, depth, transmittance, last = _forward_call(width, height, *inputs)
    return (image, alpha, depth), (*inputs, transmittance, last)


def _blend_bwd(width, height, residuals, cotangents):
    *inputs, transmittance, last = residuals
    means2d, _, _, _, _, _, ids, _ = inputs
    v_image, v_alpha, v_depth = (jnp.asarray(c, jnp.float32) for c in cotangents)
    n, m = means2d.shape[0], ids.shape[0]
    f32 = jnp.float32
    shapes = (
        jax.ShapeDtypeStruct((n, 2), f32),  # v_means2d
        jax.ShapeDtypeStruct((n, 3), f32),  # v_conics
        jax.ShapeDtypeStruct((n, 3), f32),  # v_colors
        jax.ShapeDtypeStruct((n,), f32),  # v_opacities
        jax.ShapeDtypeStruct((n,), f32),  # v_depths
        jax.ShapeDtypeStruct((m, 10), f32),  # scratch: one gradient record per intersection
    )
    call = jax.ffi.ffi_call("gem_blend_backward_cpu", shapes, vmap_method="broadcast_all")
    v_means2d, v_conics, v_colors, v_opacities, v_depths, _ = call(
        *inputs, transmittance, last, v_image, v_alpha, v_depth,
        width=np.int32(width), height=np.int32(height),
    )  # fmt: skip
    # d image / d background = final transmittance, per pixel and channel.
    v_background = jnp.einsum("hw,hwc->c", transmittance, v_image)
    return v_means2d, v_conics, v_colors, v_opacities, v_depths, v_background, None, None


_blend.defvjp(_blend_fwd, _blend_bwd)


def _check(name: str, x, shape: tuple[int, ...]) -> None:
    if tuple(np.shape(x)) != shape:
        raise ValueError(f"blend_tiles_cpu: {name} must have shape {shape}, got {tuple(np.shape(x))}")


def blend_tiles_cpu(
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
    """Front-to-back alpha blending of 16x16 tiles with the C++ CPU kernel (DESIGN §9).

    Same contract as ``reference.blend_tiles``: ``means2d`` pixel coordinates (N, 2),
    ``conics`` (a, b, c) of the inverse 2D covariance (N, 3), ``colors`` (N, 3),
    ``opacities`` (N,), ``depths`` (N,), ``background`` (3,), ``gaussian_ids`` (M,) sorted by
    (tile, depth), ``tile_ranges`` (T, 2) = [start, end) per tile with tile id
    ``ty * ceil(W/16) + tx``; ``width`` and ``height`` static. Returns ``image`` (H, W, 3),
    ``alpha`` (H, W) = 1 - final transmittance and ``depth`` (H, W) (alpha-weighted sum).
    Differentiable in every float input; ``jit`` and ``vmap`` work (batch in one call).
    """
    require_kernel("cpu")
    width, height = int(width), int(height)
    if width <= 0 or height <= 0:
        raise ValueError(f"blend_tiles_cpu: width and height must be positive, got {width}x{height}")
    n = np.shape(means2d)[0] if np.ndim(means2d) == 2 else -1
    num_tiles = -(-width // TILE_SIZE) * -(-height // TILE_SIZE)
    _check("means2d", means2d, (n, 2))
    _check("conics", conics, (n, 3))
    _check("colors", colors, (n, 3))
    _check("opacities", opacities, (n,))
    _check("depths", depths, (n,))
    _check("background", background, (3,))
    if np.ndim(gaussian_ids) != 1:
        raise ValueError(f"blend_tiles_cpu: gaussian_ids must have shape (M,), got {np.shape(gaussian_ids)}")
    _check("tile_ranges", tile_ranges, (num_tiles, 2))
    floats = (means2d, conics, colors, opacities, depths, background)
    floats = tuple(jnp.asarray(x, jnp.float32) for x in floats)
    ints = (jnp.asarray(gaussian_ids, jnp.int32), jnp.asarray(tile_ranges, jnp.int32))
    return _blend(*floats, *ints, width, height)
