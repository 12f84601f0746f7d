"""Which anatomical direction each array axis follows, and how to show a slice the usual way up.

World coordinates are ITK's LPS: +x points to the patient's Left, +y Posterior, +z Superior. A
grid's direction matrix has the world direction of index axis ``k`` (ITK order: x, y, z) as its
column ``k``; the nearest world axis of that column (largest absolute component) and its sign give
the letter at the high-index end of the axis (an oblique axis is named after its nearest world
axis). Array axis ``a`` of a ``(z, y, x)`` volume is index axis ``ndim - 1 - a``.

Display: rows run top to bottom and columns left to right. The more vertical of a slice's two axes
(S/I before A/P before L/R) goes down the rows, with S (or A) at the top; columns put R on the left
(radiological convention) or A on the left in sagittal views. Every slice carries its four edge
letters so that the picture states its own orientation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from regcore import Grid

__all__ = ["axis_letters", "PlaneView", "plane_views", "take_slice"]

_HIGH = ("L", "P", "S")   # LPS: the letter a positive world axis points to
_LOW = ("R", "A", "I")
_PLANE = {0: "sagittal", 1: "coronal", 2: "axial"}   # named after the world axis a slice is normal to
_TOP = {2: "S", 1: "A", 0: "R"}     # preferred top letter per world axis of the row axis
_LEFT = {0: "R", 1: "A", 2: "S"}    # preferred left letter per world axis of the column axis


def _world_axis(direction: np.ndarray, k: int) -> tuple[int, float]:
    col = np.asarray(direction, dtype=float)[:, k]
    w = int(np.argmax(np.abs(col)))
    return w, float(np.sign(col[w]) or 1.0)


def axis_letters(direction: np.ndarray) -> list[tuple[str, str]]:
    """Per index axis (ITK order x, y, z): the letters at its (low-index, high-index) ends."""
    d = np.asarray(direction, dtype=float)
    out = []
    for k in range(d.shape[1]):
        w, s = _world_axis(d, k)
        hi, lo = (_HIGH[w], _LOW[w]) if s > 0 else (_LOW[w], _HIGH[w])
        out.append((lo, hi))
    return out


@dataclass(frozen=True)
class PlaneView:
    """One displayed slice of a grid.

    Attributes:
        name: ``axial``/``coronal``/``sagittal`` (3D) or ``slice`` (2D).
        normal_axis: index axis the slice is normal to (None in 2D).
        row_axis, col_axis: index axes shown down the rows and across the columns.
        flip_rows, flip_cols: whether the index runs backwards on screen.
        letters: ``(top, bottom, left, right)`` anatomical letters at the edges.
        pixel_mm: ``(row, column)`` spacing in mm.
    """

    name: str
    normal_axis: int | None
    row_axis: int
    col_axis: int
    flip_rows: bool
    flip_cols: bool
    letters: tuple[str, str, str, str]
    pixel_mm: tuple[float, float]


def _view(grid: Grid, normal: int | None, axes: list[int], letters: list[tuple[str, str]],
          world: list[int]) -> PlaneView:
    # the more vertical axis (S/I, then A/P, then L/R) goes down the rows
    row, col = sorted(axes, key=lambda k: -world[k])
    flip_rows = letters[row][1] == _TOP[world[row]]        # the preferred top letter sits at the high end
    flip_cols = letters[col][1] == _LEFT[world[col]]
    top, bottom = letters[row][::-1] if flip_rows else letters[row]
    left, right = letters[col][::-1] if flip_cols else letters[col]
    name = _PLANE[world[normal]] if normal is not None else "slice"
    return PlaneView(name, normal, row, col, flip_rows, flip_cols, (top, bottom, left, right),
                     (float(grid.spacing[row]), float(grid.spacing[col])))


def plane_views(grid: Grid) -> list[PlaneView]:
    """The three orthogonal slices of a 3D grid (axial, coronal, sagittal order when the grid is
    near axis-aligned), or the one slice of a 2D grid."""
    d = np.asarray(grid.direction_matrix, dtype=float)
    letters = axis_letters(d)
    world = [_world_axis(d, k)[0] for k in range(grid.ndim)]
    if grid.ndim == 2:
        return [_view(grid, None, [0, 1], letters, world)]
    views = [_view(grid, n, [k for k in range(3) if k != n], letters, world) for n in range(3)]
    return sorted(views, key=lambda v: -world[v.normal_axis])  # type: ignore[index]


def take_slice(volume: np.ndarray, view: PlaneView, index: int | None = None) -> np.ndarray:
    """The 2D slice of ``volume`` (array order ``(z, y, x)`` or ``(y, x)``) shown by ``view``,
    through ``index`` along the normal axis (default: the centre), oriented for display."""
    ndim = volume.ndim
    arr = volume
    remaining = [ndim - 1 - a for a in range(ndim)]   # index axes of arr's dims, in array order
    if view.normal_axis is not None:
        a = ndim - 1 - view.normal_axis
        arr = np.take(arr, volume.shape[a] // 2 if index is None else index, axis=a)
        remaining.pop(a)
    if remaining[0] != view.row_axis:
        arr = arr.T
    if view.flip_rows:
        arr = arr[::-1]
    if view.flip_cols:
        arr = arr[:, ::-1]
    return np.ascontiguousarray(arr)
