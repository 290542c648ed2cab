"""The NeRSemble evaluation protocol (docs/architecture.md §4, §8): which (sequence, camera) pairs go where.

* ``train`` — the training sequences seen by the training cameras;
* ``val``   — the training sequences seen by the held-out camera (novel view);
* ``test``  — the held-out sequence seen by every camera (novel expression).

The synthetic generator assigns its frames with :func:`split_of`; the reader does not
re-derive splits (a real export brings its own ``transforms_{split}.json``).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

SPLITS = ("train", "val", "test")


def split_of(sequence: Hashable, camera: int, held_out_camera: int, held_out_sequence: Hashable) -> str:
    """The split of one image: ``"test"`` for the held-out sequence, else ``"val"`` for the
    held-out camera, else ``"train"``."""
    if sequence == held_out_sequence:
        return "test"
    if camera == held_out_camera:
        return "val"
    return "train"


def nersemble_split(camera_indices: Sequence[int], sequences: Sequence[Hashable], held_out_camera: int,
                    held_out_sequence: Hashable) -> dict[str, list[tuple[Hashable, int]]]:
    """``{"train"|"val"|"test": [(sequence, camera), ...]}`` in sequence-major input order.

    Every (sequence, camera) pair lands in exactly one split. Needs at least two distinct
    cameras and sequences (otherwise the training split would be empty), and the held-out
    camera/sequence must be among them; a violation is a ``ValueError`` naming the argument.
    """
    cameras, seqs = list(camera_indices), list(sequences)
    for name, values in (("camera_indices", cameras), ("sequences", seqs)):
        if len(set(values)) != len(values):
            raise ValueError(f"nersemble_split: {name} has duplicates: {values}")
        if len(values) < 2:
            raise ValueError(f"nersemble_split: {name} needs at least two entries to hold one out, got {values}")
    if held_out_camera not in cameras:
        raise ValueError(f"nersemble_split: held_out_camera {held_out_camera!r} is not in camera_indices {cameras}")
    if held_out_sequence not in seqs:
        raise ValueError(f"nersemble_split: held_out_sequence {held_out_sequence!r} is not in sequences {seqs}")
    out: dict[str, list[tuple[Hashable, int]]] = {split: [] for split in SPLITS}
    for s in seqs:
        for c in cameras:
            out[split_of(s, c, held_out_camera, held_out_sequence)].append((s, c))
    return out
