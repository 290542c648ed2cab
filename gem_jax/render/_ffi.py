"""Compiled rasterizer kernels through the XLA FFI (docs/architecture.md §9).

The kernels (``kernels/``, built by ``pip install .``) are plain shared libraries in the
package ``gem_jax_kernels``; this module loads them with ctypes and registers their XLA FFI
handlers with ``jax.ffi.register_ffi_target``:

* the CPU frame pass (``gem_frame_{forward,backward,count}_cpu``), wrapped in a
  ``jax.custom_vjp`` by :mod:`gem_jax.render.cpu_frame`;
* ``HAS_CPU_KERNEL`` / ``HAS_CUDA_KERNEL`` — what was built and loaded;
  :func:`build_instructions` / :func:`require_kernel` — the error for a missing backend.

``GEM_JAX_KERNEL_DIR`` points at a directory with the libraries (e.g. ``build/kernels`` of a
CMake build) and then wins over the installed package.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import jax

__all__ = [
    "HAS_CPU_KERNEL",
    "HAS_CUDA_KERNEL",
    "KernelNotBuiltError",
    "build_instructions",
    "require_kernel",
]

_ABI_VERSION = 3  # must equal gem_blend_abi_version() in kernels/ffi_cpu.cc
_PLATFORMS = {"cpu": "cpu", "cuda": "CUDA"}
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
