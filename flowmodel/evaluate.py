"""How good are the flows? Metrics, baselines and cross-validation.

Metrics (REFERENCES.md) work on numpy arrays or :class:`xarray.DataArray`
``(origin, destination)`` (or a sparse ``pair`` dim with ``origin`` /
``destination`` coordinates). They are NaN-aware: a pair counts only where
the observed value and every prediction involved are finite, and the diagonal
(origin == destination) is always excluded — for plain 2-D square numpy
arrays the main diagonal is taken to be it.

Baselines are the two comparators every table shows beside the Bayesian
models: a maximum-likelihood gravity model (a statsmodels Poisson GLM with the
same covariates, :func:`glm_baseline`) and the parameter-free radiation model
(Simini et al. 2012, :func:`radiation_baseline`). Both return a Dataset shaped
like :meth:`FlowModel.predict`'s: ``mean`` and ``q05`` ... ``q95``
over ``(origin, destination)``.

:func:`cross_validate` refits a model (a fresh clone per fold) with pairs held
out — random pairs, one unit at a time or one country at a time — and scores
the held-out pairs, with the baselines fitted on the same training pairs.
"""

from __future__ import annotations

import inspect
import json
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import xarray as xr
from scipy import stats

from flowmodel.dataset import flow_sources, is_sparse
from flowmodel.exceptions import DataContractError, FlowModelError, ModelConfigError
from flowmodel.naming import is_cdr_source, quantile_name
from flowmodel.progress import progress_bar

__all__ = [
    "DEFAULT_QUANTILES",
    "compare_methods",
    "cpc",
    "cross_validate",
    "deviance",
    "evaluate",
    "flow_metrics",
    "glm_baseline",
    "holdout_folds",
    "interval_coverage",
    "interval_width",
    "last_period_cv",
    "last_period_split",
    "log_rmse",
    "mae",
    "pearson_log",
    "persistence_baseline",
    "quantile_name",
    "radiation_baseline",
    "spearman_log",
    "summarize_cv",
]

#: Quantiles of a prediction Dataset.
DEFAULT_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)

#: (lower, upper, nominal probability) of the central intervals scored by :func:`flow_metrics`.
INTERVALS: tuple[tuple[str, str, float], ...] = (("q25", "q75", 0.5), ("q05", "q95", 0.9))

ArrayLike = np.ndarray | xr.DataArray | Sequence[float]


# ---------------------------------------------------------------------- alignment
def _diagonal_mask(a: ArrayLike) -> np.ndarray:
    """Boolean mask of the diagonal (origin == destination) in the shape of ``a``."""
    if isinstance(a, xr.DataArray):
        dims = a.dims
        if "origin" in dims and "destination" in dims:
            o = a["origin"].values.astype(str)
            d = a["destination"].values.astype(str)
            eq = xr.DataArray(
                o[:, None] == d[None, :],
                dims=("origin", "destination"),
                coords={"origin": a["origin"], "destination": a["destination"]},
            )
            return np.asarray(eq.broadcast_like(a).transpose(*dims).values)
        if "pair" in dims and "origin" in a.coords and "destination" in a.coords:
            eq = a["origin"] == a["destination"]
            return np.asarray(eq.broadcast_like(a).transpose(*dims).values)
        return np.zeros(a.shape, dtype=bool)
    arr = np.asarray(a)
    if arr.ndim == 2 and arr.shape[0] == arr.shape[1]:
        return np.eye(arr.shape[0], dtype=bool)
    return np.zeros(arr.shape, dtype=bool)


def _paired(*arrays: ArrayLike) -> list[np.ndarray]:
    """Align the arrays, drop the diagonal and every pair where any is non-finite; flatten."""
    if all(isinstance(a, xr.DataArray) for a in arrays):
        aligned = xr.align(*arrays, join="inner")
        dims = aligned[0].dims
        aligned = [a.transpose(*dims) for a in aligned]
        diag = _diagonal_mask(aligned[0])
        values = [np.asarray(a.values, dtype=float) for a in aligned]
    else:
        values = [
            np.asarray(a.values if isinstance(a, xr.DataArray) else a, dtype=float) for a in arrays
        ]
        shape = values[0].shape
        for v in values[1:]:
            if v.shape != shape:
                raise ValueError(
                    f"arrays have different shapes {[v.shape for v in values]}; "
                    "pass DataArrays (aligned by coordinates) or arrays of one shape"
                )
        first = arrays[0]
        diag = _diagonal_mask(first if isinstance(first, xr.DataArray) else values[0])
    keep = ~diag
    for v in values:
        keep &= np.isfinite(v)
    return [v[keep] for v in values]


# -------------------------------------------------------------------------- metrics
def cpc(observed: ArrayLike, predicted: ArrayLike) -> float:
    r"""Compute the common part of commuters, CPC (Lenormand et al. 2012).

    .. math:: \mathrm{CPC} = \frac{2 \sum_{ij} \min(T_{ij}, \hat T_{ij})}
              {\sum_{ij} T_{ij} + \sum_{ij} \hat T_{ij}}

    Parameters
    ----------
    observed, predicted
        Flows ``(origin, destination)``; NaN pairs and the diagonal are ignored.

    Returns
    -------
    float
        In [0, 1]: 1 for identical flows, 0 for disjoint ones; NaN when both
        totals are 0 or no pair is finite.
    """
    y, yhat = _paired(observed, predicted)
    total = y.sum() + yhat.sum()
    if y.size == 0 or total == 0:
        return float("nan")
    return float(2.0 * np.minimum(y, yhat).sum() / total)


def log_rmse(observed: ArrayLike, predicted: ArrayLike) -> float:
    """Root mean squared error of log(1 + flow): ``sqrt(mean((log1p(ŷ) - log1p(y))²))``."""
    y, yhat = _paired(observed, predicted)
    if y.size == 0:
        return float("nan")
    return float(np.sqrt(np.mean((np.log1p(yhat) - np.log1p(y)) ** 2)))


def mae(observed: ArrayLike, predicted: ArrayLike) -> float:
    """Mean absolute error in persons: ``mean(|ŷ - y|)``."""
    y, yhat = _paired(observed, predicted)
    if y.size == 0:
        return float("nan")
    return float(np.mean(np.abs(yhat - y)))


def _corr(y: np.ndarray, yhat: np.ndarray, kind: str) -> float:
    if y.size < 2 or np.all(y == y[0]) or np.all(yhat == yhat[0]):
        return float("nan")
    fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
    return float(fn(np.log1p(y), np.log1p(yhat))[0])


def pearson_log(observed: ArrayLike, predicted: ArrayLike) -> float:
    """Pearson correlation of log(1 + observed) and log(1 + predicted); NaN if either is constant."""
    y, yhat = _paired(observed, predicted)
    return _corr(y, yhat, "pearson")


def spearman_log(observed: ArrayLike, predicted: ArrayLike) -> float:
    """Spearman rank correlation of log(1 + flow) (equal to that of the raw flows)."""
    y, yhat = _paired(observed, predicted)
    return _corr(y, yhat, "spearman")


def deviance(observed: ArrayLike, predicted: ArrayLike) -> float:
    """Poisson deviance ``2 Σ [y log(y / μ) - (y - μ)]`` (with ``0 log 0 = 0``).

    ``inf`` where a positive count meets a zero prediction. This is the
    deviance statsmodels and spint report for a Poisson GLM.
    """
    y, mu = _paired(observed, predicted)
    if y.size == 0:
        return float("nan")
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(y > 0, y * np.log(y / mu), 0.0)
    term = np.where((y > 0) & (mu <= 0), np.inf, term)
    return float(2.0 * np.sum(term - (y - mu)))


def interval_coverage(observed: ArrayLike, lower: ArrayLike, upper: ArrayLike) -> float:
    """Share of observed flows inside their predictive interval ``[lower, upper]`` (closed)."""
    y, lo, hi = _paired(observed, lower, upper)
    if y.size == 0:
        return float("nan")
    return float(np.mean((y >= lo) & (y <= hi)))


def interval_width(lower: ArrayLike, upper: ArrayLike) -> float:
    """Mean width ``upper - lower`` of the predictive intervals (persons)."""
    lo, hi = _paired(lower, upper)
    if lo.size == 0:
        return float("nan")
    return float(np.mean(hi - lo))


def compare_methods(observed: ArrayLike, predictions: Mapping[str, Any]) -> pd.DataFrame:
    """CPC, log-RMSE and 90% interval coverage of several predictions of the same cells.

    Parameters
    ----------
    observed
        One observed value per cell (e.g. held-out reports).
    predictions
        ``label -> prediction``: a point prediction per cell (array or Series, NaN
        where the method has none, e.g. no report the year before), or a DataFrame
        with ``q05``, ``q50`` and ``q95`` (median and 90% interval).

    Returns
    -------
    pandas.DataFrame
        One row per method: ``method``, ``n`` (the cells it predicts), ``CPC``,
        ``log-RMSE`` and ``90% coverage`` (NaN without an interval). Each method
        is scored on the cells it predicts.
    """
    obs = np.asarray(observed, dtype=float)
    rows = []
    for label, pred in predictions.items():
        if isinstance(pred, pd.DataFrame):
            point, lo, hi = (pred[c].to_numpy(dtype=float) for c in ("q50", "q05", "q95"))
        else:
            point, lo, hi = np.asarray(pred, dtype=float), None, None
        ok = np.isfinite(point) & np.isfinite(obs)
        rows.append(
            {
                "method": label,
                "n": int(ok.sum()),
                "CPC": cpc(obs[ok], point[ok]),
                "log-RMSE": log_rmse(obs[ok], point[ok]),
                "90% coverage": np.nan
                if lo is None or hi is None
                else interval_coverage(obs[ok], lo[ok], hi[ok]),
            }
        )
    return pd.DataFrame(rows)


def flow_metrics(observed: ArrayLike, predictions: xr.Dataset) -> dict[str, float]:
    """Every metric of one prediction against observed flows.

    Parameters
    ----------
    observed
        Observed flows ``(origin, destination)`` (NaN = not observed; those
        pairs and the diagonal are skipped).
    predictions
        Dataset with ``mean`` and, where available, ``q05``, ``q25``,
        ``q75``, ``q95``; missing or all-NaN quantiles give NaN
        coverage and width.

    Returns
    -------
    dict
        ``n_pairs``, ``total_observed``, ``total_predicted``, ``cpc``,
        ``log_rmse``, ``mae``, ``pearson_log``, ``spearman_log``, ``deviance``,
        ``coverage_50``, ``width_50``, ``coverage_90``, ``width_90``
        (coverage as shares of the scored pairs, widths in persons). Pairs are
        those where the observation and the mean are finite.
    """
    if "mean" not in predictions:
        raise DataContractError(
            "predictions: no 'mean' variable. Fix: pass the Dataset returned by model.predict() "
            "or a baseline (mean, q05, q25, q50, q75, q95)."
        )
    mean = predictions["mean"]
    if not isinstance(observed, xr.DataArray):
        mean = np.asarray(mean.values)
    y, yhat = _paired(observed, mean)
    out: dict[str, float] = {
        "n_pairs": int(y.size),
        "total_observed": float(y.sum()),
        "total_predicted": float(yhat.sum()),
        "cpc": cpc(observed, mean),
        "log_rmse": log_rmse(observed, mean),
        "mae": mae(observed, mean),
        "pearson_log": pearson_log(observed, mean),
        "spearman_log": spearman_log(observed, mean),
        "deviance": deviance(observed, mean),
    }
    # score intervals on the same pairs as the point metrics
    obs_masked = (
        observed.where(np.isfinite(predictions["mean"]))
        if isinstance(observed, xr.DataArray)
        else (
            np.where(
                np.isfinite(np.asarray(predictions["mean"].values)),
                np.asarray(observed, dtype=float),
                np.nan,
            )
        )
    )
    for lower, upper, prob in INTERVALS:
        key = f"{round(prob * 100)}"
        if lower in predictions and upper in predictions:
            lo, hi = predictions[lower], predictions[upper]
            if not isinstance(observed, xr.DataArray):
                lo, hi = np.asarray(lo.values), np.asarray(hi.values)
            out[f"coverage_{key}"] = interval_coverage(obs_masked, lo, hi)
            _, lo_, hi_ = _paired(obs_masked, lo, hi)
            out[f"width_{key}"] = float(np.mean(hi_ - lo_)) if lo_.size else float("nan")
        else:
            out[f"coverage_{key}"] = float("nan")
            out[f"width_{key}"] = float("nan")
    return out


# ------------------------------------------------------------------------- helpers
def _resolve_source(data: xr.Dataset, source: str | None) -> str:
    sources = flow_sources(data)
    if source is None:
        if len(sources) == 1:
            return sources[0]
        raise DataContractError(
            f"dataset has {len(sources)} flow sources {sources}; cannot choose one. "
            "Fix: pass source=<name> (the part after 'flow_')."
        )
    if source not in sources:
        raise DataContractError(
            f"no variable 'flow_{source}' in the dataset (sources: {sources}). Fix: pass one of those as source=."
        )
    return source


def _require_dense(data: xr.Dataset, what: str) -> None:
    if is_sparse(data):
        raise DataContractError(
            f"{what} needs a dense (origin, destination) FlowDataset; got the sparse 'pair' form. "
            "Fix: build the dataset densely (build_dataset without sparse pairs) for the baselines."
        )


def _unit_covariate(data: xr.Dataset, name: str) -> np.ndarray:
    """Return unit covariate ``name``; ``log_<var>`` is the log of ``<var>`` when only that exists."""
    if name in data and data[name].dims == ("unit",):
        return np.asarray(data[name].values, dtype=float)
    if name.startswith("log_") and name[4:] in data:
        values = np.asarray(data[name[4:]].values, dtype=float)
        if np.any(values <= 0):
            bad = data["unit"].values[values <= 0]
            raise DataContractError(
                f"covariate '{name}': log of a non-positive '{name[4:]}' for units {list(bad[:10])}. "
                f"Fix: use '{name[4:]}' without the log, or fill the zeros."
            )
        return np.log(values)
    raise DataContractError(
        f"covariate '{name}' is not a unit variable of the dataset (unit variables: "
        f"{[n for n, v in data.data_vars.items() if v.dims == ('unit',)]}). "
        "Fix: add it (e.g. with zonal_covariates) or drop it from the covariates."
    )


def _exposure_matrix(data: xr.Dataset, source: str) -> np.ndarray:
    """Exposure ``(origin, destination)``: 1, or ``exposure_<source>`` (per origin when on ``unit``)."""
    n = data.sizes["origin"]
    name = f"exposure_{source}"
    if name not in data:
        return np.ones((n, n))
    exp = data[name]
    if exp.dims == ("unit",):
        return np.broadcast_to(np.asarray(exp.values, dtype=float)[:, None], (n, n)).copy()
    return np.asarray(exp.transpose("origin", "destination").values, dtype=float)


def _prediction_dataset(
    data: xr.Dataset,
    mean: np.ndarray,
    quantiles: Mapping[float, np.ndarray] | None,
    quantile_levels: Sequence[float],
    attrs: Mapping[str, Any],
) -> xr.Dataset:
    coords = {"origin": data["origin"].values, "destination": data["destination"].values}
    dims = ("origin", "destination")
    diag = np.eye(len(coords["origin"]), dtype=bool)
    mean = np.where(diag, np.nan, mean)
    out = xr.Dataset({"mean": (dims, mean)}, coords=coords)
    for q in quantile_levels:
        values = (
            np.full(mean.shape, np.nan)
            if quantiles is None
            else np.where(diag, np.nan, quantiles[q])
        )
        out[quantile_name(q)] = (dims, values)
    for name in out.data_vars:
        out[name].attrs["units"] = "persons"
    out.attrs.update(dict(attrs))
    return out


# ------------------------------------------------------------------------ baselines
def glm_baseline(
    data: xr.Dataset,
    *,
    origin_covariates: Sequence[str] = ("log_population",),
    destination_covariates: Sequence[str] = ("log_population",),
    cost_func: Literal["pow", "exp"] = "pow",
    pair_covariates: Sequence[str] = (),
    constraint: Literal["none", "production", "attraction", "doubly"] = "none",
    country_effects: bool = False,
    source: str | None = None,
    exposure: bool = True,
    population_scale: bool = False,
    intervals: Literal["poisson", "none"] = "poisson",
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    return_fit: bool = False,
) -> xr.Dataset | tuple[xr.Dataset, Any]:
    r"""Maximum-likelihood gravity model: a statsmodels Poisson GLM with log link.

    .. math:: \log \mu_{ij} = k + a \cdot x_i + b \cdot x_j + c \cdot f(d_{ij})
              + \gamma \cdot z_{ij} + \log e_{ij}

    with ``f = log`` (``cost_func="pow"``) or the identity (``"exp"``); the
    constrained forms replace the origin (``production``), destination
    (``attraction``) or both (``doubly``) covariates by unit fixed effects
    (Wilson 1971). Fitted on the pairs where ``flow_<source>`` is finite.

    Parameters
    ----------
    data
        Dense FlowDataset with ``distance_km`` and ``flow_<source>``.
    origin_covariates, destination_covariates
        Unit variables; ``log_<var>`` takes the log of ``<var>``.
    cost_func
        ``"pow"`` (log distance) or ``"exp"`` (distance in km).
    pair_covariates
        Other pair variables (e.g. ``"cross_border"``, ``"contiguous"``).
    constraint
        ``"none"``, ``"production"``, ``"attraction"`` or ``"doubly"``.
        Units without observed flows on a constrained side get NaN predictions
        (their fixed effect is not identified).
    country_effects
        Add origin-country fixed effects (the MLE analogue of the Bayesian
        models' hierarchical ``country_effect``); an origin country with no
        observed pairs gets the mean of the estimated country effects.
    source
        Flow source; default the dataset's only one.
    exposure
        If True (default) ``log(exposure_<source>)`` is an offset and the
        predictions are on the observed scale (expected *sample* counts);
        if False, the exposure is ignored.
    population_scale
        Fit with the exposure offset but predict without it (population-scale
        flows, e.g. to compare with true or published flows).
    intervals
        ``"poisson"``: plug-in Poisson predictive quantiles at the MLE
        (parameter uncertainty and overdispersion ignored — which is why this
        baseline tends to under-cover); ``"none"``: quantiles are NaN.
    quantiles
        Quantile levels; named ``q05`` ... (:func:`quantile_name`).
    return_fit
        Also return the statsmodels results object.

    Returns
    -------
    xarray.Dataset or (xarray.Dataset, GLMResults)
        ``mean`` and the quantiles over ``(origin, destination)`` (diagonal
        NaN), attrs ``model="glm_baseline"``, ``params`` and ``bse``
        (JSON term -> value), ``deviance``, ``aic``, ``n_obs``.
    """
    import statsmodels.api as sm

    _require_dense(data, "glm_baseline")
    if cost_func not in ("pow", "exp"):
        raise ModelConfigError(
            f"cost_func={cost_func!r}: use 'pow' (power law) or 'exp' (exponential)"
        )
    if constraint not in ("none", "production", "attraction", "doubly"):
        raise ModelConfigError(
            f"constraint={constraint!r}: use 'none', 'production', 'attraction' or 'doubly'"
        )
    source = _resolve_source(data, source)
    data = data.transpose("origin", "destination", ...)
    ids = data["origin"].values.astype(str)
    n = len(ids)
    y = np.asarray(data[f"flow_{source}"].values, dtype=float)
    if y.ndim != 2:
        raise DataContractError(
            f"flow_{source} has dims {data[f'flow_{source}'].dims}; glm_baseline needs (origin, destination). "
            "Fix: sum or select the 'period' dim first."
        )
    dist = np.asarray(data["distance_km"].values, dtype=float)
    oi, di = np.nonzero(~np.eye(n, dtype=bool))
    cols: dict[str, np.ndarray] = {"intercept": np.ones(oi.size)}
    fe_sides = {
        "production": ("origin",),
        "attraction": ("destination",),
        "doubly": ("origin", "destination"),
    }
    fe = fe_sides.get(constraint, ())
    if "origin" not in fe:
        for name in origin_covariates:
            cols[f"origin:{name}"] = _unit_covariate(data, name)[oi]
    if "destination" not in fe:
        for name in destination_covariates:
            cols[f"destination:{name}"] = _unit_covariate(data, name)[di]
    with np.errstate(divide="ignore"):
        cols["log_distance" if cost_func == "pow" else "distance"] = (
            np.log(dist[oi, di]) if cost_func == "pow" else dist[oi, di]
        )
    for name in pair_covariates:
        if name not in data:
            raise DataContractError(
                f"pair covariate '{name}' not in the dataset. Fix: add it or drop it."
            )
        cols[name] = np.asarray(data[name].values, dtype=float)[oi, di]
    offset = np.log(_exposure_matrix(data, source)[oi, di]) if exposure else np.zeros(oi.size)
    yv = y[oi, di]
    X = pd.DataFrame(cols)
    observed = np.isfinite(yv) & np.all(np.isfinite(X.to_numpy()), axis=1) & np.isfinite(offset)
    # fixed effects: one dummy per unit seen on that side among the observed pairs (first one dropped)
    unidentified = np.zeros(oi.size, dtype=bool)
    for side, idx in (("origin", oi), ("destination", di)):
        if side not in fe:
            continue
        seen = np.unique(idx[observed])
        unidentified |= ~np.isin(idx, seen)
        for u in seen[1:]:
            X[f"{side}[{ids[u]}]"] = (idx == u).astype(float)
    country_cols: list[str] = []
    if country_effects and constraint not in ("production", "doubly"):
        country = np.asarray(data["country"].values).astype(str)
        seen_c = sorted(set(country[oi[observed]]))
        for c in seen_c[1:]:
            X[f"country[{c}]"] = (country[oi] == c).astype(float)
            country_cols.append(f"country[{c}]")
        unseen_c = ~np.isin(country[oi], seen_c)
    if observed.sum() <= X.shape[1]:
        raise DataContractError(
            f"glm_baseline: {int(observed.sum())} observed pairs for {X.shape[1]} parameters. "
            "Fix: observe more pairs or use fewer covariates / no constraint."
        )
    # drop covariate columns that are constant among the observed pairs (e.g. cross_border in one country)
    const = [
        c for c in X.columns if c != "intercept" and np.ptp(X.loc[observed, c].to_numpy()) == 0
    ]
    if const:
        warnings.warn(
            f"glm_baseline: dropped term(s) {const}, constant over the observed pairs",
            UserWarning,
            stacklevel=2,
        )
        X = X.drop(columns=const)
    model = sm.GLM(
        yv[observed], X.loc[observed], family=sm.families.Poisson(), offset=offset[observed]
    )
    fit = model.fit()
    eta = X.to_numpy() @ fit.params.to_numpy() + (0.0 if population_scale else offset)
    if country_cols:
        effects = np.array([0.0] + [float(fit.params.get(c, 0.0)) for c in country_cols])
        eta = np.where(unseen_c, eta + effects.mean(), eta)
    mu_pairs = np.where(unidentified, np.nan, np.exp(eta))
    mean = np.full((n, n), np.nan)
    mean[oi, di] = mu_pairs
    qvals = None
    if intervals == "poisson":
        qvals = {}
        for q in quantiles:
            mat = np.full((n, n), np.nan)
            finite = np.isfinite(mu_pairs)
            vals = np.full(mu_pairs.shape, np.nan)
            vals[finite] = stats.poisson.ppf(q, mu_pairs[finite])
            mat[oi, di] = vals
            qvals[q] = mat
    elif intervals != "none":
        raise ModelConfigError(f"intervals={intervals!r}: use 'poisson' or 'none'")
    attrs = {
        "model": "glm_baseline",
        "description": f"MLE gravity (statsmodels Poisson GLM, constraint={constraint}, cost_func={cost_func})",
        "constraint": constraint,
        "cost_func": cost_func,
        "source": source,
        "params": json.dumps({k: float(v) for k, v in fit.params.items()}),
        "bse": json.dumps({k: float(v) for k, v in fit.bse.items()}),
        "deviance": float(fit.deviance),
        "aic": float(fit.aic),
        "n_obs": int(observed.sum()),
        "intervals": intervals,
    }
    ds = _prediction_dataset(data, mean, qvals, quantiles, attrs)
    return (ds, fit) if return_fit else ds


def _intervening_population_bruteforce(
    population: np.ndarray, distance_km: np.ndarray
) -> np.ndarray:
    """s_ij = population within distance d_ij of i, excluding i and j (ties inside, as in pairs)."""
    pop = np.asarray(population, dtype=float)
    d = np.array(distance_km, dtype=float)
    n = pop.size
    np.fill_diagonal(d, 0.0)
    s = np.full((n, n), np.nan)
    for i in range(n):
        closer = d[i][None, :] <= d[i][:, None]  # [j, k]: k at most as far from i as j
        closer[:, i] = False
        np.fill_diagonal(closer, False)
        s[i] = closer.astype(float) @ pop
    np.fill_diagonal(s, np.nan)
    return s


def _intervening_population(data: xr.Dataset) -> np.ndarray:
    if "intervening_population" in data:
        return np.asarray(
            data["intervening_population"].transpose("origin", "destination").values, dtype=float
        )
    pop = np.asarray(data["population"].values, dtype=float)
    dist = np.asarray(data["distance_km"].transpose("origin", "destination").values, dtype=float)
    try:
        from flowmodel.pairs import intervening_population
    except ImportError:
        return _intervening_population_bruteforce(pop, dist)
    s = intervening_population(pop, dist)
    return np.asarray(getattr(s, "values", s), dtype=float)


def radiation_baseline(
    data: xr.Dataset,
    *,
    source: str | None = None,
    mass: str = "population",
    unobserved_outflow: Literal["rate", "nan"] = "rate",
    intervals: Literal["poisson", "none"] = "poisson",
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
) -> xr.Dataset:
    r"""Parameter-free radiation model (Simini et al. 2012) with observed outflows.

    .. math:: p_{ij} = \frac{m_i n_j}{(m_i + s_{ij})(m_i + n_j + s_{ij})}, \qquad
              \hat T_{ij} = T_i \frac{p_{ij}}{\sum_{k \in O_i} p_{ik}}

    where ``T_i`` is the observed outflow of ``i`` (sum of ``flow_<source>``
    over its observed destinations ``O_i``). When every destination is
    observed, ``Σ_k p_ik = 1 - m_i / M`` exactly, so this is the finite-system
    normalisation of Masucci et al. (2013); with held-out pairs it spreads the
    observed outflow over the observed destinations only. ``s_ij`` is the
    dataset's ``intervening_population`` or
    :func:`flowmodel.pairs.intervening_population`.

    Parameters
    ----------
    data
        Dense FlowDataset with ``population`` and ``distance_km``.
    source
        Flow source giving ``T_i``; default the dataset's only one.
    mass
        Unit variable used as ``m_i`` / ``n_j``.
    unobserved_outflow
        For origins with no observed flow (e.g. a held-out unit or country):
        ``"rate"`` sets ``T_i = r · m_i`` with the overall observed emigration
        rate ``r = Σ T_k / Σ m_k`` over the observed origins, spread over all
        destinations; ``"nan"`` leaves them NaN.
    intervals, quantiles
        As in :func:`glm_baseline` (plug-in Poisson quantiles or NaN).

    Returns
    -------
    xarray.Dataset
        ``mean`` and quantiles over ``(origin, destination)``.
    """
    _require_dense(data, "radiation_baseline")
    source = _resolve_source(data, source)
    data = data.transpose("origin", "destination", ...)
    m = _unit_covariate(data, mass)
    s = _intervening_population(data)
    y = np.asarray(data[f"flow_{source}"].values, dtype=float)
    n = m.size
    mi, nj = m[:, None], m[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        p = mi * nj / ((mi + s) * (mi + nj + s))
    np.fill_diagonal(p, np.nan)
    obs = np.isfinite(y)
    np.fill_diagonal(obs, False)
    outflow = np.where(obs, y, 0.0).sum(axis=1)
    norm = np.where(obs, p, 0.0).sum(axis=1)
    has_obs = obs.any(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(has_obs & (norm > 0), outflow / norm, np.nan)
        if unobserved_outflow == "rate" and has_obs.any() and not has_obs.all():
            rate = outflow[has_obs].sum() / m[has_obs].sum()
            total = np.nansum(p, axis=1)
            scale = np.where(has_obs, scale, rate * m / total)
    if unobserved_outflow not in ("rate", "nan"):
        raise ModelConfigError(f"unobserved_outflow={unobserved_outflow!r}: use 'rate' or 'nan'")
    mean = scale[:, None] * p
    np.fill_diagonal(mean, np.nan)
    qvals = None
    if intervals == "poisson":
        finite = np.isfinite(mean)
        qvals = {}
        for q in quantiles:
            mat = np.full((n, n), np.nan)
            mat[finite] = stats.poisson.ppf(q, mean[finite])
            qvals[q] = mat
    attrs = {
        "model": "radiation_baseline",
        "description": "parameter-free radiation (Simini 2012), T_i = observed outflow "
        f"(unobserved origins: {unobserved_outflow})",
        "source": source,
        "intervals": intervals,
    }
    return _prediction_dataset(data, mean, qvals, quantiles, attrs)


# ------------------------------------------------------------------ cross-validation
Scheme = Literal["pairs", "unit", "country", "last_period"]


def holdout_folds(
    data: xr.Dataset,
    *,
    scheme: Scheme = "pairs",
    folds: int | None = 5,
    source: str | None = None,
    seed: int = 0,
) -> list[tuple[str, np.ndarray]]:
    """Held-out masks ``(origin, destination)`` over the observed pairs.

    Parameters
    ----------
    data
        Dense FlowDataset.
    scheme
        ``"pairs"``: observed pairs split at random into ``folds`` groups;
        ``"unit"``: leave one unit out — every observed pair with that unit as
        origin or destination (``folds`` units chosen at random when smaller
        than the number of units; None = every unit); ``"country"``: leave one
        country out — every observed pair whose *origin* is in the country (as
        if that country's census were missing); countries with no observed
        outflow are skipped.
    folds
        Number of folds (``"pairs"``) or at most this many held-out units /
        countries (None = all).
    source
        Flow source; default the only one.
    seed
        Seed of the random split.

    Returns
    -------
    list of (label, mask)
        ``label`` names the fold (``"fold 0"``, a unit id or a country code);
        ``mask`` is a boolean ``(n, n)`` array of held-out pairs, all observed.
    """
    _require_dense(data, "cross_validate")
    source = _resolve_source(data, source)
    y = np.asarray(
        data[f"flow_{source}"].transpose("origin", "destination", ...).values, dtype=float
    )
    if y.ndim != 2:
        y = np.where(np.isfinite(y).any(axis=-1), 1.0, np.nan)
    n = y.shape[0]
    observed = np.isfinite(y) & ~np.eye(n, dtype=bool)
    rng = np.random.default_rng(seed)
    out: list[tuple[str, np.ndarray]] = []
    if scheme == "pairs":
        k = int(folds or 5)
        if k < 2:
            raise ValueError(f"folds={folds}: need at least 2 folds for held-out pairs")
        idx = np.flatnonzero(observed.ravel())
        if idx.size < k:
            raise DataContractError(
                f"only {idx.size} observed pairs for {k} folds. Fix: use fewer folds."
            )
        assign = rng.permutation(idx.size) % k
        for f in range(k):
            mask = np.zeros(n * n, dtype=bool)
            mask[idx[assign == f]] = True
            out.append((f"fold {f}", mask.reshape(n, n)))
    elif scheme == "unit":
        ids = data["origin"].values.astype(str)
        order = (
            np.arange(n)
            if folds is None or folds >= n
            else np.sort(rng.choice(n, size=folds, replace=False))
        )
        for u in order:
            mask = observed.copy()
            touch = np.zeros((n, n), dtype=bool)
            touch[u, :] = True
            touch[:, u] = True
            mask &= touch
            if mask.any():
                out.append((str(ids[u]), mask))
    elif scheme == "country":
        country = np.asarray(data["country"].values).astype(str)
        codes = sorted(set(country))
        for c in codes:
            mask = observed & (country == c)[:, None]
            if mask.any():
                out.append((c, mask))
        if folds is not None and len(out) > folds:
            keep = np.sort(rng.choice(len(out), size=folds, replace=False))
            out = [out[i] for i in keep]
        if len(out) < 2:
            raise DataContractError(
                f"leave-one-country-out needs observed flows from at least 2 countries; found {len(out)}. "
                "Fix: use scheme='pairs' or 'unit'."
            )
    else:
        raise ValueError(f"scheme={scheme!r}: use 'pairs', 'unit' or 'country'")
    return out


def _with_held_out(data: xr.Dataset, source: str, mask: np.ndarray) -> xr.Dataset:
    """Copy of ``data`` with ``flow_<source>`` (and its bounds) set to NaN on the held-out pairs."""
    train = data.copy()
    hold = xr.DataArray(
        mask,
        dims=("origin", "destination"),
        coords={"origin": data["origin"], "destination": data["destination"]},
    )
    for name in (f"flow_{source}", f"flow_{source}_max", f"flow_{source}_min"):
        if name in train:
            train[name] = train[name].where(~hold)
    return train


def _clone(model: Any) -> Any:
    """Return a fresh, unfitted instance of ``model``'s class with the same configuration."""
    if hasattr(model, "clone") and callable(model.clone):
        return model.clone()
    kwargs = dict(getattr(model, "model_config", {}) or {})
    for extra in ("priors", "sampler_config"):
        if getattr(model, extra, None) is not None:
            kwargs[extra] = getattr(model, extra)
    return type(model)(**kwargs)


def _model_name(model: Any) -> str:
    name = type(model).__name__
    config = getattr(model, "model_config", {}) or {}
    constraint = config.get("constraint")
    if constraint and constraint != "none":
        name += f"({constraint})"
    return name


def _predict(
    model: Any, data: xr.Dataset, source: str | None, quantiles: Sequence[float], seed: int = 0
) -> xr.Dataset:
    """``model.predict`` on the observed scale of ``source`` (``exposure_<source>`` applied)."""
    params = inspect.signature(model.predict).parameters
    kwargs: dict[str, Any] = {"quantiles": tuple(quantiles)} if "quantiles" in params else {}
    if source is not None and f"exposure_{source}" in data and "exposure" in params:
        kwargs["exposure"] = source
    if "seed" in params:
        kwargs["seed"] = seed
    return model.predict(data, **kwargs)


def _fit(model: Any, data: xr.Dataset, backend: str, seed: int) -> str:
    """Fit ``model`` with ``backend`` (falling back to ``"map"``); return the backend used."""
    kwargs: dict[str, Any] = {"random_seed": seed}
    if "progressbar" in inspect.signature(model.fit).parameters:
        kwargs["progressbar"] = False
    try:
        model.fit(data, backend=backend, **kwargs)
        return backend
    except (ImportError, NotImplementedError) as err:
        if backend == "map":
            raise
        warnings.warn(
            f"backend {backend!r} failed ({err}); refitting with backend='map'",
            UserWarning,
            stacklevel=3,
        )
        model.fit(data, backend="map", **kwargs)
        return "map"


def _glm_kwargs(model: Any) -> dict[str, Any]:
    """Return glm_baseline options with the covariates, cost function and constraint of ``model``."""
    config = dict(getattr(model, "model_config", {}) or {})
    out: dict[str, Any] = {}
    for key in ("origin_covariates", "destination_covariates"):
        if config.get(key) is not None:
            out[key] = tuple(config[key])
    if config.get("cost_func") in ("pow", "exp"):
        out["cost_func"] = config["cost_func"]
    if config.get("constraint") in ("none", "production", "attraction", "doubly"):
        out["constraint"] = config["constraint"]
    pair = config.get("pair_covariates")
    if pair is None:
        pair = [k for k in ("cross_border",) if config.get(k) is True]
        if config.get("contiguity") is True or config.get("contiguous") is True:
            pair.append("contiguous")
    out["pair_covariates"] = tuple(pair)
    if config.get("country_effects") is True:
        out["country_effects"] = True
    return out


def cross_validate(
    model: Any,
    data: xr.Dataset,
    *,
    scheme: Scheme = "pairs",
    folds: int | None = 5,
    backend: str = "laplace",
    seed: int = 0,
    baselines: bool | Iterable[str] = True,
    source: str | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    glm_kwargs: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> pd.DataFrame:
    """Cross-validate a model (and the baselines) on held-out observed pairs.

    Each fold copies ``data`` with ``flow_<source>`` set to NaN on the held-out
    pairs, fits a fresh clone of ``model`` (same class, same ``model_config``)
    with ``backend``, predicts from the training copy (so nothing held out
    leaks in, e.g. through observed outflows of constrained models) and scores
    the held-out pairs with :func:`flow_metrics`.

    Parameters
    ----------
    model
        An unfitted or fitted :class:`~flowmodel.models.base.FlowModel`; it is
        never modified. None scores the baselines only.
    data
        Dense FlowDataset.
    scheme, folds, seed
        See :func:`holdout_folds`; ``scheme="last_period"`` holds out the latest
        observed round instead (:func:`last_period_cv`).
    backend
        Backend of the refits (``"laplace"`` or ``"map"`` keep it fast); if it
        fails to import the refit falls back to ``"map"`` with a warning. The
        backend actually used is in the ``backend`` column.
    baselines
        True: the GLM (same covariates as ``model``) and radiation baselines;
        False: none; or an iterable of ``"glm"`` / ``"radiation"``.
    source
        Flow source; default the only one.
    quantiles
        Quantiles requested from every model.
    glm_kwargs
        Overrides for :func:`glm_baseline` (default: read from ``model.model_config``).
    progress
        One step per fold and model: a bar in terminals and notebooks, a
        heartbeat line a minute in logs; None follows
        :func:`flowmodel.progress.progress_enabled` (on unless switched off).

    Returns
    -------
    pandas.DataFrame
        One row per model x fold: ``model``, ``scheme``, ``fold``,
        ``held_out`` (fold label), ``backend``, ``n_train``, ``n_test``,
        ``fit_seconds`` and the columns of :func:`flow_metrics`.
    """
    if source is None and model is not None:
        source = (getattr(model, "model_config", {}) or {}).get("source")
    source = _resolve_source(data, source)
    if scheme == "last_period":
        return last_period_cv(
            model,
            data,
            source=source,
            backend=backend,
            seed=seed,
            baselines=baselines is not False,
            quantiles=quantiles,
            glm_kwargs=glm_kwargs,
        )
    if baselines is True:
        which = ["glm", "radiation"]
    elif baselines is False:
        which = []
    else:
        which = list(baselines)
        unknown = set(which) - {"glm", "radiation"}
        if unknown:
            raise ValueError(f"baselines={sorted(unknown)}: use 'glm' and/or 'radiation'")
    gkw = dict(_glm_kwargs(model) if model is not None else {})
    gkw["pair_covariates"] = tuple(c for c in gkw.get("pair_covariates", ()) if c in data)
    gkw.update(glm_kwargs or {})
    observed_all = data[f"flow_{source}"]
    rows: list[dict[str, Any]] = []
    fold_masks = holdout_folds(data, scheme=scheme, folds=folds, source=source, seed=seed)
    n_models = int(model is not None) + len(which)
    bar = progress_bar(
        total=len(fold_masks) * n_models,
        desc=f"cross-validation ({scheme})",
        unit="fit",
        progress=progress,
    )
    for f, (label, mask) in enumerate(fold_masks):
        train = _with_held_out(data, source, mask)
        test_obs = observed_all.where(
            xr.DataArray(
                mask,
                dims=("origin", "destination"),
                coords={"origin": data["origin"], "destination": data["destination"]},
            )
        )
        n_train = int(np.isfinite(train[f"flow_{source}"].values).sum())
        base = {
            "scheme": scheme,
            "fold": f,
            "held_out": label,
            "n_train": n_train,
            "n_test": int(mask.sum()),
        }
        candidates: list[tuple[str, str, Any]] = []
        if model is not None:
            candidates.append(("model", _model_name(model), model))
        candidates += [(b, f"{b}_baseline", None) for b in which]
        for kind, name, mdl in candidates:
            t0 = time.perf_counter()
            try:
                if kind == "model":
                    clone = _clone(mdl)
                    used = _fit(clone, train, backend, seed + f)
                    pred = _predict(clone, train, source, quantiles, seed + f)
                elif kind == "glm":
                    used = "mle"
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", UserWarning)
                        pred = glm_baseline(train, source=source, quantiles=quantiles, **gkw)
                else:
                    used = "none"
                    pred = radiation_baseline(train, source=source, quantiles=quantiles)
            except FlowModelError as err:
                warnings.warn(f"{name}, {label}: {err}", UserWarning, stacklevel=2)
                rows.append({"model": name, **base, "backend": "failed", "error": str(err)})
                bar.update(1)
                continue
            seconds = time.perf_counter() - t0
            metrics = flow_metrics(test_obs, pred)
            rows.append(
                {"model": name, **base, "backend": used, "fit_seconds": seconds, **metrics}
            )
            bar.update(1)
    bar.close()
    frame = pd.DataFrame(rows)
    return frame


def _model_sources(model: Any, data: xr.Dataset, source: str) -> list[str]:
    config = getattr(model, "model_config", {}) or {}
    return list(config.get("sources") or [config.get("source") or source])


def _round_values(data: xr.Dataset, source: str, label: str) -> xr.DataArray:
    """``flow_<source>`` of the window ``label`` over (origin, destination)."""
    var = data[f"flow_{source}"]
    if "period" in var.dims:
        var = var.sel(period=label)
    return var.transpose("origin", "destination")


def _unit_exposure(data: xr.Dataset, source: str) -> np.ndarray:
    return _exposure_matrix(data, source)


def last_period_split(data: xr.Dataset, sources: Sequence[str], source: str) -> dict[str, Any]:
    """Find the latest round of ``source``, the latest round before it, what to hold out.

    Returns
    -------
    dict
        ``held_out`` (window label), ``held_in`` ``(source, label)`` (the latest
        round of a non-CDR source before it), ``drop_sources`` (sources whose every
        window overlaps the held-out one) and ``mask_periods`` (``source ->
        labels`` of the period dim to set to NaN): every non-CDR cell whose window
        overlaps the held-out window is held out (a census's one-year question
        goes with its five-year one); CDR stays (the current digital trace).

    Raises
    ------
    DataContractError
        When ``source`` has no labelled window, or no earlier round exists.
    """
    from flowmodel.periods import observed_periods, parse_period

    rounds = {s: observed_periods(data, s) for s in sources if not is_cdr_source(s)}
    own = rounds.get(source) or observed_periods(data, source)
    if not own:
        raise DataContractError(
            f"cv='last_period': flow_{source} has no labelled window. Fix: give its table a "
            f"'period' column, or [flows.{source}] period = '2005-2010'"
        )
    held_out = own[-1]
    window = parse_period(held_out)
    drop, mask = [], {}
    earlier: list[tuple[float, str, str]] = []
    for s, labels in rounds.items():
        overlapping = [lab for lab in labels if parse_period(lab).overlap(window) > 0]
        has_dim = "period" in data[f"flow_{s}"].dims
        if overlapping and (len(overlapping) == len(labels) or not has_dim):
            drop.append(s)
        elif overlapping:
            mask[s] = overlapping
        for lab in labels:
            p = parse_period(lab)
            if p.end <= window.start + 1e-9 or (p.overlap(window) == 0 and p.start < window.start):
                earlier.append((p.midpoint, s, lab))
    if not earlier:
        raise DataContractError(
            f"cv='last_period': no round before {held_out!r} to fit on (rounds: {rounds}). "
            "Fix: add an earlier census round, or use cv='pairs'"
        )
    _, s_in, lab_in = max(earlier)
    return {
        "held_out": held_out,
        "held_in": (s_in, lab_in),
        "drop_sources": drop,
        "mask_periods": mask,
    }


def _without_sources(model: Any, drop: Sequence[str]) -> Any:
    """Return a fresh clone of ``model`` without the sources ``drop`` (a fusion's list)."""
    clone = _clone(model)
    if not drop:
        return clone
    config = dict(getattr(clone, "model_config", {}) or {})
    if "sources" not in config:
        raise ModelConfigError(
            f"cv='last_period': the held-out round is all of source(s) {list(drop)}, which "
            f"the {type(model).__name__} fits alone. Fix: put the rounds in one flow table "
            "with a 'period' column, or fit a FusionModel of several rounds"
        )
    sources = [s for s in config["sources"] if s not in drop]
    if not sources:
        raise ModelConfigError("cv='last_period': no source is left to fit on")
    config["sources"] = sources
    config["source_options"] = {
        k: v for k, v in (config.get("source_options") or {}).items() if k in sources
    }
    if config.get("reference_source") in drop:
        config["reference_source"] = None
    return type(clone)(priors=clone.priors, sampler_config=clone.sampler_config, **config)


def persistence_baseline(
    data: xr.Dataset,
    held_in: tuple[str, str],
    source: str,
    *,
    scale_to: float | None = None,
) -> xr.Dataset:
    """Predict the held-out round by the latest held-in round ("no change").

    The held-in counts are moved to the held-out source's sampling scale
    (``count / exposure_in * exposure_out``); ``scale_to`` rescales them to that
    total (e.g. the model's predicted total). No intervals (quantiles are absent).
    """
    s_in, lab_in = held_in
    y = np.asarray(_round_values(data, s_in, lab_in).values, dtype=float)
    values = y / _unit_exposure(data, s_in) * _unit_exposure(data, source)
    if scale_to is not None:
        total = np.nansum(values)
        values = values * (scale_to / total if total > 0 else 1.0)
    name = "persistence_rescaled" if scale_to is not None else "persistence"
    return _prediction_dataset(
        data, values, None, (), {"model": name, "held_in": f"{s_in} {lab_in}"}
    )


def _moved_glm(
    data: xr.Dataset,
    held_in: tuple[str, str],
    held_out: str,
    source: str,
    quantiles: Sequence[float],
    gkw: Mapping[str, Any],
) -> xr.Dataset:
    """Fit a gravity GLM to the held-in round and move it to the held-out covariates."""
    from flowmodel.periods import dataset_at, parse_period

    s_in, lab_in = held_in
    d_in = dataset_at(data, lab_in)
    keep = [v for v in d_in.data_vars if not str(v).startswith(("flow_", "exposure_"))]
    d_in = d_in[keep]
    d_in["flow__round"] = _round_values(data, s_in, lab_in)
    d_in["exposure__round"] = (("origin", "destination"), _unit_exposure(data, s_in))
    fit_pred, fit = glm_baseline(
        d_in,
        source="_round",
        population_scale=True,
        intervals="none",
        quantiles=(),
        return_fit=True,
        **{k: v for k, v in gkw.items() if k not in ("population_scale",)},
    )
    d_out = dataset_at(data, held_out)
    params = fit.params
    n = d_in.sizes["origin"]
    shift = np.zeros((n, n))
    for term, coef in params.items():
        side, _, var = str(term).partition(":")
        if side not in ("origin", "destination") or not var:
            continue
        delta = _unit_covariate(d_out, var) - _unit_covariate(d_in, var)
        shift += float(coef) * (delta[:, None] if side == "origin" else delta[None, :])
    # window lengths: the GLM's flows are per held-in window
    ratio = parse_period(held_out).length / parse_period(lab_in).length
    mean = np.asarray(fit_pred["mean"].values) * np.exp(shift) * ratio
    mean = mean * _unit_exposure(data, source)
    qvals = {}
    finite = np.isfinite(mean)
    for q in quantiles:
        vals = np.full(mean.shape, np.nan)
        vals[finite] = stats.poisson.ppf(q, mean[finite])
        qvals[q] = vals
    return _prediction_dataset(
        data,
        mean,
        qvals,
        quantiles,
        {
            "model": "gravity_baseline",
            "description": f"GLM on {s_in} {lab_in}, moved to {held_out}",
        },
    )


def last_period_cv(
    model: Any,
    data: xr.Dataset,
    *,
    source: str | None = None,
    backend: str = "laplace",
    seed: int = 0,
    baselines: bool = True,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    glm_kwargs: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Hold out the latest observed round, fit on the rest, predict it: ``cv = "last_period"``.

    The latest window of ``source`` is held out, with every non-CDR cell whose
    window overlaps it (a source left with nothing is dropped from the model; CDR,
    the current digital trace, stays). A fresh clone of ``model`` (a model with
    periods) is fitted to the rest and predicts that period on ``source``'s
    reporting scale (its exposure and duration factor). Beside it:

    - ``<model> (median)``: the same prediction scored with its predictive median
      as the point forecast (quantiles include 0.5);
    - ``persistence``: the latest held-in round as it is (moved to the held-out
      source's sample fraction);
    - ``persistence_rescaled``: the same, rescaled to the model's predicted total;
    - ``gravity_baseline``: a Poisson GLM gravity model (:func:`glm_baseline`,
      the model's covariates) fitted to the held-in round and moved to the held-out
      period's covariates (dated covariates interpolated).

    Returns
    -------
    pandas.DataFrame
        One row per model: ``model``, ``scheme`` (``last_period``), ``fold`` (0),
        ``held_out`` (the window), ``held_in`` (source and window of persistence),
        ``backend``, ``n_train``, ``n_test``, ``fit_seconds`` and the columns of
        :func:`flow_metrics` (persistence has no interval columns: NaN).
    """
    source = _resolve_source(data, source)
    sources = _model_sources(model, data, source) if model is not None else [source]
    split = last_period_split(data, sources, source)
    held_out = split["held_out"]
    train = data.copy()
    for s, labels in split["mask_periods"].items():
        for name in (f"flow_{s}", f"flow_{s}_max", f"flow_{s}_min"):
            if name in train:
                hold = train["period"].isin(labels)
                train[name] = train[name].where(~hold)
    for s in split["drop_sources"]:
        for name in (f"flow_{s}", f"flow_{s}_max", f"flow_{s}_min"):
            if name in train:
                train[name] = train[name].where(False)
                train[name].attrs = dict(data[name].attrs)
    test = _round_values(data, source, held_out)
    n_train = sum(
        int(np.isfinite(train[f"flow_{s}"].values).sum())
        for s in sources
        if f"flow_{s}" in train and s not in split["drop_sources"]
    )
    base = {
        "scheme": "last_period",
        "fold": 0,
        "held_out": held_out,
        "held_in": f"{split['held_in'][0]} {split['held_in'][1]}",
        "n_train": n_train,
        "n_test": int(np.isfinite(test.values).sum()),
    }
    rows: list[dict[str, Any]] = []
    model_pred = None
    if model is not None:
        t0 = time.perf_counter()
        clone = _without_sources(model, split["drop_sources"])
        used = _fit(clone, train, backend, seed)
        kwargs: dict[str, Any] = {"quantiles": tuple(quantiles), "seed": seed, "period": held_out}
        if f"exposure_{source}" in data:
            kwargs["exposure"] = source
        model_pred = clone.predict(train, **kwargs)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "model": _model_name(model),
                **base,
                "backend": used,
                "fit_seconds": seconds,
                **flow_metrics(test, model_pred),
            }
        )
        if "q50" in model_pred:
            # the same predictive distribution with its median as the point forecast (the
            # mean carries the log-normal inflation of the forecast's uncertainty)
            median = model_pred.assign(mean=model_pred["q50"])
            rows.append(
                {
                    "model": f"{_model_name(model)} (median)",
                    **base,
                    "backend": used,
                    "fit_seconds": seconds,
                    **flow_metrics(test, median),
                }
            )
    pers = persistence_baseline(data, split["held_in"], source)
    rows.append({"model": "persistence", **base, "backend": "none", **flow_metrics(test, pers)})
    if model_pred is not None:
        both = np.isfinite(test.values) & np.isfinite(pers["mean"].values)
        total = float(np.nansum(np.where(both, model_pred["mean"].values, np.nan)))
        scaled = persistence_baseline(data, split["held_in"], source)
        in_total = float(np.nansum(np.where(both, scaled["mean"].values, np.nan)))
        scaled["mean"] = scaled["mean"] * (total / in_total if in_total > 0 else 1.0)
        scaled.attrs["model"] = "persistence_rescaled"
        rows.append(
            {
                "model": "persistence_rescaled",
                **base,
                "backend": "none",
                **flow_metrics(test, scaled),
            }
        )
    if baselines:
        gkw = dict(_glm_kwargs(model) if model is not None else {})
        gkw["pair_covariates"] = tuple(c for c in gkw.get("pair_covariates", ()) if c in data)
        gkw.update(glm_kwargs or {})
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                glm = _moved_glm(data, split["held_in"], held_out, source, quantiles, gkw)
            rows.append(
                {"model": "gravity_baseline", **base, "backend": "mle", **flow_metrics(test, glm)}
            )
        except FlowModelError as err:
            warnings.warn(f"gravity_baseline, {held_out}: {err}", UserWarning, stacklevel=2)
    return pd.DataFrame(rows)


def summarize_cv(cv: pd.DataFrame) -> pd.DataFrame:
    """Mean of each metric over folds, one row per model (and backend)."""
    metric_cols = [
        c
        for c in (
            "cpc",
            "log_rmse",
            "mae",
            "pearson_log",
            "spearman_log",
            "deviance",
            "coverage_50",
            "width_50",
            "coverage_90",
            "width_90",
            "fit_seconds",
        )
        if c in cv.columns
    ]
    grouped = cv.groupby(["model", "backend"], sort=False)
    out = grouped[metric_cols].mean()
    out.insert(0, "folds", grouped.size())
    out.insert(1, "n_test", grouped["n_test"].sum())
    return out.reset_index()


# -------------------------------------------------------------------------- evaluate
def _evaluate_periods(
    model: Any, data: xr.Dataset, source: str, quantiles: Sequence[float], exposure: bool
) -> pd.DataFrame:
    """In-sample metrics of a model with periods: one row per observed window of ``source``."""
    from flowmodel.periods import observed_periods

    rows = []
    for label in observed_periods(data, source):
        kwargs: dict[str, Any] = {"quantiles": tuple(quantiles), "period": label}
        if exposure and f"exposure_{source}" in data:
            kwargs["exposure"] = source
        pred = model.predict(data, **kwargs)
        rows.append(
            {
                "model": _model_name(model),
                "period": label,
                **flow_metrics(_round_values(data, source, label), pred),
            }
        )
    return pd.DataFrame(rows)


def evaluate(
    model: Any,
    data: xr.Dataset,
    *,
    observed: xr.DataArray | None = None,
    predictions: xr.Dataset | None = None,
    source: str | None = None,
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    baselines: bool = False,
    glm_kwargs: Mapping[str, Any] | None = None,
    exposure: bool | None = None,
) -> pd.DataFrame:
    """In-sample (or against external observations) metrics of a fitted model.

    Parameters
    ----------
    model
        A fitted model (``model.predict`` is called unless ``predictions`` is
        given); may be None when ``predictions`` is given.
    data
        The FlowDataset the predictions are for.
    observed
        Flows to score against ``(origin, destination)``; default
        ``data["flow_<source>"]``. Pass e.g. the simulator's true ``mu`` or a
        published surface to compare with those instead.
    predictions
        Precomputed predictions (skips ``model.predict``).
    source
        Flow source; default the only one.
    quantiles
        Passed to ``model.predict``.
    baselines
        Also score the GLM and radiation baselines fitted to ``data``.
    glm_kwargs
        Overrides for :func:`glm_baseline`.
    exposure
        Predict on the observed scale of the source (``exposure_<source>``
        applied). Default: True when scoring the source's own counts
        (``observed`` None), False (population scale) when ``observed`` is
        given.

    Returns
    -------
    pandas.DataFrame
        One row per model with the columns of :func:`flow_metrics`. A model with
        periods scored against its own source gives one row per observed window
        (column ``period``; baselines are in ``cv="last_period"``).
    """
    if source is None and model is not None:
        source = (getattr(model, "model_config", {}) or {}).get("source")
    if exposure is None:
        exposure = observed is None
    if observed is None or baselines or source is not None or len(flow_sources(data)) == 1:
        src = _resolve_source(data, source)
    else:
        src = None  # scoring external flows; no source needed
    aggregated = src is not None and f"cell_{src}" in data[f"flow_{src}"].dims
    if aggregated and observed is None and predictions is None:
        # a source reported at a coarser level is scored cell by cell, on its own scale
        if model is None or not hasattr(model, "predict_cells"):
            raise ValueError(
                f"evaluate: source '{src}' is reported at a coarser level; pass a model"
            )
        cells = model.predict_cells(data, src, quantiles=quantiles)
        row = {"model": _model_name(model), **flow_metrics(cells["observed"], cells)}
        return pd.DataFrame([row])
    if predictions is None and observed is None and getattr(model, "periods", None):
        return _evaluate_periods(model, data, src, quantiles, exposure)
    if predictions is None:
        if model is None:
            raise ValueError("evaluate: pass a fitted model or predictions=")
        predictions = _predict(model, data, src if exposure else None, quantiles)
    if observed is None:
        observed = data[f"flow_{src}"]
    rows = [
        {
            "model": _model_name(model)
            if model is not None
            else predictions.attrs.get("model", "predictions"),
            **flow_metrics(observed, predictions),
        }
    ]
    if baselines:
        gkw = dict(_glm_kwargs(model) if model is not None else {})
        gkw["pair_covariates"] = tuple(c for c in gkw.get("pair_covariates", ()) if c in data)
        gkw.update(glm_kwargs or {})
        gkw.setdefault("population_scale", not exposure)
        for name, pred in (
            ("glm_baseline", glm_baseline(data, source=src, quantiles=quantiles, **gkw)),
            ("radiation_baseline", radiation_baseline(data, source=src, quantiles=quantiles)),
        ):
            rows.append({"model": name, **flow_metrics(observed, pred)})
    return pd.DataFrame(rows)
