"""Inference benchmark: effective samples per second of the gravity and fusion models, per backend.

For N units of a simulated world (all pairs observed, Poisson flows) it fits the
6-coefficient Poisson gravity model (intercept, origin and destination log
population, destination night lights per capita, log distance, cross border;
no country effects) with

* ``naive``   a direct PyMC implementation: raw covariates, a dense design matrix,
              ``pm.Poisson(observed=...)``, ``pm.sample()`` with its default sampler;
* ``careful`` the same model written by a careful user: covariates centred and scaled
              (the coefficients mapped back to the raw scale), otherwise as ``naive``;
* flowmodel's ``GravityModel`` with each NUTS backend (standardised covariates,
  sufficient-statistic likelihood) and with ``laplace``;
* a statsmodels Poisson GLM (wall time only).

ESS/s = min bulk ESS over the 6 coefficients / wall time of the fit call
(compilation included). Usage::

    .venv/bin/python benchmarks/inference.py --units 50 150 400 \
        --chains 4 --draws 1000 --tune 1000 --backends naive careful nutpie numpyro pymc laplace glm

``--fusion`` benchmarks the demo's fusion model instead: the default simulated world
(:func:`flowmodel.simulate.simulate_world`, ``--units`` units; ``--cdr-activity 4``
for a sparse operator log) through the pipeline's ``prepare`` stage, fitted with the
demo config's model and sampler settings (override with ``--draws/--tune/--chains``).
ESS/s = min bulk ESS over the model's summary parameters (latent coefficients,
country effects, phi, the CDR scales) / wall time of the fit call (compilation,
the pointwise log-likelihood and its LOO included); also the largest R-hat and the
peak memory of the process::

    .venv/bin/python benchmarks/inference.py --fusion --units 120 --backends nutpie laplace
    .venv/bin/python benchmarks/inference.py --fusion --units 120 --cdr-activity 4
    .venv/bin/python benchmarks/inference.py --fusion --units 120 --cdr-activity 4 \
        --backends nutpie --nutpie-adaptation low_rank
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings

import numpy as np

CHAINS_ENV = "XLA_FLAGS"


def world(n_units: int, seed: int = 0):
    from flowmodel.simulate import DEFAULT_TRUTH, simulate_flow_dataset

    # the simulator's process without country effects (the benchmarked model has none)
    truth = {**DEFAULT_TRUTH, "sigma_country": 1e-9}
    ds, truth = simulate_flow_dataset(n_units, 3, seed=seed, truth=truth, likelihood="poisson")
    return ds, truth


def design(ds):
    n = ds.sizes["unit"]
    off = ~np.eye(n, dtype=bool)
    lp = np.log(ds["population"].values)
    nl = ds["night_lights_per_capita"].values
    cols = [
        np.broadcast_to(lp[:, None], (n, n))[off],
        np.broadcast_to(lp[None, :], (n, n))[off],
        np.broadcast_to(nl[None, :], (n, n))[off],
        np.log(ds["distance_km"].values[off]),
        ds["cross_border"].values[off].astype(float),
    ]
    return np.column_stack(cols), ds["flow_census"].values[off]


def min_ess(idata, var: str, extra=()) -> float:
    import arviz as az

    post = idata["posterior"].to_dataset()
    names = [var, *extra]
    ess = az.ess(post[names])
    return float(min(float(ess[v].min()) for v in names))


def run_naive(ds, chains, draws, tune, seed, *, centred: bool = False):
    """A direct PyMC fit (``centred``: the careful user's standardised covariates)."""
    import pymc as pm

    X, y = design(ds)
    if centred:
        X = (X - X.mean(axis=0)) / X.std(axis=0)
    with pm.Model():
        intercept = pm.Normal("intercept", 0, 10)
        beta = pm.Normal("beta", 0, 10, shape=X.shape[1])
        mu = pm.math.exp(intercept + pm.math.dot(X, beta))
        pm.Poisson("y", mu=mu, observed=y)
        t0 = time.perf_counter()
        idata = pm.sample(
            draws=draws, tune=tune, chains=chains, random_seed=seed, progressbar=False
        )
        wall = time.perf_counter() - t0
    return wall, min_ess(idata, "beta", ("intercept",))


def run_flowmodel(ds, backend, chains, draws, tune, seed):
    from flowmodel.models import GravityModel

    model = GravityModel(
        destination_covariates=["log_population", "night_lights_per_capita"],
        likelihood="poisson",
        country_effects=False,
    )
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = model.fit(
            ds, backend=backend, random_seed=seed, chains=chains, draws=draws, tune=tune
        )
    wall = time.perf_counter() - t0
    ess = min_ess(idata, "beta", ("intercept",)) if backend != "map" else float("nan")
    summary = model.summary()
    coefs = summary.loc[[r for r in summary.index if r.startswith("beta_raw")], ["mean", "sd"]]
    return wall, ess, coefs


def run_glm(ds):
    import statsmodels.api as sm

    X, y = design(ds)
    t0 = time.perf_counter()
    res = sm.GLM(y, sm.add_constant(X), family=sm.families.Poisson()).fit()
    return time.perf_counter() - t0, res.params, res.bse


def run_fusion(args) -> list[dict]:
    """The demo's fusion model on the default world: wall time, ESS/s, R-hat, peak memory."""
    import importlib.util
    import resource
    import tempfile
    from pathlib import Path

    import arviz as az

    from flowmodel.config import load_config
    from flowmodel.dataset import load_dataset
    from flowmodel.pipeline import build_model

    path = Path(__file__).resolve().parents[1] / "scripts" / "fusion_cdr_sweep.py"
    spec = importlib.util.spec_from_file_location("fusion_cdr_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.units:
            work = Path(tmp) / f"world{n}"
            sweep.prepare_world(work, seed=args.seed, cdr_activity=args.cdr_activity, n_units=n)
            cfg = load_config(work / "demo.toml")
            ds = load_dataset(work / "dataset.nc").load()
            overrides = {
                k: v
                for k in ("draws", "tune", "chains")
                if (v := getattr(args, k)) != parser_defaults[k]
            }
            kwargs = sweep.fit_kwargs(cfg, overrides)
            for backend in args.backends:
                model = build_model(cfg)
                extra = (
                    {"nuts": {"adaptation": args.nutpie_adaptation}}
                    if backend == "nutpie" and args.nutpie_adaptation != "diag"
                    else {}
                )
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.fit(ds, backend=backend, random_seed=args.seed, **kwargs, **extra)
                wall = time.perf_counter() - t0
                post = model.posterior
                names = [v for v in model._summary_vars() if v in post]
                ess = az.ess(post[names])
                min_ess = min(float(np.nanmin(ess[v].values)) for v in names)
                rhat = (
                    max(float(np.nanmax(az.rhat(post[names])[v].values)) for v in names)
                    if post.sizes.get("chain", 1) > 1 and not model.fit_meta["approximate"]
                    else float("nan")
                )
                row = {
                    "units": n,
                    "backend": backend,
                    "cdr_activity": args.cdr_activity,
                    "wall_s": wall,
                    "min_ess": min_ess if not model.fit_meta["approximate"] else float("nan"),
                    "rhat_max": rhat,
                    "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                    "diagnostics": model.fit_meta.get("diagnostics", []),
                    "adaptation": args.nutpie_adaptation if backend == "nutpie" else None,
                }
                if (
                    "sample_stats" in model.idata.children
                    and "n_steps" in model.idata["sample_stats"]
                ):
                    row["steps_per_draw"] = float(model.idata["sample_stats"]["n_steps"].mean())
                row["ess_per_s"] = row["min_ess"] / wall
                rows.append(row)
                print(
                    f"fusion N={n:4d} {backend:8s} wall={wall:7.1f}s minESS={row['min_ess']:7.0f} "
                    f"ESS/s={row['ess_per_s']:6.2f} R-hat={rhat:.3f} peak={row['peak_mb']:.0f} MB "
                    f"steps/draw={row.get('steps_per_draw', float('nan')):.1f} "
                    f"{'; '.join(row['diagnostics'])}",
                    flush=True,
                )
    return rows


#: argparse defaults of --draws/--tune/--chains (a fusion run uses the demo's unless given)
parser_defaults = {"draws": 1000, "tune": 1000, "chains": 4}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, nargs="+", default=[50, 150, 400])
    parser.add_argument("--chains", type=int, default=4)
    parser.add_argument("--draws", type=int, default=1000)
    parser.add_argument("--tune", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["naive", "careful", "nutpie", "numpyro", "pymc", "laplace", "glm"],
    )
    parser.add_argument(
        "--naive-max-units", type=int, default=10_000, help="skip naive above this N"
    )
    parser.add_argument("--json", default=None, help="write the results here too")
    parser.add_argument(
        "--fusion", action="store_true", help="the demo's fusion model on the default world"
    )
    parser.add_argument(
        "--cdr-activity", type=float, default=None, help="--fusion: sparse CDR (e.g. 4)"
    )
    parser.add_argument(
        "--nutpie-adaptation",
        choices=["diag", "low_rank"],
        default="diag",
        help="--fusion: nutpie's mass-matrix adaptation (low_rank: nuts={'adaptation': ...})",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault(CHAINS_ENV, f"--xla_force_host_platform_device_count={args.chains}")
    if args.fusion:
        if args.backends == parser.get_default("backends"):
            args.backends = ["nutpie", "laplace"]
        if args.units == parser.get_default("units"):
            args.units = [120]
        rows = run_fusion(args)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        return rows
    rows = []
    for n in args.units:
        ds, _ = world(n, seed=args.seed)
        pairs = int(ds["flow_census"].notnull().sum())
        base = {"units": n, "pairs": pairs}
        for backend in args.backends:
            if backend in ("naive", "careful"):
                if n > args.naive_max_units:
                    continue
                wall, ess = run_naive(
                    ds, args.chains, args.draws, args.tune, args.seed, centred=backend == "careful"
                )
                row = base | {"backend": backend, "wall_s": wall, "min_ess": ess}
            elif backend == "glm":
                wall, _params, _ = run_glm(ds)
                row = base | {"backend": "glm", "wall_s": wall, "min_ess": float("nan")}
            else:
                wall, ess, _ = run_flowmodel(
                    ds, backend, args.chains, args.draws, args.tune, args.seed
                )
                row = base | {"backend": backend, "wall_s": wall, "min_ess": ess}
            row["ess_per_s"] = row["min_ess"] / row["wall_s"]
            rows.append(row)
            print(
                f"N={n:5d} pairs={pairs:7d} {row['backend']:8s} wall={row['wall_s']:8.2f}s "
                f"minESS={row['min_ess']:8.0f} ESS/s={row['ess_per_s']:8.2f}",
                flush=True,
            )
    for n in args.units:
        by = {r["backend"]: r for r in rows if r["units"] == n}
        for ref in ("naive", "careful"):
            if ref not in by:
                continue
            for b in ("nutpie", "numpyro", "pymc"):
                if b in by:
                    ratio = by[b]["ess_per_s"] / by[ref]["ess_per_s"]
                    print(f"N={n}: {b} / {ref} ESS/s = {ratio:.2f}x")
        if "glm" in by and "laplace" in by:
            print(
                f"N={n}: laplace wall / GLM wall = {by['laplace']['wall_s'] / by['glm']['wall_s']:.1f}x"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
