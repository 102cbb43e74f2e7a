"""Pair features: geodesic distance, cross-border and contiguity flags, s_ij, sparse pairs.

Dims follow the FlowDataset contract: ``origin`` x ``destination`` (dense), both indexed by
the unit ids, or one ``pair`` dim with ``origin`` / ``destination`` coordinates
(sparse, :func:`sparse_pairs`). The diagonal (i = j) is NaN in every float pair
variable and absent from sparse pair sets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import xarray as xr
from numpy.typing import ArrayLike
from pyproj import Geod
from tqdm.auto import tqdm

from flowmodel.exceptions import DataContractError

if TYPE_CHECKING:
    import geopandas as gpd
    import pandas as pd

__all__ = [
    "cell_members",
    "contiguity",
    "cross_border",
    "geodesic_distance_km",
    "in_total_universe",
    "intervening_population",
    "reports_near",
    "sparse_pairs",
    "total_pairs_outside",
]

_GEOD = Geod(ellps="WGS84")


def geodesic_distance_km(
    lon: np.ndarray,
    lat: np.ndarray,
    lon_to: np.ndarray | None = None,
    lat_to: np.ndarray | None = None,
) -> np.ndarray:
    """Geodesic (WGS84 ellipsoid) distance in km between every pair of points.

    Parameters
    ----------
    lon, lat
        Origin coordinates in degrees (EPSG:4326), shape ``(n,)``.
    lon_to, lat_to
        Destination coordinates, shape ``(m,)``; default: the origins.

    Returns
    -------
    numpy.ndarray
        Shape ``(n, m)`` distances in km (pyproj ``Geod.inv``, vectorised).
    """
    lon = np.asarray(lon, dtype=float)
    lat = np.asarray(lat, dtype=float)
    lon_to = lon if lon_to is None else np.asarray(lon_to, dtype=float)
    lat_to = lat if lat_to is None else np.asarray(lat_to, dtype=float)
    lo1, lo2 = np.meshgrid(lon, lon_to, indexing="ij")
    la1, la2 = np.meshgrid(lat, lat_to, indexing="ij")
    _, _, dist_m = _GEOD.inv(lo1.ravel(), la1.ravel(), lo2.ravel(), la2.ravel())
    return np.asarray(dist_m).reshape(lo1.shape) / 1000.0


def cross_border(country: xr.DataArray) -> xr.DataArray:
    """Return the ``(origin, destination)`` boolean: the two units' countries differ."""
    origin = country.rename(unit="origin")
    destination = country.rename(unit="destination")
    return (origin != destination).rename("cross_border")


def intervening_population(
    population: ArrayLike,
    distance_km: ArrayLike,
    *,
    block_size: int = 512,
    progress: bool | None = None,
) -> np.ndarray:
    r"""Intervening population :math:`s_{ij}` of the radiation model (Simini et al. 2012).

    :math:`s_{ij}` is the total population of the units ``k`` (``k != i``, ``k != j``)
    whose distance from the origin ``i`` is at most :math:`d_{ij}`:

    .. math::

        s_{ij} = \sum_{k \ne i, j} m_k \,[d_{ik} \le d_{ij}]

    **Tie rule** (deterministic, independent of unit order): a unit ``k`` at
    *exactly* the same distance from ``i`` as the destination ``j`` counts as
    inside the circle (closed disk). Units at distance 0 from ``i`` (coincident
    centroids) therefore count for every destination.

    Computed per origin by sorting its distances — :math:`O(N^2 \log N)` time —
    in blocks of ``block_size`` origins, so the extra memory is
    ``O(block_size * N)``.

    Parameters
    ----------
    population
        Shape ``(n,)`` population of each unit (``m``), non-negative.
    distance_km
        Shape ``(n, n)`` distances (``origin``, ``destination``); the diagonal is
        ignored (it may be NaN). An ``xarray.DataArray`` or dask array is computed.
    block_size
        Origins processed per block.
    progress
        Show a progress bar over blocks; ``None`` shows one only for large ``n``.

    Returns
    -------
    numpy.ndarray
        Shape ``(n, n)`` float64 (``origin``, ``destination``); the diagonal is NaN.

    Raises
    ------
    DataContractError
        Shapes do not match, or off-diagonal distances are NaN or negative, or
        populations are NaN or negative.
    """
    pop = np.asarray(population, dtype=np.float64)
    dist = np.asarray(distance_km, dtype=np.float64)
    n = pop.shape[0]
    if pop.ndim != 1 or dist.shape != (n, n):
        raise DataContractError(
            f"intervening_population: population has shape {pop.shape} and distance_km "
            f"{dist.shape}; expected (n,) and (n, n). Fix: pass one population per unit and "
            "the dense origin x destination distance matrix in the same unit order."
        )
    if not np.all(np.isfinite(pop)) or np.any(pop < 0):
        bad = np.flatnonzero(~np.isfinite(pop) | (pop < 0))[:10]
        raise DataContractError(
            f"intervening_population: population must be finite and >= 0; bad positions "
            f"{bad.tolist()}. Fix: fill missing populations before computing s_ij."
        )
    off = ~np.eye(n, dtype=bool)
    bad = off & ~(dist >= 0)  # catches NaN and negatives
    if bad.any():
        rows, cols = np.nonzero(bad)
        pairs = list(zip(rows[:10].tolist(), cols[:10].tolist(), strict=True))
        raise DataContractError(
            f"intervening_population: distance_km must be >= 0 and not NaN off the diagonal; "
            f"bad (origin, destination) positions {pairs}. Fix: supply every distance."
        )
    out = np.empty((n, n), dtype=np.float64)
    if n == 0:
        return out
    block_size = max(1, int(block_size))
    starts = range(0, n, block_size)
    show = progress if progress is not None else n >= 5000
    for start in tqdm(starts, desc="s_ij", unit="block", disable=not show):
        stop = min(start + block_size, n)
        rows = np.arange(start, stop)
        d = dist[start:stop].copy()
        d[np.arange(stop - start), rows] = np.inf  # the origin is never inside
        order = np.argsort(d, axis=1, kind="stable")
        d_sorted = np.take_along_axis(d, order, axis=1)
        cum = np.cumsum(pop[order], axis=1)
        # index of the last member of each group of equal distances (closed disk)
        is_end = np.ones_like(d_sorted, dtype=bool)
        is_end[:, :-1] = d_sorted[:, 1:] != d_sorted[:, :-1]
        end_idx = np.where(is_end, np.arange(n), n - 1)
        end_idx = np.minimum.accumulate(end_idx[:, ::-1], axis=1)[:, ::-1]
        s_sorted = np.take_along_axis(cum, end_idx, axis=1) - pop[order]
        block = np.empty_like(s_sorted)
        np.put_along_axis(block, order, s_sorted, axis=1)
        block[np.arange(stop - start), rows] = np.nan
        out[start:stop] = block
    return out


#: Gap (metres) below which two polygons still count as neighbours: boundaries of two
#: countries from two offices rarely meet exactly (Kenya's DHS Rift Valley and Tanzania's
#: NBS Kilimanjaro are 0.5 m apart along their border; docs/validation.md).
CONTIGUITY_TOLERANCE_M = 100.0


def contiguity(
    units: gpd.GeoDataFrame,
    *,
    rule: str = "queen",
    tolerance_m: float = CONTIGUITY_TOLERANCE_M,
) -> np.ndarray:
    """Which units share a boundary (spatial-index query, no all-pairs loop).

    Parameters
    ----------
    units
        GeoDataFrame of ``n`` polygons with a CRS, in unit order.
    rule
        ``"queen"``: the two polygons touch, overlap, or come within
        ``tolerance_m`` of each other anywhere (a shared corner point is
        enough; robust to slivers and to gaps between boundary files of
        different offices). ``"rook"``: they share a boundary segment of
        positive length (exact: no tolerance).
    tolerance_m
        Largest gap, in metres, between two polygons that ``"queen"`` still
        counts as neighbours (0: they must touch). In a geographic CRS the
        metres are converted at 111,320 m per degree, so an east-west gap at
        latitude phi may be up to 1/cos(phi) times wider (1.15x at 30 degrees).

    Returns
    -------
    numpy.ndarray
        Shape ``(n, n)`` bool (``origin``, ``destination``), symmetric, with a
        False diagonal.

    Raises
    ------
    DataContractError
        ``rule`` is not ``"queen"`` or ``"rook"``, or ``tolerance_m`` is negative.
    """
    import shapely

    if rule not in ("queen", "rook"):
        raise DataContractError(
            f"contiguity: rule={rule!r} is unknown. Fix: use 'queen' or 'rook'."
        )
    if not tolerance_m >= 0:
        raise DataContractError(
            f"contiguity: tolerance_m={tolerance_m!r} must be >= 0 (metres). Fix: e.g. 0 or 100."
        )
    geoms = np.asarray(units.geometry.values, dtype=object)
    n = len(geoms)
    out = np.zeros((n, n), dtype=bool)
    if n == 0:
        return out
    if rule == "queen" and tolerance_m > 0:
        crs = units.crs
        if crs is None or crs.is_geographic:
            distance = tolerance_m / 111_320.0
        else:
            distance = tolerance_m / crs.axis_info[0].unit_conversion_factor
        left, right = units.geometry.sindex.query(
            units.geometry, predicate="dwithin", distance=distance
        )
    else:
        left, right = units.geometry.sindex.query(units.geometry, predicate="intersects")
    keep = left < right
    left, right = left[keep], right[keep]
    if rule == "rook" and len(left):
        shared = shapely.intersection(
            shapely.boundary(geoms[left]), shapely.boundary(geoms[right])
        )
        overlap = shapely.area(shapely.intersection(geoms[left], geoms[right])) > 0
        linear = shapely.length(shared) > 0
        keep = linear | overlap
        left, right = left[keep], right[keep]
    out[left, right] = True
    out[right, left] = True
    return out


def _unit_sphere_xyz(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    lam, phi = np.radians(lon), np.radians(lat)
    return np.column_stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)])


# WGS84 geodesic vs. a 6371 km sphere differ by < 0.6 %; search a bit wider, then filter.
_SPHERE_KM = 6371.0088
_SEARCH_MARGIN = 1.01


def _candidate_pairs(
    lon: np.ndarray, lat: np.ndarray, k: int | None, max_km: float | None
) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial import cKDTree

    n = len(lon)
    xyz = _unit_sphere_xyz(lon, lat)
    tree = cKDTree(xyz)
    if k is not None:
        # extra neighbours so that ellipsoid-vs-sphere reordering cannot drop a true neighbour
        kq = min(n, k + 1 + max(4, k // 4))
        _, idx = tree.query(xyz, k=kq)
        idx = np.asarray(idx).reshape(n, kq)
        origin = np.repeat(np.arange(n), kq)
        dest = idx.ravel()
    else:
        angle = min(np.pi, max_km * _SEARCH_MARGIN / _SPHERE_KM)
        chord = 2.0 * np.sin(angle / 2.0)
        coo = tree.sparse_distance_matrix(tree, chord, output_type="coo_matrix")
        origin, dest = coo.row, coo.col
    keep = origin != dest
    return origin[keep], dest[keep]


def cell_members(
    ds: xr.Dataset,
    origin_labels: ArrayLike,
    destination_labels: ArrayLike,
    origin_level: str = "unit",
    destination_level: str = "unit",
) -> pd.DataFrame:
    """Member pairs of aggregated cells: every pair of distinct units whose labels match.

    A cell reported at coarser levels (previous admin-1 or country -> current unit, a
    country-pair estimate) sums the latent flows of every pair ``(i, j)``, ``i != j``,
    with ``i`` labelled ``origin_labels[c]`` at ``origin_level`` and ``j`` labelled
    ``destination_labels[c]`` at ``destination_level``
    (:func:`flowmodel.dataset.level_groups`).

    Parameters
    ----------
    ds
        FlowDataset (its ``unit`` variables give the levels).
    origin_labels, destination_labels
        ``(cell,)`` labels of the cells.
    origin_level, destination_level
        Levels of the labels: ``"unit"``, ``"country"`` or a unit field (``"admin1"``).

    Returns
    -------
    pandas.DataFrame
        Columns ``cell`` (position into the labels), ``i``, ``j`` (positions into
        ``ds.unit``), sorted by cell, then ``i``, then ``j``; a cell whose labels name no
        pair of distinct units has no row.
    """
    import pandas as pd

    from flowmodel.dataset import level_groups

    o_lab = np.asarray(origin_labels).astype(str)
    d_lab = np.asarray(destination_labels).astype(str)
    o_groups = level_groups(ds, origin_level)
    d_groups = level_groups(ds, destination_level)
    cells = pd.DataFrame({"cell": np.arange(len(o_lab)), "o": o_lab, "d": d_lab})
    origins = pd.DataFrame({"o": o_groups, "i": np.arange(len(o_groups))})
    dests = pd.DataFrame({"d": d_groups, "j": np.arange(len(d_groups))})
    members = cells.merge(origins, on="o").merge(dests, on="d")
    return members.loc[members["i"] != members["j"]].sort_values(["cell", "i", "j"])


def in_total_universe(
    origin_idx: np.ndarray,
    dest_idx: np.ndarray,
    origin_units: np.ndarray,
    covered_units: np.ndarray,
    country: np.ndarray,
    universe: str,
) -> np.ndarray:
    """Which pairs an operator's in/out total sums over (its universe), pair by pair.

    The universe of a CDR total (attr ``universe`` of ``<source>_outflow``): the
    pairs from an origin the operator reports (``origin_units``) to a unit it covers
    (``covered_units``: every unit in one of its cells), the diagonal excluded;
    ``"within"`` keeps the pairs inside one country. No ``N x N`` array is built.

    Parameters
    ----------
    origin_idx, dest_idx
        ``(pair,)`` unit positions.
    origin_units, covered_units
        ``(unit,)`` booleans.
    country
        ``(unit,)`` country codes.
    universe
        ``"covered"`` or ``"within"``.

    Returns
    -------
    numpy.ndarray
        ``(pair,)`` boolean.
    """
    origin_idx = np.asarray(origin_idx, dtype=np.int64)
    dest_idx = np.asarray(dest_idx, dtype=np.int64)
    out = origin_units[origin_idx] & covered_units[dest_idx] & (origin_idx != dest_idx)
    if universe == "within":
        out &= country[origin_idx] == country[dest_idx]
    return out


def _total_universe_size(
    kind: str,
    origin_units: np.ndarray,
    covered_units: np.ndarray,
    country: np.ndarray,
    universe: str,
) -> np.ndarray:
    """Count the pairs the outflow (row) or inflow (column) total of each unit sums."""
    side, other = (
        (origin_units, covered_units) if kind == "outflow" else (covered_units, origin_units)
    )
    if universe == "within":
        codes, inverse = np.unique(country, return_inverse=True)
        per_country = np.bincount(inverse, weights=other, minlength=len(codes))
        count = per_country[inverse]
    else:
        count = np.full(len(side), float(other.sum()))
    return np.where(side, count - (side & other), 0).astype(np.int64)


def total_pairs_outside(
    origin_idx: np.ndarray,
    dest_idx: np.ndarray,
    kind: str,
    origin_units: np.ndarray,
    covered_units: np.ndarray,
    country: np.ndarray,
    universe: str,
) -> np.ndarray:
    """Count, per unit, the pairs of its ``kind`` total that a pair set lacks.

    Counts only: ``O(units + pairs)``, no ``N x N`` array.

    Parameters
    ----------
    origin_idx, dest_idx
        ``(pair,)`` unit positions of the set's pairs (distinct).
    kind
        ``"outflow"`` (a unit's row) or ``"inflow"`` (its column).
    origin_units, covered_units, country, universe
        As :func:`in_total_universe`.

    Returns
    -------
    numpy.ndarray
        ``(unit,)`` int64 (0 for units without a total in the universe).
    """
    inside = in_total_universe(
        origin_idx, dest_idx, origin_units, covered_units, country, universe
    )
    side = np.asarray(origin_idx if kind == "outflow" else dest_idx, dtype=np.int64)
    have = np.bincount(side[inside], minlength=len(origin_units))
    return _total_universe_size(kind, origin_units, covered_units, country, universe) - have


def _observed_pairs(ds: xr.Dataset) -> tuple[np.ndarray, np.ndarray]:
    """Return the unit positions of every pair some source observes, bounds or sums.

    The pairs where a dense ``flow_*`` or ``estimate_*`` variable (values and bounds)
    is not NaN; the member pairs of every aggregated cell with a value or a bound
    (``cell_<source>`` variables, :func:`cell_members`); and every pair an operator's
    in/out total with a value or a bound sums (:func:`in_total_universe`).
    """
    from flowmodel.dataset import TOTAL_KINDS, flow_sources

    n = int(ds.sizes["unit"])
    units = np.asarray(ds["unit"].values).astype(str)
    pos = {u: k for k, u in enumerate(units)}
    parts_o: list[np.ndarray] = []
    parts_d: list[np.ndarray] = []
    dense = [
        (name, var)
        for name, var in ds.data_vars.items()
        if str(name).startswith(("flow_", "estimate_"))
        and {"origin", "destination"} <= set(var.dims)
    ]
    o_pos = (
        np.array([pos[u] for u in np.asarray(ds["origin"].values).astype(str)]) if dense else None
    )
    d_pos = (
        np.array([pos[u] for u in np.asarray(ds["destination"].values).astype(str)])
        if dense
        else None
    )
    for _, var in dense:
        v = var.transpose("origin", "destination", ...).notnull()
        extra = [dim for dim in v.dims if dim not in ("origin", "destination")]
        a, b = np.nonzero(np.asarray((v.any(extra) if extra else v).values))
        parts_o.append(o_pos[a])
        parts_d.append(d_pos[b])
    for name, var in ds.data_vars.items():
        name = str(name)
        if not name.startswith(("flow_", "estimate_")) or name.endswith(("_max", "_min", "_se")):
            continue
        source = name.split("_", 1)[1]
        dim = f"cell_{source}"
        if dim not in var.dims:
            continue
        keep = np.isfinite(np.asarray(var.values, dtype=float))
        if f"{name}_max" in ds:
            keep |= np.isfinite(np.asarray(ds[f"{name}_max"].values, dtype=float))
        members = cell_members(
            ds,
            np.asarray(ds[f"{dim}_origin"].values)[keep],
            np.asarray(ds[f"{dim}_destination"].values)[keep],
            str(var.attrs.get("origin_level", "unit")),
            str(var.attrs.get("destination_level", "unit")),
        )
        parts_o.append(members["i"].to_numpy(np.int64))
        parts_d.append(members["j"].to_numpy(np.int64))
    country = np.asarray(ds["country"].values).astype(str)
    for source in flow_sources(ds):
        flow = ds[f"flow_{source}"]
        if not {"origin", "destination"} <= set(flow.dims):
            continue
        names = [f"{source}_{kind}" for kind in TOTAL_KINDS]
        if not any(x in ds or f"{x}_max" in ds for x in names):
            continue
        seen = flow.notnull()
        if f"flow_{source}_max" in ds:
            seen = seen | ds[f"flow_{source}_max"].notnull()
        extra = [dim for dim in seen.dims if dim not in ("origin", "destination")]
        seen = seen.transpose("origin", "destination", ...)
        a, b = np.nonzero(np.asarray((seen.any(extra) if extra else seen).values))
        a, b = o_pos[a], d_pos[b]
        a, b = a[a != b], b[a != b]
        origin_units = np.zeros(n, dtype=bool)
        origin_units[a] = True
        covered_units = origin_units.copy()
        covered_units[b] = True
        for kind, name in zip(TOTAL_KINDS, names, strict=True):
            reported = np.zeros(n, dtype=bool)
            for x in (name, f"{name}_max"):
                if x in ds and "unit" in ds[x].dims:
                    v = np.asarray(ds[x].transpose("unit", ...).values, dtype=float)
                    reported |= np.isfinite(v.reshape(n, -1)).any(axis=1)
            if not reported.any():
                continue
            universe = str(ds[name].attrs.get("universe", "covered")) if name in ds else "covered"
            side_units = (origin_units if kind == "outflow" else covered_units) & reported
            other_units = covered_units if kind == "outflow" else origin_units
            # the universe's pairs of the reported units only: rows (outflow) or columns (inflow)
            candidates = np.flatnonzero(other_units)
            for u in np.flatnonzero(side_units):
                others = candidates[candidates != u]
                if universe == "within":
                    others = others[country[others] == country[u]]
                if kind == "outflow":
                    parts_o.append(np.full(len(others), u))
                    parts_d.append(others)
                else:
                    parts_o.append(others)
                    parts_d.append(np.full(len(others), u))
    if not parts_o:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    rows = np.concatenate(parts_o).astype(np.int64)
    cols = np.concatenate(parts_d).astype(np.int64)
    keys = np.unique(rows[rows != cols] * n + cols[rows != cols])
    return keys // n, keys % n


def sparse_pairs(
    ds: xr.Dataset,
    *,
    k: int | None = None,
    max_km: float | None = None,
    include_observed: bool = True,
) -> xr.Dataset:
    """Sparse pair set: one ``pair`` dim with ``origin``/``destination`` coords.

    Keeps, for each origin, the ``k`` nearest destinations and/or those within
    ``max_km`` (both given: the ``k`` nearest *among* those within ``max_km``).
    With a dense ``distance_km`` the candidates come from it; without (large N: only
    unit variables with ``lon``/``lat``), from a k-d tree on the unit sphere — no
    ``N x N`` matrix is ever built — and ``distance_km`` (WGS84 geodesic) and
    ``cross_border`` are computed for the kept pairs only. Every dense pair variable
    of ``ds`` (flows, bounds, ``contiguous``, ...) is gathered at the kept pairs.
    Ties in distance are broken by destination position (stable), so the result is
    deterministic.

    Parameters
    ----------
    ds
        FlowDataset with dims ``unit`` (and optionally ``origin`` x ``destination``).
    k
        Nearest destinations per origin (by ``distance_km``).
    max_km
        Largest distance kept, km.
    include_observed
        Also keep every pair some source informs, so that a model fitted to the
        set sees every observation: where a dense ``flow_*`` or ``estimate_*``
        variable (counts, ``_max`` / ``_min`` bounds, ``_se``) is not NaN; every
        member pair of an aggregated cell (``cell_<source>``: admin-1 or country
        cells, country-pair estimates) with a value or a bound; and every pair of
        the universe of an operator's in/out total (``<source>_outflow`` /
        ``_inflow`` or their ``_max``) that has a value or a bound.

    Returns
    -------
    xarray.Dataset
        Unit and cell variables unchanged; pair variables along ``pair`` (sorted by
        origin position, then distance); coords ``origin``, ``destination`` along
        ``pair``.

    Raises
    ------
    DataContractError
        Neither ``k`` nor ``max_km`` is given, they are not positive, or the dataset
        has neither dense ``distance_km`` nor ``lon``/``lat``.
    """
    if k is None and max_km is None:
        raise DataContractError(
            "sparse_pairs: give k (nearest destinations per origin) and/or max_km. "
            "Fix: e.g. sparse_pairs(ds, k=50)."
        )
    if (k is not None and k < 1) or (max_km is not None and not max_km > 0):
        raise DataContractError(f"sparse_pairs: k={k} and max_km={max_km} must be positive.")
    units = ds["unit"].values
    n = len(units)
    dense = "distance_km" in ds and {"origin", "destination"} <= set(ds["distance_km"].dims)
    if dense:
        dist = np.asarray(ds["distance_km"].transpose("origin", "destination").values, float)
        d = np.where(np.eye(n, dtype=bool), np.inf, dist)
        if max_km is not None:
            d = np.where(d <= max_km, d, np.inf)
        order = np.argsort(d, axis=1, kind="stable")
        if k is not None:
            order = order[:, : min(k, max(n - 1, 0))]
        rows = np.repeat(np.arange(n), order.shape[1])
        cols = order.ravel()
        keep = np.isfinite(d[rows, cols])
        rows, cols = rows[keep], cols[keep]
    else:
        if "lon" not in ds or "lat" not in ds:
            raise DataContractError(
                "sparse_pairs: the dataset has neither a dense 'distance_km' nor 'lon'/'lat'. "
                "Fix: add population-weighted centroids (zonal_covariates) or distances."
            )
        lon = np.asarray(ds["lon"].values, float)
        lat = np.asarray(ds["lat"].values, float)
        rows, cols = _candidate_pairs(lon, lat, k, max_km)
        dsel = _geodesic_pairs_km(lon, lat, rows, cols)
        if max_km is not None:
            keep = dsel <= max_km
            rows, cols, dsel = rows[keep], cols[keep], dsel[keep]
        if k is not None:
            o = np.lexsort((cols, dsel, rows))
            rows, cols, dsel = rows[o], cols[o], dsel[o]
            rank = np.arange(len(rows)) - np.searchsorted(rows, rows, side="left")
            keep = rank < k
            rows, cols = rows[keep], cols[keep]
    if include_observed:
        add_r, add_c = _observed_pairs(ds)
        if add_r.size:
            kept = np.unique(rows.astype(np.int64) * n + cols)
            extra = ~np.isin(add_r * n + add_c, kept)
            rows = np.concatenate([rows, add_r[extra]])
            cols = np.concatenate([cols, add_c[extra]])
    dsel = dist[rows, cols] if dense else _geodesic_pairs_km(lon, lat, rows, cols)
    o = np.lexsort((cols, dsel, rows))
    rows, cols, dsel = rows[o], cols[o], dsel[o]
    coords = {"origin": ("pair", units[rows]), "destination": ("pair", units[cols])}
    out = ds.drop_vars(
        [name for name, v in ds.variables.items() if {"origin", "destination"} & set(v.dims)]
    )
    out = out.assign_coords(coords)
    oi = xr.DataArray(rows, dims="pair")
    di = xr.DataArray(cols, dims="pair")
    for name, var in ds.data_vars.items():
        if {"origin", "destination"} <= set(var.dims):
            picked = var.isel(origin=oi, destination=di).drop_vars(
                ["origin", "destination"], errors="ignore"
            )
            out[name] = picked
    if not dense:
        out["distance_km"] = ("pair", dsel)
    if "cross_border" not in out:
        country = np.asarray(ds["country"].values)
        out["cross_border"] = ("pair", country[rows] != country[cols])
    out["distance_km"].attrs.update(units="km", long_name="geodesic distance between centroids")
    return out


def _geodesic_pairs_km(
    lon: np.ndarray, lat: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """WGS84 geodesic distance (km) of the pairs ``(rows, cols)`` only."""
    _, _, dm = _GEOD.inv(lon[rows], lat[rows], lon[cols], lat[cols])
    return np.asarray(dm, dtype=float) / 1000.0


def reports_near(ds: xr.Dataset, k: int) -> xr.Dataset:
    """Return the dense dataset with the cells beyond each origin's ``k`` nearest unreported.

    Real OD tables at scale list the nearby, non-empty cells of each origin, not all
    N² of them; this turns a dense (e.g. simulated) dataset into that form: every
    ``flow_*`` variable with ``origin`` x ``destination`` dims becomes NaN outside
    the pairs :func:`sparse_pairs` keeps with ``k`` and ``include_observed=False``,
    so ``sparse_pairs(..., include_observed=True)`` then grows like N, not N².

    Parameters
    ----------
    ds
        Dense FlowDataset.
    k
        Nearest destinations per origin whose cells stay reported.
    """
    near = sparse_pairs(ds, k=k, include_observed=False)
    n = ds.sizes["unit"]
    pos = {u: i for i, u in enumerate(ds["unit"].values.astype(str))}
    rows = np.array([pos[u] for u in near["origin"].values.astype(str)])
    cols = np.array([pos[u] for u in near["destination"].values.astype(str)])
    mask = np.zeros((n, n), dtype=bool)
    mask[rows, cols] = True
    keep = xr.DataArray(mask, dims=("origin", "destination"))
    out = ds.copy()
    for name, var in ds.data_vars.items():
        if str(name).startswith("flow_") and {"origin", "destination"} <= set(var.dims):
            out[name] = var.where(keep)
    return out
