"""Full-size synthetic subject, for a GPU.

    python -m gem_jax.train --config configs/synthetic.py --workdir runs/synthetic --stage all
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from common import base_config, parse_arg  # noqa: E402


def get_config(arg: str | None = None):
    parse_arg(arg)
    c = base_config()
    c.name = "synthetic"
    c.lock()
    return c
