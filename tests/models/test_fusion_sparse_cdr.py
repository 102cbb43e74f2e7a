"""FusionModel on the default simulated world with *sparse* CDR (issue 15).

``simulate_world(cdr_activity=4)``: the median subscriber is seen on 4 nights a month,
one operator, market share varying by unit. The world is prepared as
``scripts/fusion_cdr_sweep.py`` does (the pipeline's ``prepare`` stage with the demo
config: home detection chosen from the data, redaction at 15, totals before
redaction, the census as recorded) and fitted three ways: fused, census-only (the
census as recorded) and the internal-movers census alone. The checks are those
docs/fusion.md quotes ("Does the CDR help?"): CPC within the CDR-only countries,
90% coverage, within-country totals, per-unit market shares against the truth, and
the two opt-in remedies end to end.

``FLOWMODEL_WORLD_SEED=<n>`` reruns them on another world.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import numpy as np
import pytest

from flowmodel.dataset import load_dataset
from flowmodel.models.gravity import GravityModel
from tests.models.world_cases import SEED, example_model

pytestmark = [pytest.mark.slow]


def _sweep_module() -> Any:
    """``scripts/fusion_cdr_sweep.py``: the world preparation and scores the docs quote."""
    from tests.conftest import load_script

    return load_script("fusion_cdr_sweep")


#: A sparse operator log: the median subscriber is seen on 4 nights a month (about 10 by default)
SPARSE_ACTIVITY = 4.0


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    sweep = _sweep_module()
    out = tmp_path_factory.mktemp("sparse_cdr")
    sweep.prepare_world(out, seed=SEED, cdr_activity=SPARSE_ACTIVITY)
    ds = load_dataset(out / "dataset.nc").load()
    truth, mu, flow = sweep.truth_matrices(out, ds["unit"].values.astype(str))
    fits = {}
    for label, model in (
        ("fused", example_model()),
        ("census", example_model(sources=("census", "census_abroad"))),
        ("internal", GravityModel(**{**example_model().latent.model_config, "source": "census"})),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(ds, backend="nutpie", draws=500, tune=500, chains=2, random_seed=SEED)
        fits[label] = (model, sweep.score(ds, truth, mu, flow, model.predict(ds, seed=SEED)))
    return {
        "sweep": sweep,
        "out": out,
        "ds": ds,
        "truth": truth,
        "fits": fits,
        "detection": sweep.detection_rate(out, ds),
    }


def test_sparse_cdr_fusion_against_census_only_within_cdr_only_countries(sparse):
    """Sparse CDR: fusion never loses to census-only and beats the internal census by 0.02 CPC.

    Against census-only gravity *with* the immigrants-by-country table the issue's target
    (+0.02 CPC) is not met on this world: that table already measures the level of every
    CDR-only country (its emigrants are counted in the census countries), the latent model
    is the true one, and census-only reaches 0.975 of a possible 1 (seed 0: fused 0.977,
    +0.002; docs/fusion.md, "Does the CDR help?"). What the CDR adds there is asserted:
    no loss, calibrated intervals, right totals; and against the internal-movers census,
    which sees nothing of those countries, a clear gain.
    """
    fits = sparse["fits"]
    fused, census, internal = (fits[k][1] for k in ("fused", "census", "internal"))
    key = "cpc[CDR only]"
    print(
        f"CDR only: CPC fused {fused[key]:.3f}, census-only {census[key]:.3f}, internal "
        f"census {internal[key]:.3f}; 90% coverage {fused['coverage[CDR only]']:.3f}"
    )
    assert fused[key] >= census[key] - 0.005
    assert fused[key] >= internal[key] + 0.02
    assert 0.85 <= fused["coverage[CDR only]"] <= 0.95
    cdr_only = sorted(
        set(sparse["truth"]["cdr_countries"]) - set(sparse["truth"]["census_countries"])
    )
    for code in cdr_only:
        ratio = fused[f"total_ratio[{code}]"]
        print(f"{code}: predicted / true within-country total {ratio:.3f}")
        assert 0.8 <= ratio <= 1.25, (code, ratio)
    # the pipeline kept the operator's totals (outflow: released; inflow: suppressed) and the
    # model used them
    model = fits["fused"][0]
    assert model.fit_meta["observations"]["cdr"]["n_totals"]["cdr_outflow"] > 50


def test_sparse_cdr_market_shares_follow_the_covariate_shape(sparse):
    """Per-unit shares: >= 85% of the truths inside their 90% intervals, correlation >= 0.5.

    The truth is the operator's market share times the detection rate of home detection
    (relocations counted per true relocation: released outflow totals against the
    simulator's true homes); the covariate is the panel's subscribers per resident
    (~4e-4), which before issue 15 centred every share on logit(0.01).
    """
    model = sparse["fits"]["fused"][0]
    design = model.fit_meta["observations"]["cdr"]["market_share"]
    assert design["scale"] == "logit" and design["level"] == "default"
    res = sparse["sweep"].shares(model, sparse["truth"], sparse["detection"])
    print(
        f"market share: {res['share_inside90']:.0%} inside 90% intervals, correlation "
        f"{res['share_corr']:.2f}, MAE {res['share_mae']:.3f} (detection rate "
        f"{res['detection_rate']:.3f})"
    )
    assert res["share_inside90"] >= 0.85
    assert res["share_corr"] >= 0.5


def test_sparse_cdr_with_spurious_background_and_origin_slopes(sparse):
    """The two opt-in remedies of docs/fusion.md ("Why adding the CDR cost CPC") end to end.

    The prepare stage carries home detection's spurious-move rate to the dataset; the
    model with ``spurious_relocations`` and ``market_share_origin_terms="latent"`` uses it
    as its prior centre and still meets what the default model meets on this world (no
    loss against census-only, +0.02 over the internal census, 90% coverage, totals,
    shares). Seed 0, default sampler settings (docs): CPC 0.980 against census-only
    0.975, shares 95% inside.
    """
    ds = sparse["ds"]
    estimate = ds["flow_cdr"].attrs["spurious_rate"]
    settings = json.loads((sparse["out"] / "cdr_cdr" / "cdr_settings.json").read_text())
    assert estimate == settings["spurious_rate_estimate"] > 0
    model = example_model(spurious_relocations=True, market_share_origin_terms="latent")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 2 x 300 (the other fits of this world: 2 x 500): make test's time budget
        model.fit(ds, backend="nutpie", draws=300, tune=300, chains=2, random_seed=SEED)
    assert model.fit_meta["observations"]["cdr"]["spurious_relocations"] == {"estimate": estimate}
    truth, mu, flow = sparse["sweep"].truth_matrices(sparse["out"], ds["unit"].values.astype(str))
    got = sparse["sweep"].score(ds, truth, mu, flow, model.predict(ds, seed=SEED))
    fits = sparse["fits"]
    census, internal = fits["census"][1], fits["internal"][1]
    key = "cpc[CDR only]"
    rate = model.posterior["spurious_rate"].values.ravel()
    res = sparse["sweep"].shares(model, sparse["truth"], sparse["detection"])
    print(
        f"with background and slopes: CPC {got[key]:.3f} (census-only {census[key]:.3f}), "
        f"coverage {got['coverage[CDR only]']:.3f}, shares {res['share_inside90']:.0%} inside; "
        f"spurious rate {np.median(rate):.4f} (home detection {estimate:.4f})"
    )
    assert got[key] >= census[key] - 0.005
    assert got[key] >= internal[key] + 0.02
    assert 0.85 <= got["coverage[CDR only]"] <= 0.95
    assert res["share_inside90"] >= 0.85 and res["share_corr"] >= 0.5
    # the data move the rate away from its prior (centre the estimate, sd 0.5 on the log)
    assert np.log(rate).std() < 0.5
