"""Intensity normalisation applied before registration (the outputs keep original intensities)."""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["normalize_intensity", "intensity_window", "apply_window"]


def intensity_window(
    data: torch.Tensor,
    mode: Literal["none", "minmax", "percentile"] = "percentile",
    percentiles: tuple[float, float] = (0.5, 99.5),
    max_samples: int = 1_000_000,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The ``(lo, hi)`` that :func:`normalize_intensity` maps to ``[0, 1]`` (``None`` for ``none``).

    ``minmax`` uses the min and max; ``percentile`` the given percentiles (robust to a few hot
    voxels), estimated on at most ``max_samples`` evenly strided voxels, falling back to min/max.
    """
    if mode == "none":
        return None
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
    return lo, hi


def apply_window(
    data: torch.Tensor, window: tuple[torch.Tensor, torch.Tensor] | None, mode: str = "percentile"
) -> torch.Tensor:
    """``(data - lo) / (hi - lo)``, clipped to ``[0, 1]`` for ``percentile``; zeros if ``hi <= lo``.

    Applying the window of a full-resolution image to its downsampled copies normalises a whole
    pyramid consistently (``register(..., fixed_levels=...)``).
    """
    if window is None or mode == "none":
        return data
    lo, hi = window
    if not hi > lo:
        return torch.zeros_like(data)
    out = (data - lo) / (hi - lo)
    return out.clamp(0.0, 1.0) if mode == "percentile" else out


def normalize_intensity(
    data: torch.Tensor,
    mode: Literal["none", "minmax", "percentile"] = "percentile",
    percentiles: tuple[float, float] = (0.5, 99.5),
    max_samples: int = 1_000_000,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Map intensities to about ``[0, 1]`` with :func:`intensity_window` and :func:`apply_window`.

    A constant image is returned as zeros. ``mask`` is accepted for API symmetry; the window is
    estimated on the whole image.
    """
    return apply_window(data, intensity_window(data, mode, percentiles, max_samples), mode)
