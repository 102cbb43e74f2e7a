"""`flowmodel run` on real inputs only: three offices' boundaries, WorldPop rasters and flows.

Kenya's 8 DHS provinces, Rwanda's 5 NISR provinces and Tanzania's 25 mainland NBS
regions ([units] path entries with their own fields), WorldPop's 10' Africa
population for 2000 and 2020 (``scale = 400``: the values are mean persons per 30"
cell), and WorldPop's modelled 2005-2010 Kenya migration (46 units) summed to the
8 provinces by the first digit of their ids (the data README's join) as the one
flow source. Rwanda and Tanzania have no flow data: the run must say so, and their
intervals must be the prior's. The run folder is the one `scripts/east_africa_example.py` writes;
docs/validation.md ("East Africa") quotes the numbers.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flowmodel.exceptions import DataScaleWarning
from tests.conftest import load_script, require_data


def _example() -> Any:
    """``scripts/east_africa_example.py``: the run folder the docs describe."""
    return load_script("east_africa_example")


def _config(tmp: Path, *, scale: float | None = 400.0) -> Any:
    from flowmodel.config import load_config

    for name in ("east_africa_admin_boundaries", "africa_population_2000_2020_20km"):
        require_data(name)
    require_data("worldpop_internal_migration_2010", "KEN_5yrs_InternalMigFlows_2010.csv")
    path, total = _example().write_example(tmp, scale=scale)
    return load_config(path), total


def _populations(out: Path) -> pd.Series:
    from flowmodel.dataset import load_dataset

    ds = load_dataset(out / "dataset.nc")
    return ds["population"].to_series().groupby(ds["country"].to_series()).sum()


def _worldpop_at_the_window() -> pd.Series:
    """WorldPop's national totals, log-linear between 2000 and 2020, at 2005-2010's midpoint."""
    totals = []
    for year in (2000, 2020):
        table = pd.read_csv(
            require_data(
                "brazil_interstate_migration_1991_2010", f"worldpop_pwd_admin1_{year}.csv"
            )
        )
        table = table.loc[~table["Adm_N"].str.contains("Pemba|Zanzibar")]  # the run's mainland
        totals.append(table.groupby("ISO")["Pop"].sum())
    w = (2007.5 - 2000.5) / 20  # midpoints of the window and of the two years
    return np.exp(np.log(totals[0]) + w * (np.log(totals[1]) - np.log(totals[0])))


def test_prepare_reads_the_rasters_at_their_scale(tmp_path):
    """With scale = 400 the populations are WorldPop's; without it, the flows say so.

    The static population is the one at the flows' window (2005-2010), interpolated
    between the 2000 and 2020 rasters, not the 2020 one.
    """
    from flowmodel.pipeline import run_pipeline

    cfg, _ = _config(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_pipeline(cfg, stages=["prepare"])
    assert not [w for w in caught if issubclass(w.category, DataScaleWarning)]
    got, want = _populations(cfg.out_dir), _worldpop_at_the_window()
    for code in ("KEN", "RWA", "TZA"):
        assert got[code] == pytest.approx(want[code], rel=0.15), code

    (tmp_path / "bare").mkdir()
    bare, _ = _config(tmp_path / "bare", scale=None)
    with pytest.warns(DataScaleWarning, match=r"counts more moves out of 8 of 38 units") as said:
        run_pipeline(bare, stages=["prepare"])
    (text,) = [str(w.message) for w in said if issubclass(w.category, DataScaleWarning)]
    assert "rift valley: " in text and "scale" in text
    assert _populations(bare.out_dir)["KEN"] == pytest.approx(got["KEN"] / 400, rel=1e-6)


@pytest.mark.slow
def test_run_with_one_country_of_flows_gives_the_others_prior_intervals(tmp_path):
    """The whole run; Rwanda's and Tanzania's levels are the prior's, and the report says so."""
    from flowmodel.pipeline import run_pipeline

    cfg, observed = _config(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_pipeline(cfg)
    out = cfg.out_dir
    totals = pd.read_csv(out / "totals.csv")
    report = (out / "report.html").read_text()
    assert "country_effect[RWA, TZA]" in report
    assert "No source observes moves within RWA, TZA" in report
    # the by-country table marks them where a reader looks at their totals
    assert "† No source observes moves within RWA, TZA: their totals are predicted" in report
    assert report.count('<sup title="no source observes moves within this country">†</sup>') == 2

    def internal(code: str) -> pd.Series:
        row = totals.loc[
            (totals["level"] == "country")
            & (totals["country"] == code)
            & (totals["quantity"] == "internal")
        ]
        assert len(row) == 1, (code, totals.columns.tolist())
        return row.iloc[0]

    ken = internal("KEN")
    # the fitted country: its predicted internal total near what WorldPop's table says
    assert 0.8 <= ken["mean"] / observed <= 1.25, (ken["mean"], observed)
    spread = {c: np.log(internal(c)["q95"] / internal(c)["q05"]) for c in ("KEN", "RWA", "TZA")}
    print({c: round(float(v), 2) for c, v in spread.items()}, ken["mean"], observed)
    for code in ("RWA", "TZA"):
        # the prior's level (sd 0.5 on the log scale) widens the country's total
        assert spread[code] > spread["KEN"] + 0.8, spread
