"""Cohort benchmark (issue "pipeline"): pairs per minute on the demo cohort for 1, 2, ... workers,
and the pipeline's overhead, i.e. time per pair spent outside regcore.register (reading from Zarr,
metrics, writing, scheduling).

    python benchmarks/cohort.py [--workers 1,2] [--subjects 8] [--resolution 3] [--method affine]

Prints a table and writes benchmarks/results/cohort-cpu.json. Two overhead figures:

* task overhead  = 1 - sum(regcore seconds) / sum(task seconds): reading, metrics, writing;
* run overhead   = 1 - sum(regcore seconds) / (wall seconds x workers): also scheduling, the
  runner's bookkeeping and workers idle at the end of the run (fewer pairs left than workers).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--resolution", type=float, default=3.0)
    ap.add_argument("--method", default="affine")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--out", default=str(Path(__file__).with_name("results") / "cohort-cpu.json"))
    args = ap.parse_args()

    from cluster.profiles import start_cluster
    from pipeline import ingest, make_pairs, read_manifest, run_pairs
    from workflows.demo_cohort import make_demo_cohort

    tmp = Path(tempfile.mkdtemp(prefix="cohortreg-bench-"))
    try:
        manifest = make_demo_cohort(tmp / "cohort", subjects=args.subjects, resolution=args.resolution)
        subjects = read_manifest(manifest)
        pairs = make_pairs(subjects, "atlas", atlas="atlas")
        rows = []
        for n in [int(w) for w in args.workers.split(",")]:
            store = tmp / f"store-{n}.zarr"
            handle = start_cluster("local", workers=n, threads=args.threads)
            try:
                t = time.perf_counter()
                ingest(subjects, store, handle.client)
                t_ingest = time.perf_counter() - t
                s = run_pairs(handle.client, store, pairs, args.method, performance_report=False)
            finally:
                handle.close()
            res = list(s.results.values())
            reg = sum(r["regcore_s"] for r in res)
            task = sum(r["runtime_s"] for r in res)
            row = {"workers": n, "threads_per_worker": args.threads, "pairs": len(res), "failed": len(s.failed),
                   "wall_s": round(s.wall_s, 2), "ingest_s": round(t_ingest, 2),
                   "pairs_per_min": round(60 * len(res) / s.wall_s, 2),
                   "regcore_s_per_pair": round(reg / len(res), 2), "task_s_per_pair": round(task / len(res), 2),
                   "task_overhead_pct": round(100 * (1 - reg / task), 2),
                   "run_overhead_pct": round(100 * (1 - reg / (s.wall_s * n)), 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    cols = list(rows[0])
    print("\n" + " | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "cohort", "method": args.method, "subjects": args.subjects,
                               "resolution_mm": args.resolution, "cpu_count": os.cpu_count(),
                               "machine": platform.machine(), "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"\nwritten {out}")


if __name__ == "__main__":
    main()
