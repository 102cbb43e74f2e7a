"""Bayesian radiation models (DESIGN §4.2): original (Simini 2012) and extended (Yang 2014)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import xarray as xr

from flowmodel.exceptions import ModelConfigError
from flowmodel.models.base import Features, FlowModel, ObservedPairs, pair_values, stack_samples
from flowmodel.models.gravity import LIKELIHOODS, _count_log_likelihood, _CountLikelihood
from flowmodel.models.priors import PriorSpec

__all__ = ["RadiationModel", "intervening_rows", "radiation_log_probability"]


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


class RadiationModel(_CountLikelihood, FlowModel):
    r"""Bayesian radiation model with fitted emigration rate ``tau`` (DESIGN §4.2).

    .. math::

        \mu_{ij} = \tau_{c(i)}\, m_i\, \frac{p_{ij}}{1 - m_i/M}, \qquad
        y_{ij} \sim \operatorname{NegBin}(\mu_{ij} e_{ij}, \phi)\ \text{or}\
        \operatorname{Poisson}(\mu_{ij} e_{ij})

    with :math:`p_{ij}` the original (Simini et al. 2012) or extended (Yang et
    al. 2014, ``radiation_exponent`` :math:`\alpha`) radiation probability of
    :func:`radiation_log_probability`, :math:`m` the unit ``mass`` (population),
    :math:`s_{ij}` the intervening population (``intervening_population`` of the
    dataset, or computed), and :math:`T_i = \tau m_i` the emigrants of unit
    :math:`i`.

    Parameters
    ----------
    variant
        ``"original"`` or ``"extended"``.
    per_country_tau
        One ``tau`` per origin country (dims ``country``); countries never
        observed take, draw by draw, the ``tau`` of a randomly chosen observed
        country.
    finite_size
        Divide by the finite-system normalisation (Masucci et al. 2013).
    likelihood
        ``"negbin"`` or ``"poisson"``.
    mass
        Unit variable used as population :math:`m`, :math:`n`.
    source
        Which ``flow_<source>`` to fit.
    priors, sampler_config
        See :class:`~flowmodel.models.base.FlowModel`; nodes ``tau``,
        ``radiation_exponent``, ``phi``.

    Examples
    --------
    >>> model = RadiationModel(variant="extended")
    >>> idata = model.fit(ds, backend="laplace")  # doctest: +SKIP
    """

    default_model_config: ClassVar[dict[str, Any]] = {
        "variant": "original",
        "per_country_tau": False,
        "finite_size": True,
        "likelihood": "negbin",
        "mass": "population",
        "source": None,
    }

    def __init__(
        self,
        *,
        variant: str = "original",
        per_country_tau: bool = False,
        finite_size: bool = True,
        likelihood: str = "negbin",
        mass: str = "population",
        source: str | None = None,
        priors: Mapping[str, PriorSpec] | None = None,
        sampler_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            priors=priors,
            sampler_config=sampler_config,
            variant=variant,
            per_country_tau=bool(per_country_tau),
            finite_size=bool(finite_size),
            likelihood=likelihood,
            mass=mass,
            source=source,
        )

    def _validate_config(self) -> None:
        self._choice("variant", ("original", "extended"))
        self._choice("likelihood", LIKELIHOODS)

    def _latent_nodes(self, data: xr.Dataset | None = None) -> list[str]:
        nodes = ["tau"]
        if self.model_config["variant"] == "extended":
            nodes.append("radiation_exponent")
        return nodes

    def _summary_vars(self) -> list[str]:
        return ["tau", "radiation_exponent", "phi"]

    def _pair_names(self) -> list[str]:
        return ["distance_km", "intervening_population"]

    def _features(self, data: xr.Dataset) -> Features:
        feats = super()._features(data)
        mass = self.unit_variable(data, self.model_config["mass"])
        if np.any(mass <= 0):
            bad = np.asarray(data["unit"].values)[mass <= 0][:10].tolist()
            raise ModelConfigError(
                f"radiation mass '{self.model_config['mass']}' must be > 0; units {bad} are not. "
                "Fix: drop empty units or give them a small positive population"
            )
        feats.unit_values["mass"] = mass
        feats.unit_values["total"] = np.array([mass.sum()])
        return feats

    def _pair_values(self, data, origin_idx, dest_idx):
        if "intervening_population" in data:
            s = pair_values(data, "intervening_population", origin_idx, dest_idx)
        else:
            s = self._intervening(data)[origin_idx, dest_idx]
        return {"intervening_population": s}

    def _pair_block(self, data: xr.Dataset, start: int, stop: int) -> dict[str, np.ndarray]:
        if "intervening_population" in data:
            return super()._pair_block(data, start, stop)
        mass = self.unit_variable(data, self.model_config["mass"])
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
        mass = self.unit_variable(data, self.model_config["mass"])
        dist = data["distance_km"].transpose("origin", "destination").values
        try:
            from flowmodel.pairs import intervening_population

            s = np.asarray(intervening_population(mass, dist))
        except ImportError:  # pragma: no cover - older pairs module
            s = intervening_rows(mass, dist, np.arange(len(mass)))
        self._s_cache = (key, s)
        return s

    def _data_priors(self, data: xr.Dataset, pairs: ObservedPairs) -> dict[str, PriorSpec]:
        feats = self._features(data)
        pv = self._pair_values(data, pairs.origin_idx, pairs.dest_idx)
        m = feats.unit_values["mass"]
        logp = radiation_log_probability(
            m[pairs.origin_idx],
            m[pairs.dest_idx],
            pv["intervening_population"],
            feats.unit_values["total"][0],
            None,
            finite_size=self.model_config["finite_size"],
        )
        obs = pairs.observed
        expected = np.sum(pairs.exposure[obs] * m[pairs.origin_idx[obs]] * np.exp(logp[obs]))
        rate = max(np.sum(pairs.y[obs]), 1.0) / max(expected, 1e-300)
        return {"tau": {"dist": "LogNormal", "mu": float(np.log(rate)), "sigma": 2.0}}

    def _add_latent(self, data: xr.Dataset, pairs: ObservedPairs):
        """Register ``tau`` (and ``radiation_exponent``); return log rates ``(pair,)``."""
        feats = self._features(data)
        pv = self._pair_values(data, pairs.origin_idx, pairs.dest_idx)
        m = feats.unit_values["mass"]
        mi, nj = m[pairs.origin_idx], m[pairs.dest_idx]
        s = pv["intervening_population"]
        if np.any(~np.isfinite(s)):
            raise ModelConfigError(
                "intervening_population has NaN on observed pairs; Fix: recompute it with "
                "flowmodel.pairs.intervening_population or drop the variable"
            )
        total = float(feats.unit_values["total"][0])
        alpha = None
        if self.model_config["variant"] == "extended":
            alpha = self._prior("radiation_exponent")
        logp = radiation_log_probability(
            mi, nj, s, total, alpha, finite_size=self.model_config["finite_size"]
        )
        countries = sorted(set(np.asarray(data["country"].values).astype(str)[pairs.origin_idx]))
        self.fit_meta.update(total_mass=total, countries=countries)
        model = pm.modelcontext(None)
        if self.model_config["per_country_tau"]:
            model.add_coords({"country": countries})
            tau = self._prior("tau", dims="country")
            cidx = np.searchsorted(
                countries, np.asarray(data["country"].values).astype(str)[pairs.origin_idx]
            )
            log_tau = pt.log(tau)[cidx]
        else:
            tau = self._prior("tau")
            log_tau = pt.log(tau)
        return log_tau + np.log(mi) + logp

    def _add_likelihood(self, data: xr.Dataset, eta, pairs: ObservedPairs) -> None:
        self._count_loglik(eta, pairs)

    def _prediction_params(self, posterior, data, *, rng):
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
            "phi": stack_samples(posterior["phi"]) if "phi" in posterior else None,
        }

    def _log_rate_from_params(self, params, features, origin_idx, dest_idx, pair_vals):
        m = features.unit_values["mass"]
        total = float(features.unit_values["total"][0])
        mi, nj = m[origin_idx], m[dest_idx]
        s = np.asarray(pair_vals["intervening_population"], dtype=float)
        alpha = params["alpha"]
        if alpha is None:
            logp = radiation_log_probability(
                mi, nj, s, total, None, finite_size=self.model_config["finite_size"]
            )[None, :]
        else:
            logp = radiation_log_probability(
                mi[None, :],
                nj[None, :],
                s[None, :],
                total,
                np.asarray(alpha, dtype=float)[:, None],
                finite_size=self.model_config["finite_size"],
            )
        return np.log(params["tau_unit"][:, origin_idx]) + np.log(mi)[None, :] + logp

    def log_likelihood(self, data: xr.Dataset) -> xr.DataTree:
        """Posterior plus a pointwise ``log_likelihood`` group (dim ``pair``) for LOO."""
        return _count_log_likelihood(self, data)
