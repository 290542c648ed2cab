"""Appearance of the synthetic identities: skin, hair and iris colours, albedo textures in the
head's UV layout, and the expression-dependent detail of each frame (docs/architecture.md §4).

An :class:`Identity` (from ``(seed, index)``) carries its shape coefficients and colours;
:func:`make_textures` paints its albedo and the detail layers (forehead wrinkles, nasolabial
folds, crow's feet, mouth interior, eyelids, frown lines, cheeks, lips) in UV space;
:func:`frame_texture` blends them per frame with rectified powers of the expression
coefficients and the jaw angle, so appearance is not a linear function of the expression.
Used by :mod:`gem_jax.data.synthetic`; pure NumPy, deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gem_jax.data import procedural_head as ph

SKIN = np.array([[0.90, 0.72, 0.62], [0.80, 0.60, 0.48], [0.68, 0.48, 0.36], [0.52, 0.35, 0.25],
                 [0.38, 0.25, 0.18], [0.86, 0.66, 0.52]])
HAIR = np.array([[0.07, 0.055, 0.045], [0.22, 0.14, 0.08], [0.72, 0.57, 0.33], [0.50, 0.20, 0.09],
                 [0.36, 0.23, 0.13], [0.58, 0.58, 0.58]])
IRIS = np.array([[0.33, 0.19, 0.08], [0.22, 0.42, 0.62], [0.28, 0.42, 0.22], [0.42, 0.32, 0.14], [0.38, 0.45, 0.5]])


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
