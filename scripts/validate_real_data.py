#!/usr/bin/env python
"""Validate flowmodel on the real data sets (docs/validation.md).

Runs a known-truth check and three studies on the shared data (``$FLOWMODEL_DATA``, default
``../shared/data``) and writes, per study, the outputs flowmodel produces
(``flows.nc``, ``flows.csv``, ``units.gpkg``, ``flows.gpkg`` where the units
have coordinates, ``posterior.nc``, ``report.html`` + PNGs) and
``results.json`` / ``results.md`` with every number quoted in
docs/validation.md:

- ``simulated``: the in-memory simulated world (120 units, 3 countries, one
  with no observed flows): true vs estimated parameters and flows,
  leave-one-country-out CV.
- ``austria``: 9 NUTS-2 regions (spint). Unconstrained and doubly constrained
  gravity (Poisson likelihood, exponential cost, as spint's tests) against
  spint's published estimates; held-out-pair CV of a negative-binomial gravity
  model against the MLE (GLM) and radiation baselines.
- ``ny``: New York commuting (scikit-mobility): county polygons -> units ->
  distances from centroids -> production-constrained gravity (power cost) on
  the listed pairs (as skmob fits it), compared with skmob's published fit;
  held-out-pair CV.
- ``kenya``: units = Voronoi cells of WorldPop's KEN unit centroids clipped to
  Kenya's Natural Earth outline; population from the AfriPop 2010 raster via
  ``zonal_covariates``; gravity fitted to WorldPop's published 2010 estimates
  (rounded); how closely the raster-built model reproduces their surface.

Usage::

    FLOWMODEL_DATA=../shared/data .venv/bin/python scripts/validate_real_data.py \
        --out runs/validation [--only simulated austria ny kenya] [--backend auto] [--cv-backend laplace]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from flowmodel.dataset import build_dataset  # noqa: E402
from flowmodel.evaluate import (  # noqa: E402
    cross_validate,
    flow_metrics,
    glm_baseline,
    radiation_baseline,
    summarize_cv,
)
from flowmodel.outputs.io import (  # noqa: E402
    provenance_attrs,
    write_flow_lines,
    write_flows,
    write_flows_csv,
    write_posterior,
    write_units,
)
from flowmodel.outputs.report import report  # noqa: E402

SEED = 20260101
METRIC_COLS = [
    "cpc",
    "log_rmse",
    "pearson_log",
    "spearman_log",
    "coverage_50",
    "coverage_90",
    "width_90",
]


def data_root() -> Path:
    return Path(os.environ.get("FLOWMODEL_DATA", REPO.parent / "shared" / "data"))


def md_table(frame: pd.DataFrame, floatfmt: str = ".4g") -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    for row in frame.itertuples(index=False):
        cells = []
        for v in row:
            if isinstance(v, float | np.floating):
                cells.append("–" if not np.isfinite(v) else format(v, floatfmt))
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fit_model(
    model: Any, ds: xr.Dataset, backend: str, draws: int, tune: int
) -> tuple[float, str]:
    t0 = time.perf_counter()
    kwargs: dict[str, Any] = {}
    if backend in ("pymc", "nutpie", "numpyro", "auto"):
        kwargs.update(draws=draws, tune=tune)
    model.fit(ds, backend=backend, random_seed=SEED, **kwargs)
    return time.perf_counter() - t0, model.fit_meta.get("backend", backend)


def raw_coefficients(model: Any, ci_prob: float = 0.9) -> pd.DataFrame:
    s = model.summary(ci_prob=ci_prob)
    keep = [i for i in s.index if i.startswith(("intercept_raw", "beta_raw", "phi"))]
    out = s.loc[keep, ["mean", "sd", "eti_lo", "eti_hi", "r_hat", "ess_bulk"]].reset_index()
    return out.rename(columns={"index": "parameter"})


def write_outputs(
    out: Path,
    ds: xr.Dataset,
    pred: xr.Dataset,
    model: Any,
    *,
    source: str,
    sources: list[str],
    geometry: Any = None,
    **report_kwargs: Any,
) -> dict[str, str]:
    attrs = provenance_attrs(model=model, seed=SEED, data_sources=sources, data=ds)
    paths = {
        "flows.nc": write_flows(
            pred, out / "flows.nc", observed=ds[f"flow_{source}"], attrs=attrs
        ),
        "flows.csv": write_flows_csv(
            pred, out / "flows.csv", observed=ds[f"flow_{source}"], data=ds, attrs=attrs
        ),
        "posterior.nc": write_posterior(model.idata, out / "posterior.nc", attrs=attrs),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        paths["units.gpkg"] = write_units(ds, out / "units.gpkg", geometry=geometry, attrs=attrs)
    if "lon" in ds and "lat" in ds:
        paths["flows.gpkg"] = write_flow_lines(
            pred, ds, out / "flows.gpkg", top_k=500, observed=ds[f"flow_{source}"], attrs=attrs
        )
    paths["report.html"] = report(
        out,
        data=ds,
        predictions=pred,
        model=model,
        units_geometry=geometry,
        attrs=attrs,
        **report_kwargs,
    )
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------- Austria
SPINT = {
    "unconstrained": {
        "intercept": -7.95447436,
        "origin:log_o_var": 0.863867812,
        "destination:log_d_var": 0.880474585,
        "distance": -0.00620544765,
    },
    "doubly": {"intercept": 6.20471518, "distance": -0.00791533},
}


def austria_dataset() -> xr.Dataset:
    t = pd.read_csv(data_root() / "austria_migration_spint" / "austria_spint_test_arrays.csv")
    ov = t.groupby("origin")["o_var"].first()
    dv = t.groupby("destination")["d_var"].first().reindex(ov.index)
    # no populations are given: population := o_var (spint's origin mass), used only by radiation
    units = pd.DataFrame(
        {
            "unit_id": ov.index,
            "country": "AT",
            "population": ov.to_numpy(),
            "o_var": ov.to_numpy(),
            "d_var": dv.to_numpy(),
        }
    )
    pairs = t.rename(columns={"dij": "distance_km"})[["origin", "destination", "distance_km"]]
    flows = {"census": t.rename(columns={"flow": "count"})[["origin", "destination", "count"]]}
    return build_dataset(
        units,
        pairs=pairs,
        flows=flows,
        attrs={"data_sources": "spint austria_spint_test_arrays.csv (Dennett 2012)"},
    )


def run_austria(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from flowmodel.models.gravity import GravityModel

    ds = austria_dataset()
    res: dict[str, Any] = {
        "n_units": ds.sizes["unit"],
        "n_pairs": int(np.isfinite(ds.flow_census).sum()),
    }
    rows = []
    common = {
        "cost_func": "exp",
        "cross_border": False,
        "country_effects": False,
        "likelihood": "poisson",
    }
    models = {
        "unconstrained": GravityModel(
            origin_covariates=["log_o_var"], destination_covariates=["log_d_var"], **common
        ),
        "doubly": GravityModel(
            constraint="doubly", origin_covariates=[], destination_covariates=[], **common
        ),
    }
    fitted = {}
    for name, model in models.items():
        seconds, used = fit_model(model, ds, args.backend, args.draws, args.tune)
        coefs = raw_coefficients(model).set_index("parameter")
        fitted[name] = model
        for term, published in SPINT[name].items():
            label = "intercept_raw" if term == "intercept" else f"beta_raw[{term}]"
            if label not in coefs.index:
                continue
            c = coefs.loc[label]
            rows.append(
                {
                    "model": name,
                    "term": term,
                    "spint (MLE)": published,
                    "posterior mean": c["mean"],
                    "90% lower": c["eti_lo"],
                    "90% upper": c["eti_hi"],
                    "r_hat": c["r_hat"],
                    "backend": used,
                    "fit s": seconds,
                }
            )
    res["coefficients"] = pd.DataFrame(rows)
    # in-sample metrics of each fit next to the GLM
    msets = []
    for name, model in fitted.items():
        pred = model.predict(ds, seed=SEED)
        msets.append({"model": f"Bayesian {name} (Poisson)", **flow_metrics(ds.flow_census, pred)})
    nb_full = GravityModel(
        origin_covariates=["log_o_var"],
        destination_covariates=["log_d_var"],
        cost_func="exp",
        cross_border=False,
        country_effects=False,
        likelihood="negbin",
    )
    fit_model(nb_full, ds, args.backend, args.draws, args.tune)
    main_pred = nb_full.predict(ds, seed=SEED)
    msets.append(
        {"model": "Bayesian unconstrained (NB)", **flow_metrics(ds.flow_census, main_pred)}
    )
    glm_u = glm_baseline(
        ds, origin_covariates=["log_o_var"], destination_covariates=["log_d_var"], cost_func="exp"
    )
    glm_d = glm_baseline(ds, constraint="doubly", cost_func="exp")
    msets.append({"model": "GLM unconstrained (= spint)", **flow_metrics(ds.flow_census, glm_u)})
    msets.append({"model": "GLM doubly (= spint)", **flow_metrics(ds.flow_census, glm_d)})
    msets.append(
        {
            "model": "radiation (parameter-free)",
            **flow_metrics(ds.flow_census, radiation_baseline(ds)),
        }
    )
    res["in_sample"] = pd.DataFrame(msets)[["model", "deviance", *METRIC_COLS]]
    # held-out pairs: NB gravity vs MLE and radiation
    nb = GravityModel(
        origin_covariates=["log_o_var"],
        destination_covariates=["log_d_var"],
        cost_func="exp",
        cross_border=False,
        country_effects=False,
        likelihood="negbin",
    )
    t0 = time.perf_counter()
    cv = cross_validate(
        nb, ds, scheme="pairs", folds=args.folds, backend=args.cv_backend, seed=SEED
    )
    res["cv_seconds"] = time.perf_counter() - t0
    res["cv"] = summarize_cv(cv)[["model", "backend", "folds", "n_test", *METRIC_COLS]]
    res["outputs"] = write_outputs(
        out,
        ds,
        main_pred,
        nb_full,
        source="census",
        sources=["austria_migration_spint"],
        cv=cv,
        title="Austria inter-regional migration (spint): gravity model",
    )
    return res


# ---------------------------------------------------------------------------------- NY
SKMOB = {"destination:log_population": 0.6471759552223144, "log_distance": -1.9947152031914186}


def ny_dataset() -> tuple[xr.Dataset, Any]:
    import geopandas as gpd

    from flowmodel.inputs.units import validate_units

    folder = data_root() / "ny_commuting_skmob"
    raw = gpd.read_file(folder / "NY_counties_2011.geojson")
    units = gpd.GeoDataFrame(
        {"unit_id": raw["tile_id"].astype(str), "country": "USA-NY"},
        geometry=raw.geometry,
        crs=raw.crs,
    )
    units = validate_units(units, source="NY_counties_2011.geojson", id_field="tile_id")
    units["population"] = raw["population"].astype(float).to_numpy()
    flows = pd.read_csv(
        folder / "NY_commuting_flows_2011.csv", dtype={"origin": str, "destination": str}
    )
    flows = flows.loc[flows.origin != flows.destination].rename(columns={"flow": "count"})
    ds = build_dataset(
        units,
        flows={"commuting": flows[["origin", "destination", "count"]]},
        attrs={
            "data_sources": "scikit-mobility NY_commuting_flows_2011.csv, NY_counties_2011.geojson"
        },
    )
    return ds, units


def run_ny(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from flowmodel.models.gravity import GravityModel

    ds, units = ny_dataset()
    res: dict[str, Any] = {
        "n_units": ds.sizes["unit"],
        "n_pairs": int(np.isfinite(ds.flow_commuting).sum()),
    }
    cfg = {
        "constraint": "production",
        "destination_covariates": ["log_population"],
        "cost_func": "pow",
        "cross_border": False,
        "country_effects": False,
    }
    _, glm = glm_baseline(
        ds, constraint="production", destination_covariates=["log_population"], return_fit=True
    )
    rows = [
        {
            "model": "skmob published",
            "term": t,
            "estimate": v,
            "90% lower": np.nan,
            "90% upper": np.nan,
        }
        for t, v in SKMOB.items()
    ]
    rows += [
        {
            "model": "flowmodel GLM baseline (MLE)",
            "term": t,
            "estimate": float(glm.params[t]),
            "90% lower": float(glm.conf_int(0.1).loc[t, 0]),
            "90% upper": float(glm.conf_int(0.1).loc[t, 1]),
        }
        for t in SKMOB
    ]
    fits = {}
    for lik in ("poisson", "negbin"):
        model = GravityModel(likelihood=lik, **cfg)
        seconds, used = fit_model(model, ds, args.backend, args.draws, args.tune)
        coefs = raw_coefficients(model).set_index("parameter")
        for t in SKMOB:
            c = coefs.loc[f"beta_raw[{t}]"]
            rows.append(
                {
                    "model": f"GravityModel production, {lik} ({used}, {seconds:.0f} s)",
                    "term": t,
                    "estimate": c["mean"],
                    "90% lower": c["eti_lo"],
                    "90% upper": c["eti_hi"],
                }
            )
        fits[lik] = model
    res["coefficients"] = pd.DataFrame(rows)
    model = fits["negbin"]
    pred = model.predict(ds, seed=SEED)
    msets = [
        {
            "model": f"GravityModel production, {lik}",
            **flow_metrics(ds.flow_commuting, m.predict(ds, seed=SEED)),
        }
        for lik, m in fits.items()
    ]
    msets.append(
        {
            "model": "GLM production (MLE)",
            **flow_metrics(ds.flow_commuting, glm_baseline(ds, constraint="production")),
        }
    )
    msets.append(
        {
            "model": "radiation (parameter-free)",
            **flow_metrics(ds.flow_commuting, radiation_baseline(ds)),
        }
    )
    res["in_sample"] = pd.DataFrame(msets)[["model", "deviance", *METRIC_COLS]]
    t0 = time.perf_counter()
    cv = cross_validate(
        GravityModel(likelihood="negbin", **cfg),
        ds,
        scheme="pairs",
        folds=args.folds,
        backend=args.cv_backend,
        seed=SEED,
    )
    res["cv_seconds"] = time.perf_counter() - t0
    res["cv"] = summarize_cv(cv)[["model", "backend", "folds", "n_test", *METRIC_COLS]]
    res["outputs"] = write_outputs(
        out,
        ds,
        pred,
        model,
        source="commuting",
        sources=["ny_commuting_skmob"],
        geometry=units,
        cv=cv,
        title="New York State commuting 2011: production-constrained gravity",
    )
    return res


# ------------------------------------------------------------------------------- Kenya
def kenya_units() -> Any:
    import geopandas as gpd
    import shapely

    root = data_root()
    cent = pd.read_csv(root / "worldpop_internal_migration_2010" / "AdminUnit_Centroids_all.csv")
    cent = cent.loc[cent["ISO"] == "KEN"].reset_index(drop=True)
    world = gpd.read_file(root / "naturalearth_countries_lowres" / "naturalearth_lowres.shp")
    kenya = world.loc[world["iso_a3"] == "KEN"].geometry.union_all()
    points = shapely.points(cent["lon"].to_numpy(), cent["lat"].to_numpy())
    cells = shapely.voronoi_polygons(
        shapely.MultiPoint(points), extend_to=kenya.envelope.buffer(2.0)
    )
    cells = list(shapely.get_parts(cells))
    # voronoi_polygons does not keep input order: match each cell to the point inside it
    geoms = []
    for p in points:
        cell = next(c for c in cells if c.covers(p))
        geoms.append(cell.intersection(kenya))
    units = gpd.GeoDataFrame(
        {"unit_id": cent["IPUMSID"].astype(str), "country": "KEN"}, geometry=geoms, crs="EPSG:4326"
    )
    return units


def kenya_dataset() -> tuple[xr.Dataset, Any]:
    from flowmodel.inputs.rasters import zonal_covariates

    root = data_root()
    units = kenya_units()
    cov = zonal_covariates(
        units,
        {"population": root / "kenya_population_raster_afripop2010" / "kenya_afripop2010_1km.tif"},
    )
    flows = pd.read_csv(
        root / "worldpop_internal_migration_2010" / "KEN_5yrs_InternalMigFlows_2010.csv"
    )
    table = pd.DataFrame(
        {
            "origin": flows["NODEI"].astype(str),
            "destination": flows["NODEJ"].astype(str),
            "count": np.round(flows["PrdMIG"].to_numpy()),
        }
    )
    ds = build_dataset(
        units,
        covariates=cov,
        flows={"worldpop": table},
        attrs={
            "data_sources": "WorldPop KEN_5yrs_InternalMigFlows_2010.csv (CC BY 4.0); "
            "AfriPop 2010 1 km raster; Natural Earth 1:110m"
        },
    )
    wp = pd.Series(
        flows["PrdMIG"].to_numpy(),
        index=pd.MultiIndex.from_arrays(
            [table["origin"], table["destination"]], names=["origin", "destination"]
        ),
    )
    published = xr.DataArray.from_series(wp).reindex(
        origin=ds.origin.values, destination=ds.destination.values
    )
    return ds.assign(worldpop_published=published), units


def run_kenya(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from flowmodel.models.gravity import GravityModel

    t0 = time.perf_counter()
    ds, units = kenya_dataset()
    res: dict[str, Any] = {
        "n_units": ds.sizes["unit"],
        "prepare_seconds": time.perf_counter() - t0,
        "raster_population_total": float(ds.population.sum()),
        "n_pairs": int(np.isfinite(ds.flow_worldpop).sum()),
    }
    published = ds["worldpop_published"]
    data = ds.drop_vars("worldpop_published")
    model = GravityModel(cross_border=False, country_effects=False, likelihood="negbin")
    seconds, used = fit_model(model, data, args.backend, args.draws, args.tune)
    res["fit"] = {"backend": used, "seconds": seconds}
    res["coefficients"] = raw_coefficients(model)
    pred = model.predict(data, seed=SEED)
    glm = glm_baseline(data)
    rows = [
        {"model": "GravityModel (NB, raster population)", **flow_metrics(published, pred)},
        {"model": "GLM (MLE, raster population)", **flow_metrics(published, glm)},
        {
            "model": "radiation (parameter-free)",
            **flow_metrics(published, radiation_baseline(data)),
        },
    ]
    res["vs_worldpop"] = pd.DataFrame(rows)[["model", *METRIC_COLS]]
    top = published.to_series().dropna().sort_values(ascending=False).head(10)
    res["top_flows"] = pd.DataFrame(
        {
            "origin": [o for o, _ in top.index],
            "destination": [d for _, d in top.index],
            "WorldPop": top.to_numpy(),
            "flowmodel mean": [
                float(pred["mean"].sel(origin=o, destination=d)) for o, d in top.index
            ],
            "q05": [float(pred["q05"].sel(origin=o, destination=d)) for o, d in top.index],
            "q95": [float(pred["q95"].sel(origin=o, destination=d)) for o, d in top.index],
        }
    )
    t0 = time.perf_counter()
    cv = cross_validate(
        GravityModel(cross_border=False, country_effects=False, likelihood="negbin"),
        data,
        scheme="pairs",
        folds=args.folds,
        backend=args.cv_backend,
        seed=SEED,
    )
    res["cv_seconds"] = time.perf_counter() - t0
    res["cv"] = summarize_cv(cv)[["model", "backend", "folds", "n_test", *METRIC_COLS]]
    res["outputs"] = write_outputs(
        out,
        data,
        pred,
        model,
        source="worldpop",
        sources=[
            "worldpop_internal_migration_2010",
            "kenya_population_raster_afripop2010",
            "naturalearth_countries_lowres",
        ],
        geometry=units,
        cv=cv,
        title="Kenya: gravity from the AfriPop raster vs WorldPop's 2010 estimates",
    )
    return res


# --------------------------------------------------------------------------- simulated
def run_simulated(out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Known truth: the in-memory simulated world (3 countries, 120 units, one unobserved country)."""
    from flowmodel.models.gravity import GravityModel
    from flowmodel.outputs.report import truth_table
    from flowmodel.simulate import simulate_flow_dataset

    ds, truth = simulate_flow_dataset(120, 3, seed=SEED % 1000, observed_countries=["C00", "C01"])
    ds.attrs["data_sources"] = (
        f"flowmodel.simulate.simulate_flow_dataset(120, 3, seed={SEED % 1000})"
    )
    res: dict[str, Any] = {
        "n_units": ds.sizes["unit"],
        "n_pairs": int(np.isfinite(ds.flow_census).sum()),
    }
    model = GravityModel(destination_covariates=["log_population", "night_lights_per_capita"])
    seconds, used = fit_model(model, ds, args.backend, args.draws, args.tune)
    res["fit"] = {"backend": used, "seconds": seconds}
    res["truth_vs_estimate"] = truth_table(model, truth)
    pred = model.predict(ds, seed=SEED)
    unobserved = xr.DataArray(
        ds["country"].values == "C02", dims="origin", coords={"origin": ds.origin.values}
    )
    mu = truth["mu"]
    res["recovery_of_true_mu"] = pd.DataFrame(
        [
            {"pairs": "all", **flow_metrics(mu, pred)},
            {
                "pairs": "origin in unobserved country C02",
                **flow_metrics(mu.where(unobserved), pred),
            },
        ]
    )[["pairs", "n_pairs", *METRIC_COLS]]
    cv = cross_validate(
        GravityModel(destination_covariates=["log_population", "night_lights_per_capita"]),
        ds,
        scheme="country",
        folds=None,
        backend=args.cv_backend,
        seed=SEED,
    )
    res["cv_leave_one_country_out"] = summarize_cv(cv)[
        ["model", "backend", "folds", "n_test", *METRIC_COLS]
    ]
    res["outputs"] = write_outputs(
        out, ds, pred, model, source="census", sources=["simulated"], cv=cv, truth=truth,
        title="Simulated world: gravity model against known truth",
    )  # fmt: skip
    return res


# -------------------------------------------------------------------------------- main
def to_markdown(name: str, res: dict[str, Any]) -> str:
    parts = [f"## {name}"]
    for key, value in res.items():
        if isinstance(value, pd.DataFrame):
            parts.append(f"### {key}\n\n{md_table(value)}")
        elif isinstance(value, dict):
            parts.append(f"- {key}: " + ", ".join(f"{k}={v}" for k, v in value.items()))
        else:
            parts.append(
                f"- {key}: {value:.4g}" if isinstance(value, float) else f"- {key}: {value}"
            )
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/validation", type=Path)
    parser.add_argument(
        "--only",
        nargs="*",
        default=["simulated", "austria", "ny", "kenya"],
        choices=["simulated", "austria", "ny", "kenya"],
    )
    parser.add_argument(
        "--backend", default="auto", help="backend of the main fits (default auto)"
    )
    parser.add_argument(
        "--cv-backend", default="laplace", help="backend of the CV refits (default laplace)"
    )
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--tune", type=int, default=1000)
    args = parser.parse_args(argv)
    runners = {
        "simulated": run_simulated,
        "austria": run_austria,
        "ny": run_ny,
        "kenya": run_kenya,
    }
    for name in args.only:
        out = args.out / name
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            res = runners[name](out, args)
        res["total_seconds"] = time.perf_counter() - t0
        text = to_markdown(name, res)
        (out / "results.md").write_text(text)
        (out / "results.json").write_text(
            json.dumps(
                {
                    k: (v.to_dict(orient="records") if isinstance(v, pd.DataFrame) else v)
                    for k, v in res.items()
                },
                indent=2,
                default=str,
            )
        )
        print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
