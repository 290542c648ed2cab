"""Which examples a step uses, and fixed-shape chunks (docs/architecture.md §3).

* :func:`sample_rows` — the rows of a training step's global batch, drawn from
  ``np.random.default_rng(seed_sequence)`` (the sequence holds the run's seed, a per-stage
  stream number and the step), so every process, a resumed run and a sharded run draw the
  same batch.
* :func:`padded_chunks` — ``range(num)`` cut into chunks of ``size``, the last one padded by
  repeating its final row, so a jitted function sees one shape and compiles once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

__all__ = ["padded_chunks", "sample_rows"]


def sample_rows(num: int, size: int, seed_sequence: Sequence[int]) -> np.ndarray:
    """``size`` row indices into ``num`` examples (with replacement only when ``num < size``)."""
    if num <= 0:
        raise ValueError(f"sample_rows: no examples to draw {size} from")
    rng = np.random.default_rng([int(s) for s in seed_sequence])
    return rng.choice(num, size=size, replace=num < size)


def padded_chunks(num: int, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(rows, padded)`` per chunk: ``rows`` the real indices, ``padded`` of length ``size``."""
    size = max(int(size), 1)
    for start in range(0, num, size):
        rows = np.arange(start, min(start + size, num))
        yield rows, np.concatenate([rows, np.full(size - len(rows), rows[-1])])
