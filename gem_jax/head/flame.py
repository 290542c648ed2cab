"""FLAME-format head model: linear blend skinning with shape/expression blendshapes.

The model follows FLAME (Li et al. 2017, "Learning a model of facial shape and expression
from 4D scans"), eqs. (1)–(4):

    T_P(β, ψ, θ) = T̄ + B_S(β) + B_E(ψ) + B_P(θ)          (blendshapes + pose correctives)
    M(β, ψ, θ)   = W(T_P, J(β, ψ), θ, 𝒲)                 (standard LBS)

with the joints root/neck/jaw/left eye/right eye regressed from the shaped template. Any
numbers of vertices, joints, shape and expression components are supported, so the same code
runs FLAME 2020 (5023 vertices, 300 + 100 components) and the procedural synthetic head.

Files: ``.npz`` with the keys of :data:`REQUIRED_KEYS` (and optional ``vt``, ``ft``,
``n_shape``, ``mouth_faces``), or FLAME's ``.pkl`` read through
:mod:`gem_jax.head.safe_pickle`, which admits only numpy / scipy.sparse / chumpy array state.
"""

from __future__ import annotations

from pathlib import Path

import flax.struct
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from gem_jax.errors import SubjectFormatError

REQUIRED_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")
#: FLAME's pose vector layout: axis-angle per joint, joints in this order.
JOINT_NAMES = ("root", "neck", "jaw", "eye_left", "eye_right")


@flax.struct.dataclass
class FlameParams:
    """Per-frame tracking parameters (the VHAP ``flame_param/*.npz`` fields, batch dim dropped)."""

    shape: Float[Array, "S"]
    expr: Float[Array, "E"]
    rotation: Float[Array, "3"]  # root (global) axis-angle
    neck_pose: Float[Array, "3"]
    jaw_pose: Float[Array, "3"]
    eyes_pose: Float[Array, "6"]  # left eye then right eye, axis-angle
    translation: Float[Array, "3"]
    static_offset: Float[Array, "V 3"] | None = None

    def full_pose(self) -> Float[Array, "5 3"]:
        """Axis-angle per joint in :data:`JOINT_NAMES` order."""
        eyes = jnp.reshape(self.eyes_pose, (2, 3))
        return jnp.concatenate([self.rotation[None], self.neck_pose[None], self.jaw_pose[None], eyes], axis=0)


@flax.struct.dataclass
class HeadModel:
    """A FLAME-format head model (arrays only; see module docstring)."""

    v_template: Float[Array, "V 3"]
    shapedirs: Float[Array, "V 3 S"]
    exprdirs: Float[Array, "V 3 E"]
    posedirs: Float[Array, "V 3 P"]
    J_regressor: Float[Array, "J V"]
    weights: Float[Array, "V J"]
    faces: np.ndarray = flax.struct.field(pytree_node=False)  # (F, 3) int32
    parents: tuple[int, ...] = flax.struct.field(pytree_node=False)  # parent per joint, -1 = root
    vt: np.ndarray | None = flax.struct.field(pytree_node=False, default=None)  # (Vt, 2) UV coords
    ft: np.ndarray | None = flax.struct.field(pytree_node=False, default=None)  # (F, 3) UV faces
    mouth_faces: np.ndarray | None = flax.struct.field(pytree_node=False, default=None)  # (F,) bool

    @property
    def num_vertices(self) -> int:
        return self.v_template.shape[0]

    @property
    def num_joints(self) -> int:
        return len(self.parents)

    @property
    def n_shape(self) -> int:
        return self.shapedirs.shape[-1]

    @property
    def n_expr(self) -> int:
        return self.exprdirs.shape[-1]

    def zero_params(self) -> FlameParams:
        """Neutral parameters (mean shape, no expression, rest pose)."""
        return FlameParams(
            shape=jnp.zeros(self.n_shape), expr=jnp.zeros(self.n_expr), rotation=jnp.zeros(3),
            neck_pose=jnp.zeros(3), jaw_pose=jnp.zeros(3), eyes_pose=jnp.zeros(6), translation=jnp.zeros(3),
        )


def rodrigues(axis_angle: Float[Array, "*b 3"]) -> Float[Array, "*b 3 3"]:
    """Rotation matrices from axis-angle vectors; smooth (and exact) at zero angle."""
    sq = jnp.sum(axis_angle**2, axis=-1, keepdims=True)
    safe_sq = jnp.where(sq > 1e-12, sq, 1.0)
    angle = jnp.sqrt(safe_sq)
    small = sq <= 1e-12
    # sin(θ)/θ and (1 − cos θ)/θ² with Taylor expansions near zero.
    a = jnp.where(small, 1.0 - sq / 6.0, jnp.sin(angle) / angle)
    b = jnp.where(small, 0.5 - sq / 24.0, (1.0 - jnp.cos(angle)) / safe_sq)
    x, y, z = axis_angle[..., 0], axis_angle[..., 1], axis_angle[..., 2]
    zero = jnp.zeros_like(x)
    k = jnp.stack([zero, -z, y, z, zero, -x, -y, x, zero], axis=-1).reshape(axis_angle.shape[:-1] + (3, 3))
    eye = jnp.eye(3, dtype=axis_angle.dtype)
    return eye + a[..., None] * k + b[..., None] * (k @ k)


def shaped_template(model: HeadModel, params: FlameParams) -> tuple[Float[Array, "V 3"], Float[Array, "J 3"]]:
    """Rest-pose vertices T̄ + B_S(β) + B_E(ψ) (+ static offset) and the regressed joints J."""
    shape = params.shape[: model.n_shape]
    expr = params.expr[: model.n_expr]
    v_shaped = (
        model.v_template
        + jnp.einsum("vcs,s->vc", model.shapedirs[..., : shape.shape[0]], shape)
        + jnp.einsum("vce,e->vc", model.exprdirs[..., : expr.shape[0]], expr)
    )
    if params.static_offset is not None:
        v_shaped = v_shaped + params.static_offset
    return v_shaped, model.J_regressor @ v_shaped


def lbs(model: HeadModel, params: FlameParams) -> tuple[Float[Array, "V 3"], Float[Array, "J 3"]]:
    """Posed vertices and joints of one frame (FLAME eqs. 1–4), translation applied.

    Returns ``(vertices (V,3), joints (J,3))`` in world coordinates. Differentiable in every
    parameter; ``jax.vmap`` over a batch of :class:`FlameParams` for sequences.
    """
    v_shaped, joints = shaped_template(model, params)

    pose = params.full_pose()[: model.num_joints]
    rots = rodrigues(pose)  # (J, 3, 3)
    pose_feature = (rots[1:] - jnp.eye(3, dtype=rots.dtype)).reshape(-1)  # (9 (J-1),)
    v_posed = v_shaped + jnp.einsum("vcp,p->vc", model.posedirs, pose_feature)

    transforms = _kinematic_chain(rots, joints, model.parents)  # (J, 4, 4) world-from-rest
    blended = jnp.einsum("vj,jab->vab", model.weights, transforms)  # (V, 4, 4)
    verts = jnp.einsum("vab,vb->va", blended[:, :3, :3], v_posed) + blended[:, :3, 3]
    posed_joints = jnp.einsum("jab,jb->ja", transforms[:, :3, :3], joints) + transforms[:, :3, 3]
    return verts + params.translation, posed_joints + params.translation


def joint_transforms(model: HeadModel, params: FlameParams) -> Float[Array, "J 4 4"]:
    """Per-joint rigid transforms (rest → posed, translation included); ``[0]`` is the root."""
    _, joints = shaped_template(model, params)
    transforms = _kinematic_chain(rodrigues(params.full_pose()[: model.num_joints]), joints, model.parents)
    return transforms.at[:, :3, 3].add(params.translation)


def _kinematic_chain(rots, joints, parents):
    """World transforms G_j = G_parent(j) · [R_j | J_j − J_parent], then remove the rest pose."""
    num = len(parents)
    rel = jnp.concatenate([joints[:1], joints[1:] - joints[jnp.asarray(parents[1:])]], axis=0)
    local = jnp.zeros((num, 4, 4), rots.dtype).at[:, :3, :3].set(rots).at[:, :3, 3].set(rel).at[:, 3, 3].set(1.0)
    world = [local[0]]
    for j in range(1, num):
        world.append(world[parents[j]] @ local[j])
    world = jnp.stack(world)
    # Remove the rest-pose joint location so that the transform maps rest vertices.
    offset = jnp.einsum("jab,jb->ja", world[:, :3, :3], joints)
    return world.at[:, :3, 3].add(-offset)


# ----------------------------------------------------------------------------- loading


def _parents_from_kintree(kintree: np.ndarray, where: str) -> tuple[int, ...]:
    if kintree.ndim != 2 or kintree.shape[0] != 2:
        raise SubjectFormatError(f"{where}: field 'kintree_table' expected shape (2, J), got {kintree.shape}")
    ids = kintree[1].astype(np.int64)
    order = {int(j): i for i, j in enumerate(ids)}
    parents = []
    for i in range(kintree.shape[1]):
        p = int(kintree[0, i])
        if i == 0:
            parents.append(-1)
        elif p not in order or order[p] >= i:
            raise SubjectFormatError(f"{where}: field 'kintree_table' joint {i} has invalid parent {p}")
        else:
            parents.append(order[p])
    return tuple(parents)


def head_model_from_arrays(arrays: dict, n_shape: int | None = None, n_expr: int | None = None,
                           where: str = "head model") -> HeadModel:
    """Validate FLAME-format arrays and build a :class:`HeadModel`.

    ``shapedirs`` holds identity then expression components (``(V, 3, S+E)``, FLAME's layout);
    ``n_shape`` says where identity ends (``arrays['n_shape']`` if stored, else FLAME's 300).
    ``n_shape``/``n_expr`` beyond what is stored are an error; fewer truncate the basis.
    """
    for key in REQUIRED_KEYS:
        if key not in arrays:
            raise SubjectFormatError(f"{where}: missing field {key!r} (FLAME format needs {list(REQUIRED_KEYS)})")
    def get(key: str) -> np.ndarray:
        value = np.asarray(arrays[key])
        if value.dtype.kind not in "biuf":
            raise SubjectFormatError(f"{where}: field {key!r} expected numbers, found dtype {value.dtype}")
        return value

    v_template = get("v_template").astype(np.float32)
    if v_template.ndim != 2 or v_template.shape[1] != 3:
        raise SubjectFormatError(f"{where}: field 'v_template' expected shape (V, 3), got {v_template.shape}")
    num_v = v_template.shape[0]
    shapedirs = get("shapedirs").astype(np.float32)
    if shapedirs.ndim != 3 or shapedirs.shape[:2] != (num_v, 3):
        raise SubjectFormatError(f"{where}: field 'shapedirs' expected shape ({num_v}, 3, S+E), got {shapedirs.shape}")
    stored_shape = int(np.asarray(arrays["n_shape"])) if "n_shape" in arrays else min(300, shapedirs.shape[2])
    n_total_expr = shapedirs.shape[2] - stored_shape
    n_shape = stored_shape if not n_shape else n_shape
    n_expr = n_total_expr if not n_expr else n_expr
    if n_shape > stored_shape or n_expr > n_total_expr:
        raise SubjectFormatError(f"{where}: asked for {n_shape} shape / {n_expr} expression components, "
                         f"the file has {stored_shape} / {n_total_expr}")
    kintree = get("kintree_table")
    parents = _parents_from_kintree(kintree, where)
    num_j = len(parents)
    posedirs = get("posedirs").astype(np.float32)
    num_p = 9 * (num_j - 1)
    if posedirs.shape == (num_p, num_v * 3):  # smplx-style (P, V*3)
        posedirs = posedirs.T.reshape(num_v, 3, num_p)
    if posedirs.shape != (num_v, 3, num_p):
        raise SubjectFormatError(
            f"{where}: field 'posedirs' expected shape ({num_v}, 3, {num_p}), got {posedirs.shape}")
    j_reg = arrays["J_regressor"]
    j_reg = np.asarray(j_reg.toarray() if hasattr(j_reg, "toarray") else j_reg, dtype=np.float32)
    if j_reg.shape != (num_j, num_v):
        raise SubjectFormatError(f"{where}: field 'J_regressor' expected shape ({num_j}, {num_v}), got {j_reg.shape}")
    weights = get("weights").astype(np.float32)
    if weights.shape != (num_v, num_j):
        raise SubjectFormatError(f"{where}: field 'weights' expected shape ({num_v}, {num_j}), got {weights.shape}")
    faces = get("f").astype(np.int32)
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.min(initial=0) < 0 or faces.max(initial=0) >= num_v:
        raise SubjectFormatError(f"{where}: field 'f' expected shape (F, 3) with indices < {num_v}, got {faces.shape}")
    vt = ft = mouth = None
    if "vt" in arrays and "ft" in arrays:
        vt = get("vt").astype(np.float32)
        ft = get("ft").astype(np.int32)
        if vt.ndim != 2 or vt.shape[1] != 2:
            raise SubjectFormatError(f"{where}: field 'vt' expected shape (Vt, 2), got {vt.shape}")
        if ft.shape != faces.shape or ft.max(initial=0) >= vt.shape[0] or ft.min(initial=0) < 0:
            raise SubjectFormatError(f"{where}: field 'ft' expected shape {faces.shape} with indices < {vt.shape[0]}")
    if "mouth_faces" in arrays:
        mouth = get("mouth_faces").astype(bool)
        if mouth.shape != (faces.shape[0],):
            raise SubjectFormatError(
                f"{where}: field 'mouth_faces' expected shape ({faces.shape[0]},), got {mouth.shape}")
    for name, arr in (("v_template", v_template), ("shapedirs", shapedirs), ("posedirs", posedirs),
                      ("J_regressor", j_reg), ("weights", weights)):
        if not np.all(np.isfinite(arr)):
            raise SubjectFormatError(f"{where}: field {name!r} contains NaN or Inf")
    return HeadModel(
        v_template=jnp.asarray(v_template),
        shapedirs=jnp.asarray(shapedirs[..., :n_shape]),
        exprdirs=jnp.asarray(shapedirs[..., stored_shape: stored_shape + n_expr]),
        posedirs=jnp.asarray(posedirs),
        J_regressor=jnp.asarray(j_reg),
        weights=jnp.asarray(weights),
        faces=faces, parents=parents, vt=vt, ft=ft, mouth_faces=mouth,
    )


def load_head_model(path: str | Path, n_shape: int | None = None, n_expr: int | None = None) -> HeadModel:
    """Load a FLAME-format head model from ``.npz`` or FLAME ``.pkl`` (restricted unpickler)."""
    path = Path(path)
    if not path.is_file():
        raise SubjectFormatError(f"{path}: head model file not found")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                if not hasattr(data, "files"):
                    raise SubjectFormatError(f"{path}: expected an .npz archive of named arrays, got a single array")
                arrays = {k: data[k] for k in data.files}
        except SubjectFormatError:
            raise
        except Exception as err:  # truncated / garbage / object arrays: zipfile, npy and pickle errors alike
            raise SubjectFormatError(f"{path}: not a readable .npz head model ({type(err).__name__}: {err})") from err
    elif path.suffix == ".pkl":
        from gem_jax.head.safe_pickle import load_flame_pickle

        arrays = load_flame_pickle(path)
    else:
        raise SubjectFormatError(f"{path}: unsupported head model format {path.suffix!r} (expected .npz or .pkl)")
    try:
        return head_model_from_arrays(arrays, n_shape, n_expr, where=str(path))
    except SubjectFormatError:
        raise
    except (TypeError, ValueError, AttributeError) as err:  # e.g. a field of strings where numbers belong
        raise SubjectFormatError(f"{path}: malformed head model ({type(err).__name__}: {err})") from err


def save_head_model(path: str | Path, arrays: dict) -> None:
    """Write FLAME-format arrays as ``.npz`` (validated first)."""
    head_model_from_arrays(arrays, where=str(path))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{k: np.asarray(v) for k, v in arrays.items()})
    tmp.replace(path)
