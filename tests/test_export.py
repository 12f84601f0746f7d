"""`cohortreg export`: every complete pair's transform as ITK / ANTs / BIDS files that SimpleITK (and
ANTs, where installed) apply to reproduce the stored warped labels; inverses compose to identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import FAST_METHOD
from cohortreg.cli import main as cohortreg
from pipeline.ingest import ingest
from pipeline.manifest import read_manifest
from pipeline.pairs import make_pairs
from pipeline.runner import plan_pairs
from pipeline.store import read_warped_labels
from pipeline.task import register_pair
from regcore import method_config

PEER_PYTHON = os.environ.get("COHORTREG_PEER_PYTHON", sys.executable)


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_cohort):
    path = tmp_path_factory.mktemp("export") / "s.zarr"
    subjects = read_manifest(demo_cohort)
    ingest(subjects, path)
    pairs = make_pairs(subjects, "atlas", atlas="atlas")[:2]
    plan_pairs(path, pairs, method_config(FAST_METHOD))
    for i in range(2):
        assert register_pair(path, i, FAST_METHOD)["status"] == "complete"
    return path, {s.key: s for s in subjects}


def _resampled_labels(transform, fixed_path, moving_labels_path) -> np.ndarray:
    fixed = sitk.ReadImage(str(fixed_path))
    moving = sitk.ReadImage(str(moving_labels_path))
    out = sitk.Resample(moving, fixed, transform, sitk.sitkNearestNeighbor, 0, moving.GetPixelID())
    return sitk.GetArrayFromImage(out)


def test_itk_export_reproduces_the_stored_warped_labels(store, tmp_path):
    path, subjects = store
    out = tmp_path / "itk"
    assert cohortreg(["export", str(path), str(out), "--format", "itk", "--inverse"]) == 0
    for i, moving in enumerate(("sub-01", "sub-02")):
        folder = out / f"{moving}--to--atlas"
        stored = read_warped_labels(path, i).data[0].numpy()
        for transform in (sitk.ReadTransform(str(folder / "transform.h5")),
                          sitk.DisplacementFieldTransform(sitk.ReadImage(str(folder / "displacement.nii.gz"),
                                                                          sitk.sitkVectorFloat64))):
            warped = _resampled_labels(transform, subjects["atlas"].image, subjects[moving].labels)
            assert (warped == stored).mean() >= 0.999
        # the inverse (moving grid) undoes the forward map where both are defined
        forward = sitk.ReadTransform(str(folder / "transform.h5"))
        backward = sitk.ReadTransform(str(folder / "inverse_transform.h5"))
        img = sitk.ReadImage(str(subjects[moving].image))
        size = np.array(img.GetSize())
        rng = np.random.default_rng(0)
        for idx in rng.uniform(0.3, 0.7, size=(20, 3)) * (size - 1):
            y = img.TransformContinuousIndexToPhysicalPoint(idx.tolist())
            back = forward.TransformPoint(backward.TransformPoint(y))
            assert np.linalg.norm(np.subtract(back, y)) < 0.05 * min(img.GetSpacing())


def test_bids_and_ants_layouts(store, tmp_path):
    path, _ = store
    assert cohortreg(["export", str(path), str(tmp_path / "bids"), "--format", "bids", "--inverse"]) == 0
    desc = json.loads((tmp_path / "bids" / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "cohortreg"
    anat = tmp_path / "bids" / "sub-01" / "anat"
    assert sorted(p.name for p in anat.iterdir()) == [
        "sub-01_from-01_to-atlas_mode-image_xfm.h5", "sub-01_from-atlas_to-01_mode-image_xfm.h5",
        "sub-01_space-atlas_dseg.nii.gz"]
    assert sitk.ReadTransform(str(anat / "sub-01_from-01_to-atlas_mode-image_xfm.h5")).GetDimension() == 3
    assert cohortreg(["export", str(path), str(tmp_path / "ants"), "--format", "ants", "--pair", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "ants" / "sub-02--to--atlas").iterdir()) == [
        "sub-02--to--atlas_Warp.nii.gz", "warped_labels.nii.gz"]
    assert not (tmp_path / "ants" / "sub-01--to--atlas").exists()


def test_export_refuses_unknown_pairs_and_formats(store, tmp_path, capsys):
    path, _ = store
    assert cohortreg(["export", str(path), str(tmp_path / "x"), "--pair", "nope"]) == 2
    assert "no pair 'nope'" in capsys.readouterr().err


def _has_ants() -> bool:
    return subprocess.run([PEER_PYTHON, "-c", "import ants"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _has_ants(), reason="antspyx not installed (set COHORTREG_PEER_PYTHON, pip install -e '.[peers]')")
def test_ants_apply_transforms_reproduces_the_stored_warped_labels(store, tmp_path):
    path, subjects = store
    assert cohortreg(["export", str(path), str(tmp_path / "ants"), "--format", "ants", "--pair", "0"]) == 0
    warp = tmp_path / "ants" / "sub-01--to--atlas" / "sub-01--to--atlas_Warp.nii.gz"
    script = ("import sys, ants; f = ants.image_read(sys.argv[1]); m = ants.image_read(sys.argv[2]); "
              "ants.image_write(ants.apply_transforms(f, m, [sys.argv[3]], interpolator='nearestNeighbor'), sys.argv[4])")
    out = tmp_path / "ants_labels.nii.gz"
    subprocess.run([PEER_PYTHON, "-c", script, str(subjects["atlas"].image), str(subjects["sub-01"].labels), str(warp),
                    str(out)], check=True)
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out))).round().astype(np.int32)
    assert (warped == read_warped_labels(path, 0).data[0].numpy()).mean() >= 0.999
