"""One pyramid level's data and how moving is warped onto it: by a linear map (a batch of pairs
that share the fixed image), or by a deformable displacement followed by a (fixed) linear map.
Both return ``(fixed, warped, mask)`` batched alike, ready for the similarity terms."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .image import Image
from .losses.modules import LOSSES
from .moving_stack import MovingStack
from .sampling import inside_mask, sample_normalized, stratified_indices

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
    """Warping a batch of moving images, each by its own linear map ``fixed world -> moving world``.

    The pairs share the fixed image; the moving images (and their optional masks) are held in a
    :class:`~regcore.moving_stack.MovingStack`, so one ``grid_sample`` warps them all. With
    ``max_voxels`` set and a larger fixed image, only a seeded stratified subset of fixed voxels
    is used (for pointwise measures); tensors are then ``(B, 1, [1,] 1, M)``. The moving images are
    border-replicated outside their boxes; with ``overlap_only`` the mask (a ramp half a voxel wide
    at each moving image's border) keeps only the fixed points that map inside it.
    ``deterministic``: the warp's gradient without ``grid_sample``'s atomics (see
    :func:`regcore.sampling.interpolate_linear`).
    """

    def __init__(self, fixed: Image, movings: Sequence[Image], fixed_mask: Image | None,
                 moving_masks: Sequence[Image | None], mode: str, max_voxels: int | None, seed: int,
                 overlap_only: bool = True, deterministic: bool = False) -> None:
        self.grid, self.mode, self.overlap_only, self.deterministic = fixed.grid, mode, overlap_only, deterministic
        self.stack = MovingStack(movings)
        self.mask_stack = (MovingStack(moving_masks, [m.grid for m in movings])
                           if any(m is not None for m in moving_masks) else None)
        dev = fixed.device
        self.world_to_normalized = torch.stack([torch.as_tensor(m.grid.world_to_normalized(), dtype=torch.float64, device=dev)
                                                for m in movings])  # (B, D+1, D+1)
        self.normalized_to_world = torch.as_tensor(fixed.grid.normalized_to_world(), dtype=torch.float64, device=dev)
        d = fixed.ndim
        if max_voxels is not None and fixed.grid.numel > max_voxels:
            idx = stratified_indices(fixed.grid.numel, max_voxels, seed, dev)
            index, rest = [], idx
            for size in reversed(fixed.grid.shape):  # unravel (z, y, x) order into (x, y, z) indices
                index.append(rest % size)
                rest = rest // size
            n = torch.as_tensor(fixed.grid.index_to_normalized(), device=dev)
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

    def warp(self, matrices: torch.Tensor, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(fixed (1, 1, *s), warped (B', 1, *s), mask (B', 1, *s))`` for the pairs ``index`` (rows
        of the stack) and their fixed -> moving world matrices ``(B', D+1, D+1)``."""
        d = self.grid.ndim
        w2n = self.world_to_normalized[list(index)] if len(index) != len(self.stack) else self.world_to_normalized
        theta = (w2n @ matrices.to(torch.float64) @ self.normalized_to_world)[:, :d]  # (B', D, D+1)
        n = theta.shape[0]
        shape = self.fixed.shape[1:]
        if self.points is None:
            coords = F.affine_grid(theta.to(self.fixed.dtype), [n, 1, *self.grid.shape], align_corners=True)
        else:
            coords = (self.points @ theta[:, :, :d].transpose(1, 2) + theta[:, None, :, d]).to(self.fixed.dtype)
            coords = coords.reshape(n, *shape[1:], d)
        warped = self.stack.sample(coords, index, self.mode, padding="border", deterministic=self.deterministic)
        # a ramp at the moving image's border keeps the overlap continuous in the transform
        mask = (self.stack.inside_weight(coords, index) if self.overlap_only
                else torch.ones_like(coords[..., 0]))[:, None]
        if self.mask_stack is not None:
            mask = mask * self.mask_stack.sample(coords.detach(), index)
        if self.fixed_mask is not None:
            mask = mask * self.fixed_mask
        return self.fixed, warped, mask


class DeformableLevel:
    """Warping by ``x -> M (x + u(x))``: a displacement ``u`` (mm, on the level grid) then the
    fixed linear map ``M`` of the previous stages."""

    def __init__(self, fixed: Image, moving: Image, fixed_mask: Image | None, moving_mask: Image | None,
                 mode: str, matrix: torch.Tensor, deterministic: bool = False) -> None:
        self.grid, self.moving, self.moving_mask, self.mode = fixed.grid, moving, moving_mask, mode
        self.deterministic = deterministic
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
        warped = sample_normalized(self.moving.data, coords, self.mode, deterministic=self.deterministic).reshape(shape)
        return self.fixed, warped, _masked(inside_mask(coords), self.moving_mask, self.fixed_mask, coords, shape)
