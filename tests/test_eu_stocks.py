"""Migrant stocks from Facebook audiences and official statistics (scripts/eu_stocks_example.py).

Real data: ``$FLOWMODEL_DATA/eu_migrant_stocks_facebook_2011_2019`` (Yildiz et al. 2024;
skipped when absent). The checks read the raw files independently of the script: what
the fusion is given must be what the sources report. The fit itself (15 minutes on 2
cores) is not part of the suite; docs/stocks.md has its numbers and the command.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests.conftest import load_script, require_data


@pytest.fixture(scope="module")
def script():
    require_data("eu_migrant_stocks_facebook_2011_2019", "dinput.csv")
    require_data("naturalearth_countries_lowres", "naturalearth_lowres.shp")
    return load_script("eu_stocks_example")


@pytest.fixture(scope="module")
def loaded(script):
    return script.load(seed=0)


def _raw(script) -> pd.DataFrame:
    raw = pd.read_csv(script.stocks_dir() / "dinput.csv")
    return raw.loc[raw["flow"].notna()]


def test_every_report_of_the_input_is_in_the_dataset_or_held_out(script, loaded):
    ds, test = loaded
    raw = _raw(script)
    assert ds.sizes["unit"] == 28
    assert [str(p) for p in ds["period"].values] == [str(y) for y in range(2011, 2020)]
    n = raw.groupby("source").size()
    euro = int(ds["flow_eurostat"].notnull().sum())
    assert euro + len(test) == n["eurostat"] == 3346
    assert int(ds["flow_census"].notnull().sum()) == n["census"] == 598
    assert int(ds["flow_fbdau"].notnull().sum()) == n["fbdau"] == 1226
    # the held-out stocks are 2018 Eurostat reports, gone from the training data
    units = list(ds["unit"].values)
    o = [units.index(u) for u in test["origin"]]
    d = [units.index(u) for u in test["destination"]]
    assert np.isnan(ds["flow_eurostat"].sel(period="2018").values[o, d]).all()
    assert 0.1 < len(test) / 474 < 0.3


def test_facebook_audiences_at_the_floor_are_censored(script, loaded):
    ds, _ = loaded
    raw = _raw(script)
    mau = raw.loc[raw["source"] == "fbmau"]
    floor = mau.loc[(mau["year"] >= 2018) & (mau["flow"] <= 1000)]
    count = ds["flow_fbmau"]
    bound = ds["flow_fbmau_max"]
    # every MAU of 2018-2019 at or below 1,000 reads "1,000 or fewer": censored, none kept
    assert int(bound.notnull().sum()) == len(floor) == 624
    assert float(bound.max()) == float(bound.min()) == 1000.0
    assert int(count.notnull().sum()) + len(floor) == len(mau)
    assert set(np.unique(np.asarray(bound.dropna("period", how="all")["period"]))) == {
        "2018",
        "2019",
    }
    # 2016-2017 audiences below 1,000 (reported in steps of 10) stay counts
    early = mau.loc[(mau["year"] <= 2017) & (mau["flow"] < 1000)]
    assert len(early) > 0
    assert int(count.sel(period=["2016", "2017"]).notnull().sum()) == int(
        (mau["year"] <= 2017).sum()
    )


def test_facebook_classes_follow_the_coverage_of_the_destination(script, loaded):
    ds, _ = loaded
    fb = pd.read_csv(script.stocks_dir() / "Fb_all_2016_2019_users_pop_coverage.csv")
    nov = fb.loc[fb["year_month"] == "2018-11"].groupby("dest")["mau_cov"].first()
    # Cyprus has more Facebook users than residents aged 15-64 (1.50): the top group;
    # Germany the fewest (0.56): the bottom one
    assert nov["Cyprus"] >= 1.4 > nov["Germany"] and nov["Germany"] < 0.6
    cls = ds["class_fbmau"].sel(period="2018")
    assert set(np.unique(cls.sel(destination="CY").values.astype(str))) - {"", "nan"} == {
        "2018-g5"
    }
    assert set(np.unique(cls.sel(destination="DE").values.astype(str))) - {"", "nan"} == {
        "2018-g1"
    }
    # every class has a prior, and every prior is the paper's N(mu, 0.1^2) truncated
    priors = script.undercount_priors()
    for source in ("eurostat", "fbmau", "fbdau"):
        used = {str(c) for c in np.unique(ds[f"class_{source}"].values.astype(str))} - {"", "nan"}
        assert used <= set(priors[source]), source
        assert all(
            p["dist"] == "TruncatedNormal" and p["sigma"] == 0.1 for p in priors[source].values()
        )


def test_countries_distances_and_borders(script, loaded):
    ds, _ = loaded
    dist = ds["distance_km"]
    # Vienna-Bratislava 55 km, Lisbon-Helsinki 3,360 km (great circle between capitals)
    assert 50 < float(dist.sel(origin="AT", destination="SK")) < 60
    assert 3300 < float(dist.sel(origin="PT", destination="FI")) < 3420
    adj = ds["contiguous"].fillna(0).astype(bool)
    for a, b in (("AT", "DE"), ("GB", "IE"), ("ES", "PT"), ("PL", "LT")):
        assert bool(adj.sel(origin=a, destination=b)), (a, b)
    for a, b in (("GB", "FR"), ("DE", "IT"), ("SE", "DK")):
        assert not bool(adj.sel(origin=a, destination=b)), (a, b)
    assert not adj.sel(origin="MT").any() and not adj.sel(origin="CY").any()
    # populations aged 15-64 (Facebook's file, 2018): EU28 ~332 M
    assert 3.2e8 < float(ds["population"].sum()) < 3.45e8


def test_the_fusion_is_built_with_a_factor_per_class_held_and_the_papers_precisions(
    script, loaded
):
    ds, _ = loaded
    pm_model = script.model(ds, precisions=True).build_model(ds)
    named = pm_model.named_vars
    # one factor per report class the data hold (Eurostat's group 3 reports nothing)
    classes = list(pm_model.coords["undercount_eurostat_class"])
    assert len(classes) == 16 and "g3" not in classes
    assert "2018-g5" in pm_model.coords["undercount_fbmau_class"]
    # each source's own dispersion node, stacked as phi over the sources
    for s in script.SOURCES:
        assert f"phi_{s}" in named
    assert list(pm_model.coords["source"]) == list(script.SOURCES)
    # every term, the censored Facebook floor included, is finite at the initial point
    logp = pm_model.point_logps()
    assert all(np.isfinite(v) for v in logp.values()), logp
    assert "y_fbmau" in logp
