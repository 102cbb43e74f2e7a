"""Worked example of docs/nowcast.md: nowcast Brazil's 2005-2010 inter-state flows from 1991 and 2000.

Run from the repository root::

    .venv/bin/python scripts/nowcast_brazil.py                 # ~2 min on 2 cores (Laplace)
    .venv/bin/python scripts/nowcast_brazil.py --backend nutpie --out /tmp/nowcast
    .venv/bin/python scripts/nowcast_brazil.py --docs-img      # refresh docs/img/nowcast_*.png
    .venv/bin/python scripts/nowcast_brazil.py --validation-table  # rewrite the docs table

Data: ``$FLOWMODEL_DATA/brazil_interstate_migration_1991_2010`` (default
``../shared/data``; see its README): 27 federative units, five-year fixed-date
migrants of the 1991, 2000 and 2010 censuses (windows ``1986-1991``,
``1995-2000``, ``2005-2010``), WorldPop admin-1 population in 2000 and 2020
(interpolated log-linearly to each window's midpoint, extrapolated back to
1988.5 at the 2000-2020 growth rate) and population-weighted centroids (2000).

Steps: build the FlowDataset (:func:`brazil_dataset`), run ``cv="last_period"``
(:func:`flowmodel.evaluate.last_period_cv`: fit a gravity field with periods on
1991 and 2000, predict 2005-2010, score it beside persistence and a gravity GLM),
predict 2015-2020 and 2025-2030 from all three rounds to show the intervals
widen, and write the figures ``OUT/figures/nowcast_*.png`` (with ``--docs-img``
also ``docs/img/``). The numbers quoted in docs/nowcast.md and docs/validation.md
are printed (``--validation-table`` writes the table into docs/validation.md).
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DOCS_IMG = REPO / "docs" / "img"
FOLDER = "brazil_interstate_migration_1991_2010"
#: Census year -> the five-year window its fixed-date question observes.
WINDOWS = {1991: "1986-1991", 2000: "1995-2000", 2010: "2005-2010"}
#: The model of the example (docs/nowcast.md).
MODEL_OPTIONS: dict = {
    "origin_covariates": ["log_population"],
    "destination_covariates": ["log_population"],
    "cross_border": False,
    "temporal": {"trend": "rw", "pair_effect": True, "unit_trends": True},
}
VALIDATION_BEGIN = "<!-- nowcast-brazil-table:begin -->"
VALIDATION_END = "<!-- nowcast-brazil-table:end -->"


def data_dir() -> Path:
    """The Brazil folder under ``$FLOWMODEL_DATA`` (default ``../shared/data``)."""
    root = Path(os.environ.get("FLOWMODEL_DATA", REPO.parent / "shared" / "data"))
    return root / FOLDER


def brazil_dataset(folder: Path | None = None, *, rounds: tuple[int, ...] = (1991, 2000, 2010)):
    """FlowDataset of the Brazil rounds: ``flow_census`` over (origin, destination, period).

    Units are the 27 federative units (ids: HASC codes, ``name`` the Portuguese
    name), centroids the WorldPop population-weighted ones of 2000, ``population``
    the 2020 WorldPop count and ``population_by_date`` the 2000 and 2020 counts
    (:func:`flowmodel.periods.add_dated_covariates`). The counts are the
    published (weighted) five-year migrants: no exposure.
    """
    from flowmodel.dataset import build_dataset
    from flowmodel.periods import add_dated_covariates

    folder = data_dir() if folder is None else Path(folder)
    flows = pd.read_csv(folder / "brazil_census_tidy.csv", encoding="utf-8-sig")
    pops = {}
    for year in (2000, 2020):
        table = pd.read_csv(folder / f"worldpop_pwd_admin1_{year}.csv")
        pops[year] = table.loc[table["ISO"] == "BRA"].set_index("Adm_N")
    base = pops[2000]
    code = base["HASC"].to_dict()
    units = pd.DataFrame(
        {
            "unit_id": base["HASC"].to_numpy(),
            "name": base.index.to_numpy(),
            "country": "BRA",
            "population": pops[2020].loc[base.index, "Pop"].to_numpy(dtype=float),
            "lon": base["PWC_Lon"].to_numpy(dtype=float),
            "lat": base["PWC_Lat"].to_numpy(dtype=float),
        }
    )
    table = flows.loc[flows["year"].isin(rounds)]
    table = pd.DataFrame(
        {
            "origin": table["orig"].map(code).to_numpy(),
            "destination": table["dest"].map(code).to_numpy(),
            "period": table["year"].map(WINDOWS).to_numpy(),
            "count": table["flow"].to_numpy(dtype=float),
        }
    )
    ds = build_dataset(units, flows={"census": table})
    dated = pd.concat(
        [
            pd.DataFrame(
                {
                    "unit_id": pops[y].loc[base.index, "HASC"].to_numpy(),
                    "period": str(y),
                    "population": pops[y].loc[base.index, "Pop"].to_numpy(dtype=float),
                }
            )
            for y in (2000, 2020)
        ]
    )
    ds = add_dated_covariates(ds, dated)
    ds.attrs.update(source="IBGE censuses 1991, 2000, 2010 (G. J. Abel, migration-in-r); WorldPop")
    return ds


def brazil_model(**temporal):
    """The gravity field with periods of the example (``temporal`` overrides its options)."""
    from flowmodel.models.gravity import GravityModel

    options = dict(MODEL_OPTIONS)
    options["temporal"] = {**MODEL_OPTIONS["temporal"], **temporal}
    return GravityModel(**options)


def validation(ds, *, backend: str = "nutpie", seed: int = 1, **temporal) -> pd.DataFrame:
    """``cv="last_period"`` on Brazil: hold out 2005-2010, fit 1991 and 2000, predict 2010.

    NUTS runs 2 chains of 500 draws after 500 tuning steps (the CV refit's
    ``sampler_config``); Laplace draws 1000.
    """
    from flowmodel.evaluate import last_period_cv

    model = brazil_model(**temporal)
    model.sampler_config.update(draws=500, tune=500, chains=2)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = last_period_cv(model, ds, source="census", backend=backend, seed=seed)
    table.attrs["seconds"] = time.perf_counter() - t0
    return table


def markdown_table(table: pd.DataFrame, backend: str) -> str:
    """The validation table as Markdown (docs/validation.md, docs/nowcast.md)."""
    names = {
        "GravityModel": f"nowcast (gravity with periods, {backend}): predictive mean",
        "GravityModel (median)": "nowcast: predictive median",
        "persistence": "persistence (1995-2000 as it is)",
        "persistence_rescaled": "persistence rescaled to the nowcast's total",
        "gravity_baseline": "gravity GLM on 1995-2000, moved to 2005-2010 populations",
    }
    lines = [
        "| method | CPC | log-RMSE | 90% coverage | mean 90% width | predicted total |",
        "|---|---|---|---|---|---|",
    ]
    for _, row in table.iterrows():
        cov = (
            "" if not np.isfinite(row.get("coverage_90", np.nan)) else f"{row['coverage_90']:.3f}"
        )
        width = "" if not np.isfinite(row.get("width_90", np.nan)) else f"{row['width_90']:,.0f}"
        lines.append(
            f"| {names.get(row['model'], row['model'])} | {row['cpc']:.3f} | "
            f"{row['log_rmse']:.3f} | {cov} | {width} | {row['total_predicted']:,.0f} |"
        )
    observed = float(table["total_observed"].iloc[0])
    lines.append("")
    lines.append(
        f"702 pairs; observed 2005-2010 total {observed:,.0f}. Command: "
        f"`.venv/bin/python scripts/nowcast_brazil.py --backend {backend}`."
    )
    return "\n".join(lines)


def write_validation_table(text: str) -> None:
    """Replace the Brazil table between the markers of docs/validation.md."""
    path = REPO / "docs" / "validation.md"
    doc = path.read_text()
    if VALIDATION_BEGIN not in doc:
        raise SystemExit(f"{path} has no {VALIDATION_BEGIN} marker")
    head, rest = doc.split(VALIDATION_BEGIN, 1)
    _, tail = rest.split(VALIDATION_END, 1)
    path.write_text(f"{head}{VALIDATION_BEGIN}\n{text}\n{VALIDATION_END}{tail}")


def figures(ds, fitted, pred_2010, table, horizon, out: Path) -> list[Path]:
    """Observed vs nowcast with intervals; coverage by flow size; the methods side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flowmodel.evaluate import persistence_baseline

    out.mkdir(parents=True, exist_ok=True)
    obs = ds["flow_census"].sel(period="2005-2010").values
    prev = ds["flow_census"].sel(period="1995-2000").values
    mask = np.isfinite(obs)
    y, m = obs[mask], pred_2010["q50"].values[mask]
    lo, hi = pred_2010["q05"].values[mask], pred_2010["q95"].values[mask]
    paths = []

    fig, ax = plt.subplots(figsize=(6.2, 5.4))
    inside = (y >= lo) & (y <= hi)
    ax.vlines(y, lo + 1, hi + 1, color="0.75", lw=0.8, zorder=1, label="90% interval")
    ax.scatter(y[inside] + 1, m[inside] + 1, s=9, c="tab:blue", zorder=2, label="covered")
    ax.scatter(y[~inside] + 1, m[~inside] + 1, s=12, c="tab:red", zorder=3, label="missed")
    ax.scatter(y + 1, prev[mask] + 1, s=5, c="0.2", marker="x", lw=0.6, label="persistence")
    lim = [1, max(y.max(), m.max()) * 2]
    ax.plot(lim, lim, "k--", lw=0.8)
    ax.set(xscale="log", yscale="log", xlim=lim, ylim=lim)
    ax.set_xlabel("observed 2005-2010 migrants (+1)")
    ax.set_ylabel("nowcast from 1991 and 2000: median (+1)")
    ax.set_title("Brazil: 2010 round held out")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    paths.append(out / "nowcast_observed_vs_predicted.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    order = np.argsort(y)
    bins = np.array_split(order, 6)
    cov = [np.mean(inside[b]) for b in bins]
    labels = [f"{int(y[b].min()):,}-\n{int(y[b].max()):,}" for b in bins]
    ax.bar(range(len(bins)), cov, color="tab:blue")
    ax.axhline(0.9, color="k", ls="--", lw=0.8, label="nominal 90%")
    ax.axhline(np.mean(inside), color="tab:red", lw=1.0, label=f"overall {np.mean(inside):.2f}")
    ax.set_xticks(range(len(bins)), labels, fontsize=7)
    ax.set(ylim=(0, 1.05), ylabel="share of 2005-2010 flows inside the 90% interval")
    ax.set_xlabel("observed flow (sextiles of the 702 pairs)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    paths.append(out / "nowcast_coverage.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8), sharex=True, sharey=True)
    pers = persistence_baseline(ds, ("census", "1995-2000"), "census")["mean"].values[mask]
    panels = [("persistence", pers, "persistence")]
    if "glm" in fitted:
        panels.append(("gravity_baseline", fitted["glm"][mask], "gravity GLM moved to 2010"))
    panels.append(("GravityModel (median)", m, "nowcast (predictive median)"))
    for ax, (key, pred, title) in zip(axes, panels, strict=False):
        row = table.loc[table["model"] == key].iloc[0]
        ax.scatter(y + 1, pred + 1, s=5, c="tab:blue")
        ax.plot(lim, lim, "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlim=lim, ylim=lim)
        ax.set_title(f"{title}\nCPC {row['cpc']:.3f}, log-RMSE {row['log_rmse']:.3f}", fontsize=9)
        ax.set_xlabel("observed 2005-2010 (+1)")
    axes[0].set_ylabel("predicted (+1)")
    fig.tight_layout()
    paths.append(out / "nowcast_methods.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    labels = list(horizon)
    ratio = [horizon[k] for k in labels]
    ax.plot(range(len(labels)), ratio, "o-", color="tab:blue")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("median q95 / q05 over the 702 pairs")
    ax.set_xlabel("predicted period (fitted on 1986-1991, 1995-2000, 2005-2010)")
    ax.set_title("Intervals widen with the distance from the last round")
    fig.tight_layout()
    paths.append(out / "nowcast_horizon.png")
    fig.savefig(paths[-1], dpi=130)
    plt.close(fig)
    return paths


def _fit(model, data, backend: str, seed: int):
    model.sampler_config.update(draws=500, tune=500, chains=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(data, backend=backend, random_seed=seed, progressbar=False)
    return model


def main(argv: list[str] | None = None) -> None:
    """Run the example; print the numbers quoted in the docs."""
    from flowmodel.evaluate import _moved_glm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/nowcast_brazil"))
    parser.add_argument("--backend", default="nutpie")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--docs-img", action="store_true", help="also write docs/img/nowcast_*")
    parser.add_argument(
        "--validation-table", action="store_true", help="write the table into docs/validation.md"
    )
    parser.add_argument(
        "--sensitivity", action="store_true", help="also run covariates='fixed' and trend='ar1'"
    )
    args = parser.parse_args(argv)
    ds = brazil_dataset()
    print(f"units {ds.sizes['unit']}, periods {list(ds['period'].values)}")

    table = validation(ds, backend=args.backend, seed=args.seed)
    cols = ["model", "cpc", "log_rmse", "coverage_90", "width_90", "total_predicted"]
    print(f"cv='last_period' ({table.attrs['seconds']:.0f} s):")
    print(table[cols].to_string(index=False))
    text = markdown_table(table, args.backend)
    print(text)
    if args.validation_table:
        write_validation_table(text)
    if args.sensitivity:
        for name, opts in (
            ("covariates fixed", {"covariates": "fixed"}),
            ("ar1", {"trend": "ar1"}),
        ):
            alt = validation(ds, backend=args.backend, seed=args.seed, **opts)
            print(f"sensitivity, {name}:")
            print(alt[cols].head(2).to_string(index=False))

    # the nowcast of 2005-2010 itself (the CV's model, refitted), for the figures
    train = ds.copy()
    train["flow_census"] = ds["flow_census"].where(ds["period"] != "2005-2010")
    model = _fit(brazil_model(), train, args.backend, args.seed)
    pred = model.predict(train, period="2005-2010", seed=args.seed)
    glm = _moved_glm(
        ds, ("census", "1995-2000"), "2005-2010", "census", (0.05, 0.95), {"pair_covariates": ()}
    )
    print("posterior (fit on 1991 and 2000):")
    print(model.summary()[["mean", "sd", "r_hat"]].round(3).to_string())

    # intervals widen with the horizon: fit on every round, predict forward
    full = _fit(brazil_model(), ds, args.backend, args.seed)
    horizon = {}
    for period in ("2005-2010", "2010-2015", "2015-2020", "2025-2030"):
        p = full.predict(ds, period=period, seed=args.seed)
        horizon[period] = float(np.nanmedian(p["q95"].values / np.maximum(p["q05"].values, 1)))
        print(
            f"{period}: predicted total {float(p['mean'].sum()):,.0f} (median pairs summed "
            f"{float(p['q50'].sum()):,.0f})"
        )
    print("median q95/q05 by period:", {k: round(v, 3) for k, v in horizon.items()})

    paths = figures(ds, {"glm": glm["mean"].values}, pred, table, horizon, args.out / "figures")
    if args.docs_img:
        import shutil

        DOCS_IMG.mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy(path, DOCS_IMG / path.name)
    print("figures:", ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
