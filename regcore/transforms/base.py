"""The one base of every transform: a map ``T`` from fixed world points to moving world points (mm).

Linear transforms (:mod:`.linear`) and deformable ones (:mod:`.deformable` and the modules built on
it) share this API:

* ``forward(points)``: ``T`` at world points ``(..., D)`` (mm);
* ``displacement(grid)``: ``T(x) - x`` at the voxel centres of ``grid``, ``(D, *grid.shape)`` mm;
* ``describe()``: a plain-number summary;
* ``from_config(grid, **params)``: the transform a method stage asks for on the fixed grid, from
  the stage's ``transform_params``; the signature of ``from_config`` (after ``grid``) is the typed
  params model of the transform (:func:`regcore.transforms.registry.params_model`);
* ``is_linear``: the capability that decides how registration fits it (a linear stage, or a
  deformable one followed by the linear map of the stages before).

A linear transform adds ``matrix()`` (homogeneous ``(D+1, D+1)``). A chain ``linear o deformable``
is :func:`compose`: ``T(x) = M (x + u(x))``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..grid import Grid

__all__ = ["Transform", "compose"]


class Transform(nn.Module):
    """Base class: ``T`` maps fixed world points to moving world points (mm)."""

    #: the registry name
    kind: ClassVar[str] = "transform"
    #: capability: an affine map with a ``matrix()``
    is_linear: ClassVar[bool] = False

    @classmethod
    def from_config(cls, grid: Grid, **params) -> "Transform":
        """The transform for a registration on the fixed ``grid`` with a stage's params."""
        return cls(grid, **params)

    def displacement(self, grid: Grid) -> torch.Tensor:
        """``T(x) - x`` ``(D, *grid.shape)`` in world mm at the voxel centres of ``grid``."""
        raise NotImplementedError

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``T`` at world points ``(..., D)`` (mm); returns ``(..., D)``."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Plain-number summary (type and parameters)."""
        return {"type": self.kind}


def compose(matrix: torch.Tensor, displacement: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """The displacement of ``x -> M (x + u(x))`` at ``points`` ``(*shape, D)`` (mm): a linear map
    ``M`` ``(D+1, D+1)`` after a deformable displacement ``u`` ``(D, *shape)`` sampled at the same
    points; returns ``(D, *shape)`` mm."""
    d = points.shape[-1]
    m = matrix.to(points.dtype)
    mapped = (points + torch.movedim(displacement, 0, -1)) @ m[:d, :d].T + m[:d, d]
    return torch.movedim(mapped - points, -1, 0)
