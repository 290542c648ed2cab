"""Whole-file writes: a crash while writing leaves the previous file (or none), never half of one."""

import json

import numpy as np
import pytest

from gem_jax import atomic


def test_writes_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.load(atomic.write_npy(tmp_path / "d" / "a.npy", a)), a)
    with np.load(atomic.write_npz(tmp_path / "b.npz", x=a, y=np.arange(3))) as z:
        np.testing.assert_array_equal(z["x"], a)
    assert json.loads(atomic.write_json(tmp_path / "c.json", {"k": [1, 2]}).read_text()) == {"k": [1, 2]}
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.npy", "b.npz", "c.json", "d"]  # no temporaries


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = atomic.write_text(tmp_path / "f.txt", "old")

    def crash(fh):
        fh.write(b"half of the new")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        atomic.write_bytes_with(path, crash)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
