"""Is MI or NGF informative for prostate MR -> US alignment? (issue 3, prostate-mr-us acceptance)

    python benchmarks/prostate_landscape.py [--radius 3] [--step 3.2] [--jobs 2] [--out prostate_landscape.json]

For each of the 27 pairs of ../shared/data/prostate-mr-us (US fixed, MR moving; 1.6 mm isotropic
voxels, both centred on the origin: see tests/test_acceptance_prostate.py for why), the MR is
translated over a grid of ``(2 * radius + 1) ** 3`` shifts of ``step`` mm and each measure is
evaluated on the US grid: MI (32 bins) on all overlapping voxels, MI and NGF inside the US fan
(eroded by 2 voxels). The table gives the gland Dice unregistered, the best gland Dice any shift
reaches, and for each measure the Dice *at that measure's maximum* and the Spearman correlation
of the measure with the Dice over the shifts. A perfect optimiser of the measure lands at its
maximum, so a mean "Dice at maximum" below the unregistered Dice means no rigid MI/NGF
registration can be expected to raise the gland Dice on these data. Rows are split into the six
cases the issue names and the other 21 (held out: never used to choose a setting).

Also the independent check: SimpleITK's own rigid registration with Mattes MI (32 bins, all
voxels, regular-step gradient descent, shrink 2 then 1), from the same start, and the gland Dice
it reaches.

Prints a table and writes JSON. CPU, one thread per job; about 20 minutes for the 27 pairs with
two jobs on two cores.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from regcore import Grid, Image
from regcore.evaluation import mean_dice
from regcore.losses import functional as L
from regcore.sampling import sample_world

SHARED = Path(os.environ.get("COHORTREG_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SPACING_MM = 1.6
ISSUE_CASES = [("test", "case000025"), ("test", "case000026"), ("train", "case000000"),
               ("train", "case000001"), ("train", "case000002"), ("train", "case000003")]
MEASURES = ("mi", "mi_fan", "ngf_fan")


def load(split: str, case: str, side: str) -> tuple[Image, Image]:
    """Image (min-max normalised) and gland label, isotropic ``SPACING_MM`` voxels, centred."""
    base = SHARED / "prostate-mr-us" / split
    img = sitk.ReadImage(str(base / f"{side}_images" / f"{case}.nii.gz"), sitk.sitkFloat32)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(base / f"{side}_labels" / f"{case}.nii.gz")))
    size = img.GetSize()
    grid = Grid(size, [SPACING_MM] * 3, [-(s - 1) * SPACING_MM / 2 for s in size])
    a = torch.from_numpy(sitk.GetArrayFromImage(img))
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-6)
    gland = torch.from_numpy(((lab[0] if lab.ndim == 4 else lab) > 0.5).astype(np.int64))
    return Image(a, grid), Image(gland, grid)


def fan_mask(us: Image, erode: int = 2) -> torch.Tensor:
    """The US fan (nonzero voxels) eroded by ``erode`` voxels, ``(1, 1, z, y, x)`` float."""
    x = (us.data > 1e-3).float().reshape(1, 1, *us.grid.shape)
    k = 2 * erode + 1
    return -torch.nn.functional.max_pool3d(-x, k, stride=1, padding=erode)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def itk_rigid_mi_dice(us: Image, us_gland: Image, mr: Image, mr_gland: Image) -> float:
    """Gland Dice after SimpleITK's rigid Mattes-MI registration of ``mr`` to ``us`` (no regcore code)."""
    from regcore.io import image_to_sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    fixed, moving = image_to_sitk(us), image_to_sitk(mr)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(32)
    method.SetMetricSamplingStrategy(method.NONE)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 200, relaxationFactor=0.5)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetInitialTransform(sitk.Euler3DTransform(), inPlace=False)
    transform = method.Execute(fixed, moving)
    gland_f = image_to_sitk(Image(us_gland.data.to(torch.int16), us_gland.grid))
    gland_m = image_to_sitk(Image(mr_gland.data.to(torch.int16), mr_gland.grid))
    warped = sitk.GetArrayFromImage(sitk.Resample(gland_m, gland_f, transform, sitk.sitkNearestNeighbor, 0))
    a, b = sitk.GetArrayFromImage(gland_f) > 0, warped > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def scan(split: str, case: str, shifts: list[np.ndarray]) -> dict:
    torch.set_num_threads(1)
    us, us_gland = load(split, case, "fixed")
    mr, mr_gland = load(split, case, "moving")
    fixed = us.batch()
    fan = fan_mask(us)
    w2n = torch.as_tensor(mr.grid.world_to_normalized())
    pts0 = us.grid.world_points(dtype=torch.float32)
    values = {m: [] for m in MEASURES}
    dice = []
    for shift in shifts:
        pts = pts0 + torch.as_tensor(shift, dtype=torch.float32)
        inside = ((pts.double() @ w2n[:3, :3].T + w2n[:3, 3]).abs() <= 1).all(-1).float().reshape(fan.shape)
        moved = sample_world(mr, pts).reshape(fixed.shape).float()
        dice.append(mean_dice(us_gland.data, sample_world(mr_gland, pts, mode="nearest"), [1]))
        values["mi"].append(float(L.mutual_information(fixed, moved, inside, bins=32)))
        values["mi_fan"].append(float(L.mutual_information(fixed, moved, inside * fan, bins=32)))
        values["ngf_fan"].append(float(L.ngf(fixed, moved, inside * fan, spacing=[SPACING_MM] * 3)))
    dice = np.array(dice)
    zero = len(shifts) // 2
    row = {"case": f"{split}/{case}", "dice_unregistered": float(dice[zero]), "dice_best_shift": float(dice.max()),
           "dice_itk_rigid_mi": itk_rigid_mi_dice(us, us_gland, mr, mr_gland)}
    for m, v in values.items():
        v = np.array(v)
        best = int(np.argmax(v))
        row[m] = {"dice_at_max": float(dice[best]), "shift_at_max_mm": shifts[best].tolist(), "spearman": spearman(v, dice)}
    return row


def summary(rows: list[dict]) -> dict:
    out = {"n": len(rows), "dice_unregistered": float(np.mean([r["dice_unregistered"] for r in rows])),
           "dice_best_shift": float(np.mean([r["dice_best_shift"] for r in rows])),
           "dice_itk_rigid_mi": float(np.mean([r["dice_itk_rigid_mi"] for r in rows]))}
    for m in MEASURES:
        gains = np.array([r[m]["dice_at_max"] - r["dice_unregistered"] for r in rows])
        out[m] = {"mean_gain_at_max": float(gains.mean()), "raised": int((gains > 0).sum()),
                  "mean_spearman": float(np.mean([r[m]["spearman"] for r in rows]))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--radius", type=int, default=3, help="shifts per axis: -radius..radius steps")
    ap.add_argument("--step", type=float, default=3.2, help="shift step (mm)")
    ap.add_argument("--jobs", type=int, default=2, help="cases scanned in parallel (one thread each)")
    ap.add_argument("--out", default="prostate_landscape.json")
    args = ap.parse_args()
    r = range(-args.radius, args.radius + 1)
    shifts = [np.array(t, dtype=float) * args.step for t in itertools.product(r, r, r)]
    cases = [(split, p.name[: -len(".nii.gz")]) for split in ("test", "train")
             for p in sorted((SHARED / "prostate-mr-us" / split / "fixed_images").glob("*.nii.gz"))]
    rows = []
    head = (f"{'case':18s} {'unreg':>6s} {'best':>6s} {'itk-mi':>6s} "
            + " ".join(f"{m + ' Dice@max/rho':>22s}" for m in MEASURES))
    print(head)
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(scan, *zip(*cases), itertools.repeat(shifts)):
            rows.append(row)
            print(f"{row['case']:18s} {row['dice_unregistered']:6.3f} {row['dice_best_shift']:6.3f} "
                  f"{row['dice_itk_rigid_mi']:6.3f} "
                  + " ".join(f"{row[m]['dice_at_max']:14.3f}/{row[m]['spearman']:+.2f}" for m in MEASURES), flush=True)
    issue = [r for r in rows if tuple(r["case"].split("/")) in ISSUE_CASES]
    held_out = [r for r in rows if tuple(r["case"].split("/")) not in ISSUE_CASES]
    result = {"spacing_mm": SPACING_MM, "step_mm": args.step, "radius": args.radius, "rows": rows,
              "issue_cases": summary(issue), "held_out": summary(held_out)}
    for name in ("issue_cases", "held_out"):
        s = result[name]
        print(f"\n{name} (n={s['n']}): unregistered {s['dice_unregistered']:.3f}, best shift "
              f"{s['dice_best_shift']:.3f}, after SimpleITK rigid Mattes MI {s['dice_itk_rigid_mi']:.3f}")
        for m in MEASURES:
            print(f"  {m:8s} mean Dice gain at the maximum {s[m]['mean_gain_at_max']:+.3f} "
                  f"(raised {s[m]['raised']}/{s['n']}), mean Spearman {s[m]['mean_spearman']:+.2f}")
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
