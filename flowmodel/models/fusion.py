"""The fusion preset: one latent flow field observed by several sources (census, CDR, estimates).

A :class:`FusionModel` takes the latent field of a gravity or radiation preset and
one observation model per source (:mod:`flowmodel.models.observations`):

- **counts** (a census table or person records, at the unit level or summed over
  admin-1 units or countries): negative binomial with the sample fraction as
  exposure, optional undercount and duration factors;
- **cdr** (``cdr`` / ``cdr_*``): counts scaled by a per-origin-unit market share
  (logit-normal, pooled within country; a penetration covariate enters by its
  within-country shape with a slope, and by its level only when it reads as a
  share) and period effects; redacted cells enter as ``P(y <= 15)``; the operator's in/out
  totals (``<source>_outflow`` / ``_inflow``) through the remainder ``total -
  released cells``;
- **estimates** (``estimate_<name>``: published estimates with standard errors at
  any level, e.g. country-pair migrant flows): log-normal on the sum of the
  latent flow over each cell. Every estimate source in the dataset is used.

Prediction of the latent, population-scale flow goes through the same streamed
:mod:`flowmodel.predict` path as every model, with the dispersion of the
reference source (the first census-type count source by default).

The model fits a dense FlowDataset or a sparse pair set
(:func:`flowmodel.pairs.sparse_pairs`): the latent field is evaluated on the pairs
the sources inform only, so the cost grows with the cells, never with N². A sparse
set must hold every member pair of an aggregated cell and every pair an in/out
total sums (``sparse_pairs(..., include_observed=True)`` keeps them); a missing
one raises :class:`~flowmodel.exceptions.DataContractError` with the fix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, override

import pandas as pd
import xarray as xr

from flowmodel.dataset import estimate_sources
from flowmodel.exceptions import ModelConfigError
from flowmodel.models.base import _MODEL_REGISTRY, FlowModel
from flowmodel.models.inference import LAPLACE_INTEGRATE_MAX
from flowmodel.models.latent import LatentField
from flowmodel.models.observations import (
    CDRObservation,
    ObservationModel,
    check_sources_exist,
    observation_for,
)
from flowmodel.naming import is_cdr_source

__all__ = ["CDR_KIND", "CENSUS_KIND", "FusionModel", "source_kind"]

CDR_KIND = "cdr"
CENSUS_KIND = "census"


def source_kind(source: str) -> str:
    """Default observation model of a source name: ``"cdr"`` for ``cdr`` / ``cdr_*``, else ``"census"``."""
    return CDR_KIND if is_cdr_source(source) else CENSUS_KIND


def _latent_spec(latent: FlowModel) -> dict[str, Any]:
    import copy

    return {
        "class": type(latent).__name__,
        "model_config": copy.deepcopy(latent.model_config),
        "priors": dict(latent.priors),
    }


def _latent_from(latent: Any) -> FlowModel:
    """Return the latent preset from an instance or its saved spec (``class``, ``model_config``)."""
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
    r"""One latent flow field observed by census samples, (redacted) CDR and published estimates.

    The latent field (gravity or radiation, unconstrained) gives the log expected
    population-scale flow :math:`\eta_{ij}` of every pair; each source observes
    sums of it through its own observation model:

    .. math::

        y^{\mathrm{census}}_{c} &\sim \mathrm{NB}\Big(f_c \sum_{(i,j)\in c} e^{\eta_{ij}},\
            \phi_{\mathrm{census}}\Big) \\
        y^{\mathrm{cdr}}_{ijt} &\sim \mathrm{NB}\big(e^{\eta_{ij}}\, s_i\, \pi_t,\
            \phi_{\mathrm{cdr}}\big), \qquad
        P\big(y^{\mathrm{cdr}}_{ijt} \le 15\big) \text{ for a redacted cell} \\
        \log s_i &= C\big(\log\operatorname{expit}(m_{c(i)} + \gamma + \delta_{c(i)})
            + b\, z_i + a^\top x_i + \sigma_s e_i\big), \quad
            \gamma, \delta_c \sim N(0, 0.5^2),\
            b \sim N(0.5, 0.5^2),\ a_k \sim N(0, 0.5^2),\ e_i \sim N(0, 1) \\
        \log \pi_t &= \log \kappa + d_t, \quad \kappa \sim \mathrm{LogNormal}(0, 3^2),\
            d \sim \mathrm{ZeroSumNormal}(0.5) \\
        \log \hat y^{\mathrm{est}}_c &\sim \mathcal N\Big(\log \sum_{(i,j)\in c} e^{\eta_{ij}},\
            \sigma_c^2\Big)

    with :math:`f_c` the census sample fraction (``exposure_census``), a census
    cell :math:`c` one pair or — for a census that records the previous admin-1
    unit or only the previous *country* of immigrants — every pair of its member
    units, :math:`s_i` the ``market_share`` of origin unit :math:`i` (the
    operator's share of its movers times the detection rate of home detection;
    :math:`C` a smooth ceiling at 1, :func:`~flowmodel.models.observations.share_ceiling`:
    the units deviate from their country's level multiplicatively),
    :math:`z_i` the penetration covariate (``cdr_subscribers_per_resident``)
    standardised within its country on the log or logit scale, :math:`m_c` the
    logit of the country's mean covariate when it reads as a share (else of
    ``market_share_default``), :math:`\gamma` the level common to the CDR
    countries, :math:`\delta_c` each country's offset, :math:`x_i` the origin terms
    ``market_share_origin_terms`` (standardised like :math:`z_i`), :math:`\pi_t` the
    ``period_effect`` and :math:`\phi` per source (``phi``, dim ``source``); see
    :class:`~flowmodel.models.observations.CDRObservation`. A census anchors the absolute scale;
    countries with only CDR borrow it through the latent coefficients and the
    country-effect hierarchy, and countries with no data get their effect from
    ``N(0, sigma_country)``.

    Parameters
    ----------
    latent
        The latent preset: an unconstrained
        :class:`~flowmodel.models.gravity.GravityModel` or a
        :class:`~flowmodel.models.radiation.RadiationModel`. Its covariates,
        cost function and priors define :math:`\eta`; its ``source`` is ignored.
    sources
        Sources to fit. ``cdr`` and ``cdr_*`` use the CDR observation model,
        ``estimate_<name>`` variables the estimates model, any other name the
        census (count) one; ``source_options`` can say otherwise. Estimate
        sources of the dataset not listed are added.
    market_share_covariate
        Unit variable of the operator's penetration (subscribers per resident):
        its within-country shape informs the shares through a slope, whatever its
        scale; its country means give the level only when it reads as a share
        (values in (0, 1), country means in 2-98%). Ignored where absent or NaN.
    market_share_default
        Prior centre of the market share where the covariate gives no level.
    market_share_origin_terms
        Unit variables the market share may go with beyond the penetration
        covariate, each with its own slope (``market_share_origin_slope``,
        ``N(0, 0.5^2)`` on the term standardised within its country):
        ``"latent"`` takes the latent model's origin covariates, so that a share
        that is higher in populous or urban units is not read as more migration
        from them; None (default) or ``[]``: none. Measured on the sparse-CDR
        worlds (docs/fusion.md): CPC in CDR-only countries +0.002 to +0.011 on
        four seeds, but the per-unit share levels less well placed (seed 0: 81%
        of units inside their 90% intervals against 95%), hence opt-in.
    market_share_spatial
        Smooth the shares' unit effects over neighbouring units of the same country
        (BYM2: ``sigma_market_share * (sqrt(1 - rho) e_i + sqrt(rho) u*_i)``, ``u*``
        a scaled intrinsic CAR on the ``contiguous`` graph, ``rho`` =
        ``market_share_spatial_fraction`` ~ Beta(0.5, 0.5)), for an operator whose
        strength is regional beyond what the penetration covariate shows. Needs
        ``contiguous`` (a dataset built from unit polygons). Default False.
    spurious_relocations
        Give every CDR cell a background of spurious relocations — moves that
        home detection invents when a stray night misplaces a home for one
        period — of ``spurious_rate x S_i S_j / sum S`` (``S``: subscribers with
        a home per unit, ``cdr_subscribers``), distance-free, so that the in/out
        totals' redacted moves are not read as a flatter distance decay.
        ``spurious_rate`` is centred on home detection's estimate
        (``flow_cdr.attrs["spurious_rate"]``, from moves out and back).
        ``True``, ``"auto"`` (only where home detection gave the estimate) or
        ``False`` (default).
    reference_source
        Source whose dispersion ``phi`` is used for predictive draws of
        population flows (default: the first census-type source, else the
        first source).
    source_options
        ``source -> options`` of its observation model: ``kind`` (``"counts"``,
        ``"cdr"``, ``"estimates"``), ``likelihood``, ``undercount`` (a prior, or
        ``{class: prior}`` per report class in ``class_<source>``), ``duration``
        (a prior), ``dispersion`` (the source's own prior of its ``phi``, node
        ``phi_<source>``: what is known of a report's precision).
    priors
        Overrides keyed by node name: the latent's (``intercept``, ``beta``,
        ``cross_border``, ``sigma_country``, ...) and the observation models'
        (``phi``, ``market_share_level``, ``market_share_country``,
        ``market_share_slope``, ``sigma_market_share``, ``period_scale``,
        ``period_effect``, ``undercount_<source>``, ...).
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
        "market_share_origin_terms": None,
        "market_share_spatial": False,
        "spurious_relocations": False,
        "reference_source": None,
        "source_options": {},
    }

    def __init__(
        self,
        *,
        latent: Any = None,
        sources: Sequence[str] = ("census", "cdr"),
        market_share_covariate: str | None = "cdr_subscribers_per_resident",
        market_share_default: float = 0.3,
        market_share_origin_terms: Sequence[str] | str | None = None,
        market_share_spatial: bool = False,
        spurious_relocations: bool | str = False,
        reference_source: str | None = None,
        source_options: Mapping[str, Mapping[str, Any]] | None = None,
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
            market_share_origin_terms=(
                market_share_origin_terms
                if market_share_origin_terms is None or isinstance(market_share_origin_terms, str)
                else [str(t) for t in market_share_origin_terms]
            ),
            market_share_spatial=market_share_spatial,
            spurious_relocations=spurious_relocations,
            reference_source=reference_source,
            source_options={str(k): dict(v) for k, v in (source_options or {}).items()},
        )

    # ------------------------------------------------------------------ config
    def _validate_config(self) -> None:
        latent = self.latent
        if isinstance(latent, FusionModel):
            raise ModelConfigError(
                "FusionModel: the latent model cannot be a FusionModel. "
                "Fix: use a GravityModel or RadiationModel as latent"
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
        unknown = sorted(set(self.model_config["source_options"]) - set(sources))
        if unknown:
            raise ModelConfigError(
                f"FusionModel: source_options names {unknown}, which are not in sources="
                f"{sources}. Fix: add them to sources or drop their options"
            )
        # the observation models check their options (e.g. market_share_default) now
        for source in sources:
            observation_for(source, None, self._options(source))

    def _latent_field(self) -> LatentField:
        return self.latent.field

    def _dispersion_by_source(self) -> bool:
        return True

    def _user_priors(self) -> dict[str, Any]:
        return {**self.latent.priors, **self.priors}

    @property
    def sources(self) -> list[str]:
        """The listed sources, in order."""
        return list(self.model_config["sources"])

    @property
    def reference_source(self) -> str:
        """Source whose ``phi`` gives the predictive dispersion of population flows."""
        ref = self.model_config["reference_source"]
        if ref is not None:
            return ref
        census = [s for s in self.sources if source_kind(s) == CENSUS_KIND]
        return census[0] if census else self.sources[0]

    def _reference(self, observations: Sequence[ObservationModel]) -> str:
        ref = self.model_config["reference_source"]
        if ref is not None:
            return ref
        return super()._reference(observations)

    def _options(self, source: str) -> dict[str, Any]:
        options = dict(self.model_config["source_options"].get(source, {}))
        kind = options.get("kind") or (CDR_KIND if source_kind(source) == CDR_KIND else None)
        if kind == CDR_KIND:
            options.setdefault(
                "market_share_covariate", self.model_config["market_share_covariate"]
            )
            options.setdefault("market_share_default", self.model_config["market_share_default"])
            options.setdefault("market_share_origin_terms", self._market_share_origin_terms())
            options.setdefault("market_share_spatial", self.model_config["market_share_spatial"])
            options.setdefault("spurious_relocations", self.model_config["spurious_relocations"])
        return options

    def _market_share_origin_terms(self) -> list[str]:
        """Origin terms the market share may go with: ``"latent"`` = the latent's origin covariates."""
        terms = self.model_config["market_share_origin_terms"]
        if terms == "latent":
            return [str(t) for t in self.latent.model_config.get("origin_covariates") or []]
        if isinstance(terms, str):
            raise ModelConfigError(
                f"FusionModel: market_share_origin_terms={terms!r} is not valid. "
                "Fix: 'latent' (the latent model's origin covariates), a list of unit "
                "variables, or None"
            )
        return list(terms or [])

    def _observation_models(self, data: xr.Dataset) -> list[ObservationModel]:
        sources = self.sources + [s for s in estimate_sources(data) if s not in self.sources]
        check_sources_exist(data, sources)
        return [observation_for(s, data, self._options(s)) for s in sources]

    def _summary_vars(self) -> list[str]:
        names = [*self.field.summary_vars(), "phi", "sigma_market_share", "period_scale"]
        names += ["market_share_level", "market_share_slope", "market_share_origin_slope"]
        names += ["market_share_spatial_fraction"]
        return list(dict.fromkeys([*names, "period_effect", "spurious_rate"]))

    @override
    def _approximation_caveats(self) -> list[str]:
        cdr = [
            s
            for s in self.fit_meta.get("sources", [])
            if (self.model_config["source_options"].get(s, {}).get("kind") or source_kind(s))
            == CDR_KIND
        ]
        if not cdr:
            return []
        hyper = [
            CDRObservation(s).node(name)
            for s in cdr
            for name in ("sigma_market_share", "period_scale")
        ]
        attrs = self._idata["posterior"].attrs if self._idata is not None else {}
        integrated = {n.strip() for n in str(attrs.get("laplace_integrated", "")).split(",")}
        if self.fit_meta.get("backend") == "laplace" and set(hyper) <= integrated:
            return [
                f"the per-unit market shares ({', '.join(cdr)}) come from a Laplace "
                f"approximation integrated over {', '.join(hyper)}, which puts those where "
                "NUTS does; given them each share is still Gaussian on the log scale (simulated "
                "worlds: 97-100% of the true shares inside their 90% intervals and "
                "correlation 0.91-0.93 with the truth, as NUTS; docs/fusion.md). Check them "
                "against NUTS (backend='nutpie') before publishing"
            ]
        fix = f"integrate = {hyper!r}" if len(hyper) <= LAPLACE_INTEGRATE_MAX else None
        return [
            f"the per-unit market shares ({', '.join(cdr)}) are the least reliable part: the "
            "data pin only the product of the shares' level and period_scale, and at the joint "
            "mode of that ridge sigma_market_share is inflated (simulated worlds: about 0.9 "
            "against NUTS's 0.11-0.16; the units' shares relative to each other correlate "
            "0.79-0.90 with the truth against NUTS's 0.91-0.93; docs/fusion.md). The flows, "
            "which depend on the product, agree with NUTS. Fix: "
            + (
                f"Laplace with {fix} ([model.sample_kwargs] of the config, or a keyword of "
                "fit: correlation 0.91-0.93, 2-4x the time), or NUTS (backend='nutpie')"
                if fix and self.fit_meta.get("backend") == "laplace"
                else "fit with NUTS (backend='nutpie')"
                + (f", or Laplace with {fix}" if fix else "")
            )
            + " before using the shares"
        ]

    def market_share_summary(self, *, ci_prob: float = 0.94, source: str = "cdr") -> pd.DataFrame:
        """Posterior of the market share of each CDR origin unit.

        The data pin the product of the shares' level and ``period_scale``; the
        split is the priors': the shares' *level* (``market_share_level``) keeps its
        prior's spread, and the fit lists it as not informed, while the units' shares
        relative to each other are measured (simulated worlds: correlation with the
        truth 0.89-0.95, 81-100% of units inside their 90% intervals; docs/fusion.md,
        "The shares' level on the dense worlds"). State the operator's share
        (``market_share_default``) or the CDR window (the ``period_scale`` prior) where
        you know them. The flows depend on the product and are not affected.

        Returns
        -------
        pandas.DataFrame
            Indexed by unit id: ``mean``, ``sd``, ``eti_lo``, ``eti_hi``
            (equal-tailed ``ci_prob`` interval).
        """
        obs = CDRObservation(
            source, **{k: v for k, v in self._options(source).items() if k != "kind"}
        )
        return obs.market_share_summary(self.posterior, ci_prob=ci_prob)
