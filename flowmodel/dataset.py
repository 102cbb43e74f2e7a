"""The FlowDataset: a documented :class:`xarray.Dataset`.

Coordinates ``unit``, ``origin`` and ``destination`` (the same ids);
``country`` is a (non-index) coordinate along ``unit`` — xarray cannot hold a
``country`` variable on ``unit`` and a ``country`` dimension at once, so
per-country inputs use the dim ``country_code``; optional ``period``. Unit variables have dim ``unit``; pair
variables ``(origin, destination)`` (dense) or ``pair`` (sparse, with
``origin``/``destination`` coordinates along ``pair``). Observed flows are
``flow_<source>`` (NaN = unobserved or censored), censoring bounds
``flow_<source>_max`` (and, optionally, lower bounds ``flow_<source>_min``;
absent or NaN = 0) and exposures ``exposure_<source>``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from flowmodel._version import __version__
from flowmodel.exceptions import (
    CorruptFileError,
    DataContractError,
    DataScaleWarning,
    FlowModelError,
    InputFileError,
    ModelConfigError,
)
from flowmodel.pairs import contiguity, cross_border, geodesic_distance_km

__all__ = [
    "ESTIMATE_PREFIX",
    "LEVELS",
    "TOTAL_KINDS",
    "TOTAL_UNIVERSES",
    "add_cells",
    "build_dataset",
    "cell_dim",
    "dataset_fingerprint",
    "estimate_sources",
    "estimates_to_dataset",
    "flow_sources",
    "is_sparse",
    "level_groups",
    "load_dataset",
    "marginals_to_dataset",
    "read_errors",
    "save_dataset",
    "totals_to_dataset",
    "validate_dataset",
]

REQUIRED_UNIT_VARS = ("country", "population")
MAX_IDS = 10


def _fmt_ids(ids: Iterable[Any]) -> str:
    ids = list(ids)
    shown = ", ".join(str(i) for i in ids[:MAX_IDS])
    more = f" (and {len(ids) - MAX_IDS} more)" if len(ids) > MAX_IDS else ""
    return f"[{shown}]{more}"


def _fail(variable: str, rule: str, ids: Iterable[Any], fix: str) -> DataContractError:
    ids = list(ids)
    return DataContractError(
        f"variable '{variable}': {rule} — {len(ids)} offending: {_fmt_ids(ids)}. Fix: {fix}"
    )


def is_sparse(ds: xr.Dataset) -> bool:
    """Whether ``ds`` uses the sparse ``pair`` form rather than dense origin x destination."""
    return "pair" in ds.dims


def flow_sources(ds: xr.Dataset) -> list[str]:
    """Names of the observed flow sources (``flow_<source>`` variables) in ``ds``."""
    out = []
    for name in ds.data_vars:
        if name.startswith("flow_") and not name.endswith(("_max", "_min", "_weighted")):
            out.append(name.removeprefix("flow_"))
    return sorted(out)


# ----------------------------------------------------------------------------- build
def _units_table(units: Any, id_field: str, country_field: str) -> pd.DataFrame:
    if isinstance(units, xr.Dataset):
        units = units.to_dataframe()
    if not isinstance(units, pd.DataFrame):
        raise DataContractError(
            f"units must be a (Geo)DataFrame with '{id_field}' and '{country_field}' columns, "
            f"got {type(units).__name__}"
        )
    table = units.copy()
    if id_field not in table.columns:
        if table.index.name == id_field or (id_field == "unit_id" and table.index.name == "unit"):
            table = table.reset_index().rename(columns={table.index.name or "index": id_field})
        else:
            raise DataContractError(
                f"units: no id column '{id_field}' (columns: {list(table.columns)}). "
                "Fix: pass id_field=<name of the unit id column>."
            )
    if country_field not in table.columns:
        raise DataContractError(
            f"units: no country column '{country_field}' (columns: {list(table.columns)}). "
            "Fix: pass country_field=<name of the country code column>."
        )
    ids = table[id_field]
    if ids.isna().any():
        raise _fail(
            "unit", "unit ids must not be null", table.index[ids.isna()], "give every unit an id"
        )
    table[id_field] = ids.astype(str)
    dup = table[id_field][table[id_field].duplicated()].unique()
    if len(dup):
        raise _fail("unit", "unit ids must be unique", dup, "drop or rename the duplicated units")
    return table.set_index(id_field)


def _centroids_lonlat(table: pd.DataFrame) -> pd.DataFrame | None:
    geometry = getattr(table, "geometry", None)
    if geometry is None or "geometry" not in table.columns:
        return None
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(table, geometry="geometry")
    if gdf.crs is None:
        return None
    # area centroid in an equal-area CRS, back to lon/lat
    cent = gdf.geometry.to_crs("EPSG:6933").centroid.to_crs("EPSG:4326")
    return pd.DataFrame({"lon": cent.x.to_numpy(), "lat": cent.y.to_numpy()}, index=gdf.index)


def _long_to_matrix(
    table: pd.DataFrame,
    column: str,
    ids: pd.Index,
    periods: pd.Index | None,
    source: str,
) -> np.ndarray:
    n = len(ids)
    pos = pd.Series(np.arange(n), index=ids)
    o = pos.reindex(table["origin"].to_numpy()).to_numpy()
    d = pos.reindex(table["destination"].to_numpy()).to_numpy()
    shape = (n, n) if periods is None else (n, n, len(periods))
    out = np.full(shape, np.nan)
    values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
    if periods is None:
        out[o.astype(int), d.astype(int)] = values
    else:
        ppos = pd.Series(np.arange(len(periods)), index=periods)
        p = ppos.reindex(table["period"].astype(str).to_numpy()).to_numpy().astype(int)
        out[o.astype(int), d.astype(int), p] = values
    return out


def _flow_variables(
    source: str, table: pd.DataFrame, ids: pd.Index
) -> tuple[dict[str, tuple[tuple[str, ...], np.ndarray]], pd.Index | None]:
    if isinstance(table, xr.Dataset | xr.DataArray):
        raise DataContractError(
            f"flows['{source}']: give a long table (origin, destination, count)"
        )
    table = pd.DataFrame(table).copy()
    missing = {"origin", "destination", "count"} - set(table.columns)
    if missing:
        raise DataContractError(
            f"flows['{source}']: missing column(s) {sorted(missing)} (columns: {list(table.columns)}). "
            "Fix: rename to origin, destination, count[, max][, period]."
        )
    table["origin"] = table["origin"].astype(str)
    table["destination"] = table["destination"].astype(str)
    unknown = sorted(set(table["origin"]).union(table["destination"]) - set(ids))
    if unknown:
        raise _fail(
            f"flow_{source}",
            "flows name units not in the unit table",
            unknown,
            "harmonise unit codes (flowmodel.inputs.census.harmonise_codes) or drop those rows",
        )
    diag = table["origin"] == table["destination"]
    if diag.any():
        warnings.warn(
            f"flows['{source}']: dropped {int(diag.sum())} diagonal row(s) (origin == destination); "
            "the diagonal is excluded from every likelihood and output",
            UserWarning,
            stacklevel=3,
        )
        table = table.loc[~diag]
    keys = ["origin", "destination"] + (["period"] if "period" in table.columns else [])
    dup = table.duplicated(keys, keep=False)
    if dup.any():
        bad = table.loc[dup, keys].astype(str).agg("->".join, axis=1).unique()
        raise _fail(
            f"flow_{source}", "duplicate rows for the same pair", bad, "aggregate the table first"
        )
    periods = None
    if "period" in table.columns:
        table["period"] = table["period"].astype(str)
        periods = pd.Index(sorted(table["period"].unique()), name="period")
    dims: tuple[str, ...] = ("origin", "destination") + (
        ("period",) if periods is not None else ()
    )
    out = {f"flow_{source}": (dims, _long_to_matrix(table, "count", ids, periods, source))}
    if "max" in table.columns and table["max"].notna().any():
        out[f"flow_{source}_max"] = (dims, _long_to_matrix(table, "max", ids, periods, source))
    if "min" in table.columns and (table["min"].fillna(0) > 0).any():
        out[f"flow_{source}_min"] = (dims, _long_to_matrix(table, "min", ids, periods, source))
    if "weighted" in table.columns:
        out[f"flow_{source}_weighted"] = (
            dims,
            _long_to_matrix(table, "weighted", ids, periods, source),
        )
    if "exposure" in table.columns:
        out[f"exposure_{source}"] = (
            dims,
            _long_to_matrix(table, "exposure", ids, periods, source),
        )
    if "class" in table.columns:
        # the class of each report (e.g. an undercount class of the reporting country)
        out[f"class_{source}"] = (dims, _long_to_labels(table, "class", ids, periods))
    return out, periods


def _long_to_labels(
    table: pd.DataFrame, column: str, ids: pd.Index, periods: pd.Index | None
) -> np.ndarray:
    """Return a text column of a long table as an (origin, destination[, period]) array."""
    n = len(ids)
    pos = pd.Series(np.arange(n), index=ids)
    o = pos.reindex(table["origin"].to_numpy()).to_numpy().astype(int)
    d = pos.reindex(table["destination"].to_numpy()).to_numpy().astype(int)
    shape = (n, n) if periods is None else (n, n, len(periods))
    out = np.full(shape, "", dtype=object)
    values = table[column].astype(str).to_numpy()
    if periods is None:
        out[o, d] = values
    else:
        p = pd.Series(np.arange(len(periods)), index=periods)
        out[o, d, p.reindex(table["period"].astype(str).to_numpy()).to_numpy().astype(int)] = (
            values
        )
    return out.astype(str)


def _table_levels(table: Any) -> tuple[str, str]:
    """``(origin_level, destination_level)`` of a flow table (its ``attrs``; default unit)."""
    attrs = getattr(table, "attrs", {}) or {}
    return str(attrs.get("origin_level", "unit")), str(attrs.get("destination_level", "unit"))


def build_dataset(
    units: Any,
    *,
    covariates: pd.DataFrame | None = None,
    pairs: pd.DataFrame | xr.Dataset | None = None,
    flows: Mapping[str, pd.DataFrame] | None = None,
    id_field: str = "unit_id",
    country_field: str = "country",
    attrs: Mapping[str, Any] | None = None,
    chunks: int | None = None,
) -> xr.Dataset:
    """Build a FlowDataset from units, unit covariates, pair features and flow tables.

    Parameters
    ----------
    units
        (Geo)DataFrame with one row per unit: ``id_field``, ``country_field`` and
        optionally ``population``, ``lon``, ``lat`` and a geometry (used for
        centroids when lon/lat are absent).
    covariates
        Table indexed by unit id (e.g. from
        :func:`flowmodel.inputs.rasters.zonal_covariates`); its columns become
        ``unit`` variables and override same-named columns of ``units``.
    pairs
        Long table (``origin``, ``destination``, ``distance_km`` and any other
        pair columns) or a Dataset of ``(origin, destination)`` variables. When
        None, ``distance_km`` is computed from ``lon``/``lat`` (geodesic km).
    flows
        ``source -> long table`` with ``origin``, ``destination``, ``count`` and
        optional ``max`` (censoring bound, count NaN), ``min`` (lower bound of
        a censored cell, default 0), ``weighted``,
        ``exposure`` and ``period``. Diagonal rows are dropped with a warning.
    id_field, country_field
        Column names of the unit id and country code in ``units``.
    attrs
        Extra dataset attributes (e.g. data sources).
    chunks
        When given, pair variables are dask arrays chunked ``chunks`` origins
        at a time (the same code path; results are equal).

    Returns
    -------
    xarray.Dataset
        A FlowDataset with dims ``unit``, ``origin``, ``destination``
        [, ``period``], validated by :func:`validate_dataset`.
    """
    table = _units_table(units, id_field, country_field)
    if covariates is not None:
        cov = pd.DataFrame(covariates).copy()
        cov.index = cov.index.astype(str)
        unknown = sorted(set(cov.index) - set(table.index))
        if unknown:
            raise _fail(
                "covariates",
                "covariate rows name units not in the unit table",
                unknown,
                "index the covariate table by the same unit ids",
            )
        for col in cov.columns:
            table[col] = cov[col].reindex(table.index)
    if "lon" not in table.columns or "lat" not in table.columns:
        cent = _centroids_lonlat(table)
        if cent is not None:
            table["lon"], table["lat"] = cent["lon"], cent["lat"]
    ids = pd.Index(table.index.astype(str), name="unit")
    if "population" not in table.columns:
        raise DataContractError(
            "variable 'population': required but absent. Fix: give a population column in units or "
            "covariates (e.g. zonal_covariates(units, {'population': 'pop.tif'}))."
        )
    data_vars: dict[str, Any] = {}
    for col in table.columns:
        if col == "geometry":
            continue
        series = table[col]
        if col == country_field:
            data_vars["country"] = ("unit", series.astype(str).to_numpy())
        elif pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
            data_vars[col] = (
                "unit",
                series.to_numpy(dtype=float if not pd.api.types.is_bool_dtype(series) else bool),
            )
        elif pd.api.types.is_string_dtype(series) or series.dtype == object:
            # text fields (e.g. admin1) are levels that sources may be reported at
            data_vars[col] = ("unit", series.astype(str).to_numpy())
    ds = xr.Dataset(data_vars, coords={"unit": ids.to_numpy()})
    ds = ds.assign_coords(origin=ids.to_numpy(), destination=ids.to_numpy())
    n = len(ids)
    diag = np.eye(n, dtype=bool)

    # pair features
    if pairs is not None:
        if isinstance(pairs, xr.Dataset):
            for name, var in pairs.data_vars.items():
                ds[name] = var.reindex(origin=ids.to_numpy(), destination=ids.to_numpy())
        else:
            ptab = pd.DataFrame(pairs).copy()
            ptab["origin"] = ptab["origin"].astype(str)
            ptab["destination"] = ptab["destination"].astype(str)
            unknown = sorted(set(ptab["origin"]).union(ptab["destination"]) - set(ids))
            if unknown:
                raise _fail(
                    "pairs",
                    "pairs name units not in the unit table",
                    unknown,
                    "harmonise unit codes or drop those rows",
                )
            ptab = ptab.loc[ptab["origin"] != ptab["destination"]]
            for col in ptab.columns:
                if col in ("origin", "destination"):
                    continue
                mat = _long_to_matrix(ptab, col, ids, None, "pairs")
                ds[col] = (("origin", "destination"), mat)
    if "distance_km" not in ds:
        if "lon" not in ds or "lat" not in ds:
            raise DataContractError(
                "variable 'distance_km': required but absent and no lon/lat to compute it. Fix: give "
                "unit geometries, lon/lat columns, or a pairs table with distance_km."
            )
        dist = geodesic_distance_km(ds["lon"].values, ds["lat"].values)
        ds["distance_km"] = (("origin", "destination"), dist)
    ds["distance_km"] = ds["distance_km"].where(~diag)
    ds["distance_km"].attrs.update(units="km", long_name="geodesic distance between centroids")
    ds["cross_border"] = cross_border(ds["country"])
    if "geometry" in table.columns and "contiguous" not in ds:
        import geopandas as gpd

        gdf = gpd.GeoDataFrame(table[["geometry"]], geometry="geometry")
        if gdf.crs is not None:
            ds["contiguous"] = (("origin", "destination"), np.asarray(contiguity(gdf)))

    # flows
    aggregated = {}
    if flows:
        for source, tab in flows.items():
            levels = _table_levels(tab)
            if levels != ("unit", "unit"):
                aggregated[source] = (tab, levels)
                continue
            variables, periods = _flow_variables(source, tab, ids)
            if periods is not None:
                if "period" in ds.coords and not np.array_equal(
                    ds["period"].values, periods.to_numpy()
                ):
                    ds = ds.reindex(period=sorted(set(ds["period"].values) | set(periods)))
                else:
                    ds = ds.assign_coords(period=periods.to_numpy())
            for name, (dims, values) in variables.items():
                da = xr.DataArray(
                    values,
                    dims=dims,
                    coords={"origin": ids.to_numpy(), "destination": ids.to_numpy()}
                    | ({"period": periods.to_numpy()} if periods is not None else {}),
                )
                ds[name] = da.reindex_like(ds) if "period" in dims else da
    for source, (tab, (o_level, d_level)) in aggregated.items():
        ds = add_cells(ds, source, tab, origin_level=o_level, destination_level=d_level)
    ds.attrs.update({"flowmodel_version": __version__, "Conventions": "flowmodel FlowDataset 1"})
    if attrs:
        ds.attrs.update(dict(attrs))
    if chunks:
        ds = ds.chunk({"origin": chunks})
    validate_dataset(ds)
    _check_flows_against_population(ds)
    return ds


def _check_flows_against_population(ds: xr.Dataset) -> None:
    """Warn when a source counts more moves out of a unit than the unit has people.

    Raw counts are compared (a sample's counts are below the population's moves, so
    this never fires because of a sample fraction); phone data are skipped (they
    count subscribers, and their cells are not to be echoed). Out-moves above the
    population over one window mean the population covariate or the flow table is
    on another scale: WorldPop's 10' Africa rasters read as persons give 1/400 of
    the population (their values are mean persons per 30" cell).
    """
    from flowmodel.naming import is_cdr_source

    if "population" not in ds or set(ds["population"].dims) != {"unit"}:
        return
    pop = np.asarray(ds["population"].values, dtype=float)
    units = np.asarray(ds["unit"].values).astype(str)
    for source in flow_sources(ds):
        var = ds[f"flow_{source}"]
        if is_cdr_source(source) or not {"origin", "destination"} <= set(var.dims):
            continue
        out = var.sum("destination", skipna=True)
        if "period" in out.dims:
            out = out.max("period")
        moved = np.asarray(out.transpose("origin").values, dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratio = moved / pop
        bad = np.flatnonzero(np.isfinite(ratio) & (ratio > 1.0))
        if not len(bad):
            continue
        worst = bad[np.argsort(-ratio[bad])][:5]
        listed = "; ".join(
            f"{units[i]}: {moved[i]:,.0f} moves out, population {pop[i]:,.0f} ({ratio[i]:,.1f}x)"
            for i in worst
        )
        warnings.warn(
            f"flow source '{source}' counts more moves out of {len(bad)} of {len(units)} "
            f"units than they have people ({listed}). The population covariate or the "
            "flow table is on another scale. Fix: check what the population raster's "
            "values are (persons per cell; a density or a mean per sub-cell needs a "
            "scale: zonal_covariates(..., scale={'population': ...}), in a run config "
            "[rasters] population = { path = ..., scale = ... }) and the flow table's "
            "units (persons, not thousands or percentages).",
            DataScaleWarning,
            stacklevel=3,
        )


# -------------------------------------------------------------------------- validate
def _pair_vars(ds: xr.Dataset) -> list[str]:
    if is_sparse(ds):
        return [n for n, v in ds.data_vars.items() if "pair" in v.dims]
    return [n for n, v in ds.data_vars.items() if {"origin", "destination"} <= set(v.dims)]


def _offending_pairs(ds: xr.Dataset, mask: xr.DataArray) -> list[str]:
    mask = mask.compute() if hasattr(mask, "compute") else mask
    cells = [d for d in mask.dims if str(d).startswith("cell_")]
    if cells:
        dim = cells[0]
        m = mask.any([d for d in mask.dims if d != dim]) if mask.ndim > 1 else mask
        idx = np.flatnonzero(np.asarray(m))
        o = np.asarray(ds[f"{dim}_origin"].values)[idx]
        d = np.asarray(ds[f"{dim}_destination"].values)[idx]
        names = [f"{a}->{b}" for a, b in zip(o[:MAX_IDS], d[:MAX_IDS], strict=False)]
        return names + ["…"] * (len(idx) - len(names))
    if is_sparse(ds):
        idx = np.flatnonzero(
            np.asarray(mask.any([d for d in mask.dims if d != "pair"]) if mask.ndim > 1 else mask)
        )
        o = ds["origin"].values[idx]
        d = ds["destination"].values[idx]
        return [f"{a}->{b}" for a, b in zip(o[: MAX_IDS + 1], d[: MAX_IDS + 1], strict=False)] + [
            ""
        ] * max(0, len(idx) - MAX_IDS - 1)
    extra = [d for d in mask.dims if d not in ("origin", "destination")]
    m = mask.any(extra) if extra else mask
    m = np.asarray(m.transpose("origin", "destination"))
    oi, di = np.nonzero(m)
    o = ds["origin"].values
    d = ds["destination"].values
    names = [f"{o[a]}->{d[b]}" for a, b in zip(oi[:MAX_IDS], di[:MAX_IDS], strict=False)]
    return names + ["…"] * (len(oi) - len(names))


def validate_dataset(ds: xr.Dataset) -> xr.Dataset:
    """Check a FlowDataset against the FlowDataset contract (docs/architecture.md).

    Parameters
    ----------
    ds
        Dense or sparse FlowDataset, numpy- or dask-backed.

    Returns
    -------
    xarray.Dataset
        ``ds`` unchanged, so the call can be chained.

    Raises
    ------
    DataContractError
        Naming the variable, the rule and up to 10 offending ids: duplicate
        ids, NaN in a required variable, negative or non-integer counts,
        ``flow_*_max`` where the flow is not NaN, ``flow_*_min`` outside
        ``0..flow_*_max``, distance <= 0 between distinct
        units, pairs or flows naming unknown units, countries without units,
        values on the diagonal.
    """
    if "unit" not in ds.dims:
        raise DataContractError(
            "dataset has no 'unit' dim. Fix: build it with flowmodel.build_dataset()."
        )
    ids = pd.Index(ds["unit"].values.astype(str))
    dup = ids[ids.duplicated()].unique()
    if len(dup):
        raise _fail("unit", "unit ids must be unique", dup, "drop or rename the duplicated units")
    for var in REQUIRED_UNIT_VARS:
        if var not in ds:
            raise _fail(var, "required unit variable is absent", [], f"add '{var}' (dim unit)")
    country = ds["country"].values.astype(str)
    bad = ids[(country == "") | (country == "nan") | (country == "None")]
    if len(bad):
        raise _fail("country", "every unit needs a country code", bad, "fill the country column")
    pop = np.asarray(ds["population"].values, dtype=float)
    bad = ids[~np.isfinite(pop)]
    if len(bad):
        raise _fail(
            "population",
            "required variable holds NaN",
            bad,
            "fill population (zonal sum of a population raster, or given)",
        )
    bad = ids[pop < 0]
    if len(bad):
        raise _fail(
            "population", "population must be >= 0", bad, "check the raster's nodata value"
        )
    if "country_code" in ds.dims:
        empty = sorted(set(ds["country_code"].values.astype(str)) - set(country))
        if empty:
            raise _fail(
                "country",
                "per-country inputs name a country with no units",
                empty,
                "drop those countries or add their units",
            )
    sparse = is_sparse(ds)
    if sparse:
        names = set(ds["origin"].values.astype(str)) | set(ds["destination"].values.astype(str))
    else:
        names = set(ds["origin"].values.astype(str)) | set(ds["destination"].values.astype(str))
    unknown = sorted(names - set(ids))
    if unknown:
        raise _fail(
            "origin/destination",
            "pairs or flows name units not in 'unit'",
            unknown,
            "harmonise unit codes before building the dataset",
        )
    if "distance_km" not in ds:
        raise _fail(
            "distance_km",
            "required pair variable is absent",
            [],
            "give lon/lat, geometries or a pairs table with distance_km",
        )
    if sparse:
        off_diag = ds["origin"] != ds["destination"]
        diag_mask = ~off_diag
    else:
        off_diag = ds["origin"] != ds["destination"]
        diag_mask = ~off_diag
    for name in _pair_vars(ds):
        var = ds[name]
        if var.dtype.kind == "f":
            bad = var.notnull() & diag_mask
            if bool(bad.any()):
                raise _fail(
                    name,
                    "the diagonal (origin == destination) must be NaN",
                    _offending_pairs(ds, bad),
                    "set the diagonal to NaN",
                )
    dist = ds["distance_km"]
    bad = dist.isnull() & off_diag
    if bool(bad.any()):
        raise _fail(
            "distance_km",
            "required variable holds NaN off the diagonal",
            _offending_pairs(ds, bad),
            "supply distances for every pair of distinct units",
        )
    bad = (dist <= 0) & off_diag
    if bool(bad.any()):
        raise _fail(
            "distance_km",
            "distance must be > 0 between distinct units",
            _offending_pairs(ds, bad),
            "units share a centroid: merge them or fix the coordinates",
        )
    checked_exposure: set[str] = set()
    for source in estimate_sources(ds):
        est = ds[f"{ESTIMATE_PREFIX}{source}"]
        se = ds.get(f"{ESTIMATE_PREFIX}{source}_se")
        bad = est.notnull() & ((est <= 0) | (se.isnull() | (se <= 0) if se is not None else True))
        if bool(bad.any()):
            raise _fail(
                f"{ESTIMATE_PREFIX}{source}",
                "published estimates need a value > 0 and a standard error > 0",
                _offending_pairs(ds, bad),
                "drop unknown or zero cells from the table",
            )
    for source in flow_sources(ds):
        flow = ds[f"flow_{source}"]
        bad = flow < 0
        if bool(bad.any()):
            raise _fail(
                f"flow_{source}",
                "counts must be >= 0",
                _offending_pairs(ds, bad),
                "negative counts are errors in the input table",
            )
        bad = flow.notnull() & (np.abs(flow - np.round(flow)) > 1e-9)
        if bool(bad.any()):
            raise _fail(
                f"flow_{source}",
                "counts must be integers (unweighted sample counts)",
                _offending_pairs(ds, bad),
                f"put weighted estimates in 'flow_{source}_weighted', counts in 'flow_{source}'",
            )
        mx = f"flow_{source}_max"
        if mx in ds:
            bad = ds[mx].notnull() & flow.notnull()
            if bool(bad.any()):
                raise _fail(
                    mx,
                    "a censoring bound needs a NaN flow (the cell is censored)",
                    _offending_pairs(ds, bad),
                    f"set flow_{source} to NaN where {mx} is given",
                )
            bad = ds[mx] < 0
            if bool(bad.any()):
                raise _fail(
                    mx,
                    "censoring bounds must be >= 0",
                    _offending_pairs(ds, bad),
                    "use the largest possible count of the suppressed cell",
                )
        mn = f"flow_{source}_min"
        if mn in ds:
            upper = ds[mx] if mx in ds else xr.full_like(ds[mn], np.nan)
            bad = ds[mn].notnull() & (upper.isnull() | (ds[mn] < 0) | (ds[mn] > upper))
            if bool(bad.any()):
                raise _fail(
                    mn,
                    f"a lower censoring bound needs 0 <= {mn} <= {mx} on a censored cell",
                    _offending_pairs(ds, bad),
                    f"give {mn} only where {mx} is given, at most {mx}",
                )
        exp = f"exposure_{source}"
        if exp in ds and exp not in checked_exposure:
            checked_exposure.add(exp)
            bad = ds[exp] <= 0
            if bool(bad.any()):
                where = (
                    ids[np.asarray(bad)]
                    if ds[exp].dims == ("unit",)
                    else _offending_pairs(ds, bad)
                )
                raise _fail(exp, "exposure must be > 0", where, "use the sampling fraction (0, 1]")
    return ds


# ------------------------------------------------------------------------------ I/O
def _encodable(ds: xr.Dataset) -> xr.Dataset:
    out = ds.copy()
    for name, var in out.variables.items():
        if var.dtype == object:
            out[name] = var.astype(str)
    return out


def save_dataset(ds: xr.Dataset, path: str | os.PathLike[str]) -> Path:
    """Write a FlowDataset to NetCDF (h5netcdf) atomically; returns the path."""
    from flowmodel.atomic import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        _encodable(ds).to_netcdf(tmp, engine="h5netcdf")
    return path


@contextlib.contextmanager
def read_errors(path: str | os.PathLike[str], *, what: str, fix: str) -> Iterator[None]:
    """Turn a low-level failure to read a file flowmodel wrote into a :class:`CorruptFileError`.

    HDF5/NetCDF libraries report a truncated or damaged file with their own
    errors (``OSError: Unable to synchronously open file (truncated file ...)``
    from h5py, ``ValueError`` from xarray); inside this block they become one
    error that names the file, says what is wrong and how to fix it. Errors of
    the package pass unchanged.

    Parameters
    ----------
    path
        The file being read.
    what
        What it is, for the message (``"FlowDataset"``, ``"posterior file"``).
    fix
        How to get a good file again (e.g. ``"run 'flowmodel fit run.toml' again"``).

    Raises
    ------
    CorruptFileError
        When the block raises ``OSError``, ``ValueError``, ``KeyError``,
        ``RuntimeError`` or ``EOFError``.
    """
    try:
        yield
    except FlowModelError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise CorruptFileError(
            f"{path}: the {what} cannot be read ({reason}); the file is truncated or corrupt "
            f"(a copy cut short, a full disk, an interrupted transfer). Fix: {fix}."
        ) from err


def load_dataset(
    path: str | os.PathLike[str], *, chunks: Mapping[str, int] | None = None
) -> xr.Dataset:
    """Read a FlowDataset written by :func:`save_dataset` and validate it.

    Raises
    ------
    InputFileError
        The file does not exist.
    CorruptFileError
        The file cannot be read (truncated or damaged).
    DataContractError
        Its contents break the data contract.
    """
    path = Path(path)
    if not path.exists():
        raise InputFileError(
            f"{path}: no such FlowDataset file. Fix: check the path or run 'flowmodel prepare'."
        )
    fix = "write it again (rerun 'flowmodel prepare CONFIG', or save_dataset)"
    with read_errors(path, what="FlowDataset", fix=fix):
        if chunks is None:
            ds = xr.load_dataset(path, engine="h5netcdf")
        else:
            ds = xr.open_dataset(path, engine="h5netcdf", chunks=dict(chunks))
    for name in ("cross_border", "contiguous"):
        if name in ds and ds[name].dtype != bool:
            ds[name] = ds[name].astype(bool)
    return validate_dataset(ds)


def dataset_fingerprint(ds: xr.Dataset) -> str:
    """Return a short SHA-256 of the dataset's ids and variables (for save/load and manifests)."""
    h = hashlib.sha256()
    for name in sorted(ds.variables):
        var = ds[name]
        h.update(name.encode())
        h.update(str(var.dims).encode())
        values = np.asarray(var.values)
        if values.dtype.kind in "OUS":
            h.update("\x1f".join(map(str, values.ravel())).encode())
        else:
            h.update(np.ascontiguousarray(values).tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------- aggregate observations
#: Kinds of CDR in/out totals: variables ``<source>_outflow`` / ``<source>_inflow``.
TOTAL_KINDS = ("outflow", "inflow")
#: Destination universe of a total (attr ``universe`` of ``<source>_outflow``).
TOTAL_UNIVERSES = ("covered", "within")


def totals_to_dataset(
    ds: xr.Dataset,
    totals: pd.DataFrame,
    *,
    source: str = "cdr",
    universe: str = "covered",
) -> xr.Dataset:
    """Return ``ds`` with the operator's in/out totals as ``<source>_outflow`` / ``_inflow``.

    ``totals`` is :attr:`flowmodel.inputs.cdr.CDRFlows.totals` (``unit_id``,
    ``period``, ``outflow``, ``inflow``, optional ``outflow_max`` /
    ``inflow_max``): movers out of / into each unit summed by the operator
    *before* redaction. Totals suppressed because they would reveal redacted
    cells are NaN with their bound in ``<source>_outflow_max``.

    Parameters
    ----------
    ds
        FlowDataset holding ``flow_<source>``.
    totals
        Long table as above; units not in ``ds`` raise.
    source
        The CDR source the totals belong to.
    universe
        Destinations each total sums over: ``"covered"`` (every unit the
        operator covers, i.e. every unit in a ``flow_<source>`` cell) or
        ``"within"`` (those of the origin's / destination's own country) —
        the ``universe`` of :func:`flowmodel.inputs.cdr.relocation_od`.

    Returns
    -------
    xarray.Dataset
        A copy with ``<source>_outflow``, ``<source>_inflow`` (dims ``unit``
        [, ``period``] like ``flow_<source>``; NaN = unavailable) and, where
        the table has them, ``<source>_outflow_max`` / ``<source>_inflow_max``;
        attribute ``universe`` on each.
    """
    if universe not in TOTAL_UNIVERSES:
        raise ModelConfigError(
            f"totals_to_dataset: universe={universe!r}; Fix: one of {list(TOTAL_UNIVERSES)}"
        )
    flow = ds.get(f"flow_{source}")
    if flow is None:
        raise DataContractError(
            f"totals_to_dataset: no 'flow_{source}' in the dataset. Fix: add the CDR OD first"
        )
    tab = pd.DataFrame(totals).copy()
    if "unit_id" not in tab.columns:
        raise DataContractError("totals_to_dataset: totals need a 'unit_id' column")
    tab["unit_id"] = tab["unit_id"].astype(str)
    units = np.asarray(ds["unit"].values).astype(str)
    unknown = sorted(set(tab["unit_id"]) - set(units))
    if unknown:
        raise DataContractError(
            f"totals_to_dataset: unit ids {unknown[:10]} are not in the dataset's 'unit'. "
            "Fix: build the dataset from the same units as the CDR"
        )
    has_period = "period" in flow.dims
    out = ds.copy()
    if has_period:
        if "period" not in tab.columns:
            raise DataContractError(
                f"totals_to_dataset: flow_{source} has a period dim; the totals need 'period'"
            )
        periods = np.asarray(ds["period"].values).astype(str)
        tab["period"] = tab["period"].astype(str)
    elif "period" in tab.columns and tab["period"].nunique() > 1:
        raise DataContractError(
            f"totals_to_dataset: flow_{source} has no period dim but the totals have "
            f"{tab['period'].nunique()} periods. Fix: select one period"
        )
    for kind in TOTAL_KINDS:
        for col in (kind, f"{kind}_max"):
            if col not in tab.columns:
                continue
            if has_period:
                if tab.duplicated(["unit_id", "period"]).any():
                    raise DataContractError(
                        "totals_to_dataset: duplicated (unit_id, period) rows in the totals"
                    )
                wide = tab.set_index(["unit_id", "period"])[col].unstack("period")
                values = wide.reindex(index=units, columns=periods).to_numpy(dtype=float)
                var = xr.DataArray(values, dims=("unit", "period"))
            else:
                values = tab.set_index("unit_id")[col].reindex(units).to_numpy(dtype=float)
                var = xr.DataArray(values, dims=("unit",))
            var.attrs.update(universe=universe, source=source)
            out[f"{source}_{col}"] = var
    return out


#: Prefix of published-estimate variables (``estimate_<source>``, ``estimate_<source>_se``).
ESTIMATE_PREFIX = "estimate_"
#: Levels a source's origins and destinations can be reported at besides unit fields.
LEVELS = ("unit", "country")


def cell_dim(source: str) -> str:
    """Dim of a source reported at another level than unit x unit: ``cell_<source>``."""
    return f"cell_{source}"


def estimate_sources(ds: xr.Dataset) -> list[str]:
    """Names of the published-estimate sources (``estimate_<source>`` variables) in ``ds``."""
    return sorted(
        str(n).removeprefix(ESTIMATE_PREFIX)
        for n in ds.data_vars
        if str(n).startswith(ESTIMATE_PREFIX) and not str(n).endswith(("_se", "_expected"))
    )


def level_groups(ds: xr.Dataset, level: str) -> np.ndarray:
    """Return the label of every unit at ``level``: its id, country or a unit field (admin1).

    Raises
    ------
    DataContractError
        When ``level`` is neither ``"unit"``, ``"country"`` nor a unit variable.
    """
    if level == "unit":
        return np.asarray(ds["unit"].values).astype(str)
    if level in ds and ds[level].dims == ("unit",):
        return np.asarray(ds[level].values).astype(str)
    fields = sorted(
        str(n) for n, v in ds.data_vars.items() if v.dims == ("unit",) and v.dtype.kind in "OUS"
    )
    raise DataContractError(
        f"level {level!r}: neither 'unit', 'country' nor a unit field of the dataset "
        f"(text unit fields: {fields}). Fix: keep the field (e.g. admin1) in the units file, "
        "or name one of those"
    )


def add_cells(
    ds: xr.Dataset,
    source: str,
    table: pd.DataFrame,
    *,
    origin_level: str = "unit",
    destination_level: str = "unit",
    value: str = "flow",
) -> xr.Dataset:
    """Return ``ds`` with a source reported at any level, held over ``cell_<source>``.

    Each row of ``table`` is one reported cell: its ``origin`` and
    ``destination`` are labels at ``origin_level`` / ``destination_level``
    (``"unit"``, ``"country"`` or a unit field such as ``"admin1"``); the cell
    is the sum of the latent flows of every pair of distinct units whose labels
    match. E.g. a census table of immigrants by previous country and current
    unit has ``origin_level="country"``.

    Parameters
    ----------
    ds
        FlowDataset.
    source
        Source name.
    table
        Columns ``origin``, ``destination``, and ``count`` (``value="flow"``:
        with optional ``max``, ``min`` for censored cells, ``exposure``,
        ``class``, ``period``) or ``estimate`` and ``se`` (``value="estimate"``).
    origin_level, destination_level
        Levels of the labels.
    value
        ``"flow"`` (counts: ``flow_<source>``) or ``"estimate"`` (published
        estimates: ``estimate_<source>``, ``estimate_<source>_se``).

    Returns
    -------
    xarray.Dataset
        A copy with the cell variables (dim ``cell_<source>``, coordinates
        ``cell_<source>_origin`` / ``_destination`` [/ ``_period``]; the levels in
        the value variable's ``origin_level`` / ``destination_level`` attributes).

    Raises
    ------
    DataContractError
        Missing columns, labels naming no unit at their level, duplicated cells,
        negative or non-integer counts, bounds out of order.
    """
    dim = cell_dim(source)
    tab = pd.DataFrame(table).copy()
    what = f"{'flows' if value == 'flow' else 'estimates'}['{source}']"
    main = "count" if value == "flow" else "estimate"
    need = ["origin", "destination", main] + (["se"] if value == "estimate" else [])
    missing = [c for c in need if c not in tab.columns]
    if missing:
        raise DataContractError(
            f"{what}: missing column(s) {missing} (columns: {list(tab.columns)}). Fix: rename to "
            f"{need}"
        )
    for col in ("origin", "destination"):
        tab[col] = tab[col].astype(str)
    for level, col in ((origin_level, "origin"), (destination_level, "destination")):
        labels = set(level_groups(ds, level))
        unknown = sorted(set(tab[col]) - labels)
        if unknown:
            raise _fail(
                f"{value}_{source}",
                f"{col} labels name no unit at level {level!r}",
                unknown,
                f"harmonise the {col} codes with the units' {level!r} field or drop those rows",
            )
    keys = ["origin", "destination"] + (["period"] if "period" in tab.columns else [])
    dup = tab.duplicated(keys, keep=False)
    if dup.any():
        bad = tab.loc[dup, keys].astype(str).agg("->".join, axis=1).unique()
        raise _fail(
            f"{value}_{source}",
            "duplicate rows for the same cell",
            bad,
            "aggregate the table first",
        )
    if origin_level == destination_level:
        diag = tab["origin"] == tab["destination"]
        if diag.any() and origin_level == "unit":
            tab = tab.loc[~diag]
    tab = tab.reset_index(drop=True)
    n = len(tab)
    out = ds.copy()
    coords = {
        f"{dim}_origin": (dim, tab["origin"].to_numpy()),
        f"{dim}_destination": (dim, tab["destination"].to_numpy()),
    }
    if "period" in tab.columns:
        coords[f"{dim}_period"] = (dim, tab["period"].astype(str).to_numpy())
    attrs = {"origin_level": origin_level, "destination_level": destination_level}
    main_values = pd.to_numeric(tab[main], errors="coerce").to_numpy(dtype=float)
    out[f"{value}_{source}"] = xr.DataArray(main_values, dims=(dim,), attrs=attrs)
    if value == "flow":
        for col in ("max", "min"):
            if col in tab.columns and tab[col].notna().any():
                out[f"flow_{source}_{col}"] = (dim, pd.to_numeric(tab[col]).to_numpy(dtype=float))
        if "exposure" in tab.columns:
            out[f"exposure_{source}"] = (dim, tab["exposure"].to_numpy(dtype=float))
    else:
        out[f"estimate_{source}_se"] = (dim, pd.to_numeric(tab["se"]).to_numpy(dtype=float))
        if "exposure" in tab.columns:
            out[f"exposure_{source}"] = (dim, tab["exposure"].to_numpy(dtype=float))
    if "class" in tab.columns:
        out[f"class_{source}"] = (dim, tab["class"].astype(str).to_numpy())
    out = out.assign_coords(coords)
    if n == 0:
        raise DataContractError(f"{what}: no cells. Fix: check the table")
    validate_dataset(out)
    return out


def estimates_to_dataset(
    ds: xr.Dataset,
    table: pd.DataFrame,
    *,
    name: str,
    origin_level: str = "country",
    destination_level: str = "country",
    rel_sd: float | None = None,
) -> xr.Dataset:
    """Return ``ds`` with published estimates of sums of the latent flow (``estimate_<name>``).

    A table of estimates — bilateral migration flows by country pair, survey
    estimates of admin-1 flows, ... — with their standard errors. A model uses
    every ``estimate_*`` source as
    ``log est_c ~ N(log sum_{(i,j) in c} exp(eta_ij), log(1 + (se_c/est_c)^2))``:
    it gives the level of countries that no census or CDR sees, and the border
    friction where no source observes cross-border cells.

    Parameters
    ----------
    ds
        FlowDataset.
    table
        Columns ``origin``, ``destination``, ``estimate`` (persons, > 0) and ``se``
        (> 0; or give ``rel_sd``), labels at the levels below.
    name
        Source name (``estimate_<name>``).
    origin_level, destination_level
        Levels of the labels: ``"country"`` (default), ``"unit"`` or a unit field.
    rel_sd
        Log-scale error of every estimate when the table has no ``se`` column
        (0.1: about ±10%).

    Returns
    -------
    xarray.Dataset
        A copy with ``estimate_<name>`` and ``estimate_<name>_se`` over ``cell_<name>``.
    """
    tab = pd.DataFrame(table).copy()
    if "se" not in tab.columns:
        if rel_sd is None or not rel_sd > 0:
            raise ModelConfigError(
                f"estimates '{name}': the table has no 'se' column and rel_sd={rel_sd}. "
                "Fix: give standard errors, or rel_sd > 0 (e.g. 0.1)"
            )
        est = pd.to_numeric(tab.get("estimate"), errors="coerce")
        tab["se"] = est * np.sqrt(np.expm1(float(rel_sd) ** 2))
    est = pd.to_numeric(tab.get("estimate"), errors="coerce")
    se = pd.to_numeric(tab["se"], errors="coerce")
    if est is None or not ((est > 0) & (se > 0)).all():
        raise DataContractError(
            f"estimates '{name}': every 'estimate' and 'se' must be > 0 (a log-normal "
            "observation). Fix: drop unknown or zero cells from the table"
        )
    return add_cells(
        ds,
        name,
        tab,
        origin_level=origin_level,
        destination_level=destination_level,
        value="estimate",
    )


def marginals_to_dataset(
    ds: xr.Dataset,
    table: pd.DataFrame,
    *,
    name: str = "flow",
    rel_sd: float = 0.1,
) -> xr.Dataset:
    """Return ``ds`` with country-pair totals of the latent flow as estimates ``estimate_<name>``.

    A marginal is an external estimate of the total population-scale flow from
    every unit of one country to every unit of another (or the same) country
    over the latent's window, e.g. a bilateral migration-flow estimate. It is a
    country x country :func:`estimates_to_dataset` with a log-scale error
    ``rel_sd``.

    Parameters
    ----------
    ds
        FlowDataset (``country`` on ``unit``).
    table
        Columns ``origin_country``, ``destination_country``, ``value`` (persons, > 0).
    name
        Source name (``estimate_<name>``).
    rel_sd
        Error of the estimates on the log scale (0.1: about ±10%).

    Returns
    -------
    xarray.Dataset
        A copy with ``estimate_<name>`` / ``estimate_<name>_se`` over ``cell_<name>``.

    Raises
    ------
    DataContractError
        Missing columns, countries not in ``ds``, non-positive or duplicated values.
    ModelConfigError
        ``rel_sd`` not positive.
    """
    if not rel_sd > 0:
        raise ModelConfigError(f"marginals_to_dataset: rel_sd={rel_sd} must be > 0. Fix: e.g. 0.1")
    tab = pd.DataFrame(table).copy()
    need = ["origin_country", "destination_country", "value"]
    missing = [c for c in need if c not in tab.columns]
    if missing:
        raise DataContractError(
            f"marginals_to_dataset: the table lacks columns {missing}; it needs {need}"
        )
    countries = sorted(set(np.asarray(ds["country"].values).astype(str)))
    for col in need[:2]:
        tab[col] = tab[col].astype(str)
    named = set(tab["origin_country"]) | set(tab["destination_country"])
    unknown = sorted(named - set(countries))
    if unknown:
        raise DataContractError(
            f"marginals_to_dataset: countries {unknown[:10]} are not in the dataset's 'country' "
            f"({countries}). Fix: use the same country codes as the units"
        )
    values = tab["value"].astype(float)
    if not (values > 0).all():
        raise DataContractError(
            "marginals_to_dataset: every 'value' must be > 0 (a log-normal observation). "
            "Fix: drop unknown or zero country pairs from the table"
        )
    if tab.duplicated(need[:2]).any():
        raise DataContractError("marginals_to_dataset: duplicated country pairs in the table")
    cells = pd.DataFrame(
        {
            "origin": tab["origin_country"],
            "destination": tab["destination_country"],
            "estimate": values,
        }
    ).sort_values(["origin", "destination"])
    return estimates_to_dataset(ds, cells, name=name, rel_sd=rel_sd)
