"""The embedded synthetic subject: identities, expression sequences, multi-view renders.

Writes exactly the VHAP / GaussianAvatars export (``docs/data_format.md``) so that every
stage after the writer runs the real code path. The head is the procedural FLAME-format
model of :mod:`gem_jax.data.procedural_head`; appearance is a per-identity albedo texture in
its UV layout plus **expression-dependent detail** evaluated per frame (forehead wrinkles
with brow raise, nasolabial folds and crow's feet with smile, a darker mouth interior as the
jaw opens, eyelid colour when blinking, frown lines, flushed cheeks when puffing, darker lips
when puckering). The activations are rectified powers of the coefficients, so appearance is
not a linear function of the expression. Shading is Lambertian under a fixed light rig plus
ambient, so it changes with head pose. Images are rendered at ``supersample``× and area
downsampled; masks likewise.

Stored images hold the *unpremultiplied* colour on the head's anti-aliased edge pixels and a
mid-grey background, so the reader's ``image·mask + bg·(1 − mask)`` is exact for any ``bg``.

Everything is a pure function of ``(config, seed)``: two runs write byte-identical files.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from gem_jax.data import procedural_head as ph
from gem_jax.head import flame
from gem_jax.head.meshraster import interpolate, project_vertices, rasterize_triangles

BACKGROUND = 0.5  # grey behind the head in the stored images (the reader composites with the mask)
LIGHTS = ((np.array([0.45, 0.55, 0.85]), 0.65), (np.array([-0.7, 0.1, 0.55]), 0.3), (np.array([0.0, 0.8, -0.6]), 0.2))
AMBIENT = 0.3
SKIN = np.array([[0.90, 0.72, 0.62], [0.80, 0.60, 0.48], [0.68, 0.48, 0.36], [0.52, 0.35, 0.25],
                 [0.38, 0.25, 0.18], [0.86, 0.66, 0.52]])
HAIR = np.array([[0.07, 0.055, 0.045], [0.22, 0.14, 0.08], [0.72, 0.57, 0.33], [0.50, 0.20, 0.09],
                 [0.36, 0.23, 0.13], [0.58, 0.58, 0.58]])
IRIS = np.array([[0.33, 0.19, 0.08], [0.22, 0.42, 0.62], [0.28, 0.42, 0.22], [0.42, 0.32, 0.14], [0.38, 0.45, 0.5]])
SEQUENCES = (  # (name, emphasised expressions, jaw amplitude); the last entry is the held-out one
    ("EXP-1-talk-smile", ("smile", "lips_part", "mouth_stretch"), 0.26),
    ("EXP-2-brows-blink", ("brow_raise", "frown", "blink_left", "blink_right"), 0.08),
    ("EXP-3-pucker-puff", ("pucker", "cheek_puff", "sneer"), 0.2),
    ("EXP-4-eyes-smile", ("smile", "blink_left", "blink_right", "brow_raise"), 0.15),
)
HELD_OUT_SEQUENCE = ("FREE-mixed", ph.EXPR_NAMES, 0.3)


# ----------------------------------------------------------------------------- identities


@dataclass(frozen=True)
class Identity:
    index: int
    shape: np.ndarray  # (S,) identity coefficients of the procedural head
    skin: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    lips: np.ndarray
    noise_seed: int


def make_identity(seed: int, index: int) -> Identity:
    """Identity ``index`` of the population drawn from ``seed`` (neighbours differ in colouring)."""
    order = np.random.default_rng([seed, 7]).permutation(30)
    rng = np.random.default_rng([seed, 1000 + index])
    pick = order[index % 30]
    skin = SKIN[pick % len(SKIN)] * rng.uniform(0.95, 1.05)
    return Identity(
        index=index,
        shape=np.clip(rng.normal(0, 0.9, len(ph.SHAPE_NAMES)), -2, 2),
        skin=skin, hair=HAIR[(pick // 2 + index) % len(HAIR)], iris=IRIS[(pick + 2 * index) % len(IRIS)],
        lips=skin * np.array([0.92, 0.62, 0.62]) + np.array([0.06, 0.0, 0.01]),
        noise_seed=int(rng.integers(1 << 30)),
    )


# ----------------------------------------------------------------------------- appearance


DETAIL_NAMES = ("wrinkles", "nasolabial", "crows_feet", "mouth_dark", "frown_lines", "eyelid_left", "eyelid_right",
                "blush", "lip_dark")


def _noise(rng, pts, wavelength, count=12):
    w = rng.normal(size=(count, 3))
    w *= (2 * np.pi / wavelength) / np.linalg.norm(w, axis=1, keepdims=True)
    phase = rng.uniform(0, 2 * np.pi, count)
    return np.sin(pts @ w.T + phase).sum(-1) / np.sqrt(count / 2)


def _texel_coords(layout, size):
    """Template coordinates of the head-island texels and polar coordinates of the eye disks."""
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size
    c = ph.template_coords(layout, np.clip(v / ph.HEAD_V_SPAN, 0, 1) * (layout.n_rows - 1), u)
    c["head"] = v < ph.HEAD_V_SPAN
    eyes = []
    for cu, cv in ph.EYE_UV:
        du, dv = (u - cu) / ph.EYE_UV_RADIUS, (v - cv) / ph.EYE_UV_RADIUS
        eyes.append(np.pi * np.clip(np.hypot(du, dv), 0, 1) ** (1 / 0.7))  # polar angle from the gaze axis
    left = np.abs(u - ph.EYE_UV[0][0]) < np.abs(u - ph.EYE_UV[1][0])  # nearest disk
    c["eye_theta"] = np.where(left, eyes[0], eyes[1])
    c["eye_angle"] = np.arctan2(v - ph.EYE_UV[0][1], u - np.where(left, ph.EYE_UV[0][0], ph.EYE_UV[1][0]))
    return c


def make_textures(identity: Identity, resolution: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Albedo ``(size, size, 3)`` and expression-detail maps ``(size, size, len(DETAIL_NAMES))``."""
    layout = ph.Layout.for_resolution(resolution)
    c = _texel_coords(layout, size)
    x0, y0, z0, s = c["x0"], c["y0"], c["z0"], c["s"]
    ax = np.abs(x0)
    pts = np.stack([x0, y0, z0], -1)
    rng = np.random.default_rng(identity.noise_seed)
    front = ph.smoothstep(0.1, 0.5, np.cos(c["phi"])) * (c["cap"] >= 1)
    ss = ph.smoothstep
    # Skin: tone, blotches, pores, flushed cheeks and nose, a slightly darker neck.
    tex = identity.skin * (1 + 0.05 * _noise(rng, pts, 0.04) + 0.025 * _noise(rng, pts, 0.006, 24))[..., None]
    red = sum(ph.gauss(x0 - k * 0.045, y0 + 0.03, 0.014, 0.012) for k in (-1, 1))
    red = red + ph.gauss(x0, y0 + 0.032, 0.008, 0.01)
    tex = tex * (1 + (red * front * 0.12)[..., None] * np.array([1, -0.4, -0.4]))
    tex *= (1 - 0.1 * ss(-0.09, -0.16, y0))[..., None]
    # Lips with a cupid's bow.
    bow = 0.0095 - 0.0025 * np.exp(-(x0 / 0.004) ** 2) + 0.0015 * np.exp(-((ax - 0.006) / 0.004) ** 2)
    top = ss(0.0045, 0.0030, ax - 0.022 + 0.4 * np.clip(y0 - ph.Y_MOUTH, 0, None))
    top = top * ss(bow + 0.001, bow - 0.001, y0 - ph.Y_MOUTH)
    low = ss(0.0045, 0.0030, ax - 0.022 + 0.4 * np.clip(ph.Y_MOUTH - y0, 0, None))
    low = low * ss(0.0115, 0.0095, ph.Y_MOUTH - y0)
    lips = np.where(y0 >= ph.Y_MOUTH, top, low) * front * ~c["fold"]
    tex = tex + lips[..., None] * (identity.lips - tex)
    # Eyebrows (hair colour, dense) following an arch.
    arch = 0.021 + 0.0035 * (1 - ((ax - 0.032) / 0.026) ** 2)
    thick = 0.0014 + 0.0016 * ss(0.056, 0.018, ax)
    brow = ss(thick + 0.0006, thick - 0.0006, np.abs(y0 - arch)) * ss(0.011, 0.015, ax) * ss(0.06, 0.052, ax) * front
    brow *= 0.85 + 0.15 * np.sin(x0 * 4000 - 9000 * y0 * np.sign(x0)) ** 2
    tex = tex + (0.92 * brow)[..., None] * (identity.hair * 0.8 - tex)
    # Eyes: lid skin darker, lash line around the opening, shadowed crease above it.
    for side in (1, -1):
        f = ph.almond(x0, y0, side)
        tex *= (1 - 0.12 * ss(1.2, 0.9, f) * front)[..., None]
        upper = (y0 > ph.Y_EYE - 0.001)
        lash = ss(0.14, 0.03, np.abs(f - 1.0)) * np.where(upper, 1.0, 0.5) * front
        tex = tex + (0.85 * lash)[..., None] * (np.array([0.05, 0.04, 0.04]) - tex)
        crease = ph.gauss(x0 - side * 0.033, y0 - 0.0085, 0.011, 0.0018) * front
        tex *= (1 - 0.18 * crease)[..., None]
    # Nostrils and the underside of the nose; ear bowls.
    nostril = sum(ph.gauss(x0 - k * 0.0068, y0 + 0.0445, 0.0028, 0.0016) for k in (-1, 1)) * front
    tex *= (1 - 0.75 * np.clip(nostril, 0, 1))[..., None]
    _, bowl, ear_mask = ph.ear_field(c)
    tex *= (1 - 0.4 * bowl - 0.5 * 4 * ear_mask * (1 - ear_mask))[..., None]
    # Hair: the identity's colour with strands and a little sheen.
    hair = ph.hair_mask(c)
    strands = 0.85 + 0.15 * np.sin(c["phi"] * 160 + 300 * y0 + 2 * _noise(rng, pts, 0.03))
    hair_col = identity.hair * (strands * (1 + 0.15 * _noise(rng, pts, 0.02)))[..., None]
    tex = tex + hair[..., None] * (hair_col - tex)
    # Mouth interior: inner lips, teeth, palate/tongue, dark throat (deeper is darker).
    m = ph.mouth_mask(x0) * c["fold"]
    depth = ph.fold_depth(s)
    inner = identity.lips * 0.75 * (1 - 0.75 * depth[..., None])
    inner = inner * np.where(s[..., None] > 0.05, [1.0, 0.75, 0.75], 1.0)
    teeth = (((s > -0.72) & (s < -0.38)) | ((s > 0.38) & (s < 0.68))) * ss(0.021, 0.016, ax)
    inner = inner * np.where(((s > 0.05) & (s < 0.38))[..., None], np.array([1.6, 1.2, 1.2]), 1.0)  # tongue
    gaps = 0.9 + 0.1 * np.cos(2 * np.pi * x0 / 0.0045) ** 8
    inner = inner + teeth[..., None] * (np.array([0.86, 0.84, 0.76]) * gaps[..., None] - inner)
    tex = tex + m[..., None] * (inner - tex)
    # Eyeballs: sclera, iris with streaks and a limbal ring, pupil, a catch light.
    th, ang = c["eye_theta"], c["eye_angle"]
    eye = np.broadcast_to(np.array([0.92, 0.9, 0.86]), th.shape + (3,)) * (1 - 0.15 * ss(0.9, 1.6, th))[..., None]
    iris = identity.iris * (0.75 + 0.25 * np.sin(ang * 23)[..., None] ** 2) * (1 - 0.4 * ss(0.3, 0.52, th))[..., None]
    eye = np.where((th < 0.55)[..., None], iris, eye)
    eye = np.where((th < 0.21)[..., None], np.array([0.02, 0.02, 0.02]), eye)
    glint = np.exp(-((th * np.cos(ang) - 0.17) ** 2 + (th * np.sin(ang) + 0.17) ** 2) / 0.004)
    eye = eye + glint[..., None] * (1.0 - eye)
    tex = np.where(c["head"][..., None], tex, eye)

    # Expression-dependent detail maps (activations in frame_texture).
    stripes = np.cos(2 * np.pi * (y0 - 0.03) / 0.0085) ** 6
    wrinkles = stripes * ss(0.026, 0.034, y0) * ss(0.07, 0.06, y0) * ss(0.05, 0.035, ax) * front * (1 - hair)
    t = np.clip((y0 + 0.038) / -0.03, 0, 1)  # nasolabial curve from the nose wing to past the mouth corner
    curve_x = 0.017 + 0.011 * t + 0.012 * t * (1 - t)
    naso = np.exp(-((ax - curve_x) / 0.0016) ** 2) * ss(-0.034, -0.04, y0) * ss(-0.072, -0.066, y0) * front
    rays = np.cos(np.arctan2(y0 - ph.Y_EYE, ax - 0.046) * 9) ** 8
    crows = rays * ph.gauss(ax - 0.052, y0 - ph.Y_EYE, 0.006, 0.007) * front
    mouth_dark = m * ss(0.4, 0.1, np.abs(s))
    lids = [ss(1.1, 0.8, ph.almond(x0, y0, k)) * front for k in (1, -1)]
    frown = np.exp(-((ax - 0.006) / 0.0012) ** 2) * ss(0.008, 0.014, y0) * ss(0.032, 0.024, y0) * front
    blush = red * front
    details = np.stack([wrinkles, naso, crows, mouth_dark, frown, *lids, blush, lips], -1)
    return np.clip(tex, 0, 1).astype(np.float32), details.astype(np.float32)


def frame_texture(albedo, details, expr, jaw_angle) -> np.ndarray:
    """Per-frame albedo: ``albedo`` with the detail maps switched on non-linearly by the expression."""
    e = dict(zip(ph.EXPR_NAMES, np.asarray(expr, np.float64)))
    relu = lambda x, p=1.0: max(float(x), 0.0) ** p  # noqa: E731
    darken = np.array([
        0.45 * relu(e["brow_raise"], 1.5),  # wrinkles only when the brows go up
        0.5 * relu(e["smile"], 2.0),  # nasolabial folds deepen with a smile
        0.35 * relu(e["smile"] - 0.3, 1.5),  # crow's feet only for a broad smile
        0.7 * ph.smoothstep(0.02, 0.3, jaw_angle),  # the mouth interior darkens as the jaw opens
        0.5 * relu(e["frown"], 1.5),  # frown lines between the brows
    ], np.float32)
    out = albedo * (1 - np.clip(details[..., :5] @ darken, 0, 0.9))[..., None]
    tints = ((5, 0.6 * min(relu(e["blink_left"]), 1) ** 2, (0.78, 0.6, 0.58)),  # eyelids redden when closed
             (6, 0.6 * min(relu(e["blink_right"]), 1) ** 2, (0.78, 0.6, 0.58)),
             (7, 0.7 * relu(e["cheek_puff"], 2), (1.08, 0.8, 0.78)),  # flushed cheeks
             (8, 0.5 * relu(e["pucker"], 1.5), (0.78, 0.5, 0.56)))  # pressed lips darken
    for k, a, factor in tints:  # multiplicative colour shifts
        if a > 0:
            w = np.clip(a * details[..., k], 0, 1)[..., None]
            out = out * (1 + w * (np.asarray(factor, np.float32) - 1))
    return np.clip(out, 0, 1).astype(np.float32)


# ----------------------------------------------------------------------------- sequences and cameras


@dataclass(frozen=True)
class Sequence:
    name: str
    params: dict  # FLAME parameters per frame, batch first: expr (F, E), jaw_pose (F, 3), ...


def _wave(rng, t, lo=1.0, hi=2.0):
    """A smooth bump train in [0, 1] with a random frequency and phase."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(lo, hi) * t + rng.uniform(0, 2 * np.pi))


def _sine(rng, t, amplitude, lo=0.4, hi=1.0):
    return amplitude * np.sin(2 * np.pi * rng.uniform(lo, hi) * t + rng.uniform(0, 2 * np.pi))


def make_sequences(seed: int, num_sequences: int, frames: int) -> list[Sequence]:
    """``num_sequences`` smooth expression sequences; the last is the held-out mixed one."""
    out = []
    for k in range(num_sequences):
        held_out = k == num_sequences - 1
        name, emphasis, jaw_amp = HELD_OUT_SEQUENCE if held_out else SEQUENCES[k % len(SEQUENCES)]
        if not held_out and k >= len(SEQUENCES):
            name = f"{name}-{k // len(SEQUENCES) + 1}"
        rng = np.random.default_rng([seed, 2000 + k])
        t = np.linspace(0.0, 1.0, frames)
        expr = np.zeros((frames, len(ph.EXPR_NAMES)))
        for e, ename in enumerate(ph.EXPR_NAMES):
            if ename in emphasis:
                amp = rng.uniform(0.75, 1.0) if held_out else rng.uniform(0.9, 1.25)
                bump = _wave(rng, t, 0.7, 1.6)
                if ename.startswith("blink"):
                    bump = bump**3
                elif ename in ("brow_raise", "smile"):
                    bump = 1.3 * bump - 0.3  # dips below neutral: no wrinkles / folds there
                expr[:, e] = amp * bump
            else:
                expr[:, e] = _sine(rng, t, 0.08, 0.5, 1.5)
        sin = lambda amplitude: _sine(rng, t, amplitude)  # noqa: E731
        gaze = np.stack([sin(0.1), sin(0.15), np.zeros(frames)], -1)
        params = dict(
            expr=expr,
            jaw_pose=np.stack([jaw_amp * _wave(rng, t, 1.0, 2.2) + 0.01, sin(0.02), np.zeros(frames)], -1),
            rotation=np.stack([sin(0.06), sin(0.15), sin(0.04)], -1),
            neck_pose=np.stack([sin(0.06), sin(0.08), sin(0.03)], -1),
            eyes_pose=np.concatenate([gaze, gaze], -1),
            translation=np.stack([sin(0.005), sin(0.004), sin(0.005)], -1),
        )
        out.append(Sequence(name, {k2: v.astype(np.float32) for k2, v in params.items()}))
    return out


def canonical_params(n_expr: int) -> dict:
    """Canonical pose: neutral expression, jaw slightly open (as VHAP's canonical_flame_param)."""
    return dict(expr=np.zeros((1, n_expr), np.float32), jaw_pose=np.array([[0.06, 0, 0]], np.float32),
                rotation=np.zeros((1, 3), np.float32), neck_pose=np.zeros((1, 3), np.float32),
                eyes_pose=np.zeros((1, 6), np.float32), translation=np.zeros((1, 3), np.float32))


@dataclass(frozen=True)
class Rig:
    """Cameras on a frontal arc: OpenCV world→camera ``viewmats`` (C, 4, 4) and ``Ks`` (C, 3, 3)."""

    viewmats: np.ndarray
    Ks: np.ndarray
    height: int
    width: int


def make_cameras(seed: int, num: int, height: int, width: int) -> Rig:
    """``num`` cameras from -60° to +60° azimuth in two rows of elevation, about 1 m away."""
    rng = np.random.default_rng([seed, 3000])
    az = np.deg2rad(np.linspace(-60, 60, num) + rng.uniform(-1.5, 1.5, num))
    el = np.deg2rad(np.where(np.arange(num) % 2 == 0, 11.0, -3.0) + rng.uniform(-1.5, 1.5, num))
    dist = 1.0 + rng.uniform(-0.03, 0.03, num)
    target = np.array([0.0, -0.028, 0.0])
    views, ks = [], []
    for a, e, d in zip(az, el, dist):
        centre = target + d * np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])
        fwd = (target - centre) / np.linalg.norm(target - centre)
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        rot = np.stack([right, np.cross(fwd, right), fwd])
        view = np.eye(4)
        view[:3, :3], view[:3, 3] = rot, -rot @ centre
        views.append(view)
        focal = 2.7 * height * d
        # Off-centre principal points (as real calibrations), so a flipped cy shows in the tests.
        cy = height * (0.5 + rng.choice([-1, 1]) * rng.uniform(0.015, 0.03))
        ks.append(np.array([[focal, 0, width * (0.5 + rng.uniform(-0.03, 0.03))], [0, focal, cy], [0, 0, 1]]))
    return Rig(np.stack(views), np.stack(ks), int(height), int(width))


# ----------------------------------------------------------------------------- rendering


class Renderer:
    """Posing (FLAME LBS of :mod:`gem_jax.head.flame`) and shaded, anti-aliased mesh rendering."""

    def __init__(self, arrays: dict):
        import jax
        import scipy.sparse

        self.model = flame.head_model_from_arrays(arrays)
        self.faces = np.asarray(arrays["f"], np.int32)
        self.uv_corners = np.asarray(arrays["vt"], np.float32)[np.asarray(arrays["ft"])]
        num_v, num_f = len(arrays["v_template"]), len(self.faces)
        self._incidence = scipy.sparse.csr_matrix(
            (np.ones(3 * num_f), (self.faces.ravel(), np.repeat(np.arange(num_f), 3))), shape=(num_v, num_f))
        model = self.model
        self._lbs = jax.jit(jax.vmap(lambda p: flame.lbs(model, p)[0]))

    def vertices(self, shape: np.ndarray, params: dict) -> np.ndarray:
        """Posed vertices ``(T, V, 3)`` for batched parameters (``params[k]`` with a leading T)."""
        import jax.numpy as jnp

        num = len(params["expr"])
        batch = flame.FlameParams(shape=jnp.broadcast_to(jnp.asarray(shape, jnp.float32), (num, len(shape))),
                                  **{k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
        return np.asarray(self._lbs(batch))

    def normals(self, verts: np.ndarray) -> np.ndarray:
        tri = verts[self.faces]
        n = self._incidence @ np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        return (n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-20)).astype(np.float32)

    def render(self, verts, normals, texture, viewmat, K, height, width, supersample=1):
        """RGB ``(H, W, 3)`` (unpremultiplied, grey background) and coverage ``(H, W)``, both in [0, 1]."""
        ss = int(supersample)
        k_hi = np.asarray(K, np.float64).copy()
        k_hi[:2] *= ss
        raster = rasterize_triangles(project_vertices(verts, viewmat, k_hi), self.faces, height * ss, width * ss,
                                     near=0.05, cull_backfaces=True)
        mask = raster.face_index >= 0
        uv = interpolate(self.uv_corners, raster)
        size = texture.shape[0]
        colour = cv2.remap(texture, uv[..., 0] * size - 0.5, uv[..., 1] * size - 0.5, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        n = interpolate(normals, raster)
        n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
        shade = np.full(mask.shape, AMBIENT, np.float32)
        for direction, power in LIGHTS:
            shade += power * np.clip(n @ (direction / np.linalg.norm(direction)).astype(np.float32), 0, None)
        rgb = colour * (shade * mask)[..., None]
        alpha = mask.astype(np.float32)
        if ss > 1:
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
            alpha = cv2.resize(alpha, (width, height), interpolation=cv2.INTER_AREA)
        rgb = np.where(alpha[..., None] > 1e-6, rgb / np.maximum(alpha, 1e-6)[..., None], BACKGROUND)
        return np.clip(rgb, 0, 1), alpha


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- writing


def save_npz(path: str | os.PathLike, **arrays) -> None:
    """``np.savez`` with fixed zip timestamps, so equal arrays give byte-identical files."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def _get(cfg, key, default=None):
    return cfg[key] if key in cfg else default


@dataclass
class Scene:
    """Everything needed to render a subject: head model, identity, textures, sequences, cameras."""

    arrays: dict
    renderer: Renderer
    identity: Identity
    albedo: np.ndarray
    details: np.ndarray
    sequences: list
    rig: Rig
    supersample: int


def make_scene(synthetic, seed: int, identity: int | None = None, arrays: dict | None = None) -> Scene:
    """The scene of config section ``synthetic`` (``identity`` defaults to ``synthetic.identity``)."""
    res = int(synthetic["mesh_resolution"])
    arrays = ph.build_head_model(res) if arrays is None else arrays
    ident = make_identity(seed, int(synthetic["identity"] if identity is None else identity))
    albedo, details = make_textures(ident, res, int(synthetic["texture_size"]))
    seqs = make_sequences(seed, int(synthetic["num_sequences"]), int(synthetic["frames_per_sequence"]))
    rig = make_cameras(seed, int(synthetic["num_cameras"]), int(synthetic["image_height"]),
                       int(synthetic["image_width"]))
    return Scene(arrays, Renderer(arrays), ident, albedo, details, seqs, rig, int(_get(synthetic, "supersample", 1)))


def frame_table(scene: Scene, sequences=None) -> list[tuple[int, int, int]]:
    """(global timestep, sequence index, frame in sequence) for the chosen sequences."""
    out, t = [], 0
    for k, seq in enumerate(scene.sequences):
        for i in range(len(seq.params["expr"])):
            if sequences is None or k in sequences:
                out.append((t, k, i))
            t += 1
    return out


def render_frames(scene: Scene, frames, cameras, shape=None, workers: int | None = None, callback=None):
    """Render ``frames`` (from :func:`frame_table`) × ``cameras``; ``callback(t, c, rgb, alpha)`` per view.

    Returns nothing if a callback is given, else a dict ``{(t, c): (rgb uint8, alpha uint8)}``.
    """
    shape = scene.identity.shape if shape is None else shape
    params = {k: np.stack([scene.sequences[s].params[k][i] for _, s, i in frames]) for k in scene.sequences[0].params}
    verts = scene.renderer.vertices(shape, params)
    rig, results = scene.rig, {}

    def one(j):
        t, s, i = frames[j]
        tex = frame_texture(scene.albedo, scene.details, params["expr"][j], float(params["jaw_pose"][j, 0]))
        normals = scene.renderer.normals(verts[j])
        for c in cameras:
            rgb, alpha = scene.renderer.render(verts[j], normals, tex, rig.viewmats[c], rig.Ks[c], rig.height,
                                               rig.width, scene.supersample)
            rgb8, a8 = to_uint8(rgb), to_uint8(alpha)
            if callback is None:
                results[(t, c)] = (rgb8, a8)
            else:
                callback(t, c, rgb8, a8)

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(frames))))
    return None if callback is not None else results


def _flame_npz(shape, params: dict, index=None) -> dict:
    pick = (lambda v: v[index:index + 1]) if index is not None else (lambda v: v)  # noqa: E731
    out = {k: np.asarray(pick(params[k]), np.float32) for k in
           ("translation", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "expr")}
    out["shape"] = np.asarray(shape, np.float32)
    return out


def _camera_fields(rig: Rig, c: int) -> dict:
    """VHAP per-frame camera fields: OpenGL camera-to-world and a bottom-left ``cy``."""
    c2w = np.linalg.inv(rig.viewmats[c]) @ np.diag([1.0, -1.0, -1.0, 1.0])
    k = rig.Ks[c]
    return {"cx": float(k[0, 2]), "cy": float(rig.height - k[1, 2]), "fl_x": float(k[0, 0]), "fl_y": float(k[1, 1]),
            "h": rig.height, "w": rig.width, "transform_matrix": c2w.tolist()}


def write_subject(root: str | os.PathLike, scene: Scene, held_out_camera: int, sequences=None,
                  workers: int | None = None) -> dict:
    """Write ``scene`` in the VHAP export layout into ``root`` (which must not exist yet).

    ``sequences`` restricts which sequences are rendered (global timestep indices are kept);
    the splits follow NeRSemble: train = training sequences × training cameras, val = the
    held-out camera, test = the last sequence × all cameras. Returns a summary dict.
    """
    root = Path(root)
    for sub in ("images", "fg_masks", "flame_param"):
        (root / sub).mkdir(parents=True, exist_ok=False)
    arrays = scene.arrays
    flame.head_model_from_arrays(arrays, where=str(root / "head_model.npz"))
    save_npz(root / "head_model.npz", **arrays)
    n_expr = arrays["shapedirs"].shape[-1] - int(arrays["n_shape"])
    save_npz(root / "canonical_flame_param.npz", **_flame_npz(scene.identity.shape, canonical_params(n_expr)))
    frames = frame_table(scene, sequences)
    held_out_seq = len(scene.sequences) - 1
    num_cams = len(scene.rig.viewmats)
    if not 0 <= held_out_camera < num_cams:
        raise ValueError(f"synthetic.held_out_camera: {held_out_camera} is not a camera index in [0, {num_cams})")
    for t, s, i in frames:
        params = _flame_npz(scene.identity.shape, scene.sequences[s].params, i)
        save_npz(root / "flame_param" / f"{t:05d}.npz", **params)
    splits = {"train": [], "val": [], "test": []}
    for t, s, i in frames:
        for c in range(num_cams):
            split = "test" if s == held_out_seq else ("val" if c == held_out_camera else "train")
            name = f"{t:05d}_{c:02d}.png"
            splits[split].append({
                "file_path": f"images/{name}", "fg_mask_path": f"fg_masks/{name}",
                "flame_param_path": f"flame_param/{t:05d}.npz", "timestep_index": t, "camera_index": c,
                **_camera_fields(scene.rig, c), "sequence": scene.sequences[s].name,
                "timestep_index_original": i, "camera_id": f"cam_{c:02d}",
            })
    for split, items in splits.items():
        (root / f"transforms_{split}.json").write_text(json.dumps({"frames": items}, indent=1))

    def save(t, c, rgb, alpha):
        name = f"{t:05d}_{c:02d}.png"
        if not cv2.imwrite(str(root / "images" / name), rgb[..., ::-1]):
            raise OSError(f"could not write {root / 'images' / name}")
        if not cv2.imwrite(str(root / "fg_masks" / name), alpha):
            raise OSError(f"could not write {root / 'fg_masks' / name}")

    render_frames(scene, frames, range(num_cams), workers=workers, callback=save)
    return {"frames": {k: len(v) for k, v in splits.items()}, "timesteps": len(frames),
            "image_size": (scene.rig.height, scene.rig.width), "vertices": len(arrays["v_template"]),
            "faces": len(arrays["f"]), "identity": scene.identity.index,
            "sequences": [scene.sequences[k].name for k in sorted({s for _, s, _ in frames})]}


def write_cross_identity(root, synthetic, seed: int, identity: int, workers: int | None = None) -> dict:
    """Cross-identity ground truth: ``identity`` performing the held-out sequence of the subject.

    Same head model, expression/pose parameters, cameras and timestep indices as the main
    subject (``synthetic.identity``); the shape coefficients and texture are ``identity``'s.
    Only ``transforms_test.json`` has frames (train/val are empty).
    """
    scene = make_scene(synthetic, seed, identity=identity)
    held_out = len(scene.sequences) - 1
    return write_subject(root, scene, int(synthetic["held_out_camera"]), sequences={held_out}, workers=workers)


def write_driver_video(path, synthetic, seed: int, identity: int, camera: int, sequences=None, fps: int = 25,
                       background=(1.0, 1.0, 1.0)) -> Path:
    """An MP4 (``mp4v``) of ``identity`` performing ``sequences`` (default all) seen from ``camera``."""
    scene = make_scene(synthetic, seed, identity=identity)
    frames = frame_table(scene, None if sequences is None else set(sequences))
    views = render_frames(scene, frames, [camera])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (scene.rig.width, scene.rig.height))
    if not writer.isOpened():
        raise OSError(f"cv2.VideoWriter could not open {path} (mp4v)")
    bg = np.asarray(background, np.float32)
    try:
        for t, _, _ in frames:
            rgb, alpha = views[(t, camera)]
            a = alpha[..., None].astype(np.float32) / 255.0
            writer.write(to_uint8((rgb / 255.0) * a + bg * (1 - a))[..., ::-1])
    finally:
        writer.release()
    return path
