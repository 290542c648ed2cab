"""FLAME-format head model: LBS against an independent float64 NumPy implementation, loaders."""

import os
import pickle
import sys
import types

import jax
import jax.test_util  # noqa: F401  (check_grads)
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse

from gem_jax.head import flame
from gem_jax.head.safe_pickle import UnsafePickleError, load_flame_pickle

PARENTS = [-1, 0, 1, 1, 1]  # FLAME: root → neck → {jaw, eye_l, eye_r}


def random_arrays(rng, num_v=40, n_shape=6, n_expr=4):
    joints = len(PARENTS)
    weights = rng.random((num_v, joints)) ** 3
    weights /= weights.sum(1, keepdims=True)
    jreg = rng.random((joints, num_v))
    jreg /= jreg.sum(1, keepdims=True)
    return dict(
        v_template=rng.normal(size=(num_v, 3)),
        shapedirs=rng.normal(scale=0.1, size=(num_v, 3, n_shape + n_expr)),
        posedirs=rng.normal(scale=0.05, size=(num_v, 3, 9 * (joints - 1))),
        J_regressor=jreg,
        weights=weights,
        kintree_table=np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        f=rng.integers(0, num_v, size=(30, 3)),
        n_shape=np.array(n_shape),
    )


def random_params(rng, n_shape=6, n_expr=4, num_v=40):
    return dict(
        shape=rng.normal(size=n_shape), expr=rng.normal(size=n_expr), rotation=rng.normal(scale=0.5, size=3),
        neck_pose=rng.normal(scale=0.3, size=3), jaw_pose=rng.normal(scale=0.3, size=3),
        eyes_pose=rng.normal(scale=0.2, size=6), translation=rng.normal(size=3),
        static_offset=rng.normal(scale=0.01, size=(num_v, 3)),
    )


def np_rodrigues(r):
    theta = np.linalg.norm(r)
    if theta < 1e-12:
        return np.eye(3)
    k = r / theta
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * kx @ kx


def numpy_lbs(a, p):
    """Plain float64 LBS, written independently of gem_jax (SMPL/FLAME paper, eqs. 1-4)."""
    s = int(a["n_shape"])
    v = a["v_template"] + a["shapedirs"][..., :s] @ p["shape"] + a["shapedirs"][..., s:] @ p["expr"]
    v = v + p["static_offset"]
    joints = a["J_regressor"] @ v
    pose = [p["rotation"], p["neck_pose"], p["jaw_pose"], p["eyes_pose"][:3], p["eyes_pose"][3:]]
    rots = [np_rodrigues(x) for x in pose]
    feat = np.concatenate([(r - np.eye(3)).ravel() for r in rots[1:]])
    v = v + a["posedirs"] @ feat
    world = []
    for j, parent in enumerate(PARENTS):
        local = np.eye(4)
        local[:3, :3] = rots[j]
        local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0)
        world.append(local if parent < 0 else world[parent] @ local)
    out = np.zeros_like(v)
    for i in range(v.shape[0]):
        m = sum(a["weights"][i, j] * (world[j] @ np.block([[np.eye(3), -joints[j][:, None]], [0, 0, 0, 1]]))
                for j in range(len(PARENTS)))
        out[i] = (m @ np.append(v[i], 1.0))[:3]
    posed_joints = np.array([w[:3, 3] for w in world])
    return out + p["translation"], posed_joints + p["translation"]


def to_params(p):
    return flame.FlameParams(**{k: jnp.asarray(v) for k, v in p.items()})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lbs_matches_float64_numpy(seed):
    rng = np.random.default_rng(seed)
    arrays, params = random_arrays(rng), random_params(rng)
    with jax.enable_x64(True):
        model = flame.head_model_from_arrays(arrays)
        model = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), model)
        verts, joints = flame.lbs(model, to_params(params))
        ref_v, ref_j = numpy_lbs(arrays, params)
        np.testing.assert_allclose(np.asarray(verts), ref_v, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(joints), ref_j, rtol=1e-5, atol=1e-5)


def test_lbs_float32_close_and_vmappable():
    rng = np.random.default_rng(3)
    arrays = random_arrays(rng)
    model = flame.head_model_from_arrays(arrays)
    batch = [random_params(rng) for _ in range(3)]
    stacked = flame.FlameParams(**{k: jnp.stack([jnp.asarray(b[k], jnp.float32) for b in batch]) for k in batch[0]})
    verts, _ = jax.jit(jax.vmap(lambda p: flame.lbs(model, p)))(stacked)
    for i, b in enumerate(batch):
        np.testing.assert_allclose(np.asarray(verts[i]), numpy_lbs(arrays, b)[0], rtol=1e-4, atol=1e-4)


def test_zero_pose_is_shaped_template_plus_translation():
    rng = np.random.default_rng(4)
    arrays = random_arrays(rng)
    model = flame.head_model_from_arrays(arrays)
    params = model.zero_params().replace(translation=jnp.array([0.1, -0.2, 0.3]))
    verts, _ = flame.lbs(model, params)
    np.testing.assert_allclose(np.asarray(verts), arrays["v_template"] + [0.1, -0.2, 0.3], atol=1e-5)


def test_rodrigues_gradient_finite_at_zero():
    grad = jax.grad(lambda r: flame.rodrigues(r).sum())(jnp.zeros(3))
    assert np.all(np.isfinite(np.asarray(grad)))


def test_lbs_gradient_matches_finite_differences():
    rng = np.random.default_rng(5)
    arrays, params = random_arrays(rng), random_params(rng)
    with jax.enable_x64(True):
        model = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), flame.head_model_from_arrays(arrays))
        base = to_params(params)

        def f(jaw, expr):
            return flame.lbs(model, base.replace(jaw_pose=jaw, expr=expr))[0]

        jax.test_util.check_grads(f, (base.jaw_pose, base.expr), order=1, modes=["rev"], eps=1e-5)


def test_npz_roundtrip_and_truncation(tmp_path):
    rng = np.random.default_rng(6)
    arrays = random_arrays(rng)
    path = tmp_path / "head.npz"
    flame.save_head_model(path, arrays)
    model = flame.load_head_model(path, n_shape=4, n_expr=2)
    assert model.n_shape == 4 and model.n_expr == 2 and model.parents == tuple(PARENTS)
    np.testing.assert_allclose(np.asarray(model.exprdirs), arrays["shapedirs"][..., 6:8], rtol=1e-6)


@pytest.mark.parametrize(
    "mutate, culprit",
    [
        (lambda a: a.pop("weights"), "weights"),
        (lambda a: a.__setitem__("posedirs", a["posedirs"][:, :, :5]), "posedirs"),
        (lambda a: a.__setitem__("J_regressor", a["J_regressor"][:, :7]), "J_regressor"),
        (lambda a: a.__setitem__("f", a["f"] + 1000), "'f'"),
        (lambda a: a["v_template"].__setitem__((0, 0), np.nan), "v_template"),
    ],
)
def test_malformed_head_model_names_the_field(tmp_path, mutate, culprit):
    arrays = random_arrays(np.random.default_rng(7))
    mutate(arrays)
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=culprit) as info:
        flame.load_head_model(path)
    assert "bad.npz" in str(info.value)


def _flame_like_pickle(arrays, tmp_path):
    """A pickle laid out like FLAME's: chumpy Ch arrays and a scipy CSC J_regressor."""
    chumpy = types.ModuleType("chumpy")
    ch = types.ModuleType("chumpy.ch")

    class Ch:
        def __init__(self, x):
            self.x = x

        def __reduce_ex__(self, protocol):
            import copyreg

            return copyreg._reconstructor, (Ch, object, None), {"x": self.x, "_dirty_vars": set()}

    Ch.__module__, Ch.__qualname__ = "chumpy.ch", "Ch"
    ch.Ch = Ch
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = chumpy, ch
    try:
        payload = dict(arrays)
        payload["shapedirs"] = Ch(arrays["shapedirs"])
        payload["posedirs"] = Ch(arrays["posedirs"])
        payload["J_regressor"] = scipy.sparse.csc_matrix(arrays["J_regressor"])
        path = tmp_path / "flame.pkl"
        path.write_bytes(pickle.dumps(payload, protocol=2))
    finally:
        del sys.modules["chumpy"], sys.modules["chumpy.ch"]
    return path


def test_flame_pickle_loads_through_the_restricted_unpickler(tmp_path):
    rng = np.random.default_rng(8)
    arrays = random_arrays(rng)
    path = _flame_like_pickle(arrays, tmp_path)
    loaded = load_flame_pickle(path)
    np.testing.assert_allclose(loaded["J_regressor"], arrays["J_regressor"])
    np.testing.assert_allclose(loaded["shapedirs"], arrays["shapedirs"])
    model = flame.load_head_model(path)
    params = random_params(rng)
    np.testing.assert_allclose(np.asarray(flame.lbs(model, to_params(params))[0]), numpy_lbs(arrays, params)[0],
                               rtol=1e-4, atol=1e-4)


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"v_template": _Evil(marker)}))
    with pytest.raises(UnsafePickleError, match="refused to load global") as info:
        flame.load_head_model(path)
    assert "evil.pkl" in str(info.value) and "system" in str(info.value)
    assert not marker.exists()


def test_pickle_with_arbitrary_class_is_refused(tmp_path):
    path = tmp_path / "cls.pkl"
    path.write_bytes(pickle.dumps({"x": pytest.approx(1.0)}))
    with pytest.raises(UnsafePickleError):
        load_flame_pickle(path)
