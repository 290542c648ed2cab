"""Gaussian maps ↔ Gaussians, and their deformation to a tracked frame (docs/architecture.md §5).

The teacher predicts *maps* in the UV layout of the head mesh; every valid texel of the
:class:`~gem_jax.head.uv.UVRaster` is one Gaussian. This module holds the pure functions
around that network (GEM §3.1, following Animatable Gaussians, Li et al. 2024, §3):

1. :func:`canonical_gaussians` — the per-texel *canonical* Gaussians of the canonical mesh
   (neutral expression, jaw slightly open): position ``P₀`` from the position map, rotation
   ``R₀`` = the per-texel TBN frame (columns tangent, bitangent, normal), scales from the
   spacing of neighbouring texels, opacity 0.7.
2. :func:`activate` — raw network maps → canonical Gaussians, with the activations

   ======== ============================================================================
   position ``x_c = P₀ + Δ``,  ``Δ = delta_scale · raw_Δ``           (root-free coordinates)
   rotation ``R_c = R₀ · R(q)``,  ``q = normalize((1,0,0,0) + raw_q)``  (local in the TBN frame)
   scale    ``s = s₀ · exp(3 · tanh(raw_s / 3))``                 (at most ×e³ of the init)
   opacity  ``o = sigmoid(raw_o + logit(0.7))``
   colour   ``c = sigmoid(raw_c)``
   ======== ============================================================================

   so raw maps of zero give exactly the canonical Gaussians (and mid-grey colour);
   :func:`deactivate` is the inverse (round trip).
3. :func:`deform` — per-texel rigid transform to the tracked mesh (root pose removed):
   ``x_t = R_t R₀ᵀ (x_c − P₀) + P_t`` and ``R_g ↦ R_t R₀ᵀ R_g``, where ``(P_t, R_t)`` are the
   position and TBN frame of the same texel on the tracked mesh ("deformed frame ∘
   canonical⁻¹"). A rigidly moved mesh therefore moves the Gaussians rigidly.
4. :func:`rigid_transform` — the head's root transform (world ← root-free), applied last.

Everything but :func:`texel_layout` (NumPy, once per subject) is ``jax.numpy``, jittable and
differentiable; rotations are wxyz quaternions (gsplat's layout, :class:`~gem_jax.types.Gaussians`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from gem_jax.head.flame import joint_transforms, lbs
from gem_jax.head.uv import UVRaster, position_map, tbn_frames
from gem_jax.rigid import quat_multiply, rigid_transform, rotmat_to_quat  # noqa: F401 (re-exported)
from gem_jax.types import Gaussians

__all__ = [
    "INIT_OPACITY",
    "RAW_CHANNELS",
    "Canonical",
    "SurfaceFrames",
    "activate",
    "canonical_gaussians",
    "deactivate",
    "deform",
    "map_from_texels",
    "neighbour_spacing",
    "quat_multiply",
    "rigid_transform",
    "root_free_mesh",
    "rotmat_to_quat",
    "surface_frames",
    "texel_layout",
    "texels_from_map",
]

INIT_OPACITY = 0.7
SCALE_RANGE = 3.0  # log-scale offsets are soft-clamped to ±SCALE_RANGE
#: Channels of the raw geometry maps, in order (the network's output layout).
RAW_CHANNELS = {"delta": 3, "rotation": 4, "scale": 3, "opacity": 1}


# ----------------------------------------------------------------------------- layout


def texel_layout(uv: UVRaster) -> Int[np.ndarray, "N"]:
    """Flat indices ``i·R + j`` of the valid texels (row-major), the order of every Gaussian."""
    return np.flatnonzero(np.asarray(uv.valid).reshape(-1)).astype(np.int32)


def texels_from_map(maps: Float[Array, "*b R R C"], texels: Int[Array, "N"]) -> Float[Array, "*b N C"]:
    """Gather the valid texels of ``maps`` (any leading batch dimensions)."""
    r = maps.shape[-3]
    flat = maps.reshape(maps.shape[:-3] + (r * maps.shape[-2], maps.shape[-1]))
    return jnp.take(flat, jnp.asarray(texels), axis=-2)


def map_from_texels(values: Float[Array, "*b N C"], texels: Int[Array, "N"], resolution: int,
                    fill: float = 0.0) -> Float[Array, "*b R R C"]:
    """Scatter per-texel values back into ``R × R`` maps (``fill`` at invalid texels)."""
    batch, c = values.shape[:-2], values.shape[-1]
    flat = jnp.full(batch + (resolution * resolution, c), fill, values.dtype)
    flat = flat.at[..., jnp.asarray(texels), :].set(values)
    return flat.reshape(batch + (resolution, resolution, c))


# ----------------------------------------------------------------------------- rotations


# ----------------------------------------------------------------------------- canonical


@flax.struct.dataclass
class SurfaceFrames:
    """Per-texel surface samples of one mesh: positions ``(N,3)`` and TBN rotations ``(N,3,3)``."""

    positions: Float[Array, "N 3"]
    frames: Float[Array, "N 3 3"]


def surface_frames(vertices: Float[Array, "V 3"], faces: Int[Array, "F 3"], vt: Float[Array, "Vt 2"],
                   ft: Int[Array, "F 3"], uv: UVRaster, texels: Int[Array, "N"]) -> SurfaceFrames:
    """Position map and TBN frames of ``vertices`` at the valid texels (jittable)."""
    pos = texels_from_map(position_map(vertices, faces, uv), texels)
    tbn = tbn_frames(vertices, faces, vt, ft, uv)
    r = tbn.shape[0]
    frames = jnp.take(tbn.reshape(r * r, 3, 3), jnp.asarray(texels), axis=0)
    return SurfaceFrames(positions=pos, frames=frames)


def neighbour_spacing(positions: Float[np.ndarray, "R R 3"], valid: np.ndarray) -> Float[np.ndarray, "R R 2"]:
    """Mean 3D distance from each valid texel to its valid neighbours along ``u`` and along ``v``.

    A direction without valid neighbours takes the other direction's value; a texel with none
    at all takes the median spacing; spacings are floored at a quarter of the median (UV poles
    and seams, where neighbouring texels coincide in 3D). NumPy (once per subject); zeros at invalid texels.
    """
    p, ok = np.asarray(positions, np.float64), np.asarray(valid, bool)
    out = []
    for axis in (1, 0):  # u runs along columns (axis 1), v along rows (axis 0)
        total, count = np.zeros(ok.shape), np.zeros(ok.shape)
        for shift in (1, -1):
            q, qok = np.roll(p, shift, axis), np.roll(ok, shift, axis)
            edge = np.zeros_like(ok)  # no wrap-around across the map border
            index = [slice(None), slice(None)]
            index[axis] = 0 if shift == 1 else -1
            edge[tuple(index)] = True
            both = ok & qok & ~edge
            total += np.where(both, np.linalg.norm(p - q, axis=-1), 0.0)
            count += both
        out.append(np.where(count > 0, total / np.maximum(count, 1), np.nan))
    su, sv = out
    su, sv = np.where(np.isnan(su), sv, su), np.where(np.isnan(sv), su, sv)
    both = np.stack([su, sv], -1)
    good = np.isfinite(both) & (both > 0) & ok[..., None]
    median = float(np.median(both[good])) if good.any() else 1e-2
    # Collapsed neighbours (UV poles, seams) would give needle-thin splats: floor at median / 4.
    both = np.where(good, np.maximum(both, 0.25 * median), median)
    return np.where(ok[..., None], both, 0.0).astype(np.float32)


@flax.struct.dataclass
class Canonical:
    """The canonical Gaussians of a subject (docs/architecture.md §5), one per valid texel.

    ``positions`` P₀ and ``frames`` R₀ (TBN) of the canonical mesh, ``quats`` = quat(R₀),
    ``scales`` s₀ from :func:`neighbour_spacing`; ``texels`` the flat texel indices;
    ``resolution`` R of the maps.
    """

    positions: Float[Array, "N 3"]
    frames: Float[Array, "N 3 3"]
    quats: Float[Array, "N 4"]
    scales: Float[Array, "N 3"]
    texels: Int[Array, "N"]
    resolution: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def num(self) -> int:
        return int(self.positions.shape[0])


def canonical_gaussians(vertices: Float[np.ndarray, "V 3"], faces: Int[np.ndarray, "F 3"],
                        vt: Float[np.ndarray, "Vt 2"], ft: Int[np.ndarray, "F 3"], uv: UVRaster,
                        scale_factor: float = 0.6, normal_ratio: float = 0.5) -> Canonical:
    """Canonical Gaussians of the canonical mesh ``vertices`` (module docstring, step 1).

    Scales along T and B are ``scale_factor`` × the neighbour spacing along ``u`` and ``v``;
    along N, ``normal_ratio`` × the smaller of the two (flat splats on the surface).
    """
    texels = texel_layout(uv)
    if texels.size == 0:
        raise ValueError("canonical_gaussians: the UV raster has no valid texel (check vt/ft and the resolution)")

    @jax.jit  # one compilation instead of dozens of eager ops
    def geometry(verts):
        surf = surface_frames(verts, faces, vt, ft, uv, texels)
        return surf, rotmat_to_quat(surf.frames), position_map(verts, faces, uv)

    surf, quats, pmap = geometry(jnp.asarray(vertices, jnp.float32))
    pmap = np.asarray(pmap)
    spacing = neighbour_spacing(pmap, np.asarray(uv.valid)).reshape(-1, 2)[texels]
    s_tb = scale_factor * spacing
    scales = np.concatenate([s_tb, normal_ratio * s_tb.min(-1, keepdims=True)], -1).astype(np.float32)
    return Canonical(positions=surf.positions, frames=surf.frames, quats=quats,
                     scales=jnp.asarray(scales), texels=jnp.asarray(texels), resolution=uv.resolution)


# ----------------------------------------------------------------------------- activations


def split_raw(raw: Float[Array, "*b N 11"]) -> dict[str, Array]:
    """Split raw geometry texels into the :data:`RAW_CHANNELS` fields."""
    if raw.shape[-1] != sum(RAW_CHANNELS.values()):
        raise ValueError(f"raw geometry: expected {sum(RAW_CHANNELS.values())} channels "
                         f"{RAW_CHANNELS}, got shape {raw.shape}")
    out, start = {}, 0
    for name, width in RAW_CHANNELS.items():
        out[name] = raw[..., start:start + width]
        start += width
    return out


def activate(raw: Float[Array, "N 11"], raw_color: Float[Array, "N 3"], canonical: Canonical,
             delta_scale: float) -> tuple[Gaussians, Float[Array, "N 3"]]:
    """Raw per-texel outputs → canonical Gaussians (activations in the module docstring).

    Returns ``(gaussians, delta)``; ``delta`` (N,3) is the position offset Δ in scene units
    (regularised by the teacher loss).
    """
    parts = split_raw(raw)
    delta = delta_scale * parts["delta"]
    local = parts["rotation"] + jnp.array([1.0, 0.0, 0.0, 0.0], raw.dtype)
    local = local / jnp.sqrt(jnp.maximum(jnp.sum(local * local, -1, keepdims=True), 1e-12))
    log_s = SCALE_RANGE * jnp.tanh(parts["scale"] / SCALE_RANGE)
    logit0 = float(np.log(INIT_OPACITY / (1.0 - INIT_OPACITY)))
    g = Gaussians(
        means=canonical.positions + delta,
        quats=quat_multiply(canonical.quats, local),
        scales=canonical.scales * jnp.exp(log_s),
        opacities=jax.nn.sigmoid(parts["opacity"][..., 0] + logit0),
        colors=jax.nn.sigmoid(raw_color),
    )
    return g, delta


def _logit(p):
    p = jnp.clip(p, 1e-6, 1.0 - 1e-6)
    return jnp.log(p) - jnp.log1p(-p)


def deactivate(gaussians: Gaussians, canonical: Canonical, delta_scale: float
               ) -> tuple[Float[Array, "N 11"], Float[Array, "N 3"]]:
    """The inverse of :func:`activate`: raw ``(geometry (N,11), colour (N,3))`` maps.

    Needs scales within ``s₀·exp(±3)`` (open interval) and colours/opacities in (0, 1).
    """
    delta = (gaussians.means - canonical.positions) / delta_scale
    local = quat_multiply(canonical.quats * jnp.array([1.0, -1.0, -1.0, -1.0]), gaussians.quats)
    local = local / jnp.linalg.norm(local, axis=-1, keepdims=True)
    local = jnp.where(local[..., :1] < 0, -local, local)
    # activate() normalises raw + (1,0,0,0), so every λ·local − (1,0,0,0) with λ > 0 maps back to
    # `local`; λ = 1/w gives the one with raw_w = 0 (needs w > 0: local rotations below 180°).
    raw_q = local / local[..., :1] - jnp.array([1.0, 0.0, 0.0, 0.0])
    ratio = jnp.log(gaussians.scales / canonical.scales) / SCALE_RANGE
    raw_s = SCALE_RANGE * jnp.arctanh(jnp.clip(ratio, -1 + 1e-7, 1 - 1e-7))
    logit0 = float(np.log(INIT_OPACITY / (1.0 - INIT_OPACITY)))
    raw_o = (_logit(gaussians.opacities) - logit0)[..., None]
    raw = jnp.concatenate([delta, raw_q, raw_s, raw_o], -1)
    return raw, _logit(gaussians.colors)


# ----------------------------------------------------------------------------- deformation


def deform(gaussians: Gaussians, canonical: Canonical, tracked: SurfaceFrames) -> Gaussians:
    """Per-texel rigid transform from the canonical to the tracked mesh (module docstring, 3).

    ``x_t = R_t R₀ᵀ (x_c − P₀) + P_t``; rotations are left-multiplied by ``R_t R₀ᵀ``.
    Scales, opacities and colours are unchanged.
    """
    rel = jnp.einsum("nij,nkj->nik", tracked.frames, canonical.frames)  # R_t R₀ᵀ
    means = jnp.einsum("nij,nj->ni", rel, gaussians.means - canonical.positions) + tracked.positions
    quats = quat_multiply(rotmat_to_quat(rel), gaussians.quats)
    return gaussians.replace(means=means, quats=quats)


def root_free_mesh(model, params) -> tuple[Float[Array, "V 3"], Float[Array, "4 4"]]:
    """Tracked vertices with the root pose removed, and the root transform (world ← root-free).

    With FLAME's root transform ``G₀`` (rotation about the root joint, plus the translation),
    every posed vertex is ``Σ_j w_j G_j v`` with ``G_j = G₀ · G₀⁻¹G_j``, so ``G₀⁻¹ v_posed`` is
    the mesh in the head's own frame; ``G₀`` is what :func:`rigid_transform` applies last.
    """
    verts, _ = lbs(model, params)
    root = joint_transforms(model, params)[0]
    return (verts - root[:3, 3]) @ root[:3, :3], root
