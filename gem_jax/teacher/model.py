"""The teacher avatar as pure functions: constants, forward pass, canonical Gaussians (docs/architecture.md §5).

    consts = build_constants(head_model, canonical_params, config.teacher)   # once per subject
    net = make_net(config.teacher)
    params = init_params(net, config.teacher, key)
    gaussians, delta = forward(net, params, consts, vertices, style, ForwardSpec.from_config(config.teacher))
    world = jax.vmap(rigid_transform)(gaussians, roots)                       # head pose, last

*Inputs per frame* are the tracked mesh with the root pose removed (``vertices (V,3)``,
:func:`gem_jax.teacher.maps.root_free_mesh`) and the root transform. The geometry branch sees
the pose maps of that mesh (:func:`pose_maps`: normal map and/or the displacement of the
position map from the canonical one, scaled by ``1/position_input_scale``); the colour branch
sees the canonical position map only (normalised to the head's bounding box).

What the ``collect`` stage distils (docs/architecture.md §1, §6) — the teacher at the test-time
style ``z = 0`` (:func:`canonical_gaussians_fn`):

    g = canonical_gaussians_fn(net, spec)(params, consts, vertices)    # vertices (B, V, 3)
    g.means (B,N,3), g.quats (B,N,4) wxyz, g.scales (B,N,3), g.opacities (B,N), g.colors (B,N,3)

``N`` is the number of valid UV texels (``consts.canonical.texels`` gives their flat indices in
the ``R×R`` map). The values are *activated* Gaussians in the head's own frame: expression,
jaw, neck and eyes applied through the per-texel TBN deformation of the tracked mesh, **root
pose removed** (world = ``rigid_transform(·, root)``). Colour is static (it depends on the
canonical mesh only).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gem_jax.head.flame import FlameParams, HeadModel
from gem_jax.head.uv import UVRaster, degenerate_faces, drop_faces, normal_map, position_map, rasterize_uv
from gem_jax.teacher import maps
from gem_jax.teacher.unet import TeacherNet
from gem_jax.types import Gaussians

__all__ = ["ForwardSpec", "TeacherConstants", "build_constants", "canonical_gaussians_fn", "forward", "init_params",
           "make_net", "pose_maps", "world_gaussians_fn"]

POSE_INPUTS = ("normal", "position")


@flax.struct.dataclass
class TeacherConstants:
    """Per-subject constant arrays of the teacher (a pytree: pass it *into* jitted functions)."""

    canonical: maps.Canonical
    uv: UVRaster
    faces: Array  # (F, 3) int32
    vt: Array  # (Vt, 2)
    ft: Array  # (F, 3) int32
    canonical_position_map: Float[Array, "R R 3"]  # P₀ at every texel (zeros where invalid)
    color_input: Float[Array, "R R 3"]  # canonical positions, normalised to the head's box


@dataclasses.dataclass(frozen=True)
class ForwardSpec:
    """The hashable part of ``config.teacher`` that the forward pass reads (a static jit argument)."""

    inputs: tuple[str, ...]
    position_input_scale: float
    delta_scale: float
    style_dim: int

    @classmethod
    def from_config(cls, tconfig) -> "ForwardSpec":
        names = tuple(n.strip() for n in str(tconfig.inputs).split(",") if n.strip())
        if not names or any(n not in POSE_INPUTS for n in names) or len(set(names)) != len(names):
            raise ValueError(f"teacher.inputs: expected a comma-separated subset of {POSE_INPUTS}, "
                             f"got {tconfig.inputs!r}")
        return cls(names, float(tconfig.position_input_scale), float(tconfig.delta_scale),
                   int(tconfig.unet.style_dim))

    @property
    def pose_channels(self) -> int:
        return 3 * len(self.inputs)


def build_constants(model: HeadModel, canonical_params: FlameParams, tconfig) -> TeacherConstants:
    """UV raster, canonical Gaussians and input maps of a subject (NumPy/eager; once)."""
    if model.vt is None or model.ft is None:
        raise ValueError("teacher: the head model has no UV layout (fields 'vt'/'ft'); the teacher needs one")
    res = int(tconfig.uv_resolution)
    levels = len(tconfig.unet.channels)
    if res % (1 << (levels - 1)) or res % (1 << (len(tconfig.unet.color_channels) - 1)):
        raise ValueError(f"teacher.uv_resolution={res} must be divisible by 2^(levels-1) of teacher.unet.channels")
    params = jax.tree.map(jnp.asarray, canonical_params)
    verts, _ = jax.jit(lambda p: maps.root_free_mesh(model, p))(params)  # the model is closed over: its
    # static fields (faces, UVs) are arrays, which jit cannot hash
    verts = np.asarray(verts)
    # Texels on faces without area on the canonical mesh have no frame (gem_jax.head.uv).
    uv = drop_faces(rasterize_uv(model.vt, model.ft, res), degenerate_faces(verts, model.faces))
    canonical = maps.canonical_gaussians(verts, model.faces, model.vt, model.ft, uv,
                                         float(tconfig.scale_factor), float(tconfig.normal_ratio))
    pmap = np.asarray(jax.jit(lambda v: position_map(v, model.faces, uv))(jnp.asarray(verts)))
    lo, hi = verts.min(0), verts.max(0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6)
    color_input = np.where(np.asarray(uv.valid)[..., None], (pmap - centre) / half, 0.0).astype(np.float32)
    return TeacherConstants(
        canonical=canonical, uv=jax.tree.map(jnp.asarray, uv), faces=jnp.asarray(model.faces),
        vt=jnp.asarray(model.vt), ft=jnp.asarray(model.ft),
        canonical_position_map=jnp.asarray(pmap), color_input=jnp.asarray(color_input))


def make_net(tconfig) -> TeacherNet:
    u = tconfig.unet
    return TeacherNet(resolution=int(tconfig.uv_resolution), channels=tuple(u.channels),
                      color_channels=tuple(u.color_channels), feature_channels=int(u.feature_channels),
                      style_dim=int(u.style_dim))


def init_params(net: TeacherNet, tconfig, key: Array) -> dict:
    """Network parameters (output layers zero: the untrained teacher is the canonical avatar)."""
    r = int(tconfig.uv_resolution)
    spec = ForwardSpec.from_config(tconfig)
    dummy = (jnp.zeros((1, r, r, spec.pose_channels)), jnp.zeros((1, spec.style_dim)), jnp.zeros((r, r, 3)))
    return net.init(key, *dummy)["params"]


def pose_maps(consts: TeacherConstants, vertices: Float[Array, "V 3"], spec: ForwardSpec) -> Float[Array, "R R C"]:
    """The geometry branch's input maps of one root-free tracked mesh (module docstring)."""
    out = []
    for name in spec.inputs:
        if name == "normal":
            out.append(normal_map(vertices, consts.faces, consts.uv))
        else:
            disp = position_map(vertices, consts.faces, consts.uv) - consts.canonical_position_map
            out.append(disp / spec.position_input_scale)
    return jnp.concatenate(out, axis=-1)


def forward(net: TeacherNet, params: dict, consts: TeacherConstants, vertices: Float[Array, "B V 3"],
            style: Float[Array, "B D"], spec: ForwardSpec) -> tuple[Gaussians, Float[Array, "B N 3"]]:
    """Gaussians of a batch of frames in the head's frame (root pose *not* applied) and Δ.

    Runs the geometry branch on the batch, the colour branch once, activates the texels
    (:func:`maps.activate`) and deforms them to each tracked mesh (:func:`maps.deform`).
    """
    inputs = jax.vmap(lambda v: pose_maps(consts, v, spec))(vertices)
    raw = net.apply({"params": params}, inputs, style, method=TeacherNet.geometry)
    raw_color = net.apply({"params": params}, consts.color_input, method=TeacherNet.color)
    texels = consts.canonical.texels
    raw = maps.texels_from_map(raw, texels)
    raw_color = maps.texels_from_map(raw_color, texels)

    def one(raw_b, verts):
        g, delta = maps.activate(raw_b, raw_color, consts.canonical, spec.delta_scale)
        surf = maps.surface_frames(verts, consts.faces, consts.vt, consts.ft, consts.uv, texels)
        return maps.deform(g, consts.canonical, surf), delta

    return jax.vmap(one)(raw, vertices)


@functools.lru_cache(maxsize=8)
def canonical_gaussians_fn(net: TeacherNet, spec: ForwardSpec):
    """Jitted ``(params, consts, vertices (B,V,3)) -> Gaussians (B,N)`` in the head's frame at the
    test-time style ``z = 0`` (memoised: one compilation per network and spec)."""

    @jax.jit
    def fn(params, consts, vertices):
        style = jnp.zeros((vertices.shape[0], spec.style_dim), vertices.dtype)
        return forward(net, params, consts, vertices, style, spec)[0]

    return fn


@functools.lru_cache(maxsize=8)
def world_gaussians_fn(net: TeacherNet, spec: ForwardSpec):
    """Jitted ``(params, consts, vertices (B,V,3), roots (B,4,4)) -> world Gaussians (B,N)`` at the
    test-time style ``z = 0`` (memoised: one compilation per network and spec)."""

    @jax.jit
    def fn(params, consts, vertices, roots):
        style = jnp.zeros((vertices.shape[0], spec.style_dim), vertices.dtype)
        g, _ = forward(net, params, consts, vertices, style, spec)
        return jax.vmap(maps.rigid_transform)(g, roots)

    return fn
