"""Validate a whole subject export before the pipeline trusts it (docs/architecture.md §4, §10).

:func:`gem_jax.data.subject.load_subject` checks the ``transforms_*.json`` files and that every
file they name exists; images, masks and tracking files are read lazily by the stages. The
``data`` stage calls :func:`validate_subject` so that a broken export fails *there*, before
``data/DONE`` is written, rather than minutes later inside the teacher:

* every image and every foreground mask decodes and has the ``w``/``h`` its frame declares;
  each split has one image size;
* foreground masks are given for every frame or for none (a mix would composite some
  images on the background and leave others as they are);
* every ``flame_param/*.npz`` and ``canonical_flame_param.npz`` is an npz with its keys and
  shapes, finite, with one ``shape``/``expr`` size across the subject;
* the head model loads (``.npz`` or FLAME ``.pkl``), has FLAME's five joints and a UV layout
  (the teacher lives in UV space), and agrees with the tracking: no tracked ``shape`` or
  ``expr`` vector is longer than the model's basis (the extra coefficients would be silently
  ignored) and ``static_offset`` has one row per model vertex.

Every problem raises :class:`~gem_jax.errors.SubjectFormatError` naming the file, the field,
what was expected and what was found. :func:`validate_subject` returns a :class:`Checked`
whose ``str`` is the line the stage prints.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gem_jax.data.splits import SPLITS
from gem_jax.data.subject import HEAD_MODEL_FILE, FrameRecord, Subject
from gem_jax.errors import SubjectFormatError
from gem_jax.head.flame import JOINT_NAMES

__all__ = ["Checked", "validate_subject"]


@dataclasses.dataclass(frozen=True)
class Checked:
    """What :func:`validate_subject` read and found consistent."""

    root: Path
    images: int
    masks: int
    image_sizes: dict[str, tuple[int, int]]  # split -> (w, h)
    tracking_files: int
    shape_size: int
    expr_size: int
    head_model: Path
    vertices: int
    faces: int
    model_shape: int
    model_expr: int

    def __str__(self) -> str:
        sizes = ", ".join(f"{s} {w}x{h}" for s, (w, h) in self.image_sizes.items())
        masks = f"{self.masks} foreground masks (every frame has one)" if self.masks else "no foreground masks"
        return (f"{self.root}: {self.images} images decoded at their declared size ({sizes}); {masks}; "
                f"{self.tracking_files} tracking files + the canonical one (keys, shapes, finite; shape "
                f"{self.shape_size}, expr {self.expr_size}); head model {self.head_model.name} ({self.vertices} "
                f"vertices, {self.faces} faces, {len(JOINT_NAMES)} joints, UV layout, {self.model_shape} shape / "
                f"{self.model_expr} expression components) agrees with the tracking")


def _frames(subject: Subject) -> list[FrameRecord]:
    return [r for split in SPLITS for r in subject.frames(split)]


def _check_masks(frames: list[FrameRecord]) -> int:
    with_mask = [r for r in frames if r.mask_path is not None]
    if with_mask and len(with_mask) != len(frames):
        without = next(r for r in frames if r.mask_path is None)
        raise SubjectFormatError(
            f"{without.source}.fg_mask_path: missing, but {with_mask[0].source}.fg_mask_path is given "
            f"({len(with_mask)} of {len(frames)} frames have a mask): expected a foreground mask for every "
            "frame or for none")
    return len(with_mask)


def _check_sizes(subject: Subject) -> dict[str, tuple[int, int]]:
    out = {}
    for split in SPLITS:
        records = subject.frames(split)
        sizes = sorted({(r.camera.width, r.camera.height) for r in records})
        if len(sizes) > 1:
            other = next(r for r in records if (r.camera.width, r.camera.height) != sizes[0])
            raise SubjectFormatError(f"{other.source}.w/h: {other.camera.width}x{other.camera.height}, but other "
                                     f"frames of transforms_{split}.json are {sizes[0][0]}x{sizes[0][1]}: "
                                     "expected one image size per split")
        if sizes:
            out[split] = sizes[0]
    return out


def _decode_all(subject: Subject, frames: list[FrameRecord]) -> None:
    """Decode every image and mask (threads); the reader checks each one's size against its frame."""

    def one(record: FrameRecord) -> None:
        subject.load_image(record)
        subject.load_mask(record)

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        list(pool.map(one, frames))  # re-raises the first error


def validate_subject(subject: Subject, head_model: str | os.PathLike | None = None, n_shape: int = 0,
                     n_expr: int = 0, need_train: bool = True) -> Checked:
    """Read and check every file of ``subject`` and the head model (module docstring).

    ``head_model`` is the model file (default ``<subject>/head_model.npz``); ``n_shape``/``n_expr``
    are the config's component counts (0: all the model has), which must not exceed the file's.
    ``need_train=False`` accepts a subject without training frames (the cross-identity ground truth).
    """
    frames = _frames(subject)
    if need_train and not subject.frames("train"):
        raise SubjectFormatError(f"{subject.root / 'transforms_train.json'}: frames: expected at least one "
                                 "training frame, found none")
    masks = _check_masks(frames)
    sizes = _check_sizes(subject)
    _decode_all(subject, frames)
    timesteps = sorted({r.timestep for r in frames})
    params = {t: subject.flame_params(t) for t in timesteps}
    canonical = subject.canonical_params()
    model_path = Path(head_model) if head_model else subject.root / HEAD_MODEL_FILE
    model = subject.head_model(str(head_model) if head_model else None)  # every component the file has
    subject.head_model(str(head_model) if head_model else None, n_shape, n_expr)  # the config's counts fit
    if model.num_joints != len(JOINT_NAMES):
        raise SubjectFormatError(f"{model_path}: field 'kintree_table': expected FLAME's {len(JOINT_NAMES)} joints "
                                 f"{JOINT_NAMES}, found {model.num_joints}")
    if model.vt is None or model.ft is None:
        raise SubjectFormatError(f"{model_path}: fields 'vt'/'ft': expected a UV layout (the teacher works in "
                                 "UV space), found none")
    paths = {t: subject.flame_param_path(t) for t in timesteps}
    paths["canonical"] = subject.root / "canonical_flame_param.npz"
    for t, p in [*params.items(), ("canonical", canonical)]:
        for key, size, have, what in (("shape", p.shape.shape[0], model.n_shape, "identity"),
                                      ("expr", p.expr.shape[0], model.n_expr, "expression")):
            if size > have:
                raise SubjectFormatError(
                    f"{paths[t]}: key {key!r}: {size} {what} coefficients, but the head model {model_path} has "
                    f"{have}: expected at most {have} (the rest would be silently ignored; is this the head "
                    "model the subject was tracked with?)")
        if p.static_offset is not None and p.static_offset.shape[0] != model.num_vertices:
            raise SubjectFormatError(
                f"{paths[t]}: key 'static_offset': expected (1, {model.num_vertices}, 3) (one row per vertex of "
                f"{model_path.name}), found {p.static_offset.shape[0]} rows")
    first = params[timesteps[0]] if timesteps else canonical
    return Checked(root=subject.root, images=len(frames), masks=masks, image_sizes=sizes,
                   tracking_files=len(timesteps), shape_size=int(first.shape.shape[0]),
                   expr_size=int(first.expr.shape[0]), head_model=model_path, vertices=model.num_vertices,
                   faces=int(model.faces.shape[0]), model_shape=model.n_shape, model_expr=model.n_expr)
