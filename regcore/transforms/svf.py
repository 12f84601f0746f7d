"""Stationary velocity field (SVF): diffeomorphic displacements by scaling and squaring.

The parameter is a velocity field ``v`` ``(D, *velocity_grid.shape)`` in world mm. The transform is
its group exponential ``phi = exp(v)``, computed on ``velocity_grid`` by scaling and squaring::

    u_0 = v / 2^N,     u_{k+1}(x) = u_k(x) + u_k(x + u_k(x))     (k = 0 .. N-1),

so that ``phi(x) = x + u_N(x)``. Each composition interpolates ``u_k`` linearly at the displaced
world points (border padding). The inverse is ``exp(-v)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from ..grid import Grid
from ..image import Image
from ..sampling import sample_world
from .deformable import (
    DeformableTransform,
    _compose_on,
    _world_to_normalized_linear,
    identity_normalized,
    resample_field,
)

__all__ = ["StationaryVelocityField", "velocity_grid"]

#: Bounds on the automatic number of squaring steps.
MIN_STEPS, MAX_STEPS = 6, 12


class StationaryVelocityField(DeformableTransform):
    """Diffeomorphic transform ``x -> exp(v)(x)`` parameterised by a stationary velocity (mm).

    Args:
        grid: the fixed image's full-resolution grid.
        control_grid: the grid on which the velocity lives and the exponential is computed
            (``velocity_grid``); default ``grid``. It may be coarser, e.g. ``grid.downsample(2)``,
            and then :meth:`displacement` resamples ``exp(v)`` linearly onto the requested grid.
        steps: number ``N`` of squaring steps; ``None`` chooses it on every evaluation as the
            smallest ``N`` with ``max_x |v(x)| / 2^N <= 0.5 * min(velocity_grid.spacing)`` (the
            first step moves points at most half a voxel), clamped to ``[6, 12]`` (at least 6
            because the error of ``exp(v / 2^N) ~ id + v / 2^N`` also grows with the field's
            gradient, not only its size); computed without gradient (a device synchronisation on
            GPU).
        dtype: parameter dtype.

    Attributes:
        velocity: parameter ``(D, *velocity_grid.shape)``, world mm.

    :meth:`set_level` does nothing: the velocity stays on ``velocity_grid`` at every level.
    """

    kind = "svf"

    def __init__(
        self,
        grid: Grid,
        control_grid: Grid | None = None,
        steps: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(grid, dtype)
        vgrid = grid if control_grid is None else control_grid
        if vgrid.ndim != grid.ndim:
            raise InputError(f"SVF control grid is {vgrid.ndim}D but the image grid is {grid.ndim}D")
        if steps is not None and (int(steps) != steps or steps < 0):
            raise InputError(f"SVF steps must be a non-negative integer or None, got {steps!r}")
        self.velocity_grid = vgrid
        self.steps = None if steps is None else int(steps)
        self.velocity = nn.Parameter(torch.zeros((grid.ndim, *vgrid.shape), dtype=dtype))

    @classmethod
    def from_config(cls, grid: Grid, control_spacing_mm: float | None = None, control_factor: float | None = None,
                    steps: int | None = None) -> "StationaryVelocityField":
        """The SVF for the fixed ``grid`` with its velocity on a grid of about
        ``control_spacing_mm`` between nodes (:func:`velocity_grid`), or on ``grid`` downsampled by
        ``control_factor``, or on ``grid`` itself."""
        if control_spacing_mm is not None and control_factor is not None:
            raise InputError("svf: give control_spacing_mm or control_factor, not both")
        control = None
        if control_factor is not None:
            control = grid.downsample(float(control_factor), min_size=4)
        if control_spacing_mm is not None:
            control = velocity_grid(grid, float(control_spacing_mm))
        return cls(grid, control_grid=control, steps=steps)

    # -- exponential -----------------------------------------------------------------------
    def num_steps(self, velocity: torch.Tensor | None = None) -> int:
        """Number of squaring steps for ``velocity`` (default the parameter); see class doc."""
        if self.steps is not None:
            return self.steps
        v = self.velocity if velocity is None else velocity
        with torch.no_grad():
            vmax = float(torch.linalg.vector_norm(v.detach(), dim=0).max()) if v.numel() else 0.0
        if not math.isfinite(vmax):
            return MAX_STEPS
        limit = 0.5 * min(self.velocity_grid.spacing)
        n = math.ceil(math.log2(vmax / limit)) if vmax > limit else 0
        return int(min(MAX_STEPS, max(MIN_STEPS, n)))

    def exponential(self, velocity: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """Displacement of ``exp(velocity)`` on ``velocity_grid``: ``(D, *velocity_grid.shape)`` mm.

        ``velocity`` is ``(D, *velocity_grid.shape)`` in mm; ``steps`` defaults to
        :meth:`num_steps` of it. Differentiable w.r.t. ``velocity``.
        """
        n = self.num_steps(velocity) if steps is None else int(steps)
        grid = self.velocity_grid
        base = identity_normalized(grid, velocity.device, velocity.dtype)
        w2n = _world_to_normalized_linear(grid, velocity.device, velocity.dtype)
        u = velocity / (2.0**n)
        for _ in range(n):
            u = _compose_on(u, u, base, w2n)
        return u

    # -- API -------------------------------------------------------------------------------
    def displacement(self, grid: Grid) -> torch.Tensor:
        """``exp(v)`` as a displacement ``(D, *grid.shape)`` (mm), linearly resampled onto ``grid``."""
        return resample_field(self.exponential(self.velocity), self.velocity_grid, grid)

    def inverse_displacement(self, grid: Grid) -> torch.Tensor:
        """``exp(-v)``, the inverse transform's displacement ``(D, *grid.shape)`` (mm) on ``grid``."""
        return resample_field(self.exponential(-self.velocity), self.velocity_grid, grid)

    def displacement_at_points(self, points: torch.Tensor) -> torch.Tensor:
        """``exp(v)`` at world points ``(..., D)`` (mm), linearly interpolated; returns ``(D, ...)``."""
        u = self.exponential(self.velocity)
        return sample_world(Image(u, self.velocity_grid), points.to(u.dtype), mode="linear", padding="border")

    def regularization_field(self, grid: Grid) -> torch.Tensor:
        """The velocity ``v`` ``(D, *grid.shape)`` (mm) resampled onto ``grid``."""
        return resample_field(self.velocity, self.velocity_grid, grid)

    def regularization_grid(self, grid: Grid) -> Grid:
        """``velocity_grid``: the velocity is regularised where it lives (no resampling)."""
        return self.velocity_grid


def velocity_grid(grid: Grid, spacing_mm: float, min_size: int = 4) -> Grid:
    """A grid over ``grid``'s box (same first and last voxel centres, same direction) with about
    ``spacing_mm`` between nodes (never finer than ``grid``, at least ``min_size`` nodes per axis
    unless ``grid`` has fewer): the velocity grid of an SVF, independent of the image resolution."""
    if not spacing_mm > 0:
        raise InputError(f"svf control_spacing_mm must be positive, got {spacing_mm}")
    size, spacing = [], []
    for n, sp in zip(grid.size, grid.spacing):
        extent = (n - 1) * sp
        m = min(n, max(min(n, min_size), int(round(extent / spacing_mm)) + 1))
        size.append(m)
        spacing.append(extent / (m - 1) if m > 1 else sp)
    return Grid(tuple(size), tuple(spacing), grid.origin, grid.direction)
