"""The image → coefficient regressor: whitened feature PCA and a small MLP (docs/architecture.md §7; GEM §3.3).

For a face crop with features ``f`` and the features ``f₀`` of the driver's *own* neutral
frame (so identity largely cancels, which is what makes cross-identity driving work),

    x = clip((P (f − f₀ − μ)) / s, −2.9, 2.9)        feature PCA to 50 dims, σ-normalised
    k = 2.9 · tanh(MLP(x))                            MLP: 4 × 256, LeakyReLU(0.1), dropout 0.2

``k`` is the GEM coefficient vector in σ units (all modalities, flat), bounded by ±2.9σ for
any input. :class:`FeaturePCA` is fitted on the relative training features; :class:`Regressor`
is a flax.linen module (pure ``init``/``apply``). :func:`save_regressor` / :func:`load_regressor`
write one ``.npz`` (feature PCA, MLP weights, sizes) that the reenactment command reads.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jaxtyping import Array, Float

from gem_jax.artefacts import artefact_error, read_npz
from gem_jax.atomic import write_npz

__all__ = ["BOUND", "FeaturePCA", "Regressor", "fit_feature_pca", "load_regressor", "save_regressor"]

BOUND = 2.9
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class FeaturePCA:
    """``x = clip((f_rel − mean) @ components.T / sigma, ±BOUND)`` (module docstring)."""

    mean: np.ndarray  # (F,)
    components: np.ndarray  # (P, F) orthonormal rows
    sigma: np.ndarray  # (P,)

    @property
    def dim(self) -> int:
        return int(self.components.shape[0])

    def transform(self, relative: Float[np.ndarray, "B F"]) -> Float[np.ndarray, "B P"]:
        relative = np.asarray(relative, np.float32)
        if relative.ndim != 2 or relative.shape[1] != self.mean.shape[0]:
            raise ValueError(f"feature PCA: expected features (B, {self.mean.shape[0]}), got {relative.shape}")
        x = (relative - self.mean) @ self.components.T / self.sigma
        return np.clip(x, -BOUND, BOUND).astype(np.float32)

    def inverse(self, x: Float[np.ndarray, "B P"]) -> Float[np.ndarray, "B F"]:
        """Back to (relative) feature space — exact for features inside the PCA subspace."""
        return (np.asarray(x) * self.sigma) @ self.components + self.mean


def fit_feature_pca(relative: Float[np.ndarray, "N F"], dim: int = 50) -> FeaturePCA:
    """PCA of relative features to ``dim`` (capped at the rank), σ = per-component std."""
    x = np.asarray(relative, np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature PCA: need (N >= 2, F) features, got {x.shape}")
    mean = x.mean(0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    keep = int(min(dim, np.sum(s > 1e-6 * s[0])))
    sigma = s[:keep] / np.sqrt(x.shape[0] - 1)
    return FeaturePCA(mean.astype(np.float32), vt[:keep].astype(np.float32), sigma.astype(np.float32))


class Regressor(nn.Module):
    """``k = 2.9·tanh(MLP(x))``: ``depth`` Dense(width) + LeakyReLU(0.1) + Dropout(rate) layers."""

    num_outputs: int
    width: int = 256
    depth: int = 4
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: Float[Array, "B P"], *, train: bool = False) -> Float[Array, "B K"]:
        for i in range(self.depth):
            x = nn.Dense(self.width, name=f"hidden_{i}")(x)
            x = nn.leaky_relu(x, 0.1)
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        x = nn.Dense(self.num_outputs, kernel_init=nn.initializers.zeros, name="out")(x)
        return BOUND * jnp.tanh(x)


def save_regressor(path: str | os.PathLike, pca: FeaturePCA, net: Regressor, params, extra: dict) -> Path:
    """One ``.npz``: ``format_version``, the feature PCA, the MLP sizes and weights, and ``extra``
    scalars/strings (feature extractor name and crop size)."""
    path = Path(path)
    flat = {"param/" + "/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(params)).items()}
    fields = {"format_version": np.array(FORMAT_VERSION), "pca_mean": pca.mean, "pca_components": pca.components,
              "pca_sigma": pca.sigma, "num_outputs": np.array(net.num_outputs), "width": np.array(net.width),
              "depth": np.array(net.depth), "dropout": np.array(net.dropout), **flat,
              **{f"extra/{k}": np.array(v) for k, v in extra.items()}}
    return write_npz(path, **fields)


def load_regressor(path: str | os.PathLike) -> tuple[FeaturePCA, Regressor, dict, dict]:
    """``(feature PCA, module, params, extra)`` from :func:`save_regressor`'s file.

    A missing, truncated or inconsistent file is an :class:`~gem_jax.errors.ArtefactError`
    naming it: the sizes, the feature PCA and every weight's shape are checked against the
    network the sizes describe.
    """
    path = Path(path)
    fields = read_npz(path, "regress")
    for key in ("format_version", "pca_mean", "pca_components", "pca_sigma", "num_outputs", "width", "depth",
                "dropout"):
        if key not in fields:
            raise artefact_error(path, "regress", f"missing field {key!r} (not a gem_jax regressor file)")
    if int(fields["format_version"]) != FORMAT_VERSION:
        raise artefact_error(path, "regress",
                             f"format_version {int(fields['format_version'])} is not {FORMAT_VERSION}")
    mean, comps, sigma = fields["pca_mean"], fields["pca_components"], fields["pca_sigma"]
    if mean.ndim != 1 or comps.ndim != 2 or comps.shape[1] != mean.shape[0] or sigma.shape != comps.shape[:1]:
        raise artefact_error(path, "regress", f"feature PCA: expected mean (F,), components (P, F), sigma (P,), "
                                              f"found {mean.shape}, {comps.shape}, {sigma.shape}")
    if not all(np.all(np.isfinite(a)) for a in (mean, comps, sigma)) or not np.all(sigma > 0):
        raise artefact_error(path, "regress", "feature PCA: expected finite values and positive sigma")
    pca = FeaturePCA(mean, comps, sigma)
    net = Regressor(int(fields["num_outputs"]), int(fields["width"]), int(fields["depth"]), float(fields["dropout"]))
    params = traverse_util.unflatten_dict({tuple(k[len("param/"):].split("/")): jnp.asarray(v)
                                           for k, v in fields.items() if k.startswith("param/")})
    expected = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, pca.dim)))["params"])
    want = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(expected).items()}
    have = {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(params).items()}
    if want != have:
        diff = sorted(f"param/{k}: expected {want.get(k)}, found {have.get(k)}"
                      for k in want.keys() | have.keys() if want.get(k) != have.get(k))
        raise artefact_error(path, "regress", "weights do not match the stored sizes: " + "; ".join(diff[:5]))
    if not all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(params)):
        raise artefact_error(path, "regress", "weights contain NaN/Inf")
    extra = {k[len("extra/"):]: v.item() for k, v in fields.items() if k.startswith("extra/")}
    return pca, net, params, extra
