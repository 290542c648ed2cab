"""gem_jax.render — the differentiable Gaussian rasterizer and 3DGS ``.ply`` IO (docs/architecture.md §9).

Layers: ``project`` (EWA projection), ``tiles`` (static-capacity tile lists), ``reference``
(pure-jnp blending: dense oracle and tile path), ``_ffi`` (compiled kernels), ``rasterize``
(the public function). ``ply`` reads and writes standard 3D Gaussian Splatting files.
"""

from gem_jax.render.ply import read_ply, write_ply
from gem_jax.render.rasterize import (
    BLEND_BACKENDS,
    BackendUnavailableError,
    CapacityOverflowError,
    RenderOutput,
    available_backends,
    count_intersections,
    rasterize,
    round_capacity,
)

__all__ = [
    "BLEND_BACKENDS",
    "BackendUnavailableError",
    "CapacityOverflowError",
    "RenderOutput",
    "available_backends",
    "count_intersections",
    "rasterize",
    "read_ply",
    "round_capacity",
    "write_ply",
]
