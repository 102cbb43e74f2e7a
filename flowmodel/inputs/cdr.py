"""Call detail records -> redacted relocation OD tables, private by default.

Two entry points, both returning a :class:`CDRFlows` whose ``flows`` table
plugs straight into :func:`flowmodel.dataset.build_dataset` as
``flows={"cdr": result.flows}`` and whose ``covariates`` table goes into
``covariates=``:

* :func:`cdr_flows` — raw events (``subscriber_id``, ``timestamp``,
  ``cell_id``; Parquet, CSV, Arrow IPC, a pyarrow Table or a DataFrame) and
  tower locations (``cell_id``, ``lon``, ``lat``) -> towers assigned to units
  (:func:`assign_towers`, point-in-polygon or Voronoi cells clipped to units)
  -> home unit per subscriber and period (:func:`detect_homes`: the clear
  modal night-time unit, with the night window and the nights it needs chosen
  from the data) -> relocation OD between consecutive periods
  (:func:`relocation_od`) -> redaction.
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
redaction. Everything else this module prints or returns - totals, subscriber
counts, logs, warnings, ``report``, ``diagnostics`` - follows one rule
(:func:`_keeps_ranges`, ``docs/privacy.md``): it is published only when,
with the released tables, it leaves every redacted cell its whole range.

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
* ``diagnostics``, ``home_rule``, ``hour_profile``, ``settings``: what the
  home detection saw and chose (see :func:`relocation_od`).
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
from flowmodel.inputs.tables import MAX_SHOWN, format_items

__all__ = [
    "DEFAULT_THRESHOLD",
    "DIAGNOSTICS",
    "FALLBACK_MIN_ACTIVE_DAYS",
    "FALLBACK_NIGHT",
    "MAX_SPURIOUS_SHARE",
    "CDRFlows",
    "HomeLocations",
    "PublicCount",
    "SubscriberHasher",
    "assign_towers",
    "cdr_flows",
    "detect_homes",
    "public_count",
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
_CSV_BLOCK_SIZE = 64 << 20  # bytes of CSV parsed per batch
_MAX_PENDING = 1 << 25  # raw event keys (8 bytes each) held before a reduction
_EXTRA_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M")


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
            f"{format_items(out.loc[bad, 'cell_id'])}. Fix: coordinates must be degrees (EPSG:4326)."
        )
    out = out.drop_duplicates()
    dup = out["cell_id"][out["cell_id"].duplicated()].unique().tolist()
    if dup:
        raise CDRInputError(
            f"{label}: {len(dup)} cell id(s) have more than one location: {format_items(dup)}. "
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
        msg = f"{len(cells)} of {len(out)} tower(s) lie outside every unit: cells {format_items(cells)}"
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
class _MalformedRows:
    """Counts CSV rows with the wrong number of fields (pyarrow's ``invalid_row_handler``).

    The row's text (which holds a subscriber id) is never kept; the rows are
    skipped and located afterwards by :meth:`locate`, which rescans the file.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0

    def __call__(self, row: Any) -> str:
        self.count += 1
        return "skip"

    def locate(self) -> list[int]:
        """Data-row numbers (1 = the first row after the header) of every malformed row."""
        import csv

        rows: list[int] = []
        with open(self.path, newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.reader(fh)
            header = next(reader, [])
            k = 0
            try:
                for record in reader:
                    if not record:  # blank lines are skipped by the reader, and here
                        continue
                    k += 1
                    if len(record) != len(header):
                        rows.append(k)
            except csv.Error:
                rows.append(k + 1)
        return rows


def _renumber(rows: list[int], malformed: list[int]) -> list[int]:
    """Row numbers counted over the rows read -> data-row numbers of the file (skipped rows back).

    The data row of read row ``r`` is the ``a`` with ``a - (malformed rows <= a) = r``.
    """
    skipped = np.sort(np.asarray(malformed, dtype=np.int64))
    out = []
    for r in rows:
        a = r
        while (nxt := r + int(np.searchsorted(skipped, a, side="right"))) != a:
            a = nxt
        out.append(a)
    return out


def _scrubbed(
    batches: Iterator[pa.RecordBatch], label: str, malformed: _MalformedRows | None = None
) -> Iterator[pa.RecordBatch]:
    """Re-raise Arrow read errors without their text (it may quote raw rows, ids included)."""
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            where = ""
            if malformed is not None:
                rows = malformed.locate()
                if rows:
                    where = f" at data row(s) {format_items(rows)} (1 = the first row after the header)"
            raise CDRInputError(
                f"{label}: the events file is malformed{where} ({type(err).__name__} while "
                "reading; the reader's message is withheld because it may quote raw rows). Fix: "
                "check the file's format, delimiter, quoting and column count there."
            ) from None
        yield batch


def _iter_batches(
    source: EventSource, columns: list[str], batch_size: int
) -> tuple[Iterator[pa.RecordBatch], int | None, str, _MalformedRows | None]:
    """Stream record batches of ``columns``.

    Returns (iterator, total rows or None, label, the CSV malformed-row counter or None).
    """
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
        return iter(table.to_batches(batch_size)), table.num_rows, "events table", None
    if isinstance(source, pa.RecordBatch):
        source = pa.Table.from_batches([source])
    if isinstance(source, pa.Table):
        table = source.select(columns).combine_chunks()
        return iter(table.to_batches(batch_size)), table.num_rows, "events table", None
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
                    None,
                )
            if suffix in (".arrow", ".feather", ".ipc"):
                import pyarrow.feather as feather

                table = feather.read_table(path, columns=columns, memory_map=True)
                return iter(table.to_batches(batch_size)), table.num_rows, str(path), None
            import pyarrow.csv as pacsv

            malformed = _MalformedRows(path)
            reader = pacsv.open_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=_CSV_BLOCK_SIZE),
                parse_options=pacsv.ParseOptions(invalid_row_handler=malformed),
                convert_options=pacsv.ConvertOptions(
                    include_columns=columns, column_types=dict.fromkeys(columns, pa.string())
                ),
            )
            return iter(reader), None, str(path), malformed
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
            None,
        )
    raise CDRInputError(
        f"events: unsupported source {type(source).__name__}. Fix: give a Parquet/CSV path or a table."
    )


def _timestamps_seconds(
    arr: pa.Array,
    *,
    timestamp_format: str | None,
    timestamp_unit: str,
    timezone: str | None,
    column: str = "timestamp",
    label: str = "events",
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
            f"{label}: column {column!r} has type {typ}, not a timestamp, number or text. "
            "Fix: pass timestamp=<the column of event times>."
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

    ``report`` (event and subscriber counts), ``period_stats`` and
    ``candidates`` are exact and stay in memory like the homes; the
    public, redaction-safe versions are made by :func:`relocation_od`
    (``CDRFlows.diagnostics``). ``settings`` holds the night window and
    ``min_active_days`` used and how they were chosen; ``hour_profile`` the
    event-hour profile they were chosen from (shares only).
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
    settings: dict[str, Any] = field(default_factory=dict)
    hour_profile: pd.DataFrame = field(default_factory=pd.DataFrame)
    period_stats: pd.DataFrame = field(default_factory=pd.DataFrame)
    candidates: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __repr__(self) -> str:
        # no counts: a count of subscribers printed here could undo redaction
        return (
            f"HomeLocations(periods {self.periods}, {int(self.covered.sum())} units with towers, "
            f"night {self.settings.get('night')}, min_active_days "
            f"{self.settings.get('min_active_days')})"
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


# ------------------------------------------------------- night window and key buckets
#: Night window used when the data cannot choose one (and the old default).
FALLBACK_NIGHT: tuple[int, int] = (19, 7)
#: Nights at the home unit used when the data cannot choose (fewer than 3 consecutive periods).
FALLBACK_MIN_ACTIVE_DAYS = 3
#: Largest estimated share of spurious moves among detected moves for ``min_active_days="auto"``.
MAX_SPURIOUS_SHARE = 0.05
#: Candidate night windows ``[start, end)`` chosen from: start 17:00-23:00, end 04:00-10:00.
_NIGHT_STARTS = tuple(range(17, 24))
_NIGHT_ENDS = tuple(range(4, 11))
#: Hours 00-03 lie in every candidate window: one key bucket; each other candidate hour has its own.
_CORE_END = _NIGHT_ENDS[0]
_N_BUCKETS = 1 + (24 - _NIGHT_STARTS[0]) + (_NIGHT_ENDS[-1] - _CORE_END)
_PROFILE_KEYS = 1 << 18  # distinct (subscriber, tower, hour) keys kept for the hour profile
_PROFILE_MIN_EVENTS, _PROFILE_MIN_SUBSCRIBERS = 1_000, 100
_PROFILE_MIN_EVENTS_PER_SUBSCRIBER = 5  # a usual tower needs a few events
_PROFILE_MIN_CONTRAST = 0.05  # share at the usual tower, inside minus outside the window


def _hour_bucket(hour: np.ndarray) -> np.ndarray:
    """Key bucket of each local hour for ``night="auto"`` (-1: in no candidate window)."""
    table = np.full(24, -1, dtype=np.int64)
    table[:_CORE_END] = 0
    for h in range(_NIGHT_STARTS[0], 24):
        table[h] = 1 + h - _NIGHT_STARTS[0]
    for h in range(_CORE_END, _NIGHT_ENDS[-1]):
        table[h] = 1 + (24 - _NIGHT_STARTS[0]) + h - _CORE_END
    return table[hour]


def _window_buckets(a: int, b: int) -> list[int]:
    """Buckets of the hours of the window ``[a, b)`` (a candidate window)."""
    hours = list(range(a, 24)) + list(range(0, b))
    return sorted({int(x) for x in _hour_bucket(np.asarray(hours))})


def _distinct(parts: Sequence[np.ndarray], *, sorted_parts: bool = False) -> np.ndarray:
    """Sorted distinct values of uint64 arrays (a sort and a run scan: faster than np.unique).

    ``sorted_parts``: each part is sorted already; a stable (merging) sort then
    only merges them.
    """
    if not parts:
        return np.empty(0, np.uint64)
    keys = np.sort(np.concatenate(parts), kind="stable" if sorted_parts else None)
    starts, _ = _sorted_runs(keys)
    return keys[starts]


def _reduce(
    raw: list[np.ndarray], reduced: tuple[np.ndarray, np.ndarray] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct sorted keys and their counts, from raw keys plus an earlier reduction."""
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


class _KeyBuckets:
    """Sorted distinct (subscriber, unit, day) keys, kept apart per bucket of local hours."""

    def __init__(self, n_buckets: int) -> None:
        self.n = n_buckets
        self.raw: list[list[np.ndarray]] = [[] for _ in range(n_buckets)]
        self.reduced = [np.empty(0, np.uint64) for _ in range(n_buckets)]
        self.pending = 0
        self.day_events = np.zeros(n_buckets << _DAY_BITS, dtype=np.int64)

    def add(self, key: np.ndarray, bucket: np.ndarray | None, day: np.ndarray) -> None:
        if bucket is None or self.n == 1:
            self.raw[0].append(key)
            self.day_events += np.bincount(day, minlength=len(self.day_events))
        else:
            order = np.argsort(bucket.astype(np.uint8), kind="stable")  # a radix sort
            sizes = np.bincount(bucket, minlength=self.n)
            for b, part in enumerate(np.split(key[order], np.cumsum(sizes)[:-1])):
                if len(part):
                    self.raw[b].append(part)
            self.day_events += np.bincount(
                (bucket << _DAY_BITS) + day, minlength=len(self.day_events)
            )
        self.pending += len(key)
        if self.pending > _MAX_PENDING:  # bound memory: keep distinct keys only
            for b in range(self.n):
                self._reduce(b)
            self.pending = 0

    def _reduce(self, b: int) -> None:
        if self.raw[b]:
            self.reduced[b] = _distinct([self.reduced[b], *self.raw[b]])
            self.raw[b] = []

    def keys(self, buckets: Sequence[int]) -> np.ndarray:
        """Distinct sorted keys of the given buckets."""
        for b in buckets:
            self._reduce(b)
        return _distinct([self.reduced[b] for b in buckets], sorted_parts=True)

    def events_per_day(self, buckets: Sequence[int]) -> np.ndarray:
        return self.day_events.reshape(self.n, -1)[list(buckets)].sum(axis=0)


class _HourSample:
    """Events per (subscriber, tower, local hour) of a deterministic sample of subscribers.

    Subscribers whose per-run code is a multiple of ``2**k`` are kept; ``k``
    grows whenever the sample holds more than ``_PROFILE_KEYS`` distinct keys,
    so the sample is bounded and does not depend on the salt.
    """

    _TOWER_BITS = 31

    def __init__(self) -> None:
        self.k = 0
        self.keys = np.empty(0, np.uint64)
        self.counts = np.empty(0, np.int64)
        self.raw: list[np.ndarray] = []
        self.pending = 0

    def add(self, code: np.ndarray, tower: np.ndarray, hour: np.ndarray) -> None:
        keep = (code & ((1 << self.k) - 1)) == 0
        if not keep.any():
            return
        key = (
            (code[keep].astype(np.uint64) << np.uint64(self._TOWER_BITS + 5))
            | (tower[keep].astype(np.uint64) << np.uint64(5))
            | hour[keep].astype(np.uint64)
        )
        self.raw.append(key)
        self.pending += len(key)
        if self.pending > _PROFILE_KEYS:
            self._reduce()

    def _reduce(self) -> None:
        if self.raw:
            self.keys, self.counts = _reduce(self.raw, (self.keys, self.counts))
            self.raw, self.pending = [], 0
        while len(self.keys) > _PROFILE_KEYS:
            self.k += 1
            code = self.keys >> np.uint64(self._TOWER_BITS + 5)
            keep = (code & np.uint64((1 << self.k) - 1)) == 0
            self.keys, self.counts = self.keys[keep], self.counts[keep]

    def profile(self) -> tuple[pd.DataFrame, int]:
        """Per local hour: events and events at each subscriber's usual (modal) tower.

        Returns the table and the number of subscribers in the sample.
        """
        self._reduce()
        code = (self.keys >> np.uint64(self._TOWER_BITS + 5)).astype(np.int64)
        tower_hour = self.keys & np.uint64((1 << (self._TOWER_BITS + 5)) - 1)
        tower = (tower_hour >> np.uint64(5)).astype(np.int64)
        hour = (tower_hour & np.uint64(31)).astype(np.int64)
        events = np.bincount(hour, weights=self.counts, minlength=24)
        at_usual = np.zeros(24)
        n_subs = 0
        if len(code):
            # events per (subscriber, tower): keys are sorted by code, then tower
            st = tower_hour >> np.uint64(5)
            first = np.empty(len(code), dtype=bool)
            first[0] = True
            first[1:] = (code[1:] != code[:-1]) | (st[1:] != st[:-1])
            starts = np.flatnonzero(first)
            per_tower = np.add.reduceat(self.counts, starts)
            s_code, s_tower = code[starts], tower[starts]
            # the usual tower: most events, ties to the lowest tower index
            order = np.lexsort((s_tower, -per_tower, s_code))
            s_first = np.empty(len(order), dtype=bool)
            s_first[0] = True
            s_first[1:] = s_code[order][1:] != s_code[order][:-1]
            usual = pd.Series(s_tower[order][s_first], index=s_code[order][s_first])
            # only subscribers with enough events to have a usual tower
            per_sub = pd.Series(self.counts).groupby(code).sum()
            usual = usual[per_sub.reindex(usual.index) >= _PROFILE_MIN_EVENTS_PER_SUBSCRIBER]
            n_subs = len(usual)
            kept = np.isin(code, usual.index.to_numpy())
            events = np.bincount(hour[kept], weights=self.counts[kept], minlength=24)
            at = kept & (tower == usual.reindex(code).to_numpy())
            at_usual = np.bincount(hour[at], weights=self.counts[at], minlength=24)
        table = pd.DataFrame(
            {"hour": np.arange(24), "events": events[:24], "at_usual_tower": at_usual[:24]}
        )
        return table, n_subs


def _choose_night(profile: pd.DataFrame, n_subs: int) -> tuple[tuple[int, int], str]:
    """Choose the night window from the event-hour profile, or fall back; return (window, why).

    Rule: among windows ``[a, b)`` with ``a`` in 17..23 and ``b`` in 4..10, the
    one whose hours hold the most events at subscribers' usual towers *beyond*
    the overall share, sum over its hours of ``at_usual - overall x events``
    (ties: the shortest). It is used when the sample has enough events and
    subscribers and the usual-tower share inside it exceeds the share outside
    by at least 5 points; otherwise ``FALLBACK_NIGHT``.
    """
    n_events = float(profile["events"].sum())
    if n_events < _PROFILE_MIN_EVENTS or n_subs < _PROFILE_MIN_SUBSCRIBERS:
        return FALLBACK_NIGHT, "default (too few events to read the hour profile)"
    overall = float(profile["at_usual_tower"].sum()) / n_events
    excess = profile["at_usual_tower"].to_numpy() - overall * profile["events"].to_numpy()
    best, best_key = None, None
    for a in _NIGHT_STARTS:
        for b in _NIGHT_ENDS:
            hours = list(range(a, 24)) + list(range(0, b))
            gain = float(excess[hours].sum())
            key = (round(gain, 6), -len(hours))
            if best_key is None or key > best_key:
                best, best_key = (a, b), key
    assert best is not None
    a, b = best
    inside = np.zeros(24, dtype=bool)
    inside[list(range(a, 24)) + list(range(0, b))] = True
    ev, at = profile["events"].to_numpy(), profile["at_usual_tower"].to_numpy()
    if ev[inside].sum() == 0 or ev[~inside].sum() == 0:
        return FALLBACK_NIGHT, "default (events at too few hours to read the hour profile)"
    contrast = at[inside].sum() / ev[inside].sum() - at[~inside].sum() / ev[~inside].sum()
    if contrast < _PROFILE_MIN_CONTRAST:
        return FALLBACK_NIGHT, (
            "default (subscribers are not more often at their usual tower at night: "
            f"{contrast:+.2f} share points)"
        )
    return (a, b), (
        f"data (hours when subscribers are most often at their usual tower: "
        f"{at[inside].sum() / ev[inside].sum():.0%} of events inside vs "
        f"{at[~inside].sum() / ev[~inside].sum():.0%} outside)"
    )


# ------------------------------------------------------------------- home candidates
@dataclass
class _Candidates:
    """Per (subscriber, period) with night-time activity, sorted by subscriber then period."""

    sub: np.ndarray
    pidx: np.ndarray
    unit: np.ndarray  # the unit with the most active days (any, when tied)
    n_home: np.ndarray  # active days at that unit
    strict: np.ndarray  # more active days there than at any other unit
    n_active: np.ndarray  # active days in the period
    labels: list[str]
    ords: np.ndarray

    def level(self) -> np.ndarray:
        """Return the largest ``min_active_days`` that still gives a home (0: none, a tie)."""
        return np.where(self.strict, self.n_home, 0)


def _home_candidates(key: np.ndarray, period: Period) -> _Candidates:
    """Modal unit, its active days, the runner-up and active days per (subscriber, period).

    ``key`` are sorted distinct (subscriber, unit, day) keys; keys are sorted by
    subscriber, unit, day, and the period is monotone in the day, so
    (subscriber, unit, period) groups are runs.
    """
    e = np.empty(0, np.int64)
    if len(key) == 0:
        return _Candidates(e, e, e, e, np.empty(0, bool), e, [], e)
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
    # (subscriber, unit, period) runs: active days per candidate home
    su = key >> np.uint64(_DAY_BITS)
    boundary = np.empty(len(key), dtype=bool)
    boundary[0] = True
    boundary[1:] = (su[1:] != su[:-1]) | (pidx[1:] != pidx[:-1])
    starts = np.flatnonzero(boundary)
    ndays = np.diff(np.append(starts, len(key)))
    r_sub, r_unit, r_p = sub[starts], unit[starts], pidx[starts]
    g_run = r_sub * n_p + r_p
    # the two units with the most active days in each group
    order = np.lexsort((r_unit, -ndays, g_run))
    g_sorted = g_run[order]
    gst, gsize = _sorted_runs(g_sorted)
    best = order[gst]
    has_second = gsize > 1
    second_days = np.zeros(len(gst), dtype=np.int64)
    second_days[has_second] = ndays[order[gst[has_second] + 1]]
    # active days per (subscriber, period): distinct (subscriber, day)
    sd = np.sort((sub << _DAY_BITS) | day)
    st, _ = _sorted_runs(sd)
    sd = sd[st]
    g_sd = (sd >> _DAY_BITS) * n_p + pidx_span[(sd & day_mask) - dmin]
    _, active = _sorted_runs(g_sd)  # the same groups, in the same (sorted) order
    g = g_sorted[gst]
    return _Candidates(
        sub=g // n_p,
        pidx=g % n_p,
        unit=r_unit[best],
        n_home=ndays[best].astype(np.int64),
        strict=ndays[best] > second_days,
        n_active=active.astype(np.int64),
        labels=labels,
        ords=uords,
    )


def _spurious_table(c: _Candidates, max_m: int) -> pd.DataFrame:
    """For each ``min_active_days`` m: homes, consecutive pairs, moves, triples, A->B->A bounces.

    ``spurious_share`` estimates the share of detected moves that are
    misclassified homes: a home wrong in one period produces an out-and-back
    move A->B->A, which real relocations rarely do, so ``(bounces + 1) /
    triples`` estimates the per-period error rate e (the +1 keeps a small log
    without bounces from looking perfect), each consecutive pair holds about
    ``2 e`` spurious moves, and the estimate is ``2 e x pairs / moves``.
    """
    level = c.level()
    same = (c.sub[1:] == c.sub[:-1]) & (c.ords[c.pidx[1:]] - c.ords[c.pidx[:-1]] == 1)
    lv2 = np.minimum(level[1:], level[:-1])[same]
    moved = (c.unit[1:] != c.unit[:-1])[same]
    same3 = same[1:] & same[:-1]
    lv3 = np.minimum(np.minimum(level[2:], level[1:-1]), level[:-2])[same3]
    bounce = ((c.unit[1:-1] != c.unit[:-2]) & (c.unit[2:] == c.unit[:-2]))[same3]

    def at_least(levels: np.ndarray) -> np.ndarray:
        n = np.bincount(np.minimum(levels, max_m), minlength=max_m + 1)
        return np.cumsum(n[::-1])[::-1][1:]  # count with level >= m, m = 1..max_m

    table = pd.DataFrame(
        {
            "min_active_days": np.arange(1, max_m + 1),
            "homes": at_least(level),
            "pairs": at_least(lv2),
            "moves": at_least(lv2[moved]),
            "triples": at_least(lv3),
            "bounces": at_least(lv3[bounce]),
        }
    )
    err = (table["bounces"] + 1) / table["triples"].where(table["triples"] > 0)
    share = 2 * err * table["pairs"] / table["moves"].where(table["moves"] > 0)
    table["spurious_share"] = share  # NaN without moves or without triples: not measurable
    # spurious moves per subscriber with a home in two consecutive periods (about 2 e): the
    # background the CDR observation model adds to every cell (CDRObservation)
    table["spurious_rate"] = 2 * err.where(table["moves"] > 0)
    return table


def _choose_min_days(table: pd.DataFrame, max_share: float) -> tuple[int, str]:
    """Pick the smallest ``min_active_days`` whose estimated spurious share <= ``max_share``."""
    est = table["spurious_share"]
    if est.isna().all():
        why = (
            "no moves were detected"
            if table["triples"].iloc[0] > 0
            else "it needs homes in 3 consecutive periods; the log has fewer"
        )
        return (
            FALLBACK_MIN_ACTIVE_DAYS,
            f"default (the spurious-move rate is not measurable: {why})",
        )
    ok = table.loc[est <= max_share, "min_active_days"]
    if len(ok):
        m = int(ok.iloc[0])
        return m, (
            f"data (the smallest value whose estimated share of spurious moves, "
            f"{float(est.loc[table['min_active_days'] == m].iloc[0]):.1%}, is at most "
            f"{max_share:.0%})"
        )
    m = int(table.loc[est.idxmin(), "min_active_days"])
    return m, (
        f"data (no value keeps the estimated share of spurious moves at or below "
        f"{max_share:.0%}; {m} has the lowest, {float(est.min()):.1%})"
    )


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
    night: tuple[int, int] | Literal["auto"] | None = "auto",
    min_active_days: int | Literal["auto"] = "auto",
    max_spurious_share: float = MAX_SPURIOUS_SHARE,
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
    """Home unit per subscriber and period: the clear modal night-time unit.

    Rules, in order:

    1. Events outside ``[start, end)`` are ignored; only events at night count:
       local hour in ``[a, 24) ∪ [0, b)`` for ``night=(a, b)`` (wrapping
       midnight; ``[a, b)`` when ``a < b``). A *day* runs from hour ``b`` to
       hour ``b`` the next day, so one night is one day and belongs to one
       period; the night before the log's first calendar day (whose morning
       hours open a log that starts at midnight) is not used.
    2. A subscriber is *active* on a day with at least one counted event.
    3. The home in a period is the unit with the most active days, when it has
       strictly more than any other unit (a tie gives no home: the evidence
       points two ways) and at least ``min_active_days`` of them.

    ``night="auto"`` and ``min_active_days="auto"`` (defaults) choose both
    from the data, by the rules documented in ``docs/census_cdr.md``:

    * the night window: among windows starting 17:00-23:00 and ending
      04:00-10:00, the hours in which subscribers are most often at their
      usual (modal) tower, from the event-hour profile of a sample of
      subscribers (the window summing the most such events beyond the overall
      share; ties to the shortest). Too few events, or no night-time contrast
      of at least 5 share points: ``FALLBACK_NIGHT`` (19, 7).
    * ``min_active_days``: the smallest value (1, 2, ...) whose estimated share
      of spurious moves among detected moves is at most ``max_spurious_share``
      (5 %). A home that is wrong in one period shows up as a move out and
      back, A -> B -> A, in three consecutive periods, which real relocations
      rarely produce; their rate estimates the error rate of homes (see
      :func:`relocation_od`'s ``diagnostics``). With fewer than 3 consecutive
      periods the rate cannot be measured: ``FALLBACK_MIN_ACTIVE_DAYS`` (3).

    The values used and why are logged (INFO) and kept in ``settings``. An
    explicit ``min_active_days`` whose estimated spurious share exceeds
    ``max_spurious_share`` warns; so does a result where most active
    subscriber-periods get no home.

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
        ``"auto"`` (default, see above), night hours ``(start, end)`` in local
        time, or None to use every event (days then run from midnight).
    min_active_days
        ``"auto"`` (default, see above) or the minimum number of active days
        at the home unit in a period.
    max_spurious_share
        Largest estimated share of spurious moves for ``min_active_days="auto"``.
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
        timestamp before 1980 or after 2159, a cell absent from the towers
        table, or (CSV) a row with the wrong number of fields: ``"error"``
        (default) raises :class:`CDRInputError` naming the file, the column,
        the counts and the data-row numbers (never ids); ``"drop"`` drops them
        and warns with the same.
    salt
        Secret key of the id hash (default: random per call).
    batch_size
        Rows per batch (memory ~ 100 bytes per row of a batch).
    progress
        Show a tqdm bar over batches (None: only on a terminal; False: never).

    Returns
    -------
    HomeLocations
        In-memory homes; ``report`` holds exact event and subscriber counts,
        ``settings`` the night window and ``min_active_days`` used.
    """
    from tqdm.auto import tqdm

    auto_night = isinstance(night, str)
    if auto_night and night != "auto":
        raise ValueError(f"night must be 'auto', None or two hours (start, end); got {night!r}")
    auto_days = isinstance(min_active_days, str)
    if auto_days and min_active_days != "auto":
        raise ValueError(
            f"min_active_days must be 'auto' or an integer >= 1; got {min_active_days!r}"
        )
    if not auto_days and int(min_active_days) < 1:
        raise ValueError("min_active_days must be >= 1")
    if not 0 < max_spurious_share < 1:
        raise ValueError(f"max_spurious_share must be in (0, 1), got {max_spurious_share!r}")
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
        raise CDRInputError(
            f"tower_units name unit(s) not in unit_ids: {format_items(unknown_units)}."
        )
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
    if auto_night:
        a = b = -1
        shift = 12 * 3600  # days from noon to noon hold every candidate night whole
    elif night is not None:
        a, b = int(night[0]), int(night[1])  # type: ignore[index]
        if not (0 <= a <= 23 and 0 <= b <= 24 and a != b):
            raise ValueError(f"night must be two different hours in 0..24, got {night!r}")
        shift = b * 3600 if a > b else 0
    else:
        a = b = -1
        shift = 0
    t_start = None if start is None else int(np.datetime64(start, "s").astype(np.int64))
    t_end = None if end is None else int(np.datetime64(end, "s").astype(np.int64))

    hasher = SubscriberHasher(salt)
    codes = _Codes()
    cols = [subscriber_id, timestamp, cell_id]
    batches, total_rows, label, malformed = _iter_batches(events, cols, batch_size)
    report = dict.fromkeys(
        [
            "events",
            "missing_subscriber",
            "missing_cell",
            "bad_timestamp",
            "out_of_range_timestamp",
            "unknown_cell",
            "malformed_row",
            "tower_outside_units",
            "outside_window",
            "daytime",
            "duplicates",
            "used",
        ],
        0,
    )
    bad_rows: dict[str, list[int]] = {}
    store = _KeyBuckets(_N_BUCKETS if auto_night else 1)
    sample = _HourSample()
    t_first = np.iinfo(np.int64).max
    row0 = 0
    n_batches = None if total_rows is None else max(1, -(-total_rows // batch_size))
    bar = tqdm(
        _scrubbed(batches, label, malformed),
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
                if len(rows) < MAX_SHOWN:
                    rows.extend((np.flatnonzero(mask)[:MAX_SHOWN] + _row0 + 1).tolist())
                _ok &= ~mask

        _flag(sid.is_null().to_numpy(zero_copy_only=False), "missing_subscriber")
        _flag(cel.is_null().to_numpy(zero_copy_only=False), "missing_cell")
        secs = _timestamps_seconds(
            ts,
            timestamp_format=timestamp_format,
            timestamp_unit=timestamp_unit,
            timezone=timezone,
            column=timestamp,
            label=label,
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
        if not ok.any():
            row0 += n
            continue
        t_first = min(t_first, int(secs[ok].min()))
        hour = np.floor_divide(np.mod(secs, 86400), 3600)
        uniq_hash, sub_idx = hasher.hash_dictionary(sid)
        del sid
        code_all = codes.encode_unique(uniq_hash)[sub_idx]
        if codes.n >= 1 << _SUB_BITS:
            raise CDRInputError(
                f"more than {(1 << _SUB_BITS) - 1} subscribers in one run; split by region."
            )
        sample.add(code_all[ok], tpos[ok], hour[ok])  # every hour: the event-hour profile
        bucket = None
        if auto_night:
            bucket = _hour_bucket(hour)
            is_night = bucket >= 0
        elif night is not None:
            is_night = (hour >= a) | (hour < b) if a > b else (hour >= a) & (hour < b)
        else:
            is_night = np.ones(n, dtype=bool)
        report["daytime"] += int((ok & ~is_night).sum())
        ok &= is_night
        if not ok.any():
            row0 += n
            continue
        keep = np.flatnonzero(ok)
        sub = code_all[keep]
        secs_k = secs[keep]
        unit_k = unit[keep]
        bucket_k = None if bucket is None else bucket[keep]
        # exact duplicates (same subscriber, time and cell) within a batch
        ev_key = _mix64(
            sub.astype(np.uint64)
            ^ _mix64(secs_k.astype(np.uint64) ^ _mix64(tpos[keep].astype(np.uint64)))
        )
        dup = pd.Series(ev_key, copy=False).duplicated().to_numpy()
        if dup.any():
            report["duplicates"] += int(dup.sum())
            sub, unit_k, secs_k = sub[~dup], unit_k[~dup], secs_k[~dup]
            bucket_k = None if bucket_k is None else bucket_k[~dup]
        day_k = np.floor_divide(secs_k - shift, 86400) - _DAY0
        key = (
            (sub.astype(np.uint64) << np.uint64(_UNIT_BITS + _DAY_BITS))
            | (unit_k.astype(np.uint64) << np.uint64(_DAY_BITS))
            | day_k.astype(np.uint64)
        )
        store.add(key, bucket_k, day_k)
        row0 += n
    bar.close()

    if malformed is not None and malformed.count:
        report["malformed_row"] = malformed.count
        located = malformed.locate()
        bad_rows = {k: _renumber(v, located) for k, v in bad_rows.items()}
        bad_rows["malformed_row"] = located[:MAX_SHOWN]
        report["events"] += malformed.count
    _report_bad_events(report, bad_rows, label, on_bad_events, columns=cols)
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

    # --- the night window
    profile, n_sample = sample.profile()
    del sample
    if auto_night:
        (a, b), night_why = _choose_night(profile, n_sample)
        buckets = _window_buckets(a, b)
        night_used: tuple[int, int] | None = (a, b)
    else:
        buckets = [0]
        night_used = None if night is None else (a, b)
        night_why = "given"
    key = store.keys(buckets)
    per_day = store.events_per_day(buckets)
    used = int(per_day.sum())
    if auto_night:  # events in candidate hours outside the chosen window are daytime too
        report["daytime"] += int(store.day_events.sum()) - used
    report["used"] = used
    del store
    # the night before the log's first calendar day holds only the log's first morning
    first_night_dropped = False
    if shift > 0 and len(key) and t_first < np.iinfo(np.int64).max:
        first = np.uint64(t_first // 86400 - _DAY0)
        early = (key & np.uint64((1 << _DAY_BITS) - 1)) < first
        if early.any():
            key = key[~early]
            first_night_dropped = True

    # --- homes and min_active_days
    cand = _home_candidates(key, period)
    del key
    level = cand.level()
    max_m = int(min(max(int(level.max()) if len(level) else 1, 1), 62))
    table = _spurious_table(cand, max_m)
    if auto_days:
        m, days_why = _choose_min_days(table, max_spurious_share)
    else:
        m, days_why = int(min_active_days), "given"
    home = level >= m
    est_row = table.loc[table["min_active_days"] == m, "spurious_share"]
    est = float(est_row.iloc[0]) if len(est_row) else float("nan")
    rate_row = table.loc[table["min_active_days"] == m, "spurious_rate"]
    rate = float(rate_row.iloc[0]) if len(rate_row) else float("nan")
    n_p = len(cand.labels)
    period_stats = pd.DataFrame(
        {
            "period": cand.labels,
            "active_subscribers": np.bincount(cand.pidx, minlength=n_p),
            "subscribers_with_home": np.bincount(cand.pidx[home], minlength=n_p),
            "median_active_nights": pd.Series(cand.n_active)
            .groupby(cand.pidx)
            .median()
            .reindex(range(n_p))
            .to_numpy(dtype=float),
            "events": _events_per_period(per_day, cand, period),
        }
    )
    settings: dict[str, Any] = {
        "night": night_used,
        "night_chosen_by": night_why,
        "min_active_days": m,
        "min_active_days_chosen_by": days_why,
        "max_spurious_share": float(max_spurious_share),
        "spurious_share_estimate": None if np.isnan(est) else round(est, 3),
        "spurious_rate_estimate": None if np.isnan(rate) else float(f"{rate:.3g}"),
        "first_night_dropped": first_night_dropped,
        "period": period,
    }
    report["subscribers"] = int(codes.n)
    report["subscriber_periods_with_home"] = int(home.sum())
    report["active_subscriber_periods"] = len(cand.sub)
    night_text = (
        "every hour" if night_used is None else f"{night_used[0]:02d}:00-{night_used[1]:02d}:00"
    )
    log.info(
        "CDR home detection: %d events read, %d used; night %s (%s); min_active_days=%d (%s)",
        report["events"],
        report["used"],
        night_text,
        night_why,
        m,
        days_why,
    )
    if not home.any():
        warnings.warn(
            f"{label}: no subscriber has a home in any period ({report['used']} events used of "
            f"{report['events']}). Fix: check night= (local hours), timezone=, min_active_days= and "
            "start=/end=.",
            UserWarning,
            stacklevel=2,
        )
    elif home.mean() < 0.5:
        warnings.warn(
            f"{label}: most subscribers active at night get no home (fewer than half of the "
            f"subscriber-periods; min_active_days={m}): the log is sparse for period={period!r}. "
            "Fix: a longer period= (e.g. 'quarter') gives each subscriber more nights; the "
            "relocation counts then cover fewer subscribers than the operator has "
            "(CDRFlows.diagnostics shows the shares).",
            UserWarning,
            stacklevel=2,
        )
    if not np.isnan(est) and est > max_spurious_share:
        fix = (
            "Fix: a longer period= gives each subscriber more nights (the log has few "
            "movers to tell real moves from misplaced homes)"
            if auto_days
            else "Fix: min_active_days='auto' chooses the smallest value below that level"
        )
        warnings.warn(
            f"min_active_days={m}: an estimated {est:.0%} of detected moves are spurious (homes "
            f"misplaced in one period, seen as moves out and back), above {max_spurious_share:.0%}. "
            f"{fix}.",
            UserWarning,
            stacklevel=2,
        )
    h = np.flatnonzero(home)
    return HomeLocations(
        subscriber=cand.sub[h],
        period=cand.pidx[h],
        unit=cand.unit[h],
        periods=cand.labels,
        period_ordinals=cand.ords,
        unit_ids=unit_ids,
        unit_country=np.asarray(
            unit_country if unit_country is not None else [""] * n_units, dtype=object
        ),
        covered=covered,
        report=report,
        settings=settings,
        hour_profile=_public_profile(profile, n_sample, night_used),
        period_stats=period_stats,
        candidates=table,
    )


def _events_per_period(per_day: np.ndarray, cand: _Candidates, period: Period) -> np.ndarray:
    """Events used per period (``per_day`` indexed by day since 1980)."""
    out = np.zeros(len(cand.labels), dtype=np.int64)
    days = np.flatnonzero(per_day)
    if len(days) and len(cand.ords):
        ords, _ = _period_ordinals(days + _DAY0, period)
        pos = np.searchsorted(cand.ords, ords)
        inside = (pos < len(cand.ords)) & (cand.ords[np.minimum(pos, len(cand.ords) - 1)] == ords)
        np.add.at(out, pos[inside], per_day[days[inside]])
    return out


def _public_profile(
    profile: pd.DataFrame, n_subs: int, night: tuple[int, int] | None
) -> pd.DataFrame:
    """Return the event-hour profile as shares (empty for a sample of 15 subscribers or fewer)."""
    if n_subs <= DEFAULT_THRESHOLD or profile["events"].sum() == 0:
        return pd.DataFrame(
            {"hour": [], "share_of_events": [], "share_at_usual_tower": [], "night": []}
        )
    ev = profile["events"].to_numpy(dtype=float)
    hours = np.arange(24)
    if night is None:
        inside = np.ones(24, dtype=bool)
    else:
        a, b = night
        inside = ((hours >= a) | (hours < b)) if a > b else ((hours >= a) & (hours < b))
    return pd.DataFrame(
        {
            "hour": hours,
            "share_of_events": np.round(ev / ev.sum(), 3),
            "share_at_usual_tower": np.round(
                np.divide(profile["at_usual_tower"], ev, out=np.full(24, np.nan), where=ev > 0), 2
            ),
            "night": inside,
        }
    )


def _report_bad_events(
    report: dict[str, int],
    bad_rows: dict[str, list[int]],
    label: str,
    on_bad_events: str,
    *,
    columns: list[str],
) -> None:
    """Raise (or warn, for ``on_bad_events='drop'``) on bad events: file, column, rows and fix."""
    subscriber_id, timestamp, cell_id = columns
    what = {
        "missing_subscriber": f"missing subscriber id (column {subscriber_id!r})",
        "missing_cell": f"missing cell (column {cell_id!r})",
        "bad_timestamp": f"unparsable timestamp (column {timestamp!r})",
        "out_of_range_timestamp": f"timestamp before 1980 or after 2159 (column {timestamp!r})",
        "unknown_cell": f"unknown cell, not in the towers table (column {cell_id!r})",
        "malformed_row": "malformed row, wrong number of fields",
    }
    bad = {k: report[k] for k in what if report[k]}
    if not bad:
        return
    detail = "; ".join(
        f"{what[k]}: {v} (data rows {format_items(bad_rows.get(k, []))})" for k, v in bad.items()
    )
    if on_bad_events == "error":
        raise CDRInputError(
            f"{label}: {sum(bad.values())} bad event(s) of {report['events']} — {detail} (data "
            "rows count from 1, a file's header not included). Fix: correct those rows (timestamps 1980-2159 "
            "in a parseable format, every cell in the towers table, one field per column), pass "
            "timestamp_format=, or on_bad_events='drop' to drop them."
        )
    warnings.warn(
        f"{label}: dropped {sum(bad.values())} bad event(s) — {detail}.",
        UserWarning,
        stacklevel=3,
    )


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


# ------------------------------------------------------------ the rule for totals and logs
def _keeps_ranges(
    lo: float,
    hi: float,
    known: float,
    lows: np.ndarray,
    highs: np.ndarray,
    relation: Literal["sum", "upper", "lower"] = "sum",
    capacity: np.ndarray | None = None,
) -> bool:
    """Whether learning ``lo <= x <= hi`` leaves every redacted item its whole range.

    ``x`` relates to released numbers summing to ``known`` and to hidden
    items ``i`` whose public range is ``[lows[i], highs[i]]``: ``"sum"``
    ``x = known + sum(items)``, ``"upper"`` ``x >= known + sum(items)``,
    ``"lower"`` ``x <= known + sum(items)``. Items with a finite upper bound
    are *redacted* and must keep their whole range (each can still take its
    lowest and its highest value); items with ``highs = inf`` (counts withheld
    for another reason) only absorb. ``capacity`` (default ``highs``) is what
    each item can be given *together*, when other released numbers cap sums
    of items (a line total of 15 or fewer caps its cells at 15 in all): a
    feasible allocation, so that an item can sit at its lowest value while the
    others carry the rest. This is the one test behind complementary
    suppression of totals and of subscriber counts and behind every number of
    ``CDRFlows.diagnostics``, logs and warnings; ``docs/privacy.md`` states it.
    """
    lows = np.asarray(lows, dtype=float)
    highs = np.asarray(highs, dtype=float)
    redacted = np.isfinite(highs)
    if not redacted.any():
        return True
    cap = highs if capacity is None else np.minimum(np.asarray(capacity, dtype=float), highs)
    width = float((highs[redacted] - lows[redacted]).max())
    r_lo, r_hi = lo - known, hi - known
    can_reach_top = r_hi >= lows.sum() + width
    can_reach_bottom = r_lo <= lows.sum() + float(
        (cap - lows).sum() - (cap - lows)[redacted].max()
    )
    if relation == "sum":
        return bool(can_reach_top and can_reach_bottom)
    if relation == "upper":
        return bool(can_reach_top)
    if relation == "lower":
        return bool(can_reach_bottom)
    raise ValueError(f"relation must be 'sum', 'upper' or 'lower', got {relation!r}")


def _public_base(x: float, threshold: int) -> float:
    """Return the rounding base of a published count: 2 significant figures, >= 2(threshold+1)."""
    floor = 2 * (threshold + 1)
    nice = next(m * 10**e for e in range(0, 12) for m in (1, 2, 5) if m * 10**e >= floor)
    magnitude = 10 ** max(int(np.floor(np.log10(x))) - 1, 0) if x >= 1 else 1
    return float(max(nice, magnitude))


@dataclass(frozen=True)
class PublicCount:
    """A count of subscribers, subscriber-periods or relocations as it may be published.

    ``value`` is the count rounded to a multiple of ``base`` (NaN when
    withheld); ``text`` is what logs and warnings print.
    """

    value: float
    base: float

    @property
    def withheld(self) -> bool:
        """Whether the count is withheld."""
        return bool(np.isnan(self.value))

    @property
    def text(self) -> str:
        """Render the count for a log or warning."""
        if self.withheld:
            return "a number withheld to protect redacted cells"
        if self.value == 0:
            return f"fewer than {self.base / 2:,.0f}"
        return f"about {self.value:,.0f}"


#: A relation of a count to released tables: (relation, released sum, item lows, item highs[,
#: item capacity]); see :func:`_keeps_ranges`.
_Check = tuple[Any, ...]


def public_count(x: float, checks: Sequence[_Check] = (), *, threshold: int) -> PublicCount:
    """Publish a subscriber-derived count by the rule for totals and logs.

    The count is rounded to 2 significant figures and to no less than a
    multiple of ``2 x (threshold + 1)`` rounded up to 1, 2 or 5 x 10^k (50 for
    the default threshold 15), so that on its own it says nothing finer than
    that base; it is withheld when the interval it implies, combined with
    the released cells and totals it sums or bounds (``checks``), would
    narrow any redacted cell below its range 0..threshold (:func:`_keeps_ranges`).
    """
    base = _public_base(float(x), threshold)
    value = float(np.round(float(x) / base) * base)
    lo, hi = value - base / 2, value + base / 2
    for relation, known, lows, highs, *capacity in checks:
        cap = capacity[0] if capacity else None
        if not _keeps_ranges(lo, hi, known, lows, highs, relation, cap):
            return PublicCount(float("nan"), base)
    return PublicCount(value, base)


def _cells(values: np.ndarray, bounds: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(released sum, lows, highs) of a set of cells: released counts and redacted bounds."""
    values = np.asarray(values, dtype=float)
    hidden = np.isnan(values)
    highs = np.asarray(bounds, dtype=float)[hidden]
    return (
        float(np.nansum(values)),
        np.zeros(int(hidden.sum())),
        np.where(np.isnan(highs), np.inf, highs),
    )


def _line_caps(
    f: pd.DataFrame,
    side: str,
    totals: pd.DataFrame | None,
    col: str,
    subs: pd.DataFrame | None,
    subs_period: str | None,
    threshold: int,
) -> pd.Series:
    """Public upper bound of the redacted cells' sum of each line (unit) of one period.

    From the line's total when it is redacted or suppressed (its ``_max``
    minus the released cells) and from the subscribers of the unit (every
    mover out of / into a unit had a home there): a released count minus the
    released cells, or the threshold for a redacted count. Infinite otherwise.
    """
    released = f.groupby(side)["count"].sum()
    caps = pd.Series(np.inf, index=pd.Index(f[side].unique()))
    if totals is not None and len(totals) and f"{col}_max" in totals.columns:
        t = totals.loc[totals[col].isna() & totals[f"{col}_max"].notna()]
        bound = pd.Series(t[f"{col}_max"].to_numpy(), index=t["unit_id"].to_numpy())
        caps = np.minimum(caps, (bound - released).reindex(caps.index).fillna(np.inf))
    if subs is not None and subs_period is not None and len(subs):
        sp = subs.loc[subs["period"] == subs_period]
        value = sp["cdr_subscribers"].to_numpy(dtype=float)
        bound = np.where(np.isnan(value), sp["cdr_subscribers_max"].to_numpy(dtype=float), value)
        bound = np.where(np.isnan(bound), np.inf, bound)
        b = pd.Series(bound, index=sp["unit_id"].to_numpy())
        caps = np.minimum(caps, (b - released).reindex(caps.index).fillna(np.inf))
    return caps.clip(lower=0.0)


def _share_of(f: pd.DataFrame, cells: np.ndarray, side: str, cap: pd.Series) -> np.ndarray:
    """``cap`` of each cell's line split evenly among the line's ``cells`` (inf: no cap)."""
    n = f.loc[cells].groupby(side).size()
    per_cell = (cap / n.reindex(cap.index)).reindex(f[side]).to_numpy(dtype=float)
    return np.where(cells, np.where(np.isnan(per_cell), np.inf, per_cell), np.nan)


def _line_usage(f: pd.DataFrame, cells: np.ndarray, side: str, share: np.ndarray) -> pd.Series:
    """Sum of ``share`` over ``cells`` per line."""
    return pd.Series(np.where(cells, share, 0.0)).groupby(f[side].to_numpy()).sum()


def _protect_totals(
    totals: pd.DataFrame,
    flows: pd.DataFrame,
    threshold: int,
    subs: pd.DataFrame | None = None,
    periods: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Complementary suppression: hide every total that would narrow a redacted cell.

    A total of a row (``outflow``, over the unit's origin cells) or column
    (``inflow``) minus its released cells is the sum ``R`` of its ``k``
    redacted cells. It is released only when each of those cells keeps its
    whole range 0..threshold given ``R``:

    * ``threshold <= R <= (k - 1) x threshold`` (so never for ``k = 1``,
      ``R = 0`` or the saturated ``R = k x threshold``);
    * the other cells can carry ``R`` when any one of them is 0, within the
      caps that redacted totals and subscriber counts put on the crossing
      lines; each cap is split evenly among the redacted cells of the rows
      (columns) that may be released, which is one allocation that satisfies
      every cap at once;
    * for an inflow total, none of its redacted cells lies in a row whose
      outflow total is released, so that each redacted cell is in at most one
      released equation.

    Suppressed totals become NaN with ``<col>_max`` = released cells +
    threshold x redacted cells.
    """
    if totals.empty or flows.empty:
        return totals
    out = totals.copy()
    prev = {} if periods is None else {p: periods[k - 1] for k, p in enumerate(periods) if k}
    t_cap = float(threshold)
    for per, f in flows.groupby("period", sort=False):
        f = f.reset_index(drop=True)
        at = np.flatnonzero(out["period"].to_numpy() == per)
        hidden = f["count"].isna().to_numpy()
        count = f["count"].to_numpy(dtype=float)
        highs_all = f["max"].to_numpy(dtype=float)
        released_rows: set[str] = set()
        for col, side, other, subs_period in (
            ("outflow", "origin", "destination", per),
            ("inflow", "destination", "origin", prev.get(per)),
        ):
            if col not in out.columns:
                continue
            lines = f[side].to_numpy()
            members = pd.Series(np.arange(len(f))).groupby(lines).indices
            rows = {}
            for i in at:  # the band test: R alone leaves every redacted cell its range
                unit, value = out["unit_id"].iat[i], out[col].iat[i]
                if np.isnan(value) or unit not in members:
                    continue
                idx = members[unit]
                h = idx[hidden[idx]]
                known = float(np.nansum(count[idx]))
                ok = _keeps_ranges(value, value, known, np.zeros(len(h)), highs_all[h], "sum")
                if ok and col == "inflow":
                    ok = not set(f[other].to_numpy()[h]) & released_rows
                rows[i] = (unit, value, known, h, ok)
            # the capacity test, with the crossing lines' caps shared by the candidates
            cross = "inflow" if col == "outflow" else "outflow"
            cap = _line_caps(f, other, out.iloc[at], cross, subs, subs_period, threshold)
            candidate = np.isin(lines, [r[0] for r in rows.values() if r[4]]) & hidden
            y = np.fmin(t_cap, _share_of(f, candidate, other, cap))
            for i, (unit, value, known, h, ok) in rows.items():
                if ok:
                    ok = _keeps_ranges(
                        value, value, known, np.zeros(len(h)), highs_all[h], "sum", y[h]
                    )
                if ok:
                    if col == "outflow" and len(h):
                        released_rows.add(unit)
                    continue
                out.iloc[i, out.columns.get_loc(col)] = np.nan
                out.iloc[i, out.columns.get_loc(f"{col}_max")] = known + float(highs_all[h].sum())
    return out


def _protect_subscribers(
    subs: pd.DataFrame, flows: pd.DataFrame, periods: Sequence[str], threshold: int
) -> pd.DataFrame:
    """Withhold subscriber counts that bound a row or column of redacted OD cells too tightly.

    Every relocation out of unit u labelled t is a subscriber with a home in u
    in period t-1, so the released ``cdr_subscribers`` of (u, t-1) is an upper
    bound of the row of u in period t, and that of (u, t) of the column of u;
    a bound that leaves a redacted cell less than its whole range (e.g. a unit
    whose 16 subscribers all show up in a released cell of 16 movers, which
    proves its other cells are 0) is withheld: NaN, no bound.
    """
    if subs.empty or flows.empty:
        return subs
    out = subs.copy()
    prev = {p: periods[k - 1] for k, p in enumerate(periods) if k > 0}
    index = {(u, p): i for i, (u, p) in enumerate(zip(out["unit_id"], out["period"], strict=True))}
    values = out["cdr_subscribers"].to_numpy(dtype=float)
    hide = np.zeros(len(out), dtype=bool)
    for side, shift in (("origin", True), ("destination", False)):
        for (unit, per), g in flows.groupby([side, "period"], sort=False):
            at = prev.get(per) if shift else per
            i = index.get((unit, at))
            if i is None or np.isnan(values[i]):
                continue
            known, lows, highs = _cells(g["count"].to_numpy(), g["max"].to_numpy())
            if not _keeps_ranges(values[i], values[i], known, lows, highs, "upper"):
                hide[i] = True
    if hide.any():
        out.loc[hide, "cdr_subscribers"] = np.nan
        out.loc[hide, "cdr_subscribers_max"] = np.nan
    return out


class _Disclosure:
    """The released tables of one result, to publish other counts by :func:`public_count`.

    It knows how each published count relates to the released cells, totals
    and subscriber counts, and hands :func:`public_count` those relations:

    * relocations of a period = released cells + the redacted cells' sum. The
      sums over rows and columns whose total is released are public, so the
      count is an exact sum over the *free* redacted cells (in no released
      row or column): that sum must keep each of them its range.
    * subscribers with a home in a period = released + redacted (0..threshold)
      + withheld (more than the threshold) subscriber counts: a sum over the
      redacted ones. Each unit's subscribers in period p are at least its
      relocations in (cells of p) and out (cells of the next period), so the
      count also bounds the redacted cells of the units whose count is not
      released: it must leave each of them room to reach the threshold.
    * active subscribers and distinct subscribers bound the same from above.
    """

    def __init__(
        self,
        flows: pd.DataFrame,
        totals: pd.DataFrame,
        subs: pd.DataFrame,
        periods: Sequence[str],
        threshold: int,
    ) -> None:
        self.threshold = threshold
        self.flows, self.totals, self.subs = flows, totals, subs
        self.periods = list(periods)

    def _free_cells(self, period: str) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """Known part, ranges and capacity of the redacted cells in no released row or column."""
        f = self.flows.loc[self.flows["period"] == period].reset_index(drop=True)
        count = f["count"].to_numpy(dtype=float)
        hidden = np.isnan(count)
        known = float(np.nansum(count))
        t = self.totals.loc[self.totals["period"] == period] if len(self.totals) else None
        in_line, need = {}, np.zeros(len(f))
        for col, side in (("outflow", "origin"), ("inflow", "destination")):
            in_line[side] = np.zeros(len(f), dtype=bool)
            if t is None or col not in t.columns:
                continue
            rel = t.loc[t[col].notna()]
            line = f[side].isin(rel["unit_id"]).to_numpy()
            # a released total fixes the sum of its redacted cells: total - its released cells
            known += float(rel[col].sum()) - float(np.nansum(count[line]))
            in_line[side] = line & hidden
            # ... which its redacted cells hold, spread evenly
            r_sum = (
                pd.Series(rel[col].to_numpy(), index=rel["unit_id"].to_numpy())
                - f.groupby(side)["count"]
                .sum()
                .reindex(rel["unit_id"].to_numpy())
                .fillna(0)
                .to_numpy()
            )
            per_cell = (r_sum / f.loc[in_line[side]].groupby(side).size()).reindex(f[side])
            need = np.where(in_line[side], per_cell.to_numpy(dtype=float), need)
        free = hidden & ~in_line["origin"] & ~in_line["destination"]
        fixed = hidden & ~free
        k = self.periods.index(period) if period in self.periods else -1
        before = self.periods[k - 1] if k > 0 else None
        t_cap = float(self.threshold)
        left = {}
        for side, subs_period, col in (
            ("origin", before, "outflow"),
            ("destination", period, "inflow"),
        ):
            # caps on a line's redacted sum, from its total (15 or fewer) and its subscribers;
            # the cells of released crossing lines hold their line's redacted sum spread evenly
            cap = _line_caps(f, side, t, col, self.subs, subs_period, self.threshold)
            left[side] = cap.sub(_line_usage(f, fixed, side, need), fill_value=0).clip(lower=0)
        capacity = np.fmin(
            t_cap,
            np.fmin(
                _share_of(f, free, "origin", left["origin"]),
                _share_of(f, free, "destination", left["destination"]),
            ),
        )[free]
        highs = f["max"].to_numpy(dtype=float)[free]
        highs = np.where(np.isnan(highs), np.inf, highs)
        return known, np.zeros(int(free.sum())), highs, capacity

    def _subs_items(self, periods: Sequence[str]) -> tuple[float, np.ndarray, np.ndarray]:
        s = self.subs.loc[self.subs["period"].isin(list(periods))]
        v = s["cdr_subscribers"].to_numpy(dtype=float)
        bound = s["cdr_subscribers_max"].to_numpy(dtype=float)
        hidden = np.isnan(v)
        withheld = hidden & np.isnan(bound)  # withheld counts are above the threshold
        lows = np.where(withheld, self.threshold + 1.0, 0.0)[hidden]
        highs = np.where(withheld, np.inf, bound)[hidden]
        return float(np.nansum(v)), lows, highs

    def _chains(self, periods: Sequence[str]) -> list[_Check]:
        """Cells bounded through the subscribers of units whose count is not released."""
        s = self.subs.loc[self.subs["period"].isin(list(periods))]
        known_subs = float(np.nansum(s["cdr_subscribers"].to_numpy(dtype=float)))
        checks: list[_Check] = []
        for side, offset in (("destination", 0), ("origin", 1)):
            known, n_hidden = known_subs, 0
            for p in periods:
                k = self.periods.index(p) + offset if p in self.periods else -1
                if not 0 <= k < len(self.periods):
                    continue
                units = s.loc[(s["period"] == p) & s["cdr_subscribers"].isna(), "unit_id"]
                f = self.flows.loc[
                    (self.flows["period"] == self.periods[k]) & self.flows[side].isin(units)
                ]
                known += float(f["count"].sum())
                n_hidden += int(f["count"].isna().sum())
            if n_hidden:
                t = float(self.threshold)
                checks.append(("upper", known, np.zeros(n_hidden), np.full(n_hidden, t)))
        return checks

    def relocations(self, x: float, period: str) -> PublicCount:
        """Publish a period's relocations (an exact sum of its cells)."""
        known, lows, highs, capacity = self._free_cells(period)
        return public_count(x, [("sum", known, lows, highs, capacity)], threshold=self.threshold)

    def subscribers(self, x: float, periods: Sequence[str], relation: str) -> PublicCount:
        """Publish a count that sums (or bounds) the subscribers of ``periods`` together."""
        checks: list[_Check] = [(relation, *self._subs_items(periods))]
        if relation in ("sum", "upper"):
            checks += self._chains(periods)
        return public_count(x, checks, threshold=self.threshold)

    def subscribers_each(self, x: float, periods: Sequence[str]) -> PublicCount:
        """Publish a count >= the subscribers of each of ``periods`` (e.g. distinct subscribers)."""
        checks: list[_Check] = []
        for p in periods:
            checks += [("upper", *self._subs_items([p])), *self._chains([p])]
        return public_count(x, checks, threshold=self.threshold)

    def plain(self, x: float) -> PublicCount:
        """Publish a count related to no released table (rounded only)."""
        return public_count(x, threshold=self.threshold)


def _share(num: PublicCount, den: PublicCount) -> float:
    """Compute a share from published counts only (NaN when either is withheld or zero)."""
    if num.withheld or den.withheld or den.value <= 0:
        return float("nan")
    return round(min(num.value / den.value, 1.0), 2)


# ---------------------------------------------------------------------- OD tables
@dataclass(repr=False)
class CDRFlows:
    """Redacted CDR flow tables (see the module docstring for the columns).

    ``flows`` plugs into ``build_dataset(..., flows={"cdr": result.flows})``,
    ``covariates`` into ``covariates=``, ``totals`` into
    :func:`flowmodel.dataset.totals_to_dataset`. Every count is already
    redacted; ``report``, ``diagnostics`` and ``settings`` follow the rule for
    totals and logs (``docs/privacy.md``), so all of it may be printed or saved.
    """

    flows: pd.DataFrame
    totals: pd.DataFrame
    subscribers: pd.DataFrame
    covariates: pd.DataFrame
    threshold: int
    report: dict[str, Any] = field(default_factory=dict)
    diagnostics: pd.DataFrame = field(default_factory=pd.DataFrame)
    settings: dict[str, Any] = field(default_factory=dict)
    hour_profile: pd.DataFrame = field(default_factory=pd.DataFrame)
    home_rule: pd.DataFrame = field(default_factory=pd.DataFrame)

    def __repr__(self) -> str:
        n_obs = int(self.flows["count"].notna().sum())
        return (
            f"CDRFlows({len(self.flows)} OD rows, {n_obs} above the threshold {self.threshold}, "
            f"periods {sorted(self.flows['period'].unique().tolist()) if 'period' in self.flows else []})"
        )


#: Statistics of ``CDRFlows.diagnostics`` (one row per period and statistic).
DIAGNOSTICS = {
    "events": "night-time events used (exact: not a count of subscribers)",
    "active_subscribers": "subscribers with at least one night-time event in the period",
    "subscribers_with_home": "subscribers given a home in the period",
    "share_with_home": "subscribers_with_home / active_subscribers (of the published counts)",
    "median_active_nights": "median active nights of the active subscribers",
    "events_per_active_subscriber": "events / active_subscribers (of the published counts)",
    "relocations": "subscribers whose home changed since the previous period (in the universe)",
    "relocations_released": "sum of the released OD cells (exact)",
    "cells_released": "OD cells above the threshold (exact)",
    "cells_redacted": "OD cells of 0..threshold, censored (exact)",
    "relocations_outside_universe": "relocations dropped because a unit is outside the universe",
}


def _universe_mask(covered: np.ndarray, country: np.ndarray, universe: str) -> np.ndarray:
    if universe == "covered":
        mask = covered[:, None] & covered[None, :]
    elif universe == "within":
        mask = covered[:, None] & covered[None, :] & (country[:, None] == country[None, :])
    else:
        raise ValueError(f"universe must be 'covered' or 'within', got {universe!r}")
    np.fill_diagonal(mask, False)
    return mask


def _diagnostics(
    homes: HomeLocations,
    disclose: _Disclosure,
    flows: pd.DataFrame,
    moves: dict[str, int],
    dropped: dict[str, int],
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, PublicCount]]:
    """Build the public per-period diagnostics and home-rule tables (the rule for totals and logs)."""
    rows: list[dict[str, Any]] = []

    def add(period: str, stat: str, value: float, base: float = float("nan")) -> None:
        rows.append({"period": period, "statistic": stat, "value": value, "rounded_to": base})

    stats = homes.period_stats.set_index("period") if len(homes.period_stats) else None
    published: dict[str, PublicCount] = {}
    for per in homes.periods:
        if stats is None or per not in stats.index:
            continue
        st = stats.loc[per]
        add(per, "events", float(st["events"]))
        active = disclose.subscribers(float(st["active_subscribers"]), [per], "upper")
        with_home = disclose.subscribers(float(st["subscribers_with_home"]), [per], "sum")
        published[per] = with_home
        add(per, "active_subscribers", active.value, active.base)
        add(per, "subscribers_with_home", with_home.value, with_home.base)
        add(per, "share_with_home", _share(with_home, active), 0.01)
        few = active.withheld or st["active_subscribers"] <= disclose.threshold
        add(per, "median_active_nights", np.nan if few else float(st["median_active_nights"]), 0.5)
        rate = (
            round(float(st["events"]) / active.value, 1)
            if not active.withheld and active.value > 0
            else float("nan")
        )
        add(per, "events_per_active_subscriber", rate, 0.1)
    for per in sorted(set(flows["period"])):
        f = flows.loc[flows["period"] == per]
        moved = disclose.relocations(float(moves.get(per, 0)), per)
        add(per, "relocations", moved.value, moved.base)
        add(per, "relocations_released", float(f["count"].sum()))
        add(per, "cells_released", float(f["count"].notna().sum()))
        add(per, "cells_redacted", float(f["count"].isna().sum()))
        if dropped.get(per):
            out = disclose.plain(float(dropped[per]))
            add(per, "relocations_outside_universe", out.value, out.base)
    table = pd.DataFrame(rows, columns=["period", "statistic", "value", "rounded_to"])
    # the home rule: share with a home and estimated spurious share per min_active_days
    rule = homes.candidates
    m_used = homes.settings.get("min_active_days")
    rule_rows = []
    if len(rule) and stats is not None:
        all_periods = list(stats.index)
        active = disclose.subscribers(
            float(stats["active_subscribers"].sum()), all_periods, "upper"
        )
        for r in rule.itertuples():
            relation = (
                "sum"
                if r.min_active_days == m_used
                else ("upper" if r.min_active_days < m_used else "lower")
            )
            n = disclose.subscribers(float(r.homes), all_periods, relation)
            est = r.spurious_share
            rule_rows.append(
                {
                    "min_active_days": int(r.min_active_days),
                    "share_with_home": _share(n, active),
                    "spurious_share": round(float(est), 2) if pd.notna(est) else float("nan"),
                    "used": r.min_active_days == m_used,
                }
            )
    rule_table = pd.DataFrame(
        rule_rows, columns=["min_active_days", "share_with_home", "spurious_share", "used"]
    )
    return table, rule_table, published


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
        With ``diagnostics`` (per period: events, active subscribers,
        subscribers with a home and their share, median active nights, events
        per subscriber, relocations, released and redacted cells; see
        :data:`DIAGNOSTICS`), ``home_rule`` (share with a home and estimated
        spurious share for each ``min_active_days``), ``settings`` and
        ``hour_profile`` of the home detection. Counts of subscribers there and
        in ``report``, logs and warnings are published by
        :func:`public_count`: rounded, and withheld where they would narrow
        a redacted cell.
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
    dropped = {
        homes.periods[k]: int(n) for k, n in enumerate(np.bincount(t[~inside], minlength=n_p)) if n
    }
    o, d, t = o[inside], d[inside], t[inside]
    moves = {homes.periods[k]: int(n) for k, n in enumerate(np.bincount(t, minlength=n_p))}
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
    for col in ("outflow", "inflow"):
        totals = redact(
            totals,
            column=col,
            max_column=f"{col}_max",
            threshold=threshold,
            allow_small_cells=small_ok,
        )
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
    subs = redact(
        subs,
        column="cdr_subscribers",
        max_column="cdr_subscribers_max",
        threshold=threshold,
        allow_small_cells=small_ok,
    )
    subs = _protect_subscribers(subs, flows, homes.periods, threshold)
    totals = _protect_totals(totals, flows, threshold, subs, homes.periods)
    # the covariate averages only released period counts, so that it cannot be combined with
    # the per-period table to recover a redacted or withheld count
    mean_subs = subs.groupby("unit_id")["cdr_subscribers"].mean().reindex(ids).astype(float)
    mean_subs.index = pd.Index(ids, name="unit_id")
    cov = pd.DataFrame({"cdr_subscribers": mean_subs}).loc[homes.covered]
    if population is not None:
        pop = pd.Series(population).rename(index=str).reindex(cov.index).astype(float)
        cov["cdr_subscribers_per_resident"] = cov["cdr_subscribers"] / pop.where(pop > 0)
    flows = flows[["origin", "destination", "period", "count", "max"]].astype(
        {"origin": str, "destination": str, "period": str, "count": float, "max": float}
    )
    totals = totals.reset_index(drop=True)
    # --- everything else that leaves this function goes through the rule for totals and logs
    disclose = _Disclosure(flows, totals, subs, homes.periods, threshold)
    diagnostics, home_rule, with_home = _diagnostics(homes, disclose, flows, moves, dropped)
    rel_labels = [homes.periods[k] for k in rel_periods]
    moved = {p: disclose.relocations(float(moves.get(p, 0)), p) for p in rel_labels}
    report = _public_report(homes.report, moved, with_home, dropped, disclose)
    report.update(periods=len(rel_periods))
    if any(dropped.values()):
        n_out = disclose.plain(float(sum(dropped.values())))
        warnings.warn(
            f"{n_out.text} relocation(s) between units outside the universe {universe!r} were "
            "dropped (e.g. across borders with universe='within').",
            UserWarning,
            stacklevel=2,
        )
    log.info(
        "CDR relocation OD: %s relocation(s) in %d period(s); released: %d relocations in %d of "
        "%d cells above the threshold %d",
        _sum_text(list(moved.values())),
        len(rel_periods),
        int(flows["count"].sum()),
        int(flows["count"].notna().sum()),
        len(flows),
        threshold,
    )
    shares = diagnostics.loc[diagnostics["statistic"] == "share_with_home", "value"]
    log.info(
        "CDR homes: %s subscriber-period(s) with a home; share of active subscribers with a "
        "home per period: %s",
        _sum_text(list(with_home.values())),
        ", ".join("-" if np.isnan(v) else f"{v:.0%}" for v in shares),
    )
    return CDRFlows(
        flows=flows,
        totals=totals,
        subscribers=subs,
        covariates=cov,
        threshold=threshold,
        report=report,
        diagnostics=diagnostics,
        settings=dict(homes.settings),
        hour_profile=homes.hour_profile.copy(),
        home_rule=home_rule,
    )


def _sum_text(counts: Sequence[PublicCount]) -> str:
    """Render the sum of published counts as text (no finer than its parts)."""
    if not counts:
        return "0"
    if any(c.withheld for c in counts):
        return "a number (withheld to protect redacted cells) of"
    total = sum(c.value for c in counts)
    base = max(c.base for c in counts)
    return f"fewer than {base / 2 * len(counts):,.0f}" if total == 0 else f"about {total:,.0f}"


def _public_report(
    exact: Mapping[str, Any],
    moved: Mapping[str, PublicCount],
    with_home: Mapping[str, PublicCount],
    dropped: Mapping[str, int],
    disclose: _Disclosure,
) -> dict[str, Any]:
    """``CDRFlows.report``: exact event counts; subscriber counts published by the rule."""
    subscriber_keys = ("subscribers", "subscriber_periods_with_home", "active_subscriber_periods")
    out = {k: v for k, v in exact.items() if k not in subscriber_keys}

    def total(counts: Sequence[PublicCount]) -> float:
        return float("nan") if any(c.withheld for c in counts) else sum(c.value for c in counts)

    if "subscribers" in exact:
        out["subscribers"] = disclose.subscribers_each(
            float(exact["subscribers"]), list(with_home)
        ).value
    out["subscriber_periods_with_home"] = total(list(with_home.values()))
    out["relocations"] = total(list(moved.values()))
    if any(dropped.values()):
        out["relocations_outside_universe"] = disclose.plain(float(sum(dropped.values()))).value
    return out


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
    night: tuple[int, int] | Literal["auto"] | None = "auto",
    min_active_days: int | Literal["auto"] = "auto",
    max_spurious_share: float = MAX_SPURIOUS_SHARE,
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
        max_spurious_share=max_spurious_share,
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
        examples = sorted(set(text[bad]))[:MAX_SHOWN]
        raise CDRInputError(
            f"{label}: column {count!r}: {int(bad.sum())} value(s) are neither counts nor redaction markers "
            f"{examples}. Fix: pass redacted_markers=[...] listing the operator's markers."
        )
    neg = values < 0
    if neg.any():
        raise CDRInputError(
            f"{label}: column {count!r}: {int(neg.sum())} negative count(s) at rows "
            f"{format_items((np.flatnonzero(neg) + 1).tolist())}. Fix: counts must be >= 0."
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
    ``cdr_covariates.csv``, and for raw events ``cdr_diagnostics.csv``,
    ``cdr_home_rule.csv``, ``cdr_hour_profile.csv`` and ``cdr_settings.json``
    (all published by the rule for totals and logs). Returns
    ``{"flows": path, ...}``.

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
        "diagnostics": result.diagnostics,
        "home_rule": result.home_rule,
        "hour_profile": result.hour_profile,
    }
    paths = {}
    for name, table in tables.items():
        if name in ("diagnostics", "home_rule", "hour_profile") and table.empty:
            continue
        path = out_dir / f"cdr_{name}.csv"
        with atomic_path(path) as tmp:
            table.to_csv(tmp, index=False)
        paths[name] = path
    if result.settings:
        import json

        path = out_dir / "cdr_settings.json"
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(result.settings, indent=2, default=str) + "\n")
        paths["settings"] = path
    return paths
