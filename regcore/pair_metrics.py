"""One pair's quality metrics, declared once: :class:`PairMetrics` and :func:`evaluate_pair`.

Each field of :class:`PairMetrics` declares its dimensions beyond ``pair`` (``()`` or
``("label",)``), units, a description and whether higher is better; the results store's arrays,
their xarray attributes and the report's outlier rules are made from these declarations (see
:func:`metric_fields`), so a new metric is one field here plus its computation in
:func:`evaluate_pair`. Warping by a field is :func:`warp` (images, labels by nearest neighbour).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Sequence

import numpy as np
import torch

from .errors import InputError
from .evaluation import dice_per_label
from .image import Image
from .points import map_points
from .regularizers.functional import jacobian_stats
from .sampling import sample_world

__all__ = ["PairMetrics", "MetricInfo", "metric_fields", "evaluate_pair", "warp"]


@dataclass(frozen=True)
class MetricInfo:
    """What a metric is: dims beyond ``pair``, units, description, direction of goodness."""

    name: str
    dims: tuple[str, ...]
    units: str
    description: str
    higher_is_better: bool | None


def _metric(units: str, description: str, higher_is_better: bool | None, dims: tuple[str, ...] = ()) -> Any:
    default: Any = None if dims else float("nan")
    return field(default=default, metadata={"units": units, "description": description,
                                            "higher_is_better": higher_is_better, "dims": dims})


@dataclass
class PairMetrics:
    """Before (identity in world space) and after (``x + u(x)``) metrics of one registered pair.

    The order of the fields is the order of the store's arrays (and of its checksums): append.
    """

    mse_before: float = _metric("intensity^2", "mean squared intensity difference before registration, "
                                "where both samples fall inside the moving image", False)
    mse_after: float = _metric("intensity^2", "mean squared intensity difference after registration", False)
    ncc_before: float = _metric("1", "normalised cross-correlation of the fixed and moving images before", True)
    ncc_after: float = _metric("1", "normalised cross-correlation of the fixed and warped moving images", True)
    dice_before: float = _metric("1", "mean Dice over the labels present in the fixed or the moving map, before", True)
    dice_after: float = _metric("1", "mean Dice over the labels present in the fixed or the moving map, after", True)
    tre_before: float = _metric("mm", "mean landmark distance before registration", False)
    tre_after: float = _metric("mm", "mean target registration error of the landmarks after registration", False)
    tre_max_after: float = _metric("mm", "largest landmark error after registration", False)
    jac_min: float = _metric("1", "smallest Jacobian determinant of x + u(x)", True)
    jac_nonpositive: float = _metric("1", "fraction of voxels whose Jacobian determinant is <= 0 (folding)", False)
    jac_std_log: float = _metric("1", "standard deviation of log Jacobian determinant (where positive)", False)
    dice_label_before: list[float] | None = _metric("1", "Dice of each label before registration", True, ("label",))
    dice_label_after: list[float] | None = _metric("1", "Dice of each label after registration", True, ("label",))

    def values(self) -> dict[str, Any]:
        """The metrics that were computed (not NaN-by-absence vectors), by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def metric_fields() -> list[MetricInfo]:
    """Every metric of :class:`PairMetrics`, in declaration order."""
    return [MetricInfo(f.name, tuple(f.metadata["dims"]), f.metadata["units"], f.metadata["description"],
                       f.metadata["higher_is_better"]) for f in fields(PairMetrics)]


def warp(image: Image, displacement: Image, mode: str = "linear", padding: str = "zeros") -> Image:
    """``image`` (any grid) resampled on the displacement's grid at ``x + u(x)`` (backward
    warping; ``u`` in world mm, components x, y, z). ``mode="nearest"`` for label maps."""
    grid = displacement.grid
    pts = grid.world_points(dtype=torch.float64, device=displacement.data.device) + torch.movedim(
        displacement.data.to(torch.float64), 0, -1)
    return Image(sample_world(image.to(displacement.data.device), pts, mode=mode, padding=padding), grid)  # type: ignore[arg-type]


def _ncc(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else float("nan")


def evaluate_pair(fixed: Image, moving: Image, displacement: Image, *, fixed_labels: Image | None = None,
                  moving_labels: Image | None = None, labels: Sequence[int] | None = None,
                  fixed_points: np.ndarray | None = None, moving_points: np.ndarray | None = None,
                  jacobian: Image | None = None) -> tuple[PairMetrics, torch.Tensor | None]:
    """The metrics of a registered pair, and the moving labels warped onto the fixed grid.

    Args:
        fixed, moving: the images (``moving`` on any grid).
        displacement: ``(D, *fixed.shape)`` field, mm, fixed -> moving.
        fixed_labels, moving_labels: label maps on the images' grids (Dice when both are given).
        labels: the labels to score, in order (default: those of the fixed map).
        fixed_points, moving_points: corresponding landmarks ``(N, D)`` in world mm (TRE).
        jacobian: the determinant map if the registration computed it (else computed here).

    Returns:
        ``(metrics, the moving labels warped onto the fixed grid (*fixed.shape) int32, or None
        without moving labels)``; Dice needs both label maps. Intensity metrics use the
        voxels whose samples fall inside the moving image both before and after.
    """
    grid = fixed.grid
    dev = displacement.data.device
    identity = Image(torch.zeros_like(displacement.data), grid)
    ones = Image(torch.ones_like(moving.data[:1]), moving.grid)
    inside = (warp(ones, identity).data[0] > 0.999) & (warp(ones, displacement).data[0] > 0.999)
    f = fixed.data[0].to(dev)[inside]
    m = PairMetrics()
    if f.numel():
        before = warp(moving, identity).data[0][inside]
        after = warp(moving, displacement).data[0][inside]
        m.mse_before, m.mse_after = float(((f - before) ** 2).double().mean()), float(((f - after) ** 2).double().mean())
        m.ncc_before, m.ncc_after = _ncc(f, before), _ncc(f, after)
    warped_labels = None
    if moving_labels is not None:  # propagated onto the fixed grid (label propagation needs no fixed labels)
        warped_labels = warp(moving_labels, displacement, mode="nearest").data[0].to(torch.int32)
    if fixed_labels is not None and moving_labels is not None:
        flab = fixed_labels.data.to(dev)
        names = list(labels) if labels is not None else sorted(int(v) for v in torch.unique(flab).tolist() if v != 0)
        lab_before = warp(moving_labels, identity, mode="nearest").data
        lab_after = warp(moving_labels, displacement, mode="nearest").data
        d_before = dice_per_label(flab, lab_before, names)
        d_after = dice_per_label(flab, lab_after, names)
        m.dice_label_before = [d_before[k] for k in names]
        m.dice_label_after = [d_after[k] for k in names]
        present = [k for k in names if not np.isnan(d_before[k])]
        if present:
            m.dice_before = float(np.mean([d_before[k] for k in present]))
            m.dice_after = float(np.mean([d_after[k] for k in present]))
    if fixed_points is not None and moving_points is not None:
        if fixed_points.shape != moving_points.shape:
            raise InputError(f"landmarks: fixed has {len(fixed_points)} points, moving {len(moving_points)}; "
                             "they must correspond")
        tre_after = np.linalg.norm(map_points(fixed_points, displacement) - moving_points, axis=1)
        m.tre_before = float(np.linalg.norm(fixed_points - moving_points, axis=1).mean())
        m.tre_after, m.tre_max_after = float(tre_after.mean()), float(tre_after.max())
    if jacobian is not None:
        det = jacobian.data.double()
        pos = det[det > 0]
        m.jac_min, m.jac_nonpositive = float(det.min()), float((det <= 0).double().mean())
        m.jac_std_log = float(pos.log().std(unbiased=False)) if pos.numel() else float("nan")
    else:
        direction = torch.as_tensor(grid.direction_matrix, dtype=torch.float64, device=dev)
        st = jacobian_stats(displacement.data.to(torch.float64)[None], spacing=grid.spacing, direction=direction)
        m.jac_min, m.jac_nonpositive, m.jac_std_log = st["min"], st["fraction_nonpositive"], st["std_log"]
    return m, warped_labels
