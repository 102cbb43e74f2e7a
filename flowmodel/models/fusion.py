"""Fusion: one latent flow field observed by a census sample and by redacted CDR (DESIGN §4.4).

A :class:`FusionModel` takes the latent log-rate of a gravity or radiation model
(:meth:`FlowModel._add_latent`) for every pair observed by any source, and adds
one observation model per source:

- **census** (``flow_census``): negative binomial with the sample fraction
  ``exposure_census`` as exposure;
- **CDR** (``flow_cdr``, optional ``period`` dim): negative binomial scaled by a
  per-origin-unit ``market_share`` (logit-normal, pooled within country, centred
  on a penetration covariate) and a ``period_effect`` per period (a free overall
  ``period_scale`` — CDR counts per latent flow, e.g. a monthly window against a
  5-year census question — times zero-sum log deviations);
- **censored cells** (``flow_<source>_max``, e.g. CDR cells redacted at 15 or
  fewer subscribers) enter as ``P(y <= max)`` — ``P(min <= y <= max)`` with a lower
  bound ``flow_<source>_min``, e.g. census "<5" cells next to printed zeros —
  never as zeros and never dropped;
- **in/out totals** of a CDR source (``<source>_outflow`` / ``<source>_inflow``,
  dims ``unit``[, ``period``], summed by the operator before redaction; add them
  with :func:`totals_to_dataset`) enter through the remainder ``total - released
  cells``: the sum of the redacted and missing cells, normal with the summed
  moments of the cells' (truncated) negative binomials.

- **country-pair marginals** (``marginal_<name>``, dims ``origin_country`` x
  ``destination_country``, e.g. migrant flows or stocks by country pair from a
  bilateral estimate; add them with :func:`marginals_to_dataset`) constrain sums
  of the latent flow: ``log M_cd ~ N(log sum_{i in c, j in d} exp(eta_ij), rel_sd)``.

Prediction of the latent, population-scale flow goes through the same streamed
:mod:`flowmodel.predict` path as every model, with the dispersion of the
reference source (the census by default). :func:`simulate_fusion_dataset` builds
the in-memory test world.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt
import xarray as xr
from scipy.special import logit

from flowmodel.dataset import (
    MARGINAL_DIMS,
    MARGINAL_PREFIX,
    TOTAL_KINDS,
    TOTAL_UNIVERSES,
    flow_sources,
)
from flowmodel.exceptions import DataContractError, ModelConfigError
from flowmodel.models.base import (
    _MODEL_REGISTRY,
    Features,
    FlowModel,
    ObservedPairs,
    censored_bounds,
    interval_logcdf,
    stack_samples,
)
from flowmodel.models.priors import create_prior, resolve_priors

__all__ = [
    "FUSION_PRIORS",
    "FusionModel",
    "censored_nb_logp",
    "source_kind",
    "truncated_nb_moments",
]

CDR_KIND = "cdr"
CENSUS_KIND = "census"
#: Largest censoring bound handled by exact summation of the pmf (beyond it: log-CDF).
MAX_SUMMED_BOUND = 60

#: Defaults of the fusion-only nodes (the latent model's nodes keep their own defaults).
FUSION_PRIORS: dict[str, dict[str, Any]] = {
    "phi": {"dist": "Gamma", "alpha": 2.0, "beta": 0.2},
    # logit(market_share_i) = logit(penetration_i) + market_share_country[c(i)]
    #                         + sigma_market_share * market_share_z_i
    "market_share_country": {"dist": "Normal", "mu": 0.0, "sigma": 0.5},
    "sigma_market_share": {"dist": "HalfNormal", "sigma": 0.5},
    # overall CDR counts per latent flow beyond the market share (time windows differ:
    # days to months of CDR against a 1- or 5-year census question); broad by default,
    # set mu = log(CDR window / census window) when the windows are known
    "period_scale": {"dist": "LogNormal", "mu": 0.0, "sigma": 3.0},
    # log period_effect = log period_scale + deviation, deviation ~ ZeroSumNormal(sigma)
    "period_effect": {"dist": "ZeroSumNormal", "sigma": 0.5},
}


def source_kind(source: str) -> str:
    """Observation model of a source name: ``"cdr"`` for ``cdr`` / ``cdr_*``, else ``"census"``."""
    return CDR_KIND if source == "cdr" or source.startswith("cdr_") else CENSUS_KIND


def censored_nb_logp(mu: Any, phi: Any, upper: np.ndarray, lower: np.ndarray | None = None) -> Any:
    """Elementwise ``log P(lower <= y <= upper)`` of a negative binomial (a PyTensor expression).

    For bounds up to :data:`MAX_SUMMED_BOUND` it is the log-sum-exp of the pmf
    over ``lower..upper``: exact, cheap, and differentiable in every backend
    (PyTensor C, JAX, numba). Larger bounds use :func:`pymc.logcdf`
    (``log(F(upper) - F(lower - 1))``).

    Parameters
    ----------
    mu
        Expected counts, shape ``(cell,)``.
    phi
        Dispersion, scalar or ``(cell,)``; variance ``mu + mu**2 / phi``.
    upper
        Censoring bounds, shape ``(cell,)``, >= 0 (floored to integers).
    lower
        Lower bounds, shape ``(cell,)`` (ceiled to integers; default 0): a
        census that prints zeros and suppresses ``"<5"`` holds 1..4 there.

    Returns
    -------
    pytensor.tensor.TensorVariable
        Shape ``(cell,)``.
    """
    upper, lower = censored_bounds(upper, lower)
    top = int(upper.max()) if upper.size else 0
    if top > MAX_SUMMED_BOUND:
        mu_t, phi_t = pt.as_tensor_variable(mu), pt.as_tensor_variable(phi)

        def dist(idx: np.ndarray | None) -> Any:
            if idx is None:
                return pm.NegativeBinomial.dist(mu=mu_t, alpha=phi_t)
            return pm.NegativeBinomial.dist(
                mu=mu_t[idx], alpha=phi_t[idx] if phi_t.ndim else phi_t
            )

        return interval_logcdf(dist, upper, lower)
    k = np.arange(top + 1, dtype=float)
    mu_b = pt.shape_padright(pt.as_tensor_variable(mu))
    phi_t = pt.as_tensor_variable(phi)
    phi_b = pt.shape_padright(phi_t) if phi_t.ndim else phi_t
    terms = pm.logp(pm.NegativeBinomial.dist(mu=mu_b, alpha=phi_b), k[None, :])
    mask = (k[None, :] <= upper[:, None]) & (k[None, :] >= lower[:, None])
    return pt.logsumexp(pt.where(mask, terms, -np.inf), axis=1)


def truncated_nb_moments(
    mu: Any, phi: Any, upper: np.ndarray, lower: np.ndarray | None = None
) -> tuple[Any, Any]:
    """Mean and variance of a negative binomial truncated to ``lower..upper`` (PyTensor).

    Exact sums of the pmf over ``0..max(upper)``; the moments of a redacted
    cell given that it was redacted (``lower`` default 0).

    Returns
    -------
    (TensorVariable, TensorVariable)
        Mean and variance, shape ``(cell,)``.
    """
    upper, lower = censored_bounds(upper, lower)
    top = int(upper.max()) if upper.size else 0
    k = np.arange(top + 1, dtype=float)
    mu_b = pt.shape_padright(pt.as_tensor_variable(mu))
    phi_t = pt.as_tensor_variable(phi)
    phi_b = pt.shape_padright(phi_t) if phi_t.ndim else phi_t
    terms = pm.logp(pm.NegativeBinomial.dist(mu=mu_b, alpha=phi_b), k[None, :])
    inside = (k[None, :] <= upper[:, None]) & (k[None, :] >= lower[:, None])
    terms = pt.where(inside, terms, -np.inf)
    w = pt.exp(terms - pt.logsumexp(terms, axis=1, keepdims=True))
    mean = pt.sum(w * k[None, :], axis=1)
    var = pt.sum(w * (k**2)[None, :], axis=1) - mean**2
    return mean, pt.maximum(var, 0.0)


def _latent_spec(latent: FlowModel) -> dict[str, Any]:
    return {
        "class": type(latent).__name__,
        "model_config": copy.deepcopy(latent.model_config),
        "priors": dict(latent.priors),
    }


def _latent_from(latent: Any) -> FlowModel:
    """Return the latent model from an instance or its saved spec (``class``, ``model_config``)."""
    if isinstance(latent, FlowModel):
        return latent
    if isinstance(latent, Mapping) and "class" in latent:
        cls = _MODEL_REGISTRY.get(str(latent["class"]))
        if cls is None:
            raise ModelConfigError(
                f"FusionModel: latent class '{latent['class']}' is unknown. "
                "Fix: import the module that defines it before loading"
            )
        return cls(priors=latent.get("priors") or None, **dict(latent.get("model_config", {})))
    raise ModelConfigError(
        f"FusionModel: latent must be a GravityModel or RadiationModel instance, got {latent!r}. "
        "Fix: FusionModel(latent=GravityModel(origin_covariates=[...], ...), ...)"
    )


class FusionModel(FlowModel):
    r"""One latent flow field observed by census samples and by (redacted) CDR.

    The latent model (gravity or radiation, unconstrained) gives the log expected
    population-scale flow :math:`\eta_{ij}` of every pair; each source observes it
    through its own negative-binomial observation model:

    .. math::

        y^{\mathrm{census}}_{ij} &\sim \mathrm{NB}\big(e^{\eta_{ij}} f_i,\ \phi_{\mathrm{census}}\big) \\
        y^{\mathrm{cdr}}_{ijt} &\sim \mathrm{NB}\big(e^{\eta_{ij}}\, s_i\, \pi_t,\
            \phi_{\mathrm{cdr}}\big), \qquad
        P\big(y^{\mathrm{cdr}}_{ijt} \le 15\big) \text{ for a redacted cell} \\
        \operatorname{logit} s_i &= \operatorname{logit} p_i + \delta_{c(i)}
            + \sigma_s z_i, \quad \delta_c \sim N(0, 0.5^2),\ z_i \sim N(0, 1) \\
        \log \pi_t &= \log \kappa + d_t, \quad \kappa \sim \mathrm{LogNormal}(0, 3^2),\
            d \sim \mathrm{ZeroSumNormal}(0.5)

    with :math:`f_i` the census sample fraction (``exposure_census``), :math:`s_i`
    the operator's ``market_share`` in origin unit :math:`i`, :math:`p_i` the
    penetration covariate (``cdr_subscribers_per_resident``; 0.3 where absent),
    :math:`\delta_c` its per-country bias (``market_share_country``),
    :math:`\pi_t` the ``period_effect`` (:math:`\kappa` = ``period_scale``, the CDR
    counts per latent flow beyond the market share: CDR windows of days to months
    against a census question over 1 or 5 years) and :math:`\phi` per source (``phi``,
    dim ``source``). A census anchors the absolute scale; countries with only CDR
    borrow it through the latent coefficients and the country-effect hierarchy,
    and countries with no data get their effect from ``N(0, sigma_country)``.

    Parameters
    ----------
    latent
        The latent model: an unconstrained
        :class:`~flowmodel.models.gravity.GravityModel` or a
        :class:`~flowmodel.models.radiation.RadiationModel`. Its covariates,
        cost function and priors define :math:`\eta`; its ``source`` is ignored.
    sources
        Flow sources to fit. ``cdr`` and ``cdr_*`` use the CDR observation model,
        any other name the census one.
    market_share_covariate
        Unit variable giving the prior centre of the market share (subscribers
        per resident); ignored where absent or NaN.
    market_share_default
        Prior centre of the market share where the covariate is absent.
    reference_source
        Source whose dispersion ``phi`` is used for predictive draws of
        population flows (default: the first census-type source, else the
        first source).
    priors
        Overrides keyed by node name: the latent's (``intercept``, ``beta``,
        ``sigma_country``, ...) and the fusion's (``phi``,
        ``market_share_country``, ``sigma_market_share``, ``period_effect``).
    sampler_config
        Defaults of :meth:`fit` keyword arguments.

    Examples
    --------
    >>> from flowmodel.models.fusion import FusionModel
    >>> from flowmodel.simulate import simulate_fusion_dataset
    >>> from flowmodel.models.gravity import GravityModel
    >>> ds, truth = simulate_fusion_dataset(seed=1)
    >>> latent = GravityModel(
    ...     origin_covariates=["log_population"],
    ...     destination_covariates=["log_population", "night_lights_per_capita"],
    ... )
    >>> model = FusionModel(latent=latent, sources=("census", "cdr"))
    >>> idata = model.fit(ds, backend="nutpie", draws=600, tune=600, chains=2)  # doctest: +SKIP
    >>> flows = model.predict(ds)  # (origin, destination): mean, q05 ... q95  # doctest: +SKIP
    """

    default_model_config: ClassVar[dict[str, Any]] = {
        "latent": None,
        "sources": ["census", "cdr"],
        "market_share_covariate": "cdr_subscribers_per_resident",
        "market_share_default": 0.3,
        "reference_source": None,
    }

    def __init__(
        self,
        *,
        latent: Any = None,
        sources: Sequence[str] = ("census", "cdr"),
        market_share_covariate: str | None = "cdr_subscribers_per_resident",
        market_share_default: float = 0.3,
        reference_source: str | None = None,
        priors: Mapping[str, Any] | None = None,
        sampler_config: Mapping[str, Any] | None = None,
    ) -> None:
        if latent is None:
            raise ModelConfigError(
                "FusionModel needs a latent model. "
                "Fix: FusionModel(latent=GravityModel(...), sources=['census', 'cdr'])"
            )
        self.latent = _latent_from(latent)
        if isinstance(sources, str):
            sources = [sources]
        super().__init__(
            priors=priors,
            sampler_config=sampler_config,
            latent=_latent_spec(self.latent),
            sources=[str(s) for s in sources],
            market_share_covariate=market_share_covariate,
            market_share_default=float(market_share_default),
            reference_source=reference_source,
        )

    # ------------------------------------------------------------------ config
    def _validate_config(self) -> None:
        latent = self.latent
        if isinstance(latent, FusionModel) or type(latent)._add_latent is FlowModel._add_latent:
            raise ModelConfigError(
                f"FusionModel: latent {type(latent).__name__} has no latent log-rate "
                "(_add_latent). Fix: use a GravityModel or RadiationModel as latent"
            )
        constraint = latent.model_config.get("constraint", "none")
        if constraint not in (None, "none"):
            raise ModelConfigError(
                f"FusionModel: the latent model has constraint={constraint!r}; constrained forms "
                "condition on observed totals of one source and cannot be shared by several. "
                "Fix: use constraint='none' (the default) for the latent model"
            )
        sources = self.model_config["sources"]
        if not sources or len(set(sources)) != len(sources):
            raise ModelConfigError(
                f"FusionModel: sources={sources!r} must be a non-empty list of distinct names. "
                "Fix: e.g. sources=['census', 'cdr']"
            )
        ref = self.model_config["reference_source"]
        if ref is not None and ref not in sources:
            raise ModelConfigError(
                f"FusionModel: reference_source={ref!r} is not one of sources={sources}. "
                "Fix: name one of the fitted sources"
            )
        share = self.model_config["market_share_default"]
        if not 0.0 < share < 1.0:
            raise ModelConfigError(
                f"FusionModel: market_share_default={share} must lie in (0, 1). Fix: e.g. 0.3"
            )

    @property
    def sources(self) -> list[str]:
        """The fitted flow sources, in order (coordinate ``source`` of ``phi``)."""
        return list(self.model_config["sources"])

    @property
    def reference_source(self) -> str:
        """Source whose ``phi`` gives the predictive dispersion of population flows."""
        ref = self.model_config["reference_source"]
        if ref is not None:
            return ref
        census = [s for s in self.sources if source_kind(s) == CENSUS_KIND]
        return census[0] if census else self.sources[0]

    def _check_sources(self, data: xr.Dataset) -> None:
        present = flow_sources(data)
        missing = [s for s in self.sources if s not in present]
        if missing:
            raise DataContractError(
                f"FusionModel: source(s) {missing} have no 'flow_<source>' variable in the dataset "
                f"(flow sources present: {present}). Fix: pass sources={present} or add the "
                "flow tables to build_dataset(flows=...)"
            )
        if "pair" in data.dims:
            raise DataContractError(
                "FusionModel fits a dense (origin, destination) FlowDataset. Fix: fit on the dense "
                "dataset of the observed units; predict sparse pair sets with model.predict()"
            )

    # ------------------------------------------------------------------ priors
    def _fusion_nodes(self, data: xr.Dataset | None = None) -> list[str]:
        nodes = ["phi"]
        for source in self.sources:
            if source_kind(source) == CDR_KIND:
                nodes += [
                    self._node("market_share_country", source),
                    self._node("sigma_market_share", source),
                ]
                nodes.append(self._node("period_scale", source))
                if data is None or self._n_periods(data, source) > 1:
                    nodes.append(self._node("period_effect", source))
        return nodes

    @staticmethod
    def _node(name: str, source: str) -> str:
        """Node name of a CDR-source parameter: ``market_share`` for ``cdr``, else suffixed."""
        return name if source == "cdr" else f"{name}_{source}"

    @staticmethod
    def _n_periods(data: xr.Dataset, source: str) -> int:
        flow = data.get(f"flow_{source}")
        return int(data.sizes["period"]) if flow is not None and "period" in flow.dims else 1

    def _latent_nodes(self, data: xr.Dataset | None = None) -> list[str]:
        return self.latent._latent_nodes(data) + self._fusion_nodes(data)

    def _defaults(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for source in self.sources:
            for base in (
                "market_share_country",
                "sigma_market_share",
                "period_scale",
                "period_effect",
            ):
                out[self._node(base, source)] = FUSION_PRIORS[base]
        out["phi"] = FUSION_PRIORS["phi"]
        return out

    # ------------------------------------------------------------------ data
    @staticmethod
    def _union_pairs(pairs: Mapping[str, ObservedPairs], n_units: int) -> ObservedPairs:
        keys = np.unique(
            np.concatenate([p.origin_idx * n_units + p.dest_idx for p in pairs.values()])
        )
        n = len(keys)
        return ObservedPairs(
            origin_idx=(keys // n_units).astype(np.int64),
            dest_idx=(keys % n_units).astype(np.int64),
            y=np.full(n, np.nan),
            exposure=np.ones(n),
            upper=np.full(n, np.nan),
            period_idx=None,
            source="+".join(pairs),
        )

    def _market_share_centre(self, data: xr.Dataset, units: np.ndarray) -> np.ndarray:
        """Prior centre (logit scale) of the market share of each unit position in ``units``.

        The penetration covariate clipped to [0.01, 0.99] where it is finite and
        positive, else ``market_share_default``.
        """
        default = float(logit(self.model_config["market_share_default"]))
        name = self.model_config["market_share_covariate"]
        centre = np.full(len(units), default)
        if name and name in data and data[name].dims == ("unit",):
            values = np.asarray(data[name].values, dtype=float)[units]
            ok = np.isfinite(values) & (values > 0)
            centre[ok] = logit(np.clip(values[ok], 0.01, 0.99))
        return centre

    # ------------------------------------------------------------------ build
    def build_model(self, data: xr.Dataset) -> pm.Model:
        """Build (and store in :attr:`model`) the joint PyMC model of every source.

        Parameters
        ----------
        data
            Dense FlowDataset with ``flow_<source>`` for every source (NaN =
            unobserved, ``flow_<source>_max`` = censoring bound).

        Returns
        -------
        pymc.Model
            Coordinates ``pair`` (union of the pairs any source observes),
            ``source``, ``market_unit`` / ``market_country`` (CDR origin units and
            their countries), ``period`` and the latent's (``term``,
            ``country``). Observed counts are ``y_<source>``; censored cells
            add the Potential ``y_<source>_censored``.

        Raises
        ------
        DataContractError
            A source has no ``flow_<source>`` variable, or the dataset is sparse.
        ModelConfigError
            A source has no observed or censored cell; a bad prior.
        """
        self._check_sources(data)
        n_units = int(data.sizes["unit"])
        per_source = {s: self._observed_pairs(data, s) for s in self.sources}
        empty = [s for s, p in per_source.items() if p.n == 0]
        if empty:
            raise ModelConfigError(
                f"FusionModel: source(s) {empty} have no observed or censored off-diagonal cell. "
                "Fix: drop them from sources= or check the flow tables"
            )
        universes = {
            s: self._total_cells(data, s, per_source[s])
            for s in self.sources
            if source_kind(s) == CDR_KIND
        }
        universes = {s: u for s, u in universes.items() if u}
        extra = {f"{s}:{k}": c for s, u in universes.items() for k, c in u.items()}
        marginals = self._marginal_cells(data)
        extra.update({f"marginal:{name}": m[0] for name, m in marginals.items()})
        union = self._union_pairs({**per_source, **extra}, n_units)
        latent = self.latent
        # priors: user (fusion's, over the latent's own) > data-derived > default
        user = {**latent.priors, **self.priors}
        ref_pairs = per_source[self.reference_source]
        latent_known = latent._latent_nodes(data)
        fusion_known = self._fusion_nodes(data)
        everything = resolve_priors(
            latent_known + fusion_known,
            data_derived=latent._data_priors(data, ref_pairs),
            user=user,
            defaults={**_latent_defaults(), **self._defaults()},
        )
        latent._priors_in_use = {k: everything[k] for k in latent_known if k in everything}
        self._priors_in_use = everything
        self.fit_meta = {
            "sources": self.sources,
            "n_pairs": int(union.n),
            "n_cells": {s: int(p.n) for s, p in per_source.items()},
            "n_censored": {s: int((~p.observed).sum()) for s, p in per_source.items()},
            "totals": {s: sorted(u) for s, u in universes.items()},
            "marginals": {name: len(m[2]) for name, m in marginals.items()},
        }
        coords: dict[str, Any] = {"pair": np.arange(union.n), "source": self.sources}
        with pm.Model(coords=coords) as model:
            eta = latent._add_latent(data, union)
            phi = create_prior("phi", everything["phi"], dims="source")
            lookup = pd.Series(
                np.arange(union.n), index=union.origin_idx * n_units + union.dest_idx
            )
            for s_idx, source in enumerate(self.sources):
                pairs = per_source[source]
                where = lookup.reindex(pairs.origin_idx * n_units + pairs.dest_idx).to_numpy()
                log_mu = eta[where.astype(np.int64)] + np.log(pairs.exposure)
                if source_kind(source) == CDR_KIND:
                    scale = self._add_cdr_scaling(data, source, pairs, everything)
                    log_mu = log_mu + scale(pairs.origin_idx, pairs.period_idx)
                    for kind, cells in universes.get(source, {}).items():
                        where = lookup.reindex(cells.origin_idx * n_units + cells.dest_idx)
                        log_cell = eta[where.to_numpy().astype(np.int64)] + scale(
                            cells.origin_idx, cells.period_idx
                        )
                        self._add_totals_likelihood(
                            data,
                            source,
                            kind,
                            cells,
                            pt.exp(log_cell),
                            phi[s_idx],
                            weight=1.0 / len(universes[source]),
                        )
                self._add_source_likelihood(source, pt.exp(log_mu), phi[s_idx], pairs)
            for name, (cells, group, observed, rel_sd, labels) in marginals.items():
                where = lookup.reindex(cells.origin_idx * n_units + cells.dest_idx).to_numpy()
                total = pt.zeros(len(observed))
                total = pt.inc_subtensor(total[group], pt.exp(eta[where.astype(np.int64)]))
                dim = f"{MARGINAL_PREFIX}{name}_pair"
                model.add_coord(dim, labels)
                pm.Deterministic(f"{MARGINAL_PREFIX}{name}_expected", total, dims=dim)
                log_sum = pt.log(total)
                pm.Potential(
                    f"{MARGINAL_PREFIX}{name}",
                    pm.logp(pm.Normal.dist(mu=log_sum, sigma=rel_sd), np.log(observed)).sum(),
                )
        self.fit_meta["latent"] = copy.deepcopy(latent.fit_meta)
        self.model = model
        self._fit_pairs = union
        return model

    def _add_cdr_scaling(
        self,
        data: xr.Dataset,
        source: str,
        pairs: ObservedPairs,
        priors: Mapping[str, Any],
    ) -> Any:
        """Register ``market_share``, ``period_scale`` (and ``period_effect``).

        Returns a function ``(origin_idx, period_idx) -> log scaling`` of any CDR
        cells whose origins are among the origins of ``pairs``.
        """
        units = np.unique(pairs.origin_idx)
        countries_all = np.asarray(data["country"].values).astype(str)
        countries, country_pos = np.unique(countries_all[units], return_inverse=True)
        unit_dim = self._node("market_unit", source)
        country_dim = self._node("market_country", source)
        model = pm.modelcontext(None)
        model.add_coord(unit_dim, np.asarray(data["unit"].values).astype(str)[units])
        model.add_coord(country_dim, countries)
        centre = self._market_share_centre(data, units)
        offset = create_prior(
            self._node("market_share_country", source),
            priors[self._node("market_share_country", source)],
            dims=country_dim,
        )
        sigma = create_prior(
            self._node("sigma_market_share", source),
            priors[self._node("sigma_market_share", source)],
        )
        z = pm.Normal(self._node("market_share_z", source), 0.0, 1.0, dims=unit_dim)
        logit_share = centre + offset[country_pos] + sigma * z
        pm.Deterministic(
            self._node("market_share", source), pm.math.sigmoid(logit_share), dims=unit_dim
        )
        log_share = -pt.softplus(-logit_share)  # log(sigmoid(x)), stable
        period_scale = create_prior(
            self._node("period_scale", source), priors[self._node("period_scale", source)]
        )
        log_level = pt.log(period_scale)
        if pairs.period_idx is None:

            def scale_flat(origin_idx: np.ndarray, period_idx: np.ndarray | None) -> Any:
                return log_share[np.searchsorted(units, origin_idx)] + log_level

            return scale_flat
        if "period" not in model.coords:
            model.add_coord("period", np.asarray(data["period"].values).astype(str))
        log_pe = pt.zeros(int(data.sizes["period"])) + log_level
        if self._n_periods(data, source) > 1:
            spec = dict(priors[self._node("period_effect", source)])
            if spec.get("dist", "ZeroSumNormal") != "ZeroSumNormal":
                raise ModelConfigError(
                    f"prior '{self._node('period_effect', source)}' must be a ZeroSumNormal of the "
                    "log deviations (their level is period_scale). "
                    "Fix: {'dist': 'ZeroSumNormal', 'sigma': 0.5}"
                )
            # iid normals projected onto the zero-sum subspace: exactly ZeroSumNormal(sigma)
            # (the leftover mean direction keeps its N(0, sigma²/T) prior); written out
            # because pm.ZeroSumNormal's transform breaks pm.fit (ADVI) initial points
            raw = pm.Normal(
                self._node("period_deviation_raw", source),
                0.0,
                float(spec.get("sigma", 0.5)),
                dims="period",
            )
            deviation = pm.Deterministic(
                self._node("period_deviation", source), raw - pt.mean(raw), dims="period"
            )
            log_pe = log_pe + deviation
        pm.Deterministic(self._node("period_effect", source), pt.exp(log_pe), dims="period")

        def scale(origin_idx: np.ndarray, period_idx: np.ndarray | None) -> Any:
            return log_share[np.searchsorted(units, origin_idx)] + log_pe[period_idx]

        return scale

    # ------------------------------------------------------------------ marginals
    @staticmethod
    def _marginal_cells(
        data: xr.Dataset,
    ) -> dict[str, tuple[ObservedPairs, np.ndarray, np.ndarray, float, list[str]]]:
        """Cells of every country-pair marginal in ``data``.

        Returns ``{name: (cells, group, observed, rel_sd, labels)}``: the (origin,
        destination) pairs summed (every off-diagonal pair of each known country
        pair), the index of each cell's country pair in ``observed`` (the known
        marginal values), the log-scale error and the country pairs' labels
        (``"C00>C01"``).
        """
        out = {}
        country = np.asarray(data["country"].values).astype(str)
        for var_name in sorted(v for v in data.data_vars if str(v).startswith(MARGINAL_PREFIX)):
            var = data[var_name]
            name = str(var_name)[len(MARGINAL_PREFIX) :]
            if tuple(var.dims) != MARGINAL_DIMS:
                raise DataContractError(
                    f"'{var_name}' has dims {var.dims}; a country-pair marginal needs dims "
                    f"{MARGINAL_DIMS}. Fix: build it with marginals_to_dataset()"
                )
            rel_sd = float(var.attrs.get("rel_sd", 0.1))
            origins = np.asarray(var[MARGINAL_DIMS[0]].values).astype(str)
            dests = np.asarray(var[MARGINAL_DIMS[1]].values).astype(str)
            values = np.asarray(var.values, dtype=float)
            o_idx, d_idx, group, observed, labels = [], [], [], [], []
            for a, b in zip(*np.nonzero(np.isfinite(values)), strict=True):
                o = np.flatnonzero(country == origins[a])
                d = np.flatnonzero(country == dests[b])
                oo, dd = np.repeat(o, len(d)), np.tile(d, len(o))
                keep = oo != dd
                if not keep.any() or values[a, b] <= 0:
                    continue
                o_idx.append(oo[keep])
                d_idx.append(dd[keep])
                group.append(np.full(int(keep.sum()), len(observed)))
                observed.append(values[a, b])
                labels.append(f"{origins[a]}>{dests[b]}")
            if not observed:
                continue
            o_all, d_all = np.concatenate(o_idx), np.concatenate(d_idx)
            cells = ObservedPairs(
                origin_idx=o_all.astype(np.int64),
                dest_idx=d_all.astype(np.int64),
                y=np.full(len(o_all), np.nan),
                exposure=np.ones(len(o_all)),
                upper=np.full(len(o_all), np.nan),
                period_idx=None,
                source=f"marginal:{name}",
            )
            out[name] = (cells, np.concatenate(group), np.asarray(observed), rel_sd, labels)
        return out

    # ------------------------------------------------------------------ in/out totals
    @staticmethod
    def _dense_cells(data: xr.Dataset, name: str) -> np.ndarray:
        """Return a pair variable as a ``(unit, unit, period)`` array in ``unit`` order (NaN if absent)."""
        n = int(data.sizes["unit"])
        var = data.get(name)
        n_t = int(data.sizes["period"]) if "period" in data.dims else 1
        out = np.full((n, n, n_t), np.nan)
        if var is None:
            return out
        dims = (
            "origin",
            "destination",
            *(d for d in var.dims if d not in ("origin", "destination")),
        )
        values = np.asarray(var.transpose(*dims).values, dtype=float)
        values = values.reshape(values.shape[0], values.shape[1], -1)
        o_pos = FlowModel._unit_positions(data, data["origin"].values)
        d_pos = FlowModel._unit_positions(data, data["destination"].values)
        out[o_pos[:, None], d_pos[None, :], : values.shape[2]] = values
        return out

    @staticmethod
    def _unit_period_values(data: xr.Dataset, name: str, has_period: bool) -> np.ndarray:
        """Return a totals variable as ``(unit, period)`` values (all NaN when absent)."""
        n = int(data.sizes["unit"])
        n_t = int(data.sizes["period"]) if has_period else 1
        var = data.get(name)
        if var is None:
            return np.full((n, n_t), np.nan)
        if ("period" in var.dims) != has_period or "unit" not in var.dims or var.ndim > 2:
            raise DataContractError(
                f"'{name}' has dims {var.dims}; in/out totals need dims ('unit', 'period') when "
                "the flow has a period dim, else ('unit',). Fix: build them with totals_to_dataset()"
            )
        values = np.asarray(var.transpose("unit", ...).values, dtype=float).reshape(n, -1)
        return values

    def _total_cells(
        self, data: xr.Dataset, source: str, pairs: ObservedPairs
    ) -> dict[str, ObservedPairs]:
        """Cells each in/out total of ``source`` sums over, per kind present in ``data``.

        The universe of a total (attr ``universe`` of ``<source>_outflow``, default
        ``"covered"``): origins = the CDR origin units (those with a market share),
        destinations = every unit in a CDR cell (``"within"``: of the same
        country), diagonal excluded. Every (origin, destination, period) cell of
        the universe is released (``y``), censored (``upper``) or missing (both
        NaN: e.g. held out; it then enters the totals with its full distribution).
        """
        has_period = pairs.period_idx is not None
        kinds = []
        for kind in TOTAL_KINDS:
            for name in (f"{source}_{kind}", f"{source}_{kind}_max"):
                if np.isfinite(self._unit_period_values(data, name, has_period)).any():
                    kinds.append(kind)
                    break
        if not kinds:
            return {}
        n = int(data.sizes["unit"])
        flow = self._dense_cells(data, f"flow_{source}")
        upper = self._dense_cells(data, f"flow_{source}_max")
        lower = self._dense_cells(data, f"flow_{source}_min")
        n_t = flow.shape[2] if has_period else 1
        origins = np.unique(pairs.origin_idx)
        covered = np.unique(np.concatenate([pairs.origin_idx, pairs.dest_idx]))
        country = np.asarray(data["country"].values).astype(str)
        exp_var = data.get(f"exposure_{source}")
        out = {}
        for kind in kinds:
            attrs = data[f"{source}_{kind}"].attrs if f"{source}_{kind}" in data else {}
            universe = attrs.get("universe", "covered")
            if universe not in TOTAL_UNIVERSES:
                raise DataContractError(
                    f"'{source}_{kind}' has universe={universe!r}; Fix: one of {list(TOTAL_UNIVERSES)}"
                )
            mask = np.zeros((n, n), dtype=bool)
            mask[np.ix_(origins, covered)] = True
            np.fill_diagonal(mask, False)
            if universe == "within":
                mask &= country[:, None] == country[None, :]
            o, d = np.nonzero(mask)
            o, d = np.repeat(o, n_t), np.repeat(d, n_t)
            t = np.tile(np.arange(n_t), int(mask.sum()))
            ex = np.ones(len(o))
            if exp_var is not None and exp_var.dims == ("unit",):
                ex = np.asarray(exp_var.values, dtype=float)[o]
            out[kind] = ObservedPairs(
                origin_idx=o.astype(np.int64),
                dest_idx=d.astype(np.int64),
                y=flow[o, d, t],
                exposure=ex,
                upper=upper[o, d, t],
                period_idx=t.astype(np.int64) if has_period else None,
                source=f"{source}:{kind}",
                lower=np.where(np.isnan(flow[o, d, t]), lower[o, d, t], 0.0),
            )
        return out

    def _add_totals_likelihood(
        self,
        data: xr.Dataset,
        source: str,
        kind: str,
        cells: ObservedPairs,
        mu: Any,
        phi: Any,
        weight: float = 1.0,
    ) -> None:
        r"""Add the Potential ``<source>_<kind>_total`` of the in/out totals.

        A total is the sum of its cells before redaction, so given the cells
        already in the likelihood its only new information is the remainder
        :math:`R = T - \sum_{\text{released}} y`, the sum of the redacted (each
        :math:`\le` its bound) and missing cells. :math:`R` is modelled as
        :math:`N(\sum m_c, \sum v_c + 1/12)` with :math:`m_c, v_c` the moments
        of each cell's negative binomial — truncated to ``0..max`` for a
        redacted cell — (the CLT for a sum of independent cells; 1/12 is the
        rounding variance). A suppressed total (NaN, bound in
        ``<source>_<kind>_max``) contributes :math:`P(R \le \max - \sum y)`.
        ``weight`` multiplies the log-likelihood: ``1/2`` when both outflow and
        inflow totals are used, whose remainders sum the same redacted cells
        (a composite likelihood that would otherwise count them twice).
        """
        has_period = cells.period_idx is not None
        n = int(data.sizes["unit"])
        n_t = int(data.sizes["period"]) if has_period else 1
        total = self._unit_period_values(data, f"{source}_{kind}", has_period).ravel()
        bound = self._unit_period_values(data, f"{source}_{kind}_max", has_period).ravel()
        side = cells.origin_idx if kind == "outflow" else cells.dest_idx
        key = side * n_t + (cells.period_idx if has_period else 0)
        mu = mu * cells.exposure
        released = np.isfinite(cells.y)
        censored = ~released & np.isfinite(cells.upper)
        missing = ~released & ~censored
        rel_sum = np.bincount(key[released], cells.y[released], minlength=n * n_t)
        n_open = np.bincount(key[~released], minlength=n * n_t)
        remainder = total - rel_sum
        bad = np.isfinite(total) & ((remainder < 0) | ((n_open == 0) & (remainder != 0)))
        if bad.any():
            ids = np.asarray(data["unit"].values).astype(str)[np.flatnonzero(bad) // n_t]
            raise DataContractError(
                f"'{source}_{kind}' of units {sorted(set(ids))[:10]} does not equal the sum of "
                f"their flow_{source} cells (released cells exceed the total, or every cell is "
                "released and the sum differs). Fix: check the totals' universe attribute "
                "('covered' or 'within') and that the totals were computed before redaction"
            )
        use_obs = np.isfinite(total) & (n_open > 0)
        use_cen = ~np.isfinite(total) & np.isfinite(bound) & (n_open > 0)
        self.fit_meta.setdefault("n_totals", {})[f"{source}_{kind}"] = int(
            use_obs.sum() + use_cen.sum()
        )
        if not (use_obs.any() or use_cen.any()):
            return
        mean = pt.zeros(n * n_t)
        var = pt.zeros(n * n_t)
        if censored.any():
            idx = np.flatnonzero(censored)
            m_c, v_c = truncated_nb_moments(
                mu[idx], phi, cells.upper[censored], cells.lower[censored]
            )
            mean = pt.inc_subtensor(mean[key[idx]], m_c)
            var = pt.inc_subtensor(var[key[idx]], v_c)
        if missing.any():
            idx = np.flatnonzero(missing)
            m_m = mu[idx]
            mean = pt.inc_subtensor(mean[key[idx]], m_m)
            var = pt.inc_subtensor(var[key[idx]], m_m + m_m**2 / phi)
        sd = pt.sqrt(var + 1.0 / 12.0)
        logp = pt.zeros(())
        if use_obs.any():
            sel = np.flatnonzero(use_obs)
            dist = pm.Normal.dist(mu=mean[sel], sigma=sd[sel])
            logp = logp + pm.logp(dist, remainder[sel]).sum()
        if use_cen.any():
            sel = np.flatnonzero(use_cen)
            dist = pm.Normal.dist(mu=mean[sel], sigma=sd[sel])
            logp = logp + pm.logcdf(dist, bound[sel] - rel_sum[sel] + 0.5).sum()
        pm.Potential(f"{source}_{kind}_total", weight * logp)

    @staticmethod
    def _add_source_likelihood(source: str, mu: Any, phi: Any, pairs: ObservedPairs) -> None:
        """Negative binomial of observed cells; ``P(min <= y <= max)`` of censored ones."""
        obs = pairs.observed
        cen = ~obs & np.isfinite(pairs.upper)
        if obs.any():
            pm.NegativeBinomial(
                f"y_{source}", mu=mu[np.flatnonzero(obs)], alpha=phi, observed=pairs.y[obs]
            )
        if cen.any():
            logp = censored_nb_logp(
                mu[np.flatnonzero(cen)], phi, pairs.upper[cen], pairs.lower[cen]
            )
            pm.Potential(f"y_{source}_censored", logp.sum())

    # ------------------------------------------------------------------ predict (latent's)
    def _sync_latent(self) -> FlowModel:
        """Return the latent model carrying this fit's metadata (terms, scalings, countries)."""
        meta = self.fit_meta.get("latent")
        if meta is not None:
            self.latent.fit_meta = copy.deepcopy(meta)
        return self.latent

    def _prediction_params(
        self, posterior: xr.Dataset, data: xr.Dataset, *, rng: np.random.Generator
    ) -> dict[str, Any]:
        params = self._sync_latent()._prediction_params(posterior, data, rng=rng)
        if "phi" in posterior and "source" in posterior["phi"].dims:
            params["phi"] = stack_samples(posterior["phi"].sel(source=self.reference_source))
        return params

    def _features(self, data: xr.Dataset) -> Features:
        return self._sync_latent()._features(data)

    def _pair_names(self) -> list[str]:
        return self._sync_latent()._pair_names()

    def _pair_values(
        self, data: xr.Dataset, origin_idx: np.ndarray, dest_idx: np.ndarray
    ) -> dict[str, np.ndarray]:
        return self._sync_latent()._pair_values(data, origin_idx, dest_idx)

    def _log_rate_from_params(
        self,
        params: Mapping[str, Any],
        features: Features,
        origin_idx: np.ndarray,
        dest_idx: np.ndarray,
        pair_vals: Mapping[str, np.ndarray],
    ) -> np.ndarray:
        return self._sync_latent()._log_rate_from_params(
            params, features, origin_idx, dest_idx, pair_vals
        )

    def _summary_vars(self) -> list[str]:
        names = [*self.latent._summary_vars(), "phi", "sigma_market_share", "period_scale"]
        return list(dict.fromkeys([*names, "period_effect"]))

    # ------------------------------------------------------------------ LOO
    def _cell_log_mu(
        self, posterior: xr.Dataset, data: xr.Dataset, source: str, pairs: ObservedPairs
    ) -> np.ndarray:
        """``(sample, cell)`` log expected counts of the cells of ``source`` (numpy)."""
        log_mu = self._log_rate_draws(posterior, data, pairs.origin_idx, pairs.dest_idx)
        log_mu = log_mu + np.log(pairs.exposure)[None, :]
        if source_kind(source) != CDR_KIND:
            return log_mu
        share = posterior[self._node("market_share", source)]
        dim = self._node("market_unit", source)
        pos = pd.Series(np.arange(share.sizes[dim]), index=share[dim].values.astype(str))
        ids = np.asarray(data["unit"].values).astype(str)[pairs.origin_idx]
        idx = pos.reindex(ids).to_numpy()
        if np.isnan(idx).any():
            raise ModelConfigError(
                f"FusionModel.log_likelihood: CDR origins {sorted(set(ids[np.isnan(idx)]))[:10]} "
                "have no fitted market share. Fix: pass the dataset the model was fitted to"
            )
        log_mu = log_mu + np.log(stack_samples(share))[:, idx.astype(np.int64)]
        effect = self._node("period_effect", source)
        if pairs.period_idx is not None and effect in posterior:
            labels = np.asarray(data["period"].values).astype(str)[pairs.period_idx]
            per = posterior[effect]
            p_pos = pd.Series(
                np.arange(per.sizes["period"]), index=per["period"].values.astype(str)
            )
            log_pe = np.log(stack_samples(per))
            return log_mu + log_pe[:, p_pos.reindex(labels).to_numpy().astype(np.int64)]
        scale = stack_samples(posterior[self._node("period_scale", source)])
        return log_mu + np.log(scale)[:, None]

    def log_likelihood(self, data: xr.Dataset) -> xr.DataTree:
        """Posterior plus a pointwise ``log_likelihood`` group for LOO (:func:`compare`).

        One variable ``flow`` over dim ``pair``: every cell of every source in
        :attr:`sources` order (census cells, then CDR cells, period-resolved CDR
        cells flattened), a count contributing its negative-binomial log pmf and a
        censored cell ``log P(min <= y <= max)``. In/out totals are not pointwise
        observations and are left out (models compared by LOO should be fitted
        with the same totals anyway). Computed in numpy from the posterior draws.
        """
        from scipy import stats

        posterior = self.posterior
        blocks, ys = [], []
        for source in self.sources:
            pairs = self._observed_pairs(data, source)
            mu = np.exp(self._cell_log_mu(posterior, data, source, pairs))
            phi = stack_samples(posterior["phi"].sel(source=source))[:, None]
            p = phi / (phi + mu)
            obs = pairs.observed
            ll = np.empty_like(mu)
            ll[:, obs] = stats.nbinom.logpmf(pairs.y[None, obs], phi, p[:, obs])
            ll[:, ~obs] = _censored_nb_logp_np(
                pairs.upper[~obs], pairs.lower[~obs], phi, p[:, ~obs]
            )
            blocks.append(ll)
            ys.append(pairs.y)
        n_chain, n_draw = posterior.sizes["chain"], posterior.sizes["draw"]
        ll = np.concatenate(blocks, axis=1).reshape(n_chain, n_draw, -1)
        source_of = np.concatenate(
            [np.full(len(y), s) for s, y in zip(self.sources, ys, strict=True)]
        )
        tree = xr.DataTree()
        tree["posterior"] = xr.DataTree(posterior)
        tree["log_likelihood"] = xr.DataTree(
            xr.Dataset(
                {"flow": (("chain", "draw", "pair"), ll)},
                coords={"chain": posterior["chain"].values, "draw": posterior["draw"].values},
            )
        )
        tree["observed_data"] = xr.DataTree(
            xr.Dataset({"flow": (("pair",), np.concatenate(ys)), "source": (("pair",), source_of)})
        )
        return tree

    def market_share_summary(self, *, ci_prob: float = 0.94, source: str = "cdr") -> pd.DataFrame:
        """Posterior of the market share of each CDR origin unit.

        Returns
        -------
        pandas.DataFrame
            Indexed by unit id: ``country``, ``mean``, ``sd``, ``eti_lo``,
            ``eti_hi`` (equal-tailed ``ci_prob`` interval).
        """
        post = self.posterior
        var = post[self._node("market_share", source)]
        dim = self._node("market_unit", source)
        values = var.stack(sample=("chain", "draw")).transpose(dim, "sample").values
        lo, hi = (1 - ci_prob) / 2, 1 - (1 - ci_prob) / 2
        return pd.DataFrame(
            {
                "mean": values.mean(axis=1),
                "sd": values.std(axis=1, ddof=1) if values.shape[1] > 1 else 0.0,
                "eti_lo": np.quantile(values, lo, axis=1),
                "eti_hi": np.quantile(values, hi, axis=1),
            },
            index=pd.Index(var[dim].values.astype(str), name="unit"),
        )


def _censored_nb_logp_np(
    upper: np.ndarray, lower: np.ndarray, phi: np.ndarray, p: np.ndarray
) -> np.ndarray:
    """``log P(lower <= y <= upper)`` of ``nbinom(phi, p)`` per draw (rows) and cell (columns)."""
    from scipy import stats

    hi = stats.nbinom.logcdf(np.floor(upper)[None, :], phi, p)
    lo_k = np.ceil(np.nan_to_num(lower, nan=0.0))[None, :] - 1
    if not (lo_k >= 0).any():
        return hi
    lo = stats.nbinom.logcdf(np.maximum(lo_k, 0), phi, p)
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = hi + np.log1p(-np.exp(np.minimum(lo - hi, 0.0)))
    return np.where(lo_k >= 0, diff, hi)


def _latent_defaults() -> dict[str, Any]:
    from flowmodel.models.priors import DEFAULT_PRIORS

    return dict(DEFAULT_PRIORS)
