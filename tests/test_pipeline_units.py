"""Pipeline pieces without a cluster: manifest, pairing rules, ingest, store layout, task, analysis."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import zarr

from conftest import FAST_METHOD, make_image
from pipeline.analysis import open_results, summary_table, verify_pair, worst_pairs
from pipeline.ingest import ingest
from pipeline.manifest import Subject, read_manifest
from pipeline.pairs import make_pairs, read_pairs
from pipeline.runner import plan_pairs
from pipeline.store import read_field, read_warped_labels
from pipeline.task import register_pair
from pipeline.zarrio import read_image_array
from regcore import Image, InputError, method_config, read_image, write_image
from regcore.evaluation import mean_dice
from regcore.points import map_points, read_points
from regcore.sampling import sample_world


def _write_manifest(path, rows, header=("subject", "session", "image", "labels")):
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


# ------------------------------------------------------------------ manifest
def test_manifest_resolves_relative_paths_and_sessions(tmp_path):
    m = _write_manifest(tmp_path / "m.csv", [["s1", "1", "a.nii.gz", "a_lab.nii.gz"], ["s1", "2", "/abs/b.nii", ""]])
    subs = read_manifest(m)
    assert [s.key for s in subs] == ["s1_ses-1", "s1_ses-2"]
    assert subs[0].image == tmp_path / "a.nii.gz" and subs[0].labels == tmp_path / "a_lab.nii.gz"
    assert str(subs[1].image) == "/abs/b.nii" and subs[1].labels is None


@pytest.mark.parametrize("rows,header,match", [
    ([["s1", "", "a.nii"]], ("subject", "session", "img"), "missing column"),
    ([["s1", "", "a.nii"], ["s1", "", "b.nii"]], ("subject", "session", "image"), "already listed"),
    ([["", "", "a.nii"]], ("subject", "session", "image"), "must not be empty"),
    ([], ("subject", "image"), "no subjects"),
])
def test_manifest_errors(tmp_path, rows, header, match):
    with pytest.raises(InputError, match=match):
        read_manifest(_write_manifest(tmp_path / "m.csv", rows, header))
    with pytest.raises(InputError, match="no such file"):
        read_manifest(tmp_path / "absent.csv")


# ------------------------------------------------------------------ pairing rules
def test_pairing_rules():
    subs = [Subject("atlas", "a"), Subject("s1", "x", session="1"), Subject("s1", "x", session="2"),
            Subject("s2", "y", session="1")]
    atlas = make_pairs(subs, "atlas", atlas="atlas")
    assert [(p.fixed, p.moving) for p in atlas] == [("atlas", "s1_ses-1"), ("atlas", "s1_ses-2"), ("atlas", "s2_ses-1")]
    both = make_pairs(subs, "atlas", atlas="atlas", direction="both")
    assert len(both) == 6 and ("s2_ses-1", "atlas") in [(p.fixed, p.moving) for p in both]
    assert len(make_pairs(subs, "all")) == 4 * 3
    longi = make_pairs(subs, "longitudinal")
    assert [(p.fixed, p.moving) for p in longi] == [("s1_ses-1", "s1_ses-2")]
    with pytest.raises(InputError, match="atlas key"):
        make_pairs(subs, "atlas", atlas="nobody")


# ------------------------------------------------------------------ ingest
def test_ingest_writes_geometry_levels_labels_and_is_idempotent(tmp_path):
    img = make_image((20, 18, 16), spacing=(1.5, 1.0, 2.0), origin=(3.0, -4.0, 5.0), seed=3)
    lab = Image((img.data > img.data.mean()).to(torch.int16) * 7, img.grid)
    write_image(img, tmp_path / "a.nii.gz")
    write_image(lab, tmp_path / "a_lab.nii.gz")
    subs = [Subject("a", tmp_path / "a.nii.gz", labels=tmp_path / "a_lab.nii.gz")]
    store = tmp_path / "s.zarr"
    assert ingest(subs, store).count("ok") == 1
    group = zarr.open_group(str(store), mode="r")["images/a"]
    back = read_image_array(group["image/0"])
    ref = read_image(tmp_path / "a.nii.gz")
    assert back.grid == ref.grid and torch.equal(back.data, ref.data)
    assert dict(group.attrs)["labels"] == [7] and dict(group.attrs)["levels"] == [1.0, 2.0, 4.0]
    assert read_image_array(group["image/2"]).grid.size == ref.grid.downsample(2).size
    assert ingest(subs, store).count("skipped") == 1  # second run does nothing
    before = dict(group.attrs)["content_sha256"]
    write_image(Image(img.data * 2, img.grid), tmp_path / "a.nii.gz")  # changed file -> re-ingested
    assert ingest(subs, store).count("ok") == 1
    assert dict(zarr.open_group(str(store), mode="r")["images/a"].attrs)["content_sha256"] != before


def test_ingest_records_bad_inputs_per_subject(tmp_path):
    good = make_image((12, 12, 12))
    write_image(good, tmp_path / "good.nii.gz")
    write_image(Image(torch.full_like(good.data, float("nan")), good.grid), tmp_path / "nan.mha")
    write_image(Image(torch.zeros_like(good.data), good.grid), tmp_path / "zero.nii.gz")
    (tmp_path / "junk.nii.gz").write_bytes(b"not an image")
    write_image(make_image((12, 12, 10)), tmp_path / "other_grid.nii.gz")
    subs = [Subject("good", tmp_path / "good.nii.gz"), Subject("missing", tmp_path / "nope.nii.gz"),
            Subject("nan", tmp_path / "nan.mha"), Subject("zero", tmp_path / "zero.nii.gz"),
            Subject("junk", tmp_path / "junk.nii.gz"),
            Subject("badlab", tmp_path / "good.nii.gz", labels=tmp_path / "other_grid.nii.gz")]
    report = ingest(subs, tmp_path / "s.zarr")
    errors = {r["key"]: r["error"] for r in report.results}
    assert report.count("ok") == 1
    assert "no such file" in errors["missing"] and "nope.nii.gz" in errors["missing"]
    assert "NaN" in errors["nan"]
    assert "no contrast" in errors["zero"]
    assert "junk.nii.gz" in errors["junk"]
    assert "does not match" in errors["badlab"]


# ------------------------------------------------------------------ store + task, in process
@pytest.fixture(scope="module")
def ingested(tmp_path_factory, demo_cohort):
    store = tmp_path_factory.mktemp("store") / "cohort.zarr"
    subs = read_manifest(demo_cohort)
    ingest(subs, store)
    return store, subs


def test_task_writes_field_metrics_and_checksum(ingested):
    store, subs = ingested
    pairs = make_pairs(subs, "atlas", atlas="atlas")[:2]
    todo, skip = plan_pairs(store, pairs, method_config(FAST_METHOD))
    assert todo == [0, 1] and skip == []
    res = register_pair(store, 0, FAST_METHOD)
    assert res["status"] == "complete", res["error"]
    ds = open_results(store)
    assert str(ds["status"].values[0]) == "complete" and str(ds["status"].values[1]) == ""
    assert ds["dice_after"].values[0] > ds["dice_before"].values[0] + 0.1
    # landmarks with known correspondence: TRE falls, and the stored figures are those of the field
    assert ds["tre_after"].values[0] < 0.6 * ds["tre_before"].values[0]
    fixed_pts, moving_pts = read_points(subs[0].landmarks), read_points(subs[1].landmarks)
    assert float(ds["tre_before"].values[0]) == pytest.approx(np.linalg.norm(fixed_pts - moving_pts, axis=1).mean())
    assert verify_pair(store, 0)
    # the stored field, applied independently, reproduces the stored Dice
    field = read_field(store, 0)
    atlas_lab = read_image(subs[0].labels, dtype=None)
    mov_lab = read_image(subs[1].labels, dtype=None)
    pts = field.grid.world_points(dtype=torch.float64) + torch.movedim(field.data.double(), 0, -1)
    warped = sample_world(mov_lab, pts, mode="nearest")
    assert mean_dice(atlas_lab.data, warped) == pytest.approx(float(ds["dice_after"].values[0]), abs=1e-9)
    assert torch.equal(read_warped_labels(store, 0).data.long(), warped.long())
    tre = np.linalg.norm(map_points(fixed_pts, field) - moving_pts, axis=1).mean()
    assert float(ds["tre_after"].values[0]) == pytest.approx(tre, rel=1e-5)
    # level records: 2 levels, iterations add up
    its = ds["level_iterations"].values[0]
    assert its.sum() == int(ds["iterations"].values[0]) and (ds["level_factor"].values[0] == [2.0, 1.0]).all()
    # tampering with a stored metric breaks the checksum
    zarr.open_group(str(store), mode="r+")["dice_after"][0] = 0.0
    assert not verify_pair(store, 0)


def test_pair_table_is_an_append_only_log(tmp_path, demo_cohort):
    subs = read_manifest(demo_cohort)
    store = tmp_path / "s.zarr"
    ingest(subs, store)
    first = make_pairs(subs, "atlas", atlas="atlas")[:2]
    assert plan_pairs(store, first, method_config(FAST_METHOD)) == ([0, 1], [])
    assert register_pair(store, 0, FAST_METHOD)["status"] == "complete"
    checksum = str(open_results(store)["checksum"].values[0])
    # a larger table (every ordered pair) extends the store: old rows keep their index and result
    grown = make_pairs(subs, "all")
    todo, skip = plan_pairs(store, grown, method_config(FAST_METHOD))
    assert skip == [0] and sorted(todo) == list(range(1, len(grown)))
    assert read_pairs(store / "pairs.csv")[:2] == first and len(read_pairs(store / "pairs.csv")) == len(grown)
    ds = open_results(store)
    assert ds.sizes["pair"] == len(grown) and ds["displacement"].shape[0] == len(grown)
    assert str(ds["checksum"].values[0]) == checksum and verify_pair(store, 0)
    assert [str(v) for v in ds["status"].values[:2]] == ["complete", ""]
    # a table that lacks pairs of the store is refused unless asked for
    with pytest.raises(InputError, match="lacks") as err:
        plan_pairs(store, first[:1], method_config(FAST_METHOD))
    assert "--allow-removed" in str(err.value)
    assert plan_pairs(store, first[:1], method_config(FAST_METHOD), allow_removed=True) == ([], [0])
    assert len(read_pairs(store / "pairs.csv")) == len(grown)  # nothing dropped


def test_unstacked_fields_when_fixed_grids_differ(tmp_path):
    a = make_image((16, 14, 12), spacing=(2.0, 2.0, 2.0), seed=1)
    b = make_image((15, 14, 13), spacing=(2.0, 2.0, 2.0), seed=1)
    write_image(a, tmp_path / "a.nii.gz")
    write_image(b, tmp_path / "b.nii.gz")
    subs = [Subject("a", tmp_path / "a.nii.gz"), Subject("b", tmp_path / "b.nii.gz")]
    store = tmp_path / "s.zarr"
    ingest(subs, store)
    pairs = make_pairs(subs, "all")
    plan_pairs(store, pairs, method_config(FAST_METHOD))
    for i in range(2):
        assert register_pair(store, i, FAST_METHOD)["status"] == "complete"
        assert verify_pair(store, i)
    assert not open_results(store).attrs["stacked"]
    assert read_field(store, 0).grid.shape == (16, 14, 12) and read_field(store, 1).grid.shape == (15, 14, 13)
    table = summary_table(open_results(store))
    assert list(table.index) == [p.pair_id for p in pairs]
    assert len(worst_pairs(open_results(store), "ncc_after", 1)) == 1


def test_bids_folder_as_manifest(tmp_path):
    img = make_image((10, 10, 10))
    for sub, ses in (("01", "a"), ("01", "b"), ("02", "a")):
        d = tmp_path / f"sub-{sub}" / f"ses-{ses}" / "anat"
        d.mkdir(parents=True)
        write_image(img, d / f"sub-{sub}_ses-{ses}_T1w.nii.gz")
    deriv = tmp_path / "derivatives" / "seg" / "sub-02" / "ses-a" / "anat"
    deriv.mkdir(parents=True)
    write_image(Image(torch.ones_like(img.data).to(torch.int16), img.grid), deriv / "sub-02_ses-a_dseg.nii.gz")
    subs = read_manifest(tmp_path)
    assert [s.key for s in subs] == ["01_ses-a", "01_ses-b", "02_ses-a"]
    assert subs[2].labels is not None and subs[0].labels is None
    assert [(p.fixed, p.moving) for p in make_pairs(subs, "longitudinal")] == [("01_ses-a", "01_ses-b")]


def test_cluster_profiles(tmp_path):
    from cluster.profiles import load_profiles, profile_settings

    assert {"local", "local-gpu", "slurm", "address"} <= set(load_profiles())
    s = profile_settings("local", workers=3)
    assert s["workers"] == 3 and s["threads"] >= 1
    user = tmp_path / "c.yaml"
    user.write_text("local:\n  workers: 5\nbig:\n  kind: local\n  workers: 7\n  threads: 2\n")
    assert profile_settings("local", user)["workers"] == 5 and profile_settings("big", user)["workers"] == 7
    with pytest.raises(InputError, match="unknown cluster profile"):
        profile_settings("nope")


def test_slurm_profile_job_script():
    """The slurm profile's job script (dask-jobqueue renders it; nothing is submitted): one job per
    GPU, and exactly one worker in it, owning that GPU (GPU=1) with all the job's cores. With
    dask-jobqueue's default the 8 cores became 4 workers, each claiming GPU=1 on the one GPU."""
    pytest.importorskip("dask_jobqueue")
    from cluster.profiles import _slurm, profile_settings

    cluster = _slurm(profile_settings("slurm"), scale=False)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    directives = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --gres=gpu:1" in directives and "#SBATCH -t 04:00:00" in directives
    assert "#SBATCH --cpus-per-task=8" in directives
    command = script.strip().splitlines()[-1].split()
    workers = command[command.index("--nworkers") + 1] if "--nworkers" in command else "1"  # 1 is the default
    assert workers == "1"
    assert command[command.index("--nthreads") + 1] == "8"
    assert command[command.index("--resources") + 1] == "GPU=1"
    assert "--lifetime" in command


def test_local_gpu_profile_gives_each_worker_its_own_device(monkeypatch):
    """The local-gpu layout (one worker per GPU, CUDA_VISIBLE_DEVICES each, GPU=1), shown on CPU."""
    from cluster.profiles import start_cluster

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    handle = start_cluster("local-gpu", workers=2, device="cpu")
    try:
        env = handle.client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        assert sorted(env.values()) == ["0", "1"]
        info = handle.client.scheduler_info()["workers"].values()
        assert all(w["resources"] == {"GPU": 1} and w["nthreads"] == 1 for w in info)
        assert handle.gpu
    finally:
        handle.close()


def test_pairs_hashed_before_params_defaults_count_as_complete(tmp_path, demo_cohort):
    """Stores written when the config hash covered params as given keep their complete pairs."""
    from regcore.config import config_hash, legacy_config_hash

    subs = read_manifest(demo_cohort)[:3]
    store = tmp_path / "s.zarr"
    ingest(subs, store)
    pairs = make_pairs(subs, "atlas", atlas="atlas")
    cfg = method_config(FAST_METHOD)
    plan_pairs(store, pairs, cfg)
    assert register_pair(store, 0, FAST_METHOD)["status"] == "complete"
    assert legacy_config_hash(cfg) != config_hash(cfg)
    zarr.open_group(str(store), mode="r+")["config_hash"][0] = legacy_config_hash(cfg)  # as an old run wrote it
    assert plan_pairs(store, pairs, cfg) == ([1], [0])
    zarr.open_group(str(store), mode="r+")["config_hash"][0] = "0123456789abcdef"  # another config: rerun
    assert plan_pairs(store, pairs, cfg) == ([0, 1], [])


def test_infrastructure_errors_reach_dask_and_pair_errors_are_recorded(ingested, monkeypatch):
    """A store read failure or out-of-memory is raised (Dask retries it); a bad pair is recorded."""
    import pipeline.task as task

    store, subs = ingested
    pairs = make_pairs(subs, "atlas", atlas="atlas")[:2]
    plan_pairs(store, pairs, method_config(FAST_METHOD))
    for exc in (OSError("store unreachable"), MemoryError("host out of memory"),
                torch.cuda.OutOfMemoryError("CUDA out of memory")):
        def broken(*args, exc=exc, **kwargs):
            raise exc

        monkeypatch.setattr(task, "register", broken)
        with pytest.raises(type(exc)):
            register_pair(store, 1, FAST_METHOD)
        assert str(open_results(store)["status"].values[1]) == "running"  # not failed: a rerun redoes it
    monkeypatch.setattr(task, "register", lambda *a, **k: (_ for _ in ()).throw(ValueError("no overlap")))
    res = register_pair(store, 1, FAST_METHOD)
    assert res["status"] == "failed" and "ValueError: no overlap" in res["error"]
    assert str(open_results(store)["status"].values[1]) == "failed"


def test_layout_version_is_checked_on_open(tmp_path, demo_cohort):
    subs = read_manifest(demo_cohort)[:2]
    store = tmp_path / "s.zarr"
    ingest(subs, store)
    plan_pairs(store, make_pairs(subs, "atlas", atlas="atlas"), method_config(FAST_METHOD))
    assert open_results(store).sizes["pair"] == 1
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    root.attrs["layout_version"] = 99
    with pytest.raises(InputError, match="layout version 99, newer than this cohortreg reads"):
        open_results(store)
    del root.attrs["layout_version"]
    with pytest.raises(InputError, match="not a cohortreg results store"):
        read_field(store, 0)


_TEST_METRIC_SCRIPT = r'''
import dataclasses, sys
import regcore.pair_metrics as pm

@dataclasses.dataclass
class WithTestMetric(pm.PairMetrics):  # one new field: nothing else is edited
    test_metric: float = pm._metric("mm", "a test-only metric", False)

original = pm.evaluate_pair
def evaluate_pair(*args, **kwargs):
    metrics, warped = original(*args, **kwargs)  # builds the module's PairMetrics: WithTestMetric now
    metrics.test_metric = 42.5
    return metrics, warped
pm.PairMetrics, pm.evaluate_pair = WithTestMetric, evaluate_pair

sys.path.insert(0, sys.argv[3])
from conftest import FAST_METHOD
from pipeline.analysis import open_results, verify_pair
from pipeline.ingest import ingest
from pipeline.manifest import read_manifest
from pipeline.pairs import make_pairs
from pipeline.runner import plan_pairs
from pipeline.task import register_pair
from regcore import method_config
subs = read_manifest(sys.argv[1])[:2]
ingest(subs, sys.argv[2])
plan_pairs(sys.argv[2], make_pairs(subs, "atlas", atlas="atlas"), method_config(FAST_METHOD))
assert register_pair(sys.argv[2], 0, FAST_METHOD)["status"] == "complete"
ds = open_results(sys.argv[2])
assert float(ds["test_metric"].values[0]) == 42.5, ds["test_metric"].values
assert ds["test_metric"].attrs["units"] == "mm" and ds["test_metric"].attrs["description"] == "a test-only metric"
assert verify_pair(sys.argv[2], 0)
print("ok")
'''


def test_a_metric_declared_in_pair_metrics_reaches_the_store_without_other_edits(tmp_path, demo_cohort):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    proc = subprocess.run([sys.executable, "-c", _TEST_METRIC_SCRIPT, str(demo_cohort), str(tmp_path / "s.zarr"),
                           str(ROOT / "tests")], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
