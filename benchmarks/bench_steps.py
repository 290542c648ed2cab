"""Training-step speed of the quickstart: teacher and refine steps per second (not a test).

    python benchmarks/bench_steps.py --workdir /tmp/steps            # ~6 min on 2 cores
    python benchmarks/bench_steps.py --workdir /tmp/steps --steps 100 --out steps.json

Runs the stages of ``configs/quickstart.py`` that lead to the two training loops — ``data``,
``teacher`` (``--steps`` steps), ``collect``, ``pca``, ``refine`` (``--steps`` steps) — with
the evaluations cut to a minimum, then reads each loop's ``metrics.json``: records are
written every ``--log-every`` steps with a timestamp, and the steady-state rate is the steps
between the second and the last record over their time difference (the first interval holds
the compilation); the process CPU time (all threads) over the same interval, sampled every
0.1 s, gives CPU seconds per step, which other processes on a shared machine disturb far less
than the wall time (the load average is recorded too). The rasterizer backend is ``"auto"``
(the C++ CPU pass where it is built).
``--workdir`` must not hold a finished run.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "configs"))

import quickstart  # noqa: E402

from gem_jax import train  # noqa: E402
from gem_jax.render import available_backends  # noqa: E402


def config(steps: int, log_every: int):
    c = quickstart.get_config()
    with c.unlocked():
        for loop in (c.teacher, c.refine):
            loop.steps = steps
            loop.log_every = log_every
            loop.checkpoint_every = steps
            loop.eval.max_images = 2
            loop.eval.num_renders = 1
            loop.eval.lpips = False
        c.refine.eval.train_images = 2
        c.refine.qr_every = steps
        c.fit.steps = 2
    return c


class CpuClock:
    """Samples (wall time, process CPU time) every 0.1 s on a daemon thread."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.1):
            self.samples.append((time.time(), time.process_time()))

    def cpu_at(self, wall: float) -> float:
        walls, cpus = zip(*self.samples)
        return float(np.interp(wall, walls, cpus))

    def stop(self):
        self._stop.set()
        self._thread.join()


def steady_rate(metrics: Path, clock: CpuClock) -> dict:
    """Steps per second (wall) and CPU seconds per step between the second and the last
    record of a metrics.json."""
    records = [r for r in json.loads(metrics.read_text())["records"] if "time" in r]
    if len(records) < 3:
        raise SystemExit(f"{metrics}: need at least 3 logged records, got {len(records)} (raise --steps)")
    first, last = records[1], records[-1]
    steps = last["step"] - first["step"]
    cpu = clock.cpu_at(last["time"]) - clock.cpu_at(first["time"])
    return {"steps": steps, "seconds": last["time"] - first["time"],
            "steps_per_s": steps / (last["time"] - first["time"]), "cpu_s_per_step": cpu / steps}  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--out", default="benchmarks/out/steps.json")
    args = p.parse_args(argv)
    c = config(args.steps, args.log_every)
    work = Path(args.workdir)
    if (work / "refine" / "DONE").exists():
        raise SystemExit(f"{work} already holds a finished run: delete it to measure")
    clock = CpuClock()
    for stage in ("data", "teacher", "collect", "pca", "refine"):
        train.run(c, args.workdir, stage)
    clock.stop()
    rows = {"teacher": steady_rate(work / "teacher" / "metrics.json", clock),
            "refine": steady_rate(work / "refine" / "metrics.json", clock)}  # fmt: skip
    device = f"{jax.devices()[0].platform} ({platform.processor() or platform.machine()})"
    load = os.getloadavg()[0]
    result = {"device": device, "backend": available_backends()[0], "jax": jax.__version__, "load_avg_1min": load,
              **rows}  # fmt: skip
    print(f"quickstart training steps, {device}, rasterizer backend {result['backend']!r}, load average {load:.1f}")
    print("| loop | steps timed | seconds | steps/s | CPU s/step |\n|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['steps']} | {r['seconds']:.1f} | {r['steps_per_s']:.2f} | {r['cpu_s_per_step']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
