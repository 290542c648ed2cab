"""Files written whole or not at all (docs/architecture.md §10: "nothing is lost").

Every output that a later stage or a resumed run reads — models, data matrices, evaluation
JSON, stage markers — is written to a hidden temporary name beside its destination and then
renamed over it (``os.replace`` is atomic on POSIX), so a crash mid-write leaves either the old
file or none, never half of one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = ["write_bytes_with", "write_json", "write_npy", "write_npz", "write_text"]


def write_bytes_with(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(file)`` on a temporary file, then rename it to ``path``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_npy(path: str | os.PathLike, value: np.ndarray) -> Path:
    return write_bytes_with(path, lambda fh: np.save(fh, value))


def write_npz(path: str | os.PathLike, **arrays) -> Path:
    return write_bytes_with(path, lambda fh: np.savez(fh, **arrays))


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes_with(path, lambda fh: fh.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, value: Any) -> Path:
    return write_text(path, json.dumps(value, indent=1))
