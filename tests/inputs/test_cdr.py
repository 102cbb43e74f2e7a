"""CDR: towers -> homes -> relocation OD, redaction and privacy (issue 5)."""

from __future__ import annotations

import hashlib
import logging
import re
import string
import warnings

import geopandas as gpd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely

from flowmodel.dataset import build_dataset, save_dataset
from flowmodel.exceptions import CDRInputError, MissingCRSError, PrivacyError
from flowmodel.inputs.cdr import (
    DEFAULT_THRESHOLD,
    FALLBACK_MIN_ACTIVE_DAYS,
    FALLBACK_NIGHT,
    SubscriberHasher,
    assign_towers,
    cdr_flows,
    detect_homes,
    public_count,
    read_cdr_od,
    read_towers,
    redact,
    relocation_od,
    write_cdr_outputs,
)

UNIT_IDS = ["A1", "A2", "B1", "B2"]


@pytest.fixture
def units() -> gpd.GeoDataFrame:
    """Four 1x1 degree squares in a row: A1, A2 (country AAA), B1, B2 (country BBB)."""
    return gpd.GeoDataFrame(
        {
            "unit_id": UNIT_IDS,
            "country": ["AAA", "AAA", "BBB", "BBB"],
            "population": [1000.0, 2000.0, 1500.0, 500.0],
        },
        geometry=[shapely.box(k, 0, k + 1, 1) for k in range(4)],
        crs="EPSG:4326",
    )


@pytest.fixture
def towers() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "cell_id": ["T1", "T2", "T3", "T4"],
            "lon": [0.5, 1.5, 2.5, 3.5],
            "lat": [0.5, 0.5, 0.5, 0.5],
        }
    )


CELL_OF = {"A1": "T1", "A2": "T2", "B1": "T3", "B2": "T4"}


def _token(rng: np.random.Generator) -> str:
    letters = np.array(list(string.ascii_letters + string.digits))
    return "sub_" + "".join(rng.choice(letters, 14))


def make_events(
    trajectories: dict[str, list[str]],
    *,
    months: tuple[str, ...] = ("2024-01", "2024-02", "2024-03"),
    days: int = 6,
    hour: int = 22,
) -> pd.DataFrame:
    """One night-time event on each of ``days`` days of each month at the home unit's tower."""
    rows = []
    for sid, homes in trajectories.items():
        for month, home in zip(months, homes, strict=False):
            if home is None:
                continue
            for d in range(days):
                ts = np.datetime64(f"{month}-{d + 2:02d}T{hour:02d}:15:00")
                rows.append((sid, ts, CELL_OF[home]))
    return pd.DataFrame(rows, columns=["subscriber_id", "timestamp", "cell_id"])


def tower_units(units, towers):
    return assign_towers(read_towers(towers), units)


def small_cells_od(homes):
    with pytest.warns(UserWarning, match="allow_small_cells=True"):
        return relocation_od(homes, threshold=0, allow_small_cells=True)


# ------------------------------------------------------------------------ hashing
def test_hasher_is_keyed_stable_and_hides_salt():
    a = SubscriberHasher(b"k1")
    assert np.array_equal(a.hash_values(["x", "y"]), a.hash_values(["x", "y"]))
    assert not np.array_equal(a.hash_values(["x"]), SubscriberHasher(b"k2").hash_values(["x"]))
    assert not np.array_equal(
        SubscriberHasher().hash_values(["x"]), SubscriberHasher().hash_values(["x"])
    )
    assert a.hash_values([123])[0] == a.hash_values(["123"])[0]
    assert "k1" not in repr(a)
    with pytest.raises(PrivacyError, match="cannot be pickled"):
        import pickle

        pickle.dumps(a)


# ------------------------------------------------------------------------- towers
def test_point_and_voronoi_assignment(units, towers):
    tu = assign_towers(read_towers(towers), units)
    assert dict(zip(tu["cell_id"], tu["unit_id"], strict=True)) == {
        "T1": "A1",
        "T2": "A2",
        "T3": "B1",
        "T4": "B2",
    }
    vor = assign_towers(read_towers(towers), units, method="voronoi")
    assert vor["unit_id"].tolist() == ["A1", "A2", "B1", "B2"]
    assert np.allclose(vor["share"], 1.0, atol=0.02)


def test_tower_outside_units(units, towers):
    tw = read_towers(
        pd.concat([towers, pd.DataFrame({"cell_id": ["T9"], "lon": [4.2], "lat": [0.5]})])
    )
    with pytest.raises(
        CDRInputError, match=r"1 of 5 tower\(s\) lie outside every unit: cells \[T9\]"
    ):
        assign_towers(tw, units)
    with pytest.warns(UserWarning, match="outside every unit"):
        dropped = assign_towers(tw, units, outside="drop")
    assert dropped["unit_id"].isna().sum() == 1
    nearest = assign_towers(tw, units, outside="nearest")
    assert nearest.set_index("cell_id").loc["T9", "unit_id"] == "B2"
    # Voronoi: the off-shore tower's cell still overlaps B2
    vor = assign_towers(tw, units, method="voronoi")
    assert vor.set_index("cell_id").loc["T9", "unit_id"] == "B2"


def test_bad_towers(units, towers):
    with pytest.raises(CDRInputError, match="more than one location"):
        read_towers(
            pd.concat([towers, pd.DataFrame({"cell_id": ["T1"], "lon": [9.0], "lat": [0.5]})])
        )
    with pytest.raises(CDRInputError, match="out-of-range lon/lat"):
        read_towers(towers.assign(lat=[0.5, 95.0, 0.5, 0.5]))
    with pytest.raises(CDRInputError, match=r"missing column\(s\) \['lon'\]"):
        read_towers(towers.drop(columns="lon"))
    with pytest.raises(MissingCRSError, match="no CRS"):
        assign_towers(read_towers(towers), units.set_crs(None, allow_override=True))


# -------------------------------------------------------------------------- homes
def test_known_homes_and_relocations_recovered_exactly(units, towers):
    rng = np.random.default_rng(7)
    traj = {_token(rng): [str(u) for u in rng.choice(UNIT_IDS, 3)] for _ in range(60)}
    events = make_events(traj).sample(frac=1.0, random_state=1)  # order must not matter
    # random homes each month move out and back (A -> B -> A) as often as misplaced homes do,
    # so an explicit min_active_days is flagged as letting through spurious moves
    with pytest.warns(
        UserWarning, match=r"min_active_days=5: an estimated \d+% of detected moves"
    ):
        homes = detect_homes(
            events, tower_units(units, towers), UNIT_IDS, batch_size=97, min_active_days=5
        )
    assert homes.periods == ["2024-01", "2024-02", "2024-03"]
    got = homes.counts().set_index(["unit_id", "period"])["n"]
    exp = pd.Series(
        [h for hs in traj.values() for h in hs], index=None
    )  # placeholder to build expected counts below
    rows = [(h, m) for hs in traj.values() for h, m in zip(hs, homes.periods, strict=True)]
    exp = (
        pd.Series(1.0, index=pd.MultiIndex.from_tuples(rows, names=["unit_id", "period"]))
        .groupby(level=[0, 1])
        .sum()
    )
    pd.testing.assert_series_equal(got.sort_index(), exp.sort_index(), check_names=False)
    od = small_cells_od(homes).flows
    expected = {}
    for hs in traj.values():
        for t in (1, 2):
            if hs[t - 1] != hs[t]:
                key = (hs[t - 1], hs[t], homes.periods[t])
                expected[key] = expected.get(key, 0) + 1
    got_od = {(r.origin, r.destination, r.period): r.count for r in od.itertuples() if r.count > 0}
    assert got_od == expected
    # every ordered pair of distinct covered units, for the two relocation periods
    assert len(od) == 4 * 3 * 2
    assert set(od["period"]) == {"2024-02", "2024-03"}
    assert (od["origin"] != od["destination"]).all()


def test_homes_refuse_to_be_pickled(units, towers):
    import pickle

    homes = detect_homes(make_events({"s": ["A1"]}), tower_units(units, towers), UNIT_IDS)
    # no counts in the repr: a printed count of subscribers could undo redaction
    assert repr(homes).startswith("HomeLocations(periods ['2024-01'], 4 units with towers")
    assert "1" not in repr(homes).split("towers")[1].replace("19", "")
    with pytest.raises(PrivacyError, match="must not be pickled or persisted"):
        pickle.dumps(homes)


def test_periods_weeks_and_window(units, towers):
    ev = make_events({"s": ["A1", "A2"]}, months=("2024-01", "2024-02"), days=20)
    tu = tower_units(units, towers)
    weeks = detect_homes(ev, tu, UNIT_IDS, period="week", min_active_days=3)
    assert weeks.periods[0] == "W2024-01-01" and len(set(weeks.periods)) == len(weeks.periods)
    # a quarter holds 20 nights in A1 and 20 in A2: a tie, which gives no home
    with pytest.warns(UserWarning, match="no subscriber has a home"):
        quarters = detect_homes(ev, tu, UNIT_IDS, period="quarter")
    assert quarters.periods == ["2024-Q1"] and len(quarters.unit) == 0
    with pytest.warns(UserWarning, match="no relocation period"):
        assert relocation_od(quarters).flows.empty
    window = detect_homes(ev, tu, UNIT_IDS, start="2024-02-01", end="2024-03-01")
    assert window.periods == ["2024-02"] and window.report["outside_window"] == 20
    with pytest.warns(UserWarning, match="no subscriber has a home"):
        detect_homes(ev, tu, UNIT_IDS, night=(2, 5))


def test_a_tie_between_units_gives_no_home(units, towers):
    tied = pd.concat(
        [make_events({"s": ["A1"]}, days=4), make_events({"s": ["A2"]}, days=4, hour=23)]
    )
    tu = tower_units(units, towers)
    with pytest.warns(UserWarning, match="no subscriber has a home"):
        assert len(detect_homes(tied, tu, UNIT_IDS, min_active_days=1).unit) == 0
    one_more = pd.concat([tied, make_events({"s": ["A2"]}, days=5, hour=20).iloc[4:]])
    homes = detect_homes(one_more, tu, UNIT_IDS, min_active_days=1)
    assert homes.unit_ids[homes.unit].tolist() == ["A2"]


def test_first_night_of_a_log_starting_at_midnight_makes_no_period(units, towers):
    # the log opens at 00:00 on 1 January: its first morning belongs to the night of
    # 31 December, which the log does not cover
    ev = make_events({"s": ["A1", "A1"]}, months=("2024-01", "2024-02"))
    first = pd.DataFrame(
        {
            "subscriber_id": ["s"],
            "timestamp": [np.datetime64("2024-01-01T02:00")],
            "cell_id": ["T2"],
        }
    )
    homes = detect_homes(pd.concat([first, ev]), tower_units(units, towers), UNIT_IDS)
    assert homes.periods == ["2024-01", "2024-02"] and homes.settings["first_night_dropped"]
    assert (
        detect_homes(ev, tower_units(units, towers), UNIT_IDS).settings["first_night_dropped"]
        is False
    )


def _daily_routine(n_subscribers: int = 150, days: int = 28, seed: int = 0) -> pd.DataFrame:
    """Subscribers at home (their own tower) from 20:00 to 04:00, at work by day."""
    rng = np.random.default_rng(seed)
    home = rng.choice(["T1", "T2", "T3", "T4"], n_subscribers)
    work = rng.choice(["T1", "T2", "T3", "T4"], n_subscribers)
    rows = []
    for k in range(n_subscribers):
        for d in range(days):
            day = np.datetime64("2024-01-01") + np.timedelta64(d, "D")
            for hour, cell in (
                (20, home[k]),
                (23, home[k]),
                (26, home[k]),
                (10, work[k]),
                (15, work[k]),
            ):
                rows.append((f"sub{k}", day + np.timedelta64(hour * 60 + 7, "m"), cell))
    return pd.DataFrame(rows, columns=["subscriber_id", "timestamp", "cell_id"])


def test_night_window_chosen_from_the_hour_profile(units, towers, caplog):
    caplog.set_level(logging.INFO, logger="flowmodel.inputs.cdr")
    tu = tower_units(units, towers)
    homes = detect_homes(_daily_routine(), tu, UNIT_IDS)
    # at the usual tower at 20:00, 23:00 and 02:00, at work at 10:00 and 15:00: the window
    # is the shortest candidate (start 17-23, end 4-10) holding every home hour
    assert homes.settings["night"] == (20, 4)
    assert homes.settings["night_chosen_by"].startswith("data")
    assert "night 20:00-04:00 (data" in caplog.text
    profile = homes.hour_profile.set_index("hour")
    assert (
        profile.loc[23, "share_at_usual_tower"]
        > 0.9
        > 0.6
        > profile.loc[10, "share_at_usual_tower"]
    )
    assert profile["night"].sum() == 8
    # no night-time contrast (one tower all day), or too few subscribers: the fallback
    flat = _daily_routine().assign(cell_id="T1")
    assert detect_homes(flat, tu, UNIT_IDS).settings["night"] == FALLBACK_NIGHT
    few = detect_homes(_daily_routine(20), tu, UNIT_IDS)
    assert few.settings["night"] == FALLBACK_NIGHT and "too few" in few.settings["night_chosen_by"]
    assert few.hour_profile.empty is False  # 20 subscribers: above the threshold of 15
    # the user's window is used as given
    assert detect_homes(_daily_routine(), tu, UNIT_IDS, night=(22, 5)).settings["night"] == (22, 5)
    with pytest.raises(ValueError, match="night must be 'auto'"):
        detect_homes(_daily_routine(20), tu, UNIT_IDS, night="evening")


def test_min_active_days_default_without_three_periods(units, towers, caplog):
    caplog.set_level(logging.INFO, logger="flowmodel.inputs.cdr")
    ev = make_events({"a": ["A1", "A2"], "b": ["B1", "B1"]}, months=("2024-01", "2024-02"))
    homes = detect_homes(ev, tower_units(units, towers), UNIT_IDS)
    assert homes.settings["min_active_days"] == FALLBACK_MIN_ACTIVE_DAYS
    assert "needs homes in 3 consecutive periods" in homes.settings["min_active_days_chosen_by"]
    assert f"min_active_days={FALLBACK_MIN_ACTIVE_DAYS} (default" in caplog.text
    with pytest.raises(ValueError, match="min_active_days must be 'auto'"):
        detect_homes(ev, tower_units(units, towers), UNIT_IDS, min_active_days="many")


def test_night_rule_changes_home(units, towers):
    night = make_events({"s1": ["A1"]}, days=5, hour=23)
    day = make_events({"s1": ["A2"]}, days=10, hour=11)
    events = pd.concat([night, day])
    tu = tower_units(units, towers)
    with_night = detect_homes(events, tu, UNIT_IDS)
    assert with_night.unit_ids[with_night.unit].tolist() == ["A1"]
    all_day = detect_homes(events, tu, UNIT_IDS, night=None)
    assert all_day.unit_ids[all_day.unit].tolist() == ["A2"]
    # a non-wrapping window picks the daytime unit
    office = detect_homes(events, tu, UNIT_IDS, night=(9, 17))
    assert office.unit_ids[office.unit].tolist() == ["A2"]


def test_night_after_midnight_belongs_to_previous_day(units, towers):
    # 23:00 and 02:00 of the same night are one active day, so 3 nights < 4 days
    ev = pd.concat(
        [make_events({"s": ["A1"]}, days=3, hour=23), make_events({"s": ["A1"]}, days=3, hour=2)]
    )
    ev["timestamp"] = np.where(
        ev["timestamp"].dt.hour == 2, ev["timestamp"] + pd.Timedelta(days=1), ev["timestamp"]
    )
    tu = tower_units(units, towers)
    with pytest.warns(UserWarning, match="no subscriber has a home"):
        assert len(detect_homes(ev, tu, UNIT_IDS, min_active_days=4).unit) == 0
    assert len(detect_homes(ev, tu, UNIT_IDS, min_active_days=3).unit) == 1
    # without the night rule days run midnight to midnight: calendar days 2, 3, 4, 5
    assert len(detect_homes(ev, tu, UNIT_IDS, night=None, min_active_days=4).unit) == 1
    with pytest.warns(UserWarning, match="no subscriber has a home"):
        assert len(detect_homes(ev, tu, UNIT_IDS, night=None, min_active_days=5).unit) == 0


def test_min_active_days_changes_answer(units, towers):
    events = pd.concat(
        [make_events({"few": ["A1"]}, days=3), make_events({"many": ["A2"]}, days=8)]
    )
    tu = tower_units(units, towers)
    strict = detect_homes(events, tu, UNIT_IDS, min_active_days=5)
    assert strict.unit_ids[strict.unit].tolist() == ["A2"]
    loose = detect_homes(events, tu, UNIT_IDS, min_active_days=3)
    assert sorted(loose.unit_ids[loose.unit].tolist()) == ["A1", "A2"]


def test_modal_unit_by_days_then_events(units, towers):
    # 4 nights in A1 (1 event each) vs 3 nights in A2 with 5 events each: days win
    a = make_events({"s": ["A1"]}, days=4)
    b = pd.concat([make_events({"s": ["A2"]}, days=3, hour=20 + k) for k in range(3)])
    homes = detect_homes(
        pd.concat([a, b]), tower_units(units, towers), UNIT_IDS, min_active_days=1
    )
    assert homes.unit_ids[homes.unit].tolist() == ["A1"]


def test_timezone_aware_timestamps(units, towers):
    # 22:15 local in UTC+3 is 19:15 UTC: outside a 21-06 night in UTC, inside in local time
    ev = make_events({"s": ["A1"]}, days=6, hour=22)
    ev["timestamp"] = (ev["timestamp"] - pd.Timedelta(hours=3)).dt.tz_localize("UTC")
    tu = tower_units(units, towers)
    with pytest.warns(UserWarning, match="no subscriber has a home"):
        assert len(detect_homes(ev, tu, UNIT_IDS, night=(21, 6)).unit) == 0
    local = detect_homes(ev, tu, UNIT_IDS, night=(21, 6), timezone="Africa/Nairobi")
    assert local.unit_ids[local.unit].tolist() == ["A1"]


def test_iso_text_timestamps_with_zones(units, towers):
    ev = make_events({"s": ["A1"]}, days=6, hour=22)
    tu = tower_units(units, towers)
    utc = ev.assign(
        timestamp=(ev["timestamp"] - pd.Timedelta(hours=3)).dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    )
    offset = ev.assign(timestamp=ev["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S+03:00"))
    frac = ev.assign(timestamp=ev["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S.250"))
    for table in (utc, offset):
        homes = detect_homes(table, tu, UNIT_IDS, night=(21, 6), timezone="Africa/Nairobi")
        assert homes.unit_ids[homes.unit].tolist() == ["A1"]
    assert detect_homes(frac, tu, UNIT_IDS).unit_ids.tolist() == UNIT_IDS
    assert detect_homes(frac, tu, UNIT_IDS).report["used"] == 6


# random homes each month move out and back as often as misplaced homes would: flagged
@pytest.mark.filterwarnings("ignore:min_active_days=.*spurious:UserWarning")
def test_inputs_parquet_csv_and_epoch_agree(units, towers, tmp_path):
    rng = np.random.default_rng(3)
    traj = {_token(rng): [str(u) for u in rng.choice(UNIT_IDS, 3)] for _ in range(20)}
    ev = make_events(traj)
    tu = tower_units(units, towers)
    pq.write_table(pa.Table.from_pandas(ev, preserve_index=False), tmp_path / "ev.parquet")
    ev.assign(timestamp=ev["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S")).to_csv(
        tmp_path / "ev.csv", index=False
    )
    epoch = ev.assign(timestamp=ev["timestamp"].astype("datetime64[s]").astype(np.int64))
    results = [
        detect_homes(src, tu, UNIT_IDS, salt=b"same").counts()
        for src in (ev, tmp_path / "ev.parquet", tmp_path / "ev.csv", epoch)
    ]
    for other in results[1:]:
        pd.testing.assert_frame_equal(results[0], other)


# ---------------------------------------------------------------------- redaction
def _movers(n_a1_a2: int, n_a1_b1: int, n_a2_b1: int, rng) -> dict[str, list[str]]:
    traj = {}
    for o, d, n in (("A1", "A2", n_a1_a2), ("A1", "B1", n_a1_b1), ("A2", "B1", n_a2_b1)):
        for _ in range(n):
            traj[_token(rng)] = [o, d]
    for _ in range(30):
        traj[_token(rng)] = ["B2", "B2"]
    return traj


def test_redaction_at_threshold_and_totals_before_redaction(units, towers):
    rng = np.random.default_rng(11)
    ev = make_events(_movers(15, 10, 16, rng), months=("2024-01", "2024-02"))
    res = cdr_flows(ev, towers, units)
    flows = res.flows.set_index(["origin", "destination"])
    assert np.isnan(flows.loc[("A1", "A2"), "count"]) and flows.loc[("A1", "A2"), "max"] == 15
    assert flows.loc[("A2", "B1"), "count"] == 16 and np.isnan(flows.loc[("A2", "B1"), "max"])
    # a zero cell is censored (0..15), never 0
    assert np.isnan(flows.loc[("B2", "A1"), "count"]) and flows.loc[("B2", "A1"), "max"] == 15
    assert not (res.flows["count"] == 0).any()
    assert (res.flows["count"].isna() == res.flows["max"].notna()).all()
    # totals include the redacted cells: A1 sends 15 + 10 = 25
    tot = res.totals.set_index("unit_id")
    assert tot.loc["A1", "outflow"] == 25
    assert np.isnan(tot.loc["B2", "outflow"]) and tot.loc["B2", "outflow_max"] == 15
    # B1 receives 16 (released) + 10 (redacted, from A1) + 0 (redacted, from B2): releasing 26
    # would reveal the redacted 10, so the total is suppressed with max 16 + 2 x 15
    assert np.isnan(tot.loc["B1", "inflow"]) and tot.loc["B1", "inflow_max"] == 46
    # likewise A2's outflow of 16 would reveal that its two redacted cells are 0
    assert np.isnan(tot.loc["A2", "outflow"]) and tot.loc["A2", "outflow_max"] == 46
    # subscribers per unit and the per-resident covariate
    subs = res.subscribers.set_index(["unit_id", "period"])
    assert subs.loc[("B2", "2024-01"), "cdr_subscribers"] == 30
    assert subs.loc[("A1", "2024-01"), "cdr_subscribers"] == 25
    # B1 holds 26 subscribers in February, 16 of them in the released cell A2 -> B1: releasing
    # 26 would bound its redacted inflows A1 -> B1 and B2 -> B1 to 10 or fewer, so it is withheld
    # (NaN without a bound), like A2's 16 in January, all of whom are in the released A2 -> B1
    # (which would prove A2 -> A1 and A2 -> B2 are 0)
    for key in [("B1", "2024-02"), ("A2", "2024-01")]:
        assert subs.loc[key, ["cdr_subscribers", "cdr_subscribers_max"]].isna().all()
    assert res.covariates.loc["B2", "cdr_subscribers_per_resident"] == pytest.approx(30 / 500)
    # A1 holds 25 then 0 subscribers: the mean covers released periods only (25, not 12.5)
    assert res.covariates.loc["A1", "cdr_subscribers"] == 25
    assert np.isnan(res.covariates.loc["A2", "cdr_subscribers"])  # 16 withheld, then 15 redacted
    assert np.isnan(res.covariates.loc["B1", "cdr_subscribers"])  # 0 redacted, then 26 withheld


def test_raising_threshold_is_free_lowering_needs_opt_in(units, towers):
    rng = np.random.default_rng(12)
    ev = make_events(_movers(15, 10, 16, rng), months=("2024-01", "2024-02"))
    high = cdr_flows(ev, towers, units, threshold=20)
    assert high.flows["count"].notna().sum() == 0 and set(high.flows["max"]) == {20.0}
    with pytest.raises(PrivacyError, match=r"below 15.*allow_small_cells=True"):
        cdr_flows(ev, towers, units, threshold=10)
    with pytest.warns(UserWarning, match="releasing cells with 11..15"):
        low = cdr_flows(ev, towers, units, threshold=10, allow_small_cells=True)
    assert low.flows.set_index(["origin", "destination"]).loc[("A1", "A2"), "count"] == 15


def test_redact_function():
    t = pd.DataFrame({"count": [0.0, 15.0, 16.0, np.nan], "max": [np.nan, np.nan, np.nan, 15.0]})
    out = redact(t)
    assert out["count"].isna().tolist() == [True, True, False, True]
    assert (
        out["max"].tolist()[:2] == [15.0, 15.0]
        and np.isnan(out["max"][2])
        and out["max"][3] == 15.0
    )
    with pytest.raises(PrivacyError, match="threshold=3 is below 15"):
        redact(t, threshold=3)


def test_write_refuses_unredacted(units, towers, tmp_path):
    rng = np.random.default_rng(13)
    res = cdr_flows(
        make_events(_movers(20, 0, 0, rng), months=("2024-01", "2024-02")), towers, units
    )
    res.flows.loc[res.flows.index[0], "count"] = 3.0
    with pytest.raises(PrivacyError, match="refusing to write"):
        write_cdr_outputs(res, tmp_path)
    assert not list(tmp_path.iterdir())


def test_within_universe_drops_cross_border(units, towers):
    rng = np.random.default_rng(14)
    ev = make_events(_movers(20, 17, 0, rng), months=("2024-01", "2024-02"))
    # 17 relocations: published rounded to the nearest 50 (see test_public_count_rule)
    with pytest.warns(
        UserWarning, match=r"fewer than 25 relocation\(s\) between units outside the universe"
    ):
        res = cdr_flows(ev, towers, units, universe="within")
    assert set(zip(res.flows["origin"], res.flows["destination"], strict=True)) == {
        ("A1", "A2"),
        ("A2", "A1"),
        ("B1", "B2"),
        ("B2", "B1"),
    }


# ---------------------------------------------------------------------- bad input
@pytest.fixture
def good_events() -> pd.DataFrame:
    rng = np.random.default_rng(5)
    return make_events(
        {_token(rng): ["A1", "A2"] for _ in range(3)}, months=("2024-01", "2024-02")
    )


def test_unknown_towers(units, towers, good_events):
    ev = good_events.copy()
    ev.loc[ev.index[:4], "cell_id"] = "T404"
    with pytest.raises(
        CDRInputError,
        match=r"events table: .*unknown cell, not in the towers table \(column 'cell_id'\): 4 "
        r"\(data rows \[1, 2, 3, 4\]\).*Fix: ",
    ):
        cdr_flows(ev, towers, units)
    with pytest.warns(UserWarning, match=r"dropped 4 bad event\(s\).*unknown cell.*: 4"):
        res = cdr_flows(ev, towers, units, on_bad_events="drop")
    assert res.report["unknown_cell"] == 4


def test_unparsable_and_out_of_range_timestamps(units, towers, good_events):
    ev = good_events.assign(timestamp=good_events["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S"))
    ev.loc[ev.index[0], "timestamp"] = "yesterday-ish"
    ev.loc[ev.index[1], "timestamp"] = "1975-01-01 22:00:00"
    ev.loc[ev.index[2], "timestamp"] = "2201-01-01 22:00:00"
    with pytest.raises(
        CDRInputError,
        match=r"unparsable timestamp \(column 'timestamp'\): 1 \(data rows \[1\]\).*"
        r"before 1980 or after 2159 \(column 'timestamp'\): 2 \(data rows \[2, 3\]\)",
    ):
        cdr_flows(ev, towers, units)
    with pytest.warns(UserWarning, match=r"dropped 3 bad event"):
        res = cdr_flows(ev, towers, units, on_bad_events="drop", min_active_days=4)
    assert res.report["used"] == len(ev) - 3


def test_empty_log(units, towers, good_events):
    with pytest.raises(CDRInputError, match="the event log is empty"):
        cdr_flows(good_events.iloc[:0], towers, units)


def test_towers_outside_units_events_dropped(units, towers, good_events):
    tw = pd.concat([towers, pd.DataFrame({"cell_id": ["T9"], "lon": [9.0], "lat": [9.0]})])
    ev = pd.concat([good_events, good_events.iloc[:2].assign(cell_id="T9")])
    with pytest.raises(CDRInputError, match="outside every unit"):
        cdr_flows(ev, tw, units)
    with (
        pytest.warns(UserWarning, match=r"1 of 5 tower\(s\) lie outside every unit"),
        pytest.warns(UserWarning, match=r"dropped 2 event\(s\) on towers outside every unit"),
    ):
        res = cdr_flows(ev, tw, units, outside="drop")
    assert res.report["tower_outside_units"] == 2


def test_duplicate_events(units, towers, good_events):
    ev = pd.concat([good_events, good_events.iloc[:5]])
    with pytest.warns(UserWarning, match=r"dropped 5 duplicate event\(s\)"):
        res = cdr_flows(ev, towers, units)
    assert res.report["duplicates"] == 5


def test_missing_columns_and_ids(units, towers, good_events, tmp_path):
    with pytest.raises(CDRInputError, match=r"events table: missing column\(s\) \['cell_id'\]"):
        cdr_flows(good_events.drop(columns="cell_id"), towers, units)
    good_events.drop(columns="cell_id").to_csv(tmp_path / "e.csv", index=False)
    with pytest.raises(CDRInputError, match="cannot read the events file"):
        cdr_flows(tmp_path / "e.csv", towers, units)
    ev = good_events.astype({"subscriber_id": object})
    ev.loc[ev.index[0], "subscriber_id"] = None
    with pytest.raises(
        CDRInputError,
        match=r"missing subscriber id \(column 'subscriber_id'\): 1 \(data rows \[1\]",
    ):
        cdr_flows(ev, towers, units)


def test_malformed_csv_rows_reported_with_their_row_numbers(units, towers, good_events, tmp_path):
    ev = good_events.assign(timestamp=good_events["timestamp"].dt.strftime("%Y-%m-%d %H:%M:%S"))
    lines = ev.to_csv(index=False).splitlines()
    lines[3] += ",extra"  # data row 3: four fields
    lines[7] = lines[7].rsplit(",", 1)[0]  # data row 7: two fields
    lines.insert(6, "")  # a blank line is skipped, not a row
    path = tmp_path / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        CDRInputError,
        match=rf"{re.escape(str(path))}: 2 bad event\(s\) of \d+ — malformed row, wrong number "
        r"of fields: 2 \(data rows \[3, 7\]\).*Fix: correct those rows",
    ) as info:
        cdr_flows(path, towers, units)
    assert info.value.__cause__ is None
    # an unknown cell after the malformed rows keeps its own row number in the file
    lines[12] = lines[12].rsplit(",", 1)[0] + ",T404"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(CDRInputError, match=r"unknown cell.*: 1 \(data rows \[11\]\)"):
        cdr_flows(path, towers, units)
    with pytest.warns(UserWarning, match=r"dropped 3 bad event\(s\).*malformed row.*\[3, 7\]"):
        res = cdr_flows(path, towers, units, on_bad_events="drop")
    assert res.report["malformed_row"] == 2


# ------------------------------------------------------------- aggregated OD input
def test_read_cdr_od_semantics():
    table = pd.DataFrame(
        {
            "pcod_from": ["A1", "A1", "A2", "B1"],
            "pcod_to": ["A2", "B1", "A1", "A1"],
            "value": ["40", "", "10", "16"],
        }
    )
    res = read_cdr_od(
        table,
        origin="pcod_from",
        destination="pcod_to",
        count="value",
        coverage=["A1", "A2", "B1"],
    )
    f = res.flows.set_index(["origin", "destination"])
    assert f.loc[("A1", "A2"), "count"] == 40
    assert f.loc[("B1", "A1"), "count"] == 16
    for pair in [
        ("A1", "B1"),
        ("A2", "A1"),
        ("A2", "B1"),
        ("B1", "A2"),
    ]:  # marked, small, absent, absent
        assert np.isnan(f.loc[pair, "count"]) and f.loc[pair, "max"] == 15
    assert len(f) == 6 and set(res.flows["period"]) == {"all"}
    assert res.report["redacted_on_read"] == 1


def test_read_cdr_od_totals_and_errors(units):
    table = pd.DataFrame(
        {
            "origin": ["A1", "A2"],
            "destination": ["A2", "A1"],
            "count": [30, 20],
            "period": ["p1"] * 2,
        }
    )
    tot = pd.DataFrame(
        {"unit_id": ["A1", "A2"], "period": ["p1", "p1"], "outflow": [40, 12], "inflow": [21, 30]}
    )
    res = read_cdr_od(table, units=units, totals=tot)
    t = res.totals.set_index("unit_id")
    assert (
        t.loc["A1", "outflow"] == 40
        and np.isnan(t.loc["A2", "outflow"])
        and t.loc["A2", "outflow_max"] == 15
    )
    with pytest.raises(CDRInputError, match="neither counts nor redaction markers"):
        read_cdr_od(table.assign(count=["30", "lots"]))
    with pytest.raises(CDRInputError, match="negative count"):
        read_cdr_od(table.assign(count=[30, -2]))
    from flowmodel.exceptions import UnitCodeError

    with pytest.raises(UnitCodeError, match=r"origin=Z9 \(1 rows\)"):
        read_cdr_od(table.assign(origin=["Z9", "A2"]), units=units)


# ------------------------------------------------------------------------ dataset
def test_flows_plug_into_build_dataset(units, towers):
    rng = np.random.default_rng(21)
    res = cdr_flows(
        make_events(_movers(20, 17, 16, rng), months=("2024-01", "2024-02")), towers, units
    )
    ds = build_dataset(units, covariates=res.covariates, flows={"cdr": res.flows})
    assert ds["flow_cdr"].dims == ("origin", "destination", "period")
    assert float(ds["flow_cdr"].sel(origin="A1", destination="A2", period="2024-02")) == 20
    assert float(ds["flow_cdr_max"].sel(origin="B2", destination="A1", period="2024-02")) == 15
    assert "cdr_subscribers_per_resident" in ds


# ------------------------------------------------------------------------ privacy
def _fingerprints(raw_id: str) -> set[str]:
    b = raw_id.encode()
    out = {raw_id}
    for name in ("sha256", "md5", "sha1", "sha512", "blake2b", "blake2s", "sha3_256"):
        out.add(hashlib.new(name, b).hexdigest())
    unkeyed = hashlib.blake2b(b, digest_size=8)
    out.add(unkeyed.hexdigest())
    out.add(str(int.from_bytes(unkeyed.digest(), "little")))
    return out


def _leaks(blobs: list[bytes], raw_ids: list[str]) -> list[str]:
    return [
        fp
        for rid in raw_ids
        for fp in _fingerprints(rid)
        if any(fp.encode() in blob for blob in blobs)
    ]


def test_no_subscriber_id_leaves_the_module(units, towers, tmp_path, caplog, capsys, monkeypatch):
    rng = np.random.default_rng(99)
    traj = _movers(25, 18, 16, rng)
    ev = make_events(traj, months=("2024-01", "2024-02"))
    raw_ids = sorted(traj)
    src = tmp_path / "in" / "events.parquet"
    src.parent.mkdir()
    pq.write_table(pa.Table.from_pandas(ev, preserve_index=False), src)
    out = tmp_path / "out"
    messages: list[str] = []
    caplog.set_level(logging.DEBUG)
    with pytest.warns(UserWarning) as record:
        res = cdr_flows(
            src, towers, units, progress=True, on_bad_events="drop", universe="within"
        )  # warns: cross-border relocations dropped
        bad = ev.copy()
        bad.loc[bad.index[:3], "timestamp"] = pd.NaT
        bad.loc[bad.index[3], "cell_id"] = "nowhere"
        cdr_flows(bad, towers, units, on_bad_events="drop")
    messages += [str(w.message) for w in record]
    for broken in (
        ev.assign(timestamp=ev["subscriber_id"]),  # ids in the timestamp column
        ev.assign(cell_id=ev["subscriber_id"]),  # ids in the cell column
    ):
        with pytest.raises(CDRInputError) as info:
            cdr_flows(broken, towers, units)
        messages.append(str(info.value))
    csv = tmp_path / "in" / "broken.csv"
    csv.write_text(
        "subscriber_id,timestamp,cell_id\n" + f"{raw_ids[0]},2024-01-01 22:00:00,T1,extra\n"
    )
    with pytest.raises(CDRInputError) as info:
        cdr_flows(csv, towers, units)
    messages.append(str(info.value))
    # no Arrow exception (whose text quotes the row) is chained
    assert info.value.__cause__ is None
    assert info.value.__context__ is None or info.value.__suppress_context__
    # a malformed row far into the file (a later CSV block) is scrubbed too
    rows = "".join(
        f"{rid},2024-01-0{k % 9 + 1} 22:00:00,T1\n" for k, rid in enumerate(raw_ids * 400)
    )
    csv.write_text("subscriber_id,timestamp,cell_id\n" + rows + f"{raw_ids[1]},x,T1,extra,cols\n")
    with pytest.raises(CDRInputError, match="malformed") as info:
        monkeypatch.setattr("flowmodel.inputs.cdr._CSV_BLOCK_SIZE", 1 << 12)
        detect_homes(csv, tower_units(units, towers), UNIT_IDS)
    messages.append(str(info.value))
    write_cdr_outputs(res, out)
    ds = build_dataset(units, covariates=res.covariates, flows={"cdr": res.flows})
    save_dataset(ds, out / "dataset.nc")
    messages += [r.getMessage() for r in caplog.records]
    captured = capsys.readouterr()
    messages += [captured.out, captured.err, repr(res)]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"cdr_flows.csv", "cdr_totals.csv", "dataset.nc"}
    blobs = [p.read_bytes() for p in written] + [m.encode() for m in messages]
    assert any(b"CDR home detection" in m.encode() for m in messages)  # logs were captured
    assert _leaks(blobs, raw_ids) == []
    # the scan finds a planted id, raw or hashed
    planted = hashlib.sha256(raw_ids[3].encode()).hexdigest()
    assert _leaks([b"x," + planted.encode() + b",y"], raw_ids) == [planted]
    assert _leaks([f"id {raw_ids[5]}".encode()], raw_ids) == [raw_ids[5]]


# ---------------------------------------------------- the rule for totals and logs
def test_public_count_rule():
    # 2 significant figures, never finer than 50 for the threshold 15
    assert public_count(2292, threshold=15).value == 2300
    assert public_count(553_210, threshold=15).value == 550_000
    assert public_count(103, threshold=15).value == 100
    assert public_count(17, threshold=15).text == "fewer than 25"
    assert public_count(103, threshold=30).base == 100  # 2 x 31 -> the next 1, 2, 5 x 10^k
    cell = np.array([0.0]), np.array([15.0])
    # the 2-unit world: 100 released + 3 redacted. "about 100" (75..125) leaves the cell 0..15
    assert public_count(103, [("sum", 100.0, *cell)], threshold=15).value == 100
    # ... but 25 released + 0 redacted publishes as 0..50: "25 or fewer", so the cell is 0
    assert public_count(25, [("sum", 25.0, *cell)], threshold=15).withheld
    # saturated: 100 released + 15 + 15 redacted -> 130 -> "about 150" (125..175) would say
    # each redacted cell is at least 10
    two = np.zeros(2), np.full(2, 15.0)
    pc = public_count(130, [("sum", 100.0, *two)], threshold=15)
    assert pc.withheld and "withheld" in pc.text
    # an upper bound (e.g. distinct subscribers) only needs room for each cell to reach 15
    assert not public_count(130, [("upper", 100.0, *two)], threshold=15).withheld
    assert public_count(120, [("upper", 115.0, *two)], threshold=15).withheld  # 75..125


def _od(cells: dict[tuple[str, str], float], units=("A", "B", "C"), period="p") -> pd.DataFrame:
    rows = [
        {"origin": o, "destination": d, "period": period, "count": cells.get((o, d), 0.0)}
        for o in units
        for d in units
        if o != d
    ]
    return pd.DataFrame(rows)


def _totals(od: pd.DataFrame) -> pd.DataFrame:
    out = od.groupby("origin")["count"].sum().rename("outflow")
    inn = od.groupby("destination")["count"].sum().rename("inflow")
    tot = pd.concat([out, inn], axis=1).rename_axis("unit_id").reset_index()
    return tot.assign(period=od["period"].iloc[0])


def _release(od: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    from flowmodel.inputs.cdr import _protect_totals

    flows = redact(od)
    tot = _totals(od)
    for col in ("outflow", "inflow"):
        tot = redact(tot, column=col, max_column=f"{col}_max")
    return flows, _protect_totals(tot, flows, DEFAULT_THRESHOLD)


@pytest.mark.parametrize(
    ("cells", "why"),
    [
        ({("A", "B"): 15, ("A", "C"): 15}, "saturated: 30 = 2 x 15 says each is 15"),
        ({("A", "B"): 30, ("A", "C"): 0}, "remainder 0 says the redacted cell is 0"),
        ({("A", "B"): 30, ("A", "C"): 7}, "one redacted cell is the remainder"),
        ({("A", "B"): 14, ("A", "C"): 14}, "28 > 15 says each is at least 13"),
    ],
)
def test_totals_that_would_narrow_a_redacted_cell_are_suppressed(cells, why):
    flows, tot = _release(_od(cells))
    a = tot.set_index("unit_id").loc["A"]
    assert np.isnan(a["outflow"]), why
    hidden = flows.loc[flows["origin"] == "A", "count"].isna().sum()
    released = flows.loc[flows["origin"] == "A", "count"].sum()
    assert a["outflow_max"] == released + 15 * hidden  # only what the cells' bounds say


def test_totals_that_leave_every_cell_its_range_are_released():
    # A's two redacted cells hold 15 (of at most 2 x 15): each can still be anything in 0..15
    cells = {("A", "B"): 20, ("A", "C"): 9, ("A", "D"): 6, ("B", "C"): 40}
    _, tot = _release(_od(cells, units=("A", "B", "C", "D")))
    assert tot.set_index("unit_id").loc["A", "outflow"] == 35
    # the inflow of C holds redacted A -> C, whose row total is released: the two equations
    # together could pin it, so C's inflow is withheld although it alone would be safe
    assert np.isnan(tot.set_index("unit_id").loc["C", "inflow"])


def _feasible_ranges(res) -> dict[tuple, tuple[float, float]]:
    """Range of every redacted cell given *everything* a result publishes (an attacker's LP).

    Variables: the redacted OD cells (0..their bound) and the redacted or withheld
    subscriber counts. Constraints: released totals (equal), suppressed totals (at most
    their bound), subscribers of a unit at least its relocations out (next period) and in,
    and every count of ``diagnostics`` and ``report`` within its rounding interval.
    Linear programming relaxes integrality, which can only widen the ranges found here
    for these network-like constraints by less than 1.
    """
    from scipy.optimize import linprog

    from flowmodel.inputs.cdr import _public_base

    var: dict[tuple, tuple[int, float]] = {}

    def term(name, value, bound):
        if not np.isnan(value):
            return (value, None)
        if name not in var:
            var[name] = (len(var), bound if not np.isnan(bound) else np.inf)
        return (0.0, var[name][0])

    f = res.flows.reset_index(drop=True)
    flow = [term(("f", r.origin, r.destination, r.period), r.count, r.max) for r in f.itertuples()]
    subs = {
        (r.unit_id, r.period): term(
            ("s", r.unit_id, r.period), r.cdr_subscribers, r.cdr_subscribers_max
        )
        for r in res.subscribers.itertuples()
    }
    rows: list[tuple[np.ndarray, float]] = []  # a x <= b

    def add(terms, sign, value):
        """sign x (sum of terms) <= sign x value; a term is (constant, None) or (coef, var)."""
        a, const = np.zeros(len(var)), 0.0
        for c, i in terms:
            if i is None:
                const += c
            else:
                a[i] += 1.0 if c == 0.0 else c
        rows.append((sign * a, sign * (value - const)))

    lines: dict[tuple, list] = {}
    for k, r in enumerate(f.itertuples()):
        for key in (("o", r.origin, r.period), ("d", r.destination, r.period), ("t", r.period)):
            lines.setdefault(key, []).append(flow[k])
    for r in res.totals.itertuples():
        for col, side in (("outflow", "o"), ("inflow", "d")):
            terms = lines.get((side, r.unit_id, r.period), [])
            value, bound = getattr(r, col), getattr(r, f"{col}_max")
            if not np.isnan(value):
                add(terms, 1, value)
                add(terms, -1, value)
            elif not np.isnan(bound):
                add(terms, 1, bound)
    periods = sorted({p for _, p in subs})
    before = {p: periods[k - 1] for k, p in enumerate(periods) if k}
    for (side, unit, per), terms in [(k, v) for k, v in lines.items() if k[0] != "t"]:
        at = before.get(per) if side == "o" else per
        if (unit, at) in subs:
            add(
                [
                    *terms,
                    (
                        (-1.0, subs[(unit, at)][1])
                        if subs[(unit, at)][1] is not None
                        else (-subs[(unit, at)][0], None)
                    ),
                ],
                1,
                0.0,
            )
    for r in res.diagnostics.itertuples():
        if np.isnan(r.value) or r.statistic not in (
            "relocations",
            "subscribers_with_home",
            "active_subscribers",
        ):
            continue
        half = r.rounded_to / 2
        terms = (
            lines.get(("t", r.period), [])
            if r.statistic == "relocations"
            else [t for (u, p), t in subs.items() if p == r.period]
        )
        add(terms, 1, r.value + half)
        if r.statistic != "active_subscribers":
            add(terms, -1, r.value - half)
    n_subs = res.report.get("subscribers", np.nan)
    if not np.isnan(n_subs):
        half = _public_base(max(n_subs, 1), res.threshold) / 2
        for p in periods:
            add([t for (u, q), t in subs.items() if q == p], 1, n_subs + half)
    a_ub = np.array([a for a, _ in rows]) if rows else None
    b_ub = np.array([b for _, b in rows]) if rows else None
    bounds = [
        (0.0, None if np.isinf(hi) else hi)
        for _, (i, hi) in sorted(var.items(), key=lambda x: x[1][0])
    ]
    out = {}
    for name, (i, hi) in var.items():
        if np.isinf(hi):
            continue  # a withheld subscriber count: above the threshold, not redacted
        c = np.zeros(len(var))
        c[i] = 1.0
        lo = linprog(c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
        up = linprog(-c, A_ub=a_ub, b_ub=b_ub, bounds=bounds, method="highs")
        assert lo.status == 0 and up.status == 0, name  # the truth is feasible
        out[name] = (lo.fun, -up.fun)
    return out


def _random_world(rng: np.random.Generator) -> tuple[dict[str, list[str]], list[str], int]:
    """Trajectories of a small world: stayers and movers with counts around the threshold."""
    n_units, n_months = int(rng.integers(2, 5)), int(rng.integers(2, 4))
    ids, months = UNIT_IDS[:n_units], ["2024-01", "2024-02", "2024-03"][:n_months]
    sizes = np.array([0, 0, 0, 1, 3, 7, 14, 15, 16, 17, 20, 30, 45])
    traj, k = {}, 0
    for u in ids:
        for _ in range(int(rng.choice([0, 2, 10, 40]))):
            traj[f"s{k}"], k = [u] * n_months, k + 1
    for t in range(1, n_months):
        for o in ids:
            for d in ids:
                for _ in range(int(rng.choice(sizes)) if o != d else 0):
                    traj[f"s{k}"], k = [o] * t + [d] * (n_months - t), k + 1
    return traj, months, n_units


def _spread_events(traj: dict[str, list[str]], months: list[str]) -> pd.DataFrame:
    rows = [
        (sid, np.datetime64(f"{month}-{d * 4 + 2:02d}T22:15:00"), CELL_OF[home])
        for sid, homes in traj.items()
        for month, home in zip(months, homes, strict=True)
        for d in range(6)
    ]
    return pd.DataFrame(rows, columns=["subscriber_id", "timestamp", "cell_id"])


@pytest.mark.parametrize("seed", range(3))
def test_nothing_published_narrows_a_redacted_cell(units, towers, seed):
    """Exhaustive audit on random small worlds: the attacker's best bounds from everything.

    Every released cell, total and subscriber count and every number of the
    diagnostics and report together leave each redacted OD cell its whole range
    0..15, and pin no redacted subscriber count (which, in rare tiny worlds whose units
    hold almost only movers, the OD cells can bound by a few subscribers).
    """
    rng = np.random.default_rng(100 + seed)
    audited = 0
    for _ in range(8):
        traj, months, n = _random_world(rng)
        if not traj:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            res = cdr_flows(
                _spread_events(traj, months),
                towers.iloc[:n],
                units.iloc[:n],
                night=(19, 7),
                min_active_days=3,
            )
        for name, (lo, hi) in _feasible_ranges(res).items():
            bound = 15.0
            if name[0] == "f":
                assert lo <= 1e-6 and hi >= bound - 1e-6, (name, lo, hi)
            else:
                assert hi - lo > 1e-6, (name, lo, hi)  # a redacted subscriber count is not pinned
        audited += int(res.flows["count"].isna().sum())
    assert audited > 20  # the worlds hold redacted cells to audit


def test_the_audit_finds_a_leak(units, towers):
    # the saturated row A1 -> A2 = A1 -> B1 = 15 (its total suppressed) ...
    traj = {f"m{k}": ["A1", "A2"] for k in range(15)}
    traj |= {f"n{k}": ["A1", "B1"] for k in range(15)}
    traj |= {f"s{k}": [u, u] for k, u in enumerate(["A1", "A2", "B1"] * 20)}
    res = cdr_flows(_spread_events(traj, ["2024-01", "2024-02"]), towers.iloc[:3], units.iloc[:3])
    tot = res.totals.set_index("unit_id")
    assert np.isnan(tot.loc["A1", "outflow"]) and tot.loc["A1", "outflow_max"] == 30
    assert all(lo == 0 and hi == 15 for lo, hi in _feasible_ranges(res).values() if hi < np.inf)
    # ... released as the old rule did (remainder 30 > 15) pins both cells at 15
    res.totals.loc[res.totals["unit_id"] == "A1", "outflow"] = 30.0
    ranges = _feasible_ranges(res)
    assert ranges[("f", "A1", "A2", "2024-02")] == pytest.approx((15.0, 15.0))


def _numbers(text: str) -> set[float]:
    return {float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", text)}


def _pinning_sums(true: pd.DataFrame, released: pd.DataFrame, threshold: int = 15) -> set[float]:
    """Totals that, with the released cells, pin a redacted cell: for every row, column,
    period and the whole table, released sum + redacted sum when there is one redacted
    cell, or they are all 0, or all at the threshold."""
    merged = true.merge(released, on=["origin", "destination", "period"], suffixes=("", "_r"))
    groups = [["origin", "period"], ["destination", "period"], ["period"]]
    out = set()
    for keys in [*groups, None]:
        for _, g in merged.groupby(keys) if keys else [(None, merged)]:
            h = g.loc[g["count_r"].isna(), "count"]
            if len(h) and (len(h) == 1 or h.sum() == 0 or h.sum() == threshold * len(h)):
                out.add(float(g["count"].sum()))
    return out


@pytest.mark.parametrize(
    "world",
    ["two units: A1 -> A2 = 100 released, A2 -> A1 = 3", "saturated: A1 -> A2 = A1 -> B1 = 15"],
)
def test_no_printed_or_saved_number_pins_a_redacted_cell(
    units, towers, tmp_path, caplog, capsys, world
):
    """Scan every file, log record, warning, stream and repr for a number that pins a cell."""
    if world.startswith("two"):
        n = 2
        traj = {f"m{k}": ["A1", "A2"] for k in range(100)}
        traj |= {f"b{k}": ["A2", "A1"] for k in range(3)}
        traj |= {f"s{k}": [u, u] for k, u in enumerate(["A1", "A2"] * 20)}
    else:
        n = 3
        traj = {f"m{k}": ["A1", "A2"] for k in range(15)}
        traj |= {f"n{k}": ["A1", "B1"] for k in range(15)}
        traj |= {f"r{k}": ["A2", "B1"] for k in range(40)}
        traj |= {f"s{k}": [u, u] for k, u in enumerate(["A1", "A2", "B1"] * 20)}
    months = ["2024-01", "2024-02"]
    true = (
        pd.DataFrame(
            [(h[0], h[1], "2024-02") for h in traj.values() if h[0] != h[1]],
            columns=["origin", "destination", "period"],
        )
        .value_counts()
        .rename("count")
        .reset_index()
    )
    full = (
        pd.DataFrame(
            [(o, d, "2024-02") for o in UNIT_IDS[:n] for d in UNIT_IDS[:n] if o != d],
            columns=["origin", "destination", "period"],
        )
        .merge(true, how="left")
        .fillna({"count": 0.0})
    )
    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        res = cdr_flows(
            _spread_events(traj, months), towers.iloc[:n], units.iloc[:n], progress=True
        )
        print(res, res.report, res.settings)
        print(res.diagnostics.to_string(), res.home_rule.to_string())
    out = tmp_path / "out"
    write_cdr_outputs(res, out)
    ds = build_dataset(units.iloc[:n], covariates=res.covariates, flows={"cdr": res.flows})
    save_dataset(ds, out / "dataset.nc")
    import xarray as xr

    with xr.open_dataset(out / "dataset.nc") as saved:
        nc_text = saved.to_dataframe().to_string() + str(saved.attrs)
    captured = capsys.readouterr()
    texts = [p.read_text() for p in out.glob("*.csv")] + [
        p.read_text() for p in out.glob("*.json")
    ]
    texts += [nc_text, captured.out, captured.err, repr(res), caplog.text]
    texts += [str(w.message) for w in record]
    found = set().union(*(_numbers(t) for t in texts))
    # a number that the released tables print anyway (a cell, a total, a subscriber count,
    # a bound) says nothing new, and a total of 15 or fewer is never printed as a count (see
    # the rounding below); every other pinning total must appear nowhere
    tables = [res.flows, res.totals, res.subscribers]
    published = set().union(*(set(t.select_dtypes("number").stack().tolist()) for t in tables))
    pins = {x for x in _pinning_sums(full, res.flows) if x > 15} - published
    assert not found & pins, f"printed or saved: {sorted(found & pins)}"
    if world.startswith("two"):
        assert pins == {103.0}  # the old log printed "103 relocations"
    else:
        # a saturated total equals its public bound (released + 2 x 15): what must not be
        # published is that it *is* the total
        a1 = res.totals.set_index("unit_id").loc["A1"]
        assert np.isnan(a1["outflow"]) and a1["outflow_max"] == 30
    # counts of subscribers and relocations are printed rounded (to 50 here)
    counts = res.diagnostics.loc[res.diagnostics["rounded_to"] == 50, "value"].dropna()
    assert len(counts) and (counts % 50 == 0).all()
    for key in ("relocations", "subscriber_periods_with_home", "subscribers"):
        assert np.isnan(res.report[key]) or res.report[key] % 50 == 0, key
    assert any("CDR relocation OD" in r.getMessage() for r in caplog.records)  # logs scanned
    # the scan itself finds such a number
    assert _numbers("old log: 103 relocations") & {103.0}


# ----------------------------------------------------------------- simulated world
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    simulate = pytest.importorskip("flowmodel.simulate")
    if not hasattr(simulate, "simulate_world"):
        pytest.skip("flowmodel.simulate.simulate_world is not available")
    return simulate.simulate_world(
        tmp_path_factory.mktemp("world"), n_units=60, raster_size=200, seed=3
    )


@pytest.mark.integration
def test_simulated_world_census_and_cdr_into_dataset(world):
    from flowmodel.inputs.census import read_census_od, read_census_persons

    units = gpd.read_file(world.paths["units"], layer="units")
    truth = world.truth
    # the simulated census records internal movers by previous unit (census_od.csv) and
    # immigrants by previous country only (census_immigrants.csv); it prints zeros, so "<5"
    # holds 1..4
    persons = read_census_persons(
        world.paths["census_persons"],
        units,
        universe="within",
        query="previous_unit != ''",
    )
    od = read_census_od(
        world.paths["census_od"],
        units=units,
        sample_fraction=truth["sample_fraction"],
        suppressed_min=truth["census_suppression"]["min"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the simulator writes a few duplicate events
        cdr = cdr_flows(
            world.paths["cdr_events"],
            world.paths["cdr_towers"],
            units,
            timezone=truth.get("timezone", "Africa/Nairobi"),
        )
    # census: exposure recovers the movers' sample fraction; "<5" cells are censored at 4
    assert np.allclose(persons["exposure"], truth["sample_fraction"], rtol=0.02)
    raw = pd.read_csv(world.paths["census_od"], dtype=str)["count"]
    assert od["count"].isna().sum() == (raw == "<5").sum()
    assert set(od.loc[od["count"].isna(), "max"]) <= {4.0}
    assert set(od.loc[od["count"].isna(), "min"]) <= {1.0}
    assert (od["count"] == 0).sum() == (raw == "0").sum()
    # the OD table is the person records aggregated, with "<5" censored
    merged = od.merge(persons, on=["origin", "destination"], suffixes=("_od", "_p"))
    assert len(merged) == len(od) == len(persons)
    shown = merged["count_od"].notna()
    assert (merged.loc[shown, "count_od"] == merged.loc[shown, "count_p"]).all()
    assert merged.loc[~shown, "count_p"].between(1, 4).all()
    # CDR: relocations between consecutive months, labelled by the later month
    assert sorted(cdr.flows["period"].unique()) == truth["cdr_periods"][1:]
    true_homes = pd.read_csv(world.paths["true_cdr_homes"])
    assert cdr.report["subscribers"] == true_homes["subscriber_id"].nunique()
    assert 0.85 * len(true_homes) <= cdr.report["subscriber_periods_with_home"] <= len(true_homes)
    covered = set(cdr.flows["origin"])
    assert {str(c) for c in units.loc[units["unit_id"].isin(covered), "country"]} == set(
        truth["cdr_countries"]
    )
    ds = build_dataset(
        units,
        covariates=pd.read_csv(world.paths["true_covariates"]).set_index("unit_id")[
            ["population"]
        ],
        flows={"census": persons, "cdr": cdr.flows},
    )
    assert {
        "flow_census",
        "flow_census_weighted",
        "exposure_census",
        "flow_cdr",
        "flow_cdr_max",
    } <= set(ds)
    assert int(ds["flow_census"].notnull().sum()) == len(
        persons
    )  # every within-country pair, zeros too
    assert int(ds["flow_cdr"].notnull().sum()) > 0 and int(ds["flow_cdr_max"].notnull().sum()) > 0
    assert not bool((ds["flow_cdr"] <= 15).any())


# ------------------------------------------------- home detection at two activity levels
#: A one-operator log with 4 monthly windows and a realistic share of movers (about 1 % of
#: subscribers a month): 6 000 subscribers in 15 units, about 200 moves.
ACTIVITY_WORLD = {
    "n_units": 30,
    "n_countries": 2,
    "census_countries": 1,
    "cdr_countries": 1,
    "raster_size": 150,
    "seed": 5,
    "n_periods": 4,
    "cdr_scale": 0.02,
    "n_subscribers": 6000,
}


@pytest.fixture(scope="module", params=[None, 4.0], ids=["dense", "sparse"])
def activity_world(request, tmp_path_factory):
    """The default activity (a median of 10 active nights a month) and a sparse log (4)."""
    from flowmodel.simulate import simulate_world

    return simulate_world(
        tmp_path_factory.mktemp("activity"), cdr_activity=request.param, **ACTIVITY_WORLD
    )


def _against_truth(world, homes) -> dict[str, float]:
    """Detected homes and moves against the simulator's true homes.

    Per-run codes number subscribers in order of first appearance in the log, so the
    test can map them back to the simulated ids (the package never does).
    """
    ids = pd.unique(
        pd.read_parquet(world.paths["cdr_events"], columns=["subscriber_id"])["subscriber_id"]
    )
    truth = pd.read_csv(world.paths["true_cdr_homes"]).pivot(
        index="subscriber_id", columns="period", values="unit_id"
    )
    got = pd.DataFrame(
        {
            "s": ids[homes.subscriber],
            "p": np.asarray(homes.periods)[homes.period],
            "u": homes.unit_ids[homes.unit],
        }
    ).pivot(index="s", columns="p", values="u")
    got = got.reindex(index=truth.index, columns=truth.columns).to_numpy()
    true = truth.to_numpy()
    has = pd.notna(got)
    both = has[:, 1:] & has[:, :-1]
    return {
        "accuracy": float(((got == true) & has).sum() / has.sum()),
        "coverage": float(has.mean()),
        "moves": float((both & (got[:, 1:] != got[:, :-1])).sum()),
        "true_moves_located": float((both & (true[:, 1:] != true[:, :-1])).sum()),
        "true_moves": float((true[:, 1:] != true[:, :-1]).sum()),
        # moves between homes of which at least one is wrong, per subscriber with a home in
        # two consecutive periods: what spurious_rate_estimate estimates
        "spurious_rate": float(
            (
                both
                & (got[:, 1:] != got[:, :-1])
                & ~((got[:, 1:] == true[:, 1:]) & (got[:, :-1] == true[:, :-1]))
            ).sum()
            / max(both.sum(), 1)
        ),
    }


@pytest.mark.integration
def test_home_detection_defaults_from_the_data(activity_world, caplog):
    """Chosen defaults recover homes and relocations on a dense and a sparse log."""
    caplog.set_level(logging.INFO, logger="flowmodel.inputs.cdr")
    units = activity_world.units()
    tu = assign_towers(read_towers(activity_world.paths["cdr_towers"]), units)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a few duplicate events
        homes = detect_homes(
            activity_world.paths["cdr_events"],
            tu,
            units["unit_id"].tolist(),
            timezone=activity_world.truth["timezone"],
        )
    m = homes.settings["min_active_days"]
    # the chosen values are printed, with why
    assert re.search(r"night 21:00-06:00 \(data \(hours when subscribers", caplog.text)
    assert re.search(rf"min_active_days={m} \(data \(the smallest value", caplog.text)
    assert homes.settings["spurious_share_estimate"] <= 0.05
    got = _against_truth(activity_world, homes)
    # the rate of spurious moves (the CDR model's background) from moves out and back:
    # measured 0.000172 against 0.000170 (dense), 0.00037 against 0 (sparse: the +1 of
    # the estimate); one night at the home: see below
    est = homes.settings["spurious_rate_estimate"]
    assert est == pytest.approx(got["spurious_rate"], rel=0.5, abs=1e-3)
    # >= 90 % of the subscriber-periods given a home get the right one (measured: 99.99 %)
    assert got["accuracy"] >= 0.9
    # relocations within 10 % of the true moves of the subscribers located in both months
    assert got["moves"] == pytest.approx(got["true_moves_located"], rel=0.1)
    sparse = activity_world.truth.get("cdr_activity") is not None
    if sparse:
        # the sparse log needs more nights; most subscriber-months still get a home, far
        # more than with the old fixed 5 nights (which also cost nothing in accuracy)
        assert m >= 3 and got["coverage"] > 0.6
        # with one night many homes are misplaced, and the estimate follows
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            one = detect_homes(
                activity_world.paths["cdr_events"],
                tu,
                units["unit_id"].tolist(),
                timezone=activity_world.truth["timezone"],
                min_active_days=1,
            )
        # measured 0.00995 against 0.0119
        truth_one = _against_truth(activity_world, one)["spurious_rate"]
        assert truth_one > 0.005
        assert one.settings["spurious_rate_estimate"] == pytest.approx(truth_one, rel=0.3)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            old = detect_homes(
                activity_world.paths["cdr_events"],
                tu,
                units["unit_id"].tolist(),
                timezone=activity_world.truth["timezone"],
                night=(19, 7),
                min_active_days=5,
            )
        assert any(
            "most subscribers active at night get no home" in str(w.message) for w in record
        )
        assert got["coverage"] > 1.5 * _against_truth(activity_world, old)["coverage"]
        # the subscribers it cannot locate in two consecutive months are missing from the
        # counts: about half of the true moves (a measured finding, see docs/census_cdr.md)
        assert 0.4 < got["moves"] / got["true_moves"] < 0.8
    else:
        assert m <= 2 and got["coverage"] > 0.97
        assert got["moves"] == pytest.approx(got["true_moves"], rel=0.1)


@pytest.mark.integration
def test_diagnostics_published_with_the_result(activity_world, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="flowmodel.inputs.cdr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = cdr_flows(
            activity_world.paths["cdr_events"],
            activity_world.paths["cdr_towers"],
            activity_world.units(),
            timezone=activity_world.truth["timezone"],
        )
    d = res.diagnostics.pivot(index="period", columns="statistic", values="value")
    months = activity_world.truth["cdr_periods"]
    assert list(d.index) == months
    assert set(d.columns) >= {
        "events",
        "active_subscribers",
        "subscribers_with_home",
        "share_with_home",
        "median_active_nights",
        "events_per_active_subscriber",
        "relocations",
        "relocations_released",
        "cells_released",
        "cells_redacted",
    }
    share = d["share_with_home"]
    assert share.between(0, 1).all()
    nights = d["median_active_nights"]
    if activity_world.truth.get("cdr_activity") is not None:
        assert share.mean() < 0.9 and nights.between(3, 6).all()
    else:
        assert share.mean() > 0.95 and nights.between(8, 13).all()
    # relocations per relocation period: rounded, at least the released cells
    moved = d["relocations"].dropna()
    assert (
        list(moved.index) == months[1:]
        and (moved >= d.loc[moved.index, "relocations_released"] - 50).all()
    )
    # the home rule: share with a home falls and the spurious share with min_active_days
    rule = res.home_rule.set_index("min_active_days")
    assert (
        rule["used"].sum() == 1 and rule.index[rule["used"]][0] == res.settings["min_active_days"]
    )
    assert rule["share_with_home"].dropna().is_monotonic_decreasing
    assert res.settings["night"] == (21, 6) and res.hour_profile["night"].sum() == 9
    assert re.search(r"CDR homes: about [\d,]+ subscriber-period\(s\) with a home", caplog.text)
    assert re.search(r"CDR relocation OD: about [\d,]+ relocation\(s\) in 3 period", caplog.text)
    paths = write_cdr_outputs(res, tmp_path)
    assert {"diagnostics", "home_rule", "hour_profile", "settings"} <= set(paths)
