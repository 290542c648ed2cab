"""The web export of a GEM: a static folder the browser viewer runs from (docs/architecture.md §11).

    python -m gem_jax.export --workdir runs/q --web runs/q/web [--dtype float16]

writes ``index.html`` and the page's JavaScript (copied from ``gem_jax/viewer/web/``) beside

* ``model.bin`` — little-endian arrays one after another, each starting at a multiple of 16
  bytes: the fields of the compact ``.npz`` (:func:`gem_jax.eigen.model.to_fields`: ``texels``
  int32 ``(N, 2)``, ``colors`` ``(N, 3)``, per modality ``{m}_mean`` ``(N·C,)``, ``{m}_sigma``
  float32 ``(K,)``, ``{m}_U`` ``(K, N·C)``; means, bases and colours in ``dtype``) and the
  scene: ``training_coefficients`` float32 ``(T, ΣK)`` (σ units, clamped to ±3σ),
  ``training_roots`` float32 ``(T, 4, 4)`` and ``training_root_quats`` float32 ``(T, 4)``
  (world ← head frame), and any extra coefficient ``sequence_<i>`` float32 ``(F, ΣK)``;
* ``model.json`` — the manifest: ``format`` ``"gem_jax-web"``, ``format_version`` 1,
  ``dtype``, ``num_gaussians``, ``uv_shape``, ``modalities`` (name, channels, components, in
  the GEM's order), ``arrays`` (name → ``{"dtype", "shape", "offset", "bytes"}`` into
  ``binary``), ``binary`` and ``binary_bytes``, ``cameras`` (``id``, ``label``, ``width``,
  ``height``, ``viewmat`` 4×4 world→camera in OpenCV axes, ``K`` 3×3), ``default_camera``
  (an index into ``cameras``), ``neutral_pose`` 4×4 and ``neutral_pose_quat`` (wxyz),
  ``training_timesteps``, ``sequences`` (``{"name", "array"}``), ``coefficient_limit``.

Nothing is fetched from anywhere else at run time; any static file server serves the folder.
:func:`read_web` reads it back (the round trip the tests check); errors name the file, the
field and the expected shape (docs/architecture.md §10).
"""

from __future__ import annotations

import importlib.resources
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gem_jax.atomic import write_bytes_with, write_json
from gem_jax.eigen.model import COEFF_LIMIT, GEM, CoefficientClampWarning, GEMFormatError, from_fields, to_fields
from gem_jax.eigen.pca import CHANNELS, MODALITIES
from gem_jax.types import Camera

__all__ = ["FORMAT", "FORMAT_VERSION", "WebScene", "check_sequence", "export_workdir", "read_web", "write_web"]

FORMAT = "gem_jax-web"
FORMAT_VERSION = 1
MANIFEST = "model.json"
BINARY = "model.bin"
ALIGN = 16
_HEADER = ("format_version", "modalities", "components", "uv_shape")  # .npz fields kept in the JSON
_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int32": np.dtype("<i4")}


@dataclass
class WebScene:
    """What the page shows besides the model: cameras, poses and coefficient sequences."""

    cameras: list[dict]  # {"id", "label", "width", "height", "viewmat" (4,4), "K" (3,3)}
    neutral_pose: np.ndarray  # (4, 4) world ← head frame
    timesteps: np.ndarray  # (T,) training timesteps
    coefficients: np.ndarray  # (T, ΣK) σ units
    roots: np.ndarray  # (T, 4, 4) root pose of each training timestep
    default_camera: int = 0
    sequences: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (F, ΣK)


def camera_entry(index: int, camera: Camera, label: str | None = None) -> dict:
    """A manifest camera: id, label, image size, ``viewmat`` and ``K`` as nested lists."""
    return {"id": int(index), "label": label or f"camera {index}", "width": int(camera.width),
            "height": int(camera.height), "viewmat": np.asarray(camera.viewmat, np.float64).tolist(),
            "K": np.asarray(camera.K, np.float64).tolist()}


def check_sequence(model: GEM, k, where: str) -> np.ndarray:
    """``(F, ΣK)`` float32 coefficients: non-finite values raise, values beyond ±3σ are
    clamped with a :class:`CoefficientClampWarning` (docs/architecture.md §10)."""
    k = np.asarray(k)
    total = model.total_components
    if k.ndim == 1 and k.shape[0] == total:
        k = k[None]
    if k.ndim != 2 or k.shape[1] != total or k.shape[0] < 1 or k.dtype.kind not in "fiu":
        raise ValueError(f"{where}: expected float coefficients of shape (F, {total}) in σ units, got {k.dtype} {k.shape}")
    k = k.astype(np.float32)
    bad = ~np.isfinite(k)
    if bad.any():
        frame, column = np.argwhere(bad)[0]
        raise ValueError(f"{where}: {int(bad.sum())} non-finite coefficients (first at frame {frame}, column {column})")
    over = np.abs(k) > COEFF_LIMIT
    if over.any():
        warnings.warn(f"{where}: {int(over.sum())} coefficients outside ±{COEFF_LIMIT:g}σ clamped "
                      f"(max |k| = {float(np.abs(k).max()):.3g})", CoefficientClampWarning, stacklevel=2)
    return np.clip(k, -COEFF_LIMIT, COEFF_LIMIT)


def _root_quats(roots: np.ndarray) -> np.ndarray:
    from gem_jax.rigid import rotmat_to_quat

    return np.asarray(rotmat_to_quat(np.asarray(roots, np.float32)[..., :3, :3]), np.float32)


def _copy_assets(out: Path) -> None:
    assets = importlib.resources.files("gem_jax.viewer") / "web"
    with importlib.resources.as_file(assets) as src:
        if not (Path(src) / "index.html").is_file():
            raise FileNotFoundError(f"{src}: the viewer's web assets are missing from the installed package")
        shutil.copytree(src, out, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))


def write_web(out: str | os.PathLike, model: GEM, scene: WebScene, dtype: str = "float32") -> Path:
    """Write the static viewer folder (module docstring); returns the path of ``index.html``."""
    out = Path(out)
    model.validate("write_web: model")
    fields = to_fields(model, dtype)  # raises on float16 overflow, names the field
    from_fields(f"write_web({out})", fields)  # never write what read_web would reject
    arrays = {k: v for k, v in fields.items() if k not in _HEADER}
    total = model.total_components
    coefficients = check_sequence(model, scene.coefficients, f"write_web({out}): training coefficients")
    roots = np.asarray(scene.roots, np.float32)
    if roots.shape != (len(coefficients), 4, 4) or not np.all(np.isfinite(roots)):
        raise ValueError(f"write_web({out}): training roots expected finite ({len(coefficients)}, 4, 4), "
                         f"got {roots.shape}")
    arrays.update(training_coefficients=coefficients, training_roots=roots, training_root_quats=_root_quats(roots))
    sequences = []
    for i, (name, seq) in enumerate(scene.sequences.items()):
        arrays[f"sequence_{i}"] = check_sequence(model, seq, f"write_web({out}): sequence {name!r}")
        sequences.append({"name": str(name), "array": f"sequence_{i}"})

    table, offset = {}, 0
    for name, value in arrays.items():
        kind = "int32" if value.dtype.kind in "iu" else str(value.dtype)
        offset = -(-offset // ALIGN) * ALIGN
        nbytes = value.size * _DTYPES[kind].itemsize
        table[name] = {"dtype": kind, "shape": list(value.shape), "offset": offset, "bytes": nbytes}
        offset += nbytes

    def write_binary(fh):
        for name, value in arrays.items():
            fh.write(b"\0" * (table[name]["offset"] - fh.tell()))
            fh.write(np.ascontiguousarray(value, _DTYPES[table[name]["dtype"]]).tobytes())

    neutral = np.asarray(scene.neutral_pose, np.float32)
    if neutral.shape != (4, 4) or not np.all(np.isfinite(neutral)):
        raise ValueError(f"write_web({out}): neutral pose expected a finite (4, 4) matrix, got {neutral.shape}")
    if not scene.cameras or not 0 <= scene.default_camera < len(scene.cameras):
        raise ValueError(f"write_web({out}): need at least one camera and a default_camera index into them")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype,
        "num_gaussians": model.num_gaussians, "uv_shape": list(model.uv_shape),
        "modalities": [{"name": m, "channels": CHANNELS[m], "components": model.num_components[m]}
                       for m in MODALITIES],
        "total_components": total, "coefficient_limit": COEFF_LIMIT,
        "binary": BINARY, "binary_bytes": offset, "arrays": table,
        "cameras": scene.cameras, "default_camera": int(scene.default_camera),
        "neutral_pose": neutral.astype(np.float64).tolist(),
        "neutral_pose_quat": _root_quats(neutral).astype(np.float64).tolist(),
        "training_timesteps": [int(t) for t in scene.timesteps], "sequences": sequences,
    }
    if len(manifest["training_timesteps"]) != len(coefficients):
        raise ValueError(f"write_web({out}): {len(scene.timesteps)} timesteps for {len(coefficients)} coefficient rows")
    _copy_assets(out)
    write_bytes_with(out / BINARY, write_binary)
    write_json(out / MANIFEST, manifest)
    return out / "index.html"


# --------------------------------------------------------------------------- reading back


def _array(where: str, manifest: dict, blob: bytes, name: str, shape: tuple | None = None) -> np.ndarray:
    entry = manifest["arrays"].get(name)
    if not isinstance(entry, dict) or entry.get("dtype") not in _DTYPES:
        raise GEMFormatError(f"{where}: arrays.{name} missing or without a dtype in {sorted(_DTYPES)}")
    dt, got = _DTYPES[entry["dtype"]], tuple(entry.get("shape", ()))
    if shape is not None and got != tuple(shape):
        raise GEMFormatError(f"{where}: arrays.{name} expected shape {list(shape)}, got {list(got)}")
    count = int(np.prod(got, dtype=np.int64))
    start = int(entry.get("offset", -1))
    if start < 0 or start % dt.itemsize or start + count * dt.itemsize > len(blob):
        raise GEMFormatError(f"{where}: arrays.{name} (offset {start}, {count} × {entry['dtype']}) lies outside "
                             f"the {len(blob)}-byte binary")
    return np.frombuffer(blob, dt, count, start).reshape(got)


def read_web(folder: str | os.PathLike) -> tuple[GEM, WebScene]:
    """The model (float32, validated as :func:`gem_jax.eigen.model.load` does) and the scene
    of a web export; a malformed folder raises :class:`GEMFormatError` naming the field."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no web export here (write one with python -m gem_jax.export --web)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GEMFormatError(f"{path}: not valid JSON ({err})") from err
    where = str(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GEMFormatError(f"{where}: field 'format' expected {FORMAT!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GEMFormatError(f"{where}: format_version {manifest.get('format_version')!r} is not supported "
                             f"(this code reads {FORMAT_VERSION})")
    binary = folder / str(manifest.get("binary", BINARY))
    if not binary.is_file():
        raise FileNotFoundError(f"{binary}: the model binary named by {where} is missing")
    blob = binary.read_bytes()
    if len(blob) != manifest.get("binary_bytes"):
        raise GEMFormatError(f"{where}: binary_bytes {manifest.get('binary_bytes')} but {binary} has {len(blob)} bytes")
    mods = [m.get("name") for m in manifest.get("modalities", [])]
    if mods != list(MODALITIES):
        raise GEMFormatError(f"{where}: field 'modalities' expected {list(MODALITIES)}, got {mods}")
    fields = {"format_version": np.array(1, np.int32), "modalities": np.array(MODALITIES),
              "components": np.array([m["components"] for m in manifest["modalities"]], np.int32),
              "uv_shape": np.array(manifest.get("uv_shape"), np.int32)}
    fields.update({name: _array(where, manifest, blob, name) for name in manifest["arrays"]
                   if name not in ("training_coefficients", "training_roots", "training_root_quats")
                   and not name.startswith("sequence_")})
    model = from_fields(where, fields)
    t = len(manifest.get("training_timesteps", []))
    total = model.total_components
    scene = WebScene(
        cameras=manifest["cameras"],
        neutral_pose=np.asarray(manifest["neutral_pose"], np.float32),
        timesteps=np.asarray(manifest["training_timesteps"], np.int64),
        coefficients=_array(where, manifest, blob, "training_coefficients", (t, total)).copy(),
        roots=_array(where, manifest, blob, "training_roots", (t, 4, 4)).copy(),
        default_camera=int(manifest["default_camera"]),
        sequences={s["name"]: _array(where, manifest, blob, s["array"]).copy() for s in manifest.get("sequences", [])},
    )
    return model, scene


# --------------------------------------------------------------------------- from a work directory


def workdir_scene(workdir: str | os.PathLike, stage: str | None = None) -> tuple[GEM, WebScene]:
    """The model and scene of a trained work directory (:func:`gem_jax.load`): every camera of
    the subject (the held-out one first selected), the neutral pose, the training coefficients."""
    from gem_jax.avatar import load

    avatar = load(workdir, stage)
    if not avatar.cameras:
        raise FileNotFoundError(f"{avatar.context.subject_dir}: the subject (and its cameras) is missing")
    held_out = set(avatar.context.subject.cameras("val"))
    cameras = [camera_entry(i, cam, f"camera {i}" + (" (held out)" if i in held_out else ""))
               for i, cam in avatar.cameras.items()]
    ids = [c["id"] for c in cameras]
    default = ids.index(min(held_out)) if held_out else 0
    timesteps = np.asarray(avatar.timesteps, np.int64)
    coefficients = np.stack([avatar.coefficients(int(t)) for t in timesteps])
    return avatar.model, WebScene(cameras=cameras, neutral_pose=avatar.neutral_pose, timesteps=timesteps,
                                  coefficients=coefficients, roots=avatar.roots[timesteps],
                                  default_camera=default)


def export_workdir(workdir: str | os.PathLike, out: str | os.PathLike, dtype: str = "float32",
                   stage: str | None = None, sequences: dict[str, np.ndarray] | None = None) -> Path:
    """:func:`write_web` of a work directory's avatar (``sequences``: extra coefficient
    sequences, e.g. a reenactment's ``<out>.npy``); returns the path of ``index.html``."""
    model, scene = workdir_scene(workdir, stage)
    scene.sequences = dict(sequences or {})
    return write_web(out, model, scene, dtype)
