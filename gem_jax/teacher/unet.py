"""The teacher's UV-space generator: a StyleUNet-like encoder–decoder (docs/architecture.md §5).

GEM's teacher (GEM §3.1) is an improved Animatable Gaussians (Li et al. 2024, §3.2), whose
generator is a StyleUNet (Wang et al., StyleAvatar 2023): a convolutional encoder over an
input map, and a decoder of StyleGAN2 *modulated convolutions* (Karras et al. 2020, §2.2,
eqs. 1–3) with skip connections from the encoder:

    w'_{ijk} = s_i · w_{ijk},      w''_{ijk} = w'_{ijk} / sqrt(Σ_{i,k} w'_{ijk}² + ε)

with the per-input-channel style ``s = A(w)`` (an affine map of the style vector ``w``, bias 1).
We use the equivalent unfused form ``conv(x · s, W) · d`` with ``d_j = (Σ_{i,k} (s_i w_{ijk})² + ε)^-½``,
which needs no per-sample weights. The style vector is ``w = MLP(z)`` with ``z ~ N(0, I)`` in
training and ``z = 0`` at test (a fixed style), so the network learns to be robust to it.

:class:`TeacherNet` holds two branches:

* **geometry** — input: the tracked mesh's normal and/or position maps (root pose removed,
  :mod:`gem_jax.teacher.maps`) concatenated with a learned feature map; output ``11`` raw
  channels (Δposition 3, rotation 4, scale 3, opacity 1; :data:`~gem_jax.teacher.maps.RAW_CHANNELS`).
* **colour** — input: the *canonical* position map and its own learned feature map only, so
  colour is static per texel (the reason GEM keeps it out of the PCA); output 3 raw channels.

Output layers start at zero, so an untrained teacher renders exactly the canonical Gaussians.
Sizes come from the config (``teacher.unet``): 64² UV with a few channels on the quickstart,
256² on the full config.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["ModulatedConv", "StyleUNet", "TeacherNet"]

_LRELU = 0.2


def _lrelu(x):
    return nn.leaky_relu(x, _LRELU) * jnp.sqrt(2.0)  # StyleGAN's gain keeps activations at unit scale


class ModulatedConv(nn.Module):
    """StyleGAN2 modulated convolution (Karras et al. 2020, eqs. 1–3), stride 1, 'SAME' padding.

    ``x (B,H,W,C)``, ``w (B,D)`` → ``(B,H,W,features)``. ``demodulate=False`` and
    ``zero_init=True`` give the to-output layers (weights start at zero).
    """

    features: int
    kernel: int = 3
    demodulate: bool = True
    zero_init: bool = False

    @nn.compact
    def __call__(self, x: Float[Array, "B H W C"], w: Float[Array, "B D"]) -> Float[Array, "B H W F"]:
        c = x.shape[-1]
        init = nn.initializers.zeros if self.zero_init else nn.initializers.variance_scaling(
            1.0, "fan_in", "normal")
        kernel = self.param("kernel", init, (self.kernel, self.kernel, c, self.features), x.dtype)
        style = nn.Dense(c, bias_init=nn.initializers.ones, name="affine")(w)  # s = A(w), (B, C)
        y = jax.lax.conv_general_dilated(
            x * style[:, None, None, :], kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        if self.demodulate:
            # d_j = (Σ_{i,k} (s_i w_ijk)² + ε)^(-1/2), per sample and output channel (eq. 3).
            sq = jnp.einsum("bi,io->bo", style * style, jnp.sum(kernel * kernel, axis=(0, 1)))
            y = y * jax.lax.rsqrt(sq + 1e-8)[:, None, None, :]
        bias = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
        return y + bias


class StyleUNet(nn.Module):
    """Encoder (strided convs) → decoder (upsample, concat skip, two modulated convs) per level.

    ``channels[k]`` is the width at resolution ``R / 2^k``; the input resolution must be
    divisible by ``2^(len(channels) - 1)``. With ``style_dim = 0`` the decoder convs are plain
    (unmodulated) convolutions.
    """

    channels: Sequence[int]
    out_channels: int
    style_dim: int = 0

    @nn.compact
    def __call__(self, x: Float[Array, "B R R C"], style: Float[Array, "B D"] | None = None
                 ) -> Float[Array, "B R R O"]:
        levels = len(self.channels)
        res = x.shape[1]
        if x.shape[1] != x.shape[2] or res % (1 << (levels - 1)):
            raise ValueError(f"StyleUNet: input maps must be square with size divisible by "
                             f"{1 << (levels - 1)} ({levels} levels), got shape {x.shape}")
        if self.style_dim:
            if style is None or style.shape != (x.shape[0], self.style_dim):
                raise ValueError(f"StyleUNet: style must have shape ({x.shape[0]}, {self.style_dim}), "
                                 f"got {None if style is None else style.shape}")
            for i in range(2):  # the mapping network w = MLP(z)
                style = _lrelu(nn.Dense(self.style_dim, name=f"mapping_{i}")(style))
        else:
            style = jnp.ones((x.shape[0], 1), x.dtype)  # constant style: plain convolutions

        def conv(h, features, name, kernel=3, demodulate=True, zero_init=False):
            if self.style_dim:
                return ModulatedConv(features, kernel, demodulate, zero_init, name=name)(h, style)
            init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
            return nn.Conv(features, (kernel, kernel), kernel_init=init, name=name)(h)

        h = _lrelu(nn.Conv(self.channels[0], (3, 3), name="stem")(x))
        skips = [h]
        for k in range(1, levels):
            h = _lrelu(nn.Conv(self.channels[k], (3, 3), strides=(2, 2), name=f"down_{k}")(h))
            h = _lrelu(nn.Conv(self.channels[k], (3, 3), name=f"enc_{k}")(h))
            skips.append(h)
        h = skips.pop()
        for k in reversed(range(levels - 1)):
            b, r, _, c = h.shape
            h = jax.image.resize(h, (b, 2 * r, 2 * r, c), "nearest")
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = _lrelu(conv(h, self.channels[k], f"dec_{k}_a"))
            h = _lrelu(conv(h, self.channels[k], f"dec_{k}_b"))
        return conv(h, self.out_channels, "to_out", kernel=1, demodulate=False, zero_init=True)


class TeacherNet(nn.Module):
    """The two-branch teacher generator (module docstring).

    ``geometry(pose_maps (B,R,R,Cin), style (B,D)) -> (B,R,R,11)`` and
    ``color(canonical_map (R,R,3)) -> (R,R,3)``; ``__call__`` runs both (for ``init``).
    """

    resolution: int
    channels: Sequence[int]
    color_channels: Sequence[int]
    feature_channels: int = 8
    style_dim: int = 32
    geometry_out: int = 11

    def setup(self):
        shape = (self.resolution, self.resolution, self.feature_channels)
        init = nn.initializers.normal(0.1)
        self.geometry_features = self.param("geometry_features", init, shape)
        self.color_features = self.param("color_features", init, shape)
        self.geometry_net = StyleUNet(self.channels, self.geometry_out, self.style_dim)
        self.color_net = StyleUNet(self.color_channels, 3, 0)

    def geometry(self, pose_maps: Float[Array, "B R R C"], style: Float[Array, "B D"]) -> Float[Array, "B R R 11"]:
        feats = jnp.broadcast_to(self.geometry_features, pose_maps.shape[:1] + self.geometry_features.shape)
        return self.geometry_net(jnp.concatenate([pose_maps, feats.astype(pose_maps.dtype)], -1), style)

    def color(self, canonical_map: Float[Array, "R R 3"]) -> Float[Array, "R R 3"]:
        x = jnp.concatenate([canonical_map, self.color_features.astype(canonical_map.dtype)], -1)
        return self.color_net(x[None])[0]

    def __call__(self, pose_maps, style, canonical_map):
        return self.geometry(pose_maps, style), self.color(canonical_map)
