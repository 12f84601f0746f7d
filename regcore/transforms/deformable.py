"""Deformable (non-linear) transforms: the common base class, dense fields and shared machinery.

Every deformable transform maps **fixed** world points to **moving** world points (mm) by
backward warping::

    T(x) = x + u(x)

where the displacement ``u`` is a tensor ``(D, *grid.shape)`` whose channels are the world
``(x, y[, z])`` components in millimetres (see :mod:`regcore.grid`). A transform is built on the
fixed image's full-resolution :class:`~regcore.grid.Grid` (``self.grid``) and evaluates ``u`` on
any grid, in particular on the pyramid levels ``grid.downsample(f)`` (same box, same direction).

This module holds:

* :class:`DeformableTransform` -- the base API (``displacement``, ``regularization_field``,
  ``set_level``, ``displacement_at_points``, ``forward``);
* :class:`DenseDisplacement` -- one free displacement vector per voxel;
* :func:`compose_displacements` -- ``w(x) = first(x) + second(x + first(x))``;
* the control-lattice geometry and the banded-kernel evaluator shared by the B-spline
  (:mod:`.bspline`) and Wendland (:mod:`.wendland`) transforms.

The names of all transforms, linear and deformable, are in :mod:`.registry`.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..grid import Grid
from ..image import Image
from ..sampling import resample_displacement, sample_normalized, sample_world
from .base import Transform

__all__ = [
    "DeformableTransform",
    "DenseDisplacement",
    "compose_displacements",
    "control_lattice",
]

#: Largest error (in lattice units, summed over the grid's extent) that the off-diagonal part of
#: the target-index -> lattice-index map may cause before a grid is treated as *not* aligned with
#: a control lattice (see :func:`axis_maps`).
_ALIGN_TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# small geometric helpers
# ---------------------------------------------------------------------------------------------
def identity_normalized(grid: Grid, device: torch.device | str | None, dtype: torch.dtype) -> torch.Tensor:
    """``align_corners=True`` normalised coordinates of every voxel of ``grid``: ``(*shape, D)``.

    The last axis is ordered ``(x, y[, z])``; an axis of size 1 gets 0 (see :mod:`regcore.grid`).
    """
    axes = [
        torch.linspace(-1.0, 1.0, s, dtype=torch.float64, device=device)
        if s > 1
        else torch.zeros(1, dtype=torch.float64, device=device)
        for s in grid.shape
    ]
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack(tuple(reversed(mesh)), dim=-1).to(dtype)


def _world_to_normalized_linear(grid: Grid, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Linear part ``(D, D)`` of the world -> normalised map: turns mm vectors into normalised ones."""
    d = grid.ndim
    return torch.as_tensor(grid.world_to_normalized()[:d, :d], dtype=dtype, device=device)


def _compose_on(
    first: torch.Tensor, second: torch.Tensor, base: torch.Tensor, w2n: torch.Tensor
) -> torch.Tensor:
    """``first + second(x + first)`` given the grid's identity normalised coords and world->normalised
    linear part (both precomputed, see :func:`compose_displacements`)."""
    coords = base + torch.movedim(first, 0, -1) @ w2n.T
    return first + sample_normalized(second, coords, mode="linear", padding="border")


def compose_displacements(first: torch.Tensor, second: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Displacement of ``x -> x + first(x)`` followed by ``y -> y + second(y)``.

    Returns ``w(x) = first(x) + second(x + first(x))`` on ``grid``. Both inputs and the result are
    ``(D, *grid.shape)`` fields in world mm on ``grid``; ``second`` is interpolated linearly at the
    displaced points and clamped to its border outside the grid. Differentiable in both fields.
    """
    if first.shape != second.shape or tuple(first.shape[1:]) != grid.shape or first.shape[0] != grid.ndim:
        raise InputError(
            f"compose_displacements needs two (D, *grid.shape) = ({grid.ndim}, {grid.shape}) fields, "
            f"got {tuple(first.shape)} and {tuple(second.shape)}"
        )
    base = identity_normalized(grid, first.device, first.dtype)
    return _compose_on(first, second, base, _world_to_normalized_linear(grid, first.device, first.dtype))


def resample_field(field: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """A displacement field ``(D, *source.shape)`` (mm) linearly resampled onto ``target`` (border
    padding); returns ``field`` itself when both grids sample the same points."""
    if target.same_as(source):
        return field
    return resample_displacement(Image(field, source), target).data


def _as_spacing(value: float | Sequence[float], dim: int, name: str) -> tuple[float, ...]:
    vals = (float(value),) * dim if np.isscalar(value) else tuple(float(v) for v in value)  # type: ignore[arg-type]
    if len(vals) != dim or not all(v > 0 and math.isfinite(v) for v in vals):
        raise InputError(f"{name} must be one positive number or {dim} of them (x, y[, z]), got {value!r}")
    return vals


def control_lattice(grid: Grid, spacing_mm: float | Sequence[float], pad: int) -> tuple[Grid, tuple[int, ...]]:
    """A regular control-point lattice spanning ``grid``'s box, plus ``pad`` extra nodes per side.

    Along each axis ``k`` (ITK order) the image box, from the first to the last voxel centre, is
    ``E_k = (size_k - 1) * spacing_k`` mm long. It is cut into ``m_k = max(1, round(E_k / h_k))``
    equal intervals (``h_k`` the requested spacing), so that lattice node 0 sits exactly on the
    first voxel centre and node ``m_k`` on the last one; the actual spacing is ``E_k / m_k`` mm
    (``h_k`` for an axis of a single voxel). ``pad`` nodes are added beyond each end. The lattice
    has the grid's direction.

    Returns:
        ``(lattice, intervals)``: the lattice as a :class:`Grid` of ``m_k + 1 + 2 pad`` nodes per
        axis whose index ``pad`` is node 0 (its origin is ``pad`` spacings before the grid's
        origin), and the interval counts ``m`` (ITK order). The image box is the lattice index
        range ``[pad, pad + m_k]`` on every axis.
    """
    h = _as_spacing(spacing_mm, grid.ndim, "control spacing (mm)")
    intervals, spacing = [], []
    for n, s, hk in zip(grid.size, grid.spacing, h):
        extent = (n - 1) * s
        m = max(1, int(round(extent / hk))) if extent > 0 else 1
        intervals.append(m)
        spacing.append(extent / m if extent > 0 else hk)
    rs = grid.direction_matrix @ np.diag(spacing)
    origin = np.asarray(grid.origin) - rs @ np.full(grid.ndim, float(pad))
    size = [m + 1 + 2 * pad for m in intervals]
    return Grid(size, spacing, origin, grid.direction), tuple(intervals)


def axis_maps(lattice: Grid, target: Grid) -> list[tuple[float, float]] | None:
    """Per-axis affine maps ``tau_k = a_k * i_k + b_k`` from ``target`` voxel indices to continuous
    ``lattice`` indices, or ``None`` when the map is not separable (the grids' index axes are not
    parallel, e.g. a different direction). ``(a_k, b_k)`` are in ITK order ``(x, y[, z])``."""
    d = lattice.ndim
    m = lattice.world_to_index() @ target.index_to_world()
    lin = m[:d, :d]
    off = np.abs(lin - np.diag(np.diag(lin)))
    err = off @ (np.asarray(target.size, dtype=np.float64) - 1)  # worst index error per lattice axis
    if np.any(err > _ALIGN_TOL):
        return None
    return [(float(lin[k, k]), float(m[k, d])) for k in range(d)]


# ---------------------------------------------------------------------------------------------
# banded kernel evaluation (B-spline fallback and Wendland)
# ---------------------------------------------------------------------------------------------
#: Upper bound on ``k * N`` (offset combinations evaluated together times output points) in
#: :meth:`BandPlan.chunks`: bounds the transient memory (about ``(2 D + 4) * 4`` bytes each in
#: float32, ~0.6 GB) while keeping the number of kernel launches small on coarse grids (large
#: grids take one or two combinations at a time; there the work is memory-bound anyway).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class BandPlan:
    """Where and how to evaluate ``u(p) = sum_j c_j K(tau(p) - j)`` for a compactly supported kernel.

    Only the lattice nodes ``j_k = base_k + o_k`` (``o_k`` among a few offsets) can contribute,
    where ``base_k`` is an integer with ``tau_k - base_k`` in ``[0, 1]``.

    Attributes:
        frac: per axis (ITK order) ``tau_k - base_k`` in ``[0, 1]`` (lattice units), tensors that
            broadcast to ``out_shape``, in the coefficients' dtype.
        base_flat: ``(N,)`` int64 flat index (in the ``(Z, Y, X)``-ordered lattice) of the node
            ``base + o_min`` of every output point, ``o_min`` the smallest offset.
        combos: ``(K, D)`` int64 offsets ``(o_x, o_y[, o_z])`` whose kernel may be non-zero.
        shifts: ``(K,)`` int64 flat index of each combination relative to ``base_flat``.
        kernel: maps the per-axis differences ``d_k = tau_k - j_k`` (lattice units; tensors with a
            leading axis of offset combinations, broadcasting to ``(k, *out_shape)``) to the
            weights, broadcasting to ``(k, *out_shape)``.
        out_shape: spatial shape of the result.
        ncoef: number of lattice nodes.
    """

    frac: list[torch.Tensor]
    base_flat: torch.Tensor
    combos: torch.Tensor
    shifts: torch.Tensor
    kernel: Callable[[list[torch.Tensor]], torch.Tensor]
    out_shape: tuple[int, ...]
    ncoef: int

    def chunks(self):
        """Yield ``(flat node indices, weights)``, both ``(k, N)``, for chunks of ``k`` offset
        combinations (``N`` output points), ``k * N <= _CHUNK_ELEMENTS`` unless ``k = 1``."""
        n = self.base_flat.numel()
        step = max(1, _CHUNK_ELEMENTS // max(n, 1))
        lead = (-1,) + (1,) * len(self.out_shape)
        for start in range(0, self.combos.shape[0], step):
            combo = self.combos[start : start + step]
            k = combo.shape[0]
            idx = self.base_flat.unsqueeze(0) + self.shifts[start : start + step, None]
            w = self.kernel([f.unsqueeze(0) - combo[:, a].reshape(lead).to(f.dtype) for a, f in enumerate(self.frac)])
            yield idx, w.expand(k, *self.out_shape).reshape(k, n)


class _BandedApply(torch.autograd.Function):
    """``u = K c`` with ``K`` the sparse banded kernel matrix of a :class:`BandPlan`.

    Working memory is bounded by the chunk size in forward *and* backward (nothing per offset is
    kept for backward): the backward ``dc = K^T du`` recomputes the weights and scatters them with
    ``index_add_``.
    """

    @staticmethod
    def forward(ctx, coef: torch.Tensor, plan: BandPlan) -> torch.Tensor:  # type: ignore[override]
        d = coef.shape[0]
        flat = coef.reshape(d, -1)
        out = coef.new_zeros((d, int(np.prod(plan.out_shape))))
        for idx, w in plan.chunks():
            k, n = idx.shape
            if k == 1:
                out.addcmul_(flat.index_select(1, idx[0]), w)
            else:
                out.add_((flat.index_select(1, idx.reshape(-1)).reshape(d, k, n) * w).sum(1))
        ctx.plan = plan
        ctx.coef_shape = coef.shape
        return out.reshape(d, *plan.out_shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        plan: BandPlan = ctx.plan
        d = grad.shape[0]
        g = grad.reshape(d, 1, -1)
        out = grad.new_zeros((d, plan.ncoef))
        for idx, w in plan.chunks():
            out.index_add_(1, idx.reshape(-1), (g * w).reshape(d, -1))  # (D, k * N)
        return out.reshape(ctx.coef_shape), None


def banded_apply(coef: torch.Tensor, plan: BandPlan) -> torch.Tensor:
    """Evaluate ``(D, *plan.out_shape)`` from lattice coefficients ``(D, *lattice.shape)``."""
    return _BandedApply.apply(coef, plan)


def band_plan(
    lattice: Grid,
    box_lo: int,
    intervals: Sequence[int],
    offsets: Sequence[int],
    keep: Callable[[tuple[float, ...]], bool],
    kernel: Callable[[list[torch.Tensor]], torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
    target: Grid | None = None,
    points: torch.Tensor | None = None,
) -> BandPlan:
    """Build a :class:`BandPlan` for a ``target`` grid or for world ``points`` ``(..., D)`` (mm).

    Continuous lattice indices are clamped to the image box ``[box_lo, box_lo + m_k]`` (the field is
    extended as a constant along the lattice axes outside the box, like border padding).
    ``offsets`` are the node offsets ``o`` relative to ``base = clamp(floor(tau), box_lo,
    box_lo + m - 1)``; ``keep(min_abs_d)`` prunes offset combinations whose kernel is zero for every
    fractional position (``min_abs_d`` the smallest possible ``|tau_k - j_k|`` per axis).
    """
    d = lattice.ndim
    taus: list[torch.Tensor] = []
    if target is not None:
        maps = axis_maps(lattice, target)
        if maps is not None:
            out_shape = target.shape
            for k, (a, b) in enumerate(maps):
                i = torch.arange(target.size[k], dtype=torch.float64, device=device)
                shape = [1] * d
                shape[d - 1 - k] = -1  # ITK axis k is tensor dim D-1-k
                taus.append((a * i + b).reshape(shape))
        else:
            points = target.world_points(device, torch.float64)
    if not taus:
        assert points is not None
        out_shape = tuple(points.shape[:-1])
        tau = lattice.world_points_to_index(points.to(device=device, dtype=torch.float64))
        taus = [tau[..., k] for k in range(d)]
    sizes = lattice.size
    strides = [int(np.prod(sizes[:k])) for k in range(d)]  # ITK axis k in the (Z, Y, X) flat order
    o_min = min(offsets)
    frac = []
    base_flat = torch.zeros((), dtype=torch.int64, device=device)
    for k in range(d):
        t = taus[k].clamp(box_lo, box_lo + intervals[k])
        b = torch.floor(t).clamp(box_lo, box_lo + intervals[k] - 1)
        frac.append((t - b).to(dtype))
        base_flat = base_flat + (b.to(torch.int64) + o_min) * strides[k]
    base_flat = base_flat.expand(out_shape).reshape(-1)
    mins = {o: (float(o - 1) if o >= 1 else float(-o)) for o in offsets}
    combos = [c for c in itertools.product(offsets, repeat=d) if keep(tuple(mins[o] for o in c))]
    combo_t = torch.as_tensor(combos, dtype=torch.int64, device=device).reshape(-1, d)
    shifts = ((combo_t - o_min) * torch.as_tensor(strides, dtype=torch.int64, device=device)).sum(1)
    return BandPlan(frac, base_flat, combo_t, shifts, kernel, tuple(out_shape), int(np.prod(sizes)))


class _PlanCache:
    """A small LRU cache of per-grid evaluation plans (keyed by grid, device and dtype)."""

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()

    def get(self, key, build: Callable[[], object]):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = build()
        self._items[key] = value
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return value

    def clear(self) -> None:
        self._items.clear()


# ---------------------------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------------------------
class DeformableTransform(Transform):
    """Base class of deformable transforms ``T(x) = x + u(x)`` (fixed world -> moving world, mm).

    Args:
        grid: the fixed image's full-resolution grid; kept as ``self.grid``.
        dtype: floating dtype of the parameters (float32 by default).

    Subclasses implement :meth:`displacement` and usually :meth:`displacement_at_points`; the
    device is the device of the parameters (follow ``.to(device)``).
    """

    kind: str = "deformable"

    def __init__(self, grid: Grid, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not isinstance(grid, Grid):
            raise InputError(f"deformable transforms are built on a Grid, got {type(grid).__name__}")
        if not dtype.is_floating_point:
            raise InputError(f"transform parameters must be floating point, got {dtype}")
        self.grid = grid
        self.dim = grid.ndim

    # -- helpers ---------------------------------------------------------------------------
    def _reference(self) -> torch.Tensor:
        """A parameter tensor whose device and dtype the transform follows."""
        return next(self.parameters())

    @property
    def device(self) -> torch.device:
        return self._reference().device

    @property
    def dtype(self) -> torch.dtype:
        return self._reference().dtype

    # -- API -------------------------------------------------------------------------------
    def displacement(self, grid: Grid) -> torch.Tensor:
        """Displacement ``u`` ``(D, *grid.shape)`` in world mm at the voxel centres of ``grid``,
        differentiable w.r.t. the parameters."""
        raise NotImplementedError

    def displacement_at_points(self, points: torch.Tensor) -> torch.Tensor:
        """Displacement (mm) at world points ``(..., D)`` (mm); returns ``(D, ...)``.

        Default: the field on ``self.grid`` interpolated linearly (border padding). Subclasses with
        a closed form evaluate it exactly.
        """
        field = self.displacement(self.grid)
        return sample_world(Image(field, self.grid), points.to(field.dtype), mode="linear", padding="border")

    def regularization_field(self, grid: Grid) -> torch.Tensor:
        """The field ``(D, *grid.shape)`` (mm) that regularisers act on: the displacement here."""
        return self.displacement(grid)

    def regularization_grid(self, grid: Grid) -> Grid:
        """The grid on which regularisers see :meth:`regularization_field` while a pyramid level
        on ``grid`` is optimised: ``grid`` here. Smooth parameterisations return a coarser grid
        that resolves the field just as well (cheaper at fine levels, same energy per mm^3)."""
        return grid

    def set_level(self, grid: Grid) -> None:
        """Called when a pyramid level on ``grid`` starts. Does nothing unless overridden."""

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Map fixed world points ``(..., D)`` (mm) to moving space: ``x + u(x)``, ``(..., D)``."""
        u = self.displacement_at_points(points)
        return points + torch.movedim(u, 0, -1).to(points.dtype)

    def describe(self) -> dict:
        """Plain-number summary: type, grid size and parameter shapes."""
        return {
            "type": self.kind,
            "grid_size": list(self.grid.size),
            "parameters": {name: list(p.shape) for name, p in self.named_parameters()},
        }


# ---------------------------------------------------------------------------------------------
# dense displacement field
# ---------------------------------------------------------------------------------------------
class DenseDisplacement(DeformableTransform):
    """One free displacement vector (mm) per voxel.

    The parameter ``field`` ``(D, *field_grid.shape)`` lives on ``field_grid``: ``grid`` at first,
    then the grid of the current pyramid level (:meth:`set_level` resamples it; the values stay
    in mm). Since :meth:`set_level` replaces the parameter object, optimisers must be created after
    it is called.

    Args:
        grid: full-resolution fixed grid.
        dtype: parameter dtype.
    """

    kind = "dense"

    def __init__(self, grid: Grid, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(grid, dtype)
        self.field_grid = grid
        self.field = nn.Parameter(torch.zeros((grid.ndim, *grid.shape), dtype=dtype))

    def displacement(self, grid: Grid) -> torch.Tensor:
        """The parameter itself when ``grid`` is the current field grid, else its linear (border)
        resampling at ``grid``'s voxel centres; ``(D, *grid.shape)`` mm."""
        return resample_field(self.field, self.field_grid, grid)

    def displacement_at_points(self, points: torch.Tensor) -> torch.Tensor:
        """Linear (border) interpolation of the field at world points ``(..., D)``; ``(D, ...)`` mm."""
        return sample_world(Image(self.field, self.field_grid), points.to(self.field.dtype), "linear", "border")

    @torch.no_grad()
    def set_level(self, grid: Grid) -> None:
        """Resample the field onto ``grid`` (mm stay mm) and make it the new parameter."""
        if grid.same_as(self.field_grid):
            return
        new = resample_field(self.field.detach(), self.field_grid, grid).clone()
        self.field = nn.Parameter(new)
        self.field_grid = grid
