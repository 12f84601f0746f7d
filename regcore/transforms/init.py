"""Initialising linear transforms from image geometry or intensity moments."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import InputError
from ..image import Image
from .linear import LinearTransform

__all__ = ["center_of_mass", "image_center", "initialize_linear", "InitMode", "INITIALIZERS"]

InitMode = str  # a name of INITIALIZERS


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


def _centres_none(fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None):
    """The identity, rotating about the fixed image's centre."""
    centre = image_center(fixed)
    return centre, centre


def _centres_geometry(fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None):
    """The centres of the two voxel boxes."""
    return image_center(fixed), image_center(moving)


def _centres_moments(fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None):
    """The two centres of mass (within the masks)."""
    return center_of_mass(fixed, fixed_mask), center_of_mass(moving, moving_mask)


#: the initialisers by name: each gives (fixed centre, moving centre) in world mm
INITIALIZERS: dict[str, Callable[[Image, Image, Image | None, Image | None], tuple[np.ndarray, np.ndarray]]] = {
    "none": _centres_none,
    "geometry": _centres_geometry,
    "moments": _centres_moments,
}


def initialize_linear(
    transform: LinearTransform,
    fixed: Image,
    moving: Image,
    mode: InitMode = "geometry",
    fixed_mask: Image | None = None,
    moving_mask: Image | None = None,
) -> None:
    """Put the rotation centre at the fixed centre of the initialiser ``mode`` (one of
    :data:`INITIALIZERS`) and translate it onto the moving centre.

    ``geometry`` uses the centres of the voxel boxes, ``moments`` the centres of mass, ``none``
    keeps the identity but still centres the rotation on the fixed image.
    """
    if mode not in INITIALIZERS:
        raise InputError(f"unknown initialisation {mode!r}; use one of {', '.join(INITIALIZERS)}")
    cf, cm = INITIALIZERS[mode](fixed, moving, fixed_mask, moving_mask)
    transform.set_center(cf)
    transform.set_translation(cm - cf)
