"""A store a lab can leave running: method provenance, growing cohorts, one writer, verify, exit
codes (the ``cohortreg`` command line against a shared local cluster, through ``--profile address``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zarr

from conftest import ROOT
from pipeline.analysis import open_results
from cohortreg.cli import main as cohortreg
from pipeline.lock import LOCK_NAME, read_lock
from pipeline.manifest import read_manifest, write_manifest
from pipeline.pairs import read_pairs

FAST = ["--no-progress"]


def _cluster_args(client) -> list[str]:
    return ["--profile", "address", "--address", client.scheduler.address]


def _manifest(demo_cohort: Path, folder: Path, n: int) -> Path:
    """The demo cohort's atlas and its first ``n - 1`` subjects."""
    subjects = read_manifest(demo_cohort)[:n]
    return write_manifest(subjects, folder / f"m{n}.csv")


def _rigid_store(tmp_path, demo_cohort, client, n=4) -> tuple[Path, Path]:
    store = tmp_path / "s.zarr"
    manifest = _manifest(demo_cohort, tmp_path, n)
    code = cohortreg(["run", str(store), "--manifest", str(manifest), "--atlas", "atlas", "--method", "rigid",
                      *FAST, *_cluster_args(client)])
    assert code == 0
    return store, manifest


def test_config_alone_keeps_the_method_and_every_config_stays(tmp_path, demo_cohort, local_client, capsys):
    store, _ = _rigid_store(tmp_path, demo_cohort, local_client)
    first = dict(zarr.open_group(str(store), mode="r").attrs)
    assert first["method"] == "rigid"
    overrides = tmp_path / "o.yaml"
    overrides.write_text("stages:\n  - pyramid:\n      iterations: [50, 30, 10]\n")
    capsys.readouterr()
    assert cohortreg(["run", str(store), "--config", str(overrides), *FAST, *_cluster_args(local_client)]) == 0
    assert "3 registered, 0 already complete" in capsys.readouterr().out  # the hash changed: all rerun
    attrs = dict(zarr.open_group(str(store), mode="r").attrs)
    assert attrs["method"] == "rigid" and attrs["config"]["stages"][0]["transform"] == "rigid"
    assert attrs["config"]["stages"][0]["pyramid"]["iterations"] == [50, 30, 10]
    assert attrs["config_hash"] != first["config_hash"]
    assert set(attrs["configs"]) == {first["config_hash"], attrs["config_hash"]}  # the old config stays
    assert attrs["configs"][first["config_hash"]] == first["config"]
    ds = open_results(store)
    assert set(str(h) for h in ds["config_hash"].values) == {attrs["config_hash"]}
    # the same overrides again: nothing to do; no overrides: the store's last config, nothing to do
    assert cohortreg(["run", str(store), "--config", str(overrides), *FAST, *_cluster_args(local_client)]) == 0
    assert cohortreg(["run", str(store), *FAST, *_cluster_args(local_client)]) == 0
    assert capsys.readouterr().out.count("0 registered, 3 already complete") == 2


def test_a_growing_cohort_runs_only_its_new_pairs(tmp_path, demo_cohort, local_client, capsys):
    store, _ = _rigid_store(tmp_path, demo_cohort, local_client, n=5)
    before = read_pairs(store / "pairs.csv")
    checksums = [str(c) for c in open_results(store)["checksum"].values]
    capsys.readouterr()
    grown = _manifest(demo_cohort, tmp_path, 7)
    assert cohortreg(["run", str(store), "--manifest", str(grown), *FAST, *_cluster_args(local_client)]) == 0
    assert "6 pairs: 2 registered, 4 already complete" in capsys.readouterr().out
    after = read_pairs(store / "pairs.csv")
    assert after[:4] == before and len(after) == 6
    ds = open_results(store)
    assert [str(c) for c in ds["checksum"].values[:4]] == checksums  # untouched
    assert set(str(s) for s in ds["status"].values) == {"complete"}
    # naming the atlas again is the same pairing: nothing to do
    assert cohortreg(["run", str(store), "--manifest", str(grown), "--atlas", "atlas", *FAST,
                      *_cluster_args(local_client)]) == 0
    assert "6 pairs: 0 registered, 6 already complete" in capsys.readouterr().out
    # a manifest that lost subjects is refused (exit 2, before any work), unless asked for
    code = cohortreg(["run", str(store), "--manifest", str(_manifest(demo_cohort, tmp_path, 3)), *FAST,
                      *_cluster_args(local_client)])
    assert code == 2 and "--allow-removed" in capsys.readouterr().err
    assert cohortreg(["run", str(store), "--manifest", str(_manifest(demo_cohort, tmp_path, 3)), "--allow-removed",
                      *FAST, *_cluster_args(local_client)]) == 0
    assert "2 pairs: 0 registered, 2 already complete" in capsys.readouterr().out
    assert len(read_pairs(store / "pairs.csv")) == 6


def test_verify_finds_a_chunk_altered_on_disk(tmp_path, demo_cohort, local_client, capsys):
    store, _ = _rigid_store(tmp_path, demo_cohort, local_client)
    assert cohortreg(["verify", str(store)]) == 0
    assert "3 complete pairs checked, 0 mismatch" in capsys.readouterr().out
    # replace pair 0's chunk of the stacked field by pair 1's (a valid chunk, other numbers)
    chunks = store / "displacement" / "c"
    src, dst = chunks / "1", chunks / "0"
    for f in src.rglob("*"):
        if f.is_file():
            (dst / f.relative_to(src)).write_bytes(f.read_bytes())
    assert cohortreg(["verify", str(store)]) == 1
    out = capsys.readouterr().out
    assert "CHECKSUM MISMATCH sub-01--to--atlas" in out and "1 mismatch" in out
    assert cohortreg(["status", str(store), "--verify"]) == 1


def test_bad_input_exits_2_before_any_cluster(tmp_path, demo_cohort, monkeypatch, capsys):
    import cohortreg.cli as cli

    def no_cluster(args):
        raise AssertionError("a cluster was started for a bad input")

    monkeypatch.setattr(cli, "_cluster", no_cluster)
    manifest = _manifest(demo_cohort, tmp_path, 3)
    store = tmp_path / "s.zarr"
    cases = {
        "atlas key 'nope' is not in the cohort; valid keys: atlas, sub-01, sub-02": [
            "run", str(store), "--manifest", str(manifest), "--atlas", "nope"],
        "invalid method configuration": ["run", str(store), "--manifest", str(manifest), "--atlas", "atlas",
                                         "--config", str(tmp_path / "bad.yaml")],
        "unknown method": ["run", str(store), "--manifest", str(manifest), "--atlas", "atlas", "--method", "nope"],
        "unknown workflow": ["run", str(store), "--manifest", str(manifest), "--workflow", "nope"],
        "is a file, not a store directory": ["run", str(tmp_path / "file.zarr"), "--manifest", str(manifest),
                                             "--atlas", "atlas"],
        "cannot name a store folder": ["run", str(store), "--manifest", str(tmp_path / "dots.csv"), "--atlas", "atlas"],
    }
    (tmp_path / "bad.yaml").write_text("stages:\n  - optimizer: {lr: -1, nonsense: 3}\n")
    (tmp_path / "file.zarr").write_text("not a store")
    (tmp_path / "dots.csv").write_text(f"subject,image\n..,{tmp_path / 'a.nii.gz'}\n")
    for message, argv in cases.items():
        assert cohortreg(argv + FAST) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (message, err)
    assert cohortreg(["ingest", str(manifest), str(tmp_path / "file.zarr")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_ingest_exits_1_when_a_subject_failed(tmp_path, demo_cohort, local_client, capsys):
    subjects = read_manifest(demo_cohort)[:2]
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,image\n" + "".join(f"{s.subject},{s.image}\n" for s in subjects)
                        + f"ghost,{tmp_path / 'ghost.nii.gz'}\n")
    assert cohortreg(["ingest", str(manifest), str(tmp_path / "s.zarr"), *_cluster_args(local_client)]) == 1
    out = capsys.readouterr().out
    assert "2 written" in out and "1 failed" in out and "ghost.nii.gz" in out


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "import sys; from cohortreg.cli import main; sys.exit(main(sys.argv[1:]))", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}


def test_two_concurrent_runs_on_one_store(tmp_path, demo_cohort, local_client, capsys):
    """The second run stops at once (exit 3) naming the first; the first completes."""
    store = tmp_path / "s.zarr"
    manifest = _manifest(demo_cohort, tmp_path, 5)
    first = subprocess.Popen(_cli("run", str(store), "--manifest", str(manifest), "--atlas", "atlas", "--method",
                                  "rigid", *FAST, *_cluster_args(local_client)),
                             env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if (store / LOCK_NAME).exists() or first.poll() is not None:
                break
            time.sleep(0.02)
        owner = read_lock(store)
        assert owner is not None and owner["pid"] == first.pid
        t0 = time.perf_counter()
        assert cohortreg(["run", str(store), "--manifest", str(manifest), "--atlas", "atlas", "--method", "rigid",
                          *FAST, *_cluster_args(local_client)]) == 3
        assert time.perf_counter() - t0 < 10
        err = capsys.readouterr().err
        assert str(first.pid) in err and "Traceback" not in err
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
        assert "4 registered" in out
    finally:
        if first.poll() is None:
            first.kill()
    assert not (store / LOCK_NAME).exists()
    # a lock left by a killed run is taken over
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pipeline.lock import StoreLock; "
                               "StoreLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(store)],
                              env=_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert read_lock(store)["pid"] == holder.pid
    assert cohortreg(["run", str(store), "--manifest", str(manifest), *FAST, *_cluster_args(local_client)]) == 0
    assert "0 registered, 4 already complete" in capsys.readouterr().out


def test_ctrl_c_exits_130_and_leaves_the_run_resumable(tmp_path, demo_cohort, local_client, capsys):
    store = tmp_path / "s.zarr"
    manifest = _manifest(demo_cohort, tmp_path, 9)
    slow = tmp_path / "slow.yaml"  # a few seconds per pair: Ctrl-C comes while pairs run
    slow.write_text("stages:\n  - pyramid: {iterations: [100, 100, 100]}\n    stopping: {patience: 1000, rel_tol: 0}\n")
    run = subprocess.Popen(_cli("run", str(store), "--manifest", str(manifest), "--atlas", "atlas", "--method",
                                "rigid", "--config", str(slow), "--window", "2", *FAST, *_cluster_args(local_client)),
                           env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1500):  # until a pair is running
            if (store / "pairs.csv").exists():
                status = [str(s) for s in zarr.open_group(str(store), mode="r")["status"][...]]
                if "running" in status:
                    break
            time.sleep(0.02)
        run.send_signal(signal.SIGINT)
        out, err = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (store / LOCK_NAME).exists()
    log = [json.loads(line) for line in sorted((store / "logs").glob("run-*.jsonl"))[-1].read_text().splitlines()]
    assert log[-1]["event"] == "interrupted" and log[-1]["pairs"]  # the pairs it left running: "interrupted"
    status = [str(s) for s in zarr.open_group(str(store), mode="r")["status"][...]]
    assert set(status[2:]) == {""}  # nothing beyond the window of 2 started
    # (a task the external cluster had already started may still finish and write "complete")
    assert set(status[:2]) <= {"interrupted", "running", "complete", ""}
    # the rerun completes every pair (a faster config: the interrupted ones and all others run)
    assert cohortreg(["run", str(store), "--method", "rigid", *FAST, *_cluster_args(local_client)]) == 0
    assert set(str(s) for s in open_results(store)["status"].values) == {"complete"}
