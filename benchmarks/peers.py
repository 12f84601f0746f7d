"""cohortreg beside ANTs, greedy and elastix on the same pairs, scored the same way.

    python benchmarks/peers.py --cases brain-t1 [--tools cohortreg,ants-syns,ants-syn,greedy,elastix]
        [--peer-python /path/to/peers-venv/bin/python] [--threads 2] [--repeats 1]
        [--method affine+syn] [--config overrides.yaml] [--pairs N] [--select 04->03,...] [--work DIR [--resume]]
        [--reuse TOOL=earlier.json,...] [--agreement] [--out benchmarks/results/peers.json]
    python benchmarks/peers.py --manifest cohort.csv [--pair-list pairs.csv] ...

Cases (``../shared/data``; ``COHORTREG_SHARED_DATA`` overrides the folder):

- ``brain-t1``: real IXI T1 at 2 mm, 148 DLMUSE labels; pairs 02->01, 04->03, 06->05, 08->07,
  10->09 (moving->fixed) and their reverses;
- ``brain-t1-1mm``: the same 10 pairs resampled onto 1 mm grids covering the same boxes (linear
  for the images, nearest neighbour for the labels; written once to ``--work``): real MR and each
  subject's own labels on a 1 mm grid, so that a method's 1 mm level is scored on real brains;
- ``colin-mni``: Colin27 -> MNI152 at 1 mm (AAL labels; the files store different directions);
- ``labelmaps-1mm``: 6 ``brain-labelmaps`` pairs (1->2, 3->4, ...: fixed->moving subjects) at 1 mm,
  cropped to the head, intensities from the labels by ``regcore.synthetic`` (seeded);
- ``labelmaps-2mm``: the same at 2 mm;
- ``lung``: lung CT masks, follow-up -> baseline, 10 landmark pairs (TRE in mm);
- ``--manifest M.csv``: a user's cohort (``subject,image,labels`` columns, paths relative to the
  CSV); pairs from ``--pair-list`` (``fixed,moving`` subject ids) or, by default, each
  even-numbered row to the row before it and back.

Every tool runs in its own subprocess (``benchmarks/peer_tools.py``) with the same thread count,
the peers with ``--peer-python`` (an interpreter with the optional extra ``peers`` installed).
Its result is one dense displacement field on the fixed grid (ITK convention, world mm), applied
here by **one** resampler for every tool: SimpleITK ``Resample`` with a
``DisplacementFieldTransform``, nearest neighbour for labels. Scores per tool and pair: mean Dice
over the labels present in both label maps, % of fixed voxels with a non-positive Jacobian
determinant (``regcore``'s ``jacobian_determinant`` of the whole map, direction-aware), landmark
TRE (mm) where the case has landmarks, seconds of the registration call (median over
``--repeats``) and peak RSS. Prints a table, writes the rows and per-tool means as JSON.

With several ``--cases`` the means are printed per case and over all pairs, each pair counted once
(the bars of a set of cases, such as the 1 mm set ``colin-mni,labelmaps-1mm``). ``--reuse TOOL=FILE``
reports that tool's rows of an earlier result file for the pairs it holds, as recorded and marked
with the file's name, instead of running them again: for a peer that takes hours a pair
(``antsRegistrationSyN[s]`` at 1 mm), beside tools that run now.

``--agreement`` adds, per pair with labels, the mean Dice between the label maps warped by every
two tools (each repeat of a tool counted apart: run-to-run spread) and the fixed labels: where the
reference labels were themselves propagated by some registration, it shows which tool's family they
agree with.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from regcore.config import config_hash
from regcore.evaluation import label_centroid_distances, mean_dice
from regcore.io import grid_from_sitk
from regcore.methods import method_config
from regcore.regularizers import jacobian_determinant

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_tools import TOOLS, thread_environment  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("COHORTREG_SHARED_DATA", HERE.parents[1] / "shared" / "data"))


@dataclass
class Pair:
    """One registration problem: files on disk, and what scores it."""

    name: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_points: np.ndarray | None = None  # (N, 3) world mm, fixed space
    moving_points: np.ndarray | None = None  # (N, 3) world mm, their partners in moving space
    extra: dict = field(default_factory=dict)
    case: str = ""  # the --cases name it came from ("manifest" for --manifest)


# ------------------------------------------------------------------------------------------ cases
def brain_t1_pairs(root: Path) -> list[Pair]:
    d = root / "brain-t1"
    out = []
    for fixed, moving in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10)]:
        for f, m in ((fixed, moving), (moving, fixed)):
            out.append(Pair(f"brain-t1 {m:02d}->{f:02d}", d / f"subj{f:02d}_t1.nii.gz", d / f"subj{m:02d}_t1.nii.gz",
                            d / f"subj{f:02d}_labels.nii.gz", d / f"subj{m:02d}_labels.nii.gz"))
    return out


def halve_spacing(image: sitk.Image, labels: bool) -> sitk.Image:
    """``image`` resampled onto a grid of half its spacing covering the same box (the outer voxel
    faces stay in place): linear for intensities, nearest neighbour for labels."""
    spacing = np.asarray(image.GetSpacing())
    direction = np.asarray(image.GetDirection()).reshape(image.GetDimension(), image.GetDimension())
    ref = sitk.Image([2 * n for n in image.GetSize()], image.GetPixelID())
    ref.SetSpacing((spacing / 2).tolist())
    ref.SetDirection(image.GetDirection())
    ref.SetOrigin((np.asarray(image.GetOrigin()) - direction @ (spacing / 4)).tolist())
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(image, ref, sitk.Transform(), interp, 0.0, image.GetPixelID())


def brain_t1_1mm_pairs(root: Path, work: Path) -> list[Pair]:
    """The ``brain-t1`` pairs on 1 mm grids, written once to ``work`` for every tool."""
    work.mkdir(parents=True, exist_ok=True)
    out = []
    for pair in brain_t1_pairs(root):
        files = []
        for path, labels in ((pair.fixed, False), (pair.moving, False), (pair.fixed_labels, True), (pair.moving_labels, True)):
            dest = work / path.name.replace(".nii.gz", "_1mm.nii.gz")
            if not dest.exists():
                sitk.WriteImage(halve_spacing(sitk.ReadImage(str(path)), labels), str(dest), True)
            files.append(dest)
        out.append(Pair(pair.name.replace("brain-t1", "brain-t1-1mm"), *files))
    return out


def colin_mni_pairs(root: Path) -> list[Pair]:
    d = root / "brain-templates"
    return [Pair("colin27->mni152", d / "mni.nii.gz", d / "ch2.nii.gz", d / "mnia.nii.gz", d / "ch2_aal.nii.gz")]


def labelmap_pairs(root: Path, work: Path, spacing_mm: float) -> list[Pair]:
    """The synthetic-contrast label-map pairs, written once to ``work`` as NIfTI for every tool."""
    from regcore import read_image, write_image
    from regcore.synthetic import crop_to_labels, intensity_from_labels

    out = []
    for fi, mi in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12)]:
        files = {}
        for s in (fi, mi):
            img_path, lab_path = work / f"labelmap{s:02d}_{spacing_mm:g}mm.nii.gz", work / f"labelmap{s:02d}_{spacing_mm:g}mm_labels.nii.gz"
            if not img_path.exists():
                lab = crop_to_labels(read_image(root / "brain-labelmaps" / f"subject{s:02d}_seg.nii.gz", dtype=None),
                                     margin=4, factor=spacing_mm)
                write_image(intensity_from_labels(lab, 0, s), img_path)
                write_image(lab, lab_path, np.int16)
            files[s] = (img_path, lab_path)
        out.append(Pair(f"labelmaps {mi:02d}->{fi:02d} ({spacing_mm:g} mm)", files[fi][0], files[mi][0], files[fi][1], files[mi][1]))
    return out


def lung_pairs(root: Path) -> list[Pair]:
    from regcore import read_image
    from regcore.points import read_points

    d = root / "lung-ct"
    fixed, moving = d / "3DCT_lung_baseline_mask.mha", d / "3DCT_lung_followup_mask.mha"
    fp = read_points(d / "3DCT_lung_baseline.txt", read_image(fixed).grid)
    mp = read_points(d / "3DCT_lung_followup.txt", read_image(moving).grid)
    return [Pair("lung followup->baseline", fixed, moving, fixed_points=fp, moving_points=mp)]


def manifest_pairs(manifest: Path, pair_list: Path | None) -> list[Pair]:
    rows = list(csv.DictReader(manifest.open()))
    base = manifest.parent
    by_id = {r["subject"]: r for r in rows}
    if pair_list is not None:
        ids = [(r["fixed"], r["moving"]) for r in csv.DictReader(pair_list.open())]
    else:
        ids = []
        for i in range(1, len(rows), 2):
            a, b = rows[i - 1]["subject"], rows[i]["subject"]
            ids += [(a, b), (b, a)]
    out = []
    for f, m in ids:
        rf, rm = by_id[f], by_id[m]
        lab = (lambda r: base / r["labels"] if r.get("labels") else None)
        out.append(Pair(f"{m}->{f}", base / rf["image"], base / rm["image"], lab(rf), lab(rm)))
    return out


# ---------------------------------------------------------------------------------------- scoring
def resample(moving: sitk.Image, fixed: sitk.Image, field: sitk.Image, labels: bool) -> sitk.Image:
    """Moving on the fixed grid through the field: the one resampler every tool is scored with."""
    tx = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    interp = sitk.sitkNearestNeighbor if labels else sitk.sitkLinear
    return sitk.Resample(moving, fixed, tx, interp, 0.0, moving.GetPixelID())


def read_label_maps(pair: Pair) -> tuple[sitk.Image, sitk.Image]:
    """The pair's fixed and moving label maps, read once for all the tools scored on it."""
    return sitk.ReadImage(str(pair.fixed_labels)), sitk.ReadImage(str(pair.moving_labels))


def warped_labels(fixed: sitk.Image, moving: sitk.Image, field: sitk.Image | Path) -> np.ndarray:
    """The moving labels on the fixed grid through a tool's field (the one resampler, nearest
    neighbour): an integer array shaped like the fixed labels (``(z, y, x)``)."""
    if not isinstance(field, sitk.Image):
        field = sitk.ReadImage(str(field), sitk.sitkVectorFloat64)
    return sitk.GetArrayFromImage(resample(moving, fixed, field, labels=True)).astype(np.int64)


def shared_labels(fixed: np.ndarray, moving: np.ndarray) -> list[int]:
    """The labels (not 0) present in both the fixed and the moving label maps: the ones scored."""
    return sorted(int(v) for v in (set(np.unique(fixed).tolist()) & set(np.unique(moving).tolist())) - {0})


def agreement(pair: Pair, fields: dict[str, Path]) -> dict:
    """How far the tools agree with each other where no ground truth is certain: the moving
    labels warped by each named field, and the fixed labels as ``"reference"``; the mean Dice of
    every two over the pair's labels (:func:`shared_labels`, so a tool's cell in the reference row
    is its score). Returns ``{"names": [...], "dice": [[...]]}`` (symmetric, 1 on the diagonal)."""
    fixed, moving = read_label_maps(pair)
    maps = {"reference": sitk.GetArrayFromImage(fixed).astype(np.int64)}
    labels = shared_labels(maps["reference"], sitk.GetArrayFromImage(moving))
    maps.update({name: warped_labels(fixed, moving, path) for name, path in fields.items()})
    names = list(maps)
    dice = [[1.0] * len(names) for _ in names]
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            dice[i][j] = dice[j][i] = mean_dice(torch.from_numpy(maps[a]), torch.from_numpy(maps[names[j]]), labels)
    return {"names": names, "dice": dice}


def score(pair: Pair, field_path: Path) -> dict:
    """Dice and centroid distance (mm; labels in both maps), % non-positive Jacobian, TRE: the same
    for every tool."""
    field_img = sitk.ReadImage(str(field_path), sitk.sitkVectorFloat64)
    out: dict = {}
    if pair.fixed_labels is not None and pair.moving_labels is not None:
        fl, ml = read_label_maps(pair)
        warped = warped_labels(fl, ml, field_img)
        fa = sitk.GetArrayFromImage(fl).astype(np.int64)
        labels = shared_labels(fa, sitk.GetArrayFromImage(ml))
        out["dice"] = mean_dice(torch.from_numpy(fa), torch.from_numpy(warped), labels)
        out["labels"] = len(labels)
        centroid = label_centroid_distances(torch.from_numpy(fa), torch.from_numpy(warped), labels, grid=grid_from_sitk(fl))
        out["centroid_mm"] = float(np.nanmean(list(centroid.values())))
    u = torch.from_numpy(np.moveaxis(sitk.GetArrayFromImage(field_img), -1, 0).astype(np.float32))
    direction = torch.as_tensor(np.asarray(field_img.GetDirection()).reshape(3, 3), dtype=torch.float32)
    det = jacobian_determinant(u[None], spacing=field_img.GetSpacing(), direction=direction)
    out["nonpositive_jacobian_percent"] = 100.0 * float((det <= 0).double().mean())
    if pair.fixed_points is not None:
        from regcore.evaluation import landmark_tre
        from regcore.export import read_displacement

        tre = landmark_tre(pair.fixed_points, pair.moving_points, read_displacement(field_path))
        out["tre_mm"] = float(np.mean(tre))
    return out


# ------------------------------------------------------------------------------------------- runs
def interpreter_has(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def run_tool(tool: str, pair: Pair, outdir: Path, python: str, threads: int, method: str, config: str | None) -> dict:
    """One tool on one pair in a fresh subprocess; returns its run.json (or an error)."""
    outdir.mkdir(parents=True, exist_ok=True)
    cmd = [python, str(HERE / "peer_tools.py"), tool, str(Path(pair.fixed).resolve()), str(Path(pair.moving).resolve()), str(outdir.resolve()),
           "--threads", str(threads), "--method", method]
    if config:
        cmd += ["--config", str(Path(config).resolve())]
    env = dict(os.environ, **thread_environment(threads))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=outdir)  # tools that write to the cwd
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["failed"],
                "wall_s": time.perf_counter() - t0}
    record = json.loads((outdir / "run.json").read_text())
    record["wall_s"] = time.perf_counter() - t0
    return record


def finished_run(outdir: Path, tool: str, cohortreg_hash: str | None) -> dict | None:
    """The record of a run of ``tool`` that completed in ``outdir`` (its ``run.json`` is written
    after its field), or None; a cohortreg run must also carry ``cohortreg_hash``, the hash of
    the validated method and overrides asked for now."""
    record_file = outdir / "run.json"
    if not (record_file.exists() and (outdir / "displacement.nii.gz").exists()):
        return None
    record = json.loads(record_file.read_text())
    if record.get("tool") != tool:
        return None
    if tool == "cohortreg" and record.get("settings", {}).get("config_hash") != cohortreg_hash:
        return None
    return record


def reused_rows(sources: list[tuple[str, Path]]) -> dict[tuple[str, str], dict]:
    """The scored rows of each (tool, earlier result file) of ``--reuse``, keyed by (pair, tool); a
    later file wins. Failed rows are not reused. Each row records the file it came from."""
    out: dict[tuple[str, str], dict] = {}
    for tool, path in sources:
        try:
            result = json.loads(Path(path).read_text())
            found = [row for row in result["rows"] if row.get("tool") == tool and "error" not in row]
            pairs = [str(row["pair"]) for row in found]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"--reuse {tool}={path}: not a peers.py result file ({err!r})") from err
        if not found:
            raise ValueError(f"--reuse {tool}={path}: the file has no finished {tool} run")
        settings = {key: result.get(key) for key in ("method", "config", "threads", "host", "date")}
        for name, row in zip(pairs, found):  # a row reused before keeps its first source
            out[(name, tool)] = {**row, "reused_from": row.get("reused_from", Path(path).name),
                                 "reused_settings": row.get("reused_settings", settings)}
    return out


def benchmark(pairs: list[Pair], tools: list[str], work: Path, peer_python: str, threads: int,
              repeats: int, method: str, config: str | None, log=print, resume: bool = False,
              with_agreement: bool = False, reused: dict[tuple[str, str], dict] | None = None) -> dict:
    """Run every tool on every pair; returns ``{"rows": [...], "summary": {tool: means},
    "case_summary": {case: {tool: means}}}``. With ``resume``, runs that already finished in
    ``work`` are read back, not run again. ``reused`` rows (:func:`reused_rows`) stand in for
    their (pair, tool) runs as recorded, and take no part in the agreement. With
    ``with_agreement``, also ``"agreement": {pair: agreement(...)}`` over every finished run
    (``tool`` for the first, ``tool#r`` for repeat ``r``) of the pairs with labels."""
    rows = []
    agreements: dict = {}
    reused = reused or {}
    cohortreg_hash = config_hash(method_config(method, config)) if resume and "cohortreg" in tools else None
    for pair in pairs:
        fields: dict[str, Path] = {}
        for tool in tools:
            if (pair.name, tool) in reused:
                rows.append({**reused[(pair.name, tool)], "case": pair.case})
                log(format_row(rows[-1]))
                continue
            python = sys.executable if tool == "cohortreg" else peer_python
            runs = []
            for r in range(repeats):
                outdir = work / re.sub(r"[^A-Za-z0-9_.-]+", "_", pair.name) / tool / f"run{r}"  # plain names: greedy splits its command on them
                done = finished_run(outdir, tool, cohortreg_hash) if resume else None
                runs.append(done if done is not None else run_tool(tool, pair, outdir, python, threads, method, config))
                if "error" in runs[-1]:
                    break
                fields[tool if r == 0 else f"{tool}#{r}"] = outdir / "displacement.nii.gz"
            row = {"pair": pair.name, "tool": tool, "case": pair.case}
            if "error" in runs[-1]:
                row["error"] = runs[-1]["error"]
            else:
                row.update(score(pair, outdir / "displacement.nii.gz"))
                row["seconds"] = statistics.median(run["seconds"] for run in runs)
                row["seconds_runs"] = [round(run["seconds"], 2) for run in runs]
                row["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
                row["threads"] = runs[0].get("threads", threads)  # a resumed run keeps its own
            rows.append(row)
            log(format_row(row))
        if with_agreement and pair.fixed_labels is not None and pair.moving_labels is not None and fields:
            agreements[pair.name] = agreement(pair, fields)
    out = {"rows": rows, "summary": summarize(rows),
           "case_summary": {case: summarize([r for r in rows if r.get("case") == case])
                            for case in dict.fromkeys(p.case for p in pairs)}}
    if with_agreement:
        out["agreement"] = agreements
    return out


def mean_agreement(agreements: dict) -> dict:
    """The element-wise mean of the pairs' agreement matrices (the names of the first pair; pairs
    whose tools failed differently are left out)."""
    if not agreements:
        return {"names": [], "dice": []}
    first = next(iter(agreements.values()))
    same = [a["dice"] for a in agreements.values() if a["names"] == first["names"]]
    return {"names": first["names"], "dice": np.mean(np.asarray(same, dtype=float), axis=0).tolist(), "pairs": len(same)}


def format_agreement(matrix: dict) -> str:
    """A markdown table of an agreement matrix (mean Dice between the warped label maps)."""
    names = matrix["names"]
    lines = ["| mean Dice | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for i, (name, row) in enumerate(zip(names, matrix["dice"])):
        lines.append(f"| {name} | " + " | ".join("-" if j == i else f"{v:.4f}" for j, v in enumerate(row)) + " |")
    return "\n".join(lines)


def summarize(rows: list[dict]) -> dict:
    out: dict = {}
    for tool in dict.fromkeys(r["tool"] for r in rows):
        ok = [r for r in rows if r["tool"] == tool and "error" not in r]
        s = {"pairs": len(ok), "failed": sum(1 for r in rows if r["tool"] == tool and "error" in r)}
        for key in ("dice", "centroid_mm", "tre_mm", "seconds", "peak_rss_mb"):
            vals = [r[key] for r in ok if key in r]
            if vals:
                s[key] = float(np.mean(vals))
        jac = [r["nonpositive_jacobian_percent"] for r in ok]
        if jac:
            s["worst_nonpositive_jacobian_percent"] = float(max(jac))
        out[tool] = s
    return out


def format_row(row: dict) -> str:
    if "error" in row:
        return f"| {row['pair']} | {row['tool']} | failed: {row['error']} |"
    dice = f"{row['dice']:.4f}" if "dice" in row else "-"
    centroid = f"{row['centroid_mm']:.2f}" if "centroid_mm" in row else "-"
    tre = f"{row['tre_mm']:.2f}" if "tre_mm" in row else "-"
    reused = f" (from {row['reused_from']})" if "reused_from" in row else ""
    return (f"| {row['pair']} | {row['tool']}{reused} | {dice} | {centroid} | {tre} | {row['nonpositive_jacobian_percent']:.4f} | "
            f"{row['seconds']:.1f} | {row['peak_rss_mb'] / 1024:.2f} |")


def format_summary(summary: dict) -> str:
    lines = ["| tool | pairs | mean Dice | centroid mm | mean TRE mm | worst % Jac <= 0 | mean s | mean peak RSS GB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for tool, s in summary.items():
        lines.append(f"| {tool} | {s['pairs']} (+{s['failed']} failed) | {s.get('dice', float('nan')):.4f} | "
                     f"{s.get('centroid_mm', float('nan')):.2f} | {s.get('tre_mm', float('nan')):.2f} | {s.get('worst_nonpositive_jacobian_percent', float('nan')):.4f} | "
                     f"{s.get('seconds', float('nan')):.1f} | {s.get('peak_rss_mb', float('nan')) / 1024:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="brain-t1", help="comma list: brain-t1, brain-t1-1mm, colin-mni, labelmaps-1mm, labelmaps-2mm, lung")
    ap.add_argument("--manifest", type=Path, help="a cohort CSV (subject,image,labels) instead of --cases")
    ap.add_argument("--pair-list", type=Path, help="fixed,moving subject ids for --manifest")
    ap.add_argument("--tools", default="cohortreg,ants-syns,ants-syn,greedy,elastix")
    ap.add_argument("--peer-python", default=sys.executable, help="interpreter with antspyx, picsl-greedy, itk-elastix")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool and pair; seconds are their median")
    ap.add_argument("--method", default="affine+syn")
    ap.add_argument("--config", default=None)
    ap.add_argument("--pairs", type=int, default=None, help="first N pairs of each case")
    ap.add_argument("--select", default=None, help="comma list of texts: keep the pairs whose name contains one (e.g. 04->03,06->05)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the tools' outputs (default: a temporary folder, removed at the end)")
    ap.add_argument("--resume", action="store_true",
                    help="read back the runs that finished in --work (same tools; cohortreg: same method and --config) instead of running them again")
    ap.add_argument("--reuse", default=None,
                    help="comma list of TOOL=earlier-result.json: that tool's rows in the file, for the chosen pairs, are reported "
                         "as recorded instead of run again (a peer that takes hours a pair); marked '(from FILE)'")
    ap.add_argument("--agreement", action="store_true",
                    help="also the mean Dice between the label maps warped by every two tools (and each repeat), and the reference")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "peers.json")
    args = ap.parse_args(argv)

    if args.resume and args.work is None:
        ap.error("--resume needs --work (the folder of the earlier run)")
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        return _run(args, ap, args.work)
    with tempfile.TemporaryDirectory(prefix="cohortreg-peers-") as temp:  # GBs of fields: not left behind
        return _run(args, ap, Path(temp))


def _run(args: argparse.Namespace, ap: argparse.ArgumentParser, work: Path) -> int:
    """The benchmark of :func:`main`'s arguments, the tools' outputs in ``work``."""
    if args.manifest is not None:
        pairs = manifest_pairs(args.manifest, args.pair_list)
        for pair in pairs:
            pair.case = "manifest"
    else:
        makers = {"brain-t1": lambda: brain_t1_pairs(SHARED), "brain-t1-1mm": lambda: brain_t1_1mm_pairs(SHARED, work),
                  "colin-mni": lambda: colin_mni_pairs(SHARED),
                  "labelmaps-1mm": lambda: labelmap_pairs(SHARED, work, 1.0),
                  "labelmaps-2mm": lambda: labelmap_pairs(SHARED, work, 2.0), "lung": lambda: lung_pairs(SHARED)}
        pairs = []
        for case in args.cases.split(","):
            if case not in makers:
                ap.error(f"unknown case {case!r}; choose from {', '.join(makers)}")
            if not SHARED.is_dir():
                ap.error(f"{SHARED} not found: the shared cases need ../shared/data (or use --manifest)")
            made = makers[case]()[: args.pairs]
            for pair in made:
                pair.case = case
            pairs += made
    if args.select:
        wanted = [text.strip() for text in args.select.split(",") if text.strip()]
        pairs = [p for p in pairs if any(text in p.name for text in wanted)]
        if not pairs:
            ap.error(f"--select {args.select!r} matches no pair")
    asked = args.tools.split(",")
    for tool in asked:
        if tool not in TOOLS:
            ap.error(f"unknown tool {tool!r}; choose from {', '.join(TOOLS)}")
    sources = []
    for spec in (args.reuse or "").split(","):
        if spec.strip():
            tool, sep, path = spec.strip().partition("=")
            if not sep or tool not in asked:
                ap.error(f"--reuse {spec!r}: write TOOL=FILE, with TOOL one of --tools ({', '.join(asked)})")
            sources.append((tool, Path(path)))
    try:
        reused = reused_rows(sources)
    except ValueError as err:
        ap.error(str(err))
    for (name, tool), row in reused.items():  # cohortreg's rows stand in only for the same method and overrides
        settings = row["reused_settings"]
        if tool == "cohortreg" and (settings["method"], settings["config"]) != (args.method, args.config):
            ap.error(f"--reuse cohortreg: {row['reused_from']} ran --method {settings['method']} --config {settings['config']}, "
                     f"not {args.method} / {args.config}")
    names = {p.name for p in pairs}
    tools = []
    for tool in asked:
        python = sys.executable if tool == "cohortreg" else args.peer_python
        if all((name, tool) in reused for name in names) or interpreter_has(python, TOOLS[tool].requires):
            tools.append(tool)  # every pair reused: the tool need not be installed
        else:
            print(f"skipping {tool}: {python} cannot import {TOOLS[tool].requires} (pip install -e '.[peers]')", file=sys.stderr)
    print("| pair | tool | mean Dice | centroid mm | TRE mm | % Jac <= 0 | s | peak RSS GB |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    result = benchmark(pairs, tools, work, args.peer_python, args.threads, args.repeats, args.method, args.config,
                       log=lambda line: print(line, flush=True), resume=args.resume, with_agreement=args.agreement,
                       reused=reused)
    print()
    if len(result["case_summary"]) > 1:
        for case, summary in result["case_summary"].items():
            print(f"{case}:\n{format_summary(summary)}\n")
        print(f"all {len(pairs)} pairs ({args.cases}), each pair counted once:")
    print(format_summary(result["summary"]))
    if args.agreement and not result["agreement"]:
        print("\n--agreement: no pair has label maps on both sides, nothing to compare", file=sys.stderr)
    elif args.agreement:
        result["agreement_mean"] = mean_agreement(result["agreement"])
        print(f"\nagreement (mean over {result['agreement_mean'].get('pairs', 0)} pairs): mean Dice between warped label maps")
        print(format_agreement(result["agreement_mean"]))
    result.update(cases=args.cases if args.manifest is None else str(args.manifest), threads=args.threads,
                  repeats=args.repeats, method=args.method, config=args.config, reuse=args.reuse, tools={t: TOOLS[t].description for t in tools},
                  torch=torch.__version__, host=os.uname().nodename, date=time.strftime("%Y-%m-%d %H:%M"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
