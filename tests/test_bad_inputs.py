"""A battery of bad inputs through the command line and the API (issue 18).

Every case is something a new user does: a typo in an option, a value out of
range, a table exported twice, a Latin-1 file, a raster that does not cover the
units, a run directory beside the inputs, a file cut short. Each must end in a
named error (the class checked through the API), one line on stderr naming the
file or the config key and the fix, exit code 2, and no partial output (no
stage output, no temporary file, inputs untouched).

The world is tiny (12 units, an 80 x 73 raster), so each case runs in a second
or two; no case fits a model.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowmodel import pipeline
from flowmodel.cli import EXIT_BAD_INPUT, EXIT_OK, main
from flowmodel.config import load_config
from flowmodel.exceptions import (
    CensusInputError,
    ConfigError,
    CorruptFileError,
    DataContractError,
    InputFileError,
    ModelLoadError,
    NoOverlapError,
    RunDirectoryError,
)

BASE = """\
[run]
name = "bad"
out_dir = "run"
seed = 1

[units]
path = "{units}"
layer = "units"

[rasters]
population = "{population}"

[flows.census]
path = "{census}"
options = {{ sample_fraction = 0.1, suppressed_min = 1 }}

[model]
type = "gravity"
backend = "map"

[dask]
cluster = "none"
"""


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from flowmodel.simulate import simulate_world

    root = tmp_path_factory.mktemp("bad-inputs-world")
    simulate_world(
        root,
        n_units=12,
        n_countries=2,
        seed=3,
        raster_size=80,
        census_countries=2,
        cdr_countries=1,
    )
    return root


def base(world: Path, **files: str) -> str:
    """The base config with the world's files, some replaced (``units=``, ``census=`` ...)."""
    paths = {
        "units": str(world / "units.gpkg"),
        "population": str(world / "population.tif"),
        "census": str(world / "census_od.csv"),
    }
    paths.update(files)
    return BASE.format(**paths)


def census_rows(world: Path) -> pd.DataFrame:
    return pd.read_csv(world / "census_od.csv", dtype=str, keep_default_na=False)


def write_raster_like(world: Path, path: Path, data: np.ndarray, **profile: object) -> Path:
    import rasterio

    with rasterio.open(world / "population.tif") as src:
        meta = src.profile | {"count": data.shape[0]} | profile
    with rasterio.open(path, "w", **meta) as dst:
        dst.write(data)
    return path


def population(world: Path) -> np.ndarray:
    import rasterio

    with rasterio.open(world / "population.tif") as src:
        return src.read()


@dataclass
class Case:
    """One bad input: how to make it, which command meets it, what it must say."""

    id: str
    build: Callable[[Path, Path], str]  # (case folder, world) -> config text
    error: type[Exception]
    match: str
    command: str = "prepare"
    before: list[str] = field(default_factory=list)  # commands that must succeed first
    kind: str = "toml"


# ------------------------------------------------------------------ config cases
def _with(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def _opts(world: Path, options: str) -> str:
    return _with(
        base(world),
        "options = { sample_fraction = 0.1, suppressed_min = 1 }",
        f"options = {options}",
    )


def _cdr(world: Path, options: str) -> str:
    return base(world) + textwrap.dedent(f"""
        [flows.cdr]
        kind = "cdr_events"
        path = "{world / "cdr_events.parquet"}"
        towers = "{world / "cdr_towers.csv"}"
        options = {options}
        """)


def _fusion(world: Path, options: str) -> str:
    return _with(base(world), 'type = "gravity"', 'type = "fusion"') + options


CONFIG_CASES = [
    Case(
        "option-typo-sample_frac",
        lambda d, w: _opts(w, "{ sample_frac = 0.1 }"),
        ConfigError,
        r"\[flows\.census\.options\] sample_frac: unknown option .*did you mean 'sample_fraction'",
    ),
    Case(
        "model-option-typo-contraint",
        lambda d, w: base(w) + '\n[model.options]\ncontraint = "doubly"\n',
        ConfigError,
        r"\[model\.options\] contraint: unknown option of GravityModel.*did you mean 'constraint'",
    ),
    Case(
        "model-option-bad-value",
        lambda d, w: base(w) + '\n[model.options]\nconstraint = "double"\n',
        ConfigError,
        r"\[model\.options\] .*constraint='double' is not valid",
    ),
    Case(
        "sample-kwargs-typo-target_acept",
        lambda d, w: base(w) + "\n[model.sample_kwargs]\ntarget_acept = 0.9\n",
        ConfigError,
        r"\[model\.sample_kwargs\] target_acept: unknown keyword.*did you mean 'target_accept'",
    ),
    Case(
        "sample-kwargs-reserved-random_seed",
        lambda d, w: base(w) + "\n[model.sample_kwargs]\nrandom_seed = 4\n",
        ConfigError,
        r"\[model\.sample_kwargs\] random_seed: set by \[run\] seed",
    ),
    Case(
        "sample-kwargs-target_accept-out-of-range",
        lambda d, w: base(w) + "\n[model.sample_kwargs]\ntarget_accept = 1.5\n",
        ConfigError,
        r"\[model\.sample_kwargs\] target_accept: must lie in \(0, 1\)",
    ),
    Case(
        "sample-kwargs-integrate-not-names",
        lambda d, w: base(w) + "\n[model.sample_kwargs]\nintegrate = [1, 2, 3, 4]\n",
        ConfigError,
        r"\[model\.sample_kwargs\] integrate: names the scalar hyperparameters .*1 to 3 distinct "
        r"names; got \[1, 2, 3, 4\]",
    ),
    Case(
        "universe-national",
        lambda d, w: _opts(w, '{ universe = "national" }'),
        ConfigError,
        r"\[flows\.census\.options\] universe: expected one of 'within', 'destination', 'abroad' or 'all', "
        r"got 'national'",
    ),
    Case(
        "sample-fraction-above-one",
        lambda d, w: _opts(w, "{ sample_fraction = 5 }"),
        ConfigError,
        r"\[flows\.census\.options\] sample_fraction: sample fractions must lie in \(0, 1\]",
    ),
    Case(
        "unknown-encoding",
        lambda d, w: _opts(w, '{ encoding = "latin-9000" }'),
        ConfigError,
        r"\[flows\.census\.options\] encoding: unknown text encoding 'latin-9000'",
    ),
    Case(
        "option-set-by-the-pipeline",
        lambda d, w: _opts(w, '{ units = "x.gpkg" }'),
        ConfigError,
        r"\[flows\.census\.options\] units: set by \[flows\.census\] path/towers and \[units\]",
    ),
    Case(
        "cdr-period-fortnight",
        lambda d, w: _cdr(w, '{ period = "fortnight" }'),
        ConfigError,
        r"\[flows\.cdr\.options\] period: expected one of 'day', 'week', 'month', 'quarter' or "
        r"'year', got 'fortnight'",
    ),
    Case(
        "cdr-misspelt-timezone",
        lambda d, w: _cdr(w, '{ timezone = "Africa/Nairbi" }'),
        ConfigError,
        r"\[flows\.cdr\.options\] timezone: unknown time zone 'Africa/Nairbi'\. Fix: did you "
        r"mean 'Africa/Nairobi'\?",
    ),
    Case(
        "cdr-option-typo",
        lambda d, w: _cdr(w, "{ min_active_day = 3 }"),
        ConfigError,
        r"\[flows\.cdr\.options\] min_active_day: unknown option of "
        r"flowmodel\.inputs\.cdr\.cdr_flows.*did you mean 'min_active_days'",
    ),
    Case(
        "seed-negative",
        lambda d, w: _with(base(w), "seed = 1", "seed = -1"),
        ConfigError,
        r"\[run\] seed: must be >= 0, got -1",
    ),
    Case(
        "units-path-empty-list",
        lambda d, w: _with(base(w), f'path = "{w / "units.gpkg"}"', "path = []"),
        ConfigError,
        r"\[units\] path: expected a units file or a non-empty list of them, got \[\]",
    ),
    Case(
        "draws-1e9",
        lambda d, w: _with(base(w), 'backend = "map"', 'backend = "map"\ndraws = 1e9'),
        ConfigError,
        r"\[model\] draws: must be <= 100000, got 1000000000\.0",
    ),
    Case(
        "out-dir-is-a-file",
        lambda d, w: _with(base(w), 'out_dir = "run"', f'out_dir = "{w / "census_od.csv"}"'),
        ConfigError,
        r"\[run\] out_dir = .*census_od\.csv is a file, not a folder",
    ),
    Case(
        "out-dir-under-a-file",
        lambda d, w: _with(base(w), 'out_dir = "run"', f'out_dir = "{w / "truth.json"}/run"'),
        ConfigError,
        r"\[run\] out_dir = .*truth\.json/run: .*truth\.json is a file, so the folder cannot be "
        r"made",
    ),
    Case(
        "slash-in-a-source-name",
        lambda d, w: _with(base(w), "[flows.census]", '[flows."census/2009"]'),
        ConfigError,
        r"'census/2009' is not usable as a name in \[flows\].*e\.g\. 'census_2009'",
    ),
    Case(
        "run-name-escapes-the-folder",
        lambda d, w: _with(base(w), 'name = "bad"\nout_dir = "run"', 'name = "../../x"'),
        ConfigError,
        r"\[run\] name: '\.\./\.\./x' is not usable as a run name",
    ),
    Case(
        "fusion-source-typo",
        lambda d, w: _fusion(w, '\n[model.options]\nsources = ["census", "cdrr"]\n'),
        ConfigError,
        r"\[model\.options\] sources: 'cdrr' is not a flow source of this config",
    ),
    Case(
        "fusion-latent-option-typo",
        lambda d, w: _fusion(
            w,
            '\n[model.options]\nsources = ["census"]\n\n[model.options.latent]\ntype = "gravity"\n'
            'origin_covariate = ["log_population"]\n',
        ),
        ConfigError,
        r"\[model\.options\.latent\] origin_covariate: unknown option.*did you mean "
        r"'origin_covariates'",
    ),
    Case(
        "fusion-market-share-spatial-not-bool",
        lambda d, w: _fusion(
            w, '\n[model.options]\nsources = ["census", "cdr"]\nmarket_share_spatial = "bym2"\n'
        ),
        ConfigError,
        r"market_share_spatial='bym2' is not valid\. Fix: true",
    ),
    Case(
        "evaluate-source-typo",
        lambda d, w: base(w) + '\n[evaluate]\nsources = ["censsu"]\n',
        ConfigError,
        r"\[evaluate\] sources: 'censsu' is not a flow source.*did you mean 'census'",
    ),
    Case(
        "report-truth-not-json",
        lambda d, w: base(w) + f'\n[report]\ntruth = "{w / "census_od.csv"}"\n',
        ConfigError,
        r"\[report\] truth = .*census_od\.csv: not a JSON file",
    ),
    Case(
        "config-not-utf8",
        lambda d, w: base(w).replace('name = "bad"', 'name = "bad"\n# S\xe3o Tom\xe9'),
        ConfigError,
        r"run\.toml: not UTF-8 text",
        kind="latin-1",
    ),
]


def _towers_for_census(d: Path, w: Path) -> str:
    census = f'path = "{w / "census_od.csv"}"'
    towers = f'{census}\nkind = "census_od"\ntowers = "{w / "cdr_towers.csv"}"'
    return _with(base(w), census, towers)


CONFIG_CASES.append(
    Case(
        "towers-given-to-a-census",
        _towers_for_census,
        ConfigError,
        r"\[flows\] census: 'towers' is read only by kind 'cdr_events', not 'census_od'",
    )
)


# ------------------------------------------------------------- run-directory cases
def _beside_inputs(d: Path, w: Path) -> str:
    """The demo's layout with the inputs beside the config and out_dir = '.'."""
    for name in ("units.gpkg", "population.tif", "census_od.csv"):
        (d / name).write_bytes((w / name).read_bytes())
    text = base(w, units="units.gpkg", population="population.tif", census="census_od.csv")
    return _with(text, 'out_dir = "run"', 'out_dir = "."')


def _foreign_files(d: Path, w: Path) -> str:
    (d / "run").mkdir()
    (d / "run" / "config.toml").write_text("# somebody else's config\n")
    (d / "run" / "flows.csv").write_text("origin,destination,flow\n")
    return base(w)


RUN_DIR_CASES = [
    Case(
        "out-dir-dot-beside-inputs",
        _beside_inputs,
        RunDirectoryError,
        r"\[run\] out_dir = .*: the run writes files of the same name there, so it would "
        r"overwrite its input\(s\) units\.path = .*units\.gpkg.*out_dir = \"run\"",
    ),
    Case(
        "foreign-files-in-a-fresh-out-dir",
        _foreign_files,
        RunDirectoryError,
        r"has no manifest\.json but holds config\.toml, flows\.csv: files flowmodel did not "
        r"write there",
    ),
]


# -------------------------------------------------------------------- input cases
def _census_table(d: Path, w: Path, table: pd.DataFrame, name: str = "census.csv", **kw) -> str:
    table.to_csv(d / name, index=False, **kw)
    return base(w, census=str(d / name))


def _census_text(d: Path, w: Path, data: bytes, name: str = "census.csv") -> str:
    (d / name).write_bytes(data)
    return base(w, census=str(d / name))


def _duplicate_rows(d: Path, w: Path) -> str:
    rows = census_rows(w)
    return _census_table(d, w, pd.concat([rows, rows.iloc[[3]]], ignore_index=True))


def _conflicting_rows(d: Path, w: Path) -> str:
    rows = census_rows(w)
    extra = rows.iloc[[5]].assign(count="500")
    return _census_table(d, w, pd.concat([rows, extra], ignore_index=True))


def _implausible(d: Path, w: Path) -> str:
    rows = census_rows(w)
    rows.loc[2, "count"] = "1000000000000"
    return _census_table(d, w, rows)


def _fractional(d: Path, w: Path) -> str:
    rows = census_rows(w)
    rows.loc[4, "count"] = "12.5"
    return _census_table(d, w, rows)


def _fraction_mapping(d: Path, w: Path) -> str:
    countries = sorted({u[:3] for u in census_rows(w)["destination"]})
    return _opts(w, f"{{ sample_fraction = {{ {countries[0]} = 0.1 }}, suppressed_min = 1 }}")


def _latin1(d: Path, w: Path) -> str:
    rows = census_rows(w).assign(note="S\u00e3o Tom\u00e9")
    rows.to_csv(d / "census.csv", index=False, encoding="latin-1")
    return base(w, census=str(d / "census.csv"))


def _missing_previous(d: Path, w: Path) -> str:
    rows = pd.read_csv(w / "census_persons.csv", dtype=str, keep_default_na=False)
    rows = rows.loc[rows["previous_unit"] != ""].reset_index(drop=True)  # immigrants: country only
    rows.loc[1, "previous_unit"] = ""
    rows.to_csv(d / "persons.csv", index=False)
    text = base(w, census=str(d / "persons.csv"))
    return _with(
        text,
        "options = { sample_fraction = 0.1, suppressed_min = 1 }",
        'kind = "census_persons"\noptions = { weight = "weight" }',
    )


def _three_bands(d: Path, w: Path) -> str:
    pop = population(w)
    write_raster_like(w, d / "rgb.tif", np.concatenate([pop, pop, pop]))
    return base(w, population=str(d / "rgb.tif"))


def _all_nodata(d: Path, w: Path) -> str:
    pop = population(w)
    write_raster_like(w, d / "void.tif", np.full_like(pop, -99999.0))
    return _with(base(w), "[rasters]\n", f'[rasters]\nnight_lights = "{d / "void.tif"}"\n')


def _partly_outside(d: Path, w: Path) -> str:
    import rasterio
    from rasterio.windows import Window

    with rasterio.open(w / "population.tif") as src:
        window = Window(0, 0, src.width // 2, src.height)
        meta = src.profile | {
            "width": src.width // 2,
            "transform": src.window_transform(window),
            "tiled": False,
        }
        meta.pop("blockxsize"), meta.pop("blockysize")
        data = src.read(window=window)
    with rasterio.open(d / "west.tif", "w", **meta) as dst:
        dst.write(data)
    return base(w, population=str(d / "west.tif"))


def _units_in_two_files(d: Path, w: Path) -> str:
    import geopandas as gpd

    units = gpd.read_file(w / "units.gpkg", layer="units")
    units.iloc[:7].to_file(d / "a.gpkg", layer="units")
    units.iloc[6:].to_file(d / "b.gpkg", layer="units")  # unit 6 in both
    return _with(
        base(w), f'path = "{w / "units.gpkg"}"', f'path = ["{d / "a.gpkg"}", "{d / "b.gpkg"}"]'
    )


def _duplicated_feature(d: Path, w: Path) -> str:
    import geopandas as gpd

    units = gpd.read_file(w / "units.gpkg", layer="units")
    units.loc[len(units)] = units.iloc[2].copy()
    units.loc[len(units) - 1, "unit_id"] = "XAN999"
    units.to_file(d / "units.gpkg", layer="units")
    return base(w, units=str(d / "units.gpkg"))


def _truncated_units(d: Path, w: Path) -> str:
    data = (w / "units.gpkg").read_bytes()
    (d / "units.gpkg").write_bytes(data[: len(data) // 4])
    return base(w, units=str(d / "units.gpkg"))


def _table_fraction(d: Path, w: Path) -> str:
    (d / "moves.csv").write_text("origin,destination,count\nXAN001,XAN002,4\nXAN002,XAN001,2.5\n")
    return base(w) + f'\n[flows.moves]\nkind = "table"\npath = "{d / "moves.csv"}"\n'


def _truncated_dataset(d: Path, w: Path) -> str:
    return base(w)


INPUT_CASES = [
    Case(
        "census-exact-duplicate-rows",
        _duplicate_rows,
        CensusInputError,
        r"census\.csv: 1 pair\(s\) on identical rows \(a repeated export\?\) \[.*rows \[4, \d+\]"
        r".*duplicates='sum'",
    ),
    Case(
        "census-two-values-for-one-pair",
        _conflicting_rows,
        CensusInputError,
        r"census\.csv: 1 pair\(s\) with different counts \[.*rows \[6, \d+\], counts \[.*'500'\]",
    ),
    Case(
        "census-count-of-1e12",
        _implausible,
        CensusInputError,
        r"census\.csv: 1 count\(s\) larger than the population of their units allows: data row 3:"
        r" .* count 1e\+12 > .*sample fraction 0\.1",
    ),
    Case(
        "census-sample-fraction-mapping-misses-a-country",
        _fraction_mapping,
        CensusInputError,
        r"census_od\.csv: sample_fraction gives no fraction for census countr\(ies\) \[XBO",
    ),
    Case(
        "census-fractional-count",
        _fractional,
        CensusInputError,
        r"census\.csv: column 'count': 1 count\(s\) are not whole numbers, at data row\(s\) \[5\]",
    ),
    Case(
        "census-latin-1",
        _latin1,
        InputFileError,
        r"census\.csv: the census OD file is not utf-8 text.*encoding='latin-1'",
    ),
    Case(
        "census-empty-file",
        lambda d, w: _census_text(d, w, b""),
        InputFileError,
        r"census\.csv: the census OD file is empty \(0 bytes\)",
    ),
    Case(
        "census-header-only",
        lambda d, w: _census_text(d, w, b"origin,destination,count\n"),
        InputFileError,
        r"census\.csv: the census OD file has no rows",
    ),
    Case(
        "census-persons-missing-previous-unit",
        _missing_previous,
        CensusInputError,
        r"persons\.csv: column 'previous_unit' is empty at 1 data row\(s\) \[2\]: the previous "
        r"residence is missing \(not an unknown code\)",
    ),
    Case(
        "table-fractional-count",
        _table_fraction,
        DataContractError,
        r"moves\.csv \(flows\.moves\): column 'count': 1 value\(s\) are not whole numbers, at "
        r"data row\(s\) \[2\]",
    ),
    Case(
        "population-geotiff-with-3-bands",
        _three_bands,
        InputFileError,
        r"raster 'population': .*rgb\.tif has 3 bands",
    ),
    Case(
        "all-nodata-raster",
        _all_nodata,
        NoOverlapError,
        r"raster 'night_lights' \(.*void\.tif\): every pixel under the units is nodata",
    ),
    Case(
        "units-partly-outside-the-population-raster",
        _partly_outside,
        NoOverlapError,
        r"raster 'population' \(.*west\.tif\): \d+ unit\(s\) get no population because they lie "
        r"outside its extent.*Fix: give a population raster whose extent covers every unit",
    ),
    Case(
        "unit-in-two-units-files",
        _units_in_two_files,
        DataContractError,
        r"b\.gpkg: unit id\(s\) \['XBO\d+'\] are also in .*a\.gpkg",
    ),
    Case(
        "duplicated-feature-under-another-id",
        _duplicated_feature,
        DataContractError,
        r"units\.gpkg \(layer 'units'\): 1 geometr\(ies\) appear under more than one unit id: "
        r"XAN003=XAN999",
    ),
    Case(
        "truncated-units-file",
        _truncated_units,
        InputFileError,
        r"units\.gpkg: cannot be read as polygons",
    ),
    Case(
        "truncated-dataset-nc",
        _truncated_dataset,
        pipeline.StageInputChangedError,
        r"stage 'fit' needs .*dataset\.nc, which changed since stage 'prepare' wrote it.*run "
        r"'flowmodel prepare .*run\.toml' again",
        command="fit",
        before=["prepare"],
    ),
]

CASES = CONFIG_CASES + RUN_DIR_CASES + INPUT_CASES


def test_battery_is_large_enough() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "run" not in p.relative_to(folder).parts
    }


def _outputs(run: Path, command: str) -> list[str]:
    stages = pipeline.STAGE_ORDER if command == "run" else (command,)
    made = {
        "prepare": (pipeline.DATASET, pipeline.UNITS),
        "fit": (pipeline.POSTERIOR,),
        "predict": (pipeline.FLOWS, pipeline.FLOWS_CSV, pipeline.FLOW_LINES),
        "evaluate": (pipeline.METRICS,),
        "report": (pipeline.REPORT,),
    }
    names = [n for s in stages if s in made for n in made[s]]
    if command == "validate":
        names = list(pipeline.STAGE_FILES)
    if not run.exists():
        return []
    return [n for n in names if (run / n).exists()] + [
        p.name for p in run.iterdir() if ".tmp" in p.name
    ]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: Path, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "case"
    folder.mkdir()
    text = case.build(folder, world)
    config = folder / "run.toml"
    config.write_bytes(text.encode("latin-1" if case.kind == "latin-1" else "utf-8"))
    for command in case.before:
        assert main(["-q", command, str(config)]) == EXIT_OK, capsys.readouterr().err
    if case.id == "truncated-dataset-nc":
        dataset = folder / "run" / pipeline.DATASET
        dataset.write_bytes(dataset.read_bytes()[:-500])
    world_before, case_before = _digest(world), _digest(folder)
    run = config.parent / ("run" if 'out_dir = "run"' in text else "")
    command = "validate" if case in CONFIG_CASES else case.command
    # the API raises the named class with the message
    with pytest.raises(case.error, match=case.match):
        cfg = load_config(config)
        if command != "validate":
            pipeline.run_pipeline(cfg, [command])
    # the command line: exit code 2, one line naming the file or key, and the fix
    capsys.readouterr()
    code = main([command, str(config)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == EXIT_BAD_INPUT, err
    assert err[-1].startswith("flowmodel: error: ") and "Fix" in err[-1], err[-1]
    assert re.search(case.match, err[-1]), err[-1]
    # nothing half made (files that were there before are inputs), nothing destroyed
    assert not [n for n in _outputs(run, command) if n not in case_before]
    assert _digest(world) == world_before
    assert _digest(folder) == case_before


# ----------------------------------------------------------------- good cases
def test_config_with_a_utf8_bom_is_read(world: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_bytes(base(world).encode("utf-8-sig"))
    assert main(["validate", str(config)]) == EXIT_OK, capsys.readouterr().err
    assert load_config(config).run.name == "bad"


def test_semicolon_delimited_census_is_prepared(world: Path, tmp_path: Path, capsys) -> None:
    census_rows(world).to_csv(tmp_path / "census.csv", index=False, sep=";")
    config = tmp_path / "run.toml"
    config.write_text(base(world, census=str(tmp_path / "census.csv")))
    assert main(["-q", "prepare", str(config)]) == EXIT_OK, capsys.readouterr().err
    from flowmodel.dataset import load_dataset

    ds = load_dataset(tmp_path / "run" / pipeline.DATASET)
    assert int(ds["flow_census"].notnull().sum()) > 0


def test_truncated_posterior_gives_the_package_error(tmp_path: Path) -> None:
    import xarray as xr

    run = tmp_path / "run"
    run.mkdir()
    tree = xr.DataTree(
        xr.Dataset({"beta": (("chain", "draw"), np.zeros((2, 50)))}), name="posterior"
    )
    out = xr.DataTree(children={"posterior": tree})
    out.attrs["flowmodel_model_class"] = "GravityModel"
    out.to_netcdf(run / pipeline.POSTERIOR, engine="h5netcdf")
    data = (run / pipeline.POSTERIOR).read_bytes()
    (run / pipeline.POSTERIOR).write_bytes(data[: len(data) // 2])
    (tmp_path / "units.gpkg").write_bytes(b"x")
    config = tmp_path / "run.toml"
    config.write_text('[run]\nout_dir = "run"\n[units]\npath = "units.gpkg"\n')
    ctx = pipeline.StageContext(config=load_config(config), run_dir=run)
    # the package's error (the model layer's own, or the pipeline's), never h5py's
    with pytest.raises(
        (CorruptFileError, ModelLoadError),
        match=r"posterior\.nc: .*cannot be read.*truncated.*Fix: .*(flowmodel fit|fit stage)",
    ):
        pipeline._load_model(ctx)


HOLD_LOCK = """
import sys
from flowmodel.pipeline import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_second_process_in_the_same_run_directory_exits_2(world, tmp_path, capsys) -> None:
    config = tmp_path / "run.toml"
    config.write_text(base(world))
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / "run")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        code = main(["prepare", str(config)])
        err = capsys.readouterr().err
        assert code == EXIT_BAD_INPUT
        assert f"another flowmodel process (pid {holder.pid}) is running" in err
        assert not (tmp_path / "run" / pipeline.DATASET).exists()
    finally:
        holder.communicate("")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_dir(world: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        config = tmp_path / "run.toml"
        config.write_text(_with(base(world), 'out_dir = "run"', f'out_dir = "{locked}/run"'))
        with pytest.raises(ConfigError, match=r"locked is not writable"):
            load_config(config)
    finally:
        locked.chmod(0o700)


def test_truncated_dataset_gives_the_package_error(tmp_path: Path) -> None:
    from flowmodel.dataset import load_dataset, save_dataset
    from flowmodel.simulate import simulate_flow_dataset

    path = save_dataset(simulate_flow_dataset(n_units=5, seed=2)[0], tmp_path / "dataset.nc")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CorruptFileError,
        match=r"dataset\.nc: the FlowDataset cannot be read \(OSError: .*truncated file.*\); the "
        r"file is truncated or corrupt .*Fix: write it again \(rerun 'flowmodel prepare CONFIG'",
    ):
        load_dataset(path)
    path.write_bytes(b"not a netcdf file")
    with pytest.raises(CorruptFileError, match=r"file signature not found"):
        load_dataset(path)


def _same_seed_runs(world: Path, tmp_path: Path, capsys, stages: list[str]) -> list[Path]:
    runs = []
    for name in ("a", "b"):
        config = tmp_path / name / "run.toml"
        config.parent.mkdir()
        config.write_text(_with(base(world), 'backend = "map"', 'backend = "laplace"\ndraws = 50'))
        for stage in stages:
            assert main(["-q", stage, str(config)]) == EXIT_OK, capsys.readouterr().err
        runs.append(config.parent / "run")
    return runs


def test_same_inputs_give_the_same_dataset(world: Path, tmp_path: Path, capsys) -> None:
    from flowmodel.dataset import dataset_fingerprint, load_dataset

    a, b = _same_seed_runs(world, tmp_path, capsys, ["prepare"])
    assert dataset_fingerprint(load_dataset(a / pipeline.DATASET)) == dataset_fingerprint(
        load_dataset(b / pipeline.DATASET)
    )


@pytest.mark.slow
def test_same_seed_gives_the_same_posterior(world: Path, tmp_path: Path, capsys) -> None:
    import xarray as xr

    a, b = _same_seed_runs(world, tmp_path, capsys, ["prepare", "fit"])
    with (
        xr.open_datatree(a / pipeline.POSTERIOR, engine="h5netcdf") as ta,
        xr.open_datatree(b / pipeline.POSTERIOR, engine="h5netcdf") as tb,
    ):
        xr.testing.assert_equal(ta["posterior"].to_dataset(), tb["posterior"].to_dataset())
