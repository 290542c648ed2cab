"""An independent float64 NumPy rasterizer (projection + per-pixel loop) and its own checks.

Written from the specification (docs/architecture.md §9 and the 3DGS / gsplat papers), not from
``gem_jax.render``: the other render tests (test_project.py, test_render_*.py) import it as
their oracle. It shares no code with the package; rotations come from SciPy (scalar-last
quaternions, so the wxyz convention is checked too), eigenvalues from ``eigvalsh``.

Specification it encodes:
* EWA: Σ = R S Sᵀ Rᵀ; t = W μ + w; J = [[fx/z, 0, −fx·x̃/z²], [0, fy/z, −fy·ỹ/z²]] with x̃/z clamped
  to [−cx/fx − 0.3·W/(2fx), (W−cx)/fx + 0.3·W/(2fx)] (likewise y); Σ' = J W Σ Wᵀ Jᵀ + 0.3 I;
  radius ⌈3√λmax(Σ')⌉; culled if z < 0.01, non-finite, det ≤ 0, or the square is off screen.
* A Gaussian reaches the 16×16 tiles [⌊(u−r)/16⌋, ⌈(u+r)/16⌉) × [⌊(v−r)/16⌋, ⌈(v+r)/16⌉).
* Per pixel centre (j+½, i+½), Gaussians of its tile by (depth, index): σ = ½dᵀΣ'⁻¹d, skip σ<0;
  α = min(0.99, o e^{−σ}); skip α < 1/255; stop before T would fall below 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial.transform import Rotation

TILE = 16


def np_project(means, quats, scales, opacities, colors, viewmat, K, width, height):
    """Per-Gaussian dict list: mean2d, conic (a,b,c), depth, radius, opacity, color (culled: None)."""
    out = []
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    for i in range(len(means)):
        values = [means[i], quats[i], scales[i], [opacities[i]], colors[i]]
        if not all(np.all(np.isfinite(v)) for v in values) or not np.any(quats[i]):
            out.append(None)
            continue
        x, y, z = rot @ means[i] + trans
        if z < 0.01:
            out.append(None)
            continue
        w, qx, qy, qz = quats[i]
        R = Rotation.from_quat([qx, qy, qz, w]).as_matrix()
        cov3 = R @ np.diag(np.square(scales[i])) @ R.T
        margin_x, margin_y = 0.3 * width / (2 * fx), 0.3 * height / (2 * fy)
        xz = min(max(x / z, -cx / fx - margin_x), (width - cx) / fx + margin_x)
        yz = min(max(y / z, -cy / fy - margin_y), (height - cy) / fy + margin_y)
        J = np.array([[fx / z, 0, -fx * xz / z], [0, fy / z, -fy * yz / z]])
        cov2 = J @ rot @ cov3 @ rot.T @ J.T + 0.3 * np.eye(2)
        if np.linalg.det(cov2) <= 0:
            out.append(None)
            continue
        inv = np.linalg.inv(cov2)
        radius = math.ceil(3 * math.sqrt(np.linalg.eigvalsh(cov2).max()))
        u, v = fx * x / z + cx, fy * y / z + cy
        if u + radius <= 0 or u - radius >= width or v + radius <= 0 or v - radius >= height:
            out.append(None)
            continue
        out.append({
            "mean2d": np.array([u, v]), "conic": np.array([inv[0, 0], inv[0, 1], inv[1, 1]]),
            "depth": z, "radius": radius, "opacity": float(opacities[i]), "color": np.asarray(colors[i], float),
        })  # fmt: skip
    return out


def np_tile_rect(mean2d, radius, width, height):
    """(tx0, ty0, tx1, ty1), ends exclusive, of the tiles a bounding square touches."""
    tiles_x, tiles_y = math.ceil(width / TILE), math.ceil(height / TILE)
    u, v = mean2d
    tx0 = min(max(math.floor((u - radius) / TILE), 0), tiles_x)
    tx1 = min(max(math.ceil((u + radius) / TILE), 0), tiles_x)
    ty0 = min(max(math.floor((v - radius) / TILE), 0), tiles_y)
    ty1 = min(max(math.ceil((v + radius) / TILE), 0), tiles_y)
    return tx0, ty0, tx1, ty1


def np_blend(splats, background, width, height, *, tiled=True):
    """Per-pixel loop over ``splats`` (dicts as from np_project; None entries are skipped).

    With ``tiled`` each splat reaches only the tiles of its bounding square (the rasterizer's
    support); otherwise every pixel. Returns image (H,W,3), alpha (H,W), depth (H,W).
    """
    live = [(s["depth"], i, s) for i, s in enumerate(splats) if s is not None]
    live.sort(key=lambda t: (t[0], t[1]))
    rects = [np_tile_rect(s["mean2d"], s["radius"], width, height) for _, _, s in live]
    image = np.zeros((height, width, 3))
    alpha = np.zeros((height, width))
    depth = np.zeros((height, width))
    for i in range(height):
        for j in range(width):
            tx, ty = j // TILE, i // TILE
            T, C, D = 1.0, np.zeros(3), 0.0
            for (z, _, s), (x0, y0, x1, y1) in zip(live, rects):
                if tiled and not (x0 <= tx < x1 and y0 <= ty < y1):
                    continue
                dx, dy = s["mean2d"][0] - (j + 0.5), s["mean2d"][1] - (i + 0.5)
                a, b, c = s["conic"]
                sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                if sigma < 0:
                    continue
                al = min(0.99, s["opacity"] * math.exp(-sigma))
                if al < 1 / 255:
                    continue
                if T * (1 - al) < 1e-4:
                    break
                C += al * T * s["color"]
                D += al * T * z
                T *= 1 - al
            image[i, j] = C + T * np.asarray(background, float)
            alpha[i, j] = 1 - T
            depth[i, j] = D
    return image, alpha, depth


def np_splats_2d(means2d, conics, colors, opacities, depths, radii=None):
    """Splat dicts from screen-space arrays (radii None: 10⁹, i.e. every tile)."""
    n = len(means2d)
    radii = np.full(n, 10**9) if radii is None else radii
    return [
        None if radii[i] <= 0 else {
            "mean2d": np.asarray(means2d[i], float), "conic": np.asarray(conics[i], float),
            "depth": float(depths[i]), "radius": int(radii[i]), "opacity": float(opacities[i]),
            "color": np.asarray(colors[i], float),
        }  # fmt: skip
        for i in range(n)
    ]


def random_camera(rng, width, height, *, principal=(0.5, 0.5)):
    """viewmat (4,4) (random rotation, camera at distance ~3 from the origin) and K (3,3)."""
    rot = Rotation.random(random_state=rng.integers(2**31)).as_matrix()
    viewmat = np.eye(4)
    viewmat[:3, :3] = rot
    viewmat[:3, 3] = [0.1, -0.05, 3.0]  # the world origin sits 3 units in front of the camera
    f = 1.1 * width
    K = np.array([[f, 0, principal[0] * width], [0, f * 1.02, principal[1] * height], [0, 0, 1.0]])
    return viewmat, K


def random_gaussians(rng, n, viewmat, *, scale=(-3.5, -2.0), opacity=(0.05, 0.95), spread=1.0):
    """n Gaussians around the world origin (some outside the view), as float64 arrays."""
    means = rng.normal(size=(n, 3)) * 0.5 * spread
    quats = rng.normal(size=(n, 4))
    quats /= np.linalg.norm(quats, axis=-1, keepdims=True)
    scales = np.exp(rng.uniform(*scale, size=(n, 3)))
    opacities = rng.uniform(*opacity, size=n)
    colors = rng.uniform(0, 1, size=(n, 3))
    return means, quats, scales, opacities, colors


# --- the oracle's own sanity checks (against closed forms) -------------------------------


def test_oracle_one_gaussian_is_colour_times_alpha_plus_background():
    splats = np_splats_2d([[5.2, 6.1]], [[0.2, 0.03, 0.1]], [[0.9, 0.2, 0.4]], [0.6], [2.0])
    bg = np.array([0.3, 0.3, 0.9])
    image, alpha, depth = np_blend(splats, bg, 12, 10)
    jj, ii = np.meshgrid(np.arange(12) + 0.5, np.arange(10) + 0.5)
    dx, dy = 5.2 - jj, 6.1 - ii
    a = 0.6 * np.exp(-(0.5 * (0.2 * dx**2 + 0.1 * dy**2) + 0.03 * dx * dy))
    a = np.where(a >= 1 / 255, a, 0)
    np.testing.assert_allclose(alpha, a, atol=1e-15)
    np.testing.assert_allclose(image, a[..., None] * [0.9, 0.2, 0.4] + (1 - a[..., None]) * bg, atol=1e-15)
    np.testing.assert_allclose(depth, 2 * a, atol=1e-15)


def test_oracle_projection_of_a_point_on_the_axis_is_the_principal_point():
    viewmat, K = np.eye(4), np.array([[50.0, 0, 13.0], [0, 40.0, 27.0], [0, 0, 1]])
    (s,) = np_project(np.array([[0, 0, 2.0]]), np.array([[1.0, 0, 0, 0]]), np.full((1, 3), 0.1),
                      np.array([0.5]), np.full((1, 3), 0.5), viewmat, K, 40, 30)  # fmt: skip
    np.testing.assert_allclose(s["mean2d"], [13.0, 27.0])
    # isotropic 0.1 at z=2: screen std 0.05·f per axis, plus the 0.3 dilation
    np.testing.assert_allclose(s["conic"], [1 / (2.5**2 + 0.3), 0, 1 / (2.0**2 + 0.3)])
    assert s["radius"] == math.ceil(3 * math.sqrt(2.5**2 + 0.3))
