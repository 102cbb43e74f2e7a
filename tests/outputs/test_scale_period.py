"""Every output says its scale and period: observed = count / exposure, CF/ACDD, provenance."""

from __future__ import annotations

import hashlib
import json

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from shapely.geometry import box

from flowmodel.evaluate import glm_baseline
from flowmodel.exceptions import DataContractError
from flowmodel.outputs.io import (
    DEFAULT_PERIOD,
    input_file_records,
    period_attrs,
    population_scale,
    provenance_attrs,
    read_flows,
    read_flows_csv,
    read_gpkg,
    totals_table,
    write_flow_lines,
    write_flows,
    write_flows_csv,
    write_totals,
    write_totals_csv,
    write_totals_gpkg,
    write_units,
)
from flowmodel.simulate import simulate_flow_dataset
from flowmodel.totals import summarise_totals

FRACTION = 0.1


@pytest.fixture(scope="module")
def world():
    ds, truth = simulate_flow_dataset(20, 3, seed=4, sample_fraction=FRACTION)
    return ds, glm_baseline(ds), truth["mu"]


def _fake_totals(ds: xr.Dataset, seed: int = 0) -> xr.Dataset:
    """Totals of random flow draws, built the way flowmodel.totals sums them."""
    rng = np.random.default_rng(seed)
    n, s = ds.sizes["unit"], 200
    draws = rng.poisson(50, size=(s, n, n)).astype(float)
    draws[:, np.arange(n), np.arange(n)] = 0
    codes, idx = np.unique(ds["country"].values.astype(str), return_inverse=True)
    onehot = np.eye(len(codes))[idx]
    pair = np.einsum("sij,ik,jl->skl", draws, onehot, onehot)
    internal = pair[:, np.arange(len(codes)), np.arange(len(codes))]
    joint = xr.Dataset(
        {
            "unit_out": (("chain", "draw", "unit"), draws.sum(2)[None]),
            "unit_in": (("chain", "draw", "unit"), draws.sum(1)[None]),
            "unit_net": (("chain", "draw", "unit"), (draws.sum(1) - draws.sum(2))[None]),
            "country_out": (("chain", "draw", "country"), (pair.sum(2) - internal)[None]),
            "country_in": (("chain", "draw", "country"), (pair.sum(1) - internal)[None]),
            "country_net": (("chain", "draw", "country"), (pair.sum(1) - pair.sum(2))[None]),
            "country_internal": (("chain", "draw", "country"), internal[None]),
            "country_pair": (
                ("chain", "draw", "origin_country", "destination_country"),
                pair[None],
            ),
            "total_movers": (("chain", "draw"), draws.sum((1, 2))[None]),
            "cross_border": (("chain", "draw"), (pair.sum((1, 2)) - internal.sum(1))[None]),
        },
        coords={
            "unit": ds["unit"].values,
            "unit_country": ("unit", codes[idx]),
            "country": codes,
            "origin_country": codes,
            "destination_country": codes,
        },
    )
    return summarise_totals(joint)


def test_observed_exposure_round_trip(tmp_path, world):
    ds, pred, mu_truth = world
    sample = ds["flow_census"]
    path = write_flows(
        pred, tmp_path / "flows.nc", observed=sample, exposure=ds["exposure_census"], data=ds
    )
    back = read_flows(path)
    ok = np.isfinite(sample.values)
    assert ok.sum() > 50
    np.testing.assert_allclose(back["observed"].values[ok], sample.values[ok] / FRACTION)
    np.testing.assert_array_equal(back["observed_sample"].values, sample.values)
    np.testing.assert_allclose(
        (back["observed"] * back["exposure"]).values[ok], back["observed_sample"].values[ok]
    )
    assert np.isnan(back["observed"].values[~ok]).all()
    # on the population scale the observed flows are comparable with the true flows
    mu = np.asarray(mu_truth.values)
    ratio = np.nansum(back["observed"].values) / np.nansum(np.where(ok, mu, 0))
    assert 0.8 < ratio < 1.25

    csv, _ = read_flows_csv(
        write_flows_csv(
            pred,
            tmp_path / "flows.csv",
            observed=sample,
            exposure=ds["exposure_census"],
            data=ds,
        )
    )
    row = csv.dropna(subset=["observed"]).iloc[0]
    assert row["observed"] == pytest.approx(row["observed_sample"] / row["exposure"])
    assert row["exposure"] == pytest.approx(FRACTION)


def test_population_scale_unit_exposure_applies_to_the_origin():
    obs = xr.DataArray(
        [[np.nan, 2.0], [3.0, np.nan]],
        dims=("origin", "destination"),
        coords={"origin": ["a", "b"], "destination": ["a", "b"]},
    )
    exposure = xr.DataArray([0.5, 0.25], dims="unit", coords={"unit": ["a", "b"]})
    out = population_scale(obs, exposure)
    assert out["observed"].sel(origin="a", destination="b") == 4.0
    assert out["observed"].sel(origin="b", destination="a") == 12.0
    assert population_scale(obs)["exposure"].sel(origin="a", destination="b") == 1.0


@pytest.mark.parametrize(
    ("period", "start", "end"),
    [
        ("2019-2024", "2019", "2024"),
        ("2019-01-01/2023-12-31", "2019-01-01", "2023-12-31"),
        ("2024-01/2024-03", "2024-01", "2024-03"),
        ("2024-02", "2024-02", "2024-02"),
        ("five years before the 2019 census", None, None),
        (None, None, None),
    ],
)
def test_period_attrs(period, start, end):
    attrs = period_attrs(period)
    assert attrs["period"] == (period or DEFAULT_PERIOD)
    assert attrs.get("time_coverage_start") == start
    assert attrs.get("time_coverage_end") == end


def test_flows_nc_is_cf_acdd_with_countries_and_period(tmp_path, world):
    ds, pred, _ = world
    attrs = provenance_attrs(seed=1, period="2019-2024")
    back = read_flows(write_flows(pred, tmp_path / "f.nc", data=ds, attrs=attrs))
    assert back.attrs["Conventions"].startswith("CF-")
    assert "ACDD" in back.attrs["Conventions"]
    for key in ("title", "summary", "date_created", "source"):
        assert back.attrs[key]
    assert back.attrs["period"] == "2019-2024"
    assert back.attrs["time_coverage_start"] == "2019"
    assert back.attrs["time_coverage_end"] == "2024"
    for name in ("mean", "q05", "q95"):
        assert back[name].attrs["long_name"] and back[name].attrs["units"] == "1"
    assert "5% quantile" in back["q05"].attrs["long_name"]
    country = dict(zip(ds["unit"].values, ds["country"].values.astype(str), strict=True))
    assert list(back["origin_country"].values) == [country[u] for u in back["origin"].values]
    assert list(back["destination_country"].values) == [
        country[u] for u in back["destination"].values
    ]
    assert back["origin_country"].dims == ("origin",)


def test_every_file_carries_the_period(tmp_path, world):
    ds, pred, _ = world
    attrs = provenance_attrs(period="2019-2024")
    lines, meta = read_gpkg(write_flow_lines(pred, ds, tmp_path / "l.gpkg", attrs=attrs))
    assert (lines["period"] == "2019-2024").all() and meta["period"] == "2019-2024"
    table, sidecar = read_flows_csv(write_flows_csv(pred, tmp_path / "f.csv", attrs=attrs))
    assert (table["period"] == "2019-2024").all() and sidecar["period"] == "2019-2024"
    totals = _fake_totals(ds)
    back = xr.load_dataset(write_totals(totals, tmp_path / "t.nc", attrs=attrs))
    assert back.attrs["period"] == "2019-2024" and back.attrs["time_coverage_end"] == "2024"
    tt, tmeta = read_flows_csv(write_totals_csv(totals, tmp_path / "t.csv", attrs=attrs))
    assert (tt["period"] == "2019-2024").all() and tmeta["period"] == "2019-2024"
    units, umeta = read_gpkg(write_units(ds, tmp_path / "u.gpkg", totals=totals, attrs=attrs))
    assert (units["period"] == "2019-2024").all() and umeta["period"] == "2019-2024"


def test_provenance_names_files_by_base_name_and_hash(tmp_path):
    census = tmp_path / "deep" / "folder" / "census_od.csv"
    census.parent.mkdir(parents=True)
    census.write_text("origin,destination,count\na,b,1\n")
    records = input_file_records({"flows.census.path": census})
    assert records == [
        {
            "name": "census_od.csv",
            "sha256": hashlib.sha256(census.read_bytes()).hexdigest(),
            "role": "flows.census.path",
        }
    ]
    known = input_file_records([census], hashes={str(census): "abc"})
    assert known[0]["sha256"] == "abc"  # a known hash (the run's manifest) is not recomputed
    attrs = provenance_attrs(input_files=records)
    assert str(tmp_path) not in json.dumps(attrs)
    assert attrs["data_sources"].startswith("census_od.csv (sha256 ")
    assert json.loads(attrs["input_files"])[0]["name"] == "census_od.csv"
    # absolute paths stored by older datasets lose their folders too
    ds = xr.Dataset(attrs={"data_sources": f"{census}; {tmp_path / 'pop.tif'}"})
    assert provenance_attrs(data=ds)["data_sources"] == "census_od.csv; pop.tif"


def test_totals_files_round_trip(tmp_path, world):
    ds, _, _ = world
    totals = _fake_totals(ds)
    back = xr.load_dataset(write_totals(totals, tmp_path / "totals.nc"))
    assert {"unit", "country", "origin_country", "destination_country"} <= set(back.dims)
    for name in ("unit_net_mean", "country_in_q05", "country_pair_q95", "total_movers_mean"):
        np.testing.assert_array_equal(back[name].values, totals[name].values)
        assert back[name].attrs["long_name"] and back[name].attrs["units"] == "1"
    assert back.attrs["Conventions"].startswith("CF-")

    table = totals_table(totals)
    assert set(table["level"]) == {"unit", "country", "country_pair", "world"}
    net = table[(table.level == "unit") & (table.quantity == "net")].set_index("unit")
    np.testing.assert_array_equal(
        net.loc[totals["unit"].values, "mean"].to_numpy(), totals["unit_net_mean"].values
    )
    assert (net["country"].to_numpy() == totals["unit_country"].values).all()
    pairs = table[table.level == "country_pair"]
    assert len(pairs) == totals.sizes["origin_country"] ** 2
    csv, meta = read_flows_csv(write_totals_csv(totals, tmp_path / "totals.csv"))
    pd.testing.assert_frame_equal(
        csv[["mean", "q05", "q95"]], table[["mean", "q05", "q95"]], check_exact=True
    )
    assert "unit/net" in meta["quantities"]


def test_totals_geopackage_has_unit_and_country_layers(tmp_path, world):
    ds, _, _ = world
    totals = _fake_totals(ds)
    polys = gpd.GeoDataFrame(
        {"unit_id": ds["unit"].values},
        geometry=[
            box(x - 0.1, y - 0.1, x + 0.1, y + 0.1)
            for x, y in zip(ds["lon"].values, ds["lat"].values, strict=True)
        ],
        crs="EPSG:4326",
    )
    path = write_totals_gpkg(
        totals, ds, tmp_path / "totals.gpkg", geometry=polys, attrs={"period": "2019-2024"}
    )
    units, meta = read_gpkg(path, layer="units")
    assert meta["period"] == "2019-2024"
    expected = totals["unit_net_mean"].to_series().reindex(units["unit_id"]).to_numpy()
    np.testing.assert_array_equal(units["net_mean"].to_numpy(), expected)
    assert {"in_q05", "out_q95", "population"} <= set(units.columns)
    countries, _ = read_gpkg(path, layer="countries")
    assert set(countries["country"]) == set(totals["country"].values)
    assert countries.geometry.notna().all()
    np.testing.assert_array_equal(
        countries.set_index("country").loc[totals["country"].values, "internal_mean"].to_numpy(),
        totals["country_internal_mean"].values,
    )


def test_write_totals_rejects_flows(tmp_path, world):
    _, pred, _ = world
    with pytest.raises(DataContractError, match="predict_totals"):
        write_totals(pred[["q05"]], tmp_path / "t.nc")
