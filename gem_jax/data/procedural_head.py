"""A procedural head model in the FLAME format — the geometry of the embedded synthetic subject.

The head is one lat-long surface (crown pole → skull → face → chin → neck → bottom cap) plus
two eyeball spheres. Every ring of the surface is a superellipse loop around the vertical
axis; the face is added as smooth displacement fields (nose, brow ridge, eye sockets, cheek
bones, lips, chin, ears, hair volume) and the mouth is an inward *fold* of a few extra rows
at the lip line: closed at rest (a thin pocket), it opens into a dark cavity with teeth when
the jaw (skinned to the lower half of the fold) rotates.

Coordinates follow FLAME: metres, y up, z forward (the face looks at +z), x to the subject's
left. Joints: root (neck base), neck (top of the neck, rotates the head), jaw (TMJ), left and
right eye (eyeball centres), with FLAME's kintree (parents -1, 0, 1, 1, 1).

* identity blendshapes (:data:`SHAPE_NAMES`): central differences of the generator in its
  shape parameters (head width, face length, nose size, ...);
* expression blendshapes (:data:`EXPR_NAMES`): analytic displacement fields on the template
  (smile, brow raise, blinks, pucker, ...); jaw opening is ``jaw_pose``, as in FLAME;
* UV layout (``v = 0`` is the top row of a texture image, as in :mod:`gem_jax.head.uv`): the
  lat-long grid on the top 84 % of the atlas (crown at the top, seam at the back of the head),
  each eyeball a disk island (azimuthal map around its gaze axis) at the bottom.

Every feature is defined in *template coordinates* ``(x0, y0, z0)`` — the base surface at
mean shape, a fixed function of (u, v) — so the same masks place the texture
(:mod:`gem_jax.data.synthetic`) and the geometry, whatever the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import CubicSpline, PchipInterpolator
from scipy.optimize import nnls

SHAPE_NAMES = (
    "head_width", "head_depth", "face_length", "crown_height", "nose_size", "nose_bridge",
    "jaw_width", "chin", "cheek_fullness", "brow_ridge", "lip_thickness", "ear_size",
    "forehead_slope", "neck_thickness", "hair_volume", "cheekbones",
)
EXPR_NAMES = (
    "smile", "brow_raise", "blink_left", "blink_right", "pucker", "mouth_stretch",
    "cheek_puff", "frown", "lips_part", "sneer",
)
JOINT_NAMES = ("root", "neck", "jaw", "eye_left", "eye_right")
KINTREE = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)

# Template landmarks (metres).
Y_TOP, Y_CAP, Y_BOT = 0.118, 0.03, -0.175  # crown, start of the skull cap, neck bottom
Y_EYE, Y_MOUTH = 0.0, -0.062
EYE_X, EYE_RADIUS = 0.032, 0.012
HEAD_V_SPAN = 0.84  # the head island spans v in [0, 0.84] (crown at v = 0); eyes sit below it
EYE_UV = ((0.085, 0.92), (0.245, 0.92))  # disk centres (left eye, right eye)
EYE_UV_RADIUS = 0.072

# Base loop profiles below the skull cap (y ascending): half-width, front and back depth.
_KEYS_Y = np.array([-0.125, -0.10, -0.08, -0.06, -0.04, -0.02, 0.0, 0.015, Y_CAP])
_KEYS_X = np.array([0.040, 0.046, 0.055, 0.062, 0.067, 0.071, 0.074, 0.0755, 0.0755])
_KEYS_ZF = np.array([0.082, 0.089, 0.093, 0.095, 0.095, 0.094, 0.094, 0.096, 0.097])
_KEYS_ZB = np.array([0.060, 0.068, 0.078, 0.088, 0.096, 0.101, 0.104, 0.104, 0.104])
_PROFILES = [CubicSpline(_KEYS_Y, k, bc_type=("natural", (1, 0.0))) for k in (_KEYS_X, _KEYS_ZF, _KEYS_ZB)]
# Jaw line: where the head loop hands over to the neck loop, per |azimuth|.
_JAW_PHI = np.array([0.0, 0.35, 0.8, 1.25, 1.57, 2.0, 2.5, np.pi])
_JAW_Y = np.array([-0.104, -0.100, -0.088, -0.075, -0.068, -0.050, -0.038, -0.035])
_JAW_W = np.array([0.007, 0.007, 0.008, 0.010, 0.012, 0.020, 0.030, 0.030])
# The mouth fold, s in [-1, 1] (upper lip edge → teeth → palate → throat → tongue → lower lip).
_FOLD_S = np.array([-1.0, -0.8, -0.6, -0.4, -0.2, 0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
_FOLD_DY = np.array([0.0, 0.0012, -0.0038, -0.0032, 0.006, 0.0, -0.007, -0.0005, 0.0006, -0.0012, 0.0])
_FOLD_DEPTH = np.array([0.0, 0.004, 0.0055, 0.010, 0.022, 0.032, 0.023, 0.012, 0.008, 0.0035, 0.0])
_FOLD = (PchipInterpolator(_FOLD_S, _FOLD_DY), PchipInterpolator(_FOLD_S, _FOLD_DEPTH))


def smoothstep(e0, e1, x):
    t = np.clip((np.asarray(x, np.float64) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def gauss(dx, dy, sx, sy):
    return np.exp(-0.5 * ((dx / sx) ** 2 + (dy / sy) ** 2))


def fold_depth(s):
    """Depth of the mouth fold at fold parameter ``s``, as a fraction of its deepest point."""
    return _FOLD[1](s) / _FOLD_DEPTH.max()


def _spow(x, p):
    return np.sign(x) * np.abs(x) ** p


# ----------------------------------------------------------------------------- base surface


def _loop(y, phi, p, cap):
    """Base surface (no features) at height ``y`` and loop angle ``phi`` for shape params ``p``."""
    yc = np.clip(y, _KEYS_Y[0], Y_CAP)
    xs, zf, zb = (f(yc) for f in _PROFILES)
    top = np.sqrt(np.clip(1.0 - ((y - Y_CAP) / (Y_TOP - Y_CAP)) ** 2, 0.0, 1.0))
    above = y > Y_CAP
    xs, zf, zb = (np.where(above, k[-1] * top, v) for k, v in ((_KEYS_X, xs), (_KEYS_ZF, zf), (_KEYS_ZB, zb)))
    lower = smoothstep(-0.03, -0.08, y)
    xs = xs * (1 + 0.07 * p[0]) * (1 + 0.08 * p[6] * lower)
    zf = zf * (1 + 0.05 * p[1]) - 0.08 * p[12] * np.clip(y - 0.02, 0, None)
    zb = zb * (1 + 0.05 * p[1])
    sp, cp = np.sin(phi), np.cos(phi)
    front = cp > 0
    hx = xs * _spow(sp, 2 / np.where(front, 2.25, 2.1))
    hz = np.where(front, zf, zb) * _spow(cp, 2 / np.where(front, 2.25, 2.1))
    neck = 1 + 0.08 * p[13]
    nx, nz = 0.049 * neck * sp, -0.015 + np.where(front, 0.045, 0.048) * neck * cp
    aphi = np.abs(phi)
    h = smoothstep(0.0, 1.0, (y - np.interp(aphi, _JAW_PHI, _JAW_Y)) / np.interp(aphi, _JAW_PHI, _JAW_W) + 0.5)
    x = (h * hx + (1 - h) * nx) * cap
    z = -0.015 + (h * hz + (1 - h) * nz + 0.015) * cap  # the bottom cap shrinks onto the neck axis
    y = np.broadcast_to(y, x.shape)
    return np.stack([x, y, z], -1), h


def _profile_table(num=4000):
    """Row coordinate w in [0, 1] → template height: density-weighted meridian arc length."""
    alpha = np.linspace(0, np.pi / 2, 400)
    y = np.concatenate([Y_CAP + (Y_TOP - Y_CAP) * np.cos(alpha), np.linspace(Y_CAP, Y_BOT, num)[1:]])
    phis = np.array([0.0, 0.5, -0.5, np.pi / 2, -np.pi / 2, 2.3, -2.3, np.pi])
    pts, _ = _loop(y[:, None], phis[None], np.zeros(len(SHAPE_NAMES)), 1.0)
    step = np.linalg.norm(np.diff(pts, axis=0), axis=-1).mean(1)
    ym = 0.5 * (y[1:] + y[:-1])
    dens = (1 + 1.2 * np.exp(-((ym - Y_EYE) / 0.012) ** 2) + 0.8 * np.exp(-((ym + 0.042) / 0.008) ** 2)
            + 0.8 * np.exp(-((ym - Y_MOUTH) / 0.012) ** 2) + 0.5 * np.exp(-((ym + 0.104) / 0.008) ** 2)
            + 0.4 * smoothstep(0.09, 0.0, ym) * smoothstep(-0.12, -0.09, ym) - 0.4 * smoothstep(-0.12, -0.15, ym))
    cum = np.concatenate([[0.0], np.cumsum(step * dens)])
    total = cum[-1] + 0.05 * 0.5  # plus the bottom cap
    return cum / total, y, cum[-1] / total


def _phi_table(num=2000):
    """Column coordinate u in [0, 1] → loop angle: eye-level arc length, front and ears denser."""
    phi = np.linspace(-np.pi, np.pi, num)
    pts, _ = _loop(np.full_like(phi, -0.01), phi, np.zeros(len(SHAPE_NAMES)), 1.0)
    step = np.linalg.norm(np.diff(pts, axis=0), axis=-1)
    pm = 0.5 * (phi[1:] + phi[:-1])
    dens = 1 + 1.3 * np.exp(-(pm / 0.8) ** 2) + 0.5 * np.exp(-((np.abs(pm) - 1.6) / 0.3) ** 2)
    cum = np.concatenate([[0.0], np.cumsum(step * dens)])
    return cum / cum[-1], phi


@dataclass(frozen=True)
class Layout:
    """Grid sizes of the head surface and the eyeballs, and the row/column parametrisation."""

    n_rows: int  # rings including the two poles
    n_cols: int
    fold_start: int  # row of the upper lip edge; the fold spans n_fold intervals below it
    n_fold: int
    eye_rows: int
    eye_cols: int

    @staticmethod
    def for_resolution(resolution: int) -> "Layout":
        resolution = max(int(resolution), 16)
        n_fold = 10 if resolution >= 40 else 6
        n_rows = resolution + n_fold + 1
        w, _, _ = PARAM_TABLES["rows"]
        w_mouth = float(np.interp(-Y_MOUTH, -PARAM_TABLES["rows"][1], w))
        fold_start = int(round(w_mouth * (n_rows - 1 - n_fold)))
        return Layout(n_rows, int(round(resolution * 1.25)), fold_start, n_fold,
                      max(6, resolution // 6), max(10, resolution // 4))

    def row_coords(self, r):
        """Continuous row index → (template height y0, fold parameter s, bottom-cap scale)."""
        w_tab, y_tab, w_neck = PARAM_TABLES["rows"]
        w_m = float(np.interp(-Y_MOUTH, -y_tab, w_tab))
        r = np.asarray(r, np.float64)
        f0, f1, last = self.fold_start, self.fold_start + self.n_fold, self.n_rows - 1
        w = np.where(r <= f0, r * w_m / f0, w_m + (r - f1) * (1 - w_m) / (last - f1))
        y0 = np.interp(np.minimum(w, w_neck), w_tab, y_tab)
        cap = np.clip((1 - w) / (1 - w_neck), 0.0, 1.0)
        s = np.clip(-1 + 2 * (r - f0) / self.n_fold, -1, 1)
        in_fold = (r > f0) & (r < f1)
        y0 = np.where(in_fold, Y_MOUTH, y0)
        s = np.where(in_fold, s, np.where(r <= f0, -1.0, 1.0))
        return y0, s, cap

    def phi(self, u):
        u_tab, phi_tab = PARAM_TABLES["cols"]
        return np.interp(u, u_tab, phi_tab)


PARAM_TABLES = {"rows": _profile_table(), "cols": _phi_table()}


# ----------------------------------------------------------------------------- features


def template_coords(layout: Layout, r, u) -> dict:
    """Template coordinates of surface points at continuous (row, column-u) parameters."""
    y0, s, cap = layout.row_coords(r)
    phi = layout.phi(u)
    base, h = _loop(y0, phi, np.zeros(len(SHAPE_NAMES)), cap)
    return dict(x0=base[..., 0], y0=y0, z0=base[..., 2], phi=phi, s=s, cap=cap, h=h, fold=np.abs(s) < 1)


def mouth_mask(x0):
    """1 across the mouth, 0 beyond its corners (|x0| ≈ 2.6 cm)."""
    return smoothstep(0.026, 0.016, np.abs(x0))


def almond(x0, y0, side):
    """Eye-opening field: < 1 inside the almond of eye ``side`` (+1 left = +x, -1 right)."""
    dx, dy = x0 - side * EYE_X, y0 - Y_EYE
    a = 0.0135
    lid = np.clip(1 - (dx / a) ** 2, 0.05, None)
    up, lo = 0.0062 * lid, 0.0046 * lid
    return np.maximum(np.abs(dx) / a, np.where(dy > 0, dy / up, -dy / lo))


def socket_mask(c, side):
    return smoothstep(1.15, 0.75, almond(c["x0"], c["y0"], side))


def hair_mask(c):
    aphi = np.abs(c["phi"])
    line = np.interp(aphi, [0, 0.45, 0.9, 1.35, 1.75, 2.3, np.pi], [0.078, 0.074, 0.052, 0.034, 0.03, -0.005, -0.04])
    line = line + 0.003 * np.sin(9 * c["phi"]) + 0.002 * np.sin(23 * c["phi"] + 1)
    return smoothstep(line - 0.004, line + 0.006, c["y0"]) * (c["cap"] >= 1)


def ear_field(c):
    """(protrusion, bowl, mask) of the ears, template coordinates."""
    side = smoothstep(0.75, 0.95, np.abs(np.sin(c["phi"]))) * (np.cos(c["phi"]) > -0.6)
    dy, dz = (c["y0"] + 0.006) / 0.032, (c["z0"] + 0.013) / 0.018
    rad = np.sqrt(dy**2 + dz**2)
    mask = smoothstep(1.05, 0.85, rad) * side
    tilt = np.clip(0.5 - 0.5 * dz, 0.25, 1.0)  # the back rim stands out most
    bowl = smoothstep(0.75, 0.3, np.sqrt(((c["y0"] + 0.009) / 0.017) ** 2 + ((c["z0"] + 0.009) / 0.01) ** 2)) * side
    return 0.02 * mask * tilt - 0.007 * bowl, bowl, mask


def _nose(x0, y0, size, bridge):
    height = np.interp(y0, [-0.052, -0.047, -0.042, -0.035, -0.02, 0.0, 0.008, 0.016, 0.026],
                       [0.0, 0.003, 0.013, 0.024, 0.018, 0.0105, 0.0075, 0.004, 0.0])
    height = height * (1 + 0.22 * size) + bridge * 0.003 * smoothstep(-0.035, -0.01, y0) * smoothstep(0.026, 0.005, y0)
    width = np.interp(y0, [-0.05, -0.04, -0.02, 0.0, 0.02], [0.013, 0.015, 0.0105, 0.007, 0.008]) * (1 + 0.12 * size)
    cross = np.clip(1 - (x0 / width) ** 2, 0, None) ** 1.5
    alae = 0.006 * (1 + 0.2 * size) * sum(gauss(x0 - k * 0.0135, y0 + 0.041, 0.005, 0.0045) for k in (-1, 1))
    return height * cross + alae


def _features(c, p, lower_half):
    """Outward displacement (metres, along the horizontal radial direction) of the face features."""
    x0, y0 = c["x0"], c["y0"]
    ax = np.abs(x0)
    front = smoothstep(0.0, 0.5, np.cos(c["phi"]))
    d = _nose(x0, y0, p[4], p[5])
    d += 0.004 * (1 + 0.4 * p[9]) * gauss(0, y0 - 0.02, 1, 0.007) * smoothstep(0.06, 0.04, ax)
    d -= 0.0055 * gauss(ax - EYE_X, y0 - Y_EYE, 0.013, 0.009)
    d += 0.004 * (1 + 0.4 * p[15]) * gauss(ax - 0.048, y0 + 0.018, 0.014, 0.01)
    d += 0.003 * (1 + 0.7 * p[8]) * gauss(ax - 0.045, y0 + 0.05, 0.016, 0.014)
    d += 0.006 * (1 + 0.5 * p[7]) * gauss(x0, y0 + 0.09, 0.014, 0.01)
    lip = 1 + 0.3 * p[10]
    upper = np.interp(y0 - Y_MOUTH, [0, 0.003, 0.008, 0.014], [0.0035, 0.0048, 0.0025, 0.0]) * lip
    lower = np.interp(Y_MOUTH - y0, [0, 0.005, 0.010, 0.016], [0.0035, 0.0055, 0.003, 0.0]) * lip
    d += np.where(lower_half, lower, upper) * smoothstep(0.03, 0.018, ax)
    return d * front


def _head_surface(layout: Layout, r, u, p):
    """3D points of the head surface at (row, u) for shape params ``p`` (no eyeballs)."""
    c = template_coords(layout, r, u)
    base, _ = _loop(c["y0"], c["phi"], p, c["cap"])
    radial = np.stack([base[..., 0], np.zeros_like(base[..., 0]), base[..., 2]], -1)
    radial /= np.maximum(np.linalg.norm(radial, axis=-1, keepdims=True), 1e-9)
    lower_half = (c["y0"] < Y_MOUTH) | (c["s"] > 0)
    disp = _features(c, p, lower_half)
    disp -= 0.008 * (socket_mask(c, 1) + socket_mask(c, -1))
    ear, _, _ = ear_field(c)
    disp += ear * (1 + 0.25 * p[11])
    pts = base + disp[..., None] * radial
    hair = 0.007 * (1 + 0.5 * p[14]) * hair_mask(c)
    centre = np.array([0.0, 0.0, -0.01])
    out = pts - centre
    pts = pts + hair[..., None] * out / np.linalg.norm(out, axis=-1, keepdims=True)
    m = mouth_mask(c["x0"]) * c["fold"]
    pts = pts + (m * _FOLD[0](c["s"]))[..., None] * np.array([0.0, 1.0, 0.0])
    pts = pts - (m * _FOLD[1](c["s"]))[..., None] * radial
    y = pts[..., 1]
    pts[..., 1] = y * np.where(y < 0, 1 + 0.06 * p[2], 1 + 0.05 * p[3])
    return pts


# ----------------------------------------------------------------------------- topology


def _grid(layout: Layout):
    """Continuous (row, u) of every head vertex, faces, UVs (vt, ft) of the head surface."""
    n_r, n_c = layout.n_rows, layout.n_cols
    rows = np.arange(1, n_r - 1)
    rr, jj = np.meshgrid(rows, np.arange(n_c), indexing="ij")
    r = np.concatenate([[0.0], rr.ravel().astype(float), [n_r - 1.0]])
    u = np.concatenate([[0.5], jj.ravel() / n_c, [0.5]])
    ring = lambda i, j: 1 + (i - 1) * n_c + (j % n_c)  # noqa: E731
    bottom = 1 + (n_r - 2) * n_c
    # UV vertices: poles get one per column, rings a seam duplicate.
    v_of = lambda i: HEAD_V_SPAN * i / (n_r - 1)  # noqa: E731
    vt = [np.stack([(np.arange(n_c) + 0.5) / n_c, np.full(n_c, v_of(0))], -1)]
    ri, rj = np.meshgrid(rows, np.arange(n_c + 1), indexing="ij")
    vt.append(np.stack([rj.ravel() / n_c, v_of(ri.ravel())], -1))
    vt.append(np.stack([(np.arange(n_c) + 0.5) / n_c, np.full(n_c, v_of(n_r - 1))], -1))
    vt = np.concatenate(vt)
    uv_ring = lambda i, j: n_c + (i - 1) * (n_c + 1) + j  # noqa: E731
    uv_bottom = n_c + (n_r - 2) * (n_c + 1)
    f, ft = [], []
    j = np.arange(n_c)
    f.append(np.stack([np.zeros(n_c, int), ring(1, j), ring(1, j + 1)], -1))
    ft.append(np.stack([j, uv_ring(1, j), uv_ring(1, j + 1)], -1))
    for i in range(1, n_r - 2):
        a, b, cc, d = ring(i, j), ring(i, j + 1), ring(i + 1, j + 1), ring(i + 1, j)
        ta, tb, tc, td = uv_ring(i, j), uv_ring(i, j + 1), uv_ring(i + 1, j + 1), uv_ring(i + 1, j)
        f += [np.stack([a, d, cc], -1), np.stack([a, cc, b], -1)]
        ft += [np.stack([ta, td, tc], -1), np.stack([ta, tc, tb], -1)]
    i = n_r - 2
    f.append(np.stack([ring(i, j), np.full(n_c, bottom), ring(i, j + 1)], -1))
    ft.append(np.stack([uv_ring(i, j), uv_bottom + j, uv_ring(i, j + 1)], -1))
    return r, u, np.concatenate(f), np.concatenate(ft), vt


def _eye_grid(layout: Layout):
    """Unit eyeball (front pole +z) vertices, faces and disk UVs (relative to the island centre)."""
    n_r, n_c = layout.eye_rows, layout.eye_cols
    theta = np.pi * (np.arange(1, n_r) / n_r) ** 1.3
    az = 2 * np.pi * np.arange(n_c) / n_c
    th, a = np.meshgrid(theta, az, indexing="ij")
    ring = np.stack([np.sin(th) * np.cos(a), np.sin(th) * np.sin(a), np.cos(th)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0, 0, 1.0]], ring, [[0, 0, -1.0]]])
    rad = (np.concatenate([[0.0], th.ravel()]) / np.pi) ** 0.7
    ang = np.concatenate([[0.0], a.ravel()])
    uv = np.stack([rad * np.cos(ang), rad * np.sin(ang)], -1)
    uv = np.concatenate([uv, np.stack([np.cos(az + np.pi / n_c), np.sin(az + np.pi / n_c)], -1)])
    idx = lambda i, j: 1 + i * n_c + (j % n_c)  # noqa: E731
    back = 1 + (n_r - 1) * n_c
    j = np.arange(n_c)
    f = [np.stack([np.zeros(n_c, int), idx(0, j), idx(0, j + 1)], -1)]
    ft = [f[0].copy()]
    for i in range(n_r - 2):
        quad = [idx(i, j), idx(i + 1, j), idx(i + 1, j + 1), idx(i, j + 1)]
        f += [np.stack([quad[0], quad[1], quad[2]], -1), np.stack([quad[0], quad[2], quad[3]], -1)]
        ft += [f[-2].copy(), f[-1].copy()]
    f.append(np.stack([idx(n_r - 2, j), np.full(n_c, back), idx(n_r - 2, j + 1)], -1))
    ft.append(np.stack([idx(n_r - 2, j), back + j, idx(n_r - 2, j + 1)], -1))
    return verts, np.concatenate(f), np.concatenate(ft), uv


def _eye_centres(layout: Layout, p):
    """Eyeball centres: just behind the (socket-free) skin at the eye landmarks."""
    u_tab, phi_tab = PARAM_TABLES["cols"]
    w_tab, y_tab, _ = PARAM_TABLES["rows"]
    r = float(np.interp(-Y_EYE, -y_tab, w_tab)) * layout.fold_start / float(np.interp(-Y_MOUTH, -y_tab, w_tab))
    out = []
    for side in (1, -1):
        # Loop angle whose template x is the eye landmark at eye height.
        phis = np.linspace(0, side * 1.2, 600)
        xs = _loop(np.full_like(phis, Y_EYE), phis, np.zeros(len(SHAPE_NAMES)), 1.0)[0][:, 0]
        phi = np.interp(side * EYE_X, xs if side > 0 else xs[::-1], phis if side > 0 else phis[::-1])
        c = template_coords(layout, r, np.interp(phi, phi_tab, u_tab))
        base, _ = _loop(c["y0"], c["phi"], p, c["cap"])
        radial = base * np.array([1, 0, 1.0])
        radial /= np.linalg.norm(radial)
        skin = base + _features(c, p, False) * radial
        skin[1] *= 1 + 0.05 * p[3] if skin[1] >= 0 else 1 + 0.06 * p[2]
        out.append(skin - np.array([0, 0, EYE_RADIUS + 0.0015]))
    return np.stack(out)


# ----------------------------------------------------------------------------- the model


def _geometry(layout: Layout, r, u, eye_unit, p):
    head = _head_surface(layout, r, u, p)
    centres = _eye_centres(layout, p)
    eyes = [centres[k] + EYE_RADIUS * eye_unit for k in range(2)]
    return np.concatenate([head] + eyes)


def _expression_dirs(c, n_head, n_eye):
    """Expression blendshapes (V, 3, E) on the template, analytic fields (EXPR_NAMES order)."""
    x0, y0, s = c["x0"], c["y0"], c["s"]
    ax, sx = np.abs(x0), np.sign(x0)
    front = smoothstep(0.2, 0.6, np.cos(c["phi"])) * (c["cap"] >= 1)
    lower_half = (y0 < Y_MOUTH) | (s > 0)
    inner = np.where(c["fold"], 1 - fold_depth(s), 1.0)  # 0 deep in the mouth
    corner = sum(gauss(x0 - k * 0.026, y0 - Y_MOUTH, 0.011, 0.011) for k in (-1, 1))
    lips = smoothstep(0.035, 0.022, ax) * gauss(0, y0 - Y_MOUTH, 1, 0.012)
    brows = smoothstep(0.07, 0.055, ax) * np.interp(y0, [-0.004, 0.006, 0.015, 0.03, 0.075], [0, 0.35, 1, 0.8, 0.2])
    cheek = sum(gauss(x0 - k * 0.042, y0 + 0.032, 0.016, 0.014) for k in (-1, 1))
    v = lambda *a: np.stack(np.broadcast_arrays(*a), -1)  # noqa: E731
    dirs = [
        # smile: corners up/back/out, cheeks up, lips stretch
        v(0.004 * sx * corner + 0.002 * x0 / 0.026 * lips, 0.006 * corner + 0.003 * cheek,
          -0.003 * corner + 0.002 * cheek),
        v(0, 0.007 * brows, 0.0),  # brow raise
        v(0, 0, (0.0092 * socket_blink(c, 1))),  # blink left (skin closes over the eyeball)
        v(0, 0, (0.0092 * socket_blink(c, -1))),  # blink right
        v(-0.35 * x0 * lips, -0.25 * (y0 - Y_MOUTH) * lips, 0.009 * lips * inner),  # pucker
        v(0.006 * sx * corner, -0.003 * corner - 0.002 * lips * lower_half, -0.001 * lips),  # mouth stretch
        v(0.006 * sx * cheek, 0.0, 0.006 * cheek + 0.002 * lips),  # cheek puff
        v(-0.003 * sx * brows * smoothstep(0.04, 0.01, ax), -0.005 * brows - 0.004 * corner, 0.0),  # frown
        v(0, np.where(lower_half, -0.0035, 0.003) * mouth_mask(x0) * gauss(0, y0 - Y_MOUTH, 1, 0.013), 0),  # lips part
        v(0.002 * sx * gauss(ax - 0.014, y0 + 0.04, 0.006, 0.006),
          0.003 * gauss(x0, y0 + 0.035, 0.018, 0.014) * (~lower_half), 0.0),  # sneer
    ]
    dirs = np.stack(dirs, -1) * front[:, None, None]
    return np.concatenate([dirs, np.zeros((2 * n_eye, 3, len(dirs[0, 0])))], 0).astype(np.float64)


def socket_blink(c, side):
    return smoothstep(1.2, 0.8, almond(c["x0"], c["y0"], side))


def _joint_regressor(verts, targets, candidates):
    """Sparse non-negative weights (rows sum to one) that reproduce each joint target exactly."""
    out = np.zeros((len(targets), len(verts)))
    for k, (target, cand) in enumerate(zip(targets, candidates)):
        near = cand[np.argsort(np.linalg.norm(verts[cand] - target, axis=1))[:600]]
        a = np.concatenate([verts[near].T, 10.0 * np.ones((1, len(near)))])
        w, _ = nnls(a, np.concatenate([target, [10.0]]))
        out[k, near] = w / w.sum()
    return out


def build_head_model(resolution: int = 64) -> dict:
    """FLAME-format arrays of the procedural head (``flame.head_model_from_arrays`` accepts them).

    Extra keys: ``n_shape``, ``vt``, ``ft``, ``mouth_faces``. ``resolution`` is the number of
    latitude bands (the ``synthetic.mesh_resolution`` config key); about 1.6·resolution²
    vertices.
    """
    layout = Layout.for_resolution(resolution)
    r, u, f_head, ft_head, vt_head = _grid(layout)
    eye_unit, f_eye, ft_eye, uv_eye = _eye_grid(layout)
    n_head, n_eye = len(r), len(eye_unit)
    p0 = np.zeros(len(SHAPE_NAMES))
    verts = _geometry(layout, r, u, eye_unit, p0)
    shapedirs = np.stack([(_geometry(layout, r, u, eye_unit, p0 + e) - _geometry(layout, r, u, eye_unit, p0 - e)) / 2
                          for e in np.eye(len(SHAPE_NAMES))], -1)
    c = template_coords(layout, r, u)
    exprdirs = _expression_dirs(c, n_head, n_eye)

    faces = [f_head, f_eye + n_head, f_eye + n_head + n_eye]
    vts = [vt_head] + [np.asarray(centre) + EYE_UV_RADIUS * uv_eye for centre in EYE_UV]
    offs = np.cumsum([0] + [len(x) for x in vts])
    fts = [ft_head + offs[0], ft_eye + offs[1], ft_eye + offs[2]]
    faces, ft, vt = np.concatenate(faces), np.concatenate(fts), np.concatenate(vts)
    # Outward winding (counter-clockwise seen from outside): positive enclosed volume per part.
    bounds = np.cumsum([0, len(f_head), len(f_eye), len(f_eye)])
    for a, b in zip(bounds[:-1], bounds[1:]):
        tri = verts[faces[a:b]]
        if np.einsum("fc,fc->f", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() < 0:
            faces[a:b], ft[a:b] = faces[a:b, ::-1].copy(), ft[a:b, ::-1].copy()

    # Skinning weights.
    weights = np.zeros((len(verts), 5))
    root = smoothstep(-0.12, -0.16, c["y0"]) + (c["cap"] < 1)
    root = np.clip(root, 0, 1)
    ax = np.abs(c["x0"])
    line = Y_MOUTH - 0.004 + 0.6 * np.clip(ax - 0.022, 0, None)
    width = 0.006 + 0.3 * np.clip(ax - 0.02, 0, None)
    smooth = smoothstep(line + width, line - width, c["y0"]) * smoothstep(-0.03, 0.02, c["z0"])
    smooth = smooth * smoothstep(0.0, 0.7, c["h"])
    lower_half = np.where(c["fold"], smoothstep(-0.3, 0.3, c["s"]), ((c["y0"] < Y_MOUTH) | (c["s"] > 0)).astype(float))
    near_mouth = mouth_mask(c["x0"]) * smoothstep(0.022, 0.012, np.abs(c["y0"] - Y_MOUTH))
    jaw = (near_mouth * lower_half + (1 - near_mouth) * smooth) * (1 - root)
    weights[:n_head] = np.stack([root, 1 - root - jaw, jaw], -1) @ np.eye(5)[:3]
    weights[n_head:n_head + n_eye, 3] = 1.0
    weights[n_head + n_eye:, 4] = 1.0

    head_idx = np.arange(n_head)
    targets = [np.array([0.0, -0.15, -0.015]), np.array([0.0, -0.07, -0.02]), np.array([0.0, -0.012, -0.008])]
    j_reg = np.zeros((5, len(verts)))
    j_reg[:3] = _joint_regressor(verts, targets, [head_idx] * 3)
    for k in range(2):  # eyeball centre = mean of its two poles
        start = n_head + k * n_eye
        j_reg[3 + k, [start, start + n_eye - 1]] = 0.5

    in_mouth = np.concatenate([c["fold"] & (mouth_mask(c["x0"]) > 0.05), np.zeros(2 * n_eye, bool)])
    mouth_faces = in_mouth[faces].sum(1) >= 2

    return dict(
        v_template=verts.astype(np.float32),
        shapedirs=np.concatenate([shapedirs, exprdirs], -1).astype(np.float32),
        posedirs=np.zeros((len(verts), 3, 36), np.float32),
        J_regressor=j_reg.astype(np.float32),
        weights=weights.astype(np.float32),
        kintree_table=KINTREE,
        f=faces.astype(np.int32),
        vt=vt.astype(np.float32),
        ft=ft.astype(np.int32),
        n_shape=np.array(len(SHAPE_NAMES)),
        mouth_faces=mouth_faces,
    )
