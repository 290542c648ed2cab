"""Images and videos on disk: PNG frames and MP4 files through OpenCV.

Every stage that writes renders (teacher and GEM evaluation, component sweeps, reenactment)
goes through :func:`write_png` and :class:`VideoWriter`; drivers are read with
:func:`read_frames`. Images are float RGB in ``[0, 1]`` ``(H, W, 3)`` in memory; OpenCV's
BGR order is handled here, once. Failures name the file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

__all__ = ["IMAGE_SUFFIXES", "VideoWriter", "read_frames", "to_uint8", "write_png"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Float ``[0, 1]`` RGB → uint8 (clipped, rounded)."""
    return np.clip(np.round(np.asarray(image, np.float32) * 255.0), 0, 255).astype(np.uint8)


def write_png(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write a float RGB image in ``[0, 1]`` (or uint8) as PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = image if np.asarray(image).dtype == np.uint8 else to_uint8(image)
    if not cv2.imwrite(str(path), np.ascontiguousarray(rgb[..., ::-1])):
        raise OSError(f"{path}: could not write the PNG")
    return path


class VideoWriter:
    """``with VideoWriter(path, fps) as v: v.write(frame)`` — MP4 (``mp4v``), size from the first frame."""

    def __init__(self, path: str | os.PathLike, fps: float = 25.0):
        self.path, self.fps, self._writer, self.frames = Path(path), float(fps), None, 0
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, image: np.ndarray) -> None:
        rgb = image if np.asarray(image).dtype == np.uint8 else to_uint8(image)
        h, w = rgb.shape[:2]
        if self._writer is None:
            self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
            if not self._writer.isOpened():
                raise OSError(f"{self.path}: OpenCV could not open an MP4 writer")
            self._size = (h, w)
        if (h, w) != self._size:
            raise ValueError(f"{self.path}: frame {self.frames} is {w}x{h}, the video is {self._size[1]}x{self._size[0]}")
        self._writer.write(np.ascontiguousarray(rgb[..., ::-1]))
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_frames(source: str | os.PathLike, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Float RGB frames ``(H, W, 3)`` of a video file or of an image folder (sorted by name).

    A missing path, an empty folder or a file OpenCV cannot decode raises an error naming it.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such video file or image folder")
    count = 0
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"{source}: the folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            if max_frames is not None and count >= max_frames:
                return
            bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ValueError(f"{path}: not a readable image")
            count += 1
            yield bgr[..., ::-1].astype(np.float32) / 255.0
        return
    capture = cv2.VideoCapture(str(source))
    try:
        if not capture.isOpened():
            raise ValueError(f"{source}: OpenCV cannot open this file as a video")
        while max_frames is None or count < max_frames:
            ok, bgr = capture.read()
            if not ok:
                break
            count += 1
            yield bgr[..., ::-1].astype(np.float32) / 255.0
    finally:
        capture.release()
    if count == 0:
        raise ValueError(f"{source}: no frame could be decoded (not a video, or an empty one)")
