"""Multi-resolution pyramids: Gaussian smoothing then resampling on a coarser grid (same box)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from .grid import Grid
from .image import Image

__all__ = ["gaussian_kernel1d", "gaussian_smooth", "downsample", "build_pyramid"]


def gaussian_kernel1d(sigma: float, truncate: float = 3.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1D Gaussian of standard deviation ``sigma`` (voxels), radius ``ceil(truncate*sigma)``."""
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_smooth(data: torch.Tensor, sigma: Sequence[float]) -> torch.Tensor:
    """Separable Gaussian smoothing of ``data`` ``(C, *shape)``; ``sigma`` in voxels per tensor
    dim (``(z, y, x)`` order). Borders are replicated. Axes with sigma <= 0 are left alone."""
    out = data[:, None]  # (C, 1, *shape): channels as batch
    nd = data.dim() - 1
    for axis, s in enumerate(sigma):
        if s <= 0:
            continue
        k = gaussian_kernel1d(s, dtype=data.dtype, device=data.device)
        r = (k.numel() - 1) // 2
        if data.shape[1 + axis] <= r:  # too short to pad reflectively: shrink the kernel
            r = data.shape[1 + axis] - 1
            if r < 1:
                continue
            k = gaussian_kernel1d(s, truncate=r / s, dtype=data.dtype, device=data.device)
        shape = [1, 1] + [1] * nd
        shape[2 + axis] = k.numel()
        pad = [0, 0] * nd
        pad[2 * (nd - 1 - axis)] = r
        pad[2 * (nd - 1 - axis) + 1] = r
        conv = F.conv2d if nd == 2 else F.conv3d
        out = conv(F.pad(out, pad, mode="replicate"), k.reshape(shape))
    return out[:, 0]


def downsample(image: Image, factor: float, min_size: int = 8) -> Image:
    """Smooth (sigma = half the spacing ratio, per axis) and resample onto ``grid.downsample``."""
    if factor == 1:
        return image
    grid: Grid = image.grid.downsample(factor, min_size)
    ratio = [new / old for new, old in zip(grid.spacing, image.grid.spacing)]
    sigma = [0.5 * r if r > 1 else 0.0 for r in reversed(ratio)]  # tensor order
    data = image.data if image.data.is_floating_point() else image.data.float()
    smooth = gaussian_smooth(data, sigma)
    mode = "bilinear" if image.ndim == 2 else "trilinear"
    out = F.interpolate(smooth[None], size=grid.shape, mode=mode, align_corners=True)[0]
    return Image(out, grid)


def build_pyramid(image: Image, factors: Sequence[float], min_size: int = 8) -> list[Image]:
    """Images for each downsampling factor, in the order given (coarse first, usually)."""
    return [downsample(image, f, min_size) for f in factors]
