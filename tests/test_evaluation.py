"""regcore.evaluation: label centroid distances in world mm."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from regcore import Grid, Image
from regcore.evaluation import label_centroid_distances

DIRECTION = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _boxes(shape, shift):
    """Label 1 a box, label 2 a two-box region; ``shift`` (tensor dims) moves both."""
    a = torch.zeros(shape, dtype=torch.int64)
    a[4:10, 5:9, 3:12] = 1
    a[12:14, 2:4, 2:4] = 2
    a[12:14, 10:12, 10:12] = 2
    return a, torch.roll(a, shifts=shift, dims=tuple(range(len(shape))))


def test_centroid_distance_is_the_shift_in_world_mm():
    shape = (20, 16, 18)  # (z, y, x)
    grid = Grid((18, 16, 20), (0.5, 1.5, 2.0), (10.0, -3.0, 7.0), DIRECTION)
    a, b = _boxes(shape, (2, -1, 3))  # +2 along z, -1 along y, +3 along x (voxels)
    expected = float(np.linalg.norm(DIRECTION @ (np.array([3, -1, 2]) * np.array([0.5, 1.5, 2.0]))))
    got = label_centroid_distances(Image(a, grid), Image(b, grid))
    assert set(got) == {1, 2}
    assert got[1] == pytest.approx(expected, abs=1e-9)
    assert got[2] == pytest.approx(expected, abs=1e-9)  # the centroid of two parts moves alike
    assert label_centroid_distances(Image(a, grid), Image(a, grid))[1] == 0.0


def test_centroid_distance_2d_tensors_with_a_grid_and_absent_labels():
    a, b = _boxes((20, 16, 18), (0, 1, 0))
    a2, b2 = a[6], b[6]  # 2D slices: label 1 only, shifted one row
    grid = Grid((18, 16), (1.0, 3.0), (0.0, 0.0))
    got = label_centroid_distances(a2, b2, labels=[1, 5], grid=grid)
    assert got[1] == pytest.approx(3.0) and math.isnan(got[5])
    with pytest.raises(ValueError, match="grid"):
        label_centroid_distances(a2, b2)
    with pytest.raises(ValueError, match="size"):
        label_centroid_distances(a2, b2[:-1], grid=grid)
