"""Rasterizer timings: Gaussians × resolution → ms forward and forward+backward, per backend.

    python benchmarks/bench_rasterize.py                       # defaults (~2 min on 2 cores)
    python benchmarks/bench_rasterize.py --sizes 3000@128,16000@512,60000@512 \\
        --backends reference,cpu --repeats 10 --out results.json
    python benchmarks/bench_rasterize.py --sizes 16000@512,65000@550x802,500000@1920x1080 \\
        --backends cuda,reference                                # on a GPU (benchmarks/gpu_check.sh)
    python benchmarks/bench_rasterize.py --sizes 16000@512 --profile   # + C++ phase times

``--sizes`` items are ``GAUSSIANS@RESOLUTION`` (square) or ``GAUSSIANS@WIDTHxHEIGHT``;
``--backends`` defaults to every available one except ``dense`` (an oracle for tiny scenes)
and ``cuda-emulated`` (a test backend: the CUDA kernel run thread by thread on the CPU).
``--plan`` prints the runs it would make and exits.

The scene is a head-sized shell of Gaussians (an ellipsoid surface with some thickness, as a
GEM avatar is) seen from the front so that it fills about 60 % of the image; Gaussian sizes
follow the surface density (N Gaussians tile the shell), opacities are uniform in (0.1, 1).
Each backend's ``rasterize`` is jitted with a fixed capacity (exact count + 10 %), timed as
the median of ``--repeats`` runs after ``--warmup`` runs, each ended by ``block_until_ready``;
forward+backward is ``jax.grad`` of an image loss w.r.t. all Gaussian parameters. Compile
time (first call) is reported separately, and each backend's speed-up over ``reference`` of
the same size ("× ref"); "cpu ms" is the median process CPU time (all threads) of a call,
which other processes on a shared machine disturb far less than the wall time.
``--profile`` adds the C++ CPU pass's own phase times (projection, depth sort, binning,
blending from ``--repeats`` more forward runs; blending backward, reduction, projection
backward from as many forward+backward runs), per call, as wall-clock and as process CPU
time. Results go to a table on stdout and a JSON file.
"""

from __future__ import annotations

import argparse
import ctypes
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

from gem_jax.render import BLEND_BACKENDS, available_backends, count_intersections, rasterize  # noqa: E402
from gem_jax.types import Camera, Gaussians  # noqa: E402


def head_scene(n: int, width: int, seed: int = 0, *, height: int | None = None) -> tuple[Gaussians, Camera, jax.Array]:
    """n Gaussians on an ellipsoidal shell (semi-axes 0.09, 0.12, 0.1 m) seen from 0.6 m in a
    width x height image (height = width by default)."""
    height = width if height is None else height
    rng = np.random.default_rng(seed)
    axes = np.array([0.09, 0.12, 0.10])
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    means = d * axes * rng.uniform(0.97, 1.0, size=(n, 1))
    area = 4 * np.pi * (np.prod(axes) ** (2 / 3))  # roughly the ellipsoid's surface
    spacing = np.sqrt(area / n)
    scales = spacing * np.exp(rng.normal(-0.7, 0.35, size=(n, 3)))
    quats = rng.normal(size=(n, 4))
    quats /= np.linalg.norm(quats, axis=-1, keepdims=True)
    g = Gaussians(
        means=jnp.asarray(means, jnp.float32), quats=jnp.asarray(quats, jnp.float32),
        scales=jnp.asarray(scales, jnp.float32), opacities=jnp.asarray(rng.uniform(0.1, 1.0, n), jnp.float32),
        colors=jnp.asarray(rng.uniform(0, 1, (n, 3)), jnp.float32),
    )  # fmt: skip
    viewmat = np.eye(4)
    viewmat[2, 3] = 0.6  # the head's centre 0.6 m in front of the camera
    f = min(width, height) / (2 * np.tan(np.deg2rad(14)))  # ~28° field of view on the short side
    K = np.array([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]])
    cam = Camera(jnp.asarray(viewmat, jnp.float32), jnp.asarray(K, jnp.float32), width, height)
    return g, cam, jnp.ones(3, jnp.float32)


def timed(fn, args, warmup: int, repeats: int) -> tuple[float, float, float, float]:
    """(compile+first-run seconds, median and minimum wall seconds of the timed runs, median
    process CPU seconds (all threads) of the timed runs)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return first, statistics.median(times), min(times), statistics.median(cpu)


PHASES = ("project", "sort", "bin", "blend", "blend_bwd", "reduce", "project_bwd")


def cpu_phases() -> np.ndarray:
    """The C++ pass's phase times in ms since the last call (``gem_frame_profile``): (2, 7),
    wall clock and process CPU time per phase (zeros without the kernel)."""
    from gem_jax.render import _ffi

    library = _ffi._LIBRARIES.get("cpu")
    out = (ctypes.c_double * (2 * len(PHASES)))()
    if library is not None:
        library.gem_frame_profile(out, ctypes.c_int32(1))
    return np.array(out[:]).reshape(2, len(PHASES))


def bench_one(n: int, width: int, height: int, backend: str, warmup: int, repeats: int, seed: int,
              profile: bool = False) -> dict:
    g, cam, bg = head_scene(n, width, seed, height=height)
    total = count_intersections(g, cam)
    capacity = int(total * 1.1) + 256
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(height, width, 3)), jnp.float32)

    def render(g):
        return rasterize(g, cam, bg, backend=backend, capacity=capacity)

    def loss(g):
        out = render(g)
        return jnp.sum(out.image * weights) + jnp.sum(out.alpha) + 0.1 * jnp.sum(out.depth)

    forward = jax.jit(lambda g: render(g).image)
    backward = jax.jit(jax.grad(loss))
    out = render(g)
    compile_f, t_f, min_f, cpu_f = timed(forward, (g,), warmup, repeats)
    compile_b, t_b, min_b, cpu_b = timed(backward, (g,), warmup, repeats)
    extra = {}
    if profile and backend == "cpu":  # separate runs: forward phases, then backward phases
        cpu_phases()
        for _ in range(repeats):
            jax.block_until_ready(forward(g))
        forward_phases = cpu_phases()[:, :4] / repeats
        for _ in range(repeats):
            jax.block_until_ready(backward(g))
        phases = np.concatenate([forward_phases, cpu_phases()[:, 4:] / repeats], axis=1)
        extra = {f"ms_{k}": float(v) for k, v in zip(PHASES, phases[0])}
        extra |= {f"cpu_ms_{k}": float(v) for k, v in zip(PHASES, phases[1])}
    return extra | {
        "gaussians": n, "width": width, "height": height, "backend": backend,
        "ms_forward": 1e3 * t_f, "ms_forward_backward": 1e3 * t_b,
        "ms_forward_min": 1e3 * min_f, "ms_forward_backward_min": 1e3 * min_b,
        "cpu_ms_forward": 1e3 * cpu_f, "cpu_ms_forward_backward": 1e3 * cpu_b,
        "s_compile_forward": compile_f, "s_compile_forward_backward": compile_b,
        "intersections": total, "visible": int(out.stats["num_visible"]),
        "coverage": float(jnp.mean(out.alpha > 0.5)),
    }  # fmt: skip


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    """``"16000@512,500000@1920x1080"`` → ``[(16000, 512, 512), (500000, 1920, 1080)]``."""
    sizes = []
    for item in text.split(","):
        n, _, res = item.strip().partition("@")
        width, x, height = res.lower().partition("x")
        try:
            size = (int(float(n)), int(width), int(height if x else width))
        except ValueError:
            raise SystemExit(f"--sizes: expected items like 16000@512 or 65000@550x802, got {item!r}") from None
        if min(size) <= 0:
            raise SystemExit(f"--sizes: Gaussians and image sizes must be positive, got {item!r}")
        sizes.append(size)
    return sizes


#: Backends benchmarked by default: every available one but the dense oracle and the
#: cuda-emulated test backend.
NOT_BENCHMARKED = ("dense", "cuda-emulated")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="3000@128,16000@512", help="comma list of GAUSSIANS@RESOLUTION")
    parser.add_argument("--backends", default="",
                        help="comma list (default: every available one but 'dense' and 'cuda-emulated')")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench_rasterize.json", help="JSON output path")
    parser.add_argument("--plan", action="store_true", help="print the runs and exit")
    parser.add_argument("--profile", action="store_true", help="also report the C++ pass's phase times")
    args = parser.parse_args(argv)
    sizes = parse_sizes(args.sizes)
    if args.backends:
        backends = args.backends.split(",")
        unknown = sorted(set(backends) - set(BLEND_BACKENDS))
        if unknown:
            raise SystemExit(f"--backends: unknown {unknown}; known: {sorted(BLEND_BACKENDS)}")
    else:
        backends = [b for b in available_backends() if b not in NOT_BENCHMARKED]
    if args.plan:
        for n, width, height in sizes:
            print(f"{n} Gaussians @ {width}x{height}: {', '.join(backends)}")
        return 0
    print(f"jax {jax.__version__} on {jax.default_backend()} ({platform.processor() or platform.machine()}), "
          f"backends {backends}")  # fmt: skip
    columns = [("Gaussians", 9), ("image", 9), ("backend", 9), ("fwd ms", 9), ("fwd+bwd ms", 11),
               ("× ref fwd", 10), ("× ref f+b", 10), ("cpu ms fwd", 11), ("cpu ms f+b", 11),
               ("compile s", 10), ("isect", 8), ("cover", 6)]  # fmt: skip
    header = " ".join(f"{name:>{width}}" for name, width in columns)
    print(header + "\n" + "-" * len(header))
    rows = []
    for n, width, height in sizes:
        reference = None
        for backend in sorted(backends, key=lambda b: b != "reference"):  # reference first
            r = bench_one(n, width, height, backend, args.warmup, args.repeats, args.seed, args.profile)
            if backend == "reference":
                reference = r
            if reference is not None:
                r["speedup_forward"] = reference["ms_forward"] / r["ms_forward"]
                r["speedup_forward_backward"] = reference["ms_forward_backward"] / r["ms_forward_backward"]
            rows.append(r)
            ratios = (f"{r['speedup_forward']:>10.1f} {r['speedup_forward_backward']:>10.1f}" if reference
                      else f"{'-':>10} {'-':>10}")  # fmt: skip
            image = f"{width}x{height}"
            print(f"{n:>9} {image:>9} {backend:>9} {r['ms_forward']:>9.1f} {r['ms_forward_backward']:>11.1f} "
                  f"{ratios} {r['cpu_ms_forward']:>11.1f} {r['cpu_ms_forward_backward']:>11.1f} "
                  f"{r['s_compile_forward'] + r['s_compile_forward_backward']:>10.1f} "
                  f"{r['intersections']:>8} {r['coverage']:>6.2f}", flush=True)  # fmt: skip
            if "ms_project" in r:
                for label, prefix in (("wall", "ms_"), ("CPU", "cpu_ms_")):
                    print(f"          C++ phases, {label} ms per call: "
                          + ", ".join(f"{k} {r[prefix + k]:.2f}" for k in PHASES))  # fmt: skip
    meta = {"jax": jax.__version__, "platform": jax.default_backend(), "device": str(jax.devices()[0]),
            "repeats": args.repeats, "warmup": args.warmup, "statistic": "median"}  # fmt: skip
    Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
