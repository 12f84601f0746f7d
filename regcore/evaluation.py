"""Evaluation: Dice and centroid distance per label, point distances (TRE, mm) and transform
comparisons."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .grid import Grid
from .image import Image
from .points import map_points

__all__ = [
    "dice_per_label",
    "mean_dice",
    "label_centroid_distances",
    "point_distances",
    "landmark_tre",
    "foreground_corners",
    "matrix_point_error",
    "inverse_consistency",
]


def dice_per_label(a: Image | torch.Tensor, b: Image | torch.Tensor, labels: Sequence[int] | None = None) -> dict[int, float]:
    """Dice ``2|A∩B| / (|A|+|B|)`` of each label (background 0 excluded), on the same grid.

    ``labels`` defaults to the union of non-zero labels present in either map; a label absent from
    both is reported as NaN.
    """
    ta = (a.data if isinstance(a, Image) else a).reshape(-1).to(torch.int64)
    tb = (b.data if isinstance(b, Image) else b).reshape(-1).to(torch.int64).to(ta.device)
    if ta.shape != tb.shape:
        raise ValueError(f"label maps differ in size: {ta.numel()} vs {tb.numel()} voxels")
    if labels is None:
        labels = sorted((set(torch.unique(ta).tolist()) | set(torch.unique(tb).tolist())) - {0})
    labels = [int(lab) for lab in labels]
    n = int(max(int(ta.max()), int(tb.max()), max(labels, default=0))) + 1
    count_a = torch.bincount(ta, minlength=n).double()
    count_b = torch.bincount(tb, minlength=n).double()
    both = torch.bincount(ta[ta == tb], minlength=n).double()
    out = {}
    for lab in labels:
        denom = float(count_a[lab] + count_b[lab]) if lab < n else 0.0
        out[int(lab)] = 2.0 * float(both[lab]) / denom if denom > 0 else float("nan")
    return out


def mean_dice(a: Image | torch.Tensor, b: Image | torch.Tensor, labels: Sequence[int] | None = None) -> float:
    """Mean of :func:`dice_per_label` over labels present in at least one map."""
    values = [v for v in dice_per_label(a, b, labels).values() if not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _label_centroids(labels: torch.Tensor, grid: Grid, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Voxel count ``(n,)`` and world centroid (mm) ``(n, D)`` of every label value ``0..n-1``
    (the world map is affine, so the centroid of the voxel centres' world points)."""
    flat = labels.reshape(-1).to(torch.int64)
    count = torch.bincount(flat, minlength=n).double()
    ramps = grid.index_ramps(grid.index_to_world(), flat.device, torch.float64)  # (..., D) each
    centre = torch.stack([torch.bincount(flat, weights=sum(r[..., k] for r in ramps).expand(grid.shape).reshape(-1),
                                         minlength=n) for k in range(grid.ndim)], dim=1)
    return count.cpu().numpy(), (centre / count.clamp_min(1.0)[:, None]).cpu().numpy()


def label_centroid_distances(a: Image | torch.Tensor, b: Image | torch.Tensor, labels: Sequence[int] | None = None,
                             grid: Grid | None = None) -> dict[int, float]:
    """Distance (world mm) between the centroids of each label in two label maps on one grid.

    ``grid`` (needed when ``a`` is a tensor) places the voxels; by default ``a``'s. ``labels``
    defaults to the union of non-zero labels present in either map; a label absent from either
    map is reported as NaN. Complements Dice: a shifted region shows its shift in mm.
    """
    grid = grid if grid is not None else (a.grid if isinstance(a, Image) else None)
    if grid is None:
        raise ValueError("label_centroid_distances needs a grid (or Images) to place the voxels in mm")
    ta = a.data if isinstance(a, Image) else a
    tb = (b.data if isinstance(b, Image) else b).to(ta.device)
    if ta.numel() != tb.numel() or ta.numel() != grid.numel:
        raise ValueError(f"label maps and grid differ in size: {ta.numel()}, {tb.numel()}, {grid.numel} voxels")
    if labels is None:
        labels = sorted((set(torch.unique(ta).tolist()) | set(torch.unique(tb).tolist())) - {0})
    labels = [int(lab) for lab in labels]
    n = int(max(int(ta.max()), int(tb.max()), max(labels, default=0))) + 1
    count_a, centre_a = _label_centroids(ta, grid, n)
    count_b, centre_b = _label_centroids(tb, grid, n)
    return {lab: float(np.linalg.norm(centre_a[lab] - centre_b[lab])) if count_a[lab] > 0 and count_b[lab] > 0
            else float("nan") for lab in labels}


def point_distances(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Euclidean distances (mm) between corresponding points ``(N, D)``."""
    return np.linalg.norm(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64), axis=-1)


def foreground_corners(image: Image, threshold: float | None = None) -> np.ndarray:
    """World corners (mm) of the bounding box of voxels above ``threshold``, ``(2**D, D)``.

    ``threshold`` defaults to 10 % of the intensity range above the minimum.
    """
    arr = image.data[0].detach().cpu().numpy()
    if threshold is None:
        threshold = arr.min() + 0.1 * (arr.max() - arr.min())
    idx = np.argwhere(arr > threshold)
    if idx.size == 0:
        raise ValueError("no voxel above the threshold")
    lo, hi = idx.min(0)[::-1], idx.max(0)[::-1]  # (x, y, z) order
    d = image.ndim
    grid_pts = np.array(np.meshgrid(*[[lo[k], hi[k]] for k in range(d)], indexing="ij")).reshape(d, -1).T
    return image.grid.index_points_to_world(grid_pts.astype(np.float64))


def matrix_point_error(m1: np.ndarray | torch.Tensor, m2: np.ndarray | torch.Tensor, points: np.ndarray) -> np.ndarray:
    """Distances (mm) between points mapped by two homogeneous matrices."""
    a = np.asarray(torch.as_tensor(m1).detach().cpu(), dtype=np.float64)
    b = np.asarray(torch.as_tensor(m2).detach().cpu(), dtype=np.float64)
    d = a.shape[0] - 1
    pa = points @ a[:d, :d].T + a[:d, d]
    pb = points @ b[:d, :d].T + b[:d, d]
    return point_distances(pa, pb)


def landmark_tre(fixed_points: np.ndarray, moving_points: np.ndarray, displacement: Image) -> np.ndarray:
    """Target registration error (mm) per landmark: fixed points mapped by ``T(x) = x + U(x)``
    (into moving space, the direction backward warping fits) against their moving partners."""
    return point_distances(map_points(fixed_points, displacement), moving_points)


def inverse_consistency(forward: torch.Tensor, inverse: torch.Tensor, grid) -> dict[str, float]:
    """``|x + f(x) + i(x + f(x)) - x|`` (mm) over the grid, for a field ``f`` and its claimed
    inverse ``i`` (both ``(D, *grid.shape)``): mean and max, in mm."""
    from .sampling import sample_world

    pts = grid.world_points(device=forward.device, dtype=forward.dtype)
    moved = pts + torch.movedim(forward, 0, -1)
    back = moved + torch.movedim(sample_world(Image(inverse, grid), moved, padding="border"), 0, -1)
    err = (back - pts).norm(dim=-1)
    return {"mean_mm": float(err.mean()), "max_mm": float(err.max())}
