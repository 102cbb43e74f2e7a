"""Metrics (hand-computed), baselines (spint known answers), cross-validation plumbing."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from scipy import stats

from flowmodel.dataset import build_dataset
from flowmodel.evaluate import (
    _intervening_population_bruteforce,
    compare_methods,
    cpc,
    cross_validate,
    deviance,
    evaluate,
    flow_metrics,
    glm_baseline,
    holdout_folds,
    interval_coverage,
    interval_width,
    log_rmse,
    mae,
    pearson_log,
    radiation_baseline,
    spearman_log,
    summarize_cv,
)
from flowmodel.exceptions import DataContractError, ModelConfigError
from flowmodel.naming import quantile_name
from flowmodel.simulate import simulate_flow_dataset
from tests.conftest import require_data


def _da(values, ids=("a", "b", "c")):
    return xr.DataArray(
        np.asarray(values, dtype=float),
        dims=("origin", "destination"),
        coords={"origin": list(ids), "destination": list(ids)},
    )


# ------------------------------------------------------------------------- metrics
OBS = np.array([[np.nan, 10.0, 0.0], [5.0, np.nan, 3.0], [1.0, np.nan, np.nan]])
PRED = np.array([[99.0, 8.0, 1.0], [5.0, 7.0, 6.0], [2.0, 4.0, 123.0]])
# valid off-diagonal pairs: (0,1) (0,2) (1,0) (1,2) (2,0)
Y = np.array([10.0, 0.0, 5.0, 3.0, 1.0])
YHAT = np.array([8.0, 1.0, 5.0, 6.0, 2.0])


def test_cpc_known_values():
    assert cpc(OBS, OBS) == 1.0
    assert (
        cpc(np.array([[np.nan, 3.0], [0.0, np.nan]]), np.array([[np.nan, 0.0], [4.0, np.nan]]))
        == 0.0
    )
    expected = 2 * np.minimum(Y, YHAT).sum() / (Y.sum() + YHAT.sum())
    assert cpc(OBS, PRED) == pytest.approx(expected)
    assert cpc(OBS, PRED) == pytest.approx(2 * (8 + 0 + 5 + 3 + 1) / (19 + 22))
    assert np.isnan(cpc(np.zeros((2, 2)), np.zeros((2, 2))))


def test_point_metrics_hand_computed():
    assert log_rmse(OBS, PRED) == pytest.approx(
        np.sqrt(np.mean((np.log1p(YHAT) - np.log1p(Y)) ** 2))
    )
    assert mae(OBS, PRED) == pytest.approx(np.mean(np.abs(YHAT - Y)))
    assert mae(OBS, PRED) == pytest.approx((2 + 1 + 0 + 3 + 1) / 5)
    assert pearson_log(OBS, PRED) == pytest.approx(np.corrcoef(np.log1p(Y), np.log1p(YHAT))[0, 1])
    assert spearman_log(OBS, PRED) == pytest.approx(stats.spearmanr(Y, YHAT)[0])
    assert log_rmse(OBS, OBS) == 0.0
    assert np.isnan(pearson_log(OBS, np.ones((3, 3))))  # constant prediction


def test_deviance_hand_computed_and_zero_counts():
    term = Y * np.log(Y / YHAT, where=Y > 0, out=np.zeros_like(Y)) - (Y - YHAT)
    assert deviance(OBS, PRED) == pytest.approx(2 * term.sum())
    assert deviance(OBS, OBS) == pytest.approx(0.0)
    assert deviance(np.array([1.0, 0.0]), np.array([0.0, 0.0])) == np.inf


def test_interval_coverage_and_width():
    lower = np.array([[0, 9, 0], [6, 0, 1], [0, 0, 0]], dtype=float)
    upper = np.array([[0, 11, 0], [8, 0, 2], [1, 0, 0]], dtype=float)
    # pairs: 10 in [9,11] yes; 0 in [0,0] yes (closed); 5 in [6,8] no; 3 in [1,2] no; 1 in [0,1] yes
    assert interval_coverage(OBS, lower, upper) == pytest.approx(3 / 5)
    # width over every off-diagonal pair where both bounds are finite (6 pairs)
    assert interval_width(lower, upper) == pytest.approx((2 + 0 + 2 + 1 + 1 + 0) / 6)


def test_diagonal_and_nan_excluded_for_dataarrays_aligned_by_coords():
    obs = _da(OBS)
    pred = _da(PRED).isel(destination=[2, 0, 1])  # reordered: aligned by label
    assert cpc(obs, pred) == pytest.approx(cpc(OBS, PRED))
    assert mae(obs, pred) == pytest.approx(1.4)
    # 1-D arrays have no diagonal
    assert mae(np.array([1.0, 2.0]), np.array([2.0, 2.0])) == pytest.approx(0.5)


def test_metrics_reject_shape_mismatch():
    with pytest.raises(ValueError, match="different shapes"):
        cpc(np.ones((2, 2)), np.ones((3, 3)))


def test_flow_metrics_returns_all_and_matches_parts():
    preds = xr.Dataset(
        {
            "mean": _da(PRED),
            "q05": _da(PRED * 0.5),
            "q25": _da(PRED * 0.8),
            "q75": _da(PRED * 1.2),
            "q95": _da(PRED * 2.0),
        }
    )
    out = flow_metrics(_da(OBS), preds)
    assert out["n_pairs"] == 5
    assert out["cpc"] == pytest.approx(cpc(OBS, PRED))
    assert out["coverage_90"] == pytest.approx(interval_coverage(OBS, PRED * 0.5, PRED * 2.0))
    # 10 in [4,16], 0 in [.5,2] no, 5 in [2.5,10], 3 in [3,12], 1 in [1,4]
    assert out["coverage_90"] == pytest.approx(4 / 5)
    # widths over the 5 scored pairs only
    assert out["width_90"] == pytest.approx(np.mean(YHAT * 1.5))
    assert out["coverage_50"] == pytest.approx(interval_coverage(OBS, PRED * 0.8, PRED * 1.2))
    numpy_out = flow_metrics(OBS, preds)
    assert numpy_out == pytest.approx(out, nan_ok=True)
    no_q = flow_metrics(_da(OBS), preds[["mean"]])
    assert np.isnan(no_q["coverage_50"]) and np.isnan(no_q["width_90"])
    with pytest.raises(DataContractError, match="no 'mean' variable"):
        flow_metrics(_da(OBS), preds[["q05"]])


# ------------------------------------------------------------------------ baselines
def austria_dataset():
    path = require_data("austria_migration_spint", "austria_spint_test_arrays.csv")
    t = pd.read_csv(path)
    ov = t.groupby("origin")["o_var"].first()
    dv = t.groupby("destination")["d_var"].first().reindex(ov.index)
    units = pd.DataFrame(
        {
            "unit_id": ov.index,
            "country": "AT",
            "population": ov.to_numpy(),
            "o_var": ov.to_numpy(),
            "d_var": dv.to_numpy(),
        }
    )
    pairs = t.rename(columns={"dij": "distance_km"})[["origin", "destination", "distance_km"]]
    flows = {"census": t.rename(columns={"flow": "count"})[["origin", "destination", "count"]]}
    return build_dataset(units, pairs=pairs, flows=flows)


def test_glm_baseline_reproduces_spint_austria_unconstrained():
    ds = austria_dataset()
    pred, fit = glm_baseline(
        ds,
        origin_covariates=["log_o_var"],
        destination_covariates=["log_d_var"],
        cost_func="exp",
        return_fit=True,
    )
    np.testing.assert_allclose(
        fit.params.to_numpy(), [-7.95447436, 0.863867812, 0.880474585, -0.00620544765], rtol=1e-6
    )
    np.testing.assert_allclose(
        fit.bse.to_numpy(),
        [7.55583451e-02, 5.16838440e-03, 4.78122141e-03, 5.18488192e-05],
        rtol=1e-4,
    )
    assert fit.aic == pytest.approx(20395.085388908723, rel=1e-8)
    # our Poisson deviance metric equals the GLM's (and spint's) deviance
    assert deviance(ds["flow_census"], pred["mean"]) == pytest.approx(19806.408696637576, rel=1e-6)
    assert json.loads(pred.attrs["params"])["distance"] == pytest.approx(-0.00620544765, rel=1e-6)
    assert set(pred.data_vars) == {"mean", "q05", "q25", "q50", "q75", "q95"}
    assert np.isnan(np.diag(pred["mean"].values)).all()
    # Poisson plug-in quantiles are ordered
    assert (pred["q05"] <= pred["q50"]).sum() == 72 and (pred["q50"] <= pred["q95"]).sum() == 72


def test_glm_baseline_reproduces_spint_austria_constrained():
    ds = austria_dataset()
    _, prod = glm_baseline(
        ds,
        constraint="production",
        destination_covariates=["log_d_var"],
        cost_func="exp",
        return_fit=True,
    )
    assert prod.params["intercept"] == pytest.approx(-1.11700938, abs=1e-6)
    assert prod.params["destination:log_d_var"] == pytest.approx(0.89278717, abs=1e-6)
    assert prod.params["distance"] == pytest.approx(-0.00727113, abs=1e-7)
    assert prod.deviance == pytest.approx(15279.974241770311, rel=1e-6)
    pred, dbl = glm_baseline(ds, constraint="doubly", cost_func="exp", return_fit=True)
    assert dbl.params["intercept"] == pytest.approx(6.20471518, abs=1e-5)
    assert dbl.params["distance"] == pytest.approx(-0.00791533, abs=1e-7)
    assert dbl.deviance == pytest.approx(9360.482092561484, rel=1e-6)
    # doubly constrained: predicted margins equal observed margins
    np.testing.assert_allclose(
        pred["mean"].sum("destination"), ds["flow_census"].sum("destination"), rtol=1e-6
    )


def test_glm_baseline_recovers_simulated_gravity():
    ds, truth = simulate_flow_dataset(
        80,
        3,
        seed=3,
        likelihood="poisson",
        truth={
            **__import__("flowmodel.simulate", fromlist=["DEFAULT_TRUTH"]).DEFAULT_TRUTH,
            "sigma_country": 0.0,
        },
    )
    _, fit = glm_baseline(
        ds,
        destination_covariates=["log_population", "night_lights_per_capita"],
        pair_covariates=["cross_border"],
        return_fit=True,
    )
    for term, value in truth["beta"].items():
        assert fit.params[term] == pytest.approx(value, abs=4 * fit.bse[term] + 0.02), term


def test_glm_baseline_errors_and_unidentified_units():
    ds, _ = simulate_flow_dataset(20, 2, seed=0)
    with pytest.raises(DataContractError, match="covariate 'log_gdp' is not a unit variable"):
        glm_baseline(ds, origin_covariates=["log_gdp"])
    with pytest.raises(ModelConfigError, match="cost_func='linear'"):
        glm_baseline(ds, cost_func="linear")
    with pytest.raises(ModelConfigError, match="constraint='both'"):
        glm_baseline(ds, constraint="both")
    train = ds.copy()
    train["flow_census"] = train["flow_census"].where(train["origin"] != "U0003")
    pred = glm_baseline(train, constraint="production")
    assert np.isnan(pred["mean"].sel(origin="U0003")).all()
    assert np.isfinite(pred["mean"].sel(origin="U0004").drop_sel(destination="U0004")).all()
    two = ds.copy()
    two["flow_other"] = two["flow_census"]
    with pytest.raises(DataContractError, match="pass source="):
        glm_baseline(two)


def test_glm_baseline_offsets_exposure():
    ds, _ = simulate_flow_dataset(30, 2, seed=4, sample_fraction=0.1)
    full = glm_baseline(ds, return_fit=True)[1]
    ignored = glm_baseline(ds, exposure=False, return_fit=True)[1]
    assert full.params["intercept"] - ignored.params["intercept"] == pytest.approx(
        -np.log(0.1), rel=1e-6
    )


def test_glm_country_effects_fill_unobserved_country():
    ds, _ = simulate_flow_dataset(40, 3, seed=5, observed_countries=["C00", "C01"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pred, fit = glm_baseline(
            ds, country_effects=True, pair_covariates=["cross_border"], return_fit=True
        )
    unobserved = ds["country"].values == "C02"
    assert np.isfinite(pred["mean"].values[unobserved][:, ~unobserved]).all()
    assert any(k.startswith("country[") for k in fit.params.index)


def test_intervening_population_bruteforce_matches_pairs():
    from flowmodel.pairs import intervening_population

    rng = np.random.default_rng(0)
    pop = rng.integers(1, 100, 12).astype(float)
    xy = rng.uniform(0, 10, (12, 2))
    dist = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(dist, np.nan)
    np.testing.assert_allclose(
        _intervening_population_bruteforce(pop, dist),
        intervening_population(pop, dist),
        equal_nan=True,
    )


def test_radiation_baseline_hand_computed():
    # three units on a line: a(0) b(1) c(3); populations 10, 20, 30
    units = pd.DataFrame(
        {"unit_id": ["a", "b", "c"], "country": "X", "population": [10.0, 20.0, 30.0]}
    )
    pos = {"a": 0.0, "b": 1.0, "c": 3.0}
    pairs = pd.DataFrame(
        [(o, d, abs(pos[o] - pos[d])) for o in pos for d in pos if o != d],
        columns=["origin", "destination", "distance_km"],
    )
    flows = pd.DataFrame(
        [(o, d, 6.0) for o in pos for d in pos if o != d],
        columns=["origin", "destination", "count"],
    )
    ds = build_dataset(units, pairs=pairs, flows={"census": flows})
    pred = radiation_baseline(ds, intervals="none")
    # origin a: m=10; b: s=0 -> p = 10*20/(10*30); c: s=20 -> p = 10*30/(30*60)
    p_ab, p_ac = 10 * 20 / (10 * 30), 10 * 30 / (30 * 60)
    assert p_ab + p_ac == pytest.approx(1 - 10 / 60)  # finite-system normalisation, exact
    assert pred["mean"].sel(origin="a", destination="b") == pytest.approx(
        12 * p_ab / (p_ab + p_ac)
    )
    np.testing.assert_allclose(pred["mean"].sum("destination"), [12.0, 12.0, 12.0])
    assert np.isnan(pred["q05"]).all()
    # held-out pair: outflow spread over the observed destination only
    part = ds.copy()
    part["flow_census"] = part["flow_census"].where(
        ~((part.origin == "a") & (part.destination == "c"))
    )
    pred2 = radiation_baseline(part)
    assert pred2["mean"].sel(origin="a", destination="b") == pytest.approx(6.0)
    assert pred2["mean"].sel(origin="a", destination="c") == pytest.approx(6.0 * p_ac / p_ab)


# ----------------------------------------------------------------- cross-validation
@pytest.fixture(scope="module")
def sim():
    ds, truth = simulate_flow_dataset(30, 3, seed=7)
    return ds, truth


def test_holdout_pairs_partition_observed_pairs(sim):
    ds, _ = sim
    folds = holdout_folds(ds, scheme="pairs", folds=4, seed=1)
    masks = np.stack([m for _, m in folds])
    observed = np.isfinite(ds["flow_census"].values)
    assert len(folds) == 4
    assert (masks.sum(axis=0) == observed).all()  # every observed pair exactly once
    assert max(m.sum() for m in masks) - min(m.sum() for m in masks) <= 1
    again = holdout_folds(ds, scheme="pairs", folds=4, seed=1)
    assert all((a[1] == b[1]).all() for a, b in zip(folds, again, strict=True))


def test_holdout_unit_and_country(sim):
    ds, _ = sim
    unit_folds = holdout_folds(ds, scheme="unit", folds=None)
    assert len(unit_folds) == 30
    label, mask = unit_folds[3]
    i = list(ds["origin"].values).index(label)
    off = np.ones_like(mask)
    off[i, :] = False
    off[:, i] = False
    assert mask[i].sum() == 29 and not mask[off].any()
    assert len(holdout_folds(ds, scheme="unit", folds=5, seed=0)) == 5
    country_folds = holdout_folds(ds, scheme="country", folds=None)
    country = ds["country"].values
    for code, mask in country_folds:
        assert mask[country == code].sum() == mask.sum()  # only origins in that country
    with pytest.raises(ValueError, match="scheme='random'"):
        holdout_folds(ds, scheme="random")
    one, _ = simulate_flow_dataset(10, 1, seed=0)
    with pytest.raises(DataContractError, match="at least 2 countries"):
        holdout_folds(one, scheme="country")


class StubModel:
    """A model-shaped object: predicts the training mean flow; records what it saw."""

    fitted: list = []  # noqa: RUF012

    def __init__(self, *, level=1.0, source=None):
        self.model_config = {"level": level, "source": source}

    def fit(self, data, *, backend="auto", random_seed=None, progressbar=None):
        self.train = data
        StubModel.fitted.append(self)
        return None

    def predict(self, data, *, quantiles=(0.05, 0.25, 0.5, 0.75, 0.95), exposure=None, seed=0):
        level = float(np.nanmean(self.train["flow_census"].values)) * self.model_config["level"]
        mean = xr.full_like(data["distance_km"], level).where(
            data["origin"] != data["destination"]
        )
        out = xr.Dataset({"mean": mean})
        for q in quantiles:
            out[quantile_name(q)] = mean * (0.5 + q)
        return out


def test_cross_validate_refits_clones_on_training_pairs_only(sim):
    ds, _ = sim
    StubModel.fitted = []
    model = StubModel(level=1.0)
    cv = cross_validate(model, ds, scheme="pairs", folds=3, backend="map", seed=0)
    assert list(cv["model"].unique()) == ["StubModel", "glm_baseline", "radiation_baseline"]
    assert len(cv) == 9
    assert set(cv.loc[cv.model == "StubModel", "backend"]) == {"map"}
    assert set(cv.loc[cv.model == "glm_baseline", "backend"]) == {"mle"}
    assert not hasattr(model, "train")  # the original model is never fitted
    assert len(StubModel.fitted) == 3 and len({id(m) for m in StubModel.fitted}) == 3
    folds = holdout_folds(ds, scheme="pairs", folds=3, seed=0)
    for clone, (_, mask) in zip(StubModel.fitted, folds, strict=True):
        assert np.isnan(clone.train["flow_census"].values[mask]).all()  # held-out pairs hidden
    # metrics are computed on the held-out pairs
    assert (cv["n_pairs"] == cv["n_test"]).all()
    assert cv["n_test"].iloc[:3].sum() == int(np.isfinite(ds["flow_census"].values).sum())
    for col in ("cpc", "log_rmse", "pearson_log", "coverage_50", "coverage_90", "fit_seconds"):
        assert col in cv
    # the GLM beats a constant, on held-out pairs
    summary = summarize_cv(cv).set_index("model")
    assert summary.loc["glm_baseline", "cpc"] > summary.loc["StubModel", "cpc"]


def test_cross_validate_baselines_only_and_choice(sim):
    ds, _ = sim
    cv = cross_validate(None, ds, scheme="country", folds=None, baselines=["glm"])
    assert set(cv["model"]) == {"glm_baseline"}
    assert set(cv["held_out"]) <= set(ds["country"].values)
    with pytest.raises(ValueError, match="baselines="):
        cross_validate(None, ds, baselines=["knn"])


def test_evaluate_against_observed_and_truth(sim):
    ds, truth = sim
    pred = glm_baseline(ds, pair_covariates=["cross_border"])
    table = evaluate(
        None,
        ds,
        predictions=pred,
        baselines=True,
        glm_kwargs={"pair_covariates": ["cross_border"]},
    )
    assert list(table["model"]) == ["glm_baseline", "glm_baseline", "radiation_baseline"]
    assert table.loc[0, "cpc"] == pytest.approx(table.loc[1, "cpc"])
    vs_truth = evaluate(None, ds, predictions=pred, observed=truth["mu"])
    assert vs_truth.loc[0, "pearson_log"] > 0.9
    with pytest.raises(ValueError, match="pass a fitted model or predictions"):
        evaluate(None, ds)


def test_baselines_need_dense_data(sim):
    ds, _ = sim
    sparse = ds.stack(pair=("origin", "destination")).reset_index("pair")
    with pytest.raises(DataContractError, match="dense"):
        glm_baseline(sparse)


def test_glm_baseline_reproduces_skmob_new_york_fit():
    import geopandas as gpd

    folder = require_data("ny_commuting_skmob")
    raw = gpd.read_file(folder / "NY_counties_2011.geojson")
    units = gpd.GeoDataFrame(
        {"unit_id": raw["tile_id"].astype(str), "country": "US", "population": raw["population"]},
        geometry=raw.geometry,
        crs=raw.crs,
    )
    flows = pd.read_csv(
        folder / "NY_commuting_flows_2011.csv", dtype={"origin": str, "destination": str}
    )
    flows = flows.loc[flows.origin != flows.destination].rename(columns={"flow": "count"})
    ds = build_dataset(units, flows={"commuting": flows})
    _, fit = glm_baseline(ds, constraint="production", return_fit=True)
    # skmob README: destination_exp=0.6471759552223144, deterrence_func_args=[-1.9947152031914186];
    # our centroids are equal-area polygon centroids, skmob's its own tile centroids: close, not equal
    assert fit.params["destination:log_population"] == pytest.approx(0.6471759552223144, abs=0.005)
    assert fit.params["log_distance"] == pytest.approx(-1.9947152031914186, abs=0.01)


def test_glm_population_scale_and_evaluate_exposure():
    ds, truth = simulate_flow_dataset(30, 2, seed=8, sample_fraction=0.2)
    sample = glm_baseline(ds)
    population = glm_baseline(ds, population_scale=True)
    ratio = (sample["mean"] / population["mean"]).values
    assert np.nanmax(np.abs(ratio - 0.2)) < 1e-9
    # observed counts are scored on the sample scale, true mu on the population scale
    vs_counts = evaluate(None, ds, predictions=sample, baselines=True)
    vs_truth = evaluate(None, ds, predictions=population, observed=truth["mu"], baselines=True)
    assert vs_counts.loc[1, "total_predicted"] == pytest.approx(
        vs_counts.loc[1, "total_observed"], rel=1e-6
    )
    assert vs_truth.loc[1, "cpc"] == pytest.approx(vs_truth.loc[0, "cpc"])
    assert vs_truth.loc[1, "total_predicted"] == pytest.approx(
        5 * vs_counts.loc[1, "total_predicted"], rel=1e-6
    )


@pytest.mark.slow
def test_validation_driver_austria_matches_spint(tmp_path):
    from tests.conftest import load_script

    require_data("austria_migration_spint")
    module = load_script("validate_real_data")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        argv = [
            "--out",
            str(tmp_path),
            "--only",
            "austria",
            "--draws",
            "300",
            "--tune",
            "300",
            "--folds",
            "2",
        ]
        assert module.main(argv) == 0
    results = json.loads((tmp_path / "austria" / "results.json").read_text())
    for row in results["coefficients"]:
        assert row["posterior mean"] == pytest.approx(row["spint (MLE)"], rel=0.01), row["term"]
        assert row["90% lower"] <= row["spint (MLE)"] <= row["90% upper"], row["term"]
    for name in (
        "flows.nc",
        "flows.csv",
        "posterior.nc",
        "units.gpkg",
        "report.html",
        "flow_map.png",
    ):
        assert (tmp_path / "austria" / name).stat().st_size > 0


def test_radiation_baseline_unobserved_origins_use_emigration_rate():
    ds, _ = simulate_flow_dataset(20, 2, seed=9, observed_countries=["C00"])
    observed = ds["country"].values == "C00"
    pred = radiation_baseline(ds)
    y = ds["flow_census"].values
    rate = np.nansum(y[observed]) / ds["population"].values[observed].sum()
    expected = rate * ds["population"].values[~observed]
    np.testing.assert_allclose(
        np.nansum(pred["mean"].values[~observed], axis=1), expected, rtol=1e-9
    )
    np.testing.assert_allclose(
        np.nansum(pred["mean"].values[observed], axis=1), np.nansum(y[observed], axis=1), rtol=1e-9
    )
    assert np.isnan(
        radiation_baseline(ds, unobserved_outflow="nan")["mean"].values[~observed]
    ).all()
    with pytest.raises(ModelConfigError, match="unobserved_outflow='zero'"):
        radiation_baseline(ds, unobserved_outflow="zero")


def test_compare_methods_scores_each_method_on_the_cells_it_predicts():
    obs = np.array([10.0, 20.0, 40.0, 80.0])
    interval = pd.DataFrame(
        {"q05": [5.0, 25.0, 30.0, 60.0], "q50": [9.0, 30.0, 40.0, 70.0], "q95": [15, 35, 50, 90]}
    )
    last_year = np.array([np.nan, 18.0, 44.0, 80.0])  # no value for the first cell
    table = compare_methods(obs, {"model": interval, "persistence": last_year}).set_index("method")
    assert table.loc["model", "n"] == 4 and table.loc["persistence", "n"] == 3
    # CPC = 2 sum(min) / (sum(obs) + sum(pred)), by hand
    assert table.loc["model", "CPC"] == pytest.approx(2 * (9 + 20 + 40 + 70) / (150 + 149))
    assert table.loc["persistence", "CPC"] == pytest.approx(2 * (18 + 40 + 80) / (140 + 142))
    # log(1 + y): 18 against 20, 44 against 40, 80 against 80
    expected = np.sqrt((np.log(19 / 21) ** 2 + np.log(45 / 41) ** 2) / 3)
    assert table.loc["persistence", "log-RMSE"] == pytest.approx(expected)
    # the second cell (20) lies outside [25, 35]: 3 of 4 covered; no interval, no coverage
    assert table.loc["model", "90% coverage"] == 0.75
    assert np.isnan(table.loc["persistence", "90% coverage"])
