"""Groupwise template construction: the maths (regcore.template) and the resumable workflow."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from conftest import blobs
from pipeline.manifest import Subject, read_manifest
from regcore import Grid, Image, read_image, write_image
from regcore.template import coverage_mean, shape_update, vote_labels, warp_to_template
from workflows.template import TEMPLATE, build_template
from workflows.demo_cohort import make_demo_cohort
from regcore.template import ncc_value


def _grid(shape=(24, 26, 22), spacing=2.0) -> Grid:
    return Grid(tuple(reversed(shape)), (spacing,) * 3, (0.0, 0.0, 0.0))


def test_shape_update_moves_the_template_by_step_times_the_mean_field():
    grid = _grid()
    img = Image(torch.from_numpy(blobs(grid.shape, n=12, seed=3, sigma=0.15)).float(), grid)
    u = torch.zeros((3, *grid.shape))
    u[0] = 8.0  # the subjects' counterparts lie 8 mm along +x on average
    moved = shape_update(img, u, step=0.25)  # the template moves 2 mm (one voxel) along +x
    np.testing.assert_allclose(moved.data[0, :, :, 1:].numpy(), img.data[0, :, :, :-1].numpy(), atol=1e-4)


def test_coverage_mean_ignores_subjects_where_they_do_not_see():
    grid = _grid()
    data = torch.from_numpy(blobs(grid.shape, n=12, seed=4, sigma=0.15)).float()[None] + 1.0
    full = Image(data, grid)
    half_grid = Grid((11,) + grid.size[1:], grid.spacing, grid.origin)  # x < 22 mm only
    half = Image(data[..., :11].clone(), half_grid)
    zero = torch.zeros((3, *grid.shape))
    warped, coverage = zip(*(warp_to_template(im, zero, grid) for im in (full, full, half)))
    mean, total = coverage_mean(warped, coverage)
    right = (slice(None), slice(None), slice(None), slice(12, None))
    np.testing.assert_allclose(mean[right].numpy(), data[right].numpy(), rtol=1e-5)  # not 2/3 of it
    assert float(total[right].max()) == pytest.approx(2.0)
    plain = sum(warped) / 3
    assert float((plain[right] / data[right]).mean()) == pytest.approx(2 / 3, abs=1e-3)  # what /N would give


def test_vote_labels_majority_where_covered():
    a = torch.tensor([[1, 1, 2, 0]])
    b = torch.tensor([[1, 2, 2, 0]])
    c = torch.tensor([[3, 2, 3, 3]])
    cov = [torch.ones(1, 4)] * 2 + [torch.tensor([[1.0, 1.0, 1.0, 0.0]])]
    assert vote_labels([a, b, c], cov).tolist() == [[1, 2, 2, 0]]


def test_partial_field_of_view_does_not_darken_the_template(tmp_path, local_client):
    grid = _grid((20, 22, 24))
    data = torch.from_numpy(blobs(grid.shape, n=10, seed=6, sigma=0.15)).float()[None] + 0.5
    subjects = []
    for i in range(3):
        write_image(Image(data, grid), tmp_path / f"s{i}.nii.gz")
        subjects.append(Subject(f"s{i}", tmp_path / f"s{i}.nii.gz"))
    half_grid = Grid((12,) + grid.size[1:], grid.spacing, grid.origin)
    write_image(Image(data[..., :12].clone(), half_grid), tmp_path / "cropped.nii.gz")
    subjects.append(Subject("cropped", tmp_path / "cropped.nii.gz"))
    result = TEMPLATE.run(subjects, tmp_path / "t", local_client, iterations=0, linear_method="rigid",
                          initial=tmp_path / "s0.nii.gz")
    t = result.template.data
    right = (slice(None), slice(2, -2), slice(2, -2), slice(14, -2))  # seen by 3 of the 4 subjects
    ratio = float(t[right].mean() / data[right].mean())
    assert ratio == pytest.approx(1.0, abs=0.02)  # a division by N would give 0.75


def test_demo_cohort_template_improves_and_resumes(tmp_path_factory, local_client):
    """8 subjects deformed from MNI152 at 3 mm (atlas excluded): the template approaches MNI152,
    the mean warp shrinks, and a run interrupted in iteration 2 resumes without redoing iteration 1."""
    folder = tmp_path_factory.mktemp("tmpl")
    manifest = make_demo_cohort(folder / "cohort", subjects=8, resolution=3.0, landmarks=0)
    subjects = [s for s in read_manifest(manifest) if s.subject != "atlas"]
    store = folder / "template.zarr"
    seen = []

    def interrupt_in_iteration_2(counts, result):
        if result is not None:
            seen.append(result["pair_id"])
            if len(seen) == 8 + 8 + 3:  # iteration 0, iteration 1, three pairs of iteration 2
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_template(subjects, store, local_client, iterations=3, on_pair=interrupt_in_iteration_2)
    assert (store / "template" / "iteration-1" / "stats.json").exists()
    assert not (store / "template" / "iteration-2" / "stats.json").exists()
    result = build_template(subjects, store, local_client, iterations=3)
    submitted = [s.pairs_submitted for s in result.iterations]
    assert submitted[:2] == [8, 8] and submitted[3] == 8  # iterations 0 and 1 as first run
    assert submitted[2] <= 8 - 3  # the rerun skipped the pairs of iteration 2 already done
    atlas = read_image(folder / "cohort" / "atlas.nii.gz")
    brain = (atlas.data > 0.1 * atlas.data.max()).float()
    ncc = [ncc_value(read_image(store / "template" / f"iteration-{k}" / "template.nii.gz").data, atlas.data, brain)
           for k in range(4)]
    assert ncc[3] > ncc[0] + 0.05, ncc
    norms = [s.mean_warp_norm_mm for s in result.iterations]
    assert norms[3] < norms[1], norms
    assert result.labels is not None and result.labels.grid == result.template.grid  # voted from the subjects' labels
    ds = xr.open_zarr(str(store), consolidated=False)
    assert ds.sizes["iteration"] == 4
    np.testing.assert_allclose(ds["mean_warp_norm_mm"].values, norms)
    assert (store / "template" / "template.nii.gz").exists()
    from pipeline.zarrio import read_image_array
    import zarr
    stored = read_image_array(zarr.open_group(str(store / "template" / "iteration-3" / "template.zarr"), mode="r")["template"])
    assert stored.grid == result.template.grid and torch.allclose(stored.data, result.template.data, atol=1e-5)


def test_cli_template_checks_input_before_the_cluster(tmp_path, monkeypatch, capsys):
    import cohortreg.cli as cli

    monkeypatch.setattr(cli, "_cluster", lambda args: (_ for _ in ()).throw(AssertionError("cluster started")))
    (tmp_path / "m.csv").write_text(f"subject,image\na,{tmp_path / 'a.nii.gz'}\n")
    assert cli.main(["template", str(tmp_path / "m.csv"), "--out", str(tmp_path / "t"), "--method", "nope"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert cli.main(["template", str(tmp_path / "m.csv"), "--out", str(tmp_path / "t"), "--initial",
                     str(tmp_path / "absent.nii.gz")]) == 2
    assert "no such file" in capsys.readouterr().err
