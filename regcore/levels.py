"""One pyramid level's data and how moving is warped onto it: by a linear map, or by a
deformable displacement followed by a (fixed) linear map. Both return ``(fixed, warped, mask)``
batched alike, ready for the similarity terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .image import Image
from .losses.modules import LOSSES
from .sampling import inside_mask, inside_weight, linear_theta, sample_normalized, stratified_indices

__all__ = ["LinearLevel", "DeformableLevel", "POINTWISE_MEASURES"]

#: Measures that compare voxel by voxel, so they can be evaluated on a subset of fixed voxels
#: (the loss registry's ``pointwise`` capability).
POINTWISE_MEASURES = frozenset(name for name, cls in LOSSES.items() if cls.pointwise)


def _masked(overlap: torch.Tensor, moving_mask: Image | None, fixed_mask: torch.Tensor | None, coords: torch.Tensor, shape) -> torch.Tensor:
    mask = overlap.reshape(shape)
    if moving_mask is not None:
        mask = mask * sample_normalized(moving_mask.data, coords.detach()).reshape(shape)
    if fixed_mask is not None:
        mask = mask * fixed_mask
    return mask


class LinearLevel:
    """Warping by a linear map ``fixed world -> moving world``.

    With ``max_voxels`` set and a larger fixed image, only a seeded stratified subset of fixed
    voxels is used (for pointwise measures); tensors are then ``(1, 1, [1,] M)``. The moving image
    is border-replicated outside its box; with ``overlap_only`` the mask (a ramp half a voxel wide
    at the moving image's border) keeps only the fixed points that map inside it.
    """

    def __init__(self, fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None,
                 mode: str, max_voxels: int | None, seed: int, overlap_only: bool = True) -> None:
        self.grid, self.moving, self.moving_mask, self.mode = fixed.grid, moving, moving_mask, mode
        self.overlap_only = overlap_only
        d = fixed.ndim
        if max_voxels is not None and fixed.grid.numel > max_voxels:
            idx = stratified_indices(fixed.grid.numel, max_voxels, seed, fixed.device)
            index, rest = [], idx
            for size in reversed(fixed.grid.shape):  # unravel (z, y, x) order into (x, y, z) indices
                index.append(rest % size)
                rest = rest // size
            n = torch.as_tensor(fixed.grid.index_to_normalized(), device=fixed.device)
            self.points: torch.Tensor | None = torch.stack(index, -1).double() @ n[:d, :d].T + n[:d, d]
            shape = (1, 1, *([1] * (d - 1)), max_voxels)
            self.fixed = fixed.data.reshape(-1)[idx].reshape(shape)
            self.fixed_mask = None if fixed_mask is None else fixed_mask.data.reshape(-1)[idx].reshape(shape)
            self.voxels = max_voxels
        else:
            self.points = None
            self.fixed = fixed.batch()
            self.fixed_mask = None if fixed_mask is None else fixed_mask.batch()
            self.voxels = fixed.grid.numel

    def warp(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(fixed, warped moving, mask)`` for a fixed -> moving world matrix ``(D+1, D+1)``."""
        theta = linear_theta(self.grid, self.moving.grid, matrix)
        d = self.grid.ndim
        if self.points is None:
            coords = F.affine_grid(theta.to(self.fixed.dtype)[None], [1, 1, *self.grid.shape], align_corners=True)[0]
        else:
            coords = (self.points @ theta[:, :d].T + theta[:, d]).to(self.fixed.dtype)
        shape = self.fixed.shape
        warped = sample_normalized(self.moving.data, coords, self.mode, padding="border").reshape(shape)
        # a ramp at the moving image's border keeps the overlap continuous in the transform
        overlap = inside_weight(coords, self.moving.grid.size) if self.overlap_only else torch.ones_like(coords[..., 0])
        return self.fixed, warped, _masked(overlap, self.moving_mask, self.fixed_mask, coords, shape)


class DeformableLevel:
    """Warping by ``x -> M (x + u(x))``: a displacement ``u`` (mm, on the level grid) then the
    fixed linear map ``M`` of the previous stages."""

    def __init__(self, fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None,
                 mode: str, matrix: torch.Tensor) -> None:
        self.grid, self.moving, self.moving_mask, self.mode = fixed.grid, moving, moving_mask, mode
        self.fixed = fixed.batch()
        self.fixed_mask = None if fixed_mask is None else fixed_mask.batch()
        self.points = fixed.grid.world_points(device=fixed.device, dtype=fixed.dtype)  # (*shape, D)
        w2n = torch.as_tensor(moving.grid.world_to_normalized(), dtype=torch.float64, device=fixed.device)
        self.chain = (w2n @ matrix.detach().to(torch.float64)).to(fixed.dtype)  # world (fixed side) -> moving normalised
        self.voxels = fixed.grid.numel

    def warp(self, displacement: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(fixed, warped moving, mask)`` for a displacement ``(D, *shape)`` in world mm."""
        d = self.grid.ndim
        pts = self.points + torch.movedim(displacement, 0, -1)
        coords = pts @ self.chain[:d, :d].T + self.chain[:d, d]
        shape = self.fixed.shape
        warped = sample_normalized(self.moving.data, coords, self.mode).reshape(shape)
        return self.fixed, warped, _masked(inside_mask(coords), self.moving_mask, self.fixed_mask, coords, shape)
