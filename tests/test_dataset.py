"""The FlowDataset contract: build, validate, save/load."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from flowmodel.dataset import (
    build_dataset,
    dataset_fingerprint,
    flow_sources,
    load_dataset,
    save_dataset,
    validate_dataset,
)
from flowmodel.exceptions import DataContractError, InputFileError
from flowmodel.simulate import simulate_flow_dataset


@pytest.fixture
def units() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "unit_id": ["a", "b", "c", "d"],
            "country": ["X", "X", "Y", "Y"],
            "population": [100.0, 200.0, 300.0, 400.0],
            "lon": [0.0, 1.0, 2.0, 3.0],
            "lat": [0.0, 0.0, 1.0, 1.0],
        }
    )


@pytest.fixture
def flows() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "origin": ["a", "b", "c", "d"],
            "destination": ["b", "a", "a", "c"],
            "count": [3, 0, np.nan, 7],
            "max": [np.nan, np.nan, 4, np.nan],
        }
    )


@pytest.fixture
def ds(units, flows) -> xr.Dataset:
    return build_dataset(units, flows={"census": flows})


def test_build_layout(ds):
    assert set(ds.dims) == {"unit", "origin", "destination"}
    assert list(ds["unit"].values) == ["a", "b", "c", "d"]
    assert flow_sources(ds) == ["census"]
    # an observed zero stays zero, an unobserved pair is NaN, a censored pair is NaN + bound
    assert ds["flow_census"].sel(origin="b", destination="a") == 0
    assert np.isnan(ds["flow_census"].sel(origin="a", destination="c"))
    assert np.isnan(ds["flow_census"].sel(origin="c", destination="a"))
    assert ds["flow_census_max"].sel(origin="c", destination="a") == 4
    assert bool(ds["cross_border"].sel(origin="a", destination="c"))
    assert not bool(ds["cross_border"].sel(origin="a", destination="b"))
    # the diagonal is NaN in every float pair variable
    for name in ("distance_km", "flow_census", "flow_census_max"):
        assert np.isnan(np.diag(ds[name].values)).all()


def test_distance_is_geodesic(ds):
    # one degree of longitude on the equator is 111.32 km on WGS84
    assert ds["distance_km"].sel(origin="a", destination="b") == pytest.approx(111.32, abs=0.01)


def test_builder_drops_diagonal_rows_with_warning(units, flows):
    extra = pd.concat([flows, pd.DataFrame({"origin": ["a"], "destination": ["a"], "count": [9]})])
    with pytest.warns(UserWarning, match="dropped 1 diagonal row"):
        ds = build_dataset(units, flows={"census": extra})
    assert np.isnan(ds["flow_census"].sel(origin="a", destination="a"))


def test_period_dim(units, flows):
    table = flows.assign(period=["2020", "2020", "2021", "2021"])
    ds = build_dataset(units, flows={"cdr": table})
    assert ds["flow_cdr"].dims == ("origin", "destination", "period")
    assert list(ds["period"].values) == ["2020", "2021"]
    assert ds["flow_cdr"].sel(origin="d", destination="c", period="2021") == 7


def test_netcdf_round_trip_is_exact(ds, tmp_path):
    path = save_dataset(ds, tmp_path / "ds.nc")
    back = load_dataset(path)
    xr.testing.assert_identical(back, ds)
    assert dataset_fingerprint(back) == dataset_fingerprint(ds)


def test_numpy_and_dask_validate_the_same(units, flows):
    eager = build_dataset(units, flows={"census": flows})
    lazy = build_dataset(units, flows={"census": flows}, chunks=2)
    assert lazy["flow_census"].chunks is not None
    xr.testing.assert_equal(eager, lazy.compute())
    bad_eager = eager.copy(deep=True)
    bad_eager["flow_census"][0, 1] = -1
    bad_lazy = bad_eager.chunk({"origin": 2})
    for bad in (bad_eager, bad_lazy):
        with pytest.raises(DataContractError, match=r"'flow_census': counts must be >= 0.*a->b"):
            validate_dataset(bad)


def test_load_missing_file(tmp_path):
    with pytest.raises(InputFileError, match="no such FlowDataset file"):
        load_dataset(tmp_path / "nope.nc")


# --- every rule of the FlowDataset contract -----------------------------------------------------------
def _modify(ds: xr.Dataset, how: str) -> xr.Dataset:
    ds = ds.copy(deep=True)
    if how == "duplicate ids":
        ids = ds["unit"].values.copy()
        ids[1] = ids[0]
        ds = ds.assign_coords(unit=ids)
    elif how == "nan population":
        ds["population"][2] = np.nan
    elif how == "negative count":
        ds["flow_census"].loc[{"origin": "a", "destination": "b"}] = -2
    elif how == "non-integer count":
        ds["flow_census"].loc[{"origin": "a", "destination": "b"}] = 2.5
    elif how == "max without nan flow":
        ds["flow_census_max"].loc[{"origin": "a", "destination": "b"}] = 4
    elif how == "zero distance":
        ds["distance_km"].loc[{"origin": "a", "destination": "b"}] = 0.0
    elif how == "nan distance":
        ds["distance_km"].loc[{"origin": "a", "destination": "d"}] = np.nan
    elif how == "unknown pair unit":
        ds = ds.assign_coords(origin=["a", "b", "c", "zz"])
    elif how == "country without units":
        ds["tau_prior"] = ("country_code", [1.0, 2.0, 3.0])
        ds = ds.assign_coords(country_code=["X", "Y", "Q"])
    elif how == "diagonal value":
        ds["flow_census"].loc[{"origin": "c", "destination": "c"}] = 5
    elif how == "missing country":
        ds["country"] = ds["country"].copy(data=np.array(["X", "", "Y", "Y"], dtype=object))
    elif how == "zero exposure":
        ds["exposure_census"] = ("unit", [0.1, 0.0, 0.1, 0.1])
    return ds


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("duplicate ids", r"'unit': unit ids must be unique.*\[a\]"),
        ("nan population", r"'population': required variable holds NaN.*\[c\]"),
        ("negative count", r"'flow_census': counts must be >= 0.*a->b"),
        ("non-integer count", r"'flow_census': counts must be integers.*flow_census_weighted"),
        ("max without nan flow", r"'flow_census_max': a censoring bound needs a NaN flow.*a->b"),
        ("zero distance", r"'distance_km': distance must be > 0.*a->b"),
        ("nan distance", r"'distance_km': required variable holds NaN.*a->d"),
        ("unknown pair unit", r"pairs or flows name units not in 'unit'.*zz"),
        (
            "country without units",
            r"'country': per-country inputs name a country with no units.*Q",
        ),
        ("diagonal value", r"'flow_census': the diagonal .* must be NaN.*c->c"),
        ("missing country", r"'country': every unit needs a country code.*\[b\]"),
        ("zero exposure", r"'exposure_census': exposure must be > 0.*\[b\]"),
    ],
)
def test_validate_rejects(ds, how, match):
    with pytest.raises(DataContractError, match=match):
        validate_dataset(_modify(ds, how))


def test_build_rejects_unknown_flow_units(units, flows):
    bad = pd.concat(
        [flows, pd.DataFrame({"origin": ["a"], "destination": ["nowhere"], "count": [1]})]
    )
    with pytest.raises(
        DataContractError, match=r"flows name units not in the unit table.*nowhere.*harmonise"
    ):
        build_dataset(units, flows={"census": bad})


def test_build_rejects_duplicate_flow_rows(units, flows):
    bad = pd.concat([flows, flows.iloc[:1]])
    with pytest.raises(DataContractError, match=r"duplicate rows for the same pair.*a->b"):
        build_dataset(units, flows={"census": bad})


def test_build_rejects_missing_columns(units):
    with pytest.raises(DataContractError, match=r"missing column\(s\) \['count'\]"):
        build_dataset(
            units, flows={"census": pd.DataFrame({"origin": ["a"], "destination": ["b"]})}
        )
    with pytest.raises(DataContractError, match="no id column 'code'"):
        build_dataset(units, id_field="code")
    with pytest.raises(DataContractError, match="'population': required but absent"):
        build_dataset(units.drop(columns="population"))


def test_distance_supplied_without_coordinates(units):
    pairs = pd.DataFrame(
        [
            (o, d, 10.0 + i)
            for i, (o, d) in enumerate((o, d) for o in "abcd" for d in "abcd" if o != d)
        ],
        columns=["origin", "destination", "distance_km"],
    )
    ds = build_dataset(units.drop(columns=["lon", "lat"]), pairs=pairs)
    assert ds["distance_km"].sel(origin="a", destination="b") == 10.0
    assert "lon" not in ds


def test_simulated_dataset_is_valid_and_deterministic():
    a, truth = simulate_flow_dataset(40, 3, seed=3)
    b, _ = simulate_flow_dataset(40, 3, seed=3)
    c, _ = simulate_flow_dataset(40, 3, seed=4)
    validate_dataset(a)
    xr.testing.assert_identical(a, b)
    assert not np.array_equal(
        np.nan_to_num(a["flow_census"].values), np.nan_to_num(c["flow_census"].values)
    )
    assert set(truth) >= {"intercept", "beta", "sigma_country", "phi", "country_effect", "mu"}
