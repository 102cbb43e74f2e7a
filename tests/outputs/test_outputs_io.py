"""Every writer round-trips identical values, stamps provenance and is atomic."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from shapely.geometry import box

from flowmodel._version import __version__
from flowmodel.atomic import atomic_path
from flowmodel.evaluate import glm_baseline
from flowmodel.exceptions import DataContractError, InputFileError
from flowmodel.outputs import io as fio
from flowmodel.outputs.io import (
    config_hash,
    flows_table,
    provenance_attrs,
    read_flows,
    read_flows_csv,
    read_gpkg,
    read_posterior,
    write_flow_lines,
    write_flows,
    write_flows_csv,
    write_posterior,
    write_units,
)
from flowmodel.simulate import simulate_flow_dataset

QVARS = ["mean", "q05", "q25", "q50", "q75", "q95"]


@pytest.fixture(scope="module")
def world():
    ds, _truth = simulate_flow_dataset(25, 3, seed=11)
    pred = glm_baseline(ds, pair_covariates=["cross_border"])
    return ds, pred


def _attrs():
    return provenance_attrs(
        config={"model": "gravity", "cost_func": "pow"},
        seed=42,
        data_sources=["census.csv", "pop.tif"],
    )


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp" in p.name or p.name.endswith(".old")]


def test_provenance_attrs_and_config_hash():
    a = _attrs()
    assert a["flowmodel_version"] == __version__
    assert a["seed"] == 42
    assert a["data_sources"] == "census.csv; pop.tif"
    assert a["config_hash"] == config_hash(
        {"cost_func": "pow", "model": "gravity"}
    )  # key order irrelevant
    assert a["config_hash"] != config_hash({"model": "gravity", "cost_func": "exp"})
    assert len(a["config_hash"]) == 16
    assert provenance_attrs()["config_hash"] == "unknown"
    assert provenance_attrs()["seed"] == -1


@pytest.mark.parametrize("name", ["flows.nc", "flows.zarr"])
def test_write_flows_round_trip(tmp_path, world, name):
    ds, pred = world
    path = write_flows(pred, tmp_path / name, observed=ds["flow_census"], attrs=_attrs())
    back = read_flows(path)
    for var in QVARS:
        np.testing.assert_array_equal(back[var].values, pred[var].values)
    np.testing.assert_array_equal(back["observed"].values, ds["flow_census"].values)
    assert list(back["origin"].values) == list(pred["origin"].values)
    for key in ("flowmodel_version", "config_hash", "seed", "data_sources"):
        assert back.attrs[key] == _attrs()[key]
    assert back["mean"].attrs["units"] == "1"  # CF: a count of persons is dimensionless
    assert "number of persons" in back["mean"].attrs["long_name"]
    # also identical through plain xarray
    if name.endswith(".nc"):
        plain = xr.load_dataset(path)
        np.testing.assert_array_equal(plain["q95"].values, pred["q95"].values)
    assert _no_temp_files(tmp_path)


def test_write_flows_overwrites_zarr_store(tmp_path, world):
    _ds, pred = world
    path = tmp_path / "flows.zarr"
    write_flows(pred, path)
    write_flows(pred * 2, path)
    np.testing.assert_array_equal(read_flows(path)["mean"].values, pred["mean"].values * 2)
    assert _no_temp_files(tmp_path)


def test_write_flows_rejects_non_predictions(tmp_path, world):
    ds, _ = world
    with pytest.raises(DataContractError, match="'mean' variable"):
        write_flows(ds[["distance_km"]], tmp_path / "x.nc")
    with pytest.raises(InputFileError, match="no such flows file"):
        read_flows(tmp_path / "missing.nc")


def test_write_posterior_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    terms = ["origin:log_population", "log_distance"]
    post = xr.Dataset(
        {
            "intercept": (("chain", "draw"), rng.normal(size=(2, 50))),
            "beta": (("chain", "draw", "term"), rng.normal(size=(2, 50, 2))),
        },
        coords={"chain": [0, 1], "draw": np.arange(50), "term": terms},
    )
    prior = post.isel(chain=[0]) * 3
    tree = xr.DataTree.from_dict({"posterior": post, "prior": prior})
    tree.attrs["flowmodel_model_class"] = "GravityModel"
    path = write_posterior(tree, tmp_path / "posterior.nc", attrs=_attrs())
    back = read_posterior(path)
    assert set(back.children) == {"posterior", "prior"}
    np.testing.assert_array_equal(back["posterior"]["beta"].values, post["beta"].values)
    np.testing.assert_array_equal(back["prior"]["intercept"].values, prior["intercept"].values)
    assert list(back["posterior"]["term"].values) == terms
    assert back.attrs["seed"] == 42 and back.attrs["flowmodel_model_class"] == "GravityModel"
    with pytest.raises(DataContractError, match="DataTree"):
        write_posterior({"posterior": post}, tmp_path / "bad.nc")


def test_write_flow_lines_round_trip(tmp_path, world):
    ds, pred = world
    path = write_flow_lines(
        pred, ds, tmp_path / "flows.gpkg", top_k=40, observed=ds["flow_census"], attrs=_attrs()
    )
    lines, meta = read_gpkg(path)
    assert len(lines) == 40
    assert meta["config_hash"] == _attrs()["config_hash"] and meta["seed"] == "42"
    assert meta["flowmodel_version"] == __version__
    assert (lines.geom_type == "LineString").all()
    assert list(lines["rank"]) == list(range(1, 41))
    assert lines["mean"].is_monotonic_decreasing
    expected = (
        flows_table(pred, observed=ds["flow_census"], data=ds)
        .sort_values("mean", ascending=False)
        .head(40)
    )
    assert lines["mean"].to_numpy() == pytest.approx(expected["mean"].to_numpy(), rel=0, abs=0)
    for _, row in lines.head(5).iterrows():
        (x0, _y0), (_x1, y1) = row.geometry.coords
        assert (
            x0 == ds["lon"].sel(unit=row["origin"]).item()
            and y1 == ds["lat"].sel(unit=row["destination"]).item()
        )
        assert (
            row["q05"]
            == pred["q05"].sel(origin=row["origin"], destination=row["destination"]).item()
        )
        assert bool(row["cross_border"]) == bool(
            ds["cross_border"].sel(origin=row["origin"], destination=row["destination"])
        )
    assert lines.crs.to_epsg() == 4326
    # standard tools read it too
    assert len(gpd.read_file(path)) == 40
    assert _no_temp_files(tmp_path)


def test_write_flow_lines_needs_coordinates(tmp_path, world):
    ds, pred = world
    with pytest.raises(DataContractError, match="no lon/lat"):
        write_flow_lines(pred, ds.drop_vars(["lon", "lat"]), tmp_path / "f.gpkg")


def test_write_units_points_polygons_and_table(tmp_path, world):
    ds, _ = world
    points, meta = read_gpkg(write_units(ds, tmp_path / "units.gpkg", attrs=_attrs()))
    assert list(points["unit_id"]) == list(ds["unit"].values)
    np.testing.assert_array_equal(points["population"].to_numpy(), ds["population"].values)
    np.testing.assert_array_equal(
        points["night_lights_per_capita"].to_numpy(), ds["night_lights_per_capita"].values
    )
    assert list(points["country"]) == list(ds["country"].values)
    np.testing.assert_array_equal(points.geometry.x.to_numpy(), ds["lon"].values)
    assert meta["data_sources"] == "census.csv; pop.tif"
    ids = ds["unit"].values
    polys = gpd.GeoDataFrame(
        {"unit_id": ids[::-1]},
        geometry=[box(i, 0, i + 1, 1) for i in range(len(ids))],
        crs="EPSG:4326",
    )
    back, _ = read_gpkg(write_units(ds, tmp_path / "poly.gpkg", geometry=polys))
    assert (back.geom_type == "Polygon").all()
    first = polys.set_index("unit_id").geometry[ids[0]]
    assert back.set_index("unit_id").geometry[ids[0]].equals(first)
    with pytest.raises(DataContractError, match="no geometry for units"):
        write_units(ds, tmp_path / "bad.gpkg", geometry=polys.iloc[1:])
    with pytest.warns(UserWarning, match="without geometry"):
        path = write_units(ds.drop_vars(["lon", "lat"]), tmp_path / "table.gpkg")
    table, _ = read_gpkg(path)
    assert len(table) == len(ids) and "population" in table
    assert not list(tmp_path.glob("*.aux.xml"))


def test_write_flows_csv_round_trip(tmp_path, world):
    ds, pred = world
    path = write_flows_csv(
        pred, tmp_path / "flows.csv", observed=ds["flow_census"], data=ds, attrs=_attrs()
    )
    table, meta = read_flows_csv(path)
    n = ds.sizes["unit"]
    assert len(table) == n * (n - 1)
    assert list(table.columns[:10]) == [
        "origin",
        "destination",
        "origin_country",
        "destination_country",
        *QVARS,
    ]
    assert (table["period"] == "unspecified (the census window)").all()
    merged = table.set_index(["origin", "destination"])
    for var in QVARS:
        expected = pred[var].to_series()
        expected = expected[expected.notna()]
        assert (merged[var].reindex(expected.index).to_numpy() == expected.to_numpy()).all()
    assert meta["seed"] == 42 and meta["rows"] == len(table)
    # plain pandas reads identical values too
    plain = pd.read_csv(path, dtype={"origin": str, "destination": str})
    pd.testing.assert_frame_equal(plain[QVARS], table[QVARS], check_exact=True)
    assert (
        json.loads((tmp_path / "flows.csv.json").read_text())["flowmodel_version"] == __version__
    )


def _boom(*args, **kwargs):
    raise RuntimeError("disk full (injected)")


@pytest.mark.parametrize("kind", ["nc", "zarr", "gpkg", "units", "csv"])
def test_failed_write_leaves_previous_file_intact(tmp_path, world, monkeypatch, kind):
    ds, pred = world
    writers = {
        "nc": (lambda: write_flows(pred, tmp_path / "flows.nc"), "flows.nc"),
        "zarr": (lambda: write_flows(pred, tmp_path / "flows.zarr"), "flows.zarr"),
        "gpkg": (
            lambda: write_flow_lines(pred, ds, tmp_path / "flows.gpkg", top_k=10),
            "flows.gpkg",
        ),
        "units": (lambda: write_units(ds, tmp_path / "units.gpkg"), "units.gpkg"),
        "csv": (lambda: write_flows_csv(pred, tmp_path / "flows.csv"), "flows.csv"),
    }
    write, name = writers[kind]
    write()
    target = tmp_path / name

    def snapshot():
        if target.is_dir():
            return {
                p.relative_to(target): p.read_bytes()
                for p in sorted(target.rglob("*"))
                if p.is_file()
            }
        return target.read_bytes()

    before = snapshot()

    # inject a failure after part of the new file has been written
    real_atomic = fio.atomic_path

    def failing_atomic(path, **kw):
        cm = real_atomic(path, **kw)

        class Wrapper:
            def __enter__(self):
                self.tmp = cm.__enter__()
                return self.tmp

            def __exit__(self, et, ev, tb):
                if et is None:  # the write finished: corrupt it half-way, then fail
                    if self.tmp.is_dir():
                        (self.tmp / "partial").write_bytes(b"xx")
                    else:
                        self.tmp.write_bytes(self.tmp.read_bytes()[:100])
                    try:
                        raise RuntimeError("disk full (injected)")
                    except RuntimeError as err:
                        cm.__exit__(type(err), err, err.__traceback__)
                        raise
                return cm.__exit__(et, ev, tb)

        return Wrapper()

    monkeypatch.setattr(fio, "atomic_path", failing_atomic)
    with pytest.raises(RuntimeError, match="injected"):
        write()
    assert snapshot() == before
    assert _no_temp_files(tmp_path)


def test_atomic_path_exception_inside_block(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="injected"), atomic_path(target) as tmp:
        tmp.write_text("new, half")
        _boom()
    assert target.read_text() == "old"
    assert _no_temp_files(tmp_path)


def test_netcdf_write_failure_mid_write(tmp_path, world, monkeypatch):
    _ds, pred = world
    path = write_flows(pred, tmp_path / "flows.nc")
    before = path.read_bytes()

    def partial_to_netcdf(self, target, *args, **kwargs):
        Path(target).write_bytes(b"\x89HDF partial")
        raise OSError("killed mid-write (injected)")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", partial_to_netcdf)
    with pytest.raises(OSError, match="injected"):
        write_flows(pred * 3, path)
    assert path.read_bytes() == before
    assert _no_temp_files(tmp_path)


def test_flows_table_top_k_observed_only_and_sparse(world):
    ds, pred = world
    full = flows_table(pred, observed=ds["flow_census"], data=ds)
    top = flows_table(pred, data=ds, top_k=7)
    assert len(top) == 7 and top["mean"].is_monotonic_decreasing
    assert top["mean"].to_numpy() == pytest.approx(
        np.sort(full["mean"].to_numpy())[::-1][:7], rel=0, abs=0
    )
    obs = flows_table(
        pred, observed=ds["flow_census"].where(ds["cross_border"]), observed_only=True
    )
    assert len(obs) == int(ds["cross_border"].sum()) and obs["observed"].notna().all()
    sparse = pred.stack(pair=("origin", "destination")).reset_index("pair")
    back = flows_table(sparse)
    pd.testing.assert_frame_equal(
        back.sort_values(["origin", "destination"]).reset_index(drop=True),
        flows_table(pred).sort_values(["origin", "destination"]).reset_index(drop=True),
    )
