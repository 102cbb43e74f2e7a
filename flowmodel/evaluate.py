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
from flowmodel.naming import quantile_name
from flowmodel.progress import progress_bar

__all__ = [
    "DEFAULT_QUANTILES",
    "cpc",
    "cross_validate",
    "deviance",
    "evaluate",
    "flow_metrics",
    "glm_baseline",
    "holdout_folds",
    "interval_coverage",
    "interval_width",
    "log_rmse",
    "mae",
    "pearson_log",
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
Scheme = Literal["pairs", "unit", "country"]


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
        See :func:`holdout_folds`.
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
        One row per model with the columns of :func:`flow_metrics`.
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
