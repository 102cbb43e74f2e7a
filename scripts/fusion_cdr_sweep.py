"""Does the CDR help? Fusion against census-only on the default world, dense and sparse CDR.

For each seed and CDR activity the script simulates the default world
(:func:`flowmodel.simulate.simulate_world`, 120 units; ``cdr_activity=4``: a sparse
operator log whose median subscriber is seen on 4 nights a month), runs the
pipeline's ``prepare`` stage with the demo config (home detection, redaction, the
census as recorded: internal movers by unit, immigrants by previous country),
fits the demo's model with the demo's sampler settings and the same model
without the CDR (``sources = census, census_abroad``: census-only gravity), and
scores both against the truth:

- CPC of the posterior mean against the true expected flows, within the CDR-only
  countries (the issue asks fused - census-only >= 0.02);
- 90% coverage of the predictive intervals against the realised flows there;
- predicted / true within-country total of each CDR-only country (0.8-1.25);
- per-unit market shares: share of units whose true value lies inside their 90%
  interval (>= 85%) and the correlation of posterior means with the truth
  (>= 0.5); the truth is the operator's market share (``truth.json``) times the
  detection rate of home detection (relocations counted per true relocation, from
  the released outflow totals and ``true_cdr_homes.csv``);
- sampling: largest R-hat and smallest bulk ESS over the summary parameters
  (``FlowModel._summary_vars``: latent coefficients, country effects, phi, the
  CDR scales), divergences, the fit's wall time and the process's peak memory.

Run from the repository root (each world in its own process, for its peak memory)::

    .venv/bin/python scripts/fusion_cdr_sweep.py --seeds 0-4 --activity default 4 \\
        --out fusion-cdr-sweep.md

About 4-6 minutes per world on 2 cores (two fits). ``--draws``/``--tune``/``--chains``
override the demo's sampler settings (e.g. for a quick look); ``--option KEY=JSON``
changes the fused model's ``[model.options]`` (e.g. ``--option
spurious_relocations=true --option market_share_origin_terms=latent``);
``--backend`` and ``--sample KEY=JSON`` change its backend and add fit keywords,
e.g. the Laplace integrated over the shares' hyperparameters (docs/fusion.md)::

    .venv/bin/python scripts/fusion_cdr_sweep.py --seeds 0,1,4 --activity default 4 \
        --no-baselines --draws 500 --chains 2 --backend laplace \
        --sample 'integrate=["sigma_market_share", "period_scale"]'

(R-hat and ESS are left empty for an approximate backend.)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_seed_sweep import parse_seeds  # one seed-list syntax for both sweeps

ROOT = Path(__file__).resolve().parents[1]
CENSUS_ONLY = ["census", "census_abroad"]


def prepare_world(out: Path, *, seed: int, cdr_activity: float | None, n_units: int = 120):
    """Simulate the world and run the demo config's ``prepare`` stage; return the config."""
    from flowmodel.config import load_config
    from flowmodel.pipeline import DEMO_CONFIG, run_pipeline
    from flowmodel.simulate import simulate_world

    out.mkdir(parents=True, exist_ok=True)
    config = out / "demo.toml"
    if not (out / "world" / "truth.json").exists():
        simulate_world(
            out / "world", seed=seed, n_units=n_units, n_countries=6, cdr_activity=cdr_activity
        )
    truth = json.loads((out / "world" / "truth.json").read_text())
    # always the current demo config (its model settings may have changed since the world was
    # prepared; the prepare stage's inputs did not)
    config.write_text(
        DEMO_CONFIG.format(
            size="medium",
            seed=seed,
            config_name=config.name,
            sample_fraction=truth.get("sample_fraction", 0.1),
            census_level="unit",
            timezone=truth.get("timezone", "UTC"),
        )
    )
    if not (out / "dataset.nc").exists():
        run_pipeline(load_config(config), stages=["prepare"])
    return load_config(config)


def truth_matrices(out: Path, units: np.ndarray) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """``(truth, true expected flows, realised flows)`` over ``units`` x ``units``."""
    truth = json.loads((out / "world" / "truth.json").read_text())
    flows = pd.read_csv(out / "world" / truth["true_flows"])

    def matrix(column: str) -> np.ndarray:
        wide = flows.pivot(index="origin", columns="destination", values=column)
        m = wide.reindex(index=units, columns=units).to_numpy(dtype=float, copy=True)
        np.fill_diagonal(m, np.nan)
        return m

    return truth, matrix("mu"), matrix("flow")


def detection_rate(out: Path, ds: Any) -> float:
    """Relocations counted per true relocation of the panel (released outflow totals / truth).

    The true relocations are those of ``true_cdr_homes.csv`` (home in t-1 != home in
    t), per origin unit and period; the counted ones are the operator's released
    outflow totals (``cdr_outflow``, summed before redaction), over the unit-periods
    where a total is released.
    """
    homes = pd.read_csv(out / "world" / "true_cdr_homes.csv").pivot(
        index="subscriber_id", columns="period", values="unit_id"
    )
    periods = list(homes.columns)
    parts = []
    for a, b in itertools.pairwise(periods):
        moved = homes[a] != homes[b]
        n = homes.loc[moved].groupby(a).size()
        parts.append(pd.Series(n.to_numpy(), index=pd.MultiIndex.from_product([n.index, [b]])))
    true = pd.concat(parts)
    counted = ds["cdr_outflow"].to_series().dropna()
    both = true.reindex(counted.index).dropna()
    return float(counted.reindex(both.index).sum() / both.sum())


def groups(ds: Any, truth: dict[str, Any]) -> dict[str, np.ndarray]:
    """Pair masks: within each CDR-only country, all CDR-only, cross-border."""
    country = ds["country"].values.astype(str)
    off = ~np.eye(len(country), dtype=bool)
    same = (country[:, None] == country[None, :]) & off
    cdr_only = sorted(set(truth["cdr_countries"]) - set(truth["census_countries"]))
    out = {c: same & (country == c)[:, None] for c in cdr_only}
    out["CDR only"] = same & np.isin(country, cdr_only)[:, None]
    return out


def score(
    ds: Any,
    truth: dict[str, Any],
    mu: np.ndarray,
    flow: np.ndarray,
    pred: Any,
) -> dict[str, float]:
    """CPC, 90% coverage and within-country total ratios of a prediction."""
    from flowmodel.evaluate import cpc, interval_coverage

    mean, lo, hi = (np.asarray(pred[v].values, dtype=float) for v in ("mean", "q05", "q95"))
    out: dict[str, float] = {}
    for label, sel in groups(ds, truth).items():
        out[f"cpc[{label}]"] = cpc(mu[sel], mean[sel])
        out[f"coverage[{label}]"] = interval_coverage(flow[sel], lo[sel], hi[sel])
        out[f"total_ratio[{label}]"] = float(mean[sel].sum() / mu[sel].sum())
    return out


def sampling(model: Any) -> dict[str, float]:
    """Largest R-hat, smallest bulk ESS (summary parameters), divergences."""
    import arviz as az

    post = model.posterior
    names = [v for v in model._summary_vars() if v in post]
    names += [v for v in ("market_share_slope", "market_share_country") if v in post]
    if model.fit_meta.get("approximate"):
        # independent draws of an approximation: R-hat and ESS say nothing
        return {"rhat_max": float("nan"), "ess_min": float("nan"), "divergences": -1}
    rhat, ess = az.rhat(post[names]), az.ess(post[names])
    out = {
        "rhat_max": max(float(np.nanmax(rhat[v].values)) for v in names),
        "ess_min": min(float(np.nanmin(ess[v].values)) for v in names),
    }
    worst = min(names, key=lambda v: float(np.nanmin(ess[v].values)))
    out["ess_min_param"] = worst
    ss = model.idata["sample_stats"] if "sample_stats" in model.idata.children else None
    out["divergences"] = int(ss["diverging"].values.sum()) if ss is not None else -1
    out["diagnostic_warnings"] = len(model.fit_meta.get("diagnostics", []))
    return out


def shares(model: Any, truth: dict[str, Any], detection: float) -> dict[str, float]:
    """Per-unit market shares against the truth x detection rate: 90% coverage (and the
    intervals' mean width), correlation, mean absolute error."""
    summary = model.market_share_summary(ci_prob=0.90)
    true = pd.Series(truth["market_share"]).reindex(summary.index) * detection
    inside = (true >= summary["eti_lo"]) & (true <= summary["eti_hi"])
    return {
        "share_inside90": float(inside.mean()),
        "share_corr": float(np.corrcoef(summary["mean"], true)[0, 1]),
        "share_mae": float(np.abs(summary["mean"] - true).mean()),
        "share_width90": float((summary["eti_hi"] - summary["eti_lo"]).mean()),
        "n_units": len(true),
        "detection_rate": detection,
    }


def fit_kwargs(cfg: Any, overrides: dict[str, int]) -> dict[str, Any]:
    """The demo config's sampler settings, with ``--draws/--tune/--chains`` overrides."""
    return {
        "draws": cfg.model.draws,
        "tune": cfg.model.tune,
        "chains": cfg.model.chains,
        **cfg.model.sample_kwargs,
        **overrides,
    }


def run_one(
    work: Path,
    seed: int,
    overrides: dict[str, int],
    *,
    sources: list[str] | None = None,
    internal: bool = False,
    options: dict[str, Any] | None = None,
    backend: str | None = None,
    sample: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fit one prepared world (the demo's model, or its ``sources``); return every number.

    ``options`` update the demo config's ``[model.options]`` of the fused model;
    ``backend`` and ``sample`` (keywords of ``fit``) replace the demo's backend and
    add to its sampler settings.
    ``internal``: a :class:`~flowmodel.models.gravity.GravityModel` of the internal
    movers' census table alone (no immigrants, no CDR), as the weakest baseline.
    """
    from flowmodel.config import load_config
    from flowmodel.dataset import load_dataset
    from flowmodel.models.gravity import GravityModel
    from flowmodel.pipeline import build_model

    cfg = load_config(work / "demo.toml")
    ds = load_dataset(work / "dataset.nc").load()
    units = ds["unit"].values.astype(str)
    truth, mu, flow = truth_matrices(work, units)
    kwargs = fit_kwargs(cfg, overrides) | dict(sample or {})
    if internal:
        latent = dict(cfg.model.options["latent"])
        latent.pop("type", None)
        model = GravityModel(**latent, source="census")
    else:
        if sources is not None:
            cfg.model.options["sources"] = sources
        else:
            cfg.model.options.update(options or {})
        model = build_model(cfg)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend=backend or cfg.model.backend, random_seed=seed, **kwargs)
    row: dict[str, Any] = {"fit_s": time.perf_counter() - t0}
    pred = model.predict(ds, seed=seed)
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["backend"] = model.fit_meta["backend"]
    row.update(sampling(model))
    row.update(score(ds, truth, mu, flow, pred))
    if "cdr" in model.fit_meta.get("sources", []):
        row["n_totals"] = model.fit_meta["observations"]["cdr"].get("n_totals", {})
        row["market_share"] = model.fit_meta["observations"]["cdr"].get("market_share", {})
        row.update(shares(model, truth, detection_rate(work, ds)))
        post = model.idata["posterior"]
        row["median"] = {
            name: float(post[name].median())
            for name in ("sigma_market_share", "period_scale", "market_share_level")
            if name in post and post[name].ndim == 2
        }
        model.save(work / "fusion_posterior.nc")
    return row


def _child(args: list[str]) -> dict[str, Any]:
    """Run this script with ``args`` in a fresh process; return its ROW (or the error)."""
    cmd = [sys.executable, __file__, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=os.environ)
    found = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
    if not found:
        return {"error": (proc.stdout + proc.stderr)[-3000:]}
    return json.loads(found[-1][4:])


def run_world(
    base: Path,
    seed: int,
    activity: str,
    overrides: dict[str, int],
    baselines: bool,
    options: Sequence[str] = (),
    fused_flags: Sequence[str] = (),
) -> dict[str, Any]:
    """Prepare one world and fit it (each step in its own process); the sweep's row.

    ``fused_flags`` (``--backend=...``, ``--sample=...``) go to the fused fit only.
    """
    work = base / f"seed{seed}-activity{activity}"
    act = None if activity == "default" else float(activity)
    flags = [f"--{k}={v}" for k, v in overrides.items()]
    prep = _child(["--prepare", str(work), str(seed), activity])
    if "error" in prep:
        return {"seed": seed, "activity": activity, "error": prep["error"]}
    row: dict[str, Any] = {"seed": seed, "activity": activity if act is None else act}
    fused = _child(
        [
            "--fit",
            str(work),
            str(seed),
            "fused",
            *flags,
            *(f"--option={o}" for o in options),
            *fused_flags,
        ]
    )
    if "error" in fused:
        return row | {"error": fused["error"]}
    row.update({k if "[" not in k else f"fused.{k}": v for k, v in fused.items()})
    if baselines:
        # the census is the same for every CDR activity of a seed: fit it once
        for name in ("census", "internal"):
            cache = base / f"seed{seed}-{name}.json"
            if cache.exists():
                res = json.loads(cache.read_text())
            else:
                res = _child(["--fit", str(work), str(seed), name, *flags])
                if "error" not in res:
                    cache.write_text(json.dumps(res, default=str))
            row.update({f"{name}.{k}": v for k, v in res.items() if "[" in k or k == "error"})
        row["cpc_gain[CDR only]"] = row["fused.cpc[CDR only]"] - row["census.cpc[CDR only]"]
        row["cpc_gain_internal[CDR only]"] = (
            row["fused.cpc[CDR only]"] - row["internal.cpc[CDR only]"]
        )
    return row


def _ratios(r: dict[str, Any]) -> list[float]:
    return [r[k] for k in sorted(r) if k.startswith("fused.total_ratio[") and "CDR only" not in k]


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of the sweep, and how many worlds meet each target."""
    nan = float("nan")
    lines = [
        "| seed | CDR activity | CPC fused | census-only (gain) | internal census only (gain) "
        "| 90% coverage | total ratio per country | shares in 90% / corr | "
        "max R-hat / min ESS | fit s / peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seed']} | {r['activity']} | failed: {r['error'][-150:]!r} |")
            continue
        ratios = ", ".join(f"{v:.2f}" for v in _ratios(r))
        lines.append(
            f"| {r['seed']} | {r['activity']} | {r['fused.cpc[CDR only]']:.3f} | "
            f"{r.get('census.cpc[CDR only]', nan):.3f} ({r.get('cpc_gain[CDR only]', nan):+.3f}) "
            f"| {r.get('internal.cpc[CDR only]', nan):.3f} "
            f"({r.get('cpc_gain_internal[CDR only]', nan):+.3f}) | "
            f"{r['fused.coverage[CDR only]']:.3f} | {ratios} | "
            f"{r['share_inside90']:.2f} / {r['share_corr']:.2f} | "
            f"{r['rhat_max']:.3f} / {r['ess_min']:.0f} | "
            f"{r['fit_s']:.0f} / {r['peak_rss_mb']:.0f} |"
        )
    ok = [r for r in rows if "error" not in r]
    tallies = {
        "CPC gain over census-only >= 0.02": sum(
            r.get("cpc_gain[CDR only]", -1) >= 0.02 for r in ok
        ),
        "CPC gain over internal census >= 0.02": sum(
            r.get("cpc_gain_internal[CDR only]", -1) >= 0.02 for r in ok
        ),
        "coverage 0.85-0.95": sum(0.85 <= r["fused.coverage[CDR only]"] <= 0.95 for r in ok),
        "totals 0.8-1.25": sum(all(0.8 <= v <= 1.25 for v in _ratios(r)) for r in ok),
        "shares >= 85% inside": sum(r["share_inside90"] >= 0.85 for r in ok),
        "share corr >= 0.5": sum(r["share_corr"] >= 0.5 for r in ok),
        "R-hat <= 1.01 and ESS >= 400": sum(
            r["rhat_max"] <= 1.01 and r["ess_min"] >= 400 for r in ok
        ),
    }
    summary = "; ".join(f"{k}: {v}/{len(rows)}" for k, v in tallies.items())
    return "\n".join(lines) + f"\n\nworlds meeting each target: {summary}\n"


def _parse_options(items: list[str]) -> dict[str, Any]:
    """``["key=<json>", ...]`` -> ``{key: value}`` (a value that is not JSON is a string)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option/--sample {item!r}: give KEY=VALUE")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument(
        "--activity",
        nargs="+",
        default=["default", "4"],
        help="CDR activities: 'default' (about 10 nights a month) and/or numbers",
    )
    parser.add_argument("--work", type=Path, help="keep the worlds here (default: temporary)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--json", type=Path, help="also write every number here")
    parser.add_argument("--draws", type=int)
    parser.add_argument("--tune", type=int)
    parser.add_argument("--chains", type=int)
    parser.add_argument("--no-baselines", action="store_true", help="skip the census-only fits")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a [model.options] setting of the fused model, e.g. spurious_relocations=true "
        "or market_share_origin_terms='\"latent\"' (repeatable)",
    )
    parser.add_argument(
        "--backend", help="the fused model's backend (default: the demo's), e.g. laplace"
    )
    parser.add_argument(
        "--sample",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="a keyword of the fused model's fit, e.g. "
        'integrate=\'["sigma_market_share", "period_scale"]\' (repeatable)',
    )
    parser.add_argument("--prepare", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--fit", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = {k: v for k in ("draws", "tune", "chains") if (v := getattr(args, k)) is not None}
    if args.prepare:
        work, seed, activity = args.prepare
        act = None if activity == "default" else float(activity)
        prepare_world(Path(work), seed=int(seed), cdr_activity=act)
        print("ROW {}")
        return 0
    if args.fit:
        work, seed, kind = args.fit
        row = run_one(
            Path(work),
            int(seed),
            overrides,
            sources=CENSUS_ONLY if kind == "census" else None,
            internal=kind == "internal",
            options=_parse_options(args.option),
            backend=args.backend if kind == "fused" else None,
            sample=_parse_options(args.sample) if kind == "fused" else None,
        )
        print("ROW " + json.dumps(row, default=str))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = args.work or Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        for seed in parse_seeds(args.seeds):
            for activity in args.activity:
                print(f"seed {seed}, CDR activity {activity} ...", file=sys.stderr, flush=True)
                fused_flags = [f"--sample={o}" for o in args.sample]
                if args.backend:
                    fused_flags.append(f"--backend={args.backend}")
                rows.append(
                    run_world(
                        base,
                        seed,
                        activity,
                        overrides,
                        not args.no_baselines,
                        args.option,
                        fused_flags,
                    )
                )
                print(table(rows[-1:]).splitlines()[2], file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
