"""``python -m gem_jax.reenact`` — drive a trained avatar with a video of any face (docs/architecture.md §7).

    python -m gem_jax.reenact --model runs/q --driver driver.mp4 --out out.mp4
    python -m gem_jax.reenact --model runs/q --driver frames/ --out out.mp4 --neutral 12 --orbit
    python -m gem_jax.reenact --model runs/q --driver photo.png --out photo.mp4 --camera 3

Steps, each timed after a warm-up call (frames per second are printed):

1. **read** the driver — a video file (OpenCV) or a folder of images (sorted by name);
2. **crop** — face boxes per frame (:func:`gem_jax.regress.crop.detect_boxes`: MediaPipe when
   installed, else OpenCV's Haar cascade when the installed OpenCV ships it, else the
   foreground on a plain background, else the centre), smoothed over time;
3. **features** of every crop relative to the driver's *own* neutral frame (``--neutral``,
   default the first), whitened by the regressor's feature PCA;
4. **regress** — the MLP gives ``k`` (±2.9σ);
5. **render** — the GEM (refined if present) posed at the subject's neutral training pose,
   seen by a training camera (``--camera``, default the held-out one) or orbiting (``--orbit``).

Writes ``--out`` (MP4; driver | avatar side by side unless ``--avatar-only``) and the
coefficients ``<out>.npy`` ``(F, ΣK)`` in σ units.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["main", "orbit_viewmats", "reenact"]


def orbit_viewmats(viewmat: np.ndarray, centre: np.ndarray, frames: int, degrees: float = 30.0) -> np.ndarray:
    """``(F, 4, 4)`` world→camera matrices turning the camera about the vertical axis through ``centre``."""
    out = np.zeros((frames, 4, 4), np.float32)
    for i, a in enumerate(np.deg2rad(degrees) * np.sin(np.linspace(0, 2 * np.pi, frames, endpoint=False))):
        c, s = np.cos(a), np.sin(a)
        spin = np.eye(4)
        spin[:3, :3] = [[c, 0, s], [0, 1, 0], [-s, 0, c]]
        to, back = np.eye(4), np.eye(4)
        to[:3, 3], back[:3, 3] = -centre, centre
        out[i] = viewmat @ back @ spin @ to  # rotate the world about the head, then view
    return out


def _resize_to(image: np.ndarray, height: int) -> np.ndarray:
    import cv2

    h, w = image.shape[:2]
    return cv2.resize(image, (max(1, round(w * height / h)), height), interpolation=cv2.INTER_AREA)


def reenact(model_dir, driver, out, neutral: int = 0, camera: int | None = None, orbit: bool = False,
            avatar_only: bool = False, max_frames: int | None = None, fps: float = 25.0, batch_size: int = 8) -> dict:
    """Run the five steps of the module docstring; returns the timings and output paths."""
    import jax.numpy as jnp

    from gem_jax.context import StageContext
    from gem_jax.eigen.model import check_coefficients
    from gem_jax.eigen.render import render_exact
    from gem_jax.eigen.workdir import load_model, load_pca_coefficients, load_roots
    from gem_jax.evaluation import render_all
    from gem_jax.regress.crop import crop, detect_boxes, smooth_boxes
    from gem_jax.regress.inference import REGRESSOR_FILE, TrainedRegressor, neutral_timestep
    from gem_jax.video import VideoWriter, read_frames

    model_dir, out = Path(model_dir), Path(out)
    timings = {}

    def timed(name, count, fn):
        start = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - start
        count = len(value) if count is None else count
        timings[name] = {"seconds": seconds, "fps": count / max(seconds, 1e-9)}
        print(f"[reenact] {name:<9} {count} frames in {seconds:6.2f}s = {count / max(seconds, 1e-9):8.1f} fps",
              flush=True)
        return value

    regressor = TrainedRegressor.load(model_dir / "regress" / REGRESSOR_FILE)
    gem = load_model(model_dir)
    roots = load_roots(model_dir)
    subject = StageContext.from_workdir(model_dir).subject  # the run's subject, also a real capture's
    frames = timed("read", None, lambda: list(read_frames(driver, max_frames)))
    n = len(frames)
    if not 0 <= neutral < n:
        raise ValueError(f"--neutral {neutral}: the driver has {n} frames")
    size = regressor.crop_size
    crops = timed("crop", n, lambda: np.stack([crop(f, b, size) for f, b in
                                                zip(frames, smooth_boxes(detect_boxes(frames)))]))
    extractor = regressor.extractor()
    extractor(crops[:1])  # compile outside the timings
    feats = timed("features", n, lambda: extractor(crops))
    regressor.predict(feats[:1] - feats[:1])  # compile outside the timings
    k = timed("regress", n, lambda: regressor.predict(feats - feats[neutral]))
    k = check_coefficients(gem, k, where="reenact: regressed coefficients")
    cameras = {**subject.cameras("train"), **subject.cameras("val")}
    if camera is None:
        camera = next(iter(subject.cameras("val")), next(iter(cameras)))
    if camera not in cameras:
        raise ValueError(f"--camera {camera}: the subject has cameras {sorted(cameras)}")
    cam = cameras[camera]
    train_t = load_pca_coefficients(model_dir).timesteps
    root = roots[neutral_timestep(subject, train_t)]
    viewmats = np.broadcast_to(np.asarray(cam.viewmat, np.float32), (n, 4, 4))
    if orbit:
        centre = np.asarray(gem.evaluate(jnp.zeros(gem.total_components)).means).mean(0) @ root[:3, :3].T + root[:3, 3]
        viewmats = orbit_viewmats(np.asarray(cam.viewmat), centre, n)

    roots_b = np.broadcast_to(root, (batch_size, 4, 4))
    Ks_b = np.broadcast_to(np.asarray(cam.K), (batch_size, 3, 3))

    def render_rows(rows):
        return render_exact(gem, k[rows], roots_b, viewmats[rows], Ks_b, (1.0, 1.0, 1.0), cam.width, cam.height)

    render_rows(np.zeros(batch_size, int))  # compile outside the timings
    renders = timed("render", n, lambda: render_all(render_rows, n, batch_size))
    with VideoWriter(out, fps) as video:
        for f, r in zip(frames, renders):
            video.write(r if avatar_only else np.concatenate([_resize_to(f, r.shape[0]), r], axis=1))
    coeff_path = out.with_suffix(".npy")
    np.save(coeff_path, k)
    print(f"[reenact] wrote {out} ({n} frames) and {coeff_path}", flush=True)
    return {"frames": n, "video": str(out), "coefficients": str(coeff_path), "timings": timings, "camera": camera}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m gem_jax.reenact", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="work directory of a run (after --stage regress)")
    p.add_argument("--driver", required=True, help="driver video file or folder of images")
    p.add_argument("--out", required=True, help="output MP4")
    p.add_argument("--neutral", type=int, default=0, help="index of the driver's neutral frame")
    view = p.add_mutually_exclusive_group()
    view.add_argument("--camera", type=int, default=None, help="subject camera to render from")
    view.add_argument("--orbit", action="store_true", help="orbit the camera around the head")
    p.add_argument("--avatar-only", action="store_true", help="write the avatar alone (no side-by-side)")
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--fps", type=float, default=25.0)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        reenact(args.model, args.driver, args.out, args.neutral, args.camera, args.orbit, args.avatar_only,
                args.max_frames, args.fps)
    except (FileNotFoundError, ValueError) as err:
        print(f"[reenact] error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
