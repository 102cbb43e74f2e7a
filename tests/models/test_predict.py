"""Streamed prediction: dask == numpy, memory bound, unseen units/countries, save/load."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
import xarray as xr

from flowmodel.exceptions import ModelConfigError, ModelLoadError
from flowmodel.models import FlowModel, GravityModel, load_model
from flowmodel.predict import predict_flows
from flowmodel.simulate import simulate_flow_dataset


def test_predict_dataset_layout(gravity_laplace, sim_small):
    ds, _ = sim_small
    pred = gravity_laplace.predict(ds)
    assert list(pred.data_vars) == ["mean", "q05", "q25", "q50", "q75", "q95"]
    assert pred["mean"].dims == ("origin", "destination")
    n = ds.sizes["unit"]
    assert np.isnan(pred["q50"].values[np.arange(n), np.arange(n)]).all()
    off = ~np.eye(n, dtype=bool)
    q = np.stack([pred[v].values[off] for v in ["q05", "q25", "q50", "q75", "q95"]])
    assert (np.diff(q, axis=0) >= 0).all()


def test_dask_equals_numpy_and_block_size_does_not_matter(gravity_laplace, sim_small):
    ds, _ = sim_small
    ref = gravity_laplace.predict(ds, use_dask=False, block_size=60)
    lazy = gravity_laplace.predict(ds, use_dask=True, block_size=7)
    assert hasattr(lazy["mean"].data, "dask")
    small = gravity_laplace.predict(ds, use_dask=False, block_size=7)
    xr.testing.assert_allclose(lazy.compute(), small)
    # the expected-value summaries do not depend on the blocking (the noise seeds do)
    xr.testing.assert_allclose(ref["mean"], small["mean"])


def test_dask_backed_input_dataset(gravity_laplace, sim_small):
    ds, _ = sim_small
    chunked = ds.chunk({"origin": 16})
    xr.testing.assert_allclose(
        gravity_laplace.predict(chunked, block_size=10, use_dask=True).compute(),
        gravity_laplace.predict(ds, block_size=10, use_dask=False),
    )


def test_predict_posterior_draws(gravity_laplace, sim_small):
    ds, _ = sim_small
    draws = gravity_laplace.predict_posterior(ds, draws=20)
    assert draws.dims == ("chain", "draw", "origin", "destination")
    assert draws.sizes["draw"] == 20 and draws.sizes["chain"] == 2
    pred = gravity_laplace.predict(ds, kind="mean", draws=20)
    np.testing.assert_allclose(draws.mean(("chain", "draw")), pred["mean"], rtol=1e-10)
    lazy = gravity_laplace.predict_posterior(ds, draws=20, use_dask=True)
    np.testing.assert_allclose(lazy.values, draws.values)


def test_log_rate_draws_match_posterior_predictive_mean(gravity_laplace, sim_small):
    ds, _ = sim_small
    post = gravity_laplace.posterior
    oi, dj = np.array([0, 1, 5]), np.array([2, 0, 9])
    eta = gravity_laplace._log_rate_draws(post, ds, oi, dj)
    assert eta.shape == (post.sizes["chain"] * post.sizes["draw"], 3)
    full = gravity_laplace.predict(ds, kind="mean", quantiles=())["mean"].values
    np.testing.assert_allclose(np.exp(eta).mean(0), full[oi, dj], rtol=1e-10)


def test_unseen_units_and_countries(gravity_laplace):
    """A new world (other units, a country never observed) gets finite, wider intervals."""
    new, _ = simulate_flow_dataset(30, 4, seed=99)
    new = new.assign_coords(
        unit=[f"N{i}" for i in range(30)],
        origin=[f"N{i}" for i in range(30)],
        destination=[f"N{i}" for i in range(30)],
    )
    pred = gravity_laplace.predict(new, kind="mean", quantiles=(0.05, 0.95))
    off = ~np.eye(30, dtype=bool)
    assert np.isfinite(pred["q95"].values[off]).all()
    unseen = new["country"].values == "C03"
    assert unseen.any()
    width = np.log(pred["q95"].values) - np.log(pred["q05"].values)
    seen_rows = width[~unseen][:, ~unseen]
    unseen_rows = width[unseen][:, ~unseen]
    # between-country uncertainty: unseen-country origins have wider (log) intervals
    assert np.nanmedian(unseen_rows) > np.nanmedian(seen_rows)


def test_predict_memory_bound_n1000(gravity_laplace):
    """N = 1000, 50 draws: all draws would be 400 MB (float64); the stream peaks at ~145 MB."""
    big, _ = simulate_flow_dataset(1000, 3, seed=5)
    bound = 250 * 2**20
    tracemalloc.start()
    try:
        pred = predict_flows(
            gravity_laplace, big, draws=25, block_size=50, dtype=np.float32, use_dask=False
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert pred["mean"].shape == (1000, 1000)
    all_draws = 1000 * 1000 * 50 * 8
    assert peak < bound < all_draws


def test_save_load_roundtrip_identical_predictions(gravity_laplace, sim_small, tmp_path):
    ds, _ = sim_small
    path = gravity_laplace.save(tmp_path / "posterior.nc")
    loaded = GravityModel.load(path)
    assert loaded.model_config == gravity_laplace.model_config
    xr.testing.assert_equal(loaded.predict(ds, seed=3), gravity_laplace.predict(ds, seed=3))
    assert type(load_model(path)) is GravityModel
    attrs = xr.open_datatree(path, engine="h5netcdf").attrs
    assert attrs["flowmodel_model_class"] == "GravityModel"
    assert len(attrs["flowmodel_data_fingerprint"]) == 16


def test_load_refuses_other_class_and_version(gravity_laplace, tmp_path):
    from flowmodel.models import RadiationModel

    path = gravity_laplace.save(tmp_path / "posterior.nc")
    with pytest.raises(ModelLoadError, match="holds a GravityModel, not a RadiationModel"):
        RadiationModel.load(path)
    tree = xr.open_datatree(path, engine="h5netcdf").load()
    tree.attrs["flowmodel_version"] = "0.0.1"
    tree.to_netcdf(tmp_path / "old.nc", engine="h5netcdf")
    with pytest.raises(ModelLoadError, match=r"written by flowmodel 0\.0\.1"):
        GravityModel.load(tmp_path / "old.nc")
    with pytest.raises(ModelLoadError, match="no such posterior file"):
        GravityModel.load(tmp_path / "missing.nc")


def test_predict_bad_kind_and_sparse(gravity_laplace, sim_small):
    ds, _ = sim_small
    with pytest.raises(ModelConfigError, match="kind='median' is not valid"):
        gravity_laplace.predict(ds, kind="median")


class _MinimalModel(FlowModel):
    """The smallest concrete FlowModel: exercises the base's shared option check."""

    def _latent_field(self):
        from flowmodel.models.latent import GravityField

        return GravityField()

    def _observation_models(self, data):
        return []


def test_base_rejects_unknown_option():
    with pytest.raises(ModelConfigError, match=r"unknown option\(s\) \['foo'\]"):
        _MinimalModel(foo=1)


def test_base_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        FlowModel()


def test_map_backend_gives_single_draw(sim_small):
    ds, _ = sim_small
    model = GravityModel(likelihood="poisson")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = model.fit(ds, backend="map", random_seed=1)
    assert dict(idata["posterior"].sizes)["draw"] == 1
    pred = model.predict(ds, quantiles=(0.5,))
    assert np.isfinite(pred["mean"].values[0, 1])


def test_sorted_quantiles_equal_numpy():
    from flowmodel.predict import sorted_quantiles

    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, (37, 4, 5)).astype(float)
    x[:, 1, 1] = np.nan
    qs = [0.05, 0.25, 0.5, 0.75, 0.95, 0.0, 1.0]
    np.testing.assert_allclose(sorted_quantiles(x, qs), np.quantile(x, qs, axis=0))


# ----------------------------------------------------------------------------- sparse pair sets
def _gather(pred: xr.Dataset, sparse: xr.Dataset) -> xr.Dataset:
    """Dense predictions at the pairs of ``sparse`` (dim ``pair``)."""
    return pred.sel(
        origin=xr.DataArray(sparse["origin"].values, dims="pair"),
        destination=xr.DataArray(sparse["destination"].values, dims="pair"),
    ).drop_vars(["origin", "destination"])


def test_sparse_predict_equals_dense_gathered(gravity_laplace, sim_small):
    from flowmodel.pairs import sparse_pairs

    ds, _ = sim_small
    sp = sparse_pairs(ds, k=6, include_observed=False)
    dense = gravity_laplace.predict(ds, kind="mean", draws=40, seed=4)
    pred = gravity_laplace.predict(sp, kind="mean", draws=40, seed=4, block_size=37)
    assert list(pred.data_vars) == ["mean", "q05", "q25", "q50", "q75", "q95"]
    assert pred["mean"].dims == ("pair",)
    np.testing.assert_array_equal(pred["origin"].values, sp["origin"].values)
    np.testing.assert_array_equal(pred["destination"].values, sp["destination"].values)
    gathered = _gather(dense, sp)
    for name in pred.data_vars:
        np.testing.assert_allclose(pred[name].values, gathered[name].values, rtol=1e-10)
    # predictive: the mean is the posterior mean of mu either way (noise is seeded per block)
    noisy = gravity_laplace.predict(sp, draws=40, seed=4, quantiles=(0.5,))
    np.testing.assert_allclose(noisy["mean"].values, gathered["mean"].values, rtol=1e-10)
    assert np.isfinite(noisy["q50"].values).all()
    # posterior draws, and the exposure scale
    draws = gravity_laplace.predict_posterior(sp, draws=10)
    assert draws.dims == ("chain", "draw", "pair")
    dense_draws = gravity_laplace.predict_posterior(ds, draws=10)
    np.testing.assert_allclose(draws.values, _gather(dense_draws.to_dataset(), sp)["flow"].values)
    exp_d = gravity_laplace.predict(ds, kind="mean", quantiles=(), exposure="census")
    exp_s = gravity_laplace.predict(sp, kind="mean", quantiles=(), exposure="census")
    np.testing.assert_allclose(exp_s["mean"].values, _gather(exp_d, sp)["mean"].values)


def test_sparse_numpy_equals_dask(gravity_laplace, sim_small):
    from flowmodel.pairs import sparse_pairs

    ds, _ = sim_small
    sp = sparse_pairs(ds, k=5)
    ref = gravity_laplace.predict(sp, use_dask=False, block_size=50, draws=50)
    lazy = gravity_laplace.predict(sp, use_dask=True, block_size=50, draws=50)
    assert hasattr(lazy["q50"].data, "dask")
    xr.testing.assert_allclose(lazy.compute(), ref)
    one_block = gravity_laplace.predict(sp, use_dask=False, draws=50)
    xr.testing.assert_allclose(one_block["mean"], ref["mean"])
    d_np = gravity_laplace.predict_posterior(sp, draws=5, kind="predictive", use_dask=False)
    d_da = gravity_laplace.predict_posterior(sp, draws=5, kind="predictive", use_dask=True)
    assert hasattr(d_da.data, "dask")
    np.testing.assert_allclose(d_da.values, d_np.values)


def test_fit_sparse_equals_dense_restricted():
    """Fitting the sparse form == fitting the dense one with only the same pairs observed."""
    from flowmodel.pairs import sparse_pairs

    ds, _ = simulate_flow_dataset(40, 3, seed=3)
    sp = sparse_pairs(ds, k=8, include_observed=False)
    keep = xr.zeros_like(ds["flow_census"], dtype=bool)
    keep.loc[{"origin": sp["origin"], "destination": sp["destination"]}] = True
    restricted = ds.assign(flow_census=ds["flow_census"].where(keep))
    assert int(restricted["flow_census"].notnull().sum()) == int(sp["flow_census"].notnull().sum())
    fits = {}
    for name, data in {"sparse": sp, "dense": restricted}.items():
        # no country effects: the MAP of a hierarchical sigma_country runs to 0 (a funnel),
        # where the optimiser's end point depends on summation order, not on the data
        model = GravityModel(destination_covariates=["log_population"], country_effects=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(data, backend="map", random_seed=1)
        fits[name] = model
    post_s, post_d = fits["sparse"].posterior, fits["dense"].posterior
    for var in ("intercept", "beta", "phi", "intercept_raw", "beta_raw"):
        np.testing.assert_allclose(
            post_s[var].mean(("chain", "draw")).values,
            post_d[var].mean(("chain", "draw")).values,
            rtol=1e-4,
            atol=1e-6,
            err_msg=var,
        )
    assert fits["sparse"].fit_meta["latent"]["terms"] == fits["dense"].fit_meta["latent"]["terms"]
    # a sparse-fitted model predicts dense and sparse pair sets alike
    ps = fits["sparse"].predict(sp, kind="mean", quantiles=())
    pd_ = fits["sparse"].predict(ds, kind="mean", quantiles=())
    np.testing.assert_allclose(ps["mean"].values, _gather(pd_, sp)["mean"].values, rtol=1e-10)
    np.testing.assert_allclose(
        ps["mean"].values,
        fits["dense"].predict(sp, kind="mean", quantiles=())["mean"].values,
        rtol=1e-4,
    )


def test_sparse_predict_errors_and_diagonal(gravity_laplace, sim_small):
    from flowmodel.pairs import sparse_pairs

    ds, _ = sim_small
    sp = sparse_pairs(ds, k=3, include_observed=False)
    with pytest.raises(ModelConfigError, match="pair variable 'distance_km'"):
        gravity_laplace.predict(sp.drop_vars("distance_km"), quantiles=())
    bad = sp.assign_coords(
        origin=("pair", np.where(np.arange(sp.sizes["pair"]) == 0, "XX", sp["origin"].values))
    )
    with pytest.raises(ModelConfigError, match="not in 'unit'"):
        gravity_laplace.predict(bad, quantiles=())
    # a diagonal pair is NaN, as on the dense diagonal
    diag = sp.assign_coords(
        destination=(
            "pair",
            np.where(
                np.arange(sp.sizes["pair"]) == 0, sp["origin"].values, sp["destination"].values
            ),
        )
    )
    pred = gravity_laplace.predict(diag, quantiles=(0.5,))
    assert np.isnan(pred["mean"].values[0]) and np.isnan(pred["q50"].values[0])
    assert np.isfinite(pred["mean"].values[1:]).all()
    constrained = GravityModel(constraint="production")
    constrained.fit_meta = {"source": "census"}
    constrained._idata = gravity_laplace.idata
    with pytest.raises(ModelConfigError, match="constraint='production'"):
        constrained.predict(sp)


def test_sparse_predict_radiation_needs_gathered_intervening_population():
    from flowmodel.models import RadiationModel
    from flowmodel.pairs import intervening_population, sparse_pairs

    ds, _ = simulate_flow_dataset(30, 2, seed=4)
    model = RadiationModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=20, chains=1)
    with pytest.raises(ModelConfigError, match="'intervening_population'"):
        model.predict(sparse_pairs(ds, k=4))
    s = intervening_population(ds["population"].values, ds["distance_km"].values)
    sp = sparse_pairs(ds.assign(intervening_population=(("origin", "destination"), s)), k=4)
    pred = model.predict(sp, kind="mean", block_size=25)
    dense = model.predict(ds, kind="mean")
    for name in pred.data_vars:
        np.testing.assert_allclose(pred[name].values, _gather(dense, sp)[name].values, rtol=1e-10)


def test_quantiles_do_not_depend_on_block_size_or_dask(gravity_laplace, sim_small):
    """Noise is drawn per origin row (per chunk of sparse pairs), not per block."""
    from flowmodel.pairs import sparse_pairs

    ds, _ = sim_small
    kw = {"quantiles": (0.05, 0.5, 0.99), "draws": 50, "seed": 7}
    base = gravity_laplace.predict(ds, block_size=60, use_dask=False, **kw)
    quantiles = ["q05", "q50", "q99"]
    for size, dask in ((1, False), (7, False), (13, True)):
        other = gravity_laplace.predict(ds, block_size=size, use_dask=dask, **kw).compute()
        xr.testing.assert_identical(base[quantiles], other[quantiles])  # the same draws
        xr.testing.assert_allclose(base["mean"], other["mean"], rtol=1e-13)  # summation order
    sp = sparse_pairs(ds, k=40, include_observed=True)
    assert sp.sizes["pair"] > 2048
    one = gravity_laplace.predict(sp, block_size=1, use_dask=False, **kw)
    big = gravity_laplace.predict(sp, block_size=5000, use_dask=False, **kw)
    xr.testing.assert_identical(one[quantiles], big[quantiles])


def test_posterior_file_keeps_a_labelled_float32_loglik_or_its_loo(
    sim_small, tmp_path, monkeypatch
):
    """Small fits store the pointwise log-likelihood (float32, labelled cells); above the size
    limit the file holds PSIS-LOO per cell instead, so it stays small."""
    from flowmodel.models import base

    ds, _ = sim_small
    model = GravityModel(destination_covariates=["log_population"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=100, chains=2)
    ll = model.idata["log_likelihood"]["flow"]
    assert ll.dtype == np.float32 and ll.dims == ("chain", "draw", "cell")
    assert {"source", "origin", "destination"} <= set(ll.coords)
    small = model.save(tmp_path / "small.nc")
    monkeypatch.setattr(base, "LOG_LIKELIHOOD_MAX_VALUES", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=100, chains=2)
    assert "log_likelihood" not in model.idata.children
    loo = model.idata["loo"].to_dataset()
    assert set(loo.data_vars) == {"elpd_i", "pareto_k"} and loo.sizes["cell"] == ll.sizes["cell"]
    assert "from 200 of the 200 draws" in loo.attrs["note"]
    # at most LOO_MAX_DRAWS draws enter the per-cell LOO (its cost grows with the draws);
    # with every draw kept it equals the LOO of the full log-likelihood
    monkeypatch.setattr(base, "LOO_MAX_DRAWS", 50)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=100, chains=2)
    thinned = model.idata["loo"].to_dataset()
    assert "from 50 of the 200 draws" in thinned.attrs["note"]
    full = base.pointwise_loo(model.log_likelihood(ds))
    np.testing.assert_allclose(loo["elpd_i"].values, full["elpd_i"].values, rtol=1e-5)
    big = model.save(tmp_path / "big.nc")
    assert big.stat().st_size < small.stat().st_size / 3
    # above LOO_MAX_CELLS fit stores neither, and says so (ArviZ's PSIS is ~1-2 ms a cell)
    monkeypatch.setattr(base, "LOO_MAX_CELLS", 100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=100, chains=2)
    assert "loo" not in model.idata.children and "log_likelihood" not in model.idata.children
    assert (
        model.fit_meta["loo"].startswith("not computed:")
        and "pointwise_loo" in model.fit_meta["loo"]
    )
