"""Shared config skeleton: every stage's sub-dict with defaults for the full size.

`quickstart.py` and `synthetic.py` start from :func:`base_config` and shrink or keep it.
Each stage receives only its own sub-dict (``config.teacher``, ``config.pca``, ...).
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parse ``"key=value,flag"`` config arguments (big_vision style), e.g. ``tiny``."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        if "=" in item:
            key, value = item.split("=", 1)
            out[key] = type(defaults.get(key, value))(value)
        else:
            out[item] = True
    return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.name = "base"

    # Subject data (DESIGN §4). subject_dir=None → <workdir>/data, written by the generator.
    c.data = ml_collections.ConfigDict()
    c.data.subject_dir = ""  # a VHAP/GaussianAvatars export; empty → synthetic in <workdir>/data
    c.data.head_model = ""  # FLAME .pkl/.npz; empty → the synthetic head model written with the data
    c.data.background = (1.0, 1.0, 1.0)  # white, as in the evaluation protocol
    c.data.n_shape = 0  # FLAME shape components used (0 → all the model has)
    c.data.n_expr = 0  # FLAME expression components used (0 → all the model has)

    # The embedded synthetic subject generator.
    c.synthetic = ml_collections.ConfigDict()
    c.synthetic.identity = 0  # which procedural identity is the subject
    c.synthetic.cross_identity = 1  # a second identity performing the held-out sequence (cross-identity GT)
    c.synthetic.num_cameras = 16
    c.synthetic.held_out_camera = 8  # NeRSemble protocol: one camera for novel view
    c.synthetic.num_sequences = 4  # the last one is held out for novel expression
    c.synthetic.frames_per_sequence = 40
    c.synthetic.image_height = 512
    c.synthetic.image_width = 512
    c.synthetic.supersample = 2  # anti-aliasing factor of the mesh renderer
    c.synthetic.mesh_resolution = 96  # latitude bands of the procedural head
    c.synthetic.texture_size = 512

    # Rasterizer (DESIGN §9).
    c.render = ml_collections.ConfigDict()
    c.render.backend = "auto"

    return c
