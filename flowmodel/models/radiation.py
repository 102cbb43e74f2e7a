"""The radiation preset: original (Simini 2012) or extended (Yang 2014) radiation field, one source."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import xarray as xr

from flowmodel.models.base import FlowModel
from flowmodel.models.latent import (
    RadiationField,
    intervening_rows,
    radiation_log_probability,
)
from flowmodel.models.likelihoods import LIKELIHOODS
from flowmodel.models.observations import CountObservation, ObservationModel
from flowmodel.models.priors import PriorSpec

__all__ = ["RadiationModel", "intervening_rows", "radiation_log_probability"]


class RadiationModel(FlowModel):
    r"""Bayesian radiation model with fitted emigration rate ``tau``.

    .. math::

        \mu_{ij} = \tau_{c(i)}\, m_i\, \frac{p_{ij}}{1 - m_i/M}, \qquad
        y_{ij} \sim \operatorname{NegBin}(\mu_{ij} e_{ij}, \phi)\ \text{or}\
        \operatorname{Poisson}(\mu_{ij} e_{ij})

    with :math:`p_{ij}` the original (Simini et al. 2012) or extended (Yang et
    al. 2014, ``radiation_exponent`` :math:`\alpha`) radiation probability of
    :func:`~flowmodel.models.latent.radiation_log_probability`, :math:`m` the unit
    ``mass`` (population), :math:`s_{ij}` the intervening population
    (``intervening_population`` of the dataset, or computed), and
    :math:`T_i = \tau m_i` the emigrants of unit :math:`i`.

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
        **RadiationField.default_config,
        "likelihood": "negbin",
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

    def _latent_field(self) -> RadiationField:
        return RadiationField(**{k: self.model_config[k] for k in RadiationField.default_config})

    def _observation_models(self, data: xr.Dataset) -> list[ObservationModel]:
        return [CountObservation(self._source(data), likelihood=self.model_config["likelihood"])]

    def _summary_vars(self) -> list[str]:
        return ["tau", "radiation_exponent", "phi"]
