"""Tile intersections with a static capacity, sorted by (tile, depth, id) (docs/architecture.md §9, layer 2).

The image is cut into 16×16-pixel tiles, ``tiles_x = ⌈W/16⌉``, ``tiles_y = ⌈H/16⌉``, tile id
``ty · tiles_x + tx``. A projected Gaussian with radius ``r > 0`` and mean ``(u, v)`` is listed
in every tile its bounding square ``[u − r, u + r] × [v − r, v + r]`` touches, exactly as
gsplat does it (3DGS ``getRect`` with pixel centres at ``j + 0.5``)::

    tx ∈ [⌊(u − r)/16⌋, ⌈(u + r)/16⌉) ∩ [0, tiles_x),   ty likewise.

The (tile, Gaussian) pairs are laid out in a buffer of static length ``capacity`` in (tile,
depth, Gaussian id) order — 3DGS sorts by a 64-bit (tile | depth) key; the id makes ties
deterministic. The Gaussians are first put in (depth, id) order (a sort of N), then one
``lax.sort`` of the packed ``uint32`` key ``tile · N + depth rank`` orders the pairs (a stable
sort of (tile, Gaussian) pairs when ``(tiles + 1) · N`` does not fit in 32 bits), and each
tile's run is located with a ``searchsorted``. Nothing is dropped silently: ``num_intersections`` is the true count and
``overflow = max(0, num_intersections − capacity)``; when it is positive, the pairs of the
*last* Gaussians (in input order) are the ones missing, and the caller must treat the result as
invalid (``rasterize`` raises eagerly and reports it under ``jit``).

Unused slots at the end of ``gaussian_ids`` hold 0 and belong to no tile (no range covers
them). Counts are int32: ``N · T`` must stay below 2³¹.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

__all__ = ["TILE_SIZE", "TileLists", "tile_grid", "tile_rects", "tile_counts", "tile_intersections"]

TILE_SIZE = 16


@flax.struct.dataclass
class TileLists:
    """Per-tile, depth-sorted Gaussian lists in one buffer of static length ``capacity``."""

    gaussian_ids: Int[Array, "*batch M"]  # sorted by (tile, depth, id); padding holds 0
    tile_ranges: Int[Array, "*batch T 2"]  # [start, end) into gaussian_ids per tile
    num_intersections: Int[Array, "*batch"]  # the true number of (tile, Gaussian) pairs
    overflow: Int[Array, "*batch"]  # max(0, num_intersections − capacity)


#: Scenes with (tiles + 1) · N below this sort one packed uint32 key (see tile_intersections).
PACKED_KEY_LIMIT = 2**32


def tile_grid(width: int, height: int) -> tuple[int, int]:
    """``(tiles_x, tiles_y)`` of a ``width × height`` image."""
    return math.ceil(width / TILE_SIZE), math.ceil(height / TILE_SIZE)


def tile_rects(
    means2d: Float[Array, "N 2"], radii: Int[Array, " N"], width: int, height: int
) -> tuple[Int[Array, " N"], Int[Array, " N"], Int[Array, " N"], Int[Array, " N"]]:
    """Tile rectangle ``(tx0, ty0, tx1, ty1)`` (ends exclusive) touched by each bounding square.

    Empty (``tx1 ≤ tx0`` or ``ty1 ≤ ty0``) for culled Gaussians (radius 0) and squares off the
    image. Not differentiable (integer outputs).
    """
    tiles_x, tiles_y = tile_grid(width, height)
    means2d = jax.lax.stop_gradient(means2d)
    r = radii.astype(means2d.dtype)
    u, v = means2d[:, 0], means2d[:, 1]
    big = float(2**30)  # keeps the int casts defined for far-off squares

    def span(lo, hi, n):
        start = jnp.clip(jnp.floor(lo / TILE_SIZE), 0, n).astype(jnp.int32)
        end = jnp.clip(jnp.ceil(hi / TILE_SIZE), 0, n).astype(jnp.int32)
        return start, end

    tx0, tx1 = span(jnp.clip(u - r, -big, big), jnp.clip(u + r, -big, big), tiles_x)
    ty0, ty1 = span(jnp.clip(v - r, -big, big), jnp.clip(v + r, -big, big), tiles_y)
    live = (radii > 0) & jnp.isfinite(u) & jnp.isfinite(v)
    tx1 = jnp.where(live, tx1, tx0)
    ty1 = jnp.where(live, ty1, ty0)
    return tx0, ty0, tx1, ty1


def tile_counts(means2d: Float[Array, "N 2"], radii: Int[Array, " N"], width: int, height: int) -> Int[Array, " N"]:
    """Number of tiles each Gaussian is listed in."""
    tx0, ty0, tx1, ty1 = tile_rects(means2d, radii, width, height)
    return jnp.maximum(tx1 - tx0, 0) * jnp.maximum(ty1 - ty0, 0)


def tile_intersections(
    means2d: Float[Array, "N 2"],
    radii: Int[Array, " N"],
    depths: Float[Array, " N"],
    width: int,
    height: int,
    capacity: int,
) -> TileLists:
    """All (tile, Gaussian) pairs, sorted by (tile, depth, id), in a buffer of ``capacity``.

    ``width``, ``height`` and ``capacity`` are static. See the module docstring for the
    intersection rule and the overflow contract.
    """
    capacity = int(capacity)
    if capacity < 0:
        raise ValueError(f"tile_intersections: capacity must be >= 0, got {capacity}")
    tiles_x, tiles_y = tile_grid(width, height)
    num_tiles = tiles_x * tiles_y
    n = means2d.shape[0]
    if n == 0 or capacity == 0:
        counts = tile_counts(means2d, radii, width, height)
        total = jnp.sum(counts).astype(jnp.int32)
        return TileLists(
            gaussian_ids=jnp.zeros((capacity,), jnp.int32),
            tile_ranges=jnp.zeros((num_tiles, 2), jnp.int32),
            num_intersections=total,
            overflow=jnp.maximum(total - capacity, 0),
        )

    tx0, ty0, tx1, ty1 = tile_rects(means2d, radii, width, height)
    nx = jnp.maximum(tx1 - tx0, 0)
    counts = nx * jnp.maximum(ty1 - ty0, 0)
    # Gaussians in (depth, id) order first (a sort of N); each intersection's key is then
    # tile · N + depth rank, one unsigned int: XLA sorts a single key array ~6× faster than
    # keys with a payload, and the (tile, depth, id) order falls out of it. Scenes too large
    # for a 32-bit key (tiles · N ≥ 2³²) take the stable sort of (tile, Gaussian) pairs.
    ids = jnp.arange(n, dtype=jnp.int32)
    depth_key = jnp.where(counts > 0, jax.lax.stop_gradient(depths), 0.0)
    _, order = jax.lax.sort((depth_key, ids), num_keys=2)
    counts_sorted = counts[order]
    ends = jnp.cumsum(counts_sorted).astype(jnp.int32)  # inclusive prefix sums, depth order
    total = ends[-1]

    # Slot m belongs to the depth-ordered Gaussian j with ends[j-1] <= m < ends[j]; it is that
    # Gaussian's `local`-th tile in row-major order inside its rectangle.
    slots = jnp.arange(capacity, dtype=jnp.int32)
    j = jnp.clip(jnp.searchsorted(ends, slots, side="right"), 0, n - 1).astype(jnp.int32)
    gid = order[j]
    local = slots - (ends[j] - counts_sorted[j])
    row_len = jnp.maximum(nx[gid], 1)
    tx = tx0[gid] + local % row_len
    ty = ty0[gid] + local // row_len
    used = slots < total
    tile = jnp.where(used, ty * tiles_x + tx, num_tiles).astype(jnp.int32)
    if (num_tiles + 1) * n < PACKED_KEY_LIMIT:
        key = tile.astype(jnp.uint32) * jnp.uint32(n) + jnp.where(used, j, 0).astype(jnp.uint32)
        key = jax.lax.sort(key)
        tile = (key // jnp.uint32(n)).astype(jnp.int32)
        gid = jnp.where(tile < num_tiles, order[(key % jnp.uint32(n)).astype(jnp.int32)], 0)
    else:
        gid = jnp.where(used, gid, 0)
        tile, gid = jax.lax.sort((tile, gid), num_keys=1, is_stable=True)
    tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)
    starts = jnp.searchsorted(tile, tile_ids, side="left").astype(jnp.int32)
    stops = jnp.searchsorted(tile, tile_ids, side="right").astype(jnp.int32)
    return TileLists(
        gaussian_ids=gid,
        tile_ranges=jnp.stack([starts, stops], -1),
        num_intersections=total,
        overflow=jnp.maximum(total - capacity, 0),
    )
