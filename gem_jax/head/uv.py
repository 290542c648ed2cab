"""UV-space machinery: texel rasterization, position/normal maps and per-texel TBN frames.

The teacher (docs/architecture.md §5) works on maps in the UV layout of the head mesh: every valid texel is
one Gaussian, placed by the canonical *position map*, oriented by per-texel *TBN frames*, and
conditioned on the *normal/position map* of the tracked mesh.

Conventions:

* The UV layout is rasterized once, in NumPy (:func:`rasterize_uv`), into a :class:`UVRaster`
  of resolution ``R``: texel ``(i, j)`` (row ``i``, column ``j``) has its centre at
  ``(u, v) = ((j + 0.5) / R, (i + 0.5) / R)``. **No v flip**: row ``i`` grows with ``v``, so a
  map shown as an image has ``v = 0`` at the top. Texels whose centre lies inside or on the edge
  of a UV triangle are valid; where UV triangles overlap the lowest face index wins.
* Everything else is ``jax.numpy`` (jittable, differentiable w.r.t. the vertices), with the
  :class:`UVRaster` arrays as constants (close over it, or pass it through ``jit`` — it is a
  pytree). Functions take one mesh; ``jax.vmap`` them over frames.
* Invalid texels get zeros in the position and normal maps and the identity in the TBN frames.
* Normals are area-weighted vertex normals of the triangle winding (counter-clockwise around
  the outward normal).
* TBN (:func:`tbn_frames`): the tangent is the direction of increasing ``u`` on the texel's
  face (the standard UV-gradient tangent, Lengyel 2001), Gram–Schmidt orthogonalised against
  the interpolated normal ``N``; the bitangent is ``B = N × T``, so ``[T | B | N]`` is always a
  proper rotation (``det = +1``) — on mirrored UV islands ``B`` points along ``−∂p/∂v``.
  Degenerate UV or mesh triangles fall back to the face's first edge, then to a fixed axis;
  nothing produces NaNs (values or gradients).
* **Texels on faces without area are not Gaussians** (:func:`degenerate_faces`,
  :func:`drop_faces`). A face whose 3D area on the reference (canonical) mesh is below
  ``1e-4 ×`` the median face area has no normal: its frame would be set by float rounding (a
  1e-6 nudge of the mesh turns it by up to 180°, and two x86-64 CPUs that round differently
  disagree). The teacher drops such texels from its layout once, from the canonical mesh; on
  every remaining texel the frame is a Lipschitz function of the vertices with a constant set
  by the shortest edge around it (``tests/test_uv.py``, ``test_frames_are_well_conditioned…``).
  On the synthetic head these are the rows of the mouth fold that coincide outside the mouth
  (10 % of the texels of a 64² layout); a FLAME template has none.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from gem_jax.head.meshraster import rasterize_triangles

__all__ = [
    "UVRaster",
    "rasterize_uv",
    "texel_centers",
    "face_normals",
    "vertex_normals",
    "face_tangents",
    "texel_face_vertices",
    "position_map",
    "normal_map",
    "tbn_frames",
    "degenerate_faces",
    "drop_faces",
]

#: Faces with less than this fraction of the median face area have no usable normal.
DEGENERATE_AREA = 1e-4

_TINY = 1e-20  # squared norms below this are "zero" for the safe normalisations


@flax.struct.dataclass
class UVRaster:
    """A rasterized UV layout: per texel the covering face and its barycentrics.

    ``face_index`` (R, R) int32 (``-1`` where invalid), ``bary`` (R, R, 3) float32 (sum to 1 on
    valid texels, zeros elsewhere), ``valid`` (R, R) bool.
    """

    face_index: Int[Array, "R R"]
    bary: Float[Array, "R R 3"]
    valid: Bool[Array, "R R"]

    @property
    def resolution(self) -> int:
        return int(np.shape(self.face_index)[0])


def texel_centers(resolution: int) -> Float[np.ndarray, "R R 2"]:
    """UV coordinates ``(u, v) = ((j + 0.5) / R, (i + 0.5) / R)`` of every texel (float64)."""
    c = (np.arange(resolution) + 0.5) / resolution
    return np.stack(np.meshgrid(c, c, indexing="xy"), axis=-1)


def rasterize_uv(vt: Float[np.ndarray, "Vt 2"], ft: Int[np.ndarray, "F 3"], resolution: int) -> UVRaster:
    """Rasterize the UV triangles ``vt[ft]`` (``vt`` in ``[0, 1]``) into an ``R × R`` texel grid."""
    vt = np.asarray(vt, dtype=np.float64)
    ft = np.asarray(ft)
    if vt.ndim != 2 or vt.shape[1] != 2:
        raise ValueError(f"vt: expected shape (Vt, 2), got {vt.shape}")
    if ft.ndim != 2 or ft.shape[1] != 3:
        raise ValueError(f"ft: expected shape (F, 3), got {ft.shape}")
    if int(resolution) <= 0:
        raise ValueError(f"resolution: expected a positive integer, got {resolution}")
    res = int(resolution)
    verts = np.concatenate([vt * res, np.zeros((vt.shape[0], 1))], axis=1)
    raster = rasterize_triangles(verts, ft, res, res)
    return UVRaster(face_index=raster.face_index, bary=raster.bary, valid=raster.face_index >= 0)


def degenerate_faces(
    vertices: Float[np.ndarray, "V 3"], faces: Int[np.ndarray, "F 3"], rel_area: float = DEGENERATE_AREA
) -> Bool[np.ndarray, "F"]:
    """Faces whose 3D area is below ``rel_area ×`` the median face area (float64 NumPy).

    Such a face (two corners coincide, or all three are collinear) has no normal; its frame
    would be fixed by rounding (module docstring).
    """
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices: expected shape (V, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"faces: expected shape (F, 3), got {f.shape}")
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    return area <= rel_area * float(np.median(area))


def drop_faces(uv: UVRaster, drop: Bool[np.ndarray, "F"]) -> UVRaster:
    """``uv`` without the texels covered by the faces in ``drop`` (they become invalid texels)."""
    face = np.asarray(uv.face_index)
    drop = np.asarray(drop, bool)
    gone = (face >= 0) & drop[np.maximum(face, 0)]
    return UVRaster(face_index=np.where(gone, -1, face).astype(face.dtype),
                    bary=np.where(gone[..., None], 0.0, np.asarray(uv.bary)).astype(np.asarray(uv.bary).dtype),
                    valid=np.asarray(uv.valid) & ~gone)


def _check_mesh(vertices: Array, faces: Array) -> None:
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices: expected shape (V, 3), got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces: expected shape (F, 3), got {faces.shape}")


def _safe_normalize(x: Array, fallback: Array) -> tuple[Array, Array]:
    """``x / |x|`` along the last axis, ``fallback`` where ``|x|² < _TINY``; also returns the mask.

    Double ``where``, so the gradient is finite (zero through the fallback branch).
    """
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    ok = sq > _TINY
    unit = x / jnp.sqrt(jnp.where(ok, sq, 1.0))
    return jnp.where(ok, unit, fallback), ok[..., 0]


def _rel_normalize(x: Array, ref: Array) -> tuple[Array, Array]:
    """Normalise ``x``; flagged degenerate when ``|x|² ≤ 1e-8 |ref|²`` (or tiny)."""
    sq = jnp.sum(x * x, axis=-1)
    ref_sq = jnp.sum(ref * ref, axis=-1)
    ok = (sq > 1e-8 * ref_sq) & (sq > _TINY)
    unit = x / jnp.sqrt(jnp.where(ok, sq, 1.0))[..., None]
    return jnp.where(ok[..., None], unit, 0.0), ok


def face_normals(vertices: Float[Array, "V 3"], faces: Int[Array, "F 3"]) -> Float[Array, "F 3"]:
    """Unnormalised face normals ``(p1 − p0) × (p2 − p0)`` (length = twice the area)."""
    vertices, faces = jnp.asarray(vertices), jnp.asarray(faces)
    _check_mesh(vertices, faces)
    p = vertices[faces]
    return jnp.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])


def vertex_normals(vertices: Float[Array, "V 3"], faces: Int[Array, "F 3"]) -> Float[Array, "V 3"]:
    """Unit area-weighted vertex normals; ``(0, 0, 1)`` for vertices with no (non-degenerate) face."""
    vertices, faces = jnp.asarray(vertices), jnp.asarray(faces)
    fn = face_normals(vertices, faces)
    acc = jnp.zeros_like(vertices).at[faces.reshape(-1)].add(jnp.repeat(fn, 3, axis=0))
    return _safe_normalize(acc, jnp.array([0.0, 0.0, 1.0], vertices.dtype))[0]


def face_tangents(
    vertices: Float[Array, "V 3"], faces: Int[Array, "F 3"], vt: Float[Array, "Vt 2"], ft: Int[Array, "F 3"]
) -> Float[Array, "F 3"]:
    """Unnormalised per-face UV tangents ``∂p/∂u`` (times ``|det|`` of the UV edge matrix).

    With edges ``e1 = p1 − p0``, ``e2 = p2 − p0`` and UV edges ``(du1, dv1)``, ``(du2, dv2)``:
    ``T = (e1·dv2 − e2·dv1) · sign(du1·dv2 − du2·dv1)``. Zero for degenerate UV triangles.
    """
    vertices, faces = jnp.asarray(vertices), jnp.asarray(faces)
    vt, ft = jnp.asarray(vt, vertices.dtype), jnp.asarray(ft)
    _check_mesh(vertices, faces)
    if vt.ndim != 2 or vt.shape[1] != 2:
        raise ValueError(f"vt: expected shape (Vt, 2), got {vt.shape}")
    if ft.shape != faces.shape:
        raise ValueError(f"ft: expected shape (F, 3) = {faces.shape} like faces, got {ft.shape}")
    p, t = vertices[faces], vt[ft]
    e1, e2 = p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]
    d1, d2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    det = d1[:, 0] * d2[:, 1] - d2[:, 0] * d1[:, 1]
    return (e1 * d2[:, 1:2] - e2 * d1[:, 1:2]) * jnp.sign(det)[:, None]


def _texel_faces(uv: UVRaster) -> Int[Array, "R R"]:
    return jnp.where(jnp.asarray(uv.valid), jnp.asarray(uv.face_index), 0)


def texel_face_vertices(
    attr: Float[Array, "V C"], faces: Int[Array, "F 3"], uv: UVRaster
) -> Float[Array, "R R 3 C"]:
    """Per texel, the per-vertex ``attr`` at the three corners of its face (face 0 when invalid)."""
    attr, faces = jnp.asarray(attr), jnp.asarray(faces)
    if attr.ndim != 2:
        raise ValueError(f"attr: expected shape (V, C), got {attr.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces: expected shape (F, 3), got {faces.shape}")
    return attr[faces[_texel_faces(uv)]]


def _interp(corners: Array, uv: UVRaster) -> Array:
    bary = jnp.asarray(uv.bary, corners.dtype)
    return jnp.einsum("ijk,ijkc->ijc", bary, corners)


def position_map(vertices: Float[Array, "V 3"], faces: Int[Array, "F 3"], uv: UVRaster) -> Float[Array, "R R 3"]:
    """Barycentric interpolation of the mesh surface at every texel; zeros at invalid texels."""
    vertices = jnp.asarray(vertices)
    _check_mesh(vertices, jnp.asarray(faces))
    pos = _interp(texel_face_vertices(vertices, faces, uv), uv)
    return jnp.where(jnp.asarray(uv.valid)[..., None], pos, 0.0)


def _normal_map_and_fallback(vertices: Array, faces: Array, uv: UVRaster) -> Array:
    vertices, faces = jnp.asarray(vertices), jnp.asarray(faces)
    _check_mesh(vertices, faces)
    up = jnp.array([0.0, 0.0, 1.0], vertices.dtype)
    fn = _safe_normalize(face_normals(vertices, faces), up)[0][_texel_faces(uv)]
    n = _interp(texel_face_vertices(vertex_normals(vertices, faces), faces, uv), uv)
    return _safe_normalize(n, fn)[0]  # cancelling vertex normals: the face normal


def normal_map(vertices: Float[Array, "V 3"], faces: Int[Array, "F 3"], uv: UVRaster) -> Float[Array, "R R 3"]:
    """Interpolated vertex normals, renormalised (unit on valid texels, zeros elsewhere)."""
    n = _normal_map_and_fallback(vertices, faces, uv)
    return jnp.where(jnp.asarray(uv.valid)[..., None], n, 0.0)


def _orthogonal(v: Array, n: Array) -> Array:
    return v - jnp.sum(v * n, axis=-1, keepdims=True) * n


def tbn_frames(
    vertices: Float[Array, "V 3"],
    faces: Int[Array, "F 3"],
    vt: Float[Array, "Vt 2"],
    ft: Int[Array, "F 3"],
    uv: UVRaster,
) -> Float[Array, "R R 3 3"]:
    """Per-texel rotations whose columns are tangent, bitangent and normal (module docstring).

    ``N`` equals :func:`normal_map` on valid texels; invalid texels get the identity.
    Rigid motions ``p ↦ Rp + t`` of the mesh map every frame ``F ↦ R F``.
    """
    vertices = jnp.asarray(vertices)
    n = _normal_map_and_fallback(vertices, faces, uv)
    faces = jnp.asarray(faces)
    tex_faces = _texel_faces(uv)
    t_face = face_tangents(vertices, faces, vt, ft)[tex_faces]
    p = vertices[faces[tex_faces]]
    edge = p[..., 1, :] - p[..., 0, :]
    # Fallback axis: whichever of x / y is less aligned with N (never parallel to it).
    axis = jnp.where(
        (jnp.abs(n[..., 0]) < 0.9)[..., None],
        jnp.array([1.0, 0.0, 0.0], vertices.dtype),
        jnp.array([0.0, 1.0, 0.0], vertices.dtype),
    )
    t_axis = _safe_normalize(_orthogonal(axis, n), axis)[0]
    # Relative thresholds: a tangent nearly parallel to N is as degenerate as a zero one.
    t_edge, ok_edge = _rel_normalize(_orthogonal(edge, n), edge)
    t_uv, ok_uv = _rel_normalize(_orthogonal(t_face, n), t_face)
    t = jnp.where(ok_uv[..., None], t_uv, jnp.where(ok_edge[..., None], t_edge, t_axis))
    b = jnp.cross(n, t)
    frames = jnp.stack([t, b, n], axis=-1)
    eye = jnp.eye(3, dtype=vertices.dtype)
    return jnp.where(jnp.asarray(uv.valid)[..., None, None], frames, eye)

