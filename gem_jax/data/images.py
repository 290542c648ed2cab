"""A split of the subject decoded into memory, ready for any background (docs/architecture.md §4, §5).

Training stages (teacher, refinement, regressor) and the evaluation keep each split as uint8
arrays: the *foreground* ``image·mask`` (composited on black) and the mask, so any background
can be composited later (``target = fg + bg·(1 − mask)``: random colours in training, white
in the evaluation). Cameras are already in the conventions of docs/architecture.md §3 (OpenCV w2c).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["ImageSet", "load_images"]


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """A split in memory: ``fg`` (F,H,W,3) uint8 = image·mask, ``masks`` (F,H,W) uint8, cameras,
    timesteps, and ``mouth`` (F,H,W) uint8 masks or None."""

    fg: np.ndarray
    masks: np.ndarray
    timesteps: np.ndarray
    camera_indices: np.ndarray
    viewmats: np.ndarray
    Ks: np.ndarray
    width: int
    height: int
    mouth: np.ndarray | None = None

    @property
    def num(self) -> int:
        return int(self.fg.shape[0])

    def subset(self, rows) -> "ImageSet":
        """The images ``rows`` (an index array) as a new set."""
        rows = np.asarray(rows)
        return dataclasses.replace(self, **{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), np.ndarray)})

    def composite(self, index, background) -> np.ndarray:
        """Float images of ``index`` over ``background`` (3,): ``fg + bg·(1 − mask)``."""
        fg = self.fg[index].astype(np.float32) / 255.0
        m = self.masks[index].astype(np.float32)[..., None] / 255.0
        return fg + np.asarray(background, np.float32) * (1.0 - m)


def load_images(subject, split: str, max_frames: int | None = None) -> ImageSet:
    """Decode ``split`` (or ``max_frames`` of it, evenly spaced) into an :class:`ImageSet`."""
    arrays = subject.load_split(split, background=(0.0, 0.0, 0.0), max_frames=max_frames or None)
    if arrays.num_frames == 0:
        raise ValueError(f"{subject.root}: split {split!r} has no frames")
    return ImageSet(fg=arrays.images, masks=arrays.masks, timesteps=arrays.timesteps,
                    camera_indices=arrays.camera_indices, viewmats=arrays.viewmats, Ks=arrays.Ks,
                    width=int(arrays.width), height=int(arrays.height))
