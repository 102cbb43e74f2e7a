"""FusionModel on a sparse pair set: the same likelihood as the dense dataset, O(cells) rows.

A sparse set (:func:`flowmodel.pairs.sparse_pairs`, one ``pair`` dim) that holds every
pair some source informs gives the fusion model the same cells, the same latent rows and
so the same log-probability as the dense dataset: the pairs it leaves out carry no data
and are not in the model either way. Checked on the small fusion world (census, CDR with
redacted cells and in/out totals, a country-level census table, country-pair estimates)
at points of the parameter space, and predictions at the kept pairs against the dense
ones given the same posterior. A set that lacks a pair an aggregated cell or a total
sums is refused with the fix.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from flowmodel.dataset import add_cells, marginals_to_dataset, validate_dataset
from flowmodel.exceptions import DataContractError
from flowmodel.models import FusionModel, GravityModel
from flowmodel.pairs import sparse_pairs
from flowmodel.simulate import simulate_fusion_dataset
from tests.models.logp_cases import evaluate, points

pytestmark = pytest.mark.xdist_group("fusion")

LATENT = {
    "origin_covariates": ["log_population"],
    "destination_covariates": ["log_population", "night_lights_per_capita"],
    "noncentered": True,
}


def fusion(**options) -> FusionModel:
    return FusionModel(latent=GravityModel(**LATENT), **options)


#: A CDR pair held out of every source (no value, no bound): the totals still sum it.
HIDDEN = ("U004", "U005")


@pytest.fixture(scope="module")
def world() -> xr.Dataset:
    """24 units in 6 countries: census in 2, CDR (redacted, 2 periods, totals) in 3."""
    ds, _ = simulate_fusion_dataset(units_per_country=4, seed=1, totals=True)
    cell = (ds["origin"] == HIDDEN[0]) & (ds["destination"] == HIDDEN[1])
    for name in ("flow_census", "flow_cdr", "flow_cdr_max"):
        ds[name] = ds[name].where(~cell)
    return ds


@pytest.fixture(scope="module")
def aggregated(world) -> xr.Dataset:
    """The world plus immigrants into C00 units by previous country, and UN country pairs."""
    ds = world.drop_vars([n for n in world.data_vars if str(n).startswith("cdr_")])
    country = ds["country"].values.astype(str)
    ids = ds["unit"].values.astype(str)
    y = np.nan_to_num(ds["flow_census"].values)
    rows = [
        (c, ids[j], float(y[country == c, j].sum()))
        for j in np.flatnonzero(country == "C00")
        for c in ("C04", "C05")
    ]
    table = pd.DataFrame(rows, columns=["origin", "destination", "count"])
    ds = add_cells(ds, "abroad", table, origin_level="country", destination_level="unit")
    marginals = pd.DataFrame(
        {
            "origin_country": ["C04", "C05", "C01"],
            "destination_country": ["C05", "C04", "C03"],
            "value": [800.0, 500.0, 1200.0],
        }
    )
    return marginals_to_dataset(ds, marginals, name="un", rel_sd=0.2)


def _data_pairs(ds: xr.Dataset) -> set[tuple[str, str]]:
    """Pairs some source of the fusion world informs: census/CDR cells, the totals' universe."""
    seen = ds["flow_census"].notnull() | (
        ds["flow_cdr"].notnull() | ds["flow_cdr_max"].notnull()
    ).any("period")
    country = ds["country"].values.astype(str)
    cdr = np.isin(country, ["C01", "C02", "C03"])
    within = (country[:, None] == country[None, :]) & cdr[:, None] & ~np.eye(len(cdr), dtype=bool)
    o, d = np.nonzero(seen.transpose("origin", "destination").values | within)
    ids = ds["unit"].values.astype(str)
    return set(zip(ids[o], ids[d], strict=True))


def _same_logp(dense_model, sparse_model, n: int = 3) -> None:
    pts = points(dense_model, n=n, seed=4)
    for point in pts:
        total_d, lik_d = evaluate(dense_model, point)
        total_s, lik_s = evaluate(sparse_model, point)
        assert total_s == pytest.approx(total_d, rel=1e-8)
        assert lik_s == pytest.approx(lik_d, rel=1e-8)
    point = pts[-1]
    for pot in dense_model.potentials:
        got = float(sparse_model.compile_logp(vars=[sparse_model[pot.name]])(point))
        want = float(dense_model.compile_logp(vars=[pot])(point))
        assert got == pytest.approx(want, rel=1e-8, abs=1e-8), pot.name


def _posterior_at(pm_model, pts) -> xr.Dataset:
    """The model's free variables and deterministics at ``pts``: one chain, a draw per point."""
    names = [v.name for v in [*pm_model.free_RVs, *pm_model.deterministics]]
    outs = pm_model.replace_rvs_by_values([pm_model[n] for n in names])
    fn = pm_model.compile_fn(outs, inputs=pm_model.value_vars, on_unused_input="ignore")
    draws = [fn(p) for p in pts]
    data = {}
    for k, name in enumerate(names):
        dims = pm_model.named_vars_to_dims.get(name, ())
        values = np.stack([np.asarray(d[k]) for d in draws])[None]
        data[name] = (("chain", "draw", *dims), values)
    post = xr.Dataset(data)
    coords = {k: list(v) for k, v in pm_model.coords.items() if v is not None}
    return post.assign_coords({k: v for k, v in coords.items() if k in post.dims})


# ------------------------------------------------------------------------- likelihood
def test_sparse_set_of_every_pair_gives_the_dense_logp(world):
    n = world.sizes["unit"]
    sparse = sparse_pairs(world, k=n - 1)
    assert sparse.sizes["pair"] == n * (n - 1)
    dense_model, dense_state, _ = fusion()._build(world)
    sparse_model, sparse_state, _ = fusion()._build(sparse)
    assert sparse_state["n_cells"] == dense_state["n_cells"]
    assert sparse_state["n_pairs"] == dense_state["n_pairs"]
    assert sparse_state["latent"] == dense_state["latent"]
    assert (
        sparse_state["observations"]["cdr"]["n_totals"]
        == (dense_state["observations"]["cdr"]["n_totals"])
    )
    names = {p.name for p in sparse_model.potentials}
    assert {"cdr_outflow_total", "cdr_inflow_total", "y_cdr_censored"} <= names
    _same_logp(dense_model, sparse_model)


def test_k_nearest_plus_observed_keeps_every_cell_and_the_logp(world):
    n = world.sizes["unit"]
    sparse = validate_dataset(sparse_pairs(world, k=3, include_observed=True))
    origin, destination = sparse["origin"].values.astype(str), sparse["destination"].values
    kept = set(zip(origin, destination.astype(str), strict=True))
    informed = _data_pairs(world)
    assert informed <= kept
    assert HIDDEN in kept  # no source observes it, but the totals of U004 and U005 sum it
    assert sparse.sizes["pair"] < n * (n - 1)
    dense_model, dense_state, _ = fusion()._build(world)
    sparse_model, sparse_state, _ = fusion()._build(sparse)
    # every observed and censored cell is in the likelihood
    assert sparse_state["n_cells"] == dense_state["n_cells"]
    assert sparse_state["n_censored"] == dense_state["n_censored"]
    # O(cells): the latent rows are the pairs with data, not every pair of the set or n^2
    assert sparse_state["n_pairs"] == dense_state["n_pairs"] == len(informed)
    assert sparse_model.coords["pair"] == dense_model.coords["pair"]
    _same_logp(dense_model, sparse_model)


def test_aggregated_cells_and_estimates_on_a_sparse_set(aggregated):
    sparse = validate_dataset(sparse_pairs(aggregated, k=2, include_observed=True))
    model_options = {"sources": ["census", "abroad"]}
    dense_model, dense_state, _ = fusion(**model_options)._build(aggregated)
    sparse_model, sparse_state, _ = fusion(**model_options)._build(sparse)
    assert dense_state["kinds"] == {"census": "counts", "abroad": "counts", "un": "estimates"}
    assert sparse_state["n_cells"] == dense_state["n_cells"]
    assert sparse_state["n_pairs"] == dense_state["n_pairs"]
    _same_logp(dense_model, sparse_model, n=2)


# ------------------------------------------------------------------------- errors
def _drop_pair(sparse: xr.Dataset, origin: str, destination: str) -> xr.Dataset:
    keep = ~((sparse["origin"] == origin) & (sparse["destination"] == destination))
    assert int((~keep).sum()) == 1
    return sparse.isel(pair=np.flatnonzero(keep.values))


def test_member_pair_outside_the_set_raises_with_the_fix(aggregated):
    sparse = sparse_pairs(aggregated, k=2, include_observed=True)
    ids = aggregated["unit"].values.astype(str)
    country = aggregated["country"].values.astype(str)
    # a pair of the UN estimate C04 -> C05 that no census cell observes
    pair = (ids[country == "C04"][0], ids[country == "C05"][-1])
    model = fusion(sources=["census", "abroad"])
    with pytest.raises(
        DataContractError,
        match=r"'estimate_un': 1 member pair\(s\) of 1 aggregated cell\(s\) \(\['C04->C05'\]\)"
        r" are not in the sparse pair set.*Fix: .*include_observed=True",
    ):
        model.build_model(_drop_pair(sparse, *pair))
    # a member of a census cell by previous country
    into = ids[country == "C00"][0]
    pair = (ids[country == "C05"][1], into)
    with pytest.raises(
        DataContractError,
        match=rf"'flow_abroad': 1 member pair\(s\) .*\['C05->{into}'\].*include_observed=True",
    ):
        model.build_model(_drop_pair(sparse, *pair))


def test_total_pair_outside_the_set_raises_with_the_fix(world):
    sparse = sparse_pairs(world, k=3, include_observed=True)
    with pytest.raises(
        DataContractError,
        match=r"source 'cdr': 1 'cdr_outflow' total\(s\) \(units \['U004'\]\) sum 1 pair\(s\) "
        r"that are not in the sparse pair set.*Fix: .*include_observed=True.*or drop the "
        r"cdr_outflow totals",
    ):
        fusion().build_model(_drop_pair(sparse, *HIDDEN))
    # a redacted cell whose origin reports an outflow total
    ids = world["unit"].values.astype(str)
    reported = world["cdr_outflow"].notnull() | world["cdr_outflow_max"].notnull()
    reported = set(ids[reported.any("period").values])
    redacted = world["flow_cdr_max"].notnull().any("period").transpose("origin", "destination")
    o, d = np.nonzero(redacted.values)
    k = next(k for k in range(len(o)) if ids[o[k]] in reported)
    holed = _drop_pair(sparse, ids[o[k]], ids[d[k]])
    with pytest.raises(DataContractError, match=r"'cdr_outflow' total\(s\).*sum 1 pair\(s\)"):
        fusion().build_model(holed)
    # without the totals the same set fits: the cell is simply not observed
    no_totals = holed.drop_vars([n for n in holed.data_vars if str(n).startswith("cdr_")])
    seen = world["flow_cdr"].notnull() | world["flow_cdr_max"].notnull()
    n_periods = int(seen.sel(origin=ids[o[k]], destination=ids[d[k]]).sum())
    full = fusion()._build(sparse)[1]["n_cells"]["cdr"]
    assert fusion()._build(no_totals)[1]["n_cells"]["cdr"] == full - n_periods


# ------------------------------------------------------------------------- predictions
def test_predictions_at_kept_pairs_equal_the_dense_ones(world):
    sparse = sparse_pairs(world, k=3, include_observed=True)
    for fitted_on in (world, sparse):
        model = fusion()
        pm_model, state, _ = model._build(fitted_on)
        model.fit_meta = state
        model.idata = xr.DataTree.from_dict(
            {"posterior": _posterior_at(pm_model, points(pm_model, n=8, seed=2))}
        )
        dense = model.predict(world, kind="mean")
        got = model.predict(sparse, kind="mean")
        assert got.sizes["pair"] == sparse.sizes["pair"]
        at = dense.sel(origin=got["origin"], destination=got["destination"])
        for name in ("mean", "q05", "q50", "q95"):
            np.testing.assert_allclose(got[name].values, at[name].values, rtol=1e-10)
        predictive = model.predict(sparse)
        assert np.isfinite(predictive["q95"].values).all()
        assert (predictive["q05"] <= predictive["q95"]).all()
        np.testing.assert_allclose(predictive["mean"].values, got["mean"].values, rtol=1e-10)


def test_sparse_fit_streams_every_pair_with_intervals(world, mock_sampling):
    sparse = sparse_pairs(world, k=3, include_observed=True)
    model = fusion()
    model.fit(sparse, backend="laplace", random_seed=1)
    assert model.fit_meta["n_pairs"] == len(_data_pairs(world))
    flows = model.predict(sparse, block_size=50)
    assert flows.sizes["pair"] == sparse.sizes["pair"]
    np.testing.assert_array_equal(flows["origin"].values, sparse["origin"].values)
    assert np.isfinite(flows["mean"].values).all()
    assert (flows["q05"] <= flows["q50"]).all() and (flows["q50"] <= flows["q95"]).all()
    dense = model.predict(world, kind="mean")
    at = dense.sel(origin=flows["origin"], destination=flows["destination"])
    np.testing.assert_allclose(
        model.predict(sparse, kind="mean")["mean"].values, at["mean"].values, rtol=1e-10
    )


def test_sparse_set_of_a_model_with_periods_gives_the_dense_logp():
    """Census rounds, a one-year census and monthly CDR on latent periods (rows pair x period)."""
    from flowmodel.simulate import simulate_panel_dataset
    from tests.models.test_periods import _fusion as panel_fusion

    ds, _ = simulate_panel_dataset(
        units_per_country=5, n_countries=2, cdr_countries=("C01",), seed=3
    )
    sparse = sparse_pairs(ds, k=2)
    dense_model, dense_state, _ = panel_fusion()._build(ds)
    sparse_model, sparse_state, _ = panel_fusion()._build(sparse)
    assert sparse_state["n_cells"] == dense_state["n_cells"]
    assert sparse_state["n_pairs"] == dense_state["n_pairs"]
    _same_logp(dense_model, sparse_model, n=2)


@pytest.mark.slow
def test_recovery_on_the_1000_unit_sparse_world():
    """1,000 units, sources reporting each origin's 50 nearest cells, Laplace on the sparse set.

    The generating gravity parameters, dispersions and country spread lie within 3
    posterior sd, and the per-unit market shares inside their 90% intervals for >= 85%
    of the CDR countries' units (issue 19's recovery check at scale).
    """
    import warnings

    from flowmodel.pairs import reports_near

    ds, truth = simulate_fusion_dataset(units_per_country=166, n_countries=6, seed=0)
    ds = reports_near(ds, 50)
    dense = [n for n, v in ds.data_vars.items() if "origin" in v.dims and "flow_" not in n]
    sparse = sparse_pairs(ds.drop_vars(dense), k=50, include_observed=True)
    assert sparse.sizes["unit"] == 996 and sparse.sizes["pair"] < 60 * 996
    latent = GravityModel(**(LATENT | {"noncentered": "auto"}))
    model = FusionModel(latent=latent, sources=["census", "cdr"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(sparse, backend="laplace", random_seed=1, draws=250, chains=2)
    post = model.posterior
    assert post.attrs["laplace_mode_sd"] < 0.1
    expected = {
        "intercept_raw": [truth["intercept"]],
        "beta_raw": [truth["beta"][t] for t in post["term"].values],
        "sigma_country": [truth["sigma_country"]],
        "phi": [truth["phi"]] * 2,
    }
    for name, values in expected.items():
        draws = post[name].stack(sample=("chain", "draw")).transpose(..., "sample").values
        for value, d in zip(values, draws.reshape(len(values), -1), strict=True):
            assert abs(d.mean() - value) < 3 * d.std(), (name, d.mean(), d.std(), value)
    shares = model.market_share_summary(ci_prob=0.9)
    true_share = truth["market_share"].reindex(shares.index)
    inside = (true_share >= shares["eti_lo"]) & (true_share <= shares["eti_hi"])
    assert inside.mean() >= 0.85 and np.corrcoef(true_share, shares["mean"])[0, 1] >= 0.5
