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
    from pipeline.cli import run_workflow
    from workflows.demo_cohort import make_demo_cohort

    out = Path(args.out)
    manifest = out / "cohort" / "manifest.csv"
    if not manifest.exists():
        print(f"building the demo cohort ({args.subjects} subjects, {args.resolution:g} mm) in {out / 'cohort'}",
              file=sys.stderr)
        make_demo_cohort(out / "cohort", subjects=args.subjects, resolution=args.resolution)
    run_args = argparse.Namespace(
        store=str(out / "results.zarr"), manifest=str(manifest), workflow="atlas", pairs=None, atlas="atlas",
        direction="to-atlas", pair_list=None, method=args.method or DEMO_METHOD, config=None, window=None, retries=1,
        force=False, no_progress=args.no_progress, profile=args.profile, workers=args.workers, threads=args.threads,
        address=args.address, cluster_config=args.cluster_config)
    summary = run_workflow(run_args)
    ds = open_results(run_args.store)
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
    print(f"results store: {run_args.store}  (python: pipeline.open_results(path); shell: cohortreg report {run_args.store})")
    print(f"run log: {summary.log_path}")
    return 1 if summary.failed else 0
