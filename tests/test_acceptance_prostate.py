"""Acceptance on prostate MR -> transrectal US pairs (issue 3, "prostate-mr-us acceptance").

Issue text: on the two ``test/`` cases and four ``train/`` cases, MR -> US with MI or NGF raises
the gland Dice over the unregistered pair on average.

Geometry. The headers are placeholders (0.4 mm, dummy origin). The data README says to treat both
images as filling the same physical box, but the labels say otherwise: in box units the US gland
fills 2.4 times the MR gland's share of its box, while with *equal isotropic voxels* the gland
volumes agree (median ratio ~1) and the vectors from the gland to the two landmark regions match
axis by axis (``test_equal_voxels_match_the_anatomy``). So both images get 1.6 mm voxels (the
volumes are then 20-60 ml, as prostates are; DeepReg's source data is 0.8 mm, halved) and are
centred on the origin. Labels are 4D ``(3, z, y, x)`` with channel 0 the gland (case000002's are
3D, the gland only); they are warped by nearest neighbour with the fitted transform.

Status: not met. Rigid MR -> US registration with MI or NGF *lowers* the mean gland Dice (see the
xfail reason), and no setting we found changes that on held-out cases: ``benchmarks/
prostate_landscape.py`` scans translations within +-9.6 mm on all 27 pairs and reports the gland
Dice at each measure's maximum. A likely reason: the images are not real scans. DeepReg's paired
MR-US prostate demo, where these files come from, says "This is a demo without real clinical
data due to regulatory restrictions. The MR and ultrasound images used are simulated dummy
images" (demos/paired_mrus_prostate/README.md), and its author calls them "fake" / "blurred"
images (DeepReg issues #414, #621); the labels carry the anatomy, the intensities need not. The mono-modal control below (MR against a shifted copy of itself,
on the US grid) recovers the shift with MI, so warping and scoring are sound. The registrations
run single-threaded and at pyramid factors 2 and 1 so the module takes well under a minute.
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
SPACING_MM = 1.6


pytestmark = pytest.mark.usefixtures("single_thread")


def _load(split: str, case: str, side: str, spacing: float | None = SPACING_MM) -> tuple[Image, Image]:
    """Image and gland label of one side: isotropic ``spacing`` mm voxels, centred on the origin
    (``spacing=None``: the data README's reading, a 60 mm box whatever the voxel count)."""
    base = shared_data("prostate-mr-us", split)
    img = sitk.ReadImage(str(base / f"{side}_images" / f"{case}.nii.gz"), sitk.sitkFloat32)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(base / f"{side}_labels" / f"{case}.nii.gz")))
    size = img.GetSize()
    voxel = [spacing] * 3 if spacing is not None else [60.0 / (s - 1) for s in size]
    grid = Grid(size, voxel, [-(s - 1) * v / 2 for s, v in zip(size, voxel)])
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
    # geometry init: both images are centred on the origin, and moments of MR vs US intensities mean nothing
    return {"stages": [{"objective": [{"measure": measure}], "init": "geometry",
                        "pyramid": {"factors": [2, 1], "iterations": [60, 30]}}]}


def _channels(split: str, case: str, side: str) -> np.ndarray:
    base = shared_data("prostate-mr-us", split)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(base / f"{side}_labels" / f"{case}.nii.gz")))
    return lab if lab.ndim == 4 else lab[None]


def test_equal_voxels_match_the_anatomy():
    """Why the images get equal voxels rather than a common box (module docstring)."""
    volume_ratio, box_ratio, offsets = [], [], []
    for split, case in CASES:
        us, mr = _channels(split, case, "fixed"), _channels(split, case, "moving")
        n_us, n_mr = (us[0] > 0.5).sum(), (mr[0] > 0.5).sum()
        volume_ratio.append(n_us / n_mr)  # equal voxels: volumes in voxel counts
        box_ratio.append((n_us / us[0].size) / (n_mr / mr[0].size))  # common box: fractions of the box
        for k in range(1, min(len(us), len(mr))):  # landmark region centroid - gland centroid, voxels
            rel = [np.argwhere(lab[k] > 0.5).mean(0) - np.argwhere(lab[0] > 0.5).mean(0) for lab in (us, mr)]
            offsets.append(rel)
    print(f"US/MR gland volume, equal voxels: {np.round(volume_ratio, 2)}; common box: {np.round(box_ratio, 2)}")
    assert 0.85 < np.median(volume_ratio) < 1.15
    assert np.median(box_ratio) > 2.0
    us_rel, mr_rel = np.array([o[0] for o in offsets]), np.array([o[1] for o in offsets])
    # same axes, same signs, same scale: the offsets agree far better than with any flip of an axis
    agree = np.linalg.norm(us_rel - mr_rel, axis=1).mean()
    for axis in range(3):
        flipped = mr_rel.copy()
        flipped[:, axis] *= -1
        assert agree < 0.7 * np.linalg.norm(us_rel - flipped, axis=1).mean()
    assert agree < 0.5 * np.linalg.norm(us_rel, axis=1).mean()


def test_unregistered_gland_overlap(pairs):
    """Centred equal-voxel images put the glands roughly on top of each other (mean Dice ~0.60)."""
    before = [_gland_dice(fg, mg) for _, _, fg, _, mg in pairs]
    print(f"unregistered gland Dice: {np.round(before, 3)}")
    assert 0.55 < np.mean(before) < 0.65
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
        "(0.598 unregistered -> 0.457 MI, 0.447 NGF); SimpleITK's own rigid Mattes-MI registration "
        "lowers it too (0.546; 0.623 -> 0.397 on the 21 other pairs). Neither measure is informative "
        "for the gland: over translations within +-9.6 mm, the Dice at the measure's maximum is below "
        "the unregistered Dice on the 21 held-out pairs for MI (-0.060), MI in the US fan (-0.043) "
        "and NGF in the fan (-0.089), while the best shift reaches 0.81 "
        "(benchmarks/prostate_landscape.py)"
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
