"""gem_jax — Gaussian Eigen Models for human heads (GEM, CVPR 2025) in JAX.

``gem_jax.load(workdir)`` returns a trained avatar (:class:`gem_jax.avatar.Avatar`).
"""

__version__ = "0.1.0"


def load(workdir, stage=None):
    """The avatar of a work directory (see :func:`gem_jax.avatar.load`)."""
    from gem_jax.avatar import load as _load

    return _load(workdir, stage)


__all__ = ["load"]
