"""Migrant stocks from Facebook audiences and official statistics (EU28, 2011-2019).

The real data of Yildiz et al. (2024, Int Migr Rev, doi:10.1177/01979183241249969),
``$FLOWMODEL_DATA/eu_migrant_stocks_facebook_2011_2019``: the stock of people from
each EU country living in each other one (756 corridors, ages 15-64), reported by
up to four sources a year — Eurostat's population statistics (2011-2018), the 2011
census, and Facebook's advertising audiences of people who "lived in" the origin
(monthly active users 2016-2019, daily active users 2018-2019). No source reports
every corridor; Facebook reports most corridors but counts only its users, and from
2018 it reports an audience of 1,000 or fewer as exactly 1,000.

The model is flowmodel's fusion, unchanged: one latent field over (origin,
destination, year) — here it stands for the stock, not a flow — observed by each
source through its own observation model (negative binomial around the stock times
a scale factor per class of report):

- **Eurostat**: a factor per undercount group of the destination (IMEM groups) and
  year, prior ``N(1, 0.1^2)`` truncated at 0, as in the paper's main model;
- **census 2011**: one factor, ``N(1, 0.1^2)`` truncated to (0, 1);
- **Facebook MAU / DAU**: a factor per year and *coverage group* of the destination
  (Facebook users per resident, the paper's thresholds), with the paper's priors
  (e.g. ``N(0.55, 0.1^2)`` for 2018 destinations below 60% coverage); MAU of 2018
  and 2019 at or below Facebook's floor enter as censored, ``P(0 <= y <= 1000)``;
- each source's dispersion learned from the data (``--paper-precisions``: the
  paper's precisions as the sources' ``dispersion`` priors, Eurostat's ~3%);
- the field: gravity (populations aged 15-64, distance between capitals,
  contiguity) with a **corridor effect** shared by the years, and origin and
  destination walks (``--pair-walk``: the corridor effect also walks, a stock that
  drifts on its own as in the paper's AR(1) per corridor).

``--facebook destination`` gives Facebook one factor per destination and year
(LogNormal around its coverage group's prior centre) instead of per coverage group.

Left out, and why: the Labour Force Survey (its file in ``dinput.csv`` holds only
81/93 corridors and the paper's LFS factors are nearly flat priors, one per
destination and year), and the paper's per-corridor 2019 rescaling of Facebook
(``kappa``): the 2019 Facebook factors absorb the platform's 2019 revision instead.

Two checks:

1. **Held-out Eurostat reports.** A fifth of the 2018 Eurostat stocks are removed;
   the fusion predicts each on Eurostat's scale (its group factor and count noise
   included). Baselines: the corridor's Eurostat stock of 2017 (persistence) and
   the 2018 Facebook MAU times the median Eurostat/MAU ratio of the other corridors.
2. **Against the published posterior** (``cd_bilat.csv``, the paper's main model,
   fitted with JAGS): the EU28 total per year and the corridors' medians and 80%
   intervals. The two models differ in their process model and in details listed
   above, so they are compared by interval overlap, not to the digit.

Run: ``python scripts/eu_stocks_example.py --out eu-stocks`` (about 15 minutes with
nutpie on 2 cores; ``--first-year 2016`` fits 2016-2019 only, 3 minutes, but does not
converge in 300 draws). docs/stocks.md quotes its output and what the variants gave.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flowmodel.dataset import build_dataset
from flowmodel.evaluate import compare_methods, cpc
from flowmodel.models import FusionModel, GravityModel

#: The 28 countries (English short names of the data) and their ISO 3166 alpha-2 codes.
COUNTRIES = {
    "Austria": "AT",
    "Belgium": "BE",
    "Bulgaria": "BG",
    "Croatia": "HR",
    "Cyprus": "CY",
    "Czechia": "CZ",
    "Denmark": "DK",
    "Estonia": "EE",
    "Finland": "FI",
    "France": "FR",
    "Germany": "DE",
    "Greece": "GR",
    "Hungary": "HU",
    "Ireland": "IE",
    "Italy": "IT",
    "Latvia": "LV",
    "Lithuania": "LT",
    "Luxembourg": "LU",
    "Malta": "MT",
    "Netherlands": "NL",
    "Poland": "PL",
    "Portugal": "PT",
    "Romania": "RO",
    "Slovakia": "SK",
    "Slovenia": "SI",
    "Spain": "ES",
    "Sweden": "SE",
    "United Kingdom": "GB",
}
#: Capital of each country as named in Natural Earth's populated places.
CAPITALS = {
    "AT": "Vienna",
    "BE": "Brussels",
    "BG": "Sofia",
    "HR": "Zagreb",
    "CY": "Nicosia",
    "CZ": "Prague",
    "DK": "Copenhagen",
    "EE": "Tallinn",
    "FI": "Helsinki",
    "FR": "Paris",
    "DE": "Berlin",
    "GR": "Athens",
    "HU": "Budapest",
    "IE": "Dublin",
    "IT": "Rome",
    "LV": "Riga",
    "LT": "Vilnius",
    "LU": "Luxembourg",
    "MT": "Valletta",
    "NL": "Amsterdam",
    "PL": "Warsaw",
    "PT": "Lisbon",
    "RO": "Bucharest",
    "SK": "Bratislava",
    "SI": "Ljubljana",
    "ES": "Madrid",
    "SE": "Stockholm",
    "GB": "London",
}
#: Natural Earth 2.0.0's populated places lack Copenhagen: its coordinates (lon, lat).
MISSING_CAPITALS = {"Copenhagen": (12.5683, 55.6761)}
YEARS = [str(y) for y in range(2011, 2020)]
#: Facebook's reporting floor from 2018 on: an audience of 1,000 or fewer reads 1,000.
FLOOR = 1000
FLOOR_YEARS = ("2018", "2019")


def _tn(mu: float, upper: float | None = None) -> dict[str, Any]:
    """The paper's factor prior: ``N(mu, 0.1^2)`` truncated below at 0.001 (and at ``upper``)."""
    spec: dict[str, Any] = {"dist": "TruncatedNormal", "mu": mu, "sigma": 0.1, "lower": 0.001}
    if upper is not None:
        spec["upper"] = upper
    return spec


#: Facebook coverage groups (users per resident aged 15-64): lower bounds of groups 2.. by
#: year, and the factor prior of each group (the paper's main model and its data code).
COVERAGE_BOUNDS = {
    "fbmau": {
        "2016": [0.40, 0.60, 0.80],
        "2017": [0.50, 0.70, 0.90],
        "2018": [0.60, 0.80, 1.00, 1.40],
        "2019": [0.60, 0.80, 0.99, 1.40],
    },
    "fbdau": {"2018": [0.40, 0.60, 0.80, 1.00], "2019": [0.40, 0.60, 0.80, 1.00]},
}
FACEBOOK_PRIORS = {
    "fbmau": {
        "2016": [_tn(0.35, 1), _tn(0.50, 1), _tn(0.60), _tn(0.85)],
        "2017": [_tn(0.45, 1), _tn(0.60, 1), _tn(0.75), _tn(1.15)],
        "2018": [_tn(0.55, 1), _tn(0.70, 1), _tn(0.85), _tn(1.05), _tn(1.50)],
        "2019": [_tn(0.55, 1), _tn(0.70, 1), _tn(0.85), _tn(1.00), _tn(1.40)],
    },
    "fbdau": {
        "2018": [_tn(0.35, 1), _tn(0.50, 1), _tn(0.65), _tn(0.85), _tn(1.10)],
        "2019": [_tn(0.35, 1), _tn(0.50, 1), _tn(0.65), _tn(0.85), _tn(1.05)],
    },
}
SOURCES = ("eurostat", "census", "fbmau", "fbdau")
#: The paper's precision of each source's log stock (its JAGS priors, ``tau ~ N(m, s^2)``).
#: For large counts a negative binomial's ``phi`` is the precision of its log, so these
#: are the sources' dispersion priors: Eurostat within ~3% (tau 1,111), the census within
#: ~1.4%, Facebook's MAU ~14% and DAU ~10%.
PRECISION_PRIORS = {
    "eurostat": {"dist": "TruncatedNormal", "mu": 1111.0, "sigma": 10.0, "lower": 0.001},
    "census": {"dist": "TruncatedNormal", "mu": 5000.0, "sigma": 10.0, "lower": 0.001},
    "fbmau": {"dist": "TruncatedNormal", "mu": 50.0, "sigma": 10.0, "lower": 0.001},
    "fbdau": {"dist": "TruncatedNormal", "mu": 100.0, "sigma": 31.6, "lower": 0.001},
}
#: The field: a corridor effect shared by the years (``--pair-walk``: it also walks),
#: origin and destination walks, no country trend (every unit is a country, so it would
#: duplicate the origin walks).
TEMPORAL = {
    "trend": "none",
    "unit_trends": True,
    "pair_effect": True,
    "pair_walk": False,
}


def data_dir() -> Path:
    """``$FLOWMODEL_DATA`` (default ``<repo>/../shared/data``)."""
    return Path(
        os.environ.get("FLOWMODEL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )


def stocks_dir() -> Path:
    """The data set's folder."""
    return data_dir() / "eu_migrant_stocks_facebook_2011_2019"


def _coverage(kind: str) -> pd.DataFrame:
    """Facebook users per resident of each destination and year, as the paper's code takes it.

    MAU: May 2016, November 2018, the mean of March-June 2019, and for 2017 (no user
    count collected) the mean of 2016 and 2018. DAU: November 2018, mean of March-June 2019.
    """
    fb = pd.read_csv(stocks_dir() / "Fb_all_2016_2019_users_pop_coverage.csv")
    col = "mau_cov" if kind == "fbmau" else "dau_cov"
    by = fb.groupby(["dest", "year_month"])[col].first().unstack("year_month")
    out = pd.DataFrame(index=by.index)
    if kind == "fbmau":
        out["2016"] = by["2016-5"]
        out["2018"] = by["2018-11"]
        out["2017"] = (out["2016"] + out["2018"]) / 2
    else:
        out["2018"] = by["2018-11"]
    out["2019"] = by[["2019-3", "2019-4", "2019-5", "2019-6"]].mean(axis=1)
    return out


def _coverage_group(kind: str, dest: Any, year: str) -> np.ndarray:
    """The paper's coverage group (1..) of destinations (English names) in ``year``."""
    cov = _coverage(kind).loc[np.atleast_1d(dest), year].to_numpy()
    return np.searchsorted(COVERAGE_BOUNDS[kind][year], cov, side="right") + 1


def _facebook_class(kind: str, dest: pd.Series, year: pd.Series, by: str) -> pd.Series:
    """Class of each Facebook cell: ``<year>-g<group>`` (``by="coverage"``, the paper's:
    the coverage group of its destination) or ``<year>-<ISO code>`` (``by="destination"``)."""
    out = pd.Series("", index=dest.index, dtype=object)
    for y in COVERAGE_BOUNDS[kind]:
        at = year == y
        if by == "destination":
            out[at] = [f"{y}-{COUNTRIES[d]}" for d in dest[at]]
        else:
            out[at] = [f"{y}-g{g}" for g in _coverage_group(kind, dest[at].to_numpy(), y)]
    return out


#: Log-scale sd of a destination's Facebook factor around its coverage group's (``by=
#: "destination"``): a destination may deviate from its group by a factor of ~e^0.5.
DESTINATION_SD = 0.5


def undercount_priors(facebook: str = "coverage") -> dict[str, Any]:
    """``source -> {class: prior}`` (census: one prior) with the paper's main-model priors.

    ``facebook="destination"``: one Facebook factor per destination and year,
    LogNormal around the paper's prior centre of its coverage group (sd ``DESTINATION_SD``).
    """
    # IMEM groups 1 and 2 by year (2019 reports none); group 3 (Croatia, France, Greece,
    # Malta, Portugal: no IMEM group) has no Eurostat stock in the data, hence no factor
    eurostat = {f"g{g}-{y}": _tn(1.0) for g in (1, 2) for y in YEARS[:-1]}
    out: dict[str, Any] = {"eurostat": eurostat, "census": _tn(1.0, 1.0)}
    for kind, by_year in FACEBOOK_PRIORS.items():
        if facebook == "destination":
            names = list(COUNTRIES)
            out[kind] = {
                f"{y}-{COUNTRIES[n]}": {
                    "dist": "LogNormal",
                    "mu": float(np.log(by_year[y][g - 1]["mu"])),
                    "sigma": DESTINATION_SD,
                }
                for y in by_year
                for n, g in zip(names, _coverage_group(kind, names, y), strict=True)
            }
        else:
            out[kind] = {f"{y}-g{g + 1}": p for y, ps in by_year.items() for g, p in enumerate(ps)}
    return out


def _units_and_pairs() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Countries with their population aged 15-64 (2018), capital distances and contiguity."""
    import geopandas as gpd
    from pyproj import Geod

    from flowmodel.pairs import contiguity

    fb = pd.read_csv(stocks_dir() / "Fb_all_2016_2019_users_pop_coverage.csv")
    pop = fb.loc[fb["year"] == 2018].groupby("dest")["pop"].first()
    units = pd.DataFrame({"unit_id": [COUNTRIES[n] for n in pop.index], "population": pop.values})
    units["country"] = units["unit_id"]
    units = units.sort_values("unit_id").reset_index(drop=True)

    ne = data_dir() / "naturalearth_countries_lowres"
    cities = gpd.read_file(ne / "naturalearth_cities.shp").drop_duplicates("name")
    xy = {r.name: (r.geometry.x, r.geometry.y) for r in cities.itertuples()}
    xy.update(MISSING_CAPITALS)
    lon, lat = np.array([xy[CAPITALS[u]] for u in units["unit_id"]]).T
    n = len(units)
    o, d = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    _, _, metres = Geod(ellps="WGS84").inv(
        lon[o.ravel()], lat[o.ravel()], lon[d.ravel()], lat[d.ravel()]
    )

    countries = gpd.read_file(ne / "naturalearth_lowres.shp")
    names = {v: k for k, v in COUNTRIES.items()}
    polys = countries.set_index("name").reindex([names[u] for u in units["unit_id"]])
    present = polys.geometry.notna().to_numpy()  # Malta is too small for the 1:110m file
    adj = np.zeros((n, n), dtype=bool)
    adj[np.ix_(present, present)] = contiguity(
        gpd.GeoDataFrame(geometry=polys.geometry[present].to_list(), crs=countries.crs)
    )
    pairs = pd.DataFrame(
        {
            "origin": units["unit_id"].to_numpy()[o.ravel()],
            "destination": units["unit_id"].to_numpy()[d.ravel()],
            "distance_km": metres / 1000.0,
            "contiguous": adj.ravel(),
        }
    )
    return units, pairs.loc[pairs["origin"] != pairs["destination"]].reset_index(drop=True)


def load(
    *,
    hold_out: float = 0.2,
    seed: int = 0,
    facebook: str = "coverage",
    first_year: int = 2011,
) -> tuple[Any, pd.DataFrame]:
    """The FlowDataset (sources eurostat, census, fbmau, fbdau; a period per year).

    A fraction ``hold_out`` of the 2018 Eurostat stocks is removed and returned as
    the test table (``origin``, ``destination``, ``eurostat``, ``class``,
    ``eurostat_2017``, ``fbmau``), with the median Eurostat/MAU ratio of the
    other 2018 corridors in ``attrs["mau_ratio"]``.
    """
    raw = pd.read_csv(stocks_dir() / "dinput.csv")
    raw = raw.loc[
        raw["source"].isin(SOURCES) & raw["flow"].notna() & (raw["year"] >= first_year)
    ].copy()
    raw["origin"] = raw["orig"].map(COUNTRIES)
    raw["destination"] = raw["dest"].map(COUNTRIES)
    raw["period"] = raw["year"].astype(str)
    groups = pd.read_csv(stocks_dir() / "IMEM_undercount.csv", sep=";").set_index("dest")
    group = groups["gamma_group"].reindex(raw["dest"]).fillna(3).astype(int).to_numpy()
    year = raw["period"].where(raw["period"] != "2019", "2018")  # 2019 shares 2018's factor
    raw["class"] = np.where(group == 3, "g3", "g" + group.astype(str) + "-" + year)
    for kind in ("fbmau", "fbdau"):
        at = raw["source"] == kind
        raw.loc[at, "class"] = _facebook_class(
            kind, raw.loc[at, "dest"], raw.loc[at, "period"], facebook
        )

    euro = raw["source"] == "eurostat"
    rng = np.random.default_rng(seed)
    held = euro & (raw["period"] == "2018") & (rng.random(len(raw)) < hold_out)
    test = raw.loc[held, ["origin", "destination", "flow", "class"]].rename(
        columns={"flow": "eurostat"}
    )
    key = ["origin", "destination"]
    last = raw.loc[euro & (raw["period"] == "2017")].set_index(key)["flow"]
    test["eurostat_2017"] = last.reindex(pd.MultiIndex.from_frame(test[key])).to_numpy()
    mau = raw.loc[(raw["source"] == "fbmau") & (raw["period"] == "2018")].set_index(key)["flow"]
    test["fbmau"] = mau.reindex(pd.MultiIndex.from_frame(test[key])).to_numpy()
    train = euro & ~held & (raw["period"] == "2018")
    both = raw.loc[train].set_index(key)["flow"] / mau.reindex(raw.loc[train].set_index(key).index)
    test.attrs["mau_ratio"] = float(np.nanmedian(both[mau.reindex(both.index) > FLOOR]))

    flows = {}
    for source in SOURCES:
        t = raw.loc[(raw["source"] == source) & ~held]
        frame = pd.DataFrame(
            {
                "origin": t["origin"].to_numpy(),
                "destination": t["destination"].to_numpy(),
                "period": t["period"].to_numpy(),
                "count": t["flow"].to_numpy(dtype=float),
            }
        )
        if source != "census":  # the census has one factor
            frame["class"] = t["class"].to_numpy()
        if frame.empty:  # e.g. the census of 2011 when the panel starts later
            continue
        if source == "fbmau":
            floor = frame["period"].isin(FLOOR_YEARS) & (frame["count"] <= FLOOR)
            frame["max"] = np.where(floor, float(FLOOR), np.nan)
            frame.loc[floor, "count"] = np.nan
        flows[source] = frame
    units, pairs = _units_and_pairs()
    ds = build_dataset(units, pairs=pairs, flows=flows)
    return ds, test.reset_index(drop=True)


def model(
    ds: Any = None,
    temporal: dict[str, Any] | None = None,
    *,
    precisions: bool = False,
    facebook: str = "coverage",
) -> FusionModel:
    """The four-source fusion of stocks.

    ``ds``: the dataset it will fit (None: every source and class); only the sources
    and report classes it holds get nodes. ``temporal``: the field's (default ``TEMPORAL``); ``precisions``: each source's
    dispersion prior is the paper's precision (``PRECISION_PRIORS``); False (default):
    one shared dispersion prior, each source's learned from the data (flowmodel's
    default); ``facebook``: Facebook factors per coverage group (the paper's) or per
    destination (:func:`undercount_priors`).
    """
    sources = [s for s in SOURCES if ds is None or f"flow_{s}" in ds]
    options: dict[str, dict[str, Any]] = {}
    for s, prior in undercount_priors(facebook).items():
        if s not in sources:
            continue
        if ds is not None and f"class_{s}" in ds:
            held = {str(c) for c in np.unique(ds[f"class_{s}"].values.astype(str))}
            prior = {c: p for c, p in prior.items() if c in held}
        options[s] = {"undercount": prior}
    if precisions:
        for s in options:
            options[s]["dispersion"] = PRECISION_PRIORS[s]
    return FusionModel(
        latent=GravityModel(
            origin_covariates=["log_population"],
            destination_covariates=["log_population"],
            cross_border=False,  # every pair crosses a border
            contiguity=True,
            temporal=TEMPORAL if temporal is None else temporal,
        ),
        sources=sources,
        reference_source="eurostat",
        source_options=options,
    )


def predict_held_out(fitted: FusionModel, ds: Any, test: pd.DataFrame) -> pd.DataFrame:
    """Median and 90% interval of each held-out Eurostat stock, on Eurostat's scale."""
    full = ds.copy()
    units = list(full["unit"].values)
    o = np.array([units.index(u) for u in test["origin"]])
    d = np.array([units.index(u) for u in test["destination"]])
    t = np.full(len(test), list(np.asarray(full["period"].values).astype(str)).index("2018"))
    for name, values in (("flow_eurostat", test["eurostat"]), ("class_eurostat", test["class"])):
        arr = full[name].values.copy()
        arr[o, d, t] = values.to_numpy()
        full[name] = (full[name].dims, arr)
    cells = fitted.predict_cells(full, "eurostat", quantiles=(0.05, 0.5, 0.95))
    frame = pd.DataFrame(
        {v: cells[v].values for v in ("q05", "q50", "q95")},
        index=pd.MultiIndex.from_arrays(
            [
                cells["origin"].values,
                cells["destination"].values,
                np.asarray(cells["period"].values).astype(str),
            ]
        ),
    )
    wanted = pd.MultiIndex.from_arrays([test["origin"], test["destination"], ["2018"] * len(test)])
    return frame.reindex(wanted).reset_index(drop=True)


def published() -> pd.DataFrame:
    """The paper's posterior by corridor and year (``cd_bilat.csv``), with ISO codes."""
    pub = pd.read_csv(stocks_dir() / "cd_bilat.csv")
    pub["origin"] = pub["orig"].map(COUNTRIES)
    pub["destination"] = pub["dest"].map(COUNTRIES)
    pub["period"] = pub["year"].astype(str)
    return pub


#: The paper's posterior of the EU28 total (median, 80% interval), data README.
PUBLISHED_TOTALS = {
    "2011": (12_559_308, 12_373_401, 12_865_614),
    "2016": (15_319_969, 14_633_477, 16_069_161),
    "2019": (15_720_889, 14_645_186, 16_890_519),
}


def _years(ds: Any) -> list[str]:
    """The dataset's years (its periods)."""
    return [str(p) for p in ds["period"].values]


def stock_draws(fitted: FusionModel, ds: Any, *, draws: int | None = None) -> np.ndarray:
    """Posterior draws of the stock (the latent mean) of every corridor and year.

    Returns an array (sample, period, origin, destination), NaN on the diagonal.
    """
    out = []
    for p in _years(ds):
        a = fitted.predict_posterior(ds, kind="mean", period=p, draws=draws)
        out.append(np.asarray(a.stack(sample=("chain", "draw")).transpose("sample", ...).values))
    return np.stack(out, axis=1)


def compare(fitted: FusionModel, ds: Any) -> dict[str, Any]:
    """The EU28 total per year and the corridors against the published posterior."""
    draws = stock_draws(fitted, ds)
    n = draws.shape[-1]
    off = ~np.eye(n, dtype=bool)
    total = np.nansum(draws[..., off], axis=-1)  # (sample, period)
    pub = published()
    units = [str(u) for u in ds["unit"].values]
    rows = []
    years = _years(ds)
    pub = pub.loc[pub["period"].isin(years)].reset_index(drop=True)
    for t, p in enumerate(years):
        q10, q50, q90 = np.quantile(total[:, t], [0.1, 0.5, 0.9])
        ref = PUBLISHED_TOTALS.get(p)
        rows.append(
            {
                "year": p,
                "flowmodel median": q50,
                "flowmodel 80%": (q10, q90),
                "published sum of medians": float(pub.loc[pub["period"] == p, "stock"].sum()),
                "published median": np.nan if ref is None else ref[0],
                "published 80%": None if ref is None else (ref[1], ref[2]),
            }
        )
    totals = pd.DataFrame(rows)

    oi = np.array([units.index(u) for u in pub["origin"]])
    di = np.array([units.index(u) for u in pub["destination"]])
    ti = np.array([years.index(p) for p in pub["period"]])
    cell = draws[:, ti, oi, di]  # (sample, row)
    q10, q50, q90 = np.quantile(cell, [0.1, 0.5, 0.9], axis=0)
    overlap = (q10 <= pub["upp80"].to_numpy()) & (pub["lwr80"].to_numpy() <= q90)
    ratio = q50 / pub["stock"].to_numpy()
    corridors = pub.assign(q10=q10, q50=q50, q90=q90, overlap=overlap, ratio=ratio)
    width = np.log(q90 / q10) / np.log(pub["upp80"] / pub["lwr80"])
    return {
        "totals": totals,
        "corridors": corridors,
        "agreement": {
            "corridor-years": len(pub),
            "80% intervals overlap": float(overlap.mean()),
            "CPC of medians": cpc(pub["stock"].to_numpy(), q50),
            "median ratio (flowmodel / published)": float(np.median(ratio)),
            "ratio 10%-90%": [float(x) for x in np.quantile(ratio, [0.1, 0.9])],
            "median width ratio of 80% intervals (log scale)": float(np.nanmedian(width)),
        },
    }


def run(
    *,
    backend: str = "nutpie",
    draws: int = 500,
    seed: int = 0,
    precisions: bool = False,
    temporal: dict[str, Any] | None = None,
    facebook: str = "coverage",
    first_year: int = 2011,
) -> dict[str, Any]:
    """Fit the fusion with a fifth of the 2018 Eurostat stocks held out; score and compare."""
    ds, test = load(seed=seed, facebook=facebook, first_year=first_year)
    present = [s for s in SOURCES if f"flow_{s}" in ds]
    fitted = model(ds, temporal, precisions=precisions, facebook=facebook)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted.fit(ds, backend=backend, draws=draws, tune=draws, chains=2, random_seed=seed)
    predictions = {
        "fusion (all sources, other years)": predict_held_out(fitted, ds, test),
        "Eurostat 2017 (persistence)": test["eurostat_2017"],
        f"Facebook MAU 2018 x median ratio ({test.attrs['mau_ratio']:.2f})": test["fbmau"].where(
            test["fbmau"] > FLOOR
        )
        * test.attrs["mau_ratio"],
    }
    summary = fitted.summary()
    return {
        "held_out": len(test),
        "scores": compare_methods(test["eurostat"].to_numpy(dtype=float), predictions),
        "comparison": compare(fitted, ds),
        "factors": factor_table(fitted, facebook),
        "r_hat_max": float(summary["r_hat"].max()),
        "ess_bulk_min": float(summary["ess_bulk"].min()),
        "dispersion": {s: float(fitted.posterior["phi"].sel(source=s).mean()) for s in present},
        "worst_mixing": summary.sort_values("r_hat", ascending=False).head(8),
        "model": fitted,
    }


def factor_table(fitted: FusionModel, facebook: str = "coverage") -> pd.DataFrame:
    """Prior centre and posterior mean and 90% interval of every scale factor."""
    post = fitted.posterior
    priors = undercount_priors(facebook)
    rows = []
    for source in SOURCES:
        if f"undercount_{source}" not in post:
            continue
        var = post[f"undercount_{source}"]
        dim = f"undercount_{source}_class"
        classes = var[dim].values if dim in var.dims else [None]
        for c in classes:
            values = (var if c is None else var.sel({dim: c})).values.ravel()
            spec = priors[source] if c is None else priors[source][str(c)]
            rows.append(
                {
                    "source": source,
                    "class": "" if c is None else str(c),
                    "prior centre": float(
                        np.exp(spec["mu"]) if spec["dist"] == "LogNormal" else spec["mu"]
                    ),
                    "posterior mean": float(values.mean()),
                    "90% interval": f"[{np.quantile(values, 0.05):.2f}, "
                    f"{np.quantile(values, 0.95):.2f}]",
                }
            )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("eu-stocks"))
    parser.add_argument("--backend", default="nutpie")
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first-year", type=int, default=2011, help="first year fitted")
    parser.add_argument(
        "--paper-precisions",
        action="store_true",
        help="each source's dispersion prior is the paper's precision (default: learned)",
    )
    parser.add_argument(
        "--facebook",
        choices=("coverage", "destination"),
        default="coverage",
        help="Facebook factors per coverage group and year (the paper's) or per destination",
    )
    parser.add_argument(
        "--pair-walk", action="store_true", help="each corridor's effect walks over the years"
    )
    args = parser.parse_args(argv)
    if not (stocks_dir() / "dinput.csv").exists():
        print(f"no data at {stocks_dir()}; set FLOWMODEL_DATA", file=sys.stderr)
        return 2
    result = run(
        backend=args.backend,
        draws=args.draws,
        seed=args.seed,
        precisions=args.paper_precisions,
        temporal={**TEMPORAL, "pair_walk": True} if args.pair_walk else None,
        facebook=args.facebook,
        first_year=args.first_year,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    comp = result["comparison"]
    comp["corridors"].to_csv(args.out / "corridors.csv", index=False)
    saved = {
        "held_out": result["held_out"],
        "r_hat_max": result["r_hat_max"],
        "ess_bulk_min": result["ess_bulk_min"],
        "dispersion": result["dispersion"],
        "scores": result["scores"].to_dict("records"),
        "totals": comp["totals"].to_dict("records"),
        "agreement": comp["agreement"],
        "factors": result["factors"].to_dict("records"),
    }
    (args.out / "eu_stocks.json").write_text(json.dumps(saved, indent=2, default=str))
    pd.set_option("display.width", 160)
    print(
        f"EU28 stocks {args.first_year}-2019: {result['held_out']} Eurostat 2018 stocks held out; "
        f"max R-hat {result['r_hat_max']:.3f}, min bulk ESS {result['ess_bulk_min']:.0f}"
    )
    print(result["scores"].round(3).to_string(index=False))
    print(comp["totals"].round(0).to_string(index=False))
    print(json.dumps(comp["agreement"], indent=1))
    print(result["factors"].round(3).to_string(index=False))
    print("dispersion (posterior mean phi):", json.dumps(result["dispersion"]))
    print(result["worst_mixing"].round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
