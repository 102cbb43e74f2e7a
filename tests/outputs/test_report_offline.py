"""The report answers "how many moved where", flags untrustworthy fits and works offline."""

from __future__ import annotations

import json
import re
import warnings
from html.parser import HTMLParser
from importlib import resources

import geopandas as gpd
import numpy as np
import pytest
from shapely.geometry import box

from flowmodel.outputs.io import read_flows_csv, write_flows_csv
from flowmodel.outputs.report import data_coverage, diagnostics, report
from flowmodel.simulate import simulate_flow_dataset

URL = re.compile(r"(?i)(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}")
FETCHING = {"src", "href", "action", "data", "poster", "srcset", "xlink:href", "formaction"}


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.styles: list[str] = []
        self.scripts: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attrs))
        if attrs.get("style"):
            self.styles.append(attrs["style"])
        self._in = tag if tag in ("style", "script") else None

    handle_startendtag = handle_starttag

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "style":
            self.styles.append(data)
        elif self._in == "script":
            self.scripts.append(data)


def external_references(text: str) -> list[str]:
    """Every place an HTML page would fetch something from the network (none allowed)."""
    page = _Collector()
    page.feed(text)
    found = []
    for tag, attrs in page.elements:
        for name, value in attrs.items():
            if name in FETCHING and URL.search(value):
                found.append(f"<{tag} {name}={value[:80]}>")
        if tag == "link" and attrs.get("rel") in ("stylesheet", "preconnect", "dns-prefetch"):
            found.append(f"<link {attrs}>")
    for css in page.styles:
        found += [
            f"css {u}" for u in re.findall(r"url\(\s*['\"]?([^)'\"]+)", css) if URL.search(u)
        ]
        found += [f"css {u}" for u in re.findall(r"@import\s+['\"]?([^;'\"]+)", css)]
    for js in page.scripts:
        found += [f"script {u}" for u in URL.findall(js)]
    return found


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from flowmodel.models.gravity import GravityModel
    from flowmodel.totals import predict_totals

    ds, truth = simulate_flow_dataset(24, 3, seed=2, sample_fraction=0.1)
    model = GravityModel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(ds, backend="laplace", random_seed=1, draws=150, chains=2)
    pred = model.predict(ds)
    totals = predict_totals(model, ds)
    geo = gpd.GeoDataFrame(
        {"unit_id": ds["unit"].values},
        geometry=[
            box(x - 0.2, y - 0.2, x + 0.2, y + 0.2)
            for x, y in zip(ds["lon"].values, ds["lat"].values, strict=True)
        ],
        crs="EPSG:4326",
    )
    out = tmp_path_factory.mktemp("report")
    path = report(
        out,
        data=ds,
        predictions=pred,
        model=model,
        units_geometry=geo,
        totals=totals,
        truth=truth,
        period="2019-2024",
        top_k=40,
    )
    csv = write_flows_csv(pred, out / "flows.csv", data=ds)
    return {
        "ds": ds,
        "model": model,
        "pred": pred,
        "totals": totals,
        "html": path.read_text(encoding="utf-8"),
        "csv": csv,
    }


def test_report_is_rendered_from_a_packaged_template():
    templates = resources.files("flowmodel.outputs") / "templates"
    for name in ("report.html.j2", "report.css", "report.js"):
        assert (templates / name).is_file(), name


def test_report_references_no_external_url(run):
    html = run["html"]
    assert external_references(html) == []
    # and the checker finds what it must find
    assert external_references('<script src="https://cdn.example.org/x.js"></script>')
    assert external_references("<style>@font-face{src:url(//fonts.gstatic.com/a.woff)}</style>")
    assert external_references('<img src="data:image/png;base64,AAAA">') == []


def test_summary_answers_how_many_moved_where(run):
    html, totals = run["html"], run["totals"]
    assert "How many people moved where" in html and "2019-2024" in html
    movers = f"{float(totals['total_movers_mean']):,.0f}"
    low, high = (f"{float(totals[f'total_movers_{q}']):,.0f}" for q in ("q05", "q95"))
    assert f"<b>{movers}</b> people" in html and f"{low} to {high}" in html
    cross = f"{float(totals['cross_border_mean']):,.0f}"
    assert f"<b>{cross}</b>" in html
    for code in totals["country"].values:
        net = float(totals["country_net_mean"].sel(country=code))
        assert f"{net:+,.0f}" in html
    assert html.index("How many people moved where") < html.index("Observed vs predicted")


def test_banner_flags_an_approximate_fit_and_pareto_k(run):
    items = diagnostics(run["model"])
    titles = " | ".join(i["title"] for i in items)
    assert "Approximate fit (laplace)" in titles
    approx = next(i for i in items if i["title"].startswith("Approximate"))
    assert approx["level"] == "warn" and "R-hat and ESS say nothing" in approx["text"]
    assert "R-hat" not in titles  # no MCMC diagnostics shown for independent draws
    assert "Pareto k" in titles  # the fit stored a pointwise log-likelihood
    assert 'class="banner"' in run["html"] and "Approximate fit (laplace)" in run["html"]


def _paths(html: str, cls: str) -> list[dict[str, str]]:
    page = _Collector()
    page.feed(html)
    return [a for tag, a in page.elements if tag == "path" and cls in a.get("class", "").split()]


def test_interactive_map_data_match_flows_csv(run):
    flows = _paths(run["html"], "flow")
    assert len(flows) == 40
    table, _ = read_flows_csv(run["csv"])
    table = table.set_index(["origin", "destination"])
    for f in flows:
        row = table.loc[(f["data-origin"], f["data-destination"])]
        for name in ("mean", "q05", "q95"):
            assert float(f[f"data-{name}"]) == row[name]
        assert f"{row['mean']:,.0f} persons" in f["data-tip"]
    top = table["mean"].nlargest(40)
    assert {(f["data-origin"], f["data-destination"]) for f in flows} == set(top.index)
    cross = [f for f in flows if "cross" in f["class"].split()]
    assert all(
        bool(table.loc[(f["data-origin"], f["data-destination"]), "cross_border"]) for f in cross
    )


def test_net_migration_map_matches_totals(run):
    units = [u for u in _paths(run["html"], "unit") if u.get("data-net")]
    assert len(units) == run["ds"].sizes["unit"]
    net = run["totals"]["unit_net_mean"].to_series()
    for u in units:
        assert float(u["data-net"]) == net[u["data-unit"]]
        assert "net migration" in u["data-tip"] and "90%" in u["data-tip"]
    gains = [u for u in units if float(u["data-net"]) > 0]
    assert gains and all(u["fill"] != "#cccccc" for u in gains)


def test_coverage_is_derived_from_the_dataset_whatever_its_sources():
    ds, _ = simulate_flow_dataset(20, 3, seed=6, observed_pairs="within", sample_fraction=0.1)
    country = ds["country"].values.astype(str)
    codes = sorted(set(country))
    # a second table at country x unit level (previous country of immigrants), partly suppressed
    immig = np.full((len(codes), ds.sizes["unit"]), np.nan)
    immig[0, country == codes[1]] = 7.0
    bound = np.where(np.isnan(immig), np.nan, np.nan)
    bound[0, country == codes[2]] = 4.0
    ds["flow_immigrants"] = (("origin_country", "unit"), immig, {"period": "2015-2020"})
    ds["flow_immigrants_max"] = (("origin_country", "unit"), bound)
    ds = ds.assign_coords(origin_country=codes)
    ds["flow_census"].attrs["period"] = "2019-2024"
    coverage = data_coverage(ds)
    rows = {r["source"]: r for r in coverage["sources"]}
    assert set(rows) == {"census", "immigrants"}
    assert rows["census"]["fraction"] == "0.1" and rows["census"]["period"] == "2019-2024"
    assert rows["immigrants"]["period"] == "2015-2020"
    n_seen, n_cens = int((country == codes[1]).sum()), int((country == codes[2]).sum())
    assert rows["immigrants"]["censored"] == f"{n_cens / (n_seen + n_cens):.0%}"
    assert set(rows["immigrants"]["countries"].split(", ")) == set(codes)
    assert rows["census"]["countries"] == ", ".join(codes)


def test_report_without_totals_says_so(tmp_path, run):
    ds, pred = run["ds"], run["pred"]
    html = report(tmp_path, data=ds, predictions=pred).read_text(encoding="utf-8")
    assert "No migration totals were given" in html
    assert "unspecified (the census window)" in html
    assert external_references(html) == []


def test_summary_observed_is_on_the_population_scale(run):
    """The largest-flows table shows count / sample fraction, not the raw sample count."""
    ds, pred = run["ds"], run["pred"]
    html = run["html"]
    table = pred["mean"].to_series().dropna().nlargest(10)
    fraction = ds["exposure_census"].rename(unit="origin")  # applies to the origin unit
    obs = (ds["flow_census"] / fraction).to_series().reindex(table.index)
    shown = obs.dropna().tolist()
    assert shown, "no observed pair among the largest flows"
    for value in shown:
        assert f"<td>{value:,.0f}</td>" in html


def test_json_provenance_names_files_not_paths(tmp_path, run):
    ds, pred = run["ds"], run["pred"]
    files = [{"name": "census_od.csv", "sha256": "ab" * 32, "role": "flows.census.path"}]
    html = report(
        tmp_path,
        data=ds,
        predictions=pred,
        attrs={"input_files": json.dumps(files), "period": "2019-2024"},
    ).read_text(encoding="utf-8")
    assert "census_od.csv" in html and "ab" * 32 in html
    assert str(tmp_path) not in html.split("Provenance")[1]


def test_countries_seen_only_by_phone_data_are_named_and_the_report_says_why_it_matters(tmp_path):
    """A CDR-only country pins share x level only; a census or country totals there pin the level."""
    import pandas as pd
    import xarray as xr

    from flowmodel.dataset import marginals_to_dataset
    from flowmodel.simulate import simulate_fusion_dataset

    ds, truth = simulate_fusion_dataset(units_per_country=4, seed=1)
    # census in C00 and C01 (every destination), CDR within C01, C02, C03
    assert data_coverage(ds)["cdr_only"] == ["C02", "C03"]
    # a census elsewhere that records movers *from* C02 (cross-border cells) measures its level
    census = ds["flow_census"].copy()
    country = ds["country"].values.astype(str)
    from_c02 = (country == "C02")[:, None] & (country == "C04")[None, :]
    census.values[from_c02] = 3.0
    assert data_coverage(ds.assign(flow_census=census))["cdr_only"] == ["C03"]
    # ... and so does a census table of immigrants by previous *country* (cells at another
    # level): its cells count as moves abroad of C03 and in-migration of C00
    from flowmodel.dataset import add_cells

    dest = ds["unit"].values.astype(str)[country == "C00"][:3]
    abroad = pd.DataFrame({"origin": "C03", "destination": dest, "count": [4.0, 9.0, 2.0]})
    with_abroad = add_cells(ds, "abroad", abroad, origin_level="country")
    coverage = data_coverage(with_abroad)
    assert coverage["cdr_only"] == ["C02"]
    row = next(r for r in coverage["sources"] if r["source"] == "abroad")
    assert row["cross_border"] == 3 and row["countries"] == "–"
    cells = {c["country"]: c["cells"]["abroad"] for c in coverage["countries"]}
    assert cells["C03"] == "moves abroad: 3 cells"
    assert cells["C00"] == "in-migration from abroad: 3 cells"
    # the no-data countries: the census counts moves into them, none within them
    assert coverage["uncovered"] == ["C04", "C05"] and coverage["uncovered_with_level"] == []
    # so do country-pair totals out of C03
    table = pd.DataFrame(
        {"origin_country": ["C03"], "destination_country": ["C03"], "value": [500.0]}
    )
    assert data_coverage(marginals_to_dataset(ds, table))["cdr_only"] == ["C02"]
    # no CDR: nothing to say
    assert data_coverage(ds.drop_vars(["flow_cdr", "flow_cdr_max"]))["cdr_only"] == []

    # two flow sources and no `source=`: nothing to plot observed against (this once crashed
    # the template on the missing figure)
    mu = truth["mu"]
    pred = xr.Dataset({"mean": mu, "q05": 0.5 * mu, "q50": mu, "q95": 2.0 * mu})
    html = report(tmp_path, data=ds, predictions=pred).read_text(encoding="utf-8")
    note = html.split("In C02, C03 only phone data count moves")
    assert len(note) == 2, "the CDR-only note is missing"
    assert "market_share_country" in note[1].split("</p>")[0]
    # a no-data country whose emigrants a census abroad records has its level measured
    to_c00 = ds["unit"].values.astype(str)[country == "C00"][:2]
    emigrants = pd.DataFrame({"origin": "C04", "destination": to_c00, "count": [5.0, 8.0]})
    with_emigrants = add_cells(ds, "abroad", emigrants, origin_level="country")
    assert data_coverage(with_emigrants)["uncovered_with_level"] == ["C04"]
    html = report(tmp_path / "b", data=with_emigrants, predictions=pred).read_text(
        encoding="utf-8"
    )
    assert "that spread. Here C04 has its\nmoves abroad recorded" in html


def test_the_report_shows_what_the_fit_made_of_the_share_in_cdr_only_countries(tmp_path):
    """The share, the covariate and the offset in prior sds (a posterior built by hand)."""
    import types

    import pandas as pd
    import xarray as xr

    from flowmodel.outputs.report import cdr_only_shares
    from flowmodel.simulate import simulate_fusion_dataset

    ds, truth = simulate_fusion_dataset(units_per_country=4, seed=1)
    country = ds["country"].values.astype(str)
    units = ds["unit"].values.astype(str)[np.isin(country, ["C01", "C02", "C03"])]
    rng = np.random.default_rng(0)
    # C03's shares at a third of C02's; its offset 1.9 prior sds below the centre
    level = {"C01": 0.45, "C02": 0.40, "C03": 0.13}
    centre = np.array([level[c] for c in pd.Series(country, index=ds["unit"].values).loc[units]])
    share = centre[None, None, :] * np.exp(rng.normal(0, 0.1, (2, 50, len(units))))
    offset = np.array([0.1, 0.4, -0.95])[None, None, :] + rng.normal(0, 0.05, (2, 50, 3))
    posterior = xr.Dataset(
        {
            "market_share": (("chain", "draw", "market_unit"), share),
            "market_share_country": (("chain", "draw", "market_country"), offset),
        },
        coords={"market_unit": units, "market_country": ["C01", "C02", "C03"]},
    )
    prior = {"market_share_country": {"dist": "Normal", "mu": 0.0, "sigma": 0.5}}
    model = types.SimpleNamespace(
        posterior=posterior,
        model_config={"market_share_covariate": "cdr_subscribers_per_resident"},
        fit_meta={"priors": prior},
    )
    rows = {r["country"]: r for r in cdr_only_shares(model, ds, ["C02", "C03"])}
    assert set(rows) == {"C02", "C03"}  # C01 has a census: not asked for
    cov = ds["cdr_subscribers_per_resident"].values
    assert rows["C03"]["covariate"] == f"{np.nanmean(cov[country == 'C03']):.2f}"
    assert rows["C03"]["share"].startswith("0.13 [")
    assert rows["C03"]["offset"] == "-1.9" and rows["C03"]["far"]
    assert rows["C02"]["offset"] == "+0.8" and not rows["C02"]["far"]

    mu = truth["mu"]
    pred = xr.Dataset({"mean": mu, "q05": 0.5 * mu, "q50": mu, "q95": 2.0 * mu})
    html = report(tmp_path, data=ds, predictions=pred, model=model).read_text(encoding="utf-8")
    assert "share of movers counted" in html and "<b>-1.9</b>" in html
    # without a fit there is nothing to show, and nothing breaks
    assert cdr_only_shares(None, ds, ["C02", "C03"]) == []
