r"""Periods: labelled time windows, their order, and covariates that change between dates.

A *period label* names a time window. The labels understood (times are decimal years,
a window is half-open ``[start, end)``):

=========================  =======================================  ==================
label                      window                                   length (years)
=========================  =======================================  ==================
``2010``                   the year 2010: ``[2010, 2011)``          1
``2005-2010``              ``[2005, 2010)``: five years             5
``2024-03``                March 2024                               1/12
``2024Q1``                 the first quarter of 2024                1/4
``2024-03-15``             one day                                  1/365.25
``A/B`` (any two above)    from the start of ``A`` to the end of    ``end(B) - start(A)``
                           ``B``: ``2024-01/2024-03`` is Q1 2024
=========================  =======================================  ==================

A census asking where people lived five years before a 2010 census observes the
window ``2005-2010``; three months of phone data observe ``2024-01/2024-03``.
Periods are **ordered** by start (then end) and **spaced** by the distance between
their midpoints: census rounds are irregular (``1986-1991``, ``1995-2000``,
``2005-2010`` are 9 and 10 years apart), and every temporal structure of the latent
field (random walks, AR(1)) uses those gaps, so a variance per year scales with the
gap.

Covariates that change (population above all) are held in the FlowDataset as
``<var>_by_date`` over (``unit``, ``date``), ``date`` the midpoint (decimal year) of
each labelled date, with the labels in coordinate ``date_label``
(:func:`add_dated_covariates`). :func:`covariate_at` gives a covariate at any time:

- **interpolation** between two dates is log-linear (constant growth rate) for a
  variable that is positive at both, linear otherwise;
- **extrapolation** beyond the first or last date continues the log-linear (or
  linear) trend of the two nearest dates; with a single date the value is held
  constant. ``population`` 2000 and 2020 extrapolated to 2025 grows at the
  2000-2020 rate; to 1988 it shrinks at it.

This module is on the data side: it imports neither PyMC nor the models.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import xarray as xr

from flowmodel.exceptions import DataContractError, ModelConfigError

__all__ = [
    "DATED_SUFFIX",
    "DATE_DIM",
    "Period",
    "add_dated_covariates",
    "covariate_at",
    "dataset_at",
    "dated_covariates",
    "latent_periods",
    "observed_periods",
    "parse_period",
    "sort_periods",
    "values_at",
    "window_weights",
]

#: Suffix of a unit covariate held at several dates: ``population_by_date``.
DATED_SUFFIX = "_by_date"
#: Dim of the dates of dated covariates (coordinate: midpoints in decimal years).
DATE_DIM = "date"

_DAYS_PER_YEAR = 365.25
_YEAR = re.compile(r"^(\d{4})$")
_YEARS = re.compile(r"^(\d{4})-(\d{4})$")
_MONTH = re.compile(r"^(\d{4})-(\d{2})$")
_QUARTER = re.compile(r"^(\d{4})[-_ ]?[Qq]([1-4])$")
_DAY = re.compile(r"^(\d{4})-(\d{2})-(\d{2})$")


@dataclass(frozen=True)
class Period:
    """A labelled window ``[start, end)`` in decimal years."""

    label: str
    start: float
    end: float

    @property
    def length(self) -> float:
        """Length in years."""
        return self.end - self.start

    @property
    def midpoint(self) -> float:
        """Midpoint in decimal years (the time of the period on random walks)."""
        return 0.5 * (self.start + self.end)

    def overlap(self, other: Period) -> float:
        """Years shared with ``other``."""
        return max(0.0, min(self.end, other.end) - max(self.start, other.start))

    def contains(self, time: float) -> bool:
        """Whether ``time`` lies in the window."""
        return self.start <= time < self.end


def _date_fraction(year: int, month: int, day: int = 1) -> float:
    ts = pd.Timestamp(year=year, month=month, day=day)
    start = pd.Timestamp(year=year, month=1, day=1)
    days = (pd.Timestamp(year=year + 1, month=1, day=1) - start).days
    return year + (ts - start).days / days


def _single(text: str) -> tuple[float, float] | None:
    """``(start, end)`` of one label without ``/``, or None when not understood."""
    if m := _YEAR.match(text):
        y = int(m.group(1))
        return float(y), float(y + 1)
    if m := _YEARS.match(text):
        a, b = int(m.group(1)), int(m.group(2))
        return (float(a), float(b)) if b > a else None
    if m := _MONTH.match(text):
        y, mo = int(m.group(1)), int(m.group(2))
        if not 1 <= mo <= 12:
            return None
        end = _date_fraction(y + 1, 1) if mo == 12 else _date_fraction(y, mo + 1)
        return _date_fraction(y, mo), end
    if m := _QUARTER.match(text):
        y, q = int(m.group(1)), int(m.group(2))
        return y + (q - 1) / 4, y + q / 4
    if m := _DAY.match(text):
        try:
            start = _date_fraction(int(m.group(1)), int(m.group(2)), int(m.group(3)))
        except ValueError:
            return None
        return start, start + 1 / _DAYS_PER_YEAR
    return None


def parse_period(label: object) -> Period:
    """Parse a period label (see the module docstring for the forms understood).

    Raises
    ------
    ModelConfigError
        When the label is none of the forms, naming the forms and an example.
    """
    text = str(label).strip()
    if isinstance(label, int | np.integer) or (
        isinstance(label, float | np.floating) and float(label).is_integer()
    ):
        text = str(int(label))
    parts = text.split("/")
    span = None
    if len(parts) == 1:
        span = _single(parts[0])
    elif len(parts) == 2:
        a, b = _single(parts[0].strip()), _single(parts[1].strip())
        if a is not None and b is not None and b[1] > a[0]:
            span = (a[0], b[1])
    if span is None:
        raise ModelConfigError(
            f"period label {text!r} is not understood. Fix: use a year ('2010'), a range of "
            "years ('2005-2010'), a month ('2024-03'), a quarter ('2024Q1'), a day "
            "('2024-03-15') or 'first/last' of two of those ('2024-01/2024-03')"
        )
    return Period(text, float(span[0]), float(span[1]))


def sort_periods(labels: Iterable[object]) -> list[str]:
    """Distinct labels in time order (start, then end, then label)."""
    parsed = {str(p.label): p for p in (parse_period(x) for x in labels)}
    return sorted(parsed, key=lambda k: (parsed[k].start, parsed[k].end, k))


def latent_periods(
    observed: Iterable[object], explicit: Sequence[object] | None = None
) -> list[Period]:
    """Return the periods of a latent field, in time order.

    Parameters
    ----------
    observed
        Labels of the windows some source observes (cells with a value or a bound).
    explicit
        The latent periods asked for (the model's ``temporal["periods"]``); when
        given, every observed window must overlap one of them.

    Returns
    -------
    list of Period
        ``explicit`` in time order; else (the default rule) every observed window
        at least a year long that lies inside no longer observed window, and for
        the shorter windows that lie in none of those (months of phone data after
        the last census) one period per run of them less than a year apart,
        labelled ``first/last``.

    Raises
    ------
    ModelConfigError
        When latent periods overlap each other, or an observed window overlaps none.
    """
    obs = [parse_period(x) for x in dict.fromkeys(str(x) for x in observed)]
    if explicit is not None:
        out = [parse_period(x) for x in explicit]
        out.sort(key=lambda p: (p.start, p.end))
        for a, b in itertools.pairwise(out):
            if b.start < a.end - 1e-9:
                raise ModelConfigError(
                    f"latent periods {a.label!r} and {b.label!r} overlap. Fix: give "
                    "non-overlapping windows, e.g. ['1995-2000', '2005-2010']"
                )
        orphan = [p.label for p in obs if not any(p.overlap(q) > 0 for q in out)]
        if orphan:
            raise ModelConfigError(
                f"observed period(s) {orphan} overlap no latent period "
                f"{[p.label for p in out]}. Fix: add a latent period covering them "
                "(temporal={'periods': [...]}) or drop those cells"
            )
        return out
    long = [p for p in obs if p.length >= 1.0 - 1e-9]
    top = [
        p
        for p in long
        if not any(q is not p and q.length > p.length and q.overlap(p) >= p.length for q in long)
    ]
    top.sort(key=lambda p: (p.start, p.end))
    for a, b in itertools.pairwise(top):
        if b.start < a.end - 1e-9:
            raise ModelConfigError(
                f"observed windows {a.label!r} and {b.label!r} overlap without one containing "
                "the other, so they cannot be latent periods. Fix: name the latent periods, "
                "temporal={'periods': [...]}"
            )
    rest = sorted(
        (p for p in obs if not any(q.contains(p.midpoint) for q in top)),
        key=lambda p: (p.start, p.end),
    )
    groups: list[list[Period]] = []
    for p in rest:
        if groups and p.start - groups[-1][0].start < 1.0:
            groups[-1].append(p)
        else:
            groups.append([p])
    for g in groups:
        if len(g) == 1:
            top.append(g[0])
        else:
            label = f"{g[0].label}/{g[-1].label}"
            top.append(Period(label, g[0].start, max(p.end for p in g)))
    top.sort(key=lambda p: (p.start, p.end))
    return top


def window_weights(window: Period, periods: Sequence[Period]) -> dict[int, float]:
    """Years of ``window`` attributed to each latent period it overlaps.

    The window's whole length is split in proportion to its overlaps (a window that
    reaches into a gap between latent periods is taken to be covered by the periods
    it overlaps: the latent rate is constant within a period).

    Raises
    ------
    ModelConfigError
        When the window overlaps no latent period.
    """
    overlaps = {k: window.overlap(p) for k, p in enumerate(periods)}
    overlaps = {k: v for k, v in overlaps.items() if v > 0}
    total = sum(overlaps.values())
    if total <= 0:
        raise ModelConfigError(
            f"the window {window.label!r} overlaps no latent period "
            f"{[p.label for p in periods]}. Fix: add a latent period covering it"
        )
    return {k: window.length * v / total for k, v in overlaps.items()}


# ------------------------------------------------------------------ dated covariates
def add_dated_covariates(
    ds: xr.Dataset,
    table: pd.DataFrame,
    *,
    id_field: str = "unit_id",
    time_field: str = "period",
    latest_static: bool = True,
) -> xr.Dataset:
    """Add unit covariates given at several dates as ``<var>_by_date`` (``unit``, ``date``).

    Parameters
    ----------
    ds
        A FlowDataset.
    table
        Long table: ``id_field``, ``time_field`` (a period label or a year: its
        midpoint is the date) and one column per covariate.
    latest_static
        Also set the static ``<var>`` (dim ``unit``) to its value at the latest
        date, where the dataset does not hold it yet (``population`` is required
        by every FlowDataset).

    Returns
    -------
    xarray.Dataset
        ``ds`` with ``<var>_by_date`` for every covariate column, coordinates
        ``date`` (decimal years, sorted) and ``date_label``. Dates already held
        are merged (the new table wins where both give a value).

    Raises
    ------
    DataContractError
        When a column is missing, an id is not a unit of ``ds``, a (unit, date)
        appears twice or a unit lacks a value at a date.
    """
    for col in (id_field, time_field):
        if col not in table.columns:
            raise DataContractError(
                f"dated covariates: no column '{col}' (columns: {list(table.columns)}). Fix: "
                f"give '{id_field}', '{time_field}' and one column per covariate"
            )
    tab = table.copy()
    tab[id_field] = tab[id_field].astype(str)
    labels = tab[time_field].map(lambda x: parse_period(x).label)
    tab["_date"] = tab[time_field].map(lambda x: parse_period(x).midpoint)
    tab["_label"] = labels
    units = pd.Index(np.asarray(ds["unit"].values).astype(str))
    unknown = sorted(set(tab[id_field]) - set(units))
    if unknown:
        raise DataContractError(
            f"dated covariates: {len(unknown)} id(s) are not units of the dataset "
            f"({unknown[:10]}). Fix: use the unit ids of the units file"
        )
    dup = tab.duplicated([id_field, "_date"])
    if dup.any():
        bad = tab.loc[dup, [id_field, "_label"]].head(10).values.tolist()
        raise DataContractError(
            f"dated covariates: (unit, {time_field}) rows appear twice: {bad}. Fix: one row "
            "per unit and date"
        )
    columns = [c for c in tab.columns if c not in (id_field, time_field, "_date", "_label")]
    dates = sorted(set(tab["_date"]))
    label_of = dict(zip(tab["_date"], tab["_label"], strict=False))
    out = ds
    if DATE_DIM in out.coords:
        old = np.asarray(out[DATE_DIM].values, dtype=float)
        old_labels = np.asarray(out["date_label"].values).astype(str)
        label_of = dict(zip(old, old_labels, strict=True)) | label_of
        dates = sorted(set(dates) | set(old.tolist()))
        out = out.reindex({DATE_DIM: dates})
    else:
        out = out.assign_coords({DATE_DIM: dates})
    out = out.assign_coords(date_label=(DATE_DIM, [label_of[d] for d in dates]))
    out[DATE_DIM].attrs.update(units="decimal year", long_name="midpoint of the labelled date")
    for col in columns:
        wide = tab.pivot(index=id_field, columns="_date", values=col).reindex(index=units)
        values = wide.reindex(columns=dates).to_numpy(dtype=float)
        name = f"{col}{DATED_SUFFIX}"
        if name in out:
            old_vals = np.asarray(out[name].transpose("unit", DATE_DIM).values, dtype=float)
            values = np.where(np.isnan(values), old_vals, values)
        given = wide.columns.to_numpy(dtype=float)
        cols = np.isin(np.asarray(dates), given)
        missing = np.isnan(values[:, cols]).any(axis=1)
        if missing.any():
            raise DataContractError(
                f"dated covariate '{col}': units {units[missing][:10].tolist()} have no value "
                "at some date. Fix: give every unit a value at every date"
            )
        out[name] = (("unit", DATE_DIM), values)
        out[name].attrs["interpolation"] = (
            "log-linear between dates (linear if a value is <= 0); beyond the first or "
            "last date the trend of the two nearest dates continues"
        )
        if latest_static and col not in out:
            out[col] = ("unit", values[:, -1])
    return out


def dated_covariates(ds: xr.Dataset) -> list[str]:
    """Names of the covariates held at several dates (``<var>`` of ``<var>_by_date``)."""
    return [
        str(n).removesuffix(DATED_SUFFIX)
        for n, v in ds.data_vars.items()
        if str(n).endswith(DATED_SUFFIX) and DATE_DIM in v.dims
    ]


def _interpolate(values: np.ndarray, dates: np.ndarray, time: float) -> np.ndarray:
    """``values`` (unit, date) at ``time``: log-linear where positive, trend beyond the ends."""
    if values.shape[1] == 1:
        return values[:, 0].copy()
    if time <= dates[0]:
        k0, k1 = 0, 1
    elif time >= dates[-1]:
        k0, k1 = len(dates) - 2, len(dates) - 1
    else:
        k1 = int(np.searchsorted(dates, time, side="right"))
        k0 = k1 - 1
    w = (time - dates[k0]) / (dates[k1] - dates[k0])
    a, b = values[:, k0], values[:, k1]
    positive = (a > 0) & (b > 0)
    out = a + w * (b - a)
    with np.errstate(divide="ignore", invalid="ignore"):
        log = np.exp(np.log(a) + w * (np.log(b) - np.log(a)))
    return np.where(positive, log, out)


def values_at(
    table: pd.DataFrame, time: float, *, id_field: str = "unit_id", time_field: str = "period"
) -> pd.DataFrame:
    """Each unit's covariates at ``time`` (decimal year) from a long table of dated values.

    Log-linear between the two dates around ``time`` and the trend beyond the ends,
    as everywhere in this module; a covariate a unit lacks at some date is taken at
    its latest date instead. Returns a frame indexed by ``id_field``.
    """
    frame = table.copy()
    frame["_date"] = frame[time_field].map(lambda x: parse_period(x).midpoint)
    frame = frame.sort_values("_date")
    latest = frame.groupby(id_field).last().drop(columns=[time_field, "_date"])
    dates = np.sort(frame["_date"].unique())
    out = latest.copy()
    for name in latest.columns:
        if not pd.api.types.is_numeric_dtype(frame[name]):
            continue
        wide = frame.pivot_table(index=id_field, columns="_date", values=name, aggfunc="last")
        wide = wide.reindex(index=latest.index, columns=dates)
        values = wide.to_numpy(dtype=float)
        complete = ~np.isnan(values).any(axis=1)
        if complete.any():
            at = _interpolate(values[complete], dates, float(time))
            out.loc[latest.index[complete], name] = at
    return out


def covariate_at(ds: xr.Dataset, name: str, time: float | None) -> np.ndarray | None:
    """Return unit covariate ``name`` at ``time`` (decimal year); None when not dated.

    ``log_<var>`` is the log of ``<var>`` at ``time``. ``time`` None gives None.

    Raises
    ------
    ModelConfigError
        When a log is taken of a value <= 0.
    """
    if time is None:
        return None
    base = name
    log = False
    if f"{name}{DATED_SUFFIX}" not in ds and name.startswith("log_"):
        base, log = name.removeprefix("log_"), True
    var = ds.get(f"{base}{DATED_SUFFIX}")
    if var is None:
        return None
    values = np.asarray(var.transpose("unit", DATE_DIM).values, dtype=float)
    dates = np.asarray(ds[DATE_DIM].values, dtype=float)
    out = _interpolate(values, dates, float(time))
    if log:
        if np.any(out <= 0):
            bad = np.asarray(ds["unit"].values)[out <= 0][:10].tolist()
            raise ModelConfigError(
                f"covariate '{name}': '{base}' is <= 0 at {time:.2f} for units {bad}. Fix: "
                f"use '{base}' untransformed or give positive values"
            )
        out = np.log(out)
    return out


def period_table(labels: Mapping[str, object] | Sequence[object]) -> pd.DataFrame:
    """Start, end, length and midpoint of each label (for docs and outputs)."""
    items = list(labels.values()) if isinstance(labels, Mapping) else list(labels)
    rows = [parse_period(x) for x in items]
    return pd.DataFrame(
        {
            "period": [p.label for p in rows],
            "start": [p.start for p in rows],
            "end": [p.end for p in rows],
            "years": [p.length for p in rows],
            "midpoint": [p.midpoint for p in rows],
        }
    )


def dataset_at(ds: xr.Dataset, period: object) -> xr.Dataset:
    """``ds`` with each dated covariate's static ``<var>`` set to its value at ``period``.

    The midpoint of ``period`` is the time (:func:`covariate_at`); covariates held
    once are unchanged. Baselines that read static covariates (a gravity GLM moved to
    a later period's populations) use it.
    """
    time = parse_period(period).midpoint
    out = ds.copy()
    for name in dated_covariates(ds):
        values = covariate_at(ds, name, time)
        if values is not None:
            out[name] = ("unit", values)
    return out


def observed_periods(ds: xr.Dataset, source: str) -> list[str]:
    """Labels of the windows in which ``flow_<source>`` has a value or a bound, in time order.

    A source without a ``period`` dim observes the window of its ``period``
    attribute (``[flows.<source>] period``); [] when it has none.
    """
    labels: set[str] = set()
    for name in (f"flow_{source}", f"flow_{source}_max"):
        var = ds.get(name)
        if var is None:
            continue
        if "period" in var.dims:
            other = [d for d in var.dims if d != "period"]
            seen = np.asarray(var.notnull().any(other).values, dtype=bool)
            labels |= set(np.asarray(ds["period"].values).astype(str)[seen])
        elif var.attrs.get("period") and bool(var.notnull().any()):
            labels.add(str(var.attrs["period"]))
    return sort_periods(labels)
