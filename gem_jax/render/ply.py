"""Standard 3D Gaussian Splatting ``.ply`` files (docs/architecture.md §6 "Export"), read and written.

The layout of the 3DGS reference implementation (Kerbl et al. 2023, ``GaussianModel.save_ply``),
which every splat viewer reads: ``format binary_little_endian 1.0``, one ``vertex`` element with
``float`` properties, in this order::

    x y z  nx ny nz  f_dc_0 f_dc_1 f_dc_2  [f_rest_0 … f_rest_{3((d+1)²−1)−1}]
    opacity  scale_0 scale_1 scale_2  rot_0 rot_1 rot_2 rot_3

stored *pre-activation*: colour as the degree-0 spherical-harmonic coefficient
(``color = 0.5 + C0 · f_dc``, ``C0 = 0.28209479177387814``), ``opacity`` as a logit, scales as
logs, ``rot`` an unnormalised wxyz quaternion; normals are zero. gem_jax Gaussians hold
activated values (docs/architecture.md §3), so the activations are applied on read and inverted on write,
both in float64.

Precision: means and (unit) quaternions round-trip bit-exactly. Colours, opacities and scales
pass through one float32 rounding of the *stored* parameter, so a round trip is exact up to
that storage step: ``|Δcolor| ≤ C0·ulp(f_dc)/2``, ``|Δo| ≤ o(1−o)·ulp(logit)/2``,
``|Δs| ≤ s·ulp(log s)/2`` (plus half an ulp of the result). ``dtype="float64"`` writes
``double`` properties and round-trips every float32 value exactly (not every viewer reads it).

Reading accepts any scalar property types, extra properties (``f_rest_*`` is ignored: view
dependence is not modelled, docs/architecture.md §5) and validates everything; errors name the file and field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from gem_jax.types import Gaussians

__all__ = ["SH_C0", "read_ply", "write_ply"]

SH_C0 = 0.28209479177387814
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
    "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip
_REQUIRED = [
    "x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity",
    "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3",
]  # fmt: skip
_MAX_HEADER = 1 << 16


def _property_names(sh_degree: int) -> list[str]:
    rest = [f"f_rest_{i}" for i in range(3 * ((sh_degree + 1) ** 2 - 1))]
    return ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", *rest, "opacity",
            "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]  # fmt: skip


def _as_f64(name: str, x, shape: tuple[int, ...]) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.shape != shape:
        raise ValueError(f"write_ply: gaussians.{name} must have shape {shape}, got {x.shape}")
    if not np.all(np.isfinite(x)):
        first = tuple(np.argwhere(~np.isfinite(x))[0])
        raise ValueError(f"write_ply: gaussians.{name} has non-finite values (first at {first})")
    return x


def write_ply(path: str | os.PathLike, gaussians: Gaussians, *, sh_degree: int = 0, dtype: str = "float32") -> Path:
    """Write ``gaussians`` (activated, unbatched) as a 3DGS ``.ply``; returns the path.

    ``sh_degree`` > 0 adds zero ``f_rest_*`` coefficients for viewers that insist on them;
    ``dtype`` is ``"float32"`` (standard) or ``"float64"`` (lossless). Opacities must lie in
    (0, 1) and scales be positive (their logit / log is stored).
    """
    if dtype not in ("float32", "float64"):
        raise ValueError(f"write_ply: dtype must be 'float32' or 'float64', got {dtype!r}")
    if int(sh_degree) not in range(4):
        raise ValueError(f"write_ply: sh_degree must be 0..3, got {sh_degree}")
    n = np.shape(gaussians.means)[0] if np.ndim(gaussians.means) == 2 else -1
    means = _as_f64("means", gaussians.means, (n, 3))
    quats = _as_f64("quats", gaussians.quats, (n, 4))
    scales = _as_f64("scales", gaussians.scales, (n, 3))
    opacities = _as_f64("opacities", gaussians.opacities, (n,))
    colors = _as_f64("colors", gaussians.colors, (n, 3))
    if np.any(scales <= 0):
        raise ValueError(f"write_ply: gaussians.scales must be > 0 (log is stored), min {scales.min()}")
    if np.any((opacities <= 0) | (opacities >= 1)):
        raise ValueError(
            f"write_ply: gaussians.opacities must lie in (0, 1) (logit is stored), "
            f"range [{opacities.min()}, {opacities.max()}]"
        )
    if np.any(np.sum(quats * quats, -1) == 0):
        raise ValueError("write_ply: gaussians.quats has a zero quaternion")

    names = _property_names(int(sh_degree))
    values = {f"f_rest_{i}": np.zeros(n) for i in range(3 * ((int(sh_degree) + 1) ** 2 - 1))}
    values.update({"nx": np.zeros(n), "ny": np.zeros(n), "nz": np.zeros(n)})
    values.update({k: means[:, i] for i, k in enumerate("xyz")})
    values.update({f"f_dc_{i}": (colors[:, i] - 0.5) / SH_C0 for i in range(3)})
    values["opacity"] = np.log(opacities) - np.log1p(-opacities)
    values.update({f"scale_{i}": np.log(scales[:, i]) for i in range(3)})
    values.update({f"rot_{i}": quats[:, i] for i in range(4)})

    code, ply_type = ("<f4", "float") if dtype == "float32" else ("<f8", "double")
    record = np.empty(n, dtype=[(k, code) for k in names])
    for k in names:
        record[k] = values[k]
    header = ["ply", "format binary_little_endian 1.0", "comment written by gem_jax", f"element vertex {n}"]
    header += [f"property {ply_type} {k}" for k in names] + ["end_header"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        f.write(record.tobytes())
    os.replace(tmp, path)
    return path


def _parse_header(path: Path, blob: bytes) -> tuple[int, np.dtype, int]:
    """(vertex count, record dtype, data offset) of a binary little-endian PLY."""
    end = blob.find(b"end_header\n", 0, _MAX_HEADER)
    if not blob.startswith(b"ply\n") or end < 0:
        raise ValueError(f"read_ply: {path} is not a PLY file (no 'ply' magic or 'end_header' line)")
    lines = blob[:end].decode("ascii", errors="replace").splitlines()[1:]
    count, fields, fmt, element = None, [], None, None
    for line in lines:
        words = line.split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "format":
            fmt = " ".join(words[1:])
        elif words[0] == "element":
            element = words[1] if len(words) == 3 else None
            if element != "vertex" or count is not None:
                raise ValueError(f"read_ply: {path}: only one 'vertex' element is supported, found {line!r}")
            if not re.fullmatch(r"\d+", words[2]):
                raise ValueError(f"read_ply: {path}: bad vertex count in {line!r}")
            count = int(words[2])
        elif words[0] == "property":
            if element != "vertex":
                raise ValueError(f"read_ply: {path}: property outside the vertex element: {line!r}")
            if len(words) != 3 or words[1] not in _PLY_TYPES:
                raise ValueError(f"read_ply: {path}: unsupported property {line!r} (scalar types only)")
            fields.append((words[2], "<" + _PLY_TYPES[words[1]]))
        else:
            raise ValueError(f"read_ply: {path}: unexpected header line {line!r}")
    if fmt != "binary_little_endian 1.0":
        raise ValueError(f"read_ply: {path}: format must be 'binary_little_endian 1.0', got {fmt!r}")
    if count is None:
        raise ValueError(f"read_ply: {path}: no 'element vertex' in the header")
    names = [k for k, _ in fields]
    if len(set(names)) != len(names):
        raise ValueError(f"read_ply: {path}: duplicate property names")
    return count, np.dtype(fields), end + len(b"end_header\n")


def _stable_sigmoid(x: np.ndarray) -> np.ndarray:
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def read_ply(path: str | os.PathLike) -> Gaussians:
    """Read a 3DGS ``.ply`` into activated float32 :class:`Gaussians` (see the module docstring).

    Raises ``ValueError`` naming the file and the field for a malformed header, a missing or
    non-float property, a truncated body, non-finite values, a zero quaternion or values whose
    activation overflows float32. Quaternions are normalised unless already unit to float32
    precision (then left bit-exact).
    """
    path = Path(path)
    blob = path.read_bytes()
    count, record, offset = _parse_header(path, blob)
    size = count * record.itemsize
    if len(blob) - offset != size:
        raise ValueError(
            f"read_ply: {path}: body has {len(blob) - offset} bytes, expected {size} "
            f"({count} vertices × {record.itemsize} bytes)"
        )
    data = np.frombuffer(blob, dtype=record, count=count, offset=offset)
    columns = {}
    for name in _REQUIRED:
        if name not in record.names:
            raise ValueError(f"read_ply: {path}: missing property {name!r}")
        if record[name].kind != "f":
            raise ValueError(f"read_ply: {path}: property {name!r} must be float or double, got {record[name]}")
        col = data[name].astype(np.float64)
        bad = np.flatnonzero(~np.isfinite(col))
        if bad.size:
            raise ValueError(f"read_ply: {path}: property {name!r} is not finite at vertex {bad[0]}")
        columns[name] = col

    def stack(names):
        return np.stack([columns[k] for k in names], -1) if count else np.zeros((0, len(names)))

    means = stack(["x", "y", "z"])
    colors = 0.5 + SH_C0 * stack(["f_dc_0", "f_dc_1", "f_dc_2"])
    opacities = _stable_sigmoid(columns["opacity"])
    with np.errstate(over="ignore"):
        scales = np.exp(stack(["scale_0", "scale_1", "scale_2"]))
    quats = stack(["rot_0", "rot_1", "rot_2", "rot_3"])
    norm2 = np.sum(quats * quats, -1)
    if np.any(norm2 == 0):
        first = np.flatnonzero(norm2 == 0)[0]
        raise ValueError(f"read_ply: {path}: property 'rot_*' is a zero quaternion at vertex {first}")
    renorm = np.abs(norm2 - 1.0) > 4 * np.finfo(np.float32).eps
    quats = np.where(renorm[:, None], quats / np.sqrt(norm2)[:, None], quats)
    for name, x in [("scale_*", scales), ("f_dc_*", colors)]:
        with np.errstate(over="ignore"):
            finite = np.all(np.isfinite(x.astype(np.float32)))
        if not finite:
            raise ValueError(f"read_ply: {path}: property {name!r} overflows float32 after activation")
    f32 = np.float32
    return Gaussians(
        means=jnp.asarray(means.astype(f32)),
        quats=jnp.asarray(quats.astype(f32)),
        scales=jnp.asarray(scales.astype(f32)),
        opacities=jnp.asarray(opacities.astype(f32)),
        colors=jnp.asarray(colors.astype(f32)),
    )
