"""Synthetic intensity images from label maps (a seeded recipe), for tests, benchmarks and demos.

Recipe (after SynthSeg's generative model, much simplified): one intensity per label drawn from a
``contrast_seed`` (shared by the images of a pair, so they share a contrast), then per image
(``seed``): Gaussian blur (partial volume), additive Gaussian noise and a smooth multiplicative
bias field. All sizes are in mm, so the recipe behaves the same at any resolution.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .grid import Grid
from .image import Image
from .pyramid import gaussian_smooth
from .sampling import sample_world

__all__ = ["crop_to_labels", "intensity_from_labels"]


def crop_to_labels(labels: Image, margin: int = 4, factor: float = 1.0) -> Image:
    """A label map cropped to the bounding box of its foreground (label > 0) plus ``margin``
    voxels, then resampled by nearest neighbour onto that box's grid downsampled by ``factor``.

    World positions are kept: the crop's origin is the world position of its first voxel, with the
    input's spacing and direction. Returns int64 labels ``(1, *shape)``.
    """
    a = labels.data[0].round().to(torch.int64)
    nz = torch.nonzero(a > 0)
    if nz.numel() == 0:
        raise ValueError("crop_to_labels: the label map has no foreground voxel")
    lo = (nz.min(0).values - margin).clamp_min(0)
    hi = nz.max(0).values + margin + 1
    crop = a[tuple(slice(int(l), int(h)) for l, h in zip(lo, hi))].clone()
    origin = labels.grid.index_points_to_world(np.array(lo.tolist()[::-1], dtype=float))
    grid = Grid(tuple(reversed(crop.shape)), labels.grid.spacing, origin, labels.grid.direction)
    if factor == 1:
        return Image(crop, grid)
    coarse = grid.downsample(factor)
    return Image(sample_world(Image(crop, grid), coarse.world_points(dtype=torch.float64), mode="nearest"), coarse)


def intensity_from_labels(
    labels: Image,
    contrast_seed: int = 0,
    seed: int = 0,
    blur_mm: float = 1.0,
    noise: float = 0.03,
    bias: float = 0.2,
    bias_scale_mm: float = 60.0,
) -> Image:
    """An intensity image (float32, about [0, 1]) on the label map's grid.

    Args:
        labels: integer label map (``0`` is background and stays dark).
        contrast_seed: seeds the intensity of each label (same value -> same contrast).
        seed: seeds this image's noise and bias field.
        blur_mm: standard deviation of the partial-volume blur (mm).
        noise: standard deviation of the additive noise (fraction of the intensity range).
        bias: amplitude of the multiplicative bias field (0.2 -> intensities scaled by 0.8..1.2).
        bias_scale_mm: smoothness of the bias field (mm).
    """
    lab = labels.data[0].to(torch.int64)
    device = lab.device
    n = int(lab.max()) + 1
    gen = torch.Generator(device="cpu").manual_seed(contrast_seed)
    table = torch.rand(n, generator=gen, dtype=torch.float64) * 0.8 + 0.2
    table[0] = 0.0
    img = table.to(device=device, dtype=torch.float32)[lab][None]
    spacing = labels.grid.spacing
    if blur_mm > 0:
        img = gaussian_smooth(img, [blur_mm / sp for sp in reversed(spacing)])
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if bias > 0:
        coarse = [max(2, math.ceil(s * sp / bias_scale_mm) + 1) for s, sp in zip(labels.grid.size, spacing)]
        field = torch.randn(1, 1, *reversed(coarse), generator=gen)
        mode = "bilinear" if labels.ndim == 2 else "trilinear"
        field = torch.nn.functional.interpolate(field, size=labels.grid.shape, mode=mode, align_corners=True)[0]
        field = field / field.abs().max().clamp_min(1e-6)
        img = img * (1.0 + bias * field.to(device))
    if noise > 0:
        img = img + noise * torch.randn(img.shape, generator=gen).to(device)
    return Image(img.to(torch.float32), labels.grid)
