r"""Zonal statistics of rasters over admin units, exact at polygon edges, blockwise.

The engine
----------
Every unit polygon is mapped into the pixel space of the raster grid (``u`` =
column, ``v`` = row, one pixel = one unit square) and its rings are cut at every
grid line into *fragments* that each lie in one cell ``(r, c)``. For a closed
ring, the exact covered fraction of cell ``(r, c)`` is

.. math::

    w_{rc} = \sum_{\text{fragments in row } r} \int \operatorname{clamp}(c + 1 - u(v), 0, 1)\, dv

(the area to the right of each edge, signed by its direction), so the
coverage-weighted zonal sum :math:`\sum_{rc} w_{rc} x_{rc}` of a raster ``x``
reduces, through one cumulative sum of ``x`` along each row, to two look-ups per
fragment: :math:`\sum_f a_f S_{r_f, c_f} + b_f S_{r_f, c_f + 1}` with ``S`` the
row-wise suffix sums, ``a_f = dv (c_f + 1 - \bar u)``, ``b_f = dv (\bar u - c_f)``.
Interior pixels cost one cumulative sum (no per-zone work, no label raster);
edge pixels get the same exact coverage fractions as exactextract (which is the
reference in the tests: equal within 1e-6 relative). The raster is read once, in
strips of whole rows, so memory is bounded by the strip, not the raster; the
fragments of a strip are computed once and reused by every raster on the same
grid, and an edge shared by two units (tilings) is cut once and credited to both
with opposite signs.

Polygons are reprojected to each raster's CRS (after densifying their edges);
population counts are never resampled.

Two engines
-----------
``engine="flowmodel"`` (the default) is the blockwise engine above.
``engine="exactextract"`` computes the same outputs with
``exactextract.exact_extract``, the maintained library whose coverage fractions
are the reference: ``sum`` and ``count`` are its ``sum`` and ``count``
operations, and the population-weighted centroid is its ``weighted_sum`` of the
population with the cell centres as weights. Everything around the engine is
shared: the reprojection of the polygons, the reading of the raster (exactextract
reads through the same reader, so nodata, NaN, integer, south-up and
``DataArray`` rasters are treated alike), the outside-raster warnings and the
errors. The tests check that both agree within 1e-6 relative on every column of
:func:`zonal_covariates`.

Why keep an own engine: exactextract works feature by feature (or, with
``strategy="raster-sequential"``, chunk by chunk over all features), computing
each polygon's coverage fractions cell by cell; the own engine turns the interior
of every unit into one cumulative sum per raster row and does per-fragment work
only on boundary cells, with shared edges of a tiling cut once. It is therefore
faster when units are many (admin-3 tilings of a national raster), and it reads
the raster exactly once in bounded memory. exactextract remains the independent
check in the tests and is available to users as ``engine="exactextract"``.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine
from pyproj import CRS, Transformer

from flowmodel.exceptions import InputFileError, MissingCRSError, NoOverlapError

__all__ = [
    "DEFAULT_STATS",
    "RasterCoverageWarning",
    "zonal_covariates",
    "zonal_statistics",
]

#: Statistic of each well-known raster; any other raster defaults to ``"mean"``.
DEFAULT_STATS: dict[str, str] = {
    "population": "sum",
    "built_up": "mean",
    "night_lights": "sum",
}
_KNOWN_STATS = ("sum", "mean", "count", "coverage")
MAX_IDS = 10


class RasterCoverageWarning(UserWarning):
    """Some units lie partly or wholly outside a raster's extent."""


def _fmt_ids(ids: Sequence[Any]) -> str:
    ids = sorted(str(i) for i in ids)
    more = f" (and {len(ids) - MAX_IDS} more)" if len(ids) > MAX_IDS else ""
    return ", ".join(ids[:MAX_IDS]) + more


# ----------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class _Grid:
    transform: Affine
    width: int
    height: int
    crs: CRS

    def key(self) -> tuple:
        return (tuple(self.transform)[:6], self.width, self.height, self.crs.to_wkt())


class _Source:
    """One band of a raster, read in strips of rows (a file via rasterio, or a DataArray)."""

    def __init__(self, name: str, raster: Any, scale: float = 1.0):
        self.name = name
        if not (np.isfinite(scale) and scale > 0):
            raise InputFileError(
                f"raster '{name}': scale={scale!r} must be a positive number (the persons, or "
                "units, that one value stands for). Fix: e.g. scale=400 for WorldPop's Africa "
                "rasters, whose values are mean persons per 30-arc-second cell of a 10' block."
            )
        self.scale = float(scale)
        if isinstance(raster, str | os.PathLike):
            import rasterio

            self.path: Path | None = Path(raster)
            if not self.path.exists():
                raise InputFileError(
                    f"raster '{name}': file {self.path} not found. Fix: check the path in "
                    "the rasters mapping."
                )
            try:
                with rasterio.open(self.path) as src:
                    crs, transform = src.crs, src.transform
                    width, height, nodata = src.width, src.height, src.nodata
                    self.block_height = src.block_shapes[0][0]
                    bands = src.count
            except rasterio.errors.RasterioIOError as exc:
                raise InputFileError(
                    f"raster '{name}': {self.path} cannot be opened ({exc}). Fix: give a "
                    "GeoTIFF (or another GDAL raster)."
                ) from exc
            if bands != 1:
                # as for a DataArray with a band dim: never pick band 1 silently
                raise InputFileError(
                    f"raster '{name}': {self.path} has {bands} bands; one band per raster is "
                    f"read. Fix: extract the band you mean, e.g. `gdal_translate -b 1 "
                    f"{self.path} {self.path.stem}_band1.tif`, or pass "
                    "rioxarray.open_rasterio(path).sel(band=1)."
                )
            self.array = None
            where = str(self.path)
        else:
            self.path = None
            da = raster
            if not hasattr(da, "rio"):
                raise InputFileError(
                    f"raster '{name}': expected a file path or an xarray.DataArray, got "
                    f"{type(raster).__name__}. Fix: pass a path or rioxarray.open_rasterio(...)."
                )
            if "band" in da.dims:
                if da.sizes["band"] != 1:
                    raise InputFileError(
                        f"raster '{name}' (DataArray {da.name!r}) has {da.sizes['band']} bands; "
                        "one band per raster is read. Fix: select one, e.g. da.sel(band=1)."
                    )
                da = da.isel(band=0)
            crs, transform = da.rio.crs, da.rio.transform(recalc=False)
            height, width = da.sizes[da.rio.y_dim], da.sizes[da.rio.x_dim]
            nodata = da.rio.nodata if da.rio.nodata is not None else da.rio.encoded_nodata
            self.array = da.transpose(da.rio.y_dim, da.rio.x_dim)
            chunks = getattr(da.data, "chunks", None)
            self.block_height = int(chunks[0][0]) if chunks else 256
            where = f"DataArray {da.name!r}" if da.name is not None else "an unnamed DataArray"
        if crs is None:
            raise MissingCRSError(
                f"raster '{name}' ({where}) has no CRS. Fix: set it, e.g. "
                "`gdal_edit.py -a_srs EPSG:4326 file.tif` or da.rio.write_crs('EPSG:4326')."
            )
        self.where = where
        self.nodata = None if nodata is None else float(nodata)
        self.grid = _Grid(Affine(*tuple(transform)[:6]), int(width), int(height), CRS(crs))

    def read(
        self, row0: int, row1: int, col0: int, col1: int, dataset: Any = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Read rows ``[row0, row1)`` x cols ``[col0, col1)`` of band 1.

        Returns the values (0 where invalid; sums accumulate in float64) and the
        invalid mask (``None`` when every cell is valid). ``dataset``: an open
        rasterio handle of ``self.path`` to read from (many small reads).
        """
        if self.path is not None:
            import rasterio
            from rasterio.windows import Window

            window = Window(col0, row0, col1 - col0, row1 - row0)
            if dataset is not None:
                data = dataset.read(1, window=window)
            else:
                # a handle per strip: closing it drops the strip's blocks from GDAL's
                # block cache, so memory stays bounded by the strips in flight
                with rasterio.open(self.path) as src:
                    data = src.read(1, window=window)
        else:
            data = np.asarray(self.array[row0:row1, col0:col1].values)
        invalid = None
        if data.dtype.kind == "f":
            invalid = np.isnan(data)
        if self.nodata is not None and not math.isnan(self.nodata):
            hit = data == self.nodata
            invalid = hit if invalid is None else invalid | hit
        if data.dtype.kind not in "fiu":
            data = data.astype(np.float64)
        if invalid is not None:
            if invalid.any():
                data = np.where(invalid, np.zeros((), data.dtype), data)
            else:
                invalid = None
        if self.scale != 1.0:
            data = data * self.scale  # float64 for integer rasters too
        return data, invalid

    def close(self) -> None:
        """Release cached state (kept for symmetry; files are closed after each strip)."""


# ---------------------------------------------------------------------------- fragments
@dataclass
class _Segments:
    """Distinct ring edges of all zones in pixel space, sorted by their lowest row.

    Edges are stored once, oriented downwards (``v0 < v1``): an edge shared by two
    units of a tiling (traversed in opposite directions) is cut into fragments
    once, and each unit receives it with its own sign (``seg_*``).
    """

    zone: np.ndarray  # edge id (0 .. n_edges - 1), the "zone" of the fragments
    u0: np.ndarray
    v0: np.ndarray
    u1: np.ndarray
    v1: np.ndarray
    vmin: np.ndarray
    vmax: np.ndarray
    sign: float
    seg_zone: np.ndarray  # per original ring edge: its unit,
    seg_edge: np.ndarray  # its distinct edge,
    seg_sign: np.ndarray  # and +1 / -1 (same / reversed orientation)

    def to_zones(self, per_edge: np.ndarray, n: int) -> np.ndarray:
        """Per-edge totals -> per-unit totals."""
        return np.bincount(self.seg_zone, self.seg_sign * per_edge[self.seg_edge], minlength=n)


def _segments(geoms: np.ndarray, grid: _Grid) -> _Segments:
    """Edges of every ring (exteriors CCW, holes CW) mapped to pixel space."""
    geoms = shapely.orient_polygons(geoms, exterior_cw=False)
    parts, zone_of_part = shapely.get_parts(geoms, return_index=True)
    rings, part_of_ring = shapely.get_rings(parts, return_index=True)
    xy, ring_of_coord = shapely.get_coordinates(rings, return_index=True)
    inv = ~grid.transform
    u = inv.a * xy[:, 0] + inv.b * xy[:, 1] + inv.c
    v = inv.d * xy[:, 0] + inv.e * xy[:, 1] + inv.f
    same = ring_of_coord[1:] == ring_of_coord[:-1]
    zone = zone_of_part[part_of_ring[ring_of_coord[:-1][same]]].astype(np.int64)
    u0, u1 = u[:-1][same], u[1:][same]
    v0, v1 = v[:-1][same], v[1:][same]
    keep = v0 != v1  # horizontal edges cover nothing
    zone, u0, u1, v0, v1 = zone[keep], u0[keep], u1[keep], v0[keep], v1[keep]
    flip = v0 > v1
    key = np.column_stack(
        [np.where(flip, v1, v0), np.where(flip, u1, u0), np.where(flip, v0, v1),
         np.where(flip, u0, u1)]
    )  # fmt: skip
    # unique rows come sorted by v0 (= vmin), as the strips need
    edges, seg_edge = np.unique(key, axis=0, return_inverse=True)
    det = grid.transform.a * grid.transform.e - grid.transform.b * grid.transform.d
    # a CCW exterior in x/y keeps its orientation in pixel space iff det > 0; the
    # integral is -area for a CCW ring in (u, v)
    sign = -1.0 if det > 0 else 1.0
    ev0, eu0, ev1, eu1 = (np.ascontiguousarray(edges[:, k]) for k in range(4))
    return _Segments(
        zone=np.arange(len(edges), dtype=np.int64),
        u0=eu0,
        v0=ev0,
        u1=eu1,
        v1=ev1,
        vmin=ev0,
        vmax=ev1,
        sign=sign,
        seg_zone=zone,
        seg_edge=np.asarray(seg_edge).reshape(-1),
        seg_sign=np.where(flip, -1.0, 1.0),
    )


def _split(a0, b0, a1, b1, *extra):
    """Cut segments (a, b) at every integer value of ``a``; return the pieces in order."""
    lo, hi = np.minimum(a0, a1), np.maximum(a0, a1)
    k_first = np.floor(lo) + 1.0
    k_last = np.ceil(hi) - 1.0
    n_cross = np.maximum(k_last - k_first + 1.0, 0.0).astype(np.int64)
    n_pieces = n_cross + 1
    seg = np.repeat(np.arange(len(a0)), n_pieces)
    start = np.cumsum(n_pieces) - n_pieces
    j = np.arange(len(seg)) - start[seg]
    a0s, a1s, b0s, b1s = a0[seg], a1[seg], b0[seg], b1[seg]
    asc = a1s > a0s
    kf, kl = k_first[seg], k_last[seg]
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = (b1s - b0s) / (a1s - a0s)

    def crossing(jj):
        k = np.where(asc, kf + (jj - 1), kl - (jj - 1))
        with np.errstate(invalid="ignore"):
            return k, b0s + (k - a0s) * slope

    ka, kb = crossing(j)
    ea, eb = crossing(j + 1)
    last = j == n_cross[seg]
    first = j == 0
    sa = np.where(first, a0s, ka)
    sb = np.where(first, b0s, kb)
    ea = np.where(last, a1s, ea)
    eb = np.where(last, b1s, eb)
    return sa, sb, ea, eb, *(e[seg] for e in extra)


@dataclass
class _Fragments:
    zone: np.ndarray
    row: np.ndarray  # row index within the strip
    col: np.ndarray  # column index within the window (0 .. width)
    a: np.ndarray
    b: np.ndarray


def _cut_at(a0, b0, a1, b1, level: float, *extra):
    """Cut the segments that cross ``a == level`` in two, so clamping ``a`` is exact."""
    cross = np.minimum(a0, a1) < level
    cross &= np.maximum(a0, a1) > level
    if not cross.any():
        return a0, b0, a1, b1, *extra
    idx = np.flatnonzero(cross)
    t = (level - a0[idx]) / (a1[idx] - a0[idx])
    bm = b0[idx] + t * (b1[idx] - b0[idx])
    am = np.full(len(idx), float(level))
    first_a1, first_b1 = a1.copy(), b1.copy()
    first_a1[idx], first_b1[idx] = level, bm
    new_a0 = np.concatenate([a0, am])
    new_b0 = np.concatenate([b0, bm])
    new_a1 = np.concatenate([first_a1, a1[idx]])
    new_b1 = np.concatenate([first_b1, b1[idx]])
    return new_a0, new_b0, new_a1, new_b1, *(np.concatenate([e, e[idx]]) for e in extra)


def _fragments(segs: _Segments, row0: int, row1: int, col0: int, col1: int) -> _Fragments:
    """Fragments of the rings within rows [row0, row1), columns clamped to [col0, col1]."""
    hi = np.searchsorted(segs.vmin, row1, side="left")
    sel = np.flatnonzero(segs.vmax[:hi] > row0)
    zone = segs.zone[sel]
    v0, u0, v1, u1 = segs.v0[sel], segs.u0[sel], segs.v1[sel], segs.u1[sel]
    # cut at the strip's and window's borders, then clamp: exact, since rows outside
    # the strip get dv = 0, and an edge left of the window covers every cell to its
    # right fully, right of it none
    for level in (row0, row1):
        v0, u0, v1, u1, zone = _cut_at(v0, u0, v1, u1, level, zone)
    v0 = np.clip(v0, row0, row1) - row0
    v1 = np.clip(v1, row0, row1) - row0
    keep = v0 != v1
    v0, u0, v1, u1, zone = v0[keep], u0[keep], v1[keep], u1[keep], zone[keep]
    for level in (col0, col1):
        u0, v0, u1, v1, zone = _cut_at(u0, v0, u1, v1, level, zone)
    u0 = np.clip(u0, col0, col1) - col0
    u1 = np.clip(u1, col0, col1) - col0
    keep = v0 != v1
    v0, u0, v1, u1, zone = _split(v0[keep], u0[keep], v1[keep], u1[keep], zone[keep])
    keep = v0 != v1
    row = np.floor(0.5 * (v0[keep] + v1[keep])).astype(np.int64)
    u0, v0, u1, v1, zone, row = _split(u0[keep], v0[keep], u1[keep], v1[keep], zone[keep], row)
    dv = v1 - v0
    keep = dv != 0
    dv, zone, row = dv[keep], zone[keep], row[keep]
    umid = 0.5 * (u0[keep] + u1[keep])
    col = np.floor(umid).astype(np.int64)
    b = dv * (umid - col)
    a = dv - b
    return _Fragments(zone, row, col, a, b)


#: use reduceat at the fragments' positions when 3 x fragments x this < strip cells
_SPARSE_FACTOR = 16


def _row_suffix_py(x, row, col, a, b):  # pragma: no cover - compiled by numba
    """Per fragment ``a S(r, c) + b S(r, c + 1)``, one row's running sum at a time.

    Fragments are bucketed by row (counting sort); each row with fragments gets a
    float64 running sum in a buffer of ``width + 1`` values, so no prefix sum of
    the whole strip is materialised. Rows without fragments are not summed.
    """
    rows, width = x.shape
    m = row.shape[0]
    start = np.zeros(rows + 1, dtype=np.int64)
    for k in range(m):
        start[row[k] + 1] += 1
    for r in range(rows):
        start[r + 1] += start[r]
    fill = start[:-1].copy()
    order = np.empty(m, dtype=np.int64)
    for k in range(m):
        r = row[k]
        order[fill[r]] = k
        fill[r] += 1
    out = np.empty(m, dtype=np.float64)
    g = np.empty(width + 1, dtype=np.float64)
    for r in range(rows):
        lo, hi = start[r], start[r + 1]
        if lo == hi:
            continue
        acc = 0.0
        g[0] = 0.0
        for j in range(width):
            acc += x[r, j]
            g[j + 1] = acc
        for i in range(lo, hi):
            k = order[i]
            c = col[k]
            ia = c if c < width else width
            ib = c + 1 if c + 1 < width else width
            out[k] = a[k] * (acc - g[ia]) + b[k] * (acc - g[ib])
    return out


def _fragments_py(v0, u0, v1, u1, zone, row0, row1, col0, col1, cap):  # pragma: no cover
    """:func:`_fragments` for downward segments (``v0 < v1``), one segment at a time."""
    o_zone = np.empty(cap, dtype=np.int64)
    o_row = np.empty(cap, dtype=np.int64)
    o_col = np.empty(cap, dtype=np.int64)
    o_a = np.empty(cap, dtype=np.float64)
    o_b = np.empty(cap, dtype=np.float64)
    n = 0
    pa = np.empty(3, dtype=np.float64)  # v at the column cuts
    pb = np.empty(3, dtype=np.float64)  # u at the column cuts
    for s in range(v0.shape[0]):
        sv0, su0, sv1, su1 = v0[s], u0[s], v1[s], u1[s]
        if sv1 <= row0 or sv0 >= row1:
            continue
        # clip to the strip's rows
        if sv0 < row0:
            su0 = su0 + (row0 - sv0) / (sv1 - sv0) * (su1 - su0)
            sv0 = float(row0)
        if sv1 > row1:
            su1 = su0 + (row1 - sv0) / (sv1 - sv0) * (su1 - su0)
            sv1 = float(row1)
        sv0 -= row0
        sv1 -= row0
        if sv0 == sv1:
            continue
        # cut where the segment crosses the window's side columns, then clamp
        np_ = 0
        pa[0], pb[0] = sv0, su0
        for level in (col0, col1):
            if min(su0, su1) < level < max(su0, su1):
                t = (level - su0) / (su1 - su0)
                np_ += 1
                pa[np_] = sv0 + t * (sv1 - sv0)
                pb[np_] = float(level)
        if np_ == 2 and (pa[2] < pa[1]):
            pa[1], pa[2] = pa[2], pa[1]
            pb[1], pb[2] = pb[2], pb[1]
        for p in range(np_ + 1):
            qa0, qb0 = pa[p], pb[p]
            if p < np_:
                qa1, qb1 = pa[p + 1], pb[p + 1]
            else:
                qa1, qb1 = sv1, su1
            qb0 = min(max(qb0, col0), col1) - col0
            qb1 = min(max(qb1, col0), col1) - col0
            if qa0 == qa1:
                continue
            # split at every integer row
            slope = (qb1 - qb0) / (qa1 - qa0)
            kf = np.floor(qa0) + 1.0
            kl = np.ceil(qa1) - 1.0
            nr = int(max(kl - kf + 1.0, 0.0))
            for j in range(nr + 1):
                if j == 0:
                    ra0, rb0 = qa0, qb0
                else:
                    k = kf + (j - 1)
                    ra0, rb0 = k, qb0 + (k - qa0) * slope
                if j == nr:
                    ra1, rb1 = qa1, qb1
                else:
                    k = kf + j
                    ra1, rb1 = k, qb0 + (k - qa0) * slope
                if ra0 == ra1:
                    continue
                row = int(np.floor(0.5 * (ra0 + ra1)))
                # split at every integer column (a = u, b = v here)
                lo, hi = min(rb0, rb1), max(rb0, rb1)
                cf = np.floor(lo) + 1.0
                cl = np.ceil(hi) - 1.0
                nc = int(max(cl - cf + 1.0, 0.0))
                asc = rb1 > rb0
                cslope = (ra1 - ra0) / (rb1 - rb0) if nc > 0 else 0.0
                for i in range(nc + 1):
                    if i == 0:
                        xa0, xb0 = rb0, ra0
                    else:
                        k = cf + (i - 1) if asc else cl - (i - 1)
                        xa0, xb0 = k, ra0 + (k - rb0) * cslope
                    if i == nc:
                        xa1, xb1 = rb1, ra1
                    else:
                        k = cf + i if asc else cl - i
                        xa1, xb1 = k, ra0 + (k - rb0) * cslope
                    dv = xb1 - xb0
                    if dv == 0:
                        continue
                    umid = 0.5 * (xa0 + xa1)
                    col = int(np.floor(umid))
                    bb = dv * (umid - col)
                    if n == cap:  # more fragments than bounded (cannot happen): give up
                        return o_zone[:0], o_row[:0], o_col[:0], o_a[:0], o_b[:0], False
                    o_zone[n] = zone[s]
                    o_row[n] = row
                    o_col[n] = col
                    o_a[n] = dv - bb
                    o_b[n] = bb
                    n += 1
    return o_zone[:n], o_row[:n], o_col[:n], o_a[:n], o_b[:n], True


@functools.cache
def _fragments_kernel() -> Callable | None:
    """Return :func:`_fragments_py` compiled by numba (cached on disk), or None."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is optional
        return None
    return numba.njit(nogil=True, cache=True)(_fragments_py)


def _fragments_fast(segs: _Segments, row0: int, row1: int, col0: int, col1: int) -> _Fragments:
    """:func:`_fragments` by the numba kernel (the same fragments, up to round-off)."""
    hi = np.searchsorted(segs.vmin, row1, side="left")
    sel = np.flatnonzero(segs.vmax[:hi] > row0)
    v0, u0, v1, u1 = segs.v0[sel], segs.u0[sel], segs.v1[sel], segs.u1[sel]
    # at most 3 + (rows crossed) + (columns crossed) fragments per segment
    cap = int(np.sum(np.ceil(np.abs(v1 - v0)) + np.ceil(np.abs(u1 - u0)))) + 8 * len(sel)
    kernel = _fragments_kernel()
    *out, ok = kernel(v0, u0, v1, u1, segs.zone[sel], row0, row1, col0, col1, cap)
    if not ok:  # pragma: no cover - defensive
        return _fragments(segs, row0, row1, col0, col1)
    return _Fragments(*out)


@functools.cache
def _row_suffix_kernel() -> Callable | None:
    """Return :func:`_row_suffix_py` compiled by numba (cached on disk), or None."""
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is optional
        return None
    kernel = numba.njit(nogil=True, cache=True)(_row_suffix_py)
    # load (or compile) the float32 specialisation now, the common raster type
    one = np.ones(1)
    kernel(np.ones((1, 1), np.float32), np.zeros(1, np.int64), np.zeros(1, np.int64), one, one)
    return kernel


class _Lookup:
    """Where each fragment reads a strip's exclusive prefix sums.

    For a strip of ``rows x width`` cells flattened row by row, ``G[k]`` is the
    sum of the first ``k`` cells. The suffix sum of row ``r`` from column ``c``
    is ``G[(r + 1) width] - G[r width + min(c, width)]``, so a fragment adds
    ``a S(r, c) + b S(r, c + 1)``.

    ``G`` is needed only at the fragments' positions. When they are few compared
    with the strip's cells (coarse zones), those values come from one
    ``np.add.reduceat`` over the sorted positions (no float64 copy of the strip,
    no cumulative sum); otherwise from a full cumulative sum.
    """

    def __init__(self, frag: _Fragments, width: int, size: int, kernel: Callable | None = None):
        start = frag.row * width
        end = start + width
        ia = start + np.minimum(frag.col, width)
        ib = start + np.minimum(frag.col + 1, width)
        self.a, self.b = frag.a, frag.b
        self.row, self.col = frag.row, frag.col
        self.width = width
        self.size = size
        self.ca = (ia - start).astype(np.float64)
        self.cb = (ib - start).astype(np.float64)
        self.sparse = 3 * len(ia) * _SPARSE_FACTOR < size
        self.kernel = None if self.sparse else kernel
        if self.sparse:
            keys, inverse = np.unique(np.concatenate([[0], end, ia, ib]), return_inverse=True)
            m = len(ia)
            self.keys = keys
            self.starts = keys[keys < size]
            self.iend, self.ia, self.ib = (
                inverse[1 : m + 1],
                inverse[m + 1 : 2 * m + 1],
                inverse[2 * m + 1 :],
            )
        else:
            self.iend, self.ia, self.ib = end, ia, ib

    def prefix(self, values: np.ndarray) -> np.ndarray:
        """``G`` at the positions this lookup reads (dense: the whole vector)."""
        flat = values.reshape(-1)
        if self.sparse:
            g = np.zeros(len(self.keys), dtype=np.float64)
            if len(self.starts):
                seg = np.add.reduceat(flat, self.starts, dtype=np.float64)
                np.cumsum(seg, out=g[1 : len(seg) + 1])
            return g
        g = np.empty(flat.size + 1, dtype=np.float64)
        g[0] = 0.0
        g[1:] = flat
        np.cumsum(g, out=g)  # in place on float64: twice as fast as a casting cumsum
        return g

    def weighted(self, values: np.ndarray) -> np.ndarray:
        """Per-fragment sum of w_rc x_rc over the strip ``values``."""
        kernel = self.kernel
        if kernel is not None:
            x = values.reshape(-1, self.width)
            if x.dtype == np.bool_:
                x = x.view(np.uint8)
            return kernel(np.ascontiguousarray(x), self.row, self.col, self.a, self.b)
        g = self.prefix(values)
        ge = g[self.iend]
        return self.a * (ge - g[self.ia]) + self.b * (ge - g[self.ib])

    def ones(self) -> np.ndarray:
        """Per-fragment sum of w_rc (x = 1 everywhere)."""
        return self.a * (self.width - self.ca) + self.b * (self.width - self.cb)


# ------------------------------------------------------------------------------ engine
_ACCUMULATORS = ("sum", "count", "sum_u", "sum_v")


def _zonal_grid(
    geoms: np.ndarray,
    sources: Sequence[_Source],
    wanted: Mapping[str, set[str]],
    *,
    block_cells: int,
    threads: int,
    progress: bool | None,
) -> dict[str, dict[str, np.ndarray]]:
    """Accumulate per-zone sums for every source on one grid, strip by strip."""
    grid = sources[0].grid
    n_units = len(geoms)
    segs = _segments(geoms, grid)
    n = len(segs.zone)  # accumulate per distinct edge, map to units at the end
    out = {s.name: {k: np.zeros(n) for k in _ACCUMULATORS} for s in sources}
    if n == 0:
        return {s.name: {k: np.zeros(n_units) for k in _ACCUMULATORS} for s in sources}
    row0 = max(0, math.floor(segs.vmin[0]))
    row1 = min(grid.height, math.ceil(segs.vmax.max()))
    umin = min(segs.u0.min(), segs.u1.min())
    umax = max(segs.u0.max(), segs.u1.max())
    col0 = max(0, min(grid.width, math.floor(umin)))
    col1 = max(0, min(grid.width, math.ceil(umax)))
    if row1 <= row0 or col1 <= col0:
        return {s.name: {k: np.zeros(n_units) for k in _ACCUMULATORS} for s in sources}
    width = col1 - col0
    tile = max(1, min(s.block_height for s in sources))
    # whole tiles per strip (a tile row read twice costs a second read); the strip
    # is at least one tile high even if that exceeds block_cells
    strip = max(1, block_cells // max(width, 1))
    strip = max(tile, (strip // tile) * tile) if tile <= 1024 else strip
    starts = list(range(row0, row1, strip))
    u_center = np.arange(width, dtype=np.float64) + col0 + 0.5
    # fine zones (fragments in most rows) use numba kernels; importing numba and
    # loading their cached machine code costs ~0.3 s once per process
    fast = (
        3 * len(segs.zone) * _SPARSE_FACTOR >= strip * width and _row_suffix_kernel() is not None
    )

    def compute(r0: int, r1: int, data: Mapping[str, tuple]) -> dict[str, dict[str, np.ndarray]]:
        frag = (_fragments_fast if fast else _fragments)(segs, r0, r1, col0, col1)
        res: dict[str, dict[str, np.ndarray]] = {}
        if len(frag.zone) == 0:
            return res
        look = _Lookup(frag, width, (r1 - r0) * width, _row_suffix_kernel() if fast else None)
        v_center = frag.row + r0 + 0.5
        for src in sources:
            need = wanted[src.name]
            x, invalid = data[src.name]
            acc: dict[str, np.ndarray] = {}
            per = look.weighted(x)
            acc["sum"] = np.bincount(frag.zone, per, minlength=n)
            if "sum_v" in need:
                acc["sum_v"] = np.bincount(frag.zone, per * v_center, minlength=n)
            if "count" in need:
                cnt = look.ones() if invalid is None else look.weighted(~invalid)
                acc["count"] = np.bincount(frag.zone, cnt, minlength=n)
            if "sum_u" in need:
                acc["sum_u"] = np.bincount(frag.zone, look.weighted(x * u_center), minlength=n)
            res[src.name] = acc
        return res

    def read(r0: int) -> tuple[int, int, dict[str, tuple]]:
        r1 = min(r0 + strip, row1)
        return r0, r1, {s.name: s.read(r0, r1, col0, col1) for s in sources}

    desc = "zonal " + ", ".join(s.name for s in sources)
    from flowmodel.progress import progress_bar

    bar = progress_bar(
        total=len(starts), desc=desc, unit="strip", progress=_progress(progress, grid)
    )
    try:
        # reads (GDAL releases the GIL) run ahead in threads; the numpy work runs here,
        # so memory holds at most `threads + 1` strips
        with ThreadPoolExecutor(max(1, threads)) as pool:
            pending = [pool.submit(read, r0) for r0 in starts[: max(1, threads)]]
            nxt = len(pending)
            while pending:
                r0, r1, data = pending.pop(0).result()
                if nxt < len(starts):
                    pending.append(pool.submit(read, starts[nxt]))
                    nxt += 1
                _merge(out, compute(r0, r1, data))
                del data
                bar.update()
    finally:
        bar.close()
        for s in sources:
            s.close()
    sign = segs.sign
    for name, acc in out.items():
        for key in acc:
            acc[key] = sign * segs.to_zones(acc[key], n_units)
        if "count" in wanted[name]:
            # round-off leaves ~1e-11 where a unit covers no valid cell: make it exact
            empty = acc["count"] < 1e-9
            for key in acc:
                acc[key][empty] = 0.0
    return out


def _merge(out: dict, res: dict) -> None:
    for name, acc in res.items():
        for key, value in acc.items():
            out[name][key] += value


def _progress(progress: bool | None, grid: _Grid) -> bool | None:
    """Progress of one raster: small grids stay quiet unless asked (``progress=True``)."""
    if progress is None:
        return None if grid.width * grid.height >= 50_000_000 else False
    return progress


# ------------------------------------------------------------------ exactextract engine
#: ``engine`` choices of :func:`zonal_statistics` and :func:`zonal_covariates`.
Engine = Literal["flowmodel", "exactextract"]
_ENGINES = ("flowmodel", "exactextract")


@functools.cache
def _exactextract_sources() -> tuple[type, type]:
    """RasterSource classes over :class:`_Source` (exactextract imported on first use)."""
    from exactextract.raster import RasterSource

    class ValueSource(RasterSource):
        """A ``_Source`` seen by exactextract: the same reads, nodata and NaN mask.

        Cells are handed over north-up (row 0 = top) whatever the file's row order;
        invalid cells (nodata, NaN) come as NaN, which exactextract skips, so both
        engines skip the same cells.
        """

        def __init__(self, src: _Source):
            super().__init__()
            self.src = src
            t, g = src.grid.transform, src.grid
            self.flip = t.e > 0  # south-up: rows stored bottom first
            top = t.f + t.e * g.height if self.flip else t.f
            self._extent = (t.c, top - abs(t.e) * g.height, t.c + t.a * g.width, top)
            self._res = (abs(t.a), abs(t.e))
            self._wkt = g.crs.to_wkt()
            self.dataset = None  # one open handle for exactextract's many small reads
            if src.path is not None:
                import rasterio

                self.dataset = rasterio.open(src.path)
            self.set_name(src.name)

        def close(self) -> None:
            if self.dataset is not None:
                self.dataset.close()
                self.dataset = None

        def res(self) -> tuple[float, float]:
            return self._res

        def extent(self) -> tuple[float, float, float, float]:
            return self._extent

        def srs_wkt(self) -> str:
            return self._wkt

        def nodata_value(self) -> None:
            return None  # invalid cells are NaN in read_window

        def read_window(self, x0: int, y0: int, nx: int, ny: int) -> np.ndarray:
            # always float64 (exactextract wants one dtype per source; exact for
            # float32 and for integers below 2**53), invalid cells NaN, not a masked
            # array: exactextract 0.3.0 ignored the mask of some windows in our
            # tests (a unit wholly over nodata got count > 0)
            if nx <= 0 or ny <= 0:  # exactextract asks for empty windows too
                return np.zeros((max(ny, 0), max(nx, 0)), dtype=np.float64)
            r0 = self.src.grid.height - y0 - ny if self.flip else y0
            data, invalid = self.src.read(r0, r0 + ny, x0, x0 + nx, self.dataset)
            data = data.astype(np.float64)
            if invalid is not None:
                data[invalid] = np.nan
            return np.ascontiguousarray(data[::-1] if self.flip else data)

    class CenterSource(RasterSource):
        """Pixel-space cell centres (``u`` = column + 0.5 or ``v`` = row + 0.5) as weights."""

        def __init__(self, base: ValueSource, axis: str):
            super().__init__()
            self.base = base
            self.axis = axis
            self.set_name(f"{base.src.name}_{axis}")

        def res(self) -> tuple[float, float]:
            return self.base.res()

        def extent(self) -> tuple[float, float, float, float]:
            return self.base.extent()

        def srs_wkt(self) -> str:
            return self.base.srs_wkt()

        def nodata_value(self) -> None:
            return None

        def read_window(self, x0: int, y0: int, nx: int, ny: int) -> np.ndarray:
            if self.axis == "u":
                line = np.arange(x0, x0 + nx, dtype=np.float64) + 0.5
                return np.ascontiguousarray(np.broadcast_to(line[None, :], (ny, nx)))
            rows = np.arange(y0, y0 + ny, dtype=np.float64) + 0.5
            if self.base.flip:
                rows = self.base.src.grid.height - rows
            return np.ascontiguousarray(np.broadcast_to(rows[:, None], (ny, nx)))

    return ValueSource, CenterSource


def _zonal_grid_exactextract(
    geoms: np.ndarray,
    sources: Sequence[_Source],
    wanted: Mapping[str, set[str]],
    *,
    block_cells: int,
    progress: bool | None,
) -> dict[str, dict[str, np.ndarray]]:
    """Compute the accumulators of :func:`_zonal_grid` with ``exactextract.exact_extract``.

    ``sum`` and ``count`` are exactextract's ``sum`` and ``count``; the centroid
    moments ``sum_u`` / ``sum_v`` are its ``weighted_sum`` of the values with
    the cell centres (in pixel space) as weights.
    """
    from exactextract import exact_extract
    from exactextract.operation import Operation

    grid = sources[0].grid
    t = grid.transform
    if t.b != 0 or t.d != 0 or t.a <= 0:
        raise InputFileError(
            f"raster '{sources[0].name}' ({sources[0].where}) is rotated or stored east to "
            "west, which exactextract does not support. Fix: use engine='flowmodel'."
        )
    n_units = len(geoms)
    out = {s.name: {k: np.zeros(n_units) for k in _ACCUMULATORS} for s in sources}
    todo = np.flatnonzero(~(shapely.is_missing(geoms) | shapely.is_empty(geoms)))
    if len(todo) == 0:
        return out
    value_cls, center_cls = _exactextract_sources()
    # exactextract keeps raw pointers to the sources: hold them here until it is done
    keep: list[Any] = []
    ops = []
    fields: dict[str, tuple[str, str]] = {}
    features = gpd.GeoDataFrame(
        {"_flowmodel_row": todo}, geometry=geoms[todo], crs=grid.crs.to_wkt()
    )
    show = progress if progress is not None else grid.width * grid.height >= 50_000_000
    try:
        for i, src in enumerate(sources):
            base = value_cls(src)
            keep.append(base)
            for key in ("sum", "count", "sum_u", "sum_v"):
                if key not in wanted[src.name] | {"sum"}:
                    continue
                field = f"r{i}_{key}"
                fields[field] = (src.name, key)
                if key in ("sum", "count"):
                    ops.append(Operation(key, field, base))
                else:
                    center = center_cls(base, key[-1])
                    keep.append(center)
                    ops.append(Operation("weighted_sum", field, base, center))
        table = exact_extract(
            keep[:1],
            features,
            ops,
            include_cols=["_flowmodel_row"],
            output="pandas",
            strategy="feature-sequential",
            max_cells_in_memory=max(int(block_cells), 1),
            progress=bool(show),
        )
    finally:
        for source in keep:
            if isinstance(source, value_cls):
                source.close()
    rows = table["_flowmodel_row"].to_numpy(np.int64)
    for field, (name, key) in fields.items():
        out[name][key][rows] = table[field].to_numpy(np.float64)
    return out


# ------------------------------------------------------------------------- public API
def _unit_geoms(units: gpd.GeoDataFrame, id_field: str) -> tuple[pd.Index, gpd.GeoSeries]:
    if not isinstance(units, gpd.GeoDataFrame):
        raise InputFileError(
            f"units must be a GeoDataFrame with polygons, got {type(units).__name__}. "
            "Fix: load them with flowmodel.inputs.load_units()."
        )
    if len(units) == 0:
        raise InputFileError("units: the GeoDataFrame is empty. Fix: pass at least one polygon.")
    if units.crs is None:
        raise MissingCRSError(
            "units have no CRS. Fix: units.set_crs('EPSG:4326') (or the CRS of the "
            "coordinates), or load them with load_units()."
        )
    if id_field in units.columns:
        ids = pd.Index(units[id_field].astype(str), name="unit")
    elif units.index.name == id_field:
        ids = pd.Index(units.index.astype(str), name="unit")
    else:
        raise InputFileError(
            f"units: no id column '{id_field}' (columns: {list(units.columns)}). "
            "Fix: pass id_field=<name of the unit id column>."
        )
    return ids, units.geometry


def _to_grid_crs(geometry: gpd.GeoSeries, crs: CRS) -> np.ndarray:
    """Reproject polygons (densified first, so straight edges follow the projection)."""
    if geometry.crs is not None and CRS(geometry.crs) == crs:
        return np.asarray(geometry.values)
    g = np.asarray(geometry.values)
    area = shapely.area(g)
    seg = np.where(area > 0, np.sqrt(np.maximum(area, 0)) / 50.0, np.inf)
    dense = shapely.segmentize(g, np.where(np.isfinite(seg) & (seg > 0), seg, 1e300))
    return np.asarray(gpd.GeoSeries(dense, crs=geometry.crs).to_crs(crs).values)


def _xy(t: Affine, u: Any, v: Any) -> tuple[Any, Any]:
    """Pixel (column, row) to CRS coordinates."""
    return t.a * u + t.b * v + t.c, t.d * u + t.e * v + t.f


def _extent_share(geoms: np.ndarray, grid: _Grid) -> np.ndarray:
    """Share of each polygon's area inside the raster's extent."""
    t = grid.transform
    corners = np.array(
        [
            _xy(t, 0, 0),
            _xy(t, grid.width, 0),
            _xy(t, grid.width, grid.height),
            _xy(t, 0, grid.height),
        ]
    )
    extent = shapely.Polygon(corners)
    area = shapely.area(geoms)
    share = np.ones(len(geoms))
    inside = shapely.contains_properly(extent, geoms)
    todo = ~inside & (area > 0)
    if todo.any():
        share[todo] = shapely.area(shapely.intersection(geoms[todo], extent)) / area[todo]
    return share


def _pixel_area(geoms: np.ndarray, grid: _Grid) -> np.ndarray:
    t = grid.transform
    return shapely.area(geoms) / abs(t.a * t.e - t.b * t.d)


def _check_overlap(ids: pd.Index, share: np.ndarray, src: _Source, geoms: np.ndarray) -> None:
    if not np.any(share > 0):
        ub = shapely.total_bounds(geoms)
        t = src.grid.transform
        corner = _xy(t, src.grid.width, src.grid.height)
        x = sorted([t.c, corner[0]])
        y = sorted([t.f, corner[1]])
        raise NoOverlapError(
            f"raster '{src.name}' ({src.where}) does not overlap any unit: raster bounds "
            f"x {x[0]:.6g}..{x[1]:.6g}, y {y[0]:.6g}..{y[1]:.6g}; units (reprojected to "
            f"{src.grid.crs.to_string()}) x {ub[0]:.6g}..{ub[2]:.6g}, y {ub[1]:.6g}..{ub[3]:.6g}. "
            "Fix: check that both declare the right CRS and cover the same area."
        )
    outside = share < 1.0 - 1e-9
    if outside.any():
        wholly = ids[share <= 0]
        partly = ids[outside & (share > 0)]
        parts = []
        if len(wholly):
            parts.append(f"wholly outside: {_fmt_ids(wholly)}")
        if len(partly):
            parts.append(f"partly outside: {_fmt_ids(partly)}")
        warnings.warn(
            f"raster '{src.name}' ({src.where}): {int(outside.sum())} unit(s) lie outside its "
            f"extent ({'; '.join(parts)}). Their statistics cover only the part inside "
            "(see raster_coverage); give a raster covering every unit to fix this.",
            RasterCoverageWarning,
            stacklevel=3,
        )


def _run(
    units: gpd.GeoDataFrame,
    rasters: Mapping[str, Any],
    wanted: Mapping[str, set[str]],
    *,
    id_field: str,
    block_cells: int,
    threads: int | None,
    progress: bool | None,
    engine: Engine = "flowmodel",
    scale: Mapping[str, float] | None = None,
) -> tuple[pd.Index, dict[str, dict[str, np.ndarray]], dict[str, _Source], dict[str, tuple]]:
    if engine not in _ENGINES:
        raise InputFileError(f"unknown engine {engine!r}. Fix: use one of {list(_ENGINES)}.")
    unknown = sorted(set(scale or {}) - set(rasters))
    if unknown:
        raise InputFileError(
            f"scale names raster(s) {unknown}, which are not in rasters ({list(rasters)}). "
            "Fix: use the same names."
        )
    ids, geometry = _unit_geoms(units, id_field)
    sources = {
        name: _Source(name, path, (scale or {}).get(name, 1.0)) for name, path in rasters.items()
    }
    threads = threads if threads is not None else min(4, os.cpu_count() or 1)
    by_grid: dict[tuple, list[_Source]] = {}
    for src in sources.values():
        by_grid.setdefault(src.grid.key(), []).append(src)
    results: dict[str, dict[str, np.ndarray]] = {}
    extras: dict[str, tuple] = {}
    geoms_by_crs: dict[str, np.ndarray] = {}
    for group in by_grid.values():
        grid = group[0].grid
        wkt = grid.crs.to_wkt()
        if wkt not in geoms_by_crs:
            geoms_by_crs[wkt] = _to_grid_crs(geometry, grid.crs)
        geoms = geoms_by_crs[wkt]
        share = _extent_share(geoms, grid)
        for src in group:
            _check_overlap(ids, share, src, geoms)
        if engine == "exactextract":
            res = _zonal_grid_exactextract(
                geoms, group, wanted, block_cells=block_cells, progress=progress
            )
        else:
            res = _zonal_grid(
                geoms, group, wanted, block_cells=block_cells, threads=threads, progress=progress
            )
        area = _pixel_area(geoms, grid)
        for src in group:
            results[src.name] = res[src.name]
            extras[src.name] = (area, share, grid)
    return ids, results, sources, extras


def zonal_statistics(
    units: gpd.GeoDataFrame,
    raster: str | os.PathLike[str] | Any,
    *,
    stats: Sequence[str] = ("sum", "mean", "count", "coverage"),
    id_field: str = "unit_id",
    block_cells: int = 4_000_000,
    threads: int | None = None,
    progress: bool | None = None,
    engine: Engine = "flowmodel",
    scale: float = 1.0,
) -> pd.DataFrame:
    """Exact coverage-weighted zonal statistics of one raster band.

    Parameters
    ----------
    units
        GeoDataFrame of polygons with a CRS (reprojected to the raster's CRS).
    raster
        GeoTIFF path (band 1), or an ``xarray.DataArray`` with a rioxarray CRS and
        transform (numpy- or dask-backed).
    stats
        Any of ``"sum"`` (sum of value x covered fraction), ``"mean"`` (sum /
        count), ``"count"`` (covered valid cells, fractional) and ``"coverage"``
        (share of the unit's area covered by valid cells, 0-1).
    id_field
        Unit id column (or index name) of ``units``.
    block_cells
        Cells per strip read at once, rounded to whole tile rows (at least one).
        Memory is about 15 bytes per cell for each of the ``threads + 1``
        strips in flight, whatever the raster size.
    threads
        Reader threads running ahead of the computation (default
        ``min(4, cpu_count)``).
    progress
        Progress bar over strips; ``None`` shows it for rasters of >= 50 M cells.
    engine
        ``"flowmodel"`` (default): the blockwise engine of this module.
        ``"exactextract"``: the same statistics from ``exactextract.exact_extract``
        (the reference implementation of the coverage fractions), after the same
        reprojection, nodata handling and checks; ``block_cells`` becomes its
        ``max_cells_in_memory`` and ``threads`` is unused. Both agree within
        1e-6 relative (tested).
    scale
        Factor applied to every value read (``sum`` and ``mean`` scale with it):
        what one value stands for, e.g. 400 for a raster of *mean* persons per
        30-arc-second cell aggregated to 10-arc-minute blocks (WorldPop's Africa
        rasters), whose sums would otherwise be 1/400 of the population.

    Returns
    -------
    pandas.DataFrame
        Indexed by unit id (index name ``unit``), one column per statistic.

    Raises
    ------
    InputFileError
        Missing or unreadable raster, units without the id column.
    MissingCRSError
        The raster or the units lack a CRS.
    NoOverlapError
        The raster overlaps no unit.
    """
    bad = [s for s in stats if s not in _KNOWN_STATS]
    if bad:
        raise InputFileError(f"unknown statistics {bad}. Fix: use some of {list(_KNOWN_STATS)}.")
    need = {"sum"}
    if {"mean", "count", "coverage"} & set(stats):
        need.add("count")
    ids, res, _, extras = _run(
        units,
        {"raster": raster},
        {"raster": need},
        id_field=id_field,
        block_cells=block_cells,
        threads=threads,
        progress=progress,
        engine=engine,
        scale={"raster": scale},
    )
    acc = res["raster"]
    area = extras["raster"][0]
    cols: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for s in stats:
            if s == "sum":
                cols[s] = acc["sum"]
            elif s == "count":
                cols[s] = acc["count"]
            elif s == "mean":
                cols[s] = np.where(acc["count"] > 0, acc["sum"] / acc["count"], np.nan)
            else:
                cols[s] = np.clip(np.where(area > 0, acc["count"] / area, 0.0), 0.0, 1.0)
    return pd.DataFrame(cols, index=ids)


def zonal_covariates(
    units: gpd.GeoDataFrame,
    rasters: Mapping[str, str | os.PathLike[str] | Any],
    *,
    id_field: str = "unit_id",
    stats: Mapping[str, str] | None = None,
    progress: bool | None = None,
    block_cells: int = 4_000_000,
    threads: int | None = None,
    engine: Engine = "flowmodel",
    scale: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Compute the unit covariates of a FlowDataset from rasters.

    Parameters
    ----------
    units
        GeoDataFrame of unit polygons with a CRS (e.g. from
        :func:`~flowmodel.inputs.load_units`); they are reprojected to each
        raster's CRS, rasters are never resampled.
    rasters
        ``name -> GeoTIFF path`` (or ``xarray.DataArray``). Well-known names:
        ``population`` (persons per cell; gives ``population``, the
        population-weighted centroid ``lon``/``lat`` and ``raster_coverage``),
        ``built_up`` (share 0-1; mean), ``night_lights`` (radiance; sum, and
        ``night_lights_per_capita`` when ``population`` is given). Any other
        name gives a column of that name (mean by default).
    id_field
        Unit id column (or index name) of ``units``.
    stats
        ``name -> "sum" | "mean"`` overriding :data:`DEFAULT_STATS`.
    progress
        Progress bars over raster strips; ``None`` shows them for large rasters.
    block_cells, threads, engine
        See :func:`zonal_statistics`.
    scale
        ``name -> factor`` applied to that raster's values (see
        :func:`zonal_statistics`), e.g. ``{"population": 400}`` for a raster of
        mean persons per sub-cell.

    Returns
    -------
    pandas.DataFrame
        Indexed by unit id (index name ``unit``): ``population``, ``lon``, ``lat``
        (EPSG:4326; the area centroid where a unit holds no population),
        ``built_up``, ``night_lights``, ``night_lights_per_capita``,
        ``raster_coverage`` (share of the unit's area covered by valid pixels of
        the population raster, or of the first raster), as available, then
        other rasters.

    Raises
    ------
    InputFileError
        Missing or unreadable raster, unknown statistic.
    MissingCRSError
        A raster or the units lack a CRS.
    NoOverlapError
        A raster overlaps no unit.

    Warns
    -----
    RasterCoverageWarning
        Units lie partly or wholly outside a raster (ids listed).
    """
    if not rasters:
        raise InputFileError(
            "zonal_covariates: no rasters given. Fix: pass e.g. {'population': 'population.tif'}."
        )
    chosen = {name: DEFAULT_STATS.get(name, "mean") for name in rasters}
    for name, stat in (stats or {}).items():
        if name not in rasters:
            raise InputFileError(
                f"stats names raster '{name}', which is not in rasters ({list(rasters)}). "
                "Fix: use the same names."
            )
        if stat not in ("sum", "mean"):
            raise InputFileError(f"stats['{name}'] = {stat!r}; use 'sum' or 'mean'.")
        chosen[name] = stat
    first = next(iter(rasters))
    cov_name = "population" if "population" in rasters else first
    wanted = {name: {"sum", "count"} for name in rasters}
    if "population" in rasters:
        wanted["population"] |= {"sum_u", "sum_v"}
    ids, res, sources, extras = _run(
        units,
        rasters,
        wanted,
        id_field=id_field,
        block_cells=block_cells,
        threads=threads,
        progress=progress,
        engine=engine,
        scale=scale,
    )
    _check_valid_data(ids, res, sources, extras)
    out = pd.DataFrame(index=ids)
    with np.errstate(invalid="ignore", divide="ignore"):
        for name in rasters:
            acc = res[name]
            if chosen[name] == "sum":
                out[name] = acc["sum"]
            else:
                out[name] = np.where(acc["count"] > 0, acc["sum"] / acc["count"], np.nan)
        if "population" in rasters:
            acc = res["population"]
            grid = extras["population"][2]
            lon, lat = _weighted_centroid(acc, grid)
            lon_a, lat_a = _area_centroid(units.geometry)
            empty = ~(acc["sum"] > 0)
            out.insert(1, "lon", np.where(empty, lon_a, lon))
            out.insert(2, "lat", np.where(empty, lat_a, lat))
        if "night_lights" in rasters and "population" in rasters:
            pop = out["population"].to_numpy()
            out["night_lights_per_capita"] = np.where(
                pop > 0, out["night_lights"].to_numpy() / pop, np.nan
            )
        area = extras[cov_name][0]
        out["raster_coverage"] = np.clip(
            np.where(area > 0, res[cov_name]["count"] / area, 0.0), 0.0, 1.0
        )
    order = [
        c
        for c in (
            "population",
            "lon",
            "lat",
            "built_up",
            "night_lights",
            "night_lights_per_capita",
            "raster_coverage",
        )
        if c in out.columns
    ]
    return out[order + [c for c in out.columns if c not in order]]


def _check_valid_data(
    ids: pd.Index,
    res: Mapping[str, Mapping[str, np.ndarray]],
    sources: Mapping[str, _Source],
    extras: Mapping[str, tuple],
) -> None:
    """Refuse covariates that would be silently wrong: no valid pixel, or an unknown population.

    A raster whose every pixel under the units is nodata gives nothing; a unit
    with no population because part of it lies outside the population raster
    (or on its nodata pixels) has an unknown population, not 0 - the fix is the
    raster's extent, whatever a model would later say about ``log(0)``.
    """
    for name, src in sources.items():
        if not np.any(res[name]["count"] > 0):
            nodata = "NaN" if src.nodata is None or math.isnan(src.nodata) else f"{src.nodata:g}"
            raise NoOverlapError(
                f"raster '{name}' ({src.where}): every pixel under the units is nodata "
                f"(nodata = {nodata}), so it gives no value for any of the {len(ids)} units. "
                "Fix: check that the raster covers the units' area (gdalinfo shows its extent) "
                "and that its nodata value is right."
            )
    if "population" not in sources:
        return
    src = sources["population"]
    area, share, _ = extras["population"]
    acc = res["population"]
    with np.errstate(invalid="ignore", divide="ignore"):
        coverage = np.where(area > 0, acc["count"] / area, 0.0)
    # no valid pixel at all, or none with people and part of the unit outside the extent
    # (valid zeros beside a few nodata pixels inside the extent are a real 0)
    unknown = ~(acc["sum"] > 0) & ((coverage <= 0) | (share < 1.0 - 1e-9))
    if unknown.any():
        outside = unknown & (share < 1.0 - 1e-9)
        parts = []
        if outside.any():
            parts.append(f"outside its extent (wholly or partly): {_fmt_ids(ids[outside])}")
        if (unknown & ~outside).any():
            parts.append(f"on nodata pixels: {_fmt_ids(ids[unknown & ~outside])}")
        raise NoOverlapError(
            f"raster 'population' ({src.where}): {int(unknown.sum())} unit(s) get no population "
            f"because they lie {'; '.join(parts)}. Their population is unknown, not 0 (a "
            "model would fail on log(0)). Fix: give a population raster whose extent covers "
            "every unit (check with gdalinfo; mosaic the neighbouring tiles, e.g. gdalbuildvrt), "
            "or drop those units (load_units(..., query=...); in a run config [units] query)."
        )


def _weighted_centroid(
    acc: Mapping[str, np.ndarray], grid: _Grid
) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(invalid="ignore", divide="ignore"):
        u = acc["sum_u"] / acc["sum"]
        v = acc["sum_v"] / acc["sum"]
    t = grid.transform
    x = t.a * u + t.b * v + t.c
    y = t.d * u + t.e * v + t.f
    to_lonlat: Callable = Transformer.from_crs(grid.crs, "EPSG:4326", always_xy=True).transform
    lon, lat = to_lonlat(x, y)
    return np.asarray(lon), np.asarray(lat)


def _area_centroid(geometry: gpd.GeoSeries) -> tuple[np.ndarray, np.ndarray]:
    cent = geometry.to_crs("EPSG:6933").centroid.to_crs("EPSG:4326")
    return cent.x.to_numpy(), cent.y.to_numpy()


def zonal_covariates_by_date(
    units: gpd.GeoDataFrame,
    rasters: Mapping[str, Mapping[str, str | os.PathLike[str] | Any]],
    *,
    id_field: str = "unit_id",
    stats: Mapping[str, str] | None = None,
    progress: bool | None = None,
    engine: Engine = "flowmodel",
    scale: Mapping[str, float] | None = None,
) -> pd.DataFrame:
    """Compute unit covariates from one raster per date (covariates that change over time).

    Parameters
    ----------
    units
        Unit polygons, as for :func:`zonal_covariates`.
    rasters
        ``name -> {date label -> GeoTIFF}``, e.g. ``{"population": {"2000":
        "pop2000.tif", "2020": "pop2020.tif"}}``; a date label is a year or any
        period label of :mod:`flowmodel.periods` (its midpoint is the date).
    id_field, stats, progress, engine, scale
        As for :func:`zonal_covariates` (``scale`` applies to every date of a raster).

    Returns
    -------
    pandas.DataFrame
        Long table: ``unit_id``, ``period`` (the date label) and one column per
        raster name (the statistic :func:`zonal_covariates` gives it), one row
        per unit and date; ready for :func:`flowmodel.periods.add_dated_covariates`,
        which interpolates log-linearly between dates.
    """
    unknown = sorted(set(scale or {}) - set(rasters))
    if unknown:
        raise InputFileError(
            f"scale names raster(s) {unknown}, which are not in rasters ({list(rasters)}). "
            "Fix: use the same names."
        )
    frames = []
    dates = sorted({str(d) for per in rasters.values() for d in per})
    for date in dates:
        at = {name: p for name, per in rasters.items() for d, p in per.items() if str(d) == date}
        table = zonal_covariates(
            units,
            at,
            id_field=id_field,
            stats=stats,
            progress=progress,
            engine=engine,
            scale={k: v for k, v in (scale or {}).items() if k in at} or None,
        )
        keep = [c for c in table.columns if c in at or c == "night_lights_per_capita"]
        frame = table[keep].copy()
        frame.insert(0, "period", date)
        frame.insert(0, "unit_id", frame.index.astype(str))
        frames.append(frame.reset_index(drop=True))
    return pd.concat(frames, ignore_index=True)
