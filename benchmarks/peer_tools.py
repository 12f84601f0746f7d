"""Run one registration tool on one pair and write its result as a dense ITK displacement field.

    python benchmarks/peer_tools.py TOOL FIXED MOVING OUTDIR [--threads 2] [--method M] [--config C]

TOOL is one of :data:`TOOLS`. The tool runs in this process (started by ``benchmarks/peers.py``
with the interpreter that has the tool installed: antspyx, picsl-greedy or itk-elastix live in an
optional extra or a separate virtual environment, never in cohortreg's runtime dependencies).

OUTDIR receives:

- ``displacement.nii.gz``: the tool's whole fixed -> moving map (linear part included) as an ITK
  displacement field on the fixed grid: world (LPS) millimetres, components (x, y, z), so that
  ``sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))`` warps moving onto fixed
  exactly as the tool would;
- ``run.json``: ``seconds`` (the registration call alone: not the imports, not the file reading,
  not the conversion of the tool's output to a dense field), ``peak_rss_mb`` (this process's
  peak resident memory, the tool's threads included) and the tool's settings.

Each adapter turns the tool's own output conventions into that field: ANTs composes its
transforms with ``apply_transforms(..., compose=...)``; greedy's affine matrix is in RAS
(``-rc`` composes it with the warp into one LPS field); elastix's ``transformix`` writes the
deformation field directly. Only SimpleITK and numpy are imported at module level, so the file
runs in any of those environments.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS",
)


def thread_environment(threads: int) -> dict[str, str]:
    """Environment variables that cap every tool's thread pools at ``threads``."""
    return {name: str(threads) for name in THREAD_VARIABLES}


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB; Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --------------------------------------------------------------------------------------- adapters
def run_cohortreg(fixed: str, moving: str, out: Path, threads: int, method: str, config: str | None) -> dict:
    import torch

    from regcore import read_image, register
    from regcore.export import write_displacement

    torch.set_num_threads(threads)
    f, m = read_image(fixed), read_image(moving)
    t0 = time.perf_counter()
    result = register(f, m, method, config=config)
    seconds = time.perf_counter() - t0
    write_displacement(result.displacement, out / "displacement.nii.gz")
    return {"seconds": seconds, "settings": {"method": method, "config_hash": result.config_hash}}


def _run_ants(fixed: str, moving: str, out: Path, threads: int, kind: str, **options) -> dict:
    import ants

    f, m = ants.image_read(fixed), ants.image_read(moving)
    t0 = time.perf_counter()
    reg = ants.registration(f, m, type_of_transform=kind, outprefix=str(out / "ants_"), **options)
    seconds = time.perf_counter() - t0
    composed = ants.apply_transforms(fixed=f, moving=m, transformlist=reg["fwdtransforms"], compose=str(out / "composed_"))
    import SimpleITK as sitk

    field = sitk.ReadImage(composed, sitk.sitkVectorFloat64)
    sitk.WriteImage(field, str(out / "displacement.nii.gz"), useCompression=True)
    return {"seconds": seconds, "settings": {"type_of_transform": kind, **options}}


def run_ants_syns(fixed: str, moving: str, out: Path, threads: int, method: str, config: str | None) -> dict:
    return _run_ants(fixed, moving, out, threads, "antsRegistrationSyN[s]")


def run_ants_syn(fixed: str, moving: str, out: Path, threads: int, method: str, config: str | None) -> dict:
    return _run_ants(fixed, moving, out, threads, "SyN")


def run_ants_syn_cc(fixed: str, moving: str, out: Path, threads: int, method: str, config: str | None) -> dict:
    return _run_ants(fixed, moving, out, threads, "SyN", syn_metric="CC", syn_sampling=2)


def run_greedy(fixed: str, moving: str, out: Path, threads: int, method: str, config: str | None) -> dict:
    from picsl_greedy import Greedy3D

    aff, warp, total = out / "affine.mat", out / "warp.nii.gz", out / "displacement.nii.gz"
    g = Greedy3D()
    affine_cmd = (f"-d 3 -threads {threads} -i {fixed} {moving} -a -dof 12 -m WNCC 2x2x2 "
                  f"-ia-image-centers -n 100x50x10 -o {aff}")
    deform_cmd = f"-d 3 -threads {threads} -i {fixed} {moving} -it {aff} -m WNCC 2x2x2 -sv -n 100x50x10 -o {warp}"
    with open(os.devnull, "w") as sink:
        t0 = time.perf_counter()
        g.execute(affine_cmd, out=sink, err=sink)
        g.execute(deform_cmd, out=sink, err=sink)
        seconds = time.perf_counter() - t0
        # -rc composes warp then affine (the order greedy applies them to fixed points) into one
        # ITK displacement field (LPS mm) on the reference grid
        Greedy3D().execute(f"-d 3 -rf {fixed} -r {warp} {aff} -rc {total}", out=sink, err=sink)
    return {"seconds": seconds, "settings": {"affine": affine_cmd, "deformable": deform_cmd}}


def run_elastix(fixed: str, moving: str, out: Path, threads: int, method: str, config: str | None) -> dict:
    import itk
    import SimpleITK as sitk

    f = itk.imread(fixed, itk.F)
    m = itk.imread(moving, itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap("affine"))
    params.AddParameterMap(params.GetDefaultParameterMap("bspline"))
    t0 = time.perf_counter()
    _, result = itk.elastix_registration_method(f, m, parameter_object=params, log_to_console=False,
                                                number_of_threads=threads)
    seconds = time.perf_counter() - t0
    field = itk.transformix_deformation_field(m, result)
    itk.imwrite(field, str(out / "elastix_field.nii.gz"))
    sitk.WriteImage(sitk.ReadImage(str(out / "elastix_field.nii.gz"), sitk.sitkVectorFloat64),
                    str(out / "displacement.nii.gz"), useCompression=True)
    return {"seconds": seconds, "settings": {"parameter_maps": ["affine", "bspline"]}}


@dataclass(frozen=True)
class Tool:
    """One registration tool: the settings it runs with, the module it needs, its adapter."""

    description: str
    requires: str  # module an interpreter must import to run it
    run: Callable[[str, str, Path, int, str, str | None], dict]  # (fixed, moving, outdir, threads, method, config) -> record


#: Every tool the harness knows: one entry per tool (a new peer is an adapter plus one line here).
TOOLS = {
    "cohortreg": Tool("cohortreg register() with --method (default affine+syn)", "regcore", run_cohortreg),
    "ants-syns": Tool('ANTsPy ants.registration(type_of_transform="antsRegistrationSyN[s]"): rigid+affine (MI) then '
                      "SyN[0.2,3,0] with CC radius 2, 8x4x2x1, 100x70x50x20", "ants", run_ants_syns),
    "ants-syn": Tool('ANTsPy ants.registration(type_of_transform="SyN"): its defaults (affine + SyN with Mattes MI, 40x20x0)',
                     "ants", run_ants_syn),
    "ants-syn-cc": Tool('ANTsPy "SyN" with syn_metric="CC", syn_sampling=2 (CC radius 2), all else its defaults: '
                        "a diagnostic of what the similarity measure alone changes", "ants", run_ants_syn_cc),
    "greedy": Tool("greedy brain quick-start: -a -dof 12 -m WNCC 2x2x2 -ia-image-centers -n 100x50x10, "
                   "then -m WNCC 2x2x2 -it aff -sv -n 100x50x10", "picsl_greedy", run_greedy),
    "elastix": Tool("itk-elastix default parameter maps: affine then bspline (AdvancedMattesMutualInformation)",
                    "itk", run_elastix),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("tool", choices=sorted(TOOLS))
    ap.add_argument("fixed")
    ap.add_argument("moving")
    ap.add_argument("outdir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="affine+syn", help="cohortreg method (other tools ignore it)")
    ap.add_argument("--config", default=None, help="cohortreg config overrides, YAML (other tools ignore it)")
    args = ap.parse_args(argv)
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.update(thread_environment(args.threads))
    tempfile.tempdir = str(out)  # ANTs writes its transforms to the temp dir: keep them with the run
    record = TOOLS[args.tool].run(args.fixed, args.moving, out, args.threads, args.method, args.config)
    record.update(tool=args.tool, threads=args.threads, peak_rss_mb=peak_rss_mb())
    (out / "run.json").write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
