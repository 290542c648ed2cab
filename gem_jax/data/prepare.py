"""The ``data`` stage: validate a real export, or write the embedded synthetic subject.

    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage data

* ``config.data.subject_dir`` set: read *every* file of it and of the head model
  (:func:`gem_jax.data.validate.validate_subject`: images decode at their declared size, masks
  all there or all absent, tracking npz keys and shapes, the head model agrees with the
  tracking) and print what was checked; nothing is written. Any problem is a
  ``SubjectFormatError`` naming the file and the field, raised before ``data/DONE`` exists.
* otherwise: generate the synthetic subject (``config.synthetic``, ``config.seed``) into
  ``<workdir>/data`` and the cross-identity ground truth (identity ``synthetic.cross_identity``
  performing the held-out sequence, same cameras) into ``<workdir>/data_cross``, and validate
  both the same way.

Each folder is written into a temporary sibling and renamed into place, so a folder that
exists is complete. It carries ``synthetic_manifest.json`` (the generator settings); a folder
whose manifest matches the config is kept (``--force data`` removes it first), one whose settings differ
is regenerated, and a folder without a manifest (not ours) is an error rather than overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

MANIFEST = "synthetic_manifest.json"
GENERATOR_VERSION = 1


def _manifest(syn, seed: int, identity: int, sequences: str) -> dict:
    manifest = {"generator": "gem_jax.data.synthetic", "version": GENERATOR_VERSION, "seed": int(seed),
                "identity": int(identity), "sequences": sequences, "synthetic": syn.to_dict()}
    return json.loads(json.dumps(manifest))  # as it reads back (tuples → lists)


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _generate(folder: Path, manifest: dict, write) -> tuple[bool, dict | None]:
    """Write ``folder`` atomically with ``write(tmp_folder) -> summary`` unless it is up to date."""
    # Temporaries of a run that was killed: no other process writes them (the stage is locked).
    for stale in [*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f".{folder.name}.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    if folder.exists():
        current = _read_manifest(folder)
        if current is None:
            raise FileExistsError(f"{folder} exists but has no {MANIFEST}: not written by the synthetic generator; "
                                  f"move it away or set --config.data.subject_dir={folder}")
        if {k: v for k, v in current.items() if k != "summary"} == manifest:
            return False, current.get("summary")
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        summary = write(tmp)
        (tmp / MANIFEST).write_text(json.dumps({**manifest, "summary": summary}, indent=1))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return True, summary


def _describe(name: str, folder: Path, summary: dict | None, seconds: float | None) -> str:
    if not summary:
        return f"[data] {name}: {folder}"
    frames = ", ".join(f"{k} {v}" for k, v in summary["frames"].items())
    h, w = summary["image_size"]
    took = f" in {seconds:.1f}s" if seconds is not None else " (up to date, kept)"
    return (f"[data] {name}: {folder}{took}: identity {summary['identity']}, {summary['timesteps']} timesteps, "
            f"images {frames} ({w}x{h}), head model {summary['vertices']} vertices / {summary['faces']} faces")


def check_subject(folder: str | os.PathLike, head_model: str | None = None, n_shape: int = 0, n_expr: int = 0,
                  need_train: bool = True) -> None:
    """Read every file of a subject folder and its head model, print what was checked
    (:func:`gem_jax.data.validate.validate_subject`); raise ``SubjectFormatError`` on any problem."""
    from gem_jax.data.subject import load_subject
    from gem_jax.data.validate import validate_subject

    start = time.time()
    subject = load_subject(folder)
    checked = validate_subject(subject, head_model, int(n_shape), int(n_expr), need_train)
    print(f"[data] checked in {time.time() - start:.1f}s: {checked}")
    print(f"[data] {subject.summary()}")


def run(ctx, synthetic_config) -> None:
    """The data stage (see module docstring); ``synthetic_config`` is ``config.synthetic``."""
    sizes = dict(head_model=ctx.head_model_path or None, n_shape=ctx.n_shape, n_expr=ctx.n_expr)
    if not ctx.synthetic:
        check_subject(ctx.subject_dir, **sizes)
        return
    from gem_jax.data import synthetic

    workdir = ctx.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    syn, seed = synthetic_config, int(ctx.seed)

    def main_subject(tmp):
        return synthetic.write_subject(tmp, synthetic.make_scene(syn, seed), int(syn.held_out_camera))

    start = time.time()
    wrote, summary = _generate(workdir / "data", _manifest(syn, seed, syn.identity, "all"), main_subject)
    print(_describe("synthetic subject", workdir / "data", summary, time.time() - start if wrote else None))
    check_subject(workdir / "data", **sizes)
    cross = int(syn.cross_identity)
    if cross >= 0 and cross != int(syn.identity):
        start = time.time()
        wrote, summary = _generate(
            workdir / "data_cross", _manifest(syn, seed, cross, "held_out"),
            lambda tmp: synthetic.write_cross_identity(tmp, syn, seed, cross))
        print(_describe("cross-identity ground truth", workdir / "data_cross", summary,
                        time.time() - start if wrote else None))
        check_subject(workdir / "data_cross", **sizes, need_train=False)
