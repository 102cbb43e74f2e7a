"""Published estimates of flows with their uncertainty -> a long table of estimates.

Bilateral migration-flow estimates by country pair, survey estimates of admin-1
flows, displacement-tracking figures: each row an estimate of the sum of the latent
flow over its cell (an origin and a destination at any level) with a standard error
(or one relative error for every row). :func:`flowmodel.dataset.estimates_to_dataset`
adds the table to a FlowDataset as ``estimate_<name>``, which every fusion model uses
as a log-normal observation (docs/models.md). In a run config: ``kind = "estimates"``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from flowmodel.exceptions import InputFileError
from flowmodel.inputs.tables import TableLike, format_items, parse_numbers, read_table

__all__ = ["read_estimates"]


def read_estimates(
    source: TableLike,
    *,
    origin: str = "origin",
    destination: str = "destination",
    estimate: str = "estimate",
    se: str | None = "se",
    origin_level: str = "country",
    destination_level: str = "country",
    rel_sd: float | None = None,
    encoding: str = "utf-8",
    sep: str | None = None,
    sheet: str | int | None = None,
    header_row: int = 1,
) -> pd.DataFrame:
    """Read a table of published estimates (persons) with their standard errors.

    Parameters
    ----------
    source
        CSV, Excel (``.xlsx``), Parquet or Feather file, or a DataFrame.
    origin, destination, estimate
        Column names: the labels of each cell, the estimate (persons, > 0).
    se
        Column of standard errors (persons, > 0). When the table has no such
        column, ``rel_sd`` gives every estimate the same log-scale error.
    origin_level, destination_level
        What the labels name: ``"country"`` (default), ``"unit"`` or a field of
        the units (e.g. ``"admin1"``); checked when the table joins a dataset.
    rel_sd
        Log-scale error of every estimate when there is no ``se`` column (0.1:
        about ±10%); ignored when there is one.
    encoding, sep, sheet, header_row
        How the file is read (:func:`flowmodel.inputs.tables.read_table`).

    Returns
    -------
    pandas.DataFrame
        ``origin``, ``destination`` (str), ``estimate``, ``se`` (float), with
        ``attrs["origin_level"]`` and ``attrs["destination_level"]``.

    Raises
    ------
    InputFileError
        An unreadable file, a missing column, a value that is not a number, an
        estimate or standard error that is not > 0, no ``se`` column and no
        ``rel_sd``: naming the file, the column and the data rows.
    """
    table, label = read_table(
        source, "estimates", encoding=encoding, sep=sep, sheet=sheet, header_row=header_row
    )
    wanted = {"origin": origin, "destination": destination, "estimate": estimate}
    has_se = se is not None and se in table.columns
    if has_se:
        wanted["se"] = se
    missing = {role: col for role, col in wanted.items() if col not in table.columns}
    if missing:
        raise InputFileError(
            f"{label}: missing column(s) {missing} (columns: {list(table.columns)}). Fix: name "
            "them with options origin=, destination=, estimate=, se=."
        )
    if not has_se and not (rel_sd is not None and rel_sd > 0):
        raise InputFileError(
            f"{label}: no standard-error column {se!r} and rel_sd={rel_sd}. Fix: name the "
            "column with se=, or give every estimate one log-scale error, e.g. rel_sd=0.1."
        )
    out = pd.DataFrame(
        {
            "origin": table[origin].astype(str).str.strip(),
            "destination": table[destination].astype(str).str.strip(),
            "estimate": parse_numbers(table[estimate], label, estimate),
        },
        index=table.index,
    )
    if has_se:
        out["se"] = parse_numbers(table[se], label, str(se))
    else:
        out["se"] = out["estimate"] * np.sqrt(np.expm1(float(rel_sd) ** 2))
    bad = ~((out["estimate"] > 0) & (out["se"] > 0)).to_numpy()
    if bad.any():
        rows = (out.index[bad] + 1).tolist()
        raise InputFileError(
            f"{label}: {int(bad.sum())} row(s) with an estimate or standard error that is not "
            f"> 0, at data row(s) {format_items(rows)}: a log-normal "
            "observation needs both positive. Fix: drop unknown or zero cells from the table."
        )
    out = out.reset_index(drop=True)
    out.attrs = {"origin_level": origin_level, "destination_level": destination_level}
    return out
