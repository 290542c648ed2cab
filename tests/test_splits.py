"""NeRSemble protocol: train = training sequences × training cameras, val = held-out camera
(novel view), test = held-out sequence × all cameras (novel expression)."""

import itertools

import pytest

from gem_jax.data.splits import SPLITS, nersemble_split, split_of

CAMERAS = [3, 0, 7, 5]
SEQUENCES = ["EMO-1", "EXP-2", "FREE"]


def test_every_pair_lands_in_exactly_one_split_of_the_protocol():
    splits = nersemble_split(CAMERAS, SEQUENCES, held_out_camera=7, held_out_sequence="EXP-2")
    assert set(splits) == set(SPLITS)
    assert splits["train"] == [(s, c) for s in ("EMO-1", "FREE") for c in (3, 0, 5)]
    assert splits["val"] == [("EMO-1", 7), ("FREE", 7)]
    assert splits["test"] == [("EXP-2", c) for c in CAMERAS]
    every = [p for split in SPLITS for p in splits[split]]
    assert sorted(every) == sorted(itertools.product(SEQUENCES, CAMERAS))


def test_split_of_agrees_with_the_table():
    splits = nersemble_split(CAMERAS, SEQUENCES, held_out_camera=0, held_out_sequence="FREE")
    for split, pairs in splits.items():
        for s, c in pairs:
            assert split_of(s, c, held_out_camera=0, held_out_sequence="FREE") == split


@pytest.mark.parametrize("kwargs, culprit", [
    (dict(held_out_camera=9), "held_out_camera"),
    (dict(held_out_sequence="nope"), "held_out_sequence"),
    (dict(camera_indices=[3]), "camera_indices"),
    (dict(camera_indices=[3, 3, 7]), "camera_indices"),
    (dict(sequences=["FREE"], held_out_sequence="FREE"), "sequences"),
])
def test_bad_protocols_name_the_argument(kwargs, culprit):
    args = dict(camera_indices=CAMERAS, sequences=SEQUENCES, held_out_camera=7, held_out_sequence="FREE") | kwargs
    with pytest.raises(ValueError, match=culprit):
        nersemble_split(**args)
