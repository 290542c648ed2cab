"""Training data of the teacher: images in memory, tracked meshes, mouth masks, batches.

* :func:`tracked_meshes` — per timestep, the root-free tracked mesh and the root transform
  (:func:`gem_jax.teacher.maps.root_free_mesh`), one jitted, batched LBS pass.
* :func:`load_images` (:mod:`gem_jax.data.images`) — a split decoded once into uint8 arrays: the *foreground* ``image·mask``
  (composited on black) and the mask, so any background can be composited in the train step
  (``target = fg + bg·(1 − mask)``; random colours in training, docs/architecture.md §5).
* :func:`mouth_masks` — where each training image sees the mouth interior, for the ×150 L1
  weight. The tracked mesh of the image's timestep is posed (root transform included),
  projected into the image's camera and z-buffered with the NumPy triangle rasterizer
  (:mod:`gem_jax.head.meshraster`); a pixel is "mouth" when its front-most face is one of the
  head model's ``mouth_faces`` (so lips and teeth occlude it as they should). Done once at
  data-loading time (thread pool) and cached in ``<workdir>/teacher/mouth_masks.npz``. A head
  model without ``mouth_faces`` gives no masks (no mouth weighting, with a notice).
* :func:`sample_batch` — the batch of ``step``: image indices drawn from
  ``np.random.default_rng([seed, step])``, so a resumed run sees the same batches.
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gem_jax.batching import padded_chunks, sample_rows
from gem_jax.data.images import ImageSet, load_images  # noqa: F401 (re-exported)
from gem_jax.head.flame import HeadModel
from gem_jax.head.meshraster import project_vertices, rasterize_triangles
from gem_jax.teacher import maps

__all__ = ["ImageSet", "Meshes", "load_images", "mouth_masks", "sample_batch", "tracked_meshes"]


@dataclasses.dataclass(frozen=True)
class Meshes:
    """Root-free vertices ``(T, V, 3)`` and root transforms ``(T, 4, 4)``, row = timestep index."""

    vertices: np.ndarray
    roots: np.ndarray

    def world(self, timestep: int) -> np.ndarray:
        root = self.roots[timestep]
        return self.vertices[timestep] @ root[:3, :3].T + root[:3, 3]


def tracked_meshes(subject, model: HeadModel, timesteps, chunk: int = 64) -> Meshes:
    """Root-free meshes of ``timesteps`` (rows of other timesteps are zeros)."""
    timesteps = sorted({int(t) for t in timesteps})
    if not timesteps:
        raise ValueError("tracked_meshes: no timesteps")
    fn = jax.jit(jax.vmap(lambda p: maps.root_free_mesh(model, p)))
    verts = np.zeros((timesteps[-1] + 1, model.num_vertices, 3), np.float32)
    roots = np.tile(np.eye(4, dtype=np.float32), (timesteps[-1] + 1, 1, 1))
    for rows, padded in padded_chunks(len(timesteps), chunk):
        ts = [timesteps[i] for i in rows]
        params = [subject.flame_params(timesteps[i]) for i in padded]
        if any(p.static_offset is None for p in params) and any(p.static_offset is not None for p in params):
            raise ValueError("tracked_meshes: some flame_param files have static_offset and some do not")
        batched = jax.tree.map(lambda *xs: jnp.stack([jnp.asarray(x) for x in xs]), *params)
        v, r = fn(batched)
        verts[ts] = np.asarray(v)[: len(ts)]
        roots[ts] = np.asarray(r)[: len(ts)]
    return Meshes(verts, roots)


def _mouth_mask(verts_world, faces, mouth_faces, viewmat, K, height, width) -> np.ndarray:
    pix = project_vertices(verts_world, viewmat, K)
    raster = rasterize_triangles(pix, faces, height, width, near=0.01)
    fi = raster.face_index
    return ((fi >= 0) & mouth_faces[np.maximum(fi, 0)]).astype(np.uint8) * 255


def mouth_masks(images: ImageSet, meshes: Meshes, model: HeadModel, cache: Path | None = None,
                workers: int | None = None) -> np.ndarray | None:
    """Mouth-interior masks (F,H,W) uint8 of every image (module docstring), or None."""
    if model.mouth_faces is None or not np.any(model.mouth_faces):
        print("[teacher] the head model has no 'mouth_faces': no mouth weighting in the L1 loss")
        return None
    key = np.concatenate([images.timesteps.astype(np.float64), images.camera_indices,
                          images.viewmats.reshape(-1), images.Ks.reshape(-1),
                          [images.height, images.width, int(model.mouth_faces.sum())]])
    if cache is not None and cache.is_file():
        try:
            with np.load(cache, allow_pickle=False) as data:
                if data["key"].shape == key.shape and np.allclose(data["key"], key):
                    return data["masks"]
        except Exception as err:  # a damaged cache is rebuilt, not trusted
            print(f"[teacher] {cache}: unreadable mask cache ({type(err).__name__}), rebuilding it")
    faces, mouth = np.asarray(model.faces), np.asarray(model.mouth_faces, bool)
    out = np.zeros((images.num, images.height, images.width), np.uint8)

    def one(i):
        verts = meshes.world(int(images.timesteps[i]))
        out[i] = _mouth_mask(verts, faces, mouth, images.viewmats[i], images.Ks[i], images.height, images.width)

    with ThreadPoolExecutor(max(1, min(4, workers or os.cpu_count() or 1))) as pool:
        list(pool.map(one, range(images.num)))
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npz")
        np.savez_compressed(tmp, key=key, masks=out)
        os.replace(tmp, cache)
    return out


def sample_batch(images: ImageSet, meshes: Meshes, step: int, batch_size: int, seed: int) -> dict:
    """The global batch of ``step`` as NumPy arrays (module docstring).

    Keys: ``fg`` (B,H,W,3) uint8, ``mask`` and ``mouth`` (B,H,W) uint8, ``vertices`` (B,V,3),
    ``root`` (B,4,4), ``viewmat`` (B,4,4), ``K`` (B,3,3), ``index`` (B,) int32 (the position in
    the global batch: per-example randomness is ``fold_in(step_key, index)``).
    """
    pick = sample_rows(images.num, batch_size, (seed, step))
    t = images.timesteps[pick]
    mouth = images.mouth[pick] if images.mouth is not None else np.zeros_like(images.masks[pick])
    return {
        "fg": images.fg[pick], "mask": images.masks[pick], "mouth": mouth,
        "vertices": meshes.vertices[t], "root": meshes.roots[t],
        "viewmat": images.viewmats[pick], "K": images.Ks[pick],
        "index": np.arange(batch_size, dtype=np.int32),
    }
