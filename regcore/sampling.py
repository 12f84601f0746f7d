"""Resampling images, label maps and displacement fields at world points (backward warping).

Every function here takes world points in mm (``(x, y, z)`` last) or a world-to-world mapping
and converts to the moving image's normalised coordinates through its :class:`Grid`; nothing
else in regcore calls :func:`torch.nn.functional.grid_sample`.
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .grid import Grid
from .image import Image

__all__ = [
    "sample_normalized",
    "sample_world",
    "inside_mask",
    "inside_weight",
    "ramp_weight",
    "linear_theta",
    "warp_linear",
    "warp_points_field",
    "resample_displacement",
    "stratified_indices",
    "interpolate_linear",
    "GRID_SAMPLE_MODES",
]

Mode = Literal["linear", "nearest"]
Padding = Literal["zeros", "border"]

GRID_SAMPLE_MODES = {"linear": "bilinear", "nearest": "nearest"}  # grid_sample's 'bilinear' is trilinear in 3D


def _torch_matrix(matrix: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(matrix, dtype=torch.float64, device=device)


def sample_normalized(
    data: torch.Tensor, coords: torch.Tensor, mode: Mode = "linear", padding: Padding = "zeros",
    deterministic: bool = False,
) -> torch.Tensor:
    """Sample ``data`` ``(C, *shape)`` at normalised coords ``(*out, D)``; returns ``(C, *out)``.

    Integer data (label maps) is sampled by nearest neighbour exactly (values below 2**24).
    ``deterministic``: linear interpolation by :func:`interpolate_linear` (``data`` is then not
    differentiated; the gradient with respect to ``coords`` needs no atomics on CUDA).
    """
    if mode not in GRID_SAMPLE_MODES:
        raise ValueError(f"unknown interpolation mode {mode!r}; use 'linear' or 'nearest'")
    out_shape = coords.shape[:-1]
    dim = coords.shape[-1]
    integer = not data.is_floating_point()
    if integer and mode != "nearest":
        raise ValueError("integer (label) data must be sampled with mode='nearest'")
    src = data.to(torch.float32) if integer else data
    grid = coords.to(src.dtype)
    if len(out_shape) == dim:  # a grid of points: (1, *out, D)
        grid = grid[None]
    else:  # any other point set: flatten to (1, 1, [1,] M, D)
        grid = grid.reshape(1, *([1] * (dim - 1)), -1, dim)
    if deterministic and mode == "linear" and not integer:
        out = interpolate_linear(src[None], grid, padding)[0]
    else:
        out = F.grid_sample(src[None], grid, mode=GRID_SAMPLE_MODES[mode], padding_mode=padding, align_corners=True)[0]
    out = out.reshape(data.shape[0], *out_shape)
    return out.round().to(data.dtype) if integer else out


def interpolate_linear(data: torch.Tensor, coords: torch.Tensor, padding: Padding = "zeros") -> torch.Tensor:
    """``grid_sample(data, coords, "bilinear", padding, align_corners=True)`` written out: the
    ``2^D`` corner values are gathered and weighted by the fractional coordinates, so that the
    gradient with respect to ``coords`` is elementwise (deterministic on CUDA, where
    ``grid_sample``'s backward accumulates with atomics). ``data`` is not differentiated.

    Args:
        data: ``(B, C, *in)`` (``B`` may be 1 for any number of coordinate sets).
        coords: ``(B', *out, D)`` normalised coordinates, ``(x, y[, z])`` last.
        padding: ``zeros`` or ``border``.

    Returns:
        ``(B', C, *out)``, equal to ``grid_sample``'s values and coordinate gradients.
    """
    d = coords.shape[-1]
    n = coords.shape[0]
    if data.shape[0] == 1 and n > 1:
        data = data.expand(n, *data.shape[1:])
    channels = data.shape[1]
    sizes = list(reversed(data.shape[2:]))  # (x, y[, z]) sizes
    size = torch.as_tensor(sizes, dtype=coords.dtype, device=coords.device)
    pos = (coords + 1) * 0.5 * (size - 1)
    if padding == "border":
        pos = torch.minimum(pos.clamp_min(0), size - 1)
    low = pos.detach().floor()
    frac = pos - low
    low = low.to(torch.int64)
    flat = data.detach().reshape(n, channels, -1)
    strides = [1]
    for k in range(1, d):
        strides.append(strides[-1] * sizes[k - 1])
    out_shape = coords.shape[1:-1]
    out = None
    for corner in range(2 ** d):
        weight = None
        index = None
        valid = None
        for k in range(d):
            up = (corner >> k) & 1
            i = low[..., k] + up
            w = frac[..., k] if up else 1 - frac[..., k]
            weight = w if weight is None else weight * w
            if padding == "zeros":
                inside = (i >= 0) & (i <= sizes[k] - 1)
                valid = inside if valid is None else valid & inside
            i = i.clamp(0, sizes[k] - 1) * strides[k]
            index = i if index is None else index + i
        values = flat.gather(2, index.reshape(n, 1, -1).expand(n, channels, -1)).reshape(n, channels, *out_shape)
        if valid is not None:
            weight = weight * valid.to(weight.dtype)
        term = weight[:, None] * values
        out = term if out is None else out + term
    return out


def sample_world(
    image: Image, points: torch.Tensor, mode: Mode = "linear", padding: Padding = "zeros"
) -> torch.Tensor:
    """Sample ``image`` at world points ``(*out, D)`` (mm); returns ``(C, *out)``."""
    w2n = _torch_matrix(image.grid.world_to_normalized(), points.device)
    d = image.ndim
    coords = points.to(torch.float64) @ w2n[:d, :d].T + w2n[:d, d]
    return sample_normalized(image.data, coords, mode, padding)


def inside_mask(coords: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """1 where normalised coords ``(*out, D)`` fall inside the sampled image, else 0: ``(*out,)``."""
    c = coords.detach()
    inside = c[..., 0].abs() <= 1 + tol
    for k in range(1, c.shape[-1]):
        inside &= c[..., k].abs() <= 1 + tol
    return inside.to(coords.dtype if coords.is_floating_point() else torch.float32)


def inside_weight(coords: torch.Tensor, size: Sequence[int], ramp_vox: float = 0.5) -> torch.Tensor:
    """Like :func:`inside_mask`, but falling linearly from 1 to 0 over the last ``ramp_vox`` voxels
    inside the sampled image's border (``size`` its grid size, ITK order): ``(*out,)``.

    A hard mask jumps when the fixed grid is parallel to the moving image's border (same scanner,
    same field of view): a whole plane of voxels enters or leaves the overlap for a shift of a
    fraction of a micron, and the similarity jumps with it. The ramp makes the overlap, and so the
    similarity, continuous in the transform. Like the hard mask, the weight is not differentiated
    (detached): following the overlap's change would reward transforms for the size of the
    overlap with some measures (NGF), as ITK's metrics also ignore it.
    """
    c = coords.detach()
    sizes = torch.as_tensor(list(size), dtype=c.dtype, device=c.device)
    return ramp_weight(c, sizes, ramp_vox).to(coords.dtype if coords.is_floating_point() else torch.float32)


def ramp_weight(coords: torch.Tensor, sizes: torch.Tensor, ramp_vox: float = 0.5) -> torch.Tensor:
    """The weight of :func:`inside_weight` for normalised coords ``(..., D)`` and grid sizes
    ``sizes`` (ITK order) broadcastable to them, e.g. ``(D,)`` or one row per pair: ``(...)``."""
    half = (sizes - 1).clamp_min(1) / (2.0 * ramp_vox)
    return ((1.0 - coords.abs()) * half + 1e-4).clamp(0.0, 1.0).prod(-1)


def linear_theta(fixed: Grid, moving: Grid, world_matrix: torch.Tensor) -> torch.Tensor:
    """The ``(D, D+1)`` matrix for :func:`F.affine_grid` that samples ``moving`` on ``fixed``.

    ``world_matrix`` ``(D+1, D+1)`` maps fixed world points to moving world points (mm); the result
    maps fixed normalised coords to moving normalised coords (float64, differentiable).
    """
    dev = world_matrix.device
    chain = _torch_matrix(moving.world_to_normalized(), dev) @ world_matrix.to(torch.float64) @ _torch_matrix(
        fixed.normalized_to_world(), dev
    )
    return chain[:-1]


def linear_coords(fixed: Grid, moving: Grid, world_matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Moving normalised coords ``(*fixed.shape, D)`` of each fixed voxel under a linear map."""
    theta = linear_theta(fixed, moving, world_matrix).to(dtype)
    return F.affine_grid(theta[None], [1, 1, *fixed.shape], align_corners=True)[0]


def warp_linear(
    moving: Image,
    fixed: Grid,
    world_matrix: torch.Tensor | np.ndarray,
    mode: Mode = "linear",
    padding: Padding = "zeros",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward-warp ``moving`` onto ``fixed`` with a linear world map ``x -> M x`` (mm).

    Returns ``(warped (C, *fixed.shape), inside (*fixed.shape))`` where ``inside`` is 1 for fixed
    voxels whose mapped point lies within the moving image.
    """
    mat = torch.as_tensor(world_matrix, dtype=torch.float64, device=moving.device)
    dtype = moving.dtype if moving.data.is_floating_point() else torch.float32
    coords = linear_coords(fixed, moving.grid, mat, dtype)
    return sample_normalized(moving.data, coords, mode, padding), inside_mask(coords)


def warp_points_field(points: torch.Tensor, displacement: Image) -> torch.Tensor:
    """Map world points ``(..., D)`` through ``x -> x + u(x)``, ``u`` a displacement field (mm).

    ``u`` is linearly interpolated (border-clamped outside its grid).
    """
    u = sample_world(displacement, points.to(displacement.dtype), mode="linear", padding="border")
    return points + torch.movedim(u, 0, -1).to(points.dtype)


def resample_displacement(displacement: Image, grid: Grid) -> Image:
    """Resample a displacement field (mm, world components) onto another grid (mm stay mm)."""
    pts = grid.world_points(displacement.device, displacement.dtype)
    return Image(sample_world(displacement, pts, mode="linear", padding="border"), grid)


def stratified_indices(num_voxels: int, num_samples: int, seed: int, device: torch.device) -> torch.Tensor:
    """Stratified random subset of voxel indices, deterministic for a given ``seed``.

    The flattened voxel order is cut into ``num_samples`` consecutive blocks of (nearly) equal
    size and one voxel is drawn uniformly from each, with a CPU ``torch.Generator`` seeded by
    ``seed``. The subset has no repeats, every voxel has inclusion probability ~``n / V``, the
    samples are spread over the whole image, and the cost is O(``num_samples``) (a full
    ``randperm`` of a large volume would cost more than the measure itself).

    Returns:
        ``(num_samples,)`` int64 indices on ``device``, increasing.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    bounds = torch.arange(num_samples + 1, dtype=torch.int64) * num_voxels // num_samples
    start, size = bounds[:-1], bounds[1:] - bounds[:-1]
    u = torch.rand(num_samples, generator=generator, dtype=torch.float64)
    offset = torch.minimum((u * size).to(torch.int64), size - 1)
    return (start + offset).to(device)
