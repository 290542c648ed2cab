"""Exporting a distilled GEM: the compact file, 3DGS ``.ply`` frames, and component sweeps (docs/architecture.md §6).

    python -m gem_jax.export --workdir runs/q --npz avatar_fp16.npz --dtype float16
    python -m gem_jax.export --workdir runs/q --ply frame.ply --timestep 3        # a training frame
    python -m gem_jax.export --workdir runs/q --ply frame.ply --coeffs k.npy      # any (ΣK,) vector
    python -m gem_jax.export --workdir runs/q --sweep runs/q/sweeps --components 3
    python -m gem_jax.export --workdir runs/q --web runs/q/web --dtype float16  # the browser viewer

* **compact file** — :meth:`GEM.save` (one ``.npz``, float32 or float16); its size is printed.
* **.ply** — the Gaussians of a coefficient vector ``G(k)`` (head frame, or posed by a
  timestep's root pose with ``--posed``) in the standard 3DGS layout (``x y z``, ``f_dc_*``,
  ``opacity`` logit, ``scale_*`` log, ``rot_*`` wxyz), which common splat viewers open.
* **sweep** — for each of the first ``--components`` components of every modality, the
  avatar with that coefficient swept from −3σ to +3σ (all others 0, the mean face), rendered
  from the held-out camera (``--camera``): a PNG strip ``<modality>_<i>.png`` and an MP4 ``<modality>_<i>.mp4``.
* **web** — a static folder for the browser viewer (:mod:`gem_jax.viewer.webexport`): the page,
  ``model.json`` and ``model.bin`` (model in ``--dtype``, the subject's cameras, the training
  coefficients); serve it with any static server, or run ``python -m gem_jax.viewer``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

from gem_jax.artefacts import describe_error
from gem_jax.eigen.model import COEFF_LIMIT, GEM, check_coefficients, size_mb
from gem_jax.eigen.pca import MODALITIES
from gem_jax.eigen.render import export_ply, render_exact
from gem_jax.errors import ArtefactError, CoefficientError, SubjectFormatError
from gem_jax.video import VideoWriter, write_png

__all__ = ["component_sweep", "export_ply", "main", "read_coefficients", "sweep_coefficients"]


def read_coefficients(path: str | os.PathLike) -> np.ndarray:
    """A user's coefficient file (``.npy``, σ units); an unreadable one is a :class:`CoefficientError`."""
    try:
        return np.asarray(np.load(path, allow_pickle=False), np.float32)
    except Exception as err:
        raise CoefficientError(f"{path}: not a readable .npy coefficient vector ({describe_error(err)})") from err


def sweep_coefficients(model: GEM, modality: str, index: int, frames: int = 13) -> np.ndarray:
    """``(frames, ΣK)``: component ``index`` of ``modality`` from −3σ to +3σ, every other 0."""
    if modality not in MODALITIES:
        raise ValueError(f"sweep: unknown modality {modality!r}; expected one of {MODALITIES}")
    count = model.num_components[modality]
    if not 0 <= index < count:
        raise ValueError(f"sweep: {modality} has {count} components; index {index} is out of range")
    values = np.linspace(-COEFF_LIMIT, COEFF_LIMIT, frames, dtype=np.float32)
    parts = {m: np.zeros((frames, model.num_components[m]), np.float32) for m in MODALITIES}
    parts[modality][:, index] = values
    return np.concatenate([parts[m] for m in MODALITIES], axis=1)


def component_sweep(model: GEM, out: str | os.PathLike, viewmat: np.ndarray, K: np.ndarray, width: int,
                    height: int, root: np.ndarray, components: int = 3, frames: int = 13,
                    background=(1.0, 1.0, 1.0), strip_frames: int = 7, fps: float = 12.0) -> list[Path]:
    """PNG strips and MP4s of the first ``components`` components of every modality (module docstring)."""
    out = Path(out)
    written = []
    for m in MODALITIES:
        for i in range(min(components, model.num_components[m])):
            k = check_coefficients(model, sweep_coefficients(model, m, i, frames), where="sweep coefficients")
            n = len(k)
            images = render_exact(model, k, np.broadcast_to(root, (n, 4, 4)), np.broadcast_to(viewmat, (n, 4, 4)),
                                  np.broadcast_to(K, (n, 3, 3)), background, width, height)
            pick = np.round(np.linspace(0, n - 1, min(strip_frames, n))).astype(int)
            written.append(write_png(out / f"{m}_{i}.png", np.concatenate(list(images[pick]), axis=1)))
            with VideoWriter(out / f"{m}_{i}.mp4", fps) as video:
                for image in np.concatenate([images, images[::-1]]):  # there and back
                    video.write(image)
            written.append(video.path)
    return written


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m gem_jax.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="work directory of a run (after --stage pca or refine)")
    p.add_argument("--stage", choices=("refine", "pca"), default=None,
                   help="which model (default: refined if present, else PCA-only)")
    p.add_argument("--npz", help="write the compact model file here")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage of --npz and --web")
    p.add_argument("--ply", help="write a 3DGS .ply of one coefficient vector here")
    p.add_argument("--coeffs", help="a .npy (ΣK,) coefficient vector in σ units for --ply (default: zeros)")
    p.add_argument("--timestep", type=int, help="use this training timestep's PCA coefficients for --ply")
    p.add_argument("--posed", action="store_true", help="apply the timestep's root pose (else the head frame)")
    p.add_argument("--sweep", help="write component sweeps (PNG strips + MP4) into this folder")
    p.add_argument("--components", type=int, default=3, help="components per modality in the sweep")
    p.add_argument("--camera", type=int, default=None,
                   help="camera index of the sweep (default: the held-out camera, else the first)")
    p.add_argument("--subject", default=None, help="subject folder for the sweep's camera (default: the run's)")
    p.add_argument("--web", help="write the browser viewer (a static folder) here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    try:
        return _run(args)
    except (CoefficientError, ArtefactError, SubjectFormatError) as err:  # names the file / field
        print(f"[export] error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2


def _run(args) -> int:
    from gem_jax.eigen.workdir import load_model, load_pca_coefficients, load_roots

    workdir = Path(args.workdir)
    model = load_model(workdir, args.stage)
    print(model.summary())
    if args.npz:
        path = model.save(args.npz, dtype=args.dtype)
        print(f"[export] {path}: {size_mb(path):.2f} MB ({args.dtype})")
    coeffs = load_pca_coefficients(workdir)
    roots = load_roots(workdir)
    if args.ply:
        root = None
        if args.coeffs and args.timestep is not None:
            raise SystemExit("--coeffs and --timestep are exclusive")
        if args.coeffs:
            k = check_coefficients(model, read_coefficients(args.coeffs), where=f"--coeffs {args.coeffs}")
        elif args.timestep is not None:
            k = coeffs.of([args.timestep])[0]
        else:
            k = np.zeros(model.total_components, np.float32)
        if args.posed:
            root = roots[args.timestep if args.timestep is not None else int(coeffs.timesteps[0])]
        path = export_ply(model, k, args.ply, root)
        print(f"[export] {path}: {model.num_gaussians} Gaussians")
    if args.sweep:
        from gem_jax.context import StageContext
        from gem_jax.data.subject import load_subject

        subject = load_subject(args.subject) if args.subject else StageContext.from_workdir(workdir).subject
        cameras = {**subject.cameras("train"), **subject.cameras("val")}
        default = next(iter(subject.cameras("val")), next(iter(cameras)))  # the held-out (middle) camera
        index = default if args.camera is None else args.camera
        if index not in cameras:
            raise SystemExit(f"--camera {index}: not a camera of the subject (have {sorted(cameras)})")
        cam = cameras[index]
        files = component_sweep(model, args.sweep, np.asarray(cam.viewmat), np.asarray(cam.K), cam.width, cam.height,
                                roots[int(coeffs.timesteps[0])], components=args.components)
        print(f"[export] {len(files)} sweep files in {args.sweep}")
    if args.web:
        from gem_jax.viewer.webexport import export_workdir

        page = export_workdir(workdir, args.web, args.dtype, args.stage)
        size = sum(f.stat().st_size for f in page.parent.glob("model.*")) / 1e6
        print(f"[export] {page}: the viewer, model {size:.2f} MB ({args.dtype}); serve the folder, e.g. "
              f"python -m http.server -d {page.parent} -b 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
