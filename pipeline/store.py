"""The shared results store: one Zarr v3 directory that opens as an ``xarray.Dataset``.

Layout (``STORE`` is the cohort store that also holds ``images/``)::

    STORE/zarr.json          root attrs: config, config hash, method, versions, field layout
    STORE/pairs.csv          the frozen pair table
    STORE/<variable>         per-pair arrays, dimension ``pair`` (chunk 1), ``(pair, label)``,
                             ``(pair, level)``; coordinates ``pair``, ``pair_id``, ``fixed``, ``moving``
    STORE/displacement       (pair, component, z, y, x) float32, world mm, components x,y,z, on the
                             shared fixed grid -- when every pair has the same fixed grid ("stacked")
    STORE/warped_labels      (pair, z, y, x) int32, moving labels on the fixed grid (same condition)
    STORE/fields/<pair_id>/  ``displacement`` and ``warped_labels`` per pair otherwise

Concurrency rule: every array with a ``pair`` dimension has chunk length 1 along it, and all
metadata (array creation, attributes) is written by the driver before any task starts, so a task
writes only chunks that belong to its own pair and no two tasks ever share a chunk (no locks).
Completion rule: a task first sets its pair's ``status`` to ``running`` (invalidating any earlier
result), writes field and metrics, then the ``checksum``, then ``status="complete"`` *last*.
LocalStore writes every chunk atomically (temporary file + rename), so a pair killed at any point is
either complete with a matching checksum or not complete.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import zarr

from regcore import Grid, Image, InputError

from .pairs import Pair, append_pairs, read_pairs, write_pairs
from .zarrio import COMPRESSOR, grid_attrs, grid_from_attrs

__all__ = [
    "STRING_VARS", "FLOAT_VARS", "INT_VARS", "LABEL_VARS", "LEVEL_VARS", "CHECKSUM_VARS",
    "StoreLayout", "init_results", "read_layout", "PairWriter", "pair_checksum", "read_field",
    "read_warped_labels", "read_status", "mark_failed", "field_path", "read_values", "stored_attrs",
]

# per-pair variables (dimension "pair")
STRING_VARS = ("status", "config_hash", "inputs_hash", "method", "error", "traceback", "host", "worker",
               "device", "started", "finished", "checksum")
FLOAT_VARS = ("runtime_s", "regcore_s", "read_s", "write_s", "mse_before", "mse_after", "ncc_before",
              "ncc_after", "dice_before", "dice_after", "tre_before", "tre_after", "tre_max_after",
              "jac_min", "jac_nonpositive", "jac_std_log", "final_loss")
INT_VARS = ("iterations",)
LABEL_VARS = ("dice_label_before", "dice_label_after")   # (pair, label) float64
LEVEL_VARS = ("level_loss", "level_factor", "level_seconds")  # (pair, level) float64
LEVEL_INT_VARS = ("level_iterations", "level_stage")         # (pair, level) int32
# what the checksum covers, in this order (besides the field and warped labels)
CHECKSUM_VARS = FLOAT_VARS + INT_VARS + LABEL_VARS + LEVEL_VARS + LEVEL_INT_VARS + ("config_hash", "inputs_hash")


@dataclass(frozen=True)
class StoreLayout:
    """How the results of a store are laid out (from its root attributes)."""

    path: Path
    pairs: list[Pair]
    labels: list[int]
    n_levels: int
    stacked: bool          # fields stacked in root arrays along ``pair``
    field_grid: Grid | None  # the shared fixed grid when stacked
    ndim: int

    def index(self, pair: int | str) -> int:
        if isinstance(pair, (int, np.integer)):
            if not 0 <= int(pair) < len(self.pairs):
                raise InputError(f"pair index {pair} out of range (0..{len(self.pairs) - 1})")
            return int(pair)
        for i, p in enumerate(self.pairs):
            if p.pair_id == pair:
                return i
        raise InputError(f"no pair {pair!r} in the store {str(self.path)!r}")


def field_path(pair_id: str) -> str:
    return f"fields/{pair_id}"


def _root(store: str | Path, mode: str = "a") -> zarr.Group:
    return zarr.open_group(str(store), mode=mode, zarr_format=3)


def init_results(store: str | Path, pairs: Sequence[Pair], fixed_grids: dict[str, Grid | None],
                 labels: Sequence[int], n_levels: int, moving_has_labels: bool,
                 root_attrs: dict[str, Any], allow_removed: bool = False) -> StoreLayout:
    """Create (or check and extend) the results arrays of ``store`` for ``pairs``; driver only.

    The pair table is an append-only log (``pairs.csv``): pairs already in the store keep their
    index and their results; pairs that are new (a cohort that grew) are appended, and the arrays
    grow with them, as does the ``label`` dimension for labels never seen before and the ``level``
    dimension. Pairs of the store that ``pairs`` no longer holds (subjects removed from the
    manifest) are refused unless ``allow_removed``: they then stay in the store, untouched.

    Args:
        fixed_grids: each fixed key's Grid (``None`` if that image failed ingest).
        labels: foreground labels over the cohort (the ``label`` dimension).
        n_levels: pyramid levels over all stages of the method.
        moving_has_labels: whether to allocate ``warped_labels``.
        root_attrs: recorded in the root group (config, method, versions, ...); a ``configs``
            mapping (config hash -> config) is merged into the store's, never replaced.
        allow_removed: accept a table that lacks some of the store's pairs.
    """
    path = Path(store)
    if path.exists() and not path.is_dir():
        raise InputError(f"store {str(path)!r} is a file, not a store directory")
    root = _root(path)
    frozen = path / "pairs.csv"
    root_attrs = dict(root_attrs)
    if "configs" in root_attrs:  # every config ever used stays, keyed by its hash
        root_attrs["configs"] = {**dict(root.attrs).get("configs", {}), **root_attrs["configs"]}
    if frozen.exists():
        return _extend_results(path, root, pairs, fixed_grids, labels, n_levels, moving_has_labels, root_attrs,
                               allow_removed)
    n = len(pairs)
    grids = [fixed_grids.get(p.fixed) for p in pairs]
    known = [g for g in grids if g is not None]
    ndim = known[0].ndim if known else 3
    stacked = bool(known) and all(g is not None and g == known[0] for g in grids)
    field_grid = known[0] if stacked else None

    def make(name: str, shape: tuple, chunks: tuple, dtype: Any, dims: list[str], fill: Any, **kw: Any) -> zarr.Array:
        return root.create_array(name, shape=shape, chunks=chunks, dtype=dtype, dimension_names=dims,
                                 fill_value=fill, overwrite=True, **kw)

    coord = make("pair", (n,), (max(n, 1),), "int64", ["pair"], 0)
    coord[...] = np.arange(n)
    for name, values in (("pair_id", [p.pair_id for p in pairs]), ("fixed", [p.fixed for p in pairs]),
                         ("moving", [p.moving for p in pairs])):
        make(name, (n,), (max(n, 1),), str, ["pair"], "")[...] = np.array(values, dtype=object)
    make("label", (len(labels),), (max(len(labels), 1),), "int32", ["label"], 0)[...] = np.asarray(labels, "int32")
    make("level", (n_levels,), (max(n_levels, 1),), "int32", ["level"], 0)[...] = np.arange(n_levels, dtype="int32")
    for name in STRING_VARS:
        make(name, (n,), (1,), str, ["pair"], "")
    for name in FLOAT_VARS:
        make(name, (n,), (1,), "float64", ["pair"], np.nan)
    for name in INT_VARS:
        make(name, (n,), (1,), "int32", ["pair"], -1)
    for name in LABEL_VARS:
        make(name, (n, len(labels)), (1, max(len(labels), 1)), "float64", ["pair", "label"], np.nan)
    for name in LEVEL_VARS:
        make(name, (n, n_levels), (1, n_levels), "float64", ["pair", "level"], np.nan)
    for name in LEVEL_INT_VARS:
        make(name, (n, n_levels), (1, n_levels), "int32", ["pair", "level"], -1)

    spatial_dims = ["z", "y", "x"][3 - ndim:]
    if stacked:
        assert field_grid is not None
        shape = tuple(field_grid.shape)
        chunks = tuple(min(s, 64) for s in shape)
        make("component", (ndim,), (ndim,), str, ["component"], "")[...] = np.array(["x", "y", "z"][:ndim], dtype=object)
        make("displacement", (n, ndim) + shape, (1, ndim) + chunks, "float32", ["pair", "component"] + spatial_dims,
             np.nan, compressors=COMPRESSOR, attributes={**grid_attrs(field_grid), "units": "mm",
                                                          "description": "T(x) = x + u(x), x on the fixed grid, LPS"})
        if moving_has_labels:
            make("warped_labels", (n,) + shape, (1,) + chunks, "int32", ["pair"] + spatial_dims, -1,
                 compressors=COMPRESSOR, attributes=grid_attrs(field_grid))
    else:
        for pair, grid in zip(pairs, grids):
            _make_pair_fields(root, pair, grid, moving_has_labels)
    root.attrs.update({**root_attrs, "n_pairs": n, "n_levels": n_levels, "labels": list(map(int, labels)),
                       "stacked": stacked, "ndim": ndim, "layout_version": 1,
                       "field_grid": grid_attrs(field_grid) if field_grid is not None else None})
    write_pairs(pairs, frozen)  # frozen last: a store with pairs.csv is fully initialised
    return read_layout(path)


def _make_pair_fields(root: zarr.Group, pair: Pair, grid: Grid | None, moving_has_labels: bool) -> None:
    """The per-pair field arrays ``fields/<pair_id>/`` (unstacked layout) on the pair's fixed grid."""
    if grid is None:
        return
    g = root.require_group("fields").create_group(pair.pair_id, overwrite=True)
    shape = tuple(grid.shape)
    chunks = tuple(min(s, 64) for s in shape)
    spatial_dims = ["z", "y", "x"][3 - grid.ndim:]
    g.create_array("displacement", shape=(grid.ndim,) + shape, chunks=(grid.ndim,) + chunks, dtype="float32",
                   fill_value=np.nan, compressors=COMPRESSOR, dimension_names=["component"] + spatial_dims,
                   attributes={**grid_attrs(grid), "units": "mm"})
    if moving_has_labels:
        g.create_array("warped_labels", shape=shape, chunks=chunks, dtype="int32", fill_value=-1,
                       compressors=COMPRESSOR, dimension_names=spatial_dims, attributes=grid_attrs(grid))


def _extend_results(path: Path, root: zarr.Group, pairs: Sequence[Pair], fixed_grids: dict[str, Grid | None],
                    labels: Sequence[int], n_levels: int, moving_has_labels: bool, root_attrs: dict[str, Any],
                    allow_removed: bool) -> StoreLayout:
    """Grow an initialised store to hold ``pairs`` (see :func:`init_results`)."""
    frozen = path / "pairs.csv"
    layout = read_layout(path)
    old = layout.pairs
    wanted = set(pairs)
    removed = [p for p in old if p not in wanted]
    if removed and not allow_removed:
        gone = sorted({k for p in removed for k in (p.fixed, p.moving)} - {k for p in pairs for k in (p.fixed, p.moving)})
        raise InputError(
            f"store {str(path)!r} holds {len(removed)} pair(s) that this run's pair table lacks "
            f"({', '.join(p.pair_id for p in removed[:3])}{', ...' if len(removed) > 3 else ''})"
            + (f"; subjects no longer in the manifest: {', '.join(gone[:5])}" if gone else "")
            + ". Their results stay in the store; pass --allow-removed to run the others anyway, or use a new store "
              "for another pairing")
    known = set(old)
    new = [p for p in pairs if p not in known]
    n_old, n = len(old), len(old) + len(new)
    new_labels = [int(v) for v in labels if int(v) not in set(layout.labels)]
    all_labels = list(layout.labels) + new_labels
    grids = {p: fixed_grids.get(p.fixed) for p in new}
    if layout.stacked:
        odd = [p.pair_id for p, g in grids.items() if g is not None and g != layout.field_grid]
        if odd:
            raise InputError(f"store {str(path)!r} stacks every field on one fixed grid; new pair(s) "
                             f"{', '.join(odd[:3])} have another fixed grid: use a new store for them")
    levels = max(n_levels, layout.n_levels)

    def grow(name: str, shape: tuple) -> zarr.Array:
        arr = root[name]
        if tuple(arr.shape) != shape:
            arr.resize(shape)
        return arr

    if new:
        grow("pair", (n,))[n_old:] = np.arange(n_old, n)
        for name, values in (("pair_id", [p.pair_id for p in new]), ("fixed", [p.fixed for p in new]),
                             ("moving", [p.moving for p in new])):
            grow(name, (n,))[n_old:] = np.array(values, dtype=object)
        for name in STRING_VARS + FLOAT_VARS + INT_VARS:
            grow(name, (n,))
    if new_labels:
        grow("label", (len(all_labels),))[len(layout.labels):] = np.asarray(new_labels, "int32")
    for name in LABEL_VARS:
        grow(name, (n, len(all_labels)))
    if levels > layout.n_levels:
        grow("level", (levels,))[...] = np.arange(levels, dtype="int32")
    for name in LEVEL_VARS + LEVEL_INT_VARS:
        grow(name, (n, levels))
    if layout.stacked:
        disp = root["displacement"]
        grow("displacement", (n,) + tuple(disp.shape[1:]))
        if "warped_labels" in root:
            grow("warped_labels", (n,) + tuple(root["warped_labels"].shape[1:]))
    else:
        for p, grid in grids.items():
            _make_pair_fields(root, p, grid, moving_has_labels)
    root.attrs.update({**root_attrs, "n_pairs": n, "n_levels": levels, "labels": all_labels})
    if new:
        append_pairs(new, frozen, start=n_old)  # the log grows last: a pair is in the table once its arrays exist
    return read_layout(path)


def stored_attrs(store: str | Path) -> dict[str, Any]:
    """The root attributes of a store that holds results (method config, pairing, ...); {} if none."""
    if not (Path(store) / "pairs.csv").exists():
        return {}
    return dict(_root(store, "r").attrs)


def read_layout(store: str | Path) -> StoreLayout:
    """The layout of an initialised store."""
    path = Path(store)
    if not (path / "pairs.csv").exists():
        raise InputError(f"store {str(path)!r}: no results (run `cohortreg run` first)")
    attrs = dict(_root(path, "r").attrs)
    fg = attrs.get("field_grid")
    return StoreLayout(path=path, pairs=read_pairs(path / "pairs.csv"), labels=list(attrs["labels"]),
                       n_levels=int(attrs["n_levels"]), stacked=bool(attrs["stacked"]),
                       field_grid=grid_from_attrs(fg) if fg else None, ndim=int(attrs["ndim"]))


def read_status(store: str | Path) -> dict[str, np.ndarray]:
    """``status``, ``config_hash`` and ``inputs_hash`` of every pair (small reads, for the runner)."""
    root = _root(store, "r")
    return {name: np.asarray(root[name][...], dtype=object) for name in ("status", "config_hash", "inputs_hash")}


def _canonical(values: dict[str, Any]) -> bytes:
    def norm(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return [norm(x) for x in v.tolist()]
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        if isinstance(v, (float, np.floating)):
            v = float(v)
            return "nan" if math.isnan(v) else repr(v)
        if isinstance(v, (np.integer,)):
            return int(v)
        return v

    return json.dumps({k: norm(values[k]) for k in CHECKSUM_VARS}, sort_keys=False).encode()


def pair_checksum(values: dict[str, Any], field: np.ndarray | None, warped_labels: np.ndarray | None) -> str:
    """sha256 over a pair's metrics (as stored: float64/int32) and its field (float32) and labels (int32)."""
    h = hashlib.sha256(_canonical(values))
    if field is not None:
        h.update(np.ascontiguousarray(field, dtype="float32").tobytes())
    if warped_labels is not None:
        h.update(np.ascontiguousarray(warped_labels, dtype="int32").tobytes())
    return h.hexdigest()


def _as_stored(arr: zarr.Array, value: Any) -> Any:
    """``value`` cast (and, for a ``(pair, k)`` array, padded) as array ``arr`` stores one pair's entry."""
    fill = np.nan if arr.dtype.kind == "f" else arr.fill_value
    if arr.ndim == 2:
        row = np.full(arr.shape[1], fill, dtype=arr.dtype)
        if value is not None:
            v = np.asarray(value, dtype=arr.dtype)[: arr.shape[1]]
            row[: len(v)] = v
        return row
    if arr.dtype.kind in "fiu":
        return np.asarray(fill if value is None else value, dtype=arr.dtype)[()]
    return "" if value is None else str(value)


def read_values(store: str | Path, index: int) -> dict[str, Any]:
    """A pair's :data:`CHECKSUM_VARS` as stored (the input of :func:`pair_checksum`)."""
    root = _root(store, "r")
    return {name: _as_stored(root[name], root[name][index]) for name in CHECKSUM_VARS}


class PairWriter:
    """Writes one pair's results; a task holds one and touches only its pair's chunks."""

    def __init__(self, store: str | Path, index: int):
        self.root = _root(store, "r+")
        self.layout = read_layout(store)
        self.index = index
        self.pair = self.layout.pairs[index]

    def _field_arrays(self) -> tuple[Any, Any]:
        if self.layout.stacked:
            disp = self.root["displacement"]
            labs = self.root["warped_labels"] if "warped_labels" in self.root else None
            return disp, labs
        path = field_path(self.pair.pair_id)
        if path not in self.root:
            return None, None
        g = self.root[path]
        return g["displacement"], (g["warped_labels"] if "warped_labels" in g else None)

    def begin(self, **strings: str) -> None:
        """Invalidate any earlier result of this pair (status ``running``) and record who runs it."""
        for name, value in strings.items():  # who runs it first: a death right after "running" still names the worker
            self.root[name][self.index] = value
        self.root["status"][self.index] = "running"
        self.root["config_hash"][self.index] = ""
        self.root["checksum"][self.index] = ""

    def write_field(self, field: np.ndarray, warped_labels: np.ndarray | None) -> None:
        disp, labs = self._field_arrays()
        if disp is None:
            raise InputError(f"pair {self.pair.pair_id}: the store has no field array for it")
        if self.layout.stacked:
            disp[self.index] = field
            if labs is not None and warped_labels is not None:
                labs[self.index] = warped_labels
        else:
            disp[...] = field
            if labs is not None and warped_labels is not None:
                labs[...] = warped_labels

    @property
    def has_warped_labels(self) -> bool:
        return self._field_arrays()[1] is not None

    def as_stored(self, values: dict[str, Any]) -> dict[str, Any]:
        """Every :data:`CHECKSUM_VARS` value as the store holds it: cast to the array's dtype,
        vectors padded with the fill value, absent ones as the fill value."""
        return {name: _as_stored(self.root[name], values.get(name)) for name in CHECKSUM_VARS}

    def write_values(self, values: dict[str, Any]) -> None:
        """Per-pair metrics: names from the ``*_VARS`` tuples; vectors padded to the dimension."""
        for name, value in values.items():
            arr = self.root[name]
            arr[self.index] = _as_stored(arr, value)

    def finish(self, status: str) -> None:
        """The status, written last."""
        self.root["status"][self.index] = status


def mark_failed(store: str | Path, index: int, error: str, tb: str = "", **strings: str) -> None:
    """Record a pair that failed outside its task (worker died, task lost); driver only."""
    w = PairWriter(store, index)
    w.root["error"][index] = error
    w.root["traceback"][index] = tb
    for name, value in strings.items():
        w.root[name][index] = value
    w.finish("failed")


def read_field(store: str | Path, pair: int | str) -> Image:
    """A pair's displacement field as a :class:`regcore.Image` (world mm, (x,y,z) components, fixed grid).

    Export it with :func:`regcore.export.write_displacement` for SimpleITK / ANTs.
    """
    layout = read_layout(store)
    i = layout.index(pair)
    root = _root(store, "r")
    if layout.stacked:
        arr = root["displacement"]
        data = arr[i]
    else:
        arr = root[field_path(layout.pairs[i].pair_id)]["displacement"]
        data = arr[...]
    return Image(torch.from_numpy(np.ascontiguousarray(data)), grid_from_attrs(dict(arr.attrs)))


def read_warped_labels(store: str | Path, pair: int | str) -> Image | None:
    """The moving label map warped onto the fixed grid (nearest neighbour), if the pair had labels."""
    layout = read_layout(store)
    i = layout.index(pair)
    root = _root(store, "r")
    if layout.stacked:
        if "warped_labels" not in root:
            return None
        arr = root["warped_labels"]
        data = arr[i]
    else:
        g = root[field_path(layout.pairs[i].pair_id)]
        if "warped_labels" not in g:
            return None
        arr = g["warped_labels"]
        data = arr[...]
    return Image(torch.from_numpy(np.ascontiguousarray(data))[None], grid_from_attrs(dict(arr.attrs)))
