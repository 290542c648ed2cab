"""The eval stage gathers every stage's own evaluation into one table, reports stages that have
not run as missing (never guessed), and stacks the renders of shared frames."""

import json

import cv2

from gem_jax import report

from conftest import tiny_context


def test_eval_stage_gathers_metrics_and_flags_missing_stages(distilled_workdir, tmp_path):
    import shutil

    _, workdir = distilled_workdir
    for name in ("teacher", "pca"):
        shutil.copytree(workdir / name, tmp_path / name, ignore=shutil.ignore_patterns("ckpt"))
    result = report.run(tiny_context(tmp_path))
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["models"] == json.loads(json.dumps(result["models"]))
    teacher = json.loads((tmp_path / "teacher" / "eval.json").read_text())
    assert saved["models"]["teacher"]["novel_view"]["psnr"] == teacher["held_out_camera"]["psnr"]
    pca = json.loads((tmp_path / "pca" / "eval.json").read_text())
    assert saved["models"]["GEM, PCA only"]["novel_expression"]["psnr"] == pca["held_out_sequence"]["psnr"]
    assert "missing" in saved["models"]["GEM, refined"] and "missing" in saved["models"]["GEM + regressor"]
    table = report.metrics_table(saved["models"])
    assert "(missing)" in table and f"{teacher['held_out_camera']['psnr']:.2f}" in table
    # Frames rendered by the teacher and the PCA stage alike are stacked: GT | teacher | PCA.
    assert saved["frames"], "the teacher and the PCA stage rendered the same held-out frames"
    for path in saved["frames"]:
        image = cv2.imread(str(tmp_path / path))
        assert image is not None and image.shape[1] == 3 * image.shape[0]
