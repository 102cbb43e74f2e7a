"""Models whose log-probability is pinned by ``tests/models/data/logp_reference.json``.

The reference values were written by the code *before* models were recomposed
from a latent field and observation models (``python -m tests.models.logp_cases``
at that commit); ``test_logp_equivalence.py`` rebuilds every case with the
current code and checks the log-probability at the stored points to 1e-8.
Only the public API is used here, so the same file runs against both versions.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE = Path(__file__).parent / "data" / "logp_reference.json"
#: Per-Potential log-likelihood of the CDR cases at the stored points, written by the model
#: layer before the CDR market share was reparametrised (issue 15; commit b2e8299,
#: ``python -m tests.models.logp_cases --parts``): what the new parametrisation must
#: reproduce once its parameters are mapped to the same market shares.
PARTS = Path(__file__).parent / "data" / "logp_reference_parts.json"
#: The cases with a CDR source (their market-share parameters changed in issue 15).
CDR_CASES = ("fusion_census_cdr", "fusion_totals_marginals")


def _gravity_world(seed: int = 1, n_units: int = 40):
    from flowmodel.simulate import simulate_flow_dataset

    ds, _ = simulate_flow_dataset(n_units, 3, seed=seed)
    return ds


def _censored_gravity_world():
    """Census-like cells: small counts suppressed as "<5" (1..4), a few redacted at 15 (0..15)."""
    ds = _gravity_world(seed=3).copy(deep=True)
    y = ds["flow_census"].values.copy()
    upper = np.full_like(y, np.nan)
    lower = np.full_like(y, np.nan)
    small = (y > 0) & (y < 5)
    upper[small], lower[small] = 4.0, 1.0
    rng = np.random.default_rng(0)
    red = (y <= 15) & ~small & (rng.random(y.shape) < 0.3)
    upper[red] = 15.0
    y[small | red] = np.nan
    ds["flow_census"] = (("origin", "destination"), y)
    ds["flow_census_max"] = (("origin", "destination"), upper)
    ds["flow_census_min"] = (("origin", "destination"), lower)
    return ds


def _radiation_world():
    from tests.models.conftest import radiation_world

    return radiation_world(30, seed=2)


def _fusion_world(**kwargs: Any):
    from flowmodel import simulate

    make = getattr(simulate, "simulate_fusion_dataset", None)
    if make is None:  # before the simulator moved out of the models
        from flowmodel.models.fusion import simulate_fusion_dataset as make
    ds, truth = make(units_per_country=4, seed=2, **kwargs)
    return ds, truth


def _old_rule_totals(ids, y, o, d, redacted, redaction, period, in_cdr):
    """In/out totals with the suppression rule the reference was recorded with.

    The simulator now protects its totals with the package's stricter rule; this
    case pins the dataset it was recorded on, so the test compares the models alone.
    """
    import pandas as pd

    table = pd.DataFrame({"unit_id": ids[in_cdr], "period": period})
    counts = y[o, d]
    n = len(ids)
    for kind, side in (("outflow", o), ("inflow", d)):
        total = np.bincount(side, counts, minlength=n)
        released = np.bincount(side, np.where(redacted, 0.0, counts), minlength=n)
        n_red = np.bincount(side, redacted.astype(float), minlength=n)
        small = total <= redaction
        reveal = (n_red > 0) & (total - released <= redaction)
        value = np.where(small | reveal, np.nan, total)
        bound = np.where(small, redaction, np.where(reveal, released + redaction * n_red, np.nan))
        table[kind] = value[in_cdr]
        table[f"{kind}_max"] = bound[in_cdr]
    return table


def _fusion_with_marginals():
    from unittest import mock

    from flowmodel import simulate

    with mock.patch.object(simulate, "_simulated_totals", _old_rule_totals):
        ds, truth = _fusion_world(totals=True)
    import pandas as pd

    try:
        from flowmodel.dataset import marginals_to_dataset
    except ImportError:
        from flowmodel.models.fusion import marginals_to_dataset
    flows = truth["mu"]
    country = pd.Series(ds["country"].values, index=ds["unit"].values)
    frame = flows.to_dataframe("value").reset_index()
    frame["origin_country"] = country.reindex(frame["origin"]).to_numpy()
    frame["destination_country"] = country.reindex(frame["destination"]).to_numpy()
    table = (
        frame.dropna()
        .groupby(["origin_country", "destination_country"], as_index=False)["value"]
        .sum()
    )
    table = table.loc[table["origin_country"] != table["destination_country"]].head(8)
    return marginals_to_dataset(ds, table, name="un", rel_sd=0.2)


def _gravity(**options: Any) -> Callable[[], Any]:
    from flowmodel.models import GravityModel

    return lambda: GravityModel(**options)


def _radiation(**options: Any) -> Callable[[], Any]:
    from flowmodel.models import RadiationModel

    return lambda: RadiationModel(**options)


def _fusion(**options: Any) -> Callable[[], Any]:
    def make():
        from flowmodel.models import FusionModel, GravityModel

        latent = GravityModel(
            origin_covariates=["log_population"],
            destination_covariates=["log_population", "night_lights_per_capita"],
        )
        return FusionModel(latent=latent, **options)

    return make


DEST = ["log_population", "night_lights_per_capita"]

#: name -> (dataset factory, model factory)
CASES: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
    "gravity_negbin": (_gravity_world, _gravity(destination_covariates=DEST)),
    "gravity_poisson": (_gravity_world, _gravity(likelihood="poisson")),
    "gravity_noncentered_slopes": (
        _gravity_world,
        _gravity(noncentered=True, country_slopes=["log_distance"]),
    ),
    "gravity_exp_contiguity_off": (_gravity_world, _gravity(cost_func="exp")),
    "gravity_censored": (_censored_gravity_world, _gravity(destination_covariates=DEST)),
    "gravity_censored_poisson": (_censored_gravity_world, _gravity(likelihood="poisson")),
    "gravity_production": (_gravity_world, _gravity(constraint="production")),
    "gravity_attraction": (_gravity_world, _gravity(constraint="attraction")),
    "gravity_doubly_poisson": (
        _gravity_world,
        _gravity(constraint="doubly", likelihood="poisson"),
    ),
    "gravity_doubly_negbin": (_gravity_world, _gravity(constraint="doubly")),
    "radiation_original": (_radiation_world, _radiation()),
    "radiation_extended_per_country": (
        _radiation_world,
        _radiation(variant="extended", per_country_tau=True),
    ),
    "radiation_poisson_infinite": (
        _radiation_world,
        _radiation(likelihood="poisson", finite_size=False),
    ),
    "fusion_census_cdr": (lambda: _fusion_world()[0], _fusion(sources=["census", "cdr"])),
    "fusion_totals_marginals": (_fusion_with_marginals, _fusion(sources=["census", "cdr"])),
    "fusion_census_only": (lambda: _fusion_world()[0], _fusion(sources=["census"])),
}


def points(model: Any, n: int = 3, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """The initial point and ``n - 1`` seeded perturbations of it (unconstrained space)."""
    start = model.initial_point(0)
    rng = np.random.default_rng(seed)
    out = [start]
    for _ in range(n - 1):
        out.append(
            {k: np.asarray(v) + 0.3 * rng.standard_normal(np.shape(v)) for k, v in start.items()}
        )
    return out


def likelihood_terms(model: Any) -> list[Any]:
    """Observed variables and potentials: the log-likelihood without the priors."""
    return list(model.observed_RVs) + list(model.potentials)


def evaluate(pm_model: Any, point: dict[str, Any]) -> tuple[float, float]:
    """(total log-probability, log-likelihood) of ``pm_model`` at ``point``."""
    total = pm_model.compile_logp()(point)
    lik = pm_model.compile_logp(vars=likelihood_terms(pm_model))(point)
    return float(total), float(lik)


def record() -> dict[str, Any]:
    """Build every case and evaluate it at its points (run before a refactor)."""
    out: dict[str, Any] = {}
    for name, (make_data, make_model) in CASES.items():
        ds = make_data()
        pm_model = make_model().build_model(ds)
        entries = []
        for point in points(pm_model):
            total, lik = evaluate(pm_model, point)
            entries.append(
                {
                    "point": {k: np.asarray(v).tolist() for k, v in point.items()},
                    "logp": total,
                    "loglik": lik,
                }
            )
        out[name] = entries
        print(f"{name}: {entries[0]['logp']:.6f}", file=sys.stderr)
    return out


def record_parts() -> dict[str, Any]:
    """Each Potential of the CDR cases at the stored points of :data:`REFERENCE`."""
    reference = json.loads(REFERENCE.read_text())
    out: dict[str, Any] = {}
    for name in CDR_CASES:
        make_data, make_model = CASES[name]
        pm_model = make_model().build_model(make_data())
        entries = []
        for entry in reference[name]:
            point = {k: np.asarray(v) for k, v in entry["point"].items()}
            entries.append(
                {
                    pot.name: float(pm_model.compile_logp(vars=[pot])(point))
                    for pot in pm_model.potentials
                }
            )
        out[name] = entries
    return out


if __name__ == "__main__":
    if "--parts" in sys.argv:
        PARTS.write_text(json.dumps(record_parts(), indent=1) + "\n")
        print(f"wrote {PARTS}", file=sys.stderr)
    else:
        REFERENCE.parent.mkdir(parents=True, exist_ok=True)
        REFERENCE.write_text(json.dumps(record(), indent=1) + "\n")
        print(f"wrote {REFERENCE}", file=sys.stderr)
