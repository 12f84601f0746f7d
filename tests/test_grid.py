"""The coordinate convention: index <-> world <-> normalised, checked against SimpleITK and grid_sample."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from regcore import Grid, InputError
from regcore.io import apply_grid_to_sitk

from conftest import rotation_direction


@pytest.mark.parametrize("dim", [2, 3])
def test_index_to_world_matches_simpleitk(dim):
    size = (7, 6, 5)[:dim]
    spacing = (0.7, 1.3, 2.5)[:dim]
    origin = (-12.5, 40.0, 3.25)[:dim]
    direction = rotation_direction(dim, 33.0)
    grid = Grid(size, spacing, origin, direction.ravel())
    img = apply_grid_to_sitk(sitk.Image(list(size), sitk.sitkFloat32), grid)
    rng = np.random.default_rng(1)
    index = rng.uniform(-1, 6, (20, dim))
    ours = grid.index_points_to_world(index)
    theirs = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in index])
    np.testing.assert_allclose(ours, theirs, atol=1e-9)
    np.testing.assert_allclose(grid.world_points_to_index(ours), index, atol=1e-9)


def test_world_points_order_and_values():
    grid = Grid((4, 3, 2), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0), rotation_direction(3).ravel())
    pts = grid.world_points(dtype=torch.float64)
    assert pts.shape == (2, 3, 4, 3)  # (z, y, x, D)
    # tensor element [k, j, i] is index (i, j, k)
    np.testing.assert_allclose(pts[1, 2, 3].numpy(), grid.index_points_to_world(np.array([3.0, 2.0, 1.0])), atol=1e-12)
    np.testing.assert_allclose(pts[0, 0, 0].numpy(), grid.origin, atol=1e-12)


@pytest.mark.parametrize("size", [(5, 4), (6, 7), (4, 5, 6), (3, 8, 5)])
def test_normalized_coordinates_sample_the_right_voxel(size):
    """n = 2 i / (size - 1) - 1 with align_corners=True picks voxel i exactly (odd and even sizes)."""
    grid = Grid(size, [1.5] * len(size))
    data = torch.arange(np.prod(size), dtype=torch.float64).reshape(grid.shape)
    rng = np.random.default_rng(0)
    index = np.stack([rng.integers(0, s, 10) for s in size], axis=1).astype(np.float64)
    n = torch.as_tensor(index @ grid.index_to_normalized()[:-1, :-1].T + grid.index_to_normalized()[:-1, -1])
    assert torch.all(n.abs() <= 1 + 1e-12)
    g = n.reshape(1, *([1] * (len(size) - 1)), -1, len(size))
    sampled = F.grid_sample(data[None, None], g, align_corners=True, mode="bilinear").reshape(-1)
    expected = torch.tensor([data[tuple(int(v) for v in reversed(i))] for i in index], dtype=torch.float64)
    torch.testing.assert_close(sampled, expected, atol=1e-9, rtol=0)
    np.testing.assert_allclose(grid.index_to_normalized()[:-1, :-1] @ np.zeros(len(size)) + grid.index_to_normalized()[:-1, -1], -1.0)


def test_world_normalized_roundtrip_and_corners():
    grid = Grid((9, 8, 7), (0.5, 1.0, 2.0), (1.0, 2.0, 3.0), rotation_direction(3).ravel())
    corners = grid.corners()
    n = corners @ grid.world_to_normalized()[:3, :3].T + grid.world_to_normalized()[:3, 3]
    assert np.allclose(np.abs(n), 1.0)
    np.testing.assert_allclose(grid.center(), corners.mean(0), atol=1e-12)


def test_downsample_keeps_the_physical_box():
    grid = Grid((101, 64, 33), (0.8, 1.0, 2.5), (5.0, -3.0, 7.0), rotation_direction(3).ravel())
    coarse = grid.downsample(4)
    assert coarse.size == (25, 16, 8)
    np.testing.assert_allclose(coarse.corners(), grid.corners(), atol=1e-9)
    assert coarse.direction == grid.direction
    # min_size keeps short axes from collapsing
    assert grid.downsample(16, min_size=8).size == (8, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(size=(4,)), "2D or 3D"),
        (dict(size=(4, 0)), "positive"),
        (dict(size=(4, 4), spacing=(1.0, -1.0)), "spacing"),
        (dict(size=(4, 4), spacing=(1.0, float("nan"))), "spacing"),
        (dict(size=(4, 4), direction=(1.0, 0.0, 1.0, 0.0)), "direction"),
        (dict(size=(4, 4, 4), origin=(0.0, 0.0)), "origin"),
    ],
)
def test_invalid_grids_raise(kwargs, match):
    with pytest.raises(InputError, match=match):
        Grid(**kwargs)


@pytest.mark.parametrize("dim", [2, 3])
def test_index_ramps_sum_to_the_affine_map_of_the_voxel_centres(dim):
    """The broadcast sum of the per-axis ramps is the matrix applied to every voxel's index
    (here world -> another grid's normalised coordinates, behind a rotation)."""
    size = (7, 9, 5)[:dim]
    grid = Grid(size, (1.5, 0.8, 2.0)[:dim], (10.0, -4.0, 3.0)[:dim], rotation_direction(dim, 20.0))
    other = Grid((11, 6, 8)[:dim], (1.0, 1.2, 0.7)[:dim], (2.0, 1.0, -5.0)[:dim])
    matrix = other.world_to_normalized() @ grid.index_to_world()
    ramps = grid.index_ramps(matrix, dtype=torch.float64)
    assert [tuple(r.shape) for r in ramps] == [tuple(n if k == t else 1 for k in range(dim)) + (dim,)
                                               for t, n in enumerate(grid.shape)]
    total = sum(ramps)
    points = grid.world_points(dtype=torch.float64)
    expected = points @ torch.as_tensor(other.world_to_normalized()[:dim, :dim]).T + torch.as_tensor(other.world_to_normalized()[:dim, dim])
    torch.testing.assert_close(total, expected, atol=1e-12, rtol=0)
