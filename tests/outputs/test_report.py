"""The HTML report: files exist, PNGs are real images, the HTML embeds and links them."""

from __future__ import annotations

import base64
import re
import warnings

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
from shapely.geometry import Point

from flowmodel.evaluate import cross_validate, glm_baseline
from flowmodel.outputs.report import (
    plot_calibration,
    plot_flow_map,
    plot_observed_vs_predicted,
    plot_posterior_prior,
    report,
    truth_table,
)
from flowmodel.simulate import simulate_flow_dataset

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def world():
    ds, truth = simulate_flow_dataset(30, 3, seed=21)
    pred = glm_baseline(ds, pair_covariates=["cross_border"])
    return ds, truth, pred


def _check_report(path, expected_pngs):
    html = path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and html.rstrip().endswith("</html>")
    embedded = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(embedded) == len(expected_pngs)
    for name in expected_pngs:
        png = path.parent / name
        assert png.exists() and png.stat().st_size > 5000
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f'href="{name}"' in html  # the HTML references the sibling PNG
        assert base64.b64encode(png.read_bytes()).decode() in embedded  # and embeds the same image
    return html


def test_report_without_model(tmp_path, world):
    ds, truth, pred = world
    cv = cross_validate(
        None, ds, folds=2, baselines=True, glm_kwargs={"pair_covariates": ["cross_border"]}
    )
    path = report(
        tmp_path / "rep",
        data=ds,
        predictions=pred,
        cv=cv,
        truth=truth,
        title="Simulated world",
        attrs={"data_sources": "simulate_flow_dataset(seed=21)"},
    )
    assert path.name == "report.html"
    html = _check_report(path, ["flow_map.png", "observed_vs_predicted.png", "calibration.png"])
    for text in (
        "Simulated world",
        "Cross-validation",
        "glm_baseline",
        "radiation_baseline",
        "CPC",
        "Recovery of the true expected flows",
        "simulate_flow_dataset(seed=21)",
        "90% interval coverage",
    ):
        assert text in html
    assert "posterior_prior.png" not in html


def test_report_without_coordinates_draws_matrix(tmp_path, world):
    ds, _, pred = world
    path = report(tmp_path, data=ds.drop_vars(["lon", "lat"]), predictions=pred)
    html = _check_report(path, ["flow_map.png", "observed_vs_predicted.png", "calibration.png"])
    assert "origin × destination matrix" in html


def test_flow_map_with_polygons_and_figures(world):
    ds, _, pred = world
    geo = gpd.GeoDataFrame(
        {"unit_id": ds["unit"].values},
        geometry=[
            Point(x, y).buffer(0.3)
            for x, y in zip(ds["lon"].values, ds["lat"].values, strict=True)
        ],
        crs="EPSG:4326",
    ).to_crs("EPSG:3857")
    fig = plot_flow_map(ds, pred, units_geometry=geo, top_k=25)
    ax = fig.axes[0]
    assert len(ax.lines) == 25  # one line per drawn flow
    assert len(ax.collections) >= 1  # the polygons
    colors = {
        tuple(
            np.round(line.get_color() if not isinstance(line.get_color(), str) else (0, 0, 0), 3)
        )
        for line in ax.lines
    }
    assert colors
    fig2 = plot_observed_vs_predicted(ds["flow_census"], pred)
    assert fig2.axes[0].get_xscale() == "symlog"
    fig3 = plot_calibration(ds["flow_census"], pred)
    assert len(fig3.axes) == 2
    import matplotlib.pyplot as plt

    plt.close("all")


def test_cross_border_flows_highlighted(world):
    from flowmodel.outputs.report import CROSS_COLOR, WITHIN_COLOR

    ds, _, pred = world
    fig = plot_flow_map(ds, pred, top_k=400)
    colors = [line.get_color() for line in fig.axes[0].lines]
    table = pred["mean"].where(ds["origin"] != ds["destination"]).to_series().dropna()
    top = table.sort_values(ascending=False).head(400)
    n_cross = int(
        sum(ds["cross_border"].sel(origin=o, destination=d).item() for o, d in top.index)
    )
    assert colors.count(CROSS_COLOR) == n_cross > 0
    assert colors.count(WITHIN_COLOR) == 400 - n_cross


@pytest.mark.slow
def test_report_with_fitted_gravity_model(tmp_path):
    from flowmodel.models.gravity import GravityModel

    ds, truth = simulate_flow_dataset(40, 3, seed=5)
    model = GravityModel(destination_covariates=["log_population", "night_lights_per_capita"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1)
        pred = model.predict(ds)
        cv = cross_validate(model, ds, folds=2, backend="laplace")
    assert set(cv.loc[cv.model == "GravityModel", "backend"]) == {"laplace"}
    assert cv.loc[cv.model == "GravityModel", "cpc"].between(0.5, 1).all()
    path = report(tmp_path, data=ds, predictions=pred, model=model, cv=cv, truth=truth)
    html = _check_report(
        path,
        ["flow_map.png", "observed_vs_predicted.png", "calibration.png", "posterior_prior.png"],
    )
    assert "True vs estimated" in html and "beta[log_distance]" in html
    tt = truth_table(model, truth)
    row = tt.set_index("parameter").loc["beta[log_distance]"]
    assert row["estimate"] == pytest.approx(truth["beta"]["log_distance"], abs=0.2)
    assert tt["covered"].notna().sum() >= 5
    assert plot_posterior_prior(model.idata) is not None  # fit stores the prior group
    assert "Approximate fit (laplace)" in html  # the banner flags the Laplace fit
    assert isinstance(cv, pd.DataFrame)


class _SummaryStub:
    def summary(self, *, ci_prob=0.94):
        rows = {
            "intercept_raw": (-7.4, -7.6, -7.2),
            "beta_raw[log_distance]": (-1.3, -1.35, -1.25),
            "phi": (5.5, 5.0, 6.0),
        }
        return pd.DataFrame(
            [{"mean": m, "eti_lo": lo, "eti_hi": hi} for m, lo, hi in rows.values()],
            index=list(rows),
        )


def test_truth_table_uses_raw_scale_and_known_nodes_only():
    truth = {
        "intercept": -7.5,
        "beta": {"log_distance": -1.4, "cross_border": -1.5},
        "phi": 5.0,
        "market_share": {"U1": 0.2},
        "true_flows": "true_flows.csv",
        "sample_fraction": 0.1,
    }
    table = truth_table(_SummaryStub(), truth).set_index("parameter")
    assert list(table.index) == ["intercept", "beta[log_distance]", "phi"]
    assert table.loc["intercept", "estimate"] == -7.4 and bool(table.loc["intercept", "covered"])
    assert not bool(table.loc["beta[log_distance]", "covered"])  # -1.4 outside [-1.35, -1.25]
    assert bool(table.loc["phi", "covered"])  # closed interval [5.0, 6.0]


def test_source_sentence_names_where_each_source_is_not_every_origin():
    """A census of in-migrants observes pairs from every country; it is *in* its own only."""
    from flowmodel.outputs.report import _source_countries

    ds, _ = simulate_flow_dataset(30, 3, seed=1)
    country = ds["country"].values.astype(str)
    into_c00 = np.broadcast_to(country[None, :] == "C00", (30, 30)) & ~np.eye(30, dtype=bool)
    ds["flow_census"] = ds["flow_census"].where(into_c00)
    n_cross = int((into_c00 & (country[:, None] != "C00")).sum())
    sentence = _source_countries(ds)
    assert sentence.startswith(f"Data: census in C00 (+ {n_cross:,} cross-border pairs)")
    assert "no flow data in C01, C02" in sentence
