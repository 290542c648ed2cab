"""The Gaussian Eigen Model: container, evaluation, and the compact ``.npz`` file.

GEM (Zielonka et al., CVPR 2025, arXiv 2407.04545, §3.1) represents an animated head as
one linear model per Gaussian attribute. For each modality ``m`` (position 3, rotation 4,
scale 3, opacity 1 channels per Gaussian) and coefficients ``k_m`` in σ units,

    G_m(k) = mean_m + (k_m · σ_m) @ U_m,      U_m (K_m, D_m) with orthonormal rows,

the paper's eigen model; colours are fixed per Gaussian. Evaluating a frame is one
matrix–vector product per modality, with no neural network.

Validity of the evaluated Gaussians (the data matrices hold ACTIVATED values, docs/architecture.md §6,
so the model is linear in activated space and is then made valid):

* quaternions are renormalised (a zero quaternion becomes the identity, gradient-safe);
* scales are clipped to at least :data:`SCALE_MIN`;
* opacities are clipped to ``[OPACITY_EPS, 1 − OPACITY_EPS]``.

Coefficients are clamped to ``±3`` (:data:`COEFF_LIMIT`, i.e. ±3σ, docs/architecture.md §10).
When the values are concrete (eager call) a clamp emits a :class:`CoefficientClampWarning` and
NaN/Inf coefficients raise :class:`~gem_jax.errors.CoefficientError`; under
``jit``/``vmap``/``grad`` the values are tracers, so the clamp is silent.
:func:`check_coefficients` is that check as one host-side function: every path that renders
or exports user coefficients (``gem_jax.load(...).render`` / ``.evaluate`` / ``.export_ply``,
``python -m gem_jax.export``, ``python -m gem_jax.reenact``) goes through it.
``clamp=None`` disables it (refinement evaluates the training coefficients, which may lie
beyond 3σ). :func:`reconstruct` is the purely linear part, without clamp or validity.

The model is a ``flax.struct`` pytree: ``mean``, ``sigma`` and ``U`` are dicts keyed by
modality, ``colors (N, 3)`` and ``texels (N, 2)`` (row, col of each Gaussian in the
``uv_shape`` grid, static) complete it. Differentiate w.r.t. ``U`` only, e.g.
``jax.grad(lambda U: loss(model.replace(U=U)))(model.U)`` (``texels`` is an int leaf).

File format (``format_version`` 1, one uncompressed ``.npz``, read with
``allow_pickle=False``): ``format_version`` int32 (), ``modalities`` str (4,),
``components`` int32 (4,), ``uv_shape`` int32 (2,), ``texels`` int32 (N, 2), ``colors``
(N, 3), and per modality ``{m}_mean`` (N·C,), ``{m}_sigma`` float32 (K,), ``{m}_U``
(K, N·C). With ``dtype="float16"`` the means, bases and colours are stored as float16
(relative error ≤ 2⁻¹¹); σ stays float32. Loading always returns float32. Sizes are in MB
of 10⁶ bytes.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from gem_jax.artefacts import describe_error
from gem_jax.atomic import write_npz
from gem_jax.eigen.pca import CHANNELS, MODALITIES, PCAResult
from gem_jax.errors import ArtefactError, CoefficientError, MissingArtefactError
from gem_jax.types import Gaussians

FORMAT_VERSION = 1
COEFF_LIMIT = 3.0
SCALE_MIN = 1e-6
OPACITY_EPS = 1e-4
DTYPES = {"float32": np.float32, "float16": np.float16}

Coeffs = Mapping[str, Float[ArrayLike, "*batch K"]] | Float[ArrayLike, "*batch Ktot"]


class CoefficientClampWarning(UserWarning):
    """Coefficients outside ±COEFF_LIMIT (σ units) were clamped."""


class GEMFormatError(ArtefactError):
    """A GEM file or container is malformed; the message names the file/field and shape."""


@flax.struct.dataclass
class GEM:
    """Gaussian Eigen Model (paper §3.1): per-modality ``mean (D)``, ``sigma (K)``, ``U (K, D)``."""

    mean: dict[str, Float[Array, "D"]]
    sigma: dict[str, Float[Array, "K"]]
    U: dict[str, Float[Array, "K D"]]
    colors: Float[Array, "N 3"]
    texels: Int[Array, "N 2"]
    uv_shape: tuple[int, int] = flax.struct.field(pytree_node=False, default=(0, 0))

    @property
    def num_gaussians(self) -> int:
        return self.colors.shape[0]

    @property
    def num_components(self) -> dict[str, int]:
        return {m: self.U[m].shape[0] for m in MODALITIES}

    @property
    def total_components(self) -> int:
        return sum(self.num_components.values())

    def evaluate(self, k: Coeffs, *, clamp: float | None = COEFF_LIMIT) -> Gaussians:
        """``G(k)`` — see :func:`evaluate`."""
        return evaluate(self, k, clamp=clamp)

    def reconstruct(self, k: Coeffs) -> dict[str, Float[Array, "*batch D"]]:
        """``mean + (k·σ) @ U`` per modality — see :func:`reconstruct`."""
        return reconstruct(self, k)

    def save(self, path: str | os.PathLike, *, dtype: str = "float32") -> Path:
        """Write one ``.npz`` — see :func:`save`."""
        return save(self, path, dtype=dtype)

    def summary(self) -> str:
        """Components per modality, Gaussians, MB — see :func:`summary`."""
        return summary(self)

    def validate(self, where: str = "GEM") -> GEM:
        """Check shapes and values eagerly, as :func:`load` does; raise :class:`GEMFormatError`."""
        _from_fields(where, to_fields(self))
        return self

    def valid_mask(self) -> np.ndarray:
        """``(H, W)`` bool: the UV texels that carry a Gaussian."""
        mask = np.zeros(self.uv_shape, bool)
        texels = np.asarray(self.texels)
        mask[texels[:, 0], texels[:, 1]] = True
        return mask

    def to_uv(self, values: Float[ArrayLike, "*batch N C"], fill: float = 0.0) -> Float[Array, "*batch H W C"]:
        """Scatter per-Gaussian values back onto the UV grid (e.g. to view a component)."""
        values = jnp.asarray(values)
        grid = jnp.full((*values.shape[:-2], *self.uv_shape, values.shape[-1]), fill, values.dtype)
        return grid.at[..., self.texels[:, 0], self.texels[:, 1], :].set(values)

    @classmethod
    def from_pca(cls, results: Mapping[str, PCAResult], colors: Float[ArrayLike, "N 3"], valid: ArrayLike) -> GEM:
        """Build the model from :func:`gem_jax.eigen.pca.fit_modalities` output, the fixed
        colours and the ``(H, W)`` UV validity mask of the collect layout."""
        valid = np.asarray(valid)
        if valid.ndim != 2 or valid.dtype != np.bool_:
            raise GEMFormatError(f"GEM.from_pca: 'valid' expected a bool (H, W) mask, got {valid.dtype} {valid.shape}")
        missing = [m for m in MODALITIES if m not in results]
        if missing:
            raise GEMFormatError(f"GEM.from_pca: missing PCA results for {missing}")
        fields = _header(np.argwhere(valid), valid.shape, {m: results[m].U.shape[0] for m in MODALITIES})
        fields["colors"] = np.asarray(colors)
        for m in MODALITIES:
            for name in ("mean", "sigma", "U"):
                fields[f"{m}_{name}"] = np.asarray(getattr(results[m], name))
        return _from_fields("GEM.from_pca", fields)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GEM:
        return load(path)


# --------------------------------------------------------------------------- evaluation


def split_coeffs(model: GEM, k: Coeffs) -> dict[str, Float[Array, "*batch K"]]:
    """Coefficients as a dict per modality; a flat ``(..., ΣK)`` vector is split in
    :data:`MODALITIES` order. A dict may omit modalities (zeros); unknown keys are errors."""
    sizes = model.num_components
    if isinstance(k, Mapping):
        extra = set(k) - set(MODALITIES)
        if extra:
            raise ValueError(f"GEM coefficients: unknown modalities {sorted(extra)} (expected {MODALITIES})")
        out = {m: jnp.asarray(v) for m, v in k.items()}
        for m, v in out.items():
            if v.ndim < 1 or v.shape[-1] != sizes[m]:
                raise ValueError(f"GEM coefficients: {m!r} expected shape (..., {sizes[m]}), got {v.shape}")
        batch = jnp.broadcast_shapes(*(v.shape[:-1] for v in out.values())) if out else ()
        dtype = jnp.result_type(*out.values()) if out else jnp.float32
        return {m: out[m] if m in out else jnp.zeros((*batch, sizes[m]), dtype) for m in MODALITIES}
    k = jnp.asarray(k)
    total = sum(sizes.values())
    if k.ndim < 1 or k.shape[-1] != total:
        raise ValueError(f"GEM coefficients: expected a flat vector of shape (..., {total}), got {k.shape}")
    bounds = np.cumsum([0] + [sizes[m] for m in MODALITIES])
    return {m: k[..., bounds[i] : bounds[i + 1]] for i, m in enumerate(MODALITIES)}


def flatten_coeffs(model: GEM, k: Coeffs) -> Float[Array, "*batch Ktot"]:
    """The flat ``(..., ΣK)`` vector of a coefficient dict, in :data:`MODALITIES` order."""
    parts = split_coeffs(model, k)
    batch = jnp.broadcast_shapes(*(v.shape[:-1] for v in parts.values()))
    return jnp.concatenate([jnp.broadcast_to(parts[m], (*batch, parts[m].shape[-1])) for m in MODALITIES], -1)


def _check_and_warn(host: Mapping[str, np.ndarray], limit: float, where: str) -> None:
    """The host-side half of the coefficient gate: non-finite → :class:`CoefficientError`,
    beyond ``±limit`` → :class:`CoefficientClampWarning` (the caller clamps)."""
    for bad, test in (("NaN", np.isnan), ("Inf", np.isinf)):
        names = [m for m, v in host.items() if test(v).any()]
        if names:
            first = names[0]
            entries = np.argwhere(test(np.atleast_1d(host[first])))[:5].tolist()
            raise CoefficientError(f"{where}: {bad} values in {names} (e.g. {first} at {entries}); coefficients "
                                   "must be finite (σ units)")
    over = {m: int(np.sum(np.abs(v) > limit)) for m, v in host.items()}
    if any(over.values()):
        worst = max(float(np.abs(v).max()) for v in host.values() if v.size)
        counts = ", ".join(f"{m} {c}" for m, c in over.items() if c)
        warnings.warn(f"{where} outside ±{limit:g}σ clamped ({counts}; max |k| = {worst:.3g})",
                      CoefficientClampWarning, stacklevel=4)


def clamp_coeffs(k: dict[str, Array], limit: float = COEFF_LIMIT, where: str = "GEM coefficients") -> dict[str, Array]:
    """Clamp to ``±limit``; check and warn on eager values, stay silent on tracers (module docstring)."""
    concrete = {m: np.asarray(v) for m, v in k.items() if not isinstance(v, jax.core.Tracer)}
    if concrete:
        _check_and_warn(concrete, limit, where)
    return {m: jnp.clip(v, -limit, limit) for m, v in k.items()}


def check_coefficients(model: GEM, k: Coeffs, *, limit: float = COEFF_LIMIT,
                       where: str = "GEM coefficients") -> Float[np.ndarray, "*batch Ktot"]:
    """The gate every path that renders or exports user coefficients goes through
    (docs/architecture.md §10): the flat float32 ``(..., ΣK)`` vector of ``k`` (dict or flat),
    shape-checked, with NaN/Inf refused (:class:`CoefficientError`, naming ``where``) and values
    beyond ``±limit`` σ clamped with a :class:`CoefficientClampWarning`. Host-side (NumPy); jitted
    code uses :func:`evaluate`, which clamps silently on tracers."""
    parts = {m: np.asarray(v, np.float32) for m, v in split_coeffs(model, k).items()}
    _check_and_warn(parts, limit, where)
    return np.clip(np.asarray(flatten_coeffs(model, parts), np.float32), -limit, limit)


def reconstruct(model: GEM, k: Coeffs) -> dict[str, Float[Array, "*batch D"]]:
    """The linear eigen model ``mean + (k·σ) @ U`` per modality (no clamp, no validity):
    the data-matrix row the coefficients reproduce. Batch dims of ``k`` are kept."""
    parts = split_coeffs(model, k)
    hi = jax.lax.Precision.HIGHEST
    return {m: model.mean[m] + jnp.matmul(parts[m] * model.sigma[m], model.U[m], precision=hi) for m in MODALITIES}


def activate(model: GEM, rows: Mapping[str, Float[Array, "*batch D"]]) -> Gaussians:
    """Turn linear rows (activated values) into valid :class:`Gaussians` (module docstring)."""
    n = model.num_gaussians

    def grid(m: str) -> Array:
        return rows[m].reshape(*rows[m].shape[:-1], n, CHANNELS[m])

    quats = grid("rotation")
    norm2 = jnp.sum(quats * quats, axis=-1, keepdims=True)
    ok = norm2 > 1e-12
    identity = jnp.array([1.0, 0.0, 0.0, 0.0], quats.dtype)
    quats = jnp.where(ok, quats * jax.lax.rsqrt(jnp.where(ok, norm2, 1.0)), identity)
    scales = jnp.maximum(grid("scale"), SCALE_MIN)
    opacities = jnp.clip(grid("opacity")[..., 0], OPACITY_EPS, 1.0 - OPACITY_EPS)
    means = grid("position")
    colors = jnp.broadcast_to(model.colors, (*means.shape[:-2], n, 3))
    return Gaussians(means=means, quats=quats, scales=scales, opacities=opacities, colors=colors)


def evaluate(model: GEM, k: Coeffs, *, clamp: float | None = COEFF_LIMIT) -> Gaussians:
    """``G(k)``: the Gaussians of coefficients ``k`` (σ units; dict or flat vector, any
    leading batch dims). Pure in ``(model, k)``: jit with ``static_argnames="clamp"``,
    vmap over frames. ``k = 0`` gives the mean (renormalised quaternions)."""
    parts = split_coeffs(model, k)
    if clamp is not None:
        parts = clamp_coeffs(parts, clamp)
    return activate(model, reconstruct(model, parts))


# --------------------------------------------------------------------------- file format


def _header(texels, uv_shape, components: Mapping[str, int]) -> dict[str, np.ndarray]:
    return {
        "format_version": np.array(FORMAT_VERSION, np.int32),
        "modalities": np.array(MODALITIES),
        "components": np.array([components[m] for m in MODALITIES], np.int32),
        "uv_shape": np.array(uv_shape, np.int32),
        "texels": np.asarray(texels, np.int32),
    }


_KINDS = {"f": "float", "i": "int", "U": "str"}


def _fmt(shape: tuple) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def _field(where: str, fields: Mapping[str, np.ndarray], name: str, shape: tuple, kind: str) -> np.ndarray:
    """Fetch ``fields[name]`` and check its shape and dtype kind ('f' float, 'i' int, 'U' str)."""
    expected = f"{_KINDS[kind]} shape {_fmt(shape)}"
    if name not in fields:
        raise GEMFormatError(f"{where}: missing field {name!r} (expected {expected})")
    value = np.asarray(fields[name])
    kind_ok = value.dtype.kind == kind or (kind == "i" and value.dtype.kind == "u")
    if value.shape != tuple(shape) or not kind_ok:
        raise GEMFormatError(f"{where}: field {name!r} expected {expected}, got {value.dtype} {_fmt(value.shape)}")
    if kind == "f" and not np.all(np.isfinite(value)):
        raise GEMFormatError(f"{where}: field {name!r} has NaN/Inf values")
    return value


def _from_fields(where: str, fields: Mapping[str, np.ndarray]) -> GEM:
    """Validate a flat field dict (the ``.npz`` layout) and build a float32 :class:`GEM`."""
    version = _field(where, fields, "format_version", (), "i")
    if int(version) != FORMAT_VERSION:
        raise GEMFormatError(
            f"{where}: format_version {int(version)} is not supported (this code reads {FORMAT_VERSION})"
        )
    mods = _field(where, fields, "modalities", (len(MODALITIES),), "U")
    if tuple(mods.tolist()) != MODALITIES:
        raise GEMFormatError(f"{where}: field 'modalities' expected {list(MODALITIES)}, got {mods.tolist()}")
    comps = _field(where, fields, "components", (len(MODALITIES),), "i")
    uv_shape = tuple(int(v) for v in _field(where, fields, "uv_shape", (2,), "i"))
    n = int(np.shape(fields["texels"])[0]) if np.ndim(fields.get("texels")) == 2 else 0
    texels = _field(where, fields, "texels", (n or "N", 2), "i")
    if n < 1:
        raise GEMFormatError(f"{where}: field 'texels' expected int shape (N, 2) with N >= 1, got {_fmt(texels.shape)}")
    if min(uv_shape) < 1 or texels.min() < 0 or (texels >= np.array(uv_shape)).any():
        raise GEMFormatError(f"{where}: field 'texels' must index the uv_shape {uv_shape} grid")
    colors = _field(where, fields, "colors", (n, 3), "f")
    mean, sigma, U = {}, {}, {}
    for i, m in enumerate(MODALITIES):
        k, d = int(comps[i]), n * CHANNELS[m]
        if k < 1:
            raise GEMFormatError(f"{where}: field 'components' must be >= 1 per modality, got {comps.tolist()}")
        mean[m] = jnp.asarray(_field(where, fields, f"{m}_mean", (d,), "f"), jnp.float32)
        s = _field(where, fields, f"{m}_sigma", (k,), "f")
        if not np.all(s > 0):
            raise GEMFormatError(f"{where}: field '{m}_sigma' must be positive")
        sigma[m] = jnp.asarray(s, jnp.float32)
        U[m] = jnp.asarray(_field(where, fields, f"{m}_U", (k, d), "f"), jnp.float32)
    return GEM(mean, sigma, U, jnp.asarray(colors, jnp.float32), jnp.asarray(texels, jnp.int32), uv_shape)


def from_fields(where: str, fields: Mapping[str, np.ndarray]) -> GEM:
    """Validate arrays in :func:`to_fields`' layout (any container, e.g. the web export) and
    build a float32 :class:`GEM`; errors name ``where``, the field and the expected shape."""
    return _from_fields(where, fields)


def to_fields(model: GEM, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The arrays :func:`save` writes (means, bases, colours in ``dtype``; σ float32)."""
    if dtype not in DTYPES:
        raise ValueError(f"GEM.save: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    store = DTYPES[dtype]
    fields = _header(model.texels, model.uv_shape, model.num_components)
    with np.errstate(over="ignore"):  # float16 overflow becomes inf, reported below
        fields["colors"] = np.asarray(model.colors).astype(store)
        for m in MODALITIES:
            fields[f"{m}_mean"] = np.asarray(model.mean[m]).astype(store)
            fields[f"{m}_sigma"] = np.asarray(model.sigma[m], np.float32)
            fields[f"{m}_U"] = np.asarray(model.U[m]).astype(store)
    for name, value in fields.items():
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            hint = " (beyond the float16 range: use dtype='float32')" if dtype == "float16" else ""
            raise GEMFormatError(f"GEM.save: field {name!r} has NaN/Inf values as {dtype}{hint}")
    return fields


def save(model: GEM, path: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Write the model as one ``.npz`` (module docstring), atomically; returns the path."""
    path = Path(path)
    fields = to_fields(model, dtype)
    _from_fields(f"GEM.save({path})", fields)  # never write a file load() would reject
    return write_npz(path, **fields)


def load(path: str | os.PathLike) -> GEM:
    """Read a model written by :func:`save`; errors name the file, field and expected shape."""
    path = Path(path)
    if not path.is_file():
        raise MissingArtefactError(f"{path}: no such GEM model file")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as err:  # zipfile / npy errors of every kind: not an .npz at all
        raise GEMFormatError(f"{path}: not a readable GEM .npz file ({describe_error(err)})") from err
    if not hasattr(npz, "files"):
        raise GEMFormatError(f"{path}: a single .npy array, not a GEM .npz file")
    fields = {}
    with npz:
        for name in npz.files:
            try:
                fields[name] = npz[name]
            except Exception as err:  # a truncated entry, or an object array (pickle refused)
                raise GEMFormatError(f"{path}: field {name!r} unreadable ({describe_error(err)})") from err
    return _from_fields(str(path), fields)


# --------------------------------------------------------------------------- size / summary


def size_breakdown(model: GEM, dtype: str = "float32") -> dict[str, int]:
    """Bytes of the stored arrays by group: ``basis`` (means and U: ``N·(1+K)·C`` values per
    modality), ``sigma``, ``colors``, ``texels``, ``header`` (version, shapes, names)."""
    groups = {"basis": 0, "sigma": 0, "colors": 0, "texels": 0, "header": 0}
    for name, value in to_fields(model, dtype).items():
        prefix, _, suffix = name.partition("_")
        if prefix in MODALITIES:
            group = "sigma" if suffix == "sigma" else "basis"
        else:
            group = name if name in ("colors", "texels") else "header"
        groups[group] += value.nbytes
    return groups


def size_mb(path_or_model: GEM | str | os.PathLike, dtype: str = "float32") -> float:
    """Size in MB (10⁶ bytes): of the file on disk for a path, of the stored arrays (file
    size minus the few-kB ``.npz`` framing) in ``dtype`` for a model."""
    if isinstance(path_or_model, GEM):
        return sum(size_breakdown(path_or_model, dtype).values()) / 1e6
    return os.path.getsize(path_or_model) / 1e6


def summary(model: GEM) -> str:
    """Human-readable summary: Gaussians, components per modality, σ range, size in MB."""
    comps = model.num_components
    h, w = model.uv_shape
    lines = [
        f"GEM eigen model: {model.num_gaussians:,} Gaussians on a {h}x{w} UV grid, "
        f"{model.total_components} coefficients, {size_mb(model):.2f} MB as float32 "
        f"({size_mb(model, 'float16'):.2f} MB as float16)",
        f"  {'modality':<10}{'channels':>9}{'components':>12}{'D':>10}{'sigma_1':>11}{'sigma_K':>11}",
    ]
    for m in MODALITIES:
        sigma = np.asarray(model.sigma[m])
        lines.append(
            f"  {m:<10}{CHANNELS[m]:>9}{comps[m]:>12}{model.U[m].shape[1]:>10}{sigma[0]:>11.3e}{sigma[-1]:>11.3e}"
        )
    lines.append("  colours: fixed per Gaussian (not in the eigenbasis)")
    return "\n".join(lines)
