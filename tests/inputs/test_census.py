"""Census OD tables and person records -> flow tables (issue 5)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

from flowmodel.dataset import build_dataset, flow_sources, validate_dataset
from flowmodel.exceptions import (
    CensusInputError,
    DataContractError,
    InputFileError,
    UnitCodeError,
)
from flowmodel.inputs.census import (
    census_universe,
    harmonise_codes,
    parse_counts,
    read_census_od,
    read_census_persons,
)


@pytest.fixture
def units() -> pd.DataFrame:
    """Three units in AAA, two in BBB, one in CCC, with coordinates for build_dataset."""
    return pd.DataFrame(
        {
            "unit_id": ["A1", "A2", "A3", "B1", "B2", "C1"],
            "country": ["AAA", "AAA", "AAA", "BBB", "BBB", "CCC"],
            "population": [1e4, 2e4, 3e4, 1e4, 5e3, 8e3],
            "lon": [30.0, 30.5, 31.0, 32.0, 32.5, 33.0],
            "lat": [0.0, 0.5, 1.0, 0.0, 0.5, 1.0],
        }
    )


def pairs(table: pd.DataFrame) -> set[tuple[str, str]]:
    return set(zip(table["origin"], table["destination"], strict=True))


# ------------------------------------------------------------------------- counts
def test_parse_counts_markers_and_bounds():
    count, bound = parse_counts(["12", "<5", "0", "<=3", "x", "1,204", 7], suppressed_max=9)
    assert count[[0, 2, 5, 6]].tolist() == [12, 0, 1204, 7]
    assert np.isnan(count[[1, 3, 4]]).all()
    assert bound[1] == 4 and bound[3] == 3 and bound[4] == 9
    assert np.isnan(bound[[0, 2, 5, 6]]).all()
    custom, cb = parse_counts(["-", "3"], suppressed={"-": 2})
    assert np.isnan(custom[0]) and cb[0] == 2


def test_parse_counts_errors_and_warnings():
    with pytest.raises(
        CensusInputError, match=r"neither counts nor suppression markers: \[n/a \(2 rows\)"
    ):
        parse_counts(["3", "n/a", "n/a"])
    with pytest.raises(CensusInputError, match=r"an empty cell is not a zero"):
        parse_counts(["3", ""])
    with pytest.raises(CensusInputError, match=r"1 negative count\(s\) at data row\(s\) \[2\]"):
        parse_counts(["3", "-1"])
    with pytest.warns(UserWarning, match=r"1 suppressed cell\(s\) carry no bound.*suppressed_max"):
        count, bound = parse_counts(["..", "4"])
    assert np.isnan(count[0]) and np.isnan(bound[0])


# --------------------------------------------------------------------- OD tables
def test_census_od_suppressed_cells_are_censored_never_zero(units, tmp_path):
    path = tmp_path / "od.csv"
    pd.DataFrame(
        {
            "origin": ["A1", "A1", "A2", "A2", "A3", "A3"],
            "destination": ["A2", "A3", "A1", "A3", "A1", "A2"],
            "count": ["10", "<5", "0", "..", "7", "3"],
        }
    ).to_csv(path, index=False)
    with pytest.warns(
        UserWarning, match=r"1 explicit zero\(s\) and 2 suppressed.*suppressed_min=1"
    ):
        table = read_census_od(path, units=units, suppressed_max=4, sample_fraction=0.1)
    t = table.set_index(["origin", "destination"])
    assert list(table.columns) == ["origin", "destination", "count", "max", "exposure"]
    assert t.loc[("A1", "A2"), "count"] == 10
    assert np.isnan(t.loc[("A1", "A3"), "count"]) and t.loc[("A1", "A3"), "max"] == 4
    assert t.loc[("A2", "A1"), "count"] == 0 and np.isnan(t.loc[("A2", "A1"), "max"])
    assert np.isnan(t.loc[("A2", "A3"), "count"]) and t.loc[("A2", "A3"), "max"] == 4
    assert (table["exposure"] == 0.1).all()
    ds = build_dataset(units, flows={"census": table})
    assert float(ds["flow_census_max"].sel(origin="A1", destination="A3")) == 4
    assert np.isnan(float(ds["flow_census"].sel(origin="A1", destination="A3")))
    assert float(ds["flow_census"].sel(origin="A2", destination="A1")) == 0
    assert np.isnan(
        float(ds["flow_census"].sel(origin="B1", destination="A1"))
    )  # not in the table


def test_census_od_suppressed_min_bounds_cells_from_below(units):
    # zeros printed as "0": "<5" can only be 1..4, and the dataset carries the lower bound
    table = pd.DataFrame(
        {
            "origin": ["A1", "A1", "A2", "A2"],
            "destination": ["A2", "A3", "A1", "A1"],
            "count": ["0", "<5", "<5", "2"],
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "explicit zeros" warning once suppressed_min is given
        out = read_census_od(table, units=units, suppressed_min=1, duplicates="sum")
    t = out.set_index(["origin", "destination"])
    assert list(out.columns) == ["origin", "destination", "count", "max", "min", "exposure"]
    assert t.loc[("A1", "A3"), "min"] == 1 and t.loc[("A1", "A3"), "max"] == 4
    assert np.isnan(t.loc[("A1", "A2"), "min"]) and t.loc[("A1", "A2"), "count"] == 0
    # a pair split over two rows is summed (duplicates="sum"): "<5" + 2 holds 3..6
    assert t.loc[("A2", "A1"), "min"] == 3 and t.loc[("A2", "A1"), "max"] == 6
    ds = build_dataset(units, flows={"census": out})
    assert float(ds["flow_census_min"].sel(origin="A1", destination="A3")) == 1
    assert "census" in flow_sources(ds) and "census_min" not in flow_sources(ds)
    from flowmodel.models.observations import read_cells

    pairs = read_cells(ds, "census")
    censored = ~pairs.observed
    assert sorted(pairs.lower[censored].tolist()) == [1.0, 3.0]
    assert (pairs.lower[~censored] == 0).all()
    with pytest.raises(CensusInputError, match=r"suppressed_min=5.*<= every suppression bound"):
        read_census_od(table, units=units, suppressed_min=5, duplicates="sum")
    bad = ds.copy()
    bad["flow_census_min"] = (
        bad["flow_census_min"].fillna(0).where(bad["flow_census"].isnull(), 1.0)
    )
    with pytest.raises(DataContractError, match=r"flow_census_min"):
        validate_dataset(bad)


def test_census_od_universe_fills_zeros(units):
    table = pd.DataFrame({"origin": ["A1", "B1"], "destination": ["A2", "B2"], "count": [5, "<5"]})
    out = read_census_od(table, units=units, universe="within")
    assert len(out) == 3 * 2 + 2 * 1  # within AAA and BBB
    t = out.set_index(["origin", "destination"])
    assert t.loc[("A3", "A1"), "count"] == 0
    assert np.isnan(t.loc[("B1", "B2"), "count"]) and t.loc[("B1", "B2"), "max"] == 4
    assert read_census_od(table).shape[0] == 2  # default: absent = unobserved


def test_census_od_period_and_parquet(units, tmp_path):
    table = pd.DataFrame(
        {"from": ["A1", "A1"], "to": ["A2", "A2"], "n": [3, 8], "year": [2010, 2020]}
    )
    table.to_parquet(tmp_path / "od.parquet")
    out = read_census_od(
        tmp_path / "od.parquet", origin="from", destination="to", count="n", period="year"
    )
    assert out["period"].tolist() == ["2010", "2020"] and out["count"].tolist() == [3, 8]


def test_census_od_bad_inputs(units, tmp_path):
    table = pd.DataFrame({"origin": ["A1", "A2"], "destination": ["A2", "A1"], "count": [3, -2]})
    with pytest.raises(CensusInputError, match="negative count"):
        read_census_od(table)
    with pytest.raises(InputFileError, match=r"missing column\(s\) count='flows'"):
        read_census_od(table, count="flows")
    with pytest.raises(InputFileError, match="no such census OD file"):
        read_census_od(tmp_path / "nope.csv")
    with pytest.raises(CensusInputError, match=r"sample_fraction: values must be in \(0, 1\]"):
        read_census_od(table.assign(count=[1, 2]), sample_fraction=5)
    with pytest.warns(UserWarning, match=r"dropped 1 diagonal row"):
        out = read_census_od(
            pd.DataFrame({"origin": ["A1", "A1"], "destination": ["A1", "A2"], "count": [9, 1]})
        )
    assert pairs(out) == {("A1", "A2")}


# ------------------------------------------------------------------ harmonisation
def test_unmatched_codes_error_with_counts_or_drop(units):
    table = pd.DataFrame(
        {
            "origin": ["A1", "X9", "X9", "A2"],
            "destination": ["A2", "A1", "A2", "Y7"],
            "count": [1, 2, 3, 4],
        }
    )
    with pytest.raises(
        UnitCodeError,
        match=r"2 unit code\(s\) match no unit id \(3 of 4 rows\).*origin=X9 \(2 rows\).*destination=Y7 \(1 rows\)",
    ):
        read_census_od(table, units=units)
    with pytest.warns(UserWarning, match=r"origin=X9 \(2 rows\).*dropped"):
        out = read_census_od(table, units=units, unmatched="drop")
    assert pairs(out) == {("A1", "A2")}


def test_unmatched_codes_say_what_they_look_like(units):
    """Codes that a spreadsheet turned into numbers, spelt otherwise, or of another level."""
    ids = pd.DataFrame(
        {"unit_id": ["01", "02", "São Paulo", "Rio-de-Janeiro"], "country": ["BRA"] * 4}
    )
    table = pd.DataFrame(
        {
            "origin": ["1", "2.0", "SAO PAULO", "rio de janeiro", "Z9"],
            "destination": ["02", "01", "01", "02", "01"],
            "count": [5, 6, 7, 8, 9],
        }
    )
    with pytest.raises(UnitCodeError) as err:
        read_census_od(table, units=ids)
    msg = str(err.value)
    assert "5 unit code(s) match no unit id" in msg
    assert (
        "2 of 'origin' are unit ids' numbers written another way ('1' for '01', '2.0' for '02')"
        in msg
    )
    assert (
        "2 of 'origin' differ from unit ids only in case, accents or punctuation "
        "('SAO PAULO' for 'São Paulo', 'rio de janeiro' for 'Rio-de-Janeiro')"
    ) in msg
    assert "'Z9' for" not in msg  # a code like nothing gets no hint
    # a table by unit names where the boundaries carry codes
    named = units.assign(name=["Alto", "Águas", "Arco", "Baía", "Bela", "Cima"])
    by_name = pd.DataFrame(
        {"origin": ["ALTO", "Aguas"], "destination": ["A3", "A3"], "count": [1, 2]}
    )
    with pytest.raises(UnitCodeError) as err:
        read_census_od(by_name.assign(origin=["Águas", "ALTO"]), units=named)
    msg = str(err.value)
    assert "1 of 'origin' are unit names ('Águas' for 'A2'); map names to ids: mapping=" in msg
    assert (
        "1 of 'origin' are unit names in another case or without accents ('ALTO' for 'A1')" in msg
    )
    mapping = named[["name", "unit_id"]].rename(columns={"name": "code"})
    assert pairs(
        read_census_od(by_name.assign(origin=["Alto", "Águas"]), units=named, mapping=mapping)
    ) == {
        ("A1", "A3"),
        ("A2", "A3"),
    }
    # immigrants' previous country read as if it were a unit
    abroad = pd.DataFrame({"origin": ["BBB", "CCC"], "destination": ["A1", "A2"], "count": [3, 4]})
    with pytest.raises(
        UnitCodeError,
        match=r"2 of 'origin' are country labels \('BBB', 'CCC'\).*origin_level='country'",
    ):
        read_census_od(abroad, units=units)
    # and a unit id given at the country level
    with pytest.raises(
        UnitCodeError, match=r"1 of 'origin' are unit labels \('A3'\).*origin_level='unit'"
    ):
        read_census_od(
            pd.DataFrame({"origin": ["BBB", "A3"], "destination": ["A1", "A1"], "count": [3, 4]}),
            units=units,
            origin_level="country",
        )


def test_mapping_table_merges_codes(units, tmp_path):
    mapping = pd.DataFrame({"code": ["old1", "old2", "old3"], "unit_id": ["A1", "A1", "A2"]})
    mapping.to_csv(tmp_path / "map.csv", index=False)
    table = pd.DataFrame(
        {
            "origin": ["old1", "old2", "old1", "old2"],
            "destination": ["old3", "old3", "A3", "A3"],
            "count": ["4", "6", "2", "<5"],
        }
    )
    out = read_census_od(table, units=units, mapping=tmp_path / "map.csv").set_index(
        ["origin", "destination"]
    )
    assert out.loc[("A1", "A2"), "count"] == 10
    # 2 + (0..4): censored with bound 6, never a number
    assert np.isnan(out.loc[("A1", "A3"), "count"]) and out.loc[("A1", "A3"), "max"] == 6
    with pytest.raises(UnitCodeError, match=r"map to more than one unit id"):
        harmonise_codes(
            table,
            units["unit_id"],
            mapping=pd.concat([mapping, pd.DataFrame({"code": ["old1"], "unit_id": ["A3"]})]),
        )
    with pytest.raises(UnitCodeError, match=r"target id\(s\) \[Z1\] are not unit ids"):
        harmonise_codes(table, units["unit_id"], mapping={"old1": "Z1"})


# ------------------------------------------------------------------ person records
@pytest.fixture
def persons() -> pd.DataFrame:
    """AAA census, movers at 10%: 3 A1->A2, 1 A3->A1, 1 immigrant from B1; 4 stayers at 2.5%."""
    return pd.DataFrame(
        {
            "person_id": range(1, 10),
            "current_unit": ["A2", "A2", "A2", "A1", "A1", "A2", "A3", "A3", "A2"],
            "previous_unit": ["A1", "A1", "A1", "A3", "A1", "A2", "A3", "A3", "B1"],
            "weight": [10.0, 10.0, 12.0, 8.0, 40.0, 40.0, 40.0, 40.0, 10.0],  # stayers at 1/40
            "age": [20, 30, 40, 50, 60, 70, 80, 15, 33],
            "sex": list("FMFMFMFMF"),
        }
    )


def test_person_records_counts_weights_zeros_exposure(units, persons):
    with pytest.warns(UserWarning, match=r"1 row\(s\) name pairs outside the census universe"):
        out = read_census_persons(persons, units)
    assert list(out.columns) == ["origin", "destination", "count", "max", "weighted", "exposure"]
    assert pairs(out) == {(o, d) for o in ("A1", "A2", "A3") for d in ("A1", "A2", "A3") if o != d}
    t = out.set_index(["origin", "destination"])
    assert t.loc[("A1", "A2"), "count"] == 3 and t.loc[("A1", "A2"), "weighted"] == 32
    assert t.loc[("A3", "A1"), "count"] == 1 and t.loc[("A3", "A1"), "weighted"] == 8
    # zero flows are observations, not missing
    assert t.loc[("A2", "A3"), "count"] == 0 and t.loc[("A2", "A3"), "weighted"] == 0
    assert out["max"].isna().all()
    # sample fraction from the movers' weights: 5 records / 50 (stayers, 4 at 1/40, are excluded)
    assert np.allclose(out["exposure"], 5 / 50)
    ds = build_dataset(units, flows={"census": out})
    assert float(ds["flow_census"].sel(origin="A2", destination="A3")) == 0
    assert np.isnan(float(ds["flow_census"].sel(origin="B1", destination="A2")))
    assert float(ds["flow_census_weighted"].sel(origin="A1", destination="A2")) == 32
    assert float(ds["exposure_census"].sel(origin="A1", destination="A2")) == pytest.approx(0.1)


def test_person_records_universe_options(units, persons):
    dest = read_census_persons(persons, units, universe="destination", sample_fraction=0.1)
    t = dest.set_index(["origin", "destination"])
    assert t.loc[("B1", "A2"), "count"] == 1 and t.loc[("C1", "A3"), "count"] == 0
    assert ("A1", "B1") not in t.index  # emigration is not seen by AAA's census
    assert (dest["exposure"] == 0.1).all()
    none = read_census_persons(persons, units, universe=None)
    assert pairs(none) == {("A1", "A2"), ("A3", "A1"), ("B1", "A2")}
    assert len(read_census_persons(persons, units, universe="all")) == 6 * 5


def test_person_records_query_period_mapping(units, persons):
    p = persons.assign(year=[2010] * 5 + [2020] * 4)
    with pytest.warns(UserWarning, match="outside the census universe"):
        out = read_census_persons(p, units, period="year")
    assert set(out["period"]) == {"2010", "2020"} and len(out) == 2 * 6
    adults = read_census_persons(
        persons,
        units,
        query="age >= 25 and current_unit != 'A2' or age >= 35",
        universe="destination",
    )
    t = adults.set_index(["origin", "destination"])
    assert t.loc[("A1", "A2"), "count"] == 1  # only the 40-year-old
    renamed = persons.replace({"A1": "old-A1"})
    with pytest.warns(UserWarning):
        mapped = read_census_persons(renamed, units, mapping={"old-A1": "A1"})
    assert mapped.set_index(["origin", "destination"]).loc[("A1", "A2"), "count"] == 3
    with pytest.raises(UnitCodeError, match=r"previous_unit|origin=old-A1 \(4 rows\)"):
        read_census_persons(renamed, units)


def test_person_records_bad_inputs(units, persons, tmp_path):
    with pytest.raises(CensusInputError, match=r"non-positive weight\(s\) at data row\(s\) \[2\]"):
        read_census_persons(
            persons.assign(weight=[10, 0, 1, 1, 1, 1, 1, 1, 1]), units, universe=None
        )
    with pytest.raises(CensusInputError, match="weight=None needs sample_fraction"):
        read_census_persons(persons, units, weight=None)
    with pytest.raises(InputFileError, match=r"missing column\(s\) current='cur'"):
        read_census_persons(persons, units, current="cur")
    pd.DataFrame(columns=["current_unit", "previous_unit", "weight"]).to_csv(
        tmp_path / "p.csv", index=False
    )
    with pytest.raises(InputFileError, match="has no rows"):
        read_census_persons(tmp_path / "p.csv", units)
    with pytest.raises(CensusInputError, match="sample fraction above 1"):
        read_census_persons(persons.assign(weight=0.5), units, universe=None)


def test_census_universe():
    country = pd.Series(["AAA", "AAA", "BBB"], index=["A1", "A2", "B1"])
    assert pairs(census_universe(country, ["AAA"], "within")) == {("A1", "A2"), ("A2", "A1")}
    assert pairs(census_universe(country, ["AAA"], "destination")) == {
        ("A1", "A2"),
        ("A2", "A1"),
        ("B1", "A1"),
        ("B1", "A2"),
    }
    with pytest.raises(ValueError, match="universe must be"):
        census_universe(country, ["AAA"], "everything")


# ------------------------------------------------------- bad inputs (issue 18)
def test_census_od_exact_duplicate_rows_are_an_error_naming_file_and_rows(units, tmp_path):
    path = tmp_path / "od.csv"
    path.write_text("origin,destination,count\nA1,A2,695\nA2,A1,3\nA1,A2,695\n")
    with pytest.raises(
        CensusInputError,
        match=r"od\.csv: 1 pair\(s\) on identical rows .*A1->A2: rows \[1, 3\], count 695.*"
        r"duplicates='sum'",
    ):
        read_census_od(path, units=units)
    # a table that splits pairs over rows on purpose: summed when asked to
    out = read_census_od(path, units=units, duplicates="sum")
    assert out.set_index(["origin", "destination"]).loc[("A1", "A2"), "count"] == 1390


def test_census_od_two_values_for_one_pair_are_an_error(units, tmp_path):
    path = tmp_path / "od.csv"
    path.write_text(
        "origin,destination,period,count\nA1,A2,2019,23\nA1,A2,2020,4\nA1,A2,2019,500\n"
    )
    with pytest.raises(
        CensusInputError, match=r"with different counts \[A1->A2 \(2019\): rows \[1, 3\], counts"
    ):
        read_census_od(path, units=units, period="period")
    # the same pair in two periods is not a duplicate
    out = read_census_od(path, units=units, period="period", duplicates="sum")
    assert sorted(out["count"]) == [4.0, 523.0]


def test_census_od_count_larger_than_the_population_allows(units):
    population = pd.Series(1e5, index=units["unit_id"])
    table = pd.DataFrame(
        {"origin": ["A1", "A2"], "destination": ["A2", "A1"], "count": ["1000", "1000000000000"]}
    )
    with pytest.raises(
        CensusInputError,
        match=r"1 count\(s\) larger than the population.*data row 2: A2->A1 count 1e\+12 > 10000 "
        r"\(population 100000 x sample fraction 0\.1\)",
    ):
        read_census_od(table, units=units, sample_fraction=0.1, population=population)
    out = read_census_od(
        table, units=units, sample_fraction=0.1, population=population, max_share=None
    )
    assert out["count"].max() == 1e12


def test_sample_fraction_mapping_must_cover_every_census_country(units, persons):
    table = pd.DataFrame({"origin": ["A1", "B1"], "destination": ["A2", "B2"], "count": [5, 7]})
    with pytest.raises(
        CensusInputError,
        match=r"sample_fraction gives no fraction for census countr\(ies\) \[BBB \(1 rows\)\]",
    ):
        read_census_od(table, units=units, sample_fraction={"AAA": 0.1})
    out = read_census_od(table, units=units, sample_fraction={"AAA": 0.1, "BBB": 0.05})
    assert sorted(out["exposure"]) == [0.05, 0.1]
    with pytest.raises(CensusInputError, match=r"need the units table"):
        read_census_od(table, sample_fraction={"AAA": 0.1})
    with pytest.raises(CensusInputError, match=r"no fraction for census countr\(ies\) \[BBB"):
        read_census_persons(
            persons.assign(current_unit=[*persons["current_unit"][:-1], "B2"]),
            units,
            sample_fraction={"AAA": 0.1},
        )


def test_census_od_fractional_count_names_file_and_row(units, tmp_path):
    path = tmp_path / "od.csv"
    path.write_text("origin,destination,count\nA1,A2,4\nA2,A1,2.5\n")
    with pytest.raises(
        CensusInputError,
        match=r"od\.csv: column 'count': 1 count\(s\) are not whole numbers, at data row\(s\) "
        r"\[2\] \(values \{2: 2\.5\}\)",
    ):
        read_census_od(path, units=units)


def test_census_od_thousands_separator_and_decimal_comma():
    count, _ = parse_counts(pd.Series(["1,390", "12"]))
    assert count.tolist() == [1390.0, 12.0]
    with pytest.raises(CensusInputError, match=r"neither counts nor suppression markers: \[2,5"):
        parse_counts(pd.Series(["2,5"]))


def test_census_od_semicolon_delimited_and_bom_files_are_read(units, tmp_path):
    semi = tmp_path / "semi.csv"
    semi.write_text("origin;destination;count\nA1;A2;1.390\nA2;A1;<5\n")
    # '1.390' in a ';' file is a European thousands separator: not a whole number of persons
    with pytest.raises(CensusInputError, match=r"semi\.csv: column 'count'.*not whole numbers"):
        read_census_od(semi, units=units)
    semi.write_text("origin;destination;count\nA1;A2;1390\nA2;A1;<5\n")
    out = read_census_od(semi, units=units)
    assert out["count"].tolist()[0] == 1390 and out["max"].tolist()[1] == 4
    bom = tmp_path / "bom.csv"
    bom.write_bytes("origin,destination,count\nA1,A2,3\n".encode("utf-8-sig"))
    assert read_census_od(bom, units=units)["count"].tolist() == [3.0]
    tabs = tmp_path / "tabs.tsv"
    tabs.write_text("origin\tdestination\tcount\nA1\tA2\t3\n")
    assert read_census_od(tabs, units=units)["count"].tolist() == [3.0]


def test_census_latin1_file_says_which_encoding_to_pass(units, tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes("origin,destination,count,note\nA1,A2,3,Bogotá\n".encode("latin-1"))
    with pytest.raises(
        InputFileError,
        match=r"latin\.csv: the census OD file is not utf-8 text.*encoding='latin-1'",
    ):
        read_census_od(path, units=units)
    assert read_census_od(path, units=units, encoding="latin-1")["count"].tolist() == [3.0]


def test_census_empty_files(units, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_bytes(b"")
    with pytest.raises(
        InputFileError, match=r"empty\.csv: the census OD file is empty \(0 bytes\)"
    ):
        read_census_od(empty, units=units)
    blank = tmp_path / "blank.csv"
    blank.write_text("\n\n")
    with pytest.raises(
        InputFileError, match=r"blank\.csv: the census person records file is empty"
    ):
        read_census_persons(blank, units)


def test_missing_previous_unit_is_reported_as_missing(units, persons, tmp_path):
    path = tmp_path / "persons.csv"
    persons.assign(previous_unit=["A1", "", "A2", "A3", "B1", "B2", "A1", "A1", "A2"]).to_csv(
        path, index=False
    )
    with pytest.raises(
        CensusInputError,
        match=r"persons\.csv: column 'previous_unit' is empty at 1 data row\(s\) \[2\]: the "
        r"previous residence is missing \(not an unknown code\)",
    ):
        read_census_persons(path, units)
    table = pd.DataFrame({"origin": ["A1", None], "destination": ["A2", "A1"], "count": [1, 2]})
    with pytest.raises(
        CensusInputError, match=r"column 'origin' is empty at 1 data row\(s\) \[2\]"
    ):
        read_census_od(table, units=units)


def test_person_records_implausible_counts(units, persons):
    population = pd.Series(10.0, index=units["unit_id"])  # far too few people for the records
    with pytest.raises(CensusInputError, match=r"larger than the population of their units"):
        read_census_persons(persons, units, population=population, universe=None)


# ------------------------------------------------------------------- matrix layout
def _matrix_csv(tmp_path, rows: list[list[str]], name: str = "matrix.csv"):
    import csv

    path = tmp_path / name
    with open(path, "w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(rows)  # "1,205" is quoted
    return path


def test_census_matrix_reads_as_the_long_table_it_prints(units, tmp_path):
    """A matrix as offices print it: row labels, a code per column, margins, blank stayers."""
    path = _matrix_csv(
        tmp_path,
        [
            ["previous residence", "A1", "A2", "A3", "Total"],
            ["A1", "", "10", "<5", "12"],  # "<5" is 2 here: the margin fits 1..4
            ["A2", "0", "", "7", "7"],
            ["A3", "1,205", "3", "", "1208"],
            ["Total", "1205", "13", "9", "1227"],
        ],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # blank diagonal cells and margins are no warning
        wide = read_census_od(
            path, units=units, layout="wide", suppressed_min=1, sample_fraction=0.1
        )
    long = pd.DataFrame(
        {
            "origin": ["A1", "A1", "A2", "A2", "A3", "A3"],
            "destination": ["A2", "A3", "A1", "A3", "A1", "A2"],
            "count": ["10", "<5", "0", "7", "1,205", "3"],
        }
    )
    expected = read_census_od(long, units=units, suppressed_min=1, sample_fraction=0.1)
    pd.testing.assert_frame_equal(wide, expected)
    t = wide.set_index(["origin", "destination"])
    assert t.loc[("A1", "A3"), "min"] == 1 and t.loc[("A1", "A3"), "max"] == 4
    assert t.loc[("A3", "A1"), "count"] == 1205
    # a printed diagonal (stayers) is dropped with the same warning as in a long table
    path = _matrix_csv(tmp_path, [["o", "A1", "A2"], ["A1", "50", "4"], ["A2", "6", "80"]])
    with pytest.warns(UserWarning, match=r"dropped 2 diagonal"):
        out = read_census_od(path, layout="wide", origin="o")
    assert pairs(out) == {("A1", "A2"), ("A2", "A1")} and out["count"].tolist() == [4, 6]


def test_census_matrix_margins_that_do_not_add_up_are_an_error(units, tmp_path):
    # row A2's 7 movers from A1 were printed under A3: the A3 margin no longer adds up (the
    # A1 margin, 12 against 5 printed, cannot be checked from above: its stayers' cell is empty)
    rows = [
        ["origin", "A1", "A2", "A3", "Total"],
        ["A1", "", "10", "4", "14"],
        ["A2", "0", "", "7", "7"],
        ["A3", "5", "3", "", "8"],
        ["Total", "12", "13", "4", "29"],
    ]
    path = _matrix_csv(tmp_path, rows)
    with pytest.raises(CensusInputError) as err:
        read_census_od(path, units=units, layout="wide")
    msg = str(err.value)
    assert str(path) in msg and "1 margin(s)" in msg
    assert (
        "row 'Total' x column 'A3' (data row 4): 4, its column's cells sum to at least 11" in msg
    )
    assert "check_totals=False" in msg
    # a margin that counts more than the matrix prints (e.g. "not stated") passes unchecked
    out = read_census_od(path, units=units, layout="wide", check_totals=False)
    assert len(out) == 6 and out["count"].sum() == 29
    # suppressed cells: a margin must lie within what their bounds allow (B1 is in another
    # country: its row has no stayers' cell, and "<5" and ".." hold at most 4 each)
    rows = [["origin", "A1", "A2", "A3", "Total"], ["B1", "<5", "..", "3", "20"]]
    with pytest.raises(
        CensusInputError, match=r"its row's cells sum to at least 3 and at most 11"
    ):
        read_census_od(
            _matrix_csv(tmp_path, rows, "b.csv"), units=units, layout="wide", suppressed_max=4
        )
    rows[1][4] = "9"
    out = read_census_od(
        _matrix_csv(tmp_path, rows, "c.csv"), units=units, layout="wide", suppressed_max=4
    )
    assert out["max"].tolist()[:2] == [4, 4]


def test_census_matrix_bad_cells_are_named_by_row_and_column(units, tmp_path):
    path = _matrix_csv(tmp_path, [["origin", "A1", "A2"], ["A1", "", "n/a"], ["A2", "5", ""]])
    with pytest.raises(CensusInputError, match=r"column 'A2'.*n/a.*suppressed=") as err:
        read_census_od(path, layout="wide")
    assert str(path) in str(err.value)
    nameless = _matrix_csv(tmp_path, [["", "A1", ""], ["A1", "", "3"]], "n.csv")
    with pytest.raises(CensusInputError, match=r"header of every column.*1 column\(s\) have none"):
        read_census_od(nameless, layout="wide")
    # empty cells off the diagonal: not printed (unobserved), and said; zeros with universe=
    rows = [["origin", "A1", "A2", "A3"], ["A1", "", "4", ""], ["A2", "5", "", ""]]
    path = _matrix_csv(tmp_path, rows, "e.csv")
    with pytest.warns(UserWarning, match=r"2 empty cell\(s\) off the diagonal.*universe="):
        out = read_census_od(path, layout="wide")
    assert pairs(out) == {("A1", "A2"), ("A2", "A1")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = read_census_od(path, units=units, layout="wide", universe="within")
    t = out.set_index(["origin", "destination"])["count"]
    assert len(t) == 6 and t[("A1", "A3")] == 0 and t[("A2", "A1")] == 5
    with pytest.raises(CensusInputError, match=r"layout='tall'"):
        read_census_od(path, layout="tall")
    with pytest.raises(InputFileError, match=r"missing column.*origin='from'"):
        read_census_od(path, layout="wide", origin="from")


def test_census_matrix_per_period_and_by_previous_country(units, tmp_path):
    # two census rounds stacked, each with its own margin row
    path = _matrix_csv(
        tmp_path,
        [
            ["year", "from", "A1", "A2"],
            ["2010", "A1", "", "4"],
            ["2010", "A2", "6", ""],
            ["2010", "Total", "6", "4"],
            ["2020", "A1", "", "9"],
            ["2020", "A2", "1", ""],
            ["2020", "TOTAL", "1", "9"],
        ],
    )
    out = read_census_od(path, layout="wide", origin="from", period="year")
    got = out.set_index(["period", "origin", "destination"])["count"].to_dict()
    assert got == {
        ("2010", "A1", "A2"): 4,
        ("2010", "A2", "A1"): 6,
        ("2020", "A1", "A2"): 9,
        ("2020", "A2", "A1"): 1,
    }
    # without origin=: the first column that is not the period one
    pd.testing.assert_frame_equal(read_census_od(path, layout="wide", period="year"), out)
    # immigrants by previous country x current unit, printed as a matrix
    path = _matrix_csv(
        tmp_path,
        [["lived in", "A1", "A2", "B1"], ["BBB", "5", "2", ""], ["CCC", "1", "<3", "4"]],
        "abroad.csv",
    )
    cells = read_census_od(
        path, units=units, layout="wide", origin_level="country", suppressed_min=1
    )
    t = cells.set_index(["origin", "destination"])
    assert t.loc[("BBB", "A1"), "count"] == 5 and t.loc[("CCC", "A2"), "max"] == 2
    assert ("BBB", "B1") not in t.index  # the stayer cell: BBB contains B1


def test_brazil_census_as_a_matrix_reads_as_the_tidy_table(tmp_path):
    """The real Brazil 2010 inter-state table, printed as a matrix with margins."""
    from tests.conftest import require_data

    folder = require_data("brazil_interstate_migration_1991_2010")
    tidy = pd.read_csv(folder / "brazil_census_tidy.csv", encoding="utf-8-sig")
    tidy = tidy[tidy["year"] == 2010]
    matrix = tidy.pivot(index="orig", columns="dest", values="flow")
    matrix["Total"] = matrix.sum(axis=1)
    matrix.loc["Total"] = matrix.sum(axis=0)
    path = tmp_path / "brazil_2010.csv"
    # semicolons and Latin-1, as a spreadsheet in Brazil exports them; stayers left blank
    text = matrix.astype("Int64").astype("string").fillna("")
    text.rename_axis("UF de residência anterior").to_csv(path, sep=";", encoding="latin-1")
    wide = read_census_od(path, layout="wide", encoding="latin-1")
    long = read_census_od(tidy, origin="orig", destination="dest", count="flow")
    assert len(wide) == 27 * 26 == len(long)
    pd.testing.assert_frame_equal(wide, long)
    assert wide["count"].sum() == tidy["flow"].sum()
    # the same table printed the other way round: a row per state of residence
    matrix.T.astype("Int64").astype("string").fillna("").to_csv(path)
    transposed = read_census_od(path, layout="wide", matrix_rows="destination")
    pd.testing.assert_frame_equal(transposed, long)


def test_prepare_reads_the_demo_census_printed_as_a_matrix(tmp_path):
    """A run config with ``options = { layout = "wide" }`` builds the same dataset.

    The demo world's census (two countries, "<5" cells) printed as offices print it:
    a block matrix with a Total row and column (a "<5" cell counted as 2), empty
    stayers' cells and empty cells between the two countries.
    """
    from flowmodel import pipeline
    from flowmodel.config import load_config
    from flowmodel.dataset import load_dataset

    cfg = pipeline.demo_config(tmp_path / "demo", size="small")
    pipeline.run_pipeline(cfg, stages=["prepare"])
    world = tmp_path / "demo" / "world"
    od = pd.read_csv(world / "census_od.csv", dtype=str, keep_default_na=False)
    matrix = od.pivot(index="origin", columns="destination", values="count")
    numbers = matrix.replace("<5", "2").astype(float)
    matrix = matrix.fillna("")
    matrix["Total"] = numbers.sum(axis=1).astype(int).astype(str)
    matrix.loc["Total"] = [
        *numbers.sum(axis=0).astype(int).astype(str),
        str(int(numbers.sum().sum())),
    ]
    matrix.rename_axis("lived in 2019").to_csv(world / "census_matrix.csv")
    assert matrix.shape[0] - 1 >= 10 and "<5" in set(od["count"])
    wide_cfg = load_config(
        tmp_path / "demo" / "demo.toml",
        [
            "flows.census.path=world/census_matrix.csv",
            "flows.census.options.layout=wide",
            f"run.out_dir={tmp_path / 'wide'}",
        ],
    )
    pipeline.run_pipeline(wide_cfg, stages=["prepare"])
    long = load_dataset(tmp_path / "demo" / pipeline.DATASET)
    wide = load_dataset(tmp_path / "wide" / pipeline.DATASET)
    for name in ("flow_census", "flow_census_max", "flow_census_min", "exposure_census"):
        np.testing.assert_array_equal(wide[name].values, long[name].values, err_msg=name)
    assert int(long["flow_census_max"].notnull().sum()) > 0


def test_census_workbook_with_a_title_notes_and_a_matrix(units, tmp_path):
    """An .xlsx as offices publish it: a title above the header, a blank row, a footnote."""
    path = tmp_path / "census.xlsx"
    matrix = pd.DataFrame(
        {
            "UF": ["A1", "A2", None, "Source: census 2010"],
            "A1": [None, 5, None, None],
            "A2": ["<5", None, None, None],
        }
    )
    with pd.ExcelWriter(path) as xl:
        pd.DataFrame([["Table 3. Movers by previous residence"]]).to_excel(
            xl, sheet_name="movers", index=False, header=False
        )
        matrix.to_excel(xl, sheet_name="movers", index=False, startrow=2)
        pd.DataFrame({"x": [1]}).to_excel(xl, sheet_name="notes", index=False)
    out = read_census_od(
        path, layout="wide", sheet="movers", header_row=3, suppressed_min=1, units=units
    )
    t = out.set_index(["origin", "destination"])
    assert len(t) == 2 and t.loc[("A2", "A1"), "count"] == 5
    assert t.loc[("A1", "A2"), "min"] == 1 and t.loc[("A1", "A2"), "max"] == 4
    # the same sheet by position; a sheet that is not there names those that are
    assert read_census_od(path, layout="wide", sheet=0, header_row=3).shape[0] == 2
    with pytest.raises(InputFileError, match=r"no sheet 'Tab1' \(sheets: \['movers', 'notes'\]\)"):
        read_census_od(path, layout="wide", sheet="Tab1")
    # a bad value below the skipped blank row is named by its own data row
    matrix.loc[3, "A1"] = -3
    matrix.to_excel(tmp_path / "bad.xlsx", index=False)
    with pytest.raises(
        CensusInputError, match=r"column 'A1': 1 negative count\(s\) at data row\(s\) \[4\]"
    ):
        read_census_od(tmp_path / "bad.xlsx", layout="wide")
    # a long table with a title line, in CSV; old workbooks are refused with the fix
    csv_path = tmp_path / "od.csv"
    csv_path.write_text("Census 2010; movers\norigin;destination;count\nA1;A2;7\n")
    assert read_census_od(csv_path, header_row=2)["count"].tolist() == [7]
    (tmp_path / "old.xls").write_bytes(b"\xd0\xcf\x11\xe0")
    with pytest.raises(InputFileError, match=r"save the sheet as \.xlsx or CSV"):
        read_census_od(tmp_path / "old.xls")
    with pytest.raises(InputFileError, match=r"sheet='movers' applies to \.xlsx"):
        read_census_od(csv_path, sheet="movers")
    with pytest.raises(InputFileError, match=r"apply to files, not to a DataFrame"):
        read_census_od(matrix, layout="wide", header_row=3)
    with pytest.raises(InputFileError, match=r"header_row=0: the 1-based row"):
        read_census_od(csv_path, header_row=0)


def test_census_matrix_split_by_sex_is_summed_per_pair(units, tmp_path):
    """Two matrices printed one below the other (by sex), each with its own margins."""
    rows = [
        ["sex", "origin", "A1", "A2", "Total"],
        ["male", "A1", "", "4", "4"],
        ["male", "A2", "<5", "", "2"],
        ["male", "Total", "2", "4", "6"],
        ["female", "A1", "", "6", "6"],
        ["female", "A2", "3", "", "3"],
        ["female", "Total", "3", "6", "9"],
    ]
    # a part for both sexes (sex "Total") sums the others: dropped, not counted twice
    both = [["Total", "A1", "", "10", "10"], ["Total", "A2", "<10", "", "5"]]
    path = _matrix_csv(tmp_path, rows + both)
    out = read_census_od(path, units=units, layout="wide", by=["sex"], suppressed_min=1)
    t = out.set_index(["origin", "destination"])
    assert t.loc[("A1", "A2"), "count"] == 10
    # "<5" + 3 holds 4..7: a censored sum
    assert np.isnan(t.loc[("A2", "A1"), "count"])
    assert (t.loc[("A2", "A1"), "min"], t.loc[("A2", "A1"), "max"]) == (4, 7)
    # the second matrix's grand total is off (its A1 margin cannot be checked from above:
    # the stayers' cell is empty)
    rows[6] = ["female", "Total", "30", "6", "36"]
    with pytest.raises(
        CensusInputError,
        match=r"\[row 'Total' x column 'Total' \(sex female\) \(data row 6\): 36, its column's "
        r"cells sum to 9\]",
    ):
        read_census_od(_matrix_csv(tmp_path, rows, "b.csv"), layout="wide", by=["sex"])
    with pytest.raises(InputFileError, match=r"by= column\(s\) \['age'\] are not in the table"):
        read_census_od(path, layout="wide", by=["age"])
    with pytest.raises(CensusInputError, match=r"by= applies to layout='wide'"):
        read_census_od(path, by=["sex"])


def test_census_long_table_with_total_rows_is_refused(units, tmp_path):
    path = tmp_path / "od.csv"
    path.write_text("origin,destination,count\nA1,A2,3\nA2,A1,4\nTotal,,7\nA1,total,3\n")
    with pytest.raises(
        CensusInputError, match=r"2 row\(s\) are totals.*data row\(s\) \[3, 4\].*delete them"
    ):
        read_census_od(path, units=units)
    with pytest.raises(CensusInputError, match=r"1 row\(s\) are totals"):
        read_census_od(
            pd.DataFrame({"origin": ["BBB", "All"], "destination": ["A1", "A1"], "count": [3, 3]}),
            units=units,
            origin_level="country",
        )
