"""The GEM container (gem_jax.eigen.model): evaluation, clamping, jit/vmap, file format, sizes.

References are float64 numpy; inputs are fresh random values, never zeros.
"""

import warnings
import zipfile

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax.eigen import model as M
from gem_jax.eigen import pca as P
from gem_jax.types import Gaussians

K = {"position": 5, "rotation": 4, "scale": 3, "opacity": 6}
KTOT = sum(K.values())


def random_model(rng, h=9, w=8, comps=K):
    valid = rng.random((h, w)) < 0.7
    valid[-1, -1] = True
    texels = np.argwhere(valid)
    n = len(texels)
    means = {
        "position": rng.uniform(-0.2, 0.2, (n, 3)),
        "rotation": rng.standard_normal((n, 4)) * 0.3 + [1.0, 0, 0, 0],  # not unit length
        "scale": rng.uniform(0.005, 0.03, (n, 3)),
        "opacity": rng.uniform(0.2, 0.8, (n, 1)),
    }
    mean, sigma, U = {}, {}, {}
    for m in P.MODALITIES:
        d = n * P.CHANNELS[m]
        mean[m] = jnp.asarray(means[m].reshape(-1), jnp.float32)
        sigma[m] = jnp.asarray(rng.uniform(0.5, 2.0, comps[m]) * 1e-3, jnp.float32)
        U[m] = jnp.asarray(np.linalg.qr(rng.standard_normal((d, comps[m])))[0].T, jnp.float32)
    colors = jnp.asarray(rng.uniform(0, 1, (n, 3)), jnp.float32)
    return M.GEM(mean, sigma, U, colors, jnp.asarray(texels, jnp.int32), valid.shape)


@pytest.fixture(scope="module")
def gem():
    return random_model(np.random.default_rng(0))


def np_rows(gem, k):
    """float64 reference of the linear eigen model, from a dict of coefficients."""
    return {
        m: np.asarray(gem.mean[m], np.float64)
        + (np.asarray(k[m], np.float64) * np.asarray(gem.sigma[m], np.float64)) @ np.asarray(gem.U[m], np.float64)
        for m in P.MODALITIES
    }


def rand_k(rng, batch=()):
    return {m: rng.uniform(-2.5, 2.5, (*batch, K[m])) for m in P.MODALITIES}


def test_evaluate_zero_is_the_mean(gem):
    g = gem.evaluate(np.zeros(KTOT, np.float32))
    assert isinstance(g, Gaussians)
    g.validate()
    n = gem.num_gaussians
    mean = {m: np.asarray(gem.mean[m], np.float64).reshape(n, -1) for m in P.MODALITIES}
    np.testing.assert_allclose(np.asarray(g.means), mean["position"], rtol=1e-6)
    quat = mean["rotation"] / np.linalg.norm(mean["rotation"], axis=1, keepdims=True)
    np.testing.assert_allclose(np.asarray(g.quats), quat, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g.scales), mean["scale"], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g.opacities), mean["opacity"][:, 0], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(g.colors), np.asarray(gem.colors))


def test_evaluate_matches_reference_and_is_linear(gem):
    rng = np.random.default_rng(1)
    k1, k2 = rand_k(rng), rand_k(rng)
    a, b = 0.4, -0.7
    mix = {m: a * k1[m] + b * k2[m] for m in P.MODALITIES}
    r1, r2, rm = (M.reconstruct(gem, k) for k in (k1, k2, mix))
    rz = M.reconstruct(gem, {m: np.zeros(K[m]) for m in P.MODALITIES})
    ref = np_rows(gem, k1)
    for m in P.MODALITIES:
        np.testing.assert_allclose(np.asarray(r1[m]), ref[m], rtol=1e-5, atol=1e-7)
        lhs = np.asarray(rm[m], np.float64) - np.asarray(rz[m])
        rhs = a * (np.asarray(r1[m], np.float64) - np.asarray(rz[m])) + b * (np.asarray(r2[m]) - np.asarray(rz[m]))
        np.testing.assert_allclose(lhs, rhs, atol=1e-6)
    g = gem.evaluate(k1)  # position has no activation: evaluate is the linear model itself
    np.testing.assert_allclose(np.asarray(g.means).reshape(-1), ref["position"], rtol=1e-5, atol=1e-7)
    quat = ref["rotation"].reshape(-1, 4)
    np.testing.assert_allclose(np.asarray(g.quats), quat / np.linalg.norm(quat, axis=1, keepdims=True), atol=1e-5)


def test_flat_vector_dict_and_missing_modalities(gem):
    rng = np.random.default_rng(2)
    k = rand_k(rng)
    flat = M.flatten_coeffs(gem, k)
    assert flat.shape == (KTOT,)
    chex.assert_trees_all_close(gem.evaluate(k), gem.evaluate(flat), atol=1e-7)
    only_pos = gem.evaluate({"position": k["position"]})
    full = gem.evaluate({**{m: np.zeros(K[m]) for m in P.MODALITIES}, "position": k["position"]})
    chex.assert_trees_all_close(only_pos, full, atol=1e-7)
    with pytest.raises(ValueError, match="unknown modalities"):
        gem.evaluate({"positions": k["position"]})
    with pytest.raises(ValueError, match=r"'scale' expected shape \(\.\.\., 3\)"):
        gem.evaluate({"scale": np.ones(4)})
    with pytest.raises(ValueError, match=rf"shape \(\.\.\., {KTOT}\)"):
        gem.evaluate(np.ones(KTOT + 1))


def test_jit_and_vmap_over_frames(gem):
    rng = np.random.default_rng(3)
    batch = jnp.asarray(rng.uniform(-2.5, 2.5, (4, KTOT)), jnp.float32)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def render_coeffs(model, k):
        return M.evaluate(model, k)

    eager = [gem.evaluate(batch[i]) for i in range(4)]
    jitted = [render_coeffs(gem, batch[i]) for i in range(4)]  # one trace for all frames
    vmapped = jax.vmap(render_coeffs, in_axes=(None, 0))(gem, batch)
    batched = jax.jit(M.evaluate, static_argnames="clamp")(gem, batch)  # leading batch dims natively
    assert vmapped.means.shape == (4, gem.num_gaussians, 3) and batched.colors.shape == (4, gem.num_gaussians, 3)
    for i in range(4):
        chex.assert_trees_all_close(jitted[i], eager[i], atol=1e-6)
        chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], vmapped), eager[i], atol=1e-6)
        chex.assert_trees_all_close(jax.tree.map(lambda x, i=i: x[i], batched), eager[i], atol=1e-6)


def test_coefficients_clamped_beyond_3_sigma(gem):
    rng = np.random.default_rng(4)
    k = rand_k(rng)
    k["rotation"][1] = 4.5
    k["opacity"][0] = -3.7
    clipped = {m: np.clip(v, -3, 3) for m, v in k.items()}
    with pytest.warns(M.CoefficientClampWarning, match=r"rotation 1, opacity 1; max \|k\| = 4.5"):
        got = gem.evaluate(k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = gem.evaluate(clipped)
        jitted = jax.jit(M.evaluate)(gem, k)  # tracers: silent clamp
    chex.assert_trees_all_close(got, want, atol=1e-7)
    chex.assert_trees_all_close(jitted, want, atol=1e-6)
    raw = gem.evaluate(k, clamp=None)  # no clamp: the linear model at 4.5 sigma
    ref = np_rows(gem, k)["position"]
    np.testing.assert_allclose(np.asarray(raw.means).reshape(-1), ref, rtol=1e-5, atol=1e-7)
    k["scale"][0] = np.nan
    with pytest.raises(ValueError, match=r"NaN values in \['scale'\]"):
        gem.evaluate(k)


def test_outputs_stay_valid_and_differentiable():
    rng = np.random.default_rng(5)
    gem = random_model(rng)
    n = gem.num_gaussians
    big = {m: jnp.full(K[m], 3.0e4, jnp.float32) for m in P.MODALITIES}  # far outside the data
    g = gem.evaluate(big, clamp=None)
    g.validate()
    f32 = np.float32
    assert np.min(g.scales) >= f32(M.SCALE_MIN) and np.max(g.scales) > 1.0
    assert np.min(g.opacities) >= f32(M.OPACITY_EPS) and np.max(g.opacities) <= f32(1 - M.OPACITY_EPS)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(g.quats), axis=-1), 1.0, atol=1e-5)
    zero_q = gem.replace(mean={**gem.mean, "rotation": gem.mean["rotation"].at[:4].set(0.0)})
    g0 = zero_q.evaluate(np.zeros(KTOT))
    np.testing.assert_array_equal(np.asarray(g0.quats[0]), [1.0, 0.0, 0.0, 0.0])

    def loss(U):
        out = zero_q.replace(U=U).evaluate(jnp.full(KTOT, 0.5), clamp=None)
        return jnp.sum(out.means**2) + jnp.sum(out.quats[:, 1]) + jnp.sum(out.scales) + jnp.sum(out.opacities)

    grads = jax.grad(loss)(zero_q.U)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in grads.values())
    assert grads["position"].shape == (K["position"], 3 * n)


def test_from_pca_reproduces_training_rows(tmp_path):
    rng = np.random.default_rng(6)
    valid = rng.random((6, 5)) < 0.7
    t, n = int(valid.sum()), 10
    base = {"position": 0.0, "rotation": 2.0, "scale": 0.05, "opacity": 0.5}
    mats = {m: base[m] + 0.01 * rng.standard_normal((n, t * P.CHANNELS[m])) for m in P.MODALITIES}
    for m in ("scale", "opacity"):
        mats[m] = np.abs(mats[m])
    q = mats["rotation"].reshape(n, t, 4)
    mats["rotation"] = (q / np.linalg.norm(q, axis=-1, keepdims=True)).reshape(n, -1)
    res = P.fit_modalities(mats, dict.fromkeys(P.MODALITIES, n - 1), method="svd")
    gem = M.GEM.from_pca(res, rng.uniform(0, 1, (t, 3)), valid)
    assert gem.uv_shape == valid.shape and gem.num_components == dict.fromkeys(P.MODALITIES, n - 1)
    np.testing.assert_array_equal(gem.valid_mask(), valid)
    step = 3
    g = gem.evaluate({m: r.coeffs[step] for m, r in res.items()}, clamp=None)
    np.testing.assert_allclose(np.asarray(g.means).reshape(-1), mats["position"][step], atol=1e-5)
    np.testing.assert_allclose(np.asarray(g.quats).reshape(-1), mats["rotation"][step], atol=1e-5)
    np.testing.assert_allclose(np.asarray(g.scales).reshape(-1), mats["scale"][step], atol=1e-5)
    np.testing.assert_allclose(np.asarray(g.opacities), mats["opacity"][step], atol=1e-5)
    uv = gem.to_uv(g.means)
    assert uv.shape == (*valid.shape, 3)
    np.testing.assert_array_equal(np.asarray(uv)[valid], np.asarray(g.means))
    with pytest.raises(M.GEMFormatError, match="missing PCA results"):
        M.GEM.from_pca({m: res[m] for m in ("position", "scale")}, np.ones((t, 3)), valid)


def test_save_load_round_trip(gem, tmp_path):
    path = gem.save(tmp_path / "gem.npz")
    back = M.GEM.load(path)
    assert back.uv_shape == gem.uv_shape
    jax.tree.map(np.testing.assert_array_equal, back, gem)  # float32: exact
    gem16 = M.load(M.save(gem, tmp_path / "gem16.npz", dtype="float16"))
    for m in P.MODALITIES:
        assert gem16.U[m].dtype == jnp.float32 and gem16.mean[m].dtype == jnp.float32
        np.testing.assert_array_equal(gem16.sigma[m], gem.sigma[m])  # sigma stays float32
        for name in ("mean", "U"):
            a, b = np.asarray(getattr(gem, name)[m]), np.asarray(getattr(gem16, name)[m])
            np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3 * np.abs(a).max())
            assert np.linalg.norm(b - a) <= 1e-3 * np.linalg.norm(a)
    np.testing.assert_allclose(gem16.colors, gem.colors, rtol=1e-3)
    k = rand_k(np.random.default_rng(7))
    np.testing.assert_allclose(gem16.evaluate(k).means, gem.evaluate(k).means, rtol=1e-3, atol=1e-3 * 0.2)
    with pytest.raises(ValueError, match="dtype must be one of"):
        gem.save(tmp_path / "x.npz", dtype="bfloat16")
    huge = gem.replace(mean={**gem.mean, "position": gem.mean["position"] * 1e6})  # > float16 max
    with pytest.raises(M.GEMFormatError, match="'position_mean' has NaN/Inf values as float16"):
        huge.save(tmp_path / "huge.npz", dtype="float16")
    assert not (tmp_path / "huge.npz").exists()
    assert huge.validate() is huge
    with pytest.raises(M.GEMFormatError, match=r"GEM: field 'scale_U' expected float shape \(3, "):
        gem.replace(U={**gem.U, "scale": gem.U["scale"][:, 1:]}).validate()


def test_malformed_files_name_file_and_field(gem, tmp_path):
    fields = M.to_fields(gem)
    n = gem.num_gaussians

    def write(name, **changes):
        out = {**fields, **changes}
        out = {k: v for k, v in out.items() if v is not None}
        path = tmp_path / name
        with open(path, "wb") as f:
            np.savez(f, **out)
        return path

    p = write("missing.npz", rotation_U=None)
    msg = rf"missing\.npz: missing field 'rotation_U' \(expected float shape \(4, {4 * n}\)\)"
    with pytest.raises(M.GEMFormatError, match=msg):
        M.load(p)
    p = write("shape.npz", scale_mean=fields["scale_mean"][:-1])
    with pytest.raises(M.GEMFormatError, match=rf"shape\.npz: field 'scale_mean' expected float shape \({3 * n},\)"):
        M.load(p)
    p = write("colors.npz", colors=fields["colors"][:, :2])
    msg = rf"field 'colors' expected float shape \({n}, 3\), got float32 \({n}, 2\)"
    with pytest.raises(M.GEMFormatError, match=msg):
        M.load(p)
    p = write("version.npz", format_version=np.array(99, np.int32))
    with pytest.raises(M.GEMFormatError, match="format_version 99 is not supported"):
        M.load(p)
    p = write("sigma.npz", opacity_sigma=-fields["opacity_sigma"])
    with pytest.raises(M.GEMFormatError, match="'opacity_sigma' must be positive"):
        M.load(p)
    p = write("pickle.npz", colors=np.array([{"a": 1}], dtype=object))  # never unpickled
    with pytest.raises(M.GEMFormatError, match="field 'colors' unreadable"):
        M.load(p)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(M.GEMFormatError, match=r"junk\.npz: not a readable GEM \.npz"):
        M.load(tmp_path / "junk.npz")
    with zipfile.ZipFile(tmp_path / "empty.npz", "w"):
        pass
    with pytest.raises(M.GEMFormatError, match="missing field 'format_version'"):
        M.load(tmp_path / "empty.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        M.load(tmp_path / "nope.npz")


def test_size_in_mb_matches_arithmetic(tmp_path):
    kk = 7
    gem = random_model(np.random.default_rng(8), h=16, w=12, comps=dict.fromkeys(P.MODALITIES, kk))
    t = gem.num_gaussians
    parts = M.size_breakdown(gem)
    assert parts["basis"] == t * (1 + kk) * 11 * 4  # means + U of the 11 channels, float32
    assert parts["sigma"] == 4 * kk * 4 and parts["colors"] == t * 3 * 4 and parts["texels"] == t * 2 * 4
    assert M.size_mb(gem) == pytest.approx(sum(parts.values()) / 1e6, rel=1e-12)
    path = gem.save(tmp_path / "gem.npz")
    on_disk = M.size_mb(path)
    assert 0 <= on_disk - M.size_mb(gem) < 8e-3  # .npz framing: a few kB
    parts16 = M.size_breakdown(gem, "float16")
    assert parts16["basis"] == t * (1 + kk) * 11 * 2
    # a full-size model, by the numbers alone: 65,536 texels, 50 components everywhere
    assert 65536 * (1 + 50) * 11 * 4 / 1e6 == pytest.approx(147.062784)
    text = gem.summary()
    assert f"{t:,} Gaussians on a 16x12 UV grid" in text and f"{4 * kk} coefficients" in text
    assert f"{M.size_mb(gem):.2f} MB as float32" in text
    for m in P.MODALITIES:
        assert m in text
