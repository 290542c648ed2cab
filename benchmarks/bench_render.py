"""Coefficients → image frames per second of a GEM, per backend (docs/architecture.md §8; GEM Tab. 4's shape).

    python benchmarks/bench_render.py                                   # all cases (~3 min on 2 cores)
    python benchmarks/bench_render.py --texels 128 --components 10 --images 512x512 --repeats 50

For each UV resolution (128², 256² texels; ~86 % of the grid carries a Gaussian, as on the
quickstart head), components per modality (10/30/50) and image size (512², 550×802), a GEM is
built on a head-shaped shell (the scene of ``bench_rasterize.py``) with a random orthonormal
basis, and one jitted function runs the whole frame: ``G(k) = mean + (k·σ) @ U`` per modality,
the rigid head pose, and the rasterizer with a fixed capacity. Timed: a new coefficient vector
per frame, ``block_until_ready``, median of ``--repeats`` after ``--warmup``; "cpu ms" is the
median process CPU time (all threads) of a frame, which other processes on a shared machine
disturb far less than the wall time. The model size is the float32 file size of that GEM.
Prints a Markdown table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_rasterize import head_scene  # noqa: E402

from gem_jax.eigen.model import GEM, size_mb  # noqa: E402
from gem_jax.eigen.pca import CHANNELS, MODALITIES  # noqa: E402
from gem_jax.eigen.render import world_gaussians  # noqa: E402
from gem_jax.render import available_backends, count_intersections, rasterize  # noqa: E402
from gem_jax.types import Camera  # noqa: E402

VALID_FRACTION = 0.86


def synthetic_gem(texels: int, components: int, seed: int = 0) -> GEM:
    """A GEM with ``VALID_FRACTION · texels²`` Gaussians on a head shell and a random basis."""
    rng = np.random.default_rng(seed)
    n = int(VALID_FRACTION * texels * texels)
    g, _, _ = head_scene(n, 512, seed)
    flat = np.flatnonzero(rng.permutation(texels * texels) < n)
    values = {"position": np.asarray(g.means), "rotation": np.asarray(g.quats), "scale": np.asarray(g.scales),
              "opacity": np.asarray(g.opacities)[:, None]}
    spread = {"position": 0.002, "rotation": 0.05, "scale": 0.0005, "opacity": 0.05}  # per-Gaussian std
    mean, sigma, U = {}, {}, {}
    for m in MODALITIES:
        d = n * CHANNELS[m]
        q, _ = np.linalg.qr(rng.normal(size=(d, components)))
        mean[m] = jnp.asarray(values[m].reshape(-1), jnp.float32)
        U[m] = jnp.asarray(q.T, jnp.float32)
        sigma[m] = jnp.asarray(spread[m] * np.sqrt(n) * np.linspace(1.0, 0.1, components), jnp.float32)
    texel_rc = np.stack([flat // texels, flat % texels], -1).astype(np.int32)
    return GEM(mean, sigma, U, jnp.asarray(g.colors), jnp.asarray(texel_rc), (texels, texels))


def camera(width: int, height: int) -> Camera:
    viewmat = np.eye(4, dtype=np.float32)
    viewmat[2, 3] = 0.6
    f = height / (2 * np.tan(np.deg2rad(14)))
    K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], np.float32)
    return Camera(jnp.asarray(viewmat), jnp.asarray(K), width, height)


def fps(model: GEM, cam: Camera, backend: str, warmup: int, repeats: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ks = [jnp.asarray(rng.uniform(-1, 1, model.total_components), jnp.float32) for _ in range(8)]
    pose = jnp.eye(4)
    capacity = int(1.25 * max(count_intersections(world_gaussians(model, k, pose), cam) for k in ks[:2])) + 256

    @jax.jit
    def frame(model, k):
        g = world_gaussians(model, k, pose, clamp=None)
        return rasterize(g, cam, jnp.ones(3), backend=backend, capacity=capacity).image

    start = time.perf_counter()
    frame(model, ks[0]).block_until_ready()
    compile_s = time.perf_counter() - start
    for i in range(warmup):
        frame(model, ks[i % len(ks)]).block_until_ready()
    times, cpu = [], []
    for i in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        frame(model, ks[i % len(ks)]).block_until_ready()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    median = statistics.median(times)
    return {"fps": 1.0 / median, "ms": 1e3 * median, "cpu_ms": 1e3 * statistics.median(cpu), "compile_s": compile_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texels", default="128,256")
    p.add_argument("--components", default="10,30,50", help="per modality")
    p.add_argument("--images", default="512x512,550x802", help="WIDTHxHEIGHT list")
    p.add_argument("--backends", default=",".join(b for b in available_backends() if b != "dense"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="benchmarks/out/render.json")
    args = p.parse_args(argv)
    backends = args.backends.split(",")
    rows = []
    for texels in (int(t) for t in args.texels.split(",")):
        for comps in (int(c) for c in args.components.split(",")):
            model = synthetic_gem(texels, comps)
            for size in args.images.split(","):
                w, h = (int(v) for v in size.split("x"))
                row = {"texels": texels, "gaussians": model.num_gaussians, "components": comps,
                       "width": w, "height": h, "mb_float32": size_mb(model)}
                row.update({b: fps(model, camera(w, h), b, args.warmup, args.repeats) for b in backends})
                rows.append(row)
                print(json.dumps(row), flush=True)
    device = f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()}, {jax.device_count()} device)"
    lines = [f"GEM render speed (coefficients → image), {device}, median of {args.repeats}", "",
             "| texels | Gaussians | components/modality | image | MB fp32 | " +
             " | ".join(f"fps {b} | cpu ms {b}" for b in backends) + " |",
             "|---|---|---|---|---|" + "---|---|" * len(backends)]
    for r in rows:
        lines.append(f"| {r['texels']}² | {r['gaussians']} | {r['components']} | {r['width']}×{r['height']} | "
                     f"{r['mb_float32']:.1f} | " +
                     " | ".join(f"{r[b]['fps']:.1f} | {r[b]['cpu_ms']:.1f}" for b in backends) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": device, "rows": rows, "table": table}, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
