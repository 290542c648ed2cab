"""Frames per second of the browser viewer in software WebGL (headless Chromium), and how close
its image is to ``gem_jax.render.rasterize`` (docs/architecture.md §11).

    python benchmarks/bench_viewer.py                          # both sizes, llvmpipe and SwiftShader
    python benchmarks/bench_viewer.py --texels 64 --gl llvmpipe --seconds 3

No trained quickstart run is needed: for each UV resolution a synthetic GEM of that size is
built as ``bench_render.py`` builds it (64² texels ≈ 3.5k Gaussians, the quickstart avatar's
size; 256² ≈ 56k, the full config's), with ``--components`` per modality, exported with
:func:`gem_jax.viewer.webexport.write_web` (float32 for the small model, float16 for the 56k one
unless ``--dtype``) and opened in the system Chromium at ``--size`` pixels. Measured in the page
(``gemViewer.benchmark``): the evaluation pass (``G(k)`` in a shader) and the splat pass, each
GPU-synchronised (``readPixels`` of one pixel), medians over ``--frames`` random ``k``; the Web
Worker's depth sort; and the frames per second of playback of random coefficients (a new ``k``
each animation frame: evaluate, sort, splat) over ``--seconds``. Then, for one random ``k``, the
canvas against ``rasterize`` of the model as stored (float16 values for a float16 export; PSNR,
max abs difference). Prints a Markdown table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_render import camera, synthetic_gem  # noqa: E402

from gem_jax.eigen.model import size_mb  # noqa: E402
from gem_jax.eigen.render import world_gaussians  # noqa: E402
from gem_jax.metrics import psnr  # noqa: E402
from gem_jax.render import rasterize  # noqa: E402
from gem_jax.viewer.headless import launch, open_viewer, read_canvas  # noqa: E402
from gem_jax.viewer.serve import serve_folder  # noqa: E402
from gem_jax.viewer.webexport import WebScene, camera_entry, read_web, write_web  # noqa: E402


def export(model, folder: Path, size: int, dtype: str, seed: int = 0) -> tuple[np.ndarray, object]:
    """Write the web export of ``model`` seen by the benchmark camera; returns a random ``k``
    and the model as stored (float16 values for ``dtype="float16"``), the reference to compare with."""
    rng = np.random.default_rng(seed)
    coefficients = rng.uniform(-1, 1, (4, model.total_components)).astype(np.float32)
    scene = WebScene(cameras=[camera_entry(0, camera(size, size), "benchmark camera")], neutral_pose=np.eye(4),
                     timesteps=np.arange(4), coefficients=coefficients, roots=np.broadcast_to(np.eye(4), (4, 4, 4)))
    write_web(folder, model, scene, dtype)
    return coefficients[0], read_web(folder)[0]


def measure(pw, gl: str, url: str, model, k: np.ndarray, size: int, frames: int, seconds: float) -> dict:
    browser = launch(pw, gl)
    try:
        start = time.perf_counter()
        page, errors = open_viewer(browser, url + "?scale=1&camera=0", viewport=(size + 340, size + 40), timeout_s=600)
        load_s = time.perf_counter() - start
        if page.evaluate("gemViewer.error"):
            raise RuntimeError(page.evaluate("gemViewer.error"))
        stats = page.evaluate("o => gemViewer.benchmark(o)", {"frames": frames, "seconds": seconds})
        page.evaluate("k => gemViewer.setCoefficients(k)", k.tolist())
        image = read_canvas(page)
        renderer = page.evaluate("gemViewer.info()")["renderer"]
    finally:
        browser.close()
    reference = np.asarray(rasterize(world_gaussians(model, jnp.asarray(k), jnp.eye(4), clamp=3.0),
                                     camera(size, size), jnp.ones(3)).image)
    return {**stats, "load_s": load_s, "renderer": renderer, "console_errors": errors,
            "psnr_vs_rasterize": float(psnr(jnp.asarray(image), jnp.asarray(np.clip(reference, 0, 1)))),
            "max_abs_diff": float(np.abs(image - np.clip(reference, 0, 1)).max())}


def main(argv=None) -> int:
    from playwright.sync_api import sync_playwright

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texels", default="64,256")
    p.add_argument("--components", type=int, default=50, help="per modality")
    p.add_argument("--dtype", default=None, help="float32 | float16 (default: float32 below 10k Gaussians, else float16)")
    p.add_argument("--gl", default="llvmpipe,swiftshader")
    p.add_argument("--size", type=int, default=512, help="image width = height in pixels")
    p.add_argument("--frames", type=int, default=10)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--out", default="benchmarks/out/viewer.json")
    args = p.parse_args(argv)
    rows = []
    with sync_playwright() as pw:
        for texels in (int(t) for t in args.texels.split(",")):
            model = synthetic_gem(texels, args.components)
            dtype = args.dtype or ("float32" if model.num_gaussians < 10_000 else "float16")
            with tempfile.TemporaryDirectory(prefix="bench_viewer_") as folder:
                k, stored = export(model, Path(folder), args.size, dtype)
                mb = sum(f.stat().st_size for f in Path(folder).glob("model.*")) / 1e6
                with serve_folder(folder) as url:
                    for gl in args.gl.split(","):
                        row = {"texels": texels, "gaussians": model.num_gaussians, "components": args.components,
                               "dtype": dtype, "model_mb": mb, "npz_mb_float32": size_mb(model), "gl": gl,
                               "size": args.size, **measure(pw, gl, url, stored, k, args.size, args.frames, args.seconds)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    lines = [f"GEM viewer in headless Chromium (software WebGL), {args.size}×{args.size} px, "
             f"{args.components} components/modality, {platform.processor() or platform.machine()}", "",
             "| Gaussians | model | WebGL | eval ms | splat ms | sort ms (worker) | playback fps | PSNR vs rasterize |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gaussians']:,} | {r['model_mb']:.1f} MB {r['dtype']} | {r['gl']} | {r['evalMs']:.1f} | "
                     f"{r['splatMs']:.1f} | {r['sortMs']:.1f} | {r['playFps']:.1f} | {r['psnr_vs_rasterize']:.1f} dB |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "table": table}, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
