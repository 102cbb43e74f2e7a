"""Priors keyed by PyMC node name, with one precedence rule.

A prior is either a :class:`pymc_extras.prior.Prior` or a plain mapping
``{"dist": "<pymc distribution name>", **parameters}``, e.g.
``{"dist": "Normal", "mu": 0, "sigma": 2}``. Coefficient priors (``beta``)
are on the **standardised** covariate scale (the models centre and scale every
covariate inside the model); ``intercept`` is the log rate at the covariate
means.

Precedence, written once in :func:`resolve_priors`:
user > data-derived > default. A user key that names no parameter of the
model warns with :class:`~flowmodel.exceptions.PriorWarning`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import pymc as pm

from flowmodel.exceptions import ModelConfigError, PriorWarning

__all__ = ["DEFAULT_PRIORS", "PriorSpec", "create_prior", "resolve_priors"]

PriorSpec = Any  # Mapping[str, Any] | pymc_extras.prior.Prior

#: Defaults of every node; models use the subset they have.
DEFAULT_PRIORS: dict[str, dict[str, Any]] = {
    "intercept": {"dist": "Normal", "mu": 0.0, "sigma": 5.0},
    "beta": {"dist": "Normal", "mu": 0.0, "sigma": 2.0},
    # the cross_border coefficient on its raw 0/1 scale (log of the factor by which a border
    # lowers flows at the same sizes and distance): centred on a factor ~12 fewer movers,
    # 95% prior interval from ~1 (no border effect) to ~140. Border effects measured with
    # gravity models: trade between Canadian provinces ~20x denser than with US states
    # (McCallum 1995), >12 for OECD countries; migration ~100x (Helliwell 1997, "National
    # borders, trade and migration", Pacific Economic Review 2:165). Where a census or an
    # estimate sees cross-border flows the data decide; where nothing does, this prior sets
    # the width of cross-border predictions (docs/models.md, "Priors")
    "cross_border": {"dist": "Normal", "mu": -2.5, "sigma": 1.25},
    # non-centred offsets z of the hierarchical country effect:
    # country_effect = sigma_country * z
    "country_effect": {"dist": "Normal", "mu": 0.0, "sigma": 1.0},
    # few countries (often 2-10) inform the sd of their effects little, so its prior decides
    # how wide a never-observed country's intervals are: HalfNormal(0.5) keeps 95% of its
    # mass below ~1 (country levels within a factor ~2.7 after covariates); HalfNormal(1)
    # made the 90% intervals of no-data countries cover 99-100% of the flows (docs/fusion.md)
    "sigma_country": {"dist": "HalfNormal", "sigma": 0.5},
    "phi": {"dist": "Gamma", "alpha": 2.0, "beta": 0.2},
    "tau": {"dist": "LogNormal", "mu": -3.0, "sigma": 2.0},
    "radiation_exponent": {"dist": "LogNormal", "mu": 0.0, "sigma": 1.0},
    "destination_effect": {"dist": "Normal", "mu": 0.0, "sigma": 5.0},
    # non-centred offsets of country-specific slopes: country_slope = sigma_slope * z
    "country_slope": {"dist": "Normal", "mu": 0.0, "sigma": 1.0},
    "sigma_slope": {"dist": "HalfNormal", "sigma": 0.5},
}


def resolve_priors(
    known: Iterable[str],
    *,
    data_derived: Mapping[str, PriorSpec] | None = None,
    user: Mapping[str, PriorSpec] | None = None,
    defaults: Mapping[str, PriorSpec] | None = None,
) -> dict[str, PriorSpec]:
    """Merge priors with the precedence user > data-derived > default.

    Parameters
    ----------
    known
        Node names the model has (e.g. ``intercept``, ``beta``, ``phi``).
    data_derived
        Priors the model derives from the data (e.g. the intercept centred on
        the log mean observed rate).
    user
        The ``priors=`` argument of the model. A key not in ``known`` warns
        (:class:`~flowmodel.exceptions.PriorWarning`) and is ignored.
    defaults
        Default priors; :data:`DEFAULT_PRIORS` when None.

    Returns
    -------
    dict
        ``node name -> prior spec`` for every name in ``known``.
    """
    known = list(known)
    defaults = DEFAULT_PRIORS if defaults is None else defaults
    out: dict[str, PriorSpec] = {k: defaults[k] for k in known if k in defaults}
    for key, spec in (data_derived or {}).items():
        if key in known:
            out[key] = spec
    for key, spec in (user or {}).items():
        if key not in known:
            warnings.warn(
                f"prior '{key}' names no parameter of this model and is ignored; "
                f"the model's parameters are {sorted(known)}",
                PriorWarning,
                stacklevel=3,
            )
            continue
        out[key] = spec
    return out


def create_prior(name: str, spec: PriorSpec, *, dims: str | tuple[str, ...] | None = None):
    """Create the PyMC variable ``name`` from a prior spec (inside a model context).

    Parameters
    ----------
    name
        Node name.
    spec
        ``{"dist": "Normal", "mu": 0, "sigma": 1}`` or a
        :class:`pymc_extras.prior.Prior`.
    dims
        PyMC dims of the variable.

    Raises
    ------
    ModelConfigError
        When the spec names no PyMC distribution or has bad parameters.
    """
    if hasattr(spec, "create_variable"):
        if dims is not None and getattr(spec, "dims", ()) != (
            (dims,) if isinstance(dims, str) else tuple(dims)
        ):
            spec = spec.deepcopy() if hasattr(spec, "deepcopy") else spec
            spec.dims = (dims,) if isinstance(dims, str) else tuple(dims)
        return spec.create_variable(name)
    if not isinstance(spec, Mapping) or "dist" not in spec:
        raise ModelConfigError(
            f"prior '{name}': expected a pymc_extras Prior or a mapping with a 'dist' key, "
            f"got {spec!r}. Fix: e.g. priors={{'{name}': {{'dist': 'Normal', 'mu': 0, 'sigma': 1}}}}"
        )
    params = {k: v for k, v in spec.items() if k != "dist"}
    dist = getattr(pm, str(spec["dist"]), None)
    if dist is None or not isinstance(dist, type):
        raise ModelConfigError(
            f"prior '{name}': '{spec['dist']}' is not a PyMC distribution. "
            "Fix: use a class name of pymc, e.g. 'Normal', 'HalfNormal', 'Gamma'."
        )
    import inspect

    accepted = inspect.signature(dist.dist).parameters
    named = {k for k, p in accepted.items() if p.kind is not p.VAR_KEYWORD}
    unknown = sorted(set(params) - named)
    if unknown:
        raise ModelConfigError(
            f"prior '{name}': bad parameters {unknown} for pm.{spec['dist']} "
            f"(it takes {sorted(named - {'args', 'kwargs', 'rng', 'size', 'shape', 'dims'})}). "
            "Fix: use that distribution's parameter names."
        )
    try:
        return dist(name, **params, dims=dims)
    except TypeError as err:
        raise ModelConfigError(
            f"prior '{name}': bad parameters {params} for pm.{spec['dist']} ({err}). "
            "Fix: use that distribution's parameter names."
        ) from err


def draw_prior(spec: PriorSpec, size: int, rng: Any) -> Any:
    """``size`` draws of one scalar prior spec (``{"dist": ..., params}``), with ``rng``.

    Used where a quantity the fit could not contain is needed at prediction time
    (e.g. the level of a country without data when only one country was fitted).
    """
    if not isinstance(spec, Mapping) or "dist" not in spec:
        raise ModelConfigError(
            f"draw_prior: expected a mapping with a 'dist' key, got {spec!r}. Fix: give the "
            "prior as {'dist': 'HalfNormal', 'sigma': 0.5}"
        )
    dist = getattr(pm, str(spec["dist"]))
    params = {k: v for k, v in spec.items() if k != "dist"}
    return pm.draw(dist.dist(**params), draws=int(size), random_seed=rng)
