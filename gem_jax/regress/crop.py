"""Face crops for the regressor: square boxes from tracking, a detector, or the foreground.

The regressor (docs/architecture.md §7) sees a square crop of the face, resized to the extractor's input.
Boxes are ``(cx, cy, size)`` in pixels (centre and side). Where they come from, best first:

1. **the projected head model** (:func:`box_from_vertices`) — when the frame's tracking is
   known (the subject's own images, the synthetic cross-identity ground truth): the bounding
   square of the projected mesh, enlarged by ``margin``;
2. **MediaPipe's face detector** — when the optional ``mediapipe`` package is installed;
3. **OpenCV's Haar cascade** — when the installed OpenCV ships ``haarcascade_frontalface_default.xml``
   (opencv-python 5 wheels no longer do);
4. **the foreground** — the bounding square of the pixels that differ from the border colour
   (a head on a plain background, as in the synthetic driver videos and many captures);
5. the centre square of the image, with a warning.

For video, :func:`smooth_boxes` low-passes the boxes over time (exponential moving average in
both directions, so there is no lag), which keeps the crop — and the features — from jittering.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import cv2
import numpy as np

__all__ = ["box_from_vertices", "crop", "detect_boxes", "detector_name", "smooth_boxes"]


def box_from_vertices(pixels: np.ndarray, margin: float = 1.15) -> np.ndarray:
    """``(cx, cy, size)`` of the bounding square of projected vertices ``(V, 2+)`` × ``margin``."""
    lo, hi = pixels[:, :2].min(0), pixels[:, :2].max(0)
    centre = (lo + hi) / 2
    return np.array([centre[0], centre[1], float((hi - lo).max()) * margin], np.float32)


def crop(image: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """The square ``box`` of ``image (H, W, 3)`` resampled to ``(size, size, 3)`` (edges replicated)."""
    cx, cy, side = (float(v) for v in box)
    scale = size / max(side, 1.0)
    m = np.array([[scale, 0, size / 2 - scale * cx], [0, scale, size / 2 - scale * cy]], np.float32)
    return cv2.warpAffine(np.asarray(image, np.float32), m, (size, size), flags=cv2.INTER_AREA if scale < 1
                          else cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


@functools.cache
def _haar():
    base = getattr(getattr(cv2, "data", None), "haarcascades", "")
    path = os.path.join(base, "haarcascade_frontalface_default.xml") if base else ""
    if path and os.path.isfile(path):
        cascade = cv2.CascadeClassifier(path)
        if not cascade.empty():
            return cascade
    return None


def _mediapipe_available() -> bool:
    return importlib.util.find_spec("mediapipe") is not None


def detector_name() -> str:
    """Which detector :func:`detect_boxes` uses here: ``mediapipe``, ``haar`` or ``foreground``."""
    if _mediapipe_available():
        return "mediapipe"
    return "haar" if _haar() is not None else "foreground"


def _mediapipe_box(image: np.ndarray, margin: float) -> np.ndarray | None:
    import mediapipe as mp

    h, w = image.shape[:2]
    with mp.solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=0.5) as det:
        result = det.process(np.ascontiguousarray((np.clip(image, 0, 1) * 255).astype(np.uint8)))
    if not result.detections:
        return None
    b = max(result.detections, key=lambda d: d.score[0]).location_data.relative_bounding_box
    x0, y0, bw, bh = b.xmin * w, b.ymin * h, b.width * w, b.height * h
    return np.array([x0 + bw / 2, y0 + bh / 2, max(bw, bh) * margin * 1.4], np.float32)


def _haar_box(image: np.ndarray, margin: float) -> np.ndarray | None:
    gray = cv2.cvtColor((np.clip(image, 0, 1) * 255).astype(np.uint8), cv2.COLOR_RGB2GRAY)
    faces = _haar().detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
    if len(faces) == 0:
        return None
    x, y, bw, bh = max(faces, key=lambda f: f[2] * f[3])
    return np.array([x + bw / 2, y + bh / 2, max(bw, bh) * margin * 1.3], np.float32)


def _foreground_box(image: np.ndarray, margin: float, threshold: float = 0.08) -> np.ndarray | None:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    colour = np.median(border, axis=0)
    if np.median(np.abs(border - colour).max(-1)) > threshold:  # the border is not one plain colour
        return None
    fg = np.abs(image - colour).max(-1) > threshold
    if fg.mean() < 0.01:
        return None
    ys, xs = np.nonzero(fg)
    pix = np.stack([xs, ys], -1).astype(np.float32)
    return box_from_vertices(pix, margin)


def detect_boxes(frames, margin: float = 1.1) -> np.ndarray:
    """``(F, 3)`` face boxes of float RGB frames (module docstring; no tracking known)."""
    kind = detector_name()
    boxes, missing = [], 0
    for image in frames:
        image = np.asarray(image, np.float32)
        box = None
        if kind == "mediapipe":
            box = _mediapipe_box(image, margin)
        elif kind == "haar":
            box = _haar_box(image, margin)
        if box is None:
            box = _foreground_box(image, margin)
        if box is None:
            h, w = image.shape[:2]
            box = np.array([w / 2, h / 2, min(h, w)], np.float32)
            missing += 1
        boxes.append(box)
    if missing:
        warnings.warn(f"face crop: no face found in {missing} of {len(boxes)} frames ({kind}); "
                      "used the centre square", RuntimeWarning, stacklevel=2)
    return np.stack(boxes) if boxes else np.zeros((0, 3), np.float32)


def smooth_boxes(boxes: np.ndarray, strength: float = 0.6) -> np.ndarray:
    """Zero-lag temporal smoothing of ``(F, 3)`` boxes: forward and backward EMA, averaged."""
    boxes = np.asarray(boxes, np.float64)
    if len(boxes) < 3 or strength <= 0:
        return boxes.astype(np.float32)

    def ema(x):
        out = np.empty_like(x)
        out[0] = x[0]
        for i in range(1, len(x)):
            out[i] = strength * out[i - 1] + (1 - strength) * x[i]
        return out

    return ((ema(boxes) + ema(boxes[::-1])[::-1]) / 2).astype(np.float32)
