"""Fixtures of the model tests: small simulated worlds, the Austria data, fitted models."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from flowmodel.dataset import build_dataset
from flowmodel.simulate import simulate_flow_dataset
from tests.conftest import require_data

FLAT = {
    "intercept": {"dist": "Normal", "mu": 0.0, "sigma": 100.0},
    "beta": {"dist": "Normal", "mu": 0.0, "sigma": 100.0},
}
DEST_COVS = ["log_population", "night_lights_per_capita"]


def austria_dataset():
    """spint's Austria test arrays as a FlowDataset (unit vars o_var, d_var; distance_km)."""
    path = require_data("austria_migration_spint", "austria_spint_test_arrays.csv")
    table = pd.read_csv(path)
    o_var = table.groupby("origin")["o_var"].first()
    d_var = table.groupby("destination")["d_var"].first().reindex(o_var.index)
    units = pd.DataFrame(
        {
            "unit_id": o_var.index,
            "country": "AT",
            "population": 1.0,
            "o_var": o_var.to_numpy(),
            "d_var": d_var.to_numpy(),
        }
    )
    pairs = table[["origin", "destination"]].assign(distance_km=table["dij"])
    flows = {"census": table[["origin", "destination"]].assign(count=table["flow"])}
    return build_dataset(units, pairs=pairs, flows=flows)


@pytest.fixture(scope="session")
def austria():
    return austria_dataset()


@pytest.fixture(scope="session")
def sim_small():
    """60 units, 3 countries, NB flows (seed 1)."""
    return simulate_flow_dataset(60, 3, seed=1)


@pytest.fixture(scope="session")
def gravity_laplace(sim_small):
    """A GravityModel fitted by Laplace on ``sim_small`` (400 draws)."""
    from flowmodel.models import GravityModel

    ds, _ = sim_small
    model = GravityModel(destination_covariates=DEST_COVS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=200, chains=2)
    return model


def radiation_world(
    n_units: int = 60, *, tau: float = 0.02, alpha=None, phi: float = 5.0, seed: int = 2
):
    """A simulated dataset whose flows follow the radiation law (for tau recovery and LOO)."""
    from flowmodel.models.radiation import intervening_rows, radiation_log_probability

    ds, _ = simulate_flow_dataset(n_units, 3, seed=seed)
    m = ds["population"].values
    dist = ds["distance_km"].values
    s = intervening_rows(m, dist, np.arange(n_units))
    with np.errstate(invalid="ignore", divide="ignore"):
        logp = radiation_log_probability(m[:, None], m[None, :], s, m.sum(), alpha)
    mu = tau * m[:, None] * np.exp(logp)
    rng = np.random.default_rng(seed)
    mean = np.nan_to_num(mu)
    y = rng.poisson(rng.gamma(phi, mean / phi)).astype(float)
    np.fill_diagonal(y, np.nan)
    ds["flow_census"] = (("origin", "destination"), y)
    return ds
