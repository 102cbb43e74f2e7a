r"""Latent flow fields: the log expected population-scale flow of every latent pair.

A latent field knows nothing about sources. It gives :math:`\eta_{ij}` (log expected
flow from unit :math:`i` to unit :math:`j` over the latent's window) for any set of
pairs, inside a PyMC model (:meth:`LatentField.add`) and in numpy from posterior
draws (:meth:`LatentField.prediction_params` + :meth:`LatentField.log_rate`, the
streamed prediction path). Observation models (:mod:`flowmodel.models.observations`)
say how each source sees sums of it.

Fit-derived state (term means and sds, the countries with effects, ...) is computed
once by :meth:`LatentField.fit_state` from the data and the latent pairs, is
JSON-able, and is passed explicitly to :meth:`add` and :meth:`prediction_params`;
the field itself never changes after construction.

- :class:`GravityField` (log-linear; constraint ``none`` / ``production`` /
  ``attraction`` / ``doubly`` change which terms it has);
- :class:`RadiationField` (original, Simini et al. 2012; extended, Yang et al. 2014).
"""

from __future__ import annotations

import abc
import copy
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, override

import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt
import xarray as xr

from flowmodel.dataset import is_sparse
from flowmodel.exceptions import ModelConfigError
from flowmodel.models.inference import stack_samples

__all__ = [
    "CONSTRAINTS",
    "Features",
    "GravityField",
    "LatentField",
    "LatentPairs",
    "LatentTerm",
    "RadiationField",
    "TemporalGravityField",
    "intervening_rows",
    "pair_values",
    "radiation_log_probability",
    "sparse_pair_positions",
    "unit_positions",
    "unit_variable",
]

CONSTRAINTS = ("none", "production", "attraction", "doubly")

#: ``prior(name, dims)`` creates node ``name`` from the resolved priors (inside a model).
PriorFactory = Callable[..., Any]


@dataclass
class Features:
    """Unit-level inputs of a latent field for one dataset (numpy, dim ``unit`` first)."""

    unit: np.ndarray
    country: np.ndarray
    unit_values: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class LatentPairs:
    """Latent pairs as positions into ``data.unit`` (dim ``pair``).

    A field with periods (:class:`TemporalGravityField`) has one latent row per
    (pair, period): ``period_idx`` gives each row's position in ``periods`` (the
    latent period labels, in time order). A field without periods is the special
    case of one period (both None).
    """

    origin_idx: np.ndarray
    dest_idx: np.ndarray
    period_idx: np.ndarray | None = None
    periods: list[str] | None = None

    @property
    def n(self) -> int:
        """Number of pairs."""
        return len(self.origin_idx)


@dataclass
class LatentTerm:
    """What :meth:`LatentField.add` returns.

    Attributes
    ----------
    eta
        ``(pair,)`` log expected flows (PyTensor).
    linear
        ``w -> Σ_k w_k eta_k`` for a numpy weight vector over the pairs, in
        sufficient-statistic form (``(Xᵀw)·beta``: no pass over the pairs at each
        gradient), or None when eta is not linear in the parameters.
    """

    eta: Any
    linear: Callable[[np.ndarray], Any] | None = None


def unit_positions(data: xr.Dataset, names: Any) -> np.ndarray:
    """Integer positions of unit ids ``names`` in ``data.unit``."""
    pos = pd.Series(np.arange(data.sizes["unit"]), index=data["unit"].values.astype(str))
    return pos.reindex(np.asarray(names).astype(str)).to_numpy().astype(int)


def unit_variable(data: xr.Dataset, name: str) -> np.ndarray:
    """Return a unit covariate by name; ``log_<var>`` is computed from ``<var>`` when absent.

    Raises
    ------
    ModelConfigError
        When neither ``name`` nor (for ``log_<var>``) ``<var>`` is a unit
        variable, listing the available ones; or when a log is taken of a
        non-positive value.
    """
    if name in data and data[name].dims == ("unit",):
        return np.asarray(data[name].values, dtype=float)
    if name.startswith("log_"):
        base = name.removeprefix("log_")
        if base in data and data[base].dims == ("unit",):
            values = np.asarray(data[base].values, dtype=float)
            if np.any(values[np.isfinite(values)] <= 0):
                bad = data["unit"].values[values <= 0][:10].tolist()
                raise ModelConfigError(
                    f"covariate '{name}': '{base}' has values <= 0 (units {bad}); "
                    f"Fix: use '{base}' untransformed or add an offset variable"
                )
            return np.log(values)
    available = sorted(
        str(n) for n, v in data.data_vars.items() if v.dims == ("unit",) and v.dtype.kind in "fiub"
    )
    raise ModelConfigError(
        f"covariate '{name}' is not a unit variable of the dataset; available: {available} "
        "(any of them may also be asked for as log_<var>)"
    )


def sparse_pair_positions(
    data: xr.Dataset, origin_idx: np.ndarray, dest_idx: np.ndarray
) -> np.ndarray:
    """Positions along ``pair`` of the pairs ``(origin_idx, dest_idx)`` of a sparse ``data``.

    ``origin_idx`` / ``dest_idx`` are positions into ``data.unit``; a pair that is not
    in the set gets -1.
    """
    n = data.sizes["unit"]
    pos = unit_positions(data, data["origin"].values) * n + unit_positions(
        data, data["destination"].values
    )
    lookup = pd.Series(np.arange(len(pos)), index=pos)
    where = lookup.reindex(np.asarray(origin_idx) * n + np.asarray(dest_idx)).to_numpy()
    return np.where(np.isnan(where), -1, where).astype(np.int64)


def pair_values(
    data: xr.Dataset, name: str, origin_idx: np.ndarray, dest_idx: np.ndarray
) -> np.ndarray:
    """Values of the pair variable ``name`` at unit positions ``(origin_idx, dest_idx)``.

    Dense datasets are indexed directly (origin/destination in ``unit`` order);
    sparse ones are looked up by their ``pair`` index.
    """
    var = data[name]
    if is_sparse(data):
        where = sparse_pair_positions(data, origin_idx, dest_idx)
        if (where < 0).any():
            raise ModelConfigError(f"'{name}': requested pairs are not in the sparse pair set")
        return np.asarray(var.values, dtype=float)[where]
    o_pos = unit_positions(data, data["origin"].values)
    d_pos = unit_positions(data, data["destination"].values)
    values = np.asarray(var.transpose("origin", "destination").values, dtype=float)
    if not (np.array_equal(o_pos, np.arange(len(o_pos))) and np.array_equal(d_pos, o_pos)):
        full = np.full((data.sizes["unit"], data.sizes["unit"]), np.nan)
        full[np.ix_(o_pos, d_pos)] = values
        values = full
    return values[origin_idx, dest_idx]


class LatentField(abc.ABC):
    """Abstract latent flow field (see the module docstring).

    Parameters
    ----------
    **config
        Structural options, merged over :attr:`default_config` and stored in
        :attr:`config` (JSON-able).
    """

    #: Structural options and their defaults.
    default_config: ClassVar[dict[str, Any]] = {}

    def __init__(self, **config: Any) -> None:
        unknown = set(config) - set(self.default_config)
        if unknown:
            raise ModelConfigError(
                f"{type(self).__name__}: unknown option(s) {sorted(unknown)}; "
                f"valid options are {sorted(self.default_config)}"
            )
        self.config: dict[str, Any] = copy.deepcopy(self.default_config) | dict(config)
        self.validate()

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Check structural options (no data needed); raise ModelConfigError."""

    def _choice(self, key: str, allowed: Sequence[str], owner: str) -> None:
        value = self.config[key]
        if value not in allowed:
            raise ModelConfigError(
                f"{owner}: {key}={value!r} is not valid; use one of {list(allowed)}"
            )

    # ----------------------------------------------------------------- structure
    @abc.abstractmethod
    def nodes(self, data: xr.Dataset | None = None) -> list[str]:
        """Prior keys of the nodes the field registers."""

    def summary_vars(self) -> list[str]:
        """Nodes shown by summaries, in order."""
        return []

    def data_priors(self, data: xr.Dataset, reference: Any) -> dict[str, Any]:
        """Priors derived from the data (between defaults and the user's)."""
        return {}

    def default_priors(self) -> dict[str, Any]:
        """Default priors of nodes the field adds beyond the shared defaults."""
        return {}

    @property
    def temporal(self) -> dict[str, Any] | None:
        """The field's temporal structure (periods), or None for a single-period field."""
        return None

    @abc.abstractmethod
    def fit_state(self, data: xr.Dataset, pairs: LatentPairs) -> dict[str, Any]:
        """Fit-derived constants of the field for ``pairs`` (JSON-able, computed once)."""

    @abc.abstractmethod
    def add(
        self, data: xr.Dataset, pairs: LatentPairs, state: Mapping[str, Any], prior: PriorFactory
    ) -> LatentTerm:
        """Register the field's nodes in the current PyMC model; return eta of ``pairs``."""

    # ----------------------------------------------------------------- prediction
    def features(self, data: xr.Dataset) -> Features:
        """Unit-level inputs for ``data`` (numpy)."""
        return Features(
            unit=np.asarray(data["unit"].values).astype(str),
            country=np.asarray(data["country"].values).astype(str),
        )

    def pair_names(self, state: Mapping[str, Any] | None = None) -> list[str]:
        """Names of the pair variables the log rate needs."""
        return ["distance_km"]

    def pair_values(
        self,
        data: xr.Dataset,
        origin_idx: np.ndarray,
        dest_idx: np.ndarray,
        state: Mapping[str, Any] | None = None,
    ) -> dict[str, np.ndarray]:
        """Pair variables at ``(origin_idx, dest_idx)`` (positions into ``data.unit``)."""
        return {
            name: pair_values(data, name, origin_idx, dest_idx) for name in self.pair_names(state)
        }

    def pair_block(
        self, data: xr.Dataset, start: int, stop: int, state: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Pair variables for origins ``start:stop`` x every destination, flattened (row-major).

        ``data`` is dense with origin/destination in ``unit`` order (streamed prediction).
        """
        n = data.sizes["unit"]
        out = {}
        for name in self.pair_names(state):
            if name not in data:
                out[name] = np.full((stop - start) * n, np.nan)
                continue
            var = data[name].transpose("origin", "destination").isel(origin=slice(start, stop))
            out[name] = np.asarray(var.values, dtype=float).ravel()
        return out

    def sparse_pair_block(
        self, data: xr.Dataset, start: int, stop: int, state: Mapping[str, Any] | None = None
    ) -> dict[str, np.ndarray]:
        """Pair variables of pairs ``start:stop`` of a sparse ``data`` (dim ``pair``).

        Raises
        ------
        ModelConfigError
            When a pair variable the field needs is missing or not over ``pair``.
        """
        out = {}
        for name in self.pair_names(state):
            if name not in data or data[name].dims != ("pair",):
                have = "absent" if name not in data else f"over {data[name].dims}"
                raise ModelConfigError(
                    f"{type(self).__name__}: predicting a sparse pair set needs the pair "
                    f"variable '{name}' over ('pair',), but it is {have}. Fix: add it to the "
                    "dense dataset (e.g. flowmodel.pairs.intervening_population) before "
                    "flowmodel.pairs.sparse_pairs, which gathers every dense pair variable"
                )
            out[name] = np.asarray(data[name].isel(pair=slice(start, stop)).values, dtype=float)
        return out

    @abc.abstractmethod
    def prediction_params(
        self,
        posterior: xr.Dataset,
        data: xr.Dataset,
        state: Mapping[str, Any],
        *,
        rng: np.random.Generator,
    ) -> dict[str, Any]:
        """Posterior draws as numpy arrays with a leading ``sample`` axis (chain x draw).

        Per-unit quantities cover every unit of ``data``; units of countries the
        fit never saw take effects drawn from the hierarchy (``rng``).
        """

    @abc.abstractmethod
    def log_rate(
        self,
        params: Mapping[str, Any],
        features: Features,
        origin_idx: np.ndarray,
        dest_idx: np.ndarray,
        pair_vals: Mapping[str, np.ndarray],
    ) -> np.ndarray:
        """``(sample, pair)`` log expected population-scale flows (pure numpy)."""


# ============================================================================ gravity
class GravityField(LatentField):
    r"""Log-linear gravity field with hierarchical country effects.

    .. math::

        \eta_{ij} = \alpha + \gamma_{c(i)} + \sum_k \beta_k \tilde x_{k,ij},
        \qquad \gamma_c \sim \mathcal N(0, \sigma_{\text{country}}^2)

    with :math:`\tilde x` the terms ``origin:<var>``, ``destination:<var>``,
    ``log_distance`` / ``distance``, ``cross_border``, ``contiguous``, standardised
    over the latent pairs (a binary term that is constant there keeps its raw 0/1
    scale and its prior). Constrained forms drop the intercept and the terms the
    margins absorb (production: origin terms; attraction: destination terms;
    doubly: both, plus destination effects :math:`\delta_j`).
    """

    default_config: ClassVar[dict[str, Any]] = {
        "origin_covariates": ["log_population"],
        "destination_covariates": ["log_population"],
        "cost_func": "pow",
        "cross_border": True,
        "contiguity": False,
        "constraint": "none",
        "country_effects": True,
        "country_slopes": [],
        "noncentered": "auto",
        "temporal": None,
    }

    @override
    def validate(self) -> None:
        self._choice("cost_func", ("pow", "exp"), "GravityModel")
        self._choice("constraint", CONSTRAINTS, "GravityModel")
        self._choice("noncentered", (True, False, "auto"), "GravityModel")
        if self.config.get("temporal") is not None and type(self) is GravityField:
            raise ModelConfigError(
                "GravityField has no periods; Fix: use TemporalGravityField (GravityModel("
                "temporal={...}) picks it)"
            )

    @property
    def constraint(self) -> str:
        """The constraint."""
        return self.config["constraint"]

    def candidate_terms(self) -> list[str]:
        """Terms of the field before data (covariates, distance, border, contiguity)."""
        cfg = self.config
        terms = []
        if self.constraint in ("none", "attraction"):
            terms += [f"origin:{v}" for v in cfg["origin_covariates"]]
        if self.constraint in ("none", "production"):
            terms += [f"destination:{v}" for v in cfg["destination_covariates"]]
        terms.append("log_distance" if cfg["cost_func"] == "pow" else "distance")
        if cfg["cross_border"]:
            terms.append("cross_border")
        if cfg["contiguity"]:
            terms.append("contiguous")
        return terms

    @override
    def nodes(self, data: xr.Dataset | None = None) -> list[str]:
        nodes = ["beta"]
        if self.constraint == "none":
            nodes.insert(0, "intercept")
        if "cross_border" in self.candidate_terms():
            nodes.append("cross_border")
        if self.config["country_effects"] and self.constraint in ("none", "attraction"):
            nodes += ["country_effect", "sigma_country"]
        if self.config["country_slopes"]:
            nodes += ["country_slope", "sigma_slope"]
        if self.constraint == "doubly":
            nodes.append("destination_effect")
        return nodes

    @override
    def summary_vars(self) -> list[str]:
        return ["intercept", "beta", "sigma_country"]

    @override
    def pair_names(self, state: Mapping[str, Any] | None = None) -> list[str]:
        names = ["distance_km"]
        terms = (state or {}).get("terms") or self.candidate_terms()
        names += [t for t in ("cross_border", "contiguous") if t in terms]
        return names

    @override
    def pair_values(self, data, origin_idx, dest_idx, state=None):
        if "contiguous" in self.pair_names(state) and "contiguous" not in data:
            raise ModelConfigError(
                "contiguity=True needs the pair variable 'contiguous' in the dataset; "
                "Fix: build the dataset from unit geometries or pass contiguity=False"
            )
        return super().pair_values(data, origin_idx, dest_idx, state)

    @override
    def features(self, data: xr.Dataset) -> Features:
        feats = super().features(data)
        cfg = self.config
        for name in {*cfg["origin_covariates"], *cfg["destination_covariates"]}:
            feats.unit_values[name] = unit_variable(data, name)
        return feats

    @staticmethod
    def term_matrix(
        terms: Sequence[str],
        features: Features,
        origin_idx: np.ndarray,
        dest_idx: np.ndarray,
        pair_vals: Mapping[str, np.ndarray],
    ) -> np.ndarray:
        """Raw term values ``(pair, term)``."""
        cols = []
        for term in terms:
            if term.startswith("origin:"):
                cols.append(features.unit_values[term.split(":", 1)[1]][origin_idx])
            elif term.startswith("destination:"):
                cols.append(features.unit_values[term.split(":", 1)[1]][dest_idx])
            elif term == "log_distance":
                cols.append(np.log(pair_vals["distance_km"]))
            elif term == "distance":
                cols.append(np.asarray(pair_vals["distance_km"], dtype=float))
            else:
                cols.append(np.asarray(pair_vals[term], dtype=float))
        if not cols:
            return np.zeros((len(origin_idx), 0))
        return np.column_stack(cols)

    def design(self, data: xr.Dataset, pairs: LatentPairs, terms: Sequence[str]) -> np.ndarray:
        """Raw term values ``(row, term)`` of the latent rows ``pairs``."""
        feats = self.features(data)
        pvals = self.pair_values(data, pairs.origin_idx, pairs.dest_idx, {"terms": list(terms)})
        return self.term_matrix(terms, feats, pairs.origin_idx, pairs.dest_idx, pvals)

    def data_priors(self, data: xr.Dataset, reference: Any) -> dict[str, Any]:
        """Centre the intercept on the log observed rate of the reference source."""
        if reference is None:
            return {}
        rate = reference.observed_rate()
        if rate is None:
            return {}
        return {
            "intercept": {"dist": "Normal", "mu": float(np.log(max(rate, 1e-6))), "sigma": 5.0}
        }

    def fit_state(self, data: xr.Dataset, pairs: LatentPairs) -> dict[str, Any]:
        """Terms, their means and sds over ``pairs``, the countries with effects."""
        feats = self.features(data)
        terms = self.candidate_terms()
        X = self.design(data, pairs, terms)
        means, sds = [], []
        for k, term in enumerate(terms):
            col = X[:, k]
            if not np.all(np.isfinite(col)):
                raise ModelConfigError(
                    f"term '{term}' has NaN or infinite values on observed pairs; "
                    "Fix: fill the covariate or drop it from the model"
                )
            sd = float(np.std(col))
            if sd == 0:
                if term in ("cross_border", "contiguous"):
                    # no observed pair varies in it: keep it on its raw 0/1 scale with its prior
                    means.append(0.0)
                    sds.append(1.0)
                    continue
                raise ModelConfigError(
                    f"covariate term '{term}' has zero variance over the observed pairs "
                    f"(every value is {col[0]:g}); Fix: drop it from origin_/destination_covariates"
                )
            means.append(float(np.mean(col)))
            sds.append(sd)
        country_all = feats.country
        countries = sorted(set(country_all[pairs.origin_idx]))
        use_ce = self._has_country_effects(countries)
        slopes = list(self.config["country_slopes"])
        unknown = sorted(set(slopes) - set(terms))
        if unknown:
            raise ModelConfigError(
                f"country_slopes names term(s) {unknown} not in the model; terms are {terms}"
            )
        # country effects wanted, but the flows observed come from one country: no spread
        # of levels can be learnt, so the other countries' levels are drawn from the
        # prior of sigma_country at prediction time (their intervals are the prior's)
        wanted = self.config["country_effects"] and self.constraint in ("none", "attraction")
        unseen = sorted(set(country_all) - set(countries)) if wanted and not use_ce else []
        state: dict[str, Any] = {
            "terms": terms,
            "term_mean": means,
            "term_sd": sds,
            "informed_terms": [t for t, s in zip(terms, np.std(X, axis=0), strict=True) if s > 0],
            "countries": countries if (use_ce or slopes) else [],
            "prior_countries": unseen,
            "fitted_countries": countries,
            # "auto" is resolved by the model: centred for NUTS, non-centred for the
            # approximations (a centred hierarchy has its joint mode at sigma_country -> 0)
            "noncentered": self.config["noncentered"],
        }
        if self.constraint == "doubly":
            dests = np.unique(pairs.dest_idx)
            state["destination_units"] = feats.unit[dests].tolist()
        return state

    def _has_country_effects(self, countries: Sequence[str]) -> bool:
        return (
            self.config["country_effects"]
            and self.constraint in ("none", "attraction")
            and len(countries) > 1
        )

    def _beta(
        self, terms: list[str], sds: np.ndarray, prior: PriorFactory, priors: Mapping
    ) -> Any:
        """``beta`` over ``term``; the ``cross_border`` prior (raw scale) on its element."""
        spec = priors.get("beta")
        cb = priors.get("cross_border")
        if cb is None or "cross_border" not in terms:
            return prior("beta", dims="term")
        if not (
            isinstance(spec, Mapping)
            and spec.get("dist") == "Normal"
            and isinstance(cb, Mapping)
            and cb.get("dist") == "Normal"
        ):
            raise ModelConfigError(
                "the 'cross_border' prior (raw scale) combines only with a Normal 'beta' prior; "
                "Fix: give both as {'dist': 'Normal', 'mu': ..., 'sigma': ...}, or set the "
                "cross_border prior to None to use the 'beta' prior for every term"
            )
        k = terms.index("cross_border")
        mu = np.full(len(terms), float(spec.get("mu", 0.0)))
        sigma = np.full(len(terms), float(spec.get("sigma", 1.0)))
        mu[k] = float(cb.get("mu", 0.0)) * sds[k]
        sigma[k] = float(cb.get("sigma", 1.0)) * sds[k]
        return pm.Normal("beta", mu=mu, sigma=sigma, dims="term")

    def add(self, data, pairs, state, prior):
        """Register intercept, beta (standardised), country effects; return eta ``(pair,)``.

        For constrained forms eta is the *unnormalised* log choice weight (no
        intercept or origin effects); the constrained observation model normalises it.
        """
        terms = list(state["terms"])
        means = np.asarray(state["term_mean"], dtype=float)
        sds = np.asarray(state["term_sd"], dtype=float)
        feats = self.features(data)
        X = self.design(data, pairs, terms)
        Xs = (X - means) / sds if len(terms) else X
        countries = list(state["countries"])
        use_ce = self._has_country_effects(countries)
        slopes = list(self.config["country_slopes"])
        model = pm.modelcontext(None)
        model.add_coords({"term": terms})
        beta = self._beta(terms, sds, prior, getattr(prior, "priors", {}))
        eta_lin = pt.dot(Xs, beta)
        # linear pieces: (constant weight-vector transform, coefficient tensor)
        pieces: list[tuple[Callable[[np.ndarray], np.ndarray], Any]] = [(lambda w: Xs.T @ w, beta)]
        if self.constraint == "none":
            intercept = prior("intercept")
            eta = intercept + eta_lin
            pm.Deterministic("intercept_raw", intercept - pt.sum(beta * means / sds))
            pieces.append((lambda w: np.sum(w), intercept))
        else:
            eta = eta_lin
        pm.Deterministic("beta_raw", beta / sds, dims="term")
        cidx = None
        if use_ce or slopes:
            model.add_coords({"country": countries})
            cidx = np.searchsorted(countries, feats.country[pairs.origin_idx])
        n_c = len(countries)
        if use_ce:
            sigma = prior("sigma_country")
            if state.get("noncentered") is True:
                z = prior("country_effect_z", key="country_effect", dims="country")
                ce = pm.Deterministic("country_effect", sigma * z, dims="country")
                eta = eta + ce[cidx]
                pieces.append((lambda w: np.bincount(cidx, weights=w, minlength=n_c), ce))
            elif self.constraint == "none":
                # country intercepts centred on the global intercept: the data pin each
                # country's level, so NUTS and Laplace do not walk the intercept /
                # country-effect ridge; country_effect = country_intercept - intercept
                level = pm.Normal("country_intercept", intercept, sigma, dims="country")
                pm.Deterministic("country_effect", level - intercept, dims="country")
                eta = eta_lin + level[cidx]
                pieces = [
                    pieces[0],
                    (lambda w: np.bincount(cidx, weights=w, minlength=n_c), level),
                ]
            else:
                ce = pm.Normal("country_effect", 0.0, sigma, dims="country")
                eta = eta + ce[cidx]
                pieces.append((lambda w: np.bincount(cidx, weights=w, minlength=n_c), ce))
        if slopes:
            model.add_coords({"slope_term": slopes})
            sig_s = prior("sigma_slope")
            zs = prior("country_slope_z", key="country_slope", dims=("slope_term", "country"))
            cs = pm.Deterministic("country_slope", sig_s * zs, dims=("slope_term", "country"))
            kidx = [terms.index(t) for t in slopes]
            contrib = pt.sum(Xs[:, kidx] * cs[:, cidx].T, axis=1)
            eta = eta + contrib
            pieces.append((None, contrib))
        if self.constraint == "doubly":
            dests_units = list(state["destination_units"])
            model.add_coords({"destination_unit": dests_units})
            model.add_coords({"destination_free": np.arange(len(dests_units) - 1)})
            free = prior(
                "destination_effect_free", key="destination_effect", dims="destination_free"
            )
            delta = pm.Deterministic(
                "destination_effect", pt.concatenate([pt.zeros(1), free]), dims="destination_unit"
            )
            didx = unit_positions_in(feats.unit[pairs.dest_idx], dests_units)
            eta = eta + delta[didx]
            n_d = len(dests_units)
            pieces.append((lambda w: np.bincount(didx, weights=w, minlength=n_d), delta))

        def linear(w: np.ndarray) -> Any:
            w = np.asarray(w, dtype=float)
            out = 0.0
            for transform, coef in pieces:
                if transform is None:  # per-pair contribution: dot over the weighted pairs
                    nz = np.flatnonzero(w)
                    out = out + pt.dot(w[nz], coef[nz])
                else:
                    out = out + pt.dot(transform(w), coef)
            return out

        return LatentTerm(eta=eta, linear=linear)

    @override
    def prediction_params(self, posterior, data, state, *, rng):
        params: dict[str, Any] = {
            "beta": stack_samples(posterior["beta"]),
            "term_mean": np.asarray(state["term_mean"]),
            "term_sd": np.asarray(state["term_sd"]),
            "terms": list(state["terms"]),
        }
        n_samples = params["beta"].shape[0]
        params["intercept"] = (
            stack_samples(posterior["intercept"])
            if "intercept" in posterior
            else np.zeros(n_samples)
        )
        unit_country = np.asarray(data["country"].values).astype(str)
        countries = list(state.get("countries") or [])
        ce_unit = np.zeros((n_samples, len(unit_country)))
        if "country_effect" in posterior:
            ce = stack_samples(posterior["country_effect"])
            sigma = stack_samples(posterior["sigma_country"])
            new = sorted(set(unit_country) - set(countries))
            drawn = rng.normal(size=(n_samples, len(new))) * sigma[:, None]
            table = dict(zip(countries, ce.T, strict=True)) | dict(zip(new, drawn.T, strict=True))
            ce_unit = np.stack([table[c] for c in unit_country], axis=1)
        elif state.get("prior_countries"):
            from flowmodel.models.priors import DEFAULT_PRIORS, draw_prior

            spec = state.get("sigma_country_prior") or DEFAULT_PRIORS["sigma_country"]
            sigma = np.asarray(draw_prior(spec, n_samples, rng), dtype=float).reshape(n_samples)
            new = list(state["prior_countries"])
            drawn = rng.normal(size=(n_samples, len(new))) * sigma[:, None]
            table = dict(zip(new, drawn.T, strict=True))
            zero = np.zeros(n_samples)
            ce_unit = np.stack([table.get(c, zero) for c in unit_country], axis=1)
        params["country_effect_unit"] = ce_unit
        if "country_slope" in posterior:
            cs = stack_samples(posterior["country_slope"])  # (S, slope_term, country)
            sig = stack_samples(posterior["sigma_slope"])
            slopes = list(self.config["country_slopes"])
            new = sorted(set(unit_country) - set(countries))
            drawn = rng.normal(size=(n_samples, len(slopes), len(new))) * sig[:, None, None]
            full = np.concatenate([cs, drawn], axis=2)
            order = {c: k for k, c in enumerate(countries + new)}
            params["country_slope_unit"] = full[:, :, [order[c] for c in unit_country]]
            params["slope_idx"] = [params["terms"].index(t) for t in slopes]
        if "destination_effect" in posterior:
            de = stack_samples(posterior["destination_effect"])
            units = np.asarray(data["unit"].values).astype(str)
            table = dict(zip(state["destination_units"], de.T, strict=True))
            params["destination_effect_unit"] = np.stack(
                [table.get(u, np.full(n_samples, np.nan)) for u in units], axis=1
            )
        return params

    @override
    def log_rate(self, params, features, origin_idx, dest_idx, pair_vals):
        X = self.term_matrix(params["terms"], features, origin_idx, dest_idx, pair_vals)
        Xs = (X - params["term_mean"]) / params["term_sd"]
        eta = params["intercept"][:, None] + params["beta"] @ Xs.T
        eta = eta + params["country_effect_unit"][:, origin_idx]
        if "country_slope_unit" in params:
            for k, t in enumerate(params["slope_idx"]):
                eta = eta + params["country_slope_unit"][:, k, origin_idx] * Xs[None, :, t]
        if "destination_effect_unit" in params:
            eta = eta + params["destination_effect_unit"][:, dest_idx]
        return eta


def unit_positions_in(names: np.ndarray, reference: Sequence[str]) -> np.ndarray:
    """Positions of ``names`` in the list ``reference``."""
    pos = pd.Series(np.arange(len(reference)), index=list(reference))
    return pos.reindex(np.asarray(names).astype(str)).to_numpy().astype(int)


# ========================================================================== radiation
def _log1mexp(x):
    """``log(1 - exp(x))`` for ``x < 0`` (numpy or PyTensor)."""
    if isinstance(x, np.ndarray | float | np.floating):
        return np.where(x > -0.693, np.log(-np.expm1(x)), np.log1p(-np.exp(x)))
    return pt.switch(x > -0.693, pt.log(-pt.expm1(x)), pt.log1p(-pt.exp(x)))


def _np_softplus(x):
    with np.errstate(invalid="ignore"):
        return np.logaddexp(0.0, x)


def radiation_log_probability(m, n, s, total, alpha=None, *, finite_size: bool = True):
    r"""Log of the (normalised) radiation probability :math:`p_{ij}`, numpy or PyTensor.

    Original (``alpha is None``; Simini et al. 2012):

    .. math::

        p_{ij} = \frac{m_i n_j}{(m_i + s_{ij})(m_i + n_j + s_{ij})}

    Extended (Yang et al. 2014, exponent :math:`\alpha`):

    .. math::

        p_{ij} = \frac{[(m_i + s_{ij} + n_j)^\alpha - (m_i + s_{ij})^\alpha]\,(m_i^\alpha + 1)}
                      {[(m_i + s_{ij})^\alpha + 1]\,[(m_i + s_{ij} + n_j)^\alpha + 1]}

    which is :math:`(P(m_i+s_{ij}) - P(m_i+s_{ij}+n_j)) / P(m_i)` with the survival
    function :math:`P(x) = 1/(x^\alpha + 1)`; at :math:`\alpha = 1` and large
    :math:`m_i` it reduces to the original law. With ``finite_size`` the
    probabilities are divided by their sum over an (unbounded-order) system of
    total population :math:`M`: :math:`1 - m_i/M` (original, Masucci et al.
    2013) or :math:`1 - (m_i^\alpha+1)/(M^\alpha+1)` (extended; the sum
    telescopes the same way).

    Parameters
    ----------
    m, n, s
        Origin population, destination population and intervening population.
    total
        Total population :math:`M` of the system.
    alpha
        Extended-radiation exponent, or None for the original law.
    """
    lib = (
        np
        if isinstance(m, np.ndarray) and (alpha is None or isinstance(alpha, np.ndarray | float))
        else pt
    )
    if lib is np:
        with np.errstate(invalid="ignore", divide="ignore"):
            return _radiation_logp(np, m, n, s, total, alpha, finite_size)
    return _radiation_logp(pt, m, n, s, total, alpha, finite_size)


def _radiation_logp(lib, m, n, s, total, alpha, finite_size):
    if alpha is None:
        logp = lib.log(m) + lib.log(n) - lib.log(m + s) - lib.log(m + n + s)
        if finite_size:
            logp = logp - lib.log1p(-m / total)
        return logp
    la = alpha * lib.log(m + s)
    lb = alpha * lib.log(m + s + n)
    lc = alpha * lib.log(m)
    softplus = _np_softplus if lib is np else pt.softplus
    logp = lb + _log1mexp(la - lb) + softplus(lc) - softplus(la) - softplus(lb)
    if finite_size:
        lm = alpha * lib.log(total)
        logp = logp - _log1mexp(softplus(lc) - softplus(lm))
    return logp


def intervening_rows(
    population: np.ndarray, distance_rows: np.ndarray, rows: np.ndarray
) -> np.ndarray:
    """Intervening population ``s_ij`` for some origin rows (closed-disk tie rule).

    Same rule as :func:`flowmodel.pairs.intervening_population`: units ``k``
    other than ``i`` and ``j`` with ``d_ik <= d_ij``.

    Parameters
    ----------
    population
        ``(n,)`` populations.
    distance_rows
        ``(len(rows), n)`` distances from each origin in ``rows``.
    rows
        Unit positions of the origins.
    """
    population = np.asarray(population, dtype=float)
    out = np.full(distance_rows.shape, np.nan)
    for r, i in enumerate(rows):
        d = np.array(distance_rows[r], dtype=float)
        d[i] = np.inf
        order = np.argsort(d, kind="stable")
        sd = d[order]
        cum = np.concatenate([[0.0], np.cumsum(population[order])])
        upto = np.searchsorted(sd, d, side="right")
        out[r] = cum[upto] - population
        out[r, i] = np.nan
    return out


class RadiationField(LatentField):
    r"""Radiation field with fitted emigration rate ``tau``.

    .. math::

        \eta_{ij} = \log \tau_{c(i)} + \log m_i + \log \frac{p_{ij}}{1 - m_i/M}

    with :math:`p_{ij}` from :func:`radiation_log_probability`.
    """

    default_config: ClassVar[dict[str, Any]] = {
        "variant": "original",
        "per_country_tau": False,
        "finite_size": True,
        "mass": "population",
    }

    @override
    def validate(self) -> None:
        self._choice("variant", ("original", "extended"), "RadiationModel")

    @override
    def nodes(self, data: xr.Dataset | None = None) -> list[str]:
        nodes = ["tau"]
        if self.config["variant"] == "extended":
            nodes.append("radiation_exponent")
        return nodes

    @override
    def summary_vars(self) -> list[str]:
        return ["tau", "radiation_exponent"]

    @override
    def pair_names(self, state=None) -> list[str]:
        return ["distance_km", "intervening_population"]

    @override
    def features(self, data: xr.Dataset) -> Features:
        feats = super().features(data)
        mass = unit_variable(data, self.config["mass"])
        if np.any(mass <= 0):
            bad = np.asarray(data["unit"].values)[mass <= 0][:10].tolist()
            raise ModelConfigError(
                f"radiation mass '{self.config['mass']}' must be > 0; units {bad} are not. "
                "Fix: drop empty units or give them a small positive population"
            )
        feats.unit_values["mass"] = mass
        feats.unit_values["total"] = np.array([mass.sum()])
        return feats

    @override
    def pair_values(self, data, origin_idx, dest_idx, state=None):
        if "intervening_population" in data:
            s = pair_values(data, "intervening_population", origin_idx, dest_idx)
        else:
            s = self._intervening(data)[origin_idx, dest_idx]
        return {"intervening_population": s}

    @override
    def pair_block(self, data, start, stop, state=None):
        if "intervening_population" in data:
            return super().pair_block(data, start, stop, state)
        mass = unit_variable(data, self.config["mass"])
        dist = np.asarray(
            data["distance_km"]
            .transpose("origin", "destination")
            .isel(origin=slice(start, stop))
            .values,
            dtype=float,
        )
        s = intervening_rows(mass, dist, np.arange(start, stop))
        return {"intervening_population": s.ravel()}

    def _intervening(self, data: xr.Dataset) -> np.ndarray:
        cache = getattr(self, "_s_cache", None)
        key = id(data)
        if cache is not None and cache[0] == key:
            return cache[1]
        from flowmodel.pairs import intervening_population

        mass = unit_variable(data, self.config["mass"])
        dist = data["distance_km"].transpose("origin", "destination").values
        s = np.asarray(intervening_population(mass, dist))
        self._s_cache = (key, s)
        return s

    def _logp(self, data: xr.Dataset, pairs: LatentPairs, alpha: Any) -> tuple[Any, np.ndarray]:
        feats = self.features(data)
        m = feats.unit_values["mass"]
        mi, nj = m[pairs.origin_idx], m[pairs.dest_idx]
        s = self.pair_values(data, pairs.origin_idx, pairs.dest_idx)["intervening_population"]
        if np.any(~np.isfinite(s)):
            raise ModelConfigError(
                "intervening_population has NaN on observed pairs; Fix: recompute it with "
                "flowmodel.pairs.intervening_population or drop the variable"
            )
        total = float(feats.unit_values["total"][0])
        logp = radiation_log_probability(
            mi, nj, s, total, alpha, finite_size=self.config["finite_size"]
        )
        return logp, mi

    def data_priors(self, data: xr.Dataset, reference: Any) -> dict[str, Any]:
        """``tau`` centred on the observed emigration rate of the reference source."""
        if reference is None or reference.aggregated:
            return {}
        pairs = LatentPairs(reference.origin_idx, reference.dest_idx)
        logp, mi = self._logp(data, pairs, None)
        obs = reference.observed
        expected = np.sum(reference.exposure[obs] * mi[obs] * np.exp(logp[obs]))
        rate = max(np.sum(reference.y[obs]), 1.0) / max(expected, 1e-300)
        return {"tau": {"dist": "LogNormal", "mu": float(np.log(rate)), "sigma": 2.0}}

    @override
    def fit_state(self, data: xr.Dataset, pairs: LatentPairs) -> dict[str, Any]:
        feats = self.features(data)
        countries = sorted(set(feats.country[pairs.origin_idx]))
        return {"total_mass": float(feats.unit_values["total"][0]), "countries": countries}

    def add(self, data, pairs, state, prior):
        """Register ``tau`` (and ``radiation_exponent``); return log rates ``(pair,)``."""
        alpha = prior("radiation_exponent") if self.config["variant"] == "extended" else None
        logp, mi = self._logp(data, pairs, alpha)
        countries = list(state["countries"])
        if self.config["per_country_tau"]:
            pm.modelcontext(None).add_coords({"country": countries})
            tau = prior("tau", dims="country")
            country = np.asarray(data["country"].values).astype(str)
            cidx = np.searchsorted(countries, country[pairs.origin_idx])
            log_tau = pt.log(tau)[cidx]
        else:
            log_tau = pt.log(prior("tau"))
        return LatentTerm(eta=log_tau + np.log(mi) + logp, linear=None)

    @override
    def prediction_params(self, posterior, data, state, *, rng):
        tau = stack_samples(posterior["tau"])
        n_samples = tau.shape[0]
        unit_country = np.asarray(data["country"].values).astype(str)
        if tau.ndim == 2:
            countries = list(posterior["country"].values.astype(str))
            cols = []
            for c in unit_country:
                if c in countries:
                    cols.append(tau[:, countries.index(c)])
                else:
                    pick = rng.integers(len(countries), size=n_samples)
                    cols.append(tau[np.arange(n_samples), pick])
            tau_unit = np.stack(cols, axis=1)
        else:
            tau_unit = np.repeat(tau[:, None], len(unit_country), axis=1)
        return {
            "tau_unit": tau_unit,
            "alpha": stack_samples(posterior["radiation_exponent"])
            if "radiation_exponent" in posterior
            else None,
        }

    @override
    def log_rate(self, params, features, origin_idx, dest_idx, pair_vals):
        m = features.unit_values["mass"]
        total = float(features.unit_values["total"][0])
        mi, nj = m[origin_idx], m[dest_idx]
        s = np.asarray(pair_vals["intervening_population"], dtype=float)
        alpha = params["alpha"]
        if alpha is None:
            logp = radiation_log_probability(
                mi, nj, s, total, None, finite_size=self.config["finite_size"]
            )[None, :]
        else:
            logp = radiation_log_probability(
                mi[None, :],
                nj[None, :],
                s[None, :],
                total,
                np.asarray(alpha, dtype=float)[:, None],
                finite_size=self.config["finite_size"],
            )
        return np.log(params["tau_unit"][:, origin_idx]) + np.log(mi)[None, :] + logp


# ============================================================================ periods
#: Options of the temporal structure of :class:`TemporalGravityField` and their defaults.
TEMPORAL_DEFAULTS: dict[str, Any] = {
    "periods": None,
    "trend": "rw",
    "pair_effect": True,
    "pair_walk": False,
    "unit_trends": True,
    "noncentered": "pairs",
    "covariates": "by_period",
}
#: Kinds of the country trend.
TRENDS = ("rw", "ar1", "none")
#: Default priors of the temporal nodes (scales are per year, or per sqrt(year) for walks).
TEMPORAL_PRIORS: dict[str, dict[str, Any]] = {
    # sd of the pair effects: how far a corridor sits above or below the gravity surface
    # (log scale); a gravity fit's residual sd is typically 0.5-1.5
    "sigma_pair": {"dist": "HalfNormal", "sigma": 1.5},
    # walk scales are per sqrt(year), LogNormal: few countries and few rounds inform them
    # little, so the prior decides how fast intervals widen; a LogNormal is Gaussian on the
    # log scale where Laplace approximates it (a HalfNormal's long log-scale tail made
    # Laplace draws of a barely informed trend scale explode the forecast mean).
    # Country trend: median 0.05 (a decade moves a country's level by ~16%, one sd),
    # 95% prior interval 0.011-0.22
    "sigma_trend": {"dist": "LogNormal", "mu": float(np.log(0.05)), "sigma": 0.75},
    # AR(1) coefficient per year of an "ar1" trend (mean 0.8; a decade keeps ~0.1 of a shock)
    "trend_rho": {"dist": "Beta", "alpha": 8.0, "beta": 2.0},
    # origin and destination unit walks (a unit's out- or in-migration drifting apart
    # from its country's): same prior
    "sigma_origin_trend": {"dist": "LogNormal", "mu": float(np.log(0.05)), "sigma": 0.75},
    # pair walk: a corridor's own drift (per sqrt(year)), beside the shared pair effect
    "sigma_pair_walk": {"dist": "LogNormal", "mu": float(np.log(0.05)), "sigma": 0.75},
    "sigma_destination_trend": {"dist": "LogNormal", "mu": float(np.log(0.05)), "sigma": 0.75},
}


@dataclass
class PeriodFeatures(Features):
    """Unit inputs of a temporal field: ``slots[k]`` holds the covariates at slot ``k``'s time."""

    slots: list[Features] = field(default_factory=list)


def _walk_at(
    states: np.ndarray,
    times: np.ndarray,
    time: float,
    sigma: np.ndarray,
    rho: np.ndarray | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """Draw a random walk (``rho`` None) or AR(1) process ``(S, K)`` at ``time``.

    ``states`` ``(S, K, T)`` are the process at the fitted ``times``: the value at a
    fitted time is returned as is; between two fitted times it is drawn from the
    bridge (conditional on both neighbours); before the first or after the last
    it is propagated from the nearest (variance growing with the gap).
    """
    n_s, n_k, _ = states.shape
    hit = np.flatnonzero(np.abs(times - time) < 1e-9)
    if hit.size:
        return states[:, :, int(hit[0])].copy()
    z = rng.standard_normal((n_s, n_k))
    sig2 = (sigma**2)[:, None]
    if rho is None:

        def step(x: np.ndarray, gap: float) -> tuple[np.ndarray, np.ndarray]:
            return x, sig2 * gap * np.ones_like(x)

    else:
        r = np.asarray(rho, dtype=float)[:, None]
        stat = sig2 / (1.0 - r**2)

        def step(x: np.ndarray, gap: float) -> tuple[np.ndarray, np.ndarray]:
            phi = r**gap
            return phi * x, stat * (1.0 - phi**2) * np.ones_like(x)

    if time > times[-1]:
        mean, var = step(states[:, :, -1], time - times[-1])
    elif time < times[0]:
        mean, var = step(states[:, :, 0], times[0] - time)
    else:
        k1 = int(np.searchsorted(times, time))
        k0 = k1 - 1
        a, b = time - times[k0], times[k1] - time
        left_mean, left_var = step(states[:, :, k0], a)
        if rho is None:
            g = a + b
            mean = states[:, :, k0] + a / g * (states[:, :, k1] - states[:, :, k0])
            var = sig2 * a * b / g * np.ones_like(mean)
        else:
            phi_b = np.asarray(rho, dtype=float)[:, None] ** b
            _, right_var = step(np.zeros_like(left_mean), b)
            prec = 1.0 / left_var + phi_b**2 / right_var
            var = 1.0 / prec
            mean = var * (left_mean / left_var + phi_b * states[:, :, k1] / right_var)
    return mean + np.sqrt(np.maximum(var, 0.0)) * z


class TemporalGravityField(GravityField):
    r"""Gravity field with periods: the log rate of moves per year in each latent period.

    :math:`\eta_{ijt}` is the log of the expected moves per year from :math:`i` to
    :math:`j` during latent period :math:`t`:

    .. math::

        \eta_{ijt} = \alpha + \gamma_{c(i)} + \sum_k \beta_k \tilde x_{k,ijt} + u_{ij}
            + \tau_{c(i),t} + o_{i,t} + d_{j,t}

    - :math:`\tilde x_{k,ijt}`: the gravity terms with unit covariates at the period's
      midpoint (``<var>_by_date`` interpolated log-linearly, see
      :mod:`flowmodel.periods`; a covariate held once is the same in every period),
      standardised over the latent rows;
    - :math:`u_{ij} \sim N(0, \sigma_{\text{pair}}^2)`: the **pair effect**, shared by
      every period, one per pair observed in some period (``pair_effect``): the old
      census's corridors carry forward; a pair never observed gets a fresh draw;
    - :math:`\tau_{c,t}`: the **country trend** of the origin country (``trend``):
      ``"rw"`` a random walk over the period midpoints anchored at 0 in the first
      period, steps :math:`N(0, \sigma_{\text{trend}}^2\,\Delta)` for a gap of
      :math:`\Delta` years (irregular census rounds: the variance scales with the
      gap); ``"ar1"`` a stationary AR(1) with coefficient :math:`\rho` per year
      (:math:`\tau_{t+\Delta} = \rho^\Delta \tau_t + N(0, s^2(1-\rho^{2\Delta}))`,
      :math:`s^2 = \sigma_{\text{trend}}^2/(1-\rho^2)`); ``"none"``;
    - :math:`o_{i,t}, d_{j,t}`: origin and destination **unit walks** (``unit_trends``),
      random walks like the trend, one per unit of a latent pair.

    Predictions for a period that is not a latent period draw the trends and walks
    there (the bridge between two fitted periods, or propagated from the nearest one),
    so intervals widen with the distance from the last observed window.

    Parameters
    ----------
    temporal
        ``periods`` (latent period labels; default: from the observed windows, see
        :func:`flowmodel.periods.latent_periods`), ``trend`` (``"rw"``, ``"ar1"``,
        ``"none"``), ``pair_effect`` (bool), ``pair_walk`` (bool: each observed pair's
        effect also walks, so the latest round weighs more for it), ``unit_trends``
        (bool), ``noncentered``
        (``"pairs"``: pair effects as ``sigma_pair * z``, walk steps centred — the
        default, for every backend; True: walk steps too; False: neither).
    **config
        The options of :class:`GravityField` (unconstrained only).
    """

    @override
    def validate(self) -> None:
        super().validate()
        spec = self.config.get("temporal")
        if spec is True:
            spec = {}
        if not isinstance(spec, Mapping):
            raise ModelConfigError(
                f"temporal={spec!r}: expected a table of options {sorted(TEMPORAL_DEFAULTS)} "
                "(or True for the defaults). Fix: e.g. temporal={'trend': 'rw'}"
            )
        unknown = sorted(set(spec) - set(TEMPORAL_DEFAULTS))
        if unknown:
            raise ModelConfigError(
                f"temporal: unknown option(s) {unknown}; valid options are "
                f"{sorted(TEMPORAL_DEFAULTS)}"
            )
        merged = TEMPORAL_DEFAULTS | dict(spec)
        if merged["noncentered"] not in (True, False, "pairs"):
            raise ModelConfigError(
                f"temporal: noncentered={merged['noncentered']!r} is not valid; use 'pairs', "
                "True or False"
            )
        if merged["covariates"] not in ("by_period", "fixed"):
            raise ModelConfigError(
                f"temporal: covariates={merged['covariates']!r} is not valid; use 'by_period' "
                "(dated covariates at each period's midpoint) or 'fixed' (the static values)"
            )
        if merged["trend"] not in TRENDS:
            raise ModelConfigError(
                f"temporal: trend={merged['trend']!r} is not valid; use one of {list(TRENDS)}"
            )
        if merged["periods"] is not None:
            from flowmodel.periods import parse_period

            merged["periods"] = [parse_period(p).label for p in merged["periods"]]
        if self.constraint != "none":
            raise ModelConfigError(
                f"temporal: constraint={self.constraint!r} conditions on one round's margins; "
                "a model with periods needs constraint='none'"
            )
        self._temporal = merged

    @property
    @override
    def temporal(self) -> dict[str, Any]:
        return dict(self._temporal)

    @override
    def nodes(self, data: xr.Dataset | None = None) -> list[str]:
        nodes = super().nodes(data)
        opts = self._temporal
        if opts["pair_effect"]:
            nodes.append("sigma_pair")
        if opts["pair_effect"] and opts["pair_walk"]:
            nodes.append("sigma_pair_walk")
        if opts["trend"] != "none":
            nodes.append("sigma_trend")
        if opts["trend"] == "ar1":
            nodes.append("trend_rho")
        if opts["unit_trends"]:
            nodes += ["sigma_origin_trend", "sigma_destination_trend"]
        return nodes

    @override
    def summary_vars(self) -> list[str]:
        return [
            *super().summary_vars(),
            "sigma_pair",
            "sigma_trend",
            "trend_rho",
            "sigma_origin_trend",
            "sigma_destination_trend",
        ]

    @override
    def default_priors(self) -> dict[str, Any]:
        return dict(TEMPORAL_PRIORS)

    # ------------------------------------------------------------------ covariates
    def features_at(self, data: xr.Dataset, times: Sequence[float | None]) -> PeriodFeatures:
        """Return the unit covariates at each of ``times`` (decimal years; None: static)."""
        from flowmodel.periods import covariate_at

        base = self.features(data)
        if self._temporal["covariates"] == "fixed":
            times = [None] * len(times)
        slots = []
        for time in times:
            values = {}
            for name, static in base.unit_values.items():
                at = covariate_at(data, name, time)
                values[name] = static if at is None else at
            slots.append(Features(unit=base.unit, country=base.country, unit_values=values))
        return PeriodFeatures(
            unit=base.unit, country=base.country, unit_values=base.unit_values, slots=slots
        )

    @staticmethod
    def _times(periods: Sequence[str]) -> list[float]:
        from flowmodel.periods import parse_period

        return [parse_period(p).midpoint for p in periods]

    @override
    def design(self, data: xr.Dataset, pairs: LatentPairs, terms: Sequence[str]) -> np.ndarray:
        periods = pairs.periods or [None]
        times = self._times(pairs.periods) if pairs.periods else [None]
        feats = self.features_at(data, times)
        t = pairs.period_idx if pairs.period_idx is not None else np.zeros(pairs.n, dtype=int)
        pvals = self.pair_values(data, pairs.origin_idx, pairs.dest_idx, {"terms": list(terms)})
        X = np.empty((pairs.n, len(terms)))
        for k in range(len(periods)):
            rows = np.flatnonzero(t == k)
            if rows.size == 0:
                continue
            X[rows] = self.term_matrix(
                terms,
                feats.slots[k],
                pairs.origin_idx[rows],
                pairs.dest_idx[rows],
                {name: v[rows] for name, v in pvals.items()},
            )
        return X

    # ------------------------------------------------------------------ build
    @override
    def fit_state(self, data: xr.Dataset, pairs: LatentPairs) -> dict[str, Any]:
        if not pairs.periods:
            raise ModelConfigError(
                "TemporalGravityField.fit_state needs latent pairs with periods "
                "(LatentPairs(..., period_idx=..., periods=[...]))"
            )
        state = super().fit_state(data, pairs)
        units = np.asarray(data["unit"].values).astype(str)
        country = np.asarray(data["country"].values).astype(str)
        state.update(
            periods=list(pairs.periods),
            times=self._times(pairs.periods),
            temporal=self.temporal,
            trend_countries=sorted(set(country[pairs.origin_idx])),
            origin_units=units[np.unique(pairs.origin_idx)].tolist(),
            destination_units_trend=units[np.unique(pairs.dest_idx)].tolist(),
            n_latent_pairs=len(np.unique(pairs.origin_idx * len(units) + pairs.dest_idx)),
        )
        return state

    def _walk(
        self,
        name: str,
        dim: str,
        labels: Sequence[str],
        times: np.ndarray,
        prior: PriorFactory,
        *,
        ar1: bool = False,
    ) -> Any:
        """Register a random walk (or AR(1)) ``name`` over (``dim``, ``latent_period``)."""
        model = pm.modelcontext(None)
        model.add_coords({dim: list(labels)})
        sigma = prior(f"sigma_{name}")
        n_t = len(times)
        if not ar1 and n_t == 1:
            # one period: the walk is at its anchor; sigma keeps its prior for predictions
            walk = pt.zeros((len(labels), 1))
        elif not ar1:
            scale = sigma * np.sqrt(np.diff(times))[None, :]
            steps = self._effect(f"{name}_step", scale, (dim, "latent_step"))
            walk = pt.concatenate([pt.zeros((len(labels), 1)), pt.cumsum(steps, axis=1)], axis=1)
        else:
            rho = prior(f"{name}_rho")
            stat = sigma / pt.sqrt(1.0 - rho**2)
            phis = [rho ** float(times[k] - times[k - 1]) for k in range(1, n_t)]
            scale = pt.stack([stat, *(stat * pt.sqrt(1.0 - phi**2) for phi in phis)])
            innovations = self._effect(
                f"{name}_innovation", scale[None, :], (dim, "latent_period")
            )
            cols = [innovations[:, 0]]
            for k in range(1, n_t):
                cols.append(phis[k - 1] * cols[-1] + innovations[:, k])
            walk = pt.stack(cols, axis=1)
        return pm.Deterministic(name, walk, dims=(dim, "latent_period"))

    def _effect(self, name: str, scale: Any, dims: tuple[str, ...]) -> Any:
        """Register effects ``N(0, scale)`` over ``dims``: centred, or ``scale * z`` (non-centred).

        ``noncentered``: ``"pairs"`` (default) makes the pair effects non-centred and the
        walks centred, True both, False neither. A pair effect rests on one pair's few
        (often small) counts: centred, the joint mode collapses to ``sigma_pair = 0``,
        which Laplace and MAP cannot use. A walk step rests on a whole unit's or
        country's counts: centred, its scale's mode is the data's; non-centred, the
        joint mode of the scale is pushed up by its prior (wider forecasts).
        """
        opt = self._temporal["noncentered"]
        if opt is True or (opt == "pairs" and name.startswith("pair_")):
            z = pm.Normal(f"{name}_z", 0.0, 1.0, dims=dims)
            return scale * z
        return pm.Normal(name, 0.0, scale, dims=dims)

    @override
    def add(self, data, pairs, state, prior):
        """Gravity terms with period covariates, plus pair effects, trends and unit walks."""
        term = super().add(data, pairs, state, prior)
        opts = self._temporal
        model = pm.modelcontext(None)
        periods = list(state["periods"])
        times = np.asarray(state["times"], dtype=float)
        n_t = len(periods)
        model.add_coords({"latent_period": periods})
        if n_t > 1:
            model.add_coords({"latent_step": periods[1:]})
        t = pairs.period_idx if pairs.period_idx is not None else np.zeros(pairs.n, dtype=int)
        units = np.asarray(data["unit"].values).astype(str)
        country = np.asarray(data["country"].values).astype(str)
        eta = term.eta
        pieces: list[tuple[np.ndarray, int, Any]] = []
        if opts["pair_effect"]:
            n = len(units)
            keys, pidx = np.unique(pairs.origin_idx * n + pairs.dest_idx, return_inverse=True)
            labels = [f"{units[k // n]}>{units[k % n]}" for k in keys]
            model.add_coords({"latent_pair": labels})
            sigma = prior("sigma_pair")
            u = self._effect("pair_effect", sigma, ("latent_pair",))
            if self._temporal["noncentered"] in (True, "pairs"):
                u = pm.Deterministic("pair_effect", u, dims="latent_pair")
            eta = eta + u[pidx]
            pieces.append((pidx, len(keys), u))
            if opts["pair_walk"]:
                walk = self._walk("pair_walk", "latent_pair", labels, times, prior)
                eta = eta + walk[pidx, t]
                pieces.append((pidx * n_t + t, len(keys) * n_t, walk.flatten()))
        if opts["trend"] != "none" and opts["unit_trends"]:
            _, per_country = np.unique(country, return_counts=True)
            if (per_country == 1).all():
                warnings.warn(
                    "temporal: every country is a single unit here, so the country trend and "
                    "the origin unit walks are the same process and cannot be told apart "
                    "(slow mixing, R-hat > 1.01). Fix: temporal={'trend': 'none'} (the unit "
                    "walks carry each country's trend) or unit_trends=False",
                    UserWarning,
                    stacklevel=2,
                )
        if opts["trend"] != "none":
            countries = list(state["trend_countries"])
            tau = self._walk(
                "trend", "trend_country", countries, times, prior, ar1=opts["trend"] == "ar1"
            )
            cidx = np.searchsorted(countries, country[pairs.origin_idx])
            eta = eta + tau[cidx, t]
            pieces.append((cidx * n_t + t, len(countries) * n_t, tau.flatten()))
        if opts["unit_trends"]:
            for side, idx, key in (
                ("origin", pairs.origin_idx, "origin_units"),
                ("destination", pairs.dest_idx, "destination_units_trend"),
            ):
                ids = list(state[key])
                walk = self._walk(f"{side}_trend", f"{side}_trend_unit", ids, times, prior)
                uidx = unit_positions_in(units[idx], ids)
                eta = eta + walk[uidx, t]
                pieces.append((uidx * n_t + t, len(ids) * n_t, walk.flatten()))
        base_linear = term.linear

        def linear(w: np.ndarray) -> Any:
            w = np.asarray(w, dtype=float)
            out = base_linear(w) if base_linear is not None else pt.dot(w, term.eta)
            for index, size, coef in pieces:
                out = out + pt.dot(np.bincount(index, weights=w, minlength=size), coef)
            return out

        return LatentTerm(eta=eta, linear=linear)

    # ------------------------------------------------------------------ prediction
    @override
    def prediction_params(self, posterior, data, state, *, rng, periods=None):
        """Posterior draws at ``periods`` (labels; default the fitted latent periods).

        Each requested period is a *slot* of the log rate: the trends and walks are
        taken at the fitted value, drawn on the bridge between two fitted periods,
        or propagated beyond the first or last one.
        """
        from flowmodel.periods import parse_period

        params = super().prediction_params(posterior, data, state, rng=rng)
        opts = dict(state.get("temporal") or self._temporal)
        fitted = list(state["periods"])
        slots = list(fitted if periods is None else [parse_period(p).label for p in periods])
        slot_times = np.asarray(self._times(slots))
        times = np.asarray(state["times"], dtype=float)
        params["slots"] = slots
        params["slot_times"] = slot_times
        units = np.asarray(data["unit"].values).astype(str)
        country = np.asarray(data["country"].values).astype(str)
        n_samples = params["beta"].shape[0]
        n = len(units)

        def process(name: str, dim: str, keys: np.ndarray, ar1: bool) -> np.ndarray | None:
            """``(S, len(keys), slot)`` of walk ``name``; keys the fit never saw start fresh."""
            if name not in posterior:
                return None
            var = posterior[name].transpose("chain", "draw", dim, "latent_period")
            fitted_keys = list(var[dim].values.astype(str))
            states = np.asarray(var.values, dtype=float).reshape(n_samples, len(fitted_keys), -1)
            sigma = stack_samples(posterior[f"sigma_{name}"])
            rho = stack_samples(posterior[f"{name}_rho"]) if ar1 else None
            out = np.empty((n_samples, len(keys), len(slots)))
            pos = pd.Series(np.arange(len(fitted_keys)), index=fitted_keys).reindex(keys)
            known = pos.notna().to_numpy()
            for k, time in enumerate(slot_times):
                at = _walk_at(states, times, float(time), sigma, rho, rng)
                out[:, known, k] = at[:, pos[known].to_numpy().astype(int)]
                if (~known).any():
                    # a unit or country the fit never saw: its own walk from the anchor
                    m = int((~known).sum())
                    if ar1:
                        sd = (sigma / np.sqrt(1.0 - rho**2))[:, None]
                    else:
                        sd = sigma[:, None] * np.sqrt(abs(float(time) - times[0]))
                    out[:, ~known, k] = rng.standard_normal((n_samples, m)) * sd
            return out

        trend = process("trend", "trend_country", country, opts["trend"] == "ar1")
        if trend is not None:
            params["trend_unit"] = trend
        for side in ("origin", "destination"):
            walk = process(f"{side}_trend", f"{side}_trend_unit", units, False)
            if walk is not None:
                params[f"{side}_trend_unit"] = walk
        if "pair_effect" in posterior:
            u = posterior["pair_effect"]
            labels = np.asarray(u["latent_pair"].values).astype(str)
            split = np.array([lab.split(">", 1) for lab in labels])
            o_pos = pd.Series(np.arange(n), index=units).reindex(split[:, 0]).to_numpy()
            d_pos = pd.Series(np.arange(n), index=units).reindex(split[:, 1]).to_numpy()
            ok = ~(np.isnan(o_pos) | np.isnan(d_pos))
            keys = o_pos[ok].astype(np.int64) * n + d_pos[ok].astype(np.int64)
            params["pair_lookup"] = pd.Series(np.flatnonzero(ok), index=keys)
            params["pair_effect"] = stack_samples(u)
            params["sigma_pair"] = stack_samples(posterior["sigma_pair"])
            if int(posterior.attrs.get("approximate", 0)):
                # Laplace / ADVI / MAP: the joint mode of the non-centred sigma_pair is set
                # by its prior, not the data; a new pair takes the spread of the fitted ones
                params["sigma_pair"] = np.sqrt(np.mean(params["pair_effect"] ** 2, axis=1))
            params["pair_seed"] = int(rng.integers(2**62))
            params["n_units"] = n
        if "pair_walk" in posterior:
            var = posterior["pair_walk"].transpose("chain", "draw", "latent_pair", "latent_period")
            states = np.asarray(var.values, dtype=float).reshape(n_samples, var.shape[2], -1)
            sigma = stack_samples(posterior["sigma_pair_walk"])
            params["pair_walk"] = np.stack(
                [_walk_at(states, times, float(tm), sigma, None, rng) for tm in slot_times],
                axis=2,
            )
            params["sigma_pair_walk"] = sigma
            params["walk_gap"] = np.abs(slot_times - times[0])
        return params

    def _pair_draws(
        self, params: Mapping[str, Any], oi: np.ndarray, dj: np.ndarray, slot: int = 0
    ) -> np.ndarray:
        """``(S, row)`` pair effects (+ pair walk at ``slot``): fitted, or drawn for new pairs.

        A never-observed pair gets ``N(0, sigma_pair)`` (and its walk ``N(0,
        sigma_pair_walk^2 * years from the first period)``) from a stream per origin
        unit, so the draws do not depend on how rows are blocked.
        """
        n = int(params["n_units"])
        u = params["pair_effect"]
        walk = params.get("pair_walk")
        cols = params["pair_lookup"].reindex(oi.astype(np.int64) * n + dj).to_numpy()
        known = ~np.isnan(cols)
        out = np.empty((u.shape[0], len(oi)))
        out[:, known] = u[:, cols[known].astype(np.int64)]
        if walk is not None:
            out[:, known] += walk[:, cols[known].astype(np.int64), slot]
        if (~known).any():
            sigma = params["sigma_pair"][:, None]
            for origin in np.unique(oi[~known]):
                rows = np.flatnonzero(~known & (oi == origin))
                g = np.random.default_rng([params["pair_seed"], int(origin)])
                z = g.standard_normal((u.shape[0], n))
                out[:, rows] = z[:, dj[rows]] * sigma
                if walk is not None:
                    zw = g.standard_normal((u.shape[0], n))
                    sd = params["sigma_pair_walk"][:, None] * np.sqrt(params["walk_gap"][slot])
                    out[:, rows] += zw[:, dj[rows]] * sd
        return out

    @override
    def log_rate(self, params, features, origin_idx, dest_idx, pair_vals, period_idx=None):
        """``(sample, row)`` log rates; ``period_idx`` gives each row's slot (default slot 0)."""
        origin_idx = np.asarray(origin_idx)
        dest_idx = np.asarray(dest_idx)
        t = np.zeros(len(origin_idx), dtype=int) if period_idx is None else np.asarray(period_idx)
        slots = getattr(features, "slots", None) or [features]
        out = np.empty((params["beta"].shape[0], len(origin_idx)))
        for k in np.unique(t):
            rows = np.flatnonzero(t == k)
            oi, dj = origin_idx[rows], dest_idx[rows]
            eta = super().log_rate(
                params,
                slots[int(k)] if len(slots) > 1 else slots[0],
                oi,
                dj,
                {name: np.asarray(v)[rows] for name, v in pair_vals.items()},
            )
            if "trend_unit" in params:
                eta = eta + params["trend_unit"][:, oi, k]
            if "origin_trend_unit" in params:
                eta = eta + params["origin_trend_unit"][:, oi, k]
            if "destination_trend_unit" in params:
                eta = eta + params["destination_trend_unit"][:, dj, k]
            if "pair_effect" in params:
                eta = eta + self._pair_draws(params, oi, dj, int(k))
            out[:, rows] = eta
        if "log_offset" in params:
            out = out + np.reshape(params["log_offset"], (-1, 1))
        return out


#: Latent field classes by the preset's name (saved configs name them).
LATENT_FIELDS: dict[str, type[LatentField]] = {
    "gravity": GravityField,
    "radiation": RadiationField,
    "temporal_gravity": TemporalGravityField,
}
