"""Streamed prediction: dask == numpy, memory bound, unseen units/countries, save/load."""

from __future__ import annotations

import tracemalloc
import warnings

import numpy as np
import pytest
import xarray as xr

from flowmodel.exceptions import ModelConfigError, ModelLoadError
from flowmodel.models import FlowModel, GravityModel, load_model
from flowmodel.predict import predict_flows, quantile_name
from flowmodel.simulate import simulate_flow_dataset


def test_quantile_names():
    assert [quantile_name(q) for q in (0.05, 0.25, 0.5, 0.75, 0.95)] == [
        "q05",
        "q25",
        "q50",
        "q75",
        "q95",
    ]
    assert quantile_name(0.025) == "q02_5"


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


def test_base_rejects_unknown_option():
    with pytest.raises(ModelConfigError, match=r"unknown option\(s\) \['foo'\]"):
        FlowModel(foo=1)


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
