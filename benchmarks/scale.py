"""Scale benchmark: 5,000 units (25 M pairs) simulated, fitted (Laplace), predicted with intervals.

Stages, each timed, with the process's peak RSS at the end:

1. ``simulate_flow_dataset(units, 6)`` with census flows observed for the origins of
   two countries (the "census countries");
2. ``GravityModel(...).fit(ds, backend="laplace")`` on those observed pairs;
3. ``model.predict(ds, draws=...)`` for every pair (posterior predictive, negative
   binomial noise, float32 draws), streamed in origin blocks through dask threads,
   reduced to ``mean`` and ``q05 ... q95``;
4. writing the result to NetCDF (atomically).

Usage::

    .venv/bin/python benchmarks/scale.py --units 5000 --draws 100 --workers 2
"""

from __future__ import annotations

import argparse
import json
import resource
import time
import warnings
from pathlib import Path

import numpy as np


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--units", type=int, default=5000)
    parser.add_argument("--countries", type=int, default=6)
    parser.add_argument(
        "--draws", type=int, default=100, help="posterior draws per chain (2 chains)"
    )
    parser.add_argument("--workers", type=int, default=2, help="dask threads")
    parser.add_argument("--out", default="/tmp/flowmodel-scale/flows.nc")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import dask

    from flowmodel.models import GravityModel
    from flowmodel.simulate import simulate_flow_dataset

    times = {}
    t0 = time.perf_counter()
    ds, truth = simulate_flow_dataset(
        args.units, args.countries, seed=0, observed_countries=["C00", "C01"]
    )
    times["simulate_s"] = time.perf_counter() - t0
    n_obs = int(ds["flow_census"].notnull().sum())
    print(
        f"simulated {args.units} units, {n_obs:,} observed pairs in {times['simulate_s']:.1f}s; "
        f"peak RSS {peak_rss_gb():.2f} GB",
        flush=True,
    )

    model = GravityModel(destination_covariates=["log_population", "night_lights_per_capita"])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=args.draws, chains=2)
    times["fit_s"] = time.perf_counter() - t0
    summary = model.summary()
    print(f"fit (laplace) in {times['fit_s']:.1f}s; peak RSS {peak_rss_gb():.2f} GB", flush=True)
    for term, value in truth["beta"].items():
        row = summary.loc[f"beta_raw[{term}]"]
        print(f"  {term:40s} truth {value:+.3f}  posterior {row['mean']:+.4f} ± {row['sd']:.4f}")

    t0 = time.perf_counter()
    with dask.config.set(scheduler="threads", num_workers=args.workers):
        pred = model.predict(ds, draws=args.draws, dtype=np.float32, use_dask=True).compute()
    times["predict_s"] = time.perf_counter() - t0
    n_pairs = args.units * (args.units - 1)
    print(
        f"predicted {n_pairs:,} pairs x {2 * args.draws} draws in {times['predict_s']:.1f}s; "
        f"peak RSS {peak_rss_gb():.2f} GB",
        flush=True,
    )

    from flowmodel.atomic import atomic_path

    t0 = time.perf_counter()
    out = Path(args.out)
    with atomic_path(out) as tmp:
        pred.astype(np.float32).to_netcdf(tmp, engine="h5netcdf")
    times["write_s"] = time.perf_counter() - t0
    times["total_s"] = sum(times.values())
    times["peak_rss_gb"] = peak_rss_gb()
    times |= {
        "units": args.units,
        "pairs": n_pairs,
        "observed_pairs": n_obs,
        "draws": 2 * args.draws,
    }
    print(json.dumps(times, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(times, indent=1))
    return times


if __name__ == "__main__":
    main()
