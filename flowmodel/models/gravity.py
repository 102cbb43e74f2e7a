"""The gravity preset: a gravity field observed by one count source (unconstrained or constrained).

The likelihood is vectorised over observed cells and written with sufficient
statistics: the part of the Poisson / negative-binomial log-likelihood that is
linear in the coefficients (``Σ y_ij eta_ij``) is precomputed as ``Xᵀy`` once,
so each gradient touches all pairs only through ``Σ e_ij exp(eta_ij)`` (Poisson)
or ``Σ (y_ij + phi) log(phi + e_ij mu_ij)`` (negative binomial); ``lgamma(y + phi)``
is summed over the distinct counts, not the pairs. The pieces live in
:mod:`flowmodel.models.latent` (:class:`~flowmodel.models.latent.GravityField`)
and :mod:`flowmodel.models.observations`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import xarray as xr

from flowmodel.exceptions import ModelConfigError
from flowmodel.models.base import FlowModel
from flowmodel.models.latent import CONSTRAINTS, GravityField, TemporalGravityField
from flowmodel.models.likelihoods import LIKELIHOODS
from flowmodel.models.observations import (
    ConstrainedCountObservation,
    CountObservation,
    ExpectedFlows,
    ObservationModel,
)
from flowmodel.models.priors import PriorSpec

__all__ = ["CONSTRAINTS", "LIKELIHOODS", "GravityModel"]


class GravityModel(FlowModel):
    r"""Bayesian gravity model with hierarchical country effects.

    .. math::

        \log \mu_{ij} &= \alpha + \gamma_{c(i)} + \sum_k \beta_k\, \tilde x_{k,ij},
        \qquad \gamma_c \sim \mathcal N(0, \sigma_{\text{country}}^2) \\
        y_{ij} &\sim \operatorname{NegBin}(\mu_{ij} e_{ij}, \phi)
        \quad (\operatorname{Var} = m + m^2/\phi)\ \text{or}\ \operatorname{Poisson}(\mu_{ij} e_{ij})

    where :math:`\tilde x` are the standardised terms ``origin:<var>``,
    ``destination:<var>``, ``log_distance`` (``cost_func="pow"``) or ``distance``
    (``"exp"``), ``cross_border`` and ``contiguous``, and :math:`e_{ij}` the
    exposure (census sample fraction). A source reported at a coarser level
    (previous admin-1 or country) enters through the sum of its cells' pairs.
    Constrained forms condition on margins:

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
        Add the ``cross_border`` term. When no observed cell crosses a border it
        keeps its prior (a documented default, ``priors["cross_border"]``, on the
        raw scale), :meth:`fit` warns that it is not informed, and predictions of
        cross-border pairs carry the prior's width.
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
        prior key ``country_effect`` for ``z``) when True. The centred form
        (False) draws ``country_intercept[c] ~ N(intercept, sigma_country)`` and
        reports ``country_effect = country_intercept - intercept``; it suits NUTS
        when countries have many observed pairs. ``"auto"`` (default): centred
        for NUTS, non-centred for Laplace, ADVI and MAP, whose Gaussian sits at
        the joint mode — which a centred hierarchy has at ``sigma_country -> 0``.
    temporal
        None (one period: the window of the data) or the options of a field with
        periods (:class:`~flowmodel.models.latent.TemporalGravityField`, see
        ``docs/nowcast.md``): ``periods`` (latent period labels; default from the
        observed windows), ``trend`` (``"rw"``, ``"ar1"`` or ``"none"``: the
        origin country's trend), ``pair_effect`` (a shrunk effect per observed pair,
        shared by every period), ``pair_walk``, ``unit_trends`` (origin and
        destination random walks), ``covariates`` (``"by_period"`` or ``"fixed"``),
        ``noncentered``; True takes the defaults. Unconstrained only.
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
        **GravityField.default_config,
        "likelihood": "negbin",
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
        noncentered: bool | str = "auto",
        temporal: Mapping[str, Any] | bool | None = None,
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
            noncentered=noncentered if noncentered == "auto" else bool(noncentered),
            temporal=_temporal(temporal),
            source=source,
        )

    def _validate_config(self) -> None:
        self._choice("cost_func", ("pow", "exp"))
        self._choice("likelihood", LIKELIHOODS)
        self._choice("constraint", CONSTRAINTS)

    @property
    def constraint(self) -> str:
        """The constraint (``model_config['constraint']``)."""
        return self.model_config["constraint"]

    def _latent_field(self) -> GravityField:
        config = {k: self.model_config[k] for k in GravityField.default_config}
        if config.get("temporal") is not None:
            return TemporalGravityField(**config)
        return GravityField(**config)

    def _observation_models(self, data: xr.Dataset) -> list[ObservationModel]:
        source = self._source(data)
        likelihood = self.model_config["likelihood"]
        if self.constraint == "none":
            return [CountObservation(source, likelihood=likelihood)]
        return [
            ConstrainedCountObservation(source, likelihood=likelihood, constraint=self.constraint)
        ]

    def _flow_rule(self) -> ExpectedFlows:
        if self.constraint == "none":
            return ExpectedFlows()
        source = self.fit_meta.get("source") or self.model_config.get("source")
        return ConstrainedCountObservation(
            source or "", likelihood=self.model_config["likelihood"], constraint=self.constraint
        ).flow_rule()

    def _summary_vars(self) -> list[str]:
        return ["intercept", "beta", "sigma_country", "sigma_slope", "phi"]


def _names(values: Sequence[str], key: str) -> list[str]:
    if isinstance(values, str):
        raise ModelConfigError(
            f"{key} must be a list of names, got the string {values!r}; Fix: {key}=[{values!r}]"
        )
    return [str(v) for v in values]


def _temporal(value: Mapping[str, Any] | bool | None) -> dict[str, Any] | None:
    """``temporal=`` as stored in the model config: None, or a dict of options."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, Mapping):
        raise ModelConfigError(
            f"temporal={value!r}: expected a table of options (periods, trend, pair_effect, "
            "unit_trends), True or None. Fix: e.g. temporal={'trend': 'rw'}"
        )
    return {str(k): (list(v) if k == "periods" and v is not None else v) for k, v in value.items()}
