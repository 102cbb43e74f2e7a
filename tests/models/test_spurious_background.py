"""The CDR's background of spurious relocations (issue 15, cause 2 of docs/fusion.md).

Home detection with few active nights misplaces a home for one period now and then; the
move out and the move back are counted as relocations whose destinations do not fall
with distance. ``spurious_relocations=True`` adds ``spurious_rate x S_i S_j / sum S`` to
every CDR cell's expected count (``S``: subscribers with a home per unit). These checks
hold the symbolic likelihood, the numpy side (LOO, checks) and a hand computation to
one formula, and the prior to home detection's estimate.
"""

from __future__ import annotations

import warnings

import numpy as np
import pymc as pm
import pytest
import xarray as xr
from scipy import stats

from flowmodel.exceptions import ModelConfigError
from flowmodel.models.fusion import FusionModel
from flowmodel.models.gravity import GravityModel
from flowmodel.models.observations import SPURIOUS_RATE_SDLOG, read_cells
from flowmodel.simulate import simulate_fusion_dataset

pytestmark = pytest.mark.xdist_group("fusion")

RATE = 0.02


def gravity() -> GravityModel:
    return GravityModel(
        origin_covariates=["log_population"],
        destination_covariates=["log_population"],
        noncentered=True,
    )


@pytest.fixture(scope="module")
def world() -> xr.Dataset:
    """A 24-unit fusion world with totals, subscribers per unit and home detection's rate."""
    ds, _ = simulate_fusion_dataset(units_per_country=4, seed=3, totals=True)
    subs = ds["cdr_subscribers_per_resident"] * ds["population"]
    ds = ds.assign(cdr_subscribers=subs.where(np.isfinite(subs)))
    ds["flow_cdr"].attrs["spurious_rate"] = RATE
    return ds


def _weights(ds: xr.Dataset) -> np.ndarray:
    """Subscribers per unit over the units the CDR covers (0 elsewhere), by hand."""
    cells = read_cells(ds, "cdr")
    covered = np.zeros(ds.sizes["unit"], dtype=bool)
    covered[cells.origin_idx] = covered[cells.dest_idx] = True
    return np.where(covered, ds["cdr_subscribers"].values, 0.0)


def _prior_posterior(model: FusionModel, ds: xr.Dataset, draws: int = 6):
    """The built model and ``draws`` prior draws stored as the model's posterior."""
    pm_model, model.fit_meta, _ = model._build(ds)
    names = [v.name for v in pm_model.free_RVs + pm_model.deterministics]
    with pm_model:
        prior = pm.sample_prior_predictive(draws=draws, var_names=names, random_seed=2)
    model.idata = xr.DataTree.from_dict({"posterior": prior["prior"].to_dataset()})
    return pm_model, prior["prior"].to_dataset()


def _point(pm_model, post: xr.Dataset, k: int) -> dict[str, np.ndarray]:
    """The value-variable point (transformed space) of prior draw ``k``."""
    point = {}
    for rv in pm_model.free_RVs:
        value = np.asarray(post[rv.name].isel(chain=0, draw=k).values)
        transform = pm_model.rvs_to_transforms.get(rv)
        if transform is not None:
            value = transform.forward(value, *rv.owner.inputs).eval()
        point[pm_model.rvs_to_values[rv].name] = np.asarray(value)
    return point


def test_the_background_is_the_same_in_the_likelihood_the_numpy_side_and_by_hand(world):
    ds = world
    model = FusionModel(latent=gravity(), spurious_relocations=True)
    pm_model, post = _prior_posterior(model, ds)
    assert "spurious_rate" in pm_model.named_vars
    assert model.fit_meta is not None
    cells = read_cells(ds, "cdr")
    ll = model.log_likelihood(ds)["log_likelihood"]["flow"].values.reshape(6, -1)
    cdr = ll[:, -cells.n :]  # the CDR block follows the census block
    pots = {p.name: p for p in pm_model.potentials}
    logp = pm_model.compile_logp(vars=[pots["y_cdr"], pots["y_cdr_censored"]], jacobian=False)
    weight = _weights(ds)
    background = weight[cells.origin_idx] * weight[cells.dest_idx] / weight.sum()
    k_obs = int(np.flatnonzero(cells.observed)[0])
    k_cen = int(np.flatnonzero(cells.censored)[0])
    for k in range(6):
        # the symbolic Potentials = the numpy pointwise log-likelihood summed over the cells
        total = float(logp(_point(pm_model, post, k)))
        assert total == pytest.approx(cdr[k].sum(), rel=1e-6)
        # one released and one redacted cell by hand: mu = latent x share x period + bg
        draw = post.isel(chain=0, draw=k)
        rate = model._log_rate_draws(
            post.isel(draw=[k]),
            ds,
            cells.origin_idx[[k_obs, k_cen]],
            cells.dest_idx[[k_obs, k_cen]],
        )[0]
        units = list(post["market_unit"].values)
        for j, cell in enumerate((k_obs, k_cen)):
            unit = str(ds["unit"].values[cells.origin_idx[cell]])
            share = float(draw["market_share"].values[units.index(unit)])
            effect = float(draw["period_effect"].values[cells.period_idx[cell]])
            mu = np.exp(rate[j]) * share * effect + float(draw["spurious_rate"]) * background[cell]
            phi = float(draw["phi"].sel(source="cdr"))
            nb = stats.nbinom(phi, phi / (phi + mu))
            expected = nb.logpmf(cells.y[cell]) if j == 0 else nb.logcdf(cells.upper[cell])
            assert cdr[k, cell] == pytest.approx(expected, rel=1e-6)


def test_the_rate_prior_is_centred_on_home_detections_estimate(world):
    model = FusionModel(latent=gravity(), spurious_relocations="auto")
    pm_model, _, _ = model._build(world)
    draws = pm.draw(pm_model["spurious_rate"], draws=4000, random_seed=1)
    assert np.median(draws) == pytest.approx(RATE, rel=0.05)
    assert np.log(draws).std() == pytest.approx(SPURIOUS_RATE_SDLOG, rel=0.05)
    # the user's prior wins
    mine = {"spurious_rate": {"dist": "LogNormal", "mu": np.log(0.5), "sigma": 0.1}}
    user = FusionModel(latent=gravity(), spurious_relocations=True, priors=mine)
    draws = pm.draw(user._build(world)[0]["spurious_rate"], draws=2000, random_seed=1)
    assert np.median(draws) == pytest.approx(0.5, rel=0.05)


def test_auto_uses_the_background_only_with_an_estimate_and_off_is_the_default(world):
    bare = world.copy()
    bare["flow_cdr"] = bare["flow_cdr"].copy()
    bare["flow_cdr"].attrs = {
        k: v for k, v in bare["flow_cdr"].attrs.items() if k != "spurious_rate"
    }
    auto = FusionModel(latent=gravity(), spurious_relocations="auto")
    assert "spurious_rate" not in auto._build(bare)[0].named_vars
    assert "spurious_rate" in auto._build(world)[0].named_vars
    assert "spurious_rate" not in FusionModel(latent=gravity())._build(world)[0].named_vars


def test_a_tiny_rate_gives_the_likelihood_without_background_and_the_totals_count_it(world):
    """Every CDR term, the in/out totals included, carries the background: as the rate goes
    to 0 each equals the model without it; a large rate raises the totals' expected
    remainders, so their Potentials change."""
    plain, _, _ = FusionModel(latent=gravity())._build(world)
    with_bg, _, _ = FusionModel(latent=gravity(), spurious_relocations=True)._build(world)
    point = plain.initial_point(random_seed=0)
    # few latent movers, so that the redacted cells' truncated means (at most 15) have room
    point["intercept"] = point["intercept"] - 8.0
    names = [p.name for p in plain.potentials if p.name.startswith(("y_cdr", "cdr_"))]
    assert {"cdr_outflow_total", "cdr_inflow_total"} <= set(names)
    ref = {n: float(plain.compile_logp(vars=[plain[n]])(point)) for n in names}
    for rate, same in ((1e-12, True), (0.05, False)):
        bg_point = dict(point, spurious_rate_log__=np.asarray(np.log(rate)))
        for n in names:
            got = float(with_bg.compile_logp(vars=[with_bg[n]])(bg_point))
            if same:
                assert got == pytest.approx(ref[n], rel=1e-7, abs=1e-7), n
            elif n.endswith("_total"):
                assert abs(got - ref[n]) > 0.01, n
        if not same:
            total = float(with_bg.compile_logp(vars=[with_bg["cdr_outflow_total"]])(bg_point))
            assert abs(total - ref["cdr_outflow_total"]) > 1.0


def test_bad_options_and_missing_subscribers_are_named_errors(world):
    with pytest.raises(ModelConfigError, match="spurious_relocations='yes'"):
        FusionModel(latent=gravity(), spurious_relocations="yes")._build(world)
    with pytest.raises(ModelConfigError, match=r"'cdr_subscribers'.*Fix"):
        FusionModel(latent=gravity(), spurious_relocations=True)._build(
            world.drop_vars("cdr_subscribers")
        )


def test_withheld_subscriber_counts_are_filled_from_the_country_per_resident_median(world):
    from flowmodel.models.observations import CDRObservation

    ds = world.copy()
    weight = _weights(ds)
    unit = int(np.flatnonzero(weight > 0)[0])
    gap = ds["cdr_subscribers"].values.copy()
    gap[unit] = np.nan
    ds["cdr_subscribers"] = ("unit", gap)
    obs = CDRObservation("cdr", spurious_relocations=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = obs.spurious_weights(ds)
    country = ds["country"].values.astype(str)
    same = (country == country[unit]) & (weight > 0)
    same[unit] = False
    pop = ds["population"].values
    expected = np.median(weight[same] / pop[same]) * pop[unit]
    assert got[unit] == pytest.approx(expected)
    np.testing.assert_allclose(np.delete(got, unit), np.delete(weight, unit))


def test_an_approximate_fusion_fit_says_the_shares_are_its_weak_part(world, mock_sampling):
    """Laplace / MAP place sigma_market_share far from NUTS (docs/fusion.md): the fit warns,
    keeps the caveat with the posterior, and the report's banner shows it; a model
    without CDR has nothing to say (sampling mocked: the caveat is the model's, not the
    draws')."""
    from flowmodel.exceptions import DiagnosticsWarning
    from flowmodel.outputs.report import diagnostics

    model = FusionModel(latent=gravity())
    with pytest.warns(
        DiagnosticsWarning,
        match=r"market shares \(cdr\).*fit with NUTS.*or Laplace with integrate = "
        r"\['sigma_market_share', 'period_scale'\]",
    ):
        model.fit(world, backend="map", random_seed=0)
    assert len(model.fit_meta["approximation_caveats"]) == 1
    titles = [item["title"] for item in diagnostics(model)]
    assert "Known map weakness" in titles
    census = GravityModel(origin_covariates=["log_population"], source="census")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticsWarning)
        census.fit(world, backend="map", random_seed=0)
    assert census.fit_meta["approximation_caveats"] == []
    assert "Known map weakness" not in [item["title"] for item in diagnostics(census)]


def test_a_laplace_fusion_fit_names_the_integration_that_helps_and_says_when_used(
    world, monkeypatch
):
    """Joint-mode Laplace: the caveat gives the fix (integrate over the shares' spread and
    the period scale); a fit integrated over both says so instead (sampling mocked)."""
    from flowmodel.exceptions import DiagnosticsWarning
    from flowmodel.outputs.report import diagnostics
    from tests.conftest import _mock_run_inference

    def mock(model, backend, kwargs, **kw):
        out = _mock_run_inference(model, backend, kwargs, **kw)
        if kwargs.get("integrate"):
            out["posterior"].attrs["laplace_integrated"] = ", ".join(kwargs["integrate"])
        return out

    monkeypatch.setattr("flowmodel.models.base.run_inference", mock)
    model = FusionModel(latent=gravity())
    hyper = ["sigma_market_share", "period_scale"]
    with pytest.warns(
        DiagnosticsWarning, match="integrated over sigma_market_share, period_scale"
    ) as rec:
        model.fit(world, backend="laplace", random_seed=0, integrate=hyper)
    assert "Fix:" not in str(rec[0].message)
    banner = {item["title"]: item["text"] for item in diagnostics(model)}
    assert (
        "integrated numerically over sigma_market_share, period_scale"
        in (banner["Approximate fit (laplace)"])
    )
    # the caveat reads what the fit integrated over (one fit: the others are the attribute)
    attrs = model.idata["posterior"].attrs
    for integrated in ("sigma_market_share", ""):  # one of the two is not enough; none
        attrs["laplace_integrated"] = integrated
        (text,) = model._approximation_caveats()
        assert "Fix: Laplace with integrate = ['sigma_market_share', 'period_scale']" in text
        assert "integrated over" not in text


def test_the_fit_log_says_whether_the_background_is_used(world, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="flowmodel.models.observations")
    FusionModel(latent=gravity(), spurious_relocations=True)._build(world)
    assert "background of spurious relocations, spurious_rate prior" in caplog.text
    assert f"'mu': {float(np.log(RATE))!r}" in caplog.text
    caplog.clear()
    bare = world.copy()
    bare["flow_cdr"] = bare["flow_cdr"].copy()
    bare["flow_cdr"].attrs = {}
    FusionModel(latent=gravity(), spurious_relocations="auto")._build(bare)
    assert "no estimate of the spurious-move rate" in caplog.text
