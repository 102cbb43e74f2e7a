"""Two reports of the same flows: EU migration reported by sending and by receiving countries.

The real MigMod data (``$FLOWMODEL_DATA/eu_reported_flows_migmod/mig_data.csv``): each
corridor's flow in a year is reported by the sending country (emigration statistics,
``Emig``) and by the receiving country (immigration statistics, ``Immi``), each with
an undercount class of its country and year. Both reports observe one latent gravity
field through their own observation model — a negative binomial around the true flow
times an undercount factor per class with the priors MigMod uses (Beta, from the IMEM
expert elicitation; "low" and "medium" share the low prior) — and Sweden's immigration
statistics are the reference (factor fixed at 1), as MigMod recommends, so that the
level of the flows is identified.

Validation: a fifth of the corridors reported by both countries have their *receiving*
report held out; the model predicts each held-out report (on the receiving country's
own scale, its undercount included) from everything else. Baselines: the sending
report of the same corridor as it is, and rescaled by the median Immi/Emig ratio of the
training corridors.

Run: ``python scripts/eu_reports_example.py --year 2015 --out eu-out`` (about a minute
with nutpie on 2 cores). docs/reports.md quotes its output.
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
from flowmodel.evaluate import cpc, interval_coverage, log_rmse
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


def data_path() -> Path:
    root = Path(
        os.environ.get("FLOWMODEL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
    )
    return root / "eu_reported_flows_migmod" / "mig_data.csv"


def load(year: int, *, hold_out: float = 0.2, seed: int = 0) -> tuple[Any, pd.DataFrame]:
    """The FlowDataset of ``year`` (sources ``emig``, ``immi``) and the held-out receiving reports."""
    raw = pd.read_csv(data_path())
    raw = raw.loc[raw["Year"] == year].copy()
    units = (
        raw[["Sending_iso2", "Pop.Sending"]]
        .drop_duplicates("Sending_iso2")
        .rename(columns={"Sending_iso2": "unit_id", "Pop.Sending": "population"})
    )
    units["country"] = units["unit_id"]  # every unit is a country here
    pairs = raw[["Sending_iso2", "Receiving_iso2", "distw", "contig"]].rename(
        columns={
            "Sending_iso2": "origin",
            "Receiving_iso2": "destination",
            "distw": "distance_km",
            "contig": "contiguous",
        }
    )
    both = raw["Emig"].notna() & raw["Immi"].notna()
    rng = np.random.default_rng(seed)
    held = both & (rng.random(len(raw)) < hold_out)
    immi_class = raw["UI"].where(raw["Receiving_iso2"] != REFERENCE, "reference")
    emig = pd.DataFrame(
        {
            "origin": raw["Sending_iso2"],
            "destination": raw["Receiving_iso2"],
            "count": raw["Emig"],
            "class": raw["UE"],
        }
    ).dropna(subset=["count"])
    immi = pd.DataFrame(
        {
            "origin": raw["Sending_iso2"],
            "destination": raw["Receiving_iso2"],
            "count": raw["Immi"].where(~held),
            "class": immi_class,
        }
    ).dropna(subset=["count"])
    ds = build_dataset(units, pairs=pairs, flows={"emig": emig, "immi": immi})
    ds["contiguous"] = ds["contiguous"].fillna(0).astype(bool)
    test = raw.loc[held, ["Sending_iso2", "Receiving_iso2", "Emig", "Immi"]].rename(
        columns={"Sending_iso2": "origin", "Receiving_iso2": "destination"}
    )
    test["class"] = immi_class[held].to_numpy()
    train_ratio = float(np.median((raw["Immi"] / raw["Emig"])[both & ~held & (raw["Emig"] > 0)]))
    test.attrs["train_ratio"] = train_ratio
    return ds, test.reset_index(drop=True)


def model() -> FusionModel:
    return FusionModel(
        latent=GravityModel(
            origin_covariates=["log_population"],
            destination_covariates=["log_population"],
            cross_border=False,  # every pair crosses a border
            contiguity=True,
        ),
        sources=["emig", "immi"],
        reference_source="immi",
        source_options={
            "emig": {"undercount": EMIGRATION_PRIORS},
            "immi": {"undercount": IMMIGRATION_PRIORS},
        },
    )


def held_out_scores(fitted: FusionModel, ds: Any, test: pd.DataFrame) -> pd.DataFrame:
    """Predict every held-out receiving report on its own scale; score it and the baselines."""
    full = ds.copy()
    y = full["flow_immi"].values.copy()
    units = list(full["unit"].values)
    o = np.array([units.index(u) for u in test["origin"]])
    d = np.array([units.index(u) for u in test["destination"]])
    y[o, d] = test["Immi"].to_numpy()
    full["flow_immi"] = (("origin", "destination"), y)
    cls = full["class_immi"].values.copy()
    cls[o, d] = test["class"].to_numpy()
    full["class_immi"] = (("origin", "destination"), cls)
    cells = fitted.predict_cells(full, "immi", quantiles=(0.05, 0.95))
    key = pd.MultiIndex.from_arrays([cells["origin"].values, cells["destination"].values])
    frame = pd.DataFrame(
        {v: cells[v].values for v in ("mean", "q05", "q95", "observed")}, index=key
    )
    pred = frame.reindex(pd.MultiIndex.from_frame(test[["origin", "destination"]]))
    obs = test["Immi"].to_numpy(dtype=float)
    rows = []
    for label, point, lo, hi in (
        ("fusion of both reports", pred["mean"], pred["q05"], pred["q95"]),
        ("sending report as it is", test["Emig"], None, None),
        (
            f"sending report x median ratio ({test.attrs['train_ratio']:.2f})",
            test["Emig"] * test.attrs["train_ratio"],
            None,
            None,
        ),
    ):
        point = np.asarray(point, dtype=float)
        rows.append(
            {
                "method": label,
                "CPC": cpc(obs, point),
                "log-RMSE": log_rmse(obs, point),
                "90% coverage": np.nan
                if lo is None
                else interval_coverage(obs, np.asarray(lo), np.asarray(hi)),
            }
        )
    return pd.DataFrame(rows)


def undercount_table(fitted: FusionModel) -> pd.DataFrame:
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
                    "90% interval": f"[{np.quantile(draws, 0.05):.2f}, {np.quantile(draws, 0.95):.2f}]",
                }
            )
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--year", type=int, default=2015)
    parser.add_argument("--out", type=Path, default=Path("eu-reports"))
    parser.add_argument("--backend", default="nutpie")
    parser.add_argument("--draws", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not data_path().exists():
        print(f"no data at {data_path()}; set FLOWMODEL_DATA", file=sys.stderr)
        return 2
    ds, test = load(args.year, seed=args.seed)
    fitted = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted.fit(
            ds,
            backend=args.backend,
            draws=args.draws,
            tune=args.draws,
            chains=2,
            random_seed=args.seed,
        )
    scores = held_out_scores(fitted, ds, test)
    under = undercount_table(fitted)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {
        "year": args.year,
        "held_out": len(test),
        "scores": scores.to_dict("records"),
        "undercount": under.to_dict("records"),
        "r_hat_max": float(fitted.summary()["r_hat"].max()),
    }
    (args.out / "eu_reports.json").write_text(json.dumps(summary, indent=2, default=float))
    pd.set_option("display.width", 120)
    print(f"EU {args.year}: {len(test)} receiving reports held out")
    print(scores.round(3).to_string(index=False))
    print(under.round(3).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
