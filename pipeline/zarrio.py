"""regcore Images <-> Zarr v3 groups: chunked, compressed arrays with their geometry in attributes.

An ingested image is a group::

    <key>/            attrs: status, error, source, kind, geometry of level 0, levels, ...
        image/0       (C, Z, Y, X) float32, level 0 (the original grid)
        image/2       the same smoothed and resampled onto ``grid.downsample(2)`` (regcore's pyramid)
        image/4
        labels/0      (1, Z, Y, X) int32, optional
        mask/0        (1, Z, Y, X) uint8, optional
        landmarks     (N, D) float64, world mm (LPS), optional

Every array carries its own geometry (``spacing``, ``origin``, ``direction``, in ITK's order and
units: mm, vectors x,y,z) so that it reads back as a :class:`regcore.Image` without the source file.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from regcore import Grid, Image

__all__ = [
    "COMPRESSOR",
    "grid_attrs",
    "grid_from_attrs",
    "write_image_array",
    "read_image_array",
    "image_chunks",
    "level_name",
]

COMPRESSOR = BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")


def grid_attrs(grid: Grid) -> dict[str, Any]:
    """JSON-able geometry: ``size`` (x,y,z), ``spacing`` (mm), ``origin`` (mm), ``direction`` (row-major)."""
    return {
        "size": [int(s) for s in grid.size],
        "spacing": [float(s) for s in grid.spacing],
        "origin": [float(o) for o in grid.origin],
        "direction": [float(d) for d in np.asarray(grid.direction_matrix, dtype=float).reshape(-1)],
    }


def grid_from_attrs(attrs: dict[str, Any]) -> Grid:
    """The :class:`Grid` described by :func:`grid_attrs` output."""
    return Grid(tuple(attrs["size"]), tuple(attrs["spacing"]), tuple(attrs["origin"]), tuple(attrs["direction"]))


def level_name(factor: float) -> str:
    """Array name of a pyramid level: ``"2"`` for factor 2, ``"1.5"`` for 1.5."""
    return str(int(factor)) if float(factor).is_integer() else str(factor)


def image_chunks(shape: tuple[int, ...], edge: int = 64) -> tuple[int, ...]:
    """Chunks for a ``(C, *spatial)`` array: all channels, spatial blocks of ``edge`` voxels."""
    return (shape[0],) + tuple(min(int(s), edge) for s in shape[1:])


def write_image_array(group: zarr.Group, name: str, image: Image, dtype: str | np.dtype = "float32") -> zarr.Array:
    """Write ``image`` (data ``(C, *spatial)``) as array ``name`` of ``group``, geometry in attrs."""
    data = image.data.detach().cpu().numpy().astype(dtype, copy=False)
    arr = group.create_array(
        name,
        shape=data.shape,
        chunks=image_chunks(data.shape),
        dtype=data.dtype,
        compressors=COMPRESSOR,
        overwrite=True,
        attributes=grid_attrs(image.grid),
    )
    arr[...] = data
    return arr


def read_image_array(array: zarr.Array, dtype: torch.dtype | None = torch.float32) -> Image:
    """An :class:`Image` from an array written by :func:`write_image_array`."""
    data = torch.from_numpy(np.ascontiguousarray(array[...]))
    if dtype is not None:
        data = data.to(dtype)
    return Image(data, grid_from_attrs(dict(array.attrs)))
