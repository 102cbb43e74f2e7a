"""Pair features: distances, s_ij, contiguity, sparse pair sets."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from pyproj import Geod
from shapely.geometry import box

from flowmodel.dataset import add_cells, build_dataset, validate_dataset
from flowmodel.exceptions import DataContractError
from flowmodel.pairs import (
    cell_members,
    contiguity,
    cross_border,
    geodesic_distance_km,
    in_total_universe,
    intervening_population,
    sparse_pairs,
    total_pairs_outside,
)
from flowmodel.simulate import simulate_flow_dataset, simulate_fusion_dataset


def brute_force_sij(pop: np.ndarray, dist: np.ndarray) -> np.ndarray:
    n = len(pop)
    out = np.full((n, n), np.nan)
    for i in range(n):
        for j in range(n):
            if i != j:
                inside = [k for k in range(n) if k not in (i, j) and dist[i, k] <= dist[i, j]]
                out[i, j] = pop[inside].sum()
    return out


# ----------------------------------------------------------------------------- distances
def test_distances_equal_pyproj_to_one_metre(rng):
    lon = rng.uniform(-180, 180, 40)
    lat = rng.uniform(-80, 80, 40)
    got = geodesic_distance_km(lon, lat)
    geod = Geod(ellps="WGS84")
    for i in range(0, 40, 7):
        for j in range(40):
            _, _, m = geod.inv(lon[i], lat[i], lon[j], lat[j])
            assert abs(got[i, j] * 1000 - m) < 1.0


def test_distance_known_value():
    # one degree of longitude on the equator, WGS84: 111.319 km
    d = geodesic_distance_km(np.array([0.0]), np.array([0.0]), np.array([1.0]), np.array([0.0]))
    assert d.shape == (1, 1)
    assert d[0, 0] == pytest.approx(111.319491, abs=1e-3)


def test_cross_border():
    country = xr.DataArray(["A", "A", "B"], dims="unit", coords={"unit": ["u1", "u2", "u3"]})
    cb = cross_border(country)
    assert cb.dims == ("origin", "destination")
    assert cb.values.tolist() == [[False, False, True], [False, False, True], [True, True, False]]


# ----------------------------------------------------------------------------- s_ij
@pytest.mark.parametrize("block_size", [1, 7, 512])
def test_sij_equals_brute_force_random_points(rng, block_size):
    n = 45
    xy = rng.uniform(0, 10, (n, 2))
    dist = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(dist, np.nan)
    pop = rng.uniform(10, 1e5, n)
    got = intervening_population(pop, dist, block_size=block_size)
    np.testing.assert_allclose(got, brute_force_sij(pop, dist), rtol=1e-10, equal_nan=True)
    assert np.isnan(np.diag(got)).all()


def test_sij_tie_rule_counts_equidistant_units(rng):
    # integer distances: many ties; k at exactly d_ij is inside (closed disk)
    n = 30
    dist = rng.integers(1, 5, (n, n)).astype(float)
    pop = rng.integers(1, 100, n).astype(float)
    got = intervening_population(pop, dist, block_size=4)
    np.testing.assert_allclose(got, brute_force_sij(pop, dist), rtol=1e-12, equal_nan=True)
    # order independence: permuting units permutes s_ij
    perm = rng.permutation(n)
    got_p = intervening_population(pop[perm], dist[np.ix_(perm, perm)])
    np.testing.assert_allclose(got_p, got[np.ix_(perm, perm)], rtol=1e-12, equal_nan=True)


def test_sij_small_known_answer():
    # points on a line at 0, 1, 2, 3 with populations 1, 10, 100, 1000
    x = np.array([0.0, 1.0, 2.0, 3.0])
    dist = np.abs(x[:, None] - x[None, :])
    pop = np.array([1.0, 10.0, 100.0, 1000.0])
    s = intervening_population(pop, dist)
    assert s[0, 3] == 110.0  # units 1 and 2 lie between
    assert s[0, 1] == 0.0
    assert s[1, 2] == 1.0  # unit 0 is at distance 1 from unit 1, the same as unit 2: tie counts
    assert s[3, 0] == 110.0


def test_sij_accepts_dataarray_and_dask():
    ds, _ = simulate_flow_dataset(30, 2, seed=3)
    ref = intervening_population(ds["population"].values, ds["distance_km"].values)
    lazy = ds["distance_km"].chunk({"origin": 10})
    got = intervening_population(ds["population"], lazy)
    np.testing.assert_array_equal(got, ref)


def test_sij_errors():
    with pytest.raises(DataContractError, match=r"expected \(n,\) and \(n, n\)"):
        intervening_population(np.ones(3), np.ones((3, 4)))
    dist = np.ones((3, 3))
    dist[0, 2] = np.nan
    with pytest.raises(
        DataContractError, match=r"bad \(origin, destination\) positions \[\(0, 2\)\]"
    ):
        intervening_population(np.ones(3), dist)
    with pytest.raises(DataContractError, match=r"population must be finite and >= 0.*\[1\]"):
        intervening_population(np.array([1.0, -2.0, 3.0]), np.ones((3, 3)))


# ----------------------------------------------------------------------------- contiguity
def grid_units(nx: int = 3, ny: int = 2) -> gpd.GeoDataFrame:
    cells = [box(x, y, x + 1, y + 1) for y in range(ny) for x in range(nx)]
    ids = [f"g{k}" for k in range(len(cells))]
    return gpd.GeoDataFrame(
        {"unit_id": ids, "country": ["A"] * len(cells)}, geometry=cells, crs="EPSG:4326"
    )


def test_contiguity_queen_and_rook_on_grid():
    units = grid_units()  # 0 1 2 / 3 4 5
    queen = contiguity(units)
    rook = contiguity(units, rule="rook")
    assert queen.dtype == bool and queen.shape == (6, 6)
    assert not queen.diagonal().any()
    assert (queen == queen.T).all()
    assert queen[0, 1] and queen[0, 3] and queen[0, 4]  # corner touch counts for queen
    assert not queen[0, 2] and not queen[0, 5]
    assert rook[0, 1] and rook[0, 3] and not rook[0, 4]
    assert rook.sum() == 2 * 7  # 7 shared edges in a 3 x 2 grid


def test_contiguity_bad_rule():
    with pytest.raises(DataContractError, match="rule='bishop' is unknown"):
        contiguity(grid_units(), rule="bishop")


def test_build_dataset_uses_contiguity():
    units = grid_units()
    units["population"] = 100.0
    ds = build_dataset(units)
    np.testing.assert_array_equal(ds["contiguous"].values, contiguity(units))


# ----------------------------------------------------------------------------- sparse
def test_sparse_pairs_k_nearest_dense_matches_argsort():
    ds, _ = simulate_flow_dataset(40, 3, seed=1, observed_countries=["C00"])
    sp = sparse_pairs(ds, k=5, include_observed=False)
    assert sp.sizes["pair"] == 40 * 5
    assert (sp["origin"] != sp["destination"]).all()
    d = ds["distance_km"].values
    for i, uid in enumerate(ds["unit"].values[:10]):
        sel = sp.where(sp["origin"] == uid, drop=True)
        expected = set(ds["unit"].values[np.argsort(np.where(np.isnan(d[i]), np.inf, d[i]))[:5]])
        assert set(sel["destination"].values) == expected
    # values gathered at the right pairs
    one = sp.isel(pair=3)
    ref = ds.sel(origin=one["origin"].item(), destination=one["destination"].item())
    assert one["distance_km"].item() == ref["distance_km"].item()
    assert np.array_equal(one["flow_census"].item(), ref["flow_census"].item(), equal_nan=True)
    validate_dataset(sp)


def test_sparse_pairs_keeps_observed_and_radius():
    ds, _ = simulate_flow_dataset(40, 3, seed=1, observed_countries=["C00"])
    sp = sparse_pairs(ds, max_km=150.0)
    d = ds["distance_km"].values
    observed = ds["flow_census"].notnull().values
    within = np.nan_to_num(d, nan=np.inf) <= 150.0
    assert sp.sizes["pair"] == int((within | observed).sum())
    assert int(sp["flow_census"].notnull().sum()) == int(observed.sum())


def test_sparse_pairs_without_dense_matrix_equals_dense():
    ds, _ = simulate_flow_dataset(60, 3, seed=2)
    unit_only = ds.drop_vars([n for n, v in ds.variables.items() if "origin" in v.dims])
    for kwargs in ({"k": 6}, {"max_km": 200.0}, {"k": 4, "max_km": 120.0}):
        a = sparse_pairs(ds, include_observed=False, **kwargs)
        b = sparse_pairs(unit_only, **kwargs)
        assert a.sizes["pair"] == b.sizes["pair"], kwargs
        np.testing.assert_array_equal(a["origin"].values, b["origin"].values)
        np.testing.assert_array_equal(a["destination"].values, b["destination"].values)
        np.testing.assert_allclose(a["distance_km"].values, b["distance_km"].values, rtol=1e-9)
        np.testing.assert_array_equal(a["cross_border"].values, b["cross_border"].values)


def test_sparse_pairs_errors():
    ds, _ = simulate_flow_dataset(10, 2, seed=0)
    with pytest.raises(DataContractError, match=r"give k .* and/or max_km"):
        sparse_pairs(ds)
    with pytest.raises(DataContractError, match="must be positive"):
        sparse_pairs(ds, k=0)
    bare = ds.drop_vars(
        ["lon", "lat", *[n for n, v in ds.variables.items() if "origin" in v.dims]]
    )
    with pytest.raises(DataContractError, match="neither a dense 'distance_km' nor 'lon'/'lat'"):
        sparse_pairs(bare, k=3)


def _kept(sp: xr.Dataset) -> set[tuple[str, str]]:
    origin, destination = sp["origin"].values.astype(str), sp["destination"].values.astype(str)
    return set(zip(origin, destination, strict=True))


def test_sparse_pairs_keeps_censored_only_pairs_and_their_bounds():
    ds, _ = simulate_flow_dataset(30, 3, seed=5, observed_countries=["C00"])
    d = np.nan_to_num(ds["distance_km"].values, nan=-np.inf)
    o, j = np.unravel_index(np.argmax(d), d.shape)  # the farthest pair: never among the k nearest
    y = ds["flow_census"].values.copy()
    upper = np.full_like(y, np.nan)
    y[o, j], upper[o, j] = np.nan, 4.0
    ds = ds.assign(
        flow_census=(("origin", "destination"), y),
        flow_census_max=(("origin", "destination"), upper),
    )
    ids = ds["unit"].values.astype(str)
    assert (ids[o], ids[j]) not in _kept(sparse_pairs(ds, k=2, include_observed=False))
    sp = sparse_pairs(ds, k=2)
    assert (ids[o], ids[j]) in _kept(sp)
    at = (sp["origin"] == ids[o]) & (sp["destination"] == ids[j])
    assert sp["flow_census_max"].where(at, drop=True).values.tolist() == [4.0]


def test_sparse_pairs_keeps_every_member_of_aggregated_cells():
    ds, _ = simulate_flow_dataset(20, 2, seed=6, observed_countries=["C00"])
    ids = ds["unit"].values.astype(str)
    country = ds["country"].values.astype(str)
    into = int(np.flatnonzero(country == "C00")[0])
    table = pd.DataFrame({"origin": ["C01"], "destination": [ids[into]], "count": [np.nan]})
    table["max"] = 4.0  # a censored cell still needs its members
    ds = add_cells(ds, "abroad", table, origin_level="country", destination_level="unit")
    members = cell_members(ds, ["C01"], [ids[into]], "country", "unit")
    assert set(members["i"]) == set(np.flatnonzero(country == "C01"))
    assert set(members["j"]) == {into}
    sp = sparse_pairs(ds, k=1)
    assert {(ids[i], ids[j]) for i, j in zip(members["i"], members["j"], strict=True)} <= _kept(sp)
    assert "flow_abroad" in sp and sp["flow_abroad"].dims == ("cell_abroad",)


def test_sparse_pairs_keeps_the_universe_of_reported_totals():
    ds, _ = simulate_fusion_dataset(units_per_country=4, seed=1, totals=True)
    hidden = (ds["origin"] == "U004") & (ds["destination"] == "U005")
    for name in ("flow_cdr", "flow_cdr_max", "flow_census"):
        ds[name] = ds[name].where(~hidden)
    assert ("U004", "U005") in _kept(sparse_pairs(ds, k=1))
    no_totals = ds.drop_vars([n for n in ds.data_vars if str(n).startswith("cdr_")])
    assert ("U004", "U005") not in _kept(sparse_pairs(no_totals, k=1))


def test_total_universe_counts_match_a_dense_mask(rng):
    n = 15
    country = np.array(["A", "B", "C"])[rng.integers(0, 3, n)]
    origin_units = rng.random(n) < 0.5
    covered_units = origin_units | (rng.random(n) < 0.5)
    o, d = np.nonzero(~np.eye(n, dtype=bool))
    keep = rng.random(len(o)) < 0.7
    for universe in ("covered", "within"):
        mask = origin_units[:, None] & covered_units[None, :] & ~np.eye(n, dtype=bool)
        if universe == "within":
            mask &= country[:, None] == country[None, :]
        inside = in_total_universe(o, d, origin_units, covered_units, country, universe)
        np.testing.assert_array_equal(inside, mask[o, d])
        have = np.zeros((n, n), dtype=bool)
        have[o[keep], d[keep]] = True
        for kind, axis in (("outflow", 1), ("inflow", 0)):
            got = total_pairs_outside(
                o[keep], d[keep], kind, origin_units, covered_units, country, universe
            )
            np.testing.assert_array_equal(got, (mask & ~have).sum(axis=axis))


def test_sparse_pairs_from_lonlat_gathers_dense_flows_and_observed_pairs():
    ds, _ = simulate_flow_dataset(40, 3, seed=1, observed_countries=["C00"])
    no_matrix = ds.drop_vars(["distance_km", "cross_border"])
    for include in (True, False):
        a = sparse_pairs(ds, k=3, include_observed=include)
        b = sparse_pairs(no_matrix, k=3, include_observed=include)
        np.testing.assert_array_equal(a["origin"].values, b["origin"].values)
        np.testing.assert_array_equal(a["destination"].values, b["destination"].values)
        np.testing.assert_allclose(a["distance_km"].values, b["distance_km"].values, rtol=1e-9)
        np.testing.assert_array_equal(a["cross_border"].values, b["cross_border"].values)
        xr.testing.assert_equal(a["flow_census"], b["flow_census"])
    kept = sparse_pairs(no_matrix, k=3)["flow_census"]
    assert int(kept.notnull().sum()) == int(ds["flow_census"].notnull().sum())
