"""The demo cohort: real anatomy shipped offline, deformed by known random diffeomorphisms.

The atlas is the MNI152 2009c template that the ``nilearn`` wheel carries
(``nilearn/datasets/data/mni_icbm152_*``), resampled to ``resolution`` mm, with a 3-class label
map made from its tissue maps (1 = other brain tissue / CSF, 2 = grey matter, 3 = white matter).
Each subject is the atlas warped by a seeded random smooth diffeomorphism (a stationary velocity
field exponentiated by scaling and squaring) composed with a small random affine, with its own
noise and bias field; its labels are warped with the same transform by nearest neighbour.
No network and no ``../shared`` are needed.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch

from regcore import Grid, Image, InputError, read_image, write_image
from regcore.pyramid import downsample, gaussian_smooth
from regcore.sampling import sample_world
from regcore.transforms.svf import StationaryVelocityField

from pipeline.manifest import Subject, write_manifest

__all__ = ["mni_template_files", "load_atlas", "random_diffeomorphism", "make_demo_cohort"]

log = logging.getLogger(__name__)


def mni_template_files() -> dict[str, Path]:
    """Paths of the MNI152 T1, grey- and white-matter maps inside the installed nilearn package."""
    try:
        import importlib.util

        spec = importlib.util.find_spec("nilearn")
    except ImportError:  # pragma: no cover
        spec = None
    if spec is None or spec.origin is None:
        raise InputError("the demo cohort needs the MNI152 template from nilearn: pip install nilearn")
    data = Path(spec.origin).parent / "datasets" / "data"
    files = {k: data / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise InputError(f"nilearn is installed but lacks the MNI152 files: {', '.join(missing)}")
    return files


def load_atlas(resolution: float = 3.0) -> tuple[Image, Image]:
    """The MNI152 atlas image (float32, [0, 1]) and its 3-class label map at ``resolution`` mm,
    cropped to the brain with a 2-voxel margin."""
    files = mni_template_files()
    t1, gm, wm = (read_image(files[k]) for k in ("t1", "gm", "wm"))
    t1 = Image(t1.data / t1.data.max(), t1.grid)
    brain = t1.data[0] > 0.05
    gmd, wmd = gm.data[0] / gm.data.max(), wm.data[0] / wm.data.max()
    labels = torch.zeros_like(t1.data[0], dtype=torch.int32)
    labels[brain] = 1
    labels[brain & (gmd > 0.5) & (gmd >= wmd)] = 2
    labels[brain & (wmd > 0.5) & (wmd > gmd)] = 3
    nz = torch.nonzero(labels > 0)
    lo = (nz.min(0).values - 3).clamp_min(0)
    hi = torch.minimum(nz.max(0).values + 4, torch.tensor(labels.shape))
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    origin = t1.grid.index_points_to_world(np.array([[lo[2], lo[1], lo[0]]], dtype=float))[0]
    grid = Grid(tuple(int(b - a) for a, b in reversed(list(zip(lo, hi)))), t1.grid.spacing, origin, t1.grid.direction)
    image = Image(t1.data[(slice(None),) + crop].contiguous(), grid)
    labels_img = Image(labels[crop][None].contiguous(), grid)
    factor = resolution / min(t1.grid.spacing)
    if factor != 1:
        image = downsample(image, factor)
        labels_img = Image(sample_world(labels_img, image.grid.world_points(dtype=torch.float64), mode="nearest")
                           .to(torch.int32), image.grid)
    return image, labels_img


def random_diffeomorphism(grid: Grid, seed: int, max_mm: float = 6.0, smooth_mm: float = 12.0,
                          rotation_deg: float = 5.0, shift_mm: float = 5.0, scale: float = 0.05) -> torch.Tensor:
    """Displacement ``(D, *grid.shape)`` (mm) of ``A(exp(v)(x))``: a seeded smooth SVF (largest
    velocity ``max_mm``) followed by a random affine about the grid centre."""
    gen = torch.Generator().manual_seed(seed)
    d = grid.ndim
    v = torch.randn((d, *grid.shape), generator=gen)
    v = gaussian_smooth(v, [smooth_mm / s for s in reversed(grid.spacing)])
    v = v * (max_mm / torch.linalg.vector_norm(v, dim=0).max().clamp_min(1e-6))
    svf = StationaryVelocityField(grid)
    with torch.no_grad():
        u = svf.exponential(v)
    angles = (torch.rand(3, generator=gen) * 2 - 1) * math.radians(rotation_deg)
    cx, cy, cz = torch.cos(angles).tolist()
    sx, sy, sz = torch.sin(angles).tolist()
    rot = (torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
           @ torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))[:d, :d].double()
    scl = 1 + (torch.rand(d, generator=gen).double() * 2 - 1) * scale
    mat = rot @ torch.diag(scl)
    shift = (torch.rand(d, generator=gen).double() * 2 - 1) * shift_mm
    center = torch.as_tensor(grid.center(), dtype=torch.float64)
    x = grid.world_points(dtype=torch.float64)
    y = x + torch.movedim(u.double(), 0, -1)
    z = (y - center) @ mat.T + center + shift
    return torch.movedim(z - x, -1, 0).float()


def invert_points(displacement: Image, targets: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Points ``x`` with ``x + U(x) = y`` for world points ``y`` ``(N, D)`` (fixed-point iteration,
    converges when the field's gradient is small, as for the demo's smooth maps)."""
    x = targets.clone()
    for _ in range(iterations):
        x = targets - sample_world(displacement, x, padding="border").T
    return x


def _write_points(points: torch.Tensor, path: Path) -> Path:
    cols = "xyz"[: points.shape[1]]
    lines = [",".join(cols)] + [",".join(f"{v:.6f}" for v in p) for p in points.tolist()]
    path.write_text("\n".join(lines) + "\n")
    return path


def make_demo_cohort(out: str | Path, subjects: int = 8, resolution: float = 3.0, seed: int = 0,
                     landmarks: int = 20) -> Path:
    """Write the atlas and ``subjects`` deformed copies under ``out`` and a manifest
    ``out/manifest.csv`` whose first row is the atlas (key ``atlas``). Returns the manifest.

    Each image comes with its label map and ``landmarks`` corresponding points (CSV, world mm):
    seeded points inside the atlas's brain and, for each subject, the exact points where the
    random map sends them (so TRE has a ground truth).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atlas, atlas_labels = load_atlas(resolution)
    grid = atlas.grid
    gen = torch.Generator().manual_seed(seed)
    inside = torch.nonzero(atlas_labels.data[0].reshape(-1) > 0)[:, 0]
    picks = inside[torch.randperm(inside.numel(), generator=gen)[:landmarks]]
    atlas_points = grid.world_points(dtype=torch.float64).reshape(-1, grid.ndim)[picks]
    rows = [Subject("atlas", write_image(atlas, out / "atlas.nii.gz"),
                    labels=write_image(atlas_labels, out / "atlas_labels.nii.gz", pixel_dtype=np.int16),
                    landmarks=_write_points(atlas_points, out / "atlas_landmarks.csv") if landmarks else None)]
    points = grid.world_points(dtype=torch.float64)
    for s in range(1, subjects + 1):
        u = random_diffeomorphism(grid, seed * 1000 + s)
        mapped = points + torch.movedim(u.double(), 0, -1)
        img = sample_world(atlas, mapped)
        lab = sample_world(atlas_labels, mapped, mode="nearest").to(torch.int32)
        gen = torch.Generator().manual_seed(seed * 1000 + 500 + s)
        coarse = torch.randn((1, 1, 3, 3, 3)[: 2 + grid.ndim], generator=gen)
        bias = torch.nn.functional.interpolate(coarse, size=grid.shape, mode="trilinear", align_corners=True)[0]
        img = img * (1 + 0.1 * bias / bias.abs().max()) + 0.02 * torch.randn(img.shape, generator=gen)
        name = f"sub-{s:02d}"
        # subject(x) = atlas(x + u(x)): the atlas point y sits at the x with x + u(x) = y
        subject_points = invert_points(Image(u.double(), grid), atlas_points)
        rows.append(Subject(name, write_image(Image(img.float(), grid), out / f"{name}.nii.gz"),
                            labels=write_image(Image(lab, grid), out / f"{name}_labels.nii.gz", pixel_dtype=np.int16),
                            landmarks=_write_points(subject_points, out / f"{name}_landmarks.csv") if landmarks else None))
    return write_manifest(rows, out / "manifest.csv")
