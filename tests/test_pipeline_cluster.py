"""Pipeline acceptance on a LocalCluster of worker processes (CPU): end to end, resume, bad input,
concurrency, a worker killed mid-pair, GPU resource annotation."""

from __future__ import annotations

import json
import os
import threading
import time

import cloudpickle
import dask
import numpy as np
import pytest
import torch
import zarr
from distributed.diagnostics.plugin import WorkerPlugin

import test_pipeline_cluster as this_module
from conftest import FAST_METHOD, make_image
from pipeline.analysis import open_results, verify_pair
from cohortreg.cli import main as cohortreg
from pipeline.ingest import ingest
from pipeline.manifest import Subject, read_manifest, write_manifest
from pipeline.pairs import make_pairs
from pipeline.runner import run_pairs
from pipeline.store import PairWriter, read_field
from regcore import Image, read_image, write_image
from regcore.evaluation import mean_dice
from regcore.sampling import sample_world

cloudpickle.register_pickle_by_value(this_module)  # the fault-injection plugin travels to workers


def _dice_with_field(store, pair, subjects_by_key, use_field=True):
    field = read_field(store, pair.pair_id)
    fixed_lab = read_image(subjects_by_key[pair.fixed].labels, dtype=None)
    moving_lab = read_image(subjects_by_key[pair.moving].labels, dtype=None)
    pts = field.grid.world_points(dtype=torch.float64)
    if use_field:
        pts = pts + torch.movedim(field.data.double(), 0, -1)
    return mean_dice(fixed_lab.data, sample_world(moving_lab, pts, mode="nearest"))


def test_end_to_end_atlas_cohort(tmp_path, demo_cohort, local_client):
    subjects = read_manifest(demo_cohort)
    assert len(subjects) >= 9  # atlas + 8 subjects
    store = tmp_path / "cohort.zarr"
    assert ingest(subjects, store, local_client).count("ok") == len(subjects)
    assert ingest(subjects, store, local_client).count("skipped") == len(subjects)  # idempotent
    pairs = make_pairs(subjects, "atlas", atlas="atlas")
    summary = run_pairs(local_client, store, pairs, FAST_METHOD)
    assert summary.counts()["complete"] == 8 and not summary.failed
    ds = open_results(store)
    assert ds.sizes["pair"] == 8 and list(ds["fixed"].values.astype(object)) == ["atlas"] * 8
    assert ds["displacement"].dims == ("pair", "component", "z", "y", "x")
    by_key = {s.key: s for s in subjects}
    for i, pair in enumerate(pairs):
        before = _dice_with_field(store, pair, by_key, use_field=False)
        after = _dice_with_field(store, pair, by_key)
        assert after > before + 0.05, (pair.pair_id, before, after)
        assert after == pytest.approx(float(ds["dice_after"].values[i]), abs=1e-9)
        assert verify_pair(store, i)
    assert os.path.exists(summary.log_path) and os.path.exists(summary.report_path)
    # resume: an unchanged rerun submits nothing
    again = run_pairs(local_client, store, pairs, FAST_METHOD)
    assert again.submitted == [] and len(again.skipped) == 8
    # a pair left half-done by a crashed driver ("running") is redone, alone
    PairWriter(store, 3).begin()
    again = run_pairs(local_client, store, pairs, FAST_METHOD)
    assert again.submitted == [3] and verify_pair(store, 3)
    # a changed config reruns every pair it affects (here: all) and records the new hash
    changed = {**FAST_METHOD, "stages": [{**FAST_METHOD["stages"][0], "pyramid": {"factors": [1.0], "iterations": [5]}}]}
    again = run_pairs(local_client, store, pairs, changed)
    assert sorted(again.submitted) == list(range(8)) and len(again.complete) == 8
    ds = open_results(store)
    assert len(set(ds["config_hash"].values.astype(object))) == 1
    assert str(ds["config_hash"].values[0]) == ds.attrs["config_hash"] != ""
    assert (ds["level_factor"].values[:, 0] == 1.0).all() and np.isnan(ds["level_factor"].values[:, 1]).all()
    assert run_pairs(local_client, store, pairs, changed).submitted == []


def test_bad_inputs_fail_alone(tmp_path, demo_cohort, local_client, capsys):
    subjects = read_manifest(demo_cohort)[:4]  # atlas + 3 good subjects
    good = read_image(subjects[1].image)
    write_image(Image(torch.full_like(good.data, float("nan")), good.grid), tmp_path / "nan.mha")
    write_image(Image(torch.zeros_like(good.data), good.grid), tmp_path / "zero.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x00garbage" * 10)
    write_image(make_image((good.grid.shape[1], good.grid.shape[2])), tmp_path / "flat2d.nii.gz")
    bad = [Subject("missing", tmp_path / "does_not_exist.nii.gz"), Subject("broken", tmp_path / "broken.nii.gz"),
           Subject("flat2d", tmp_path / "flat2d.nii.gz"), Subject("nan", tmp_path / "nan.mha"),
           Subject("zero", tmp_path / "zero.nii.gz")]
    manifest = write_manifest(subjects + bad, tmp_path / "manifest.csv")
    store = tmp_path / "cohort.zarr"
    report = ingest(read_manifest(manifest), store, local_client)
    assert report.count("ok") == 5 and report.count("failed") == 4  # the 2D image itself is valid
    pairs = make_pairs(read_manifest(manifest), "atlas", atlas="atlas")
    summary = run_pairs(local_client, store, pairs, FAST_METHOD)
    ds = open_results(store)
    status = dict(zip(ds["moving"].values.astype(object), ds["status"].values.astype(object)))
    error = dict(zip(ds["moving"].values.astype(object), ds["error"].values.astype(object)))
    assert [status[s.key] for s in subjects[1:]] == ["complete"] * 3
    assert all(status[b.key] == "failed" for b in bad) and len(summary.failed) == 5
    assert "no such file" in error["missing"] and "does_not_exist.nii.gz" in error["missing"]
    assert "broken.nii.gz" in error["broken"]
    assert "dimension mismatch" in error["flat2d"] and "2D" in error["flat2d"]
    assert "NaN" in error["nan"]
    assert "no contrast" in error["zero"]
    assert cohortreg(["status", str(store)]) == 0
    out = capsys.readouterr().out
    assert "3 complete, 5 failed" in out
    for b in bad:
        assert f"FAILED {b.key}--to--atlas" in out


def test_concurrent_writers_never_mix_results(tmp_path, demo_cohort, local_client):
    subjects = read_manifest(demo_cohort)
    store = tmp_path / "cohort.zarr"
    ingest(subjects, store, local_client)
    pairs = make_pairs(subjects, "all")[:64]  # 64 pairs, 8 fixed grids... all equal: one stacked array
    assert len(pairs) == 64
    summary = run_pairs(local_client, store, pairs, FAST_METHOD, window=16)
    assert len(summary.complete) == 64
    assert len({r["worker"] for r in summary.results.values()}) == 4  # all four processes wrote
    root = zarr.open_group(str(store), mode="r")
    for i in range(64):
        assert verify_pair(store, i), pairs[i].pair_id
        assert str(root["checksum"][i]) == summary.results[i]["checksum"]  # what its own task computed


class KillOnPair(WorkerPlugin):
    """Test-only fault injection: the worker process dies (os._exit) while it runs the pair's task,
    after the task has marked the pair ``running`` in the store."""

    name = "kill-on-pair"

    def __init__(self, key_prefix: str, store: str, index: int):
        self.key_prefix, self.store, self.index = key_prefix, store, index

    def setup(self, worker):
        self.worker = worker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and str(key).startswith(self.key_prefix):
            def die():
                root = zarr.open_group(self.store, mode="r")
                for _ in range(2000):
                    if str(root["status"][self.index]) == "running":
                        break
                    time.sleep(0.005)
                os._exit(1)

            threading.Thread(target=die, daemon=True).start()


def test_worker_killed_mid_pair(tmp_path, demo_cohort):
    from cluster.profiles import start_cluster

    subjects = read_manifest(demo_cohort)
    store = tmp_path / "cohort.zarr"
    pairs = make_pairs(subjects, "atlas", atlas="atlas")
    victim = 2
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        handle = start_cluster("local", workers=2, threads=1)
    try:
        client = handle.client
        ingest(subjects, store, client)
        client.register_plugin(KillOnPair(f"pair-{victim}-", str(store), victim))
        summary = run_pairs(client, store, pairs, FAST_METHOD, retries=0)
        assert summary.failed == [victim] and len(summary.complete) == 7
        assert "task lost" in summary.errors[victim] and "KilledWorker" in summary.errors[victim]
        # the run log names the pair, the worker that ran it and how its process ended
        events = [json.loads(line) for line in open(summary.log_path)]
        lost = [e for e in events if e["event"] == "worker_lost"]
        assert len(lost) == 1 and lost[0]["pair_id"] == pairs[victim].pair_id
        assert lost[0]["worker"].startswith("tcp://") and "exited with status 1" in lost[0]["death"]
        ds = open_results(store)
        assert str(ds["status"].values[victim]) == "failed"
        assert all(verify_pair(store, i) for i in range(8) if i != victim)
        client.unregister_worker_plugin("kill-on-pair")
        client.restart()
        rerun = run_pairs(client, store, pairs, FAST_METHOD)
        assert rerun.submitted == [victim] and rerun.complete == [victim]
        assert all(verify_pair(store, i) for i in range(8))
    finally:
        handle.close()


def test_gpu_resource_one_pair_per_worker(tmp_path, demo_cohort):
    """Workers with 2 task slots that declare GPU=1: annotated tasks never overlap on a worker."""
    from cluster.profiles import start_cluster

    subjects = read_manifest(demo_cohort)
    store = tmp_path / "cohort.zarr"
    handle = start_cluster("local", workers=2, threads=1, slots=2, resources={"GPU": 1}, device="cpu")
    try:
        ingest(subjects, store, handle.client)
        pairs = make_pairs(subjects, "atlas", atlas="atlas")
        summary = run_pairs(handle.client, store, pairs, FAST_METHOD, gpu=True, window=8)
        assert len(summary.complete) == 8
        by_worker: dict[str, list[tuple[float, float]]] = {}
        for r in summary.results.values():
            by_worker.setdefault(r["worker"], []).append((r["t_start"], r["t_end"]))
        for spans in by_worker.values():
            spans.sort()
            assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:])), spans
    finally:
        handle.close()


class FailOnceOnWrite(WorkerPlugin):
    """Test-only fault injection: the first field write of the run raises OSError (a store hiccup)."""

    name = "fail-once-on-write"

    def __init__(self, marker: str):
        self.marker = marker

    def setup(self, worker):
        from pipeline import store as store_module

        original = store_module.PairWriter.write_field
        marker = self.marker

        def write_field(self, field, warped_labels):
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # exactly one failure, cluster-wide
            except FileExistsError:
                return original(self, field, warped_labels)
            os.close(fd)
            raise OSError("injected: the store refused a write")

        store_module.PairWriter.write_field = write_field


def test_store_write_error_is_retried_by_dask(tmp_path, demo_cohort):
    from cluster.profiles import start_cluster

    subjects = read_manifest(demo_cohort)[:4]
    store = tmp_path / "cohort.zarr"
    pairs = make_pairs(subjects, "atlas", atlas="atlas")
    handle = start_cluster("local", workers=1, threads=1)
    try:
        ingest(subjects, store, handle.client)
        marker = tmp_path / "failed-once"
        handle.client.register_plugin(FailOnceOnWrite(str(marker)))
        summary = run_pairs(handle.client, store, pairs, FAST_METHOD, retries=1)
        assert marker.exists()  # the fault happened
        assert summary.failed == [] and len(summary.complete) == 3  # and the retry completed the pair
        assert all(verify_pair(store, i) for i in range(3))
    finally:
        handle.close()
