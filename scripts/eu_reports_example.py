"""Two reports of the same flows: EU migration reported by sending and by receiving countries.

The real MigMod data (``$FLOWMODEL_DATA/eu_reported_flows_migmod/mig_data.csv``): each
corridor's flow in a year (2010-2019, 27 EU countries) is reported by the sending
country (emigration statistics, ``Emig``) and by the receiving country (immigration
statistics, ``Immi``), each with an undercount class of its country and year.

The model: one latent gravity field with periods (one per year) — a **corridor
effect** shared by every year (how far a corridor sits above or below the gravity
surface) and origin and destination walks over the years — observed by both reports
through their own observation model: a negative binomial around the true flow times
an undercount factor per class with the priors MigMod uses (Beta, from the IMEM
expert elicitation; "low" and "medium" share the low prior). Sweden's immigration
statistics are the reference (factor fixed at 1), as MigMod recommends, so that the
level of the flows is identified. Every country is one unit here, so the country
trend is left out (the origin walks are it).

Validation: a fifth of the corridors reported by both countries in the target year
have their *receiving* report held out; the model predicts each held-out report (on
the receiving country's own scale, its undercount included) from everything else.
Baselines: the sending report of the same corridor and year, as it is and rescaled by
the median Immi/Emig ratio of the training corridors; the receiving report of the same
corridor the year before (persistence); and the same two-report fusion fitted to the
target year alone (gravity surface without corridor effects).

Run: ``python scripts/eu_reports_example.py --year 2015 --out eu-out`` (about three
minutes with nutpie on 2 cores). docs/reports.md quotes its output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flowmodel.dataset import build_dataset
from flowmodel.evaluate import compare_methods
from flowmodel.models import FusionModel, GravityModel

#: MigMod's undercount priors (R/data_2_standata.R): lambda ~ Beta(a, b), a report counts
#: lambda x the true flow. Low and medium undercount share the low prior.
IMMIGRATION_PRIORS = {
    "low": {"dist": "Beta", "alpha": 57.490667, "beta": 8.066021},  # mean 0.88
    "medium": {"dist": "Beta", "alpha": 57.490667, "beta": 8.066021},
    "high": {"dist": "Beta", "alpha": 44.56385, "beta": 20.89134},  # mean 0.68
    "reference": 1.0,  # Sweden: taken as unbiased (identifies the level)
}
EMIGRATION_PRIORS = {
    "low": {"dist": "Beta", "alpha": 44.94987, "beta": 16.95790},  # mean 0.73
    "medium": {"dist": "Beta", "alpha": 44.94987, "beta": 16.95790},
    "high": {"dist": "Beta", "alpha": 32.13520, "beta": 38.52081},  # mean 0.45
}
REFERENCE = "SE"
#: The field with periods: a corridor effect shared by the years, origin and destination
#: walks; no country trend (each country is one unit, so it would duplicate the walks).
TEMPORAL = {"trend": "none", "unit_trends": True, "pair_effect": True}


def data_path() -> Path:
    """The MigMod flow table under ``$FLOWMODEL_DATA``."""
    root = Path(
        os.environ.get("FLOWMODEL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    return root / "eu_reported_flows_migmod" / "mig_data.csv"


def load(
    year: int,
    *,
    first_year: int | None = None,
    hold_out: float = 0.2,
    seed: int = 0,
) -> tuple[Any, pd.DataFrame]:
    """The FlowDataset of ``first_year``..``year`` and the held-out receiving reports of ``year``.

    Sources ``emig`` and ``immi`` (each with its ``class``), a ``period`` per year.
    ``first_year`` None: every year of the table up to ``year``.
    """
    raw = pd.read_csv(data_path())
    first = int(raw["Year"].min()) if first_year is None else first_year
    raw = raw.loc[raw["Year"].between(first, year)].reset_index(drop=True)
    units = (
        raw.groupby("Sending_iso2", as_index=False)["Pop.Sending"]
        .mean()
        .rename(columns={"Sending_iso2": "unit_id", "Pop.Sending": "population"})
    )
    units["country"] = units["unit_id"]  # every unit is a country here
    pairs = (
        raw[["Sending_iso2", "Receiving_iso2", "distw", "contig"]]
        .drop_duplicates(["Sending_iso2", "Receiving_iso2"])
        .rename(
            columns={
                "Sending_iso2": "origin",
                "Receiving_iso2": "destination",
                "distw": "distance_km",
                "contig": "contiguous",
            }
        )
    )
    both = raw["Emig"].notna() & raw["Immi"].notna()
    rng = np.random.default_rng(seed)
    held = both & (raw["Year"] == year) & (rng.random(len(raw)) < hold_out)
    immi_class = raw["UI"].where(raw["Receiving_iso2"] != REFERENCE, "reference")
    period = raw["Year"].astype(str)
    common = {
        "origin": raw["Sending_iso2"],
        "destination": raw["Receiving_iso2"],
        "period": period,
    }
    emig = pd.DataFrame({**common, "count": raw["Emig"], "class": raw["UE"]})
    immi = pd.DataFrame({**common, "count": raw["Immi"].where(~held), "class": immi_class})
    ds = build_dataset(
        units,
        pairs=pairs,
        flows={"emig": emig.dropna(subset=["count"]), "immi": immi.dropna(subset=["count"])},
    )
    ds["contiguous"] = ds["contiguous"].fillna(0).astype(bool)
    test = raw.loc[held, ["Sending_iso2", "Receiving_iso2", "Emig", "Immi"]].rename(
        columns={"Sending_iso2": "origin", "Receiving_iso2": "destination"}
    )
    test["class"] = immi_class[held].to_numpy()
    test["period"] = str(year)
    last_year = raw.loc[raw["Year"] == year - 1].set_index(["Sending_iso2", "Receiving_iso2"])
    test["Immi_last_year"] = (
        last_year["Immi"].reindex(pd.MultiIndex.from_frame(test[["origin", "destination"]])).values
    )
    train = both & ~held & (raw["Year"] == year) & (raw["Emig"] > 0)
    test.attrs["train_ratio"] = float(np.median((raw["Immi"] / raw["Emig"])[train]))
    return ds, test.reset_index(drop=True)


def model(*, temporal: dict[str, Any] | None = TEMPORAL) -> FusionModel:
    """The two-report fusion (``temporal`` None: one year, no corridor effects)."""
    return FusionModel(
        latent=GravityModel(
            origin_covariates=["log_population"],
            destination_covariates=["log_population"],
            cross_border=False,  # every pair crosses a border
            contiguity=True,
            temporal=temporal,
        ),
        sources=["emig", "immi"],
        reference_source="immi",
        source_options={
            "emig": {"undercount": EMIGRATION_PRIORS},
            "immi": {"undercount": IMMIGRATION_PRIORS},
        },
    )


def one_year(ds: Any, year: int) -> Any:
    """The target year alone, as a dataset without periods."""
    out = ds.sel(period=str(year)).drop_vars("period")
    for name in list(out.data_vars):
        out[name].attrs.pop("period", None)
    return out


def predict_held_out(fitted: FusionModel, ds: Any, test: pd.DataFrame) -> pd.DataFrame:
    """Median and 90% interval of each held-out receiving report, on its own scale."""
    full = ds.copy()
    units = list(full["unit"].values)
    at = {
        "origin": np.array([units.index(u) for u in test["origin"]]),
        "destination": np.array([units.index(u) for u in test["destination"]]),
    }
    if "period" in full["flow_immi"].dims:
        periods = list(np.asarray(full["period"].values).astype(str))
        at["period"] = np.array([periods.index(p) for p in test["period"]])
    for name, values in (("flow_immi", test["Immi"]), ("class_immi", test["class"])):
        arr = full[name].values.copy()
        arr[tuple(at[d] for d in full[name].dims)] = values.to_numpy()
        full[name] = (full[name].dims, arr)
    cells = fitted.predict_cells(full, "immi", quantiles=(0.05, 0.5, 0.95))
    keys = [cells["origin"].values, cells["destination"].values]
    wanted = [test["origin"], test["destination"]]
    if "period" in cells.coords:
        keys.append(np.asarray(cells["period"].values).astype(str))
        wanted.append(test["period"])
    frame = pd.DataFrame(
        {v: cells[v].values for v in ("q05", "q50", "q95")}, index=pd.MultiIndex.from_arrays(keys)
    )
    return frame.reindex(pd.MultiIndex.from_arrays(wanted)).reset_index(drop=True)


def undercount_table(fitted: FusionModel) -> pd.DataFrame:
    """Prior and posterior mean and 90% interval of each undercount factor."""
    post = fitted.posterior
    rows = []
    for source, priors in (("emig", EMIGRATION_PRIORS), ("immi", IMMIGRATION_PRIORS)):
        var = post[f"undercount_{source}"]
        dim = f"undercount_{source}_class"
        for c in var[dim].values:
            draws = var.sel({dim: c}).values.ravel()
            spec = priors[str(c)]
            prior_mean = (
                float(spec)
                if isinstance(spec, float)
                else spec["alpha"] / (spec["alpha"] + spec["beta"])
            )
            rows.append(
                {
                    "report": source,
                    "class": str(c),
                    "prior mean": prior_mean,
                    "posterior mean": float(draws.mean()),
                    "90% interval": f"[{np.quantile(draws, 0.05):.2f}, "
                    f"{np.quantile(draws, 0.95):.2f}]",
                }
            )
    return pd.DataFrame(rows)


def run(
    year: int,
    *,
    first_year: int | None = None,
    backend: str = "nutpie",
    draws: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Fit the panel and the one-year fusion; score both and the baselines."""
    ds, test = load(year, first_year=first_year, seed=seed)
    fits = {}
    for name, fitted, data in (
        ("panel", model(), ds),
        ("one_year", model(temporal=None), one_year(ds, year)),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fitted.fit(data, backend=backend, draws=draws, tune=draws, chains=2, random_seed=seed)
        fits[name] = (fitted, data)
    predictions = {
        "fusion, corridor effects over the years": predict_held_out(*fits["panel"], test),
        "fusion, target year alone": predict_held_out(*fits["one_year"], test),
        "sending report as it is": test["Emig"],
        f"sending report x median ratio ({test.attrs['train_ratio']:.2f})": test["Emig"]
        * test.attrs["train_ratio"],
        "receiving report the year before": test["Immi_last_year"],
    }
    panel = fits["panel"][0]
    summary = panel.summary()
    return {
        "year": year,
        "years": [str(p) for p in ds["period"].values],
        "held_out": len(test),
        "scores": compare_methods(test["Immi"].to_numpy(dtype=float), predictions),
        "undercount": undercount_table(panel),
        "r_hat_max": float(summary["r_hat"].max()),
        "ess_bulk_min": float(summary["ess_bulk"].min()),
        "dispersion": {
            s: float(panel.posterior["phi"].sel(source=s).mean()) for s in ("emig", "immi")
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--year", type=int, default=2015, help="target year (held out)")
    parser.add_argument("--first-year", type=int, default=None, help="first year of the panel")
    parser.add_argument("--out", type=Path, default=Path("eu-reports"))
    parser.add_argument("--backend", default="nutpie")
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not data_path().exists():
        print(f"no data at {data_path()}; set FLOWMODEL_DATA", file=sys.stderr)
        return 2
    result = run(
        args.year,
        first_year=args.first_year,
        backend=args.backend,
        draws=args.draws,
        seed=args.seed,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    saved = {
        **result,
        "scores": result["scores"].to_dict("records"),
        "undercount": result["undercount"].to_dict("records"),
    }
    (args.out / "eu_reports.json").write_text(json.dumps(saved, indent=2, default=float))
    pd.set_option("display.width", 120)
    print(
        f"EU {args.year} ({result['years'][0]}-{result['years'][-1]} fitted): "
        f"{result['held_out']} receiving reports held out; max R-hat {result['r_hat_max']:.3f}, "
        f"min bulk ESS {result['ess_bulk_min']:.0f}"
    )
    print(result["scores"].round(3).to_string(index=False))
    print(result["undercount"].round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
