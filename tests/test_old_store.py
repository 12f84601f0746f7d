"""A results store written by the code before the config hash covered params after their defaults
(commit 41ce1cf^; ``tests/fixtures/old_store``, made by ``tests/fixtures/make_old_store.py``) opens,
reads, verifies and resumes with the current code (issue 12's acceptance).

The fixture: an atlas and three subjects (16^3 voxels at 6 mm, two labels, five landmarks), each
subject the atlas shifted by a known translation t, registered to the atlas by one affine stage on
``lncc`` with no params. ``expected.json`` holds what the old code read back. The committed store
is never touched: every test works on a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cohortreg.cli import main as cohortreg
from pipeline.analysis import open_results, verify_pair
from pipeline.runner import plan_pairs
from pipeline.store import mark_failed, read_field, read_layout, read_status, read_warped_labels
from regcore import method_config
from regcore.config import canonical_config, config_hash, legacy_config_hash

pytestmark = pytest.mark.usefixtures("single_thread")

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "old_store"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
METHOD = json.loads((FIXTURE / "method.json").read_text())
PAIR_IDS = sorted(EXPECTED["pairs"], key=lambda p: EXPECTED["pairs"][p]["index"])
OLD_HASH = EXPECTED["old_config_hash"]


@pytest.fixture
def store(tmp_path) -> Path:
    """A copy of the old store (the committed fixture stays as it was written)."""
    out = tmp_path / "store.zarr"
    shutil.copytree(FIXTURE / "store.zarr", out)
    return out


def _strings(values) -> list[str]:
    return [str(v) for v in np.asarray(values).astype(object)]


def test_fixture_is_an_old_store_hashed_the_old_way():
    """The premise: the store holds the legacy hash of its config, which the new hash differs from."""
    cfg = method_config(METHOD)
    assert EXPECTED["root_config_hash"] == OLD_HASH == legacy_config_hash(cfg)
    assert config_hash(cfg) != OLD_HASH  # lncc's defaulted window now takes part in the hash
    assert EXPECTED["written_by_commit"].startswith("fe08d42")  # 41ce1cf^
    assert sum(p.stat().st_size for p in FIXTURE.rglob("*") if p.is_file()) < 400_000


def test_opens_and_reads(store):
    ds = open_results(store)
    assert ds.sizes["pair"] == 3 and ds.attrs["layout_version"] == EXPECTED["layout_version"] == 1
    assert _strings(ds["pair_id"].values) == PAIR_IDS
    assert _strings(ds["status"].values) == ["complete"] * 3
    assert _strings(ds["config_hash"].values) == [OLD_HASH] * 3
    assert ds["displacement"].dims == ("pair", "component", "z", "y", "x")
    assert ds["displacement"].shape == (3, 3, 16, 16, 16)
    assert ds["dice_label_after"].dims == ("pair", "label") and list(ds["label"].values) == EXPECTED["labels"]
    # world coordinates of the fixed (atlas) grid: origin (-45, -45, -42) mm, 6 mm spacing
    np.testing.assert_allclose(ds["x"].values, -45.0 + 6.0 * np.arange(16))
    np.testing.assert_allclose(ds["z"].values, -42.0 + 6.0 * np.arange(16))
    for i, pid in enumerate(PAIR_IDS):
        exp = EXPECTED["pairs"][pid]
        assert str(ds["moving"].values[i]) == exp["moving"] and str(ds["fixed"].values[i]) == "atlas"
        for m in ("dice_before", "dice_after", "tre_before", "tre_after", "ncc_before", "ncc_after", "final_loss"):
            assert float(ds[m].values[i]) == pytest.approx(exp[m], rel=1e-12), (pid, m)
        np.testing.assert_allclose(ds["dice_label_after"].values[i], exp["dice_label_after"], rtol=1e-12)
        # the registration did its job (so these are real results, not fill values)
        assert exp["dice_after"] > exp["dice_before"] + 0.15
        assert exp["tre_after"] < 1.0 and exp["tre_before"] > 5.0
        # the field as the Dataset and as read_field see it: what the old code wrote, voxel for voxel
        field = read_field(store, i)
        assert list(field.data.shape) == exp["field_shape"] == [3, 16, 16, 16]
        lazy = ds["displacement"].isel(pair=i).values
        np.testing.assert_array_equal(lazy, field.data.numpy())
        for key, value in exp["field_voxels"].items():
            z, y, x = (int(v) for v in key.split(","))
            np.testing.assert_allclose(lazy[:, z, y, x], value, rtol=0, atol=0)
        mean = lazy.reshape(3, -1).mean(1)
        np.testing.assert_allclose(mean, exp["field_mean"], atol=1e-5)
        np.testing.assert_allclose(mean, exp["true_field"], atol=0.5)  # u = -t, the known shift
        assert int(read_warped_labels(store, i).data.sum()) == exp["warped_labels_sum"]
        assert str(ds["checksum"].values[i]) == exp["checksum"] and verify_pair(store, i)


def test_cli_status_and_verify(store, capsys):
    assert cohortreg(["status", str(store)]) == 0
    out = capsys.readouterr().out
    assert "3 pairs, 3 complete, 0 failed" in out and "0 pending" in out
    assert cohortreg(["verify", str(store)]) == 0
    assert "3 complete pairs checked, 0 mismatch" in capsys.readouterr().out
    assert cohortreg(["status", str(store), "--verify"]) == 0


def test_resume_plans_nothing_and_only_new_pairs(store):
    """An unchanged rerun of the old config skips every pair (the legacy hash counts as the same
    config); a pair added to the table is the only one to run."""
    from pipeline.pairs import Pair

    cfg = method_config(METHOD)
    layout = read_layout(store)
    assert [p.pair_id for p in layout.pairs] == PAIR_IDS
    todo, skip = plan_pairs(store, layout.pairs, cfg)
    assert todo == [] and skip == [0, 1, 2]
    # a changed config reruns them all
    changed = json.loads(json.dumps(METHOD))
    changed["stages"][0]["pyramid"]["iterations"] = [5, 5]
    assert plan_pairs(store, layout.pairs, method_config(changed)) == ([0, 1, 2], [])
    # a new pair (sub-02 onto sub-01, the same fixed grid as the atlas's) is appended and runs alone
    new = Pair("sub-02--to--sub-01", "sub-01", "sub-02")
    todo, skip = plan_pairs(store, list(layout.pairs) + [new], cfg)
    assert todo == [3] and skip == [0, 1, 2]
    assert [p.pair_id for p in read_layout(store).pairs] == PAIR_IDS + [new.pair_id]
    assert _strings(read_status(store)["config_hash"]) == [OLD_HASH] * 3 + [""]  # planning rewrote no result


def test_resume_reruns_only_the_failed_pair(store):
    """``cohortreg run STORE --workflow atlas`` on the old store (no manifest, no method: the store's
    own config and pair table) after one pair failed reruns that pair only; the others keep their
    old results and hashes, and a further rerun does nothing."""
    from distributed import Client

    from workflows import get_workflow

    mark_failed(store, 1, "injected by the test")
    assert _strings(read_status(store)["status"]) == ["complete", "failed", "complete"]
    wf = get_workflow("atlas")
    plan = wf.plan(store)  # the store's recorded method, pairing (atlas rule, atlas "atlas") and subjects
    assert plan.pairing["atlas"] == "atlas" == EXPECTED["pairing"]["atlas"]
    assert [p.pair_id for p in plan.pairs] == PAIR_IDS
    assert method_config(plan.method) == method_config(METHOD)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        summary = wf.run(plan, client)
        assert summary.submitted == [1] and sorted(summary.skipped) == [0, 2] and not summary.failed
        again = wf.run(wf.plan(store), client)
        assert again.submitted == [] and sorted(again.skipped) == [0, 1, 2]
    ds = open_results(store)
    new_hash = config_hash(method_config(METHOD))
    assert _strings(ds["status"].values) == ["complete"] * 3
    assert _strings(ds["config_hash"].values) == [OLD_HASH, new_hash, OLD_HASH]
    for i, pid in enumerate(PAIR_IDS):
        exp = EXPECTED["pairs"][pid]
        assert verify_pair(store, i)
        if i != 1:  # untouched
            assert str(ds["checksum"].values[i]) == exp["checksum"]
            assert float(ds["dice_after"].values[i]) == exp["dice_after"]
    # the rerun pair registered as well as the old code did
    exp = EXPECTED["pairs"][PAIR_IDS[1]]
    assert float(ds["dice_after"].values[1]) == pytest.approx(exp["dice_after"], abs=0.05)
    assert float(ds["tre_after"].values[1]) < 1.0
    np.testing.assert_allclose(read_field(store, 1).data.numpy().reshape(3, -1).mean(1), exp["true_field"], atol=0.5)
    assert cohortreg(["verify", str(store)]) == 0


def test_resume_with_the_default_spelled_out(store):
    """The old store was run with ``lncc {}``; rerunning it with ``lncc {window: <its default>}``
    (one config under the new hash) should rerun nothing either."""
    cfg = method_config(METHOD)
    spelled = json.loads(json.dumps(METHOD))
    default = canonical_config(cfg)["stages"][0]["objective"][0]["params"]["window"]
    spelled["stages"][0]["objective"][0]["params"] = {"window": default}
    assert config_hash(method_config(spelled)) == config_hash(cfg)  # the new hash: one config
    assert plan_pairs(store, read_layout(store).pairs, method_config(spelled)) == ([], [0, 1, 2])


def test_store_without_recorded_pairing_resumes_twice(store):
    import zarr

    from workflows import get_workflow

    root = zarr.open_group(str(store), mode="r+", zarr_format=3)
    attrs = dict(root.attrs)
    attrs.pop("pairing"), attrs.pop("workflow")  # as run_pairs alone (no workflow) wrote it
    root.attrs.clear()
    root.attrs.update(attrs)
    wf = get_workflow("atlas")
    first = wf.plan(store)
    assert [p.pair_id for p in first.pairs] == PAIR_IDS
    assert plan_pairs(store, first.pairs, method_config(first.method), {"workflow": wf.name, "pairing": first.pairing}) \
        == ([], [0, 1, 2])  # what wf.run records before it submits (nothing here)
    assert [p.pair_id for p in wf.plan(store).pairs] == PAIR_IDS
