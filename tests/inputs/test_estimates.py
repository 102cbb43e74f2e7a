"""Published estimates with their uncertainty -> a long table (kind = "estimates")."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flowmodel.dataset import build_dataset, estimates_to_dataset
from flowmodel.exceptions import InputFileError
from flowmodel.inputs.estimates import read_estimates


@pytest.fixture
def units() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "unit_id": ["A1", "A2", "B1"],
            "country": ["AAA", "AAA", "BBB"],
            "lon": [30.0, 30.5, 32.0],
            "lat": [0.0, 0.5, 0.0],
            "population": [1e4, 2e4, 3e4],
        }
    )


def test_estimates_with_standard_errors_or_one_relative_error(units, tmp_path):
    path = tmp_path / "estimates.csv"
    path.write_text('from,to,flow,sd\nAAA,BBB,"1,200",150\nBBB,AAA,80.5,20\n')
    table = read_estimates(path, origin="from", destination="to", estimate="flow", se="sd")
    assert table[["origin", "destination"]].values.tolist() == [["AAA", "BBB"], ["BBB", "AAA"]]
    np.testing.assert_array_equal(table["estimate"], [1200.0, 80.5])
    np.testing.assert_array_equal(table["se"], [150.0, 20.0])
    assert table.attrs == {"origin_level": "country", "destination_level": "country"}
    # no se column: one log-scale error for every row, se = estimate * sqrt(exp(s^2) - 1)
    rel = read_estimates(path, origin="from", destination="to", estimate="flow", rel_sd=0.1)
    np.testing.assert_allclose(rel["se"] / rel["estimate"], np.sqrt(np.expm1(0.01)))
    ds = estimates_to_dataset(
        build_dataset(units),
        table,
        name="pub",
        origin_level="country",
        destination_level="country",
    )
    assert sorted(ds["estimate_pub"].values.tolist()) == [80.5, 1200.0]


def test_estimates_from_a_workbook_at_the_unit_level(tmp_path):
    path = tmp_path / "dtm.xlsx"
    with pd.ExcelWriter(path) as xl:
        pd.DataFrame([["Displacement tracking, round 12"]]).to_excel(xl, index=False, header=False)
        pd.DataFrame(
            {"origin": ["A1"], "destination": ["A2"], "estimate": [300], "se": [40]}
        ).to_excel(xl, index=False, startrow=2)
    table = read_estimates(path, header_row=3, origin_level="unit", destination_level="unit")
    assert table["estimate"].tolist() == [300.0] and table.attrs["origin_level"] == "unit"


def test_bad_estimates_name_the_file_column_and_rows(tmp_path):
    path = tmp_path / "estimates.csv"
    path.write_text("origin,destination,estimate,se\nAAA,BBB,n/a,5\nBBB,AAA,0,5\n")
    with pytest.raises(
        InputFileError,
        match=r"estimates\.csv: column 'estimate' has 1 value\(s\) that are not numbers "
        r"\(\['n/a'\]\) at data row\(s\) \[1\]",
    ):
        read_estimates(path)
    path.write_text("origin,destination,estimate,se\nAAA,BBB,10,5\nBBB,AAA,0,5\n")
    with pytest.raises(
        InputFileError,
        match=r"1 row\(s\) with an estimate or standard error that is not > 0, at data row\(s\) \[2\]",
    ):
        read_estimates(path)
    path.write_text("origin,destination,estimate\nAAA,BBB,10\n")
    with pytest.raises(
        InputFileError, match=r"no standard-error column 'se' and rel_sd=None.*rel_sd=0\.1"
    ):
        read_estimates(path)
    with pytest.raises(InputFileError, match=r"missing column\(s\) \{'estimate': 'value'\}"):
        read_estimates(path, estimate="value", rel_sd=0.1)
