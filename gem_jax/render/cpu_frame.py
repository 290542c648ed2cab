"""The CPU rasterizer as one C++ pass per direction (docs/architecture.md §9).

``render_cpu`` runs the three layers of the rasterizer — EWA projection (the equations and
culling of ``project.py``), the depth-ordered tile lists of ``tiles.py`` (same order, same
static capacity and overflow count) and the blending of ``reference.py`` — in one XLA FFI
call (``kernels/frame_cpu.cc``, ``kernels/blend_cpu.cc``) on XLA's intra-op thread pool, and
its ``jax.custom_vjp`` backward in one more (blending backward, then the projection's
backward): gradients w.r.t. means, quats, scales, opacities, colours, ``viewmat``, ``K`` and
the background. Float32 only; any leading batch dimensions (``vmap`` over cameras) are looped
over inside the kernels.

The forward also returns what the backward needs (projected Gaussians, tile lists, final
transmittance and last contributor per pixel); the intersection buffer (``capacity``) is the
only capacity-sized array, and the per-Gaussian and per-pixel ones are O(N) and O(H·W).
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gem_jax.render import _ffi
from gem_jax.render.project import Projected
from gem_jax.render.tiles import TileLists, tile_grid
from gem_jax.types import Camera, Gaussians

__all__ = ["CpuFrame", "count_cpu", "render_cpu"]

_PROJECT_CHUNK = 1024  # Gaussians per camera-gradient partial sum of the backward
_CAMERA_GRAD_BYTES = 20 * 8  # one partial: CameraGrads of kernels/project_math.h
_RECORD = 16  # floats per Gaussian record (kernels/blend_cpu.h): mean2d, conic, …, depth at 9


@flax.struct.dataclass
class CpuFrame:
    """One camera's render and the intermediate results of the pass (all but ``image``,
    ``alpha`` and ``depth`` under ``stop_gradient``)."""

    image: Float[Array, "*batch H W 3"]
    alpha: Float[Array, "*batch H W"]
    depth: Float[Array, "*batch H W"]
    projected: Projected  # project_gaussians' outputs (opacities/colors zero where culled)
    lists: TileLists
    num_visible: Int[Array, "*batch"]


def _floats(gaussians: Gaussians, camera: Camera, background):
    f32 = jnp.float32
    g = gaussians
    return tuple(
        jnp.asarray(x, f32)
        for x in (g.means, g.quats, g.scales, g.opacities, g.colors, camera.viewmat, camera.K, background)
    )


def _forward_call(width, height, capacity, residuals, means, quats, scales, opacities, colors, viewmat, K, background):
    f32, i32 = jnp.float32, jnp.int32
    n = means.shape[0]
    tiles_x, tiles_y = tile_grid(width, height)
    shapes = (
        jax.ShapeDtypeStruct((height, width, 3), f32),  # image
        jax.ShapeDtypeStruct((height, width), f32),  # alpha
        jax.ShapeDtypeStruct((height, width), f32),  # depth
        jax.ShapeDtypeStruct((height, width), f32),  # final transmittance
        jax.ShapeDtypeStruct((height, width), i32),  # last contributor (1 + index in tile list)
        jax.ShapeDtypeStruct((n, _RECORD), f32),  # records: means2d, conics, …, depths, box
        jax.ShapeDtypeStruct((n,), i32),  # radii
        jax.ShapeDtypeStruct((capacity,), i32),  # gaussian_ids
        jax.ShapeDtypeStruct((tiles_x * tiles_y, 2), i32),  # tile_ranges
        jax.ShapeDtypeStruct((), i32),  # num_intersections
        jax.ShapeDtypeStruct((7, n), i32),  # scratch: tile counts and rectangles, radix-sort keys/ids
    )
    call = jax.ffi.ffi_call("gem_frame_forward_cpu", shapes, vmap_method="broadcast_all")
    return call(
        means, quats, scales, opacities, colors, viewmat, K, background,
        width=np.int32(width), height=np.int32(height), residuals=residuals,
    )[:-1]  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _frame(means, quats, scales, opacities, colors, viewmat, K, background, width, height, capacity):
    # Not differentiated: the transmittance and last-contributor outputs are left unwritten.
    return _forward_call(width, height, capacity, False, means, quats, scales, opacities, colors, viewmat, K,
                         background)  # fmt: skip


def _frame_fwd(means, quats, scales, opacities, colors, viewmat, K, background, width, height, capacity):
    inputs = (means, quats, scales, opacities, colors, viewmat, K, background)
    outs = _forward_call(width, height, capacity, True, *inputs)
    return outs, (inputs, outs)


def _frame_bwd(width, height, capacity, residuals, cotangents):
    inputs, outs = residuals
    _, _, _, transmittance, last, records, radii, ids, ranges, _ = outs
    v_image, v_alpha, v_depth = (jnp.asarray(c, jnp.float32) for c in cotangents[:3])
    n, m = radii.shape[0], ids.shape[0]
    f32 = jnp.float32
    shapes = (
        jax.ShapeDtypeStruct((n, 3), f32),  # v_means
        jax.ShapeDtypeStruct((n, 4), f32),  # v_quats
        jax.ShapeDtypeStruct((n, 3), f32),  # v_scales
        jax.ShapeDtypeStruct((n,), f32),  # v_opacities
        jax.ShapeDtypeStruct((n, 3), f32),  # v_colors
        jax.ShapeDtypeStruct((4, 4), f32),  # v_viewmat
        jax.ShapeDtypeStruct((3, 3), f32),  # v_K
        jax.ShapeDtypeStruct((m, 10), f32),  # scratch: one gradient record per intersection
        jax.ShapeDtypeStruct((6, n), f32),  # scratch: 2D gradients per Gaussian
        jax.ShapeDtypeStruct((max(-(-n // _PROJECT_CHUNK), 1), _CAMERA_GRAD_BYTES), jnp.uint8),  # partials
    )
    call = jax.ffi.ffi_call("gem_frame_backward_cpu", shapes, vmap_method="broadcast_all")
    grads = call(
        *inputs, records, radii, ids, ranges, transmittance, last, v_image, v_alpha, v_depth,
        width=np.int32(width), height=np.int32(height),
    )[:7]  # fmt: skip
    v_background = jnp.einsum("hw,hwc->c", transmittance, v_image)  # d image / d bg = T_final
    return (*grads, v_background)


_frame.defvjp(_frame_fwd, _frame_bwd)


def render_cpu(
    gaussians: Gaussians, camera: Camera, background: Float[Array, " 3"], capacity: int
) -> CpuFrame:
    """Render one camera with the C++ CPU pass (``capacity`` static; see the module docstring).

    ``gaussians`` (N,…) and ``camera`` (viewmat (4,4), K (3,3)) unbatched; ``jax.vmap`` over
    cameras works. Differentiable w.r.t. every float input through ``image``, ``alpha`` and
    ``depth``. Counts and overflow are in ``lists`` (never silently dropped: the caller reports
    ``lists.overflow``).
    """
    _ffi.require_kernel("cpu")
    width, height = int(camera.width), int(camera.height)
    outs = _frame(*_floats(gaussians, camera, background), width, height, int(capacity))
    image, alpha, depth, _, _, records, radii, ids, ranges, total = outs
    records = jax.lax.stop_gradient(records)
    visible = radii > 0
    f32 = jnp.float32
    projected = Projected(
        means2d=records[:, 0:2],
        conics=records[:, 2:5],
        depths=records[:, 9],
        radii=radii,
        opacities=jnp.where(visible, jax.lax.stop_gradient(jnp.asarray(gaussians.opacities, f32)), 0.0),
        colors=jnp.where(visible[:, None], jax.lax.stop_gradient(jnp.asarray(gaussians.colors, f32)), 0.0),
    )
    lists = TileLists(
        gaussian_ids=ids,
        tile_ranges=ranges,
        num_intersections=total,
        overflow=jnp.maximum(total - int(capacity), 0),
    )
    num_visible = jnp.sum(visible).astype(jnp.int32)
    return CpuFrame(image=image, alpha=alpha, depth=depth, projected=projected, lists=lists, num_visible=num_visible)


def count_cpu(gaussians: Gaussians, camera: Camera) -> Int[Array, ""]:
    """Number of (tile, Gaussian) intersections of the C++ pass for one camera (``vmap``-able)."""
    _ffi.require_kernel("cpu")
    width, height = int(camera.width), int(camera.height)
    means, quats, scales, opacities, colors, viewmat, K, _ = _floats(gaussians, camera, jnp.zeros(3))
    call = jax.ffi.ffi_call(
        "gem_frame_count_cpu", jax.ShapeDtypeStruct((means.shape[0],), jnp.int32), vmap_method="broadcast_all"
    )
    counts = call(means, quats, scales, opacities, colors, viewmat, K, width=np.int32(width), height=np.int32(height))
    return jnp.sum(counts).astype(jnp.int32)
