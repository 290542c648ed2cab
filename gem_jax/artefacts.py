"""Reading the files one stage writes for the next, with every failure named (docs/architecture.md §10).

A stage's outputs (``collect/*.npy``, ``pca/coeffs.npy``, ``gem.npz``, the regressor, ...) are
written whole or not at all (:mod:`gem_jax.atomic`), but a file can still be truncated by a full
disk, copied half-way, or overwritten by hand. NumPy then raises whatever its parser met first
(``EOFError``, ``zipfile.BadZipFile``, "cannot reshape array of size 10", ``UnpicklingError``),
with no file name. These readers turn every such failure into an
:class:`~gem_jax.errors.ArtefactError` that names the file, what was wrong and the stage that
writes it (so ``--force <stage>`` redoes it), and a missing file into a
:class:`~gem_jax.errors.MissingArtefactError` (also a ``FileNotFoundError``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from gem_jax.errors import ArtefactError, MissingArtefactError

__all__ = ["artefact_error", "describe_error", "need", "read_json", "read_npy", "read_npz"]


def artefact_error(path: str | os.PathLike, stage: str, problem: str) -> ArtefactError:
    """The error for a corrupt artefact: ``<path>: <problem>; written by the <stage> stage ...``."""
    return ArtefactError(f"{path}: {problem}; it is written by the {stage} stage: redo it with --force {stage}")


def describe_error(err: Exception) -> str:
    """The reader's complaint, short. NumPy answers "allow_pickle=False" to any bytes it cannot
    parse as an array header, with advice to unpickle — not what a damaged file needs."""
    text = str(err)
    if "allow_pickle" in text:
        text = "not an array header (such bytes could only be read by unpickling, which is refused)"
    return f"{type(err).__name__}: {text[:300]}"


def need(path: str | os.PathLike, stage: str) -> Path:
    """``path`` if it is a file, else :class:`MissingArtefactError` naming the stage to run."""
    path = Path(path)
    if not path.is_file():
        raise MissingArtefactError(f"{path}: missing; run --stage {stage} first")
    return path


def read_npy(path: str | os.PathLike, stage: str, *, mmap: bool = False, ndim: int | None = None,
             kind: str | None = None) -> np.ndarray:
    """One ``.npy`` array (memory-mapped read-only with ``mmap``); optionally checks its number of
    dimensions and dtype kind (``'f'`` float, ``'i'`` integer)."""
    path = need(path, stage)
    try:
        value = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as err:  # a truncated or foreign file: EOF, reshape, header or pickle errors
        raise artefact_error(path, stage, f"not a readable .npy array ({describe_error(err)})") from err
    if not isinstance(value, np.ndarray):
        raise artefact_error(path, stage, f"expected one .npy array, found {type(value).__name__}")
    if ndim is not None and value.ndim != ndim:
        raise artefact_error(path, stage, f"expected a {ndim}-D array, found shape {value.shape}")
    if kind is not None and not (value.dtype.kind == kind or (kind == "i" and value.dtype.kind == "u")):
        raise artefact_error(path, stage, f"expected {'float' if kind == 'f' else 'integer'} values, "
                                          f"found dtype {value.dtype}")
    return value


def read_npz(path: str | os.PathLike, stage: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` archive, read eagerly (a truncated member fails here, by name)."""
    path = need(path, stage)
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:
        raise artefact_error(path, stage, f"not a readable .npz archive ({describe_error(err)})") from err
    if not hasattr(archive, "files"):
        raise artefact_error(path, stage, "expected an .npz archive, found a single .npy array")
    fields = {}
    with archive:
        for name in archive.files:
            try:
                fields[name] = archive[name]
            except Exception as err:
                raise artefact_error(path, stage, f"field {name!r} unreadable ({describe_error(err)})") from err
    return fields


def read_json(path: str | os.PathLike, stage: str) -> dict:
    """A JSON object a stage wrote (``eval.json``, ``metrics.json``)."""
    path = need(path, stage)
    try:
        value = json.loads(path.read_text())
    except Exception as err:  # truncated JSON, or bytes that are not UTF-8
        raise artefact_error(path, stage, f"not readable JSON ({describe_error(err)})") from err
    if not isinstance(value, dict):
        raise artefact_error(path, stage, f"expected a JSON object, found {type(value).__name__}")
    return value
