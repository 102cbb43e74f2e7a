"""Census migration data -> observed flow tables.

Two inputs are supported, and both return a long table that plugs straight into
:func:`flowmodel.dataset.build_dataset` as ``flows={"census": table}``:

* :func:`read_census_od` — an aggregated origin-destination table (CSV, Parquet
  or a DataFrame) with ``origin``, ``destination``, ``count`` and optionally
  ``period``, or the same counts as a matrix (``layout="wide"``: a row per
  previous residence, a column per current residence, the way statistical
  offices print them; total rows and columns are checked and dropped).
  Suppressed cells (``"<5"``, ``".."``, ``"x"``, ...) become *censored*:
  ``count`` NaN and ``max`` the largest count the cell can hold, never zero.
* :func:`read_census_persons` — IPUMS-style person records (current unit,
  previous unit, person weight): ``count`` is the unweighted number of sampled
  movers (previous residence = origin, current residence = destination),
  ``weighted`` the sum of person weights (for reporting) and ``exposure`` the
  sample fraction. Person records list people, so every pair of the census
  *universe* that no record names is an observed zero, written out explicitly.

Unit codes are harmonised with :func:`harmonise_codes` (a mapping table from the
census codes to the unit ids); codes that match nothing are reported with their
counts and raise :class:`~flowmodel.exceptions.UnitCodeError` (or are dropped
with a warning when ``unmatched="drop"``).

Output columns (one row per ordered pair of distinct units [and period]):

====================  =======  ===============================================
column                dtype    meaning
====================  =======  ===============================================
``origin``            str      unit id of the previous residence
``destination``       str      unit id of the current residence
``period``            str      optional, only when a period column was given
``count``             float    unweighted sample count; NaN = censored
``max``               float    censoring bound where ``count`` is NaN, else NaN
``min``               float    OD tables with ``suppressed_min`` > 0 only: the
                               smallest count a censored cell can hold
``weighted``          float    person records only: sum of person weights
``exposure``          float    sample fraction of the census (0, 1]
====================  =======  ===============================================
"""

from __future__ import annotations

import logging
import os
import re
import unicodedata
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd

from flowmodel.exceptions import CensusInputError, InputFileError, UnitCodeError
from flowmodel.inputs.tables import MAX_SHOWN, TableLike, format_items, read_table

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SUPPRESSED",
    "TOTAL_LABELS",
    "census_universe",
    "harmonise_codes",
    "parse_counts",
    "read_census_od",
    "read_census_persons",
]

#: Markers of suppressed cells and their upper bound (None: use ``suppressed_max``).
#: Strings of the form ``"<N"`` (bound N - 1) and ``"<=N"`` / ``"≤N"`` (bound N)
#: are recognised without being listed.
DEFAULT_SUPPRESSED: dict[str, float | None] = {
    "..": None,
    "...": None,
    "x": None,
    "X": None,
    "c": None,
    "C": None,
    "*": None,
    "s": None,
    "S": None,
    "F": None,
    "supp": None,
    "suppressed": None,
}

Universe = Literal["within", "destination", "abroad", "all"] | None

_THOUSANDS = r"\d{1,3}(?:,\d{3})+(?:\.0*)?"
_LT = re.compile(r"^\s*<\s*(\d+(?:\.\d+)?)\s*$")
_LE = re.compile(r"^\s*(?:<=|≤)\s*(\d+(?:\.\d+)?)\s*$")
#: Row and column labels of a matrix's margins (compared without case and surrounding spaces)
TOTAL_LABELS = frozenset({"total", "totals", "grand total", "all", "sum"})


def _require(table: pd.DataFrame, columns: Mapping[str, str | None], label: str) -> None:
    missing = {
        role: col for role, col in columns.items() if col is not None and col not in table.columns
    }
    if missing:
        wanted = ", ".join(f"{role}={col!r}" for role, col in missing.items())
        raise InputFileError(
            f"{label}: missing column(s) {wanted} (columns: {list(table.columns)}). "
            f"Fix: pass the right column names, e.g. "
            f"{', '.join(f'{role}=<name>' for role in missing)}."
        )


# --------------------------------------------------------------------------- counts
def parse_counts(
    values: pd.Series | Sequence[Any],
    *,
    suppressed: Mapping[str, float | None] | None = None,
    suppressed_max: float | None = None,
    label: str = "count",
    integer: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Parse a count column that may hold suppression markers.

    Parameters
    ----------
    values
        Raw cell values (numbers or strings).
    suppressed
        Marker -> upper bound of the suppressed cell (None: ``suppressed_max``).
        Default :data:`DEFAULT_SUPPRESSED`. ``"<N"`` (bound N - 1) and ``"<=N"``
        (bound N) are always recognised.
    suppressed_max
        Bound of markers that carry none (e.g. ``".."``). When None such cells
        become unobserved (``count`` and ``max`` NaN) and a warning says so.
    label
        Name used in messages (file and column).
    integer
        Counts must be whole numbers (unweighted sample counts); ``1,390``
        (thousands separators) is read as 1390, ``2,5`` is an error.

    Returns
    -------
    (numpy.ndarray, numpy.ndarray)
        ``count`` (float, NaN where suppressed) and ``max`` (float, the bound
        where suppressed, NaN elsewhere).

    Raises
    ------
    CensusInputError
        Values that are neither numbers nor known markers, negative counts, or
        (``integer``) counts with a fractional part; naming the data rows.
    """
    markers = dict(DEFAULT_SUPPRESSED if suppressed is None else suppressed)
    given = pd.Series(values)
    # data row numbers: a table's index (data row - 1) where it is one, else positions
    index = given.index if pd.api.types.is_integer_dtype(given.index) else None
    row_of = (lambda pos: index[pos] + 1) if index is not None else (lambda pos: pos + 1)
    raw = given.reset_index(drop=True)
    if pd.api.types.is_numeric_dtype(raw):
        text = pd.Series("", index=raw.index, dtype=object)  # only NaN cells are looked at
        numeric = raw.astype(float)
    else:
        text = raw.astype("string").str.strip().fillna("").astype(object)
        # thousands separators only (1,390); a decimal comma (2,5) is not a count
        plain = text.where(~text.str.fullmatch(_THOUSANDS), text.str.replace(",", "", regex=False))
        numeric = pd.to_numeric(plain, errors="coerce")
    count = numeric.to_numpy(dtype=float)
    bound = np.full(len(text), np.nan)
    not_num = np.isnan(count)
    unbounded = 0
    bad: dict[str, int] = {}
    for i in np.flatnonzero(not_num):
        cell = text.iat[i]
        if cell in markers:
            b = markers[cell]
            if b is None:
                b = suppressed_max
                unbounded += b is None
            bound[i] = np.nan if b is None else float(b)
        elif m := _LT.match(cell):
            bound[i] = float(m.group(1)) - 1.0
        elif m := _LE.match(cell):
            bound[i] = float(m.group(1))
        elif cell == "":
            bad["<empty>"] = bad.get("<empty>", 0) + 1
        else:
            bad[cell] = bad.get(cell, 0) + 1
    if bad:
        raise CensusInputError(
            f"{label}: {sum(bad.values())} value(s) are neither counts nor suppression markers: "
            f"{format_items(bad, 'rows')}. Fix: declare the markers, e.g. suppressed={{'<marker>': <bound>}}, "
            "or clean the table (an empty cell is not a zero)."
        )
    neg = ~np.isnan(count) & (count < 0)
    if neg.any():
        rows = [int(row_of(p)) for p in np.flatnonzero(neg)]
        raise CensusInputError(
            f"{label}: {int(neg.sum())} negative count(s) at data row(s) {format_items(rows)}. "
            "Fix: counts must be >= 0; correct or drop those rows."
        )
    frac = ~np.isnan(count) & (np.abs(count - np.round(count)) > 1e-9)
    if integer and frac.any():
        where = np.flatnonzero(frac)
        rows = [int(row_of(p)) for p in where]
        shown = {r: float(count[p]) for r, p in zip(rows[:MAX_SHOWN], where, strict=False)}
        raise CensusInputError(
            f"{label}: {int(frac.sum())} count(s) are not whole numbers, at data row(s) "
            f"{format_items(rows)} (values {shown}). Fix: give unweighted sample counts (weighted "
            "estimates divided by the sample fraction are not counts: give the sample counts and "
            "sample_fraction=), or correct the decimal separator."
        )
    if unbounded:
        warnings.warn(
            f"{label}: {unbounded} suppressed cell(s) carry no bound; they are treated as unobserved "
            "(count NaN, no max). Fix: pass suppressed_max=<largest suppressed count> to keep them as "
            "censored cells.",
            UserWarning,
            stacklevel=3,
        )
    return count, bound


# ------------------------------------------------------------------ harmonisation
def _mapping_dict(
    mapping: Mapping[str, str] | pd.DataFrame | str | os.PathLike[str] | None,
    from_field: str,
    to_field: str,
) -> dict[str, str]:
    if mapping is None:
        return {}
    if isinstance(mapping, Mapping):
        return {str(k): str(v) for k, v in mapping.items()}
    table, label = read_table(mapping, "code mapping")
    _require(table, {"from_field": from_field, "to_field": to_field}, label)
    table = table[[from_field, to_field]].astype(str).drop_duplicates()
    dup = table[from_field][table[from_field].duplicated()].unique().tolist()
    if dup:
        raise UnitCodeError(
            f"{label}: code(s) {format_items(dup)} map to more than one unit id. Fix: a census code must map "
            "to exactly one unit; split flows by hand before harmonising."
        )
    return dict(zip(table[from_field], table[to_field], strict=True))


def harmonise_codes(
    table: pd.DataFrame,
    unit_ids: Sequence[str] | pd.Index,
    *,
    mapping: Mapping[str, str] | pd.DataFrame | str | os.PathLike[str] | None = None,
    columns: Sequence[str] = ("origin", "destination"),
    from_field: str = "code",
    to_field: str = "unit_id",
    unmatched: Literal["error", "drop"] = "error",
    weight: str | None = None,
    label: str = "table",
    other_levels: Mapping[str, Iterable[str]] | None = None,
    unit_names: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """Translate the unit codes of ``columns`` to unit ids through a mapping table.

    Codes found in ``mapping`` are replaced by their unit id; codes that already
    are unit ids are kept; anything else is *unmatched*.

    Parameters
    ----------
    table
        Table whose ``columns`` hold unit codes.
    unit_ids
        The valid unit ids (e.g. ``units["unit_id"]``).
    mapping
        Dict ``code -> unit id`` or a table (file or DataFrame) with
        ``from_field`` and ``to_field`` columns. Several codes may map to one
        unit (merged units); one code may not map to several.
    columns
        Columns to translate.
    from_field, to_field
        Column names of the mapping table.
    unmatched
        ``"error"`` (default): raise :class:`UnitCodeError` listing every
        unmatched code with its number of rows (or of ``weight``);
        ``"drop"``: drop those rows with a warning giving the same counts.
    weight
        Column summed per unmatched code in the report (default: rows).
    label
        Name of the table in messages (e.g. the file name).
    other_levels
        Labels of the other levels (``{"country": [...]}``): unmatched codes that
        are such labels get a hint to read the column at that level. Every
        error also says which unmatched codes are unit ids that lost their
        leading zeros (``"1"`` for ``"01"``) or gained a decimal (``"1.0"``), or
        differ from one only in case, accents or punctuation.
    unit_names
        ``unit id -> name`` (the units' ``name`` column): unmatched codes that are
        unit names (in any case, with or without accents) get a hint to map them.

    Returns
    -------
    pandas.DataFrame
        A copy with translated codes (str).
    """
    lookup = _mapping_dict(mapping, from_field, to_field)
    valid = {str(u) for u in unit_ids}
    bad_targets = sorted(set(lookup.values()) - valid)
    if bad_targets:
        raise UnitCodeError(
            f"code mapping: target id(s) {format_items(bad_targets)} are not unit ids. "
            "Fix: map census codes to ids present in the units table."
        )
    out = table.copy()
    keep = np.ones(len(out), dtype=bool)
    report: dict[str, float] = {}
    unmatched_codes: dict[str, set[str]] = {}
    for col in columns:
        codes = out[col].astype(str).str.strip()
        mapped = codes.map(lambda c: lookup.get(c, c))
        miss = ~mapped.isin(valid).to_numpy()
        if miss.any():
            w = (
                pd.to_numeric(out.loc[miss, weight], errors="coerce").fillna(0.0)
                if weight is not None
                else pd.Series(1.0, index=out.index[miss])
            )
            unmatched_codes[col] = set(codes[miss])
            for code, total in w.groupby(codes[miss].to_numpy()).sum().items():
                key = f"{col}={code}"
                report[key] = report.get(key, 0.0) + float(total)
        keep &= ~miss
        out[col] = mapped
    if report:
        what = weight or "rows"
        listing = {
            k: (int(v) if float(v).is_integer() else round(v, 2)) for k, v in report.items()
        }
        listing = dict(sorted(listing.items(), key=lambda kv: -kv[1]))
        msg = (
            f"{label}: {len(report)} unit code(s) match no unit id "
            f"({int((~keep).sum())} of {len(out)} rows): {format_items(listing, what)}"
        ) + "".join(
            _code_hints(col, found, valid, other_levels or {}, unit_names or {})
            for col, found in unmatched_codes.items()
        )
        if unmatched == "error":
            raise UnitCodeError(
                f"{msg}. Fix: pass mapping=<table with '{from_field}' and '{to_field}' columns>, "
                "or unmatched='drop' to drop those rows."
            )
        if unmatched != "drop":
            raise ValueError(f"unmatched must be 'error' or 'drop', got {unmatched!r}")
        warnings.warn(f"{msg}; dropped.", UserWarning, stacklevel=2)
        out = out.loc[keep]
    return out


def _number_key(code: str) -> str | None:
    """``"007"``, ``"7"`` and ``"7.0"`` -> ``"7"``; None for what is not a whole number."""
    text = code[:-2] if code.endswith(".0") else code
    return (text.lstrip("0") or "0") if text.isdigit() else None


def _name_key(code: str) -> str:
    """``"SAO  PAULO"``, ``"São Paulo"``, ``"sao-paulo"`` -> ``"sao paulo"``."""
    plain = unicodedata.normalize("NFKD", code)
    plain = "".join(ch for ch in plain if not unicodedata.combining(ch))
    return re.sub(r"[\W_]+", " ", plain.casefold()).strip()


def _code_hints(
    column: str,
    codes: set[str],
    valid: set[str],
    other_levels: Mapping[str, Iterable[str]],
    unit_names: Mapping[str, str],
) -> str:
    """Say what unmatched codes of ``column`` look like (of the unit ids, or of another level)."""

    def examples(pairs: list[tuple[str, str]]) -> str:
        return ", ".join(f"{c!r} for {v!r}" for c, v in pairs[:3]) + (
            ", ..." if len(pairs) > 3 else ""
        )

    hints = []
    numbers: dict[str, str] = {}
    names: dict[str, str] = {}
    for v in sorted(valid):
        if (key := _number_key(v)) is not None:
            numbers.setdefault(key, v)
        names.setdefault(_name_key(v), v)
    as_number = [
        (c, numbers[k])
        for c in sorted(codes)
        if (k := _number_key(c)) is not None and k in numbers
    ]
    if as_number:
        hints.append(
            f"{len(as_number)} of {column!r} are unit ids' numbers written another way "
            f"({examples(as_number)}): leading zeros or a decimal differ, as when a "
            "spreadsheet or a numeric column held the codes; export them as text, or map "
            "them (mapping=)"
        )
    seen = {c for c, _ in as_number}
    as_name = [(c, names[_name_key(c)]) for c in sorted(codes - seen) if _name_key(c) in names]
    if as_name:
        hints.append(
            f"{len(as_name)} of {column!r} differ from unit ids only in case, accents or "
            f"punctuation ({examples(as_name)}); pass them as mapping={{code: unit id}}"
        )
    seen |= {c for c, _ in as_name}
    exact = {str(n): str(i) for i, n in unit_names.items() if str(i) in valid}
    loose = {_name_key(n): i for n, i in exact.items()}
    named = [(c, exact[c]) for c in sorted(codes - seen) if c in exact]
    if named:
        hints.append(
            f"{len(named)} of {column!r} are unit names ({examples(named)}); map names to "
            "ids: mapping=units[['name', 'unit_id']].rename(columns={'name': 'code'}) (in a "
            "run config, a CSV with columns code and unit_id)"
        )
    seen |= {c for c, _ in named}
    spelt = [(c, loose[_name_key(c)]) for c in sorted(codes - seen) if _name_key(c) in loose]
    if spelt:
        hints.append(
            f"{len(spelt)} of {column!r} are unit names in another case or without accents "
            f"({examples(spelt)}); pass the pairs as mapping={{code: unit id}}"
        )
    for level, labels in other_levels.items():
        hit = sorted(codes & {str(x) for x in labels})
        if hit:
            option = f"{column}_level={level!r}" if column in ("origin", "destination") else level
            hints.append(
                f"{len(hit)} of {column!r} are {level} labels ({', '.join(map(repr, hit[:3]))}"
                f"{', ...' if len(hit) > 3 else ''}): read the column at that level ({option})"
            )
    return "".join(f". Hint: {h}" for h in hints)


# ----------------------------------------------------------------------- universe
def _unit_country(units: Any, id_field: str, country_field: str) -> pd.Series:
    if isinstance(units, pd.Series):
        return units.astype(str).set_axis(units.index.astype(str))
    frame = pd.DataFrame(units)
    if id_field not in frame.columns and frame.index.name in (id_field, "unit"):
        frame = frame.reset_index().rename(columns={frame.index.name: id_field})
    _require(frame, {"id_field": id_field, "country_field": country_field}, "units")
    return pd.Series(
        frame[country_field].astype(str).to_numpy(), index=frame[id_field].astype(str).to_numpy()
    )


def _unit_names(units: Any, id_field: str) -> dict[str, str]:
    """Return ``unit id -> name`` from the units' ``name`` column (empty without one)."""
    if units is None or isinstance(units, pd.Series):
        return {}
    frame = pd.DataFrame(units)
    if "name" not in frame.columns or id_field not in frame.columns:
        return {}
    return dict(zip(frame[id_field].astype(str), frame["name"].astype(str), strict=True))


def _to_unit_ids(
    table: pd.DataFrame,
    units: Any,
    country: pd.Series,
    id_field: str,
    mapping: Any,
    unmatched: Literal["error", "drop"],
    label: str,
) -> pd.DataFrame:
    """:func:`harmonise_codes` of origin and destination to unit ids, with every hint."""
    return harmonise_codes(
        table,
        country.index,
        mapping=mapping,
        unmatched=unmatched,
        label=label,
        weight=None,
        other_levels={"country": set(country)},
        unit_names=_unit_names(units, id_field),
    )


def census_universe(
    country: pd.Series,
    countries: Sequence[str],
    universe: Universe = "within",
) -> pd.DataFrame:
    """Ordered pairs of distinct units a census observes (zeros included).

    Parameters
    ----------
    country
        Country code of every unit, indexed by unit id.
    countries
        The census countries (where people were enumerated).
    universe
        ``"within"``: both units in the same census country (a national census
        of internal migration); ``"destination"``: destination in a census
        country, origin anywhere (the census enumerates everyone living there);
        ``"abroad"``: destination in a census country, origin in another
        country (immigrants); ``"all"``: every pair of units.

    Returns
    -------
    pandas.DataFrame
        ``origin``, ``destination`` (str).
    """
    ids = country.index.to_numpy().astype(str)
    codes = country.to_numpy().astype(str)
    in_census = np.isin(codes, np.asarray(list(countries), dtype=str))
    if universe == "within":
        mask = (codes[:, None] == codes[None, :]) & in_census[:, None]
    elif universe == "destination":
        mask = np.broadcast_to(in_census[None, :], (len(ids), len(ids))).copy()
    elif universe == "abroad":
        mask = in_census[None, :] & (codes[:, None] != codes[None, :])
    elif universe == "all":
        mask = np.ones((len(ids), len(ids)), dtype=bool)
    else:
        raise ValueError(
            f"universe must be 'within', 'destination', 'abroad', 'all' or None, got {universe!r}"
        )
    np.fill_diagonal(mask, False)
    oi, di = np.nonzero(mask)
    return pd.DataFrame({"origin": ids[oi], "destination": ids[di]})


def _apply_universe(
    table: pd.DataFrame,
    country: pd.Series,
    countries: Sequence[str],
    universe: Universe,
    fill: Mapping[str, float],
    label: str,
    periods: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Keep rows inside the universe and add explicit zero rows for the others."""
    if universe is None:
        return table
    pairs = census_universe(country, countries, universe)
    if periods is None:
        periods = sorted(table["period"].unique()) if "period" in table.columns else [None]
    frames = []
    for p in periods:
        frame = pairs.copy()
        if p is not None:
            frame["period"] = p
        frames.append(frame)
    full = pd.concat(frames, ignore_index=True)
    keys = ["origin", "destination"] + (["period"] if "period" in table.columns else [])
    inside = (
        table.merge(full.assign(_in=True), on=keys, how="left")["_in"].fillna(False).to_numpy(bool)
    )
    if not inside.all():
        n_out = int((~inside).sum())
        warnings.warn(
            f"{label}: {n_out} row(s) name pairs outside the census universe ({universe!r}; census "
            f"countries {sorted(countries)}) and were dropped — keeping non-zero counts where zeros "
            "are unobserved would bias the fit. Fix: pass universe='destination' or 'all' to keep them.",
            UserWarning,
            stacklevel=3,
        )
        table = table.loc[inside]
    out = full.merge(table.assign(_present=True), on=keys, how="left")
    absent = out["_present"].isna().to_numpy()
    for col, value in fill.items():
        if col in out.columns:
            out.loc[absent, col] = value
    return out.drop(columns="_present")
    return out


def _sample_fraction(
    sample_fraction: float | Mapping[str, float] | None,
    destination_country: pd.Series,
    per_country: Mapping[str, float] | None = None,
    *,
    label: str = "census",
) -> np.ndarray:
    if sample_fraction is None:
        values = destination_country.map(per_country or {})
    elif isinstance(sample_fraction, Mapping):
        given = {str(k): float(v) for k, v in sample_fraction.items()}
        values = destination_country.map(given)
        lacking = destination_country[values.isna() & destination_country.notna()]
        if len(lacking):
            counts = lacking.astype(str).value_counts().to_dict()
            raise CensusInputError(
                f"{label}: sample_fraction gives no fraction for census countr(ies) "
                f"{format_items(counts, 'rows')} (it names {sorted(given)}). Fix: give every census "
                "country its fraction, e.g. sample_fraction = {"
                + ", ".join(f"{c} = 0.1" for c in sorted(set(given) | set(counts))[:4])
                + "}, or one number for all."
            )
    else:
        values = pd.Series(float(sample_fraction), index=destination_country.index)
    out = values.to_numpy(dtype=float)
    bad = ~np.isnan(out) & ((out <= 0) | (out > 1))
    if bad.any():
        raise CensusInputError(
            f"{label}: sample_fraction: values must be in (0, 1], got "
            f"{sorted(set(out[bad].tolist()))[:MAX_SHOWN]}. "
            "Fix: give the share of the population sampled, e.g. 0.1 for a 10% sample."
        )
    return out


# ---------------------------------------------------------------------- OD tables
def read_census_od(
    source: TableLike,
    *,
    units: Any = None,
    origin: str = "origin",
    destination: str = "destination",
    count: str = "count",
    period: str | None = None,
    mapping: Mapping[str, str] | pd.DataFrame | str | os.PathLike[str] | None = None,
    unmatched: Literal["error", "drop"] = "error",
    suppressed: Mapping[str, float | None] | None = None,
    suppressed_max: float | None = None,
    suppressed_min: float | None = None,
    sample_fraction: float | Mapping[str, float] | None = None,
    universe: Universe = None,
    countries: Sequence[str] | None = None,
    id_field: str = "unit_id",
    country_field: str = "country",
    duplicates: Literal["error", "sum"] = "error",
    population: pd.Series | None = None,
    max_share: float | None = 1.0,
    encoding: str = "utf-8",
    sep: str | None = None,
    origin_level: str = "unit",
    destination_level: str = "unit",
    layout: Literal["long", "wide"] = "long",
    check_totals: bool = True,
    sheet: str | int | None = None,
    header_row: int = 1,
    by: Sequence[str] = (),
    matrix_rows: Literal["origin", "destination"] = "origin",
) -> pd.DataFrame:
    """Read an aggregated census OD table into a long flow table.

    Parameters
    ----------
    source
        CSV, Excel (``.xlsx``), Parquet or Feather file, or a DataFrame. CSV and
        spreadsheet cells are read as text so that suppression markers survive.
    units
        Units table (``id_field``, ``country_field``) used to check codes and,
        with ``universe``, to add explicit zero rows. Required when ``mapping``
        or ``universe`` is given.
    origin, destination, count, period
        Column names in ``source``.
    mapping, unmatched
        Code harmonisation, see :func:`harmonise_codes`.
    suppressed, suppressed_max
        Suppression markers and bounds, see :func:`parse_counts`. A suppressed
        cell becomes ``count`` NaN and ``max`` = its bound, never zero.
    suppressed_min
        Smallest count a suppressed cell can hold. Tables that print zeros as
        ``0`` and suppress only small non-zero counts (``"<5"`` = 1-4) need
        ``suppressed_min=1``: read as 0-4 the suppressed cells pull small
        flows towards zero and bias the fit (a distance-decay and population
        coefficients too steep). Written as ``min`` (the likelihood becomes
        P(min <= y <= max)) when > 0. Default None: 0, with a warning when the
        table has both explicit zeros and suppressed cells.
    sample_fraction
        Sampling fraction of the census (scalar or ``country -> fraction`` of
        the destination's country) written as ``exposure``; default 1 (a full
        count).
    universe
        Which absent pairs are observed zeros (see :func:`census_universe`);
        None (default) leaves absent pairs unobserved — use ``"within"`` when
        the table lists every non-zero flow of the census countries.
    countries
        Census countries for ``universe`` (default: the countries of the
        destination units in the table).
    id_field, country_field
        Column names of ``units``.
    duplicates
        A pair (and period) on more than one row of the table: ``"error"``
        (default; identical rows are a repeated export, different counts a
        contradiction) or ``"sum"`` (the table splits pairs over several rows,
        e.g. by sex or age: they are added up).
    population
        Unit populations (indexed by unit id; the pipeline passes the zonal
        sums of the population raster). A count larger than ``max_share`` x
        the sample fraction x the larger population of its pair is an error
        naming the row (a typo, a total row, a wrong sample fraction).
    max_share
        See ``population``; None switches the check off.
    encoding
        Text encoding of a CSV file (default UTF-8; a byte-order mark is
        dropped). Exports from older spreadsheet software are often
        ``"latin-1"`` (``"cp1252"``).
    sep
        CSV delimiter; default: detected from the first lines (``,``, ``;``,
        tab or ``|``).
    origin_level, destination_level
        What the origin and destination codes name: ``"unit"`` (default),
        ``"country"`` (e.g. immigrants by previous country) or a field of the
        units (e.g. ``"admin1"`` for a census that records the previous admin-1
        region). A cell at a coarser level sums the flows of its member units;
        the table carries the levels in ``table.attrs`` and
        :func:`flowmodel.dataset.build_dataset` holds it over ``cell_<source>``.
        Cells whose origin contains the destination unit are dropped (staying
        and moving within the region cannot be told apart); ``universe`` then
        takes ``"within"``, ``"destination"``, ``"abroad"`` (origin in another
        country: immigrants) or ``"all"``.
    layout
        ``"long"`` (default): a row per cell. ``"wide"``: a matrix, a row per
        origin and a column per destination (the column headers are the
        destination codes); ``origin`` names the column of origin codes (by
        default the first column when no column is called ``origin``),
        ``period`` an optional column of periods (one matrix per period, stacked),
        and ``destination`` and ``count`` are not used. An empty cell is one the
        office did not print (stayers on the diagonal; zeros, where ``universe``
        says so; a warning counts those off the diagonal) and is dropped. Rows
        and columns labelled as margins (:data:`TOTAL_LABELS`: ``Total``,
        ``All``, ...) are checked and dropped.
    check_totals
        ``layout="wide"``: each margin must lie within what its row's or column's
        cells allow (their sum, with suppressed cells anywhere in their range; a
        margin that is not the sum of the printed cells means a shifted row or
        column, or a margin that counts people the matrix does not show). False
        drops margins unchecked.
    by
        ``layout="wide"``: columns that split the matrix into several printed
        one below the other (sex, age group), each with its own margins; their
        cells are summed per pair (the long table's ``duplicates="sum"``).
    matrix_rows
        ``layout="wide"``: what the rows are, ``"origin"`` (default: previous
        residence by row) or ``"destination"`` (current residence, or place of
        enumeration, by row; the columns are then the origins). The column of row
        labels is ``origin`` or ``destination`` accordingly (by default the first).
    sheet
        The sheet of an ``.xlsx`` workbook: its name or 0-based position
        (default: the first).
    header_row
        The 1-based row (CSV line or spreadsheet row) that holds the column
        names; the title lines above it are skipped (default 1).

    Returns
    -------
    pandas.DataFrame
        ``origin``, ``destination``[, ``period``], ``count``, ``max``,
        ``exposure`` (see the module docstring). Rows whose codes map to the
        same unit pair (merged units, see ``mapping``) are summed; a sum
        involving a suppressed cell is censored with ``max`` = the sum of the
        counts and bounds.

    Raises
    ------
    InputFileError
        Missing, empty or unreadable file (wrong encoding), missing columns.
    CensusInputError
        Unparsable, negative or fractional counts, empty unit codes, a pair on
        several rows, counts larger than the population allows, sample
        fractions outside (0, 1] or missing for a census country.
    UnitCodeError
        Codes matching no unit (unless ``unmatched="drop"``).
    """
    table, label = read_table(
        source, "census OD", encoding=encoding, sep=sep, sheet=sheet, header_row=header_row
    )
    if layout == "wide":
        if matrix_rows not in ("origin", "destination"):
            raise CensusInputError(
                f"{label}: matrix_rows={matrix_rows!r}; use 'origin' or 'destination'."
            )
        table = _melt_matrix(
            table,
            label,
            origin=origin if matrix_rows == "origin" else destination,
            default_label=matrix_rows,
            period=period,
            suppressed=suppressed,
            suppressed_max=suppressed_max,
            suppressed_min=suppressed_min,
            check_totals=check_totals,
            by=list(by),
            # a matrix by region or country leaves the cells that contain the destination empty
            warn_empty=universe is None and origin_level == destination_level == "unit",
        )
        origin, destination, count = "origin", "destination", "count"
        period = "period" if period else None
        duplicates = "sum" if by else duplicates
    elif layout != "long":
        raise CensusInputError(f"{label}: layout={layout!r}; use 'long' or 'wide'.")
    elif by:
        raise CensusInputError(
            f"{label}: by= applies to layout='wide'. Fix: drop it; a long table split by sex or "
            "age needs duplicates='sum' (its other columns are not read)."
        )
    if origin_level != "unit" or destination_level != "unit":
        return _read_census_od_cells(
            table,
            label,
            units=units,
            origin=origin,
            destination=destination,
            count=count,
            period=period,
            unmatched=unmatched,
            suppressed=suppressed,
            suppressed_max=suppressed_max,
            suppressed_min=suppressed_min,
            sample_fraction=sample_fraction,
            universe=universe,
            countries=countries,
            id_field=id_field,
            country_field=country_field,
            origin_level=origin_level,
            destination_level=destination_level,
            duplicates=duplicates,
        )
    table = _od_columns(table, label, origin, destination, count, period)
    for col, name in (("origin", origin), ("destination", destination)):
        table[col] = _codes(table[col], label, name, "unit code")
    keys = ["origin", "destination"] + (["period"] if period else [])
    if duplicates not in ("error", "sum"):
        raise CensusInputError(f"{label}: duplicates={duplicates!r}; use 'error' or 'sum'.")
    if duplicates == "error":
        _check_duplicates(table, keys, label, count)
    counts, bounds = parse_counts(
        table["count"],
        suppressed=suppressed,
        suppressed_max=suppressed_max,
        label=f"{label}: column {count!r}",
    )
    table["count"] = counts
    table["max"] = bounds
    censored = np.isnan(counts) & ~np.isnan(bounds)
    if suppressed_min is None:
        if censored.any() and (counts == 0).any():
            warnings.warn(
                f"{label}: column {count!r} has {int((counts == 0).sum())} explicit zero(s) and "
                f"{int(censored.sum())} suppressed cell(s); they are read as 0..max. If the table "
                "suppresses only non-zero counts (e.g. '<5' = 1-4), pass suppressed_min=1 — "
                "reading them as possibly zero biases the fit.",
                UserWarning,
                stacklevel=2,
            )
        suppressed_min = 0.0
    if suppressed_min < 0 or (censored.any() and (bounds[censored] < suppressed_min).any()):
        raise CensusInputError(
            f"{label}: suppressed_min={suppressed_min} must be >= 0 and <= every suppression "
            f"bound (smallest bound {np.nanmin(bounds) if censored.any() else 'none'}). "
            "Fix: give the smallest count a suppressed cell can hold (1 when zeros are printed)."
        )
    if suppressed_min > 0:
        table["min"] = np.where(censored, float(suppressed_min), np.nan)
    country = None
    if units is not None:
        country = _unit_country(units, id_field, country_field)
        table = _to_unit_ids(table, units, country, id_field, mapping, unmatched, label)
    elif mapping is not None or universe is not None or isinstance(sample_fraction, Mapping):
        raise CensusInputError(
            f"{label}: mapping=, universe= and a per-country sample_fraction need the units "
            "table. Fix: pass units=<GeoDataFrame>."
        )
    if population is not None and max_share is not None and country is not None:
        row_fraction = _sample_fraction(
            1.0 if sample_fraction is None else sample_fraction,
            table["destination"].map(country),
            label=label,
        )
        _check_plausible(table, row_fraction, population, max_share, label, rows=True)
    diag = table["origin"] == table["destination"]
    if diag.any():
        warnings.warn(
            f"{label}: dropped {int(diag.sum())} diagonal row(s) (origin == destination, stayers); "
            "the diagonal is excluded from every likelihood and output",
            UserWarning,
            stacklevel=2,
        )
        table = table.loc[~diag]
    table = _aggregate(table, ["origin", "destination"] + (["period"] if period else []))
    if country is not None:
        cens = (
            list(countries)
            if countries is not None
            else sorted(set(country.reindex(table["destination"]).dropna()))
        )
        table = _apply_universe(table, country, cens, universe, {"count": 0.0}, label)
        dest_country = table["destination"].map(country)
    else:
        dest_country = pd.Series("", index=table.index)
    table = table.reset_index(drop=True)
    fraction = _sample_fraction(
        1.0 if sample_fraction is None else sample_fraction,
        dest_country.reset_index(drop=True),
        label=label,
    )
    table["exposure"] = fraction
    return _order(table)


def _codes(values: pd.Series, label: str, column: str, what: str) -> pd.Series:
    """Return unit codes as stripped strings; raise naming the rows of empty or missing codes."""
    text = values.astype(str).str.strip()
    missing = values.isna().to_numpy() | text.isin(["", "nan", "NaN", "None", "<NA>"]).to_numpy()
    if missing.any():
        rows = (values.index[missing] + 1).tolist()  # tables are read with index = row - 1
        raise CensusInputError(
            f"{label}: column {column!r} is empty at {int(missing.sum())} data row(s) "
            f"{format_items(rows)}: the {what} is missing (not an unknown code). Fix: fill it in or "
            f"drop those rows (e.g. query=\"{column} != ''\" for person records)."
        )
    return text


def _od_columns(
    table: pd.DataFrame,
    label: str,
    origin: str,
    destination: str,
    count: str,
    period: str | None,
) -> pd.DataFrame:
    """Select and rename a long OD table's columns; refuse its total rows.

    A row whose origin or destination is a margin label (:data:`TOTAL_LABELS`) sums
    other rows: kept, it would count their movers twice.
    """
    _require(
        table,
        {"origin": origin, "destination": destination, "count": count, "period": period},
        label,
    )
    cols = [origin, destination, count] + ([period] if period else [])
    table = table[cols].rename(
        columns={origin: "origin", destination: "destination", count: "count"}
    )
    if period:
        table = table.rename(columns={period: "period"})
        table["period"] = table["period"].astype(str)
    totals = (table["origin"].map(_is_margin) | table["destination"].map(_is_margin)).to_numpy()
    if totals.any():
        rows = (table.index[totals] + 1).tolist()
        raise CensusInputError(
            f"{label}: {int(totals.sum())} row(s) are totals, not pairs of units (origin or "
            f"destination {sorted(TOTAL_LABELS)}), at data row(s) {format_items(rows)}: they would count "
            "the movers of other rows twice. Fix: delete them (a matrix with margins: "
            "layout='wide' checks them against the cells and drops them)."
        )
    return table


def _is_margin(label: Any) -> bool:
    return str(label).strip().lower() in TOTAL_LABELS


def _melt_matrix(
    table: pd.DataFrame,
    label: str,
    *,
    origin: str,
    period: str | None,
    suppressed: Mapping[str, float | None] | None,
    suppressed_max: float | None,
    suppressed_min: float | None,
    check_totals: bool,
    warn_empty: bool,
    by: Sequence[str] = (),
    default_label: str = "origin",
) -> pd.DataFrame:
    """Return a census matrix (a row per origin, a column per destination) as a long table.

    With ``default_label="destination"`` the rows are destinations and the columns
    origins. Each column is parsed as the file's column, so that a bad value is
    named by its data row and column header; margins (:data:`TOTAL_LABELS`) are
    checked against the cells they sum (``check_totals``) and dropped, and so are
    empty cells (not printed: stayers, or zeros; a warning counts those off the
    diagonal when ``warn_empty``). The cells stay text: :func:`read_census_od`
    parses the long table as it parses any other.
    """
    columns = [str(c) for c in table.columns]
    table = table.set_axis(columns, axis=1)
    if origin not in columns:
        if origin != default_label:
            _require(table, {default_label: origin}, label)
        # the row labels: the first column that is not a period or a split
        origin = next(c for c in columns if c != period and c not in by)
    _require(table, {"period": period}, label)
    missing = [c for c in by if c not in columns]
    if missing:
        raise InputFileError(
            f"{label}: by= column(s) {missing} are not in the table (columns: {columns}). Fix: "
            "name the columns that split the matrix (sex, age group)."
        )
    groups = ([period] if period else []) + list(by)
    ids = [origin, *groups]
    destinations = [c for c in columns if c not in ids]
    nameless = [c for c in destinations if c.startswith("Unnamed:") or not c.strip()]
    if nameless or not destinations:
        raise CensusInputError(
            f"{label}: layout='wide' needs a code as the header of every column but that of "
            f"the row labels ({origin!r}); "
            + (f"{len(nameless)} column(s) have none" if nameless else "there are no others")
            + ". Fix: put the codes in the header line (header_row= when a title sits above "
            f"it), and name the column of row labels with {default_label}= when it is not the "
            "first."
        )
    # rows without a single printed cell: blank separator rows, headings, footnotes
    printed = table[destinations].astype("string").apply(lambda col: col.str.strip()).fillna("")
    layout_rows = printed.eq("").all(axis=1).to_numpy()
    if layout_rows.all():
        raise CensusInputError(
            f"{label}: layout='wide': no row has a printed cell. Fix: check header_row= (the row "
            "of the destination codes) and the sheet."
        )
    if layout_rows.any():
        logger.info(
            "%s: skipped %d row(s) without a printed cell (blank lines, headings, notes): data "
            "row(s) %s",
            label,
            int(layout_rows.sum()),
            format_items((np.flatnonzero(layout_rows) + 1).tolist()),
        )
        table = table.loc[~layout_rows]
    codes = _codes(table[origin], label, origin, f"{default_label} code (the row label)")
    margin_rows = codes.map(_is_margin).to_numpy()
    cells = [c for c in destinations if not _is_margin(c)]
    if not cells or margin_rows.all():
        raise CensusInputError(
            f"{label}: layout='wide': every row or every column is a margin ({sorted(TOTAL_LABELS)}"
            "). Fix: check the origin= column and the header line."
        )
    text = table[destinations].astype("string").apply(lambda col: col.str.strip()).fillna("")
    # an empty cell is one the office did not print (stayers on the diagonal, a region's
    # own cell, sometimes zeros): unobserved, unless `universe` makes absent pairs zeros
    empty = text.to_numpy() == ""
    diagonal = codes.to_numpy()[:, None] == np.asarray(destinations)[None, :]
    lo = np.zeros(text.shape)
    hi = np.zeros(text.shape)
    value = np.zeros(text.shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read_census_od says it once, for the whole table
        for j, col in enumerate(destinations):
            count, bound = parse_counts(
                text[col].mask(empty[:, j], "0"),
                suppressed=suppressed,
                suppressed_max=suppressed_max,
                label=f"{label}: column {col!r}",
            )
            censored = np.isnan(count) & ~np.isnan(bound)
            value[:, j] = count
            lo[:, j] = np.where(censored, suppressed_min or 0.0, np.nan_to_num(count))
            hi[:, j] = np.where(censored, bound, count)  # NaN: unobserved, unbounded
    hi[empty] = np.inf  # a margin may count what was not printed
    hi = np.where(np.isnan(hi), np.inf, hi)
    # a part of a split matrix labelled as a margin (sex "Total": both sexes) sums the
    # others: dropped, unchecked
    part_total = (
        table[list(by)].map(_is_margin).any(axis=1).to_numpy()
        if by
        else np.zeros(len(table), dtype=bool)
    )
    if check_totals:
        p = ~part_total
        _check_margins(
            label, codes[p], destinations, margin_rows[p], value[p], lo[p], hi[p], table[p], groups
        )
    margin_rows = margin_rows | part_total
    keep = table.loc[~margin_rows, ids].rename(columns={origin: "origin"})
    keep["origin"] = codes[~margin_rows]
    if period:
        keep = keep.rename(columns={period: "period"})
    wide = pd.concat([keep, text.loc[~margin_rows, cells]], axis=1)
    long = wide.melt(id_vars=list(keep.columns), var_name="destination", value_name="count")
    if default_label == "destination":  # rows are destinations: the columns are the origins
        long = long.rename(columns={"origin": "destination", "destination": "origin"})
    blank = pd.DataFrame(empty, index=table.index, columns=destinations)
    dropped = blank.loc[~margin_rows, cells].melt(value_name="blank")["blank"].to_numpy()
    margin_cols = np.array([_is_margin(c) for c in destinations])
    off_diagonal = int((empty & ~diagonal)[~margin_rows][:, ~margin_cols].sum())
    margins = [
        *(f"row {r!r}" for r in dict.fromkeys(codes[margin_rows & ~part_total])),
        *(f"column {str(c)!r}" for c in np.asarray(destinations)[margin_cols]),
    ] + ([f"the parts whose {', '.join(by)} is a total"] if part_total.any() else [])
    logger.info(
        "%s: a matrix of %d %s row(s) x %d column(s)%s%s",
        label,
        int((~margin_rows).sum()),
        default_label,
        len(cells),
        f"; margins {'checked and ' if check_totals else ''}dropped: {', '.join(margins)}"
        if margins
        else "",
        f"; {int(dropped.sum())} empty cell(s) read as not printed" if dropped.any() else "",
    )
    if off_diagonal and warn_empty:
        warnings.warn(
            f"{label}: {off_diagonal} empty cell(s) off the diagonal are read as not printed "
            "(unobserved). Fix: if the matrix prints zeros as empty cells, fill them with 0 or "
            "pass universe= so that absent pairs of the census countries are zeros.",
            UserWarning,
            stacklevel=3,
        )
    return long.loc[~dropped].reset_index(drop=True)


def _check_margins(
    label: str,
    codes: pd.Series,
    destinations: list[str],
    margin_rows: np.ndarray,
    value: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    table: pd.DataFrame,
    group_cols: list[str],
) -> None:
    """Raise when a matrix's margin lies outside what the cells it sums allow.

    ``group_cols`` (a period, the ``by`` columns) split the table into matrices
    printed one below the other, each with its own margins.
    """
    margin_cols = np.array([_is_margin(c) for c in destinations])
    data_row = table.index.to_numpy() + 1
    keys = (
        table[group_cols].astype(str).agg(" / ".join, axis=1).to_numpy()
        if group_cols
        else np.zeros(len(table), dtype=object)
    )
    bad: list[str] = []
    for g in pd.unique(keys):
        rows = keys == g
        inner = rows & ~margin_rows
        where = f" ({' / '.join(group_cols)} {g})" if group_cols else ""
        # a margin column: the sum of its row's cells
        for i in np.flatnonzero(inner):
            for j in np.flatnonzero(margin_cols):
                got, a, b = value[i, j], lo[i, ~margin_cols].sum(), hi[i, ~margin_cols].sum()
                if np.isfinite(got) and not a - 0.5 <= got <= b + 0.5:
                    bad.append(
                        f"row {codes.iat[i]!r} x column {destinations[j]!r}{where} (data row "
                        f"{data_row[i]}): {got:,.0f}, its row's cells {_range(a, b)}"
                    )
        # a margin row: the sum of its column's cells (the grand total included)
        for i in np.flatnonzero(rows & margin_rows):
            for j in range(len(destinations)):
                got, a, b = value[i, j], lo[inner, j].sum(), hi[inner, j].sum()
                if np.isfinite(got) and not a - 0.5 <= got <= b + 0.5:
                    bad.append(
                        f"row {codes.iat[i]!r} x column {destinations[j]!r}{where} (data row "
                        f"{data_row[i]}): {got:,.0f}, its column's cells {_range(a, b)}"
                    )
    if bad:
        raise CensusInputError(
            f"{label}: layout='wide': {len(bad)} margin(s) are not the sum of the cells they "
            f"total: {format_items(bad)}. Fix: check that every row and column sits under its own "
            "label (a shifted row or column, a missing one); a margin that also counts people "
            "the matrix leaves out (previous residence not stated, abroad) cannot be checked: "
            "pass check_totals=False (in a run config: options = { check_totals = false })."
        )


def _range(lo: float, hi: float) -> str:
    """``sum to 1,234``, ``sum to at least 1,200 and at most 1,260`` or ``sum to at least 1,200``."""
    if lo == hi:
        return f"sum to {lo:,.0f}"
    return f"sum to at least {lo:,.0f}" + ("" if np.isinf(hi) else f" and at most {hi:,.0f}")


def _check_duplicates(table: pd.DataFrame, keys: list[str], label: str, count: str) -> None:
    """Raise naming the rows of every pair that appears on more than one row."""
    dup = table.duplicated(keys, keep=False).to_numpy()
    if not dup.any():
        return
    exact, different = [], []
    rows = table.loc[dup].assign(_row=np.flatnonzero(dup) + 1)
    for key, group in rows.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        pair = "->".join(map(str, key[:2])) + (f" ({key[2]})" if len(key) > 2 else "")
        values = group["count"].astype(str).str.strip().tolist()
        where = f"{pair}: rows {group['_row'].tolist()}"
        if len(set(values)) == 1:
            exact.append(f"{where}, count {values[0]}")
        else:
            different.append(f"{where}, counts {values}")
    parts = []
    if exact:
        parts.append(
            f"{len(exact)} pair(s) on identical rows (a repeated export?) {format_items(exact)}"
        )
    if different:
        parts.append(f"{len(different)} pair(s) with different counts {format_items(different)}")
    raise CensusInputError(
        f"{label}: {'; '.join(parts)} (data rows; column {count!r}). Fix: keep one row per pair "
        "(and period); if the table splits pairs over several rows on purpose (by sex, age, "
        "...), pass duplicates='sum' to add them up."
    )


def _check_plausible(
    table: pd.DataFrame,
    fraction: np.ndarray,
    population: pd.Series,
    max_share: float,
    label: str,
    *,
    rows: bool,
) -> None:
    """Raise when a count exceeds ``max_share`` x sample fraction x the larger population of its pair.

    Movers of a pair lived in the origin and live in the destination, so their
    number cannot exceed both populations; the larger one (from rasters, an
    approximation) keeps the check lenient.
    """
    pop = pd.Series(np.asarray(population, dtype=float), index=population.index.astype(str))
    cap = np.fmax(
        table["origin"].map(pop).to_numpy(dtype=float),
        table["destination"].map(pop).to_numpy(dtype=float),
    )
    limit = max_share * np.asarray(fraction, dtype=float) * cap
    counts = table["count"].to_numpy(dtype=float)
    bad = np.isfinite(counts) & np.isfinite(limit) & (counts > limit)
    if not bad.any():
        return
    where = np.flatnonzero(bad)
    shown = []
    for i in where[:MAX_SHOWN]:
        at = f"data row {table.index[i] + 1}: " if rows else ""
        o, d = table["origin"].iat[i], table["destination"].iat[i]
        shown.append(
            f"{at}{o}->{d} count {counts[i]:.10g} > {limit[i]:.10g} "
            f"(population {cap[i]:.10g} x sample fraction {float(np.asarray(fraction)[i]):g})"
        )
    more = f" and {len(where) - MAX_SHOWN} more" if len(where) > MAX_SHOWN else ""
    raise CensusInputError(
        f"{label}: {len(where)} count(s) larger than the population of their units allows: "
        f"{'; '.join(shown)}{more}. Fix: correct the count (a typo, a total row?), the "
        "sample_fraction, or the population raster (a unit outside its extent has too small a "
        "population); max_share=None switches this check off."
    )


def _aggregate(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sum rows sharing a pair; a group with a censored cell stays censored."""
    if not table.duplicated(keys).any():
        return table
    censored = table["count"].isna() & table["max"].notna()
    unobserved = table["count"].isna() & table["max"].isna()
    has_min = "min" in table.columns
    work = table.assign(
        _upper=table["count"].fillna(table["max"]),
        _lower=table["count"].fillna(table["min"].fillna(0.0) if has_min else 0.0),
        _cens=censored,
        _unobs=unobserved,
    )
    extra = {c: "sum" for c in table.columns if c in ("weighted",)}
    grouped = (
        work.groupby(keys, sort=False, dropna=False)
        .agg(
            count=("count", "sum"),
            _upper=("_upper", "sum"),
            _lower=("_lower", "sum"),
            _cens=("_cens", "any"),
            _unobs=("_unobs", "any"),
            **{c: (c, how) for c, how in extra.items()},
        )
        .reset_index()
    )
    grouped["max"] = np.where(grouped["_cens"] & ~grouped["_unobs"], grouped["_upper"], np.nan)
    if has_min:
        grouped["min"] = np.where(grouped["_cens"] & ~grouped["_unobs"], grouped["_lower"], np.nan)
    grouped.loc[grouped["_cens"] | grouped["_unobs"], "count"] = np.nan
    return grouped.drop(columns=["_upper", "_lower", "_cens", "_unobs"])


def _order(table: pd.DataFrame) -> pd.DataFrame:
    keys = ["origin", "destination"] + (["period"] if "period" in table.columns else [])
    values = ("count", "max", "min", "weighted", "exposure")
    cols = keys + [c for c in values if c in table.columns]
    out = table[cols].sort_values(keys, kind="stable").reset_index(drop=True)
    for c in values:
        if c in out.columns:
            out[c] = out[c].astype(float)
    for c in keys:
        out[c] = out[c].astype(str)
    return out


# ----------------------------------------------------------------- person records
def read_census_persons(
    source: TableLike,
    units: Any,
    *,
    current: str = "current_unit",
    previous: str = "previous_unit",
    weight: str | None = "weight",
    period: str | None = None,
    mapping: Mapping[str, str] | pd.DataFrame | str | os.PathLike[str] | None = None,
    unmatched: Literal["error", "drop"] = "error",
    sample_fraction: float | Mapping[str, float] | None = None,
    universe: Universe = "within",
    countries: Sequence[str] | None = None,
    query: str | None = None,
    id_field: str = "unit_id",
    country_field: str = "country",
    population: pd.Series | None = None,
    max_share: float | None = 1.0,
    encoding: str = "utf-8",
    sep: str | None = None,
    origin_level: str = "unit",
) -> pd.DataFrame:
    """Aggregate IPUMS-style person records into a census flow table.

    Each record is one sampled person: previous residence = ``origin``,
    current residence = ``destination``. Stayers (same unit) fall on the
    diagonal and are dropped; they still count towards the sample fraction.

    Parameters
    ----------
    source
        CSV, Parquet or Feather file, or a DataFrame of person records.
    units
        Units table with ``id_field`` and ``country_field`` (the unit ids and
        their countries; used for codes and the universe).
    current, previous, weight, period
        Column names. ``weight`` = person weight (None: every weight is 1 /
        ``sample_fraction``).
    mapping, unmatched
        Code harmonisation, see :func:`harmonise_codes`; unmatched codes are
        reported with their number of persons.
    sample_fraction
        Share of the population sampled, scalar or ``country -> fraction``.
        Default: per census country (the destination's), the number of mover
        records divided by the sum of their weights (movers only, because
        stayers are often sampled at another rate; all records when a country
        has no movers).
    universe
        Pairs that are observed, and so hold an explicit 0 when no record names
        them (see :func:`census_universe`); default ``"within"``: both units in
        the same census country. Records outside it are dropped with a warning.
        None keeps only the pairs named by records (absent = unobserved).
    countries
        Census countries (default: the countries of the current residences).
    query
        Optional :meth:`pandas.DataFrame.query` filter on the records (e.g.
        ``"age >= 15"``) applied before aggregation.
    id_field, country_field
        Column names of ``units``.
    origin_level
        What ``previous`` codes: ``"unit"`` (default), ``"country"`` (e.g. the
        previous country of people who lived abroad, IPUMS ``MIGCTRY``) or a
        units field such as ``"admin1"``; cells then sum their member units
        (see :func:`read_census_od`). Records with an empty ``previous`` are
        skipped; ``universe`` takes ``"within"``, ``"destination"``,
        ``"abroad"`` or ``"all"``.

    Returns
    -------
    pandas.DataFrame
        ``origin``, ``destination``[, ``period``], ``count`` (unweighted
        movers), ``max`` (all NaN: person records are never suppressed),
        ``weighted`` (sum of weights), ``exposure`` (sample fraction of the
        destination's census).

    population, max_share
        Unit populations (indexed by unit id): a pair with more sampled movers
        than ``max_share`` x its sample fraction x the larger population of the
        pair is an error (see :func:`read_census_od`); None skips the check.
    encoding, sep
        Text encoding and delimiter of a CSV file (see :func:`read_census_od`).

    Raises
    ------
    InputFileError
        Missing, empty or unreadable file (wrong encoding), missing columns.
    CensusInputError
        Missing, non-numeric or non-positive weights; empty unit codes; bad or
        missing sample fractions; more movers than the population allows.
    UnitCodeError
        Unit codes matching no unit (unless ``unmatched="drop"``).
    """
    if origin_level != "unit":
        return _read_census_persons_cells(
            source,
            units,
            current=current,
            previous=previous,
            weight=weight,
            period=period,
            unmatched=unmatched,
            sample_fraction=sample_fraction,
            universe=universe,
            countries=countries,
            query=query,
            id_field=id_field,
            country_field=country_field,
            origin_level=origin_level,
            encoding=encoding,
            sep=sep,
        )
    table, label = read_table(source, "census person records", encoding=encoding, sep=sep)
    _require(
        table,
        {"current": current, "previous": previous, "weight": weight, "period": period},
        label,
    )
    if query:
        table = table.query(query)
    frame = pd.DataFrame(
        {
            "origin": _codes(table[previous], label, previous, "previous residence").to_numpy(),
            "destination": _codes(table[current], label, current, "current residence").to_numpy(),
        }
    )
    if period:
        frame["period"] = table[period].astype(str).to_numpy()
    if weight is not None:
        w = pd.to_numeric(table[weight], errors="coerce").to_numpy(dtype=float)
        bad = ~np.isfinite(w) | (w <= 0)
        if bad.any():
            rows = (table.index[bad] + 1).tolist()
            raise CensusInputError(
                f"{label}: column {weight!r}: {int(bad.sum())} missing, non-numeric or non-positive "
                f"weight(s) at data row(s) {format_items(rows)}. Fix: person weights must be > 0, or pass "
                "weight=None with sample_fraction=<share sampled>."
            )
        frame["weight"] = w
    elif sample_fraction is None:
        raise CensusInputError(
            f"{label}: weight=None needs sample_fraction=<share sampled>. Fix: pass the sample fraction."
        )
    country = _unit_country(units, id_field, country_field)
    frame = _to_unit_ids(frame, units, country, id_field, mapping, unmatched, label)
    frame["dest_country"] = frame["destination"].map(country).to_numpy()
    if weight is None:
        fr = _sample_fraction(sample_fraction, frame["dest_country"], label=label)
        frame["weight"] = 1.0 / fr

    # sample fraction per census country: mover records / sum of their weights (stayers may be
    # sampled at another rate); countries without movers fall back to all their records
    def _fraction(records: pd.DataFrame) -> dict[str, float]:
        g = records.groupby("dest_country")["weight"].agg(["size", "sum"])
        return (g["size"] / g["sum"]).to_dict()

    per_country = _fraction(frame) | _fraction(frame.loc[frame["origin"] != frame["destination"]])
    too_big = {c: round(f, 3) for c, f in per_country.items() if f > 1.0 + 1e-9}
    if sample_fraction is None and too_big:
        raise CensusInputError(
            f"{label}: weights imply a sample fraction above 1 in {too_big} (records / sum of weights). "
            "Fix: check the weight column (it must be the inverse sampling probability) or pass "
            "sample_fraction=."
        )
    cens = list(countries) if countries is not None else sorted(frame["dest_country"].unique())
    movers = frame.loc[frame["origin"] != frame["destination"]]
    keys = ["origin", "destination"] + (["period"] if period else [])
    flows = (
        movers.groupby(keys, sort=False)
        .agg(count=("weight", "size"), weighted=("weight", "sum"))
        .reset_index()
    )
    flows["count"] = flows["count"].astype(float)
    flows["max"] = np.nan
    if universe is not None:
        periods = sorted(frame["period"].unique()) if period else None
        flows = _apply_universe(
            flows, country, cens, universe, {"count": 0.0, "weighted": 0.0}, label, periods=periods
        )
    flows = flows.reset_index(drop=True)
    dest_country = flows["destination"].map(country)
    movers_all = frame.loc[frame["origin"] != frame["destination"], "weight"]
    overall = (
        float(len(movers_all) / movers_all.sum())
        if len(movers_all)
        else float(len(frame) / frame["weight"].sum())
    )
    fraction = _sample_fraction(sample_fraction, dest_country, per_country, label=label)
    fraction = np.where(np.isnan(fraction), overall, fraction)
    flows["exposure"] = fraction
    if population is not None and max_share is not None:
        _check_plausible(flows, fraction, population, max_share, label, rows=False)
    return _order(flows)


# ------------------------------------------------------------ cells at other levels
#: Which cells of a table at any level the census observes (zeros where absent).
CELL_UNIVERSES = ("within", "destination", "abroad", "all")


def _unit_labels(
    units: Any, level: str, id_field: str, country_field: str, label: str
) -> pd.Series:
    """Label of every unit (indexed by unit id) at ``level``: id, country or a units field."""
    country = _unit_country(units, id_field, country_field)
    if level == "unit":
        return pd.Series(country.index.to_numpy(), index=country.index)
    if level == "country":
        return country
    frame = pd.DataFrame(units)
    if id_field not in frame.columns and frame.index.name in (id_field, "unit"):
        frame = frame.reset_index().rename(columns={frame.index.name: id_field})
    if level not in frame.columns:
        fields = [c for c in frame.columns if c not in (id_field, country_field, "geometry")]
        raise CensusInputError(
            f"{label}: level {level!r} is not a field of the units (fields: {fields}). Fix: keep "
            f"it when loading the units (load_units(..., fields=[{level!r}]); in a run config "
            f"[units] fields = [{level!r}]), or use origin_level/destination_level 'unit' or "
            "'country'"
        )
    return pd.Series(
        frame[level].astype(str).to_numpy(), index=frame[id_field].astype(str).to_numpy()
    )


def _label_countries(labels: pd.Series, country: pd.Series, level: str, label: str) -> pd.Series:
    """Country of every label at ``level`` (a label spanning two countries is an error)."""
    pairs = pd.DataFrame({"label": labels.to_numpy(), "country": country.reindex(labels.index)})
    per = pairs.drop_duplicates().groupby("label")["country"]
    split = per.nunique()
    bad = split.index[split > 1].tolist()
    if bad:
        raise CensusInputError(
            f"{label}: {level} label(s) {format_items(bad)} contain units of several countries. Fix: make "
            f"the {level} codes unique per country (e.g. prefix them with the country code)"
        )
    return per.first()


def _cell_universe(
    o_labels: pd.Series,
    d_labels: pd.Series,
    country: pd.Series,
    countries: Sequence[str],
    universe: str,
    levels: tuple[str, str],
    label: str,
) -> pd.DataFrame:
    """Every (origin label, destination label) cell the census observes."""
    if universe not in CELL_UNIVERSES:
        raise CensusInputError(
            f"{label}: universe={universe!r} is not one of {list(CELL_UNIVERSES)}. Fix: e.g. "
            "'abroad' for a table of immigrants by previous country"
        )
    o_country = _label_countries(o_labels, country, levels[0], label)
    d_country = _label_countries(d_labels, country, levels[1], label)
    cells = pd.DataFrame(
        [(a, b) for a in o_country.index for b in d_country.index],
        columns=["origin", "destination"],
    )
    oc = o_country.reindex(cells["origin"]).to_numpy()
    dc = d_country.reindex(cells["destination"]).to_numpy()
    in_census = np.isin(dc, list(countries))
    keep = {
        "within": in_census & (oc == dc),
        "destination": in_census,
        "abroad": in_census & (oc != dc),
        "all": np.ones(len(cells), dtype=bool),
    }[universe]
    return cells.loc[keep].reset_index(drop=True)


def _drop_stayer_cells(
    table: pd.DataFrame,
    o_labels: pd.Series,
    d_labels: pd.Series,
    levels: tuple[str, str],
    label: str,
    warn: bool,
) -> pd.DataFrame:
    """Drop cells whose origin contains the destination (or vice versa): stayers mix in there."""
    origin = table["origin"].to_numpy()
    dest = table["destination"].to_numpy()
    if levels[1] == "unit":
        same = o_labels.reindex(dest).to_numpy() == origin
    elif levels[0] == "unit":
        same = d_labels.reindex(origin).to_numpy() == dest
    elif levels[0] == levels[1]:
        same = origin == dest
    else:
        same = np.zeros(len(table), dtype=bool)
    if same.any() and warn:
        warnings.warn(
            f"{label}: dropped {int(same.sum())} cell(s) whose origin contains the destination "
            "(a move within the region cannot be told from staying at this level)",
            UserWarning,
            stacklevel=3,
        )
    return table.loc[~same]


def _cells_output(table: pd.DataFrame, levels: tuple[str, str]) -> pd.DataFrame:
    out = _order(table)
    out.attrs.update(origin_level=levels[0], destination_level=levels[1])
    return out


def _read_census_od_cells(
    table: pd.DataFrame,
    label: str,
    *,
    units: Any,
    origin: str,
    destination: str,
    count: str,
    period: str | None,
    unmatched: Literal["error", "drop"],
    suppressed: Mapping[str, float | None] | None,
    suppressed_max: float | None,
    suppressed_min: float | None,
    sample_fraction: float | Mapping[str, float] | None,
    universe: str | None,
    countries: Sequence[str] | None,
    id_field: str,
    country_field: str,
    origin_level: str,
    destination_level: str,
    duplicates: str = "error",
) -> pd.DataFrame:
    """:func:`read_census_od` for a table (read) whose origins or destinations are not units."""
    if units is None:
        raise CensusInputError(
            f"{label}: origin_level/destination_level need the units table. Fix: pass units="
        )
    table = _od_columns(table, label, origin, destination, count, period)
    counts, bounds = parse_counts(
        table["count"],
        suppressed=suppressed,
        suppressed_max=suppressed_max,
        label=f"{label}: column {count!r}",
    )
    table["count"], table["max"] = counts, bounds
    keys = ["origin", "destination"] + (["period"] if period else [])
    if duplicates not in ("error", "sum"):
        raise CensusInputError(f"{label}: duplicates={duplicates!r}; use 'error' or 'sum'.")
    if duplicates == "error":
        _check_duplicates(table, keys, label, count)
    censored = np.isnan(counts) & ~np.isnan(bounds)
    if suppressed_min:
        table["min"] = np.where(censored, float(suppressed_min), np.nan)
    country = _unit_country(units, id_field, country_field)
    levels = (origin_level, destination_level)
    o_labels = _unit_labels(units, origin_level, id_field, country_field, label)
    d_labels = _unit_labels(units, destination_level, id_field, country_field, label)
    every = {"unit": set(country.index), "country": set(country)}
    for col, labels, level in (
        ("origin", o_labels, origin_level),
        ("destination", d_labels, destination_level),
    ):
        table = harmonise_codes(
            table,
            sorted(set(labels)),
            columns=[col],
            unmatched=unmatched,
            label=label,
            other_levels={k: v for k, v in every.items() if k != level},
            unit_names=_unit_names(units, id_field) if level == "unit" else None,
        )
    table = _drop_stayer_cells(table, o_labels, d_labels, levels, label, warn=True)
    table = _aggregate(table, ["origin", "destination"] + (["period"] if period else []))
    d_country = _label_countries(d_labels, country, destination_level, label)
    if universe is not None:
        cens = (
            list(countries)
            if countries is not None
            else sorted(set(d_country.reindex(table["destination"]).dropna()))
        )
        cells = _cell_universe(o_labels, d_labels, country, cens, universe, levels, label)
        cells = _drop_stayer_cells(cells, o_labels, d_labels, levels, label, warn=False)
        keys = ["origin", "destination"]
        inside = table.merge(cells.assign(_in=True), on=keys, how="left")["_in"].fillna(False)
        if not inside.to_numpy(bool).all():
            warnings.warn(
                f"{label}: {int((~inside).sum())} row(s) lie outside the universe "
                f"{universe!r} and were dropped",
                UserWarning,
                stacklevel=3,
            )
            table = table.loc[inside.to_numpy(bool)]
        table = cells.merge(table, on=keys, how="left")
        absent = table["count"].isna() & table["max"].isna()
        table.loc[absent, "count"] = 0.0
    table = table.reset_index(drop=True)
    table["exposure"] = _sample_fraction(
        1.0 if sample_fraction is None else sample_fraction,
        d_country.reindex(table["destination"]).reset_index(drop=True),
    )
    return _cells_output(table, levels)


def _read_census_persons_cells(
    source: TableLike,
    units: Any,
    *,
    current: str,
    previous: str,
    weight: str | None,
    period: str | None,
    unmatched: Literal["error", "drop"],
    sample_fraction: float | Mapping[str, float] | None,
    universe: str | None,
    countries: Sequence[str] | None,
    query: str | None,
    id_field: str,
    country_field: str,
    origin_level: str,
    encoding: str = "utf-8",
    sep: str | None = None,
) -> pd.DataFrame:
    """:func:`read_census_persons` for records whose previous residence is coded coarser.

    Records whose previous label is empty are not coded at this level and are
    skipped; a record whose previous label contains its current unit (a stayer,
    or a move within the region) is not a migrant at this level.
    """
    table, label = read_table(source, "census person records", encoding=encoding, sep=sep)
    _require(
        table,
        {"current": current, "previous": previous, "weight": weight, "period": period},
        label,
    )
    if query:
        table = table.query(query)
    prev = table[previous].astype(str).str.strip()
    table = table.loc[(prev != "") & (prev.str.lower() != "nan")]
    frame = pd.DataFrame(
        {
            "origin": table[previous].astype(str).str.strip().to_numpy(),
            "destination": table[current].astype(str).str.strip().to_numpy(),
        }
    )
    if period:
        frame["period"] = table[period].astype(str).to_numpy()
    country = _unit_country(units, id_field, country_field)
    if weight is not None:
        w = pd.to_numeric(table[weight], errors="coerce").to_numpy(dtype=float)
        if (~np.isfinite(w) | (w <= 0)).any():
            raise CensusInputError(
                f"{label}: column {weight!r}: missing, non-numeric or non-positive weights. "
                "Fix: person weights must be > 0, or pass weight=None with sample_fraction="
            )
        frame["weight"] = w
    elif sample_fraction is None:
        raise CensusInputError(
            f"{label}: weight=None needs sample_fraction=<share sampled>. Fix: pass it."
        )
    levels = (origin_level, "unit")
    o_labels = _unit_labels(units, origin_level, id_field, country_field, label)
    d_labels = _unit_labels(units, "unit", id_field, country_field, label)
    frame = harmonise_codes(
        frame, sorted(set(o_labels)), columns=["origin"], unmatched=unmatched, label=label
    )
    frame = harmonise_codes(
        frame, country.index, columns=["destination"], unmatched=unmatched, label=label
    )
    frame["dest_country"] = frame["destination"].map(country).to_numpy()
    if weight is None:
        frame["weight"] = 1.0 / _sample_fraction(sample_fraction, frame["dest_country"])
    movers = _drop_stayer_cells(frame, o_labels, d_labels, levels, label, warn=False)
    keys = ["origin", "destination"] + (["period"] if period else [])
    flows = (
        movers.groupby(keys, sort=False)
        .agg(count=("weight", "size"), weighted=("weight", "sum"))
        .reset_index()
    )
    flows["count"] = flows["count"].astype(float)
    flows["max"] = np.nan
    if universe is not None:
        cens = list(countries) if countries is not None else sorted(frame["dest_country"].unique())
        cells = _cell_universe(o_labels, d_labels, country, cens, universe, levels, label)
        cells = _drop_stayer_cells(cells, o_labels, d_labels, levels, label, warn=False)
        flows = cells.merge(flows, on=["origin", "destination"], how="left")
        absent = flows["count"].isna()
        flows.loc[absent, ["count", "weighted"]] = 0.0
    g = movers.groupby("dest_country")["weight"].agg(["size", "sum"])
    per_country = (g["size"] / g["sum"]).to_dict()
    if sample_fraction is not None:
        fraction = _sample_fraction(sample_fraction, flows["destination"].map(country))
    else:
        overall = float(len(movers) / movers["weight"].sum()) if len(movers) else 1.0
        fraction = flows["destination"].map(country).map(per_country).fillna(overall).to_numpy()
    flows["exposure"] = fraction
    return _cells_output(flows.reset_index(drop=True), levels)
