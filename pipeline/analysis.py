"""Analysis API over a results store: the Dataset, a summary table, the worst pairs, checks.

The Dataset (:func:`open_results`) is the store as ``xarray.open_zarr`` reads it, made convenient:

* every variable has ``units``/``description`` (and, for metrics, ``higher_is_better``) attributes
  (:data:`pipeline.store.VAR_ATTRS`; filled in here for stores written before they were stored);
* the string coordinates ``pair_id``, ``fixed``, ``moving``, ``component`` are numpy unicode arrays
  (in memory), so ``ds.where(ds.moving == "sub-03", drop=True)``, ``ds.sel(pair=ds.pair_id == ...)``
  and ``ds.set_index(pair="pair_id").sel(pair="sub-03--to--atlas")`` work; the other string variables
  stay lazy as object arrays of ``str`` (compute a condition on them first:
  ``ds.where((ds.status == "complete").compute(), drop=True)``);
* a stacked store's field dimensions ``z``, ``y``, ``x`` get world coordinates in mm
  (:func:`spatial_coords`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from regcore import Grid, InputError

from .store import VAR_ATTRS, field_path, open_root, pair_checksum, read_layout, read_values, var_attrs
from .zarrio import grid_from_attrs

__all__ = ["open_results", "summary_table", "worst_pairs", "verify_pair", "status_counts", "field_dataarray",
           "spatial_coords", "HIGHER_IS_BETTER"]

#: metrics where larger is better (worst = smallest); the others: worst = largest
HIGHER_IS_BETTER = frozenset(name for name, (_, _, better) in VAR_ATTRS.items() if better)

STRING_COORDS = ("pair_id", "fixed", "moving", "component")
FIELD_VARS = ("displacement", "warped_labels")
_WORLD_AXES = ("x", "y", "z")


def _open_zarr(path: Path) -> xr.Dataset:
    """``xarray.open_zarr`` of a group read from its nodes' own metadata (always current)."""
    with warnings.catch_warnings():  # pairs.csv, logs/ and run.lock live beside the arrays
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        return xr.open_zarr(str(path), consolidated=False, zarr_format=3)


def open_results(store: str | Path) -> xr.Dataset:
    """The results as one Dataset with a ``pair`` dimension (coordinates ``pair_id``, ``fixed``,
    ``moving``), ``label`` and ``level`` dimensions, and lazily loaded fields when stacked (their
    ``z``, ``y``, ``x`` with world coordinates in mm, see :func:`spatial_coords`). See the module
    docstring for what the view adds to ``xarray.open_zarr``."""
    path = Path(store)
    layout = read_layout(path)  # clear error when there are no results
    return _view(_open_zarr(path), layout.field_grid if layout.stacked else None)


def _unicode(values: Any) -> np.ndarray:
    """Strings (numpy StringDType or object) as a numpy unicode array (``<U..``)."""
    return np.asarray(values).astype(object).astype(str)


def _view(ds: xr.Dataset, grid: Grid | None) -> xr.Dataset:
    """String coordinates in memory as unicode, other strings lazy as objects, attributes from
    :data:`VAR_ATTRS` where the store lacks them, world coordinates for fields on ``grid``."""
    ds = ds.set_coords([c for c in STRING_COORDS if c in ds.data_vars])
    ds = ds.assign_coords({c: (ds[c].dims, _unicode(ds[c].values), ds[c].attrs)
                           for c in STRING_COORDS if c in ds.coords})
    for name in list(ds.data_vars):
        if ds[name].dtype.kind == "T":  # numpy StringDType: xarray's where/concat cannot promote it
            ds[name] = ds[name].astype(object)
    for name, var in ds.variables.items():
        for key, value in var_attrs(str(name)).items():
            var.attrs.setdefault(key, value)
    if grid is not None and any(v in ds for v in FIELD_VARS):
        coords, attrs = spatial_coords(grid)
        ds = ds.assign_coords({d: c for d, c in coords.items() if d in ds.dims})
        for v in FIELD_VARS:
            if v in ds:
                ds[v].attrs.update(attrs)
    return ds


def _world_axes(direction: np.ndarray, atol: float = 1e-6) -> list[int] | None:
    """The world axis each index axis runs along when ``direction`` is a signed permutation (to
    ``atol``), else ``None``."""
    out = []
    for k in range(direction.shape[1]):
        col = np.abs(direction[:, k])
        w = int(np.argmax(col))
        if abs(col[w] - 1.0) > atol or np.delete(col, w).max(initial=0.0) > atol:
            return None
        out.append(w)
    return out if len(set(out)) == len(out) else None


def spatial_coords(grid: Grid) -> tuple[dict[str, xr.Variable], dict[str, Any]]:
    """Coordinates of the spatial dimensions (``[z,] y, x``, tensor order) of arrays on ``grid``,
    and attributes for the variables on it.

    When the direction matrix is axis-aligned (a signed permutation, e.g. LPS or RAS scans), each
    dimension's coordinate is the world position (mm, LPS) that varies along it, with attributes
    ``units="mm"`` and ``world_axis`` (``"x (LPS)"``: with a permuted direction, dimension ``x``
    may run along world y). Otherwise the coordinates are voxel indices and the world positions
    follow from the ``index_to_world`` attribute. The variable attributes always hold
    ``index_to_world``: the homogeneous 4x4 (3x3 in 2D) matrix mapping the ITK index
    ``(i_x, i_y[, i_z], 1)`` -- the array's spatial dimensions in reverse order -- to world mm.
    """
    d = grid.ndim
    dims = ["z", "y", "x"][3 - d:]
    worlds = _world_axes(grid.direction_matrix)
    coords: dict[str, xr.Variable] = {}
    for j, dim in enumerate(dims):
        k = d - 1 - j  # the ITK index axis of this dimension
        n = grid.size[k]
        if worlds is None:
            coords[dim] = xr.Variable(dim, np.arange(n), {
                "description": f"voxel index along {dim} (the direction is oblique: world mm = index_to_world "
                               "of the field variables)"})
            continue
        index = np.zeros((n, d))
        index[:, k] = np.arange(n)
        w = worlds[k]
        coords[dim] = xr.Variable(dim, grid.index_points_to_world(index)[:, w], {
            "units": "mm", "world_axis": f"{_WORLD_AXES[w]} (LPS)",
            "description": f"world {_WORLD_AXES[w]} (mm, LPS) of the voxel centres along {dim}"})
    attrs = {"index_to_world": grid.index_to_world().tolist(),
             "index_to_world_input": "ITK index (" + ", ".join("ijk"[:d]) + ", 1) = array dims "
                                     + ", ".join(reversed(dims)) + " (reversed)"}
    return coords, attrs


def _strings(values: np.ndarray) -> np.ndarray:
    """Any numpy string array (StringDType, object, unicode) as an object array of ``str``."""
    return np.array([str(v) for v in np.asarray(values).ravel()], dtype=object).reshape(np.shape(values))


def status_counts(ds: xr.Dataset) -> dict[str, int]:
    """How many pairs are complete, failed, running (started, not finished), interrupted (left
    running by a Ctrl-C) and pending."""
    status = _strings(ds["status"].values)
    return {"complete": int((status == "complete").sum()), "failed": int((status == "failed").sum()),
            "running": int((status == "running").sum()), "interrupted": int((status == "interrupted").sum()),
            "pending": int((status == "").sum()),
            "total": int(status.size)}


SUMMARY_COLUMNS = ("fixed", "moving", "status", "dice_before", "dice_after", "tre_before", "tre_after",
                   "ncc_before", "ncc_after", "jac_min", "jac_nonpositive", "iterations", "runtime_s", "device", "error")


def summary_table(ds: xr.Dataset, columns: tuple[str, ...] = SUMMARY_COLUMNS):
    """One row per pair (index ``pair_id``) as a pandas DataFrame; columns absent are dropped."""
    import pandas as pd

    data: dict[str, Any] = {}
    for c in columns:
        if c in ds.variables and ds[c].dims == ("pair",):
            values = ds[c].values
            data[c] = _strings(values) if values.dtype.kind not in "fiub" else values
    return pd.DataFrame(data, index=pd.Index(_strings(ds["pair_id"].values), name="pair_id"))


def worst_pairs(ds: xr.Dataset, metric: str = "dice_after", n: int = 10):
    """The ``n`` complete pairs worst by ``metric`` (smallest for Dice/NCC/min Jacobian, else largest)."""
    if metric not in ds.variables or ds[metric].dims != ("pair",):
        per_pair = [v for v in ds.data_vars if ds[v].dims == ("pair",)]
        raise InputError(f"unknown per-pair metric {metric!r}; available: {', '.join(sorted(per_pair))}")
    table = summary_table(ds, tuple(dict.fromkeys(("fixed", "moving", "status", metric))))
    table = table[table["status"] == "complete"].dropna(subset=[metric])
    return table.sort_values(metric, ascending=metric in HIGHER_IS_BETTER).head(n)


def verify_pair(store: str | Path, pair: int | str) -> bool:
    """Recompute a complete pair's checksum from what the store holds; True if it matches."""
    layout = read_layout(store)
    i = layout.index(pair)
    root = open_root(store, "r")
    if str(root["status"][i]) != "complete":
        raise InputError(f"pair {layout.pairs[i].pair_id}: not complete (status {str(root['status'][i])!r})")
    values = read_values(store, i)
    disp, warped, entry = layout.field_arrays(root, i)
    fld = disp[entry] if disp is not None else None
    labs = warped[entry] if warped is not None else None
    return pair_checksum(values, fld, labs) == str(root["checksum"][i])


def field_dataarray(store: str | Path, pair: int | str) -> xr.DataArray:
    """One pair's field as a DataArray ``(component, [z,] y, x)`` (mm, components x, y, z LPS) with
    world coordinates on its fixed grid (:func:`spatial_coords`) and its geometry in ``attrs``."""
    layout = read_layout(store)
    i = layout.index(pair)
    if layout.stacked:
        return open_results(store)["displacement"].isel(pair=i)
    ds = _open_zarr(Path(store) / field_path(layout.pairs[i].pair_id))
    da = ds["displacement"]
    grid = grid_from_attrs(da.attrs)
    coords, attrs = spatial_coords(grid)
    da = da.assign_coords({**coords, "component": ("component", np.array(list("xyz"[:grid.ndim])),
                                                   var_attrs("component"))})
    for key, value in var_attrs("displacement").items():
        da.attrs.setdefault(key, value)
    da.attrs.update(attrs)
    return da
