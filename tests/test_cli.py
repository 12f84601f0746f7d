"""The ``regcore`` command: its output contract, checked with SimpleITK; errors; the demo."""

from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk

from regcore.cli import main
from regcore.io import write_image

from conftest import make_image, rotation_direction
from test_registration import _moved, _translation


def test_register_writes_the_contract(tmp_path, capsys):
    fixed = make_image((30, 34, 38), spacing=(1.2, 1.0, 0.9), origin=(-10.0, 5.0, 2.0), direction=rotation_direction(3, 15).ravel(), n=20)
    moving = _moved(fixed, _translation([1.5, -1.0, 0.5]))
    write_image(fixed, tmp_path / "fixed.nii.gz")
    write_image(moving, tmp_path / "moving.mha")  # any SimpleITK format
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("stages:\n  - pyramid: {factors: [2, 1], iterations: [20, 10]}\n")
    out = tmp_path / "out"
    rc = main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.mha"), "--method", "rigid",
               "--config", str(cfg), "--out", str(out), "--device", "cpu"])
    assert rc == 0
    assert "rigid:" in capsys.readouterr().out
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "rigid" and len(result["config_hash"]) == 16
    assert result["config"]["stages"][0]["pyramid"]["iterations"] == [20, 10]
    assert len(result["loss_per_level"]) == 2 and result["iterations"] > 0
    assert result["device"] == "cpu" and result["seconds"] > 0
    np.testing.assert_allclose(result["transform"]["translation_mm"], [1.5, -1.0, 0.5], atol=0.15)

    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert np.allclose(field.GetDirection(), warped.GetDirection(), atol=1e-5)
    moving_itk = sitk.ReadImage(str(tmp_path / "moving.mha"), sitk.sitkFloat32)
    by_field = sitk.Resample(moving_itk, warped, sitk.DisplacementFieldTransform(field), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    by_tfm = sitk.Resample(moving_itk, warped, sitk.ReadTransform(str(out / "transform.tfm")), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    ours = sitk.GetArrayFromImage(warped)
    inner = (slice(3, -3),) * 3  # ITK and grid_sample differ only in the last half voxel of the moving image
    np.testing.assert_allclose(sitk.GetArrayFromImage(by_field)[inner], ours[inner], atol=2e-4)
    np.testing.assert_allclose(sitk.GetArrayFromImage(by_tfm)[inner], ours[inner], atol=2e-4)


def test_errors_exit_2_with_the_file_name(tmp_path, capsys):
    fixed = make_image((10, 12, 14))
    write_image(fixed, tmp_path / "fixed.nii.gz")
    rc = main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "absent.nii.gz"), "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "absent.nii.gz" in capsys.readouterr().err
    rc = main(["register", str(tmp_path / "fixed.nii.gz"), str(tmp_path / "fixed.nii.gz"), "--method", "bogus",
               "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown method 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "result.json").exists()


def test_methods_lists_presets(capsys):
    assert main(["methods"]) == 0
    names = capsys.readouterr().out.split()
    assert {"rigid", "affine"} <= set(names)
    assert main(["methods", "affine"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert [s["transform"] for s in cfg["stages"]] == ["rigid", "affine"]


def test_demo_recovers_the_known_transform(tmp_path, capsys):
    rc = main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads((tmp_path / "demo" / "result.json").read_text())
    assert summary["demo"]["corner_error_mm_mean"] < 0.5
    assert "mean error over the brain bounding-box corners" in out
