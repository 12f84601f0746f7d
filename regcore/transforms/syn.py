"""Symmetric diffeomorphic normalisation (SyN): two half maps that meet at a midpoint.

The transform holds two dense displacement fields on a common grid (the *midpoint* space, which
coincides with the fixed image's box): ``to_fixed`` maps a midpoint point to the fixed image,
``to_moving`` to the moving image (mm, components ``(x, y[, z])``)::

    phi_f(m) = m + to_fixed(m),     phi_m(m) = m + to_moving(m).

The fixed -> moving map is ``T = phi_m o phi_f^{-1}`` and its inverse ``phi_f o phi_m^{-1}``; the
half-map inverses are computed by fixed-point iteration and Newton steps (:func:`regcore.fields.invert_displacement`).
Both halves carry half of the deformation, so neither image is favoured (Avants et al. 2008,
"Symmetric diffeomorphic image registration with cross-correlation"). The fields are fitted by
the greedy optimiser of :mod:`regcore.greedy` (``optimizer: greedy``), which keeps each half a
composition of small smoothed steps; zero fields are the identity exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..fields import FieldSampler, invert_displacement, resize_field
from ..grid import Grid
from ..image import Image
from ..sampling import sample_world
from .deformable import DeformableTransform

__all__ = ["SymmetricDiffeomorphism"]


class SymmetricDiffeomorphism(DeformableTransform):
    """``T = (id + to_moving) o (id + to_fixed)^{-1}`` (fixed world -> moving world, mm).

    Args:
        grid: the fixed image's full-resolution grid (the midpoint space's box).
        inverse_iterations: fixed-point iterations (at most) to invert a half map, before the
            Newton steps of :func:`regcore.fields.invert_displacement`.
        inverse_tol_vox: the largest residual ``|v + u(y + v)|`` left at any voxel by the
            inversion of a half map (voxels); 0.01 voxel keeps the composed map free of the folds
            that an unconverged inverse makes.
        dtype: parameter dtype.

    Attributes:
        to_fixed, to_moving: ``(D, *field_grid.shape)`` mm; ``field_grid`` is the current
            pyramid level's grid (:meth:`set_level` resamples both, mm stay mm).
    """

    kind = "syn"

    def __init__(self, grid: Grid, inverse_iterations: int = 20, inverse_tol_vox: float = 0.01,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(grid, dtype)
        if int(inverse_iterations) != inverse_iterations or inverse_iterations < 1:
            raise InputError(f"syn inverse_iterations must be a positive integer, got {inverse_iterations!r}")
        if not inverse_tol_vox > 0:
            raise InputError(f"syn inverse_tol_vox must be positive, got {inverse_tol_vox!r}")
        self.inverse_iterations = int(inverse_iterations)
        self.inverse_tol_vox = float(inverse_tol_vox)
        self.field_grid = grid
        self.param_dtype = dtype
        self.to_fixed = nn.Parameter(torch.zeros((grid.ndim, *grid.shape), dtype=dtype))
        self.to_moving = nn.Parameter(torch.zeros((grid.ndim, *grid.shape), dtype=dtype))

    # -- state -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_level(self, grid: Grid) -> None:
        """Move both half fields onto ``grid`` (a pyramid level of the same box)."""
        if grid.same_as(self.field_grid):
            return
        self.to_fixed = nn.Parameter(resize_field(self.to_fixed.detach(), self.field_grid, grid).contiguous())
        self.to_moving = nn.Parameter(resize_field(self.to_moving.detach(), self.field_grid, grid).contiguous())
        self.field_grid = grid

    @torch.no_grad()
    def set_halves(self, to_fixed: torch.Tensor, to_moving: torch.Tensor) -> None:
        """Replace both half fields (``(D, *field_grid.shape)`` mm each). The tensors are taken
        over, not copied (the greedy optimiser hands over the fields it fitted)."""
        shape = (self.dim, *self.field_grid.shape)
        if tuple(to_fixed.shape) != shape or tuple(to_moving.shape) != shape:
            raise InputError(f"syn half fields must be {shape}, got {tuple(to_fixed.shape)} and {tuple(to_moving.shape)}")
        self.to_fixed = nn.Parameter(to_fixed.detach().to(self.param_dtype))
        self.to_moving = nn.Parameter(to_moving.detach().to(self.param_dtype))

    def release_halves(self) -> None:
        """Drop both half fields (to be replaced by :meth:`set_halves`): a pyramid level that fits
        its own copies need not hold the transform's too (two dense fields at 1 mm: 170 MB).
        Until then the transform maps nothing; a level that fails the pair leaves it so, and
        the pair is reported failed, not returned."""
        if self.to_fixed is not None:
            self.param_dtype = self.to_fixed.dtype
        self.to_fixed = self.to_moving = None

    # -- maps ------------------------------------------------------------------------------
    def _through(self, first_inverse_of: torch.Tensor, then: torch.Tensor) -> torch.Tensor:
        """``(id + then) o (id + first_inverse_of)^{-1}`` on ``field_grid``, ``(D, *shape)`` mm."""
        grid = self.field_grid
        inverse = invert_displacement(first_inverse_of, grid, self.inverse_iterations, self.inverse_tol_vox)
        sampler = FieldSampler(grid, grid, device=inverse.device, dtype=inverse.dtype)
        return sampler.sample(then, inverse, padding="border")[0].add_(inverse)

    def displacement(self, grid: Grid) -> torch.Tensor:
        """``T(x) - x`` on ``grid``, ``(D, *grid.shape)`` mm (differentiable in both halves)."""
        return resize_field(self._through(self.to_fixed, self.to_moving), self.field_grid, grid)

    def inverse_displacement(self, grid: Grid) -> torch.Tensor:
        """``T^{-1}(y) - y`` (moving -> fixed) on ``grid``, ``(D, *grid.shape)`` mm."""
        return resize_field(self._through(self.to_moving, self.to_fixed), self.field_grid, grid)

    def displacement_at_points(self, points: torch.Tensor) -> torch.Tensor:
        """``T(x) - x`` at world points ``(..., D)``, linearly interpolated; ``(D, ...)`` mm."""
        u = self._through(self.to_fixed, self.to_moving)
        return sample_world(Image(u, self.field_grid), points.to(u.dtype), mode="linear", padding="border")

    def midpoint_fields(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The half fields ``(to_fixed, to_moving)`` on ``field_grid`` (detached)."""
        return self.to_fixed.detach(), self.to_moving.detach()
