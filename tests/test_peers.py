"""benchmarks/peers.py: the side-by-side harness (cohortreg alone here) and each peer's conventions.

The peer adapters run only where the peer is installed: in this interpreter, or in the one named by
``COHORTREG_PEER_PYTHON`` (e.g. a separate virtual environment with ``pip install -e '.[peers]'``).
Each turns a known translation between two images with different direction matrices into a
dense ITK displacement field; the test checks the field's sign, units and frame.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from regcore import Grid, Image, write_image
from regcore.sampling import sample_world

from conftest import ROOT, blobs

sys.path.insert(0, str(ROOT / "benchmarks"))
import peers  # noqa: E402
import peer_tools  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")
PEER_PYTHON = os.environ.get("COHORTREG_PEER_PYTHON", sys.executable)
SHIFT = np.array([4.0, -2.0, 6.0])  # mm, whole voxels: fixed point x sits at x + SHIFT in the moving image
DIRECTION = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])


def _shifted_pair(folder: Path, shape=(40, 44, 36), spacing=2.0) -> tuple[Path, Path, Path, Path]:
    """Blob images (fixed and moving = fixed moved by SHIFT, another direction) and their labels."""
    grid = Grid(tuple(reversed(shape)), (spacing,) * 3, (-30.0, 20.0, -10.0), DIRECTION)
    data = torch.from_numpy(blobs(shape, n=30, seed=5, sigma=0.1)).float()
    fixed = Image(data, grid)
    labels = Image((data > 0.25).to(torch.int64) + (data > 0.5).to(torch.int64), grid)
    corners = grid.corners()  # the moving grid: identity direction over the same box, on the same
    lo, hi = corners.min(0) - 3 * spacing, corners.max(0) + 3 * spacing  # lattice of voxel centres
    moving_grid = Grid(tuple(int(n) for n in np.ceil((hi - lo) / spacing) + 1), (spacing,) * 3, tuple(lo), np.eye(3))
    pts = moving_grid.world_points(dtype=torch.float64) - torch.as_tensor(SHIFT)  # moving(y) = fixed(y - SHIFT)
    moving = Image(sample_world(fixed, pts).float(), moving_grid)
    moving_labels = Image(sample_world(labels, pts, mode="nearest"), moving_grid)
    paths = [folder / n for n in ("fixed.nii.gz", "moving.nii.gz", "fixed_labels.nii.gz", "moving_labels.nii.gz")]
    for image, path in zip((fixed, moving, labels, moving_labels), paths):
        write_image(image, path, np.int16 if not image.data.is_floating_point() else None)
    return tuple(paths)  # type: ignore[return-value]


def test_harness_end_to_end_with_cohortreg_alone(tmp_path, monkeypatch):
    fixed, moving, fixed_labels, moving_labels = _shifted_pair(tmp_path)
    manifest = tmp_path / "cohort.csv"
    with manifest.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["subject", "image", "labels"])
        w.writerow(["a", fixed.name, fixed_labels.name])
        w.writerow(["b", moving.name, moving_labels.name])
    out = tmp_path / "peers.json"
    rc = peers.main(["--manifest", str(manifest), "--tools", "cohortreg", "--method", "affine",
                     "--threads", "1", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["pair"] for r in rows] == ["b->a", "a->b"]  # each pair and its reverse
    for row in rows:
        assert row["tool"] == "cohortreg" and "error" not in row
        assert row["dice"] > 0.9  # a pure shift, recovered by the affine preset
        assert row["nonpositive_jacobian_percent"] == 0.0
        assert row["seconds"] > 0 and row["peak_rss_mb"] > 0
    assert result["summary"]["cohortreg"]["pairs"] == 2
    header, _, line = peers.format_summary(result["summary"]).splitlines()
    cells = dict(zip(header.strip("|").split(" | "), line.strip("|").split(" | ")))
    assert float(cells["mean Dice"].strip()) == pytest.approx(result["summary"]["cohortreg"]["dice"], abs=1e-4)
    assert float(cells["centroid mm"].strip()) == pytest.approx(result["summary"]["cohortreg"]["centroid_mm"], abs=0.01)

    def no_new_runs(*args, **kwargs):
        raise AssertionError("--resume ran a tool whose run had finished")

    with monkeypatch.context() as patch:  # --resume reads the finished runs back and scores them again
        patch.setattr(peers, "run_tool", no_new_runs)
        again = tmp_path / "again.json"
        assert peers.main(["--manifest", str(manifest), "--tools", "cohortreg", "--method", "affine", "--threads", "1",
                           "--work", str(tmp_path / "work"), "--resume", "--out", str(again)]) == 0
        with pytest.raises(AssertionError, match="--resume ran"):  # another method is run afresh
            peers.main(["--manifest", str(manifest), "--tools", "cohortreg", "--method", "rigid", "--threads", "1",
                        "--work", str(tmp_path / "work"), "--resume", "--out", str(again)])
    assert [r["dice"] for r in json.loads(again.read_text())["rows"]] == [r["dice"] for r in rows]

    rc = peers.main(["--manifest", str(manifest), "--tools", "cohortreg", "--method", "affine", "--select", "a->b",
                     "--threads", "1", "--work", str(tmp_path / "work-select"), "--out", str(out)])
    assert rc == 0
    assert [r["pair"] for r in json.loads(out.read_text())["rows"]] == ["a->b"]  # --select keeps the named pair
    with pytest.raises(SystemExit):
        peers.main(["--manifest", str(manifest), "--tools", "cohortreg", "--select", "c->d", "--out", str(out)])


def test_scoring_uses_one_resampler_and_the_itk_convention(tmp_path):
    """A field written by hand (the exact answer) scores Dice 1 and no folding."""
    fixed, moving, fixed_labels, moving_labels = _shifted_pair(tmp_path)
    ref = sitk.ReadImage(str(fixed))
    field = np.broadcast_to(SHIFT, (*reversed(ref.GetSize()), 3)).astype(np.float64)
    image = sitk.GetImageFromArray(np.ascontiguousarray(field), isVector=True)
    image.CopyInformation(ref)
    sitk.WriteImage(image, str(tmp_path / "field.nii.gz"))
    pair = peers.Pair("p", fixed, moving, fixed_labels, moving_labels)
    scores = peers.score(pair, tmp_path / "field.nii.gz")
    assert scores["dice"] > 0.98 and scores["nonpositive_jacobian_percent"] == 0.0
    assert scores["centroid_mm"] < 0.1  # the label centroids land on the fixed ones (1 voxel = 2 mm)


@pytest.mark.parametrize("tool", sorted(set(peer_tools.TOOLS) - {"cohortreg"}))
def test_peer_adapter_convention(tool, tmp_path):
    if not peers.interpreter_has(PEER_PYTHON, peer_tools.TOOLS[tool].requires):
        pytest.skip(f"{tool} not installed for {PEER_PYTHON} (set COHORTREG_PEER_PYTHON, pip install -e '.[peers]')")
    fixed, moving, fixed_labels, moving_labels = _shifted_pair(tmp_path)
    pair = peers.Pair("p", fixed, moving, fixed_labels, moving_labels)
    record = peers.run_tool(tool, pair, tmp_path / tool, PEER_PYTHON, 1, "affine", None)
    assert "error" not in record, record
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / tool / "displacement.nii.gz"), sitk.sitkVectorFloat64))
    inside = sitk.GetArrayFromImage(sitk.ReadImage(str(fixed_labels))) > 0
    np.testing.assert_allclose(np.median(field[inside], axis=0), SHIFT, atol=0.6)  # world LPS mm, fixed -> moving
    assert peers.score(pair, tmp_path / tool / "displacement.nii.gz")["dice"] > 0.7  # elastix's default B-spline 0.75
