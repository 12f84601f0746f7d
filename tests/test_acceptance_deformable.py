"""Acceptance of deformable registration on real images (issue: regcore deformable).

Brain label maps are registered at 2 mm (cropped to the head, labels resampled by nearest
neighbour) to keep CI fast; full-resolution timings are in ``benchmarks/``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regcore import Grid, Image, read_image, register
from regcore.cli import main
from regcore.evaluation import landmark_tre, mean_dice
from regcore.losses import mse
from regcore.points import read_points
from regcore.sampling import sample_world
from regcore.synthetic import intensity_from_labels

from conftest import shared_data

# ----------------------------------------------------------------------------- 2D B-spline warp


@pytest.fixture(scope="module")
def bsplined_pair():
    fixed = read_image(shared_data("itk-2d", "BrainProtonDensitySliceBorder20.png"))
    moving = read_image(shared_data("itk-2d", "BrainProtonDensitySliceBSplined10.png"))
    return fixed, moving


@pytest.mark.parametrize("method", ["ffd", "svf", "demons"])
def test_bsplined10_mse_removed(bsplined_pair, method):
    fixed, moving = bsplined_pair
    before = float(mse(fixed.batch(), moving.batch()))
    res = register(fixed, moving, method)
    after = float(mse(fixed.batch(), res.warped.batch()))
    assert 1 - after / before >= 0.90, (method, before, after)
    if method in ("svf", "demons"):
        assert float(res.jacobian.data.min()) > 0  # diffeomorphic: no folding


def test_svf_inverse_is_consistent(bsplined_pair):
    from regcore.evaluation import inverse_consistency

    fixed, moving = bsplined_pair
    res = register(fixed, moving, "svf")
    grid = fixed.grid
    ic = inverse_consistency(res.deformable.displacement(grid).detach(), res.deformable.inverse_displacement(grid).detach(), grid)
    assert ic["mean_mm"] < 0.1 and ic["max_mm"] < 1.0


# ----------------------------------------------------------------------------- 3D brains


def _brain_labels(subject: int, factor: float = 2.0) -> Image:
    lab = read_image(shared_data("brain-labelmaps", f"subject{subject:02d}_seg.nii.gz"), dtype=None)
    a = lab.data[0].round().to(torch.int64)
    nz = torch.nonzero(a > 0)
    lo, hi = (nz.min(0).values - 4).clamp_min(0), nz.max(0).values + 5
    crop = a[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].clone()
    origin = lab.grid.index_points_to_world(np.array([lo[2], lo[1], lo[0]], dtype=float))
    grid = Grid(tuple(reversed(crop.shape)), lab.grid.spacing, origin, lab.grid.direction)
    coarse = grid.downsample(factor)
    return Image(sample_world(Image(crop, grid), coarse.world_points(dtype=torch.float64), mode="nearest"), coarse)


def _warp_labels(labels: Image, res, grid: Grid) -> torch.Tensor:
    pts = grid.world_points(dtype=torch.float32) + torch.movedim(res.displacement.data, 0, -1)
    return sample_world(labels, pts, mode="nearest")


# ----------------------------------------------------------------------------- lung CT


def test_lung_followup_to_baseline_landmarks():
    fixed = read_image(shared_data("lung-ct", "3DCT_lung_baseline_mask.mha"))
    moving = read_image(shared_data("lung-ct", "3DCT_lung_followup_mask.mha"))
    fixed_pts = read_points(shared_data("lung-ct", "3DCT_lung_baseline.txt"), fixed.grid)
    moving_pts = read_points(shared_data("lung-ct", "3DCT_lung_followup.txt"), moving.grid)
    identity = np.linalg.norm(fixed_pts - moving_pts, axis=1).mean()
    cfg = {"stages": [{"objective": [{"measure": "mse"}]}, {"objective": [{"measure": "mse"}]}]}
    affine = register(fixed, moving, "affine", config=cfg)
    tre_affine = landmark_tre(fixed_pts, moving_pts, affine.displacement).mean()
    deform = register(fixed, moving, "affine+ffd", config={"stages": [*cfg["stages"], {"objective": [{"measure": "mse"}]}]})
    tre_deform = landmark_tre(fixed_pts, moving_pts, deform.displacement).mean()
    print(f"lung TRE mm: identity {identity:.2f}, affine {tre_affine:.2f}, affine+ffd {tre_deform:.2f}")
    assert tre_affine < identity
    assert tre_deform < tre_affine


# ----------------------------------------------------------------------------- prostate MR -> US


def _prostate(split: str, case: str, side: str, box_mm: float = 60.0) -> tuple[Image, Image]:
    """Image and gland label, with the placeholder header replaced: every image fills the same
    ``box_mm`` cube (origin 0, identity direction)."""
    img = sitk.ReadImage(str(shared_data("prostate-mr-us", split, f"{side}_images", f"{case}.nii.gz")), sitk.sitkFloat32)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data("prostate-mr-us", split, f"{side}_labels", f"{case}.nii.gz"))))
    size = img.GetSize()
    grid = Grid(size, [box_mm / (s - 1) for s in size])
    data = torch.from_numpy(sitk.GetArrayFromImage(img))
    gland = torch.from_numpy(((lab[0] if lab.ndim == 4 else lab) > 0.5).astype(np.int64))  # channel 0: the gland
    return Image(data, grid), Image(gland, grid)


PROSTATE_CASES = [("test", "case000025"), ("test", "case000026"), ("train", "case000000"),
                  ("train", "case000001"), ("train", "case000002"), ("train", "case000003")]


@pytest.mark.parametrize("measure", ["mi"])
def test_prostate_mr_to_us_gland_dice(measure):
    before, after = [], []
    for split, case in PROSTATE_CASES:
        fixed, fixed_gland = _prostate(split, case, "fixed")
        moving, moving_gland = _prostate(split, case, "moving")
        before.append(mean_dice(fixed_gland.data, sample_world(moving_gland, fixed.grid.world_points(), mode="nearest"), [1]))
        obj = [{"measure": measure}]
        res = register(fixed, moving, "affine+ffd", config={"stages": [{"objective": obj, "init": "geometry"},
                                                                      {"objective": obj}, {"objective": obj}]})
        after.append(mean_dice(fixed_gland.data, _warp_labels(moving_gland, res, fixed.grid), [1]))
    print(f"prostate gland Dice ({measure}): before {np.round(before, 3)}, after {np.round(after, 3)}")
    assert np.mean(after) > np.mean(before)


# ----------------------------------------------------------------------------- CLI contract


def test_cli_deformable_writes_jacobian(tmp_path, bsplined_pair):
    fixed, moving = bsplined_pair
    out = tmp_path / "out"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stages:\n  - pyramid: {factors: [4, 2], iterations: [20, 10]}\n  - pyramid: {factors: [4, 2], iterations: [20, 10]}\n"
                   "  - pyramid: {factors: [4, 2], iterations: [30, 20]}\n")
    rc = main(["register", str(shared_data("itk-2d", "BrainProtonDensitySliceBorder20.png")),
               str(shared_data("itk-2d", "BrainProtonDensitySliceBSplined10.png")), "--method", "affine+svf",
               "--config", str(cfg), "--out", str(out), "--device", "cpu", "-q"])
    assert rc == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "affine+svf" and result["deformable"]["type"] == "svf"
    jac = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "jacobian.nii.gz")))
    assert jac.min() > 0 and result["jacobian"]["fraction_nonpositive"] == 0
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    moving_itk = sitk.ReadImage(str(shared_data("itk-2d", "BrainProtonDensitySliceBSplined10.png")), sitk.sitkFloat32)
    by_field = sitk.GetArrayFromImage(sitk.Resample(moving_itk, warped, sitk.DisplacementFieldTransform(field),
                                                    sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    ours = sitk.GetArrayFromImage(warped)
    inner = (slice(5, -5), slice(5, -5))
    np.testing.assert_allclose(by_field[inner], ours[inner], atol=1e-2)
