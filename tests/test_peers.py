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

    earlier = tmp_path / "earlier.json"  # --reuse: a peer's rows from an earlier result file, not run again
    earlier.write_text(json.dumps({"rows": [
        {"pair": "b->a", "tool": "ants-syns", "dice": 0.5, "nonpositive_jacobian_percent": 0.0, "seconds": 3000.0, "peak_rss_mb": 900.0},
        {"pair": "a->b", "tool": "ants-syns", "dice": 0.7, "nonpositive_jacobian_percent": 0.01, "seconds": 1000.0, "peak_rss_mb": 800.0},
        {"pair": "a->b", "tool": "greedy", "error": "crashed"}]}))
    with monkeypatch.context() as patch:
        patch.setattr(peers, "run_tool", no_new_runs)
        mixed = tmp_path / "mixed.json"
        assert peers.main(["--manifest", str(manifest), "--tools", "cohortreg,ants-syns", "--method", "affine", "--threads", "1",
                           "--work", str(tmp_path / "work"), "--resume", "--reuse", f"ants-syns={earlier}", "--out", str(mixed)]) == 0
    result = json.loads(mixed.read_text())
    reused = [r for r in result["rows"] if r["tool"] == "ants-syns"]
    assert [(r["pair"], r["dice"], r["reused_from"]) for r in reused] == [("b->a", 0.5, "earlier.json"), ("a->b", 0.7, "earlier.json")]
    assert result["summary"]["ants-syns"]["dice"] == pytest.approx(0.6)
    assert result["summary"]["ants-syns"]["worst_nonpositive_jacobian_percent"] == 0.01
    assert result["summary"]["cohortreg"]["dice"] == pytest.approx(np.mean([r["dice"] for r in rows]))
    assert result["case_summary"] == {"manifest": result["summary"]}
    assert "(from earlier.json)" in peers.format_row(reused[0])
    assert reused[0]["reused_settings"]["method"] is None  # the earlier file's settings travel with its rows
    again_reused = tmp_path / "again-reused.json"  # reusing a file of reused rows keeps the first source
    assert peers.main(["--manifest", str(manifest), "--tools", "ants-syns", "--reuse", f"ants-syns={mixed}",
                       "--out", str(again_reused)]) == 0
    assert {r["reused_from"] for r in json.loads(again_reused.read_text())["rows"]} == {"earlier.json"}
    with pytest.raises(SystemExit):  # cohortreg's rows of another method are not reported as this one's
        peers.main(["--manifest", str(manifest), "--tools", "cohortreg", "--method", "rigid", "--reuse", f"cohortreg={mixed}",
                    "--out", str(again_reused)])
    for bad in (f"cohortreg={manifest}", f"greedy={earlier}", str(earlier), f"ants-syns={earlier}"):  # a clear error, nothing
        with pytest.raises(SystemExit):  # run: not a result file, no finished greedy run, no TOOL=, a tool not in --tools
            peers.main(["--manifest", str(manifest), "--tools", "cohortreg,greedy", "--reuse", bad, "--out", str(mixed)])

    agreed = tmp_path / "agreement.json"  # --agreement: the reference row holds each tool's score
    assert peers.main(["--manifest", str(manifest), "--tools", "cohortreg", "--method", "affine", "--threads", "1",
                       "--work", str(tmp_path / "work"), "--resume", "--agreement", "--out", str(agreed)]) == 0
    with_agreement = json.loads(agreed.read_text())
    for row in rows:
        matrix = with_agreement["agreement"][row["pair"]]
        assert matrix["names"] == ["reference", "cohortreg"]
        assert matrix["dice"][0][1] == pytest.approx(row["dice"], abs=1e-12)
    assert with_agreement["agreement_mean"]["dice"][0][1] == pytest.approx(np.mean([r["dice"] for r in rows]), abs=1e-12)

    rc = peers.main(["--manifest", str(manifest), "--tools", "cohortreg", "--method", "affine", "--select", "a->b",
                     "--threads", "1", "--work", str(tmp_path / "work-select"), "--out", str(out)])
    assert rc == 0
    assert [r["pair"] for r in json.loads(out.read_text())["rows"]] == ["a->b"]  # --select keeps the named pair
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(peers.tempfile, "tempdir", str(temp))  # without --work: a temporary folder
    assert peers.main(["--manifest", str(manifest), "--tools", "cohortreg", "--method", "affine", "--select", "a->b",
                       "--threads", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["rows"][0]["dice"] > 0.9
    assert list(temp.iterdir()) == []  # ... removed at the end, not left with its fields
    with pytest.raises(SystemExit):
        peers.main(["--manifest", str(manifest), "--tools", "cohortreg", "--select", "c->d", "--out", str(out)])


def test_several_cases_are_summarised_per_case_and_over_all_pairs(tmp_path):
    pairs = [peers.Pair(name, tmp_path / "f", tmp_path / "m", case=case)
             for name, case in (("x1", "colin-mni"), ("y1", "labelmaps-1mm"), ("y2", "labelmaps-1mm"))]
    dice = {"x1": 0.9, "y1": 0.8, "y2": 0.7}
    reused = {(name, "ants-syns"): {"pair": name, "tool": "ants-syns", "dice": d, "nonpositive_jacobian_percent": 0.0,
                                    "seconds": 10.0, "peak_rss_mb": 100.0} for name, d in dice.items()}
    out = peers.benchmark(pairs, ["ants-syns"], tmp_path, sys.executable, 1, 1, "affine", None, log=lambda line: None,
                          reused=reused)
    assert out["case_summary"]["colin-mni"]["ants-syns"]["dice"] == pytest.approx(0.9)
    assert out["case_summary"]["labelmaps-1mm"]["ants-syns"]["dice"] == pytest.approx(0.75)
    assert out["summary"]["ants-syns"]["dice"] == pytest.approx(0.8)  # each pair once, not the mean of the cases
    assert [r["case"] for r in out["rows"]] == ["colin-mni", "labelmaps-1mm", "labelmaps-1mm"]


def _write_field(tmp_path: Path, fixed: Path, shift, name: str) -> Path:
    """A constant displacement field (mm, ITK convention) on the fixed grid."""
    ref = sitk.ReadImage(str(fixed))
    field = np.broadcast_to(np.asarray(shift, dtype=np.float64), (*reversed(ref.GetSize()), 3))
    image = sitk.GetImageFromArray(np.ascontiguousarray(field), isVector=True)
    image.CopyInformation(ref)
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def test_scoring_uses_one_resampler_and_the_itk_convention(tmp_path):
    """A field written by hand (the exact answer) scores Dice 1 and no folding."""
    fixed, moving, fixed_labels, moving_labels = _shifted_pair(tmp_path)
    pair = peers.Pair("p", fixed, moving, fixed_labels, moving_labels)
    scores = peers.score(pair, _write_field(tmp_path, fixed, SHIFT, "field.nii.gz"))
    assert scores["dice"] > 0.98 and scores["nonpositive_jacobian_percent"] == 0.0
    assert scores["centroid_mm"] < 0.1  # the label centroids land on the fixed ones (1 voxel = 2 mm)


def test_agreement_between_tools_and_the_reference(tmp_path):
    """Two hand-written answers: the exact shift and the identity. Their agreement with the
    reference is their score; the exact one stands in for the reference, so it agrees with the
    identity as the reference does; the matrix is symmetric with 1 on the diagonal."""
    fixed, moving, fixed_labels, moving_labels = _shifted_pair(tmp_path)
    pair = peers.Pair("p", fixed, moving, fixed_labels, moving_labels)
    exact = _write_field(tmp_path, fixed, SHIFT, "exact.nii.gz")
    identity = _write_field(tmp_path, fixed, [0.0, 0.0, 0.0], "identity.nii.gz")
    matrix = peers.agreement(pair, {"exact": exact, "identity": identity})
    assert matrix["names"] == ["reference", "exact", "identity"]
    dice = np.asarray(matrix["dice"])
    assert np.allclose(dice, dice.T) and np.all(np.diag(dice) == 1.0)
    assert dice[0, 1] == pytest.approx(peers.score(pair, exact)["dice"], abs=1e-12)
    assert dice[0, 2] == pytest.approx(peers.score(pair, identity)["dice"], abs=1e-12)
    assert dice[0, 1] > 0.98 and dice[0, 2] < 0.8  # the shift is 4-6 mm: the identity misses it
    assert dice[1, 2] == pytest.approx(dice[0, 2], abs=0.02)

    other = {"names": matrix["names"], "dice": (1.0 - 0.5 * (1.0 - dice)).tolist()}  # a second pair, halfway to 1
    mean = peers.mean_agreement({"p": matrix, "q": other})
    assert mean["pairs"] == 2 and np.allclose(mean["dice"], (dice + np.asarray(other["dice"])) / 2)
    table = peers.format_agreement(mean).splitlines()
    assert table[0].split(" | ")[1:] == ["reference", "exact", "identity |"]
    cells = table[2].strip("| ").split(" | ")  # the reference row
    assert cells[1] == "-" and float(cells[2]) == pytest.approx(mean["dice"][0][1], abs=1e-4)


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


def test_benchmark_configs_are_valid_overrides_of_the_default_method():
    """The override files the benchmark README cites (``--config``) validate and change the preset:
    ``syn-1mm-floors.yaml`` restores the ``syn`` stage's earlier mm floors and its 5 iterations at 1 mm."""
    from regcore.config import config_hash
    from regcore.methods import method_config

    files = sorted((ROOT / "benchmarks" / "configs").glob("*.yaml"))
    assert files
    preset = method_config("affine+syn")
    for path in files:
        assert config_hash(method_config("affine+syn", path)) != config_hash(preset), path.name
    assert (preset.stages[-1].smoothing.update_sigma_mm, preset.stages[-1].smoothing.field_sigma_mm) == (0.0, 0.0)
    floors = method_config("affine+syn", ROOT / "benchmarks" / "configs" / "syn-1mm-floors.yaml").stages[-1]
    assert (floors.smoothing.update_sigma_mm, floors.smoothing.field_sigma_mm) == (2.5, 1.0)
    assert floors.pyramid.iterations == [100, 60, 20, 5] and floors.transform == "syn"


def test_brain_t1_1mm_case_halves_the_spacing_over_the_same_box(tmp_path):
    """``brain-t1-1mm``: every brain-t1 file on a grid of half the spacing covering the same box.
    A linear ramp in world mm is reproduced exactly inside (linear interpolation), each label at
    the world point of every new voxel is the old voxel's label there (nearest neighbour), and
    the 10 pairs keep their fixed/moving roles."""
    size, spacing, origin = (6, 7, 5), 2.0, (-30.0, 20.0, -10.0)
    grid = Grid(size, (spacing,) * 3, origin, DIRECTION)
    world = grid.world_points(dtype=torch.float64)  # (z, y, x, 3)
    ramp = (world @ torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64))[None]
    labels = (torch.arange(np.prod(size)).reshape(1, *reversed(size)) % 7).to(torch.int16)
    root = tmp_path / "data"
    (root / "brain-t1").mkdir(parents=True)
    for s in range(1, 11):
        write_image(Image(ramp.float() + s, grid), root / "brain-t1" / f"subj{s:02d}_t1.nii.gz")
        write_image(Image(labels, grid), root / "brain-t1" / f"subj{s:02d}_labels.nii.gz", np.int16)
    pairs = peers.brain_t1_1mm_pairs(root, tmp_path / "work")
    assert [p.name for p in pairs] == [p.name.replace("brain-t1", "brain-t1-1mm") for p in peers.brain_t1_pairs(root)]
    assert pairs[0].fixed.name == "subj01_t1_1mm.nii.gz" and pairs[0].moving.name == "subj02_t1_1mm.nii.gz"

    fine = sitk.ReadImage(str(pairs[0].fixed))
    assert fine.GetSize() == tuple(2 * n for n in size) and fine.GetSpacing() == pytest.approx((1.0,) * 3)
    np.testing.assert_allclose(fine.GetOrigin(), np.asarray(origin) - DIRECTION @ np.full(3, 0.5), atol=1e-6)
    fine_grid = peers.grid_from_sitk(fine)
    fine_world = fine_grid.world_points(dtype=torch.float64)
    expected = (fine_world @ torch.tensor([0.5, -0.25, 1.0], dtype=torch.float64)).numpy() + 1
    got = sitk.GetArrayFromImage(fine)
    inner = (slice(1, -1),) * 3  # the outer half voxel lies beyond the old centres: extrapolated there
    np.testing.assert_allclose(got[inner], expected[inner], atol=1e-4)

    fine_labels = sitk.GetArrayFromImage(sitk.ReadImage(str(pairs[0].fixed_labels)))
    old = sample_world(Image(labels.float(), grid), fine_world, mode="nearest")[0].numpy()
    np.testing.assert_array_equal(fine_labels, old)
    assert sorted(np.unique(fine_labels)) == list(range(7))
