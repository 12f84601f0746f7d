"""Initialising linear transforms from image geometry or intensity moments."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from ..errors import InputError
from ..image import Image
from .linear import LinearTransform

__all__ = ["center_of_mass", "image_center", "initialize_linear", "InitMode"]

InitMode = Literal["none", "geometry", "moments"]


def image_center(image: Image) -> np.ndarray:
    """World position (mm) of the centre of the image's voxel box, ``(D,)``."""
    return image.grid.center()


def center_of_mass(image: Image, mask: Image | None = None) -> np.ndarray:
    """Intensity-weighted centroid (mm, world), ``(D,)``.

    Weights are intensities minus the image minimum (so CT in HU works), times ``mask`` if given.
    """
    data = image.data[0].detach().to(torch.float64)
    w = data - data.min()
    if mask is not None:
        w = w * (mask.data[0].to(w.device) > 0)
    total = w.sum()
    if not total > 0:
        raise InputError("centre of mass is undefined for a constant (or fully masked) image")
    # the centroid's continuous index from the weight's marginal along each axis (no per-voxel
    # world coordinates), then mapped to world mm
    nd = image.ndim
    index = []
    for axis in range(nd):  # ITK axis k is tensor dim nd - 1 - k
        dim = nd - 1 - axis
        marginal = w.sum(dim=tuple(d for d in range(nd) if d != dim))
        index.append(float((marginal * torch.arange(marginal.numel(), dtype=w.dtype, device=w.device)).sum() / total))
    return np.asarray(image.grid.index_points_to_world(np.asarray(index)), dtype=np.float64)


def initialize_linear(
    transform: LinearTransform,
    fixed: Image,
    moving: Image,
    mode: InitMode = "geometry",
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
) -> None:
    """Put the rotation centre at the fixed image's centre and translate it onto the moving one.

    ``geometry`` uses the centres of the voxel boxes, ``moments`` the centres of mass, ``none``
    keeps the identity but still centres the rotation on the fixed image.
    """
    if mode == "moments":
        cf, cm = center_of_mass(fixed, fixed_mask), center_of_mass(moving, moving_mask)
    elif mode == "geometry":
        cf, cm = image_center(fixed), image_center(moving)
    elif mode == "none":
        cf = image_center(fixed)
        cm = cf
    else:
        raise InputError(f"unknown initialisation {mode!r}; use 'none', 'geometry' or 'moments'")
    transform.set_center(cf)
    transform.set_translation(cm - cf)
