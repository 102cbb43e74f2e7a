"""Laplace integrated over hyperparameters (``integrate=``) against exact answers.

The reference is the eight-schools model (Rubin 1981) in its non-centred form with
normal priors on the mean and a half-normal on the between-school sd ``tau``: given
``tau`` every other quantity is Gaussian, so the posterior of ``tau`` and of the
mean are computed exactly by one-dimensional quadrature (the mean integrates out of
the normal likelihood analytically). The joint-mode Laplace misplaces ``tau`` there
(the mode of a non-centred hierarchy is not its centre); the integrated one must
recover the exact quantiles.
"""

from __future__ import annotations

import warnings

import numpy as np
import pymc as pm
import pytest
from scipy import stats

from flowmodel.exceptions import ModelConfigError
from flowmodel.models.inference import run_inference

Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
S = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])
MU_SD = TAU_SD = 10.0
PROBS = (0.05, 0.5, 0.95)


def schools() -> pm.Model:
    with pm.Model() as model:
        mu = pm.Normal("mu", 0.0, MU_SD)
        tau = pm.HalfNormal("tau", TAU_SD)
        z = pm.Normal("z", 0.0, 1.0, shape=len(Y))
        pm.Normal("y", mu + tau * z, S, observed=Y)
    return model


@pytest.fixture(scope="module")
def exact() -> dict[str, np.ndarray]:
    """Exact posterior quantiles of ``tau`` and ``mu`` by quadrature over ``tau``."""
    taus = np.linspace(1e-4, 80.0, 8001)
    log_m = np.array(
        [
            stats.multivariate_normal(np.zeros(len(Y)), np.diag(S**2 + t**2) + MU_SD**2).logpdf(Y)
            for t in taus
        ]
    ) + stats.halfnorm(scale=TAU_SD).logpdf(taus)
    w = np.exp(log_m - log_m.max())
    w /= w.sum()
    tau_q = np.interp(PROBS, np.cumsum(w), taus)
    # mu | tau, y is normal: a mixture over the tau grid
    prec = 1 / MU_SD**2 + np.sum(1 / (S[None] ** 2 + taus[:, None] ** 2), axis=1)
    mean = np.sum(Y[None] / (S[None] ** 2 + taus[:, None] ** 2), axis=1) / prec
    grid = np.linspace(-40.0, 50.0, 3001)
    dens = (w[:, None] * stats.norm(mean[:, None], 1 / np.sqrt(prec)[:, None]).pdf(grid)).sum(0)
    cdf = np.cumsum(dens) / dens.sum()
    return {"tau": tau_q, "mu": np.interp(PROBS, cdf, grid)}


def laplace(model: pm.Model, **kwargs) -> dict[str, np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = run_inference(
            model,
            "laplace",
            {"draws": 2000, "chains": 2, **kwargs},
            random_seed=1,
            progressbar=False,
        )
    post = idata["posterior"]
    out = {v: np.quantile(post[v].values, PROBS) for v in ("tau", "mu")}
    out["attrs"] = dict(post.attrs)
    return out


def test_integrated_laplace_recovers_the_exact_hierarchical_posterior(exact):
    """The grid over ``tau`` gives its exact quantiles; the joint mode does not."""
    joint = laplace(schools())
    integrated = laplace(schools(), integrate=["tau"])
    print(
        f"tau 5/50/95%: exact {np.round(exact['tau'], 2)}, joint-mode Laplace "
        f"{np.round(joint['tau'], 2)}, integrated {np.round(integrated['tau'], 2)}; "
        f"mu: exact {np.round(exact['mu'], 2)}, integrated {np.round(integrated['mu'], 2)}"
    )
    # the joint mode's Gaussian puts tau's median at several times the exact one
    assert joint["tau"][1] > 2 * exact["tau"][1]
    # integrated: median and 95% quantile of tau within 20% (the lattice's cells are
    # one sd wide: its tails come out a little wide, never narrow)
    assert integrated["tau"][1] == pytest.approx(exact["tau"][1], rel=0.2)
    assert exact["tau"][2] <= integrated["tau"][2] <= 1.2 * exact["tau"][2]
    assert integrated["tau"][0] < 1.0
    # the school mean: every quantile within 0.1 posterior sd (exact sd about 4)
    assert np.abs(integrated["mu"] - exact["mu"]).max() < 0.4
    attrs = integrated["attrs"]
    assert attrs["laplace_integrated"] == "tau"
    assert 3 <= attrs["laplace_grid_points"] < 60 and attrs["laplace_grid_capped"] == 0


def test_integrate_names_scalar_free_parameters_or_fails_with_the_fix():
    with pytest.raises(ModelConfigError, match=r"not a free parameter.*Fix: one of"):
        laplace(schools(), integrate=["sigma"])
    with pytest.raises(ModelConfigError, match="has 8 elements"):
        laplace(schools(), integrate=["z"])
    with pytest.raises(ModelConfigError, match="1 to 3 distinct"):
        laplace(schools(), integrate=["tau", "tau"])


def test_other_backends_ignore_the_laplace_settings_and_say_so(caplog):
    """A run config's ``integrate`` holds for ``backend = "auto"``: when a NUTS or MAP
    fit is chosen it is dropped with a log line, not handed to PyMC."""
    import logging

    caplog.set_level(logging.INFO, logger="flowmodel.models.inference")
    idata = run_inference(
        schools(),
        "map",
        {"integrate": ["tau"], "newton_maxiter": 50},
        random_seed=1,
        progressbar=False,
    )
    assert "tau" in idata["posterior"]
    assert "map ignores integrate, newton_maxiter (Laplace settings)" in caplog.text
