"""The embedded synthetic subject: identities, expression sequences, multi-view renders.

Writes exactly the VHAP / GaussianAvatars export (``docs/data_format.md``) so that every
stage after the writer runs the real code path. The head is the procedural FLAME-format
model of :mod:`gem_jax.data.procedural_head`; appearance is a per-identity albedo texture in
its UV layout plus **expression-dependent detail** evaluated per frame (forehead wrinkles
with brow raise, nasolabial folds and crow's feet with smile, a darker mouth interior as the
jaw opens, eyelid colour when blinking, frown lines, flushed cheeks when puffing, darker lips
when puckering). The activations are rectified powers of the coefficients, so appearance is
not a linear function of the expression. Shading is Lambertian under a fixed light rig plus
ambient, so it changes with head pose. Images are rendered at ``supersample``× and area
downsampled; masks likewise.

Stored images hold the *unpremultiplied* colour on the head's anti-aliased edge pixels and a
mid-grey background, so the reader's ``image·mask + bg·(1 − mask)`` is exact for any ``bg``.

Everything is a pure function of ``(config, seed)``: two runs write byte-identical files.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from gem_jax.data import procedural_head as ph
from gem_jax.data.appearance import (  # noqa: F401 (re-exported: the generator's public names)
    DETAIL_NAMES, HAIR, IRIS, SKIN, Identity, frame_texture, make_identity, make_textures)
from gem_jax.head import flame
from gem_jax.head.meshraster import interpolate, project_vertices, rasterize_triangles

BACKGROUND = 0.5  # grey behind the head in the stored images (the reader composites with the mask)
LIGHTS = ((np.array([0.45, 0.55, 0.85]), 0.65), (np.array([-0.7, 0.1, 0.55]), 0.3), (np.array([0.0, 0.8, -0.6]), 0.2))
AMBIENT = 0.3
SEQUENCES = (  # (name, emphasised expressions, jaw amplitude); the last entry is the held-out one
    ("EXP-1-talk-smile", ("smile", "lips_part", "mouth_stretch"), 0.26),
    ("EXP-2-brows-blink", ("brow_raise", "frown", "blink_left", "blink_right"), 0.08),
    ("EXP-3-pucker-puff", ("pucker", "cheek_puff", "sneer"), 0.2),
    ("EXP-4-eyes-smile", ("smile", "blink_left", "blink_right", "brow_raise"), 0.15),
)
HELD_OUT_SEQUENCE = ("FREE-mixed", ph.EXPR_NAMES, 0.3)


# ----------------------------------------------------------------------------- sequences and cameras


@dataclass(frozen=True)
class Sequence:
    name: str
    params: dict  # FLAME parameters per frame, batch first: expr (F, E), jaw_pose (F, 3), ...


def _wave(rng, t, lo=1.0, hi=2.0):
    """A smooth bump train in [0, 1] with a random frequency and phase."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * rng.uniform(lo, hi) * t + rng.uniform(0, 2 * np.pi))


def _sine(rng, t, amplitude, lo=0.4, hi=1.0):
    return amplitude * np.sin(2 * np.pi * rng.uniform(lo, hi) * t + rng.uniform(0, 2 * np.pi))


def make_sequences(seed: int, num_sequences: int, frames: int) -> list[Sequence]:
    """``num_sequences`` smooth expression sequences; the last is the held-out mixed one."""
    out = []
    for k in range(num_sequences):
        held_out = k == num_sequences - 1
        rng = np.random.default_rng([seed, 2000 + k])
        if held_out:
            name, emphasis, jaw_amp = HELD_OUT_SEQUENCE
        elif k < len(SEQUENCES):
            name, emphasis, jaw_amp = SEQUENCES[k]
        else:  # beyond the named ones: a random mix of 3–5 expressions each, for more expression variety
            picks = np.random.default_rng([seed, 3000 + k]).choice(len(ph.EXPR_NAMES), 3 + k % 3, replace=False)
            emphasis = tuple(ph.EXPR_NAMES[i] for i in sorted(picks))
            name, jaw_amp = f"MIX-{k + 1}", 0.1 + 0.04 * (k % 4)
        t = np.linspace(0.0, 1.0, frames)
        expr = np.zeros((frames, len(ph.EXPR_NAMES)))
        for e, ename in enumerate(ph.EXPR_NAMES):
            if ename in emphasis:
                amp = rng.uniform(0.75, 1.0) if held_out else rng.uniform(0.9, 1.25)
                bump = _wave(rng, t, 0.7, 1.6)
                if ename.startswith("blink"):
                    bump = bump**3
                elif ename in ("brow_raise", "smile"):
                    bump = 1.3 * bump - 0.3  # dips below neutral: no wrinkles / folds there
                expr[:, e] = amp * bump
            else:
                expr[:, e] = _sine(rng, t, 0.08, 0.5, 1.5)
        sin = lambda amplitude: _sine(rng, t, amplitude)  # noqa: E731
        gaze = np.stack([sin(0.1), sin(0.15), np.zeros(frames)], -1)
        params = dict(
            expr=expr,
            jaw_pose=np.stack([jaw_amp * _wave(rng, t, 1.0, 2.2) + 0.01, sin(0.02), np.zeros(frames)], -1),
            rotation=np.stack([sin(0.06), sin(0.15), sin(0.04)], -1),
            neck_pose=np.stack([sin(0.06), sin(0.08), sin(0.03)], -1),
            eyes_pose=np.concatenate([gaze, gaze], -1),
            translation=np.stack([sin(0.005), sin(0.004), sin(0.005)], -1),
        )
        out.append(Sequence(name, {k2: v.astype(np.float32) for k2, v in params.items()}))
    return out


def canonical_params(n_expr: int) -> dict:
    """Canonical pose: neutral expression, jaw slightly open (as VHAP's canonical_flame_param)."""
    return dict(expr=np.zeros((1, n_expr), np.float32), jaw_pose=np.array([[0.06, 0, 0]], np.float32),
                rotation=np.zeros((1, 3), np.float32), neck_pose=np.zeros((1, 3), np.float32),
                eyes_pose=np.zeros((1, 6), np.float32), translation=np.zeros((1, 3), np.float32))


@dataclass(frozen=True)
class Rig:
    """Cameras on a frontal arc: OpenCV world→camera ``viewmats`` (C, 4, 4) and ``Ks`` (C, 3, 3)."""

    viewmats: np.ndarray
    Ks: np.ndarray
    height: int
    width: int


def make_cameras(seed: int, num: int, height: int, width: int) -> Rig:
    """``num`` cameras from -60° to +60° azimuth in two rows of elevation, about 1 m away."""
    rng = np.random.default_rng([seed, 3000])
    az = np.deg2rad(np.linspace(-60, 60, num) + rng.uniform(-1.5, 1.5, num))
    el = np.deg2rad(np.where(np.arange(num) % 2 == 0, 11.0, -3.0) + rng.uniform(-1.5, 1.5, num))
    dist = 1.0 + rng.uniform(-0.03, 0.03, num)
    target = np.array([0.0, -0.028, 0.0])
    views, ks = [], []
    for a, e, d in zip(az, el, dist):
        centre = target + d * np.array([np.cos(e) * np.sin(a), np.sin(e), np.cos(e) * np.cos(a)])
        fwd = (target - centre) / np.linalg.norm(target - centre)
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right)
        rot = np.stack([right, np.cross(fwd, right), fwd])
        view = np.eye(4)
        view[:3, :3], view[:3, 3] = rot, -rot @ centre
        views.append(view)
        focal = 2.7 * height * d
        # Off-centre principal points (as real calibrations), so a flipped cy shows in the tests.
        cy = height * (0.5 + rng.choice([-1, 1]) * rng.uniform(0.015, 0.03))
        ks.append(np.array([[focal, 0, width * (0.5 + rng.uniform(-0.03, 0.03))], [0, focal, cy], [0, 0, 1]]))
    return Rig(np.stack(views), np.stack(ks), int(height), int(width))


# ----------------------------------------------------------------------------- rendering


class Renderer:
    """Posing (FLAME LBS of :mod:`gem_jax.head.flame`) and shaded, anti-aliased mesh rendering."""

    def __init__(self, arrays: dict):
        import jax
        import scipy.sparse

        self.model = flame.head_model_from_arrays(arrays)
        self.faces = np.asarray(arrays["f"], np.int32)
        self.uv_corners = np.asarray(arrays["vt"], np.float32)[np.asarray(arrays["ft"])]
        num_v, num_f = len(arrays["v_template"]), len(self.faces)
        self._incidence = scipy.sparse.csr_matrix(
            (np.ones(3 * num_f), (self.faces.ravel(), np.repeat(np.arange(num_f), 3))), shape=(num_v, num_f))
        model = self.model
        self._lbs = jax.jit(jax.vmap(lambda p: flame.lbs(model, p)[0]))

    def vertices(self, shape: np.ndarray, params: dict) -> np.ndarray:
        """Posed vertices ``(T, V, 3)`` for batched parameters (``params[k]`` with a leading T)."""
        import jax.numpy as jnp

        num = len(params["expr"])
        batch = flame.FlameParams(shape=jnp.broadcast_to(jnp.asarray(shape, jnp.float32), (num, len(shape))),
                                  **{k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
        return np.asarray(self._lbs(batch))

    def normals(self, verts: np.ndarray) -> np.ndarray:
        tri = verts[self.faces]
        n = self._incidence @ np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        return (n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-20)).astype(np.float32)

    def render(self, verts, normals, texture, viewmat, K, height, width, supersample=1):
        """RGB ``(H, W, 3)`` (unpremultiplied, grey background) and coverage ``(H, W)``, both in [0, 1]."""
        ss = int(supersample)
        k_hi = np.asarray(K, np.float64).copy()
        k_hi[:2] *= ss
        raster = rasterize_triangles(project_vertices(verts, viewmat, k_hi), self.faces, height * ss, width * ss,
                                     near=0.05, cull_backfaces=True)
        mask = raster.face_index >= 0
        uv = interpolate(self.uv_corners, raster)
        size = texture.shape[0]
        colour = cv2.remap(texture, uv[..., 0] * size - 0.5, uv[..., 1] * size - 0.5, cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_REPLICATE)
        n = interpolate(normals, raster)
        n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
        shade = np.full(mask.shape, AMBIENT, np.float32)
        for direction, power in LIGHTS:
            shade += power * np.clip(n @ (direction / np.linalg.norm(direction)).astype(np.float32), 0, None)
        rgb = colour * (shade * mask)[..., None]
        alpha = mask.astype(np.float32)
        if ss > 1:
            rgb = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
            alpha = cv2.resize(alpha, (width, height), interpolation=cv2.INTER_AREA)
        rgb = np.where(alpha[..., None] > 1e-6, rgb / np.maximum(alpha, 1e-6)[..., None], BACKGROUND)
        return np.clip(rgb, 0, 1), alpha


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- writing


def save_npz(path: str | os.PathLike, **arrays) -> None:
    """``np.savez`` with fixed zip timestamps, so equal arrays give byte-identical files."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())


def _get(cfg, key, default=None):
    return cfg[key] if key in cfg else default


@dataclass
class Scene:
    """Everything needed to render a subject: head model, identity, textures, sequences, cameras."""

    arrays: dict
    renderer: Renderer
    identity: Identity
    albedo: np.ndarray
    details: np.ndarray
    sequences: list
    rig: Rig
    supersample: int


def make_scene(synthetic, seed: int, identity: int | None = None, arrays: dict | None = None) -> Scene:
    """The scene of config section ``synthetic`` (``identity`` defaults to ``synthetic.identity``)."""
    res = int(synthetic["mesh_resolution"])
    arrays = ph.build_head_model(res) if arrays is None else arrays
    ident = make_identity(seed, int(synthetic["identity"] if identity is None else identity))
    albedo, details = make_textures(ident, res, int(synthetic["texture_size"]))
    seqs = make_sequences(seed, int(synthetic["num_sequences"]), int(synthetic["frames_per_sequence"]))
    rig = make_cameras(seed, int(synthetic["num_cameras"]), int(synthetic["image_height"]),
                       int(synthetic["image_width"]))
    return Scene(arrays, Renderer(arrays), ident, albedo, details, seqs, rig, int(_get(synthetic, "supersample", 1)))


def frame_table(scene: Scene, sequences=None) -> list[tuple[int, int, int]]:
    """(global timestep, sequence index, frame in sequence) for the chosen sequences."""
    out, t = [], 0
    for k, seq in enumerate(scene.sequences):
        for i in range(len(seq.params["expr"])):
            if sequences is None or k in sequences:
                out.append((t, k, i))
            t += 1
    return out


def render_frames(scene: Scene, frames, cameras, shape=None, workers: int | None = None, callback=None):
    """Render ``frames`` (from :func:`frame_table`) × ``cameras``; ``callback(t, c, rgb, alpha)`` per view.

    Returns nothing if a callback is given, else a dict ``{(t, c): (rgb uint8, alpha uint8)}``.
    """
    shape = scene.identity.shape if shape is None else shape
    params = {k: np.stack([scene.sequences[s].params[k][i] for _, s, i in frames]) for k in scene.sequences[0].params}
    verts = scene.renderer.vertices(shape, params)
    rig, results = scene.rig, {}

    def one(j):
        t, s, i = frames[j]
        tex = frame_texture(scene.albedo, scene.details, params["expr"][j], float(params["jaw_pose"][j, 0]))
        normals = scene.renderer.normals(verts[j])
        for c in cameras:
            rgb, alpha = scene.renderer.render(verts[j], normals, tex, rig.viewmats[c], rig.Ks[c], rig.height,
                                               rig.width, scene.supersample)
            rgb8, a8 = to_uint8(rgb), to_uint8(alpha)
            if callback is None:
                results[(t, c)] = (rgb8, a8)
            else:
                callback(t, c, rgb8, a8)

    workers = workers or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(len(frames))))
    return None if callback is not None else results


def _flame_npz(shape, params: dict, index=None) -> dict:
    pick = (lambda v: v[index:index + 1]) if index is not None else (lambda v: v)  # noqa: E731
    out = {k: np.asarray(pick(params[k]), np.float32) for k in
           ("translation", "rotation", "neck_pose", "jaw_pose", "eyes_pose", "expr")}
    out["shape"] = np.asarray(shape, np.float32)
    return out


def _camera_fields(rig: Rig, c: int) -> dict:
    """VHAP per-frame camera fields: OpenGL camera-to-world and a bottom-left ``cy``."""
    c2w = np.linalg.inv(rig.viewmats[c]) @ np.diag([1.0, -1.0, -1.0, 1.0])
    k = rig.Ks[c]
    return {"cx": float(k[0, 2]), "cy": float(rig.height - k[1, 2]), "fl_x": float(k[0, 0]), "fl_y": float(k[1, 1]),
            "h": rig.height, "w": rig.width, "transform_matrix": c2w.tolist()}


def write_subject(root: str | os.PathLike, scene: Scene, held_out_camera: int, sequences=None,
                  workers: int | None = None) -> dict:
    """Write ``scene`` in the VHAP export layout into ``root`` (which must not exist yet).

    ``sequences`` restricts which sequences are rendered (global timestep indices are kept);
    the splits follow NeRSemble: train = training sequences × training cameras, val = the
    held-out camera, test = the last sequence × all cameras. Returns a summary dict.
    """
    root = Path(root)
    for sub in ("images", "fg_masks", "flame_param"):
        (root / sub).mkdir(parents=True, exist_ok=False)
    arrays = scene.arrays
    flame.head_model_from_arrays(arrays, where=str(root / "head_model.npz"))
    save_npz(root / "head_model.npz", **arrays)
    n_expr = arrays["shapedirs"].shape[-1] - int(arrays["n_shape"])
    save_npz(root / "canonical_flame_param.npz", **_flame_npz(scene.identity.shape, canonical_params(n_expr)))
    frames = frame_table(scene, sequences)
    held_out_seq = len(scene.sequences) - 1
    num_cams = len(scene.rig.viewmats)
    if not 0 <= held_out_camera < num_cams:
        raise ValueError(f"synthetic.held_out_camera: {held_out_camera} is not a camera index in [0, {num_cams})")
    for t, s, i in frames:
        params = _flame_npz(scene.identity.shape, scene.sequences[s].params, i)
        save_npz(root / "flame_param" / f"{t:05d}.npz", **params)
    splits = {"train": [], "val": [], "test": []}
    for t, s, i in frames:
        for c in range(num_cams):
            split = "test" if s == held_out_seq else ("val" if c == held_out_camera else "train")
            name = f"{t:05d}_{c:02d}.png"
            splits[split].append({
                "file_path": f"images/{name}", "fg_mask_path": f"fg_masks/{name}",
                "flame_param_path": f"flame_param/{t:05d}.npz", "timestep_index": t, "camera_index": c,
                **_camera_fields(scene.rig, c), "sequence": scene.sequences[s].name,
                "timestep_index_original": i, "camera_id": f"cam_{c:02d}",
            })
    for split, items in splits.items():
        (root / f"transforms_{split}.json").write_text(json.dumps({"frames": items}, indent=1))

    def save(t, c, rgb, alpha):
        name = f"{t:05d}_{c:02d}.png"
        if not cv2.imwrite(str(root / "images" / name), rgb[..., ::-1]):
            raise OSError(f"could not write {root / 'images' / name}")
        if not cv2.imwrite(str(root / "fg_masks" / name), alpha):
            raise OSError(f"could not write {root / 'fg_masks' / name}")

    render_frames(scene, frames, range(num_cams), workers=workers, callback=save)
    return {"frames": {k: len(v) for k, v in splits.items()}, "timesteps": len(frames),
            "image_size": (scene.rig.height, scene.rig.width), "vertices": len(arrays["v_template"]),
            "faces": len(arrays["f"]), "identity": scene.identity.index,
            "sequences": [scene.sequences[k].name for k in sorted({s for _, s, _ in frames})]}


def write_cross_identity(root, synthetic, seed: int, identity: int, workers: int | None = None) -> dict:
    """Cross-identity ground truth: ``identity`` performing the held-out sequence of the subject.

    Same head model, expression/pose parameters, cameras and timestep indices as the main
    subject (``synthetic.identity``); the shape coefficients and texture are ``identity``'s.
    Only ``transforms_test.json`` has frames (train/val are empty).
    """
    scene = make_scene(synthetic, seed, identity=identity)
    held_out = len(scene.sequences) - 1
    return write_subject(root, scene, int(synthetic["held_out_camera"]), sequences={held_out}, workers=workers)


def write_driver_video(path, synthetic, seed: int, identity: int, camera: int, sequences=None, fps: int = 25,
                       background=(1.0, 1.0, 1.0)) -> Path:
    """An MP4 (``mp4v``) of ``identity`` performing ``sequences`` (default all) seen from ``camera``."""
    scene = make_scene(synthetic, seed, identity=identity)
    frames = frame_table(scene, None if sequences is None else set(sequences))
    views = render_frames(scene, frames, [camera])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (scene.rig.width, scene.rig.height))
    if not writer.isOpened():
        raise OSError(f"cv2.VideoWriter could not open {path} (mp4v)")
    bg = np.asarray(background, np.float32)
    try:
        for t, _, _ in frames:
            rgb, alpha = views[(t, camera)]
            a = alpha[..., None].astype(np.float32) / 255.0
            writer.write(to_uint8((rgb / 255.0) * a + bg * (1 - a))[..., ::-1])
    finally:
        writer.release()
    return path
