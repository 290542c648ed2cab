"""gem_jax — Gaussian Eigen Models for human heads (GEM, CVPR 2025) in JAX."""

__version__ = "0.1.0"
