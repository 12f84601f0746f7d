"""Acceptance of the deformable presets on brain label maps (issue "regcore deformable", 3):

    make intensity images from the label maps of at least 6 subject pairs (recipe seeded, in
    regcore/synthetic.py), run ``affine`` then ``svf`` and ``ffd``. Mean Dice over the foreground
    labels rises by at least 0.08 over affine alone on every pair; ``svf`` leaves less than 0.05 %
    of voxels with a non-positive Jacobian.

Images: ../shared/data/brain-labelmaps, cropped to the head, resampled to 2 mm by nearest neighbour
(test time), intensities by :func:`regcore.synthetic.intensity_from_labels` (shared contrast seed 0,
per-image seed = subject number). The presets run unchanged: their deformable pyramid is given in
mm (``spacing_mm: [4, 2]``), so on these 2 mm images the levels are at 4 mm and 2 mm (factors 2
and 1), the same physical levels as on the 1 mm images the presets were tuned for.

Slow: 50 to 100 s per pair on 2 shared CPU cores (6.5 min for the 6 pairs: two affine runs and
two deformable runs at 2 mm per pair), so it runs only with ``COHORTREG_SLOW=1`` (skipped with that
reason otherwise). ``benchmarks/brain_pairs.py`` prints the same numbers.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from regcore import Grid, Image, read_image, register
from regcore.evaluation import mean_dice
from regcore.registration import linear_displacement
from regcore.sampling import sample_world
from regcore.synthetic import crop_to_labels, intensity_from_labels

from conftest import shared_data

PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)]
FACTOR = 2.0
MIN_GAIN = 0.08
MAX_NONPOSITIVE_PERCENT = 0.05

slow = pytest.mark.skipif(os.environ.get("COHORTREG_SLOW") != "1",
                          reason="slow (minutes per pair on CPU): set COHORTREG_SLOW=1 to run the brain label-map acceptance")


def load_labels(subject: int, factor: float = FACTOR) -> Image:
    """Label map cropped to the head (4-voxel margin), resampled by nearest neighbour at ``factor``."""
    lab = read_image(shared_data("brain-labelmaps", f"subject{subject:02d}_seg.nii.gz"), dtype=None)
    return crop_to_labels(lab, margin=4, factor=factor)


def _dice(displacement: Image, fixed_labels: Image, moving_labels: Image, labels: list[int]) -> float:
    pts = fixed_labels.grid.world_points() + torch.movedim(displacement.data, 0, -1)
    return mean_dice(fixed_labels.data, sample_world(moving_labels, pts, mode="nearest"), labels)


@pytest.mark.realdata
@slow
@pytest.mark.parametrize("pair", PAIRS, ids=[f"{f}-{m}" for f, m in PAIRS])
def test_brain_labelmaps_dice_gain(pair):
    torch.manual_seed(0)
    fi, mi = pair
    fl, ml = load_labels(fi), load_labels(mi)
    fixed, moving = intensity_from_labels(fl, 0, fi), intensity_from_labels(ml, 0, mi)
    labels = sorted(set(torch.unique(fl.data).tolist()) - {0})
    row = {}
    for method in ("svf", "ffd"):
        # affine is the chain's first two stages; its Dice is read from the chain's linear map
        res = register(fixed, moving, f"affine+{method}")
        row["affine"] = _dice(linear_displacement(res.transform.matrix().detach(), fixed), fl, ml, labels)
        row[method] = _dice(res.displacement, fl, ml, labels)
        row[f"{method}_nonpositive_percent"] = 100 * float((res.jacobian.data <= 0).double().mean())
        row[f"{method}_seconds"] = res.seconds
    print(f"brain pair {fi}->{mi}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()))
    assert row["svf"] - row["affine"] >= MIN_GAIN, row
    assert row["ffd"] - row["affine"] >= MIN_GAIN, row
    assert row["svf_nonpositive_percent"] < MAX_NONPOSITIVE_PERCENT, row


# ----------------------------------------------------------------------------- preset pieces (fast)


def test_svf_velocity_grid_by_spacing_spans_the_image_box():
    from regcore.transforms.svf import velocity_grid

    grid = Grid((161, 181, 217), (1.0, 1.0, 1.0), (10.0, -5.0, 3.0))
    vg = velocity_grid(grid, 4.0)
    np.testing.assert_allclose(vg.corners().min(0), grid.corners().min(0), atol=1e-9)
    np.testing.assert_allclose(vg.corners().max(0), grid.corners().max(0), atol=1e-9)
    assert all(3.9 < s < 4.1 for s in vg.spacing) and vg.size == (41, 46, 55)
    assert velocity_grid(Grid((5, 5, 5), (1.0, 1.0, 1.0)), 4.0).size == (4, 4, 4)  # never below min_size
