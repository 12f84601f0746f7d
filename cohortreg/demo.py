"""``cohortreg demo``: the offline demo cohort, ingested and registered to the atlas on a local cluster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "DEMO_METHOD"]

DEMO_METHOD = "affine"


def run_demo(args: argparse.Namespace) -> int:
    """Build (once) the demo cohort under ``args.out``, run the atlas workflow, print Dice per subject."""
    from pipeline.analysis import _strings, open_results
    from workflows.demo_cohort import make_demo_cohort

    out = Path(args.out)
    manifest = out / "cohort" / "manifest.csv"
    if not manifest.exists():
        print(f"building the demo cohort ({args.subjects} subjects, {args.resolution:g} mm) in {out / 'cohort'}",
              file=sys.stderr)
        make_demo_cohort(out / "cohort", subjects=args.subjects, resolution=args.resolution)
    from cohortreg.cli import _Bar, _cluster
    from pipeline.lock import StoreLock
    from pipeline.manifest import read_manifest
    from workflows import get_workflow

    store = out / "results.zarr"
    workflow = get_workflow("atlas")
    plan = workflow.plan(store, subjects=read_manifest(manifest), method=args.method or DEMO_METHOD, atlas="atlas",
                         direction="to-atlas")
    with StoreLock(store):
        handle = _cluster(args)
        try:
            bar = _Bar(len(plan.pairs), not args.no_progress)
            try:
                summary = workflow.run(plan, handle.client, gpu=handle.gpu, progress=bar, batch_size=handle.batch_size,
                                       on_ingest=lambda report: print(report.summary(), file=sys.stderr))
            finally:
                bar.close()
        finally:
            handle.close()
    ds = open_results(store)
    ids = _strings(ds["moving"].values)
    status = _strings(ds["status"].values)
    before, after = ds["dice_before"].values, ds["dice_after"].values
    print(f"\n{'subject':<10} {'status':<9} {'Dice before':>11} {'Dice after':>10}")
    for i in range(ds.sizes["pair"]):
        print(f"{ids[i]:<10} {status[i]:<9} {before[i]:>11.3f} {after[i]:>10.3f}")
    ok = status == "complete"
    if ok.any():
        print(f"{'mean':<10} {'':<9} {np.nanmean(before[ok]):>11.3f} {np.nanmean(after[ok]):>10.3f}")
    print(f"\n{summary.text()}")
    print(f"results store: {store}  (python: pipeline.open_results(path); shell: cohortreg report {store})")
    print(f"run log: {summary.log_path}")
    return 1 if summary.failed else 0
