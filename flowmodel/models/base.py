"""The :class:`FlowModel` base: one latent field + observation models + one inference engine.

A flow model is composed, not inherited: a latent field
(:mod:`flowmodel.models.latent`: gravity or radiation) gives the log expected flow
of every latent pair; one observation model per source
(:mod:`flowmodel.models.observations`) says how that source sees sums of it; the
engine (:mod:`flowmodel.models.inference`) runs the chosen backend. The public
presets :class:`~flowmodel.models.gravity.GravityModel`,
:class:`~flowmodel.models.radiation.RadiationModel` and
:class:`~flowmodel.models.fusion.FusionModel` only choose the parts from their
keyword arguments (:meth:`FlowModel._latent_field`,
:meth:`FlowModel._observation_models`).

Fit-derived state (term means and sds, countries, units, cell counts) is computed
once by :meth:`FlowModel.fit`, kept in :attr:`FlowModel.fit_meta`, written to the
posterior file's attributes and read back by :meth:`FlowModel.load`;
:meth:`FlowModel.build_model` has no side effects, so drawing from the prior after a
fit leaves predictions unchanged.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt
import xarray as xr

from flowmodel._version import __version__
from flowmodel.dataset import dataset_fingerprint, flow_sources
from flowmodel.exceptions import (
    DiagnosticsWarning,
    FitFailedError,
    ModelConfigError,
    ModelLoadError,
    UninformedParameterWarning,
)
from flowmodel.models.inference import (
    APPROXIMATE_BACKENDS,
    BACKENDS,
    MCMC_BACKENDS,
    auto_backend,
    diagnostics_messages,
    prior_draws,
    require_backend,
    run_inference,
    stack_samples,
    thin_posterior,
    warn_diagnostics,
)
from flowmodel.models.latent import Features, LatentField, LatentPairs
from flowmodel.models.likelihoods import censored_bounds, interval_logcdf
from flowmodel.models.observations import (
    Build,
    Cells,
    ConstrainedFlows,
    ExpectedFlows,
    ObservationModel,
    ObservedPairs,
    PriorFactory,
    cell_period_labels,
    read_cells,
    window_cells,
    window_of,
)
from flowmodel.models.priors import DEFAULT_PRIORS, PriorSpec, resolve_priors

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "LOG_LIKELIHOOD_MAX_VALUES",
    "LOO_MAX_CELLS",
    "LOO_MAX_DRAWS",
    "UNINFORMED_RATIO",
    "Cells",
    "FlowModel",
    "ObservedPairs",
    "censored_bounds",
    "compare",
    "interval_logcdf",
    "load_model",
    "read_cells",
    "stack_samples",
    "thin_posterior",
]

#: Largest draws x cells for which :meth:`FlowModel.fit` stores the pointwise
#: log-likelihood (float32, about 20 MB); above it the file holds the LOO results
#: (``elpd_i``, ``pareto_k`` per cell) instead.
LOG_LIKELIHOOD_MAX_VALUES = 5_000_000
#: Draws (all chains) the per-cell PSIS-LOO uses when the log-likelihood is too large to keep
LOO_MAX_DRAWS = 1_000
#: Above this many cells (and the size limit) ``fit`` stores no pointwise LOO: ArviZ's PSIS
#: costs ~1-2 ms a cell in Python whatever the draws (36 s at 22,350 cells)
LOO_MAX_CELLS = 50_000
#: A parameter whose posterior sd exceeds this share of its prior sd is "not informed".
UNINFORMED_RATIO = 0.9
#: Parameters checked for being informed (other nodes are hierarchical offsets).
_CHECKED_NODES = (
    "intercept",
    "beta",
    "sigma_country",
    "tau",
    "radiation_exponent",
    "period_scale",
    "sigma_market_share",
    "market_share_level",
    "market_share_spatial_fraction",
)
#: What to state when a parameter is not informed, beyond the general fix.
_UNINFORMED_HINTS = {
    "market_share_level": "the CDR shares' level, which the data pin only as a product with "
    "period_scale: state the operator's market share times the detection rate "
    "(market_share_default) or the CDR window against the census's (the period_scale prior); "
    "the shares relative to each other and the flows do not depend on it",
}

_MODEL_REGISTRY: dict[str, type[FlowModel]] = {}


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    return repr(obj)


def config_hash(config: Mapping[str, Any]) -> str:
    """Return a short SHA-256 of a model config (its canonical JSON)."""
    text = json.dumps(config, sort_keys=True, default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class FlowModel(abc.ABC):
    """Abstract base of every flow model (see the module docstring).

    Parameters
    ----------
    priors
        ``node name -> prior`` overrides (see :mod:`flowmodel.models.priors`). User
        priors win over data-derived ones, which win over defaults; a key naming
        no parameter warns.
    sampler_config
        Defaults of :meth:`fit` keyword arguments (``draws``, ``tune``,
        ``chains``, ``target_accept``, ...), merged over
        :attr:`default_sampler_config`.
    **model_config
        Keyword-only structural options of the preset, merged over
        :attr:`default_model_config` and stored in :attr:`model_config`.

    Notes
    -----
    The constructor never touches data and never samples. Fitting stores the
    :class:`xarray.DataTree` in :attr:`idata`.
    """

    #: Structural options and their defaults; presets extend it.
    default_model_config: ClassVar[dict[str, Any]] = {"source": None}
    #: Defaults of the sampler keyword arguments.
    default_sampler_config: ClassVar[dict[str, Any]] = {
        "draws": 1000,
        "tune": 1000,
        "chains": 4,
        "target_accept": 0.9,
    }

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _MODEL_REGISTRY[cls.__name__] = cls

    def __init__(
        self,
        *,
        priors: Mapping[str, PriorSpec] | None = None,
        sampler_config: Mapping[str, Any] | None = None,
        **model_config: Any,
    ) -> None:
        unknown = set(model_config) - set(self.default_model_config)
        if unknown:
            raise ModelConfigError(
                f"{type(self).__name__}: unknown option(s) {sorted(unknown)}; "
                f"valid options are {sorted(self.default_model_config)}"
            )
        self.model_config: dict[str, Any] = copy.deepcopy(self.default_model_config) | dict(
            model_config
        )
        self.priors: dict[str, PriorSpec] = dict(priors or {})
        self.sampler_config: dict[str, Any] = dict(self.default_sampler_config) | dict(
            sampler_config or {}
        )
        self._validate_config()
        self.field: LatentField = self._latent_field()
        self.model: pm.Model | None = None
        self._idata: xr.DataTree | None = None
        self.fit_meta: dict[str, Any] = {}

    def clone(self) -> FlowModel:
        """Return a fresh, unfitted model with the same configuration, priors and sampler."""
        return type(self)(
            priors=copy.deepcopy(self.priors),
            sampler_config=dict(self.sampler_config),
            **copy.deepcopy(self.model_config),
        )

    # ------------------------------------------------------------------ config
    def _validate_config(self) -> None:  # noqa: B027 - optional hook, nothing to check here
        """Check structural options (no data needed); raise ModelConfigError."""

    def _choice(self, key: str, allowed: Sequence[str]) -> None:
        value = self.model_config[key]
        if value not in allowed:
            raise ModelConfigError(
                f"{type(self).__name__}: {key}={value!r} is not valid; use one of {list(allowed)}"
            )

    # ------------------------------------------------------------------ composition
    @abc.abstractmethod
    def _latent_field(self) -> LatentField:
        """Return the latent field the preset's options describe (built once, in the constructor)."""

    @abc.abstractmethod
    def _observation_models(self, data: xr.Dataset) -> list[ObservationModel]:
        """One observation model per source the preset fits on ``data``."""

    def _dispersion_by_source(self) -> bool:
        """Whether ``phi`` has a ``source`` dim (else one scalar ``phi``)."""
        return False

    @staticmethod
    def _dispersion(
        factory: PriorFactory,
        observations: Sequence[ObservationModel],
        dispersed: Sequence[str],
        by_source: bool,
    ) -> Any:
        """Return ``phi``: one node (dims ``source`` when ``by_source``) or a stack.

        When a source has its own dispersion prior (``phi_<source>``), every source
        gets its own node (the others from the shared ``phi`` prior), stacked as ``phi``.
        """
        own = {
            o.source: node
            for o in observations
            if (node := getattr(o, "dispersion_node", None)) is not None
        }
        if not by_source or not own:
            return factory("phi", dims="source" if by_source else None)
        nodes = [
            factory(own[s]) if s in own else factory(f"phi_{s}", key="phi") for s in dispersed
        ]
        return pm.Deterministic("phi", pt.stack(nodes), dims="source")

    def _user_priors(self) -> dict[str, PriorSpec]:
        """Return the user's prior overrides (a fusion merges its latent preset's)."""
        return dict(self.priors)

    def _reference(self, observations: Sequence[ObservationModel]) -> str:
        """Source whose dispersion predicts population flows, and whose rate centres priors."""
        counts = [o for o in observations if o.uses_dispersion or o.kind in ("counts", "cdr")]
        plain = [o.source for o in counts if o.kind == "counts"]
        return (plain or [o.source for o in counts] or [observations[0].source])[0]

    def _source(self, data: xr.Dataset) -> str:
        """Return the flow source of a single-source preset (``source`` option or the only one)."""
        sources = flow_sources(data)
        source = self.model_config.get("source")
        if source is None:
            if len(sources) != 1:
                raise ModelConfigError(
                    f"{type(self).__name__}: the dataset has flow sources {sources}; "
                    "Fix: pass source=<name> to say which flow_<source> to fit"
                )
            return sources[0]
        if source not in sources:
            raise ModelConfigError(
                f"{type(self).__name__}: no variable 'flow_{source}' in the dataset "
                f"(flow sources: {sources}). Fix: pass one of those as source="
            )
        return source

    # ------------------------------------------------------------------ build
    def _build(
        self,
        data: xr.Dataset,
        *,
        approximate: bool = False,
        noncentered: bool | None = None,
    ) -> tuple[pm.Model, dict[str, Any], dict[str, Any]]:
        """Build the PyMC model of ``data``: (model, fit state, resolved priors); no side effects.

        ``approximate``: the fit is a Laplace / ADVI / MAP one (parametrisations
        left to ``"auto"`` take their form for it). ``noncentered``: the form of
        country effects left to ``"auto"`` (None: centred for NUTS, non-centred for
        the approximations).
        """
        observations = self._observation_models(data)
        temporal = self.field.temporal is not None
        if temporal:
            data = _observed_periods(data, observations)
        cells = {o.source: o.cells(data) for o in observations}
        empty = [s for s, c in cells.items() if c.n == 0]
        if empty:
            raise ModelConfigError(
                f"{type(self).__name__}: source(s) {empty} have no observed or censored "
                "off-diagonal cell. Fix: drop them from the sources or check the flow tables"
            )
        n_units = int(data.sizes["unit"])
        periods = None
        if temporal:
            periods = self._latent_periods(data, cells)
            windowed = {s: window_cells(data, c, periods) for s, c in cells.items()}
            split = [
                o.source
                for o in observations
                if o.kind == "cdr"
                and windowed[o.source].aggregated
                and not cells[o.source].aggregated
            ]
            if split:
                raise ModelConfigError(
                    f"{type(self).__name__}: a period of CDR source(s) {split} spans several "
                    "latent periods (its market share and period effect apply per cell). "
                    "Fix: choose latent periods (temporal={'periods': [...]}) that contain "
                    "each CDR period"
                )
            cells = windowed
            n_t = len(periods)
            rows = [
                o.latent_rows(data, cells[o.source], lambda c: window_of(data, c, periods))
                for o in observations
            ]
            keys = np.unique(np.concatenate([(oi * n_units + dj) * n_t + t for oi, dj, t in rows]))
            pair = keys // n_t
            union = LatentPairs(
                (pair // n_units).astype(np.int64),
                (pair % n_units).astype(np.int64),
                period_idx=(keys % n_t).astype(np.int64),
                periods=[p.label for p in periods],
            )
        else:
            needed = [o.latent_pairs(data, cells[o.source]) for o in observations]
            keys = np.unique(np.concatenate([oi * n_units + dj for oi, dj in needed]))
            union = LatentPairs(
                (keys // n_units).astype(np.int64), (keys % n_units).astype(np.int64)
            )
        dispersed = [o.source for o in observations if o.uses_dispersion]
        known = self.field.nodes(data) + (["phi"] if dispersed else [])
        defaults: dict[str, Any] = dict(DEFAULT_PRIORS) | self.field.default_priors()
        for o in observations:
            known += [n for n in o.nodes(data) if n not in known]
            defaults.update(o.default_priors())
        reference = self._reference(observations)
        data_derived: dict[str, Any] = {}
        for o in observations:
            data_derived.update(o.data_priors(data))
        data_derived.update(self.field.data_priors(data, cells[reference]))
        priors = resolve_priors(
            known,
            data_derived=data_derived,
            user=self._user_priors(),
            defaults=defaults,
        )
        latent_state = self.field.fit_state(data, union)
        if latent_state.get("prior_countries"):
            # the unfitted countries' levels are drawn from this prior when predicting
            spec = priors.get("sigma_country")
            latent_state["sigma_country_prior"] = dict(spec) if isinstance(spec, Mapping) else None
        if latent_state.get("noncentered") == "auto":
            latent_state["noncentered"] = bool(approximate) if noncentered is None else noncentered
        by_source = self._dispersion_by_source()
        coords: dict[str, Any] = {"pair": np.arange(union.n)}
        if by_source and dispersed:
            coords["source"] = dispersed
        with pm.Model(coords=coords) as model:
            factory = PriorFactory(priors)
            term = self.field.add(data, union, latent_state, factory)
            phi = None
            if dispersed:
                phi = self._dispersion(factory, observations, dispersed, by_source)
            build = Build(
                data,
                term,
                union.origin_idx,
                union.dest_idx,
                factory,
                union_period=union.period_idx,
                periods=periods,
            )
            for o in observations:
                if phi is not None and o.uses_dispersion:
                    build.phi = phi[dispersed.index(o.source)] if by_source else phi
                else:
                    build.phi = None
                o.add(build, cells[o.source])
        state = {
            "sources": [o.source for o in observations],
            "kinds": {o.source: o.kind for o in observations},
            "source_options": {o.source: o.options for o in observations},
            "reference_source": reference,
            "n_pairs": int(union.n),
            "n_cells": {s: int(c.n) for s, c in cells.items()},
            "n_censored": {s: int(c.censored.sum()) for s, c in cells.items()},
            "observations": {o.source: o.state(data, cells[o.source]) for o in observations},
            "latent": latent_state,
        }
        if len(observations) == 1:
            state["source"] = observations[0].source
        return model, state, priors

    # ------------------------------------------------------------------ periods
    def _latent_periods(self, data: xr.Dataset, cells: Mapping[str, Cells]) -> list[Any]:
        """Latent periods of a field with periods: asked for, or from the observed windows."""
        from flowmodel.periods import latent_periods

        labels = []
        for source, c in cells.items():
            lab = cell_period_labels(data, c)
            if lab is None:
                raise ModelConfigError(
                    f"{type(self).__name__}: a model with periods needs the window each source "
                    f"observes, and '{source}' has none. Fix: give its flow table a 'period' "
                    f"column, or a run config [flows.{source}] period = '2005-2010'"
                )
            labels += np.unique(lab).tolist()
        return latent_periods(labels, (self.field.temporal or {}).get("periods"))

    @property
    def periods(self) -> list[str]:
        """Latent period labels of the fit, in time order ([] for a model without periods)."""
        return list(self.fit_meta.get("latent", {}).get("periods") or [])

    def _fitted_periods(self) -> list[Any]:
        from flowmodel.periods import parse_period

        return [parse_period(p) for p in self.periods]

    def _windowed(self, data: xr.Dataset, cells: Cells) -> Cells:
        """``cells`` over latent (pair, period) rows in a model with periods, else as they are."""
        if self.field.temporal is None:
            return cells
        return window_cells(data, cells, self._fitted_periods())

    def target_period(self, period: str | None = None) -> str | None:
        """Return the period a prediction describes: ``period``, else the latest latent one.

        Raises
        ------
        ModelConfigError
            When ``period`` is given to a model without periods, or is not a period label.
        """
        from flowmodel.periods import parse_period

        if self.field.temporal is None:
            if period is not None:
                raise ModelConfigError(
                    f"{type(self).__name__} has no periods, so it cannot predict period "
                    f"{period!r}: its flows are those of the window it was fitted to. Fix: fit "
                    "a model with periods (GravityModel(temporal={...}), or [model.options."
                    "temporal] in a run config), or drop the period"
                )
            return None
        if period is None:
            return self.periods[-1]
        return parse_period(period).label

    def _cell_log_rate(
        self, posterior: xr.Dataset, data: xr.Dataset, state: Mapping[str, Any], rng: Any
    ) -> Any:
        """``log_rate(origin_idx, dest_idx[, latent_period])`` of cells, from posterior draws."""
        latent = state["latent"]
        params = self.field.prediction_params(posterior, data, latent, rng=rng)
        if self.field.temporal is None:
            feats = self._features(data)

            def log_rate(oi: np.ndarray, dj: np.ndarray, t: Any = None) -> np.ndarray:
                return self.field.log_rate(
                    params, feats, oi, dj, self.field.pair_values(data, oi, dj, latent)
                )

            return log_rate
        feats_t = self.field.features_at(data, list(latent["times"]))

        def log_rate_t(oi: np.ndarray, dj: np.ndarray, t: Any = None) -> np.ndarray:
            return self.field.log_rate(
                params,
                feats_t,
                oi,
                dj,
                self.field.pair_values(data, oi, dj, latent),
                period_idx=t,
            )

        return log_rate_t

    def build_model(self, data: xr.Dataset) -> pm.Model:
        """Build the PyMC model of ``data`` (no side effects on the model object).

        Parameters
        ----------
        data
            A FlowDataset (see ``docs/architecture.md``).

        Returns
        -------
        pymc.Model
            Coordinates ``pair`` (the latent pairs any source needs), ``term``,
            ``country``, ``source`` (per-source dispersion), ... Each source adds
            the Potentials ``y_<source>`` (exact cells) and ``y_<source>_censored``.
        """
        return self._build(data)[0]

    def resolved_priors(self, data: xr.Dataset) -> dict[str, PriorSpec]:
        """Return the priors a fit to ``data`` uses: user > data-derived > default, per node."""
        return self._build(data)[2]

    # ------------------------------------------------------------------ fit
    def fit(
        self,
        data: xr.Dataset,
        *,
        backend: str = "auto",
        random_seed: int | None = None,
        progressbar: bool | None = None,
        **sample_kwargs: Any,
    ) -> xr.DataTree:
        """Fit the model to ``data``; store and return the posterior DataTree.

        Parameters
        ----------
        data
            A FlowDataset holding every source the model fits.
        backend
            ``"pymc"`` / ``"nutpie"`` / ``"numpyro"`` (NUTS), ``"laplace"``
            (Gaussian at the mode in the unconstrained space; ``engine="pymc-extras"``
            for :func:`pymc_extras.fit_laplace`), ``"advi"`` (mean-field ADVI started
            at the MAP; ``n=`` iterations), ``"map"`` (one "draw" at the mode) or
            ``"auto"`` (see :func:`flowmodel.models.inference.auto_backend`).
            Laplace, ADVI and MAP are approximations and labelled so.
        random_seed
            Seed of every random draw.
        progressbar
            Show the sampler's progress bar; default: when the terminal or notebook
            is interactive.
        **sample_kwargs
            Passed to the backend (``draws``, ``tune``, ``chains``, ...) over
            :attr:`sampler_config`.

        Returns
        -------
        xarray.DataTree
            ``posterior`` (dims ``chain``, ``draw``), ``prior`` (500 prior draws of
            every parameter), ``sample_stats`` for NUTS, the pointwise
            ``log_likelihood`` (float32, dim ``cell`` with ``source``, ``origin``,
            ``destination`` coordinates) or, above :data:`LOG_LIKELIHOOD_MAX_VALUES`,
            the ``loo`` results; attrs recording model, config, fit state and data.

        Raises
        ------
        BackendNotAvailableError
            When the backend's package is not installed.
        FitFailedError
            When the fit produced no usable posterior (non-finite draws; for
            Laplace no proper mode).
        """
        require_backend(backend)
        if backend == "auto":
            all_cells = [o.cells(data) for o in self._observation_models(data)]
            backend = auto_backend(
                sum(c.n for c in all_cells),
                censored=any(bool(np.any(c.censored)) for c in all_cells),
            )
            require_backend(backend)
        model, state, priors = self._build(data, approximate=backend in APPROXIMATE_BACKENDS)
        kwargs = self.sampler_config | sample_kwargs
        if progressbar is None:
            progressbar = _interactive()
        try:
            idata = run_inference(
                model, backend, kwargs, random_seed=random_seed, progressbar=bool(progressbar)
            )
        except FitFailedError as first:
            # Laplace with country effects left to "auto": the non-centred form suits
            # countries with few cells, the centred one data-rich countries (where one
            # form has no proper mode, e.g. country offsets with too few cells to
            # leave sigma_country off zero, the other may); try it before giving up
            if not (
                backend == "laplace"
                and self.field.config.get("noncentered") == "auto"
                and state["latent"].get("countries")
            ):
                raise
            other = not state["latent"]["noncentered"]
            form = "non-centred" if other else "centred"
            logger.info("Laplace failed (%s); trying %s country effects", first, form)
            model, state, priors = self._build(data, approximate=True, noncentered=other)
            try:
                idata = run_inference(
                    model, backend, kwargs, random_seed=random_seed, progressbar=bool(progressbar)
                )
            except FitFailedError as second:
                raise FitFailedError(
                    f"{second} (with {form} country effects; with the other form: {first})"
                ) from second
        idata["prior"] = xr.DataTree(prior_draws(model, random_seed=random_seed))
        self.model = model
        self.fit_meta = state | {
            "backend": backend,
            "random_seed": random_seed,
            "approximate": backend in APPROXIMATE_BACKENDS,
            "priors": json.loads(json.dumps(priors, default=_json_default)),
        }
        self._idata = idata
        self._store_log_likelihood(data)
        msgs: list[str] = []
        if backend in MCMC_BACKENDS:
            msgs = diagnostics_messages(idata, self._summary_vars())
            warn_diagnostics(type(self).__name__, msgs)
        self.fit_meta["diagnostics"] = msgs
        if backend in APPROXIMATE_BACKENDS:
            caveats = self._approximation_caveats()
            self.fit_meta["approximation_caveats"] = caveats
            if caveats:
                warnings.warn(
                    f"{type(self).__name__} {backend} fit: " + "; ".join(caveats),
                    DiagnosticsWarning,
                    stacklevel=2,
                )
        self.fit_meta["uninformed"] = self._check_informed() + self._prior_countries()
        self._finalise_idata(idata, data)
        return idata

    def _store_log_likelihood(self, data: xr.Dataset) -> None:
        """Store the pointwise log-likelihood (float32), or its LOO summary when too large."""
        idata = self._idata
        post = idata["posterior"]
        n_samples = post.sizes.get("chain", 1) * post.sizes.get("draw", 1)
        n_cells = sum(self.fit_meta.get("n_cells", {}).values())
        if n_samples < 2:
            return
        keep = n_samples * n_cells <= LOG_LIKELIHOOD_MAX_VALUES
        if not keep and n_cells > LOO_MAX_CELLS:
            # ArviZ's PSIS runs per cell in Python (~1-2 ms a cell): 600,000 cells would
            # add 10-20 minutes to every fit; the user computes it when wanted
            self.fit_meta["loo"] = (
                f"not computed: {n_cells:,} cells > LOO_MAX_CELLS ({LOO_MAX_CELLS:,}); "
                "compute it with flowmodel.models.base.pointwise_loo(model.log_likelihood("
                "data, draws=250))"
            )
            logger.info("pointwise LOO %s", self.fit_meta["loo"])
            return
        # too large to keep: PSIS-LOO per cell from at most LOO_MAX_DRAWS evenly thinned
        # draws (at 150 units x 4,000 draws the full computation took 36 s of a 39 s fit)
        n_chains = int(post.sizes.get("chain", 1))
        per_chain = None if keep else max(2, LOO_MAX_DRAWS // n_chains)
        try:
            tree = self.log_likelihood(data, draws=per_chain)
        except (NotImplementedError, ModelConfigError):
            return
        if keep:
            idata["log_likelihood"] = tree["log_likelihood"]
            idata["observed_data"] = tree["observed_data"]
            return
        loo = pointwise_loo(tree)
        if loo is not None:
            used = int(tree["posterior"].sizes["chain"] * tree["posterior"].sizes["draw"])
            loo.attrs["note"] += f" (from {used} of the {n_samples} draws, evenly thinned)"
            idata["loo"] = xr.DataTree(loo)

    def _approximation_caveats(self) -> list[str]:
        """Return what an approximate fit (Laplace, ADVI, MAP) of this model gets wrong."""
        return []

    def _check_informed(self) -> list[dict[str, Any]]:
        """Warn for every parameter whose posterior sd is above :data:`UNINFORMED_RATIO` of its prior's."""
        idata = self._idata
        if "prior" not in idata.children:
            return []
        post = idata["posterior"].to_dataset()
        prior = idata["prior"].to_dataset()
        if post.sizes.get("chain", 1) * post.sizes.get("draw", 1) < 20:
            return []
        out = []
        for name in _CHECKED_NODES:
            if name not in post or name not in prior:
                continue
            p_sd = _element_sd(post[name])
            q_sd = _element_sd(prior[name])
            for label, ps in p_sd.items():
                qs = q_sd.get(label)
                if qs is None or not np.isfinite(qs) or qs <= 0:
                    continue
                if ps > UNINFORMED_RATIO * qs:
                    entry = {"parameter": label, "posterior_sd": ps, "prior_sd": qs}
                    if name in _UNINFORMED_HINTS:
                        entry["fix"] = f"Fix for {name}, {_UNINFORMED_HINTS[name]}"
                    out.append(entry)
        if out:
            names = ", ".join(o["parameter"] for o in out)
            fixes = list(dict.fromkeys(o["fix"] for o in out if "fix" in o))
            if any("fix" not in o for o in out):
                fixes.insert(
                    0,
                    "Fix: add a source that observes them (e.g. cross-border cells, country-pair "
                    "estimates) or state an informative prior",
                )
            warnings.warn(
                f"{type(self).__name__}: {names} "
                f"{'is' if len(out) == 1 else 'are'} not informed by the data (posterior sd "
                f"above {UNINFORMED_RATIO:.0%} of the prior's): "
                f"{'its' if len(out) == 1 else 'their'} intervals are the prior's, and so are "
                "those of every prediction that depends on them. " + ". ".join(fixes),
                UninformedParameterWarning,
                stacklevel=3,
            )
        return out

    def _prior_countries(self) -> list[dict[str, Any]]:
        """Warn when countries without observed flows get their level from the prior alone.

        With flows observed in one country only, no spread of country levels can be
        learnt: each other country's effect is drawn from the prior of
        ``sigma_country`` when predicting, so its flows' intervals are the prior's.
        """
        latent = self.fit_meta.get("latent") or {}
        unseen = list(latent.get("prior_countries") or [])
        if not unseen:
            return []
        from flowmodel.models.priors import DEFAULT_PRIORS, draw_prior

        spec = latent.get("sigma_country_prior") or DEFAULT_PRIORS["sigma_country"]
        sigma = np.asarray(draw_prior(spec, 4000, np.random.default_rng(0)), dtype=float)
        prior_sd = float(np.sqrt(np.mean(sigma**2)))  # sd of N(0, sigma) over the prior
        shown = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "dist")
        fitted = ", ".join(latent.get("fitted_countries") or []) or "one country"
        entry = {
            "parameter": f"country_effect[{', '.join(unseen)}]",
            "posterior_sd": prior_sd,
            "prior_sd": prior_sd,
            "fix": (
                f"Fix for the level of {', '.join(unseen)}, add a source that counts moves "
                "within or out of them (a census; a national total or country-pair estimates "
                "as [marginals] of a fusion model) or state the spread of levels you expect "
                "(priors={'sigma_country': ...})"
            ),
        }
        warnings.warn(
            f"{type(self).__name__}: flows are observed in {fitted} only, so the levels of "
            f"{', '.join(unseen)} cannot be learnt: predictions there draw a country effect "
            f"from the prior (sigma_country ~ {spec['dist']}({shown}); sd of the effect "
            f"{prior_sd:.2f} on the log scale) and their intervals are the prior's. "
            + entry["fix"],
            UninformedParameterWarning,
            stacklevel=3,
        )
        return [entry]

    def _finalise_idata(self, idata: xr.DataTree, data: xr.Dataset) -> None:
        attrs = {
            "flowmodel_model_class": type(self).__name__,
            "flowmodel_version": __version__,
            "flowmodel_model_config": json.dumps(
                self.model_config, sort_keys=True, default=_json_default
            ),
            "flowmodel_config_hash": config_hash(self.model_config),
            "flowmodel_priors": json.dumps(self.priors, sort_keys=True, default=_json_default),
            "flowmodel_sampler_config": json.dumps(
                self.sampler_config, sort_keys=True, default=_json_default
            ),
            "flowmodel_data_fingerprint": dataset_fingerprint(data),
            "flowmodel_fit_meta": json.dumps(self.fit_meta, sort_keys=True, default=_json_default),
        }
        idata.attrs.update(attrs)
        post = idata["posterior"]
        post.attrs.update(
            flowmodel_backend=self.fit_meta.get("backend", ""),
            approximate=int(bool(self.fit_meta.get("approximate"))),
        )

    @property
    def idata(self) -> xr.DataTree:
        """The posterior DataTree of the last :meth:`fit` (or :meth:`load`)."""
        if self._idata is None:
            raise RuntimeError(f"{type(self).__name__} has no posterior yet; call .fit() first")
        return self._idata

    @idata.setter
    def idata(self, value: xr.DataTree) -> None:
        self._idata = value

    @property
    def posterior(self) -> xr.Dataset:
        """The ``posterior`` group as an :class:`xarray.Dataset` (chain, draw, ...)."""
        return self.idata["posterior"].to_dataset()

    # ------------------------------------------------------------------ summaries
    def _summary_vars(self) -> list[str]:
        names = [*self.field.summary_vars(), "phi"]
        return list(dict.fromkeys(names))

    def summary(self, *, ci_prob: float = 0.94) -> pd.DataFrame:
        """Posterior summary (:func:`arviz.summary`) with raw-scale coefficients.

        Parameters
        ----------
        ci_prob
            Probability of the equal-tailed credible interval (columns
            ``eti_lo``/``eti_hi``).

        Returns
        -------
        pandas.DataFrame
            One row per scalar parameter (``beta[origin:log_population]``, ...,
            ``beta_raw[...]``/``intercept_raw`` on the raw covariate scale) with
            ``mean``, ``sd``, ``eti_lo``, ``eti_hi``, ``ess_bulk``, ``ess_tail``,
            ``r_hat`` (NaN for approximate backends: Laplace, ADVI and MAP draws
            are independent, so R-hat and ESS would look like converged MCMC);
            ``attrs``: ``divergences``, ``ci_prob``, ``backend``, ``approximate``.
        """
        import arviz as az

        post = self.posterior
        names = [
            v
            for v in [*self._summary_vars(), "intercept_raw", "beta_raw", "country_effect"]
            if v in post
        ]
        approximate = bool(self.fit_meta.get("approximate"))
        n = post.sizes.get("chain", 1) * post.sizes.get("draw", 1)
        tree = xr.DataTree.from_dict({"posterior": post[names]})
        kind = "stats" if (approximate or n < 4) else "all"
        table = az.summary(
            tree, var_names=names, ci_prob=ci_prob, ci_kind="eti", kind=kind, round_to="none"
        )
        table = pd.DataFrame(table)
        lo = next(c for c in table.columns if str(c).endswith("_lb"))
        hi = next(c for c in table.columns if str(c).endswith("_ub"))
        table = table.rename(columns={lo: "eti_lo", hi: "eti_hi"})
        for col in ("ess_bulk", "ess_tail", "r_hat"):
            if col not in table.columns:
                table[col] = np.nan
        out = table[["mean", "sd", "eti_lo", "eti_hi", "ess_bulk", "ess_tail", "r_hat"]].astype(
            float
        )
        div = 0
        if "sample_stats" in self.idata.children and "diverging" in self.idata["sample_stats"]:
            div = int(self.idata["sample_stats"]["diverging"].values.sum())
        out.attrs.update(
            divergences=div,
            ci_prob=ci_prob,
            backend=self.fit_meta.get("backend"),
            approximate=approximate,
        )
        return out

    # ------------------------------------------------------------------ prediction hooks
    def _state(self) -> dict[str, Any]:
        """Return the fitted latent state (raises before a fit)."""
        state = self.fit_meta.get("latent")
        if state is None:
            raise RuntimeError(f"{type(self).__name__} has no fitted state; call .fit() first")
        return state

    def _prediction_params(
        self,
        posterior: xr.Dataset,
        data: xr.Dataset,
        *,
        rng: np.random.Generator,
        period: str | None = None,
    ) -> dict[str, Any]:
        """Posterior draws as numpy arrays with a leading ``sample`` axis (see the latent fields).

        A model with periods predicts the moves over the window of ``period``
        (default: the latest latent period): the rate per year there times the
        window's years.
        """
        label = self.target_period(period)
        if label is None:
            params = self.field.prediction_params(posterior, data, self._state(), rng=rng)
        else:
            from flowmodel.periods import parse_period

            params = self.field.prediction_params(
                posterior, data, self._state(), rng=rng, periods=[label]
            )
            params["log_offset"] = np.log(parse_period(label).length)
            params["period"] = label
        params["phi"] = None
        if "phi" in posterior:
            phi = posterior["phi"]
            if "source" in phi.dims:
                ref = self.fit_meta.get("reference_source")
                sources = list(phi["source"].values.astype(str))
                phi = phi.sel(source=ref if ref in sources else sources[0])
            params["phi"] = stack_samples(phi)
        return params

    def _features(self, data: xr.Dataset, period: str | None = None) -> Features:
        label = self.target_period(period) if self.fit_meta else None
        if label is None:
            return self.field.features(data)
        from flowmodel.periods import parse_period

        return self.field.features_at(data, [parse_period(label).midpoint])

    def _source_log_factor(self, posterior: xr.Dataset, source: str) -> np.ndarray | float:
        """``(sample,)`` log of the one-factor undercount and duration of ``source`` (0 if none)."""
        out: Any = 0.0
        for name in (f"duration_{source}", f"undercount_{source}"):
            if name in posterior and posterior[name].ndim == 2:
                out = out + np.log(stack_samples(posterior[name]))
        return out

    def _pair_values(
        self, data: xr.Dataset, origin_idx: np.ndarray, dest_idx: np.ndarray
    ) -> dict[str, np.ndarray]:
        return self.field.pair_values(data, origin_idx, dest_idx, self.fit_meta.get("latent"))

    def _pair_block(self, data: xr.Dataset, start: int, stop: int) -> dict[str, np.ndarray]:
        return self.field.pair_block(data, start, stop, self.fit_meta.get("latent"))

    def _sparse_pair_block(self, data: xr.Dataset, start: int, stop: int) -> dict[str, np.ndarray]:
        return self.field.sparse_pair_block(data, start, stop, self.fit_meta.get("latent"))

    def _log_rate_from_params(
        self,
        params: Mapping[str, Any],
        features: Features,
        origin_idx: np.ndarray,
        dest_idx: np.ndarray,
        pair_vals: Mapping[str, np.ndarray],
    ) -> np.ndarray:
        """``(sample, pair)`` log expected population-scale flows (pure numpy)."""
        return self.field.log_rate(params, features, origin_idx, dest_idx, pair_vals)

    def _log_rate_draws(
        self,
        posterior: xr.Dataset,
        data: xr.Dataset,
        origin_idx: np.ndarray,
        dest_idx: np.ndarray,
        *,
        seed: int = 0,
    ) -> np.ndarray:
        """``(sample, pair)`` log expected flows for pairs of ``data`` (positions into ``unit``)."""
        params = self._prediction_params(posterior, data, rng=np.random.default_rng(seed))
        origin_idx = np.asarray(origin_idx)
        dest_idx = np.asarray(dest_idx)
        return self._log_rate_from_params(
            params,
            self._features(data),
            origin_idx,
            dest_idx,
            self._pair_values(data, origin_idx, dest_idx),
        )

    def _flow_rule(self) -> ExpectedFlows:
        """How predictions turn latent log rates into flows (constrained forms normalise)."""
        return ExpectedFlows()

    def _fitted_observations(self, data: xr.Dataset) -> list[ObservationModel]:
        """Return the observation models of the fit, rebuilt from the fit state."""
        return self._observation_models(data)

    # ------------------------------------------------------------------ predict
    def predict(
        self,
        data: xr.Dataset,
        *,
        quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
        kind: str = "predictive",
        exposure: str | None = None,
        draws: int | None = None,
        block_size: int | None = None,
        use_dask: bool | None = None,
        seed: int = 0,
        dtype: Any = np.float64,
        progress: Any = None,
        period: str | None = None,
    ) -> xr.Dataset:
        """Summary of predicted flows for every (origin, destination) pair of ``data``.

        Parameters
        ----------
        data
            Any FlowDataset, including units and countries never observed: dense
            (origin x destination), or sparse (one ``pair`` dim with
            ``origin``/``destination`` coords, e.g. from
            :func:`flowmodel.pairs.sparse_pairs`). Sparse prediction needs an
            unconstrained model and every pair variable of the model over ``pair``.
        quantiles
            Equal-tailed quantiles; variables are named ``q05``, ``q25``, ...
        kind
            ``"predictive"`` (posterior predictive counts, including the
            negative-binomial noise of the reference source; default) or
            ``"mean"`` (posterior of the expected flow ``mu``).
        exposure
            None for the population-scale flow; a source name to multiply by
            ``exposure_<source>`` (e.g. compare with sampled census counts).
        draws
            Use this many posterior draws per chain (thinned evenly); default all.
        block_size
            Origins per block, or pairs per block for a sparse ``data``
            (default: chosen so a block holds ~64 MB). Results do not depend on it.
        use_dask
            Stream blocks through dask (default: when N > 2,000, or more than
            2,000² sparse pairs).
        seed
            Seed of the predictive noise (one stream per origin row, or per chunk
            of sparse pairs, so results do not depend on ``block_size`` or dask).
        dtype
            Float type of the draws inside a block (float32 halves memory).
        progress
            Show a progress bar over blocks (default: when interactive).
        period
            Models with periods only: the period to predict (a label, e.g.
            ``"2015-2020"``; default the latest latent period). The flows are the
            moves over that window; trends and walks are drawn there, so the
            intervals widen with its distance from the observed windows.

        Returns
        -------
        xarray.Dataset
            dims (origin, destination), or ``pair`` (coords ``origin``,
            ``destination``) for a sparse ``data``: ``mean`` and the quantile
            variables; the diagonal is NaN.

        Raises
        ------
        ModelConfigError
            For a bad ``kind``; for a sparse ``data`` with a constrained model,
            a missing pair variable or pairs naming units not in ``unit``.
        """
        from flowmodel.predict import predict_flows

        return predict_flows(
            self,
            data,
            quantiles=quantiles,
            kind=kind,
            exposure=exposure,
            draws=draws,
            block_size=block_size,
            use_dask=use_dask,
            seed=seed,
            dtype=dtype,
            progress=progress,
            period=period,
        )

    def predict_posterior(
        self,
        data: xr.Dataset,
        *,
        draws: int | None = None,
        kind: str = "mean",
        exposure: str | None = None,
        seed: int = 0,
        use_dask: bool | None = None,
        period: str | None = None,
    ) -> xr.DataArray:
        """Posterior draws of flows for every pair of ``data``.

        Returns
        -------
        xarray.DataArray
            dims (chain, draw, origin, destination), or (chain, draw, pair) with
            ``origin``/``destination`` coords for a sparse ``data``.
        """
        from flowmodel.predict import flow_draws

        return flow_draws(
            self,
            data,
            draws=draws,
            kind=kind,
            exposure=exposure,
            seed=seed,
            use_dask=use_dask,
            period=period,
        )

    def predict_totals(
        self,
        data: xr.Dataset,
        *,
        by: str | Sequence[str] = ("unit", "country", "country_pair", "total"),
        quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
        draws: int | None = None,
        seed: int = 0,
        block_size: int | None = None,
        kind: str = "predictive",
        progress: bool | None = None,
    ) -> xr.Dataset:
        """Migration totals with intervals from joint posterior predictive draws, streamed.

        In-, out- and net migration per unit, immigration, emigration, net and
        internal migration per country, country-pair totals and total (and
        cross-border) movers; quantiles of sums come from per-draw sums, never
        from summed quantiles. See :func:`flowmodel.totals.predict_totals`.

        Returns
        -------
        xarray.Dataset
            Variables ``<quantity>_mean`` and ``<quantity>_q05`` ... over ``unit``,
            ``country`` and ``origin_country`` x ``destination_country``.
        """
        from flowmodel.totals import predict_totals

        return predict_totals(
            self,
            data,
            by=by,
            quantiles=quantiles,
            draws=draws,
            seed=seed,
            block_size=block_size,
            kind=kind,
            progress=progress,
        )

    def predict_cells(
        self,
        data: xr.Dataset,
        source: str,
        *,
        quantiles: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95),
        draws: int | None = None,
        kind: str = "predictive",
        seed: int = 0,
    ) -> xr.Dataset:
        """Predicted reports of one source, cell by cell, on the source's own scale.

        For a source reported at the unit level a cell is one pair; for one
        reported at a coarser level (previous admin-1 or country) a cell sums its
        member pairs, so this is how such a source is checked against its data.
        The scale is the source's: sample fraction, market share, undercount.

        Parameters
        ----------
        data
            The FlowDataset holding ``source``.
        source
            A source the model fits.
        quantiles, draws, seed
            As :meth:`predict`.
        kind
            ``"predictive"`` (with the source's count noise) or ``"mean"``.

        Returns
        -------
        xarray.Dataset
            Over ``cell_<source>`` (coordinates ``origin``, ``destination`` —
            labels at the source's levels — and ``period``): ``mean``, the
            quantile variables and ``observed`` (NaN where censored).
        """
        from flowmodel.naming import quantile_name
        from flowmodel.predict import count_noise

        if kind not in ("predictive", "mean"):
            raise ModelConfigError(f"kind={kind!r} is not valid; use 'predictive' or 'mean'")
        obs = {o.source: o for o in self._fitted_observations(data)}.get(source)
        if obs is None:
            raise ModelConfigError(
                f"{type(self).__name__}: '{source}' is not one of the fitted sources "
                f"{self.fit_meta.get('sources')}. Fix: name one of them"
            )
        posterior = thin_posterior(self.posterior, draws)
        rng = np.random.default_rng(seed)
        log_rate = self._cell_log_rate(posterior, data, {"latent": self._state()}, rng)
        cells = self._windowed(data, obs.cells(data))
        log_mu = obs.cell_log_mu(posterior, data, cells, log_rate)
        mu = np.exp(log_mu)
        if kind == "mean" or obs.kind == "estimates":
            values = mu
        else:
            values = count_noise(mu, obs.phi_draws(posterior), rng, np.float64)
        dim = f"cell_{source}"
        out = {"mean": ((dim,), mu.mean(axis=0))}
        for q in quantiles:
            out[quantile_name(q)] = ((dim,), np.quantile(values, q, axis=0))
        out["observed"] = ((dim,), cells.y)
        coords = {
            "origin": ((dim,), np.asarray(cells.origin_label).astype(str)),
            "destination": ((dim,), np.asarray(cells.destination_label).astype(str)),
        }
        if cells.period_idx is not None and "period" in data.coords:
            coords["period"] = ((dim,), np.asarray(data["period"].values)[cells.period_idx])
        ds = xr.Dataset(out, coords=coords)
        ds.attrs.update(source=source, kind=kind, scale=f"as reported by '{source}'")
        return ds

    # ------------------------------------------------------------------ predictive checks
    def sample_prior_predictive(
        self, data: xr.Dataset, *, draws: int = 500, random_seed: int | None = None
    ) -> xr.DataTree:
        """Prior and prior-predictive draws for the exact cells of every source of ``data``.

        Parameters are drawn by PyMC; counts are drawn in numpy from them with
        each source's observation noise. The model's fit (if any) is untouched.

        Returns
        -------
        xarray.DataTree
            Groups ``prior`` (chain, draw, ...), ``prior_predictive`` with
            ``flow_<source>`` over (chain, draw, ``cell_<source>``), and
            ``observed_data``.
        """
        model, state, _ = self._build(data)
        prior = prior_draws(model, draws=draws, random_seed=random_seed)
        prior = prior.expand_dims(chain=[0]) if "chain" not in prior.dims else prior
        return self._predictive_tree(prior, data, state, random_seed, group="prior")

    def sample_posterior_predictive(
        self, data: xr.Dataset, *, random_seed: int | None = None
    ) -> xr.DataTree:
        """Posterior predictive draws of the exact cells of every source of ``data``.

        Returns
        -------
        xarray.DataTree
            ``posterior_predictive`` with ``flow_<source>`` over (chain, draw,
            ``cell_<source>``) and ``observed_data``.
        """
        return self._predictive_tree(
            self.posterior, data, self.fit_meta, random_seed, group="posterior"
        )

    def _predictive_tree(
        self,
        draws: xr.Dataset,
        data: xr.Dataset,
        state: Mapping[str, Any],
        seed: int | None,
        *,
        group: str,
    ) -> xr.DataTree:
        from flowmodel.predict import count_noise

        if isinstance(self._flow_rule(), ConstrainedFlows):
            raise ModelConfigError(
                f"{type(self).__name__}: predictive draws of a constrained model are "
                "conditional on its margins; Fix: use model.predict_posterior(data, "
                "kind='predictive')"
            )
        rng = np.random.default_rng(seed)
        log_rate = self._cell_log_rate(draws, data, state, rng)
        pred, observed = {}, {}
        shape = (draws.sizes["chain"], draws.sizes["draw"])
        for obs in self._observation_models(data):
            if obs.kind == "estimates":
                continue
            cells = self._windowed(data, obs.cells(data))
            exact = np.flatnonzero(cells.observed)
            keep = cells if cells.aggregated else cells.subset(cells.observed)
            log_mu = obs.cell_log_mu(draws, data, keep, log_rate)
            if cells.aggregated:
                log_mu = log_mu[:, exact]
            phi = obs.phi_draws(draws) if hasattr(obs, "phi_draws") else None
            counts = count_noise(np.exp(log_mu), phi, rng, np.float64)
            dim = f"cell_{obs.source}"
            name = f"flow_{obs.source}"
            pred[name] = (("chain", "draw", dim), counts.reshape(*shape, -1))
            observed[name] = ((dim,), cells.y[exact])
        tree = xr.DataTree()
        tree[group] = xr.DataTree(draws)
        tree[f"{group}_predictive"] = xr.DataTree(
            xr.Dataset(pred, coords={"chain": draws["chain"].values, "draw": draws["draw"].values})
        )
        tree["observed_data"] = xr.DataTree(xr.Dataset(observed))
        return tree

    # ------------------------------------------------------------------ LOO
    def log_likelihood(self, data: xr.Dataset, *, draws: int | None = None) -> xr.DataTree:
        """Posterior plus a pointwise ``log_likelihood`` group over every cell of every source.

        One variable ``flow`` over dim ``cell`` (float32) with coordinates
        ``source``, ``origin`` and ``destination`` (unit ids, or the labels of
        aggregated cells) and ``period``: a count contributes its log pmf, a
        censored cell ``log P(min <= y <= max)``, an estimate its log-normal
        density. CDR in/out totals are not pointwise observations and are left
        out. Computed in numpy from the posterior draws, the same way for every
        backend. ``draws``: keep that many draws per chain, evenly spaced (all when
        None).

        Raises
        ------
        ModelConfigError
            For constrained models (their likelihood is per margin, not per cell).
        """
        posterior = thin_posterior(self.posterior, draws)
        state = self.fit_meta
        log_rate = self._cell_log_rate(posterior, data, state, np.random.default_rng(0))
        blocks, ys, labels = [], [], {"source": [], "origin": [], "destination": [], "period": []}
        periods = (
            np.asarray(data["period"].values).astype(str) if "period" in data.coords else None
        )
        for obs in self._fitted_observations(data):
            cells = self._windowed(data, obs.cells(data))
            blocks.append(obs.pointwise(posterior, data, cells, log_rate))
            ys.append(cells.y)
            labels["source"].append(np.full(cells.n, obs.source))
            labels["origin"].append(np.asarray(cells.origin_label).astype(str))
            labels["destination"].append(np.asarray(cells.destination_label).astype(str))
            labels["period"].append(
                periods[cells.period_idx]
                if cells.period_idx is not None and periods is not None
                else np.full(cells.n, "")
            )
        n_chain, n_draw = posterior.sizes["chain"], posterior.sizes["draw"]
        ll = np.concatenate(blocks, axis=1).reshape(n_chain, n_draw, -1).astype(np.float32)
        coords = {k: ("cell", np.concatenate(v)) for k, v in labels.items()}
        if not any(len(p) and p.any() for p in labels["period"]):
            coords.pop("period")
        tree = xr.DataTree()
        tree["posterior"] = xr.DataTree(posterior)
        tree["log_likelihood"] = xr.DataTree(
            xr.Dataset(
                {"flow": (("chain", "draw", "cell"), ll)},
                coords={
                    "chain": posterior["chain"].values,
                    "draw": posterior["draw"].values,
                    **coords,
                },
            )
        )
        tree["observed_data"] = xr.DataTree(
            xr.Dataset({"flow": (("cell",), np.concatenate(ys))}, coords=coords)
        )
        return tree

    # ------------------------------------------------------------------ save/load
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the posterior file (NetCDF) with model class, version, config and fit state.

        Returns
        -------
        pathlib.Path
        """
        from flowmodel.atomic import atomic_path

        idata = self.idata
        out = xr.DataTree()
        out.attrs.update(idata.attrs)
        for name, child in idata.children.items():
            ds = child.to_dataset()
            for var in list(ds.variables):
                if ds[var].dtype == object:
                    ds[var] = ds[var].astype(str)
            for key, val in list(ds.attrs.items()):
                if not isinstance(val, str | int | float | np.ndarray | list):
                    ds.attrs[key] = json.dumps(val, default=_json_default)
            out[name] = xr.DataTree(ds)
        path = Path(path)
        encoding = {
            f"/{name}": {
                str(v): {"zlib": True, "complevel": 4}
                for v in child.to_dataset().data_vars
                if child.to_dataset()[v].dtype.kind in "fiu"
            }
            for name, child in out.children.items()
        }
        with atomic_path(path) as tmp:
            out.to_netcdf(tmp, engine="h5netcdf", encoding=encoding)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FlowModel:
        """Rebuild a fitted model from its posterior file alone.

        Raises
        ------
        ModelLoadError
            When the file was written by another model class or package version,
            or is not a flowmodel posterior file.
        """
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such posterior file. Fix: check the path")
        try:
            tree = xr.open_datatree(path, engine="h5netcdf").load()
        except (OSError, ValueError) as err:
            raise ModelLoadError(
                f"{path}: cannot be read as a posterior file ({type(err).__name__}); it may be "
                "truncated or not a NetCDF file. Fix: rerun the fit stage (flowmodel fit)"
            ) from err
        attrs = tree.attrs
        name = attrs.get("flowmodel_model_class")
        if name is None:
            raise ModelLoadError(
                f"{path}: not a flowmodel posterior file (no 'flowmodel_model_class' attribute). "
                "Fix: write it with model.save(path)"
            )
        if name not in _MODEL_REGISTRY:
            import importlib

            for module in (
                "flowmodel.models.gravity",
                "flowmodel.models.radiation",
                "flowmodel.models.fusion",
            ):
                with contextlib.suppress(ImportError):
                    importlib.import_module(module)
        target = cls if cls is not FlowModel else _MODEL_REGISTRY.get(name)
        if target is None or target.__name__ != name:
            raise ModelLoadError(
                f"{path} holds a {name}, not a {cls.__name__}. Fix: load it with "
                f"{name}.load(path) or flowmodel.models.load_model(path)"
            )
        version = attrs.get("flowmodel_version")
        if version != __version__:
            raise ModelLoadError(
                f"{path} was written by flowmodel {version}; this is {__version__}. "
                f"Fix: install flowmodel=={version} to load it, or refit the model"
            )
        config = json.loads(attrs["flowmodel_model_config"])
        if config_hash(config) != attrs.get("flowmodel_config_hash"):
            raise ModelLoadError(
                f"{path}: the model config does not match its hash; the file is corrupt"
            )
        priors = json.loads(attrs.get("flowmodel_priors", "{}"))
        sampler = json.loads(attrs.get("flowmodel_sampler_config", "{}"))
        model = target(priors=priors, sampler_config=sampler, **config)
        model.fit_meta = json.loads(attrs.get("flowmodel_fit_meta", "{}"))
        model._idata = tree
        return model


def _observed_periods(data: xr.Dataset, observations: Sequence[ObservationModel]) -> xr.Dataset:
    """Return ``data`` with only the periods in which some fitted source has a cell.

    A held-out round, or the census windows in a CDR source's ``period`` dim, are
    not periods of that source: they carry no CDR period effect and no latent rows.
    """
    if "period" not in data.dims:
        return data
    keep = np.zeros(data.sizes["period"], dtype=bool)
    for obs in observations:
        for prefix in ("flow", "estimate"):
            for suffix in ("", "_max"):
                var = data.get(f"{prefix}_{obs.source}{suffix}")
                if var is None or "period" not in var.dims:
                    continue
                other = [d for d in var.dims if d != "period"]
                keep |= np.asarray(var.notnull().any(other).values, dtype=bool)
    if keep.all() or not keep.any():
        return data
    return data.isel(period=np.flatnonzero(keep))


def load_model(path: str | os.PathLike[str]) -> FlowModel:
    """Load a posterior file into the model class recorded in it."""
    return FlowModel.load(path)


def _interactive() -> bool:
    """Whether progress bars can be shown (a terminal or a notebook)."""
    import sys

    if "ipykernel" in sys.modules:
        return True
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def _element_sd(var: xr.DataArray) -> dict[str, float]:
    """Sd over (chain, draw) of every element of ``var``, keyed ``name[label]``."""
    extra = [d for d in var.dims if d not in ("chain", "draw")]
    values = var.transpose(*[d for d in ("chain", "draw") if d in var.dims], *extra).values
    values = values.reshape(-1, *values.shape[len(var.dims) - len(extra) :])
    if not extra:
        return {str(var.name): float(np.std(values))}
    if len(extra) > 1:
        return {}
    labels = var[extra[0]].values
    sds = np.std(values, axis=0)
    return {f"{var.name}[{label}]": float(s) for label, s in zip(labels, sds, strict=True)}


def pointwise_loo(tree: xr.DataTree, *, chunk: int = 20_000) -> xr.Dataset | None:
    """PSIS-LOO per cell (``elpd_i``, ``pareto_k``) from a ``log_likelihood`` group, in chunks.

    Used when the full pointwise log-likelihood is too large to keep: PSIS is
    computed per cell, so chunks of cells give the same numbers as one call. A cell
    whose largest importance ratios are tied (a redacted cell far below its bound:
    ``log P(y <= 15)`` equal to float precision in many draws, or in every draw) has
    no tail for PSIS to fit (ArviZ raises "All tail values are the same"): its
    ``elpd_i`` is the plain importance-sampling estimate
    ``log S - logsumexp(-log p_s)`` (the value itself for a constant cell) and its
    ``pareto_k`` 0, since tied top weights cannot be heavy-tailed.
    """
    import arviz as az
    from scipy.special import logsumexp

    ll = tree["log_likelihood"].to_dataset()["flow"]
    n = ll.sizes["cell"]
    values = ll.transpose("cell", ...).values.reshape(n, -1).astype(float)
    n_draws = values.shape[1]
    # PSIS fits a tail of >= 5 of the largest log ratios -log p (the smallest log p); if
    # those 5 are tied, a tail it chooses may be tied too
    low = np.partition(values, min(4, n_draws - 1), axis=1)[:, : min(5, n_draws)]
    tied = (low.max(axis=1) - low.min(axis=1)) < np.finfo(float).tiny
    elpd_all = np.log(n_draws) - logsumexp(-values, axis=1)
    k_all = np.zeros(n)
    varying = np.flatnonzero(~tied)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for a in range(0, len(varying), chunk):
            idx = varying[a : a + chunk]
            part = ll.isel(cell=idx)
            sub = xr.DataTree.from_dict(
                {
                    "posterior": tree["posterior"].to_dataset(),
                    "log_likelihood": part.to_dataset(name="flow"),
                }
            )
            res = az.loo(sub, pointwise=True, var_name="flow")
            elpd_all[idx] = np.asarray(res.elpd_i).ravel()
            k_all[idx] = np.asarray(res.pareto_k).ravel()
    coords = {c: ("cell", ll[c].values) for c in ll.coords if ll[c].dims == ("cell",)}
    return xr.Dataset(
        {
            "elpd_i": ("cell", elpd_all.astype(np.float32)),
            "pareto_k": ("cell", k_all.astype(np.float32)),
        },
        coords=coords,
        attrs={"note": "PSIS-LOO per cell; the pointwise log-likelihood was too large to keep"},
    )


def compare(
    models: Mapping[str, FlowModel],
    data: xr.Dataset | None = None,
    *,
    method: str = "stacking",
) -> pd.DataFrame:
    """Compare fitted models by PSIS-LOO expected log predictive density (ArviZ).

    Parameters
    ----------
    models
        ``name -> fitted model``, all fitted to the same observed cells.
    data
        The FlowDataset they were fitted to: the pointwise log-likelihood is
        recomputed from each posterior (the same way for every backend). When
        None, the ``log_likelihood`` group stored by :meth:`FlowModel.fit` is
        used (stored when draws x cells <= :data:`LOG_LIKELIHOOD_MAX_VALUES`).
    method
        Weighting method of :func:`arviz.compare`.

    Returns
    -------
    pandas.DataFrame
        :func:`arviz.compare`'s table, best model first (column ``elpd``; higher
        is better), with ``rank``, ``elpd_diff``, ``weight``.

    Raises
    ------
    ModelConfigError
        When fewer than two models are given or they observed different cells.
    """
    import arviz as az

    if len(models) < 2:
        raise ModelConfigError(
            "compare needs at least two fitted models, e.g. {'gravity': g, 'radiation': r}"
        )
    if data is None:
        missing = [n for n, m in models.items() if "log_likelihood" not in m.idata.children]
        if missing:
            raise ModelConfigError(
                f"models {missing} have no stored log_likelihood group (too many draws x cells, "
                "or a constrained model); Fix: pass the data, compare(models, data)"
            )
        trees = {name: model.idata for name, model in models.items()}
    else:
        trees = {name: model.log_likelihood(data) for name, model in models.items()}
    sizes = {
        name: tree["log_likelihood"].to_dataset().sizes.get("cell") for name, tree in trees.items()
    }
    if len(set(sizes.values())) != 1:
        raise ModelConfigError(
            f"models were compared on different observed cells {sizes}; Fix: fit every model to "
            "the same sources"
        )
    return az.compare(trees, method=method)
