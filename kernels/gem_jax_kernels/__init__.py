"""Compiled blending kernels of gem_jax (built from ``kernels/`` by the package build).

Installed next to the shared libraries by CMake (``kernels/CMakeLists.txt``);
gem_jax/render/_ffi.py asks this module where they are (its ``GEM_JAX_KERNEL_DIR`` override,
for development builds, is handled there).
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["LIBRARY_DIR", "library_file_name", "library_path"]

LIBRARY_DIR = Path(__file__).resolve().parent


def library_file_name(backend: str) -> str:
    """File name of a blending library on this platform, e.g. ``libgem_jax_blend_cpu.so``."""
    stem = f"gem_jax_blend_{backend}"
    if sys.platform == "win32":
        return f"{stem}.dll"
    if sys.platform == "darwin":
        return f"lib{stem}.dylib"
    return f"lib{stem}.so"


def library_path(backend: str) -> Path | None:
    """Path of the ``"cpu"``, ``"cuda"`` or ``"cuda_emulated"`` blending library, or None if it
    was not built."""
    if backend not in ("cpu", "cuda", "cuda_emulated"):
        raise ValueError(f"library_path: backend must be 'cpu', 'cuda' or 'cuda_emulated', got {backend!r}")
    candidate = LIBRARY_DIR / library_file_name(backend)
    return candidate if candidate.is_file() else None
