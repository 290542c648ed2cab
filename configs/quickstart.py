"""Quickstart: the whole pipeline on the embedded synthetic subject on a 2-core CPU.

    python -m gem_jax.train --config configs/quickstart.py --workdir runs/q --stage all

``--config configs/quickstart.py:tiny`` shrinks everything further (tests, notebooks).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import base_config, parse_arg  # noqa: E402


def get_config(arg: str | None = None):
    args = parse_arg(arg, tiny=False)
    c = base_config()
    c.name = "quickstart"
    s = c.synthetic
    s.num_cameras = 16
    s.held_out_camera = 8
    s.num_sequences = 4
    s.frames_per_sequence = 16
    s.image_height = 128
    s.image_width = 128
    s.mesh_resolution = 64
    s.texture_size = 256
    if args.tiny:
        c.name = "quickstart_tiny"
        s.num_cameras = 4
        s.held_out_camera = 2
        s.num_sequences = 2
        s.frames_per_sequence = 3
        s.image_height = 48
        s.image_width = 48
        s.mesh_resolution = 24
        s.texture_size = 64
        s.supersample = 1
    c.lock()
    return c
