"""Migration totals: sums of joint draws, streamed; checked against brute force on tiny worlds."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest

from flowmodel.exceptions import ModelConfigError
from flowmodel.pairs import sparse_pairs
from flowmodel.predict import flow_draws
from flowmodel.simulate import simulate_flow_dataset
from flowmodel.totals import LEVELS, predict_totals, totals_draws

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@pytest.fixture(scope="module")
def fitted():
    """A tiny gravity model fitted by Laplace (seconds; no MCMC)."""
    from flowmodel.models.gravity import GravityModel

    ds, _ = simulate_flow_dataset(14, 3, seed=3)
    model = GravityModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=150, chains=2)
    return model, ds


def _brute(model, ds, *, block_size, seed=0):
    """Every flow draw in memory (fine for 14 units), then plain numpy sums."""
    draws = flow_draws(model, ds, kind="predictive", seed=seed, block_size=block_size)
    values = np.nan_to_num(draws.values.reshape(-1, *draws.shape[2:]))  # diagonal -> 0
    country = ds["country"].values.astype(str)
    codes, idx = np.unique(country, return_inverse=True)
    onehot = np.eye(len(codes))[idx]
    pair = np.einsum("sij,ik,jl->skl", values, onehot, onehot)
    return values, pair, codes


def test_net_migration_sums_to_zero_in_every_draw(fitted):
    model, ds = fitted
    joint = totals_draws(model, ds, block_size=4)
    n_samples = joint.sizes["chain"] * joint.sizes["draw"]
    unit_net = joint["unit_net"].values.reshape(n_samples, -1)
    country_net = joint["country_net"].values.reshape(n_samples, -1)
    scale = joint["total_movers"].values.max()
    np.testing.assert_allclose(unit_net.sum(axis=1), 0.0, atol=1e-9 * scale)
    np.testing.assert_allclose(country_net.sum(axis=1), 0.0, atol=1e-9 * scale)
    # and they are not trivially zero: units and countries gain or lose people
    assert np.abs(unit_net).max() > 1 and np.abs(country_net).max() > 1
    # movers = internal + cross-border in every draw
    internal = joint["country_internal"].values.sum(axis=-1)
    np.testing.assert_allclose(
        joint["total_movers"].values, internal + joint["cross_border"].values
    )


def test_means_equal_sums_of_the_flow_means(fitted):
    model, ds = fitted
    totals = predict_totals(model, ds, block_size=5)
    flows = model.predict(ds)
    mean = flows["mean"].fillna(0.0)
    country = ds["country"].values.astype(str)
    for o in totals["origin_country"].values:
        for d in totals["destination_country"].values:
            block = mean.values[np.ix_(country == o, country == d)]
            assert totals["country_pair_mean"].sel(
                origin_country=o, destination_country=d
            ).item() == pytest.approx(block.sum(), rel=1e-10)
    np.testing.assert_allclose(
        totals["unit_out_mean"].values, mean.sum("destination").values, rtol=1e-10
    )
    np.testing.assert_allclose(
        totals["unit_in_mean"].values, mean.sum("origin").values, rtol=1e-10
    )
    assert totals["total_movers_mean"].item() == pytest.approx(float(mean.sum()), rel=1e-10)
    cross = float(mean.where(ds["cross_border"]).sum())
    assert totals["cross_border_mean"].item() == pytest.approx(cross, rel=1e-10)


def test_quantiles_equal_brute_force_from_the_draws(fitted):
    model, ds = fitted
    totals = predict_totals(model, ds, quantiles=QUANTILES, block_size=3, seed=7)
    values, pair, codes = _brute(model, ds, block_size=3, seed=7)
    internal = pair[:, np.arange(len(codes)), np.arange(len(codes))]
    expected = {
        "unit_out": values.sum(axis=2),
        "unit_in": values.sum(axis=1),
        "unit_net": values.sum(axis=1) - values.sum(axis=2),
        "country_out": pair.sum(axis=2) - internal,
        "country_in": pair.sum(axis=1) - internal,
        "country_internal": internal,
        "country_pair": pair,
        "total_movers": values.sum(axis=(1, 2)),
        "cross_border": pair.sum(axis=(1, 2)) - internal.sum(axis=1),
    }
    for name, draws in expected.items():
        for q, label in zip(QUANTILES, ("q05", "q25", "q50", "q75", "q95"), strict=True):
            np.testing.assert_allclose(
                totals[f"{name}_{label}"].values,
                np.quantile(draws, q, axis=0),
                rtol=1e-12,
                err_msg=f"{name}_{label}",
            )
    # a sum of quantiles is not the quantile of the sum: the totals are not built that way
    flows = model.predict(ds, seed=7)
    naive = float(flows["q95"].sum())
    assert totals["total_movers_q95"].item() < naive


def test_block_size_does_not_change_expected_totals(fitted):
    model, ds = fitted
    a = predict_totals(model, ds, kind="mean", block_size=1)
    b = predict_totals(model, ds, kind="mean", block_size=14)
    for name in a.data_vars:
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-10, err_msg=name)


def test_sparse_pair_sets_sum_their_pairs_only(fitted):
    model, ds = fitted
    sparse = sparse_pairs(ds, k=4, include_observed=False)
    assert sparse.sizes["pair"] == 14 * 4
    totals = predict_totals(model, sparse, block_size=11, seed=2)
    draws = flow_draws(model, sparse, kind="predictive", seed=2, block_size=11)
    values = np.nan_to_num(draws.values.reshape(-1, draws.sizes["pair"]))
    units = list(ds["unit"].values)
    o = np.array([units.index(u) for u in sparse["origin"].values])
    out = np.zeros((values.shape[0], len(units)))
    for k, i in enumerate(o):
        out[:, i] += values[:, k]
    np.testing.assert_allclose(totals["unit_out_q50"].values, np.quantile(out, 0.5, axis=0))
    assert "sparse" in totals.attrs["pair_set"]
    dense = predict_totals(model, ds, by="total", kind="mean")
    assert totals["total_movers_mean"].item() < dense["total_movers_mean"].item()


def test_by_selects_levels_and_rejects_unknown(fitted):
    model, ds = fitted
    country = predict_totals(model, ds, by="country", draws=20)
    assert set(country.dims) == {"country"}
    assert {"country_net_mean", "country_internal_q95"} <= set(country.data_vars)
    assert not any(name.startswith(("unit_", "total_")) for name in country.data_vars)
    assert set(LEVELS) == {"unit", "country", "country_pair", "total"}
    with pytest.raises(ModelConfigError, match=r"by='region'.*use any of"):
        predict_totals(model, ds, by="region")


def test_streaming_never_holds_every_pair_of_every_draw(fitted):
    """60 units x 300 draws: all flow draws would be 8.6 MB; blocks of 2 origins keep far less."""
    model, _ = fitted
    big, _ = simulate_flow_dataset(60, 3, seed=8)
    n, s = big.sizes["unit"], model.posterior.sizes["chain"] * model.posterior.sizes["draw"]
    full = n * n * s * 8
    tracemalloc.start()
    predict_totals(model, big, by=("unit", "total"), block_size=2)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < full / 3, f"peak {peak / 1e6:.1f} MB vs {full / 1e6:.1f} MB for every draw"
