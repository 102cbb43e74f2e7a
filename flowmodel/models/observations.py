r"""Observation models: how each source sees sums of the one latent flow field.

A model is one latent field (:mod:`flowmodel.models.latent`) and a list of
observation models, one per source. Each observation model has four parts:

- **aggregation**: the latent pairs each reported cell sums (:class:`Cells`). A
  unit-level census cell is one pair; an admin-1 census cell (previous admin-1 ->
  current unit) sums the pairs of its member units; an immigrant count by previous
  country sums every unit of that country; a country-pair estimate sums a block.
  The membership is sparse (member -> cell) and applied as a segment sum;
- **scale**: the exposure (census sample fraction), the CDR market share per origin
  unit and period effects, an undercount factor (one, or one per class of report),
  a duration/definition factor;
- **noise**: negative binomial (Poisson as an option) for counts, log-normal with a
  given standard error for published estimates;
- **censoring**: ``log P(min <= y <= max)`` for a suppressed or redacted cell.

.. math::

    E[y_c] = e_c\, s_c \sum_{(i,j) \in c} \exp(\eta_{ij}), \qquad
    y_c \sim \operatorname{NB}(E[y_c], \phi_{\text{source}})

Several reports of the same flows (census and CDR; a sending-country and a
receiving-country report) are several observation models on one field. Classes:
:class:`CountObservation` (census-like counts), :class:`CDRObservation` (counts
with a market share, period effects and in/out totals),
:class:`EstimateObservation` (published estimates with standard errors),
:class:`ConstrainedCountObservation` (the multinomial forms of a constrained gravity
model, which condition on one source's margins).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, override

import numpy as np
import pandas as pd
import pymc as pm
import pytensor.tensor as pt
import xarray as xr
from scipy import special

from flowmodel.dataset import (
    TOTAL_KINDS,
    TOTAL_UNIVERSES,
    cell_dim,
    estimate_sources,
    is_sparse,
)
from flowmodel.exceptions import DataContractError, ModelConfigError
from flowmodel.models.inference import stack_samples
from flowmodel.models.latent import (
    LatentTerm,
    sparse_pair_positions,
    unit_positions,
    unit_variable,
)
from flowmodel.models.likelihoods import (
    LIKELIHOODS,
    censored_count_logp,
    censored_nb_logp_np,
    count_loglik,
    lognormal_sdlog,
    pointwise_count_loglik,
    segment_sum,
    truncated_nb_moments,
)
from flowmodel.naming import is_cdr_source
from flowmodel.pairs import cell_members, in_total_universe, total_pairs_outside

logger = logging.getLogger(__name__)

__all__ = [
    "CDRObservation",
    "Cells",
    "ConstrainedCountObservation",
    "CountObservation",
    "EstimateObservation",
    "ObservationModel",
    "ObservedPairs",
    "read_cells",
    "window_cells",
    "window_of",
]

#: Defaults of the CDR scaling nodes (suffixed ``_<source>`` for sources other than ``cdr``).
CDR_PRIORS: dict[str, dict[str, Any]] = {
    # log(market_share_i) = ceiling(log expit(centre_c + market_share_level
    #     + market_share_country[c]) + market_share_slope * z_i + sigma_market_share
    #     * market_share_z_i)   (z: the covariate's within-country standardised log or logit;
    # see CDRObservation.market_share_design and share_ceiling)
    # the level common to every CDR country (the operator's typical share times the detection
    # rate of home detection), relative to the centre; then each country's own offset
    "market_share_level": {"dist": "Normal", "mu": 0.0, "sigma": 0.5},
    "market_share_country": {"dist": "Normal", "mu": 0.0, "sigma": 0.5},
    # a penetration measure goes with the share: one within-country sd of the covariate moves
    # the log share by about a half (the within-country sd of real shares is ~0.3-0.6)
    "market_share_slope": {"dist": "Normal", "mu": 0.5, "sigma": 0.5},
    "sigma_market_share": {"dist": "HalfNormal", "sigma": 0.5},
    # the share may go with what makes a unit send migrants (population, urbanity, income:
    # operators cover towns better): one slope per origin term of the latent field, on the
    # term standardised within its country; centred on 0 (no direction assumed). Without it
    # that covariation is read as migration: the CDR's per-origin counts move the latent
    # origin coefficients, which every pair shares
    "market_share_origin_slope": {"dist": "Normal", "mu": 0.0, "sigma": 0.5},
    # market_share_spatial: the share of the unit effects' variance that is spatial (BYM2, on
    # the within-country neighbour graph); U-shaped, as in Morris et al. (2019)
    "market_share_spatial_fraction": {"dist": "Beta", "alpha": 0.5, "beta": 0.5},
    # overall CDR counts per latent flow beyond the market share (time windows differ:
    # days to months of CDR against a 1- or 5-year census question); broad by default,
    # set mu = log(CDR window / census window) when the windows are known
    "period_scale": {"dist": "LogNormal", "mu": 0.0, "sigma": 3.0},
    # log period_effect = log period_scale + deviation, deviation ~ ZeroSumNormal(sigma)
    "period_effect": {"dist": "ZeroSumNormal", "sigma": 0.5},
    # spurious relocations per subscriber-period pair (a home misplaced in one period makes a
    # move out and one back): used when home detection gave no estimate (then the prior is
    # centred on it, sd SPURIOUS_RATE_SDLOG); broad around 1%
    "spurious_rate": {"dist": "LogNormal", "mu": float(np.log(0.01)), "sigma": 1.0},
}
#: Sharpness of the ceiling at 1 of the market share (:func:`share_ceiling`): a share
#: below 0.8 is within 3% of its log-linear value.
SHARE_CEILING_SHARPNESS = 10.0


def share_ceiling(x: Any) -> Any:
    """Log share ``x`` under a smooth ceiling at 1: ``-softplus(-k x) / k``.

    ``k`` is :data:`SHARE_CEILING_SHARPNESS`; ``x`` a pytensor variable (the model)
    or numpy values. Equal to ``x`` (to within ``1e-4``) for ``x < log 0.4``, within
    3% of ``exp(x)`` for shares up to 0.8, and never above 0 (a share of 1). The
    market share's unit deviations are multiplicative on the log scale
    (:class:`CDRObservation`); a logit link would bend them as the level rises, and that
    bend, not the data, would then choose the shares' level.
    """
    k = SHARE_CEILING_SHARPNESS
    if isinstance(x, pt.Variable):
        return -pt.softplus(-k * x) / k
    return -np.logaddexp(0.0, -k * np.asarray(x, dtype=float)) / k


#: sd of log ``spurious_rate`` around home detection's estimate (``flow_<cdr>.attrs``): the
#: A->B->A estimate measured 0.8x the spurious moves of a simulated log with known homes.
SPURIOUS_RATE_SDLOG = 0.5


def _log_median(spec: Any) -> float:
    """Log of the median of a positive prior spec (LogNormal: ``mu``), else 0."""
    if isinstance(spec, Mapping) and spec.get("dist") == "LogNormal":
        return float(spec.get("mu", 0.0))
    return 0.0


#: Cells per block of the CDR pointwise log-likelihood (bounds its temporaries' memory).
POINTWISE_BLOCK = 1000
#: Country means of a share-scale covariate (all values in (0, 1)) inside this range centre
#: the market share's level; outside it (e.g. a panel's subscribers per resident, ~4e-4) the
#: covariate informs the shares' shape only and ``market_share_default`` gives the level.
SHARE_LEVEL_RANGE = (0.02, 0.98)
#: Default prior of an undercount or duration factor (a multiplier of the expected count).
FACTOR_PRIOR: dict[str, Any] = {"dist": "LogNormal", "mu": 0.0, "sigma": 0.5}


# =============================================================================== cells
@dataclass
class Cells:
    """Reported cells of one source and the latent pairs each sums (dim ``cell``).

    Attributes
    ----------
    origin_idx, dest_idx
        ``(member,)`` positions into ``data.unit`` of the latent pairs summed. For
        unit-level cells (``member_cell`` None) member ``k`` *is* cell ``k``.
    y
        ``(cell,)`` exact count (or estimate); NaN where the cell is censored.
    exposure
        ``(cell,)`` multiplier of the expected count (census sample fraction), 1 when absent.
    upper
        ``(cell,)`` censoring bound (``flow_<source>_max``) where censored, else NaN.
    period_idx
        ``(cell,)`` position into ``data.period`` for period-resolved sources, else None.
    source
        Source name.
    lower
        ``(cell,)`` lower censoring bound (``flow_<source>_min``; 0 when absent).
    member_cell
        ``(member,)`` cell of each member of an aggregated source, else None.
    origin_label, destination_label
        ``(cell,)`` labels of the cells (unit ids, or group labels of aggregated cells).
    se
        ``(cell,)`` standard errors of published estimates, else None.
    cell_class
        ``(cell,)`` class of each report (e.g. an undercount class), else None.
    latent_period
        ``(member,)`` latent period of each member in a model with periods
        (:func:`window_cells`), else None.
    member_weight
        ``(member,)`` years of the member's latent period inside the cell's window
        (the latent field is a rate per year), else None.
    """

    origin_idx: np.ndarray
    dest_idx: np.ndarray
    y: np.ndarray
    exposure: np.ndarray
    upper: np.ndarray
    period_idx: np.ndarray | None = None
    source: str = ""
    lower: np.ndarray | None = None
    member_cell: np.ndarray | None = None
    origin_label: np.ndarray | None = None
    destination_label: np.ndarray | None = None
    se: np.ndarray | None = None
    cell_class: np.ndarray | None = None
    latent_period: np.ndarray | None = None
    member_weight: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.lower is None:
            self.lower = np.zeros(len(self.y))
        self.lower = np.nan_to_num(np.asarray(self.lower, dtype=float), nan=0.0)

    @property
    def n(self) -> int:
        """Number of cells."""
        return len(self.y)

    @property
    def aggregated(self) -> bool:
        """Whether cells sum several latent pairs (else one pair each)."""
        return self.member_cell is not None

    @property
    def observed(self) -> np.ndarray:
        """Mask of cells with an exact (not censored) value."""
        return ~np.isnan(self.y)

    @property
    def censored(self) -> np.ndarray:
        """Mask of censored cells (a bound, no exact value)."""
        return np.isnan(self.y) & np.isfinite(self.upper)

    def members_per_cell(self) -> np.ndarray:
        """``(cell,)`` number of latent pairs each cell sums."""
        if self.member_cell is None:
            return np.ones(self.n)
        return np.bincount(self.member_cell, minlength=self.n).astype(float)

    def observed_rate(self) -> float | None:
        """Observed count per unit of exposure and latent pair (for data-derived priors)."""
        obs = self.observed
        if not obs.any():
            return None
        denom = np.sum(self.exposure[obs] * self.members_per_cell()[obs])
        return float(np.sum(self.y[obs]) / max(denom, 1e-12))

    def subset(self, mask: np.ndarray) -> Cells:
        """Return the cells where ``mask`` is True (unit-level cells only)."""
        if self.aggregated:
            raise ModelConfigError("subset() of aggregated cells is not supported")

        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[mask]

        return Cells(
            self.origin_idx[mask],
            self.dest_idx[mask],
            self.y[mask],
            self.exposure[mask],
            self.upper[mask],
            pick(self.period_idx),
            self.source,
            self.lower[mask],
            None,
            pick(self.origin_label),
            pick(self.destination_label),
            pick(self.se),
            pick(self.cell_class),
            pick(self.latent_period),
            pick(self.member_weight),
        )


#: The name this class had while every cell was one pair.
ObservedPairs = Cells


def _like(
    var: xr.DataArray | None, dims: tuple[str, ...], like: np.ndarray, fill: Any
) -> np.ndarray:
    """``var`` as an array shaped like ``like`` (dims ``dims``), or ``fill`` when absent."""
    if var is None:
        return np.full(like.shape, fill, dtype=object if isinstance(fill, str) else float)
    values = var.transpose(*dims).values
    dtype = float if values.dtype.kind in "fiub" else object
    return np.asarray(values, dtype=dtype).reshape(like.shape)


def read_cells(data: xr.Dataset, source: str, *, value: str | None = None) -> Cells:
    """Cells of ``source`` in ``data``: the observed or censored cells and their members.

    ``flow_<source>`` (or ``estimate_<source>`` with ``value="estimate"``) over
    (origin, destination[, period]) (dense), ``pair`` (sparse) or
    ``cell_<source>`` (aggregated: labels at the levels named by the variable's
    ``origin_level`` / ``destination_level`` attributes). Periods are flattened into
    the cell dim (``period_idx``); unit-level ``exposure_<source>`` applies to the
    origin unit.
    """
    prefix = value or "flow"
    name = f"{prefix}_{source}"
    if name not in data:
        raise DataContractError(f"no variable '{name}' in the dataset")
    var = data[name]
    if cell_dim(source) in var.dims:
        return _aggregated_cells(data, source, prefix)
    pair_dims = {"pair"} if is_sparse(data) else {"origin", "destination"}
    if not pair_dims <= set(var.dims) or not set(var.dims) <= pair_dims | {"period"}:
        raise DataContractError(
            f"'{name}' has dims {var.dims}; a source needs dims (origin, destination"
            f"[, period]), ('pair'[, 'period']) or ('{cell_dim(source)}',). Fix: build it with "
            "flowmodel.dataset.build_dataset, add_cells or estimates_to_dataset"
        )
    upper_var = data.get(f"{name}_max")
    lower_var = data.get(f"{name}_min")
    se_var = data.get(f"{name}_se")
    exp_var = data.get(f"exposure_{source}")
    class_var = data.get(f"class_{source}")
    if is_sparse(data):
        dims = ("pair", *(d for d in var.dims if d != "pair"))
        values = np.asarray(var.transpose(*dims).values, dtype=float)
        if values.ndim == 1:
            values = values[:, None]
        o_pos = unit_positions(data, data["origin"].values)
        d_pos = unit_positions(data, data["destination"].values)
        mask = ~np.isnan(values) | ~np.isnan(_like(upper_var, dims, values, np.nan))
        mask &= (o_pos != d_pos)[:, None]
        pair_i, per = np.nonzero(mask)
        oi, dj = o_pos[pair_i], d_pos[pair_i]
        index: tuple[np.ndarray, ...] = (pair_i, per)
        has_period = len(var.dims) > 1
    else:
        dims = (
            "origin",
            "destination",
            *(d for d in var.dims if d not in ("origin", "destination")),
        )
        values = np.asarray(var.transpose(*dims).values, dtype=float)
        if values.ndim == 2:
            values = values[..., None]
        o_pos = unit_positions(data, data["origin"].values)
        d_pos = unit_positions(data, data["destination"].values)
        mask = ~np.isnan(values) | ~np.isnan(_like(upper_var, dims, values, np.nan))
        mask &= (o_pos[:, None] != d_pos[None, :])[..., None]
        a, b, per = np.nonzero(mask)
        oi, dj = o_pos[a], d_pos[b]
        index = (a, b, per)
        has_period = values.shape[-1] > 1 or len(var.dims) > 2
    y = values[index]
    upper = _like(upper_var, dims, values, np.nan)[index]
    lower = _like(lower_var, dims, values, 0.0)[index]
    if exp_var is None:
        ex = np.ones(len(oi))
    elif exp_var.dims == ("unit",):
        ex = np.asarray(exp_var.values, dtype=float)[oi]
    else:
        edims = dims[: exp_var.ndim]
        ev = np.asarray(exp_var.transpose(*edims).values, dtype=float)
        ex = ev[index[: ev.ndim]] if ev.ndim < len(index) else ev[index]
    units = np.asarray(data["unit"].values).astype(str)
    return Cells(
        origin_idx=oi.astype(np.int64),
        dest_idx=dj.astype(np.int64),
        y=y,
        exposure=np.asarray(ex, dtype=float),
        upper=upper,
        period_idx=per.astype(np.int64) if has_period else None,
        source=source,
        lower=np.where(np.isnan(y), lower, 0.0),
        origin_label=units[oi],
        destination_label=units[dj],
        se=None if se_var is None else _like(se_var, dims, values, np.nan)[index],
        cell_class=None
        if class_var is None
        else _like(class_var, dims, values, "")[index].astype(str),
    )


def _aggregated_cells(data: xr.Dataset, source: str, prefix: str) -> Cells:
    """Cells of a source held over ``cell_<source>`` with their member pairs."""
    dim = cell_dim(source)
    name = f"{prefix}_{source}"
    var = data[name]
    o_level = str(var.attrs.get("origin_level", "unit"))
    d_level = str(var.attrs.get("destination_level", "unit"))
    values = np.asarray(var.values, dtype=float)
    upper = (
        np.asarray(data[f"{name}_max"].values, dtype=float)
        if f"{name}_max" in data
        else np.full_like(values, np.nan)
    )
    lower = (
        np.asarray(data[f"{name}_min"].values, dtype=float)
        if f"{name}_min" in data
        else np.zeros_like(values)
    )
    keep = np.isfinite(values) | np.isfinite(upper)
    o_lab = np.asarray(data[f"{dim}_origin"].values).astype(str)[keep]
    d_lab = np.asarray(data[f"{dim}_destination"].values).astype(str)[keep]
    n_cells = int(keep.sum())
    members = cell_members(data, o_lab, d_lab, o_level, d_level)
    empty = sorted(set(range(n_cells)) - set(members["cell"]))
    if empty:
        bad = [f"{o_lab[c]}->{d_lab[c]}" for c in empty[:10]]
        raise DataContractError(
            f"'{name}': {len(empty)} cell(s) sum no pair of distinct units ({bad}); their "
            f"labels name no unit at level {o_level!r} -> {d_level!r}. Fix: check the labels "
            "against the units' level field"
        )
    if is_sparse(data):
        _check_members_in_set(data, name, members, o_lab, d_lab)
    exp_name = f"exposure_{source}"
    ex = (
        np.asarray(data[exp_name].values, dtype=float)[keep]
        if exp_name in data
        else np.ones(n_cells)
    )
    se_name = f"{name}_se"
    class_name = f"class_{source}"
    period_idx = None
    if f"{dim}_period" in data.coords or f"{dim}_period" in data:
        labels = np.asarray(data[f"{dim}_period"].values).astype(str)[keep]
        period_idx = (
            pd.Series(np.arange(data.sizes["period"]), index=data["period"].values.astype(str))
            .reindex(labels)
            .to_numpy()
            .astype(np.int64)
        )
    y = values[keep]
    return Cells(
        origin_idx=members["i"].to_numpy(np.int64),
        dest_idx=members["j"].to_numpy(np.int64),
        y=y,
        exposure=ex,
        upper=upper[keep],
        period_idx=period_idx,
        source=source,
        lower=np.where(np.isnan(y), np.nan_to_num(lower[keep]), 0.0),
        member_cell=members["cell"].to_numpy(np.int64),
        origin_label=o_lab,
        destination_label=d_lab,
        se=np.asarray(data[se_name].values, dtype=float)[keep] if se_name in data else None,
        cell_class=np.asarray(data[class_name].values).astype(str)[keep]
        if class_name in data
        else None,
    )


def _check_members_in_set(
    data: xr.Dataset, name: str, members: pd.DataFrame, o_lab: np.ndarray, d_lab: np.ndarray
) -> None:
    """Raise when member pairs of aggregated cells are not in a sparse pair set."""
    where = sparse_pair_positions(
        data, members["i"].to_numpy(np.int64), members["j"].to_numpy(np.int64)
    )
    missing = where < 0
    if not missing.any():
        return
    cells = np.unique(members["cell"].to_numpy()[missing])
    shown = [f"{o_lab[c]}->{d_lab[c]}" for c in cells[:10]]
    raise DataContractError(
        f"'{name}': {int(missing.sum())} member pair(s) of {len(cells)} aggregated cell(s) "
        f"({shown}) are not in the sparse pair set; a cell sums the latent flow of every one "
        "of its member pairs. Fix: build the pair set from the dense dataset with "
        "flowmodel.pairs.sparse_pairs(ds, k=..., include_observed=True), which keeps every "
        "member pair of the cells, or add those pairs to the set"
    )


# ============================================================================= periods
def cell_period_labels(data: xr.Dataset, cells: Cells) -> np.ndarray | None:
    """``(cell,)`` label of the window each cell observes, or None when the source has none.

    The cell's ``period`` (a period dim or ``cell_<source>_period``); for a source
    without one, the ``period`` attribute of ``flow_<source>`` / ``estimate_<source>``
    (``[flows.<source>] period`` in a run config).
    """
    if cells.period_idx is not None:
        return np.asarray(data["period"].values).astype(str)[cells.period_idx]
    source = cells.source.split(":", 1)[0]
    for name in (f"flow_{source}", f"estimate_{source}"):
        if name in data and data[name].attrs.get("period"):
            return np.full(cells.n, str(data[name].attrs["period"]))
    return None


def window_cells(data: xr.Dataset, cells: Cells, periods: Sequence[Any]) -> Cells:
    """Cells whose members are latent (pair, period) rows with their years in the window.

    A cell observing the window ``[a, b)`` sums the latent flows (moves per year) of
    every latent period its window overlaps, each times the years attributed to it
    (:func:`flowmodel.periods.window_weights`): a five-year census window that is one
    latent period is one member of weight 5; a month of phone data inside a latent
    period one member of weight 1/12.

    Parameters
    ----------
    periods
        The latent periods (:class:`flowmodel.periods.Period`), in time order.

    Raises
    ------
    ModelConfigError
        When the source's cells carry no window (no period), or a window overlaps
        no latent period.
    """
    from dataclasses import replace

    from flowmodel.periods import parse_period, window_weights

    labels = cell_period_labels(data, cells)
    if labels is None:
        raise ModelConfigError(
            f"source '{cells.source}': a model with periods needs the window each cell "
            f"observes, and flow_{cells.source} has no period. Fix: give the flow table a "
            f"'period' column, or a run config [flows.{cells.source}] period = '2005-2010'"
        )
    maps = {lab: window_weights(parse_period(lab), periods) for lab in np.unique(labels)}
    if not cells.aggregated and all(len(m) == 1 for m in maps.values()):
        t = np.array([next(iter(maps[lab])) for lab in labels], dtype=np.int64)
        w = np.array([next(iter(maps[lab].values())) for lab in labels], dtype=float)
        return replace(cells, latent_period=t, member_weight=w)
    member_cell = cells.member_cell if cells.aggregated else np.arange(cells.n, dtype=np.int64)
    parts: list[tuple[np.ndarray, int, float]] = []
    member_label = labels[member_cell]
    for lab, weights in maps.items():
        members = np.flatnonzero(member_label == lab)
        parts += [(members, k, w) for k, w in weights.items()]
    members = np.concatenate([m for m, _, _ in parts])
    t = np.concatenate([np.full(len(m), k, dtype=np.int64) for m, k, _ in parts])
    w = np.concatenate([np.full(len(m), wk) for m, _, wk in parts])
    order = np.lexsort((t, members))
    members, t, w = members[order], t[order], w[order]
    return replace(
        cells,
        origin_idx=cells.origin_idx[members],
        dest_idx=cells.dest_idx[members],
        member_cell=member_cell[members],
        latent_period=t,
        member_weight=w,
    )


# ============================================================================== build
def _within_country_z(
    values: np.ndarray, country: np.ndarray, ok: np.ndarray
) -> tuple[np.ndarray, pd.Series]:
    """Standardise unit values within their country: ``(z, country means)``.

    ``values`` centred on their country's mean over ``ok``, divided by the pooled
    within-country sd; 0 where not ``ok``, or when nothing varies.
    """
    values = np.where(ok, values, np.nan)
    means = pd.Series(values[ok]).groupby(country[ok]).mean()
    dev = np.where(ok, values - means.reindex(country).to_numpy(), 0.0)
    dof = int(ok.sum()) - len(means)
    sd = float(np.sqrt(np.sum(dev[ok] ** 2) / dof)) if dof > 0 else 0.0
    return (dev / sd if sd > 0 else np.zeros(len(values))), means


class PriorFactory:
    """Creates nodes from the resolved priors inside ``build_model`` (``prior(name, dims=...)``).

    ``key`` names the prior when it differs from the node (e.g. ``country_effect_z``
    takes the ``country_effect`` prior).
    """

    def __init__(self, priors: Mapping[str, Any]) -> None:
        self.priors = dict(priors)

    def __call__(self, name: str, *, key: str | None = None, dims: Any = None) -> Any:
        from flowmodel.models.priors import create_prior

        spec = self.priors.get(key or name)
        if spec is None:
            raise ModelConfigError(f"no prior for node '{key or name}'")
        return create_prior(name, spec, dims=dims)


@dataclass
class Build:
    """What an observation model needs to add its likelihood (inside the PyMC model)."""

    data: xr.Dataset
    latent: LatentTerm
    union_origin: np.ndarray
    union_dest: np.ndarray
    prior: PriorFactory
    phi: Any = None
    union_period: np.ndarray | None = None
    periods: Sequence[Any] | None = None

    def __post_init__(self) -> None:
        n = int(self.data.sizes["unit"])
        key = self.union_origin * n + self.union_dest
        if self.union_period is not None:
            key = key * self.n_periods + self.union_period
        self._lookup = pd.Series(np.arange(len(self.union_origin)), index=key)

    @property
    def n_periods(self) -> int:
        """Number of latent periods (1 for a field without periods)."""
        return len(self.periods) if self.periods else 1

    @property
    def eta(self) -> Any:
        """``(pair,)`` log rates of the union of latent pairs."""
        return self.latent.eta

    @property
    def n_pairs(self) -> int:
        """Number of latent pairs."""
        return len(self.union_origin)

    def where(
        self, origin_idx: np.ndarray, dest_idx: np.ndarray, period_idx: np.ndarray | None = None
    ) -> np.ndarray:
        """Positions of pairs (of latent rows ``(pair, latent period)``) in the union."""
        n = int(self.data.sizes["unit"])
        key = np.asarray(origin_idx) * n + np.asarray(dest_idx)
        if self.union_period is not None:
            t = np.zeros(len(key), dtype=np.int64) if period_idx is None else period_idx
            key = key * self.n_periods + np.asarray(t)
        pos = self._lookup.reindex(key).to_numpy()
        return pos.astype(np.int64)

    def window(self, cells: Cells) -> tuple[np.ndarray | None, Any]:
        """``(latent period, log years)`` of each member of ``cells`` (see :func:`window_of`)."""
        return window_of(self.data, cells, self.periods)


def _normal_prior(priors: Mapping[str, Any], name: str, what: str) -> tuple[float, float]:
    """``(mu, sigma)`` of a Normal prior that the market share samples relative to the scale.

    Raises
    ------
    ModelConfigError
        When the prior of ``name`` is not a Normal.
    """
    spec = priors[name]
    if not (isinstance(spec, Mapping) and spec.get("dist", "Normal") == "Normal"):
        raise ModelConfigError(
            f"prior '{name}' must be a Normal ({what} market share is sampled relative to the "
            "period scale). Fix: {'dist': 'Normal', 'mu': 0.0, 'sigma': 0.5}"
        )
    return float(spec.get("mu", 0.0)), float(spec.get("sigma", 0.5))


def window_of(
    data: xr.Dataset, cells: Cells, periods: Sequence[Any] | None
) -> tuple[np.ndarray | None, Any]:
    """``(latent period, log years)`` of each member of ``cells``; ``(None, 0)`` without periods.

    Cells not yet windowed (e.g. CDR in/out totals) must each lie in one latent period.

    Raises
    ------
    ModelConfigError
        When a unit-level cell's window spans several latent periods.
    """
    if not periods:
        return None, 0.0
    if cells.latent_period is None:
        windowed = window_cells(data, cells, periods)
        if windowed.aggregated and not cells.aggregated:
            raise ModelConfigError(
                f"source '{cells.source}': a window spans several latent periods; "
                "Fix: use latent periods that contain each of its windows"
            )
        cells = windowed
    return cells.latent_period, np.log(np.asarray(cells.member_weight, dtype=float))


class ObservationModel(abc.ABC):
    """Abstract observation model of one source (see the module docstring).

    Parameters
    ----------
    source
        The source name: ``flow_<source>`` (counts) or ``estimate_<source>``.
    **options
        Options of the subclass (:attr:`default_options`).
    """

    #: Kind name in configs and saved models.
    kind: ClassVar[str] = ""
    #: Options and their defaults.
    default_options: ClassVar[dict[str, Any]] = {}
    #: Whether the source has a negative-binomial dispersion ``phi``.
    has_dispersion: ClassVar[bool] = False

    def __init__(self, source: str, **options: Any) -> None:
        unknown = set(options) - set(self.default_options)
        if unknown:
            raise ModelConfigError(
                f"source '{source}' ({self.kind}): unknown option(s) {sorted(unknown)}; valid "
                f"options are {sorted(self.default_options)}"
            )
        self.source = source
        self.options: dict[str, Any] = dict(self.default_options) | dict(options)
        self.validate()

    def validate(self) -> None:  # noqa: B027 - optional hook
        """Check the options (no data needed)."""

    @property
    def uses_dispersion(self) -> bool:
        """Whether this source's noise has a dispersion ``phi``."""
        return self.has_dispersion

    def nodes(self, data: xr.Dataset | None = None) -> list[str]:
        """Prior keys of the nodes this observation model registers."""
        return [f.node for f in self._factors()]

    def default_priors(self) -> dict[str, Any]:
        """Default priors of :meth:`nodes`."""
        return {f.node: f.default for f in self._factors()}

    def _factors(self) -> list[ScaleFactor]:
        out = []
        for name in ("undercount", "duration"):
            spec = self.options.get(name)
            if spec is not None:
                out.append(ScaleFactor(name, self.source, spec))
        return out

    @abc.abstractmethod
    def cells(self, data: xr.Dataset) -> Cells:
        """Read the source's cells from ``data``."""

    def latent_pairs(self, data: xr.Dataset, cells: Cells) -> tuple[np.ndarray, np.ndarray]:
        """Latent pairs this source needs (its members; CDR totals add their universe)."""
        return cells.origin_idx, cells.dest_idx

    def latent_rows(
        self, data: xr.Dataset, cells: Cells, window: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Latent ``(origin, destination, latent period)`` rows of windowed ``cells``.

        ``window(cells) -> (latent period, log years)`` windows other cells of the
        source (:meth:`Build.window`).
        """
        return cells.origin_idx, cells.dest_idx, cells.latent_period

    @abc.abstractmethod
    def add(self, build: Build, cells: Cells) -> None:
        """Register the source's nodes and likelihood terms in the current PyMC model."""

    def state(self, data: xr.Dataset, cells: Cells) -> dict[str, Any]:
        """Fit-derived facts of the source (JSON-able)."""
        return {
            "kind": self.kind,
            "n_cells": int(cells.n),
            "n_censored": int(cells.censored.sum()),
            "aggregated": bool(cells.aggregated),
        }

    # --------------------------------------------------------------------- numpy side
    def log_scale_draws(self, posterior: xr.Dataset, data: xr.Dataset, cells: Cells) -> np.ndarray:
        """``(sample, cell)`` log of the source's scale factors (undercount, duration, ...)."""
        out = np.zeros((_n_samples(posterior), cells.n))
        for f in self._factors():
            out = out + f.log_draws(posterior, cells)
        return out

    def cell_log_mu(
        self, posterior: xr.Dataset, data: xr.Dataset, cells: Cells, log_rate: Any
    ) -> np.ndarray:
        """``(sample, cell)`` log expected values of the cells (numpy).

        ``log_rate(origin_idx, dest_idx)`` gives ``(sample, member)`` latent log rates.
        """
        if cells.latent_period is None:
            eta = log_rate(cells.origin_idx, cells.dest_idx)
        else:
            eta = log_rate(cells.origin_idx, cells.dest_idx, cells.latent_period)
            eta = eta + np.log(cells.member_weight)[None, :]
        eta = eta + self.member_log_scale_draws(posterior, data, cells)
        if cells.aggregated:
            m = eta.max(axis=1, keepdims=True)
            sums = np.zeros((eta.shape[0], cells.n))
            np.add.at(sums.T, cells.member_cell, np.exp(eta - m).T)
            agg = np.log(sums) + m
        else:
            agg = eta
        out = agg + np.log(cells.exposure)[None, :] + self.log_scale_draws(posterior, data, cells)
        background = self.log_background_draws(posterior, data, cells)
        return out if background is None else np.logaddexp(out, background)

    def member_log_scale_draws(
        self, posterior: xr.Dataset, data: xr.Dataset, cells: Cells
    ) -> np.ndarray:
        """``(sample, member)`` log scale applied per latent pair (CDR market share); 0 here."""
        return np.zeros((1, len(cells.origin_idx)))

    def data_priors(self, data: xr.Dataset) -> dict[str, Any]:
        """Priors this source derives from the data (below the user's, above the defaults)."""
        return {}

    def _log_background(self, build: Build, cells: Cells) -> Any:
        """``(cell,)`` log of what the cells count beyond the latent flows (PyTensor), or None.

        Added to each cell's expected count (``mu = latent part + background``):
        e.g. the CDR's spurious relocations of home detection. None here.
        """
        return None

    def log_background_draws(
        self, posterior: xr.Dataset, data: xr.Dataset, cells: Cells
    ) -> np.ndarray | None:
        """``(sample, cell)`` numpy form of :meth:`_log_background` (None: no background)."""
        return None

    @abc.abstractmethod
    def pointwise(
        self, posterior: xr.Dataset, data: xr.Dataset, cells: Cells, log_rate: Any
    ) -> np.ndarray:
        """``(sample, cell)`` pointwise log-likelihood (numpy, for LOO)."""


def _n_samples(posterior: xr.Dataset) -> int:
    return int(posterior.sizes.get("chain", 1) * posterior.sizes.get("draw", 1))


@dataclass
class ScaleFactor:
    """A multiplier of a source's expected counts with a prior: undercount or duration.

    ``spec`` is one prior (one factor) or ``{class: prior}`` (one factor per class
    of report, the class of each cell read from ``class_<source>``; a number in
    place of a prior fixes that class's factor, e.g. ``1.0`` for a reference
    reporter taken as unbiased). Node: ``<name>_<source>`` (dims
    ``<name>_<source>_class`` per class).
    """

    name: str
    source: str
    spec: Any

    @property
    def node(self) -> str:
        return f"{self.name}_{self.source}"

    @property
    def per_class(self) -> bool:
        return isinstance(self.spec, Mapping) and "dist" not in self.spec

    @property
    def default(self) -> Any:
        if self.spec is True:
            return FACTOR_PRIOR
        return self.spec

    @property
    def class_dim(self) -> str:
        return f"{self.node}_class"

    def classes(self) -> list[str]:
        return sorted(str(k) for k in self.spec) if self.per_class else []

    def add(self, cells: Cells, priors: Mapping[str, Any]) -> Any:
        """Register the factor; return ``(cell,)`` or scalar log factor (PyTensor)."""
        from flowmodel.models.priors import create_prior

        spec = priors.get(self.node, self.default)
        if not self.per_class:
            return pt.log(create_prior(self.node, spec, dims=None))
        classes = self.classes()
        if cells.cell_class is None:
            raise DataContractError(
                f"{self.name} of source '{self.source}' is given per class {classes}, but the "
                f"dataset has no 'class_{self.source}'. Fix: add a 'class' column to the flow table"
            )
        idx = self._class_index(classes, cells)
        pm.modelcontext(None).add_coords({self.class_dim: classes})
        # a number fixes the factor: a reference reporter whose counts are taken as true
        factors = [
            pt.as_tensor_variable(float(spec[c]))
            if isinstance(spec[c], int | float)
            else create_prior(f"{self.node}_{c}", spec[c])
            for c in classes
        ]
        vec = pm.Deterministic(self.node, pt.stack(factors), dims=self.class_dim)
        return pt.log(vec)[idx]

    def _class_index(self, classes: list[str], cells: Cells) -> np.ndarray:
        """Position of each cell's class in ``classes`` (sorted); unknown classes raise."""
        cell_class = np.asarray(cells.cell_class).astype(str)
        unknown = sorted(set(cell_class.tolist()) - set(classes))
        if unknown:
            shown = ["(missing)" if c in ("", "nan", "None") else c for c in unknown]
            raise ModelConfigError(
                f"{self.name} of source '{self.source}': report class(es) {shown} of "
                f"class_{self.source} have no factor (factors are given for {classes}). Fix: "
                f"give every reported cell a class in the flow table's 'class' column, or add "
                f"the class to the {self.name} option"
            )
        return np.searchsorted(classes, cell_class)

    def log_draws(self, posterior: xr.Dataset, cells: Cells) -> np.ndarray:
        values = stack_samples(posterior[self.node])
        if values.ndim == 1:
            return np.log(values)[:, None]
        classes = list(posterior[self.node][self.class_dim].values.astype(str))
        return np.log(values)[:, self._class_index(classes, cells)]


# ======================================================================== count sources
class CountObservation(ObservationModel):
    r"""Counts (a census table or person records, a register): NB or Poisson, any level.

    .. math::

        y_c \sim \operatorname{NB}\Big(e_c\, u_c \sum_{(i,j)\in c} e^{\eta_{ij}},\ \phi\Big)

    with :math:`e_c` the exposure (sample fraction), :math:`u_c` the undercount and
    duration factors (when given), interval-censored cells entering as
    ``P(min <= y <= max)``.

    Options
    -------
    likelihood
        ``"negbin"`` (default) or ``"poisson"``.
    undercount
        None, a prior (one factor) or ``{class: prior}`` (one per report class in
        ``class_<source>``): reported / true counts.
    duration
        None or a prior: counts of the source's window per latent flow (e.g. a
        5-year migrant count against a 1-year latent window).
    dispersion
        None (the shared ``phi`` prior) or this source's own prior of its
        negative-binomial dispersion (node ``phi_<source>``; ``phi`` keeps its
        ``source`` dim): what is known of a report's precision. For large counts
        ``1/sqrt(phi)`` is the report's relative error, so a register known to be
        within ~3% of the truth gets a prior centred near ``1/0.03^2 ≈ 1,100``.
    """

    kind = "counts"
    has_dispersion = True
    default_options: ClassVar[dict[str, Any]] = {
        "likelihood": "negbin",
        "undercount": None,
        "duration": None,
        "dispersion": None,
    }

    @override
    def validate(self) -> None:
        if self.options["likelihood"] not in LIKELIHOODS:
            raise ModelConfigError(
                f"source '{self.source}': likelihood={self.options['likelihood']!r} is not "
                f"valid; use one of {list(LIKELIHOODS)}"
            )
        if self.options.get("dispersion") is not None and not self.uses_dispersion:
            raise ModelConfigError(
                f"source '{self.source}': a dispersion prior needs the negative binomial, but "
                f"likelihood={self.options['likelihood']!r}. Fix: drop 'dispersion' or use "
                "likelihood='negbin'"
            )

    @property
    @override
    def uses_dispersion(self) -> bool:
        return self.options["likelihood"] == "negbin"

    @property
    def dispersion_node(self) -> str | None:
        """``phi_<source>`` when the source has its own dispersion prior, else None."""
        if self.options.get("dispersion") is None or not self.uses_dispersion:
            return None
        return f"phi_{self.source}"

    @override
    def nodes(self, data: xr.Dataset | None = None) -> list[str]:
        own = [self.dispersion_node] if self.dispersion_node else []
        return [*super().nodes(data), *own]

    @override
    def default_priors(self) -> dict[str, Any]:
        own = {self.dispersion_node: self.options["dispersion"]} if self.dispersion_node else {}
        return super().default_priors() | own

    @override
    def cells(self, data: xr.Dataset) -> Cells:
        return read_cells(data, self.source)

    def _scale(self, build: Build, cells: Cells) -> tuple[Any, Any]:
        """``(member log scale, cell log scale)``: per latent pair (0 here) and per cell."""
        cell_scale: Any = 0.0
        for f in self._factors():
            cell_scale = cell_scale + f.add(cells, build.prior.priors)
        return 0.0, cell_scale

    def _scale_linear(self, build: Build, cells: Cells, y: np.ndarray) -> Any:
        """``Σ_c y_c log scale_c`` for the member scales of unit-level cells (0 here)."""
        return 0.0

    @override
    def add(self, build: Build, cells: Cells) -> None:
        likelihood = self.options["likelihood"]
        phi = build.phi if self.uses_dispersion else None
        t, log_w = build.window(cells)
        where = build.where(cells.origin_idx, cells.dest_idx, t)
        member_scale, cell_scale = self._scale(build, cells)
        member_scale = member_scale + log_w
        log_e = np.log(cells.exposure)
        obs = cells.observed
        cens = cells.censored
        name = f"y_{self.source}"
        background = self._log_background(build, cells)
        if not cells.aggregated:
            log_mu = build.eta[where] + member_scale + log_e + cell_scale
            if background is not None:
                log_mu = pt.logaddexp(log_mu, background)
            if obs.any():
                idx = np.flatnonzero(obs)
                linear = None
                if (
                    build.latent.linear is not None
                    and np.ndim(cell_scale) == 0
                    and background is None
                ):
                    w = np.bincount(where[idx], weights=cells.y[idx], minlength=build.n_pairs)
                    linear = (
                        build.latent.linear(w)
                        + self._scale_linear(build, cells, np.where(obs, cells.y, 0.0))
                        + float(cells.y[idx].sum()) * cell_scale
                    )
                pm.Potential(
                    name,
                    count_loglik(
                        log_mu[idx] if not obs.all() else log_mu,
                        cells.y[idx],
                        likelihood=likelihood,
                        phi=phi,
                        linear=linear,
                        log_offset=(log_e + log_w)[idx] if t is not None else log_e[idx],
                    ),
                )
            if cens.any():
                idx = np.flatnonzero(cens)
                mu_c = pt.exp(log_mu[idx])
                pm.Potential(
                    f"{name}_censored",
                    censored_count_logp(
                        mu_c, cells.upper[idx], cells.lower[idx], likelihood=likelihood, phi=phi
                    ).sum(),
                )
            return
        member = pt.exp(build.eta[where] + member_scale)
        mu = segment_sum(member, cells.member_cell, cells.n) * cells.exposure
        log_mu = pt.log(mu) + cell_scale
        if background is not None:
            log_mu = pt.logaddexp(log_mu, background)
        if obs.any():
            idx = np.flatnonzero(obs)
            pm.Potential(
                name, count_loglik(log_mu[idx], cells.y[idx], likelihood=likelihood, phi=phi)
            )
        if cens.any():
            idx = np.flatnonzero(cens)
            pm.Potential(
                f"{name}_censored",
                censored_count_logp(
                    pt.exp(log_mu[idx]),
                    cells.upper[idx],
                    cells.lower[idx],
                    likelihood=likelihood,
                    phi=phi,
                ).sum(),
            )

    @override
    def pointwise(self, posterior, data, cells, log_rate):
        log_mu = self.cell_log_mu(posterior, data, cells, log_rate)
        phi = self.phi_draws(posterior)
        obs = cells.observed
        ll = np.empty_like(log_mu)
        if obs.any():
            ll[:, obs] = pointwise_count_loglik(log_mu[:, obs], cells.y[None, obs], phi)
        cens = ~obs
        if cens.any():
            ll[:, cens] = censored_nb_logp_np(
                cells.upper[cens], cells.lower[cens], phi, np.exp(log_mu[:, cens])
            )
        return ll

    def phi_draws(self, posterior: xr.Dataset) -> np.ndarray | None:
        """``(sample,)`` dispersion draws of this source (None for a Poisson source)."""
        if not self.uses_dispersion or "phi" not in posterior:
            return None
        phi = posterior["phi"]
        if "source" in phi.dims:
            phi = phi.sel(source=self.source)
        return stack_samples(phi)


class CDRObservation(CountObservation):
    r"""Relocations from mobile-phone data: counts scaled by a market share and periods.

    .. math::

        y_{ijt} &\sim \operatorname{NB}\big(e^{\eta_{ij}}\, s_i\, \pi_t,\ \phi\big), \qquad
        \log \pi_t = \log\kappa + d_t \\
        \log s_i &= C\big(\log \operatorname{expit}(m_{c(i)} + \gamma + \delta_{c(i)})
        + b\, z_i + a^\top x_i + \sigma_s e_i\big), \qquad
        \gamma, \delta_c \sim N(0, 0.5^2),\
        b \sim N(0.5, 0.5^2),\ a_k \sim N(0, 0.5^2),\ e_i \sim N(0, 1)

    :math:`C(x) = -\operatorname{softplus}(-k x)/k` (:func:`share_ceiling`) keeps the
    share below 1 and is :math:`x` itself below a share of about 0.5: each country's
    share level is the logit-normal :math:`\operatorname{expit}(m_c + \gamma +
    \delta_c)`, and its units deviate from it *multiplicatively* — the counts measure
    each unit's share up to one common factor, and a penetration covariate such as
    subscribers per resident is proportional to the share. (With the deviations on the
    logit scale, their spread on the log scale would shrink as the level rises, and on
    data that pin the per-unit products the shares' level would follow that bend rather
    than the prior: on the simulated dense-CDR worlds the shares came out at half the
    truth.) A covariate that reads as a share (below) is a measure of the share itself,
    gives the level, and goes with the share's logit: then
    :math:`\operatorname{logit} s_i = m_{c(i)} + \gamma + \delta_{c(i)} + b z_i +
    a^\top x_i + \sigma_s e_i` (``link`` in the design recorded in ``fit_meta``).

    :math:`s_i` is the share of origin unit :math:`i`'s movers that the CDR counts
    as relocations: the operator's market share times the rate at which home
    detection finds a subscriber's home in both periods (a relocation missed by
    home detection is not counted). :math:`\kappa` is the ``period_scale`` and
    :math:`d` zero-sum period deviations (``period_effect``). The penetration
    covariate :math:`p_i` (``market_share_covariate``, e.g. subscribers per
    resident) enters by its *shape*: :math:`z_i` is :math:`g(p_i)` standardised
    within its country (:math:`g` = logit when every value lies in (0, 1), else
    log; centred on the country mean, divided by the pooled within-country sd; 0
    where the covariate is missing), with the slope :math:`b`
    (``market_share_slope``). The country level :math:`m_c` is the logit of the
    country's mean covariate when the covariate reads as a share (all values in
    (0, 1) and every country mean in :data:`SHARE_LEVEL_RANGE`), else
    ``logit(market_share_default)``: a panel's subscribers per resident (~4e-4)
    says which units the operator covers better, not what share of the market it
    has. :math:`\gamma` (``market_share_level``) is the level common to every CDR
    country — the operator's typical share and the detection rate, the same
    everywhere — and :math:`\delta_c` (``market_share_country``) each country's
    own offset; the unit effects :math:`e_i` are non-centred, and
    :math:`\gamma, \delta_c` are sampled relative to :math:`\log\kappa` (the
    data pin only the product :math:`s_i \kappa`; the prior is unchanged).
    :math:`x_i` are the ``market_share_origin_terms`` (e.g. the latent field's
    origin covariates: ``log_population``), each standardised within its country
    like :math:`z`, with slopes :math:`a` (``market_share_origin_slope``): a share
    that is higher in populous or urban units (as operators' coverage is) must not
    be read as more migration from them. The CDR's per-origin counts pin only the
    product of the share and the latent origin terms; with these slopes they leave
    the latent origin coefficients to the sources that measure them (a census),
    and the CDR informs where a unit's movers go.

    With ``market_share_spatial`` the unit effects are BYM2: :math:`e_i =
    \sqrt{1-\rho}\, v_i + \sqrt{\rho}\, u^*_i`, :math:`v_i \sim N(0, 1)`, :math:`u^*`
    a scaled intrinsic CAR on the neighbour graph (``contiguous``) of the CDR origin
    units within each country, :math:`\rho` (``market_share_spatial_fraction``) the
    spatial share of their variance (:mod:`flowmodel.models.spatial`).

    With ``spurious_relocations`` every cell also holds the moves home detection
    invents (a home misplaced for one period: a move out and one back, whose
    destinations do not fall with distance): :math:`\mu_{ijt} = e^{\eta_{ij}} s_i
    \pi_t + \rho\, S_i S_j / \sum_k S_k`, with :math:`S` the subscribers with a
    home per unit (``spurious_weight``, ``cdr_subscribers``) and :math:`\rho`
    (``spurious_rate``) spurious moves per subscriber-period pair, its prior
    centred on home detection's estimate (``flow_<source>.attrs["spurious_rate"]``,
    from moves out and back; sd :data:`SPURIOUS_RATE_SDLOG` on the log scale).
    The background enters the released, redacted and totals' cells alike.

    Cells redacted at 15 or fewer enter as ``P(y <= 15)``. The operator's in/out
    totals (``<source>_outflow`` / ``_inflow``, summed before redaction) enter
    through the remainder ``total - released cells``, normal with the summed
    moments of the redacted and missing cells; a suppressed total through its
    bound when the bound is tighter than its redacted cells' own, and only when
    it shares no redacted cell with a total already used.
    """

    kind = "cdr"
    default_options: ClassVar[dict[str, Any]] = {
        **CountObservation.default_options,
        "market_share_covariate": "cdr_subscribers_per_resident",
        "market_share_default": 0.3,
        "market_share_origin_terms": (),
        "market_share_spatial": False,
        "spurious_relocations": False,
        "spurious_weight": "cdr_subscribers",
    }

    @override
    def validate(self) -> None:
        super().validate()
        spurious = self.options["spurious_relocations"]
        if spurious not in (True, False, None, "auto"):
            raise ModelConfigError(
                f"source '{self.source}': spurious_relocations={spurious!r} is not valid. "
                "Fix: true (a background of spurious relocations in every cell), 'auto' (when "
                "home detection estimated their rate) or false"
            )
        terms = self.options["market_share_origin_terms"]
        if isinstance(terms, str) or not all(isinstance(t, str) for t in terms):
            raise ModelConfigError(
                f"source '{self.source}': market_share_origin_terms={terms!r} must be a list of "
                "unit variable names. Fix: e.g. ['log_population']"
            )
        if not isinstance(self.options["market_share_spatial"], bool):
            raise ModelConfigError(
                f"source '{self.source}': market_share_spatial="
                f"{self.options['market_share_spatial']!r} is not valid. Fix: true (unit "
                "effects smoothed over neighbouring units of a country, BYM2) or false"
            )
        share = self.options["market_share_default"]
        if not 0.0 < share < 1.0:
            raise ModelConfigError(
                f"source '{self.source}': market_share_default={share} must lie in (0, 1). "
                "Fix: e.g. 0.3"
            )

    def node(self, name: str) -> str:
        """Node name of a CDR parameter: ``market_share`` for ``cdr``, else suffixed."""
        return name if self.source == "cdr" else f"{name}_{self.source}"

    @staticmethod
    @override
    def n_periods(data: xr.Dataset, source: str) -> int:
        flow = data.get(f"flow_{source}")
        return int(data.sizes["period"]) if flow is not None and "period" in flow.dims else 1

    def _covariate(self, data: xr.Dataset | None) -> np.ndarray | None:
        """Return the penetration covariate over ``data.unit`` (None when not used or absent)."""
        name = self.options["market_share_covariate"]
        if data is None or not name or name not in data or data[name].dims != ("unit",):
            return None
        values = np.asarray(data[name].values, dtype=float)
        return values if (np.isfinite(values) & (values > 0)).any() else None

    @override
    def nodes(self, data: xr.Dataset | None = None) -> list[str]:
        nodes = [
            self.node("market_share_level"),
            self.node("market_share_country"),
            self.node("sigma_market_share"),
        ]
        if data is None or self._covariate(data) is not None:
            nodes.append(self.node("market_share_slope"))
        if self.options["market_share_origin_terms"]:
            nodes.append(self.node("market_share_origin_slope"))
        if self.options["market_share_spatial"]:
            nodes.append(self.node("market_share_spatial_fraction"))
        nodes.append(self.node("period_scale"))
        if data is None or self.n_periods(data, self.source) > 1:
            nodes.append(self.node("period_effect"))
        if self._spurious_on(data):
            nodes.append(self.node("spurious_rate"))
        return nodes + super().nodes(data)

    def _spurious_estimate(self, data: xr.Dataset | None) -> float | None:
        """Home detection's spurious moves per subscriber-period pair (``flow_<source>.attrs``)."""
        flow = None if data is None else data.get(f"flow_{self.source}")
        rate = None if flow is None else flow.attrs.get("spurious_rate")
        return float(rate) if rate is not None and np.isfinite(rate) and rate > 0 else None

    def _spurious_on(self, data: xr.Dataset | None) -> bool:
        """Whether the cells get the background of spurious relocations."""
        spurious = self.options["spurious_relocations"]
        if spurious == "auto":
            return data is None or self._spurious_estimate(data) is not None
        return bool(spurious)

    @override
    def data_priors(self, data: xr.Dataset) -> dict[str, Any]:
        """``spurious_rate`` centred on home detection's estimate, when there is one."""
        rate = self._spurious_estimate(data)
        if rate is None or not self._spurious_on(data):
            return {}
        return {
            self.node("spurious_rate"): {
                "dist": "LogNormal",
                "mu": float(np.log(rate)),
                "sigma": SPURIOUS_RATE_SDLOG,
            }
        }

    def spurious_weights(self, data: xr.Dataset) -> np.ndarray:
        """Return subscribers with a home per unit (``(unit,)``): where spurious moves start, end.

        Read from the unit variable ``spurious_weight`` (``cdr_subscribers``); a
        covered unit without a value (withheld as small) gets its country's median
        subscribers per resident times its population (else the country's median
        count). Units the source does not cover get 0.
        """
        name = self.options["spurious_weight"]
        if name not in data or data[name].dims != ("unit",):
            raise ModelConfigError(
                f"source '{self.source}': spurious_relocations needs the unit variable "
                f"'{name}' (subscribers with a home per unit) in the dataset. Fix: prepare the "
                "CDR from the event log (it writes cdr_subscribers), add the variable, or set "
                "spurious_weight to one the dataset has"
            )
        cells = read_cells(data, self.source)
        covered = np.zeros(int(data.sizes["unit"]), dtype=bool)
        covered[cells.origin_idx] = True
        covered[cells.dest_idx] = True
        weight = np.asarray(data[name].values, dtype=float)
        weight = np.where(np.isfinite(weight) & (weight > 0), weight, np.nan)
        countries = np.asarray(data["country"].values).astype(str)
        pop = np.asarray(data["population"].values, dtype=float) if "population" in data else None
        for c in np.unique(countries[covered]):
            here = covered & (countries == c)
            gap = here & np.isnan(weight)
            if not gap.any():
                continue
            known = here & ~np.isnan(weight)
            if pop is not None and (known & (pop > 0)).any() and (pop[gap] > 0).all():
                weight[gap] = np.median(weight[known] / pop[known]) * pop[gap]
            elif known.any():
                weight[gap] = np.median(weight[known])
        if np.isnan(weight[covered]).all():
            raise ModelConfigError(
                f"source '{self.source}': '{name}' has no value in any unit the source covers. "
                "Fix: give subscribers with a home per unit, or spurious_relocations=false"
            )
        weight = np.where(covered, weight, 0.0)
        return np.nan_to_num(weight, nan=float(np.nanmin(weight[covered])))

    def _background_const(self, data: xr.Dataset, origin, dest, exposure) -> np.ndarray:
        """``log(S_i S_j / sum S) + log exposure`` of cells (floored: a unit without subscribers)."""
        cached = getattr(self, "_weights", None)
        if cached is None or cached[0] is not data:  # once per dataset, not per block of cells
            cached = self._weights = (data, self.spurious_weights(data))
        weight = cached[1]
        with np.errstate(divide="ignore"):
            const = (
                np.log(weight[origin])
                + np.log(weight[dest])
                - np.log(weight.sum())
                + np.log(exposure)
            )
        return np.maximum(const, -50.0)

    @override
    def _log_background(self, build: Build, cells: Cells) -> Any:
        self._log_spurious = None
        if not self._spurious_on(build.data):
            if self.options["spurious_relocations"] == "auto":
                logger.info(
                    "source '%s': spurious_relocations='auto' but flow_%s has no estimate of "
                    "the spurious-move rate (it comes from home detection on an event log): "
                    "no background of spurious relocations",
                    self.source,
                    self.source,
                )
            return None
        if cells.aggregated and self.options["spurious_relocations"] == "auto":
            return None
        if cells.aggregated:
            raise ModelConfigError(
                f"source '{self.source}': spurious_relocations needs cells of single pairs. "
                "Fix: spurious_relocations=false for aggregated CDR cells"
            )
        estimate = self._spurious_estimate(build.data)
        logger.info(
            "source '%s': background of spurious relocations, spurious_rate prior %s",
            self.source,
            build.prior.priors.get(self.node("spurious_rate")),
        )
        if estimate is None:
            logger.info("  (home detection gave no estimate: the default prior)")
        self._log_spurious = pt.log(build.prior(self.node("spurious_rate")))
        # kept for the totals' moments of the same cells (add): built once
        self._own_background = self._background(
            build.data, cells.origin_idx, cells.dest_idx, cells.exposure
        )
        return self._own_background

    def _background(self, data: xr.Dataset, origin, dest, exposure) -> Any:
        """Log expected spurious relocations of cells: ``log rho + log(S_i S_j / S)``."""
        log_rate = getattr(self, "_log_spurious", None)
        if log_rate is None:
            return None
        return log_rate + self._background_const(data, origin, dest, exposure)

    @override
    def log_background_draws(self, posterior, data, cells):
        name = self.node("spurious_rate")
        if name not in posterior:
            return None
        const = self._background_const(data, cells.origin_idx, cells.dest_idx, cells.exposure)
        return np.log(stack_samples(posterior[name]))[:, None] + const[None, :]

    @override
    def default_priors(self) -> dict[str, Any]:
        return {self.node(k): v for k, v in CDR_PRIORS.items()} | super().default_priors()

    def market_share_design(self, data: xr.Dataset, units: np.ndarray) -> dict[str, Any]:
        """How the penetration covariate enters the market share of the units ``units``.

        Parameters
        ----------
        data
            The FlowDataset.
        units
            Positions into ``data.unit`` of the CDR origin units.

        Returns
        -------
        dict
            ``centre`` (per unit: the logit level :math:`m_{c(i)}` of its country),
            ``z`` (per unit: the covariate standardised within its country, 0 where
            missing or without a covariate), ``scale`` (``"logit"``, ``"log"`` or
            None: how the covariate was transformed), ``level`` (``"covariate"``
            when the country means give the level, else ``"default"``), ``link``
            (the scale of the units' deviations from their country's level:
            ``"logit"`` with a covariate that reads as a share, else ``"log"``) and
            ``n_covariate`` (units with a usable value); ``origin_terms`` (the
            ``market_share_origin_terms``) and ``x`` (``(unit, term)``: each term
            standardised within its country the same way, 0 where missing).
        """
        default = float(special.logit(self.options["market_share_default"]))
        n = len(units)
        country = np.asarray(data["country"].values).astype(str)[units]
        terms = [str(t) for t in self.options["market_share_origin_terms"]]
        x = np.zeros((n, len(terms)))
        for k, term in enumerate(terms):
            col = unit_variable(data, term)[units]
            x[:, k], _ = _within_country_z(col, country, np.isfinite(col))
        out: dict[str, Any] = {
            "centre": np.full(n, default),
            "z": np.zeros(n),
            "scale": None,
            "level": "default",
            "link": "log",
            "n_covariate": 0,
            "origin_terms": terms,
            "x": x,
        }
        values = self._covariate(data)
        if values is None:
            return out
        v = values[units]
        ok = np.isfinite(v) & (v > 0)
        if not ok.any():
            return out
        scale = "logit" if np.all(v[ok] < 1.0) else "log"
        g = np.full(n, np.nan)
        g[ok] = special.logit(v[ok]) if scale == "logit" else np.log(v[ok])
        out["z"], means = _within_country_z(g, country, ok)
        out.update(scale=scale, n_covariate=int(ok.sum()))
        lo, hi = special.logit(SHARE_LEVEL_RANGE[0]), special.logit(SHARE_LEVEL_RANGE[1])
        if scale == "logit" and bool(((means >= lo) & (means <= hi)).all()):
            level = means.reindex(country).to_numpy()
            out["centre"] = np.where(np.isnan(level), default, level)
            out["level"] = "covariate"
            out["link"] = "logit"
        return out

    def market_share_centre(self, data: xr.Dataset, units: np.ndarray) -> np.ndarray:
        r"""Prior centre (log scale) of the market share of each unit position in ``units``.

        The country level :math:`\log \operatorname{expit}(m_{c(i)})` plus the
        covariate's shape at the prior mean of the slope, under the ceiling: the log
        share of a unit at zero country offset and unit effect.
        """
        design = self.market_share_design(data, units)
        slope = CDR_PRIORS["market_share_slope"]["mu"] if design["scale"] else 0.0
        if design["link"] == "logit":
            return special.log_expit(design["centre"] + slope * design["z"])
        return share_ceiling(special.log_expit(design["centre"]) + slope * design["z"])

    # ------------------------------------------------------------------ build
    @override
    def latent_pairs(self, data: xr.Dataset, cells: Cells) -> tuple[np.ndarray, np.ndarray]:
        o, d = [cells.origin_idx], [cells.dest_idx]
        for total in self.total_cells(data, cells).values():
            o.append(total.origin_idx)
            d.append(total.dest_idx)
        return np.concatenate(o), np.concatenate(d)

    @override
    def latent_rows(self, data, cells, window):
        o, d, t = [cells.origin_idx], [cells.dest_idx], [cells.latent_period]
        for total in self.total_cells(data, cells).values():
            o.append(total.origin_idx)
            d.append(total.dest_idx)
            t.append(window(total)[0])
        return np.concatenate(o), np.concatenate(d), np.concatenate(t)

    def _scale(self, build: Build, cells: Cells) -> tuple[Any, Any]:
        self._share = self._add_scaling(build, cells)
        _, cell_scale = super()._scale(build, cells)
        self._member_scale = self._share(cells.origin_idx, cells.period_idx)
        self._cell_scale = cell_scale
        return self._member_scale, cell_scale

    def _scale_linear(self, build: Build, cells: Cells, y: np.ndarray) -> Any:
        units = self._units
        u_idx = np.searchsorted(units, cells.origin_idx)
        out = pt.dot(np.bincount(u_idx, weights=y, minlength=len(units)), self._log_share)
        if cells.period_idx is None:
            return out + float(y.sum()) * self._log_level
        n_t = int(build.data.sizes["period"])
        return out + pt.dot(np.bincount(cells.period_idx, weights=y, minlength=n_t), self._log_pe)

    def _spatial_effect(self, build: Build, units: np.ndarray, z: Any, sigma: Any) -> Any:
        """BYM2 unit effects: ``sqrt(1 - rho) z + sqrt(rho) u*`` (:mod:`flowmodel.models.spatial`).

        ``u*`` is the scaled ICAR field on the neighbour graph of the CDR origin units
        within each country (``contiguous``), non-centred through its exact basis;
        ``rho`` is ``market_share_spatial_fraction``. Registers
        ``market_share_spatial`` (the spatial part of the log, or logit, share per unit).
        """
        from flowmodel.models.spatial import icar_basis, unit_adjacency

        adjacency = unit_adjacency(build.data, units)
        if not adjacency.any():
            raise ModelConfigError(
                f"source '{self.source}': market_share_spatial=true, but no two CDR origin "
                "units of a country are neighbours ('contiguous'), so there is nothing to "
                "smooth over. Fix: market_share_spatial=false"
            )
        basis, info = icar_basis(adjacency)
        self._spatial_info = info  # recorded in fit_meta["observations"][source]
        logger.info(
            "%s: market shares smoothed over %d group(s) of neighbouring units (largest %d), "
            "%d unit(s) without a neighbour",
            self.source,
            info["components"],
            info["largest"],
            info["isolated"],
        )
        model = pm.modelcontext(None)
        basis_dim = self.node("market_spatial_basis")
        model.add_coord(basis_dim, np.arange(basis.shape[1]))
        w = pm.Normal(self.node("market_share_spatial_z"), 0.0, 1.0, dims=basis_dim)
        rho = build.prior(self.node("market_share_spatial_fraction"))
        field = pt.dot(basis, w)
        pm.Deterministic(
            self.node("market_share_spatial"),
            sigma * pt.sqrt(rho) * field,
            dims=self.node("market_unit"),
        )
        return pt.sqrt(1.0 - rho) * z + pt.sqrt(rho) * field

    def _add_scaling(self, build: Build, cells: Cells) -> Any:
        """Register ``market_share``, ``period_scale`` (and ``period_effect``).

        Returns a function ``(origin_idx, period_idx) -> log scaling`` of any CDR
        cells whose origins are among the origins of ``cells``.
        """
        data = build.data
        priors = build.prior.priors
        units = np.unique(cells.origin_idx)
        countries_all = np.asarray(data["country"].values).astype(str)
        countries, country_pos = np.unique(countries_all[units], return_inverse=True)
        unit_dim = self.node("market_unit")
        country_dim = self.node("market_country")
        model = pm.modelcontext(None)
        model.add_coord(unit_dim, np.asarray(data["unit"].values).astype(str)[units])
        model.add_coord(country_dim, countries)
        design = self.market_share_design(data, units)
        self._design = {k: v for k, v in design.items() if k not in ("centre", "z", "x")}
        off_name = self.node("market_share_country")
        off_mu, off_sd = _normal_prior(priors, off_name, "the country offsets of the logit")
        scale_name = self.node("period_scale")
        log_level = pt.log(build.prior(scale_name))
        # The counts pin each country's product share x period_scale; how it splits is the
        # priors' (a ridge that NUTS crosses slowly). Sampling the offsets relative to the log
        # period scale, raw_c | kappa ~ N(mu + g_c (log kappa - ref), sd) and
        # delta_c = raw_c - g_c (log kappa - ref), leaves the prior exactly as stated (delta_c
        # ~ N(mu, sd), independent of kappa; unit Jacobian) and lines raw_c up with what the
        # data pin: g_c = d logit s / d log s = 1 / (1 - s) at the country's prior share. The
        # common level takes the mean slope, each country's offset the rest.
        ref = _log_median(priors.get(scale_name))
        level_name = self.node("market_share_level")
        lvl_mu, lvl_sd = _normal_prior(priors, level_name, "the common level of the logit")
        first = np.unique(country_pos, return_index=True)[1]
        prior_share = special.expit(design["centre"][first] + lvl_mu + off_mu)
        g = 1.0 / (1.0 - prior_share)
        g_mean = float(g.mean())
        # the level common to every country (the operator's typical share and the detection
        # rate of home detection, which are the same everywhere): without it, independent
        # country offsets would average the unknown common level away
        shift = g_mean * (log_level - ref)
        level_raw = pm.Normal(f"{level_name}_raw", lvl_mu + shift, lvl_sd)
        pm.Deterministic(level_name, level_raw - shift)
        # each country's logit level gamma + delta_c, centred on the common level: the data pin
        # it (relative to the period scale), and then the common level is the prior's and the
        # countries' (a centred hierarchy: no ridge between gamma and the offsets)
        lam = log_level - ref
        raw = pm.Normal(
            f"{off_name}_raw", off_mu + level_raw + (g - g_mean) * lam, off_sd, dims=country_dim
        )
        pm.Deterministic(off_name, raw - level_raw - (g - g_mean) * lam, dims=country_dim)
        # the unit effects are non-centred: most cells are redacted, so each unit's share is
        # weakly identified and its effect stays near its prior
        sigma = build.prior(self.node("sigma_market_share"))
        z = pm.Normal(self.node("market_share_z"), 0.0, 1.0, dims=unit_dim)
        if self.options["market_share_spatial"]:
            effect = self._spatial_effect(build, units, z, sigma)
        else:
            effect = z
        country_level = raw - g * lam  # gamma + delta_c
        level = design["centre"] + country_level[country_pos]
        deviation = sigma * effect
        if design["scale"] is not None:
            slope = build.prior(self.node("market_share_slope"))
            deviation = deviation + slope * design["z"]
        if design["origin_terms"]:
            term_dim = self.node("market_origin_term")
            model.add_coord(term_dim, design["origin_terms"])
            origin_slope = build.prior(self.node("market_share_origin_slope"), dims=term_dim)
            deviation = deviation + pt.dot(design["x"], origin_slope)
        if design["link"] == "logit":
            # a covariate that reads as a share gives the level and goes with the share's logit
            log_share = -pt.softplus(-(level + deviation))  # log(sigmoid(x)), stable
        else:
            # log s_i = ceiling(log expit(level_c) + deviation_i): the deviations are on the log
            # scale of the share, as the counts (and a subscribers-per-resident covariate,
            # which is proportional to the share) measure them; see share_ceiling
            log_share = share_ceiling(-pt.softplus(-level) + deviation)
        pm.Deterministic(self.node("market_share"), pt.exp(log_share), dims=unit_dim)
        self._units, self._log_share, self._log_level = units, log_share, log_level
        if cells.period_idx is None:
            self._log_pe = None

            def scale_flat(origin_idx: np.ndarray, period_idx: np.ndarray | None) -> Any:
                return log_share[np.searchsorted(units, origin_idx)] + log_level

            return scale_flat
        if "period" not in model.coords:
            model.add_coord("period", np.asarray(data["period"].values).astype(str))
        log_pe = pt.zeros(int(data.sizes["period"])) + log_level
        if self.n_periods(data, self.source) > 1:
            spec = dict(priors[self.node("period_effect")])
            if spec.get("dist", "ZeroSumNormal") != "ZeroSumNormal":
                raise ModelConfigError(
                    f"prior '{self.node('period_effect')}' must be a ZeroSumNormal of the "
                    "log deviations (their level is period_scale). "
                    "Fix: {'dist': 'ZeroSumNormal', 'sigma': 0.5}"
                )
            # iid normals projected onto the zero-sum subspace: exactly ZeroSumNormal(sigma)
            # (the leftover mean direction keeps its N(0, sigma²/T) prior); written out
            # because pm.ZeroSumNormal's transform breaks pm.fit (ADVI) initial points
            raw = pm.Normal(
                self.node("period_deviation_raw"),
                0.0,
                float(spec.get("sigma", 0.5)),
                dims="period",
            )
            deviation = pm.Deterministic(
                self.node("period_deviation"), raw - pt.mean(raw), dims="period"
            )
            log_pe = log_pe + deviation
        pm.Deterministic(self.node("period_effect"), pt.exp(log_pe), dims="period")
        self._log_pe = log_pe

        def scale(origin_idx: np.ndarray, period_idx: np.ndarray | None) -> Any:
            return log_share[np.searchsorted(units, origin_idx)] + log_pe[period_idx]

        return scale

    @override
    def add(self, build: Build, cells: Cells) -> None:
        super().add(build, cells)
        self._totals_used: dict[str, int] = {}
        self._totals_weight = 1.0
        totals = self.total_cells(build.data, cells)
        plans = {
            kind: self._totals_plan(build.data, kind, total) for kind, total in totals.items()
        }
        plans, self._totals_weight = self._select_totals(plans)
        if not any(plan["used"].size for plan in plans.values()):
            for kind in plans:
                self._totals_used[f"{self.source}_{kind}"] = 0
            return
        if build.phi is None:
            raise ModelConfigError(
                f"source '{self.source}': the in/out totals need the negative binomial's "
                "dispersion (the moments of its redacted cells); Fix: likelihood='negbin' "
                f"(the default), or drop the {self.source}_outflow/_inflow totals"
            )
        # the redacted cells of the totals are (almost all) the source's own redacted cells:
        # their moments are built from the very expression of their censored likelihood, so
        # the compiled graph computes each cell's pmf kernel once for both
        n = int(build.data.sizes["unit"])
        n_t = int(build.data.sizes["period"]) if cells.period_idx is not None else 1
        cens = np.flatnonzero(cells.censored)
        own_ids = (cells.origin_idx[cens] * n + cells.dest_idx[cens]) * n_t + (
            cells.period_idx[cens] if cells.period_idx is not None else 0
        )
        t, log_w = build.window(cells)
        where = build.where(cells.origin_idx, cells.dest_idx, t)
        log_mu = (
            build.eta[where]
            + self._member_scale
            + log_w
            + np.log(cells.exposure)
            + self._cell_scale
        )
        if self._log_spurious is not None:
            log_mu = pt.logaddexp(log_mu, self._own_background)
        own_moments = None
        for kind, plan in plans.items():
            self._totals_used[f"{self.source}_{kind}"] = int(plan["used"].size)
            if not plan["used"].size:
                continue
            total = totals[kind]
            t_tot, log_w_tot = build.window(total)
            mean_var = []
            own = np.zeros(len(plan["open_ids"]), dtype=bool)
            pos = np.zeros(len(plan["open_ids"]), dtype=np.int64)
            if own_ids.size:
                order = np.argsort(own_ids, kind="stable")
                at = np.minimum(np.searchsorted(own_ids[order], plan["open_ids"]), len(order) - 1)
                pos = order[at]
                own = plan["censored"] & (own_ids[pos] == plan["open_ids"])
            if own.any():
                if own_moments is None:
                    own_moments = truncated_nb_moments(
                        pt.exp(log_mu[cens]), build.phi, cells.upper[cens], cells.lower[cens]
                    )
                mean_var.append((own, own_moments[0][pos[own]], own_moments[1][pos[own]]))
            rest = np.flatnonzero(~own)
            if rest.size:
                idx = plan["cells"][rest]
                where_t = build.where(
                    total.origin_idx[idx],
                    total.dest_idx[idx],
                    None if t_tot is None else t_tot[idx],
                )
                period = None if total.period_idx is None else total.period_idx[idx]
                log_cell = (
                    build.eta[where_t]
                    + (log_w_tot[idx] if t_tot is not None else 0.0)
                    + self._share(total.origin_idx[idx], period)
                    + np.log(total.exposure[idx])
                    + self._cell_scale
                )
                background = self._background(
                    build.data, total.origin_idx[idx], total.dest_idx[idx], total.exposure[idx]
                )
                if background is not None:
                    log_cell = pt.logaddexp(log_cell, background)
                mu_rest = pt.exp(log_cell)
                red = plan["censored"][rest]
                if red.any():
                    m_c, v_c = truncated_nb_moments(
                        mu_rest[np.flatnonzero(red)] if not red.all() else mu_rest,
                        build.phi,
                        plan["upper"][rest][red],
                        plan["lower"][rest][red],
                    )
                    sel = np.zeros(len(own), dtype=bool)
                    sel[rest[red]] = True
                    mean_var.append((sel, m_c, v_c))
                if not red.all():
                    m_m = mu_rest[np.flatnonzero(~red)] if red.any() else mu_rest
                    sel = np.zeros(len(own), dtype=bool)
                    sel[rest[~red]] = True
                    mean_var.append((sel, m_m, m_m + m_m**2 / build.phi))
            self._add_totals_likelihood(kind, plan, mean_var, self._totals_weight)

    @staticmethod
    def _select_totals(
        plans: Mapping[str, dict[str, Any]],
    ) -> tuple[dict[str, dict[str, Any]], float]:
        """Keep the totals whose open cells no total of the other kind already sums.

        An outflow and an inflow remainder that share a redacted cell would count
        it twice. Released totals are kept first (the operator releases an inflow
        total only when none of its redacted cells is in a released outflow row,
        so they rarely share; when they do, both kinds get weight 1/2, a composite
        likelihood); then the bounds of suppressed outflow totals, then those of
        inflow totals, each only when it shares no open cell with a total already
        kept. Returns the restricted plans and the weight.
        """
        if len(plans) < 2:
            return dict(plans), 1.0
        kinds = list(plans)

        def cells_of(kind: str, equations: np.ndarray) -> np.ndarray:
            plan = plans[kind]
            return plan["open_ids"][np.isin(plan["key"], equations)]

        kept = {k: plans[k]["obs"] for k in kinds}
        shared = np.intersect1d(
            cells_of(kinds[0], kept[kinds[0]]), cells_of(kinds[1], kept[kinds[1]])
        )
        weight = 0.5 if shared.size else 1.0
        for kind, other in ((kinds[0], kinds[1]), (kinds[1], kinds[0])):
            plan = plans[kind]
            taken = cells_of(other, kept[other])
            clash = np.unique(plan["key"][np.isin(plan["open_ids"], taken)])
            cen = np.setdiff1d(plan["cen"], clash)
            kept[kind] = np.union1d(kept[kind], cen)
        out = {}
        for kind in kinds:
            plan = dict(plans[kind])
            keep = np.isin(plan["key"], kept[kind])
            for name in ("cells", "key", "censored", "upper", "lower", "open_ids"):
                plan[name] = plan[name][keep]
            plan["cen"] = np.intersect1d(plan["cen"], kept[kind])
            plan["used"] = np.union1d(plan["obs"], plan["cen"])
            out[kind] = plan
        return out, weight

    @override
    def state(self, data: xr.Dataset, cells: Cells) -> dict[str, Any]:
        out = super().state(data, cells)
        used = dict(getattr(self, "_totals_used", {}))
        out["totals"] = sorted(k.removeprefix(f"{self.source}_") for k, n in used.items() if n)
        out["n_totals"] = used
        out["totals_weight"] = float(getattr(self, "_totals_weight", 1.0))
        if getattr(self, "_design", None) is not None:
            out["market_share"] = dict(self._design)
            if getattr(self, "_spatial_info", None) is not None:
                out["market_share"]["spatial"] = dict(self._spatial_info)
        if self._spurious_on(data):
            out["spurious_relocations"] = {"estimate": self._spurious_estimate(data)}
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
        o_pos = unit_positions(data, data["origin"].values)
        d_pos = unit_positions(data, data["destination"].values)
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
                "the flow has a period dim, else ('unit',). Fix: build them with "
                "flowmodel.dataset.totals_to_dataset()"
            )
        return np.asarray(var.transpose("unit", ...).values, dtype=float).reshape(n, -1)

    def total_cells(self, data: xr.Dataset, cells: Cells) -> dict[str, Cells]:
        """Cells each in/out total of the source sums over, per kind present in ``data``.

        The universe of a total (attr ``universe`` of ``<source>_outflow``, default
        ``"covered"``): origins = the CDR origin units (those with a market share),
        destinations = every unit in a CDR cell (``"within"``: of the same
        country), diagonal excluded. Every (origin, destination, period) cell of
        the universe is released (``y``), censored (``upper``) or missing (both
        NaN: e.g. held out; it then enters the totals with its full distribution).
        """
        source = self.source
        has_period = cells.period_idx is not None
        kinds = []
        for kind in TOTAL_KINDS:
            for name in (f"{source}_{kind}", f"{source}_{kind}_max"):
                if np.isfinite(self._unit_period_values(data, name, has_period)).any():
                    kinds.append(kind)
                    break
        if not kinds:
            return {}
        if is_sparse(data):
            return self._sparse_total_cells(data, cells, kinds)
        n = int(data.sizes["unit"])
        flow = self._dense_cells(data, f"flow_{source}")
        upper = self._dense_cells(data, f"flow_{source}_max")
        lower = self._dense_cells(data, f"flow_{source}_min")
        n_t = flow.shape[2] if has_period else 1
        origins = np.unique(cells.origin_idx)
        covered = np.unique(np.concatenate([cells.origin_idx, cells.dest_idx]))
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
            out[kind] = Cells(
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

    @staticmethod
    def _pair_cells(data: xr.Dataset, name: str, n_t: int) -> np.ndarray:
        """Return a sparse pair variable as ``(pair, period)`` values (all NaN when absent)."""
        var = data.get(name)
        if var is None:
            return np.full((int(data.sizes["pair"]), n_t), np.nan)
        values = np.asarray(var.transpose("pair", ...).values, dtype=float)
        return values.reshape(values.shape[0], -1)

    def _universe(self, data: xr.Dataset, kind: str) -> str:
        attrs = data[f"{self.source}_{kind}"].attrs if f"{self.source}_{kind}" in data else {}
        universe = attrs.get("universe", "covered")
        if universe not in TOTAL_UNIVERSES:
            raise DataContractError(
                f"'{self.source}_{kind}' has universe={universe!r}; "
                f"Fix: one of {list(TOTAL_UNIVERSES)}"
            )
        return str(universe)

    def _sparse_total_cells(
        self, data: xr.Dataset, cells: Cells, kinds: Sequence[str]
    ) -> dict[str, Cells]:
        """:meth:`total_cells` of a sparse pair set, from its ``pair`` dim only (no N x N).

        The cells of a total are the set's pairs in its universe, in the order of the
        dense form (origin, destination, then period). Every pair of the universe of a
        reported total must be in the set: one outside it would be a cell of the total
        with no data, which the dense form sums with its full distribution.

        Raises
        ------
        DataContractError
            When a total with a value or a bound sums pairs outside the set.
        """
        source = self.source
        has_period = cells.period_idx is not None
        n = int(data.sizes["unit"])
        n_t = int(data.sizes["period"]) if has_period else 1
        o_all = unit_positions(data, data["origin"].values).astype(np.int64)
        d_all = unit_positions(data, data["destination"].values).astype(np.int64)
        origin_units = np.zeros(n, dtype=bool)
        origin_units[cells.origin_idx] = True
        covered_units = origin_units.copy()
        covered_units[cells.dest_idx] = True
        country = np.asarray(data["country"].values).astype(str)
        units = np.asarray(data["unit"].values).astype(str)
        flow = self._pair_cells(data, f"flow_{source}", n_t)
        upper = self._pair_cells(data, f"flow_{source}_max", n_t)
        lower = self._pair_cells(data, f"flow_{source}_min", n_t)
        exp_var = data.get(f"exposure_{source}")
        out = {}
        for kind in kinds:
            universe = self._universe(data, kind)
            reported = np.zeros(n, dtype=bool)
            for name in (f"{source}_{kind}", f"{source}_{kind}_max"):
                values = self._unit_period_values(data, name, has_period)
                reported |= np.isfinite(values).any(axis=1)
            outside = total_pairs_outside(
                o_all, d_all, kind, origin_units, covered_units, country, universe
            )
            bad = reported & (outside > 0)
            if bad.any():
                ids = units[bad]
                raise DataContractError(
                    f"source '{source}': {int(bad.sum())} '{source}_{kind}' total(s) (units "
                    f"{ids[:10].tolist()}) sum {int(outside[bad].sum())} pair(s) that are not "
                    f"in the sparse pair set; a total sums every pair of its universe "
                    f"({universe!r}), and a pair outside the set would be one of its cells "
                    "without data. Fix: build the pair set from the dense dataset with "
                    "flowmodel.pairs.sparse_pairs(ds, k=..., include_observed=True), which "
                    f"keeps every pair a reported total sums, or drop the {source}_{kind} "
                    "totals from the dataset"
                )
            p = np.flatnonzero(
                in_total_universe(o_all, d_all, origin_units, covered_units, country, universe)
            )
            p = p[np.lexsort((d_all[p], o_all[p]))]
            pp = np.repeat(p, n_t)
            o, d = o_all[pp], d_all[pp]
            t = np.tile(np.arange(n_t), len(p))
            ex = np.ones(len(o))
            if exp_var is not None and exp_var.dims == ("unit",):
                ex = np.asarray(exp_var.values, dtype=float)[o]
            y = flow[pp, t]
            out[kind] = Cells(
                origin_idx=o.astype(np.int64),
                dest_idx=d.astype(np.int64),
                y=y,
                exposure=ex,
                upper=upper[pp, t],
                period_idx=t.astype(np.int64) if has_period else None,
                source=f"{source}:{kind}",
                lower=np.where(np.isnan(y), lower[pp, t], 0.0),
            )
        return out

    def _totals_plan(self, data: xr.Dataset, kind: str, cells: Cells) -> dict[str, Any]:
        """Which totals of ``kind`` inform the model, and the open cells they sum (numpy).

        Returns the totals used (``used``: positions in the flattened ``(unit,
        period)`` array), released (``obs``) or suppressed (``cen``), their
        remainders or bounds, and the open (redacted or missing) cells of ``cells``
        they sum (``cells``: positions; ``key``: their total; ``censored``: which of
        them are redacted; ``open_ids``: ``(origin, destination, period)`` codes).
        A suppressed total whose bound is no tighter than its redacted cells' own
        bounds (the operator's rule: released cells + 15 x redacted cells) says
        nothing and is left out.
        """
        source = self.source
        has_period = cells.period_idx is not None
        n = int(data.sizes["unit"])
        n_t = int(data.sizes["period"]) if has_period else 1
        total = self._unit_period_values(data, f"{source}_{kind}", has_period).ravel()
        bound = self._unit_period_values(data, f"{source}_{kind}_max", has_period).ravel()
        side = cells.origin_idx if kind == "outflow" else cells.dest_idx
        key = side * n_t + (cells.period_idx if has_period else 0)
        released = np.isfinite(cells.y)
        censored = ~released & np.isfinite(cells.upper)
        missing = ~released & ~censored
        rel_sum = np.bincount(key[released], cells.y[released], minlength=n * n_t)
        n_open = np.bincount(key[~released], minlength=n * n_t)
        n_missing = np.bincount(key[missing], minlength=n * n_t)
        top = np.bincount(
            key[censored], np.floor(cells.upper[censored]), minlength=n * n_t
        )  # the largest sum the redacted cells can reach
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
        use_cen &= (n_missing > 0) | (bound - rel_sum < top)
        used = np.flatnonzero(use_obs | use_cen)
        open_cells = np.flatnonzero(~released & np.isin(key, used))
        t = cells.period_idx[open_cells] if has_period else np.zeros(len(open_cells), np.int64)
        return {
            "n": n * n_t,
            "used": used,
            "obs": np.flatnonzero(use_obs),
            "cen": np.flatnonzero(use_cen),
            "remainder": remainder,
            "bound_left": bound - rel_sum,
            "cells": open_cells,
            "key": key[open_cells],
            "censored": censored[open_cells],
            "upper": cells.upper[open_cells],
            "lower": cells.lower[open_cells],
            "open_ids": (cells.origin_idx[open_cells] * n + cells.dest_idx[open_cells]) * n_t + t,
        }

    def _add_totals_likelihood(
        self,
        kind: str,
        plan: Mapping[str, Any],
        pieces: Sequence[tuple[np.ndarray, Any, Any]],
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
        ``pieces`` are ``(mask over the plan's open cells, mean, variance)``
        (:meth:`_totals_plan`); ``weight`` multiplies the log-likelihood (``1/2``
        when released outflow and inflow totals share an open cell: a composite
        likelihood that would otherwise count it twice).
        """
        n_keys = plan["n"]
        key = plan["key"]
        mean = pt.zeros(n_keys)
        var = pt.zeros(n_keys)
        for mask, m_c, v_c in pieces:
            mean = pt.inc_subtensor(mean[key[mask]], m_c)
            var = pt.inc_subtensor(var[key[mask]], v_c)
        sd = pt.sqrt(var + 1.0 / 12.0)
        logp = pt.zeros(())
        if plan["obs"].size:
            sel = plan["obs"]
            dist = pm.Normal.dist(mu=mean[sel], sigma=sd[sel])
            logp = logp + pm.logp(dist, plan["remainder"][sel]).sum()
        if plan["cen"].size:
            sel = plan["cen"]
            dist = pm.Normal.dist(mu=mean[sel], sigma=sd[sel])
            logp = logp + pm.logcdf(dist, plan["bound_left"][sel] + 0.5).sum()
        pm.Potential(f"{self.source}_{kind}_total", weight * logp)

    def totals_moments(self, plan: Mapping[str, Any], mu: Any, phi: Any) -> list[tuple]:
        """``pieces`` of :meth:`_add_totals_likelihood` from the open cells' expected counts."""
        censored = plan["censored"]
        out = []
        if censored.any():
            idx = np.flatnonzero(censored)
            m_c, v_c = truncated_nb_moments(
                mu[idx] if not censored.all() else mu, phi, plan["upper"][idx], plan["lower"][idx]
            )
            out.append((censored, m_c, v_c))
        if not censored.all():
            m_m = mu[np.flatnonzero(~censored)]
            out.append((~censored, m_m, m_m + m_m**2 / phi))
        return out

    # ------------------------------------------------------------------ numpy side
    @override
    def pointwise(self, posterior, data, cells, log_rate):
        """Pointwise log-likelihood, in blocks of :data:`POINTWISE_BLOCK` cells.

        A CDR source has thousands of redacted cells and the negative binomial's
        CDF of thousands of draws at each needs several temporaries of the full
        (draw, cell) size: in blocks the peak memory stays that of the result.
        """
        if cells.aggregated or cells.n <= POINTWISE_BLOCK:
            return super().pointwise(posterior, data, cells, log_rate)
        out = np.empty((_n_samples(posterior), cells.n))
        for start in range(0, cells.n, POINTWISE_BLOCK):
            block = np.zeros(cells.n, dtype=bool)
            block[start : start + POINTWISE_BLOCK] = True
            out[:, block] = super().pointwise(posterior, data, cells.subset(block), log_rate)
        return out

    @override
    def member_log_scale_draws(self, posterior, data, cells):
        share = posterior[self.node("market_share")]
        dim = self.node("market_unit")
        pos = pd.Series(np.arange(share.sizes[dim]), index=share[dim].values.astype(str))
        ids = np.asarray(data["unit"].values).astype(str)[cells.origin_idx]
        idx = pos.reindex(ids).to_numpy()
        if np.isnan(idx).any():
            raise ModelConfigError(
                f"CDR origins {sorted(set(ids[np.isnan(idx)]))[:10]} have no fitted market "
                "share. Fix: pass the dataset the model was fitted to"
            )
        log_mu = np.log(stack_samples(share))[:, idx.astype(np.int64)]
        effect = self.node("period_effect")
        if cells.period_idx is not None and effect in posterior:
            labels = np.asarray(data["period"].values).astype(str)[cells.period_idx]
            per = posterior[effect]
            p_pos = pd.Series(
                np.arange(per.sizes["period"]), index=per["period"].values.astype(str)
            )
            log_pe = np.log(stack_samples(per))
            return log_mu + log_pe[:, p_pos.reindex(labels).to_numpy().astype(np.int64)]
        scale = stack_samples(posterior[self.node("period_scale")])
        return log_mu + np.log(scale)[:, None]

    def market_share_summary(
        self, posterior: xr.Dataset, *, ci_prob: float = 0.94
    ) -> pd.DataFrame:
        """Posterior of the market share of each CDR origin unit.

        Returns
        -------
        pandas.DataFrame
            Indexed by unit id: ``mean``, ``sd``, ``eti_lo``, ``eti_hi``
            (equal-tailed ``ci_prob`` interval).
        """
        var = posterior[self.node("market_share")]
        dim = self.node("market_unit")
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


# ============================================================================ estimates
class EstimateObservation(ObservationModel):
    r"""Published estimates with standard errors (UN/World Bank tables, survey estimates).

    .. math::

        \log \hat y_c \sim \mathcal N\Big(\log\big(u_c \sum_{(i,j)\in c} e^{\eta_{ij}}\big),\
        \sigma_c^2\Big), \qquad \sigma_c^2 = \log\big(1 + (\mathrm{se}_c/\hat y_c)^2\big)

    read from ``estimate_<source>`` and ``estimate_<source>_se`` at any level
    (a country-pair table sums whole blocks of pairs; see
    :func:`flowmodel.dataset.estimates_to_dataset`).
    """

    kind = "estimates"
    default_options: ClassVar[dict[str, Any]] = {"undercount": None, "duration": None}

    @override
    def cells(self, data: xr.Dataset) -> Cells:
        cells = read_cells(data, self.source, value="estimate")
        if cells.se is None:
            raise DataContractError(
                f"estimates '{self.source}' have no standard errors 'estimate_{self.source}_se'. "
                "Fix: build them with flowmodel.dataset.estimates_to_dataset(..., se=...)"
            )
        keep = cells.observed & (cells.y > 0) & np.isfinite(cells.se) & (cells.se > 0)
        if not keep.all():
            bad = int((~keep).sum())
            raise DataContractError(
                f"estimates '{self.source}': {bad} cell(s) without a positive estimate and "
                "standard error. Fix: drop unknown cells from the table"
            )
        return cells

    @override
    def sdlog(self, cells: Cells) -> np.ndarray:
        return lognormal_sdlog(cells.y, cells.se)

    @override
    def add(self, build: Build, cells: Cells) -> None:
        t, log_w = build.window(cells)
        where = build.where(cells.origin_idx, cells.dest_idx, t)
        member_cell = cells.member_cell if cells.aggregated else np.arange(cells.n, dtype=np.int64)
        total = segment_sum(pt.exp(build.eta[where] + log_w), member_cell, cells.n)
        dim = f"cell_{self.source}"
        pm.modelcontext(None).add_coord(
            dim,
            [f"{o}>{d}" for o, d in zip(cells.origin_label, cells.destination_label, strict=True)],
        )
        pm.Deterministic(f"{self.source}_expected", total, dims=dim)
        log_mu = pt.log(total) + np.log(cells.exposure)
        for f in self._factors():
            log_mu = log_mu + f.add(cells, build.prior.priors)
        pm.Potential(
            f"y_{self.source}",
            pm.logp(pm.Normal.dist(mu=log_mu, sigma=self.sdlog(cells)), np.log(cells.y)).sum(),
        )

    @override
    def pointwise(self, posterior, data, cells, log_rate):
        from scipy import stats

        log_mu = self.cell_log_mu(posterior, data, cells, log_rate)
        return stats.norm.logpdf(np.log(cells.y)[None, :], log_mu, self.sdlog(cells)[None, :])


# ======================================================================= constrained
class ConstrainedCountObservation(CountObservation):
    r"""The constrained gravity likelihoods: (Dirichlet-)multinomial given observed margins.

    .. math::

        \text{production: } (y_{i\cdot}) \mid O_i \sim \operatorname{Mult}(O_i, \pi_{i\cdot}),
        \quad \pi_{ij} \propto \exp(\eta_{ij})

    (attraction: over origins given each destination's inflow; doubly: production
    with destination effects in eta). With ``likelihood="negbin"`` a
    Dirichlet-multinomial with concentration :math:`\phi\pi_{ij}`.
    """

    kind = "constrained"
    default_options: ClassVar[dict[str, Any]] = {
        "likelihood": "negbin",
        "constraint": "production",
    }

    @override
    def validate(self) -> None:
        super().validate()
        if self.options["constraint"] not in ("production", "attraction", "doubly"):
            raise ModelConfigError(
                f"constraint={self.options['constraint']!r}: a constrained observation needs "
                "'production', 'attraction' or 'doubly'"
            )

    @property
    @override
    def constraint(self) -> str:
        return self.options["constraint"]

    @override
    def cells(self, data: xr.Dataset) -> Cells:
        cells = read_cells(data, self.source)
        obs = cells.observed
        if not obs.all():
            margin_name = "outflow" if self.constraint != "attraction" else "inflow"
            raise ModelConfigError(
                f"constraint='{self.constraint}' cannot use the {int((~obs).sum())} censored "
                f"cell(s) of flow_{self.source} (flow_{self.source}_max): the model conditions "
                f"on each unit's observed {margin_name} total, which is unknown when one of its "
                "cells is only bounded above. Fix: use constraint='none' (censored cells enter "
                "through the count CDF), fit the source in a FusionModel, or drop the censored "
                "cells"
            )
        return cells

    @override
    def add(self, build: Build, cells: Cells) -> None:
        where = build.where(cells.origin_idx, cells.dest_idx)
        eta = build.eta[where]
        y = cells.y
        group = cells.dest_idx if self.constraint == "attraction" else cells.origin_idx
        groups, gidx = np.unique(group, return_inverse=True)
        margin = np.bincount(gidx, weights=y, minlength=len(groups))
        # multinomial coefficient log(O_i! / prod_j y_ij!): a constant, kept so the
        # Potential is the exact log pmf (comparable across likelihoods)
        log_coef = float(special.gammaln(margin + 1).sum() - special.gammaln(y + 1).sum())
        shift = pt.max(eta)
        denom = segment_sum(pt.exp(eta - shift), gidx, len(groups))
        log_denom = pt.log(denom) + shift
        if self.options["likelihood"] == "poisson":
            # Σ_i log Mult(y_i. | O_i, pi_i.), Σ y_ij log pi_ij = Xᵀy·beta - Σ_i O_i log Σ_j w_ij
            w = np.bincount(where, weights=y, minlength=build.n_pairs)
            linear = build.latent.linear(w) if build.latent.linear else pt.dot(y, eta)
            logp = linear - pt.dot(margin, log_denom) + log_coef
        else:
            # Σ_i log DirMult(y_i. | O_i, alpha_i. = phi pi_i.): one global concentration,
            # so Σ_j alpha_ij = phi for every margin (pi_i. sums to one over its pairs)
            phi = build.phi
            log_pi = eta - log_denom[gidx]
            alpha = phi * pt.exp(log_pi)
            logp = (
                len(groups) * pt.gammaln(phi)
                - pt.sum(pt.gammaln(margin + phi))
                + pt.sum(pt.gammaln(y + alpha) - pt.gammaln(alpha))
                + log_coef
            )
        pm.Potential(f"y_{self.source}", logp)
        self._groups = len(groups)

    @override
    def state(self, data, cells):
        out = super().state(data, cells)
        out["constraint_groups"] = int(getattr(self, "_groups", 0))
        return out

    @override
    def pointwise(self, posterior, data, cells, log_rate):
        raise ModelConfigError(
            f"pointwise log-likelihood of constraint='{self.constraint}' is per margin, "
            "not per pair; Fix: compare unconstrained models"
        )

    def flow_rule(self) -> ConstrainedFlows:
        """How predictions turn latent log weights into flows (normalised, times margins)."""
        return ConstrainedFlows(self.constraint, self.source)


# ============================================================================ prediction
class ExpectedFlows:
    """Prediction rule of unconstrained models: ``mu = exp(eta)``, NB/Poisson noise."""

    supports_sparse = True

    def prepare(self, ctx: Any, exposure: str | None) -> None:
        """Nothing to precompute."""

    def block(self, ctx: Any, eta: np.ndarray, rows: np.ndarray, kind: str, rng: Any) -> tuple:
        """``(mu, draws)`` of a dense block ``(S, rows, N)`` (population scale x exposure)."""
        mu = np.exp(eta)
        scale = ctx.exposure_unit[rows][None, :, None]
        if ctx.exposure_pair is not None:
            scale = np.asarray(
                ctx.exposure_pair.isel(origin=slice(int(rows[0]), int(rows[-1]) + 1)).values,
                dtype=float,
            )[None]
        mu = (mu * scale).astype(ctx.dtype, copy=False)
        if kind == "mean":
            return mu, mu
        return mu, ctx.noise(mu, rows)


class ConstrainedFlows(ExpectedFlows):
    """Prediction rule of constrained gravity models: shares of observed margins."""

    supports_sparse = False

    def __init__(self, constraint: str, source: str) -> None:
        self.constraint = constraint
        self.source = source

    def prepare(self, ctx: Any, exposure: str | None) -> None:
        """Observed margins (population scale unless ``exposure``); attraction denominators."""
        data = ctx.data
        flow = data[f"flow_{self.source}"].transpose("origin", "destination", ...)
        extra = [d for d in flow.dims if d not in ("origin", "destination")]
        if extra:
            flow = flow.sum(extra, min_count=1)
        y = np.asarray(flow.values, dtype=float)
        exp_name = f"exposure_{self.source}"
        e_unit = np.ones(ctx.n)
        if exp_name in data and data[exp_name].dims == ("unit",):
            e_unit = np.asarray(data[exp_name].values, dtype=float)
        axis = 0 if self.constraint == "attraction" else 1
        observed_any = np.any(~np.isnan(y), axis=axis)
        margin = np.where(observed_any, np.nansum(y, axis=axis), np.nan)
        self.margin_sample = margin
        if self.constraint != "attraction":
            # sampled outflow -> population outflow, unless the sample scale is asked for
            self.margin = margin / e_unit if exposure is None else margin
        else:
            self.margin = margin
            total = np.zeros((ctx.n_samples, ctx.n))
            for a, b in ctx.blocks():
                total += np.nansum(np.exp(ctx.block_log_rate(a, b)), axis=1)
            self.attraction_total = total

    def block(self, ctx, eta, rows, kind, rng):
        phi = ctx.params.get("phi")
        if self.constraint == "attraction":
            pi = np.exp(eta) / self.attraction_total[:, None, :]
            mu = (pi * self.margin[None, None, :]).astype(ctx.dtype, copy=False)
            if kind == "mean":
                return mu, mu
            return mu, ctx.noise(mu, rows, phi=None)
        # production / doubly: normalise each origin row over destinations
        w = np.exp(eta - np.nanmax(eta, axis=2, keepdims=True))
        w = np.nan_to_num(w)
        pi = w / w.sum(axis=2, keepdims=True)
        margin = self.margin[rows]
        mu = (pi * margin[None, :, None]).astype(ctx.dtype, copy=False)
        if kind == "mean":
            return mu, mu
        n_sample = self.margin_sample[rows]
        draws = np.full(mu.shape, np.nan, dtype=ctx.dtype)
        for r, row in enumerate(rows):
            if not np.isfinite(n_sample[r]):
                continue
            g = ctx.row_rng(int(row))
            p = pi[:, r, :]
            if phi is not None:
                alpha = np.maximum(phi[:, None] * p, 1e-12)
                gam = g.standard_gamma(alpha)
                gam[p == 0] = 0
                p = gam / gam.sum(axis=1, keepdims=True)
            counts = np.full(p.shape[0], int(n_sample[r]))
            sampled = g.multinomial(counts, p).astype(ctx.dtype)
            factor = margin[r] / n_sample[r] if n_sample[r] > 0 else margin[r]
            draws[:, r, :] = sampled * factor
        draws[:, np.arange(len(rows)), rows] = np.nan
        return mu, draws


def estimate_source_names(data: xr.Dataset) -> list[str]:
    """Return the sources of published estimates in ``data`` (``estimate_<source>``)."""
    return estimate_sources(data)


def observation_for(
    source: str, data: xr.Dataset | None, options: Mapping[str, Any] | None = None
) -> ObservationModel:
    """Return the observation model of ``source``: its ``kind`` option, else the data's form.

    ``estimate_<source>`` in the data -> :class:`EstimateObservation`; a name
    ``cdr`` / ``cdr_*`` -> :class:`CDRObservation`; else :class:`CountObservation`.
    """
    opts = dict(options or {})
    kind = opts.pop("kind", None)
    if kind is None:
        if data is not None and f"estimate_{source}" in data and f"flow_{source}" not in data:
            kind = "estimates"
        elif is_cdr_source(source):
            kind = "cdr"
        else:
            kind = "counts"
    classes: dict[str, type[ObservationModel]] = {
        "counts": CountObservation,
        "census": CountObservation,
        "cdr": CDRObservation,
        "estimates": EstimateObservation,
    }
    if kind not in classes:
        raise ModelConfigError(
            f"source '{source}': kind={kind!r} is not an observation model; use one of "
            f"{sorted(set(classes) - {'census'})}"
        )
    return classes[kind](source, **opts)


def check_sources_exist(data: xr.Dataset, sources: Sequence[str]) -> None:
    """Raise when a source has neither ``flow_<source>`` nor ``estimate_<source>``."""
    from flowmodel.dataset import flow_sources

    present = flow_sources(data) + estimate_sources(data)
    missing = [s for s in sources if s not in present]
    if missing:
        raise DataContractError(
            f"source(s) {missing} have no 'flow_<source>' or 'estimate_<source>' variable in the "
            f"dataset (sources present: {present}). Fix: pass sources={present} or add the "
            "flow tables to build_dataset(flows=...)"
        )
