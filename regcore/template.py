"""Groupwise template maths: coverage-weighted averaging, the shape update, sharpening, label voting.

Pure functions on tensors and :class:`Image` s; the cohort workflow that calls them (registering
every subject to the current template on a cluster) is :mod:`workflows.template`.

Conventions: a subject's field ``u`` lives on the template grid and maps a template point ``x``
(mm) into the subject, ``T(x) = x + u(x)`` (the fields the per-pair task stores with the template
as the fixed image). Shapes: images ``(C, *S)``, fields ``(D, *S)`` with components (x, y, z) in
world mm, ``S`` the template grid's ``(z, y, x)`` shape.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .fields import invert_displacement
from .grid import Grid
from .image import Image
from .pyramid import gaussian_smooth
from .pair_metrics import warp
from .sampling import sample_world

__all__ = ["warp_to_template", "coverage_mean", "mean_warp_norm", "shape_update", "unsharp_mask",
           "vote_labels", "ncc_value", "mean_gradient_magnitude"]


def warp_to_template(image: Image, displacement: torch.Tensor, grid: Grid, mode: str = "linear") -> tuple[torch.Tensor, torch.Tensor]:
    """A subject image sampled on the template grid through its field, and its coverage.

    Args:
        image: the subject (any grid).
        displacement: ``(D, *grid.shape)`` mm, template -> subject.
        grid: the template grid.
        mode: ``linear`` for intensities, ``nearest`` for labels.

    Returns:
        ``(warped (C, *S), coverage (1, *S))``: coverage is the subject's field of view seen from
        the template, 1 inside, 0 outside, linear across the border voxel.
    """
    field = Image(displacement, grid)
    warped = warp(image, field, mode=mode).data
    coverage = warp(Image(torch.ones((1, *image.grid.shape), dtype=torch.float32), image.grid), field).data
    return warped, coverage


def coverage_mean(images: Sequence[torch.Tensor], coverages: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean of warped images weighted by their coverage, ``sum c_i I_i / sum c_i`` (0 where no
    subject sees the voxel): a subject with a partial field of view does not darken the voxels it
    does not see, as a plain division by N would. Returns ``(mean (C, *S), total coverage (1, *S))``."""
    total = torch.zeros_like(coverages[0], dtype=torch.float64)
    acc = torch.zeros_like(images[0], dtype=torch.float64)
    for img, cov in zip(images, coverages):
        acc += img.double() * cov
        total += cov
    mean = torch.where(total > 1e-6, acc / total.clamp_min(1e-6), torch.zeros_like(acc))
    return mean.float(), total.float()


def mean_warp_norm(mean_field: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """Mean length (mm) of the mean field over the voxels (weighted, e.g. by coverage)."""
    norm = mean_field.double().pow(2).sum(0).sqrt()
    if weight is None:
        return float(norm.mean())
    w = weight.double().reshape(norm.shape)
    return float((norm * w).sum() / w.sum().clamp_min(1e-12))


def shape_update(template: Image, mean_field: torch.Tensor, step: float = 0.25, mode: str = "linear") -> Image:
    """Move the template towards the cohort's mean shape: resample it through the inverse of
    ``step`` times the mean field (ANTs' template update; ``step`` <= 0.25 keeps it stable).

    The mean field ``u_bar`` says where, on average, the subjects' counterpart of a template point
    lies; the updated template holds at ``x + step u_bar(x)`` what the template held at ``x``.
    """
    if not 0 < step <= 1:
        raise ValueError(f"shape update step must be in (0, 1], got {step}")
    v = invert_displacement(step * mean_field.float(), template.grid)
    pts = template.grid.world_points(dtype=torch.float64) + torch.movedim(v.double(), 0, -1)
    data = sample_world(template, pts, mode=mode, padding="border")  # type: ignore[arg-type]
    return Image(data, template.grid)


def unsharp_mask(image: Image, sigma_vox: float = 1.0, amount: float = 0.5) -> Image:
    """``I + amount (I - G_sigma * I)`` (``sigma`` in voxels): restores the edges that averaging
    many imperfectly aligned subjects blurs. ``amount`` 0 leaves the image unchanged."""
    if amount == 0:
        return image
    smooth = gaussian_smooth(image.data.float(), [sigma_vox] * image.ndim)
    return Image(image.data.float() + amount * (image.data.float() - smooth), image.grid)


def vote_labels(labels: Sequence[torch.Tensor], coverages: Sequence[torch.Tensor], min_coverage: float = 0.5) -> torch.Tensor:
    """Majority vote of label maps on one grid (``(1, *S)`` integers each); a subject votes where
    its coverage exceeds ``min_coverage``; voxels nobody covers get 0. Returns ``(1, *S)`` int32."""
    values = torch.unique(torch.cat([lab.reshape(-1) for lab in labels]))
    best = torch.full_like(labels[0], -1, dtype=torch.float32)
    out = torch.zeros_like(labels[0], dtype=torch.int32)
    for v in values.tolist():
        votes = sum(((lab == v) & (cov > min_coverage)).float() for lab, cov in zip(labels, coverages))
        better = votes > best
        out = torch.where(better, torch.as_tensor(int(v), dtype=torch.int32), out)
        best = torch.where(better, votes, best)
    return torch.where(best > 0, out, torch.zeros_like(out))


def ncc_value(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Global normalised cross-correlation of two images on one grid (over ``mask`` if given)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    if mask is not None:
        keep = mask.reshape(-1) > 0.5
        a, b = a[keep], b[keep]
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))


def mean_gradient_magnitude(image: Image, mask: torch.Tensor | None = None) -> float:
    """Mean |grad I| (intensity per mm) over ``mask`` (all voxels if None): a sharpness measure."""
    data = image.data[0].double()
    grads = torch.gradient(data, spacing=tuple(reversed(image.grid.spacing)))
    mag = torch.stack(grads).pow(2).sum(0).sqrt()
    if mask is None:
        return float(mag.mean())
    keep = mask.reshape(mag.shape) > 0.5
    return float(mag[keep].mean())
