"""East Africa on real inputs only: three offices' boundaries, WorldPop's rasters and Kenya's flows.

Writes a run folder with a real run config (``run.toml``) and one derived input,
then runs the whole pipeline on it:

- units: Kenya's 8 DHS provinces, Rwanda's 5 NISR provinces and Tanzania's 25
  mainland NBS regions, one ``[units] path`` entry per office with its own fields
  (``$FLOWMODEL_DATA/east_africa_admin_boundaries``);
- population: WorldPop's 10' Africa rasters for 2000 and 2020 with ``scale = 400``
  (their values are mean persons per 30" cell);
- flows: WorldPop's modelled 2005-2010 Kenya migration (46 units) summed to the 8
  provinces by the first digit of the unit ids (the data README's join), written
  as ``kenya_provinces_2005_2010.csv``; Rwanda and Tanzania have none.

``--tza-total`` adds Tanzania's national internal-migration total from WorldPop's
own table as a country-pair marginal and fits a fusion model, which is what pins
a country's level when it has no flow data (docs/validation.md, "East Africa").

Run: ``python scripts/east_africa_example.py --out east-africa`` (about a minute
on 2 cores), then open ``east-africa/run/report.html``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pandas as pd

#: first digit of a WorldPop KEN unit id -> DHS province (NAME_final), the data README's table
PROVINCE = {
    "1": "central",
    "2": "coast",
    "3": "eastern",
    "4": "nairobi",
    "5": "northeastern",
    "6": "nyanza",
    "7": "rift valley",
    "8": "western",
}
#: the window of WorldPop's 2010 migration tables
PERIOD = "2005-2010"


def data_path() -> Path:
    return Path(os.environ.get("FLOWMODEL_DATA", "../shared/data")).resolve()


def kenya_province_flows(path: Path) -> int:
    """Write WorldPop's 2005-2010 Kenya flows summed to province pairs; return their total."""
    wp = pd.read_csv(
        data_path() / "worldpop_internal_migration_2010" / "KEN_5yrs_InternalMigFlows_2010.csv"
    )
    wp["origin"] = wp["NODEI"].astype(str).str[0].map(PROVINCE)
    wp["destination"] = wp["NODEJ"].astype(str).str[0].map(PROVINCE)
    between = wp.loc[wp["origin"] != wp["destination"]]
    table = between.groupby(["origin", "destination"], as_index=False)["PrdMIG"].sum()
    table["count"] = table.pop("PrdMIG").round().astype(int)
    table.to_csv(path, index=False)
    return int(table["count"].sum())


def tanzania_total() -> float:
    """WorldPop's own 2005-2010 internal-migration total of Tanzania (26 IPUMS units)."""
    wp = pd.read_csv(
        data_path() / "worldpop_internal_migration_2010" / "TZA_5yrs_InternalMigFlows_2010.csv"
    )
    return float(wp["PrdMIG"].sum())


def write_example(
    out: Path, *, scale: float | None = 400.0, tza_total: bool = False, seed: int = 1
) -> tuple[Path, int]:
    """Write ``out/run.toml`` and its flow table; return the config path and Kenya's total.

    ``scale=None`` leaves the rasters as they are (the mistake the prepare stage
    warns about); ``tza_total`` adds Tanzania's total as a marginal (fusion model).
    """
    out.mkdir(parents=True, exist_ok=True)
    root = data_path()
    bounds = root / "east_africa_admin_boundaries"
    rasters = root / "africa_population_2000_2020_20km"
    total = kenya_province_flows(out / "kenya_provinces_2005_2010.csv")
    dates = f'{{ 2000 = "{rasters / "afripop2000.tif"}", 2020 = "{rasters / "afripop2020.tif"}" }}'
    population = f"{{ dates = {dates}, scale = {scale:g} }}" if scale else dates
    latent = """origin_covariates = ["log_population"]
destination_covariates = ["log_population"]
cross_border = true
contiguity = true"""
    if tza_total:
        (out / "tanzania_total.csv").write_text(
            f"origin_country,destination_country,value\nTZA,TZA,{tanzania_total():.0f}\n"
        )
        model = f"""[model]
type = "fusion"
backend = "nutpie"
draws = 500
tune = 500
chains = 2

[model.options]
sources = ["census"]

[model.options.latent]
type = "gravity"
{latent}

[marginals.worldpop]
path = "tanzania_total.csv"
rel_sd = 0.2
"""
    else:
        model = f"""[model]
type = "gravity"
backend = "nutpie"
draws = 500
tune = 500
chains = 2

[model.options]
{latent}
"""
    config = f"""# East Africa on real inputs (scripts/east_africa_example.py wrote this file)
[run]
name = "east-africa"
out_dir = "run"
seed = {seed}

[units]
path = [
  {{ path = "{bounds / "kenya_dhs_provinces.gpkg"}", id_field = "NAME_final", name_field = "DHSREGEN", country = "KEN" }},
  {{ path = "{bounds / "rwanda_nisr_2006.gpkg"}", layer = "provinces", id_field = "Prov_ID", name_field = "Prov_Name", country = "RWA", id_prefix = "RWA-" }},
  # Zanzibar (regions 51-55) lies on the rasters' nodata: the mainland only
  {{ path = "{bounds / "tanzania_nbs_regions.gpkg"}", id_field = "Region_Cod", name_field = "Region_Nam", country = "TZA", id_prefix = "TZA-", query = "Region_Cod < '51'" }},
]

[rasters]
# WorldPop's 10' rasters hold mean persons per 30" cell: x400 makes them persons
population = {population}

[flows.census]
kind = "table"
path = "kenya_provinces_2005_2010.csv"
period = "{PERIOD}"

{model}"""
    path = out / "run.toml"
    path.write_text(config)
    return path, total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("east-africa"))
    parser.add_argument("--tza-total", action="store_true", help="add Tanzania's total (fusion)")
    args = parser.parse_args(argv)
    if not (data_path() / "east_africa_admin_boundaries").exists():
        print(f"no data at {data_path()}; set FLOWMODEL_DATA", file=sys.stderr)
        return 2
    from flowmodel.config import load_config
    from flowmodel.pipeline import run_pipeline

    path, observed = write_example(args.out, tza_total=args.tza_total)
    cfg = load_config(path)
    run_pipeline(cfg)
    totals = pd.read_csv(cfg.out_dir / "totals.csv")
    internal = totals.loc[(totals["level"] == "country") & (totals["quantity"] == "internal")]
    print(f"internal migration {PERIOD} (posterior mean, 90% interval):")
    for row in internal.itertuples():
        print(f"  {row.country}  {row.mean:>12,.0f}  [{row.q05:,.0f}, {row.q95:,.0f}]")
    print(f"  Kenya in WorldPop's table: {observed:,}; Tanzania: {tanzania_total():,.0f}")
    print(f"config: {path}\nreport: {cfg.out_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
