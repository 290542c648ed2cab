"""Core pytrees shared by every stage (docs/architecture.md §3).

* :class:`Gaussians` — a set of activated 3D Gaussians, names as in gsplat.
* :class:`Camera` — a pinhole camera in OpenCV conventions (x right, y down, z forward),
  world→camera ``viewmat``; pixel centres sit at ``j + 0.5``.

Both are ``flax.struct`` dataclasses, so they pass through ``jit``/``vmap``/``grad``.
Image sizes are static (``pytree_node=False``): a batch of cameras shares one size.
"""

from __future__ import annotations

import flax.struct
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float


@flax.struct.dataclass
class Gaussians:
    """Activated Gaussians: ``quats`` wxyz (normalised), ``scales`` > 0, ``opacities`` in (0, 1)."""

    means: Float[Array, "*batch N 3"]
    quats: Float[Array, "*batch N 4"]
    scales: Float[Array, "*batch N 3"]
    opacities: Float[Array, "*batch N"]
    colors: Float[Array, "*batch N 3"]

    @property
    def num(self) -> int:
        return self.means.shape[-2]

    def validate(self, where: str = "Gaussians") -> "Gaussians":
        """Check shapes eagerly; raise ValueError naming the field and expected shape."""
        n = np.shape(self.means)[-2] if np.ndim(self.means) >= 2 else None
        expected = {"means": 3, "quats": 4, "scales": 3, "colors": 3}
        for name, width in expected.items():
            shape = np.shape(getattr(self, name))
            if len(shape) < 2 or shape[-1] != width or shape[-2] != n:
                raise ValueError(f"{where}.{name}: expected shape (N, {width}) with N={n}, got {shape}")
        shape = np.shape(self.opacities)
        if len(shape) < 1 or shape[-1] != n:
            raise ValueError(f"{where}.opacities: expected shape (N,) with N={n}, got {shape}")
        return self


@flax.struct.dataclass
class Camera:
    """Pinhole camera: ``viewmat`` (4,4) world→camera in OpenCV axes, intrinsics ``K`` (3,3)."""

    viewmat: Float[Array, "*batch 4 4"]
    K: Float[Array, "*batch 3 3"]
    width: int = flax.struct.field(pytree_node=False, default=0)
    height: int = flax.struct.field(pytree_node=False, default=0)

    def validate(self, where: str = "Camera") -> "Camera":
        if np.shape(self.viewmat)[-2:] != (4, 4):
            raise ValueError(f"{where}.viewmat: expected shape (4, 4), got {np.shape(self.viewmat)}")
        if np.shape(self.K)[-2:] != (3, 3):
            raise ValueError(f"{where}.K: expected shape (3, 3), got {np.shape(self.K)}")
        if int(self.width) <= 0 or int(self.height) <= 0:
            raise ValueError(f"{where}: width and height must be positive, got {self.width}x{self.height}")
        return self

    @property
    def center(self) -> Float[Array, "*batch 3"]:
        """Camera centre in world coordinates."""
        rot = self.viewmat[..., :3, :3]
        t = self.viewmat[..., :3, 3]
        return -jnp.einsum("...ji,...j->...i", rot, t)


def stack_cameras(cameras: list[Camera]) -> Camera:
    """Stack cameras of one image size into a batched :class:`Camera` (for ``vmap``)."""
    sizes = {(c.width, c.height) for c in cameras}
    if len(sizes) != 1:
        raise ValueError(f"stack_cameras: all cameras must share one image size, got {sorted(sizes)}")
    width, height = sizes.pop()
    return Camera(
        viewmat=jnp.stack([jnp.asarray(c.viewmat) for c in cameras]),
        K=jnp.stack([jnp.asarray(c.K) for c in cameras]),
        width=width,
        height=height,
    )
