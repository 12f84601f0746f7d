"""Linear transforms (translation, rigid, similarity, affine) about a rotation centre.

A transform maps **fixed** world points to **moving** world points (mm), ITK's convention::

    T(x) = A (x - c) + c + t

with ``c`` the rotation centre (a buffer, not optimised), ``A`` the linear part and ``t`` the
translation. Parameters are stored in float64 in *physical-shift* units: one unit of any
parameter moves points about 1 mm. Translations are in mm; rotation angles, the log of the scale
and the affine matrix offsets are stored multiplied by ``length_scale`` (mm, about the image's
radius), so that a unit moves a point ``length_scale`` mm from the centre by 1 mm. First-order
optimisers (Adam, SGD) then take balanced steps, learning rates read as millimetres, and the
first LBFGS step (at most about 1 mm) stays local.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..grid import Grid
from .base import Transform

__all__ = [
    "LinearTransform",
    "Translation",
    "Rigid",
    "Similarity",
    "Affine",
    "LINEAR_TRANSFORMS",
    "rotation_matrix",
    "matrix_displacement",
]


def rotation_matrix(angles: torch.Tensor, dim: int) -> torch.Tensor:
    """Rotation matrix from angles in radians.

    2D: one angle, ``[[cos, -sin], [sin, cos]]`` acting on ``(x, y)``.
    3D: ``(a_x, a_y, a_z)``, ``R = Rz(a_z) @ Ry(a_y) @ Rx(a_x)``.
    """
    if dim == 2:
        c, s = torch.cos(angles[0]), torch.sin(angles[0])
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    cx, cy, cz = torch.cos(angles)
    sx, sy, sz = torch.sin(angles)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([torch.stack([one, zero, zero]), torch.stack([zero, cx, -sx]), torch.stack([zero, sx, cx])])
    ry = torch.stack([torch.stack([cy, zero, sy]), torch.stack([zero, one, zero]), torch.stack([-sy, zero, cy])])
    rz = torch.stack([torch.stack([cz, -sz, zero]), torch.stack([sz, cz, zero]), torch.stack([zero, zero, one])])
    return rz @ ry @ rx


def rotation_angles(rotation: np.ndarray) -> np.ndarray:
    """Angles (radians) of :func:`rotation_matrix` for an orthonormal ``rotation`` (2x2 or 3x3)."""
    r = np.asarray(rotation, dtype=np.float64)
    if r.shape == (2, 2):
        return np.array([math.atan2(r[1, 0], r[0, 0])])
    ay = math.asin(-max(-1.0, min(1.0, r[2, 0])))
    ax = math.atan2(r[2, 1], r[2, 2])
    az = math.atan2(r[1, 0], r[0, 0])
    return np.array([ax, ay, az])


def matrix_displacement(matrix: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``u(x) = M x - x`` (mm) at every voxel centre of ``grid``: ``(D, *grid.shape)`` float32.

    ``u`` is affine in the voxel index: ``u = (M - I)(origin + R S i) + t``; it is assembled from
    per-axis terms in float64 (no per-voxel world coordinates), then stored as float32. Not
    differentiated (the optimisation works on ``matrix()``).
    """
    d = grid.ndim
    m = matrix.detach().to(torch.float64).cpu().numpy()
    lin = m[:d, :d] - np.eye(d)
    index_to_world = grid.index_to_world()
    per_index = lin @ index_to_world[:d, :d]  # mm of u per voxel step along each index axis
    offset = lin @ index_to_world[:d, d] + m[:d, d]
    dev = matrix.device
    out = torch.empty((d, *grid.shape), dtype=torch.float32, device=dev)
    for c in range(d):
        total = torch.full((), float(offset[c]), dtype=torch.float64, device=dev)
        for axis in range(d):  # ITK axis k is tensor dim d - 1 - k
            view = [1] * d
            view[d - 1 - axis] = grid.size[axis]
            ramp = torch.arange(grid.size[axis], dtype=torch.float64, device=dev) * float(per_index[c, axis])
            total = total + ramp.reshape(view)
        out[c] = total
    return out


class LinearTransform(Transform):
    """Base class: ``T(x) = A (x - c) + c + t`` on world points in mm.

    Args:
        dim: 2 or 3.
        center: rotation centre ``c`` (mm, world), default the origin.
        length_scale: radius (mm) at which one unit of a rotation/scale/affine parameter moves a
            point by 1 mm (see module docstring); set it to about half the image's extent.
    """

    kind = "linear"
    is_linear = True

    @classmethod
    def from_config(cls, grid: Grid) -> "LinearTransform":
        """The transform for the fixed ``grid``: ``length_scale`` half its diagonal (no params)."""
        length = float(np.linalg.norm(grid.extent())) / 2 or 1.0
        return cls(grid.ndim, length_scale=length)

    def displacement(self, grid: Grid) -> torch.Tensor:
        """``T(x) - x`` on ``grid`` (see :func:`matrix_displacement`)."""
        return matrix_displacement(self.matrix(), grid)

    def __init__(self, dim: int, center: Sequence[float] | None = None, length_scale: float = 1.0) -> None:
        super().__init__()
        if dim not in (2, 3):
            raise InputError(f"transforms are 2D or 3D, got dim={dim}")
        if not length_scale > 0:
            raise InputError(f"length_scale must be positive, got {length_scale}")
        self.dim = dim
        self.length_scale = float(length_scale)
        c = torch.zeros(dim, dtype=torch.float64) if center is None else torch.as_tensor(center, dtype=torch.float64)
        self.register_buffer("center", c.clone())
        self.translation_param = nn.Parameter(torch.zeros(dim, dtype=torch.float64))

    # -- parts -------------------------------------------------------------------------
    def linear(self) -> torch.Tensor:
        """The linear part ``A`` ``(D, D)``."""
        return torch.eye(self.dim, dtype=torch.float64, device=self.center.device)

    def translation(self) -> torch.Tensor:
        """The translation ``t`` in mm ``(D,)``."""
        return self.translation_param

    def matrix(self) -> torch.Tensor:
        """Homogeneous ``(D+1, D+1)`` float64 matrix of ``T`` (fixed world -> moving world, mm)."""
        a = self.linear()
        offset = self.translation() + self.center - a @ self.center
        top = torch.cat([a, offset[:, None]], dim=1)
        bottom = torch.zeros(1, self.dim + 1, dtype=torch.float64, device=a.device)
        bottom[0, -1] = 1.0
        return torch.cat([top, bottom], dim=0)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Map world points ``(..., D)`` (mm) from fixed to moving space."""
        m = self.matrix().to(points.dtype)
        return points @ m[: self.dim, : self.dim].T + m[: self.dim, self.dim]

    # -- setting -----------------------------------------------------------------------
    @torch.no_grad()
    def set_center(self, center: Sequence[float]) -> None:
        self.center.copy_(torch.as_tensor(center, dtype=torch.float64))

    @torch.no_grad()
    def set_translation(self, translation_mm: Sequence[float]) -> None:
        self.translation_param.copy_(torch.as_tensor(translation_mm, dtype=torch.float64))

    @torch.no_grad()
    def set_matrix(self, matrix: np.ndarray | torch.Tensor) -> None:
        """Set parameters from a homogeneous world matrix (exact for affine; least-squares
        projection onto the transform's family otherwise), keeping the current centre."""
        m = torch.as_tensor(matrix, dtype=torch.float64)
        a = self._project_linear(m[: self.dim, : self.dim])
        # translation so that T(c) matches the given matrix at the centre
        c = self.center.cpu()
        t = (m[: self.dim, : self.dim] @ c + m[: self.dim, self.dim]) - c
        self.set_translation(t)
        self._set_linear(a)

    def _project_linear(self, a: torch.Tensor) -> torch.Tensor:
        return a

    def _set_linear(self, a: torch.Tensor) -> None:
        """Set the linear-part parameters from ``A`` (subclasses)."""

    def describe(self) -> dict:
        """Plain-number summary: matrix, centre and translation (mm), angles (deg), scales."""
        with torch.no_grad():
            a = self.linear().cpu().numpy()
            u, s, vt = np.linalg.svd(a)
            rot = u @ vt
            return {
                "type": self.kind,
                "matrix": a.tolist(),
                "center_mm": self.center.cpu().tolist(),
                "translation_mm": self.translation().cpu().tolist(),
                "rotation_deg": np.degrees(rotation_angles(rot)).tolist(),
                "scales": s.tolist(),
            }


class Translation(LinearTransform):
    """``T(x) = x + t``."""

    kind = "translation"


class Rigid(LinearTransform):
    """Rotation plus translation. Parameters: angles (rad; 1 in 2D, 3 in 3D) and translation."""

    kind = "rigid"

    def __init__(self, dim: int, center: Sequence[float] | None = None, length_scale: float = 1.0) -> None:
        super().__init__(dim, center, length_scale)
        self.rotation_param = nn.Parameter(torch.zeros(1 if dim == 2 else 3, dtype=torch.float64))

    def angles(self) -> torch.Tensor:
        """Rotation angles in radians (1 in 2D, ``(a_x, a_y, a_z)`` in 3D)."""
        return self.rotation_param / self.length_scale

    @torch.no_grad()
    def set_angles(self, radians: Sequence[float]) -> None:
        self.rotation_param.copy_(torch.as_tensor(radians, dtype=torch.float64).reshape(-1) * self.length_scale)

    def rotation(self) -> torch.Tensor:
        return rotation_matrix(self.angles(), self.dim)

    def linear(self) -> torch.Tensor:
        return self.rotation()

    def _project_linear(self, a: torch.Tensor) -> torch.Tensor:
        u, _, vt = torch.linalg.svd(a)
        return u @ vt

    def _set_linear(self, a: torch.Tensor) -> None:
        self.set_angles(rotation_angles(a.numpy()))


class Similarity(Rigid):
    """Isotropic scale times a rotation, plus translation (scale stored as its logarithm)."""

    kind = "similarity"

    def __init__(self, dim: int, center: Sequence[float] | None = None, length_scale: float = 1.0) -> None:
        super().__init__(dim, center, length_scale)
        self.log_scale_param = nn.Parameter(torch.zeros(1, dtype=torch.float64))

    def scale(self) -> torch.Tensor:
        """The isotropic scale factor."""
        return torch.exp(self.log_scale_param[0] / self.length_scale)

    def linear(self) -> torch.Tensor:
        return self.scale() * self.rotation()

    def _project_linear(self, a: torch.Tensor) -> torch.Tensor:
        u, s, vt = torch.linalg.svd(a)
        return s.mean() * (u @ vt)

    def _set_linear(self, a: torch.Tensor) -> None:
        scale = torch.linalg.svdvals(a).mean()
        self.log_scale_param.copy_(torch.log(scale).reshape(1) * self.length_scale)
        super()._set_linear(a / scale)


class Affine(LinearTransform):
    """General linear part ``A = I + P / length_scale`` (``P`` the ``D x D`` parameter) plus translation."""

    kind = "affine"

    def __init__(self, dim: int, center: Sequence[float] | None = None, length_scale: float = 1.0) -> None:
        super().__init__(dim, center, length_scale)
        self.matrix_param = nn.Parameter(torch.zeros(dim, dim, dtype=torch.float64))

    def linear(self) -> torch.Tensor:
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.matrix_param.device)
        return eye + self.matrix_param / self.length_scale

    def _set_linear(self, a: torch.Tensor) -> None:
        self.matrix_param.copy_((a - torch.eye(self.dim, dtype=torch.float64)) * self.length_scale)


LINEAR_TRANSFORMS: dict[str, type[LinearTransform]] = {
    "translation": Translation,
    "rigid": Rigid,
    "similarity": Similarity,
    "affine": Affine,
}
