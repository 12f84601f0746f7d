"""Intensity normalisation applied before registration (the outputs keep original intensities)."""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["normalize_intensity"]


def normalize_intensity(
    data: torch.Tensor,
    mode: Literal["none", "minmax", "percentile"] = "percentile",
    percentiles: tuple[float, float] = (0.5, 99.5),
    max_samples: int = 1_000_000,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map intensities to about ``[0, 1]``.

    ``minmax`` uses the min and max; ``percentile`` clips to the given percentiles first (robust to
    a few hot voxels), estimated on at most ``max_samples`` evenly strided voxels. A constant image
    is returned as zeros.
    """
    if mode == "none":
        return data
    flat = data.detach().reshape(-1)
    if mode == "minmax":
        lo, hi = flat.min(), flat.max()
    elif mode == "percentile":
        step = max(1, flat.numel() // max_samples)
        sample = flat[::step].to(torch.float32)
        q = torch.tensor([percentiles[0] / 100, percentiles[1] / 100], dtype=sample.dtype, device=sample.device)
        lo, hi = torch.quantile(sample, q).to(data.dtype)
        if not hi > lo:
            lo, hi = flat.min(), flat.max()
    else:
        raise ValueError(f"unknown normalisation {mode!r}")
    if not hi > lo:
        return torch.zeros_like(data)
    out = (data - lo) / (hi - lo)
    return out.clamp(0.0, 1.0) if mode == "percentile" else out
