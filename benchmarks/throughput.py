"""Throughput of batched pairs (issue 10): pairs per hour through the pipeline for batch sizes 1, 4,
8, 16 on a local cluster, at each resolution, with the mean Dice to show the quality unchanged.

    python benchmarks/throughput.py [--sizes 1,4,8,16] [--resolution 2,1] [--pairs 16]
        [--method affine+syn] [--data demo|brain-t1] [--profile local|local-gpu] [--workers N]
        [--out benchmarks/throughput-results/throughput-<cpu|gpu>.json]

Data: ``demo`` (default) is the offline demo cohort (MNI152 from nilearn deformed by seeded random
diffeomorphisms, :func:`workflows.demo_cohort.make_demo_cohort`) at each ``--resolution``, with
``--pairs`` subjects registered to the atlas: every pair shares the fixed image, the case batching
is for. ``brain-t1`` takes the real IXI T1 of ``../shared/data/brain-t1`` (2 mm native; subjects
02..10 to subject 01, at most 9 pairs; ``--resolution`` is ignored).

Every batch size runs the same pairs on the same ingested store (``run_pairs(..., batch_size=B,
force=True)``), after an untimed warm-up pair per worker; the wall time of the run (scheduling, reading, registration, evaluation, writing)
gives pairs per hour. ``used`` lists the batch sizes the tasks actually ran (a batch that does not
fit the device is split: see ``pipeline.task``); on CPU ``B`` pairs of a task run as one
``register_batch`` call on one worker.

Defaults follow the machine: with a CUDA device the ``local-gpu`` profile, 2 and 1 mm, 32 pairs,
``affine+syn``; on CPU a short run (the ``local`` profile with 2 workers, 3 mm, sizes 1 and 4, 8
pairs, ``affine``): a few minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.profiles import start_cluster  # noqa: E402
from pipeline import ingest, make_pairs, open_results, read_manifest, run_pairs  # noqa: E402
from pipeline.analysis import _strings  # noqa: E402
from pipeline.manifest import Subject  # noqa: E402

SHARED = Path(os.environ.get("COHORTREG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def brain_t1_subjects(n_pairs: int) -> list[Subject]:
    d = SHARED / "brain-t1"
    if not d.is_dir():
        raise SystemExit(f"--data brain-t1: {d} is absent (see ../shared/data/README.md)")
    ids = range(1, min(10, n_pairs + 1) + 1)
    return [Subject(f"subj{i:02d}", d / f"subj{i:02d}_t1.nii.gz", labels=d / f"subj{i:02d}_labels.nii.gz") for i in ids]


def device_name(gpu: bool) -> str:
    if gpu and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,4,8,16" if cuda else "1,4", help="batch sizes, comma-separated")
    ap.add_argument("--resolution", default="2,1" if cuda else "3", help="mm, comma-separated (demo data)")
    ap.add_argument("--pairs", type=int, default=32 if cuda else 8, help="pairs (demo: subjects) per resolution")
    ap.add_argument("--method", default="affine+syn" if cuda else "affine")
    ap.add_argument("--config", default=None, help="YAML overrides of the method")
    ap.add_argument("--data", choices=("demo", "brain-t1"), default="demo")
    ap.add_argument("--profile", default="local-gpu" if cuda else "local")
    ap.add_argument("--workers", type=int, default=None if cuda else 2, help="worker processes (default: GPUs, or 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    ap.add_argument("--repeats", type=int, default=1, help="runs per batch size (the best wall time is kept)")
    ap.add_argument("--out", default=None,
                    help="JSON (default benchmarks/throughput-results/throughput-<cpu|gpu>.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("pipeline.task").setLevel(logging.INFO)  # the batch sizes used, and any split
    for name in ("distributed", "bokeh", "tornado"):
        logging.getLogger(name).setLevel(logging.ERROR)

    sizes = _ints(args.sizes)
    resolutions = _floats(args.resolution) if args.data == "demo" else [2.0]
    handle = start_cluster(args.profile, workers=args.workers, threads=args.threads or (1 if not cuda else None))
    gpu = handle.gpu
    dev = device_name(gpu)
    workers = len(handle.client.scheduler_info()["workers"])
    print(f"device: {dev}; profile {args.profile}, {workers} worker(s); method {args.method}; data {args.data}",
          flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="cohortreg-throughput-"))
    rows = []
    try:
        for res in resolutions:
            if args.data == "demo":
                from workflows.demo_cohort import make_demo_cohort

                subjects = read_manifest(make_demo_cohort(tmp / f"cohort-{res:g}", subjects=args.pairs, resolution=res))
                pairs = make_pairs(subjects, "atlas", atlas="atlas")
            else:
                subjects = brain_t1_subjects(args.pairs)
                pairs = make_pairs(subjects, "atlas", atlas=subjects[0].key)
            store = tmp / f"store-{res:g}.zarr"
            ingest(subjects, store, handle.client)
            # warm-up (not timed): every worker imports torch and regcore and runs one pair
            run_pairs(handle.client, store, pairs[:workers], args.method, args.config, gpu=gpu, force=True,
                      performance_report=False)
            for size in sizes:
                best = None
                for _ in range(max(1, args.repeats)):
                    s = run_pairs(handle.client, store, pairs, args.method, args.config, batch_size=size, gpu=gpu,
                                  force=True, performance_report=False)
                    if best is None or s.wall_s < best.wall_s:
                        best = s
                assert best is not None
                ds = open_results(store)
                ok = _strings(ds["status"].values) == "complete"
                results = list(best.results.values())
                used = sorted({int(r.get("batch_size", 0)) for r in results if r.get("batch_size")})
                row = {"resolution_mm": res, "batch_size": size, "used": used, "pairs": len(pairs),
                       "complete": len(best.complete), "failed": len(best.failed), "wall_s": round(best.wall_s, 2),
                       "pairs_per_hour": round(3600 * len(best.complete) / best.wall_s, 1),
                       "regcore_s_per_pair": round(float(np.nanmean([r.get("regcore_s", np.nan) for r in results])), 3),
                       "dice_before": round(float(np.nanmean(ds["dice_before"].values[ok])), 4),
                       "dice_after": round(float(np.nanmean(ds["dice_after"].values[ok])), 4),
                       "grid": [int(v) for v in ds["displacement"].shape[2:]] if "displacement" in ds else None}
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        handle.close()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nThroughput on {dev}, {args.profile} profile, {workers} worker(s), {args.method}, {args.data} data")
    print("| mm | batch size | used | pairs | wall s | pairs/hour | regcore s/pair | Dice before | Dice after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['resolution_mm']:g} | {r['batch_size']} | {','.join(map(str, r['used']))} | {r['complete']}/{r['pairs']} "
              f"| {r['wall_s']:.1f} | {r['pairs_per_hour']:.0f} | {r['regcore_s_per_pair']:.2f} | {r['dice_before']:.4f} "
              f"| {r['dice_after']:.4f} |")
    out = Path(args.out or ROOT / "benchmarks" / "throughput-results" / f"throughput-{'gpu' if gpu else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "throughput", "device": dev, "profile": args.profile, "workers": workers,
                               "method": args.method, "config": args.config, "data": args.data, "sizes": sizes,
                               "torch": torch.__version__, "cpu_count": os.cpu_count(),
                               "date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
