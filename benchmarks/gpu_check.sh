#!/usr/bin/env bash
# GPU check of the CUDA blending kernel: one prepared script for a GPU machine, < 8 minutes.
#
#   bash benchmarks/gpu_check.sh             # build, versions, GPU tests, benchmark, teacher step
#   bash benchmarks/gpu_check.sh --dry-run   # print the plan and check its CPU parts (no GPU needed)
#
# Steps (each bounded by `timeout`, all together by GPU_CHECK_BUDGET seconds, default 460: a
# step that would start past it is skipped and says so; a failing step is recorded and the
# next one still runs):
#   1. build: `pip install .` with GEM_JAX_CUDA=ON (nvcc required), offline when
#      scikit-build-core is installed (--no-build-isolation --no-deps); where pip cannot build,
#      a CMake build tree used through GEM_JAX_KERNEL_DIR instead (README "Development");
#   2. versions: jax, jaxlib, nvcc, the GPU (nvidia-smi), what the kernels loaded;
#   3. the tests marked `gpu` (tests/test_cuda_gpu.py) on the device;
#   4. benchmarks/bench_rasterize.py, 16k / 65k / 500k Gaussians x 512² / 550x802 / 1080p,
#      forward and forward+backward ms: first `cuda` on every size, then `reference` (rows are
#      printed as they come, so a stopped run still records the sizes it reached);
#   5. one timing of the teacher step of configs/synthetic.py (full-size network, images and
#      batch; 2 sequences x 3 frames of data so that the data stage is short).
# Everything (commands, versions, outputs) is appended to benchmarks/RESULTS.md with the GPU's
# name; JSON results go to benchmarks/out/.
#
# Environment: PYTHON (default: python3), RESULTS (default: benchmarks/RESULTS.md),
# GPU_CHECK_WORKDIR (default: a temporary directory, for the teacher's data and run),
# GPU_CHECK_BUDGET (seconds, default 460).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac

PYTHON=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/RESULTS.md}
WORKDIR=${GPU_CHECK_WORKDIR:-${TMPDIR:-/tmp}/gem-gpu-check-$$}
LOG=${TMPDIR:-/tmp}/gem-gpu-check-$$.log
: > "$LOG"
mkdir -p benchmarks/out
SIZES=16000@512,16000@550x802,16000@1920x1080,65000@512,65000@550x802,65000@1920x1080,500000@512,500000@550x802,500000@1920x1080
BENCH="$PYTHON benchmarks/bench_rasterize.py --sizes $SIZES --repeats 3 --warmup 1"
BUDGET=${GPU_CHECK_BUDGET:-460}
TRAIN="$PYTHON -m gem_jax.train --config configs/synthetic.py --workdir $WORKDIR"
DATA_FLAGS="--config.synthetic.num_sequences=2 --config.synthetic.frames_per_sequence=3"
TEACHER_FLAGS="--config.teacher.steps=30 --config.teacher.log_every=10 --config.teacher.checkpoint_every=1000 \
--config.teacher.eval.max_images=1 --config.teacher.eval.num_renders=1 --config.teacher.eval.lpips=False"
START=$SECONDS

# step LIMIT COMMAND: runs COMMAND (a string, through bash) for at most LIMIT seconds and
# what is left of the budget, echoing the command and its output into the log.
step() {
  local limit=$1 command=$2 left=$((BUDGET - (SECONDS - START)))
  echo "\$ $command" | tee -a "$LOG"
  if [ "$DRY_RUN" = 1 ]; then return 0; fi
  if [ "$left" -lt 15 ]; then
    echo "(skipped: the ${BUDGET} s budget is spent)" | tee -a "$LOG"
    return 0
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  timeout "$limit" bash -c "$command" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  [ "$status" = 124 ] && echo "(stopped after ${limit} s)" | tee -a "$LOG"
  [ "$status" != 0 ] && echo "(exit status $status)" | tee -a "$LOG"
  echo "(at $((SECONDS - START)) s)" | tee -a "$LOG"
  return 0
}

section() { printf '\n### %s\n' "$*" | tee -a "$LOG"; }

if [ "$DRY_RUN" = 1 ]; then
  echo "dry run: the commands below are printed, not run; checking the CPU parts"
  $PYTHON benchmarks/bench_rasterize.py --sizes "$SIZES" --backends cuda,reference --plan || exit 1
  $PYTHON - "$SIZES" <<'EOF' || exit 1
import sys
sys.path.insert(0, "benchmarks")
from bench_rasterize import parse_sizes
sizes = parse_sizes(sys.argv[1])
assert len(sizes) == 9 and (500000, 1920, 1080) in sizes and (65000, 550, 802) in sizes, sizes
print("sizes ok:", sizes)
EOF
  # The config overrides below must name existing fields of configs/synthetic.py.
  $PYTHON - $DATA_FLAGS $TEACHER_FLAGS <<'EOF' || exit 1
import sys
sys.path.insert(0, "configs")
import synthetic
config = synthetic.get_config()
for flag in sys.argv[1:]:
    node = config
    *path, leaf = flag.removeprefix("--config.").split("=")[0].split(".")
    for key in path:
        node = node[key]
    assert leaf in node, f"{flag}: configs/synthetic.py has no such field"
print("config overrides ok:", len(sys.argv) - 1)
EOF
fi

section "build"
# `pip install .` builds in an isolated environment fetched from the package index, unless
# scikit-build-core is already installed: then nothing is fetched. Without either, or if pip
# fails, the kernels are built with CMake into a build tree that gem_jax is pointed at.
if $PYTHON -c "import scikit_build_core" 2>/dev/null; then
  step 240 "GEM_JAX_CUDA=ON $PYTHON -m pip install -q --no-build-isolation --no-deps ."
else
  step 240 "GEM_JAX_CUDA=ON $PYTHON -m pip install -q --retries 1 --timeout 15 ."
fi
if [ "$DRY_RUN" = 1 ] || ! $PYTHON -c "import gem_jax_kernels as k, sys; sys.exit(0 if k.library_path('cuda') else 1)" 2>/dev/null; then
  echo "(if pip did not install the CUDA kernel:)" | tee -a "$LOG"
  step 240 "cmake -S . -B build/gpu-check -DGEM_JAX_CUDA=ON -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE=\$(command -v $PYTHON) && cmake --build build/gpu-check -j"
  export GEM_JAX_KERNEL_DIR=$PWD/build/gpu-check/kernels PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export JAX_PLATFORMS=cuda,cpu  # tests/conftest.py would default to cpu

section "versions"
step 60 "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader"
step 60 "nvcc --version | tail -n 2"
step 120 "$PYTHON -c \"import jax, jaxlib; from gem_jax.render import _ffi; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices()); print('kernels:', _ffi._PROBLEMS)\""

section "GPU tests"
step 150 "$PYTHON -m pytest -q -rs -m gpu tests/test_cuda_gpu.py"

section "rasterizer benchmark (median ms; cuda first, then reference)"
step 120 "$BENCH --backends cuda --out benchmarks/out/gpu_rasterize_cuda.json"
step 100 "$BENCH --backends reference --out benchmarks/out/gpu_rasterize_reference.json"

section "teacher step of configs/synthetic.py (backend auto = cuda)"
step 90 "$TRAIN --stage data $DATA_FLAGS"
step 120 "$TRAIN --stage teacher $DATA_FLAGS $TEACHER_FLAGS"
if [ "$DRY_RUN" = 0 ] && [ -f "$WORKDIR/teacher/metrics.json" ]; then
  $PYTHON - "$WORKDIR/teacher/metrics.json" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
records = [r for r in json.load(open(sys.argv[1]))["records"] if "time" in r]
if len(records) < 2:
    sys.exit(f"teacher step: fewer than two log records in {sys.argv[1]}")
first, last = records[0], records[-1]  # from the first log step on: compiled, warmed up
per_step = (last["time"] - first["time"]) / (last["step"] - first["step"])
print(f"teacher step: {1e3 * per_step:.1f} ms/step (steps {first['step']}..{last['step']}, batch of 4 images)")
EOF
fi

if [ "$DRY_RUN" = 1 ]; then
  rm -f "$LOG"
  echo "dry run done: would append the log to $RESULTS"
  exit 0
fi
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
{
  printf '\n## GPU check, %s, %s\n\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "${GPU:-unknown GPU}"
  printf 'Command: `bash benchmarks/gpu_check.sh` at %s (%s s in all). Log (commands and outputs):\n\n' \
    "$(git rev-parse --short HEAD 2>/dev/null || echo '?')" "$((SECONDS - START))"
  echo '```'
  cat "$LOG"
  echo '```'
} >> "$RESULTS"
echo "appended to $RESULTS"
