"""Scenes, tile lists and the float64 oracle shared by the blending kernels' tests
(test_ffi_cpu.py, test_cuda_emulated.py, test_cuda_gpu.py).

The oracle is a direct, vectorised transcription of the blending rule of docs/architecture.md
§9 in float64 jnp (autodiff gives its gradients); scenes are fresh random 2D Gaussians or
random 3D Gaussians through gem_jax.render.project and .tiles.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax.render import _ffi

TILE = 16
GRAD_NAMES = ("means2d", "conics", "colors", "opacities", "depths", "background")


def require_kernel(backend: str) -> None:
    """Skip (fail under CI, which must build it) when the `backend` kernel is not loaded."""
    if getattr(_ffi, f"HAS_{backend.upper()}_KERNEL"):
        return
    message = _ffi.build_instructions(backend)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # as CI services set it
        pytest.fail(f"CI must build the {backend} kernel: {message}")
    pytest.skip(message)


# --- scenes and tile lists -------------------------------------------------------------


def random_scene(rng, width, height, n, *, opacity=(0.05, 0.95), scale=(0.8, 6.0), margin=8.0):
    """Random 2D Gaussians over (and a little beyond) a width x height image, as float32.

    Returns dict with means2d (N,2), conics (N,3), colors (N,3), opacities (N,),
    depths (N,), background (3,) and radii (N,) (3 sigma, pixels).
    """
    means = rng.uniform([-margin, -margin], [width + margin, height + margin], size=(n, 2))
    s = rng.uniform(*scale, size=(n, 2))
    theta = rng.uniform(0, np.pi, size=n)
    rot = np.stack([np.cos(theta), -np.sin(theta), np.sin(theta), np.cos(theta)], -1).reshape(n, 2, 2)
    cov = rot @ (s[:, :, None] ** 2 * np.eye(2)) @ np.transpose(rot, (0, 2, 1))
    inv = np.linalg.inv(cov)
    f32 = np.float32
    return {
        "means2d": means.astype(f32),
        "conics": np.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], -1).astype(f32),
        "colors": rng.uniform(0, 1, size=(n, 3)).astype(f32),
        "opacities": rng.uniform(*opacity, size=n).astype(f32),
        "depths": rng.uniform(1, 10, size=n).astype(f32),
        "background": rng.uniform(0, 1, size=3).astype(f32),
        "radii": np.ceil(3 * s.max(-1)),
    }


def tile_lists(scene, width, height, *, padding=5):
    """Intersections sorted by (tile, depth): gaussian_ids (M,) int32, tile_ranges (T,2) int32.

    A Gaussian goes to every tile its 3-sigma box touches; `padding` junk entries follow the
    used ones (a static capacity larger than needed), which the kernel must never read.
    """
    tiles_x, tiles_y = -(-width // TILE), -(-height // TILE)
    pairs = []
    for g, ((x, y), r) in enumerate(zip(scene["means2d"], scene["radii"])):
        tx0, tx1 = int(np.floor((x - r) / TILE)), int(np.floor((x + r) / TILE))
        ty0, ty1 = int(np.floor((y - r) / TILE)), int(np.floor((y + r) / TILE))
        for ty in range(max(ty0, 0), min(ty1, tiles_y - 1) + 1):
            for tx in range(max(tx0, 0), min(tx1, tiles_x - 1) + 1):
                pairs.append((ty * tiles_x + tx, scene["depths"][g], g))
    pairs.sort()
    ids = np.array([g for _, _, g in pairs] + [0] * padding, np.int32)
    tiles = np.array([t for t, _, _ in pairs], np.int64)
    t = np.arange(tiles_x * tiles_y)
    ranges = np.stack([np.searchsorted(tiles, t, "left"), np.searchsorted(tiles, t, "right")], -1)
    return ids, ranges.astype(np.int32)


def clear_scene(rng, width, height, n, *, within=None, **options):
    """A random_scene (over the top-left `within` = (w, h) pixels only, if given) with its tile
    lists for a width x height image, clear of the rule's thresholds (clear_of_thresholds):
    returns (scene, ids, ranges)."""
    scene = random_scene(rng, *(within or (width, height)), n, **options)
    ids, ranges = tile_lists(scene, width, height)
    return clear_of_thresholds(scene, ids, ranges, width, height), ids, ranges


def kernel_args(scene, ids, ranges):
    keys = ("means2d", "conics", "colors", "opacities", "depths", "background")
    return tuple(jnp.asarray(scene[k]) for k in keys) + (jnp.asarray(ids), jnp.asarray(ranges))


# --- the oracle ----------------------------------------------------------------------------


def pixel_lists(ids, ranges, width, height):
    """Every pixel's tile list: pixel columns jj and rows ii (H, W), and per list slot (H, W, K)
    whether it is used and the Gaussian id there (0 when unused)."""
    ids, ranges = np.asarray(ids), np.asarray(ranges)
    tiles_x = -(-width // TILE)
    jj, ii = np.meshgrid(np.arange(width), np.arange(height))
    tile = (ii // TILE) * tiles_x + jj // TILE  # (H, W)
    start, end = ranges[tile, 0], ranges[tile, 1]
    k_max = max(int((ranges[:, 1] - ranges[:, 0]).max(initial=0)), 1)
    slot = start[..., None] + np.arange(k_max)  # (H, W, K)
    in_list = slot < end[..., None]
    gid = np.where(in_list, ids[np.minimum(slot, len(ids) - 1)], 0)
    return jj, ii, in_list, gid


def stopped_pixels(args, width, height):
    """(H, W) bool: pixels whose blending stops (a Gaussian would take T below 1e-4), in float64."""
    means, conics, _, opacities = (np.asarray(a, np.float64) for a in args[:4])
    jj, ii, in_list, gid = pixel_lists(args[6], args[7], width, height)
    dx = means[gid, 0] - (jj[..., None] + 0.5)
    dy = means[gid, 1] - (ii[..., None] + 0.5)
    sigma = 0.5 * (conics[gid, 0] * dx * dx + conics[gid, 2] * dy * dy) + conics[gid, 1] * dx * dy
    raw = opacities[gid] * np.exp(-sigma)
    alpha = np.where(in_list & (sigma >= 0) & (raw >= 1 / 255), np.minimum(raw, 0.99), 0.0)
    return (np.cumprod(1.0 - alpha, axis=-1)[..., -1] < 1e-4)


def clear_of_thresholds(scene, ids, ranges, width, height, *, margin=1e-5, stop_margin=1e-3):
    """Lowers (in place) the opacity of every Gaussian that, at some pixel of its tiles, has an
    alpha within a relative `margin` of the 1/255 skip or the 0.99 clamp, or takes the
    transmittance within `stop_margin` of the 1e-4 stop, until none does; returns `scene`.

    The rule is discontinuous (or kinked) there, so two correct implementations — a float32
    kernel and the float64 oracle — may decide differently within rounding of a threshold and
    their gradients then differ by that pixel's whole term. Clear scenes keep every
    implementation on the same side (the transmittance's rounding grows along a list, hence
    the wider stop margin)."""
    jj, ii, in_list, gid = pixel_lists(ids, ranges, width, height)
    means, conics = scene["means2d"].astype(np.float64), scene["conics"].astype(np.float64)
    dx = means[gid, 0] - (jj[..., None] + 0.5)
    dy = means[gid, 1] - (ii[..., None] + 0.5)
    sigma = 0.5 * (conics[gid, 0] * dx * dx + conics[gid, 2] * dy * dy) + conics[gid, 1] * dx * dy
    with np.errstate(all="ignore"):
        for _ in range(50):
            raw = scene["opacities"].astype(np.float64)[gid] * np.exp(-sigma)
            near = in_list & ((np.abs(np.log(raw * 255.0)) < margin) | (np.abs(np.log(raw / 0.99)) < margin))
            alpha = np.where(in_list & (sigma >= 0) & (raw >= 1 / 255), np.minimum(raw, 0.99), 0.0)
            t = np.cumprod(1.0 - alpha, axis=-1)
            near |= (alpha > 0) & (np.abs(np.log(t / 1e-4)) < stop_margin)
            if not near.any():
                return scene
            scene["opacities"][np.unique(gid[near])] *= np.float32(0.95)
    raise AssertionError("clear_of_thresholds: could not move the scene away from the thresholds")


def oracle_blend(means2d, conics, colors, opacities, depths, background, ids, ranges, width, height):
    """The blending rule of docs/architecture.md §9 for every pixel at once, in the inputs' precision.

    alpha = min(0.99, o exp(-sigma)), skipped if sigma < 0 or alpha < 1/255; the Gaussian
    that would take the transmittance below 1e-4 and all after it are excluded.
    Returns image (H,W,3), alpha (H,W), depth (H,W).
    """
    jj, ii, in_list, gid = pixel_lists(ids, ranges, width, height)
    dx = means2d[gid, 0] - (jj[..., None] + 0.5)
    dy = means2d[gid, 1] - (ii[..., None] + 0.5)
    a, b, c = conics[gid, 0], conics[gid, 1], conics[gid, 2]
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = jnp.minimum(0.99, opacities[gid] * jnp.exp(-sigma))
    valid = in_list & (sigma >= 0) & (alpha >= 1.0 / 255.0)
    alpha = jnp.where(valid, alpha, 0.0)
    # Before the stop the transmittance only falls, so the first Gaussian whose T_next drops
    # below 1e-4 and everything after it fail this test together.
    keep = valid & (jnp.cumprod(1.0 - alpha, axis=-1) >= 1e-4)
    alpha = jnp.where(keep, alpha, 0.0)
    t_incl = jnp.cumprod(1.0 - alpha, axis=-1)
    weight = alpha * (t_incl / (1.0 - alpha))  # alpha_k * T before k
    t_final = t_incl[..., -1]
    image = jnp.einsum("hwk,hwkc->hwc", weight, colors[gid]) + t_final[..., None] * background
    return image, 1.0 - t_final, jnp.sum(weight * depths[gid], -1)


def oracle64(args, width, height):
    with jax.enable_x64(True):
        floats = [jnp.asarray(np.asarray(x, np.float64)) for x in args[:6]]
        return [np.asarray(o) for o in oracle_blend(*floats, *args[6:], width, height)]


def oracle64_grads(args, cotangents, width, height):
    """Gradients of <cotangents, oracle outputs> w.r.t. the six float inputs, in float64."""
    with jax.enable_x64(True):
        floats = [jnp.asarray(np.asarray(x, np.float64)) for x in args[:6]]
        cots = [jnp.asarray(np.asarray(c, np.float64)) for c in cotangents]

        def loss(*f):
            outs = oracle_blend(*f, *args[6:], width, height)
            return sum(jnp.sum(o * ct) for o, ct in zip(outs, cots))

        return [np.asarray(g) for g in jax.grad(loss, argnums=tuple(range(6)))(*floats)]


def blend_grads(blend, args, cotangents, width, height):
    """Gradients of <cotangents, blend outputs> w.r.t. the six float inputs."""

    def loss(*f):
        outs = blend(*f, *args[6:], width, height)
        return sum(jnp.sum(o * ct) for o, ct in zip(outs, cotangents))

    return [np.asarray(g) for g in jax.grad(loss, argnums=tuple(range(6)))(*args[:6])]


def random_cotangents(rng, width, height):
    return [
        jnp.asarray(rng.normal(size=s).astype(np.float32))
        for s in [(height, width, 3), (height, width), (height, width)]
    ]


def assert_grads_close(got, want, names=GRAD_NAMES):
    """gsplat-style tolerances for float32 gradients, relative to each gradient's scale."""
    for name, g, w in zip(names, got, want):
        scale = max(float(np.abs(w).max()), 1e-6)
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * scale, err_msg=f"v_{name}")


# --- scene sets ------------------------------------------------------------------------

SCENES = {  # name: (width, height, N, scene options)
    "one-tile": (16, 16, 12, {}),
    "odd-size": (37, 29, 80, {}),
    "wide-sparse": (97, 33, 40, {"scale": (0.5, 3.0)}),
    # ~600 faint Gaussians in a 2x2-tile image: tile lists of several hundred entries, longer
    # than one chunk of the reference's tile loop, and no early stop.
    "long-lists": (32, 32, 600, {"opacity": (0.01, 0.05), "scale": (4.0, 12.0)}),
    "dense-opaque": (48, 40, 400, {"opacity": (0.5, 1.0)}),
    # Thin, long, rotated Gaussians: the kernel's culling boxes must never clip them.
    "needles": (64, 48, 60, {"scale": (0.3, 25.0)}),
}



def projected_args(seed, width, height, n, principal, capacity):
    """Kernel inputs from random 3D Gaussians, gem_jax.render.project and .tiles.

    `principal` is the principal point as a fraction of (width, height) (off-centre allowed).
    """
    from gem_jax.render.project import project_gaussians
    from gem_jax.render.tiles import tile_intersections
    from gem_jax.types import Camera, Gaussians

    rng = np.random.default_rng(seed)
    quats = rng.normal(size=(n, 4))
    gaussians = Gaussians(
        means=jnp.asarray(rng.uniform([-1.0, -0.8, 2.5], [1.0, 0.8, 4.5], (n, 3)), jnp.float32),
        quats=jnp.asarray(quats / np.linalg.norm(quats, axis=-1, keepdims=True), jnp.float32),
        scales=jnp.asarray(np.exp(rng.uniform(np.log(0.004), np.log(0.06), (n, 3))), jnp.float32),
        opacities=jnp.asarray(rng.uniform(0.05, 0.95, n), jnp.float32),
        colors=jnp.asarray(rng.uniform(0, 1, (n, 3)), jnp.float32),
    )
    f = 0.9 * max(width, height)
    K = np.array([[f, 0, principal[0] * width], [0, f, principal[1] * height], [0, 0, 1]], np.float32)
    camera = Camera(viewmat=jnp.eye(4), K=jnp.asarray(K), width=width, height=height)
    p = project_gaussians(gaussians, camera)
    lists = tile_intersections(p.means2d, p.radii, p.depths, width, height, capacity)
    assert int(lists.overflow) == 0
    background = jnp.asarray(rng.uniform(0, 1, 3), jnp.float32)
    return (p.means2d, p.conics, p.colors, p.opacities, p.depths, background,
            lists.gaussian_ids, lists.tile_ranges)  # fmt: skip


PIPELINE = {  # name: (width, height, N, principal point / size, capacity)
    "off-centre": (61, 35, 250, (0.3, 0.7), 5000),
    # Most Gaussians crowd into few tiles: lists of hundreds of entries (several chunks).
    "crowded": (32, 32, 700, (0.5, 0.5), 6000),
}


def one_tile_args(means, conics, colors, opacities, depths, background, width=16, height=16):
    """All Gaussians in every tile's list, in the given (front-to-back) order."""
    n = len(means)
    tiles = -(-width // TILE) * -(-height // TILE)
    f32 = np.float32
    ids = np.tile(np.arange(n, dtype=np.int32), tiles)
    ranges = np.stack([np.arange(tiles) * n, np.arange(1, tiles + 1) * n], -1).astype(np.int32)
    floats = [np.asarray(x, f32).reshape(s) for x, s in zip(
        (means, conics, colors, opacities, depths, background),
        ((n, 2), (n, 3), (n, 3), (n,), (n,), (3,)))]  # fmt: skip
    return tuple(jnp.asarray(x) for x in floats) + (jnp.asarray(ids), jnp.asarray(ranges))


def check_jit_vmap_and_grad(blend, rtol=1e-5, atol=1e-6):
    """Three 'cameras' (different 2D projections of one scene) in one vmapped, jitted call of
    `blend`: images equal the oracle's, gradients those of one camera at a time (to `rtol`,
    `atol`; the shared background's gradient is the sum over cameras)."""
    width, height, n = 33, 20, 50
    rng = np.random.default_rng(5)
    scenes = [random_scene(rng, width, height, n) for _ in range(3)]
    lists = [tile_lists(s, width, height, padding=0) for s in scenes]
    m = max(len(ids) for ids, _ in lists)
    lists = [(np.pad(ids, (0, m - len(ids))), r) for ids, r in lists]  # one static capacity
    per_camera = [kernel_args(s, *l) for s, l in zip(scenes, lists)]
    batched = [jnp.stack(x) for x in zip(*per_camera)]
    batched[5] = per_camera[0][5]  # background shared (unbatched) by all cameras
    in_axes = (0, 0, 0, 0, 0, None, 0, 0)
    cots = [random_cotangents(rng, width, height) for _ in range(3)]

    def loss(floats, ints, cot):
        outs = blend(*floats, *ints, width, height)
        return sum(jnp.sum(o * c) for o, c in zip(outs, cot))

    render = jax.jit(jax.vmap(lambda *a: blend(*a, width, height), in_axes=in_axes))
    grad = jax.jit(jax.vmap(jax.grad(loss), in_axes=(in_axes[:6], 0, 0)))
    images = render(*batched)
    grads = grad(tuple(batched[:6]), tuple(batched[6:]), [jnp.stack(c) for c in zip(*cots)])
    for cam in range(3):
        args = (*per_camera[cam][:5], per_camera[0][5], *per_camera[cam][6:])
        want = oracle64(args, width, height)
        for got, w in zip(images, want):
            np.testing.assert_allclose(np.asarray(got[cam]), w, atol=1e-4)
        single = jax.grad(loss)(args[:6], args[6:], cots[cam])
        for g, s in zip(grads[:5], single[:5]):
            np.testing.assert_allclose(np.asarray(g[cam]), np.asarray(s), rtol=rtol, atol=atol)
    # The shared background's gradient is the sum over cameras.
    shared_bg = [(*per_camera[c][:5], per_camera[0][5]) for c in range(3)]
    total = sum(jax.grad(loss)(shared_bg[c], per_camera[c][6:], cots[c])[5] for c in range(3))
    np.testing.assert_allclose(np.asarray(grads[5]).sum(0), np.asarray(total), rtol=rtol)


# --- through rasterize() ---------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def rasterize_values(backend: str, seed: int = 21):
    """rasterize() with `backend` on a fixed-size random case: two off-centre cameras (one
    batched call) and NaN/Inf Gaussians; returns its output and the gradients of an image loss
    w.r.t. every Gaussian parameter and the background, as NumPy (cached: the reference's are
    shared by the kernels' tests)."""
    from gem_jax.render import rasterize
    from gem_jax.types import Camera, Gaussians

    rng = np.random.default_rng(seed)
    n, width, height = 120, 40, 32
    quats = rng.normal(size=(n, 4))
    means = rng.uniform([-1.0, -0.8, 2.5], [1.0, 0.8, 4.5], (n, 3))
    means[3] = np.nan
    means[4, 0] = np.inf
    gaussians = Gaussians(
        means=jnp.asarray(means, jnp.float32),
        quats=jnp.asarray(quats / np.linalg.norm(quats, axis=-1, keepdims=True), jnp.float32),
        scales=jnp.asarray(np.exp(rng.uniform(np.log(0.01), np.log(0.08), (n, 3))), jnp.float32),
        opacities=jnp.asarray(rng.uniform(0.05, 0.95, n), jnp.float32),
        colors=jnp.asarray(rng.uniform(0, 1, (n, 3)), jnp.float32),
    )
    K = [[[36.0, 0, 12.0], [0, 36.0, 20.0], [0, 0, 1]], [[30.0, 0, 25.0], [0, 30.0, 11.0], [0, 0, 1]]]
    camera = Camera(viewmat=jnp.stack([jnp.eye(4)] * 2), K=jnp.asarray(K), width=width, height=height)
    background = jnp.asarray(rng.uniform(0, 1, (2, 3)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=(2, height, width, 3)), jnp.float32)

    def loss(g, bg):
        out = rasterize(g, camera, bg, backend=backend, capacity=4096)
        return jnp.sum(out.image * weights) + jnp.sum(out.alpha) + 0.1 * jnp.sum(out.depth), out

    (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(gaussians, background)
    outputs = {name: np.asarray(getattr(out, name)) for name in ("image", "alpha", "depth")}
    return outputs, [np.asarray(g) for g in jax.tree.leaves(grads)]


def assert_rasterize_matches_reference(backend: str, against: str = "reference") -> None:
    """rasterize_values of `backend` equal those of `against` (the reference backend by
    default; float32 tolerances)."""
    got, got_grads = rasterize_values(backend)
    want, want_grads = rasterize_values(against)
    assert got["alpha"].max() > 0.5, "the scene must not be empty"
    for name in ("image", "alpha", "depth"):
        np.testing.assert_allclose(got[name], want[name], atol=1e-5 * 5, err_msg=name)
    assert all(np.isfinite(g).all() for g in got_grads)
    for g, w in zip(got_grads, want_grads):
        scale = max(float(np.abs(w).max()), 1e-6)
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * scale)
