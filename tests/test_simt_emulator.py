"""The SIMT emulator (kernels/simt_emulator.h) on its own, with small CUDA kernels.

Specification (docs/architecture.md §9): the emulator runs a ``__global__`` function over a
grid of blocks, one execution context per thread; between barriers the threads of a block run
in an order drawn from a seed, so correct kernels give the same result under every seed and a
missing barrier shows up as a difference between two seeds; warp operations are rendezvous of
the lanes of their mask; misuse (a barrier in divergent code, a shuffle that waits for a lane
that returned, lanes of a warp at different operations) is reported as an error, never a hang.

The kernels are tests/simt_kernels.cc, compiled here with the system C++ compiler into a
temporary shared library, once with the x86-64 context switch and once with POSIX ucontext.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "simt_kernels.cc"
SEEDS = (1, 2, 3, 0xDEADBEEF)


def _compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


SWITCHES = ["asm", "ucontext"] if platform.machine() in ("x86_64", "AMD64") else ["ucontext"]


@pytest.fixture(scope="module", params=SWITCHES)
def kernels(request, tmp_path_factory):
    """The test kernels as a ctypes library, built with the context switch of `param`."""
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++; or $CXX) to build tests/simt_kernels.cc")
    out = tmp_path_factory.mktemp(f"simt-{request.param}") / "libsimt_kernels.so"
    flags = ["-DGEM_SIMT_UCONTEXT"] if request.param == "ucontext" else []
    # Hidden visibility: the two builds' inline functions must not interpose on each other.
    command = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-fvisibility=hidden", "-fvisibility-inlines-hidden",
               *flags, f"-I{ROOT / 'kernels'}", str(SOURCE), "-o", str(out)]  # fmt: skip
    built = subprocess.run(command, capture_output=True, text=True)
    assert built.returncode == 0, f"{' '.join(command)} failed:\n{built.stderr}"
    return Library(ctypes.CDLL(str(out)))


class Library:
    """Calls into tests/simt_kernels.cc; raises with the emulator's message on an error."""

    def __init__(self, lib):
        self.lib = lib

    def __call__(self, name, seed, *args):
        err = ctypes.create_string_buffer(1024)
        converted = [a.ctypes.data_as(ctypes.c_void_p) if isinstance(a, np.ndarray) else a for a in args]
        status = getattr(self.lib, name)(ctypes.c_uint64(seed), *converted, err, len(err))
        if status != 0:
            raise RuntimeError(err.value.decode())

    def misuse(self, name, seed=1) -> str:
        err = ctypes.create_string_buffer(1024)
        status = self.lib.misuse(ctypes.c_uint64(seed), name.encode(), err, len(err))
        assert status == 1, f"{name}: the emulator did not report the misuse"
        return err.value.decode()


# --- correct kernels: the same result under every seed ------------------------------------


def test_block_reduction(kernels):
    """Warp shuffles + shared memory + a barrier: each block's sum, the last block partial."""
    x = np.random.default_rng().normal(size=1000).astype(np.float32)
    results = []
    for seed in SEEDS:
        out = np.zeros(4, np.float32)
        kernels("block_sum", seed, x, len(x), 256, out)
        want = [x[i * 256 : (i + 1) * 256].astype(np.float64).sum() for i in range(4)]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        results.append(out)
    for r in results[1:]:  # a fixed reduction tree: the same bits under every seed
        np.testing.assert_array_equal(r, results[0])


def test_scan_of_one_block_with_a_partial_warp(kernels):
    """Hillis-Steele inclusive scan, 1000 threads (the last warp has 8 lanes)."""
    a = np.random.default_rng().integers(-50, 50, size=1000).astype(np.int32)
    for seed in SEEDS:
        out = np.zeros_like(a)
        kernels("inclusive_scan", seed, a, len(a), out)
        np.testing.assert_array_equal(out, np.cumsum(a))


def test_a_kernel_that_needs_its_barrier_is_right_under_every_seed(kernels):
    a = np.random.default_rng().integers(0, 1 << 30, size=256).astype(np.int32)
    for seed in SEEDS:
        out = np.zeros_like(a)
        kernels("reverse", seed, a, out, 1)
        np.testing.assert_array_equal(out, a[::-1])


def test_a_racy_kernel_is_told_apart_by_two_seeds(kernels):
    """Without its barrier, a thread reads its partner's slot before or after the partner
    wrote it, depending on the order: wrong, and differently so under two seeds."""
    a = np.random.default_rng().integers(0, 1 << 30, size=256).astype(np.int32)
    outs = []
    for seed in (1, 2):
        out = np.zeros_like(a)
        kernels("reverse", seed, a, out, 0)
        assert (out != a[::-1]).any()
        outs.append(out)
    assert (outs[0] != outs[1]).any()


def test_warp_primitives(kernels):
    """Shuffles (down/up/xor/idx, a width of 8, a half-warp mask, a 64-bit value), ballot,
    any and all over two warps of 32 lanes."""
    tid = np.arange(64)
    lane, base = tid % 32, tid - tid % 32
    v = 1000 * (tid // 32) + 3 * lane
    want = np.stack([
        np.where(lane < 31, v[np.minimum(tid + 1, 63)], v),
        np.where(lane >= 2, v[np.maximum(tid - 2, 0)], v),
        v[base + (lane ^ 5)],
        v[base + 7],
        np.where(lane % 8 + 3 < 8, v[np.minimum(tid + 3, 63)], v),
        np.full(64, sum(1 << i for i in range(32) if i % 3 == 0)),
        (tid // 32 == 1).astype(int),  # any(tid == 37): only warp 1
        (tid // 32 == 0).astype(int),  # all(tid < 40): only warp 0
        np.where(lane < 16, v[base + (lane ^ 1)], -7),
        2 * np.where(lane + 4 < 32, tid + 4, tid),
    ], -1)  # fmt: skip
    for seed in SEEDS:
        out = np.zeros((64, 10), np.int32)
        kernels("warp_ops", seed, out)
        np.testing.assert_array_equal(out, want)


def test_barrier_predicates(kernels):
    """__syncthreads_count/_and/_or over a block of 200 threads."""
    for seed in SEEDS:
        out = np.zeros(5, np.int32)
        kernels("barrier_predicates", seed, out)
        np.testing.assert_array_equal(out, [len(range(0, 200, 3)), 1, 0, 1, 0])


def test_atomics_and_the_block_order(kernels):
    """Integer atomics are exact under every seed; blocks run in a seed-dependent order."""
    x = np.random.default_rng().integers(-1000, 1000, size=3000).astype(np.int32)
    for seed in SEEDS:
        hist = np.zeros(17, np.int32)
        kernels("histogram", seed, x, len(x), hist, 17)
        np.testing.assert_array_equal(hist, np.bincount(x % 17, minlength=17))
    orders = []
    for seed in (1, 2):
        order = np.full(12, -1, np.int32)
        kernels("block_order", seed, 4, 3, order)
        assert sorted(order) == sorted(x + 100 * y for x in range(4) for y in range(3))
        orders.append(order)
    assert (orders[0] != orders[1]).any()


# --- misuse: reported, never a hang ---------------------------------------------------------


@pytest.mark.parametrize(
    "name,message",
    [
        ("divergent_barrier", "wait at __syncthreads (a barrier in divergent code)"),
        ("returned_lanes", "return"),
        ("mismatched_shuffles", "disagree"),
        ("barrier_versus_warp", "__shfl_xor_sync"),  # either side may be found first
    ],
)
def test_misuse_is_reported(kernels, name, message):
    for seed in (1, 2):
        assert message in kernels.misuse(name, seed)
