"""RadiationModel: closed form vs hand computation, intervening population, tau recovery."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from flowmodel.exceptions import ModelConfigError, PriorWarning
from flowmodel.models import RadiationModel
from flowmodel.models.radiation import intervening_rows, radiation_log_probability
from tests.models.conftest import radiation_world


def test_original_closed_form_by_hand():
    # three units on a line at 0, 1, 3 km; populations 100, 50, 20
    m = np.array([100.0, 50.0, 20.0])
    # origin 0 -> destination 2: unit 1 (d=1 <= 3) intervenes, s = 50
    s02 = 50.0
    by_hand = 100 * 20 / ((100 + 50) * (100 + 20 + 50))  # 2000 / 25500
    by_hand /= 1 - 100 / 170  # finite-system normalisation
    got = np.exp(
        radiation_log_probability(np.array([100.0]), np.array([20.0]), np.array([s02]), m.sum())
    )
    assert got[0] == pytest.approx(by_hand, rel=1e-12)
    raw = np.exp(
        radiation_log_probability(
            np.array([100.0]), np.array([20.0]), np.array([s02]), m.sum(), finite_size=False
        )
    )
    assert raw[0] == pytest.approx(2000 / 25500, rel=1e-12)


def test_extended_closed_form_by_hand_and_alpha_one_limit():
    m, n, s, a = 100.0, 20.0, 50.0, 0.7
    A, B, C = (m + s) ** a, (m + s + n) ** a, m**a
    by_hand = (B - A) * (C + 1) / ((A + 1) * (B + 1))
    got = np.exp(
        radiation_log_probability(
            np.array([m]), np.array([n]), np.array([s]), 170.0, np.array([a]), finite_size=False
        )
    )
    assert got[0] == pytest.approx(by_hand, rel=1e-10)
    # alpha = 1 and large populations: reduces to the original law
    big = np.array([1e7]), np.array([3e6]), np.array([5e6])
    ext = radiation_log_probability(*big, 1e9, np.array([1.0]), finite_size=False)
    orig = radiation_log_probability(*big, 1e9, finite_size=False)
    assert float(np.exp(ext - orig)[0]) == pytest.approx(1.0, abs=1e-6)


def test_probabilities_of_an_origin_sum_to_one_with_finite_normalisation():
    rng = np.random.default_rng(0)
    n = 30
    pop = rng.uniform(100, 1000, n)
    xy = rng.uniform(0, 100, (n, 2))
    dist = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(dist, np.nan)
    s = intervening_rows(pop, dist, np.arange(n))
    for alpha in (None, np.array([0.6])):
        logp = radiation_log_probability(pop[:, None], pop[None, :], s, pop.sum(), alpha)
        total = np.nansum(np.exp(logp), axis=1)
        np.testing.assert_allclose(total, 1.0, rtol=1e-10)


def test_intervening_rows_equals_pairs_module_and_brute_force():
    from flowmodel.pairs import intervening_population

    rng = np.random.default_rng(1)
    n = 25
    pop = rng.uniform(1, 10, n)
    dist = np.round(rng.uniform(1, 5, (n, n)))  # many ties
    dist = (dist + dist.T) / 2
    np.fill_diagonal(dist, np.nan)
    mine = intervening_rows(pop, dist, np.arange(n))
    brute = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            if i != j:
                brute[i, j] = sum(
                    pop[k] for k in range(n) if k not in (i, j) and dist[i, k] <= dist[i, j]
                )
    np.testing.assert_allclose(mine, brute)
    np.testing.assert_allclose(mine, intervening_population(pop, dist))


@pytest.fixture(scope="module")
def radiation_fit():
    ds = radiation_world(60, tau=0.02)
    model = RadiationModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=3, draws=250, chains=2)
    return model, ds


def test_tau_recovery(radiation_fit):
    model, _ = radiation_fit
    row = model.summary().loc["tau"]
    assert abs(row["mean"] - 0.02) < 3 * row["sd"]
    assert row["sd"] < 0.005
    phi = model.summary().loc["phi"]
    assert abs(phi["mean"] - 5.0) < 3 * phi["sd"]


def test_radiation_predict_with_and_without_intervening_variable(radiation_fit):
    from flowmodel.pairs import intervening_population

    model, ds = radiation_fit
    pred = model.predict(ds, kind="mean", quantiles=(0.5,))
    with_s = ds.assign(
        intervening_population=(
            ("origin", "destination"),
            intervening_population(ds["population"].values, ds["distance_km"].values),
        )
    )
    np.testing.assert_allclose(
        model.predict(with_s, kind="mean", quantiles=(0.5,))["mean"], pred["mean"]
    )


def test_extended_radiation_recovers_exponent():
    ds = radiation_world(50, tau=0.02, alpha=np.array(0.8), seed=5)
    model = RadiationModel(variant="extended")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=200, chains=2)
    row = model.summary().loc["radiation_exponent"]
    assert abs(row["mean"] - 0.8) < 3 * row["sd"] + 0.02


def test_per_country_tau_and_unseen_country():
    ds = radiation_world(40, tau=0.02, seed=7)
    observed = ds["country"].values != "C02"
    ds["flow_census"] = ds["flow_census"].where(xr_mask(ds, observed))
    model = RadiationModel(per_country_tau=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=100, chains=2)
    assert model.posterior["tau"].dims == ("chain", "draw", "country")
    assert list(model.posterior["country"].values) == ["C00", "C01"]
    pred = model.predict(ds, kind="mean", quantiles=())
    unseen = ds["country"].values == "C02"
    assert np.isfinite(pred["mean"].values[unseen][:, ~unseen]).all()


def xr_mask(ds, observed_origin):
    import xarray as xr

    return xr.DataArray(observed_origin, dims="origin", coords={"origin": ds["origin"].values})


def test_bad_radiation_config():
    with pytest.raises(ModelConfigError, match="variant='gravity' is not valid"):
        RadiationModel(variant="gravity")
    with pytest.raises(ModelConfigError, match="likelihood='normal' is not valid"):
        RadiationModel(likelihood="normal")


def test_radiation_beta_prior_warns():
    ds = radiation_world(20, seed=3)
    with pytest.warns(PriorWarning, match="prior 'beta' names no parameter"):
        RadiationModel(priors={"beta": {"dist": "Normal", "mu": 0, "sigma": 1}}).build_model(ds)
