"""Zonal statistics: hand-computed totals, exactextract equivalence, CRS, nodata, errors."""

from __future__ import annotations

import warnings
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
from rasterio.transform import from_origin

from flowmodel.exceptions import InputFileError, MissingCRSError, NoOverlapError
from flowmodel.inputs.rasters import RasterCoverageWarning, zonal_covariates, zonal_statistics
from tests.conftest import require_data

ORIGIN = (30.0, 2.0)  # top-left corner, lon/lat
PIXEL = 0.01


def write_raster(path: Path, data: np.ndarray, *, crs="EPSG:4326", nodata=-9999.0, tile=None):
    profile = {
        "driver": "GTiff",
        "width": data.shape[1],
        "height": data.shape[0],
        "count": 1,
        "dtype": str(data.dtype),
        "transform": from_origin(*ORIGIN, PIXEL, PIXEL),
        "nodata": nodata,
    }
    if crs is not None:
        profile["crs"] = crs
    if tile:
        profile.update(tiled=True, blockxsize=tile, blockysize=tile)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data, 1)
    return path


def pix(u: float, v: float) -> tuple[float, float]:
    """Pixel-space (column, row) to lon/lat on the test grid."""
    return ORIGIN[0] + u * PIXEL, ORIGIN[1] - v * PIXEL


def pix_poly(coords) -> shapely.Polygon:
    return shapely.Polygon([pix(u, v) for u, v in coords])


def units_of(geoms, ids=None, crs="EPSG:4326") -> gpd.GeoDataFrame:
    ids = ids or [f"u{i}" for i in range(len(geoms))]
    return gpd.GeoDataFrame({"unit_id": ids, "country": "AAA"}, geometry=list(geoms), crs=crs)


@pytest.fixture(scope="module")
def grid_raster(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """10 x 10 raster, value = 10 * row + col, one nodata cell at (row 2, col 2)."""
    data = (10.0 * np.arange(10)[:, None] + np.arange(10)[None, :]).astype(np.float32)
    data[2, 2] = -9999.0
    path = tmp_path_factory.mktemp("r") / "grid.tif"
    return write_raster(path, data), data


# ------------------------------------------------------------------ hand-computed totals
def test_sums_over_polygons_cutting_pixels(grid_raster):
    path, data = grid_raster
    v = np.where(data == -9999.0, 0.0, data.astype(float))
    geoms = [
        # whole pixels: rows 5-6, cols 1-3
        pix_poly([(1, 5), (4, 5), (4, 7), (1, 7)]),
        # half-pixel offsets: covers cols 0.5..2.5 of row 0 and 1 -> quarters/halves at edges
        pix_poly([(0.5, 0.5), (2.5, 0.5), (2.5, 1.5), (0.5, 1.5)]),
        # triangle: lower-left half of pixel (row 8, col 8)
        pix_poly([(8, 8), (9, 9), (8, 9)]),
        # around the nodata pixel (2, 2): 3 x 3 block rows 1-3, cols 1-3
        pix_poly([(1, 1), (4, 1), (4, 4), (1, 4)]),
    ]
    expected_sum = [
        v[5:7, 1:4].sum(),
        0.25 * (v[0, 0] + v[0, 2] + v[1, 0] + v[1, 2]) + 0.5 * (v[0, 1] + v[1, 1]),
        0.5 * v[8, 8],
        v[1:4, 1:4].sum(),
    ]
    expected_count = [6.0, 2.0, 0.5, 8.0]
    got = zonal_statistics(units_of(geoms), path)
    np.testing.assert_allclose(got["sum"], expected_sum, rtol=1e-12)
    np.testing.assert_allclose(got["count"], expected_count, rtol=1e-12)
    np.testing.assert_allclose(got["mean"], np.array(expected_sum) / expected_count, rtol=1e-12)
    np.testing.assert_allclose(got["coverage"], [1.0, 1.0, 1.0, 8.0 / 9.0], rtol=1e-12)
    assert got.index.name == "unit" and list(got.index) == ["u0", "u1", "u2", "u3"]


def test_hole_and_multipolygon(grid_raster):
    path, data = grid_raster
    v = np.where(data == -9999.0, 0.0, data.astype(float))
    outer = pix_poly([(4, 4), (9, 4), (9, 9), (4, 9)])
    hole = pix_poly([(5, 5), (7, 5), (7, 7), (5, 7)])
    ring = outer.difference(hole)
    multi = shapely.MultiPolygon(
        [pix_poly([(0, 8), (1, 8), (1, 9), (0, 9)]), pix_poly([(3, 0), (4, 0), (4, 1), (3, 1)])]
    )
    got = zonal_statistics(units_of([ring, multi]), path)
    exp_ring = v[4:9, 4:9].sum() - v[5:7, 5:7].sum()
    np.testing.assert_allclose(got["sum"], [exp_ring, v[8, 0] + v[0, 3]], rtol=1e-12)
    np.testing.assert_allclose(got["count"], [21.0, 2.0], rtol=1e-12)


def test_all_nodata_unit_gives_nan_mean(tmp_path):
    data = np.full((4, 4), -9999.0, dtype=np.float32)
    data[0, 0] = 5.0
    path = write_raster(tmp_path / "nd.tif", data)
    got = zonal_statistics(units_of([pix_poly([(2, 2), (4, 2), (4, 4), (2, 4)])]), path)
    assert got["sum"].iloc[0] == 0.0
    assert got["count"].iloc[0] == 0.0
    assert np.isnan(got["mean"].iloc[0])
    assert got["coverage"].iloc[0] == 0.0


def test_nan_nodata_and_integer_rasters(tmp_path):
    data = np.arange(16, dtype=np.float32).reshape(4, 4)
    data[1, 1] = np.nan
    p_nan = write_raster(tmp_path / "nan.tif", data, nodata=np.nan)
    p_int = write_raster(
        tmp_path / "int.tif", np.arange(16, dtype=np.int32).reshape(4, 4), nodata=5
    )
    poly = units_of([pix_poly([(0, 0), (2, 0), (2, 2), (0, 2)])])
    assert zonal_statistics(poly, p_nan)["sum"].iloc[0] == pytest.approx(0 + 1 + 4)
    got = zonal_statistics(poly, p_int)
    assert got["sum"].iloc[0] == pytest.approx(0 + 1 + 4)  # 5 is nodata
    assert got["count"].iloc[0] == pytest.approx(3.0)


# ----------------------------------------------------------------- exactextract reference
def random_polygons(rng: np.random.Generator, n: int, bounds) -> list:
    x0, y0, x1, y1 = bounds
    out = []
    for i in range(n):
        cx, cy = rng.uniform(x0 - 0.05, x1 + 0.05), rng.uniform(y0 - 0.05, y1 + 0.05)
        radius = rng.uniform(0.01, 0.3)
        ang = np.sort(rng.uniform(0, 2 * np.pi, 14))
        rad = radius * rng.uniform(0.4, 1.0, 14)
        poly = shapely.Polygon(np.c_[cx + rad * np.cos(ang), cy + rad * np.sin(ang)])
        if i % 4 == 0:
            poly = poly.difference(shapely.Point(cx, cy).buffer(radius * 0.2))
        out.append(poly)
    return out


@pytest.fixture(scope="module")
def random_raster(tmp_path_factory) -> Path:
    rng = np.random.default_rng(7)
    data = rng.lognormal(2.0, 1.0, (300, 420)).astype(np.float32)
    data[40:55, 100:300] = -9999.0
    data[200, :] = -9999.0
    path = tmp_path_factory.mktemp("rr") / "random.tif"
    return write_raster(path, data, tile=64)


def test_equals_exactextract_on_random_polygons(random_raster):
    from exactextract import exact_extract

    rng = np.random.default_rng(3)
    with rasterio.open(random_raster) as src:
        b = src.bounds
    units = units_of(random_polygons(rng, 80, (b.left, b.bottom, b.right, b.top)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RasterCoverageWarning)
        ours = zonal_statistics(units, random_raster, block_cells=5000, threads=2)
    ref = exact_extract(
        str(random_raster),
        units,
        ["sum", "count", "mean"],
        include_cols=["unit_id"],
        output="pandas",
    ).set_index("unit_id")
    for stat in ("sum", "count"):
        np.testing.assert_allclose(ours[stat], ref[stat], rtol=1e-6, atol=1e-9, err_msg=stat)
    both = ref["count"].to_numpy() > 0
    np.testing.assert_allclose(ours["mean"][both], ref["mean"][both], rtol=1e-6)


def test_strips_and_threads_do_not_change_results(random_raster):
    rng = np.random.default_rng(4)
    with rasterio.open(random_raster) as src:
        b = src.bounds
    units = units_of(random_polygons(rng, 30, (b.left, b.bottom, b.right, b.top)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RasterCoverageWarning)
        one = zonal_statistics(units, random_raster, block_cells=10**9, threads=1)
        many = zonal_statistics(units, random_raster, block_cells=420, threads=3)
    pd.testing.assert_frame_equal(one, many, rtol=1e-10, atol=1e-9)


def test_numpy_and_dask_rasters_agree(random_raster):
    import rioxarray

    rng = np.random.default_rng(5)
    units = units_of(random_polygons(rng, 20, (30.5, -0.8, 33.5, 1.6)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RasterCoverageWarning)
        from_file = zonal_statistics(units, random_raster)
        eager = zonal_statistics(units, rioxarray.open_rasterio(random_raster))
        lazy = zonal_statistics(units, rioxarray.open_rasterio(random_raster, chunks={"y": 50}))
    pd.testing.assert_frame_equal(from_file, eager, rtol=1e-12)
    pd.testing.assert_frame_equal(from_file, lazy, rtol=1e-12)


# ----------------------------------------------------------------------------- CRS
def test_crs_mismatch_gives_same_population_within_half_percent(random_raster):
    rng = np.random.default_rng(6)
    polys = [p for p in random_polygons(rng, 25, (30.6, -0.7, 33.8, 1.6)) if p.area > 0.02]
    units = units_of(polys)
    utm = units.to_crs("EPSG:32736")  # UTM 36S: the polygons now come in metres
    ours = zonal_statistics(units, random_raster)
    moved = zonal_statistics(utm, random_raster)
    np.testing.assert_allclose(moved["sum"], ours["sum"], rtol=5e-3)
    assert moved["sum"].sum() == pytest.approx(ours["sum"].sum(), rel=1e-3)


def test_raster_in_projected_crs(tmp_path):
    # a 100 m grid in UTM; a lon/lat square's population equals the reprojected reference
    data = np.ones((200, 200), dtype=np.float32)
    with rasterio.open(
        tmp_path / "utm.tif",
        "w",
        driver="GTiff",
        width=200,
        height=200,
        count=1,
        dtype="float32",
        crs="EPSG:32736",
        transform=from_origin(500000, 9990000, 100, 100),
    ) as dst:
        dst.write(data, 1)
    square = gpd.GeoSeries([shapely.box(500500, 9980500, 505500, 9985500)], crs="EPSG:32736")
    units = units_of(list(square.to_crs("EPSG:4326")))
    got = zonal_statistics(units, tmp_path / "utm.tif")
    assert got["sum"].iloc[0] == pytest.approx(50 * 50, rel=1e-4)


# ----------------------------------------------------------------------- covariates
def test_zonal_covariates_columns_centroid_and_per_capita(tmp_path):
    pop = np.zeros((10, 10), dtype=np.float32)
    pop[2, 7] = 100.0  # all of unit a's population in one cell
    pop[6:9, 1:4] = 10.0
    pop[9, 9] = -9999.0
    nl = np.full((10, 10), 2.0, dtype=np.float32)
    bu = np.full((10, 10), 0.25, dtype=np.float32)
    bu[6:8, :] = 0.75
    paths = {
        "population": write_raster(tmp_path / "pop.tif", pop),
        "built_up": write_raster(tmp_path / "bu.tif", bu),
        "night_lights": write_raster(tmp_path / "nl.tif", nl),
        "elevation": write_raster(tmp_path / "el.tif", bu * 100),
    }
    units = units_of(
        [
            pix_poly([(5, 0), (10, 0), (10, 5), (5, 5)]),
            pix_poly([(0, 5), (5, 5), (5, 10), (0, 10)]),
            pix_poly([(5, 5), (10, 5), (10, 10), (5, 10)]),
        ],
        ids=["a", "b", "c"],
    )
    cov = zonal_covariates(units, paths)
    assert list(cov.columns) == [
        "population",
        "lon",
        "lat",
        "built_up",
        "night_lights",
        "night_lights_per_capita",
        "raster_coverage",
        "elevation",
    ]
    assert cov.index.name == "unit"
    assert cov.loc["a", "population"] == pytest.approx(100.0)
    assert cov.loc["b", "population"] == pytest.approx(90.0)
    lon, lat = pix(7.5, 2.5)
    assert cov.loc["a", "lon"] == pytest.approx(lon) and cov.loc["a", "lat"] == pytest.approx(lat)
    lon, lat = pix(2.5, 7.5)
    assert cov.loc["b", "lon"] == pytest.approx(lon) and cov.loc["b", "lat"] == pytest.approx(lat)
    assert cov.loc["a", "night_lights"] == pytest.approx(50.0)
    assert cov.loc["a", "night_lights_per_capita"] == pytest.approx(0.5)
    assert cov.loc["b", "built_up"] == pytest.approx((10 * 0.75 + 15 * 0.25) / 25)
    assert cov.loc["b", "elevation"] == pytest.approx(100 * (10 * 0.75 + 15 * 0.25) / 25)
    assert cov.loc["c", "raster_coverage"] == pytest.approx(24 / 25)
    assert cov.loc["a", "raster_coverage"] == pytest.approx(1.0)
    # stats override
    summed = zonal_covariates(units, {"built_up": paths["built_up"]}, stats={"built_up": "sum"})
    assert summed.loc["b", "built_up"] == pytest.approx(10 * 0.75 + 15 * 0.25)


def test_zero_population_unit_falls_back_to_area_centroid(tmp_path):
    path = write_raster(tmp_path / "zero.tif", np.zeros((6, 6), dtype=np.float32))
    units = units_of([pix_poly([(0, 0), (2, 0), (2, 2), (0, 2)])])
    cov = zonal_covariates(units, {"population": path})
    lon, lat = pix(1, 1)
    assert cov["lon"].iloc[0] == pytest.approx(lon, abs=1e-6)
    assert cov["lat"].iloc[0] == pytest.approx(lat, abs=1e-6)


# -------------------------------------------------------------------------- errors
def test_units_partly_and_wholly_outside_warn_with_ids(grid_raster):
    path, _ = grid_raster
    units = units_of(
        [
            pix_poly([(0, 0), (2, 0), (2, 2), (0, 2)]),
            pix_poly([(8, 8), (12, 8), (12, 12), (8, 12)]),
            pix_poly([(20, 20), (22, 20), (22, 22), (20, 22)]),
        ],
        ids=["inside", "edge", "far"],
    )
    with pytest.warns(RasterCoverageWarning, match=r"wholly outside: far; partly outside: edge"):
        got = zonal_statistics(units, path)
    assert got.loc["edge", "coverage"] == pytest.approx(0.25)
    assert got.loc["far", "sum"] == 0.0


def test_no_overlap_raises(grid_raster):
    path, _ = grid_raster
    units = units_of([shapely.box(-70, 40, -69, 41)])
    with pytest.raises(NoOverlapError, match=r"does not overlap any unit.*raster bounds"):
        zonal_statistics(units, path)


def test_missing_file_raster_without_crs_units_without_crs(tmp_path, grid_raster):
    path, data = grid_raster
    units = units_of([pix_poly([(0, 0), (2, 0), (2, 2), (0, 2)])])
    with pytest.raises(InputFileError, match=r"raster 'population': file .*nope.tif not found"):
        zonal_covariates(units, {"population": tmp_path / "nope.tif"})
    no_crs = write_raster(tmp_path / "nocrs.tif", data, crs=None)
    with pytest.raises(MissingCRSError, match=r"raster 'raster' .* has no CRS. Fix"):
        zonal_statistics(units, no_crs)
    with pytest.raises(MissingCRSError, match="units have no CRS"):
        zonal_statistics(units.set_crs(None, allow_override=True), path)
    (tmp_path / "junk.tif").write_text("not a raster")
    with pytest.raises(InputFileError, match="cannot be opened"):
        zonal_statistics(units, tmp_path / "junk.tif")


def test_bad_arguments(grid_raster):
    path, _ = grid_raster
    units = units_of([pix_poly([(0, 0), (2, 0), (2, 2), (0, 2)])])
    with pytest.raises(InputFileError, match=r"unknown statistics \['median'\]"):
        zonal_statistics(units, path, stats=("median",))
    with pytest.raises(InputFileError, match="stats names raster 'lights'"):
        zonal_covariates(units, {"population": path}, stats={"lights": "sum"})
    with pytest.raises(InputFileError, match="no rasters given"):
        zonal_covariates(units, {})
    with pytest.raises(InputFileError, match="no id column 'code'"):
        zonal_statistics(units, path, id_field="code")
    with pytest.raises(InputFileError, match="the GeoDataFrame is empty"):
        zonal_statistics(units.iloc[:0], path)
    with pytest.raises(InputFileError, match="must be a GeoDataFrame"):
        zonal_statistics(pd.DataFrame({"unit_id": ["a"]}), path)


# ----------------------------------------------------------------------- real data
def test_kenya_population_tiles_sum_to_published_total():
    path = require_data("kenya_population_raster_afripop2010", "kenya_afripop2010_1km.tif")
    with rasterio.open(path) as src:
        b = src.bounds
    xs = np.linspace(b.left, b.right, 8)
    ys = np.linspace(b.bottom, b.top, 7)
    tiles = [shapely.box(xs[i], ys[j], xs[i + 1], ys[j + 1]) for i in range(7) for j in range(6)]
    units = units_of(tiles, crs="EPSG:4326")
    # tiles wholly on nodata (sea, neighbouring countries) have no known population
    stats = zonal_statistics(units, path, stats=("count",))
    empty = stats.index[stats["count"] == 0].tolist()
    assert empty
    with pytest.raises(NoOverlapError, match=r"get no population .*on nodata pixels: " + empty[0]):
        zonal_covariates(units, {"population": path})
    cov = zonal_covariates(units[~units["unit_id"].isin(empty)], {"population": path})
    assert cov["population"].sum() == pytest.approx(40_200_954.6, rel=1e-3)
    assert cov["population"].min() >= 0
    inhabited = cov["population"] > 0
    assert cov.loc[inhabited, "lon"].between(b.left, b.right).all()


# ------------------------------------------------------------- simulated world, end to end
@pytest.mark.integration
def test_simulated_world_becomes_flowdataset(tmp_path_factory):
    from exactextract import exact_extract

    from flowmodel.dataset import build_dataset, validate_dataset
    from flowmodel.inputs import load_units
    from flowmodel.pairs import intervening_population, sparse_pairs
    from flowmodel.simulate import simulate_world

    world = simulate_world(tmp_path_factory.mktemp("world"), n_units=40, n_countries=3, seed=2)
    units = load_units(
        world.paths["units"], id_field="unit_id", country_field="country", layer="units"
    )
    cov = zonal_covariates(units, world.rasters(), progress=False)
    truth = world.covariates().loc[cov.index]
    for col in ("population", "lon", "lat", "built_up", "night_lights", "raster_coverage"):
        np.testing.assert_allclose(cov[col], truth[col], rtol=1e-9, err_msg=col)
    # independent reference on the world's own rasters
    ref = exact_extract(
        str(world.rasters()["population"]),
        units,
        ["sum"],
        include_cols=["unit_id"],
        output="pandas",
    ).set_index("unit_id")
    np.testing.assert_allclose(cov["population"], ref.loc[cov.index, "sum"], rtol=1e-6)
    ds = build_dataset(units, covariates=cov)
    validate_dataset(ds)
    assert ds["contiguous"].any() and ds["cross_border"].any()
    s = intervening_population(ds["population"], ds["distance_km"])
    assert s.shape == (40, 40) and np.isnan(np.diag(s)).all() and (np.nan_to_num(s) >= 0).all()
    sp = sparse_pairs(ds, k=5)
    assert sp.sizes["pair"] == 40 * 5
    validate_dataset(sp)


def test_south_up_raster_gives_same_sums(tmp_path, grid_raster):
    # the same cells stored bottom row first with a positive y pixel size
    path, data = grid_raster
    flipped = data[::-1].copy()
    transform = rasterio.Affine(PIXEL, 0, ORIGIN[0], 0, PIXEL, ORIGIN[1] - 10 * PIXEL)
    with rasterio.open(
        tmp_path / "south_up.tif",
        "w",
        driver="GTiff",
        width=10,
        height=10,
        count=1,
        dtype="float32",
        crs="EPSG:4326",
        transform=transform,
        nodata=-9999.0,
    ) as dst:
        dst.write(flipped, 1)
    units = units_of(
        [
            pix_poly([(0.5, 0.5), (2.5, 0.5), (2.5, 1.5), (0.5, 1.5)]),
            pix_poly([(3, 3), (7.5, 4), (5, 9)]),
        ]
    )
    north = zonal_statistics(units, path)
    south = zonal_statistics(units, tmp_path / "south_up.tif")
    pd.testing.assert_frame_equal(north, south, rtol=1e-12)


def test_rasters_on_different_grids_and_progress_bar(tmp_path, grid_raster, capsys, monkeypatch):
    path, data = grid_raster
    monkeypatch.setattr("flowmodel.progress._interactive", lambda stream: True)  # draw the bar
    coarse = data.reshape(5, 2, 5, 2).mean(axis=(1, 3)).astype(np.float32)  # 0.02 deg cells
    with rasterio.open(
        tmp_path / "coarse.tif",
        "w",
        driver="GTiff",
        width=5,
        height=5,
        count=1,
        dtype="float32",
        crs="EPSG:4326",
        transform=from_origin(*ORIGIN, 2 * PIXEL, 2 * PIXEL),
    ) as dst:
        dst.write(coarse, 1)
    units = units_of(
        [pix_poly([(0, 0), (4, 0), (4, 4), (0, 4)]), pix_poly([(5, 5), (9, 6), (6, 9)])]
    )
    cov = zonal_covariates(
        units,
        {"population": path, "lights_coarse": tmp_path / "coarse.tif"},
        stats={"lights_coarse": "sum"},
        progress=True,
    )
    fine = zonal_statistics(units, path)
    alone = zonal_statistics(units, tmp_path / "coarse.tif")
    np.testing.assert_allclose(cov["population"], fine["sum"], rtol=1e-12)
    np.testing.assert_allclose(cov["lights_coarse"], alone["sum"], rtol=1e-12)
    assert "zonal population" in capsys.readouterr().err
    zonal_covariates(units, {"population": path}, progress=False)
    assert capsys.readouterr().err == ""


# ------------------------------------------------------------- engine="exactextract"
@pytest.fixture(scope="module")
def covariate_rasters(tmp_path_factory, random_raster) -> dict[str, Path]:
    """Population (nodata -9999), lights (int32, nodata 0) and built-up (NaN, coarser grid)."""
    rng = np.random.default_rng(11)
    where = tmp_path_factory.mktemp("cov")
    lights = rng.integers(0, 60, (300, 420)).astype(np.int32)  # 0 = nodata, scattered
    built = rng.uniform(0, 1, (150, 210)).astype(np.float32)
    built[20:40, 30:90] = np.nan
    coarse = tmp_path_factory.mktemp("cov") / "built.tif"
    with rasterio.open(
        coarse,
        "w",
        driver="GTiff",
        width=210,
        height=150,
        count=1,
        dtype="float32",
        crs="EPSG:4326",
        transform=from_origin(*ORIGIN, 2 * PIXEL, 2 * PIXEL),
        nodata=np.nan,
    ) as dst:
        dst.write(built, 1)
    return {
        "population": random_raster,
        "night_lights": write_raster(where / "lights.tif", lights, nodata=0, tile=64),
        "built_up": coarse,
    }


def assert_engines_agree(ours: pd.DataFrame, ref: pd.DataFrame) -> None:
    assert list(ours.columns) == list(ref.columns)
    assert list(ours.index) == list(ref.index)
    for col in ours.columns:
        a, b = ours[col].to_numpy(float), ref[col].to_numpy(float)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=col)
        ok = ~np.isnan(a)
        np.testing.assert_allclose(a[ok], b[ok], rtol=1e-6, atol=1e-9, err_msg=col)


@pytest.mark.parametrize("units_crs", ["EPSG:4326", "EPSG:32736"])
def test_engines_agree_on_every_covariate(covariate_rasters, units_crs):
    rng = np.random.default_rng(12)
    units = units_of(random_polygons(rng, 60, (30.0, -1.0, 34.2, 2.0))).to_crs(units_crs)
    with pytest.warns(RasterCoverageWarning) as ours_warned:
        ours = zonal_covariates(units, covariate_rasters)
    with pytest.warns(RasterCoverageWarning) as ref_warned:
        ref = zonal_covariates(units, covariate_rasters, engine="exactextract")
    assert [str(w.message) for w in ours_warned] == [str(w.message) for w in ref_warned]
    assert list(ours.columns) == [
        "population",
        "lon",
        "lat",
        "built_up",
        "night_lights",
        "night_lights_per_capita",
        "raster_coverage",
    ]
    assert (ours["raster_coverage"] < 1).any()  # nodata and units outside the rasters
    assert_engines_agree(ours, ref)


def test_engines_agree_on_zonal_statistics_sources_and_nodata(random_raster, tmp_path):
    import rioxarray

    rng = np.random.default_rng(13)
    units = units_of(random_polygons(rng, 40, (30.0, -1.0, 34.2, 2.0)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RasterCoverageWarning)
        ours = zonal_statistics(units, random_raster)
        for raster in (
            random_raster,
            rioxarray.open_rasterio(random_raster),
            rioxarray.open_rasterio(random_raster, chunks={"y": 50}),
        ):
            ref = zonal_statistics(units, raster, engine="exactextract")
            assert_engines_agree(ours, ref)
    # a unit wholly over nodata: count 0, mean NaN in both
    with rasterio.open(random_raster) as src:
        data = src.read(1)
    assert (data[40:55, 100:300] == -9999.0).all()
    over_nodata = units_of([pix_poly([(120.3, 41.2), (180.6, 42), (150, 53.7)])])
    for engine in ("flowmodel", "exactextract"):
        got = zonal_statistics(over_nodata, random_raster, engine=engine)
        assert got["count"].iloc[0] == 0.0 and np.isnan(got["mean"].iloc[0]), engine
        assert got["coverage"].iloc[0] == 0.0


def test_exactextract_engine_south_up_integer_warnings_and_errors(tmp_path, grid_raster):
    path, data = grid_raster
    transform = rasterio.Affine(PIXEL, 0, ORIGIN[0], 0, PIXEL, ORIGIN[1] - 10 * PIXEL)
    with rasterio.open(
        tmp_path / "south_up.tif",
        "w",
        driver="GTiff",
        width=10,
        height=10,
        count=1,
        dtype="float32",
        crs="EPSG:4326",
        transform=transform,
        nodata=-9999.0,
    ) as dst:
        dst.write(data[::-1].copy(), 1)
    units = units_of(
        [
            pix_poly([(0.5, 0.5), (2.5, 0.5), (2.5, 1.5), (0.5, 1.5)]),
            pix_poly([(3, 3), (7.5, 4), (5, 9)]),
            pix_poly([(1, 1), (4, 1), (4, 4), (1, 4)]),
        ]
    )
    north = zonal_covariates(units, {"population": path})
    south = zonal_covariates(
        units, {"population": tmp_path / "south_up.tif"}, engine="exactextract"
    )
    assert_engines_agree(north, south)
    p_int = write_raster(
        tmp_path / "int.tif", np.arange(16, dtype=np.int32).reshape(4, 4), nodata=5
    )
    poly = units_of([pix_poly([(0, 0), (2, 0), (2, 2), (0, 2)])])
    got = zonal_statistics(poly, p_int, engine="exactextract")
    assert got["sum"].iloc[0] == pytest.approx(0 + 1 + 4)  # 5 is nodata
    assert got["count"].iloc[0] == pytest.approx(3.0)
    # the same warnings and errors as the own engine
    edge = units_of(
        [
            pix_poly([(0, 0), (2, 0), (2, 2), (0, 2)]),
            pix_poly([(8, 8), (12, 8), (12, 12), (8, 12)]),
            pix_poly([(20, 20), (22, 20), (22, 22), (20, 22)]),
        ],
        ids=["inside", "edge", "far"],
    )
    with pytest.warns(RasterCoverageWarning, match=r"wholly outside: far; partly outside: edge"):
        got = zonal_statistics(edge, path, engine="exactextract")
    assert got.loc["edge", "coverage"] == pytest.approx(0.25)
    assert got.loc["far", "sum"] == 0.0
    with pytest.raises(NoOverlapError, match="does not overlap any unit"):
        zonal_statistics(units_of([shapely.box(-70, 40, -69, 41)]), path, engine="exactextract")
    with pytest.raises(InputFileError, match=r"unknown engine 'gdal'"):
        zonal_statistics(poly, path, engine="gdal")  # type: ignore[arg-type]


@pytest.mark.parametrize("factor", [0, 10**12], ids=["numpy-path", "numba-kernels"])
def test_both_interior_paths_equal_exactextract(random_raster, monkeypatch, factor):
    """The engine picks numpy (coarse zones) or numba kernels (fine zones): both are exact."""
    from exactextract import exact_extract

    import flowmodel.inputs.rasters as rasters_module

    calls = []
    kernel = rasters_module._row_suffix_kernel()
    if factor and kernel is None:
        pytest.skip("numba is not importable: the kernel path cannot run")
    if kernel is not None:

        def counted(*args):
            calls.append(1)
            return kernel(*args)

        monkeypatch.setattr(rasters_module, "_row_suffix_kernel", lambda: counted)
    monkeypatch.setattr(rasters_module, "_SPARSE_FACTOR", factor)
    rng = np.random.default_rng(11)
    with rasterio.open(random_raster) as src:
        b = src.bounds
    units = units_of(random_polygons(rng, 60, (b.left, b.bottom, b.right, b.top)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RasterCoverageWarning)
        ours = zonal_statistics(units, random_raster, block_cells=5000, threads=2)
    ref = exact_extract(
        str(random_raster), units, ["sum", "count"], include_cols=["unit_id"], output="pandas"
    ).set_index("unit_id")
    for stat in ("sum", "count"):
        np.testing.assert_allclose(ours[stat], ref[stat], rtol=1e-6, atol=1e-9, err_msg=stat)
    assert bool(calls) == bool(factor), "the intended interior path did not run"


# ------------------------------------------------------ silently wrong rasters (issue 18)
def test_multiband_geotiff_is_refused_like_a_multiband_dataarray(tmp_path):
    import rioxarray

    path = tmp_path / "rgb.tif"
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        width=6,
        height=6,
        count=3,
        dtype="float32",
        crs="EPSG:4326",
        transform=from_origin(*ORIGIN, PIXEL, PIXEL),
    ) as dst:
        dst.write(np.ones((3, 6, 6), dtype=np.float32))
    units = units_of([pix_poly([(0, 0), (2, 0), (2, 2), (0, 2)])])
    with pytest.raises(
        InputFileError, match=r"raster 'population': .*rgb\.tif has 3 bands.*gdal_translate -b 1"
    ):
        zonal_covariates(units, {"population": path})
    with pytest.raises(InputFileError, match=r"raster 'population' .*has 3 bands"):
        zonal_covariates(units, {"population": rioxarray.open_rasterio(path)})


def test_all_nodata_raster_names_the_file_and_says_extent(tmp_path):
    path = write_raster(tmp_path / "void.tif", np.full((6, 6), -9999.0, dtype=np.float32))
    units = units_of(
        [pix_poly([(0, 0), (2, 0), (2, 2), (0, 2)]), pix_poly([(3, 3), (5, 3), (5, 5)])]
    )
    with pytest.raises(
        NoOverlapError,
        match=r"raster 'night_lights' \(.*void\.tif\): every pixel under the units is nodata "
        r"\(nodata = -9999\).*covers the units' area",
    ):
        zonal_covariates(units, {"night_lights": path})
    # zonal_statistics, a general tool, still reports count 0
    assert (zonal_statistics(units, path)["count"] == 0).all()


def test_unit_partly_outside_the_population_raster_with_no_people_is_an_error(
    grid_raster, tmp_path
):
    # people only in the top-left corner; unit "edge" reaches past the raster's extent
    pop = np.zeros((10, 10), dtype=np.float32)
    pop[0, 0] = 50.0
    path = write_raster(tmp_path / "pop.tif", pop)
    units = units_of(
        [
            pix_poly([(0, 0), (2, 0), (2, 2), (0, 2)]),
            pix_poly([(8, 8), (12, 8), (12, 12), (8, 12)]),
        ],
        ids=["inside", "edge"],
    )
    with (
        pytest.warns(RasterCoverageWarning),
        pytest.raises(
            NoOverlapError,
            match=r"raster 'population' \(.*pop\.tif\): 1 unit\(s\) get no population because "
            r"they lie outside its extent \(wholly or partly\): edge\. Their population is "
            r"unknown, not 0.*covers every unit",
        ),
    ):
        zonal_covariates(units, {"population": path})
    # partly outside but with people inside: kept, with a warning and raster_coverage < 1
    pop[9, 9] = 5.0
    path = write_raster(tmp_path / "pop2.tif", pop)
    with pytest.warns(RasterCoverageWarning, match="partly outside: edge"):
        cov = zonal_covariates(units, {"population": path})
    assert cov.loc["edge", "population"] == pytest.approx(5.0)
    assert cov.loc["edge", "raster_coverage"] == pytest.approx(0.25)
