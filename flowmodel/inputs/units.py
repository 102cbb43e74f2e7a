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

__all__ = ["UnitGeometryWarning", "concat_units", "load_units", "validate_units"]

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
    country_field: str | None = None,
    country: str | None = None,
    layer: str | int | None = None,
    name_field: str | None = None,
    fields: Sequence[str] = (),
    id_prefix: str = "",
    query: str | None = None,
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
    country
        The country code of every unit, for a file of one country that has no
        such column (national statistics offices rarely add one, e.g. Tanzania's
        NBS regions). Give ``country_field`` or ``country``, not both.
    layer
        Layer name or index, required when the file holds several layers.
    name_field
        Optional column with human-readable unit names (copied to ``name``).
    fields
        Further fields to keep as text columns, e.g. ``["admin1"]``: levels
        that census tables may name (``origin_level="admin1"``).
    id_prefix
        Text put before every id, e.g. ``"TZA-"``: offices number their units
        from 1 in every country (Rwanda's district 11 and Tanzania's region 11),
        and ids must be unique across the files of a run. Flow tables then name
        the prefixed ids.
    query
        Keep only the features for which this :meth:`pandas.DataFrame.query`
        expression on the file's own fields is true, e.g. ``"Region_Cod <
        '51'"`` (Tanzania's mainland: the Zanzibar regions lie on the nodata
        cells of a continent-masked raster).

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
    if (country_field is None) == (country is None):
        raise DataContractError(
            f"{path}: load_units needs the units' country: give country_field=<column with "
            "the country codes> or, for a file of one country, country=<its code> (e.g. "
            "'TZA')" + (", not both." if country is not None else ".")
        )
    if country is not None and not str(country).strip():
        raise DataContractError(
            f"{path}: country={country!r} is empty. Fix: give the country's code, e.g. 'TZA'."
        )
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
    if query is not None:
        raw = _query(raw, query, where)
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
    codes = (
        _as_str(raw[country_field])
        if country_field is not None
        else pd.Series(str(country).strip(), index=raw.index, dtype=object)
    )
    out = gpd.GeoDataFrame(
        {
            "unit_id": _as_str(raw[id_field]).map(lambda v: v if v is None else id_prefix + v),
            "country": codes,
        },
        geometry=raw.geometry.values,
        crs=raw.crs,
    )
    if name_field is not None:
        out.insert(2, "name", _as_str(raw[name_field]))
    for f in fields:
        out.insert(len(out.columns) - 1, str(f), _as_str(raw[f]))
    return validate_units(
        out, source=where, id_field=id_field, country_field=country_field or "country"
    )


def concat_units(
    frames: Sequence[gpd.GeoDataFrame], sources: Sequence[str | os.PathLike[str]] | None = None
) -> gpd.GeoDataFrame:
    """Concatenate unit tables from several files (e.g. one per country) into one.

    Parameters
    ----------
    frames
        Unit tables from :func:`load_units`, in the order the units should have.
    sources
        What each frame was read from (file names), for messages; default
        ``units[0]``, ``units[1]``, ...

    Returns
    -------
    geopandas.GeoDataFrame
        The units of every frame, in the CRS of the first (the others are
        reprojected: e.g. Tanzania's Arc 1960 regions beside WGS 84 polygons;
        a datum shift, not a relabelling). Columns missing from a frame
        (``name``, further fields) are null there.

    Raises
    ------
    DataContractError
        A unit id appears in two frames (ids must be unique across files).
    """
    if not frames:
        raise DataContractError("concat_units: no unit tables given. Fix: pass at least one.")
    names = [str(s) for s in sources] if sources is not None else None
    if names is None or len(names) != len(frames):
        names = [f"units[{i}]" for i in range(len(frames))]
    if len(frames) == 1:
        return frames[0]
    seen: dict[str, str] = {}
    for name, frame in zip(names, frames, strict=True):
        twice = sorted({u for u in frame["unit_id"] if u in seen})
        if twice:
            first = sorted({seen[u] for u in twice})
            raise DataContractError(
                f"{name}: unit id(s) {twice[:10]} are also in {', '.join(first)} "
                f"({len(twice)} shared). Fix: list each unit in one file only, or prefix "
                "the ids per file so that they are unique across the files (load_units("
                "..., id_prefix='TZA-'); in a run config a [units] path entry "
                "{ path = ..., id_prefix = 'TZA-' }); flow tables then name the prefixed ids."
            )
        seen.update(dict.fromkeys(frame["unit_id"], name))
    crs = frames[0].crs
    frames = [f.to_crs(crs) if f.crs != crs else f for f in frames]
    _warn_overlaps_across(frames, names)
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=crs)


#: Overlap (km²) between units of two files above which :func:`concat_units` warns.
OVERLAP_WARN_KM2 = 1.0


def _warn_overlaps_across(frames: Sequence[gpd.GeoDataFrame], names: Sequence[str]) -> None:
    """Warn when units of different files overlap (their zonal sums count people twice).

    Boundaries of neighbouring countries from different offices rarely agree: Kenya's
    DHS Rift Valley and Tanzania's NBS Arusha share 161 km². Areas are measured in an
    equal-area CRS (EPSG:6933).
    """
    found: list[tuple[float, str, str]] = []
    for i in range(len(frames)):
        for j in range(i + 1, len(frames)):
            a, b = frames[i], frames[j]
            left, right = b.sindex.query(a.geometry, predicate="intersects")
            if not len(left):
                continue
            # frames not from load_units may hold invalid polygons: intersect repaired copies
            ga = shapely.make_valid(a.geometry.iloc[left].to_crs("EPSG:6933").values)
            gb = shapely.make_valid(b.geometry.iloc[right].to_crs("EPSG:6933").values)
            km2 = shapely.area(shapely.intersection(ga, gb)) / 1e6
            for k in np.flatnonzero(km2 > OVERLAP_WARN_KM2):
                ua, ub = a["unit_id"].iloc[left[k]], b["unit_id"].iloc[right[k]]
                found.append(
                    (
                        float(km2[k]),
                        f"{ua} ({Path(names[i]).name})",
                        f"{ub} ({Path(names[j]).name})",
                    )
                )
    if not found:
        return
    found.sort(reverse=True)
    listed = "; ".join(f"{x} and {y}: {km2:,.1f} km²" for km2, x, y in found[:MAX_IDS])
    more = f" (and {len(found) - MAX_IDS} more)" if len(found) > MAX_IDS else ""
    warnings.warn(
        f"{len(found)} pair(s) of units from different files overlap by more than "
        f"{OVERLAP_WARN_KM2:g} km² ({sum(f[0] for f in found):,.0f} km² in all): {listed}{more}. "
        "Zonal statistics count the people living there in both units. Fix, if it matters: "
        "clip one country's units by the other's (geopandas overlay how='difference') "
        "before loading them.",
        UnitGeometryWarning,
        stacklevel=3,
    )


def _query(raw: gpd.GeoDataFrame, query: str, where: str) -> gpd.GeoDataFrame:
    """Apply a unit-selection query, naming the file, the query and the fields on failure."""
    cols = ", ".join(str(c) for c in raw.columns if c != raw.geometry.name)
    try:
        kept = raw.query(query)
    except Exception as exc:  # pandas raises UndefinedVariableError, SyntaxError, ...
        raise InputFileError(
            f"{where}: query {query!r} cannot be evaluated ({type(exc).__name__}: {exc}; "
            f"fields: {cols}). Fix: write a pandas query on those fields, e.g. "
            "\"Region_Cod < '51'\"."
        ) from exc
    if not isinstance(kept, pd.DataFrame):
        raise InputFileError(
            f"{where}: query {query!r} does not select rows. Fix: write a condition, e.g. "
            "\"Region_Cod < '51'\"."
        )
    if len(kept) == 0:
        raise InputFileError(
            f"{where}: query {query!r} keeps none of the {len(raw)} features. Fix: check the "
            f"condition against the fields' values (fields: {cols})."
        )
    return kept


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
            f"{_fmt_ids(sorted(map(str, ids[invalid])))}. Check them if the areas matter.",
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
