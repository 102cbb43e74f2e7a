"""The recomposed models (latent field + observation models) give the same log-probability.

``data/logp_reference.json`` was written by the model layer as it was before it was
recomposed (``python -m tests.models.logp_cases`` at that commit). Every case is
rebuilt with the current code and evaluated at the same points:

- the log-likelihood (observed terms and Potentials) must agree to 1e-8;
- the total log-probability must agree to 1e-8 once the one intended change is
  accounted for: ``cross_border`` now has its own, raw-scale default prior
  (``priors["cross_border"]``) instead of the standardised ``beta`` prior.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from flowmodel.models.priors import DEFAULT_PRIORS
from tests.models.logp_cases import CASES, REFERENCE, evaluate

REF = json.loads(REFERENCE.read_text())


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


@pytest.mark.parametrize("name", sorted(CASES))
def test_logp_equals_the_reference(name):
    make_data, make_model = CASES[name]
    pm_model, state, _ = make_model()._build(make_data())
    for entry in REF[name]:
        point = {k: np.asarray(v) for k, v in entry["point"].items()}
        assert set(point) == {v.name for v in pm_model.value_vars}
        total, lik = evaluate(pm_model, point)
        assert lik == pytest.approx(entry["loglik"], rel=1e-8, abs=1e-8)
        expected = entry["logp"] + _cross_border_prior_change(state, point)
        assert total == pytest.approx(expected, rel=1e-8, abs=1e-8)
