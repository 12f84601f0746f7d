"""The results store as an xarray Dataset (world-mm coordinates, attributes, string coordinates
that select) and its NGFF (OME-Zarr 0.6rc0, RFC-5) coordinate-system metadata; the store opens
with plain ``xarray.open_zarr`` without warnings."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
import zarr

from conftest import FAST_METHOD, make_image, rotation_direction
from pipeline.analysis import HIGHER_IS_BETTER, field_dataarray, open_results, spatial_coords
from pipeline.ingest import ingest
from pipeline.manifest import Subject, read_manifest
from pipeline.pairs import make_pairs
from pipeline.runner import plan_pairs
from pipeline.store import NGFF_VERSION, VAR_ATTRS, consolidate, read_field, read_layout
from pipeline.task import register_pair
from regcore import Grid, method_config, write_image

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory, demo_cohort) -> tuple[Path, list]:
    """A store with the atlas and three subjects ingested, no results (copy it before use)."""
    subs = read_manifest(demo_cohort)
    store = tmp_path_factory.mktemp("view") / "ingested.zarr"
    ingest(subs[:4], store)
    return store, subs


@pytest.fixture(scope="module")
def results(ingested, tmp_path_factory) -> Path:
    """Three atlas pairs (stacked fields), the first two registered, the third pending."""
    src, subs = ingested
    store = tmp_path_factory.mktemp("results") / "cohort.zarr"
    shutil.copytree(src, store)
    pairs = make_pairs(subs[:4], "atlas", atlas="atlas")
    assert [p.moving for p in pairs] == ["sub-01", "sub-02", "sub-03"]
    plan_pairs(store, pairs, method_config(FAST_METHOD))
    for i in range(2):
        assert register_pair(store, i, FAST_METHOD)["status"] == "complete"
    (store / "logs").mkdir()  # what a run leaves beside the arrays
    (store / "logs" / "run-x.jsonl").write_text("{}\n")
    return store


def _open_plain(store: Path) -> xr.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(str(store))


# ------------------------------------------------------------------ coordinates
def test_field_coordinates_are_world_mm(results):
    ds = open_results(results)
    grid = read_layout(results).field_grid
    world = grid.world_points(dtype=torch.float64).numpy()  # (z, y, x, 3), components x, y, z
    assert ds["displacement"].dims == ("pair", "component", "z", "y", "x")
    # the demo atlas is RAS-stored: direction diag(-1, -1, 1), so x and y run towards smaller LPS values
    for dim, axis in (("x", 0), ("y", 1), ("z", 2)):
        assert ds[dim].attrs["units"] == "mm" and ds[dim].attrs["world_axis"] == f"{'xyz'[axis]} (LPS)"
    np.testing.assert_allclose(ds["x"].values, world[0, 0, :, 0], atol=1e-9)
    np.testing.assert_allclose(ds["y"].values, world[0, :, 0, 1], atol=1e-9)
    np.testing.assert_allclose(ds["z"].values, world[:, 0, 0, 2], atol=1e-9)
    # every voxel: the coordinates of its dims are its world position
    zz, yy, xx = np.meshgrid(ds["z"].values, ds["y"].values, ds["x"].values, indexing="ij")
    np.testing.assert_allclose(np.stack([xx, yy, zz], -1), world, atol=1e-9)
    assert np.allclose(ds["displacement"].attrs["index_to_world"], grid.index_to_world())
    assert ds["warped_labels"].dims == ("pair", "z", "y", "x") and "x" in ds["warped_labels"].coords
    # one pair's field: the same coordinates, and the values read_field gives
    da = field_dataarray(results, "sub-02--to--atlas")
    assert da.dims == ("component", "z", "y", "x") and list(da["component"].values) == ["x", "y", "z"]
    np.testing.assert_allclose(da["x"].values, ds["x"].values)
    np.testing.assert_array_equal(da.values, read_field(results, 1).data.numpy())


@pytest.mark.parametrize("direction,worlds", [
    (np.diag([-1.0, -1.0, 1.0]), "xyz"),                                  # RAS storage
    (np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), "yzx"),  # permuted, flipped
])
def test_axis_aligned_directions_give_world_coordinates(direction, worlds):
    grid = Grid((5, 4, 3), (1.5, 2.0, 2.5), (10.0, -20.0, 30.0), direction)
    coords, attrs = spatial_coords(grid)
    world = grid.world_points(dtype=torch.float64).numpy()
    # dim x is index axis 0, which runs along world worlds[0]
    for dim, k in (("x", 0), ("y", 1), ("z", 2)):
        w = "xyz".index(worlds[k])
        assert coords[dim].attrs["world_axis"] == f"{worlds[k]} (LPS)"
        line = np.moveaxis(world, 2 - k, 0)[(slice(None),) + (0,) * 2][:, w]
        np.testing.assert_allclose(coords[dim].values, line, atol=1e-9)
    assert np.allclose(attrs["index_to_world"], grid.index_to_world())


def test_oblique_direction_gives_index_coordinates_and_the_affine():
    grid = Grid((5, 4, 3), (1.5, 2.0, 2.5), (10.0, -20.0, 30.0), rotation_direction(3))
    coords, attrs = spatial_coords(grid)
    assert [c.values.tolist() for c in (coords["z"], coords["y"], coords["x"])] == [[0, 1, 2], [0, 1, 2, 3],
                                                                                    [0, 1, 2, 3, 4]]
    assert "units" not in coords["x"].attrs and "index_to_world" in coords["x"].attrs["description"]
    m = np.asarray(attrs["index_to_world"])
    assert m.shape == (4, 4)
    world = grid.world_points(dtype=torch.float64).numpy()
    np.testing.assert_allclose(m[:3, :3] @ [4, 1, 2] + m[:3, 3], world[2, 1, 4], atol=1e-9)  # index (x, y, z)


# ------------------------------------------------------------------ attributes
def test_every_variable_has_units_and_description(results):
    ds = open_results(results)
    assert ds["dice_after"].attrs["units"] == "1" and ds["dice_after"].attrs["higher_is_better"] is True
    assert ds["dice_after"].attrs["description"]
    assert ds["runtime_s"].attrs["units"] == "s" and ds["runtime_s"].attrs["higher_is_better"] is False
    assert ds["tre_after"].attrs["units"] == "mm" and ds["displacement"].attrs["units"] == "mm"
    assert "units" not in ds["status"].attrs and ds["status"].attrs["description"]
    for name in ds.variables:
        if name in ("z", "y", "x"):
            continue
        assert name in VAR_ATTRS, f"{name} is not declared in VAR_ATTRS"
        assert ds[name].attrs.get("description"), name
    # the same attributes are in the store itself, as plain xarray reads it
    plain = _open_plain(results)
    assert plain["dice_after"].attrs["units"] == "1" and plain["runtime_s"].attrs["units"] == "s"
    assert plain["jac_min"].attrs["higher_is_better"] is True
    assert {"dice_after", "dice_before", "ncc_after", "ncc_before", "jac_min"} <= HIGHER_IS_BETTER
    assert not {"tre_after", "runtime_s", "mse_after", "jac_nonpositive"} & HIGHER_IS_BETTER


# ------------------------------------------------------------------ selection and grouping
def test_string_coordinates_select(results):
    ds = open_results(results)
    assert ds["moving"].dtype.kind == "U" and ds["pair_id"].dtype.kind == "U"
    one = ds.where(ds.moving == "sub-02", drop=True)
    assert one.sizes["pair"] == 1 and one["pair_id"].item() == "sub-02--to--atlas"
    assert one["status"].values.item() == "complete"
    np.testing.assert_allclose(one["dice_after"].values, ds["dice_after"].values[1:2])
    assert ds.sel(pair=1)["pair_id"].item() == "sub-02--to--atlas"
    assert ds.sel(pair=ds.pair_id == "sub-03--to--atlas")["moving"].item() == "sub-03"
    by_id = ds.set_index(pair="pair_id")
    assert float(by_id.sel(pair="sub-01--to--atlas")["dice_after"]) == float(ds["dice_after"][0])
    # other strings are lazy objects of str: a computed condition selects on them
    done = ds.where((ds.status == "complete").compute(), drop=True)
    assert list(done["moving"].values) == ["sub-01", "sub-02"]
    assert all(isinstance(v, str) for v in ds["status"].values)


def test_mean_dice_per_label(results):
    ds = open_results(results)
    raw = zarr.open_group(str(results), mode="r")["dice_label_after"][...]
    assert np.isnan(raw[2]).all() and not np.isnan(raw[:2]).any()  # the pending pair
    expected = np.nanmean(raw, axis=0)
    per_label = ds["dice_label_after"].mean("pair")
    assert per_label.dims == ("label",) and list(per_label["label"].values) == read_layout(results).labels
    np.testing.assert_allclose(per_label.values, expected)
    np.testing.assert_allclose(ds["dice_label_after"].groupby("label").mean(...).values, expected)


# ------------------------------------------------------------------ plain xarray, no warnings
def test_plain_open_zarr_raises_no_warning(results):
    (results / "run.lock").write_text("{}")  # a run in progress leaves its lock beside the arrays
    try:
        ds = _open_plain(results)
    finally:
        (results / "run.lock").unlink()
    assert ds.sizes["pair"] == 3 and "displacement" in ds and ds.attrs["stacked"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        consolidate(results)  # zarr's notes about pairs.csv and logs/ stay silent


def test_store_grown_after_consolidation(ingested, tmp_path, demo_cohort):
    """Consolidated metadata is a snapshot: a subject ingested after it is still seen by the next
    plan (the store's readers never use it), and the grown store opens plainly again."""
    src, subs = ingested
    store = tmp_path / "grow.zarr"
    shutil.copytree(src, store)
    first = make_pairs(subs[:3], "atlas", atlas="atlas")
    plan_pairs(store, first, method_config(FAST_METHOD))
    ingest(subs[:5], store)  # sub-04 arrives after the metadata was consolidated
    grown = make_pairs(subs[:5], "atlas", atlas="atlas")
    todo, _ = plan_pairs(store, grown, method_config(FAST_METHOD))
    assert sorted(todo) == [0, 1, 2, 3]
    assert register_pair(store, 3, FAST_METHOD)["status"] == "complete"
    ds = open_results(store)
    assert ds.sizes["pair"] == 4 and ds["moving"].values[3] == "sub-04"
    plain = _open_plain(store)
    assert plain.sizes["pair"] == 4 and plain.attrs["ome"]["scene"]["coordinateTransformations"][3]["output"] == {
        "name": "sub-04"}


def test_ingested_subjects_after_consolidation(ingested, tmp_path):
    from pipeline.ingest import ingested_subjects

    src, subs = ingested
    store = tmp_path / "late.zarr"
    shutil.copytree(src, store)
    plan_pairs(store, make_pairs(subs[:3], "atlas", atlas="atlas"), method_config(FAST_METHOD))  # consolidates
    ingest(subs[:5], store)
    assert "sub-04" in [s.key for s in ingested_subjects(store)]


def test_run_consolidates_at_the_end(ingested, tmp_path):
    from distributed import Client

    from pipeline.runner import run_pairs

    src, subs = ingested
    store = tmp_path / "run.zarr"
    shutil.copytree(src, store)
    with Client(processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None) as client:
        summary = run_pairs(client, store, make_pairs(subs[:2], "atlas", atlas="atlas"), FAST_METHOD,
                            performance_report=False)
    assert summary.complete == [0] and (store / "logs").is_dir()
    ds = _open_plain(store)
    assert str(ds["status"].values[0]) == "complete"


# ------------------------------------------------------------------ NGFF metadata
def _affine_check(block: dict, grid: Grid, lead: int) -> None:
    """An ``ome`` field block: its affine maps array index (lead..., z, y, x) to the grid's world."""
    (t,) = [t for t in block["coordinateTransformations"] if t["type"] == "affine"]
    a = np.asarray(t["affine"])
    assert a.shape == (3, lead + 3 + 1) and t["input"] == {"path": "displacement"}
    world = grid.world_points(dtype=torch.float64).numpy()
    for kz, ky, kx in [(0, 0, 0), (1, 2, 3), tuple(s - 1 for s in grid.shape)]:
        index = [0] * lead + [kz, ky, kx, 1]
        np.testing.assert_allclose(a @ index, world[kz, ky, kx], atol=1e-6)


def _check_system(cs: dict) -> None:
    assert [a["name"] for a in cs["axes"]] == ["x", "y", "z"]
    assert all(a["type"] == "space" and a["unit"] == "millimeter" for a in cs["axes"])


def test_ngff_scene_for_stacked_fields(results):
    root = zarr.open_group(str(results), mode="r")
    ome = dict(root.attrs)["ome"]
    assert ome["version"] == NGFF_VERSION == "0.6rc0"
    systems = {cs["name"]: cs for cs in ome["scene"]["coordinateSystems"]}
    assert list(systems) == ["atlas", "sub-01", "sub-02", "sub-03"]  # the common (fixed) reference first
    for cs in systems.values():
        _check_system(cs)
    transforms = ome["scene"]["coordinateTransformations"]
    assert len(transforms) == 3
    for i, t in enumerate(transforms):
        pair_id = f"sub-0{i + 1}--to--atlas"
        assert t["type"] == "displacements" and t["name"] == pair_id and t["interpolation"] == "linear"
        assert t["input"] == {"name": "atlas"} and t["output"] == {"name": f"sub-0{i + 1}"}
        assert t["input"]["name"] in systems and t["output"]["name"] in systems
        # the transform points at the stacked array and this pair's index along it
        arr = root[t["path"]]
        assert t["path"] == "displacement" and t["cohortreg:pair"] == i < arr.shape[0]
        assert arr.metadata.dimension_names[:2] == ("pair", "component") and arr.shape[1] == 3
    np.testing.assert_array_equal(root["displacement"][1], read_field(results, "sub-02--to--atlas").data.numpy())
    field = dict(root["displacement"].attrs)["ome"]
    assert field["version"] == NGFF_VERSION and [cs["name"] for cs in field["coordinateSystems"]] == ["atlas"]
    _check_system(field["coordinateSystems"][0])
    _affine_check(field, read_layout(results).field_grid, lead=2)


def test_ngff_and_coordinates_for_per_pair_fields(tmp_path):
    """Fixed grids that differ (one oblique): fields per pair, each group with its scene, each
    field with its affine, ``field_dataarray`` with the pair's own coordinates."""
    a = make_image((12, 11, 10), spacing=(2.0, 2.0, 2.0), origin=(1.0, 2.0, 3.0), seed=1)
    b = make_image((11, 11, 10), spacing=(2.0, 2.0, 2.0), direction=rotation_direction(3), seed=1)
    write_image(a, tmp_path / "a.nii.gz")
    write_image(b, tmp_path / "b.nii.gz")
    subs = [Subject("a", tmp_path / "a.nii.gz"), Subject("b", tmp_path / "b.nii.gz")]
    store = tmp_path / "s.zarr"
    ingest(subs, store)
    pairs = make_pairs(subs, "all")
    plan_pairs(store, pairs, method_config(FAST_METHOD))
    assert not read_layout(store).stacked
    root = zarr.open_group(str(store), mode="r")
    scene = dict(root.attrs)["ome"]["scene"]
    paths = [t["path"] for t in scene["coordinateTransformations"]]
    assert paths == [f"fields/{p.pair_id}/displacement" for p in pairs]
    assert "cohortreg:pair" not in scene["coordinateTransformations"][0]
    for p in pairs:
        group = root[f"fields/{p.pair_id}"]
        ome = dict(group.attrs)["ome"]
        assert ome["version"] == NGFF_VERSION
        (t,) = ome["scene"]["coordinateTransformations"]
        assert t["type"] == "displacements" and t["path"] == "displacement" and "displacement" in group
        assert t["input"] == {"name": p.fixed} and t["output"] == {"name": p.moving}
        for cs in ome["scene"]["coordinateSystems"]:
            _check_system(cs)
        grid = read_field(store, p.pair_id).grid
        _affine_check(dict(group["displacement"].attrs)["ome"], grid, lead=1)
    # a -> b lives on b's oblique grid: index coordinates; b -> a on a's: world coordinates
    on_b = field_dataarray(store, "a--to--b")
    assert on_b.dims == ("component", "z", "y", "x") and on_b["x"].values.tolist() == list(range(10))
    assert np.allclose(on_b.attrs["index_to_world"], read_field(store, "a--to--b").grid.index_to_world())
    on_a = field_dataarray(store, "b--to--a")
    assert on_a["x"].attrs["units"] == "mm"
    np.testing.assert_allclose(on_a["x"].values, 1.0 + 2.0 * np.arange(10))
    np.testing.assert_allclose(on_a["z"].values, 3.0 + 2.0 * np.arange(12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xr.open_zarr(str(store))


@pytest.mark.skipif(not os.environ.get("NGFF_SCHEMAS"), reason="set NGFF_SCHEMAS to the OME-Zarr 0.6rc0 "
                    "schemas folder (github.com/ome/ngff-spec, schemas/) to validate against them")
def test_ngff_metadata_validates_against_the_published_schemas(results):
    jsonschema = pytest.importorskip("jsonschema")
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT202012

    schemas = {f.stem: json.loads(f.read_text()) for f in Path(os.environ["NGFF_SCHEMAS"]).glob("*.schema")}
    registry = Registry().with_resources(
        [(s["$id"], Resource.from_contents(s, default_specification=DRAFT202012)) for s in schemas.values()])

    def validate(name: str, instance: object) -> None:
        jsonschema.Draft202012Validator(schemas[name], registry=registry).validate(instance)

    root = zarr.open_group(str(results), mode="r")
    validate("scene", {"ome": dict(root.attrs)["ome"]})
    field = dict(root["displacement"].attrs)["ome"]
    validate("coordinate_systems", field["coordinateSystems"])
    validate("coordinate_transformations", field["coordinateTransformations"])
