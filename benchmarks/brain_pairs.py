"""Accuracy on real brain label maps (issue "regcore deformable"): Dice after affine, affine+svf and
affine+ffd for subject pairs of ../shared/data/brain-labelmaps, intensities made by the seeded
recipe in ``regcore.synthetic`` (shared contrast seed 0, per-subject seed = subject number).

    python benchmarks/brain_pairs.py [--factor 2] [--pairs 6] [--methods affine+svf,affine+ffd]

Prints one JSON line per pair: mean Dice over the foreground labels (``affine``: the linear part of
the first chain), seconds, and the percentage of voxels with a non-positive Jacobian.

The presets run unchanged. Their deformable pyramid is given in mm (``spacing_mm: [4, 2]``), so at
``--factor F`` (images at F mm) the deformable levels are at 4 and 2 mm (or the image's own
resolution when F > 2), as on the 1 mm images they are tuned for.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from regcore import Image, read_image, register
from regcore.evaluation import mean_dice
from regcore.registration import linear_displacement
from regcore.pair_metrics import warp
from regcore.synthetic import crop_to_labels, intensity_from_labels

SHARED = Path(os.environ.get("COHORTREG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
PAIRS = [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)]


def load_labels(subject: int, factor: float) -> Image:
    """Label map cropped to the head (4-voxel margin), resampled by nearest neighbour at ``factor``."""
    lab = read_image(SHARED / "brain-labelmaps" / f"subject{subject:02d}_seg.nii.gz", dtype=None)
    return crop_to_labels(lab, margin=4, factor=factor)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--methods", default="affine+svf,affine+ffd")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for fi, mi in PAIRS[: args.pairs]:
        fl, ml = load_labels(fi, args.factor), load_labels(mi, args.factor)
        fixed, moving = intensity_from_labels(fl, 0, fi), intensity_from_labels(ml, 0, mi)
        labels = sorted(set(torch.unique(fl.data).tolist()) - {0})
        row = {"pair": [fi, mi], "size": list(fl.grid.size)}
        for method in args.methods.split(","):
            t0 = time.perf_counter()
            res = register(fixed, moving, method)
            if "affine" not in row and res.deformable is not None:
                aff = linear_displacement(res.transform.matrix().detach(), fixed)
                row["affine"] = {"dice": round(mean_dice(fl.data, warp(ml, aff, mode="nearest").data, labels), 4)}
            dice = mean_dice(fl.data, warp(ml, res.displacement, mode="nearest").data, labels)
            row[method] = {"dice": round(dice, 4), "seconds": round(time.perf_counter() - t0, 1)}
            if res.deformable is not None:  # the deformable stage alone (levels only)
                last = len(res.config.stages) - 1
                row[method]["deformable_seconds"] = round(sum(lv.seconds for lv in res.levels if lv.stage == last), 1)
            if res.jacobian is not None:
                row[method]["nonpositive_jacobian_percent"] = round(100 * float((res.jacobian.data <= 0).double().mean()), 4)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
