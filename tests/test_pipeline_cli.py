"""The ``cohortreg`` command line on the demo cohort: demo, status, report, apply, run (resume)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.analysis import open_results
from cohortreg.cli import main as cohortreg
from pipeline.store import read_field
from regcore import read_image
from regcore.evaluation import mean_dice
from regcore.points import map_points


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code = cohortreg(["demo", "--out", str(out), "--subjects", "3", "--resolution", "6", "--workers", "2",
                      "--threads", "1", "--no-progress"])
    return out, code


def test_demo_registers_every_subject_and_prints_dice(demo_run, capsys):
    out, code = demo_run
    assert code == 0
    ds = open_results(out / "results.zarr")
    assert ds.sizes["pair"] == 3 and set(ds["status"].values.astype(object)) == {"complete"}
    assert (ds["dice_after"].values > ds["dice_before"].values + 0.1).all()
    assert (out / "cohort" / "manifest.csv").exists()
    # rerunning the demo resumes: nothing left to do
    assert cohortreg(["demo", "--out", str(out), "--subjects", "3", "--resolution", "6", "--workers", "1",
                      "--no-progress"]) == 0
    assert "3 already complete (skipped)" in capsys.readouterr().out


def test_status_and_report(demo_run, capsys, tmp_path):
    out, _ = demo_run
    assert cohortreg(["status", str(out / "results.zarr")]) == 0
    assert "3 pairs, 3 complete, 0 failed" in capsys.readouterr().out
    html = tmp_path / "r.html"
    csv = tmp_path / "r.csv"
    assert cohortreg(["report", str(out / "results.zarr"), "--html", str(html), "--csv", str(csv), "--worst", "2"]) == 0
    text = capsys.readouterr().out
    assert "worst 2 by dice_after" in text and "sub-01--to--atlas" in text
    assert html.read_text(encoding="utf-8").count("src='data:image/png;base64") == 2  # the pair panels (bokeh's own icon aside)
    assert len(csv.read_text().splitlines()) == 4


def test_apply_labels_image_and_points(demo_run, tmp_path):
    out, _ = demo_run
    store = out / "results.zarr"
    cohort = out / "cohort"
    assert cohortreg(["apply", str(store), "sub-02--to--atlas", str(cohort / "sub-02_labels.nii.gz"),
                      str(tmp_path / "lab.nii.gz"), "--kind", "labels"]) == 0
    warped = read_image(tmp_path / "lab.nii.gz", dtype=None)
    atlas = read_image(cohort / "atlas_labels.nii.gz", dtype=None)
    ds = open_results(store)
    assert warped.grid == atlas.grid
    assert mean_dice(atlas.data, warped.data) == pytest.approx(float(ds["dice_after"].values[1]), abs=1e-9)
    assert cohortreg(["apply", str(store), "1", str(cohort / "sub-02.nii.gz"), str(tmp_path / "img.nii.gz")]) == 0
    assert read_image(tmp_path / "img.nii.gz").grid == atlas.grid
    pts = np.array([[0.0, -20.0, 10.0], [10.0, 5.0, -5.0]])
    (tmp_path / "p.csv").write_text("x,y,z\n" + "\n".join(",".join(map(str, p)) for p in pts))
    assert cohortreg(["apply", str(store), "1", str(tmp_path / "p.csv"), str(tmp_path / "q.csv"), "--kind", "points"]) == 0
    mapped = np.loadtxt(tmp_path / "q.csv", delimiter=",", skiprows=1)
    np.testing.assert_allclose(mapped, map_points(pts, read_field(store, 1)), atol=1e-9)
    assert np.abs(mapped - pts).max() > 0.5  # the points moved


def test_bad_arguments_exit_2(tmp_path, capsys):
    assert cohortreg(["status", str(tmp_path / "nothing.zarr")]) == 2
    assert "no results" in capsys.readouterr().err
    assert cohortreg(["ingest", str(tmp_path / "absent.csv"), str(tmp_path / "s.zarr")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_run_reports_failures_in_exit_status(demo_run, tmp_path, capsys):
    """`cohortreg run --manifest`: a missing image fails its pair alone; exit status 1 and the count."""
    out, _ = demo_run
    cohort = out / "cohort"
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,image,labels\n"
                        f"atlas,{cohort / 'atlas.nii.gz'},{cohort / 'atlas_labels.nii.gz'}\n"
                        f"sub-01,{cohort / 'sub-01.nii.gz'},{cohort / 'sub-01_labels.nii.gz'}\n"
                        f"ghost,{tmp_path / 'ghost.nii.gz'},\n")
    store = tmp_path / "s.zarr"
    args = ["run", str(store), "--manifest", str(manifest), "--atlas", "atlas", "--method", "rigid",
            "--workers", "1", "--threads", "1", "--no-progress"]
    assert cohortreg(args) == 1
    text = capsys.readouterr().out
    assert "1 registered" in text and "1 failed" in text and "ghost.nii.gz" in text
    # the log records every pair; the rerun retries only the failed pair
    log = [json.loads(line) for line in open(text.split("run log: ")[1].split()[0])]
    assert [e["event"] for e in log] == ["start", "pair", "pair", "end"]
    assert cohortreg(args[:2] + ["--workers", "1", "--no-progress"]) == 1  # the frozen pair table is reused
    assert "1 already complete (skipped), 1 failed" in capsys.readouterr().out
