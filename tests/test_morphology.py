# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Small-region cleaning equals skimage's remove_small_objects / remove_small_holes (the independent reference),
across the row bands the implementation counts in, and keeps border background open when asked."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.morphology import remove_small_holes, remove_small_objects

from custom.data.morphology import drop_small_pieces, fill_small_holes


@pytest.mark.parametrize("max_size", [0, 3, 25])
def test_equal_to_skimage_on_noise_taller_than_a_band(max_size):
    mask = np.random.default_rng(max_size).random((1300, 90)) > 0.55  # 1300 rows: three bands of 512
    np.testing.assert_array_equal(drop_small_pieces(mask, max_size), remove_small_objects(mask, max_size=max_size))
    np.testing.assert_array_equal(fill_small_holes(mask, max_size), remove_small_holes(mask, max_size=max_size))


def test_border_background_is_kept_open_on_request():
    mask = np.ones((6, 6), bool)
    mask[0, 2] = False  # touches the border
    mask[3, 3] = False  # enclosed
    filled = fill_small_holes(mask, 1, fill_border=False)
    assert not filled[0, 2] and filled[3, 3]
    assert fill_small_holes(mask, 1).all()  # skimage's rule: both filled
