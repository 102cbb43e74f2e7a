"""Figures and a self-contained HTML report of estimated flows.

:func:`report` writes ``report.html`` and the PNG figures it shows into one
folder. The page is rendered from the jinja2 template
``templates/report.html.j2`` and works offline from the one file: figures are
embedded (base64) and also written beside it as PNGs that the HTML links to
(for slides and papers); the net-migration and flow maps are inline SVG with a
few lines of JavaScript for pan, zoom and hover; nothing is loaded from the
network. Figures use matplotlib's Agg backend, so no display is needed.

What the page shows first (each with a 90% interval): total and cross-border
movers, per-country immigration, emigration, net and internal migration, the
largest flows (:func:`summary_tables`); then a diagnostics banner
(:func:`diagnostics`), the maps (:func:`map_layers`) and the data coverage of
each source (:func:`data_coverage`).

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
import contextlib
import datetime as _dt
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
from flowmodel.naming import is_cdr_source, quantile_name
from flowmodel.outputs.io import flows_table

__all__ = [
    "cdr_home_detection",
    "cdr_only_shares",
    "data_coverage",
    "diagnostics",
    "map_layers",
    "plot_calibration",
    "plot_flow_map",
    "plot_observed_vs_predicted",
    "plot_posterior_prior",
    "render_report",
    "report",
    "summary_tables",
    "truth_table",
]

WITHIN_COLOR = "#253494"
CROSS_COLOR = "#e31a1c"
POINT_COLOR = "#1f78b4"
#: Parameters (the models' node names) compared with a known truth.
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
        Nodes to show (the model's node names); vector nodes get one panel per element.
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
        Node names: ``intercept``, ``beta`` (term -> value),
        ``sigma_country``, ``phi``, ``country_effect`` (country -> value), ...

    Returns
    -------
    pandas.DataFrame
        ``parameter``, ``true``, ``estimate`` (posterior mean), ``lower``,
        ``upper`` (equal-tailed ``ci_prob`` interval), ``covered``; one row per
        true value of a node that the model estimates (others, e.g.
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


# ------------------------------------------------------------------------ formatting
def _fmt(v: Any, digits: int = 3) -> str:
    """One table cell as text (thousands separators, – for missing)."""
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
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return str(v)


def _table(frame: pd.DataFrame, *, index: bool = False, digits: int = 3) -> dict[str, Any]:
    """Return a DataFrame as ``{"columns": [...], "rows": [[text, ...], ...]}`` for the template."""
    frame = frame.reset_index() if index else frame
    return {
        "columns": [str(c) for c in frame.columns],
        "rows": [[_fmt(v, digits) for v in row] for row in frame.itertuples(index=False)],
    }


def _persons(value: Any) -> str:
    """Format a number of persons: whole, with thousands separators."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    return f"{v:,.0f}" if np.isfinite(v) else "–"


def _signed(value: Any) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "–"
    if not np.isfinite(v):
        return "–"
    return f"{v:+,.0f}" if round(v) != 0 else "0"


def _interval(lo: Any, hi: Any, *, signed: bool = False) -> str:
    f = _signed if signed else _persons
    a, b = f(lo), f(hi)
    return "–" if "–" in (a, b) else f"{a} to {b}"


def _value(ds: xr.Dataset | None, name: str, **sel: Any) -> float:
    if ds is None or name not in ds:
        return float("nan")
    var = ds[name]
    if sel:
        var = var.sel(sel)
    return float(var.values)


# --------------------------------------------------------------------------- summary
#: Lower and upper quantile of the intervals shown in the summary (a 90% interval).
INTERVAL = ("q05", "q95")


def _estimate(ds: xr.Dataset | None, quantity: str, *, signed: bool = False, **sel: Any) -> dict:
    lo, hi = INTERVAL
    mean = _value(ds, f"{quantity}_mean", **sel)
    low, high = _value(ds, f"{quantity}_{lo}", **sel), _value(ds, f"{quantity}_{hi}", **sel)
    fmt = _signed if signed else _persons
    return {
        "mean": fmt(mean),
        "interval": _interval(low, high, signed=signed),
        "raw": mean,
        "excludes_zero": bool(np.isfinite(low) and np.isfinite(high) and (low > 0 or high < 0)),
    }


def summary_tables(
    totals: xr.Dataset | None,
    predictions: xr.Dataset,
    data: xr.Dataset,
    *,
    top: int = 10,
    observed: xr.Dataset | None = None,
) -> dict[str, Any]:
    """Return the numbers a demographer reads first: movers, country totals, largest flows.

    Parameters
    ----------
    totals
        Output of :func:`flowmodel.totals.predict_totals` (None: only the
        largest flows are listed).
    predictions
        The flows (``mean``, ``q05``, ``q95``).
    data
        The FlowDataset (countries, populations, unit names).
    top
        Number of largest flows listed.
    observed
        :func:`flowmodel.outputs.io.population_scale` of the observed flows, to
        list beside the largest flows.

    Returns
    -------
    dict
        ``movers`` (rows: quantity, mean, 90% interval), ``countries`` (rows:
        country, population, immigration, emigration, net, internal, each mean
        and interval), ``flows`` (largest flows).
    """
    out: dict[str, Any] = {"movers": [], "countries": [], "flows": []}
    if totals is not None:
        for quantity, label in (
            ("total_movers", "People who moved between two units"),
            ("cross_border", "of whom crossed a national border"),
        ):
            if f"{quantity}_mean" in totals:
                out["movers"].append({"label": label, **_estimate(totals, quantity)})
        if "country" in totals.dims and "country_net_mean" in totals:
            pop = None
            if "population" in data and "country" in data:
                pop = (
                    pd.Series(np.asarray(data["population"].values, dtype=float))
                    .groupby(np.asarray(data["country"].values).astype(str))
                    .sum()
                )
            for code in np.asarray(totals["country"].values).astype(str):
                net = _estimate(totals, "country_net", signed=True, country=code)
                population = float(pop.get(code, np.nan)) if pop is not None else np.nan
                rate = net["raw"] / population * 1000 if population and population > 0 else np.nan
                out["countries"].append(
                    {
                        "country": code,
                        "population": _persons(population),
                        "in": _estimate(totals, "country_in", country=code),
                        "out": _estimate(totals, "country_out", country=code),
                        "net": net,
                        "rate": f"{rate:+.1f}" if np.isfinite(rate) else "–",
                        "internal": _estimate(totals, "country_internal", country=code),
                    }
                )
    table = flows_table(predictions, data=data, top_k=top)
    names = None
    if "name" in data and data["name"].dims == ("unit",):
        names = pd.Series(
            np.asarray(data["name"].values).astype(str), index=data["unit"].values.astype(str)
        )
    obs = None
    if observed is not None and "observed" in observed:
        obs = observed["observed"].transpose("origin", "destination")
    lo, hi = INTERVAL
    for row in table.itertuples(index=False):
        r = row._asdict()
        label = f"{r['origin']} → {r['destination']}"
        if names is not None:
            label = f"{names.get(r['origin'], r['origin'])} → {names.get(r['destination'], r['destination'])}"
        seen = np.nan
        if obs is not None:
            with contextlib.suppress(KeyError):
                seen = float(obs.sel(origin=r["origin"], destination=r["destination"]).values)
        out["flows"].append(
            {
                "label": label,
                "countries": f"{r.get('origin_country', '')} → {r.get('destination_country', '')}"
                if "origin_country" in r
                else "",
                "mean": _persons(r["mean"]),
                "interval": _interval(r.get(lo), r.get(hi)),
                "observed": _persons(seen),
                "cross_border": bool(r.get("cross_border", False)),
            }
        )
    return out


# ----------------------------------------------------------------------- diagnostics
#: Backends whose posterior is an approximation, not MCMC.
APPROXIMATE_BACKENDS = {
    "laplace": "a Gaussian (Laplace) approximation at the posterior mode",
    "advi": "mean-field variational inference (ADVI)",
    "map": "a single point at the posterior mode (MAP): no posterior uncertainty",
}


def _fit_meta(model: Any, idata: Any) -> dict[str, Any]:
    meta = dict(getattr(model, "fit_meta", {}) or {})
    if not meta and idata is not None:
        with contextlib.suppress(Exception):
            meta = json.loads(idata.attrs.get("flowmodel_fit_meta", "{}") or "{}")
    return meta


def _pareto_k(idata: Any) -> tuple[int, int] | None:
    """(observations with Pareto k > 0.7, observations with a finite k), or None."""
    import warnings

    stored = getattr(idata, "attrs", {}).get("flowmodel_loo")
    if stored:
        with contextlib.suppress(Exception):
            loo = json.loads(stored)
            return int(loo["n_pareto_k_gt_0.7"]), int(loo["n_pareto_k"])
    children = getattr(idata, "children", {})
    if "loo" in children and "pareto_k" in children["loo"]:
        # stored instead of the pointwise log-likelihood when that was too large
        k = np.asarray(children["loo"]["pareto_k"].values, dtype=float)
        k = k[np.isfinite(k)]
        return int((k > 0.7).sum()), int(k.size)
    if "log_likelihood" not in children:
        return None
    import arviz as az

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            k = np.asarray(az.loo(idata).pareto_k, dtype=float).ravel()
    except Exception:
        return None
    k = k[np.isfinite(k)]
    return int((k > 0.7).sum()), int(k.size)


def diagnostics(model: Any, *, summary: pd.DataFrame | None = None) -> list[dict[str, Any]]:
    """Return the banner at the top of the report: can these estimates be trusted.

    Parameters
    ----------
    model
        The fitted model (its ``idata``, ``fit_meta`` and ``summary``).
    summary
        ``model.summary()`` when already computed.

    Returns
    -------
    list of dict
        ``{"level": "ok" | "warn" | "bad" | "info", "title": ..., "text": ...}``:
        the fit method (approximations flagged), R-hat, bulk ESS and divergent
        transitions for MCMC, the sampler's own warnings, and the share of
        Pareto k > 0.7 from PSIS-LOO when the posterior file holds a pointwise
        log-likelihood.
    """
    idata = getattr(model, "_idata", None)
    if idata is None:
        return []
    meta = _fit_meta(model, idata)
    backend = str(meta.get("backend", "unknown"))
    items: list[dict[str, str]] = []
    post = idata["posterior"].to_dataset() if "posterior" in idata.children else None
    chains = int(post.sizes.get("chain", 1)) if post is not None else 1
    draws = int(post.sizes.get("draw", 1)) if post is not None else 1
    if backend in APPROXIMATE_BACKENDS:
        attrs = post.attrs if post is not None else {}
        grid = (
            f" It was integrated numerically over {attrs['laplace_integrated']} (a grid of "
            f"{int(attrs.get('laplace_grid_points', 0))} points), the rest Gaussian given them."
            if attrs.get("laplace_integrated")
            else ""
        )
        items.append(
            {
                "level": "warn",
                "title": f"Approximate fit ({backend})",
                "text": f"The posterior is {APPROXIMATE_BACKENDS[backend]}, not MCMC.{grid} Its "
                "draws are independent by construction, so R-hat and ESS say nothing about "
                "convergence, and intervals can be too narrow where the posterior is skewed. "
                'Refit with a NUTS backend (backend = "auto", "nutpie" or "pymc") before '
                "publishing numbers.",
            }
        )
        for text in meta.get("approximation_caveats") or []:
            items.append(
                {"level": "warn", "title": f"Known {backend} weakness", "text": str(text)}
            )
    else:
        items.append(
            {
                "level": "ok",
                "title": f"MCMC ({backend})",
                "text": f"{chains} chain(s) × {draws:,} draws of the No-U-Turn sampler.",
            }
        )
        if summary is None:
            with contextlib.suppress(Exception):
                summary = model.summary(ci_prob=0.9)
        if summary is not None and len(summary):
            rhat = pd.to_numeric(summary.get("r_hat", pd.Series(dtype=float)), errors="coerce")
            ess = pd.to_numeric(summary.get("ess_bulk", pd.Series(dtype=float)), errors="coerce")
            worst = float(rhat.max()) if rhat.notna().any() else np.nan
            low = float(ess.min()) if ess.notna().any() else np.nan
            if np.isfinite(worst):
                items.append(
                    {
                        "level": "ok" if worst <= 1.01 else "bad" if worst > 1.05 else "warn",
                        "title": f"largest R-hat {worst:.3f}",
                        "text": "over the parameters; ≤ 1.01 means the chains agree"
                        + ("" if worst <= 1.01 else ": run longer (more tune and draws)"),
                    }
                )
            if np.isfinite(low):
                need = 100 * chains
                items.append(
                    {
                        "level": "ok" if low >= need else "warn",
                        "title": f"smallest bulk ESS {low:,.0f}",
                        "text": f"effective sample size over the parameters; {need:,} (100 per chain) or "
                        "more gives stable intervals" + ("" if low >= need else ": draw more"),
                    }
                )
        n_div = 0
        if "sample_stats" in idata.children and "diverging" in idata["sample_stats"]:
            n_div = int(np.asarray(idata["sample_stats"]["diverging"].values).sum())
        items.append(
            {
                "level": "ok" if n_div == 0 else "bad",
                "title": f"{n_div:,} divergent transition(s)",
                "text": "none means the sampler explored the posterior without trouble"
                if n_div == 0
                else "the posterior may be biased: raise target_accept or reparametrise",
            }
        )
        for text in meta.get("diagnostics") or []:
            items.append({"level": "warn", "title": "Sampler warning", "text": str(text)})
    uninformed = meta.get("uninformed") or []
    if uninformed:
        names = ", ".join(str(u.get("parameter")) for u in uninformed)
        fixes = list(dict.fromkeys(f"{u['fix']}." for u in uninformed if "fix" in u))
        if any("fix" not in u for u in uninformed):
            fixes.insert(0, "Add a source that observes them or state an informative prior.")
        items.append(
            {
                "level": "warn",
                "title": f"{len(uninformed)} parameter(s) not informed by the data",
                "text": f"{names}: posterior as wide as the prior (sd above 90% of the "
                "prior's), so their intervals — and those of every flow that depends on "
                "them — are the prior's. " + " ".join(fixes),
            }
        )
    k = _pareto_k(idata)
    if k is None:
        items.append(
            {
                "level": "info",
                "title": "Pareto k not computed",
                "text": "the posterior file holds no pointwise log-likelihood, so PSIS-LOO "
                "(and its Pareto k diagnostic) is not available"
                + (f" ({why})" if (why := getattr(model, "fit_meta", {}).get("loo")) else "")
                + "; see the cross-validation.",
            }
        )
    else:
        bad, total = k
        share = bad / total if total else 0.0
        items.append(
            {
                "level": "ok" if bad == 0 else "warn" if share < 0.1 else "bad",
                "title": f"Pareto k > 0.7: {share:.0%} ({bad:,} of {total:,} observed cells)",
                "text": "PSIS-LOO is reliable"
                if bad == 0
                else "leave-one-out estimates are unreliable for these cells: the fit leans on "
                "highly influential observations, a sign the model may not describe them well. "
                "Read the held-out (cross-validated) coverage, not only the in-sample one.",
            }
        )
    return items


# -------------------------------------------------------------------------- coverage
def _source_label(source: str) -> str:
    if is_cdr_source(source):
        return "mobile phone records (CDR)"
    if source.startswith("census"):
        return "census"
    return "flow table"


def _period_text(var: xr.DataArray, data: xr.Dataset) -> str:
    if var.attrs.get("period"):
        return str(var.attrs["period"])
    if "period" in var.dims:
        periods = [str(p) for p in np.asarray(data["period"].values)]
        return f"{periods[0]} to {periods[-1]} ({len(periods)} periods)" if periods else "–"
    return "unspecified"


def data_coverage(data: xr.Dataset) -> dict[str, Any]:
    """Which source observes which country, with what sample fraction, suppression and period.

    Derived from the dataset alone: every ``flow_<source>`` variable (with
    ``flow_<source>_max`` bounds of censored cells, ``exposure_<source>`` and
    the variable's ``period`` attribute or ``period`` dim), whatever its dims.

    Returns
    -------
    dict
        ``sources``: one row per source (kind, countries where it observes
        moves within the country, cells observed, share censored, sample
        fraction, period); ``countries``: one row per country with what each
        source sees there, and a flag for countries no source observes;
        ``uncovered``: those countries; ``uncovered_with_level``: those of them whose
        moves abroad a source other than phone data records (which measures their
        level); ``cdr_only``: countries where phone data
        observe moves within and no other source (census, flow table, published
        estimate) measures flows out of them, so their level of migration and the
        operator's share there are pinned only as a product.
    """
    from flowmodel.dataset import estimate_sources, flow_sources

    countries = (
        sorted({str(c) for c in np.asarray(data["country"].values)}) if "country" in data else []
    )
    unit_country = _unit_country_series(data)
    rows, matrix = [], {c: {} for c in countries}
    # countries where a source observes moves within (or, in a layout without pairs, names
    # them), and where phone data do
    covered: set[str] = set()
    cdr_within: set[str] = set()
    # countries whose level of out-migration a source other than phone data measures
    level_informed: set[str] = set()
    for name in estimate_sources(data):
        est = data[f"estimate_{name}"]
        level_informed |= _origin_countries(data, est.notnull(), est, unit_country)
    for source in flow_sources(data):
        var = data[f"flow_{source}"]
        bound = data.get(f"flow_{source}_max")
        seen = var.notnull()
        censored = var.isnull() & bound.notnull() if bound is not None else xr.zeros_like(seen)
        present = seen | censored
        n_seen, n_cens = int(seen.sum()), int(censored.sum())
        within: dict[str, int] = {}
        inflow: dict[str, int] = {}
        outflow: dict[str, int] = {}
        touched: set[str] = set()
        dims = set(present.dims)
        extra = [d for d in present.dims if d not in ("origin", "destination")]
        # a source reported at another level (country of previous residence, admin-1) counts
        # cells, each the sum of several unit pairs
        cell = None if {"origin", "destination"} <= dims else _cell_layout(var)
        noun = "cells" if cell else "pairs"
        if {"origin", "destination"} <= dims and unit_country is not None:
            cells = present.any(extra) if extra else present
            cells = np.asarray(cells.transpose("origin", "destination").values, bool)
            o_c = unit_country.reindex(np.asarray(var["origin"].values).astype(str)).to_numpy()
            d_c = unit_country.reindex(
                np.asarray(var["destination"].values).astype(str)
            ).to_numpy()
            same = o_c[:, None] == d_c[None, :]
            for code in countries:
                n_within = int((cells & same & (o_c[:, None] == code)).sum())
                n_in = int((cells & ~same & (d_c[None, :] == code)).sum())
                n_out = int((cells & ~same & (o_c[:, None] == code)).sum())
                for counts, n in ((within, n_within), (inflow, n_in), (outflow, n_out)):
                    if n:
                        counts[code] = n
        elif cell:
            dim = cell
            hit = (
                present.any([d for d in present.dims if d != dim]) if present.ndim > 1 else present
            )
            hit = np.asarray(hit.values, bool)
            o_c = _label_countries(data, var, dim, "origin", unit_country)[hit]
            d_c = _label_countries(data, var, dim, "destination", unit_country)[hit]
            known = (o_c != "") & (d_c != "")
            for code in countries:
                n_within = int(((o_c == code) & (d_c == code)).sum())
                n_in = int((known & (o_c != code) & (d_c == code)).sum())
                n_out = int((known & (o_c == code) & (d_c != code)).sum())
                for counts, n in ((within, n_within), (inflow, n_in), (outflow, n_out)):
                    if n:
                        counts[code] = n
        else:
            # any other layout (e.g. country x unit tables): countries named along its dims
            for dim in present.dims:
                others = [d for d in present.dims if d != dim]
                hit = np.asarray(present.any(others).values if others else present.values, bool)
                values = np.asarray(var[dim].values).astype(str)[hit]
                if dim in ("unit", "origin", "destination") and unit_country is not None:
                    touched |= set(unit_country.reindex(values).dropna())
                elif "country" in dim:
                    touched |= set(values)
        exposure = data.get(f"exposure_{source}")
        fraction = "–"
        if exposure is not None:
            values = np.asarray(
                exposure.where(present) if set(exposure.dims) <= dims else exposure
            )
            values = np.unique(np.round(values[np.isfinite(values)].astype(float), 6))
            if values.size == 1:
                fraction = f"{values[0]:.3g}"
            elif values.size:
                fraction = f"{values.min():.3g} to {values.max():.3g}"
        observed_in = sorted(within) or sorted(touched)
        if not is_cdr_source(source):
            level_informed |= _origin_countries(data, present, var, unit_country)
        else:
            cdr_within |= set(within)
        covered.update(within)
        if not (within or inflow or outflow):
            covered.update(touched)
        rows.append(
            {
                "source": source,
                "kind": _source_label(source),
                "countries": ", ".join(observed_in) or "–",
                "cross_border": sum(inflow.values()),
                "cells": f"{n_seen + n_cens:,}",
                "censored": f"{n_cens / (n_seen + n_cens):.0%}" if n_seen + n_cens else "–",
                "fraction": fraction,
                "period": _period_text(var, data),
            }
        )
        for code in countries:
            parts = []
            if code in within:
                parts.append(f"within: {within[code]:,} {'cells' if cell else 'unit pairs'}")
            if code in inflow:
                parts.append(f"in-migration from abroad: {inflow[code]:,} {noun}")
            if code in outflow:
                parts.append(f"moves abroad: {outflow[code]:,} {noun}")
            if not parts and code in touched:
                parts.append("in its cells")
            matrix[code][source] = "; ".join(parts)
    # moves into or out of a country alone measure its level, not where its movers go in it
    country_rows = [
        {"country": code, "cells": matrix[code], "covered": code in covered} for code in countries
    ]
    return {
        "sources": rows,
        "source_names": [r["source"] for r in rows],
        "countries": country_rows,
        "uncovered": [r["country"] for r in country_rows if not r["covered"]],
        "cdr_only": sorted(cdr_within - level_informed),
        "uncovered_with_level": [
            r["country"]
            for r in country_rows
            if not r["covered"] and r["country"] in level_informed
        ],
    }


def cdr_only_shares(
    model: Any, data: xr.Dataset, countries: Sequence[str]
) -> list[dict[str, Any]]:
    """Return what a fusion fit made of the market share in each country only phone data see.

    In such a country the counts pin the product of the operator's share of the
    movers and the country's level of migration; the fit splits it by the priors.
    For each country (and CDR source) this returns the fitted share (mean of its
    units' shares: posterior mean and 90% interval), the penetration covariate's
    country mean when it reads as a share, and how far the fit moved the country's
    share offset (``market_share_country``) from its prior centre, in prior sds.
    Far (beyond about one sd) means the counts are far from what the covariate and
    the other countries' levels predict, and the fit read part of it as the share.

    Returns
    -------
    list of dict
        ``country``, ``source``, ``share``, ``covariate``, ``offset`` (text), ``far`` (bool).
    """
    from flowmodel.dataset import flow_sources

    post = getattr(model, "posterior", None) if model is not None else None
    if post is None or not countries or "country" not in data:
        return []
    unit_country = _unit_country_series(data)
    config = getattr(model, "model_config", {}) or {}
    priors = (getattr(model, "fit_meta", {}) or {}).get("priors", {})
    rows = []
    for source in [s for s in flow_sources(data) if is_cdr_source(s)]:
        suffix = "" if source == "cdr" else f"_{source}"
        share, offset = (
            post.get(f"market_share{suffix}"),
            post.get(f"market_share_country{suffix}"),
        )
        if share is None or offset is None or unit_country is None:
            continue
        unit_dim = next(d for d in share.dims if d not in ("chain", "draw"))
        country_dim = next(d for d in offset.dims if d not in ("chain", "draw"))
        units = np.asarray(share[unit_dim].values).astype(str)
        of_unit = unit_country.reindex(units).to_numpy()
        options = (config.get("source_options") or {}).get(source, {})
        covariate = options.get("market_share_covariate", config.get("market_share_covariate"))
        values = data[covariate] if covariate and covariate in data else None
        spec = priors.get(f"market_share_country{suffix}") or {}
        mu, sd = float(spec.get("mu", 0.0)), float(spec.get("sigma", 0.5))
        for code in countries:
            mine = of_unit == code
            if not mine.any() or code not in set(offset[country_dim].values.astype(str)):
                continue
            draws = share.isel({unit_dim: np.flatnonzero(mine)}).mean(unit_dim)
            lo, hi = np.quantile(draws.values, [0.05, 0.95])
            cov = "–"
            if values is not None:
                v = np.asarray(values.values, dtype=float)[unit_country.to_numpy() == code]
                v = v[np.isfinite(v)]
                if v.size and ((v > 0) & (v < 1)).all():
                    cov = f"{v.mean():.2f}"
            z = (float(offset.sel({country_dim: code}).mean()) - mu) / sd
            rows.append(
                {
                    "country": code,
                    "source": source,
                    "share": f"{float(draws.mean()):.2f} [{lo:.2f}, {hi:.2f}]",
                    "covariate": cov,
                    "offset": f"{z:+.1f}",
                    "far": abs(z) > 1.0,
                }
            )
    return rows


def _cell_layout(var: xr.DataArray) -> str | None:
    """Return the ``cell_<source>`` dim of a source reported at another level, else None."""
    for dim in var.dims:
        if f"{dim}_origin" in var.coords and f"{dim}_destination" in var.coords:
            return str(dim)
    return None


def _label_countries(
    data: xr.Dataset,
    var: xr.DataArray,
    dim: str,
    side: str,
    unit_country: pd.Series | None,
) -> np.ndarray:
    """Country of each cell's origin or destination label ("" where it names none).

    The labels are at the variable's ``<side>_level`` (:func:`flowmodel.dataset.level_groups`:
    a unit, a country or a unit field such as admin-1); a label names the country
    its units lie in, when they lie in one.
    """
    from flowmodel.dataset import level_groups

    labels = np.asarray(var[f"{dim}_{side}"].values).astype(str)
    if unit_country is None:
        return np.full(labels.shape, "", dtype=object)
    try:
        groups = level_groups(data, str(var.attrs.get(f"{side}_level", "unit")))
    except DataContractError:
        return np.full(labels.shape, "", dtype=object)
    by_label = pd.Series(unit_country.to_numpy(), index=groups).groupby(level=0)
    single = by_label.first()[by_label.nunique() == 1]
    return single.reindex(labels).fillna("").to_numpy(dtype=object)


def _origin_countries(
    data: xr.Dataset, present: xr.DataArray, var: xr.DataArray, unit_country: pd.Series | None
) -> set[str]:
    """Countries of the origins of the cells where ``present`` holds, whatever the layout.

    Origins are the ``origin`` dim (units), a ``*country*`` dim that is not a
    destination (e.g. the previous country of immigrants) or the origin labels of a
    source reported at another level (:func:`_label_countries`).
    """
    out: set[str] = set()
    codes = set(np.asarray(data["country"].values).astype(str)) if "country" in data else set()
    cell = _cell_layout(var)
    for dim in present.dims:
        others = [d for d in present.dims if d != dim]
        hit = np.asarray(present.any(others).values if others else present.values, bool)
        if dim == cell:
            out |= set(_label_countries(data, var, dim, "origin", unit_country)[hit])
        elif dim == "origin" or ("country" in dim and "destination" not in dim):
            labels = np.asarray(present[dim].values).astype(str)[hit]
            if unit_country is not None:
                out |= set(unit_country.reindex(labels).dropna().astype(str))
            out |= set(labels) & codes
    out.discard("")
    return out


def cdr_home_detection(
    folder: str | os.PathLike[str], source: str = "cdr"
) -> dict[str, Any] | None:
    """Summarise how homes were detected from raw CDR events, from the prepare stage's folder.

    Reads ``cdr_settings.json``, ``cdr_diagnostics.csv`` and ``cdr_home_rule.csv``
    written by :func:`flowmodel.inputs.cdr.write_cdr_outputs` (``cdr_<source>/`` of a
    run directory). Everything there is already published under the totals rule
    (counts rounded, nothing at or below the redaction threshold).

    Returns
    -------
    dict or None
        ``source``, ``settings`` (rows of setting, value, how it was chosen),
        ``periods`` (rows of period, active subscribers, share with a home) and
        ``rule`` (the candidate minimum active days with their share with a home and
        estimated share of spurious moves); None when the folder holds no settings
        (an OD table was read, not raw events).
    """
    import json

    folder = Path(folder)
    settings_path = folder / "cdr_settings.json"
    if not settings_path.exists():
        return None
    settings = json.loads(settings_path.read_text())
    rows = []
    night = settings.get("night")
    if night is not None:
        rows.append(
            {
                "setting": "night hours (home = the usual tower at night)",
                "value": f"{int(night[0]):02d}:00-{int(night[1]):02d}:00",
                "chosen_by": settings.get("night_chosen_by", "config"),
            }
        )
    if "min_active_days" in settings:
        rows.append(
            {
                "setting": "minimum active nights for a home",
                "value": str(settings["min_active_days"]),
                "chosen_by": settings.get("min_active_days_chosen_by", "config"),
            }
        )
    if settings.get("spurious_share_estimate") is not None:
        rows.append(
            {
                "setting": "estimated share of spurious moves (home flips of stayers)",
                "value": f"{float(settings['spurious_share_estimate']):.1%}",
                "chosen_by": f"at most {float(settings.get('max_spurious_share', 0.05)):.0%} allowed",
            }
        )
    if settings.get("spurious_rate_estimate") is not None:
        rows.append(
            {
                "setting": "estimated spurious moves per subscriber and pair of periods",
                "value": f"{float(settings['spurious_rate_estimate']):.2g}",
                "chosen_by": "moves out and back; the prior centre of spurious_rate "
                "(model option spurious_relocations)",
            }
        )
    if settings.get("period"):
        rows.append({"setting": "home period", "value": str(settings["period"]), "chosen_by": ""})
    periods = []
    diag_path = folder / "cdr_diagnostics.csv"
    if diag_path.exists():
        diag = pd.read_csv(diag_path, dtype={"period": str})
        wide = diag.pivot_table(
            index="period", columns="statistic", values="value", aggfunc="first"
        )
        for period, row in wide.iterrows():
            periods.append(
                {
                    "period": str(period),
                    "active": _fmt(row.get("active_subscribers"), 0),
                    "share_with_home": f"{float(row['share_with_home']):.0%}"
                    if pd.notna(row.get("share_with_home"))
                    else "–",
                }
            )
    rule = []
    rule_path = folder / "cdr_home_rule.csv"
    if rule_path.exists():
        table = pd.read_csv(rule_path)
        used = table.get("used", pd.Series(False, index=table.index)).astype(bool)
        # candidates that leave under 5% of subscribers a home say nothing (their
        # spurious-move estimate rests on a handful of people)
        table = table.loc[(table["share_with_home"] >= 0.05) | used]
        for _, row in table.iterrows():
            spurious = float(row["spurious_share"])
            rule.append(
                {
                    "min_active_days": int(row["min_active_days"]),
                    "share_with_home": f"{float(row['share_with_home']):.0%}",
                    "spurious_share": "–"
                    if not np.isfinite(spurious)
                    else ("> 100%" if spurious > 1 else f"{spurious:.1%}"),
                    "used": bool(used.loc[row.name]),
                }
            )
    return {"source": source, "settings": rows, "periods": periods, "rule": rule}


def _unit_country_series(data: xr.Dataset) -> pd.Series | None:
    if "country" not in data or "unit" not in data.dims:
        return None
    return pd.Series(
        np.asarray(data["country"].values).astype(str), index=data["unit"].values.astype(str)
    )


def _source_countries(data: xr.Dataset) -> str:
    """Return a sentence naming the countries each flow source observes.

    A source is *in* a country when it observes pairs within it (a census is
    taken, an operator covers it); cross-border cells are named separately, so
    a census that enumerates in-migrants from abroad is not said to be in every
    origin country.
    """
    coverage = data_coverage(data)
    parts = []
    for row in coverage["sources"]:
        if row["countries"] == "–":
            continue
        cross = f" (+ {row['cross_border']:,} cross-border pairs)" if row["cross_border"] else ""
        parts.append(f"{row['source']} in {row['countries']}{cross}")
    if not parts:
        return ""
    missing = coverage["uncovered"]
    tail = f"; no flow data in {', '.join(missing)}" if missing else ""
    return "Data: " + "; ".join(parts) + tail + ". "


# ------------------------------------------------------------------------------ maps
#: Width of the interactive maps (SVG user units).
MAP_WIDTH = 960


class _Projection:
    """Equirectangular projection of lon/lat to SVG coordinates (y down), aspect kept."""

    def __init__(self, bounds: tuple[float, float, float, float], width: int = MAP_WIDTH):
        x0, y0, x1, y1 = bounds
        self.kx = float(np.cos(np.deg2rad((y0 + y1) / 2)))
        span_x = max((x1 - x0) * self.kx, 1e-9)
        span_y = max(y1 - y0, 1e-9)
        self.margin = 10.0
        self.scale = (width - 2 * self.margin) / span_x
        self.x0, self.y1 = x0, y1
        self.width = width
        self.height = round(span_y * self.scale + 2 * self.margin)

    def __call__(self, lon: Any, lat: Any) -> tuple[np.ndarray, np.ndarray]:
        x = (np.asarray(lon, dtype=float) - self.x0) * self.kx * self.scale + self.margin
        y = (self.y1 - np.asarray(lat, dtype=float)) * self.scale + self.margin
        return x, y

    def path(self, geom: Any) -> str:
        """SVG path data of a (multi)polygon or line geometry."""
        parts: list[str] = []

        def ring(coords: Any, close: bool) -> None:
            arr = np.asarray(coords, dtype=float)
            if arr.size == 0:
                return
            x, y = self(arr[:, 0], arr[:, 1])
            pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(x, y, strict=True))
            parts.append(f"M{pts}{'Z' if close else ''}")

        kind = geom.geom_type
        if kind == "Polygon":
            ring(geom.exterior.coords, True)
            for hole in geom.interiors:
                ring(hole.coords, True)
        elif kind in ("MultiPolygon", "GeometryCollection", "MultiLineString"):
            for g in geom.geoms:
                parts.append(self.path(g))
        elif kind in ("LineString", "LinearRing"):
            ring(geom.coords, kind == "LinearRing")
        return "".join(parts)


def _diverging(values: np.ndarray, limit: float) -> list[str]:
    """Hex colours of a blue (gain) - white - red (loss) scale symmetric about 0."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["RdBu"]
    limit = limit if limit > 0 else 1.0
    out = []
    for v in values:
        out.append(
            "#cccccc"
            if not np.isfinite(v)
            else to_hex(cmap(0.5 + 0.5 * np.clip(v / limit, -1, 1)))
        )
    return out


def map_layers(
    data: xr.Dataset,
    predictions: xr.Dataset,
    *,
    units_geometry: Any = None,
    totals: xr.Dataset | None = None,
    top_k: int = 200,
    observed: xr.Dataset | None = None,
) -> dict[str, Any] | None:
    """Everything the two interactive SVG maps draw: units, borders, flows, net migration.

    Returns None when the units have no ``lon``/``lat``. Flow records carry
    the exact values of ``predictions`` (``mean``, ``q05``, ``q95``) as data
    attributes, so the map can be checked against ``flows.csv``.
    """
    if "lon" not in data or "lat" not in data:
        return None
    ids = data["unit"].values.astype(str)
    lon = pd.Series(np.asarray(data["lon"].values, dtype=float), index=ids)
    lat = pd.Series(np.asarray(data["lat"].values, dtype=float), index=ids)
    country = _unit_country_series(data)
    geo = _geometry_frame(units_geometry, ids) if units_geometry is not None else None
    if geo is not None and len(geo):
        bounds = tuple(float(b) for b in geo.total_bounds)
    else:
        pad_x = max(float(np.ptp(lon)) * 0.05, 0.1)
        pad_y = max(float(np.ptp(lat)) * 0.05, 0.1)
        bounds = (lon.min() - pad_x, lat.min() - pad_y, lon.max() + pad_x, lat.max() + pad_y)
    proj = _Projection(bounds)
    tolerance = (bounds[2] - bounds[0]) / MAP_WIDTH * 0.75
    x, y = proj(lon.to_numpy(), lat.to_numpy())
    pos = {u: (float(a), float(b)) for u, a, b in zip(ids, x, y, strict=True)}

    # units: polygons (simplified to about a pixel) or points
    population = (
        pd.Series(np.asarray(data["population"].values, dtype=float), index=ids)
        if "population" in data
        else None
    )
    net = totals_unit = None
    if totals is not None and "unit_net_mean" in totals:
        totals_unit = totals
        net = pd.Series(
            np.asarray(totals["unit_net_mean"].values, dtype=float),
            index=totals["unit"].values.astype(str),
        )
    rate = None
    if net is not None and population is not None:
        rate = net.reindex(ids) / population.reindex(ids).where(population > 0) * 1000
    shade = rate if rate is not None else net.reindex(ids) if net is not None else None
    limit = (
        float(np.nanquantile(np.abs(shade.to_numpy()), 0.95))
        if shade is not None and shade.notna().any()
        else 1.0
    )
    fills = (
        _diverging(shade.reindex(ids).to_numpy(), limit)
        if shade is not None
        else ["#e8ecef"] * len(ids)
    )
    units = []
    for k, uid in enumerate(ids):
        tip = [f"{uid}" + (f" ({country[uid]})" if country is not None else "")]
        if population is not None and np.isfinite(population[uid]):
            tip.append(f"population {population[uid]:,.0f}")
        uncertain = False
        if totals_unit is not None:
            inn = _estimate(totals_unit, "unit_in", unit=uid)
            out = _estimate(totals_unit, "unit_out", unit=uid)
            nt = _estimate(totals_unit, "unit_net", unit=uid, signed=True)
            uncertain = not nt["excludes_zero"]
            tip += [
                f"in-migration {inn['mean']} (90%: {inn['interval']})",
                f"out-migration {out['mean']} (90%: {out['interval']})",
                f"net migration {nt['mean']} (90%: {nt['interval']})",
            ]
            if rate is not None and np.isfinite(rate[uid]):
                tip.append(f"net rate {rate[uid]:+.1f} per 1,000 residents over the period")
        shape = None
        if geo is not None and uid in geo.index:
            g = geo.geometry[uid]
            if g is not None and not g.is_empty:
                shape = proj.path(g.simplify(tolerance, preserve_topology=True))
        units.append(
            {
                "id": uid,
                "country": country[uid] if country is not None else "",
                "d": shape,
                "x": f"{pos[uid][0]:.1f}",
                "y": f"{pos[uid][1]:.1f}",
                "fill": fills[k],
                "uncertain": uncertain,
                "net": repr(float(net[uid])) if net is not None and uid in net else "",
                "tip": " · ".join(tip),
            }
        )

    borders, labels = [], []
    if geo is not None and country is not None and len(geo):
        with contextlib.suppress(Exception):
            nations = geo.assign(country=country.reindex(geo.index).to_numpy()).dissolve("country")
            for code, shape in nations.geometry.items():
                borders.append(proj.path(shape.boundary.simplify(tolerance)))
                point = shape.representative_point()
                lx, ly = proj(point.x, point.y)
                labels.append(
                    {"text": str(code), "x": f"{float(lx):.1f}", "y": f"{float(ly):.1f}"}
                )
    elif country is not None:
        for code, group in lon.groupby(country.reindex(ids).to_numpy()):
            lx, ly = proj(group.mean(), lat[group.index].mean())
            labels.append({"text": str(code), "x": f"{float(lx):.1f}", "y": f"{float(ly):.1f}"})

    # flows: the top_k largest, curved to the right of the direction of travel
    obs = (
        observed["observed"].transpose("origin", "destination")
        if observed is not None and "observed" in observed
        else None
    )
    table = flows_table(predictions, data=data, top_k=top_k)
    lo, hi = INTERVAL
    vmax = float(table["mean"].max()) if len(table) else 1.0
    flows = []
    for r in table.iloc[::-1].itertuples(index=False):  # largest drawn last (on top)
        r = r._asdict()
        (x0, y0), (x1, y1) = pos[r["origin"]], pos[r["destination"]]
        dx, dy = x1 - x0, y1 - y0
        cx, cy = (x0 + x1) / 2 - 0.15 * dy, (y0 + y1) / 2 + 0.15 * dx
        share = float(np.sqrt(max(r["mean"], 0) / vmax)) if vmax > 0 else 0.0
        cross = bool(r.get("cross_border", False))
        seen = np.nan
        if obs is not None:
            with contextlib.suppress(KeyError):
                seen = float(obs.sel(origin=r["origin"], destination=r["destination"]).values)
        tip = (
            f"{r['origin']} → {r['destination']}"
            + (" (cross-border)" if cross else "")
            + f": {_persons(r['mean'])} persons (90%: {_interval(r.get(lo), r.get(hi))})"
            + (f"; observed {_persons(seen)} (population scale)" if np.isfinite(seen) else "")
        )
        flows.append(
            {
                "o": r["origin"],
                "d": r["destination"],
                "path": f"M{x0:.1f},{y0:.1f} Q{cx:.1f},{cy:.1f} {x1:.1f},{y1:.1f}",
                "width": f"{0.4 + 6.0 * share:.2f}",
                "opacity": f"{0.35 + 0.6 * share:.2f}",
                "color": CROSS_COLOR if cross else WITHIN_COLOR,
                "cross": cross,
                "mean": repr(float(r["mean"])),
                "q05": repr(float(r[lo])) if lo in r else "",
                "q95": repr(float(r[hi])) if hi in r else "",
                "tip": tip,
            }
        )
    legend_rate = rate is not None
    return {
        "width": proj.width,
        "height": proj.height,
        "units": units,
        "borders": borders,
        "labels": labels,
        "flows": flows,
        "n_flows": len(flows),
        "largest": _persons(vmax),
        "smallest": _persons(float(table["mean"].min())) if len(table) else "–",
        "has_net": net is not None,
        "net_limit": f"{limit:,.1f}" if legend_rate else _persons(limit),
        "net_unit": "per 1,000 residents over the period" if legend_rate else "persons",
        "net_colors": _diverging(np.linspace(-limit, limit, 9), limit),
        "polygons": geo is not None,
    }


# ---------------------------------------------------------------------------- render
def _png(fig: Any, path: Path) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return base64.b64encode(data).decode("ascii")


def _environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.PackageLoader("flowmodel.outputs", "templates"),
        autoescape=jinja2.select_autoescape(["html", "j2"], default=True),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
    )
    return env


def render_report(context: Mapping[str, Any]) -> str:
    """Render ``report.html.j2`` (the package's template) with ``context``."""
    return _environment().get_template("report.html.j2").render(**context)


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
    totals: xr.Dataset | None = None,
    period: str | None = None,
    cdr_folders: Mapping[str, str | os.PathLike[str]] | None = None,
) -> Path:
    """Write ``report.html`` (one self-contained file, offline) and its PNG figures into ``out_dir``.

    The page opens with the answers: how many people moved, how many crossed a
    border, per-country immigration, emigration, net and internal migration and
    the largest flows, each with a 90% interval, over the period the flows
    cover; a banner says whether the fit can be trusted (R-hat, ESS,
    divergences, Pareto k; approximate fits flagged). Then a net-migration map
    and an interactive flow map (pan, zoom, hover; inline SVG and a few lines
    of JavaScript, nothing loaded from the network), the data coverage of each
    source, and the model checks. Rendered from the jinja2 template
    ``flowmodel/outputs/templates/report.html.j2``.

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
        The fitted model (diagnostics, posterior vs prior, truth table).
    metrics
        Metrics to show (dict or DataFrame); default :func:`flow_metrics` of
        ``predictions`` against the observed flows (in sample).
    cv
        Output of :func:`flowmodel.evaluate.cross_validate`.
    truth
        Known parameters (e.g. the simulator's); adds a true-vs-estimated
        table and, with ``truth["mu"]``, the recovery of the true expected flows.
    units_geometry
        Unit polygons for the maps (else points at the centroids).
    observed
        Observed flows as recorded; default ``data["flow_<source>"]`` when present.
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
        Flows drawn on the maps.
    prior
        DataTree with a ``prior`` group; default: the ``prior`` group that
        :meth:`~flowmodel.models.base.FlowModel.fit` stores in the posterior file.
    attrs
        Provenance shown at the foot (e.g. :func:`provenance_attrs`); its
        ``period`` labels the flows when ``period`` is not given.
    notes
        Extra paragraphs (plain text) shown under the title.
    totals
        :func:`flowmodel.totals.predict_totals` of the flows; default
        ``model.predict_totals(data)`` when the model has it (else the summary
        lists only the largest flows).
    period
        The period the flows cover (default ``attrs["period"]``, else
        "unspecified (the census window)").
    cdr_folders
        ``{source: folder}`` of the prepare stage's CDR outputs (``cdr_<source>/``):
        the report shows how homes were detected (:func:`cdr_home_detection`).

    Returns
    -------
    pathlib.Path
        Path of ``report.html``.
    """
    from flowmodel.dataset import flow_sources
    from flowmodel.outputs.io import DEFAULT_PERIOD, population_scale

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    notes = list(notes)
    attrs = dict(attrs or {})
    period = period or attrs.get("period") or DEFAULT_PERIOD
    if observed is None:
        sources = flow_sources(data)
        if source is None and len(sources) == 1:
            source = sources[0]
        if source is not None and f"flow_{source}" in data:
            observed = data[f"flow_{source}"]
    if observed is not None and "period" in observed.dims:
        observed = observed.sum("period", min_count=1)
    exposure = data.get(f"exposure_{source}") if source is not None else None
    observed_pop = None
    if observed is not None and set(observed.dims) == {"origin", "destination"}:
        observed_pop = population_scale(observed.reindex_like(predictions["mean"]), exposure)
    if totals is None and model is not None and hasattr(model, "predict_totals"):
        try:
            totals = model.predict_totals(data)
        except Exception as err:  # pragma: no cover - depends on the model
            notes.append(f"Totals unavailable ({err}).")

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
                    notes.append(
                        f"Observed-scale predictions unavailable ({err}); observed "
                        f"{source} counts are compared with population-scale predictions."
                    )
            else:
                notes.append(
                    f"flow_{source} has an exposure (sample fraction) and no model was given: "
                    "the predictions are compared with the observed counts as given, so they "
                    "should be on the observed (sample) scale."
                )
    fraction = ""
    if exposure is not None and observed_predictions is not predictions:
        values = np.asarray(exposure.values, dtype=float)
        values = np.unique(np.round(values[np.isfinite(values)], 6))
        fraction = f"{values[0]:g}" if values.size == 1 else f"{values.min():g}–{values.max():g}"
        scale_note = (
            f" The {source} counts are a sample (exposure = sample fraction {fraction}), so the "
            "predictions in this section are on the same sample scale: population-scale flows "
            "× sample fraction, with the sampling noise."
        )

    figures: dict[str, dict[str, str]] = {}

    def figure(fig: Any, name: str, caption: str) -> None:
        if fig is not None:
            figures[name.removesuffix(".png")] = {
                "name": name,
                "b64": _png(fig, out / name),
                "caption": caption,
            }

    n_units = data.sizes["unit"]
    countries = (
        sorted(set(np.asarray(data["country"].values).astype(str))) if "country" in data else []
    )
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
            + _source_countries(data)
            + "Units are shaded by population"
            + (
                " (polygons)."
                if units_geometry is not None
                else " (points at population-weighted centroids)."
            )
            if has_xy
            else "The units have no coordinates, so flows are shown as an origin × destination "
            "matrix of posterior mean flows (persons, log colour scale)."
        ),
    )
    observed_any = observed is not None and bool(
        np.isfinite(np.asarray(observed.values, dtype=float)).any()
    )
    if observed_any:
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
            "Each point is an observed origin–destination pair: observed flow against the "
            "posterior predictive mean, with the 90% predictive interval (q05–q95) as a "
            "vertical line; blue points lie inside their interval, orange ones outside. Axes "
            "are logarithmic above 1 person and linear below, so observed zeros are shown; "
            "censored (suppressed or redacted) cells have no single observed value and are not "
            "drawn. These are in-sample predictions; see the cross-validation table (when run) "
            "for held-out performance." + scale_note,
        )
        figure(
            plot_calibration(observed, observed_predictions, cv=cv),
            "calibration.png",
            "Left: shares of observed flows strictly below and at or below each predicted "
            "quantile q_p; counts are discrete, so for a calibrated model the shaded band "
            "between them contains the diagonal. Right: share of observed flows inside the 50% "
            "and 90% predictive intervals; the dashed lines are the nominal levels. Held-out "
            "bars come from the cross-validation (when run)." + scale_note,
        )
        if metrics is None:
            metrics = flow_metrics(observed, observed_predictions)

    cv_context = None
    if cv is not None and not cv.empty:
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
        cv_context = {
            "scheme": ", ".join(sorted(set(cv.get("scheme", pd.Series(["?"])).astype(str)))),
            "summary": _table(summarize_cv(cv)),
            "folds": _table(cv[cols]),
        }

    banner: list[dict[str, str]] = []
    parameters = None
    true_vs_estimated = None
    if model is not None and getattr(model, "_idata", None) is not None:
        idata = model.idata
        tree = idata
        if prior is not None and "prior" in prior.children and "prior" not in idata.children:
            tree = xr.DataTree.from_dict(
                {
                    "posterior": idata["posterior"].to_dataset(),
                    "prior": prior["prior"].to_dataset(),
                }
            )
        if "prior" not in tree.children:
            notes.append("Prior draws unavailable: the posterior file has no 'prior' group.")
        fit_meta = _fit_meta(model, idata)
        try:
            summary = model.summary(ci_prob=0.9)
        except Exception as err:
            summary = None
            notes.append(f"Posterior summary unavailable: {err}")
        banner = diagnostics(model, summary=summary)
        figure(
            plot_posterior_prior(tree),
            "posterior_prior.png",
            "Posterior (blue) and prior (grey) of each parameter on the model's internal scale "
            "(covariates standardised). A posterior much narrower than its prior means the data "
            "inform the parameter; one that sits on the prior means they do not.",
        )
        cells, censored = fit_meta.get("n_cells"), fit_meta.get("n_censored")
        by_source = []
        if isinstance(cells, Mapping) and isinstance(censored, Mapping):
            by_source = [
                f"{src}: {int(n):,} cells, {int(censored.get(src, 0)):,} censored"
                for src, n in cells.items()
            ]
        shown = None
        if summary is not None:
            shown = summary.copy()
            for col in ("ess_bulk", "ess_tail"):
                if col in shown:
                    # ESS are counts of draws: whole numbers read better
                    shown[col] = (
                        shown[col]
                        .map(lambda v: round(v) if np.isfinite(v) else np.nan)
                        .astype(object)
                    )
        parameters = {
            "model": type(model).__name__,
            "backend": str(fit_meta.get("backend", "?")),
            "config": json.dumps(getattr(model, "model_config", {}), default=str),
            "by_source": by_source,
            "summary": _table(shown, index=True) if shown is not None else None,
            "divergences": summary.attrs.get("divergences", 0) if summary is not None else 0,
        }
        if truth is not None:
            tt = truth_table(model, truth, ci_prob=0.9)
            true_vs_estimated = {
                "table": _table(tt),
                "covered": int(tt["covered"].fillna(False).sum()),
                "n": int(tt["covered"].notna().sum()),
            }

    recovery = None
    true_mu = _truth_flows(truth) if truth is not None else None
    if true_mu is not None:
        mu = true_mu.reindex_like(predictions["mean"])
        rec = flow_metrics(mu, predictions)
        true_flow = _truth_flows(truth or {}, "flow")
        realised = true_flow.reindex_like(predictions["mean"]) if true_flow is not None else None
        groups = recovery_table(mu, predictions, data, truth or {}, realised=realised)
        recovery = {
            "cpc": f"{rec['cpc']:.3f}",
            "pearson": f"{rec['pearson_log']:.3f}",
            "covered": (
                "share of the realised true flows inside the 90% predictive interval "
                f"{flow_metrics(realised, predictions)['coverage_90']:.1%}"
                if realised is not None
                else f"share of true μ inside the 90% predictive interval {rec['coverage_90']:.1%}"
            ),
            "against": "realised true flows" if realised is not None else "true μ",
            "groups": _table(groups) if not groups.empty else None,
        }
    share_rows = _market_share_recovery(model, truth) if truth is not None else []

    provenance = [
        ("flowmodel version", __version__),
        ("generated", _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")),
        ("units", f"{n_units:,}"),
        ("countries", ", ".join(countries[:20]) + (" …" if len(countries) > 20 else "")),
        ("flow source", source or "–"),
    ]
    files = []
    if attrs.get("input_files"):
        with contextlib.suppress(Exception):
            files = json.loads(attrs["input_files"])
    skip = {"input_files", "period", "time_coverage_start", "time_coverage_end"}
    provenance += [(str(k), str(v)) for k, v in attrs.items() if k not in skip]
    coverage = data_coverage(data)
    try:
        shares_rows = cdr_only_shares(model, data, coverage["cdr_only"])
    except Exception as err:  # pragma: no cover - depends on the model
        shares_rows = []
        notes.append(
            f"The market shares of {', '.join(coverage['cdr_only'])} are unavailable ({err})."
        )
    context = {
        "title": title,
        "period": period,
        "period_known": period != DEFAULT_PERIOD,
        "n_units": n_units,
        "n_countries": len(countries),
        "notes": notes,
        "banner": banner,
        "summary": summary_tables(totals, predictions, data, observed=observed_pop),
        "has_totals": totals is not None,
        "maps": map_layers(
            data,
            predictions,
            units_geometry=units_geometry,
            totals=totals,
            top_k=top_k,
            observed=observed_pop,
        ),
        "coverage": coverage,
        "cdr_only_shares": shares_rows,
        "home_detection": [
            h
            for name, folder in (cdr_folders or {}).items()
            if (h := cdr_home_detection(folder, name)) is not None
        ],
        "figures": figures,
        "metrics": _table(_metrics_frame(metrics)) if metrics is not None else None,
        "sample_scale": scale_note != "",
        "fraction": fraction,
        "cv": cv_context,
        "parameters": parameters,
        "truth": true_vs_estimated,
        "recovery": recovery,
        "market_share": share_rows,
        "provenance": provenance,
        "input_files": files,
        "version": __version__,
    }
    page = render_report(context)
    path = out / "report.html"
    with atomic_path(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
