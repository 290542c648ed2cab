"""Learning-rate schedules of the training stages, defined for every valid step count.

``optax.warmup_cosine_decay_schedule(0, lr, warmup, steps, lr·end)`` needs ``steps > warmup``:
one training step, or a warm-up as long as the run, raises inside optax. :func:`warmup_cosine`
is the same schedule (linear warm-up from 0, then cosine decay to ``lr · end_factor`` at
``steps``) with the warm-up cut to ``steps − 1``, so ``steps = 1`` is a single step at ``lr``
(no warm-up) and ``steps`` below 1 is refused by the config check
(:mod:`gem_jax.config_check`) before any stage runs.
"""

from __future__ import annotations

import optax

__all__ = ["warmup_cosine"]


def warmup_cosine(lr: float, steps: int, warmup: int, end_factor: float) -> optax.Schedule:
    """Linear warm-up ``0 → lr`` over ``min(warmup, steps − 1)`` steps, then cosine decay to
    ``lr · end_factor`` at ``steps`` (``optax.warmup_cosine_decay_schedule`` where both agree)."""
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"warmup_cosine: steps must be >= 1, got {steps}")
    warmup = min(max(int(warmup), 0), steps - 1)
    decay = optax.cosine_decay_schedule(float(lr), steps - warmup, float(end_factor))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, float(lr), warmup), decay], [warmup])
