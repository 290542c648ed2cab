"""Specification of gem_jax.parallel, and of the teacher step on 4 fake CPU devices.

tests/conftest.py sets XLA_FLAGS=--xla_force_host_platform_device_count=4.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gem_jax import parallel

from conftest import tiny_config, tiny_context


def needs_4_devices():
    if len(jax.devices()) < 4:
        pytest.skip("needs 4 (fake) devices: XLA_FLAGS=--xla_force_host_platform_device_count=4")


def mlp_loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    return jnp.mean((h @ params["w2"] - batch["y"]) ** 2)


def mlp_problem(seed=0, n=8):
    rng = np.random.default_rng(seed)
    params = {"w1": rng.standard_normal((5, 7)), "b1": rng.standard_normal(7), "w2": rng.standard_normal((7, 2))}
    batch = {"x": rng.standard_normal((n, 5)), "y": rng.standard_normal((n, 2))}
    cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), t)  # noqa: E731
    return cast(params), cast(batch)


def test_data_mesh_and_batch_sharding():
    needs_4_devices()
    mesh = parallel.data_mesh()
    assert mesh.axis_names == ("data",) and mesh.shape["data"] == len(jax.devices())
    _, batch = mlp_problem()
    sharded = parallel.shard_batch(batch, mesh)
    assert sharded["x"].sharding.spec == P("data")
    assert len(sharded["x"].addressable_shards) == 4 and sharded["x"].addressable_shards[0].data.shape == (2, 5)
    np.testing.assert_array_equal(sharded["x"], batch["x"])
    rep = parallel.replicate({"a": jnp.ones(3)}, mesh)
    assert rep["a"].sharding.spec == P() and rep["a"].sharding.is_fully_replicated
    with pytest.raises(ValueError, match="not divisible by the 4 devices"):
        parallel.global_batch_size(6, mesh)


def test_data_parallel_grads_are_the_global_batch_mean():
    needs_4_devices()
    params, batch = mlp_problem(1)
    mesh = parallel.data_mesh()

    def grad_fn(p, b, scale):
        loss, g = jax.value_and_grad(mlp_loss)(p, b)
        return jax.tree.map(lambda x: x * scale, g), {"loss": loss}

    dp = jax.jit(parallel.data_parallel(grad_fn, mesh))
    grads, metrics = dp(parallel.replicate(params, mesh), parallel.shard_batch(batch, mesh), jnp.float32(2.0))
    ref_loss, ref = jax.value_and_grad(mlp_loss)(params, batch)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, 2.0 * np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    # Also with JAX's device-varying type checks on (where the pcast matters).
    dp_vma = jax.jit(parallel.data_parallel(grad_fn, mesh, check_vma=True))
    grads_vma, _ = dp_vma(parallel.replicate(params, mesh), parallel.shard_batch(batch, mesh), jnp.float32(2.0))
    for a, b in zip(jax.tree.leaves(grads_vma), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, 2.0 * np.asarray(b), rtol=1e-5, atol=1e-6)


def test_sharded_teacher_step_equals_the_single_device_step(tiny_subject, tmp_path):
    needs_4_devices()
    from gem_jax.teacher import data as tdata
    from gem_jax.teacher.train import TeacherData, init_state, make_train_step

    config = tiny_config(**{"data.subject_dir": str(tiny_subject)})
    tc = config.teacher
    results = {}
    for n in (1, 4):
        mesh = parallel.data_mesh(jax.devices()[:n])
        setup = TeacherData(tiny_context(tmp_path, config, mesh=mesh), tc)
        state = jax.jit(functools.partial(init_state, setup.net, tc, setup.optimizer, 0))()
        # Make the output layers non-zero so that every parameter gets a gradient.
        state["params"] = jax.tree_util.tree_map_with_path(
            lambda path, p: p + 0.01 * jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape))
            if "to_out" in jax.tree_util.keystr(path) else p, state["params"])
        start = jax.device_get(state["params"])
        state = parallel.replicate(state, mesh)
        step = make_train_step(setup.net, tc, setup.optimizer, mesh, setup.images.width, setup.images.height,
                               capacity=4096, seed=0)
        batch = parallel.shard_batch(tdata.sample_batch(setup.images, setup.meshes, 0, 4, 0), mesh)
        consts = parallel.replicate(setup.consts, mesh)
        for _ in range(2):
            state, metrics = step(state, batch, consts, None)
        results[n] = (jax.device_get(state), jax.device_get(metrics))
        if n == 1:
            single = (step, state, batch, consts, setup)
    (s1, m1), (s4, m4) = results[1], results[4]
    assert int(s1["step"]) == int(s4["step"]) == 2 and m1["rejected"] == m4["rejected"] == 0
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    flat1 = dict(jax.tree_util.tree_flatten_with_path(s1["params"])[0])
    flat0 = dict(jax.tree_util.tree_flatten_with_path(start)[0])
    for path, a in jax.tree_util.tree_flatten_with_path(s4["params"])[0]:
        name = jax.tree_util.keystr(path)
        assert np.any(a != flat0[path]), f"{name} did not change"
        # Adam divides by sqrt(v): an element with a near-zero gradient moves by ~lr whatever
        # its last bits, so compare the updates against the size of the largest update.
        update1, update4 = flat1[path] - flat0[path], a - flat0[path]
        np.testing.assert_allclose(update4, update1, rtol=1e-3, atol=5e-3 * np.abs(update1).max(), err_msg=name)

    # A step whose loss is not finite is rejected inside the step: the state stays as it was.
    step, state, _, consts, setup = single
    before = jax.device_get(state)
    bad = tdata.sample_batch(setup.images, setup.meshes, 2, 4, 0)
    bad["vertices"] = bad["vertices"].copy()
    bad["vertices"][1] = np.nan
    state, metrics = step(state, parallel.shard_batch(bad, parallel.data_mesh(jax.devices()[:1])), consts, None)
    assert metrics["rejected"] == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(state["step"]) == 3
    for a, b in zip(jax.tree.leaves(jax.device_get(state["params"])), jax.tree.leaves(before["params"])):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(jax.device_get(state["opt_state"])), jax.tree.leaves(before["opt_state"])):
        np.testing.assert_array_equal(a, b)
