"""FusionModel: one latent flow field observed by a census sample and by redacted CDR (issue 7).

Fast tests check the simulated fusion world, the censored likelihood and the
model's structure and errors. Slow tests fit the default fusion world (6
countries: census in 2, CDR in 3 with one overlapping, nothing in 2) once with
NUTS, plus three comparison fits (census only, CDR only, redacted-as-zero), and
check the issue's recovery, baseline, coverage, hold-out and censoring claims.

"True flows" are the generating expected flows ``truth["mu"]`` for point
metrics (CPC, log-RMSE: the estimand of a point prediction) and the realised
population flows ``truth["flows"]`` for predictive-interval coverage.
"""

from __future__ import annotations

import json
import os
import warnings

import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt
import pytest
import xarray as xr
from scipy import special, stats

from flowmodel.dataset import marginals_to_dataset, totals_to_dataset, validate_dataset
from flowmodel.evaluate import cpc, interval_coverage, interval_width, log_rmse
from flowmodel.exceptions import (
    DataContractError,
    FitFailedError,
    ModelConfigError,
    PriorWarning,
)
from flowmodel.models import compare
from flowmodel.models.fusion import FusionModel, source_kind
from flowmodel.models.gravity import GravityModel
from flowmodel.models.likelihoods import censored_nb_logp, truncated_nb_moments
from flowmodel.models.observations import (
    SHARE_CEILING_SHARPNESS,
    CDRObservation,
    read_cells,
    share_ceiling,
)
from flowmodel.models.radiation import RadiationModel
from flowmodel.simulate import simulate_fusion_dataset

pytestmark = pytest.mark.xdist_group("fusion")

#: Seed of the world, the split and the fits; FLOWMODEL_FUSION_SEED=<n> reruns the slow
#: checks on another world (robustness runs, reported in docs/fusion.md).
SEED = int(os.environ.get("FLOWMODEL_FUSION_SEED", "0"))
GRAVITY = {
    "origin_covariates": ["log_population"],
    "destination_covariates": ["log_population", "night_lights_per_capita"],
    # every fitted origin country has many observed pairs: the centred form mixes better
    # (seed 0, 2 x 600: country-effect ESS 376-519 against 144-239 non-centred)
    "noncentered": False,
}
#: 2 x 300 left R-hat up to 1.08 on the country effects, and the slow checks' numbers moved
#: with the compiled code's rounding (a fresh PyTensor cache against a warm one)
NUTS = {"backend": "nutpie", "draws": 600, "tune": 600, "chains": 2}
HELD_OUT_SHARE = 0.15
#: What the analyst of the test world knows and states: the operator's relocations cover the
#: census question's own window, so CDR counts per latent flow beyond the market share
#: (period_scale) are 1 up to +-10%. The raw-CDR baseline of (b) assumes exactly 1.
#: FLOWMODEL_FUSION_PRIORS='<json>' replaces these priors (for prior-sensitivity sweeps).
PRIORS = json.loads(os.environ.get("FLOWMODEL_FUSION_PRIORS", "null")) or {
    "period_scale": {"dist": "LogNormal", "mu": 0.0, "sigma": 0.1},
}


def gravity() -> GravityModel:
    return GravityModel(**GRAVITY)


def small_world_gravity() -> GravityModel:
    """The latent of the 4-units-a-country worlds: few pairs per country level, non-centred."""
    return GravityModel(**{**GRAVITY, "noncentered": True})


@pytest.fixture(scope="module")
def world():
    return simulate_fusion_dataset(seed=SEED)


# ----------------------------------------------------------------------------- fast
def test_world_follows_the_fusion_design(world):
    ds, truth = world
    validate_dataset(ds)
    country = ds["country"].values.astype(str)
    assert sorted(set(country)) == [f"C0{k}" for k in range(6)]
    census_origins = set(country[np.isfinite(ds["flow_census"].values).any(axis=1)])
    assert census_origins == set(truth["census_countries"]) == {"C00", "C01"}
    cdr_seen = np.isfinite(ds["flow_cdr"].values) | np.isfinite(ds["flow_cdr_max"].values)
    o, d, _ = np.nonzero(cdr_seen)
    assert set(country[o]) == set(truth["cdr_countries"]) == {"C01", "C02", "C03"}
    assert np.all(country[o] == country[d]), "an operator observes its own country only"
    assert truth["no_data_countries"] == ["C04", "C05"]
    # redaction: censored cells are NaN with bound 15, observed cells are > 15
    cdr, bound = ds["flow_cdr"].values, ds["flow_cdr_max"].values
    assert np.all(bound[np.isfinite(bound)] == 15.0)
    assert np.all(np.isnan(cdr[np.isfinite(bound)]))
    assert np.nanmin(cdr) > 15
    assert 0.2 < np.isfinite(bound).sum() / cdr_seen.sum() < 0.8
    # market share below one and varying by unit; the covariate is biased but informative
    share = truth["market_share"]
    assert share.max() < 1 and share.std() > 0.03
    cov = ds["cdr_subscribers_per_resident"].to_series().reindex(share.index)
    assert np.corrcoef(cov, share)[0, 1] > 0.8
    np.testing.assert_allclose(
        np.exp(np.log(truth["period_effect"]).mean()), truth["period_scale"]
    )
    assert float(ds["exposure_census"].max()) == pytest.approx(0.1)


def test_world_is_seeded():
    a, ta = simulate_fusion_dataset(units_per_country=4, seed=3)
    b, tb = simulate_fusion_dataset(units_per_country=4, seed=3)
    c, _ = simulate_fusion_dataset(units_per_country=4, seed=4)
    xr.testing.assert_identical(a, b)
    np.testing.assert_array_equal(ta["market_share"], tb["market_share"])
    assert not a["flow_census"].equals(c["flow_census"])


def test_world_rejects_unknown_countries():
    with pytest.raises(ModelConfigError, match=r"C09.*do not exist"):
        simulate_fusion_dataset(census_countries=("C09",))


@pytest.mark.parametrize("upper", [0.0, 3.0, 15.0, 40.0])
def test_censored_logp_is_the_negative_binomial_cdf(upper):
    mu = np.array([0.5, 4.0, 20.0, 80.0])
    phi = 3.0
    got = censored_nb_logp(mu, phi, np.full(4, upper)).eval()
    expected = stats.nbinom.logcdf(upper, phi, phi / (phi + mu))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_censored_logp_mixed_bounds_and_large_bounds():
    mu = np.array([5.0, 5.0, 200.0])
    got = censored_nb_logp(mu, 2.0, np.array([2.0, 15.0, 150.0])).eval()  # 150 > summation cap
    expected = stats.nbinom.logcdf([2, 15, 150], 2.0, 2.0 / (2.0 + mu))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_censored_logp_with_lower_bounds_is_a_cdf_difference():
    # "<5" in a table that prints zeros holds 1..4: P(1 <= y <= 4) = F(4) - F(0)
    mu = np.array([0.5, 3.0, 8.0, 20.0, 200.0, 5.0])
    upper = np.array([4.0, 4.0, 15.0, 4.0, 150.0, 4.0])  # 150 > summation cap
    lower = np.array([1.0, 0.0, 1.0, 2.0, 100.0, 4.0])
    p = 2.5 / (2.5 + mu)
    expected = np.log(stats.nbinom.cdf(upper, 2.5, p) - stats.nbinom.cdf(lower - 1, 2.5, p))
    got = censored_nb_logp(mu, 2.5, upper, lower).eval()
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    # lower = 0 everywhere is the plain CDF
    np.testing.assert_allclose(
        censored_nb_logp(mu, 2.5, upper, np.zeros(6)).eval(),
        stats.nbinom.logcdf(upper, 2.5, p),
        rtol=1e-6,
    )
    mean = truncated_nb_moments(mu[:4], 2.5, upper[:4], lower[:4])[0].eval()
    for k in range(4):
        support = np.arange(int(lower[k]), int(upper[k]) + 1)
        w = stats.nbinom.pmf(support, 2.5, p[k])
        np.testing.assert_allclose(mean[k], (w * support).sum() / w.sum(), rtol=1e-6)


def test_source_kinds():
    assert source_kind("cdr") == source_kind("cdr_operator_b") == "cdr"
    assert source_kind("census") == source_kind("survey") == "census"


def test_model_structure(world):
    ds, _ = world
    model = FusionModel(latent=gravity())
    pm_model, model.fit_meta, _ = model._build(ds)
    names = set(pm_model.named_vars)
    for node in (
        "intercept",
        "beta",
        "country_effect",
        "sigma_country",
        "phi",
        "market_share",
        "market_share_country",
        "sigma_market_share",
        "period_scale",
        "period_effect",
        "period_deviation",
        "y_census",
        "y_cdr",
        "y_cdr_censored",
    ):
        assert node in names, node
    assert list(pm_model.coords["source"]) == ["census", "cdr"]
    assert pm_model.named_vars_to_dims["phi"] == ("source",)
    assert pm_model.named_vars_to_dims["period_effect"] == ("period",)
    # market share: one per origin unit of the CDR countries, pooled by country
    units = list(pm_model.coords["market_unit"])
    cdr_units = ds["unit"].values[np.isin(ds["country"].values, ["C01", "C02", "C03"])]
    assert sorted(units) == sorted(cdr_units.tolist())
    assert list(pm_model.coords["market_country"]) == ["C01", "C02", "C03"]
    # every cell enters: observed counts and the redacted (censored) ones
    n_obs = int(np.isfinite(ds["flow_cdr"].values).sum())
    n_cens = int(np.isfinite(ds["flow_cdr_max"].values).sum())
    assert model.fit_meta["n_cells"]["cdr"] == n_obs + n_cens
    assert model.fit_meta["n_censored"]["cdr"] == n_cens
    assert model.fit_meta["n_cells"]["census"] == int(np.isfinite(ds["flow_census"].values).sum())
    # the latent field is shared: one eta per distinct pair any source observes
    assert model.fit_meta["n_pairs"] < model.fit_meta["n_cells"]["census"] + n_obs + n_cens


def test_censored_cells_change_the_likelihood():
    ds, _ = simulate_fusion_dataset(units_per_country=4, seed=1)
    n_censored = int(ds["flow_cdr_max"].notnull().sum())
    assert n_censored > 10
    point = None
    logps = {}
    variants = {
        "censored": ds,
        "bound_30": ds.assign(flow_cdr_max=ds["flow_cdr_max"] * 2),
        "dropped": ds.drop_vars("flow_cdr_max"),
    }
    for name, data in variants.items():
        model = FusionModel(latent=small_world_gravity())
        pm_model, model.fit_meta, _ = model._build(data)
        assert ("y_cdr_censored" in pm_model.named_vars) == (name != "dropped")
        if name == "dropped":  # the redacted cells are gone from the likelihood
            assert model.fit_meta["n_censored"]["cdr"] == 0
            continue
        assert model.fit_meta["n_censored"]["cdr"] == n_censored
        point = point or pm_model.initial_point()
        term = pm_model.compile_logp(vars=[pm_model["y_cdr_censored"]], mode="FAST_COMPILE")
        logps[name] = float(term(point))
    # every redacted cell adds log P(y <= 15) < log P(y <= 30) < log 1 = 0, where dropping it
    # would add nothing
    assert logps["censored"] < logps["bound_30"] < 0


def test_single_period_or_none_has_only_the_scale(world):
    ds, _ = world
    one = FusionModel(latent=gravity()).build_model(ds.isel(period=[0]))
    assert "period_deviation" not in one.named_vars
    assert {"period_scale", "period_effect", "market_share"} <= set(one.named_vars)
    flat = ds.isel(period=0, drop=True)  # a CDR OD matrix without a period dim
    none = FusionModel(latent=gravity()).build_model(flat)
    assert "period_scale" in none.named_vars
    assert "period_effect" not in none.named_vars


def test_penetration_covariate_enters_by_its_shape_whatever_its_scale(world):
    """logit s_i = m_c + offset_c + b z_i + sigma e_i, z = the covariate standardised in-country."""
    ds, truth = world
    cdr_units = np.flatnonzero(np.isin(ds["country"].values, truth["cdr_countries"]))
    country = ds["country"].values.astype(str)[cdr_units]
    cov = ds["cdr_subscribers_per_resident"].values[cdr_units]
    logit_cov = np.log(cov / (1 - cov))
    share = CDRObservation("cdr").market_share_design(ds, cdr_units)
    # a share-scale covariate: logit, standardised within each country (mean 0, pooled sd 1),
    # and its country means give the level
    assert share["scale"] == "logit" and share["level"] == "covariate"
    for code in truth["cdr_countries"]:
        m = country == code
        assert share["z"][m].mean() == pytest.approx(0.0, abs=1e-12)
        np.testing.assert_allclose(share["centre"][m], logit_cov[m].mean())
    assert np.sum(share["z"] ** 2) / (len(cdr_units) - 3) == pytest.approx(1.0)

    # the same covariate on a panel's scale (subscribers per resident ~ 4e-4): the shape is
    # kept, the level is the default (it was logit(0.01) for every unit before: no shape)
    panel = ds.assign(cdr_subscribers_per_resident=ds["cdr_subscribers_per_resident"] * 1e-3)
    small = CDRObservation("cdr").market_share_design(panel, cdr_units)
    assert small["level"] == "default"
    np.testing.assert_allclose(small["centre"], np.log(0.3 / 0.7))
    assert np.corrcoef(small["z"], share["z"])[0, 1] > 0.95
    centre = CDRObservation("cdr").market_share_centre(panel, cdr_units)
    assert np.corrcoef(centre, truth["market_share"].to_numpy())[0, 1] > 0.5

    # above one (multi-SIM subscriptions per resident): the log scale; a missing value: z = 0
    values = ds["cdr_subscribers_per_resident"].values * 3.0
    values[cdr_units[0]] = np.nan
    multi = CDRObservation("cdr").market_share_design(
        ds.assign(cdr_subscribers_per_resident=("unit", values)), cdr_units
    )
    assert multi["scale"] == "log" and multi["level"] == "default"
    assert multi["z"][0] == 0.0 and multi["n_covariate"] == len(cdr_units) - 1

    # no covariate: the default level, no shape and no slope node
    none = CDRObservation("cdr", market_share_covariate=None)
    design = none.market_share_design(ds, cdr_units)
    assert design["scale"] is None and not design["z"].any()
    np.testing.assert_allclose(none.market_share_centre(ds, cdr_units), np.log(0.3), rtol=1e-5)
    assert "market_share_slope" not in none.nodes(ds)
    assert "market_share_slope" in CDRObservation("cdr").nodes(ds)


def test_shares_deviate_on_the_log_scale_unless_the_covariate_reads_as_a_share(world):
    """A panel-scale covariate (proportional to the share): log s_i = C(log expit(level) + b z_i).

    Its units deviate multiplicatively, so a slope moves each unit's *log* share by
    slope * z_i, whatever the level (under the ceiling at 1, which no share passes); a
    share-scale covariate keeps the logit. The link is recorded with the fit's design.
    """
    ds, truth = world
    cdr_units = np.flatnonzero(np.isin(ds["country"].values, truth["cdr_countries"]))
    panel = ds.assign(cdr_subscribers_per_resident=ds["cdr_subscribers_per_resident"] * 1e-3)
    assert CDRObservation("cdr").market_share_design(ds, cdr_units)["link"] == "logit"
    design = CDRObservation("cdr").market_share_design(panel, cdr_units)
    assert design["link"] == "log" and design["level"] == "default"
    pm_model, state, _ = FusionModel(latent=gravity())._build(panel)
    assert state["observations"]["cdr"]["market_share"]["link"] == "log"
    share = pm_model.compile_fn(
        pm_model.replace_rvs_by_values([pm_model["market_share"]])[0],
        inputs=pm_model.value_vars,
        on_unused_input="ignore",
    )
    k = SHARE_CEILING_SHARPNESS

    def below_ceiling(s):  # the inverse of share_ceiling
        return -np.log(np.expm1(-k * np.log(s))) / k

    point = pm_model.initial_point()
    for level in (-2.0, 0.0, 1.5):  # low, middle and high share levels
        point["market_share_level_raw"] = np.asarray(level)
        base = below_ceiling(share(point))
        moved = dict(point, market_share_slope=point["market_share_slope"] + 0.4)
        np.testing.assert_allclose(
            below_ceiling(share(moved)) - base, 0.4 * design["z"], atol=1e-6
        )
        assert np.all(share(moved) < 1.0)
    # the ceiling: the log share itself below a share of 0.4, within 3% up to 0.8, never 1
    x = np.log([0.05, 0.4, 0.8, 1.0, 3.0])
    got = np.exp(share_ceiling(pt.as_tensor(x)).eval())
    np.testing.assert_allclose(got[:2], [0.05, 0.4], rtol=1e-4)
    assert got[2] == pytest.approx(0.8, rel=0.03) and got[3] < 0.95 and got[4] < 1.0


def test_market_share_may_go_with_the_latent_origin_terms(world):
    """logit s_i gains a' x_i: the latent's origin covariates, standardised within country.

    An operator covers populous, urban units better, so its share goes with what makes
    a unit send migrants; without the slopes, the CDR's per-origin counts read that
    covariation as migration and move the latent origin coefficients (issue 15).
    """
    ds, truth = world
    cdr_units = np.flatnonzero(np.isin(ds["country"].values, truth["cdr_countries"]))
    country = ds["country"].values.astype(str)[cdr_units]
    log_pop = np.log(ds["population"].values[cdr_units])
    assert FusionModel(latent=gravity())._options("cdr")["market_share_origin_terms"] == []
    model = FusionModel(latent=gravity(), market_share_origin_terms="latent")
    options = model._options("cdr")
    assert options["market_share_origin_terms"] == ["log_population"]  # the latent's
    design = CDRObservation("cdr", **options).market_share_design(ds, cdr_units)
    assert design["origin_terms"] == ["log_population"]
    x = design["x"][:, 0]
    for code in truth["cdr_countries"]:
        m = country == code
        assert x[m].mean() == pytest.approx(0.0, abs=1e-12)
        # a within-country shape: the same order as the log population
        assert np.corrcoef(x[m], log_pop[m])[0, 1] == pytest.approx(1.0)
    assert np.sum(x**2) / (len(cdr_units) - 3) == pytest.approx(1.0)

    pm_model, state, _ = model._build(ds)
    assert list(pm_model.coords["market_origin_term"]) == ["log_population"]
    assert pm_model.named_vars_to_dims["market_share_origin_slope"] == ("market_origin_term",)
    assert "x" not in state["observations"]["cdr"]["market_share"]  # no per-unit values
    # the slope moves the logit share of each unit by slope * x_i, nothing else
    point = pm_model.initial_point()
    share = pm_model.compile_fn(
        pm_model.replace_rvs_by_values([pm_model["market_share"]])[0],
        inputs=pm_model.value_vars,
        on_unused_input="ignore",
    )
    base = special.logit(share(point))
    point["market_share_origin_slope"] = point["market_share_origin_slope"] + 0.7
    np.testing.assert_allclose(special.logit(share(point)) - base, 0.7 * x, atol=1e-6)

    # none: no node, the share as before
    for off in (None, []):
        plain = FusionModel(latent=gravity(), market_share_origin_terms=off)
        assert plain._options("cdr")["market_share_origin_terms"] == []
        assert "market_share_origin_slope" not in plain.build_model(ds).named_vars
    # a term the dataset lacks, or a bad spec, names the fix
    with pytest.raises(ModelConfigError, match="not a unit variable"):
        FusionModel(latent=gravity(), market_share_origin_terms=["log_altitude"]).build_model(ds)
    with pytest.raises(ModelConfigError, match=r"market_share_origin_terms='all'.*Fix"):
        FusionModel(latent=gravity(), market_share_origin_terms="all")
    with pytest.raises(ModelConfigError, match=r"market_share_origin_terms.*list of unit"):
        CDRObservation("cdr", market_share_origin_terms="log_population")


def test_market_share_offsets_keep_their_prior_relative_to_the_period_scale(world):
    """x = raw - g log kappa with raw | kappa ~ N(mu + g log kappa, sd) is N(mu, sd), kappa-free."""
    ds, _ = world
    model = FusionModel(latent=gravity())
    pm_model, state, _ = model._build(ds)
    free = {v.name for v in pm_model.free_RVs}
    names = {"market_share_level_raw", "market_share_country_raw", "market_share_z"}
    assert names | {"market_share_slope"} <= free
    assert not {"market_share_country", "market_share_level"} & free  # Deterministics
    offset, level, scale = pm.draw(
        [
            pm_model["market_share_country"],
            pm_model["market_share_level"],
            pm_model["period_scale"],
        ],
        draws=4000,
        random_seed=0,
    )
    assert offset.mean(axis=0) == pytest.approx(np.zeros(3), abs=0.05)
    assert offset.std(axis=0) == pytest.approx(np.full(3, 0.5), rel=0.05)
    assert level.mean() == pytest.approx(0.0, abs=0.05)
    assert level.std() == pytest.approx(0.5, rel=0.05)
    for x in (offset[:, 0], level):
        assert abs(np.corrcoef(x, np.log(scale))[0, 1]) < 0.05
    assert state["observations"]["cdr"]["market_share"]["level"] == "covariate"
    bad = FusionModel(
        latent=gravity(), priors={"market_share_country": {"dist": "StudentT", "nu": 3}}
    )
    with pytest.raises(ModelConfigError, match=r"market_share_country.*must be a Normal"):
        bad.build_model(ds)


def test_prior_overrides_apply_and_unknown_keys_warn(world):
    ds, _ = world
    model = FusionModel(
        latent=gravity(),
        priors={
            "sigma_market_share": {"dist": "HalfNormal", "sigma": 0.1},
            "sigma_country": {"dist": "HalfNormal", "sigma": 0.3},
        },
    )
    pm_model = model.build_model(ds)
    priors = model.resolved_priors(ds)
    assert priors["sigma_market_share"]["sigma"] == 0.1
    assert priors["sigma_country"]["sigma"] == 0.3
    assert "sigma_market_share" in pm_model.named_vars
    with pytest.warns(PriorWarning, match="market_shares"):
        FusionModel(latent=gravity(), priors={"market_shares": {"dist": "Normal"}}).build_model(ds)


def test_period_effect_prior_must_be_zero_sum(world):
    ds, _ = world
    model = FusionModel(latent=gravity(), priors={"period_effect": {"dist": "Normal", "sigma": 1}})
    with pytest.raises(ModelConfigError, match="ZeroSumNormal"):
        model.build_model(ds)


def test_errors_name_the_fix(world):
    ds, _ = world
    with pytest.raises(ModelConfigError, match="needs a latent model"):
        FusionModel()
    with pytest.raises(ModelConfigError, match="constraint='none'"):
        FusionModel(latent=GravityModel(constraint="production"))
    with pytest.raises(ModelConfigError, match="GravityModel or RadiationModel"):
        FusionModel(latent="gravity")
    with pytest.raises(ModelConfigError, match="distinct"):
        FusionModel(latent=gravity(), sources=["cdr", "cdr"])
    with pytest.raises(ModelConfigError, match="reference_source"):
        FusionModel(latent=gravity(), reference_source="survey")
    with pytest.raises(ModelConfigError, match="latent"):
        FusionModel(latent=FusionModel(latent=gravity()))
    with pytest.raises(DataContractError, match=r"flow_<source>.*sources=\['cdr', 'census'\]"):
        FusionModel(latent=gravity(), sources=["census", "survey"]).build_model(ds)
    with pytest.raises(RuntimeError, match=r"call \.fit"):
        _ = FusionModel(latent=gravity()).posterior


def test_config_is_json_and_rebuilds_the_latent():
    model = FusionModel(
        latent=gravity(),
        sources=("census", "cdr"),
        priors={"phi": {"dist": "Gamma", "alpha": 2, "beta": 0.5}},
    )
    cfg = model.model_config
    assert cfg["latent"]["class"] == "GravityModel"
    assert (
        cfg["latent"]["model_config"]["destination_covariates"]
        == GRAVITY["destination_covariates"]
    )
    again = FusionModel(**cfg)
    assert isinstance(again.latent, GravityModel)
    assert again.latent.model_config == model.latent.model_config
    assert again.reference_source == "census"
    assert FusionModel(latent=gravity(), sources=["cdr"]).reference_source == "cdr"


def test_truncated_moments_match_scipy():
    mu, phi, upper = np.array([0.5, 6.0, 40.0]), 3.0, np.array([15.0, 4.0, 15.0])
    mean, var = (v.eval() for v in truncated_nb_moments(mu, phi, upper))
    for k in range(3):
        support = np.arange(int(upper[k]) + 1)
        w = stats.nbinom.pmf(support, phi, phi / (phi + mu[k]))
        w /= w.sum()
        m = (w * support).sum()
        np.testing.assert_allclose(mean[k], m, rtol=1e-6)
        np.testing.assert_allclose(var[k], (w * support**2).sum() - m**2, rtol=1e-6, atol=1e-10)


def test_simulated_totals_sum_the_cells_before_redaction():
    plain, _ = simulate_fusion_dataset(units_per_country=5, seed=3)
    ds, _ = simulate_fusion_dataset(units_per_country=5, seed=3, totals=True)
    xr.testing.assert_identical(ds[list(plain.data_vars)], plain)  # same world, no extra draws
    assert ds["cdr_outflow"].dims == ("unit", "period")
    assert ds["cdr_outflow"].attrs["universe"] == "within"
    # without redaction the totals are the row / column sums of the released cells
    full, _ = simulate_fusion_dataset(units_per_country=5, seed=3, totals=True, redaction=-1)
    flow = full["flow_cdr"].fillna(0).transpose("origin", "destination", "period").values
    cdr = np.isin(full["country"].values, ["C01", "C02", "C03"])
    np.testing.assert_allclose(full["cdr_outflow"].values[cdr], flow.sum(axis=1)[cdr])
    np.testing.assert_allclose(full["cdr_inflow"].values[cdr], flow.sum(axis=0)[cdr])
    assert full["cdr_outflow"].isnull().values[~cdr].all()
    # with redaction: a released total is at least its released cells; a suppressed one has a bound
    out = ds["cdr_outflow"].values
    released = ds["flow_cdr"].fillna(0).sum("destination").transpose("origin", "period").values
    ok = np.isfinite(out)
    assert np.all(out[ok] >= released[ok])
    hidden = cdr[:, None] & ~ok
    assert np.all(np.isfinite(ds["cdr_outflow_max"].values[hidden]))


def test_totals_to_dataset_from_a_cdrflows_table(world):
    ds, _ = world
    table = pd.DataFrame(
        {
            "unit_id": ["U012", "U012", "U013"],
            "period": ["2020Q1", "2020Q2", "2020Q1"],
            "outflow": [120.0, np.nan, 80.0],
            "inflow": [90.0, 100.0, np.nan],
            "outflow_max": [np.nan, 45.0, np.nan],
        }
    )
    out = totals_to_dataset(ds, table)
    assert out["cdr_outflow"].dims == ("unit", "period")
    assert out["cdr_outflow"].attrs["universe"] == "covered"
    assert float(out["cdr_outflow"].sel(unit="U012", period="2020Q1")) == 120.0
    assert float(out["cdr_outflow_max"].sel(unit="U012", period="2020Q2")) == 45.0
    assert "cdr_inflow_max" not in out
    assert int(out["cdr_inflow"].notnull().sum()) == 2
    with pytest.raises(DataContractError, match="X999"):
        totals_to_dataset(ds, table.assign(unit_id=["X999", "U012", "U013"]))
    with pytest.raises(ModelConfigError, match="universe"):
        totals_to_dataset(ds, table, universe="everywhere")


def test_totals_enter_as_potentials_and_inconsistent_totals_raise():
    ds, _ = simulate_fusion_dataset(units_per_country=4, seed=1, totals=True)
    model = FusionModel(latent=gravity())
    pm_model, state, _ = model._build(ds)
    assert "cdr_outflow_total" in set(pm_model.named_vars)
    n_avail = int((ds["cdr_outflow"].notnull() | ds["cdr_outflow_max"].notnull()).sum())
    assert 0 < state["observations"]["cdr"]["n_totals"]["cdr_outflow"] <= n_avail
    assert state["observations"]["cdr"]["totals"] == ["inflow", "outflow"]
    # no redacted cell is summed by two totals kept: a suppressed total (a bound) that shares
    # one with a total of the other kind is left out; released ones keep their full weight
    obs = CDRObservation("cdr")
    cells = obs.total_cells(ds, read_cells(ds, "cdr"))
    plans = {kind: obs._totals_plan(ds, kind, cells[kind]) for kind in ("outflow", "inflow")}
    kept, weight = obs._select_totals(plans)
    assert weight == state["observations"]["cdr"]["totals_weight"] == 1.0
    assert not set(kept["outflow"]["open_ids"].tolist()) & set(kept["inflow"]["open_ids"].tolist())
    assert kept["inflow"]["obs"].size == plans["inflow"]["obs"].size == 1
    assert kept["outflow"]["cen"].size < plans["outflow"]["cen"].size
    point = pm_model.initial_point()
    logp = pm_model.compile_logp(vars=[pm_model["cdr_outflow_total"]])(point)
    assert np.isfinite(logp) and logp < 0
    bad = ds.assign(cdr_outflow=ds["cdr_outflow"] * 0 + 1.0)  # below the released cells
    with pytest.raises(DataContractError, match="does not equal the sum"):
        FusionModel(latent=gravity()).build_model(bad)
    covered = ds.copy()
    covered["cdr_outflow"].attrs["universe"] = "covered"  # cross-border cells are missing: fine
    FusionModel(latent=gravity()).build_model(covered)


def test_totals_of_held_out_cells_keep_their_full_distribution():
    ds, _ = simulate_fusion_dataset(units_per_country=4, seed=1, totals=True)
    hidden = ds.copy()
    cell = (ds["origin"] == "U004") & (ds["destination"] == "U005")
    for name in ("flow_census", "flow_cdr", "flow_cdr_max"):
        hidden[name] = ds[name].where(~cell)
    totals = ["cdr_outflow", "cdr_outflow_max", "cdr_inflow", "cdr_inflow_max"]
    without = FusionModel(latent=gravity())
    _, without.fit_meta, _ = without._build(hidden.drop_vars(totals))
    model = FusionModel(latent=gravity())
    pm_model, model.fit_meta, _ = model._build(hidden)
    # the hidden pair is in no cell likelihood, but the totals still sum over it
    assert model.fit_meta["n_pairs"] == without.fit_meta["n_pairs"] + 1
    assert np.isfinite(pm_model.compile_logp()(pm_model.initial_point()))


def test_totals_likelihood_at_the_truth_is_calibrated(world):
    """The totals term equals a numpy reference and its residuals are ~N(0, 1) at the truth."""
    _, truth = world
    ds, _ = simulate_fusion_dataset(seed=SEED, totals=True)
    obs = CDRObservation("cdr")
    cells = obs.total_cells(ds, read_cells(ds, "cdr"))
    mu = truth["mu"].values
    share = np.nan_to_num(truth["market_share"].reindex(ds["unit"].values).values)
    effect = truth["period_effect"].values
    phi = truth["phi"]
    flow = ds["flow_cdr"].transpose("origin", "destination", "period").values
    bound = ds["flow_cdr_max"].transpose("origin", "destination", "period").values
    support = np.arange(16)
    for axis, kind in ((1, "outflow"), (0, "inflow")):
        c = cells[kind]
        plan = obs._totals_plan(ds, kind, c)
        idx = plan["cells"]
        cell_mu = (
            mu[c.origin_idx[idx], c.dest_idx[idx]]
            * share[c.origin_idx[idx]]
            * effect[c.period_idx[idx]]
        )
        with pm.Model() as pm_model:
            obs._add_totals_likelihood(kind, plan, obs.totals_moments(plan, cell_mu, phi))
        got = pm_model.compile_logp()({})
        expected, z, n_uninformative = 0.0, [], 0
        total, total_max = ds[f"cdr_{kind}"].values, ds[f"cdr_{kind}_max"].values
        for t in range(ds.sizes["period"]):
            m = np.nan_to_num(mu * share[:, None] * effect[t])
            pmf = stats.nbinom.pmf(support, phi, (phi / (phi + m))[..., None])
            w = pmf / pmf.sum(axis=-1, keepdims=True)
            mean_c = (w * support).sum(-1)
            var_c = (w * support**2).sum(-1) - mean_c**2
            redacted = np.isfinite(bound[:, :, t])
            mean = np.where(redacted, mean_c, 0).sum(axis)
            sd = np.sqrt(np.where(redacted, var_c, 0).sum(axis) + 1 / 12)
            released = np.nan_to_num(flow[:, :, t]).sum(axis)
            rest = total[:, t] - released
            ok = np.isfinite(rest) & redacted.any(axis)
            expected += stats.norm.logpdf(rest[ok], mean[ok], sd[ok]).sum()
            z.append((rest[ok] - mean[ok]) / sd[ok])
            cen = ~np.isfinite(total[:, t]) & np.isfinite(total_max[:, t]) & redacted.any(axis)
            # a bound no tighter than the redacted cells' own (released + 15 x redacted, the
            # operator's rule for a suppressed total) says nothing and is left out
            informative = total_max[:, t] - released < 15 * redacted.sum(axis)
            n_uninformative += int((cen & ~informative).sum())
            cen &= informative
            upper = total_max[cen, t] - released[cen] + 0.5
            expected += stats.norm.logcdf(upper, mean[cen], sd[cen]).sum()
        np.testing.assert_allclose(got, expected, rtol=1e-6)
        z = np.concatenate(z)
        if kind == "inflow":
            # the operator's complementary suppression releases an inflow total only when none
            # of its redacted cells is in a row whose outflow total is released: here none is,
            # and every suppressed one carries the uninformative bound
            assert len(z) < 10 and n_uninformative > 20
            assert plan["cen"].size == 0
            continue
        assert len(z) > 40 and abs(z.mean()) < 0.4 and 0.7 < z.std() < 1.4, (
            kind,
            z.mean(),
            z.std(),
        )


# ----------------------------------------------------------------------------- slow
def _held_out_split(ds: xr.Dataset, seed: int) -> tuple[xr.Dataset, np.ndarray]:
    """Hide ~15% of the pairs any source observes, from every source (flows and bounds)."""
    seen = (
        ds["flow_census"].notnull()
        | ds["flow_cdr"].notnull().any("period")
        | ds["flow_cdr_max"].notnull().any("period")
    ).values
    rng = np.random.default_rng(seed + 100)
    held = seen & (rng.random(seen.shape) < HELD_OUT_SHARE)
    mask = xr.DataArray(
        held,
        dims=("origin", "destination"),
        coords={"origin": ds["origin"], "destination": ds["destination"]},
    )
    train = ds.copy()
    for name in ("flow_census", "flow_cdr", "flow_cdr_max"):
        train[name] = ds[name].where(~mask)
    return train, held


def _fit(data: xr.Dataset, sources: list[str]) -> tuple[FusionModel, xr.Dataset]:
    model = FusionModel(latent=gravity(), sources=sources, priors=PRIORS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data, random_seed=SEED, **NUTS)
    return model, model.predict(data, seed=SEED)


@pytest.fixture(scope="module")
def split(world):
    ds, _ = world
    return _held_out_split(ds, SEED)


@pytest.fixture(scope="module")
def fused(split):
    train, _ = split
    return _fit(train, ["census", "cdr"])


def _draws(posterior: xr.Dataset, name: str) -> np.ndarray:
    var = posterior[name]
    return var.stack(sample=("chain", "draw")).transpose(..., "sample").values


@pytest.mark.slow
def test_a_global_parameters_and_market_shares_are_recovered(world, fused):
    _, truth = world
    model, _ = fused
    post = model.posterior
    rows = []  # (name, mean, sd, truth, inside the 0.94 interval)
    candidates = {
        "intercept_raw": [truth["intercept"]],
        "beta_raw": [truth["beta"][t] for t in post["term"].values],
        "sigma_country": [truth["sigma_country"]],
        "phi": [truth["phi"]] * len(model.sources),
    }
    for name, true in candidates.items():
        draws = _draws(post, name).reshape(len(true), -1)
        for value, d in zip(true, draws, strict=True):
            lo, hi = np.quantile(d, [0.03, 0.97])
            rows.append((name, d.mean(), d.std(ddof=1), value, lo <= value <= hi))
    report = "\n".join(
        f"{n}: mean {m:.3f} sd {s:.3f} truth {t:.3f} in94 {i}" for n, m, s, t, i in rows
    )
    print(report)
    for _name, mean, sd, value, _ in rows:
        assert abs(mean - value) < 3 * sd, report
    assert sum(i for *_, i in rows) >= len(rows) - 1, report
    shares = model.market_share_summary(ci_prob=0.94)
    true_share = truth["market_share"].reindex(shares.index)
    inside = (true_share >= shares["eti_lo"]) & (true_share <= shares["eti_hi"])
    print(f"market share: {inside.mean():.3f} of {len(inside)} units inside their 0.94 intervals")
    assert inside.mean() >= 0.85, shares.assign(truth=true_share)


@pytest.mark.slow
@pytest.mark.parametrize("code", ["C02", "C03"])
def test_b_fused_beats_rescaled_raw_cdr_in_cdr_only_country(world, fused, code):
    ds, truth = world
    _, pred = fused
    inside = ds["country"].values == code
    pairs = np.outer(inside, inside) & ~np.eye(ds.sizes["unit"], dtype=bool)
    # the analyst's national market share: subscribers per resident, population-weighted
    national = np.average(
        ds["cdr_subscribers_per_resident"].values[inside], weights=ds["population"].values[inside]
    )
    cdr = (
        ds["flow_cdr"].transpose("origin", "destination", "period").values[pairs]
    )  # (pair, period)
    bound = ds["flow_cdr_max"].transpose("origin", "destination", "period").values[pairs]
    raw = {  # mean over periods of the released counts, rescaled to the population
        "redacted as 0": np.where(np.isnan(cdr), 0.0, cdr).mean(axis=1) / national,
        "redacted as 7.5": np.where(np.isnan(cdr), bound / 2, cdr).mean(axis=1) / national,
    }
    true = truth["mu"].values[pairs]
    fused_cpc = cpc(true, pred["mean"].values[pairs])
    fused_lr = log_rmse(true, pred["mean"].values[pairs])
    for label, baseline in raw.items():
        base_cpc = cpc(true, baseline)
        base_lr = log_rmse(true, baseline)
        msg = f"{code} {label}: fused CPC {fused_cpc:.3f} logRMSE {fused_lr:.3f} vs raw CPC {base_cpc:.3f} logRMSE {base_lr:.3f}"
        print(msg)
        assert fused_cpc >= base_cpc + 0.02, msg
        assert fused_lr < base_lr, msg


@pytest.mark.slow
def test_c_intervals_cover_no_data_countries_and_cross_border_pairs(world, fused):
    ds, truth = world
    _, pred = fused
    n = ds.sizes["unit"]
    off = ~np.eye(n, dtype=bool)
    no_data = np.isin(ds["country"].values, truth["no_data_countries"])
    groups = {  # flows within the no-data countries; every pair crossing a border
        "within no-data countries": np.outer(no_data, no_data) & off,
        "cross-border": ds["cross_border"].values & off,
    }
    flows = truth["flows"].values
    # diagnostic only: out of the no-data countries (mostly small cross-border flows, where
    # closed intervals on discrete counts over-cover: [0, k] holds any 0)
    sel = no_data[:, None] & off
    coverage = interval_coverage(flows[sel], pred["q05"].values[sel], pred["q95"].values[sel])
    print(f"origin in a no-data country (not asserted): 90% coverage {coverage:.3f}")
    for label, sel in groups.items():
        coverage = interval_coverage(flows[sel], pred["q05"].values[sel], pred["q95"].values[sel])
        width = interval_width(pred["q05"].values[sel], pred["q95"].values[sel])
        print(
            f"{label}: 90% coverage {coverage:.3f}, mean width {width:.1f} persons, n={sel.sum()}"
        )
        assert 0.85 <= coverage <= 0.99, f"{label}: coverage {coverage:.3f}, width {width:.1f}"


@pytest.fixture(scope="module")
def single_source_fits(split):
    train, _ = split
    return {"census only": _fit(train, ["census"]), "CDR only": _fit(train, ["cdr"])}


def _print_cdr_country_levels(world, fits) -> None:
    """Per CDR country: CPC, level (mean error of log(1 + flow)) and 90% coverage of each fit."""
    ds, truth = world
    country = ds["country"].values.astype(str)
    off = ~np.eye(ds.sizes["unit"], dtype=bool)
    mu, flows = truth["mu"].values, truth["flows"].values
    for label, (model, pred) in fits.items():
        parts = []
        for code in truth["cdr_countries"]:
            sel = np.outer(country == code, country == code) & off
            mean = pred["mean"].values[sel]
            level = float((np.log1p(mean) - np.log1p(mu[sel])).mean())
            cover = interval_coverage(flows[sel], pred["q05"].values[sel], pred["q95"].values[sel])
            share = model.market_share_summary()["mean"].reindex(
                ds["unit"].values[country == code]
            )
            parts.append(
                f"{code} CPC {cpc(mu[sel], mean):.3f} level {level:+.2f} coverage {cover:.2f} "
                f"share {share.mean():.3f} (truth {truth['market_share'].reindex(share.index).mean():.3f})"
            )
        print(f"{label}: " + "; ".join(parts))


@pytest.mark.slow
def test_d_fused_beats_census_only_and_is_no_worse_than_cdr_only_on_held_out_pairs(
    world, split, fused, single_source_fits
):
    _, truth = world
    _, held = split
    true = truth["mu"].values[held]
    scores = {"fused": cpc(true, fused[1]["mean"].values[held])}
    for label, (_, pred) in single_source_fits.items():
        scores[label] = cpc(true, pred["mean"].values[held])
    print("held-out CPC:", {k: round(v, 3) for k, v in scores.items()}, f"({held.sum()} pairs)")
    _print_cdr_country_levels(world, {"fused": fused, "CDR only": single_source_fits["CDR only"]})
    assert scores["fused"] >= scores["census only"] + 0.02, scores
    # The CDR-only fit has no census and no cross-border cell: it predicts the census-only
    # country and the border from the hierarchy and the cross_border prior (which keeps its
    # prior instead of being dropped). Against it the census is the fusion's extra
    # information only on the held-out pairs the CDR does not see; there fusion had led by
    # >= 0.02 CPC, but on another Monte-Carlo draw of the same posteriors (a new machine's
    # compile cache) by 0.003 (0.950 vs 0.947), and overall it trailed by 0.0006. So the
    # lead is not asserted, only that fusion is not worse there (docs/fusion.md: on seed 1
    # fusion leads by 0.15 on those pairs but trails by 0.056 overall).
    ds, _ = world
    country = ds["country"].values.astype(str)
    in_cdr = np.isin(country, ["C01", "C02", "C03"])
    seen_by_cdr = (country[:, None] == country[None, :]) & in_cdr[:, None]
    unseen = ~seen_by_cdr[held]
    fused_u = cpc(true[unseen], fused[1]["mean"].values[held][unseen])
    cdr_u = cpc(true[unseen], single_source_fits["CDR only"][1]["mean"].values[held][unseen])
    print(
        f"held-out pairs the CDR does not see ({unseen.sum()}): fused {fused_u:.3f}, CDR only {cdr_u:.3f}"
    )
    assert fused_u >= cdr_u - 0.01, (fused_u, cdr_u)
    assert scores["fused"] >= scores["CDR only"] - 0.01, scores


@pytest.mark.slow
def test_e_redacted_as_zero_is_worse_than_censored(world, split, fused):
    """Reading redacted cells as zeros distorts the flows' pattern and biases the shares.

    Scored within each CDR-only country, where the CDR is the only flow information.
    The error of log(1 + flow) splits into the country's level (its mean) and the
    pattern around it (the rest). This world measures no level of a CDR-only country
    (its census sees only flows out of the census countries): the CDR pins the product
    of market share and level, so the level error swings between Monte-Carlo draws of
    the same posterior (a cold compile cache alone moved C02's from +0.20 to +0.24,
    and the pooled log-RMSE's sign with it) and is printed, not asserted. The pattern
    is what the redacted cells inform: read as zeros, the small flows are pulled down
    against the large ones (x1.6 to x3.6 the censored fit's pattern error on seeds 0-2,
    docs/fusion.md), and the zeros go into the market shares (MAE x3 on seed 0).
    """
    ds, truth = world
    train, _ = split
    wrong = train.assign(flow_cdr=train["flow_cdr"].where(train["flow_cdr_max"].isnull(), 0.0))
    wrong = wrong.drop_vars("flow_cdr_max")
    zero_model, zero_pred = _fit(wrong, ["census", "cdr"])
    model, pred = fused
    country = ds["country"].values
    cdr_only = sorted(set(truth["cdr_countries"]) - set(truth["census_countries"]))
    observed = (ds["flow_cdr"].notnull() | ds["flow_cdr_max"].notnull()).any("period").values
    lines, pattern = [], {}
    for code in cdr_only:
        sel = observed & (country == code)[:, None]
        true = truth["mu"].values[sel]
        for label, p in (("censored", pred), ("zeros", zero_pred)):
            resid = np.log1p(p["mean"].values[sel]) - np.log1p(true)
            pattern[code, label] = float(resid.std())
            lines.append(
                f"{code} {label}: log-RMSE {log_rmse(true, p['mean'].values[sel]):.4f} = level "
                f"{resid.mean():+.4f} and pattern {resid.std():.4f}"
            )
    share_true = truth["market_share"]
    err_censored = np.abs(model.market_share_summary()["mean"] - share_true).mean()
    err_zero = np.abs(zero_model.market_share_summary()["mean"] - share_true).mean()
    msg = "; ".join(lines)
    msg += f"; market-share MAE censored {err_censored:.4f} zeros {err_zero:.4f}"
    print(msg)
    for code in cdr_only:
        assert pattern[code, "zeros"] >= 1.3 * pattern[code, "censored"], msg
    assert err_zero >= 2 * err_censored, msg


@pytest.mark.slow
def test_predictions_stream_and_survive_save_load(world, fused, tmp_path):
    ds, _ = world
    model, pred = fused
    assert set(pred.data_vars) == {"mean", "q05", "q25", "q50", "q75", "q95"}
    assert np.isnan(np.diag(pred["mean"].values)).all()
    off = ~np.eye(ds.sizes["unit"], dtype=bool)
    assert np.all(pred["q05"].values[off] <= pred["q95"].values[off])
    # the population-scale dispersion is the census's
    np.testing.assert_allclose(
        model._prediction_params(model.posterior, ds, rng=np.random.default_rng(0))["phi"],
        _draws(model.posterior, "phi")[0],
    )
    path = model.save(tmp_path / "fusion.nc")
    loaded = FusionModel.load(path)
    assert isinstance(loaded.latent, GravityModel)
    again = loaded.predict(ds, seed=SEED)
    np.testing.assert_allclose(again["mean"].values, pred["mean"].values, rtol=1e-10)
    blocked = model.predict(ds, seed=SEED, block_size=7, use_dask=True).compute()
    np.testing.assert_allclose(blocked["mean"].values, pred["mean"].values, rtol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["laplace", "advi"])
def test_approximate_backends_fit_and_predict(backend):
    ds, _ = simulate_fusion_dataset(units_per_country=4, seed=2)
    model = FusionModel(latent=small_world_gravity())
    kwargs = (
        {"draws": 50, "chains": 2}
        if backend == "laplace"
        else {"n": 500, "draws": 50, "chains": 1}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = model.fit(ds, backend=backend, random_seed=1, **kwargs)
    post = idata["posterior"]
    assert post["market_share"].dims[-1] == "market_unit"
    assert np.all((post["market_share"] > 0) & (post["market_share"] < 1))
    assert post["phi"].sizes["source"] == 2
    pred = model.predict(ds, seed=1)
    off = ~np.eye(ds.sizes["unit"], dtype=bool)
    assert np.all(np.isfinite(pred["q95"].values[off]))
    assert model.fit_meta["backend"] == backend


@pytest.mark.slow
def test_laplace_that_runs_off_to_a_boundary_fails_with_a_named_error():
    """Centred country levels on a world of 4 units a country: the joint mode runs off to a
    degenerate boundary of sigma_country; the fit must stop with a named error (not warn and
    hand NaN or absurd flows to prediction). With noncentered="auto" Laplace takes the
    non-centred form, whose mode is proper."""
    ds, _ = simulate_fusion_dataset(units_per_country=4, seed=2)
    model = FusionModel(latent=gravity())  # noncentered=False: the centred form, forced
    with pytest.raises(FitFailedError, match=r"Laplace: .*sigma_country.*boundary.*Fix"):
        model.fit(ds, backend="laplace", random_seed=1, draws=50, chains=2)
    auto = FusionModel(latent=GravityModel(**{**GRAVITY, "noncentered": "auto"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto.fit(ds, backend="laplace", random_seed=1, draws=50, chains=2)
    assert auto.fit_meta["latent"]["noncentered"] is True
    assert np.isfinite(auto.predict(ds, kind="mean")["mean"].values[~np.eye(24, dtype=bool)]).all()


# ----------------------------------------------------------------------------- in/out totals
TOTALS = ("cdr_outflow", "cdr_outflow_max", "cdr_inflow", "cdr_inflow_max")


@pytest.fixture(scope="module")
def fused_totals(split):
    """The fused fit of the same training data plus the operator's in/out totals (all units)."""
    train, _ = split
    ds, _ = simulate_fusion_dataset(seed=SEED, totals=True)
    return _fit(train.assign({v: ds[v] for v in TOTALS}), ["census", "cdr"])


def _totals_scores(ds, truth, model, pred) -> dict[str, float]:
    shares = model.market_share_summary(ci_prob=0.94)
    true_share = truth["market_share"].reindex(shares.index)
    inside = (true_share >= shares["eti_lo"]) & (true_share <= shares["eti_hi"])
    post = model.posterior
    units = post["market_unit"].values.astype(str)
    unit_country = ds["country"].to_series().reindex(units).values.astype(str)
    effect = post["country_effect"].sel(country=unit_country)  # (chain, draw, market_unit)
    log_level = (  # what every CDR expectation of a unit scales with: s_i x e^(level_c) x kappa
        np.log(post["market_share"])
        + post["intercept"]
        + effect.drop_vars("country").rename(country="market_unit")
        + np.log(post["period_scale"])
    )
    out = {
        "share_in94": float(inside.mean()),
        "share_mae": float(np.abs(shares["mean"] - true_share).mean()),
        "share_width": float((shares["eti_hi"] - shares["eti_lo"]).mean()),
        "cdr_level_sd": float(log_level.std(("chain", "draw")).mean()),
    }
    off = ~np.eye(ds.sizes["unit"], dtype=bool)
    for code in ("C01", "C02", "C03"):
        inside_c = ds["country"].values == code
        pairs = np.outer(inside_c, inside_c) & off
        true = truth["mu"].values[pairs]
        out[f"{code}_cpc"] = cpc(true, pred["mean"].values[pairs])
        out[f"{code}_logrmse"] = log_rmse(true, pred["mean"].values[pairs])
    return out


@pytest.mark.slow
def test_f_in_out_totals_sharpen_the_cdr_level(world, fused, fused_totals):
    """Totals pin down market share x country level x period scale (not its split).

    Asserted: the posterior sd of that product (per CDR unit, log scale) shrinks, and
    the overlap country's flows lose at most 0.03 CPC. That loss is a measured shortfall,
    not noise: on this world the totals cost `C01` 0.006-0.024 CPC and `C03` 0.03-0.045
    over four runs (docs/fusion.md). Market-share coverage and error are reported, not
    asserted: they move both ways between worlds.
    """
    ds, truth = world
    base = _totals_scores(ds, truth, *fused)
    with_totals = _totals_scores(ds, truth, *fused_totals)
    report = "\n".join(
        f"{k}: without {base[k]:.3f}  with totals {with_totals[k]:.3f}" for k in base
    )
    for label, (model, _) in (("without", fused), ("with totals", fused_totals)):
        for name in ("period_scale", "market_share_country", "country_effect"):
            d = _draws(model.posterior, name)
            report += (
                f"\n{name} ({label}): {np.round(d.mean(axis=-1), 3)} "
                f"sd {np.round(d.std(axis=-1), 3)}"
            )
    report += f"\ntruth country_effect {np.round(list(truth['country_effect'].values()), 3)}"
    print(report)
    assert fused_totals[0].fit_meta["observations"]["cdr"]["n_totals"]["cdr_outflow"] > 0
    assert with_totals["cdr_level_sd"] < base["cdr_level_sd"], report
    assert with_totals["C01_cpc"] >= base["C01_cpc"] - 0.03, report


# ----------------------------------------------------------------------------- LOO
def _small_fit(latent):
    """Laplace fit (2 x 40 draws) of a 24-unit fusion world: enough draws for PSIS-LOO."""
    ds, _ = simulate_fusion_dataset(units_per_country=4, seed=2)
    model = FusionModel(latent=latent)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=40, chains=2)
    return ds, model


@pytest.fixture(scope="module")
def small_gravity_fit():
    return _small_fit(small_world_gravity())


@pytest.mark.slow
def test_pointwise_log_likelihood_matches_the_cells(small_gravity_fit):
    ds, model = small_gravity_fit
    tree = model.log_likelihood(ds)
    ll = tree["log_likelihood"].to_dataset()["flow"]
    n_cells = sum(model.fit_meta["n_cells"].values())
    assert ll.dims == ("chain", "draw", "cell") and ll.sizes["cell"] == n_cells
    assert ll.dtype == np.float32
    assert {"source", "origin", "destination"} <= set(ll.coords)
    assert np.isfinite(ll.values).all()
    obs = tree["observed_data"].to_dataset()
    # censored cells: log P(y <= 15) < 0, at most 0; the CDR block follows the census block
    cens = obs["flow"].isnull().values
    assert cens.sum() == sum(model.fit_meta["n_censored"].values())
    assert np.all(ll.values[..., cens] <= 0)
    assert list(np.unique(obs["source"].values)) == ["cdr", "census"]
    # check one CDR cell by hand: mu = latent rate x market share x period effect
    post = model.posterior
    pairs = read_cells(ds, "cdr")
    k = int(np.flatnonzero(pairs.observed)[0])
    rate = model._log_rate_draws(post, ds, pairs.origin_idx[[k]], pairs.dest_idx[[k]])[:, 0]
    unit = str(ds["unit"].values[pairs.origin_idx[k]])
    share = _draws(post, "market_share")[list(post["market_unit"].values).index(unit)]
    effect = _draws(post, "period_effect")[pairs.period_idx[k]]
    phi = _draws(post, "phi")[1]
    mu = np.exp(rate) * share * effect
    expected = stats.nbinom.logpmf(pairs.y[k], phi, phi / (phi + mu))
    n_census = model.fit_meta["n_cells"]["census"]
    np.testing.assert_allclose(
        ll.values.reshape(-1, n_cells)[:, n_census + k], expected, rtol=1e-5
    )
    # fit() stored it too (for compare without data)
    assert "log_likelihood" in model.idata.children


@pytest.mark.slow
def test_compare_fusion_with_gravity_and_radiation_latents(small_gravity_fit):
    ds, grav = small_gravity_fit
    _, rad = _small_fit(RadiationModel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = compare({"gravity": grav, "radiation": rad}, ds)
        stored = compare({"gravity": grav, "radiation": rad})
    print(table)
    assert set(table.index) == {"gravity", "radiation"}
    assert np.isfinite(table["elpd"]).all()
    assert list(stored.index) == list(table.index)


# ----------------------------------------------------------------------------- marginals
def _country_pair_table(ds, mu, countries=None, noise=0.0, seed=0):
    """Country-pair sums of the true expected flows, optionally with log-normal noise."""
    country = ds["country"].values.astype(str)
    codes = sorted(set(country)) if countries is None else countries
    rng = np.random.default_rng(seed)
    rows = []
    for a in codes:
        for b in codes:
            sel = np.outer(country == a, country == b) & ~np.eye(len(country), dtype=bool)
            rows.append((a, b, float(np.nansum(mu[sel])) * np.exp(rng.normal(0.0, noise))))
    return pd.DataFrame(rows, columns=["origin_country", "destination_country", "value"])


def test_marginals_enter_as_a_lognormal_on_country_pair_sums():
    ds, truth = simulate_fusion_dataset(units_per_country=4, seed=0)
    table = _country_pair_table(ds, truth["mu"].values, countries=["C04", "C05"])
    data = marginals_to_dataset(ds, table, name="desa", rel_sd=0.2)
    assert data["estimate_desa"].dims == ("cell_desa",)
    assert data["estimate_desa"].attrs["origin_level"] == "country"
    assert int(data["estimate_desa"].notnull().sum()) == 4
    without = FusionModel(latent=small_world_gravity())
    _, without.fit_meta, _ = without._build(ds)
    model = FusionModel(latent=small_world_gravity())
    pm_model, model.fit_meta, _ = model._build(data)
    assert model.fit_meta["kinds"]["desa"] == "estimates"
    assert model.fit_meta["n_cells"]["desa"] == 4
    # the no-data countries' 8 units: every pair among them now enters the latent field
    assert model.fit_meta["n_pairs"] == without.fit_meta["n_pairs"] + 8 * 7
    assert list(pm_model.coords["cell_desa"]) == [
        "C04>C04",
        "C04>C05",
        "C05>C04",
        "C05>C05",
    ]
    point = pm_model.initial_point()
    expected, logp = pm_model.compile_fn(
        [pm_model["desa_expected"], pm_model["y_desa"]],
        inputs=pm_model.value_vars,
        on_unused_input="ignore",
    )(point)
    observed = table.set_index(["origin_country", "destination_country"])["value"]
    labels = [tuple(k.split(">")) for k in pm_model.coords["cell_desa"]]
    reference = stats.norm.logpdf(np.log(observed[labels].values), np.log(expected), 0.2).sum()
    np.testing.assert_allclose(logp, reference, rtol=1e-9)
    assert np.all(expected > 0)


def test_marginals_to_dataset_errors_name_the_fix(world):
    ds, _ = world
    table = pd.DataFrame(
        {"origin_country": ["C00"], "destination_country": ["X99"], "value": [5.0]}
    )
    with pytest.raises(DataContractError, match="X99"):
        marginals_to_dataset(ds, table)
    with pytest.raises(DataContractError, match="> 0"):
        marginals_to_dataset(ds, table.assign(destination_country="C01", value=0.0))
    with pytest.raises(DataContractError, match="value"):
        marginals_to_dataset(ds, table.drop(columns="value"))
    with pytest.raises(ModelConfigError, match="rel_sd"):
        marginals_to_dataset(ds, table.assign(destination_country="C01"), rel_sd=0)
    bad = ds.assign(estimate_x=xr.DataArray(np.ones(3), dims="other"))
    with pytest.raises(DataContractError, match="estimate_x"):
        FusionModel(latent=gravity()).build_model(bad)


@pytest.mark.slow
def test_g_marginals_give_the_no_data_countries_their_level(world, split, fused):
    """Country-pair totals (±10%) of every country pair pin the no-data countries' level."""
    ds, truth = world
    train, _ = split
    table = _country_pair_table(ds, truth["mu"].values, noise=0.1, seed=SEED)
    _, pred = _fit(marginals_to_dataset(train, table, name="desa", rel_sd=0.1), ["census", "cdr"])
    n = ds.sizes["unit"]
    no_data = np.isin(ds["country"].values, truth["no_data_countries"])
    groups = {
        "within no-data countries": np.outer(no_data, no_data) & ~np.eye(n, dtype=bool),
        "cross-border": ds["cross_border"].values & ~np.eye(n, dtype=bool),
    }
    flows, mu = truth["flows"].values, truth["mu"].values
    lines = []
    for label, sel in groups.items():
        for tag, p in (("without", fused[1]), ("with marginals", pred)):
            c = cpc(mu[sel], p["mean"].values[sel])
            cov = interval_coverage(flows[sel], p["q05"].values[sel], p["q95"].values[sel])
            w = interval_width(p["q05"].values[sel], p["q95"].values[sel])
            lines.append(f"{label} {tag}: CPC {c:.3f} coverage {cov:.3f} width {w:.1f}")
    print("\n".join(lines))
    sel = groups["within no-data countries"]
    base_cpc = cpc(mu[sel], fused[1]["mean"].values[sel])
    new_cpc = cpc(mu[sel], pred["mean"].values[sel])
    base_w = interval_width(fused[1]["q05"].values[sel], fused[1]["q95"].values[sel])
    new_w = interval_width(pred["q05"].values[sel], pred["q95"].values[sel])
    new_cov = interval_coverage(flows[sel], pred["q05"].values[sel], pred["q95"].values[sel])
    assert new_cpc >= base_cpc, lines
    assert new_w < base_w, lines
    assert new_cov >= 0.85, lines


def test_chunked_loo_takes_cells_whose_loglik_never_varies():
    """A redacted cell far below its bound has log P(y <= 15) = 0 in every draw: no PSIS tail."""
    import arviz as az

    from flowmodel.models.base import pointwise_loo

    rng = np.random.default_rng(0)
    ll = rng.normal(-2.0, 0.3, (2, 200, 6))
    ll[:, :, 1] = 0.0
    ll[:, :, 3] = -1.5
    # float32 ties: the smallest log p (the largest importance ratios) equal in 300 of
    # 400 draws, larger in the rest; PSIS's tail is then all one value
    ll[:, :, 5] = np.where(rng.random((2, 200)) < 0.75, -1.0, rng.uniform(-0.9, -0.1, (2, 200)))
    tied = xr.DataTree.from_dict(
        {
            "posterior": xr.Dataset({"a": (("chain", "draw"), rng.normal(size=(2, 200)))}),
            "log_likelihood": xr.Dataset({"flow": (("chain", "draw", "cell"), ll[:, :, 5:])}),
        }
    )
    with pytest.raises(ValueError, match="All tail values are the same"):
        az.loo(tied, pointwise=True, var_name="flow")
    tree = xr.DataTree.from_dict(
        {
            "posterior": xr.Dataset({"a": (("chain", "draw"), rng.normal(size=(2, 200)))}),
            "log_likelihood": xr.Dataset({"flow": (("chain", "draw", "cell"), ll)}),
        }
    )
    out = pointwise_loo(tree, chunk=2)
    np.testing.assert_allclose(out["elpd_i"].values[[1, 3]], [0.0, -1.5])
    np.testing.assert_array_equal(out["pareto_k"].values[[1, 3, 5]], [0.0, 0.0, 0.0])
    # the tied cell: the importance-sampling estimate, log S - logsumexp(-log p)
    flat = ll[:, :, 5].ravel()
    expected = np.log(flat.size) - np.log(np.exp(-flat).sum())
    np.testing.assert_allclose(out["elpd_i"].values[5], expected, rtol=1e-6)
    varying = tree.copy()
    varying["log_likelihood"] = xr.DataTree(
        xr.Dataset({"flow": (("chain", "draw", "cell"), ll[:, :, [0, 2, 4]])})
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = az.loo(varying, pointwise=True, var_name="flow")
    np.testing.assert_allclose(
        out["elpd_i"].values[[0, 2, 4]], np.asarray(ref.elpd_i).ravel(), rtol=1e-5
    )


def test_cdr_pointwise_loglik_in_blocks_equals_one_block(world, monkeypatch):
    """The CDR source's pointwise log-likelihood is computed in blocks of cells (memory)."""
    import flowmodel.models.observations as observations

    ds, _ = world
    model = FusionModel(latent=gravity())
    pm_model, model.fit_meta, _ = model._build(ds)
    names = [v.name for v in pm_model.free_RVs + pm_model.deterministics]
    with pm_model:
        prior = pm.sample_prior_predictive(draws=30, var_names=names, random_seed=1)
    model.idata = xr.DataTree.from_dict({"posterior": prior["prior"].to_dataset()})
    n_cdr = read_cells(ds, "cdr").n
    monkeypatch.setattr(observations, "POINTWISE_BLOCK", 10**6)
    whole = model.log_likelihood(ds)["log_likelihood"]["flow"].values
    monkeypatch.setattr(observations, "POINTWISE_BLOCK", 97)
    assert n_cdr > 3 * 97
    blocks = model.log_likelihood(ds)["log_likelihood"]["flow"].values
    np.testing.assert_array_equal(blocks, whole)
    assert np.isfinite(whole).all()


@pytest.mark.slow
def test_a_released_total_moves_its_redacted_cells_and_nothing_else():
    """Issue 15: a total changes the posterior of the redacted flows it sums, and only those.

    Unit U008's outflow in the first period is three redacted cells (each 0..15) and a
    released total of 26. Fitted (MAP) without totals, with that total as released, and with
    totals that leave 3 or 42 for the redacted cells: their expected count follows the
    remainder (and U008's cells of the other period with them: one share, one latent row),
    while the redacted cells of every other origin move by a few percent at most.
    """
    ds, _ = simulate_fusion_dataset(units_per_country=4, seed=1, totals=True)
    names = ["cdr_outflow", "cdr_outflow_max", "cdr_inflow", "cdr_inflow_max"]
    unit, period = ds["unit"].values[8], ds["period"].values[0]
    flow = ds["flow_cdr"].sel(origin=unit, period=period)
    redacted = ds["flow_cdr_max"].sel(origin=unit, period=period).notnull()
    assert int(redacted.sum()) == 3 and float(flow.sum()) == 0.0
    assert float(ds["cdr_outflow"].sel(unit=unit, period=period)) == 26.0

    def only_total(remainder: float) -> xr.Dataset:
        out = ds.copy(deep=True)
        for name in names:
            out[name][:] = np.nan
        out["cdr_outflow"].loc[{"unit": unit, "period": period}] = remainder
        return out

    sums, others = {}, {}
    for label, data in (
        ("none", ds.drop_vars(names)),
        ("3", only_total(3.0)),
        ("26", only_total(26.0)),
        ("42", only_total(42.0)),
    ):
        model = FusionModel(latent=small_world_gravity(), priors=PRIORS)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(data, backend="map", random_seed=0)
        cells = model.predict_cells(data, "cdr", kind="mean")
        censored = np.isnan(cells["observed"].values)
        row = (cells["origin"].values == unit) & (cells["period"].values == period)
        sums[label] = float(cells["mean"].values[row & censored].sum())
        others[label] = cells["mean"].values[(cells["origin"].values != unit) & censored]
        print(f"total leaving {label}: U008's redacted cells expect {sums[label]:.1f}")
    assert sums["3"] < 8 < sums["none"] < sums["26"] < sums["42"]
    assert abs(sums["26"] - 26) < 5 and abs(sums["42"] - 42) < 5
    for label in ("3", "26", "42"):
        change = np.abs(others[label] / others["none"] - 1)
        assert np.median(change) < 0.02 and change.max() < 0.1, (label, change.max())
