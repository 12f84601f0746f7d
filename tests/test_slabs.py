"""Slab-by-slab passes over large volumes (regcore.slabs): the smoothing, the first-order
composition and lcc's window sums give the textbook results on volumes large enough to be cut."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from regcore.fields import compose_first_order
from regcore.grid import Grid
from regcore.losses.local_cc import window_sum
from regcore.pyramid import gaussian_smooth
from regcore.slabs import SLAB_BYTES, slab_ranges, worth_slabs

SHAPE = (150, 160, 170)  # (z, y, x): 16.3 MB per float32 channel, so 3 channels are cut into slabs


@pytest.fixture(scope="module")
def field() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, *SHAPE)


def test_slabs_cover_the_volume_once(field):
    assert worth_slabs(field) and not worth_slabs(field[:1, :40])
    assert not worth_slabs(torch.empty(field.shape, device="meta"))  # not on the CPU: whole-volume passes
    assert not worth_slabs(field.clone().requires_grad_(True))  # differentiated: whole-volume passes
    for across in (1, 2):
        ranges = list(slab_ranges(field, across))
        assert len(ranges) > 4
        assert ranges[0][0] == 0 and all(a + w == b for (a, w), (b, _) in zip(ranges, ranges[1:]))
        assert sum(w for _, w in ranges) == field.shape[across]
        assert max(w for _, w in ranges) * (field.numel() // field.shape[across]) * 4 <= SLAB_BYTES


def test_gaussian_smoothing_in_slabs_matches_scipy(field):
    sigma = [0.5, 1.25, 1.0]  # voxels; kernel radii 2, 4, 3 as scipy's with truncate=3
    out = gaussian_smooth(field, sigma)
    expected = np.stack([ndimage.gaussian_filter(c.numpy().astype(np.float64), sigma, mode="nearest", truncate=3.0)
                         for c in field])
    assert np.abs(out.numpy() - expected).max() < 1e-5


def test_integer_volumes_are_smoothed_to_float_at_any_size():
    labels = torch.randint(0, 5, (1, 130, 130, 130), dtype=torch.int32)  # 8.8 MB: large enough for slabs
    out = gaussian_smooth(labels, [1.0, 1.0, 1.0])
    assert out.is_floating_point()
    assert torch.allclose(out, gaussian_smooth(labels.float(), [1.0, 1.0, 1.0]))


def test_first_order_composition_in_slabs_matches_numpy(field):
    spacing = (1.0, 1.2, 0.8)  # (x, y, z) mm
    grid = Grid(tuple(reversed(SHAPE)), spacing, (0.0, 0.0, 0.0))
    u = field * 2.0
    step = torch.roll(field, 7, dims=1) * 0.3
    out = compose_first_order(u, step, grid)
    un, sn = u.numpy().astype(np.float64), step.numpy().astype(np.float64)
    expected = un + sn
    for k, h in enumerate(spacing):  # index axis k (x, y, z) is tensor dim 3 - k
        expected += np.gradient(un, h, axis=3 - k) * sn[k][None]
    assert np.abs(out.numpy() - expected).max() < 1e-4
    assert torch.equal(u, field * 2.0)  # the input is left alone


def test_window_sums_in_slabs_match_a_box_filter(field):
    x = field[None, :2].abs()
    out = window_sum(x, 2, 3)
    box = np.stack([ndimage.uniform_filter(c.numpy().astype(np.float64), size=5, mode="constant") * 125 for c in x[0]])
    assert np.abs(out[0].numpy() - box).max() < 1e-3
