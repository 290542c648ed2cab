"""Reader for the VHAP / GaussianAvatars NeRF-style subject export (docs/data_format.md).

:func:`load_subject` validates the three ``transforms_{split}.json`` files up front
(structure, types, finite numbers, a rigid 4×4 ``transform_matrix``, positive ``h``/``w``,
referenced files exist) and converts every camera once to the conventions of docs/architecture.md §3:

    viewmat = inverse(c2w_OpenGL @ diag(1, −1, −1, 1))      (OpenCV world→camera)
    K       = [[fl_x, 0, cx], [0, fl_y, h − cy], [0, 0, 1]]  (``cy`` is bottom-up in the export)

Images, masks and FLAME parameters are read lazily; each read checks what only it can see
(image size against ``h``/``w``, npz keys, shapes and NaNs). Every problem is a
:class:`SubjectFormatError` whose message names the file and the field (docs/architecture.md §10).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from jaxtyping import Float, UInt8

from gem_jax.data.splits import SPLITS
from gem_jax.errors import SubjectFormatError
from gem_jax.head.flame import FlameParams, HeadModel, load_head_model
from gem_jax.types import Camera

#: OpenGL camera axes (x right, y up, z backward) → OpenCV (x right, y down, z forward).
OPENGL_TO_OPENCV = np.diag([1.0, -1.0, -1.0, 1.0])
#: flame_param npz keys with a fixed shape; ``shape``/``expr``/``static_offset`` are sized per subject.
POSE_SHAPES = {"translation": (1, 3), "rotation": (1, 3), "neck_pose": (1, 3), "jaw_pose": (1, 3),
               "eyes_pose": (1, 6)}
#: fields a transforms file may give once at the top level instead of per frame (NeRF style).
SHARED_INTRINSICS = ("cx", "cy", "fl_x", "fl_y", "h", "w")
CANONICAL_FILE = "canonical_flame_param.npz"
HEAD_MODEL_FILE = "head_model.npz"


def camera_from_nerf(c2w: Float[np.ndarray, "4 4"], fl_x: float, fl_y: float, cx: float, cy: float,
                     width: int, height: int) -> Camera:
    """OpenGL camera-to-world + bottom-up ``cy`` (the export) → OpenCV :class:`Camera` (float32)."""
    viewmat = np.linalg.inv(np.asarray(c2w, np.float64) @ OPENGL_TO_OPENCV)
    K = np.array([[fl_x, 0.0, cx], [0.0, fl_y, height - cy], [0.0, 0.0, 1.0]])
    return Camera(viewmat=viewmat.astype(np.float32), K=K.astype(np.float32), width=int(width), height=int(height))


@dataclasses.dataclass(frozen=True, eq=False)
class FrameRecord:
    """One image of one camera at one timestep (paths absolute, camera already in OpenCV)."""

    timestep: int
    camera_index: int
    sequence: str  # "" if the json has no 'sequence'
    image_path: Path
    mask_path: Path | None
    flame_param_path: Path
    camera: Camera
    source: str = ""  # "<json path>: frames[i]", for error messages


@dataclasses.dataclass(frozen=True, eq=False)
class SplitArrays:
    """A whole split decoded into memory: everything a training loop needs."""

    images: UInt8[np.ndarray, "F H W 3"]  # composited on the background
    masks: UInt8[np.ndarray, "F H W"]
    timesteps: np.ndarray  # (F,) int32
    camera_indices: np.ndarray  # (F,) int32
    viewmats: Float[np.ndarray, "F 4 4"]
    Ks: Float[np.ndarray, "F 3 3"]
    width: int
    height: int

    @property
    def num_frames(self) -> int:
        return len(self.timesteps)

    def camera(self, i: int) -> Camera:
        return Camera(viewmat=self.viewmats[i], K=self.Ks[i], width=self.width, height=self.height)


class Subject:
    """A validated subject folder; see the module docstring. Build with :func:`load_subject`."""

    def __init__(self, root: Path, splits: dict[str, list[FrameRecord]], notes: list[str]):
        self.root = root
        self.notes = notes
        self._splits = {k: sorted(v, key=lambda r: (r.timestep, r.camera_index)) for k, v in splits.items()}
        self._param_paths: dict[int, FrameRecord] = {}
        for split in SPLITS:
            for rec in self._splits[split]:
                first = self._param_paths.setdefault(rec.timestep, rec)
                if first.flame_param_path != rec.flame_param_path:
                    raise SubjectFormatError(
                        f"{rec.source}.flame_param_path: timestep {rec.timestep} points to {rec.flame_param_path}, "
                        f"but {first.source}.flame_param_path points to {first.flame_param_path}")
        self._params: dict[int, FlameParams] = {}
        self._dims: dict[str, tuple[int, Path]] = {}  # per-subject sizes, fixed by the first file read

    # ------------------------------------------------------------------ frames and cameras
    def frames(self, split: str) -> list[FrameRecord]:
        """Frames of ``split`` sorted by (timestep, camera)."""
        if split not in SPLITS:
            raise KeyError(f"unknown split {split!r}; expected one of {SPLITS}")
        return list(self._splits[split])

    def timesteps(self, split: str) -> list[int]:
        return sorted({r.timestep for r in self.frames(split)})

    def camera_indices(self, split: str) -> list[int]:
        return sorted({r.camera_index for r in self.frames(split)})

    def sequences(self, split: str) -> list[str]:
        return sorted({r.sequence for r in self.frames(split)})

    def cameras(self, split: str) -> dict[int, Camera]:
        """One camera per camera index (the one of its first frame)."""
        out: dict[int, Camera] = {}
        for rec in self.frames(split):
            out.setdefault(rec.camera_index, rec.camera)
        return dict(sorted(out.items()))

    def summary(self) -> str:
        counts = ", ".join(f"{s} {len(self._splits[s])}" for s in SPLITS)
        sizes = sorted({(r.camera.width, r.camera.height) for s in SPLITS for r in self._splits[s]})
        cams = sorted({r.camera_index for s in SPLITS for r in self._splits[s]})
        seqs = sorted({r.sequence for s in SPLITS for r in self._splits[s]} - {""})
        text = (f"frames {counts}; {len(self._param_paths)} timesteps, {len(cams)} cameras, "
                f"image size(s) {['%dx%d' % wh for wh in sizes]}, sequences {seqs}")
        return text + "".join(f"; note: {n}" for n in self.notes)

    def __repr__(self) -> str:
        return f"Subject({str(self.root)!r}: {self.summary()})"

    # ------------------------------------------------------------------ images
    def load_mask(self, record: FrameRecord) -> Float[np.ndarray, "H W"]:
        """Foreground mask in [0, 1] (ones if the frame has none)."""
        if record.mask_path is None:
            return np.ones((record.camera.height, record.camera.width), np.float32)
        return _read_mask(record)

    def load_image(self, record: FrameRecord, background=(1.0, 1.0, 1.0)) -> Float[np.ndarray, "H W 3"]:
        """RGB in [0, 1] composited ``img·mask + bg·(1 − mask)``; without a mask the image as is
        (an alpha channel, if the file has one, stands in for the mask)."""
        rgb, alpha = _read_rgb(record)
        mask = _read_mask(record) if record.mask_path is not None else alpha
        if mask is None:
            return rgb
        bg = np.asarray(background, np.float32).reshape(1, 1, 3)
        return rgb * mask[..., None] + bg * (1.0 - mask[..., None])

    def load_split(self, split: str, background=(1.0, 1.0, 1.0), max_frames: int | None = None,
                   progress: bool = False) -> SplitArrays:
        """Decode a split (or ``max_frames`` of it, evenly spaced) with a thread pool."""
        records = self.frames(split)
        if max_frames is not None and 0 <= max_frames < len(records):
            picks = np.round(np.linspace(0, len(records) - 1, max_frames)).astype(int) if max_frames else []
            records = [records[i] for i in picks]
        sizes = {(r.camera.width, r.camera.height) for r in records}
        if len(sizes) > 1:
            raise SubjectFormatError(f"transforms_{split}.json: frames have several image sizes (w, h) "
                                     f"{sorted(sizes)}; load_split needs one")
        w, h = sizes.pop() if sizes else (0, 0)
        n = len(records)
        images = np.zeros((n, h, w, 3), np.uint8)
        masks = np.zeros((n, h, w), np.uint8)

        def decode(i: int) -> None:
            images[i] = _to_uint8(self.load_image(records[i], background))
            masks[i] = _to_uint8(self.load_mask(records[i]))

        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
            for done, _ in enumerate(pool.map(decode, range(n)), 1):
                if progress and (done == n or done % max(1, n // 10) == 0):
                    print(f"[data] {split}: decoded {done}/{n} images", file=sys.stderr, flush=True)
        return SplitArrays(
            images=images, masks=masks,
            timesteps=np.array([r.timestep for r in records], np.int32).reshape(n),
            camera_indices=np.array([r.camera_index for r in records], np.int32).reshape(n),
            viewmats=np.array([r.camera.viewmat for r in records], np.float32).reshape(n, 4, 4),
            Ks=np.array([r.camera.K for r in records], np.float32).reshape(n, 3, 3), width=w, height=h)

    # ------------------------------------------------------------------ FLAME
    def flame_params(self, timestep: int) -> FlameParams:
        """Tracked parameters of ``timestep`` (cached; batch dim dropped; numpy float32)."""
        if timestep not in self._params:
            self._params[timestep] = self._read_params(self.flame_param_path(timestep))
        return self._params[timestep]

    def flame_param_path(self, timestep: int) -> Path:
        """The tracking file of ``timestep``."""
        if timestep not in self._param_paths:
            raise KeyError(f"timestep {timestep} is in no split of {self.root}")
        return self._param_paths[timestep].flame_param_path

    def canonical_params(self) -> FlameParams:
        """``canonical_flame_param.npz``; ``shape``/``static_offset`` default to the first timestep's."""
        path = self.root / CANONICAL_FILE
        if not path.is_file():
            raise SubjectFormatError(f"{path}: file not found (the canonical FLAME parameters of the subject)")
        fallback = self.flame_params(min(self._param_paths)) if self._param_paths else None
        return self._read_params(path, fallback=fallback)

    def head_model(self, path: str | None = None, n_shape: int = 0, n_expr: int = 0) -> HeadModel:
        """The FLAME-format head model at ``path``, else ``<root>/head_model.npz``."""
        model_path = Path(path) if path else self.root / HEAD_MODEL_FILE
        if not model_path.is_file():
            hint = "" if path else " and no head model path was given (point --config.data.head_model at FLAME)"
            raise SubjectFormatError(f"{model_path}: head model file not found{hint}")
        return load_head_model(model_path, n_shape or None, n_expr or None)

    def _read_params(self, path: Path, fallback: FlameParams | None = None) -> FlameParams:
        arrays = _read_npz(path)
        optional = {"static_offset"} | ({"shape"} if fallback is not None else set())
        for key in (*POSE_SHAPES, "shape", "expr", "static_offset"):
            if key not in arrays and key not in optional:
                raise SubjectFormatError(f"{path}: missing key {key!r}; keys present: {sorted(arrays)}")
        out = {key: _check_shape(path, key, arrays[key], [shape], str(shape)) for key, shape in POSE_SHAPES.items()}
        if "shape" in arrays:
            out["shape"] = self._sized(path, "shape", arrays["shape"], "(S,) or (1, S)", lambda s: [(s,), (1, s)])
        else:
            out["shape"] = fallback.shape
        out["expr"] = self._sized(path, "expr", arrays["expr"], "(1, E) or (E,)", lambda e: [(1, e), (e,)])
        if "static_offset" in arrays:
            out["static_offset"] = self._sized(path, "static_offset", arrays["static_offset"], "(1, V, 3)",
                                               lambda v: [(1, v, 3), (v, 3)], axis=-2)
        else:
            out["static_offset"] = fallback.static_offset if fallback is not None else None
        offset = out.pop("static_offset")
        flat = {k: v.reshape(-1) for k, v in out.items()}
        return FlameParams(**flat, static_offset=None if offset is None else offset.reshape(-1, 3))

    def _sized(self, path: Path, key: str, value: np.ndarray, wanted: str, shapes, axis: int = -1) -> np.ndarray:
        """Check a per-subject-sized field; its size must match the first file of the subject read."""
        size = value.shape[axis] if value.ndim >= -axis else -1
        if key in self._dims and self._dims[key][0] != size:
            first_size, first_path = self._dims[key]
            wanted = f"{wanted} with {first_size} like {first_path.name}"
            return _check_shape(path, key, value, shapes(first_size), wanted)
        value = _check_shape(path, key, value, shapes(size), wanted)
        self._dims.setdefault(key, (size, path))
        return value


def load_subject(root: str | Path) -> Subject:
    """Validate ``root``'s ``transforms_*.json`` (train required, val/test optional) → :class:`Subject`."""
    root = Path(root)
    if not root.is_dir():
        raise SubjectFormatError(f"{root}: subject folder not found")
    splits, notes = {}, []
    for split in SPLITS:
        path = root / f"transforms_{split}.json"
        if not path.exists() and split != "train":
            notes.append(f"{path.name} is missing: the {split} split is empty")
            warnings.warn(f"{path}: file not found, the {split} split is empty", stacklevel=2)
            splits[split] = []
            continue
        splits[split] = _read_transforms(root, path)
    return Subject(root, splits, notes)


# ---------------------------------------------------------------------------------------- json


def _read_transforms(root: Path, path: Path) -> list[FrameRecord]:
    if not path.is_file():
        raise SubjectFormatError(f"{path}: file not found (required: the training frames)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SubjectFormatError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict) or not isinstance(data.get("frames"), list):
        got = type(data.get("frames")).__name__ if isinstance(data, dict) else type(data).__name__
        raise SubjectFormatError(f"{path}: frames: expected an object with a list 'frames', got {got}")
    records, seen = [], {}
    for i, frame in enumerate(data["frames"]):
        where = f"{path}: frames[{i}]"
        if not isinstance(frame, dict):
            raise SubjectFormatError(f"{where}: expected an object, got {type(frame).__name__}")
        rec = _frame_record(root, frame, where, data)
        key = (rec.timestep, rec.camera_index)
        if key in seen:
            raise SubjectFormatError(f"{where}.timestep_index/camera_index: (timestep, camera) {key} "
                                     f"already appears in frames[{seen[key]}]")
        seen[key] = i
        records.append(rec)
    return records


def _frame_record(root: Path, frame: dict, where: str, top: dict) -> FrameRecord:
    def field(key):  # per-frame value, or the file's top-level one (NeRF style shared intrinsics)
        if key in frame:
            return frame[key]
        if key in SHARED_INTRINSICS and key in top:
            return top[key]
        raise SubjectFormatError(f"{where}.{key}: missing field")

    def number(key, positive=False):
        value = field(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or (positive and value <= 0):
            raise SubjectFormatError(f"{where}.{key}: expected a finite{' positive' if positive else ''} "
                                     f"number, got {value!r}")
        return float(value)

    def integer(key, minimum):
        value = field(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SubjectFormatError(f"{where}.{key}: expected an integer >= {minimum}, got {value!r}")
        return value

    def existing(key):
        value = field(key)
        if not isinstance(value, str) or not value:
            raise SubjectFormatError(f"{where}.{key}: expected a relative path string, got {value!r}")
        path = root / value
        if not path.is_file():
            raise SubjectFormatError(f"{where}.{key}: file not found: {path}")
        return path

    timestep, camera_index = integer("timestep_index", 0), integer("camera_index", 0)
    w, h = integer("w", 1), integer("h", 1)
    fl_x, fl_y = number("fl_x", positive=True), number("fl_y", positive=True)
    cx, cy = number("cx"), number("cy")
    c2w = _rigid_matrix(field("transform_matrix"), f"{where}.transform_matrix")
    sequence = frame.get("sequence", "")
    if not isinstance(sequence, str):
        raise SubjectFormatError(f"{where}.sequence: expected a string, got {sequence!r}")
    mask_path = existing("fg_mask_path") if frame.get("fg_mask_path") is not None else None
    return FrameRecord(
        timestep=timestep, camera_index=camera_index, sequence=sequence, image_path=existing("file_path"),
        mask_path=mask_path, flame_param_path=existing("flame_param_path"),
        camera=camera_from_nerf(c2w, fl_x, fl_y, cx, cy, w, h), source=where)


def _rigid_matrix(value, where: str) -> np.ndarray:
    """A 4×4 list of finite numbers whose top-left 3×3 is a rotation and bottom row [0 0 0 1]."""
    ok = isinstance(value, list) and len(value) == 4 and all(
        isinstance(row, list) and len(row) == 4 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in row) for row in value)
    if not ok:
        raise SubjectFormatError(f"{where}: expected 4x4 numbers, got {str(value)[:120]}")
    m = np.asarray(value, np.float64)
    if not np.all(np.isfinite(m)):
        raise SubjectFormatError(f"{where}: expected finite numbers, got NaN or Inf in {m.tolist()}")
    rot = m[:3, :3]
    if not np.allclose(m[3], [0, 0, 0, 1], atol=1e-6) or not np.allclose(rot.T @ rot, np.eye(3), atol=1e-3) \
            or np.linalg.det(rot) <= 0:
        raise SubjectFormatError(f"{where}: expected a rigid camera-to-world transform (rotation + "
                                 f"translation, last row 0 0 0 1), got {np.round(m, 4).tolist()}")
    return m


# ---------------------------------------------------------------------------------------- files


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise SubjectFormatError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise SubjectFormatError(f"{path}: expected an .npz archive of named arrays, got a single array")
            names = list(data.files)
            arrays = {}
            for key in names:
                try:
                    arrays[key] = data[key]
                except ValueError as err:  # object arrays need pickle, which is refused
                    raise SubjectFormatError(f"{path}: key {key!r}: not a plain numeric array ({err})") from err
                except Exception as err:  # a truncated member (zlib, zipfile, EOF errors)
                    raise SubjectFormatError(f"{path}: key {key!r}: unreadable ({type(err).__name__}: {err})") from err
    except SubjectFormatError:
        raise
    except Exception as err:  # not a zip at all, truncated directory: zipfile / OS / EOF / value errors
        raise SubjectFormatError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from err
    return arrays


def _check_shape(path: Path, key: str, value: np.ndarray, shapes: list[tuple], wanted: str) -> np.ndarray:
    if value.shape not in [tuple(s) for s in shapes]:
        raise SubjectFormatError(f"{path}: key {key!r}: expected shape {wanted}, got {value.shape}")
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
        raise SubjectFormatError(f"{path}: key {key!r}: expected numbers, got dtype {value.dtype}")
    if not np.all(np.isfinite(value)):
        raise SubjectFormatError(f"{path}: key {key!r}: contains NaN or Inf")
    return value.astype(np.float32)


def _imread(path: Path, flags: int, record: FrameRecord, field: str) -> np.ndarray:
    img = cv2.imread(str(path), flags) if path.is_file() else None
    if img is None:
        state = "not a readable image" if path.is_file() else "file not found"
        raise SubjectFormatError(f"{path}: {state} (referenced by {record.source}.{field})")
    if img.shape[:2] != (record.camera.height, record.camera.width):
        raise SubjectFormatError(
            f"{path}: image is {img.shape[1]}x{img.shape[0]} (w x h) but {record.source} says "
            f"w={record.camera.width}, h={record.camera.height}")
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    return img.astype(np.float32) / scale


def _read_rgb(record: FrameRecord) -> tuple[Float[np.ndarray, "H W 3"], Float[np.ndarray, "H W"] | None]:
    img = _imread(record.image_path, cv2.IMREAD_UNCHANGED, record, "file_path")
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=-1), None
    alpha = img[..., 3] if img.shape[-1] == 4 else None
    return np.ascontiguousarray(img[..., 2::-1]), alpha


def _read_mask(record: FrameRecord) -> Float[np.ndarray, "H W"]:
    return _imread(record.mask_path, cv2.IMREAD_GRAYSCALE, record, "fg_mask_path")


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
