"""The ``regcore`` command line: register one pair, or run the built-in demo.

``regcore register FIXED MOVING --method NAME [--config FILE.yaml] --out DIR`` writes

* ``DIR/warped.nii.gz``        moving resampled on the fixed grid;
* ``DIR/displacement.nii.gz``  ITK displacement field (fixed grid, world mm, components x,y,z);
* ``DIR/transform.tfm``        the linear part as an ITK transform file;
* ``DIR/jacobian.nii.gz``      Jacobian determinant of the full map (deformable methods);
* ``DIR/result.json``          method, full config, config hash, loss per level, iterations,
  seconds, device and the fitted transform's parameters.

Exit status: 0 success, 2 bad input (message names the file), 3 registration failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import torch

from .errors import InputError, RegistrationError
from .export import write_displacement, write_linear_transform
from .io import read_image, write_image
from .config import OPTIMIZERS as OPTIMIZER_NAMES
from .losses.modules import LOSSES
from .methods import available_methods, method_config
from .regularizers.modules import REGULARIZERS
from .transforms.registry import TRANSFORMS, params_model
from .registration import RegistrationResult, register

__all__ = ["main", "write_outputs"]

log = logging.getLogger("regcore")


def write_outputs(result: RegistrationResult, out: str | Path) -> dict[str, Path]:
    """Write the output contract of ``regcore register`` into folder ``out``; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "warped": write_image(result.warped, out / "warped.nii.gz"),
        "displacement": write_displacement(result.displacement, out / "displacement.nii.gz"),
        "transform": write_linear_transform(result.transform, out / "transform.tfm"),
    }
    if result.jacobian is not None:
        paths["jacobian"] = write_image(result.jacobian, out / "jacobian.nii.gz")
    summary = result.summary()
    summary["outputs"] = {k: p.name for k, p in paths.items()}
    paths["result"] = out / "result.json"
    paths["result"].write_text(json.dumps(summary, indent=2))
    return paths


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


def _progress(verbose: bool):
    def callback(event: dict) -> None:
        if event["event"] == "level":
            losses = event["losses"]
            print(
                f"  stage {event['stage']} {event['transform']:<11} level x{event['factor']:<4g} "
                f"{event['iterations']:4d} it  loss {losses[-1] if losses else float('nan'):.6g}  "
                f"({event['stop_reason']}, {event['seconds']:.1f} s)",
                file=sys.stderr,
            )
    return callback if verbose else None


def _cmd_register(args: argparse.Namespace) -> int:
    fixed = read_image(args.fixed, scalar=True)
    moving = read_image(args.moving, scalar=True)
    fmask = read_image(args.fixed_mask) if args.fixed_mask else None
    mmask = read_image(args.moving_mask) if args.moving_mask else None
    result = register(
        fixed, moving, args.method, config=args.config, fixed_mask=fmask, moving_mask=mmask,
        device=_device(args.device), callback=_progress(not args.quiet),
    )
    paths = write_outputs(result, args.out)
    print(f"{result.method}: {result.iterations} iterations in {result.seconds:.1f} s on {result.device}; "
          f"final loss {result.final_loss:.6g}; outputs in {paths['result'].parent}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    if args.name:
        print(json.dumps(method_config(args.name).model_dump(mode="json"), indent=2))
        return 0
    print("presets (chain them with '+', e.g. affine+syn):")
    print("  " + ", ".join(available_methods()))
    print("transforms (stage 'transform', its 'transform_params'):")
    for name, cls in TRANSFORMS.items():
        fields = params_model(name).model_fields
        params = ", ".join(f"{k}={f.default!r}" for k, f in fields.items()) or "-"
        print(f"  {name:12s} {'linear' if cls.is_linear else 'deformable':10s} {params}")
    print("measures (objective terms): " + ", ".join(LOSSES))
    print("regularizers: " + ", ".join(REGULARIZERS))
    print("optimizers: " + ", ".join(OPTIMIZER_NAMES))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, device=_device(args.device))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="regcore", description="Register medical images with PyTorch.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    reg = sub.add_parser("register", help="register MOVING to FIXED and write the results to --out")
    reg.add_argument("fixed", help="fixed image (any SimpleITK format, or a DICOM folder)")
    reg.add_argument("moving", help="moving image")
    reg.add_argument("--method", default="affine",
                     help=f"preset: {', '.join(available_methods())}, or a chain such as affine+svf")
    reg.add_argument("--config", help="YAML overrides deep-merged over the preset")
    reg.add_argument("--out", required=True, help="output folder")
    reg.add_argument("--fixed-mask", help="binary mask on the fixed grid")
    reg.add_argument("--moving-mask", help="binary mask on the moving grid")
    reg.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    reg.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    reg.set_defaults(func=_cmd_register)

    met = sub.add_parser("methods", help="list presets, or print one preset's full config")
    met.add_argument("name", nargs="?")
    met.set_defaults(func=_cmd_methods)

    demo = sub.add_parser("demo", help="register nibabel's example pair and compare with the known answer")
    demo.add_argument("--out", default="regcore-demo", help="output folder (default ./regcore-demo)")
    demo.add_argument("--device", default="auto")
    demo.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except InputError as exc:
        print(f"regcore: error: {exc}", file=sys.stderr)
        return 2
    except RegistrationError as exc:
        print(f"regcore: registration failed: {exc}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
