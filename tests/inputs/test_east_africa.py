"""Real boundaries from three offices, and WorldPop's Africa rasters (shared data).

Kenya's 8 DHS provinces (EPSG:4326, a country column ``ISO`` = "KE"), Rwanda's 30
NISR districts (a second layer, no country column) and Tanzania's 30 NBS regions
(Arc 1960, EPSG:4210; 7 invalid geometries as published; no country column) are
loaded together the way a run config's ``[units] path`` entries load them. The
checks use references computed outside flowmodel: the published Kenya adjacency
matrix (SUMMER's ``Amat``), PROJ's Arc 1960 -> WGS 84 transformation, and
WorldPop's own admin-1 population totals (``worldpop_pwd_admin1_*.csv``, made from
the 1 km grids these 20 km rasters aggregate). docs/validation.md ("East Africa")
quotes the numbers.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flowmodel.config import config_from_dict
from flowmodel.exceptions import NoOverlapError
from flowmodel.inputs.rasters import zonal_covariates, zonal_covariates_by_date
from flowmodel.inputs.units import UnitGeometryWarning, concat_units, load_units
from flowmodel.pairs import contiguity
from tests.conftest import require_data

BOUNDARIES = "east_africa_admin_boundaries"
#: The three files as a run config names them (one entry per office, each with its fields)
UNITS = {
    "path": [
        {"path": "kenya_dhs_provinces.gpkg", "id_field": "NAME_final", "country": "KEN"},
        {
            "path": "rwanda_nisr_2006.gpkg",
            "layer": "districts",
            "id_field": "Dist_ID",
            "name_field": "District",
            "country": "RWA",
            "id_prefix": "RWA-",
        },
        {
            "path": "tanzania_nbs_regions.gpkg",
            "id_field": "Region_Cod",
            "name_field": "Region_Nam",
            "country": "TZA",
            "id_prefix": "TZA-",
        },
    ]
}
#: Tanzania's regions that are invalid as published (README: all "Ring Self-intersection")
INVALID = ["TZA-02", "TZA-06", "TZA-09", "TZA-13", "TZA-16", "TZA-17", "TZA-18"]
ZANZIBAR = ["TZA-51", "TZA-52", "TZA-53", "TZA-54", "TZA-55"]
#: WorldPop admin-1 names of the NBS regions whose names differ (README)
WORLDPOP_NAMES = {"Dar es salaam": "Dar es Salaam"}


@pytest.fixture(scope="module")
def east_africa() -> dict[str, Any]:
    root = require_data(BOUNDARIES)
    cfg = config_from_dict({"units": UNITS}, base_dir=root, check_files=True)
    files = cfg.units.files()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frames = [load_units(**f) for f in files]
        units = concat_units(frames, [f["path"] for f in files])
    return {"units": units, "frames": frames, "warnings": [str(w.message) for w in caught]}


def _worldpop(iso: str) -> pd.DataFrame:
    path = require_data("brazil_interstate_migration_1991_2010")
    tables = [pd.read_csv(path / f"worldpop_pwd_admin1_{y}.csv") for y in (2000, 2020)]
    table = pd.concat(tables)
    return table.loc[table["ISO"] == iso, ["year", "Adm_N", "Pop"]]


def _afripop(scale: float = 400.0) -> dict[str, dict[str, Any]]:
    """The two rasters as persons per 10' cell.

    A value is the *mean* count of the 400 WorldPop 30" cells in the 10' block
    (the data README), so persons = value x 400; read as counts they would give
    1/400 of the population.
    """
    import rioxarray

    root = require_data("africa_population_2000_2020_20km")
    return {
        "population": {
            y: rioxarray.open_rasterio(root / f"afripop{y}.tif", masked=True).squeeze() * scale
            for y in ("2000", "2020")
        }
    }


def test_three_offices_load_into_one_table(east_africa):
    units = east_africa["units"]
    assert units.crs.to_epsg() == 4326
    assert units.groupby("country").size().to_dict() == {"KEN": 8, "RWA": 30, "TZA": 30}
    assert units["unit_id"].is_unique  # Rwanda's district 11 and Tanzania's region 11
    repaired = [w for w in east_africa["warnings"] if "invalid geometries" in w]
    assert len(repaired) == 1 and f"units {', '.join(INVALID)}." in repaired[0]
    assert units.is_valid.all()
    # the Arc 1960 regions were transformed to WGS 84 (PROJ's datum shift), not relabelled
    from pyproj import Transformer

    raw = east_africa["frames"][2]
    assert raw.crs.to_epsg() == 4210
    x, y = (
        raw.geometry.iloc[0].exterior.coords[0]
        if raw.geometry.iloc[0].geom_type == ("Polygon")
        else raw.geometry.iloc[0].geoms[0].exterior.coords[0]
    )
    want = Transformer.from_crs(4210, 4326, always_xy=True).transform(x, y)
    got = units.loc[units["unit_id"] == raw["unit_id"].iloc[0]].geometry.iloc[0]
    first = (
        got.exterior.coords[0] if got.geom_type == "Polygon" else got.geoms[0].exterior.coords[0]
    )
    np.testing.assert_allclose(first, want, atol=1e-9)
    shift_m = np.hypot((want[0] - x) * 111_320 * np.cos(np.radians(y)), (want[1] - y) * 110_574)
    assert 200 < shift_m < 320  # the README: 250-290 m here


def test_overlaps_between_offices_are_reported(east_africa):
    """The borders of two offices do not agree: the overlaps would count people twice."""
    (overlaps,) = [w for w in east_africa["warnings"] if "overlap" in w]
    assert overlaps.startswith("9 pair(s) of units from different files overlap")
    # the largest: Kenya's Rift Valley and Tanzania's Arusha
    assert "rift valley (kenya_dhs_provinces.gpkg) and TZA-02 (tanzania_nbs_regions.gpkg): 16" in (
        overlaps
    )
    assert "RWA-55 (rwanda_nisr_2006.gpkg) and TZA-18 (tanzania_nbs_regions.gpkg)" in overlaps


def test_contiguity_matches_the_published_matrix_and_crosses_borders(east_africa):
    units = east_africa["units"]
    adjacent = contiguity(units)
    ids = units["unit_id"].to_numpy()
    amat = pd.read_csv(
        require_data(BOUNDARIES, "kenya_dhs_provinces_adjacency.csv"), index_col="NAME_final"
    )
    ken = [int(np.flatnonzero(ids == name)[0]) for name in amat.index]
    np.testing.assert_array_equal(adjacent[np.ix_(ken, ken)], amat.to_numpy().astype(bool))
    country = units["country"].to_numpy()
    i, j = np.nonzero(np.triu(adjacent) & (country[:, None] != country[None, :]))
    across = sorted(f"{ids[a]}|{ids[b]}" for a, b in zip(i, j, strict=True))
    assert across == sorted(
        [
            "coast|TZA-03",  # Kilimanjaro
            "coast|TZA-04",  # Tanga
            "nyanza|TZA-20",  # Mara
            "rift valley|TZA-02",  # Arusha
            "rift valley|TZA-03",  # Kilimanjaro: 0.5 m apart in these two files
            "rift valley|TZA-20",
            "RWA-52|TZA-18",  # Nyagatare, Gatsibo, Kayonza, Kirehe | Kagera
            "RWA-53|TZA-18",
            "RWA-54|TZA-18",
            "RWA-55|TZA-18",
        ]
    )
    exact = contiguity(units, tolerance_m=0)
    rv, kili = (int(np.flatnonzero(ids == u)[0]) for u in ("rift valley", "TZA-03"))
    assert adjacent[rv, kili] and not exact[rv, kili]
    assert (exact <= adjacent).all() and (adjacent & ~exact).sum() == 2  # that pair only


def test_zonal_population_agrees_with_worldpop_admin1_totals(east_africa):
    """Tanzania's mainland regions (25) against WorldPop's own region totals, 2000 and 2020."""
    units = east_africa["units"]
    tza = units.loc[units["country"] == "TZA"]
    rasters = _afripop()
    with pytest.raises(
        NoOverlapError, match="5 unit.*on nodata pixels: " + ", ".join(ZANZIBAR) + r".*query"
    ):
        zonal_covariates(tza, {"population": rasters["population"]["2000"]})
    # what a user does next: keep the mainland (in a run config: the entry's query)
    with pytest.warns(UnitGeometryWarning, match="7 invalid geometries"):
        mainland = load_units(
            require_data(BOUNDARIES, "tanzania_nbs_regions.gpkg"),
            id_field="Region_Cod",
            name_field="Region_Nam",
            country="TZA",
            id_prefix="TZA-",
            query="Region_Cod < '51'",
        )
    assert sorted(mainland["unit_id"]) == sorted(set(tza["unit_id"]) - set(ZANZIBAR))
    cov = zonal_covariates_by_date(mainland, rasters)
    cov = cov.merge(mainland[["unit_id", "name"]], on="unit_id")
    cov["year"] = cov["period"].astype(int)
    cov["Adm_N"] = cov["name"].replace(WORLDPOP_NAMES)
    both = cov.merge(_worldpop("TZA"), on=["year", "Adm_N"], how="left", validate="1:1")
    assert both["Pop"].notna().all(), both.loc[both["Pop"].isna(), "name"].tolist()
    both["ratio"] = both["population"] / both["Pop"]
    for year, got in both.groupby("year"):
        r = np.corrcoef(np.log(got["population"]), np.log(got["Pop"]))[0, 1]
        print(
            f"TZA {year}: {got['population'].sum():,.0f} vs WorldPop {got['Pop'].sum():,.0f}; "
            f"region ratio median {got['ratio'].median():.3f} "
            f"[{got['ratio'].min():.2f}, {got['ratio'].max():.2f}], log correlation {r:.3f}"
        )
        assert 0.9 <= got["ratio"].median() <= 1.1
        assert got["ratio"].between(0.7, 1.45).all()
        assert r >= 0.95
        assert got["population"].sum() / got["Pop"].sum() == pytest.approx(1.0, abs=0.1)
    growth = both.groupby("year")[["population", "Pop"]].sum()
    ours, theirs = growth.loc[2020] / growth.loc[2000]
    assert ours == pytest.approx(theirs, rel=0.05)


def test_zonal_engines_agree_on_real_boundaries(east_africa):
    """flowmodel's own engine and exactextract on published polygons (holes, islands)."""
    units = east_africa["units"]
    land = units.loc[~units["unit_id"].isin(ZANZIBAR)]
    raster = _afripop()["population"]["2020"]
    ours = zonal_covariates(land, {"population": raster})
    ref = zonal_covariates(land, {"population": raster}, engine="exactextract")
    for col in ("population", "lon", "lat", "raster_coverage"):
        np.testing.assert_allclose(ours[col], ref.loc[ours.index, col], rtol=1e-6, err_msg=col)
    # Kenya's provinces hold Kenya: WorldPop's national total (47 counties) within 10%
    kenya = ours.loc[units.loc[units["country"] == "KEN", "unit_id"], "population"].sum()
    total = _worldpop("KEN").query("year == 2020")["Pop"].sum()
    assert kenya == pytest.approx(total, rel=0.1)
