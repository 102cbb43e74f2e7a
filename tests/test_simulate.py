"""The simulators: in-memory FlowDataset and the file-based world."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import rasterio
import shapely
import statsmodels.api as sm
from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

from flowmodel.simulate import (
    DEFAULT_CDR_ACTIVITY,
    DEFAULT_TRUTH,
    FILES,
    RASTER_CRS,
    RASTER_NODATA,
    UTC_OFFSET_HOURS,
    WORLD_TRUTH,
    load_world,
    simulate_flow_dataset,
    simulate_world,
)

NODE_NAMES = (
    "intercept",
    "beta",
    "country_effect",
    "sigma_country",
    "phi",
    "market_share",
    "period_effect",
)
SMALL = {
    "n_units": 40,
    "n_countries": 4,
    "raster_size": 200,
    "n_subscribers": 4000,
    "cdr_scale": 0.02,
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The default world (about 3 s)."""
    return simulate_world(tmp_path_factory.mktemp("world"), seed=0)


@pytest.fixture(scope="module")
def small_pair(tmp_path_factory):
    """Two small worlds from the same seed and one from another seed."""
    a = simulate_world(tmp_path_factory.mktemp("a"), seed=7, **SMALL)
    b = simulate_world(tmp_path_factory.mktemp("b"), seed=7, **SMALL)
    c = simulate_world(tmp_path_factory.mktemp("c"), seed=8, **SMALL)
    return a, b, c


def _glm_design(
    unit: pd.DataFrame, origin: np.ndarray, dest: np.ndarray, pair: dict, beta: dict
) -> pd.DataFrame:
    cols = {}
    for term in beta:
        if term.startswith("origin:"):
            cols[term] = unit[term.split(":", 1)[1]].to_numpy()[origin]
        elif term.startswith("destination:"):
            cols[term] = unit[term.split(":", 1)[1]].to_numpy()[dest]
        elif term == "log_distance":
            cols[term] = np.log(pair["distance_km"])
        else:
            cols[term] = pair[term]
    return pd.DataFrame(cols)


def _assert_within_3se(fit, beta: dict) -> None:
    for term, value in beta.items():
        est, se = fit.params[term], fit.bse[term]
        assert abs(est - value) < 3 * se, f"{term}: estimate {est:.4f} ± {se:.4f}, truth {value}"


# ------------------------------------------------------------------- in-memory dataset
def test_flow_dataset_deterministic_by_seed():
    a, ta = simulate_flow_dataset(40, 3, seed=3)
    b, tb = simulate_flow_dataset(40, 3, seed=3)
    c, _ = simulate_flow_dataset(40, 3, seed=4)
    np.testing.assert_array_equal(a["flow_census"].values, b["flow_census"].values)
    np.testing.assert_array_equal(ta["mu"].values, tb["mu"].values)
    assert not np.array_equal(
        np.nan_to_num(a["flow_census"].values), np.nan_to_num(c["flow_census"].values)
    )


@pytest.mark.parametrize("likelihood", ["poisson", "negbin"])
def test_glm_recovers_flow_dataset_coefficients(likelihood):
    ds, truth = simulate_flow_dataset(150, 3, seed=11, likelihood=likelihood)
    unit = ds[["population", "night_lights_per_capita"]].to_dataframe()
    unit["log_population"] = np.log(unit["population"])
    y = ds["flow_census"].values
    o, d = np.nonzero(~np.isnan(y))
    pair = {
        "distance_km": ds["distance_km"].values[o, d],
        "cross_border": ds["cross_border"].values[o, d].astype(float),
    }
    X = _glm_design(unit, o, d, pair, truth["beta"])
    country = ds["country"].values[o]
    X = pd.concat([X, pd.get_dummies(pd.Series(country, name="c"), dtype=float)], axis=1)
    family = (
        sm.families.Poisson()
        if likelihood == "poisson"
        else sm.families.NegativeBinomial(alpha=1 / truth["phi"])
    )
    fit = sm.GLM(y[o, d], X, family=family).fit()
    _assert_within_3se(fit, truth["beta"])
    for code, effect in truth["country_effect"].items():
        assert abs(fit.params[code] - (truth["intercept"] + effect)) < 3 * fit.bse[code]


# ------------------------------------------------------------------------ world files
def test_world_writes_every_file(world):
    for role, name in FILES.items():
        assert world.paths[role] == world.out_dir / name
        assert world.paths[role].stat().st_size > 0, role


def test_world_deterministic_by_seed(small_pair):
    a, b, c = small_pair
    for name in FILES.values():
        if name.endswith((".csv", ".json")):
            pa, pb = (a.out_dir / name).read_bytes(), (b.out_dir / name).read_bytes()
            assert pa.replace(bytes(a.out_dir), b"") == pb.replace(bytes(b.out_dir), b""), name
    for name in ("population", "built_up", "night_lights"):
        with rasterio.open(a.paths[name]) as ra, rasterio.open(b.paths[name]) as rb:
            np.testing.assert_array_equal(ra.read(1), rb.read(1))
            assert ra.transform == rb.transform
    ea, eb = pd.read_parquet(a.paths["cdr_events"]), pd.read_parquet(b.paths["cdr_events"])
    pd.testing.assert_frame_equal(ea, eb)
    assert a.units().geom_equals(b.units().geometry).all()
    # another seed, another world
    assert a.paths["true_flows"].read_bytes() != c.paths["true_flows"].read_bytes()
    assert a.truth["country_effect"] != c.truth["country_effect"]


def test_stages_draw_from_independent_streams(tmp_path):
    a = simulate_world(tmp_path / "a", seed=7, **SMALL)
    b = simulate_world(
        tmp_path / "b", seed=7, **{**SMALL, "n_subscribers": 3000, "sample_fraction": 0.05}
    )
    assert a.paths["true_flows"].read_bytes() == b.paths["true_flows"].read_bytes()
    assert a.paths["true_covariates"].read_bytes() == b.paths["true_covariates"].read_bytes()
    assert a.paths["census_persons"].read_bytes() != b.paths["census_persons"].read_bytes()


def test_rasters_open_with_declared_crs_and_nodata(world):
    for name in ("population", "built_up", "night_lights"):
        with rasterio.open(world.paths[name]) as src:
            assert src.crs == rasterio.crs.CRS.from_user_input(RASTER_CRS[name])
            assert src.crs == rasterio.crs.CRS.from_user_input(world.truth["rasters"][name]["crs"])
            assert src.nodata == RASTER_NODATA[name]
            assert src.dtypes[0] == "float32"
            assert src.profile["tiled"] and src.block_shapes[0] == (256, 256)
            assert max(src.shape) == 600
            data = src.read(1, masked=True)
            assert 0.05 < data.mask.mean() < 0.6  # ocean and lake are nodata
            assert float(data.min()) >= 0
            if name == "built_up":
                assert float(data.max()) <= 1
    assert rasterio.crs.CRS.from_user_input(RASTER_CRS["built_up"]).is_projected


def test_lake_is_nodata_inside_units(world):
    """Some units lose pixels to the lake: raster coverage < 1 there."""
    cov = world.covariates()
    assert (cov["raster_coverage"] < 0.99).sum() >= 1
    assert (cov["raster_coverage"] > 0.3).all()


def test_population_clustered_and_covariates_correlated(world):
    cov = world.covariates()
    with rasterio.open(world.paths["population"]) as src:
        people = src.read(1, masked=True).compressed()
    # settlements: the densest 1% of pixels hold far more than 1% of the people
    top = np.sort(people)[::-1][: len(people) // 100].sum() / people.sum()
    assert top > 0.1
    log_pop = np.log(cov["population"])
    assert np.corrcoef(log_pop, np.log(cov["night_lights"]))[0, 1] > 0.5
    area = world.units().set_index("unit_id").to_crs("EPSG:6933").area.reindex(cov.index)
    density = cov["population"] / area
    assert np.corrcoef(np.log(density), cov["built_up"])[0, 1] > 0.5
    # night lights per capita differ between countries (income)
    by_country = cov.groupby("country")["night_lights_per_capita"].median()
    assert by_country.max() / by_country.min() > 1.5


def test_units_valid_contiguous_countries_share_borders(world):
    units = world.units()
    assert list(units.columns) == ["unit_id", "country", "admin1", "geometry"]
    # admin-1 regions nest in countries
    assert (units.groupby("admin1")["country"].nunique() == 1).all()
    assert all(a.startswith(c) for a, c in zip(units["admin1"], units["country"], strict=True))
    assert units.crs.to_epsg() == 4326
    assert units["unit_id"].is_unique and len(units) == 120
    assert units.geometry.is_valid.all() and (units.geometry.geom_type == "Polygon").all()
    assert units.groupby("country").size().min() >= 10
    # no overlaps: the areas add up to the area of the union
    planar = units.to_crs("EPSG:6933").geometry
    assert planar.area.sum() == pytest.approx(shapely.union_all(planar.values).area, rel=1e-6)
    countries = units.dissolve("country")
    assert list(countries.index) == world.truth["countries"]
    for code, geom in countries.geometry.items():
        assert geom.geom_type == "Polygon", f"{code} is not contiguous"
    shared = {
        (a, b)
        for a in countries.index
        for b in countries.index
        if a < b
        and countries.geometry[a].boundary.intersection(countries.geometry[b].boundary).length
        > 0.01
    }
    touched = {c for pair in shared for c in pair}
    assert touched == set(countries.index)
    assert len(shared) >= len(countries) - 1


def test_zonal_stats_of_written_rasters_equal_truth_covariates(world):
    from exactextract import exact_extract

    from flowmodel.inputs.rasters import zonal_covariates

    truth_cov = world.covariates()
    again = zonal_covariates(world.units(), world.rasters()).reindex(truth_cov.index)
    for col in ("population", "lon", "lat", "built_up", "night_lights", "night_lights_per_capita"):
        np.testing.assert_allclose(
            again[col].to_numpy(), truth_cov[col].to_numpy(), rtol=1e-9, err_msg=col
        )
    # independently of zonal_covariates: exactextract's coverage-weighted sum
    units = world.units()
    direct = exact_extract(
        str(world.paths["population"]), units, ["sum"], include_cols=["unit_id"], output="pandas"
    )
    direct = direct.set_index("unit_id")["sum"].reindex(truth_cov.index)
    np.testing.assert_allclose(direct.to_numpy(), truth_cov["population"].to_numpy(), rtol=1e-6)


def test_truth_json_has_node_names(world):
    truth = json.loads(world.paths["truth"].read_text())
    for node in NODE_NAMES:
        assert node in truth, node
    assert truth["beta"] == WORLD_TRUTH["beta"] == DEFAULT_TRUTH["beta"]
    assert set(truth["country_effect"]) == set(truth["countries"])
    assert truth["true_flows"] == "true_flows.csv"
    assert len(truth["census_countries"]) == 2 and len(truth["cdr_countries"]) == 3
    assert len(set(truth["census_countries"]) & set(truth["cdr_countries"])) == 1
    units = world.units()
    cdr_units = units.loc[units["country"].isin(truth["cdr_countries"]), "unit_id"]
    assert set(truth["market_share"]) == set(cdr_units)
    share = np.array(list(truth["market_share"].values()))
    assert (share > 0).all() and (share < 1).all() and share.std() > 0.03
    assert list(truth["period_effect"]) == truth["cdr_periods"][1:]
    assert load_world(world.out_dir).truth == truth


def test_true_flows_level_and_generating_process(world):
    flows = world.true_flows()
    assert list(flows.columns) == ["origin", "destination", "mu", "flow"]
    assert len(flows) == 120 * 119
    assert 10 < flows["mu"].median() < 1000 and flows["mu"].max() > 1000
    cov = world.covariates()
    total_moves = flows["mu"].sum() / cov["population"].sum()
    assert 0.02 < total_moves < 0.15  # share of residents moving between units in 5 years
    assert (flows["flow"] >= 0).all() and (flows["flow"] == flows["flow"].round()).all()
    assert flows["flow"].sum() == pytest.approx(flows["mu"].sum(), rel=0.05)


def test_glm_recovers_world_coefficients(world):
    truth = world.truth
    cov = world.covariates()
    cov["log_population"] = np.log(cov["population"])
    flows = world.true_flows()
    pos = pd.Series(np.arange(len(cov)), index=cov.index)
    o, d = pos[flows["origin"]].to_numpy(), pos[flows["destination"]].to_numpy()
    from flowmodel.pairs import geodesic_distance_km

    dist = geodesic_distance_km(cov["lon"].to_numpy(), cov["lat"].to_numpy())
    country = cov["country"].to_numpy()
    pair = {"distance_km": dist[o, d], "cross_border": (country[o] != country[d]).astype(float)}
    X = _glm_design(cov, o, d, pair, truth["beta"])
    X = pd.concat([X, pd.get_dummies(pd.Series(country[o], name="c"), dtype=float)], axis=1)
    y = np.random.default_rng(2024).poisson(flows["mu"].to_numpy())
    fit = sm.GLM(y, X, family=sm.families.Poisson()).fit()
    _assert_within_3se(fit, truth["beta"])
    for code, effect in truth["country_effect"].items():
        assert abs(fit.params[code] - (truth["intercept"] + effect)) < 3 * fit.bse[code]
    # the expected flows are exactly the log-linear process
    with warnings.catch_warnings():  # a perfect fit, by construction
        warnings.simplefilter("ignore", PerfectSeparationWarning)
        fit_mu = sm.GLM(flows["mu"].to_numpy(), X, family=sm.families.Poisson()).fit()
    for term, value in truth["beta"].items():
        assert fit_mu.params[term] == pytest.approx(value, abs=1e-6)


def test_census_files(world):
    """The census records what real censuses record (IPUMS-style previous residence)."""
    truth = world.truth
    units = world.units().set_index("unit_id")
    persons = pd.read_csv(world.paths["census_persons"], keep_default_na=False)
    assert list(persons.columns) == [
        "person_id",
        "current_unit",
        "previous_unit",
        "previous_admin1",
        "previous_country",
        "weight",
        "age",
        "sex",
    ]
    assert persons["person_id"].is_unique
    cur_country = units.loc[persons["current_unit"], "country"].to_numpy()
    prev_country = persons["previous_country"].to_numpy()
    assert set(cur_country) == set(truth["census_countries"])
    # the census universe: everyone living in a census country, in-migrants from abroad too
    assert truth["census_universe"] == "destination"
    assert truth["census_immigrant_level"] == "country"
    abroad = cur_country != prev_country
    assert set(prev_country[abroad]) == set(truth["countries"]) - set()  # every country sends
    assert 0.05 < abroad.mean() < 0.5
    # people who lived abroad: previous country only; internal movers and stayers: the unit
    assert (persons.loc[abroad, "previous_unit"] == "").all()
    assert (persons.loc[abroad, "previous_admin1"] == "").all()
    assert (persons.loc[~abroad, "previous_unit"] != "").all()
    same_admin1 = units.loc[persons.loc[~abroad, "previous_unit"], "admin1"].to_numpy()
    np.testing.assert_array_equal(same_admin1, persons.loc[~abroad, "previous_admin1"])
    movers = abroad | (persons["current_unit"] != persons["previous_unit"]).to_numpy()
    assert movers.sum() > 1000 and (~movers).sum() > 1000
    f = truth["sample_fraction"]
    assert persons.loc[movers, "weight"].median() == pytest.approx(1 / f, rel=0.02)
    assert persons.loc[movers, "weight"].std() > 0  # small noise
    assert persons["age"].between(5, 95).all() and set(persons["sex"]) == {"F", "M"}
    # the sample of movers is a 10% thinning of the realised flows
    flows = world.true_flows()
    in_census = np.isin(
        units.loc[flows["destination"], "country"].to_numpy(), truth["census_countries"]
    )
    assert movers.sum() == pytest.approx(f * flows.loc[in_census, "flow"].sum(), rel=0.03)

    # internal movers by previous unit, within each census country
    od = pd.read_csv(world.paths["census_od"], dtype={"count": str})
    assert list(od.columns) == ["origin", "destination", "count"]
    assert (od["origin"] != od["destination"]).all()
    o_c = units.loc[od["origin"], "country"].to_numpy()
    assert (o_c == units.loc[od["destination"], "country"].to_numpy()).all()
    assert (od["count"] == "<5").sum() > 10
    numeric = od.loc[od["count"] != "<5", "count"].astype(int)
    assert not numeric.between(1, 4).any()
    internal = movers & ~abroad
    counts = persons.loc[internal].groupby(["previous_unit", "current_unit"]).size()
    key = pd.MultiIndex.from_arrays([od["origin"], od["destination"]])
    sample = counts.reindex(key, fill_value=0).to_numpy()
    shown = od["count"] != "<5"
    np.testing.assert_array_equal(
        sample[shown.to_numpy()], od.loc[shown, "count"].astype(int).to_numpy()
    )
    assert sample[~shown.to_numpy()].min() >= 1 and sample[~shown.to_numpy()].max() <= 4
    assert sample.sum() == internal.sum()

    # immigrants by previous country x current unit: every other country, every census unit
    imm = pd.read_csv(world.paths["census_immigrants"], dtype={"count": str})
    assert list(imm.columns) == ["previous_country", "current_unit", "count"]
    n_census_units = int(units["country"].isin(truth["census_countries"]).sum())
    assert len(imm) == n_census_units * (len(truth["countries"]) - 1)
    assert (units.loc[imm["current_unit"], "country"].to_numpy() != imm["previous_country"]).all()
    counts = persons.loc[abroad].groupby(["previous_country", "current_unit"]).size()
    key = pd.MultiIndex.from_arrays([imm["previous_country"], imm["current_unit"]])
    sample = counts.reindex(key, fill_value=0).to_numpy()
    shown = imm["count"] != "<5"
    np.testing.assert_array_equal(
        sample[shown.to_numpy()], imm.loc[shown, "count"].astype(int).to_numpy()
    )
    assert sample.sum() == abroad.sum()


def test_census_previous_admin1_and_unit_level_immigrants(tmp_path):
    """Options: internal movers by previous admin-1 only; immigrants by previous unit (legacy)."""
    w = simulate_world(tmp_path / "a", seed=1, census_previous_level="admin1", **SMALL)
    units = w.units().set_index("unit_id")
    assert {"admin1"} <= set(units.columns)
    od = pd.read_csv(w.paths["census_od"], dtype={"count": str})
    assert od["origin"].isin(set(units["admin1"])).all()  # previous admin-1 x current unit
    assert (units.loc[od["destination"], "admin1"].to_numpy() != od["origin"].to_numpy()).all()
    persons = pd.read_csv(w.paths["census_persons"], keep_default_na=False)
    moved = persons["current_unit"] != persons["previous_unit"]
    assert (persons.loc[moved, "previous_unit"] == "").all()  # only the region is recorded
    legacy = simulate_world(tmp_path / "b", seed=1, census_immigrant_level="unit", **SMALL)
    od = pd.read_csv(legacy.paths["census_od"], dtype={"count": str})
    c = legacy.units().set_index("unit_id")["country"]
    assert (c.loc[od["origin"]].to_numpy() != c.loc[od["destination"]].to_numpy()).any()
    assert len(pd.read_csv(legacy.paths["census_immigrants"])) == 0
    with pytest.raises(ValueError, match="census_previous_level='county'"):
        simulate_world(tmp_path / "c", census_previous_level="county", **SMALL)


def test_cdr_files(world):
    truth = world.truth
    units = world.units()
    towers = pd.read_csv(world.paths["cdr_towers"])
    assert list(towers.columns) == ["cell_id", "lon", "lat"] and towers["cell_id"].is_unique
    pts = np.asarray(shapely.points(towers["lon"], towers["lat"]))
    tree = shapely.STRtree(units.geometry.values)
    idx_pt, idx_unit = tree.query(pts, predicate="within")
    assert len(np.unique(idx_pt)) == len(towers)  # every tower lies inside a unit
    tower_unit = pd.Series(
        units["unit_id"].to_numpy()[idx_unit], index=towers["cell_id"].to_numpy()[idx_pt]
    )
    tower_country = units.set_index("unit_id").loc[tower_unit, "country"]
    assert set(tower_country) == set(truth["cdr_countries"])
    assert set(tower_unit) == set(truth["market_share"])  # every CDR unit has a tower

    schema = pq.read_schema(world.paths["cdr_events"])
    assert schema.names == ["subscriber_id", "timestamp", "cell_id"]
    assert (
        pa.types.is_timestamp(schema.field("timestamp").type)
        and schema.field("timestamp").type.tz == "UTC"
    )
    events = pd.read_parquet(world.paths["cdr_events"])
    assert 500_000 <= len(events) <= 2_000_000
    assert events["subscriber_id"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert set(events["cell_id"]) <= set(towers["cell_id"])
    assert events["timestamp"].is_monotonic_increasing
    local = events["timestamp"].dt.tz_localize(None) + pd.Timedelta(hours=UTC_OFFSET_HOURS)
    assert sorted(local.dt.strftime("%Y-%m").unique()) == truth["cdr_periods"]

    # home detection (modal night-time unit, >= 3 active nights) recovers the true homes
    hour = local.dt.hour.to_numpy()
    night = (hour >= 21) | (hour < 6)
    month = (local.dt.year * 100 + local.dt.month).to_numpy()[night]
    ev = pd.DataFrame(
        {
            "subscriber_id": events["subscriber_id"].to_numpy()[night],
            "period": pd.Series(month)
            .map({m: f"{m // 100}-{m % 100:02d}" for m in np.unique(month)})
            .to_numpy(),
            "day": local.dt.floor("D").to_numpy()[night],
            "unit": tower_unit.reindex(events["cell_id"].to_numpy()[night]).to_numpy(),
        }
    )
    nights = ev.groupby(["subscriber_id", "period"])["day"].nunique()
    counts = ev.groupby(["subscriber_id", "period", "unit"]).size().sort_values(kind="stable")
    modal = counts.groupby(level=[0, 1]).tail(1).reset_index(level="unit")["unit"]
    homes = pd.read_csv(world.paths["true_cdr_homes"]).set_index(["subscriber_id", "period"])[
        "unit_id"
    ]
    enough = nights[nights >= 3].index
    assert len(enough) > 0.9 * len(homes)
    assert (modal[enough] == homes.reindex(enough)).mean() > 0.97

    # relocating subscribers = true flow x market share x period effect
    wide = homes.unstack("period")
    periods = truth["cdr_periods"]
    flows = world.true_flows().set_index(["origin", "destination"])["mu"]
    share = pd.Series(truth["market_share"])
    for before, after in itertools.pairwise(periods):
        moved = wide.loc[wide[before] != wide[after]]
        expected = flows.loc[list(zip(moved[before], moved[after], strict=True))]
        assert set(moved[before]) <= set(share.index) and set(moved[after]) <= set(share.index)
        o = flows.index.get_level_values(0)
        d = flows.index.get_level_values(1)
        cdr = o.isin(share.index) & d.isin(share.index)
        mean_total = (flows[cdr] * share.reindex(o[cdr]).to_numpy()).sum() * truth[
            "period_effect"
        ][after]
        assert len(moved) == pytest.approx(mean_total, rel=0.1)
        assert len(expected) == len(moved)


def test_describe_and_load(world):
    text = world.describe()
    assert "120 units in 6 countries" in text and "census" in text
    again = load_world(world.out_dir)
    assert again.paths == world.paths
    assert again.rasters()["population"].name == "population.tif"


def test_load_world_missing(tmp_path):
    from flowmodel.exceptions import InputFileError

    with pytest.raises(InputFileError, match=r"truth.json.*simulate_world"):
        load_world(tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"sample_fraction"):
        simulate_world(
            tmp_path,
            sample_fraction=0.0,
            **{k: v for k, v in SMALL.items() if k != "n_subscribers"},
        )
    with pytest.raises(ValueError, match=r"n_subscribers=10 is too small"):
        simulate_world(tmp_path, **{**SMALL, "n_subscribers": 10})
    with pytest.raises(ValueError, match=r"unknown country code"):
        simulate_world(tmp_path, **{**SMALL, "census_countries": ["NOPE"]})
    with pytest.raises(ValueError, match=r"census_universe='all'"):
        simulate_world(tmp_path, **{**SMALL, "census_universe": "all"})


def _median_active_nights(world) -> float:
    """Median nights (21:00-06:00 local, dated by the evening) with an event, per subscriber-month."""
    events = pd.read_parquet(world.paths["cdr_events"])
    local = events["timestamp"].dt.tz_localize(None) + pd.Timedelta(hours=UTC_OFFSET_HOURS)
    night = ((local.dt.hour >= 21) | (local.dt.hour < 6)).to_numpy()
    evening = (local - pd.Timedelta(hours=6)).dt.floor("D")[night]
    nights = (
        pd.DataFrame(
            {"s": events["subscriber_id"][night], "d": evening, "m": evening.dt.strftime("%Y-%m")}
        )
        .groupby(["s", "m"])["d"]
        .nunique()
    )
    homes = pd.read_csv(world.paths["true_cdr_homes"])
    every = pd.MultiIndex.from_frame(homes[["subscriber_id", "period"]], names=["s", "m"])
    return float(nights.reindex(every, fill_value=0).median())


def test_cdr_activity_knob(tmp_path):
    base = simulate_world(tmp_path / "base", seed=7, **SMALL)
    same = simulate_world(tmp_path / "same", seed=7, cdr_activity=DEFAULT_CDR_ACTIVITY, **SMALL)
    sparse = simulate_world(tmp_path / "sparse", seed=7, cdr_activity=4, **SMALL)
    # the knob scales the same draws: at the default level the log is the default log
    pd.testing.assert_frame_equal(
        pd.read_parquet(base.paths["cdr_events"]), pd.read_parquet(same.paths["cdr_events"])
    )
    assert "cdr_activity" not in base.truth and sparse.truth["cdr_activity"] == 4.0
    # only activity changes: the same towers and true homes, fewer events
    for role in ("cdr_towers", "true_cdr_homes", "census_persons", "true_flows"):
        assert base.paths[role].read_bytes() == sparse.paths[role].read_bytes(), role
    assert sparse.truth["n_cdr_events"] < 0.5 * base.truth["n_cdr_events"]
    # the median subscriber is active on about cdr_activity nights a month
    assert 9 <= _median_active_nights(base) <= 11.5  # DEFAULT_CDR_ACTIVITY, about 10.3
    assert 3.5 <= _median_active_nights(sparse) <= 4.5
    with pytest.raises(ValueError, match=r"cdr_activity=0.*\(0, 20\]"):
        simulate_world(tmp_path / "bad", cdr_activity=0, **SMALL)


def test_census_universe_within_records_internal_moves_only(tmp_path):
    w = simulate_world(tmp_path, seed=1, census_universe="within", **SMALL)
    units = w.units().set_index("unit_id")
    persons = pd.read_csv(w.paths["census_persons"])
    cur = units.loc[persons["current_unit"], "country"].to_numpy()
    prev = units.loc[persons["previous_unit"], "country"].to_numpy()
    assert (cur == prev).all() and w.truth["census_universe"] == "within"
    od = pd.read_csv(w.paths["census_od"], dtype={"count": str})
    o = units.loc[od["origin"], "country"].to_numpy()
    assert (o == units.loc[od["destination"], "country"].to_numpy()).all()
    n = (units["country"].isin(w.truth["census_countries"])).groupby(units["country"]).sum()
    assert len(od) == int((n * (n - 1)).sum())


def test_country_choices_by_code(tmp_path):
    w = simulate_world(tmp_path, seed=1, census_countries=["XAN"], cdr_countries=0, **SMALL)
    assert w.truth["census_countries"] == ["XAN"] and w.truth["cdr_countries"] == []
    assert w.truth["market_share"] == {} and Path(w.paths["cdr_events"]).exists()


def test_flow_dataset_observed_pairs_patterns():
    base, _ = simulate_flow_dataset(40, 3, seed=2)
    origin, _ = simulate_flow_dataset(40, 3, seed=2, observed_countries=["C00"])
    within, _ = simulate_flow_dataset(
        40, 3, seed=2, observed_countries=["C00"], observed_pairs="within"
    )
    country = base["country"].values
    seen_origin = ~np.isnan(origin["flow_census"].values)
    seen_within = ~np.isnan(within["flow_census"].values)
    expected = (country[:, None] == "C00") & ~np.eye(40, dtype=bool)
    np.testing.assert_array_equal(seen_origin, expected)
    np.testing.assert_array_equal(seen_within, expected & (country[None, :] == "C00"))
    # the same draws, masked differently (backward compatible default)
    np.testing.assert_array_equal(
        origin["flow_census"].values[seen_within], within["flow_census"].values[seen_within]
    )
    np.testing.assert_array_equal(
        base["flow_census"].values[seen_origin], origin["flow_census"].values[seen_origin]
    )
    with pytest.raises(ValueError, match="observed_pairs"):
        simulate_flow_dataset(10, 2, observed_pairs="destination")


def test_world_builds_a_valid_flow_dataset(world):
    from flowmodel.dataset import build_dataset

    units = world.units()
    cov = world.covariates().drop(columns="country")
    od = pd.read_csv(world.paths["census_od"], dtype={"count": str})
    censored = od["count"] == "<5"
    census = od.assign(
        count=pd.to_numeric(od["count"].where(~censored)),
        max=np.where(censored, 4.0, np.nan),
        min=np.where(censored, 1.0, np.nan),
    )
    imm = pd.read_csv(world.paths["census_immigrants"], dtype={"count": str})
    imm_censored = imm["count"] == "<5"
    immigrants = pd.DataFrame(
        {
            "origin": imm["previous_country"],
            "destination": imm["current_unit"],
            "count": pd.to_numeric(imm["count"].where(~imm_censored)),
            "max": np.where(imm_censored, 4.0, np.nan),
            "min": np.where(imm_censored, 1.0, np.nan),
        }
    )
    immigrants.attrs.update(origin_level="country", destination_level="unit")
    ds = build_dataset(units, covariates=cov, flows={"census": census, "abroad": immigrants})
    assert ds.sizes["unit"] == 120
    assert ds["flow_abroad"].dims == ("cell_abroad",) and ds.sizes["cell_abroad"] == len(imm)
    assert ds["admin1"].dims == ("unit",)
    np.testing.assert_allclose(
        ds["population"].values, cov.reindex(ds["unit"].values)["population"]
    )
    observed = int(ds["flow_census"].notnull().sum()) + int(ds["flow_census_max"].notnull().sum())
    assert observed == len(od)
    assert float(ds["flow_census_min"].max()) == 1.0
    # the internal table observes pairs within the census countries; the immigrants' table
    # observes sums over every unit of every other country
    into = np.any(ds["flow_census"].notnull().values, axis=0)
    assert set(np.unique(ds["country"].values[into])) == set(world.truth["census_countries"])
    out_of = np.any(ds["flow_census"].notnull().values, axis=1)
    assert set(np.unique(ds["country"].values[out_of])) == set(world.truth["census_countries"])
    assert set(ds["cell_abroad_origin"].values) == set(world.truth["countries"])


@pytest.mark.integration
def test_cdr_reader_recovers_relocations(world):
    """The package's own CDR chain, with its defaults, finds most true relocations."""
    cdr = pytest.importorskip("flowmodel.inputs.cdr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = cdr.cdr_flows(
            world.paths["cdr_events"],
            world.paths["cdr_towers"],
            world.units(),
            timezone=world.truth["timezone"],
        )
    report = result.report
    assert report["unknown_cell"] == 0 and report["tower_outside_units"] == 0
    homes = pd.read_csv(world.paths["true_cdr_homes"])
    assert report["subscriber_periods_with_home"] > 0.8 * len(homes)
    assert (
        0.75 * world.truth["n_cdr_movers"]
        < report["relocations"]
        <= 1.05 * world.truth["n_cdr_movers"]
    )
