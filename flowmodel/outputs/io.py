"""Atomic writers (and readers) for every file flowmodel produces.

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
:func:`write_totals`      ``totals.nc`` (unit, country, pair totals)  :func:`read_flows`, xarray
:func:`write_totals_csv`  ``totals.csv`` (long table) + ``.json``     :func:`read_flows_csv`
========================  ==========================================  =======================

Every file says what it describes: ``observed`` is on the population scale
(the observed count divided by the ``exposure``, e.g. a 10% census sample
count x 10) next to ``observed_sample`` (the count as recorded) and the
``exposure``; the ``period`` the flows cover is an attribute (and a CSV
column); NetCDF files follow the CF and ACDD conventions (``Conventions``,
``title``, ``long_name``, ``units``, ``time_coverage_start`` /
``time_coverage_end`` when the period gives years or dates). Provenance
names input files by their base name and SHA-256, never by absolute path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from flowmodel._version import __version__
from flowmodel.atomic import atomic_path
from flowmodel.exceptions import DataContractError, InputFileError

__all__ = [
    "CONVENTIONS",
    "DEFAULT_PERIOD",
    "PROVENANCE_KEYS",
    "config_hash",
    "flows_table",
    "input_file_records",
    "period_attrs",
    "population_scale",
    "provenance_attrs",
    "read_flows",
    "read_flows_csv",
    "read_gpkg",
    "read_posterior",
    "totals_table",
    "write_flow_lines",
    "write_flows",
    "write_flows_csv",
    "write_posterior",
    "write_totals",
    "write_totals_csv",
    "write_totals_gpkg",
    "write_units",
]

#: Attributes stamped into every output file.
PROVENANCE_KEYS = ("flowmodel_version", "config_hash", "seed", "data_sources", "period")

#: Period written when the configuration names none (``[flows.<source>] period``).
DEFAULT_PERIOD = "unspecified (the census window)"

#: ``Conventions`` of the NetCDF files (CF for variables, ACDD for discovery attributes).
CONVENTIONS = "CF-1.10, ACDD-1.3"


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for sub in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(str(sub.relative_to(path)).encode())
            h.update(_sha256(sub).encode())
        return h.hexdigest()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_file_records(
    files: Mapping[str, str | os.PathLike[str]] | Iterable[str | os.PathLike[str]],
    *,
    hashes: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """Name and SHA-256 of each input file, without its folder.

    Parameters
    ----------
    files
        Paths, or a mapping ``role -> path`` (e.g. the config's
        ``flows.census.path``); the role is kept as ``role``.
    hashes
        Known SHA-256 digests keyed by role or by path (e.g. from the run's
        manifest), so large files are not read again; others are hashed here.

    Returns
    -------
    list of dict
        ``{"name": "census_od.csv", "sha256": "...", ["role": ...]}`` per
        file; ``"sha256": "missing"`` for a file that no longer exists. An
        absolute path never appears: a file shared with others does not
        reveal where it was made.
    """
    items = list(files.items()) if isinstance(files, Mapping) else [(None, f) for f in files]
    hashes = dict(hashes or {})
    out = []
    for role, value in items:
        path = Path(value)
        digest = hashes.get(str(role)) or hashes.get(str(value)) or hashes.get(str(path.resolve()))
        if digest is None:
            digest = _sha256(path) if path.exists() else "missing"
        record = {"name": path.name, "sha256": str(digest)}
        if role is not None:
            record["role"] = str(role)
        out.append(record)
    return out


def _strip_folders(sources: str) -> str:
    """``/a/b/census.csv; /a/pop.tif`` -> ``census.csv; pop.tif`` (descriptions kept)."""
    parts = [p.strip() for p in sources.split(";")]
    return "; ".join(
        Path(p).name if (os.sep in p or "/" in p) and " " not in p.strip() else p
        for p in parts
        if p
    )


def period_attrs(period: str | None) -> dict[str, str]:
    """``period`` plus the ACDD ``time_coverage_start``/``_end`` a period string gives.

    ``"2019-2024"``, ``"2019/2024"``, ``"2019-01-01/2023-12-31"`` and
    ``"2024-01/2024-03"`` give a start and an end (ISO 8601 years, months or
    dates); a single ``"2024"`` or ``"2024-02"`` is both; anything else (e.g.
    the default :data:`DEFAULT_PERIOD`) gives only ``period``.
    """
    import re

    text = str(period).strip() if period else DEFAULT_PERIOD
    out = {"period": text}
    date = r"\d{4}(?:-\d{2}(?:-\d{2})?)?"
    match = re.fullmatch(rf"({date})\s*(?:/|--| to |-)\s*({date})", text)
    if match is None and re.fullmatch(r"\d{4}-\d{4}", text):
        match = re.fullmatch(r"(\d{4})-(\d{4})", text)
    if match is not None:
        out["time_coverage_start"], out["time_coverage_end"] = match.group(1), match.group(2)
    elif re.fullmatch(date, text):
        out["time_coverage_start"] = out["time_coverage_end"] = text
    return out


def provenance_attrs(
    *,
    model: Any = None,
    config: Mapping[str, Any] | None = None,
    seed: int | None = None,
    data_sources: str | Iterable[str] | None = None,
    data: xr.Dataset | None = None,
    input_files: Sequence[Mapping[str, str]] | None = None,
    period: str | None = None,
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
        Descriptions of the inputs (joined with ``"; "``); when None, built
        from ``input_files``, else ``data.attrs["data_sources"]``. Folders are
        stripped from paths: only base names are stored.
    data
        The FlowDataset, whose ``data_sources`` attr and fingerprint are used.
    input_files
        Records of :func:`input_file_records` (name and SHA-256 of each
        input), stored as JSON in ``input_files``.
    period
        The period the outputs describe (``"2019-2024"``); default
        :data:`DEFAULT_PERIOD`. See :func:`period_attrs`.
    extra
        More attributes (strings or numbers).

    Returns
    -------
    dict
        ``flowmodel_version``, ``config_hash``, ``seed``, ``data_sources``,
        ``period`` (and ``time_coverage_start``/``_end`` when known),
        ``input_files`` and ``model`` / ``data_fingerprint`` when known. All
        values are strings or ints, so every format can store them.
    """
    if config is None and model is not None:
        config = getattr(model, "model_config", None)
    if data_sources is None and input_files:
        data_sources = [f"{r['name']} (sha256 {str(r['sha256'])[:12]})" for r in input_files]
    if data_sources is None and data is not None:
        data_sources = data.attrs.get("data_sources")
    if data_sources is not None and not isinstance(data_sources, str):
        data_sources = "; ".join(str(s) for s in data_sources)
    attrs: dict[str, Any] = {
        "flowmodel_version": __version__,
        "config_hash": config_hash(config),
        "seed": int(seed) if seed is not None else -1,
        "data_sources": _strip_folders(data_sources) if data_sources else "unknown",
    }
    attrs.update(period_attrs(period))
    if input_files:
        attrs["input_files"] = json.dumps([dict(r) for r in input_files])
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
    attrs = dict(attrs or {})
    base = provenance_attrs(period=attrs.get("period"))
    for key, value in attrs.items():
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
#: long_name of the prediction variables (``q..`` filled in per quantile).
_MEAN_LONG_NAME = (
    "number of persons moving from the origin unit to the destination unit over the period: "
    "posterior mean of the expected flow (population scale)"
)


def _quantile_long_name(name: str) -> str:
    digits = name[1:].replace("_", ".")
    return (
        f"number of persons moving from the origin unit to the destination unit over the "
        f"period: {digits}% quantile of the posterior predictive distribution (population scale)"
    )


def population_scale(observed: xr.DataArray, exposure: Any = None) -> xr.Dataset:
    """Put an observed flow on the population scale: ``observed = observed_sample / exposure``.

    Parameters
    ----------
    observed
        The counts as recorded (e.g. ``data["flow_census"]``: persons in a 10%
        census sample), over ``(origin, destination)`` or ``pair``.
    exposure
        The sampling fraction: ``data["exposure_<source>"]`` over ``unit``
        (applied to the origin unit, as the models do), over the pairs, a
        number, or None (1: the counts are complete).

    Returns
    -------
    xarray.Dataset
        ``observed`` (persons, population scale), ``observed_sample`` (the
        count as recorded) and ``exposure``, aligned with ``observed``;
        ``observed * exposure == observed_sample``.
    """
    sample = observed.astype(float)
    if exposure is None:
        factor = xr.full_like(sample, 1.0)
    elif isinstance(exposure, xr.DataArray):
        if exposure.dims == ("unit",):
            pos = pd.Series(
                np.arange(exposure.sizes["unit"]), index=exposure["unit"].values.astype(str)
            )
            values = np.asarray(exposure.values, dtype=float)
            origins = np.asarray(sample["origin"].values).astype(str)
            idx = pos.reindex(origins).to_numpy()
            per_origin = np.where(np.isnan(idx), np.nan, values[np.nan_to_num(idx).astype(int)])
            factor = xr.DataArray(
                per_origin, dims=sample["origin"].dims, coords=sample["origin"].coords
            )
            factor = factor.broadcast_like(sample)
        else:
            extra = [d for d in exposure.dims if d not in sample.dims]
            if extra:
                exposure = exposure.mean(extra)
            factor = exposure.astype(float).reindex_like(sample).broadcast_like(sample)
    else:
        factor = xr.full_like(sample, float(exposure))
    factor = factor.transpose(*sample.dims)
    out = xr.Dataset(
        {
            "observed": sample / factor.where(factor > 0),
            "observed_sample": sample,
            "exposure": factor.where(sample.notnull()),
        }
    )
    out["observed"].attrs.update(
        units="1",
        long_name="observed number of persons moving, population scale: observed_sample / "
        "exposure (NaN = not observed or censored)",
        coverage_content_type="physicalMeasurement",
    )
    out["observed_sample"].attrs.update(
        units="1",
        long_name="observed count as recorded by the source (e.g. persons in a census sample)",
        coverage_content_type="physicalMeasurement",
    )
    out["exposure"].attrs.update(
        units="1",
        long_name="sampling fraction of the observed source (1 = a complete count)",
        coverage_content_type="auxiliaryInformation",
    )
    return out


def _unit_countries(data: xr.Dataset | None) -> pd.Series | None:
    if data is None or "country" not in data.variables or "unit" not in data.dims:
        return None
    return pd.Series(
        np.asarray(data["country"].values).astype(str), index=data["unit"].values.astype(str)
    )


def _with_countries(ds: xr.Dataset, data: xr.Dataset | None) -> xr.Dataset:
    """Add ``origin_country`` / ``destination_country`` coordinates (along origin/destination or pair)."""
    country = _unit_countries(data)
    if country is None:
        return ds
    coords = {}
    for side in ("origin", "destination"):
        if side not in ds.coords:
            continue
        values = country.reindex(np.asarray(ds[side].values).astype(str)).to_numpy(dtype=object)
        values = np.where(pd.isna(values), "", values).astype(str)
        coords[f"{side}_country"] = (
            ds[side].dims,
            values,
            {"long_name": f"country of the {side} unit"},
        )
    return ds.assign_coords(coords)


def _cf_attrs(ds: xr.Dataset, *, title: str, summary: str) -> None:
    """CF/ACDD discovery attributes (in place); provenance and period come from ``_stamp``."""
    import datetime as _dt

    ds.attrs.setdefault("title", title)
    ds.attrs.setdefault("summary", summary)
    ds.attrs["Conventions"] = CONVENTIONS
    ds.attrs.setdefault("source", f"flowmodel {__version__}")
    ds.attrs.setdefault(
        "date_created", _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat()
    )
    for name in ("origin", "destination", "unit"):
        if name in ds.coords and "long_name" not in ds[name].attrs:
            ds[name].attrs["long_name"] = f"{name} unit id" if name != "unit" else "unit id"


def _flows_dataset(
    predictions: xr.Dataset,
    observed: xr.DataArray | None,
    attrs: Mapping[str, Any] | None,
    *,
    exposure: Any = None,
    data: xr.Dataset | None = None,
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
        if "period" in observed.dims and "period" not in predictions.dims:
            observed = observed.sum("period", min_count=1)
        obs = (
            observed.reindex_like(predictions[["mean"]])
            if set(observed.dims) <= set(predictions.dims)
            else observed
        )
        out = out.merge(population_scale(obs, exposure), compat="override")
    for name in out.data_vars:
        var = out[name]
        if name == "mean":
            var.attrs.setdefault("long_name", _MEAN_LONG_NAME)
        elif name.startswith("q") and name[1:3].isdigit():
            var.attrs.setdefault("long_name", _quantile_long_name(name))
        var.attrs.setdefault("coverage_content_type", "modelResult")
        var.attrs["units"] = "1"  # a count of persons (CF: dimensionless)
    out = _with_countries(out, data)
    if str(out.attrs.get("exposure", "")).startswith("none"):
        # predict's "exposure: none" means population-scale predictions; say it as the scale,
        # so the attribute is not read as the `exposure` variable (the observed sample fraction)
        del out.attrs["exposure"]
        out.attrs["scale"] = "population (persons)"
    out.attrs.update(_stamp(attrs))
    _cf_attrs(
        out,
        title="flowmodel: predicted migration flows between units",
        summary="Persons moving from each origin unit to each destination unit over the period, "
        "population scale: posterior mean and posterior predictive quantiles of a Bayesian "
        "flow model; observed flows (population scale and as recorded) where a source saw them.",
    )
    return _encodable(out)


def write_flows(
    predictions: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    observed: xr.DataArray | None = None,
    exposure: Any = None,
    data: xr.Dataset | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write predicted flows to NetCDF (``.nc``, h5netcdf) or Zarr (``.zarr``), atomically.

    Parameters
    ----------
    predictions
        Dataset ``(origin, destination)`` (or sparse ``pair``) with ``mean``
        and ``q05`` ... ``q95``.
    path
        Target; the suffix picks the format (``.zarr`` -> Zarr store,
        anything else -> NetCDF-4 via h5netcdf).
    observed
        Observed counts as recorded, on the same dims (a ``period`` dim is
        summed): stored as ``observed_sample``, and divided by ``exposure`` as
        ``observed`` (population scale, comparable with ``mean``); see
        :func:`population_scale`.
    exposure
        Sampling fraction of ``observed`` (e.g. ``data["exposure_census"]``);
        None: 1.
    data
        The FlowDataset: its ``country`` gives the ``origin_country`` and
        ``destination_country`` coordinates.
    attrs
        Provenance (see :func:`provenance_attrs`), ``period`` and other
        attributes; ``flowmodel_version`` and the CF/ACDD attributes are
        always stamped.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    path = Path(path)
    ds = _flows_dataset(predictions, observed, attrs, exposure=exposure, data=data)
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
    exposure: Any = None,
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
        Observed counts as recorded: columns ``observed`` (divided by
        ``exposure``: population scale), ``observed_sample`` and ``exposure``
        (see :func:`population_scale`).
    exposure
        Sampling fraction of ``observed``; None: 1.
    data
        FlowDataset whose ``country`` (columns ``origin_country``,
        ``destination_country``), ``cross_border`` and ``distance_km`` are
        added.
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
        ``origin``, ``destination``, [``origin_country``,
        ``destination_country``], every prediction variable (``mean``, ``q05``
        ...), ``observed`` / ``observed_sample`` / ``exposure`` when
        ``observed`` is given, ``cross_border`` / ``distance_km`` when
        ``data`` has them.
    """
    ds = _flows_dataset(predictions, observed, None, exposure=exposure, data=data)
    countries = [c for c in ("origin_country", "destination_country") if c in ds.coords]
    if "pair" in ds.dims:
        frame = ds.drop_attrs().to_dataframe()
        columns = [
            "origin",
            "destination",
            *countries,
            *[c for c in ds.data_vars if c in frame.columns],
        ]
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
        if countries:
            frame["origin_country"] = np.asarray(ds["origin_country"].values)[oi]
            frame["destination_country"] = np.asarray(ds["destination_country"].values)[di]
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
    exposure: Any = None,
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
    observed, exposure
        Observed counts as recorded and their sampling fraction: columns
        ``observed`` (population scale), ``observed_sample``, ``exposure``.
    layer
        Layer name.
    attrs
        Provenance, written as GeoPackage dataset metadata.

    Returns
    -------
    pathlib.Path
        ``path``; read back with :func:`read_gpkg` or any GIS. Columns:
        ``origin``, ``destination``, ``mean``, ``q05`` ... ``q95``,
        [``observed``, ``observed_sample``, ``exposure``], ``cross_border``,
        ``distance_km``, ``rank``, ``period``; the provenance (with
        ``period``) as dataset metadata.
    """
    import geopandas as gpd
    from shapely import linestrings

    if "lon" not in data or "lat" not in data:
        raise DataContractError(
            "write_flow_lines: the dataset has no lon/lat centroids. Fix: build it from unit geometries "
            "or lon/lat columns (data sets given only distances cannot be mapped)."
        )
    table = flows_table(predictions, observed=observed, exposure=exposure, data=data, top_k=top_k)
    table = table.sort_values(
        ["mean", "origin", "destination"], ascending=[False, True, True], kind="stable"
    ).reset_index(drop=True)
    table["rank"] = np.arange(1, len(table) + 1)
    stamp = _stamp(attrs)
    table["period"] = stamp["period"]
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
    meta = _gpkg_metadata(stamp)
    path = Path(path)
    with atomic_path(path) as tmp:
        gdf.to_file(tmp, layer=layer, driver="GPKG", engine="pyogrio", dataset_metadata=meta)
    return path


#: Per-unit totals written as GeoPackage columns: quantity -> column prefix.
UNIT_TOTAL_COLUMNS = {"unit_out": "out", "unit_in": "in", "unit_net": "net"}
#: Per-country totals written to the ``countries`` layer: quantity -> column prefix.
COUNTRY_TOTAL_COLUMNS = {
    "country_out": "out",
    "country_in": "in",
    "country_net": "net",
    "country_internal": "internal",
}


def _total_columns(
    totals: xr.Dataset, dim: str, ids: np.ndarray, columns: Mapping[str, str]
) -> pd.DataFrame:
    """``<prefix>_mean``, ``<prefix>_q05`` ... columns of ``totals`` along ``dim``, in ``ids`` order."""
    frame = pd.DataFrame(index=pd.Index(ids.astype(str)))
    for quantity, prefix in columns.items():
        for name in totals.data_vars:
            if not name.startswith(f"{quantity}_") or totals[name].dims != (dim,):
                continue
            stat = name.removeprefix(f"{quantity}_")
            if stat == "expected":
                continue
            series = pd.Series(
                np.asarray(totals[name].values, dtype=float),
                index=np.asarray(totals[dim].values).astype(str),
            )
            frame[f"{prefix}_{stat}"] = series.reindex(frame.index).to_numpy()
    return frame


def _units_frame(data: xr.Dataset, geometry: Any, *, warn: bool = True) -> Any:
    """Return the units with every ``unit`` variable as a column, and their geometry."""
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
            geoms = geo.geometry.copy()
        elif isinstance(geometry, gpd.GeoSeries):
            crs, geoms = geometry.crs, geometry.copy()
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
        return gpd.GeoDataFrame(table, geometry=geoms.reindex(ids).to_numpy(), crs=crs)
    if "lon" in table and "lat" in table:
        return gpd.GeoDataFrame(
            table, geometry=gpd.points_from_xy(table["lon"], table["lat"]), crs=crs
        )
    if warn:
        warnings.warn(
            "write_units: no geometry and no lon/lat; writing an attribute table without geometry",
            UserWarning,
            stacklevel=3,
        )
    return table


def write_units(
    data: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    geometry: Any = None,
    layer: str = "units",
    totals: xr.Dataset | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write the units with their covariates (and migration totals) to a GeoPackage.

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
    layer
        Layer name.
    totals
        Output of :func:`flowmodel.totals.predict_totals`: adds the columns
        ``out_mean``, ``out_q05`` ... ``in_*``, ``net_*`` (persons over the
        period) and ``period``.
    attrs
        Provenance (GeoPackage dataset metadata).

    Returns
    -------
    pathlib.Path
        ``path``; read back with :func:`read_gpkg`.
    """
    gdf = _units_frame(data, geometry)
    stamp = _stamp(attrs)
    if totals is not None:
        extra = _total_columns(totals, "unit", data["unit"].values, UNIT_TOTAL_COLUMNS)
        for column in extra.columns:
            gdf[column] = extra[column].to_numpy()
        gdf["period"] = stamp["period"]
    meta = _gpkg_metadata(stamp)
    path = Path(path)
    with atomic_path(path) as tmp:
        import pyogrio

        pyogrio.write_dataframe(gdf, tmp, layer=layer, driver="GPKG", dataset_metadata=meta)
    return path


def write_totals_gpkg(
    totals: xr.Dataset,
    data: xr.Dataset,
    path: str | os.PathLike[str],
    *,
    geometry: Any = None,
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write migration totals as two map layers, ``units`` and ``countries``, to one GeoPackage.

    Parameters
    ----------
    totals
        Output of :func:`flowmodel.totals.predict_totals`.
    data
        The FlowDataset (unit covariates, countries, centroids).
    path
        Target ``.gpkg``.
    geometry
        Unit polygons (see :func:`write_units`); the ``countries`` layer
        dissolves them by country.
    attrs
        Provenance and ``period`` (GeoPackage dataset metadata).

    Returns
    -------
    pathlib.Path
        ``path``. Layer ``units``: every column of :func:`write_units` plus
        ``out_*``, ``in_*``, ``net_*`` (``mean``, ``q05`` ...). Layer
        ``countries`` (when ``totals`` has per-country quantities): ``country``
        and ``out_*`` (emigration), ``in_*`` (immigration), ``net_*``,
        ``internal_*``; both with a ``period`` column.
    """
    import geopandas as gpd

    units = _units_frame(data, geometry)
    stamp = _stamp(attrs)
    extra = _total_columns(totals, "unit", data["unit"].values, UNIT_TOTAL_COLUMNS)
    for column in extra.columns:
        units[column] = extra[column].to_numpy()
    units["period"] = stamp["period"]
    layers = {"units": units}
    if "country" in totals.dims and any(f"{q}_mean" in totals for q in COUNTRY_TOTAL_COLUMNS):
        codes = np.asarray(totals["country"].values).astype(str)
        frame = _total_columns(totals, "country", codes, COUNTRY_TOTAL_COLUMNS)
        frame.insert(0, "country", codes)
        if isinstance(units, gpd.GeoDataFrame) and "country" in units:
            shapes = units[["country", "geometry"]].dissolve("country")
            shapes.index = shapes.index.astype(str)
            frame = gpd.GeoDataFrame(
                frame.reset_index(drop=True),
                geometry=shapes.geometry.reindex(codes).to_numpy(),
                crs=units.crs,
            )
        frame["period"] = stamp["period"]
        layers["countries"] = frame
    meta = _gpkg_metadata(stamp)
    path = Path(path)
    with atomic_path(path) as tmp:
        import pyogrio

        for name, frame in layers.items():
            pyogrio.write_dataframe(frame, tmp, layer=name, driver="GPKG", dataset_metadata=meta)
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
    exposure: Any = None,
    data: xr.Dataset | None = None,
    attrs: Mapping[str, Any] | None = None,
    dropna: bool = True,
) -> Path:
    """Write flows as a long CSV table plus a JSON provenance sidecar, atomically.

    Columns: ``origin``, ``destination``, [``origin_country``,
    ``destination_country``], ``mean``, ``q05`` ... ``q95``, [``observed``
    (population scale), ``observed_sample`` (as recorded), ``exposure``],
    [``cross_border``, ``distance_km`` when ``data`` is given], ``period``;
    the diagonal is dropped, floats are written with full precision (reading
    back gives identical values). The provenance goes to ``<path>.json`` (CSV
    has no place for metadata; the table stays plain for spreadsheets).

    Returns
    -------
    pathlib.Path
        ``path``; read back with :func:`read_flows_csv` or ``pandas.read_csv``.
    """
    path = Path(path)
    table = flows_table(
        predictions, observed=observed, exposure=exposure, data=data, dropna=dropna
    )
    stamp = _stamp(attrs)
    table["period"] = stamp["period"]
    _write_csv(table, path, stamp)
    return path


def _write_csv(table: pd.DataFrame, path: Path, stamp: Mapping[str, Any]) -> None:
    meta = dict(stamp) | {"columns": list(table.columns), "rows": len(table)}
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format=None)
    with atomic_path(path.with_name(path.name + ".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str))


# ---------------------------------------------------------------------------- totals
#: Rows of ``totals.csv``: quantity -> (level, label).
TOTAL_ROWS = {
    "unit_out": ("unit", "out"),
    "unit_in": ("unit", "in"),
    "unit_net": ("unit", "net"),
    "country_out": ("country", "out"),
    "country_in": ("country", "in"),
    "country_net": ("country", "net"),
    "country_internal": ("country", "internal"),
    "country_pair": ("country_pair", "flow"),
    "total_movers": ("world", "movers"),
    "cross_border": ("world", "cross-border movers"),
}


def _statistics(totals: xr.Dataset, quantity: str) -> list[str]:
    return [
        n.removeprefix(f"{quantity}_")
        for n in totals.data_vars
        if n.startswith(f"{quantity}_") and n.removeprefix(f"{quantity}_") != "expected"
    ]


def totals_table(totals: xr.Dataset, *, period: str | None = None) -> pd.DataFrame:
    """Long table of migration totals: one row per quantity and unit, country or country pair.

    Parameters
    ----------
    totals
        Output of :func:`flowmodel.totals.predict_totals`.
    period
        Written in the ``period`` column (default ``totals.attrs["period"]``,
        else :data:`DEFAULT_PERIOD`).

    Returns
    -------
    pandas.DataFrame
        ``level`` (``unit``, ``country``, ``country_pair``, ``world``),
        ``quantity`` (``out``, ``in``, ``net``, ``internal``, ``flow``,
        ``movers``, ``cross-border movers``), ``unit``, ``country``,
        ``origin_country``, ``destination_country`` (empty where not
        relevant), ``mean``, ``q05`` ... and ``period``.
    """
    frames = []
    for quantity, (level, label) in TOTAL_ROWS.items():
        stats = _statistics(totals, quantity)
        if "mean" not in stats:
            continue
        var = totals[f"{quantity}_mean"]
        frame = (
            xr.Dataset({s: totals[f"{quantity}_{s}"] for s in stats})
            .drop_attrs()
            .to_dataframe()
            .reset_index()
            if var.dims
            else pd.DataFrame([{s: float(totals[f"{quantity}_{s}"].values) for s in stats}])
        )
        frame = frame.drop(
            columns=[c for c in frame.columns if c not in (*stats, *var.dims, "unit_country")]
        )
        if "unit" in frame:
            frame = frame.rename(columns={"unit_country": "country"})
        frame.insert(0, "quantity", label)
        frame.insert(0, "level", level)
        frames.append(frame)
    columns = ["level", "quantity", "unit", "country", "origin_country", "destination_country"]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    for column in columns:
        if column not in table:
            table[column] = np.nan
    stats = [c for c in table.columns if c not in columns]
    stats = ["mean", *sorted(s for s in stats if s != "mean")]
    table = table[[*columns, *stats]]
    table["period"] = period or totals.attrs.get("period") or DEFAULT_PERIOD
    return table


def _totals_dataset(totals: xr.Dataset, attrs: Mapping[str, Any] | None) -> xr.Dataset:
    if not isinstance(totals, xr.Dataset) or not any(n.endswith("_mean") for n in totals):
        raise DataContractError(
            "totals must be the Dataset of flowmodel.totals.predict_totals (variables "
            "<quantity>_mean, <quantity>_q05 ...). Fix: pass model.predict_totals(data)."
        )
    out = totals.drop_vars([n for n in totals.data_vars if n.endswith("_expected")])
    for name in out.data_vars:
        out[name].attrs["units"] = "1"  # a count of persons (CF: dimensionless)
        out[name].attrs.setdefault("coverage_content_type", "modelResult")
    for name, text in (
        ("country", "country code"),
        ("origin_country", "country of the origin units"),
        ("destination_country", "country of the destination units"),
        ("unit_country", "country of the unit"),
    ):
        if name in out.coords:
            out[name].attrs.setdefault("long_name", text)
    out.attrs.update(_stamp(attrs))
    _cf_attrs(
        out,
        title="flowmodel: migration totals with intervals",
        summary="Persons moving over the period, population scale: in-, out- and net migration "
        "per unit; immigration, emigration, net and internal migration per country; moves "
        "between country pairs; total and cross-border movers. Means are posterior means of the "
        "expected totals; quantiles are those of totals summed within joint posterior "
        "predictive draws.",
    )
    return _encodable(out)


def write_totals(
    totals: xr.Dataset, path: str | os.PathLike[str], *, attrs: Mapping[str, Any] | None = None
) -> Path:
    """Write migration totals to NetCDF (``totals.nc``), atomically.

    Parameters
    ----------
    totals
        Output of :func:`flowmodel.totals.predict_totals`: dims ``unit``,
        ``country``, ``origin_country`` x ``destination_country``; variables
        ``<quantity>_mean``, ``<quantity>_q05`` ...
    path
        Target ``.nc`` (``.zarr`` for a Zarr store).
    attrs
        Provenance and ``period``; the CF/ACDD attributes are always stamped.

    Returns
    -------
    pathlib.Path
        ``path``; read back with :func:`read_flows` or ``xarray.open_dataset``.
    """
    path = Path(path)
    ds = _totals_dataset(totals, attrs)
    with atomic_path(path) as tmp:
        if path.suffix == ".zarr":
            ds.to_zarr(tmp, mode="w", consolidated=False)
        else:
            ds.to_netcdf(tmp, engine="h5netcdf")
    return path


def write_totals_csv(
    totals: xr.Dataset, path: str | os.PathLike[str], *, attrs: Mapping[str, Any] | None = None
) -> Path:
    """Write migration totals as a long CSV table (:func:`totals_table`) plus a JSON sidecar."""
    path = Path(path)
    stamp = _stamp(attrs)
    table = totals_table(totals, period=stamp["period"])
    stamp = stamp | {
        "quantities": {
            f"{TOTAL_ROWS[q][0]}/{TOTAL_ROWS[q][1]}": totals[f"{q}_mean"].attrs.get("long_name", q)
            for q in TOTAL_ROWS
            if f"{q}_mean" in totals
        }
    }
    _write_csv(table, path, stamp)
    return path


def read_flows_csv(path: str | os.PathLike[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Read a table written by :func:`write_flows_csv`: ``(DataFrame, provenance)``."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such CSV file. Fix: check the path.")
    frame = pd.read_csv(
        path,
        dtype=dict.fromkeys(
            (
                "origin",
                "destination",
                "origin_country",
                "destination_country",
                "unit",
                "country",
                "period",
            ),
            str,
        ),
    )
    sidecar = path.with_name(path.name + ".json")
    meta = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    return frame, meta
