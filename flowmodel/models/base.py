"""The :class:`FlowModel` base: one signature for every flow model (DESIGN §4.3).

Hooks a subclass (and :class:`~flowmodel.models.fusion.FusionModel`) implements
or reuses — this split is stable:

``build_model(data)``
    Builds the :class:`pymc.Model`: ``pairs = self._observed_pairs(data, source)``
    (:class:`ObservedPairs`: index arrays into ``data.unit``, counts, exposure,
    censoring bounds), then ``eta = self._add_latent(data, pairs)`` (registers
    priors and coefficients, returns the log expected **population-scale** flow of
    every observed pair, a tensor of shape ``(pair,)``), then
    ``self._add_likelihood(data, eta, pairs)``. A fusion model calls
    ``_add_latent`` of a gravity or radiation model inside its own model context
    and adds its own observation models.
``_latent_nodes()``
    Node names the latent part registers (used for prior checks and summaries).
``_prediction_params(posterior, data, *, rng)``
    Posterior draws as numpy arrays with a leading ``sample`` axis (chain and draw
    stacked), with per-unit quantities (e.g. the country effect of every unit of
    ``data``, drawn from ``N(0, sigma_country)`` for countries never observed).
``_log_rate_from_params(params, features, origin_idx, dest_idx, pair_values)``
    Pure numpy: ``(sample, pair)`` log expected population-scale flows.
``_log_rate_draws(posterior, data, origin_idx, dest_idx)``
    Convenience wrapper of the two above, used by fusion and tests;
    :mod:`flowmodel.predict` uses the two-step form to stream origin blocks.
``_pair_block(data, start, stop)`` / ``_sparse_pair_block(data, start, stop)``
    Pair variables of a block of origins x every destination (dense) or of a
    block of pairs (sparse ``pair`` dim), as flat numpy arrays.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import hashlib
import importlib.util
import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt
import xarray as xr

from flowmodel._version import __version__
from flowmodel.dataset import dataset_fingerprint, flow_sources, is_sparse
from flowmodel.exceptions import (
    BackendNotAvailableError,
    DiagnosticsWarning,
    ModelConfigError,
    ModelLoadError,
)
from flowmodel.models.priors import PriorSpec, create_prior, resolve_priors

__all__ = ["BACKENDS", "FlowModel", "ObservedPairs", "load_model"]

#: Inference backends of :meth:`FlowModel.fit`.
BACKENDS = ("auto", "pymc", "nutpie", "numpyro", "laplace", "advi", "map")

_BACKEND_PACKAGES = {
    "nutpie": ("nutpie", "pip install nutpie  (or: conda install -c conda-forge nutpie)"),
    "numpyro": (
        "numpyro",
        "pip install numpyro jax  (or: conda install -c conda-forge numpyro jax)",
    ),
}

#: Observed pairs above which ``backend="auto"`` uses the Laplace approximation.
AUTO_LAPLACE_PAIRS = 50_000
#: Largest draws x pairs for which :meth:`FlowModel.fit` stores the pointwise
#: ``log_likelihood`` group (for :func:`compare` without data).
LOG_LIKELIHOOD_MAX_VALUES = 20_000_000
#: Observed pairs above which ``backend="auto"`` prefers numpyro to nutpie.
AUTO_NUMPYRO_PAIRS = 10_000

_MODEL_REGISTRY: dict[str, type[FlowModel]] = {}


def censored_bounds(
    upper: np.ndarray, lower: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Integer censoring bounds: ``upper`` floored, ``lower`` ceiled (None or NaN: 0)."""
    upper = np.floor(np.asarray(upper, dtype=float))
    if lower is None:
        return upper, np.zeros_like(upper)
    return upper, np.ceil(np.nan_to_num(np.asarray(lower, dtype=float), nan=0.0))


def interval_logcdf(make_dist: Any, upper: np.ndarray, lower: np.ndarray) -> Any:
    """``log P(lower <= y <= upper)`` per cell with :func:`pymc.logcdf` (a PyTensor expression).

    ``make_dist(idx)`` returns the count distribution of every cell (``idx``
    None) or of the cells ``idx``. Only cells with ``lower > 0`` get the
    difference ``log(F(upper) - F(lower - 1))``, so the others keep the plain
    CDF and its gradient (no NaN from a difference of equal terms).
    """
    log_hi = pm.logcdf(make_dist(None), upper)
    idx = np.flatnonzero(lower > 0)
    if not idx.size:
        return log_hi
    log_lo = pm.logcdf(make_dist(idx), lower[idx] - 1)
    return pt.set_subtensor(log_hi[idx], pm.math.logdiffexp(log_hi[idx], log_lo))


def _like(
    var: xr.DataArray | None, dims: tuple[str, ...], like: np.ndarray, fill: float
) -> np.ndarray:
    """``var`` as a float array shaped like ``like`` (dims ``dims``), or ``fill`` when absent."""
    if var is None:
        return np.full_like(like, fill)
    return np.asarray(var.transpose(*dims).values, dtype=float).reshape(like.shape)


@dataclass
class ObservedPairs:
    """Observed pairs of one flow source, as flat arrays (dim ``pair``).

    Attributes
    ----------
    origin_idx, dest_idx
        Integer positions into ``data.unit`` of each pair's origin and destination.
    y
        Observed count (float; NaN where the cell is censored).
    exposure
        Multiplier of the expected count (census sample fraction, ...), 1 when absent.
    upper
        Censoring bound (``flow_<source>_max``) where the cell is censored, else NaN.
    period_idx
        Position into ``data.period`` for period-resolved sources, else None.
    lower
        Lower censoring bound (``flow_<source>_min``; 0 when absent): a censored
        cell holds a count in ``lower..upper``.
    """

    origin_idx: np.ndarray
    dest_idx: np.ndarray
    y: np.ndarray
    exposure: np.ndarray
    upper: np.ndarray
    period_idx: np.ndarray | None = None
    source: str = ""
    lower: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.lower is None:
            self.lower = np.zeros(len(self.origin_idx))
        self.lower = np.nan_to_num(np.asarray(self.lower, dtype=float), nan=0.0)

    @property
    def n(self) -> int:
        """Number of pairs."""
        return len(self.origin_idx)

    @property
    def observed(self) -> np.ndarray:
        """Mask of pairs with an exact (not censored) count."""
        return ~np.isnan(self.y)

    def subset(self, mask: np.ndarray) -> ObservedPairs:
        """Return the pairs where ``mask`` is True."""
        return ObservedPairs(
            self.origin_idx[mask],
            self.dest_idx[mask],
            self.y[mask],
            self.exposure[mask],
            self.upper[mask],
            None if self.period_idx is None else self.period_idx[mask],
            self.source,
            self.lower[mask],
        )


@dataclass
class Features:
    """Unit-level inputs of a model for one dataset (numpy, dim ``unit`` first)."""

    unit: np.ndarray
    country: np.ndarray
    unit_values: dict[str, np.ndarray] = field(default_factory=dict)


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
    """Abstract base of every flow model (gravity, radiation, fusion).

    Parameters
    ----------
    priors
        ``node name -> prior`` overrides (DESIGN §4.0 names; see
        :mod:`flowmodel.models.priors`). User priors win over data-derived ones,
        which win over defaults; a key naming no parameter warns.
    sampler_config
        Defaults of :meth:`fit` keyword arguments (``draws``, ``tune``,
        ``chains``, ``target_accept``, ...), merged over
        :attr:`default_sampler_config`.
    **model_config
        Keyword-only structural options of the subclass, merged over
        :attr:`default_model_config` and stored in :attr:`model_config`.

    Notes
    -----
    The constructor never touches data and never samples. Fitting stores the
    :class:`xarray.DataTree` in :attr:`idata`.
    """

    #: Structural options and their defaults; subclasses extend it.
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
        self.model: pm.Model | None = None
        self._idata: xr.DataTree | None = None
        self.fit_meta: dict[str, Any] = {}

    # ------------------------------------------------------------------ config
    def _validate_config(self) -> None:  # noqa: B027 - optional hook, nothing to check here
        """Check structural options (no data needed); raise ModelConfigError."""

    def _choice(self, key: str, allowed: Sequence[str]) -> None:
        value = self.model_config[key]
        if value not in allowed:
            raise ModelConfigError(
                f"{type(self).__name__}: {key}={value!r} is not valid; use one of {list(allowed)}"
            )

    # ------------------------------------------------------------------ data
    def _source(self, data: xr.Dataset) -> str:
        """Return the flow source this model fits (``model_config['source']`` or the only one)."""
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

    @staticmethod
    def _unit_positions(data: xr.Dataset, names: np.ndarray) -> np.ndarray:
        pos = pd.Series(np.arange(data.sizes["unit"]), index=data["unit"].values.astype(str))
        return pos.reindex(np.asarray(names).astype(str)).to_numpy().astype(int)

    def _observed_pairs(self, data: xr.Dataset, source: str) -> ObservedPairs:
        """Flat arrays of the observed (or censored) off-diagonal pairs of ``flow_<source>``.

        Periods, when present, are flattened into the pair dim (``period_idx``).
        Unit-level ``exposure_<source>`` applies to the origin unit.
        """
        flow = data[f"flow_{source}"]
        upper_var = data.get(f"flow_{source}_max")
        lower_var = data.get(f"flow_{source}_min")
        exp_var = data.get(f"exposure_{source}")
        if is_sparse(data):
            dims = ("pair", *(d for d in flow.dims if d != "pair"))
            flow_v = np.asarray(flow.transpose(*dims).values, dtype=float)
            origin_all = self._unit_positions(data, data["origin"].values)
            dest_all = self._unit_positions(data, data["destination"].values)
            if flow_v.ndim == 1:
                flow_v = flow_v[:, None]
            upper_v = _like(upper_var, dims, flow_v, np.nan)
            lower_v = _like(lower_var, dims, flow_v, 0.0)
            pair_i, per = np.nonzero(~np.isnan(flow_v) | ~np.isnan(upper_v))
            oi, dj = origin_all[pair_i], dest_all[pair_i]
            y, up = flow_v[pair_i, per], upper_v[pair_i, per]
            lo = lower_v[pair_i, per]
            if exp_var is None:
                ex = np.ones(len(oi))
            elif exp_var.dims == ("unit",):
                ex = np.asarray(exp_var.values, dtype=float)[oi]
            else:
                ev = np.asarray(exp_var.values, dtype=float)
                ex = ev[pair_i] if ev.ndim == 1 else ev.reshape(flow_v.shape)[pair_i, per]
            has_period = len(flow.dims) > 1
        else:
            dims = (
                "origin",
                "destination",
                *(d for d in flow.dims if d not in ("origin", "destination")),
            )
            flow_v = np.asarray(flow.transpose(*dims).values, dtype=float)
            if flow_v.ndim == 2:
                flow_v = flow_v[..., None]
            upper_v = _like(upper_var, dims, flow_v, np.nan)
            lower_v = _like(lower_var, dims, flow_v, 0.0)
            o_pos = self._unit_positions(data, data["origin"].values)
            d_pos = self._unit_positions(data, data["destination"].values)
            mask = ~np.isnan(flow_v) | ~np.isnan(upper_v)
            mask &= (o_pos[:, None] != d_pos[None, :])[..., None]
            a, b, per = np.nonzero(mask)
            oi, dj = o_pos[a], d_pos[b]
            y, up = flow_v[a, b, per], upper_v[a, b, per]
            lo = lower_v[a, b, per]
            if exp_var is None:
                ex = np.ones(len(oi))
            elif exp_var.dims == ("unit",):
                ex = np.asarray(exp_var.values, dtype=float)[oi]
            else:
                ev = np.asarray(exp_var.transpose(*dims[: exp_var.ndim]).values, dtype=float)
                ex = ev[a, b] if ev.ndim == 2 else ev[a, b, per]
            has_period = flow_v.shape[-1] > 1 or len(flow.dims) > 2
        return ObservedPairs(
            origin_idx=oi.astype(np.int64),
            dest_idx=dj.astype(np.int64),
            y=y,
            exposure=np.asarray(ex, dtype=float),
            upper=up,
            period_idx=per.astype(np.int64) if has_period else None,
            source=source,
            lower=np.where(np.isnan(y), lo, 0.0),
        )

    @staticmethod
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
            str(n)
            for n, v in data.data_vars.items()
            if v.dims == ("unit",) and v.dtype.kind in "fiub"
        )
        raise ModelConfigError(
            f"covariate '{name}' is not a unit variable of the dataset; available: {available} "
            "(any of them may also be asked for as log_<var>)"
        )

    # ------------------------------------------------------------------ hooks
    @abc.abstractmethod
    def _latent_nodes(self, data: xr.Dataset | None = None) -> list[str]:
        """Names of the nodes the latent part registers (for priors)."""

    def _likelihood_nodes(self) -> list[str]:
        """Names of the nodes the likelihood registers (for priors)."""
        return []

    def _data_priors(self, data: xr.Dataset, pairs: ObservedPairs) -> dict[str, PriorSpec]:
        """Data-derived priors (between defaults and user priors)."""
        return {}

    def _resolved_priors(self, data: xr.Dataset, pairs: ObservedPairs) -> dict[str, PriorSpec]:
        known = self._latent_nodes(data) + self._likelihood_nodes()
        return resolve_priors(known, data_derived=self._data_priors(data, pairs), user=self.priors)

    def _prior(self, name: str, dims: str | tuple[str, ...] | None = None):
        """Create node ``name`` from the resolved priors (inside build_model)."""
        return create_prior(name, self._priors_in_use[name], dims=dims)

    def _add_latent(self, data: xr.Dataset, pairs: ObservedPairs):
        """Register the latent parameters; return the ``(pair,)`` log-rate tensor.

        Used by :meth:`build_model`; a model that overrides ``build_model`` (the
        FusionModel delegates to its latent model's hook instead) need not define it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} uses FlowModel.build_model, so it must define _add_latent"
        )

    def _add_likelihood(self, data: xr.Dataset, eta, pairs: ObservedPairs) -> None:
        """Register the likelihood of ``pairs`` given the log rates ``eta`` (see _add_latent)."""
        raise NotImplementedError(
            f"{type(self).__name__} uses FlowModel.build_model, so it must define _add_likelihood"
        )

    @abc.abstractmethod
    def _prediction_params(
        self, posterior: xr.Dataset, data: xr.Dataset, *, rng: np.random.Generator
    ) -> dict[str, Any]:
        """Posterior draws as numpy arrays with a leading sample axis (see module doc)."""

    def _features(self, data: xr.Dataset) -> Features:
        """Unit-level inputs of the model for ``data`` (numpy)."""
        return Features(
            unit=np.asarray(data["unit"].values).astype(str),
            country=np.asarray(data["country"].values).astype(str),
        )

    def _pair_names(self) -> list[str]:
        """Names of the pair variables the log rate needs."""
        return ["distance_km"]

    def _pair_values(
        self, data: xr.Dataset, origin_idx: np.ndarray, dest_idx: np.ndarray
    ) -> dict[str, np.ndarray]:
        """Pair variables at ``(origin_idx, dest_idx)`` (positions into ``data.unit``)."""
        out = {}
        for name in self._pair_names():
            out[name] = pair_values(data, name, origin_idx, dest_idx)
        return out

    def _pair_block(self, data: xr.Dataset, start: int, stop: int) -> dict[str, np.ndarray]:
        """Pair variables for origins ``start:stop`` x every destination, flattened (row-major).

        ``data`` is dense with origin/destination in ``unit`` order. Used by
        :mod:`flowmodel.predict` to stream origin blocks.
        """
        n = data.sizes["unit"]
        out = {}
        for name in self._pair_names():
            if name not in data:
                out[name] = np.full((stop - start) * n, np.nan)
                continue
            var = data[name].transpose("origin", "destination").isel(origin=slice(start, stop))
            out[name] = np.asarray(var.values, dtype=float).ravel()
        return out

    def _sparse_pair_block(self, data: xr.Dataset, start: int, stop: int) -> dict[str, np.ndarray]:
        """Pair variables of pairs ``start:stop`` of a sparse ``data`` (dim ``pair``).

        Used by :mod:`flowmodel.predict` to stream blocks of a sparse pair set.
        Every variable of :meth:`_pair_names` must be in ``data`` over ``pair``
        (pair variables cannot be computed for a few pairs from the sparse set
        alone, e.g. the intervening population s_ij).

        Raises
        ------
        ModelConfigError
            When a pair variable the model needs is missing or not over ``pair``.
        """
        out = {}
        for name in self._pair_names():
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
    def _log_rate_from_params(
        self,
        params: Mapping[str, Any],
        features: Features,
        origin_idx: np.ndarray,
        dest_idx: np.ndarray,
        pair_vals: Mapping[str, np.ndarray],
    ) -> np.ndarray:
        """``(sample, pair)`` log expected population-scale flows (pure numpy)."""

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
        feats = self._features(data)
        origin_idx = np.asarray(origin_idx)
        dest_idx = np.asarray(dest_idx)
        return self._log_rate_from_params(
            params, feats, origin_idx, dest_idx, self._pair_values(data, origin_idx, dest_idx)
        )

    # ------------------------------------------------------------------ build
    def build_model(self, data: xr.Dataset) -> pm.Model:
        """Build (and store in :attr:`model`) the PyMC model of ``data``.

        Parameters
        ----------
        data
            A FlowDataset (DESIGN §3).

        Returns
        -------
        pymc.Model
        """
        source = self._source(data)
        pairs = self._observed_pairs(data, source)
        if pairs.n == 0:
            raise ModelConfigError(
                f"{type(self).__name__}: 'flow_{source}' has no observed off-diagonal pair; "
                "Fix: check the flow table or the source name"
            )
        self._priors_in_use = self._resolved_priors(data, pairs)
        self.fit_meta = {"source": source, "n_pairs": int(pairs.n)}
        with pm.Model(coords={"pair": np.arange(pairs.n)}) as model:
            eta = self._add_latent(data, pairs)
            self._add_likelihood(data, eta, pairs)
        self.model = model
        self._fit_pairs = pairs
        return model

    # ------------------------------------------------------------------ fit
    def _auto_backend(self, n_pairs: int) -> str:
        """Backend for ``backend="auto"`` (measured in ``benchmarks/inference.py``).

        Laplace above :data:`AUTO_LAPLACE_PAIRS` observed pairs; numpyro above
        :data:`AUTO_NUMPYRO_PAIRS` (13x nutpie's wall time at 160k pairs); else
        nutpie; pymc when neither is installed.
        """
        if n_pairs > AUTO_LAPLACE_PAIRS:
            return "laplace"
        if n_pairs > AUTO_NUMPYRO_PAIRS and importlib.util.find_spec("numpyro"):
            return "numpyro"
        if importlib.util.find_spec("nutpie"):
            return "nutpie"
        return "pymc"

    @staticmethod
    def _require_backend(backend: str) -> None:
        if backend not in BACKENDS:
            raise ModelConfigError(
                f"backend={backend!r} is not valid; use one of {list(BACKENDS)}"
            )
        if backend in _BACKEND_PACKAGES:
            module, fix = _BACKEND_PACKAGES[backend]
            if importlib.util.find_spec(module) is None:
                raise BackendNotAvailableError(
                    f"backend '{backend}' needs the package '{module}', which is not installed. "
                    f"Fix: {fix}; or pass backend='pymc'"
                )

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
            A FlowDataset with ``flow_<source>``.
        backend
            ``"pymc"`` / ``"nutpie"`` / ``"numpyro"`` (NUTS), ``"laplace"``
            (Gaussian at the MAP in the unconstrained space: L-BFGS, Newton polish,
            finite-difference Hessian of the compiled gradient; pass
            ``engine="pymc-extras"`` for :func:`pymc_extras.fit_laplace`),
            ``"advi"`` (mean-field ADVI started at the MAP; ``n=`` iterations),
            ``"map"`` (a single posterior "draw" at the MAP) or ``"auto"``
            (Laplace above :data:`AUTO_LAPLACE_PAIRS` observed pairs, numpyro above
            :data:`AUTO_NUMPYRO_PAIRS`, else nutpie, else pymc).
        random_seed
            Seed of every random draw.
        progressbar
            Show progress bars (default: False).
        **sample_kwargs
            Passed to the backend (``draws``, ``tune``, ``chains``, ...) over
            :attr:`sampler_config`.

        Returns
        -------
        xarray.DataTree
            ``posterior`` (dims ``chain``, ``draw``; ``beta`` over ``term`` on the
            standardised scale, ``beta_raw``/``intercept_raw`` on the raw scale),
            ``sample_stats`` for NUTS, and attrs recording model, config and data.

        Raises
        ------
        BackendNotAvailableError
            When the backend's package is not installed.
        """
        self._require_backend(backend)
        model = self.build_model(data)
        if backend == "auto":
            backend = self._auto_backend(self._fit_pairs.n)
            self._require_backend(backend)
        kwargs = self.sampler_config | sample_kwargs
        progressbar = bool(progressbar) if progressbar is not None else False
        idata = _run_backend(model, backend, kwargs, random_seed, progressbar)
        idata["prior"] = xr.DataTree(prior_draws(model, random_seed=random_seed))
        self.fit_meta.update(backend=backend, random_seed=random_seed)
        self._finalise_idata(idata, data)
        self._idata = idata
        n_samples = idata["posterior"].sizes.get("chain", 1) * idata["posterior"].sizes.get(
            "draw", 1
        )
        n_pairs = getattr(getattr(self, "_fit_pairs", None), "n", LOG_LIKELIHOOD_MAX_VALUES + 1)
        if n_samples * n_pairs <= LOG_LIKELIHOOD_MAX_VALUES:
            with contextlib.suppress(NotImplementedError, ModelConfigError):
                tree = self.log_likelihood(data)
                idata["log_likelihood"] = tree["log_likelihood"]
                idata["observed_data"] = tree["observed_data"]
        if backend in ("pymc", "nutpie", "numpyro"):
            self._check_diagnostics()
        return idata

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

    # ------------------------------------------------------------------ diagnostics
    def _check_diagnostics(self) -> None:
        import arviz as az

        idata = self.idata
        post = idata["posterior"].to_dataset()
        names = [v for v in self._summary_vars() if v in post]
        n_chains = post.sizes.get("chain", 1)
        msgs = []
        if "sample_stats" in idata.children and "diverging" in idata["sample_stats"]:
            n_div = int(idata["sample_stats"]["diverging"].values.sum())
            if n_div:
                msgs.append(
                    f"{n_div} divergent transition(s) (raise target_accept or reparametrise)"
                )
        if n_chains > 1 and names:
            rhat = az.rhat(post[names])
            worst = max(float(np.nanmax(rhat[v].values)) for v in names)
            if worst > 1.01:
                msgs.append(f"R-hat up to {worst:.3f} > 1.01 (run more tune/draws)")
        if names:
            ess = az.ess(post[names])
            low = min(float(np.nanmin(ess[v].values)) for v in names)
            if low < 100 * n_chains:
                msgs.append(
                    f"bulk ESS as low as {low:.0f} < {100 * n_chains} (100 per chain; draw more)"
                )
        if msgs:
            warnings.warn(
                f"{type(self).__name__} sampling diagnostics: " + "; ".join(msgs),
                DiagnosticsWarning,
                stacklevel=3,
            )

    def _summary_vars(self) -> list[str]:
        return ["intercept", "beta", "sigma_country", "phi", "tau", "radiation_exponent"]

    def summary(self, *, ci_prob: float = 0.94) -> pd.DataFrame:
        """Posterior summary with R-hat, ESS, divergences and raw-scale coefficients.

        Parameters
        ----------
        ci_prob
            Probability of the equal-tailed credible interval (columns
            ``eti_lo``/``eti_hi``).

        Returns
        -------
        pandas.DataFrame
            One row per scalar parameter (``beta[origin:log_population]``, ...,
            and ``beta_raw[...]``/``intercept_raw`` on the raw covariate scale)
            with ``mean``, ``sd``, ``eti_lo``, ``eti_hi``, ``ess_bulk``,
            ``ess_tail``, ``r_hat``; ``attrs['divergences']`` holds the count.
        """
        import arviz as az

        post = self.posterior
        names = [
            v
            for v in [*self._summary_vars(), "intercept_raw", "beta_raw", "country_effect"]
            if v in post
        ]
        rows = []
        n_chain = post.sizes.get("chain", 1)
        n_draw = post.sizes.get("draw", 1)
        ess_b = az.ess(post[names]) if n_chain * n_draw > 3 else None
        ess_t = az.ess(post[names], method="tail") if n_chain * n_draw > 3 else None
        rhat = az.rhat(post[names]) if n_chain > 1 and n_draw > 3 else None
        lo_q, hi_q = (1 - ci_prob) / 2, 1 - (1 - ci_prob) / 2
        for name in names:
            var = post[name]
            extra = [d for d in var.dims if d not in ("chain", "draw")]
            stacked = var.stack(sample=("chain", "draw"))
            if extra:
                flat = stacked.stack(_idx=extra).transpose("_idx", "sample")
                labels = [
                    f"{name}[{','.join(str(x) for x in (i if isinstance(i, tuple) else (i,)))}]"
                    for i in flat["_idx"].values
                ]
                values = flat.values
                ind = [
                    dict(zip(extra, (i if isinstance(i, tuple) else (i,)), strict=True))
                    for i in flat["_idx"].values
                ]
            else:
                labels, values, ind = [name], stacked.values[None, :], [{}]
            for label, vals, sel in zip(labels, values, ind, strict=True):
                row = {
                    "mean": float(np.mean(vals)),
                    "sd": float(np.std(vals, ddof=1)) if vals.size > 1 else 0.0,
                    "eti_lo": float(np.quantile(vals, lo_q)),
                    "eti_hi": float(np.quantile(vals, hi_q)),
                    "ess_bulk": float(ess_b[name].sel(sel).values)
                    if ess_b is not None
                    else np.nan,
                    "ess_tail": float(ess_t[name].sel(sel).values)
                    if ess_t is not None
                    else np.nan,
                    "r_hat": float(rhat[name].sel(sel).values) if rhat is not None else np.nan,
                }
                rows.append(pd.Series(row, name=label))
        out = pd.DataFrame(rows)
        div = 0
        if "sample_stats" in self.idata.children and "diverging" in self.idata["sample_stats"]:
            div = int(self.idata["sample_stats"]["diverging"].values.sum())
        out.attrs["divergences"] = div
        out.attrs["ci_prob"] = ci_prob
        return out

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
    ) -> xr.Dataset:
        """Summary of predicted flows for every (origin, destination) pair of ``data``.

        Parameters
        ----------
        data
            Any FlowDataset, including units and countries never observed: dense
            (origin x destination), or sparse (one ``pair`` dim with
            ``origin``/``destination`` coords, e.g. from
            :func:`flowmodel.pairs.sparse_pairs`), whichever form the model was
            fitted on. Sparse prediction needs an unconstrained model and every
            pair variable of the model over ``pair``.
        quantiles
            Equal-tailed quantiles; variables are named ``q05``, ``q25``, ...
        kind
            ``"predictive"`` (posterior predictive counts, including the
            negative-binomial noise; default) or ``"mean"`` (posterior of the
            expected flow ``mu``).
        exposure
            None for the population-scale flow; a source name to multiply by
            ``exposure_<source>`` (e.g. compare with sampled census counts).
        draws
            Use this many posterior draws (thinned evenly); default all.
        block_size
            Origins per block, or pairs per block for a sparse ``data``
            (default: chosen so a block holds ~64 MB).
        use_dask
            Stream blocks through dask (default: when N > 2,000, or more than
            2,000² sparse pairs).
        seed
            Seed of the predictive noise (per block, so numpy == dask).
        dtype
            Float type of the draws inside a block (float32 halves memory).

        Returns
        -------
        xarray.Dataset
            dims (origin, destination), or ``pair`` (coords ``origin``,
            ``destination``) for a sparse ``data``: ``mean`` and the quantile
            variables; the diagonal is NaN. ``kind="mean"`` results equal the
            dense ones gathered at the same pairs; predictive noise is seeded
            per block, so it differs draw for draw (not in distribution).

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
    ) -> xr.DataArray:
        """Posterior draws of flows for every pair of ``data``.

        Parameters
        ----------
        data
            Any FlowDataset, dense or sparse (``pair`` dim), as :meth:`predict`.
        draws
            Keep this many draws per chain (thinned evenly); default all.
        kind
            ``"mean"`` (expected flow ``mu``, default) or ``"predictive"``.
        exposure, seed
            As :meth:`predict`.
        use_dask
            Return a dask-backed array (default: when N > 2,000).

        Returns
        -------
        xarray.DataArray
            dims (chain, draw, origin, destination), or (chain, draw, pair) with
            ``origin``/``destination`` coords for a sparse ``data``.
        """
        from flowmodel.predict import flow_draws

        return flow_draws(
            self, data, draws=draws, kind=kind, exposure=exposure, seed=seed, use_dask=use_dask
        )

    def sample_prior_predictive(
        self, data: xr.Dataset, *, draws: int = 500, random_seed: int | None = None
    ) -> xr.DataTree:
        """Prior and prior-predictive draws for the observed pairs of ``data``.

        Parameters are drawn by PyMC; counts are drawn in numpy from them with
        the model's observation noise (the likelihood is a sufficient-statistic
        ``Potential``, which PyMC cannot sample).

        Returns
        -------
        xarray.DataTree
            Groups ``prior`` (chain, draw, ...), ``prior_predictive`` with
            ``flow_<source>`` over (chain, draw, pair), and ``observed_data``.
        """
        model = self.build_model(data)
        names = [v.name for v in model.free_RVs] + [v.name for v in model.deterministics]
        with model, warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "potentials are ignored"
            prior = pm.sample_prior_predictive(
                draws=draws, var_names=names, random_seed=random_seed
            )
        prior_ds = prior["prior"].to_dataset()
        return self._predictive_tree(prior_ds, data, random_seed, group="prior")

    def sample_posterior_predictive(
        self, data: xr.Dataset, *, random_seed: int | None = None
    ) -> xr.DataTree:
        """Posterior predictive draws of the observed pairs of ``data``.

        Returns
        -------
        xarray.DataTree
            ``posterior_predictive`` with ``flow_<source>`` over (chain, draw,
            pair) and ``observed_data``; pair ``k`` is the k-th observed pair in
            (origin, destination) order.
        """
        return self._predictive_tree(self.posterior, data, random_seed, group="posterior")

    def _predictive_tree(
        self, draws: xr.Dataset, data: xr.Dataset, seed: int | None, *, group: str
    ) -> xr.DataTree:
        from flowmodel.predict import _count_noise

        if getattr(self, "constraint", "none") != "none":
            raise ModelConfigError(
                f"constraint='{self.constraint}': predictive draws are conditional on margins; "
                "Fix: use model.predict_posterior(data, kind='predictive')"
            )
        source = self.fit_meta.get("source") or self._source(data)
        pairs = self._observed_pairs(data, source)
        pairs = pairs.subset(pairs.observed)
        rng = np.random.default_rng(seed)
        eta = self._log_rate_draws(draws, data, pairs.origin_idx, pairs.dest_idx, seed=seed or 0)
        mu = np.exp(eta) * pairs.exposure[None, :]
        phi = stack_samples(draws["phi"]) if "phi" in draws else None
        counts = _count_noise(mu, phi, rng, np.float64)
        shape = (draws.sizes["chain"], draws.sizes["draw"], pairs.n)
        name = f"flow_{source}"
        pred = xr.Dataset(
            {name: (("chain", "draw", "pair"), counts.reshape(shape))},
            coords={
                "chain": draws["chain"].values,
                "draw": draws["draw"].values,
                "origin": ("pair", np.asarray(data["unit"].values)[pairs.origin_idx]),
                "destination": ("pair", np.asarray(data["unit"].values)[pairs.dest_idx]),
            },
        )
        tree = xr.DataTree()
        tree[group] = xr.DataTree(draws)
        tree[f"{group}_predictive"] = xr.DataTree(pred)
        tree["observed_data"] = xr.DataTree(xr.Dataset({name: (("pair",), pairs.y)}))
        return tree

    # ------------------------------------------------------------------ LOO
    def log_likelihood(self, data: xr.Dataset) -> xr.DataTree:
        """Return the posterior plus a pointwise ``log_likelihood`` group over observed pairs.

        Used by :func:`flowmodel.models.compare`; computed in numpy from the
        posterior draws, the same way for every backend.
        """
        raise NotImplementedError(f"{type(self).__name__} has no pointwise log-likelihood")

    # ------------------------------------------------------------------ save/load
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the posterior file (NetCDF) with model class, version, config and data fingerprint.

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
        with atomic_path(path) as tmp:
            out.to_netcdf(tmp, engine="h5netcdf")
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
        tree = xr.open_datatree(path, engine="h5netcdf").load()
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


def load_model(path: str | os.PathLike[str]) -> FlowModel:
    """Load a posterior file into the model class recorded in it."""
    return FlowModel.load(path)


def pair_values(
    data: xr.Dataset, name: str, origin_idx: np.ndarray, dest_idx: np.ndarray
) -> np.ndarray:
    """Values of the pair variable ``name`` at unit positions ``(origin_idx, dest_idx)``.

    Dense datasets are indexed directly (origin/destination in ``unit`` order);
    sparse ones are looked up by their ``pair`` index.
    """
    var = data[name]
    if is_sparse(data):
        pos = FlowModel._unit_positions(data, data["origin"].values) * data.sizes["unit"] + (
            FlowModel._unit_positions(data, data["destination"].values)
        )
        lookup = pd.Series(np.arange(len(pos)), index=pos)
        where = lookup.reindex(origin_idx * data.sizes["unit"] + dest_idx).to_numpy()
        if np.isnan(where).any():
            raise ModelConfigError(f"'{name}': requested pairs are not in the sparse pair set")
        return np.asarray(var.values, dtype=float)[where.astype(int)]
    values = np.asarray(var.transpose("origin", "destination").values, dtype=float)
    return values[origin_idx, dest_idx]


def _posterior_sample_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    return dict(kwargs)


def _run_backend(
    model: pm.Model,
    backend: str,
    kwargs: dict[str, Any],
    random_seed: int | None,
    progressbar: bool,
) -> xr.DataTree:
    kwargs = dict(kwargs)
    draws = int(kwargs.pop("draws", 1000))
    chains = int(kwargs.pop("chains", 4))
    with model:
        if backend in ("pymc", "nutpie", "numpyro"):
            tune = int(kwargs.pop("tune", 1000))
            target_accept = kwargs.pop("target_accept", None)
            cores = kwargs.pop("cores", min(chains, os.cpu_count() or 1))
            if backend == "pymc" and target_accept is not None:
                kwargs["target_accept"] = target_accept
            nuts_kwargs = dict(kwargs.pop("nuts_sampler_kwargs", {}) or {})
            nuts_kwargs.update(kwargs.pop("nuts", {}) or {})
            if backend == "nutpie" and target_accept is not None:
                nuts_kwargs.setdefault("target_accept", target_accept)
            if backend == "numpyro":
                if target_accept is not None:
                    nuts_kwargs.setdefault("target_accept", target_accept)
                nuts_kwargs.setdefault("chain_method", "sequential" if cores < 2 else "parallel")
            return pm.sample(
                draws=draws,
                tune=tune,
                chains=chains,
                cores=cores,
                random_seed=random_seed,
                progressbar=progressbar,
                nuts_sampler=backend,
                compute_convergence_checks=False,
                **({"nuts": nuts_kwargs} if nuts_kwargs else {}),
                **kwargs,
            )
        for key in ("tune", "target_accept", "cores"):
            kwargs.pop(key, None)
        if backend == "laplace" and kwargs.pop("engine", "flowmodel") == "flowmodel":
            return _laplace(model, draws=draws, chains=chains, random_seed=random_seed, **kwargs)
        if backend == "laplace":
            if importlib.util.find_spec("pymc_extras") is None:
                raise BackendNotAvailableError(
                    "backend='laplace' with engine='pymc-extras' needs pymc-extras. Fix: pip "
                    "install pymc-extras (or conda install -c conda-forge pymc-extras), or drop "
                    "engine= to use flowmodel's own Laplace approximation"
                )
            import pymc_extras as pmx

            idata = pmx.fit_laplace(
                model=model,
                draws=draws * chains,
                random_seed=random_seed,
                progressbar=progressbar,
                include_transformed=False,
                **kwargs,
            )
            return _reshape_chains(idata, chains)
        if backend == "advi":
            n_iter = int(kwargs.pop("n", 10_000))
            start = kwargs.pop("start", None)
            if start is None:  # start at the MAP: mean-field ADVI from the prior converges slowly
                start = pm.find_MAP(progressbar=False, seed=random_seed)
            start_sigma = kwargs.pop(
                "start_sigma",
                {
                    v.name: np.full(np.shape(start[v.name]), 0.01)
                    for v in model.value_vars
                    if v.name in start
                },
            )
            approx = pm.fit(
                n=n_iter,
                method="advi",
                start=start,
                start_sigma=start_sigma,
                obj_optimizer=kwargs.pop("obj_optimizer", pm.adam(learning_rate=0.01)),
                random_seed=random_seed,
                progressbar=progressbar,
                **kwargs,
            )
            idata = approx.sample(draws * chains, random_seed=random_seed)
            return _reshape_chains(idata, chains)
        if backend == "map":
            point = pm.find_MAP(progressbar=progressbar, seed=random_seed, **kwargs)
            return _point_to_idata(model, point)
    raise ModelConfigError(f"backend={backend!r} is not valid; use one of {list(BACKENDS)}")


def _laplace(
    model: pm.Model,
    *,
    draws: int,
    chains: int,
    random_seed: int | None,
    maxiter: int = 2000,
    step: float = 1e-4,
) -> xr.DataTree:
    """Laplace approximation at the MAP, in the unconstrained space.

    The MAP comes from L-BFGS on the compiled log density and gradient; the
    Hessian from central differences of the gradient (2·d gradient calls, d =
    number of unconstrained parameters), which is far cheaper to build than a
    symbolic Hessian. Draws ``x ~ N(mode, (-H)^{-1})`` are mapped back through
    the transforms, and deterministics are computed per draw.
    """
    from pymc.blocking import DictToArrayBijection, RaveledVars
    from scipy import optimize

    rng = np.random.default_rng(random_seed)
    start = model.initial_point(random_seed)
    value_names = [v.name for v in model.value_vars]
    x0 = DictToArrayBijection.map({k: start[k] for k in value_names})
    info = x0.point_map_info
    logp_fn = model.compile_logp(jacobian=True)
    dlogp_fn = model.compile_dlogp(jacobian=True)

    def point(x):
        return DictToArrayBijection.rmap(RaveledVars(x, info))

    def neg(x):
        return -float(logp_fn(point(x))), -np.asarray(dlogp_fn(point(x)), dtype=float)

    # the log density is O(number of pairs) while hierarchical terms are O(1): a
    # relative-decrease stopping rule would stop before sigma_country moves
    res = optimize.minimize(
        neg,
        x0.data,
        jac=True,
        method="L-BFGS-B",
        options={"maxiter": maxiter, "ftol": 1e-15, "gtol": 1e-8, "maxcor": 30},
    )
    mode = res.x
    d = len(mode)

    def hessian(x):
        out = np.empty((d, d))
        for k in range(d):
            h = step * max(1.0, abs(x[k]))
            e = np.zeros(d)
            e[k] = h
            out[:, k] = (neg(x + e)[1] - neg(x - e)[1]) / (2 * h)
        return (out + out.T) / 2

    # polish with damped Newton steps (the posterior is close to quadratic)
    f_mode, g_mode = neg(mode)
    hess = hessian(mode)
    n_newton = 0
    for _ in range(20):
        vals, vecs = np.linalg.eigh(hess)
        if np.any(vals <= 0):
            break
        direction = -(vecs / vals) @ (vecs.T @ g_mode)
        t = 1.0
        while t > 1e-6:
            f_new, g_new = neg(mode + t * direction)
            if np.isfinite(f_new) and f_new <= f_mode + 1e-10 * abs(f_mode):
                break
            t /= 2
        else:
            break
        mode, f_mode, g_mode = mode + t * direction, f_new, g_new
        n_newton += 1
        hess = hessian(mode)
        if np.max(np.abs(t * direction)) < 1e-9:
            break
    vals, vecs = np.linalg.eigh(hess)
    if np.any(vals <= 0) or not np.isfinite(f_mode):
        warnings.warn(
            "Laplace: the Hessian at the mode is not positive definite "
            f"(smallest eigenvalue {vals.min():.3g}); the approximation is unreliable. "
            "Fix: use a NUTS backend or stronger priors",
            DiagnosticsWarning,
            stacklevel=4,
        )
        vals = np.maximum(vals, 1e-8)
    cov_sqrt = vecs / np.sqrt(vals)
    z = rng.standard_normal((chains * draws, d))
    samples = mode + z @ cov_sqrt.T
    outs_rv = list(model.free_RVs) + list(model.deterministics)
    outs = model.replace_rvs_by_values(outs_rv)
    fn = model.compile_fn(outs, inputs=model.value_vars, on_unused_input="ignore", point_fn=False)
    names = [v.name for v in outs_rv]
    values: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for x in samples:
        p = point(x)
        for name, val in zip(names, fn(*[p[k] for k in value_names]), strict=True):
            values[name].append(np.asarray(val))
    data_vars = {}
    for name in names:
        arr = np.stack(values[name]).reshape(chains, draws, *np.shape(values[name][0]))
        dims = tuple(model.named_vars_to_dims.get(name, ()))
        if len(dims) != arr.ndim - 2:
            dims = tuple(f"{name}_dim_{i}" for i in range(arr.ndim - 2))
        data_vars[name] = (("chain", "draw", *dims), arr)
    ds = xr.Dataset(data_vars)
    bad = [name for name, (_, arr) in data_vars.items() if not np.all(np.isfinite(arr))]
    if bad:
        warnings.warn(
            f"Laplace: non-finite posterior draws of {bad[:6]}: the mode ran off to a boundary "
            "(e.g. a hierarchical sd at 0 or infinity), and predictions from this fit will be "
            "NaN. Fix: noncentered=True when countries have few pairs, stronger priors, or a "
            "NUTS backend",
            DiagnosticsWarning,
            stacklevel=4,
        )
    coords = {k: np.asarray(v) for k, v in model.coords.items() if v is not None and k in ds.dims}
    ds = ds.assign_coords(coords | {"chain": np.arange(chains), "draw": np.arange(draws)})
    ds.attrs.update(
        inference_library="flowmodel.laplace",
        laplace_converged=int(bool(res.success)),
        laplace_n_gradient_calls=int(res.nfev + (n_newton + 1) * (2 * d + 1)),
        laplace_newton_steps=n_newton,
    )
    out = xr.DataTree()
    out["posterior"] = xr.DataTree(ds)
    return out


def _reshape_chains(idata: xr.DataTree, chains: int) -> xr.DataTree:
    post = idata["posterior"].to_dataset()
    n = post.sizes["draw"] * post.sizes["chain"]
    per = n // chains
    stacked = post.stack(sample=("chain", "draw")).isel(sample=slice(0, per * chains))
    stacked = stacked.drop_vars(["sample", "chain", "draw"])
    arrays = {}
    for name, var in stacked.data_vars.items():
        other = [d for d in var.dims if d != "sample"]
        vals = var.transpose("sample", *other).values.reshape(
            chains, per, *[var.sizes[d] for d in other]
        )
        arrays[name] = (("chain", "draw", *other), vals)
    coords = {k: v for k, v in post.coords.items() if k not in ("chain", "draw")}
    new = xr.Dataset(arrays, coords={**coords, "chain": np.arange(chains), "draw": np.arange(per)})
    out = xr.DataTree()
    out["posterior"] = xr.DataTree(new)
    out.attrs.update(idata.attrs)
    return out


def _point_to_idata(model: pm.Model, point: Mapping[str, np.ndarray]) -> xr.DataTree:
    data_vars = {}
    names = {v.name for v in model.free_RVs} | {v.name for v in model.deterministics}
    for name in names:
        if name not in point:
            continue
        value = np.asarray(point[name])
        dims = model.named_vars_to_dims.get(name, ())
        if len(dims) != value.ndim:
            dims = tuple(f"{name}_dim_{i}" for i in range(value.ndim))
        data_vars[name] = (("chain", "draw", *dims), value[None, None, ...])
    coords = {k: np.asarray(v) for k, v in model.coords.items() if v is not None}
    ds = xr.Dataset(data_vars)
    ds = ds.assign_coords(
        {k: v for k, v in coords.items() if k in ds.dims} | {"chain": [0], "draw": [0]}
    )
    out = xr.DataTree()
    out["posterior"] = xr.DataTree(ds)
    return out


#: Draws of the ``prior`` group stored by :meth:`FlowModel.fit`.
PRIOR_DRAWS = 500


def prior_draws(
    model: pm.Model, *, draws: int = PRIOR_DRAWS, random_seed: int | None = None
) -> xr.Dataset:
    """Prior draws of every parameter of ``model`` (its free variables and deterministics).

    Variables over the ``pair`` dim are left out (they grow with the data). The
    likelihood terms are ``Potential``s, which forward sampling ignores: PyMC's
    warning about it, and its "Sampling: [...]" log line, are silenced.
    """
    import logging

    names = [
        v.name
        for v in [*model.free_RVs, *model.deterministics]
        if "pair" not in model.named_vars_to_dims.get(v.name, ())
    ]
    forward = logging.getLogger("pymc.sampling.forward")
    level = forward.level
    forward.setLevel(logging.WARNING)
    try:
        with model, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"(?s).*[Pp]otential", category=UserWarning)
            prior = pm.sample_prior_predictive(
                draws=draws, var_names=names, random_seed=random_seed
            )
    finally:
        forward.setLevel(level)
    group = prior["prior"]
    return group.to_dataset() if hasattr(group, "to_dataset") else group


def thin_posterior(posterior: xr.Dataset, draws: int | None) -> xr.Dataset:
    """Keep ``draws`` draws per chain, evenly spaced (all when None)."""
    if draws is None or draws >= posterior.sizes["draw"]:
        return posterior
    idx = np.unique(np.linspace(0, posterior.sizes["draw"] - 1, draws).round().astype(int))
    return posterior.isel(draw=idx)


def stack_samples(var: xr.DataArray) -> np.ndarray:
    """Return a posterior variable as numpy, chain and draw stacked into one leading axis."""
    other = [d for d in var.dims if d not in ("chain", "draw")]
    values = var.transpose("chain", "draw", *other).values
    return values.reshape(-1, *values.shape[2:])


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
        ``name -> fitted model``, all fitted to the same observed pairs.
    data
        The FlowDataset they were fitted to: the pointwise log-likelihood is
        recomputed from each posterior (the same way for every backend). When
        None, the ``log_likelihood`` group stored by :meth:`FlowModel.fit` is
        used (stored when draws x pairs <= :data:`LOG_LIKELIHOOD_MAX_VALUES`).
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
        When fewer than two models are given or they observed different pairs.
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
                f"models {missing} have no stored log_likelihood group (too many draws x pairs, "
                "or a constrained model); Fix: pass the data, compare(models, data)"
            )
        trees = {name: model.idata for name, model in models.items()}
    else:
        trees = {name: model.log_likelihood(data) for name, model in models.items()}
    sizes = {
        name: tree["log_likelihood"].to_dataset().sizes.get("pair") for name, tree in trees.items()
    }
    if len(set(sizes.values())) != 1:
        raise ModelConfigError(
            f"models were compared on different observed pairs {sizes}; Fix: fit every model to "
            "the same flow source"
        )
    return az.compare(trees, method=method)
