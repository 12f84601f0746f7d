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

Every array carries ``units``, ``description`` and (metrics) ``higher_is_better`` attributes from
:data:`VAR_ATTRS`. NGFF metadata (OME-Zarr :data:`NGFF_VERSION`, the RFC-5 coordinate systems and
transformations): the root's ``attrs["ome"]["scene"]`` names each subject's LPS world (axes x, y, z
in millimeter) and holds one ``displacements`` transformation per pair (fixed world -> moving world,
``path`` to its field, ``"cohortreg:pair"`` its index in a stacked field); every displacement array's
``attrs["ome"]`` maps its array index to the fixed world (``affine``); each per-pair field group
holds its pair's scene. After the driver has written the metadata (:func:`init_results`, the end
of a run) the root's metadata is consolidated, so that ``xarray.open_zarr(STORE)`` reads it in one
go; the store's own readers open it unconsolidated (:func:`open_root`) and never see stale metadata.

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
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import zarr

from regcore import Grid, Image, InputError
from regcore.pair_metrics import metric_fields

from .pairs import Pair, append_pairs, read_pairs, write_pairs
from .zarrio import COMPRESSOR, grid_attrs, grid_from_attrs

__all__ = [
    "STRING_VARS", "FLOAT_VARS", "INT_VARS", "LABEL_VARS", "LEVEL_VARS", "CHECKSUM_VARS",
    "VAR_ATTRS", "var_attrs", "LAYOUT_VERSION", "check_layout_version", "NGFF_VERSION", "StoreLayout", "init_results", "read_layout", "PairWriter",
    "pair_checksum", "read_field", "read_warped_labels", "read_status", "mark_failed", "field_path", "read_values",
    "stored_attrs", "open_root", "consolidate", "ngff_scene", "ngff_field", "StackedFields", "PerPairFields",
    "field_layout",
]

#: the results layout this code writes and reads (root attribute ``layout_version``); version 1
#: stores from every earlier release are read as they are (the additions since, the ``configs``
#: and ``pairing`` attributes, the growing pair table, are optional)
LAYOUT_VERSION = 1

# per-pair variables (dimension "pair")
STRING_VARS = ("status", "config_hash", "inputs_hash", "method", "error", "traceback", "host", "worker",
               "device", "started", "finished", "checksum")
# the quality metrics are regcore's PairMetrics, in its declaration order (scalars, then per label)
_METRICS = metric_fields()
FLOAT_VARS = (("runtime_s", "regcore_s", "read_s", "write_s") + tuple(m.name for m in _METRICS if not m.dims)
              + ("final_loss",))
INT_VARS = ("iterations",)
LABEL_VARS = tuple(m.name for m in _METRICS if m.dims == ("label",))   # (pair, label) float64
LEVEL_VARS = ("level_loss", "level_factor", "level_seconds")  # (pair, level) float64
LEVEL_INT_VARS = ("level_iterations", "level_stage")         # (pair, level) int32
# what the checksum covers, in this order (besides the field and warped labels)
CHECKSUM_VARS = FLOAT_VARS + INT_VARS + LABEL_VARS + LEVEL_VARS + LEVEL_INT_VARS + ("config_hash", "inputs_hash")

# What every array of the results means: name -> (units or None, description, higher_is_better or None).
# Units are UDUNITS/CF strings ("1": dimensionless); strings and identifiers have none. The quality
# metrics come from regcore's PairMetrics (declared there once); the rest is the pipeline's own.
_METRICS = {m.name: (m.units, m.description, m.higher_is_better) for m in metric_fields()}
VAR_ATTRS: dict[str, tuple[str | None, str, bool | None]] = {
    # coordinates
    "pair": (None, "row of the store's pair table (pairs.csv, append-only)", None),
    "pair_id": (None, "pair identifier, '<moving>--to--<fixed>'", None),
    "fixed": (None, "ingest key of the fixed image (the field's grid)", None),
    "moving": (None, "ingest key of the moving image (warped onto the fixed grid)", None),
    "label": (None, "foreground label value (background 0 excluded)", None),
    "level": (None, "pyramid level, over all stages of the method in run order", None),
    "component": (None, "displacement component: world axis x, y, z (LPS)", None),
    # bookkeeping strings
    "status": (None, "'' pending, 'running', 'complete' (written last), 'failed' or 'interrupted'", None),
    "config_hash": (None, "hash of the method config that produced the result (key of attrs['configs'])", None),
    "inputs_hash": (None, "sha256 over the fixed and moving images' content hashes", None),
    "method": (None, "name of the registration method", None),
    "error": (None, "why the pair failed ('' if it did not)", None),
    "traceback": (None, "Python traceback of a failed pair", None),
    "host": (None, "host name that ran the pair", None),
    "worker": (None, "Dask worker address (or pid) that ran the pair", None),
    "device": (None, "torch device of the registration", None),
    "started": (None, "UTC time the task started, ISO 8601", None),
    "finished": (None, "UTC time the task finished, ISO 8601", None),
    "checksum": (None, "sha256 over the pair's metrics, field and warped labels (see verify_pair)", None),
    # timings and optimiser records
    "runtime_s": ("s", "wall time of the whole task: read, register, evaluate, write", False),
    "regcore_s": ("s", "wall time of the registration alone", False),
    "read_s": ("s", "wall time reading both subjects from the store", False),
    "write_s": ("s", "wall time writing the field, warped labels and metrics", False),
    "final_loss": (None, "objective value at the end of the last level (units of the method's measures)", None),
    "iterations": ("1", "optimiser iterations over all levels", None),
    "level_loss": (None, "objective value at the end of each level (units of the method's measures)", None),
    "level_factor": ("1", "downsampling factor of each level", None),
    "level_seconds": ("s", "wall time of each level", None),
    "level_iterations": ("1", "optimiser iterations of each level", None),
    "level_stage": ("1", "index of the method stage a level belongs to", None),
    # quality metrics (regcore.pair_metrics.PairMetrics)
    **{name: _METRICS[name] for name in FLOAT_VARS + LABEL_VARS if name in _METRICS},
    # fields
    "displacement": ("mm", ("u(x) of T(x) = x + u(x): fixed-grid voxel x (world mm, LPS) -> moving world; "
                            "components x, y, z (ITK DisplacementFieldTransform)"), None),
    "warped_labels": (None, "moving labels warped onto the fixed grid by nearest neighbour (-1: not written)", None),
}


def var_attrs(name: str) -> dict[str, Any]:
    """The Zarr/xarray attributes of variable ``name``: ``units`` (if any), ``description``,
    ``higher_is_better`` (if declared); ``{}`` for a name :data:`VAR_ATTRS` does not know."""
    if name not in VAR_ATTRS:
        return {}
    units, description, better = VAR_ATTRS[name]
    out: dict[str, Any] = {"description": description}
    if units is not None:
        out["units"] = units
    if better is not None:
        out["higher_is_better"] = better
    return out


# ------------------------------------------------------------------ NGFF (OME-Zarr) metadata
#: OME-Zarr version of the ``ome`` attributes: 0.6rc0, the release candidate of OME-Zarr 0.6 that
#: adopted RFC-5 (coordinate systems and coordinate transformations, including ``displacements``).
NGFF_VERSION = "0.6rc0"


def _world_system(key: str, ndim: int) -> dict[str, Any]:
    """The LPS world of subject ``key`` as an NGFF coordinate system: axes x, y[, z] in millimeter,
    the order of ITK points and of the displacement components (RFC-5: component i is output axis i)."""
    return {"name": key, "axes": [{"name": a, "type": "space", "unit": "millimeter", "longName": f"{a} (LPS)"}
                                  for a in "xyz"[:ndim]]}


def _index_to_world_rows(grid: Grid, lead: int) -> list[list[float]]:
    """The ``D x (N + 1)`` NGFF affine from array index ``(lead axes..., [z,] y, x)`` (the array's
    dimension order, ``N = lead + D``) to world ``(x, y[, z])`` mm; the lead axes do not move points."""
    m = grid.index_to_world()  # ITK index (x, y, z) -> world
    d = grid.ndim
    return [[0.0] * lead + [float(m[r, d - 1 - j]) for j in range(d)] + [float(m[r, d])] for r in range(d)]


def ngff_field(grid: Grid, path: str, fixed_keys: Sequence[str], lead: int) -> dict[str, Any]:
    """``ome`` attributes of a displacement array at ``path`` (relative to its group) on ``grid``:
    the fixed worlds it is sampled in and an ``affine`` from its array index to each of them."""
    rows = _index_to_world_rows(grid, lead)
    keys = list(dict.fromkeys(fixed_keys))
    return {"version": NGFF_VERSION, "coordinateSystems": [_world_system(k, grid.ndim) for k in keys],
            "coordinateTransformations": [{"type": "affine", "name": f"{path} index to {k} world",
                                           "input": {"path": path}, "output": {"name": k}, "affine": rows}
                                          for k in keys]}


def ngff_scene(pairs: Sequence[tuple[int, Pair, str]], ndim: int, stacked: bool) -> dict[str, Any]:
    """``ome`` attributes with a ``scene``: each subject's world and, per ``(index, pair, field path)``,
    a ``displacements`` transformation from the fixed world to the moving world (backward warping:
    ``T(x) = x + u(x)`` maps fixed points into the moving image)."""
    keys = list(dict.fromkeys([p.fixed for _, p, _ in pairs] + [p.moving for _, p, _ in pairs]))
    transforms = []
    for index, pair, path in pairs:
        t: dict[str, Any] = {"type": "displacements", "name": pair.pair_id, "path": path, "interpolation": "linear",
                             "input": {"name": pair.fixed}, "output": {"name": pair.moving}}
        if stacked:
            t["cohortreg:pair"] = index  # the pair's index along the field array's first axis
        transforms.append(t)
    scene: dict[str, Any] = {"coordinateSystems": [_world_system(k, ndim) for k in keys]}
    if transforms:
        scene["coordinateTransformations"] = transforms
    return {"version": NGFF_VERSION, "scene": scene}


def _root_scene(pairs: Sequence[Pair], has_field: Sequence[bool], fields: "FieldLayout", ndim: int) -> dict[str, Any]:
    """The root's scene: every pair (index = row of the table) that has a field array."""
    entries = [(i, p, fields.entry(p)) for i, (p, has) in enumerate(zip(pairs, has_field)) if has]
    return ngff_scene(entries, ndim, fields.stacked)


class StackedFields:
    """Field layout when every pair has the same fixed grid: root arrays ``displacement``
    ``(pair, component, *spatial)`` and ``warped_labels`` ``(pair, *spatial)``, a pair's slice at
    its index."""

    stacked = True

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def arrays(self, root: zarr.Group, index: int, pair: Pair) -> tuple[Any, Any, Any]:
        """``(displacement array, warped-labels array or None, selector of the pair's entry)``."""
        if "displacement" not in root:
            return None, None, index
        return root["displacement"], (root["warped_labels"] if "warped_labels" in root else None), index

    def create(self, root: zarr.Group, pairs: Sequence[Pair], grids: Sequence[Grid | None],
               moving_has_labels: bool, make: Any) -> None:
        ndim, n = self.grid.ndim, len(pairs)
        shape = tuple(self.grid.shape)
        chunks = tuple(min(s, 64) for s in shape)
        spatial_dims = ["z", "y", "x"][3 - ndim:]
        make("component", (ndim,), (ndim,), str, ["component"], "")[...] = np.array(["x", "y", "z"][:ndim], dtype=object)
        make("displacement", (n, ndim) + shape, (1, ndim) + chunks, "float32", ["pair", "component"] + spatial_dims,
             np.nan, compressors=COMPRESSOR, attributes={
                 **grid_attrs(self.grid), "ome": ngff_field(self.grid, "displacement", [p.fixed for p in pairs], 2)})
        if moving_has_labels:
            make("warped_labels", (n,) + shape, (1,) + chunks, "int32", ["pair"] + spatial_dims, -1,
                 compressors=COMPRESSOR, attributes=grid_attrs(self.grid))

    def grow(self, root: zarr.Group, table: Sequence[Pair], new: dict[Pair, Grid | None],
             moving_has_labels: bool, path: Path) -> list[bool]:
        """Arrays for the pairs ``new`` appended to ``table``; which pairs of ``table`` have a field."""
        odd = [p.pair_id for p, g in new.items() if g is not None and g != self.grid]
        if odd:
            raise InputError(f"store {str(path)!r} stacks every field on one fixed grid; new pair(s) "
                             f"{', '.join(odd[:3])} have another fixed grid: use a new store for them")
        n = len(table)
        disp = root["displacement"]
        if disp.shape[0] != n:
            disp.resize((n,) + tuple(disp.shape[1:]))
        disp.attrs.update({"ome": ngff_field(self.grid, "displacement", [p.fixed for p in table], 2)})
        if "warped_labels" in root and root["warped_labels"].shape[0] != n:
            root["warped_labels"].resize((n,) + tuple(root["warped_labels"].shape[1:]))
        return [True] * n

    def entry(self, pair: Pair) -> str:
        """The displacement array of a pair (NGFF ``path``)."""
        return "displacement"


class PerPairFields:
    """Field layout when fixed grids differ: a group ``fields/<pair_id>/`` per pair with its own
    ``displacement`` ``(component, *spatial)`` and ``warped_labels`` on the pair's fixed grid."""

    stacked = False
    grid = None

    def arrays(self, root: zarr.Group, index: int, pair: Pair) -> tuple[Any, Any, Any]:
        path = field_path(pair.pair_id)
        if path not in root:
            return None, None, ...
        g = root[path]
        return g["displacement"], (g["warped_labels"] if "warped_labels" in g else None), ...

    def create(self, root: zarr.Group, pairs: Sequence[Pair], grids: Sequence[Grid | None],
               moving_has_labels: bool, make: Any) -> None:
        for pair, grid in zip(pairs, grids):
            _make_pair_fields(root, pair, grid, moving_has_labels)

    def grow(self, root: zarr.Group, table: Sequence[Pair], new: dict[Pair, Grid | None],
             moving_has_labels: bool, path: Path) -> list[bool]:
        for p, grid in new.items():
            _make_pair_fields(root, p, grid, moving_has_labels)
        groups = set(root["fields"].group_keys()) if "fields" in root else set()
        return [p.pair_id in groups for p in table]

    def entry(self, pair: Pair) -> str:
        return f"{field_path(pair.pair_id)}/displacement"


FieldLayout = StackedFields | PerPairFields


def field_layout(grid: Grid | None) -> FieldLayout:
    """Stacked on ``grid`` when every pair shares that fixed grid, else per pair (``None``)."""
    return StackedFields(grid) if grid is not None else PerPairFields()


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

    @property
    def fields(self) -> FieldLayout:
        """The field layout strategy (where a pair's field and warped labels live)."""
        return field_layout(self.field_grid if self.stacked else None)

    def field_arrays(self, root: zarr.Group, index: int) -> tuple[Any, Any, Any]:
        """Pair ``index``'s ``(displacement array, warped-labels array or None, selector)``."""
        return self.fields.arrays(root, index, self.pairs[index])

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


def open_root(store: str | Path, mode: str = "a") -> zarr.Group:
    """The store's root group, read from the nodes' own metadata (never the consolidated copy, which
    is only as fresh as the last :func:`consolidate`: ingest adds and rewrites groups after it)."""
    return zarr.open_group(str(store), mode=mode, zarr_format=3, use_consolidated=False)



def consolidate(store: str | Path) -> None:
    """Consolidate the metadata of the whole store into its root ``zarr.json`` (driver only, once
    every array and attribute exists; tasks write only chunks, which leaves it valid), so that
    ``xarray.open_zarr(STORE)`` opens it in one read and without warnings. zarr's notes while doing
    it (files beside the arrays: pairs.csv, logs/, run.lock; consolidated metadata not yet being
    part of the Zarr v3 specification) are silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not recognized as a component of a Zarr hierarchy")
        warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
        zarr.consolidate_metadata(str(store), zarr_format=3)


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
    root = open_root(path)
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

    def make(name: str, shape: tuple, chunks: tuple, dtype: Any, dims: list[str], fill: Any,
             attributes: dict[str, Any] | None = None, **kw: Any) -> zarr.Array:
        return root.create_array(name, shape=shape, chunks=chunks, dtype=dtype, dimension_names=dims,
                                 fill_value=fill, overwrite=True, attributes={**var_attrs(name), **(attributes or {})},
                                 **kw)

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

    field_layout(field_grid).create(root, pairs, grids, moving_has_labels, make)
    root.attrs.update({**root_attrs, "n_pairs": n, "n_levels": n_levels, "labels": list(map(int, labels)),
                       "stacked": stacked, "ndim": ndim, "layout_version": LAYOUT_VERSION,
                       "field_grid": grid_attrs(field_grid) if field_grid is not None else None,
                       "ome": _root_scene(pairs, [stacked or g is not None for g in grids], field_layout(field_grid), ndim)})
    consolidate(path)  # every array and attribute exists: the tasks only write chunks
    write_pairs(pairs, frozen)  # frozen last: a store with pairs.csv is fully initialised
    return read_layout(path)


def _make_pair_fields(root: zarr.Group, pair: Pair, grid: Grid | None, moving_has_labels: bool) -> None:
    """The per-pair field arrays ``fields/<pair_id>/`` (unstacked layout) on the pair's fixed grid."""
    if grid is None:
        return
    g = root.require_group("fields").create_group(
        pair.pair_id, overwrite=True, attributes={"ome": ngff_scene([(0, pair, "displacement")], grid.ndim, False)})
    shape = tuple(grid.shape)
    chunks = tuple(min(s, 64) for s in shape)
    spatial_dims = ["z", "y", "x"][3 - grid.ndim:]
    g.create_array("displacement", shape=(grid.ndim,) + shape, chunks=(grid.ndim,) + chunks, dtype="float32",
                   fill_value=np.nan, compressors=COMPRESSOR, dimension_names=["component"] + spatial_dims,
                   attributes={**grid_attrs(grid), **var_attrs("displacement"),
                               "ome": ngff_field(grid, "displacement", [pair.fixed], 1)})
    if moving_has_labels:
        g.create_array("warped_labels", shape=shape, chunks=chunks, dtype="int32", fill_value=-1,
                       compressors=COMPRESSOR, dimension_names=spatial_dims,
                       attributes={**grid_attrs(grid), **var_attrs("warped_labels")})


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
    known_labels = set(layout.labels)
    new_labels = [int(v) for v in labels if int(v) not in known_labels]
    all_labels = list(layout.labels) + new_labels
    grids = {p: fixed_grids.get(p.fixed) for p in new}
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
    table = list(old) + new
    has_field = layout.fields.grow(root, table, grids, moving_has_labels, path)
    root.attrs.update({**root_attrs, "n_pairs": n, "n_levels": levels, "labels": all_labels,
                       "ome": _root_scene(table, has_field, layout.fields, layout.ndim)})
    consolidate(path)
    if new:
        append_pairs(new, frozen, start=n_old)  # the log grows last: a pair is in the table once its arrays exist
    return read_layout(path)


def stored_attrs(store: str | Path) -> dict[str, Any]:
    """The root attributes of a store that holds results (method config, pairing, ...); {} if none."""
    if not (Path(store) / "pairs.csv").exists():
        return {}
    return dict(open_root(store, "r").attrs)


def check_layout_version(path: Path, attrs: dict[str, Any]) -> None:
    """Refuse a store whose layout this code cannot read (written by a newer cohortreg, or not a
    results store), with a message that says what to do."""
    version = attrs.get("layout_version")
    if version is None:
        raise InputError(f"store {str(path)!r}: no layout_version in its root attributes: not a cohortreg results "
                         "store (or a damaged one)")
    if int(version) > LAYOUT_VERSION:
        raise InputError(f"store {str(path)!r} has layout version {version}, newer than this cohortreg reads "
                         f"({LAYOUT_VERSION}): upgrade cohortreg (pip install -U cohortreg) to open it")


def read_layout(store: str | Path) -> StoreLayout:
    """The layout of an initialised store."""
    path = Path(store)
    if not (path / "pairs.csv").exists():
        raise InputError(f"store {str(path)!r}: no results (run `cohortreg run` first)")
    attrs = dict(open_root(path, "r").attrs)
    check_layout_version(path, attrs)
    fg = attrs.get("field_grid")
    return StoreLayout(path=path, pairs=read_pairs(path / "pairs.csv"), labels=list(attrs["labels"]),
                       n_levels=int(attrs["n_levels"]), stacked=bool(attrs["stacked"]),
                       field_grid=grid_from_attrs(fg) if fg else None, ndim=int(attrs["ndim"]))


def read_status(store: str | Path) -> dict[str, np.ndarray]:
    """``status``, ``config_hash`` and ``inputs_hash`` of every pair (small reads, for the runner)."""
    root = open_root(store, "r")
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
    root = open_root(store, "r")
    return {name: _as_stored(root[name], root[name][index]) for name in CHECKSUM_VARS}


class PairWriter:
    """Writes one pair's results; a task holds one and touches only its pair's chunks."""

    def __init__(self, store: str | Path, index: int):
        self.root = open_root(store, "r+")
        self.layout = read_layout(store)
        self.index = index
        self.pair = self.layout.pairs[index]

    def _field_arrays(self) -> tuple[Any, Any, Any]:
        return self.layout.field_arrays(self.root, self.index)

    def begin(self, **strings: str) -> None:
        """Invalidate any earlier result of this pair (status ``running``) and record who runs it."""
        for name, value in strings.items():  # who runs it first: a death right after "running" still names the worker
            self.root[name][self.index] = value
        self.root["status"][self.index] = "running"
        self.root["config_hash"][self.index] = ""
        self.root["checksum"][self.index] = ""

    def write_field(self, field: np.ndarray, warped_labels: np.ndarray | None) -> None:
        disp, labs, entry = self._field_arrays()
        if disp is None:
            raise InputError(f"pair {self.pair.pair_id}: the store has no field array for it")
        disp[entry] = field
        if labs is not None and warped_labels is not None:
            labs[entry] = warped_labels

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
    arr, _, entry = layout.field_arrays(open_root(store, "r"), i)
    if arr is None:
        raise InputError(f"pair {layout.pairs[i].pair_id}: the store has no field for it (its fixed image failed ingest)")
    return Image(torch.from_numpy(np.ascontiguousarray(arr[entry])), grid_from_attrs(dict(arr.attrs)))


def read_warped_labels(store: str | Path, pair: int | str) -> Image | None:
    """The moving label map warped onto the fixed grid (nearest neighbour), if the pair had labels."""
    layout = read_layout(store)
    i = layout.index(pair)
    _, arr, entry = layout.field_arrays(open_root(store, "r"), i)
    if arr is None:
        return None
    return Image(torch.from_numpy(np.ascontiguousarray(arr[entry]))[None], grid_from_attrs(dict(arr.attrs)))
