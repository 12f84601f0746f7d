"""Point sets (landmarks): reading elastix/CSV files into world mm, and mapping them."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .grid import Grid
from .image import Image
from .sampling import warp_points_field

__all__ = ["read_points", "map_points"]


def read_points(path: str | Path, grid: Grid | None = None) -> np.ndarray:
    """Read landmarks as world coordinates (mm, LPS), ``(N, D)``.

    Formats: elastix point files (first line ``point`` or ``index``, second the count, then one
    point per line; ``index`` files are voxel indices and need the image's ``grid``), or a CSV with
    ``x,y[,z]`` columns in mm.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"landmarks {str(p)!r}: no such file")
    text = p.read_text().strip().splitlines()
    if not text:
        raise InputError(f"landmarks {str(p)!r}: empty file")
    head = text[0].strip().lower()
    try:
        if head in ("point", "index"):
            count = int(text[1].split()[0])
            pts = np.array([[float(v) for v in line.split()] for line in text[2 : 2 + count]], dtype=np.float64)
            if len(pts) != count:
                raise InputError(f"landmarks {str(p)!r}: header says {count} points, found {len(pts)}")
            if head == "index":
                if grid is None:
                    raise InputError(f"landmarks {str(p)!r}: holds voxel indices; pass the image grid to convert them")
                pts = grid.index_points_to_world(pts)
            return pts
        rows = list(csv.DictReader(text))
        keys = [k for k in ("x", "y", "z") if rows and k in rows[0]]
        if len(keys) < 2:
            raise InputError(f"landmarks {str(p)!r}: not an elastix point file and no x,y[,z] CSV columns")
        return np.array([[float(r[k]) for k in keys] for r in rows], dtype=np.float64)
    except (ValueError, IndexError) as exc:
        raise InputError(f"landmarks {str(p)!r}: cannot parse ({exc})") from exc


def map_points(points: np.ndarray | torch.Tensor, displacement: Image) -> np.ndarray:
    """Map fixed-space world points through ``T(x) = x + U(x)`` (``U`` linearly interpolated)."""
    pts = torch.as_tensor(np.asarray(points, dtype=np.float64), device=displacement.device)
    return warp_points_field(pts, displacement.to(dtype=torch.float64)).cpu().numpy()
