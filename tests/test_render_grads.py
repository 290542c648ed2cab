"""Gradients of the blending layer (docs/architecture.md §9): finite differences in float64, oracle in float32.

Specification: ``jax.test_util.check_grads`` (reverse mode, float64) passes for every float
input of ``blend_tiles`` (hand-written backward) and ``blend_dense`` (autodiff) on scenes whose
pixel/Gaussian pairs all lie away from the rule's thresholds (1/255, the 0.99 clamp and the
1e-4 stop — finite differences across a threshold measure a jump, not a slope); and in float32
the tile path's gradients equal those of the dense autodiff oracle within gsplat-style
tolerances on generic random scenes (with skips, clamps and early stops). The gradients of
the whole rasterizer are checked in test_render_api.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gem_jax.render.reference import blend_dense, blend_tiles
from gem_jax.render.tiles import tile_intersections

NAMES = ("means2d", "conics", "colors", "opacities", "depths", "background")


def splats(rng, n, width, height, *, opacity, scale):
    """Random screen-space Gaussians (float64 arrays) and their 3-sigma radii."""
    means = rng.uniform([-4, -4], [width + 4, height + 4], size=(n, 2))
    s = rng.uniform(*scale, size=(n, 2))
    theta = rng.uniform(0, np.pi, size=n)
    c, si = np.cos(theta), np.sin(theta)
    rot = np.stack([c, -si, si, c], -1).reshape(n, 2, 2)
    inv = np.linalg.inv(rot @ (s[:, :, None] ** 2 * np.eye(2)) @ rot.transpose(0, 2, 1))
    conics = np.stack([inv[:, 0, 0], inv[:, 0, 1], inv[:, 1, 1]], -1)
    colors, opacities, depths = rng.uniform(0, 1, (n, 3)), rng.uniform(*opacity, n), rng.uniform(1, 9, n)
    args = [means, conics, colors, opacities, depths, rng.uniform(0, 1, 3)]
    return args, np.ceil(3 * s.max(-1)).astype(np.int32)


_tile_intersections = jax.jit(tile_intersections, static_argnums=(3, 4, 5))


def lists_for(args, radii, width, height):
    means2d, depths = jnp.asarray(args[0]), jnp.asarray(args[4])
    lists = _tile_intersections(means2d, jnp.asarray(radii), depths, width, height, 40 * len(radii))
    assert int(lists.overflow) == 0
    return lists.gaussian_ids, lists.tile_ranges


def threshold_margin(args, ids, ranges, width, height):
    """Smallest relative distance (log scale) of any listed pair to 1/255, 0.99 or the 1e-4 stop."""
    means, conics, _, opacities, _, _ = (np.asarray(a, np.float64) for a in args)
    ids, ranges = np.asarray(ids), np.asarray(ranges)
    tiles_x = -(-width // 16)
    margin = np.inf
    for t, (start, end) in enumerate(ranges):
        ty, tx = divmod(t, tiles_x)
        jj, ii = np.meshgrid(tx * 16 + np.arange(16) + 0.5, ty * 16 + np.arange(16) + 0.5)
        T = np.ones_like(jj)
        for g in ids[start:end]:
            dx, dy = means[g, 0] - jj, means[g, 1] - ii
            a, b, c = conics[g]
            raw = opacities[g] * np.exp(-(0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy))
            margin = min(margin, np.abs(np.log(raw * 255)).min(), np.abs(np.log(raw / 0.99)).min())
            alpha = np.where(raw >= 1 / 255, np.minimum(raw, 0.99), 0.0)
            T_next = T * (1 - alpha)
            live = T_next >= 1e-4
            stopping = (alpha > 0) & (T >= 1e-4)
            if stopping.any():
                margin = min(margin, np.abs(np.log(T_next[stopping] / 1e-4)).min())
            T = np.where(live, T_next, 0.0)  # a stopped pixel takes no further part
    return margin


def check_all_inputs(fn, args, names, eps=1e-7, tol=1e-5):
    """``check_grads`` (reverse mode) w.r.t. all arguments at once (one random direction in
    every input), then per input the directional derivative ⟨∇ᵢL, vᵢ⟩ of ``L = ⟨u, fn⟩``
    against a central difference along vᵢ, so that a failure names the input."""
    jitted = jax.jit(fn)
    check_grads(jitted, tuple(args), order=1, modes=("rev",), eps=eps, atol=tol, rtol=tol)
    rng = np.random.default_rng(0)
    weights = [jnp.asarray(rng.normal(size=o.shape)) for o in jitted(*args)]

    def loss(*a):
        return sum(jnp.sum(o * u) for o, u in zip(jitted(*a), weights))

    _, vjp = jax.vjp(jitted, *args)  # the same linearisation check_grads compiled
    grads = vjp(tuple(weights))
    for i, name in enumerate(names):
        v = jnp.asarray(rng.normal(size=args[i].shape))
        plus = loss(*args[:i], args[i] + eps * v, *args[i + 1 :])
        minus = loss(*args[:i], args[i] - eps * v, *args[i + 1 :])
        want = float(plus - minus) / (2 * eps)
        got = float(jnp.sum(grads[i] * v))
        assert got == pytest.approx(want, rel=tol, abs=tol), f"gradient w.r.t. {name}: {got} vs {want}"


SCENES = {  # name: (width, height, N, seed, options); threshold margins are asserted below
    # big faint splats covering the whole image: no skip, no clamp, no stop anywhere
    "smooth": (32, 32, 40, 21, {"opacity": (0.05, 0.15), "scale": (30.0, 50.0)}),
    # small, opaque and overlapping, so pixels skip, clamp and stop; a seed whose pairs all
    # keep a relative distance > 1e-4 from those thresholds (most seeds do not)
    "generic": (40, 24, 60, 25, {"opacity": (0.3, 1.0), "scale": (1.5, 6.0)}),
}


@pytest.mark.parametrize("name", SCENES)
def test_check_grads_float64_blend_tiles_and_dense(name):
    width, height, n, seed, options = SCENES[name]
    with jax.enable_x64(True):
        args, radii = splats(np.random.default_rng(seed), n, width, height, **options)
        ids, ranges = lists_for(args, radii, width, height)
        assert threshold_margin(args, ids, ranges, width, height) > 1e-4
        args = [jnp.asarray(a) for a in args]
        out = blend_tiles(*args, ids, ranges, width, height)
        assert out[0].dtype == jnp.float64 and float(out[1].max()) > 0.3
        check_all_inputs(lambda *a: blend_tiles(*a, ids, ranges, width, height), args, NAMES)
        check_all_inputs(lambda *a: blend_dense(*a, width, height, radii=radii), args, NAMES)


def assert_grads_close(got, want, names):
    """gsplat-style float32 tolerances, relative to each gradient's scale."""
    for name, g, w in zip(names, got, want):
        g, w = np.asarray(g), np.asarray(w)
        scale = max(float(np.abs(w).max()), 1e-6)
        np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-4 * scale, err_msg=f"v_{name}")


@pytest.mark.parametrize("seed", [1, 2])
def test_float32_tile_gradients_equal_dense_oracle(seed):
    rng = np.random.default_rng(seed)
    width, height = 45, 37
    args, radii = splats(rng, 250, width, height, opacity=(0.05, 1.0), scale=(0.8, 8.0))
    args = [jnp.asarray(np.asarray(a, np.float32)) for a in args]
    ids, ranges = lists_for(args, radii, width, height)
    shapes = [(height, width, 3), (height, width), (height, width)]
    cots = [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in shapes]

    def loss(blend):
        return lambda *a: sum(jnp.sum(o * c) for o, c in zip(blend(*a), cots))

    tiles = jax.grad(loss(lambda *a: blend_tiles(*a, ids, ranges, width, height)), argnums=range(6))(*args)
    dense = jax.grad(loss(lambda *a: blend_dense(*a, width, height, radii=radii)), argnums=range(6))(*args)
    assert np.abs(np.asarray(tiles[0])).max() > 0.1
    assert_grads_close(tiles, dense, NAMES)
