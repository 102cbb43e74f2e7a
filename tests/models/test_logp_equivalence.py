"""The recomposed models (latent field + observation models) give the same log-probability.

``data/logp_reference.json`` was written by the model layer as it was before it was
recomposed (``python -m tests.models.logp_cases`` at that commit). Every case is
rebuilt with the current code and evaluated at the same points:

- the log-likelihood (observed terms and Potentials) must agree to 1e-8;
- the total log-probability must agree to 1e-8 once the one intended change is
  accounted for: ``cross_border`` now has its own, raw-scale default prior
  (``priors["cross_border"]``) instead of the standardised ``beta`` prior.

The two cases with a CDR source (:data:`tests.models.logp_cases.CDR_CASES`) changed on
purpose in issue 15: the market share's parameters are now a non-centred country offset
(``market_share_country_z``) and a slope on the covariate's within-country shape
(``market_share_slope``), so the stored points no longer name the model's variables.
Each stored point is mapped to the point of the new parametrisation that gives the
*same market shares* (same offsets and unit effects; the slope that reproduces the
old centre ``logit(covariate)``, which this world's share-scale covariate allows
exactly; a common level ``market_share_level`` of 0; the offsets and the level
written relative to the log period scale, a change of variables with unit Jacobian),
and then

- every cell and marginal Potential must equal its value before the change
  (``data/logp_reference_parts.json``, written by the code before issue 15 at the
  same points) to 1e-8: the likelihood given the shares did not change;
- for ``fusion_census_cdr`` the log-likelihood and the total log-probability must
  equal the pre-refactor reference, the total up to the exact change of the prior:
  the new slope's ``N(b; 0.5, 0.5^2)`` and common level's ``N(0; 0, 0.5^2)`` (the
  offsets keep their density).

The in/out totals Potentials of ``fusion_totals_marginals`` are not compared: the data
side now protects the simulated totals (complementary suppression), which changed
this case's data after the reference was written, and the model now leaves out a
suppressed total that shares a redacted cell with a total already used. The totals
term is checked against a numpy reference in ``test_fusion.py``
(``test_totals_likelihood_at_the_truth_is_calibrated``).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import special, stats

from flowmodel.models.observations import CDR_PRIORS, CDRObservation
from flowmodel.models.priors import DEFAULT_PRIORS
from tests.models.logp_cases import CASES, CDR_CASES, PARTS, REFERENCE, evaluate

REF = json.loads(REFERENCE.read_text())
REF_PARTS = json.loads(PARTS.read_text())


def _cross_border_prior_change(state, point) -> float:
    """New minus old log prior density of beta[cross_border] at ``point``."""
    terms = state["latent"].get("terms", [])
    if "beta" not in point or "cross_border" not in terms:
        return 0.0
    k = terms.index("cross_border")
    beta = np.asarray(point["beta"], dtype=float)[k]
    sd = state["latent"]["term_sd"][k]
    old = DEFAULT_PRIORS["beta"]
    new = DEFAULT_PRIORS["cross_border"]
    return float(
        stats.norm.logpdf(beta, new["mu"] * sd, new["sigma"] * sd)
        - stats.norm.logpdf(beta, old["mu"], old["sigma"])
    )


def _same_shares(data, pm_model, point) -> tuple[dict[str, np.ndarray], float]:
    """The new-parametrisation point with the old point's market shares; the prior change.

    Old: ``logit s_i = logit(p_i) + delta_c + sigma e_i``. New: ``logit s_i = m_c +
    delta_c + b z_i + sigma e_i`` with ``m_c + b z_i = logit(p_i)`` for the within-country
    sd ``b`` of ``logit(p)``; ``delta_c`` and ``e_i`` unchanged.
    """
    units = np.flatnonzero(np.isin(data["unit"].values, pm_model.coords["market_unit"]))
    design = CDRObservation("cdr").market_share_design(data, units)
    assert design["scale"] == "logit" and design["level"] == "covariate"
    cov = data["cdr_subscribers_per_resident"].values[units]
    gap = special.logit(cov) - design["centre"]
    slope = float(np.dot(gap, design["z"]) / np.dot(design["z"], design["z"]))
    np.testing.assert_allclose(design["centre"] + slope * design["z"], special.logit(cov))
    offset_prior = CDR_PRIORS["market_share_country"]
    slope_prior = CDR_PRIORS["market_share_slope"]
    new = dict(point)
    delta = new.pop("market_share_country")
    # the common level (new) is 0, the country offsets keep their values; both are sampled
    # relative to the log period scale and the offsets centred on the level (their prior is
    # unchanged): level_raw = level + mean(g) lam, country_raw = level + offset + g_c lam, with
    # lam = log kappa - log median(kappa), g_c = 1 / (1 - prior share of the country)
    countries = np.asarray(data["country"].values).astype(str)[units]
    first = np.unique(countries, return_index=True)[1]
    g = 1.0 / (1.0 - special.expit(design["centre"][first] + offset_prior["mu"]))
    lam = float(point["period_scale_log__"]) - CDR_PRIORS["period_scale"]["mu"]
    level_prior = CDR_PRIORS["market_share_level"]
    new["market_share_level_raw"] = np.asarray(level_prior["mu"] + g.mean() * lam)
    new["market_share_country_raw"] = delta + g * lam
    new["market_share_slope"] = np.asarray(slope)
    change = stats.norm.logpdf(slope, slope_prior["mu"], slope_prior["sigma"])
    change += stats.norm.logpdf(0.0, level_prior["mu"], level_prior["sigma"])
    if "market_origin_term" in pm_model.coords:
        # the share's slopes on the latent's origin terms (later still) at 0: the same shares
        n_terms = len(pm_model.coords["market_origin_term"])
        origin_prior = CDR_PRIORS["market_share_origin_slope"]
        new["market_share_origin_slope"] = np.zeros(n_terms)
        change += n_terms * stats.norm.logpdf(0.0, origin_prior["mu"], origin_prior["sigma"])
    return new, float(change)


@pytest.mark.parametrize("name", sorted(CASES))
def test_logp_equals_the_reference(name):
    make_data, make_model = CASES[name]
    data = make_data()
    pm_model, state, _ = make_model()._build(data)
    for k, entry in enumerate(REF[name]):
        point = {key: np.asarray(v) for key, v in entry["point"].items()}
        change = _cross_border_prior_change(state, point)
        if name in CDR_CASES:
            point, share_change = _same_shares(data, pm_model, point)
            change += share_change
            for pot in pm_model.potentials:
                if pot.name.endswith("_total"):
                    continue
                got = float(pm_model.compile_logp(vars=[pot])(point))
                assert got == pytest.approx(REF_PARTS[name][k][pot.name], rel=1e-8, abs=1e-8)
            if name != "fusion_census_cdr":
                continue
        assert set(point) == {v.name for v in pm_model.value_vars}
        total, lik = evaluate(pm_model, point)
        assert lik == pytest.approx(entry["loglik"], rel=1e-8, abs=1e-8)
        assert total == pytest.approx(entry["logp"] + change, rel=1e-8, abs=1e-8)
