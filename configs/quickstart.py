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
    s.mesh_resolution = 60
    s.texture_size = 256
    t = c.teacher  # 64² UV (~3.5k Gaussians), 128² images: a few minutes on 2 CPU cores
    t.uv_resolution = 64
    t.unet.channels = (16, 32, 48, 64)
    t.unet.color_channels = (16, 32, 32)
    t.unet.style_dim = 16
    t.steps = 1200
    t.batch_size = 4
    t.lr = 2e-3
    t.warmup_steps = 50
    t.loss.vgg = 0.0  # the VGG perceptual term is off for speed (LPIPS is still evaluated)
    t.log_every = 10
    t.checkpoint_every = 100
    c.collect.batch_size = 8
    c.eval.max_images = 64  # per split, evenly spaced: all 48 held-out-camera images, 64 of 256 held-out-sequence
    f = c.fit
    f.steps = 150
    f.batch_size = 8
    r = c.refine  # 64² UV: refine U photometrically for a few hundred steps
    r.steps = 600
    r.batch_size = 4
    r.lr = 1e-5
    r.qr_every = 200
    r.loss.vgg = 0.0  # off for speed, as in the teacher
    r.log_every = 10
    r.checkpoint_every = 100
    g = c.regress
    g.crop_size = 96
    g.steps = 600
    g.batch_size = 8
    g.warmup_steps = 30
    g.log_every = 10
    g.checkpoint_every = 100
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
        t.uv_resolution = 16
        t.unet.channels = (8, 8)
        t.unet.color_channels = (8, 8)
        t.unet.feature_channels = 4
        t.unet.style_dim = 4
        t.steps = 2
        t.batch_size = 4
        t.warmup_steps = 1
        t.log_every = 1
        t.checkpoint_every = 1
        c.pca.components.update({"position": 2, "rotation": 2, "scale": 2, "opacity": 2})  # N − 1 = 2
        c.collect.batch_size = 4
        c.eval.max_images = 4
        c.eval.lpips = False
        c.eval.num_renders = 2
        f.steps = 3
        f.batch_size = 4
        r.steps = 3
        r.qr_every = 2
        r.log_every = 1
        r.checkpoint_every = 1
        r.val_images = 3
        g.crop_size = 32
        g.feature_dim = 4
        g.width = 16
        g.depth = 2
        g.steps = 3
        g.batch_size = 4
        g.warmup_steps = 1
        g.log_every = 1
        g.checkpoint_every = 1
    c.lock()
    return c
