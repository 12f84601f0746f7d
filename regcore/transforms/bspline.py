"""Cubic B-spline free-form deformation (FFD) on a regular control-point lattice.

``u(x) = sum_j c_j B(tau_x - j_x) B(tau_y - j_y) [B(tau_z - j_z)]`` where ``tau`` is the continuous
lattice index of the world point ``x``, ``B`` the cubic B-spline kernel (support ``[-2, 2]``) and
``c_j`` the coefficients, world displacement vectors in mm.

Lattice (see :func:`~regcore.transforms.deformable.control_lattice`): aligned with the fixed grid's
direction, node 0 on the first voxel centre, node ``m_k`` on the last one (spacing
``E_k / m_k`` mm, ``m_k = round(E_k / h_k)``), plus **one** extra node beyond each end, i.e.
``m_k + 3`` coefficients per axis. Every point of the image box then sees its full 4 x 4 (x 4)
neighbourhood of coefficients, so there are no edge artefacts: the spline reproduces constant and
linear coefficient fields exactly everywhere, borders included. Outside the box, lattice indices
are clamped to it (the field continues as a constant along the lattice axes, like border padding).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..grid import Grid
from .deformable import (
    DeformableTransform,
    _PlanCache,
    axis_maps,
    band_plan,
    banded_apply,
    control_lattice,
)

__all__ = ["BSplineTransform", "bspline_kernel"]


def bspline_kernel(d: torch.Tensor) -> torch.Tensor:
    """Cubic B-spline ``B(d)`` (``d`` in lattice units): ``(4 - 6 d^2 + 3 |d|^3) / 6`` for
    ``|d| < 1``, ``(2 - |d|)^3 / 6`` for ``1 <= |d| < 2``, else 0. Same shape and dtype as ``d``."""
    a = d.abs()
    inner = (4.0 - 6.0 * a * a + 3.0 * a * a * a) / 6.0
    outer = (2.0 - a).clamp(min=0.0) ** 3 / 6.0
    return torch.where(a < 1.0, inner, outer)


def _product_kernel(diffs: list[torch.Tensor]) -> torch.Tensor:
    out = bspline_kernel(diffs[0])
    for d in diffs[1:]:
        out = out * bspline_kernel(d)
    return out


class BSplineTransform(DeformableTransform):
    """Cubic B-spline FFD with coefficients in mm.

    Args:
        grid: the fixed image's full-resolution grid.
        control_spacing_mm: requested control-point spacing in mm, one number or ``(x, y[, z])``;
            rounded per axis so that the lattice spans the image box exactly (module docstring).
        dtype: parameter dtype.

    Attributes:
        lattice: the control lattice as a :class:`Grid` (``m + 3`` nodes per axis; lattice index 1
            is the first voxel centre of ``grid``).
        intervals: ``m`` per axis (ITK order).
        coefficients: parameter ``(D, *lattice.shape)``, world displacement components in mm.

    Evaluation on a grid whose index axes are parallel to the lattice's (same direction: ``grid``
    itself and every ``grid.downsample(f)``) is exact and separable: one ``(n_k, m_k + 3)``
    weight matrix per axis and ``u = W_z (W_y (c W_x^T))``. Any other grid, and arbitrary points
    (:meth:`displacement_at_points`), fall back to an exact gather over the ``4^D`` neighbouring
    coefficients of each point (memory ``O(D N)``, slower).
    """

    kind = "ffd"

    def __init__(
        self,
        grid: Grid,
        control_spacing_mm: float | Sequence[float] = 10.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(grid, dtype)
        self.lattice, self.intervals = control_lattice(grid, control_spacing_mm, pad=1)
        self.coefficients = nn.Parameter(torch.zeros((grid.ndim, *self.lattice.shape), dtype=dtype))
        self._cache = _PlanCache()

    # -- geometry --------------------------------------------------------------------------
    def control_points(self) -> torch.Tensor:
        """World positions (mm) of the control points, ``(*lattice.shape, D)``."""
        return self.lattice.world_points(self.coefficients.device, self.coefficients.dtype)

    def _weights(self, grid: Grid) -> list[torch.Tensor] | None:
        """Per-axis weight matrices ``(n_k, m_k + 3)`` (ITK order) for an aligned grid, else None."""
        maps = axis_maps(self.lattice, grid)
        if maps is None:
            return None
        dev, dt = self.coefficients.device, self.coefficients.dtype
        mats = []
        for k, (a, b) in enumerate(maps):
            i = torch.arange(grid.size[k], dtype=torch.float64, device=dev)
            tau = (a * i + b).clamp(1.0, 1.0 + self.intervals[k])
            j = torch.arange(self.lattice.size[k], dtype=torch.float64, device=dev)
            mats.append(bspline_kernel(tau[:, None] - j[None, :]).to(dt))
        return mats

    def _plan(self, grid: Grid | None = None, points: torch.Tensor | None = None):
        return band_plan(
            self.lattice,
            1,
            self.intervals,
            offsets=(-1, 0, 1, 2),
            keep=lambda mins: True,
            kernel=_product_kernel,
            dtype=self.coefficients.dtype,
            device=self.coefficients.device,
            target=grid,
            points=points,
        )

    # -- evaluation ------------------------------------------------------------------------
    def displacement(self, grid: Grid) -> torch.Tensor:
        """``u`` ``(D, *grid.shape)`` in mm at ``grid``'s voxel centres (exact; see class doc)."""
        c = self.coefficients
        mats = self._cache.get((grid, c.device, c.dtype), lambda: self._weights(grid))
        if mats is None:
            return banded_apply(c, self._plan(grid=grid))
        out = c @ mats[0].T  # contract x: (D, [Cz,] Cy, X)
        out = mats[1] @ out  # contract y: (D, [Cz,] Y, X)
        if self.dim == 3:
            d, cz, y, x = out.shape
            out = (mats[2] @ out.reshape(d, cz, y * x)).reshape(d, -1, y, x)  # contract z
        return out

    def regularization_grid(self, grid: Grid) -> Grid:
        """``grid``, or where ``grid`` is finer than half the control spacing a
        ``grid.downsample`` with about that spacing: the spline is a cubic polynomial between
        nodes, so second differences at half the control spacing resolve its bending energy,
        at a fraction of the cost of evaluating it on a fine pyramid level."""
        half = 0.5 * min(self.lattice.spacing)
        factor = half / max(grid.spacing)
        return grid.downsample(factor, min_size=4) if factor > 1.2 else grid

    def displacement_at_points(self, points: torch.Tensor) -> torch.Tensor:
        """Exact ``u`` at world points ``(..., D)`` (mm); returns ``(D, ...)`` mm."""
        return banded_apply(self.coefficients, self._plan(points=points))

    @torch.no_grad()
    def set_coefficients_from_function(self, fn) -> None:
        """Set each coefficient to ``fn(p)`` with ``p`` the control points ``(*lattice.shape, D)`` in
        mm (float64) and ``fn`` returning ``(*lattice.shape, D)`` mm. (A linear ``fn`` is reproduced
        exactly by the spline inside the image box.)"""
        p = self.lattice.world_points(self.coefficients.device, torch.float64)
        self.coefficients.copy_(torch.movedim(torch.as_tensor(fn(p)), -1, 0).to(self.coefficients))
