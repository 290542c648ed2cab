"""Benchmark: the synthetic subject with many more timesteps than components (K ≪ N).

    python -m gem_jax.train --config configs/benchmark.py --workdir runs/b --stage all
    python benchmarks/bench_ablation.py --workdir runs/b

The quickstart has 48 training timesteps, so its PCA keeps K ≈ N − 1 components and is
lossless on them; none of GEM's findings about compression can show there. Here 6 training
sequences × 52 frames = 312 training timesteps (the four named sequences plus two random
mixes of expressions, :func:`gem_jax.data.synthetic.make_sequences`), the held-out
``FREE-mixed`` sequence (52 frames × 16 cameras) and the held-out camera 8, at the
quickstart's image size (128²) and Gaussian count (64² UV). The teacher trains 2.5× the
quickstart's steps. Everything (``--stage all``) is sized for about 30 minutes on 2 CPU cores;
the README gives each stage's measured wall time.

``--config configs/benchmark.py:tiny`` has the same shape in miniature (tests).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import parse_arg  # noqa: E402
from quickstart import get_config as quickstart_config  # noqa: E402


def get_config(arg: str | None = None):
    args = parse_arg(arg, tiny=False)
    c = quickstart_config("tiny" if args.tiny else None)
    c.unlock()
    c.name = "benchmark_tiny" if args.tiny else "benchmark"
    s, t, f, r, g, e = c.synthetic, c.teacher, c.fit, c.refine, c.regress, c.eval
    if args.tiny:
        s.num_sequences = 7  # 6 training sequences (4 named + 2 mixes) + the held-out one
        s.frames_per_sequence = 2
        c.pca.components.update({"position": 5, "rotation": 5, "scale": 5, "opacity": 5})  # K < N − 1 = 11
        c.lock()
        return c
    s.num_sequences = 7
    s.frames_per_sequence = 52  # 312 training timesteps
    t.steps = 3000
    t.warmup_steps = 100
    t.checkpoint_every = 250
    e.max_images = 104  # per split, evenly spaced: 104 of the 312 held-out-camera images, 104 of 832 test images
    f.steps = 300  # 52 held-out timesteps, ~2 images each
    r.steps = 1000
    r.qr_every = 250
    r.checkpoint_every = 250
    g.steps = 1500
    g.checkpoint_every = 250
    c.lock()
    return c
