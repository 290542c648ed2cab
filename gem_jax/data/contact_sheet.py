"""Contact sheet of the synthetic subject: a PNG grid of expressions (rows) × cameras (columns).

    python -m gem_jax.data.contact_sheet                      # writes docs/contact_sheet.png
    python -m gem_jax.data.contact_sheet --out /tmp/sheet.png --identities 0,1 --config configs/quickstart.py

Each tile is rendered exactly as the data stage renders its images (same camera rig, image
size, supersampling, texture and shading of the config's ``synthetic`` section), composited
with its foreground mask on white.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from gem_jax.config_check import load_config_file
from gem_jax.data import procedural_head as ph
from gem_jax.data import synthetic as sy

LABEL_WIDTH = 96
EXPRESSIONS = (  # (label, expression coefficients, jaw angle)
    ("neutral", {}, 0.0),
    ("jaw open", {}, 0.3),
    ("smile", {"smile": 1.2}, 0.04),
    ("brow raise", {"brow_raise": 1.2}, 0.0),
    ("blink", {"blink_left": 1.0, "blink_right": 1.0}, 0.0),
    ("pucker", {"pucker": 1.2}, 0.0),
    ("cheek puff", {"cheek_puff": 1.2}, 0.0),
    ("frown", {"frown": 1.2}, 0.0),
    ("talk", {"lips_part": 1.0, "mouth_stretch": 0.6, "sneer": 0.5}, 0.15),
)


def contact_sheet(path, synthetic, seed: int = 0, cameras=None, identities=(0,), expressions=EXPRESSIONS,
                  background=(1.0, 1.0, 1.0)) -> Path:
    """Render ``expressions`` × ``cameras`` (default: 7 spread over the arc) for each identity."""
    num_cams = int(synthetic["num_cameras"])
    cameras = list(cameras) if cameras is not None else sorted({round(x) for x in np.linspace(0, num_cams - 1, 7)})
    bg = np.asarray(background, np.float32)
    rows = []
    for ident in identities:
        scene = sy.make_scene(synthetic, seed, identity=ident)
        params = {k: np.repeat(v, len(expressions), 0) for k, v in sy.canonical_params(len(ph.EXPR_NAMES)).items()}
        for j, (_, coefficients, jaw) in enumerate(expressions):
            params["jaw_pose"][j, 0] = jaw
            for name, value in coefficients.items():
                params["expr"][j, ph.EXPR_NAMES.index(name)] = value
        scene.sequences = [sy.Sequence("contact-sheet", params)]
        views = sy.render_frames(scene, sy.frame_table(scene), cameras)
        for j, (label, _, _) in enumerate(expressions):
            tiles = [np.full((scene.rig.height, LABEL_WIDTH, 3), 255, np.uint8)]
            for c in cameras:
                rgb, alpha = views[(j, c)]
                a = alpha[..., None] / 255.0
                tiles.append(sy.to_uint8(rgb / 255.0 * a + bg * (1 - a))[..., ::-1])
            row = np.ascontiguousarray(np.concatenate(tiles, 1))
            for k, text in enumerate((f"identity {ident}", label)):
                cv2.putText(row, text, (4, scene.rig.height // 2 - 4 + 16 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                            (40, 40, 40), 1, cv2.LINE_AA)
            rows.append(row)
    width = scene.rig.width
    header = np.full((20, rows[0].shape[1], 3), 255, np.uint8)
    for k, c in enumerate(cameras):
        cv2.putText(header, f"camera {c}", (LABEL_WIDTH + k * width + 4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.42,
                    (40, 40, 40), 1, cv2.LINE_AA)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.concatenate([header] + rows, 0)):
        raise OSError(f"could not write {path}")
    return path


def main(argv=None) -> None:
    root = Path(__file__).resolve().parents[2]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(root / "configs" / "quickstart.py"))
    parser.add_argument("--out", default=str(root / "docs" / "contact_sheet.png"))
    parser.add_argument("--identities", default="0")
    args = parser.parse_args(argv)
    config = load_config_file(args.config)
    identities = [int(x) for x in args.identities.split(",")]
    print(contact_sheet(args.out, config.synthetic, int(config.seed), identities=identities))


if __name__ == "__main__":
    main()
