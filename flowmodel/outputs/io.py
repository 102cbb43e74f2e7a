"""Atomic writers (and readers) for every file flowmodel produces (DESIGN §7).

Every writer goes through :func:`atomic_path`: the data are written to a
temporary file beside the target and renamed over it only when the write
finished, so a killed run never leaves a half-written file and never destroys
the previous version.

Every file is stamped with the provenance of :func:`provenance_attrs`:
``flowmodel_version``, ``config_hash``, ``seed`` and ``data_sources`` — as
NetCDF/Zarr attributes, GeoPackage dataset metadata, or (for CSV, which has no
place for them) a JSON sidecar ``<name>.csv.json``.

========================  ==========================================  =======================
writer                    file                                        read back with
========================  ==========================================  =======================
:func:`write_flows`       ``flows.nc`` (h5netcdf) or ``flows.zarr``   :func:`read_flows`, xarray
:func:`write_posterior`   ``posterior.nc`` (DataTree, ArviZ groups)   :func:`read_posterior`
:func:`write_flow_lines`  ``flows.gpkg`` (top-k LineStrings)          :func:`read_gpkg`, GIS
:func:`write_units`       ``units.gpkg`` (units + covariates)         :func:`read_gpkg`, GIS
:func:`write_flows_csv`   ``flows.csv`` (long table) + ``.json``      :func:`read_flows_csv`
========================  ==========================================  =======================
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from flowmodel._version import __version__
from flowmodel.atomic import atomic_path
from flowmodel.exceptions import DataContractError, InputFileError

__all__ = [
    "PROVENANCE_KEYS",
    "config_hash",
    "flows_table",
    "provenance_attrs",
    "read_flows",
    "read_flows_csv",
    "read_gpkg",
    "read_posterior",
    "write_flow_lines",
    "write_flows",
    "write_flows_csv",
    "write_posterior",
    "write_units",
]

#: Attributes stamped into every output file.
PROVENANCE_KEYS = ("flowmodel_version", "config_hash", "seed", "data_sources")


# ------------------------------------------------------------------------ provenance
def config_hash(config: Mapping[str, Any] | None) -> str:
    """Short SHA-256 (16 hex digits) of a configuration mapping, stable across runs.

    Keys are sorted and values serialised with ``str`` where JSON cannot, so
    the same configuration always hashes the same; None gives ``"unknown"``.
    """
    if config is None:
        return "unknown"
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def provenance_attrs(
    *,
    model: Any = None,
    config: Mapping[str, Any] | None = None,
    seed: int | None = None,
    data_sources: str | Iterable[str] | None = None,
    data: xr.Dataset | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return the provenance attributes stamped into every output.

    Parameters
    ----------
    model
        A model; its class name and ``model_config`` (hashed unless ``config``
        is given) are recorded.
    config
        Run configuration to hash (``config_hash``).
    seed
        Random seed of the run; ``-1`` is stored when unknown.
    data_sources
        Paths or descriptions of the inputs (joined with ``"; "``); when None,
        ``data.attrs["data_sources"]`` if present.
    data
        The FlowDataset, whose ``data_sources`` attr and fingerprint are used.
    extra
        More attributes (strings or numbers).

    Returns
    -------
    dict
        ``flowmodel_version``, ``config_hash``, ``seed``, ``data_sources``,
        and ``model`` / ``data_fingerprint`` when known. All values are strings
        or ints, so every format can store them.
    """
    if config is None and model is not None:
        config = getattr(model, "model_config", None)
    if data_sources is None and data is not None:
        data_sources = data.attrs.get("data_sources")
    if data_sources is not None and not isinstance(data_sources, str):
        data_sources = "; ".join(str(s) for s in data_sources)
    attrs: dict[str, Any] = {
        "flowmodel_version": __version__,
        "config_hash": config_hash(config),
        "seed": int(seed) if seed is not None else -1,
        "data_sources": data_sources or "unknown",
    }
    if model is not None:
        attrs["model"] = type(model).__name__
    if data is not None:
        from flowmodel.dataset import dataset_fingerprint

        with contextlib.suppress(Exception):
            attrs["data_fingerprint"] = dataset_fingerprint(data)
    for key, value in (extra or {}).items():
        attrs[key] = (
            value if isinstance(value, int | float | str) else json.dumps(value, default=str)
        )
    return attrs


def _stamp(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    base = provenance_attrs()
    for key, value in (attrs or {}).items():
        if value is None:
            continue
        base[key] = (
            value if isinstance(value, int | float | str) else json.dumps(value, default=str)
        )
    return base


def _encodable(ds: xr.Dataset) -> xr.Dataset:
    out = ds.copy()
    for name, var in list(out.variables.items()):
        if var.dtype == object:
            out[name] = var.astype(str)
        for key, value in list(var.attrs.items()):
            if value is None or isinstance(value, bool | dict | list):
                out[name].attrs[key] = json.dumps(value) if value is not None else ""
    for key, value in list(out.attrs.items()):
        if value is None:
            out.attrs[key] = ""
        elif isinstance(value, bool):
            out.attrs[key] = int(value)
        elif isinstance(value, dict | list | tuple):
            out.attrs[key] = json.dumps(value, default=str)
    return out


# ----------------------------------------------------------------------------- flows
def _flows_dataset(
    predictions: xr.Dataset, observed: xr.DataArray | None, attrs: Mapping[str, Any] | None
) -> xr.Dataset:
    if not isinstance(predictions, xr.Dataset) or "mean" not in predictions:
        raise DataContractError(
            "predictions must be a Dataset with a 'mean' variable (and q05 ... q95). "
            "Fix: pass the output of model.predict() or a baseline."
        )
    out = predictions.copy()
    if observed is not None:
        if isinstance(observed, xr.Dataset):
            raise DataContractError(
                "observed must be a DataArray such as data['flow_census'], not a Dataset"
            )
        obs = (
            observed.reindex_like(predictions[["mean"]])
            if set(observed.dims) <= set(predictions.dims)
            else observed
        )
        out["observed"] = obs.astype(float)
        out["observed"].attrs.update(
            units="persons", long_name="observed flow (NaN = not observed)"
        )
    for name in out.data_vars:
        out[name].attrs.setdefault("units", "persons")
    out.attrs.update(_stamp(attrs))
    return _encodable(out)


def write_flows(
    predictions: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    observed: xr.DataArray | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write predicted flows to NetCDF (``.nc``, h5netcdf) or Zarr (``.zarr``), atomically.

    Parameters
    ----------
    predictions
        Dataset ``(origin, destination)`` (or sparse ``pair``) with ``mean``
        and ``q05`` ... ``q95`` (DESIGN §4.3/§7).
    path
        Target; the suffix picks the format (``.zarr`` -> Zarr store,
        anything else -> NetCDF-4 via h5netcdf).
    observed
        Observed flows on the same dims, stored as variable ``observed``.
    attrs
        Provenance (see :func:`provenance_attrs`) and other attributes;
        ``flowmodel_version`` is always stamped.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    ds = _flows_dataset(predictions, observed, attrs)
    with atomic_path(path) as tmp:
        if path.suffix == ".zarr":
            ds.to_zarr(tmp, mode="w", consolidated=False)
        else:
            ds.to_netcdf(tmp, engine="h5netcdf")
    return path


def read_flows(path: str | os.PathLike[str]) -> xr.Dataset:
    """Read a file written by :func:`write_flows` into memory (NetCDF or Zarr)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(
            f"{path}: no such flows file. Fix: check the path or run 'flowmodel predict'."
        )
    if path.suffix == ".zarr":
        with xr.open_zarr(path, consolidated=False) as ds:
            out = ds.load()
    else:
        out = xr.load_dataset(path, engine="h5netcdf")
    for name in ("origin", "destination", "unit"):
        if name in out.coords and out[name].dtype == object:
            out = out.assign_coords({name: out[name].values.astype(str)})
    return out


def write_posterior(
    idata: xr.DataTree, path: str | os.PathLike[str], *, attrs: Mapping[str, Any] | None = None
) -> Path:
    """Write a fitted model's DataTree (posterior, prior, ... groups) to NetCDF, atomically.

    Parameters
    ----------
    idata
        What ``model.fit`` returned (``xarray.DataTree``); an
        ``xarray.Dataset`` is written as a single ``posterior`` group.
    path
        Target ``.nc`` file (one NetCDF group per DataTree node).
    attrs
        Provenance stamped on the root node.
    """
    path = Path(path)
    if isinstance(idata, xr.Dataset):
        idata = xr.DataTree.from_dict({"posterior": idata})
    if not isinstance(idata, xr.DataTree):
        raise DataContractError(
            f"write_posterior needs an xarray.DataTree (what model.fit returns), got {type(idata).__name__}"
        )
    tree = idata.copy()
    tree.attrs = {**tree.attrs, **_stamp(attrs)}
    nodes = {}
    for node in tree.subtree:
        ds = _encodable(node.to_dataset(inherit=False))
        nodes[node.path] = ds
    tree = xr.DataTree.from_dict(nodes)
    with atomic_path(path) as tmp:
        tree.to_netcdf(tmp, engine="h5netcdf")
    return path


def read_posterior(path: str | os.PathLike[str]) -> xr.DataTree:
    """Read a file written by :func:`write_posterior` into memory."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(
            f"{path}: no such posterior file. Fix: check the path or run 'flowmodel fit'."
        )
    with xr.open_datatree(path, engine="h5netcdf") as tree:
        return tree.load()


# ------------------------------------------------------------------------ flow lines
def flows_table(
    predictions: xr.Dataset,
    *,
    observed: xr.DataArray | None = None,
    data: xr.Dataset | None = None,
    dropna: bool = True,
    top_k: int | None = None,
    observed_only: bool = False,
) -> pd.DataFrame:
    """Long table of flows: one row per (origin, destination), diagonal dropped.

    Parameters
    ----------
    predictions
        Dataset with ``mean`` (and quantiles) over ``(origin, destination)``
        or a sparse ``pair`` dim.
    observed
        Observed flows, added as column ``observed``.
    data
        FlowDataset whose ``cross_border`` and ``distance_km`` are added.
    dropna
        Drop rows whose ``mean`` is NaN.
    top_k
        Keep only the ``top_k`` largest flows by ``mean`` (sorted, largest
        first). Selected in numpy before any table is built, so it is cheap
        for millions of pairs.
    observed_only
        Keep only pairs with a finite ``observed`` value.

    Returns
    -------
    pandas.DataFrame
        ``origin``, ``destination``, every prediction variable (``mean``,
        ``q05`` ...), ``observed`` when given, ``cross_border`` /
        ``distance_km`` when ``data`` has them.
    """
    ds = _flows_dataset(predictions, observed, None)
    if "pair" in ds.dims:
        frame = ds.drop_attrs().to_dataframe()
        columns = ["origin", "destination", *[c for c in ds.data_vars if c in frame.columns]]
        frame = frame[columns].reset_index(drop=True)
        frame["origin"] = frame["origin"].astype(str)
        frame["destination"] = frame["destination"].astype(str)
        keep = frame["origin"] != frame["destination"]
        if dropna:
            keep &= frame["mean"].notna()
        if observed_only and "observed" in frame:
            keep &= frame["observed"].notna()
        frame = frame.loc[keep]
        if top_k is not None:
            frame = frame.sort_values("mean", ascending=False, kind="stable").head(int(top_k))
        frame = frame.reset_index(drop=True)
    else:
        ds = ds.transpose("origin", "destination", ...)
        o_ids = ds["origin"].values.astype(str)
        d_ids = ds["destination"].values.astype(str)
        mean = np.asarray(ds["mean"].values, dtype=float)
        keep = o_ids[:, None] != d_ids[None, :]
        if dropna:
            keep &= np.isfinite(mean)
        if observed_only and "observed" in ds:
            keep &= np.isfinite(np.asarray(ds["observed"].values, dtype=float))
        oi, di = np.nonzero(keep)
        if top_k is not None:
            order = np.argsort(-np.nan_to_num(mean[oi, di], nan=-np.inf), kind="stable")[
                : int(top_k)
            ]
            oi, di = oi[order], di[order]
        frame = pd.DataFrame({"origin": o_ids[oi], "destination": d_ids[di]})
        for name, var in ds.data_vars.items():
            if var.dims == ("origin", "destination"):
                frame[name] = np.asarray(var.values)[oi, di]
    if data is not None and len(frame):
        pos = pd.Series(np.arange(data.sizes["origin"]), index=data["origin"].values.astype(str))
        po = pos.reindex(frame["origin"]).to_numpy()
        pd_ = pos.reindex(frame["destination"]).to_numpy()
        for name in ("cross_border", "distance_km"):
            if name in data and set(data[name].dims) == {"origin", "destination"}:
                values = np.asarray(data[name].transpose("origin", "destination").values)
                frame[name] = values[po, pd_]
        if "cross_border" in frame:
            frame["cross_border"] = frame["cross_border"].astype(bool)
    return frame


def _gpkg_metadata(attrs: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): str(v) for k, v in attrs.items()}


def write_flow_lines(
    predictions: xr.Dataset,
    data: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    top_k: int | None = 500,
    observed: xr.DataArray | None = None,
    layer: str = "flows",
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write the top-k flows as LineStrings between unit centroids to a GeoPackage.

    Parameters
    ----------
    predictions
        Dataset with ``mean`` and quantiles ``(origin, destination)``.
    data
        FlowDataset with ``lon``/``lat`` (population-weighted centroids,
        EPSG:4326) and ``cross_border``.
    path
        Target ``.gpkg``.
    top_k
        Number of largest flows by ``mean`` (None = all).
    observed
        Observed flows, written as column ``observed``.
    layer
        Layer name.
    attrs
        Provenance, written as GeoPackage dataset metadata.

    Returns
    -------
    pathlib.Path
        ``path``; read back with :func:`read_gpkg` or any GIS. Columns:
        ``origin``, ``destination``, ``mean``, ``q05`` ... ``q95``,
        [``observed``], ``cross_border``, ``distance_km``, ``rank``.
    """
    import geopandas as gpd
    from shapely import linestrings

    if "lon" not in data or "lat" not in data:
        raise DataContractError(
            "write_flow_lines: the dataset has no lon/lat centroids. Fix: build it from unit geometries "
            "or lon/lat columns (data sets given only distances cannot be mapped)."
        )
    table = flows_table(predictions, observed=observed, data=data, top_k=top_k)
    table = table.sort_values(
        ["mean", "origin", "destination"], ascending=[False, True, True], kind="stable"
    ).reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    lon = pd.Series(
        np.asarray(data["lon"].values, dtype=float), index=data["unit"].values.astype(str)
    )
    lat = pd.Series(
        np.asarray(data["lat"].values, dtype=float), index=data["unit"].values.astype(str)
    )
    coords = np.stack(
        [
            np.column_stack(
                [lon.reindex(table["origin"]).to_numpy(), lat.reindex(table["origin"]).to_numpy()]
            ),
            np.column_stack(
                [
                    lon.reindex(table["destination"]).to_numpy(),
                    lat.reindex(table["destination"]).to_numpy(),
                ]
            ),
        ],
        axis=1,
    )
    geometry = linestrings(coords) if len(table) else []
    gdf = gpd.GeoDataFrame(table, geometry=geometry, crs="EPSG:4326")
    meta = _gpkg_metadata(_stamp(attrs))
    path = Path(path)
    with atomic_path(path) as tmp:
        gdf.to_file(tmp, layer=layer, driver="GPKG", engine="pyogrio", dataset_metadata=meta)
    return path


def write_units(
    data: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    geometry: Any = None,
    layer: str = "units",
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write the units with their covariates to a GeoPackage.

    Parameters
    ----------
    data
        FlowDataset; every ``unit`` variable becomes a column (``unit_id``,
        ``country``, ``population``, ...).
    path
        Target ``.gpkg``.
    geometry
        Unit polygons: a GeoDataFrame/GeoSeries indexed by unit id or with a
        ``unit_id`` column. When None, points at ``lon``/``lat``; without
        those, a table with no geometry (with a warning).
    layer, attrs
        Layer name; provenance (GeoPackage dataset metadata).

    Returns
    -------
    pathlib.Path
        ``path``; read back with :func:`read_gpkg`.
    """
    import geopandas as gpd

    ids = data["unit"].values.astype(str)
    table = pd.DataFrame({"unit_id": ids})
    for name, var in data.data_vars.items():
        if var.dims == ("unit",):
            values = np.asarray(var.values)
            table[name] = values.astype(str) if values.dtype.kind in "OUS" else values
    if "country" in data.coords and "country" not in table:
        table["country"] = np.asarray(data["country"].values).astype(str)
    crs: Any = "EPSG:4326"
    if geometry is not None:
        if isinstance(geometry, gpd.GeoDataFrame):
            geo = geometry.set_index("unit_id") if "unit_id" in geometry.columns else geometry
            crs = geo.crs
            geoms = geo.geometry
        elif isinstance(geometry, gpd.GeoSeries):
            crs, geoms = geometry.crs, geometry
        else:
            raise DataContractError(
                f"geometry must be a GeoDataFrame or GeoSeries indexed by unit id, got {type(geometry).__name__}"
            )
        geoms.index = geoms.index.astype(str)
        missing = sorted(set(ids) - set(geoms.index))
        if missing:
            raise DataContractError(
                f"write_units: no geometry for units {missing[:10]}. Fix: pass polygons for every unit id."
            )
        gdf = gpd.GeoDataFrame(table, geometry=geoms.reindex(ids).to_numpy(), crs=crs)
    elif "lon" in table and "lat" in table:
        gdf = gpd.GeoDataFrame(
            table, geometry=gpd.points_from_xy(table["lon"], table["lat"]), crs=crs
        )
    else:
        warnings.warn(
            "write_units: no geometry and no lon/lat; writing an attribute table without geometry",
            UserWarning,
            stacklevel=2,
        )
        gdf = table
    meta = _gpkg_metadata(_stamp(attrs))
    path = Path(path)
    with atomic_path(path) as tmp:
        import pyogrio

        pyogrio.write_dataframe(gdf, tmp, layer=layer, driver="GPKG", dataset_metadata=meta)
    return path


def read_gpkg(
    path: str | os.PathLike[str], *, layer: str | None = None
) -> tuple[Any, dict[str, str]]:
    """Read a GeoPackage written here: ``(GeoDataFrame or DataFrame, provenance metadata)``."""
    import pyogrio

    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such GeoPackage. Fix: check the path.")
    # GDAL would otherwise copy the metadata into a `.aux.xml` sidecar on read
    previous = pyogrio.get_gdal_config_option("GDAL_PAM_ENABLED")
    pyogrio.set_gdal_config_options({"GDAL_PAM_ENABLED": "NO"})
    try:
        frame = pyogrio.read_dataframe(path, layer=layer)
        meta = pyogrio.read_info(path, layer=layer).get("dataset_metadata") or {}
    finally:
        pyogrio.set_gdal_config_options({"GDAL_PAM_ENABLED": previous})
    return frame, dict(meta)


# ------------------------------------------------------------------------------- CSV
def write_flows_csv(
    predictions: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    observed: xr.DataArray | None = None,
    data: xr.Dataset | None = None,
    attrs: Mapping[str, Any] | None = None,
    dropna: bool = True,
) -> Path:
    """Write flows as a long CSV table plus a JSON provenance sidecar, atomically.

    Columns: ``origin``, ``destination``, ``mean``, ``q05`` ... ``q95``,
    [``observed``], [``cross_border``, ``distance_km`` when ``data`` is
    given]; the diagonal is dropped, floats are written with full precision
    (reading back gives identical values). The provenance goes to
    ``<path>.json`` (CSV has no place for metadata; the table stays plain for
    spreadsheets).

    Returns
    -------
    pathlib.Path
        ``path``; read back with :func:`read_flows_csv` or ``pandas.read_csv``.
    """
    path = Path(path)
    table = flows_table(predictions, observed=observed, data=data, dropna=dropna)
    meta = _stamp(attrs) | {"columns": list(table.columns), "rows": len(table)}
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format=None)
    with atomic_path(path.with_name(path.name + ".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str))
    return path


def read_flows_csv(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a table written by :func:`write_flows_csv`: ``(DataFrame, provenance)``."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such CSV file. Fix: check the path.")
    frame = pd.read_csv(path, dtype={"origin": str, "destination": str})
    sidecar = path.with_name(path.name + ".json")
    meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    return frame, meta
