"""Specification of gem_jax.checkpoint: orbax save / auto-resume / shape-checked restore."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gem_jax.checkpoint import CheckpointMismatchError, StageCheckpoints


def make_state(width=4, seed=0):
    rng = np.random.default_rng(seed)
    params = {"dense": {"kernel": jnp.asarray(rng.standard_normal((3, width)), jnp.float32),
                        "bias": jnp.asarray(rng.standard_normal(width), jnp.float32)},
              "features": jnp.asarray(rng.standard_normal((2, 2, 5)), jnp.float32)}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    _, opt_state = opt.update(grads, opt_state, params)  # non-trivial moments
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(7)}


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_save_then_restore_against_a_shape_only_target_round_trips(tmp_path):
    state = make_state()
    ckpt = StageCheckpoints(tmp_path / "teacher" / "ckpt")
    assert ckpt.latest_step() is None
    assert ckpt.save(7, state, force=True)
    ckpt.wait()
    assert ckpt.latest_step() == 7
    target = jax.eval_shape(lambda: make_state())
    restored = ckpt.restore(target)
    assert_trees_equal(restored, state)
    ckpt.close()


def test_a_new_manager_resumes_from_the_directory_against_a_shape_only_target(tmp_path):
    calls = []

    def init():
        calls.append(1)
        return make_state(seed=1)

    ckpt = StageCheckpoints(tmp_path / "ckpt")
    assert ckpt.latest_step() is None
    saved = init()
    ckpt.save(3, saved, force=True)
    ckpt.close()
    again = StageCheckpoints(tmp_path / "ckpt")  # a new process: auto-resume from the directory
    assert again.latest_step() == 3
    target = jax.eval_shape(init)  # init is only traced for the target's shapes
    assert_trees_equal(again.restore(target), saved)
    assert_trees_equal(again.restore_as_saved(3)["params"], saved["params"])  # plain containers
    again.close()


def test_the_newest_checkpoints_are_kept(tmp_path):
    ckpt = StageCheckpoints(tmp_path / "ckpt", max_to_keep=2)
    state = make_state()
    assert [ckpt.save(step, state, force=True) for step in (2, 4, 6)] == [True, True, True]
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
    assert not ckpt.save(6, state)  # already stored
    ckpt.close()


def test_restoring_into_other_shapes_names_the_leaf(tmp_path):
    ckpt = StageCheckpoints(tmp_path / "ckpt")
    ckpt.save(1, make_state(width=4), force=True)
    ckpt.wait()
    with pytest.raises(CheckpointMismatchError) as err:
        ckpt.restore(jax.eval_shape(lambda: make_state(width=6)))
    text = str(err.value)
    assert "params.dense.kernel: stored (3, 4) float32, expected (3, 6) float32" in text
    assert "params.dense.bias: stored (4,) float32, expected (6,) float32" in text
    assert "opt_state.1.0.mu.dense.kernel" in text  # the Adam moments are named too
    # A missing and an extra leaf are named as well.
    other = jax.eval_shape(lambda: {**make_state(), "extra": jnp.zeros(2)})
    with pytest.raises(CheckpointMismatchError, match="extra: missing from the checkpoint"):
        ckpt.restore(other)
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 5"):
        ckpt.restore(jax.eval_shape(make_state), step=5)
    ckpt.close()


def test_an_interrupted_save_is_ignored_on_resume(tmp_path):
    ckpt = StageCheckpoints(tmp_path / "ckpt")
    state = make_state()
    ckpt.save(2, state, force=True)
    ckpt.close()
    # What a process killed mid-save leaves behind: orbax's temporary folder for step 4.
    partial = tmp_path / "ckpt" / "4.orbax-checkpoint-tmp-1234"
    (partial / "default").mkdir(parents=True)
    (partial / "default" / "junk").write_bytes(b"\x00" * 10)
    again = StageCheckpoints(tmp_path / "ckpt")
    assert again.latest_step() == 2
    assert_trees_equal(again.restore(jax.eval_shape(make_state)), state)
    again.close()


@pytest.mark.parametrize("damage", ["truncate", "garble"])
def test_a_damaged_checkpoint_is_an_artefact_error_naming_the_step(tmp_path, damage):
    from gem_jax.errors import ArtefactError

    state = make_state()
    ckpt = StageCheckpoints(tmp_path / "teacher" / "ckpt")
    ckpt.save(5, state, force=True)
    ckpt.save(7, state, force=True)
    ckpt.close()
    files = [p for p in (tmp_path / "teacher" / "ckpt" / "7").rglob("*") if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncate" else bytes(b ^ 0x5A for b in data))
    again = StageCheckpoints(tmp_path / "teacher" / "ckpt")
    with pytest.raises(ArtefactError) as info:
        again.restore(jax.eval_shape(make_state))
    message = str(info.value)
    assert "ckpt/7: checkpoint unreadable" in message and "[5]" in message and "--force teacher" in message
    again.close()
