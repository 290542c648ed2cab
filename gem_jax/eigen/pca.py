"""Per-modality PCA of the teacher's Gaussians, and the on-disk layout of its data matrices.

GEM (Zielonka et al., CVPR 2025, arXiv 2407.04545, §3.1) distils the teacher avatar into a
linear model per Gaussian attribute ("modality"): stacking the activated canonical Gaussians
of every training timestep into a data matrix ``X (N, D)`` (N timesteps, D = texels ×
channels), PCA gives

    X_t ≈ mean + (k_t · σ) @ U,     U (K, D) with orthonormal rows,

with ``k_t`` the coefficients of timestep ``t`` in σ units (unit standard deviation over the
training set). Colour is static in the teacher and is not part of the PCA. Modalities and
their channels: position 3, rotation 4 (wxyz), scale 3, opacity 1; default component counts
50/40/40/50 as in the released GEM code (docs/architecture.md §6).

Two numerically equivalent paths, both through ``jnp.linalg`` and neither forming ``D×D``:

* ``"svd"``  — thin SVD of the centred ``N×D`` matrix.
* ``"gram"`` — ``eigh`` of the ``N×N`` Gram matrix ``X_c X_cᵀ`` (cheap when ``N ≪ D``),
  followed by a Rayleigh–Ritz step: the top ``K + 10`` eigenvectors ``V`` give
  ``B = Vᵀ X_c`` and the thin SVD of ``B`` yields the components. The oversampled
  Rayleigh–Ritz step avoids the squared condition number of the Gram matrix for every
  component well above ``sqrt(eps)·s_1`` and makes ``U`` orthonormal to float32 rounding.

``"auto"`` takes ``"gram"`` when ``D >= 4·N`` and ``"svd"`` otherwise. Signs are
deterministic: the largest-magnitude entry of every row of ``U`` is positive
(:func:`gem_jax.eigen.qr.row_signs`). The number of components is capped at ``N − 1`` (the
rank of a centred matrix) and at the numerical rank (singular values above
``rank_rtol · s_1``), with a :class:`ComponentCapWarning`.

On-disk layout written by the ``collect`` stage (``teacher/``) and read here
(:func:`read_collect`; :func:`write_collect` writes it for small data and tests)::

    <workdir>/collect/
      position.npy   float32 (N, T*3)  canonical means, root pose removed
      rotation.npy   float32 (N, T*4)  unit quaternions wxyz, sign-consistent over time
      scale.npy      float32 (N, T*3)  activated (positive) scales
      opacity.npy    float32 (N, T)    activated opacities in (0, 1)
      colors.npy     float32 (T, 3)    the fixed per-Gaussian colours
      valid.npy      bool    (H, W)    UV validity mask of the teacher's Gaussian maps
      timesteps.npy  int64   (N,)      training-timestep index of each data-matrix row

``N`` is the number of training timesteps and ``T = valid.sum()`` the number of Gaussians.
Gaussian ``j`` is the ``j``-th ``True`` texel of ``valid`` in row-major order, i.e. its
``(row, col)`` is ``np.argwhere(valid)[j]``. Rows of the modality matrices are
texel-major, channel-minor: entry ``[t, j*C + c]`` is channel ``c`` of Gaussian ``j`` at row
``t`` (``X.reshape(N, T, C)``). Values are ACTIVATED (docs/architecture.md §6). Because PCA is linear and
``q`` and ``−q`` are one rotation, the writer must keep quaternion signs consistent across
timesteps (e.g. flip ``q_t`` when ``q_t · q_0 < 0`` for the first row ``q_0``). Large
matrices can be written row by row into ``np.lib.format.open_memmap(path, mode="w+",
dtype=np.float32, shape=(N, T*C))``; :func:`read_collect` memory-maps them back.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from gem_jax.artefacts import read_npy
from gem_jax.atomic import write_npy
from gem_jax.errors import ArtefactError, MissingArtefactError
from gem_jax.eigen.qr import row_signs

MODALITIES = ("position", "rotation", "scale", "opacity")
CHANNELS = {"position": 3, "rotation": 4, "scale": 3, "opacity": 1}
DEFAULT_COMPONENTS = {"position": 50, "rotation": 40, "scale": 40, "opacity": 50}
#: A component whose singular value is below ``rank_rtol · s_1`` counts as numerically zero.
DEFAULT_RANK_RTOL = 1e-3
#: ``method="auto"`` uses the Gram path when ``D >= GRAM_RATIO · N``.
GRAM_RATIO = 4
#: Extra Gram eigenvectors kept for the Rayleigh–Ritz step.
OVERSAMPLE = 10
COLLECT_FILES = (*(f"{m}.npy" for m in MODALITIES), "colors.npy", "valid.npy", "timesteps.npy")

_HI = jax.lax.Precision.HIGHEST


class ComponentCapWarning(UserWarning):
    """Fewer components than requested: capped at N − 1 or at the numerical rank."""


@flax.struct.dataclass
class PCAResult:
    """PCA of one modality (paper §3.1). Coefficients are in σ units: ``X ≈ mean + (coeffs·σ) @ U``.

    ``sigma`` is the standard deviation of each component's coefficients over the training
    timesteps (``‖X_c u_i‖ / sqrt(N−1)``, equal to ``s_i / sqrt(N−1)`` for the exact SVD), so
    every column of ``coeffs`` has unit sample standard deviation. ``explained`` is each
    kept component's share of the total variance; ``spectrum`` the same share for every
    component the decomposition resolved (for the report).
    """

    mean: Float[Array, "D"]
    sigma: Float[Array, "K"]
    U: Float[Array, "K D"]
    coeffs: Float[Array, "N K"]
    explained: Float[Array, "K"]
    spectrum: Float[Array, "R"]
    modality: str = flax.struct.field(pytree_node=False, default="data")
    method: str = flax.struct.field(pytree_node=False, default="svd")
    requested: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def num_components(self) -> int:
        return self.U.shape[0]

    @property
    def num_samples(self) -> int:
        return self.coeffs.shape[0]

    @property
    def dim(self) -> int:
        return self.U.shape[1]


@jax.jit
def _svd_decompose(x: Float[Array, "N D"]):
    mean = jnp.mean(x, axis=0)
    _, s, vt = jnp.linalg.svd(x - mean, full_matrices=False)
    return mean, s, s**2, vt  # top singular values, variance spectrum (unscaled), rows


@partial(jax.jit, static_argnums=1)
def _gram_decompose(x: Float[Array, "N D"], p: int):
    mean = jnp.mean(x, axis=0)
    xc = x - mean
    g = jnp.matmul(xc, xc.T, precision=_HI)
    evals, v = jnp.linalg.eigh(0.5 * (g + g.T))
    evals, v = evals[::-1], v[:, ::-1]  # descending
    b = jnp.matmul(v[:, :p].T, xc, precision=_HI)  # (p, D): Rayleigh–Ritz projection
    _, s, vt = jnp.linalg.svd(b, full_matrices=False)
    spectrum = jnp.concatenate([s**2, jnp.clip(evals[p:], 0.0, None)])
    return mean, s, spectrum, vt


@partial(jax.jit, static_argnums=3)
def _finish(x, mean, vt, k: int):
    u = vt[:k]
    u = u * row_signs(u)[:, None]
    c = jnp.matmul(x - mean, u.T, precision=_HI)  # (N, K) raw coefficients
    sigma = jnp.linalg.norm(c, axis=0) / jnp.sqrt(x.shape[0] - 1.0)
    return u, sigma, c / sigma


def pca(
    data: ArrayLike,
    num_components: int,
    *,
    method: str = "auto",
    rank_rtol: float = DEFAULT_RANK_RTOL,
    name: str = "data",
) -> PCAResult:
    """PCA of a data matrix ``(N, D)`` (N timesteps × D values), paper §3.1.

    Args:
      data: the data matrix; any float array, including a ``np.memmap`` (copied to the
        device as float32).
      num_components: components wanted ``K``; capped at ``N − 1``, ``D`` and the numerical
        rank with a :class:`ComponentCapWarning`.
      method: ``"svd"``, ``"gram"`` or ``"auto"`` (module docstring).
      rank_rtol: singular values below ``rank_rtol · s_1`` count as zero.
      name: the modality name, used in messages and stored in the result.

    Returns:
      :class:`PCAResult` with ``U`` rows orthonormal, signs per :func:`~gem_jax.eigen.qr.row_signs`.
    """
    shape = np.shape(data)
    if len(shape) != 2 or shape[0] < 2 or shape[1] < 1:
        raise ValueError(f"pca({name}): expected a data matrix of shape (N >= 2 timesteps, D), got {shape}")
    if int(num_components) < 1:
        raise ValueError(f"pca({name}): num_components must be >= 1, got {num_components}")
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"pca({name}): method must be 'auto', 'svd' or 'gram', got {method!r}")
    n, d = shape
    x = jnp.asarray(data, dtype=jnp.float32)
    if not bool(jnp.all(jnp.isfinite(x))):
        bad = np.flatnonzero(~np.asarray(jnp.all(jnp.isfinite(x), axis=1)))
        raise ValueError(f"pca({name}): data matrix has NaN/Inf values in rows {bad[:10].tolist()}")
    if method == "auto":
        method = "gram" if d >= GRAM_RATIO * n else "svd"
    requested = int(num_components)
    if method == "gram":
        mean, s, spectrum, vt = _gram_decompose(x, min(n, requested + OVERSAMPLE))
    else:
        mean, s, spectrum, vt = _svd_decompose(x)
    s_host = np.asarray(s)
    if not s_host[0] > 0:
        raise ValueError(f"pca({name}): the data matrix has zero variance (all {n} rows equal)")
    rank = int(np.sum(s_host > rank_rtol * s_host[0]))
    k = min(requested, n - 1, d, rank)
    if k < requested:
        warnings.warn(
            f"pca({name}): asked for {requested} components, using {k} "
            f"(N-1 = {n - 1}, D = {d}, numerical rank {rank} at rtol {rank_rtol:g})",
            ComponentCapWarning,
            stacklevel=2,
        )
    U, sigma, coeffs = _finish(x, mean, vt, k)
    total = jnp.sum(spectrum) / (n - 1)
    return PCAResult(
        mean=mean,
        sigma=sigma,
        U=U,
        coeffs=coeffs,
        explained=sigma**2 / total,
        spectrum=spectrum / (n - 1) / total,
        modality=name,
        method=method,
        requested=requested,
    )


def fit_modalities(
    matrices: Mapping[str, ArrayLike],
    components: Mapping[str, int] | None = None,
    *,
    method: str = "auto",
    rank_rtol: float = DEFAULT_RANK_RTOL,
) -> dict[str, PCAResult]:
    """:func:`pca` of every modality of :data:`MODALITIES` (the ``pca`` stage, docs/architecture.md §6).

    ``components`` overrides :data:`DEFAULT_COMPONENTS` per modality; an unknown key is an
    error. Every matrix must have ``T·C`` columns for its channel count ``C`` and one ``T``.
    """
    comps = dict(DEFAULT_COMPONENTS)
    for key, value in (components or {}).items():
        if key not in comps:
            raise ValueError(f"fit_modalities: unknown modality {key!r} in components (expected {MODALITIES})")
        comps[key] = int(value)
    _check_matrices("fit_modalities", matrices)
    return {m: pca(matrices[m], comps[m], method=method, rank_rtol=rank_rtol, name=m) for m in MODALITIES}


# --------------------------------------------------------------------------- collect layout


@dataclasses.dataclass(frozen=True)
class CollectData:
    """The ``collect`` stage's output (module docstring), modality matrices memory-mapped."""

    matrices: dict[str, np.ndarray]  # modality -> (N, T*C)
    colors: np.ndarray  # (T, 3)
    valid: np.ndarray  # (H, W) bool
    timesteps: np.ndarray  # (N,)

    @property
    def texels(self) -> np.ndarray:
        """``(T, 2)`` int32 ``(row, col)`` of each Gaussian in the UV grid."""
        return np.argwhere(self.valid).astype(np.int32)

    @property
    def num_timesteps(self) -> int:
        return int(self.timesteps.shape[0])

    @property
    def num_gaussians(self) -> int:
        return int(self.colors.shape[0])


def _check_matrices(where: str, matrices: Mapping[str, ArrayLike], num_texels: int | None = None) -> tuple[int, int]:
    """Check the modality matrices share N and have T·C float columns; return (N, T)."""
    extra = set(matrices) - set(MODALITIES)
    if extra:
        raise ValueError(f"{where}: unknown modalities {sorted(extra)} (expected {MODALITIES})")
    n, t = None, num_texels
    for m in MODALITIES:
        if m not in matrices:
            raise ValueError(f"{where}: missing modality {m!r} (expected {MODALITIES})")
        x, c = matrices[m], CHANNELS[m]
        shape = np.shape(x)
        if len(shape) != 2:
            raise ValueError(f"{where}: {m!r} expected shape (N, T*{c}), got {shape}")
        n = shape[0] if n is None else n
        t = shape[1] // c if t is None else t
        if shape != (n, t * c) or t < 1:
            raise ValueError(
                f"{where}: {m!r} expected shape ({n}, {t * c}) = (N, T*{c}) with T={t} Gaussians, got {shape}"
            )
        dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"{where}: {m!r} must be a float array, got dtype {dtype}")
    return int(n), int(t)


def _check_collect(where: str, matrices, colors, valid, timesteps) -> None:
    valid = np.asarray(valid)
    if valid.ndim != 2 or valid.dtype != np.bool_ or not valid.any():
        raise ValueError(
            f"{where}: 'valid' expected a bool (H, W) mask with a True texel, got {valid.dtype} {valid.shape}"
        )
    t = int(valid.sum())
    n, _ = _check_matrices(where, matrices, num_texels=t)
    if n < 2:
        raise ValueError(f"{where}: need at least 2 timesteps for PCA, got N={n}")
    colors = np.asarray(colors)
    if colors.shape != (t, 3) or not np.issubdtype(colors.dtype, np.floating):
        raise ValueError(f"{where}: 'colors' expected float shape ({t}, 3), got {colors.dtype} {colors.shape}")
    timesteps = np.asarray(timesteps)
    if timesteps.shape != (n,) or not np.issubdtype(timesteps.dtype, np.integer):
        raise ValueError(f"{where}: 'timesteps' expected int shape ({n},), got {timesteps.dtype} {timesteps.shape}")


def read_collect(collect_dir: str | os.PathLike, *, mmap: bool = True) -> CollectData:
    """Read ``<workdir>/collect`` (layout in the module docstring), validating every file.

    Modality matrices are memory-mapped read-only when ``mmap`` is true, so a 1,000 ×
    260k matrix costs no memory until :func:`pca` copies it. A missing or malformed file
    raises an error naming the file and the expected shape.
    """
    root = Path(collect_dir)
    if not root.is_dir():
        raise MissingArtefactError(f"{root}: collect directory not found (run the collect stage first)")
    arrays = {name[: -len(".npy")]: read_npy(root / name, "collect", mmap=mmap and name[:-4] in MODALITIES)
              for name in COLLECT_FILES}
    matrices = {m: arrays[m] for m in MODALITIES}
    try:
        _check_collect(str(root), matrices, arrays["colors"], arrays["valid"], arrays["timesteps"])
    except ValueError as err:
        raise ArtefactError(f"{err} (layout: see gem_jax.eigen.pca); redo it with --force collect") from None
    return CollectData(matrices, arrays["colors"].astype(np.float32), arrays["valid"], arrays["timesteps"])


def write_collect(
    collect_dir: str | os.PathLike,
    matrices: Mapping[str, ArrayLike],
    colors: ArrayLike,
    valid: ArrayLike,
    timesteps: ArrayLike | None = None,
    *,
    matrices_written: bool = False,
) -> Path:
    """Write the collect layout (module docstring) from in-memory arrays; validates first.

    Each file is written to a temporary name and renamed, so a crash leaves no half file.
    ``timesteps`` defaults to ``arange(N)``. With ``matrices_written`` the modality matrices
    are already in place (memory-mapped, written row by row): they are checked, not rewritten.
    """
    root = Path(collect_dir)
    n = np.shape(matrices[MODALITIES[0]])[0] if MODALITIES[0] in matrices else 0
    timesteps = np.arange(n) if timesteps is None else np.asarray(timesteps)
    _check_collect("write_collect", matrices, colors, valid, timesteps)
    root.mkdir(parents=True, exist_ok=True)
    out = {} if matrices_written else {m: np.asarray(matrices[m], np.float32) for m in MODALITIES}
    out["colors"] = np.asarray(colors, np.float32)
    out["valid"] = np.asarray(valid)
    out["timesteps"] = timesteps.astype(np.int64)
    for name, value in out.items():
        write_npy(root / f"{name}.npy", value)
    return root


# --------------------------------------------------------------------------- report


def _needed(spectrum: np.ndarray, fraction: float) -> str:
    cum = np.cumsum(spectrum)
    hit = np.flatnonzero(cum >= fraction - 1e-7)
    return str(int(hit[0]) + 1) if hit.size else f">{spectrum.size}"


def variance_report(results: Mapping[str, PCAResult]) -> str:
    """Explained-variance table per modality (components kept, cumulative share, and how
    many components 90/95/99 % of the variance would need), for the ``pca`` stage log."""
    lines = [
        "PCA explained variance (share of total variance per modality)",
        f"{'modality':<10}{'N':>6}{'D':>9}{'K':>5}  {'method':<6}{'sigma_1':>10}{'sigma_K':>10}"
        f"{'expl@K':>9}{'k90':>6}{'k95':>6}{'k99':>6}",
    ]
    for m, r in results.items():
        sigma = np.asarray(r.sigma)
        spectrum = np.asarray(r.spectrum)
        lines.append(
            f"{m:<10}{r.num_samples:>6}{r.dim:>9}{r.num_components:>5}  {r.method:<6}"
            f"{sigma[0]:>10.3e}{sigma[-1]:>10.3e}{100 * float(np.sum(r.explained)):>8.2f}%"
            f"{_needed(spectrum, 0.90):>6}{_needed(spectrum, 0.95):>6}{_needed(spectrum, 0.99):>6}"
        )
    lines.append("cumulative share at k components:")
    for m, r in results.items():
        cum = np.cumsum(np.asarray(r.explained))
        marks = sorted({k for k in (1, 2, 5, 10, 20, 30, 40, 50) if k <= cum.size} | {cum.size})
        lines.append(f"  {m:<10}" + "  ".join(f"{k}:{100 * cum[k - 1]:.2f}%" for k in marks))
    return "\n".join(lines)
