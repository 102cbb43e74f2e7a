"""Load and validate administrative unit polygons .

Reads GeoPackage, GeoJSON, Shapefile and GeoParquet through pyogrio / pyarrow
and returns a GeoDataFrame with the normalised columns ``unit_id``, ``country``,
optional ``name`` and ``geometry``, ready for :func:`flowmodel.inputs.rasters.zonal_covariates`
and :func:`flowmodel.dataset.build_dataset`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from flowmodel.exceptions import DataContractError, InputFileError, MissingCRSError

__all__ = ["UnitGeometryWarning", "load_units", "validate_units"]

MAX_IDS = 10
_PARQUET_SUFFIXES = (".parquet", ".geoparquet", ".pq")


class UnitGeometryWarning(UserWarning):
    """Unit geometries were repaired (``make_valid``) or are suspicious."""


def _fmt_ids(ids: Iterable[Any]) -> str:
    ids = [str(i) for i in ids]
    more = f" (and {len(ids) - MAX_IDS} more)" if len(ids) > MAX_IDS else ""
    return ", ".join(ids[:MAX_IDS]) + more


def _read(path: Path, layer: str | int | None) -> gpd.GeoDataFrame:
    if path.suffix.lower() in _PARQUET_SUFFIXES:
        return gpd.read_parquet(path)
    import pyogrio

    if layer is None:
        layers = pyogrio.list_layers(path)
        if len(layers) > 1:
            names = [str(name) for name in layers[:, 0]]
            raise InputFileError(
                f"{path}: holds {len(names)} layers ({', '.join(names)}). "
                "Fix: pass layer=<name of the units layer>."
            )
    else:
        names = [str(name) for name in pyogrio.list_layers(path)[:, 0]]
        if isinstance(layer, str) and layer not in names:
            raise InputFileError(
                f"{path}: no layer '{layer}' (layers: {', '.join(names)}). Fix: pass one of them."
            )
    return gpd.read_file(path, layer=layer, engine="pyogrio")


def load_units(
    path: str | os.PathLike[str],
    *,
    id_field: str,
    country_field: str,
    layer: str | int | None = None,
    name_field: str | None = None,
    fields: Sequence[str] = (),
) -> gpd.GeoDataFrame:
    """Read admin polygons and normalise them to the unit table of a FlowDataset.

    Parameters
    ----------
    path
        GeoPackage, GeoJSON, Shapefile or GeoParquet (``.parquet``) file.
    id_field
        Column holding the unit ids (any type; converted to strings).
    country_field
        Column holding the country code of each unit (multi-country inputs are
        normal: cross-border flows).
    layer
        Layer name or index, required when the file holds several layers.
    name_field
        Optional column with human-readable unit names (copied to ``name``).
    fields
        Further fields to keep as text columns, e.g. ``["admin1"]``: levels
        that census tables may name (``origin_level="admin1"``).

    Returns
    -------
    geopandas.GeoDataFrame
        Columns ``unit_id`` (str), ``country`` (str), ``name`` (when
        ``name_field`` is given) and ``geometry``, in file order, with the file's
        CRS. Invalid geometries are repaired with ``shapely.make_valid`` and a
        :class:`UnitGeometryWarning` lists their ids.

    Raises
    ------
    InputFileError
        The file is missing or unreadable, the layer is empty or ambiguous, or a
        field is absent.
    MissingCRSError
        The file declares no CRS.
    DataContractError
        Ids are null or duplicated, country codes are missing, or a geometry is
        empty / null.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: file not found. Fix: check the path (cwd is {Path.cwd()}).")
    try:
        raw = _read(path, layer)
    except InputFileError:
        raise
    except Exception as exc:  # pyogrio / pyarrow errors carry the detail
        raise InputFileError(
            f"{path}: cannot be read as polygons ({type(exc).__name__}: {exc}). "
            "Fix: give a GeoPackage, GeoJSON, Shapefile or GeoParquet file."
        ) from exc
    where = f"{path}" + (f" (layer {layer!r})" if layer is not None else "")
    if len(raw) == 0:
        raise InputFileError(
            f"{where}: the layer is empty (0 features). Fix: check the layer name."
        )
    for role, field in (
        ("id_field", id_field),
        ("country_field", country_field),
        ("name_field", name_field),
        *(("fields", f) for f in fields),
    ):
        if field is not None and field not in raw.columns:
            cols = [c for c in raw.columns if c != raw.geometry.name]
            raise InputFileError(
                f"{where}: no field '{field}' for {role} (fields: {', '.join(map(str, cols))}). "
                f"Fix: pass {role}=<one of them>."
            )
    if raw.crs is None:
        raise MissingCRSError(
            f"{where}: no coordinate reference system. Fix: add one, e.g. "
            "gdf.set_crs('EPSG:4326') and re-save, or `ogr2ogr -a_srs EPSG:4326`."
        )
    out = gpd.GeoDataFrame(
        {"unit_id": _as_str(raw[id_field]), "country": _as_str(raw[country_field])},
        geometry=raw.geometry.values,
        crs=raw.crs,
    )
    if name_field is not None:
        out.insert(2, "name", _as_str(raw[name_field]))
    for f in fields:
        out.insert(len(out.columns) - 1, str(f), _as_str(raw[f]))
    return validate_units(out, source=where, id_field=id_field, country_field=country_field)


def _as_str(col: pd.Series) -> pd.Series:
    """Ids/codes as strings, nulls kept as None; integral floats lose their '.0'."""
    values = col.to_numpy(dtype=object)
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            out.append(None)
        elif isinstance(v, float) and v.is_integer():
            out.append(str(int(v)))
        else:
            out.append(str(v).strip())
    return pd.Series(out, index=col.index, dtype=object)


def validate_units(
    units: gpd.GeoDataFrame,
    *,
    source: str = "units",
    id_field: str = "unit_id",
    country_field: str = "country",
) -> gpd.GeoDataFrame:
    """Check a normalised unit table; repair invalid geometries with a warning.

    Parameters
    ----------
    units
        GeoDataFrame with ``unit_id``, ``country`` and ``geometry``.
    source
        Name used in messages (file and layer).
    id_field, country_field
        Original field names, for messages.

    Returns
    -------
    geopandas.GeoDataFrame
        ``units`` with repaired geometries.

    Raises
    ------
    MissingCRSError
        ``units`` has no CRS.
    DataContractError
        Null or duplicate ids, missing country codes, empty or null geometries,
        one geometry under several ids.
    """
    if units.crs is None:
        raise MissingCRSError(
            f"{source}: no coordinate reference system. Fix: units.set_crs('EPSG:4326') "
            "(or the CRS the coordinates are in)."
        )
    ids = units["unit_id"]
    null = ids.isna() | (ids.astype(str) == "")
    if null.any():
        rows = np.flatnonzero(null.to_numpy())
        raise DataContractError(
            f"{source}: field '{id_field}' is null in {null.sum()} feature(s), rows "
            f"{_fmt_ids(rows)}. Fix: give every unit an id, or drop those features."
        )
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise DataContractError(
            f"{source}: field '{id_field}' holds duplicate ids {_fmt_ids(dup)}. Fix: dissolve "
            "multi-part units first (gdf.dissolve(by=id_field)) or choose a unique id field."
        )
    country = units["country"]
    bad = ids[country.isna() | (country.astype(str).isin(["", "nan", "None"]))]
    if len(bad):
        raise DataContractError(
            f"{source}: field '{country_field}' (country code) is missing for units "
            f"{_fmt_ids(bad)}. Fix: fill the country codes (any string works, e.g. ISO3)."
        )
    geom = units.geometry.values
    empty = shapely.is_missing(geom) | shapely.is_empty(geom)
    if empty.any():
        raise DataContractError(
            f"{source}: units {_fmt_ids(ids[empty])} have a null or empty geometry. Fix: drop them "
            "or give them polygons."
        )
    same = pd.Series(shapely.to_wkb(shapely.normalize(geom)), index=np.asarray(ids))
    twice = same[same.duplicated(keep=False)]
    if len(twice):
        groups = ["=".join(map(str, group.index)) for _, group in twice.groupby(twice, sort=False)]
        raise DataContractError(
            f"{source}: {len(groups)} geometr(ies) appear under more than one unit id: "
            f"{_fmt_ids(groups)} (a duplicated feature?). Fix: keep one feature per unit; two "
            "units with one polygon have no distance between them."
        )
    not_poly = ~np.isin(shapely.get_type_id(geom), (3, 6, 7))  # Polygon, MultiPolygon, collection
    if not_poly.any():
        raise DataContractError(
            f"{source}: units {_fmt_ids(ids[not_poly])} are not polygons "
            f"({', '.join(sorted(set(units.geom_type[not_poly])))}). Fix: give admin polygons; "
            "for points use a table with lon/lat and build_dataset directly."
        )
    invalid = ~shapely.is_valid(geom)
    if invalid.any():
        warnings.warn(
            f"{source}: {invalid.sum()} invalid geometries repaired with make_valid: units "
            f"{_fmt_ids(ids[invalid])}. Check them if the areas matter.",
            UnitGeometryWarning,
            stacklevel=3,
        )
        units = units.copy()
        fixed = shapely.make_valid(geom[invalid])
        # keep only the areal part of what make_valid returns
        fixed = np.array([_polygonal(g) for g in fixed], dtype=object)
        new = geom.copy()
        new[invalid] = fixed
        units = units.set_geometry(gpd.GeoSeries(new, index=units.index, crs=units.crs))
    return units


def _polygonal(g: shapely.Geometry) -> shapely.Geometry:
    if g.geom_type in ("Polygon", "MultiPolygon"):
        return g
    parts = [p for p in getattr(g, "geoms", []) if p.geom_type in ("Polygon", "MultiPolygon")]
    if not parts:
        return g
    return shapely.union_all(parts)
