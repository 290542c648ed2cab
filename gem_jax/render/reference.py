"""Pure-jnp alpha blending: the dense oracle and the tile path (docs/architecture.md §9, layer 3).

**The blending interface** (shared by :func:`blend_tiles` and the CUDA ``blend_tiles_cuda`` of
``gem_jax.render._ffi``, and followed inside the C++ CPU pass; all take these arguments)::

    blend_tiles(means2d (N,2), conics (N,3), colors (N,3), opacities (N,), depths (N,),
                background (3,), gaussian_ids (M,) int32, tile_ranges (T,2) int32,
                width, height)  ->  image (H,W,3), alpha (H,W), depth (H,W)

``means2d`` are pixel coordinates, ``conics = (a, b, c)`` the upper triangle of the inverse 2D
covariance, ``gaussian_ids`` the per-tile lists sorted front to back (``tiles.py``), tile id
``ty · ⌈W/16⌉ + tx`` with 16×16 tiles, ``tile_ranges[t] = [start, end)`` into
``gaussian_ids``; entries outside every range are never read. ``width``/``height`` are
static Python ints. Differentiable w.r.t. the six float inputs (the integer lists get no
gradient); works under ``jit`` and ``vmap``.

**The rule** (3DGS, Kerbl et al. 2023, eqs. 2–3 with its CUDA rasterizer's thresholds; gsplat's
"RGB+D" mode). For the centre ``p = (j + 0.5, i + 0.5)`` of pixel ``(i, j)`` and the Gaussians
of its tile in list order, starting from ``T = 1``, ``C = 0``, ``D = 0``::

    d = mean2d − p,   σ = ½ (a d_x² + c d_y²) + b d_x d_y
    skip if σ < 0;    α = min(0.99, o · exp(−σ));    skip if α < 1/255
    T_next = T (1 − α);   if T_next < 1e-4: stop (this Gaussian excluded)
    C += α T c;   D += α T z;   T = T_next

    image = C + T · background,   alpha = 1 − T,   depth = D  (accumulated, not normalised)

A Gaussian whose mean or conic is NaN/±Inf, or whose opacity is NaN or −Inf, never
contributes (and gets a zero gradient); an opacity of +Inf blends as α = 0.99.

:func:`blend_dense` applies the same rule per pixel to *all* Gaussians sorted by depth (ties by
index) — an autodiff oracle for tiny scenes; given ``radii`` it restricts each Gaussian to the
tiles its bounding square touches, i.e. exactly the tile path's support.

:func:`blend_tiles` is the CPU fallback for real sizes. All 256 pixels of all tiles advance
together, :data:`CHUNK` list entries per ``lax.while_loop`` iteration; a loop ends when every
list is exhausted or every pixel has stopped. Tiles are visited in order of decreasing list
length and the loop is split into a chain of loops over static tile prefixes T, T/2, T/4, …
so that short lists do not pay for the longest one (load balancing without dynamic shapes).
Its ``custom_vjp`` backward replays the lists front to back with the same decisions and forms
each entry's gradient in closed form (3DGS's backward, reordered), so memory stays
O(pixels + N + M): no per-entry residuals are stored.

Backward identity: per pixel, with ``f_k = c_k·ḡ_C + z_k ḡ_D`` and ``b = bg·ḡ_C − ḡ_A``, the
loss is ``L = Σ_k w_k f_k + T_final b`` with ``w_k = α_k T_k``; for a contributing entry
``∂L/∂α_k = T_k f_k − (F − P_k + T_final b)/(1 − α_k)`` where ``F = Σ_k w_k f_k`` comes from the
forward and ``P_k`` is the same sum up to and including k (3DGS walks back to front and
divides T by (1 − α) instead; both are exact up to rounding). The stop test's dependence on
T is piecewise constant and has no gradient; neither has the 0.99 clamp where it binds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gem_jax.render.tiles import TILE_SIZE, tile_grid, tile_rects

__all__ = ["ALPHA_MAX", "ALPHA_MIN", "T_MIN", "CHUNK", "blend_dense", "blend_tiles"]

ALPHA_MAX = 0.99  # α = min(ALPHA_MAX, o exp(−σ))
ALPHA_MIN = 1.0 / 255.0  # smaller α are skipped
T_MIN = 1e-4  # a pixel stops before its transmittance would drop below this
CHUNK = 16  # list entries per while-loop iteration of the tile path
UNROLL = 2  # scan unrolling inside a chunk (a rolled scan step is slow on XLA CPU)
PHASES = 5  # load balancing: while loops over tile prefixes of sizes T, T/2, …, T/16 …
MIN_PHASE_TILES = 16  # … of at least this many tiles (small images: one loop, fast compiles)
_PIX = TILE_SIZE * TILE_SIZE
_OPACITY_CAP = 1e30  # +Inf opacity becomes this (α clamps to 0.99, gradients stay finite)

Outputs = tuple[Float[Array, "H W 3"], Float[Array, "H W"], Float[Array, "H W"]]


def _sanitize(means2d, conics, opacities):
    """Gaussians that could poison the arithmetic become transparent, finite ones (double where)."""
    ok = (
        jnp.all(jnp.isfinite(means2d), -1)
        & jnp.all(jnp.isfinite(conics), -1)
        & ~jnp.isnan(opacities)
        & (opacities > -jnp.inf)
    )
    means2d = jnp.where(ok[:, None], means2d, 0.0)
    conics = jnp.where(ok[:, None], conics, 0.0)
    opacities = jnp.where(ok, jnp.minimum(opacities, _OPACITY_CAP), 0.0)
    return means2d, conics, opacities


def _alpha(px, py, mx, my, a, b, c, o, present):
    """σ, exp(−σ), o·exp(−σ), α and whether the Gaussian takes part (before the stop test)."""
    dx, dy = mx - px, my - py
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    vis = jnp.exp(-jnp.where(sigma >= 0, sigma, 0.0))  # σ < 0 is skipped; keep exp finite
    raw = o * vis
    passes = present & (sigma >= 0) & (raw >= ALPHA_MIN)
    return dx, dy, vis, raw, jnp.minimum(ALPHA_MAX, raw), passes


def _blend_step(state, px, py, mx, my, a, b, c, o, col, z, present):
    """One Gaussian at many pixels: the rule of the module docstring (broadcasting inputs).

    ``state = (T, live, C, D)``; ``present`` masks out list padding / unsupported pixels.
    """
    T, live, C, D = state
    _, _, _, _, alpha, passes = _alpha(px, py, mx, my, a, b, c, o, present)
    T_next = T * (1.0 - alpha)
    active = passes & live
    stop = active & (T_next < T_MIN)
    contributes = active & ~stop
    w = jnp.where(contributes, alpha * T, 0.0)
    C = tuple(ci + w * cc for ci, cc in zip(C, col))  # one array per channel (CPU-friendly)
    D = D + w * z
    return jnp.where(contributes, T_next, T), live & ~stop, C, D


def _pixel_centres(width: int, height: int, dtype):
    """Pixel centres in tile layout: (T, 256) x and y, tiles row-major, pixels row-major."""
    tiles_x, tiles_y = tile_grid(width, height)
    ty, tx, iy, ix = np.meshgrid(
        np.arange(tiles_y), np.arange(tiles_x), np.arange(TILE_SIZE), np.arange(TILE_SIZE), indexing="ij"
    )
    px = (tx * TILE_SIZE + ix + 0.5).reshape(tiles_x * tiles_y, _PIX)
    py = (ty * TILE_SIZE + iy + 0.5).reshape(tiles_x * tiles_y, _PIX)
    return jnp.asarray(px, dtype), jnp.asarray(py, dtype)


def _to_image(x, width, height):
    """(T, 256, ...) tile layout -> (H, W, ...)."""
    tiles_x, tiles_y = tile_grid(width, height)
    rest = x.shape[2:]
    x = x.reshape(tiles_y, tiles_x, TILE_SIZE, TILE_SIZE, *rest)
    x = jnp.moveaxis(x, 2, 1).reshape(tiles_y * TILE_SIZE, tiles_x * TILE_SIZE, *rest)
    return x[:height, :width]


def _to_tiles(x, width, height):
    """(H, W, ...) -> (T, 256, ...) tile layout, zero padded."""
    tiles_x, tiles_y = tile_grid(width, height)
    rest = x.shape[2:]
    pad = [(0, tiles_y * TILE_SIZE - height), (0, tiles_x * TILE_SIZE - width)] + [(0, 0)] * len(rest)
    x = jnp.pad(x, pad).reshape(tiles_y, TILE_SIZE, tiles_x, TILE_SIZE, *rest)
    return jnp.moveaxis(x, 2, 1).reshape(tiles_x * tiles_y, _PIX, *rest)


# --- the tile path ------------------------------------------------------------------------


def _pack(means2d, conics, colors, opacities, depths):
    """Per-Gaussian parameter rows (N, 10): mx, my, a, b, c, r, g, b, o, z."""
    return jnp.concatenate([means2d, conics, colors, opacities[:, None], depths[:, None]], -1)


def _unpack(p):
    """Columns of packed rows p (..., 10): mx, my, a, b, c, o, colour (3, ...), z."""
    col = jnp.moveaxis(p[..., 5:8], -1, 0)
    return p[..., 0], p[..., 1], p[..., 2], p[..., 3], p[..., 4], p[..., 8], col, p[..., 9]


def _run_chunk(state, params, present, px, py):
    """Blend CHUNK list entries (params (T, K, 10), present (T, K)) into every tile's pixels."""

    def step(state, xs):
        p, here = xs[0][:, None, :], xs[1][:, None]  # (T, 1, 10), (T, 1)
        mx, my, a, b, c, o, col, z = _unpack(p)
        return _blend_step(state, px, py, mx, my, a, b, c, o, col, z, here), None

    xs = (jnp.swapaxes(params, 0, 1), jnp.swapaxes(present, 0, 1))
    return jax.lax.scan(step, state, xs, unroll=UNROLL)[0]


def _grad_chunk(state, params, present, px, py, g_img, g_depth, F, tail):
    """Gradients (T, K, 10) of CHUNK list entries, replaying the forward front to back.

    ``state = (T, live, P)`` with ``P = Σ w_k f_k`` so far. For a contributing entry
    ``∂L/∂α_k = T_k f_k − (F − P_k + T_final b)/(1 − α_k)`` (``P_k`` including entry k),
    then the chain through ``α = o·exp(−σ)`` (flat where clamped at 0.99) and
    ``σ = ½(a d_x² + c d_y²) + b d_x d_y``; pixel sums give the per-entry gradient.
    """

    def step(state, xs):
        T, live, P = state
        p, here = xs[0][:, None, :], xs[1][:, None]
        mx, my, a, b, c, o, col, z = _unpack(p)
        dx, dy, vis, raw, alpha, passes = _alpha(px, py, mx, my, a, b, c, o, here)
        T_next = T * (1.0 - alpha)
        active = passes & live
        stop = active & (T_next < T_MIN)
        contributes = active & ~stop
        w = jnp.where(contributes, alpha * T, 0.0)
        f = g_img[0] * col[0] + g_img[1] * col[1] + g_img[2] * col[2] + g_depth * z
        P = P + w * f
        v_alpha = jnp.where(contributes, T * f - (F - P + tail) / (1.0 - alpha), 0.0)
        v_raw = jnp.where(raw <= ALPHA_MAX, v_alpha, 0.0)
        v_sigma = -raw * v_raw
        grads = jnp.stack(
            [
                jnp.sum((a * dx + b * dy) * v_sigma, -1),
                jnp.sum((b * dx + c * dy) * v_sigma, -1),
                jnp.sum(0.5 * dx * dx * v_sigma, -1),
                jnp.sum(dx * dy * v_sigma, -1),
                jnp.sum(0.5 * dy * dy * v_sigma, -1),
                *(jnp.sum(w * g_img[ch], -1) for ch in range(3)),
                jnp.sum(vis * v_raw, -1),
                jnp.sum(w * g_depth, -1),
            ],
            -1,
        )  # (T, 10)
        T = jnp.where(contributes, T_next, T)
        return (T, live & ~stop, P), grads

    xs = (jnp.swapaxes(params, 0, 1), jnp.swapaxes(present, 0, 1))
    state, grads = jax.lax.scan(step, state, xs, unroll=UNROLL)
    return state, jnp.swapaxes(grads, 0, 1)


def _gather_chunk(params, gaussian_ids, starts, counts, j):
    """Rows of list entries j .. j+CHUNK-1 of every tile, and which of them exist."""
    offset = j + jnp.arange(CHUNK, dtype=jnp.int32)
    present = offset[None, :] < counts[:, None]  # (T, K)
    idx = jnp.clip(starts[:, None] + offset[None, :], 0, gaussian_ids.shape[0] - 1)
    gid = jnp.where(present, gaussian_ids[idx], 0)
    return jnp.take(params, gid, axis=0, mode="clip"), present, gid


def _phase_sizes(num_tiles: int) -> list[int]:
    """Static tile-prefix sizes T, T/2, T/4, … (at most PHASES, none below MIN_PHASE_TILES)."""
    sizes = [num_tiles]
    for k in range(1, PHASES):
        size = -(-num_tiles // 2**k)
        if size < MIN_PHASE_TILES or size == sizes[-1]:
            break
        sizes.append(size)
    return sizes


def _tile_loop(params, gaussian_ids, tile_ranges, tile_state, carry, consts, chunk_fn):
    """Drive ``chunk_fn`` over list offsets j = 0, CHUNK, … for every tile, load-balanced.

    Tiles are processed in order of decreasing list length (``tile_state`` and ``consts`` are
    pytrees of per-tile arrays, tile axis first, already in that order), so the tiles whose
    lists reach past j are a prefix. A chain of while loops works on static prefixes of sizes
    T, T/2, T/4, …: the loop on size S runs while more than S/2 tiles remain, so at most half
    the work is padding; a loop also ends when every pixel of its prefix has stopped.
    ``tile_state[1]`` is the (T, 256) "still blending" mask. ``chunk_fn(tile_state, carry,
    consts, gaussian rows (S, K, 10), present (S, K), ids (S, K))`` returns the new
    ``(tile_state, carry)``; ``carry`` is not per tile. ``tile_ranges`` are in the same order.
    Every pixel sees its tile's entries in list order whatever the phases, so the forward and
    the backward replay take identical decisions.
    """
    starts, counts = tile_ranges[:, 0], tile_ranges[:, 1] - tile_ranges[:, 0]
    sizes = _phase_sizes(counts.shape[0])
    j = jnp.int32(0)
    for k, size in enumerate(sizes):
        smaller = sizes[k + 1] if k + 1 < len(sizes) else 0
        sub = jax.tree.map(lambda x: x[:size], (tile_state, consts, starts, counts))

        def cond(loop):
            j, (state, _, _, cnt), _ = loop
            remaining = cnt > j
            return (jnp.sum(remaining) > smaller) & jnp.any(remaining[:, None] & state[1])

        def body(loop):
            j, (state, const, st, cnt), carry = loop
            rows, present, gid = _gather_chunk(params, gaussian_ids, st, cnt, j)
            state, carry = chunk_fn(state, carry, const, rows, present, gid)
            return j + CHUNK, (state, const, st, cnt), carry

        j, (sub_state, _, _, _), carry = jax.lax.while_loop(cond, body, (j, sub, carry))
        tile_state = jax.tree.map(lambda full, part: full.at[:size].set(part), tile_state, sub_state)
    return tile_state, carry


def _tile_order(tile_ranges):
    """Tile ids by decreasing list length (ties by id): the processing order of the tile path."""
    return jnp.argsort(tile_ranges[:, 0] - tile_ranges[:, 1], stable=True)


def _tiles_forward(params, gaussian_ids, tile_ranges, width, height):
    """Forward pass in (sorted) tile layout: final T (T, 256), C 3 × (T, 256), D (T, 256)."""
    order = _tile_order(tile_ranges)
    px, py = (x[order] for x in _pixel_centres(width, height, params.dtype))
    zeros = jnp.zeros(px.shape, params.dtype)
    state = (jnp.ones_like(zeros), jnp.ones(px.shape, bool), (zeros, zeros, zeros), zeros)

    def chunk(state, carry, const, rows, present, gid):
        return _run_chunk(state, rows, present, *const), carry

    state, _ = _tile_loop(params, gaussian_ids, tile_ranges[order], state, (), (px, py), chunk)
    T, _, C, D = state
    return order, T, C, D


def _finish(order, T, C, D, background, width, height):
    """Outputs in image layout from the sorted tile layout."""
    inverse = jnp.argsort(order)
    T, D, C = T[inverse], D[inverse], tuple(c[inverse] for c in C)
    image = jnp.stack([c + T * bg for c, bg in zip(C, background)], -1)
    return _to_image(image, width, height), _to_image(1.0 - T, width, height), _to_image(D, width, height)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blend_tiles_packed(params, background, gaussian_ids, tile_ranges, width, height):
    order, T, C, D = _tiles_forward(params, gaussian_ids, tile_ranges, width, height)
    return _finish(order, T, C, D, background, width, height)


def _blend_tiles_fwd(params, background, gaussian_ids, tile_ranges, width, height):
    order, T, C, D = _tiles_forward(params, gaussian_ids, tile_ranges, width, height)
    out = _finish(order, T, C, D, background, width, height)
    return out, (params, background, gaussian_ids, tile_ranges, order, T, C, D)


def _blend_tiles_bwd(width, height, residuals, cotangents):
    params, background, gaussian_ids, tile_ranges, order, T_final, C, D = residuals
    dtype = params.dtype
    g_img, g_alpha, g_depth = (_to_tiles(jnp.asarray(c, dtype), width, height)[order] for c in cotangents)
    g_img = tuple(g_img[..., ch] for ch in range(3))
    v_background = jnp.stack([jnp.sum(T_final * g) for g in g_img])
    F = sum(c * g for c, g in zip(C, g_img)) + D * g_depth  # Σ_k w_k f_k per pixel
    tail = T_final * (sum(g * bg for g, bg in zip(g_img, background)) - g_alpha)  # T_final · b
    px, py = (x[order] for x in _pixel_centres(width, height, dtype))
    zeros = jnp.zeros(px.shape, dtype)
    state = (jnp.ones_like(zeros), jnp.ones(px.shape, bool), zeros)  # T, live, P

    def chunk(state, grads, const, rows, present, gid):
        state, v_rows = _grad_chunk(state, rows, present, *const)
        return state, grads.at[gid.reshape(-1)].add(v_rows.reshape(-1, v_rows.shape[-1]))

    consts = (px, py, g_img, g_depth, F, tail)
    _, grads = _tile_loop(params, gaussian_ids, tile_ranges[order], state, jnp.zeros_like(params), consts, chunk)
    return grads, v_background, None, None


_blend_tiles_packed.defvjp(_blend_tiles_fwd, _blend_tiles_bwd)


def _check_lists(name, gaussian_ids, tile_ranges, width, height):
    tiles_x, tiles_y = tile_grid(width, height)
    if np.ndim(gaussian_ids) != 1:
        raise ValueError(f"{name}: gaussian_ids must have shape (M,), got {np.shape(gaussian_ids)}")
    if tuple(np.shape(tile_ranges)) != (tiles_x * tiles_y, 2):
        raise ValueError(
            f"{name}: tile_ranges must have shape ({tiles_x * tiles_y}, 2) for a {width}x{height} "
            f"image, got {tuple(np.shape(tile_ranges))}"
        )


def _check_inputs(name, means2d, conics, colors, opacities, depths, background, width, height):
    if int(width) <= 0 or int(height) <= 0:
        raise ValueError(f"{name}: width and height must be positive, got {width}x{height}")
    n = np.shape(means2d)[0] if np.ndim(means2d) == 2 else -1
    for field, x, shape in [
        ("means2d", means2d, (n, 2)), ("conics", conics, (n, 3)), ("colors", colors, (n, 3)),
        ("opacities", opacities, (n,)), ("depths", depths, (n,)), ("background", background, (3,)),
    ]:  # fmt: skip
        if tuple(np.shape(x)) != shape:
            raise ValueError(f"{name}: {field} must have shape {shape}, got {tuple(np.shape(x))}")


def _float_inputs(means2d, conics, colors, opacities, depths, background):
    dtype = jnp.result_type(means2d, conics, colors, opacities, depths, background)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return tuple(jnp.asarray(x, dtype) for x in (means2d, conics, colors, opacities, depths, background))


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
) -> Outputs:
    """Front-to-back blending of 16×16 tiles in pure JAX (the CPU fallback; see module docstring).

    Returns ``image (H,W,3)``, ``alpha (H,W)``, ``depth (H,W)`` in the inputs' float dtype.
    """
    width, height = int(width), int(height)
    _check_inputs("blend_tiles", means2d, conics, colors, opacities, depths, background, width, height)
    _check_lists("blend_tiles", gaussian_ids, tile_ranges, width, height)
    means2d, conics, colors, opacities, depths, background = _float_inputs(
        means2d, conics, colors, opacities, depths, background
    )
    if means2d.shape[0] == 0 or np.shape(gaussian_ids)[0] == 0:  # nothing to blend
        zeros = jnp.zeros((height, width), background.dtype)
        return jnp.broadcast_to(background, (height, width, 3)), zeros, zeros
    means2d, conics, opacities = _sanitize(means2d, conics, opacities)
    params = _pack(means2d, conics, colors, opacities, depths)
    ids = jnp.asarray(gaussian_ids, jnp.int32)
    ranges = jnp.asarray(tile_ranges, jnp.int32)
    return _blend_tiles_packed(params, background, ids, ranges, width, height)


# --- the dense oracle -----------------------------------------------------------------------


def blend_dense(
    means2d: Float[Array, "N 2"],
    conics: Float[Array, "N 3"],
    colors: Float[Array, "N 3"],
    opacities: Float[Array, " N"],
    depths: Float[Array, " N"],
    background: Float[Array, " 3"],
    width: int,
    height: int,
    *,
    radii: Int[Array, " N"] | None = None,
) -> Outputs:
    """The blending rule at every pixel over all Gaussians sorted by depth (plain autodiff).

    With ``radii`` a Gaussian reaches only the pixels of tiles its bounding square touches
    (and none if its radius is 0), which makes the result equal to :func:`blend_tiles` on the
    lists of ``tiles.tile_intersections``; without, every Gaussian reaches every pixel.
    Memory O(N·H·W) in the backward pass: tiny scenes only.
    """
    width, height = int(width), int(height)
    _check_inputs("blend_dense", means2d, conics, colors, opacities, depths, background, width, height)
    means2d, conics, colors, opacities, depths, background = _float_inputs(
        means2d, conics, colors, opacities, depths, background
    )
    means2d, conics, opacities = _sanitize(means2d, conics, opacities)
    n = means2d.shape[0]
    dtype = means2d.dtype
    if radii is None:
        rects = tuple(jnp.full((n,), v, jnp.int32) for v in (0, 0, 2**30, 2**30))
    else:
        rects = tile_rects(means2d, jnp.asarray(radii, jnp.int32), width, height)
    jj, ii = jnp.meshgrid(jnp.arange(width), jnp.arange(height))
    px, py = (jj + 0.5).astype(dtype), (ii + 0.5).astype(dtype)
    tx, ty = jj // TILE_SIZE, ii // TILE_SIZE

    order = jnp.argsort(jax.lax.stop_gradient(depths), stable=True)
    xs = (means2d[order], conics[order], colors[order], opacities[order], depths[order], *(r[order] for r in rects))

    def step(state, x):
        m, q, col, o, z, tx0, ty0, tx1, ty1 = x
        inside = (tx >= tx0) & (tx < tx1) & (ty >= ty0) & (ty < ty1)
        return _blend_step(state, px, py, m[0], m[1], q[0], q[1], q[2], o, col[:, None, None], z, inside), None

    init = (
        jnp.ones((height, width), dtype), jnp.ones((height, width), bool),
        (jnp.zeros((height, width), dtype),) * 3, jnp.zeros((height, width), dtype),
    )  # fmt: skip
    (T, _, C, D), _ = jax.lax.scan(step, init, xs)
    return jnp.stack(C, -1) + T[..., None] * background, 1.0 - T, D

