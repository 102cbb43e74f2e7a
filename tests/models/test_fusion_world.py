"""FusionModel on the file-based default simulated world: the worked example as a test (issue 7).

``simulate_world`` (6 countries, 120 units: a 10% census sample in 2 that
enumerates in-migrants from abroad and suppresses 1-4 as "<5", raw CDR events
in 3 with one overlapping, nothing in 2) is turned into a FlowDataset by the
pipeline's ``prepare`` stage and fitted as ``scripts/fusion_example.py`` and
docs/fusion.md do. The checks are those the docs quote: parameter recovery,
agreement with an independent statsmodels GLM on the census person records,
90% interval coverage in every group of pairs, and the bias that reading "<5"
as 0-4 would bring.

``FLOWMODEL_WORLD_SEED=<n>`` reruns them on another world (robustness runs,
reported in docs/fusion.md).
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flowmodel.dataset import load_dataset
from flowmodel.evaluate import cpc, interval_coverage, interval_width
from flowmodel.models.fusion import FusionModel
from flowmodel.models.gravity import GravityModel

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fusion_world")]

SEED = int(os.environ.get("FLOWMODEL_WORLD_SEED", "0"))
TERMS = {
    "origin:log_population": "o_lp",
    "destination:log_population": "d_lp",
    "destination:night_lights_per_capita": "d_nl",
    "log_distance": "ld",
    "cross_border": "cb",
}


def example_model(sources: tuple[str, ...] = ("census", "cdr")) -> FusionModel:
    """The worked example's model (scripts/fusion_example.py, docs/fusion.md)."""
    return FusionModel(
        latent=GravityModel(
            origin_covariates=["log_population"],
            destination_covariates=["log_population", "night_lights_per_capita"],
        ),
        sources=list(sources),
        market_share_covariate=None,  # the simulated CDR is a panel, not the market
        priors={"period_scale": {"dist": "LogNormal", "mu": float(np.log(1 / 60)), "sigma": 1.5}},
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from flowmodel.pipeline import demo_config, run_pipeline

    out = tmp_path_factory.mktemp("fusion_world")
    cfg = demo_config(out, size="medium", seed=SEED)  # "medium" = the default world
    run_pipeline(cfg, stages=["prepare"])
    ds = load_dataset(out / "dataset.nc").load()
    truth = json.loads((out / "world" / "truth.json").read_text())
    units = ds["unit"].values.astype(str)
    flows = pd.read_csv(out / "world" / truth["true_flows"])

    def matrix(column: str) -> np.ndarray:
        wide = flows.pivot(index="origin", columns="destination", values=column)
        m = wide.reindex(index=units, columns=units).to_numpy(dtype=float, copy=True)
        np.fill_diagonal(m, np.nan)
        return m

    return {
        "out": out,
        "ds": ds,
        "truth": truth,
        "mu": matrix("mu"),
        "flow": matrix("flow"),
    }


@pytest.fixture(scope="module")
def fused(world: dict[str, Any]) -> tuple[FusionModel, Any]:
    model = example_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(world["ds"], backend="nutpie", draws=500, tune=500, chains=2, random_seed=SEED)
    return model, model.predict(world["ds"], seed=SEED)


def groups(world: dict[str, Any]) -> dict[str, np.ndarray]:
    ds, truth = world["ds"], world["truth"]
    country = ds["country"].values.astype(str)
    n = len(country)
    off = ~np.eye(n, dtype=bool)
    same = (country[:, None] == country[None, :]) & off
    census, cdr = set(truth["census_countries"]), set(truth["cdr_countries"])
    none = set(truth["countries"]) - census - cdr

    def within(codes: set[str]) -> np.ndarray:
        return same & np.isin(country, sorted(codes))[:, None]

    return {
        "census only": within(census - cdr),
        "census + CDR": within(census & cdr),
        "CDR only": within(cdr - census),
        "no data": within(none),
        "cross-border": ~same & off,
    }


def test_world_recovers_the_generating_parameters(world, fused):
    model, _ = fused
    truth = world["truth"]
    summary = model.summary(ci_prob=0.94)
    true = {"intercept_raw": truth["intercept"], "sigma_country": truth["sigma_country"]}
    true |= {f"beta_raw[{t}]": v for t, v in truth["beta"].items()}
    true |= {f"phi[{s}]": truth["phi"] for s in model.sources}
    rows = summary.loc[list(true)]
    z = (rows["mean"] - pd.Series(true)) / rows["sd"]
    inside = (rows["eti_lo"] <= pd.Series(true)) & (pd.Series(true) <= rows["eti_hi"])
    print(rows.assign(truth=pd.Series(true), z=z).round(3).to_string())
    assert (z.abs() < 3).all(), z.round(2).to_dict()
    # 9 parameters: calibrated 94% intervals miss 0.54 on average and 2 or more on 10% of
    # worlds; seed 0 has 2 (night lights 2.0 sd, phi[census] 2.1 sd: the realised census
    # itself says so, see the GLM test below), and every world of seeds 0-9 had at most 2
    assert inside.sum() >= len(true) - 2, inside.to_dict()
    assert summary.loc[[i for i in summary.index if i.startswith("beta")], "r_hat"].max() < 1.05


def test_world_agrees_with_a_glm_on_the_census_person_records(world, fused):
    """An independent reference: statsmodels NB GLM on the uncensored person records."""
    import statsmodels.api as sm

    from flowmodel.pairs import geodesic_distance_km

    model, _ = fused
    out, truth = world["out"], world["truth"]
    persons = pd.read_csv(out / "world" / "census_persons.csv")
    cov = pd.read_csv(out / "world" / "true_covariates.csv").set_index("unit_id")
    movers = persons["current_unit"] != persons["previous_unit"]
    n = persons.loc[movers].groupby(["previous_unit", "current_unit"]).size().rename("n")
    pairs = pd.read_csv(out / "world" / truth["true_flows"])[["origin", "destination"]]
    dest_country = cov.loc[pairs["destination"], "country"].to_numpy()
    pairs = pairs.loc[np.isin(dest_country, truth["census_countries"])]
    y = n.reindex(pd.MultiIndex.from_frame(pairs)).fillna(0).to_numpy()
    o, d = cov.loc[pairs["origin"]], cov.loc[pairs["destination"]]
    dist = geodesic_distance_km(cov["lon"].to_numpy(), cov["lat"].to_numpy())
    pos = pd.Series(np.arange(len(cov)), index=cov.index)
    X = pd.DataFrame(
        {
            "o_lp": np.log(o["population"].to_numpy()),
            "d_lp": np.log(d["population"].to_numpy()),
            "d_nl": d["night_lights_per_capita"].to_numpy(),
            "ld": np.log(dist[pos[pairs["origin"]], pos[pairs["destination"]]]),
            "cb": (o["country"].to_numpy() != d["country"].to_numpy()).astype(float),
        }
    )
    X = pd.concat([X, pd.get_dummies(o["country"].to_numpy()).astype(float)], axis=1)
    glm = sm.GLM(
        y,
        X,
        family=sm.families.NegativeBinomial(alpha=1 / truth["phi"]),
        offset=np.full(len(y), np.log(truth["sample_fraction"])),
    ).fit()
    post = model.summary(ci_prob=0.94)
    for term, column in TERMS.items():
        mean, sd = post.loc[f"beta_raw[{term}]", ["mean", "sd"]]
        print(f"{term}: fused {mean:.3f} +- {sd:.3f}, GLM {glm.params[column]:.3f}")
        assert abs(mean - glm.params[column]) < 2 * sd + 2 * glm.bse[column]


def test_world_intervals_cover_every_group_of_pairs(world, fused):
    _, pred = fused
    mean, lo, hi = (pred[v].values for v in ("mean", "q05", "q95"))
    for label, sel in groups(world).items():
        coverage = interval_coverage(world["flow"][sel], lo[sel], hi[sel])
        skill = cpc(world["mu"][sel], mean[sel])
        width = interval_width(lo[sel], hi[sel])
        print(
            f"{label}: n {sel.sum()}, CPC {skill:.3f}, 90% coverage {coverage:.3f}, width {width:.0f}"
        )
        assert 0.85 <= coverage <= 0.99, (label, coverage)
        assert skill > 0.95, (label, skill)


def test_world_suppressed_census_cells_read_as_possibly_zero_bias_the_fit(world):
    """ "<5" with zeros printed holds 1..4; read as 0..4 the small flows sink (Laplace fits)."""
    ds = world["ds"]
    assert int(ds["flow_census_min"].notnull().sum()) > 1000
    beta = {}
    for label, data in {"1..4": ds, "0..4": ds.drop_vars("flow_census_min")}.items():
        model = example_model(sources=("census",))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(data, backend="laplace", draws=1000, random_seed=SEED)
        beta[label] = model.summary().loc["beta_raw[origin:log_population]", ["mean", "sd"]]
        print(label, beta[label].round(3).to_dict())
    true = world["truth"]["beta"]["origin:log_population"]
    assert abs(beta["1..4"]["mean"] - true) < 3 * beta["1..4"]["sd"]
    # seed 0: 0.795 +- 0.013 against 0.899 +- 0.016; on worlds 0-9 the shift is 0.04-0.23
    # (2.5-10 sd), always upwards: the possibly-zero cells make small flows smaller
    shift = beta["0..4"]["mean"] - beta["1..4"]["mean"]
    assert shift > 2 * beta["0..4"]["sd"]
    assert abs(beta["0..4"]["mean"] - true) > abs(beta["1..4"]["mean"] - true)
