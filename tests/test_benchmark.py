"""The benchmark config compresses (K ≪ N) and the component ablation measures what it says."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gem_jax.config_check import check_config, load_config_file
from gem_jax.data import procedural_head as ph
from gem_jax.data.synthetic import SEQUENCES, make_sequences

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("arg", ["", ":tiny"])
def test_benchmark_config_has_many_more_timesteps_than_components(arg):
    config = load_config_file(str(ROOT / "configs" / "benchmark.py") + arg)
    check_config(config)
    s = config.synthetic
    training_timesteps = (s.num_sequences - 1) * s.frames_per_sequence
    if not arg:
        assert training_timesteps >= 300
        assert config.teacher.steps > load_config_file(str(ROOT / "configs" / "quickstart.py")).teacher.steps
    assert s.num_sequences - 1 > len(SEQUENCES)  # named sequences plus random mixes
    for modality, k in config.pca.components.items():
        assert k < training_timesteps - 1, modality  # PCA must compress: not every direction is kept


def test_training_sequences_beyond_the_named_ones_mix_expressions():
    sequences = make_sequences(seed=3, num_sequences=7, frames=40)
    names = [s.name for s in sequences]
    assert len(set(names)) == len(names)
    emphasised = []
    for seq in sequences[len(SEQUENCES):-1]:
        std = seq.params["expr"].std(0)
        strong = {ph.EXPR_NAMES[i] for i in np.flatnonzero(std > 0.15)}
        assert 3 <= len(strong) <= 5, (seq.name, std)
        emphasised.append(strong)
    assert emphasised[0] != emphasised[1]
    again = make_sequences(seed=3, num_sequences=7, frames=40)
    np.testing.assert_array_equal(again[4].params["expr"], sequences[4].params["expr"])
    # The named sequences are what they were (the quickstart's data does not change).
    assert names[:len(SEQUENCES)] == [name for name, _, _ in SEQUENCES]


def test_ablation_script_compares_pca_and_refined_per_component_count(distilled_workdir, tmp_path):
    _, workdir = distilled_workdir
    out = tmp_path / "ablation"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_ablation.py"), "--workdir", str(workdir),
           "--config", str(ROOT / "configs" / "quickstart.py") + ":tiny", "--components", "1,2",
           "--refine-steps", "2", "--repeats", "2", "--out-dir", str(out), "--figure", str(tmp_path / "fig.png")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((out / "ablation.json").read_text())
    rows = {r["components"]: r for r in result["rows"]}
    assert sorted(rows) == [1, 2]
    assert result["teacher"]["held_out_camera"]["psnr"] > 5
    for k, row in rows.items():
        assert set(row["components_used"].values()) == {k}
        for kind in ("pca", "refined"):
            for split in ("held_out_camera", "held_out_sequence"):
                assert 5 < row[kind][split]["psnr"] < 60, (k, kind, split)  # a real render, not empty
        assert row["refine_validation"]["history"][0]["step"] == 0  # the PCA basis is step 0
        assert row["fps"]["cpu"] > 0
    assert rows[2]["mb_float32"] > rows[1]["mb_float32"] > rows[1]["mb_float16"]
    # At the pca stage's own component count the ablation's PCA-only model is that stage's model:
    # the same numbers on the held-out camera under the same protocol.
    stage = json.loads((workdir / "pca" / "eval.json").read_text())["held_out_camera"]
    assert rows[2]["pca"]["held_out_camera"]["psnr"] == pytest.approx(stage["psnr"], abs=1e-3)
    assert (tmp_path / "fig.png").stat().st_size > 10_000
    assert "GEM refined" in (out / "ablation.md").read_text()
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert rerun.returncode == 0 and "K=1: kept" in rerun.stdout  # finished counts are not redone


def test_projecting_the_training_gaussians_gives_their_pca_coefficients(distilled_workdir):
    """The novel-expression study projects Gaussians onto the basis; on the training data the
    projection must return the PCA coefficients themselves (σ units), quaternion signs included."""
    from gem_jax.eigen.model import GEM
    from gem_jax.eigen.pca import MODALITIES, fit_modalities, read_collect

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import study_novel_expression

    _, workdir = distilled_workdir
    data = read_collect(workdir / "collect")
    results = fit_modalities(data.matrices, {m: 2 for m in MODALITIES})
    model = GEM.from_pca(results, data.colors, data.valid)
    rows = {m: np.asarray(data.matrices[m]) for m in MODALITIES}
    rows["rotation"] = -rows["rotation"]  # q and −q are one rotation: the projection aligns signs first
    k = study_novel_expression.project(model, rows)
    expected = np.concatenate([np.asarray(results[m].coeffs) for m in MODALITIES], 1)
    assert np.abs(expected).max() > 0.5
    np.testing.assert_allclose(k, expected, atol=2e-3)
