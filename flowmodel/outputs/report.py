"""Figures and a self-contained HTML report of estimated flows.

:func:`report` writes ``report.html`` and the PNG figures it shows into one
folder. Each figure is embedded in the HTML (base64, so the single file can be
mailed or archived) and also written beside it as a PNG that the HTML links to
(for slides and papers). Figures use matplotlib's Agg backend, so no display
is needed.

Figures (each also available as a function returning a matplotlib Figure):

- :func:`plot_flow_map` — units shaded by population (polygons, or points at
  the centroids), the top flows as lines scaled by posterior mean flow,
  cross-border flows highlighted; a flow matrix when the units have no
  coordinates;
- :func:`plot_observed_vs_predicted` — observed vs predicted flows with 90%
  intervals on log axes;
- :func:`plot_posterior_prior` — posterior vs prior per parameter;
- :func:`plot_calibration` — quantile calibration and interval coverage
  (with the cross-validated models and baselines when given).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from flowmodel._version import __version__
from flowmodel.atomic import atomic_path
from flowmodel.evaluate import flow_metrics, summarize_cv
from flowmodel.exceptions import DataContractError
from flowmodel.naming import quantile_name
from flowmodel.outputs.io import flows_table

__all__ = [
    "plot_calibration",
    "plot_flow_map",
    "plot_observed_vs_predicted",
    "plot_posterior_prior",
    "report",
    "truth_table",
]

WITHIN_COLOR = "#253494"
CROSS_COLOR = "#e31a1c"
POINT_COLOR = "#1f78b4"
#: Parameters (DESIGN §4.0 node names) compared with a known truth.
TRUTH_NODES = (
    "intercept",
    "beta",
    "country_effect",
    "sigma_country",
    "phi",
    "tau",
    "radiation_exponent",
    "market_share",
    "period_effect",
)
OUTSIDE_COLOR = "#ff7f00"
#: Parameters drawn on a log10 axis in :func:`plot_posterior_prior`.
LOG_SCALE_PARAMS = ("period_scale",)


def _plt():
    import matplotlib

    if matplotlib.get_backend().lower() not in (
        "agg",
        "pdf",
        "svg",
        "module://matplotlib_inline.backend_inline",
    ):
        matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------- flow map
def _geometry_frame(units_geometry: Any, ids: np.ndarray):
    import geopandas as gpd

    if isinstance(units_geometry, gpd.GeoSeries):
        geo = gpd.GeoDataFrame(geometry=units_geometry)
    elif isinstance(units_geometry, gpd.GeoDataFrame):
        geo = (
            units_geometry.set_index("unit_id")
            if "unit_id" in units_geometry.columns
            else units_geometry
        )
    else:
        raise DataContractError(
            "units_geometry must be a GeoDataFrame (unit_id column or index) or GeoSeries indexed by unit id, "
            f"got {type(units_geometry).__name__}"
        )
    geo = geo.copy()
    geo.index = geo.index.astype(str)
    geo = geo.loc[geo.index.intersection(ids)]
    if geo.crs is not None and not geo.crs.equals("EPSG:4326"):
        geo = geo.to_crs("EPSG:4326")
    return geo


def plot_flow_map(
    data: xr.Dataset,
    predictions: xr.Dataset,
    *,
    units_geometry: Any = None,
    top_k: int = 200,
    title: str | None = None,
):
    """Map of units shaded by population with the top-k predicted flows as lines.

    Parameters
    ----------
    data
        FlowDataset with ``population``, ``lon``/``lat`` (else a flow matrix is
        drawn) and ``cross_border``.
    predictions
        Dataset with ``mean`` ``(origin, destination)``.
    units_geometry
        Unit polygons (GeoDataFrame/GeoSeries keyed by unit id); points at the
        centroids when None.
    top_k
        Number of largest flows (by posterior mean) drawn.
    title
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _plt()
    from matplotlib.colors import LogNorm
    from matplotlib.lines import Line2D

    ids = data["unit"].values.astype(str)
    pop = pd.Series(np.asarray(data["population"].values, dtype=float), index=ids)
    positive = pop[pop > 0]
    norm = (
        LogNorm(vmin=max(positive.min(), 1.0), vmax=max(positive.max(), 10.0))
        if len(positive)
        else None
    )
    if "lon" not in data or "lat" not in data:
        return _plot_flow_matrix(data, predictions, title=title)
    lon = pd.Series(np.asarray(data["lon"].values, dtype=float), index=ids)
    lat = pd.Series(np.asarray(data["lat"].values, dtype=float), index=ids)
    fig, ax = plt.subplots(figsize=(9, 8))
    cmap = "YlGn"
    if units_geometry is not None:
        geo = _geometry_frame(units_geometry, ids)
        geo["population"] = pop.reindex(geo.index).to_numpy()
        geo.plot(
            column="population", ax=ax, cmap=cmap, norm=norm, edgecolor="white", linewidth=0.4
        )
        mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
        if "country" in data:
            # national borders and country codes: cross-border flows need them to be read
            country = pd.Series(np.asarray(data["country"].values).astype(str), index=ids)
            try:
                nations = geo.assign(country=country.reindex(geo.index).to_numpy()).dissolve(
                    "country"
                )
                nations.boundary.plot(ax=ax, color="0.25", linewidth=1.3, zorder=2.5)
                for code, point in nations.representative_point().items():
                    ax.annotate(
                        str(code),
                        (point.x, point.y),
                        fontsize=9,
                        fontweight="bold",
                        color="0.15",
                        ha="center",
                        va="center",
                        zorder=4,
                        bbox={
                            "boxstyle": "round,pad=0.2",
                            "fc": "white",
                            "ec": "none",
                            "alpha": 0.7,
                        },
                    )
            except Exception:  # pragma: no cover - invalid geometries: the map still works
                pass
    else:
        sizes = 10 + 190 * np.sqrt(pop / max(pop.max(), 1.0))
        mappable = ax.scatter(
            lon,
            lat,
            s=sizes,
            c=pop.clip(lower=1),
            cmap=cmap,
            norm=norm,
            edgecolor="0.3",
            linewidth=0.4,
            zorder=2,
        )
    cbar = fig.colorbar(mappable, ax=ax, shrink=0.7, pad=0.02)
    cbar.set_label("Population (persons, log scale)")
    table = flows_table(predictions, data=data, top_k=top_k)
    if len(table):
        vmax = float(table["mean"].max())
        table = table.iloc[::-1]  # draw the largest last (on top)
        cross = (
            table["cross_border"].to_numpy(bool)
            if "cross_border" in table
            else np.zeros(len(table), bool)
        )
        for (_, row), is_cross in zip(table.iterrows(), cross, strict=True):
            share = np.sqrt(row["mean"] / vmax) if vmax > 0 else 0.0
            ax.plot(
                [lon[row["origin"]], lon[row["destination"]]],
                [lat[row["origin"]], lat[row["destination"]]],
                color=CROSS_COLOR if is_cross else WITHIN_COLOR,
                linewidth=0.3 + 4.7 * share,
                alpha=0.3 + 0.6 * share,
                solid_capstyle="round",
                zorder=3,
            )
        handles = [Line2D([], [], color=WITHIN_COLOR, lw=2.5, label="within-country flow")]
        if units_geometry is not None and "country" in data:
            handles.append(Line2D([], [], color="0.25", lw=1.3, label="national border"))
        if cross.any():
            handles.append(Line2D([], [], color=CROSS_COLOR, lw=2.5, label="cross-border flow"))
        smallest = float(table["mean"].min())
        handles += [
            Line2D([], [], color="0.4", lw=5.0, label=f"largest drawn: {vmax:,.0f} persons"),
            Line2D(
                [],
                [],
                color="0.4",
                lw=0.3 + 4.7 * np.sqrt(smallest / vmax) if vmax > 0 else 0.3,
                label=f"smallest drawn: {smallest:,.0f} persons",
            ),
        ]
        ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.9)
    mid_lat = float(np.nanmean(lat))
    ax.set_aspect(1.0 / max(np.cos(np.deg2rad(mid_lat)), 0.2))
    ax.set_xlabel("Longitude (°E)")
    ax.set_ylabel("Latitude (°N)")
    ax.set_title(
        title or f"Top {min(top_k, len(table))} predicted flows (posterior mean, persons)"
    )
    ax.grid(alpha=0.2)
    fig.tight_layout()
    return fig


def _plot_flow_matrix(data: xr.Dataset, predictions: xr.Dataset, *, title: str | None = None):
    plt = _plt()
    from matplotlib.colors import LogNorm

    mean = predictions["mean"].transpose("origin", "destination")
    values = np.asarray(mean.values, dtype=float)
    positive = values[np.isfinite(values) & (values > 0)]
    fig, ax = plt.subplots(figsize=(8, 7))
    norm = LogNorm(vmin=positive.min(), vmax=positive.max()) if positive.size else None
    im = ax.imshow(np.where(values > 0, values, np.nan), cmap="viridis", norm=norm)
    n = values.shape[0]
    if n <= 40:
        labels = mean["origin"].values.astype(str)
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("Destination")
    ax.set_ylabel("Origin")
    cbar = fig.colorbar(im, ax=ax, shrink=0.8)
    cbar.set_label("Predicted flow, posterior mean (persons, log scale)")
    ax.set_title(title or "Predicted flows (no unit coordinates: origin × destination matrix)")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------- observed vs predicted
def plot_observed_vs_predicted(
    observed: xr.DataArray,
    predictions: xr.Dataset,
    *,
    max_points: int = 3000,
    seed: int = 0,
    title: str | None = None,
    unit: str = "persons",
):
    """Observed vs predicted flows with 90% predictive intervals, on log axes.

    ``unit`` labels both axes (e.g. ``"persons in the sample"`` for census
    sample counts compared with sample-scale predictions).

    Both axes are symmetric-log (linear below 1 person, so observed zeros are
    shown). Points whose observation lies outside the 90% interval are
    orange. At most ``max_points`` pairs are drawn (a seeded random subset).

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _plt()
    from matplotlib.lines import Line2D

    table = flows_table(predictions, observed=observed, observed_only=True)
    if table.empty:
        raise DataContractError(
            "no pair has both an observed and a predicted flow; nothing to plot"
        )
    metrics = flow_metrics(observed, predictions)
    shown = table
    if len(table) > max_points:
        shown = table.sample(max_points, random_state=seed)
    fig, ax = plt.subplots(figsize=(7, 6.5))
    has_int = "q05" in shown and "q95" in shown and shown["q05"].notna().any()
    inside = np.ones(len(shown), bool)
    if has_int:
        inside = (
            (shown["observed"] >= shown["q05"]) & (shown["observed"] <= shown["q95"])
        ).to_numpy()
        for mask, color in ((inside, POINT_COLOR), (~inside, OUTSIDE_COLOR)):
            sub = shown.loc[mask]
            ax.vlines(
                sub["observed"], sub["q05"], sub["q95"], color=color, alpha=0.25, linewidth=0.8
            )
    ax.scatter(
        shown["observed"],
        shown["mean"],
        s=9,
        c=np.where(inside, POINT_COLOR, OUTSIDE_COLOR),
        alpha=0.8,
        edgecolor="none",
        zorder=3,
    )
    top = (
        float(
            np.nanmax(
                [
                    shown["observed"].max(),
                    shown["mean"].max(),
                    shown["q95"].max() if has_int else 0.0,
                ]
            )
        )
        * 1.5
        + 1
    )
    ax.plot([0, top], [0, top], color="0.3", linestyle="--", linewidth=1, label="1:1")
    ax.set_xscale("symlog", linthresh=1)
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel(f"Observed flow ({unit}, log scale)")
    ax.set_ylabel(f"Predicted flow: posterior mean and 90% interval ({unit}, log scale)")
    ax.set_title(title or "Observed vs predicted flows")
    handles = [Line2D([], [], color="0.3", ls="--", label="1:1 line")]
    if has_int:
        handles += [
            Line2D(
                [], [], color=POINT_COLOR, marker="o", ls="-", label="observed inside 90% interval"
            ),
            Line2D(
                [],
                [],
                color=OUTSIDE_COLOR,
                marker="o",
                ls="-",
                label="observed outside 90% interval",
            ),
        ]
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    text = (
        f"pairs: {metrics['n_pairs']:,}\nCPC: {metrics['cpc']:.3f}\n"
        f"Pearson r (log 1+flow): {metrics['pearson_log']:.3f}\n"
        f"90% coverage: {metrics['coverage_90']:.1%}"
    )
    if len(table) > max_points:
        text += f"\n(showing {max_points:,} of {len(table):,})"
    ax.text(
        0.98,
        0.03,
        text,
        transform=ax.transAxes,
        ha="right",
        va="bottom",
        fontsize=8,
        bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9, "edgecolor": "0.7"},
    )
    ax.grid(alpha=0.2, which="both")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------- posterior/prior
def _param_draws(
    group: xr.Dataset, names: Sequence[str], max_panels: int
) -> list[tuple[str, np.ndarray]]:
    out: list[tuple[str, np.ndarray]] = []
    for name in names:
        if name not in group:
            continue
        var = group[name]
        extra = [d for d in var.dims if d not in ("chain", "draw")]
        if not extra:
            out.append((name, np.asarray(var.values).ravel()))
        elif len(extra) == 1:
            for label in var[extra[0]].values:
                out.append(
                    (f"{name}[{label}]", np.asarray(var.sel({extra[0]: label}).values).ravel())
                )
        if len(out) >= max_panels:
            break
    return out[:max_panels]


def plot_posterior_prior(
    idata: xr.DataTree,
    *,
    var_names: Sequence[str] = (
        "intercept",
        "beta",
        "sigma_country",
        "phi",
        "tau",
        "radiation_exponent",
        "period_scale",
        "sigma_market_share",
    ),
    max_panels: int = 12,
):
    """Posterior vs prior density for each parameter (histograms).

    Parameters
    ----------
    idata
        DataTree with ``posterior`` and ``prior`` groups (a fitted model's
        ``idata`` has both).
    var_names
        Nodes to show (DESIGN §4.0 names); vector nodes get one panel per element.
    max_panels
        At most this many panels.

    Returns
    -------
    matplotlib.figure.Figure or None
        None when ``idata`` has no ``prior`` group or no shared parameter.
    """
    plt = _plt()
    children = getattr(idata, "children", {})
    if "posterior" not in children or "prior" not in children:
        return None
    post = idata["posterior"].to_dataset()
    prior = idata["prior"].to_dataset()
    names = [n for n in var_names if n in post and n in prior]
    post_draws = dict(_param_draws(post, names, max_panels))
    prior_draws = dict(_param_draws(prior, names, max_panels))
    labels = [k for k in post_draws if k in prior_draws]
    if not labels:
        return None
    ncol = min(4, len(labels))
    nrow = int(np.ceil(len(labels) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.2 * ncol, 2.6 * nrow), squeeze=False)
    for ax, label in zip(axes.ravel(), labels, strict=False):
        pr, po = prior_draws[label], post_draws[label]
        pr = pr[np.isfinite(pr)]
        po = po[np.isfinite(po)]
        if label.startswith(LOG_SCALE_PARAMS) and (pr > 0).all() and (po > 0).all():
            # positive scales spanning orders of magnitude (LogNormal priors): log10 axis
            pr, po = np.log10(pr), np.log10(po)
            label = f"log10 {label}"
        lo, hi = (
            np.quantile(np.concatenate([pr, po]), [0.005, 0.995]) if pr.size + po.size else (0, 1)
        )
        if hi <= lo:
            lo, hi = lo - 1, hi + 1
        bins = np.linspace(lo, hi, 50)
        ax.hist(pr, bins=bins, density=True, color="0.6", alpha=0.6, label="prior")
        if po.size > 1 and np.ptp(po) > 0:
            pbins = np.linspace(po.min(), po.max(), 40)
            ax.hist(po, bins=pbins, density=True, color=POINT_COLOR, alpha=0.8, label="posterior")
        else:
            ax.axvline(
                float(po.mean()) if po.size else np.nan,
                color=POINT_COLOR,
                lw=2,
                label="posterior (point)",
            )
        ax.set_title(label, fontsize=9)
        ax.set_yticks([])
        ax.tick_params(labelsize=8)
    for ax in axes.ravel()[len(labels) :]:
        ax.set_visible(False)
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle(
        "Posterior (blue) vs prior (grey), model scale (covariates standardised)", fontsize=10
    )
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------ calibration
def _quantile_levels(predictions: xr.Dataset) -> list[tuple[float, str]]:
    out = []
    for p in np.round(np.arange(0.01, 1.0, 0.01), 2):
        name = quantile_name(float(p))
        if name in predictions:
            out.append((float(p), name))
    return out


def plot_calibration(
    observed: xr.DataArray,
    predictions: xr.Dataset,
    *,
    cv: pd.DataFrame | None = None,
    label: str = "this model (in-sample)",
):
    """Calibration of the predictive distribution.

    Left: for each predicted quantile level p, the shares of observed flows
    below and at or below the predicted ``q_p``. Counts are discrete, so a
    calibrated model has p between the two (the shaded band straddles the
    diagonal).
    Right: empirical coverage of the central 50% and 90% intervals, in
    sample and, when ``cv`` is given, on held-out pairs for each model and
    baseline (mean over folds).

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
    levels = _quantile_levels(predictions)
    table = flows_table(predictions, observed=observed, observed_only=True)
    if levels and not table.empty:
        ps = [p for p, _ in levels]
        at_most = [float(np.mean(table["observed"] <= table[name])) for _, name in levels]
        below = [float(np.mean(table["observed"] < table[name])) for _, name in levels]
        ax1.fill_between(
            ps,
            below,
            at_most,
            color=POINT_COLOR,
            alpha=0.2,
            label="between share < q_p and ≤ q_p (counts are discrete)",
        )
        ax1.plot(ps, at_most, marker="o", color=POINT_COLOR, label=f"{label}: share ≤ q_p")
        ax1.plot(ps, below, marker="v", color=POINT_COLOR, ls=":", label=f"{label}: share < q_p")
    ax1.plot([0, 1], [0, 1], "--", color="0.4", lw=1, label="perfect calibration")
    ax1.set_xlim(0, 1)
    ax1.set_ylim(0, 1)
    ax1.set_xlabel("Predicted quantile level p")
    ax1.set_ylabel("Share of observed flows below predicted q_p")
    ax1.set_title("Quantile calibration")
    ax1.legend(fontsize=8, loc="upper left")
    ax1.grid(alpha=0.2)

    entries: list[tuple[str, float, float]] = []
    m = flow_metrics(observed, predictions)
    entries.append((label, m["coverage_50"], m["coverage_90"]))
    if cv is not None and not cv.empty and "coverage_50" in cv:
        summary = summarize_cv(cv)
        for _, row in summary.iterrows():
            entries.append((f"{row['model']} (held out)", row["coverage_50"], row["coverage_90"]))
    x = np.arange(2)
    width = 0.8 / max(len(entries), 1)
    colors = plt.cm.tab10(np.arange(len(entries)) % 10)
    for k, (name, c50, c90) in enumerate(entries):
        ax2.bar(x - 0.4 + width * (k + 0.5), [c50, c90], width=width, color=colors[k], label=name)
    for xi, nominal in zip(x, (0.5, 0.9), strict=True):
        ax2.hlines(nominal, xi - 0.45, xi + 0.45, colors="k", linestyles="--", lw=1.2)
    ax2.set_xticks(x, ["50% interval (q25–q75)", "90% interval (q05–q95)"])
    ax2.set_ylim(0, 1.05)
    ax2.set_ylabel("Share of observed flows inside the interval")
    ax2.set_title("Interval coverage (dashed = nominal)")
    ax2.legend(fontsize=7, loc="upper left")
    ax2.grid(alpha=0.2, axis="y")
    fig.tight_layout()
    return fig


# -------------------------------------------------------------------------- tables
def truth_table(model: Any, truth: Mapping[str, Any], *, ci_prob: float = 0.9) -> pd.DataFrame:
    """Tabulate true vs estimated parameters (raw covariate scale where the model reports it).

    Parameters
    ----------
    model
        A fitted model with ``summary(ci_prob=...)``.
    truth
        Keys of DESIGN §4.0: ``intercept``, ``beta`` (term -> value),
        ``sigma_country``, ``phi``, ``country_effect`` (country -> value), ...

    Returns
    -------
    pandas.DataFrame
        ``parameter``, ``true``, ``estimate`` (posterior mean), ``lower``,
        ``upper`` (equal-tailed ``ci_prob`` interval), ``covered``; one row per
        true value of a DESIGN §4.0 node that the model estimates (others, e.g.
        ``market_share`` for a gravity model, are left out).
    """
    summary = model.summary(ci_prob=ci_prob)
    rows = []

    def add(label: str, true: float, candidates: Sequence[str]) -> None:
        for cand in candidates:
            if cand in summary.index:
                row = summary.loc[cand]
                rows.append(
                    {
                        "parameter": label,
                        "true": float(true),
                        "estimate": row["mean"],
                        "lower": row["eti_lo"],
                        "upper": row["eti_hi"],
                        "covered": bool(row["eti_lo"] <= true <= row["eti_hi"]),
                    }
                )
                return

    for key, value in truth.items():
        if key not in TRUTH_NODES:
            continue
        if isinstance(value, Mapping):
            for term, v in value.items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    add(f"{key}[{term}]", v, [f"{key}_raw[{term}]", f"{key}[{term}]"])
        elif isinstance(value, int | float) and not isinstance(value, bool):
            add(key, value, [f"{key}_raw", key])
    out = pd.DataFrame(
        rows, columns=["parameter", "true", "estimate", "lower", "upper", "covered"]
    )
    out.attrs["ci_prob"] = ci_prob
    return out


def recovery_table(
    mu: xr.DataArray,
    predictions: xr.Dataset,
    data: xr.Dataset,
    truth: Mapping[str, Any],
    realised: xr.DataArray | None = None,
) -> pd.DataFrame:
    """Recovery of the true expected flows by the data available for each pair.

    Groups: within-country pairs of countries with census only, census and
    CDR, CDR only, no data (``truth["census_countries"]``,
    ``truth["cdr_countries"]``), and cross-border pairs. CPC and the ratio of
    totals compare the posterior mean with the true expected flows ``mu``;
    the coverage is that of the realised true flows ``realised`` (what a
    predictive interval is for; ``mu`` when not given).

    Returns
    -------
    pandas.DataFrame
        ``pairs``, ``n``, ``CPC``, ``predicted / true total``, ``90% coverage``,
        ``mean 90% width (persons)``; empty without the country lists.
    """
    census = {str(c) for c in truth.get("census_countries", []) or []}
    cdr = {str(c) for c in truth.get("cdr_countries", []) or []}
    if not census and not cdr:
        return pd.DataFrame()
    mu = mu.transpose("origin", "destination")
    units = np.asarray(data["unit"].values).astype(str)
    country = pd.Series(np.asarray(data["country"].values).astype(str), index=units)
    c_o = country.reindex(np.asarray(mu["origin"].values).astype(str)).to_numpy()
    c_d = country.reindex(np.asarray(mu["destination"].values).astype(str)).to_numpy()
    same = c_o[:, None] == c_d[None, :]
    off = np.asarray(mu["origin"].values)[:, None] != np.asarray(mu["destination"].values)[None, :]
    groups = {
        "census only": census - cdr,
        "census + CDR": census & cdr,
        "CDR only": cdr - census,
        "no data": set(country) - census - cdr,
    }
    masks = {k: same & off & np.isin(c_o, sorted(v))[:, None] for k, v in groups.items()}
    masks["cross-border"] = ~same & off
    rows = []
    for label, mask in masks.items():
        if not mask.any():
            continue
        m = flow_metrics(mu.where(mask), predictions)
        if realised is not None:
            r = flow_metrics(realised.where(mask), predictions)
            m["coverage_90"] = r["coverage_90"]
        rows.append(
            {
                "pairs": label,
                "n": int(m["n_pairs"]),
                "CPC": m["cpc"],
                "predicted / true total": m["total_predicted"] / m["total_observed"]
                if m["total_observed"]
                else np.nan,
                "90% coverage": m["coverage_90"],
                "mean 90% width (persons)": m["width_90"],
            }
        )
    return pd.DataFrame(rows)


def _market_share_recovery(model: Any, truth: Mapping[str, Any]) -> list[str]:
    """Return sentences on the recovery of the true per-unit market shares (fusion models)."""
    true = truth.get("market_share")
    if not isinstance(true, Mapping) or not hasattr(model, "market_share_summary"):
        return []
    try:
        shares = model.market_share_summary(ci_prob=0.9)
    except Exception:
        return []
    if shares is None or len(shares) == 0 or "mean" not in shares:
        return []
    t = pd.Series({str(k): float(v) for k, v in true.items()}).reindex(shares.index.astype(str))
    ok = t.notna().to_numpy()
    if not ok.any():
        return []
    est = shares.loc[ok]
    tv = t[ok].to_numpy()
    inside = float(np.mean((tv >= est["eti_lo"].to_numpy()) & (tv <= est["eti_hi"].to_numpy())))
    mae = float(np.mean(np.abs(est["mean"].to_numpy() - tv)))
    centre = getattr(model, "model_config", {}).get("market_share_default")
    covariate = getattr(model, "model_config", {}).get("market_share_covariate")
    prior = (
        f"prior centred on the covariate {covariate}"
        if covariate
        else f"prior centred on {centre:g} (no penetration covariate)"
        if isinstance(centre, int | float)
        else "default prior"
    )
    return [
        f"{int(ok.sum())} CDR origin units: true share {tv.mean():.2f} on average, posterior mean "
        f"{est['mean'].mean():.2f}; mean absolute error {mae:.3f}; {inside:.0%} of the true "
        f"shares inside the 90% intervals ({prior}). The market share and the CDR period "
        "scale are identified mainly through their product and the priors."
    ]


def _truth_flows(truth: Mapping[str, Any], column: str = "mu") -> xr.DataArray | None:
    """Return true flows ``(origin, destination)`` from ``truth["mu"]`` (DataArray or long table).

    ``column`` picks the column of a long table: ``"mu"`` (expected flows) or
    ``"flow"`` (realised flows); a DataArray is returned only for ``"mu"``.
    """
    mu = truth.get("mu")
    if isinstance(mu, xr.DataArray):
        return mu if column == "mu" else None
    if isinstance(mu, pd.DataFrame) and {"origin", "destination", column} <= set(mu.columns):
        series = mu.assign(
            origin=mu["origin"].astype(str), destination=mu["destination"].astype(str)
        )
        return xr.DataArray.from_series(series.set_index(["origin", "destination"])[column])
    return None


def _table_html(frame: pd.DataFrame, *, index: bool = False, digits: int = 3) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, bool | np.bool_):
            return "yes" if v else "no"
        if isinstance(v, int | np.integer):
            return f"{v:,}"
        if isinstance(v, float | np.floating):
            if not np.isfinite(v):
                return "–"
            if abs(v) >= 1000:
                return f"{v:,.0f}"
            return f"{v:.{digits}g}" if abs(v) < 1e-3 and v != 0 else f"{v:.{digits}f}"
        return html.escape(str(v))

    frame = frame.reset_index() if index else frame
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


METRIC_LABELS = {
    "n_pairs": "pairs scored",
    "cpc": "CPC (common part of commuters)",
    "log_rmse": "RMSE of log(1+flow)",
    "mae": "MAE (persons)",
    "pearson_log": "Pearson r, log(1+flow)",
    "spearman_log": "Spearman ρ",
    "deviance": "Poisson deviance",
    "coverage_50": "50% interval coverage",
    "width_50": "50% interval mean width (persons)",
    "coverage_90": "90% interval coverage",
    "width_90": "90% interval mean width (persons)",
    "total_observed": "total observed (persons)",
    "total_predicted": "total predicted (persons)",
}


def _metrics_frame(metrics: Mapping[str, Any] | pd.DataFrame) -> pd.DataFrame:
    if isinstance(metrics, pd.DataFrame):
        return metrics
    return pd.DataFrame(
        [{"metric": METRIC_LABELS.get(k, k), "value": v} for k, v in metrics.items()]
    )


# -------------------------------------------------------------------------- report
def _source_countries(data: xr.Dataset) -> str:
    """Return a sentence naming the countries each flow source observes.

    A source is *in* a country when it observes pairs within it (a census is
    taken, an operator covers it); cross-border cells are named separately, so
    a census that enumerates in-migrants from abroad is not said to be in every
    origin country.
    """
    from flowmodel.dataset import flow_sources

    if "country" not in data:
        return ""
    country = np.asarray(data["country"].values).astype(str)
    units = pd.Series(country, index=np.asarray(data["unit"].values).astype(str))
    parts, seen = [], set()
    for source in flow_sources(data):
        flow = data[f"flow_{source}"]
        bound = data.get(f"flow_{source}_max")
        present = flow.notnull() if bound is None else flow.notnull() | bound.notnull()
        extra = [d for d in present.dims if d not in ("origin", "destination")]
        if extra:
            present = present.any(extra)
        if "origin" not in present.dims:
            continue
        o_c = units.reindex(np.asarray(present["origin"].values).astype(str)).to_numpy()
        d_c = units.reindex(np.asarray(present["destination"].values).astype(str)).to_numpy()
        cells = np.asarray(present.transpose("origin", "destination").values, bool)
        same = o_c[:, None] == d_c[None, :]
        codes = sorted(set(o_c[np.nonzero(cells & same)[0]]))
        seen |= set(codes)
        if codes:
            n_cross = int((cells & ~same).sum())
            cross = f" (+ {n_cross:,} cross-border pairs)" if n_cross else ""
            parts.append(f"{source} in {', '.join(codes)}{cross}")
    if not parts:
        return ""
    missing = sorted(set(country) - seen)
    tail = f"; no flow data in {', '.join(missing)}" if missing else ""
    return "Data: " + "; ".join(parts) + tail + ". "


def _png(fig: Any, path: Path) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return base64.b64encode(data).decode("ascii")


_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
color:#222;line-height:1.45;padding:0 1em}
h1{border-bottom:2px solid #253494;padding-bottom:.3em}h2{color:#253494;margin-top:2em}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #ddd}
figcaption{font-size:.9em;color:#444;margin-top:.4em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eef1f8}
td:first-child,th:first-child{text-align:left}.meta{font-size:.85em;color:#555}
.note{background:#fff8e1;border-left:4px solid #ffb300;padding:.5em 1em}
"""


def report(
    out_dir: str | os.PathLike[str],
    *,
    data: xr.Dataset,
    predictions: xr.Dataset,
    model: Any = None,
    metrics: Mapping[str, Any] | pd.DataFrame | None = None,
    cv: pd.DataFrame | None = None,
    truth: Mapping[str, Any] | None = None,
    units_geometry: Any = None,
    observed: xr.DataArray | None = None,
    observed_predictions: xr.Dataset | None = None,
    source: str | None = None,
    title: str = "flowmodel: estimated migration flows",
    top_k: int = 200,
    prior: xr.DataTree | None = None,
    attrs: Mapping[str, Any] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Write ``report.html`` (self-contained) and its PNG figures into ``out_dir``.

    Parameters
    ----------
    out_dir
        Folder for ``report.html``, ``flow_map.png``,
        ``observed_vs_predicted.png``, ``posterior_prior.png``,
        ``calibration.png``.
    data
        The FlowDataset.
    predictions
        ``model.predict(data)`` (``mean``, ``q05`` ... ``q95``).
    model
        The fitted model (diagnostics table, posterior vs prior, truth table).
    metrics
        Metrics to show (dict or DataFrame); default :func:`flow_metrics` of
        ``predictions`` against the observed flows (in sample).
    cv
        Output of :func:`flowmodel.evaluate.cross_validate`.
    truth
        Known parameters (e.g. the simulator's); adds a true-vs-estimated
        table and, with ``truth["mu"]``, the recovery of the true expected flows.
    units_geometry
        Unit polygons for the map (else points at the centroids).
    observed
        Observed flows; default ``data["flow_<source>"]`` when present.
    observed_predictions
        Predictions on the scale of ``observed`` (``exposure_<source>``, e.g.
        the census sample fraction, applied) for the observed-vs-predicted,
        calibration and default metrics. Default: ``predictions`` when the
        source has no exposure, else ``model.predict(data, exposure=source)``.
    source
        Flow source; default the only one.
    title
        Report title.
    top_k
        Flows drawn on the map.
    prior
        DataTree with a ``prior`` group; default: the ``prior`` group that
        :meth:`~flowmodel.models.base.FlowModel.fit` stores in the posterior file.
    attrs
        Provenance shown in the header (e.g. :func:`provenance_attrs`).
    notes
        Extra paragraphs (plain text) shown under the title.

    Returns
    -------
    pathlib.Path
        Path of ``report.html``.
    """
    from flowmodel.dataset import flow_sources

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if observed is None:
        sources = flow_sources(data)
        if source is None and len(sources) == 1:
            source = sources[0]
        if source is not None and f"flow_{source}" in data:
            observed = data[f"flow_{source}"]
            if observed.ndim > 2:
                observed = (
                    observed.sum("period", min_count=1) if "period" in observed.dims else observed
                )
    sections: list[str] = []
    exposure = data.get(f"exposure_{source}") if source is not None else None
    scale_note = ""
    if observed_predictions is None:
        observed_predictions = predictions
        if observed is not None and exposure is not None:
            if model is not None and hasattr(model, "predict"):
                try:
                    observed_predictions = model.predict(
                        data,
                        quantiles=tuple(p for p, _ in _quantile_levels(predictions)),
                        exposure=source,
                        seed=0,
                    )
                except Exception as err:  # pragma: no cover - depends on the model
                    notes = [
                        *notes,
                        f"Observed-scale predictions unavailable ({err}); observed "
                        f"{source} counts are compared with population-scale predictions.",
                    ]
            else:
                notes = [
                    *notes,
                    f"flow_{source} has an exposure (sample fraction) and no model was given: "
                    "the predictions are compared with the observed counts as given, so they "
                    "should be on the observed (sample) scale.",
                ]
    if exposure is not None and observed_predictions is not predictions:
        values = np.asarray(exposure.values, dtype=float)
        values = np.unique(np.round(values[np.isfinite(values)], 6))
        shown = f"{values[0]:g}" if values.size == 1 else f"{values.min():g}–{values.max():g}"
        scale_note = (
            f" The {source} counts are a sample (exposure = sample fraction {shown}), so the "
            "predictions in this section are on the same sample scale: population-scale flows "
            "× sample fraction, with the sampling noise."
        )

    def figure(fig: Any, name: str, caption: str) -> None:
        if fig is None:
            return
        b64 = _png(fig, out / name)
        sections.append(
            f'<figure><a href="{name}"><img src="data:image/png;base64,{b64}" alt="{html.escape(caption)}"></a>'
            f'<figcaption>{html.escape(caption)} (<a href="{name}">{name}</a>)</figcaption></figure>'
        )

    n_units = data.sizes["unit"]
    countries = sorted(set(np.asarray(data["country"].values).astype(str)))
    coverage = _source_countries(data)
    sections.append("<h2>Flow map</h2>")
    has_xy = "lon" in data and "lat" in data
    figure(
        plot_flow_map(data, predictions, units_geometry=units_geometry, top_k=top_k),
        "flow_map.png",
        (
            f"The {top_k} largest predicted flows between {n_units} units in {len(countries)} "
            "countr"
            + ("y" if len(countries) == 1 else "ies")
            + "; line width is proportional to the square root of the "
            "posterior mean flow (persons); red lines cross a national border (dark lines). "
            + coverage
            + "Units are shaded by population"
            + (
                " (polygons)."
                if units_geometry is not None
                else " (points at population-weighted centroids)."
            )
            if has_xy
            else "The units have no coordinates, so flows are shown as an origin × destination matrix of posterior "
            "mean flows (persons, log colour scale)."
        ),
    )
    if observed is not None and bool(np.isfinite(np.asarray(observed.values, dtype=float)).any()):
        sections.append("<h2>Observed vs predicted</h2>")
        sample = scale_note != ""
        figure(
            plot_observed_vs_predicted(
                observed,
                observed_predictions,
                title=f"Observed vs predicted flows ({source}"
                + (", sample scale)" if sample else ")"),
                unit="persons in the sample" if sample else "persons",
            ),
            "observed_vs_predicted.png",
            "Each point is an observed origin–destination pair: observed flow against the posterior "
            "predictive mean, with the 90% predictive interval (q05–q95) as a vertical line; blue "
            "points lie inside their interval, orange ones outside. Axes are logarithmic above 1 "
            "person and linear below, so observed zeros are shown; censored (suppressed or "
            "redacted) cells have no single observed value and are not drawn. These are in-sample "
            "predictions; see the cross-validation table (when run) for held-out performance."
            + scale_note,
        )
        sections.append("<h2>Calibration</h2>")
        figure(
            plot_calibration(observed, observed_predictions, cv=cv),
            "calibration.png",
            "Left: shares of observed flows strictly below and at or below each predicted quantile q_p; "
            "counts are discrete, so for a calibrated model the shaded band between them contains the "
            "diagonal. Right: share of observed flows inside the 50% and 90% predictive intervals; "
            "the dashed lines are the nominal levels. Held-out bars come from the cross-validation "
            "(when run)." + scale_note,
        )
        if metrics is None:
            metrics = flow_metrics(observed, observed_predictions)
    if metrics is not None:
        sections.append("<h2>Metrics</h2>")
        sections.append(
            "<p>CPC = 2·Σmin(T, T̂)/(ΣT + ΣT̂) (1 = identical flows); correlations on log(1+flow); "
            "coverage = share of observed flows inside the predictive interval. "
            "Computed over the observed off-diagonal pairs."
            + (
                " Predictions are on the observed (sample) scale: the census sample fraction "
                "multiplies the population-scale flows."
                if scale_note
                else ""
            )
            + "</p>"
        )
        sections.append(_table_html(_metrics_frame(metrics)))
    if cv is not None and not cv.empty:
        sections.append("<h2>Cross-validation</h2>")
        scheme = ", ".join(sorted(set(cv.get("scheme", pd.Series(["?"])).astype(str))))
        sections.append(
            f"<p>Scheme: <b>{html.escape(scheme)}</b>. Each fold refits every model on the remaining pairs "
            "and scores the held-out pairs. <i>backend</i> says how the Bayesian model was refitted "
            "(laplace / map approximations keep refits fast); the baselines are a maximum-likelihood "
            "Poisson GLM with the same covariates (mle) and the parameter-free radiation model (none). "
            "Means over folds:</p>"
        )
        sections.append(_table_html(summarize_cv(cv)))
        cols = [
            c
            for c in (
                "model",
                "fold",
                "held_out",
                "backend",
                "n_train",
                "n_test",
                "cpc",
                "log_rmse",
                "pearson_log",
                "coverage_50",
                "coverage_90",
            )
            if c in cv.columns
        ]
        sections.append(
            "<details><summary>Every fold</summary>" + _table_html(cv[cols]) + "</details>"
        )
    if model is not None and getattr(model, "_idata", None) is not None:
        idata = model.idata
        if prior is None and "prior" not in idata.children:
            notes = [*notes, "Prior draws unavailable: the posterior file has no 'prior' group."]
        tree = idata
        if prior is not None and "prior" in prior.children and "prior" not in idata.children:
            tree = xr.DataTree.from_dict(
                {
                    "posterior": idata["posterior"].to_dataset(),
                    "prior": prior["prior"].to_dataset(),
                }
            )
        sections.append("<h2>Parameters</h2>")
        fit_meta = getattr(model, "fit_meta", {}) or {}
        sections.append(
            f"<p>Model <b>{html.escape(type(model).__name__)}</b>, backend "
            f"<b>{html.escape(str(fit_meta.get('backend', '?')))}</b>, configuration "
            f"<code>{html.escape(json.dumps(getattr(model, 'model_config', {}), default=str))}</code>.</p>"
        )
        cells, censored = fit_meta.get("n_cells"), fit_meta.get("n_censored")
        if isinstance(cells, Mapping) and isinstance(censored, Mapping):
            parts = [
                f"{html.escape(str(src))}: {int(n):,} cells, {int(censored.get(src, 0)):,} censored"
                for src, n in cells.items()
            ]
            sections.append(
                "<p>Observations by source (" + "; ".join(parts) + "). A censored cell is a "
                "count suppressed for privacy (e.g. below a threshold): only its bounds (0 or "
                "the table's smallest suppressed count, and the threshold) enter the likelihood, "
                "so a source with mostly censored cells carries little information about the "
                "size of flows.</p>"
            )
        figure(
            plot_posterior_prior(tree),
            "posterior_prior.png",
            "Posterior (blue) and prior (grey) of each parameter on the model's internal scale "
            "(covariates standardised). A posterior much narrower than its prior means the data "
            "inform the parameter; one that sits on the prior means they do not.",
        )
        try:
            summary = model.summary(ci_prob=0.9)
        except Exception as err:
            summary = None
            notes = [*notes, f"Posterior summary unavailable: {err}"]
        if summary is not None:
            sections.append(
                "<h3>Posterior summary and diagnostics</h3><p>Posterior mean, sd and "
                "equal-tailed 90% interval; <code>_raw</code> rows are on the raw covariate "
                "scale (comparable with published coefficients). R-hat should be ≤ 1.01 and bulk "
                "ESS ≥ 100 per chain for NUTS; they are undefined (–) for single-draw MAP fits. "
                f"Divergent transitions: {summary.attrs.get('divergences', 0)}.</p>"
            )
            shown = summary.copy()
            for col in ("ess_bulk", "ess_tail"):
                if col in shown:
                    # ESS are counts of draws: whole numbers read better
                    shown[col] = (
                        shown[col]
                        .map(lambda v: round(v) if np.isfinite(v) else np.nan)
                        .astype(object)
                    )
            sections.append(_table_html(shown, index=True))
        if truth is not None:
            sections.append("<h2>True vs estimated</h2>")
            tt = truth_table(model, truth, ci_prob=0.9)
            sections.append(
                "<p>Known generating parameters (raw covariate scale) against the posterior mean and "
                f"90% interval; {int(tt['covered'].fillna(False).sum())} of {int(tt['covered'].notna().sum())} "
                "intervals cover the truth. The raw-scale intercept is the log-rate extrapolated to "
                "covariates of zero (e.g. log population 0, a unit of one resident), so its error "
                "is mostly the slope errors × the covariate means; the log-rate at the covariate "
                "means is what the data pin down. A country effect (of the origin country) is "
                "measured where a census sees flows out of that country — within it, or as "
                "in-migrants abroad; otherwise only through the CDR (confounded with the market "
                "share) or, with no data, from the population distribution.</p>"
            )
            sections.append(_table_html(tt))
    true_mu = _truth_flows(truth) if truth is not None else None
    if true_mu is not None:
        if "<h2>True vs estimated</h2>" not in sections:
            sections.append("<h2>True vs estimated</h2>")
        mu = true_mu.reindex_like(predictions["mean"])
        rec = flow_metrics(mu, predictions)
        true_flow = _truth_flows(truth or {}, "flow")
        realised = true_flow.reindex_like(predictions["mean"]) if true_flow is not None else None
        covered = (
            f"share of the realised true flows inside the 90% predictive interval "
            f"{flow_metrics(realised, predictions)['coverage_90']:.1%}"
            if realised is not None
            else f"share of true μ inside the 90% predictive interval {rec['coverage_90']:.1%}"
        )
        sections.append(
            "<h3>Recovery of the true expected flows</h3>"
            "<p>True expected flows μ (persons, population scale, before sampling noise) of "
            "every pair against the population-scale posterior mean: "
            f"CPC {rec['cpc']:.3f}, Pearson r on log(1+flow) {rec['pearson_log']:.3f}; "
            f"{covered}.</p>"
        )
        groups = recovery_table(mu, predictions, data, truth or {}, realised=realised)
        if not groups.empty:
            sections.append(
                "<p>By the data available for the pair (within-country pairs by their country's "
                "sources; cross-border pairs as one group, whichever source observes some of "
                "them). <i>predicted / true total</i> "
                "is Σ posterior mean / Σ μ; coverage is the share of the "
                + ("realised true flows" if realised is not None else "true μ")
                + " inside the 90% predictive interval (nominal 90%).</p>"
            )
            sections.append(_table_html(groups))
    share_rows = _market_share_recovery(model, truth) if truth is not None else None
    if share_rows:
        sections.append(
            "<h3>Operator market share (CDR)</h3><p>"
            + " ".join(html.escape(r) for r in share_rows)
            + "</p>"
        )

    meta = {
        "flowmodel_version": __version__,
        "generated": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "units": n_units,
        "countries": ", ".join(countries[:20]) + (" …" if len(countries) > 20 else ""),
        "flow source": source or "–",
    }
    meta.update({k: v for k, v in (attrs or {}).items() if k not in meta})
    header = "".join(
        f"<b>{html.escape(str(k))}</b>: {html.escape(str(v))}<br>" for k, v in meta.items()
    )
    note_html = "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes)
    page = (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1><p class='meta'>{header}</p>"
        f"{note_html}{''.join(sections)}"
        "<hr><p class='meta'>Flows are persons moving from origin to destination over the period of the "
        "input data; intervals are equal-tailed posterior predictive quantiles. Generated by flowmodel "
        f"{html.escape(__version__)}.</p></body></html>"
    )
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
