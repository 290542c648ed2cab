"""The C++ CPU rasterizer (``backend="cpu"``: gem_jax/render/cpu_frame.py, kernels/).

Specification (docs/architecture.md §9): one FFI call renders a frame as ``project_gaussians`` →
``tile_intersections`` → blending would — the same projection (means2d, conics, depths, radii
and culled set, for near-plane, behind-camera, off-screen, frustum-clamped, NaN/Inf and
degenerate Gaussians), the same tile lists (order, count, overflow and dropped pairs), the
image of a float64 blending oracle; its backward gives the reference backend's gradients
w.r.t. means, quats, scales, opacities, colours, viewmat, K and background and passes
``check_grads``; it is deterministic and works under ``jit``, ``vmap`` and batched cameras.

Float32 rounding differs between XLA (which fuses multiply-adds) and the C++ code (which does
not), so integer decisions can only be compared exactly away from their thresholds: the
random scenes leave out Gaussians that lie within a relative 1e-4 of one (radius rounding,
near plane, image border, tile border, depth ties) — a set of measure zero, excluded by
construction rather than by tolerance.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
import blend_scenes
from test_render_oracle import random_camera, random_gaussians

from gem_jax.render import available_backends, rasterize
from gem_jax.render import _ffi
from gem_jax.render.cpu_frame import count_cpu, render_cpu
from gem_jax.render.project import project_gaussians
from gem_jax.render.tiles import tile_intersections
from gem_jax.types import Camera, Gaussians, stack_cameras

TILE = 16
MARGIN = 1e-4  # relative distance to a threshold below which a random Gaussian is left out


@pytest.fixture(autouse=True)
def _kernel_built():
    blend_scenes.require_kernel("cpu")


# --- scenes --------------------------------------------------------------------------------


def to_jax(arrays, viewmat, K, width, height):
    g = Gaussians(*(jnp.asarray(np.asarray(x, np.float32)) for x in arrays))
    cam = Camera(jnp.asarray(viewmat, jnp.float32), jnp.asarray(K, jnp.float32), width, height)
    return g, cam


def threshold_distances(arrays, viewmat, K, width, height):
    """Per Gaussian, the smallest relative distance (float64) of the projection's integer
    decisions to their thresholds: near plane, ⌈3√λ⌉, the image border test and, on screen,
    the tile borders ⌊(u−r)/16⌋, ⌈(u+r)/16⌉ (and v). Non-finite Gaussians and those far behind the
    camera get +inf (nothing borderline about them)."""
    means, quats, scales, _, _ = (np.asarray(x, np.float64) for x in arrays)
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    out = np.full(len(means), np.inf)
    for i in range(len(means)):
        finite = np.isfinite(means[i]).all() and np.isfinite(quats[i]).all() and np.isfinite(scales[i]).all()
        if not finite or not quats[i].any():
            continue
        x, y, z = R @ means[i] + t
        d = abs(z - 0.01) / max(abs(z), 1.0)
        if z < 0.01:
            out[i] = d
            continue
        w, qx, qy, qz = quats[i] / np.linalg.norm(quats[i])
        Rq = np.array([
            [1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - w * qz), 2 * (qx * qz + w * qy)],
            [2 * (qx * qy + w * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - w * qx)],
            [2 * (qx * qz - w * qy), 2 * (qy * qz + w * qx), 1 - 2 * (qx * qx + qy * qy)],
        ])  # fmt: skip
        M = Rq * scales[i]
        lim = lambda c, f, n: (-(c / f + 0.3 * n / (2 * f)), (n - c) / f + 0.3 * n / (2 * f))  # noqa: E731
        xz, yz = np.clip(x / z, *lim(cx, fx, width)), np.clip(y / z, *lim(cy, fy, height))
        J = np.array([[fx / z, 0, -fx * xz / z], [0, fy / z, -fy * yz / z]])
        cov = J @ R @ M @ M.T @ R.T @ J.T + 0.3 * np.eye(2)
        raw = 3 * math.sqrt(np.linalg.eigvalsh(cov).max())
        r = math.ceil(raw)
        u, v = fx * x / z + cx, fy * y / z + cy
        size = max(abs(u), abs(v), r, width, height)
        edges = [abs(u + r), abs(u - r - width), abs(v + r), abs(v - r - height)]
        on_screen = u + r > 0 and u - r < width and v + r > 0 and v - r < height
        tiles = [abs(e / TILE - round(e / TILE)) * TILE for e in (u - r, u + r, v - r, v + r)] if on_screen else []
        out[i] = min(d, abs(raw - round(raw)) / raw, min(edges + tiles) / size)
    return out


def mixed_scene(seed, n, width, height, principal=(0.5, 0.5)):
    """Random Gaussians around the view (many off screen or behind the camera) plus one of
    each special case, minus those within MARGIN of a threshold. Returns (arrays, viewmat, K)
    as float64 NumPy and the index of each special case."""
    rng = np.random.default_rng(seed)
    viewmat, K = random_camera(rng, width, height, principal=principal)
    means, quats, scales, opacities, colors = random_gaussians(rng, n, viewmat, spread=2.5)
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    world = lambda p_cam: R.T @ (np.asarray(p_cam, float) - t)  # noqa: E731
    z_axis = K[0, 0] / width  # x/z of the right image border is about 1 / (2 z_axis)
    special = {
        "camera centre": world([0, 0, 0]),
        "behind": world([0.1, 0.0, -1.0]),
        "before near plane": world([0.0, 0.0, 0.005]),
        "near": world([0.001, 0.002, 0.05]),
        "clamped": world([2.5 / z_axis, 0.0, 3.0]),  # x/z far beyond the clamp, yet visible
        "far off screen": world([40.0, 0.0, 3.0]),
    }
    names = list(special)
    extra = len(names) + 6
    means = np.concatenate([means, [special[k] for k in names], np.tile(world([0.1, 0.1, 3.0]), (6, 1))])
    quats = np.concatenate([quats, np.tile([1.0, 0.2, 0.0, 0.1], (extra, 1))])
    scales = np.concatenate([scales, np.full((extra, 3), 0.04)])
    opacities = np.concatenate([opacities, np.full(extra, 0.5)])
    colors = np.concatenate([colors, np.full((extra, 3), 0.5)])
    scales[n + names.index("clamped")] = [2.0, 2.0, 0.5]
    scales[n + names.index("near")] = [0.0005, 0.0005, 0.0005]
    bad = n + len(names)
    means[bad, 0] = np.nan
    quats[bad + 1, 2] = np.inf
    quats[bad + 2] = 0.0  # zero quaternion
    scales[bad + 3, 1] = -np.inf
    opacities[bad + 4] = np.nan
    scales[bad + 5] = 0.0  # degenerate: a point, drawn as the 0.3 px² dilation
    names += ["nan mean", "inf quat", "zero quat", "-inf scale", "nan opacity", "zero scales"]
    arrays = [means, quats, scales, opacities, colors]
    keep = threshold_distances(arrays, viewmat, K, width, height) > MARGIN
    assert keep[n:].all(), "a special case was placed next to a threshold"
    order = np.argsort(np.where(keep, 0, 1), kind="stable")[: keep.sum()]  # drop, keep order
    arrays = [x[order] for x in arrays]
    index = {name: int(np.flatnonzero(order == n + k)[0]) for k, name in enumerate(names)}
    return arrays, viewmat, K, index


def cloud(seed, n, width, height, *, scale, opacity, depth=(2.5, 4.5), aniso=1.0):
    """n Gaussians in front of an identity camera filling the image (float64 NumPy)."""
    rng = np.random.default_rng(seed)
    f = 0.9 * max(width, height)
    K = np.array([[f, 0, 0.45 * width], [0, f, 0.55 * height], [0, 0, 1.0]])
    z = rng.uniform(*depth, n)
    xy = rng.uniform(-0.55, 0.55, (n, 2)) * np.array([width, height]) / f * z[:, None]
    quats = rng.normal(size=(n, 4))
    scales = np.exp(rng.uniform(np.log(scale[0]), np.log(scale[1]), (n, 3)))
    scales[:, 2] *= aniso
    arrays = [np.concatenate([xy, z[:, None]], 1), quats / np.linalg.norm(quats, axis=-1, keepdims=True), scales,
              rng.uniform(*opacity, n), rng.uniform(0, 1, (n, 3))]  # fmt: skip
    return arrays, np.eye(4), K


# --- projection and tile lists ----------------------------------------------------------------


@pytest.mark.parametrize("principal", [(0.5, 0.5), (0.2, 0.85)])
def test_projection_equals_project_gaussians(principal):
    width, height = 70, 45
    arrays, viewmat, K, index = mixed_scene(11, 300, width, height, principal)
    g, cam = to_jax(arrays, viewmat, K, width, height)
    want = jax.jit(project_gaussians)(g, cam)
    got = jax.jit(lambda g, cam: render_cpu(g, cam, jnp.zeros(3), 4096).projected)(g, cam)
    radii = np.asarray(want.radii)
    np.testing.assert_array_equal(np.asarray(got.radii), radii)  # the same culled set
    visible = radii > 0
    assert 40 < visible.sum() < len(radii) - 40  # both projection and culling are exercised
    culled = {name for name, i in index.items() if radii[i] == 0}
    assert culled == {"camera centre", "behind", "before near plane", "far off screen", "nan mean",
                      "inf quat", "zero quat", "-inf scale", "nan opacity"}  # fmt: skip
    assert radii[index["clamped"]] > 0 and radii[index["near"]] > 0 and radii[index["zero scales"]] == 2
    np.testing.assert_allclose(np.asarray(got.means2d), np.asarray(want.means2d), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(got.depths), np.asarray(want.depths), rtol=1e-6)
    conics, want_conics = np.asarray(got.conics), np.asarray(want.conics)
    scale = np.abs(want_conics).max(-1, keepdims=True)
    np.testing.assert_array_less(np.abs(conics - want_conics), np.broadcast_to(1e-5 * scale + 1e-30, conics.shape))
    for field in ("means2d", "conics", "depths", "opacities", "colors"):
        assert not np.asarray(getattr(got, field))[~visible].any(), field  # culled: exact zeros
    np.testing.assert_array_equal(np.asarray(got.opacities), np.asarray(want.opacities))


@pytest.mark.parametrize("overflow", [0, 57])
def test_tile_lists_equal_tiles_py(overflow):
    """Same lists as tiles.py; with too small a capacity the same true count, overflow and
    dropped pairs (the farthest Gaussians'), and count_cpu is the true count."""
    width, height = 83, 50
    arrays, viewmat, K, _ = mixed_scene(5, 400, width, height, (0.4, 0.6))
    g, cam = to_jax(arrays, viewmat, K, width, height)
    p = jax.jit(project_gaussians)(g, cam)
    total = int(tile_intersections(p.means2d, p.radii, p.depths, width, height, 0).num_intersections)
    assert total > 300
    capacity = total - overflow + (37 if overflow == 0 else 0)
    want = tile_intersections(p.means2d, p.radii, p.depths, width, height, capacity)
    got = render_cpu(g, cam, jnp.zeros(3), capacity).lists
    assert int(got.num_intersections) == total == int(count_cpu(g, cam))
    assert int(got.overflow) == int(want.overflow) == overflow
    np.testing.assert_array_equal(np.asarray(got.tile_ranges), np.asarray(want.tile_ranges))
    np.testing.assert_array_equal(np.asarray(got.gaussian_ids), np.asarray(want.gaussian_ids))


# --- blending --------------------------------------------------------------------------------


def oracle64(frame, background, width, height):
    """The float64 blending oracle (blend_scenes.py) on the projected Gaussians and tile lists
    of a CpuFrame: image, alpha, depth, and the number of pixels where the 1e-4 stop acts."""
    p = frame.projected
    args = (p.means2d, p.conics, p.colors, p.opacities, p.depths, background, frame.lists.gaussian_ids,
            frame.lists.tile_ranges)
    return [*blend_scenes.oracle64(args, width, height), int(blend_scenes.stopped_pixels(args, width, height).sum())]


SCENES = {  # name: (width, height, N, cloud options)
    "odd-size": (37, 29, 120, {"scale": (0.01, 0.06), "opacity": (0.05, 0.95)}),
    # ~600 faint, large Gaussians in a 2x2-tile image: lists of hundreds (many batches of 16)
    "long-lists": (32, 32, 600, {"scale": (0.04, 0.12), "opacity": (0.01, 0.05)}),
    # opaque and crowded: pixels stop (T < 1e-4) and later Gaussians must be skipped
    "dense-opaque": (48, 40, 400, {"scale": (0.08, 0.25), "opacity": (0.7, 1.0)}),
    # thin, long, rotated Gaussians: the culling boxes must never clip them
    "needles": (64, 48, 80, {"scale": (0.002, 0.006), "opacity": (0.3, 0.9), "aniso": 60.0}),
}


def scene(name, seed=3):
    width, height, n, options = SCENES[name]
    arrays, viewmat, K = cloud(seed, n, width, height, **options)
    g, cam = to_jax(arrays, viewmat, K, width, height)
    background = jnp.asarray(np.random.default_rng(seed).uniform(0, 1, 3), jnp.float32)
    return g, cam, background


@pytest.mark.parametrize("name", SCENES)
def test_forward_equals_float64_oracle_and_reference(name):
    g, cam, bg = scene(name)
    width, height = cam.width, cam.height
    frame = render_cpu(g, cam, bg, 8192)
    assert int(frame.lists.overflow) == 0 and float(frame.alpha.max()) > 0.15
    *want, stopped = oracle64(frame, bg, width, height)
    assert (int(stopped) > 20) == (name == "dense-opaque")  # the early stop is exercised
    ref = rasterize(g, cam, bg, backend="reference", capacity=8192)
    for label, got, w, r in zip(("image", "alpha", "depth"), (frame.image, frame.alpha, frame.depth), want,
                                (ref.image, ref.alpha, ref.depth)):  # fmt: skip
        atol = 1e-5 * (5.0 if label == "depth" else 1.0)  # depths are up to 5
        np.testing.assert_allclose(np.asarray(got), w, rtol=0, atol=atol, err_msg=label)
        np.testing.assert_allclose(np.asarray(got), np.asarray(r), rtol=0, atol=atol, err_msg=label)


# --- gradients -------------------------------------------------------------------------------

NAMES = ("means", "quats", "scales", "opacities", "colors", "viewmat", "K", "background")


def grads(backend, g, cam, bg, weights, capacity=8192):
    """Gradients of a random linear functional of (image, alpha, depth) w.r.t. every input."""

    def loss(means, quats, scales, opacities, colors, viewmat, K, background):
        g2 = Gaussians(means, quats, scales, opacities, colors)
        out = rasterize(g2, cam.replace(viewmat=viewmat, K=K), background, backend=backend, capacity=capacity)
        return sum(jnp.sum(o * w) for o, w in zip((out.image, out.alpha, out.depth), weights))

    args = (g.means, g.quats, g.scales, g.opacities, g.colors, cam.viewmat, cam.K, bg)
    return jax.jit(jax.grad(loss, argnums=tuple(range(8))))(*args)


def random_weights(rng, shape_hw):
    h, w = shape_hw
    return [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((h, w, 3), (h, w), (h, w))]


def assert_grads_close(got, want, names=NAMES):
    """gsplat-style tolerances for float32 gradients, relative to each gradient's scale."""
    for name, a, b in zip(names, got, want):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isfinite(a).all(), name
        scale = max(float(np.abs(b).max()), 1e-6)
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4 * scale, err_msg=f"v_{name}")


@pytest.mark.parametrize("name", ["dense-opaque", "needles"])
def test_gradients_equal_the_reference(name):
    g, cam, bg = scene(name, seed=4)
    weights = random_weights(np.random.default_rng(5), (cam.height, cam.width))
    got, want = grads("cpu", g, cam, bg, weights), grads("reference", g, cam, bg, weights)
    assert float(jnp.abs(got[0]).max()) > 1e-2
    assert_grads_close(got, want)


def test_gradients_with_culled_and_clamped_gaussians():
    """NaN/Inf, behind-camera and off-screen Gaussians get exactly zero gradients; the
    frustum-clamped one and the camera's K and viewmat get the reference's."""
    width, height = 70, 45
    arrays, viewmat, K, index = mixed_scene(11, 300, width, height, (0.3, 0.6))
    g, cam = to_jax(arrays, viewmat, K, width, height)
    bg = jnp.asarray([0.2, 0.5, 0.7], jnp.float32)
    weights = random_weights(np.random.default_rng(6), (height, width))
    got, want = grads("cpu", g, cam, bg, weights), grads("reference", g, cam, bg, weights)
    assert_grads_close(got, want)
    culled = np.asarray(render_cpu(g, cam, bg, 8192).projected.radii) == 0
    for name, v in zip(NAMES[:5], got[:5]):
        assert not np.asarray(v)[culled].any(), name
    assert np.abs(np.asarray(got[0][index["clamped"]])).max() > 0


def test_check_grads_on_a_smooth_scene():
    """Finite differences (jax.test_util.check_grads, reverse mode) for every input, on a scene
    whose pixel/Gaussian pairs all lie away from the blending thresholds and whose tile sets
    cannot change (every Gaussian in every tile). Each input is perturbed in units of its own
    scale, with the float32 central-difference step (3 eps_mach)^(1/3) ~ 1e-2."""
    from test_render_api import scene3d

    g, cam, bg = scene3d(jnp.float32)
    frame = render_cpu(g, cam, bg, 64)
    assert int(frame.lists.num_intersections) == 12 * 4 and float(frame.alpha.max()) > 0.3
    args = (g.means, g.quats, g.scales, g.opacities, g.colors, cam.viewmat, cam.K, bg)

    def render(*a):
        g2 = Gaussians(*a[:5])
        out = render_cpu(g2, cam.replace(viewmat=a[5], K=a[6]), a[7], 64)
        return out.image, out.alpha, out.depth

    for i, name in enumerate(NAMES):
        unit = float(jnp.sqrt(jnp.mean(args[i] ** 2)))

        def along(d, i=i, unit=unit):
            return render(*args[:i], args[i] + unit * d, *args[i + 1 :])

        check_grads(jax.jit(along), (jnp.zeros_like(args[i]),), order=1, modes=("rev",), eps=1e-2)


def test_backward_is_deterministic():
    g, cam, bg = scene("odd-size", seed=8)
    weights = random_weights(np.random.default_rng(9), (cam.height, cam.width))
    first, second = grads("cpu", g, cam, bg, weights), grads("cpu", g, cam, bg, weights)
    for name, a, b in zip(NAMES, first, second):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


# --- rasterize: backend choice, batching ------------------------------------------------------


def test_auto_picks_the_cpu_pass():
    assert available_backends()[0] == "cpu"  # (capacity and overflow: test_render_api.py)


def test_batched_cameras_vmap_and_jit():
    """A batched Camera (one FFI call for all cameras) and jax.vmap over cameras give the
    per-camera renders; gradients through the batch are the per-camera sums."""
    g, cam0, _ = scene("odd-size", seed=11)
    rng = np.random.default_rng(12)
    cams = [cam0]
    for dx in (0.05, -0.08):
        viewmat = np.array(cam0.viewmat)
        viewmat[0, 3] += dx
        K = np.array(cam0.K) * np.array([[1.1, 1, 0.9], [1, 0.95, 1.05], [1, 1, 1]])
        cams.append(Camera(jnp.asarray(viewmat), jnp.asarray(K, jnp.float32), cam0.width, cam0.height))
    batch = stack_cameras(cams)
    bgs = jnp.asarray(rng.uniform(0, 1, (3, 3)), jnp.float32)
    singles = [rasterize(g, c, b, backend="cpu", capacity=4096) for c, b in zip(cams, bgs)]
    batched = rasterize(g, batch, bgs, backend="cpu", capacity=4096)
    vmapped = jax.jit(jax.vmap(lambda c, b: rasterize(g, c, b, backend="cpu", capacity=4096)))(batch, bgs)
    for i, s in enumerate(singles):
        assert float(s.alpha.max()) > 0.2
        for out in (batched, vmapped):
            for name in ("image", "alpha", "depth"):
                np.testing.assert_array_equal(np.asarray(getattr(out, name)[i]), np.asarray(getattr(s, name)))
            assert int(out.stats["num_intersections"][i]) == int(s.stats["num_intersections"])

    def loss(g, viewmat, K):
        out = rasterize(g, batch.replace(viewmat=viewmat, K=K), bgs[0], backend="cpu", capacity=4096)
        return jnp.sum(out.image * jnp.array([1.0, -0.5, 0.3])) + jnp.sum(out.depth)

    v_g, v_view, v_K = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(g, batch.viewmat, batch.K)
    for i, c in enumerate(cams):
        single = jax.grad(loss, argnums=(0, 1, 2))(g, c.viewmat[None], c.K[None])
        np.testing.assert_allclose(np.asarray(v_view[i]), np.asarray(single[1][0]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(v_K[i]), np.asarray(single[2][0]), rtol=1e-5, atol=1e-5)
    per_camera = [jax.grad(loss)(g, c.viewmat[None], c.K[None]).means for c in cams]
    np.testing.assert_allclose(np.asarray(v_g.means), np.asarray(sum(per_camera)), rtol=1e-4, atol=1e-4)


# --- corner cases ---------------------------------------------------------------------------


def one_gaussian(mean, scale, opacity, color=(0.9, 0.4, 0.1), principal=(8.5, 8.5)):
    """One isotropic Gaussian in front of an identity camera with f = 20 on a 16x16 image."""
    g = Gaussians(
        means=jnp.asarray([mean], jnp.float32), quats=jnp.asarray([[1.0, 0, 0, 0]], jnp.float32),
        scales=jnp.full((1, 3), scale, jnp.float32), opacities=jnp.asarray([opacity], jnp.float32),
        colors=jnp.asarray([color], jnp.float32),
    )  # fmt: skip
    K = jnp.asarray([[20.0, 0, principal[0]], [0, 20.0, principal[1]], [0, 0, 1]])
    return g, Camera(jnp.eye(4), K, 16, 16)


def test_one_gaussian_is_colour_times_alpha_plus_background():
    g, cam = one_gaussian([0.0, 0.0, 2.0], 0.2, 0.7, principal=(8.3, 7.8))  # on the axis: J = f/z I
    bg = jnp.asarray([0.1, 0.2, 0.3])
    frame = render_cpu(g, cam, bg, 64)
    (u, v), (a, b, c) = np.asarray(frame.projected.means2d[0]), np.asarray(frame.projected.conics[0])
    np.testing.assert_allclose([u, v], [8.3, 7.8], rtol=1e-6)
    np.testing.assert_allclose([a, b, c], [1 / (2.0**2 + 0.3), 0, 1 / (2.0**2 + 0.3)], rtol=1e-5, atol=1e-9)
    jj, ii = np.meshgrid(np.arange(16) + 0.5, np.arange(16) + 0.5)
    dx, dy = u - jj, v - ii
    alpha = 0.7 * np.exp(-0.5 * (a * dx**2 + c * dy**2) - b * dx * dy)
    alpha = np.where(alpha >= 1 / 255, alpha, 0.0)
    np.testing.assert_allclose(np.asarray(frame.alpha), alpha, atol=1e-6)
    want = alpha[..., None] * [0.9, 0.4, 0.1] + (1 - alpha[..., None]) * np.asarray(bg)
    np.testing.assert_allclose(np.asarray(frame.image), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(frame.depth), 2.0 * alpha, atol=1e-5)


def test_opacity_one_clamps_alpha_to_099_with_zero_gradient():
    g, cam = one_gaussian([0.0, 0.0, 2.0], 0.2, 1.0, principal=(8.5, 8.5))  # on pixel (8, 8)

    def centre_alpha(opacities):
        return render_cpu(g.replace(opacities=opacities), cam, jnp.zeros(3), 64).alpha[8, 8]

    assert float(centre_alpha(g.opacities)) == pytest.approx(0.99, abs=1e-6)
    assert float(jax.grad(centre_alpha)(g.opacities)[0]) == 0.0  # min(0.99, .) is flat there


def test_three_stacked_opaque_gaussians_stop_after_two():
    """alpha 0.98 each: T goes 1 -> 0.02 -> 4e-4, the third would take it to 8e-6 < 1e-4, so
    it is excluded and gets no gradient through that pixel."""
    g = Gaussians(
        means=jnp.asarray([[0, 0, 2.0], [0, 0, 2.5], [0, 0, 3.0]], jnp.float32),
        quats=jnp.tile(jnp.asarray([[1.0, 0, 0, 0]]), (3, 1)),
        scales=jnp.asarray([[0.2] * 3, [0.25] * 3, [0.3] * 3], jnp.float32),  # same screen size
        opacities=jnp.full((3,), 0.98, jnp.float32), colors=jnp.eye(3, dtype=jnp.float32),
    )  # fmt: skip
    cam = Camera(jnp.eye(4), jnp.asarray([[20.0, 0, 8.5], [0, 20.0, 8.5], [0, 0, 1]]), 16, 16)
    frame = render_cpu(g, cam, jnp.zeros(3), 64)
    np.testing.assert_allclose(np.asarray(frame.image[8, 8]), [0.98, 0.02 * 0.98, 0.0], rtol=1e-5)
    np.testing.assert_allclose(float(frame.alpha[8, 8]), 1 - 0.02 * 0.02, rtol=1e-6)
    v_colors = jax.grad(lambda c: render_cpu(g.replace(colors=c), cam, jnp.zeros(3), 64).image[8, 8].sum())(g.colors)
    assert not np.asarray(v_colors[2]).any()


def test_empty_and_fully_culled_scenes_are_background():
    bg = jnp.asarray([0.2, 0.5, 0.7])
    g, cam = one_gaussian([0.0, 0.0, 2.0], 0.2, 0.5)
    empty = jax.tree.map(lambda x: x[:0], g)
    for gaussians, camera in ((empty, cam), (g, cam.replace(viewmat=cam.viewmat.at[0, 3].set(jnp.nan)))):
        out = rasterize(gaussians, camera, bg, backend="cpu")
        np.testing.assert_array_equal(np.asarray(out.image), np.broadcast_to(np.asarray(bg), (16, 16, 3)))
        assert not np.asarray(out.alpha).any() and int(out.stats["num_visible"]) == 0
    v = jax.grad(lambda g: rasterize(g, camera, bg, backend="cpu", capacity=64).image.sum())(g)
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(v))
