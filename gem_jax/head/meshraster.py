"""A fast, vectorised NumPy triangle rasterizer (z-buffered, barycentric output).

Used to rasterize UV layouts into texel grids (:mod:`gem_jax.head.uv`) and by the synthetic
data generator to render meshes in image space. There is no Python loop over triangles or
pixels; the only loop runs over chunks of (triangle, pixel) candidate pairs, which bounds
memory.

Conventions (docs/architecture.md §3):

* ``vertices[:, :2]`` are continuous pixel coordinates ``(x, y)``: ``x`` runs along the width
  (column ``j``), ``y`` along the height (row ``i``); the centre of pixel ``(i, j)`` sits at
  ``(j + 0.5, i + 0.5)``. ``vertices[:, 2]`` is the depth (camera ``z``; smaller is nearer).
* A pixel is covered by a triangle when its centre lies inside the triangle or on its edges
  (inclusive, with a small barycentric tolerance ``EDGE_EPS``), so triangles that share an edge
  leave no holes. Among the covering triangles the nearest wins; exact depth ties go to the
  lowest face index (deterministic).
* Winding: a triangle whose vertices run counter-clockwise around the normal that faces the
  camera (OpenCV axes, right-handed) has a *negative* signed area in ``(x, y)`` pixel
  coordinates (``y`` points down). With ``cull_backfaces=True`` the positive ones are dropped.
* Depth and barycentrics are interpolated linearly in screen space unless
  ``perspective_correct=True``, which interpolates ``1/z`` (exact for projected planar
  triangles) and returns perspective-correct barycentrics, i.e. the barycentric weights of the
  3D surface point seen through the pixel centre.

Algorithm: for every triangle, the integer bounding box of the pixel centres it can cover,
then per box row the x-span of the triangle (scanlines, widened by a pixel); (triangle, pixel)
candidate pairs are expanded with ``np.repeat``/``cumsum``; barycentrics come from per-face
affine edge functions (``w = w_row + A·dj`` along a row) and the inside test is exact on
them; pairs inside are z-buffered with ``np.minimum.at`` on the depth buffer (then on the face
index, to break exact ties), chunk by chunk; the winners' barycentrics are evaluated once.

Timing (2 shared CPU cores, numpy 2.4): 20k triangles of a closed head-sized mesh at 512²
≈ 55 ms, at 1024² ≈ 125 ms; a 20k-face UV layout at 256² ≈ 26 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from jaxtyping import Float, Int

__all__ = ["EDGE_EPS", "MeshRaster", "rasterize_triangles", "interpolate", "project_vertices"]

EDGE_EPS = 1e-7  # barycentric tolerance: centres this close outside an edge still count
_MIN_AREA2 = 1e-12  # |twice the signed pixel area| below this: degenerate, never drawn
DEFAULT_CHUNK = 1 << 20  # candidate (triangle, pixel) pairs processed at once (~100 MB peak)


@dataclass(frozen=True)
class MeshRaster:
    """Output of :func:`rasterize_triangles` (NumPy arrays).

    ``face_index`` (H, W) int32, ``-1`` where no triangle covers the pixel centre;
    ``bary`` (H, W, 3) float32 barycentric weights of the face's three corners (sum to 1,
    all zero on empty pixels); ``depth`` (H, W) float32 (``inf`` on empty pixels);
    ``faces`` (F, 3) int32, the triangles that were rasterized (so :func:`interpolate` can
    take per-vertex attributes).
    """

    face_index: Int[np.ndarray, "H W"]
    bary: Float[np.ndarray, "H W 3"]
    depth: Float[np.ndarray, "H W"]
    faces: Int[np.ndarray, "F 3"]

    @property
    def mask(self) -> np.ndarray:
        """(H, W) bool, True where some triangle covers the pixel."""
        return self.face_index >= 0


def _check(name: str, array: np.ndarray, ndim: int, last: tuple[int, ...], expected: str) -> None:
    if array.ndim != ndim or tuple(array.shape[ndim - len(last):]) != last:
        raise ValueError(f"{name}: expected shape {expected}, got {array.shape}")


def _face_setup(tri: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-face affine barycentric coefficients and twice the signed area.

    Returns ``A, B, C`` (F, 3) with ``w_k(x, y) = A[f, k] x + B[f, k] y + C[f, k]`` (the edge
    function opposite corner ``k`` over twice the area) and ``area2`` (F,) (the coefficients
    are meaningless where the area is ~0; such faces are never drawn).
    """
    x, y = tri[..., 0], tri[..., 1]
    area2 = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
    safe = np.where(np.abs(area2) > _MIN_AREA2, area2, 1.0)[:, None]
    a, b = [1, 2, 0], [2, 0, 1]  # edge (a, b) opposite corner k: w_k = cross(b - a, p - a) / area2
    ex, ey = x[:, b] - x[:, a], y[:, b] - y[:, a]
    return -ey / safe, ex / safe, (ey * x[:, a] - ex * y[:, a]) / safe, area2


def _expand(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For ``counts`` (n,): the owner ``r`` of each of ``sum(counts)`` items and its rank in ``r``."""
    owner = np.repeat(np.arange(counts.size), counts)
    rank = np.arange(owner.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return owner, rank


def rasterize_triangles(
    vertices: Float[np.ndarray, "V 3"],
    faces: Int[np.ndarray, "F 3"],
    height: int,
    width: int,
    *,
    cull_backfaces: bool = False,
    perspective_correct: bool = False,
    near: float | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> MeshRaster:
    """Rasterize triangles with a z-buffer; see the module docstring for conventions.

    Args:
      vertices: (V, 3) ``[x_pixel, y_pixel, depth]``.
      faces: (F, 3) vertex indices.
      height, width: image size in pixels.
      cull_backfaces: drop triangles with positive signed pixel area (facing away from an
        OpenCV camera when wound counter-clockwise around their outward normal).
      perspective_correct: interpolate ``1/depth`` and return perspective-correct
        barycentrics; faces with a corner at depth ``<= 0`` are then dropped.
      near: if given, faces with any corner depth ``< near`` are dropped (no clipping).
      chunk_size: number of candidate (triangle, pixel) pairs handled at once.

    Faces with non-finite corners or zero pixel area are never drawn.
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces)
    _check("vertices", v, 2, (3,), "(V, 3) [x_pixel, y_pixel, depth]")
    _check("faces", f, 2, (3,), "(F, 3)")
    if f.size and not np.issubdtype(f.dtype, np.integer):
        raise ValueError(f"faces: expected an integer array of shape (F, 3), got dtype {f.dtype}")
    if f.size and (f.min() < 0 or f.max() >= v.shape[0]):
        raise ValueError(f"faces: indices must lie in [0, {v.shape[0]}), got [{f.min()}, {f.max()}]")
    height, width = int(height), int(width)
    if height <= 0 or width <= 0:
        raise ValueError(f"height, width: expected positive image size, got {height}x{width}")
    f = f.astype(np.int32)

    tri = v[f]  # (F, 3, 3)
    with np.errstate(invalid="ignore", over="ignore"):  # non-finite faces are dropped below
        A, B, C, area2 = _face_setup(tri)
    keep = np.isfinite(tri).all(axis=(1, 2)) & np.isfinite(area2) & (np.abs(area2) > _MIN_AREA2)
    if cull_backfaces:
        keep &= area2 < 0
    if perspective_correct:
        keep &= (tri[..., 2] > 0).all(axis=1)
    if near is not None:
        keep &= (tri[..., 2] >= near).all(axis=1)
    # The depth key is affine in the pixel plane: z itself, or 1/z when perspective-correct.
    zq = 1.0 / np.where(keep[:, None], tri[..., 2], 1.0) if perspective_correct else tri[..., 2]
    with np.errstate(invalid="ignore", over="ignore"):
        zA, zB, zC = ((A * zq).sum(1), (B * zq).sum(1), (C * zq).sum(1))

    # Integer bounding boxes of the pixel centres each face can cover (inclusive).
    lo = np.where(keep[:, None], tri[:, :, :2].min(axis=1), 0.0)
    hi = np.where(keep[:, None], tri[:, :, :2].max(axis=1), -1.0)
    j0 = np.clip(np.ceil(lo[:, 0] - 0.5 - 1e-6), 0, width)
    j1 = np.clip(np.floor(hi[:, 0] - 0.5 + 1e-6), -1, width - 1)
    i0 = np.clip(np.ceil(lo[:, 1] - 0.5 - 1e-6), 0, height).astype(np.int64)
    i1 = np.clip(np.floor(hi[:, 1] - 0.5 + 1e-6), -1, height - 1).astype(np.int64)

    # Scanlines: one (face, row) item per row of the box, with the x-span of the triangle at
    # the row's centre widened by one pixel each side (the exact test comes per pixel below).
    rface, rank = _expand(np.maximum(i1 - i0 + 1, 0) * (j1 >= j0))
    ry = (i0[rface] + rank) + 0.5
    ra, rr = A[rface], B[rface] * ry[:, None] + C[rface]  # w_k = ra x + rr along the row
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = (-EDGE_EPS - rr) / ra
    xlo = np.where(ra > 0, bound, -np.inf).max(axis=1, initial=-np.inf)
    xhi = np.where(ra < 0, bound, np.inf).min(axis=1, initial=np.inf)
    xhi = np.where(((ra == 0) & (rr < -EDGE_EPS)).any(axis=1), -np.inf, xhi)
    rj0, rj1 = j0[rface], j1[rface]  # clip in float: the bounds may be ±inf
    jlo = np.clip(np.ceil(xlo - 0.5) - 1, rj0, rj1 + 1).astype(np.int64)
    jhi = np.clip(np.floor(xhi - 0.5) + 1, rj0 - 1, rj1).astype(np.int64)
    counts = np.maximum(jhi - jlo + 1, 0)
    w0 = ra * (jlo + 0.5)[:, None] + rr  # barycentrics at the first pixel of each row
    z0 = zA[rface] * (jlo + 0.5) + zB[rface] * ry + zC[rface]
    dz = zA[rface]
    pix0 = (ry - 0.5).astype(np.int64) * width + jlo
    ends = np.cumsum(counts)

    npix = height * width
    key_sign = -1.0 if perspective_correct else 1.0  # the key is z, or -1/z: minimised
    zbuf = np.full(npix, np.inf)
    fbuf = np.full(npix, -1, dtype=np.int32)
    start = 0
    while start < counts.size:
        base = ends[start] - counts[start]
        stop = max(int(np.searchsorted(ends, base + chunk_size, side="right")), start + 1)
        sl = slice(start, stop)
        start = stop
        row, dj = _expand(counts[sl])
        w = w0[sl][row] + ra[sl][row] * dj[:, None]
        inside = (w >= -EDGE_EPS).all(axis=1)
        row, dj = row[inside], dj[inside]
        key = key_sign * (z0[sl][row] + dz[sl][row] * dj)
        pix = pix0[sl][row] + dj
        # Nearest per pixel (exact depth ties -> lowest face index): a minimum over the depth
        # key, then over the faces of the pairs that reach it. Earlier chunks hold lower faces.
        prev = zbuf[pix]
        np.minimum.at(zbuf, pix, key)
        win = (key == zbuf[pix]) & (key < prev)
        pix, face = pix[win], rface[sl][row[win]]
        fbuf[pix] = np.iinfo(np.int32).max
        np.minimum.at(fbuf, pix, face.astype(np.int32))

    # Barycentrics of the winners, evaluated once per covered pixel.
    hit = np.flatnonzero(fbuf >= 0)
    fh = fbuf[hit]
    px, py = (hit % width + 0.5)[:, None], (hit // width + 0.5)[:, None]
    c = np.stack([A, B, C], axis=1)[fh]  # (P, 3 coefficients, 3 corners)
    w = np.clip(c[:, 0] * px + c[:, 1] * py + c[:, 2], 0.0, None)
    if perspective_correct:
        w *= zq[fh]
    w /= w.sum(axis=1, keepdims=True)
    bary = np.zeros((npix, 3), dtype=np.float32)
    bary[hit] = w
    depth = np.full(npix, np.inf, dtype=np.float32)
    depth[hit] = -1.0 / zbuf[hit] if perspective_correct else zbuf[hit]
    return MeshRaster(
        face_index=fbuf.reshape(height, width),
        bary=bary.reshape(height, width, 3),
        depth=depth.reshape(height, width),
        faces=f,
    )


def interpolate(
    attr: Float[np.ndarray, "V C"] | Float[np.ndarray, "F 3 C"], raster: MeshRaster
) -> Float[np.ndarray, "H W C"]:
    """Barycentric interpolation of an attribute over a :class:`MeshRaster`.

    ``attr`` is per vertex (V, C) — indexed through ``raster.faces`` — or per face corner
    (F, 3, C) (e.g. UV coordinates through ``ft``). Empty pixels get zeros. Float32 output
    for float inputs of at most 32 bits, float64 otherwise.
    """
    a = np.asarray(attr)
    nface = raster.faces.shape[0]
    if a.ndim == 2:
        corners = a[raster.faces]  # (F, 3, C)
    elif a.ndim == 3 and a.shape[:2] == (nface, 3):
        corners = a
    else:
        raise ValueError(f"attr: expected shape (V, C) or (F={nface}, 3, C), got {a.shape}")
    out_dtype = np.result_type(a.dtype, np.float32)
    mask = raster.face_index >= 0
    out = np.zeros(raster.face_index.shape + (a.shape[-1],), dtype=out_dtype)
    fi = raster.face_index[mask]
    out[mask] = np.einsum("pk,pkc->pc", raster.bary[mask].astype(out_dtype), corners[fi].astype(out_dtype))
    return out


def project_vertices(
    vertices_world: Float[np.ndarray, "V 3"], viewmat: Float[np.ndarray, "4 4"], K: Float[np.ndarray, "3 3"]
) -> Float[np.ndarray, "V 3"]:
    """Pinhole projection to ``[u, v, z]`` ready for :func:`rasterize_triangles` (float64).

    ``viewmat`` is world→camera in OpenCV axes; ``u = (K p)_x / z`` i.e. ``fx·x/z + s·y/z + cx``,
    likewise ``v``; ``z`` is the camera-space depth. Continuous coordinates: the centre of
    pixel ``(i, j)`` is ``(u, v) = (j + 0.5, i + 0.5)``. Points at ``z = 0`` give non-finite
    ``u, v`` (their faces are then skipped by the rasterizer); use ``near`` there to drop faces
    behind the camera.
    """
    p = np.asarray(vertices_world, dtype=np.float64)
    vm = np.asarray(viewmat, dtype=np.float64)
    k = np.asarray(K, dtype=np.float64)
    _check("vertices_world", p, 2, (3,), "(V, 3)")
    _check("viewmat", vm, 2, (4, 4), "(4, 4)")
    _check("K", k, 2, (3, 3), "(3, 3)")
    cam = p @ vm[:3, :3].T + vm[:3, 3]
    z = cam[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        xy = cam[:, :2] / z[:, None]
    uv = xy @ k[:2, :2].T + k[:2, 2]
    return np.concatenate([uv, z[:, None]], axis=1)
