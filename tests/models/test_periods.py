"""Periods and nowcasts: labels, windows, dated covariates, the field with periods, predictions.

Fast tests check the plumbing with a mocked posterior (prior draws); the slow ones fit
the simulated panel world (:func:`flowmodel.simulate.simulate_panel_dataset`): two
census rounds, the 2020 census's one-year question and CDR months before and after a
shock that only the CDR sees.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from flowmodel.evaluate import cpc, interval_coverage
from flowmodel.exceptions import DataContractError, ModelConfigError
from flowmodel.models.fusion import FusionModel
from flowmodel.models.gravity import GravityModel
from flowmodel.models.inference import prior_draws
from flowmodel.models.latent import _walk_at
from flowmodel.periods import (
    add_dated_covariates,
    covariate_at,
    dataset_at,
    latent_periods,
    observed_periods,
    parse_period,
    sort_periods,
    window_weights,
)
from flowmodel.simulate import simulate_panel_dataset

PERIODS = ["2005-2010", "2015-2020", "2020-2025"]
DURATION = {"census": {"duration": {"dist": "LogNormal", "mu": 0.0, "sigma": 0.5}}}


# ------------------------------------------------------------------------ labels
@pytest.mark.parametrize(
    ("label", "start", "end"),
    [
        ("2010", 2010.0, 2011.0),
        ("2005-2010", 2005.0, 2010.0),
        ("2024-03", 2024 + 60 / 366, 2024 + 91 / 366),
        ("2024Q2", 2024.25, 2024.5),
        ("2024-01/2024-03", 2024.0, 2024 + 91 / 366),
        (2000, 2000.0, 2001.0),
    ],
)
def test_parse_period_forms(label, start, end):
    p = parse_period(label)
    assert p.start == pytest.approx(start)
    assert p.end == pytest.approx(end)
    assert p.midpoint == pytest.approx((start + end) / 2)


@pytest.mark.parametrize("label", ["2010-2005", "spring 2020", "2024-13", "2020/2019"])
def test_parse_period_refuses_bad_labels(label):
    with pytest.raises(ModelConfigError, match=r"is not understood\. Fix: use a year"):
        parse_period(label)


def test_sort_periods_is_time_order_not_string_order():
    assert sort_periods(["2024Q1", "1995-2000", "2024-01", "1986-1991"]) == [
        "1986-1991",
        "1995-2000",
        "2024-01",  # same start as 2024Q1, earlier end
        "2024Q1",
    ]


def test_latent_periods_default_rule():
    # census windows are periods; a one-year question inside one is not; months after the
    # last census form one period
    observed = ["2015-2020", "2005-2010", "2019-2020", "2024-01", "2024-02", "2024-03"]
    out = latent_periods(observed)
    assert [p.label for p in out] == ["2005-2010", "2015-2020", "2024-01/2024-03"]
    assert out[-1].length == pytest.approx(parse_period("2024-01/2024-03").length)


def test_latent_periods_explicit_and_their_errors():
    out = latent_periods(["2024-02", "2005-2010"], ["2020-2025", "2005-2010"])
    assert [p.label for p in out] == ["2005-2010", "2020-2025"]
    with pytest.raises(ModelConfigError, match="overlap no latent period"):
        latent_periods(["1995-2000"], ["2005-2010"])
    with pytest.raises(ModelConfigError, match=r"overlap\. Fix: give non-overlapping"):
        latent_periods([], ["2005-2010", "2008-2012"])
    with pytest.raises(ModelConfigError, match="overlap without one containing"):
        latent_periods(["2005-2010", "2008-2012"])


def test_window_weights_split_the_window_by_overlap():
    periods = [parse_period(p) for p in ["2005-2010", "2010-2015"]]
    assert window_weights(parse_period("2005-2010"), periods) == {0: pytest.approx(5.0)}
    w = window_weights(parse_period("2008-2012"), periods)
    assert w == {0: pytest.approx(2.0), 1: pytest.approx(2.0)}
    with pytest.raises(ModelConfigError, match="overlaps no latent period"):
        window_weights(parse_period("1990"), periods)


# ------------------------------------------------------------------ dated covariates
def _tiny():
    from flowmodel.dataset import build_dataset

    units = pd.DataFrame(
        {
            "unit_id": ["A", "B", "C"],
            "country": "X",
            "population": [1.0, 1.0, 1.0],
            "lon": [0.0, 1.0, 2.0],
            "lat": [0.0, 0.5, 0.0],
        }
    )
    return build_dataset(units)


def test_values_at_a_time_from_the_long_table():
    """The pipeline's static value of a dated covariate: at the flows' window, not the latest."""
    from flowmodel.periods import values_at

    table = pd.DataFrame(
        {
            "unit_id": ["A", "B", "C"] * 2 + ["D"],
            "period": ["2000"] * 3 + ["2020"] * 3 + ["2000"],
            "population": [100.0, 200.0, 50.0, 400.0, 200.0, 25.0, 7.0],
            "label": ["a", "b", "c", "a2", "b2", "c2", "d"],
        }
    )
    got = values_at(table, 2010.5)
    np.testing.assert_allclose(
        got.loc[["A", "B", "C"], "population"], [200.0, 200.0, 50 * 0.5**0.5]
    )
    assert got.loc["D", "population"] == 7.0  # one date only: that value
    assert got.loc["A", "label"] == "a2"  # not a number: the latest
    np.testing.assert_allclose(values_at(table, 2030.5).loc["A", "population"], 800.0)


def test_dated_covariates_interpolate_log_linearly_and_extrapolate_the_trend():
    table = pd.DataFrame(
        {
            "unit_id": ["A", "B", "C"] * 2,
            "period": ["2000"] * 3 + ["2020"] * 3,
            "population": [100.0, 200.0, 50.0, 400.0, 200.0, 25.0],
        }
    )
    ds = add_dated_covariates(_tiny().drop_vars("population"), table)
    assert ds["population_by_date"].dims == ("unit", "date")
    np.testing.assert_allclose(ds["date"].values, [2000.5, 2020.5])
    # the static population is the latest date's
    np.testing.assert_allclose(ds["population"].values, [400.0, 200.0, 25.0])
    mid = covariate_at(ds, "population", 2010.5)
    np.testing.assert_allclose(mid, [200.0, 200.0, np.sqrt(50 * 25)])
    # beyond the last date the 2000-2020 growth continues; before the first, backwards
    half = np.sqrt(0.5)  # C halves in 20 years
    np.testing.assert_allclose(covariate_at(ds, "population", 2030.5), [800.0, 200.0, 25 * half])
    np.testing.assert_allclose(covariate_at(ds, "population", 1990.5), [50.0, 200.0, 50 / half])
    np.testing.assert_allclose(covariate_at(ds, "log_population", 2010.5), np.log(mid))
    at = dataset_at(ds, "2005-2010")
    np.testing.assert_allclose(at["population"].values, covariate_at(ds, "population", 2007.5))
    assert covariate_at(ds, "night_lights", 2010.0) is None


def test_dated_covariates_errors():
    ds = _tiny()
    with pytest.raises(DataContractError, match="not units of the dataset"):
        add_dated_covariates(ds, pd.DataFrame({"unit_id": ["Z"], "period": ["2000"], "v": [1]}))
    dup = pd.DataFrame({"unit_id": ["A", "A"], "period": ["2000", "2000"], "v": [1, 2]})
    with pytest.raises(DataContractError, match="appear twice"):
        add_dated_covariates(ds, dup)
    with pytest.raises(DataContractError, match="no column 'period'"):
        add_dated_covariates(ds, pd.DataFrame({"unit_id": ["A"], "v": [1]}))
    gap = pd.DataFrame({"unit_id": ["A", "B"], "period": ["2000", "2000"], "v": [1.0, 2.0]})
    with pytest.raises(DataContractError, match="have no value at some date"):
        add_dated_covariates(ds, gap)


# ---------------------------------------------------------------------- the walks
def test_walk_at_bridge_and_extrapolation_moments():
    rng = np.random.default_rng(0)
    n = 40_000
    states = np.zeros((n, 1, 2))
    states[:, 0, 1] = 1.0
    times = np.array([2000.0, 2010.0])
    sigma = np.full(n, 0.2)
    for time, mean, var in [
        (2005.0, 0.5, 0.04 * 5 * 5 / 10),  # bridge
        (2020.0, 1.0, 0.04 * 10),  # forward
        (1990.0, 0.0, 0.04 * 10),  # backward
        (2010.0, 1.0, 0.0),  # a fitted period
    ]:
        x = _walk_at(states, times, time, sigma, None, rng)[:, 0]
        assert x.mean() == pytest.approx(mean, abs=0.01)
        assert x.var() == pytest.approx(var, abs=0.01 + 0.03 * var)
    rho = np.full(n, 0.9)
    x = _walk_at(states, times, 2020.0, sigma, rho, rng)[:, 0]
    stat = 0.04 / (1 - 0.81)
    assert x.mean() == pytest.approx(0.9**10, abs=0.01)
    assert x.var() == pytest.approx(stat * (1 - 0.9**20), rel=0.05)


# ----------------------------------------------------------------- the field
@pytest.fixture(scope="module")
def panel():
    return simulate_panel_dataset(seed=1)


@pytest.fixture(scope="module")
def small_panel():
    return simulate_panel_dataset(
        units_per_country=5, n_countries=2, cdr_countries=("C01",), seed=3
    )


def _fusion(periods=PERIODS, sources=("census", "census_1y", "cdr"), **temporal):
    latent = GravityModel(temporal={"periods": list(periods), **temporal})
    return FusionModel(
        latent=latent,
        sources=list(sources),
        source_options={k: v for k, v in DURATION.items() if k in sources},
    )


def _mock_fit(model, ds, draws=60, vary=None):
    """A posterior of prior draws (mocked sampling): the plumbing without a fit.

    With ``vary``, every other variable is held at its first draw.
    """
    pm_model, state, priors = model._build(ds)
    prior = prior_draws(pm_model, draws=draws, random_seed=1)
    prior = prior.expand_dims(chain=[0]) if "chain" not in prior.dims else prior
    if vary is not None:
        for name in prior.data_vars:
            if name not in vary:
                first = prior[name].isel(chain=0, draw=0)
                prior[name] = first.broadcast_like(prior[name]).transpose(*prior[name].dims)
    model.fit_meta = state | {"backend": "mock", "approximate": False, "priors": priors}
    tree = xr.DataTree()
    tree["posterior"] = xr.DataTree(prior)
    model.idata = tree
    return model


def test_temporal_option_is_checked():
    with pytest.raises(ModelConfigError, match="unknown option"):
        GravityModel(temporal={"trnd": "rw"})
    with pytest.raises(ModelConfigError, match="trend='spline' is not valid"):
        GravityModel(temporal={"trend": "spline"})
    with pytest.raises(ModelConfigError, match="needs constraint='none'"):
        GravityModel(temporal=True, constraint="production")
    with pytest.raises(ModelConfigError, match="is not understood"):
        GravityModel(temporal={"periods": ["the nineties"]})
    with pytest.raises(ModelConfigError, match="expected a table of options"):
        GravityModel(temporal="yes")


def test_build_windows_each_source_into_latent_rows(panel):
    ds, _ = panel
    model = _fusion()
    pm_model, state, _ = model._build(ds)
    latent = state["latent"]
    assert latent["periods"] == PERIODS
    assert latent["times"] == pytest.approx([2007.5, 2017.5, 2022.5])
    names = set(pm_model.named_vars)
    for node in ("pair_effect", "trend", "origin_trend", "destination_trend", "duration_census"):
        assert node in names
    assert pm_model.coords["latent_period"] == tuple(PERIODS)
    from flowmodel.models.observations import window_cells

    periods = [parse_period(p) for p in PERIODS]
    census = window_cells(ds, model._observation_models(ds)[0].cells(ds), periods)
    assert set(census.latent_period) == {0, 1}
    np.testing.assert_allclose(census.member_weight, 5.0)
    one_year = window_cells(ds, model._observation_models(ds)[1].cells(ds), periods)
    assert set(one_year.latent_period) == {1}
    np.testing.assert_allclose(one_year.member_weight, 1.0)
    cdr = window_cells(ds, model._observation_models(ds)[2].cells(ds), periods)
    assert set(cdr.latent_period) == {1, 2}  # 2019 months in 2015-2020, 2024 in 2020-2025
    np.testing.assert_allclose(cdr.member_weight, 1 / 12, rtol=0.1)


def test_a_window_over_several_latent_periods_sums_them(panel):
    ds, _ = panel
    periods = ["2005-2010", "2015-2017", "2017-2020", "2020-2025"]
    model = _fusion(periods=periods)
    pm_model, state, _ = model._build(ds)
    assert state["latent"]["periods"] == periods
    from flowmodel.models.observations import window_cells

    cells = window_cells(
        ds, model._observation_models(ds)[0].cells(ds), [parse_period(p) for p in periods]
    )
    # a 2015-2020 cell sums 2 years of 2015-2017 and 3 of 2017-2020
    later = cells.latent_period >= 1
    assert cells.aggregated
    years = np.bincount(cells.member_cell[later], cells.member_weight[later])
    np.testing.assert_allclose(years[years > 0], 5.0)
    assert set(np.round(cells.member_weight[later], 6)) == {2.0, 3.0}
    assert np.isfinite(pm_model.compile_logp()(pm_model.initial_point()))
    # a CDR period may not straddle two latent periods
    relabelled = ds.assign_coords(
        period=[p if p != "2024-02" else "2023-12/2024-02" for p in ds["period"].values]
    )
    straddling = _fusion(periods=["2005-2010", "2015-2020", "2020-2024", "2024-2025"])
    with pytest.raises(ModelConfigError, match="spans several latent periods"):
        straddling._build(relabelled)


def test_a_source_without_a_window_is_refused(panel):
    ds, _ = panel
    ds = ds.copy()
    ds["flow_extra"] = ds["flow_census"].sel(period="2015-2020", drop=True)
    model = _fusion(sources=("census", "extra"))
    with pytest.raises(ModelConfigError, match=r"has none\. Fix: give its flow table a 'period'"):
        model._build(ds)
    ds["flow_extra"].attrs["period"] = "2015-2020"
    model._build(ds)  # the attribute names its window


def test_default_latent_periods_from_the_data(panel):
    ds, _ = panel
    model = FusionModel(latent=GravityModel(temporal=True), sources=["census", "census_1y", "cdr"])
    _, state, _ = model._build(ds)
    assert state["latent"]["periods"] == ["2005-2010", "2015-2020", "2024-01/2024-03"]


def test_predictions_name_their_period_and_widen_with_the_horizon(small_panel):
    ds, _ = small_panel
    walks = ("sigma_trend", "sigma_origin_trend", "sigma_destination_trend")
    model = _mock_fit(_fusion(sources=("census", "cdr")), ds, draws=200, vary=walks)
    spread = []
    for period in ["2020-2025", "2030-2035", "2045-2050", "2070-2075"]:
        pred = model.predict(ds, period=period, quantiles=(0.05, 0.95), seed=2)
        assert pred.attrs["period"] == period
        assert pred.attrs["window_years"] == pytest.approx(5.0)
        draws = model.predict_posterior(ds, period=period, kind="mean", seed=2)
        spread.append(float(np.nanmedian(np.log(draws).std(("chain", "draw")))))
    # 2020-2025 is the last latent period (only the walk scales vary: no spread there);
    # farther ones add walk variance growing with the gap
    assert spread[0] == pytest.approx(0.0, abs=1e-9)
    assert all(b > a for a, b in itertools.pairwise(spread)), spread
    assert model.predict(ds, quantiles=(0.5,)).attrs["period"] == "2020-2025"  # the latest
    with pytest.raises(ModelConfigError, match="is not understood"):
        model.predict(ds, period="next year")


def test_predictions_do_not_depend_on_blocks_or_dask(small_panel):
    ds, _ = small_panel
    model = _mock_fit(_fusion(sources=("census", "cdr")), ds)
    # a unit pair no source observed gets its pair effect from the hierarchy
    a = model.predict(ds, period="2030-2035", block_size=3, seed=4)
    b = model.predict(ds, period="2030-2035", block_size=7, use_dask=True, seed=4)
    xr.testing.assert_allclose(a, b)
    draws = model.predict_posterior(ds, period="2030-2035", kind="mean", seed=4)
    assert draws.attrs["period"] == "2030-2035"
    np.testing.assert_allclose(draws.mean(("chain", "draw")).values, a["mean"].values, rtol=1e-6)


def test_a_model_without_periods_refuses_a_period(small_panel):
    from flowmodel.simulate import simulate_flow_dataset

    ds, _ = simulate_flow_dataset(20, 2, seed=1)
    model = GravityModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="map", random_seed=1)
    with pytest.raises(ModelConfigError, match="has no periods, so it cannot predict"):
        model.predict(ds, period="2015-2020")


def test_log_likelihood_and_predictive_checks_run_over_latent_rows(small_panel):
    ds, _ = small_panel
    model = _mock_fit(_fusion(sources=("census", "cdr")), ds, draws=8)
    tree = model.log_likelihood(ds)
    ll = tree["log_likelihood"]["flow"]
    assert set(np.unique(ll["source"].values)) == {"census", "cdr"}
    assert np.isfinite(ll.values).all()
    checks = model.sample_posterior_predictive(ds, random_seed=1)
    assert "flow_census" in checks["posterior_predictive"]


def test_observed_periods(panel):
    ds, _ = panel
    assert observed_periods(ds, "census") == ["2005-2010", "2015-2020"]
    assert observed_periods(ds, "cdr")[0] == "2019-10"
    assert observed_periods(ds, "nope") == []


def test_save_load_keeps_the_periods(small_panel, tmp_path):
    from flowmodel.models.base import load_model

    ds, _ = small_panel
    model = _mock_fit(_fusion(sources=("census", "cdr")), ds, draws=10)
    model._finalise_idata(model.idata, ds)
    path = model.save(tmp_path / "posterior.nc")
    back = load_model(path)
    assert back.periods == PERIODS
    a = model.predict(ds, period="2030-2035", seed=1)
    b = back.predict(ds, period="2030-2035", seed=1)
    xr.testing.assert_allclose(a, b)


# ------------------------------------------------------------------ real fits (slow)
@pytest.fixture(scope="module")
def panel_fits(panel):
    """NUTS fits of the nowcast (census + 1-year question + CDR) and of census only."""
    ds, _ = panel
    fits = {}
    for name, sources in [
        ("nowcast", ("census", "census_1y", "cdr")),
        ("census_only", ("census", "census_1y")),
    ]:
        model = _fusion(sources=sources, noncentered=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(ds, backend="nutpie", random_seed=1, draws=500, tune=600, chains=2)
        fits[name] = model
    return fits


def _census_scale(model, ds, truth):
    pred = model.predict(ds, period="2020-2025", exposure="census", seed=1)
    return pred / truth["sample_fraction"]


@pytest.mark.slow
def test_nowcast_sees_the_shock_only_the_cdr_saw(panel, panel_fits):
    ds, truth = panel
    target = truth["flows"].sel(period="2020-2025")
    shocked = truth["shocked_pairs"]
    persistence = ds["flow_census"].sel(period="2015-2020", drop=True) / truth["sample_fraction"]
    nowcast = _census_scale(panel_fits["nowcast"], ds, truth)
    census_only = _census_scale(panel_fits["census_only"], ds, truth)

    def score(pred):
        return cpc(target.where(shocked), pred.where(shocked))

    s_now, s_pers, s_cens = score(nowcast["mean"]), score(persistence), score(census_only["mean"])
    print(
        f"shocked-pair CPC: nowcast {s_now:.3f} persistence {s_pers:.3f} census-only {s_cens:.3f}"
    )
    assert s_now >= s_pers + 0.05
    assert s_now >= s_cens + 0.05
    overall = interval_coverage(target, nowcast["q05"], nowcast["q95"])
    on_shocked = interval_coverage(
        target.where(shocked), nowcast["q05"].where(shocked), nowcast["q95"].where(shocked)
    )
    print(f"90% coverage: overall {overall:.3f}, shocked pairs {on_shocked:.3f}")
    assert 0.85 <= overall <= 0.95
    assert 0.85 <= on_shocked <= 0.95


@pytest.mark.slow
def test_temporal_parameters_are_recovered(panel, panel_fits):
    _, truth = panel
    post = panel_fits["nowcast"].posterior
    for name in ("sigma_trend", "sigma_pair", "duration_census"):
        draws = post[name].values.ravel()
        z = abs(draws.mean() - truth[name]) / draws.std()
        print(f"{name}: {draws.mean():.3f} ± {draws.std():.3f} (truth {truth[name]})")
        assert z < 3, name


@pytest.mark.slow
def test_fitted_intervals_widen_monotonically_with_the_horizon(panel, panel_fits):
    ds, _ = panel
    model = panel_fits["census_only"]
    ratio = []
    for period in ["2020-2025", "2025-2030", "2035-2040", "2050-2055"]:
        pred = model.predict(ds, period=period, quantiles=(0.05, 0.95), seed=1)
        ratio.append(float(np.nanmedian(pred["q95"] / np.maximum(pred["q05"], 1))))
    assert all(b > a for a, b in itertools.pairwise(ratio)), ratio


# ------------------------------------------------------------------ the run config
def _project(root, ds):
    """Files of a run: unit squares, a covariates table by period, rounds and CDR as tables."""
    import geopandas as gpd
    from shapely.geometry import box

    root.mkdir(parents=True, exist_ok=True)
    lon, lat = ds["lon"].values, ds["lat"].values
    units = gpd.GeoDataFrame(
        {
            "unit_id": ds["unit"].values.astype(str),
            "country": ds["country"].values.astype(str),
            "cdr_subscribers_per_resident": ds["cdr_subscribers_per_resident"].values,
        },
        geometry=[
            box(x - 0.04, y - 0.04, x + 0.04, y + 0.04) for x, y in zip(lon, lat, strict=True)
        ],
        crs="EPSG:4326",
    )
    units.to_file(root / "units.gpkg", layer="units")
    pop = ds["population_by_date"]
    rows = [
        pd.DataFrame(
            {"unit_id": ds["unit"].values, "period": label, "population": pop.isel(date=k).values}
        )
        for k, label in enumerate(ds["date_label"].values)
    ]
    pd.concat(rows).to_csv(root / "covariates.csv", index=False)
    for name, label in [("census2010", "2005-2010"), ("census2020", "2015-2020")]:
        flow = ds["flow_census"].sel(period=label, drop=True).to_dataframe().dropna()
        flow = flow.reset_index().rename(columns={"flow_census": "count"})
        flow["exposure"] = 0.1
        flow[["origin", "destination", "count", "exposure"]].to_csv(
            root / f"{name}.csv", index=False
        )
    cdr = ds[["flow_cdr", "flow_cdr_max"]].to_dataframe().reset_index()
    cdr = cdr.loc[cdr["flow_cdr"].notna() | cdr["flow_cdr_max"].notna()]
    cdr = cdr.rename(columns={"flow_cdr": "count", "flow_cdr_max": "max"})
    cdr[["origin", "destination", "period", "count", "max"]].to_csv(root / "cdr.csv", index=False)
    config = f"""\
[run]
name = "nowcast"
out_dir = "run"
seed = 1

[units]
path = "units.gpkg"

[covariates]
path = "covariates.csv"

[flows.census2010]
kind = "table"
path = "census2010.csv"
period = "2005-2010"

[flows.census2020]
kind = "table"
path = "census2020.csv"
period = "2015-2020"

[flows.cdr]
kind = "table"
path = "cdr.csv"

[model]
type = "fusion"
backend = "laplace"
draws = 200
chains = 1

[model.options]
sources = ["census2010", "census2020", "cdr"]

[model.options.latent]
type = "gravity"

[model.options.latent.temporal]
periods = {PERIODS!r}
noncentered = true  # Laplace: the walks' joint mode needs it on this small world

[predict]
period = "2020-2025"
formats = ["netcdf", "csv"]

[evaluate]
cv = "last_period"
baselines = true

[report]
enabled = false
"""
    (root / "run.toml").write_text(config)
    return root / "run.toml"


def test_config_reads_the_period_sections(tmp_path):
    from flowmodel.config import load_config
    from flowmodel.exceptions import ConfigError

    (tmp_path / "u.gpkg").write_bytes(b"")
    text = """\
[units]
path = "u.gpkg"

[covariates]
path = "cov.csv"

[rasters.population]
2000 = "pop2000.tif"
2020 = "pop2020.tif"

[rasters]
night_lights = "nl.tif"

[predict]
period = "2015-2020"

[evaluate]
cv = "last_period"
"""
    path = tmp_path / "a.toml"
    path.write_text(text)
    cfg = load_config(path, check_files=False)
    assert cfg.predict.period == "2015-2020"
    assert cfg.evaluate.cv == "last_period"
    assert set(cfg.rasters["population"]) == {"2000", "2020"}
    files = cfg.input_files()
    assert files["rasters.population.2000"].name == "pop2000.tif"
    assert files["covariates.path"].name == "cov.csv"
    path.write_text(text.replace('period = "2015-2020"', 'period = "soon"'))
    with pytest.raises(ConfigError, match=r"\[predict\] period: period label 'soon'"):
        load_config(path, check_files=False)


@pytest.mark.slow
def test_flowmodel_run_nowcasts_census_rounds_and_cdr(tmp_path, panel):
    """prepare -> fit (Laplace) -> predict 2020-2025 -> evaluate cv='last_period'."""
    import json

    from flowmodel import pipeline
    from flowmodel.config import load_config

    ds, _ = panel
    config = _project(tmp_path, ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipeline.run_pipeline(load_config(config), ["prepare", "fit", "predict", "evaluate"])
    run = tmp_path / "run"
    prepared = xr.open_dataset(run / "dataset.nc")
    assert prepared["flow_census2010"].attrs["period"] == "2005-2010"
    assert "population_by_date" in prepared
    flows = xr.open_dataset(run / "flows.nc")
    assert flows.attrs["period"] == "2020-2025"
    assert np.isfinite(flows["mean"].values[~np.eye(ds.sizes["unit"], dtype=bool)]).all()
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["cv"]["scheme"] == "last_period"
    assert metrics["cv"]["source"] == "census2020"
    models = metrics["cv"]["models"]
    assert {"persistence", "persistence_rescaled", "gravity_baseline"} <= set(models)
    cv = pd.read_csv(run / "cv.csv")
    assert set(cv["held_out"]) == {"2015-2020"}
    assert {"FusionModel", "FusionModel (median)"} <= set(cv["model"])
    assert np.isfinite(cv["cpc"]).all() and np.isfinite(cv["log_rmse"]).all()
    fusion = cv.loc[cv["model"] == "FusionModel"].iloc[0]
    assert 0 < fusion["coverage_90"] <= 1


def test_predict_cells_sum_each_cells_window_of_latent_periods(small_panel):
    """A source's predicted cells are its windows over the latent periods, as in the fit.

    With every parameter held at one draw, the cells' expected values agree with the
    mean of the posterior predictive draws of the same cells (which go through the
    fitted windows): summed over the cells, within the count noise of 200 draws.
    """
    ds, _ = small_panel
    model = _mock_fit(_fusion(sources=("census", "cdr")), ds, draws=200, vary=())
    checks = model.sample_posterior_predictive(ds, random_seed=2)["posterior_predictive"]
    for source in ("census", "cdr"):
        cells = model.predict_cells(ds, source, kind="mean", quantiles=(0.5,))
        drawn = checks[f"flow_{source}"].mean(("chain", "draw")).values
        observed = np.isfinite(cells["observed"].values)
        assert cells["mean"].values[observed].sum() == pytest.approx(drawn.sum(), rel=0.1)
    # CDR months of one pair in different latent periods differ (the trends and walks)
    model = _mock_fit(_fusion(sources=("census", "cdr")), ds, draws=20)
    cells = model.predict_cells(ds, "cdr", kind="mean", quantiles=(0.5,))
    frame = cells.to_dataframe().reset_index()
    by_pair = frame.groupby(["origin", "destination"])["mean"].nunique()
    assert (by_pair > 1).mean() > 0.9
