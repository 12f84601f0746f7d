"""Speed and memory of regcore's presets: prints a table and writes JSON.

    python benchmarks/run.py [--cases 2d,3d96,brain] [--methods affine,ffd,svf] [--device cpu|cuda]
                             [--threads 2] [--out benchmarks/results/NAME.json]

Each (case, method) runs in its own subprocess so that the peak memory (max RSS on CPU, peak
allocated on CUDA) belongs to that run alone. Images are synthetic (blobs warped by a smooth random
field) except ``brain``, which uses two real label maps from ../shared/data/brain-labelmaps turned
into intensities by ``regcore.synthetic`` (cropped to the head, 1 mm, about 160x192x224).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("COHORTREG_SHARED_DATA", ROOT.parent / "shared" / "data"))


def _pair(case: str, device: str):
    import torch

    from regcore import Grid, Image, read_image
    from regcore.pair_metrics import warp
    from regcore.synthetic import crop_to_labels, intensity_from_labels

    if case == "brain":
        def load(i):
            lab = read_image(SHARED / "brain-labelmaps" / f"subject{i:02d}_seg.nii.gz", dtype=None)
            return crop_to_labels(lab, margin=2)
        fl, ml = load(1), load(2)
        return intensity_from_labels(fl, 0, 1).to(device), intensity_from_labels(ml, 0, 2).to(device)
    shape = {"2d": (256, 256), "3d96": (96, 96, 96)}[case]
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(1, 8, [max(2, s // 16) for s in shape], generator=gen).float()
    mode = "bilinear" if len(shape) == 2 else "trilinear"
    img = torch.nn.functional.interpolate(labels[None, None], size=shape, mode=mode, align_corners=True)[0]
    grid = Grid(tuple(reversed(shape)))
    fixed = Image(img, grid)
    coarse = torch.randn(len(shape), *[4] * len(shape), generator=gen) * 3.0
    u = torch.nn.functional.interpolate(coarse[None], size=shape, mode=mode, align_corners=True)[0]
    moving = warp(fixed, Image(u, grid), padding="border")
    return fixed.to(device), moving.to(device)


def _one(case: str, method: str, device: str, threads: int) -> dict:
    import torch

    from regcore import register

    torch.set_num_threads(threads)
    fixed, moving = _pair(case, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res = register(fixed, moving, method, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() / 2**30) if device.startswith("cuda") else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"case": case, "size": list(fixed.grid.size), "method": method, "device": device,
            "threads": threads, "seconds": round(seconds, 2), "peak_gb": round(peak, 3),
            "iterations": res.iterations, "final_loss": res.final_loss}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="2d,3d96,brain")
    ap.add_argument("--methods", default="affine,ffd,svf,demons")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    ap.add_argument("--single", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single:
        print(json.dumps(_one(args.single[0], args.single[1], args.device, args.threads)))
        return 0
    rows = []
    for case in args.cases.split(","):
        if case == "brain" and not (SHARED / "brain-labelmaps").exists():
            print(f"skip brain: {SHARED / 'brain-labelmaps'} not found", file=sys.stderr)
            continue
        for method in args.methods.split(","):
            cmd = [sys.executable, __file__, "--single", case, method, "--device", args.device, "--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
            if proc.returncode != 0:
                rows.append({"case": case, "method": method, "device": args.device, "error": proc.stderr.strip().splitlines()[-1:]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{r['case']:<6} {str(r.get('size', '')):<16} {r['method']:<12} {r['device']:<5} "
                  f"{r.get('seconds', 'ERR'):>8} s {r.get('peak_gb', ''):>7} GB  {r.get('iterations', r.get('error', ''))}", flush=True)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"regcore-{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "python": platform.python_version(), "rows": rows}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
