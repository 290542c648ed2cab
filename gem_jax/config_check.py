"""Check a config once, before any stage runs (docs/architecture.md §10).

``python -m gem_jax.train`` (and :func:`gem_jax.train.run`) calls :func:`check_config` first, so
a value out of range fails at once with a :class:`~gem_jax.errors.ConfigError` that names the
field, what it expects and what it found, instead of minutes later inside optax, a jitted loss
or a reshape. The rules are the table :data:`RULES` (one line per field) plus the few that
relate two fields (:func:`_relations`): the held-out camera exists, the UV resolution halves
cleanly through the U-Net, and every data-parallel batch splits evenly over the devices.

Edge values that are valid work pass: ``teacher.steps=1`` trains one step, ``warmup_steps``
larger than ``steps`` is cut to ``steps − 1`` (:mod:`gem_jax.schedules`), ``eval.max_images=0``
means all images.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable

from gem_jax.errors import ConfigError

__all__ = ["RULES", "SHARDED_BATCHES", "check_config", "load_config_file"]

Check = Callable[[object], str | None]  # value -> None if fine, else what was expected


def integer(lo: int | None = None, hi: int | None = None) -> Check:
    def check(v):
        bad = isinstance(v, bool) or not isinstance(v, int)
        if bad or (lo is not None and v < lo) or (hi is not None and v > hi):
            bounds = " and ".join(s for s in (f">= {lo}" if lo is not None else "",
                                             f"<= {hi}" if hi is not None else "") if s)
            return f"an integer {bounds}".rstrip()
        return None
    return check


def number(lo: float | None = None, hi: float | None = None, *, above: bool = False) -> Check:
    """A finite real; ``above=True`` makes ``lo`` exclusive."""
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (lo is None or (v > lo if above else v >= lo)) and (hi is None or v <= hi)
        if not ok:
            parts = [f"{'>' if above else '>='} {lo:g}" if lo is not None else "",
                     f"<= {hi:g}" if hi is not None else ""]
            return ("a finite number " + " and ".join(p for p in parts if p)).rstrip()
        return None
    return check


def one_of(*options) -> Check:
    return lambda v: None if v in options else f"one of {list(options)}"


def boolean(v) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def ints(lo: int) -> Check:
    def check(v):
        if not isinstance(v, (tuple, list)) or not v or any(integer(lo)(x) for x in v):
            return f"a non-empty tuple of integers >= {lo}"
        return None
    return check


def colour(v) -> str | None:
    ok = isinstance(v, (tuple, list)) and len(v) == 3 and all(number(0, 1)(x) is None for x in v)
    return None if ok else "three numbers in [0, 1] (r, g, b)"


POSITIVE, WEIGHT, FRACTION = number(0, above=True), number(0), number(0, 1)
COUNT, AT_LEAST_ONE = integer(0), integer(1)
_TRAINING = {  # the fields every training stage shares
    "steps": AT_LEAST_ONE, "batch_size": AT_LEAST_ONE, "lr": POSITIVE, "log_every": AT_LEAST_ONE,
    "checkpoint_every": AT_LEAST_ONE,
}

#: field -> check. Fields a config leaves out are reported as missing.
RULES: dict[str, Check] = {
    "seed": integer(0),
    "data.subject_dir": lambda v: None if isinstance(v, str) else "a path string ('' = synthetic)",
    "data.head_model": lambda v: None if isinstance(v, str) else "a path string ('' = the subject's)",
    "data.background": colour, "data.n_shape": COUNT, "data.n_expr": COUNT,
    "synthetic.identity": COUNT, "synthetic.cross_identity": integer(-1), "synthetic.num_cameras": integer(2),
    "synthetic.held_out_camera": COUNT, "synthetic.num_sequences": integer(2),
    "synthetic.frames_per_sequence": integer(2), "synthetic.image_height": integer(8),
    "synthetic.image_width": integer(8), "synthetic.supersample": AT_LEAST_ONE,
    "synthetic.mesh_resolution": integer(8), "synthetic.texture_size": integer(16),
    "render.backend": one_of("auto", "reference", "dense", "cpu", "cuda", "cuda-emulated"),
    **{f"teacher.{k}": v for k, v in _TRAINING.items()},
    "teacher.uv_resolution": integer(4), "teacher.position_input_scale": POSITIVE, "teacher.delta_scale": POSITIVE,
    "teacher.scale_factor": POSITIVE, "teacher.normal_ratio": POSITIVE, "teacher.unet.channels": ints(1),
    "teacher.unet.color_channels": ints(1), "teacher.unet.feature_channels": COUNT,
    "teacher.unet.style_dim": AT_LEAST_ONE, "teacher.style_std": WEIGHT, "teacher.warmup_steps": COUNT,
    "teacher.end_lr_factor": FRACTION, "teacher.clip_norm": POSITIVE, "teacher.random_background": boolean,
    **{f"teacher.loss.{k}": WEIGHT for k in ("l1", "mouth", "dssim", "vgg", "offset", "scale")},
    "teacher.capacity_headroom": number(1), "teacher.keep_checkpoints": AT_LEAST_ONE,
    "teacher.max_bad_steps": AT_LEAST_ONE,
    "collect.batch_size": AT_LEAST_ONE,
    **{f"pca.components.{m}": AT_LEAST_ONE for m in ("position", "rotation", "scale", "opacity")},
    "pca.method": one_of("auto", "svd", "gram"), "pca.dtype": one_of("float32", "float16"),
    "fit.steps": AT_LEAST_ONE, "fit.batch_size": AT_LEAST_ONE, "fit.lr": POSITIVE, "fit.pose": boolean,
    "fit.prior": WEIGHT, "fit.l1": WEIGHT, "fit.dssim": WEIGHT,
    "eval.max_images": COUNT, "eval.lpips": boolean, "eval.num_renders": COUNT, "eval.batch_size": AT_LEAST_ONE,
    "eval.train_images": COUNT,
    **{f"refine.{k}": v for k, v in _TRAINING.items()},
    "refine.end_lr_factor": FRACTION, "refine.qr_every": AT_LEAST_ONE, "refine.random_background": boolean,
    **{f"refine.loss.{k}": WEIGHT for k in ("l1", "dssim", "vgg", "anchor")},
    "refine.val_cameras": COUNT, "refine.val_images": AT_LEAST_ONE, "refine.capacity_headroom": number(1),
    "refine.keep_checkpoints": AT_LEAST_ONE, "refine.max_bad_steps": AT_LEAST_ONE,
    **{f"regress.{k}": v for k, v in _TRAINING.items()},
    "regress.features": one_of("vgg", "landmarks", "precomputed"), "regress.crop_size": integer(16),
    "regress.crop_margin": POSITIVE, "regress.feature_dim": AT_LEAST_ONE, "regress.width": AT_LEAST_ONE,
    "regress.depth": AT_LEAST_ONE, "regress.dropout": number(0, 1), "regress.warmup_steps": COUNT,
    "regress.end_lr_factor": FRACTION, "regress.weight_decay": WEIGHT, "regress.clip_norm": POSITIVE,
    **{f"regress.loss.{k}": WEIGHT for k in ("l1", "dssim", "coeff", "prior")},
}

#: Batches split over the ``('data',)`` mesh of every device (gem_jax.parallel).
SHARDED_BATCHES = ("teacher.batch_size", "refine.batch_size", "regress.batch_size")

_MISSING = object()


def _get(config, dotted: str):
    node = config
    for part in dotted.split("."):
        try:
            node = node[part]
        except (KeyError, TypeError, AttributeError):
            return _MISSING
    return node


def _fail(field: str, expected: str, found) -> ConfigError:
    return ConfigError(f"config field {field}: expected {expected}, found {found!r} "
                       f"(set it with --config.{field}=...)")


def _relations(config, devices: int) -> None:
    cams, held = _get(config, "synthetic.num_cameras"), _get(config, "synthetic.held_out_camera")
    if held >= cams:
        raise _fail("synthetic.held_out_camera", f"a camera index below synthetic.num_cameras={cams}", held)
    res = _get(config, "teacher.uv_resolution")
    for field in ("teacher.unet.channels", "teacher.unet.color_channels"):
        levels = len(_get(config, field))
        if res % (1 << (levels - 1)):
            raise _fail("teacher.uv_resolution", f"a multiple of 2^{levels - 1} (the {levels} levels of {field})", res)
    for field in SHARDED_BATCHES:
        size = _get(config, field)
        if size % devices:
            raise _fail(field, f"a multiple of the {devices} devices (each device gets an equal share)", size)


def check_config(config, devices: int | None = None) -> None:
    """Raise :class:`ConfigError` for the first field that breaks :data:`RULES` or a relation.

    ``devices``: the number of devices the data-parallel batches are split over (default:
    ``jax.device_count()``, every device of every process).
    """
    for field, check in RULES.items():
        value = _get(config, field)
        if value is _MISSING:
            raise ConfigError(f"config field {field}: missing (every config starts from configs/common.py)")
        expected = check(value)
        if expected:
            raise _fail(field, expected, value)
    if devices is None:
        import jax

        devices = jax.device_count()
    _relations(config, int(devices))


def load_config_file(spec: str):
    """The checked config of ``"configs/NAME.py[:arg]"`` (what ``--config`` takes), for scripts
    that read a run's settings without going through ``python -m gem_jax.train``."""
    file, _, arg = str(spec).partition(":")
    module_spec = importlib.util.spec_from_file_location("gem_jax_config_file", file)
    if module_spec is None:
        raise ConfigError(f"--config {spec}: {file} is not a Python config file (configs/*.py)")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    check_config(config)
    return config
