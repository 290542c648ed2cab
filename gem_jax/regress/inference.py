"""Driving an avatar from face images with the trained regressor: inference only (docs/architecture.md §7).

    regressor = TrainedRegressor.load(workdir / "regress" / REGRESSOR_FILE)
    k = regressor.predict(features - features[neutral])    # (F, ΣK) in σ units, |k| ≤ 2.9

The regressor file holds the feature PCA, the MLP and the feature extractor's name and crop
size (:func:`gem_jax.regress.model.save_regressor`). :func:`predict` is compiled once per
network (the flax module is the static argument), not once per call.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from gem_jax.regress.model import FeaturePCA, Regressor, load_regressor

__all__ = ["REGRESSOR_FILE", "TrainedRegressor", "neutral_timestep", "predict"]

REGRESSOR_FILE = "regressor.npz"


@functools.partial(jax.jit, static_argnums=0)
def _apply(net: Regressor, params, x):
    return net.apply({"params": params}, x)


def predict(net: Regressor, params, pca: FeaturePCA, relative: Float[np.ndarray, "B F"]) -> np.ndarray:
    """``(B, ΣK)`` coefficients of relative features (eval mode: no dropout)."""
    return np.asarray(_apply(net, params, jnp.asarray(pca.transform(relative))))


def neutral_timestep(subject, timesteps) -> int:
    """The timestep whose tracked expression and jaw pose are closest to zero."""

    def energy(t):
        p = subject.flame_params(int(t))
        return float(np.sum(np.square(p.expr)) + np.sum(np.square(p.jaw_pose)))

    return int(min(sorted(set(int(t) for t in timesteps)), key=energy))


@dataclasses.dataclass(frozen=True)
class TrainedRegressor:
    """A regressor read from its file, with the feature extractor it was trained on."""

    pca: FeaturePCA
    net: Regressor
    params: dict
    extra: dict

    @classmethod
    def load(cls, path: str | Path) -> "TrainedRegressor":
        return cls(*load_regressor(path))

    @property
    def crop_size(self) -> int:
        return int(self.extra.get("crop_size", 112))

    def extractor(self):
        """The feature extractor of training (:func:`gem_jax.regress.features.make_extractor`)."""
        from gem_jax.regress.features import make_extractor

        return make_extractor(str(self.extra.get("features", "vgg")), crop_size=self.crop_size)

    def predict(self, relative: Float[np.ndarray, "B F"]) -> np.ndarray:
        return predict(self.net, self.params, self.pca, relative)
