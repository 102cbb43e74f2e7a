"""Bayesian gravity models (DESIGN §4.1), unconstrained and constrained.

The likelihood is vectorised over observed pairs and written with sufficient
statistics: the part of the Poisson / negative-binomial log-likelihood that is
linear in the coefficients (``Σ y_ij eta_ij``) is precomputed as ``Xᵀy`` once,
so each gradient touches all pairs only through ``Σ e_ij exp(eta_ij)`` (Poisson)
or ``Σ (y_ij + phi) log(phi + e_ij mu_ij)`` (negative binomial); ``lgamma(y + phi)``
is summed over the distinct counts, not the pairs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pymc as pm
import pytensor.tensor as pt
import xarray as xr
from scipy import special

from flowmodel.exceptions import ModelConfigError
from flowmodel.models.base import (
    Features,
    FlowModel,
    ObservedPairs,
    censored_bounds,
    interval_logcdf,
    stack_samples,
)
from flowmodel.models.priors import PriorSpec

__all__ = ["GravityModel"]

CONSTRAINTS = ("none", "production", "attraction", "doubly")
LIKELIHOODS = ("negbin", "poisson")


def _segment_sum(values, index: np.ndarray, n: int):
    """``out[g] = Σ values[index == g]`` as a PyTensor expression."""
    return pt.inc_subtensor(pt.zeros(n)[index], values)


class _CountLikelihood:
    """Shared count-likelihood pieces for gravity and radiation models.

    Mixed into :class:`FlowModel` subclasses whose latent part returns the log
    expected population-scale flow ``eta``; ``likelihood`` is ``"negbin"`` or
    ``"poisson"``.
    """

    model_config: dict[str, Any]

    def _likelihood_nodes(self) -> list[str]:
        return ["phi"] if self.model_config["likelihood"] == "negbin" else []

    def _count_loglik(self, eta, pairs: ObservedPairs, linear_part=None) -> None:
        """Register the Poisson/NB log-likelihood of ``pairs`` as Potentials.

        ``linear_part`` is ``Σ y eta`` over the exactly observed pairs when the
        caller has it in sufficient-statistic form; otherwise ``dot(y, eta)``.
        """
        obs = pairs.observed
        y = pairs.y[obs]
        log_e = np.log(pairs.exposure)
        eta_obs = eta[np.flatnonzero(obs)] if not obs.all() else eta
        if linear_part is None:
            linear_part = pt.dot(y, eta_obs)
        linear = linear_part + float(np.dot(y, log_e[obs]))
        log_mu = eta_obs + log_e[obs]
        if self.model_config["likelihood"] == "poisson":
            logp = linear - pt.sum(pt.exp(log_mu)) - float(special.gammaln(y + 1).sum())
        else:
            phi = self._prior("phi")
            values, counts = np.unique(y, return_counts=True)
            n_obs = len(y)
            log_phi_mu = pt.log(phi + pt.exp(log_mu))
            # Σ lgamma(y + phi) over distinct counts; Σ (y + phi) log(phi + mu) over pairs
            logp = (
                pt.dot(counts, pt.gammaln(values + phi))
                - n_obs * pt.gammaln(phi)
                - float(special.gammaln(y + 1).sum())
                + n_obs * phi * pt.log(phi)
                + linear
                - pt.dot(y, log_phi_mu)
                - phi * pt.sum(log_phi_mu)
            )
        pm.Potential("loglik", logp)
        cens = ~obs
        if cens.any():
            eta_c = eta[np.flatnonzero(cens)]
            mu_c = pt.exp(eta_c + log_e[cens])
            upper, lower = censored_bounds(pairs.upper[cens], pairs.lower[cens])

            def dist(idx: np.ndarray | None) -> Any:
                mu = mu_c if idx is None else mu_c[idx]
                if self.model_config["likelihood"] == "poisson":
                    return pm.Poisson.dist(mu=mu)
                return pm.NegativeBinomial.dist(mu=mu, alpha=phi)

            pm.Potential("loglik_censored", interval_logcdf(dist, upper, lower).sum())

    @staticmethod
    def _pointwise_count_loglik(
        log_mu: np.ndarray, y: np.ndarray, phi: np.ndarray | None
    ) -> np.ndarray:
        """Pointwise log-likelihood ``(sample, pair)`` in numpy."""
        mu = np.exp(log_mu)
        if phi is None:
            return y * log_mu - mu - special.gammaln(y + 1)
        phi = phi[:, None]
        return (
            special.gammaln(y + phi)
            - special.gammaln(phi)
            - special.gammaln(y + 1)
            + phi * np.log(phi / (phi + mu))
            + y * (log_mu - np.log(phi + mu))
        )


class GravityModel(_CountLikelihood, FlowModel):
    r"""Bayesian gravity model with hierarchical country effects (DESIGN §4.1).

    .. math::

        \log \mu_{ij} &= \alpha + \gamma_{c(i)} + \sum_k \beta_k\, \tilde x_{k,ij},
        \qquad \gamma_c \sim \mathcal N(0, \sigma_{\text{country}}^2) \\
        y_{ij} &\sim \operatorname{NegBin}(\mu_{ij} e_{ij}, \phi)
        \quad (\operatorname{Var} = m + m^2/\phi)\ \text{or}\ \operatorname{Poisson}(\mu_{ij} e_{ij})

    where :math:`\tilde x` are the standardised terms ``origin:<var>``,
    ``destination:<var>``, ``log_distance`` (``cost_func="pow"``) or ``distance``
    (``"exp"``), ``cross_border`` and ``contiguous``, and :math:`e_{ij}` the
    exposure (census sample fraction). Constrained forms condition on margins:

    .. math::

        \text{production: } (y_{i\cdot}) \mid O_i \sim \operatorname{Mult}(O_i, \pi_{i\cdot}),
        \quad \pi_{ij} \propto \exp\big(\textstyle\sum_k \beta_k \tilde x_{k,ij}\big)

    with destination and pair terms only (attraction: the transpose, origin and
    pair terms; doubly: production plus a destination effect :math:`\delta_j`).
    With ``likelihood="negbin"`` the multinomial becomes a Dirichlet-multinomial
    with concentration :math:`\alpha_{ij} = \phi\,\pi_{ij}` (one global
    :math:`\phi`, so :math:`\sum_j \alpha_{ij} = \phi` for every margin): the
    variance of :math:`y_{ij}` is :math:`O_i \pi_{ij}(1-\pi_{ij})(O_i+\phi)/(1+\phi)`,
    i.e. for :math:`O_i \gg \phi` each unit's shares are about as noisy as one
    Dirichlet draw whatever its total, and large margins and large flows weigh
    far less than under the multinomial. When the data are very overdispersed
    (small :math:`\phi`) the coefficients can then differ a lot from the
    Poisson / multinomial ones (docs/validation.md, New York).

    Parameters
    ----------
    origin_covariates, destination_covariates
        Unit variables by name; ``log_<var>`` is computed from ``<var>``.
    cost_func
        ``"pow"`` (term ``log_distance``) or ``"exp"`` (term ``distance``, km).
    cross_border
        Add the ``cross_border`` term (dropped when every observed pair lies in
        one country).
    contiguity
        Add the ``contiguous`` term (needs ``contiguous`` in the dataset).
    likelihood
        ``"negbin"`` or ``"poisson"``.
    constraint
        ``"none"``, ``"production"``, ``"attraction"`` or ``"doubly"``.
    country_effects
        Hierarchical origin-country intercepts (used when observed origins span
        two or more countries; unconstrained and attraction forms).
    country_slopes
        Terms that get country-specific slope offsets
        ``country_slope[slope_term, country] ~ N(0, sigma_slope)``.
    noncentered
        Non-centred country effects (``country_effect = sigma_country * z``,
        prior key ``country_effect`` for ``z``). The default centred form draws
        ``country_intercept[c] ~ N(intercept, sigma_country)`` and reports
        ``country_effect = country_intercept - intercept``; it suits countries
        with many observed pairs (and Laplace fits).
    source
        Which ``flow_<source>`` to fit (default: the only one).
    priors, sampler_config
        See :class:`~flowmodel.models.base.FlowModel`.

    Examples
    --------
    >>> from flowmodel.simulate import simulate_flow_dataset
    >>> ds, truth = simulate_flow_dataset(40, 2, seed=1)
    >>> model = GravityModel(destination_covariates=["log_population", "night_lights_per_capita"])
    >>> idata = model.fit(ds, backend="laplace", random_seed=1)  # doctest: +SKIP
    >>> flows = model.predict(ds)  # doctest: +SKIP
    """

    default_model_config: ClassVar[dict[str, Any]] = {
        "origin_covariates": ["log_population"],
        "destination_covariates": ["log_population"],
        "cost_func": "pow",
        "cross_border": True,
        "contiguity": False,
        "likelihood": "negbin",
        "constraint": "none",
        "country_effects": True,
        "country_slopes": [],
        "noncentered": False,
        "source": None,
    }

    def __init__(
        self,
        *,
        origin_covariates: Sequence[str] = ("log_population",),
        destination_covariates: Sequence[str] = ("log_population",),
        cost_func: str = "pow",
        cross_border: bool = True,
        contiguity: bool = False,
        likelihood: str = "negbin",
        constraint: str = "none",
        country_effects: bool = True,
        country_slopes: Sequence[str] = (),
        noncentered: bool = False,
        source: str | None = None,
        priors: Mapping[str, PriorSpec] | None = None,
        sampler_config: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(
            priors=priors,
            sampler_config=sampler_config,
            origin_covariates=_names(origin_covariates, "origin_covariates"),
            destination_covariates=_names(destination_covariates, "destination_covariates"),
            cost_func=cost_func,
            cross_border=bool(cross_border),
            contiguity=bool(contiguity),
            likelihood=likelihood,
            constraint=constraint,
            country_effects=bool(country_effects),
            country_slopes=list(country_slopes),
            noncentered=bool(noncentered),
            source=source,
        )

    def _validate_config(self) -> None:
        self._choice("cost_func", ("pow", "exp"))
        self._choice("likelihood", LIKELIHOODS)
        self._choice("constraint", CONSTRAINTS)

    # ----------------------------------------------------------------- terms
    @property
    def constraint(self) -> str:
        """The constraint (``model_config['constraint']``)."""
        return self.model_config["constraint"]

    def _candidate_terms(self) -> list[str]:
        cfg = self.model_config
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

    def _pair_names(self) -> list[str]:
        names = ["distance_km"]
        terms = self.fit_meta.get("terms") or self._candidate_terms()
        for t in ("cross_border", "contiguous"):
            if t in terms:
                names.append(t)
        return names

    def _term_matrix(
        self,
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

    def _features(self, data: xr.Dataset) -> Features:
        feats = super()._features(data)
        cfg = self.model_config
        for name in {*cfg["origin_covariates"], *cfg["destination_covariates"]}:
            feats.unit_values[name] = self.unit_variable(data, name)
        return feats

    def _pair_values(self, data, origin_idx, dest_idx):
        for t in ("contiguous",):
            if t in self._candidate_terms() and t not in data:
                raise ModelConfigError(
                    "contiguity=True needs the pair variable 'contiguous' in the dataset; "
                    "Fix: build the dataset from unit geometries or pass contiguity=False"
                )
        return super()._pair_values(data, origin_idx, dest_idx)

    def _has_country_effects(self, countries: Sequence[str]) -> bool:
        return (
            self.model_config["country_effects"]
            and self.constraint in ("none", "attraction")
            and len(countries) > 1
        )

    def _latent_nodes(self, data: xr.Dataset | None = None) -> list[str]:
        nodes = ["beta"]
        if self.constraint == "none":
            nodes.insert(0, "intercept")
        if self.model_config["country_effects"] and self.constraint in ("none", "attraction"):
            nodes += ["country_effect", "sigma_country"]
        if self.model_config["country_slopes"]:
            nodes += ["country_slope", "sigma_slope"]
        if self.constraint == "doubly":
            nodes.append("destination_effect")
        return nodes

    def _data_priors(self, data: xr.Dataset, pairs: ObservedPairs) -> dict[str, PriorSpec]:
        obs = pairs.observed
        rate = np.sum(pairs.y[obs]) / max(np.sum(pairs.exposure[obs]), 1e-12)
        return {
            "intercept": {"dist": "Normal", "mu": float(np.log(max(rate, 1e-6))), "sigma": 5.0}
        }

    def _prepare_design(
        self, data: xr.Dataset, pairs: ObservedPairs
    ) -> tuple[list[str], np.ndarray]:
        feats = self._features(data)
        pvals = self._pair_values(data, pairs.origin_idx, pairs.dest_idx)
        terms = self._candidate_terms()
        X = self._term_matrix(terms, feats, pairs.origin_idx, pairs.dest_idx, pvals)
        keep = []
        for k, term in enumerate(terms):
            sd = np.std(X[:, k])
            if not np.all(np.isfinite(X[:, k])):
                raise ModelConfigError(
                    f"term '{term}' has NaN or infinite values on observed pairs; "
                    "Fix: fill the covariate or drop it from the model"
                )
            if sd == 0:
                if term in ("cross_border", "contiguous"):
                    continue  # e.g. every observed pair within one country
                raise ModelConfigError(
                    f"covariate term '{term}' has zero variance over the observed pairs "
                    f"(every value is {X[0, k]:g}); Fix: drop it from origin_/destination_covariates"
                )
            keep.append(k)
        terms = [terms[k] for k in keep]
        return terms, X[:, keep]

    # ----------------------------------------------------------------- build
    def _add_latent(self, data: xr.Dataset, pairs: ObservedPairs):
        """Register intercept, beta (standardised), country effects; return eta ``(pair,)``.

        For constrained forms the returned tensor is the *unnormalised* log
        choice weight (no intercept / origin effects); :meth:`_add_likelihood`
        normalises it.
        """
        terms, X = self._prepare_design(data, pairs)
        means = X.mean(axis=0)
        sds = X.std(axis=0)
        Xs = (X - means) / sds
        countries_all = np.asarray(data["country"].values).astype(str)
        pair_country = countries_all[pairs.origin_idx]
        countries = sorted(set(pair_country))
        use_ce = self._has_country_effects(countries)
        slopes = list(self.model_config["country_slopes"])
        unknown = sorted(set(slopes) - set(terms))
        if unknown:
            raise ModelConfigError(
                f"country_slopes names term(s) {unknown} not in the model; terms are {terms}"
            )
        model = pm.modelcontext(None)
        model.add_coords({"term": terms})
        self.fit_meta.update(
            terms=terms,
            term_mean=means.tolist(),
            term_sd=sds.tolist(),
            countries=countries if (use_ce or slopes) else [],
        )
        beta = self._prior("beta", dims="term")
        eta_lin = pt.dot(Xs, beta)
        ytot_lin = None
        obs = pairs.observed
        yo = pairs.y[obs]
        if self.constraint == "none":
            intercept = self._prior("intercept")
            eta = intercept + eta_lin
            pm.Deterministic("intercept_raw", intercept - pt.sum(beta * means / sds))
            ytot_lin = float(yo.sum()) * intercept + pt.dot(Xs[obs].T @ yo, beta)
        else:
            eta = eta_lin
            ytot_lin = pt.dot(Xs[obs].T @ yo, beta)
        pm.Deterministic("beta_raw", beta / sds, dims="term")
        if use_ce or slopes:
            model.add_coords({"country": countries})
            cidx = np.searchsorted(countries, pair_country)
        if use_ce:
            sigma = self._prior("sigma_country")
            yc = np.bincount(cidx[obs], weights=yo, minlength=len(countries))
            if self.model_config["noncentered"]:
                z = create_z(self, "country_effect", "country")
                ce = pm.Deterministic("country_effect", sigma * z, dims="country")
                eta = eta + ce[cidx]
                ytot_lin = ytot_lin + pt.dot(yc, ce)
            elif self.constraint == "none":
                # country intercepts centred on the global intercept: the data pin each
                # country's level, so NUTS and Laplace do not walk the intercept /
                # country-effect ridge; country_effect = country_intercept - intercept
                level = pm.Normal("country_intercept", intercept, sigma, dims="country")
                pm.Deterministic("country_effect", level - intercept, dims="country")
                eta = eta_lin + level[cidx]
                ytot_lin = pt.dot(Xs[obs].T @ yo, beta) + pt.dot(yc, level)
            else:
                ce = pm.Normal("country_effect", 0.0, sigma, dims="country")
                eta = eta + ce[cidx]
                ytot_lin = ytot_lin + pt.dot(yc, ce)
        if slopes:
            model.add_coords({"slope_term": slopes})
            sig_s = self._prior("sigma_slope")
            zs = create_z(self, "country_slope", ("slope_term", "country"))
            cs = pm.Deterministic("country_slope", sig_s * zs, dims=("slope_term", "country"))
            kidx = [terms.index(t) for t in slopes]
            contrib = pt.sum(Xs[:, kidx] * cs[:, cidx].T, axis=1)
            eta = eta + contrib
            ytot_lin = ytot_lin + pt.dot(yo, contrib[np.flatnonzero(obs)])
        if self.constraint == "doubly":
            n_unit = data.sizes["unit"]
            dests = np.unique(pairs.dest_idx)
            model.add_coords(
                {"destination_unit": np.asarray(data["unit"].values)[dests].astype(str)}
            )
            spec = self._priors_in_use["destination_effect"]
            free = create_prior_free(spec, len(dests) - 1)
            delta = pm.Deterministic(
                "destination_effect", pt.concatenate([pt.zeros(1), free]), dims="destination_unit"
            )
            pos = np.full(n_unit, -1)
            pos[dests] = np.arange(len(dests))
            didx = pos[pairs.dest_idx]
            eta = eta + delta[didx]
            ytot_lin = ytot_lin + pt.dot(
                np.bincount(didx[obs], weights=yo, minlength=len(dests)), delta
            )
            self.fit_meta["destination_units"] = (
                np.asarray(data["unit"].values)[dests].astype(str).tolist()
            )
        self._linear_part = ytot_lin
        return eta

    def _add_likelihood(self, data: xr.Dataset, eta, pairs: ObservedPairs) -> None:
        """Poisson / NB (unconstrained) or (Dirichlet-)multinomial given margins."""
        if self.constraint == "none":
            self._count_loglik(eta, pairs, linear_part=self._linear_part)
            return
        obs = pairs.observed
        if not obs.all():
            margin_name = "outflow" if self.constraint != "attraction" else "inflow"
            raise ModelConfigError(
                f"constraint='{self.constraint}' cannot use the {int((~obs).sum())} censored "
                f"cell(s) of flow_{pairs.source} (flow_{pairs.source}_max): the model conditions "
                f"on each unit's observed {margin_name} total, which is unknown when one of its "
                "cells is only bounded above. Fix: use constraint='none' (censored cells enter "
                "through the count CDF), fit the source in a FusionModel, or drop the censored "
                "cells"
            )
        group = pairs.dest_idx if self.constraint == "attraction" else pairs.origin_idx
        groups, gidx = np.unique(group, return_inverse=True)
        margin = np.bincount(gidx, weights=pairs.y, minlength=len(groups))
        # multinomial coefficient log(O_i! / prod_j y_ij!): a constant, kept so the
        # Potential is the exact log pmf (comparable across likelihoods)
        log_coef = float(special.gammaln(margin + 1).sum() - special.gammaln(pairs.y + 1).sum())
        shift = pt.max(eta)
        denom = _segment_sum(pt.exp(eta - shift), gidx, len(groups))
        log_denom = pt.log(denom) + shift
        if self.model_config["likelihood"] == "poisson":
            # Σ_i log Mult(y_i. | O_i, pi_i.), Σ y_ij log pi_ij = Xᵀy·beta - Σ_i O_i log Σ_j w_ij
            logp = self._linear_part - pt.dot(margin, log_denom) + log_coef
        else:
            # Σ_i log DirMult(y_i. | O_i, alpha_i. = phi pi_i.): one global concentration,
            # so Σ_j alpha_ij = phi for every margin (pi_i. sums to one over its pairs)
            phi = self._prior("phi")
            log_pi = eta - log_denom[gidx]
            alpha = phi * pt.exp(log_pi)
            logp = (
                len(groups) * pt.gammaln(phi)
                - pt.sum(pt.gammaln(margin + phi))
                + pt.sum(pt.gammaln(pairs.y + alpha) - pt.gammaln(alpha))
                + log_coef
            )
        pm.Potential("loglik", logp)
        self.fit_meta["constraint_groups"] = len(groups)

    # ----------------------------------------------------------------- predict
    def _prediction_params(
        self, posterior: xr.Dataset, data: xr.Dataset, *, rng: np.random.Generator
    ) -> dict[str, Any]:
        meta = self.fit_meta
        params: dict[str, Any] = {
            "beta": stack_samples(posterior["beta"]),
            "term_mean": np.asarray(meta["term_mean"]),
            "term_sd": np.asarray(meta["term_sd"]),
            "terms": list(meta["terms"]),
        }
        n_samples = params["beta"].shape[0]
        params["intercept"] = (
            stack_samples(posterior["intercept"])
            if "intercept" in posterior
            else np.zeros(n_samples)
        )
        params["phi"] = stack_samples(posterior["phi"]) if "phi" in posterior else None
        unit_country = np.asarray(data["country"].values).astype(str)
        countries = list(meta.get("countries") or [])
        ce_unit = np.zeros((n_samples, len(unit_country)))
        if "country_effect" in posterior:
            ce = stack_samples(posterior["country_effect"])
            sigma = stack_samples(posterior["sigma_country"])
            new = sorted(set(unit_country) - set(countries))
            drawn = rng.normal(size=(n_samples, len(new))) * sigma[:, None]
            table = dict(zip(countries, ce.T, strict=True)) | dict(zip(new, drawn.T, strict=True))
            ce_unit = np.stack([table[c] for c in unit_country], axis=1)
        params["country_effect_unit"] = ce_unit
        if "country_slope" in posterior:
            cs = stack_samples(posterior["country_slope"])  # (S, slope_term, country)
            sig = stack_samples(posterior["sigma_slope"])
            slopes = list(self.model_config["country_slopes"])
            new = sorted(set(unit_country) - set(countries))
            drawn = rng.normal(size=(n_samples, len(slopes), len(new))) * sig[:, None, None]
            full = np.concatenate([cs, drawn], axis=2)
            order = {c: k for k, c in enumerate(countries + new)}
            params["country_slope_unit"] = full[:, :, [order[c] for c in unit_country]]
            params["slope_idx"] = [params["terms"].index(t) for t in slopes]
        if "destination_effect" in posterior:
            de = stack_samples(posterior["destination_effect"])
            units = np.asarray(data["unit"].values).astype(str)
            table = dict(zip(meta["destination_units"], de.T, strict=True))
            params["destination_effect_unit"] = np.stack(
                [table.get(u, np.full(n_samples, np.nan)) for u in units], axis=1
            )
        return params

    def _log_rate_from_params(self, params, features, origin_idx, dest_idx, pair_vals):
        X = self._term_matrix(params["terms"], features, origin_idx, dest_idx, pair_vals)
        Xs = (X - params["term_mean"]) / params["term_sd"]
        eta = params["intercept"][:, None] + params["beta"] @ Xs.T
        eta = eta + params["country_effect_unit"][:, origin_idx]
        if "country_slope_unit" in params:
            for k, t in enumerate(params["slope_idx"]):
                eta = eta + params["country_slope_unit"][:, k, origin_idx] * Xs[None, :, t]
        if "destination_effect_unit" in params:
            eta = eta + params["destination_effect_unit"][:, dest_idx]
        return eta

    def log_likelihood(self, data: xr.Dataset) -> xr.DataTree:
        """Posterior plus a pointwise ``log_likelihood`` group (dim ``pair``) for LOO.

        Unconstrained models only (one term per observed pair); constrained
        models condition on margins and have one term per origin.
        """
        if self.constraint != "none":
            raise ModelConfigError(
                f"pointwise log-likelihood of constraint='{self.constraint}' is per margin, "
                "not per pair; Fix: compare unconstrained models"
            )
        return _count_log_likelihood(self, data)


def _names(values: Sequence[str], key: str) -> list[str]:
    if isinstance(values, str):
        raise ModelConfigError(
            f"{key} must be a list of names, got the string {values!r}; Fix: {key}=[{values!r}]"
        )
    return [str(v) for v in values]


def create_z(model: FlowModel, name: str, dims: str):
    """Non-centred standard-normal offsets of node ``name`` (prior key ``name``)."""
    from flowmodel.models.priors import create_prior

    return create_prior(f"{name}_z", model._priors_in_use[name], dims=dims)


def create_prior_free(spec: PriorSpec, n: int):
    """``destination_effect`` free components (the first destination is the reference, 0)."""
    from flowmodel.models.priors import create_prior

    model = pm.modelcontext(None)
    model.add_coords({"destination_free": np.arange(n)})
    return create_prior("destination_effect_free", spec, dims="destination_free")


def _count_log_likelihood(model: FlowModel, data: xr.Dataset) -> xr.DataTree:
    posterior = model.posterior
    source = model.fit_meta.get("source") or model._source(data)
    pairs = model._observed_pairs(data, source)
    pairs = pairs.subset(pairs.observed)
    log_rate = model._log_rate_draws(posterior, data, pairs.origin_idx, pairs.dest_idx)
    log_mu = log_rate + np.log(pairs.exposure)[None, :]
    phi = stack_samples(posterior["phi"]) if "phi" in posterior else None
    ll = _CountLikelihood._pointwise_count_loglik(log_mu, pairs.y[None, :], phi)
    n_chain, n_draw = posterior.sizes["chain"], posterior.sizes["draw"]
    ll = ll.reshape(n_chain, n_draw, -1)
    ds = xr.Dataset(
        {f"flow_{source}": (("chain", "draw", "pair"), ll)},
        coords={"chain": posterior["chain"].values, "draw": posterior["draw"].values},
    )
    obs = xr.Dataset(
        {f"flow_{source}": (("pair",), pairs.y)},
    )
    tree = xr.DataTree()
    tree["posterior"] = xr.DataTree(posterior)
    tree["log_likelihood"] = xr.DataTree(ds)
    tree["observed_data"] = xr.DataTree(obs)
    return tree
