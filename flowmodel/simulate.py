"""Simulated worlds with known parameters, shared by tests, docs, benchmarks and the demo.

:func:`simulate_flow_dataset` makes an in-memory FlowDataset in a second (no
files); :func:`simulate_world` (below) writes the full file-based world of
DESIGN §5b — polygons, rasters, census and CDR — whose flows come from the
same generating process, :func:`gravity_log_rate`.

Parameter names follow DESIGN §4.0; coefficients are on the raw covariate
scale, with terms named ``origin:<var>``, ``destination:<var>``,
``log_distance``, ``cross_border`` and ``contiguous``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["DEFAULT_TRUTH", "gravity_log_rate", "simulate_flow_dataset"]

#: Default generating parameters of the gravity process (raw covariate scale).
DEFAULT_TRUTH: dict[str, Any] = {
    "intercept": -7.5,
    "beta": {
        "origin:log_population": 0.8,
        "destination:log_population": 0.7,
        "destination:night_lights_per_capita": 0.5,
        "log_distance": -1.4,
        "cross_border": -1.5,
    },
    "sigma_country": 0.4,
    "phi": 5.0,
}


def _term_values(term: str, unit: pd.DataFrame, pair: Mapping[str, np.ndarray]) -> np.ndarray:
    n = len(unit)
    if term.startswith("origin:"):
        return np.broadcast_to(unit[term.split(":", 1)[1]].to_numpy()[:, None], (n, n))
    if term.startswith("destination:"):
        return np.broadcast_to(unit[term.split(":", 1)[1]].to_numpy()[None, :], (n, n))
    if term == "log_distance":
        return np.log(pair["distance_km"])
    return np.asarray(pair[term], dtype=float)


def gravity_log_rate(
    unit: pd.DataFrame,
    pair: Mapping[str, np.ndarray],
    truth: Mapping[str, Any],
    country_effect: np.ndarray,
) -> np.ndarray:
    """Log expected flow ``eta`` (origin x destination) of the generating gravity process.

    Parameters
    ----------
    unit
        One row per unit with the covariates named by the ``beta`` terms.
    pair
        ``distance_km`` and the other pair terms, each ``(n, n)``.
    truth
        ``intercept`` and ``beta`` (term -> coefficient, raw scale).
    country_effect
        Per-unit origin-country effect, shape ``(n,)``.
    """
    eta = truth["intercept"] + country_effect[:, None] * np.ones(len(unit))[None, :]
    for term, coef in truth["beta"].items():
        eta = eta + coef * _term_values(term, unit, pair)
    np.fill_diagonal(eta, np.nan)
    return eta


def simulate_flow_dataset(
    n_units: int = 150,
    n_countries: int = 3,
    *,
    seed: int = 0,
    truth: Mapping[str, Any] | None = None,
    likelihood: str = "negbin",
    observed_countries: Sequence[str] | None = None,
    sample_fraction: float = 1.0,
    source: str = "census",
    bbox: tuple[float, float, float, float] = (30.0, -6.0, 40.0, 4.0),
) -> tuple[xr.Dataset, dict[str, Any]]:
    """Simulate a FlowDataset from a known gravity process, in memory.

    Units are random points in ``bbox`` (lon/lat); countries are the Voronoi
    regions of ``n_countries`` random seeds; population is log-normal;
    night lights per capita and built-up share are correlated with it.

    Parameters
    ----------
    n_units, n_countries
        Size of the world.
    seed
        Seed of every random draw (same seed, same dataset).
    truth
        Generating parameters (default :data:`DEFAULT_TRUTH`).
    likelihood
        ``"negbin"`` (variance mu + mu²/phi) or ``"poisson"``.
    observed_countries
        Countries whose within- and outgoing pairs are observed (origin in
        them); default all.
    sample_fraction
        Census sampling fraction: observed counts ~ NB(mu · f, phi); stored as
        ``exposure_<source>``.
    source
        Name of the flow source variable (``flow_<source>``).

    Returns
    -------
    (xarray.Dataset, dict)
        The FlowDataset and the truth: parameters keyed by DESIGN §4.0 names,
        ``country_effect`` per country and ``mu`` (true expected flows, origin x
        destination, before sampling).
    """
    from flowmodel.dataset import build_dataset

    rng = np.random.default_rng(seed)
    truth = dict(DEFAULT_TRUTH if truth is None else truth)
    lon0, lat0, lon1, lat1 = bbox
    lon = rng.uniform(lon0, lon1, n_units)
    lat = rng.uniform(lat0, lat1, n_units)
    seeds = np.column_stack([rng.uniform(lon0, lon1, n_countries), rng.uniform(lat0, lat1, n_countries)])
    nearest = np.argmin((lon[:, None] - seeds[:, 0]) ** 2 + (lat[:, None] - seeds[:, 1]) ** 2, axis=1)
    codes = np.array([f"C{k:02d}" for k in range(n_countries)])
    # every country gets at least one unit
    for k in range(n_countries):
        if not np.any(nearest == k):
            nearest[rng.integers(n_units)] = k
    country = codes[nearest]
    log_pop = rng.normal(11.0, 1.0, n_units)
    population = np.round(np.exp(log_pop))
    income = rng.normal(0.0, 1.0, n_countries)[nearest] + rng.normal(0, 0.5, n_units)
    nlpc = np.exp(-3.0 + 0.3 * (log_pop - 11.0) + 0.5 * income)
    built_up = 1.0 / (1.0 + np.exp(-(log_pop - 12.0)))
    ids = np.array([f"U{i:04d}" for i in range(n_units)])
    units = pd.DataFrame(
        {
            "unit_id": ids,
            "country": country,
            "population": population,
            "lon": lon,
            "lat": lat,
            "night_lights_per_capita": nlpc,
            "built_up": built_up,
        }
    )
    ds = build_dataset(units)
    unit = units.set_index("unit_id")
    unit["log_population"] = np.log(unit["population"])
    pair = {
        "distance_km": ds["distance_km"].values,
        "cross_border": ds["cross_border"].values.astype(float),
    }
    if "contiguous" in ds:
        pair["contiguous"] = ds["contiguous"].values.astype(float)
    effects = rng.normal(0.0, truth["sigma_country"], n_countries)
    eta = gravity_log_rate(unit, pair, truth, effects[nearest])
    mu = np.exp(eta)
    mean = np.nan_to_num(mu) * sample_fraction
    if likelihood == "poisson":
        y = rng.poisson(mean).astype(float)
    else:
        phi = truth["phi"]
        y = rng.poisson(rng.gamma(phi, mean / phi, size=mean.shape)).astype(float)
    observed = np.ones(n_units, dtype=bool) if observed_countries is None else np.isin(country, observed_countries)
    y[~observed, :] = np.nan
    np.fill_diagonal(y, np.nan)
    ds[f"flow_{source}"] = (("origin", "destination"), y)
    if sample_fraction != 1.0:
        ds[f"exposure_{source}"] = ("unit", np.full(n_units, float(sample_fraction)))
    ds.attrs.update(simulated=1, seed=seed, likelihood=likelihood)
    out_truth: dict[str, Any] = {
        **truth,
        "country_effect": dict(zip(codes.tolist(), effects.tolist(), strict=True)),
        "mu": xr.DataArray(mu, dims=("origin", "destination"), coords={"origin": ids, "destination": ids}),
    }
    return ds, out_truth
