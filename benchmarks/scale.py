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

``--fusion``: the fusion model on a sparse pair set, at several sizes (each in its own
process, so every size's peak memory is its own):

1. ``simulate``: :func:`flowmodel.simulate.simulate_fusion_dataset` with
   ``units / countries`` units per country (census in two countries, redacted CDR in
   three); with ``--observed-k`` (default: ``--k``) the sources report only the pairs
   among each origin's ``observed-k`` nearest (real tables list nearby, non-empty
   cells), so the data grow like N, not N^2 (``--observed-k 0``: every cell of the
   simulator). The simulator itself is dense (N x N): this stage is O(N^2) and is
   not part of the method's cost;
2. ``prepare``: :func:`flowmodel.pairs.sparse_pairs` from the units' ``lon``/``lat``
   (k-d tree; the dense distances are dropped first), ``k`` nearest plus every pair a
   source informs;
3. ``fit[<backend>]``: :class:`~flowmodel.models.fusion.FusionModel` on the sparse set,
   for each of ``--backends`` (default ``laplace nutpie``);
4. ``predict[<backend>]``: every pair of the set with intervals (posterior predictive,
   float32 draws, streamed); with ``--predict-all`` also ``predict_all[<backend>]``:
   every one of the N^2 pairs (the simulator's dense covariates, dask threads).

Each stage prints its wall time and its own peak RSS (sampled every 20 ms); the
parent prints the growth exponent ``b`` of ``time ~ N^b`` (least squares on the log
scale) of every fit and predict stage over the sizes, and of the model's size
(cells + latent rows)::

    .venv/bin/python benchmarks/scale.py --fusion --units 120 480 1000 --draws 200
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class StagePeak:
    """Wall time and peak RSS (GB) of one stage: a thread samples ``/proc/self/statm``."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        try:
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:  # not Linux: the process's peak so far
            return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> StagePeak:
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())
        self.peak_gb = self.peak / 2**30


def fusion_one(args) -> dict:
    """One size of the fusion benchmark (run in its own process)."""
    from flowmodel.models import FusionModel, GravityModel
    from flowmodel.pairs import reports_near, sparse_pairs
    from flowmodel.simulate import simulate_fusion_dataset

    units = args.units[0]
    per_country = max(2, units // args.countries)
    out: dict = {"units": per_country * args.countries, "k": args.k, "stages": {}}

    def report(name: str, stage: StagePeak, **extra) -> None:
        out["stages"][name] = {"seconds": stage.seconds, "peak_rss_gb": stage.peak_gb, **extra}
        more = "".join(f", {k} {v:,}" for k, v in extra.items())
        print(
            f"[N={out['units']}] {name}: {stage.seconds:.1f}s, peak RSS {stage.peak_gb:.2f} GB"
            f"{more}",
            flush=True,
        )

    with StagePeak() as stage:
        ds, _ = simulate_fusion_dataset(
            units_per_country=per_country,
            n_countries=args.countries,
            totals=args.totals,
            seed=args.seed,
        )
        observed_k = args.k if args.observed_k is None else args.observed_k
        if observed_k > 0:
            ds = reports_near(ds, observed_k)
    report("simulate", stage)

    with StagePeak() as stage:
        dense = [
            n
            for n, v in ds.data_vars.items()
            if "origin" in v.dims and not str(n).startswith("flow_")
        ]
        sparse = sparse_pairs(ds.drop_vars(dense), k=args.k, include_observed=True)
        # --predict-all keeps the dense pair covariates (no flows) to predict all N^2 pairs
        everything = (
            ds.drop_vars([n for n in ds.data_vars if str(n).startswith("flow_")])
            if args.predict_all
            else None
        )
        del ds
    report("prepare", stage, pairs=int(sparse.sizes["pair"]))
    out["pairs"] = int(sparse.sizes["pair"])

    latent = GravityModel(
        origin_covariates=["log_population"],
        destination_covariates=["log_population", "night_lights_per_capita"],
        noncentered={"auto": "auto", "true": True, "false": False}[args.noncentered],
    )
    for backend in args.backends:
        model = FusionModel(latent=latent, sources=["census", "cdr"])
        kwargs = {"draws": args.draws, "chains": args.chains}
        if backend in ("nutpie", "pymc", "numpyro"):
            kwargs["tune"] = args.tune
        with StagePeak() as stage, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(sparse, backend=backend, random_seed=1, progressbar=False, **kwargs)
        cells = int(sum(model.fit_meta["n_cells"].values()))
        rows = int(model.fit_meta["n_pairs"])
        out["cells"], out["latent_rows"] = cells, rows
        report(f"fit[{backend}]", stage, cells=cells, latent_rows=rows)
        with StagePeak() as stage:
            pred = model.predict(sparse, dtype=np.float32, progress=False)
            n_pred = int(np.isfinite(pred["q95"].values).sum())
        report(f"predict[{backend}]", stage, pairs_with_intervals=n_pred)
        if everything is not None:
            with StagePeak() as stage:
                pred = model.predict(
                    everything,
                    draws=args.draws,
                    dtype=np.float32,
                    use_dask=True,
                    progress=False,
                )
                n_pred = int(np.isfinite(pred["q95"].values).sum())
                del pred
            report(f"predict_all[{backend}]", stage, pairs_with_intervals=n_pred)
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def growth_exponent(sizes, values) -> float:
    """Slope ``b`` of ``log value = a + b log size`` (least squares)."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.asarray(values, float))
    return float(np.polyfit(x, y, 1)[0]) if len(x) > 1 else float("nan")


def fusion_main(args) -> list[dict]:
    """Run :func:`fusion_one` for each size in a fresh process; print the growth exponents."""
    runs = []
    for units in args.units:
        cmd = [sys.executable, __file__, "--fusion", "--one", "--units", str(units)]
        cmd += ["--k", str(args.k), "--countries", str(args.countries)]
        cmd += ["--draws", str(args.draws), "--tune", str(args.tune)]
        cmd += ["--chains", str(args.chains), "--seed", str(args.seed)]
        cmd += ["--backends", *args.backends]
        if args.observed_k is not None:
            cmd += ["--observed-k", str(args.observed_k)]
        if args.totals:
            cmd.append("--totals")
        if args.predict_all:
            cmd.append("--predict-all")
        cmd += ["--noncentered", args.noncentered]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            sys.stdout.write(done.stdout)
            sys.stderr.write(done.stderr[-5000:])
            raise SystemExit(f"N={units} failed (exit {done.returncode}): {' '.join(cmd)}")
        sys.stdout.write(done.stdout.split(_RESULT)[0])
        runs.append(json.loads(done.stdout.split(_RESULT)[1]))
    sizes = [r["units"] for r in runs]
    summary = {"sizes": sizes, "runs": runs, "exponent_in_N": {}}
    size_of_model = [r["cells"] + r["latent_rows"] for r in runs]
    summary["exponent_in_N"]["cells+latent_rows"] = growth_exponent(sizes, size_of_model)
    summary["exponent_in_N"]["pairs"] = growth_exponent(sizes, [r["pairs"] for r in runs])
    for stage in runs[0]["stages"]:
        seconds = [r["stages"][stage]["seconds"] for r in runs]
        summary["exponent_in_N"][stage] = growth_exponent(sizes, seconds)
    print(f"\nsizes N = {sizes}; growth exponent b of y ~ N^b:")
    for name, b in summary["exponent_in_N"].items():
        print(f"  {name:28s} b = {b:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


_RESULT = "=== fusion result ===\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fusion", action="store_true", help="fusion model on sparse pairs")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, default=50, help="--fusion: nearest pairs per origin")
    parser.add_argument(
        "--noncentered",
        choices=["auto", "true", "false"],
        default="auto",
        help="--fusion: country effects (auto: non-centred for Laplace; 'false' for large worlds)",
    )
    parser.add_argument(
        "--predict-all",
        action="store_true",
        help="--fusion: also predict every one of the N^2 pairs with intervals (dense covariates)",
    )
    parser.add_argument(
        "--observed-k",
        type=int,
        default=None,
        help="--fusion: sources report the pairs among each origin's nearest (default --k; "
        "0: every cell of the simulator)",
    )
    parser.add_argument(
        "--backends", nargs="+", default=["laplace", "nutpie"], help="--fusion: fit backends"
    )
    parser.add_argument("--tune", type=int, default=200, help="--fusion: NUTS tuning steps")
    parser.add_argument("--chains", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--totals", action="store_true", help="--fusion: the operator's in/out totals too"
    )
    parser.add_argument("--units", type=int, nargs="+", default=[5000])
    parser.add_argument("--countries", type=int, default=6)
    parser.add_argument(
        "--draws", type=int, default=100, help="posterior draws per chain (2 chains)"
    )
    parser.add_argument("--workers", type=int, default=2, help="dask threads")
    parser.add_argument("--out", default="/tmp/flowmodel-scale/flows.nc")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.fusion:
        if args.one:
            result = fusion_one(args)
            print(_RESULT + json.dumps(result), flush=True)
            return result
        return fusion_main(args)
    args.units = args.units[0]

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
