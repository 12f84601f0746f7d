"""The ``cohortreg`` command line: ingest a cohort, run a workflow on a Dask cluster, inspect results.

::

    cohortreg ingest MANIFEST STORE                      # images -> STORE/images (idempotent)
    cohortreg run STORE --manifest MANIFEST --workflow atlas --atlas KEY [--method affine+svf] [--batch-size N|auto]
    cohortreg status STORE [--verify]                    # complete / failed / pending, errors
    cohortreg verify STORE                               # recompute every complete pair's checksum
    cohortreg report STORE [--worst 10 --metric dice_after] [--csv F] [--html F] [--pair ID]
    cohortreg apply STORE PAIR INPUT OUTPUT [--kind image|labels|points]
    cohortreg export STORE OUT [--format itk|ants|bids] [--inverse]  # transforms as files
    cohortreg template MANIFEST --out STORE [--iterations 3] # a groupwise template (resumable)
    cohortreg demo [--out DIR] [--subjects 8]            # the offline demo cohort, end to end

Exit status: 0 success; 1 some pairs failed (their number is printed and logged), some subjects
failed ingest, or ``verify`` found a mismatch; 2 bad input (checked before any cluster starts);
3 infrastructure failure (cluster or store, including a store locked by another run); 130
interrupted (Ctrl-C): pairs not complete stay resumable.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from regcore import Image, InfrastructureError, InputError, read_image, write_image
from regcore.points import map_points, read_points
from regcore.pair_metrics import warp

__all__ = ["main", "build_parser"]

log = logging.getLogger("cohortreg")


# ----------------------------------------------------------------------------------- helpers
def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--profile", default="local", help="cluster profile: local (default), local-gpu, slurm, address")
    g.add_argument("--workers", type=int, help="worker processes (local profiles)")
    g.add_argument("--threads", type=int, help="torch threads per worker")
    g.add_argument("--address", help="scheduler address for --profile address")
    g.add_argument("--cluster-config", help="YAML file of cluster profiles overriding the built-in ones")


def _add_batch_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", metavar="N|auto",
                   help="pairs sharing a fixed image registered together in one task (default: the profile's: "
                        "1 for local, auto for local-gpu and slurm; auto = as many as fit the GPU, 1 on CPU)")


def _batch_size(args: argparse.Namespace, handle: Any = None) -> int | str:
    """``--batch-size``, else the profile's ``batch_size``; checked before any cluster starts."""
    from pipeline.runner import batch_setting

    if getattr(args, "batch_size", None) is not None:
        return batch_setting(args.batch_size)
    if handle is not None:
        return batch_setting(handle.batch_size)
    from cluster.profiles import profile_settings

    return batch_setting(profile_settings(getattr(args, "profile", "local"),
                                          getattr(args, "cluster_config", None)).get("batch_size"))


def _cluster(args: argparse.Namespace):
    import distributed  # noqa: F401  (configures its loggers on import; quieten them after that)

    from cluster.profiles import start_cluster

    if not getattr(args, "verbose", False):
        for name in ("distributed", "bokeh", "tornado"):
            logging.getLogger(name).setLevel(logging.ERROR)
    handle = start_cluster(args.profile, args.cluster_config, workers=args.workers, threads=args.threads,
                           address=args.address)
    print(f"dask dashboard: {handle.dashboard_link}", file=sys.stderr)
    return handle


class _Bar:
    """A tqdm progress bar over pairs: done / failed / skipped / running."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="pair", file=sys.stderr, dynamic_ncols=True)

    def __call__(self, counts: dict[str, int], result: dict[str, Any] | None) -> None:
        if self.bar is None:
            return
        self.bar.n = counts["done"] + counts["failed"] + counts["skipped"]
        self.bar.set_postfix(done=counts["done"], failed=counts["failed"], skipped=counts["skipped"],
                             running=counts["running"], refresh=False)
        self.bar.refresh()
        if result is not None and result.get("status") == "failed":
            self.bar.write(f"FAILED {result['error']}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------- commands
def _store_path(store: str | Path) -> Path:
    """A store path that can be a store (a directory, or nothing yet); a file is refused."""
    path = Path(store)
    if path.exists() and not path.is_dir():
        raise InputError(f"store {str(path)!r} is a file, not a store directory")
    return path


def _lock(store: Path, args: argparse.Namespace):
    """The store's one-writer lock (``--force-unlock`` removes a lock left by a run first)."""
    from pipeline.lock import StoreLock, force_unlock

    if getattr(args, "force_unlock", False):
        old = force_unlock(store)
        if old:
            print(f"cohortreg: removed the lock of pid {old.get('pid')} on {old.get('host')} "
                  f"(started {old.get('started')})", file=sys.stderr)
    return StoreLock(store)


def _cmd_ingest(args: argparse.Namespace) -> int:
    from pipeline.ingest import ingest
    from pipeline.manifest import read_manifest

    store = _store_path(args.store)
    subjects = read_manifest(args.manifest)
    with _lock(store, args):
        handle = _cluster(args)
        try:
            report = ingest(subjects, store, handle.client, force=args.force)
        finally:
            handle.close()
    print(report.summary())
    for r in report.failed:
        print(f"  failed {r['key']}: {r['error']}")
    return 1 if report.failed else 0


def run_workflow(args: argparse.Namespace, handle: Any = None) -> "Any":
    """Plan (no cluster: a bad argument costs nothing), lock the store, ingest (if a manifest is
    given) and run the workflow; the run's summary."""
    from pipeline.manifest import read_manifest
    from workflows import get_workflow

    wf = get_workflow(args.workflow)
    batch_size = _batch_size(args, handle)
    store = Path(args.store)  # plan() refuses a store path that is a file
    plan = wf.plan(store, subjects=read_manifest(args.manifest) if args.manifest else None, method=args.method,
                   config=args.config, pairs=args.pairs, atlas=args.atlas, direction=args.direction,
                   pair_list=args.pair_list)
    with _lock(store, args):
        own = handle is None
        handle = handle or _cluster(args)
        try:
            bar = _Bar(len(plan.pairs), not args.no_progress)
            try:
                summary = wf.run(plan, handle.client, force=args.force, window=args.window, retries=args.retries,
                                 gpu=handle.gpu, progress=bar, allow_removed=getattr(args, "allow_removed", False),
                                 on_ingest=lambda report: print(report.summary(), file=sys.stderr),
                                 batch_size=batch_size)
            finally:
                bar.close()
        finally:
            if own:
                handle.close()
    return summary


def _cmd_run(args: argparse.Namespace) -> int:
    summary = run_workflow(args)
    print(summary.text())
    print(f"results: {summary.store}  (xarray.open_zarr / pipeline.open_results)")
    print(f"run log: {summary.log_path}")
    if summary.outputs:
        print(f"{len(summary.outputs)} files written by the workflow's post-step, e.g. {summary.outputs[0]}")
    if summary.report_path:
        print(f"dask performance report: {summary.report_path}")
    for i, err in summary.errors.items():
        print(f"  failed pair {i}: {err.splitlines()[0] if err else ''}")
    return 1 if summary.failed else 0


def _verify(store: str | Path) -> int:
    """Recompute every complete pair's checksum; print mismatches; the number of mismatches."""
    from pipeline.analysis import _strings, open_results, verify_pair

    ds = open_results(store)
    status = _strings(ds["status"].values)
    ids = _strings(ds["pair_id"].values)
    complete = np.flatnonzero(status == "complete")
    bad = [i for i in complete if not verify_pair(store, int(i))]
    for i in bad:
        print(f"  CHECKSUM MISMATCH {ids[i]} (pair {i}): its stored results changed after it completed; "
              f"rerun it with `cohortreg run {store} --force` or restore the store")
    print(f"verify: {len(complete)} complete pairs checked, {len(bad)} mismatch(es)")
    return len(bad)


def _cmd_verify(args: argparse.Namespace) -> int:
    return 1 if _verify(args.store) else 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.analysis import open_results, status_counts, _strings

    ds = open_results(args.store)
    c = status_counts(ds)
    print(f"{args.store}: {c['total']} pairs, {c['complete']} complete, {c['failed']} failed, "
          f"{c['running']} started but not finished, {c['interrupted']} interrupted, {c['pending']} pending")
    status = _strings(ds["status"].values)
    errors = _strings(ds["error"].values)
    ids = _strings(ds["pair_id"].values)
    for i in np.flatnonzero(status == "failed"):
        print(f"  FAILED {ids[i]}: {errors[i]}")
    for i in np.flatnonzero((status == "running") | (status == "interrupted")):
        print(f"  incomplete {ids[i]} ({status[i]}; a rerun redoes it)")
    if args.verify:
        return 1 if _verify(args.store) else 0
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    import pandas as pd

    from pipeline.analysis import open_results, summary_table, worst_pairs
    from pipeline.report import flag_order, flag_pairs

    ds = open_results(args.store)
    table = summary_table(ds)
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.max_colwidth", 40):
        print(table.drop(columns=["error"]).to_string(float_format=lambda v: f"{v:.4g}"))
        done = table[table["status"] == "complete"]
        print()
        print(done.select_dtypes("number").describe().loc[["mean", "std", "min", "max"]].to_string(
            float_format=lambda v: f"{v:.4g}"))
        print(f"\nworst {args.worst} by {args.metric}:")
        print(worst_pairs(ds, args.metric, args.worst).to_string(float_format=lambda v: f"{v:.4g}"))
    flags, stats = flag_pairs(table)
    if stats:
        order = flag_order(flags)
        print(f"\nflagged as outliers (robust z): {len(order) or 'none'}")
        for pid in order:
            print(f"  {pid}: " + "; ".join(flags.loc[flags["pair_id"] == pid, "reason"]))
    if args.csv:
        table.to_csv(args.csv)
        print(f"table written to {args.csv}")
    if args.html:
        from pipeline.report import write_html_report

        write_html_report(args.store, args.html, metric=args.metric, max_pairs=args.worst, pairs=args.pair)
        print(f"report written to {args.html}")
    return 0


def _cmd_apply(args: argparse.Namespace) -> int:
    from pipeline.store import read_field

    field = read_field(args.store, int(args.pair) if args.pair.isdigit() else args.pair)
    if args.kind == "points":
        points = read_points(args.input, None)
        mapped = map_points(points, field)
        np.savetxt(args.output, mapped, delimiter=",", header="x,y,z"[: 2 * mapped.shape[1] - 1], comments="")
        print(f"{len(mapped)} fixed-space points mapped into moving space (mm): {args.output}")
        return 0
    image = read_image(args.input, dtype=None if args.kind == "labels" else torch.float32)
    if args.kind == "labels":
        out = warp(Image(image.data.to(torch.int64), image.grid), field, mode="nearest")
        out = Image(out.data.to(torch.int32), out.grid)
    else:
        out = warp(image, field)
    write_image(out, args.output)
    print(f"{args.kind} warped onto the fixed grid of pair {args.pair}: {args.output}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.export import export_store

    pairs = [int(p) if p.isdigit() else p for p in args.pair] if args.pair else None
    paths = export_store(args.store, args.out, fmt=args.format, inverse=args.inverse, pairs=pairs)
    print(f"{len(paths)} files written under {args.out} ({args.format}{', with inverses' if args.inverse else ''})")
    return 0


def _cmd_template(args: argparse.Namespace) -> int:
    from pipeline.manifest import read_manifest
    from regcore import method_config
    from workflows.template import TEMPLATE

    store = _store_path(args.out)
    subjects = read_manifest(args.manifest)
    method_config(args.method, args.config)  # checked before the cluster starts
    if args.initial and not Path(args.initial).is_file():
        raise InputError(f"initial template {args.initial!r}: no such file")
    batch_size = _batch_size(args)
    with _lock(store, args):
        handle = _cluster(args)
        try:
            result = TEMPLATE.run(subjects, store, handle.client, iterations=args.iterations, method=args.method,
                                  initial=args.initial, step=args.step, sharpen=args.sharpen, config=args.config,
                                  min_warp_mm=args.min_warp_mm, gpu=handle.gpu, batch_size=batch_size)
        finally:
            handle.close()
    print(f"{'iteration':>9} {'method':<12} {'mean warp mm':>12} {'NCC':>7} {'label Dice':>10} {'s':>7}")
    for st in result.iterations:
        print(f"{st.iteration:>9} {st.method:<12} {st.mean_warp_norm_mm:>12.3f} {st.mean_ncc_to_template:>7.4f} "
              f"{st.mean_dice_to_template:>10.4f} {st.seconds:>7.1f}")
    print(f"template: {result.path}")
    failed = result.iterations[-1].failed
    for key in failed:
        print(f"  not in the last iteration (registration failed): {key}")
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from cohortreg.demo import run_demo

    return run_demo(args)


# ----------------------------------------------------------------------------------- parser
def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workflow", default="atlas", help="atlas (default), atlas-labels, pairwise, longitudinal")
    p.add_argument("--pairs", help="pairing rule overriding the workflow's: atlas, all, longitudinal, list")
    p.add_argument("--atlas", help="atlas image key (its subject name) for atlas pairing")
    p.add_argument("--direction", help="atlas pairing: to-atlas, from-atlas or both")
    p.add_argument("--pair-list", help="CSV with fixed,moving columns for --pairs list")
    p.add_argument("--method", help="regcore preset or chain (default: the store's last method, else the workflow's)")
    p.add_argument("--config", help="YAML overrides deep-merged over the method")
    p.add_argument("--window", type=int, help="tasks in flight (default 2 x task slots; a task holds up to "
                                               "--batch-size pairs)")
    p.add_argument("--retries", type=int, default=1, help="Dask retries for lost tasks (default 1)")
    p.add_argument("--force", action="store_true", help="rerun pairs that are already complete")
    p.add_argument("--allow-removed", action="store_true",
                   help="run although the manifest lost subjects of the store (their pairs stay, untouched)")
    p.add_argument("--force-unlock", action="store_true",
                   help="remove the store's lock first (only when no other run is active on it)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_batch_arg(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cohortreg", description="Register whole cohorts on a Dask cluster.")
    parser.add_argument("-v", "--verbose", action="store_true", help="info logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="convert a manifest's images to chunked Zarr in STORE (idempotent)")
    p.add_argument("manifest", help="manifest CSV (subject,image[,labels,landmarks,mask,session]) or BIDS folder")
    p.add_argument("store", help="cohort store (a .zarr directory)")
    p.add_argument("--force", action="store_true", help="rewrite unchanged images too")
    p.add_argument("--force-unlock", action="store_true", help="remove the store's lock first")
    _add_cluster_args(p)
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("run", help="register the pairs of a workflow; resumable")
    p.add_argument("store")
    p.add_argument("--manifest", help="ingest this manifest first (skipped when unchanged)")
    _add_run_args(p)
    _add_cluster_args(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("status", help="how many pairs are complete, failed or pending; the errors")
    p.add_argument("store")
    p.add_argument("--verify", action="store_true", help="also recompute every complete pair's checksum")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("verify", help="recompute every complete pair's checksum; exit 1 on any mismatch")
    p.add_argument("store")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("report", help="summary table, flagged and worst pairs; optional CSV, self-contained HTML")
    p.add_argument("store")
    p.add_argument("--metric", default="dice_after", help="per-pair metric that ranks the worst pairs")
    p.add_argument("--worst", type=int, default=5, help="how many worst pairs to list (and show in the HTML)")
    p.add_argument("--pair", action="append", default=[], metavar="ID",
                   help="also show this pair (id or index) in the HTML report; repeatable")
    p.add_argument("--csv", help="write the summary table as CSV")
    p.add_argument("--html", help="write one self-contained HTML report (flags, plots, pair slices)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("apply", help="apply a stored field to an image, a label map or fixed-space points")
    p.add_argument("store")
    p.add_argument("pair", help="pair index or pair id")
    p.add_argument("input", help="image/labels in the pair's moving space, or points (mm) in its fixed space")
    p.add_argument("output")
    p.add_argument("--kind", choices=("image", "labels", "points"), default="image")
    p.set_defaults(func=_cmd_apply)

    p = sub.add_parser("export", help="write every complete pair's transform as ITK / ANTs / BIDS-derivatives files")
    p.add_argument("store")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", choices=("itk", "ants", "bids"), default="itk")
    p.add_argument("--inverse", action="store_true", help="also the inverse transforms (moving -> fixed)")
    p.add_argument("--pair", action="append", help="only this pair (index or id); repeatable")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("template", help="build a groupwise template of a manifest's subjects (resumable)")
    p.add_argument("manifest")
    p.add_argument("--out", required=True, help="template store (a directory)")
    p.add_argument("--iterations", type=int, default=3, help="deformable iterations after the affine one")
    p.add_argument("--method", default="affine+syn")
    p.add_argument("--config", help="YAML overrides deep-merged over the method")
    p.add_argument("--initial", help="reference image of iteration 0 (default: the subject nearest the mean geometry)")
    p.add_argument("--step", type=float, default=0.25, help="shape-update step (0, 0.25]")
    p.add_argument("--sharpen", type=float, default=0.5, help="unsharp-mask amount per iteration (0: none)")
    p.add_argument("--min-warp-mm", type=float, default=0.0, help="stop once the mean warp is below this (mm)")
    p.add_argument("--force-unlock", action="store_true", help="remove the store's lock first")
    _add_batch_arg(p)
    _add_cluster_args(p)
    p.set_defaults(func=_cmd_template)

    p = sub.add_parser("demo", help="build the offline demo cohort (MNI152 + random diffeomorphisms) and run it")
    p.add_argument("--out", default="cohortreg-demo", help="folder for the cohort and the store")
    p.add_argument("--subjects", type=int, default=8)
    p.add_argument("--resolution", type=float, default=3.0, help="mm (default 3)")
    p.add_argument("--method", default=None, help="default: affine (the demo cohort is mostly affine; see benchmarks/README.md)")
    p.add_argument("--no-progress", action="store_true")
    _add_cluster_args(p)
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except InputError as exc:
        print(f"cohortreg: error: {exc}", file=sys.stderr)
        return 2
    except InfrastructureError as exc:
        print(f"cohortreg: infrastructure failure: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("cohortreg: interrupted; pairs not complete stay resumable: run the same command again",
              file=sys.stderr)
        return 130
    except OSError as exc:  # the store or a log cannot be written: an infrastructure failure, not a bug
        print(f"cohortreg: infrastructure failure: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
