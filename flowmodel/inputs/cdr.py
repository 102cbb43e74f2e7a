"""Call detail records -> redacted relocation OD tables, private by default.

Two entry points, both returning a :class:`CDRFlows` whose ``flows`` table
plugs straight into :func:`flowmodel.dataset.build_dataset` as
``flows={"cdr": result.flows}`` and whose ``covariates`` table goes into
``covariates=``:

* :func:`cdr_flows` — raw events (``subscriber_id``, ``timestamp``,
  ``cell_id``; Parquet, CSV, Arrow IPC, a pyarrow Table or a DataFrame) and
  tower locations (``cell_id``, ``lon``, ``lat``) -> towers assigned to units
  (:func:`assign_towers`, point-in-polygon or Voronoi cells clipped to units)
  -> home unit per subscriber and period (:func:`detect_homes`: modal
  night-time unit among subscribers active on enough days) -> relocation OD
  between consecutive periods (:func:`relocation_od`) -> redaction.
* :func:`read_cdr_od` — an operator's pre-aggregated, redacted OD table
  (FlowKit style: cells with 15 or fewer subscribers dropped or marked).

Privacy (see ``docs/privacy.md``): subscriber ids are replaced on read, batch
by batch, by a keyed BLAKE2b hash with a per-run secret salt and then by a
per-run integer code; raw ids are never kept, written, logged or put in an
error message. Everything runs in this process on pyarrow record batches and
numpy arrays; nothing is spilled or cached. Every count of 15 or fewer
subscribers (OD cells, in/out totals, subscribers per unit) is redacted
before anything leaves this module: ``count`` NaN and ``max`` = the
threshold. Raising ``threshold`` is free; going below 15 needs
``allow_small_cells=True`` and warns. In/out totals are summed before
redaction and suppressed when they would reveal their row's redacted cells.

Why pyarrow (not polars or duckdb): it is already a dependency (Parquet,
GeoParquet, pandas' string columns), streams Parquet/CSV/IPC record batches
with bounded memory, and its vectorised ``index_in``/``dictionary_encode``
kernels plus numpy sorting give well over a million events per second on two
cores (``benchmarks/cdr.py``, ``docs/performance.md``) without a new
dependency or a second query engine holding raw ids.

Tables of :class:`CDRFlows` (periods are strings; relocation between period
t-1 and t is labelled t):

* ``flows``: ``origin``, ``destination``, ``period``, ``count`` (float; NaN =
  redacted), ``max`` (threshold where redacted, else NaN).
* ``totals``: ``unit_id``, ``period``, ``outflow``, ``inflow``,
  ``outflow_max``, ``inflow_max`` — movers out of / into each unit, summed
  before redaction, then redacted themselves.
* ``subscribers``: ``unit_id``, ``period``, ``cdr_subscribers``,
  ``cdr_subscribers_max`` — subscribers with a detected home in the unit.
* ``covariates``: indexed by unit id: ``cdr_subscribers`` (mean over periods)
  and, when population is known, ``cdr_subscribers_per_resident``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from flowmodel.exceptions import CDRInputError, InputFileError, MissingCRSError, PrivacyError

__all__ = [
    "DEFAULT_THRESHOLD",
    "CDRFlows",
    "HomeLocations",
    "SubscriberHasher",
    "assign_towers",
    "cdr_flows",
    "detect_homes",
    "read_cdr_od",
    "read_towers",
    "redact",
    "relocation_od",
    "write_cdr_outputs",
]

log = logging.getLogger(__name__)

#: FlowKit's redaction threshold: counts of 15 or fewer subscribers are never released.
DEFAULT_THRESHOLD = 15

Period = Literal["day", "week", "month", "quarter", "year"]
EventSource = (
    str | os.PathLike[str] | pa.Table | pa.RecordBatch | pd.DataFrame | Iterable[pa.RecordBatch]
)

_DAY0 = 3652  # days from 1970-01-01 to 1980-01-01: the earliest accepted event
_DAY_BITS, _UNIT_BITS, _SUB_BITS = 16, 20, 28
_MAX_SHOWN = 10
_CSV_BLOCK_SIZE = 64 << 20  # bytes of CSV parsed per batch
_MAX_PENDING = 1 << 25  # raw event keys (8 bytes each) held before a reduction
_EXTRA_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M")


def _fmt(items: Sequence[Any]) -> str:
    items = list(items)
    more = f" and {len(items) - _MAX_SHOWN} more" if len(items) > _MAX_SHOWN else ""
    return "[" + ", ".join(str(i) for i in items[:_MAX_SHOWN]) + more + "]"


# ------------------------------------------------------------------------ hashing
class SubscriberHasher:
    """Keyed BLAKE2b (64-bit) of subscriber ids with a secret per-run salt.

    Parameters
    ----------
    salt
        Secret key (up to 64 bytes). Default: 32 random bytes drawn for this
        object, so hashes cannot be linked across runs. Pass a fixed salt only
        when outputs of separate runs must be linked, and keep it secret.

    Notes
    -----
    The salt is never shown (``repr`` hides it). Integer ids hash like their
    decimal string, so ``123`` and ``"123"`` are the same subscriber.
    """

    __slots__ = ("_base",)

    def __init__(self, salt: bytes | None = None) -> None:
        key = secrets.token_bytes(32) if salt is None else bytes(salt)
        if not 1 <= len(key) <= 64:
            raise PrivacyError(
                "salt must be 1 to 64 bytes. Fix: pass salt=secrets.token_bytes(32)."
            )
        self._base = hashlib.blake2b(key=key, digest_size=8)

    def __repr__(self) -> str:
        return "SubscriberHasher(salt=<secret>)"

    def __reduce__(self) -> Any:
        raise PrivacyError(
            "a SubscriberHasher holds a secret salt and cannot be pickled or copied to disk"
        )

    def hash_values(self, values: Iterable[Any]) -> np.ndarray:
        """Hash an iterable of ids (str, bytes or int) to ``uint64``."""
        base = self._base
        digests = []
        for v in values:
            h = base.copy()
            h.update(v if isinstance(v, bytes) else str(v).encode())
            digests.append(h.digest())
        return (
            np.frombuffer(b"".join(digests), dtype="<u8").astype(np.uint64)
            if digests
            else np.empty(0, np.uint64)
        )

    def hash_array(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """Hash an Arrow array of ids, hashing each distinct id once; returns ``uint64`` per row."""
        uniq, idx = self.hash_dictionary(ids)
        return uniq[idx]

    def hash_dictionary(self, ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """Dictionary-encode ``ids``; return the hash of each distinct id and each row's index."""
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        enc = ids if pa.types.is_dictionary(ids.type) else pc.dictionary_encode(ids)
        uniq = self.hash_values(enc.dictionary.to_pylist())
        # null ids get index 0; callers drop those rows
        return uniq, enc.indices.fill_null(0).to_numpy(zero_copy_only=False)


class _Codes:
    """Per-run dense integer codes of hashed ids (a sorted array, no raw ids)."""

    def __init__(self) -> None:
        self.hashes = np.empty(0, np.uint64)
        self.codes = np.empty(0, np.int64)
        self.n = 0

    def encode_unique(self, uniq: np.ndarray) -> np.ndarray:
        """Codes of distinct hashes (new hashes get the next codes)."""
        if len(self.hashes):
            pos = np.searchsorted(self.hashes, uniq)
            pos_c = np.minimum(pos, len(self.hashes) - 1)
            found = self.hashes[pos_c] == uniq
        else:
            pos = pos_c = np.zeros(len(uniq), np.int64)
            found = np.zeros(len(uniq), dtype=bool)
        out = np.empty(len(uniq), np.int64)
        out[found] = self.codes[pos_c[found]]
        new = np.flatnonzero(~found)
        if len(new):
            out[new] = np.arange(self.n, self.n + len(new))
            self.n += len(new)
            order = np.argsort(uniq[new])
            new_h, new_c, new_pos = uniq[new][order], out[new][order], pos[new][order]
            self.hashes = np.insert(self.hashes, new_pos, new_h)
            self.codes = np.insert(self.codes, new_pos, new_c)
        return out


def _sorted_runs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal values of a sorted array."""
    if len(x) == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    first = np.empty(len(x), dtype=bool)
    first[0] = True
    np.not_equal(x[1:], x[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    return starts, np.diff(np.append(starts, len(x)))


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser (a bijection on uint64), to combine fields into one key."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


# ------------------------------------------------------------------------- towers
def read_towers(
    source: str | os.PathLike[str] | pd.DataFrame,
    *,
    cell_id: str = "cell_id",
    lon: str = "lon",
    lat: str = "lat",
) -> pd.DataFrame:
    """Read and check tower (cell) locations.

    Parameters
    ----------
    source
        CSV/Parquet file or DataFrame with one row per cell.
    cell_id, lon, lat
        Column names; coordinates in degrees (EPSG:4326).

    Returns
    -------
    pandas.DataFrame
        ``cell_id`` (str), ``lon``, ``lat`` (float); exact duplicate rows dropped.

    Raises
    ------
    CDRInputError
        Missing columns, missing/out-of-range coordinates, a cell id given two
        different locations, or an empty table.
    """
    if isinstance(source, pd.DataFrame):
        table, label = source.copy(), "towers table"
    else:
        path = Path(source)
        if not path.exists():
            raise InputFileError(f"{path}: no such towers file. Fix: check the path.")
        label = str(path)
        table = (
            pd.read_parquet(path)
            if path.suffix.lower() in (".parquet", ".pq")
            else pd.read_csv(path, dtype={cell_id: str})
        )
    missing = [c for c in (cell_id, lon, lat) if c not in table.columns]
    if missing:
        raise CDRInputError(
            f"{label}: missing column(s) {missing} (columns: {list(table.columns)}). "
            "Fix: pass cell_id=, lon=, lat= with the right names."
        )
    if table.empty:
        raise CDRInputError(f"{label}: no towers. Fix: give at least one tower location.")
    out = pd.DataFrame(
        {
            "cell_id": table[cell_id].astype(str).str.strip().to_numpy(),
            "lon": pd.to_numeric(table[lon], errors="coerce").to_numpy(dtype=float),
            "lat": pd.to_numeric(table[lat], errors="coerce").to_numpy(dtype=float),
        }
    )
    bad = (
        ~np.isfinite(out["lon"])
        | ~np.isfinite(out["lat"])
        | (out["lon"].abs() > 180)
        | (out["lat"].abs() > 90)
    )
    if bad.any():
        raise CDRInputError(
            f"{label}: {int(bad.sum())} tower(s) with missing or out-of-range lon/lat: cells "
            f"{_fmt(out.loc[bad, 'cell_id'])}. Fix: coordinates must be degrees (EPSG:4326)."
        )
    out = out.drop_duplicates()
    dup = out["cell_id"][out["cell_id"].duplicated()].unique().tolist()
    if dup:
        raise CDRInputError(
            f"{label}: {len(dup)} cell id(s) have more than one location: {_fmt(dup)}. "
            "Fix: keep one location per cell (e.g. the one valid for the study period)."
        )
    return out.reset_index(drop=True)


def _units_frame(units: Any, id_field: str, country_field: str) -> Any:
    import geopandas as gpd

    if not isinstance(units, gpd.GeoDataFrame):
        raise CDRInputError(
            f"units must be a GeoDataFrame with '{id_field}', '{country_field}' and geometry. "
            "Fix: load them with flowmodel.inputs.units.load_units()."
        )
    missing = [c for c in (id_field, country_field) if c not in units.columns]
    if missing:
        raise CDRInputError(
            f"units: missing column(s) {missing}. Fix: pass id_field=/country_field=."
        )
    if units.crs is None:
        raise MissingCRSError(
            "units have no CRS. Fix: units.set_crs('EPSG:4326') (or the right CRS)."
        )
    out = units[[id_field, country_field, "geometry"]].copy()
    out[id_field] = out[id_field].astype(str)
    return out.reset_index(drop=True)


def assign_towers(
    towers: pd.DataFrame,
    units: Any,
    *,
    method: Literal["point", "voronoi"] = "point",
    outside: Literal["error", "drop", "nearest"] = "error",
    id_field: str = "unit_id",
    country_field: str = "country",
) -> pd.DataFrame:
    """Assign every tower to one unit.

    Parameters
    ----------
    towers
        Output of :func:`read_towers` (``cell_id``, ``lon``, ``lat``).
    units
        GeoDataFrame with ``id_field``, ``country_field`` and polygons (any CRS).
    method
        ``"point"``: the unit containing the tower (geopandas ``sjoin``);
        ``"voronoi"``: the unit holding the largest area of the tower's Voronoi
        cell clipped to the units (shapely ``voronoi_polygons``, areas in an
        equal-area CRS) — a tower just off the coast still serves its unit.
        ``share`` is that unit's fraction of the clipped cell.
    outside
        Towers in no unit (or whose Voronoi cell misses every unit):
        ``"error"`` (default) raises :class:`CDRInputError` naming them;
        ``"drop"`` warns with their count (their events are then dropped and
        counted); ``"nearest"`` assigns the nearest unit.

    Returns
    -------
    pandas.DataFrame
        ``cell_id`` (str), ``unit_id`` (str; None for dropped towers),
        ``share`` (float, 1 for ``"point"``).
    """
    import geopandas as gpd

    ufr = _units_frame(units, id_field, country_field)
    pts = gpd.GeoDataFrame(
        towers[["cell_id"]].copy(),
        geometry=gpd.points_from_xy(towers["lon"], towers["lat"]),
        crs="EPSG:4326",
    )
    if method == "point":
        pts_u = pts.to_crs(ufr.crs)
        joined = gpd.sjoin(pts_u, ufr[[id_field, "geometry"]], how="left", predicate="within")
        joined = joined[~joined.index.duplicated(keep="first")]  # on shared borders: first unit
        unit = joined[id_field].reindex(pts.index)
        share = pd.Series(1.0, index=pts.index)
    elif method == "voronoi":
        unit, share = _voronoi_assign(pts, ufr, id_field)
    else:
        raise ValueError(f"method must be 'point' or 'voronoi', got {method!r}")
    out = pd.DataFrame(
        {
            "cell_id": towers["cell_id"].to_numpy(),
            "unit_id": unit.to_numpy(dtype=object),
            "share": share.to_numpy(dtype=float),
        }
    )
    miss = out["unit_id"].isna().to_numpy()
    if miss.any():
        cells = out.loc[miss, "cell_id"].tolist()
        msg = f"{len(cells)} of {len(out)} tower(s) lie outside every unit: cells {_fmt(cells)}"
        if outside == "error":
            raise CDRInputError(
                f"{msg}. Fix: check tower coordinates and the units' CRS, or pass outside='nearest' "
                "(assign to the nearest unit) or outside='drop' (drop their events)."
            )
        if outside == "drop":
            warnings.warn(f"{msg}; their events will be dropped.", UserWarning, stacklevel=2)
            out.loc[miss, "share"] = np.nan
        elif outside == "nearest":
            proj = ufr.to_crs("EPSG:6933")
            near = gpd.sjoin_nearest(
                pts.loc[miss].to_crs("EPSG:6933"), proj[[id_field, "geometry"]], how="left"
            )
            near = near[~near.index.duplicated(keep="first")]
            out.loc[miss, "unit_id"] = (
                near[id_field].reindex(pts.index[miss]).to_numpy(dtype=object)
            )
            out.loc[miss, "share"] = 1.0
        else:
            raise ValueError(f"outside must be 'error', 'drop' or 'nearest', got {outside!r}")
    return out


def _voronoi_assign(pts: Any, ufr: Any, id_field: str) -> tuple[pd.Series, pd.Series]:
    import geopandas as gpd
    import shapely

    proj_units = ufr.to_crs("EPSG:6933")
    proj_pts = pts.to_crs("EPSG:6933")
    xy = np.column_stack([proj_pts.geometry.x, proj_pts.geometry.y])
    uniq, inverse = np.unique(np.round(xy, 3), axis=0, return_inverse=True)
    minx, miny, maxx, maxy = proj_units.total_bounds
    pad = max(maxx - minx, maxy - miny) + 1.0
    extent = shapely.box(
        min(minx, uniq[:, 0].min()) - pad,
        min(miny, uniq[:, 1].min()) - pad,
        max(maxx, uniq[:, 0].max()) + pad,
        max(maxy, uniq[:, 1].max()) + pad,
    )
    if len(uniq) == 1:
        regions = [extent]
    else:
        coll = shapely.voronoi_polygons(shapely.multipoints(uniq), extend_to=extent, ordered=True)
        regions = [shapely.intersection(g, extent) for g in shapely.get_parts(coll)]
    cells = gpd.GeoDataFrame({"site": np.arange(len(uniq))}, geometry=regions, crs="EPSG:6933")
    pieces = gpd.overlay(
        cells, proj_units[[id_field, "geometry"]], how="intersection", keep_geom_type=True
    )
    pieces["area"] = pieces.geometry.area
    pieces = pieces.loc[pieces["area"] > 0]
    total = pieces.groupby("site")["area"].sum()
    best = pieces.sort_values(["site", "area"], ascending=[True, False]).drop_duplicates("site")
    best = best.set_index("site")
    site_unit = best[id_field].reindex(np.arange(len(uniq)))
    site_share = (best["area"] / total).reindex(np.arange(len(uniq)))
    return (
        pd.Series(site_unit.to_numpy(dtype=object)[inverse], index=pts.index),
        pd.Series(site_share.to_numpy(dtype=float)[inverse], index=pts.index),
    )


# ------------------------------------------------------------------------- events
def _scrubbed(batches: Iterator[pa.RecordBatch], label: str) -> Iterator[pa.RecordBatch]:
    """Re-raise Arrow read errors without their text (it may quote raw rows, ids included)."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise CDRInputError(
                f"{label}: the events file is malformed ({type(err).__name__} while reading; the "
                "reader's message is withheld because it may quote raw rows). Fix: check the "
                "file's format, delimiter and column count."
            ) from None
        yield batch


def _iter_batches(
    source: EventSource, columns: list[str], batch_size: int
) -> tuple[Iterator[pa.RecordBatch], int | None, str]:
    """Stream record batches of ``columns``; returns (iterator, total rows or None, label)."""
    if isinstance(source, pd.DataFrame | pa.Table | pa.RecordBatch):
        have = list(source.columns) if isinstance(source, pd.DataFrame) else source.schema.names
        missing = [c for c in columns if c not in have]
        if missing:
            raise CDRInputError(
                f"events table: missing column(s) {missing} (columns: {have}). "
                "Fix: pass subscriber_id=, timestamp=, cell_id= with the right column names."
            )
    if isinstance(source, pd.DataFrame):
        table = pa.Table.from_pandas(source[columns], preserve_index=False).combine_chunks()
        return iter(table.to_batches(batch_size)), table.num_rows, "events table"
    if isinstance(source, pa.RecordBatch):
        source = pa.Table.from_batches([source])
    if isinstance(source, pa.Table):
        table = source.select(columns).combine_chunks()
        return iter(table.to_batches(batch_size)), table.num_rows, "events table"
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.exists():
            raise InputFileError(f"{path}: no such events file. Fix: check the path.")
        suffix = path.suffix.lower()
        try:
            if suffix in (".parquet", ".pq"):
                import pyarrow.parquet as pq

                pf = pq.ParquetFile(path)
                return (
                    pf.iter_batches(batch_size=batch_size, columns=columns),
                    pf.metadata.num_rows,
                    str(path),
                )
            if suffix in (".arrow", ".feather", ".ipc"):
                import pyarrow.feather as feather

                table = feather.read_table(path, columns=columns, memory_map=True)
                return iter(table.to_batches(batch_size)), table.num_rows, str(path)
            import pyarrow.csv as pacsv

            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_SIZE),
                convert_options=pacsv.ConvertOptions(
                    include_columns=columns, column_types=dict.fromkeys(columns, pa.string())
                ),
            )
            return iter(reader), None, str(path)
        except (pa.ArrowInvalid, OSError, KeyError) as err:
            # the Arrow message may quote raw rows (subscriber ids): never pass it on
            raise CDRInputError(
                f"{path}: cannot read the events file as {suffix or 'CSV'} ({type(err).__name__}) or it "
                f"lacks the columns {columns}. Fix: check the format and pass subscriber_id=, "
                "timestamp=, cell_id= with the right column names."
            ) from None
    if isinstance(source, Iterable):
        return (
            (b.select(columns) if hasattr(b, "select") else b for b in source),
            None,
            "events batches",
        )
    raise CDRInputError(
        f"events: unsupported source {type(source).__name__}. Fix: give a Parquet/CSV path or a table."
    )


def _timestamps_seconds(
    arr: pa.Array, *, timestamp_format: str | None, timestamp_unit: str, timezone: str | None
) -> np.ndarray:
    """Local wall-clock seconds since 1970 (int64); NaT-like invalid values -> INT64 min."""
    typ = arr.type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        parsed = None
        if timestamp_format is None:
            # strict ISO 8601: naive or with a zone designator, whole or fractional seconds
            for target in (
                pa.timestamp("s"),
                pa.timestamp("s", tz="UTC"),
                pa.timestamp("ms"),
                pa.timestamp("ms", tz="UTC"),
            ):
                try:
                    parsed = pc.cast(arr, target)
                    break
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    parsed = None
            if parsed is None:
                cands = [
                    pc.strptime(arr, format=f, unit="s", error_is_null=True)
                    for f in _EXTRA_FORMATS
                ]
                parsed = pc.coalesce(*cands)
        else:
            parsed = pc.strptime(arr, format=timestamp_format, unit="s", error_is_null=True)
        arr, typ = parsed, parsed.type
    elif pa.types.is_integer(typ) or pa.types.is_floating(typ):
        arr = pc.cast(pc.cast(arr, pa.int64(), safe=False), pa.timestamp(timestamp_unit, tz="UTC"))
        typ = arr.type
    elif pa.types.is_date(typ):
        arr = pc.cast(arr, pa.timestamp("s"))
        typ = arr.type
    if not pa.types.is_timestamp(typ):
        raise CDRInputError(
            f"events: timestamp column has type {typ}, not a timestamp, number or text. "
            "Fix: pass timestamp=<column of event times>."
        )
    if typ.tz is not None:
        if timezone is not None:
            arr = pc.cast(arr, pa.timestamp(typ.unit, tz=timezone))
        arr = pc.local_timestamp(arr)
    factor = {"s": 1, "ms": 1_000, "us": 1_000_000, "ns": 1_000_000_000}[typ.unit]
    raw = pc.cast(arr, pa.int64()).fill_null(np.iinfo(np.int64).min).to_numpy(zero_copy_only=False)
    valid = raw != np.iinfo(np.int64).min
    out = np.full(len(raw), np.iinfo(np.int64).min, dtype=np.int64)
    out[valid] = np.floor_divide(raw[valid], factor)
    return out


@dataclass(repr=False)
class HomeLocations:
    """Home unit of each subscriber in each period (in memory only, never written).

    Subscribers are per-run integer codes (not ids, not hashes). Arrays share
    one length: ``subscriber`` (int64 code), ``period`` (int index into
    ``periods``), ``unit`` (int index into ``unit_ids``).
    """

    subscriber: np.ndarray
    period: np.ndarray
    unit: np.ndarray
    periods: list[str]
    period_ordinals: np.ndarray
    unit_ids: np.ndarray
    unit_country: np.ndarray
    covered: np.ndarray
    report: dict[str, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"HomeLocations({len(self.subscriber)} subscriber-periods, periods {self.periods}, "
            f"{int(self.covered.sum())} units with towers)"
        )

    def __reduce__(self) -> Any:
        raise PrivacyError(
            "home locations are subscriber-level data and must not be pickled or persisted; "
            "call relocation_od() to get the redacted OD table"
        )

    def counts(self) -> pd.DataFrame:
        """Count subscribers per unit and period (not redacted: for checks in memory only)."""
        key = self.period.astype(np.int64) * len(self.unit_ids) + self.unit
        uniq, n = np.unique(key, return_counts=True)
        return pd.DataFrame(
            {
                "unit_id": self.unit_ids[uniq % len(self.unit_ids)],
                "period": np.asarray(self.periods, dtype=object)[uniq // len(self.unit_ids)],
                "n": n.astype(float),
            }
        )


def _period_ordinals(days: np.ndarray, period: Period) -> tuple[np.ndarray, np.ndarray]:
    """Ordinal (consecutive integers) and string label of each day number since 1970."""
    dates = days.astype("datetime64[D]")
    if period == "day":
        return days.astype(np.int64), np.datetime_as_string(dates, unit="D")
    if period == "week":  # weeks start on Monday; 1970-01-01 was a Thursday
        ords = (days.astype(np.int64) + 3) // 7
        monday = (ords * 7 - 3).astype("datetime64[D]")
        return ords, np.char.add("W", np.datetime_as_string(monday, unit="D"))
    months = dates.astype("datetime64[M]").astype(np.int64)
    year = months // 12 + 1970
    if period == "month":
        return months, np.datetime_as_string(dates.astype("datetime64[M]"), unit="M")
    if period == "quarter":
        q = months // 3
        return q, np.char.add(
            np.char.add(year.astype(str), "-Q"), ((months % 12) // 3 + 1).astype(str)
        )
    if period == "year":
        return year, year.astype(str)
    raise ValueError(f"period must be one of day, week, month, quarter, year; got {period!r}")


def detect_homes(
    events: EventSource,
    tower_units: pd.DataFrame,
    unit_ids: Sequence[str],
    *,
    unit_country: Sequence[str] | None = None,
    subscriber_id: str = "subscriber_id",
    timestamp: str = "timestamp",
    cell_id: str = "cell_id",
    period: Period = "month",
    night: tuple[int, int] | None = (19, 7),
    min_active_days: int = 5,
    timezone: str | None = None,
    timestamp_format: str | None = None,
    timestamp_unit: Literal["s", "ms", "us", "ns"] = "s",
    start: str | np.datetime64 | None = None,
    end: str | np.datetime64 | None = None,
    on_bad_events: Literal["error", "drop"] = "error",
    salt: bytes | None = None,
    batch_size: int = 1_000_000,
    progress: bool | None = None,
) -> HomeLocations:
    """Home unit per subscriber and period: the modal night-time unit.

    Rules, in order:

    1. Events outside ``[start, end)`` are ignored; with ``night=(a, b)`` only
       events with local hour in ``[a, 24) ∪ [0, b)`` (wrapping midnight; or
       ``[a, b)`` when ``a < b``) count. A *day* runs from hour ``b`` to hour
       ``b`` the next day, so one night is one day and belongs to one period.
    2. A subscriber is *active* on a day with at least one counted event; only
       subscribers active on at least ``min_active_days`` days of a period get a
       home in that period.
    3. The home is the unit with the most active days; ties go to the unit with
       more events, then to the unit listed first in ``unit_ids``.

    Parameters
    ----------
    events
        Parquet/CSV/Arrow IPC path, pyarrow Table/RecordBatch(es) or DataFrame
        with ``subscriber_id``, ``timestamp``, ``cell_id`` columns. Streamed in
        batches of ``batch_size`` rows.
    tower_units
        Output of :func:`assign_towers` (``cell_id``, ``unit_id``).
    unit_ids
        All unit ids (defines unit order and the universe).
    unit_country
        Country code of each unit (same order), for ``universe="within"``.
    subscriber_id, timestamp, cell_id
        Column names in ``events``.
    period
        ``"day"``, ``"week"`` (Monday-based, label ``W<monday>``),
        ``"month"`` (label ``YYYY-MM``), ``"quarter"`` (``YYYY-Qn``), ``"year"``.
    night
        Night hours ``(start, end)`` in local time, default ``(19, 7)``; None
        uses every event and days run from midnight.
    min_active_days
        Minimum number of active days in a period (default 5).
    timezone
        IANA zone for timestamps that carry one (and for numeric epochs, which
        are UTC); naive timestamps are taken as local time already.
    timestamp_format
        ``strptime`` format of text timestamps (default: ISO 8601 variants).
    timestamp_unit
        Unit of numeric timestamps.
    start, end
        Optional time window (local, end exclusive).
    on_bad_events
        Events with a missing subscriber id or cell, an unparsable timestamp, a
        timestamp before 1980 or after 2159, or a cell absent from the towers
        table: ``"error"`` (default) raises :class:`CDRInputError` with counts
        and row numbers (never ids); ``"drop"`` drops them and warns with counts.
    salt
        Secret key of the id hash (default: random per call).
    batch_size
        Rows per batch (memory ~ 100 bytes per row of a batch).
    progress
        Show a tqdm bar over batches (None: only on a terminal; False: never).

    Returns
    -------
    HomeLocations
        In-memory homes; ``report`` holds event and subscriber counts.
    """
    from tqdm.auto import tqdm

    if min_active_days < 1:
        raise ValueError("min_active_days must be >= 1")
    unit_ids = np.asarray([str(u) for u in unit_ids], dtype=object)
    n_units = len(unit_ids)
    if n_units >= 1 << _UNIT_BITS:
        raise CDRInputError(
            f"{n_units} units: at most {(1 << _UNIT_BITS) - 1} are supported per run."
        )
    upos = pd.Series(np.arange(n_units), index=pd.Index(unit_ids))
    tu = tower_units.copy()
    tu["cell_id"] = tu["cell_id"].astype(str)
    unknown_units = sorted(set(tu["unit_id"].dropna().astype(str)) - set(unit_ids))
    if unknown_units:
        raise CDRInputError(f"tower_units name unit(s) not in unit_ids: {_fmt(unknown_units)}.")
    tower_unit = np.array(
        [
            int(upos.get(str(x), -1)) if pd.notna(x) else -1
            for x in tu["unit_id"].to_numpy(dtype=object)
        ],
        dtype=np.int64,
    )
    cells = pa.array(tu["cell_id"].to_numpy(dtype=object), type=pa.string())
    covered = np.zeros(n_units, dtype=bool)
    covered[tower_unit[tower_unit >= 0]] = True
    if night is not None:
        a, b = int(night[0]), int(night[1])
        if not (0 <= a <= 23 and 0 <= b <= 24 and a != b):
            raise ValueError(f"night must be two different hours in 0..24, got {night!r}")
        shift = b * 3600 if a > b else 0
    else:
        shift = 0
    t_start = None if start is None else int(np.datetime64(start, "s").astype(np.int64))
    t_end = None if end is None else int(np.datetime64(end, "s").astype(np.int64))

    hasher = SubscriberHasher(salt)
    codes = _Codes()
    cols = [subscriber_id, timestamp, cell_id]
    batches, total_rows, label = _iter_batches(events, cols, batch_size)
    report = dict.fromkeys(
        [
            "events",
            "missing_subscriber",
            "missing_cell",
            "bad_timestamp",
            "out_of_range_timestamp",
            "unknown_cell",
            "tower_outside_units",
            "outside_window",
            "daytime",
            "duplicates",
            "used",
        ],
        0,
    )
    bad_rows: dict[str, list[int]] = {}
    raw_keys: list[np.ndarray] = []
    reduced: tuple[np.ndarray, np.ndarray] | None = None
    pending = 0
    row0 = 0
    n_batches = None if total_rows is None else max(1, -(-total_rows // batch_size))
    bar = tqdm(
        _scrubbed(batches, label),
        total=n_batches,
        desc="CDR home detection",
        unit="batch",
        disable=(not progress) if progress is not None else None,
    )
    for batch in bar:
        n = batch.num_rows
        if n == 0:
            continue
        report["events"] += n
        try:
            sid = batch.column(subscriber_id)
            ts = batch.column(timestamp)
            cel = batch.column(cell_id)
        except KeyError:
            raise CDRInputError(
                f"{label}: missing one of the columns {cols}. Fix: pass subscriber_id=, timestamp=, cell_id=."
            ) from None
        ok = np.ones(n, dtype=bool)

        def _flag(mask: np.ndarray, what: str, _ok: np.ndarray = ok, _row0: int = row0) -> None:
            mask = mask & _ok
            k = int(mask.sum())
            if k:
                report[what] += k
                rows = bad_rows.setdefault(what, [])
                if len(rows) < _MAX_SHOWN:
                    rows.extend((np.flatnonzero(mask)[:_MAX_SHOWN] + _row0 + 1).tolist())
                _ok &= ~mask

        _flag(sid.is_null().to_numpy(zero_copy_only=False), "missing_subscriber")
        _flag(cel.is_null().to_numpy(zero_copy_only=False), "missing_cell")
        secs = _timestamps_seconds(
            ts, timestamp_format=timestamp_format, timestamp_unit=timestamp_unit, timezone=timezone
        )
        invalid = secs == np.iinfo(np.int64).min
        _flag(invalid, "bad_timestamp")
        day = np.floor_divide(secs - shift, 86400) - _DAY0
        _flag(~invalid & ((day < 0) | (day >= 1 << _DAY_BITS)), "out_of_range_timestamp")
        if not pa.types.is_string(cel.type):
            cel = pc.cast(cel, pa.string())
        tidx = pc.index_in(cel, value_set=cells).to_numpy(zero_copy_only=False)
        tidx_ok = ~np.isnan(tidx.astype(float)) if tidx.dtype.kind == "f" else np.ones(n, bool)
        _flag(~tidx_ok, "unknown_cell")
        tpos = np.where(tidx_ok, np.nan_to_num(tidx.astype(float), nan=0).astype(np.int64), 0)
        unit = tower_unit[tpos]
        outside_units = (unit < 0) & ok
        report["tower_outside_units"] += int(outside_units.sum())
        ok &= ~outside_units
        if t_start is not None or t_end is not None:
            win = np.ones(n, dtype=bool)
            if t_start is not None:
                win &= secs >= t_start
            if t_end is not None:
                win &= secs < t_end
            report["outside_window"] += int((ok & ~win).sum())
            ok &= win
        if night is not None:
            hour = np.floor_divide(np.mod(secs, 86400), 3600)
            is_night = (hour >= a) | (hour < b) if a > b else (hour >= a) & (hour < b)
            report["daytime"] += int((ok & ~is_night).sum())
            ok &= is_night
        if not ok.any():
            row0 += n
            continue
        keep = np.flatnonzero(ok)
        uniq_hash, sub_idx = hasher.hash_dictionary(sid)
        del sid
        sub = codes.encode_unique(uniq_hash)[sub_idx[keep]]
        if codes.n >= 1 << _SUB_BITS:
            raise CDRInputError(
                f"more than {(1 << _SUB_BITS) - 1} subscribers in one run; split by region."
            )
        secs_k = secs[keep]
        unit_k = unit[keep]
        # exact duplicates (same subscriber, time and cell) within a batch
        ev_key = _mix64(
            sub.astype(np.uint64)
            ^ _mix64(secs_k.astype(np.uint64) ^ _mix64(tpos[keep].astype(np.uint64)))
        )
        dup = pd.Series(ev_key, copy=False).duplicated().to_numpy()
        if dup.any():
            report["duplicates"] += int(dup.sum())
            sub, unit_k, secs_k = sub[~dup], unit_k[~dup], secs_k[~dup]
        key = (
            (sub.astype(np.uint64) << np.uint64(_UNIT_BITS + _DAY_BITS))
            | (unit_k.astype(np.uint64) << np.uint64(_DAY_BITS))
            | (np.floor_divide(secs_k - shift, 86400) - _DAY0).astype(np.uint64)
        )
        report["used"] += len(key)
        raw_keys.append(key)
        pending += len(key)
        if pending > _MAX_PENDING:  # bound memory: reduce to distinct keys with counts
            reduced = _reduce(raw_keys, reduced)
            raw_keys, pending = [], 0
        row0 += n
    bar.close()

    bad = {
        k: report[k]
        for k in (
            "missing_subscriber",
            "missing_cell",
            "bad_timestamp",
            "out_of_range_timestamp",
            "unknown_cell",
        )
        if report[k]
    }
    if bad:
        detail = "; ".join(
            f"{k.replace('_', ' ')}: {v} (rows {_fmt(bad_rows.get(k, []))})"
            for k, v in bad.items()
        )
        if on_bad_events == "error":
            raise CDRInputError(
                f"{label}: {sum(bad.values())} bad event(s) of {report['events']} — {detail}. Fix: correct the "
                "log (timestamps 1980-2159 in a parseable format; every cell in the towers table), pass "
                "timestamp_format=, or on_bad_events='drop' to drop them."
            )
        warnings.warn(
            f"{label}: dropped {sum(bad.values())} bad event(s) — {detail}.",
            UserWarning,
            stacklevel=2,
        )
    if report["events"] == 0:
        raise CDRInputError(
            f"{label}: the event log is empty. Fix: check the file and the time window."
        )
    if report["tower_outside_units"]:
        warnings.warn(
            f"{label}: dropped {report['tower_outside_units']} event(s) on towers outside every unit.",
            UserWarning,
            stacklevel=2,
        )
    if report["duplicates"]:
        warnings.warn(
            f"{label}: dropped {report['duplicates']} duplicate event(s) (same subscriber, time and cell).",
            UserWarning,
            stacklevel=2,
        )
    key, cnt = _reduce(raw_keys, reduced)
    del raw_keys, reduced
    homes = _homes_from_keys(key, cnt, period, min_active_days, n_units)
    sub_h, per_h, unit_h, periods, ords = homes
    if len(sub_h) == 0:
        warnings.warn(
            f"{label}: no subscriber has a home in any period ({report['used']} events used of "
            f"{report['events']}). Fix: check night= (local hours), timezone=, min_active_days= and "
            "start=/end=.",
            UserWarning,
            stacklevel=2,
        )
    report["subscribers"] = int(codes.n)
    report["subscriber_periods_with_home"] = len(sub_h)
    log.info(
        "CDR home detection: %d events read, %d used, %d subscribers, %d subscriber-periods with a home",
        report["events"],
        report["used"],
        report["subscribers"],
        len(sub_h),
    )
    return HomeLocations(
        subscriber=sub_h,
        period=per_h,
        unit=unit_h,
        periods=periods,
        period_ordinals=ords,
        unit_ids=unit_ids,
        unit_country=np.asarray(
            unit_country if unit_country is not None else [""] * n_units, dtype=object
        ),
        covered=covered,
        report=report,
    )


def _reduce(
    raw: list[np.ndarray], reduced: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct sorted keys and their event counts, from raw keys plus an earlier reduction."""
    keys = np.sort(np.concatenate(raw)) if raw else np.empty(0, np.uint64)
    starts, counts = _sorted_runs(keys)
    keys = keys[starts]
    if reduced is None or len(reduced[0]) == 0:
        return keys, counts
    k = np.concatenate([reduced[0], keys])
    c = np.concatenate([reduced[1], counts])
    order = np.argsort(k, kind="stable")
    k, c = k[order], c[order]
    starts, _ = _sorted_runs(k)
    return k[starts], np.add.reduceat(c, starts)


def _homes_from_keys(
    key: np.ndarray, cnt: np.ndarray, period: Period, min_active_days: int, n_units: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Apply the home rules to sorted distinct (subscriber, unit, day) keys with event counts.

    Sort-free apart from one ``np.sort``: keys are sorted by subscriber, unit,
    day, and the period is monotone in the day, so (subscriber, unit, period)
    groups are runs. Returns homes sorted by (subscriber, period).
    """
    if len(key) == 0:
        e = np.empty(0, np.int64)
        return e, e, e, [], e
    day_mask = (1 << _DAY_BITS) - 1
    sub = (key >> np.uint64(_UNIT_BITS + _DAY_BITS)).astype(np.int64)
    unit = ((key >> np.uint64(_DAY_BITS)) & np.uint64((1 << _UNIT_BITS) - 1)).astype(np.int64)
    day = (key & np.uint64(day_mask)).astype(np.int64)
    dmin, dmax = int(day.min()), int(day.max())
    span = np.arange(dmin, dmax + 1, dtype=np.int64)
    ords_span, labels_span = _period_ordinals(span + _DAY0, period)
    present = np.zeros(len(span), dtype=bool)
    present[day - dmin] = True
    used = ords_span[present]
    ustarts, _ = _sorted_runs(used)  # ordinals are non-decreasing in the day
    uords = used[ustarts]
    pidx_span = np.searchsorted(uords, ords_span)
    first_day = np.searchsorted(ords_span, uords)
    labels = [str(labels_span[i]) for i in first_day]
    n_p = len(uords)
    pidx = pidx_span[day - dmin]
    # (subscriber, unit, period) runs: active days and events per candidate home
    su = key >> np.uint64(_DAY_BITS)
    boundary = np.empty(len(key), dtype=bool)
    boundary[0] = True
    boundary[1:] = (su[1:] != su[:-1]) | (pidx[1:] != pidx[:-1])
    starts = np.flatnonzero(boundary)
    ndays = np.diff(np.append(starts, len(key)))
    nev = np.add.reduceat(cnt.astype(np.int64), starts)
    r_sub, r_unit, r_p = sub[starts], unit[starts], pidx[starts]
    # active days per (subscriber, period): distinct (subscriber, day)
    sd = np.sort((sub << _DAY_BITS) | day)
    st, _ = _sorted_runs(sd)
    sd = sd[st]
    g_sd = (sd >> _DAY_BITS) * n_p + pidx_span[(sd & day_mask) - dmin]
    gst, active = _sorted_runs(g_sd)
    g_active = g_sd[gst]
    # modal unit: most active days, then most events, then the first unit
    g_run = r_sub * n_p + r_p
    gi = np.searchsorted(g_active, g_run)
    score = (
        (ndays.astype(np.int64) << 54)
        | (np.minimum(nev, (1 << 34) - 1) << 20)
        | (((1 << _UNIT_BITS) - 1) - r_unit)
    )
    best = np.zeros(len(g_active), dtype=np.int64)
    np.maximum.at(best, gi, score)
    win = score == best[gi]
    home_unit = np.full(len(g_active), -1, dtype=np.int64)
    home_unit[gi[win]] = r_unit[win]
    keep = active >= min_active_days
    g = g_active[keep]
    return g // n_p, g % n_p, home_unit[keep], labels, uords


# ---------------------------------------------------------------------- redaction
def _check_threshold(threshold: int, allow_small_cells: bool) -> int:
    threshold = int(threshold)
    if threshold < 0:
        raise PrivacyError(f"threshold must be >= 0, got {threshold}.")
    if threshold < DEFAULT_THRESHOLD:
        if not allow_small_cells:
            raise PrivacyError(
                f"threshold={threshold} is below {DEFAULT_THRESHOLD}: cells of {threshold + 1}.."
                f"{DEFAULT_THRESHOLD} subscribers would be released. Fix: keep threshold >= "
                f"{DEFAULT_THRESHOLD}, or pass allow_small_cells=True if your data agreement allows it."
            )
        warnings.warn(
            f"allow_small_cells=True: releasing cells with {threshold + 1}..{DEFAULT_THRESHOLD} subscribers "
            f"(threshold {threshold} < {DEFAULT_THRESHOLD}); check the data-sharing agreement.",
            UserWarning,
            stacklevel=3,
        )
    return threshold


def redact(
    table: pd.DataFrame,
    *,
    column: str = "count",
    max_column: str = "max",
    threshold: int = DEFAULT_THRESHOLD,
    allow_small_cells: bool = False,
) -> pd.DataFrame:
    """Censor every count of ``threshold`` or fewer: ``column`` NaN, ``max_column`` = threshold.

    Parameters
    ----------
    table
        Any table with a count column.
    column, max_column
        Count column and the censoring-bound column to (over)write.
    threshold
        Largest count that is redacted (default 15, FlowKit's rule ``value > 15``
        is kept). Higher is always allowed.
    allow_small_cells
        Needed for ``threshold < 15`` (and then a warning is issued).

    Returns
    -------
    pandas.DataFrame
        A copy; already-NaN counts keep their bound.
    """
    threshold = _check_threshold(threshold, allow_small_cells)
    out = table.copy()
    values = out[column].astype(float)
    small = values.notna() & (values <= threshold)
    if max_column not in out.columns:
        out[max_column] = np.nan
    out[max_column] = out[max_column].astype(float)
    out.loc[small, max_column] = float(threshold)
    out[column] = values.where(~small)
    return out


# ---------------------------------------------------------------------- OD tables
@dataclass(repr=False)
class CDRFlows:
    """Redacted CDR flow tables (see the module docstring for the columns).

    ``flows`` plugs into ``build_dataset(..., flows={"cdr": result.flows})``,
    ``covariates`` into ``covariates=``. Every count is already redacted.
    """

    flows: pd.DataFrame
    totals: pd.DataFrame
    subscribers: pd.DataFrame
    covariates: pd.DataFrame
    threshold: int
    report: dict[str, int] = field(default_factory=dict)

    def __repr__(self) -> str:
        n_obs = int(self.flows["count"].notna().sum())
        return (
            f"CDRFlows({len(self.flows)} OD rows, {n_obs} above the threshold {self.threshold}, "
            f"periods {sorted(self.flows['period'].unique().tolist()) if 'period' in self.flows else []})"
        )


def _universe_mask(covered: np.ndarray, country: np.ndarray, universe: str) -> np.ndarray:
    if universe == "covered":
        mask = covered[:, None] & covered[None, :]
    elif universe == "within":
        mask = covered[:, None] & covered[None, :] & (country[:, None] == country[None, :])
    else:
        raise ValueError(f"universe must be 'covered' or 'within', got {universe!r}")
    np.fill_diagonal(mask, False)
    return mask


def _protect_totals(totals: pd.DataFrame, flows: pd.DataFrame, threshold: int) -> pd.DataFrame:
    """Complementary suppression: hide a total that would reveal its redacted cells.

    ``total - sum(released cells)`` is the sum of the redacted cells of that row
    (or column); when there is at least one redacted cell and that remainder is
    0..threshold, releasing the total would release a small count (exactly, when
    one cell is redacted). Such totals become NaN with ``<col>_max`` = released
    sum + threshold x (number of redacted cells).
    """
    if totals.empty or flows.empty:
        return totals
    out = totals.copy()
    for col, side in (("outflow", "origin"), ("inflow", "destination")):
        if col not in out.columns:
            continue
        g = (
            flows.assign(_vis=flows["count"].fillna(0.0), _red=flows["count"].isna())
            .groupby([side, "period"])[["_vis", "_red"]]
            .sum()
        )
        key = pd.MultiIndex.from_arrays([out["unit_id"], out["period"]])
        vis = g["_vis"].reindex(key).to_numpy(dtype=float)
        red = g["_red"].reindex(key).fillna(0).to_numpy(dtype=float)
        rem = out[col].to_numpy(dtype=float) - np.nan_to_num(vis)
        hide = (red > 0) & (rem >= 0) & (rem <= threshold) & out[col].notna().to_numpy()
        if hide.any():
            out.loc[hide, col] = np.nan
            out.loc[hide, f"{col}_max"] = np.nan_to_num(vis[hide]) + threshold * red[hide]
    return out


def relocation_od(
    homes: HomeLocations,
    *,
    threshold: int = DEFAULT_THRESHOLD,
    allow_small_cells: bool = False,
    universe: Literal["covered", "within"] = "covered",
    population: pd.Series | None = None,
) -> CDRFlows:
    """Relocation OD between consecutive periods, redacted.

    A subscriber with a home in both period t-1 and t whose home changed is one
    relocation ``home[t-1] -> home[t]`` labelled ``t``; stayers fall on the
    diagonal, which is excluded. Periods are consecutive calendar periods;
    period t appears only when t-1 and t both have homes.

    Parameters
    ----------
    homes
        Output of :func:`detect_homes`.
    threshold, allow_small_cells
        Redaction, see :func:`redact`. Applied to OD cells, in/out totals and
        subscribers per unit.
    universe
        Pairs written out (zeros included, so redacted as 0..threshold):
        ``"covered"`` (default) every ordered pair of distinct units holding a
        tower; ``"within"`` only pairs in the same country (relocations across
        borders are then dropped with a warning).
    population
        Residents per unit (indexed by unit id) for
        ``cdr_subscribers_per_resident``.

    Returns
    -------
    CDRFlows
    """
    threshold = _check_threshold(threshold, allow_small_cells)
    n_units = len(homes.unit_ids)
    n_p = len(homes.periods)
    g = homes.subscriber * max(n_p, 1) + homes.period
    order = np.arange(len(g)) if np.all(g[1:] > g[:-1]) else np.argsort(g, kind="stable")
    s, p, u = homes.subscriber[order], homes.period[order], homes.unit[order]
    ords = homes.period_ordinals
    nxt = (s[1:] == s[:-1]) & (ords[p[1:]] - ords[p[:-1]] == 1)
    o, d, t = u[:-1][nxt], u[1:][nxt], p[1:][nxt]
    has_home = np.bincount(p, minlength=n_p) > 0 if n_p else np.zeros(0, bool)
    rel_periods = [
        k for k in range(1, n_p) if ords[k] - ords[k - 1] == 1 and has_home[k] and has_home[k - 1]
    ]
    if not rel_periods:
        warnings.warn(
            f"no relocation period: homes were found in periods {homes.periods}, but never in two "
            "consecutive ones. Fix: use a log spanning at least two periods, or a shorter period=.",
            UserWarning,
            stacklevel=2,
        )
    movers = o != d
    o, d, t = o[movers], d[movers], t[movers]
    mask = _universe_mask(homes.covered, homes.unit_country.astype(str), universe)
    inside = mask[o, d]
    if not inside.all():
        warnings.warn(
            f"{int((~inside).sum())} relocation(s) between units outside the universe {universe!r} were "
            "dropped (e.g. across borders with universe='within').",
            UserWarning,
            stacklevel=2,
        )
        o, d, t = o[inside], d[inside], t[inside]
    cell = o.astype(np.int64) * n_units + d
    ids = homes.unit_ids
    oi, di = np.nonzero(mask)
    frames, tot_frames = [], []
    for k in rel_periods:  # one dense origin x destination matrix per period at a time
        mat = np.bincount(cell[t == k], minlength=n_units * n_units).reshape(n_units, n_units)
        mat *= mask
        frames.append(
            pd.DataFrame(
                {
                    "origin": ids[oi],
                    "destination": ids[di],
                    "period": homes.periods[k],
                    "count": mat[oi, di].astype(float),
                }
            )
        )
        # totals before redaction (movers out of / into each unit)
        tot_frames.append(
            pd.DataFrame(
                {
                    "unit_id": ids,
                    "period": homes.periods[k],
                    "outflow": mat.sum(axis=1).astype(float),
                    "inflow": mat.sum(axis=0).astype(float),
                }
            ).loc[homes.covered]
        )
        del mat
    flows = (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame({"origin": [], "destination": [], "period": [], "count": []})
    )
    flows = redact(flows, threshold=threshold, allow_small_cells=threshold < DEFAULT_THRESHOLD)
    totals = (
        pd.concat(tot_frames, ignore_index=True)
        if tot_frames
        else pd.DataFrame({"unit_id": [], "period": [], "outflow": [], "inflow": []})
    )
    small_ok = threshold < DEFAULT_THRESHOLD
    totals = redact(
        totals,
        column="outflow",
        max_column="outflow_max",
        threshold=threshold,
        allow_small_cells=small_ok,
    )
    totals = redact(
        totals,
        column="inflow",
        max_column="inflow_max",
        threshold=threshold,
        allow_small_cells=small_ok,
    )
    totals = _protect_totals(totals, flows, threshold)
    # subscribers per unit and period
    per = np.zeros((n_p, n_units))
    if len(homes.unit):
        np.add.at(per, (homes.period, homes.unit), 1.0)
    subs = pd.DataFrame(
        {
            "unit_id": np.tile(ids, n_p),
            "period": np.repeat(np.asarray(homes.periods, dtype=object), n_units),
            "cdr_subscribers": per.ravel(),
        }
    )
    subs = subs.loc[np.tile(homes.covered, n_p)].reset_index(drop=True)
    # the covariate averages only released (> threshold) period counts, so that it cannot be
    # combined with the per-period table to recover a redacted count
    released = np.where(per > threshold, per, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN units
        mean_subs = pd.Series(
            np.nanmean(released, axis=0) if n_p else np.full(n_units, np.nan),
            index=pd.Index(ids, name="unit_id"),
        )
    subs = redact(
        subs,
        column="cdr_subscribers",
        max_column="cdr_subscribers_max",
        threshold=threshold,
        allow_small_cells=small_ok,
    )
    cov = pd.DataFrame({"cdr_subscribers": mean_subs}).loc[homes.covered]
    if population is not None:
        pop = pd.Series(population).rename(index=str).reindex(cov.index).astype(float)
        cov["cdr_subscribers_per_resident"] = cov["cdr_subscribers"] / pop.where(pop > 0)
    report = dict(homes.report)
    report.update(relocations=len(o), periods=len(rel_periods))
    log.info(
        "CDR relocation OD: %d relocations in %d period(s); %d of %d cells above the threshold %d",
        len(o),
        len(rel_periods),
        int(flows["count"].notna().sum()),
        len(flows),
        threshold,
    )
    return CDRFlows(
        flows=flows[["origin", "destination", "period", "count", "max"]].astype(
            {"origin": str, "destination": str, "period": str, "count": float, "max": float}
        ),
        totals=totals.reset_index(drop=True),
        subscribers=subs,
        covariates=cov,
        threshold=threshold,
        report=report,
    )


def cdr_flows(
    events: EventSource,
    towers: str | os.PathLike[str] | pd.DataFrame,
    units: Any,
    *,
    subscriber_id: str = "subscriber_id",
    timestamp: str = "timestamp",
    cell_id: str = "cell_id",
    tower_lon: str = "lon",
    tower_lat: str = "lat",
    assignment: Literal["point", "voronoi"] = "point",
    outside: Literal["error", "drop", "nearest"] = "error",
    period: Period = "month",
    night: tuple[int, int] | None = (19, 7),
    min_active_days: int = 5,
    timezone: str | None = None,
    timestamp_format: str | None = None,
    start: str | None = None,
    end: str | None = None,
    on_bad_events: Literal["error", "drop"] = "error",
    threshold: int = DEFAULT_THRESHOLD,
    allow_small_cells: bool = False,
    universe: Literal["covered", "within"] = "covered",
    population: pd.Series | None = None,
    salt: bytes | None = None,
    batch_size: int = 1_000_000,
    progress: bool | None = None,
    id_field: str = "unit_id",
    country_field: str = "country",
) -> CDRFlows:
    """Raw CDR events -> redacted relocation OD, in one process.

    Chains :func:`read_towers`, :func:`assign_towers`, :func:`detect_homes` and
    :func:`relocation_od` (see those for every option). ``population``
    defaults to the ``population`` column of ``units`` when present.

    Examples
    --------
    >>> result = cdr_flows("cdr_events.parquet", "cdr_towers.csv", units)  # doctest: +SKIP
    >>> ds = build_dataset(units, covariates=cov.join(result.covariates),
    ...                    flows={"cdr": result.flows})  # doctest: +SKIP
    """
    _check_threshold(threshold, allow_small_cells)  # fail before reading anything
    ufr = _units_frame(units, id_field, country_field)
    tow = read_towers(towers, lon=tower_lon, lat=tower_lat)
    tu = assign_towers(
        tow,
        ufr,
        method=assignment,
        outside=outside,
        id_field=id_field,
        country_field=country_field,
    )
    homes = detect_homes(
        events,
        tu,
        ufr[id_field].tolist(),
        unit_country=ufr[country_field].astype(str).tolist(),
        subscriber_id=subscriber_id,
        timestamp=timestamp,
        cell_id=cell_id,
        period=period,
        night=night,
        min_active_days=min_active_days,
        timezone=timezone,
        timestamp_format=timestamp_format,
        start=start,
        end=end,
        on_bad_events=on_bad_events,
        salt=salt,
        batch_size=batch_size,
        progress=progress,
    )
    if population is None and "population" in getattr(units, "columns", []):
        population = pd.Series(
            units["population"].to_numpy(dtype=float), index=units[id_field].astype(str)
        )
    with warnings.catch_warnings():
        if threshold < DEFAULT_THRESHOLD:
            warnings.simplefilter("ignore", UserWarning)  # already warned above
        return relocation_od(
            homes,
            threshold=threshold,
            allow_small_cells=allow_small_cells,
            universe=universe,
            population=population,
        )


# ------------------------------------------------------------- aggregated OD input
def read_cdr_od(
    source: str | os.PathLike[str] | pd.DataFrame,
    *,
    units: Any = None,
    origin: str = "origin",
    destination: str = "destination",
    count: str = "count",
    period: str | None = "period",
    threshold: int = DEFAULT_THRESHOLD,
    allow_small_cells: bool = False,
    redacted_markers: Sequence[str] = ("", "NA", "NaN", "nan", "redacted", "*", "<=15", "≤15"),
    coverage: Sequence[str] | None = None,
    universe: Literal["covered", "within"] = "covered",
    totals: pd.DataFrame | None = None,
    mapping: Mapping[str, str] | pd.DataFrame | str | os.PathLike[str] | None = None,
    unmatched: Literal["error", "drop"] = "error",
    id_field: str = "unit_id",
    country_field: str = "country",
) -> CDRFlows:
    """Read an operator's redacted OD table (FlowKit style) into a :class:`CDRFlows`.

    Semantics of each ordered pair of distinct units, per period:

    * a row with a count above ``threshold`` -> observed;
    * a row with a count of ``threshold`` or fewer -> redacted here (``count``
      NaN, ``max`` = threshold), before anything is returned;
    * a row marked redacted (empty, ``redacted_markers``) -> NaN, ``max`` =
      threshold;
    * no row, both units in the operator's ``coverage`` (and, for
      ``universe="within"``, in one country) -> *censored* the same way: a
      redacted table drops exactly the cells of 0..threshold subscribers;
    * no row otherwise -> absent from the output (unobserved).

    Parameters
    ----------
    source
        CSV/Parquet file or DataFrame (FlowKit's ``pcod_from``/``pcod_to``/
        ``value`` work with ``origin="pcod_from", destination="pcod_to",
        count="value"``).
    units
        Units table (``id_field``, ``country_field``); needed for ``mapping``,
        ``universe="within"`` and unit-code checks.
    origin, destination, count, period
        Column names (``period`` ignored when absent from the table).
    threshold, allow_small_cells
        The operator's redaction threshold (cells <= threshold were dropped).
    redacted_markers
        Count values meaning "redacted".
    coverage
        Unit ids covered by the operator (default: every unit named in the table).
    universe
        ``"covered"`` or ``"within"`` (same country), see above.
    totals
        Optional in/out totals computed by the operator *before* redaction:
        ``unit_id``[, ``period``], ``outflow``, ``inflow``; redacted at the
        threshold like the cells and returned as ``CDRFlows.totals``.
    mapping, unmatched
        Unit-code harmonisation, see :func:`flowmodel.inputs.census.harmonise_codes`.

    Returns
    -------
    CDRFlows
        ``flows`` (``origin``, ``destination``, ``period``, ``count``, ``max``);
        a table without periods gets ``period`` = ``"all"``.
    """
    from flowmodel.inputs.census import _unit_country, harmonise_codes

    threshold = _check_threshold(threshold, allow_small_cells)
    if isinstance(source, pd.DataFrame):
        table, label = source.copy(), "CDR OD table"
    else:
        path = Path(source)
        if not path.exists():
            raise InputFileError(f"{path}: no such CDR OD file. Fix: check the path.")
        label = str(path)
        table = (
            pd.read_parquet(path)
            if path.suffix.lower() in (".parquet", ".pq")
            else pd.read_csv(path, dtype=str, keep_default_na=False)
        )
    missing = [c for c in (origin, destination, count) if c not in table.columns]
    if missing:
        raise CDRInputError(
            f"{label}: missing column(s) {missing} (columns: {list(table.columns)}). "
            "Fix: pass origin=, destination=, count= (FlowKit: pcod_from, pcod_to, value)."
        )
    has_period = period is not None and period in table.columns
    out = pd.DataFrame(
        {
            "origin": table[origin].astype(str).str.strip().to_numpy(),
            "destination": table[destination].astype(str).str.strip().to_numpy(),
            "period": table[period].astype(str).to_numpy() if has_period else "all",
        }
    )
    raw = table[count]
    text = raw.astype(str).str.strip().where(raw.notna(), "")
    marked = text.isin(list(redacted_markers)).to_numpy() | raw.isna().to_numpy()
    values = pd.to_numeric(text.where(~marked, None), errors="coerce").to_numpy(dtype=float)
    bad = ~marked & np.isnan(values)
    if bad.any():
        examples = sorted(set(text[bad]))[:_MAX_SHOWN]
        raise CDRInputError(
            f"{label}: column {count!r}: {int(bad.sum())} value(s) are neither counts nor redaction markers "
            f"{examples}. Fix: pass redacted_markers=[...] listing the operator's markers."
        )
    neg = values < 0
    if neg.any():
        raise CDRInputError(
            f"{label}: column {count!r}: {int(neg.sum())} negative count(s) at rows "
            f"{_fmt((np.flatnonzero(neg) + 1).tolist())}. Fix: counts must be >= 0."
        )
    out["count"] = values
    out["max"] = np.where(marked, float(threshold), np.nan)
    small = ~marked & (values <= threshold)
    n_small = int(small.sum())
    if n_small:
        log.info("%s: %d cell(s) of <= %d subscribers redacted on read", label, n_small, threshold)
    country = None
    if units is not None:
        country = _unit_country(units, id_field, country_field)
        out = harmonise_codes(
            out, country.index, mapping=mapping, unmatched=unmatched, label=label
        )
    elif mapping is not None or universe == "within":
        raise CDRInputError(
            f"{label}: mapping= and universe='within' need units=. Fix: pass the units table."
        )
    diag = out["origin"] == out["destination"]
    if diag.any():
        warnings.warn(
            f"{label}: dropped {int(diag.sum())} diagonal row(s) (origin == destination).",
            UserWarning,
            stacklevel=2,
        )
        out = out.loc[~diag]
    dup = out.duplicated(["origin", "destination", "period"])
    if dup.any():
        raise CDRInputError(
            f"{label}: {int(dup.sum())} duplicate row(s) for the same pair and period. Fix: aggregate first."
        )
    ids = (
        list(coverage)
        if coverage is not None
        else sorted(set(out["origin"]) | set(out["destination"]))
    )
    ids_arr = np.asarray([str(i) for i in ids], dtype=object)
    ctry = (
        country.reindex(ids_arr).fillna("").to_numpy(dtype=str)
        if country is not None
        else np.full(len(ids_arr), "", dtype=object).astype(str)
    )
    mask = _universe_mask(np.ones(len(ids_arr), bool), ctry, universe)
    oi, di = np.nonzero(mask)
    pairs = pd.DataFrame({"origin": ids_arr[oi], "destination": ids_arr[di]})
    full = pd.concat(
        [pairs.assign(period=p) for p in sorted(out["period"].unique())], ignore_index=True
    )
    merged = full.merge(
        out.assign(_present=True), on=["origin", "destination", "period"], how="outer"
    )
    absent = merged["_present"].isna().to_numpy()
    merged.loc[absent, "max"] = float(threshold)
    merged = merged.drop(columns="_present")
    flows = redact(merged, threshold=threshold, allow_small_cells=threshold < DEFAULT_THRESHOLD)
    flows = flows.sort_values(["period", "origin", "destination"], kind="stable").reset_index(
        drop=True
    )
    flows = flows[["origin", "destination", "period", "count", "max"]].astype(
        {"origin": str, "destination": str, "period": str, "count": float, "max": float}
    )
    tot = pd.DataFrame({"unit_id": [], "period": [], "outflow": [], "inflow": []})
    if totals is not None:
        tot = pd.DataFrame(totals).copy()
        need = [c for c in ("unit_id", "outflow", "inflow") if c not in tot.columns]
        if need:
            raise CDRInputError(
                f"totals: missing column(s) {need}. Fix: give unit_id, outflow, inflow."
            )
        if "period" not in tot.columns:
            tot["period"] = "all"
        tot["unit_id"] = tot["unit_id"].astype(str)
        tot["period"] = tot["period"].astype(str)
        small_ok = threshold < DEFAULT_THRESHOLD
        for col in ("outflow", "inflow"):
            tot[col] = pd.to_numeric(tot[col], errors="coerce").astype(float)
            tot = redact(
                tot,
                column=col,
                max_column=f"{col}_max",
                threshold=threshold,
                allow_small_cells=small_ok,
            )
        tot = _protect_totals(tot, flows, threshold)
    empty_subs = pd.DataFrame(
        {"unit_id": [], "period": [], "cdr_subscribers": [], "cdr_subscribers_max": []}
    )
    return CDRFlows(
        flows=flows,
        totals=tot,
        subscribers=empty_subs,
        covariates=pd.DataFrame(index=pd.Index([], name="unit_id")),
        threshold=threshold,
        report={"rows": len(table), "redacted_on_read": n_small, "marked": int(marked.sum())},
    )


# ------------------------------------------------------------------------ writing
def write_cdr_outputs(result: CDRFlows, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write the redacted tables of ``result`` atomically as CSV into ``out_dir``.

    Files: ``cdr_flows.csv``, ``cdr_totals.csv``, ``cdr_subscribers.csv``,
    ``cdr_covariates.csv``. Returns ``{"flows": path, ...}``.

    Raises
    ------
    PrivacyError
        If a count at or below the threshold is about to be written (cannot
        happen for tables made by this module; guards hand-edited results).
    """
    from flowmodel.atomic import atomic_path

    checks = {
        "flows": (result.flows, ["count"]),
        "totals": (result.totals, ["outflow", "inflow"]),
        "subscribers": (result.subscribers, ["cdr_subscribers"]),
    }
    for name, (table, cols) in checks.items():
        for col in cols:
            if col in table.columns and bool((table[col].astype(float) <= result.threshold).any()):
                raise PrivacyError(
                    f"CDRFlows.{name}.{col} holds counts <= {result.threshold}; refusing to write. "
                    "Fix: pass the table through flowmodel.inputs.cdr.redact() first."
                )
    out_dir = Path(out_dir)
    tables = {
        "flows": result.flows,
        "totals": result.totals,
        "subscribers": result.subscribers,
        "covariates": result.covariates.reset_index(),
    }
    paths = {}
    for name, table in tables.items():
        path = out_dir / f"cdr_{name}.csv"
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
        paths[name] = path
    return paths
