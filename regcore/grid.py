"""Sampling grids and THE coordinate convention of regcore (the only module that defines it).

Convention
----------
Three coordinate systems are used, and only :class:`Grid` converts between them.

* **Index** (voxel) coordinates ``i = (i_x, i_y[, i_z])``: ITK order, ``i_x`` is the fastest
  varying axis. Index ``0`` is the centre of the first voxel.
* **World** coordinates ``p = (x, y[, z])`` in millimetres, in ITK's LPS frame, exactly as ITK
  defines them::

      p = origin + direction @ diag(spacing) @ i

  ``direction`` is the ``D x D`` matrix whose *columns* are the world directions of the index
  axes (ITK's ``GetDirection()`` read row-major).
* **Normalised** coordinates ``n`` in ``[-1, 1]`` per axis, ordered ``(x, y[, z])``, as
  :func:`torch.nn.functional.grid_sample` expects them with ``align_corners=True`` (used
  everywhere in regcore): ``n = 2 i / (size - 1) - 1``, so ``-1`` and ``+1`` are the centres of
  the first and last voxels. An axis of size 1 uses ``n = i`` instead (``grid_sample`` samples
  its single voxel for any ``n``).

Tensor layout: an image tensor is ``(C, *shape)`` with ``shape = (Z, Y, X)`` in 3D and ``(Y, X)``
in 2D, i.e. the *reverse* of ITK's ``size``; batched tensors add a leading ``N``. Every vector
quantity (spacing, origin, points, displacements, gradients of coordinates) is ordered
``(x, y[, z])``. Point sets are tensors ``(..., D)``; displacement fields are images with ``D``
channels, the channels being the ``(x, y[, z])`` components in world millimetres.

All matrices are homogeneous ``(D + 1) x (D + 1)`` float64 numpy arrays acting on column vectors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import InputError

__all__ = ["Grid"]


def _tuple_of(values: Sequence[float], kind: type, name: str, dim: int) -> tuple:
    out = tuple(kind(v) for v in values)
    if len(out) != dim:
        raise InputError(f"grid {name} has {len(out)} entries, expected {dim}")
    return out


@dataclass(frozen=True)
class Grid:
    """Geometry of a sampled image, exactly as ITK defines it.

    Attributes:
        size: number of voxels per axis, ITK order ``(x, y[, z])``.
        spacing: voxel spacing in mm, ``(x, y[, z])``.
        origin: world position (mm, LPS) of the centre of voxel index 0.
        direction: ``D x D`` direction cosines, row-major; column ``k`` is the world direction of
            index axis ``k``.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    def __init__(
        self,
        size: Sequence[int],
        spacing: Sequence[float] | None = None,
        origin: Sequence[float] | None = None,
        direction: Sequence[float] | np.ndarray | None = None,
    ) -> None:
        dim = len(tuple(size))
        if dim not in (2, 3):
            raise InputError(f"grids must be 2D or 3D, got size {tuple(size)}")
        size_t = _tuple_of(size, int, "size", dim)
        if any(s < 1 for s in size_t):
            raise InputError(f"grid size must be positive, got {size_t}")
        spacing_t = _tuple_of(spacing if spacing is not None else [1.0] * dim, float, "spacing", dim)
        if any(not (s > 0 and math.isfinite(s)) for s in spacing_t):
            raise InputError(f"grid spacing must be positive and finite, got {spacing_t}")
        origin_t = _tuple_of(origin if origin is not None else [0.0] * dim, float, "origin", dim)
        if direction is None:
            direction = np.eye(dim)
        dmat = np.asarray(direction, dtype=np.float64).reshape(dim, dim)
        if not np.all(np.isfinite(dmat)) or abs(np.linalg.det(dmat)) < 1e-6:
            raise InputError(f"grid direction must be an invertible matrix, got {dmat.tolist()}")
        object.__setattr__(self, "size", size_t)
        object.__setattr__(self, "spacing", spacing_t)
        object.__setattr__(self, "origin", origin_t)
        object.__setattr__(self, "direction", tuple(float(v) for v in dmat.ravel()))

    # ------------------------------------------------------------------ basic properties
    @property
    def ndim(self) -> int:
        """Number of spatial dimensions ``D``."""
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Spatial tensor shape ``(Z, Y, X)`` / ``(Y, X)``: ``size`` reversed."""
        return tuple(reversed(self.size))

    @property
    def numel(self) -> int:
        return int(np.prod(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        """``D x D`` float64 direction matrix (columns = index axes in world)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    # ------------------------------------------------------------------ homogeneous matrices
    def index_to_world(self) -> np.ndarray:
        """Homogeneous matrix mapping index ``(x, y, z)`` to world mm."""
        d = self.ndim
        m = np.eye(d + 1)
        m[:d, :d] = self.direction_matrix @ np.diag(self.spacing)
        m[:d, d] = self.origin
        return m

    def world_to_index(self) -> np.ndarray:
        """Homogeneous matrix mapping world mm to continuous index ``(x, y, z)``."""
        return np.linalg.inv(self.index_to_world())

    def normalized_to_index(self) -> np.ndarray:
        """Homogeneous matrix mapping ``align_corners=True`` normalised coords to index."""
        d = self.ndim
        m = np.eye(d + 1)
        for k, s in enumerate(self.size):
            if s > 1:
                m[k, k] = (s - 1) / 2.0
                m[k, d] = (s - 1) / 2.0
            else:  # single voxel: every normalised coordinate samples index 0
                m[k, k] = 1.0
                m[k, d] = 0.0
        return m

    def index_to_normalized(self) -> np.ndarray:
        return np.linalg.inv(self.normalized_to_index())

    def normalized_to_world(self) -> np.ndarray:
        return self.index_to_world() @ self.normalized_to_index()

    def world_to_normalized(self) -> np.ndarray:
        return np.linalg.inv(self.normalized_to_world())

    # ------------------------------------------------------------------ points
    def world_points(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """World coordinates (mm) of every voxel centre, tensor ``(*shape, D)``, ``(x, y, z)`` last.

        Computed in float64 and cast, so that large origins keep their precision.
        """
        axes = [torch.arange(s, dtype=torch.float64, device=device) for s in self.shape]
        mesh = torch.meshgrid(*axes, indexing="ij")  # tensor order (z, y, x)
        index = torch.stack(tuple(reversed(mesh)), dim=-1)  # (..., D) in (x, y, z)
        return apply_matrix(self.index_to_world(), index).to(dtype)

    def index_ramps(
        self, matrix: np.ndarray | torch.Tensor, device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> list[torch.Tensor]:
        """An affine map of the voxel centres as one small ramp per tensor dim: ``matrix``
        (homogeneous, ``(D+1, D+1)``, applied to the continuous index ``(x, y, z)``) at every
        voxel is the broadcast sum of the returned tensors, shaped ``(n_z, 1, 1, D)``,
        ``(1, n_y, 1, D)``, ``(1, 1, n_x, D)`` (2D alike). ``D * sum(shape)`` numbers instead of a
        dense ``(*shape, D)`` array (87 MB for a 1 mm brain); each ramp is exact in float64 before
        the cast, the sum rounds once per ramp."""
        d = self.ndim
        m = torch.as_tensor(matrix, dtype=torch.float64, device=device)
        ramps = []
        for t, n in enumerate(self.shape):  # tensor dim t is index axis d - 1 - t
            ramp = torch.arange(n, dtype=torch.float64, device=device)[:, None] * m[:d, d - 1 - t]
            if t == 0:
                ramp = ramp + m[:d, d]
            view = [1] * d + [d]
            view[t] = n
            ramps.append(ramp.reshape(view).to(dtype))
        return ramps

    def index_points_to_world(self, index: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Continuous indices ``(..., D)`` (x, y, z order) to world mm ``(..., D)``."""
        return apply_matrix(self.index_to_world(), index)

    def world_points_to_index(self, points: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """World points ``(..., D)`` in mm to continuous indices ``(..., D)``."""
        return apply_matrix(self.world_to_index(), points)

    def corners(self) -> np.ndarray:
        """World coordinates (mm) of the ``2**D`` corner voxel centres, ``(2**D, D)``."""
        d = self.ndim
        idx = np.array(np.meshgrid(*[[0, s - 1] for s in self.size], indexing="ij")).reshape(d, -1).T
        return apply_matrix(self.index_to_world(), idx.astype(np.float64))

    def center(self) -> np.ndarray:
        """World position (mm) of the geometric centre of the grid, ``(D,)``."""
        return apply_matrix(self.index_to_world(), (np.asarray(self.size, dtype=np.float64) - 1) / 2)

    def extent(self) -> np.ndarray:
        """Physical length (mm) of each axis, first to last voxel centre, ``(D,)``."""
        return (np.asarray(self.size, dtype=np.float64) - 1) * np.asarray(self.spacing)

    # ------------------------------------------------------------------ derived grids
    def downsample(self, factor: float, min_size: int = 8) -> "Grid":
        """A coarser grid covering the same physical box (same first and last voxel centres).

        Each axis gets ``round(size / factor)`` voxels (never fewer than ``min_size`` unless the
        axis was already smaller) and its spacing grows so that the first and last voxel centres
        stay in place; origin and direction are unchanged. With ``align_corners=True`` sampling the
        finer image at these points is exact in world space.
        """
        if factor < 1:
            raise InputError(f"downsampling factor must be >= 1, got {factor}")
        new_size, new_spacing = [], []
        for s, sp in zip(self.size, self.spacing):
            n = max(min(s, min_size), int(round(s / factor)))
            n = min(n, s)
            new_size.append(n)
            new_spacing.append(sp * (s - 1) / (n - 1) if n > 1 else sp)
        return Grid(new_size, new_spacing, self.origin, self.direction)

    def same_as(self, other: "Grid", atol: float = 1e-5) -> bool:
        """True when both grids sample the same world points (to ``atol`` mm/cosine)."""
        return (
            self.size == other.size
            and np.allclose(self.spacing, other.spacing, atol=atol)
            and np.allclose(self.origin, other.origin, atol=atol)
            and np.allclose(self.direction, other.direction, atol=atol)
        )


def apply_matrix(matrix: np.ndarray | torch.Tensor, points: np.ndarray | torch.Tensor):
    """Apply a homogeneous ``(D+1, D+1)`` matrix to points ``(..., D)``; keeps the array type.

    A numpy matrix applied to a tensor is converted to the tensor's device (float64 math).
    """
    if isinstance(points, torch.Tensor):
        m = torch.as_tensor(matrix, dtype=torch.float64, device=points.device)
        d = m.shape[0] - 1
        pts = points.to(torch.float64)
        return (pts @ m[:d, :d].T + m[:d, d]).to(points.dtype if points.is_floating_point() else torch.float64)
    m = np.asarray(matrix, dtype=np.float64)
    d = m.shape[0] - 1
    return np.asarray(points, dtype=np.float64) @ m[:d, :d].T + m[:d, d]
