"""Simulated worlds with known parameters, shared by tests, docs, benchmarks and the demo.

:func:`simulate_flow_dataset` makes an in-memory FlowDataset in a second (no
files); :func:`simulate_world` (below) writes the full file-based world —
polygons, rasters, census tables and records, and CDR — whose flows come from the
same generating process, :func:`gravity_log_rate`, applied to the zonal
statistics of the rasters it wrote; :func:`load_world` reopens one. Every file,
column and generating rule is documented in ``docs/simulated_world.md``.

Parameter names are the models' node names; coefficients are on the raw covariate
scale, with terms named ``origin:<var>``, ``destination:<var>``,
``log_distance``, ``cross_border`` and ``contiguous``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from flowmodel._version import __version__

__all__ = [
    "DEFAULT_TRUTH",
    "FILES",
    "FUSION_TRUTH",
    "PANEL_TRUTH",
    "WORLD_TRUTH",
    "WORLD_VERSION",
    "SimulatedWorld",
    "gravity_log_rate",
    "load_world",
    "simulate_flow_dataset",
    "simulate_fusion_dataset",
    "simulate_panel_dataset",
    "simulate_world",
]

#: Default generating parameters of the gravity process (raw covariate scale).
DEFAULT_TRUTH: dict[str, Any] = {
    "intercept": -7.5,
    "beta": {
        "origin:log_population": 0.8,
        "destination:log_population": 0.7,
        "destination:night_lights_per_capita": 0.5,
        "log_distance": -1.4,
        "cross_border": -1.5,
    },
    "sigma_country": 0.4,
    "phi": 5.0,
}


def _term_values(term: str, unit: pd.DataFrame, pair: Mapping[str, np.ndarray]) -> np.ndarray:
    n = len(unit)
    if term.startswith("origin:"):
        return np.broadcast_to(unit[term.split(":", 1)[1]].to_numpy()[:, None], (n, n))
    if term.startswith("destination:"):
        return np.broadcast_to(unit[term.split(":", 1)[1]].to_numpy()[None, :], (n, n))
    if term == "log_distance":
        return np.log(pair["distance_km"])
    return np.asarray(pair[term], dtype=float)


def gravity_log_rate(
    unit: pd.DataFrame,
    pair: Mapping[str, np.ndarray],
    truth: Mapping[str, Any],
    country_effect: np.ndarray,
) -> np.ndarray:
    """Log expected flow ``eta`` (origin x destination) of the generating gravity process.

    Parameters
    ----------
    unit
        One row per unit with the covariates named by the ``beta`` terms.
    pair
        ``distance_km`` and the other pair terms, each ``(n, n)``.
    truth
        ``intercept`` and ``beta`` (term -> coefficient, raw scale).
    country_effect
        Per-unit origin-country effect, shape ``(n,)``.
    """
    eta = truth["intercept"] + country_effect[:, None] * np.ones(len(unit))[None, :]
    for term, coef in truth["beta"].items():
        eta = eta + coef * _term_values(term, unit, pair)
    np.fill_diagonal(eta, np.nan)
    return eta


def simulate_flow_dataset(
    n_units: int = 150,
    n_countries: int = 3,
    *,
    seed: int = 0,
    truth: Mapping[str, Any] | None = None,
    likelihood: str = "negbin",
    observed_countries: Sequence[str] | None = None,
    sample_fraction: float = 1.0,
    source: str = "census",
    bbox: tuple[float, float, float, float] = (30.0, -6.0, 40.0, 4.0),
    observed_pairs: str = "origin",
) -> tuple[xr.Dataset, dict[str, Any]]:
    """Simulate a FlowDataset from a known gravity process, in memory.

    Units are random points in ``bbox`` (lon/lat); countries are the Voronoi
    regions of ``n_countries`` random seeds; population is log-normal;
    night lights per capita and built-up share are correlated with it.

    Parameters
    ----------
    n_units, n_countries
        Size of the world.
    seed
        Seed of every random draw (same seed, same dataset).
    truth
        Generating parameters (default :data:`DEFAULT_TRUTH`).
    likelihood
        ``"negbin"`` (variance mu + mu²/phi) or ``"poisson"``.
    observed_countries
        Countries whose flows are observed (see ``observed_pairs``); default all.
    sample_fraction
        Census sampling fraction: observed counts ~ NB(mu · f, phi); stored as
        ``exposure_<source>``.
    source
        Name of the flow source variable (``flow_<source>``).
    bbox
        Region (lon_min, lat_min, lon_max, lat_max) of the unit points.
    observed_pairs
        ``"origin"``: every pair whose origin is in an observed country;
        ``"within"``: only pairs with origin and destination in the same
        observed country (the universe of a national census). Other pairs
        are NaN.

    Returns
    -------
    (xarray.Dataset, dict)
        The FlowDataset and the truth: parameters keyed by the models' node names,
        ``country_effect`` per country and ``mu`` (true expected flows, origin x
        destination, before sampling).
    """
    from flowmodel.dataset import build_dataset

    if observed_pairs not in ("origin", "within"):
        raise ValueError(f"observed_pairs={observed_pairs!r}: use 'origin' or 'within'")
    rng = np.random.default_rng(seed)
    truth = dict(DEFAULT_TRUTH if truth is None else truth)
    lon0, lat0, lon1, lat1 = bbox
    lon = rng.uniform(lon0, lon1, n_units)
    lat = rng.uniform(lat0, lat1, n_units)
    seeds = np.column_stack(
        [rng.uniform(lon0, lon1, n_countries), rng.uniform(lat0, lat1, n_countries)]
    )
    nearest = np.argmin(
        (lon[:, None] - seeds[:, 0]) ** 2 + (lat[:, None] - seeds[:, 1]) ** 2, axis=1
    )
    codes = np.array([f"C{k:02d}" for k in range(n_countries)])
    # every country gets at least one unit
    for k in range(n_countries):
        if not np.any(nearest == k):
            nearest[rng.integers(n_units)] = k
    country = codes[nearest]
    log_pop = rng.normal(11.0, 1.0, n_units)
    population = np.round(np.exp(log_pop))
    income = rng.normal(0.0, 1.0, n_countries)[nearest] + rng.normal(0, 0.5, n_units)
    nlpc = np.exp(-3.0 + 0.3 * (log_pop - 11.0) + 0.5 * income)
    built_up = 1.0 / (1.0 + np.exp(-(log_pop - 12.0)))
    ids = np.array([f"U{i:04d}" for i in range(n_units)])
    units = pd.DataFrame(
        {
            "unit_id": ids,
            "country": country,
            "population": population,
            "lon": lon,
            "lat": lat,
            "night_lights_per_capita": nlpc,
            "built_up": built_up,
        }
    )
    ds = build_dataset(units)
    unit = units.set_index("unit_id")
    unit["log_population"] = np.log(unit["population"])
    pair = {
        "distance_km": ds["distance_km"].values,
        "cross_border": ds["cross_border"].values.astype(float),
    }
    if "contiguous" in ds:
        pair["contiguous"] = ds["contiguous"].values.astype(float)
    effects = rng.normal(0.0, truth["sigma_country"], n_countries)
    eta = gravity_log_rate(unit, pair, truth, effects[nearest])
    mu = np.exp(eta)
    mean = np.nan_to_num(mu) * sample_fraction
    if likelihood == "poisson":
        y = rng.poisson(mean).astype(float)
    else:
        phi = truth["phi"]
        y = rng.poisson(rng.gamma(phi, mean / phi, size=mean.shape)).astype(float)
    observed = (
        np.ones(n_units, dtype=bool)
        if observed_countries is None
        else np.isin(country, observed_countries)
    )
    if observed_pairs == "origin":
        y[~observed, :] = np.nan
    else:
        y[~(observed[:, None] & (country[:, None] == country[None, :]))] = np.nan
    np.fill_diagonal(y, np.nan)
    ds[f"flow_{source}"] = (("origin", "destination"), y)
    if sample_fraction != 1.0:
        ds[f"exposure_{source}"] = ("unit", np.full(n_units, float(sample_fraction)))
    ds.attrs.update(simulated=1, seed=seed, likelihood=likelihood)
    out_truth: dict[str, Any] = {
        **truth,
        "country_effect": dict(zip(codes.tolist(), effects.tolist(), strict=True)),
        "mu": xr.DataArray(
            mu, dims=("origin", "destination"), coords={"origin": ids, "destination": ids}
        ),
    }
    return ds, out_truth


# =========================================================================== the world
#: Generating parameters of :func:`simulate_world`: the terms and values of
#: :data:`DEFAULT_TRUTH` with a higher intercept, so that true 5-year flows have a
#: realistic level (about 6% of residents move between units in five years; pairs
#: carry tens to thousands of migrants).
WORLD_TRUTH: dict[str, Any] = {**DEFAULT_TRUTH, "intercept": -6.5}

#: Version of what :func:`simulate_world` writes for a given seed and arguments; bumped
#: whenever the files change (2: the census enumerates in-migrants from abroad; 3: the
#: census records what real censuses record — immigrants' previous *country*, in
#: ``census_immigrants.csv``, and optionally internal movers' previous *admin-1* —
#: and ``units.gpkg`` carries ``admin1``). Written to ``truth.json``; ``flowmodel
#: demo`` simulates its world again when it differs.
WORLD_VERSION = 3

#: Made-up ISO3-like country codes, from the ISO 3166 user-assigned range (X..).
COUNTRY_CODES: tuple[str, ...] = (
    "XAN", "XBO", "XCE", "XDU", "XEL", "XFI", "XGA", "XHO", "XIR", "XJU", "XKE", "XLO",
)  # fmt: skip

#: Region of the default world (lon_min, lat_min, lon_max, lat_max), EPSG:4326 — East Africa.
WORLD_BBOX: tuple[float, float, float, float] = (29.0, -6.0, 41.0, 4.0)

#: CRS of each written raster: population and night lights in lon/lat (as WorldPop and
#: VIIRS ship), built-up share in UTM zone 36S (metres) so that readers must reproject.
RASTER_CRS: dict[str, str] = {
    "population": "EPSG:4326",
    "built_up": "EPSG:32736",
    "night_lights": "EPSG:4326",
}

#: Nodata value of each written raster (float32).
RASTER_NODATA: dict[str, float] = {
    "population": -99999.0,
    "built_up": -1.0,
    "night_lights": -9999.0,
}

#: Offset of the local time of the simulated region from UTC (East Africa Time); CDR
#: timestamps are written in UTC, night and day are defined in local time.
UTC_OFFSET_HOURS = 3
#: IANA time zone with that offset (no daylight saving), for CDR readers.
TIMEZONE = "Africa/Nairobi"
#: Local hours of night-time events (21:00 to 06:00) and daytime events (08:00 to 18:00).
NIGHT_HOURS: tuple[int, int] = (21, 6)
DAY_HOURS: tuple[int, int] = (8, 18)
#: Default panel size of :func:`simulate_world` per unit of the CDR countries.
SUBSCRIBERS_PER_CDR_UNIT = 330
#: Median nights a month with at least one night-time event of a subscriber in the default
#: world: the median daily activity of Beta(4, 4) (0.5) x the chance that an active day,
#: with 1 + Poisson(0.6) events each at night with probability 0.55, has a night event
#: (1 - 0.45 exp(-0.6 x 0.55)) x the mean days per month (about 10.3 nights).
DEFAULT_CDR_ACTIVITY = 0.5 * (1.0 - 0.45 * float(np.exp(-0.6 * 0.55))) * 365.25 / 12
#: Years covered by the true flows (census "residence five years ago").
FLOW_YEARS = 5.0

_KM_PER_DEG_LAT = 110.574
_KM_PER_DEG_LON = 111.320

FILES: dict[str, str] = {
    "units": "units.gpkg",
    "population": "population.tif",
    "built_up": "built_up.tif",
    "night_lights": "night_lights.tif",
    "census_persons": "census_persons.csv",
    "census_od": "census_od.csv",
    "census_immigrants": "census_immigrants.csv",
    "cdr_towers": "cdr_towers.csv",
    "cdr_events": "cdr_events.parquet",
    "truth": "truth.json",
    "true_flows": "true_flows.csv",
    "true_covariates": "true_covariates.csv",
    "true_cdr_homes": "true_cdr_homes.csv",
}


@dataclass(frozen=True)
class SimulatedWorld:
    """A simulated world on disk: where its files are and the truth that made them.

    Attributes
    ----------
    out_dir
        Folder holding the files.
    paths
        File role -> path (keys of :data:`FILES`: ``units``, ``population``,
        ``built_up``, ``night_lights``, ``census_persons``, ``census_od``,
        ``cdr_towers``, ``cdr_events``, ``truth``, ``true_flows``,
        ``true_covariates``, ``true_cdr_homes``).
    truth
        The content of ``truth.json`` (parameters keyed by the models' node
        names, countries with census / CDR, file names, design settings).
    """

    out_dir: Path
    paths: dict[str, Path]
    truth: dict[str, Any]

    def units(self) -> Any:
        """Read ``units.gpkg`` (layer ``units``) as a GeoDataFrame (``unit_id``, ``country``, geometry)."""
        import geopandas as gpd

        return gpd.read_file(self.paths["units"], layer="units", engine="pyogrio")

    def covariates(self) -> pd.DataFrame:
        """Read the unit covariates that generated the flows (``true_covariates.csv``), indexed by ``unit_id``."""
        return pd.read_csv(self.paths["true_covariates"], index_col="unit_id")

    def true_flows(self) -> pd.DataFrame:
        """Long table ``origin``, ``destination``, ``mu`` (expected 5-year flow), ``flow`` (realised)."""
        return pd.read_csv(self.paths["true_flows"])

    def rasters(self) -> dict[str, Path]:
        """Covariate name -> raster path, ready for ``zonal_covariates(units, world.rasters())``."""
        return {name: self.paths[name] for name in ("population", "built_up", "night_lights")}

    def describe(self) -> str:
        """Summarise the world in a few lines: size, countries, census / CDR coverage, flow level, files."""
        t = self.truth
        flows = self.true_flows()
        lines = [
            f"simulated world in {self.out_dir} (seed {t['seed']})",
            f"  {t['n_units']} units in {len(t['countries'])} countries: {', '.join(t['countries'])}",
            f"  census ({t['sample_fraction']:.0%} sample): {', '.join(t['census_countries']) or '-'}",
            f"  CDR ({len(t['cdr_periods'])} months): {', '.join(t['cdr_countries']) or '-'}",
            f"  true 5-year flows: total {flows['mu'].sum():,.0f}, median pair {flows['mu'].median():,.1f}, "
            f"max pair {flows['mu'].max():,.0f}",
            "  files: " + ", ".join(sorted(p.name for p in self.paths.values())),
        ]
        return "\n".join(lines)


def load_world(out_dir: str | os.PathLike[str]) -> SimulatedWorld:
    """Open a world written by :func:`simulate_world` (reads ``truth.json``).

    Raises
    ------
    InputFileError
        When ``out_dir`` holds no ``truth.json``.
    """
    from flowmodel.exceptions import InputFileError

    out = Path(out_dir)
    truth_path = out / FILES["truth"]
    if not truth_path.exists():
        raise InputFileError(
            f"{truth_path}: no truth.json, so {out} is not a simulated world. "
            "Fix: run flowmodel.simulate.simulate_world(out_dir) first."
        )
    truth = json.loads(truth_path.read_text())
    paths = {role: out / name for role, name in truth["files"].items()}
    return SimulatedWorld(out_dir=out, paths=paths, truth=truth)


# ------------------------------------------------------------------------- geometry
def _outline(rng: np.random.Generator, bbox: tuple[float, float, float, float]) -> Any:
    """Draw an irregular, star-shaped land outline filling most of ``bbox``."""
    import shapely

    lon0, lat0, lon1, lat1 = bbox
    cx, cy = (lon0 + lon1) / 2, (lat0 + lat1) / 2
    rx, ry = 0.46 * (lon1 - lon0), 0.46 * (lat1 - lat0)
    theta = np.linspace(0, 2 * np.pi, 181)[:-1]
    radius = np.ones_like(theta)
    for k in range(2, 7):
        radius += rng.normal(0, 0.1 / np.sqrt(k - 1)) * np.cos(
            k * theta + rng.uniform(0, 2 * np.pi)
        )
    radius = radius / radius.max()
    return shapely.Polygon(
        np.column_stack([cx + rx * radius * np.cos(theta), cy + ry * radius * np.sin(theta)])
    )


def _voronoi_units(
    rng: np.random.Generator, outline: Any, n_units: int, lloyd_iterations: int = 3
) -> Any:
    """Voronoi cells of ``n_units`` random seeds inside ``outline``, Lloyd-relaxed, clipped."""
    import shapely

    minx, miny, maxx, maxy = outline.bounds
    points = np.empty((0, 2))
    while len(points) < n_units:
        cand = np.column_stack(
            [rng.uniform(minx, maxx, 4 * n_units), rng.uniform(miny, maxy, 4 * n_units)]
        )
        points = np.vstack([points, cand[shapely.contains_xy(outline, cand[:, 0], cand[:, 1])]])
    points = points[:n_units]
    extent = shapely.box(minx - 5, miny - 5, maxx + 5, maxy + 5)
    cells = None
    for _ in range(lloyd_iterations + 1):
        regions = shapely.voronoi_polygons(
            shapely.MultiPoint(points), extend_to=extent, ordered=True
        )
        cells = shapely.intersection(np.asarray(shapely.get_parts(regions)), outline)
        points = shapely.get_coordinates(shapely.centroid(cells))
    cells = shapely.set_precision(cells, 1e-7)
    return cells


def _adjacency(cells: Any) -> np.ndarray:
    """Boolean (n, n): the two cells share a border of positive length."""
    import shapely

    n = len(cells)
    tree = shapely.STRtree(cells)
    left, right = tree.query(cells, predicate="intersects")
    keep = left < right
    left, right = left[keep], right[keep]
    shared = shapely.length(
        shapely.intersection(shapely.boundary(cells[left]), shapely.boundary(cells[right]))
    )
    adj = np.zeros((n, n), dtype=bool)
    ok = shared > 1e-6
    adj[left[ok], right[ok]] = True
    adj[right[ok], left[ok]] = True
    return adj


def _grow_countries(
    rng: np.random.Generator, centres: np.ndarray, adj: np.ndarray, n_countries: int
) -> np.ndarray:
    """Assign units to ``n_countries`` contiguous countries by balanced region growing."""
    n = len(centres)
    # well-spread country seeds: farthest-point sampling from a random unit
    seeds = [int(rng.integers(n))]
    d2 = ((centres - centres[seeds[0]]) ** 2).sum(axis=1)
    for _ in range(1, n_countries):
        seeds.append(int(np.argmax(d2)))
        d2 = np.minimum(d2, ((centres - centres[seeds[-1]]) ** 2).sum(axis=1))
    label = np.full(n, -1)
    label[seeds] = np.arange(n_countries)
    sizes = np.ones(n_countries)
    touches = adj[seeds].copy()  # (country, unit): the unit borders the country
    for _ in range(n - n_countries):
        progressed = False
        for k in np.argsort(sizes, kind="stable"):
            frontier = np.flatnonzero((label < 0) & touches[k])
            if len(frontier):
                # grow towards the unit nearest to the country's seed (compact countries)
                dist = ((centres[frontier] - centres[seeds[k]]) ** 2).sum(axis=1)
                pick = frontier[
                    np.argsort(dist + rng.uniform(0, dist.mean() + 1e-9, len(dist)))[0]
                ]
                label[pick] = k
                touches[k] |= adj[pick]
                sizes[k] += 1
                progressed = True
                break
        if not progressed:  # an island unit with no neighbour: join the nearest country
            lone = np.flatnonzero(label < 0)[0]
            owned = np.flatnonzero(label >= 0)
            k = label[owned[np.argmin(((centres[owned] - centres[lone]) ** 2).sum(axis=1))]]
            label[lone] = k
            touches[k] |= adj[lone]
    return label


# -------------------------------------------------------------------------- rasters
@dataclass
class _Landscape:
    """Continuous fields of the world, evaluated anywhere in lon/lat."""

    towns: np.ndarray  # (k, 4): lon, lat, population, sigma_km
    waves: np.ndarray  # (m, 4): kx, ky, phase, amplitude (rural density, log scale)
    rural_log_density: float
    land: Any  # shapely polygon, valid pixels
    lake: Any  # shapely polygon, nodata inside land

    def density(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """People per km² at the points."""
        field = np.zeros_like(lon, dtype=float)
        for kx, ky, phase, amp in self.waves:
            field += amp * np.cos(kx * lon + ky * lat + phase)
        dens = np.exp(self.rural_log_density + field)
        coslat = np.cos(np.deg2rad(lat))
        for tlon, tlat, size, sigma in self.towns:
            dx = (lon - tlon) * _KM_PER_DEG_LON * coslat
            dy = (lat - tlat) * _KM_PER_DEG_LAT
            r2 = dx * dx + dy * dy
            near = r2 < (6 * sigma) ** 2
            dens[near] += size / (2 * np.pi * sigma**2) * np.exp(-r2[near] / (2 * sigma**2))
        return dens

    def valid(self, lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
        """Whether the points hold data (on land, outside the lake)."""
        import shapely

        return shapely.contains_xy(self.land, lon, lat) & ~shapely.contains_xy(self.lake, lon, lat)


def _landscape(
    rng: np.random.Generator,
    outline: Any,
    cells: Any,
    label: np.ndarray,
    n_countries: int,
    n_towns: int,
) -> _Landscape:
    import shapely

    minx, miny, maxx, maxy = outline.bounds
    waves = np.column_stack(
        [
            rng.normal(0, 0.9, 8),
            rng.normal(0, 0.9, 8),
            rng.uniform(0, 2 * np.pi, 8),
            rng.uniform(0.15, 0.45, 8),
        ]
    )
    # a capital per country (at a random unit of the country) and Zipf-sized towns
    towns = []
    for k in range(n_countries):
        members = np.flatnonzero(label == k)
        where = shapely.get_coordinates(shapely.point_on_surface(cells[rng.choice(members)]))[0]
        towns.append((where[0], where[1], float(rng.uniform(1.5e6, 4e6))))
    placed = 0
    while placed < n_towns:
        x, y = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
        if shapely.contains_xy(outline, x, y):
            towns.append((x, y, float(min(8e5, 2e4 * (rng.pareto(1.1) + 1)))))
            placed += 1
    towns_arr = np.array(towns)
    sigma = 3.0 + 9.0 * np.sqrt(towns_arr[:, 2] / 1e6)
    towns_arr = np.column_stack([towns_arr, sigma])
    # a lake inside the outline, away from the border
    inner = outline.buffer(-1.2)
    if inner.is_empty:
        inner = outline
    ix0, iy0, ix1, iy1 = inner.bounds
    while True:
        lx, ly = rng.uniform(ix0, ix1), rng.uniform(iy0, iy1)
        if shapely.contains_xy(inner, lx, ly):
            break
    # an ellipse (axes 1 : 0.7) of 0.6 x the mean unit area, so no unit lies wholly in it
    semi_axis = np.sqrt(0.6 * outline.area / len(cells) / (np.pi * 0.7))
    lake = shapely.affinity.scale(shapely.Point(lx, ly).buffer(semi_axis, quad_segs=16), 1.0, 0.7)
    lake = shapely.affinity.rotate(lake, float(rng.uniform(0, 180)))
    return _Landscape(
        towns=towns_arr,
        waves=waves,
        rural_log_density=float(np.log(40.0)),
        land=outline.buffer(0.25),
        lake=lake,
    )


def _grid(bounds: tuple[float, float, float, float], size: int) -> tuple[Any, int, int]:
    """Affine transform and shape of a north-up grid over ``bounds``, ``size`` pixels on the long side."""
    from rasterio.transform import from_origin

    x0, y0, x1, y1 = bounds
    res = max(x1 - x0, y1 - y0) / size
    width = int(np.ceil((x1 - x0) / res))
    height = int(np.ceil((y1 - y0) / res))
    return from_origin(x0, y1, res, res), width, height


def _pixel_centres(transform: Any, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    cols, rows = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    x = transform.c + cols * transform.a
    y = transform.f + rows * transform.e
    return x, y


def _write_geotiff(
    path: Path, data: np.ndarray, transform: Any, crs: str, nodata: float, description: str
) -> None:
    import rasterio

    from flowmodel.atomic import atomic_path

    profile = {
        "driver": "GTiff",
        "dtype": "float32",
        "count": 1,
        "width": data.shape[1],
        "height": data.shape[0],
        "crs": crs,
        "transform": transform,
        "nodata": nodata,
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
        "compress": "deflate",
        "predictor": 3,
    }
    with atomic_path(path) as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data.astype(np.float32), 1)
        dst.set_band_description(1, description)
        dst.update_tags(generator="flowmodel.simulate.simulate_world")


def _write_rasters(
    rng: np.random.Generator,
    out: Path,
    scape: _Landscape,
    bounds: tuple[float, float, float, float],
    size: int,
    unit_income: np.ndarray,
    cells: Any,
) -> tuple[dict[str, Path], np.ndarray, Any, np.ndarray]:
    """Write the three GeoTIFFs.

    Returns the paths, the people per pixel of the population grid (0 on
    nodata), that grid's transform and the 1-based unit index of its pixels.
    """
    from pyproj import Transformer
    from rasterio.features import rasterize

    paths = {}
    # population: people per pixel, lon/lat grid
    transform, width, height = _grid(bounds, size)
    lon, lat = _pixel_centres(transform, width, height)
    area_km2 = (
        abs(transform.a * transform.e)
        * _KM_PER_DEG_LON
        * _KM_PER_DEG_LAT
        * np.cos(np.deg2rad(lat))
    )
    density = scape.density(lon, lat)
    people = density * area_km2 * rng.lognormal(0.0, 0.25, density.shape)
    valid = scape.valid(lon, lat)
    pop = np.where(valid, people, RASTER_NODATA["population"])
    paths["population"] = out / FILES["population"]
    _write_geotiff(
        paths["population"],
        pop,
        transform,
        RASTER_CRS["population"],
        RASTER_NODATA["population"],
        "population (persons per pixel)",
    )
    # night lights: radiance grows faster than population, scaled by country income; dark
    # rural pixels hold only sensor noise
    unit_index = rasterize(
        ((geom, k + 1) for k, geom in enumerate(cells)),
        out_shape=(height, width),
        transform=transform,
        fill=0,
        dtype="int32",
    )  # 1-based unit index of each pixel centre, 0 outside every unit
    income = np.concatenate([[1.0], unit_income])[unit_index]
    lit = np.maximum(people - 40.0, 0.0) ** 1.15 * income
    radiance = 0.5 * lit * rng.lognormal(0.0, 0.3, lit.shape) + rng.exponential(0.3, lit.shape)
    paths["night_lights"] = out / FILES["night_lights"]
    _write_geotiff(
        paths["night_lights"],
        np.where(valid, radiance, RASTER_NODATA["night_lights"]),
        transform,
        RASTER_CRS["night_lights"],
        RASTER_NODATA["night_lights"],
        "night-time radiance (arbitrary units per pixel)",
    )
    # built-up share in UTM 36S: logistic in log density, evaluated at the UTM pixel centres
    to_utm = Transformer.from_crs("EPSG:4326", RASTER_CRS["built_up"], always_xy=True)
    to_ll = Transformer.from_crs(RASTER_CRS["built_up"], "EPSG:4326", always_xy=True)
    x0, y0, x1, y1 = to_utm.transform_bounds(*bounds)
    utm_transform, uw, uh = _grid((x0, y0, x1, y1), size)
    ux, uy = _pixel_centres(utm_transform, uw, uh)
    ulon, ulat = to_ll.transform(ux, uy)
    udens = scape.density(ulon, ulat)
    share = 0.85 / (1.0 + np.exp(-(np.log(udens) - np.log(600.0)) / 0.7)) + rng.normal(
        0, 0.02, udens.shape
    )
    share = np.clip(share, 0.0, 1.0)
    paths["built_up"] = out / FILES["built_up"]
    _write_geotiff(
        paths["built_up"],
        np.where(scape.valid(ulon, ulat), share, RASTER_NODATA["built_up"]),
        utm_transform,
        RASTER_CRS["built_up"],
        RASTER_NODATA["built_up"],
        "built-up share of the pixel (0-1)",
    )
    return paths, np.where(valid, people, 0.0), transform, unit_index


# ---------------------------------------------------------------------------- flows
def _negbin(rng: np.random.Generator, mean: np.ndarray, phi: float) -> np.ndarray:
    """Negative-binomial draws with mean ``mean`` and variance mean + mean²/phi (gamma-Poisson)."""
    mean = np.nan_to_num(np.asarray(mean, dtype=float))
    lam = rng.gamma(phi, np.where(mean > 0, mean, 1.0) / phi) * (mean > 0)
    return rng.poisson(lam)


def _unit_terms(cov: pd.DataFrame, beta: Mapping[str, float]) -> pd.DataFrame:
    """Add ``log_<var>`` columns needed by the ``beta`` terms."""
    table = cov.copy()
    for term in beta:
        if ":" in term:
            var = term.split(":", 1)[1]
            if var not in table.columns and var.startswith("log_") and var[4:] in table.columns:
                table[var] = np.log(table[var[4:]].astype(float))
    return table


def _resolve_countries(
    spec: int | Sequence[str], codes: list[str], name: str, offset: int
) -> list[str]:
    if isinstance(spec, int | np.integer):
        if not 0 <= spec <= len(codes):
            raise ValueError(f"{name}={spec}: must be between 0 and n_countries={len(codes)}")
        start = min(offset, len(codes) - int(spec))
        return codes[start : start + int(spec)]
    chosen = [str(c) for c in spec]
    unknown = sorted(set(chosen) - set(codes))
    if unknown:
        raise ValueError(f"{name}: unknown country code(s) {unknown}; the world has {codes}")
    return chosen


def _csv(df: pd.DataFrame, path: Path) -> None:
    from flowmodel.atomic import atomic_path

    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, lineterminator="\n")


def _report(progress: Callable[[str], None] | bool | None, message: str) -> None:
    if progress is True:
        print(f"[simulate_world] {message}", file=sys.stderr, flush=True)
    elif callable(progress):
        progress(message)


def simulate_world(
    out_dir: str | os.PathLike[str],
    *,
    n_countries: int = 6,
    n_units: int = 120,
    seed: int = 0,
    census_countries: int | Sequence[str] = 2,
    cdr_countries: int | Sequence[str] = 3,
    sample_fraction: float = 0.1,
    n_subscribers: int | None = None,
    n_periods: int = 3,
    truth: Mapping[str, Any] | None = None,
    raster_size: int = 600,
    n_towns: int | None = None,
    census_stayer_fraction: float = 0.02,
    census_universe: str = "destination",
    census_previous_level: str = "unit",
    census_immigrant_level: str = "country",
    cdr_scale: float = 0.25,
    cdr_activity: float | None = None,
    persons_per_tower: float = 40_000.0,
    start: str = "2024-01-01",
    bbox: tuple[float, float, float, float] = WORLD_BBOX,
    progress: Callable[[str], None] | bool | None = None,
) -> SimulatedWorld:
    """Write a simulated world to ``out_dir`` and return its paths and truth.

    The world: ``n_units`` Voronoi cells inside an irregular outline in East
    Africa (EPSG:4326), grouped into ``n_countries`` contiguous countries that
    share borders; population, built-up and night-light GeoTIFFs with a lake
    and an ocean of nodata; true 5-year flows from :func:`gravity_log_rate`
    applied to the zonal statistics of the written rasters
    (:func:`flowmodel.inputs.rasters.zonal_covariates`); a census sample in
    ``census_countries`` countries and CDR events in ``cdr_countries``
    countries (one shared with the census). ``docs/simulated_world.md``
    documents every file, column and generating rule.

    Parameters
    ----------
    out_dir
        Folder to write into (created; existing files of the world are replaced
        atomically).
    n_countries, n_units
        Size of the world.
    seed
        Seed of every random draw: the same seed and arguments give
        byte-identical CSV, GeoTIFF and Parquet files. Each stage (geometry,
        rasters, flows, census, CDR) draws from its own stream, so e.g. a
        different ``n_subscribers`` leaves the rasters and flows unchanged.
    census_countries, cdr_countries
        How many countries have a census sample / CDR, or their codes. With
        counts, the census takes the first countries (west to east) and the
        CDR starts at the last census country, so one country has both.
    sample_fraction
        Census sampling fraction of movers (person weight ≈ 1 / fraction).
    n_subscribers
        Subscribers in the CDR panel (movers plus a sample of stayers); sizes
        ``cdr_events.parquet`` (about 70 events per subscriber over 3 months).
        Default ``max(SUBSCRIBERS_PER_CDR_UNIT x CDR units, 1.5 x movers)``
        (about 20 000 in the default world).
    n_periods
        Months of CDR events; relocations are counted between consecutive
        months, labelled by the later month (``n_periods - 1`` CDR periods).
    truth
        Generating parameters (``intercept``, ``beta``, ``sigma_country``,
        ``phi``); default :data:`WORLD_TRUTH` (the terms and values of
        :data:`DEFAULT_TRUTH` with a realistic flow level).
    raster_size
        Pixels on the long side of each raster.
    n_towns
        Towns besides one capital per country; default ``min(n_units // 2, 300)``.
    census_stayer_fraction
        Stayers (previous unit == current unit) enter the person sample at
        ``sample_fraction * census_stayer_fraction`` and carry the matching
        larger weight.
    census_universe
        Whom the census enumerates (:func:`flowmodel.inputs.census.census_universe`):
        ``"destination"`` (default) — everyone living in a census country,
        in-migrants from abroad included, so the census observes cross-border
        flows into its countries; ``"within"`` — movers within one census
        country only (a census of internal migration).
    census_previous_level
        How precisely the census records an internal mover's residence five years
        ago: ``"unit"`` (default; ``census_od.csv`` is unit x unit) or
        ``"admin1"`` (the previous admin-1 region only, as many censuses record
        it: ``census_od.csv`` is previous admin-1 x current unit, for movers
        between admin-1 regions; a move within a region is not seen).
    census_immigrant_level
        How the census records the previous residence of people who lived
        abroad: ``"country"`` (default, as real censuses do: the previous
        country, in ``census_immigrants.csv`` = previous country x current
        unit) or ``"unit"`` (the previous unit, in ``census_od.csv``; an
        unrealistic form kept for comparisons).
    cdr_scale
        Share of the operator's relocating subscribers that the panel holds;
        folded into ``period_effect``.
    cdr_activity
        Median number of nights a month on which a subscriber has at least one
        night-time event (about :data:`DEFAULT_CDR_ACTIVITY` = 10.3 when None).
        A number scales every subscriber's daily activity by
        ``cdr_activity / DEFAULT_CDR_ACTIVITY`` (capped at every day), e.g. 4 for a
        sparse log of one operator whose median subscriber calls on 4 nights a
        month; recorded as ``cdr_activity`` in ``truth.json``. None (default)
        leaves the world byte-identical to earlier versions.
    persons_per_tower
        Residents per cell tower (towers are placed where people live).
    start
        First day of the first CDR month (ISO date; months are local calendar
        months, timestamps are written in UTC).
    bbox
        Region (lon_min, lat_min, lon_max, lat_max) in degrees.
    progress
        ``True`` to print stage messages to stderr, or a callable receiving
        each message.

    Returns
    -------
    SimulatedWorld
        Paths of the written files and the truth (also in ``truth.json``).

    Raises
    ------
    ValueError
        Impossible sizes, a sample fraction outside (0, 1], unknown country
        codes, or ``n_subscribers`` too small for the relocating subscribers.

    Examples
    --------
    >>> world = simulate_world("sim", seed=0)  # doctest: +SKIP
    >>> world.truth["beta"]["log_distance"]  # doctest: +SKIP
    -1.4
    """
    import geopandas as gpd
    import shapely

    from flowmodel.atomic import atomic_path
    from flowmodel.inputs.rasters import zonal_covariates
    from flowmodel.pairs import contiguity, geodesic_distance_km

    if n_countries < 1 or n_units < max(2, n_countries):
        raise ValueError(
            f"need n_countries >= 1 and n_units >= max(2, n_countries); got {n_countries}, {n_units}"
        )
    if not 0 < sample_fraction <= 1:
        raise ValueError(f"sample_fraction={sample_fraction}: must be in (0, 1]")
    if n_periods < 2:
        raise ValueError(f"n_periods={n_periods}: CDR relocations need at least 2 months")
    if cdr_activity is not None and not 0 < cdr_activity <= 20:
        raise ValueError(
            f"cdr_activity={cdr_activity}: the median active nights a month must be in (0, 20]"
        )
    if census_universe not in ("within", "destination"):
        raise ValueError(f"census_universe={census_universe!r}: must be 'within' or 'destination'")
    if census_previous_level not in ("unit", "admin1"):
        raise ValueError(
            f"census_previous_level={census_previous_level!r}: must be 'unit' or 'admin1'"
        )
    if census_immigrant_level not in ("country", "unit"):
        raise ValueError(
            f"census_immigrant_level={census_immigrant_level!r}: must be 'country' or 'unit'"
        )
    codes_all = list(COUNTRY_CODES) + [
        f"X{a}{b}" for a in "MNOPQRSTUVWYZ" for b in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    ]
    codes = codes_all[:n_countries]
    census_codes = _resolve_countries(census_countries, codes, "census_countries", 0)
    cdr_codes = _resolve_countries(
        cdr_countries, codes, "cdr_countries", max(len(census_codes) - 1, 0)
    )
    truth_in = dict(WORLD_TRUTH if truth is None else truth)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {role: out / name for role, name in FILES.items()}
    # one stream per stage; spawn(6)[:5] equals spawn(5), so adding a stage changes no other
    geo_rng, raster_rng, flow_rng, census_rng, cdr_rng, admin_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)
    )

    # --- geometry: units and contiguous countries
    _report(progress, f"geometry: {n_units} units in {n_countries} countries")
    outline = _outline(geo_rng, bbox)
    cells = _voronoi_units(geo_rng, outline, n_units)
    adj = _adjacency(cells)
    centres = shapely.get_coordinates(shapely.centroid(cells))
    label = _grow_countries(geo_rng, centres, adj, n_countries)
    # codes west to east; unit ids numbered north to south within each country
    west_east = np.argsort(
        [centres[label == k, 0].mean() for k in range(n_countries)], kind="stable"
    )
    rank = np.empty(n_countries, dtype=int)
    rank[west_east] = np.arange(n_countries)
    country_of = np.array(codes_all[:n_countries])[rank[label]]
    order = np.lexsort((centres[:, 0], -centres[:, 1], country_of))
    cells, adj, centres, country_of, label = (
        cells[order], adj[np.ix_(order, order)], centres[order], country_of[order], rank[label[order]],
    )  # fmt: skip
    ids = np.empty(n_units, dtype=object)
    for code in np.unique(country_of):
        members = np.flatnonzero(country_of == code)
        ids[members] = [f"{code}{j + 1:03d}" for j in range(len(members))]
    ids = ids.astype(str)
    admin1 = _admin1_regions(admin_rng, centres, country_of)
    units = gpd.GeoDataFrame(
        {"unit_id": ids, "country": country_of, "admin1": admin1},
        geometry=list(cells),
        crs="EPSG:4326",
    )
    with atomic_path(paths["units"]) as tmp:
        units.to_file(tmp, layer="units", driver="GPKG", engine="pyogrio")
    # from here on, the units as every reader sees them (the GeoPackage round trip can
    # reorder ring vertices, which moves reprojected zonal statistics in the 7th digit)
    units = gpd.read_file(paths["units"], layer="units", engine="pyogrio")

    # --- rasters
    _report(progress, f"rasters: {raster_size} pixels on the long side")
    country_income = np.exp(raster_rng.normal(0.0, 0.45, n_countries))
    unit_income = country_income[label] * np.exp(raster_rng.normal(0.0, 0.15, n_units))
    scape = _landscape(
        raster_rng,
        outline,
        cells,
        label,
        n_countries,
        min(n_units // 2, 300) if n_towns is None else n_towns,
    )
    raster_bounds = tuple(np.round(scape.land.bounds, 2) + np.array([-0.05, -0.05, 0.05, 0.05]))
    raster_paths, people, pop_transform, unit_index = _write_rasters(
        raster_rng, out, scape, raster_bounds, raster_size, unit_income, cells
    )

    # --- covariates = zonal statistics of the written rasters
    _report(progress, "zonal statistics of the written rasters")
    cov = zonal_covariates(
        units,
        {name: raster_paths[name] for name in ("population", "built_up", "night_lights")},
        progress=progress is True,
    )
    cov = cov.reindex(ids)
    cov.index.name = "unit_id"
    if cov["population"].isna().any() or (cov["population"] <= 0).any():
        bad = cov.index[~(cov["population"] > 0)].tolist()
        raise RuntimeError(f"simulated units without population: {bad}; try another seed")
    table = cov.copy()
    table.insert(0, "country", country_of)
    _csv(table.reset_index(), paths["true_covariates"])

    # --- true flows
    _report(progress, "true flows")
    beta = dict(truth_in["beta"])
    unit_table = _unit_terms(cov, beta)
    distance = geodesic_distance_km(cov["lon"].to_numpy(), cov["lat"].to_numpy())
    np.fill_diagonal(distance, np.nan)
    pair = {
        "distance_km": distance,
        "cross_border": (country_of[:, None] != country_of[None, :]).astype(float),
        "contiguous": contiguity(units).astype(float),
    }
    effects = flow_rng.normal(0.0, truth_in["sigma_country"], n_countries)
    eta = gravity_log_rate(unit_table, pair, truth_in, effects[label])
    mu = np.exp(eta)
    phi = float(truth_in["phi"])
    flow = _negbin(flow_rng, mu, phi)
    off = ~np.eye(n_units, dtype=bool)
    o_idx, d_idx = np.nonzero(off)
    _csv(
        pd.DataFrame(
            {
                "origin": ids[o_idx],
                "destination": ids[d_idx],
                "mu": mu[o_idx, d_idx],
                "flow": flow[o_idx, d_idx],
            }
        ),
        paths["true_flows"],
    )
    # --- census
    _report(progress, f"census sample in {census_codes}")
    persons = _census_persons(
        census_rng,
        ids,
        country_of,
        census_codes,
        flow,
        cov["population"].to_numpy(),
        sample_fraction,
        census_stayer_fraction,
        census_universe,
    )
    od, immigrants, persons = _census_tables(
        persons,
        ids,
        country_of,
        admin1,
        census_codes,
        census_universe,
        census_previous_level,
        census_immigrant_level,
    )
    _csv(persons, paths["census_persons"])
    _csv(od, paths["census_od"])
    _csv(immigrants, paths["census_immigrants"])

    # --- CDR
    _report(progress, f"CDR events in {cdr_codes}")
    cdr = _simulate_cdr(
        cdr_rng, seed=seed, ids=ids, country_of=country_of, cdr_codes=cdr_codes, cells=cells, mu=mu, phi=phi,
        built_up=cov["built_up"].to_numpy() if "built_up" in cov else np.zeros(n_units),
        population=cov["population"].to_numpy(), people=people, transform=pop_transform,
        unit_index=unit_index, n_subscribers=n_subscribers, n_periods=n_periods, cdr_scale=cdr_scale,
        persons_per_tower=persons_per_tower, start=start, cdr_activity=cdr_activity,
    )  # fmt: skip
    _csv(cdr["towers"], paths["cdr_towers"])
    _csv(cdr["homes"], paths["true_cdr_homes"])
    _write_events(cdr["events"], paths["cdr_events"])

    # --- truth.json
    out_truth: dict[str, Any] = {
        "intercept": float(truth_in["intercept"]),
        "beta": {k: float(v) for k, v in beta.items()},
        "country_effect": dict(zip(codes, effects.tolist(), strict=True)),
        "sigma_country": float(truth_in["sigma_country"]),
        "phi": phi,
        "market_share": cdr["market_share"],
        "period_effect": cdr["period_effect"],
        "true_flows": FILES["true_flows"],
        "countries": codes,
        "census_countries": census_codes,
        "cdr_countries": cdr_codes,
        "sample_fraction": float(sample_fraction),
        "census_stayer_fraction": float(census_stayer_fraction),
        "census_universe": census_universe,
        "census_previous_level": census_previous_level,
        "census_immigrant_level": census_immigrant_level,
        "admin1": dict(zip(ids.tolist(), admin1.tolist(), strict=True)),
        "census_suppression": {"below": 5, "written_as": "<5", "min": 1, "max": 4},
        "cdr_periods": cdr["months"],
        "cdr_scale": float(cdr_scale),
        "n_subscribers": int(cdr["n_subscribers"]),
        "n_cdr_movers": int(cdr["n_movers"]),
        "n_cdr_events": len(cdr["events"]["timestamp"]),
        **({} if cdr_activity is None else {"cdr_activity": float(cdr_activity)}),
        "utc_offset_hours": UTC_OFFSET_HOURS,
        "timezone": TIMEZONE,
        "night_hours_local": list(NIGHT_HOURS),
        "day_hours_local": list(DAY_HOURS),
        "flow_years": FLOW_YEARS,
        "country_income": dict(zip(codes, country_income.tolist(), strict=True)),
        "rasters": {
            name: {"file": FILES[name], "crs": RASTER_CRS[name], "nodata": RASTER_NODATA[name]}
            for name in ("population", "built_up", "night_lights")
        },
        "n_units": int(n_units),
        "seed": int(seed),
        "bbox": list(bbox),
        "files": dict(FILES),
        "generator": "flowmodel.simulate.simulate_world",
        "world_version": WORLD_VERSION,
        "flowmodel_version": __version__,
    }
    with atomic_path(paths["truth"]) as tmp:
        tmp.write_text(json.dumps(out_truth, indent=2) + "\n")
    _report(progress, f"done: {out}")
    return SimulatedWorld(out_dir=out, paths=paths, truth=out_truth)


# --------------------------------------------------------------------------- census
def _census_persons(
    rng: np.random.Generator,
    ids: np.ndarray,
    country_of: np.ndarray,
    census_codes: Sequence[str],
    flow: np.ndarray,
    population: np.ndarray,
    sample_fraction: float,
    stayer_fraction: float,
    universe: str = "within",
) -> pd.DataFrame:
    """Person records: sampled movers into the census universe and a sample of stayers."""
    in_census = np.isin(country_of, census_codes)
    seen = _census_mask(country_of, census_codes, universe)
    movers = np.where(seen, rng.binomial(np.where(seen, flow, 0), sample_fraction), 0)
    o, d = np.nonzero(movers)
    reps = movers[o, d]
    prev_m, cur_m = np.repeat(o, reps), np.repeat(d, reps)
    # stayers: residents of a census unit who lived there five years ago
    stay_rate = sample_fraction * stayer_fraction
    inflow = flow.sum(axis=0)
    stay_units = np.flatnonzero(in_census)
    stay_n = rng.binomial(
        np.maximum(np.round(population[stay_units] - inflow[stay_units]), 0).astype(np.int64),
        stay_rate,
    )
    cur_s = np.repeat(stay_units, stay_n)
    n_m, n_s = len(cur_m), len(cur_s)
    weight = np.concatenate([np.full(n_m, 1.0 / sample_fraction), np.full(n_s, 1.0 / stay_rate)])
    weight = np.round(weight * np.exp(rng.normal(0.0, 0.05, n_m + n_s)), 3)
    age = np.concatenate(
        [
            np.minimum(15 + rng.gamma(2.0, 6.0, n_m), 90),
            np.minimum(5 + rng.exponential(20.0, n_s), 95),
        ]
    ).astype(int)
    sex = np.where(rng.random(n_m + n_s) < 0.5, "F", "M")
    current = np.concatenate([cur_m, cur_s])
    previous = np.concatenate([prev_m, cur_s])
    key = rng.random(n_m + n_s)
    order = np.lexsort((key, previous, current))
    return pd.DataFrame(
        {
            "person_id": np.arange(1, n_m + n_s + 1),
            "current_unit": ids[current[order]],
            "previous_unit": ids[previous[order]],
            "weight": weight[order],
            "age": age[order],
            "sex": sex[order],
        }
    )


def _census_mask(country_of: np.ndarray, census_codes: Sequence[str], universe: str) -> np.ndarray:
    """Origin x destination mask of the pairs the census observes (no diagonal)."""
    from flowmodel.inputs.census import census_universe

    ids = np.arange(len(country_of)).astype(str)
    pairs = census_universe(pd.Series(country_of, index=ids), census_codes, universe)
    mask = np.zeros((len(ids), len(ids)), dtype=bool)
    mask[pairs["origin"].astype(int), pairs["destination"].astype(int)] = True
    return mask


def _census_counts(table: pd.DataFrame, keys: Sequence[str]) -> pd.Series:
    return table.groupby(list(keys)).size()


def _suppress(n: np.ndarray) -> np.ndarray:
    """Print counts as the census does: 1-4 as "<5", zeros as 0."""
    n = np.asarray(n, dtype=np.int64)
    return np.where((n > 0) & (n < 5), "<5", n.astype(str))


def _census_tables(
    persons: pd.DataFrame,
    ids: np.ndarray,
    country_of: np.ndarray,
    admin1: np.ndarray,
    census_codes: Sequence[str],
    universe: str,
    previous_level: str,
    immigrant_level: str,
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Return the census's published tables and its person records, coded as the census codes them.

    Returns ``(census_od, census_immigrants, persons)``. Every cell of each table's
    universe is listed (zeros as 0, 1-4 as "<5"):

    - ``census_od``: internal movers, previous unit (or previous admin-1 region,
      movers between regions only) x current unit, within each census country;
      with ``immigrant_level="unit"`` also immigrants by previous unit;
    - ``census_immigrants``: previous country x current unit for everyone who lived
      in another country (``immigrant_level="country"``; empty otherwise);
    - person records with ``previous_country`` always, ``previous_admin1`` for
      residents of a census country five years ago, and ``previous_unit`` only
      where the census records it (stayers; internal movers at the unit level;
      immigrants with ``immigrant_level="unit"``).
    """
    unit_country = dict(zip(ids, country_of, strict=True))
    unit_admin1 = dict(zip(ids, admin1, strict=True))
    prev = persons["previous_unit"].to_numpy()
    cur = persons["current_unit"].to_numpy()
    prev_country = np.array([unit_country[u] for u in prev])
    cur_country = np.array([unit_country[u] for u in cur])
    abroad = prev_country != cur_country
    mover = prev != cur
    records = persons.copy()
    records["previous_country"] = prev_country
    records["previous_admin1"] = np.where(abroad, "", [unit_admin1[u] for u in prev])
    coded_unit = (
        ~mover | (~abroad & (previous_level == "unit")) | (abroad & (immigrant_level == "unit"))
    )
    records["previous_unit"] = np.where(coded_unit, prev, "")
    cols = ["person_id", "current_unit", "previous_unit", "previous_admin1", "previous_country"]
    records = records[cols + [c for c in persons.columns if c not in cols]]

    in_census = np.isin(country_of, list(census_codes))
    # internal movers (and, in the unit form, immigrants) by previous unit or admin-1
    if previous_level == "unit":
        mask = _census_mask(country_of, census_codes, "within")
        if immigrant_level == "unit" and universe == "destination":
            mask = _census_mask(country_of, census_codes, "destination")
        o, d = np.nonzero(mask)
        origins = ids[o]
        dests = ids[d]
        internal = mover & (~abroad | (immigrant_level == "unit"))
        counts = _census_counts(
            pd.DataFrame({"o": prev[internal], "d": cur[internal]}), ["o", "d"]
        )
    else:
        regions = sorted(set(admin1[in_census]))
        region_country = {a: unit_country[ids[np.flatnonzero(admin1 == a)[0]]] for a in regions}
        rows = [
            (a, u)
            for u in ids[in_census]
            for a in regions
            if region_country[a] == unit_country[u] and a != unit_admin1[u]
        ]
        origins = np.array([r[0] for r in rows], dtype=object)
        dests = np.array([r[1] for r in rows], dtype=object)
        between = mover & ~abroad
        prev_region = np.array([unit_admin1[u] for u in prev[between]])
        between_regions = prev_region != np.array([unit_admin1[u] for u in cur[between]])
        counts = _census_counts(
            pd.DataFrame({"o": prev_region[between_regions], "d": cur[between][between_regions]}),
            ["o", "d"],
        )
    n = counts.reindex(pd.MultiIndex.from_arrays([origins, dests]), fill_value=0).to_numpy()
    od = pd.DataFrame({"origin": origins, "destination": dests, "count": _suppress(n)})
    # immigrants by previous country (every other country of the world x census unit)
    imm_rows = []
    if immigrant_level == "country" and universe == "destination":
        codes = sorted(set(country_of))
        imm_rows = [(c, u) for u in ids[in_census] for c in codes if c != unit_country[u]]
    imm_o = np.array([r[0] for r in imm_rows], dtype=object)
    imm_d = np.array([r[1] for r in imm_rows], dtype=object)
    imm_counts = _census_counts(
        pd.DataFrame({"o": prev_country[abroad], "d": cur[abroad]}), ["o", "d"]
    )
    n_imm = (
        imm_counts.reindex(pd.MultiIndex.from_arrays([imm_o, imm_d]), fill_value=0).to_numpy()
        if imm_rows
        else np.zeros(0, dtype=np.int64)
    )
    immigrants = pd.DataFrame(
        {"origin": imm_o, "destination": imm_d, "count": _suppress(n_imm)}
    ).rename(columns={"origin": "previous_country", "destination": "current_unit"})
    return od, immigrants, records


def _admin1_regions(
    rng: np.random.Generator, centres: np.ndarray, country_of: np.ndarray
) -> np.ndarray:
    """Admin-1 regions: each country's units grouped around ``ceil(n / 5)`` seed units."""
    out = np.empty(len(country_of), dtype=object)
    for code in sorted(set(country_of)):
        members = np.flatnonzero(country_of == code)
        k = max(1, int(np.ceil(len(members) / 5)))
        seeds = rng.choice(members, size=k, replace=False)
        d = ((centres[members, None, :] - centres[None, seeds, :]) ** 2).sum(axis=2)
        nearest = np.argmin(d, axis=1)
        order = np.argsort([centres[s, 1] for s in seeds])[::-1]  # numbered north to south
        rank = np.empty(k, dtype=int)
        rank[order] = np.arange(k)
        out[members] = [f"{code}-R{rank[j] + 1}" for j in nearest]
    return out.astype(str)


# ------------------------------------------------------------------------------ CDR
def _simulate_cdr(
    rng: np.random.Generator,
    *,
    seed: int,
    ids: np.ndarray,
    country_of: np.ndarray,
    cdr_codes: Sequence[str],
    cells: Any,
    mu: np.ndarray,
    phi: float,
    built_up: np.ndarray,
    population: np.ndarray,
    people: np.ndarray,
    transform: Any,
    unit_index: np.ndarray,
    n_subscribers: int | None,
    n_periods: int,
    cdr_scale: float,
    persons_per_tower: float,
    start: str,
    cdr_activity: float | None = None,
) -> dict[str, Any]:
    """Towers, market shares, period effects, subscriber homes per month and raw events."""
    import shapely

    n_units = len(ids)
    cdr_units = np.flatnonzero(np.isin(country_of, cdr_codes))
    months = pd.date_range(pd.Timestamp(start), periods=n_periods + 1, freq="MS")
    labels = [m.strftime("%Y-%m") for m in months[:-1]]
    days = np.diff(months.to_numpy()).astype("timedelta64[D]").astype(int)
    if len(cdr_units) == 0:
        empty = np.array([], dtype=str)
        return {
            "towers": pd.DataFrame({"cell_id": empty, "lon": [], "lat": []}),
            "homes": pd.DataFrame({"subscriber_id": empty, "period": empty, "unit_id": empty}),
            "events": {
                "subscriber_id": empty,
                "timestamp": np.array([], dtype=np.int64),
                "cell_id": empty,
            },
            "months": labels,
            "n_subscribers": 0,
            "n_movers": 0,
            "market_share": {},
            "period_effect": {},
        }

    # towers: Poisson in population, placed on populated pixels of their unit
    tower_unit, tower_x, tower_y = [], [], []
    flat_people = people.ravel()
    flat_index = unit_index.ravel()
    for k in cdr_units:
        n_t = 1 + rng.poisson(population[k] / persons_per_tower)
        pix = np.flatnonzero(flat_index == k + 1)
        if len(pix) == 0:
            pt = shapely.get_coordinates(shapely.point_on_surface(cells[k]))
            xs, ys = np.repeat(pt[:, 0], n_t), np.repeat(pt[:, 1], n_t)
        else:
            w = flat_people[pix] + 1e-9
            chosen = rng.choice(pix, size=n_t, p=w / w.sum())
            row, col = np.divmod(chosen, unit_index.shape[1])
            xs = transform.c + (col + rng.uniform(0.05, 0.95, n_t)) * transform.a
            ys = transform.f + (row + rng.uniform(0.05, 0.95, n_t)) * transform.e
            outside = ~shapely.contains_xy(cells[k], xs, ys)
            xs[outside] = transform.c + (col[outside] + 0.5) * transform.a
            ys[outside] = transform.f + (row[outside] + 0.5) * transform.e
            outside = ~shapely.contains_xy(cells[k], xs, ys)
            if outside.any():
                pt = shapely.get_coordinates(shapely.point_on_surface(cells[k]))[0]
                xs[outside], ys[outside] = pt
        tower_unit.append(np.full(n_t, k))
        tower_x.append(xs)
        tower_y.append(ys)
    tower_unit_arr = np.concatenate(tower_unit) if tower_unit else np.empty(0, dtype=int)
    n_towers = len(tower_unit_arr)
    cell_ids = np.array([f"CELL{t + 1:05d}" for t in range(n_towers)])
    towers = pd.DataFrame(
        {
            "cell_id": cell_ids,
            "lon": np.round(np.concatenate(tower_x), 6) if n_towers else [],
            "lat": np.round(np.concatenate(tower_y), 6) if n_towers else [],
        }
    )
    tower_start = np.searchsorted(tower_unit_arr, np.arange(n_units))
    tower_count = np.bincount(tower_unit_arr, minlength=n_units)

    # market share: pooled within country, higher in built-up units, always < 1
    share = np.zeros(n_units)
    z = (
        (built_up - built_up[cdr_units].mean()) / (built_up[cdr_units].std() + 1e-12)
        if len(cdr_units)
        else built_up
    )
    for code in cdr_codes:
        members = np.flatnonzero(country_of == code)
        centre = np.log(m := rng.uniform(0.25, 0.6)) - np.log(1 - m)
        logit = centre + 0.35 * z[members] + rng.normal(0.0, 0.25, len(members))
        share[members] = 1.0 / (1.0 + np.exp(-logit))
    # period effect: the month's share of the 5-year flow, a seasonal factor and the panel scale
    seasonal = np.exp(rng.normal(0.0, 0.15, n_periods - 1))
    period_effect = days[1:] / (365.25 * FLOW_YEARS) * seasonal * cdr_scale

    # movers between consecutive months, among units of the CDR countries
    sub = np.ix_(cdr_units, cdr_units)
    movers_o, movers_d, movers_t = [], [], []
    for t in range(n_periods - 1):
        mean = mu[sub] * share[cdr_units][:, None] * period_effect[t]
        np.fill_diagonal(mean, 0.0)
        counts = _negbin(rng, mean, phi)
        o, d = np.nonzero(counts)
        movers_o.append(np.repeat(cdr_units[o], counts[o, d]))
        movers_d.append(np.repeat(cdr_units[d], counts[o, d]))
        movers_t.append(np.full(counts.sum(), t + 1))
    mo, md, mt = np.concatenate(movers_o), np.concatenate(movers_d), np.concatenate(movers_t)
    n_movers = len(mo)
    if n_subscribers is None:
        n_subscribers = max(
            SUBSCRIBERS_PER_CDR_UNIT * len(cdr_units), int(np.ceil(1.5 * n_movers))
        )
    if n_movers > 0.8 * n_subscribers:
        raise ValueError(
            f"n_subscribers={n_subscribers} is too small for the {n_movers} relocating subscribers; "
            f"give n_subscribers >= {int(np.ceil(1.25 * n_movers))}, leave it None, or lower "
            f"cdr_scale={cdr_scale}"
        )
    weights = population[cdr_units] * share[cdr_units]
    stay = rng.multinomial(n_subscribers - n_movers, weights / weights.sum())
    home = np.empty((n_subscribers, n_periods), dtype=int)
    home[:n_movers] = np.where(
        np.arange(n_periods)[None, :] < mt[:, None], mo[:, None], md[:, None]
    )
    home[n_movers:] = np.repeat(cdr_units, stay)[:, None]
    home = home[rng.permutation(n_subscribers)]
    sub_ids = np.array(
        [
            hashlib.blake2b(f"flowmodel-sim:{seed}:{k}".encode(), digest_size=8).hexdigest()
            for k in range(n_subscribers)
        ]
    )
    homes = pd.DataFrame(
        {
            "subscriber_id": np.repeat(sub_ids, n_periods),
            "period": np.tile(labels, n_subscribers),
            "unit_id": ids[home.ravel()],
        }
    )

    # events: active days, night events mostly at the home tower, day events at a work tower
    unit_xy = shapely.get_coordinates(shapely.centroid(cells))
    near_arr = np.zeros((n_units, 6), dtype=int)  # each CDR unit and its 5 nearest CDR units
    for k in cdr_units:
        d2 = ((unit_xy[cdr_units] - unit_xy[k]) ** 2).sum(axis=1)
        nearest = cdr_units[np.argsort(d2, kind="stable")[:6]]
        near_arr[k] = np.concatenate([nearest, np.full(6 - len(nearest), k)])
    u_home, u_work, u_worktower = (
        rng.random(n_subscribers),
        rng.random(n_subscribers),
        rng.random(n_subscribers),
    )
    activity = rng.beta(4.0, 4.0, n_subscribers)  # share of days with any event
    if cdr_activity is not None:  # the same draws, scaled: None keeps the default world
        activity = np.minimum(activity * (cdr_activity / DEFAULT_CDR_ACTIVITY), 1.0)
    month_start = months[:-1].to_numpy().astype("datetime64[s]").astype(np.int64)
    sub_parts, time_parts, tower_parts = [], [], []
    for m in range(n_periods):
        n_days = int(days[m])
        active = rng.random((n_subscribers, n_days)) < activity[:, None]
        s_idx, day = np.nonzero(active)
        n_ev = 1 + rng.poisson(0.6, len(s_idx))
        s_idx, day = np.repeat(s_idx, n_ev), np.repeat(day, n_ev)
        n = len(s_idx)
        h = home[s_idx, m]
        home_tower = tower_start[h] + (u_home[s_idx] * tower_count[h]).astype(int)
        work_unit = np.where(
            u_work[s_idx] < 0.5, h, near_arr[h, (u_work[s_idx] * 12).astype(int) % 6]
        )
        work_tower = tower_start[work_unit] + (u_worktower[s_idx] * tower_count[work_unit]).astype(
            int
        )
        other_home = tower_start[h] + (rng.random(n) * tower_count[h]).astype(int)
        anywhere = rng.integers(0, max(n_towers, 1), n)
        night = rng.random(n) < 0.55
        u = rng.random(n)
        tower = np.where(
            night,
            np.where(u < 0.8, home_tower, np.where(u < 0.92, other_home, anywhere)),
            np.where(
                u < 0.5,
                work_tower,
                np.where(u < 0.8, home_tower, np.where(u < 0.9, other_home, anywhere)),
            ),
        )
        # night: from NIGHT_HOURS[0] to midnight, then from midnight to NIGHT_HOURS[1], same date
        before_midnight = (24 - NIGHT_HOURS[0]) * 3600
        offset = rng.uniform(0, before_midnight + NIGHT_HOURS[1] * 3600, n)
        night_sec = np.where(
            offset < before_midnight, NIGHT_HOURS[0] * 3600 + offset, offset - before_midnight
        )
        day_sec = DAY_HOURS[0] * 3600 + rng.uniform(0, (DAY_HOURS[1] - DAY_HOURS[0]) * 3600, n)
        local = day.astype(np.int64) * 86400 + np.where(night, night_sec, day_sec).astype(np.int64)
        sub_parts.append(s_idx)
        time_parts.append(month_start[m] + local - UTC_OFFSET_HOURS * 3600)
        tower_parts.append(tower)
    s_all, t_all, c_all = (
        np.concatenate(sub_parts),
        np.concatenate(time_parts),
        np.concatenate(tower_parts),
    )
    order = np.lexsort((c_all, s_all, t_all))
    events = {
        "subscriber_id": sub_ids[s_all[order]],
        "timestamp": t_all[order],
        "cell_id": cell_ids[c_all[order]],
    }
    return {
        "towers": towers,
        "homes": homes,
        "events": events,
        "months": labels,
        "n_subscribers": n_subscribers,
        "n_movers": n_movers,
        "market_share": {ids[k]: float(share[k]) for k in cdr_units},
        "period_effect": dict(zip(labels[1:], period_effect.tolist(), strict=True)),
    }


def _write_events(events: Mapping[str, np.ndarray], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flowmodel.atomic import atomic_path

    table = pa.table(
        {
            "subscriber_id": pa.array(events["subscriber_id"], type=pa.string()),
            "timestamp": pa.array(events["timestamp"], type=pa.timestamp("s", tz="UTC")),
            "cell_id": pa.array(events["cell_id"], type=pa.string()),
        }
    )
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", row_group_size=256_000)


# ------------------------------------------------------------- the in-memory fusion world
#: Generating parameters of the default fusion world (raw covariate scale).
#: The simulator's default gravity process, with a higher intercept (more moves).
FUSION_TRUTH: dict[str, Any] = {
    **DEFAULT_TRUTH,
    "beta": dict(DEFAULT_TRUTH["beta"]),
    "intercept": -6.0,
}


def _neg_binomial(rng: np.random.Generator, mean: np.ndarray, phi: float) -> np.ndarray:
    """Gamma-Poisson draws with mean ``mean`` and variance ``mean + mean**2 / phi``."""
    mean = np.nan_to_num(np.asarray(mean, dtype=float))
    return rng.poisson(rng.gamma(phi, mean / phi)).astype(float)


def _simulated_totals(
    ids: np.ndarray,
    y: np.ndarray,
    o: np.ndarray,
    d: np.ndarray,
    redacted: np.ndarray,
    redaction: float,
    period: str,
    in_cdr: np.ndarray,
) -> pd.DataFrame:
    """In/out totals of one simulated CDR period, redacted and protected like the operator's.

    The totals are summed before redaction and then go through the package's own
    rule (:func:`flowmodel.inputs.cdr.redact` and its complementary suppression), so
    the simulated operator releases exactly what :func:`flowmodel.inputs.cdr.cdr_flows`
    would.
    """
    import warnings

    from flowmodel.inputs.cdr import _protect_totals, redact

    counts = y[o, d]
    n = len(ids)
    table = pd.DataFrame(
        {
            "unit_id": ids[in_cdr],
            "period": period,
            "outflow": np.bincount(o, counts, minlength=n)[in_cdr],
            "inflow": np.bincount(d, counts, minlength=n)[in_cdr],
        }
    )
    if redaction < 0:  # no redaction at all: every total as it is
        return table
    threshold = int(redaction)
    flows = pd.DataFrame(
        {
            "origin": ids[o],
            "destination": ids[d],
            "period": period,
            "count": np.where(redacted, np.nan, counts),
            "max": np.where(redacted, float(threshold), np.nan),
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # thresholds below 15 are the caller's explicit choice
        for col in ("outflow", "inflow"):
            table = redact(
                table,
                column=col,
                max_column=f"{col}_max",
                threshold=threshold,
                allow_small_cells=True,
            )
        return _protect_totals(table, flows, threshold)


#: Length scale (degrees) of the regional component of :func:`simulate_fusion_dataset`'s
#: market shares (``market_share_spatial``): about a third of a country's 2-degree box.
SPATIAL_SHARE_LENGTH_DEG = 0.7


def _regional_field(
    lon: np.ndarray,
    lat: np.ndarray,
    country: np.ndarray,
    members: np.ndarray,
    sd: float,
    seed: int,
) -> np.ndarray:
    """Draw a smooth Gaussian field (sd ``sd``) over each country's ``members``, 0 elsewhere."""
    rng = np.random.default_rng([seed, 7])  # its own stream: the other draws are unchanged
    out = np.zeros(len(lon))
    for code in np.unique(country[members]):
        m = np.flatnonzero(members & (country == code))
        d2 = (lon[m, None] - lon[None, m]) ** 2 + (lat[m, None] - lat[None, m]) ** 2
        cov = sd**2 * np.exp(-0.5 * d2 / SPATIAL_SHARE_LENGTH_DEG**2) + 1e-9 * np.eye(len(m))
        out[m] = np.linalg.cholesky(cov) @ rng.standard_normal(len(m))
    return out


def _delaunay_neighbours(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """``(n, n)`` 0/1: neighbours in the Delaunay triangulation of the unit points.

    Two points are Delaunay neighbours when their Voronoi cells share an edge: the
    contiguity of the world's units, which are the Voronoi cells of the points.
    """
    from scipy.spatial import Delaunay

    n = len(lon)
    out = np.zeros((n, n))
    for tri in Delaunay(np.column_stack([lon, lat])).simplices:
        out[np.ix_(tri, tri)] = 1.0
    np.fill_diagonal(out, 0.0)
    return out


def simulate_fusion_dataset(
    *,
    units_per_country: int = 12,
    n_countries: int = 6,
    census_countries: Sequence[str] = ("C00", "C01"),
    cdr_countries: Sequence[str] = ("C01", "C02", "C03"),
    sample_fraction: float = 0.1,
    market_share: Mapping[str, float] | None = None,
    sigma_market_share: float = 0.4,
    market_share_spatial: float = 0.0,
    periods: Sequence[str] = ("2020Q1", "2020Q2"),
    log_period_effect: Sequence[float] = (0.15, -0.15),
    period_scale: float = 1.0,
    redaction: float = 15.0,
    totals: bool = False,
    truth: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[xr.Dataset, dict[str, Any]]:
    """Simulate a FlowDataset observed by a census sample and by redacted CDR, in memory.

    The default is the fusion design of the default world: 6 countries on a 2 x 3 grid
    (neighbours share borders), a census sample in 2 of them, CDR in 3 (one
    overlapping a census country) and nothing in the remaining 2. One latent
    gravity field (:func:`flowmodel.simulate.gravity_log_rate`) generates

    - the population flows ``Y_ij ~ NB(mu_ij, phi)`` (the truth to predict),
    - the census: for origins in a census country, every destination,
      ``y_ij ~ NB(mu_ij * f, phi)`` (binomial thinning of ``Y`` keeps ``phi``),
    - the CDR: within each CDR country, per period ``t``,
      ``y_ijt ~ NB(mu_ij * market_share_i * period_effect_t, phi)``, with every
      count ``<= redaction`` redacted (NaN, bound in ``flow_cdr_max``).

    Parameters
    ----------
    units_per_country, n_countries
        Size of the world (units are random points inside 2° x 2° country boxes).
    census_countries, cdr_countries
        Country codes (``C00``, ``C01``, ...) observed by each source.
    sample_fraction
        Census sampling fraction ``f`` (``exposure_census``).
    market_share
        Country code -> national market share of the operator; default
        0.45, 0.30, 0.55 for the CDR countries in order.
    sigma_market_share
        Sd of the unit-level logit market share around the national value.
    market_share_spatial
        Sd of a regional component of the logit market share that the penetration
        covariate does not show (an operator stronger in some regions of a country):
        a Gaussian field over each CDR country with squared-exponential correlation,
        length scale :data:`SPATIAL_SHARE_LENGTH_DEG`, drawn from its own random
        stream. When positive the dataset also carries ``contiguous``: the
        neighbours of the Delaunay triangulation of the unit points (the
        adjacency of their Voronoi cells). 0 (default) leaves the world
        unchanged.
    periods, log_period_effect
        CDR period labels and their log deviations (centred to sum to zero).
    period_scale
        CDR counts per latent flow beyond the market share (e.g. 1/60 for
        monthly relocations against 5-year flows); ``period_effect`` is
        ``period_scale * exp(deviation)``.
    redaction
        Largest count the operator suppresses (FlowKit: 15).
    totals
        Also release the operator's in/out totals (``cdr_outflow``,
        ``cdr_inflow``, dims ``unit``, ``period``; universe ``"within"``),
        summed before redaction, themselves redacted when ``<= redaction`` and
        suppressed (NaN, bound in ``cdr_<kind>_max``) when they would reveal
        the redacted cells (:func:`flowmodel.inputs.cdr._protect_totals`'s
        rule). Draws no random numbers: the world is the same either way.
    truth
        Generating gravity parameters (default :data:`FUSION_TRUTH`).
    seed
        Seed of every random draw.

    Returns
    -------
    (xarray.Dataset, dict)
        The FlowDataset (``flow_census``, ``exposure_census``, ``flow_cdr``,
        ``flow_cdr_max`` with a ``period`` dim, unit covariate
        ``cdr_subscribers_per_resident`` — a penetration measure biased by
        country (+0.2 ± 0.2 on the logit scale), around which the unit's
        market share scatters with sd 0.15; NaN outside CDR countries) and the truth: the models' node names plus
        ``country_effect`` (country -> value), ``market_share`` (Series over
        the units of CDR countries), ``period_effect`` (Series over periods),
        ``mu`` and ``flows`` (true expected and realised population flows,
        origin x destination), ``census_countries``, ``cdr_countries``,
        ``no_data_countries``.
    """
    from scipy.special import expit, logit

    from flowmodel.dataset import build_dataset, totals_to_dataset
    from flowmodel.exceptions import ModelConfigError

    rng = np.random.default_rng(seed)
    truth = dict(FUSION_TRUTH if truth is None else truth)
    codes = np.array([f"C{k:02d}" for k in range(n_countries)])
    unknown = sorted((set(census_countries) | set(cdr_countries)) - set(codes))
    if unknown:
        raise ModelConfigError(
            f"simulate_fusion_dataset: countries {unknown} do not exist; the world has "
            f"{codes.tolist()}. Fix: name countries C00..C{n_countries - 1:02d}."
        )
    n_units = n_countries * units_per_country
    k = np.repeat(np.arange(n_countries), units_per_country)
    n_cols = int(np.ceil(n_countries / 2))
    lon = 30.0 + 2.0 * (k % n_cols) + rng.uniform(0.0, 2.0, n_units)
    lat = -2.0 + 2.0 * (k // n_cols) + rng.uniform(0.0, 2.0, n_units)
    country = codes[k]
    log_pop = rng.normal(11.0, 1.0, n_units)
    income = rng.normal(0.0, 1.0, n_countries)[k] + rng.normal(0.0, 0.5, n_units)
    ids = np.array([f"U{i:03d}" for i in range(n_units)])
    unit = pd.DataFrame(
        {
            "unit_id": ids,
            "country": country,
            "population": np.round(np.exp(log_pop)),
            "lon": lon,
            "lat": lat,
            "night_lights_per_capita": np.exp(-3.0 + 0.3 * (log_pop - 11.0) + 0.5 * income),
        }
    ).set_index("unit_id")

    # penetration covariate per unit (CDR countries), biased by country; the operator's share
    # of the movers scatters around it (the model's share prior is centred on the
    # covariate; a share drawn first with the covariate measured from it makes the logit
    # link's curvature a spurious signal of the share's level, see docs/fusion.md)
    shares = dict(zip(cdr_countries, (0.45, 0.30, 0.55, 0.40, 0.35, 0.50), strict=False))
    shares.update(market_share or {})
    in_cdr = np.isin(country, list(cdr_countries))
    logit_share = np.full(n_units, np.nan)
    covariate = np.full(n_units, np.nan)
    for code in cdr_countries:
        m = country == code
        spread = rng.normal(0.0, sigma_market_share, m.sum())
        bias = rng.normal(0.2, 0.2)  # multi-SIM: subscribers per resident overstate penetration
        noise = rng.normal(0.0, 0.15, m.sum())
        covariate[m] = expit(logit(shares[code]) + bias + spread)
        logit_share[m] = logit(shares[code]) + spread - noise
    if market_share_spatial > 0:
        logit_share += _regional_field(lon, lat, country, in_cdr, market_share_spatial, seed)
    share = expit(logit_share)
    unit["cdr_subscribers_per_resident"] = covariate

    ds = build_dataset(unit.reset_index())
    unit["log_population"] = np.log(unit["population"])
    pair = {
        "distance_km": ds["distance_km"].values,
        "cross_border": ds["cross_border"].values.astype(float),
    }
    effects = rng.normal(0.0, truth["sigma_country"], n_countries)
    eta = gravity_log_rate(unit, pair, truth, effects[k])
    mu = np.exp(eta)
    phi = float(truth["phi"])
    off_diag = ~np.eye(n_units, dtype=bool)
    flows = np.where(off_diag, _neg_binomial(rng, mu, phi), np.nan)

    census = np.where(off_diag, _neg_binomial(rng, mu * sample_fraction, phi), np.nan)
    census[~np.isin(country, list(census_countries)), :] = np.nan

    log_pe = np.asarray(log_period_effect, dtype=float)[: len(periods)]
    log_pe = log_pe - log_pe.mean() + np.log(period_scale)
    same = (country[:, None] == country[None, :]) & off_diag & in_cdr[:, None]
    rows = []
    total_rows = []
    for t, period in enumerate(periods):
        mean_t = mu * np.nan_to_num(share)[:, None] * np.exp(log_pe[t])
        y = _neg_binomial(rng, mean_t, phi)
        o, d = np.nonzero(same)
        counts = y[o, d]
        redacted = counts <= redaction
        if totals:
            total_rows.append(_simulated_totals(ids, y, o, d, redacted, redaction, period, in_cdr))
        rows.append(
            pd.DataFrame(
                {
                    "origin": ids[o],
                    "destination": ids[d],
                    "period": period,
                    "count": np.where(redacted, np.nan, counts),
                    "max": np.where(redacted, redaction, np.nan),
                }
            )
        )
    o, d = np.nonzero(~np.isnan(census))
    census_table = pd.DataFrame({"origin": ids[o], "destination": ids[d], "count": census[o, d]})
    ds = build_dataset(
        unit.drop(columns="log_population").reset_index(),
        flows={"census": census_table, "cdr": pd.concat(rows, ignore_index=True)},
    )
    ds["exposure_census"] = ("unit", np.full(n_units, float(sample_fraction)))
    if market_share_spatial > 0:
        ds["contiguous"] = (("origin", "destination"), _delaunay_neighbours(lon, lat))
    if totals:
        ds = totals_to_dataset(ds, pd.concat(total_rows, ignore_index=True), universe="within")
    ds.attrs.update(simulated=1, seed=seed, redaction=redaction)
    coords = {"origin": ids, "destination": ids}
    out: dict[str, Any] = {
        **truth,
        "country_effect": dict(zip(codes.tolist(), effects.tolist(), strict=True)),
        "market_share": pd.Series(share[in_cdr], index=pd.Index(ids[in_cdr], name="unit")),
        "period_effect": pd.Series(np.exp(log_pe), index=pd.Index(list(periods), name="period")),
        "period_scale": float(period_scale),
        "mu": xr.DataArray(
            np.where(off_diag, mu, np.nan), dims=("origin", "destination"), coords=coords
        ),
        "flows": xr.DataArray(flows, dims=("origin", "destination"), coords=coords),
        "census_countries": list(census_countries),
        "cdr_countries": list(cdr_countries),
        "no_data_countries": sorted(set(codes) - set(census_countries) - set(cdr_countries)),
    }
    return ds, out


# ======================================================================== the panel
#: Generating parameters of :func:`simulate_panel_dataset`: gravity terms of the annual
#: rate of moves (raw scale), the temporal structure and the sources' factors.
PANEL_TRUTH: dict[str, Any] = {
    "intercept": -4.9,
    "beta": {
        "origin:log_population": 0.8,
        "destination:log_population": 0.7,
        "log_distance": -1.4,
        "cross_border": -1.5,
    },
    "sigma_country": 0.3,
    "phi": 5.0,
    "sigma_pair": 0.5,
    "sigma_trend": 0.05,
    "sigma_origin_trend": 0.03,
    "sigma_destination_trend": 0.03,
    "duration_census": 0.7,
    "period_scale": 3.0,
}


def simulate_panel_dataset(
    *,
    units_per_country: int = 12,
    n_countries: int = 3,
    periods: Sequence[str] = ("2005-2010", "2015-2020", "2020-2025"),
    census_rounds: Sequence[str] = ("2005-2010", "2015-2020"),
    census_1y: str | None = "2019-2020",
    cdr_months: Sequence[str] = ("2019-10", "2019-11", "2019-12", "2024-01", "2024-02", "2024-03"),
    cdr_countries: Sequence[str] = ("C01", "C02"),
    shock_country: str = "C01",
    shock_units: int = 4,
    shock: float = 2.0,
    sample_fraction: float = 0.1,
    redaction: float = 15.0,
    truth: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[xr.Dataset, dict[str, Any]]:
    r"""Simulate census rounds, a census one-year question and CDR months of a changing world.

    One latent field with periods generates everything: the annual rate of moves
    from unit ``i`` to ``j`` during latent period ``t`` is

    .. math::

        \eta_{ijt} = \alpha + \gamma_{c(i)} + \beta \cdot x_{ijt} + u_{ij}
            + \tau_{c(i),t} + o_{i,t} + d_{j,t} + s_{it}

    with populations given at 2000 and 2020 and interpolated log-linearly to each
    period's midpoint (:func:`flowmodel.periods.covariate_at`), pair effects
    :math:`u \sim N(0, \sigma_{pair}^2)`, country trends and origin/destination unit
    walks anchored at 0 in the first period with steps :math:`N(0, \sigma^2\Delta)`
    over a gap of :math:`\Delta` years, and a **shock** :math:`s_{it} = \log`
    ``shock`` for the first ``shock_units`` units of ``shock_country`` in the last
    period (their out-migration doubles after the last census) and 0 elsewhere.

    What the sources record (what real ones do):

    - ``census`` (``flow_census`` over ``period`` = ``census_rounds``): a sample
      (``exposure_census`` = ``sample_fraction``) of the five-year migrants of each
      round, ``y ~ NB(f * duration * 5 * exp(eta), phi)`` for every origin unit of
      every country (a five-year count is not five one-year counts:
      ``duration_census`` < 1);
    - ``census_1y`` (``flow_census_1y`` over ``period`` = ``census_1y``): the same
      census's one-year question, ``NB(f * exp(eta), phi)`` (the latent definition:
      moves per year);
    - ``cdr`` (``flow_cdr`` over ``period`` = ``cdr_months``): monthly relocations of
      an operator's subscribers within each CDR country,
      ``NB(exp(eta) / 12 * share_i * period_effect_m, phi)``, counts of ``redaction``
      or fewer redacted (NaN, bound in ``flow_cdr_max``); months before the last
      census window's end lie in the census period, the others in the last period.
      Only the CDR sees the shock.

    Parameters
    ----------
    periods
        Latent periods (labels, time order); the last is the current period.
    census_rounds, census_1y, cdr_months
        Windows observed by each source (each must lie in one latent period).
    cdr_countries, shock_country, shock_units, shock
        Where the CDR is, and the shocked units (the first ``shock_units`` of
        ``shock_country``) with their factor on out-migration in the last period.
    truth
        Generating parameters (default :data:`PANEL_TRUTH`).

    Returns
    -------
    (xarray.Dataset, dict)
        The FlowDataset (also ``population_by_date`` at 2000 and 2020,
        ``cdr_subscribers_per_resident``) and the truth: :data:`PANEL_TRUTH`
        names plus ``country_effect``, ``trend`` (country x period),
        ``origin_trend`` / ``destination_trend`` (unit x period), ``pair_effect``,
        ``market_share``, ``period_effect`` (CDR months), ``mu`` (expected census
        five-year counts at full coverage, origin x destination x period),
        ``flows`` (realised such counts: the truth a nowcast of the last period
        is scored against), ``shocked_units`` and ``shocked_pairs`` (boolean
        origin x destination).
    """
    from scipy.special import expit, logit

    from flowmodel.dataset import build_dataset
    from flowmodel.exceptions import ModelConfigError
    from flowmodel.periods import add_dated_covariates, covariate_at, parse_period

    rng = np.random.default_rng(seed)
    truth = dict(PANEL_TRUTH if truth is None else truth)
    codes = np.array([f"C{k:02d}" for k in range(n_countries)])
    unknown = sorted((set(cdr_countries) | {shock_country}) - set(codes))
    if unknown:
        raise ModelConfigError(
            f"simulate_panel_dataset: countries {unknown} do not exist; the world has "
            f"{codes.tolist()}. Fix: name countries C00..C{n_countries - 1:02d}."
        )
    latent = [parse_period(p) for p in periods]
    times = np.array([p.midpoint for p in latent])
    n_t = len(latent)

    def latent_of(label: str) -> int:
        w = parse_period(label)
        hit = [k for k, p in enumerate(latent) if p.contains(w.midpoint)]
        if not hit:
            raise ModelConfigError(
                f"simulate_panel_dataset: window {label!r} lies in no latent period {periods}"
            )
        return hit[0]

    n_units = n_countries * units_per_country
    k = np.repeat(np.arange(n_countries), units_per_country)
    n_cols = int(np.ceil(n_countries / 2))
    lon = 30.0 + 2.0 * (k % n_cols) + rng.uniform(0.0, 2.0, n_units)
    lat = -2.0 + 2.0 * (k // n_cols) + rng.uniform(0.0, 2.0, n_units)
    country = codes[k]
    ids = np.array([f"U{i:03d}" for i in range(n_units)])
    log_pop_2000 = rng.normal(12.0, 0.8, n_units)
    growth = rng.normal(0.02, 0.01, n_units)  # per year
    pop = {
        2000: np.round(np.exp(log_pop_2000)),
        2020: np.round(np.exp(log_pop_2000 + 20 * growth)),
    }
    units = pd.DataFrame(
        {"unit_id": ids, "country": country, "population": pop[2020], "lon": lon, "lat": lat}
    )
    ds = build_dataset(units)
    dated = pd.DataFrame(
        {
            "unit_id": np.concatenate([ids, ids]),
            "period": ["2000"] * n_units + ["2020"] * n_units,
            "population": np.concatenate([pop[2000], pop[2020]]),
        }
    )
    ds = add_dated_covariates(ds, dated)
    pair = {
        "distance_km": ds["distance_km"].values,
        "cross_border": ds["cross_border"].values.astype(float),
    }
    off_diag = ~np.eye(n_units, dtype=bool)

    effects = rng.normal(0.0, truth["sigma_country"], n_countries)
    u = rng.normal(0.0, truth["sigma_pair"], (n_units, n_units))

    def walk(n: int, sigma: float) -> np.ndarray:
        steps = rng.normal(0.0, 1.0, (n, n_t - 1)) * sigma * np.sqrt(np.diff(times))
        return np.concatenate([np.zeros((n, 1)), np.cumsum(steps, axis=1)], axis=1)

    trend = walk(n_countries, truth["sigma_trend"])
    o_walk = walk(n_units, truth["sigma_origin_trend"])
    d_walk = walk(n_units, truth["sigma_destination_trend"])
    shocked = np.zeros(n_units, dtype=bool)
    shocked[np.flatnonzero(country == shock_country)[:shock_units]] = True
    eta = np.empty((n_units, n_units, n_t))
    for t in range(n_t):
        unit = pd.DataFrame(
            {"log_population": covariate_at(ds, "log_population", times[t])}, index=ids
        )
        eta_t = gravity_log_rate(unit, pair, truth, effects[k])
        eta_t = eta_t + u + trend[k, t][:, None] + o_walk[:, t][:, None] + d_walk[:, t][None, :]
        if t == n_t - 1:
            eta_t = eta_t + np.where(shocked, np.log(shock), 0.0)[:, None]
        eta[:, :, t] = np.where(off_diag, eta_t, np.nan)
    rate = np.exp(eta)
    phi = float(truth["phi"])
    duration = float(truth["duration_census"])

    def census_counts(t: int, years: float, factor: float) -> np.ndarray:
        return np.where(
            off_diag,
            _neg_binomial(rng, rate[:, :, t] * years * factor * sample_fraction, phi),
            np.nan,
        )

    rows = []
    for label in census_rounds:
        t = latent_of(label)
        y = census_counts(t, parse_period(label).length, duration)
        o, d = np.nonzero(off_diag)
        rows.append(
            pd.DataFrame(
                {"origin": ids[o], "destination": ids[d], "period": label, "count": y[o, d]}
            )
        )
    flows = {"census": pd.concat(rows, ignore_index=True)}
    if census_1y is not None:
        t = latent_of(census_1y)
        y = census_counts(t, parse_period(census_1y).length, 1.0)
        o, d = np.nonzero(off_diag)
        flows["census_1y"] = pd.DataFrame(
            {"origin": ids[o], "destination": ids[d], "period": census_1y, "count": y[o, d]}
        )

    # the operator's market share and penetration covariate (as simulate_fusion_dataset)
    in_cdr = np.isin(country, list(cdr_countries))
    base_share = dict(zip(cdr_countries, (0.40, 0.30, 0.55, 0.45), strict=False))
    logit_share = np.full(n_units, np.nan)
    covariate = np.full(n_units, np.nan)
    for code in cdr_countries:
        m = country == code
        spread = rng.normal(0.0, 0.4, m.sum())
        bias = rng.normal(0.2, 0.2)
        noise = rng.normal(0.0, 0.15, m.sum())
        covariate[m] = expit(logit(base_share[code]) + bias + spread)
        logit_share[m] = logit(base_share[code]) + spread - noise
    share = np.nan_to_num(expit(logit_share))
    log_pe = rng.normal(0.0, 0.1, len(cdr_months))
    log_pe = log_pe - log_pe.mean() + np.log(truth["period_scale"])
    same = (country[:, None] == country[None, :]) & off_diag & in_cdr[:, None]
    cdr_rows = []
    for m, label in enumerate(cdr_months):
        t = latent_of(label)
        mean = rate[:, :, t] * parse_period(label).length * share[:, None] * np.exp(log_pe[m])
        y = _neg_binomial(rng, mean, phi)
        o, d = np.nonzero(same)
        counts = y[o, d]
        redacted = counts <= redaction
        cdr_rows.append(
            pd.DataFrame(
                {
                    "origin": ids[o],
                    "destination": ids[d],
                    "period": label,
                    "count": np.where(redacted, np.nan, counts),
                    "max": np.where(redacted, redaction, np.nan),
                }
            )
        )
    if cdr_months:
        flows["cdr"] = pd.concat(cdr_rows, ignore_index=True)
    units["cdr_subscribers_per_resident"] = covariate
    out = build_dataset(units, flows=flows)
    out = add_dated_covariates(out, dated)
    out["exposure_census"] = ("unit", np.full(n_units, float(sample_fraction)))
    if census_1y is not None:
        out["exposure_census_1y"] = ("unit", np.full(n_units, float(sample_fraction)))
    out.attrs.update(simulated=1, seed=seed, redaction=redaction)

    # the truth: census five-year counts at full coverage in every latent period
    mu = rate * duration * np.array([p.length for p in latent])[None, None, :]
    realised = np.where(off_diag[:, :, None], _neg_binomial(rng, mu, phi), np.nan)
    coords = {"origin": ids, "destination": ids, "period": [p.label for p in latent]}
    dims = ("origin", "destination", "period")
    period_labels = [p.label for p in latent]
    return out, {
        **truth,
        "country_effect": dict(zip(codes.tolist(), effects.tolist(), strict=True)),
        "trend": pd.DataFrame(trend, index=pd.Index(codes, name="country"), columns=period_labels),
        "origin_trend": pd.DataFrame(
            o_walk, index=pd.Index(ids, name="unit"), columns=period_labels
        ),
        "destination_trend": pd.DataFrame(
            d_walk, index=pd.Index(ids, name="unit"), columns=period_labels
        ),
        "pair_effect": xr.DataArray(
            np.where(off_diag, u, np.nan),
            dims=dims[:2],
            coords={"origin": ids, "destination": ids},
        ),
        "market_share": pd.Series(share[in_cdr], index=pd.Index(ids[in_cdr], name="unit")),
        "period_effect": pd.Series(
            np.exp(log_pe), index=pd.Index(list(cdr_months), name="period")
        ),
        "mu": xr.DataArray(np.where(off_diag[:, :, None], mu, np.nan), dims=dims, coords=coords),
        "flows": xr.DataArray(realised, dims=dims, coords=coords),
        "periods": period_labels,
        "shocked_units": ids[shocked].tolist(),
        "shocked_pairs": xr.DataArray(
            shocked[:, None] & off_diag, dims=dims[:2], coords={"origin": ids, "destination": ids}
        ),
        "cdr_countries": list(cdr_countries),
        "sample_fraction": float(sample_fraction),
    }
