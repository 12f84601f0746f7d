"""Workflows on top of the pipeline: typed plan/run, and the atlas-labels post-step (label propagation
onto subjects that have no labels of their own)."""

from __future__ import annotations

import numpy as np
import torch

from conftest import FAST_METHOD
from pipeline.analysis import open_results
from pipeline.manifest import Subject, read_manifest
from pipeline.store import read_warped_labels
from regcore import Image, read_image
from regcore.evaluation import mean_dice
from regcore.pair_metrics import warp
from workflows import get_workflow


def test_atlas_labels_propagates_onto_unlabelled_subjects(tmp_path, demo_cohort, local_client):
    cohort = read_manifest(demo_cohort)
    atlas, truth = cohort[0], {s.key: s.labels for s in cohort[1:4]}
    subjects = [atlas] + [Subject(s.subject, s.image) for s in cohort[1:4]]  # the subjects have no labels
    workflow = get_workflow("atlas-labels")
    plan = workflow.plan(tmp_path / "s.zarr", subjects=subjects, method=FAST_METHOD, atlas="atlas")
    assert [p.fixed for p in plan.pairs] == ["sub-01", "sub-02", "sub-03"]  # the atlas goes to each subject
    summary = workflow.run(plan, local_client)
    assert len(summary.complete) == 3 and len(summary.outputs) == 3
    atlas_labels = read_image(atlas.labels, dtype=None)
    for i, key in enumerate(["sub-01", "sub-02", "sub-03"]):
        written = read_image(tmp_path / "s.zarr" / "labels" / f"{key}.nii.gz", dtype=None)
        stored = read_warped_labels(tmp_path / "s.zarr", i)
        assert written.grid == stored.grid and torch.equal(written.data.long(), stored.data.long())
        true = read_image(truth[key], dtype=None)
        unregistered = warp(Image(atlas_labels.data.long(), atlas_labels.grid),
                            Image(torch.zeros((3, *true.grid.shape)), true.grid), mode="nearest")
        assert mean_dice(true.data, written.data) > mean_dice(true.data, unregistered.data) + 0.05
    assert np.isnan(float(open_results(tmp_path / "s.zarr")["dice_after"].values[0]))  # no subject labels: no Dice
