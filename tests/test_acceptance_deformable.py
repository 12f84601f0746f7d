"""Acceptance of deformable registration on real images (issue: regcore deformable).

Brain label maps (Dice gain over affine on 6 pairs) are in ``test_acceptance_brain.py`` (slow:
``COHORTREG_SLOW=1``); prostate MR->US in ``test_acceptance_prostate.py``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from regcore import read_image, register
from regcore.cli import main
from regcore.evaluation import landmark_tre
from regcore.losses import mse
from regcore.points import read_points

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
