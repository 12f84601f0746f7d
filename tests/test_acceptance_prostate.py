"""Acceptance on prostate MR -> transrectal US pairs (issue 3, "prostate-mr-us acceptance").

Issue text: on the two ``test/`` cases and four ``train/`` cases, MR -> US with MI or NGF raises
the gland Dice over the unregistered pair on average.

Data notes (../shared/data/README.md): fixed = US 44x59x41, moving = MR 64x64x60; the headers are
placeholders, so every image is put on the same 60 mm box (origin 0, identity direction). Labels
are 4D ``(3, z, y, x)`` with channel 0 the gland (case000002's are 3D, the gland only). Labels are
warped by nearest neighbour with the fitted transform.

Status: not met. Rigid MR -> US registration with MI or NGF *lowers* the mean gland Dice on these
six pairs (see the xfail reason). The similarity itself is the cause, not the pipeline: the
mono-modal control below (MR against a shifted copy of itself, on the US grid) recovers the
shift with MI. The registrations run single-threaded and at pyramid factors 4 and 2 (the US is
blurred far below its voxel size) so the module takes well under a minute.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regcore import Grid, Image, register
from regcore.evaluation import mean_dice
from regcore.sampling import sample_world

from conftest import shared_data

CASES = [("test", "case000025"), ("test", "case000026"), ("train", "case000000"),
         ("train", "case000001"), ("train", "case000002"), ("train", "case000003")]
BOX_MM = 60.0


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Small volumes: intra-op threads add little and stall badly on a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _load(split: str, case: str, side: str) -> tuple[Image, Image]:
    """Image and gland label of one side, both on the common ``BOX_MM`` box."""
    base = shared_data("prostate-mr-us", split)
    img = sitk.ReadImage(str(base / f"{side}_images" / f"{case}.nii.gz"), sitk.sitkFloat32)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(base / f"{side}_labels" / f"{case}.nii.gz")))
    size = img.GetSize()
    grid = Grid(size, [BOX_MM / (s - 1) for s in size])
    gland = (lab[0] if lab.ndim == 4 else lab) > 0.5  # channel 0: the gland
    data = torch.from_numpy(sitk.GetArrayFromImage(img))
    return Image(data, grid), Image(torch.from_numpy(gland.astype(np.int64)), grid)


@pytest.fixture(scope="module")
def pairs():
    """``[(name, us, us_gland, mr, mr_gland)]`` for the six cases."""
    out = []
    for split, case in CASES:
        us, us_gland = _load(split, case, "fixed")
        mr, mr_gland = _load(split, case, "moving")
        out.append((f"{split}/{case}", us, us_gland, mr, mr_gland))
    return out


def _gland_dice(fixed_gland: Image, moving_gland: Image, displacement: torch.Tensor | None = None) -> float:
    """Dice of the fixed gland and the moving gland sampled at ``x + u(x)`` (nearest)."""
    pts = fixed_gland.grid.world_points(dtype=torch.float32)
    if displacement is not None:
        pts = pts + torch.movedim(displacement, 0, -1)
    return mean_dice(fixed_gland.data, sample_world(moving_gland, pts, mode="nearest"), [1])


def _rigid(measure: str) -> dict:
    # geometry init: both images fill the same box, and moments of MR vs US intensities mean nothing
    return {"stages": [{"objective": [{"measure": measure}], "init": "geometry",
                        "pyramid": {"factors": [4, 2], "iterations": [60, 30]}}]}


def test_unregistered_gland_overlap(pairs):
    """The common-box geometry puts the glands on top of each other roughly (mean Dice ~0.52)."""
    before = [_gland_dice(fg, mg) for _, _, fg, _, mg in pairs]
    print(f"unregistered gland Dice: {np.round(before, 3)}")
    assert 0.45 < np.mean(before) < 0.6
    assert min(before) > 0.3


def test_monomodal_control_recovers_shift(pairs):
    """MR against a copy of itself shifted by (5, -3, 4) mm on the US grid: MI recovers the shift
    and the gland Dice goes to ~1, so registration, warping and scoring are sound here."""
    _, us, _, mr, mr_gland = pairs[0]
    shift = torch.tensor([5.0, -3.0, 4.0])
    pts = us.grid.world_points(dtype=torch.float32) + shift
    fixed = Image(sample_world(mr, pts), us.grid)
    fixed_gland = Image(sample_world(mr_gland, pts, mode="nearest"), us.grid)
    res = register(fixed, mr, "rigid", config=_rigid("mi"))
    np.testing.assert_allclose(res.transform.describe()["translation_mm"], shift.tolist(), atol=0.5)
    assert _gland_dice(fixed_gland, mr_gland, res.displacement.data) > 0.95


@pytest.mark.xfail(
    strict=True,
    reason=(
        "not met: rigid MR->US with MI (32 bins) or NGF lowers the mean gland Dice on these pairs "
        "(0.524 unregistered -> ~0.37 MI, ~0.48 NGF). Neither similarity is informative here: over "
        "translations within +-9 mm, the MI maximum has mean gland Dice ~0.33 and MI correlates "
        "negatively with gland Dice in 4 of 6 cases (NGF's maximum over +-12 mm: ~0.37); fan "
        "masks, fewer bins, more smoothing and bounded Adam steps do not change that"
    ),
)
@pytest.mark.parametrize("measure", ["mi", "ngf"])
def test_mr_to_us_raises_gland_dice(pairs, measure):
    before, after = [], []
    for name, us, us_gland, mr, mr_gland in pairs:
        before.append(_gland_dice(us_gland, mr_gland))
        res = register(us, mr, "rigid", config=_rigid(measure))
        after.append(_gland_dice(us_gland, mr_gland, res.displacement.data))
    report = f"gland Dice ({measure}): before {np.round(before, 3)}, after {np.round(after, 3)}"
    print(report)
    assert np.mean(after) > np.mean(before), report
