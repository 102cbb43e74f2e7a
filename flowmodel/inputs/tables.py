"""Reading the tables statistical offices publish: CSV, Excel workbooks, Parquet, Feather.

:func:`read_table` is the one reader of tabular inputs (census tables, code mappings,
published estimates): text cells (so that suppression markers survive), the CSV
delimiter detected, a named error for a wrong encoding, a sheet of an ``.xlsx``
workbook, title lines above the header skipped (``header_row``), and empty unnamed
columns (trailing delimiters, formatted empty spreadsheet columns) dropped.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from flowmodel.exceptions import InputFileError

__all__ = ["MAX_SHOWN", "WORKBOOKS", "TableLike", "format_items", "parse_numbers", "read_table"]

TableLike = str | os.PathLike[str] | pd.DataFrame

#: How many items (rows, codes, values) an error message lists before "and N more"
MAX_SHOWN = 10


def format_items(items: Mapping[Any, Any] | Sequence[Any], what: str = "") -> str:
    """Return ``[a, b, ... and 3 more]`` for a message; a mapping as ``[key (value what), ...]``."""
    if isinstance(items, Mapping):
        pairs = list(items.items())
        shown = ", ".join(f"{k!s} ({v} {what})".replace(" )", ")") for k, v in pairs[:MAX_SHOWN])
        n = len(pairs)
    else:
        items = list(items)
        shown = ", ".join(str(i) for i in items[:MAX_SHOWN])
        n = len(items)
    more = f" and {n - MAX_SHOWN} more" if n > MAX_SHOWN else ""
    return f"[{shown}{more}]"


def _sniff_delimiter(path: Path, encoding: str, what: str, skip: int = 0) -> str:
    """Return the delimiter of a CSV file (``,``, ``;``, tab or ``|``) from its first lines.

    ``skip``: lines above the header (a title) that are left out of the sample.
    """
    with open(path, encoding=encoding, newline="") as fh:
        sample = fh.read(1 << 16)
    if skip:
        sample = "".join(sample.splitlines(keepends=True)[skip:])
    if not sample.strip():
        raise InputFileError(
            f"{path}: the {what} file is empty. Fix: check the export (a header line and one "
            "row per cell are expected)."
        )
    try:
        return csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
    except csv.Error:
        return ","  # one column, or too irregular to tell: pandas reports what it finds


#: Spreadsheet workbooks read with openpyxl (``pandas.read_excel``)
WORKBOOKS: tuple[str, ...] = (".xlsx", ".xlsm")


def _read_workbook(path: Path, what: str, sheet: str | int | None, skip: int) -> pd.DataFrame:
    """Read one sheet of a workbook as text (``sheet``: a name or a 0-based position)."""
    import openpyxl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # openpyxl on styles and data validation it ignores
        names = openpyxl.load_workbook(path, read_only=True).sheetnames
        if (
            sheet is not None
            and sheet not in names
            and not (isinstance(sheet, int) and 0 <= sheet < len(names))
        ):
            raise InputFileError(
                f"{path}: the {what} workbook has no sheet {sheet!r} (sheets: {names}). Fix: pass "
                "sheet=<name or 0-based position>."
            )
        return pd.read_excel(
            path,
            sheet_name=0 if sheet is None else sheet,
            header=skip,
            dtype=str,
            keep_default_na=False,
        )


def read_table(
    source: TableLike,
    what: str,
    *,
    encoding: str = "utf-8",
    sep: str | None = None,
    sheet: str | int | None = None,
    header_row: int = 1,
) -> tuple[pd.DataFrame, str]:
    """Read a CSV/Excel/Parquet/Feather file or copy a DataFrame; return it and a label.

    ``what`` names the table in messages (``"census OD"``); the label is the file's
    path (``"<what> table"`` for a DataFrame).

    CSV files are read as text (``encoding``; a UTF-8 byte-order mark is
    dropped) with the delimiter ``sep``, or the one :class:`csv.Sniffer` finds
    (``,``, ``;``, tab, ``|``) when None; ``.xlsx`` workbooks as text from
    ``sheet`` (default the first). ``header_row`` is the 1-based line (CSV) or
    spreadsheet row holding the column names (title lines above it are skipped).
    Columns without a name and without a value (a trailing delimiter, formatted
    empty spreadsheet columns) are dropped. Rows get a 0-based index (data row - 1).
    """
    if isinstance(source, pd.DataFrame):
        if sheet is not None or header_row != 1:
            raise InputFileError(
                f"{what} table: sheet= and header_row= apply to files, not to a DataFrame. Fix: "
                "drop them (pandas.read_excel(..., sheet_name=, header=) reads a sheet)."
            )
        return source.reset_index(drop=True), f"{what} table"
    path = Path(source)
    if not path.exists():
        raise InputFileError(f"{path}: no such {what} file. Fix: check the path.")
    if path.is_file() and path.stat().st_size == 0:
        raise InputFileError(
            f"{path}: the {what} file is empty (0 bytes). Fix: check the export or the path."
        )
    if not isinstance(header_row, int) or header_row < 1:
        raise InputFileError(
            f"{path}: header_row={header_row!r}: the 1-based row of the column names. Fix: "
            "pass a whole number >= 1 (1: the first row)."
        )
    suffix = "".join(path.suffixes[-2:]).lower()
    if sheet is not None and not suffix.endswith(WORKBOOKS):
        raise InputFileError(
            f"{path}: sheet={sheet!r} applies to .xlsx workbooks only. Fix: drop sheet=."
        )
    if suffix.endswith((".xls", ".ods")):
        raise InputFileError(
            f"{path}: old Excel (.xls) and OpenDocument (.ods) files are not read. Fix: save the "
            "sheet as .xlsx or CSV."
        )
    text_encoding = (
        "utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding
    )
    skip = header_row - 1
    try:
        if suffix.endswith((".parquet", ".pq")):
            table = pd.read_parquet(path)
        elif suffix.endswith((".feather", ".arrow", ".ipc")):
            table = pd.read_feather(path)
        elif suffix.endswith(WORKBOOKS):
            table = _read_workbook(path, what, sheet, skip)
        else:
            compressed = path.suffix.lower() in (".gz", ".bz2", ".zip", ".xz", ".zst")
            delimiter = (
                sep
                if sep is not None
                else ","
                if compressed
                else _sniff_delimiter(path, text_encoding, what, skip)
            )
            table = pd.read_csv(
                path,
                dtype=str,
                keep_default_na=False,
                sep=delimiter,
                encoding=text_encoding,
                skiprows=skip,
            )
    except InputFileError:
        raise
    except UnicodeDecodeError as err:
        raise InputFileError(
            f"{path}: the {what} file is not {encoding} text (byte 0x{err.object[err.start]:02x} "
            f"at offset {err.start}). Fix: pass its encoding, e.g. encoding='latin-1' (in a run "
            'config: options = { encoding = "latin-1" }), or save it as UTF-8.'
        ) from None
    except (OSError, ValueError, KeyError) as err:
        reason = " ".join(str(err).split())[:200]
        raise InputFileError(
            f"{path}: cannot read {what} file ({type(err).__name__}: {reason}). Fix: give a CSV "
            "(any of , ; tab | as delimiter, or pass sep=), .xlsx, Parquet or Feather table"
            + (", and header_row= the row of the column names" if skip else "")
            + "."
        ) from err
    empty_cols = [
        c
        for c in table.columns
        if str(c).startswith("Unnamed:") and table[c].astype("string").fillna("").eq("").all()
    ]
    table = table.drop(columns=empty_cols)
    if table.empty:
        raise InputFileError(f"{path}: the {what} file has no rows. Fix: check the export.")
    return table.reset_index(drop=True), str(path)


_THOUSANDS = re.compile(r"^\d{1,3}(?:,\d{3})+(?:\.\d*)?$")


def parse_numbers(values: pd.Series, label: str, column: str) -> np.ndarray:
    """Parse a column of numbers (``1,234.5`` too); raise naming the rows of anything else.

    ``values`` is a table's column (its index: data row - 1, as :func:`read_table` gives);
    ``label`` and ``column`` name the file and column in the error.
    """
    text = values.astype("string").str.strip().fillna("")
    plain = text.where(~text.str.match(_THOUSANDS), text.str.replace(",", "", regex=False))
    out = pd.to_numeric(plain, errors="coerce").to_numpy(dtype=float)
    bad = np.isnan(out)
    if bad.any():
        rows = (values.index[bad] + 1).tolist()
        shown = sorted(set(text[bad].replace("", "<empty>")))[:5]
        raise InputFileError(
            f"{label}: column {column!r} has {int(bad.sum())} value(s) that are not numbers "
            f"({shown}) at data row(s) {format_items(rows)}. Fix: "
            "give every value as a number (a decimal point, not a comma), or drop the rows "
            "with none."
        )
    return out
