"""Orthonormal bases: QR re-orthonormalisation, sign conventions, subspace distances.

GEM (Zielonka et al., CVPR 2025, arXiv 2407.04545) keeps each eigenbasis ``U (K, D)`` with
orthonormal rows, so that the eigen model ``G(k) = mean + (k·σ) @ U`` (paper §3, the linear
Gaussian model) has uncorrelated, σ-normalised coefficients. During the photometric
refinement of the basis (paper §3.2, docs/architecture.md §6) gradient steps drift ``U`` off the Stiefel
manifold; every 1,000 steps it is pulled back with a QR decomposition:

    Uᵀ = Q R,   U ← Qᵀ,   signs chosen so that diag(R) > 0.

With diag(R) > 0 the result is the Gram–Schmidt orthonormalisation of the rows in order:
row ``i`` of the output lies in the span of input rows ``0..i`` and has a positive inner
product with input row ``i``. That is the property refinement needs: each coefficient keeps
its meaning (no row flips sign or swaps), and an already orthonormal ``U`` is returned
unchanged (to rounding). Signs are therefore deterministic *relative to the input*: flipping
an input row flips exactly that output row. Where a sign convention independent of the input
signs is wanted (PCA output, exported bases), pass ``canonical_signs=True`` or call
:func:`canonicalize_row_signs`: the largest-magnitude entry of every row is made positive
(first such entry on ties), so sign-flipped inputs give the identical output.

Everything here is pure ``jnp`` and jittable; nothing materialises a ``D×D`` matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float


def row_signs(U: Float[Array, "K D"]) -> Float[Array, "K"]:
    """±1 per row such that ``row_signs(U)[:, None] * U`` has its largest-|·| entry positive.

    The sign convention of the PCA (:mod:`gem_jax.eigen.pca`): deterministic for a given
    subspace and eigenvalue order, and invariant to the sign of the input rows. Ties in
    magnitude are broken by the first index (``argmax``).
    """
    idx = jnp.argmax(jnp.abs(U), axis=-1)
    pivot = jnp.take_along_axis(U, idx[:, None], axis=-1)[:, 0]
    return jnp.where(pivot < 0, -1.0, 1.0).astype(U.dtype)


def canonicalize_row_signs(U: Float[Array, "K D"]) -> Float[Array, "K D"]:
    """Flip rows so that each row's largest-magnitude entry is positive (see :func:`row_signs`)."""
    return U * row_signs(U)[:, None]


@jax.jit
def _qr_rows(U: Float[Array, "K D"]) -> Float[Array, "K D"]:
    q, r = jnp.linalg.qr(U.T, mode="reduced")  # (D, K), (K, K)
    d = jnp.diagonal(r)
    s = jnp.where(d < 0, -1.0, 1.0).astype(U.dtype)  # diag(R) > 0; a zero pivot keeps +1
    return (q * s[None, :]).T


def orthonormalize_rows(U: Float[Array, "K D"], *, canonical_signs: bool = False) -> Float[Array, "K D"]:
    """Re-orthonormalise the rows of ``U`` by QR: ``Uᵀ = QR``, return ``Qᵀ`` with diag(R) > 0.

    Keeps the span of the rows (for full-rank ``U``) and gives ``U' U'ᵀ = I`` to float32
    rounding (about 1e-6). Row ``i`` of the result is the Gram–Schmidt orthonormalisation of
    input row ``i`` against rows ``0..i-1``, so row order and signs follow the input — the
    behaviour the basis refinement (docs/architecture.md §6) needs to keep the meaning of each coefficient.

    Args:
      U: ``(K, D)`` with ``K <= D`` and linearly independent rows. Rank-deficient input gives
        rows that are not unit length (they are whatever LAPACK returns for a zero pivot).
      canonical_signs: additionally apply :func:`canonicalize_row_signs`, making the result
        independent of the input rows' signs (identical output for sign-flipped rows).

    Returns:
      ``(K, D)`` with orthonormal rows, same dtype as ``U``.
    """
    U = jnp.asarray(U)
    if U.ndim != 2:
        raise ValueError(f"orthonormalize_rows: expected U of shape (K, D), got {U.shape}")
    if U.shape[0] > U.shape[1]:
        raise ValueError(f"orthonormalize_rows: need K <= D to have K orthonormal rows, got U {U.shape}")
    out = _qr_rows(U)
    return canonicalize_row_signs(out) if canonical_signs else out


def orthonormality_error(U: Float[Array, "K D"]) -> Float[Array, ""]:
    """``max |U Uᵀ − I|`` — how far the rows are from orthonormal (a refinement diagnostic)."""
    gram = jnp.matmul(U, U.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.max(jnp.abs(gram - jnp.eye(U.shape[0], dtype=U.dtype)))


def subspace_distance(U1: Float[Array, "K D"], U2: Float[Array, "L D"]) -> Float[Array, ""]:
    """sin of the largest principal angle from the row space of ``U1`` to that of ``U2``.

    Both inputs have orthonormal rows (``K <= L``). The residual of ``U1`` after projecting
    onto the row space of ``U2``, ``R = U1 − (U1 U2ᵀ) U2``, has singular values
    ``sin θ_i`` of the principal angles (Björck & Golub 1973); taking them from ``R`` rather
    than as ``sqrt(1 − cos²)`` keeps small angles accurate in float32. 0 for equal spans, 1
    when some direction of ``U1`` is orthogonal to ``U2``. Used to log how far refinement has
    moved a basis; costs ``O(K·L·D)``, never ``D×D``.
    """
    hi = jax.lax.Precision.HIGHEST
    c = jnp.matmul(U1, U2.T, precision=hi)
    resid = U1 - jnp.matmul(c, U2, precision=hi)
    return jnp.linalg.svd(resid, compute_uv=False)[0]
