"""Analysis API over a results store: the Dataset, a summary table, the worst pairs, checks."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr

from regcore import InputError

from .store import field_path, pair_checksum, read_layout, read_values

__all__ = ["open_results", "summary_table", "worst_pairs", "verify_pair", "status_counts", "field_dataarray"]

# metrics where larger is better (worst = smallest); the others: worst = largest
HIGHER_IS_BETTER = {"dice_after", "dice_before", "ncc_after", "ncc_before", "jac_min"}


def open_results(store: str | Path) -> xr.Dataset:
    """The results as one Dataset with a ``pair`` dimension (coordinates ``pair_id``, ``fixed``,
    ``moving``), ``label`` and ``level`` dimensions, and lazily loaded fields when stacked."""
    path = Path(store)
    read_layout(path)  # clear error when there are no results
    with warnings.catch_warnings():  # pairs.csv and logs/ live beside the arrays
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        ds = xr.open_zarr(str(path), consolidated=False, zarr_format=3)
    coords = [c for c in ("pair_id", "fixed", "moving", "component") if c in ds.data_vars]
    return ds.set_coords(coords)


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
    root = zarr.open_group(str(store), mode="r", zarr_format=3)
    if str(root["status"][i]) != "complete":
        raise InputError(f"pair {layout.pairs[i].pair_id}: not complete (status {str(root['status'][i])!r})")
    values = read_values(store, i)
    if layout.stacked:
        fld = root["displacement"][i]
        labs = root["warped_labels"][i] if "warped_labels" in root else None
    else:
        g = root[field_path(layout.pairs[i].pair_id)]
        fld = g["displacement"][...]
        labs = g["warped_labels"][...] if "warped_labels" in g else None
    return pair_checksum(values, fld, labs) == str(root["checksum"][i])


def field_dataarray(store: str | Path, pair: int | str) -> xr.DataArray:
    """One pair's field as a DataArray ``(component, [z,] y, x)`` with its geometry in ``attrs``."""
    layout = read_layout(store)
    i = layout.index(pair)
    if layout.stacked:
        return open_results(store)["displacement"].isel(pair=i)
    ds = xr.open_zarr(str(Path(store) / field_path(layout.pairs[i].pair_id)), consolidated=False, zarr_format=3)
    return ds["displacement"]
