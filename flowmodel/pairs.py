"""Pair features: geodesic distance, cross-border and contiguity flags.

Dims follow DESIGN §3: ``origin`` x ``destination`` (dense), both indexed by
the unit ids. The diagonal (i = j) is NaN in every float pair variable.
"""

from __future__ import annotations

import numpy as np
import xarray as xr
from pyproj import Geod

__all__ = ["cross_border", "geodesic_distance_km"]

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
