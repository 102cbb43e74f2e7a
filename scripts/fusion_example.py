"""Worked example of docs/fusion.md: census + redacted CDR fused on the default simulated world.

Run from the repository root::

    .venv/bin/python scripts/fusion_example.py            # ~2 min on 2 cores
    .venv/bin/python scripts/fusion_example.py --out /tmp/fusion --backend laplace
    .venv/bin/python scripts/fusion_example.py --marginals  # + country-pair totals
    .venv/bin/python scripts/fusion_example.py --docs-img   # refresh docs/img/fusion_*.png

``--marginals`` adds what a bilateral migration estimate would give: the true flow
summed over each country pair, with 10% log-normal error, as ``marginal_bilateral``
(:func:`flowmodel.dataset.marginals_to_dataset`); it prints the table and
writes no figures.

Steps: simulate the default world (6 countries, 120 units: census in 2, CDR in 3
with one overlapping, nothing in 1) with :func:`flowmodel.simulate.simulate_world`,
prepare the FlowDataset from its files (units, rasters, census OD, raw CDR
events) with the pipeline's ``prepare`` stage, fit a :class:`FusionModel`,
predict every pair, compare with the truth, and write the figures
``OUT/figures/fusion_*.png`` (with ``--docs-img``: ``docs/img/``, the figures of
docs/fusion.md). The numbers quoted in docs/fusion.md are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from flowmodel.dataset import load_dataset, marginals_to_dataset
from flowmodel.evaluate import cpc, interval_coverage, interval_width, log_rmse
from flowmodel.models.fusion import FusionModel
from flowmodel.models.gravity import GravityModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fusion_cdr_sweep import detection_rate

REPO = Path(__file__).resolve().parents[1]
DOCS_IMG = REPO / "docs" / "img"


def prepare(out: Path, seed: int) -> tuple[Path, dict]:
    """Simulate the default world and run the pipeline's prepare stage; return dataset path and truth."""
    from flowmodel.pipeline import demo_config, run_pipeline

    # "medium" is the default world: 120 units, 6 countries
    cfg = demo_config(out, size="medium", seed=seed)
    run_pipeline(cfg, stages=["prepare"])
    truth = json.loads((out / "world" / "truth.json").read_text())
    return out / "dataset.nc", truth


def matrix(table: pd.DataFrame, column: str, units: np.ndarray) -> np.ndarray:
    wide = table.pivot(index="origin", columns="destination", values=column)
    out = wide.reindex(index=units, columns=units).to_numpy(dtype=float, copy=True)
    np.fill_diagonal(out, np.nan)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="fusion-example", help="work folder (world, dataset)")
    parser.add_argument("--backend", default="nutpie", help="fit backend (nutpie, laplace, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reuse", action="store_true", help="load OUT/fusion_posterior.nc instead of refitting"
    )
    parser.add_argument(
        "--docs-img",
        action="store_true",
        help="write the figures to docs/img/ (the docs' figures) instead of OUT/figures/",
    )
    parser.add_argument(
        "--marginals",
        action="store_true",
        help="add country-pair totals of the true flows (10%% error); no figures written",
    )
    args = parser.parse_args()
    out = Path(args.out)
    img = DOCS_IMG if args.docs_img else out / "figures"
    img.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    path, truth = prepare(out, args.seed)
    ds = load_dataset(path)
    print(
        f"prepared {path} in {time.perf_counter() - t0:.0f} s: {ds.sizes['unit']} units, "
        f"sources {[v for v in ds.data_vars if v.startswith('flow_')]}"
    )

    if args.marginals:
        true = pd.read_csv(out / "world" / truth["true_flows"])
        country = pd.Series(ds["country"].values.astype(str), index=ds["unit"].values.astype(str))
        true["origin_country"] = country.reindex(true["origin"].astype(str)).values
        true["destination_country"] = country.reindex(true["destination"].astype(str)).values
        table = true.groupby(["origin_country", "destination_country"], as_index=False)["mu"].sum()
        noise = np.random.default_rng(args.seed + 7).normal(0.0, 0.1, len(table))
        table["value"] = table.pop("mu") * np.exp(noise)
        ds = marginals_to_dataset(ds, table, name="bilateral", rel_sd=0.1)
        print(f"marginals: {len(table)} country pairs (10% error)")

    model = FusionModel(
        latent=GravityModel(
            origin_covariates=["log_population"],
            destination_covariates=["log_population", "night_lights_per_capita"],
        ),  # centred country levels (the default): every fitted country has many pairs
        sources=["census", "census_abroad", "cdr"],
        # the simulated CDR is a panel of ~20,000 subscribers: subscribers per resident
        # (~0.0004) says which units the panel covers better (the shape of the shares, through
        # a slope on its standardised logit), not the operator's market share, so the level of
        # the shares keeps the default centre 0.3
        market_share_covariate="cdr_subscribers_per_resident",
        # CDR: relocations per month; census: moves over 5 years -> about 1/60 per period,
        # less for relocations the home detection misses (broad: sd 1.5 on the log scale)
        priors={"period_scale": {"dist": "LogNormal", "mu": float(np.log(1 / 60)), "sigma": 1.5}},
    )
    posterior = out / (
        "fusion_posterior_marginals.nc" if args.marginals else "fusion_posterior.nc"
    )
    if args.reuse and posterior.exists():
        model = FusionModel.load(posterior)
        print(f"loaded {posterior}")
    else:
        t0 = time.perf_counter()
        kwargs = (
            {"draws": 500, "tune": 500, "chains": 2}
            if args.backend != "laplace"
            else {"draws": 1000}
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(ds, backend=args.backend, random_seed=args.seed, **kwargs)
        print(
            f"fit ({args.backend}) in {time.perf_counter() - t0:.0f} s; "
            f"cells {model.fit_meta['n_cells']}, censored {model.fit_meta['n_censored']}"
        )
        model.save(posterior)
    t0 = time.perf_counter()
    pred = model.predict(ds, seed=args.seed)
    print(
        f"predicted {ds.sizes['unit'] ** 2 - ds.sizes['unit']} pairs in {time.perf_counter() - t0:.1f} s"
    )

    # ------------------------------------------------------------ truth and groups
    units = ds["unit"].values.astype(str)
    flows = pd.read_csv(out / "world" / truth["true_flows"])
    mu = matrix(flows, "mu", units)
    realised = matrix(flows, "flow", units)
    country = ds["country"].values.astype(str)
    census_c, cdr_c = set(truth["census_countries"]), set(truth["cdr_countries"])
    none_c = sorted(set(truth["countries"]) - census_c - cdr_c)
    off = ~np.eye(len(units), dtype=bool)
    same = (country[:, None] == country[None, :]) & off

    def within(codes):
        return same & np.isin(country, list(codes))[:, None]

    groups = {
        "census only": within(census_c - cdr_c),
        "census + CDR": within(census_c & cdr_c),
        "CDR only": within(cdr_c - census_c),
        "no data": within(none_c),
        "cross-border": ds["cross_border"].values & off,
    }
    rows = []
    for label, sel in groups.items():
        rows.append(
            {
                "pairs": label,
                "n": int(sel.sum()),
                "CPC": cpc(mu[sel], pred["mean"].values[sel]),
                "log-RMSE": log_rmse(mu[sel], pred["mean"].values[sel]),
                "90% coverage": interval_coverage(
                    realised[sel], pred["q05"].values[sel], pred["q95"].values[sel]
                ),
                "mean 90% width": interval_width(pred["q05"].values[sel], pred["q95"].values[sel]),
            }
        )
    table = pd.DataFrame(rows).set_index("pairs")
    print(table.round(3).to_string())

    summary = model.summary(ci_prob=0.94)
    post = model.posterior
    true_params = {"intercept_raw": truth["intercept"], "sigma_country": truth["sigma_country"]}
    for term in post["term"].values:
        true_params[f"beta_raw[{term}]"] = truth["beta"][term]
    for source in ("census", "cdr"):  # pair-level dispersion (census_abroad: country sums)
        true_params[f"phi[{source}]"] = truth["phi"]
    recovery = summary.loc[list(true_params), ["mean", "sd", "eti_lo", "eti_hi"]].assign(
        truth=pd.Series(true_params)
    )
    print(recovery.round(3))

    # the model's share is relocations counted per true relocation: the operator's market share
    # times the detection rate of home detection (released outflow totals against true homes)
    detection = detection_rate(out, ds)
    shares = model.market_share_summary(ci_prob=0.90)
    share_true = pd.Series(truth["market_share"]).reindex(shares.index) * detection
    inside = ((share_true >= shares["eti_lo"]) & (share_true <= shares["eti_hi"])).mean()
    print(
        f"market share x detection rate ({detection:.3f}): {len(shares)} units, {inside:.0%} of "
        f"true values inside the 90% intervals, correlation "
        f"{np.corrcoef(shares['mean'], share_true)[0, 1]:.2f}, "
        f"MAE {np.abs(shares['mean'] - share_true).mean():.3f}"
    )

    if args.marginals:
        return
    # ------------------------------------------------------------ figures
    colours = {
        "census only": "C0",
        "census + CDR": "C2",
        "CDR only": "C1",
        "no data": "C3",
        "cross-border": "0.6",
    }
    fig, ax = plt.subplots(figsize=(6.5, 6))
    for label, sel in groups.items():
        ax.scatter(
            mu[sel], pred["mean"].values[sel], s=6, alpha=0.6, color=colours[label], label=label
        )
    lim = [max(np.nanmin(mu[off]), 1e-2), np.nanmax(mu[off]) * 1.5]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="true expected flow (persons, 5 years)",
        ylabel="fused posterior mean",
        title="Fused flows against the truth, by data available",
    )
    ax.legend(markerscale=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "fusion_predicted_vs_true.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = np.arange(len(table))
    ax.bar(x, table["90% coverage"], color=[colours[k] for k in table.index])
    ax.axhline(0.9, color="k", ls="--", lw=0.8)
    for k, (cov, width) in enumerate(
        zip(table["90% coverage"], table["mean 90% width"], strict=True)
    ):
        ax.text(k, cov + 0.01, f"{cov:.2f}\nwidth {width:.0f}", ha="center", fontsize=8)
    ax.set(
        xticks=x,
        xticklabels=table.index,
        ylim=(0.5, 1.08),
        ylabel="share of true flows inside",
        title="90% predictive intervals: coverage and mean width (persons)",
    )
    fig.tight_layout()
    fig.savefig(img / "fusion_coverage.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    order = shares.assign(truth=share_true).sort_values("truth")
    k = np.arange(len(order))
    ax.errorbar(
        k,
        order["mean"],
        yerr=[order["mean"] - order["eti_lo"], order["eti_hi"] - order["mean"]],
        fmt="o",
        ms=3,
        lw=0.8,
        label="posterior mean, 90% interval",
    )
    ax.scatter(
        k, order["truth"], marker="x", color="k", s=18, label="true share x detection", zorder=3
    )
    ax.axhline(
        model.model_config["market_share_default"],
        color="C1",
        lw=0.8,
        label="prior centre of the level (the covariate gives the shape)",
    )
    ax.set(
        xlabel="CDR origin unit (sorted by true share)",
        ylabel="market share",
        title="Per-unit market share of the operator",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(img / "fusion_market_share.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = list(recovery.index)
    z = (recovery["mean"] - recovery["truth"]) / recovery["sd"]
    ax.barh(labels, z, color=["C2" if abs(v) < 2 else "C1" for v in z])
    ax.axvline(0, color="k", lw=0.8)
    for v in (-3, 3):
        ax.axvline(v, color="C3", ls="--", lw=0.8)
    ax.set(
        xlabel="(posterior mean - truth) / posterior sd",
        title="Parameter recovery (default world)",
    )
    fig.tight_layout()
    fig.savefig(img / "fusion_recovery.png", dpi=120)
    plt.close(fig)
    print(f"figures in {img}:", ", ".join(sorted(p.name for p in img.glob("fusion_*.png"))))


if __name__ == "__main__":
    main()
