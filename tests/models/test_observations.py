"""Observation models: aggregated cells, published estimates, several reports of one field.

Fast tests check each likelihood term against a hand computation in numpy at a
point of the parameter space; the slow one fits an admin-1 census and checks that
the generating parameters are recovered.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pymc as pm
import pytest
import xarray as xr
from scipy import stats

from flowmodel.dataset import add_cells, build_dataset, estimates_to_dataset
from flowmodel.exceptions import DataContractError, ModelConfigError
from flowmodel.models import FusionModel, GravityModel
from flowmodel.models.observations import read_cells
from flowmodel.simulate import simulate_flow_dataset


@pytest.fixture(scope="module")
def tiny():
    """12 units in 3 countries; the census observes flows into C00 from the other countries
    only by previous *country* (cells country x unit) and within C00 by unit."""
    ds, truth = simulate_flow_dataset(12, 3, seed=4)
    country = ds["country"].values.astype(str)
    ids = ds["unit"].values.astype(str)
    y = ds["flow_census"].values
    into = np.flatnonzero(country == "C00")
    rows = []
    for j in into:
        for c in sorted(set(country) - {"C00"}):
            members = np.flatnonzero(country == c)
            rows.append((c, ids[j], float(np.nansum(y[members, j]))))
    abroad = pd.DataFrame(rows, columns=["origin", "destination", "count"])
    abroad.loc[abroad["count"] < 5, ["count", "max", "min"]] = (np.nan, 4.0, 1.0)
    within = y.copy()
    within[~((country[:, None] == "C00") & (country[None, :] == "C00"))] = np.nan
    data = ds.drop_vars("flow_census").assign(flow_census=(("origin", "destination"), within))
    data = add_cells(data, "abroad", abroad, origin_level="country", destination_level="unit")
    return data, truth


def _at_point(model, data):
    pm_model, state, _ = model._build(data)
    point = {k: v + 0.2 for k, v in pm_model.initial_point().items()}
    return pm_model, state, point


def _posterior_at(pm_model, point) -> xr.Dataset:
    """The model's free variables and deterministics at ``point`` as a one-draw posterior."""
    names = [v.name for v in [*pm_model.free_RVs, *pm_model.deterministics]]
    outs = pm_model.replace_rvs_by_values([pm_model[n] for n in names])
    fn = pm_model.compile_fn(outs, inputs=pm_model.value_vars, on_unused_input="ignore")
    values = fn(point)
    data = {}
    for name, value in zip(names, values, strict=True):
        dims = pm_model.named_vars_to_dims.get(name, ())
        data[name] = (("chain", "draw", *dims), np.asarray(value)[None, None])
    coords = {k: list(v) for k, v in pm_model.coords.items() if v is not None}
    post = xr.Dataset(data)
    return post.assign_coords({k: v for k, v in coords.items() if k in post.dims})


def _term(pm_model, name, point) -> float:
    return float(pm_model.compile_logp(vars=[pm_model[name]])(point))


def test_aggregated_cells_sum_their_member_pairs(tiny):
    data, _ = tiny
    cells = read_cells(data, "abroad")
    assert cells.aggregated and cells.n == data.sizes["cell_abroad"]
    country = data["country"].values.astype(str)
    ids = data["unit"].values.astype(str)
    for c in range(cells.n):
        members = cells.member_cell == c
        assert set(country[cells.origin_idx[members]]) == {cells.origin_label[c]}
        assert set(ids[cells.dest_idx[members]]) == {cells.destination_label[c]}
        n_origin = int((country == cells.origin_label[c]).sum())
        assert members.sum() == n_origin  # every unit of the previous country, none other
    assert (cells.origin_idx != cells.dest_idx).all()


def test_aggregated_cell_loglik_equals_a_hand_computation(tiny):
    """y_c ~ NB(sum_{(i,j) in c} exp(eta_ij), phi); "<5" cells as P(1 <= y <= 4)."""
    data, _ = tiny
    model = FusionModel(latent=GravityModel(noncentered=True), sources=["census", "abroad"])
    pm_model, state, point = _at_point(model, data)
    model.fit_meta = state
    post = _posterior_at(pm_model, point)
    cells = read_cells(data, "abroad")
    eta = model._log_rate_draws(post, data, cells.origin_idx, cells.dest_idx)[0]
    mu = np.bincount(cells.member_cell, weights=np.exp(eta), minlength=cells.n)
    phi = post["phi"].sel(source="abroad").item()
    p = phi / (phi + mu)
    obs = cells.observed
    exact = stats.nbinom.logpmf(cells.y[obs], phi, p[obs]).sum()
    censored = np.log(stats.nbinom.cdf(4, phi, p[~obs]) - stats.nbinom.cdf(0, phi, p[~obs])).sum()
    assert (~obs).sum() > 0 and obs.sum() > 0
    assert _term(pm_model, "y_abroad", point) == pytest.approx(exact, rel=1e-9)
    assert _term(pm_model, "y_abroad_censored", point) == pytest.approx(censored, rel=1e-8)
    # the latent field holds every member pair, cross-border ones included
    assert state["n_pairs"] >= len(cells.origin_idx)


def test_estimates_enter_as_a_lognormal_on_cell_sums(tiny):
    data, _ = tiny
    table = pd.DataFrame(
        {
            "origin": ["C01", "C02"],
            "destination": ["C02", "C01"],
            "estimate": [1500.0, 900.0],
            "se": [300.0, 450.0],
        }
    )
    est = estimates_to_dataset(data, table, name="un")
    assert est["estimate_un"].attrs["origin_level"] == "country"
    model = FusionModel(latent=GravityModel(noncentered=True), sources=["census"])
    pm_model, state, point = _at_point(model, est)
    assert state["kinds"]["un"] == "estimates"  # estimate sources are always used
    model.fit_meta = state
    post = _posterior_at(pm_model, point)
    cells = read_cells(est, "un", value="estimate")
    eta = model._log_rate_draws(post, est, cells.origin_idx, cells.dest_idx)[0]
    total = np.bincount(cells.member_cell, weights=np.exp(eta), minlength=2)
    sdlog = np.sqrt(np.log1p((table["se"] / table["estimate"]) ** 2)).to_numpy()
    expected = stats.norm.logpdf(np.log(table["estimate"]), np.log(total), sdlog).sum()
    assert _term(pm_model, "y_un", point) == pytest.approx(expected, rel=1e-9)


def test_estimates_errors_name_the_fix(tiny):
    data, _ = tiny
    table = pd.DataFrame({"origin": ["C01"], "destination": ["C02"], "estimate": [10.0]})
    with pytest.raises(ModelConfigError, match=r"no 'se' column.*rel_sd"):
        estimates_to_dataset(data, table, name="x")
    with pytest.raises(DataContractError, match="must be > 0"):
        estimates_to_dataset(data, table.assign(se=-1.0), name="x")
    with pytest.raises(DataContractError, match=r"name no unit at level 'country'.*\[C99\]"):
        estimates_to_dataset(data, table.assign(origin="C99", se=1.0), name="x")
    with pytest.raises(DataContractError, match="level 'admin9'"):
        estimates_to_dataset(data, table.assign(se=1.0), name="x", origin_level="admin9")


def _two_reports(data: xr.Dataset) -> xr.Dataset:
    """Sending (``emig``: 0.6 x, classes low/high) and receiving (``immi``: 0.9 x) reports."""
    y = data["flow_census"].values
    ids = data["unit"].values.astype(str)
    rows = [
        (ids[i], ids[j], y[i, j])
        for i in range(len(ids))
        for j in range(len(ids))
        if i != j and np.isfinite(y[i, j])
    ]
    base = pd.DataFrame(rows, columns=["origin", "destination", "count"])
    emig = base.assign(count=np.round(base["count"] * 0.6), **{"class": "high"})
    emig.loc[emig.index % 2 == 0, "class"] = "low"
    immi = base.assign(count=np.round(base["count"] * 0.9), **{"class": "low"})
    return build_dataset(
        pd.DataFrame(
            {
                "unit_id": ids,
                "country": data["country"].values,
                "population": data["population"].values,
                "lon": data["lon"].values,
                "lat": data["lat"].values,
            }
        ),
        flows={"emig": emig, "immi": immi},
    )


def test_two_reports_of_one_flow_each_with_its_undercount(tiny):
    """A sending and a receiving country report the same flows, each with its undercount class:
    E[y] = u_class x mu; one factor per class, with its own prior."""
    ds = _two_reports(tiny[0])
    assert ds["class_emig"].dims == ("origin", "destination")
    priors = {
        "low": {"dist": "Beta", "alpha": 8.0, "beta": 2.0},
        "high": {"dist": "Beta", "alpha": 3.0, "beta": 3.0},
    }
    model = FusionModel(
        latent=GravityModel(noncentered=True),
        sources=["emig", "immi"],
        source_options={"emig": {"undercount": priors}, "immi": {"undercount": priors}},
    )
    pm_model, state, point = _at_point(model, ds)
    assert list(pm_model.coords["undercount_emig_class"]) == ["high", "low"]
    assert pm_model.named_vars_to_dims["undercount_emig"] == ("undercount_emig_class",)
    model.fit_meta = state
    post = _posterior_at(pm_model, point)
    cells = read_cells(ds, "emig")
    eta = model._log_rate_draws(post, ds, cells.origin_idx, cells.dest_idx)[0]
    factor = post["undercount_emig"].sel(undercount_emig_class=cells.cell_class).values.ravel()
    mu = np.exp(eta) * factor
    phi = post["phi"].sel(source="emig").item()
    expected = stats.nbinom.logpmf(cells.y, phi, phi / (phi + mu)).sum()
    assert _term(pm_model, "y_emig", point) == pytest.approx(expected, rel=1e-9)
    # a class in the data without a prior is an error that names it
    bad = FusionModel(
        latent=GravityModel(noncentered=True),
        sources=["emig", "immi"],
        source_options={"emig": {"undercount": {"low": priors["low"]}}},
    )
    with pytest.raises(
        ModelConfigError, match=r"class\(es\) \['high'\] of class_emig have no factor"
    ):
        bad.build_model(ds)


def test_a_report_with_its_own_dispersion_prior(tiny):
    """``dispersion`` gives one source its own phi prior (a register known to be precise);
    the others keep the shared prior, and ``phi`` keeps its ``source`` dim."""
    ds = _two_reports(tiny[0])
    precise = {"dist": "LogNormal", "mu": float(np.log(1000.0)), "sigma": 0.1}
    model = FusionModel(
        latent=GravityModel(noncentered=True),
        sources=["emig", "immi"],
        source_options={"immi": {"dispersion": precise}},
    )
    pm_model, state, point = _at_point(model, ds)
    free = {v.name for v in pm_model.free_RVs}
    assert {"phi_emig", "phi_immi"} <= free and "phi" not in free
    assert pm_model.named_vars_to_dims["phi"] == ("source",)
    # each node has its own prior: the precise report's is centred on 1,000, the other's is
    # the shared Gamma(2, 0.2)
    rng = np.random.default_rng(0)
    draws = pm.draw([pm_model["phi_emig"], pm_model["phi_immi"]], draws=2000, random_seed=rng)
    assert np.median(draws[1]) == pytest.approx(1000.0, rel=0.02)
    assert np.mean(draws[0]) == pytest.approx(10.0, rel=0.1)
    # the likelihood of each report uses its own phi
    model.fit_meta = state
    post = _posterior_at(pm_model, point)
    assert post["phi"].sel(source="immi").item() == pytest.approx(post["phi_immi"].item())
    cells = read_cells(ds, "immi")
    eta = model._log_rate_draws(post, ds, cells.origin_idx, cells.dest_idx)[0]
    mu = np.exp(eta).ravel()
    phi = post["phi_immi"].item()
    expected = stats.nbinom.logpmf(cells.y, phi, phi / (phi + mu)).sum()
    assert _term(pm_model, "y_immi", point) == pytest.approx(expected, rel=1e-9)
    # the source's prior can still be overridden by node name
    override = FusionModel(
        latent=GravityModel(noncentered=True),
        sources=["emig", "immi"],
        source_options={"immi": {"dispersion": precise}},
        priors={"phi_immi": {"dist": "Gamma", "alpha": 2.0, "beta": 0.002}},
    )
    m2, _, _ = _at_point(override, ds)
    assert np.mean(pm.draw(m2["phi_immi"], draws=2000, random_seed=1)) == pytest.approx(
        1000.0, rel=0.1
    )
    # a Poisson source has no dispersion to give a prior to
    with pytest.raises(ModelConfigError, match="dispersion prior needs the negative binomial"):
        FusionModel(
            latent=GravityModel(),
            sources=["emig", "immi"],
            source_options={"immi": {"dispersion": precise, "likelihood": "poisson"}},
        ).build_model(ds)


@pytest.mark.slow
def test_admin1_census_recovers_the_generating_parameters(tmp_path):
    """A census that records only the previous admin-1 region of internal movers, and only the
    previous country of immigrants, still recovers the gravity process (Laplace fit)."""
    import geopandas as gpd

    from flowmodel.inputs.census import read_census_od
    from flowmodel.inputs.rasters import zonal_covariates
    from flowmodel.simulate import simulate_world

    world = simulate_world(tmp_path, seed=3, census_previous_level="admin1")
    units = gpd.read_file(world.paths["units"], layer="units")
    truth = world.truth
    common = {"sample_fraction": truth["sample_fraction"], "suppressed_min": 1}
    internal = read_census_od(
        world.paths["census_od"], units=units, origin_level="admin1", universe="within", **common
    )
    abroad = read_census_od(
        world.paths["census_immigrants"],
        units=units,
        origin="previous_country",
        destination="current_unit",
        origin_level="country",
        universe="abroad",
        **common,
    )
    ds = build_dataset(
        units,
        covariates=zonal_covariates(units, world.rasters()),
        flows={"census": internal, "census_abroad": abroad},
    )
    assert ds["flow_census"].attrs["origin_level"] == "admin1"
    model = FusionModel(
        latent=GravityModel(
            origin_covariates=["log_population"],
            destination_covariates=["log_population", "night_lights_per_capita"],
        ),
        sources=["census", "census_abroad"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", draws=1000, random_seed=3)
    summary = model.summary(ci_prob=0.94)
    true = {f"beta_raw[{t}]": v for t, v in truth["beta"].items()}
    true["intercept_raw"] = truth["intercept"]
    rows = summary.loc[list(true)]
    z = (rows["mean"] - pd.Series(true)) / rows["sd"]
    print(rows.assign(truth=pd.Series(true), z=z).round(3).to_string())
    assert (z.abs() < 3).all(), z.round(2).to_dict()
