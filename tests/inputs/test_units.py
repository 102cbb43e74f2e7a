"""load_units: formats, normalised columns, and named errors for bad inputs."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely

from flowmodel.exceptions import DataContractError, InputFileError, MissingCRSError
from flowmodel.inputs.units import UnitGeometryWarning, load_units
from tests.conftest import require_data


def sample_units(n: int = 4) -> gpd.GeoDataFrame:
    geoms = [shapely.box(i, 0, i + 1, 1) for i in range(n)]
    return gpd.GeoDataFrame(
        {
            "code": np.arange(100, 100 + n),
            "iso": ["KEN", "KEN", "UGA", "UGA"][:n],
            "label": [f"District {i}" for i in range(n)],
        },
        geometry=geoms,
        crs="EPSG:4326",
    )


@pytest.mark.parametrize(
    ("suffix", "kwargs"),
    [(".gpkg", {"layer": "units"}), (".geojson", {}), (".shp", {}), (".parquet", {})],
)
def test_load_units_formats_normalise_columns(tmp_path, suffix, kwargs):
    path = tmp_path / f"units{suffix}"
    gdf = sample_units()
    if suffix == ".parquet":
        gdf.to_parquet(path)
    else:
        gdf.to_file(path, engine="pyogrio", **kwargs)
    got = load_units(path, id_field="code", country_field="iso", name_field="label", **kwargs)
    assert list(got.columns) == ["unit_id", "country", "name", "geometry"]
    assert got["unit_id"].tolist() == ["100", "101", "102", "103"]
    assert got["country"].tolist() == ["KEN", "KEN", "UGA", "UGA"]
    assert got["name"].iloc[2] == "District 2"
    assert got.crs.to_epsg() == 4326
    assert got.geometry.area.sum() == pytest.approx(4.0)


def test_missing_file_and_field(tmp_path):
    with pytest.raises(InputFileError, match=r"nope.gpkg: file not found. Fix: check the path"):
        load_units(tmp_path / "nope.gpkg", id_field="code", country_field="iso")
    path = tmp_path / "u.geojson"
    sample_units().to_file(path)
    with pytest.raises(InputFileError, match=r"no field 'ISO3' for country_field .*Fix: pass"):
        load_units(path, id_field="code", country_field="ISO3")


def test_no_crs(tmp_path):
    path = tmp_path / "nocrs.gpkg"
    sample_units().set_crs(None, allow_override=True).to_file(path, layer="units")
    with pytest.raises(MissingCRSError, match=r"no coordinate reference system. Fix: add one"):
        load_units(path, id_field="code", country_field="iso")


def test_duplicate_and_null_ids(tmp_path):
    gdf = sample_units()
    gdf.loc[3, "code"] = 101
    path = tmp_path / "dup.gpkg"
    gdf.to_file(path, layer="units")
    with pytest.raises(DataContractError, match=r"field 'code' holds duplicate ids 101\. Fix"):
        load_units(path, id_field="code", country_field="iso")
    gdf = sample_units()
    gdf["code"] = gdf["code"].astype(object)
    gdf.loc[1, "code"] = None
    gdf.to_file(tmp_path / "null.gpkg", layer="units")
    with pytest.raises(DataContractError, match=r"'code' is null in 1 feature\(s\), rows 1"):
        load_units(tmp_path / "null.gpkg", id_field="code", country_field="iso")


def test_missing_country(tmp_path):
    gdf = sample_units()
    gdf.loc[2, "iso"] = None
    gdf.to_file(tmp_path / "c.gpkg", layer="units")
    with pytest.raises(DataContractError, match=r"country code\) is missing for units 102"):
        load_units(tmp_path / "c.gpkg", id_field="code", country_field="iso")


def test_empty_layer_and_ambiguous_layers(tmp_path):
    path = tmp_path / "multi.gpkg"
    sample_units().to_file(path, layer="units")
    sample_units().iloc[:0].to_file(path, layer="empty")
    with pytest.raises(InputFileError, match=r"holds 2 layers \(.*\)\. Fix: pass layer="):
        load_units(path, id_field="code", country_field="iso")
    with pytest.raises(InputFileError, match=r"layer is empty \(0 features\)"):
        load_units(path, id_field="code", country_field="iso", layer="empty")
    with pytest.raises(InputFileError, match=r"no layer 'admin2'"):
        load_units(path, id_field="code", country_field="iso", layer="admin2")


def test_invalid_geometry_repaired_with_warning(tmp_path):
    gdf = sample_units()
    bowtie = shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1)])  # self-intersecting
    gdf.loc[1, "geometry"] = shapely.affinity.translate(bowtie, 1, 0)
    path = tmp_path / "bad.gpkg"
    gdf.to_file(path, layer="units")
    with pytest.warns(UnitGeometryWarning, match=r"1 invalid geometries repaired .*units 101"):
        got = load_units(path, id_field="code", country_field="iso")
    assert got.geometry.is_valid.all()
    assert got.geometry.iloc[1].area == pytest.approx(0.5)
    assert got.geom_type.iloc[1] in ("Polygon", "MultiPolygon")


def test_empty_geometry_and_points_rejected(tmp_path):
    gdf = sample_units()
    gdf.loc[0, "geometry"] = shapely.Polygon()
    gdf.to_file(tmp_path / "e.gpkg", layer="units")
    with pytest.raises(DataContractError, match=r"units 100 have a null or empty geometry"):
        load_units(tmp_path / "e.gpkg", id_field="code", country_field="iso")
    pts = sample_units()
    pts["geometry"] = pts.geometry.centroid
    pts.to_file(tmp_path / "p.gpkg", layer="units")
    with pytest.raises(DataContractError, match=r"are not polygons \(Point\)"):
        load_units(tmp_path / "p.gpkg", id_field="code", country_field="iso")


def test_unreadable_file(tmp_path):
    path = tmp_path / "junk.geojson"
    path.write_text("{ not json")
    with pytest.raises(InputFileError, match="cannot be read as polygons"):
        load_units(path, id_field="code", country_field="iso")


def test_real_natural_earth_countries():
    path = require_data("naturalearth_countries_lowres", "naturalearth_lowres.shp")
    units = load_units(path, id_field="name", country_field="iso_a3", name_field="name")
    assert len(units) == 177
    assert units["unit_id"].is_unique
    assert units.loc[units["unit_id"] == "Kenya", "country"].item() == "KEN"
    assert units.geometry.is_valid.all()


def test_duplicated_feature_under_another_id_names_the_file(tmp_path):
    gdf = sample_units()
    gdf.loc[3, "geometry"] = gdf.loc[1, "geometry"]  # feature 101 copied as 103
    path = tmp_path / "dup.gpkg"
    gdf.to_file(path, layer="units")
    with pytest.raises(
        DataContractError,
        match=r"dup\.gpkg \(layer 'units'\): 1 geometr\(ies\) appear under more than one unit id: "
        r"101=103",
    ):
        load_units(path, id_field="code", country_field="iso", layer="units")


def test_truncated_units_file(tmp_path):
    path = tmp_path / "cut.gpkg"
    sample_units().to_file(path, layer="units")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(InputFileError, match=r"cut\.gpkg: cannot be read as polygons"):
        load_units(path, id_field="code", country_field="iso")


def test_country_for_a_file_of_one_country(tmp_path):
    """Offices rarely put a country column in their own boundary files (Tanzania's NBS)."""
    path = tmp_path / "tza.gpkg"
    sample_units().drop(columns="iso").to_file(path, engine="pyogrio")
    got = load_units(path, id_field="code", country="TZA")
    assert list(got["country"]) == ["TZA"] * 4
    assert list(got["unit_id"]) == ["100", "101", "102", "103"]
    with pytest.raises(
        DataContractError, match=r"tza\.gpkg: .*country_field=.*country=.*not both"
    ):
        load_units(path, id_field="code", country="TZA", country_field="code")
    with pytest.raises(DataContractError, match=r"give country_field=<column .* or, .*country="):
        load_units(path, id_field="code")
    with pytest.raises(DataContractError, match=r"country=' ' is empty"):
        load_units(path, id_field="code", country=" ")


def test_id_prefix_and_concat_units_across_offices(tmp_path):
    """Two offices numbering from 1, in two CRSs: prefixes make the ids unique, one CRS out."""
    from flowmodel.inputs.units import concat_units

    a, b = tmp_path / "a.gpkg", tmp_path / "b.gpkg"
    sample_units(2).to_file(a, engine="pyogrio")
    far = sample_units(2).drop(columns="iso")
    far = far.set_geometry(far.translate(xoff=10)).to_crs("EPSG:3857")
    far.to_file(b, engine="pyogrio")
    first = load_units(a, id_field="code", country_field="iso", name_field="label")
    second = load_units(b, id_field="code", country="TZA")
    with pytest.raises(
        DataContractError,
        match=r"b\.gpkg: unit id\(s\) \['100', '101'\] are also in .*a\.gpkg.*id_prefix",
    ):
        concat_units([first, second], [a, b])
    second = load_units(b, id_field="code", country="TZA", id_prefix="TZA-")
    both = concat_units([first, second], [a, b])
    assert list(both["unit_id"]) == ["100", "101", "TZA-100", "TZA-101"]
    assert list(both["country"]) == ["KEN", "KEN", "TZA", "TZA"]
    assert both.crs == first.crs  # the second file reprojected, not relabelled
    np.testing.assert_allclose(both.geometry.iloc[2].bounds, (10, 0, 11, 1), atol=1e-9)
    assert both["name"].iloc[:2].tolist() == ["District 0", "District 1"]
    assert both["name"].iloc[2:].isna().all()  # the second file has no names
    assert concat_units([first]) is first


def test_invalid_geometries_are_named_in_order(tmp_path):
    bowtie = shapely.Polygon([(0, 0), (1, 1), (1, 0), (0, 1)])
    gdf = sample_units(4)
    gdf.loc[[0, 3], "geometry"] = [bowtie, shapely.affinity.translate(bowtie, 5)]
    gdf["code"] = [130, 101, 102, 120]
    path = tmp_path / "u.gpkg"
    gdf.to_file(path, engine="pyogrio")
    with pytest.warns(UnitGeometryWarning, match=r"2 invalid geometries .*units 120, 130\."):
        load_units(path, id_field="code", country_field="iso")


def test_query_keeps_the_units_asked_for(tmp_path):
    path = tmp_path / "u.gpkg"
    sample_units().to_file(path, engine="pyogrio")
    got = load_units(path, id_field="code", country_field="iso", query="code < 102")
    assert list(got["unit_id"]) == ["100", "101"]
    with pytest.raises(
        InputFileError,
        match=r"u\.gpkg: query 'kode < 102' cannot be evaluated .*fields: code, iso, label",
    ):
        load_units(path, id_field="code", country_field="iso", query="kode < 102")
    with pytest.raises(InputFileError, match=r"query 'code > 900' keeps none of the 4 features"):
        load_units(path, id_field="code", country_field="iso", query="code > 900")


def test_concat_units_reports_overlaps_even_of_unrepaired_frames():
    """Frames built by hand (not load_units) may hold invalid polygons; overlaps still count."""
    from flowmodel.inputs.units import concat_units

    bowtie = shapely.Polygon([(0, 0), (2, 2), (2, 0), (0, 2)])  # self-intersecting
    a = gpd.GeoDataFrame({"unit_id": ["a1"], "country": ["A"]}, geometry=[bowtie], crs="EPSG:4326")
    b = gpd.GeoDataFrame(
        {"unit_id": ["b1"], "country": ["B"]}, geometry=[shapely.box(1, 0, 3, 2)], crs="EPSG:4326"
    )
    with pytest.warns(
        UnitGeometryWarning, match=r"1 pair\(s\) .*a1 \(units\[0\]\) and b1 \(units\[1\]\)"
    ):
        both = concat_units([a, b])
    assert list(both["unit_id"]) == ["a1", "b1"]
