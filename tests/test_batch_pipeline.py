"""Batched tasks in the pipeline (issue 10): pairs sharing a fixed image registered together, each
pair still written, checksummed and completed on its own; a worker killed mid-batch loses no
complete pair; out-of-memory splits a batch; a bad pair fails alone."""

from __future__ import annotations

import json
import logging
import os

import cloudpickle
import dask
import numpy as np
import pytest
import torch
import zarr
from distributed.diagnostics.plugin import WorkerPlugin

import test_batch_pipeline as this_module
from conftest import FAST_METHOD
from cohortreg.cli import main as cohortreg
from pipeline.analysis import open_results, verify_pair
from pipeline.ingest import ingest
from pipeline.manifest import Subject, read_manifest, write_manifest
from pipeline.pairs import Pair, make_pairs
from pipeline.runner import AUTO_BATCH_CAP, batch_setting, plan_pairs, plan_tasks, run_pairs
from pipeline.store import read_field
from regcore import Grid, Image, InputError, method_config, read_image, write_image
from regcore.batch import RegistrationFailure

cloudpickle.register_pickle_by_value(this_module)  # the fault-injection plugin travels to workers


def _address(client) -> list[str]:
    return ["--profile", "address", "--address", client.scheduler.address, "--no-progress"]


def _status(store) -> list[str]:
    return [str(s) for s in zarr.open_group(str(store), mode="r", use_consolidated=False)["status"][...]]


# ------------------------------------------------------------------ grouping (no cluster)
def test_plan_tasks_groups_pairs_that_share_a_fixed_image():
    pairs = [Pair(f"m{i}--to--{f}", f, f"m{i}") for i, f in enumerate("aabaabaa")]
    todo = list(range(8))
    assert plan_tasks(pairs, todo, 1) == [[i] for i in todo]
    assert plan_tasks(pairs, todo, 3) == [[0, 1, 3], [2, 5], [4, 6, 7]]  # never two fixed images in one task
    assert plan_tasks(pairs, [1, 2, 7], 4) == [[1, 7], [2]]
    assert plan_tasks(pairs, todo, "auto", gpu=False) == [[i] for i in todo]  # CPU: batching does not pay
    assert plan_tasks(pairs, todo, "auto", gpu=True, slots=1) == [[0, 1, 3, 4, 6, 7], [2, 5]]
    assert plan_tasks(pairs, todo, "auto", gpu=True, slots=4) == [[0, 1], [2, 5], [3, 4], [6, 7]]  # every GPU busy
    many = [Pair(f"m{i}--to--a", "a", f"m{i}") for i in range(100)]
    assert max(map(len, plan_tasks(many, list(range(100)), "auto", gpu=True))) == AUTO_BATCH_CAP
    assert batch_setting("auto") == "auto" and batch_setting("8") == 8 and batch_setting(None) == 1
    for bad in (0, -2, "x", "1.5", 2.0, True):
        with pytest.raises(InputError, match="batch size"):
            batch_setting(bad)


def test_profiles_carry_a_batch_size(tmp_path, capsys):
    from cluster.profiles import profile_settings

    assert profile_settings("local")["batch_size"] == 1
    assert profile_settings("local-gpu")["batch_size"] == "auto" and profile_settings("slurm")["batch_size"] == "auto"
    # a bad --batch-size is refused before any cluster starts (exit 2)
    assert cohortreg(["run", str(tmp_path / "s.zarr"), "--atlas", "atlas", "--batch-size", "0",
                      "--profile", "address", "--address", "tcp://127.0.0.1:9"]) == 2
    assert "batch size '0'" in capsys.readouterr().err


# ------------------------------------------------------------------ the cluster, end to end
def test_batch_of_four_on_eight_pairs_completes_verifies_and_equals_single_runs(tmp_path, demo_cohort, local_client,
                                                                                  capsys):
    """Reference run one pair per task; then ``cohortreg run --batch-size 4 --force``: 2 tasks of 4."""
    from workflows import get_workflow

    subjects = read_manifest(demo_cohort)
    store = tmp_path / "s.zarr"
    wf = get_workflow("atlas")
    single = wf.run(wf.plan(store, subjects=subjects, method=FAST_METHOD, atlas="atlas"), local_client, batch_size=1)
    assert len(single.complete) == 8
    ref = open_results(store)
    ref_fields = [read_field(store, i).data.numpy() for i in range(8)]
    ref_dice = ref["dice_after"].values.copy()

    assert cohortreg(["run", str(store), "--batch-size", "4", "--force", *_address(local_client)]) == 0
    assert "8 registered" in capsys.readouterr().out
    log = [json.loads(line) for line in sorted((store / "logs").glob("run-*.jsonl"))[-1].read_text().splitlines()]
    assert log[0]["event"] == "start" and log[0]["batch_size"] == 4 and log[0]["tasks"] == 2
    pair_events = [e for e in log if e["event"] == "pair"]
    assert sorted(e["index"] for e in pair_events) == list(range(8))
    assert {e["batch_size"] for e in pair_events} == {4}  # each pair was registered in a batch of 4
    assert {e["status"] for e in pair_events} == {"complete"}
    tasks = [e for e in log if e["event"] == "task"]
    assert sorted(map(sorted, (t["indices"] for t in tasks))) == [[0, 1, 2, 3], [4, 5, 6, 7]]

    assert cohortreg(["verify", str(store)]) == 0
    assert "8 complete pairs checked, 0 mismatch" in capsys.readouterr().out
    ds = open_results(store)
    assert (ds["dice_after"].values > ds["dice_before"].values + 0.05).all()
    assert len(set(ds["checksum"].values.astype(object))) == 8  # one checksum per pair, each its own
    for i in range(8):  # the same results as one pair at a time (issue 10's tolerances)
        diff = np.abs(read_field(store, i).data.numpy() - ref_fields[i])
        assert float(np.nanmean(diff)) < 0.1, (i, float(np.nanmean(diff)))
    assert np.abs(ds["dice_after"].values - ref_dice).max() < 0.005
    # resume is per pair: nothing left to run
    again = run_pairs(local_client, store, wf.plan(store).pairs, FAST_METHOD, batch_size=4)
    assert again.submitted == [] and len(again.skipped) == 8


class DieAfterComplete(WorkerPlugin):
    """Test-only fault injection: the worker process dies (os._exit) right after pair ``index`` is
    marked complete: the rest of its batch is still running. Once cluster-wide (a marker file)."""

    name = "die-after-complete"

    def __init__(self, index: int, marker: str):
        self.index, self.marker = index, marker

    def setup(self, worker):
        from pipeline import store as store_module

        original = store_module.PairWriter.finish
        index, marker = self.index, self.marker

        def finish(self, status):
            original(self, status)
            if status == "complete" and self.index == index:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    return
                os._exit(1)

        store_module.PairWriter.finish = finish


def test_worker_killed_mid_batch_keeps_the_complete_pairs(tmp_path, demo_cohort):
    from cluster.profiles import start_cluster

    subjects = read_manifest(demo_cohort)
    store = tmp_path / "cohort.zarr"
    pairs = make_pairs(subjects, "atlas", atlas="atlas")
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        handle = start_cluster("local", workers=2, threads=1)
    try:
        client = handle.client
        ingest(subjects, store, client)
        client.register_plugin(DieAfterComplete(4, str(tmp_path / "died")))
        summary = run_pairs(client, store, pairs, FAST_METHOD, retries=0, batch_size=4)  # tasks [0..3], [4..7]
        assert (tmp_path / "died").exists()
        assert sorted(summary.complete) == [0, 1, 2, 3, 4] and sorted(summary.failed) == [5, 6, 7]
        assert summary.results[4].get("recovered") is True  # completed before its worker died: kept
        assert all("task lost" in summary.errors[i] and "KilledWorker" in summary.errors[i] for i in (5, 6, 7))
        events = [json.loads(line) for line in open(summary.log_path)]
        lost = [e for e in events if e["event"] == "worker_lost"]
        assert sorted(e["pair_id"] for e in lost) == [pairs[i].pair_id for i in (5, 6, 7)]
        assert all(e["worker"].startswith("tcp://") for e in lost)
        assert _status(store) == ["complete"] * 5 + ["failed"] * 3
        assert all(verify_pair(store, i) for i in range(5))
        client.unregister_worker_plugin("die-after-complete")
        client.restart()
        rerun = run_pairs(client, store, pairs, FAST_METHOD, batch_size=4)
        assert rerun.submitted == [5, 6, 7] and sorted(rerun.complete) == [5, 6, 7]
        assert sorted(rerun.skipped) == [0, 1, 2, 3, 4]
        assert all(verify_pair(store, i) for i in range(8))
    finally:
        handle.close()


# ------------------------------------------------------------------ the task in-process
@pytest.fixture
def five_pairs(tmp_path, demo_cohort):
    """A store with atlas + 5 subjects ingested (no cluster) and its 5 pairs planned."""
    subjects = read_manifest(demo_cohort)[:6]
    store = tmp_path / "s.zarr"
    ingest(subjects, store)
    pairs = make_pairs(subjects, "atlas", atlas="atlas")
    todo, _ = plan_pairs(store, pairs, method_config(FAST_METHOD))
    return store, pairs, todo


def test_out_of_memory_splits_the_batch_and_fails_no_pair(five_pairs, monkeypatch, caplog):
    import pipeline.task as task

    store, pairs, todo = five_pairs
    calls = []
    original = task.register_batch

    def small_device(fixed, movings, *args, **kwargs):  # a device that holds 2 pairs at most
        calls.append(len(movings))
        if len(movings) > 2:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (simulated, batch of {len(movings)})")
        return original(fixed, movings, *args, **kwargs)

    monkeypatch.setattr(task, "register_batch", small_device)
    with caplog.at_level(logging.INFO, logger="pipeline.task"):
        out = task.register_batch_task(store, todo, FAST_METHOD)
    assert [r["status"] for r in out] == ["complete"] * 5, [r["error"] for r in out]
    assert calls == [5, 3, 2, 2]  # 5 -> 3 + 2; 3 -> 2 + 1 (a single pair goes to regcore.register)
    assert [r["batch_size"] for r in out] == [2, 2, 1, 2, 2]
    assert set(_status(store)) == {"complete"} and all(verify_pair(store, i) for i in todo)
    assert "out of memory" in caplog.text and "split into 3 + 2" in caplog.text
    assert "in batches of [2, 1, 2]" in caplog.text  # the batch sizes used

    # one pair that does not fit alone: raised for Dask's retries, the pairs stay incomplete (not failed)
    def no_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(task, "register_batch", no_memory)
    monkeypatch.setattr(task, "register", no_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        task.register_batch_task(store, todo[:2], FAST_METHOD)
    assert _status(store)[:2] == ["running", "running"]


def test_auto_batch_size_asks_the_device(five_pairs, monkeypatch):
    import pipeline.task as task

    store, pairs, todo = five_pairs
    asked, calls = [], []
    monkeypatch.setattr(task, "max_batch_size", lambda fixed, moving, cfg, dev, limit: asked.append(limit) or 2)
    original = task.register_batch
    monkeypatch.setattr(task, "register_batch", lambda f, m, *a, **k: calls.append(len(m)) or original(f, m, *a, **k))
    out = task.register_batch_task(store, todo, FAST_METHOD, batch_size="auto")
    assert asked == [5] and calls == [2, 2] and [r["batch_size"] for r in out] == [2, 2, 2, 2, 1]
    assert all(r["status"] == "complete" for r in out)


def test_a_retried_task_skips_the_pairs_it_completed(five_pairs):
    from pipeline.task import register_batch_task

    store, pairs, todo = five_pairs
    first = register_batch_task(store, todo[:2], FAST_METHOD)
    assert [r["status"] for r in first] == ["complete"] * 2
    again = register_batch_task(store, todo[:3], FAST_METHOD, skip_complete=True)
    assert [r.get("resumed", False) for r in again] == [True, True, False]
    assert [r["checksum"] for r in again[:2]] == [r["checksum"] for r in first]
    assert all(r["status"] == "complete" for r in again) and all(verify_pair(store, i) for i in todo[:3])


def test_a_bad_pair_in_a_batch_fails_alone(tmp_path, demo_cohort):
    """A batch of 5: one moving image far out of view (no overlap: regcore fails it), one constant
    image (refused at ingest); each fails with its message, the other three complete with the same
    results as when they run without them."""
    from pipeline.task import register_batch_task

    subjects = read_manifest(demo_cohort)[:4]  # atlas + 3 good subjects
    far_src = read_image(read_manifest(demo_cohort)[4].image)
    g = far_src.grid
    far = Image(far_src.data, Grid(g.size, g.spacing, tuple(o + 5000.0 for o in g.origin), g.direction))
    bad = [Subject("far", write_image(far, tmp_path / "far.nii.gz")),
           Subject("flat", write_image(Image(torch.full_like(far_src.data, 3.0), g), tmp_path / "flat.nii.gz"))]
    cohort = [subjects[0], subjects[1], bad[0], subjects[2], bad[1], subjects[3]]
    identity = {**FAST_METHOD, "stages": [{**FAST_METHOD["stages"][0], "init": "none"}]}  # no re-centring
    store = tmp_path / "with.zarr"
    ingest(read_manifest(write_manifest(cohort, tmp_path / "m.csv")), store)
    pairs = make_pairs(cohort, "atlas", atlas="atlas")
    todo, _ = plan_pairs(store, pairs, method_config(identity))
    out = register_batch_task(store, todo, identity)
    by_moving = {pairs[r["index"]].moving: r for r in out}
    assert [by_moving[s.key]["status"] for s in subjects[1:]] == ["complete"] * 3
    assert by_moving["far"]["status"] == "failed" and "no overlap" in by_moving["far"]["error"]
    assert by_moving["far"]["error"].startswith("far--to--atlas: ") and by_moving["far"]["batch_size"] == 4
    assert by_moving["flat"]["status"] == "failed" and "flat" in by_moving["flat"]["error"]
    assert by_moving["flat"]["batch_size"] == 0  # never reached regcore
    ds = open_results(store)
    errors = dict(zip(ds["moving"].values.astype(object), ds["error"].values.astype(object)))
    assert "no overlap" in errors["far"] and errors["flat"] == by_moving["flat"]["error"]

    alone = tmp_path / "without.zarr"  # the three good pairs without the bad ones
    ingest(subjects, alone)
    good_pairs = make_pairs(subjects, "atlas", atlas="atlas")
    todo_alone, _ = plan_pairs(alone, good_pairs, method_config(identity))
    assert all(r["status"] == "complete" for r in register_batch_task(alone, todo_alone, identity))
    index = {p.moving: i for i, p in enumerate(pairs)}
    for j, p in enumerate(good_pairs):
        a, b = read_field(store, index[p.moving]).data.numpy(), read_field(alone, j).data.numpy()
        assert float(np.abs(a - b).mean()) < 0.1
        da = float(ds["dice_after"].values[index[p.moving]])
        assert abs(da - float(open_results(alone)["dice_after"].values[j])) < 0.005


def test_a_failed_registration_is_recorded_for_its_pair_only(five_pairs, monkeypatch):
    import pipeline.task as task

    store, pairs, todo = five_pairs
    original = task.register_batch

    def one_fails(fixed, movings, *args, **kwargs):
        out = original(fixed, movings, *args, **kwargs)
        out[1] = RegistrationFailure(1, "test-affine", ValueError("loss became NaN at level 0"), "tb")
        return out

    monkeypatch.setattr(task, "register_batch", one_fails)
    out = task.register_batch_task(store, todo, FAST_METHOD)
    assert [r["status"] for r in out] == ["complete", "failed", "complete", "complete", "complete"]
    assert out[1]["error"] == f"{pairs[1].pair_id}: ValueError: loss became NaN at level 0"
    root = zarr.open_group(str(store), mode="r", use_consolidated=False)
    assert str(root["traceback"][todo[1]]) == "tb" and str(root["status"][todo[1]]) == "failed"
    assert all(verify_pair(store, i) for i in todo if i != todo[1])
