"""GravityModel: known answers (spint's Austria), recovery, constraints, bad configs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr

from flowmodel.exceptions import BackendNotAvailableError, ModelConfigError, PriorWarning
from flowmodel.models import GravityModel
from flowmodel.models.observations import read_cells
from tests.models.conftest import DEST_COVS, FLAT

# spint tests/test_gravity.py (Poisson GLM, cost_func="exp"); see the data README
SPINT_GRAVITY = {
    "intercept_raw": -7.95447436,
    "beta_raw[origin:log_o_var]": 0.863867812,
    "beta_raw[destination:log_d_var]": 0.880474585,
    "beta_raw[distance]": -0.00620544765,
}
SPINT_DOUBLY_DISTANCE = -0.00791533
SPINT_PRODUCTION_DISTANCE = -0.00727113
SPINT_ATTRACTION_DISTANCE = -0.00693755


def _fit(model, ds, backend="laplace", **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend=backend, random_seed=1, draws=250, chains=2, **kw)
    return model


def _austria(constraint="none"):
    priors = dict(FLAT)
    if constraint == "doubly":
        priors = {
            "beta": FLAT["beta"],
            "destination_effect": {"dist": "Normal", "mu": 0, "sigma": 100},
        }
    elif constraint != "none":
        priors = {"beta": FLAT["beta"]}
    return GravityModel(
        origin_covariates=["log_o_var"],
        destination_covariates=["log_d_var"],
        cost_func="exp",
        likelihood="poisson",
        constraint=constraint,
        priors=priors,
    )


@pytest.fixture(scope="module")
def austria_fits(austria):
    return {c: _fit(_austria(c), austria) for c in ("none", "production", "attraction", "doubly")}


def test_austria_unconstrained_matches_spint_within_1pct(austria_fits):
    summary = austria_fits["none"].summary()
    for name, published in SPINT_GRAVITY.items():
        assert summary.loc[name, "mean"] == pytest.approx(published, rel=0.01), name


@pytest.mark.parametrize(
    ("constraint", "published"),
    [
        ("doubly", SPINT_DOUBLY_DISTANCE),
        ("production", SPINT_PRODUCTION_DISTANCE),
        ("attraction", SPINT_ATTRACTION_DISTANCE),
    ],
)
def test_austria_constrained_distance_matches_spint_within_1pct(
    austria_fits, constraint, published
):
    mean = austria_fits[constraint].summary().loc["beta_raw[distance]", "mean"]
    assert mean == pytest.approx(published, rel=0.01)


def test_production_constraint_reproduces_outflows(austria_fits, austria):
    pred = austria_fits["production"].predict(austria, kind="mean")
    observed = austria["flow_census"].sum("destination")
    np.testing.assert_allclose(pred["mean"].sum("destination"), observed, rtol=1e-8)
    # predictive draws keep the margins too (multinomial given O_i)
    draws = austria_fits["production"].predict_posterior(austria, kind="predictive", draws=5)
    np.testing.assert_allclose(
        draws.sum("destination"), observed.broadcast_like(draws.sum("destination"))
    )


def test_attraction_constraint_reproduces_inflows(austria_fits, austria):
    pred = austria_fits["attraction"].predict(austria, kind="mean")
    np.testing.assert_allclose(
        pred["mean"].sum("origin"), austria["flow_census"].sum("origin"), rtol=1e-8
    )


def test_doubly_constraint_reproduces_both_margins(austria_fits, austria):
    pred = austria_fits["doubly"].predict(austria, kind="mean")
    y = austria["flow_census"]
    np.testing.assert_allclose(pred["mean"].sum("destination"), y.sum("destination"), rtol=1e-8)
    # inflows: the Poisson score equations hold at the mode, so the posterior mean is close
    np.testing.assert_allclose(pred["mean"].sum("origin"), y.sum("origin"), rtol=0.01)


def test_recovery_of_simulated_coefficients(gravity_laplace, sim_small):
    _, truth = sim_small
    summary = gravity_laplace.summary(ci_prob=0.94)
    inside, total = 0, 0
    for term, value in truth["beta"].items():
        row = summary.loc[f"beta_raw[{term}]"]
        assert abs(row["mean"] - value) < 3 * row["sd"], term
        inside += row["eti_lo"] <= value <= row["eti_hi"]
        total += 1
    assert inside >= total - 1
    assert abs(summary.loc["phi", "mean"] - truth["phi"]) < 3 * summary.loc["phi", "sd"]


def test_node_names_and_dims(gravity_laplace):
    post = gravity_laplace.posterior
    assert {
        "intercept",
        "beta",
        "country_effect",
        "sigma_country",
        "phi",
        "beta_raw",
        "intercept_raw",
    } <= set(post)
    assert post["beta"].dims == ("chain", "draw", "term")
    assert list(post["term"].values) == [
        "origin:log_population",
        "destination:log_population",
        "destination:night_lights_per_capita",
        "log_distance",
        "cross_border",
    ]
    assert post["country_effect"].dims == ("chain", "draw", "country")


def test_summary_columns_and_divergences(gravity_laplace):
    summary = gravity_laplace.summary()
    assert {"mean", "sd", "eti_lo", "eti_hi", "ess_bulk", "ess_tail", "r_hat"} <= set(
        summary.columns
    )
    assert summary.attrs["divergences"] == 0
    assert "beta_raw[log_distance]" in summary.index


def test_exposure_scales_expected_counts():
    from flowmodel.simulate import simulate_flow_dataset

    ds, truth = simulate_flow_dataset(50, 2, seed=4, sample_fraction=0.1, likelihood="poisson")
    model = _fit(GravityModel(destination_covariates=DEST_COVS, likelihood="poisson"), ds)
    summary = model.summary()
    # the intercept is on the population scale: the sample fraction is an offset, not absorbed
    assert (
        abs(summary.loc["beta_raw[log_distance]", "mean"] - truth["beta"]["log_distance"]) < 0.15
    )
    intercept = summary.loc["intercept_raw", "mean"]
    ce = np.mean(list(truth["country_effect"].values()))
    assert abs(intercept - (truth["intercept"] + ce)) < 1.0
    sampled = model.predict(ds, kind="mean", exposure="census")["mean"]
    population = model.predict(ds, kind="mean")["mean"]
    np.testing.assert_allclose(sampled, population * 0.1)


def test_results_before_fit_raise():
    model = GravityModel()
    with pytest.raises(RuntimeError, match=r"call \.fit\(\) first"):
        model.summary()
    with pytest.raises(RuntimeError, match=r"call \.fit\(\) first"):
        _ = model.idata


def test_constructor_stores_config_and_never_touches_data():
    model = GravityModel(cost_func="exp", constraint="production", sampler_config={"draws": 10})
    assert model.model_config["cost_func"] == "exp"
    assert model.model_config["constraint"] == "production"
    assert model.sampler_config["draws"] == 10 and model.sampler_config["tune"] == 1000
    assert model.model is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cost_func": "linear"}, r"cost_func='linear' is not valid"),
        ({"constraint": "both"}, r"constraint='both' is not valid"),
        ({"likelihood": "normal"}, r"likelihood='normal' is not valid"),
        ({"origin_covariates": "log_population"}, "must be a list of names"),
    ],
)
def test_bad_structural_options(kwargs, match):
    with pytest.raises(ModelConfigError, match=match):
        GravityModel(**kwargs)


def test_unknown_covariate_lists_available(sim_small):
    ds, _ = sim_small
    model = GravityModel(destination_covariates=["log_gdp"])
    with pytest.raises(
        ModelConfigError, match=r"covariate 'log_gdp' is not a unit variable.*population"
    ):
        model.build_model(ds)


def test_log_covariate_is_computed(sim_small):
    ds, _ = sim_small
    assert "log_population" not in ds
    from flowmodel.models.latent import unit_variable

    values = unit_variable(ds, "log_population")
    np.testing.assert_allclose(values, np.log(ds["population"].values))


def test_zero_variance_covariate_errors(sim_small):
    ds, _ = sim_small
    ds = ds.assign(const=("unit", np.full(ds.sizes["unit"], 3.0)))
    with pytest.raises(ModelConfigError, match="'destination:const' has zero variance"):
        GravityModel(destination_covariates=["const"]).build_model(ds)


def test_prior_naming_no_parameter_warns(sim_small):
    ds, _ = sim_small
    model = GravityModel(priors={"tau": {"dist": "HalfNormal", "sigma": 1}})
    with pytest.warns(PriorWarning, match="prior 'tau' names no parameter"):
        model.build_model(ds)


def test_missing_contiguity_and_unknown_source(sim_small):
    ds, _ = sim_small
    with pytest.raises(
        ModelConfigError, match="contiguity=True needs the pair variable 'contiguous'"
    ):
        GravityModel(contiguity=True).build_model(ds)
    with pytest.raises(ModelConfigError, match=r"no variable 'flow_cdr'"):
        GravityModel(source="cdr").build_model(ds)


def test_two_sources_need_source(sim_small):
    ds, _ = sim_small
    ds = ds.assign(flow_cdr=ds["flow_census"])
    with pytest.raises(ModelConfigError, match="pass source=<name>"):
        GravityModel().build_model(ds)
    assert GravityModel(source="cdr").build_model(ds) is not None


def test_unknown_backend_and_missing_backend(sim_small, monkeypatch):
    ds, _ = sim_small
    with pytest.raises(ModelConfigError, match="backend='stan' is not valid"):
        GravityModel().fit(ds, backend="stan")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nutpie" else real(name, *a)
    )
    with pytest.raises(BackendNotAvailableError, match="pip install nutpie"):
        GravityModel().fit(ds, backend="nutpie")


def test_auto_backend_by_size(monkeypatch):
    from flowmodel.models import inference

    assert inference.auto_backend(100) == "nutpie"
    assert inference.auto_backend(inference.AUTO_NUMPYRO_PAIRS + 1) == "numpyro"
    assert inference.auto_backend(inference.AUTO_LAPLACE_PAIRS + 1) == "laplace"
    # censored cells (the count CDF): numpyro's chains froze on a sparse-CDR world
    assert inference.auto_backend(inference.AUTO_NUMPYRO_PAIRS + 1, censored=True) == "nutpie"


def test_a_chain_that_never_moved_fails_the_fit():
    """Every draw of chain 1 equals its first (step size 0): a named error, not a summary."""
    import xarray as xr

    from flowmodel.exceptions import FitFailedError
    from flowmodel.models.inference import check_chains_moved

    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 50))
    b = rng.normal(size=(3, 50, 2))
    a[1] = a[1, 0]
    b[1] = b[1, 0]
    post = xr.Dataset({"a": (("chain", "draw"), a), "b": (("chain", "draw", "k"), b)})
    with pytest.raises(
        FitFailedError, match=r"chain\(s\) \[1\] of 3 never moved.*backend='nutpie'"
    ):
        check_chains_moved(post, "numpyro")
    # a parameter constant by construction in every chain does not fail a fit that moved
    post["c"] = (("chain", "draw"), np.zeros((3, 50)))
    post["a"] = (("chain", "draw"), rng.normal(size=(3, 50)))
    check_chains_moved(post, "numpyro")


def test_sufficient_statistic_loglik_equals_elementwise(sim_small):
    """The Potential (sufficient statistics) equals Σ NB log pmf of the observed pairs."""
    from scipy import stats

    ds, _ = sim_small
    model = GravityModel(destination_covariates=DEST_COVS)
    pm_model, state, _ = model._build(ds)
    model.fit_meta = state
    point = pm_model.initial_point()
    point = {k: v + 0.1 for k, v in point.items()}
    outs = pm_model.replace_rvs_by_values(
        [
            pm_model.potentials[0],
            pm_model["phi"],
            pm_model["intercept"],
            pm_model["beta"],
            pm_model["country_effect"],
        ]
    )
    fn = pm_model.compile_fn(outs, inputs=pm_model.value_vars, on_unused_input="ignore")
    loglik, *values = fn(point)
    phi = float(values[0])
    post = xr.Dataset(
        {
            "intercept": (("chain", "draw"), [[float(values[1])]]),
            "beta": (("chain", "draw", "term"), [[values[2]]]),
            "country_effect": (("chain", "draw", "country"), [[values[3]]]),
            "sigma_country": (("chain", "draw"), [[1.0]]),
            "phi": (("chain", "draw"), [[phi]]),
        },
        coords={
            "term": state["latent"]["terms"],
            "country": state["latent"]["countries"],
        },
    )
    pairs = read_cells(ds, "census")
    log_mu = model._log_rate_draws(post, ds, pairs.origin_idx, pairs.dest_idx)[0]
    mu = np.exp(log_mu)
    expected = stats.nbinom.logpmf(pairs.y, phi, phi / (phi + mu)).sum()
    assert float(loglik) == pytest.approx(expected, rel=1e-9)


def test_prior_and_posterior_predictive(gravity_laplace, sim_small):
    ds, _ = sim_small
    post = gravity_laplace.sample_posterior_predictive(ds, random_seed=1)
    y = post["observed_data"]["flow_census"].values
    draws = post["posterior_predictive"]["flow_census"]
    assert draws.dims == ("chain", "draw", "cell_census") and draws.sizes["cell_census"] == y.size
    # posterior predictive totals bracket the observed total
    totals = draws.sum("cell_census").values.ravel()
    assert np.quantile(totals, 0.01) < y.sum() < np.quantile(totals, 0.99)
    prior = GravityModel(destination_covariates=DEST_COVS).sample_prior_predictive(
        ds, draws=50, random_seed=2
    )
    assert prior["prior_predictive"]["flow_census"].sizes["draw"] == 50
    assert {"beta", "intercept", "phi"} <= set(prior["prior"].data_vars)


def test_prior_predictive_after_fit_leaves_predict_unchanged(gravity_laplace, sim_small):
    """build_model has no side effects: drawing from the prior does not touch the fit state."""
    ds, _ = sim_small
    sub = ds.isel(unit=slice(0, 30), origin=slice(0, 30), destination=slice(0, 30))
    before = gravity_laplace.predict(ds, kind="mean", draws=20)
    state = dict(gravity_laplace.fit_meta)
    gravity_laplace.sample_prior_predictive(sub, draws=20, random_seed=3)
    gravity_laplace.build_model(sub)
    assert gravity_laplace.fit_meta == state
    after = gravity_laplace.predict(ds, kind="mean", draws=20)
    xr.testing.assert_identical(before, after)


def test_constrained_predictive_points_to_predict_posterior(austria_fits, austria):
    with pytest.raises(ModelConfigError, match="kind='predictive'"):
        austria_fits["production"].sample_posterior_predictive(austria)


def test_compare_needs_two_models(gravity_laplace):
    from flowmodel.models import compare

    with pytest.raises(ModelConfigError, match="at least two fitted models"):
        compare({"gravity": gravity_laplace})


def _small_world(n_units=8, seed=3):
    from flowmodel.simulate import simulate_flow_dataset

    ds, _ = simulate_flow_dataset(n_units, 1, seed=seed)
    return ds


@pytest.mark.parametrize("likelihood", ["negbin", "poisson"])
def test_constrained_loglik_equals_pymc_dirichlet_multinomial(likelihood):
    """The production Potential is Σ_i log DirMult(y_i. | O_i, phi pi_i.) (Multinomial for
    Poisson), pi_ij = softmax_j(beta · x_ij) over the origin's pairs, O_i the row total."""
    import pymc as pm

    ds = _small_world()
    model = GravityModel(
        destination_covariates=["log_population"],
        constraint="production",
        cross_border=False,
        country_effects=False,
        likelihood=likelihood,
    )
    pm_model, state, _ = model._build(ds)
    point = {k: v + 0.3 for k, v in pm_model.initial_point().items()}
    nodes = [pm_model.potentials[0], pm_model["beta"]]
    if likelihood == "negbin":
        nodes.append(pm_model["phi"])
    outs = pm_model.replace_rvs_by_values(nodes)
    fn = pm_model.compile_fn(outs, inputs=pm_model.value_vars, on_unused_input="ignore")
    loglik, beta, *phi = fn(point)
    assert state["latent"]["terms"] == ["destination:log_population", "log_distance"]
    pairs = read_cells(ds, "census")
    x = np.column_stack(
        [
            np.log(ds["population"].values)[pairs.dest_idx],
            np.log(ds["distance_km"].values[pairs.origin_idx, pairs.dest_idx]),
        ]
    )
    eta = (x - state["latent"]["term_mean"]) / state["latent"]["term_sd"] @ beta
    expected = 0.0
    for i in np.unique(pairs.origin_idx):
        rows = pairs.origin_idx == i
        pi = np.exp(eta[rows] - eta[rows].max())
        pi /= pi.sum()
        y = pairs.y[rows].astype(int)
        if phi:
            dist = pm.DirichletMultinomial.dist(n=y.sum(), a=float(phi[0]) * pi)
        else:
            dist = pm.Multinomial.dist(n=y.sum(), p=pi)
        expected += float(pm.logp(dist, y).eval())
    assert float(loglik) == pytest.approx(expected, rel=1e-9)


def test_dirichlet_multinomial_production_recovers_coefficients():
    """Flows drawn from a DM production-constrained process (known beta, phi) are recovered
    within 3 posterior sd (Laplace)."""
    ds = _small_world(40, seed=5)
    rng = np.random.default_rng(11)
    beta = {"destination:log_population": 0.8, "log_distance": -1.5}
    phi_true = 20.0
    log_pop = np.log(ds["population"].values)
    log_d = np.log(ds["distance_km"].values)
    flows = np.full(log_d.shape, np.nan)
    for i in range(log_d.shape[0]):
        dest = np.flatnonzero(np.arange(log_d.shape[1]) != i)
        eta = (
            beta["destination:log_population"] * log_pop[dest]
            + beta["log_distance"] * log_d[i, dest]
        )
        pi = np.exp(eta - eta.max())
        pi /= pi.sum()
        shares = rng.dirichlet(phi_true * pi)
        flows[i, dest] = rng.multinomial(int(rng.integers(2_000, 50_000)), shares)
    ds = ds.assign(flow_census=(("origin", "destination"), flows))
    model = _fit(
        GravityModel(
            destination_covariates=["log_population"],
            constraint="production",
            cross_border=False,
            country_effects=False,
        ),
        ds,
    )
    summary = model.summary()
    for term, value in beta.items():
        row = summary.loc[f"beta_raw[{term}]"]
        assert abs(row["mean"] - value) < 3 * row["sd"], (term, row["mean"], row["sd"])
    assert abs(summary.loc["phi", "mean"] - phi_true) < 3 * summary.loc["phi", "sd"]


@pytest.mark.parametrize("constraint", ["production", "attraction", "doubly"])
def test_constrained_forms_reject_censored_cells(constraint):
    ds = _small_world()
    upper = ds["flow_census"].values.copy()
    upper[:] = np.nan
    upper[0, 1] = 5.0
    flows = ds["flow_census"].values.copy()
    flows[0, 1] = np.nan
    ds = ds.assign(
        flow_census=(("origin", "destination"), flows),
        flow_census_max=(("origin", "destination"), upper),
    )
    with pytest.raises(
        ModelConfigError,
        match=rf"constraint='{constraint}' cannot use the 1 censored cell.*total.*unknown"
        r".*constraint='none'.*FusionModel",
    ):
        GravityModel(constraint=constraint, country_effects=False).build_model(ds)


def test_country_slopes_recover_country_specific_distance_decay():
    """Flows whose log_distance slope differs by origin country (-1.0, -1.4, -1.8) are
    recovered per country by ``country_slopes=["log_distance"]`` (MAP within 0.15 on the raw
    scale, under half the gap between countries), while the pooled model's one slope lies
    between the country values and misses at least one of them by more than 0.3.

    ``country_slope[slope_term, country]`` is an origin-country offset to ``beta`` on the
    standardised scale, so the raw slope of country c is ``(beta + country_slope[c]) / sd``.
    """
    from flowmodel.simulate import DEFAULT_TRUTH, simulate_flow_dataset

    beta = {
        "origin:log_population": 0.8,
        "destination:log_population": 0.7,
        "log_distance": -1.4,
        "cross_border": -1.5,
    }
    slopes = {"C00": -1.0, "C01": -1.4, "C02": -1.8}
    ds, truth = simulate_flow_dataset(60, 3, seed=7, truth={**DEFAULT_TRUTH, "beta": beta})
    country = ds["country"].values.astype(str)
    # enough origins per country (17, 25, 18) that each slope is identified, not shrunk
    assert all((country == c).sum() >= 15 for c in slopes)
    # regenerate the flows: replace the common log_distance slope by the origin country's
    dist = ds["distance_km"].values.copy()
    np.fill_diagonal(dist, 1.0)
    offset = np.array([slopes[c] - beta["log_distance"] for c in country])
    mu = np.nan_to_num(truth["mu"].values) * dist ** offset[:, None]
    rng = np.random.default_rng(21)
    phi = truth["phi"]
    flows = rng.poisson(rng.gamma(phi, mu / phi)).astype(float)
    np.fill_diagonal(flows, np.nan)
    ds = ds.assign(flow_census=(("origin", "destination"), flows))

    sloped = _fit(GravityModel(country_slopes=["log_distance"]), ds, backend="map")
    post = sloped.posterior
    assert {"country_slope", "sigma_slope"} <= set(post)
    assert post["country_slope"].dims == ("chain", "draw", "slope_term", "country")
    assert list(post["slope_term"].values) == ["log_distance"]
    assert list(post["country"].values) == list(slopes)
    k = sloped.fit_meta["latent"]["terms"].index("log_distance")
    sd = sloped.fit_meta["latent"]["term_sd"][k]
    raw = (
        post["beta"].sel(term="log_distance")
        + post["country_slope"].sel(slope_term="log_distance")
    ) / sd
    estimates = {c: float(raw.sel(country=c).mean()) for c in slopes}
    for c, value in slopes.items():
        assert abs(estimates[c] - value) < 0.15, (c, estimates[c], value)

    pooled = _fit(GravityModel(), ds, backend="map")
    assert "country_slope" not in pooled.posterior
    single = float(pooled.posterior["beta_raw"].sel(term="log_distance").mean())
    assert min(slopes.values()) < single < max(slopes.values())
    assert max(abs(single - value) for value in slopes.values()) > 0.3


def test_interval_logcdf_of_censored_cells_matches_scipy():
    """The censored-cell term of the gravity likelihood: log P(lower <= y <= upper)."""
    import pymc as pm
    from scipy import stats

    from flowmodel.models.likelihoods import censored_bounds, interval_logcdf

    mu = np.array([0.5, 3.0, 8.0, 2.0])
    upper, lower = censored_bounds(
        np.array([4.0, 4.9, 15.0, 0.0]), np.array([1.0, np.nan, 0.2, 0.0])
    )
    assert upper.tolist() == [4, 4, 15, 0] and lower.tolist() == [1, 0, 1, 0]

    def dist(idx):
        return pm.Poisson.dist(mu=mu if idx is None else mu[idx])

    got = interval_logcdf(dist, upper, lower).eval()
    expected = np.log(stats.poisson.cdf(upper, mu) - stats.poisson.cdf(lower - 1, mu))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_laplace_that_fails_retries_the_other_form_of_country_effects(sim_small, monkeypatch):
    """noncentered="auto": a failed Laplace fit is retried with the other form, then named."""
    import flowmodel.models.base as base
    from flowmodel.exceptions import FitFailedError

    ds, _ = sim_small
    real = base.run_inference
    seen: list[list[str]] = []

    def first_fails(model, backend, kwargs, **kw):
        seen.append(sorted(v.name for v in model.free_RVs))
        if len(seen) == 1:
            raise FitFailedError("Laplace: the Hessian at the mode is not positive definite")
        return real(model, backend, kwargs, **kw)

    monkeypatch.setattr(base, "run_inference", first_fails)
    model = GravityModel(destination_covariates=DEST_COVS)
    model.fit(ds, backend="laplace", draws=50, chains=1, random_seed=1)
    assert "country_effect_z" in seen[0] and "country_effect_z" not in seen[1], seen
    assert model.fit_meta["latent"]["noncentered"] is False

    def always_fails(model, backend, kwargs, **kw):
        raise FitFailedError(f"failed with {len(model.free_RVs)} variables")

    monkeypatch.setattr(base, "run_inference", always_fails)
    with pytest.raises(FitFailedError, match="with centred country effects; with the other form"):
        GravityModel(destination_covariates=DEST_COVS).fit(ds, backend="laplace", draws=50)
    # a form the user chose is not second-guessed
    with pytest.raises(FitFailedError, match=r"^failed with \d+ variables$"):
        GravityModel(destination_covariates=DEST_COVS, noncentered=True).fit(
            ds, backend="laplace", draws=50
        )


def test_laplace_finishes_where_lbfgs_stops_short(sim_small):
    """L-BFGS stopped after 3 iterations: the trust-region Newton stage reaches the same mode."""
    ds, _ = sim_small
    full = _fit(GravityModel(destination_covariates=DEST_COVS), ds)
    short = _fit(GravityModel(destination_covariates=DEST_COVS), ds, maxiter=3)
    attrs = short.idata["posterior"].attrs
    assert attrs["laplace_lbfgs_iterations"] <= 3
    assert attrs["laplace_newton_steps"] > 0
    assert attrs["laplace_mode_sd"] < 0.1 and attrs["laplace_converged"] == 1
    a, b = full.summary(), short.summary()
    rows = [r for r in a.index if r.startswith("beta_raw")] + ["phi"]
    for r in rows:
        assert abs(b.loc[r, "mean"] - a.loc[r, "mean"]) < 0.05 * a.loc[r, "sd"], r


def test_laplace_stopped_far_from_the_mode_warns(sim_small):
    """No Newton stage and 2 L-BFGS iterations: the distance to the mode is measured and told."""
    from flowmodel.exceptions import DiagnosticsWarning

    ds, _ = sim_small
    model = GravityModel(destination_covariates=DEST_COVS, country_effects=False)
    with pytest.warns(DiagnosticsWarning, match=r"stopped about .* posterior sd from the mode"):
        model.fit(ds, backend="laplace", random_seed=1, draws=50, maxiter=2, newton_maxiter=0)
    assert model.idata["posterior"].attrs["laplace_mode_sd"] > 0.1


def test_flows_of_one_country_leave_the_others_levels_to_the_prior(sim_small):
    """No spread of country levels can be learnt from one country: the others get the prior's.

    Before, a fit on one country's flows had no country effects at all, so the other
    countries' flows took that country's level with its (narrow) interval.
    """
    from flowmodel.exceptions import UninformedParameterWarning

    ds, _ = sim_small
    country = ds["country"].values.astype(str)
    fitted, *others = sorted(set(country))
    within = (country[:, None] == fitted) & (country[None, :] == fitted)
    one = ds.assign(flow_census=ds["flow_census"].where(within))
    model = GravityModel(destination_covariates=DEST_COVS)
    with pytest.warns(UninformedParameterWarning) as caught:
        model.fit(one, backend="laplace", random_seed=1, draws=250, chains=2)
    (said,) = [str(w.message) for w in caught if "cannot be learnt" in str(w.message)]
    assert f"observed in {fitted} only" in said and ", ".join(others) in said
    assert "sigma_country ~ HalfNormal(sigma=0.5)" in said
    (entry,) = [u for u in model.fit_meta["uninformed"] if u["parameter"].startswith("country_")]
    assert entry["parameter"] == f"country_effect[{', '.join(others)}]"
    assert entry["prior_sd"] == pytest.approx(0.5, rel=0.05)  # sd of N(0, HalfNormal(0.5))
    pred = model.predict(one, seed=2)
    width = np.log(pred["q95"] + 1) - np.log(pred["q05"] + 1)
    same = country[:, None] == country[None, :]
    off = ~np.eye(len(country), dtype=bool)
    home = float(width.values[within & off].mean())
    wide = {}
    for code in others:
        theirs = (country[:, None] == code) & same & off
        wide[code] = float(width.values[theirs].mean())
        # the level's prior (sd 0.5 on the log scale) widens every interval there
        assert wide[code] > home + 0.3, (code, wide[code], home)
    # a stated spread of levels is used instead of the default
    tight = GravityModel(
        destination_covariates=DEST_COVS,
        priors={"sigma_country": {"dist": "HalfNormal", "sigma": 0.05}},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tight.fit(one, backend="laplace", random_seed=1, draws=250, chains=2)
    assert tight.fit_meta["latent"]["sigma_country_prior"] == {"dist": "HalfNormal", "sigma": 0.05}
    narrow = np.log(tight.predict(one, seed=2)["q95"] + 1) - np.log(
        tight.predict(one, seed=2)["q05"] + 1
    )
    for code in others:
        theirs = (country[:, None] == code) & same & off
        got = float(narrow.values[theirs].mean())
        print(
            f"{code}: mean 90% log-width {wide[code]:.2f} (sigma_country prior 0.5), "
            f"{got:.2f} (0.05); {fitted}, fitted: {home:.2f}"
        )
        # the level's prior alone makes the difference (same data, same noise)
        assert got < wide[code] - 0.15
