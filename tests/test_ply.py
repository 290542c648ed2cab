"""3DGS ``.ply`` IO (gem_jax/render/ply.py).

Specification: ``write_ply`` produces the standard 3D Gaussian Splatting layout (binary
little-endian float properties in the reference order, pre-activation values); ``read_ply``
inverts it — means and unit quaternions bit-exactly, colours / opacities / scales exactly up to
the one float32 rounding of the stored parameter (``dtype="float64"``: bit-exact); files from
other writers (doubles, extra properties, other orders, raw quaternions) are read correctly;
malformed files fail with an error naming the file and the field.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gem_jax.render import read_ply, write_ply
from gem_jax.render.ply import SH_C0
from gem_jax.types import Gaussians

STANDARD = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
            "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip


def random_gaussians(n=500, seed=0):
    rng = np.random.default_rng(seed)
    f32 = np.float32
    quats = rng.normal(size=(n, 4))
    quats = (quats / np.linalg.norm(quats, axis=-1, keepdims=True)).astype(f32)
    opacities = rng.uniform(0, 1, n)
    extremes = [1e-7, 1e-3, 0.5, 0.999, 1 - 2**-23, np.nextafter(f32(1), f32(0))]
    opacities[: min(n, 6)] = extremes[: min(n, 6)]
    scales = np.exp(rng.uniform(-12, 4, (n, 3)))
    colors = rng.uniform(-0.2, 1.2, (n, 3))
    colors[:1] = [0.0, 0.5, 1.0]
    return Gaussians(
        means=jnp.asarray(rng.normal(size=(n, 3)).astype(f32) * 3), quats=jnp.asarray(quats),
        scales=jnp.asarray(scales.astype(f32)), opacities=jnp.asarray(opacities.astype(f32)),
        colors=jnp.asarray(colors.astype(f32)),
    )  # fmt: skip


def ulp(x):
    x = np.abs(np.asarray(x, np.float32))
    return (np.nextafter(x, np.float32(np.inf)) - x).astype(np.float64)


def test_round_trip_is_exact_up_to_the_float32_storage(tmp_path):
    g = random_gaussians()
    back = read_ply(write_ply(tmp_path / "a.ply", g))
    for name in ("means", "quats"):
        np.testing.assert_array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(g, name)), err_msg=name)
    c, o, s = (np.asarray(x, np.float64) for x in (g.colors, g.opacities, g.scales))
    stored = {  # the float32 parameter each value passes through, and d(value)/d(parameter)
        "colors": (ulp((c - 0.5) / SH_C0), SH_C0),
        "opacities": (ulp(np.log(o) - np.log1p(-o)), o * (1 - o)),
        "scales": (ulp(np.log(s)), s),
    }
    for name, (step, slope) in stored.items():
        x = np.asarray(getattr(g, name), np.float64)
        err = np.abs(np.asarray(getattr(back, name), np.float64) - x)
        bound = slope * step / 2 + ulp(x) / 2 + 1e-300
        assert np.all(err <= bound * 1.0001), f"{name}: worst error/bound {np.max(err / bound)}"
        assert np.median(err / np.maximum(ulp(x), 1e-300)) <= 1.0, name  # typically within an ulp


def test_float64_files_round_trip_bit_exactly(tmp_path):
    g = random_gaussians(seed=1)
    back = read_ply(write_ply(tmp_path / "b.ply", g, dtype="float64"))
    for name in ("means", "quats", "scales", "opacities", "colors"):
        np.testing.assert_array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(g, name)), err_msg=name)


def test_layout_is_the_3dgs_standard(tmp_path):
    g = random_gaussians(n=7)
    path = write_ply(tmp_path / "c.ply", g, sh_degree=1)
    blob = path.read_bytes()
    header, body = blob.split(b"end_header\n", 1)
    lines = header.decode().splitlines()
    assert lines[:2] == ["ply", "format binary_little_endian 1.0"] and "element vertex 7" in lines
    props = [line.split()[2] for line in lines if line.startswith("property")]
    assert all(line.split()[1] == "float" for line in lines if line.startswith("property"))
    assert props == STANDARD[:9] + [f"f_rest_{i}" for i in range(9)] + STANDARD[9:]
    data = np.frombuffer(body, dtype=[(p, "<f4") for p in props])
    o = np.asarray(g.opacities, np.float64)
    np.testing.assert_allclose(data["opacity"], np.log(o / (1 - o)), rtol=1e-6)
    np.testing.assert_allclose(data["scale_2"], np.log(np.asarray(g.scales[:, 2], np.float64)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(data["f_dc_1"], (np.asarray(g.colors[:, 1], np.float64) - 0.5) / SH_C0, atol=1e-6)
    np.testing.assert_array_equal(data["rot_0"], np.asarray(g.quats[:, 0]))  # w first
    assert not data["nx"].any() and not data["f_rest_4"].any()


def write_raw(path, columns, types=None, *, header_extra=(), fmt="binary_little_endian 1.0", cut=0):
    """A PLY file written by hand: `columns` name -> values, `types` name -> 'f4'/'f8'/'u1'."""
    types = types or {}
    n = len(next(iter(columns.values())))
    dtype = [(k, "<" + types.get(k, "f4")) for k in columns]
    rec = np.empty(n, dtype)
    for k, v in columns.items():
        rec[k] = v
    ply_type = {"f4": "float", "f8": "double", "u1": "uchar"}
    lines = ["ply", f"format {fmt}", f"element vertex {n}", *header_extra]
    lines += [f"property {ply_type[types.get(k, 'f4')]} {k}" for k in columns] + ["end_header"]
    data = rec.tobytes()
    path.write_bytes(("\n".join(lines) + "\n").encode() + (data[: len(data) - cut] if cut else data))
    return path


def valid_columns(n=3):
    rng = np.random.default_rng(3)
    cols = {k: rng.normal(size=n) for k in STANDARD}
    raw_quats = [[2.0, 0.0, 0.0, 0.0], [0.0, 3.0, 4.0, 0.0], [1.0, 1.0, 1.0, 1.0]]  # unnormalised
    cols.update({f"rot_{i}": [q[i] for q in raw_quats] for i in range(4)})
    return cols


def test_reads_other_writers_files(tmp_path):
    cols = valid_columns()
    first = ["rot_3", "f_dc_2", "opacity", "x", "scale_1"]
    order = first + ["red"] + [k for k in STANDARD if k not in first]
    cols["red"] = [1, 2, 3]
    cols = {k: cols[k] for k in order}
    types = {"x": "f8", "opacity": "f8", "red": "u1"}
    g = read_ply(write_raw(tmp_path / "other.ply", cols, types, header_extra=["comment from elsewhere"]))
    f64 = {k: np.asarray(v, np.float64) for k, v in cols.items()}
    np.testing.assert_allclose(np.asarray(g.means[:, 0]), f64["x"], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(g.opacities), 1 / (1 + np.exp(-f64["opacity"])), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g.scales[:, 1]), np.exp(np.float32(f64["scale_1"])), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g.colors[:, 2]), 0.5 + SH_C0 * np.float32(f64["f_dc_2"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(g.quats), [[1, 0, 0, 0], [0, 0.6, 0.8, 0], [0.5, 0.5, 0.5, 0.5]], atol=1e-7)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p, c: p.write_bytes(b"not a ply file"), "not a PLY file"),
        (lambda p, c: write_raw(p, c, fmt="ascii 1.0"), "binary_little_endian"),
        (lambda p, c: write_raw(p, {k: v for k, v in c.items() if k != "scale_1"}), "'scale_1'"),
        (lambda p, c: write_raw(p, c, cut=5), "body has"),
        (lambda p, c: write_raw(p, {**c, "opacity": [0.1, np.nan, 0.2]}), "'opacity' is not finite at vertex 1"),
        (lambda p, c: write_raw(p, {**c, **{f"rot_{i}": [0, 1, 0] for i in range(4)}}), "zero quaternion at vertex 0"),
        (lambda p, c: write_raw(p, {**c, "scale_0": [1.0, 200.0, 0.0]}), "overflows float32"),
        (lambda p, c: write_raw(p, {**c, "f_dc_0": [1, 2, 3]}, {"f_dc_0": "u1"}), "'f_dc_0' must be float"),
        (lambda p, c: write_raw(p, c, header_extra=["element face 0", "property list uchar int idx"]), "vertex"),
    ],
)
def test_malformed_files_name_the_file_and_field(tmp_path, mutate, message):
    path = tmp_path / "bad.ply"
    mutate(path, valid_columns())
    with pytest.raises(ValueError, match=message) as err:
        read_ply(path)
    assert "bad.ply" in str(err.value)


def test_write_validates_values(tmp_path):
    g = random_gaussians(n=4)
    with pytest.raises(ValueError, match="opacities"):
        write_ply(tmp_path / "x.ply", g.replace(opacities=g.opacities.at[1].set(1.0)))
    with pytest.raises(ValueError, match="scales"):
        write_ply(tmp_path / "x.ply", g.replace(scales=g.scales.at[0, 0].set(-1.0)))
    with pytest.raises(ValueError, match="means"):
        write_ply(tmp_path / "x.ply", g.replace(means=g.means.at[2, 1].set(np.nan)))
    assert not (tmp_path / "x.ply").exists()


def test_empty_file_round_trips(tmp_path):
    g = random_gaussians(n=0)
    back = read_ply(write_ply(tmp_path / "e.ply", g))
    assert back.means.shape == (0, 3) and back.quats.shape == (0, 4)
