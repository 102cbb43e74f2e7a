"""Two reports of the same flows (scripts/eu_reports_example.py, docs/reports.md).

Real data: ``$FLOWMODEL_DATA/eu_reported_flows_migmod`` (skipped when absent). A fifth
of the 2015 corridors reported by both countries have their receiving report held
out; the fusion of both reports over 2010-2015 predicts them on the receiving
country's own scale.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import load_script, require_data


def _script():
    return load_script("eu_reports_example")


@pytest.fixture(scope="module")
def script():
    require_data("eu_reported_flows_migmod", "mig_data.csv")
    return _script()


def test_the_panel_dataset_holds_both_reports_with_their_classes(script):
    ds, test = script.load(2015)
    assert [str(p) for p in ds["period"].values] == [str(y) for y in range(2010, 2016)]
    assert ds.sizes["unit"] == 27
    # the held-out receiving reports are gone from the training data, their class kept aside
    assert len(test) > 30
    assert test["class"].isin(["low", "medium", "high", "reference"]).all()
    units = list(ds["unit"].values)
    o = [units.index(u) for u in test["origin"]]
    d = [units.index(u) for u in test["destination"]]
    held = ds["flow_immi"].sel(period="2015").values[o, d]
    assert np.isnan(held).all()
    assert np.isfinite(ds["flow_emig"].sel(period="2015").values[o, d]).all()
    # Sweden's immigration statistics are the reference reporter (factor fixed at 1)
    se = ds["class_immi"].sel(destination="SE").values
    assert set(np.unique(se[se != ""])) == {"reference"}


@pytest.fixture(scope="module")
def result(script):
    return script.run(2015, backend="nutpie", draws=500, seed=0)


@pytest.mark.slow
def test_corridor_effects_over_the_years_predict_the_held_out_receiving_reports(result):
    s = result["scores"].set_index("method")
    panel = s.loc["fusion, corridor effects over the years"]
    alone = s.loc["fusion, target year alone"]
    sending = s.loc["sending report as it is"]
    last_year = s.loc["receiving report the year before"]
    assert result["r_hat_max"] < 1.05
    # measured: log-RMSE 0.325 against 1.046 (the sending report) and 0.610 (persistence)
    assert panel["log-RMSE"] < 0.8 * last_year["log-RMSE"]
    assert panel["log-RMSE"] < 0.5 * sending["log-RMSE"]
    # CPC 0.935 against 0.835 (sending) and 0.749 (one year, no corridor effects);
    # persistence's 0.962 is higher on CPC, which the largest corridors dominate
    assert panel["CPC"] > sending["CPC"] + 0.05
    assert panel["CPC"] > alone["CPC"] + 0.1
    # 90% intervals on the receiving country's scale: 0.85 measured (40 corridors)
    assert 0.75 <= panel["90% coverage"] <= 1.0


@pytest.mark.slow
def test_undercount_factors_are_learned_relative_to_the_reference_reporter(result):
    u = result["undercount"].set_index(["report", "class"])
    assert u.loc[("immi", "reference"), "posterior mean"] == 1.0
    # the data move the factors away from the elicited priors (high-undercount immigration
    # statistics count about a quarter of what Sweden's would, against a prior mean of 0.68)
    high = u.loc[("immi", "high"), "posterior mean"]
    low = u.loc[("immi", "low"), "posterior mean"]
    assert high < low
    assert u.loc[("emig", "high"), "posterior mean"] < u.loc[("emig", "low"), "posterior mean"]
